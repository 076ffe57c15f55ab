"""A bridge that vanished in the middle of a transaction does not block the others: the server
ends a session idle in a transaction, and a lock wait fails before the statement timeout."""

from __future__ import annotations

import threading
import time

import pytest

from bench.worklist_items import make_item
from bridge.storage.postgres import connection
from bridge.storage.postgres.connection import Database, connect
from bridge.storage.postgres.schema import upgrade
from bridge.storage.postgres.worklist import SEQUENCE_LOCK
from bridge.storage.protocol import ItemKey
from bridge.storage.store import StoreError
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401
from tests.storage.test_postgres_storage import make_storage

WAIT = 20.0  # generous: a loaded machine


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def hold_the_sequence_lock(
    dsn: str, released: threading.Event
) -> tuple[Database, threading.Thread]:
    """A writer that took the change sequence's lock and then went silent (as a bridge whose
    host lost its network between two statements)."""
    holder = Database(dsn)
    taken = threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with holder.transaction() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SEQUENCE_LOCK,))
                taken.set()
                released.wait(WAIT * 2)
                cursor.execute("SELECT 1")  # the server ended the session meanwhile
        except BaseException as exc:  # noqa: BLE001 - reported through the list
            errors.append(exc)
            taken.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(WAIT) and not errors
    thread.errors = errors  # type: ignore[attr-defined]
    return holder, thread


def test_every_session_has_the_timeouts_that_free_a_vanished_writer_s_locks(dsn):
    conn = connect(dsn, autocommit=True)
    try:
        values = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("idle_in_transaction_session_timeout", "lock_timeout")
        }
        assert values == {"idle_in_transaction_session_timeout": "10s", "lock_timeout": "20s"}
        assert conn.info.get_parameters().get("tcp_user_timeout") == "15000"
    finally:
        conn.close()


def test_a_session_idle_in_a_transaction_is_ended_and_the_other_writer_proceeds(
    tmp_path, dsn, monkeypatch
):
    monkeypatch.setattr(connection, "IDLE_IN_TRANSACTION_TIMEOUT_MS", 1000)
    released = threading.Event()
    holder, thread = hold_the_sequence_lock(dsn, released)
    writer = make_storage(tmp_path, dsn)
    try:
        started = time.monotonic()
        writer.put(ItemKey.of_order("acc:W1"), make_item("W1"), "acc:W1")  # waits, then proceeds
        assert time.monotonic() - started < WAIT
        assert writer.contains(ItemKey.of_order("acc:W1"))
    finally:
        released.set()
        thread.join(WAIT)
        writer.close()
        holder.close()
    # the silent writer's transaction was rolled back, and it is told so on its next statement
    assert thread.errors and isinstance(thread.errors[0], StoreError)


def test_a_lock_wait_fails_before_the_statement_timeout(tmp_path, dsn, monkeypatch):
    monkeypatch.setattr(connection, "LOCK_TIMEOUT_MS", 300)
    released = threading.Event()
    holder, thread = hold_the_sequence_lock(dsn, released)  # idle-in-transaction: 10 s
    writer = make_storage(tmp_path, dsn)
    try:
        with pytest.raises(StoreError, match="lock"):
            writer.put(ItemKey.of_order("acc:L1"), make_item("L1"), "acc:L1")
    finally:
        released.set()
        thread.join(WAIT)
        writer.close()
        holder.close()
    assert thread.errors == []  # the holder itself was not ended: only the waiter gave up
