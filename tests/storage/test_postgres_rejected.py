"""The shared table of kept rejected messages on a real PostgreSQL: a replay accepted is
remembered by the copy key the folders' file names end with, a copy replayed from a folder
finishes the row of its key (only one kept before that replay), and the metrics' count is
bounded."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from bridge.storage.postgres.memory import RejectedMessages, copy_key, copy_of
from bridge.storage.postgres.schema import upgrade
from tests.postgres import postgres_dsn, postgres_session  # noqa: F401 (fixtures)


@pytest.fixture
def dsn(postgres_dsn) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


@pytest.fixture
def kept(dsn):
    table = RejectedMessages(dsn)
    yield table
    table.close()


def message(control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|RIS|HOSP|WLBRIDGE|RAD|20261201||ORM^O01|{control_id}|T|2.5.1\r"
        "PID|1||PAT1\rORC|NW|P1\r"
    ).encode()


def key_of(raw: bytes, control_id: str) -> str:
    return copy_key(control_id, hashlib.sha256(raw).hexdigest())


def test_an_accepted_replay_is_remembered_by_the_key_the_folder_names_end_with(kept):
    odd = "REJ.1/ü " + "x" * 40  # sanitised and cut to 32 characters in a file name
    accepted, refused = message(odd), message("REJ-2")
    kept.keep_message(accepted, odd, "AR 103 MSH^1^11 processing ID")
    kept.keep_message(refused, "REJ-2", "AR 103 MSH^1^11 processing ID")
    names = {row.control_id: row.name for row in kept.entries(10)}
    claimed = kept.claim(names[odd], 1 << 20)
    claimed.finish(True)
    kept.claim(names["REJ-2"], 1 << 20).finish(False)

    key = key_of(accepted, odd)
    assert key.startswith("REJ_1__" + "_" + "x" * 24 + "-")  # as the pipeline names files
    replayed = kept.replayed([key, key_of(refused, "REJ-2"), "nothing-00000000"])
    assert list(replayed) == [key]  # only the accepted one
    assert replayed[key] > datetime.now(UTC) - timedelta(minutes=1)
    assert [row.control_id for row in kept.entries(10)] == ["REJ-2"]
    name = f"20261201T101500123456-{key}"
    assert copy_of(name + ".hl7") == (datetime(2026, 12, 1, 10, 15, 0, 123456, UTC), key)
    assert copy_of(names["REJ-2"]) is None  # a row's name is not a folder copy's


def test_a_copy_replayed_from_a_folder_finishes_its_row_if_kept_before_that_replay(kept, dsn):
    for control in ("F-1", "F-2", "F-3"):
        kept.keep_message(message(control), control, "AR 103 MSH^1^11 processing ID")
    later = datetime.now(UTC) + timedelta(seconds=5)
    earlier = datetime.now(UTC) - timedelta(hours=1)  # replayed before F-2 was refused
    same_digest_other_control = "F-9-" + key_of(message("F-3"), "F-3").rsplit("-", 1)[1]
    finished = kept.finish_copies(
        [
            (key_of(message("F-1"), "F-1"), later),
            (key_of(message("F-2"), "F-2"), earlier),
            (same_digest_other_control, later),
        ]
    )
    assert finished == [key_of(message("F-1"), "F-1")]
    assert sorted(row.control_id for row in kept.entries(10)) == ["F-2", "F-3"]
    assert list(kept.replayed([key_of(message("F-1"), "F-1")])) == [key_of(message("F-1"), "F-1")]
    assert kept.finish_copies([(key_of(message("F-1"), "F-1"), later)]) == []  # done already
    assert kept.finish_copies([]) == []


def test_the_count_of_kept_messages_is_bounded_and_old_replays_are_forgotten(kept, dsn):
    for n in range(5):
        kept.keep_message(message(f"C-{n}"), f"C-{n}", "AR")
    assert kept.pending_count() == 5
    # on a session of its own that gives up soon (never the pipeline's, nor 30 s)
    assert kept.background.fetchall("SHOW statement_timeout") == [("2s",)]
    bounded = RejectedMessages(dsn, keep=3)
    try:
        assert bounded.pending_count() == 3  # counted up to `keep`, however big the table
    finally:
        bounded.close()
    for row in kept.entries(2):
        kept.claim(row.name, 1 << 20).finish(True)
    assert kept.pending_count() == 3
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE replayed_messages SET replayed_at = now() - interval '8 days'"
            " WHERE copy_key LIKE 'C-4-%'"
        )
    assert kept.prune_replayed() == 1
    with psycopg.connect(dsn) as conn:
        left = conn.execute("SELECT copy_key FROM replayed_messages").fetchall()
    assert [k for (k,) in left] == [key_of(message("C-3"), "C-3")]


def test_the_count_does_not_wait_for_the_session_the_pipeline_keeps_messages_with(kept):
    kept.keep_message(message("S-1"), "S-1", "AR")
    holding, release = threading.Event(), threading.Event()

    def hold_the_pipelines_session() -> None:
        with kept.db.transaction():  # as a keep_message() in progress on the reactor thread
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_pipelines_session)
    holder.start()
    try:
        assert holding.wait(10)
        counted: list[int] = []
        counter = threading.Thread(target=lambda: counted.append(kept.pending_count()))
        counter.start()
        counter.join(5)
        assert counted == [1], "the count waited for the pipeline's session"
    finally:
        release.set()
        holder.join(30)
