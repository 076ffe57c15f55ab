"""Fixtures: a real `wlbridge serve` process on free ports, with its folders in a temp dir."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge.ops.translation_log import parse_logfmt
from tests.peers import free_port
from tests.ris_receiver import RISReceiver

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
READY = "wlbridge serving"


@dataclass
class RunningBridge:
    process: subprocess.Popen
    mllp_port: int
    dicom_port: int
    ae_title: str
    worklist_dir: Path
    log_path: Path
    rejected_dir: Path
    stderr_lines: list[str] = field(default_factory=list)

    def log_records(self, queries: bool = False) -> list[dict[str, str]]:
        """The translation log's records; those of C-FIND queries only with `queries`."""
        if not self.log_path.exists():
            return []
        records = [parse_logfmt(line) for line in self.log_path.read_text("utf-8").splitlines()]
        return [r for r in records if queries or r.get("type") != "C-FIND"]

    def wl_files(self) -> list[Path]:
        return sorted(self.worklist_dir.rglob("*.wl"))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_bridge(
    tmp_path: Path, *extra: str, ae_title: str = "WLBRIDGE", worklist_dir: Path | None = None
) -> RunningBridge:
    """Start `python -m bridge serve` and return once it says both listeners are up.

    DICOM is served in-process (`--dicom-workers 0`) unless `extra` names dicom-workers or a
    config file: worker processes add a second or so to every start."""
    if not any(a.startswith(("--dicom-workers", "--config")) for a in extra):
        extra = ("--dicom-workers", "0", *extra)
    mllp_port, dicom_port = free_port(), free_port()
    worklist_dir = worklist_dir or tmp_path / "worklists" / ae_title
    log_path = tmp_path / "logs" / "translation.log"
    rejected = tmp_path / "rejected"
    cmd = [
        sys.executable,
        "-m",
        "bridge",
        "serve",
        "--host",
        "127.0.0.1",
        "--mllp-port",
        str(mllp_port),
        "--dicom-port",
        str(dicom_port),
        "--ae-title",
        ae_title,
        "--worklist-dir",
        str(worklist_dir),
        "--translation-log",
        str(log_path),
        "--rejected-dir",
        str(rejected),
        "--mpps-dir",
        str(tmp_path / "mpps"),
        *extra,
    ]
    process = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    running = RunningBridge(
        process, mllp_port, dicom_port, ae_title, worklist_dir, log_path, rejected
    )

    def pump() -> None:  # keeps the pipe drained for the whole run
        for line in process.stdout:
            running.stderr_lines.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            process.kill()
            raise RuntimeError("wlbridge did not report ready within 30 s") from None
        if line is None:
            raise RuntimeError("wlbridge exited before ready:\n" + "".join(running.stderr_lines))
        if READY in line:
            return running


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[RunningBridge]:
    running = start_bridge(tmp_path)
    yield running
    code = running.stop()
    assert code == 0, "".join(running.stderr_lines)


@pytest.fixture(scope="module")
def reactor():
    """A private Twisted reactor running in a thread, as the bridge's reactor would (one a
    test module)."""
    from twisted.internet.epollreactor import EPollReactor

    r = EPollReactor()
    thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    yield r
    r.callFromThread(r.stop)
    thread.join(10)


@pytest.fixture
def ris() -> Iterator[RISReceiver]:
    """A RIS listening for the bridge's outbound messages (tests/ris_receiver.py)."""
    receiver = RISReceiver()
    yield receiver
    receiver.stop()
