"""Step 3 of the pipeline: an HL7 message becomes what it asks of the worklist.

An order message (ORM^O01, OMI^O23, OMG^O19) becomes one `ProcedureStep` per Scheduled Procedure
Step (one per ORC/OBR group, or per IPC segment), each with the action the order-control table
gives it. A patient message (ADT) becomes a `PatientUpdate`. Anything else is refused with an
HL7Error that the ACK reports.

The built-in field map is `ORDER_FIELDS` below; a site's `[mapping]` and `[code-tables]`
(`bridge.hl7.mapping`) replace its rows; `docs/mapping.md` describes it with every setting that
changes it, and `wlbridge mapping` prints the rows in effect. Values are read here and stored
under their DICOM keyword in `ProcedureStep.values`; `bridge.dicom.worklist_item` turns them into a
dataset and checks their lengths.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import lru_cache

from bridge.config import Settings, StationRule
from bridge.dicom.vr_fit import fit
from bridge.hl7.errors import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_VERSION_ID,
    HL7Error,
)
from bridge.hl7.mapping import Row, default_rows, effective_rows, translate
from bridge.hl7.message import HL7Message, Segment, loose_dtm


class Action(Enum):
    SCHEDULE = "schedule"  # create the item, or replace it in place
    STATUS = "status"  # keep the item, change its SPS status (create it if unknown)
    REMOVE = "remove"  # finished (completed, cancelled, discontinued): leaves the worklist


@dataclass
class Patient:
    patient_id: str = ""
    issuer: str = ""
    other_ids: list[tuple[str, str]] = field(default_factory=list)  # (id, issuer)
    name: str = ""  # DICOM PN order: family^given^middle^prefix^suffix
    birth_date: str = ""
    sex: str = ""
    address: str = ""
    admission_id: str = ""
    # DICOM keyword -> HL7 location (ERR-2) the value came from, for error reports
    locations: dict[str, str] = field(default_factory=dict)


@dataclass
class ProcedureStep:
    """One Scheduled Procedure Step: becomes one worklist item."""

    order_control: str  # ORC-1
    order_status: str  # ORC-5
    action: Action
    status: str  # SPS status: SCHEDULED, ARRIVED, STARTED, COMPLETED, DISCONTINUED, CANCELED
    identity: str  # stable identity of the item: the same order always gives the same string
    accession_number: str = ""
    # everything else the mapping needs, by DICOM keyword: str, list[str] (multi-valued) or
    # list[dict] (code sequence items)
    values: dict = field(default_factory=dict)
    # DICOM keyword -> HL7 location (ERR-2) the value came from, for error reports
    locations: dict[str, str] = field(default_factory=dict)
    study_uid_derived: bool = False  # no ZDS-1 / IPC-3: an existing item's UID must be kept
    # no OBR-19/OBR-20 (IPC-2/IPC-4): the IDs were made up, so a cancel or change finds its
    # item by the order's other identifiers
    ids_defaulted: bool = False


@dataclass
class OrderMessage:
    patient: Patient
    steps: list[ProcedureStep]
    message_type: str = ""  # ORM^O01, OMI^O23 or OMG^O19


@dataclass
class PatientUpdate:
    """ADT: new demographics (A08, A31), a merge or identifier change (A40, A47: the items of
    `previous_id` move to `patient`), or an arrival (A10: items marked ARRIVED)."""

    event: str
    patient: Patient
    previous_id: str = ""
    previous_issuer: str = ""


@dataclass
class Ignored:
    """A message acknowledged AA that changes nothing (an ADT event we have no use for)."""

    reason: str


# --- Order control (ORC-1) and order status (ORC-5) -------------------------------------------

# fmt: off
ORDER_CONTROL_TABLE: tuple[tuple[tuple[str, ...], tuple[str, ...], Action, str], ...] = (
    # ORC-1          ORC-5              action            SPS status
    (("NW",),        ("SC", "IP", ""),  Action.SCHEDULE,  "SCHEDULED"),
    (("XO",),        ("SC", ""),        Action.SCHEDULE,  "SCHEDULED"),
    (("XO", "SC"),   ("IP",),           Action.STATUS,    "STARTED"),
    (("XO", "SC"),   ("CM",),           Action.REMOVE,    "COMPLETED"),
    (("CA", "OC"),   ("CA", ""),        Action.REMOVE,    "CANCELED"),
    (("DC", "OD"),   ("CA", "DC", ""),  Action.REMOVE,    "DISCONTINUED"),
    (("SC",),        ("A",),            Action.STATUS,    "ARRIVED"),
)
# fmt: on
_ORDER_CONTROL: dict[tuple[str, str], tuple[Action, str]] = {
    (control, status): (action, sps_status)
    for controls, statuses, action, sps_status in ORDER_CONTROL_TABLE
    for control in controls
    for status in statuses
}
_KNOWN_CONTROLS = frozenset(c for row in ORDER_CONTROL_TABLE for c in row[0])


# Outside strict mode, order controls that read as one of the table's: XR ("changed as
# requested", the filler's confirmation of a change) as XO, SN ("send order number", an order
# the filler created) as NW.
ORDER_CONTROL_ALIASES = {"XR": "XO", "SN": "NW"}


def order_control(
    control: str,
    status: str,
    orc: Segment | None = None,
    strict: bool = True,
    notes: list[str] | None = None,
) -> tuple[Action, str]:
    """(action, SPS status) for ORC-1 and ORC-5; HL7Error 103 for a combination not in the table.
    With `strict` off, combinations whose meaning is clear are read too, each with a note: an
    alias (ORDER_CONTROL_ALIASES), NW whatever ORC-5 says, SC with ORC-5 SC as an update."""
    found = _ORDER_CONTROL.get((control, status))
    if found is not None:
        return found
    seq = orc.occurrence if orc is not None else 1
    if not strict:
        notes = notes if notes is not None else []
        read_as = ORDER_CONTROL_ALIASES.get(control, control)
        if read_as != control:
            notes.append(f"ORC^{seq}^1: order control {control} read as {read_as}")
            found = _ORDER_CONTROL.get((read_as, status))
            if found is not None:
                return found
        if read_as == "NW":
            notes.append(f"ORC^{seq}^5: order status {status!r} ignored for a new order")
            return Action.SCHEDULE, "SCHEDULED"
        if (read_as, status) == ("SC", "SC"):
            notes.append(f"ORC^{seq}^5: SC with order status SC read as an update")
            return Action.SCHEDULE, "SCHEDULED"
    if control not in _KNOWN_CONTROLS:
        raise HL7Error(
            TABLE_VALUE_NOT_FOUND, f"ORC^{seq}^1", f"order control {control!r} is not supported"
        )
    raise HL7Error(
        TABLE_VALUE_NOT_FOUND,
        f"ORC^{seq}^5",
        f"order status {status!r} is not valid with order control {control}",
    )


# --- The field map ----------------------------------------------------------------------------

# One row per DICOM attribute: where it comes from in ORM^O01 / OMG^O19 and in OMI^O23 ("=": the
# same), the first non-empty source winning, and how the HL7 value is read (mapping.KINDS).
# "" means no source. A location without a component is its first component.
# fmt: off
ORDER_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    # DICOM keyword                             ORM, OMG         OMI              kind
    ("PlacerOrderNumberImagingServiceRequest", "ORC-2 OBR-2",   "=",             "text"),
    ("FillerOrderNumberImagingServiceRequest", "ORC-3 OBR-3",   "=",             "text"),
    ("AccessionNumber",                        "OBR-18",        "IPC-1",         "text"),
    ("RequestedProcedureID",                   "OBR-19",        "IPC-2",         "text"),
    ("StudyInstanceUID",                       "ZDS-1",         "IPC-3",         "text"),
    ("ScheduledProcedureStepID",               "OBR-20",        "IPC-4",         "text"),
    ("Modality",                               "OBR-24",        "IPC-5 OBR-24",  "upper"),
    ("ScheduledStationName",                   "",              "IPC-7",         "text"),
    ("ScheduledProcedureStepLocation",         "",              "IPC-8",         "text"),
    ("ScheduledStationAETitle",                "",              "IPC-9",         "repeats"),
    ("RequestingPhysician",                    "ORC-12 OBR-16", "=",             "xcn"),
    ("ScheduledPerformingPhysicianName",       "OBR-34",        "=",             "ndl"),
    ("ReferringPhysicianName",                 "PV1-8",         "=",             "xcn"),
    ("CurrentPatientLocation",                 "PV1-3",         "=",             "text"),
    ("PatientState",                           "OBR-12",        "=",             "cwe-text"),
    ("MedicalAlerts",                          "OBR-13",        "=",             "text"),
    ("PatientTransportArrangements",           "OBR-30",        "=",             "text"),
    ("ReasonForTheRequestedProcedure",         "OBR-31",        "=",             "cwe-text"),
    ("RequestedProcedurePriority",             "TQ1-9 ORC-7.6 OBR-27.6", "=",    "priority"),
    # the start (also sets ...StartTime and TimezoneOffsetFromUTC); OBR-36 (scheduled date/time)
    # and ORC-15 (order effective date/time), with a note, for senders that put it nowhere else
    # and OBR-6 (requested) or OBR-7 (observation date/time) last, also with a note
    ("ScheduledProcedureStepStartDate", "TQ1-7 ORC-7.4 OBR-27.4 OBR-36 ORC-15 OBR-6 OBR-7", "=",
     "dtm"),
    # code sequences also set their description (RequestedProcedureDescription, ...Description)
    ("RequestedProcedureCodeSequence",         "OBR-44 OBR-4",  "=",             "procedure"),
    ("ScheduledProtocolCodeSequence",          "OBR-4",         "IPC-6 OBR-4",   "protocol"),
)
# fmt: on

# ORC-7.6 / TQ1-9 priority codes (HL7 table 0027) -> RequestedProcedurePriority
PRIORITIES = {"S": "STAT", "A": "HIGH", "P": "HIGH", "C": "HIGH", "R": "ROUTINE", "T": "MEDIUM"}
# PID-8 (HL7 table 0001) -> PatientSex
SEXES = {"F": "F", "M": "M", "O": "O", "A": "O", "N": "O"}
DESCRIPTION_OF = {
    "RequestedProcedureCodeSequence": "RequestedProcedureDescription",
    "ScheduledProtocolCodeSequence": "ScheduledProcedureStepDescription",
}
# order segments that belong to one ORC group
_GROUP_SEGMENTS = frozenset({"ORC", "TQ1", "TQ2", "OBR", "IPC", "ZDS", "OBX", "NTE", "CTD", "DG1"})
# message type -> (trigger, versions)
ORDER_MESSAGES = {
    "ORM": ("O01", ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")),
    "OMI": ("O23", ("2.5", "2.5.1")),  # HL7 2.4 has neither OMI^O23 nor IPC
    "OMG": ("O19", ("2.4", "2.5", "2.5.1")),
}
ADT_EVENTS = ("A08", "A31", "A40", "A47", "A10")
# PID/PV1 quantities seen in OBX (LOINC code or text of OBX-3) -> DICOM keyword
_OBX_MEASURES = {
    "3141-9": "PatientWeight",
    "29463-7": "PatientWeight",
    "body weight": "PatientWeight",
    "8302-2": "PatientSize",
    "body height": "PatientSize",
}
_UNIT_FACTORS = {
    "PatientWeight": {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "[lb_av]": 0.45359237},
    "PatientSize": {"m": 1.0, "cm": 0.01, "mm": 0.001, "in": 0.0254, "[in_i]": 0.0254},
}
# a fixed namespace: the same order identity always gives the same Study Instance UID
_STUDY_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:wlbridge:study-instance-uid")
_DTM = re.compile(
    r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?([+-]\d{4})?"
)


@lru_cache(maxsize=256)
def parse_location(text: str) -> tuple[str, int, int]:
    """`OBR-27.4` -> ("OBR", 27, 4)."""
    segment, _, rest = text.partition("-")
    field_text, _, component = rest.partition(".")
    return segment, int(field_text), int(component or 1)


# checked against the attribute registry at import: a row it lacks fails here, not per message
DEFAULT_ROWS: tuple[Row, ...] = default_rows(ORDER_FIELDS)


def field_rows(settings: Settings) -> tuple[Row, ...]:
    """The rows in effect: the built-in ones with the site's `[mapping]` and `[code-tables]`."""
    return effective_rows(DEFAULT_ROWS, settings.mapping, settings.code_tables)


def err_location(segment: Segment, field_no: int, component: int = 1, repetition: int = 1) -> str:
    """ERR-2 location `SEG^sequence^field[^repetition^component]`."""
    location = f"{segment.name}^{segment.occurrence}^{field_no}"
    if component > 1 or repetition > 1:
        location += f"^{repetition}^{component}"
    return location


# --- Names ------------------------------------------------------------------------------------


def _pn_component(text: str) -> str:
    # PN separators inside a decoded HL7 component would shift the name's parts
    return text.replace("^", " ").replace("=", " ").replace("\\", " ").strip()


def pn(family: str, given: str = "", middle: str = "", prefix: str = "", suffix: str = "") -> str:
    """A DICOM PN (family^given^middle^prefix^suffix) without trailing empty components."""
    parts = [_pn_component(p) for p in (family, given, middle, prefix, suffix)]
    return "^".join(parts).rstrip("^")


def xpn_to_pn(components: list[str]) -> str:
    """XPN family^given^middle^suffix^prefix^degree -> PN family^given^middle^prefix^suffix."""
    c = components + [""] * (6 - len(components))
    suffix = " ".join(p for p in (c[3], c[5]) if p)  # the degree (MD, PhD) joins the suffix
    return pn(c[0], c[1], c[2], c[4], suffix)


def xcn_to_pn(components: list[str]) -> str:
    """XCN id^family^given^middle^suffix^prefix^degree -> PN family^given^middle^prefix^suffix."""
    c = components + [""] * (7 - len(components))
    return xpn_to_pn(c[1:7])


# --- Small readers ----------------------------------------------------------------------------


def parse_dtm(text: str, location: str) -> tuple[str, str, str]:
    """HL7 DTM `YYYYMMDD[HH[MM[SS[.S]]]][+/-ZZZZ]` -> (DA, TM, UTC offset or ""); HL7Error 102."""
    match = _DTM.fullmatch(text.strip())
    if match is None:
        raise HL7Error(
            DATA_TYPE_ERROR, location, f"{text!r} is not an HL7 date/time (YYYYMMDD[HHMM[SS]])"
        )
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0)
        )
        if offset and (int(offset[1:3]) > 14 or int(offset[3:5]) > 59):
            raise ValueError(offset)
    except ValueError:
        raise HL7Error(DATA_TYPE_ERROR, location, f"{text!r} is not a valid date/time") from None
    date = year + month + day
    # a date without a time is scheduled for the start of that day (the start time is Type 1)
    time = (hour or "00") + (minute or "00") + (second or "00")
    if fraction:
        time += "." + fraction
    return date, time, offset or ""


def _code_item(value: str, meaning: str, scheme: str) -> dict[str, str]:
    # a code without its coding scheme is a local one (PS3.16: local schemes start with 99)
    return {
        "CodeValue": value,
        "CodingSchemeDesignator": scheme or "99LOCAL",
        "CodeMeaning": meaning or value,
    }


def _select_cwe(components: list[str], source: str) -> tuple[str, str, str]:
    """(code, meaning, scheme) from a CE/CWE: primary (1-3), alternate (4-6) or alternate-first."""
    c = components + [""] * (6 - len(components))
    primary, alternate = (c[0], c[1], c[2]), (c[3], c[4], c[5])
    if source == "primary":
        return primary
    if source == "alternate":
        return alternate
    return alternate if alternate[0] else primary


# --- Reading one order step --------------------------------------------------------------------


@dataclass
class _Group:
    """The segments of one ORC group (the step's IPC is chosen per step)."""

    orc: Segment
    tq1: Segment | None = None
    obr: Segment | None = None
    zds: Segment | None = None
    ipcs: list[Segment] = field(default_factory=list)
    obxs: list[Segment] = field(default_factory=list)
    last: int = 0  # position of the group's last segment


class _StepReader:
    """Reads the field map for one step from the segments in scope."""

    def __init__(
        self, message: HL7Message, group: _Group, ipc: Segment | None, settings: Settings
    ) -> None:
        self.message = message
        self.settings = settings
        self.scope: dict[str, Segment | None] = {
            "MSH": message.msh,
            "PID": message.first("PID"),
            "PV1": message.first("PV1"),
            "ORC": group.orc,
            "TQ1": group.tq1,
            "OBR": group.obr,
            "ZDS": group.zds,
            "IPC": ipc,
        }
        self.values: dict = {}
        self.locations: dict[str, str] = {}

    def first(self, sources: tuple[tuple[str, int, int], ...]) -> tuple[str, str, Segment | None]:
        """(value, location, segment) of the first non-empty source."""
        for name, field_no, component in sources:
            segment = self.scope.get(name)
            if segment is None:
                continue
            value = segment.value(field_no, component).strip()
            if value:
                return value, err_location(segment, field_no, component), segment
        return "", "", None

    def first_components(self, sources: tuple[tuple[str, int, int], ...]) -> tuple[list[str], str]:
        for name, field_no, _ in sources:
            segment = self.scope.get(name)
            if segment is None:
                continue
            components = [c.strip() for c in segment.components(field_no)]
            if any(components):
                return components, err_location(segment, field_no)
        return [], ""

    def set(self, keyword: str, value, location: str) -> None:
        self.values[keyword] = value
        if location:
            self.locations[keyword] = location

    def read(self, keyword: str, sources: tuple[tuple[str, int, int], ...], kind: str) -> None:
        reader = getattr(self, "_" + kind.replace("-", "_"))
        reader(keyword, sources)

    def translate(self, keyword: str, codes: tuple[tuple[str, str], ...]) -> None:
        """The site's code table applied to the value just read (each value, if several)."""
        value = self.values.get(keyword, "")
        if isinstance(value, list):
            self.values[keyword] = [translate(v, codes) for v in value]
        elif isinstance(value, str):
            self.values[keyword] = translate(value, codes)

    def _text(self, keyword: str, sources) -> None:
        value, location, _ = self.first(sources)
        self.set(keyword, value, location)

    def _upper(self, keyword: str, sources) -> None:
        value, location, _ = self.first(sources)
        self.set(keyword, value.upper(), location)

    def _cwe_text(self, keyword: str, sources) -> None:
        # a coded element as text: its text (component 2), else its code
        components, location = self.first_components(sources)
        c = components + ["", ""]
        self.set(keyword, c[1] or c[0], location)

    def _repeats(self, keyword: str, sources) -> None:
        for name, field_no, component in sources:
            segment = self.scope.get(name)
            if segment is None:
                continue
            values = [segment.leaf(rep, component).strip() for rep in segment.repetitions(field_no)]
            values = [v for v in values if v]
            if values:
                self.set(keyword, values, err_location(segment, field_no))
                return
        self.set(keyword, [], "")

    def _xcn(self, keyword: str, sources) -> None:
        components, location = self.first_components(sources)
        self.set(keyword, xcn_to_pn(components) if components else "", location)

    def _ndl(self, keyword: str, sources) -> None:
        # OBR-34 is NDL (its name in subcomponents id&family&given...) from v2.4, XCN-like before
        for name, field_no, _ in sources:
            segment = self.scope.get(name)
            if segment is None or not segment.raw(field_no):
                continue
            delims = self.message.delimiters
            first = segment.repetitions(field_no)[0].split(delims.component)[0]
            if delims.subcomponent in first:
                parts = [segment.unescape(p) for p in first.split(delims.subcomponent)]
                value = xcn_to_pn(parts)
            else:
                value = xcn_to_pn(segment.components(field_no))
            self.set(keyword, value, err_location(segment, field_no))
            return
        self.set(keyword, "", "")

    def _priority(self, keyword: str, sources) -> None:
        code, location, _ = self.first(sources)
        priority = PRIORITIES.get(code.upper(), "")
        if code and not priority:
            # priority is Type 2: an unknown code leaves it empty rather than refusing the order
            self.message.notes.append(f"{location}: unknown priority {code!r}, left empty")
        self.set(keyword, priority, location)

    def _dtm(self, keyword: str, sources) -> None:
        for index, (name, field_no, component) in enumerate(sources):
            segment = self.scope.get(name)
            text = segment.value(field_no, component).strip() if segment is not None else ""
            if not text:
                continue
            if index >= 5 and self.settings.strict:
                break  # OBR-6 / OBR-7: what was requested or observed, not a schedule
            location = err_location(segment, field_no, component)
            if not self.settings.strict and (fixed := loose_dtm(text)):
                self.message.notes.append(f"{location}: {text!r} read as the DTM {fixed}")
                text = fixed
            date, time, offset = parse_dtm(text, location)
            if index >= 3:  # OBR-36, ORC-15, OBR-6, OBR-7: not where the standard puts it
                self.message.notes.append(f"scheduled start taken from {location}")
            self.set(keyword, date, location)
            self.set("ScheduledProcedureStepStartTime", time, location)
            self.set("TimezoneOffsetFromUTC", offset, location if offset else "")
            return
        self.set(keyword, "", "")
        self.set("ScheduledProcedureStepStartTime", "", "")
        self.set("TimezoneOffsetFromUTC", "", "")

    def _procedure(self, keyword: str, sources) -> None:
        components, location = self.first_components(sources)
        code, meaning, scheme = _select_cwe(components, "primary")
        if not code and not meaning:
            code, meaning, scheme = _select_cwe(components, "alternate")
        self._set_code(keyword, code, meaning, scheme, location)

    def _protocol(self, keyword: str, sources) -> None:
        components, location = self.first_components(sources)
        # the setting chooses OBR-4's components; IPC-6 is the protocol code itself
        source = self.settings.protocol_code_source if location.startswith("OBR") else "primary"
        code, meaning, scheme = _select_cwe(components, source)
        if not code:
            # no code in the chosen components: the description still names the step
            c = components + [""] * 6
            meaning = meaning or c[1] or c[4]
        self._set_code(keyword, code, meaning, scheme, location)

    def _set_code(self, keyword: str, code: str, meaning: str, scheme: str, location: str) -> None:
        if len(code) > _SH_MAX and not self.settings.strict:
            # Longer than a DICOM code value (SH) can be: free text where the code goes (some
            # senders write only the procedure's name in OBR-4.1). It describes; it codes nothing.
            note = f"{location}: {code[:40]!r} is too long for a code; used as the description"
            if note not in self.message.notes:  # OBR-4 feeds the procedure and the protocol
                self.message.notes.append(note)
            code, meaning = "", meaning or code
        items = [_code_item(code, meaning, scheme)] if code else []
        self.set(keyword, items, location)
        self.set(DESCRIPTION_OF[keyword], meaning or code, location)


def check_station_rules(rules: list[StationRule]) -> None:
    """ValueError for a rule that could never work: a bad location or regular expression.
    Meant for start-up, so that a typo fails there rather than on every message."""
    for n, rule in enumerate(rules, start=1):
        for location, expected in rule.match.items():
            try:
                parse_location(location)
            except ValueError:
                raise ValueError(
                    f"station rule {n}: {location!r} is not like OBR-24 or PV1-3.1"
                ) from None
            if len(expected) >= 2 and expected.startswith("/") and expected.endswith("/"):
                try:
                    re.compile(expected[1:-1])
                except re.error as exc:
                    raise ValueError(f"station rule {n}: bad expression {expected}: {exc}") from exc


def _rule_matches(rule: StationRule, reader: _StepReader) -> bool:
    for location, expected in rule.match.items():
        value, _, _ = reader.first((parse_location(location),))
        if len(expected) >= 2 and expected.startswith("/") and expected.endswith("/"):
            if re.search(expected[1:-1], value) is None:
                return False
        elif value != expected:
            return False
    return True


def _apply_station_rules(reader: _StepReader, settings: Settings) -> None:
    """IPC-9 wins; otherwise the first matching station rule sets the AE titles and name;
    otherwise the bridge's own AE title (the key is Type 1: wlmscpfs skips items without it)."""
    if reader.values.get("ScheduledStationAETitle"):
        return
    for rule in settings.station_rules:
        if _rule_matches(rule, reader) and rule.ae_titles:
            reader.set("ScheduledStationAETitle", list(rule.ae_titles), "")
            if rule.station_name and not reader.values.get("ScheduledStationName"):
                reader.set("ScheduledStationName", rule.station_name, "")
            return
    reader.set("ScheduledStationAETitle", [settings.ae_title], "")
    if settings.station_rules:  # rules exist but none fits this order: worth a look
        reader.message.notes.append(
            f"no station rule matches: scheduled station AE title {settings.ae_title}"
        )


def _order_key(values: dict, orc: Segment, obr: Segment | None = None) -> str:
    """The order's stable key: accession number, else placer, else filler order number."""
    if values.get("AccessionNumber"):
        return "acc:" + values["AccessionNumber"]
    # the placer/filler number with its namespace (EI: number^namespace)
    for field_no, label in ((2, "placer"), (3, "filler")):
        number = orc.value(field_no, 1)
        if number:
            return f"{label}:{number}^{orc.value(field_no, 2)}"
    if obr is not None:  # ORC-2 and ORC-3 empty: OBR-2 / OBR-3 carry the same numbers
        for field_no, label in ((2, "placer"), (3, "filler")):
            number = obr.value(field_no, 1)
            if number:
                return f"{label}:{number}^{obr.value(field_no, 2)}"
    return ""


_SH_MAX = 16  # RequestedProcedureID and ScheduledProcedureStepID are SH
_PLAUSIBLE_UID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def _implausible_uid(value: str) -> bool:
    """Digits that pass for a UID's syntax but cannot be an OID (`987861`: an accession number
    in ZDS-1). What breaks the syntax (`1.2.03.x`) stays an error (AE 102)."""
    return bool(re.fullmatch(r"[0-9.]+", value)) and not _PLAUSIBLE_UID.fullmatch(value)


def _default_ids(reader: _StepReader, rp_location: str, sps_location: str) -> bool:
    """Fill an empty Requested Procedure ID (from the accession number, else the filler, else
    the placer order number: the first that fits SH) and Scheduled Procedure Step ID (the RP
    ID, or `1`), each with a note. Real ORM feeds often fill only OBR-18 or ORC-2/ORC-3; the
    same order always gets the same IDs. True when either was made up."""
    values, notes = reader.values, reader.message.notes
    defaulted = False
    if not values.get("RequestedProcedureID"):
        sources = (
            ("AccessionNumber", "the accession number"),
            ("FillerOrderNumberImagingServiceRequest", "the filler order number"),
            ("PlacerOrderNumberImagingServiceRequest", "the placer order number"),
        )
        candidate, label = next(
            (
                (values[keyword], label)
                for keyword, label in sources
                if values.get(keyword) and len(values[keyword]) <= _SH_MAX
            ),
            ("1", "none of the order numbers fits 16 characters"),
        )
        reader.set("RequestedProcedureID", candidate, rp_location)
        notes.append(f"{rp_location} empty: requested procedure ID {candidate!r} ({label})")
        defaulted = True
    if not values.get("ScheduledProcedureStepID"):
        rp_id = values["RequestedProcedureID"]
        sps_id = rp_id if len(rp_id) <= _SH_MAX else "1"
        reader.set("ScheduledProcedureStepID", sps_id, sps_location)
        notes.append(f"{sps_location} empty: scheduled procedure step ID {sps_id!r}")
        defaulted = True
    return defaulted


# PS3.3 C.7.3.1.1.1: the defined terms of Modality (current ones, and retired ones still sent)
DICOM_MODALITIES = frozenset(
    "ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID "
    "GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF "
    "OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD "
    "RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL "
    "XC AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS ST VF".split()
)


def _check_modality(reader: _StepReader, obr: Segment) -> None:
    """A Modality that is not a DICOM defined term is named in the log (a modality filtering
    on its own term will not see the item). Some senders put the term in OBR-21 (filler field
    1) and a department in OBR-24: a defined term there is used instead, with a note."""
    values, notes = reader.values, reader.message.notes
    modality = values.get("Modality", "")
    if modality in DICOM_MODALITIES:
        return
    other = obr.value(21, 1).strip().upper()
    if other in DICOM_MODALITIES:
        where = f"OBR^{obr.occurrence}^21"
        shown = (
            f"{modality!r} in {reader.locations.get('Modality', 'OBR-24')}" if modality else "none"
        )
        notes.append(f"modality {other} taken from {where} (OBR-24: {shown})")
        reader.set("Modality", other, where)
        return
    if modality:
        location = reader.locations.get("Modality", "")
        notes.append(f"{location}: modality {modality!r} is not a DICOM defined term")


def derive_study_uid(order_key: str, requested_procedure_id: str) -> str:
    """A `2.25.<int>` UID from a name-based UUID of the order's stable identifiers."""
    name = f"{order_key}|{requested_procedure_id}"
    return "2.25." + str(uuid.uuid5(_STUDY_UID_NAMESPACE, name).int)


def _require(reader: _StepReader, keyword: str, default_location: str, what: str) -> None:
    if not reader.values.get(keyword):
        raise HL7Error(REQUIRED_FIELD_MISSING, default_location, f"{what} is empty")


def _read_step(
    message: HL7Message, group: _Group, ipc: Segment | None, omi: bool, settings: Settings
) -> ProcedureStep:
    orc = group.orc
    control = orc.value(1).strip().upper()
    status = orc.value(5).strip().upper()
    action, sps_status = order_control(control, status, orc, settings.strict, message.notes)
    if group.obr is None:
        raise HL7Error(
            SEGMENT_SEQUENCE_ERROR,
            f"ORC^{orc.occurrence}",
            f"the order at segment {orc.position} has no OBR segment",
        )
    reader = _StepReader(message, group, ipc, settings)
    for row in field_rows(settings):
        reader.read(row.keyword, row.omi_sources if omi else row.orm_sources, row.kind)
        if row.codes:
            reader.translate(row.keyword, row.codes)
    values = reader.values

    obr = group.obr
    place = ipc if omi else obr

    def where(orm_field: int, omi_field: int) -> str:
        return f"{place.name}^{place.occurrence}^{omi_field if omi else orm_field}"

    ids_defaulted = False
    if not settings.strict:
        ids_defaulted = _default_ids(reader, where(19, 2), where(20, 4))
    _require(reader, "RequestedProcedureID", where(19, 2), "the requested procedure ID")
    _require(reader, "ScheduledProcedureStepID", where(20, 4), "the scheduled procedure step ID")
    order_key = _order_key(values, orc, group.obr)
    if not order_key:
        raise HL7Error(
            REQUIRED_FIELD_MISSING,
            where(18, 1),
            "the order has no accession number and no placer or filler order number",
        )
    identity = (
        f"{order_key}|rp:{values['RequestedProcedureID']}|sps:{values['ScheduledProcedureStepID']}"
    )

    derived = False
    given_uid = values.get("StudyInstanceUID", "")
    if given_uid and not settings.strict and _implausible_uid(given_uid):
        # An accession number or a local study number where the UID goes: images filed under
        # it would match no other system's study. A UID derived from the order is kept instead.
        message.notes.append(
            f"{reader.locations.get('StudyInstanceUID', 'ZDS-1')}: {given_uid[:64]!r} is not "
            "a UID (an OID starts with 0, 1 or 2 and has two arcs or more); UID derived"
        )
        values["StudyInstanceUID"] = ""
    if not values.get("StudyInstanceUID"):
        if omi:
            study_location = f"IPC^{ipc.occurrence}^3"
        else:  # ZDS, or where it would follow the order's last segment
            study_location = f"ZDS^{group.zds.occurrence if group.zds else 1}^1"
        if settings.missing_study_uid == "reject" and action is not Action.REMOVE:
            raise HL7Error(
                REQUIRED_FIELD_MISSING, study_location, "the Study Instance UID is missing"
            )
        values["StudyInstanceUID"] = derive_study_uid(order_key, values["RequestedProcedureID"])
        reader.locations["StudyInstanceUID"] = study_location
        derived = True

    _apply_station_rules(reader, settings)
    if not settings.strict:
        _check_modality(reader, obr)
    if action is not Action.REMOVE:
        # Type 1 return keys: an item without them is dropped by modalities and by wlmscpfs
        _require(reader, "Modality", where(24, 5), "the modality")
        if not values.get("ScheduledProcedureStepStartDate"):
            raise HL7Error(
                REQUIRED_FIELD_MISSING,
                f"TQ1^{group.tq1.occurrence}^7" if group.tq1 else f"ORC^{orc.occurrence}^7",
                "no scheduled start: TQ1-7, ORC-7.4, OBR-27.4, OBR-36 and ORC-15 are empty",
            )
        if not values.get("RequestedProcedureDescription") and not values.get(
            "ScheduledProcedureStepDescription"
        ):
            if settings.strict:
                raise HL7Error(
                    REQUIRED_FIELD_MISSING,
                    f"OBR^{obr.occurrence}^4",
                    "the procedure (OBR-4) is empty",
                )
            # patient, modality and start are there: the modality can do the exam
            message.notes.append(
                f"OBR^{obr.occurrence}^4: no procedure; the item has no description"
            )
    values["ScheduledProcedureStepStatus"] = sps_status
    _read_measures(message, group, values, reader.locations)
    return ProcedureStep(
        order_control=control,
        order_status=status,
        action=action,
        status=sps_status,
        identity=identity,
        accession_number=values.get("AccessionNumber", ""),
        values=values,
        locations=reader.locations,
        study_uid_derived=derived,
        ids_defaulted=ids_defaulted,
    )


def _read_measures(message: HL7Message, group: _Group, values: dict, locations: dict) -> None:
    """Patient weight and size from OBX (LOINC 3141-9, 29463-7, 8302-2), allergies from AL1."""
    own = {id(s) for s in group.obxs}  # the order's own OBX first, then the message's others
    for obx in group.obxs + [s for s in message.all("OBX") if id(s) not in own]:
        c = obx.components(3) + ["", ""]
        keyword = _OBX_MEASURES.get(c[0]) or _OBX_MEASURES.get(c[1].strip().lower())
        if keyword is None or values.get(keyword):
            continue
        unit = obx.value(6).strip().lower()
        factor = _UNIT_FACTORS[keyword].get(unit or ("kg" if keyword == "PatientWeight" else "m"))
        try:
            number = float(obx.value(5)) * factor if factor else None
        except ValueError:
            number = None
        if number is None:
            message.notes.append(f"OBX^{obx.occurrence}^5: {c[1] or c[0]} not understood, ignored")
            continue
        values[keyword] = f"{number:.6g}"
        locations[keyword] = f"OBX^{obx.occurrence}^5"
    allergies = []
    for al1 in message.all("AL1"):
        c = al1.components(3) + ["", ""]
        if c[1] or c[0]:
            allergies.append(c[1] or c[0])
    values["Allergies"] = allergies


# --- Message shapes ---------------------------------------------------------------------------


# Segments that make an order: before the first ORC they cannot be placed (an ORC fused into
# PV1, an OBR without its ORC), so they are refused. The others of an order group (DG1, OBX, CTD,
# TQ2) before the first ORC say nothing about an order: real ORM feeds put DG1 and insurance
# segments in the patient part (2.3's ORM_O01 has no DG1 there).
_ORDER_DEFINING = frozenset({"TQ1", "OBR", "IPC", "ZDS"})


def _groups(message: HL7Message, strict: bool = False) -> list[_Group]:
    groups: list[_Group] = []
    passed_over: list[str] = []
    for segment in message.segments:
        name = segment.name
        if name == "ORC":
            groups.append(_Group(segment, last=segment.position))
            continue
        if name not in _GROUP_SEGMENTS:
            continue
        if not groups:
            if name in ("NTE",):
                continue  # patient notes
            if not strict and name not in _ORDER_DEFINING:
                passed_over.append(f"{name} (segment {segment.position})")
                continue
            raise HL7Error(
                SEGMENT_SEQUENCE_ERROR,
                f"{name}^{segment.occurrence}",
                f"segment {segment.position} ({name}) comes before any ORC",
            )
        group = groups[-1]
        group.last = segment.position
        if name == "TQ1" and group.tq1 is None:
            group.tq1 = segment
        elif name == "OBR":
            if group.obr is not None:
                raise HL7Error(
                    SEGMENT_SEQUENCE_ERROR,
                    f"OBR^{segment.occurrence}",
                    f"a second OBR (segment {segment.position}) in the order of ORC segment "
                    f"{group.orc.position}; each OBR needs its own ORC",
                )
            group.obr = segment
        elif name == "ZDS":
            group.zds = segment
        elif name == "IPC":
            group.ipcs.append(segment)
        elif name == "OBX":
            group.obxs.append(segment)
    if passed_over:
        message.notes.append(
            f"{', '.join(passed_over)} before the first ORC: not part of an order, passed over"
        )
    return groups


def _check_shape(declared: str, groups: list[_Group]) -> None:
    """MSH-9 must match the segments: IPC only in OMI, and OMI needs IPC (not ZDS)."""
    if declared == "OMI":
        for group in groups:
            if group.ipcs:
                continue
            offender = group.zds or group.obr or group.orc
            found = "ORC/OBR/ZDS" if group.zds else "ORC/OBR"
            raise HL7Error(
                SEGMENT_SEQUENCE_ERROR,
                f"{offender.name}^{offender.occurrence}",
                f"MSH-9 declares OMI^O23, but the order at ORC segment {group.orc.position} "
                f"has {found} and no IPC segment (the shape of ORM^O01); found "
                f"{offender.name} at segment {offender.position} where IPC was expected",
            )
    else:
        for group in groups:
            if group.ipcs:
                ipc = group.ipcs[0]
                raise HL7Error(
                    SEGMENT_SEQUENCE_ERROR,
                    f"IPC^{ipc.occurrence}",
                    f"MSH-9 declares {declared}^{ORDER_MESSAGES[declared][0]}, but segment "
                    f"{ipc.position} is IPC, which belongs to OMI^O23",
                )


def _read_order(message: HL7Message, declared: str, settings: Settings) -> OrderMessage:
    pid = message.first("PID")
    if pid is None:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "PID^1", "the message has no PID segment")
    groups = _groups(message, settings.strict)
    if not groups:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "ORC^1", "the message has no ORC segment")
    _check_shape(declared, groups)
    patient = read_patient(message, pid, settings, required=True)
    omi = declared == "OMI"
    steps: list[ProcedureStep] = []
    for group in groups:
        for ipc in group.ipcs if omi else [None]:
            steps.append(_read_step(message, group, ipc, omi, settings))
    trigger = ORDER_MESSAGES[declared][0]
    return OrderMessage(patient=patient, steps=steps, message_type=f"{declared}^{trigger}")


# --- Patients ---------------------------------------------------------------------------------


def _choose_id(segment: Segment, field_no: int, primary_issuer: str) -> tuple[int, str, str]:
    """(repetition, id, issuer) of the CX repetition of the primary issuer, else the first."""
    reps = [
        (i, segment.leaf(rep, 1).strip(), segment.leaf(rep, 4).strip())
        for i, rep in enumerate(segment.repetitions(field_no), start=1)
    ]
    reps = [r for r in reps if r[1]]
    if not reps:
        return 1, "", ""
    if primary_issuer:
        for rep in reps:
            if rep[2] == primary_issuer:
                return rep
    return reps[0]


MAX_OTHER_IDS = 16  # OtherPatientIDsSequence items kept from PID-3's repetitions


def read_patient(
    message: HL7Message, pid: Segment, settings: Settings, required: bool = True
) -> Patient:
    """The patient of PID (and the visit's admission ID from PV1-19, else PID-18)."""
    rep, patient_id, issuer = _choose_id(pid, 3, settings.primary_issuer)
    id_field = 3
    if not patient_id and settings.pid2_as_patient_id and not settings.strict:
        # PID-2 is kept "for backward compatibility" since 2.3.1; some senders still use it
        _, patient_id, issuer = _choose_id(pid, 2, "")
        if patient_id:
            id_field = 2
            message.notes.append(f"PID^{pid.occurrence}^3 empty: patient ID taken from PID-2")
    if required and not patient_id:
        raise HL7Error(
            REQUIRED_FIELD_MISSING, f"PID^{pid.occurrence}^3", "PID-3 (patient ID) is empty"
        )
    others: dict[tuple[str, str], None] = {}  # ordered and without repeats
    repetitions = pid.repetitions(3)
    for i, text in enumerate(repetitions, start=1):
        other = (pid.leaf(text, 1).strip(), pid.leaf(text, 4).strip())
        if i != rep and other[0]:
            others[other] = None
            if len(others) == MAX_OTHER_IDS:
                break
    if len(others) == MAX_OTHER_IDS and len(repetitions) > MAX_OTHER_IDS + 1:
        # Every item carries them to every C-FIND answer: a real patient has a handful.
        message.notes.append(
            f"PID-3 has {len(repetitions)} repetitions; the first {MAX_OTHER_IDS} other IDs kept"
        )
    name = xpn_to_pn(pid.components(5))
    if required and not name:
        raise HL7Error(
            REQUIRED_FIELD_MISSING, f"PID^{pid.occurrence}^5", "PID-5 (patient name) is empty"
        )
    birth = pid.value(7).strip()
    if not settings.strict and (fixed := loose_dtm(birth)):
        message.notes.append(f"PID^{pid.occurrence}^7: {birth!r} read as {fixed[:8]}")
        birth = fixed
    birth = birth_date(birth, f"PID^{pid.occurrence}^7", message, settings.strict)
    address = "^".join(c.strip() for c in pid.components(11)).rstrip("^")
    pv1 = message.first("PV1")
    admission, admission_location = "", ""
    if pv1 is not None and pv1.value(19).strip():
        admission, admission_location = pv1.value(19).strip(), f"PV1^{pv1.occurrence}^19"
    elif pid.value(18).strip():
        admission, admission_location = pid.value(18).strip(), f"PID^{pid.occurrence}^18"
    p = pid.occurrence
    locations = {
        "PatientID": f"PID^{p}^{id_field}" + (f"^{rep}^1" if rep > 1 else ""),
        "IssuerOfPatientID": f"PID^{p}^{id_field}^{rep}^4",
        "OtherPatientIDsSequence": f"PID^{p}^3",
        "PatientName": f"PID^{p}^5",
        "PatientBirthDate": f"PID^{p}^7",
        "PatientSex": f"PID^{p}^8",
        "PatientAddress": f"PID^{p}^11",
        "AdmissionID": admission_location,
    }
    return Patient(
        patient_id=patient_id,
        issuer=issuer,
        other_ids=list(others),
        name=name,
        birth_date=birth,
        sex=SEXES.get(pid.value(8).strip().upper(), ""),
        address=address,
        admission_id=admission,
        locations=locations,
    )


def birth_date(value: str, location: str, message: HL7Message, strict: bool) -> str:
    """PID-7 as DICOM DA. A birth date that is not a date (`1990505`, `19801301`) is left out
    with a note: the item is usable without one, and refusing would lose the order (Patient's
    Birth Date is type 2 in the worklist). Strict: AE 102."""
    birth = value[:8]
    try:
        if birth and not (len(birth) == 8 and birth.isdigit()):
            raise HL7Error(DATA_TYPE_ERROR, location, f"birth date {birth!r} is not YYYYMMDD")
        if birth:
            parse_dtm(birth, location)
    except HL7Error:
        if strict:
            raise
        message.notes.append(f"{location}: birth date {value!r} is not a date; left empty")
        return ""
    return birth


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
        setattr(patient, attribute, fit(getattr(patient, attribute), keyword, location, message,
                                         settings))  # fmt: skip
    location = patient.locations.get("OtherPatientIDsSequence", "")
    patient.other_ids = [
        (
            fit(pid, "PatientID", location, message, settings),
            fit(issuer, "IssuerOfPatientID", location, message, settings),
        )
        for pid, issuer in patient.other_ids
    ]


def _read_adt(message: HL7Message, trigger: str, settings: Settings) -> PatientUpdate | Ignored:
    if trigger not in ADT_EVENTS:
        return Ignored(f"ADT^{trigger} is not used by the worklist")
    pid = message.first("PID")
    if pid is None:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "PID^1", "the message has no PID segment")
    patient = read_patient(message, pid, settings)
    # ADT values go into existing items: check their lengths now, under the same policy
    fit_patient(patient, message, settings)
    update = PatientUpdate(event=trigger, patient=patient)
    if trigger in ("A40", "A47"):
        mrg = message.first("MRG")
        if mrg is None:
            raise HL7Error(
                SEGMENT_SEQUENCE_ERROR,
                "MRG^1",
                f"ADT^{trigger} has no MRG segment (the previous patient identifier)",
            )
        _, previous_id, previous_issuer = _choose_id(mrg, 1, settings.primary_issuer)
        if not previous_id:
            raise HL7Error(
                REQUIRED_FIELD_MISSING,
                f"MRG^{mrg.occurrence}^1",
                "MRG-1 (the previous patient identifier) is empty",
            )
        update.previous_id, update.previous_issuer = previous_id, previous_issuer
    return update


# --- Entry point ------------------------------------------------------------------------------


def read_message(message: HL7Message, settings: Settings) -> OrderMessage | PatientUpdate | Ignored:
    """What the message asks of the worklist. Raises HL7Error for anything not applied."""
    check_supported(message)
    kind = message.header.message_type.upper()
    trigger = message.header.trigger_event.upper()
    if kind == "ADT":
        return _read_adt(message, trigger, settings)
    return _read_order(message, kind, settings)


def check_supported(message: HL7Message) -> None:
    """AR 200/201/203 for a message type, trigger or version this bridge does not process.
    Every ADT trigger is accepted (those without use are acknowledged and ignored)."""
    kind = message.header.message_type.upper()
    trigger = message.header.trigger_event.upper()
    if kind == "ADT":
        return
    if kind not in ORDER_MESSAGES:
        raise HL7Error(
            UNSUPPORTED_MESSAGE_TYPE,
            "MSH^1^9",
            f"message type {kind or '(empty)'} is not supported "
            "(ORM^O01, OMI^O23, OMG^O19 and ADT are)",
            "AR",
        )
    expected, versions = ORDER_MESSAGES[kind]
    if trigger != expected:
        raise HL7Error(
            UNSUPPORTED_EVENT_CODE,
            "MSH^1^9^1^2",
            f"{kind}^{trigger or '(empty)'} is not supported ({kind}^{expected} is)",
            "AR",
        )
    if message.version and message.version not in versions:
        raise HL7Error(
            UNSUPPORTED_VERSION_ID,
            "MSH^1^12",
            f"{kind}^{expected} is not supported in version {message.version} "
            f"({', '.join(versions)})",
            "AR",
        )
