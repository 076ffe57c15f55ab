"""MPPS on a PostgreSQL store shared by two bridges: an instance's check and write are one step
under its lock, so a retried N-CREATE to the other bridge, or N-SETs that reach both, are
applied one after the other (the second sees the first's result)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bridge.dicom.mpps import MPPSService
from bridge.ops.translation_log import TranslationLog
from bridge.storage.postgres.mpps import PostgresMPPSStore
from tests.dicom.test_mpps import final, in_progress
from tests.hl7.test_pipeline_postgres import PgHarness, dsn  # noqa: F401
from tests.messages import orm
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401

UID = "1.2.826.0.1.3680043.10.543.77"
RACE_WINDOW = 3.0  # how long the other bridge gets to slip in between the check and the write


class MppsBridge(PgHarness):
    def __init__(self, tmp_path: Path, dsn: str) -> None:  # noqa: F811
        super().__init__(tmp_path, dsn)
        self.mpps_store = PostgresMPPSStore(dsn)
        self.mpps = MPPSService(
            self.mpps_store, self.service, TranslationLog(tmp_path / "mpps.log")
        )

    def close(self) -> None:
        self.mpps_store.close()
        super().close()


@pytest.fixture
def two(tmp_path: Path, dsn: str):  # noqa: F811
    a, b = MppsBridge(tmp_path / "a", dsn), MppsBridge(tmp_path / "b", dsn)
    yield a, b
    a.close()
    b.close()


def other_bridge_between_check_and_write(here: MppsBridge, work) -> tuple[threading.Thread, list]:
    """The first status look-up of `here` lets the other bridge's `work` run in a thread for up
    to RACE_WINDOW seconds (it completes there unless a lock makes it wait): the race."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(work()), daemon=True)
    look_up = here.mpps_store.status

    def status_then_race(uid: str):
        found = look_up(uid)
        if thread.ident is None:  # the first look-up only
            thread.start()
            thread.join(RACE_WINDOW)
        return found

    here.mpps_store.status = status_then_race
    return thread, results


def test_a_retried_n_create_on_the_other_bridge_is_applied_once(two):
    a, b = two
    assert a.send(orm(control_id="C1")) == "AA"
    thread, race = other_bridge_between_check_and_write(
        a, lambda: b.mpps.create(UID, in_progress(), "CT1", "peer")
    )
    first = a.mpps.create(UID, in_progress(), "CT1", "peer")
    thread.join(30)
    [second] = race
    outcomes = sorted([first.outcome, second.outcome])
    assert outcomes == ["refused", "started"], outcomes
    assert {first.status, second.status} == {0x0000, 0x0111}  # one duplicate answer


def test_completed_on_one_bridge_and_discontinued_on_the_other_one_wins(two):
    a, b = two
    assert a.send(orm(control_id="C1")) == "AA"
    assert a.mpps.create(UID, in_progress(), "CT1", "peer").outcome == "started"
    thread, race = other_bridge_between_check_and_write(
        a, lambda: b.mpps.update(UID, final("DISCONTINUED"), "CT1", "peer")
    )
    first = a.mpps.update(UID, final("COMPLETED"), "CT1", "peer")
    thread.join(30)
    [second] = race
    assert sorted([first.status, second.status]) == [0x0000, 0x0110]  # may no longer be updated
    winner = first if first.status == 0 else second
    assert a.mpps_store.status(UID) == winner.pps_status
