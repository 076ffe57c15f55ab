"""MPPS instances as DICOM files in their own folder (`mpps-dir`), each write durable.

An instance is written to a temporary file, fsynced, renamed over its file and the folder
fsynced before the MPPS SCP answers success, so an N-SET after a restart finds what the N-CREATE
stored. File names are a hash of the SOP Instance UID: no peer content steers a path. The store
is changed on the writer thread only; it keeps each instance's status and patient in memory
(read at start) and reads the file itself when an N-SET needs it.

With a retention (`Retention`: mpps-retention, mpps-in-progress-retention), instances are kept
for a while after their last change (the file's time): `load` removes the expired ones instead
of reading them (those past the longer retention without opening them), and the sweep
(bridge.ops.mpps_retention) finds the others in a worker thread (`expired`) and removes them
on the writer thread (`remove`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

from pydicom import Dataset, dcmread

from bridge.storage.mpps_instance import (  # noqa: F401 (re-export)
    MPPS_SOP_CLASS,
    REMOVED_UNREAD,
    Known,
    Retention,
    encode_instance,
    removal_kind,
)
from bridge.storage.mpps_instance import known_of as _known
from bridge.storage.store import StoreError

log = logging.getLogger("bridge.storage.mpps_store")

TEMP_PREFIX = ".wlbridge-tmp-"
SUFFIX = ".dcm"
_OWN_NAME = re.compile(r"[0-9a-f]{32}\.dcm")  # path_for's names: only those are removed unread
# (uid, status, the file's time) of an instance a sweep found past its retention
Expired = tuple[str, str, float]


class MPPSStore:
    def __init__(self, folder: Path, retention: Retention | None = None) -> None:
        self.folder = folder
        self.retention = retention  # None: kept forever (tools that only read)
        self._known: dict[str, Known] = {}
        self._counter = itertools.count()
        self.removed_at_load: Counter[str] = Counter()

    def load(self, now: float | None = None) -> int:
        """Create the folder, drop temporary files a crash left, read every instance's status.
        With a retention, expired instances are removed rather than kept: a file older than
        both retentions without reading it (a bridge stopped for months starts as fast as one
        that swept), one older than its status's retention once read. Returns the number of
        instances kept; `removed_at_load` counts the others by kind."""
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time() if now is None else now
        retention = self.retention
        with os.scandir(self.folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(TEMP_PREFIX):
                    Path(entry.path).unlink(missing_ok=True)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                age = 0.0
                if retention is not None:
                    try:
                        age = now - entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age > retention.longest and _OWN_NAME.fullmatch(name):
                        self._unlink(Path(entry.path), REMOVED_UNREAD)
                        continue
                try:
                    ds = dcmread(entry.path, stop_before_pixels=True)
                    uid = str(ds.SOPInstanceUID)
                except Exception as exc:  # another program's file, or a damaged one
                    log.warning("skipping unreadable MPPS file %s: %s", name, exc)
                    continue
                known = _known(ds)
                if retention is not None and age > retention.limit(known.status):
                    self._unlink(Path(entry.path), removal_kind(known.status))
                    continue
                self._known[uid] = known
        return len(self._known)

    def _unlink(self, path: Path, kind: str) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:  # kept; the next start or sweep tries again
            log.warning("cannot remove expired MPPS file %s: %s", path.name, exc)
            return
        self.removed_at_load[kind] += 1

    def expired(self, retention: Retention, now: float | None = None) -> list[Expired]:
        """The instances past their retention (by the file's time, the last change): reads
        only, so it may run in a worker thread; `remove` then removes them."""
        now = time.time() if now is None else now
        found = []
        for uid, known in self.snapshot().items():
            try:
                mtime = self.path_for(uid).stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime > retention.limit(known.status):
                found.append((uid, known.status, mtime))
        return found

    def remove(self, found: list[Expired]) -> Counter[str]:
        """On the writer thread: remove each instance `expired` found, unless it changed since
        (an N-SET rewrote it). Returns the removals by kind (finished, in-progress)."""
        removed: Counter[str] = Counter()
        for uid, status, mtime in found:
            known = self._known.get(uid)
            if known is None or known.status != status:
                continue
            path = self.path_for(uid)
            try:
                if path.stat().st_mtime != mtime:
                    continue
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove expired MPPS instance %s: %s", uid, exc)
                continue
            del self._known[uid]
            removed[removal_kind(status)] += 1
        return removed

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, uid: str) -> bool:
        return uid in self._known

    def status(self, uid: str) -> str | None:
        known = self._known.get(uid)
        return known.status if known is not None else None

    def path_for(self, uid: str) -> Path:
        return self.folder / (hashlib.sha256(uid.encode("utf-8")).hexdigest()[:32] + SUFFIX)

    def get(self, uid: str) -> Dataset | None:
        if uid not in self._known:
            return None
        return dcmread(self.path_for(uid))

    def put(self, uid: str, dataset: Dataset) -> None:
        """Write the instance durably (replacing an earlier version)."""
        data = encode_instance(uid, dataset)
        path = self.path_for(uid)
        temp = self.folder / f"{TEMP_PREFIX}{os.getpid()}-{next(self._counter)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
            folder_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder_fd)
            finally:
                os.close(folder_fd)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
        self._known[uid] = _known(dataset)

    def stored(self, uid: str) -> tuple[Dataset, float] | None:
        """The instance (without pixel data) and when it was stored (seconds since the epoch);
        None when there is none. Safe on any thread: it reads the file."""
        path = self.path_for(uid)
        try:
            return dcmread(path, stop_before_pixels=True), path.stat().st_mtime
        except FileNotFoundError:
            return None

    def stored_times(self, uids: list[str]) -> dict[str, float]:
        """When each instance still there was stored (seconds since the epoch)."""
        times = {}
        for uid in uids:
            try:
                times[uid] = self.path_for(uid).stat().st_mtime
            except FileNotFoundError:
                continue
        return times

    def snapshot(self) -> dict[str, Known]:
        """A copy of what the store knows (UID -> status, patient), for readers on other
        threads (the HTTP API lists instances from it)."""
        return dict(self._known)

    def of_patient(self, patient_id: str, issuer: str = "") -> list[str]:
        """The UIDs of the instances of a patient (with `issuer`: that issuer's or none)."""
        return [
            uid
            for uid, known in self._known.items()
            if known.patient_id == patient_id and (not issuer or known.issuer in ("", issuer))
        ]


def mpps_store_for(settings):
    """The MPPS store of the settings: the folder (`mpps-dir`), or PostgreSQL when `store` is
    a PostgreSQL URL (shared by every bridge of that store)."""
    from bridge.storage.postgres import is_postgres_url

    if is_postgres_url(settings.store):
        from bridge.storage.postgres.mpps import PostgresMPPSStore

        return PostgresMPPSStore(settings.store)
    return MPPSStore(settings.mpps_dir, Retention.of(settings))
