"""The MPPS retention: how long the instances modalities create are kept.

A finished instance (COMPLETED or DISCONTINUED) is removed `mpps-retention` hours after its last
change; one a modality never finished (no final N-SET: the modality crashed, was reset, or
never sends one) `mpps-in-progress-retention` hours after its last change, a bound at least as
long, since its final N-SET may still come. With `mpps-max-instances` this bounds what peers can
make the bridge keep: disk, memory (the folder store's map) and start-up time.

`sweep` runs in a worker thread, never on the reactor: on the folder store it finds the expired
instances (reads only), then removes them in small batches on the writer thread (each re-checked:
an instance an N-SET changed meanwhile stays); on PostgreSQL it deletes them in the database, in
short transactions, on one bridge at a time (the server holds a round lock around it). Removing
an instance changes no worklist item: a step left STARTED follows the `[[housekeeping]]` rules.
Each sweep's removals are counted and logged in one line.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import Settings
from bridge.storage.mpps_instance import (
    REMOVED_FINISHED,
    REMOVED_IN_PROGRESS,
    REMOVED_UNREAD,
    Retention,
)

log = logging.getLogger("bridge.ops.mpps_retention")

BATCH = 200  # removals per call on the writer thread: each call holds it only a few ms


class MppsRetention:
    def __init__(self, settings: Settings, store: Any, on_writer: Callable[..., Any]) -> None:
        self.retention = Retention.of(settings)
        self.hours = (settings.mpps_retention, settings.mpps_in_progress_retention)
        self.store = store
        self.on_writer = on_writer
        self.removed: Counter[str] = Counter()  # since start, by kind (metrics)
        self.kept: int | None = None  # instances after the last sweep (a shared store's count)
        self._lock = threading.Lock()

    def sweep(self, now: float | None = None) -> Counter[str]:
        """Remove the instances past their retention (in a worker thread); the removals by
        kind. `now` (seconds since the epoch): the folder store's clock, for tests."""
        remove_expired = getattr(self.store, "remove_expired", None)
        if remove_expired is not None:  # PostgreSQL: in the database, on its clock
            removed = remove_expired(self.retention)
        else:
            found = self.store.expired(self.retention, now)
            removed = Counter()
            for start in range(0, len(found), BATCH):
                removed.update(self.on_writer(self.store.remove, found[start : start + BATCH]))
        self.count(removed, "sweep")
        self.kept = len(self.store)
        return removed

    def count(self, removed: Mapping[str, int], when: str) -> None:
        """Add `removed` to the totals and log it, once, when there was any."""
        total = sum(removed.values())
        if not total:
            return
        with self._lock:
            self.removed.update(removed)
        finished, in_progress = self.hours
        parts = []
        if removed.get(REMOVED_FINISHED):
            parts.append(f"{removed[REMOVED_FINISHED]} finished more than {finished:g} h ago")
        if removed.get(REMOVED_IN_PROGRESS):
            parts.append(
                f"{removed[REMOVED_IN_PROGRESS]} left IN PROGRESS more than {in_progress:g} h"
            )
        if removed.get(REMOVED_UNREAD):
            parts.append(f"{removed[REMOVED_UNREAD]} unchanged for more than {in_progress:g} h")
        log.info("MPPS retention (%s): removed %d instance(s): %s", when, total, ", ".join(parts))

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self.removed)
