"""MPPS instances in PostgreSQL: the same calls as the folder's MPPSStore
(bridge.storage.mpps_store), shared by every bridge (an N-SET may reach another bridge than its
N-CREATE). Nothing is cached: every call reads the table, so an instance another bridge stored
is seen at once. A call that cannot reach the database raises StoreUnavailable (the MPPS is
answered 0110)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from pydicom import Dataset, dcmread

from bridge.storage.mpps_instance import (
    FINISHED,
    REMOVED_FINISHED,
    REMOVED_IN_PROGRESS,
    Known,
    Retention,
    encode_instance,
)
from bridge.storage.postgres.connection import Database, redacted

# The class of the instances' advisory locks: two-key locks, a key space apart from the
# worklist's one-key order locks.
INSTANCE_LOCK_CLASS = 0x6D707073  # "mpps"
MPPS_SWEEP_LOCK = 0x77_6C_6D_70  # "wlmp": one bridge at a time runs an MPPS retention sweep
SWEEP_BATCH = 1000  # rows removed per transaction: short ones, beside the N-SETs' locks


class PostgresMPPSStore:
    def __init__(self, dsn: str) -> None:
        self.db = Database(dsn)
        self.url = dsn
        self.folder = redacted(dsn)  # where the instances are, for the log at start
        self._sweep_db: Database | None = None  # the sweep's own connection

    def close(self) -> None:
        self.db.close()
        if self._sweep_db is not None:
            self._sweep_db.close()

    def remove_expired(self, retention: Retention) -> Counter[str]:
        """Delete the instances past their retention (by updated_at, the last change, on the
        database's clock), in short transactions on a connection of its own, so the MPPS
        handlers never wait behind a sweep. A row an N-SET holds is skipped (SKIP LOCKED):
        it is being changed. Returns the removals by kind (finished, in-progress)."""
        if self._sweep_db is None:
            self._sweep_db = Database(self.url)
        removed: Counter[str] = Counter()

        def batch(cursor: psycopg.Cursor) -> int:
            cursor.execute(
                "DELETE FROM mpps_instances WHERE uid IN (SELECT uid FROM mpps_instances"
                " WHERE CASE WHEN status = ANY(%s)"
                " THEN updated_at < now() - make_interval(secs => %s)"
                " ELSE updated_at < now() - make_interval(secs => %s) END"
                " LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING status",
                (list(FINISHED), retention.finished, retention.in_progress, SWEEP_BATCH),
            )
            rows = cursor.fetchall()
            for (status,) in rows:
                removed[REMOVED_FINISHED if status in FINISHED else REMOVED_IN_PROGRESS] += 1
            return len(rows)

        while self._sweep_db.run(batch) == SWEEP_BATCH:
            pass
        return removed

    @contextmanager
    def locked(self, uid: str) -> Iterator[None]:
        """The instance's check and write as one step across bridges: the calls inside the
        block run in one transaction under the instance's lock, committed when it ends (a
        retried N-CREATE, or N-SETs sent to two bridges, are applied one after the other)."""
        with self.db.transaction() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (INSTANCE_LOCK_CLASS, uid)
            )
            yield

    def load(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return self.db.fetchall("SELECT count(*) FROM mpps_instances")[0][0]

    def __contains__(self, uid: str) -> bool:
        return self.status(uid) is not None

    def status(self, uid: str) -> str | None:
        rows = self.db.fetchall("SELECT status FROM mpps_instances WHERE uid = %s", (uid,))
        return rows[0][0] if rows else None

    def get(self, uid: str) -> Dataset | None:
        rows = self.db.fetchall("SELECT data FROM mpps_instances WHERE uid = %s", (uid,))
        return dcmread(io.BytesIO(bytes(rows[0][0]))) if rows else None

    def put(self, uid: str, dataset: Dataset) -> None:
        """Store the instance (replacing an earlier version), committed before returning."""
        data = encode_instance(uid, dataset)

        def upsert(cursor: psycopg.Cursor) -> None:
            cursor.execute(
                "INSERT INTO mpps_instances (uid, status, patient_id, issuer, data)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (uid) DO UPDATE SET"
                " status = EXCLUDED.status, patient_id = EXCLUDED.patient_id,"
                " issuer = EXCLUDED.issuer, data = EXCLUDED.data, updated_at = now()",
                (
                    uid,
                    str(dataset.get("PerformedProcedureStepStatus", "")),
                    str(dataset.get("PatientID", "")),
                    str(dataset.get("IssuerOfPatientID", "")),
                    data,
                ),
            )

        self.db.run(upsert)

    def of_patient(self, patient_id: str, issuer: str = "") -> list[str]:
        if issuer:
            rows = self.db.fetchall(
                "SELECT uid FROM mpps_instances WHERE patient_id = %s AND issuer IN ('', %s)"
                " ORDER BY uid",
                (patient_id, issuer),
            )
        else:
            rows = self.db.fetchall(
                "SELECT uid FROM mpps_instances WHERE patient_id = %s ORDER BY uid",
                (patient_id,),
            )
        return [uid for (uid,) in rows]

    def stored(self, uid: str) -> tuple[Dataset, float] | None:
        """The instance and when it was stored (seconds since the epoch), or None."""
        rows = self.db.fetchall(
            "SELECT data, extract(epoch FROM updated_at)::float8 FROM mpps_instances"
            " WHERE uid = %s",
            (uid,),
        )
        if not rows:
            return None
        return dcmread(io.BytesIO(bytes(rows[0][0])), stop_before_pixels=True), rows[0][1]

    def stored_times(self, uids: list[str]) -> dict[str, float]:
        rows = self.db.fetchall(
            "SELECT uid, extract(epoch FROM updated_at)::float8 FROM mpps_instances"
            " WHERE uid = ANY(%s)",
            (list(uids),),
        )
        return dict(rows)

    def snapshot(self) -> dict[str, Known]:
        """UID -> status and patient of every instance (one query), for the HTTP listings."""
        rows = self.db.fetchall("SELECT uid, status, patient_id, issuer FROM mpps_instances")
        return {uid: Known(status, patient, issuer) for uid, status, patient, issuer in rows}
