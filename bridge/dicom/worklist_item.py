"""Step 4 of the pipeline: a `ProcedureStep` becomes a DICOM Modality Worklist item.

The item carries every Type 1 and Type 2 return key of PS3.4 Table K.6-1 (Type 2 empty when the
message has no value): modalities and dcmtk's wlmscpfs silently drop items that lack one. Values
longer than their VR allows: descriptive ones are cut with a note, identifiers and UIDs refused
(AE 102 at the HL7 field: cut, they would name another order), by configuration (`strict`,
`overlong-values`).
The dataset has no file meta information; the store adds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from bridge.core.attributes import ATTRIBUTES, by_level
from bridge.dicom.vr_fit import IDENTIFIERS  # noqa: F401 (part of this module's interface)
from bridge.dicom.vr_fit import fit_any as _fit_any
from bridge.hl7.order import fit_patient

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.hl7.message import HL7Message
    from bridge.hl7.order import OrderMessage, Patient, ProcedureStep

# pydicom 3.0 has no codec for ISO 8859-15 (ISO_IR 203); without it, such items would be written
# in Latin-1 and lose the characters that differ (the euro sign, Š, Ž, Œ, Ÿ).
python_encoding.setdefault("ISO_IR 203", "iso8859_15")

SPS_STATUSES = ("SCHEDULED", "ARRIVED", "READY", "STARTED", "COMPLETED", "DISCONTINUED", "CANCELED")

# PS3.4 Table K.6-1: return key types of the top level ("1C"/"2C": conditional; a 1C key is
# present only with a value), from the attribute registry. Optional (Type 3) keys the bridge
# also fills follow in TOP_LEVEL_OPTIONAL.
REQUIRED_KEYS: dict[str, str] = {a.keyword: a.type for a in by_level("top") if a.type != "3"}
# the same for the (single) item of ScheduledProcedureStepSequence
SPS_REQUIRED_KEYS: dict[str, str] = {a.keyword: a.type for a in by_level("sps") if a.type != "3"}
# optional (Type 3) keys, written when the message has a value
TOP_LEVEL_OPTIONAL = tuple(a.keyword for a in by_level("top") if a.type == "3")
SPS_OPTIONAL = tuple(a.keyword for a in by_level("sps") if a.type == "3")
PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAddress",
)

_VR = {keyword: a.vr for keyword, a in ATTRIBUTES.items()}
_TAG = {keyword: a.tag for keyword, a in ATTRIBUTES.items()}
_SPS_KEYS = frozenset(SPS_REQUIRED_KEYS) | frozenset(SPS_OPTIONAL)


def patient_values(patient: Patient) -> dict:
    return {
        "PatientName": patient.name,
        "PatientID": patient.patient_id,
        "IssuerOfPatientID": patient.issuer,
        "PatientBirthDate": patient.birth_date,
        "PatientSex": patient.sex,
        "PatientAddress": patient.address,
    }


# The item is first built as plain elements, (tag, VR, value) in tag order (a sequence's value:
# a list of such lists, one per item), from which the store writes the file's bytes and the index
# makes its record without pydicom: creating its DataElements and Datasets was about a fifth of
# the CPU of a message. The values are those the Dataset holds (str, list of str for several
# values, None for an empty number); `Item.to_dataset` gives the Dataset for everything else.
Element = tuple[int, str, object]

_OTHER_IDS = tag_for_keyword("OtherPatientIDsSequence")
_SPS_SEQUENCE = tag_for_keyword("ScheduledProcedureStepSequence")
_OTHER_ID_TAGS = (
    (tag_for_keyword("PatientID"), "LO"),
    (tag_for_keyword("IssuerOfPatientID"), "LO"),
    (tag_for_keyword("TypeOfPatientID"), "CS"),
)
_CODE_TAGS = tuple(
    (keyword, tag_for_keyword(keyword), dictionary_VR(keyword))
    for keyword in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
)


class Item:
    """A worklist item as plain elements (no file meta). `elements`: (tag, VR, value) in tag
    order; a sequence's value is a list of items, each such a list."""

    __slots__ = ("elements",)

    def __init__(self, elements: list[Element]) -> None:
        self.elements = elements

    def to_dataset(self) -> Dataset:
        """The pydicom Dataset of the item (what `build_item` returns)."""
        return _dataset(self.elements)

    def set(self, keyword: str, value) -> None:
        """Add or replace a top-level element, its value as its Dataset would hold it."""
        tag = _TAG.get(keyword) or tag_for_keyword(keyword)
        vr = _VR.get(keyword) or dictionary_VR(tag)
        elements = [e for e in self.elements if e[0] != tag]
        elements.append((tag, vr, value))
        elements.sort(key=_tag_of)
        self.elements = elements


def _tag_of(element: Element) -> int:
    return element[0]


def _dataset(elements: list[Element]) -> Dataset:
    ds = Dataset()
    for tag, vr, value in elements:
        if vr == "SQ":
            value = Sequence([_dataset(item) for item in value])
        # Without pydicom's value checks: _fit has checked lengths, code strings and UIDs.
        ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
    return ds


def _other_ids(patient: Patient) -> Sequence:
    """OtherPatientIDsSequence for an existing item (ADT updates)."""
    items = []
    for pid, issuer in patient.other_ids:
        item = Dataset()
        item.PatientID = pid
        item.IssuerOfPatientID = issuer
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    return Sequence(items)


def _other_id_items(patient: Patient) -> list[list[Element]]:
    (pid_tag, pid_vr), (issuer_tag, issuer_vr), (type_tag, type_vr) = _OTHER_ID_TAGS
    return [
        [(pid_tag, pid_vr, pid), (issuer_tag, issuer_vr, issuer), (type_tag, type_vr, "TEXT")]
        for pid, issuer in patient.other_ids
    ]


def _code_items(items: list[dict]) -> list[list[Element]]:
    return [[(tag, vr, code[keyword]) for keyword, tag, vr in _CODE_TAGS] for code in items]


# Keys kept when empty (Type 1 and 2); an empty 1C or optional key is left out. Worked out once:
# _set runs for every key of every item.
_KEPT_EMPTY = frozenset(
    keyword
    for keyword in (*REQUIRED_KEYS, *SPS_REQUIRED_KEYS)
    if (REQUIRED_KEYS.get(keyword) or SPS_REQUIRED_KEYS.get(keyword)) not in ("1C", None)
)


def _set(elements: dict[int, Element], keyword: str, value) -> None:
    """Set one attribute; "" and [] give an empty (Type 2) value, 1C keys stay absent."""
    if not value and keyword not in _KEPT_EMPTY:
        return  # an empty 1C or optional key is left out
    if keyword.endswith("Sequence"):
        value = _code_items(value) if value else []
    elif isinstance(value, list):
        value = value if len(value) > 1 else (value[0] if value else "")
    vr = _VR[keyword]
    if value == "" and vr in ("US", "DS", "IS"):
        value = None
    tag = _TAG[keyword]
    elements[tag] = (tag, vr, value)


def _plain_texts(elements: list[Element]):
    """The texts of an item's values, as `_texts` finds them in its Dataset."""
    for _tag, vr, value in elements:
        if vr == "SQ":
            for item in value:
                yield from _plain_texts(item)
        elif isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (str(v) for v in value)


def _plain_charset(elements: list[Element], preferred: str) -> str:
    """What `_set_charset` would set: "" (pure ASCII, or nothing can carry the values)."""
    texts = list(_plain_texts(elements))
    if all(text.isascii() for text in texts):
        return ""
    for charset in (preferred, "ISO_IR 192"):
        codec = python_encoding.get(charset) if charset else None
        if codec is None:
            continue
        try:
            for text in texts:
                text.encode(codec)
        except UnicodeEncodeError:
            continue
        return charset
    return ""


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
    return build_elements(message, order, step, settings).to_dataset()


def build_elements(message: HL7Message, order: OrderMessage, step: ProcedureStep,
                   settings: Settings) -> Item:  # fmt: skip
    """`build_item` as plain elements: what the pipeline writes and indexes."""
    patient = order.patient
    fit_patient(patient, message, settings)
    values: dict = dict.fromkeys((*REQUIRED_KEYS, *TOP_LEVEL_OPTIONAL), "")
    values.update(dict.fromkeys((*SPS_REQUIRED_KEYS, *SPS_OPTIONAL), ""))
    values.update(step.values)
    values.update(patient_values(patient))
    values["AdmissionID"] = patient.admission_id
    values["ScheduledProcedureStepStatus"] = step.status

    top: dict[int, Element] = {}
    sps: dict[int, Element] = {}
    texts: list[str] = [text for pair in patient.other_ids for text in pair]
    for keyword, value in values.items():
        if keyword not in _VR or keyword == "ScheduledProcedureStepSequence":
            continue  # values the mapping keeps for itself
        if value != "":  # fitting "" gives "" (no note, no error): most keys are empty
            location = step.locations.get(keyword) or patient.locations.get(keyword, "")
            value = _fit_any(value, keyword, location, message, settings)
            _collect_texts(value, texts)
        _set(sps if keyword in _SPS_KEYS else top, keyword, value)
    if patient.other_ids:
        top[_OTHER_IDS] = (_OTHER_IDS, "SQ", _other_id_items(patient))
    top[_SPS_SEQUENCE] = (_SPS_SEQUENCE, "SQ", [sorted(sps.values(), key=_tag_of)])
    item = Item(sorted(top.values(), key=_tag_of))
    if not all(text.isascii() for text in texts):
        charset = _plain_charset(item.elements, message.dicom_charset)
        if charset:
            item.set("SpecificCharacterSet", charset)
    return item


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
