"""The PostgreSQL outbox's calls beyond the claim (tests/storage/test_postgres_shared.py has the
claims): the counts kept in the table, giving a claim up, the operator's retry and drop, the
listings and the summary the metrics read, and MSH-10 numbers no two bridges share."""

from __future__ import annotations

import pytest

from bridge.config import ConfigError, load_settings
from bridge.net.outbox import OutboxError, PostgresQueue
from bridge.storage.postgres.outbox import PostgresOutbox
from bridge.storage.postgres.schema import upgrade
from tests.postgres import postgres_dsn, postgres_session  # noqa: F401 (fixtures)
from tests.storage.test_postgres_shared import message


@pytest.fixture
def dsn(postgres_dsn) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def test_refusals_are_counted_parking_counts_and_a_retry_forgets_them(dsn):
    a, b = PostgresOutbox(dsn, "bridge-a"), PostgresOutbox(dsn, "bridge-b")
    a.enqueue("ris", "WLB1", message("WLB1", "ACC1"), {"acc:ACC1"})
    first = a.claim("ris", lease=60)
    assert (first.attempts, first.refusals) == (1, 0)
    assert a.retry_later(first, delay=0, reason="AE", refused=True)
    second = b.claim("ris", lease=60)  # another bridge goes on counting
    assert (second.attempts, second.refusals) == (2, 1)
    assert b.retry_later(second, delay=0, reason="cannot connect", refused=False)
    third = a.claim("ris", lease=60)
    assert (third.attempts, third.refusals) == (3, 1)  # not reached: not a refusal
    assert a.park(third, "AE (refused 2 times, 3 tries)")
    (parked,) = a.messages()
    assert parked.parked and parked.reason.startswith("AE (refused 2")
    assert a.summary()["ris"].parked == 1 and a.depth() == 0
    assert a.unpark(parked.id)
    again = b.claim("ris", lease=60)
    assert (again.attempts, again.refusals) == (1, 0)
    a.close()
    b.close()


def test_a_released_claim_is_due_at_once_for_another_bridge(dsn):
    a, b = PostgresOutbox(dsn, "bridge-a"), PostgresOutbox(dsn, "bridge-b")
    a.enqueue("ris", "WLB1", message("WLB1", "ACC1"))
    taken = a.claim("ris", lease=3600)
    assert b.claim("ris", lease=60) is None
    assert a.release(taken)
    assert b.claim("ris", lease=60).control_id == "WLB1"  # no wait for the hour's lease
    assert a.renew(taken, lease=60) is False  # a's claim is gone
    a.close()
    b.close()


def test_the_queue_lists_finds_retries_and_drops_by_id_or_control_id(dsn):
    queue = PostgresQueue(dsn, "bridge-a")
    built = []

    def build(number: int):
        control_id = f"WB{number:05d}"
        built.append(control_id)
        return control_id, message(control_id, f"ACC{number}"), {f"acc:ACC{number}"}

    first_id, _ = queue.enqueue("ris", build)
    second_id, data = queue.enqueue("ris", build)
    assert first_id != second_id and built[0] != built[1]  # one sequence for every bridge
    assert [e.id for e in queue.entries()] == [first_id, second_id]
    entry, found = queue.lookup(built[1])
    assert entry.id == second_id and found == data and entry.state == "pending"
    claim = queue.take("ris", lease=60)
    queue.park(claim, "AR: unknown order")
    assert queue.lookup(first_id)[0].state == "parked"
    assert queue.retry(built[0]) == (first_id, "ris")
    assert queue.lookup(first_id)[0].state == "pending"
    assert queue.drop(second_id) == second_id
    with pytest.raises(OutboxError, match="no message"):
        queue.lookup(second_id)
    with pytest.raises(OutboxError, match="no message"):
        queue.lookup("other/" + first_id.split("/")[1])  # the id names its receiver
    queue.refresh()
    state = queue.state(["ris", "pacs"])
    assert state["ris"]["depth"] == 1 and state["ris"]["parked"] == 0
    assert state["pacs"] == {"depth": 0, "parked": 0, "oldest_age": 0.0}
    queue.close()


def test_an_outbox_lease_under_a_second_is_a_sentence(tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text("outbox-lease = 0.5\n")
    with pytest.raises(ConfigError, match="outbox-lease: must be at least 1 second"):
        load_settings(config)
