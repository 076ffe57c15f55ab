"""Hostile DICOM peers against a running bridge, over raw sockets.

Each attack runs while the test measures the server process's resident memory (VmRSS) and the
latency of HL7 ACKs for orders sent over MLLP meanwhile; after each, C-ECHO must work again.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from bench.cfind import _associate_rq, _command, _pdata
from bench.worklist_items import query as q
from tests.conftest import RunningBridge, start_bridge
from tests.messages import orm
from tests.peers import eventually
from tests.test_end_to_end import raw_send

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
ACSE_TIMEOUT = 2.0
NETWORK_TIMEOUT = 3.0
MAX_ASSOCIATIONS = 4
RSS_MARGIN_MB = 300
ACK_BOUND_S = 1.0  # generous for a loaded machine; the figures measured are printed
ECHO_WITHIN_S = 15.0
LONG_NAME = "A" * 40 + "^" + "B" * 20


@dataclass
class Measured:
    rss_start_mb: float
    rss_peak_mb: float = 0.0
    ack_latencies: list[float] = field(default_factory=list)

    @property
    def worst_ack(self) -> float:
        return max(self.ack_latencies)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBridge]:
    running = start_bridge(
        tmp_path_factory.mktemp("hostile"),
        "--acse-timeout", str(ACSE_TIMEOUT),
        "--network-timeout", str(NETWORK_TIMEOUT),
        "--max-associations", str(MAX_ASSOCIATIONS),
    )  # fmt: skip
    for n in range(4):  # items with long names for the wildcard attack
        assert b"MSA|AA" in send_order(running.mllp_port, n, patient_name=LONG_NAME)
    yield running
    assert running.stop() == 0, "".join(running.stderr_lines)


_orders = iter(range(1000, 100000))


def send_order(port: int, n: int | None = None, **fields: str) -> bytes:
    n = next(_orders) if n is None else n
    message = orm(control_id=f"HOST{n}", accession=f"HACC{n}", placer=f"HPL{n}",
                  filler=f"HFI{n}", requested_procedure_id=f"HRP{n}", sps_id=f"HSPS{n}",
                  patient_id=f"HPAT{n}", **fields)  # fmt: skip
    return raw_send(port, message.encode("latin-1"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def echo_works(port: int, within: float = ECHO_WITHIN_S) -> float:
    """Seconds until a C-ECHO succeeds (fails the test past `within`)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        ae = AE(ae_title="ECHOER")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", port, ae_title="WLBRIDGE")
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"no C-ECHO within {within} s")


def _run_attack(attack: Callable[[Any], Any], stop: Any, results: Any) -> None:
    try:
        results.put(("ok", attack(stop)))
    except BaseException as exc:  # reported by the test
        results.put(("failed", repr(exc)))


def under_attack(bridge: RunningBridge, attack: Callable[[Any], Any], seconds: float) -> Any:
    """Run `attack(stop)` in a process of its own (so that its work does not slow the
    measuring) for about `seconds` (it should return once `stop` is set), measuring RSS and HL7
    ACK latency meanwhile; then wait for a working C-ECHO. Returns what `attack` returned."""
    pid = bridge.process.pid
    measured = Measured(rss_start_mb=rss_mb(pid))
    fork = multiprocessing.get_context("fork")
    stop = fork.Event()
    results = fork.Queue()
    attacker = fork.Process(target=_run_attack, args=(attack, stop, results), daemon=True)
    attacker.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        measured.rss_peak_mb = max(measured.rss_peak_mb, rss_mb(pid))
        started = time.monotonic()
        ack = send_order(bridge.mllp_port)
        measured.ack_latencies.append(time.monotonic() - started)
        assert b"MSA|AA" in ack, ack
        time.sleep(0.2)
    stop.set()
    try:
        outcome, value = results.get(timeout=30)
    except queue.Empty:
        outcome, value = "failed", "the attack did not end"
    attacker.join(10)
    if attacker.is_alive():
        attacker.kill()
    measured.rss_peak_mb = max(measured.rss_peak_mb, rss_mb(pid))
    assert outcome == "ok", value
    echo = echo_works(bridge.dicom_port)
    print(f"RSS {measured.rss_start_mb:.0f} -> peak {measured.rss_peak_mb:.0f} MB; "
          f"ACK worst {measured.worst_ack * 1000:.0f} ms, median "
          f"{sorted(measured.ack_latencies)[len(measured.ack_latencies) // 2] * 1000:.0f} ms "
          f"({len(measured.ack_latencies)} orders); C-ECHO after {echo:.2f} s; slowest ACKs "
          f"{[round(x * 1000) for x in sorted(measured.ack_latencies)[-3:]]} ms")  # fmt: skip
    assert measured.rss_peak_mb - measured.rss_start_mb < RSS_MARGIN_MB
    assert measured.worst_ack < ACK_BOUND_S
    return value


def _stream(sock: socket.socket, stop: Any, until: float) -> int:
    """Send junk until the server closes, `stop` or `until`; the bytes sent."""
    chunk = bytes(65536)
    sent = 0
    sock.settimeout(2)
    try:
        while not stop.is_set() and time.monotonic() < until:
            sent += sock.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except TimeoutError:  # our sends are not being read: the server is not buffering them
        pass
    return sent


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got


def _associated(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_associate_rq("WLBRIDGE", "HOSTILE"))
    kind = sock.recv(1)
    assert kind == b"\x02", kind  # A-ASSOCIATE-AC
    length = struct.unpack(">xI", _recv_exact(sock, 5))[0]
    _recv_exact(sock, length)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _wait_for_stop(stop: Any) -> None:
    stop.wait(10)


def test_baseline_without_an_attack(hostile):
    """The same measurements with no attack: what the figures below compare with."""
    under_attack(hostile, _wait_for_stop, 3)


def test_a_4_gib_associate_request_is_aborted_not_buffered(hostile):
    """The 0xFFFFFFFF-long A-ASSOCIATE-RQ, streamed for ~10 s (reconnecting when cut off)."""

    def attack(stop: Any) -> list[tuple[int, bytes]]:
        attempts = []
        until = time.monotonic() + 9
        while not stop.is_set() and time.monotonic() < until:
            with socket.create_connection(("127.0.0.1", hostile.dicom_port)) as sock:
                sock.sendall(b"\x01\x00\xff\xff\xff\xff")
                sent = _stream(sock, stop, until)
                answer = _read_until_closed(sock, 5)
                attempts.append((sent, answer[:1]))
        return attempts

    attempts = under_attack(hostile, attack, 10)
    print(f"{len(attempts)} connections in ~10 s")
    assert attempts
    # A-ABORT, then closed (a reset may discard the A-ABORT before it is read)
    assert all(answer in (b"\x07", b"") for _sent, answer in attempts)
    assert any("refused with A-ABORT" in line for line in hostile.stderr_lines)
    assert max(sent for sent, _ in attempts) < 64 * 1024 * 1024  # nothing like 4 GiB read


def test_a_4_gib_pdata_pdu_in_an_association_is_aborted(hostile):
    def attack(stop: Any) -> None:
        with _associated(hostile.dicom_port) as sock:
            sock.sendall(b"\x04\x00\xff\xff\xff\xff")
            _stream(sock, stop, time.monotonic() + 3)
            assert _read_until_closed(sock, 5)[:1] in (b"\x07", b"")

    under_attack(hostile, attack, 3)


def test_a_100_mb_identifier_is_aborted(hostile):
    def attack(stop: Any) -> int:
        with _associated(hostile.dicom_port) as sock:
            sock.sendall(_pdata(_command(), True))
            fragment = bytes([0x01, 0x00]) + bytes(16000)  # context 1, data, not the last
            pdu = struct.pack(">BxI", 4, len(fragment) + 4) + struct.pack(">I", len(fragment))
            sent = 0
            sock.settimeout(2)
            try:
                while sent < 100 * 1024 * 1024 and not stop.is_set():
                    sock.sendall(pdu + fragment)
                    sent += len(fragment)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            assert _read_until_closed(sock, 5)[:1] in (b"\x07", b"")
            return sent

    assert under_attack(hostile, attack, 3) < 20 * 1024 * 1024


def test_a_catastrophic_wildcard_is_matched_in_linear_time(hostile):
    pattern = "*?" * 9 + "#"

    def attack(stop: Any) -> list[float]:
        durations = []
        ae = AE(ae_title="WILD")
        ae.add_requested_context(ModalityWorklistInformationFind)
        while not stop.is_set():
            assoc = ae.associate("127.0.0.1", hostile.dicom_port, ae_title="WLBRIDGE")
            assert assoc.is_established
            started = time.monotonic()
            results = list(assoc.send_c_find(q(PatientName=pattern, PatientID=""),
                                             ModalityWorklistInformationFind))  # fmt: skip
            durations.append(time.monotonic() - started)
            assoc.release()
            assert [s.Status for s, _ in results] == [0x0000]  # no item ends with "#"
        return durations

    durations = under_attack(hostile, attack, 4)
    print(f"{len(durations)} queries, slowest {max(durations) * 1000:.0f} ms")
    assert durations and max(durations) < 2.0
    # ...and the same wildcard, without the "#", finds the four long-named items
    ae = AE(ae_title="WILD")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", hostile.dicom_port, ae_title="WLBRIDGE")
    results = list(assoc.send_c_find(q(PatientName="*?" * 9 + "*", PatientID="HPAT?"),
                                     ModalityWorklistInformationFind))  # fmt: skip
    assoc.release()
    assert [s.Status for s, _ in results].count(0xFF00) == 4


def test_three_silent_half_pdus_are_dropped_within_the_acse_timeout(hostile):
    def attack(stop: Any) -> list[float]:
        closed_after = []
        socks = [socket.create_connection(("127.0.0.1", hostile.dicom_port)) for _ in range(3)]
        started = time.monotonic()
        for sock in socks:
            sock.sendall(b"\x01\x00\x00")  # three bytes of a PDU header, then silence
        for sock in socks:
            _read_until_closed(sock, ACSE_TIMEOUT + 10)
            closed_after.append(time.monotonic() - started)
            sock.close()
        return closed_after

    closed_after = under_attack(hostile, attack, ACSE_TIMEOUT + 1.5)
    assert len(closed_after) == 3 and max(closed_after) < ACSE_TIMEOUT + 3


def test_a_silent_half_pdu_in_an_association_is_dropped_within_the_network_timeout(hostile):
    def attack(stop: Any) -> None:
        with _associated(hostile.dicom_port) as sock:
            started = time.monotonic()
            sock.sendall(b"\x04\x00\x00")
            _read_until_closed(sock, NETWORK_TIMEOUT + 10)
            assert time.monotonic() - started < NETWORK_TIMEOUT + 3

    under_attack(hostile, attack, NETWORK_TIMEOUT + 1.5)


def test_trickling_associate_requests_are_dropped_within_the_acse_timeout(hostile):
    """A-ASSOCIATE-RQs at one byte every 0.5 s, as many as the association limit."""
    request = _associate_rq("WLBRIDGE", "TRICKLE")

    def trickle(started: float, closed_after: list[float]) -> None:
        with socket.create_connection(("127.0.0.1", hostile.dicom_port)) as sock:
            try:
                for byte in request:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.5)
                    if time.monotonic() - started > ACSE_TIMEOUT + 10:
                        return
            except (BrokenPipeError, ConnectionResetError):
                pass
            _read_until_closed(sock, 5)
            closed_after.append(time.monotonic() - started)

    def attack(stop: Any) -> list[float]:
        closed_after: list[float] = []
        started = time.monotonic()
        threads = [threading.Thread(target=trickle, args=(started, closed_after))
                   for _ in range(MAX_ASSOCIATIONS)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return closed_after

    closed_after = under_attack(hostile, attack, ACSE_TIMEOUT + 2)
    assert len(closed_after) == MAX_ASSOCIATIONS
    assert max(closed_after) < ACSE_TIMEOUT + 3


def test_closed_connections_free_their_slots_at_once(hostile):
    for _ in range(3):
        for _ in range(MAX_ASSOCIATIONS * 2):
            socket.create_connection(("127.0.0.1", hostile.dicom_port)).close()
        half = socket.create_connection(("127.0.0.1", hostile.dicom_port))
        half.sendall(_associate_rq("WLBRIDGE", "HALF")[:20])  # part of a request, then gone
        half.close()
        assert echo_works(hostile.dicom_port, within=ACSE_TIMEOUT * 0.75) < ACSE_TIMEOUT


def test_connections_that_say_nothing_take_no_slot_and_their_drop_is_logged(hostile):
    """More silent connections (never an A-ASSOCIATE-RQ) than max-associations: a modality is
    still accepted (they are not associations), and each is dropped after the ACSE timeout
    with a line that says why."""
    logged = len(hostile.stderr_lines)
    silent = [socket.create_connection(("127.0.0.1", hostile.dicom_port))
              for _ in range(MAX_ASSOCIATIONS + 2)]  # fmt: skip
    try:
        ae = AE(ae_title="AFTERSILENT")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", hostile.dicom_port, ae_title="WLBRIDGE")
        assert assoc.is_established, "refused: silent connections took the association slots"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        started = time.monotonic()
        for sock in silent:
            _read_until_closed(sock, ACSE_TIMEOUT + 10)
        assert time.monotonic() - started < ACSE_TIMEOUT + 3
    finally:
        for sock in silent:
            sock.close()

    def drops() -> int:
        return sum("dropped: no A-ASSOCIATE-RQ within the ACSE timeout" in line
                   for line in hostile.stderr_lines[logged:])  # fmt: skip

    eventually(lambda: drops() >= len(silent), "a line for each silent connection dropped")


def test_associations_past_the_limit_are_rejected_cleanly_and_logged(hostile):
    ae = AE(ae_title="MANY")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", hostile.dicom_port, ae_title="WLBRIDGE")
            for _ in range(MAX_ASSOCIATIONS)]  # fmt: skip
    try:
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", hostile.dicom_port, ae_title="WLBRIDGE")
        assert extra.is_rejected
    finally:
        for assoc in held:
            assoc.release()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any("max-associations" in line for line in hostile.stderr_lines):
            break
        time.sleep(0.1)
    assert any("refused" in line and "max-associations" in line for line in hostile.stderr_lines)
    echo_works(hostile.dicom_port)


def test_an_oversized_identifier_value_is_refused_a900(hostile):
    ae = AE(ae_title="LONG")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", hostile.dicom_port, ae_title="WLBRIDGE")
    identifier = q(PatientID="")
    identifier.add_new(0x00100020, "LO", "P" * 200)
    results = list(assoc.send_c_find(identifier, ModalityWorklistInformationFind))
    assoc.release()
    assert [s.Status for s, _ in results] == [0xA900]
