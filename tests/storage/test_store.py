"""The store: durable atomic writes, names no message can steer, lockfile, leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from bridge.config import Settings
from bridge.storage.store import LOCKFILE, TEMP_PREFIX, StoreError, WorklistStore


class IndexSpy:
    def __init__(self) -> None:
        self.items: dict[Path, Dataset] = {}

    def put(self, path: Path, dataset: Dataset) -> None:
        self.items[path] = dataset

    def discard(self, path: Path) -> None:
        self.items.pop(path, None)


def item(accession: str = "A1") -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.AccessionNumber = accession
    return ds


def make_store(tmp_path: Path, **kwargs) -> tuple[WorklistStore, IndexSpy]:
    index = IndexSpy()
    store = WorklistStore(Settings(worklist_dir=tmp_path / "wl", **kwargs), index)
    store.prepare()
    return store, index


def test_prepare_creates_folder_and_lockfile_and_removes_leftovers(tmp_path):
    folder = tmp_path / "wl"
    folder.mkdir()
    (folder / f"{TEMP_PREFIX}123-0").write_bytes(b"half a file")
    store = WorklistStore(Settings(worklist_dir=folder))
    removed = store.prepare()
    assert [p.name for p in removed] == [f"{TEMP_PREFIX}123-0"]
    assert (folder / LOCKFILE).exists()
    assert sorted(p.name for p in folder.iterdir()) == [LOCKFILE]


def test_write_is_a_part10_file_with_explicit_vr_le_and_updates_the_index(tmp_path):
    store, index = make_store(tmp_path)
    path = store.path_for("order-1")
    store.write(path, item(), "order-1")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.31"
    assert ds.AccessionNumber == "A1"
    assert index.items[path].AccessionNumber == "A1"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_rewrite_replaces_in_place_and_delete_removes(tmp_path):
    store, index = make_store(tmp_path)
    path = store.path_for("order-1")
    store.write(path, item("A1"), "order-1")
    store.write(path, item("A2"), "order-1")
    assert pydicom.dcmread(path).AccessionNumber == "A2"
    assert len(list(path.parent.glob("*.wl"))) == 1
    assert store.delete(path) is True
    assert not path.exists() and path not in index.items
    assert store.delete(path) is False


@pytest.mark.parametrize("identity", ["../../etc/passwd", "/abs/path", "a/b\\c\x00", "x" * 5000])
def test_names_come_from_a_hash_so_content_cannot_steer_the_path(tmp_path, identity):
    store, _ = make_store(tmp_path)
    path = store.path_for(identity)
    assert path.parent == store.folder
    assert path.name.endswith(".wl") and len(path.name) == 35
    assert store.path_for(identity) == path  # stable


def test_paths_outside_the_folder_are_refused(tmp_path):
    store, _ = make_store(tmp_path)
    with pytest.raises(StoreError):
        store.write(tmp_path / "elsewhere.wl", item())
    with pytest.raises(StoreError):
        store.write(store.folder / "../escape.wl", item())


def test_a_link_in_the_folder_is_followed_for_the_check_and_refused_if_it_leads_out(tmp_path):
    store, _ = make_store(tmp_path)
    outside = tmp_path / "outside.wl"
    outside.write_bytes(b"someone else's file")
    link = store.folder / "link.wl"
    link.symlink_to(outside)
    with pytest.raises(StoreError, match="outside the worklist folder"):
        store.write(link, item())
    assert outside.read_bytes() == b"someone else's file" and link.is_symlink()
    inside = store.folder / "target.wl"
    store.write(inside, item("A2"))
    (store.folder / "inner.wl").symlink_to(inside)
    store.write(store.folder / "inner.wl", item("A3"))  # a link that stays inside is written
    assert pydicom.dcmread(store.folder / "inner.wl").AccessionNumber == "A3"
    store.write(store.folder / "new.wl", item("A4"))  # a new name: written
    assert pydicom.dcmread(store.folder / "new.wl").AccessionNumber == "A4"


def test_a_write_that_cannot_be_made_is_a_store_error_and_leaves_nothing(tmp_path):
    store, index = make_store(tmp_path)
    for child in store.folder.iterdir():
        child.unlink()
    store.folder.rmdir()
    store.folder.write_bytes(b"not a folder")  # every file operation in it now fails
    with pytest.raises(StoreError, match="cannot write"):
        store.write(store.path_for("x"), item(), "x")
    assert index.items == {}


def test_per_ae_layout_writes_into_the_own_ae_title_folder(tmp_path):
    store, _ = make_store(tmp_path, worklist_layout="per-ae", ae_title="MWL1")
    assert store.folder == tmp_path / "wl" / "MWL1"
    assert (store.folder / LOCKFILE).exists()


def test_a_rewritten_item_keeps_its_sop_instance_uid(tmp_path):
    store, _ = make_store(tmp_path)
    path = store.path_for("order-1")
    store.write(path, item(), "order-1")
    first = pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID
    read_back = pydicom.dcmread(path)
    read_back.PatientName = "Doe^Janet"
    store.write(path, read_back)  # as an ADT update does: no identity at hand
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID == first


def test_reading_a_fifo_or_a_cut_file_at_an_items_name_fails_at_once(tmp_path):
    store = WorklistStore(Settings(worklist_dir=tmp_path))
    store.prepare()
    fifo = store.path_for("fifo-order")
    os.mkfifo(fifo)  # no writer: a blocking open would wait forever
    with pytest.raises(StoreError, match="not a regular file"):
        store.read(fifo)
    cut = store.path_for("cut-order")
    cut.write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(StoreError, match="does not parse completely"):
        store.read(cut)
    assert store.read(store.path_for("absent")) is None
    assert store.expired(0, ("SCHEDULED",)) == []  # the sweep skips both, without blocking
