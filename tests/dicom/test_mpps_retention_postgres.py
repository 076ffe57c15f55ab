"""The MPPS retention and cap on a PostgreSQL store shared by two bridges (in-process servers,
pynetdicom as the modality): one bridge at a time sweeps, the database's clock decides the age
(set in the table, as os.utime does for the folder), and the cap counts every bridge's
instances."""

from __future__ import annotations

import psycopg
import pytest
from pydicom.uid import generate_uid

from bridge.http.metrics import mpps_state
from bridge.storage.postgres.mpps import MPPS_SWEEP_LOCK
from bridge.storage.postgres.storage import RoundLock
from tests.dicom.test_mpps import final, in_progress, n_create, n_set
from tests.dicom.test_mpps_retention import InProcess
from tests.hl7.test_pipeline_postgres import dsn  # noqa: F401
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401


def age(dsn: str, uid: str, hours: float) -> None:  # noqa: F811
    """Make the instance's last change `hours` ago on the database's clock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        changed = conn.execute(
            "UPDATE mpps_instances SET updated_at = now() - make_interval(secs => %s)"
            " WHERE uid = %s",
            (hours * 3600, uid),
        ).rowcount
    assert changed == 1


def kept(dsn: str) -> set[str]:  # noqa: F811
    with psycopg.connect(dsn) as conn:
        return {uid for (uid,) in conn.execute("SELECT uid FROM mpps_instances")}


@pytest.fixture
def two(tmp_path, reactor, dsn):  # noqa: F811
    started = []

    def start(name: str, **settings) -> InProcess:
        values = dict(store=dsn, mpps_retention=1.0, mpps_in_progress_retention=2.0) | settings
        running = InProcess(tmp_path / name, reactor, **values)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def test_one_bridge_at_a_time_sweeps_the_shared_instances(two, dsn):  # noqa: F811
    a, b = two("a"), two("b")
    uids = {n: generate_uid() for n in ("done", "stopped", "open", "abandoned", "fresh")}
    for uid in uids.values():
        assert n_create(a, in_progress(), uid)[0].Status == 0
    assert n_set(b, uids["done"], final("COMPLETED")).Status == 0  # the other bridge
    assert n_set(b, uids["stopped"], final("DISCONTINUED")).Status == 0
    assert n_set(a, uids["fresh"], final("COMPLETED")).Status == 0
    for name, hours in (("done", 1.5), ("stopped", 1.5), ("open", 1.5), ("abandoned", 2.5)):
        age(dsn, uids[name], hours)

    other = RoundLock(dsn, MPPS_SWEEP_LOCK)  # a third bridge is sweeping
    assert other.try_acquire()
    try:
        assert a.sweep() is None  # skipped this round
        assert len(kept(dsn)) == 5
    finally:
        other.release()
    assert b.sweep() == {"finished": 2, "in-progress": 1}
    assert kept(dsn) == {uids["open"], uids["fresh"]}
    assert n_set(a, uids["done"], final()).Status == 0x0112
    assert n_set(a, uids["open"], final()).Status == 0  # still open: completes
    assert a.sweep() == {}
    assert mpps_state(b.server)["removed"] == {"finished": 2, "in-progress": 1}
    assert mpps_state(a.server)["instances"] == 2  # counted by its last sweep


def test_the_cap_counts_the_instances_of_every_bridge(two, dsn):  # noqa: F811
    a, b = two("a", mpps_max_instances=2), two("b", mpps_max_instances=2)
    first = generate_uid()
    assert n_create(a, in_progress(), first)[0].Status == 0
    assert n_create(b, in_progress(), generate_uid())[0].Status == 0
    status, _ = n_create(a, in_progress(), generate_uid())
    assert status.Status == 0x0213 and "mpps-max-instances 2" in status.ErrorComment
    assert len(kept(dsn)) == 2
    assert n_set(b, first, final()).Status == 0  # kept instances still complete
    age(dsn, first, 1.5)
    assert a.sweep() == {"finished": 1}
    assert n_create(b, in_progress(), generate_uid())[0].Status == 0  # room again
