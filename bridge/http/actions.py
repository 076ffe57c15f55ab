"""Every change the HTTP side makes to the worklist, behind one small interface.

`WorklistActions` is the only writer used by the API and the web view. It runs on the reactor
thread (twisted.web handlers do), the thread the HL7 pipeline applies changes on, so a change
made here never interleaves with one made by HL7. Each change is durable before it returns and
gets a translation-log line naming who made it (`by=`, and `peer=http:<who>`).

Items created or replaced from JSON become an HL7 OMI^O23 handed to the pipeline's own
`Bridge.handle`: they are checked, mapped, stored, logged and answered exactly as HL7 is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from twisted.internet import defer, threads

from bridge.dicom import worklist_item
from bridge.hl7.pipeline import move_replayed
from bridge.http import items
from bridge.http.orders import control_id, order_message, values_of_item  # noqa: F401
from bridge.storage.store import StoreError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # kept message names (bridge.hl7.pipeline)
MAX_REJECTED_BYTES = 16 * 1024 * 1024


class ActionError(Exception):
    """A change that was not made: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


@dataclass
class HL7Answer:
    ack_code: str
    text: str
    item_id: str | None = None


class WorklistActions:
    """Status changes, removals, items from JSON and replays of kept messages."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.bridge = server.bridge
        self.store = server.store  # reads only: every change goes through the service
        self.service = server.worklist
        self.index = server.index
        self.translation_log = server.translation_log
        self.settings = server.settings

    # -- status and removal
    def set_status(self, item_id: str, status: str, who: str) -> Dataset:
        status = status.strip().upper()
        if status not in worklist_item.SPS_STATUSES:
            raise ActionError(422, f"status must be one of {', '.join(worklist_item.SPS_STATUSES)}")
        path = self._path(item_id)
        item = self.store.read(path)
        if item is None or not item.get("ScheduledProcedureStepSequence"):
            raise ActionError(404, f"no item {item_id}")
        old = str(item.ScheduledProcedureStepSequence[0].get("ScheduledProcedureStepStatus", ""))
        try:
            # An operator's status is kept as set, finished or not (no retention removal);
            # the service publishes the StatusChange (cause "operator")
            result = self.service.set_status(
                path, status, "operator", only_from=(old,), follow_retention=False
            )
        except StoreError as exc:
            raise ActionError(503, str(exc)) from None
        if result.outcome == "missing":
            raise ActionError(404, f"no item {item_id}")
        if result.outcome == "skipped":
            raise ActionError(409, f"item {item_id} changed meanwhile: try again")
        item = result.item if result.item is not None else item
        self._record(item, path, status.lower(), who, f"status {old or '(none)'} -> {status}")
        return item

    def remove(self, item_id: str, who: str) -> str:
        path = self._path(item_id)
        item = self.store.read(path)
        try:
            if not self.service.remove(path, "operator"):
                raise ActionError(404, f"no item {item_id}")
        except StoreError as exc:
            raise ActionError(503, str(exc)) from None
        self._record(item, path, "removed", who, f"deleted over HTTP by {who}")
        return path.name

    # -- items from JSON, as HL7
    def schedule_from_json(
        self, fields: dict[str, Any], who: str, replace_id: str | None = None
    ) -> HL7Answer:
        """Create (NW) or, with `replace_id`, replace (XO) an item from JSON fields, through
        the HL7 pipeline. The replaced item's values are the defaults of missing fields."""
        if replace_id is not None:
            existing = self.store.read(self._path(replace_id))
            if existing is None:
                raise ActionError(404, f"no item {replace_id}")
            fields = {**values_of_item(existing), **fields}
        try:
            raw = order_message(
                fields,
                who,
                "XO" if replace_id else "NW",
                self.settings.processing_ids[0] if self.settings.processing_ids else "P",
            )
        except ValueError as exc:
            raise ActionError(400, str(exc)) from None
        code, text = _ack_of(self.bridge.handle(raw, f"http:{who}"))
        answer = HL7Answer(code, text)
        if code == "AA":
            answer.item_id = self._find_order(fields)
        return answer

    def _find_order(self, fields: dict[str, Any]) -> str | None:
        query = items.build_query(
            self.settings,
            {
                "AccessionNumber": _escape_wildcards(str(fields.get("AccessionNumber", ""))),
                "ScheduledProcedureStepID": _escape_wildcards(
                    str(fields.get("ScheduledProcedureStepID", ""))
                ),
            },
            include_hidden=True,
        )
        found, _total = items.search(self.index, query, 1)
        return found[0].id if found else None

    # -- kept (rejected) messages
    def rejected_path(self, name: str) -> Path:
        name = name.removesuffix(".hl7")
        if not NAME.match(name):
            raise ActionError(404, f"no kept message {name}")
        path = Path(self.bridge.rejected_dir) / f"{name}.hl7"
        if not path.is_file():
            raise ActionError(404, f"no kept message {name}")
        return path

    def shared_rejected(self) -> Any:
        """The kept messages every bridge shares (PostgreSQL's RejectedMessages), or None:
        then this bridge's rejected folder is what the API lists and replays."""
        return getattr(self.bridge, "rejected_store", None)

    def replay(self, name: str, who: str) -> HL7Answer | defer.Deferred:
        """Run a kept message through the pipeline again (after someone fixed its file); once
        accepted it moves to `replayed/` beside the others, as `wlbridge replay` does. On a
        shared store: a Deferred (the database is read in the thread pool) of the answer."""
        shared = self.shared_rejected()
        if shared is not None:
            return self._replay_shared(shared, name, who)
        path = self.rejected_path(name)
        if path.stat().st_size > MAX_REJECTED_BYTES:
            raise ActionError(413, f"{path.name} is larger than {MAX_REJECTED_BYTES} bytes")
        code, text = _ack_of(self.bridge.handle(path.read_bytes(), f"http:{who} replay"))
        if code == "AA":
            move_replayed(path)
        return HL7Answer(code, text)

    def _replay_shared(self, shared: Any, name: str, who: str) -> defer.Deferred:
        """A row of the shared table, replayed through this bridge's pipeline (the one
        writer) while its session holds the row's replay lock; removed once accepted, so a
        second replay, here or on another bridge, finds nothing (404) or the lock (409)."""
        from bridge.storage.postgres.memory import ReplayRefused

        def run(claimed: Any) -> defer.Deferred:
            try:
                code, text = _ack_of(self.bridge.handle(claimed.data, f"http:{who} replay"))
            except BaseException:
                threads.deferToThread(claimed.finish, False)
                raise
            done = threads.deferToThread(claimed.finish, code == "AA")
            return done.addCallback(lambda _: HL7Answer(code, text))

        def refused(failure: Any) -> Any:
            if failure.check(ReplayRefused):
                raise ActionError(failure.value.status, failure.value.message)
            if failure.check(StoreError):
                raise ActionError(503, str(failure.value))
            return failure

        claiming = threads.deferToThread(shared.claim, name, MAX_REJECTED_BYTES)
        return claiming.addCallback(run).addErrback(refused)

    # -- helpers
    def _path(self, item_id: str) -> Path:
        try:
            return items.path_of(self.index, item_id)
        except items.ItemNotFound:
            raise ActionError(404, f"no item {item_id}") from None

    def _record(self, item: Dataset | None, path: Path, outcome: str, who: str, note: str) -> None:
        self.translation_log.record(
            peer=f"http:{who}",
            type="api",
            accession=str(item.get("AccessionNumber", "")) if item is not None else "",
            patient_id=str(item.get("PatientID", "")) if item is not None else "",
            outcome=outcome,
            file=path.name,
            note=note,
            by=who,
        )


def _escape_wildcards(value: str) -> str:
    # C-FIND matching has no escape for * and ?: an identifier with them cannot be looked up
    # exactly, so such an order is not looked up at all.
    return "" if any(c in value for c in "*?\\") else value


def _ack_of(ack: bytes) -> tuple[str, str]:
    """(MSA-1, "code location text" of the first ERR, else MSA-3) of an ACK from bridge.hl7.ack."""
    text = ack.decode("utf-8", "replace")
    sep = text[3:4] or "|"
    code = detail = error = ""
    for segment in re.split(r"\r\n|\r|\n", text):
        parts = segment.split(sep) + [""] * 9
        if parts[0] == "MSA":
            code, detail = parts[1], parts[3]
        elif parts[0] == "ERR" and not error:
            words = (parts[3].split("^")[0], parts[2], parts[7] or parts[8])
            error = " ".join(w for w in words if w) or parts[1]
    return code, _unescape(error or detail)


def _unescape(text: str) -> str:
    for escaped, plain in (("\\F\\", "|"), ("\\S\\", "^"), ("\\T\\", "&"), ("\\R\\", "~")):
        text = text.replace(escaped, plain)
    return text.replace("\\E\\", "\\")
