"""Settings: defaults, a TOML config file, and command-line options (the command line wins).

Every setting has one name; relative paths are relative to the working directory. In the
TOML file a name is written with dashes or underscores
(`mllp-port = 2575`); on the command line as `--mllp-port 2575`. Settings whose values are
structured (station rules) exist in the file only.

Everything is checked on loading: each value's type, choices and ranges, AE titles, unknown keys.
A mistake is a ConfigError: one sentence naming the file (or the command line), the setting and
what to write instead. `check_files` adds, for the server, what can only be checked on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
FINISHED_STATUSES = ("COMPLETED", "DISCONTINUED", "CANCELED")
# Scheduled Procedure Step Status (0040,0020), PS3.3 C.4.10: the terms an item may carry.
SPS_STATUS_TERMS = (
    "SCHEDULED",
    "ARRIVED",
    "READY",
    "STARTED",
    "DEPARTED",
    "COMPLETED",
    "DISCONTINUED",
    "CANCELED",
)
PROCESSING_IDS = ("P", "T", "D")  # HL7 table 0103
AE_TITLE_MAX = 16  # PS3.5 6.2: AE is at most 16 characters
SH_MAX = 16


def _opt(help_text: str, cli: bool = True, **kwargs: Any) -> Any:
    return field(metadata={"help": help_text, "cli": cli}, **kwargs)


@dataclass
class StationRule:
    """Sets the scheduled station of items whose message fields match.

    `match` maps an HL7 location (`OBR-24`, `MSH-4`, `PV1-3.1`) to an exact value, or to a regular
    expression written between slashes (`/^CT/`). A rule with an empty `match` always matches (the
    default rule). The first matching rule wins; IPC-9 in the message wins over every rule.
    """

    match: dict[str, str] = field(default_factory=dict)
    ae_titles: list[str] = field(default_factory=list)
    station_name: str = ""


HOUSEKEEPING_ACTIONS = ("discontinue", "remove")
HOUSEKEEPING_STATUSES = ("SCHEDULED", "ARRIVED", "READY", "STARTED")


@dataclass
class HousekeepingRule:
    """Items in `status` whose SPS start is more than `after_hours` past are discontinued (or
    removed). With `stations`, only items scheduled on one of those AE titles."""

    status: str = "SCHEDULED"
    after_hours: float = 24.0
    action: str = "discontinue"
    stations: list[str] = field(default_factory=list)


@dataclass
class OutboundReceiver:
    """A RIS (or any HL7 peer) that hears the order status changes, one `[[outbound]]` table."""

    name: str = ""  # names its outbox folder; letters, digits, `.`, `_`, `-`
    host: str = ""
    port: int = 0
    message: str = "ORM^O01"  # ORM^O01 (v2.3.1), OMG^O19 or OMI^O23 (v2.5.1)
    sending_application: str = "WLBRIDGE"  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    processing_id: str = "P"  # MSH-11
    charset: str = "UNICODE UTF-8"  # MSH-18; values it cannot carry become `?`
    tls_ca: str = ""  # TLS: CA (PEM) the receiver's certificate must chain to
    tls_cert: str = ""  # TLS client certificate (PEM), if the receiver asks for one
    tls_key: str = ""
    connect_timeout: float = 10.0  # seconds to connect
    ack_timeout: float = 30.0  # seconds to wait for the ACK once the message is sent
    send_housekeeping: bool = False  # also report changes made by the housekeeping
    retry_initial: float = 5.0  # seconds before the first retry; doubled each time
    retry_max: float = 300.0  # longest wait between two tries
    max_attempts: int = 10  # refusals (AE/AR, no ACK, dropped) before a message is parked


@dataclass
class Settings:
    # Network
    host: str = _opt("address both servers listen on", default="0.0.0.0")
    mllp_port: int = _opt("MLLP (HL7) listening port", default=2575)
    dicom_port: int = _opt("DICOM (C-FIND, C-ECHO) listening port", default=11112)
    ae_title: str = _opt("the bridge's own DICOM AE title", default="WLBRIDGE")

    # Files
    worklist_dir: Path = _opt("folder of .wl files served by C-FIND", default=Path("./worklists"))
    store: str = _opt(
        "where the worklist, MPPS instances, the outbox, the retry memory and kept rejected "
        "messages live: empty for the folders; a postgresql://user@host/db URL to share them "
        "between bridges "
        "(run `wlbridge db upgrade --store URL` first)",
        default="",
    )
    worklist_layout: str = _opt(
        "flat (one folder) or per-ae (one sub-folder per called AE title, as wlmscpfs)",
        default="flat",
    )
    translation_log: str = _opt(
        "file the translation log is appended to; - for standard output",
        default="./logs/translation.log",
    )
    translation_log_format: str = _opt("logfmt or json", default="logfmt")
    rejected_dir: Path = _opt(
        "folder where messages that were not applied are kept as received",
        default=Path("./rejected"),
    )
    mpps_dir: Path = _opt(
        "folder where MPPS instances are kept (one DICOM file each)", default=Path("./mpps")
    )
    mpps_retention: float = _opt(
        "hours a finished (COMPLETED or DISCONTINUED) MPPS instance is kept after its last "
        "change; a sweep removes older ones",
        default=720.0,
    )
    mpps_in_progress_retention: float = _opt(
        "hours an MPPS instance left IN PROGRESS (no final N-SET) is kept after its last "
        "change; at least mpps-retention",
        default=2160.0,
    )
    mpps_max_instances: int = _opt(
        "most MPPS instances kept; an N-CREATE beyond it is refused 0213 (resource limitation)",
        default=100_000,
    )
    outbox_dir: Path = _opt(
        "folder of order status messages waiting for their receiver (one sub-folder each)",
        default=Path("./outbox"),
    )
    outbox_lease: float = _opt(
        "seconds a bridge holds a claimed outbound message (PostgreSQL store; renewed while "
        "sending): another bridge sends it once a dead bridge's lease ends",
        default=30.0,
    )

    # Order status back to the RIS
    outbound: list[OutboundReceiver] = _opt(
        "receivers of order status updates, [[outbound]] tables (config file only)",
        cli=False,
        default_factory=list,
    )

    # MLLP limits
    max_frame_size: int = _opt("largest accepted MLLP frame, in bytes", default=1024 * 1024)
    idle_timeout: float = _opt("seconds an MLLP connection may stay silent", default=300.0)
    max_connections: int = _opt("concurrent MLLP connections", default=200)
    max_connections_per_source: int = _opt(
        "concurrent MLLP connections from one address, so one source cannot take them all "
        "(0: no limit of its own)",
        default=100,
    )
    frame_timeout: float = _opt(
        "seconds an MLLP frame may take from its start byte to its end (0: no limit)",
        default=30.0,
    )
    allowed_mllp_sources: list[str] = _opt(
        "addresses allowed to connect over MLLP (empty: any)", cli=False, default_factory=list
    )

    # HL7 acceptance
    processing_ids: list[str] = _opt(
        "accepted MSH-11 processing IDs", cli=False, default_factory=lambda: ["P", "T", "D"]
    )
    primary_issuer: str = _opt(
        "PID-3.4 issuer whose identifier becomes PatientID (else the first repetition)", default=""
    )
    missing_study_uid: str = _opt(
        "derive (a stable UID from the order) or reject (AE 101)", default="derive"
    )
    overlong_values: str = _opt(
        "reject (AE 102) or truncate (and log) values longer than their DICOM VR allows",
        default="reject",
    )
    strict: bool = _opt(
        "check messages to the letter of HL7: refuse what is otherwise accepted with a note "
        "(docs/hl7.md lists each check)",
        default=False,
    )
    default_charset: str = _opt(
        "charset of a message with an empty MSH-18 whose bytes are not UTF-8 "
        "(an MSH-18 label; ascii refuses 8-bit bytes, as HL7 says)",
        default="8859/1",
    )
    charset_fallback: dict[str, str] = _opt(
        "per MSH-18 label, the charset for bytes that label cannot decode, e.g. "
        '"8859/1" = "windows-1252" (config file only)',
        cli=False,
        default_factory=dict,
    )
    pid2_as_patient_id: bool = _opt(
        "use PID-2 (patient ID, kept for backward compatibility) when PID-3 is empty, with a note",
        default=True,
    )
    protocol_code_source: str = _opt(
        "OBR-4 components feeding the protocol code: alternate-first, primary or alternate",
        default="alternate-first",
    )
    allow_patient_change_by_order: bool = _opt(
        "let an order message (NW, XO...) move a known order to another patient; off: AE 205",
        default=False,
    )
    station_rules: list[StationRule] = _opt(
        "scheduled station rules (config file only)", cli=False, default_factory=list
    )
    mapping: dict[str, Any] = _opt(
        "[mapping] rows: DICOM keyword = HL7 location or list of them, replacing the built-in "
        "row of that attribute (config file only)",
        cli=False,
        default_factory=dict,
    )
    code_tables: dict[str, dict[str, str]] = _opt(
        '[code-tables.<keyword>] translations of mapped values; "*" for anything unlisted '
        "(config file only)",
        cli=False,
        default_factory=dict,
    )

    # Worklist life cycle
    hidden_statuses: list[str] = _opt(
        "SPS statuses that C-FIND does not return",
        cli=False,
        default_factory=lambda: ["STARTED", *FINISHED_STATUSES],
    )
    finished_retention: float = _opt(
        "hours a finished (completed, cancelled, discontinued) item's file is kept; 0 deletes it",
        default=0.0,
    )
    housekeeping: list[HousekeepingRule] = _opt(
        "idle-item rules: [[housekeeping]] status, after-hours, action, stations (file only)",
        cli=False,
        default_factory=list,
    )
    housekeeping_interval: float = _opt(
        "seconds between housekeeping rounds (when [[housekeeping]] rules are set)", default=300.0
    )

    # C-FIND
    pn_case_insensitive: bool = _opt("match person names case-insensitively", default=True)
    own_items_only: bool = _opt(
        "answer a query without a station AE title with the calling AE title's items only",
        default=False,
    )
    allowed_calling_aets: list[str] = _opt(
        "calling AE titles allowed to query (empty: any)", cli=False, default_factory=list
    )
    max_answers: int = _opt("most answers to one C-FIND (0: no limit)", default=0)
    max_associations: int = _opt("concurrent DICOM associations", default=50)
    max_associations_per_source: int = _opt(
        "concurrent DICOM associations from one address, so one source cannot take them all "
        "(0: only max-associations)",
        default=40,
    )
    acse_timeout: float = _opt("DICOM ACSE timeout, seconds", default=30.0)
    dimse_timeout: float = _opt("DICOM DIMSE timeout, seconds", default=30.0)
    network_timeout: float = _opt("DICOM network timeout, seconds", default=60.0)
    max_associate_request_size: int = _opt(
        "largest A-ASSOCIATE-RQ PDU accepted, in bytes (longer: A-ABORT)", default=32 * 1024
    )
    max_identifier_size: int = _opt(
        "largest C-FIND identifier accepted, in bytes (longer: A-ABORT)", default=256 * 1024
    )
    max_search_time: float = _opt(
        "seconds one C-FIND may spend matching before it is answered A700", default=10.0
    )
    dicom_speedups: bool = _opt(
        "use the bridge's tuning of pynetdicom internals (fast answers, no polling threads)",
        default=True,
    )
    dicom_workers: int = _opt(
        "processes serving DICOM (C-FIND, C-ECHO; MPPS forwarded to the main process) on the"
        " one port, so that queries use the cores and never slow HL7 intake; 0: in-process;"
        " -1 (the default): one per CPU, at most max-associations",
        default=-1,
    )
    index_poll_interval: float = _opt(
        "seconds between scans of the worklist folder for changes made by other programs",
        default=1.0,
    )

    # TLS (empty: plain TCP)
    mllp_tls_cert: str = _opt("MLLP TLS certificate (PEM)", default="")
    mllp_tls_key: str = _opt("MLLP TLS private key (PEM)", default="")
    mllp_tls_ca: str = _opt("CA (PEM) that MLLP client certificates must chain to", default="")
    dicom_tls_cert: str = _opt("DICOM TLS certificate (PEM)", default="")
    dicom_tls_key: str = _opt("DICOM TLS private key (PEM)", default="")
    dicom_tls_ca: str = _opt("CA (PEM) that DICOM client certificates must chain to", default="")

    # HTTP: admin API, web view, /metrics, health checks (off unless http_port is set)
    http_port: int = _opt("HTTP port of the admin API, web view and metrics (0: off)", default=0)
    http_host: str = _opt("address the HTTP listener binds to", default="127.0.0.1")
    http_token_file: str = _opt("file holding the admin bearer token (read and write)", default="")
    http_read_token_file: str = _opt(
        "file holding the reader bearer token (GET only; empty: no reader token)", default=""
    )
    http_tls_cert: str = _opt("HTTP TLS certificate (PEM); empty: plain HTTP", default="")
    http_tls_key: str = _opt("HTTP TLS private key (PEM)", default="")
    http_metrics_need_token: bool = _opt(
        "require a token for /metrics too (else it is open, like /healthz and /readyz)",
        default=False,
    )
    ready_min_free_mb: float = _opt(
        "free space (MB) the worklist folder's disk needs for /readyz to answer ready",
        default=100.0,
    )
    ready_outbox_max_age: float = _opt(
        "seconds the oldest outbound message may wait before /readyz says the outbox is stuck",
        default=900.0,
    )


def setting_names() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Settings)}


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and one option per scalar setting; unset options stay None."""
    parser.add_argument("--config", type=Path, help="TOML config file")
    for f in dataclasses.fields(Settings):
        if not f.metadata.get("cli"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{f.metadata['help']} (default: {default})",
            )
        else:
            kind = type(default) if default is not dataclasses.MISSING else str
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=None,
                metavar=f.name.upper(),
                help=f"{f.metadata['help']} (default: {default})",
            )


class ConfigError(ValueError):
    """A setting that cannot work, said as a sentence naming where it came from (the file or the
    command line), the setting, and what to write instead."""


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _origin(settings: Settings, name: str) -> str:
    """Where a setting's value came from, for error messages."""
    return getattr(settings, "sources", {}).get(name, "the defaults")


def _describe(value: Any) -> str:
    kind = {
        int: "a number",
        float: "a number",
        str: "the string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    if isinstance(value, bool):
        return "true" if value else "false"
    shown = repr(value) if not isinstance(value, (list, dict)) else str(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


def _default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_STATION_RULE_KEYS = {f.name: f for f in dataclasses.fields(StationRule)}


def _station_rules(where: str, value: Any) -> list[StationRule]:
    example = (
        '[[station-rules]]\nmatch = { "OBR-24" = "CT" }\nae-titles = ["CT01"]\n'
        'station-name = "CT ROOM 1"'
    )
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ConfigError(
            f"{where}: station-rules must be tables written as [[station-rules]], "
            f"not {_describe(value)}; for example:\n{example}"
        )
    rules = []
    for n, table in enumerate(value, start=1):
        here = f"{where}: station rule {n}"
        values: dict[str, Any] = {}
        for key, item in table.items():
            name = key.replace("-", "_")
            if name not in _STATION_RULE_KEYS:
                known = [_dashed(k) for k in _STATION_RULE_KEYS]
                raise ConfigError(
                    f"{here}: unknown key {key!r}{_suggest(_dashed(name), known)}; "
                    f"the keys of a station rule are {', '.join(known)}"
                )
            values[name] = item
        match = values.get("match", {})
        if not isinstance(match, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in match.items()
        ):
            raise ConfigError(
                f"{here}: match must be a table of HL7 locations and values, "
                f'e.g. match = {{ "OBR-24" = "CT" }}, not {_describe(match)}'
            )
        titles = values.get("ae_titles", [])
        if isinstance(titles, str):
            raise ConfigError(
                f"{here}: ae-titles must be a list, e.g. ae-titles = [{titles!r}], "
                f"not the string {titles!r}".replace("'", '"')
            )
        if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
            raise ConfigError(
                f'{here}: ae-titles must be a list of AE titles, e.g. ae-titles = ["CT01"], '
                f"not {_describe(titles)}"
            )
        for title in titles:
            problem = ae_title_problem(title)
            if problem:
                raise ConfigError(f"{here}: ae-titles: {problem}")
        station_name = values.get("station_name", "")
        if not isinstance(station_name, str):
            raise ConfigError(
                f'{here}: station-name must be a string, e.g. station-name = "CT ROOM 1", '
                f"not {_describe(station_name)}"
            )
        if len(station_name) > SH_MAX:
            raise ConfigError(
                f"{here}: station-name {station_name!r} is {len(station_name)} characters; "
                f"Scheduled Station Name (SH) holds at most {SH_MAX}"
            )
        rules.append(
            StationRule(match=dict(match), ae_titles=list(titles), station_name=station_name)
        )
    return rules


def receivers_from_toml(value: Any) -> list[OutboundReceiver]:
    """The `[[outbound]]` tables as receivers; a mistake is a sentence naming the setting."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError("outbound must be a list of [[outbound]] tables")
    defaults = {f.name: f.default for f in dataclasses.fields(OutboundReceiver)}
    receivers = []
    for number, table in enumerate(value, 1):
        where = f"outbound #{number}" + (f" ({table['name']})" if "name" in table else "")
        values: dict[str, Any] = {}
        for key, item in table.items():
            name = key.replace("-", "_")
            if name not in defaults:
                raise ValueError(f"{where}: unknown setting {key!r}")
            default = defaults[name]
            if isinstance(default, bool):
                ok = isinstance(item, bool)
            elif isinstance(default, float):
                ok = isinstance(item, int | float) and not isinstance(item, bool)
                item = float(item) if ok else item
            elif isinstance(default, int):
                ok = isinstance(item, int) and not isinstance(item, bool)
            else:
                ok = isinstance(item, str)
            if not ok:
                kind = {bool: "true or false", float: "a number", int: "an integer"}.get(
                    type(default), "a string"
                )
                raise ValueError(f"{where}: {key} must be {kind}")
            values[name] = item
        receivers.append(OutboundReceiver(**values))
    return receivers


def _coerce(name: str, value: Any, where: str = "the command line") -> Any:
    """The value of one setting in its type, or a ConfigError saying what to write instead."""
    f = setting_names()[name]
    default = _default_of(f)
    key = _dashed(name)
    if name == "station_rules":
        return _station_rules(where, value)
    if name in ("housekeeping", "outbound"):
        try:
            if name == "housekeeping":
                return _housekeeping_rules(value)
            return receivers_from_toml(value)
        except ConfigError:
            raise
        except ValueError as exc:  # the sentence names the file too
            raise ConfigError(f"{where}: {exc}") from None
    if isinstance(default, Path):
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(
                f'{where}: {key} must be a folder path, e.g. {key} = "{default}", '
                f"not {_describe(value)}"
            )
        return Path(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where}: {key} must be true or false (without quotes), not {_describe(value)}"
            )
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{where}: {key} must be a number, e.g. {key} = {default}, not {_describe(value)}"
            )
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{where}: {key} must be a whole number without quotes, e.g. {key} = {default}, "
                f"not {_describe(value)}"
            )
        return value
    if isinstance(default, list):
        if isinstance(value, str):
            raise ConfigError(
                f'{where}: {key} must be a list, e.g. {key} = ["{value}"], not the string "{value}"'
            )
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f'{where}: {key} must be a list of strings, e.g. {key} = ["A", "B"], '
                f"not {_describe(value)}"
            )
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{key}] must be a table, not {_describe(value)}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(
                f'{where}: {key} must be a string in quotes, e.g. {key} = "{value}", '
                f"not {_describe(value)}"
            )
        return value
    if not isinstance(value, type(default)):
        raise ConfigError(f"{where}: {key} must be of type {type(default).__name__}")
    return value


def _housekeeping_rules(value: Any) -> list[HousekeepingRule]:
    if not isinstance(value, list):
        raise ValueError("housekeeping must be a list of [[housekeeping]] tables")
    known = {f.name for f in dataclasses.fields(HousekeepingRule)}
    rules = []
    for number, table in enumerate(value, 1):
        where = f"housekeeping rule {number}"
        if not isinstance(table, dict):
            raise ValueError(f"{where} must be a table ([[housekeeping]])")
        fields = {k.replace("-", "_"): v for k, v in table.items()}
        for key in fields:
            if key not in known:
                raise ValueError(f"{where}: unknown key {key.replace('_', '-')!r}")
        rule = HousekeepingRule(**fields)
        if not isinstance(rule.status, str) or rule.status.upper() not in HOUSEKEEPING_STATUSES:
            raise ValueError(f"{where}: status must be one of {', '.join(HOUSEKEEPING_STATUSES)}")
        rule.status = rule.status.upper()
        hours = rule.after_hours
        if isinstance(hours, bool) or not isinstance(hours, int | float) or hours <= 0:
            raise ValueError(f"{where}: after-hours must be a number of hours above 0")
        rule.after_hours = float(hours)
        if rule.action not in HOUSEKEEPING_ACTIONS:
            raise ValueError(f"{where}: action must be one of {', '.join(HOUSEKEEPING_ACTIONS)}")
        if not isinstance(rule.stations, list) or not all(
            isinstance(s, str) and s.strip() for s in rule.stations
        ):
            raise ValueError(f"{where}: stations must be a list of AE titles")
        rule.stations = [s.strip() for s in rule.stations]
        rules.append(rule)
    return rules


def load_settings(
    config: Path | None = None,
    overrides: dict[str, Any] | None = None,
    checks: Iterable[SettingCheck] = (),
) -> Settings:
    """Settings from defaults, then the TOML file, then non-None overrides (command line),
    checked by `validate` (with `checks`; bridge.app.settings_checks.load_settings passes all).

    Raises ConfigError (a ValueError) with a sentence for anything that could not work."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    known = setting_names()
    if config is not None:
        try:
            with open(config, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{config}: no such config file") from None
        except OSError as exc:
            raise ConfigError(f"{config}: cannot read the config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{config}: not valid TOML: the file is not UTF-8") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                dashed = [_dashed(k) for k in known]
                raise ConfigError(
                    f"{config}: unknown setting {key!r}{_suggest(_dashed(name), dashed)}; "
                    f"the settings are listed in the README (known: {', '.join(dashed)})"
                )
            values[name] = _coerce(name, value, str(config))
            sources[name] = str(config)
    for name, value in (overrides or {}).items():
        if value is not None and name in known:
            values[name] = _coerce(name, value, "the command line")
            sources[name] = "the command line"
    settings = Settings(**values)
    settings.sources = sources  # not a field: where each value came from, for error messages
    validate(settings, checks)
    return settings


def ae_title_problem(title: str) -> str:
    """Why a string cannot be an AE title (PS3.5 6.2 AE; also a folder name in per-ae), or ""."""
    if not isinstance(title, str):
        return f"{title!r} is not a string"
    if not 1 <= len(title) <= AE_TITLE_MAX:
        return f"{title!r} is {len(title)} characters; an AE title has 1 to {AE_TITLE_MAX}"
    if title != title.strip(" "):
        return f"{title!r} has leading or trailing spaces; write {title.strip()!r}"
    if not title.strip():
        return "an AE title cannot be only spaces"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in title):
        return f"{title!r} contains a control character"
    if not title.isascii():
        return f"{title!r} has characters outside ASCII (PS3.5: the default repertoire only)"
    if "\\" in title:
        return f"{title!r} contains a backslash (it separates values in DICOM)"
    if "/" in title:
        return f"{title!r} contains '/' (an AE title also names a folder)"
    if title in (".", ".."):
        return f"{title!r} cannot be an AE title (it names a folder)"
    return ""


def parse_sources(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """allowed-mllp-sources as networks (an address is a /32 or /128); ValueError otherwise."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(value) from None
    return networks


_CHOICES = {
    "worklist_layout": ("flat", "per-ae"),
    "translation_log_format": ("logfmt", "json"),
    "missing_study_uid": ("derive", "reject"),
    "overlong_values": ("reject", "truncate"),
    "protocol_code_source": ("alternate-first", "primary", "alternate"),
}
# (setting, smallest value, whether the smallest is allowed)
_LOWER_BOUNDS = {
    "mllp_port": (0, True),
    "dicom_port": (0, True),
    "max_frame_size": (1024, True),
    "idle_timeout": (0, False),
    "max_connections": (1, True),
    "finished_retention": (0, True),
    "max_answers": (0, True),
    "max_associations": (1, True),
    "max_associations_per_source": (0, True),
    "dicom_workers": (-1, True),
    "acse_timeout": (0, False),
    "dimse_timeout": (0, False),
    "network_timeout": (0, False),
    "index_poll_interval": (0, False),
}


def dicom_worker_count(settings: Settings) -> int:
    """How many DICOM worker processes `settings` ask for: dicom-workers, or for -1 one per CPU
    this process may run on, at most max-associations (each worker needs one)."""
    if settings.dicom_workers >= 0:
        return settings.dicom_workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, settings.max_associations))


SettingCheck = tuple[str, Callable[["Settings"], None]]


def validate(settings: Settings, checks: Iterable[SettingCheck] = ()) -> None:
    """ConfigError for a combination of values that could not work as written.

    `checks` are (setting, check) pairs of the modules that own a setting's meaning (charsets,
    mapping, outbound, HTTP: see bridge.app.settings_checks); a ValueError they raise becomes a
    ConfigError naming where the setting came from. Passed in, so that this module imports
    nothing from the rest of the package."""

    def fail(name: str, text: str) -> None:
        raise ConfigError(f"{_origin(settings, name)}: {_dashed(name)}: {text}")

    for name, allowed in _CHOICES.items():
        value = getattr(settings, name)
        if value not in allowed:
            fail(
                name,
                f"{value!r} is not one of {', '.join(allowed)}{_suggest(str(value), allowed)}",
            )
    for name, (low, inclusive) in _LOWER_BOUNDS.items():
        value = getattr(settings, name)
        if value < low or (value == low and not inclusive):
            bound = f"at least {low}" if inclusive else f"more than {low}"
            fail(name, f"{value} is too small: it must be {bound}")
    for name in ("mllp_port", "dicom_port"):
        if getattr(settings, name) > 65535:
            fail(name, f"{getattr(settings, name)} is not a TCP port (0 to 65535)")
    if settings.dicom_workers > settings.max_associations:
        fail(
            "dicom_workers",
            f"{settings.dicom_workers} workers share max-associations = "
            f"{settings.max_associations}: each needs at least one; lower dicom-workers",
        )
    if settings.store and not settings.store.startswith(("postgresql://", "postgres://")):
        fail(
            "store",
            "must be empty (the worklist-dir folder) or a postgresql://user@host/db URL, "
            f"not {settings.store[:40]!r}",
        )
    problem = ae_title_problem(settings.ae_title)
    if problem:
        fail("ae_title", problem)
    for title in settings.allowed_calling_aets:
        problem = ae_title_problem(title)
        if problem:
            fail("allowed_calling_aets", problem)
    for status in settings.hidden_statuses:
        if status not in SPS_STATUS_TERMS:
            fail(
                "hidden_statuses",
                f"{status!r} is not a Scheduled Procedure Step Status term"
                f"{_suggest(status.upper(), SPS_STATUS_TERMS)}; "
                f"DICOM spells them {', '.join(SPS_STATUS_TERMS)}",
            )
    for pid in settings.processing_ids:
        if pid not in PROCESSING_IDS:
            fail("processing_ids", f"{pid!r} is not an HL7 processing ID (P, T or D)")
    try:
        parse_sources(settings.allowed_mllp_sources)
    except ValueError as exc:
        fail(
            "allowed_mllp_sources",
            f"{str(exc)!r} is not an IP address or network (like 10.1.2.3 or 10.1.2.0/24); "
            "host names are not resolved: write the sending engine's address",
        )
    for side in ("mllp", "dicom"):
        cert, key, ca = (f"{side}_tls_{part}" for part in ("cert", "key", "ca"))
        if not getattr(settings, cert):
            for other in (key, ca):
                if getattr(settings, other):
                    fail(
                        other,
                        f"set without {_dashed(cert)}: TLS needs the server's certificate "
                        f"and key; set {_dashed(cert)} and {_dashed(key)}, or remove "
                        f"{_dashed(other)} for plain TCP",
                    )
    if settings.housekeeping_interval <= 0:
        fail("housekeeping_interval", "must be above 0 seconds")
    for name in ("max_associate_request_size", "max_identifier_size"):
        if getattr(settings, name) < 1024:
            fail(name, f"{getattr(settings, name)} is too small: it must be at least 1024 bytes")
    if settings.max_search_time <= 0:
        fail("max_search_time", "must be more than 0 seconds")
    for name in ("mpps_retention", "mpps_in_progress_retention"):
        value = getattr(settings, name)
        if not math.isfinite(value):  # TOML's nan and inf: no bound at all
            fail(name, f"{value} is not a number of hours; write e.g. {_dashed(name)} = 720")
        if value <= 0:
            fail(
                name,
                f"{getattr(settings, name):g} is too small: it must be more than 0 hours (an "
                "instance is what answers a repeated N-SET or N-CREATE; 720 keeps 30 days)",
            )
    if settings.mpps_in_progress_retention < settings.mpps_retention:
        fail(
            "mpps_in_progress_retention",
            f"{settings.mpps_in_progress_retention:g} hours is shorter than mpps-retention "
            f"({settings.mpps_retention:g}): an instance still IN PROGRESS may yet get its final "
            "N-SET, so it must be kept at least as long as a finished one; raise "
            "mpps-in-progress-retention or lower mpps-retention",
        )
    if settings.mpps_max_instances < 1:
        fail(
            "mpps_max_instances",
            f"{settings.mpps_max_instances} is too small: it must be at least 1 "
            "(100000 suits a busy department)",
        )
    if settings.outbox_lease < 1:
        fail("outbox_lease", "must be at least 1 second")
    for name, check in checks:  # the checks of the modules that own the values
        try:
            check(settings)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{_origin(settings, name)}: {exc}") from None


def check_files(settings: Settings) -> None:
    """Start-up checks of what the server will open or write: ConfigError naming the setting.

    Convert does not call this: it writes to a folder of its own and opens no listener."""

    def fail(name: str, text: str) -> None:
        raise ConfigError(f"{_origin(settings, name)}: {_dashed(name)}: {text}")

    for side in ("mllp", "dicom"):
        for part in ("cert", "key", "ca"):
            name = f"{side}_tls_{part}"
            path = getattr(settings, name)
            if not path:
                continue
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except FileNotFoundError:
                fail(name, f"no such file: {Path(path).absolute()}")
            except OSError as exc:
                fail(name, f"cannot read {Path(path).absolute()}: {exc.strerror}")
    # the MPPS SCP always stores; the outbox is written only when there are receivers
    folders = ["rejected_dir", "mpps_dir"]
    if settings.outbound:
        folders.append("outbox_dir")
    for name in folders:
        folder = Path(getattr(settings, name)).absolute()
        problem = _unwritable_folder(folder)
        if problem:
            fail(
                name,
                f"cannot write to {folder} ({problem}); give a folder the bridge's user can write",
            )
    if str(settings.translation_log) != "-":
        folder = Path(settings.translation_log).absolute().parent
        problem = _unwritable_folder(folder)
        if problem:
            fail(
                "translation_log",
                f"cannot write to the folder {folder} ({problem}); give a path the bridge's "
                'user can write, or "-" for standard output',
            )
    if settings.worklist_dir.exists() and not settings.worklist_dir.is_dir():
        fail("worklist_dir", f"{settings.worklist_dir.absolute()} is a file, not a folder")


def _unwritable_folder(folder: Path) -> str:
    """Why the bridge cannot create files in `folder` (creating it if missing), or ""."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return ""
