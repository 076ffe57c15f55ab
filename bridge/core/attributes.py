"""The attributes of a worklist item: one registry the rest derives from.

Each attribute the bridge writes has one row: its keyword, where it sits (the top level of the
item, the item of ScheduledProcedureStepSequence, or a code sequence item), its return key type
in PS3.4 Table K.6-1 ("3": an optional key the bridge also fills), and what gives its value.
Tag, VR and maximum length come from pydicom's data dictionary and PS3.5 Table 6.2-1.
`bridge.dicom.worklist_item` derives its key lists and VR checks from here, `bridge.hl7.mapping` the
attributes a site may map. Imports nothing from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword

SPS_SEQUENCE = "ScheduledProcedureStepSequence"

# the longest value (in characters) of each VR the item uses; PN: per component group
MAX_LENGTH = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "IS": 12, "LO": 64, "PN": 64, "SH": 16,
    "TM": 16, "UI": 64, "ST": 1024, "LT": 10240,
}  # fmt: skip

# where a value comes from:
ORDER = "order"  # the field map (order.ORDER_FIELDS, and a site's [mapping] rows)
PATIENT = "patient"  # the patient rules (order.read_patient: PID, PV1-19)
DERIVED = "derived"  # set by the bridge from other values (status, start time, descriptions...)
NONE = "none"  # no HL7 source: written empty (Type 2) or not at all


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: int
    vr: str
    level: str  # "top", "sps" (in ScheduledProcedureStepSequence) or "code" (a code item)
    type: str  # Table K.6-1 return key type: 1, 1C, 2, 2C; 3 for an optional key
    source: str  # ORDER, PATIENT, DERIVED or NONE
    max_length: int | None  # characters (PN: per component group); None: no limit checked

    @property
    def path(self) -> str:
        """The keyword with its sequence: `ScheduledProcedureStepSequence.Modality`."""
        return f"{SPS_SEQUENCE}.{self.keyword}" if self.level == "sps" else self.keyword


# fmt: off
_ROWS: tuple[tuple[str, str, str, str], ...] = (
    # keyword                                          level  type  source
    # Scheduled Procedure Step
    ("ScheduledProcedureStepSequence",                 "top", "1",  DERIVED),
    # Requested Procedure
    ("RequestedProcedureID",                           "top", "1",  ORDER),
    ("RequestedProcedureDescription",                  "top", "1C", DERIVED),  # or the code seq.
    ("RequestedProcedureCodeSequence",                 "top", "1C", ORDER),
    ("StudyInstanceUID",                               "top", "1",  ORDER),
    ("ReferencedStudySequence",                        "top", "2",  NONE),
    ("RequestedProcedurePriority",                     "top", "2",  ORDER),
    ("PatientTransportArrangements",                   "top", "2",  ORDER),
    # Imaging Service Request
    ("AccessionNumber",                                "top", "2",  ORDER),
    ("RequestingPhysician",                            "top", "2",  ORDER),
    ("ReferringPhysicianName",                         "top", "2",  ORDER),
    # Visit Identification, Status and Relationship
    ("AdmissionID",                                    "top", "2",  PATIENT),
    ("CurrentPatientLocation",                         "top", "2",  ORDER),
    ("ReferencedPatientSequence",                      "top", "2",  NONE),
    # Patient Identification and Demographics
    ("PatientName",                                    "top", "1",  PATIENT),
    ("PatientID",                                      "top", "1",  PATIENT),
    ("PatientBirthDate",                               "top", "2",  PATIENT),
    ("PatientSex",                                     "top", "2",  PATIENT),
    ("PatientWeight",                                  "top", "2",  DERIVED),  # from OBX
    ("ConfidentialityConstraintOnPatientDataDescription", "top", "2", ORDER),
    # Patient Medical
    ("PatientState",                                   "top", "2",  ORDER),
    ("PregnancyStatus",                                "top", "2",  NONE),  # US: no HL7 code
    ("MedicalAlerts",                                  "top", "2",  ORDER),
    ("Allergies",                                      "top", "2",  DERIVED),  # from AL1
    ("SpecialNeeds",                                   "top", "2",  ORDER),
    # the item of ScheduledProcedureStepSequence
    ("ScheduledStationAETitle",                        "sps", "1",  ORDER),
    ("ScheduledProcedureStepStartDate",                "sps", "1",  ORDER),
    ("ScheduledProcedureStepStartTime",                "sps", "1",  DERIVED),  # with the date
    ("Modality",                                       "sps", "1",  ORDER),
    ("ScheduledPerformingPhysicianName",               "sps", "2",  ORDER),
    ("ScheduledProcedureStepDescription",              "sps", "1C", DERIVED),  # or the protocol
    ("ScheduledProtocolCodeSequence",                  "sps", "1C", ORDER),
    ("ScheduledStationName",                           "sps", "2",  ORDER),
    ("ScheduledProcedureStepLocation",                 "sps", "2",  ORDER),
    # "required if pre-medication is to be given / contrast is to be used": kept, empty if unknown
    ("PreMedication",                                  "sps", "2C", ORDER),
    ("ScheduledProcedureStepID",                       "sps", "1",  ORDER),
    ("RequestedContrastAgent",                         "sps", "2C", ORDER),
    # optional (Type 3) keys, written when the message has a value
    ("IssuerOfPatientID",                              "top", "3",  PATIENT),
    ("PatientAddress",                                 "top", "3",  PATIENT),
    ("PatientSize",                                    "top", "3",  DERIVED),  # from OBX
    ("PlacerOrderNumberImagingServiceRequest",         "top", "3",  ORDER),
    ("FillerOrderNumberImagingServiceRequest",         "top", "3",  ORDER),
    ("ReasonForTheRequestedProcedure",                 "top", "3",  ORDER),
    ("TimezoneOffsetFromUTC",                          "top", "3",  DERIVED),  # with the date
    # no built-in row: for a site's [mapping]
    ("RequestingService",                              "top", "3",  ORDER),
    ("RequestedProcedureComments",                     "top", "3",  ORDER),
    ("ImagingServiceRequestComments",                  "top", "3",  ORDER),
    ("ScheduledProcedureStepStatus",                   "sps", "3",  DERIVED),  # ORC-1 + ORC-5
    ("CommentsOnTheScheduledProcedureStep",            "sps", "3",  ORDER),
    # the items of the code sequences
    ("CodeValue",                                      "code", "1", NONE),
    ("CodingSchemeDesignator",                         "code", "1", NONE),
    ("CodeMeaning",                                    "code", "1", NONE),
)
# fmt: on


def _attribute(keyword: str, level: str, kind: str, source: str) -> Attribute:
    tag = tag_for_keyword(keyword)
    if tag is None:  # a typo here must fail at import, not drop the value per message
        raise ValueError(f"attribute registry: {keyword!r} is not a DICOM keyword")
    vr = dictionary_VR(tag)
    return Attribute(keyword, tag, vr, level, kind, source, MAX_LENGTH.get(vr))


ATTRIBUTES: dict[str, Attribute] = {row[0]: _attribute(*row) for row in _ROWS}


def by_level(level: str) -> tuple[Attribute, ...]:
    return tuple(a for a in ATTRIBUTES.values() if a.level == level)


def find(name: str) -> Attribute | None:
    """The attribute a setting names: a bare keyword (`Modality`) or its path
    (`ScheduledProcedureStepSequence.Modality`); None when the item has no such attribute."""
    sequence, dot, keyword = name.rpartition(".")
    attribute = ATTRIBUTES.get(keyword if dot else name)
    if attribute is None or attribute.level == "code":
        return None
    if dot and (sequence != SPS_SEQUENCE or attribute.level != "sps"):
        return None
    return attribute
