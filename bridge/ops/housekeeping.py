"""Housekeeping of items nobody finishes: the `[[housekeeping]]` rules.

A rule names an SPS status, a number of hours and an action: items in that status whose
scheduled start (SPS Start Date and Time, local time as DICOM has it; the file's time when the
item has none) is more than that many hours past are discontinued, or removed, optionally only
on some stations. Off unless rules are configured. Candidates are found in the index (in a
worker thread); each change goes through the worklist service on the writer thread (which
publishes a StatusChange with cause "housekeeping", and re-checks the status, so an item a new
message changed meanwhile is left alone) and gets a translation-log line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bridge.config import HousekeepingRule, Settings
from bridge.core.worklist_service import WorklistService
from bridge.dicom.matching import (
    ACCESSION_NUMBER,
    PATIENT_ID,
    SPS_SEQUENCE,
    SPS_START_DATE,
    SPS_START_TIME,
    SPS_STATUS,
    STATION_AET,
    Record,
)
from bridge.ops.translation_log import TranslationLog

log = logging.getLogger("bridge.ops.housekeeping")


@dataclass(frozen=True)
class Candidate:
    path: Path
    rule: HousekeepingRule
    status: str
    accession: str
    patient_id: str


def scheduled_start(step, fallback: float) -> datetime:
    """The SPS start as a local datetime; `fallback` (a timestamp) when absent or unreadable."""
    date = str(step.get("ScheduledProcedureStepStartDate", "") or "").strip()
    clock = str(step.get("ScheduledProcedureStepStartTime", "") or "").strip().split(".")[0]
    clock = clock.replace(":", "")
    try:
        return datetime.strptime(date + (clock + "000000")[:6], "%Y%m%d%H%M%S")
    except ValueError:
        return datetime.fromtimestamp(fallback)


def _text(value: Any) -> str:
    """A record's value as text (its first value when it has several)."""
    if isinstance(value, tuple):
        value = value[0] if value else ""
    return str(value or "").strip()


def _texts(value: Any) -> set[str]:
    values = value if isinstance(value, tuple) else (value,)
    return {str(v).strip() for v in values if v}


def find_idle(index: Any, rules: list[HousekeepingRule], now: datetime) -> list[Candidate]:
    """The items the rules apply to now, from the index (every called AE's items in the per-ae
    layout): reads only, so it may run in a worker thread."""
    found = []
    for key, _folder, record, mtime in sorted(index.snapshot(), key=lambda entry: entry[0]):
        steps = record.get(SPS_SEQUENCE)
        if not (isinstance(steps, tuple) and steps and isinstance(steps[0], Record)):
            continue
        step = steps[0]
        status = _text(step.get(SPS_STATUS))
        stations = _texts(step.get(STATION_AET))
        start = {
            "ScheduledProcedureStepStartDate": _text(step.get(SPS_START_DATE)),
            "ScheduledProcedureStepStartTime": _text(step.get(SPS_START_TIME)),
        }
        if mtime is None:
            try:
                mtime = os.stat(key).st_mtime
            except OSError:
                continue  # gone since
        age_hours = (now - scheduled_start(start, mtime)).total_seconds() / 3600
        for rule in rules:
            if rule.status != status or age_hours <= rule.after_hours:
                continue
            if rule.stations and not stations & set(rule.stations):
                continue
            found.append(
                Candidate(
                    Path(key),
                    rule,
                    status,
                    _text(record.get(ACCESSION_NUMBER)),
                    _text(record.get(PATIENT_ID)),
                )
            )
            break  # the first rule that applies
    return found


class Housekeeping:
    def __init__(
        self, settings: Settings, service: WorklistService, translation_log: TranslationLog
    ) -> None:
        self.settings = settings
        self.rules = settings.housekeeping
        self.service = service
        self.translation_log = translation_log

    def find(self, now: datetime | None = None) -> list[Candidate]:
        return find_idle(self.service.index, self.rules, now or datetime.now())

    def apply(self, candidates: list[Candidate]) -> list[str]:
        """Discontinue or remove the candidates (through the service); the outcomes, by file."""
        done = []
        for candidate in candidates:
            rule = candidate.rule
            try:
                result = self.service.set_status(
                    candidate.path,
                    "DISCONTINUED",
                    "housekeeping",
                    only_from=(rule.status,),
                    remove=rule.action == "remove",
                )
            except Exception as exc:  # one item's failure must not stop the round
                log.error("housekeeping of %s failed: %s", candidate.path.name, exc)
                self._record(candidate, "failed", f"{type(exc).__name__}: {exc}")
                continue
            if not result.changed:
                continue  # changed or removed by a message since it was found
            outcome = "removed" if rule.action == "remove" else "discontinued"
            self._record(candidate, outcome, "")
            done.append(f"{candidate.path.name}:{outcome}")
        return done

    def run_once(self, now: datetime | None = None) -> list[str]:
        return self.apply(self.find(now))

    def _record(self, candidate: Candidate, outcome: str, reason: str) -> None:
        rule = candidate.rule
        self.translation_log.record(
            type="housekeeping",
            accession=candidate.accession,
            patient_id=candidate.patient_id,
            outcome=outcome,
            file=candidate.path.name,
            reason=reason,
            note=f"{candidate.status} more than {rule.after_hours:g} h after its scheduled start",
        )
