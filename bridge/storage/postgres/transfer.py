"""Between a folder of .wl files and PostgreSQL: `wlbridge export` and `wlbridge import`.

The folder layout is the folder store's: items of partition '' at the top, those of a called AE
title in its sub-folder (per-ae layout), each named after its identity's hash, with the
`lockfile` wlmscpfs wants. An exported folder is served by wlmscpfs and Orthanc as it is;
importing it back gives each item the key it had.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bridge.dicom.wlfile import MAX_FILE_SIZE, UnsafeFile, incomplete, read_file_bytes
from bridge.storage.postgres.worklist import (
    NAME_PREFIX,
    ItemKey,
    PostgresWorklist,
    item_name,
    record_of,
)
from bridge.storage.store import LOCKFILE, StoreError

PARTITION = re.compile(r"^[A-Za-z0-9 _.-]{1,16}$")  # an AE title that is a safe folder name


@dataclass
class TransferReport:
    written: int = 0
    removed: int = 0
    skipped: list[str] = field(default_factory=list)  # "name: why"


def _write_durably(path: Path, data: bytes) -> None:
    temp = path.with_name(f".wlbridge-tmp-{os.getpid()}-{path.name}")
    with open(temp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_folder(store: PostgresWorklist, folder: Path, prune: bool = False) -> TransferReport:
    """Write every item as `<folder>[/<partition>]/<name>.wl`; with `prune`, remove the .wl
    files the database no longer has (a folder refreshed for a standby wlmscpfs)."""
    report = TransferReport()
    seen: dict[Path, set[str]] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for key, item in store.scan():
        if key.partition and not PARTITION.match(key.partition):
            report.skipped.append(f"{key.partition!r}: not a folder name")
            continue
        target = folder / key.partition if key.partition else folder
        if target not in seen:
            target.mkdir(exist_ok=True)
            (target / LOCKFILE).touch()
            seen[target] = set()
        name = f"{item_name(key.identity)}.wl"
        _write_durably(target / name, item.data)
        seen[target].add(name)
        report.written += 1
    if prune:
        for target in seen or {folder: set()}:
            for path in target.glob("*.wl"):
                if path.name not in seen.get(target, set()):
                    path.unlink()
                    report.removed += 1
    for target in seen or (folder,):
        _fsync_folder(target)
    return report


def import_folder(store: PostgresWorklist, folder: Path) -> TransferReport:
    """Put every .wl file of the folder (and of its AE title sub-folders) into the database.
    An item already there under the same key is replaced. Files that are not complete items are
    skipped with the reason: nothing half-read is imported."""
    if not folder.is_dir():
        raise StoreError(f"{folder}: not a folder")
    report = TransferReport()
    sources = [("", folder)] + [
        (sub.name, sub)
        for sub in sorted(folder.iterdir())
        if sub.is_dir() and not sub.is_symlink() and PARTITION.match(sub.name)
    ]
    for partition, source in sources:
        for path in sorted(source.glob("*.wl")):
            try:
                data, _ = read_file_bytes(path, MAX_FILE_SIZE)
                why = incomplete(data)
                if why:
                    raise StoreError(why)
                record_of(data)  # readable as an item, or StoreError
                key = ItemKey(partition, NAME_PREFIX + path.stem)
                item_name(key.identity)  # a name safe to export again, or StoreError
            except (OSError, UnsafeFile, StoreError) as exc:
                report.skipped.append(f"{path.relative_to(folder)}: {exc}")
                continue
            store.put(key, data)
            report.written += 1
    return report
