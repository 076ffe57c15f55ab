"""Worklist items in PostgreSQL, and the stream of the changes other bridges make.

An item is a row: its Part 10 bytes plus the columns look-ups need. Its key is (partition, name):
the partition is the called AE title in the per-ae layout ('' otherwise), the name the folder
store's file name for the identity (a hash), so a folder imported with `wlbridge import` keeps
its items' keys and later messages of those orders find them.

Writes: one transaction per change, under an advisory lock per order, committed before
returning; the same transaction bumps the row's change sequence and sends a NOTIFY. A deleted
item stays as a tombstone (no bytes) so a bridge that was away sees the delete when it catches
up. Sequence numbers are taken under one more advisory lock held until the commit, so they are
committed in order: a catch-up read of `seq > last seen` never skips a change that committed
late with a smaller number.
The stream skips this writer's own rows (its index has them); a write that failed with its
connection may have committed all the same, so its keys are read again once the listener is
connected (`Uncertain`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from pydicom import dcmread

from bridge.dicom.matching import (
    ACCESSION_NUMBER,
    ISSUER_OF_PATIENT_ID,
    PATIENT_ID,
    SPS_ID,
    SPS_SEQUENCE,
    SPS_STATUS,
    STUDY_INSTANCE_UID,
    Record,
    record_from_dataset,
)
from bridge.dicom.wlfile import record_from_bytes
from bridge.storage.postgres.connection import Database, StoreUnavailable, connect
from bridge.storage.postgres.schema import require_current
from bridge.storage.protocol import ItemKey  # the protocol's key (identity: see item_name)
from bridge.storage.store import StoreError

log = logging.getLogger("bridge.storage.postgres")

CHANNEL = "wlbridge_changes"
SEQUENCE_LOCK = 0x77_6C_73_71  # "wlsq": held from taking a change number until the commit
PLACER_ORDER = 0x00402016  # Placer Order Number / Imaging Service Request
FILLER_ORDER = 0x00402017  # Filler Order Number / Imaging Service Request
NAME_PREFIX = "name:"  # an identity that is a stored name: items imported from a folder
STORED_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # safe as a file name in `export`
MAX_NOTIFY_IDENTITY = 1000  # longer identities are left out of the payload (limit: 8000 bytes)
BATCH = 1000  # rows per read of scan() and the catch-up


@dataclass
class StoredItem:
    """An item as stored: its Part 10 bytes; `record` is the index record read from them."""

    data: bytes
    seq: int = 0

    @property
    def record(self) -> Record:
        return record_of(self.data)


ChangeCallback = Callable[[str, ItemKey, StoredItem | None], None]


def item_name(identity: str) -> str:
    """The stored name of an identity: the folder store's file name (without .wl)."""
    if identity.startswith(NAME_PREFIX):
        name = identity[len(NAME_PREFIX) :]
        if not STORED_NAME.match(name) or name.strip(".") == "":
            raise StoreError(f"not a stored item name: {name[:80]!r}")
        return name
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def record_of(data: bytes) -> Record:
    record = record_from_bytes(data)
    if record is None:  # something the short reader leaves to pydicom
        try:
            record = record_from_dataset(dcmread(io.BytesIO(data), stop_before_pixels=True))
        except Exception as exc:  # pydicom raises many types on damaged bytes
            raise StoreError(f"not a readable worklist item: {exc}") from exc
    return record


def record_text(value: Any) -> str:
    """A record value as one string (the first of several; '' for anything else)."""
    if isinstance(value, tuple):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ""


def columns_of(data: bytes) -> dict[str, str]:
    """The look-up columns of an item (the first scheduled step's ID and status)."""
    return columns_of_record(record_of(data))


def columns_of_record(record: Record) -> dict[str, str]:
    """The look-up columns of an item's record."""
    steps = record.get(SPS_SEQUENCE) or ()
    step = steps[0] if steps and isinstance(steps[0], Record) else None
    return {
        "patient_id": record_text(record.get(PATIENT_ID)),
        "issuer": record_text(record.get(ISSUER_OF_PATIENT_ID)),
        "accession": record_text(record.get(ACCESSION_NUMBER)),
        "placer": record_text(record.get(PLACER_ORDER)),
        "filler": record_text(record.get(FILLER_ORDER)),
        "study_uid": record_text(record.get(STUDY_INSTANCE_UID)),
        "sps_id": record_text(step.get(SPS_ID)) if step is not None else "",
        "status": record_text(step.get(SPS_STATUS)) if step is not None else "",
    }


def _lock_statement(key: ItemKey) -> tuple[str, tuple]:
    lock_name = f"{key.partition}/{item_name(key.identity)}"
    return "SELECT pg_advisory_xact_lock(hashtext(%s))", (lock_name,)


def _lock_order(cursor: psycopg.Cursor, key: ItemKey) -> None:
    cursor.execute(*_lock_statement(key))


def _read_statement(key: ItemKey) -> tuple[str, tuple]:
    return (
        "SELECT data, seq FROM worklist_items WHERE partition = %s AND name = %s AND NOT deleted",
        (key.partition, item_name(key.identity)),
    )


# The upsert and its NOTIFY in one statement (one round trip fewer a change).
UPSERT = (
    "WITH written AS ("
    "INSERT INTO worklist_items (partition, name, identity, data, deleted,"
    " patient_id, issuer, accession, placer, filler, study_uid, sps_id, status,"
    " seq, origin)"
    " VALUES (%(partition)s, %(name)s, %(identity)s, %(data)s, false,"
    " %(patient_id)s, %(issuer)s, %(accession)s, %(placer)s, %(filler)s,"
    " %(study_uid)s, %(sps_id)s, %(status)s, nextval('worklist_change_seq'),"
    " %(origin)s)"
    " ON CONFLICT (partition, name) DO UPDATE SET"
    " identity = CASE WHEN EXCLUDED.identity LIKE 'name:%%'"
    "   THEN worklist_items.identity ELSE EXCLUDED.identity END,"
    " data = EXCLUDED.data, deleted = false, patient_id = EXCLUDED.patient_id,"
    " issuer = EXCLUDED.issuer, accession = EXCLUDED.accession,"
    " placer = EXCLUDED.placer, filler = EXCLUDED.filler,"
    " study_uid = EXCLUDED.study_uid, sps_id = EXCLUDED.sps_id,"
    " status = EXCLUDED.status, seq = EXCLUDED.seq, origin = EXCLUDED.origin,"
    " updated_at = now()"
    " RETURNING seq)"
    " SELECT seq, pg_notify(%(channel)s, json_strip_nulls(json_build_object("
    "'seq', seq, 'kind', 'put', 'partition', %(partition)s::text,"
    " 'origin', %(origin)s::text, 'identity', %(notified)s::text))::text)"
    " FROM written"
)


def _notify(cursor: psycopg.Cursor, kind: str, key: ItemKey, seq: int, origin: str) -> None:
    payload = {"seq": seq, "kind": kind, "partition": key.partition, "origin": origin}
    if len(key.identity) <= MAX_NOTIFY_IDENTITY:
        payload["identity"] = key.identity
    cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(payload)))


class PostgresWorklist:
    """The worklist items of one bridge's store object (its own `origin` in the change stream)."""

    def __init__(self, dsn: str, origin: str | None = None) -> None:
        self.dsn = dsn
        self.db = Database(dsn)
        self.origin = origin or uuid.uuid4().hex
        self.scanned_seq = 0  # the change number the last scan() started from
        self.last_seq = 0  # the change number of this object's last put or delete
        self._open = threading.local()  # the batch of an open change(), its locks and reads
        self._listener: ChangeListener | None = None
        # Keys of writes that failed with the connection: their COMMIT may have gone through
        # all the same (the answer was lost), and the change stream skips this writer's own
        # rows. The listener reads them again once it is connected (`Uncertain`).
        self.uncertain = Uncertain()

    def prepare(self) -> None:
        """StoreUnavailable when the database cannot be reached; StoreError when its schema
        is not this wlbridge's (the message names `wlbridge db upgrade`)."""
        require_current(self.db)

    def close(self) -> None:
        self.stop_watching()
        self.db.close()

    # -- changes -------------------------------------------------------------------------

    @contextmanager
    def change(
        self, key: ItemKey, also: Sequence[tuple[str, Any]] = ()
    ) -> Iterator[list[tuple | None]]:
        """Serialise a read-modify-write of one order with every other bridge: get/put/delete
        inside the block run in one transaction under the order's lock, committed at the end
        (an ACK follows the block, never comes from inside it).

        Two round trips for a change that reads and writes its order: BEGIN, the lock and
        the read of the row in one (the read is its own statement after the lock, so it sees
        what the lock's previous holder committed); the writes go with the COMMIT. The block
        gets the first row (or None) of each `also` statement, run after the read."""
        if getattr(self._open, "batch", None) is not None:
            raise StoreError("change() blocks do not nest")
        first = [_lock_statement(key), _read_statement(key), *also]
        written: set[ItemKey] = set()
        try:
            with self.db.batched_transaction(first) as (batch, cursors):
                row = cursors[1].fetchone()
                rows = [cursor.fetchone() for cursor in cursors[2:]]
                self._open.batch = batch
                self._open.locked = {key}
                self._open.read = {key: StoredItem(bytes(row[0]), row[1]) if row else None}
                self._open.numbered = False
                self._open.written = written
                try:
                    yield rows
                finally:
                    self._open.batch = None
                    self._open.locked = set()
                    self._open.read = {}
                    self._open.written = None
        except Exception as exc:  # whatever failed, the COMMIT may have gone through
            self.uncertain.add(written, getattr(exc, "backend_pid", None))
            raise

    def on_commit(self, sql: str, params: Any = None) -> bool:
        """Send `sql` with the COMMIT of this thread's open change() (part of its transaction);
        False when no change() is open."""
        batch = getattr(self._open, "batch", None)
        if batch is None:
            return False
        batch.defer(sql, params)
        return True

    def _work(self, key: ItemKey, work: Callable[[psycopg.Cursor], Any]) -> Any:
        batch = getattr(self._open, "batch", None)
        if batch is not None:
            cursor = batch.cursor  # after the statements deferred so far
            if key not in self._open.locked:  # another key of the same change
                _lock_order(cursor, key)
                self._open.locked.add(key)
            self._open.written.add(key)
            return work(cursor)
        try:
            with self.db.transaction() as cursor:
                _lock_order(cursor, key)
                return work(cursor)
        except Exception as exc:  # whatever failed, the COMMIT may have gone through
            self.uncertain.add({key}, getattr(exc, "backend_pid", None))
            raise

    def get(self, key: ItemKey) -> StoredItem | None:
        def read(cursor: psycopg.Cursor) -> StoredItem | None:
            cursor.execute(*_read_statement(key))
            row = cursor.fetchone()
            return StoredItem(bytes(row[0]), row[1]) if row else None

        if getattr(self._open, "batch", None) is not None:
            if key in self._open.read:  # read with the lock, unchanged since
                return self._open.read[key]
            return self._work(key, read)
        with self.db.transaction() as cursor:  # a plain read takes no lock
            return read(cursor)

    def put(
        self,
        key: ItemKey,
        item: StoredItem | bytes,
        record: Record | None = None,
        numbered: Callable[[int], None] | None = None,
    ) -> int | None:
        """Store the item durably; returns its change number (`numbered(seq)` is called with
        it too). Outside a change() committed before returning; inside one the write goes
        with the change's COMMIT: then None, and `numbered` is called once it committed.
        `record`: the item's record when the caller has it (else read from the bytes)."""
        data = item.data if isinstance(item, StoredItem) else bytes(item)
        columns = columns_of_record(record) if record is not None else columns_of(data)
        params = {
            "partition": key.partition,
            "name": item_name(key.identity),
            "identity": key.identity,
            "data": data,
            "origin": self.origin,
            "channel": CHANNEL,
            "notified": key.identity if len(key.identity) <= MAX_NOTIFY_IDENTITY else None,
            **columns,
        }

        def written(seq: int) -> int:
            self.last_seq = seq
            if numbered is not None:
                numbered(seq)
            return seq

        batch = getattr(self._open, "batch", None)
        if batch is not None:
            if key not in self._open.locked:
                _lock_order(batch.cursor, key)
                self._open.locked.add(key)
            self._open.read.pop(key, None)
            if not self._open.numbered:  # held until the commit: once is enough
                batch.defer("SELECT pg_advisory_xact_lock(%s)", (SEQUENCE_LOCK,))
                self._open.numbered = True
            batch.defer(UPSERT, params, lambda row: written(row[0]))
            self._open.written.add(key)
            return None

        def write(cursor: psycopg.Cursor) -> int:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SEQUENCE_LOCK,))
            cursor.execute(UPSERT, params)
            return written(cursor.fetchone()[0])

        return self._work(key, write)

    def delete(self, key: ItemKey) -> bool:
        """Remove the item durably; False when there was none."""

        def remove(cursor: psycopg.Cursor) -> bool:
            if getattr(self._open, "batch", None) is not None:
                self._open.read.pop(key, None)
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SEQUENCE_LOCK,))
            cursor.execute(
                "UPDATE worklist_items SET deleted = true, data = NULL,"
                " seq = nextval('worklist_change_seq'), origin = %s, updated_at = now()"
                " WHERE partition = %s AND name = %s AND NOT deleted RETURNING seq",
                (self.origin, key.partition, item_name(key.identity)),
            )
            row = cursor.fetchone()
            if row is None:
                return False
            _notify(cursor, "delete", key, row[0], self.origin)
            self.last_seq = row[0]
            return True

        return self._work(key, remove)

    # -- look-ups ------------------------------------------------------------------------

    def _keys(self, where: str, params: tuple) -> list[ItemKey]:
        rows = self.db.fetchall(
            f"SELECT partition, identity FROM worklist_items WHERE NOT deleted AND {where}"
            " ORDER BY partition, name",
            params,
        )
        return [ItemKey(p, i) for p, i in rows]

    def find_by_patient(self, patient_id: str, issuer: str | None = None) -> list[ItemKey]:
        """A patient's items; with `issuer`, those of that issuer or of none."""
        if issuer:
            return self._keys("patient_id = %s AND issuer IN ('', %s)", (patient_id, issuer))
        return self._keys("patient_id = %s", (patient_id,))

    def find_by_order(
        self,
        placer: str = "",
        filler: str = "",
        accession: str = "",
        study_uid: str = "",
        sps_id: str = "",
    ) -> list[ItemKey]:
        """The items matching every identifier given (empty ones are not compared)."""
        given = {
            "placer": placer,
            "filler": filler,
            "accession": accession,
            "study_uid": study_uid,
            "sps_id": sps_id,
        }
        given = {column: value for column, value in given.items() if value}
        if not given:
            return []
        where = " AND ".join(f"{column} = %s" for column in given)  # names from the dict above
        return self._keys(where, tuple(given.values()))

    def scan(self) -> Iterator[tuple[ItemKey, StoredItem]]:
        """Every item, in batches; `scanned_seq` is then the change number to watch from (a
        change committed during the scan may be seen twice, never missed)."""
        self.scanned_seq = self.db.fetchall("SELECT coalesce(max(seq), 0) FROM worklist_items")[0][
            0
        ]
        after = ("", "")
        while True:
            rows = self.db.fetchall(
                "SELECT partition, name, identity, data, seq FROM worklist_items"
                " WHERE NOT deleted AND (partition, name) > (%s, %s)"
                " ORDER BY partition, name LIMIT %s",
                (*after, BATCH),
            )
            for partition, _name, identity, data, seq in rows:
                yield ItemKey(partition, identity), StoredItem(bytes(data), seq)
            if len(rows) < BATCH:
                return
            after = (rows[-1][0], rows[-1][1])

    def count(self) -> int:
        return self.db.fetchall("SELECT count(*) FROM worklist_items WHERE NOT deleted")[0][0]

    # -- housekeeping --------------------------------------------------------------------

    def expired(self, max_age: float, finished_statuses: tuple[str, ...]) -> list[ItemKey]:
        """Items in a finished status unchanged for `max_age` seconds."""
        return self._keys(
            "status = ANY(%s) AND updated_at < now() - make_interval(secs => %s)",
            (list(finished_statuses), max_age),
        )

    def delete_if_expired(self, key: ItemKey, max_age: float) -> bool:
        """Delete unless changed since it was found expired; another bridge doing the same
        finds nothing left to delete, so housekeeping may run on every bridge."""

        def remove(cursor: psycopg.Cursor) -> bool:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SEQUENCE_LOCK,))
            cursor.execute(
                "UPDATE worklist_items SET deleted = true, data = NULL,"
                " seq = nextval('worklist_change_seq'), origin = %s, updated_at = now()"
                " WHERE partition = %s AND name = %s AND NOT deleted"
                " AND updated_at < now() - make_interval(secs => %s) RETURNING seq",
                (self.origin, key.partition, item_name(key.identity), max_age),
            )
            row = cursor.fetchone()
            if row is not None:
                _notify(cursor, "delete", key, row[0], self.origin)
                self.last_seq = row[0]
            return row is not None

        return self._work(key, remove)

    def prune_tombstones(self, older_than: float) -> int:
        """Forget deletes older than `older_than` seconds; a bridge away for longer must scan
        again at start (it does) rather than catch up."""

        def prune(cursor: psycopg.Cursor) -> int:
            cursor.execute(
                "DELETE FROM worklist_items WHERE deleted"
                " AND updated_at < now() - make_interval(secs => %s)",
                (older_than,),
            )
            return cursor.rowcount

        return self.db.run(prune)

    # -- the change stream ---------------------------------------------------------------

    def watch(self, callback: ChangeCallback, since: int | None = None) -> ChangeListener:
        """Call `callback(kind, key, item)` ("put" with the item, "delete" with None) for each
        change other writers commit after change number `since` (default: the last scan()).
        It runs on the listener's own thread."""
        self.stop_watching()
        start = self.scanned_seq if since is None else since
        self._listener = ChangeListener(self.dsn, self.origin, callback, start, self.uncertain)
        self._listener.start()
        return self._listener

    def stop_watching(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None


UNCERTAIN_WAIT = 600.0  # seconds after which a failed write counts as settled all the same


class Uncertain:
    """The keys of writes whose outcome this writer could not learn, shared by its threads;
    each with the server process the write went to (None: none, or the connection still
    answers). Such a write is settled once that process is gone (a COMMIT it had received
    may land until then), or after UNCERTAIN_WAIT (a process number the server reused)."""

    def __init__(self) -> None:
        self._keys: dict[ItemKey, tuple[int | None, float]] = {}
        self._lock = threading.Lock()

    def add(self, keys: set[ItemKey], backend_pid: int | None = None) -> None:
        with self._lock:
            for key in keys:
                self._keys[key] = (backend_pid, time.monotonic())

    def pending(self) -> list[tuple[ItemKey, int | None, float]]:
        """(key, server process to wait for or None, when the write failed)."""
        now = time.monotonic()
        with self._lock:
            return [
                (key, pid if now - since < UNCERTAIN_WAIT else None, since)
                for key, (pid, since) in self._keys.items()
            ]

    def done(self, key: ItemKey, since: float) -> None:
        """Settled as read; unless a write of the key failed again since."""
        with self._lock:
            if key in self._keys and self._keys[key][1] == since:
                del self._keys[key]

    def __bool__(self) -> bool:
        return bool(self._keys)


class ChangeListener(threading.Thread):
    """LISTEN on a connection of its own; each notification (and each reconnect) reads every
    row changed after the last change number seen, so a notification missed while the
    connection was down loses nothing."""

    def __init__(
        self,
        dsn: str,
        origin: str,
        callback: ChangeCallback,
        since: int,
        uncertain: Uncertain | None = None,
    ) -> None:
        super().__init__(name="wlbridge-pg-listener", daemon=True)
        self.dsn = dsn
        self.origin = origin
        self.callback = callback
        self.last_seq = since
        self.uncertain = uncertain if uncertain is not None else Uncertain()
        self.connected = threading.Event()  # listening and caught up
        self.reconnects = 0
        self._stopping = threading.Event()
        self._conn: psycopg.Connection | None = None

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.join(timeout)

    @property
    def backend_pid(self) -> int | None:
        conn = self._conn
        return conn.info.backend_pid if conn is not None and not conn.closed else None

    def run(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                self._conn = connect(self.dsn, autocommit=True)
                self._conn.execute(f"LISTEN {CHANNEL}")
                self._catch_up()  # after LISTEN: nothing committed in between slips through
                self.connected.set()
                delay = 0.1
                while not self._stopping.is_set():
                    others = False
                    for notify in self._conn.notifies(timeout=0.5, stop_after=1):
                        # One wake-up may bring several; once another writer's is among them,
                        # a later one of our own must not move the number past the rows the
                        # read is about to fetch.
                        if not others:
                            others = not self._own(notify.payload)
                    if others:
                        self._catch_up()
                    elif self.uncertain:  # no notification need come: look again each tick
                        self._read_uncertain()
            except (psycopg.Error, StoreUnavailable) as exc:
                if self._stopping.is_set():
                    break
                self.connected.clear()
                self.reconnects += 1
                log.warning("change stream lost (%s); reconnecting in %.1f s", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._close()
        self.connected.clear()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _own(self, payload: str) -> bool:
        """Whether a notification is of this writer's own commit; then the change number
        moves on without a read. Safe: notifications come in commit order on one connection,
        change numbers are committed in order, and another writer's notification (or a
        reconnect) reads every row after the last number seen."""
        try:
            note = json.loads(payload)
            own = note.get("origin") == self.origin
            seq = int(note["seq"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return False  # not ours to judge: read
        if own:  # every commit numbered below it was notified (and read) before it
            self.last_seq = max(self.last_seq, seq)
        return own and not self.uncertain

    def _catch_up(self) -> None:
        while True:
            rows = self._conn.execute(
                "SELECT seq, partition, identity, deleted,"
                " CASE WHEN origin = %s THEN NULL ELSE data END, origin FROM worklist_items"
                " WHERE seq > %s ORDER BY seq LIMIT %s",
                (self.origin, self.last_seq, BATCH),
            ).fetchall()
            for seq, partition, identity, deleted, data, origin in rows:
                self.last_seq = seq
                if origin == self.origin:
                    continue  # our own write: the index already has it
                key = ItemKey(partition, identity)
                item = None if deleted else StoredItem(bytes(data), seq)
                try:
                    self.callback("delete" if deleted else "put", key, item)
                except Exception:  # one bad callback must not stop the stream
                    log.exception("change callback failed for %s", key)
            if len(rows) < BATCH:
                break
        self._read_uncertain()

    def _read_uncertain(self) -> None:
        """Deliver the rows of this writer's failed writes as they are now, once each write is
        settled: one whose COMMIT went through is applied (skipped where the index has it
        already). The change number stays: rows after it may not have been read yet."""
        pending = self.uncertain.pending()
        if not pending:
            return
        pids = sorted({pid for _key, pid, _since in pending if pid is not None})
        alive = set()
        if pids:
            rows = self._conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchall()
            alive = {pid for (pid,) in rows}
        for key, pid, since in pending:
            if pid in alive:
                continue  # its server process may still commit it: next time
            row = self._conn.execute(
                "SELECT seq, deleted, data FROM worklist_items WHERE partition = %s AND name = %s",
                (key.partition, item_name(key.identity)),
            ).fetchone()
            self.uncertain.done(key, since)
            if row is None:
                continue  # never committed
            seq, deleted, data = row
            item = None if deleted else StoredItem(bytes(data), seq)
            try:
                self.callback("delete" if deleted else "put", key, item)
            except Exception:
                log.exception("change callback failed for %s", key)
