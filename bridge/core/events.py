"""What the worklist publishes after each change, for the adapters that follow it.

The writer of the worklist publishes on its own thread, synchronously: a subscriber that must make
something durable before the change is acknowledged (the outbox, before an MPPS success status)
does so inside its callback. Subscribers must not block for long. A subscriber that raises does not
stop the others; once all have run, the first exception is raised to the publisher, so a change
whose durable consequences could not be recorded is not acknowledged as a success.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import Dataset

log = logging.getLogger("bridge.core.events")


@dataclass(frozen=True)
class StatusChange:
    """One scheduled procedure step's status changed (by an MPPS, the housekeeping, an operator)."""

    item: Dataset  # the stored worklist item after the change: patient, order identifiers, SPS
    old_status: str
    new_status: str  # SCHEDULED, ARRIVED, READY, STARTED, COMPLETED, DISCONTINUED, CANCELED
    cause: str  # "mpps", "housekeeping", "hl7", "operator"
    performed_start: str = ""  # DICOM DT (YYYYMMDDHHMMSS) the performed step started, if known
    performing_station: str = ""  # AE title of the modality that performed it, if known
    mpps_uid: str = ""  # the MPPS instance that caused it, if any


Subscriber = Callable[[object], None]


class EventBus:
    """Synchronous publish/subscribe, by event type."""

    def __init__(self) -> None:
        self._subscribers: dict[type, list[Subscriber]] = {}

    def subscribe(self, event_type: type, callback: Subscriber) -> None:
        self._subscribers.setdefault(event_type, []).append(callback)

    def publish(self, event: object) -> None:
        failure: Exception | None = None
        for callback in self._subscribers.get(type(event), ()):
            try:
                callback(event)
            except Exception as exc:  # one subscriber's failure must not stop the others
                log.exception("subscriber %r failed on %s", callback, type(event).__name__)
                failure = failure or exc
        if failure is not None:
            raise failure


@dataclass(frozen=True)
class PatientMerged:
    """ADT A40 (merge) or A47 (identifier change): the items of `previous_id` now belong to
    `patient` (a bridge.hl7.order.Patient). Published by the HL7 pipeline after it moved the items,
    so that other records of the patient (stored MPPS instances) follow."""

    event: str  # "A40" or "A47"
    previous_id: str
    previous_issuer: str
    patient: object


@dataclass(frozen=True)
class ItemWritten:
    """The worklist service stored an item (new, replaced, or its status or patient changed).
    `key` is a bridge.storage.protocol.ItemKey; `item` what was stored (a Dataset, or a new
    item's plain elements: worklist_item.Item)."""

    key: object
    item: object
    cause: str  # "hl7", "mpps", "housekeeping", "operator"


@dataclass(frozen=True)
class ItemRemoved:
    """The worklist service removed an item (cancelled, finished without retention, expired,
    removed by an operator or the housekeeping)."""

    key: object
    cause: str
