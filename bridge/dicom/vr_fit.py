"""Values fitted to their VR: control characters, backslashes, code strings, UIDs, lengths.

Used for the items built from an order (worklist_item) and for the patient values of an ADT
update (order.fit_patient), under the same policy (`strict`, `overlong-values`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from bridge.core.attributes import ATTRIBUTES, MAX_LENGTH
from bridge.hl7.errors import DATA_TYPE_ERROR, HL7Error

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.hl7.message import HL7Message

_VR = {keyword: a.vr for keyword, a in ATTRIBUTES.items()}
_CS = re.compile(r"[A-Z0-9 _]*")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Values that identify (and are matched on): too long, they are refused unless
# `overlong_values = truncate`; every other text value is cut to its VR with a note.
IDENTIFIERS = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "AccessionNumber",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "StudyInstanceUID",
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
        "AdmissionID",
        "ScheduledStationAETitle",
        "Modality",
        "CodeValue",
        "CodingSchemeDesignator",
    }
)


def fit(value: str, keyword: str, location: str, message: HL7Message, settings: Settings) -> str:
    """The value as the VR allows it: HL7Error 102 or a cut value (with a note) when too long."""
    vr = _VR.get(keyword, "LO")
    if not value.isprintable() and vr not in ("ST", "LT", "UT"):
        # Control characters (a TAB, \.br\'s CR LF) are not allowed in these VRs (PS3.5 6.2);
        # invisible ones (bidi overrides, zero-width, line separators) would disguise a value.
        value = _CONTROL.sub(" ", value)
        value = "".join(c if c.isprintable() else " " if c.isspace() else "" for c in value)
        message.notes.append(
            f"{location or keyword}: control characters in {keyword} -> space, invisible removed"
        )
    if vr not in ("ST", "LT") and "\\" in value:
        value = value.replace("\\", "/")  # a backslash separates values in DICOM
        message.notes.append(f"{location or keyword}: backslash in {keyword} replaced by /")
    if vr == "CS" and not _CS.fullmatch(value):
        raise HL7Error(DATA_TYPE_ERROR, location, f"{keyword} {value!r} is not a DICOM code string")
    if vr == "UI" and value and not _UID.fullmatch(value):
        raise HL7Error(DATA_TYPE_ERROR, location, f"{keyword} {value!r} is not a valid UID")
    limit = MAX_LENGTH.get(vr)
    if limit is None or len(value) <= limit:
        return value
    # A cut description or address still says what it said; a cut identifier names another
    # order or patient (nothing would match it), and a cut UID is another UID.
    descriptive = keyword not in IDENTIFIERS and vr != "UI"
    if (settings.overlong_values == "truncate" and vr != "UI") or (
        descriptive and not settings.strict
    ):
        message.notes.append(
            f"{location or keyword}: {keyword} cut from {len(value)} to {limit} characters ({vr})"
        )
        return value[:limit]
    raise HL7Error(
        DATA_TYPE_ERROR,
        location,
        f"{keyword} is {len(value)} characters long, {vr} allows {limit}: {value[:80]!r}",
    )


def fit_any(value, keyword: str, location: str, message: HL7Message, settings: Settings):
    if isinstance(value, str):
        return fit(value, keyword, location, message, settings)
    if isinstance(value, list) and value and isinstance(value[0], dict):  # code items
        return [
            {k: fit(v, k, location, message, settings) for k, v in item.items()} for item in value
        ]
    if isinstance(value, list):
        return [fit(v, keyword, location, message, settings) for v in value]
    return value
