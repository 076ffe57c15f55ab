"""What a message must look like in its HL7 version, checked in microseconds.

hl7apy's reference structures (message structures, segment fields with datatype and cardinality)
are the authority, but parsing with hl7apy costs ~15 ms a message. So each structure is compiled
once, at first use, into a small grammar and field tables (cached per version and structure),
and the tokenized message is checked against those.

Rules (see docs/hl7.md for the reasons):
- Header: the original-mode acceptance edits of HL7 v2.5.1 2.9.2 in the standard's order, message
  type (presence only: its support is the order module's), version, processing ID, all AR;
  then MSH-7 and MSH-10, AE. Outside strict mode, what the worklist does not use is a note (an
  empty MSH-10 or MSH-11, an MSH-7 that is not a DTM) and a version is read with the nearest
  rules we have (`rules_version`).
- Structure: the place and cardinality of the segments the bridge reads (`READ_SEGMENTS`) are
  checked against the version's structure; other segments (NTE, OBX, EVN...) are passed over, as
  are Z-segments anywhere after MSH, except that a ZDS must follow the OBR of its order.
  `strict=True` checks every segment instead.
- Fields: fields the bridge reads that the version defines as required must not be empty (101),
  and the date/times it reads must be well-formed DTM (102).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from functools import cache

from hl7apy import load_library, load_reference

from bridge.config import SUPPORTED_VERSIONS, Settings
from bridge.hl7.errors import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_PROCESSING_ID,
    UNSUPPORTED_VERSION_ID,
    HL7Error,
)
from bridge.hl7.message import HL7Message, Segment, loose_dtm

# Segments whose content the worklist mapping reads: their place in the message decides which
# order, patient or visit a value belongs to.
READ_SEGMENTS = frozenset({"MSH", "PID", "PV1", "ORC", "TQ1", "OBR", "IPC", "MRG"})
# Read, but the bridge does without: real ADT^A31 messages often have no PV1.
NOT_DEMANDED = frozenset({"PV1"})

# Fields the mapping reads, per segment; a required one (per hl7apy) must not be empty. The value
# is the component that must be filled (0: any content of the field).
READ_FIELDS: dict[str, dict[int, int]] = {
    "PID": {3: 1, 5: 0, 7: 0, 8: 0, 11: 0, 18: 0},
    "PV1": {8: 0, 19: 0},
    "ORC": {1: 0, 2: 0, 3: 0, 5: 0, 7: 0, 12: 0},
    "TQ1": {7: 0, 9: 0},
    "OBR": {n: 0 for n in (2, 3, 4, 13, 16, 18, 19, 20, 24, 27, 30, 31, 34, 44)},
    "IPC": {n: 0 for n in range(1, 10)},
    "MRG": {1: 1},
}
# Date/times the mapping reads: (segment, field, component of the field).
READ_DATES = (("PID", 7, 1), ("TQ1", 7, 1), ("ORC", 7, 4), ("OBR", 27, 4))

# HL7 table 0354 (event -> message structure) for the messages the bridge handles; hl7apy does not
# carry it. Candidates in order: the first the version defines wins (2.3/2.3.1 have no ADT_A05).
EVENT_STRUCTURES: dict[str, tuple[str, ...]] = {
    "ORM^O01": ("ORM_O01",),
    "OMI^O23": ("OMI_O23",),
    "OMG^O19": ("OMG_O19",),
    **{f"ADT^{e}": ("ADT_A01",) for e in ("A01", "A04", "A08", "A13")},
    **{f"ADT^{e}": ("ADT_A05", "ADT_A01") for e in ("A05", "A14", "A28", "A31")},
    **{f"ADT^{e}": ("ADT_A09",) for e in ("A09", "A10", "A11")},
    **{f"ADT^{e}": ("ADT_A30",) for e in ("A30", "A34", "A35", "A36", "A46", "A47", "A48", "A49")},
    **{f"ADT^{e}": ("ADT_A39",) for e in ("A39", "A40", "A41", "A42")},
}

_UNBOUNDED = 1 << 30


# ---------------------------------------------------------------------------------------------
# Header


# MSH-10 is ST(20) up to 2.5.1 and 199 characters from 2.7; engines exceed 20, so allow 199.
MAX_CONTROL_ID = 199


def validate_header(message: HL7Message, settings: Settings) -> None:
    """MSH checks; raises the first failure as HL7Error. Outside strict mode, header fields the
    worklist does not use (an empty MSH-10 or MSH-11, an MSH-7 that is not a DTM) are notes, and
    the version is read as the nearest one we have rules for (`rules_version`)."""
    h = message.header
    strict = settings.strict
    # HL7 v2.5.1 2.9.2: message type, version and processing ID are the acceptance edits: a
    # failure is a reject (AR). Whether the type is supported is the order module's call.
    if not h.message_type:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH^1^9", "MSH-9 (message type) is empty", "AR")
    if not h.version:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH^1^12", "MSH-12 (version ID) is empty", "AR")
    version, note = rules_version(h.version, strict)
    _require_supported_version(version)
    message.rules_version = version
    if note:
        message.notes.append(note)
    if not strict:
        _read_type_with_its_rules(message)
    if not h.processing_id:
        if strict:
            raise HL7Error(
                REQUIRED_FIELD_MISSING, "MSH^1^11", "MSH-11 (processing ID) is empty", "AR"
            )
        message.notes.append("MSH-11 (processing ID) is empty; read as production")
    elif h.processing_id not in settings.processing_ids:
        raise HL7Error(
            UNSUPPORTED_PROCESSING_ID,
            "MSH^1^11",
            f"processing ID {h.processing_id!r} is not accepted here "
            f"(accepted: {', '.join(settings.processing_ids)})",
            "AR",
        )
    msh7 = message.msh.value(7)
    if not msh7:
        # Required from 2.4 on, but the worklist does not use it: refusing orders over it would
        # only hurt the patient (real feeds omit it). Say so in the log instead.
        if _msh7_required(version):
            message.notes.append(f"MSH-7 is empty (required in HL7 {version}); not used")
    elif problem := dtm_problem(msh7):
        if strict:
            raise HL7Error(DATA_TYPE_ERROR, "MSH^1^7^1^1", f"MSH-7 {msh7!r}: {problem}")
        message.notes.append(f"MSH-7 {msh7[:40]!r} is not an HL7 date/time; not used")
    if not h.control_id:
        if strict:
            raise HL7Error(
                REQUIRED_FIELD_MISSING, "MSH^1^10", "MSH-10 (message control ID) is empty"
            )
        # The ACK's MSA-2 is then empty too; a retry is recognised by the message's digest.
        message.notes.append("MSH-10 (message control ID) is empty")
    if len(h.control_id) > MAX_CONTROL_ID:
        raise HL7Error(
            DATA_TYPE_ERROR,
            "MSH^1^10",
            f"MSH-10 (message control ID) has {len(h.control_id)} characters; "
            f"at most {MAX_CONTROL_ID} are accepted",
        )


_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def rules_version(declared: str, strict: bool = False) -> tuple[str, str]:
    """(version whose rules apply, note) for MSH-12. HL7 v2 is backward compatible, so outside
    strict mode `2.5.0` is 2.5, 2.6 and later get the newest rules we have (2.5.1), and 2.1/2.2
    get 2.3's; anything else is returned as is (and refused as unsupported)."""
    if declared in SUPPORTED_VERSIONS or strict:
        return declared, ""
    match = _VERSION.fullmatch(declared.strip())
    if match is None or match.group(1) != "2":
        return declared, ""
    minor, patch = int(match.group(2)), int(match.group(3) or 0)
    if patch == 0 and f"2.{minor}" in SUPPORTED_VERSIONS:
        version = f"2.{minor}"
    elif (minor, patch) > (5, 1):
        version = SUPPORTED_VERSIONS[-1]
    elif minor < 3:
        version = SUPPORTED_VERSIONS[0]
    else:  # 2.3.2, 2.4.1: the release it amends
        version = f"2.{minor}"
    return version, f"HL7 {declared} read with the rules of {version}"


def _read_type_with_its_rules(message: HL7Message) -> None:
    """OMI^O23 (from 2.5) and OMG^O19 (from 2.4) labelled with an older MSH-12: senders that
    build them with the later segments (TQ1, IPC) but keep their 2.3.1 header. The message says
    what it is; it is read with the newest rules we have for it, with a note (strict: AR 203)."""
    from bridge.hl7.order import ORDER_MESSAGES  # the order module owns the type/version table

    kind = message.header.message_type.upper()
    trigger, versions = ORDER_MESSAGES.get(kind, ("", ()))
    if not versions or message.header.trigger_event.upper() != trigger:
        return
    if message.rules_version in versions:
        return
    message.rules_version = versions[-1]
    message.notes.append(
        f"{kind}^{trigger} does not exist in HL7 {message.header.version}; "
        f"read with the rules of {versions[-1]}"
    )


def _require_supported_version(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise HL7Error(
            UNSUPPORTED_VERSION_ID,
            "MSH^1^12",
            f"HL7 version {version!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_VERSIONS)}, and outside strict mode 2.1, 2.2 "
            "and 2.6 or later)",
            "AR",
        )


@cache
def _msh7_required(version: str) -> bool:
    # Optional in 2.3 and 2.3.1, required from 2.4 on.
    return _field_cardinality("MSH", 7, version)[0] >= 1


# ---------------------------------------------------------------------------------------------
# Structure


@dataclass(frozen=True, slots=True)
class _Node:
    name: str  # segment ID, or group name without the structure prefix
    min: int
    max: int
    children: tuple[_Node, ...] | None  # None for a segment
    choice: bool  # a group of which exactly one child occurs
    first: frozenset[str]  # segment IDs an occurrence of this node can start with


@dataclass(frozen=True, slots=True)
class Grammar:
    structure: str
    version: str
    root: _Node
    segments: frozenset[str]  # segment IDs the grammar places
    strict: bool

    @property
    def has_orders(self) -> bool:
        return "ORC" in self.segments and "OBR" in self.segments


def structure_of(message: HL7Message, lenient: bool = False) -> str | None:
    """The message structure: MSH-9.3 when given, else the type^trigger's (None if unknown).
    `lenient`: an MSH-9.3 the version does not define (`ADT_A08`) is a note, and the event's
    structure is used."""
    h = message.header
    version = message.version
    if h.structure and lenient and h.structure not in _structures(version):
        message.notes.append(
            f"MSH-9.3 {h.structure[:20]!r} is not a structure of HL7 {version}; the event's used"
        )
    elif h.structure:
        if h.structure not in _structures(version):
            raise HL7Error(
                TABLE_VALUE_NOT_FOUND,
                "MSH^1^9^1^3",
                f"HL7 {version} has no message structure {h.structure!r}",
            )
        return h.structure
    known = _structures(version)
    for candidate in EVENT_STRUCTURES.get(message.message_type, ()):
        if candidate in known:
            return candidate
    own = f"{h.message_type}_{h.trigger_event}"
    return own if own in known else None


def check_structure(message: HL7Message, strict: bool = False, lenient: bool = False) -> None:
    """The segment sequence against the version's structure; AE 100 at the first segment out of
    place. A message whose structure is unknown is not checked (the order module refuses it).
    `strict` checks every segment; `lenient` (the setting `strict = false`) reads an unknown
    MSH-9.3 as the event's structure."""
    _require_supported_version(message.version)
    structure = structure_of(message, lenient)
    if structure is None:
        return
    grammar = compile_structure(structure, message.version, strict)
    segments = [s for s in message.segments if _placed(s.name, grammar)]
    names = [s.name for s in segments]
    try:
        end = _match(grammar.root, names, 0, None)
    except _Missing as missing:
        raise _missing_error(grammar, segments, missing) from None
    if end < len(names):
        raise _out_of_place_error(grammar, segments, names, end)
    if grammar.has_orders:
        _check_zds(message)


def _placed(name: str, grammar: Grammar) -> bool:
    if name[0] == "Z":
        return False  # site-defined: HL7 leaves their place to local agreement
    return grammar.strict or name in grammar.segments


class _Missing(Exception):
    def __init__(self, child: _Node, pos: int, group: _Node, group_start: int) -> None:
        super().__init__(child.name)
        self.child = child
        self.pos = pos
        self.group = group
        self.group_start = group_start


def _match(group: _Node, names: list[str], pos: int, tried: dict[int, set] | None) -> int:
    """Consume one occurrence of `group` from names[pos:]; the end position. Greedy, which
    HL7 structures allow: each child is recognised by its first segment. With `tried`, the
    segment sets tried at each position are recorded (to say what was expected)."""
    start = pos
    n = len(names)
    if group.choice:
        for child in group.children:
            if pos < n and names[pos] in child.first:
                return pos + 1 if child.children is None else _match(child, names, pos, tried)
        raise _Missing(group, pos, group, start)
    for child in group.children:
        count = 0
        while count < child.max and pos < n and names[pos] in child.first:
            before = pos
            pos = pos + 1 if child.children is None else _match(child, names, pos, tried)
            count += 1
            if pos == before:
                break
        if tried is not None and count < child.max:
            tried.setdefault(pos, set()).update(child.first)
        if count < child.min:
            raise _Missing(child, pos, group, start)
    return pos


def _missing_error(grammar: Grammar, segments: list[Segment], missing: _Missing) -> HL7Error:
    expected = _describe(missing.child)
    where = (
        "the message"
        if missing.group is grammar.root
        else f"the {missing.group.name} group that starts at "
        f"{segments[missing.group_start].name} (segment {segments[missing.group_start].position})"
    )
    if missing.pos < len(segments):
        found = segments[missing.pos]
        location = f"{found.name}^{found.occurrence}"
        found_text = f"{found.name} (segment {found.position})"
    else:
        anchor = segments[missing.group_start] if missing.group is not grammar.root else segments[0]
        location = f"{anchor.name}^{anchor.occurrence}"
        found_text = "the end of the message"
    hint = ""
    if fused := _fused_segment(segments[: missing.pos], missing.child.first):
        # `...|VORC|NW|...`: the segment separator before the missing segment was lost
        segment, field_no, name = fused
        location = f"{segment.name}^{segment.occurrence}^{field_no}"
        hint = f"; {name} seems fused into {segment.name}-{field_no} (a lost segment separator?)"
    return HL7Error(
        SEGMENT_SEQUENCE_ERROR,
        location,
        f"{grammar.structure} ({grammar.version}): {expected} required in {where}, "
        f"found {found_text}{hint}",
    )


def _fused_segment(before: list[Segment], names: frozenset[str]) -> tuple[Segment, int, str] | None:
    """(segment, field, missing segment ID) of a field that ends with a missing segment's ID and
    is followed by more fields (`PV1-51 = VORC`, then `NW`, `363463^EPC`...), or None."""
    for segment in reversed(before):
        for field_no in range(1, segment.field_count + 1):
            text = segment.raw(field_no)
            for name in names:
                if len(text) > len(name) and text.endswith(name) and field_no < segment.field_count:
                    return segment, field_no, name
    return None


def _out_of_place_error(grammar: Grammar, segments: list[Segment], names: list[str],
                        end: int) -> HL7Error:  # fmt: skip
    tried: dict[int, set] = {}
    _match(grammar.root, names, 0, tried)
    expected = sorted(tried.get(end, ()))
    found = segments[end]
    after = segments[end - 1]
    listed = ", ".join(expected) + (" or " if expected else "") + "the end of the message"
    return HL7Error(
        SEGMENT_SEQUENCE_ERROR,
        f"{found.name}^{found.occurrence}",
        f"{grammar.structure} ({grammar.version}): {found.name} (segment {found.position}) is "
        f"out of place after {after.name} (segment {after.position}); expected {listed}",
    )


def _describe(node: _Node) -> str:
    if node.children is None:
        return node.name
    return f"{node.name} group ({' or '.join(sorted(node.first))})"


def _check_zds(message: HL7Message) -> None:
    # ZDS (IHE RAD-4: the Study Instance UID) belongs to the order it follows: after its OBR.
    obr_in_order = False
    for seg in message.segments:
        if seg.name == "ORC":
            obr_in_order = False
        elif seg.name == "OBR":
            obr_in_order = True
        elif seg.name == "ZDS" and not obr_in_order:
            raise HL7Error(
                SEGMENT_SEQUENCE_ERROR,
                f"ZDS^{seg.occurrence}",
                f"ZDS (segment {seg.position}) does not follow the OBR of an order",
            )


@cache
def _structures(version: str) -> frozenset[str]:
    return frozenset(load_library(version).MESSAGES)


@cache
def compile_structure(structure: str, version: str, strict: bool = False) -> Grammar:
    """hl7apy's message structure as a grammar: in strict mode every segment, else the
    segments the bridge reads, with the minimum of those it does without lowered to 0."""
    ref = load_reference(structure, "Message", version)
    placed: set[str] = set()

    def keep(name: str) -> bool:
        return strict or name in READ_SEGMENTS

    def build(name: str, ref: tuple, card: tuple[int, int], is_group: bool) -> _Node | None:
        lo, hi = card
        hi = _UNBOUNDED if hi == -1 else hi
        if not is_group:
            if not keep(name):
                return None
            placed.add(name)
            if not strict and name in NOT_DEMANDED:
                lo = 0
            return _Node(name, lo, hi, None, False, frozenset({name}))
        kids = [build(c[0], c[1], c[2], c[3] == "GRP") for c in ref[1]]
        children = tuple(k for k in kids if k is not None)
        if not children:
            return None
        short = name.removeprefix(structure + "_")
        # hl7apy writes choice groups (OBR | RQD | RQ1 ...) as sequences of required children.
        choice = (
            len(children) > 1
            and ("CHOICE" in short or "SUPPGRP" in short)
            and all(c.min == 1 and c.max == 1 for c in children)
        )
        if not any(c.min for c in children) and lo:
            lo = 0  # nothing left to demand (the bridge does without its segments)
        return _Node(short, lo, hi, children, choice, _first(children, choice))

    root = build(structure, ref, (1, 1), True)
    return Grammar(structure, version, root, frozenset(placed), strict)


def _first(children: tuple[_Node, ...], choice: bool) -> frozenset[str]:
    first: set[str] = set()
    for child in children:
        first |= child.first
        if not choice and child.min > 0:
            break
    return frozenset(first)


# ---------------------------------------------------------------------------------------------
# Fields


# Required by hl7apy's tables but not by what the bridge does with them: ORC-7 and OBR-27 are
# (1,1) in hl7apy's 2.3 only (2.3.1 makes them optional; a cancel needs no timing, and an item
# needs its start, which the order module demands where it does), and OBR-4, whose absence the
# order module notes (or refuses, in strict mode); and IPC-1..4, which an order module reads as
# OBR-18..20 and ZDS-1: an empty accession number is allowed, the IDs defaulted, the UID derived.
LENIENT_FIELDS = frozenset(
    {("ORC", 7), ("OBR", 27), ("OBR", 4), ("IPC", 1), ("IPC", 2), ("IPC", 3), ("IPC", 4)}
)


def check_fields(
    message: HL7Message, strict: bool = False, pid2_as_patient_id: bool = False
) -> None:
    """Required fields the bridge reads (AE 101) and the date/times it reads (AE 102). With
    `pid2_as_patient_id` (and not strict), an empty PID-3 is allowed when PID-2 has the ID."""
    version = message.version
    _require_supported_version(version)
    rules = _field_rules(version)
    for seg in message.segments:
        rule = rules.get(seg.name)
        if rule is None:
            continue
        required, dates = rule
        for field, component in required:
            if not strict and (seg.name, field) in LENIENT_FIELDS:
                continue
            if (seg.name, field) == ("OBR", 4) and _procedure_given_elsewhere(message, seg):
                continue
            if (seg.name, field) == ("PID", 3) and pid2_as_patient_id and not strict:
                if _filled(seg, 2, 1):
                    continue
            if not _filled(seg, field, component):
                raise HL7Error(
                    REQUIRED_FIELD_MISSING,
                    f"{seg.name}^{seg.occurrence}^{field}",
                    f"{seg.name}-{field}{f'.{component}' if component else ''} is required "
                    f"in HL7 {version} and is empty (segment {seg.position})",
                )
        for field, component, subcomponent in dates:
            value = seg.value(field, component, subcomponent)
            if value and not strict and (fixed := loose_dtm(value)) and not dtm_problem(fixed):
                continue  # ISO 8601 or a long fraction: the order module reads it, with a note
            if not strict and seg.name == "PID" and field == 7:
                continue  # not needed by an item: the order module leaves a bad one out, noted
            if value and (problem := dtm_problem(value)):
                raise HL7Error(
                    DATA_TYPE_ERROR,
                    f"{seg.name}^{seg.occurrence}^{field}^1^{component}",
                    f"{seg.name}-{field}.{component} {value!r}: {problem}",
                )


def _procedure_given_elsewhere(message: HL7Message, obr: Segment) -> bool:
    """OBR-4 may be empty when OMI's IPC-6 or OBR-44 names the procedure (as real OMI feeds do):
    the mapping has what it needs."""
    return message.first("IPC") is not None or _filled(obr, 44, 1)


def _filled(seg: Segment, field: int, component: int) -> bool:
    raw = seg.raw(field)
    if not raw or raw == '""':
        return False
    if not component:
        return True
    return any(seg.leaf(rep, component) for rep in seg.repetitions(field))


@cache
def _field_rules(version: str) -> dict[str, tuple[tuple, tuple]]:
    """Per segment: ((field, component) that must be filled...), ((field, comp, sub) of DTMs...)."""
    rules = {}
    for segment, fields in READ_FIELDS.items():
        try:
            load_reference(segment, "Segment", version)
        except Exception:  # the version has no such segment (TQ1, IPC before 2.5)
            continue
        required = tuple(
            (field, component)
            for field, component in fields.items()
            if _field_cardinality(segment, field, version)[0] >= 1
        )
        dates = tuple(
            path
            for seg, field, component in READ_DATES
            if seg == segment and (path := _dtm_path(segment, field, component, version))
        )
        rules[segment] = (required, dates)
    return rules


def _field_ref(segment: str, field: int, version: str) -> tuple | None:
    for child in load_reference(segment, "Segment", version)[1]:
        if child[0] == f"{segment}_{field}":
            return child
    return None


def _field_cardinality(segment: str, field: int, version: str) -> tuple[int, int]:
    child = _field_ref(segment, field, version)
    return child[2] if child else (0, 0)


def _dtm_path(segment: str, field: int, component: int, version: str) -> tuple | None:
    """(field, component, subcomponent) of the DTM value at SEG-field.component, by hl7apy's
    datatypes: a TS (whose first part is DTM; ST in hl7apy's 2.3/2.4) or a DTM/DT leaf."""
    child = _field_ref(segment, field, version)
    if child is None:
        return None
    ref = child[1]
    if ref[2] == "TS":
        return (field, 1, 1) if component == 1 else None
    if ref[0] != "sequence" or component > len(ref[1]):
        return None
    comp = ref[1][component - 1][1]
    if comp[2] == "TS":
        return (field, component, 1)
    if comp[2] in ("DTM", "DT"):
        return (field, component, 1)
    return None


_DTM = re.compile(
    r"(\d{4})(?:(\d\d)(?:(\d\d)(?:(\d\d)(?:(\d\d)(?:(\d\d)(?:\.\d{1,4})?)?)?)?)?)?"
    r"(?:[+-](\d\d)(\d\d))?"
)


def dtm_problem(value: str) -> str | None:
    """Why `value` is not an HL7 DTM (`YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`), or None."""
    m = _DTM.fullmatch(value)
    if m is None:
        return "not a date/time (YYYY[MM[DD[HH[MM[SS[.SSSS]]]]]][+/-ZZZZ])"
    year, month, day, hour, minute, second, tz_h, tz_m = m.groups()
    if month and not 1 <= int(month) <= 12:
        return f"month {month} out of range"
    if day and not 1 <= int(day) <= calendar.monthrange(int(year), int(month))[1]:
        return f"day {day} does not exist in {year}-{month}"
    if hour and int(hour) > 23:
        return f"hour {hour} out of range"
    if minute and int(minute) > 59:
        return f"minute {minute} out of range"
    if second and int(second) > 59:
        return f"second {second} out of range"
    if tz_h and (int(tz_h) > 14 or int(tz_m) > 59):
        return f"time zone offset {tz_h}{tz_m} out of range"
    return None


def check_message(message: HL7Message, settings: Settings) -> None:
    """Header, structure and fields, in that order."""
    validate_header(message, settings)
    check_structure(message, lenient=not settings.strict)
    check_fields(message, settings.strict, settings.pid2_as_patient_id)
