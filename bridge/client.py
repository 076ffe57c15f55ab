"""The client side, for `wlbridge send` and `wlbridge query`: an MLLP sender and a C-FIND SCU."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from bridge.mllp import END, START, frame

_MESSAGE_START = re.compile(rb"(?:^|[\r\n])(?=MSH)")


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file: MLLP-framed, or plain text with each message starting at `MSH`.
    Line ends inside a message become CR, the HL7 segment separator."""
    if START in data:
        return [part.split(END)[0] for part in data.split(START)[1:] if part.split(END)[0].strip()]
    messages = []
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as editors and some senders write
    for chunk in _MESSAGE_START.split(data):
        chunk = chunk.strip(b"\r\n")
        if chunk.startswith(b"MSH"):
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
    """(MSA-1, MSA-2, the first ERR or MSA-3 text) of an ACK, for printing."""
    text = ack.decode("latin-1")
    segments = re.split(r"\r\n|\r|\n", text)
    sep = text[3:4] or "|"
    code = control = detail = ""
    for seg in segments:
        fields = seg.split(sep)
        if fields[0] == "MSA":
            code = fields[1] if len(fields) > 1 else ""
            control = fields[2] if len(fields) > 2 else ""
            detail = fields[3] if len(fields) > 3 else ""
        elif fields[0] == "ERR" and not detail.startswith("ERR"):
            detail = sep.join(fields[1:]) or detail
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


def find(
    host: str,
    port: int,
    query: Dataset,
    called_aet: str = "WLBRIDGE",
    calling_aet: str = "WLBRIDGE-SCU",
    timeout: float = 30.0,
) -> tuple[int, list[Dataset]]:
    """Run one C-FIND on the worklist model: (final status, answers)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_aet}@{host}:{port} was not accepted")
    answers: list[Dataset] = []
    final = -1
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            if status is None:
                raise ConnectionError("no answer to C-FIND (timeout or aborted association)")
            if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                answers.append(identifier)
            else:
                final = status.Status
    finally:
        assoc.release()
    return final, answers


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
    return [(path, message) for path in paths for message in split_messages(path.read_bytes())]
