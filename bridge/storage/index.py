"""In-memory index of the worklist folder, kept in step with the files.

Items are held as compact records (bridge.dicom.matching.Record) with secondary indexes (patient ID,
accession number, study UID, requested procedure ID, station AE title, modality, SPS ID, SPS
start date), so a selective query touches only its candidates. Updates come from the reactor
thread (the bridge's own store calls put/discard; the watcher applies changes made by other
programs); queries come from pynetdicom's association threads. One lock guards the maps and is
held only for dictionary work: files are read and queries matched outside it.

A restart reads a cache file (`.wlbridge-index.cache` in the folder) and re-reads only the files
whose name, size, mtime or inode changed.
"""

from __future__ import annotations

import bisect
import functools
import gc
import io
import logging
import os
import pickle
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

from bridge.config import Settings
from bridge.dicom.matching import (
    ACCESSION_NUMBER,
    ISSUER_OF_PATIENT_ID,
    MODALITY,
    PATIENT_ID,
    REQUESTED_PROCEDURE_ID,
    SPS_ID,
    SPS_SEQUENCE,
    SPS_START_DATE,
    STATION_AET,
    STUDY_INSTANCE_UID,
    Query,
    Record,
    canonical_date,
    compile_query,
    missing_required,
    record_from_dataset,
    record_from_elements,
    sort_key,
)
from bridge.dicom.wlfile import (
    UnsafeFile,
    incomplete,
    read_dataset,
    read_file_bytes,
    record_from_bytes,
)

if TYPE_CHECKING:
    from bridge.storage.store import PlainItem

CACHE_NAME = ".wlbridge-index.cache"
CACHE_VERSION = 1
SAFETY_NET_INTERVAL = 60.0  # seconds between full rescans when inotify reports changes
_RECENT = 2.0  # files younger than this are left out of the cache: mtime may not yet tell
PARALLEL_MIN_FILES = 4000  # fewer files to read at start-up: one process (a pool costs ~0.5 s)
_CHUNK = 1000  # files per task of the start-up pool

Signature = tuple[int, int, int]  # size, mtime_ns, inode

# Hint name (bridge.dicom.matching.Hints) -> (level, tag) the values come from.
_INDEXED = {
    "patient_ids": ("top", PATIENT_ID),
    "accession_numbers": ("top", ACCESSION_NUMBER),
    "study_uids": ("top", STUDY_INSTANCE_UID),
    "requested_procedure_ids": ("top", REQUESTED_PROCEDURE_ID),
    "station_aets": ("sps", STATION_AET),
    "modalities": ("sps", MODALITY),
    "sps_ids": ("sps", SPS_ID),
}


class Entry:
    __slots__ = ("key", "folder", "record", "sig", "order")

    def __init__(self, key: str, folder: str, record: Record, sig: Signature | None) -> None:
        self.key = key
        self.folder = folder
        self.record = record
        self.sig = sig
        self.order = (sort_key(record), key)


def _vals(value: Any) -> tuple:
    if value is None or value == "":
        return ()
    return value if isinstance(value, tuple) else (value,)


def _index_values(rec: Record) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {name: set() for name in _INDEXED}
    out["dates"] = set()
    steps = [s for s in _vals(rec.get(SPS_SEQUENCE)) if isinstance(s, Record)]
    for name, (level, tag) in _INDEXED.items():
        sources = (rec,) if level == "top" else steps
        for src in sources:
            out[name].update(v for v in _vals(src.get(tag)) if isinstance(v, str))
    for step in steps:
        for v in _vals(step.get(SPS_START_DATE)):
            date = canonical_date(str(v))
            if date:
                out["dates"].add(date)
    return out


# Index maps hold a single key (str) while a value has one item, a set beyond: most patient
# IDs and accession numbers name one item, and a set per value would cost 200+ bytes.
def _add(index: dict, value: str, key: str) -> None:
    held = index.get(value)
    if held is None:
        index[value] = key
    elif isinstance(held, str):
        if held != key:
            index[value] = {held, key}
    else:
        held.add(key)


def _remove(index: dict, value: str, key: str) -> None:
    held = index.get(value)
    if held is None:
        return
    if isinstance(held, str):
        if held == key:
            del index[value]
        return
    held.discard(key)
    if len(held) == 1:
        index[value] = next(iter(held))
    elif not held:
        del index[value]


def _size(held: Any) -> int:
    return 0 if held is None else 1 if isinstance(held, str) else len(held)


def _keys(held: Any) -> Iterable[str]:
    return () if held is None else (held,) if isinstance(held, str) else held


class _CacheUnpickler(pickle.Unpickler):
    """The cache lives in a folder other programs write to: unpickle our two types only."""

    _ALLOWED = {("bridge.dicom.matching", "Record"), ("bridge.dicom.matching", "layout_of")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the index cache")
        return super().find_class(module, name)


def read_record(path: str, root: str | None = None) -> tuple[Record, Signature]:
    """The record of a worklist file and the signature of the version read. Only a regular
    file (inside `root`, when given: a symlink may point anywhere) of a bounded size that
    parses completely gives one; anything else raises OSError or ValueError."""
    if root is not None:
        _check_inside(path, root)
    data, st = read_file_bytes(path)
    record = record_from_bytes(data)
    if record is None:  # something the short reader leaves to pydicom
        reason = incomplete(data)  # the short reader declines these too
        if reason is not None:
            raise UnsafeFile(f"does not parse completely: {reason}")
        record = record_from_dataset(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))
    return record, (st.st_size, st.st_mtime_ns, st.st_ino)


def _check_inside(path: str, root: str) -> None:
    """A `.wl` symlink must resolve inside the folder (one lstat for the usual plain file)."""
    if not stat.S_ISLNK(os.lstat(path).st_mode):
        return
    real, real_root = os.path.realpath(path), _real_root(root)
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafeFile(f"points outside the worklist folder (to {real})")


@functools.lru_cache(maxsize=8)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def freeze_loaded() -> None:
    """Once a serving process has loaded its index: move every object it holds now out of the
    cyclic collector's sight. A full collection otherwise walks every record (tens of ms at
    10,000 items, every thread of the process stopped): under 20 querying modalities on
    2 cores, query p99 105-146 ms and max 182-215 ms without, 84-102 and 107-122 ms with.
    Records replaced later are still freed (by reference counting: they hold no cycles)."""
    gc.collect()
    gc.freeze()


def read_records(
    paths: list[str], root: str | None = None
) -> list[tuple[str, Record | None, Signature | None, str | None]]:
    """read_record of each path (in a worker process): (path, record, signature, None), or
    (path, None, None, error message); a file that vanished gives (path, None, None, None)."""
    gc.disable()  # a short-lived worker: nothing to collect
    out: list[tuple[str, Record | None, Signature | None, str | None]] = []
    for path in paths:
        try:
            record, sig = read_record(path, root)
            out.append((path, record, sig, None))
        except FileNotFoundError:
            out.append((path, None, None, None))
        except Exception as exc:
            out.append((path, None, None, str(exc)))
    return out


def _signature(path: str) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def is_worklist_name(name: str) -> bool:
    return name.endswith(".wl") and not name.startswith(".")


# Identifiers of an order, besides its step ID, that a later message may name it by.
_ORDER_KEYS = (
    "AccessionNumber",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "StudyInstanceUID",
)


class WorklistIndex:
    """The worklist items of `settings.worklist_dir` (flat or per-ae layout)."""

    def __init__(self, settings: Settings, log: logging.Logger | None = None) -> None:
        self.settings = settings
        self.log = log or logging.getLogger("bridge.storage.index")
        self.root = os.path.abspath(settings.worklist_dir)
        self.per_ae = settings.worklist_layout == "per-ae"
        self.cache_path = os.path.join(self.root, CACHE_NAME)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._entries: dict[str, Entry] = {}
        self._maps: dict[str, dict] = {name: {} for name in (*_INDEXED, "dates", "folders")}
        self._dates: list[str] = []  # sorted distinct SPS start dates, for range look-ups
        self._warned: dict[str, tuple[str, ...]] = {}  # key -> missing attributes logged
        self._failed: dict[str, Signature | None] = {}  # unreadable files already logged
        self._dirty = False
        self.generation = 0  # counts applied changes; waiters are woken on each
        self._reactor: Any = None
        self._notifier: Any = None
        self._poller: Any = None
        self._polling = False
        self.refresh_inline = False  # True: inotify's changes are read on the calling thread
        self._sync_lock = threading.Lock()
        self.load_stats: dict[str, float] = {}  # of the last load(): items, read, cached, seconds
        self.translation_log: Any = None  # set by the server: lines for other programs' removals
        # called (on the reactor thread) for each change another program made: key, record or
        # None when the item is gone; the folder storage's change stream (bridge.storage.protocol)
        self.on_external_change: Callable[[str, Record | None], None] | None = None
        self.partitions: set[str] | None = None  # set by load_records: no folders on disk

    # ---- paths

    def _key(self, path: str | os.PathLike) -> str:
        return os.path.abspath(path)

    def _folder(self, key: str) -> str | None:
        """The called AE sub-folder of a file (per-ae), "" (flat); None outside the layout."""
        prefix = self.root.rstrip(os.sep) + os.sep
        if key.startswith(prefix) and os.sep + "." not in key and os.sep * 2 not in key:
            rel = key[len(prefix) :]  # keys are absolute and normalised: no relpath needed
        else:
            rel = os.path.relpath(key, self.root)
        parts = rel.split(os.sep)
        if parts[0] == "..":
            return None
        if self.per_ae:
            return parts[0] if len(parts) == 2 else None
        return "" if len(parts) == 1 else None

    def ae_folders(self) -> set[str]:
        """Names of the called AE sub-folders that exist now (per-ae layout); for a store
        without folders (`load_records`), the partitions its items are in and its own."""
        if self.partitions is not None:
            with self._lock:
                return {name for name in self._maps["folders"] if name} | self.partitions
        try:
            with os.scandir(self.root) as it:
                return {e.name for e in it if e.is_dir() and not e.name.startswith(".")}
        except OSError:
            return set()

    def _scan(self) -> dict[str, Signature]:
        """Every worklist file under the root, by key, with its signature."""
        found: dict[str, Signature] = {}
        folders = [self.root]
        if self.per_ae:
            folders = [os.path.join(self.root, name) for name in sorted(self.ae_folders())]
        for folder in folders:
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        if not is_worklist_name(e.name):
                            continue
                        try:
                            st = e.stat()
                        except OSError:
                            continue  # removed while scanning
                        found[e.path] = (st.st_size, st.st_mtime_ns, st.st_ino)
            except OSError as exc:
                self.log.warning("cannot list worklist folder %s: %s", folder, exc)
        return found

    # ---- loading and the cache

    def load(self, save_cache: bool = True) -> None:
        """Initial scan: cached records for unchanged files, a fresh read for the others.
        With `save_cache=False` the refreshed cache is left for `save_cache()` to write later
        (after the server listens: writing it takes ~2 s at 100,000 items)."""
        started = time.monotonic()
        os.makedirs(self.root, exist_ok=True)
        collecting = gc.isenabled()
        gc.disable()  # the load creates millions of objects and frees none: no cycles to look for
        try:
            self._load(started, save_cache)
        finally:
            if collecting:
                gc.enable()

    def _load(self, started: float, save_cache: bool) -> None:
        cached = self._read_cache()
        found = self._scan()
        loaded: list[tuple[str, Record, Signature]] = []
        to_read: list[tuple[str, Signature]] = []
        for key, sig in found.items():
            hit = cached.get(key)
            if hit is not None and hit[0] == sig:
                loaded.append((key, hit[1], sig))
            else:
                to_read.append((key, sig))
        reread = len(to_read)
        with self._lock:
            for key in list(self._entries):
                if key not in found:
                    self._remove_entry(key)
            for key, record, sig in loaded:
                self._set_entry(key, record, sig)
        workers = 0
        if len(to_read) >= PARALLEL_MIN_FILES and (os.cpu_count() or 1) > 1:
            workers = os.cpu_count() or 1
            to_read = self._read_in_processes(to_read, workers, loaded)
        with _SlowReadReporter(self.log) as reporter:
            for key, sig in to_read:
                reporter.reading(key)
                result = self._read(key, sig)
                if result is not None:
                    loaded.append((key, result[0], result[1]))
                    with self._lock:
                        self._set_entry(key, result[0], result[1])
        with self._lock:
            self._bump()
        self._dirty = reread > 0 or len(cached) != len(loaded)
        if self._dirty and save_cache:
            self.save_cache()
        self.load_stats = {
            "items": len(loaded), "read": reread, "cached": len(loaded) - reread + 0,
            "workers": workers, "seconds": time.monotonic() - started,
        }  # fmt: skip
        self.log.info(
            "worklist index: %d items (%d read, %d from cache) in %.2f s",
            len(loaded), reread, len(loaded) - reread, time.monotonic() - started,
        )  # fmt: skip

    def _read_cache(self) -> dict[str, tuple[Signature, Record]]:
        try:
            with open(self.cache_path, "rb") as f:
                data = _CacheUnpickler(f).load()
            if data.get("version") != CACHE_VERSION or data.get("per_ae") != self.per_ae:
                return {}
            return {os.path.join(self.root, rel): v for rel, v in data["entries"].items()}
        except FileNotFoundError:
            return {}
        except Exception as exc:  # a damaged or foreign cache only costs a full read
            self.log.warning("ignoring index cache %s: %s", self.cache_path, exc)
            return {}

    @property
    def cache_is_stale(self) -> bool:
        return self._dirty

    def save_cache(self) -> None:
        """Write the cache atomically (temporary file, then rename). Safe in a worker thread:
        the records are taken under the lock, written outside it."""
        horizon = time.time_ns() - int(_RECENT * 1e9)
        with self._lock:
            entries = {
                os.path.relpath(e.key, self.root): (e.sig, e.record)
                for e in self._entries.values()
                if e.sig is not None and e.sig[1] < horizon
            }
            self._dirty = False
        tmp = f"{self.cache_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                pickle.dump(
                    {"version": CACHE_VERSION, "per_ae": self.per_ae, "entries": entries},
                    f,
                    protocol=pickle.HIGHEST_PROTOCOL,
                )
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            self.log.warning("cannot write index cache %s: %s", self.cache_path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _read_in_processes(
        self, files: list[tuple[str, Signature]], workers: int, loaded: list
    ) -> list[tuple[str, Signature]]:
        """Read `files` in `workers` processes, indexing the records and adding them to
        `loaded`; returns the files left to read here (all if the processes cannot run)."""
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        sigs = dict(files)
        chunks = [[k for k, _s in files[i : i + _CHUNK]] for i in range(0, len(files), _CHUNK)]
        done: set[str] = set()
        try:
            # spawn: the parent may run threads (a fork would copy their locks mid-use)
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                read = functools.partial(read_records, root=self.root)
                for results in pool.map(read, chunks):
                    batch = []
                    for key, record, sig, error in results:
                        done.add(key)
                        if record is not None:
                            batch.append((key, record, sig))
                        elif error is not None:
                            self._log_unreadable(key, sigs[key], error)
                    with self._lock:  # indexed while the workers read on
                        for key, record, sig in batch:
                            self._set_entry(key, record, sig)
                    loaded.extend(batch)
        except Exception as exc:  # no processes here (limits, sandbox): read in this one
            self.log.info("reading worklist files in this process: %s", exc)
        return [(k, s) for k, s in files if k not in done]

    def _log_unreadable(self, key: str, sig: Signature | None, error: Any) -> None:
        if self._failed.get(key, ()) != sig:
            self._failed[key] = sig
            self.log.warning("skipping unreadable worklist file %s: %s", key, error)

    def _read(self, key: str, sig: Signature | None) -> tuple[Record, Signature] | None:
        """Read one file; an unreadable file is logged once per version and skipped."""
        try:
            return read_record(key, self.root)
        except FileNotFoundError:
            return None
        except Exception as exc:
            self._log_unreadable(key, sig, exc)
            return None

    # ---- updates (reactor thread)

    def put(self, path: Path, dataset: Dataset | PlainItem) -> None:
        """The bridge wrote `dataset` (or a new item's plain elements) to `path` (durably): index
        it now."""
        key = self._key(path)
        if isinstance(dataset, Dataset):
            record = record_from_dataset(dataset)
        else:
            record = record_from_elements(dataset.elements)
        with self._lock:
            self._set_entry(key, record, _signature(key))
            self._bump()
        self._dirty = True

    def discard(self, path: Path) -> None:
        """The bridge deleted `path`."""
        key = self._key(path)
        with self._lock:
            if self._remove_entry(key):
                self._bump()
        self._dirty = True

    # ---- items of a store that is no folder (PostgreSQL): records under virtual paths

    def load_records(
        self, records: Iterable[tuple[str | os.PathLike, Record]], partitions: Iterable[str] = ()
    ) -> None:
        """Replace the index with `records` ((path, record) pairs): the start-up load from a
        store whose paths name items, not files (bridge.storage.postgres.storage). The called
        AE titles served (per-ae) are then `partitions` and those of the items."""
        started = time.monotonic()
        self.partitions = {name for name in partitions if name}
        loaded = [(self._key(path), record) for path, record in records]
        with self._lock:
            for key in list(self._entries):
                self._remove_entry(key)
            for key, record in loaded:
                self._set_entry(key, record, None)
            self._bump()
        self.load_stats = {
            "items": len(loaded), "read": len(loaded), "cached": 0, "workers": 0,
            "seconds": time.monotonic() - started,
        }  # fmt: skip
        self.log.info("worklist index: %d items from the store", len(loaded))

    def put_record(self, path: str | os.PathLike, record: Record) -> None:
        """Index a record another writer stored (a bridge on the same database)."""
        key = self._key(path)
        with self._lock:
            self._set_entry(key, record, None)
            self._bump()

    def _bump(self) -> None:
        self.generation += 1
        self._changed.notify_all()

    def _set_entry(self, key: str, record: Record, sig: Signature | None) -> None:
        folder = self._folder(key)
        if folder is None:
            self.log.warning("not indexing %s: outside the worklist folder layout", key)
            return
        self._remove_entry(key)
        entry = Entry(key, folder, record, sig)
        self._entries[key] = entry
        maps = self._maps
        for name, values in _index_values(record).items():
            for value in values:
                if name == "dates" and value not in maps["dates"]:
                    bisect.insort(self._dates, value)
                _add(maps[name], value, key)
        _add(maps["folders"], folder, key)
        self._failed.pop(key, None)
        missing = tuple(missing_required(record))
        if missing and self._warned.get(key) != missing:
            self.log.warning(
                "worklist item %s lacks required attributes (served anyway; modalities may "
                "drop it): %s", key, ", ".join(missing),
            )  # fmt: skip
        if missing:
            self._warned[key] = missing
        else:
            self._warned.pop(key, None)

    def _remove_entry(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        maps = self._maps
        for name, values in _index_values(entry.record).items():
            for value in values:
                _remove(maps[name], value, key)
                if name == "dates" and value not in maps["dates"]:
                    i = bisect.bisect_left(self._dates, value)
                    if i < len(self._dates) and self._dates[i] == value:
                        del self._dates[i]
        _remove(maps["folders"], entry.folder, key)
        return True

    # ---- reading (any thread)

    def __len__(self) -> int:
        return len(self._entries)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (woken by each applied change) until `predicate()` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                self._lock.release()
                try:
                    if predicate():
                        return True
                finally:
                    self._lock.acquire()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)

    def record(self, path: str | os.PathLike) -> Record | None:
        entry = self._entries.get(self._key(path))
        return entry.record if entry is not None else None

    def get(self, path: str | os.PathLike) -> Dataset | None:
        """The indexed item at `path` as a Dataset (read from its file), None if not indexed."""
        key = self._key(path)
        if key not in self._entries:
            return None
        try:
            _check_inside(key, self.root)
            return read_dataset(key)
        except (OSError, InvalidDicomError, ValueError) as exc:
            self.log.warning("cannot read indexed worklist file %s: %s", key, exc)
            return None

    def items_of_patient(
        self, patient_id: str, issuer: str | None = None
    ) -> list[tuple[Path, Dataset]]:
        """Every item (whatever its status) of a patient; with `issuer`, only items whose
        IssuerOfPatientID is that issuer or empty."""
        with self._lock:
            keys = list(_keys(self._maps["patient_ids"].get(patient_id)))
            entries = [self._entries[k] for k in keys]
        out = []
        for entry in sorted(entries, key=lambda e: e.order):
            stored = _vals(entry.record.get(ISSUER_OF_PATIENT_ID))[:1]
            if issuer and stored not in ((), ("",), (issuer,)):
                continue  # another issuer's patient (an item without an issuer may be ours)
            ds = self.get(entry.key)
            if ds is not None:
                out.append((Path(entry.key), ds))
        return out

    def paths_of_order(self, values: dict) -> list[Path]:
        """The files of the items with the step ID (and requested procedure ID) of `values`
        and any one of its other order identifiers, whatever their status: how a message that
        names a known order without its accession number finds it."""
        step_id = values.get("ScheduledProcedureStepID", "")
        if not step_id:
            return []
        found: dict[str, None] = {}
        for keyword in _ORDER_KEYS:
            value = values.get(keyword, "")
            if not value or not isinstance(value, str):
                continue
            identifier = Dataset()
            setattr(identifier, keyword, value)
            if values.get("RequestedProcedureID"):
                identifier.RequestedProcedureID = values["RequestedProcedureID"]
            step = Dataset()
            step.ScheduledProcedureStepID = step_id
            identifier.ScheduledProcedureStepSequence = Sequence([step])
            query = compile_query(identifier, pn_case_insensitive=False)
            with self._lock:
                candidates = self._candidates(query, None)
            found.update((e.key, None) for e in candidates if query.matches(e.record))
        return [Path(key) for key in found]

    def paths_matching(self, identifier: Dataset) -> list[Path]:
        """The files of the items an identifier's exact values match, whatever their status
        (the worklist service's look-ups: by study and step ID, by accession number)."""
        query = compile_query(identifier, pn_case_insensitive=False)
        with self._lock:
            candidates = self._candidates(query, None)
        found = sorted((e for e in candidates if query.matches(e.record)), key=lambda e: e.order)
        return [Path(e.key) for e in found]

    def matching(self, query: Query, folder: str | None = None) -> list[tuple[str, Record]]:
        """(key, record) of the items matching `query` (in `folder` for the per-ae layout), in
        SPS start order: `search` with each record's key (its file), for listings."""
        return [(e.key, e.record) for e in self._matching_entries(query, folder)]

    def snapshot(self) -> list[tuple[str, str, Record, float | None]]:
        """(key, called AE folder, record, mtime) of every item now: a consistent copy, for
        whole-worklist passes (status counts, housekeeping) that must not hold the lock."""
        with self._lock:
            entries = list(self._entries.values())
        return [
            (e.key, e.folder, e.record, e.sig[1] / 1e9 if e.sig is not None else None)
            for e in sorted(entries, key=lambda e: e.order)
        ]

    def paths_of_patient(self, patient_id: str, issuer: str | None = None) -> list[Path]:
        """The files of a patient's items (as items_of_patient, without reading them)."""
        with self._lock:
            entries = [self._entries[k] for k in _keys(self._maps["patient_ids"].get(patient_id))]
        out = []
        for entry in sorted(entries, key=lambda e: e.order):
            stored = _vals(entry.record.get(ISSUER_OF_PATIENT_ID))[:1]
            if issuer and stored not in ((), ("",), (issuer,)):
                continue
            out.append(Path(entry.key))
        return out

    def search(self, query: Query, folder: str | None = None) -> list[Record]:
        """Records matching `query` (in `folder` for the per-ae layout), in SPS start order."""
        return [e.record for e in self._matching_entries(query, folder)]

    def _matching_entries(self, query: Query, folder: str | None) -> list[Entry]:
        """The entries matching `query` (in `folder` for the per-ae layout), in SPS start
        order; matched outside the lock."""
        with self._lock:
            candidates = self._candidates(query, folder)
        if folder is not None:
            candidates = [e for e in candidates if e.folder == folder]
        found = [e for e in candidates if query.matches(e.record)]
        found.sort(key=lambda e: e.order)
        return found

    def _candidates(self, query: Query, folder: str | None) -> list[Entry]:
        """The candidates the query's exact values allow (lock held): the keys of the smallest
        index look-up, less those that another look-up rules out (so a station + date query
        examines that station's items of the day, not every item of the day)."""
        hints = query.hints
        lookups: list[tuple[int, list[Any]]] = []  # (size, the index entries of its values)
        for name in _INDEXED:
            values = getattr(hints, name)
            if values is not None:
                index = self._maps[name]
                lookups.append(_lookup(index, values))
        if hints.date_range is not None:
            lo, hi = hints.date_range
            i = bisect.bisect_left(self._dates, lo) if lo else 0
            j = bisect.bisect_right(self._dates, hi) if hi else len(self._dates)
            lookups.append(_lookup(self._maps["dates"], self._dates[i:j]))
        if folder is not None:
            lookups.append(_lookup(self._maps["folders"], (folder,)))
        if not lookups:
            return list(self._entries.values())
        lookups.sort(key=lambda lookup: lookup[0])
        (_size, held), others = lookups[0], lookups[1:]
        keys: Iterable[str] = _union_of(held)
        # Filtering by another look-up costs a set test per value per candidate: only worth it
        # for a few values (a date range of a week, not of a year).
        for _size, other in others:
            if len(other) == 1:  # one value (a station, a day, the AE folder): one test a key
                (held_other,) = other
                if isinstance(held_other, set):
                    keys = [k for k in keys if k in held_other]
                else:
                    keys = [k for k in keys if k == held_other]
            elif len(other) <= _MAX_FILTER_VALUES:
                sets = [h if isinstance(h, set) else {h} for h in other]
                keys = [k for k in keys if any(k in s for s in sets)]
        entries = self._entries
        return [entries[k] for k in keys]

    # ---- watching files that other programs change

    def start_watching(self, reactor: Any, read_in_reactor: bool = True) -> None:
        """Follow changes made by other programs: inotify where available (a full rescan
        every SAFETY_NET_INTERVAL s as well), else a rescan every index_poll_interval s.
        `read_in_reactor=False`: inotify's events wait for sync_now() calls."""
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        interval = self.settings.index_poll_interval
        try:
            self._start_inotify(reactor, read_in_reactor)
            interval = max(interval, SAFETY_NET_INTERVAL)
        except Exception as exc:
            self._notifier = None
            self.log.info("inotify unavailable (%s): polling every %.1f s", exc, interval)
        self._poller = LoopingCall(self._poll)
        self._poller.clock = reactor
        self._poller.start(interval, now=False)

    def stop_watching(self) -> None:
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._dirty:
            self.save_cache()

    def _start_inotify(self, reactor: Any, read_in_reactor: bool = True) -> None:
        from twisted.internet import inotify
        from twisted.python.filepath import FilePath

        notifier = inotify.INotify(reactor=reactor)
        if read_in_reactor:
            notifier.startReading()
        self._notifier = notifier
        mask = (
            inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
            | inotify.IN_DELETE | inotify.IN_CREATE | inotify.IN_ATTRIB
        )  # fmt: skip
        self._inotify_mask = mask
        notifier.watch(FilePath(self.root), mask=mask, callbacks=[self._on_event])
        if self.per_ae:
            for name in self.ae_folders():
                self._watch_folder(os.path.join(self.root, name))

    def _watch_folder(self, folder: str) -> None:
        from twisted.python.filepath import FilePath

        self._notifier.watch(FilePath(folder), mask=self._inotify_mask, callbacks=[self._on_event])

    def _on_event(self, _watch: Any, filepath: Any, mask: int) -> None:
        from twisted.internet import inotify

        path = os.fsdecode(filepath.path)
        if mask & inotify.IN_Q_OVERFLOW:
            self._poll()  # events were lost: rescan everything
            return
        if mask & inotify.IN_ISDIR:
            if self.per_ae and mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
                name = os.path.basename(path)
                if os.path.dirname(path) == self.root and not name.startswith("."):
                    self._watch_folder(path)
                    self._poll()  # files may have landed before the watch existed
            return
        if not is_worklist_name(os.path.basename(path)):
            return
        if mask & inotify.IN_CREATE:
            return  # wait for IN_CLOSE_WRITE: the file is still being written
        key = self._key(path)
        sig = _signature(key)
        with self._lock:
            entry = self._entries.get(key)
        if (entry.sig if entry is not None else None) == sig:
            return  # the bridge's own write or delete, indexed already: no thread hop
        self._refresh([key])

    def sync_now(self) -> None:
        """Apply at once, on the calling thread, the folder changes the kernel has reported
        and the index has not applied yet: a file renamed into the folder before this call is
        served after it. For an index that follows another process's writes (a DICOM
        worker's, watching with `read_in_reactor=False`): the events are queued by the rename
        itself, before that writer's ACK."""
        notifier = self._notifier
        if notifier is None:
            return
        with self._sync_lock:  # one reader of the inotify descriptor at a time
            fd = notifier.fileno()
            for _ in range(64):  # bounded: a folder changing faster is read the next time
                if not select.select([fd], [], [], 0)[0]:
                    return
                notifier.doRead()

    def _refresh(self, keys: list[str]) -> None:
        """Re-read `keys` in a worker thread; apply the results on the reactor thread."""
        from twisted.internet.threads import deferToThreadPool

        if self.refresh_inline:
            self._apply(self._read_many(keys))
            return

        reactor = self._reactor
        d = deferToThreadPool(reactor, reactor.getThreadPool(), self._read_many, keys)
        d.addCallback(self._apply)
        d.addErrback(lambda f: self.log.error("worklist refresh failed: %s", f.getTraceback()))

    def _read_many(self, keys: list[str]) -> list[tuple[str, Record | None, Signature | None]]:
        out = []
        for key in keys:
            sig = _signature(key)
            if sig is None:
                out.append((key, None, None))
                continue
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.sig == sig:
                    continue  # already indexed as it is (the bridge's own write)
                if key in self._failed and self._failed[key] == sig:
                    continue  # known unreadable, unchanged
            result = self._read(key, sig)
            if result is not None:
                out.append((key, result[0], result[1]))
            else:  # vanished, or unreadable now (logged): an older version is served no more
                out.append((key, None, sig if key in self._failed else None))
        return out

    def _apply(self, results: list[tuple[str, Record | None, Signature | None]]) -> None:
        """Apply what a worker read, unless the file changed again since (a later event or
        the bridge's own put() carries the newer version)."""
        changed = False
        gone: list[tuple[str, bool]] = []  # items no longer served: (key, file removed)
        with self._lock:
            for key, record, sig in results:
                if _signature(key) != sig:
                    continue
                if record is None:
                    removed = self._remove_entry(key)
                    changed |= removed
                    if sig is None:  # gone: forget it (an unreadable one stays logged once)
                        self._failed.pop(key, None)
                        self._warned.pop(key, None)
                    if removed:
                        gone.append((key, sig is None))
                else:
                    self._set_entry(key, record, sig)
                    changed = True
            if changed:
                self._bump()
        if changed:
            self._dirty = True
        for key, removed in gone:
            self._log_withdrawn(key, removed)
        if changed and self.on_external_change is not None:
            for key, record, sig in results:
                if _signature(key) == sig:
                    try:
                        self.on_external_change(key, record)
                    except Exception:  # a follower's failure must not stop the index
                        self.log.exception("change follower failed on %s", key)

    def _log_withdrawn(self, key: str, removed: bool) -> None:
        """A translation-log line for an item another program removed (or made unreadable):
        the bridge's own deletes never get here (the index forgot them first)."""
        if self.translation_log is None:
            return
        note = "removed by another program" if removed else "unreadable now: no longer served"
        self.translation_log.record(
            outcome="removed-externally" if removed else "withdrawn",
            file=os.path.relpath(key, self.root),
            note=note,
        )

    def _poll(self) -> None:
        """Compare the folder with the index in a worker thread; refresh what differs."""
        if self._polling:
            return
        self._polling = True
        from twisted.internet.threads import deferToThreadPool

        def diff_and_read() -> list:
            found = self._scan()
            with self._lock:
                known = {k: e.sig for k, e in self._entries.items()}
            changed = [k for k, sig in found.items() if known.get(k) != sig]
            return self._read_many(changed + [k for k in known if k not in found])

        def done(result: Any) -> Any:
            with self._lock:
                self._polling = False
                self._changed.notify_all()  # wakes wait_until() callers waiting for a rescan
            return result

        reactor = self._reactor
        d = deferToThreadPool(reactor, reactor.getThreadPool(), diff_and_read)
        d.addCallback(self._apply)
        d.addBoth(done)
        d.addErrback(lambda f: self.log.error("worklist rescan failed: %s", f.getTraceback()))


class _SlowReadReporter:
    """Names the file start-up waits on (a stalled network mount, say) every `after` s, so a
    slow start is never silent."""

    def __init__(self, log: logging.Logger, after: float = 5.0) -> None:
        self.log = log
        self.after = after
        self.path: str | None = None
        self.since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="wl-read-watch", daemon=True)

    def __enter__(self) -> _SlowReadReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def reading(self, path: str) -> None:
        self.path, self.since = path, time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.after):
            path, waited = self.path, time.monotonic() - self.since
            if path is not None and waited >= self.after:
                self.log.warning("start-up is waiting on %s (%.0f s so far)", path, waited)


_MAX_FILTER_VALUES = 8


def _lookup(index: dict, values: Iterable[str]) -> tuple[int, list[Any]]:
    """The index entries (a key or a set of keys) of `values`, and how many keys they hold."""
    held = [h for h in (index.get(v) for v in values) if h is not None]
    return sum(_size(h) for h in held), held


def _union_of(held: list[Any]) -> Iterable[str]:
    if len(held) == 1:
        return _keys(held[0])
    out: set[str] = set()
    for h in held:
        out.update(_keys(h))
    return out
