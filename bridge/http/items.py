"""Worklist items as the HTTP side shows them: ids, JSON, and searches with C-FIND's matching.

An item's id is its file name without `.wl` (the store names files after a hash of the order's
identity, so the id is stable across updates and URL-safe); in the per-ae layout ids are looked
up in every called-AE folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.sequence import Sequence

from bridge.config import Settings
from bridge.dicom.matching import Query, QueryError, Record, compile_query
from bridge.storage.index import WorklistIndex

SPS_SEQUENCE = 0x00400100
SPS_STATUS = 0x00400020
MAX_FILTER_LENGTH = 128  # characters of one filter value: matching is per character
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# Filters of GET /api/items: query parameter -> (level, C-FIND keyword)
ITEM_FILTERS = {
    "PatientID": ("top", "PatientID"),
    "PatientName": ("top", "PatientName"),
    "AccessionNumber": ("top", "AccessionNumber"),
    "StudyInstanceUID": ("top", "StudyInstanceUID"),
    "RequestedProcedureID": ("top", "RequestedProcedureID"),
    "Modality": ("sps", "Modality"),
    "ScheduledStationAETitle": ("sps", "ScheduledStationAETitle"),
    "ScheduledProcedureStepID": ("sps", "ScheduledProcedureStepID"),
    "date": ("sps", "ScheduledProcedureStepStartDate"),
    "status": ("sps", "ScheduledProcedureStepStatus"),
}

# The attributes a listing shows of each item (an item's own page shows all).
SUMMARY_TOP = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
)
SUMMARY_SPS = (
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
)


class ItemNotFound(LookupError):
    pass


@dataclass
class Found:
    id: str
    path: Path
    record: Record


def item_id(path: str | os.PathLike) -> str:
    return Path(path).name.removesuffix(".wl")


def valid_id(text: str) -> bool:
    return bool(_ID.match(text))


def path_of(index: WorklistIndex, ident: str) -> Path:
    """The indexed file of the item `ident`; ItemNotFound otherwise."""
    if not valid_id(ident):
        raise ItemNotFound(ident)
    root = Path(index.root)
    folders = [root]
    if index.per_ae:
        folders = [root / name for name in sorted(index.ae_folders())]
    for folder in folders:
        path = folder / f"{ident}.wl"
        if index.record(path) is not None:
            return path
    raise ItemNotFound(ident)


def find(index: WorklistIndex, ident: str) -> Found:
    path = path_of(index, ident)
    record = index.record(path)
    if record is None:
        raise ItemNotFound(ident)
    return Found(ident, path, record)


def build_query(settings: Settings, filters: dict[str, str], include_hidden: bool) -> Query:
    """A C-FIND query from the listing's filters: the same matching rules as a modality gets.
    Raises QueryError (a bad value) or ValueError (a filter too long)."""
    identifier = Dataset()
    step = Dataset()
    for name, (level, keyword) in ITEM_FILTERS.items():
        value = filters.get(name, "")
        if len(value) > MAX_FILTER_LENGTH:
            raise ValueError(f"{name}: longer than {MAX_FILTER_LENGTH} characters")
        if any(not c.isprintable() for c in value):
            raise ValueError(f"{name}: control characters are not allowed")
        setattr(step if level == "sps" else identifier, keyword, value)
    identifier.ScheduledProcedureStepSequence = Sequence([step])
    hidden = () if include_hidden else tuple(s.upper() for s in settings.hidden_statuses)
    return compile_query(
        identifier, pn_case_insensitive=settings.pn_case_insensitive, hidden_statuses=hidden
    )


def search(index: WorklistIndex, query: Query, limit: int) -> tuple[list[Found], int]:
    """Items matching `query` in SPS start order (at most `limit`), and how many matched.

    Like WorklistIndex.search, but keeps each record's file, which the API needs for its id."""
    found = index.matching(query)
    return [Found(item_id(key), Path(key), record) for key, record in found[:limit]], len(found)


def status_counts(index: WorklistIndex) -> dict[str, int]:
    """Items by SPS status (of their first step), over the whole index."""
    records = [record for _key, _folder, record, _mtime in index.snapshot()]
    counts: dict[str, int] = {}
    for record in records:
        status = sps_status(record) or "(none)"
        counts[status] = counts.get(status, 0) + 1
    return counts


def sps_status(record: Record) -> str:
    steps = record.get(SPS_SEQUENCE)
    if isinstance(steps, tuple) and steps and isinstance(steps[0], Record):
        value = steps[0].get(SPS_STATUS, "")
        return str(value[0] if isinstance(value, tuple) and value else value or "")
    return ""


def json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    if isinstance(value, Record):
        return record_json(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def record_json(record: Record) -> dict[str, Any]:
    """Every attribute of a record, by DICOM keyword (private tags as `(gggg,eeee)`)."""
    out: dict[str, Any] = {}
    for tag, _vr, value in record.items():
        name = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        out[name] = json_value(value)
    return out


_SUMMARY_TAGS = tuple((k, tag_for_keyword(k)) for k in SUMMARY_TOP)
_SUMMARY_SPS_TAGS = tuple((k, tag_for_keyword(k)) for k in SUMMARY_SPS)


def summary(found: Found) -> dict[str, Any]:
    """The item's id, status and main attributes (read straight from the record: a listing of
    a thousand items must not convert every attribute of each)."""
    record = found.record
    out: dict[str, Any] = {"id": found.id, "status": sps_status(record)}
    for keyword, tag in _SUMMARY_TAGS:
        out[keyword] = json_value(record.get(tag, ""))
    steps = record.get(SPS_SEQUENCE)
    step = steps[0] if isinstance(steps, tuple) and steps and isinstance(steps[0], Record) else None
    for keyword, tag in _SUMMARY_SPS_TAGS:
        out[keyword] = json_value(step.get(tag, "")) if step is not None else ""
    out["file"] = found.path.name
    return out


def history_terms(found: Found) -> tuple[str, str]:
    """(accession number, file name): what the translation log names the item by."""
    accession = found.record.get(0x00080050, "")
    return (str(accession) if isinstance(accession, str) else "", found.path.name)


__all__ = [
    "Found",
    "ItemNotFound",
    "QueryError",
    "build_query",
    "find",
    "item_id",
    "path_of",
    "record_json",
    "search",
    "status_counts",
    "summary",
]
