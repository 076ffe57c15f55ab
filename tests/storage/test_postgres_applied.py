"""The change numbers a bridge remembers to drop older deliveries (PostgresStorage._applied):
a rolled-back change leaves none behind, and the map does not grow with the worklist."""

from __future__ import annotations

import queue
import time

import pytest

from bench.worklist_items import make_item
from bridge.storage.postgres.schema import upgrade
from bridge.storage.postgres.worklist import record_of
from bridge.storage.protocol import ItemKey, StorageChange
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401
from tests.storage.test_postgres_storage import make_storage

WAIT = 10.0


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def test_a_rolled_back_change_does_not_drop_another_bridge_s_older_change(tmp_path, dsn):
    here = make_storage(tmp_path, dsn)
    other = make_storage(tmp_path, dsn)
    key = ItemKey.of_order("acc:RB1")
    try:
        other.put(key, make_item("RB1", patient_id="THEIRS"), "acc:RB1")
        theirs = other.worklist.last_seq  # its delivery to `here` is still queued
        with pytest.raises(RuntimeError), here.change(key):
            here.put(key, make_item("RB1", patient_id="MINE"), "acc:RB1")  # a higher number
            raise RuntimeError("a later check failed: rolled back")
        delivered: list[StorageChange] = []
        record = record_of(other.get(key).data)
        here._deliver(delivered.append, key, record, theirs)
        assert [change.key for change in delivered] == [key]  # served, not dropped
        # a committed change's number still drops an older delivery
        with here.change(key):
            here.put(key, make_item("RB1", patient_id="MINE"), "acc:RB1")
        delivered.clear()
        here._deliver(delivered.append, key, record, theirs)
        assert delivered == []
    finally:
        here.close()
        other.close()


def test_the_numbers_are_forgotten_once_the_stream_has_passed_them(tmp_path, dsn):
    here = make_storage(tmp_path, dsn)
    other = make_storage(tmp_path, dsn)
    for n in range(20):
        here.put(ItemKey.of_order(f"acc:N{n}"), make_item(f"N{n}"), f"acc:N{n}")
    list(here.scan())  # marks every item
    assert len(here._applied) == 20
    changes: queue.Queue[StorageChange] = queue.Queue()
    here.watch(changes.put)
    try:
        assert here.listener.connected.wait(WAIT)
        theirs = ItemKey.of_order("acc:THEIRS")
        other.put(theirs, make_item("THEIRS"), "acc:THEIRS")
        assert changes.get(timeout=WAIT).key == theirs
        assert set(here._applied) <= {theirs}  # older than the stream: forgotten
        here._pruned_at = 0.0  # (pruning runs at most once a second)
        other.delete(theirs)
        assert changes.get(timeout=WAIT) == StorageChange(theirs, None)
        assert here._applied == {}  # a delivered delete leaves nothing behind
    finally:
        here.stop_watching()
        here.close()
        other.close()


def test_a_bridge_that_hears_no_other_writer_still_forgets_its_numbers(tmp_path, dsn, monkeypatch):
    from bridge.storage.postgres import storage as pg_storage

    monkeypatch.setattr(pg_storage, "APPLIED_PRUNE_SIZE", 5)
    here = make_storage(tmp_path, dsn)
    list(here.scan())
    here.watch(lambda change: None)
    try:
        assert here.listener.connected.wait(WAIT)
        for n in range(10):
            here.put(ItemKey.of_order(f"acc:S{n}"), make_item(f"S{n}"), f"acc:S{n}")
        newest = here.worklist.last_seq
        deadline = time.monotonic() + WAIT
        while here.listener.last_seq < newest and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the stream's own notifications, not synchronising
        assert here.listener.last_seq >= newest
        here._pruned_at = 0.0
        here.put(ItemKey.of_order("acc:LAST"), make_item("LAST"), "acc:LAST")
        assert len(here._applied) <= 2  # the newest ones only
    finally:
        here.stop_watching()
        here.close()
