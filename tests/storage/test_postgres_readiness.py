"""/readyz's store check on PostgreSQL: a change stream down for more than a few seconds makes
the store not ready (C-FIND answers would miss the other bridges' changes), even while the
database itself still answers."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from bridge.config import Settings
from bridge.storage.postgres import storage as pg_storage
from bridge.storage.postgres.schema import upgrade
from bridge.storage.postgres.storage import PostgresStorage
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401

WAIT = 30.0


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def wait_until(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)  # polling a state, not synchronising with a sleep
    return False


def test_a_change_stream_down_for_seconds_makes_the_store_not_ready(
    tmp_path: Path, dsn, monkeypatch
):
    monkeypatch.setattr(pg_storage, "CHANGE_STREAM_DOWN_AFTER", 0.5)
    storage = PostgresStorage(Settings(worklist_dir=tmp_path / "wl", store=dsn))
    storage.prepare()
    list(storage.scan())
    storage.watch(lambda change: None)
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    # (a database's connections are switched off from another database)
    admin = psycopg.connect(psycopg.conninfo.make_conninfo(dsn, dbname="postgres"), autocommit=True)
    try:
        assert storage.listener.connected.wait(WAIT)
        assert storage.ping() and storage.health()["ok"]
        # the listener loses its connection and cannot open another; the ping's kept one works
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
        admin.execute("SELECT pg_terminate_backend(%s)", (storage.listener.backend_pid,))
        assert wait_until(lambda: not storage.listener.connected.is_set())
        assert storage.ping()  # the database answers
        assert wait_until(lambda: not storage.health()["ok"])
        health = storage.health()
        assert health["change_stream"] == "reconnecting"
        assert "change stream down" in health["error"]
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
        assert storage.listener.connected.wait(WAIT)
        assert storage.health()["ok"]
    finally:
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
        admin.close()
        storage.stop_watching()
        storage.close()
