"""The translation log: one line per received message (HL7, MPPS) and per housekeeping change,
saying what it became.

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
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("bridge.ops.translation_log")

FIELD_ORDER = (
    "time",
    "peer",
    "receiver",  # outbound messages: the configured receiver's name
    "control_id",
    "type",
    "calling_ae",  # MPPS: the modality's AE title, the instance, the status it reported
    "mpps_uid",
    "pps_status",
    "order_control",
    "order_status",  # outbound: ORC-5 sent
    "accession",
    "patient_id",
    "outcome",
    "ack",
    "status",  # MPPS: the DIMSE status answered
    "file",
    "station",
    "modality",
    "sps_date",
    "sps_time",
    "reason",
    "attempt",  # outbound: the delivery attempt's number
    "kept_as",
    "note",
    "ms",
)


def _escape_char(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def terminal_safe(text: str, keep: str = "") -> str:
    """`text` with every character a terminal could act on escaped (`\\x9b`, `\\u202e`): C0 and
    C1 controls, DEL, line and paragraph separators, bidi overrides, zero-width and other
    invisible characters (all that `str.isprintable` refuses), except those in `keep`."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escape_char(c) for c in text)


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and text.isprintable() and not _NEEDS_QUOTES.search(text):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{terminal_safe(escaped)}"'


def format_logfmt(record: dict[str, Any]) -> str:
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in record.items())


_ESCAPE_DIGITS = {"x": 2, "u": 4, "U": 8}


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


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
                    digits = _ESCAPE_DIGITS.get(nxt, 0)
                    code = line[i + 2 : i + 2 + digits]
                    if digits and len(code) == digits and _is_hex(code):
                        out.append(chr(int(code, 16)))
                        i += 2 + digits
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


class TerminalSafeFormatter(logging.Formatter):
    """The process's stderr lines: every module's message escaped as the translation log escapes
    values (a C-FIND key or HL7 field can hold ESC sequences), on the same clock (UTC, `Z`).
    Tracebacks keep their line breaks; a message never has one."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def formatMessage(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return terminal_safe(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return terminal_safe(super().formatStack(stack_info), keep="\n")


def configure_logging(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the whole process's log records (Twisted's too) to stderr through
    TerminalSafeFormatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TerminalSafeFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Twisted's own errors (an unhandled error in a Deferred...) would reach stderr raw.
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
    logging.getLogger("twisted").setLevel(logging.WARNING)  # not every factory start and stop


def _json_safe(line: str) -> str:
    """A JSON line with the characters json.dumps leaves raw (C1 controls, DEL, U+2028, bidi
    overrides...) written as \\u escapes: outside strings a JSON line has none of them."""
    if line.isprintable():
        return line
    out = []
    for c in line:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:  # a UTF-16 surrogate pair, as JSON spells characters beyond the BMP
            code = ord(c) - 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return "".join(out)


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
            line = _json_safe(json.dumps(record, ensure_ascii=False))
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

    def reopen(self, blocking: bool = True) -> bool:
        """Open the configured path afresh (SIGHUP, after logrotate renamed the file): the next
        line goes to a new file there. Raises OSError, keeping the old file, if it cannot.
        With blocking=False (from a signal handler, which may have interrupted a write on this
        very thread) returns False instead of waiting for the lock."""
        if self.path is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(self.path, "a", encoding="utf-8", buffering=1)
        if not self._lock.acquire(blocking):
            stream.close()
            return False
        try:
            old, self._stream = self._stream, stream
        finally:
            self._lock.release()
        old.close()
        return True

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Give `callback` every record written from now on (a dict, on the writer's thread:
        the reactor for HL7, a DICOM association's thread for C-FIND)."""
        self._subscribers.append(callback)

    def close(self) -> None:
        if self._owned:
            self._stream.close()


# C-FIND outcomes (bridge.net.cfind's words) -> (outcome key, final DIMSE status)
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
