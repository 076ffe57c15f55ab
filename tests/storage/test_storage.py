"""The folder backend of the storage protocol: keys, not paths; durable put/delete; finds; the
change stream of what another program does in the folder (flat and per-ae layouts)."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
from twisted.internet.threads import blockingCallFromThread

from bench.worklist_items import make_item
from bridge.config import Settings
from bridge.dicom.matching import ACCESSION_NUMBER, PATIENT_ID
from bridge.storage.index import WorklistIndex
from bridge.storage.protocol import FolderStorage, ItemKey, StorageChange, WorklistStorage
from bridge.storage.store import WorklistStore
from tests.storage.test_index import WAIT, other_program_writes


def make_storage(tmp_path: Path, **overrides) -> FolderStorage:
    settings = Settings(worklist_dir=tmp_path / "wl", index_poll_interval=0.1, **overrides)
    index = WorklistIndex(settings)
    store = WorklistStore(settings, index)
    store.prepare()
    index.load()
    return FolderStorage(settings, store, index)


def test_the_folder_backend_follows_the_protocol(tmp_path):
    storage: WorklistStorage = make_storage(tmp_path)  # the type checker holds it to the shape
    assert isinstance(storage, FolderStorage)


@pytest.mark.parametrize("layout", ["flat", "per-ae"])
def test_put_get_find_scan_delete_by_key(tmp_path, layout):
    storage = make_storage(tmp_path, worklist_layout=layout, ae_title="CT_WL")
    key = ItemKey.of_order("acc:A1", storage.own_partition)
    assert key == ItemKey.of_order("acc:A1", storage.own_partition)  # stable
    assert storage.get(key) is None
    storage.put(key, make_item("A1", patient_id="P1"), "acc:A1")
    stored = storage.get(key)
    assert stored is not None and stored.data[128:132] == b"DICM"
    assert stored.record.get(ACCESSION_NUMBER) == "A1"
    # the file is where the layout puts the bridge's items, named after the key
    expected = (tmp_path / "wl" / "CT_WL") if layout == "per-ae" else (tmp_path / "wl")
    assert (expected / f"{key.identity}.wl").is_file()
    assert storage.find_by_patient("P1") == [key]
    assert storage.find_by_patient("P2") == []
    assert [k for k, _record in storage.scan()] == [key]
    assert storage.delete(key) is True
    assert storage.get(key) is None and storage.delete(key) is False
    assert list(storage.scan()) == [] and storage.find_by_patient("P1") == []


def test_find_by_order_uses_the_step_id_and_another_identifier(tmp_path):
    storage = make_storage(tmp_path)
    key = ItemKey.of_order("acc:A7")
    storage.put(key, make_item("A7"), "acc:A7")
    step_id = storage.get(key).record.get(0x00400100)[0].get(0x00400009)
    assert storage.find_by_order({"ScheduledProcedureStepID": step_id, "AccessionNumber": "A7"})
    assert (
        storage.find_by_order({"ScheduledProcedureStepID": step_id, "AccessionNumber": "A8"}) == []
    )
    assert storage.find_by_order({"AccessionNumber": "A7"}) == []  # no step ID: no guess


@pytest.mark.parametrize("layout", ["flat", "per-ae"])
def test_the_change_stream_reports_another_program_s_writes_and_removals(tmp_path, reactor, layout):
    storage = make_storage(tmp_path, worklist_layout=layout, ae_title="CT_WL")
    changes: queue.Queue[StorageChange] = queue.Queue()
    blockingCallFromThread(reactor, storage.watch, changes.put, reactor)
    try:
        folder = tmp_path / "wl" / ("MR_WL" if layout == "per-ae" else "")
        folder.mkdir(parents=True, exist_ok=True)
        other_program_writes(folder / "external.wl", make_item("EXT1", patient_id="PX"))
        change = changes.get(timeout=WAIT)
        partition = "MR_WL" if layout == "per-ae" else ""
        assert change.key == ItemKey(partition, "external")
        assert change.record is not None and change.record.get(PATIENT_ID) == "PX"
        assert storage.find_by_patient("PX") == [change.key]
        own = ItemKey.of_order("acc:OWN", storage.own_partition)
        blockingCallFromThread(reactor, storage.put, own, make_item("OWN"), "acc:OWN")
        (folder / "external.wl").unlink()
        gone = changes.get(timeout=WAIT)
        assert gone == StorageChange(ItemKey(partition, "external"), None)
        with pytest.raises(queue.Empty):  # the bridge's own put is not another writer's change
            changes.get(timeout=0.5)
    finally:
        blockingCallFromThread(reactor, storage.stop_watching)
