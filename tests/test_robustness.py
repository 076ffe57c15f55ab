"""Hostile input against a running `wlbridge serve`: the corpus in tests/hostile/, random
mutations of a valid order, oversized and stalled senders, connection limits, access lists.

Each case checks the same invariants: every complete frame gets an ACK (AE/AR with an ERR segment,
MSA-2 naming the control ID when MSH-10 is readable) or, for garbage, the connection is closed;
no exception reaches the log; the process keeps serving; nothing is written outside its folders;
the translation log names every rejected message and the message is kept byte for byte.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from bridge.hl7.order import MAX_OTHER_IDS
from bridge.net.client import find, worklist_query
from tests.conftest import ROOT, RunningBridge, start_bridge
from tests.messages import orm

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
HOSTILE = Path(__file__).parent / "hostile"
CASES = tomllib.loads((HOSTILE / "cases.toml").read_text("utf-8"))
# What a server may leave in its temp tree: worklist files, the log, kept messages.
ALLOWED = re.compile(
    r"^(worklists/WLBRIDGE/([0-9a-f]{32}\.wl|lockfile)"
    r"|logs/translation\.log"
    r"|rejected/[0-9T]+-[A-Za-z0-9_-]+-[0-9a-f]{8}\.(hl7|reason))$"
)
PROBLEMS = ("Traceback", "internal error", "Unhandled Error", "Unhandled error")


class Connection:
    """A raw MLLP client socket that collects framed answers."""

    def __init__(self, port: int, timeout: float = 10.0, sock: socket.socket | None = None):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, message: bytes) -> None:
        self.send(VT + message + FS + CR)

    def read_acks(self, count: int) -> list[bytes]:
        """Up to `count` answers; fewer when the server closes the connection first."""
        while self.buffer.count(FS) < count and not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.closed = True
            self.buffer += chunk
        parts = self.buffer.split(FS)
        acks = [p[p.find(VT) + 1 :] for p in parts[:-1]][:count]
        return acks

    def wait_closed(self) -> bool:
        """True once the server has closed the connection (within the socket timeout)."""
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            return False
        self.closed = True
        return True

    def close(self) -> None:
        self.sock.close()


def msa(ack: bytes) -> tuple[str, str]:
    match = re.search(rb"(?:^|\r)MSA\|([A-Z]{2})\|([^|\r]*)", ack)
    assert match, ack
    return match.group(1).decode(), match.group(2).decode("latin-1")


def send_one(port: int, message: bytes | str) -> bytes:
    data = message.encode("latin-1") if isinstance(message, str) else message
    conn = Connection(port)
    try:
        conn.send_frame(data)
        [ack] = conn.read_acks(1)
        return ack
    finally:
        conn.close()


def order(n: int | str, **kw: str) -> bytes:
    """A valid order whose identity (and so file) is its own."""
    kw.setdefault("control_id", f"OK-{n}")
    for key, prefix in (("accession", "ACC"), ("placer", "P"), ("filler", "F"), ("sps_id", "S")):
        kw.setdefault(key, f"{prefix}{n}")
    kw.setdefault("study_uid", f"1.2.826.0.1.3680043.10.543.9.{abs(hash(str(n))) % 10**9}")
    return orm(**kw).encode("latin-1")


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_healthy(bridge: RunningBridge, probe: str) -> None:
    """The process is up, answers a valid order with AA, and has logged no escaped exception."""
    assert bridge.process.poll() is None, "".join(bridge.stderr_lines)
    assert msa(send_one(bridge.mllp_port, order(probe, control_id=probe))) == ("AA", probe)
    output = "".join(bridge.stderr_lines)
    assert not any(p in output for p in PROBLEMS), output


def assert_only_own_files(root: Path) -> None:
    files = tree(root)
    stray = sorted(f for f in files if not ALLOWED.match(f))
    assert not stray, stray
    for path in (root / "worklists").rglob("*.wl"):
        pydicom.dcmread(path)  # every served file is a whole DICOM file


@pytest.fixture(scope="module")
def hostile_bridge(tmp_path_factory) -> Iterator[RunningBridge]:
    root = tmp_path_factory.mktemp("hostile")
    running = start_bridge(root)
    yield running
    assert running.stop() == 0, "".join(running.stderr_lines)


# The corpus


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_corpus_gets_an_answer_and_leaves_the_server_well(hostile_bridge, name):
    bridge = hostile_bridge
    root = bridge.log_path.parents[1]
    expect = CASES[name]
    payload = (HOSTILE / name).read_bytes()
    roots_before = set(os.listdir(ROOT))
    log_before = len(bridge.log_records())
    kept_before = set(bridge.rejected_dir.glob("*")) if bridge.rejected_dir.exists() else set()
    conn = Connection(bridge.mllp_port)
    try:
        if name.endswith(".stream"):
            conn.send(payload)
            wanted = [tuple(a) for a in expect["acks"]]
            acks = conn.read_acks(len(wanted))
            assert [msa(a) for a in acks] == wanted
            if expect.get("kept") is False:
                assert conn.wait_closed(), name  # refused: the server is done with it
        else:
            conn.send_frame(payload)
            acks = conn.read_acks(1)
            control_id = expect["control_id"]
            if not acks:  # only garbage may be answered by closing the connection
                assert control_id == "" and conn.closed, name
            else:
                [ack] = acks
                code, answered_id = msa(ack)
                assert code in expect.get("ack", ["AE", "AR"]), ack
                assert answered_id == control_id
                if code != "AA":
                    assert re.search(rb"\rERR\|", ack), ack
                    check_rejection_recorded(bridge, log_before, control_id, payload)
    finally:
        conn.close()
    assert_healthy(bridge, f"ALIVE{sorted(CASES).index(name)}")
    if expect.get("kept") is False:
        assert set(bridge.rejected_dir.glob("*")) <= kept_before, name
    assert_only_own_files(root)
    new_roots = set(os.listdir(ROOT)) - roots_before
    assert not new_roots & {"etc", "tmp", "abs", "pwned", "win", "x", "p"}, new_roots


def check_rejection_recorded(
    bridge: RunningBridge, log_before: int, control_id: str, payload: bytes
) -> None:
    """The translation log has a `rejected` line for it, and the message is kept as received,
    with a `.reason` beside it."""
    records = bridge.log_records()[log_before:]
    mine = [r for r in records if r.get("outcome") == "rejected"]
    if control_id:
        mine = [r for r in mine if r.get("control_id") == control_id]
    assert mine, records
    record = mine[0]
    assert record.get("reason") and record.get("ack") in ("AE", "AR")
    kept = Path(record["kept_as"])
    assert kept.parent == bridge.rejected_dir
    assert kept.read_bytes() == payload
    assert kept.with_suffix(".reason").read_text("utf-8").strip()


def test_corpus_has_every_kind_of_hostile_input():
    kinds = {
        "truncated",
        "nul",
        "non-utf8",
        "missing",
        "overlong",
        "wrong-type",
        "path-traversal",
        "control-characters",
        "msh-only",
        "empty",
        "binary-garbage",
        "version-2-7",
        "unknown-charset",
    }
    names = " ".join(CASES)
    assert all(k in names for k in kinds), [k for k in kinds if k not in names]
    assert all((HOSTILE / name).is_file() for name in CASES)


# Random mutations of a valid order

SEGMENT_OPS = st.sampled_from(["drop", "duplicate", "swap", "field", "truncate", "bytes"])
NOISE = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(VT, b"").replace(FS, b""))
FIELD_TEXT = st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\x0b\x1c"), max_size=80
)


@st.composite
def mutated_orders(draw) -> tuple[bytes, str, bool]:
    """(message, its control ID, whether MSH was left intact)."""
    n = draw(st.integers(0, 10**12))
    control_id = f"FZ{n}"
    segments = order(n, control_id=control_id).split(CR)[:-1]
    original_msh = segments[0]
    for _ in range(draw(st.integers(1, 4))):
        if not segments:
            segments = [draw(NOISE)]
        op = draw(SEGMENT_OPS)
        i = draw(st.integers(0, len(segments) - 1))
        if op == "drop":
            del segments[i]
        elif op == "duplicate":
            segments.insert(i + 1, segments[i])
        elif op == "swap":
            j = draw(st.integers(0, len(segments) - 1))
            segments[i], segments[j] = segments[j], segments[i]
        elif op == "field":
            fields = segments[i].split(b"|")
            k = draw(st.integers(1, max(1, len(fields) - 1)))
            while len(fields) <= k:
                fields.append(b"")
            fields[k] = draw(FIELD_TEXT).encode("latin-1")
            segments[i] = b"|".join(fields)
        elif op == "truncate":
            segments[i] = segments[i][: draw(st.integers(0, len(segments[i])))]
        else:
            pos = draw(st.integers(0, len(segments[i])))
            segments[i] = segments[i][:pos] + draw(NOISE) + segments[i][pos:]
    message = CR.join(segments) + CR
    return message, control_id, bool(segments) and segments[0] == original_msh


@pytest.fixture(scope="module")
def fuzz_bridge(tmp_path_factory) -> Iterator[RunningBridge]:
    running = start_bridge(tmp_path_factory.mktemp("fuzz"))
    yield running
    assert running.stop() == 0, "".join(running.stderr_lines)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutated_orders())
def test_mutated_orders_always_get_one_proper_answer(fuzz_bridge, case):
    message, control_id, msh_intact = case
    conn = Connection(fuzz_bridge.mllp_port)
    try:
        conn.send_frame(message)
        [ack] = conn.read_acks(1)
    finally:
        conn.close()
    code, answered = msa(ack)
    assert code in ("AA", "AE", "AR")
    if code != "AA":
        assert re.search(rb"\rERR\|", ack), ack
    if msh_intact:
        assert answered == control_id
    assert fuzz_bridge.process.poll() is None


def test_after_the_mutations_the_server_is_well_and_logged_every_rejection(fuzz_bridge):
    # runs after the property test in file order; on its own it checks an idle server
    assert_healthy(fuzz_bridge, "FUZZ-AFTER")
    assert_only_own_files(fuzz_bridge.log_path.parents[1])
    records = fuzz_bridge.log_records()
    for record in records:
        assert record.get("ack") in ("AA", "AE", "AR")
        if record["ack"] != "AA" and record.get("outcome") == "rejected":
            assert record.get("reason")
            assert Path(record["kept_as"]).is_file()


# Limits


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def test_40_mb_frame_is_refused_the_connection_closed_and_the_memory_not_held(bridge):
    before = rss_kib(bridge.process.pid)
    conn = Connection(bridge.mllp_port, timeout=20)
    header = b"MSH|^~\\&|RIS|HOSP|WLBRIDGE|RAD|20261127101500||ORM^O01|HUGE-1|P|2.5.1\rNTE|1||"
    chunk = b"x" * (1 << 20)
    sent = 0
    try:
        conn.send(VT + header)
        while sent < 40 * (1 << 20):
            conn.send(chunk)
            sent += len(chunk)
        conn.send(FS + CR)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # refused before the end: what should happen
    acks = conn.read_acks(1)
    assert conn.wait_closed()
    conn.close()
    assert sent < 40 * (1 << 20), "the server read the whole 40 MB frame"
    if acks:  # an AR built from the head of the frame, when it arrives before the reset
        assert msa(acks[0]) == ("AR", "HUGE-1")
    assert_healthy(bridge, "AFTER-HUGE")
    assert rss_kib(bridge.process.pid) - before < 16 * 1024
    [record] = [r for r in bridge.log_records() if r.get("control_id") == "HUGE-1"]
    assert record["outcome"] == "rejected" and record["reason"].startswith("207")


def test_a_stalled_sender_does_not_delay_others(bridge):
    stalled = Connection(bridge.mllp_port)
    try:
        message = order(1, control_id="STALLED")
        stalled.send(VT + message[: len(message) // 2])
        started = time.monotonic()
        assert msa(send_one(bridge.mllp_port, order(2, control_id="BRISK"))) == ("AA", "BRISK")
        assert time.monotonic() - started < 2.0
        stalled.send(message[len(message) // 2 :] + FS + CR)  # and it completes later
        assert msa(stalled.read_acks(1)[0]) == ("AA", "STALLED")
    finally:
        stalled.close()


def test_100_concurrent_senders_all_get_aa(bridge):
    count = 100
    results: dict[int, tuple[str, str] | str] = {}
    barrier = threading.Barrier(count)

    def sender(i: int) -> None:
        try:
            conn = Connection(bridge.mllp_port, timeout=30)
            barrier.wait(timeout=30)
            conn.send_frame(order(i, control_id=f"C{i}"))
            results[i] = msa(conn.read_acks(1)[0])
            conn.close()
        except Exception as exc:  # reported below, per sender
            results[i] = repr(exc)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {i: ("AA", f"C{i}") for i in range(count)}
    status, answers = find("127.0.0.1", bridge.dicom_port, worklist_query(), bridge.ae_title)
    assert status == 0 and len(answers) == count


def test_idle_timeout_closes_silent_connections_only(tmp_path):
    running = start_bridge(tmp_path, "--idle-timeout", "1")
    try:
        silent = Connection(running.mllp_port, timeout=5)
        started = time.monotonic()
        assert silent.wait_closed()
        assert 0.8 < time.monotonic() - started < 4.5
        silent.close()
        busy = Connection(running.mllp_port, timeout=5)
        for i in range(4):  # 4 messages 0.4 s apart: never silent for a whole second
            busy.send_frame(order(i, control_id=f"BUSY{i}"))
            assert msa(busy.read_acks(i + 1)[i]) == ("AA", f"BUSY{i}")
            assert not busy_closed_within(busy, 0.4)
        busy.close()
    finally:
        assert running.stop() == 0


def busy_closed_within(conn: Connection, seconds: float) -> bool:
    conn.sock.settimeout(seconds)
    try:
        return conn.wait_closed()
    finally:
        conn.sock.settimeout(5)


def test_max_connections_refuses_the_one_too_many(tmp_path):
    running = start_bridge(tmp_path, "--max-connections", "2")
    try:
        first, second = Connection(running.mllp_port), Connection(running.mllp_port)
        for i, conn in enumerate((first, second)):
            conn.send_frame(order(i, control_id=f"MC{i}"))
            assert msa(conn.read_acks(1)[0]) == ("AA", f"MC{i}")
        third = Connection(running.mllp_port, timeout=5)
        try:
            third.send_frame(order(3, control_id="MC3"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert third.read_acks(1) == [] and third.closed
        third.close()
        first.close()
        deadline = time.monotonic() + 10  # the server notices the close asynchronously
        while True:
            conn = Connection(running.mllp_port)
            conn.send_frame(order(4, control_id="MC4"))
            acks = conn.read_acks(1)
            conn.close()
            if acks or time.monotonic() > deadline:
                break
        assert msa(acks[0]) == ("AA", "MC4")
        second.close()
    finally:
        assert running.stop() == 0


def associate(port: int, calling: str = "SCU", called: str = "WLBRIDGE", **kwargs):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ModalityWorklistInformationFind)
    return ae.associate("127.0.0.1", port, ae_title=called, **kwargs)


def test_max_associations_and_acse_timeout_reach_the_dicom_server(tmp_path):
    running = start_bridge(tmp_path, "--max-associations", "1", "--acse-timeout", "1")
    try:
        held = associate(running.dicom_port)
        assert held.is_established
        refused = associate(running.dicom_port)
        assert refused.is_rejected  # local limit exceeded
        held.release()
        deadline = time.monotonic() + 10  # the server frees the slot asynchronously
        while True:
            again = associate(running.dicom_port)
            if again.is_established or time.monotonic() > deadline:
                break
        assert again.is_established
        again.release()
        # a TCP connection that never sends A-ASSOCIATE-RQ is dropped after the ACSE timeout
        silent = Connection(running.dicom_port, timeout=5)
        started = time.monotonic()
        assert silent.wait_closed()
        assert time.monotonic() - started < 4.5
        silent.close()
    finally:
        assert running.stop() == 0


# Access


def test_allowed_mllp_sources_refuses_other_addresses(tmp_path):
    config = tmp_path / "wlbridge.toml"
    config.write_text('allowed-mllp-sources = ["192.0.2.7"]\n')
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        conn = Connection(running.mllp_port, timeout=5)
        try:
            conn.send_frame(order(1, control_id="FROM-LOCALHOST"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert conn.read_acks(1) == [] and conn.closed
        conn.close()
        assert not running.wl_files()
    finally:
        assert running.stop() == 0
    config.write_text('allowed-mllp-sources = ["192.0.2.7", "127.0.0.1"]\n')
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        assert msa(send_one(running.mllp_port, order(1, control_id="OK"))) == ("AA", "OK")
    finally:
        assert running.stop() == 0


def test_allowed_calling_aets_refuses_other_titles(tmp_path):
    config = tmp_path / "wlbridge.toml"
    config.write_text('allowed-calling-aets = ["CT1", "MR1"]\n')
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        assert msa(send_one(running.mllp_port, order(1)))[0] == "AA"
        intruder = associate(running.dicom_port, calling="INTRUDER")
        assert intruder.is_rejected
        with pytest.raises(ConnectionError):
            find("127.0.0.1", running.dicom_port, worklist_query(), "WLBRIDGE", "CT")
        status, answers = find("127.0.0.1", running.dicom_port, worklist_query(), "WLBRIDGE", "MR1")
        assert status == 0 and len(answers) == 1
    finally:
        assert running.stop() == 0


# Found by the corpus; the fixes belong to modules outside this suite (see the reasons).


def test_a_message_with_many_repetitions_is_bounded_in_work(bridge):
    many = b"~".join([b"P^^^H"] * 40_000)
    payload = order("REPS", control_id="REPS").replace(b"PAT001^^^HOSP^MR", many)
    conn = Connection(bridge.mllp_port)
    try:
        conn.send_frame(payload)
        [ack] = conn.read_acks(1)
    finally:
        conn.close()
    assert msa(ack)[1] == "REPS"
    # The work is bounded by what is kept: making every repetition an item took ~2 s of the
    # reactor; the item keeps MAX_OTHER_IDS of them and the log line says the rest were left.
    [record] = [r for r in bridge.log_records() if r.get("control_id") == "REPS"]
    assert record["outcome"] == "created", record
    [path] = [p for p in bridge.wl_files() if p.name == record["file"]]
    item = pydicom.dcmread(path)
    assert 0 < len(item.OtherPatientIDsSequence) <= MAX_OTHER_IDS


def test_huge_control_ids_do_not_accumulate_in_memory(bridge):
    conn = Connection(bridge.mllp_port, timeout=30)
    sizes = []
    try:
        for i in range(20):
            control_id = f"BIG{i}-" + "9" * 500_000
            conn.send_frame(order(i, control_id=control_id))
            assert msa(conn.read_acks(i + 1)[i])[1] == control_id
            sizes.append(rss_kib(bridge.process.pid))
    finally:
        conn.close()
    assert sizes[-1] - sizes[4] < 6 * 1024  # a plateau once the allocator is warm
