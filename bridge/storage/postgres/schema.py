"""The bridge's tables, created and migrated by the bridge itself: `wlbridge db upgrade`.

Migrations are numbered and applied in order, all pending ones in one transaction under an
advisory lock, so two bridges (or an operator and a bridge) upgrading at once apply each exactly
once, and a failed migration leaves the schema as it was. Re-running is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from bridge.storage.postgres.connection import Database, StoreUnavailable
from bridge.storage.store import StoreError

UPGRADE_LOCK = 0x77_6C_62_72  # "wlbr": the advisory lock key of `db upgrade`


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "worklist, MPPS, outbox, retry memory, rejected messages",
        """
        CREATE SEQUENCE worklist_change_seq;
        CREATE TABLE worklist_items (
            partition   text NOT NULL,          -- the called AE title (per-ae layout) or ''
            name        text NOT NULL,          -- the folder store's file name of the item
            identity    text NOT NULL,
            data        bytea,                  -- the Part 10 bytes; NULL once deleted
            deleted     boolean NOT NULL DEFAULT false,  -- kept as a tombstone for catch-up
            patient_id  text NOT NULL DEFAULT '',
            issuer      text NOT NULL DEFAULT '',
            accession   text NOT NULL DEFAULT '',
            placer      text NOT NULL DEFAULT '',
            filler      text NOT NULL DEFAULT '',
            study_uid   text NOT NULL DEFAULT '',
            sps_id      text NOT NULL DEFAULT '',
            status      text NOT NULL DEFAULT '',
            updated_at  timestamptz NOT NULL DEFAULT now(),
            seq         bigint NOT NULL,        -- worklist_change_seq, in commit order
            origin      text NOT NULL DEFAULT '',  -- the writer (one per store object)
            PRIMARY KEY (partition, name)
        );
        CREATE UNIQUE INDEX worklist_items_seq ON worklist_items (seq);
        CREATE INDEX worklist_items_patient ON worklist_items (patient_id) WHERE NOT deleted;
        CREATE INDEX worklist_items_accession ON worklist_items (accession) WHERE NOT deleted;
        CREATE INDEX worklist_items_placer ON worklist_items (placer) WHERE NOT deleted;
        CREATE INDEX worklist_items_filler ON worklist_items (filler) WHERE NOT deleted;
        CREATE INDEX worklist_items_study ON worklist_items (study_uid) WHERE NOT deleted;
        CREATE INDEX worklist_items_sps ON worklist_items (sps_id) WHERE NOT deleted;

        CREATE TABLE mpps_instances (
            uid         text PRIMARY KEY,
            status      text NOT NULL DEFAULT '',
            patient_id  text NOT NULL DEFAULT '',
            issuer      text NOT NULL DEFAULT '',
            data        bytea NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX mpps_instances_patient ON mpps_instances (patient_id);

        CREATE TABLE outbox_lanes (receiver text PRIMARY KEY);
        CREATE SEQUENCE outbox_control_seq;
        CREATE TABLE outbox_messages (
            id              bigserial PRIMARY KEY,
            receiver        text NOT NULL REFERENCES outbox_lanes,
            control_id      text NOT NULL,
            data            bytea NOT NULL,     -- as sent, MSH-10 included
            order_keys      text[] NOT NULL DEFAULT '{}',
            created_at      timestamptz NOT NULL DEFAULT now(),
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            claimed_by      text,
            lease_until     timestamptz,
            parked          boolean NOT NULL DEFAULT false,
            reason          text NOT NULL DEFAULT ''
        );
        CREATE INDEX outbox_messages_queue ON outbox_messages (receiver, id);

        CREATE TABLE recent_messages (
            key         text PRIMARY KEY,       -- hash of sender + MSH-10
            digest      text NOT NULL,          -- hash of the message bytes
            ack         bytea NOT NULL,
            at          timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX recent_messages_at ON recent_messages (at);

        CREATE TABLE rejected_messages (
            id          bigserial PRIMARY KEY,
            digest      text NOT NULL UNIQUE,
            control_id  text NOT NULL DEFAULT '',
            data        bytea NOT NULL,
            reason      text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        2,
        "outbox refusals (the attempts that count toward parking)",
        """
        ALTER TABLE outbox_messages ADD COLUMN refusals integer NOT NULL DEFAULT 0;
        """,
    ),
    Migration(
        3,
        "replayed rejected messages (the folders' copies follow the table)",
        """
        CREATE TABLE replayed_messages (
            digest      text PRIMARY KEY,
            copy_key    text NOT NULL,      -- control ID and digest prefix, as folder names end
            replayed_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX replayed_messages_copy_key ON replayed_messages (copy_key);
        CREATE INDEX replayed_messages_at ON replayed_messages (replayed_at);
        CREATE INDEX rejected_messages_digest8 ON rejected_messages (left(digest, 8));
        """,
    ),
)

LATEST = MIGRATIONS[-1].version


def upgrade(dsn: str) -> list[Migration]:
    """Apply the pending migrations; returns those applied (none when already current)."""
    db = Database(dsn)
    try:
        return db.run(_upgrade)
    except StoreUnavailable:
        raise
    except StoreError as exc:
        raise StoreError(f"schema upgrade failed, nothing changed: {exc}") from exc
    finally:
        db.close()


def _upgrade(cursor: psycopg.Cursor) -> list[Migration]:
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (UPGRADE_LOCK,))
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    current = _current(cursor)
    if current > LATEST:
        raise StoreError(
            f"the database has schema version {current}, newer than this wlbridge knows "
            f"({LATEST}): upgrade wlbridge"
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        cursor.execute(migration.sql)
        cursor.execute(
            "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
        applied.append(migration)
    return applied


def _current(cursor: psycopg.Cursor) -> int:
    cursor.execute("SELECT coalesce(max(version), 0) FROM schema_version")
    return int(cursor.fetchone()[0])


def version(db: Database) -> int:
    """The schema version of the database (0: never upgraded)."""

    def read(cursor: psycopg.Cursor) -> int:
        cursor.execute("SELECT to_regclass('schema_version') IS NOT NULL")
        return _current(cursor) if cursor.fetchone()[0] else 0

    return db.run(read)


def require_current(db: Database) -> None:
    """StoreError naming the command to run when the schema is not this wlbridge's."""
    found = version(db)
    if found != LATEST:
        raise StoreError(
            f"the database has schema version {found}, this wlbridge needs {LATEST}: "
            "run `wlbridge db upgrade --store URL`"
        )
