"""The PostgreSQL backend against a real server: schema upgrades, items and their look-ups,
writes to one order from two bridges, the change stream (LISTEN/NOTIFY and the catch-up after
a lost connection), the database stopped and started again."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from bridge.storage.postgres import StoreUnavailable
from bridge.storage.postgres.schema import LATEST, upgrade, version
from bridge.storage.postgres.worklist import ItemKey, PostgresWorklist, item_name
from bridge.storage.store import StoreError, encode_file
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401 (fixtures)


def item_bytes(
    accession: str,
    patient_id: str = "P1",
    issuer: str = "",
    sps_id: str = "S1",
    status: str = "SCHEDULED",
    description: str = "MR lumbar spine",
    placer: str = "",
) -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = accession
    ds.PatientName = "DOE^JANE"
    ds.PatientID = patient_id
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.9.7777.{abs(hash(accession)) % 10**9}"
    ds.RequestedProcedureID = "RP1"
    ds.RequestedProcedureDescription = description
    if placer:
        ds.PlacerOrderNumberImagingServiceRequest = placer
    step = Dataset()
    step.Modality = "MR"
    step.ScheduledStationAETitle = "MR1"
    step.ScheduledProcedureStepStartDate = "20261201"
    step.ScheduledProcedureStepStartTime = "0900"
    step.ScheduledProcedureStepID = sps_id
    step.ScheduledProcedureStepStatus = status
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return encode_file(ds, f"2.25.{abs(hash(accession)) % 10**30}")


def key(accession: str, partition: str = "") -> ItemKey:
    return ItemKey(partition, f"acc:{accession}|rp:RP1|sps:S1")


@pytest.fixture
def store(postgres_dsn):  # noqa: F811
    upgrade(postgres_dsn)
    opened = []

    def open_store() -> PostgresWorklist:
        s = PostgresWorklist(postgres_dsn)
        s.prepare()
        opened.append(s)
        return s

    yield open_store
    for s in opened:
        s.close()


def test_upgrade_from_empty_is_versioned_and_idempotent(postgres_dsn):  # noqa: F811
    fresh = PostgresWorklist(postgres_dsn)
    with pytest.raises(StoreError, match="db upgrade"):
        fresh.prepare()  # a bridge never writes into a database without its schema
    applied = upgrade(postgres_dsn)
    assert [m.version for m in applied] == list(range(1, LATEST + 1))
    assert version(fresh.db) == LATEST
    assert upgrade(postgres_dsn) == []  # re-run: nothing to do
    fresh.prepare()
    fresh.close()


def test_concurrent_upgrades_apply_each_migration_once(postgres_dsn):  # noqa: F811
    results, errors = [], []

    def run() -> None:
        try:
            results.append(upgrade(postgres_dsn))
        except Exception as exc:  # collected: the assertion below says which
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(len(r) for r in results) == [0, 0, 0, LATEST]
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [v for (v,) in rows] == list(range(1, LATEST + 1))


def test_db_upgrade_command(postgres_dsn):  # noqa: F811
    cmd = [sys.executable, "-m", "bridge", "db", "upgrade", "--store", postgres_dsn]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "applied migration 1" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "bridge", "db", "upgrade", "--store", "/var/lib/worklist"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "postgresql://" in bad.stderr and "Traceback" not in bad.stderr


def test_items_and_look_ups(store):
    s = store()
    s.put(key("A1"), item_bytes("A1", patient_id="P1", issuer="HOSP", placer="PL1"))
    s.put(key("A2"), item_bytes("A2", patient_id="P1", sps_id="S2"))
    s.put(key("A3", "CT_ROOM"), item_bytes("A3", patient_id="P2", issuer="OTHER"))
    got = s.get(key("A1"))
    assert got is not None and got.record.get(0x00080050) == "A1"
    assert s.get(key("A1", "CT_ROOM")) is None  # partitions are apart
    assert sorted(s.find_by_patient("P1"), key=str) == [key("A1"), key("A2")]
    assert s.find_by_patient("P2", issuer="HOSP") == []  # another issuer's patient
    assert s.find_by_patient("P1", issuer="HOSP") != []
    assert s.find_by_order(placer="PL1") == [key("A1")]
    assert s.find_by_order(accession="A2", sps_id="S2") == [key("A2")]
    assert s.find_by_order(accession="A2", sps_id="S1") == []  # every identifier given counts
    assert s.find_by_order() == []
    assert s.delete(key("A1")) is True
    assert s.delete(key("A1")) is False
    assert s.get(key("A1")) is None and s.find_by_order(placer="PL1") == []
    assert {k for k, _ in s.scan()} == {key("A2"), key("A3", "CT_ROOM")}
    s.put(key("A1"), item_bytes("A1", status="STARTED"))  # a new order over the tombstone
    assert s.find_by_order(accession="A1") == [key("A1")]
    with psycopg.connect(s.dsn) as conn:
        status = conn.execute(
            "SELECT status FROM worklist_items WHERE name = %s", (item_name(key("A1").identity),)
        ).fetchone()[0]
    assert status == "STARTED"


def test_a_damaged_item_is_refused(store):
    s = store()
    with pytest.raises(StoreError):
        s.put(key("X"), b"not a DICOM file at all" * 10)
    assert s.get(key("X")) is None


def test_two_bridges_writing_one_order_serialise(store):
    """Read-modify-write of one order from two store objects, two threads each: every
    increment survives (without the per-order lock, updates are lost)."""
    bridges = [store(), store()]
    order = key("SHARED")
    bridges[0].put(order, item_bytes("SHARED", description="0"))
    rounds = 15
    errors = []

    def increment(s: PostgresWorklist) -> None:
        try:
            for _ in range(rounds):
                with s.change(order):
                    current = int(s.get(order).record.get(0x00321060))
                    s.put(order, item_bytes("SHARED", description=str(current + 1)))
        except Exception as exc:  # collected for the assertion
            errors.append(exc)

    # Two threads per store object: the object's connection serialises them, the database
    # serialises the two objects (two bridges).
    threads = [threading.Thread(target=increment, args=(b,)) for b in bridges for _ in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert bridges[1].get(order).record.get(0x00321060) == str(4 * rounds)


def _collector():
    seen: list[tuple[str, ItemKey, float]] = []
    changed = threading.Condition()

    def callback(kind, k, item) -> None:
        with changed:
            seen.append((kind, k, time.monotonic()))
            changed.notify_all()

    def wait_for(count: int, timeout: float = 30.0) -> bool:
        with changed:
            return changed.wait_for(lambda: len(seen) >= count, timeout)

    return seen, callback, wait_for


def test_change_stream_reaches_the_other_bridge(store):
    writer, reader = store(), store()
    list(reader.scan())
    seen, callback, wait_for = _collector()
    listener = reader.watch(callback)
    assert listener.connected.wait(30)
    writer.put(key("B0"), item_bytes("B0"))  # the writer's own listener would skip it
    assert wait_for(1)
    latencies = []
    for n in range(1, 101):
        started = time.monotonic()
        writer.put(key(f"B{n}"), item_bytes(f"B{n}"))
        assert wait_for(n + 1)
        latencies.append(seen[-1][2] - started)
    writer.delete(key("B1"))
    assert wait_for(102)
    assert seen[-1][:2] == ("delete", key("B1"))
    assert {k for kind, k, _ in seen if kind == "put"} == {key(f"B{n}") for n in range(101)}
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[98]
    print(f"commit -> other bridge's callback: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 5.0  # a loaded machine: the figure is printed, the bound only catches a hang


def test_own_writes_are_not_echoed(store):
    s = store()
    seen, callback, wait_for = _collector()
    listener = s.watch(callback)
    assert listener.connected.wait(30)
    s.put(key("OWN"), item_bytes("OWN"))
    other = store()
    other.put(key("THEIRS"), item_bytes("THEIRS"))
    assert wait_for(1)
    assert wait_for(2, timeout=1.0) is False  # nothing more arrives (awaited, not slept)
    assert [k for _, k, _ in seen] == [key("THEIRS")]


def test_catch_up_after_a_lost_connection_loses_nothing(store, postgres_session):  # noqa: F811
    writer, reader = store(), store()
    writer.put(key("C0"), item_bytes("C0"))
    writer.put(key("GONE"), item_bytes("GONE"))
    list(reader.scan())
    seen, callback, wait_for = _collector()
    listener = reader.watch(callback)
    assert listener.connected.wait(30)
    dbname = writer.dsn.rsplit("/", 1)[1]
    with psycopg.connect(postgres_session.dsn, autocommit=True) as admin:
        # No new connections to the database: the listener stays away while the writer (its
        # connection already open) goes on.
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
        try:
            admin.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
            deadline = time.monotonic() + 30
            while listener.reconnects == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # the listener's own failure: no event to await from here
            assert listener.reconnects >= 1 and not listener.connected.is_set()
            for n in range(1, 21):
                writer.put(key(f"C{n}"), item_bytes(f"C{n}"))
            writer.delete(key("GONE"))
            writer.put(key("C0"), item_bytes("C0", status="STARTED"))
        finally:
            admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
    assert wait_for(22, timeout=60)
    assert listener.connected.wait(30)
    puts = {k for kind, k, _ in seen if kind == "put"}
    assert puts == {key(f"C{n}") for n in range(21)}
    assert ("delete", key("GONE")) in [(kind, k) for kind, k, _ in seen]


def test_database_down_then_up_again(postgres):  # noqa: F811
    upgrade(postgres.dsn)
    s = PostgresWorklist(postgres.dsn)
    s.prepare()
    s.put(key("D1"), item_bytes("D1"))
    postgres.stop()
    started = time.monotonic()
    for call in (
        lambda: s.put(key("D2"), item_bytes("D2")),
        lambda: s.get(key("D1")),
        lambda: s.find_by_order(accession="D1"),
        lambda: s.delete(key("D1")),
    ):
        with pytest.raises(StoreUnavailable):
            call()
    assert issubclass(StoreUnavailable, StoreError)  # the pipeline answers AR
    assert time.monotonic() - started < 60  # refused quickly, never hung
    postgres.start()
    s.put(key("D2"), item_bytes("D2"))  # the same object: it connects again by itself
    assert s.get(key("D1")) is not None and s.get(key("D2")) is not None
    s.close()


def test_the_change_stream_outlives_a_database_restart(postgres):  # noqa: F811
    upgrade(postgres.dsn)
    writer, reader = PostgresWorklist(postgres.dsn), PostgresWorklist(postgres.dsn)
    try:
        list(reader.scan())
        seen, callback, wait_for = _collector()
        listener = reader.watch(callback)
        assert listener.connected.wait(30)
        writer.put(key("R1"), item_bytes("R1"))
        assert wait_for(1)
        postgres.stop()
        postgres.start()
        # The writer's kept connection died with the server: the first put after the restart
        # goes through all the same; it may commit before the listener is back.
        writer.put(key("R2"), item_bytes("R2"))
        assert wait_for(2, timeout=60)
        assert listener.reconnects >= 1
        assert [k for _, k, _ in seen] == [key("R1"), key("R2")]
    finally:
        writer.close()
        reader.close()


# ---- a write whose COMMIT went through but whose answer was lost ------------------------------


def _commit_unanswered(admin: psycopg.Connection, write) -> StoreUnavailable:
    """Run `write` while every COMMIT waits for a standby that does not exist (written
    locally, not answered), then end its server process: the commit stays, its answer is
    lost. The StoreUnavailable the write raised."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while True:  # another process's state: nothing announces it
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        ).fetchall()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(rows) == 1, "the write's COMMIT never waited"
    admin.execute("SELECT pg_terminate_backend(%s)", (rows[0][0],))
    thread.join(30)
    assert not thread.is_alive() and len(failed) == 1 and isinstance(failed[0], StoreUnavailable)
    return failed[0]


def test_a_write_whose_answer_was_lost_is_served_by_its_own_bridge(postgres):  # noqa: F811
    """The change stream skips a bridge's own rows (its index has them): one whose writer
    saw only an error must still reach it, or the bridge would refuse (AR) an order that
    every other bridge serves. The COMMIT is lost for real: a synchronous standby that
    never answers, and the waiting server process ended."""
    upgrade(postgres.dsn)
    writer = PostgresWorklist(postgres.dsn)
    writer.db.settings = {"synchronous_commit": "on"}  # the writer's commits only wait
    seen, callback, wait_for = _collector()
    try:
        writer.prepare()
        listener = writer.watch(callback)
        assert listener.connected.wait(30)
        with psycopg.connect(postgres.dsn, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
            admin.execute("ALTER SYSTEM SET synchronous_commit = 'local'")
            admin.execute("SELECT pg_reload_conf()")

            def changed() -> None:  # as the HL7 pipeline writes: the COMMIT batched
                with writer.change(key("LOST1")):
                    writer.put(key("LOST1"), item_bytes("LOST1"))

            error = _commit_unanswered(admin, changed)
            assert error.backend_pid is not None
            assert wait_for(1, timeout=30), "the committed change never reached its own bridge"
            _commit_unanswered(admin, lambda: writer.put(key("LOST2"), item_bytes("LOST2")))
            assert wait_for(2, timeout=30)
        assert [(kind, k) for kind, k, _ in seen] == [("put", key("LOST1")), ("put", key("LOST2"))]
        assert not writer.uncertain
        assert writer.get(key("LOST1")) is not None and writer.get(key("LOST2")) is not None
    finally:
        writer.close()


def test_a_failed_write_is_read_only_once_its_server_process_is_gone(store, postgres_dsn):  # noqa: F811
    """Until the server process a failed write went to has ended, a COMMIT it received may
    still land: the row is read after that, not before (then "never committed" would be
    final)."""
    s = store()
    seen, callback, wait_for = _collector()
    listener = s.watch(callback)
    assert listener.connected.wait(30)
    with psycopg.connect(postgres_dsn, autocommit=True) as session:
        # The row committed by another writer object of the same bridge (same origin: the
        # stream skips it), its outcome unknown to this one while `session` lives.
        twin = PostgresWorklist(postgres_dsn, origin=s.origin)
        twin.put(key("LATE"), item_bytes("LATE"))
        twin.close()
        s.uncertain.add({key("LATE")}, session.info.backend_pid)
        assert wait_for(1, timeout=1.5) is False  # three ticks of the listener: not read
        assert s.uncertain
    assert wait_for(1, timeout=30)  # the process gone: read, and served
    assert [(kind, k) for kind, k, _ in seen] == [("put", key("LATE"))]
    assert not s.uncertain
