"""High availability, checked from outside as an interface engine and a modality would: two
`wlbridge serve --store postgresql://...` processes on one real PostgreSQL server, real MLLP
senders streaming orders, C-FIND through pynetdicom and dcmtk's findscu.

- SIGKILL of one bridge while two senders stream orders to both: every order answered AA by
  either is found, once, on the survivor, and on the killed one after its restart.
- The same order changed on both bridges at once (NW, XO, CA against XO): one item, the one
  the database committed last, and both bridges answer the same.
- PostgreSQL stopped while a sender streams: no AA while it is down (AR or AE), AA again once it
  is back without restarting the bridges, and the change stream resumes in both directions.
- A retry of a control ID sent to the other bridge gets the same ACK and is not applied twice.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from pydicom import dcmread

from bridge.net.client import MLLPClient, ack_summary, find, worklist_query
from tests.conftest import ROOT, RunningBridge, start_bridge
from tests.messages import orm
from tests.peers import eventually, findscu_answers
from tests.postgres import PostgresServer, postgres_dsn, postgres_session  # noqa: F401

T = TypeVar("T")
SETTLE = 30.0  # seconds: the bound for a change on one bridge to reach the other (target 0.1)


# ---- helpers --------------------------------------------------------------------------------


def db_upgrade(dsn: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "bridge", "db", "upgrade", "--store", dsn],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )


def order(tag: str, control_id: str | None = None, **values: str) -> bytes:
    """A new order (or, with order_control, a change of it) whose identifiers derive from tag."""
    return orm(
        control_id=control_id or tag,
        accession=f"A{tag}",
        placer=f"P{tag}",
        filler=f"F{tag}",
        requested_procedure_id=f"R{tag}",
        sps_id=f"S{tag}",
        study_uid=f"1.2.826.0.1.3680043.10.543.{sum(map(ord, tag)) * 1000 + len(tag)}",
        **values,
    ).encode("utf-8")


def answers(bridge: RunningBridge, **match: str) -> list:
    status, found = find(
        "127.0.0.1", bridge.dicom_port, worklist_query(**match), bridge.ae_title, timeout=30
    )
    assert status == 0, f"C-FIND status {status:#06x}"
    return found


def accessions(bridge: RunningBridge) -> list[str]:
    """Every item's accession number (a list: an order served twice shows twice)."""
    return sorted(str(a.AccessionNumber) for a in answers(bridge))


def served_difference(acked: set[str], on_a: list[str], on_b: list[str]) -> str:
    """What keeps two bridges' lists from being the same superset of the AA'd orders."""
    return (
        f"both bridges serve every AA'd order; AA'd but not on a: {sorted(acked - set(on_a))}, "
        f"not on b: {sorted(acked - set(on_b))}; only on a: {sorted(set(on_a) - set(on_b))}, "
        f"only on b: {sorted(set(on_b) - set(on_a))}"
    )


def bridge_logs(a: RunningBridge, b: RunningBridge) -> str:
    """Both bridges' own log lines so far but their C-FIND lines (the polling's), for a
    failure message."""
    return "".join(
        f"\n---- {name}'s log:\n"
        + "".join([line for line in bridge.stderr_lines if "bridge.net.cfind" not in line][-200:])
        for name, bridge in (("a", a), ("b", b))
    )


def summary(answer) -> tuple[str, ...]:
    """What a modality reads of an item: enough to tell one version of an order from another."""
    step = answer.ScheduledProcedureStepSequence[0]
    return (
        str(answer.AccessionNumber),
        str(answer.PatientName),
        str(step.Modality),
        str(step.ScheduledProcedureStepStartDate) + str(step.ScheduledProcedureStepStartTime),
        str(step.ScheduledProcedureStepDescription),
    )


def stored_rows(dsn: str, accession: str) -> list[bytes]:
    """The Part 10 bytes of the live rows of an accession number, as the database holds them."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT data FROM worklist_items WHERE accession = %s AND NOT deleted", (accession,)
        ).fetchall()
    return [bytes(row[0]) for row in rows]


def ack_of(client: MLLPClient, message: bytes) -> tuple[str, str]:
    code, control, _ = ack_summary(client.send(message))
    return code, control


class Bridges:
    """The bridges of one test on one database; each in its own folder, stopped at the end."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.tmp_path, self.dsn = tmp_path, dsn
        self.running: dict[str, RunningBridge] = {}

    def start(self, name: str) -> RunningBridge:
        bridge = start_bridge(self.tmp_path / name, "--store", self.dsn)
        self.running[name] = bridge
        return bridge

    def kill(self, name: str) -> None:
        bridge = self.running[name]
        bridge.process.send_signal(signal.SIGKILL)
        bridge.process.wait(timeout=10)

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for name, bridge in self.running.items():
            if bridge.process.poll() is None:
                try:
                    codes[name] = bridge.stop()
                except subprocess.TimeoutExpired:
                    bridge.process.kill()
                    codes[name] = -9
        return codes


@pytest.fixture
def bridges(tmp_path: Path, postgres_dsn: str) -> Iterator[Bridges]:  # noqa: F811
    db_upgrade(postgres_dsn)
    started = Bridges(tmp_path, postgres_dsn)
    try:
        yield started
    finally:
        started.stop_all()


# ---- a) SIGKILL of one bridge while two senders stream to both ------------------------------


@dataclass
class Answered:
    tag: str
    bridge: str
    code: str
    sent: float
    answered: float


class StreamingSender(threading.Thread):
    """An interface engine with a connection to each bridge: message n goes to one bridge or
    the other in turn; a message whose connection breaks before its ACK is sent again to the
    other bridge (what the engine behind a balancer does)."""

    def __init__(self, ports: dict[str, Callable[[], int]], tags, progress, stop) -> None:
        super().__init__(daemon=True)
        self.ports, self.tags, self.progress, self.stop_sending = ports, tags, progress, stop
        self.answered: list[Answered] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        clients: dict[str, MLLPClient] = {}
        dead: set[str] = set()
        names = sorted(self.ports)
        try:
            for n, tag in enumerate(self.tags):
                if self.stop_sending.is_set():
                    return
                order_of_targets = names[n % len(names) :] + names[: n % len(names)]
                for target in order_of_targets:
                    if target in dead:
                        continue
                    sent = time.monotonic()
                    try:
                        if target not in clients:
                            clients[target] = MLLPClient("127.0.0.1", self.ports[target](), 30)
                        code, control = ack_of(clients[target], order(tag))
                    except (OSError, ConnectionError):
                        dead.add(target)  # killed: this message goes to the other bridge
                        clients.pop(target, None)
                        continue
                    assert control == tag, (control, tag)
                    with self.progress:
                        self.answered.append(Answered(tag, target, code, sent, time.monotonic()))
                        self.progress.notify_all()
                    break
                else:
                    raise AssertionError(f"{tag}: no bridge left to send it to")
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            for client in clients.values():
                client.close()


def test_sigkill_of_one_bridge_while_two_senders_stream_to_both(bridges):
    a, b = bridges.start("a"), bridges.start("b")
    progress, stop = threading.Condition(), threading.Event()
    ports = {"a": lambda: a.mllp_port, "b": lambda: b.mllp_port}
    senders = [
        StreamingSender(ports, [f"K{k}N{n:04d}" for n in range(2000)], progress, stop)
        for k in range(2)
    ]
    for sender in senders:
        sender.start()

    def answered_by_a() -> int:
        return sum(1 for s in senders for r in s.answered if r.bridge == "a" and r.code == "AA")

    with progress:  # mid-stream: a has answered a good part of its share, not all of it
        assert progress.wait_for(lambda: answered_by_a() >= 20, timeout=120), answered_by_a()
    bridges.kill("a")
    killed_at = time.monotonic()

    def taken_over() -> int:
        return sum(1 for s in senders for r in s.answered if r.bridge == "b" and r.sent > killed_at)

    with progress:  # the senders go on with b alone for a while
        assert progress.wait_for(lambda: taken_over() >= 20, timeout=120), taken_over()
    stop.set()
    for sender in senders:
        sender.join(timeout=180)
        assert not sender.is_alive(), "a sender hung"
        assert sender.error is None, sender.error
    records = [r for s in senders for r in s.answered]
    assert all(r.code == "AA" for r in records), [r for r in records if r.code != "AA"]
    acked = sorted(f"A{r.tag}" for r in records)
    assert len(set(acked)) == len(acked)  # each order answered once
    assert sum(r.bridge == "a" for r in records) >= 20

    # The survivor serves every acknowledged order, each once (those a committed arrive
    # through the change stream: poll until they are there, then compare exactly).
    eventually(lambda: set(accessions(b)) >= set(acked), "b serves every AA'd order")
    assert accessions(b) == acked

    # The killed one, restarted on the same database, serves them all from its first answer.
    a = bridges.start("a")
    assert accessions(a) == acked
    found = findscu_answers(
        a.dicom_port, ["AccessionNumber", "PatientID"], bridges.tmp_path / "findscu"
    )
    assert sorted(str(ds.AccessionNumber) for ds in found) == acked  # dcmtk agrees

    # And both go on: an order sent to the restarted one reaches the survivor.
    with MLLPClient("127.0.0.1", a.mllp_port) as client:
        assert ack_of(client, order("AFTER")) == ("AA", "AFTER")
    eventually(lambda: answers(b, accession="AAFTER"), "b sees the order sent to restarted a")
    assert bridges.stop_all() == {"a": 0, "b": 0}


# ---- b) the same order changed on both bridges at once --------------------------------------


def at_once(sends: list[tuple[RunningBridge, bytes]]) -> list[tuple[str, str]]:
    """Send each message to its bridge at the same moment (connections opened beforehand)."""
    clients = [MLLPClient("127.0.0.1", bridge.mllp_port, 60) for bridge, _ in sends]
    barrier = threading.Barrier(len(sends))
    results: list[tuple[str, str] | BaseException] = [("", "")] * len(sends)

    def send(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = ack_of(clients[i], sends[i][1])
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    for client in clients:
        client.close()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def consistent(dsn: str, bridges_: list[RunningBridge], accession: str) -> list[tuple[str, ...]]:
    """Wait until every bridge answers what the database holds for the accession; returns it
    (one summary per item)."""

    def stored() -> list[tuple[str, ...]]:
        return sorted(summary(dcmread(io.BytesIO(data))) for data in stored_rows(dsn, accession))

    def agree() -> tuple[list[tuple[str, ...]]] | None:
        truth = stored()
        views = [sorted(summary(x) for x in answers(b, accession=accession)) for b in bridges_]
        return (truth,) if all(view == truth for view in views) else None  # () when none: true

    try:
        (truth,) = eventually(agree, f"both bridges answer what the database holds for {accession}")
    except AssertionError:
        views = {b.mllp_port: [summary(x) for x in answers(b, accession=accession)]
                 for b in bridges_}  # fmt: skip
        raise AssertionError(f"database {stored()} but bridges {views}") from None
    return truth


def test_the_same_order_changed_on_both_bridges_at_once(bridges):
    a, b = bridges.start("a"), bridges.start("b")
    dsn = bridges.dsn

    # NW of the same order to both at once (same order, each engine its own control ID)
    new = [(a, order("SAME", "SAME-A")), (b, order("SAME", "SAME-B"))]
    assert at_once(new) == [("AA", "SAME-A"), ("AA", "SAME-B")]
    assert len(consistent(dsn, [a, b], "ASAME")) == 1

    # An order created through a, changed by XOs that reach both bridges at the same moment:
    # each round's two versions differ in every field a modality reads.
    with MLLPClient("127.0.0.1", a.mllp_port) as client:
        assert ack_of(client, order("RACE")) == ("AA", "RACE")
    eventually(lambda: answers(b, accession="ARACE"), "b sees the order created on a")
    for round_ in range(6):
        versions = {
            name: dict(
                order_control="XO",
                patient_name=f"RACE^{name.upper()}{round_}",
                modality=modality,
                start=f"2026120{1 + round_}{hour}00",
                procedure=f"P{name}{round_}^Procedure {name} {round_}^LOCAL",
            )
            for name, modality, hour in (("a", "MR", "08"), ("b", "CT", "15"))
        }
        sends = [
            (bridge, order("RACE", f"RACE-X{round_}{name}", **versions[name]))
            for name, bridge in (("a", a), ("b", b))
        ]
        assert at_once(sends) == [("AA", f"RACE-X{round_}a"), ("AA", f"RACE-X{round_}b")]
        (final,) = consistent(dsn, [a, b], "ARACE")  # one item, the same on both and in the DB
        # ... and all of it from one of the two messages, never a mix of both
        winners = [
            name
            for name, v in versions.items()
            if final[1:3] == (v["patient_name"], v["modality"])
            and final[3].startswith(v["start"][:8])
            and f"Procedure {name} {round_}" in final[4]
        ]
        assert winners, f"round {round_}: {final} is neither version of {versions}"

    # A read-modify-write racing a replacement: a status change (SC, ORC-5 A: the item read,
    # marked ARRIVED, written back) on one bridge while an XO replaces the item on the other.
    # In either order the XO's values stay; a status change that read the item before the XO
    # committed and wrote it back after would bring the old values back (a lost update).
    with MLLPClient("127.0.0.1", b.mllp_port) as client:
        assert ack_of(client, order("RMW")) == ("AA", "RMW")
    for round_ in range(8):
        modality, name = ("MR", "US")[round_ % 2], f"RMW^ROUND{round_}"
        replace = order("RMW", f"RMW-X{round_}", order_control="XO", modality=modality,
                        patient_name=name)  # fmt: skip
        arrive = order("RMW", f"RMW-S{round_}", order_control="SC", order_status="A")
        first, second = (a, b) if round_ % 2 else (b, a)
        codes = at_once([(first, replace), (second, arrive)])
        assert [c for c, _ in codes] == ["AA", "AA"], codes
        (final,) = consistent(dsn, [a, b], "ARMW")
        assert final[1:3] == (name, modality), f"round {round_}: the XO was lost: {final}"

    # A cancel on b racing an XO on a: whichever committed last, both agree with the database.
    cancel = order("RACE", "RACE-CA", order_control="CA", order_status="CA")
    change = order("RACE", "RACE-XZ", order_control="XO", modality="US")
    codes = at_once([(b, cancel), (a, change)])
    assert [c for c, _ in codes] == ["AA", "AA"], codes
    consistent(dsn, [a, b], "ARACE")

    # A cancel on either removes the item from both.
    with MLLPClient("127.0.0.1", b.mllp_port) as client:
        assert ack_of(client, order("SAME", "SAME-CA", order_control="CA", order_status="CA")) == (
            "AA",
            "SAME-CA",
        )
    eventually(lambda: not answers(a, accession="ASAME"), "the cancel on b reaches a")
    assert not answers(b, accession="ASAME") and stored_rows(dsn, "ASAME") == []
    assert bridges.stop_all() == {"a": 0, "b": 0}


# ---- c) PostgreSQL restarted while a sender streams -----------------------------------------


def test_database_restart_under_load_gives_no_aa_while_down_and_recovers(tmp_path):
    server = PostgresServer()
    server.start()
    started = Bridges(tmp_path, server.dsn)
    try:
        db_upgrade(server.dsn)
        a, b = started.start("a"), started.start("b")
        progress = threading.Condition()
        stop_sending = threading.Event()
        ports = {"a": lambda: a.mllp_port, "b": lambda: b.mllp_port}
        tags = (f"D{n:04d}" for n in range(100_000))
        sender = EndlessSender(ports, tags, progress, stop_sending)
        sender.start()
        with progress:
            assert progress.wait_for(lambda: sender.count("AA") >= 10, timeout=120)
        server.stop("fast")
        down_from = time.monotonic()
        with progress:  # a few orders sent while it is down: each must be refused
            assert progress.wait_for(lambda: sender.sent_after(down_from) >= 8, timeout=120), (
                sender.error
            )
        up_from = time.monotonic()
        server.start()
        with progress:  # AA again, from both bridges, without restarting them
            back = progress.wait_for(
                lambda: {r.bridge for r in sender.after(up_from) if r.code == "AA"} == {"a", "b"},
                timeout=120,
            )
        stop_sending.set()
        sender.join(timeout=120)
        assert not sender.is_alive() and sender.error is None, sender.error
        assert back, [(r.tag, r.bridge, r.code) for r in sender.after(up_from)]
        while_down = [r for r in sender.answered if r.sent >= down_from and r.answered < up_from]
        assert len(while_down) >= 8
        assert all(r.code in ("AR", "AE") for r in while_down), [
            (r.tag, r.bridge, r.code) for r in while_down if r.code not in ("AR", "AE")
        ]
        assert a.process.poll() is None and b.process.poll() is None  # never restarted

        # Every order answered AA is served by both, once; both serve the same list. (An
        # order refused with AR may still have been applied, e.g. its commit went through and
        # its answer could not be recorded: the engine sends it again, and that is no loss.)
        acked = {f"A{r.tag}" for r in sender.answered if r.code == "AA"}
        sent = {f"A{r.tag}" for r in sender.answered}
        served = eventually(
            lambda: (x := accessions(a)) == accessions(b) and set(x) >= acked and x,
            lambda: served_difference(acked, accessions(a), accessions(b)) + bridge_logs(a, b),
        )
        assert len(served) == len(set(served)), "an order served twice"
        assert set(served) <= sent

        # The change stream is back in both directions.
        for source, target, tag in ((a, b, "UPA"), (b, a, "UPB")):
            with MLLPClient("127.0.0.1", source.mllp_port) as client:
                assert ack_of(client, order(tag)) == ("AA", tag)
            eventually(lambda t=target, g=tag: answers(t, accession=f"A{g}"), f"{tag} crosses")
        assert started.stop_all() == {"a": 0, "b": 0}
    finally:
        started.stop_all()
        server.remove()


class EndlessSender(threading.Thread):
    """One engine sending to both bridges in turn, one connection each, until told to stop; a
    broken connection is opened again for the next message (the message itself is not
    retried: its answer, or its lack, is what the test looks at)."""

    def __init__(self, ports, tags: Iterator[str], progress, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.ports, self.tags, self.progress, self.stop_sending = ports, tags, progress, stop
        self.answered: list[Answered] = []
        self.error: BaseException | None = None

    def count(self, code: str) -> int:
        return sum(r.code == code for r in self.answered)

    def after(self, moment: float) -> list[Answered]:
        return [r for r in self.answered if r.sent >= moment]

    def sent_after(self, moment: float) -> int:
        return len(self.after(moment))

    def run(self) -> None:
        clients: dict[str, MLLPClient] = {}
        names = sorted(self.ports)
        try:
            for n, tag in enumerate(self.tags):
                if self.stop_sending.is_set():
                    return
                target = names[n % len(names)]
                sent = time.monotonic()
                try:
                    if target not in clients:
                        clients[target] = MLLPClient("127.0.0.1", self.ports[target](), 60)
                    code, control = ack_of(clients[target], order(tag))
                except (OSError, ConnectionError):
                    clients.pop(target, None)  # no answer: the order is not counted either way
                    continue
                assert control == tag, (control, tag)
                with self.progress:
                    self.answered.append(Answered(tag, target, code, sent, time.monotonic()))
                    self.progress.notify_all()
        except BaseException as exc:  # reported by the test
            self.error = exc
            with self.progress:
                self.progress.notify_all()
        finally:
            for client in clients.values():
                client.close()


# ---- d) a retry sent to the other bridge ----------------------------------------------------


def test_a_retry_sent_to_the_other_bridge_is_recognised_as_a_duplicate(bridges):
    a, b = bridges.start("a"), bridges.start("b")
    first = order("RETRY", "RETRY-1")
    with MLLPClient("127.0.0.1", a.mllp_port) as client:
        ack_a = client.send(first)
    assert ack_summary(ack_a)[:2] == ("AA", "RETRY-1")
    eventually(lambda: answers(b, accession="ARETRY"), "b sees the order")
    # the engine lost a's ACK and sends the same message again, through the balancer, to b
    with MLLPClient("127.0.0.1", b.mllp_port) as client:
        ack_b = client.send(first)
    assert ack_b == ack_a  # the same answer, byte for byte (its own MSH-10 and time included)
    outcomes = [r.get("outcome", "") for r in b.log_records() if r.get("control_id") == "RETRY-1"]
    assert outcomes and "duplicate" in outcomes[-1], b.log_records()
    assert len(stored_rows(bridges.dsn, "ARETRY")) == 1

    # A refused message is remembered too: the same order for another patient (AE, the order
    # belongs to its patient), retried on b, gets a's refusal byte for byte.
    other_patient = order("RETRY", "RETRY-2", patient_id="SOMEONE-ELSE")
    with MLLPClient("127.0.0.1", a.mllp_port) as client:
        refused = client.send(other_patient)
    assert ack_summary(refused)[:2] == ("AE", "RETRY-2"), ack_summary(refused)
    with MLLPClient("127.0.0.1", b.mllp_port) as client:
        assert client.send(other_patient) == refused
    (item,) = answers(b, accession="ARETRY")
    assert str(item.PatientID) == "PAT001"  # the default patient of tests.messages.orm
    assert bridges.stop_all() == {"a": 0, "b": 0}


# ---- the change stream: several notifications in one wake-up --------------------------------


def test_another_writers_change_is_read_when_our_own_notification_arrives_with_it(
    postgres_dsn,  # noqa: F811
):
    """Both bridges writing at once: one wake-up of the listener may bring the other bridge's
    notification and then one of our own with a higher change number (one packet). Our own
    must not move the change number on past the other's row before it is read."""
    from bridge.storage.postgres.worklist import CHANNEL, ItemKey, PostgresWorklist
    from tests.storage.test_postgres_store import item_bytes

    db_upgrade(postgres_dsn)
    ours, theirs = PostgresWorklist(postgres_dsn, "ours"), PostgresWorklist(postgres_dsn, "theirs")
    seen: list[str] = []
    arrived = threading.Condition()

    def changed(_kind, key, _item) -> None:
        with arrived:
            seen.append(key.identity)
            arrived.notify_all()

    listener = ours.watch(changed, since=0)
    try:
        assert listener.connected.wait(30)
        key = ItemKey("", "acc:TOGETHER")
        with theirs.change(key):  # their row, then a notification of ours, one commit
            theirs.put(key, item_bytes("TOGETHER"))
            # a number above any change's (the put's own is known only once committed)
            payload = '{"seq": 1000000000, "kind": "put", "partition": "", "origin": "ours"}'
            assert theirs.on_commit("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        with arrived:
            assert arrived.wait_for(lambda: "acc:TOGETHER" in seen, timeout=SETTLE), seen
    finally:
        ours.close()
        theirs.close()
