"""The HL7 acknowledgement (original mode) that answers every received message.

MSH echoes the received header with sender and receiver swapped; MSA carries the code and the
received control ID; ERR segments carry the errors in the layout of the message's version:

- 2.5 and later: one ERR per error, ERR-2 location (ERL `SEG^seq^field^rep^comp`), ERR-3 code
  (`code^text^HL70357`), ERR-4 severity `E`, ERR-8 the human text (ERR-7 the full text when it is
  longer than ERR-8's 80 characters).
- 2.3, 2.3.1, 2.4: ERR holds only ERR-1 (ELD: `SEG^seq^field^code&text&HL70357`), and the ACK has at
  most one ERR, so several errors are repetitions of ERR-1; ELD has no repetition or component
  place, so the location stops at the field. The human text is in MSA-3.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

from bridge.hl7.errors import HL7Error
from bridge.hl7.message import Delimiters, MessageHeader, header_codec

DEFAULT_VERSION = "2.5.1"
DEFAULT_PROCESSING_ID = "P"
MSA3_MAX = 80  # MSA-3 (ST) length in every version
ERR8_MAX = 80  # ERR-8 (TX) length in 2.5.1
ERR7_MAX = 2048

# HL7 table 0357: message error condition codes.
TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


def build_ack(header: MessageHeader | None, ack_code: str, errors: Sequence[HL7Error] = (),
              text: str = "") -> bytes:  # fmt: skip
    """The ACK for a message whose header is `header` (None when no MSH could be read), encoded in
    the message's charset, segments separated by CR, without MLLP framing."""
    if header is None:
        header = MessageHeader(delimiters=Delimiters())
    d = header.delimiters
    version = header.version or DEFAULT_VERSION
    old_style = _is_before_2_5(version)
    msh = _msh(header, version)
    msa_text = text or (errors[0].text if errors else "")
    msa = ["MSA", ack_code, escape(header.control_id, d), escape(_clip(msa_text, MSA3_MAX), d)]
    segments = [msh, d.field.join(_trim(msa))]
    if errors:
        if old_style:
            segments.append(_err_eld(errors, d))
        else:
            segments.extend(_err_25(e, d) for e in errors)
    codec = header_codec(header.charset)
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


def escape(text: str, delims: Delimiters) -> str:
    """Escape delimiters (`\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`); control characters (CR, LF...),
    which would end the segment, become spaces."""
    e = delims.escape
    table = {
        e: f"{e}E{e}",
        delims.field: f"{e}F{e}",
        delims.component: f"{e}S{e}",
        delims.subcomponent: f"{e}T{e}",
        delims.repetition: f"{e}R{e}",
    }
    out = []
    for ch in text:
        if ch in table:
            out.append(table[ch])
        elif ch < " " or ch == "\x7f":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def new_control_id() -> str:
    """A fresh MSH-10: 16 random hex digits (fits ST 20, collisions out of reach)."""
    return secrets.token_hex(8).upper()


def _msh(header: MessageHeader, version: str) -> str:
    d = header.delimiters
    trigger = escape(header.trigger_event, d)
    if version == "2.3" or version.startswith(("2.1", "2.2")):
        msg_type = f"ACK{d.component}{trigger}"  # CM_MSG has no structure component before 2.3.1
    else:
        msg_type = f"ACK{d.component}{trigger}{d.component}ACK"
    fields = [
        "MSH",
        d.encoding_characters,
        header.receiving_application,  # raw HD, delimiters intact: echoed as received
        header.receiving_facility,
        header.sending_application,
        header.sending_facility,
        time.strftime("%Y%m%d%H%M%S%z"),  # local time, as datetime.astimezone() gives
        "",
        msg_type,
        new_control_id(),
        escape(header.processing_id or DEFAULT_PROCESSING_ID, d),
        escape(version, d),
        "",
        "",
        "",
        "",
        "",
        d.repetition.join(escape(c, d) for c in header.charsets or (header.charset,)),
    ]
    return d.field.join(_trim(fields))


def _location_parts(location: str) -> list[str]:
    return location.split("^") if location else []  # HL7Error locations always use "^"


def _err_25(error: HL7Error, d: Delimiters) -> str:
    location = d.component.join(escape(p, d) for p in _location_parts(error.location))
    code = d.component.join(
        [escape(error.code, d), escape(TABLE_0357.get(error.code, ""), d), "HL70357"]
    )
    user = _clip(error.text, ERR8_MAX)
    diagnostic = _clip(error.text, ERR7_MAX) if user != error.text else ""
    fields = ["ERR", "", location, code, "E", "", "", escape(diagnostic, d), escape(user, d)]
    return d.field.join(_trim(fields))


def _err_eld(errors: Sequence[HL7Error], d: Delimiters) -> str:
    reps = []
    for error in errors:
        parts = (_location_parts(error.location) + ["", "", ""])[:3]
        code = d.subcomponent.join(
            [escape(error.code, d), escape(TABLE_0357.get(error.code, ""), d), "HL70357"]
        )
        reps.append(d.component.join([escape(p, d) for p in parts] + [code]))
    return d.field.join(["ERR", d.repetition.join(reps)])


def _is_before_2_5(version: str) -> bool:
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False  # unknown version: answer in the default (2.5.1) layout
    return (major, minor) < (2, 5)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())  # one line: no CR, LF or tab runs
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _trim(fields: list[str]) -> list[str]:
    while len(fields) > 2 and fields[-1] == "":
        fields.pop()
    return fields
