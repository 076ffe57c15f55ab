"""What modalities can make the bridge keep is bounded: finished MPPS instances go after
mpps-retention, ones left IN PROGRESS after mpps-in-progress-retention, a folder store's start
removes expired files instead of reading them, and an N-CREATE past mpps-max-instances is
refused 0213 while N-SETs and the worklist go on. pynetdicom is the modality; the instances'
ages are set with os.utime, and the periodic sweep is driven through the call its LoopingCall
makes, on an in-process server's own reactor."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread

from bridge.app.server import MPPS_SWEEP_INTERVAL, BridgeServer
from bridge.config import Settings
from bridge.http.metrics import mpps_state
from bridge.storage.mpps_instance import Retention
from tests.conftest import start_bridge
from tests.dicom.test_mpps import (
    final,
    in_progress,
    mpps_records,
    n_create,
    n_set,
    order,
    statuses,
    stored_statuses,
)
from tests.peers import free_port

HOUR = 3600.0
DAY = 24 * HOUR


def instance_file(folder: Path, uid: str) -> Path:
    """The file the folder store keeps `uid` in (a hash of the UID, as MPPSStore.path_for)."""
    return folder / (hashlib.sha256(uid.encode()).hexdigest()[:32] + ".dcm")


def age(path: Path, seconds: float) -> None:
    """Make the instance's last change `seconds` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_an_n_create_past_the_cap_is_refused_0213_and_n_sets_still_complete(tmp_path):
    running = start_bridge(tmp_path, "--mpps-max-instances", "2")
    try:
        order(running, control_id="CAP1")
        first, second = generate_uid(), generate_uid()
        assert n_create(running, in_progress(), first)[0].Status == 0
        assert n_create(running, in_progress(), second)[0].Status == 0
        refused = [n_create(running, in_progress(), generate_uid())[0] for _ in range(3)]
        # PS3.7 C.5.x: 0213 resource limitation, an N-CREATE failure status (A700, out of
        # resources, is C-STORE's and C-FIND's, not N-CREATE's).
        assert [r.Status for r in refused] == [0x0213] * 3
        assert "mpps-max-instances 2" in refused[0].ErrorComment
        assert len(list((tmp_path / "mpps").glob("*.dcm"))) == 2
        # The kept instances still take their final N-SET, and the worklist follows.
        assert stored_statuses(running) == ["STARTED"]
        assert n_set(running, first, final("COMPLETED")).Status == 0
        assert running.wl_files() == []
        order(running, control_id="CAP2", accession="ACC0002", placer="PLC0002",
              filler="FIL0002", requested_procedure_id="RP0002", sps_id="SPS0002",
              study_uid="1.2.3.4.2")  # fmt: skip
        assert statuses(running, patient_id="PAT001") == ["SCHEDULED"]  # C-FIND serves
        records = [(r["type"], r["status"], r["outcome"]) for r in mpps_records(running)]
        assert records[2:5] == [("MPPS^N-CREATE", "0x0213", "refused")] * 3
    finally:
        assert running.stop() == 0
    # One line for the on-call person for the burst (not one per refusal), saying what to do.
    lines = [line for line in running.stderr_lines if "MPPS N-CREATE refused" in line]
    assert len(lines) == 1, lines
    assert "mpps-max-instances = 2" in lines[0] and "raise mpps-max-instances" in lines[0]
    assert "calling_ae" in lines[0]


def test_a_start_removes_expired_instances_and_reads_none_past_both_retentions(tmp_path):
    folder = tmp_path / "mpps"
    first = start_bridge(tmp_path)
    try:
        uids = {name: generate_uid() for name in ("old-done", "new-done", "open", "abandoned")}
        for uid in uids.values():
            assert n_create(first, in_progress(), uid)[0].Status == 0
        for name in ("old-done", "new-done"):
            assert n_set(first, uids[name], final("COMPLETED")).Status == 0
    finally:
        assert first.stop() == 0
    age(instance_file(folder, uids["old-done"]), 31 * DAY)  # past mpps-retention (30 days)
    age(instance_file(folder, uids["open"]), 31 * DAY)  # IN PROGRESS: 90 days
    age(instance_file(folder, uids["abandoned"]), 91 * DAY)
    # A damaged file past both retentions: removed unread (read, it would be kept and warned of).
    damaged = folder / ("0" * 32 + ".dcm")
    damaged.write_bytes(b"not DICOM")
    age(damaged, 91 * DAY)

    second = start_bridge(tmp_path)
    try:
        kept = {p.name for p in folder.glob("*.dcm")}
        assert kept == {instance_file(folder, uids[n]).name for n in ("new-done", "open")}
        assert n_set(second, uids["old-done"], final()).Status == 0x0112  # forgotten
        assert n_set(second, uids["new-done"], final()).Status == 0x0110  # kept, final
        assert n_set(second, uids["open"], final()).Status == 0  # still open: completes
        assert n_create(second, in_progress(), uids["abandoned"])[0].Status == 0  # no 0111
    finally:
        assert second.stop() == 0
    [line] = [line for line in second.stderr_lines if "MPPS retention (at start)" in line]
    assert "removed 3 instance(s): 1 finished more than 720 h ago" in line
    assert "2 unchanged for more than 2160 h" in line
    assert not any("unreadable MPPS file" in line for line in second.stderr_lines)


class InProcess:
    """A BridgeServer on the test's reactor thread (folder store, DICOM in this process)."""

    def __init__(self, tmp_path: Path, reactor, **settings) -> None:
        self.reactor = reactor
        self.settings = Settings(
            host="127.0.0.1",
            mllp_port=free_port(),
            dicom_port=free_port(),
            dicom_workers=0,
            worklist_dir=tmp_path / "worklists",
            rejected_dir=tmp_path / "rejected",
            mpps_dir=tmp_path / "mpps",
            translation_log=str(tmp_path / "translation.log"),
            **settings,
        )
        self.server = BridgeServer(self.settings, reactor=reactor)
        blockingCallFromThread(reactor, self.server.start)
        blockingCallFromThread(reactor, self._sweep_done)  # the one start runs: not racing ours
        # what tests.dicom.test_mpps's helpers use of a running bridge
        self.dicom_port, self.ae_title = self.settings.dicom_port, self.settings.ae_title

    def _sweep_done(self) -> Deferred | None:
        running = self.server.mpps_sweeping
        if running is None:
            return None
        done = Deferred()
        running.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    def sweep(self):
        """One round of the MPPS retention, as the LoopingCall runs it; its removals."""
        return blockingCallFromThread(self.reactor, self.server.sweep_mpps)

    def file(self, uid: str) -> Path:
        return instance_file(self.settings.mpps_dir, uid)

    def stop(self) -> None:
        blockingCallFromThread(self.reactor, self.server.stop)
        self.server.translation_log.close()


@pytest.fixture
def served(tmp_path, reactor):
    running = InProcess(tmp_path, reactor, mpps_retention=1.0, mpps_in_progress_retention=2.0)
    yield running
    running.stop()


def test_the_sweep_removes_finished_and_abandoned_instances_never_open_ones(served):
    sweeper = served.server._mpps_sweeper
    assert sweeper.running and sweeper.interval == MPPS_SWEEP_INTERVAL  # scheduled, periodic
    uids = {n: generate_uid() for n in ("done", "stopped", "open", "abandoned", "fresh")}
    for uid in uids.values():
        assert n_create(served, in_progress(), uid)[0].Status == 0
    assert n_set(served, uids["done"], final("COMPLETED")).Status == 0
    assert n_set(served, uids["stopped"], final("DISCONTINUED")).Status == 0
    assert n_set(served, uids["fresh"], final("COMPLETED")).Status == 0
    age(served.file(uids["done"]), 1.5 * HOUR)  # past mpps-retention (1 h)
    age(served.file(uids["stopped"]), 1.5 * HOUR)
    age(served.file(uids["open"]), 1.5 * HOUR)  # IN PROGRESS: kept until 2 h
    age(served.file(uids["abandoned"]), 2.5 * HOUR)

    removed = served.sweep()
    assert dict(removed) == {"finished": 2, "in-progress": 1}
    left = {uid for uid in uids.values() if served.file(uid).exists()}
    assert left == {uids["open"], uids["fresh"]}
    assert n_set(served, uids["done"], final()).Status == 0x0112  # gone from memory too
    assert n_set(served, uids["abandoned"], final()).Status == 0x0112
    assert n_set(served, uids["open"], final()).Status == 0  # its final N-SET still counts
    assert served.sweep() == {}  # nothing more: the N-SET was a change
    state = mpps_state(served.server)
    assert state["instances"] == 2 and state["removed"] == {"finished": 2, "in-progress": 1}


def test_an_instance_changed_after_the_sweep_found_it_stays(served):
    uid = generate_uid()
    assert n_create(served, in_progress(), uid)[0].Status == 0
    age(served.file(uid), 2.5 * HOUR)
    store = served.server.mpps_store
    found = store.expired(Retention(HOUR, 2 * HOUR))
    assert [f[0] for f in found] == [uid]
    # The modality reports again, still IN PROGRESS (a series added): the instance is newer
    # than the sweep saw it, though its status is the same.
    assert n_set(served, uid, final("IN PROGRESS")).Status == 0
    assert blockingCallFromThread(served.reactor, store.remove, found) == {}
    assert served.file(uid).exists()
    assert n_set(served, uid, final("COMPLETED")).Status == 0  # kept: it completes


def test_the_cap_counts_what_the_sweep_left(tmp_path, reactor):
    running = InProcess(tmp_path, reactor, mpps_retention=1.0, mpps_max_instances=1)
    try:
        uid = generate_uid()
        assert n_create(running, in_progress(), uid)[0].Status == 0
        assert n_create(running, in_progress(), generate_uid())[0].Status == 0x0213
        assert n_set(running, uid, final()).Status == 0
        age(running.file(uid), 2 * HOUR)
        assert running.sweep() == {"finished": 1}
        assert n_create(running, in_progress(), generate_uid())[0].Status == 0  # room again
        assert mpps_state(running.server)["refused_full"] == 1
    finally:
        running.stop()
