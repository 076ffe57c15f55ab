"""The worklist service as the one writer: the HL7 pipeline's changes go through it, by key;
each is published (ItemWritten, ItemRemoved, StatusChange), and the index follows the events
when the store does not feed it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from bridge.config import Settings
from bridge.core.events import EventBus, ItemRemoved, ItemWritten, StatusChange
from bridge.core.worklist_service import WorklistService
from bridge.dicom.matching import ACCESSION_NUMBER
from bridge.hl7.pipeline import Bridge
from bridge.ops.translation_log import TranslationLog
from bridge.storage.index import WorklistIndex
from bridge.storage.protocol import FolderStorage, ItemKey
from bridge.storage.store import StoreError, WorklistStore
from tests.messages import orm


class Writer:
    def __init__(self, tmp_path: Path, **overrides) -> None:
        self.settings = Settings(
            worklist_dir=tmp_path / "wl", rejected_dir=tmp_path / "rejected", **overrides
        )
        self.index = WorklistIndex(self.settings)
        self.store = WorklistStore(self.settings)  # no index: it follows the events
        self.store.prepare()
        self.index.load()
        self.events = EventBus()
        self.storage = FolderStorage(self.settings, self.store, self.index)
        self.service = WorklistService(
            self.settings, self.store, self.index, self.events, storage=self.storage
        )
        self.seen: list[object] = []
        for kind in (ItemWritten, ItemRemoved, StatusChange):
            self.events.subscribe(kind, self.seen.append)
        log = TranslationLog(tmp_path / "translation.log")
        self.bridge = Bridge(
            self.settings, self.store, self.index, log, events=self.events, service=self.service
        )

    def send(self, **fields: str) -> bytes:
        return self.bridge.handle(orm(**fields).encode("latin-1"), "test")


@pytest.mark.parametrize("layout", ["flat", "per-ae"])
def test_an_order_is_written_and_cancelled_through_the_service(tmp_path, layout):
    w = Writer(tmp_path, worklist_layout=layout, ae_title="WLB")
    assert b"MSA|AA" in w.send()
    [written] = w.seen
    assert isinstance(written, ItemWritten) and written.cause == "hl7"
    key = written.key
    assert isinstance(key, ItemKey) and key.partition == ("WLB" if layout == "per-ae" else "")
    assert w.storage.get(key).record.get(ACCESSION_NUMBER) == "ACC0001"
    assert [k for k, _ in w.storage.scan()] == [key]  # the index followed the event
    assert b"MSA|AA" in w.send(control_id="M2", order_control="XO", modality="MR")
    assert [type(e) for e in w.seen] == [ItemWritten, ItemWritten]
    assert w.seen[1].key == key  # the same item, replaced
    assert b"MSA|AA" in w.send(control_id="M3", order_control="CA", order_status="CA")
    assert isinstance(w.seen[-1], ItemRemoved) and w.seen[-1].key == key
    assert w.storage.get(key) is None and list(w.storage.scan()) == []


def test_a_status_change_publishes_status_then_the_written_item(tmp_path):
    w = Writer(tmp_path)
    w.send()
    key = w.seen[0].key
    result = w.service.set_status(w.service.path_of(key), "STARTED", "mpps")
    assert result.outcome == "changed" and result.item is not None
    assert [type(e) for e in w.seen[1:]] == [StatusChange, ItemWritten]
    step = w.storage.get(key).record.get(0x00400100)[0]
    assert step.get(0x00400020) == "STARTED"  # the index has the new status


def test_a_failed_write_is_not_published_and_the_message_is_refused(tmp_path):
    w = Writer(tmp_path)
    w.send()
    w.seen.clear()
    folder = tmp_path / "wl"
    folder.chmod(0o500)  # the folder cannot take the new file
    try:
        ack = w.send(control_id="M9", accession="ACC9", placer="P9", filler="F9", sps_id="S9")
    finally:
        folder.chmod(0o755)
    if b"MSA|AA" in ack:
        pytest.skip("running as root: the folder's mode does not stop a write")
    assert b"MSA|AR" in ack and w.seen == []


def test_the_service_refuses_to_write_outside_its_storage(tmp_path):
    w = Writer(tmp_path)
    with pytest.raises(StoreError):
        w.service.put(ItemKey("", "../escape"), Dataset(), "hl7")  # never a path out of the folder
