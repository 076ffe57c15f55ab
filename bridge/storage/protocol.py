"""Where worklist items are kept: the storage protocol, and the folder of .wl files as its first
backend.

An item is addressed by an `ItemKey`: the partition (the called AE title in the per-ae layout,
"" in the flat one) and the item's identity (for the bridge's own items, the digest of the
order's identity, which is also the item's id in the HTTP API; for an item another program
wrote, whatever name that program gave it). No file path is an item's identity outside the
folder backend.

Only the worklist service (bridge.core.worklist_service) calls the changing methods (`put`,
`delete`); everything else reads.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from bridge.config import Settings
from bridge.dicom.matching import Record, record_from_dataset
from bridge.dicom.wlfile import read_file_bytes, record_from_bytes
from bridge.storage.index import WorklistIndex
from bridge.storage.store import PlainItem, StoreError, WorklistStore

IDENTITY_DIGEST_LENGTH = 32  # hex characters of the order identity's SHA-256 in a key


@dataclass(frozen=True, order=True)
class ItemKey:
    """One worklist item, wherever it is stored."""

    partition: str  # the called AE title (per-ae layout), "" when the worklist is one
    identity: str  # the order identity's digest (`of_order`), or another program's item name

    @classmethod
    def of_order(cls, order_identity: str, partition: str = "") -> ItemKey:
        """The key of the item the bridge keeps for an order: stable, and steerable by no
        message content (a digest, whatever the identifiers hold)."""
        digest = hashlib.sha256(order_identity.encode("utf-8")).hexdigest()
        return cls(partition, digest[:IDENTITY_DIGEST_LENGTH])


@dataclass(frozen=True)
class StoredItem:
    """An item as stored: its DICOM Part 10 bytes and its compact record (for matching)."""

    data: bytes
    record: Record


@dataclass(frozen=True)
class StorageChange:
    """A change another writer made: `record` is the item's new record, None when it is gone
    (removed, or no longer readable as an item)."""

    key: ItemKey
    record: Record | None


class WorklistStorage(Protocol):
    """The contract of a worklist store: the folder (FolderStorage), or PostgreSQL for bridges
    that share a worklist (bridge.storage.postgres.storage.PostgresStorage, which also has
    `change(key)`: a read-modify-write of one order as one transaction under its lock).

    Durability: `put` and `delete` return only once the change survives a crash of the process
    and of the machine (fsync, a committed transaction); the ACK or DICOM status that follows
    never promises what a restart could take back. A failure raises
    bridge.storage.store.StoreError and leaves the item as it was.

    Writers: within one bridge, the worklist service is the only caller of `put` and `delete`
    and calls them from one thread at a time. Other writers (programs writing into the folder,
    another bridge on the same database) may change items at any time; `watch` reports those.

    Thread-safety: the reading methods (`get`, `find_*`, `scan`) may be called from any thread
    at any time, concurrently with a change; each answers with a state the store was in (an
    item is found whole or not at all), not necessarily the newest.

    Change stream: after `watch(callback)`, the backend calls `callback(StorageChange)` on the
    writer thread (the reactor's) for each change another writer made, at least once per
    change and in the order the store saw them for one key; the bridge's own `put` and
    `delete` are not reported (the service publishes those itself). A change may be reported
    late (the folder backend rescans every index-poll-interval seconds when inotify is not
    available) but is never lost while watching; changes made while not watching are found
    by the next `scan`.
    """

    def get(self, key: ItemKey) -> StoredItem | None:
        """The item, or None when there is none."""
        ...

    def contains(self, key: ItemKey) -> bool:
        """Whether there is an item under `key` (without reading it)."""
        ...

    def record(self, key: ItemKey) -> Record | None:
        """The item's record (for matching and checks), None when there is none."""
        ...

    def dataset(self, key: ItemKey) -> Dataset | None:
        """The item as a Dataset (to change it and put it back), None when there is none;
        StoreError when what is stored is not a readable item."""
        ...

    def put(
        self, key: ItemKey, item: Dataset | PlainItem, order_identity: str | None = None
    ) -> None:
        """Store the item under `key`, replacing what was there, durably. The item's SOP
        Instance UID comes from `order_identity` (a new order), else it keeps its own."""
        ...

    def delete(self, key: ItemKey) -> bool:
        """Remove the item durably; False when there was none."""
        ...

    def find_by_patient(self, patient_id: str, issuer: str | None = None) -> list[ItemKey]:
        """A patient's items whatever their status; with `issuer`, only those whose issuer is
        that one or not recorded."""
        ...

    def find_by_order(self, values: dict[str, Any]) -> list[ItemKey]:
        """The items with the Scheduled Procedure Step ID of `values` and any one of its other
        order identifiers (placer, filler, accession number, Study Instance UID)."""
        ...

    def items_of_patient(
        self, patient_id: str, issuer: str | None = None
    ) -> list[tuple[Path, Dataset]]:
        """(path, item) of a patient's items (as find_by_patient), read now."""
        ...

    def scan(self) -> Iterator[tuple[ItemKey, Record]]:
        """Every item now, in scheduled start order."""
        ...

    def watch(self, callback: Callable[[StorageChange], None]) -> None:
        """Report other writers' changes to `callback` (see the class's contract)."""
        ...

    def stop_watching(self) -> None: ...


class ItemPaths:
    """Keys and the paths of items, the same for every backend (the folder's files; the
    database's virtual paths, so callers by path keep working): from `settings`, `root` (the
    worklist folder) and `per_ae` of the class it is mixed into."""

    settings: Settings
    root: Path
    per_ae: bool

    @property
    def own_partition(self) -> str:
        """The partition the bridge's new items go to: its own AE title in per-ae."""
        return self.settings.ae_title if self.per_ae else ""

    def path_of(self, key: ItemKey) -> Path:
        """The file of an item: in its called AE's sub-folder (per-ae), else in the folder."""
        folder = self.root / key.partition if self.per_ae else self.root
        return folder / f"{key.identity}.wl"

    def key_of(self, path: str | os.PathLike) -> ItemKey:
        path = Path(path)
        partition = path.parent.name if self.per_ae else ""
        return ItemKey(partition, path.stem)


class FolderStorage(ItemPaths):
    """The worklist folder as a `WorklistStorage`: one DICOM Part 10 file an item, named
    `<identity>.wl`, in the folder (flat) or in the called AE's sub-folder (per-ae). Writes go
    through WorklistStore (temporary file, fsync, rename, fsync of the folder); reads through
    the in-memory index, whose cache file and inotify/poll watcher belong to this backend."""

    def __init__(self, settings: Settings, store: WorklistStore, index: WorklistIndex) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.root = Path(settings.worklist_dir)
        self.per_ae = settings.worklist_layout == "per-ae"
        self._reactor: Any = None

    # ---- the protocol

    def get(self, key: ItemKey) -> StoredItem | None:
        path = self.path_of(key)
        try:
            data, _stat = read_file_bytes(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a FIFO, a file too large: never an item
            raise StoreError(f"cannot read {path.name}: {exc}") from exc
        record = self.index.record(path) or record_from_bytes(data)
        if record is None:  # something only pydicom reads
            try:
                record = record_from_dataset(dcmread(io.BytesIO(data), stop_before_pixels=True))
            except (InvalidDicomError, ValueError, EOFError) as exc:
                raise StoreError(f"cannot read {path.name}: {exc}") from exc
        return StoredItem(data, record)

    def contains(self, key: ItemKey) -> bool:
        return self.path_of(key).exists()

    def record(self, key: ItemKey) -> Record | None:
        path = self.path_of(key)
        record = self.index.record(path)
        if record is None and path.exists():
            stored = self.get(key)
            record = stored.record if stored is not None else None
        return record

    def dataset(self, key: ItemKey) -> Dataset | None:
        return self.store.read(self.path_of(key))

    def put(
        self, key: ItemKey, item: Dataset | PlainItem, order_identity: str | None = None
    ) -> None:
        self.store.write(self.path_of(key), item, order_identity)

    def delete(self, key: ItemKey) -> bool:
        return self.store.delete(self.path_of(key))

    def find_by_patient(self, patient_id: str, issuer: str | None = None) -> list[ItemKey]:
        return [self.key_of(p) for p in self.index.paths_of_patient(patient_id, issuer)]

    def find_by_order(self, values: dict[str, Any]) -> list[ItemKey]:
        return [self.key_of(p) for p in self.index.paths_of_order(values)]

    def items_of_patient(
        self, patient_id: str, issuer: str | None = None
    ) -> list[tuple[Path, Dataset]]:
        return self.index.items_of_patient(patient_id, issuer)

    def scan(self) -> Iterator[tuple[ItemKey, Record]]:
        for key, _folder, record, _mtime in self.index.snapshot():
            yield self.key_of(key), record

    def watch(self, callback: Callable[[StorageChange], None], reactor: Any = None) -> None:
        def changed(path: str, record: Record | None) -> None:
            callback(StorageChange(self.key_of(path), record))

        self.index.on_external_change = changed
        if reactor is not None:
            self._reactor = reactor
            self.index.start_watching(reactor)

    def stop_watching(self) -> None:
        self.index.on_external_change = None
        if self._reactor is not None:
            self.index.stop_watching()
            self._reactor = None
