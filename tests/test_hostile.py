"""Hostile peers and hostile folders against a running `wlbridge serve`: the folder reader trusts
nothing (tests/hostile/folder-cases.toml), slow MLLP senders are cut at the frame timeout, a TLS
handshake on the plain port is refused as such, and no log line carries a raw control, DEL or
bidi character whatever the HL7 fields and C-FIND values hold."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import tomllib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from bench.worklist_items import make_item, write_item
from bridge.net.client import find, worklist_query
from tests.conftest import RunningBridge, start_bridge
from tests.messages import orm, segment
from tests.net.test_mllp import client_hello
from tests.ops.test_translation_log import DANGEROUS
from tests.test_robustness import Connection, msa, order, send_one

HOSTILE = Path(__file__).parent / "hostile"
FOLDER_CASES = tomllib.loads((HOSTILE / "folder-cases.toml").read_text("utf-8"))
LONG_ID = "PAT-0093117-LONGID"


def adt_a08(control_id: str, patient_id: str, name: str) -> bytes:
    segments = [
        segment("MSH", {3: "ADT", 4: "HOSP", 7: "20261127", 9: "ADT^A08", 10: control_id,
                        11: "P", 12: "2.5.1"}),
        segment("EVN", {2: "20261127"}),
        segment("PID", {1: "1", 3: f"{patient_id}^^^HOSP^MR", 5: name, 7: "19700101", 8: "F"}),
        segment("PV1", {1: "1", 2: "O"}),
    ]  # fmt: skip
    return ("\r".join(segments) + "\r").encode("latin-1")


def other_program_writes(path: Path, ds: Dataset) -> None:
    temp = path.with_name(".tmp-" + path.name)
    write_item(temp, ds)
    os.replace(temp, path)


def build_case(folder: Path, name: str, case: dict, outside: Path) -> object:
    """Make the case's file; returns what must stay open while the server runs (a socket)."""
    path = folder / name
    kind = case["kind"]
    if kind == "truncated":
        good = (folder / "good1.wl").read_bytes()
        cut = good.index(LONG_ID.encode()) + 7  # inside the value: PAT-009
        path.write_bytes(good[:cut])
    elif kind == "preamble":
        path.write_bytes(b"\0" * 128 + b"DICM")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        if len(os.fsencode(path)) >= 100:
            return None  # AF_UNIX paths are short; the other cases still run
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.fspath(path))
        return sock
    elif kind == "symlink":
        path.symlink_to(case["target"])
    elif kind == "symlink-outside":
        write_item(outside, make_item("OUT1", patient_id="PAT-OUT"))
        path.symlink_to(outside)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(400 * 1024 * 1024)  # sparse: costs no disk
    else:
        raise AssertionError(kind)
    return None


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def accessions(bridge: RunningBridge) -> tuple[list[str], list[Dataset]]:
    status, answers = find("127.0.0.1", bridge.dicom_port, worklist_query(),
                           called_aet=bridge.ae_title, timeout=30)  # fmt: skip
    assert status == 0
    return sorted(a.AccessionNumber for a in answers), answers


def wait_for(predicate, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def test_a_hostile_folder_neither_hangs_nor_is_served_in_part(tmp_path):
    folder = tmp_path / "worklists" / "WLBRIDGE"
    folder.mkdir(parents=True)
    write_item(folder / "good1.wl", make_item("GOOD1", patient_id=LONG_ID))
    write_item(folder / "good2.wl", make_item("GOOD2", patient_id="PAT-2"))
    held = [build_case(folder, n, c, tmp_path / "elsewhere.wl") for n, c in FOLDER_CASES.items()]
    started = time.monotonic()
    bridge = start_bridge(tmp_path, worklist_dir=folder)  # raises unless ready within 30 s
    try:
        startup = time.monotonic() - started
        found, answers = accessions(bridge)
        assert found == ["GOOD1", "GOOD2"]  # none of the cases, not even the outside item
        assert {a.PatientID for a in answers} == {LONG_ID, "PAT-2"}  # never PAT-009
        assert rss_mib(bridge.process.pid) < 300  # the 400 MB file and /dev/zero were not read
        for name in FOLDER_CASES:
            if (folder / name).exists() or (folder / name).is_symlink():
                lines = [line for line in bridge.stderr_lines if name in line]
                assert len(lines) == 1, (name, lines)
        # An ADT for the patient of the item outside the folder is not refused forever.
        assert msa(send_one(bridge.mllp_port, adt_a08("ADT-OUT", "PAT-OUT", "NEW^NAME")))[0] == "AA"
        # At run time: another FIFO does not stop other programs' files from being picked up.
        os.mkfifo(folder / "later-fifo.wl")
        other_program_writes(folder / "good3.wl", make_item("GOOD3", patient_id="PAT-3"))
        wait_for(lambda: "GOOD3" in accessions(bridge)[0], what="GOOD3 served")
        # A FIFO renamed over an indexed item, then an ADT for its patient: the reactor answers.
        os.mkfifo(folder / ".swap")
        os.replace(folder / ".swap", folder / "good2.wl")
        sent = time.monotonic()
        code, _ = msa(send_one(bridge.mllp_port, adt_a08("ADT-FIFO", "PAT-2", "FIFO^RENAMED")))
        assert code in ("AA", "AR") and time.monotonic() - sent < 10
        assert msa(send_one(bridge.mllp_port, order("AFTER")))[0] == "AA"
        wait_for(lambda: "GOOD2" not in accessions(bridge)[0], what="good2.wl withdrawn")
        print(f"start-up {startup:.2f} s, RSS {rss_mib(bridge.process.pid):.0f} MiB")
    finally:
        assert bridge.stop(signal.SIGTERM) == 0, "".join(bridge.stderr_lines)
        for sock in held:
            if sock is not None:
                sock.close()


def trickle(sock: socket.socket, stop: threading.Event) -> None:
    """A frame's start, then one byte every half second: traffic, but never an end."""
    try:
        sock.sendall(b"\x0bMSH|^~\\&|SLOW|")
        while not stop.wait(0.5):
            sock.sendall(b"x")
    except OSError:
        pass  # cut by the server


def test_slow_senders_inside_a_frame_do_not_keep_the_engine_out(tmp_path):
    frame_timeout = 3
    bridge = start_bridge(tmp_path, "--frame-timeout", str(frame_timeout),
                          "--max-connections", "3")  # fmt: skip
    stop = threading.Event()
    slow = [socket.create_connection(("127.0.0.1", bridge.mllp_port)) for _ in range(3)]
    threads = [threading.Thread(target=trickle, args=(s, stop), daemon=True) for s in slow]
    try:
        for t in threads:
            t.start()
        started = time.monotonic()
        while True:  # the engine retries, as engines do, until it gets its ACK
            try:
                conn = Connection(bridge.mllp_port, timeout=5)
                conn.send_frame(order("ENGINE"))
                acks = conn.read_acks(1)
                conn.close()
                if acks:
                    assert msa(acks[0]) == ("AA", "OK-ENGINE")
                    break
            except OSError:
                pass
            assert time.monotonic() - started < frame_timeout + 15, "engine kept out"
            time.sleep(0.2)
        waited = time.monotonic() - started
        print(f"engine got in after {waited:.1f} s (frame-timeout {frame_timeout} s)")
        records = bridge.log_records()
        dropped = [r for r in records if r.get("outcome") == "dropped"]
        assert len(dropped) == 3 and all("frame timeout" in r["reason"] for r in dropped)
        assert any(r.get("outcome") == "connection-refused" and "max-connections" in r["reason"]
                   for r in records) or waited < frame_timeout  # fmt: skip
    finally:
        stop.set()
        for s in slow:
            s.close()
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_a_tls_handshake_on_the_plain_port_is_logged_not_kept(bridge):
    conn = Connection(bridge.mllp_port)
    conn.send(client_hello())
    assert conn.wait_closed() and b"MSA" not in conn.buffer
    conn.close()
    wait_for(lambda: any(r.get("outcome") == "connection-refused" for r in bridge.log_records()))
    [line] = [r for r in bridge.log_records() if r.get("outcome") == "connection-refused"]
    assert "TLS handshake on the plain MLLP port" in line["reason"]
    assert not bridge.rejected_dir.exists() or not list(bridge.rejected_dir.iterdir())
    assert msa(send_one(bridge.mllp_port, order("AFTER-TLS")))[0] == "AA"


HOSTILE_TEXT = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x85\x7f\u2028\u202eevil\u200b\ufeff"


def hostile_order() -> bytes:
    """A UTF-8 order whose fields (control ID, names, IDs, procedure text) hold what terminals
    act on (none of it an HL7 delimiter)."""
    text = HOSTILE_TEXT
    return orm(
        control_id="CTRL" + text, patient_name=f"DOE{text}^JANE", accession=f"ACC{text}"[:16],
        placer="PTERM", filler="FTERM", sps_id="STERM", study_uid="1.2.826.0.1.3680043.10.543.77",
        procedure=f"CT{text}^Head{text}^LOCAL", charset="UNICODE UTF-8",
    ).encode("utf-8")  # fmt: skip


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_no_raw_control_or_bidi_character_reaches_either_log(tmp_path, fmt):
    bridge = start_bridge(tmp_path, "--translation-log-format", fmt)
    try:
        for payload in (hostile_order(), (HOSTILE / "control-characters.hl7").read_bytes()):
            conn = Connection(bridge.mllp_port)
            conn.send_frame(payload)
            assert conn.read_acks(1)
            conn.close()
        query = worklist_query()
        query.SpecificCharacterSet = "ISO_IR 192"
        query.PatientID = "X" + HOSTILE_TEXT.replace("\\", "")
        query.AccessionNumber = "\x1b[1A\x1b[2K*"
        status, _ = find("127.0.0.1", bridge.dicom_port, query, called_aet=bridge.ae_title)
        assert status == 0
        assert msa(send_one(bridge.mllp_port, order("PROBE")))[0] == "AA"
    finally:
        assert bridge.stop() == 0
    log_text = bridge.log_path.read_text("utf-8")
    stderr_text = "".join(bridge.stderr_lines)
    assert "C-FIND" in stderr_text  # the query's keys are logged, escaped
    for name, text in (("translation log", log_text), ("stderr", stderr_text)):
        for line in text.splitlines():
            bad = sorted({c for c in line if c in DANGEROUS or not c.isprintable()})
            assert not bad, (name, [hex(ord(c)) for c in bad], line)
    assert "\\u202e" in log_text and "\\u202e" in stderr_text
    # identifiers stored in items carry none of them either
    for path in bridge.wl_files():
        item = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientID", "AccessionNumber"):
            assert str(item.get(keyword, "")).isprintable(), (keyword, item.get(keyword))


def test_removals_by_other_programs_get_translation_log_lines(bridge):
    path = bridge.worklist_dir / "theirs.wl"
    other_program_writes(path, make_item("THEIRS", patient_id="PAT-T"))
    wait_for(lambda: "THEIRS" in accessions(bridge)[0], what="their item served")
    assert msa(send_one(bridge.mllp_port, order("OURS")))[0] == "AA"
    ours = [r["file"] for r in bridge.log_records() if r.get("control_id") == "OK-OURS"][0]
    path.unlink()
    wait_for(lambda: any(r.get("outcome") == "removed-externally" for r in bridge.log_records()),
             what="a line for the removal")  # fmt: skip
    [line] = [r for r in bridge.log_records() if r.get("outcome") == "removed-externally"]
    assert line["file"] == "theirs.wl" and "another program" in line["note"]
    (bridge.worklist_dir / ours).unlink()  # one of the bridge's own items, removed by hand
    wait_for(lambda: sum(r.get("outcome") == "removed-externally" for r in bridge.log_records())
             == 2, what="a line for the second removal")  # fmt: skip
    assert "THEIRS" not in accessions(bridge)[0]
