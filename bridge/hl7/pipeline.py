"""One message through the whole pipeline, answered with an ACK and recorded in the log.

    bytes -> hl7message -> hl7schema checks -> order -> worklist_item -> store -> ACK

Every message gets an answer and a translation-log line. A message that was not applied is kept
as received in the rejected folder. AA is only sent once every change is durably on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom import Dataset

from bridge.config import FINISHED_STATUSES, Settings
from bridge.core.events import EventBus, PatientMerged
from bridge.core.worklist_service import WorklistService
from bridge.dicom import worklist_item
from bridge.dicom.matching import ISSUER_OF_PATIENT_ID, PATIENT_ID
from bridge.hl7 import order
from bridge.hl7 import schema as hl7schema
from bridge.hl7.ack import build_ack
from bridge.hl7.errors import APPLICATION_INTERNAL_ERROR, DUPLICATE_KEY_IDENTIFIER, HL7Error
from bridge.hl7.message import HL7Message, MessageHeader, parse_message, read_header
from bridge.hl7.order import Action, Ignored, OrderMessage, PatientUpdate
from bridge.ops.translation_log import TranslationLog
from bridge.storage.protocol import ItemKey
from bridge.storage.store import StoreError, WorklistStore

log = logging.getLogger("bridge.hl7.pipeline")

RECENT_MESSAGES = 10_000  # control IDs remembered for answering retries the same way
MAX_REMEMBERED_ACK = 4096  # bytes: an ACK echoes MSH fields, which a sender may make huge


@dataclass
class Outcome:
    """What one message did, for its ACK and its translation-log line."""

    ack_code: str = "AA"
    outcomes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    order_controls: list[str] = field(default_factory=list)
    accessions: list[str] = field(default_factory=list)
    patient_id: str = ""
    error: HL7Error | None = None
    kept_as: str = ""
    # the message's procedure steps, for what each became (station, modality, start)
    steps: list[order.ProcedureStep] = field(default_factory=list)
    # (retry key, digest, header) of the message; with a shared retry memory its AA is
    # remembered in the change's own transaction (`ack`, `remembered`: then done)
    retry: tuple[str, str, MessageHeader | None] | None = None
    ack: bytes | None = None
    remembered: bool = False
    looked_up: bool = False  # the retry memory was read in the change's first round trip


class _Answered(Exception):
    """Raised inside an order's change that finds the message answered already (a retry sent
    while the first was being applied, or to another bridge): the change rolls back."""

    def __init__(self, ack: bytes) -> None:
        super().__init__("answered already")
        self.ack = ack


class RecentAnswers:
    """The answers given to the last RECENT_MESSAGES control IDs, in this process: what a
    retry of one gets. (Bridges sharing a PostgreSQL store share bridge.storage.postgres.
    memory.RetryMemory instead, which has the same two methods.)"""

    def __init__(self) -> None:
        self._recent: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    def lookup(self, key: str) -> tuple[str, bytes] | None:
        """(digest of the message, ACK) answered for `key`, None when none is remembered."""
        return self._recent.get(key)

    def remember(self, key: str, digest: str, ack: bytes) -> None:
        self._recent[key] = (digest, ack)
        self._recent.move_to_end(key)
        while len(self._recent) > RECENT_MESSAGES:
            self._recent.popitem(last=False)


def interpret(message: HL7Message, settings: Settings) -> OrderMessage | PatientUpdate | Ignored:
    """What a parsed message asks of the worklist, after the checks its version calls for."""
    # The order HL7 v2.5.1 2.9.2 gives: acceptance (header, supported type), then content.
    hl7schema.validate_header(message, settings)
    order.check_supported(message)
    hl7schema.check_structure(message, lenient=not settings.strict)
    hl7schema.check_fields(message, settings.strict, settings.pid2_as_patient_id)
    return order.read_message(message, settings)


class Bridge:
    """Applies HL7 messages to the worklist. Runs on one thread (the reactor's), which is what
    keeps two updates of the same order from interleaving."""

    def __init__(
        self,
        settings: Settings,
        store: WorklistStore,
        index,
        translation_log: TranslationLog,
        rejected_dir: Path | None = None,
        events: EventBus | None = None,
        service: WorklistService | None = None,
        retry_memory: RecentAnswers | None = None,
        rejected_store=None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.translation_log = translation_log
        self.rejected_dir = rejected_dir if rejected_dir is not None else settings.rejected_dir
        # what a retry of a control ID gets: in memory, or shared by bridges (PostgreSQL)
        self.retry_memory = retry_memory if retry_memory is not None else RecentAnswers()
        # a shared store's copy of the kept messages (RejectedMessages), besides the folder
        self.rejected_store = rejected_store
        self.events = events  # PatientMerged goes to the other records of a patient (MPPS)
        # every change goes through the worklist service (stored, then published); on its own
        # (tests, tools), the bridge has a service of its own, in the caller's thread
        self.service = service or WorklistService(settings, store, index, events or EventBus())
        self._kept: OrderedDict[str, Path] = OrderedDict()  # digest -> kept rejected message
        if hasattr(index, "translation_log"):  # the index logs removals other programs make
            index.translation_log = translation_log

    # The MLLP handler: bytes in, ACK bytes out.
    def handle(self, raw: bytes, peer: str = "") -> bytes:
        started = time.perf_counter()
        header = read_header(raw.strip(b"\r\n\t "))
        digest = hashlib.sha256(raw).hexdigest()
        key = self._retry_key(header, digest)
        # A shared retry memory is read in the first round trip of an order's change, under
        # the order's lock; for any other message before it is applied or answered.
        deferred = key is not None and hasattr(self.retry_memory, "lookup_statement")
        remembered = None if deferred else self._remembered(key)
        if remembered is not None and remembered[0] == digest:
            return self._answer_duplicate(peer, header, remembered[1], started)
        message: HL7Message | None = None
        result = Outcome(retry=(key, digest, header) if key is not None else None)
        try:
            message = parse_message(raw, self.settings)
            intent = interpret(message, self.settings)
            if isinstance(intent, OrderMessage):
                result.steps = intent.steps
            elif deferred:
                deferred, remembered = False, self._remembered(key)
                if remembered is not None and remembered[0] == digest:
                    return self._answer_duplicate(peer, header, remembered[1], started)
            self._apply(message, intent, result)
        except _Answered as answered:  # the change found it answered: rolled back
            return self._answer_duplicate(peer, header, answered.ack, started)
        except HL7Error as exc:
            # Without its traceback: the frames would tie the message's text into a reference
            # cycle that only the cyclic collector frees, megabytes a message for large ones.
            result.ack_code, result.error = exc.ack_code, exc.with_traceback(None)
        except StoreError as exc:
            result.ack_code = "AR"
            result.error = HL7Error(APPLICATION_INTERNAL_ERROR, "", str(exc), "AR")
        except Exception as exc:  # a bug must cost one message, not the server
            log.exception("internal error on message %s", header.control_id if header else "?")
            result.ack_code = "AR"
            result.error = HL7Error(
                APPLICATION_INTERNAL_ERROR, "", f"internal error: {type(exc).__name__}", "AR"
            )
        if result.error is not None and deferred and not result.looked_up:
            remembered = self._remembered(key)  # a retry of a refused message: the same answer
            if remembered is not None and remembered[0] == digest:
                return self._answer_duplicate(peer, header, remembered[1], started)
        if result.error is not None:
            result.outcomes.append("rejected")  # after the steps a failure left applied, if any
            result.kept_as = self._keep_rejected(raw, header, result.error)
            _add_readable_ids(result, raw, message)
        if result.error is None and result.ack is not None:
            ack = result.ack  # the ACK remembered with the change
        else:
            ack = build_ack(
                header,
                result.ack_code,
                [result.error] if result.error else [],
                text=result.error.text if result.error else "",
            )
        # AR may be transient: retry afresh
        if key is not None and result.ack_code != "AR" and not result.remembered:
            self._remember(key, digest, ack)
        self._record(peer, header, message, result, ack, started)
        return ack

    def _answer_duplicate(
        self, peer: str, header: MessageHeader | None, ack: bytes, started: float
    ) -> bytes:
        """An engine re-sending after a lost ACK: applied once, answered the same way."""
        self._record(
            peer,
            header,
            None,
            Outcome(outcomes=["duplicate"]),
            ack,
            started,
            ack_code=_ack_code(ack),
        )
        return ack

    def refuse_oversized(self, head: bytes, peer: str) -> bytes | None:
        """The answer to a frame refused for its size, built from its first bytes."""
        header = read_header(head)
        error = HL7Error(
            "207",
            "",
            f"message larger than the limit of {self.settings.max_frame_size} bytes",
            "AR",
        )
        ack = build_ack(header, "AR", [error], text=error.text)
        result = Outcome(ack_code="AR", outcomes=["rejected"], error=error)
        _add_readable_ids(result, head, None)
        self._record(peer, header, None, result, ack, time.perf_counter())
        return ack

    def record_dropped(self, head: bytes, peer: str, why: str) -> None:
        """A frame dropped unfinished: never answered (so the sender retries it), but logged."""
        header = read_header(head.strip(b"\r\n\t "))
        result = Outcome(ack_code="", outcomes=["dropped"])
        result.error = HL7Error("", "", f"unfinished frame: {why}", "")
        self._record(peer, header, None, result, b"", time.perf_counter())

    def record_refused(self, peer: str, why: str) -> None:
        """An MLLP connection refused before any message (source, limits, TLS): logged."""
        result = Outcome(ack_code="", outcomes=["connection-refused"])
        result.error = HL7Error("", "", why, "")
        self._record(peer, None, None, result, b"", time.perf_counter())

    # Applying what a message asks
    def _apply(self, message: HL7Message, intent, result: Outcome) -> None:
        if isinstance(intent, Ignored):
            result.outcomes.append("ignored")
            message.notes.append(intent.reason)
        elif isinstance(intent, PatientUpdate):
            self._apply_patient(message, intent, result)
        elif isinstance(intent, OrderMessage):
            self._apply_order(message, intent, result)

    def _apply_order(self, message: HL7Message, intent: OrderMessage, result: Outcome) -> None:
        result.patient_id = intent.patient.patient_id
        # Build every item first: a content error in the last step must not leave the first
        # steps applied.
        # Plain elements, not Datasets: the store encodes them and the index records them.
        planned: list[tuple[order.ProcedureStep, worklist_item.Item]] = []
        for step in intent.steps:
            item = worklist_item.build_elements(message, intent, step, self.settings)
            planned.append((step, item))
        # The look-ups, checks and writes of the order are one step (on a shared store, under
        # the order's lock in one transaction, committed before the ACK).
        first = self.service.key_of_order(intent.steps[0].identity) if intent.steps else None
        lookup = self._lookup_statement(result)
        with self.service.change(first, [lookup] if lookup else []) as rows:
            if lookup is not None:
                result.looked_up = True
                if rows is not None:
                    answer = self.retry_memory.answer_of(rows[0])
                else:  # no transaction was begun: on its own
                    answer = self._remembered(result.retry[0])
                if answer is not None and answer[0] == result.retry[1]:
                    raise _Answered(answer[1])  # a retry: nothing is changed
            self._apply_steps(message, intent, planned, result)
            remembered = self._remember_with_change(result)
        result.remembered = remembered  # committed with the change

    def _apply_steps(
        self,
        message: HL7Message,
        intent: OrderMessage,
        planned: list[tuple[order.ProcedureStep, worklist_item.Item]],
        result: Outcome,
    ) -> None:
        # Every step's item checked before any is written: none may belong to another patient.
        located = [(step, item, self._locate(step)) for step, item in planned]
        for step, _item, key in located:
            self._check_same_patient(message, intent.patient, step, key)
        for step, item, key in located:
            existed = self.service.contains(key)
            result.order_controls.append(step.order_control)
            result.accessions.append(step.accession_number)
            result.files.append(self.service.name_of(key))
            if step.action is Action.SCHEDULE:
                if existed and step.study_uid_derived:
                    self._keep_study_uid(key, item)
                self._write(key, item, step.identity)
                result.outcomes.append("updated" if existed else "created")
            elif step.action is Action.STATUS:
                existing = self.service.dataset(key) if existed else None
                if existing is None:
                    self._write(key, item, step.identity)
                    result.outcomes.append("created")
                else:
                    worklist_item.set_status(existing, step.status)
                    self._write(key, existing, step.identity)
                    result.outcomes.append(step.status.lower())
            else:
                result.outcomes.append(self._finish(key, existed, step))

    def _check_same_patient(
        self, message: HL7Message, patient: order.Patient, step: order.ProcedureStep, key: ItemKey
    ) -> None:
        """An order's identifiers never move its item to another patient (a RIS that reuses
        accession numbers, two senders): AE 205 unless allow-patient-change-by-order is set.
        Patients change through ADT merges and moves only."""
        owner = self._patient_of(key)
        if owner is None:
            return
        stored_id, stored_issuer = owner
        same_id = stored_id == patient.patient_id
        same_issuer = not stored_issuer or not patient.issuer or stored_issuer == patient.issuer
        if same_id and same_issuer:
            return
        known = f"{stored_id}" + (f" ({stored_issuer})" if stored_issuer else "")
        given = patient.patient_id + (f" ({patient.issuer})" if patient.issuer else "")
        if self.settings.allow_patient_change_by_order:
            message.notes.append(
                f"{self.service.name_of(key)}: patient changed from {known} to "
                f"{given} by order {step.order_control} "
                "(allow-patient-change-by-order)"
            )
            return
        raise HL7Error(
            DUPLICATE_KEY_IDENTIFIER,
            patient.locations.get("PatientID", "PID^1^3"),
            f"order {step.accession_number or step.identity[:40]!r} belongs to patient {known}, "
            f"not {given}: patients change through ADT merges and moves only",
        )

    def _patient_of(self, key: ItemKey) -> tuple[str, str] | None:
        """(PatientID, IssuerOfPatientID) of the item under `key`; None when there is none."""
        record = self.service.record(key)
        if record is None:
            return None
        values = [record.get(tag) for tag in (PATIENT_ID, ISSUER_OF_PATIENT_ID)]
        return tuple(  # type: ignore[return-value]
            str(v[0] if isinstance(v, tuple) and v else v or "") for v in values
        )

    def _locate(self, step: order.ProcedureStep) -> ItemKey:
        """The key of the step's item: the order's identity; else, for a message that names a
        known order by other identifiers (a cancel without the accession number, say), the one
        item the storage finds by step ID and another of the order's identifiers."""
        key = self.service.key_of_order(step.identity)
        if step.order_control == "NW" or self.service.contains(key):
            return key  # a new order, or a known one under its own key
        values = step.values
        if step.ids_defaulted:
            # No OBR-19/OBR-20: the made-up IDs may not be the item's, so any step ID matches
            # (`*`) and the order's placer, filler or accession number decides.
            values = {k: v for k, v in values.items() if k != "RequestedProcedureID"}
            values["ScheduledProcedureStepID"] = "*"
            if step.study_uid_derived:
                values.pop("StudyInstanceUID", None)  # derived from the made-up ID
        found = self.service.find_by_order(values)
        return found[0] if len(found) == 1 else key

    def _keep_study_uid(self, key: ItemKey, item: worklist_item.Item) -> None:
        """A replacement without ZDS-1 / IPC-3 keeps the item's Study Instance UID: images may
        already be filed under it."""
        existing = self.service.dataset(key)
        if existing is not None and existing.get("StudyInstanceUID"):
            item.set("StudyInstanceUID", existing.StudyInstanceUID)

    def _finish(self, key: ItemKey, existed: bool, step: order.ProcedureStep) -> str:
        if not existed:
            return "nothing-to-cancel" if step.status != "COMPLETED" else "nothing-to-complete"
        if self.settings.finished_retention > 0:
            existing = self.service.dataset(key)
            if existing is not None:
                worklist_item.set_status(existing, step.status)
                self._write(key, existing, step.identity)
                return "removed"
        self._delete(key)
        return "removed"

    @property
    def _shared_store(self) -> bool:
        """Whether other writers change the same worklist (PostgreSQL: `change()` locks)."""
        return getattr(self.service.storage, "change", None) is not None

    def _write(self, key: ItemKey, item: Dataset | worklist_item.Item, identity: str = "") -> None:
        self.service.put(key, item, "hl7", identity or None)

    def _delete(self, key: ItemKey) -> bool:
        return self.service.delete(key, "hl7")

    def _apply_patient(self, message: HL7Message, update: PatientUpdate, result: Outcome) -> None:
        patient = update.patient
        result.patient_id = patient.patient_id
        lookup_id = update.previous_id or patient.patient_id
        lookup_issuer = update.previous_issuer if update.previous_id else patient.issuer
        items = self.service.items_of_patient(lookup_id, lookup_issuer or None)
        updated = 0
        for path, item in items:
            key = self.service.key_of(path)
            # On a shared store each item is read again under its order's lock and written in
            # the same transaction: a cancel or an MPPS another bridge committed since the
            # look-up is not overwritten by the stale copy (the folder has one writer: as read).
            with self.service.change(key):
                if self._shared_store:
                    item = self.service.dataset(key)
                    if item is None or item.get("PatientID", "") != lookup_id:
                        continue  # removed or moved to another patient meanwhile
                try:
                    worklist_item.apply_patient(item, patient, message)
                    if update.event == "A10" and _status(item) == "SCHEDULED":
                        worklist_item.set_status(item, "ARRIVED")  # not finished or started
                except (AttributeError, KeyError, IndexError, ValueError, TypeError) as exc:
                    # An item another program wrote, which the update cannot be applied to,
                    # must not hold back the patient's feed: it is named in the log instead.
                    message.notes.append(f"{path.name} not updated: {type(exc).__name__}: {exc}")
                    continue
                self._write(key, item)
            result.files.append(path.name)
            updated += 1
        if update.event in ("A40", "A47") and update.previous_id:
            self.service.patient_merged(
                PatientMerged(update.event, update.previous_id, update.previous_issuer, patient)
            )
        verb = {"A40": "merged", "A47": "moved", "A10": "arrived"}.get(update.event, "updated")
        result.outcomes.append(f"patient-{verb}")
        message.notes.append(f"{updated} of {len(items)} item(s) of patient {lookup_id} updated")

    def expired_items(self) -> list[Path]:
        """Finished items past their retention (reads only: may run in a worker thread)."""
        return self.store.expired(self.retention_seconds, FINISHED_STATUSES)

    def remove_expired(self, paths: list[Path]) -> list[str]:
        """Delete the given expired items (on the reactor thread, like every other change)."""
        removed = []
        for path in paths:
            try:
                if self.service.expire(self.service.key_of(path), self.retention_seconds):
                    removed.append(path.name)
                    self.translation_log.record(outcome="expired", file=path.name)
            except StoreError as exc:
                log.error("cannot remove expired item: %s", exc)
        return removed

    def sweep_finished(self) -> list[str]:
        """Delete the files of finished items whose retention period has passed."""
        return self.remove_expired(self.expired_items())

    @property
    def retention_seconds(self) -> float:
        return self.settings.finished_retention * 3600

    # Retries, rejected messages, the log
    def _retry_key(self, header: MessageHeader | None, digest: str = "") -> str | None:
        """A fixed-size key for a sender's control ID: what a retry repeats. Without MSH-10
        (some senders never set it), the message's own digest is the key."""
        if header is None:
            return None
        if not header.control_id:
            return f"digest:{digest}" if digest else None
        sender = "\x00".join(
            (header.sending_application, header.sending_facility, header.control_id)
        )
        return hashlib.sha256(sender.encode("utf-8", "surrogateescape")).hexdigest()

    def _remembered(self, key: str | None) -> tuple[str, bytes] | None:
        if key is None:
            return None
        try:
            return self.retry_memory.lookup(key)
        except StoreError as exc:  # the shared memory is unreachable: evaluated afresh
            log.warning("cannot look up the retry memory: %s", exc)
            return None

    def _lookup_statement(self, result: Outcome) -> tuple[str, tuple] | None:
        statement = getattr(self.retry_memory, "lookup_statement", None)
        if statement is None or result.retry is None:
            return None
        return statement(result.retry[0])

    def _remember_with_change(self, result: Outcome) -> bool:
        """On a shared store, the AA of an order goes into the retry memory in the change's
        own transaction (one commit for both, and no extra round trip): True when it did."""
        statement = getattr(self.retry_memory, "statement", None)
        if statement is None or result.retry is None or result.error is not None:
            return False
        key, digest, header = result.retry
        ack = build_ack(header, result.ack_code, [], text="")
        if len(ack) > MAX_REMEMBERED_ACK or not self.service.with_commit(
            *statement(key, digest, ack)
        ):
            return False
        result.ack = ack
        return True

    def _remember(self, key: str, digest: str, ack: bytes) -> None:
        if len(ack) > MAX_REMEMBERED_ACK:
            return  # such a sender gets its retry evaluated afresh rather than our memory
        try:
            self.retry_memory.remember(key, digest, ack)
        except StoreError as exc:  # the change itself is durable: its ACK is still due
            log.error("cannot remember the answer to a control ID: %s", exc)

    def _keep_rejected(self, raw: bytes, header: MessageHeader | None, error: HL7Error) -> str:
        """Keep the message byte for byte, with its reason beside it, for `wlbridge replay`."""
        try:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(raw).hexdigest()
            kept = self._kept.get(digest)
            if kept is not None and kept.is_file():
                # A retry of the same bytes (an engine re-sending after AR): one file, whose
                # reason says the latest answer.
                self._kept.move_to_end(digest)
                kept.with_suffix(".reason").write_text(
                    f"{error.ack_code} {error.code} {error.location} {error.text}\n",
                    encoding="utf-8",
                )
                return str(kept)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            control = re.sub(r"[^A-Za-z0-9_-]", "_", header.control_id if header else "")[:32]
            name = f"{stamp}-{control or 'unknown'}-{digest[:8]}"
            path = self.rejected_dir / f"{name}.hl7"
            path.write_bytes(raw)
            self._kept[digest] = path
            while len(self._kept) > RECENT_MESSAGES:
                self._kept.popitem(last=False)
            (self.rejected_dir / f"{name}.reason").write_text(
                f"{error.ack_code} {error.code} {error.location} {error.text}\n", encoding="utf-8"
            )
            return str(path)
        except OSError as exc:
            log.error("cannot keep rejected message: %s", exc)
            return ""
        finally:
            self._keep_shared(raw, header, error)

    def _keep_shared(self, raw: bytes, header: MessageHeader | None, error: HL7Error) -> None:
        """The shared store's copy of a kept message (every bridge's, in one table)."""
        if self.rejected_store is None:
            return
        reason = f"{error.ack_code} {error.code} {error.location} {error.text}"
        try:
            self.rejected_store.keep_message(raw, header.control_id if header else "", reason)
        except StoreError as exc:  # the database is what failed, often: the folder has it
            log.warning("rejected message kept in the folder only: %s", exc)

    def _record(
        self,
        peer: str,
        header: MessageHeader | None,
        message: HL7Message | None,
        result: Outcome,
        ack: bytes,
        started: float,
        ack_code: str | None = None,
    ) -> None:
        error = result.error
        reason = ""
        if error is not None:
            reason = " ".join(part for part in (error.code, error.location, error.text) if part)
        msg_type = ""
        if header is not None and header.message_type:
            msg_type = f"{header.message_type}^{header.trigger_event}"
        self.translation_log.record(
            peer=peer,
            control_id=header.control_id if header else "",
            type=msg_type,
            order_control=",".join(result.order_controls),
            accession=",".join(a for a in result.accessions if a),
            patient_id=result.patient_id,
            outcome=",".join(result.outcomes),
            ack=ack_code or result.ack_code,
            file=",".join(result.files),
            **_step_fields(result),
            reason=reason,
            kept_as=result.kept_as,
            note="; ".join(message.notes) if message is not None else "",
            ms=f"{(time.perf_counter() - started) * 1000:.1f}",
        )


def move_replayed(path: Path) -> None:
    """Move a kept rejected message (and its reason) that was accepted on replay into the
    `replayed` folder beside it (`wlbridge replay` and the web page's replay). Its modified
    time becomes the replay's: a bridge on PostgreSQL finishes the shared table's row of the
    same message kept before then (bridge.ops.rejected_copies)."""
    done = path.parent / "replayed"
    done.mkdir(exist_ok=True)
    path.rename(done / path.name)
    os.utime(done / path.name)
    reason = path.with_suffix(".reason")
    if reason.exists():
        reason.rename(done / reason.name)


def _step_fields(result: Outcome) -> dict[str, str]:
    """station, modality, sps_date, sps_time of the steps applied (comma-separated, in order)."""
    steps = result.steps[: len(result.files)]  # those applied: one file each

    def joined(keyword: str) -> str:
        values = []
        for step in steps:
            value = step.values.get(keyword, "")
            values.append("+".join(value) if isinstance(value, list) else str(value))
        return ",".join(values) if any(values) else ""

    return {
        "station": joined("ScheduledStationAETitle"),
        "modality": joined("Modality"),
        "sps_date": joined("ScheduledProcedureStepStartDate"),
        "sps_time": joined("ScheduledProcedureStepStartTime"),
    }


MAX_READ_SEGMENTS = 1000  # segments looked at for a rejected message's identifiers
MAX_READ_ORDERS = 32  # order controls and accession numbers kept from one rejected message
MAX_ID_LENGTH = 64  # characters of an identifier written to the log


def _add_readable_ids(result: Outcome, raw: bytes, message: HL7Message | None) -> None:
    """A rejected message's accession numbers, order controls and patient ID, as far as they
    can be read (from the raw segments when parsing failed), for its log line."""
    if not (result.order_controls and result.accessions and result.patient_id):
        try:
            controls, accessions, patient_id = (
                _ids_of_message(message) if message is not None else _ids_of_raw(raw)
            )
        except Exception:  # best effort: the line must be written whatever the bytes are
            controls, accessions, patient_id = [], [], ""
        # what the steps applied before the failure said stays
        result.order_controls = result.order_controls or controls[:MAX_READ_ORDERS]
        result.accessions = result.accessions or accessions[:MAX_READ_ORDERS]
        result.patient_id = result.patient_id or patient_id
    result.order_controls = [c[:MAX_ID_LENGTH] for c in result.order_controls]
    result.accessions = [a[:MAX_ID_LENGTH] for a in result.accessions]
    result.patient_id = result.patient_id[:MAX_ID_LENGTH]


def _ids_of_message(message: HL7Message) -> tuple[list[str], list[str], str]:
    controls = [orc.value(1).strip().upper() for orc in message.all("ORC")]
    ipcs = message.all("IPC")
    if ipcs:
        accessions = [ipc.value(1).strip() for ipc in ipcs]
    else:
        accessions = [obr.value(18).strip() for obr in message.all("OBR")]
    patient_id = ""
    pid = message.first("PID")
    if pid is not None:
        for repetition in pid.repetitions(3):
            patient_id = pid.leaf(repetition, 1).strip()
            if patient_id:
                break
    return controls, accessions, patient_id


def _ids_of_raw(raw: bytes) -> tuple[list[str], list[str], str]:
    """The same from bytes that did not parse: separators from MSH, else the usual ones."""
    text = raw.lstrip(b"\x0b\r\n\t ")
    field_sep, component, repetition = b"|", b"^", b"~"
    if text.startswith(b"MSH") and len(text) >= 6:
        field_sep, component, repetition = text[3:4], text[4:5], text[5:6]
    controls: list[str] = []
    obr_accessions: list[str] = []
    ipc_accessions: list[str] = []
    patient_id = ""
    for line in re.split(rb"[\r\n]+", text, maxsplit=MAX_READ_SEGMENTS)[:MAX_READ_SEGMENTS]:
        fields = line.split(field_sep)
        name = fields[0].strip()
        if name == b"ORC":
            controls.append(_first_component(fields, 1, component, repetition).upper())
        elif name == b"OBR":
            obr_accessions.append(_first_component(fields, 18, component, repetition))
        elif name == b"IPC":
            ipc_accessions.append(_first_component(fields, 1, component, repetition))
        elif name == b"PID" and not patient_id:
            patient_id = _first_component(fields, 3, component, repetition)
    return controls, ipc_accessions or obr_accessions, patient_id


def _first_component(fields: list[bytes], no: int, component: bytes, repetition: bytes) -> str:
    value = fields[no] if len(fields) > no else b""
    value = value.split(repetition)[0].split(component)[0].strip()
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _status(item: Dataset) -> str:
    steps = item.get("ScheduledProcedureStepSequence") or []
    return str(steps[0].get("ScheduledProcedureStepStatus", "")) if steps else ""


def _ack_code(ack: bytes) -> str:
    match = re.search(rb"MSA.(A[AER])", ack)
    return match.group(1).decode() if match else ""
