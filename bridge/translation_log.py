"""The translation log: one line per received message, saying what it became.

Lines are appended and flushed at once so that `tail -f` follows the feed. The default format is
logfmt (`key=value`, quoted when needed), which people read and tools parse; `json` writes one
object a line. Keys always come in the same order; empty values are left out.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("bridge.translation_log")

FIELD_ORDER = (
    "time",
    "peer",
    "control_id",
    "type",
    "order_control",
    "accession",
    "patient_id",
    "outcome",
    "ack",
    "file",
    "reason",
    "kept_as",
    "note",
    "ms",
)


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'


def format_logfmt(record: dict[str, Any]) -> str:
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in record.items())


def parse_logfmt(line: str) -> dict[str, str]:
    """Read back one logfmt line (for tests and tools)."""
    result: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq < 0:
            break
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            i += 1
            out = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    nxt = line[i + 1]
                    if nxt == "x" and i + 3 < n:
                        out.append(chr(int(line[i + 2 : i + 4], 16)))
                        i += 4
                        continue
                    out.append({"n": "\n", "r": "\r"}.get(nxt, nxt))
                    i += 2
                    continue
                out.append(line[i])
                i += 1
            i += 1
            result[key] = "".join(out)
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            result[key] = line[i:end]
            i = end
    return result


class TranslationLog:
    def __init__(self, target: str | Path, fmt: str = "logfmt") -> None:
        self.format = fmt
        self._lock = threading.Lock()  # records come from the reactor and from DICOM threads
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self.path: Path | None = None  # None when the log goes to standard output
        if str(target) == "-":
            self._stream: IO[str] = sys.stdout
            self._owned = False
        else:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path = path
            self._stream = open(path, "a", encoding="utf-8", buffering=1)
            self._owned = True

    def record(self, **fields: Any) -> dict[str, Any]:
        """Append one line; returns the record as written."""
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        }
        for key in FIELD_ORDER[1:]:
            value = fields.pop(key, None)
            if value not in (None, ""):
                record[key] = value
        record.update({k: v for k, v in fields.items() if v not in (None, "")})
        if self.format == "json":
            line = json.dumps(record, ensure_ascii=False)
        else:
            line = format_logfmt(record)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError) as exc:
                # A full or closed log must not cost the sender its ACK: the change is applied.
                log.error("cannot write the translation log (%s): %s", exc, line)
        for subscriber in self._subscribers:
            try:
                subscriber(record)
            except Exception:  # metrics and the like must not cost a message its line or ACK
                log.exception("translation log subscriber %r failed", subscriber)
        return record

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Give `callback` every record written from now on (a dict, on the writer's thread:
        the reactor for HL7, a DICOM association's thread for C-FIND)."""
        self._subscribers.append(callback)

    def close(self) -> None:
        if self._owned:
            self._stream.close()


# C-FIND outcomes (bridge.cfind's words) -> (outcome key, final DIMSE status)
_QUERY_OUTCOMES = (
    ("success", "answered", "0000"),
    ("refused", "refused", "A900"),
    ("truncated", "truncated", "A700"),
    ("cancelled", "cancelled", "FE00"),
    ("failed", "failed", "C312"),
    ("aborted", "aborted", ""),
    ("association ended", "aborted", ""),
)


def _given_value(keys: str, keyword: str) -> str:
    match = re.search(rf"(?:^| ){keyword}=(\S+)", keys)
    return match.group(1) if match else ""


def query_recorder(translation_log: TranslationLog) -> Callable[..., None]:
    """The C-FIND SCP's `on_query`: one translation-log line per query (what a modality asked,
    and what it got). Called on the association's thread; never raises into the SCP."""

    def record_query(
        *, calling: str, called: str, keys: str, answers: int, matched: int, outcome: str,
        ms: float,
    ) -> None:  # fmt: skip
        try:
            key, status = next(
                ((k, s) for prefix, k, s in _QUERY_OUTCOMES if outcome.startswith(prefix)),
                ("failed", ""),
            )
            translation_log.record(
                type="C-FIND",
                accession=_given_value(keys, "AccessionNumber"),
                patient_id=_given_value(keys, "PatientID"),
                outcome=key,
                note="" if outcome == "success" else outcome,
                ms=f"{ms:.1f}",
                calling_ae=calling,
                called_ae=called,
                keys=keys,
                answers=str(answers),
                matched=str(matched),
                status=status,
            )
        except Exception:
            log.exception("cannot record a C-FIND in the translation log")

    return record_query
