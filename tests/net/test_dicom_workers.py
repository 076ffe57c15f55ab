"""`dicom-workers`: the DICOM service in worker processes sharing the port, against a real
`wlbridge serve`: read-your-writes on every worker, MPPS reaching the one writer, shutdown
leaving no worker behind, and bursts of connections accepted (none dropped at the listen queue)."""

from __future__ import annotations

import os
import re
import resource
import select
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from bench.cfind import _associate_rq, _encode, c_find
from bench.load import listen_drops
from bench.worklist_items import query as q
from bridge.net.cfind import SILENT_PER_SOURCE
from bridge.net.client import worklist_query
from bridge.net.dicom_workers import ACCEPT_ROOM, AcceptGate
from tests.conftest import start_bridge
from tests.dicom.test_mpps import in_progress, mpps_records, n_create, statuses, stored_statuses
from tests.messages import orm
from tests.peers import eventually
from tests.test_end_to_end import msa, raw_send

WORKER_LINE = re.compile(r"bridge\.net\.cfind\[dicom-(\d+)\] C-FIND")


def children(pid: int) -> list[int]:
    """`pid`'s child processes, whichever of its threads started them (a replaced worker is
    started by its link thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass  # the thread ended meanwhile
    return found


def worker_pids(pid: int) -> list[int]:
    """The DICOM workers among `pid`'s children (multiprocessing's resource tracker is not)."""
    out = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            pass
    return out


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # exited (a zombie waits for a reaper that is not ours)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.05)  # no event tells us about another process's children
    return [p for p in pids if not gone(p)]


def test_an_acknowledged_order_is_found_at_once_on_every_worker(tmp_path):
    running = start_bridge(tmp_path, "--dicom-workers", "2", "--max-associations", "40")
    held = []
    try:
        # Associations held open for the whole test: each is served by one worker, and with a
        # dozen of them both workers hold some (the log lines say which answered).
        ae = AE(ae_title="RYW")
        ae.add_requested_context(ModalityWorklistInformationFind)
        for _ in range(12):
            assoc = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
            assert assoc.is_established
            held.append(assoc)
        for n in range(8):
            accession = f"RYW{n:04d}"
            ack = raw_send(running.mllp_port, orm(control_id=f"R{n}", accession=accession,
                                                  placer=f"P{n}", filler=f"F{n}"))  # fmt: skip
            assert msa(ack)[0] == "AA"
            for assoc in held:  # each C-FIND starts after the ACK
                answers = [
                    ds for status, ds in assoc.send_c_find(
                        worklist_query(accession=accession), ModalityWorklistInformationFind
                    ) if status is not None and status.Status in (0xFF00, 0xFF01)
                ]  # fmt: skip
                assert [a.AccessionNumber for a in answers] == [accession]
    finally:
        for assoc in held:
            assoc.release()
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
    answered_by = {m.group(1) for line in running.stderr_lines if (m := WORKER_LINE.search(line))}
    assert answered_by == {"0", "1"}, "".join(running.stderr_lines[-40:])
    # The query lines of the translation log are written by the main process, every one.
    assert len(running.log_records(queries=True)) - len(running.log_records()) == 8 * 12


def test_mpps_through_a_worker_changes_the_worklist_in_the_main_process(tmp_path):
    running = start_bridge(tmp_path, "--dicom-workers", "2")
    try:
        assert msa(raw_send(running.mllp_port, orm(control_id="M1")))[0] == "AA"
        assert statuses(running, patient_id="PAT001") == ["SCHEDULED"]
        uid = generate_uid()
        status, _ = n_create(running, in_progress(), uid)
        assert status.Status == 0x0000
        assert stored_statuses(running) == ["STARTED"]  # the file, written by the writer
        assert statuses(running, patient_id="PAT001") == []  # hidden: every worker sees it
        (create,) = mpps_records(running)
        assert create["type"] == "MPPS^N-CREATE" and create["outcome"] == "started"
        assert create["mpps_uid"] == uid and create["calling_ae"] == "CT1"
        # A duplicate is refused by the same one writer (0x0111), through a worker.
        assert n_create(running, in_progress(), uid)[0].Status == 0x0111
    finally:
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
    assert not any(
        "bridge.dicom.mpps" in line and "[dicom-" in line for line in running.stderr_lines
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_no_worker_behind(tmp_path, sig):
    running = start_bridge(tmp_path, "--dicom-workers", "3")
    try:
        assert len(worker_pids(running.process.pid)) == 3
        pids = children(running.process.pid)
    finally:
        code = running.stop(sig)
    assert code == 0, "".join(running.stderr_lines)
    assert wait_gone(pids, timeout=30) == []  # workers and any helper process alike


def test_workers_stop_by_themselves_when_the_main_process_is_killed(tmp_path):
    running = start_bridge(tmp_path, "--dicom-workers", "2")
    try:
        pids = worker_pids(running.process.pid)
        assert len(pids) == 2
    finally:
        running.process.kill()
    running.process.wait(timeout=20)
    assert wait_gone(pids, timeout=30) == []


def _burst(port: int, called: str, count: int) -> list[int]:
    """`count` connections opened at once, then an A-ASSOCIATE-RQ on each: the PDU type of
    each answer (2: accepted, 3: rejected; 0: none)."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(count)]
    answers = []
    try:
        for n, sock in enumerate(sockets):
            sock.sendall(_associate_rq(called, f"BURST{n:03d}"))
        for sock in sockets:
            try:
                header = sock.recv(6, socket.MSG_WAITALL)
                answers.append(struct.unpack(">BxI", header)[0] if len(header) == 6 else 0)
            except OSError:
                answers.append(0)
    finally:
        for sock in sockets:
            try:
                sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
            except OSError:
                pass
            sock.close()
    return answers


def _burst_size(wanted: int) -> int:
    """`wanted` connections at once, or as many as this process may open (two descriptors each
    at most: ours, and the listening side's while it is queued is the kernel's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = wanted + 200
    if soft < room and (hard == resource.RLIM_INFINITY or hard >= room):
        resource.setrlimit(resource.RLIMIT_NOFILE, (room, hard))
        soft = room
    return min(wanted, soft - 200)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_burst_of_1000_connections_is_accepted_and_refusals_are_clean(tmp_path, workers):
    """More connections at once than the old listen backlog (512) held: with the workers'
    accept gate, most wait in the kernel's queue while the first are served."""
    count = _burst_size(1000)
    running = start_bridge(tmp_path, "--dicom-workers", workers, "--max-associations", "50")
    try:
        for _attempt in range(2):  # the drop counters are machine-wide: others' traffic too
            before = listen_drops()
            answers = _burst(running.dicom_port, running.ae_title, count)
            dropped = listen_drops() - before
            # Every connection got an answer: accepted (up to the limit) or A-ASSOCIATE-RJ.
            assert sorted(set(answers)) <= [2, 3], answers
            assert 1 <= answers.count(2) <= 50
            if dropped == 0:
                break
        assert dropped == 0, f"{dropped} connection attempts dropped at a listen queue"
    finally:
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
    refusals = [line for line in running.stderr_lines if "refused" in line and "BURST" in line]
    assert refusals and all("max-associations" in line for line in refusals)
    assert len(refusals) >= answers.count(3)


@pytest.mark.parametrize(
    "options",
    [["--dicom-workers", "-2"], ["--dicom-workers", "3", "--max-associations", "2"]],
)
def test_a_dicom_workers_mistake_is_a_sentence_naming_it(tmp_path, options):
    with pytest.raises(RuntimeError, match="dicom-workers") as failed:
        start_bridge(tmp_path, *options)
    assert "Traceback" not in str(failed.value)


def test_mpps_over_tls_through_a_worker(tmp_path):
    """Each worker makes its own TLS context from the settings; MPPS completed through TLS on
    a worker removes the item (retention 0) in the main process."""
    from tests.dicom.test_mpps import mpps_over_tls_completes_an_order

    mpps_over_tls_completes_an_order(tmp_path, "--dicom-workers", "2")


def test_by_default_dicom_is_served_by_one_worker_per_cpu(tmp_path):
    """No dicom-workers option (nor config file): -1, one worker per CPU (at most
    max-associations), each a process of its own at a lower priority than the main one."""
    import os

    from bridge.config import Settings, dicom_worker_count

    cpus = len(os.sched_getaffinity(0))
    assert dicom_worker_count(Settings()) == min(cpus, Settings().max_associations)
    assert dicom_worker_count(Settings(max_associations=1)) == 1
    assert dicom_worker_count(Settings(dicom_workers=0)) == 0
    config = tmp_path / "bridge.toml"
    config.write_text("")  # a config file: start_bridge leaves dicom-workers to the default
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        assert any(f"{cpus} worker process(es) share port" in line for line in running.stderr_lines)
        children = Path(f"/proc/{running.process.pid}/task/{running.process.pid}/children")
        nice = [
            int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])
            for pid in children.read_text().split()
        ]
        assert nice.count(10) == cpus  # the workers (the others: multiprocessing's helpers)
        ident = _encode(q({}, AccessionNumber=""))
        assert c_find(running.dicom_port, ident, running.ae_title)[1] == 0
    finally:
        running.stop()


def test_the_workers_die_with_a_killed_main_process_and_free_the_port(tmp_path):
    """kill -9 of the main process: the kernel kills its workers at once (they hold the
    listening socket too), so a bridge restarted right away can listen on the port. (Checked
    in the kernel's table of listening sockets: a bind of the port could also fail because
    some other connection on the machine took it as its source port meanwhile.)"""
    running = start_bridge(tmp_path, "--dicom-workers", "2")
    pid = running.process.pid
    # the children of every thread (a worker replaced later is started by a link thread)
    workers = [
        w for t in Path(f"/proc/{pid}/task").iterdir() for w in (t / "children").read_text().split()
    ]
    assert running.dicom_port in _listening_ports()
    running.process.kill()
    running.process.wait(timeout=10)
    deadline = time.monotonic() + 5.0  # generous: the kernel acts at the parent's exit
    while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
        assert time.monotonic() < deadline, "a worker outlived the main process"
        time.sleep(0.02)
    assert len(workers) >= 2  # the workers, and multiprocessing's helpers
    while running.dicom_port in _listening_ports():  # the last holder's exit closes it
        assert time.monotonic() < deadline, "the port is still listened on"
        time.sleep(0.02)


def _listening_ports() -> set[int]:
    """The TCP ports something listens on (/proc/net/tcp and tcp6, state 0A: LISTEN)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


def test_max_associations_is_the_whole_servers_limit_whichever_worker_accepts(tmp_path):
    """Three associations on two workers with max-associations = 3: all three are accepted,
    wherever they land (not a share of one each), and the fourth is refused, logged."""
    running = start_bridge(tmp_path, "--dicom-workers", "2", "--max-associations", "3")
    ae = AE(ae_title="LIMIT")
    ae.add_requested_context(ModalityWorklistInformationFind)
    held = []
    try:
        for _ in range(3):
            assoc = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
            held.append(assoc)
            assert assoc.is_established
        extra = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
        assert extra.is_rejected
        for assoc in held:
            assoc.release()
        held = []
        deadline = time.monotonic() + 10  # a released association ends in its server thread
        while True:
            again = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.is_established  # the released ones no longer count
        again.release()
    finally:
        for assoc in held:
            assoc.abort()
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
    assert any("LIMIT" in line and "max-associations" in line for line in running.stderr_lines)


def test_the_accept_gate_has_room_until_room_connections_are_fresh():
    gate = AcceptGate(room=2, fresh_for=60)
    started = time.monotonic()
    gate.opened("a")
    gate.requested("a")  # its A-ASSOCIATE-RQ came: it is being served
    gate.wait_for_room(longest=30)  # one fresh of two: room
    assert time.monotonic() - started < 10
    gate.opened("b")
    gate.requested("b")
    waiter = threading.Thread(target=gate.wait_for_room, kwargs={"longest": 30})
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # two fresh: the next connection waits in the kernel's queue
    gate.closed("a")
    waiter.join(10)
    assert not waiter.is_alive()  # a closed connection makes room at once


def test_a_connection_counts_against_the_gate_for_fresh_for_seconds_at_most():
    """An idle association (or a slow peer) never keeps a worker from accepting for long."""
    gate = AcceptGate(room=1, fresh_for=0.1)
    gate.opened("idle")
    gate.requested("idle")
    started = time.monotonic()
    gate.wait_for_room(longest=30)
    waited = time.monotonic() - started
    assert 0.05 <= waited < 10
    gate.closed("never-opened")  # a connection the gate never saw (accepted before it)
    gate.closed("idle")
    gate.closed("idle")  # told twice: no harm


def test_a_connection_that_says_nothing_stops_counting_against_the_gate_after_its_grace():
    waiting = {"speaking": True, "silent": False}  # bytes waiting to be read, by connection
    gate = AcceptGate(room=1, fresh_for=60, grace=0.05, has_data=waiting.__getitem__)
    gate.opened("silent")
    started = time.monotonic()
    gate.wait_for_room(longest=30)  # silent past its grace: room again
    assert 0.04 <= time.monotonic() - started < 10
    gate.opened("speaking")  # its request is there, not read yet: it counts
    waiter = threading.Thread(target=gate.wait_for_room, kwargs={"longest": 30})
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    waiting["speaking"] = False  # read, and the peer fell silent before a whole request
    waiter.join(10)
    assert not waiter.is_alive()


def _accessions(assoc, accession: str) -> list[str]:
    return [
        ds.AccessionNumber for status, ds in assoc.send_c_find(
            worklist_query(accession=accession), ModalityWorklistInformationFind
        ) if status is not None and status.Status in (0xFF00, 0xFF01)
    ]  # fmt: skip


def test_idle_associations_never_stop_the_workers_accepting(tmp_path):
    """More idle associations than both workers' room together: new modalities are still
    accepted and answered, and the idle ones still work afterwards."""
    running = start_bridge(tmp_path, "--dicom-workers", "2", "--max-associations", "40")
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(ModalityWorklistInformationFind)
    idle = []
    try:
        for _ in range(2 * ACCEPT_ROOM + 2):
            assoc = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
            assert assoc.is_established
            idle.append(assoc)
        ack = raw_send(running.mllp_port, orm(control_id="I1", accession="IDLE1"))
        assert msa(ack)[0] == "AA"
        for _ in range(6):  # each on an association of its own
            fresh = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
            assert fresh.is_established
            assert _accessions(fresh, "IDLE1") == ["IDLE1"]
            fresh.release()
        for assoc in idle:
            assert _accessions(assoc, "IDLE1") == ["IDLE1"]
    finally:
        for assoc in idle:
            assoc.release()
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)


def _replaced(running, number: int) -> bool:
    return any(f"DICOM worker {number} replaced" in line for line in running.stderr_lines)


def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(tmp_path):
    """SIGKILL of every worker, one holding an association: each is reaped and replaced (the
    log says which, and how it ended), and a C-FIND after an ACK finds the order, on two
    associations at once with max-associations = 2 (the dead workers' counts are gone)."""
    running = start_bridge(tmp_path, "--dicom-workers", "2", "--max-associations", "2")
    ae = AE(ae_title="KILLED")
    ae.add_requested_context(ModalityWorklistInformationFind)
    try:
        held = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
        assert held.is_established
        old = worker_pids(running.process.pid)
        assert len(old) == 2
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        eventually(lambda: _replaced(running, 0) and _replaced(running, 1),
                   "both workers replaced", timeout=30)  # fmt: skip
        assert not any(Path(f"/proc/{pid}").exists() for pid in old)  # reaped, no zombie
        new = worker_pids(running.process.pid)
        assert len(new) == 2 and not set(new) & set(old)
        ack = raw_send(running.mllp_port, orm(control_id="K1", accession="KILL1"))
        assert msa(ack)[0] == "AA"
        both = [ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
                for _ in range(2)]  # fmt: skip
        assert all(assoc.is_established for assoc in both)
        assert [_accessions(assoc, "KILL1") for assoc in both] == [["KILL1"], ["KILL1"]]
        for assoc in both:
            assoc.release()
    finally:
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
    ended = [line for line in running.stderr_lines if "ended unexpectedly" in line]
    assert len(ended) == 2 and all("killed by SIGKILL" in line for line in ended), ended


def test_a_source_holding_silent_connections_cannot_keep_others_out(tmp_path):
    """A source opens connections that never send an A-ASSOCIATE-RQ, far more than
    max-associations: once SILENT_PER_SOURCE of them are silent on a worker, its next ones are
    closed as they open (logged, naming the source), and a modality at another address is
    accepted and answered (the silent ones hold no association slot)."""
    running = start_bridge(tmp_path, "--dicom-workers", "2", "--max-associations", "4")
    port = running.dicom_port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=60)
              for _ in range(2 * SILENT_PER_SOURCE)]  # fmt: skip
    try:
        closed = []
        deadline = time.monotonic() + 20  # well within the ACSE timeout (30 s)
        while not closed and time.monotonic() < deadline:  # one more until one is closed
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=60))
            readable, _, _ = select.select(silent, [], [], 0.05)
            closed = [sock for sock in readable if sock.recv(1) == b""]
        assert closed, "no connection of the silent source was closed"
        ack = raw_send(running.mllp_port, orm(control_id="S1", accession="SILENT1"))
        assert msa(ack)[0] == "AA"
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ModalityWorklistInformationFind)
        ae.acse_timeout = 30
        assoc = ae.associate("127.0.0.1", port, ae_title=running.ae_title,
                             bind_address=("127.0.0.2", 0))  # fmt: skip
        assert assoc.is_established, "refused: silent connections took the association slots"
        assert _accessions(assoc, "SILENT1") == ["SILENT1"]
        assoc.release()
    finally:
        for sock in silent:
            sock.close()
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
    lines = [line for line in running.stderr_lines if "connection closed at once" in line]
    assert lines and all("127.0.0.1" in line and "A-ASSOCIATE-RQ" in line for line in lines)


def test_one_source_cannot_take_every_association_whichever_worker_accepts(tmp_path):
    """max-associations-per-source = 3 on two workers: a fourth association from the same
    address is refused (logged, naming the setting), wherever its first three landed, while
    another address is still accepted; a released one makes room again."""
    running = start_bridge(tmp_path, "--dicom-workers", "2", "--max-associations", "8",
                           "--max-associations-per-source", "3")  # fmt: skip
    ae = AE(ae_title="GREEDY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    port, called = running.dicom_port, running.ae_title
    held = []
    try:
        for _ in range(3):
            held.append(ae.associate("127.0.0.1", port, ae_title=called))
            assert held[-1].is_established
        assert ae.associate("127.0.0.1", port, ae_title=called).is_rejected
        other = ae.associate("127.0.0.1", port, ae_title=called, bind_address=("127.0.0.2", 0))
        assert other.is_established
        other.release()
        held.pop().release()
        again = eventually(
            lambda: (a := ae.associate("127.0.0.1", port, ae_title=called)).is_established and a,
            "an association once one of the three is released", timeout=10,
        )  # fmt: skip
        again.release()
    finally:
        for assoc in held:
            assoc.release()
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
    refusals = [line for line in running.stderr_lines if "max-associations-per-source" in line]
    assert refusals and all("GREEDY at 127.0.0.1" in line for line in refusals), refusals


def test_connections_that_say_nothing_from_many_addresses_do_not_hold_the_accepts(tmp_path):
    """80 connections from 8 addresses (10 each, within SILENT_PER_SOURCE) that never send an
    A-ASSOCIATE-RQ: a modality connecting after them is accepted at once (at 0.2 s of the
    accept gate each, it waited 4 s in the kernel's queue)."""
    running = start_bridge(tmp_path, "--dicom-workers", "2")
    port = running.dicom_port
    silent = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.4.{n}", 0))
              for n in range(1, 9) for _ in range(SILENT_PER_SOURCE)]  # fmt: skip
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ModalityWorklistInformationFind)
        ae.acse_timeout = 30
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", port, ae_title=running.ae_title,
                             bind_address=("127.0.0.2", 0))  # fmt: skip
        waited = time.monotonic() - started
        assert assoc.is_established
        assoc.release()
        assert waited < 2.0, f"the modality waited {waited:.1f} s behind silent connections"
    finally:
        for sock in silent:
            sock.close()
        code = running.stop()
    assert code == 0, "".join(running.stderr_lines)
