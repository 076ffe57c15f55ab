"""Step 5 of the pipeline: worklist items become DICOM Part 10 files in the worklist folder.

Every change is durable before it returns (temporary file in the same folder, fsync, rename,
fsync of the folder), so an ACK that follows it never promises what a crash could take back.
File names come from a hash of the item's identity, so no message content can steer a path.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import time
from pathlib import Path
from typing import Protocol

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from bridge.config import Settings

WORKLIST_SOP_CLASS = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
TEMP_PREFIX = ".wlbridge-tmp-"
LOCKFILE = "lockfile"  # wlmscpfs refuses to serve a folder without one


class IndexUpdates(Protocol):
    def put(self, path: Path, dataset: Dataset) -> None: ...
    def discard(self, path: Path) -> None: ...


class StoreError(Exception):
    """A change that could not be made durable (disk full, permission denied...)."""


def worklist_folder(settings: Settings) -> Path:
    """Where the bridge writes: the folder itself, or its own AE title's sub-folder (per-ae)."""
    if settings.worklist_layout == "per-ae":
        return settings.worklist_dir / settings.ae_title
    return settings.worklist_dir


def encode_file(dataset: Dataset, sop_instance_uid: str) -> bytes:
    """The Part 10 bytes of an item: preamble, file meta, Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WORKLIST_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta = meta
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _uid_from_identity(identity: str) -> str:
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


class WorklistStore:
    """The bridge's writes to the worklist folder, each made durable before returning."""

    def __init__(self, settings: Settings, index: IndexUpdates | None = None) -> None:
        self.root = settings.worklist_dir
        self.folder = worklist_folder(settings)
        self.index = index
        self._counter = itertools.count()

    def prepare(self) -> list[Path]:
        """Create the folder and its lockfile; remove temporary files a crash left behind."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self.folder / LOCKFILE
        if not lock.exists():
            lock.touch()
        leftovers = [p for p in self.folder.iterdir() if p.name.startswith(TEMP_PREFIX)]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            self._fsync_folder()
        return leftovers

    def path_for(self, identity: str) -> Path:
        name = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]
        return self.folder / f"{name}.wl"

    def read(self, path: Path) -> Dataset | None:
        try:
            return dcmread(path)
        except FileNotFoundError:
            return None

    def write(self, path: Path, dataset: Dataset, identity: str | None = None) -> None:
        """Replace `path` (inside the folder) with `dataset`, durably."""
        self._check_inside(path)
        data = encode_file(dataset, _uid_from_identity(identity or path.name))
        temp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{next(self._counter)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
            self._fsync_folder(path.parent)
        except OSError as exc:
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StoreError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
        if self.index is not None:
            self.index.put(path, dataset)

    def delete(self, path: Path) -> bool:
        """Remove an item durably; False when it was not there."""
        self._check_inside(path)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete {path.name}: {exc.strerror or exc}") from exc
        self._fsync_folder(path.parent)
        if self.index is not None:
            self.index.discard(path)
        return True

    def remove_expired(self, max_age: float, finished_statuses: list[str]) -> list[Path]:
        """Delete items in a finished status whose file is older than `max_age` seconds."""
        cutoff = time.time() - max_age
        removed = []
        for path in self.folder.glob("*.wl"):
            try:
                if path.stat().st_mtime > cutoff:
                    continue
                item = dcmread(path, specific_tags=["ScheduledProcedureStepSequence"])
            except (OSError, InvalidDicomError):
                continue
            steps = item.get("ScheduledProcedureStepSequence") or []
            statuses = {str(s.get("ScheduledProcedureStepStatus", "")) for s in steps}
            if statuses and statuses <= set(finished_statuses) and self.delete(path):
                removed.append(path)
        return removed

    def _check_inside(self, path: Path) -> None:
        # Items of other programs may be rewritten (ADT updates), but only inside the folder.
        if not path.resolve().is_relative_to(self.root.resolve()) or path.suffix != ".wl":
            raise StoreError(f"refusing to write outside the worklist folder: {path}")

    def _fsync_folder(self, folder: Path | None = None) -> None:
        fd = os.open(folder or self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
