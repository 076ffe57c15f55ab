"""Searching the translation log newest first, reading it backwards in blocks from its end.

A search stops at its limit, at the first line older than `since`, or after `max_bytes` read
(then it says so): it never reads a large log whole. Lines are parsed as logfmt or JSON, whichever
they are; a line that names none of the search's terms is skipped before it is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.ops.translation_log import parse_logfmt

BLOCK = 64 * 1024
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # at ~200 bytes a line: the last ~150,000 lines
BLOCK_TERMS = 16  # most terms tested on a whole block before its lines are looked at
MAX_LINE = 1024 * 1024  # a longer "line" is a damaged log: skipped


@dataclass
class LogQuery:
    accession: str = ""
    patient_id: str = ""
    control_id: str = ""
    outcome: str = ""
    type: str = ""
    calling_ae: str = ""
    file: str = ""
    text: str = ""  # anywhere in the line (the web view's search box)
    since: str = ""  # ISO 8601 prefix, e.g. 2026-12-01 or 2026-12-01T10:00
    until: str = ""
    limit: int = 100
    any_of: list[tuple[str, str]] = field(default_factory=list)  # (key, value): one must match

    def terms(self) -> list[bytes]:
        """Byte strings of which each matching line contains at least one (a cheap pre-test).
        A value the log would write escaped cannot be looked for as it is: it is left out, as
        is `text` (matched without regard to case)."""
        needed = [
            v
            for v in (self.accession, self.patient_id, self.control_id, self.file, self.outcome,
                      self.type, self.calling_ae)
            if v and _verbatim(v)
        ]  # fmt: skip
        if needed:
            return [max(needed, key=len).encode("utf-8")]  # the longest: likely the rarest
        values = [v for _k, v in self.any_of if v]
        if values and all(_verbatim(v) for v in values):
            return [v.encode("utf-8") for v in values]
        return []

    def matches(self, record: dict[str, Any]) -> bool:
        def listed(key: str, value: str) -> bool:
            return value in str(record.get(key, "")).split(",")

        if self.accession and not listed("accession", self.accession):
            return False
        if self.patient_id and record.get("patient_id") != self.patient_id:
            return False
        if self.control_id and record.get("control_id") != self.control_id:
            return False
        if self.outcome and not listed("outcome", self.outcome):
            return False
        if self.type and record.get("type") != self.type:
            return False
        if self.calling_ae and record.get("calling_ae") != self.calling_ae:
            return False
        if self.file and not listed("file", self.file):
            return False
        if self.text:
            values = " ".join(str(v) for v in record.values())  # unescaped, unlike the line
            if self.text.lower() not in values.lower():
                return False
        if self.any_of and not any(listed(k, v) for k, v in self.any_of if v):
            return False
        time = str(record.get("time", ""))
        return not (self.until and time[: len(self.until)] > self.until)


def _verbatim(value: str) -> bool:
    """Written as it is in both formats (logfmt quotes but keeps it; JSON keeps it)."""
    return value.isprintable() and not any(c in value for c in '"\\')


@dataclass
class LogResult:
    records: list[dict[str, Any]]
    complete: bool  # False: the scan stopped at max_bytes before the start of the log
    scanned_bytes: int


def parse_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    if line.startswith("{"):
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    try:
        return parse_logfmt(line)
    except (ValueError, IndexError):
        return None


def _lines_backwards(
    path: Path, max_bytes: int, scanned: list[int], terms: list[bytes] | None = None
) -> Iterator[bytes]:
    """The file's lines, last first. With `terms`, only the lines of blocks that contain one
    of them (the others are not even split into lines: most blocks of a search are not)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        pos = f.tell()
        tail = b""
        while pos > 0 and scanned[0] < max_bytes:
            size = min(BLOCK, pos)
            pos -= size
            f.seek(pos)
            block = f.read(size) + tail
            scanned[0] += size
            if terms and not any(t in block for t in terms):
                cut = block.find(b"\n")
                tail = block[:cut] if cut >= 0 else block
                if len(tail) > MAX_LINE:
                    tail = b""
                continue
            lines = block.split(b"\n")
            tail = lines[0]
            if len(tail) > MAX_LINE:
                tail = b""
            yield from reversed(lines[1:])
        if pos == 0 and tail:
            yield tail


def search_log(path: Path | None, query: LogQuery, max_bytes: int = DEFAULT_MAX_BYTES) -> LogResult:
    """The records matching `query`, newest first."""
    if path is None or not path.exists():
        return LogResult([], True, 0)
    terms = query.terms()
    scanned = [0]
    out: list[dict[str, Any]] = []
    complete = True
    lines = _lines_backwards(path, max_bytes, scanned, terms)
    for raw in lines:
        if not raw or (terms and not any(t in raw for t in terms)):
            continue
        text = raw.decode("utf-8", "replace")
        record = parse_line(text)
        if record is None:
            continue
        time = str(record.get("time", ""))
        if query.since and time and time[: len(query.since)] < query.since:
            break  # the log is in time order: everything before is older still
        if query.matches(record):
            out.append(record)
            if len(out) >= query.limit:
                break
    else:
        complete = scanned[0] < max_bytes or _at_start(path, scanned[0])
    return LogResult(out, complete, scanned[0])


def _at_start(path: Path, scanned: int) -> bool:
    try:
        return scanned >= path.stat().st_size
    except OSError:
        return True


def _field(raw: bytes, name: bytes) -> bytes:
    """The raw value of `name` in a logfmt or JSON line, found without parsing the line (a
    value with escaped quotes in it comes back cut short: it is then only not found)."""
    for prefix, end in ((b" " + name + b"=", b" "), (b'"' + name + b'": "', b'"')):
        i = raw.find(prefix)
        if i < 0:
            continue
        start = i + len(prefix)
        if end == b" " and raw[start : start + 1] == b'"':
            start, end = start + 1, b'"'
        j = raw.find(end, start)
        return raw[start : j if j >= 0 else len(raw)]
    return b""


def histories(
    path: Path | None,
    terms: list[tuple[str, str]],
    per_item: int = 20,
    max_bytes: int = 8 * 1024 * 1024,
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The latest log lines of several items at once: one backward scan for all of them.
    `terms`: (accession, file name) of each item. A line is only parsed once its accession or
    file field names one of them."""
    wanted: dict[tuple[str, str], list[dict[str, Any]]] = {t: [] for t in terms}
    by_accession: dict[bytes, list[tuple[str, str]]] = {}
    by_file: dict[bytes, list[tuple[str, str]]] = {}
    for accession, name in terms:
        if accession:
            by_accession.setdefault(accession.encode("utf-8"), []).append((accession, name))
        by_file.setdefault(name.encode("utf-8"), []).append((accession, name))
    if path is None or not path.exists() or not terms:
        return wanted
    scanned = [0]
    open_items = len(wanted)
    needles = [*by_accession, *by_file]
    # A few items: blocks naming none of them are skipped whole. Many: a substring test per
    # needle would cost more than reading each line's two fields.
    block_terms = needles if len(needles) <= BLOCK_TERMS else None
    for raw in _lines_backwards(path, max_bytes, scanned, block_terms):
        owners: set[tuple[str, str]] = set()
        for accession in _field(raw, b"accession").split(b","):
            owners.update(by_accession.get(accession, ()))
        for name in _field(raw, b"file").split(b","):
            owners.update(by_file.get(name, ()))
        if not owners:
            continue
        record = parse_line(raw.decode("utf-8", "replace"))
        if record is None:
            continue
        for owner in owners:
            lines = wanted[owner]
            if len(lines) < per_item:
                lines.append(record)
                if len(lines) == per_item:
                    open_items -= 1
        if open_items <= 0:
            break
    return wanted
