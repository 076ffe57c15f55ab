"""What every bridge must know of the messages any bridge answered: the retry memory of
recent control IDs (a retry sent to the other bridge is still recognised) and the kept
rejected messages (for `wlbridge replay`)."""

from __future__ import annotations

import hashlib

import psycopg

from bridge.storage.postgres.connection import Database

RECENT_MESSAGES = 10_000  # as the pipeline's in-memory memory
RECENT_HOURS = 24.0
KEPT_REJECTED = 10_000


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
        self.keep = keep

    def close(self) -> None:
        self.db.close()

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
