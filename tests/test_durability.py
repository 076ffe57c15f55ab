"""Durability: an order answered AA survives kill -9 at any moment; after a restart no temporary
file is left or served. And nothing is lost: a refused message is kept byte for byte with its
reason, and `wlbridge replay` sends it again once its cause is fixed."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pydicom

from bridge.net.client import MLLPClient, ack_summary, find, worklist_query
from bridge.storage.store import TEMP_PREFIX
from tests.conftest import ROOT, RunningBridge, start_bridge
from tests.messages import orm


def order(tag: str) -> bytes:
    return orm(
        control_id=tag,
        accession=f"A{tag}",
        placer=f"P{tag}",
        filler=f"F{tag}",
        sps_id=f"S{tag}",
        study_uid=f"1.2.826.0.1.3680043.10.543.{abs(hash(tag)) % 10**12}",
    ).encode("ascii")


class Sender(threading.Thread):
    """Streams distinct orders on one long-lived connection until it breaks; records the
    accession numbers of the orders answered AA."""

    def __init__(self, name: str, port: int, acked: list[str], progress: threading.Condition):
        super().__init__(daemon=True)
        self.tag, self.port, self.acked, self.progress = name, port, acked, progress
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with MLLPClient("127.0.0.1", self.port, timeout=10) as client:
                for n in range(100_000):
                    tag = f"{self.tag}N{n}"
                    code, control, _ = ack_summary(client.send(order(tag)))
                    assert (code, control) == ("AA", tag), (code, control)
                    with self.progress:
                        self.acked.append(f"A{tag}")
                        self.progress.notify_all()
        except (OSError, ConnectionError):
            return  # the server was killed: this is how every sender ends
        except BaseException as exc:  # reported by the test
            self.error = exc


def all_accessions(bridge: RunningBridge) -> list[str]:
    status, answers = find("127.0.0.1", bridge.dicom_port, worklist_query(), bridge.ae_title)
    assert status == 0
    return [str(a.AccessionNumber) for a in answers]


def test_aa_orders_survive_kill_9_at_random_moments(tmp_path):
    rng = random.Random()
    acked: list[str] = []
    progress = threading.Condition()
    running = start_bridge(tmp_path)
    for cycle in range(3):
        senders = [Sender(f"K{cycle}T{t}", running.mllp_port, acked, progress) for t in range(2)]
        for sender in senders:
            sender.start()
        target = len(acked) + rng.randint(5, 60)  # a random moment, measured in AAs
        with progress:
            reached = progress.wait_for(lambda t=target: len(acked) >= t, timeout=30)
        assert reached, len(acked)
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(timeout=10)
        for sender in senders:
            sender.join(timeout=15)
            assert not sender.is_alive() and sender.error is None, sender.error
        folder = running.worklist_dir
        # what a write cut short leaves: a temporary file, here an unfinished one
        (folder / f"{TEMP_PREFIX}99999-{cycle}").write_bytes(b"DICM partial")
        running = start_bridge(tmp_path)
        assert running.worklist_dir == folder
        assert not [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]
        files = running.wl_files()
        for path in files:
            pydicom.dcmread(path)  # whole files only
        served = all_accessions(running)
        assert len(served) == len(files)  # every file served, nothing else
        with progress:
            missing = set(acked) - set(served)
        assert not missing, f"cycle {cycle}: AA'd orders lost: {sorted(missing)}"
    assert running.stop() == 0


def replay(port: int, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "replay", "--port", str(port), *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rejected_message_is_kept_then_replayed_once_the_cause_is_fixed(tmp_path):
    too_long = order("RP1").replace(b"DOE^JANE^Q", b"DOE^" + b"J" * 70)  # PN allows 64
    still_bad = order("RP2").replace(b"202612011030", b"tomorrow")
    running = start_bridge(tmp_path, "--strict")  # strict: an overlong name is refused
    with MLLPClient("127.0.0.1", running.mllp_port) as client:
        assert ack_summary(client.send(too_long))[:2] == ("AE", "RP1")
        assert ack_summary(client.send(still_bad))[:2] == ("AE", "RP2")
    records = {r["control_id"]: r for r in running.log_records()}
    kept = {cid: Path(records[cid]["kept_as"]) for cid in ("RP1", "RP2")}
    assert kept["RP1"].read_bytes() == too_long and kept["RP2"].read_bytes() == still_bad
    reason = kept["RP1"].with_suffix(".reason").read_text("utf-8")
    assert "102" in reason and "PatientName" in reason
    assert running.stop() == 0

    running = start_bridge(tmp_path, "--strict", "--overlong-values", "truncate")
    result = replay(running.mllp_port, kept["RP1"], kept["RP2"])
    assert result.returncode == 1, result.stdout + result.stderr  # RP2 is still refused
    assert f"{kept['RP1'].name}: AA RP1" in result.stdout
    assert f"{kept['RP2'].name}: AE RP2" in result.stdout
    done = running.rejected_dir / "replayed"
    assert (done / kept["RP1"].name).read_bytes() == too_long
    assert (done / kept["RP1"].with_suffix(".reason").name).is_file()
    assert not kept["RP1"].exists() and not kept["RP1"].with_suffix(".reason").exists()
    assert kept["RP2"].read_bytes() == still_bad  # stays for another try
    assert all_accessions(running) == ["ARP1"]
    assert running.stop() == 0
