"""The PostgreSQL backend of the storage protocol (bridge.storage.postgres.storage): the same
behaviours as the folder backend (tests/storage/test_storage.py), plus what sharing one
database between bridges needs: another store object's changes on the change stream, never an
older version after a newer one, one order's read-modify-write serialised across writers."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from bench.worklist_items import make_item
from bridge.config import Settings
from bridge.dicom.matching import ACCESSION_NUMBER, PATIENT_ID
from bridge.dicom.worklist_item import set_status
from bridge.storage.postgres.schema import upgrade
from bridge.storage.postgres.storage import (
    HOUSEKEEPING_LOCK,
    ItemFiles,
    PostgresStorage,
    RoundLock,
)
from bridge.storage.protocol import FolderStorage, ItemKey, StorageChange, WorklistStorage
from bridge.storage.store import StoreError
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401
from tests.storage.test_storage import make_storage as make_folder_storage

WAIT = 10.0  # seconds a notification may take on a loaded machine


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def make_storage(tmp_path: Path, dsn: str, **overrides) -> PostgresStorage:
    storage = PostgresStorage(Settings(worklist_dir=tmp_path / "wl", store=dsn, **overrides))
    storage.prepare()
    return storage


def test_the_postgres_backend_follows_the_protocol(tmp_path, dsn):
    storage: WorklistStorage = make_storage(tmp_path, dsn)
    assert isinstance(storage, PostgresStorage)


@pytest.mark.parametrize("layout", ["flat", "per-ae"])
def test_put_get_find_scan_delete_by_key(tmp_path, dsn, layout):
    storage = make_storage(tmp_path, dsn, worklist_layout=layout, ae_title="CT_WL")
    key = ItemKey.of_order("acc:A1", storage.own_partition)
    assert storage.get(key) is None and not storage.contains(key)
    storage.put(key, make_item("A1", patient_id="P1"), "acc:A1")
    stored = storage.get(key)
    assert stored is not None and stored.data[128:132] == b"DICM"
    assert stored.record.get(ACCESSION_NUMBER) == "A1"
    assert storage.contains(key) and storage.dataset(key).AccessionNumber == "A1"
    # the virtual path is the folder backend's, and names the key back
    expected = (tmp_path / "wl" / "CT_WL") if layout == "per-ae" else (tmp_path / "wl")
    assert storage.path_of(key) == expected / f"{key.identity}.wl"
    assert storage.key_of(storage.path_of(key)) == key
    assert not (expected / f"{key.identity}.wl").exists(), "no file is written"
    assert storage.find_by_patient("P1") == [key]
    assert storage.find_by_patient("P2") == []
    assert [k for k, _record in storage.scan()] == [key]
    [(path, item)] = storage.items_of_patient("P1")
    assert path == storage.path_of(key) and item.PatientID == "P1"
    assert storage.delete(key) is True
    assert storage.get(key) is None and storage.delete(key) is False
    assert list(storage.scan()) == [] and storage.find_by_patient("P1") == []


def test_the_bytes_are_the_folder_backend_s(tmp_path, dsn):
    """Same encoder, same SOP Instance UID rule: `wlbridge export` gives the folder's file."""
    folder = make_folder_storage(tmp_path / "folder")
    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:A2")
    for backend in (folder, storage):
        backend.put(key, make_item("A2"), "acc:A2")
    assert storage.get(key).data == folder.get(key).data
    rewritten = storage.dataset(key)  # read back, no identity: keeps its own UID
    storage.put(key, rewritten)
    assert storage.get(key).data == folder.get(key).data


def test_find_by_order_uses_the_step_id_and_another_identifier(tmp_path, dsn):
    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:A7")
    storage.put(key, make_item("A7"), "acc:A7")
    step_id = storage.get(key).record.get(0x00400100)[0].get(0x00400009)
    assert storage.find_by_order({"ScheduledProcedureStepID": step_id, "AccessionNumber": "A7"})
    assert storage.find_by_order({"ScheduledProcedureStepID": "*", "AccessionNumber": "A7"})
    assert (
        storage.find_by_order({"ScheduledProcedureStepID": step_id, "AccessionNumber": "A8"}) == []
    )
    assert storage.find_by_order({"AccessionNumber": "A7"}) == []  # no step ID: no guess


def test_the_change_stream_reports_another_bridge_s_changes_not_its_own(tmp_path, dsn):
    here = make_storage(tmp_path, dsn)
    other = make_storage(tmp_path, dsn)
    list(here.scan())
    changes: queue.Queue[StorageChange] = queue.Queue()
    here.watch(changes.put)  # no reactor: delivered on the listener's thread
    try:
        assert here.listener.connected.wait(WAIT)
        key = ItemKey.of_order("acc:EXT1")
        other.put(key, make_item("EXT1", patient_id="PX"), "acc:EXT1")
        change = changes.get(timeout=WAIT)
        assert change.key == key and change.record.get(PATIENT_ID) == "PX"
        own = ItemKey.of_order("acc:OWN")
        here.put(own, make_item("OWN"), "acc:OWN")
        other.delete(key)
        assert changes.get(timeout=WAIT) == StorageChange(key, None)
        with pytest.raises(queue.Empty):  # the bridge's own put is not another writer's change
            changes.get(timeout=0.5)
    finally:
        here.stop_watching()
        here.close()
        other.close()


def test_a_notification_older_than_the_bridge_s_own_write_is_dropped(tmp_path, dsn):
    """The listener read another bridge's version, then this bridge wrote a newer one before
    the callback ran: the older version must not replace it in the index."""
    here = make_storage(tmp_path, dsn)
    other = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:R1")
    other.put(key, make_item("R1", patient_id="OLD"), "acc:R1")
    older = other.worklist.last_seq
    here.put(key, make_item("R1", patient_id="NEW"), "acc:R1")
    delivered: list[StorageChange] = []
    here._deliver(delivered.append, key, None, older)
    assert delivered == []
    here._deliver(delivered.append, key, None, here.worklist.last_seq + 1)
    assert delivered == [StorageChange(key, None)]


def test_one_order_s_read_modify_write_is_serialised_across_bridges(tmp_path, dsn):
    """Two writers each read the item, change its status and write it back inside change():
    the second waits for the first's commit and reads its result (no lost update)."""
    a = make_storage(tmp_path, dsn)
    b = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:S1")
    a.put(key, make_item("S1", status="SCHEDULED"), "acc:S1")
    inside = threading.Event()
    seen_by_b: list[str] = []

    def slow_writer_a() -> None:
        with a.change(key):
            item = a.dataset(key)
            inside.set()
            time.sleep(0.5)  # holds the order's lock while b tries to take it
            set_status(item, "ARRIVED")
            a.put(key, item)

    thread = threading.Thread(target=slow_writer_a)
    thread.start()
    assert inside.wait(WAIT)
    with b.change(key):  # waits for a's commit
        item = b.dataset(key)
        seen_by_b.append(str(item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus))
        set_status(item, "STARTED")
        b.put(key, item)
    thread.join(WAIT)
    assert seen_by_b == ["ARRIVED"]
    final = a.dataset(key).ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus
    assert final == "STARTED"


def test_a_failed_change_leaves_the_item_as_it_was(tmp_path, dsn):
    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:F1")
    storage.put(key, make_item("F1", patient_id="P1"), "acc:F1")
    with pytest.raises(RuntimeError), storage.change(key):
        storage.put(key, make_item("F1", patient_id="P2"), "acc:F1")
        raise RuntimeError("a check failed after the write")
    assert storage.dataset(key).PatientID == "P1"


def test_expiry_by_path_through_the_folder_shaped_view(tmp_path, dsn):
    storage = make_storage(tmp_path, dsn)
    files = ItemFiles(storage)
    key = ItemKey.of_order("acc:E1")
    storage.put(key, make_item("E1", status="COMPLETED"), "acc:E1")
    path = storage.path_of(key)
    assert files.read(path).AccessionNumber == "E1"
    assert files.expired(3600, ("COMPLETED",)) == []  # not old enough
    assert files.expired(0, ("COMPLETED",)) == [path]
    assert files.delete_if_expired(path, 3600) is False
    assert files.delete_if_expired(path, 0) is True
    assert files.read(path) is None


def test_one_bridge_at_a_time_holds_a_round_lock(dsn):
    first, second = RoundLock(dsn, HOUSEKEEPING_LOCK), RoundLock(dsn, HOUSEKEEPING_LOCK)
    try:
        assert first.try_acquire() is True
        assert second.try_acquire() is False
        first.release()
        assert second.try_acquire() is True
    finally:
        first.release()
        second.release()


def test_an_unreachable_database_is_a_store_error_and_health_says_so(tmp_path, postgres):  # noqa: F811
    upgrade(postgres.dsn)
    storage = make_storage(tmp_path, postgres.dsn)
    key = ItemKey.of_order("acc:D1")
    assert storage.ping() and storage.health()["ok"]
    postgres.stop()
    with pytest.raises(StoreError):
        storage.put(key, make_item("D1"), "acc:D1")
    assert storage.ping() is False
    health = storage.health()
    assert health["ok"] is False and "error" in health
    postgres.start()
    storage.put(key, make_item("D1"), "acc:D1")  # connects again by itself
    assert storage.ping() and storage.health()["ok"]
    assert storage.contains(key)


def test_the_folder_backend_still_has_items_of_patient(tmp_path):
    storage: FolderStorage = make_folder_storage(tmp_path)
    key = ItemKey.of_order("acc:A9")
    storage.put(key, make_item("A9", patient_id="P9"), "acc:A9")
    [(path, item)] = storage.items_of_patient("P9")
    assert path == storage.path_of(key) and item.AccessionNumber == "A9"


def test_what_an_mpps_looks_up_is_read_from_the_database(tmp_path, dsn):
    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:M1")
    storage.put(key, make_item("M1"), "acc:M1")
    item = storage.dataset(key)
    step_id = item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
    assert storage.find_by_study_and_step(item.StudyInstanceUID, step_id) == [key]
    assert storage.find_by_study_and_step(item.StudyInstanceUID, "OTHER") == []
    assert storage.find_by_accession("M1") == [key] and storage.find_by_accession("M2") == []


def test_a_new_item_s_look_up_columns_are_those_of_its_bytes(tmp_path, dsn):
    """The columns of a new item come from its plain elements, not from its bytes: the same
    values either way."""
    from bridge.dicom.worklist_item import build_elements
    from bridge.hl7.message import parse_message
    from bridge.hl7.pipeline import interpret
    from bridge.storage.postgres.worklist import columns_of
    from tests.messages import orm

    settings = Settings(worklist_dir=tmp_path / "wl", store=dsn)
    message = parse_message(orm(accession="ACC9", patient_id="P9").encode(), settings)
    intent = interpret(message, settings)
    item = build_elements(message, intent, intent.steps[0], settings)
    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order(intent.steps[0].identity)
    storage.put(key, item, intent.steps[0].identity)
    [row] = storage.worklist.db.fetchall(
        "SELECT patient_id, issuer, accession, placer, filler, study_uid, sps_id, status"
        " FROM worklist_items"
    )
    expected = columns_of(storage.get(key).data)
    assert dict(zip(expected, row, strict=True)) == expected
    assert expected["accession"] == "ACC9" and expected["patient_id"] == "P9"
    assert expected["sps_id"] and expected["status"] == "SCHEDULED"


def test_the_service_publishes_a_change_only_once_it_committed(tmp_path, dsn):
    """Inside WorklistService.change() the ItemWritten waits for the commit, and a change
    rolled back is never published: the index never serves what the database does not have."""
    from bridge.core.events import EventBus, ItemWritten
    from bridge.core.worklist_service import WorklistService
    from bridge.storage.index import WorklistIndex

    settings = Settings(worklist_dir=tmp_path / "wl", store=dsn)
    storage = make_storage(tmp_path, dsn)
    index = WorklistIndex(settings)
    events = EventBus()
    service = WorklistService(settings, ItemFiles(storage), index, events, storage=storage)
    written: list[ItemKey] = []
    events.subscribe(ItemWritten, lambda event: written.append(event.key))
    key = ItemKey.of_order("acc:T1")
    with service.change(key):
        service.put(key, make_item("T1"), "hl7", "acc:T1")
        assert written == [] and index.record(storage.path_of(key)) is None
    assert written == [key] and index.record(storage.path_of(key)) is not None
    other = ItemKey.of_order("acc:T2")
    with pytest.raises(RuntimeError), service.change(other):
        service.put(other, make_item("T2"), "hl7", "acc:T2")
        raise RuntimeError("a later step failed")
    assert written == [key] and not storage.contains(other)
    assert index.record(storage.path_of(other)) is None


def _round_trips(storage: PostgresStorage, work) -> int:
    """How many times the store's connection waited for the server during `work()` (one
    ReadyForQuery a round trip: a Sync of the pipeline or a simple query), from libpq's trace
    of the protocol."""
    return _round_trips_of(storage.worklist.db, work)


def _round_trips_of(db, work) -> int:
    """The same for any Database's connection."""
    import tempfile

    import psycopg

    conn = db._connection()
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            work()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        return sum("\tReadyForQuery\t" in line for line in trace)


def test_a_new_order_s_change_with_its_answer_is_two_round_trips(tmp_path, dsn):
    """BEGIN, the order's lock and the read in one; the write, the retry memory's record of
    the answer and the COMMIT in the other. Both are then committed, together."""
    from bridge.storage.postgres.memory import RetryMemory

    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:RT1")

    def change() -> None:
        with storage.change(key):
            assert storage.get(key) is None and not storage.contains(key)
            storage.put(key, make_item("RT1"), "acc:RT1")
            assert storage.on_commit(*RetryMemory.statement("rt1", "digest", b"MSA|AA|RT1"))

    assert _round_trips(storage, change) == 2
    memory = RetryMemory(dsn)
    try:
        assert memory.lookup("rt1") == ("digest", b"MSA|AA|RT1")
    finally:
        memory.close()
    assert make_storage(tmp_path, dsn).get(key).record.get(ACCESSION_NUMBER) == "RT1"
    assert storage.worklist.last_seq > 0  # the change number, known once committed


def test_a_change_whose_commit_fails_keeps_neither_the_item_nor_the_answer(tmp_path, dsn):
    from bridge.storage.postgres.memory import RetryMemory

    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:RT2")
    with pytest.raises(StoreError, match="division by zero"):
        with storage.change(key):
            storage.put(key, make_item("RT2"), "acc:RT2")
            storage.on_commit(*RetryMemory.statement("rt2", "digest", b"MSA|AA|RT2"))
            storage.on_commit("SELECT 1 / 0")  # fails with the COMMIT's round trip
    memory = RetryMemory(dsn)
    try:
        assert memory.lookup("rt2") is None
    finally:
        memory.close()
    assert storage.get(key) is None
    storage.put(key, make_item("RT2"), "acc:RT2")  # the connection is usable again
    assert storage.contains(key)


def test_a_look_up_after_a_write_in_one_change_sees_the_write(tmp_path, dsn):
    """The writes of a change wait for its COMMIT, unless a statement comes that must see
    them (a read of the item, a look-up by identifier): they go first."""
    storage = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:RT3")
    other = ItemKey.of_order("acc:RT4")
    with storage.change(key):
        storage.put(key, make_item("RT3", patient_id="PRT3"), "acc:RT3")
        assert storage.find_by_accession("RT3") == [key]
        assert storage.contains(key)
        storage.put(other, make_item("RT4", patient_id="PRT3"), "acc:RT4")  # another order
        assert len(storage.find_by_patient("PRT3")) == 2
    assert storage.on_commit("SELECT 1") is False  # no change open any more


def _pipeline_on(tmp_path: Path, dsn: str):
    """(Bridge, its PostgresStorage, its RetryMemory): the pipeline as `serve` builds it on a
    shared store, in the caller's thread."""
    import logging

    from bridge.core.events import EventBus
    from bridge.core.worklist_service import WorklistService
    from bridge.hl7.pipeline import Bridge
    from bridge.ops.translation_log import TranslationLog
    from bridge.storage.index import WorklistIndex
    from bridge.storage.postgres.memory import RetryMemory

    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = Settings(worklist_dir=tmp_path / "wl", store=dsn, rejected_dir=tmp_path / "rejected")
    storage = PostgresStorage(settings)
    storage.prepare()
    index = WorklistIndex(settings, log=logging.getLogger("test"))
    files = ItemFiles(storage)
    service = WorklistService(settings, files, index, EventBus(), storage=storage)
    memory = RetryMemory(dsn)
    log = TranslationLog(tmp_path / "translation.log")
    bridge = Bridge(settings, files, index, log, service=service, retry_memory=memory)
    return bridge, storage, memory


def test_the_pipeline_applies_a_new_order_in_two_round_trips_and_answers_its_retry(tmp_path, dsn):
    """Bridge.handle on the PostgreSQL store with the shared retry memory: a new order is
    two round trips (the retry memory read and its AA written in the change's own), none on
    the retry memory's session; a retry of it gets the same ACK bytes and changes nothing."""
    from tests.messages import orm

    bridge, storage, memory = _pipeline_on(tmp_path, dsn)
    raw = orm(control_id="RTPIPE1", accession="RTPIPE1").encode()
    try:
        memory_trips: list[int] = []
        acks: list[bytes] = []

        def first() -> None:
            memory_trips.append(_round_trips_of(memory.db, lambda: acks.append(bridge.handle(raw))))

        assert _round_trips(storage, first) == 2
        assert memory_trips == [0]
        assert b"MSA|AA|RTPIPE1" in acks[0]
        (item_key,) = storage.find_by_accession("RTPIPE1")
        seq = storage.worklist.db.fetchall(
            "SELECT seq FROM worklist_items WHERE name = %s", (item_key.identity,)
        )[0][0]
        assert bridge.handle(raw) == acks[0]  # the retry: the same bytes, not applied again
        assert (
            storage.worklist.db.fetchall(
                "SELECT seq FROM worklist_items WHERE name = %s", (item_key.identity,)
            )[0][0]
            == seq
        )
    finally:
        memory.close()
        storage.close()


def test_one_order_sent_to_two_bridges_at_once_is_applied_once(tmp_path, dsn):
    """Both copies wait for the order's lock (held here); the one that gets it second reads
    the retry memory after the first's commit and answers with the first's ACK."""
    from bridge.hl7.message import parse_message
    from bridge.hl7.pipeline import interpret
    from tests.messages import orm

    a, a_storage, a_memory = _pipeline_on(tmp_path / "a", dsn)
    b, b_storage, b_memory = _pipeline_on(tmp_path / "b", dsn)
    holder = make_storage(tmp_path, dsn)
    raw = orm(control_id="RTBOTH1", accession="RTBOTH1").encode()
    intent = interpret(parse_message(raw, a.settings), a.settings)
    order_key = a.service.key_of_order(intent.steps[0].identity)
    acks: dict[str, bytes] = {}
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.change(order_key):
            held.set()
            release.wait(WAIT)

    def send(name: str, bridge) -> None:
        acks[name] = bridge.handle(raw)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    assert held.wait(WAIT)
    threads += [threading.Thread(target=send, args=(n, br)) for n, br in (("a", a), ("b", b))]
    for thread in threads[1:]:
        thread.start()
    try:
        waiting, deadline = 0, time.monotonic() + WAIT
        while waiting < 2 and time.monotonic() < deadline:  # both copies wait for the lock
            waiting = a_memory.db.fetchall(  # a session of its own, not in a change
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
            )[0][0]
            time.sleep(0.01)
        assert waiting >= 2, (acks, waiting)
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)
    try:
        assert set(acks) == {"a", "b"} and b"MSA|AA|RTBOTH1" in acks["a"]
        assert acks["a"] == acks["b"]  # the second copy got the first's ACK, byte for byte
        lines = [line for br in (a, b) for line in br.translation_log.path.read_text().splitlines()]
        assert sum("duplicate" in line for line in lines) == 1, lines
    finally:
        for closing in (a_memory, a_storage, b_memory, b_storage, holder):
            closing.close()
