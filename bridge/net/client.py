"""The client side, for `wlbridge send` and `wlbridge query`: an MLLP sender and a C-FIND SCU."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from bridge.net.mllp import END, START, frame

# A further message starts where a line starts with MSH; a UTF-8 BOM before it (files written by
# Windows tools, and files concatenated from such) belongs to no message.
_MESSAGE_START = re.compile(rb"[\r\n](?:\xef\xbb\xbf)?(?=MSH)")
_BOM = b"\xef\xbb\xbf"
_BLANK = b"\x00\r\n\t \x1a"  # what carries no message: NULs, white space, a DOS end of file


class NoMessageError(ValueError):
    """A file given to send, replay or convert holds no message."""


def _frames(data: bytes) -> list[bytes]:
    """The frames the MLLP listener would take from this byte stream (bridge.net.mllp): bytes
    outside frames are discarded, a frame cut by a new start block is dropped, and so is a
    frame that never ends."""
    frames = []
    pos, size = 0, len(data)
    while pos < size:
        start = data.find(START, pos)
        if start < 0:
            break
        pos = start + 1
        end = data.find(END, pos)
        restart = data.find(START, pos, end if end >= 0 else size)
        if restart >= 0:
            pos = restart  # the unfinished frame is dropped; the next one starts here
            continue
        if end < 0:
            break
        frames.append(data[pos:end])
        pos = end + 1
    return frames


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file, as the bridge's listener would see them.

    MLLP-framed data is split as the listener frames it. Plain text is split where a further line
    starts with `MSH`; the first message is whatever precedes that, as the listener would take
    the file in one frame (so text before the first MSH is answered, AR, never hidden). A UTF-8
    BOM before an MSH is dropped, as the listener's parser drops it; line ends inside a message
    become CR, the HL7 segment separator."""
    if START in data:
        return [f for f in _frames(data) if f.strip(_BLANK)]
    data = data.lstrip(_BLANK)
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    chunks = _MESSAGE_START.split(data)
    if len(chunks) > 1 and not chunks[0].startswith(b"MSH"):
        # Text before the first MSH is not a message of its own: it is the first one's start.
        chunks[:2] = [chunks[0] + b"\r" + chunks[1]]
    messages = []
    for chunk in chunks:
        chunk = chunk.strip(b"\r\n")
        if chunk.strip(_BLANK):
            messages.append(b"\r".join(re.split(rb"\r\n|\r|\n", chunk)) + b"\r")
    return messages


class MLLPClient:
    """One connection; each message waits for its answer before the next is sent."""

    def __init__(self, host: str, port: int, timeout: float = 30.0, tls_context=None) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self._buffer = b""

    def send(self, message: bytes) -> bytes:
        self.sock.sendall(frame(message))
        while END not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection without an answer")
            self._buffer += chunk
        answer, _, rest = self._buffer.partition(END)
        self._buffer = rest.lstrip(b"\r")
        return answer[answer.find(START) + 1 :]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MLLPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ack_summary(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, what the ACK says about an error) of an ACK, for printing: MSA-3's text,
    then each ERR segment (location, code, severity, text) as `ERR ...`."""
    text = ack.decode("latin-1")
    segments = re.split(r"\r\n|\r|\n", text)
    sep = text[3:4] or "|"
    code = control = message = ""
    errors = []
    for seg in segments:
        fields = seg.split(sep)
        if fields[0] == "MSA":
            code = fields[1] if len(fields) > 1 else ""
            control = fields[2] if len(fields) > 2 else ""
            message = fields[3] if len(fields) > 3 else ""
        elif fields[0] == "ERR" and any(fields[1:]):
            errors.append("ERR " + sep.join(fields[1:]).strip(sep))
    detail = "  ".join(part for part in (message, *errors) if part)
    return code, control, detail


# C-FIND keys for `wlbridge query`: what a modality usually asks for.
QUERY_COLUMNS = (
    ("PatientName", "patient name"),
    ("PatientID", "patient id"),
    ("AccessionNumber", "accession"),
    ("Modality", "modality"),
    ("ScheduledStationAETitle", "station"),
    ("ScheduledProcedureStepStartDate", "date"),
    ("ScheduledProcedureStepStartTime", "time"),
    ("ScheduledProcedureStepID", "step id"),
    ("ScheduledProcedureStepDescription", "description"),
    ("ScheduledProcedureStepStatus", "status"),
)
SPS_KEYS = {
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepStatus",
}


def worklist_query(
    patient_id: str = "",
    accession: str = "",
    modality: str = "",
    station: str = "",
    date: str = "",
    patient_name: str = "",
) -> Dataset:
    """A C-FIND identifier asking for the table's columns, matching on what is given."""
    query = Dataset()
    query.PatientName = patient_name
    query.PatientID = patient_id
    query.AccessionNumber = accession
    query.StudyInstanceUID = ""
    query.RequestedProcedureID = ""
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = date
    step.ScheduledProcedureStepStartTime = ""
    step.ScheduledProcedureStepID = ""
    step.ScheduledProcedureStepDescription = ""
    step.ScheduledProcedureStepStatus = ""
    query.ScheduledProcedureStepSequence = Sequence([step])
    return query


class QueryError(ConnectionError):
    """A C-FIND that could not be made, said as a sentence."""


def find(
    host: str,
    port: int,
    query: Dataset,
    called_aet: str = "WLBRIDGE",
    calling_aet: str = "WLBRIDGE-SCU",
    timeout: float = 30.0,
    tls_context: ssl.SSLContext | None = None,
) -> tuple[int, list[Dataset]]:
    """Run one C-FIND on the worklist model: (final status, answers). With a TLS context, over
    TLS. QueryError says why an association failed: TLS, refusal (and its reason), or abort."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    if tls_context is not None:
        _check_tls(host, port, tls_context, timeout)  # else pynetdicom only says "aborted"
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ModalityWorklistInformationFind)
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args)
    if not assoc.is_established:
        raise QueryError(_why_not_established(assoc, host, port, called_aet, calling_aet))
    answers: list[Dataset] = []
    final = -1
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            if status is None:
                raise QueryError("no answer to C-FIND (timeout or aborted association)")
            if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                answers.append(identifier)
            else:
                final = status.Status
    finally:
        assoc.release()
    return final, answers


def _check_tls(host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                pass
    except ssl.SSLError as exc:
        raise QueryError(f"TLS with {host}:{port} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise QueryError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None


def _why_not_established(assoc, host: str, port: int, called: str, calling: str) -> str:
    where = f"{host}:{port}"
    if assoc.is_rejected:
        primitive = getattr(assoc.acceptor, "primitive", None)
        reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
        return (
            f"{where} rejected the association from {calling} to {called}"
            + (f": {reason}" if reason else "")
            + " (check --called-aet, and --calling-aet against allowed-calling-aets)"
        )
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        return f"cannot connect to {where}: {exc.strerror or exc}"
    if assoc.is_aborted:
        return (
            f"{where} aborted the association before it was accepted "
            "(a TLS listener needs --tls-ca; or the bridge is at max-associations)"
        )
    return f"no association with {where}: connection refused, timed out or closed"


def merge_answers(answer_lists: list[list[Dataset]]) -> list[Dataset]:
    """Answers of several queries, each step once (by Study Instance UID and SPS ID)."""
    seen = set()
    merged = []
    for answers in answer_lists:
        for answer in answers:
            step = (answer.get("ScheduledProcedureStepSequence") or [Dataset()])[0]
            key = (
                str(answer.get("StudyInstanceUID", "")),
                str(step.get("ScheduledProcedureStepID", "")),
                str(answer.get("AccessionNumber", "")),
            )
            if key not in seen:
                seen.add(key)
                merged.append(answer)
    return merged


def answer_rows(answers: list[Dataset]) -> list[list[str]]:
    rows = []
    for answer in answers:
        step = (answer.get("ScheduledProcedureStepSequence") or [Dataset()])[0]
        row = []
        for keyword, _ in QUERY_COLUMNS:
            source = step if keyword in SPS_KEYS else answer
            value = source.get(keyword, "")
            if isinstance(value, MultiValue):
                value = "\\".join(str(v) for v in value)
            row.append(str(value))
        rows.append(row)
    return rows


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def read_messages(paths: list[Path]) -> list[tuple[Path, bytes]]:
    """Every message of every file, in order. NoMessageError for a file that holds none, OSError
    for one that cannot be read: before anything is sent."""
    found = []
    for path in paths:
        data = path.read_bytes()
        messages = split_messages(data)
        if not messages:
            why = "it is empty" if not data.strip(_BLANK) else "it has no complete MLLP frame"
            raise NoMessageError(f"{path}: no HL7 message in the file ({why})")
        found.extend((path, message) for message in messages)
    return found
