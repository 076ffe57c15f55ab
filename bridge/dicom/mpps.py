"""The MPPS SCP (Modality Performed Procedure Step, PS3.4 F.7): what the modality did reaches the
worklist.

One handler function per DIMSE service (`handle_n_create`, `handle_n_set`), as pynetdicom's
apps do; they run in the association's thread, check what the peer sent, then hand the check
against the stored instances and the changes it leads to to the writer thread in one step
(`WorklistService.on_writer`), so two associations never race on one instance. Every instance is
stored durably before its success status; its Scheduled Step Attributes Sequence names the
worklist items whose status follows (see docs/mpps.md).
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt

from bridge.core.events import PatientMerged
from bridge.core.worklist_service import WorklistService
from bridge.dicom import worklist_item
from bridge.ops.translation_log import TranslationLog
from bridge.storage.mpps_store import MPPSStore
from bridge.storage.store import StoreError

log = logging.getLogger("bridge.dicom.mpps")

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
RESOURCE_LIMITATION = 0x0213
MAY_NO_LONGER_BE_UPDATED = 0xA710  # Error ID of a 0110 answer to an N-SET of a final instance

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
PPS_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
SPS_STATUS_FOR = {IN_PROGRESS: "STARTED", COMPLETED: "COMPLETED", DISCONTINUED: "DISCONTINUED"}
OPEN_SPS_STATUSES = ("SCHEDULED", "ARRIVED", "READY", "STARTED")  # an MPPS never reopens a step

MAX_ATTRIBUTE_LIST_BYTES = 1024 * 1024  # an MPPS is a few kB; a peer may send any size
MAX_SCHEDULED_STEPS = 100  # items of the Scheduled Step Attributes Sequence (a group case)
STATUS_TAG = 0x00400252  # Performed Procedure Step Status
FULL_LOG_INTERVAL = 60.0  # seconds between the server log's lines about a full MPPS store
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

# Attributes an N-SET may not change (PS3.4 Table F.7.2-1): the instance's identity, the
# patient and the scheduled steps it performed are fixed by the N-CREATE.
_NOT_SETTABLE = frozenset(
    (
        "SOPClassUID",
        "SOPInstanceUID",
        "ScheduledStepAttributesSequence",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformedStationAETitle",
        "PerformedProcedureStepID",
        "SpecificCharacterSet",
    )
)


@dataclass
class Outcome:
    """What one N-CREATE or N-SET did, for its answer and its translation-log line."""

    status: int = SUCCESS
    outcome: str = ""
    reason: str = ""
    error_id: int | None = None
    attributes: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    accessions: list[str] = field(default_factory=list)
    patient_id: str = ""
    pps_status: str = ""
    notes: list[str] = field(default_factory=list)

    def answer(self, attribute_list: bool = True) -> Dataset:
        """The status dataset; `attribute_list`: with the Attribute Identifier List (pynetdicom
        sends it in an N-SET-RSP only; the Error Comment names the attribute too)."""
        status = Dataset()
        status.Status = self.status
        if self.reason and self.status != SUCCESS:
            status.ErrorComment = self.reason[:64]  # LO
        if self.error_id is not None:
            status.ErrorID = self.error_id
        if self.attributes and attribute_list:
            status.AttributeIdentifierList = self.attributes
        return status


class MPPSService:
    """The MPPS SCP's logic: validation, matching, status changes, storage, the log."""

    def __init__(
        self,
        store: MPPSStore,
        worklist: WorklistService,
        translation_log: TranslationLog,
        max_instances: int = 0,
        retention_hours: float = 0.0,
    ) -> None:
        self.store = store
        self.worklist = worklist
        self.translation_log = translation_log
        self.max_instances = max_instances  # mpps-max-instances; 0: no cap
        self.retention_hours = retention_hours  # mpps-retention, for the on-call's log line
        self.refused_full = 0  # N-CREATEs refused because the cap was reached
        self._full_logged_at: float | None = None
        self._full_unlogged = 0

    # ---- N-CREATE

    def create(
        self, uid: str, attributes: Dataset, calling: str, peer: str, generated: bool = False
    ) -> Outcome:
        started = time.perf_counter()
        result = Outcome(outcome="refused")
        try:
            self._check_create(uid, attributes, result)
            if result.status == SUCCESS:
                self.worklist.on_writer(self._create, uid, attributes, calling, result)
        except Exception as exc:
            self._failed(result, exc)
        if generated and result.status == SUCCESS:
            result.notes.append("SOP Instance UID generated")
        self.record("MPPS^N-CREATE", calling, peer, uid, result, started)
        return result

    def _check_create(self, uid: str, attributes: Dataset, result: Outcome) -> None:
        result.patient_id = str(attributes.get("PatientID", ""))
        status = attributes.get("PerformedProcedureStepStatus")
        result.pps_status = str(status or "")
        if not _valid_uid(uid):
            self._refuse(result, INVALID_OBJECT_INSTANCE, "SOP Instance UID is not a valid UID")
        elif status is None:
            self._refuse(result, MISSING_ATTRIBUTE, "(0040,0252) PPS Status missing")
            result.attributes = [STATUS_TAG]
        elif str(status) != IN_PROGRESS:
            self._refuse(
                result, INVALID_ATTRIBUTE_VALUE, "(0040,0252) PPS Status must be IN PROGRESS"
            )
            result.attributes = [STATUS_TAG]
        elif len(attributes.get("ScheduledStepAttributesSequence") or []) > MAX_SCHEDULED_STEPS:
            self._refuse(
                result, RESOURCE_LIMITATION,
                f"more than {MAX_SCHEDULED_STEPS} scheduled steps referenced",
            )  # fmt: skip

    def _instance_step(self, uid: str) -> AbstractContextManager[None]:
        """A shared store's lock on the instance around its check and write (PostgreSQL: one
        transaction); the folder's store has one writer, this thread: a plain block."""
        locked = getattr(self.store, "locked", None)
        return locked(uid) if locked is not None else nullcontext()

    def _create(self, uid: str, attributes: Dataset, calling: str, result: Outcome) -> None:
        with self._instance_step(uid):
            self._create_now(uid, attributes, calling, result)

    def _create_now(self, uid: str, attributes: Dataset, calling: str, result: Outcome) -> None:
        """On the writer thread: the duplicate check, the worklist changes, the durable store."""
        if uid in self.store:
            self._refuse(result, DUPLICATE_INSTANCE, "an MPPS instance with this UID exists")
            return
        if self.max_instances and len(self.store) >= self.max_instances:
            # Before any change: the worklist is untouched, existing instances still take
            # their N-SETs, and a sweep (or a higher cap) lets the modality's retry through.
            self._refuse(
                result,
                RESOURCE_LIMITATION,
                f"MPPS store full: mpps-max-instances {self.max_instances} reached",
            )
            self._log_full(calling)
            return
        self._apply(uid, attributes, "STARTED", calling, result)
        self.store.put(uid, attributes)
        result.outcome = "started" if result.files else "unmatched"

    def _log_full(self, calling: str) -> None:
        """What the on-call person needs, at most once a minute (a modality that N-CREATEs
        without end would otherwise flood the log; the translation log has every refusal)."""
        self.refused_full += 1
        self._full_unlogged += 1
        now = time.monotonic()
        if self._full_logged_at is not None and now - self._full_logged_at < FULL_LOG_INTERVAL:
            return
        log.error(
            "MPPS N-CREATE refused (0213 resource limitation) %d time(s), the last from %s: "
            "%d instances kept, mpps-max-instances = %d. Finished instances are removed "
            "%g h after their last change (mpps-retention). If this many are expected, raise "
            "mpps-max-instances or lower mpps-retention; otherwise find the modality creating "
            "instances without end (translation log: type=MPPS^N-CREATE, by calling_ae). "
            "N-SETs of kept instances and the worklist go on working.",
            self._full_unlogged,
            calling,
            len(self.store),
            self.max_instances,
            self.retention_hours,
        )
        self._full_logged_at = now
        self._full_unlogged = 0

    # ---- N-SET

    def update(self, uid: str, modifications: Dataset, calling: str, peer: str) -> Outcome:
        started = time.perf_counter()
        result = Outcome(outcome="refused")
        try:
            status = modifications.get("PerformedProcedureStepStatus")
            result.pps_status = str(status or "")
            if status is not None and str(status) not in PPS_STATUSES:
                self._refuse(
                    result, INVALID_ATTRIBUTE_VALUE,
                    "(0040,0252) PPS Status must be IN PROGRESS, COMPLETED or DISCONTINUED",
                )  # fmt: skip
                result.attributes = [STATUS_TAG]
            else:
                self.worklist.on_writer(self._update, uid, modifications, calling, result)
        except Exception as exc:
            self._failed(result, exc)
        self.record("MPPS^N-SET", calling, peer, uid, result, started)
        return result

    def _update(self, uid: str, modifications: Dataset, calling: str, result: Outcome) -> None:
        with self._instance_step(uid):
            self._update_now(uid, modifications, calling, result)

    def _update_now(self, uid: str, modifications: Dataset, calling: str, result: Outcome) -> None:
        stored_status = self.store.status(uid)
        if stored_status is None:
            self._refuse(result, NO_SUCH_INSTANCE, "no MPPS instance with this UID")
            return
        if stored_status != IN_PROGRESS:
            self._refuse(
                result, PROCESSING_FAILURE,
                "Performed Procedure Step Object may no longer be updated",
            )  # fmt: skip
            result.error_id = MAY_NO_LONGER_BE_UPDATED
            return
        instance = self.store.get(uid)
        if instance is None:
            self._refuse(result, NO_SUCH_INSTANCE, "no MPPS instance with this UID")
            return
        ignored = []
        for element in modifications:
            if element.keyword in _NOT_SETTABLE:
                ignored.append(element.keyword)
            else:
                instance[element.tag] = element
        if ignored:
            result.notes.append("not settable, ignored: " + ",".join(ignored))
        new_status = str(instance.get("PerformedProcedureStepStatus", IN_PROGRESS))
        result.pps_status = new_status
        result.patient_id = str(instance.get("PatientID", ""))
        if new_status == IN_PROGRESS:
            self.store.put(uid, instance)
            result.outcome = "updated"
            return
        self._apply(uid, instance, SPS_STATUS_FOR[new_status], calling, result)
        self.store.put(uid, instance)
        result.outcome = new_status.lower() if result.files else "unmatched"

    # ---- matching and status changes (writer thread)

    def _apply(
        self, uid: str, instance: Dataset, sps_status: str, calling: str, result: Outcome
    ) -> None:
        performed_start = str(instance.get("PerformedProcedureStepStartDate", "")) + str(
            instance.get("PerformedProcedureStepStartTime", "")
        )
        # The RIS hears which modality did the exam: the one the PPS names, else the one that
        # reported it (the scheduled station may not be the one that performed it).
        station = str(instance.get("PerformedStationAETitle", "") or "").strip() or calling
        for path in self.matching_items(instance, result):
            change = self.worklist.set_status(
                path,
                sps_status,
                "mpps",
                only_from=OPEN_SPS_STATUSES,
                performed_start=performed_start.split(".")[0],
                performing_station=station,
                mpps_uid=uid,
            )
            result.files.append(path.name)
            if change.outcome in ("skipped", "missing"):
                result.notes.append(f"{path.name} left {change.old_status or 'absent'}")

    def matching_items(self, instance: Dataset, result: Outcome | None = None) -> list:
        """The worklist items the instance's scheduled steps name: by Study Instance UID and
        SPS ID, else by Accession Number (and its issuer); never by patient alone."""
        found: dict[Any, None] = {}
        for step in instance.get("ScheduledStepAttributesSequence") or []:
            accession = str(step.get("AccessionNumber", "") or "")
            if result is not None and accession:
                result.accessions.append(accession)
            paths = self.worklist.find_by_study_and_step(
                str(step.get("StudyInstanceUID", "") or ""),
                str(step.get("ScheduledProcedureStepID", "") or ""),
            )
            if not paths:
                issuers = step.get("IssuerOfAccessionNumberSequence") or []
                issuer = str(issuers[0].get("LocalNamespaceEntityID", "")) if issuers else ""
                paths = self.worklist.find_by_accession(accession, issuer)
            found.update((path, None) for path in paths)
        return list(found)

    # ---- patients (ADT A40/A47, on the writer thread)

    def on_patient_merged(self, event: object) -> None:
        """Rewrite the patient of the stored instances of the merged or renamed patient."""
        assert isinstance(event, PatientMerged)
        values = worklist_item.patient_values(event.patient)  # type: ignore[arg-type]
        for uid in self.store.of_patient(event.previous_id, event.previous_issuer):
            try:
                instance = self.store.get(uid)
                if instance is None:
                    continue
                for _ in instance.iterall():  # decode with the charset it was stored with
                    pass
            except Exception as exc:  # a damaged file must not hold back the patient feed
                log.error("MPPS %s not moved to the merged patient: %s", uid, exc)
                continue
            for keyword, value in values.items():
                if keyword in instance or value:
                    setattr(instance, keyword, value)
            text = "".join(str(v) for v in values.values())
            if not text.isascii():
                instance.SpecificCharacterSet = "ISO_IR 192"
            self.store.put(uid, instance)
            log.info("MPPS %s moved to patient %s (%s)", uid, values["PatientID"], event.event)

    # ---- answers and the log

    @staticmethod
    def _refuse(result: Outcome, status: int, reason: str) -> None:
        result.status, result.reason, result.outcome = status, reason, "refused"

    @staticmethod
    def _failed(result: Outcome, exc: Exception) -> None:
        if isinstance(exc, StoreError):
            reason = str(exc)
        else:
            log.exception("MPPS processing failed")
            reason = f"internal error: {type(exc).__name__}: {exc}"
        result.status, result.reason, result.outcome = PROCESSING_FAILURE, reason, "failed"

    def record(
        self, kind: str, calling: str, peer: str, uid: str, result: Outcome, started: float
    ) -> None:
        self.translation_log.record(
            peer=peer,
            type=kind,
            calling_ae=calling,
            mpps_uid=uid,
            pps_status=result.pps_status,
            accession=",".join(result.accessions),
            patient_id=result.patient_id,
            outcome=result.outcome,
            status=f"0x{result.status:04X}",
            file=",".join(result.files),
            reason=result.reason,
            note="; ".join(result.notes),
            ms=f"{(time.perf_counter() - started) * 1000:.1f}",
        )


def _valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


def _who(event: Any) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), f"{requestor.address}:{requestor.port}"


def _too_large(stream: Any) -> bool:
    try:
        return stream is not None and stream.getbuffer().nbytes > MAX_ATTRIBUTE_LIST_BYTES
    except (AttributeError, ValueError):
        return False


def _decoded(
    event: Any, name: str, kind: str, calling: str, peer: str, uid: str, mpps: MPPSService
) -> Dataset | Outcome:
    """The request's dataset, decoded; else the refusal (logged) to answer with."""
    try:
        dataset = getattr(event, name)
        for _ in dataset.iterall():  # decode every element now, not half-way through the work
            pass
        return dataset
    except Exception as exc:
        result = Outcome(outcome="refused")
        MPPSService._refuse(result, PROCESSING_FAILURE, f"undecodable dataset: {exc}"[:200])
        mpps.record(kind, calling, peer, uid, result, time.perf_counter())
        return result


def handle_n_create(event: Any, mpps: MPPSService) -> tuple[Dataset, Dataset | None]:
    """EVT_N_CREATE: create an MPPS instance (PS3.4 F.7.2.1)."""
    calling, peer = _who(event)
    request = event.request
    uid = str(request.AffectedSOPInstanceUID) if request.AffectedSOPInstanceUID else None
    if _too_large(request.AttributeList):
        result = Outcome(outcome="refused")
        MPPSService._refuse(
            result, RESOURCE_LIMITATION, f"attribute list over {MAX_ATTRIBUTE_LIST_BYTES} bytes"
        )
        mpps.record("MPPS^N-CREATE", calling, peer, uid or "", result, time.perf_counter())
        return result.answer(attribute_list=False), None
    generated = uid is None
    uid = uid or generate_uid()
    attributes = _decoded(event, "attribute_list", "MPPS^N-CREATE", calling, peer, uid, mpps)
    if isinstance(attributes, Outcome):
        return attributes.answer(attribute_list=False), None
    result = mpps.create(uid, attributes, calling, peer, generated)
    if result.status != SUCCESS:
        return result.answer(attribute_list=False), None
    reply = Dataset()
    if generated:
        reply.AffectedSOPInstanceUID = uid  # pynetdicom moves it into the response
    return result.answer(attribute_list=False), reply


def handle_n_set(event: Any, mpps: MPPSService) -> tuple[Dataset, Dataset | None]:
    """EVT_N_SET: update an MPPS instance (PS3.4 F.7.2.2)."""
    calling, peer = _who(event)
    request = event.request
    uid = str(request.RequestedSOPInstanceUID or "")
    if _too_large(request.ModificationList):
        result = Outcome(outcome="refused")
        MPPSService._refuse(
            result, RESOURCE_LIMITATION, f"modification list over {MAX_ATTRIBUTE_LIST_BYTES} bytes"
        )
        mpps.record("MPPS^N-SET", calling, peer, uid, result, time.perf_counter())
        return result.answer(), None
    modifications = _decoded(event, "modification_list", "MPPS^N-SET", calling, peer, uid, mpps)
    if isinstance(modifications, Outcome):
        return modifications.answer(), None
    result = mpps.update(uid, modifications, calling, peer)
    return result.answer(), None


def mpps_handlers(mpps: MPPSService) -> list[tuple[Any, Any, list[Any]]]:
    """The handlers to bind on the DICOM server, beside the C-FIND ones."""
    return [(evt.EVT_N_CREATE, handle_n_create, [mpps]), (evt.EVT_N_SET, handle_n_set, [mpps])]
