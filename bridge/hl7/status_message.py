"""The order status update a receiver hears when a scheduled step starts, ends or is given up.

IHE RAD-3 semantics: ORC-1 = SC (status changed), ORC-5 = IP (in progress), CM (completed) or DC
(discontinued), the values only the filler originates (HL7 table 0038). The order's identity comes
from the STORED worklist item (what the RIS sent), never from the MPPS that caused the change:
modalities often drop the placer and filler numbers. The field map is in docs/mapping.md
("Order status to the RIS").

Shapes, chosen per receiver: ORM^O01 in v2.3.1 (what most installed RIS read), OMG^O19 and OMI^O23
in v2.5.1 (the PPS start in TQ1-7 instead of ORC-7.4; OMG carries the Study Instance UID in an OBX,
OMI in IPC-3 with the rest of the IPC).
"""

from __future__ import annotations

from datetime import datetime

from pydicom import Dataset

from bridge.config import OutboundReceiver
from bridge.core.events import StatusChange
from bridge.hl7.ack import escape
from bridge.hl7.message import CHARSETS, Delimiters
from bridge.hl7.schema import dtm_problem

# SPS status after the change -> ORC-5 (table 0038). Other statuses are not reported.
ORDER_STATUS = {"STARTED": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC"}
# Receiver's `message` -> (HL7 version, MSH-9 as written).
MESSAGE_SHAPES = {
    "ORM^O01": ("2.3.1", "ORM^O01"),
    "OMG^O19": ("2.5.1", "OMG^O19^OMG_O19"),
    "OMI^O23": ("2.5.1", "OMI^O23^OMI_O23"),
}
STUDY_UID_CODE = "110180^Study Instance UID^DCM"  # OBX-3 of the OMG's Study Instance UID
MAX_FRACTION = 4  # HL7 DTM carries at most 4 digits of a second; DICOM DT up to 6

_DELIMS = Delimiters()


def order_status(new_status: str) -> str | None:
    """ORC-5 for an SPS status, or None when the status is not reported to receivers."""
    return ORDER_STATUS.get(new_status.upper())


def hl7_timestamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def dtm_from_dt(value: str) -> str:
    """A DICOM DT (`YYYYMMDDHHMMSS.FFFFFF+ZZZZ`) as HL7 DTM; "" when it is not one."""
    value = value.strip()
    offset = ""
    for sign in "+-":
        if sign in value[4:]:
            at = value.index(sign, 4)
            value, offset = value[:at], value[at:]
    if "." in value:
        whole, fraction = value.split(".", 1)
        value = whole + ("." + fraction[:MAX_FRACTION] if fraction else "")
    result = value + offset
    return result if result and dtm_problem(result) is None else ""


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _esc(value: object) -> str:
    return escape(_text(value), _DELIMS)


def _components(*parts: str) -> str:
    """Components joined with `^`, empty trailing ones left out (each part already escaped)."""
    parts_list = list(parts)
    while parts_list and not parts_list[-1]:
        parts_list.pop()
    return "^".join(parts_list)


def _segment(name: str, fields: dict[int, str]) -> str:
    count = max((n for n, v in fields.items() if v), default=1)
    return "|".join([name] + [fields.get(n, "") for n in range(1, count + 1)])


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _code(code_item: Dataset | None) -> str:
    if code_item is None:
        return ""
    return _components(
        _esc(code_item.get("CodeValue", "")),
        _esc(code_item.get("CodeMeaning", "")),
        _esc(code_item.get("CodingSchemeDesignator", "")),
    )


def _patient_ids(item: Dataset) -> str:
    """PID-3: the PatientID with its issuer (CX-4), then the other IDs as repetitions."""
    ids = [(item.get("PatientID", ""), item.get("IssuerOfPatientID", ""))]
    for other in item.get("OtherPatientIDsSequence", []):
        ids.append((other.get("PatientID", ""), other.get("IssuerOfPatientID", "")))
    return "~".join(
        _components(_esc(pid), "", "", _esc(issuer)) for pid, issuer in ids if _text(pid)
    )


def _patient_name(item: Dataset) -> str:
    """DICOM PN family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix."""
    alphabetic = _text(item.get("PatientName", "")).split("=")[0]
    parts = (alphabetic.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p, _DELIMS) for p in parts)
    return _components(family, given, middle, suffix, prefix)


def _procedure_code(item: Dataset) -> str:
    """OBR-4: the requested procedure code, else its description as the text component."""
    code = _code(_first(item, "RequestedProcedureCodeSequence"))
    if code:
        return code
    description = item.get("RequestedProcedureDescription", "")
    if not description:
        step = _first(item, "ScheduledProcedureStepSequence")
        description = step.get("ScheduledProcedureStepDescription", "") if step else ""
    return _components("", _esc(description)) or "UNKNOWN"


def _stations(change: StatusChange, step: Dataset | None) -> list[str]:
    if change.performing_station:
        return [change.performing_station]
    if step is None:
        return []
    value = step.get("ScheduledStationAETitle", "")
    values = [value] if isinstance(value, str) else list(value)
    return [v for v in values if v]


def build_status_message(
    change: StatusChange, receiver: OutboundReceiver, control_id: str, now: datetime
) -> bytes:
    """The status update for `change` in the receiver's shape and charset, segments separated by
    CR, without MLLP framing. Raises ValueError when the status is not one that is reported."""
    status = order_status(change.new_status)
    if status is None:
        raise ValueError(f"status {change.new_status!r} is not reported to receivers")
    version, msh9 = MESSAGE_SHAPES[receiver.message]
    item = change.item
    step = _first(item, "ScheduledProcedureStepSequence")
    placer = _esc(item.get("PlacerOrderNumberImagingServiceRequest", ""))
    filler = _esc(item.get("FillerOrderNumberImagingServiceRequest", ""))
    accession = _esc(item.get("AccessionNumber", ""))
    requested_id = _esc(item.get("RequestedProcedureID", ""))
    sps_id = _esc(step.get("ScheduledProcedureStepID", "")) if step else ""
    modality = _esc(step.get("Modality", "")) if step else ""
    stations = _stations(change, step)
    started = dtm_from_dt(change.performed_start)
    stamp = hl7_timestamp(now)
    charset = receiver.charset.strip()

    msh = "|".join(
        [
            "MSH",
            _DELIMS.encoding_characters,
            _esc(receiver.sending_application),
            _esc(receiver.sending_facility),
            _esc(receiver.receiving_application),
            _esc(receiver.receiving_facility),
            stamp,
            "",
            msh9,
            _esc(control_id),
            _esc(receiver.processing_id),
            version,
        ]
        + ([""] * 5 + [_esc(charset)] if charset and charset.upper() != "ASCII" else [])
    )
    pid = _segment(
        "PID",
        {
            1: "1",
            3: _patient_ids(item),
            5: _patient_name(item),
            7: _esc(item.get("PatientBirthDate", "")),
            8: _esc(item.get("PatientSex", "")),
        },
    )
    pv1 = _segment("PV1", {1: "1", 2: "U", 19: _esc(item.get("AdmissionID", ""))})
    orc_fields = {1: "SC", 2: placer, 3: filler, 5: status, 9: stamp}
    if version == "2.3.1" and started:
        orc_fields[7] = _components("", "", "", started)
    if stations:
        orc_fields[18] = _esc(stations[0])  # the performing station (CE identifier)
    orc = _segment("ORC", orc_fields)
    obr = _segment(
        "OBR",
        {
            1: "1",
            2: placer,
            3: filler,
            4: _procedure_code(item),
            18: accession,
            19: requested_id,
            20: sps_id,
            24: modality,
        },
    )
    segments = [msh, pid, pv1, orc]
    if version != "2.3.1" and started:
        segments.append(_segment("TQ1", {1: "1", 7: started}))
    segments.append(obr)
    study_uid = _esc(item.get("StudyInstanceUID", ""))
    if receiver.message == "OMG^O19" and study_uid:
        segments.append(
            _segment("OBX", {1: "1", 2: "ST", 3: STUDY_UID_CODE, 5: study_uid, 11: "O"})
        )
    if receiver.message == "OMI^O23":
        segments.append(
            _segment(
                "IPC",
                {
                    1: accession,
                    2: requested_id,
                    3: study_uid,
                    4: sps_id,
                    5: modality,
                    6: _code(_first(step, "ScheduledProtocolCodeSequence")) if step else "",
                    7: _esc(step.get("ScheduledStationName", "")) if step else "",
                    8: _esc(step.get("ScheduledProcedureStepLocation", "")) if step else "",
                    9: "~".join(_esc(s) for s in stations),
                },
            )
        )
    codec = CHARSETS.get(charset.upper(), CHARSETS["UNICODE UTF-8"])[0]
    return "\r".join(segments).encode(codec, errors="replace")
