"""The worklist service: the only code that changes the worklist.

The HL7 pipeline, MPPS handlers (pynetdicom's association threads), the housekeeping and the
HTTP API hand it their changes: put or delete an item by key (bridge.storage.protocol.ItemKey),
set a step's status, expire a finished item. Every change hops to the writer thread (the
reactor's) and is applied there, one at a time, so changes never interleave. After each change
the service publishes on the event bus, synchronously: ItemWritten or ItemRemoved. A status
change publishes a StatusChange before it is stored: a subscriber that raises stops the change
and the exception reaches the caller, so a change whose consequences could not be recorded is
never reported as done, and a crash between the two never leaves a change without them.
The storage (the folder, or PostgreSQL shared by several bridges) is where items are kept; no
caller handles files. `change(key)` makes a read-modify-write of one order one step, against
the other bridges too on PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from twisted.internet import threads
from twisted.python import threadable

from bridge.config import FINISHED_STATUSES, Settings
from bridge.core.events import EventBus, ItemRemoved, ItemWritten, PatientMerged, StatusChange
from bridge.dicom import worklist_item
from bridge.storage.protocol import FolderStorage, ItemKey, WorklistStorage
from bridge.storage.store import PlainItem, StoreError, WorklistStore

log = logging.getLogger("bridge.core.worklist_service")

T = TypeVar("T")


@dataclass(frozen=True)
class StatusResult:
    """What `set_status` did to one item."""

    path: Path
    old_status: str
    new_status: str
    outcome: str  # "changed", "removed" (finished, not retained), "unchanged", "skipped", "missing"
    item: Dataset | None = None  # the item after the change (as it was, when not changed)

    @property
    def changed(self) -> bool:
        return self.outcome in ("changed", "removed")


def step_status(item: Dataset) -> str:
    steps = item.get("ScheduledProcedureStepSequence") or []
    return str(steps[0].get("ScheduledProcedureStepStatus", "")) if steps else ""


def accession_issuer(item: Dataset) -> str:
    """The Local Namespace Entity ID of an item's Issuer of Accession Number, if any."""
    issuers = item.get("IssuerOfAccessionNumberSequence") or []
    return str(issuers[0].get("LocalNamespaceEntityID", "")) if issuers else ""


class WorklistService:
    """Finds worklist items and changes their status or removes them, on the writer thread."""

    def __init__(
        self,
        settings: Settings,
        store: WorklistStore,
        index: Any,
        events: EventBus,
        reactor: Any = None,
        storage: WorklistStorage | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.events = events
        self.reactor = reactor  # None: every call runs in the caller's thread (tests, tools)
        self.storage = storage if storage is not None else FolderStorage(settings, store, index)
        self._pending: list[object] | None = None  # events of an open change(), until commit
        if getattr(store, "index", None) is None and index is not None:
            # The index follows the service's events (subscribed first, so any later subscriber
            # finds the change indexed), whatever the backend; a store built with the index
            # (tools, older tests) updates it itself.
            events.subscribe(ItemWritten, self._index_written)
            events.subscribe(ItemRemoved, self._index_removed)

    def _index_written(self, event: ItemWritten) -> None:
        self.index.put(self.path_of(event.key), event.item)

    def _index_removed(self, event: ItemRemoved) -> None:
        self.index.discard(self.path_of(event.key))

    # ---- keys (the folder backend maps them to its files)

    def key_of(self, path: Path) -> ItemKey:
        return self.storage.key_of(path)

    def path_of(self, key: ItemKey) -> Path:
        return self.storage.path_of(key)

    def name_of(self, key: ItemKey) -> str:
        """How the translation log names an item (its file name in the folder backend)."""
        return self.storage.path_of(key).name

    # ---- reads for adapters that check before they change (on any thread)

    def contains(self, key: ItemKey) -> bool:
        return self.storage.contains(key)

    def record(self, key: ItemKey) -> Any:
        return self.storage.record(key)

    def dataset(self, key: ItemKey) -> Dataset | None:
        return self.storage.dataset(key)

    def find_by_order(self, values: dict[str, Any]) -> list[ItemKey]:
        return self.storage.find_by_order(values)

    def items_of_patient(
        self, patient_id: str, issuer: str | None = None
    ) -> list[tuple[Path, Dataset]]:
        """(path, item) of every item of a patient, as the storage has them now."""
        return self.storage.items_of_patient(patient_id, issuer)

    def key_of_order(self, order_identity: str) -> ItemKey:
        """The key of the bridge's own item for an order (in its own partition)."""
        return ItemKey.of_order(order_identity, self.storage.own_partition)

    # ---- the changes every adapter makes: stored, then published

    def put(
        self,
        key: ItemKey,
        item: Dataset | PlainItem,
        cause: str,
        order_identity: str | None = None,
    ) -> None:
        """Store `item` under `key` durably (on the writer thread), then publish ItemWritten.
        Raises StoreError when it could not be made durable."""
        self.on_writer(self._put, key, item, cause, order_identity)

    def _put(
        self, key: ItemKey, item: Dataset | PlainItem, cause: str, order_identity: str | None
    ) -> None:
        self.storage.put(key, item, order_identity)
        self._publish(ItemWritten(key, item, cause))

    def delete(self, key: ItemKey, cause: str) -> bool:
        """Remove the item durably (on the writer thread); False when there was none. Publishes
        ItemRemoved when one was removed."""
        return self.on_writer(self._delete, key, cause)

    def _delete(self, key: ItemKey, cause: str) -> bool:
        removed = self.storage.delete(key)
        if removed:
            self._publish(ItemRemoved(key, cause))
        return removed

    def _publish(self, event: object) -> None:
        """ItemWritten / ItemRemoved: at once, or inside change() once the change committed."""
        if self._pending is not None:
            self._pending.append(event)
        else:
            self.events.publish(event)

    @contextmanager
    def change(
        self, key: ItemKey | None, also: Iterable[tuple[str, Any]] = ()
    ) -> Iterator[list[tuple | None] | None]:
        """Make the reads and changes inside the block one step for the order of `key`, also
        against other writers of a shared store (PostgreSQL: one transaction under the order's
        lock, so the same order received by two bridges is applied one after the other). The
        ItemWritten / ItemRemoved of the block are published once it committed, none when it
        failed. With the folder (one writer: this thread) it is a plain block. On the writer
        thread only; nested blocks are part of the outer one.

        `also`: statements a shared store runs at the start of the transaction, after the
        lock, in the same round trip; the block gets their first rows (None: not run, as on
        the folder store)."""
        begin = getattr(self.storage, "change", None)
        off_writer = self.reactor is not None and not threadable.isInIOThread()
        if begin is None or key is None or self._pending is not None or off_writer:
            yield None
            return
        self._pending = []
        try:
            with begin(key, also) as rows:
                yield rows
            pending = self._pending
        finally:
            self._pending = None
        for event in pending:
            self.events.publish(event)

    def with_commit(self, sql: str, params: Any = None) -> bool:
        """Add a statement to the transaction of the open change() (a shared store: sent with
        its COMMIT, committed or rolled back with it); False when there is none to add it to
        (the folder store, or no change() open on this thread)."""
        add = getattr(self.storage, "on_commit", None)
        if add is None or self._pending is None:
            return False
        return bool(add(sql, params))

    def on_writer(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `function` on the writer thread and return its result (or raise its exception).
        Adapters use it to make a check and the changes it leads to one step."""
        if self.reactor is None or threadable.isInIOThread():
            return function(*args, **kwargs)
        return threads.blockingCallFromThread(self.reactor, function, *args, **kwargs)

    # ---- look-ups (the index, or a shared store's database; never by patient alone)

    def find_by_study_and_step(self, study_uid: str, sps_id: str) -> list[Path]:
        """Items with this Study Instance UID and Scheduled Procedure Step ID."""
        if not study_uid or not sps_id:
            return []
        shared = getattr(self.storage, "find_by_study_and_step", None)
        if shared is not None:  # a shared store: the database, not an index that may lag
            return [self.path_of(key) for key in shared(study_uid, sps_id)]
        identifier = Dataset()
        identifier.StudyInstanceUID = study_uid
        step = Dataset()
        step.ScheduledProcedureStepID = sps_id
        identifier.ScheduledProcedureStepSequence = Sequence([step])
        return self.on_writer(self.index.paths_matching, identifier)

    def find_by_accession(self, accession: str, issuer: str = "") -> list[Path]:
        """Items with this Accession Number; with `issuer`, only those whose issuer is that one
        or not recorded."""
        if not accession:
            return []
        shared = getattr(self.storage, "find_by_accession", None)
        if shared is not None:  # a shared store: the database, not an index that may lag
            paths = [self.path_of(key) for key in shared(accession)]
        else:
            identifier = Dataset()
            identifier.AccessionNumber = accession
            paths = self.on_writer(self.index.paths_matching, identifier)
        if not issuer:
            return paths
        kept = []
        for path in paths:
            try:
                item = self.store.read(path)
            except (OSError, InvalidDicomError, StoreError):
                continue  # logged by the index when it read it
            if item is not None and accession_issuer(item) in ("", issuer):
                kept.append(path)
        return kept

    # ---- changes

    def set_status(
        self,
        path: Path,
        new_status: str,
        cause: str,
        *,
        only_from: tuple[str, ...] | None = None,
        remove: bool = False,
        performed_start: str = "",
        performing_station: str = "",
        mpps_uid: str = "",
        follow_retention: bool = True,
    ) -> StatusResult:
        """Set the status of the item at `path` (its SOP Instance UID kept), then publish a
        StatusChange. A finished status follows the finished-retention setting (removed at once
        when it is 0; not with `follow_retention=False`, an operator's explicit status); `remove`
        removes the item whatever the retention. With `only_from`, an item in another status is
        left alone ("skipped"): the caller's view may be stale."""
        about = {
            "performed_start": performed_start,
            "performing_station": performing_station,
            "mpps_uid": mpps_uid,
        }

        def in_one_step() -> StatusResult:
            with self.change(self.key_of(path)):  # the read and the write, one step
                return self._set_status(
                    path, new_status, cause, only_from, remove, about, follow_retention
                )

        return self.on_writer(in_one_step)

    def _set_status(
        self,
        path: Path,
        new_status: str,
        cause: str,
        only_from: tuple[str, ...] | None,
        remove: bool,
        about: dict[str, str],
        follow_retention: bool = True,
    ) -> StatusResult:
        try:
            item = self.store.read(path)
        except (OSError, InvalidDicomError, StoreError) as exc:  # another program's file, damaged
            log.warning("cannot read worklist item %s: %s", path.name, exc)
            item = None
        if item is None:
            return StatusResult(path, "", new_status, "missing")
        old_status = step_status(item)
        if only_from is not None and old_status not in only_from:
            return StatusResult(path, old_status, new_status, "skipped", item)
        if old_status == new_status and not remove:
            return StatusResult(path, old_status, new_status, "unchanged", item)
        worklist_item.set_status(item, new_status)
        removing = remove or (
            follow_retention
            and new_status in FINISHED_STATUSES
            and self.settings.finished_retention <= 0
        )
        key = self.key_of(path)
        # Its consequences first (the outbox's messages, durable), then the change: a crash
        # in between leaves the item unchanged, so the modality's retry makes the change (and
        # its messages, again) instead of finding it made and the RIS never told.
        try:
            self.events.publish(StatusChange(item, old_status, new_status, cause, **about))
        except Exception:
            log.error(
                "status change of %s to %s not made: a subscriber failed", path.name, new_status
            )
            raise
        try:
            if removing:
                self.storage.delete(key)
            else:
                self.storage.put(key, item)  # no identity: the file's own SOP Instance UID stays
        except Exception:
            log.error(
                "status change of %s to %s not stored (its status messages are queued)",
                path.name,
                new_status,
            )
            raise
        self._publish(ItemRemoved(key, cause) if removing else ItemWritten(key, item, cause))
        outcome = "removed" if removing else "changed"
        return StatusResult(path, old_status, new_status, outcome, item)

    def patient_merged(self, event: PatientMerged) -> None:
        """Publish a merge (A40) or identifier change (A47) once the patient's items were
        rewritten (through `put`), for the other records of the patient (MPPS instances)."""
        self.on_writer(self.events.publish, event)

    def expire(self, key: ItemKey, max_age: float) -> bool:
        """Remove a finished item past its retention, unless it was rewritten since it was
        found expired (a new order); publishes ItemRemoved (cause "expired")."""
        return self.on_writer(self._expire, key, max_age)

    def _expire(self, key: ItemKey, max_age: float) -> bool:
        removed = self.store.delete_if_expired(self.path_of(key), max_age)
        if removed:
            self._publish(ItemRemoved(key, "expired"))
        return removed

    def remove(self, path: Path, cause: str = "operator") -> bool:
        """Remove the item at `path`; False when it was not there."""
        return self.delete(self.key_of(path), cause)
