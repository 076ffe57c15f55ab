"""The worklist service in-process: look-ups, status changes, the StatusChange it publishes, and
what a failing subscriber does (the change is not made; an MPPS gets a failure status)."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from bridge.config import Settings
from bridge.core.events import EventBus, StatusChange
from bridge.core.worklist_service import WorklistService
from bridge.dicom.mpps import PROCESSING_FAILURE, SUCCESS, MPPSService
from bridge.hl7.pipeline import Bridge
from bridge.ops.translation_log import TranslationLog, parse_logfmt
from bridge.storage.index import WorklistIndex
from bridge.storage.mpps_store import MPPSStore
from bridge.storage.store import StoreError, WorklistStore
from tests.messages import orm


class World:
    def __init__(self, tmp_path: Path, **overrides) -> None:
        self.settings = Settings(
            worklist_dir=tmp_path / "wl",
            rejected_dir=tmp_path / "rejected",
            mpps_dir=tmp_path / "mpps",
            **overrides,
        )
        self.index = WorklistIndex(self.settings)
        self.store = WorklistStore(self.settings, self.index)
        self.store.prepare()
        self.index.load()
        self.log_path = tmp_path / "translation.log"
        self.log = TranslationLog(self.log_path)
        self.events = EventBus()
        self.bridge = Bridge(self.settings, self.store, self.index, self.log, events=self.events)
        self.service = WorklistService(self.settings, self.store, self.index, self.events)
        self.mpps_store = MPPSStore(self.settings.mpps_dir)
        self.mpps_store.load()
        self.mpps = MPPSService(self.mpps_store, self.service, self.log)

    def order(self, **fields: str) -> Path:
        ack = self.bridge.handle(orm(**fields).encode("latin-1"), "test")
        assert b"MSA|AA" in ack, ack
        [path] = self.index.paths_matching(_accession(fields.get("accession", "ACC0001")))
        return path

    def records(self) -> list[dict[str, str]]:
        return [parse_logfmt(line) for line in self.log_path.read_text("utf-8").splitlines()]


def _accession(accession: str) -> Dataset:
    ds = Dataset()
    ds.AccessionNumber = accession
    return ds


def status_of(path: Path) -> str:
    return pydicom.dcmread(path).ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus


def in_progress(study_uid="1.2.826.0.1.3680043.10.543.1", sps_id="SPS0001", accession="ACC0001"):
    ds = Dataset()
    ds.PatientID = "PAT001"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedProcedureStepStartDate = "20261201"
    ds.PerformedProcedureStepStartTime = "103500"
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.ScheduledProcedureStepID = sps_id
    step.AccessionNumber = accession
    ds.ScheduledStepAttributesSequence = Sequence([step])
    return ds


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_look_ups_by_study_and_step_then_by_accession_never_by_patient(world):
    path = world.order()
    world.order(control_id="M2", accession="ACC0002", sps_id="SPS0002", study_uid="1.2.3.4")
    assert world.service.find_by_study_and_step("1.2.826.0.1.3680043.10.543.1", "SPS0001") == [path]
    assert world.service.find_by_study_and_step("1.2.826.0.1.3680043.10.543.1", "SPS0002") == []
    assert world.service.find_by_accession("ACC0001") == [path]
    assert world.service.find_by_accession("ACC0001", issuer="ELSEWHERE") == [path]  # none on it
    assert world.service.find_by_accession("") == []
    assert world.service.find_by_study_and_step("", "") == []


def test_a_status_change_keeps_the_uid_and_publishes_synchronously(world):
    path = world.order()
    uid = pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID
    seen: list[StatusChange] = []
    world.events.subscribe(StatusChange, lambda e: seen.append((e, status_of(path))))
    result = world.service.set_status(
        path, "STARTED", "mpps", mpps_uid="1.2.3", performing_station="CT1"
    )
    assert result.changed and (result.old_status, result.new_status) == ("SCHEDULED", "STARTED")
    [(event, on_disk_when_published)] = seen
    # Subscribers (the outbox) hear of it before it is stored: a crash between the two leaves
    # the item unchanged, and the retry of the change sends its messages.
    assert on_disk_when_published == "SCHEDULED"
    assert status_of(path) == "STARTED"
    assert (event.old_status, event.new_status, event.cause) == ("SCHEDULED", "STARTED", "mpps")
    assert event.item.AccessionNumber == "ACC0001" and event.mpps_uid == "1.2.3"
    assert event.performing_station == "CT1"
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID == uid
    # The index follows: a query for STARTED items finds it.
    assert world.index.record(path) is not None
    assert world.service.set_status(path, "STARTED", "mpps").outcome == "unchanged"
    assert len(seen) == 1


def test_a_finished_status_follows_the_retention(tmp_path):
    world = World(tmp_path / "a")
    path = world.order()
    assert world.service.set_status(path, "COMPLETED", "mpps").outcome == "removed"
    assert not path.exists() and world.index.record(path) is None
    kept = World(tmp_path / "b", finished_retention=2.0)
    path = kept.order()
    assert kept.service.set_status(path, "COMPLETED", "mpps").outcome == "changed"
    assert status_of(path) == "COMPLETED"


def test_only_from_leaves_an_item_a_message_changed_meanwhile(world):
    path = world.order()
    world.service.set_status(path, "STARTED", "mpps")
    result = world.service.set_status(
        path, "DISCONTINUED", "housekeeping", only_from=("SCHEDULED",)
    )
    assert result.outcome == "skipped" and status_of(path) == "STARTED"


def test_a_failing_subscriber_stops_the_change_and_raises(world):
    path = world.order()

    def outbox_full(event):
        raise OSError("outbox disk full")

    world.events.subscribe(StatusChange, outbox_full)
    with pytest.raises(OSError, match="outbox disk full"):
        world.service.set_status(path, "STARTED", "mpps")
    assert status_of(path) == "SCHEDULED"


def test_a_change_that_cannot_be_stored_keeps_its_messages_and_is_retried_whole(world, caplog):
    """The outbox hears first: when the item's write fails (a full disk; a crash the same),
    its messages are already queued and the item unchanged, so the modality's retry makes the
    change and queues them again: the RIS hears at least once, never not at all."""
    path = world.order()
    heard: list[str] = []
    world.events.subscribe(StatusChange, lambda e: heard.append(e.new_status))
    storage = world.service.storage
    put = storage.put

    def disk_full(key, item, order_identity=None):
        raise StoreError("cannot write: No space left on device")

    storage.put = disk_full
    with pytest.raises(StoreError, match="No space left"):
        world.service.set_status(path, "STARTED", "mpps")
    assert heard == ["STARTED"] and status_of(path) == "SCHEDULED"
    assert "not stored (its status messages are queued)" in caplog.text
    storage.put = put  # the disk has room again: the retry
    assert world.service.set_status(path, "STARTED", "mpps").outcome == "changed"
    assert heard == ["STARTED", "STARTED"] and status_of(path) == "STARTED"


def test_a_failing_subscriber_makes_the_mpps_answer_a_failure(world):
    path = world.order()
    calls = []

    def outbox_full(event):
        calls.append(event)
        raise OSError("outbox disk full")

    world.events.subscribe(StatusChange, outbox_full)
    result = world.mpps.create("1.2.3.4.5", in_progress(), "CT1", "127.0.0.1:4000")
    assert result.status == PROCESSING_FAILURE and "outbox disk full" in result.reason
    assert len(calls) == 1 and status_of(path) == "SCHEDULED"
    assert "1.2.3.4.5" not in world.mpps_store  # not stored: the modality's retry is fresh
    record = world.records()[-1]
    assert record["type"] == "MPPS^N-CREATE" and record["outcome"] == "failed"
    assert record["status"] == "0x0110" and record["mpps_uid"] == "1.2.3.4.5"
    # Once the subscriber recovers, the retry applies the change.
    world.events._subscribers[StatusChange].clear()
    assert world.mpps.create("1.2.3.4.5", in_progress(), "CT1", "x").status == SUCCESS
    assert status_of(path) == "STARTED"


def test_calls_from_another_thread_run_on_the_reactor_thread(tmp_path):
    """The service hops to the writer thread (a reactor's, running in a thread of its own as the
    bridge's does) and returns what it did there."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    reactor_thread = threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
    )
    reactor_thread.start()
    try:
        world = World(tmp_path)
        path = world.order()
        world.service.reactor = reactor
        threads_seen: list[int] = []
        world.events.subscribe(StatusChange, lambda e: threads_seen.append(threading.get_ident()))
        result = world.service.set_status(path, "STARTED", "mpps")  # from this (a DICOM) thread
        assert result.changed and status_of(path) == "STARTED"
        assert threads_seen == [reactor_thread.ident]
    finally:
        reactor.callFromThread(reactor.stop)
        reactor_thread.join(10)


def test_a_damaged_item_file_does_not_make_the_mpps_fail(world):
    path = world.order()
    path.write_bytes(b"not DICOM at all")  # another program broke it after it was indexed
    result = world.mpps.create("1.2.3.4.6", in_progress(), "CT1", "x")
    assert result.status == SUCCESS
    assert any("left absent" in note for note in result.notes)
    assert "1.2.3.4.6" in world.mpps_store
