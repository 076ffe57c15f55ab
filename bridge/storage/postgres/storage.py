"""PostgreSQL as a `WorklistStorage` (bridge.storage.protocol): what `store = "postgresql://…"`
gives `wlbridge serve`.

Keys are the protocol's ItemKey; in the database the key's identity is the row's name (the
folder store's file name, so `wlbridge import` and `export` keep keys). Callers that still name
items by path (the index, the HTTP API, the housekeeping) get virtual paths, the ones the folder
backend would use (`<worklist-dir>/[<partition>/]<identity>.wl`), and `ItemFiles`, a
folder-shaped view (read by path, expiry) backed by the database. No file is written.

The change stream: each bridge LISTENs (bridge.storage.postgres.worklist.ChangeListener); a
change another bridge committed reaches the `watch` callback on the reactor thread. A change
older than one this bridge already applied to the same key (its own write that overtook the
notification) is dropped, so the index never goes back to an older version.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from pydicom import Dataset, dcmread

from bridge.config import Settings
from bridge.dicom.matching import Record, record_from_elements
from bridge.storage.postgres.connection import Database, StoreUnavailable, redacted
from bridge.storage.postgres.worklist import (
    NAME_PREFIX,
    PostgresWorklist,
    item_name,
    record_of,
    record_text,
)
from bridge.storage.postgres.worklist import (
    StoredItem as PgStoredItem,
)
from bridge.storage.protocol import ItemKey, ItemPaths, StorageChange, StoredItem
from bridge.storage.store import (
    PlainItem,
    StoreError,
    WorklistStore,
    _file_meta,
    encode_elements,
    encode_file,
)

log = logging.getLogger("bridge.storage.postgres")

REQUESTED_PROCEDURE_ID = 0x00401001
HEALTH_STALE_AFTER = 15.0  # seconds: a ping older than this says nothing any more
# Seconds the change stream may be down before /readyz says not ready: meanwhile C-FIND answers
# miss what other bridges changed (a reconnect normally takes well under a second).
CHANGE_STREAM_DOWN_AFTER = 5.0
# A bridge that hears no other writer still prunes its change numbers past this many.
APPLIED_PRUNE_SIZE = 10_000
HOUSEKEEPING_LOCK = 0x77_6C_68_6B  # "wlhk": one bridge at a time runs a housekeeping round
SWEEP_LOCK = 0x77_6C_73_77  # "wlsw": one bridge at a time runs an expiry sweep
_ORDER_COLUMNS = (
    ("AccessionNumber", "accession"),
    ("PlacerOrderNumberImagingServiceRequest", "placer"),
    ("FillerOrderNumberImagingServiceRequest", "filler"),
    ("StudyInstanceUID", "study_uid"),
)


def item_bytes(item: Dataset | PlainItem, order_identity: str | None, name: str) -> bytes:
    """The Part 10 bytes the folder backend would write for `item` (same SOP Instance UID
    rule, same encoder), so an exported item is the file the folder store would have."""
    uid = WorklistStore._instance_uid(item, order_identity, Path(name))
    if isinstance(item, Dataset):
        return encode_file(item, uid)
    body = encode_elements(item.elements)
    if body is None:  # something only pydicom writes
        return encode_file(item.to_dataset(), uid)
    return _file_meta(uid) + body


class PostgresStorage(ItemPaths):
    """The worklist items in PostgreSQL, under the protocol's keys."""

    def __init__(self, settings: Settings, worklist: PostgresWorklist | None = None) -> None:
        self.settings = settings
        self.url = settings.store
        self.worklist = worklist or PostgresWorklist(settings.store)
        self.root = Path(settings.worklist_dir)
        self.per_ae = settings.worklist_layout == "per-ae"
        self._applied: dict[ItemKey, int] = {}  # key -> newest change number applied here
        self._applied_lock = threading.Lock()
        self._change_reads: tuple[int, dict] | None = None  # (thread, reads) of a change()
        # the change numbers of an open change(): into _applied once it committed, never when
        # it rolled back (a delivery with a lower number would be dropped for nothing)
        self._pending_marks: tuple[int, list[tuple[ItemKey, int]]] | None = None
        self._queued = 0  # deliveries handed to the reactor and not yet run
        self._pruned_at = 0.0
        self.delivered_seq = 0  # the newest change number of another writer's delivered change
        self._delivered = threading.Condition()
        self._ping_db = Database(settings.store)  # its own connection: never waits on a change
        self._health: dict[str, Any] = {"ok": False, "error": "not checked yet", "at": 0.0}
        self._stream_down_since: float | None = None  # when the change stream was seen down

    # ---- start, stop, health

    def prepare(self) -> None:
        """StoreUnavailable when the database cannot be reached, StoreError when its schema is
        not current (the message names `wlbridge db upgrade`)."""
        self.worklist.prepare()
        self._health = {"ok": True, "at": time.monotonic()}

    def close(self) -> None:
        self.worklist.close()
        self._ping_db.close()

    def change_stream_down_for(self) -> float:
        """Seconds since the change stream was first seen down (0 while it is connected);
        looked at by every ping and health check."""
        listener = self.worklist._listener
        if listener is None or listener.connected.is_set():
            self._stream_down_since = None
            return 0.0
        now = time.monotonic()
        if self._stream_down_since is None:
            self._stream_down_since = now
        return now - self._stream_down_since

    def ping(self) -> bool:
        """One `SELECT 1` on a connection of its own (in a worker thread); the result is what
        `health()` reports until the next ping."""
        self.change_stream_down_for()
        try:
            self._ping_db.fetchall("SELECT 1")
        except StoreError as exc:
            self._health = {"ok": False, "error": str(exc), "at": time.monotonic()}
            return False
        self._health = {"ok": True, "at": time.monotonic()}
        return True

    def health(self) -> dict[str, Any]:
        """The last ping's result (cheap: no query), for /readyz."""
        state = dict(self._health)
        age = time.monotonic() - state.pop("at", 0.0)
        if state.get("ok") and age > HEALTH_STALE_AFTER:
            state = {"ok": False, "error": f"no successful check for {age:.0f} s"}
        listener = self.worklist._listener
        if listener is not None:
            state["change_stream"] = "connected" if listener.connected.is_set() else "reconnecting"
            down_for = self.change_stream_down_for()
            if state.get("ok") and down_for > CHANGE_STREAM_DOWN_AFTER:
                state["ok"] = False
                state["error"] = (
                    f"change stream down for {down_for:.0f} s: other bridges' changes"
                    " are not served"
                )
        state["store"] = redacted(self.url)
        return state

    # ---- keys and virtual paths: ItemPaths (as the folder backend's)

    @staticmethod
    def _row_key(key: ItemKey) -> ItemKey:
        """The database's key for a protocol key: the identity is the row's name."""
        return ItemKey(key.partition, NAME_PREFIX + key.identity)

    @staticmethod
    def _protocol_key(row_key: ItemKey) -> ItemKey:
        return ItemKey(row_key.partition, item_name(row_key.identity))

    # ---- the protocol

    def _read(self, key: ItemKey) -> PgStoredItem | None:
        """The row's item; inside a change() on its thread, read once and remembered (the
        order is locked: nobody else changes it until the commit)."""
        reads = self._change_reads
        if reads is None or reads[0] != threading.get_ident():
            return self.worklist.get(self._row_key(key))
        if key not in reads[1]:
            reads[1][key] = self.worklist.get(self._row_key(key))
        return reads[1][key]

    def _forget(self, key: ItemKey) -> None:
        reads = self._change_reads
        if reads is not None:
            reads[1].pop(key, None)

    def get(self, key: ItemKey) -> StoredItem | None:
        stored = self._read(key)
        if stored is None:
            return None
        return StoredItem(stored.data, record_of(stored.data))

    def contains(self, key: ItemKey) -> bool:
        return self._read(key) is not None

    def record(self, key: ItemKey) -> Record | None:
        stored = self.get(key)
        return stored.record if stored is not None else None

    def dataset(self, key: ItemKey) -> Dataset | None:
        stored = self._read(key)
        if stored is None:
            return None
        try:
            return dcmread(io.BytesIO(stored.data))
        except Exception as exc:  # pydicom raises many types on damaged bytes
            raise StoreError(f"cannot read {key.identity}.wl: {exc}") from exc

    def put(
        self, key: ItemKey, item: Dataset | PlainItem, order_identity: str | None = None
    ) -> None:
        data = item_bytes(item, order_identity, f"{key.identity}.wl")
        # a new item's plain elements give its record cheaply; a Dataset's from its bytes
        record = None if isinstance(item, Dataset) else record_from_elements(item.elements)
        self._forget(key)
        # inside a change() the write goes with its COMMIT: the number is known then
        self.worklist.put(self._row_key(key), data, record, lambda seq: self._mark(key, seq))

    def delete(self, key: ItemKey) -> bool:
        self._forget(key)
        removed = self.worklist.delete(self._row_key(key))
        if removed:
            self._mark(key, self.worklist.last_seq)
        return removed

    @contextmanager
    def change(
        self, key: ItemKey, also: Sequence[tuple[str, Any]] = ()
    ) -> Iterator[list[tuple | None]]:
        """A read-modify-write of one order, serialised with every other bridge (one
        transaction under the order's lock, committed when the block ends). The block gets
        the first row of each `also` statement, run after the lock in the same round trip."""
        marks: list[tuple[ItemKey, int]] = []
        with self.worklist.change(self._row_key(key), also) as rows:
            self._change_reads = (threading.get_ident(), {})
            self._pending_marks = (threading.get_ident(), marks)
            try:
                yield rows
            finally:
                self._change_reads = None
                self._pending_marks = None
        for marked, seq in marks:  # committed
            self._mark(marked, seq)

    def on_commit(self, sql: str, params: Any = None) -> bool:
        """A statement sent with the COMMIT of this thread's open change(); False: none open."""
        return self.worklist.on_commit(sql, params)

    def _keys(self, where: str, params: tuple) -> list[ItemKey]:
        rows = self.worklist.db.fetchall(
            f"SELECT partition, name FROM worklist_items WHERE NOT deleted AND {where}"
            " ORDER BY partition, name",
            params,
        )
        return [ItemKey(p, n) for p, n in rows]

    def find_by_patient(self, patient_id: str, issuer: str | None = None) -> list[ItemKey]:
        if issuer:
            return self._keys("patient_id = %s AND issuer IN ('', %s)", (patient_id, issuer))
        return self._keys("patient_id = %s", (patient_id,))

    def find_by_order(self, values: dict[str, Any]) -> list[ItemKey]:
        """As the index's look-up: the step ID (`*`: any) and any one of the order's other
        identifiers, read from the database (the index may lag another bridge's change)."""
        step_id = values.get("ScheduledProcedureStepID", "")
        if not step_id:
            return []
        given = [
            (column, values[keyword])
            for keyword, column in _ORDER_COLUMNS
            if isinstance(values.get(keyword), str) and values.get(keyword)
        ]
        if not given:
            return []
        where = "(" + " OR ".join(f"{column} = %s" for column, _ in given) + ")"
        params: list[Any] = [value for _, value in given]
        if step_id != "*":
            where += " AND sps_id = %s"
            params.append(step_id)
        rows = self.worklist.db.fetchall(
            "SELECT partition, name, data FROM worklist_items WHERE NOT deleted AND "
            + where
            + " ORDER BY partition, name",
            tuple(params),
        )
        requested = values.get("RequestedProcedureID") or ""
        found = []
        for partition, name, data in rows:
            if requested:
                try:
                    record = record_of(bytes(data))
                except StoreError:
                    continue
                if record_text(record.get(REQUESTED_PROCEDURE_ID)) != requested:
                    continue
            found.append(ItemKey(partition, name))
        return found

    def find_by_study_and_step(self, study_uid: str, sps_id: str) -> list[ItemKey]:
        """The items of a Study Instance UID and (first) step ID: how an MPPS finds its item."""
        return self._keys("study_uid = %s AND sps_id = %s", (study_uid, sps_id))

    def find_by_accession(self, accession: str) -> list[ItemKey]:
        return self._keys("accession = %s", (accession,))

    def items_of_patient(
        self, patient_id: str, issuer: str | None = None
    ) -> list[tuple[Path, Dataset]]:
        """(virtual path, Dataset) of a patient's items, from the database."""
        out = []
        for key in self.find_by_patient(patient_id, issuer):
            try:
                item = self.dataset(key)
            except StoreError as exc:
                log.warning("cannot read worklist item %s: %s", key.identity, exc)
                continue
            if item is not None:
                out.append((self.path_of(key), item))
        return out

    def scan(self) -> Iterator[tuple[ItemKey, Record]]:
        for row_key, stored in self.worklist.scan():
            key = self._protocol_key(row_key)
            try:
                record = stored.record
            except StoreError as exc:
                log.warning("worklist item %s not served: %s", key.identity, exc)
                continue
            self._mark(key, stored.seq)
            yield key, record

    def watch(self, callback: Callable[[StorageChange], None], reactor: Any = None) -> None:
        """Other bridges' changes (after the last scan) to `callback`, on the reactor thread
        (`reactor.callFromThread`; in the listener's thread without a reactor)."""

        def changed(_kind: str, row_key: ItemKey, stored: PgStoredItem | None) -> None:
            key = self._protocol_key(row_key)
            record = None
            if stored is not None:
                try:
                    record = stored.record  # read here, off the reactor thread
                except StoreError as exc:
                    log.warning("worklist item %s not served: %s", key.identity, exc)
            seq = stored.seq if stored is not None else self.worklist._listener.last_seq
            with self._applied_lock:
                self._queued += 1
            if reactor is None:
                self._deliver(callback, key, record, seq)
            else:
                reactor.callFromThread(self._deliver, callback, key, record, seq)

        self.worklist.watch(changed)

    def _deliver(
        self, callback: Callable[[StorageChange], None], key: ItemKey, record: Any, seq: int
    ) -> None:
        try:
            with self._applied_lock:
                if self._applied.get(key, 0) >= seq:
                    return  # this bridge has applied a newer version of the item already
                if record is None:
                    self._applied.pop(key, None)  # later deliveries have higher numbers
                else:
                    self._applied[key] = seq
            callback(StorageChange(key, record))
        finally:
            with self._applied_lock:
                self._queued = max(0, self._queued - 1)  # (a direct call was never queued)
                if self._queued == 0:
                    self._prune_applied()
            with self._delivered:
                self.delivered_seq = max(self.delivered_seq, seq)
                self._delivered.notify_all()

    def wait_delivered(self, seq: int, timeout: float) -> bool:
        """Until every change up to number `seq` was delivered (read-your-writes for a reader
        that follows another process's writes: a DICOM worker); False after `timeout`."""
        if self.delivered_seq >= seq:
            return True
        with self._delivered:
            return self._delivered.wait_for(lambda: self.delivered_seq >= seq, timeout)

    def _prune_applied(self) -> None:
        """Forget change numbers no delivery can be older than (under `_applied_lock`, with no
        delivery queued): every later one reads rows after the listener's last number. At
        most once a second, so a busy stream does not walk the whole map each change."""
        listener = self.worklist._listener
        now = time.monotonic()
        if listener is None or now - self._pruned_at < 1.0:
            return
        self._pruned_at = now
        watermark = listener.last_seq
        self._applied = {key: seq for key, seq in self._applied.items() if seq >= watermark}

    def _mark(self, key: ItemKey, seq: int) -> None:
        pending = self._pending_marks
        if pending is not None and pending[0] == threading.get_ident():
            pending[1].append((key, seq))  # applied once the change() committed
            return
        with self._applied_lock:
            if seq > self._applied.get(key, 0):
                self._applied[key] = seq
            if len(self._applied) > APPLIED_PRUNE_SIZE and self._queued == 0:
                self._prune_applied()

    def stop_watching(self) -> None:
        self.worklist.stop_watching()

    @property
    def listener(self) -> Any:
        return self.worklist._listener

    # ---- expiry and housekeeping

    def expired(self, max_age: float, finished_statuses: tuple[str, ...]) -> list[ItemKey]:
        return [self._protocol_key(k) for k in self.worklist.expired(max_age, finished_statuses)]

    def delete_if_expired(self, key: ItemKey, max_age: float) -> bool:
        removed = self.worklist.delete_if_expired(self._row_key(key), max_age)
        if removed:
            self._mark(key, self.worklist.last_seq)
        return removed


READ_YOUR_WRITES_WAIT = 2.0  # seconds a C-FIND waits for a change the main process committed


def follow_in_worker(settings: Settings, index: Any, committed: Any) -> Callable[[], None]:
    """A DICOM worker's index on a PostgreSQL store: loaded from the database, kept in step by
    the worker's own change stream (on the listener's thread: the index locks itself). Returns
    the worker's `sync_now`: before a C-FIND, wait until the worker has applied every change
    the main process committed so far (`committed.value`, a shared change number the main
    process sets before each ACK), so a C-FIND after an ACK finds the order."""
    storage = PostgresStorage(settings)
    storage.prepare()
    index.load_records(
        ((storage.path_of(key), record) for key, record in storage.scan()),
        [storage.own_partition],
    )

    def apply(change: StorageChange) -> None:
        path = storage.path_of(change.key)
        if change.record is None:
            index.discard(path)
        else:
            index.put_record(path, change.record)

    storage.watch(apply)

    def sync_now() -> None:
        target = committed.value if committed is not None else 0
        if not storage.wait_delivered(target, READ_YOUR_WRITES_WAIT):
            log.warning("C-FIND answered before change %d reached this DICOM worker", target)

    return sync_now


class RoundLock:
    """A session advisory lock on a connection of its own: one bridge at a time runs a
    housekeeping round or an expiry sweep (the others skip that round). The changes of a
    round still go one by one through the worklist service; the lock only spares the other
    bridges the same work."""

    def __init__(self, url: str, lock: int) -> None:
        self.url = url
        self.lock = lock
        self._db: Database | None = None

    def try_acquire(self) -> bool:
        """Whether this bridge now holds the lock (False: another does). StoreUnavailable
        when the database cannot be reached."""
        self.release()
        db = Database(self.url)
        try:
            conn = db._connection()
            got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (self.lock,)).fetchone()[0])
            conn.commit()
        except psycopg.Error as exc:
            db.close()
            raise StoreUnavailable(f"store unavailable: {redacted(self.url)}: {exc}") from exc
        except StoreError:
            db.close()
            raise
        if got:
            self._db = db
        else:
            db.close()
        return got

    def release(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()  # ending the session releases the lock


class ItemFiles:
    """The folder-shaped view of a PostgreSQL worklist for callers that name items by path
    (WorklistStore's read, expired, delete_if_expired, folder): each is a database call."""

    def __init__(self, storage: PostgresStorage) -> None:
        self.storage = storage
        self.root = storage.root
        self.folder = storage.path_of(ItemKey(storage.own_partition, "x")).parent

    def prepare(self) -> list[Path]:
        return []

    def read(self, path: Path) -> Dataset | None:
        return self.storage.dataset(self.storage.key_of(path))

    def expired(self, max_age: float, finished_statuses: tuple[str, ...]) -> list[Path]:
        found = self.storage.expired(max_age, finished_statuses)
        return [self.storage.path_of(key) for key in found]

    def delete_if_expired(self, path: Path, max_age: float) -> bool:
        return self.storage.delete_if_expired(self.storage.key_of(path), max_age)
