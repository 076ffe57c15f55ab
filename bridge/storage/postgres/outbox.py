"""The outbox in PostgreSQL: order status messages, each sent by one bridge at a time.

A bridge claims the head of a receiver's queue for a lease (`claimed_by`, `lease_until`). The
claim locks the receiver's lane row with `FOR UPDATE SKIP LOCKED`, so two bridges claiming at
once never wait on each other, and only the head is ever claimed, so a receiver hears its
messages in order. The message stays claimed while its lease runs; a bridge that dies stops
renewing it and another takes the message over when it expires: at least once, with the same
bytes (MSH-10 included). A parked message holds the later messages of its own order (same
accession, placer or filler number) and lets the others go, as the folder outbox does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psycopg

from bridge.storage.postgres.connection import Database


@dataclass(frozen=True)
class Claim:
    id: int
    receiver: str
    control_id: str
    data: bytes
    attempts: int  # every try so far, this one included
    refusals: int = 0  # tries the receiver refused (AE/AR, no ACK...): they lead to parking


@dataclass(frozen=True)
class StoredMessage:
    """One message as `wlbridge outbox list` and the HTTP API show it."""

    id: int
    receiver: str
    control_id: str
    data: bytes
    parked: bool
    age: float  # seconds since it was queued (the database's clock)
    attempts: int
    reason: str


@dataclass(frozen=True)
class LaneSummary:
    depth: int  # waiting, not parked
    parked: int
    oldest_age: float  # seconds the oldest waiting message has waited (0: none)


_STORED = (
    "SELECT id, receiver, control_id, data, parked,"
    " greatest(0, extract(epoch FROM now() - created_at))::float8, attempts, reason"
    " FROM outbox_messages"
)


def _insert(
    cursor: psycopg.Cursor, receiver: str, control_id: str, data: bytes, order_keys: Iterable[str]
) -> int:
    """One message at the end of its receiver's queue (the lane made on first use)."""
    cursor.execute(
        "INSERT INTO outbox_lanes (receiver) VALUES (%s) ON CONFLICT DO NOTHING", (receiver,)
    )
    cursor.execute(
        "INSERT INTO outbox_messages (receiver, control_id, data, order_keys)"
        " VALUES (%s, %s, %s, %s) RETURNING id",
        (receiver, control_id, data, sorted(order_keys)),
    )
    return cursor.fetchone()[0]


class PostgresOutbox:
    def __init__(self, dsn: str, bridge_id: str) -> None:
        self.db = Database(dsn)
        self.bridge_id = bridge_id  # who holds a claim: one name per bridge process

    def close(self) -> None:
        self.db.close()

    def next_control_number(self) -> int:
        """A number no other bridge gets: for MSH-10 of the messages this bridge builds."""
        return self.db.fetchall("SELECT nextval('outbox_control_seq')")[0][0]

    def enqueue(
        self, receiver: str, control_id: str, data: bytes, order_keys: set[str] | list[str] = ()
    ) -> int:
        """Write a message durably (committed before returning); returns its id."""

        return self.db.run(lambda cursor: _insert(cursor, receiver, control_id, data, order_keys))

    def enqueue_built(
        self, receiver: str, build: Callable[[int], tuple[str, bytes, set[str]]]
    ) -> int:
        """`build(number)` -> (control ID, message, order keys), `number` from the shared
        sequence (no other bridge gets it), written in the same transaction; returns its id."""

        def insert(cursor: psycopg.Cursor) -> int:
            cursor.execute("SELECT nextval('outbox_control_seq')")
            control_id, data, order_keys = build(cursor.fetchone()[0])
            return _insert(cursor, receiver, control_id, data, order_keys)

        return self.db.run(insert)

    def claim(self, receiver: str, lease: float) -> Claim | None:
        """The head of the receiver's queue, claimed for `lease` seconds; None when there is
        none due, another bridge holds it, or another bridge is claiming right now."""

        def take(cursor: psycopg.Cursor) -> Claim | None:
            cursor.execute(
                "SELECT receiver FROM outbox_lanes WHERE receiver = %s FOR UPDATE SKIP LOCKED",
                (receiver,),
            )
            if cursor.fetchone() is None:
                return None
            cursor.execute(
                "SELECT id, claimed_by, lease_until > now(), next_attempt_at <= now()"
                " FROM outbox_messages m WHERE receiver = %s AND NOT parked"
                " AND NOT EXISTS (SELECT 1 FROM outbox_messages p WHERE p.receiver = m.receiver"
                "   AND p.parked AND p.order_keys && m.order_keys)"
                " ORDER BY id LIMIT 1",
                (receiver,),
            )
            head = cursor.fetchone()
            if head is None:
                return None
            message_id, holder, leased, due = head
            if leased and holder != self.bridge_id:
                return None  # in flight on another bridge
            if not due and not leased:
                return None  # waiting out its backoff
            cursor.execute(
                "UPDATE outbox_messages SET claimed_by = %s,"
                " lease_until = now() + make_interval(secs => %s), attempts = attempts + 1"
                " WHERE id = %s RETURNING id, receiver, control_id, data, attempts, refusals",
                (self.bridge_id, lease, message_id),
            )
            row = cursor.fetchone()
            return Claim(row[0], row[1], row[2], bytes(row[3]), row[4], row[5])

        return self.db.run(take)

    def renew(self, claim: Claim, lease: float) -> bool:
        """Extend our lease (a slow receiver); False when it was lost to another bridge."""
        return self._update(
            "UPDATE outbox_messages SET lease_until = now() + make_interval(secs => %s)"
            " WHERE id = %s AND claimed_by = %s",
            (lease, claim.id, self.bridge_id),
        )

    def complete(self, claim: Claim) -> bool:
        """The receiver acknowledged: the message is done. False when another bridge took it
        over meanwhile (it may be sent twice: at least once, never lost)."""
        return self._update(
            "DELETE FROM outbox_messages WHERE id = %s AND claimed_by = %s",
            (claim.id, self.bridge_id),
        )

    def retry_later(
        self, claim: Claim, delay: float, reason: str = "", refused: bool = False
    ) -> bool:
        """Release the claim; the message is due again after `delay` seconds. `refused`: the
        try counts toward parking."""
        return self._update(
            "UPDATE outbox_messages SET claimed_by = NULL, lease_until = NULL,"
            " next_attempt_at = now() + make_interval(secs => %s), reason = %s,"
            " refusals = refusals + %s WHERE id = %s AND claimed_by = %s",
            (delay, reason, 1 if refused else 0, claim.id, self.bridge_id),
        )

    def release(self, claim: Claim) -> bool:
        """Give the claim up unfinished (the bridge stops): due again at once, for any bridge."""
        return self._update(
            "UPDATE outbox_messages SET claimed_by = NULL, lease_until = NULL"
            " WHERE id = %s AND claimed_by = %s",
            (claim.id, self.bridge_id),
        )

    def park(self, claim: Claim, reason: str) -> bool:
        """Set the message aside after the refusal that reached max-attempts (counted)."""
        return self._update(
            "UPDATE outbox_messages SET parked = true, claimed_by = NULL, lease_until = NULL,"
            " refusals = refusals + 1, reason = %s WHERE id = %s AND claimed_by = %s",
            (reason, claim.id, self.bridge_id),
        )

    def unpark(self, message_id: int) -> bool:
        """`wlbridge outbox retry`: back in its place, due now, its tries forgotten (as the
        folder outbox does)."""
        return self._update(
            "UPDATE outbox_messages SET parked = false, next_attempt_at = now(), refusals = 0,"
            " attempts = 0, reason = '' WHERE id = %s AND parked",
            (message_id,),
        )

    def due_now(self, message_id: int) -> bool:
        """A waiting message's backoff ended now (`wlbridge outbox retry` of a waiting one)."""
        return self._update(
            "UPDATE outbox_messages SET next_attempt_at = now() WHERE id = %s AND NOT parked",
            (message_id,),
        )

    def drop(self, message_id: int) -> bool:
        return self._update("DELETE FROM outbox_messages WHERE id = %s", (message_id,))

    def depth(self, receiver: str | None = None) -> int:
        """Messages waiting to be sent (not parked)."""
        if receiver is None:
            return self.db.fetchall("SELECT count(*) FROM outbox_messages WHERE NOT parked")[0][0]
        return self.db.fetchall(
            "SELECT count(*) FROM outbox_messages WHERE receiver = %s AND NOT parked",
            (receiver,),
        )[0][0]

    def summary(self) -> dict[str, LaneSummary]:
        """Per receiver with messages: waiting, parked, the oldest waiting one's age."""
        rows = self.db.fetchall(
            "SELECT receiver, count(*) FILTER (WHERE NOT parked), count(*) FILTER (WHERE parked),"
            " coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE NOT parked)), 0)"
            "::float8 FROM outbox_messages GROUP BY receiver"
        )
        return {r: LaneSummary(int(d), int(p), max(0.0, float(a))) for r, d, p, a in rows}

    def messages(self) -> list[StoredMessage]:
        """Every message, receiver by receiver, waiting then parked, each oldest first."""
        rows = self.db.fetchall(_STORED + " ORDER BY receiver, parked, id")
        return [_stored(row) for row in rows]

    def message(self, message_id: int) -> StoredMessage | None:
        rows = self.db.fetchall(_STORED + " WHERE id = %s", (message_id,))
        return _stored(rows[0]) if rows else None

    def by_control_id(self, control_id: str) -> StoredMessage | None:
        rows = self.db.fetchall(_STORED + " WHERE control_id = %s ORDER BY id LIMIT 1",
                                (control_id,))  # fmt: skip
        return _stored(rows[0]) if rows else None

    def _update(self, sql: str, params: tuple) -> bool:
        def change(cursor: psycopg.Cursor) -> bool:
            cursor.execute(sql, params)
            return cursor.rowcount > 0

        return self.db.run(change)


def _stored(row: tuple) -> StoredMessage:
    ident, receiver, control_id, data, parked, age, attempts, reason = row
    return StoredMessage(ident, receiver, control_id, bytes(data), parked, float(age),
                         attempts, reason)  # fmt: skip
