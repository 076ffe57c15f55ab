"""The field map as data: the built-in rows, a site's `[mapping]` and `[code-tables]`, checked.

A row says where one DICOM attribute comes from: an HL7 location (`PV1-3`, `OBR-4.1`), or a list
of them where the first non-empty one wins; a table `{ORM = ..., OMI = ...}` when OMI^O23 reads
elsewhere than ORM^O01 and OMG^O19. A site's row replaces the built-in row of its attribute
(both message families, unless the table names only one). A code table translates the value a
row read; `"*"` is the value of anything unlisted. `bridge.hl7.order` reads the effective rows; the
attributes come from `bridge.core.attributes`. Imports nothing else from the package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from bridge.core.attributes import DERIVED, ORDER, PATIENT, SPS_SEQUENCE, Attribute, find

# The segments a step is read from, and their fields in HL7 v2.5.1 (the latest version read;
# earlier ones have fewer). ZDS is IHE's Z-segment: ZDS-1 is the Study Instance UID.
SEGMENT_FIELDS = {
    "MSH": 21, "PID": 39, "PV1": 52, "ORC": 31, "TQ1": 14, "OBR": 50, "ZDS": 1, "IPC": 9,
}  # fmt: skip
FAMILIES = ("ORM", "OMI")  # ORM covers OMG^O19
_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})-([1-9][0-9]{0,2})(?:\.([1-9][0-9]?))?")
MAX_SOURCES = 16  # locations in one row
MAX_CODES = 1000  # entries in one code table
# How a row's HL7 value becomes the attribute's: order._StepReader has one reader per kind.
KINDS = {
    "text": "",  # the component as it is
    "upper": "upper-cased",
    "cwe-text": "text of the CWE (component 2), else its code",
    "repeats": "every repetition (multi-valued)",
    "xcn": "XCN -> PN",
    "ndl": "NDL (id&family&given...) or XCN -> PN",
    "priority": "S STAT; A, P, C HIGH; R ROUTINE; T MEDIUM",
    "dtm": "DTM -> start date, start time, TimezoneOffsetFromUTC",
    "procedure": "CWE -> code sequence and RequestedProcedureDescription",
    "protocol": "CWE (protocol-code-source) -> code sequence and SPS description",
}
_NOT_TRANSLATED = ("dtm", "procedure", "protocol")  # values that are not one code


@dataclass(frozen=True)
class Row:
    """One attribute's sources, as the reader uses them."""

    keyword: str
    orm: tuple[str, ...]  # locations for ORM^O01 and OMG^O19, as written
    omi: tuple[str, ...]  # locations for OMI^O23
    kind: str
    origin: str = "built-in"  # or "site"
    codes: tuple[tuple[str, str], ...] = ()  # the code table, in the order written
    # the locations parsed once, (segment, field, component), for the reader
    orm_sources: tuple[tuple[str, int, int], ...] = field(init=False, repr=False, compare=False)
    omi_sources: tuple[tuple[str, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "orm_sources", tuple(parse(text) for text in self.orm))
        object.__setattr__(self, "omi_sources", tuple(parse(text) for text in self.omi))


def parse(location: str) -> tuple[str, int, int]:
    """`OBR-27.4` -> ("OBR", 27, 4); `PV1-3` is component 1. ValueError if malformed."""
    match = _LOCATION.fullmatch(location)
    if match is None:
        raise ValueError(location)
    segment, field_no, component = match.groups()
    return segment, int(field_no), int(component or 1)


def _check_location(location: Any, setting: str) -> str:
    if not isinstance(location, str):
        raise ValueError(f'{setting}: {location!r} is not an HL7 location (write "OBR-24")')
    try:
        segment, field_no, _ = parse(location.strip())
    except ValueError:
        raise ValueError(
            f"{setting}: {location!r} is not an HL7 location; write a segment, a field and "
            'optionally a component, as "OBR-24" or "OBR-4.1"'
        ) from None
    if segment not in SEGMENT_FIELDS:
        raise ValueError(
            f"{setting}: {location!r} names segment {segment}, which the bridge does not read; "
            f"locations are in {', '.join(SEGMENT_FIELDS)}"
        )
    if field_no > SEGMENT_FIELDS[segment]:
        raise ValueError(f"{setting}: {location!r}: {segment} has {SEGMENT_FIELDS[segment]} fields")
    return location.strip()


def _locations(value: Any, setting: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_SOURCES:
        raise ValueError(f"{setting}: at most {MAX_SOURCES} locations, not {len(items)}")
    return tuple(_check_location(item, setting) for item in items if item != "")


def _attribute(name: Any, setting: str) -> Attribute:
    """The attribute a [mapping] or [code-tables] key names, if a site may map it."""
    attribute = find(name) if isinstance(name, str) else None
    if attribute is None:
        raise ValueError(
            f"{setting}: {name!r} is not an attribute of the worklist item; write a DICOM "
            "keyword such as Modality or CurrentPatientLocation, bare or with its sequence "
            "(ScheduledProcedureStepSequence.Modality); `wlbridge mapping` lists the rows"
        )
    if attribute.source == PATIENT:
        raise ValueError(
            f"{setting}: {attribute.keyword} is read from PID by the patient rules "
            "(docs/mapping.md) and cannot be mapped"
        )
    if attribute.source == DERIVED:
        raise ValueError(
            f"{setting}: {attribute.keyword} is set by the bridge from other values "
            "(docs/mapping.md) and cannot be mapped"
        )
    if attribute.source != ORDER:
        raise ValueError(f"{setting}: {attribute.keyword} has no HL7 source and cannot be mapped")
    return attribute


def _flatten(table: dict) -> dict:
    """`ScheduledProcedureStepSequence.Modality = ...` written without quotes is a nested table
    in TOML: the same as the quoted key."""
    flat = {}
    for name, value in table.items():
        if name == SPS_SEQUENCE and isinstance(value, dict) and not set(value) & set(FAMILIES):
            flat.update({f"{SPS_SEQUENCE}.{key}": inner for key, inner in value.items()})
        else:
            flat[name] = value
    return flat


def default_kind(attribute: Attribute) -> str:
    """How a site's row for an attribute without a built-in row is read."""
    return {"PN": "xcn", "CS": "upper"}.get(attribute.vr, "text")


def _site_rows(mapping: dict, defaults: dict[str, Row]) -> dict[str, Row]:
    if not isinstance(mapping, dict):
        raise ValueError('mapping must be a table: [mapping] with rows like Modality = "OBR-24"')
    rows: dict[str, Row] = {}
    named: dict[str, str] = {}
    for name, value in _flatten(mapping).items():
        setting = f"mapping.{name}"
        attribute = _attribute(name, setting)
        if attribute.keyword in named:
            earlier = named[attribute.keyword]
            raise ValueError(f"{setting}: {attribute.keyword} is already mapped as {earlier!r}")
        named[attribute.keyword] = name
        default = defaults.get(attribute.keyword)
        if isinstance(value, dict):
            unknown = [key for key in value if key not in FAMILIES]
            if unknown:
                raise ValueError(
                    f"{setting}: {unknown[0]!r} is not a message family; write ORM (ORM^O01 "
                    "and OMG^O19) and OMI (OMI^O23)"
                )
            orm = _locations(value["ORM"], f"{setting}.ORM") if "ORM" in value else None
            omi = _locations(value["OMI"], f"{setting}.OMI") if "OMI" in value else None
            # a family not named keeps the built-in sources
            orm = orm if orm is not None else (default.orm if default else ())
            omi = omi if omi is not None else (default.omi if default else ())
        else:
            orm = omi = _locations(value, setting)
        kind = default.kind if default else default_kind(attribute)
        rows[attribute.keyword] = Row(attribute.keyword, orm, omi, kind, "site")
    return rows


def _code_tables(code_tables: dict, kinds: dict[str, str]) -> dict[str, tuple]:
    if not isinstance(code_tables, dict):
        raise ValueError('code-tables must be tables: [code-tables.Modality] with RX = "CR"')
    tables: dict[str, tuple] = {}
    for name, table in _flatten(code_tables).items():
        setting = f"code-tables.{name}"
        attribute = _attribute(name, setting)
        if attribute.keyword in tables:
            raise ValueError(f"{setting}: {attribute.keyword} has a code table already")
        kind = kinds.get(attribute.keyword, default_kind(attribute))
        if kind in _NOT_TRANSLATED or attribute.vr in ("SQ", "DA", "TM"):
            raise ValueError(
                f"{setting}: {attribute.keyword} ({attribute.vr}) is not a single code; "
                "a code table cannot translate it"
            )
        if not isinstance(table, dict):
            raise ValueError(f'{setting}: write a table of values, as [{setting}] RX = "CR"')
        if len(table) > MAX_CODES:
            raise ValueError(f"{setting}: at most {MAX_CODES} entries, not {len(table)}")
        for code, value in table.items():
            if not isinstance(value, str):
                raise ValueError(f"{setting}.{code}: {value!r} must be a string")
            problem = _vr_problem(value, attribute)
            if problem:
                raise ValueError(f"{setting}.{code}: {value!r} {problem}")
        tables[attribute.keyword] = tuple(table.items())
    return tables


def _vr_problem(value: str, attribute: Attribute) -> str:
    if attribute.vr == "CS" and not re.fullmatch(r"[A-Z0-9 _]*", value):
        return "is not a DICOM code string (upper-case letters, digits, space, underscore)"
    if attribute.max_length is not None and len(value) > attribute.max_length:
        return f"is longer than {attribute.keyword}'s {attribute.max_length} characters"
    if "\\" in value:
        return "contains a backslash, DICOM's value separator"
    return ""


def default_rows(fields: tuple[tuple[str, str, str, str], ...]) -> tuple[Row, ...]:
    """The built-in rows (order.ORDER_FIELDS: keyword, ORM sources, OMI sources or "=", kind).
    ValueError for a row the registry cannot take: raised at import, not per message."""
    rows = []
    for keyword, orm, omi, kind in fields:
        setting = f"built-in mapping row {keyword}"
        attribute = _attribute(keyword, setting)
        if attribute.keyword != keyword or kind not in KINDS:
            raise ValueError(f"{setting}: write the bare keyword and a kind of {list(KINDS)}")
        orm_locations = _locations(orm.split(), setting)
        omi_locations = orm_locations if omi == "=" else _locations(omi.split(), setting)
        rows.append(Row(keyword, orm_locations, omi_locations, kind))
    return tuple(rows)


def check_mapping(mapping: dict, code_tables: dict) -> None:
    """ValueError, as a sentence naming the setting, for a `[mapping]` row or code table that
    cannot work (an unknown attribute or location). For start-up (config validation)."""
    _site_rows(mapping, {})
    _code_tables(code_tables, {})


def effective_rows(defaults: tuple[Row, ...], mapping: dict, code_tables: dict) -> tuple[Row, ...]:
    """The rows the reader uses: the built-in ones, each replaced by the site's row of its
    attribute; the site's rows for other attributes follow; code tables attached."""
    if not mapping and not code_tables:
        return defaults
    key = (id(defaults), repr(mapping), repr(code_tables))  # TOML values: repr is exact
    cached = _EFFECTIVE.get(key)
    if cached is not None and cached[0] is defaults:
        return cached[1]
    rows = _effective(defaults, mapping, code_tables)
    if len(_EFFECTIVE) >= 16:  # per message otherwise; a process has one or two configs
        _EFFECTIVE.clear()
    _EFFECTIVE[key] = (defaults, rows)
    return rows


_EFFECTIVE: dict[tuple[int, str, str], tuple[tuple[Row, ...], tuple[Row, ...]]] = {}


def _effective(defaults: tuple[Row, ...], mapping: dict, code_tables: dict) -> tuple[Row, ...]:
    by_keyword = {row.keyword: row for row in defaults}
    site = _site_rows(mapping, by_keyword)
    merged = {**by_keyword, **site}
    tables = _code_tables(code_tables, {k: r.kind for k, r in merged.items()})
    rows = []
    for keyword, row in merged.items():
        if keyword in tables:
            row = Row(row.keyword, row.orm, row.omi, row.kind, row.origin, tables[keyword])
        rows.append(row)
    return tuple(rows)


def translate(value: str, codes: tuple[tuple[str, str], ...]) -> str:
    """A code table applied to one value: its entry, else "*"'s (not for an empty value, which
    only an entry "" translates), else the value unchanged."""
    for code, target in codes:
        if code == value:
            return target
    if value:
        for code, target in codes:
            if code == "*":
                return target
    return value


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_locations(locations: tuple[str, ...]) -> str:
    if len(locations) == 1:
        return json.dumps(locations[0])
    return "[" + ", ".join(json.dumps(text) for text in locations) + "]"


def format_toml(rows: tuple[Row, ...]) -> str:
    """The rows as the `[mapping]` and `[code-tables]` of a config file (valid TOML)."""
    lines = ["[mapping]"]
    for row in rows:
        attribute = find(row.keyword)
        key = _toml_key(attribute.path if attribute else row.keyword)
        if row.orm == row.omi:
            value = _toml_locations(row.orm)
        else:
            value = f"{{ ORM = {_toml_locations(row.orm)}, OMI = {_toml_locations(row.omi)} }}"
        if not row.orm and not row.omi:
            value = "[]"
        note = "; ".join(
            t for t in (KINDS[row.kind], "site row" if row.origin == "site" else "") if t
        )
        lines.append(f"{key} = {value}" + (f"  # {note}" if note else ""))
    for row in rows:
        if row.codes:
            attribute = find(row.keyword)
            key = _toml_key(attribute.path if attribute else row.keyword)
            lines += ["", f"[code-tables.{key}]"]
            lines += [f"{_toml_key(code)} = {json.dumps(target)}" for code, target in row.codes]
    return "\n".join(lines) + "\n"
