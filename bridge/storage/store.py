"""Step 5 of the pipeline: worklist items become DICOM Part 10 files in the worklist folder.

Every change is durable before it returns (temporary file in the same folder, fsync, rename,
fsync of the folder), so an ACK that follows it never promises what a crash could take back.
File names come from a hash of the item's identity, so no message content can steer a path.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import os
import stat
import struct
import time
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from bridge.config import Settings
from bridge.dicom.wlfile import read_dataset

WORKLIST_SOP_CLASS = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
TEMP_PREFIX = ".wlbridge-tmp-"
LOCKFILE = "lockfile"  # wlmscpfs refuses to serve a folder without one


class PlainItem(Protocol):
    """worklist_item.Item: (tag, VR, value) elements in tag order, and their Dataset."""

    elements: list

    def to_dataset(self) -> Dataset: ...


class IndexUpdates(Protocol):
    def put(self, path: Path, dataset: Dataset | PlainItem) -> None: ...
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
    body = encode_dataset(dataset)
    if body is None:  # something the short encoder leaves to pydicom
        return _pydicom_encode_file(dataset, sop_instance_uid)
    return _file_meta(sop_instance_uid) + body


def _pydicom_encode_file(dataset: Dataset, sop_instance_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WORKLIST_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta = meta
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# A short Explicit VR Little Endian encoder for the items the bridge builds: pydicom's writer
# spends ~1 ms an item on generic checks, about half the CPU of a whole message. It covers the
# VRs and charsets of our items and gives up (None: pydicom writes the file) on anything else;
# its output is byte for byte pydicom's (tests/test_store_encoding.py compares them).
_LONG_LENGTH_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                              "UT", "UV"))  # fmt: skip
_CHARSET_VRS = frozenset(("LO", "LT", "PN", "SH", "ST", "UC", "UT"))  # in the item's charset
_ASCII_VRS = frozenset(("AE", "AS", "CS", "DA", "DT", "TM", "UR"))  # pydicom: Latin-1
_ITEM = b"\xfe\xff\x00\xe0"


def _text_value(value, codec: str) -> bytes:
    if type(value) is str:  # the usual case first
        data = value.encode(codec)
    elif isinstance(value, MultiValue | list | tuple):
        data = b"\\".join(str(v).encode(codec) for v in value)
    else:
        data = str(value).encode(codec)
    return data + b" " if len(data) % 2 else data


def _plain(dataset: Dataset) -> list:
    """A Dataset's elements as (tag, VR, value), as `worklist_item.Item` holds them; LookupError
    for what the short encoder does not write as pydicom would."""
    out = []
    for elem in dataset:
        if elem.is_raw:
            raise LookupError("raw element")
        if elem.VR == "SQ":
            if elem.is_undefined_length or any(
                item.is_undefined_length_sequence_item for item in elem.value
            ):
                raise LookupError("undefined length")  # kept as read: pydicom writes it so
            out.append((elem.tag, "SQ", [_plain(item) for item in elem.value]))
        else:
            value = elem.value
            out.append((elem.tag, elem.VR, list(value) if isinstance(value, MultiValue) else value))
    return out


def encode_dataset(dataset: Dataset) -> bytes | None:
    """The Explicit VR Little Endian bytes of a dataset, or None when pydicom must do it."""
    try:
        return encode_elements(_plain(dataset))
    except LookupError:
        return None


# Items as plain (tag, VR, value) elements: the pipeline's new items (worklist_item.Item), and
# Datasets by way of _plain.
_HEADS: dict[tuple[int, str], bytes] = {}


def _head(tag: int, vr: str) -> bytes:
    head = _HEADS.get((tag, vr))
    if head is None:
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
        if len(_HEADS) < 4096:
            _HEADS[(tag, vr)] = head
    return head


def _plain_element(tag: int, vr: str, value: bytes) -> bytes:
    if vr in _LONG_LENGTH_VRS:
        return _head(tag, vr) + struct.pack("<HI", 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise OverflowError(vr)
    return _head(tag, vr) + struct.pack("<H", len(value)) + value


_PACK_SHORT = struct.Struct("<H").pack
_PACK_LONG = struct.Struct("<HI").pack
_PACK_ITEM = struct.Struct("<I").pack


def _encode_plain(elements: list, codec: str) -> bytes:
    # _plain_element's bytes, with its look-ups and packing inlined: this runs for every
    # element of every new item.
    out: list[bytes] = []
    heads = _HEADS
    for tag, vr, value in elements:
        if tag >> 16 == 0x0002:
            raise LookupError("file meta element")
        if vr == "SQ":
            items = []
            for item in value:
                data = _encode_plain(item, codec)
                items.append(_ITEM + _PACK_ITEM(len(data)) + data)
            data = b"".join(items)
        elif value is None or value == "" or (isinstance(value, list) and not value):
            data = b""
        elif vr in _CHARSET_VRS:
            data = _text_value(value, codec)
        elif vr in _ASCII_VRS:
            data = _text_value(value, "latin-1")
        elif vr == "UI" and isinstance(value, str):
            data = _uid_bytes(value.strip())  # as pydicom's UID
        elif vr == "US" and isinstance(value, int):
            data = _PACK_SHORT(value)
        elif vr in ("DS", "IS") and isinstance(value, str):  # our own text: written as it is
            data = _text_value(value, "latin-1")
        else:  # numbers as text keep their original text in pydicom, several UIDs...: pydicom
            raise LookupError(vr)
        head = heads.get((tag, vr)) or _head(tag, vr)
        if vr in _LONG_LENGTH_VRS:
            out += (head, _PACK_LONG(0, len(data)), data)
        elif len(data) > 0xFFFF:
            raise OverflowError(vr)
        else:
            out += (head, _PACK_SHORT(len(data)), data)
    return b"".join(out)


def encode_elements(elements: list) -> bytes | None:
    """The Explicit VR Little Endian bytes of an item's plain elements, or None when the item's
    Dataset must be written by pydicom."""
    charset = next((e[2] for e in elements if e[0] == 0x00080005), None)
    if charset is None:
        codec = "latin-1"
    elif isinstance(charset, str) and charset in python_encoding:
        codec = python_encoding[charset]
        if codec.startswith("iso2022") or charset.startswith("ISO 2022"):
            return None
    else:
        return None
    try:
        return _encode_plain(elements, codec)
    except (LookupError, OverflowError, UnicodeEncodeError, TypeError, ValueError):
        return None


@functools.cache
def _meta_parts() -> tuple[bytes, bytes, bytes]:
    before = _plain_element(0x00020001, "OB", b"\x00\x01")
    before += _plain_element(0x00020002, "UI", _uid_bytes(WORKLIST_SOP_CLASS))
    version = f"PYDICOM {'.'.join(pydicom.__version_info__)}"
    after = (
        _plain_element(0x00020010, "UI", _uid_bytes(ExplicitVRLittleEndian))
        + _plain_element(0x00020012, "UI", _uid_bytes(PYDICOM_IMPLEMENTATION_UID))
        + _plain_element(0x00020013, "SH", _text_value(version, "ascii"))
    )
    return b"\0" * 128 + b"DICM", before, after


def _uid_bytes(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _file_meta(sop_instance_uid: str) -> bytes:
    prefix, before, after = _meta_parts()
    group = before + _plain_element(0x00020003, "UI", _uid_bytes(sop_instance_uid)) + after
    return prefix + _plain_element(0x00020000, "UL", struct.pack("<I", len(group))) + group


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
        self._resolved_root: Path | None = None
        self._folder_inside = False  # our folder, resolved once, is inside the root

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
        """The item at `path`; None when there is none. A file that is not a complete item
        (another program's FIFO, a truncated copy) raises StoreError: never read as one."""
        try:
            return read_dataset(path)
        except FileNotFoundError:
            return None
        except (OSError, InvalidDicomError) as exc:
            raise StoreError(f"cannot read {path.name}: {exc}") from exc

    def write(self, path: Path, dataset: Dataset | PlainItem, identity: str | None = None) -> None:
        """Replace `path` (inside the folder) with `dataset` (a Dataset, or a new item's plain
        elements: worklist_item.Item), durably."""
        self._check_inside(path)
        uid = self._instance_uid(dataset, identity, path)
        if isinstance(dataset, Dataset):
            data = encode_file(dataset, uid)
        else:  # plain elements (worklist_item.Item): a new item from a message
            body = encode_elements(dataset.elements)
            if body is None:  # something only pydicom writes: as a Dataset, as before
                dataset = dataset.to_dataset()
                data = encode_file(dataset, uid)
            else:
                data = _file_meta(uid) + body
        # plain strings: pathlib's joins cost more than the system calls they name
        folder = os.path.dirname(os.fspath(path)) or "."
        temp = os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{next(self._counter)}")
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
            self._fsync_folder(folder)
        except OSError as exc:
            try:
                os.unlink(temp)
            except OSError:  # FileNotFoundError included: nothing was created
                pass
            raise StoreError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
        if self.index is not None:
            self.index.put(path, dataset)

    @staticmethod
    def _instance_uid(dataset: Dataset | PlainItem, identity: str | None, path: Path) -> str:
        """Stable across rewrites: from the order's identity, else the file's own (an item read
        back for an ADT update keeps its UID), else from the file name."""
        if identity:
            return _uid_from_identity(identity)
        meta = getattr(dataset, "file_meta", None)
        existing = meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
        return str(existing) if existing else _uid_from_identity(path.name)

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

    def expired(self, max_age: float, finished_statuses: tuple[str, ...]) -> list[Path]:
        """Items in a finished status whose file is older than `max_age` seconds. Only reads, so
        it may run in a worker thread; `delete_if_expired` then removes them one by one."""
        cutoff = time.time() - max_age
        found = []
        for path in self.folder.glob("*.wl"):
            try:
                if path.stat().st_mtime > cutoff:
                    continue
                item = read_dataset(path, specific_tags=["ScheduledProcedureStepSequence"])
            except (OSError, InvalidDicomError, ValueError):
                continue
            steps = item.get("ScheduledProcedureStepSequence") or []
            statuses = {str(s.get("ScheduledProcedureStepStatus", "")) for s in steps}
            if statuses and statuses <= set(finished_statuses):
                found.append(path)
        return found

    def delete_if_expired(self, path: Path, max_age: float) -> bool:
        """Delete `path` unless it was rewritten since it was found expired (a new order)."""
        try:
            if path.stat().st_mtime > time.time() - max_age:
                return False
        except FileNotFoundError:
            return False
        return self.delete(path)

    def _check_inside(self, path: Path) -> None:
        # Items of other programs may be rewritten (ADT updates), but only inside the folder.
        if self._resolved_root is None:  # resolved once: it costs a system call per component
            self._resolved_root = self.root.resolve()
            self._folder_inside = self.folder.resolve().is_relative_to(self._resolved_root)
        if path.suffix != ".wl":
            raise StoreError(f"refusing to write outside the worklist folder: {path}")
        if self._folder_inside and path.parent == self.folder:
            # A file of our own folder (resolved once, like the root): only the name itself
            # could lead elsewhere, as a symbolic link; one lstat instead of one a component.
            try:
                if not stat.S_ISLNK(os.lstat(path).st_mode):
                    return
            except FileNotFoundError:
                return
            except OSError:
                pass  # resolved in full below, as before
        if not path.resolve().is_relative_to(self._resolved_root):
            raise StoreError(f"refusing to write outside the worklist folder: {path}")

    def _fsync_folder(self, folder: Path | str | None = None) -> None:
        fd = os.open(folder or self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
