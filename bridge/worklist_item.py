"""Step 4 of the pipeline: a `ProcedureStep` becomes a DICOM Modality Worklist item.

The item carries every Type 1 and Type 2 return key of PS3.4 Table K.6-1 (Type 2 empty when the
message has no value): modalities and dcmtk's wlmscpfs silently drop items that lack one. Values
longer than their VR allows are refused (AE 102 at the HL7 field) or cut, by configuration.
The dataset has no file meta information; the store adds it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from bridge.errors import DATA_TYPE_ERROR, HL7Error

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.hl7message import HL7Message
    from bridge.order import OrderMessage, Patient, ProcedureStep

# pydicom 3.0 has no codec for ISO 8859-15 (ISO_IR 203); without it, such items would be written
# in Latin-1 and lose the characters that differ (the euro sign, Š, Ž, Œ, Ÿ).
python_encoding.setdefault("ISO_IR 203", "iso8859_15")

SPS_STATUSES = ("SCHEDULED", "ARRIVED", "READY", "STARTED", "COMPLETED", "DISCONTINUED", "CANCELED")

# PS3.4 Table K.6-1: return key types of the top level ("1C"/"2C": conditional; a 1C key is
# present only with a value). Optional (Type 3) keys the bridge also fills follow in TOP_LEVEL.
# fmt: off
REQUIRED_KEYS: dict[str, str] = {
    # Scheduled Procedure Step
    "ScheduledProcedureStepSequence": "1",
    # Requested Procedure
    "RequestedProcedureID": "1",
    "RequestedProcedureDescription": "1C",  # required if RequestedProcedureCodeSequence is absent
    "RequestedProcedureCodeSequence": "1C",  # required if RequestedProcedureDescription is absent
    "StudyInstanceUID": "1",
    "ReferencedStudySequence": "2",
    "RequestedProcedurePriority": "2",
    "PatientTransportArrangements": "2",
    # Imaging Service Request
    "AccessionNumber": "2",
    "RequestingPhysician": "2",
    "ReferringPhysicianName": "2",
    # Visit Identification, Status and Relationship
    "AdmissionID": "2",
    "CurrentPatientLocation": "2",
    "ReferencedPatientSequence": "2",
    # Patient Identification and Demographics
    "PatientName": "1",
    "PatientID": "1",
    "PatientBirthDate": "2",
    "PatientSex": "2",
    "PatientWeight": "2",
    "ConfidentialityConstraintOnPatientDataDescription": "2",
    # Patient Medical
    "PatientState": "2",
    "PregnancyStatus": "2",
    "MedicalAlerts": "2",
    "Allergies": "2",
    "SpecialNeeds": "2",
}
# the same for the (single) item of ScheduledProcedureStepSequence
SPS_REQUIRED_KEYS: dict[str, str] = {
    "ScheduledStationAETitle": "1",
    "ScheduledProcedureStepStartDate": "1",
    "ScheduledProcedureStepStartTime": "1",
    "Modality": "1",
    "ScheduledPerformingPhysicianName": "2",
    "ScheduledProcedureStepDescription": "1C",  # required if ScheduledProtocolCodeSequence absent
    "ScheduledProtocolCodeSequence": "1C",  # required if ScheduledProcedureStepDescription absent
    "ScheduledStationName": "2",
    "ScheduledProcedureStepLocation": "2",
    "PreMedication": "2C",  # "required if pre-medication is to be given": kept, empty if unknown
    "ScheduledProcedureStepID": "1",
    "RequestedContrastAgent": "2C",  # likewise
}
# fmt: on
# optional (Type 3) keys, written when the message has a value
TOP_LEVEL_OPTIONAL = (
    "IssuerOfPatientID",
    "PatientAddress",
    "PatientSize",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "ReasonForTheRequestedProcedure",
    "TimezoneOffsetFromUTC",
)
SPS_OPTIONAL = ("ScheduledProcedureStepStatus",)
PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAddress",
)

# the longest value (in characters) of each VR the item uses; PN: per component group
MAX_LENGTH = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "IS": 12, "LO": 64, "PN": 64, "SH": 16,
    "TM": 16, "UI": 64, "ST": 1024, "LT": 10240,
}  # fmt: skip
_VR = {
    kw: dictionary_VR(tag_for_keyword(kw))
    for kw in (
        *REQUIRED_KEYS,
        *SPS_REQUIRED_KEYS,
        *TOP_LEVEL_OPTIONAL,
        *SPS_OPTIONAL,
        "CodeValue",
        "CodingSchemeDesignator",
        "CodeMeaning",
    )
}
_TAG = {kw: tag_for_keyword(kw) for kw in _VR}
_CS = re.compile(r"[A-Z0-9 _]*")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_SPS_KEYS = frozenset(SPS_REQUIRED_KEYS) | frozenset(SPS_OPTIONAL)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _fit(value: str, keyword: str, location: str, message: HL7Message, settings: Settings) -> str:
    """The value as the VR allows it: HL7Error 102 or a cut value (with a note) when too long."""
    vr = _VR.get(keyword, "LO")
    if not value.isprintable() and vr not in ("ST", "LT", "UT"):
        # Control characters (a TAB, \.br\'s CR LF) are not allowed in these VRs (PS3.5 6.2)
        value = _CONTROL.sub(" ", value)
        message.notes.append(f"{location or keyword}: control characters in {keyword} -> space")
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
    if settings.overlong_values == "truncate" and vr != "UI":  # a cut UID is another UID
        message.notes.append(
            f"{location or keyword}: {keyword} cut from {len(value)} to {limit} characters ({vr})"
        )
        return value[:limit]
    raise HL7Error(
        DATA_TYPE_ERROR,
        location,
        f"{keyword} is {len(value)} characters long, {vr} allows {limit}: {value[:80]!r}",
    )


def _fit_any(value, keyword: str, location: str, message: HL7Message, settings: Settings):
    if isinstance(value, str):
        return _fit(value, keyword, location, message, settings)
    if isinstance(value, list) and value and isinstance(value[0], dict):  # code items
        return [
            {k: _fit(v, k, location, message, settings) for k, v in item.items()} for item in value
        ]
    if isinstance(value, list):
        return [_fit(v, keyword, location, message, settings) for v in value]
    return value


def fit_patient(patient: Patient, message: HL7Message, settings: Settings) -> None:
    """Check (or cut) the patient's values against their VRs, in place."""
    for keyword, attribute in (
        ("PatientName", "name"),
        ("PatientID", "patient_id"),
        ("IssuerOfPatientID", "issuer"),
        ("PatientAddress", "address"),
        ("AdmissionID", "admission_id"),
    ):
        location = patient.locations.get(keyword, "")
        setattr(patient, attribute, _fit(getattr(patient, attribute), keyword, location, message,
                                         settings))  # fmt: skip
    location = patient.locations.get("OtherPatientIDsSequence", "")
    patient.other_ids = [
        (
            _fit(pid, "PatientID", location, message, settings),
            _fit(issuer, "IssuerOfPatientID", location, message, settings),
        )
        for pid, issuer in patient.other_ids
    ]


def patient_values(patient: Patient) -> dict:
    return {
        "PatientName": patient.name,
        "PatientID": patient.patient_id,
        "IssuerOfPatientID": patient.issuer,
        "PatientBirthDate": patient.birth_date,
        "PatientSex": patient.sex,
        "PatientAddress": patient.address,
    }


def _other_ids(patient: Patient) -> Sequence:
    items = []
    for pid, issuer in patient.other_ids:
        item = Dataset()
        item.PatientID = pid
        item.IssuerOfPatientID = issuer
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    return Sequence(items)


def _code_sequence(items: list[dict]) -> Sequence:
    out = []
    for code in items:
        item = Dataset()
        item.CodeValue = code["CodeValue"]
        item.CodingSchemeDesignator = code["CodingSchemeDesignator"]
        item.CodeMeaning = code["CodeMeaning"]
        out.append(item)
    return Sequence(out)


def _set(ds: Dataset, keyword: str, value) -> None:
    """Set one attribute; "" and [] give an empty (Type 2) value, 1C keys stay absent."""
    kind = REQUIRED_KEYS.get(keyword) or SPS_REQUIRED_KEYS.get(keyword)
    if kind in ("1C", None) and not value:
        return  # an empty 1C or optional key is left out
    if keyword.endswith("Sequence"):
        value = _code_sequence(value) if value else Sequence()
    elif isinstance(value, list):
        value = value if len(value) > 1 else (value[0] if value else "")
    vr = _VR[keyword]
    if value == "" and vr in ("US", "DS", "IS"):
        value = None
    # By tag (a keyword look-up per value costs), and without pydicom's value checks: _fit has
    # checked lengths, code strings and UIDs already (measured: 10-15% of building an item).
    tag = _TAG[keyword]
    ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _texts(ds: Dataset):
    for elem in ds.iterall():
        value = elem.value
        if isinstance(value, str):
            yield value
        elif elem.VM > 1 and elem.VR not in ("SQ", "US", "OB", "OW"):
            yield from (str(v) for v in value)
        elif elem.VR == "PN" and value is not None:
            yield str(value)


def _needs_charset(ds: Dataset) -> bool:
    return any(not text.isascii() for text in _texts(ds))


def _can_carry(ds: Dataset, charset: str) -> bool:
    codec = python_encoding.get(charset)
    if codec is None:
        return False
    try:
        for text in _texts(ds):
            text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _set_charset(ds: Dataset, preferred: str) -> None:
    """SpecificCharacterSet: absent for pure ASCII (the default repertoire), else the preferred
    charset if it can carry every value, else UTF-8."""
    if not _needs_charset(ds):
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        return
    for charset in (preferred, "ISO_IR 192"):
        if charset and _can_carry(ds, charset):
            ds.SpecificCharacterSet = charset
            return


def build_item(message: HL7Message, order: OrderMessage, step: ProcedureStep,
               settings: Settings) -> Dataset:  # fmt: skip
    """The worklist item of one step (no file meta). HL7Error 102 for values too long for their
    VR when settings.overlong_values is "reject"."""
    patient = order.patient
    fit_patient(patient, message, settings)
    values: dict = dict.fromkeys((*REQUIRED_KEYS, *TOP_LEVEL_OPTIONAL), "")
    values.update(dict.fromkeys((*SPS_REQUIRED_KEYS, *SPS_OPTIONAL), ""))
    values.update(step.values)
    values.update(patient_values(patient))
    values["AdmissionID"] = patient.admission_id
    values["ScheduledProcedureStepStatus"] = step.status

    ds = Dataset()
    sps = Dataset()
    texts: list[str] = [text for pair in patient.other_ids for text in pair]
    for keyword, value in values.items():
        if keyword not in _VR or keyword == "ScheduledProcedureStepSequence":
            continue  # values the mapping keeps for itself
        location = step.locations.get(keyword) or patient.locations.get(keyword, "")
        value = _fit_any(value, keyword, location, message, settings)
        _collect_texts(value, texts)
        _set(sps if keyword in _SPS_KEYS else ds, keyword, value)
    if patient.other_ids:
        ds.OtherPatientIDsSequence = _other_ids(patient)
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    if not all(text.isascii() for text in texts):
        _set_charset(ds, message.dicom_charset)
    return ds


def _collect_texts(value, texts: list[str]) -> None:
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict):
                texts.extend(v.values())
            else:
                texts.append(v)


def apply_patient(item: Dataset, patient: Patient, message: HL7Message) -> None:
    """Overwrite the patient-level attributes of an existing item (ADT A08, A31, A40, A47)."""
    # decode every value with the charset the item was read with, before that charset changes
    for _ in item.iterall():
        pass
    for keyword, value in patient_values(patient).items():
        setattr(item, keyword, value)
    if patient.admission_id:
        item.AdmissionID = patient.admission_id
    if patient.other_ids:
        item.OtherPatientIDsSequence = _other_ids(patient)
    elif "OtherPatientIDsSequence" in item:
        del item.OtherPatientIDsSequence
    current = item.get("SpecificCharacterSet", "")
    if isinstance(current, list | tuple):  # multi-valued (code extensions): keep only if it fits
        current = ""
    if current and _can_carry(item, current):
        return
    _set_charset(item, message.dicom_charset or current)


def set_status(item: Dataset, status: str) -> None:
    """Set the SPS status of an item (ScheduledProcedureStepStatus in its SPS item)."""
    if status not in SPS_STATUSES:
        raise ValueError(f"unknown SPS status {status!r}")
    item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = status


def missing_keys(item: Dataset) -> list[str]:
    """Type 1 keys absent or empty, Type 2 keys absent, and 1C pairs with neither present."""
    missing = []
    for keys, ds, label in (
        (REQUIRED_KEYS, item, ""),
        (SPS_REQUIRED_KEYS, (item.get("ScheduledProcedureStepSequence") or [Dataset()])[0], ">"),
    ):
        for keyword, kind in keys.items():
            if kind == "1C":
                continue
            if keyword not in ds or (kind == "1" and ds[keyword].is_empty):
                missing.append(label + keyword)
    if not item.get("RequestedProcedureDescription") and not item.get(
        "RequestedProcedureCodeSequence"
    ):
        missing.append("RequestedProcedureDescription|RequestedProcedureCodeSequence")
    sps = (item.get("ScheduledProcedureStepSequence") or [Dataset()])[0]
    if not sps.get("ScheduledProcedureStepDescription") and not sps.get(
        "ScheduledProtocolCodeSequence"
    ):
        missing.append(">ScheduledProcedureStepDescription|ScheduledProtocolCodeSequence")
    return missing
