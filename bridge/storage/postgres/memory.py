"""What every bridge must know of the messages any bridge answered: the retry memory of
recent control IDs (a retry sent to the other bridge is still recognised) and the kept
rejected messages (listed, shown and replayed by any bridge: the HTTP API, `wlbridge replay`).

A message replayed and accepted leaves `rejected_messages` for `replayed_messages`, which
names it by its copy key (control ID and digest prefix, as the folders' file names end): each
bridge moves its own folder copies of it to `replayed/` (bridge.ops.rejected_copies), and a
copy replayed from a folder finishes the row of the same key."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from bridge.storage.postgres.connection import Database, connect
from bridge.storage.store import StoreError

RECENT_MESSAGES = 10_000  # as the pipeline's in-memory memory
RECENT_HOURS = 24.0
KEPT_REJECTED = 10_000
REPLAYED_DAYS = 7.0  # how long a replay is remembered for the folders' copies to follow it
COUNT_TIMEOUT_MS = 2_000  # a statement of the metrics or the folders' reconciliation gives up
# The advisory lock class of a replay (two-key form: (class, row id)); held by the session that
# replays a row, so a second replay of it, from any bridge or tool, is refused meanwhile.
REPLAY_LOCK_CLASS = 0x776C_7270  # "wlrp"
# A row's name: as the folder's (time, control ID, then an id); `r<id>` where the folder has
# the first 8 hex digits of the digest, so the two kinds of names never match each other.
ROW_NAME = re.compile(r"^[0-9]{8}T[0-9]{12}-[A-Za-z0-9_-]*-r([0-9]{1,18})$")


class RetryMemory:
    """lookup(key) -> (digest, ack) of the answer given to a control ID, on any bridge."""

    def __init__(self, dsn: str, keep: int = RECENT_MESSAGES, hours: float = RECENT_HOURS) -> None:
        # its own session, whose commits do not wait for the disk (see remember())
        self.db = Database(dsn, settings={"synchronous_commit": "off"})
        self.keep = keep
        self.hours = hours

    def close(self) -> None:
        self.db.close()

    def lookup(self, key: str) -> tuple[str, bytes] | None:
        rows = self.db.fetchall(*self.lookup_statement(key))
        return self.answer_of(rows[0] if rows else None)

    @staticmethod
    def lookup_statement(key: str) -> tuple[str, tuple]:
        """The statement lookup() runs; the pipeline sends it in the first round trip of an
        order's change, under the order's lock (answer_of reads its row)."""
        return "SELECT digest, ack FROM recent_messages WHERE key = %s", (key,)

    @staticmethod
    def answer_of(row: tuple | None) -> tuple[str, bytes] | None:
        return (row[0], bytes(row[1])) if row else None

    def remember(self, key: str, digest: str, ack: bytes) -> None:
        """Committed before returning: the ACK it remembers is sent after it, and every bridge
        sees it from then on. Not waiting for the disk (synchronous_commit off for this one
        transaction, which saves a flush per message): a database crash may forget the last
        answers of a fraction of a second, and a retry of one of those is then evaluated
        afresh (the worklist change it answered is durable, and applying it again is a
        no-op for the item)."""
        self.db.execute(*self.statement(key, digest, ack))

    @staticmethod
    def statement(key: str, digest: str, ack: bytes) -> tuple[str, tuple]:
        """The statement that remembers an answer: what remember() runs, and what the
        pipeline sends with the COMMIT of an order's change (the answer then is exactly as
        durable as the change, and costs no round trip of its own)."""
        return (
            "INSERT INTO recent_messages (key, digest, ack) VALUES (%s, %s, %s)"
            " ON CONFLICT (key) DO UPDATE SET digest = EXCLUDED.digest,"
            " ack = EXCLUDED.ack, at = now()",
            (key, digest, ack),
        )

    def prune(self) -> int:
        """Forget answers older than `hours`, and all but the newest `keep`."""

        def prune(cursor: psycopg.Cursor) -> int:
            cursor.execute(
                "DELETE FROM recent_messages WHERE at < now() - make_interval(secs => %s)"
                " OR key IN (SELECT key FROM recent_messages ORDER BY at DESC OFFSET %s)",
                (self.hours * 3600, self.keep),
            )
            return cursor.rowcount

        return self.db.run(prune)

    def __len__(self) -> int:
        return self.db.fetchall("SELECT count(*) FROM recent_messages")[0][0]


class RejectedMessages:
    """Refused messages kept byte for byte with their reason; a retry of the same bytes is
    one row whose reason says the latest answer."""

    def __init__(self, dsn: str, keep: int = KEPT_REJECTED) -> None:
        self.db = Database(dsn)
        # The metrics' count and the folders' reconciliation (worker threads) have a session
        # of their own: they never hold up the one the pipeline keeps messages with (on the
        # reactor thread), and give up after COUNT_TIMEOUT_MS.
        self.background = Database(dsn, settings={"statement_timeout": str(COUNT_TIMEOUT_MS)})
        self.keep = keep

    def close(self) -> None:
        self.db.close()
        self.background.close()

    def keep_message(self, raw: bytes, control_id: str, reason: str) -> int:
        digest = hashlib.sha256(raw).hexdigest()

        def upsert(cursor: psycopg.Cursor) -> int:
            cursor.execute(
                "INSERT INTO rejected_messages (digest, control_id, data, reason)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (digest) DO UPDATE"
                " SET reason = EXCLUDED.reason, updated_at = now() RETURNING id",
                (digest, control_id, raw, reason),
            )
            kept = cursor.fetchone()[0]
            cursor.execute(
                "DELETE FROM rejected_messages WHERE id IN"
                " (SELECT id FROM rejected_messages ORDER BY id DESC OFFSET %s)",
                (self.keep,),
            )
            return kept

        return self.db.run(upsert)

    def list(self) -> list[tuple[int, str, str, bytes]]:
        """(id, control id, reason, bytes), oldest first."""
        rows = self.db.fetchall(
            "SELECT id, control_id, reason, data FROM rejected_messages ORDER BY id"
        )
        return [(i, c, r, bytes(d)) for i, c, r, d in rows]

    def count(self) -> tuple[int, int]:
        """(rows kept, of which received today (UTC))."""
        rows = self.db.fetchall(
            "SELECT count(*), count(*) FILTER (WHERE received_at >= date_trunc('day', now()"
            " AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') FROM rejected_messages"
        )
        return int(rows[0][0]), int(rows[0][1])

    def pending_count(self) -> int:
        """The rows kept (what /api/rejected lists), counted up to `keep` (the most the table
        holds), on the background session: bounded work, StoreError after COUNT_TIMEOUT_MS."""
        rows = self.background.fetchall(
            "SELECT count(*) FROM (SELECT 1 FROM rejected_messages LIMIT %s) AS kept",
            (self.keep,),
        )
        return int(rows[0][0])

    def replayed(self, keys: list[str]) -> dict[str, datetime]:
        """Of these copy keys, those replayed and accepted: key -> when (the latest)."""
        found: dict[str, datetime] = {}
        for start in range(0, len(keys), 1000):
            rows = self.background.fetchall(
                "SELECT copy_key, max(replayed_at) FROM replayed_messages"
                " WHERE copy_key = ANY(%s) GROUP BY copy_key",
                (keys[start : start + 1000],),
            )
            found.update((key, at) for key, at in rows)
        return found

    def finish_copies(self, copies: list[tuple[str, datetime]]) -> list[str]:
        """Copies replayed from a folder (copy key, when): the rows of the same key kept no
        later than that (a later refusal of the same message stays) are replayed. Returns the
        keys of the rows finished."""
        if not copies:
            return []

        def finish(cursor: psycopg.Cursor) -> list[str]:
            cursor.execute(
                "WITH done AS (DELETE FROM rejected_messages AS r"
                " USING unnest(%s::text[], %s::timestamptz[]) AS c(key, at)"
                f" WHERE left(r.digest, 8) = right(c.key, 8) AND {_COPY_KEY} = c.key"
                " AND r.updated_at <= c.at RETURNING r.digest, c.key)"
                " INSERT INTO replayed_messages (digest, copy_key) SELECT digest, key FROM done"
                " ON CONFLICT (digest) DO UPDATE SET copy_key = EXCLUDED.copy_key,"
                " replayed_at = EXCLUDED.replayed_at RETURNING copy_key",
                ([key for key, _ in copies], [at for _, at in copies]),
            )
            return [row[0] for row in cursor.fetchall()]

        return self.background.run(finish)

    def prune_replayed(self, days: float = REPLAYED_DAYS) -> int:
        """Forget replays older than `days` (their copies have long followed), and all but
        the newest `keep`."""

        def prune(cursor: psycopg.Cursor) -> int:
            cursor.execute(
                "DELETE FROM replayed_messages"
                " WHERE replayed_at < now() - make_interval(secs => %s) OR digest IN"
                " (SELECT digest FROM replayed_messages ORDER BY replayed_at DESC OFFSET %s)",
                (days * 86400, self.keep),
            )
            return cursor.rowcount

        return self.db.run(prune)

    def entries(self, limit: int) -> list[KeptRow]:
        """The newest `limit` rows, newest first, without their bytes (their size only)."""
        rows = self.db.fetchall(
            "SELECT id, control_id, reason, octet_length(data), received_at"
            " FROM rejected_messages ORDER BY id DESC LIMIT %s",
            (limit,),
        )
        return [KeptRow(*row) for row in rows]

    def entry(self, name: str, max_bytes: int) -> tuple[KeptRow, bytes] | None:
        """The row `name` names and its first `max_bytes` bytes, or None."""
        name = name.removesuffix(".hl7")
        row_id = row_id_of(name)
        if row_id is None:
            return None
        rows = self.db.fetchall(
            "SELECT id, control_id, reason, octet_length(data), received_at,"
            " substring(data FROM 1 FOR %s) FROM rejected_messages WHERE id = %s",
            (max_bytes, row_id),
        )
        if not rows or rows[0][0] is None or KeptRow(*rows[0][:5]).name != name:
            return None
        return KeptRow(*rows[0][:5]), bytes(rows[0][5])

    def claim(self, name: str, max_bytes: int) -> Replay:
        """The row `name` names, locked for one replay on its own session (the lock is the
        session's, so it goes with a crash). ReplayRefused when another replay holds it, when
        no row has that name (replayed, removed) or it is larger than `max_bytes`."""
        name = name.removesuffix(".hl7")
        row_id = row_id_of(name)
        if row_id is None:
            raise ReplayRefused(404, f"no kept message {name}")
        conn = connect(self.db.dsn, autocommit=True)
        try:
            locked = conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (REPLAY_LOCK_CLASS, _lock_key(row_id))
            ).fetchone()[0]
            if not locked:
                raise ReplayRefused(
                    409, f"{name} is being replayed right now (by another bridge or tool)"
                )
            # read after the lock: a replay that finished meanwhile has removed the row
            row = conn.execute(
                "SELECT id, control_id, reason, octet_length(data), received_at,"
                " CASE WHEN octet_length(data) <= %s THEN data END"
                " FROM rejected_messages WHERE id = %s",
                (max_bytes, row_id),
            ).fetchone()
            if row is None or KeptRow(*row[:5]).name != name:
                raise ReplayRefused(
                    404, f"no kept message {name}: replayed already, or no longer kept"
                )
            if row[5] is None:
                raise ReplayRefused(413, f"{name} is larger than {max_bytes} bytes")
            return Replay(conn, row_id, bytes(row[5]))
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot read the kept message {name}: {_first_line(exc)}") from exc
        except BaseException:
            conn.close()
            raise


@dataclass(frozen=True)
class KeptRow:
    id: int
    control_id: str
    reason: str
    size: int
    received_at: datetime

    @property
    def name(self) -> str:
        stamp = self.received_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%f")
        control = re.sub(r"[^A-Za-z0-9_-]", "_", self.control_id)[:32]
        return f"{stamp}-{control or 'unknown'}-r{self.id}"


class ReplayRefused(Exception):
    """A replay not begun: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Replay:
    """One claimed row: `data` to replay, then finish(accepted) once, on any thread."""

    def __init__(self, conn: psycopg.Connection, row_id: int, data: bytes) -> None:
        self.conn = conn
        self.row_id = row_id
        self.data = data

    def finish(self, accepted: bool) -> None:
        """Accepted: the row goes (no second replay finds it) to `replayed_messages`, which
        the bridges' folder copies follow; else it stays, with the reason the pipeline just
        kept for it. The lock goes with the session either way."""
        try:
            if accepted:
                with self.conn.transaction():
                    self.conn.execute(_REPLAYED, (self.row_id,))
        except psycopg.Error as exc:
            raise StoreError(
                f"replayed, but cannot remove the kept message: {_first_line(exc)}"
            ) from exc
        finally:
            self.conn.close()


# The copy key of a row, in SQL: as copy_key() (the folder names' end).
_COPY_KEY = (
    "coalesce(nullif(left(regexp_replace(r.control_id, '[^A-Za-z0-9_-]', '_', 'g'), 32), ''),"
    " 'unknown') || '-' || left(r.digest, 8)"
)
_REPLAYED = (
    "WITH done AS (DELETE FROM rejected_messages AS r WHERE id = %s"
    f" RETURNING r.digest, {_COPY_KEY} AS key)"
    " INSERT INTO replayed_messages (digest, copy_key) SELECT digest, key FROM done"
    " ON CONFLICT (digest) DO UPDATE SET copy_key = EXCLUDED.copy_key,"
    " replayed_at = EXCLUDED.replayed_at"
)
# A folder copy's name (bridge.hl7.pipeline): its time, then its copy key.
COPY_NAME = re.compile(r"^([0-9]{8}T[0-9]{12})-([A-Za-z0-9_-]*-[0-9a-f]{8})$")


def copy_key(control_id: str, digest: str) -> str:
    """How the folder copies of a message are named after their time: its control ID (as a
    file name may hold it) and the first 8 hex digits of its digest."""
    control = re.sub(r"[^A-Za-z0-9_-]", "_", control_id)[:32]
    return f"{control or 'unknown'}-{digest[:8]}"


def copy_of(name: str) -> tuple[datetime, str] | None:
    """(when kept, copy key) of a folder copy's name, or None for another name."""
    match = COPY_NAME.match(name.removesuffix(".hl7"))
    if not match:
        return None
    kept = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
    return kept, match.group(2)


def row_id_of(name: str) -> int | None:
    match = ROW_NAME.match(name.removesuffix(".hl7"))
    return int(match.group(1)) if match else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _lock_key(row_id: int) -> int:
    return row_id & 0x7FFF_FFFF  # the lock's int4 key; a rare shared key only refuses a replay
