"""An item given as JSON, written as the HL7 v2.5.1 OMI^O23 the RIS would have sent.

The pipeline then checks and maps it like any other message, so an item scheduled by hand obeys
the same rules (required keys, lengths, dates, station rules) as one from HL7. The JSON fields
are documented in docs/http-api.md; values are text (PersonName in DICOM form, `FAMILY^GIVEN`).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from pydicom import Dataset

MAX_VALUE = 1024  # characters of one JSON value

# JSON field -> what it becomes (documentation and the check for unknown fields)
FIELDS = {
    "PatientID": "PID-3.1",
    "IssuerOfPatientID": "PID-3.4",
    "PatientName": "PID-5 (DICOM PN: FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX)",
    "PatientBirthDate": "PID-7 (YYYYMMDD)",
    "PatientSex": "PID-8 (F, M, O)",
    "ReferringPhysicianName": "PV1-8 (PN)",
    "PlacerOrderNumber": "ORC-2 / OBR-2",
    "FillerOrderNumber": "ORC-3 / OBR-3",
    "RequestingPhysician": "ORC-12 (PN)",
    "ScheduledProcedureStepStartDateTime": "TQ1-7 (YYYYMMDDHHMM[SS][+ZZZZ])",
    "Priority": "TQ1-9 (S, A, R, ...)",
    "RequestedProcedureCode": "OBR-4.1",
    "RequestedProcedureDescription": "OBR-4.2",
    "RequestedProcedureCodingScheme": "OBR-4.3",
    "ReasonForTheRequestedProcedure": "OBR-31",
    "AccessionNumber": "IPC-1",
    "RequestedProcedureID": "IPC-2",
    "StudyInstanceUID": "IPC-3",
    "ScheduledProcedureStepID": "IPC-4",
    "Modality": "IPC-5",
    "ScheduledProcedureStepDescription": "IPC-6.2",
    "ScheduledStationName": "IPC-7",
    "ScheduledProcedureStepLocation": "IPC-8",
    "ScheduledStationAETitle": "IPC-9 (text, or a list of AE titles)",
}


def _escape(value: str) -> str:
    return (
        value.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name, "")
    if value is None:
        return ""
    if isinstance(value, list) and name == "ScheduledStationAETitle":
        return "~".join(_escape(_checked(name, v)) for v in value)
    return _escape(_checked(name, value))


def _checked(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{name} must be text")
    text = str(value)
    if len(text) > MAX_VALUE:
        raise ValueError(f"{name} is longer than {MAX_VALUE} characters")
    if any(not c.isprintable() for c in text):
        raise ValueError(f"{name} must not contain control characters")
    return text


def _person(fields: dict[str, Any], name: str, xcn: bool = False) -> str:
    """A DICOM PN (family^given^middle^prefix^suffix) as an HL7 XPN (family^given^middle^
    suffix^prefix), or as an XCN (an empty ID first)."""
    value = fields.get(name, "")
    if not value:
        return ""
    parts = [_escape(p) for p in _checked(name, value).split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    xpn = "^".join((family, given, middle, suffix, prefix)).rstrip("^")
    return "^" + xpn if xcn else xpn


def order_message(
    fields: dict[str, Any], who: str, order_control: str, processing_id: str
) -> bytes:
    """The OMI^O23 for `fields`; ValueError for a field that is unknown or not text."""
    if not isinstance(fields, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")

    def t(name: str) -> str:
        return _text(fields, name)

    if not fields.get("StudyInstanceUID") and fields.get("AccessionNumber"):
        # IPC-3 is required in an OMI: the UID the bridge derives for an ORM without ZDS
        from bridge.hl7.order import derive_study_uid

        fields = {**fields, "StudyInstanceUID": derive_study_uid(
            f"acc:{_checked('AccessionNumber', fields['AccessionNumber'])}",
            _checked("RequestedProcedureID", fields.get("RequestedProcedureID", "")),
        )}  # fmt: skip

    now = datetime.now(UTC)
    placer, filler = t("PlacerOrderNumber"), t("FillerOrderNumber")
    procedure = "^".join(
        (t("RequestedProcedureCode"), t("RequestedProcedureDescription"),
         t("RequestedProcedureCodingScheme") or ("L" if t("RequestedProcedureCode") else ""))
    ).rstrip("^")  # fmt: skip
    protocol = (
        "^" + t("ScheduledProcedureStepDescription")
        if fields.get("ScheduledProcedureStepDescription")
        else ""
    )
    patient_id = t("PatientID")
    if fields.get("IssuerOfPatientID"):
        patient_id += "^^^" + t("IssuerOfPatientID")
    segments = [
        "|".join(
            (
                "MSH",
                "^~\\&",
                "WLBRIDGE-API",
                _escape(who)[:20],
                "WLBRIDGE",
                "WLBRIDGE",
                now.strftime("%Y%m%d%H%M%S"),
                "",
                "OMI^O23^OMI_O23",
                control_id(),
                processing_id,
                "2.5.1",
                "",
                "",
                "",
                "",
                "",
                "UNICODE UTF-8",
            )
        ),  # fmt: skip
        "|".join(
            (
                "PID",
                "",
                "",
                patient_id,
                "",
                _person(fields, "PatientName"),
                "",
                t("PatientBirthDate"),
                t("PatientSex"),
            )
        ),  # fmt: skip
    ]
    if fields.get("ReferringPhysicianName"):
        segments.append("PV1||O||||||" + _person(fields, "ReferringPhysicianName", xcn=True))
    orc = ["ORC", order_control, placer, filler, "", "SC", "", "", "", "", "", "", ""]
    orc[12] = _person(fields, "RequestingPhysician", xcn=True)
    segments.append("|".join(orc).rstrip("|"))
    segments.append(
        "|".join(
            (
                "TQ1",
                "1",
                "",
                "",
                "",
                "",
                "",
                t("ScheduledProcedureStepStartDateTime"),
                "",
                t("Priority"),
            )
        ).rstrip("|")  # fmt: skip
    )
    obr = ["OBR", "1", placer, filler, procedure] + [""] * 27
    obr[31] = t("ReasonForTheRequestedProcedure")
    segments.append("|".join(obr).rstrip("|"))
    segments.append(
        "|".join(
            (
                "IPC",
                t("AccessionNumber"),
                t("RequestedProcedureID"),
                t("StudyInstanceUID"),
                t("ScheduledProcedureStepID"),
                t("Modality"),
                protocol,
                t("ScheduledStationName"),
                t("ScheduledProcedureStepLocation"),
                t("ScheduledStationAETitle"),
            )
        ).rstrip("|")  # fmt: skip
    )
    return ("\r".join(segments) + "\r").encode("utf-8")


def values_of_item(item: Dataset) -> dict[str, Any]:
    """The JSON fields of a stored item: the defaults of a replacement (PUT)."""
    step = (item.get("ScheduledProcedureStepSequence") or [Dataset()])[0]
    code = (item.get("RequestedProcedureCodeSequence") or [Dataset()])[0]
    protocol = (step.get("ScheduledProtocolCodeSequence") or [Dataset()])[0]
    start = (
        str(step.get("ScheduledProcedureStepStartDate", ""))
        + str(step.get("ScheduledProcedureStepStartTime", "")).split(".")[0]
    )
    aets = step.get("ScheduledStationAETitle", "")
    values: dict[str, Any] = {
        "PatientID": item.get("PatientID", ""),
        "IssuerOfPatientID": item.get("IssuerOfPatientID", ""),
        "PatientName": item.get("PatientName", ""),
        "PatientBirthDate": item.get("PatientBirthDate", ""),
        "PatientSex": item.get("PatientSex", ""),
        "ReferringPhysicianName": item.get("ReferringPhysicianName", ""),
        "PlacerOrderNumber": item.get("PlacerOrderNumberImagingServiceRequest", ""),
        "FillerOrderNumber": item.get("FillerOrderNumberImagingServiceRequest", ""),
        "RequestingPhysician": item.get("RequestingPhysician", ""),
        "ScheduledProcedureStepStartDateTime": start,
        "RequestedProcedureCode": code.get("CodeValue", ""),
        "RequestedProcedureDescription": item.get("RequestedProcedureDescription", ""),
        "RequestedProcedureCodingScheme": code.get("CodingSchemeDesignator", ""),
        "AccessionNumber": item.get("AccessionNumber", ""),
        "RequestedProcedureID": item.get("RequestedProcedureID", ""),
        "StudyInstanceUID": item.get("StudyInstanceUID", ""),
        "ScheduledProcedureStepID": step.get("ScheduledProcedureStepID", ""),
        "Modality": step.get("Modality", ""),
        "ScheduledProcedureStepDescription": step.get("ScheduledProcedureStepDescription", "")
        if not protocol.get("CodeValue")
        else "",
        "ScheduledStationName": step.get("ScheduledStationName", ""),
        "ScheduledProcedureStepLocation": step.get("ScheduledProcedureStepLocation", ""),
        "ScheduledStationAETitle": list(aets) if not isinstance(aets, str) else aets,
    }
    return {
        k: (str(v) if not isinstance(v, list) else [str(x) for x in v])
        for k, v in values.items()
        if v
    }


def control_id() -> str:
    return "API" + datetime.now(UTC).strftime("%H%M%S") + secrets.token_hex(5)
