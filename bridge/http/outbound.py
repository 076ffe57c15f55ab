"""What the API and the web view show of the outbox and the MPPS store, and the outbox actions.

The outbox (bridge.net.outbox.Outbox) is changed on the reactor thread, where it delivers, so a
retry or a drop never races a delivery; a listing reads every message file (or the outbox
table, with the PostgreSQL store), so it runs in the thread pool (a message sent meanwhile is
left out). MPPS instances are read in the thread pool from a snapshot of the store's UIDs taken
on the reactor thread (where the store is written).
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from twisted.internet import threads

from bridge.http.actions import ActionError
from bridge.net.outbox import RECEIVER_NAME, OutboxError, message_facts
from bridge.storage.store import StoreError

SEQUENCE = re.compile(r"^[0-9]{1,20}$")
MAX_MESSAGE_SHOWN = 256 * 1024  # bytes of an outbound message returned by its detail
MAX_VALUE_SHOWN = 1024  # characters of one MPPS attribute value shown
MPPS_SUMMARY = (
    "PerformedProcedureStepStatus", "PatientName", "PatientID", "IssuerOfPatientID", "Modality",
    "PerformedStationAETitle", "PerformedProcedureStepID", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedProcedureStepDescription",
)  # fmt: skip


# -- the outbox
def entry_id(receiver: str, sequence: str | None) -> str:
    """The outbox id from a URL's parts: `<receiver>/<sequence>`, or a control ID (MSH-10) when
    the URL has one part. Parts that could name a path outside the outbox are refused."""
    if sequence is None:
        if not receiver or len(receiver) > 64 or "/" in receiver or receiver.startswith("."):
            raise ActionError(404, f"no message {receiver!r} in the outbox")
        return receiver
    if not RECEIVER_NAME.match(receiver) or not SEQUENCE.match(sequence):
        raise ActionError(404, f"no message {receiver}/{sequence} in the outbox")
    return f"{receiver}/{sequence}"


def entries(outbox: Any, state: str = "", receiver: str = "", accession: str = "") -> list[dict]:
    """The outbox's messages, receiver by receiver, waiting then parked, each oldest first,
    filtered. Reads every file
    (~1 ms each): run it in the thread pool, not on the reactor."""
    try:
        for _ in range(3):
            try:
                listed = outbox.list()
                break
            except FileNotFoundError:  # a file moved by a delivery or a retry meanwhile: again
                continue
        else:
            listed = outbox.list()
    except StoreError as exc:  # the database is down
        raise ActionError(503, str(exc)) from None
    return [
        entry.as_dict()
        for entry in listed
        if (not state or entry.state == state)
        and (not receiver or entry.receiver == receiver)
        and (not accession or entry.accession == accession)
    ]


def resolve(outbox: Any, ident: str) -> str:
    """A control ID (MSH-10) as the message's `<receiver>/<sequence>` (reads every file, or asks
    the database: in the thread pool); an id is returned as it is."""
    if "/" in ident:
        return ident
    try:
        return outbox.resolve(ident)
    except OutboxError as exc:
        raise ActionError(404, str(exc)) from None
    except StoreError as exc:  # the database is down
        raise ActionError(503, str(exc)) from None


def find(outbox: Any, ident: str) -> tuple[bytes, dict[str, Any]]:
    """(the message's bytes, its listing entry) by `<receiver>/<sequence>`, or ActionError 404;
    reads that one file (or row) only."""
    try:
        entry, data = outbox.lookup(ident)
    except OutboxError:
        raise ActionError(404, f"no message {ident!r} in the outbox") from None
    except StoreError as exc:  # the database is down
        raise ActionError(503, str(exc)) from None
    return data, entry.as_dict()


def detail(outbox: Any, ident: str) -> dict[str, Any]:
    data, entry = find(outbox, resolve(outbox, ident))
    data = data[:MAX_MESSAGE_SHOWN]
    # Segments one a line: HL7 ends them with CR, which a terminal or a page would overprint.
    return {**entry, "message": data.decode("utf-8", "replace").replace("\r", "\n")}


def on_database(server: Any) -> bool:
    """Whether the outbox and MPPS instances are in PostgreSQL: then their calls go to the
    thread pool (a slow database must not hold the reactor); the folder's stay on the reactor
    thread, their one writer."""
    return bool(getattr(server, "shared_store", False))


def act_in_thread(server: Any, ident: str, action: str, who: str) -> Any:
    """`act` in the thread pool, for a database outbox (a Deferred of its result); `ident`
    may be a control ID."""
    return threads.deferToThread(lambda: act(server, resolve(server.outbox, ident), action, who))


def act(server: Any, ident: str, action: str, who: str) -> dict[str, Any]:
    """Retry or drop one message (by `<receiver>/<sequence>`), on the reactor thread, where
    the outbox delivers (a database outbox: in a thread, see `act_in_thread`); the translation
    log says who did it, naming the message's receiver, control ID and accession (so the
    item's history shows it)."""
    outbox = server.outbox
    data, entry = find(outbox, ident)
    facts = message_facts(data)
    try:
        done = outbox.retry(entry["id"]) if action == "retry" else outbox.drop(entry["id"])
    except OutboxError as exc:
        raise ActionError(404, str(exc)) from None
    except OSError as exc:
        raise ActionError(500, f"outbox {entry['id']}: {exc.strerror or exc}") from None
    except StoreError as exc:  # the database is down
        raise ActionError(503, f"outbox {entry['id']}: {exc}") from None
    was = entry["state"]
    note = {
        ("retry", "parked"): "parked message put back in the queue",
        ("retry", "pending"): "waiting message sent now",
    }.get((action, was), f"{was} message deleted")
    server.translation_log.record(
        peer=f"http:{who}", type="api", outcome=f"outbox-{action}", by=who,
        receiver=entry["receiver"], control_id=facts.control_id, order_status=facts.order_status,
        accession=facts.accession, patient_id=facts.patient_id.split("^")[0], file=done,
        note=note,
    )  # fmt: skip
    return {"id": done, "action": action, "was": was, "control_id": facts.control_id}


# -- MPPS instances
def mpps_listing(
    store: Any, known: dict[str, Any] | None, status: str, patient_id: str, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """(the newest `limit` instances that pass the filters, how many pass); in a thread.
    `known`: the store's snapshot, None to take it here (a database store)."""
    if known is None:
        known = store.snapshot()
    wanted = [
        uid
        for uid, facts in known.items()
        if (not status or facts.status == status)
        and (not patient_id or facts.patient_id == patient_id)
    ]
    times = store.stored_times(wanted)
    chosen = sorted(((mtime, uid) for uid, mtime in times.items()), reverse=True)
    listed = []
    for _mtime, uid in chosen[:limit]:
        try:
            found = store.stored(uid)
        except Exception as exc:  # a damaged file: listed, with why it cannot be read
            listed.append({"uid": uid, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        if found is not None:
            listed.append(mpps_summary(uid, *found))
    return listed, len(chosen)


def mpps_summary(uid: str, ds: Dataset, mtime: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"uid": uid}
    for keyword in MPPS_SUMMARY:
        out[keyword] = _value(ds.get(keyword, ""))
    steps = ds.get("ScheduledStepAttributesSequence") or []
    out["scheduled_steps"] = [
        {k: _value(step.get(k, "")) for k in
         ("AccessionNumber", "StudyInstanceUID", "RequestedProcedureID",
          "ScheduledProcedureStepID")}
        for step in steps
    ]  # fmt: skip
    if mtime is not None:
        out["stored_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    return out


def mpps_detail(store: Any, uid: str) -> dict[str, Any]:
    """Every attribute of one instance (in a thread)."""
    found = store.stored(uid)
    if found is None:
        raise ActionError(404, f"no MPPS instance {uid}")
    ds, mtime = found
    return {**mpps_summary(uid, ds, mtime), "attributes": dataset_json(ds)}


def dataset_json(ds: Dataset) -> dict[str, Any]:
    """A dataset by keyword (private or unknown tags as `(gggg,eeee)`), sequences nested."""
    out: dict[str, Any] = {}
    for element in ds:
        name = keyword_for_tag(element.tag) or f"({element.tag.group:04X},{element.tag.elem:04X})"
        if element.VR == "SQ":
            out[name] = [dataset_json(item) for item in element.value]
        else:
            out[name] = _value(element.value)
    return out


def _value(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"({len(value)} bytes)"
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_value(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return str(value)[:MAX_VALUE_SHOWN] if value is not None else ""
