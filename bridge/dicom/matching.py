"""Modality Worklist matching (DICOM PS3.4 C.2.2.2, Table K.6-1). Pure functions, no I/O.

Worklist items are held as compact `Record`s (a shared tag/VR layout plus a tuple of values)
rather than pydicom Datasets: a folder of 100,000 items then fits in a few hundred MB. A C-FIND
identifier is compiled once into a `Query`, whose `matches(record)` is cheap to run over many
records and whose `answer(record)` builds the response identifier.
"""

from __future__ import annotations

import datetime
import functools
import re
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_for_tag
from pydicom.multival import MultiValue

from bridge.core.attributes import by_level

SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
MODALITY = 0x00080060
ACCESSION_NUMBER = 0x00080050
PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
STUDY_INSTANCE_UID = 0x0020000D
SPS_SEQUENCE = 0x00400100
STATION_AET = 0x00400001
SPS_START_DATE = 0x00400002
SPS_START_TIME = 0x00400003
SPS_ID = 0x00400009
SPS_STATUS = 0x00400020
REQUESTED_PROCEDURE_ID = 0x00401001
DEFAULT_CHARSET = "ISO_IR 6"  # what an item without Specific Character Set is written in

# Leading and trailing spaces are insignificant for these VRs; for PN, LT, ST, UT only trailing.
_STRIP_BOTH = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI", "UC"})
TEXT_VRS = _STRIP_BOTH | {"PN", "LT", "ST", "UT", "UR"}
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
NUMERIC_BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})

# Table K.6-1 return keys of Type 1 and 2, from the attribute registry (bridge.core.attributes).
# Its Type 1C keys come in "one of the two" pairs; Type 2C keys are conditional on what the
# item says, so an item is not refused for lacking one.
REQUIRED_TOP: dict[int, int] = {a.tag: int(a.type) for a in by_level("top") if a.type in ("1", "2")}
REQUIRED_SPS: dict[int, int] = {a.tag: int(a.type) for a in by_level("sps") if a.type in ("1", "2")}
ONE_OF_TOP = (tuple(a.tag for a in by_level("top") if a.type == "1C"),)  # RP Description / Code
ONE_OF_SPS = (tuple(a.tag for a in by_level("sps") if a.type == "1C"),)  # SPS Descr. / Protocol


GUARD_EVERY = 64


class SearchStopped(Exception):
    """Raised by a query's guard to end a search early; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QueryError(ValueError):
    """The identifier cannot be processed as given (answered with a failure status)."""

    def __init__(self, message: str, tag: int | None = None) -> None:
        super().__init__(message)
        self.tag = tag


# ---------------------------------------------------------------------------------------------
# Records


class Layout:
    """The (tag, VR) pairs of a record, shared by every record with the same attributes."""

    __slots__ = ("key", "pos")

    def __init__(self, key: tuple[tuple[int, str], ...]) -> None:
        self.key = key
        self.pos = {tag: i for i, (tag, _vr) in enumerate(key)}

    def __reduce__(self) -> tuple:
        return (layout_of, (self.key,))


_LAYOUTS: dict[tuple, Layout] = {}


def layout_of(key: tuple[tuple[int, str], ...]) -> Layout:
    found = _LAYOUTS.get(key)
    if found is None:
        found = _LAYOUTS.setdefault(key, Layout(key))
    return found


class Record:
    """An immutable worklist item (or sequence item). Values: str (single text value, "" when
    empty), tuple of str (multi-valued text), tuple of Record (SQ), else as pydicom gives them."""

    __slots__ = ("layout", "values")

    def __init__(self, layout: Layout, values: tuple) -> None:
        self.layout = layout
        self.values = values

    def get(self, tag: int, default: Any = None) -> Any:
        i = self.layout.pos.get(tag)
        return default if i is None else self.values[i]

    def vr(self, tag: int) -> str | None:
        i = self.layout.pos.get(tag)
        return None if i is None else self.layout.key[i][1]

    def __contains__(self, tag: int) -> bool:
        return tag in self.layout.pos

    def items(self) -> Iterable[tuple[int, str, Any]]:
        for (tag, vr), value in zip(self.layout.key, self.values, strict=True):
            yield tag, vr, value

    def __reduce__(self) -> tuple:
        return (Record, (self.layout, self.values))

    def __repr__(self) -> str:
        return f"Record({ {keyword_for_tag(t) or hex(t): v for t, _vr, v in self.items()} })"


def _norm_text(text: str, vr: str) -> str:
    text = text.strip(" \x00") if vr in _STRIP_BOTH else text.rstrip(" \x00")
    return sys.intern(text)


def _stored_value(vr: str, value: Any) -> Any:
    if vr == "SQ":
        return tuple(record_from_dataset(item) for item in value or ())
    if value is None or value == "" or value == b"":
        return ""
    multi = isinstance(value, MultiValue | list | tuple)
    if vr in TEXT_VRS:
        if multi:
            return tuple(_norm_text(str(v), vr) for v in value)
        return _norm_text(str(value), vr)
    return tuple(value) if multi else value


def record_from_dataset(ds: Dataset) -> Record:
    """The compact record of a dataset (file meta, group lengths and pixel data left out)."""
    key = []
    values = []
    for elem in ds:
        tag = int(elem.tag)
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0 or tag == 0x7FE00010:
            continue
        key.append((tag, elem.VR))
        values.append(_stored_value(elem.VR, elem.value))
    return Record(layout_of(tuple(key)), tuple(values))


def record_from_elements(elements: Iterable[tuple[int, str, Any]]) -> Record:
    """`record_from_dataset` of an item given as plain elements, (tag, VR, value) in tag order
    with values as its Dataset holds them (a sequence's: a list of such lists); see
    bridge.dicom.worklist_item.Item."""
    key = []
    values = []
    for tag, vr, value in elements:
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0 or tag == 0x7FE00010:
            continue
        key.append((tag, vr))
        if vr == "SQ":
            values.append(tuple(record_from_elements(item) for item in value or ()))
        else:
            values.append(_stored_value(vr, value))
    return Record(layout_of(tuple(key)), tuple(values))


def _values(stored: Any) -> tuple:
    if stored is None or stored == "":
        return ()
    return stored if isinstance(stored, tuple) else (stored,)


def missing_required(rec: Record) -> list[str]:
    """Names of Table K.6-1 Type 1/2 attributes an item lacks (Type 1: or has empty)."""
    missing = _check_required(rec, False)
    for sps in _values(rec.get(SPS_SEQUENCE)):
        missing += _check_required(sps, True)
    return sorted(set(missing))


# What a layout lacks is worked out once per layout (layouts are shared and never freed); only
# the emptiness of the Type 1 values it holds is checked per record.
_REQUIRED_PLANS: dict[tuple[Layout, bool], tuple] = {}


def _check_required(r: Any, sps: bool) -> list[str]:
    if not isinstance(r, Record):
        r = Record(layout_of(()), ())
    plan = _REQUIRED_PLANS.get((r.layout, sps))
    if plan is None:
        plan = _REQUIRED_PLANS.setdefault((r.layout, sps), _required_plan(r.layout, sps))
    absent, type1, pairs = plan
    values = r.values
    out = list(absent)
    for i, name in type1:
        if not _values(values[i]):
            out.append(name)
    for a, b, name in pairs:
        if (a is None or not _values(values[a])) and (b is None or not _values(values[b])):
            out.append(name)
    return out


def _required_plan(layout: Layout, sps: bool) -> tuple:
    required, one_of = (REQUIRED_SPS, ONE_OF_SPS) if sps else (REQUIRED_TOP, ONE_OF_TOP)
    prefix = "ScheduledProcedureStepSequence>" if sps else ""
    pos = layout.pos
    absent, type1 = [], []
    for tag, kind in required.items():
        name = prefix + (keyword_for_tag(tag) or f"{tag:08X}")
        if tag not in pos:
            absent.append(name)
        elif kind == 1:
            type1.append((pos[tag], name))
    pairs = [
        (pos.get(a), pos.get(b), f"{prefix}{keyword_for_tag(a)} or {keyword_for_tag(b)}")
        for a, b in one_of
    ]
    return tuple(absent), tuple(type1), tuple(pairs)


def sort_key(rec: Record) -> str:
    """SPS start date and time of the first step: the order answers are sent in."""
    steps = _values(rec.get(SPS_SEQUENCE))
    if not steps:
        return ""
    first = steps[0]
    return f"{_first(first.get(SPS_START_DATE))}{_first(first.get(SPS_START_TIME))}"


def _first(stored: Any) -> str:
    values = _values(stored)
    return str(values[0]) if values else ""


# ---------------------------------------------------------------------------------------------
# Dates and times. Canonical forms are fixed-width strings, so comparing strings compares
# instants: TM "HHMMSS.ffffff", DA "YYYYMMDD", DT "YYYYMMDDHHMMSS.ffffff".

_TM_RE = re.compile(r"(\d\d)(\d\d)?(\d\d)?(?:\.(\d{1,6}))?")
_DA_RE = re.compile(r"\d{8}")
_DT_RE = re.compile(r"(\d{4,14})(?:\.(\d{1,6}))?(?:[+-]\d{4})?")
_DT_HIGH = "99991231235959"
_DT_LOW = "00000101000000"


def canonical_time(text: str, high: bool = False) -> str | None:
    """TM as `HHMMSS.ffffff`; missing parts are the earliest (or, `high`, the latest) value.
    Accepts the old `HH:MM:SS` form. None when not a time."""
    m = _TM_RE.fullmatch(text.replace(":", ""))
    if m is None:
        return None
    hh, mm, ss, frac = m.groups()
    fill = "59" if high else "00"
    frac = (frac or "").ljust(6, "9" if high else "0")
    return f"{hh}{mm or fill}{ss or fill}.{frac}"


def canonical_date(text: str) -> str | None:
    if len(text) == 8 and text.isdecimal():  # what _DA_RE admits, without running it
        return text
    text = text.replace(".", "")  # old ACR-NEMA form YYYY.MM.DD
    return text if _DA_RE.fullmatch(text) else None


def canonical_datetime(text: str, high: bool = False) -> str | None:
    """DT without its UTC offset (offsets are not converted), padded like `canonical_time`."""
    m = _DT_RE.fullmatch(text)
    if m is None or len(m.group(1)) % 2:
        return None
    digits, frac = m.groups()
    digits += (_DT_HIGH if high else _DT_LOW)[len(digits) :]
    return f"{digits}.{(frac or '').ljust(6, '9' if high else '0')}"


def _split_range(text: str, tag: int) -> tuple[str, str] | None:
    """(low, high) of `a-b`, `a-`, `-b`; None for a single value."""
    if "-" not in text:
        return None
    parts = text.split("-")
    if len(parts) != 2 or parts == ["", ""]:
        raise QueryError(f"bad range {text!r}", tag)
    return parts[0], parts[1]


def _range_test(vr: str, text: str, tag: int) -> Callable[[str], bool]:
    """Single value or range matching of one DA, TM or DT query value."""
    if vr == "DA":
        canon_lo = canon_hi = canonical_date
    elif vr == "TM":
        canon_lo, canon_hi = canonical_time, lambda t: canonical_time(t, high=True)
    else:
        canon_lo, canon_hi = canonical_datetime, lambda t: canonical_datetime(t, high=True)
    stored_canon = canon_lo
    bounds = None if vr == "DT" and _DT_RE.fullmatch(text) else _split_range(text, tag)
    a, b = bounds if bounds is not None else (text, text)
    lo = canon_lo(a) if a else ""
    hi = canon_hi(b) if b else ""
    if lo is None or hi is None:
        raise QueryError(f"{text!r} is not a valid {vr} value or range", tag)
    wraps = vr == "TM" and lo and hi and lo > hi  # a time range across midnight: 2200-0200

    def test(stored: str) -> bool:
        s = stored_canon(stored)
        if s is None:
            return False
        if wraps:
            return s >= lo or s <= hi
        return (not lo or s >= lo) and (not hi or s <= hi)

    return test


# ---------------------------------------------------------------------------------------------
# Text matching


def wildcard_matcher(pattern: str) -> Callable[[str], bool]:
    """A test of whole values against `pattern` (`*` any run of characters, `?` one), in time
    linear in the value for each piece of the pattern: no backtracking regular expression.

    The pattern is cut at its `*`s into pieces. The first piece must start the value and the
    last end it; each piece between is taken at its leftmost place after the one before (the
    leftmost place leaves the most room for the rest, so no other place needs trying)."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        if "?" not in pattern:
            return lambda s: s == pattern
        return lambda s: len(s) == len(pattern) and _piece_at(pattern, s, 0)
    head, *middle, tail = pieces
    middle = [p for p in middle if p]
    least = len(head) + len(tail) + sum(len(p) for p in middle)
    plain = "?" not in pattern

    def test(s: str) -> bool:
        if len(s) < least:
            return False
        if plain:
            if not (s.startswith(head) and s.endswith(tail)):
                return False
        elif not (_piece_at(head, s, 0) and _piece_at(tail, s, len(s) - len(tail))):
            return False
        start, end = len(head), len(s) - len(tail)
        for piece in middle:
            found = s.find(piece, start, end) if plain else _find_piece(piece, s, start, end)
            if found < 0:
                return False
            start = found + len(piece)
        return True

    return test


def _piece_at(piece: str, s: str, at: int) -> bool:
    """`piece` (with `?` for any one character) is in `s` at `at`."""
    if at < 0 or at + len(piece) > len(s):
        return False
    for i, c in enumerate(piece):
        if c != "?" and s[at + i] != c:
            return False
    return True


def _find_piece(piece: str, s: str, start: int, end: int) -> int:
    """The leftmost place of `piece` (with `?`s) in s[start:end], or -1. Looks for its longest
    run without `?` with str.find, then checks the rest there."""
    runs = [r for r in piece.split("?") if r]
    if not runs:
        return start if start + len(piece) <= end else -1
    anchor = max(runs, key=len)
    offset = piece.index(anchor)
    at = s.find(anchor, start + offset, end)
    while at >= 0:
        place = at - offset
        if place + len(piece) > end:
            return -1
        if _piece_at(piece, s, place):
            return place
        at = s.find(anchor, at + 1, end)
    return -1


def _text_test(text: str, fold: bool) -> Callable[[str], bool]:
    """Single value or wildcard matching of one text value (already normalised)."""
    if fold:
        text = text.casefold()
    if "*" in text or "?" in text:
        test = wildcard_matcher(text)
        if fold:
            return lambda s: test(s.casefold())
        return test
    if fold:
        return lambda s: s.casefold() == text
    return lambda s: s == text


def _pn_groups(name: str) -> list[str]:
    # Trailing empty components carry no meaning: SMITH^JOHN^^ is SMITH^JOHN.
    return [g.rstrip(" ^") for g in name.split("=")]


def _pn_test(text: str, fold: bool) -> Callable[[str], bool]:
    """A query without `=` matches any component group of the stored name (alphabetic,
    ideographic or phonetic); with `=`, each non-empty query group matches the same group."""
    groups = _pn_groups(text)
    if len(groups) == 1:
        one = _text_test(groups[0], fold)
        return lambda s: any(one(g) for g in _pn_groups(s))
    tests = [(i, _text_test(g, fold)) for i, g in enumerate(groups) if g]

    def test(s: str) -> bool:
        stored = _pn_groups(s)
        return all(i < len(stored) and t(stored[i]) for i, t in tests)

    return test


def _number_test(text: str) -> Callable[[str], bool]:
    # IS and DS: equal as numbers ("+7" is "7"; PS3.4 leaves it to the implementation).
    try:
        wanted = float(text)
    except ValueError:
        return lambda s: s == text

    def test(s: str) -> bool:
        try:
            return float(s) == wanted
        except ValueError:
            return False

    return test


# ---------------------------------------------------------------------------------------------
# Compiled queries

ValueTest = Callable[[Any], bool]
RecordTest = Callable[[Record], bool]


@dataclass
class Hints:
    """Exact values a matching item must carry: the index picks its candidates from these.
    None means "no constraint"; a set means "one of these"."""

    patient_ids: frozenset[str] | None = None
    accession_numbers: frozenset[str] | None = None
    study_uids: frozenset[str] | None = None
    requested_procedure_ids: frozenset[str] | None = None
    station_aets: frozenset[str] | None = None
    modalities: frozenset[str] | None = None
    sps_ids: frozenset[str] | None = None
    date_range: tuple[str, str] | None = None  # (low, high) DA, "" when open


_TOP_HINTS = {
    PATIENT_ID: "patient_ids",
    ACCESSION_NUMBER: "accession_numbers",
    STUDY_INSTANCE_UID: "study_uids",
    REQUESTED_PROCEDURE_ID: "requested_procedure_ids",
}
_SPS_HINTS = {STATION_AET: "station_aets", MODALITY: "modalities", SPS_ID: "sps_ids"}


@dataclass
class ReturnKey:
    tag: int
    vr: str
    sub: tuple[ReturnKey, ...] | None = None  # SQ: requested sub-keys; None: whole items
    select: RecordTest | None = None  # SQ: which stored items are returned


@dataclass
class Query:
    """A compiled C-FIND identifier."""

    tests: list[RecordTest]
    returns: tuple[ReturnKey, ...]
    hints: Hints
    unsupported: tuple[str, ...] = ()  # keys ignored for matching: answer with FF01
    wants_charset: bool = False
    given: tuple[str, ...] = ()  # "Keyword=value" of every key with a value, for the log
    # Run every GUARD_EVERY records by `matches` (a search's budget and C-CANCEL check); it
    # stops the search by raising SearchStopped.
    guard: Callable[[], None] | None = None
    matched: int = 0

    def matches(self, rec: Record) -> bool:
        if self.guard is not None:
            self.matched += 1
            if not self.matched % GUARD_EVERY:
                self.guard()
        for test in self.tests:
            if not test(rec):
                return False
        return True

    def answer(self, rec: Record) -> Dataset:
        """Exactly the requested keys (+ SpecificCharacterSet), empty when the item lacks one."""
        ds = Dataset()
        charset = rec.get(SPECIFIC_CHARACTER_SET)
        if charset:
            ds.add_new(SPECIFIC_CHARACTER_SET, "CS", _answer_value(charset))
        elif self.wants_charset:  # PS3.4 C.2.2.2: never zero length when asked for
            ds.add_new(SPECIFIC_CHARACTER_SET, "CS", DEFAULT_CHARSET)
        _fill(ds, rec, self.returns)
        return ds


def _answer_value(stored: Any) -> Any:
    if stored is None or stored == "":
        return None
    return list(stored) if isinstance(stored, tuple) else stored


def _sub_level(required: Any, tag: int) -> Any:
    """The Table K.6-1 types of the attributes inside sequence `tag` (REQUIRED_SPS inside the
    steps), or None."""
    return REQUIRED_SPS if required is REQUIRED_TOP and tag == SPS_SEQUENCE else None


def _leave_out(rk: ReturnKey, stored: Any, required: Any) -> bool:
    """A requested sequence that the item lacks is returned empty when Table K.6-1 makes it a
    Type 1 or 2 return key (PS3.4 K.2.2.1.2: return keys as their Data Element Type), and left
    out otherwise (Type 3 or not in the table), as dcmtk's wlmscpfs and Orthanc do."""
    return stored is None and not (required is not None and rk.tag in required)


def _fill(
    ds: Dataset, rec: Record | None, returns: Iterable[ReturnKey], required: Any = REQUIRED_TOP
) -> None:
    for rk in returns:
        stored = rec.get(rk.tag) if rec is not None else None
        if rk.vr == "SQ":
            if _leave_out(rk, stored, required):
                continue
            seq = []
            for item in _selected(rk, stored):
                sub = Dataset()
                if rk.sub is None:
                    _fill_all(sub, item)
                else:
                    _fill(sub, item, rk.sub, _sub_level(required, rk.tag))
                seq.append(sub)
            ds.add_new(rk.tag, "SQ", seq)
        else:
            vr = (rec.vr(rk.tag) if rec is not None else None) or rk.vr
            ds.add_new(rk.tag, vr, _answer_value(stored))


def _selected(rk: ReturnKey, stored: Any) -> Iterable[Any]:
    """The stored items of a sequence return key that its query item selects."""
    items = stored if isinstance(stored, tuple) else ()
    if rk.select is not None:
        return [item for item in items if rk.select(item)]
    return items


def _fill_all(ds: Dataset, rec: Record) -> None:
    for tag, vr, value in rec.items():
        if vr == "SQ":
            seq = []
            for item in value:
                sub = Dataset()
                _fill_all(sub, item)
                seq.append(sub)
            ds.add_new(tag, vr, seq)
        else:
            ds.add_new(tag, vr, _answer_value(value))


# ---------------------------------------------------------------------------------------------
# Answers encoded straight from records. Building a pydicom Dataset per answer and having pydicom
# encode it cost ~0.5 ms an answer; this writes the same bytes in a few tens of µs. Anything it
# does not handle exactly like pydicom raises _Unencodable, and that answer is encoded by pydicom.


class _Unencodable(Exception):
    pass


# Python codecs (as pydicom names them) that encode a str the same way whole or in parts, so that
# `value.encode(codec)` is what pydicom writes. ISO 2022 code extensions are left to pydicom.
_PLAIN_CODECS = frozenset({
    "iso8859", "latin_1", "UTF8", "iso8859_2", "iso8859_3", "iso8859_4", "iso_ir_126",
    "iso_ir_127", "iso_ir_138", "iso_ir_144", "iso_ir_148", "iso_ir_166",
})  # fmt: skip
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})  # encoded in the charset
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UR"})  # pydicom: always iso8859
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d",
                   "UV": "Q", "SV": "q"}  # fmt: skip
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OW", "OV", "SQ", "UC", "UR", "UT",
                              "UN", "SV", "UV"})  # fmt: skip
_IS_RE = re.compile(r"[+-]?\d+")
_DS_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ITEM = b"\xfe\xff\x00\xe0"


@functools.lru_cache(maxsize=64)
def _codec(charset: Any) -> str:
    """The codec pydicom encodes text with for a Specific Character Set value."""
    if isinstance(charset, tuple):
        if len(charset) != 1:
            raise _Unencodable("several character sets")
        charset = charset[0]
    codecs = convert_encodings(charset or None)
    if len(codecs) != 1 or codecs[0] not in _PLAIN_CODECS:
        raise _Unencodable(f"character set {charset!r}")
    return codecs[0]


@functools.lru_cache(maxsize=4096)
def _tag_bytes(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


class AnswerEncoder:
    """`query.answer(rec)` encoded in little endian, implicit or explicit VR: the bytes pydicom
    would write for it, without building the Dataset. `encode` returns None when an answer holds
    something this encoder leaves to pydicom (encode `query.answer(rec)` then).

    `matched=True` promises that every record given matched the query (the C-FIND SCP encodes
    only what the index found): a sequence item that is a record's only one is then known to
    have passed its query item's tests, which need not run again to choose it.

    Each (record layout, requested keys, character set) is compiled once into a plan, the
    elements to write in tag order with their header bytes ready (`_plan_for`); plans are shared
    by every encoder of queries with the same return keys, so a first query does not build
    them."""

    def __init__(self, query: Query, implicit: bool, matched: bool = False) -> None:
        self.query = query
        self.implicit = implicit
        self.matched = matched
        self._plans: dict[tuple, tuple] = {}  # (layout, id(returns), codec) -> plan
        self._signatures: dict[int, tuple | None] = {}  # id(returns) -> _signature(returns)
        self._charsets: dict[Any, bytes] = {}  # Specific Character Set value -> element

    def encode(self, rec: Record) -> bytes | None:
        try:
            returns = self.query.returns
            charset = rec.get(SPECIFIC_CHARACTER_SET)
            codec = _codec(charset if charset else "")
            plan = self._plans.get((rec.layout, id(returns), codec))
            if plan is None:
                plan = self._plan_for(rec.layout, returns, REQUIRED_TOP, codec)
            if not charset and self.query.wants_charset:
                charset = DEFAULT_CHARSET
            out: list[bytes] = []
            self._write(out, plan, rec.values, returns, codec, self.matched, charset)
        except (_Unencodable, UnicodeError, struct.error, TypeError, AttributeError):
            return None
        return b"".join(out)

    def _plan_for(
        self, layout: Layout, returns: tuple[ReturnKey, ...] | None, required: Any, codec: str
    ) -> tuple:
        """The plan of `returns` (None: every element, as for whole sequence items) for records
        of `layout` in `codec`, from the shared plans or built."""
        signature = self._signatures.get(id(returns))
        if signature is None:
            signature = self._signatures[id(returns)] = _signature(returns)
        key = (layout, signature, _LEVELS[id(required)], self.implicit, codec)
        plan = _PLANS.get(key)
        if plan is None:
            plan = _build_plan(layout, returns, required, self.implicit, codec)
            if len(_PLANS) >= _MOST_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
        self._plans[(layout, id(returns), codec)] = plan
        return plan

    def _write(
        self,
        out: list[bytes],
        plan: tuple,
        values: tuple,
        returns: tuple[ReturnKey, ...] | None,
        codec: str,
        known: bool,
        charset: Any = None,
    ) -> None:
        """Append the elements of `plan` for a record's `values`. `known`: the record passed its
        query level's tests (a sequence's only item is then selected without testing it)."""
        for kind, i, tag, vr, head, pack, arg, heads, written in plan:
            if kind <= _OP_OTHER:
                value = values[i]
                if value.__class__ is not str:
                    if kind == _OP_NUMBER and (value.__class__ is int or value.__class__ is float):
                        data = arg(value)
                        out.append(head + pack(len(data)) + data)
                    else:
                        out.append(self._element(tag, vr, value, codec))
                    continue
                element = written.get(value)
                if element is not None:
                    out.append(element)
                    continue
                if not value:
                    if heads is None:
                        raise _Unencodable(vr)
                    element = heads[0]
                else:
                    if kind == _OP_TEXT:
                        data = value.encode(codec)
                    elif kind == _OP_ASCII:
                        data = value.encode("latin_1")
                    elif kind == _OP_PN:
                        if value[-1] == "=":
                            raise _Unencodable("PN with empty trailing groups")  # pydicom drops
                        data = value.encode(codec)
                    elif kind == _OP_UI:
                        data = value.encode("latin_1")
                        if len(data) & 1:
                            data += b"\0"
                    elif kind == _OP_NUMBER_TEXT:
                        if arg.fullmatch(value) is None:
                            raise _Unencodable(vr)  # pydicom may reformat or refuse it
                        data = value.encode("latin_1")
                    else:  # a str where pydicom would want something else, or a VR left to it
                        data = b""
                        element = self._element(tag, vr, value, codec)
                    if len(data) & 1:
                        data += b" "
                    if element is None:
                        n = len(data)
                        element = heads[n] + data if n <= _SHORT else head + pack(n) + data
                if len(written) < _MOST_WRITTEN:
                    written[value] = element
                out.append(element)
            elif kind == _OP_SEQUENCE:
                stored = values[i] if i >= 0 else None
                items = stored if isinstance(stored, tuple) else ()
                place, level = arg
                rk = returns[place]
                select = rk.select
                if select is not None and items and not (known and len(items) == 1):
                    items = [item for item in items if select(item)]
                body = b"".join([self._item(item, rk.sub, codec, level) for item in items])
                out.append(head + pack(len(body)) + body)
            elif kind == _OP_WHOLE_SEQUENCE:
                items = values[i]
                if not isinstance(items, tuple):
                    raise _Unencodable("sequence value")
                body = b"".join([self._item(item, None, codec, None) for item in items])
                out.append(head + pack(len(body)) + body)
            elif kind == _OP_CHARSET:
                if charset:
                    element = self._charsets.get(charset)
                    if element is None:
                        element = self._element(SPECIFIC_CHARACTER_SET, "CS", charset, codec)
                        self._charsets[charset] = element
                    out.append(element)
            else:  # _OP_FIXED: an empty element the record lacks
                out.append(head)

    def _item(
        self, item: Any, sub: tuple[ReturnKey, ...] | None, codec: str, required: Any
    ) -> bytes:
        if not isinstance(item, Record) or SPECIFIC_CHARACTER_SET in item.layout.pos:
            raise _Unencodable("sequence item")
        plan = self._plans.get((item.layout, id(sub), codec))
        if plan is None:
            plan = self._plan_for(item.layout, sub, required, codec)
        out: list[bytes] = []
        # An item reached here was selected, so it passed its query item's tests.
        self._write(out, plan, item.values, sub, codec, True)
        body = b"".join(out)
        return _ITEM + _PACK_I(len(body)) + body

    def _header(self, tag: int, vr: str, length: int) -> bytes:
        if self.implicit:
            return _tag_bytes(tag) + struct.pack("<I", length)
        if vr in _LONG_LENGTH_VRS:
            return _tag_bytes(tag) + vr.encode() + struct.pack("<HI", 0, length)
        if length > 0xFFFF:
            raise _Unencodable("value too long for explicit VR")
        return _tag_bytes(tag) + vr.encode() + struct.pack("<H", length)

    def _element(self, tag: int, vr: str, stored: Any, codec: str) -> bytes:
        """Any one element (the general case of `_write`'s: multi-valued, binary numbers...)."""
        if stored is None or stored == "" or stored == ():
            if vr == "SQ" or len(vr) != 2:
                raise _Unencodable(vr)
            return self._header(tag, vr, 0)
        values = stored if isinstance(stored, tuple) else (stored,)
        if vr in _NUMBER_FORMATS:
            if not all(isinstance(v, int | float) for v in values):
                raise _Unencodable(vr)
            data = struct.pack(f"<{len(values)}{_NUMBER_FORMATS[vr]}", *values)
        else:
            if not all(isinstance(v, str) for v in values):
                raise _Unencodable(vr)
            if vr in _CHARSET_VRS:
                if vr == "PN" and any(v.endswith("=") for v in values):
                    raise _Unencodable("PN with empty trailing groups")  # pydicom drops them
                data = "\\".join(values).encode(codec)
                if len(data) % 2:
                    data += b" "
            elif vr in _ASCII_VRS or vr == "UI":
                text = "\\".join(values)
                if len(text) % 2:
                    text += "\0" if vr == "UI" else " "
                data = text.encode("latin_1")
            elif vr in ("IS", "DS"):
                number = _IS_RE if vr == "IS" else _DS_RE
                if not all(number.fullmatch(v) for v in values):
                    raise _Unencodable(vr)  # pydicom may reformat or refuse it
                text = "\\".join(values)
                data = (text + " " if len(text) % 2 else text).encode("latin_1")
            else:
                raise _Unencodable(vr)
        return self._header(tag, vr, len(data)) + data


# Plans: one op per element to write, in tag order, as a tuple (kind, index of the value in the
# record or -1, tag, VR, header bytes but the length, length packer, extra, headers by length,
# elements written by value). The extra: _OP_NUMBER its value packer, _OP_NUMBER_TEXT its
# pattern, _OP_SEQUENCE (the return key's place in `returns`, the Table K.6-1 level of its
# items). The last two are for value ops, shared by the plans (`_elements_of`): the header of
# each length up to _SHORT (None when the VR cannot be written empty), and the elements already
# written for str values (of one tag, VR and codec, a value's element is always the same bytes).
_OP_TEXT, _OP_PN, _OP_ASCII, _OP_UI, _OP_NUMBER_TEXT, _OP_NUMBER, _OP_OTHER = range(7)
_OP_SEQUENCE, _OP_WHOLE_SEQUENCE, _OP_CHARSET, _OP_FIXED = range(7, 11)
_PACK_H = struct.Struct("<H").pack
_PACK_I = struct.Struct("<I").pack
_NUMBER_PACKERS = {vr: struct.Struct("<" + f).pack for vr, f in _NUMBER_FORMATS.items()}
_LEVELS = {id(REQUIRED_TOP): 0, id(REQUIRED_SPS): 1, id(None): 2}
_PLANS: dict[tuple, tuple] = {}  # (layout, _signature(returns), level, implicit, codec) -> plan
_MOST_PLANS = 1024  # then they are built again: layouts are few, queries' shapes too
_ELEMENTS: dict[tuple, tuple] = {}  # (tag, VR, implicit, codec) -> (headers, elements by value)
_MOST_ELEMENTS = 512  # then made again: the records' elements (~20 MB at most, all full)
_SHORT = 64  # value lengths whose headers a value op holds ready
_MOST_WRITTEN = 256  # elements kept by value for each (sexes, stations, dates, statuses...)


def _signature(returns: tuple[ReturnKey, ...] | None) -> tuple | None:
    """What a plan depends on in return keys: tags, VRs and sub-keys (not what selects)."""
    if returns is None:
        return None
    return tuple((rk.tag, rk.vr, None if rk.sub is None else _signature(rk.sub)) for rk in returns)


def _value_kind(vr: str) -> int:
    if vr == "PN":
        return _OP_PN
    if vr in _CHARSET_VRS:
        return _OP_TEXT
    if vr in _ASCII_VRS:
        return _OP_ASCII
    if vr == "UI":
        return _OP_UI
    if vr in ("IS", "DS"):
        return _OP_NUMBER_TEXT
    if vr in _NUMBER_FORMATS:
        return _OP_NUMBER
    return _OP_OTHER


def _head(tag: int, vr: str, implicit: bool) -> tuple[bytes, Callable[[int], bytes]]:
    """An element's header but its length, and the packer of the length."""
    if implicit:
        return _tag_bytes(tag), _PACK_I
    if vr in _LONG_LENGTH_VRS:
        return _tag_bytes(tag) + vr.encode() + b"\0\0", _PACK_I
    return _tag_bytes(tag) + vr.encode(), _PACK_H  # struct.error past 0xFFFF: left to pydicom


def _value_op(i: int, tag: int, vr: str, implicit: bool, codec: str) -> tuple:
    kind = _value_kind(vr)
    head, pack = _head(tag, vr, implicit)
    heads, written = _elements_of(tag, vr, implicit, codec)
    arg = None
    if kind == _OP_NUMBER_TEXT:
        arg = _IS_RE if vr == "IS" else _DS_RE
    elif kind == _OP_NUMBER:
        arg = _NUMBER_PACKERS[vr]
    return (kind, i, tag, vr, head, pack, arg, heads, written)


def _elements_of(tag: int, vr: str, implicit: bool, codec: str) -> tuple[tuple | None, dict]:
    """The headers of each short length (empty: [0]; None where pydicom would not write the
    element empty) and the elements written by value, of one element in one encoding: shared by
    every plan, so that their memory grows with the elements the records hold (and the VRs a
    query may give those the records hold without one), not with the return-key sets peers send."""
    key = (tag, vr, implicit, codec)
    known = _ELEMENTS.get(key)
    if known is None:
        head, pack = _head(tag, vr, implicit)
        heads = (
            None if vr == "SQ" or len(vr) != 2 else tuple(head + pack(n) for n in range(_SHORT + 1))
        )
        if len(_ELEMENTS) >= _MOST_ELEMENTS:
            _ELEMENTS.clear()
        known = _ELEMENTS[key] = (heads, {})
    return known


def _build_plan(
    layout: Layout,
    returns: tuple[ReturnKey, ...] | None,
    required: Any,
    implicit: bool,
    codec: str,
) -> tuple:
    """What AnswerEncoder writes for `returns` of a record of `layout`: as `_fill` does, the
    VR the record holds (else the query's), a requested sequence the record lacks left out
    unless Table K.6-1 requires it; sorted by tag, as pydicom writes a Dataset."""
    pos = layout.pos
    ops: list[tuple] = []
    if returns is None:  # a whole item
        for i, (tag, vr) in enumerate(layout.key):
            if vr == "SQ":
                head, pack = _head(tag, "SQ", implicit)
                ops.append((_OP_WHOLE_SEQUENCE, i, tag, vr, head, pack, None, None, None))
            else:
                ops.append(_value_op(i, tag, vr, implicit, codec))
    else:
        if required is REQUIRED_TOP:
            ops.append((_OP_CHARSET, -1, SPECIFIC_CHARACTER_SET, "CS", b"", None, None, None, None))
        for place, rk in enumerate(returns):
            i = pos.get(rk.tag, -1)
            if rk.vr == "SQ":
                if i < 0 and _leave_out(rk, None, required):
                    continue
                head, pack = _head(rk.tag, "SQ", implicit)
                level = _sub_level(required, rk.tag)
                ops.append((_OP_SEQUENCE, i, rk.tag, "SQ", head, pack, (place, level), None, None))
            elif i >= 0:
                ops.append(_value_op(i, rk.tag, layout.key[i][1] or rk.vr, implicit, codec))
            else:
                if rk.vr == "SQ" or len(rk.vr) != 2:
                    raise _Unencodable(rk.vr)
                head, pack = _head(rk.tag, rk.vr, implicit)
                ops.append((_OP_FIXED, -1, rk.tag, rk.vr, head + pack(0), None, None, None, None))
    ops.sort(key=_tag_of_op)
    return tuple(ops)


def _tag_of_op(op: tuple) -> int:
    return op[2]


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _query_values(vr: str, value: Any) -> tuple:
    """The non-empty values of a query element, normalised like stored ones."""
    return _values(_stored_value(vr, value))


class _Compiler:
    def __init__(self, pn_fold: bool) -> None:
        self.pn_fold = pn_fold
        self.unsupported: list[str] = []
        self.given: list[str] = []
        self.hints = Hints()

    def value_test(self, tag: int, vr: str, values: tuple, path: str) -> ValueTest | None:
        """A test of a stored value, or None for universal matching."""
        texts = [v for v in values if isinstance(v, str)]
        if not values or (len(texts) == len(values) == 1 and texts[0] in ("", "*")):
            return None
        shown = "\\".join(str(v) for v in values)
        self.given.append(f"{path}{_keyword(tag)}={shown}")
        if texts == ['""']:  # Empty Value Matching: the stored attribute is empty or absent
            return lambda stored: not _values(stored)
        if vr not in TEXT_VRS:
            # Binary and numeric binary keys (e.g. PregnancyStatus, US, which Table K.6-1 makes
            # a return key only): returned, not matched on, answered FF01.
            self.unsupported.append(path + _keyword(tag))
            return None
        if vr == "UI":
            if any("*" in v or "?" in v for v in texts):
                raise QueryError(f"wildcards are not allowed in {_keyword(tag)} (UI)", tag)
            uids = frozenset(texts)  # List of UID Matching
            return lambda stored: any(v in uids for v in _values(stored))
        if vr in ("DA", "TM", "DT"):
            if any(("*" in v or "?" in v) for v in texts):
                raise QueryError(f"wildcards are not allowed in {_keyword(tag)} ({vr})", tag)
            tests = [_range_test(vr, t, tag) for t in texts]
        elif vr == "PN":
            tests = [_pn_test(t, self.pn_fold) for t in texts]
        elif vr in WILDCARD_VRS:
            tests = [_text_test(t, False) for t in texts]
        elif vr in ("IS", "DS"):
            tests = [_number_test(t) for t in texts]
        else:
            tests = [_text_test(t, False) for t in texts]
        if len(tests) == 1:
            one = tests[0]

            def test_one(stored: Any) -> bool:
                if stored.__class__ is str:  # the common case: one value (or none, "")
                    return one(stored) if stored else False
                return any(one(v) for v in _values(stored))

            return test_one
        return lambda stored: any(t(v) for v in _values(stored) for t in tests)

    def exact_values(self, vr: str, values: tuple) -> frozenset[str] | None:
        """The values an exact (index-usable) condition admits, else None."""
        texts = [v for v in values if isinstance(v, str)]
        if not texts or len(texts) != len(values) or texts == ['""']:
            return None
        if any(v in ("", "*") for v in texts):
            return None
        if vr != "UI" and any("*" in v or "?" in v for v in texts):
            return None
        return frozenset(texts)

    def item(self, ds: Dataset, path: str, level: str) -> tuple[list, list[ReturnKey]]:
        """Tests and return keys of one level (the identifier, or a sequence's item)."""
        tests: list[RecordTest] = []
        returns: list[ReturnKey] = []
        elems = {int(e.tag): e for e in ds}
        skip: set[int] = set()
        if level == "sps":
            combined = self.combined_datetime(elems)
            if combined is not None:
                tests.append(combined)
                skip = {SPS_START_DATE, SPS_START_TIME}
        for tag, elem in sorted(elems.items()):
            if (
                tag >> 16 == 0x0002
                or tag & 0xFFFF == 0
                or tag
                in (
                    SPECIFIC_CHARACTER_SET,
                    QUERY_RETRIEVE_LEVEL,
                )
            ):
                continue
            vr = elem.VR
            if vr == "SQ":
                returns.append(self.sequence(tag, elem, path, tests))
                continue
            returns.append(ReturnKey(tag, vr))
            values = _query_values(vr, elem.value)
            _check_length(tag, vr, values)
            if tag in skip:
                continue
            test = self.value_test(tag, vr, values, path)
            if test is None:
                continue
            tests.append(lambda rec, tag=tag, test=test: test(rec.get(tag)))
            hint = (_TOP_HINTS if level == "top" else _SPS_HINTS if level == "sps" else {}).get(tag)
            exact = self.exact_values(vr, values) if hint else None
            if hint and exact is not None:
                setattr(self.hints, hint, exact)
            if level == "sps" and tag == SPS_START_DATE and len(values) == 1:
                self.hints.date_range = _date_bounds(values[0])
        return tests, returns

    def sequence(self, tag: int, elem: Any, path: str, tests: list) -> ReturnKey:
        items = list(elem.value or ())
        if len(items) > 1:
            raise QueryError(f"{_keyword(tag)} must hold at most one item in a query", tag)
        level = "sps" if tag == SPS_SEQUENCE and not path else "nested"
        if not items or len(items[0]) == 0:
            return ReturnKey(tag, "SQ", None)
        sub_tests, sub_returns = self.item(items[0], f"{path}{_keyword(tag)}>", level)
        key = ReturnKey(tag, "SQ", tuple(sub_returns))
        if sub_tests:
            key.select = _all_of(sub_tests)
            if level != "sps":  # the steps' test is added by compile_query, with the scoping
                tests.append(_any_item(tag, key.select))
        return key

    def combined_datetime(self, elems: dict) -> RecordTest | None:
        """SPS start date and time matched as one date-time range when the time is a range."""
        d_elem, t_elem = elems.get(SPS_START_DATE), elems.get(SPS_START_TIME)
        if d_elem is None or t_elem is None:
            return None
        dates = _query_values("DA", d_elem.value)
        times = _query_values("TM", t_elem.value)
        if len(dates) != 1 or len(times) != 1 or "-" not in times[0] or dates[0] in ("*", '""'):
            return None
        date, time = dates[0], times[0]
        d_lo, d_hi = _split_range(date, SPS_START_DATE) or (date, date)
        t_lo, t_hi = _split_range(time, SPS_START_TIME) or (time, time)
        lo_d, hi_d = canonical_date(d_lo) if d_lo else "", canonical_date(d_hi) if d_hi else ""
        lo_t = canonical_time(t_lo or "00")
        hi_t = canonical_time(t_hi or "23", high=True)
        if lo_d is None or hi_d is None or lo_t is None or hi_t is None:
            raise QueryError(f"bad date-time range {date!r} {time!r}", SPS_START_DATE)
        if lo_d and lo_d == hi_d and t_lo and t_hi and lo_t > hi_t:
            # One day with a time range across midnight (2200-0200): that night, into the next
            # day, as a time range alone would wrap.
            hi_d = (datetime.date.fromisoformat(hi_d) + datetime.timedelta(days=1)).strftime(
                "%Y%m%d"
            )
        lo = f"{lo_d}{lo_t}" if lo_d else ""
        hi = f"{hi_d}{hi_t}" if hi_d else ""
        self.given.append(f"ScheduledProcedureStepStartDate+Time={date} {time}")
        self.hints.date_range = (lo_d, hi_d)

        def test(rec: Record) -> bool:
            d = canonical_date(_first(rec.get(SPS_START_DATE)))
            t = canonical_time(_first(rec.get(SPS_START_TIME)))
            if d is None or t is None:
                return False
            s = d + t
            return (not lo or s >= lo) and (not hi or s <= hi)

        return test


# Maximum value lengths (characters) of PS3.5 Table 6.2-1; PN: of each component group. A range
# (DA, TM, DT) holds two values and a dash. UC, UR, UT and binary VRs are bounded by the
# identifier's size only.
MAX_VALUE_LENGTH = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
    "PN": 64, "SH": 16, "ST": 1024, "TM": 16, "UI": 64,
}  # fmt: skip


def _check_length(tag: int, vr: str, values: tuple) -> None:
    """Refuse (A900) a query value longer than its VR allows: no item can hold it, and its
    length would only cost matching time."""
    most = MAX_VALUE_LENGTH.get(vr)
    if most is None:
        return
    for value in values:
        if not isinstance(value, str):
            continue
        if vr == "PN":
            longest = max((len(group) for group in value.split("=")), default=0)
        elif vr in ("DA", "TM", "DT") and "-" in value:
            longest = max(len(part) for part in value.split("-"))
        else:
            longest = len(value)
        if longest > most:
            raise QueryError(f"{_keyword(tag)} longer than {vr} allows ({most})", tag)


def _date_bounds(text: str) -> tuple[str, str] | None:
    if text in ("*", '""'):
        return None
    lo, hi = _split_range(text, SPS_START_DATE) or (text, text)
    return (canonical_date(lo) or "" if lo else "", canonical_date(hi) or "" if hi else "")


def _all_of(tests: list[RecordTest]) -> RecordTest:
    if len(tests) == 1:
        return tests[0]

    def test(rec: Record) -> bool:
        for one in tests:  # a loop, not all(generator): this runs for every candidate's steps
            if not one(rec):
                return False
        return True

    return test


def _any_item(tag: int, select: RecordTest) -> RecordTest:
    def test(rec: Record) -> bool:
        items = rec.get(tag)
        if not isinstance(items, tuple):
            return False
        for item in items:
            if select(item):
                return True
        return False

    return test


def compile_query(
    identifier: Dataset,
    *,
    pn_case_insensitive: bool = True,
    hidden_statuses: Iterable[str] = (),
    station_aet: str | None = None,
) -> Query:
    """Compile a Modality Worklist C-FIND identifier.

    `hidden_statuses`: SPS statuses not returned unless the query's SPS status key names them.
    `station_aet`: when the query gives no station AE title, only steps scheduled on this AE
    title match (the "own items only" scoping). Raises QueryError for an identifier that
    cannot be processed.
    """
    compiler = _Compiler(pn_case_insensitive)
    tests, returns = compiler.item(identifier, "", "top")
    extras, scoped = _sps_extras(identifier, frozenset(hidden_statuses), station_aet)
    if scoped:
        compiler.hints.station_aets = frozenset({station_aet})
    sps_key = next((rk for rk in returns if rk.tag == SPS_SEQUENCE), None)
    step_tests = ([sps_key.select] if sps_key is not None and sps_key.select else []) + extras
    if step_tests:
        select = _all_of(step_tests)
        if sps_key is not None:
            sps_key.select = select  # the scoping also decides which steps are returned
        tests.append(_any_step(select))
    return Query(
        tests=tests,
        returns=tuple(returns),
        hints=compiler.hints,
        unsupported=tuple(compiler.unsupported),
        wants_charset=SPECIFIC_CHARACTER_SET in identifier,
        given=tuple(compiler.given),
    )


def _sps_extras(
    identifier: Dataset, hidden: frozenset[str], station_aet: str | None
) -> tuple[list[RecordTest], bool]:
    """Step-level conditions the scoping adds to the query's own; and whether the
    station AE title scoping is one of them."""
    sps_item = None
    seq = identifier.get(SPS_SEQUENCE)
    if seq is not None and seq.VR == "SQ" and seq.value:
        sps_item = seq.value[0]
    given: dict[int, tuple] = {}
    if sps_item is not None:
        for tag in (SPS_STATUS, STATION_AET):
            if tag in sps_item:
                given[tag] = _query_values(sps_item[tag].VR, sps_item[tag].value)
    extras: list[RecordTest] = []
    status_q = given.get(SPS_STATUS, ())
    if hidden and (not status_q or status_q == ("*",)):
        extras.append(lambda rec: _first(rec.get(SPS_STATUS)).upper() not in hidden)
    aet_q = given.get(STATION_AET, ())
    scoped = station_aet is not None and not _names_one_station(aet_q)
    if scoped:
        extras.append(lambda rec: station_aet in _values(rec.get(STATION_AET)))
    return extras, scoped


def _names_one_station(values: tuple) -> bool:
    """The station AE title key names exactly one station: one value, no wildcard. Only such a
    key widens own-items-only scoping; any other (absent, empty, `*`, `**`, `?*`, `*1`,
    `CT01\\MR01`, `""`) is matched within the calling AE title's own steps."""
    if len(values) != 1 or not isinstance(values[0], str):
        return False
    value = values[0]
    return bool(value) and value != '""' and "*" not in value and "?" not in value


def _any_step(select: RecordTest) -> RecordTest:
    """One step of the item passes `select`. An item without steps is tested as one empty
    step: it has no status to hide, but no station AE title or other value to match either."""

    def test(rec: Record) -> bool:
        items = rec.get(SPS_SEQUENCE)
        if not isinstance(items, tuple) or not items:
            return select(_EMPTY)
        for item in items:
            if select(item):
                return True
        return False

    return test


_EMPTY = Record(layout_of(()), ())
