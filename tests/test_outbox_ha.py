"""Two bridges, one outbox in PostgreSQL (a real server, tests/postgres.py), one real MLLP receiver
(tests/ris_receiver.py): each message is delivered once, in order, by whichever bridge claims
it; a bridge killed (SIGKILL) while holding a message's lease loses nothing: the other sends it
once the lease ends, with the same MSH-10; a status message that cannot be queued fails the
MPPS (0110) and leaves the item as it was."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest
from pydicom.uid import generate_uid

from bridge.ops.translation_log import parse_logfmt
from bridge.storage.postgres.schema import upgrade
from tests.conftest import start_bridge
from tests.dicom.test_mpps import final, in_progress, n_create, n_set, order, step
from tests.net.test_outbox import OutboxProcess, summary
from tests.peers import eventually, free_port
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401 (fixtures)

WAIT = 60.0  # generous: two cores shared by many workers


@pytest.fixture
def dsn(postgres_dsn) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def bridge_config(folder: Path, dsn: str, ris_port: int, lease: float = 30.0, **extra) -> Path:
    """A config of one bridge (its own folders and log) on the shared store."""
    folder.mkdir(parents=True, exist_ok=True)
    top = {
        "host": "127.0.0.1",
        "mllp-port": free_port(),
        "dicom-port": free_port(),
        "worklist-dir": str(folder / "worklists"),
        "rejected-dir": str(folder / "rejected"),
        "mpps-dir": str(folder / "mpps"),
        "translation-log": str(folder / "translation.log"),
        "outbox-dir": str(folder / "outbox"),
        "store": dsn,
        "outbox-lease": lease,
    }
    receiver = {"name": "ris", "host": "127.0.0.1", "port": ris_port, "message": "OMG^O19",
                "retry-initial": 0.2, "retry-max": 1.0, "ack-timeout": 60.0} | extra  # fmt: skip
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()] + ["[[outbound]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in receiver.items()]
    config = folder / "wlbridge.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def outbox_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT control_id, attempts, claimed_by FROM outbox_messages ORDER BY id"
        ).fetchall()


def log_records(folder: Path, **match: str) -> list[dict[str, str]]:
    path = folder / "translation.log"
    if not path.exists():
        return []
    records = [parse_logfmt(line) for line in path.read_text("utf-8").splitlines()]
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def test_two_bridges_deliver_each_message_once_and_in_order(tmp_path, dsn, ris):
    one = OutboxProcess(bridge_config(tmp_path / "one", dsn, ris.port))
    two = OutboxProcess(bridge_config(tmp_path / "two", dsn, ris.port))
    expected = []
    try:
        for n in range(4):  # the orders' changes alternate between the bridges
            one.publish(f"H{n}", "STARTED")
            two.publish(f"H{n}", "COMPLETED")
            expected += [(f"H{n}", "IP"), (f"H{n}", "CM")]
        got = ris.wait_for(8, timeout=WAIT)
        assert summary(got) == expected  # in the order the changes were queued
        eventually(lambda: outbox_rows(dsn) == [], "an empty outbox table")
        assert len(ris.received) == 8  # nothing sent twice
        assert len({r.control_id for r in got}) == 8  # one MSH-10 per message, across bridges
        sent = log_records(tmp_path / "one", outcome="sent")
        sent += log_records(tmp_path / "two", outcome="sent")
        assert sorted(r["control_id"] for r in sent) == sorted(r.control_id for r in got)
    finally:
        one.stop()
        two.stop()


def test_a_killed_lease_holders_message_is_sent_by_the_other_with_the_same_control_id(
    tmp_path, dsn, ris
):
    ris.answer = "silent"  # the first bridge's message stays in flight: it holds the lease
    one = OutboxProcess(bridge_config(tmp_path / "one", dsn, ris.port, lease=2.0))
    try:
        one.publish("L1", "STARTED")
        one.publish("L1", "COMPLETED")
        in_flight = ris.wait_for(1, accepted_only=False, timeout=WAIT)[0]
        ((control_id, attempts, holder), (_, later_attempts, later_holder)) = outbox_rows(dsn)
        assert control_id == in_flight.control_id and attempts == 1 and holder
        assert (later_attempts, later_holder) == (0, None)  # order: the next one waits
        two = OutboxProcess(bridge_config(tmp_path / "two", dsn, ris.port, lease=2.0))
    finally:
        one.kill()
    try:
        ris.answer = "AA"
        got = ris.wait_for(2, timeout=WAIT)  # after the lease of the dead bridge ended
        assert summary(got) == [("L1", "IP"), ("L1", "CM")]
        assert got[0].control_id == in_flight.control_id  # the same MSH-10: at least once
        eventually(lambda: outbox_rows(dsn) == [], "an empty outbox table")
        (taken_over,) = log_records(tmp_path / "two", outcome="sent",
                                    control_id=in_flight.control_id)  # fmt: skip
        assert taken_over["attempt"] == "2"  # the count in the table went on
        assert log_records(tmp_path / "one", outcome="sent") == []
    finally:
        two.stop()


def test_refusals_count_toward_parking_across_bridges(tmp_path, dsn, ris):
    ris.answer = "AE"
    one = OutboxProcess(
        bridge_config(
            tmp_path / "one", dsn, ris.port, max_attempts=2, retry_initial=3.0, retry_max=3.0
        )
    )
    try:
        one.publish("P1", "STARTED")
        eventually(lambda: log_records(tmp_path / "one", outcome="retrying"), "a refusal")
    finally:
        one.kill()  # before its next try (in 3 s)
    two = OutboxProcess(bridge_config(tmp_path / "two", dsn, ris.port, max_attempts=2))
    try:
        (parked,) = eventually(
            lambda: log_records(tmp_path / "two", outcome="parked"), "a parked line"
        )
        assert parked["attempt"] == "2" and parked["ack"] == "AE"
        with psycopg.connect(dsn) as conn:
            ((is_parked, refusals, reason),) = conn.execute(
                "SELECT parked, refusals, reason FROM outbox_messages"
            ).fetchall()
        assert is_parked and refusals == 2 and "refused 2 times" in reason
        assert len(ris.received) == 2  # one refusal on each bridge, then no more tries
    finally:
        two.stop()


def mpps_bridge(tmp_path: Path, dsn: str, ris_port: int):
    config = bridge_config(tmp_path / "bridge", dsn, ris_port)
    return start_bridge(tmp_path, "--config", str(config))


def test_a_status_message_that_cannot_be_queued_fails_the_mpps_and_leaves_the_item(
    tmp_path, dsn, ris
):
    bridge = mpps_bridge(tmp_path, dsn, ris.port)
    try:
        order(bridge, control_id="Q1")
        uid = generate_uid()
        assert n_create(bridge, in_progress(step()), uid)[0].Status == 0x0000
        (started,) = ris.wait_for(1, timeout=WAIT)
        # Once its delivery is recorded (else the ACK's DELETE would fail too, and the IP be
        # sent again: at least once).
        eventually(lambda: outbox_rows(dsn) == [], "the IP message done")
        with psycopg.connect(dsn, autocommit=True) as conn:  # the outbox table is gone
            conn.execute("ALTER TABLE outbox_messages RENAME TO outbox_messages_away")
        status = n_set(bridge, uid, final("COMPLETED"))
        assert status.Status == 0x0110
        assert "outbox ris: cannot write" in str(status.get("ErrorComment", ""))
        with psycopg.connect(dsn, autocommit=True) as conn:
            (stored,) = conn.execute("SELECT status FROM mpps_instances").fetchall()
            assert stored == ("IN PROGRESS",)  # the instance was not finished either
            conn.execute("ALTER TABLE outbox_messages_away RENAME TO outbox_messages")
        # The modality tries again: the item was left STARTED (else no CM would be sent).
        assert n_set(bridge, uid, final("COMPLETED")).Status == 0x0000
        got = ris.wait_for(2, timeout=WAIT)
        assert summary(got) == [("ACC0001", "IP"), ("ACC0001", "CM")]
        assert got[0].control_id == started.control_id
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_a_database_down_fails_the_enqueue_in_seconds_and_the_next_one_reconnects(
    tmp_path,
    postgres,  # noqa: F811
):
    from twisted.internet.task import Clock

    from bridge.config import OutboundReceiver, Settings
    from bridge.core.events import StatusChange
    from bridge.net.outbox import OutboxWriteError, outbox_for
    from tests.hl7.test_status_message import stored_item

    upgrade(postgres.dsn)
    receiver = OutboundReceiver(name="ris", host="127.0.0.1", port=free_port())
    settings = Settings(store=postgres.dsn, outbox_dir=tmp_path / "outbox", outbound=[receiver])
    outbox = outbox_for(settings, Clock())  # not started: enqueue only

    def change(accession: str) -> StatusChange:
        item = stored_item(accession=accession, placer=f"P-{accession}", filler=f"F-{accession}")
        return StatusChange(item=item, old_status="SCHEDULED", new_status="STARTED",
                            cause="mpps", performed_start="20261201103000")  # fmt: skip

    outbox.on_status_change(change("D1"))
    postgres.stop()
    started = time.monotonic()
    with pytest.raises(OutboxWriteError, match="outbox ris: cannot write"):
        outbox.on_status_change(change("D2"))
    assert time.monotonic() - started < 30  # an answer, not a hang
    postgres.start()
    outbox.on_status_change(change("D3"))
    assert [e.accession for e in outbox.list()] == ["D1", "D3"]
    assert not (tmp_path / "outbox").exists()  # nothing went to the folder
    outbox.queue.close()


def test_after_a_database_restart_the_bridge_queues_and_delivers_again(
    tmp_path,
    postgres,  # noqa: F811
    ris,
):
    upgrade(postgres.dsn)
    one = OutboxProcess(bridge_config(tmp_path / "one", postgres.dsn, ris.port, retry_max=1.0))
    try:
        one.publish("R1", "STARTED")
        assert summary(ris.wait_for(1, timeout=WAIT)) == [("R1", "IP")]
        postgres.stop()  # every connection the bridge holds is broken now
        postgres.start()
        one.publish("R1", "COMPLETED")  # the writer's connection comes back by itself
        got = ris.wait_for(2, timeout=WAIT)
        assert summary(got) == [("R1", "IP"), ("R1", "CM")]
        eventually(lambda: outbox_rows(postgres.dsn) == [], "an empty outbox table")
    finally:
        one.stop()
