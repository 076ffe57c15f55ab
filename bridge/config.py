"""Settings: defaults, a TOML config file, and command-line options (the command line wins).

Every setting has one name; relative paths are relative to the working directory. In the
TOML file a name is written with dashes or underscores
(`mllp-port = 2575`); on the command line as `--mllp-port 2575`. Settings whose values are
structured (station rules) exist in the file only.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
FINISHED_STATUSES = ("COMPLETED", "DISCONTINUED", "CANCELED")


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


@dataclass
class Settings:
    # Network
    host: str = _opt("address both servers listen on", default="0.0.0.0")
    mllp_port: int = _opt("MLLP (HL7) listening port", default=2575)
    dicom_port: int = _opt("DICOM (C-FIND, C-ECHO) listening port", default=11112)
    ae_title: str = _opt("the bridge's own DICOM AE title", default="WLBRIDGE")

    # Files
    worklist_dir: Path = _opt("folder of .wl files served by C-FIND", default=Path("./worklists"))
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

    # MLLP limits
    max_frame_size: int = _opt("largest accepted MLLP frame, in bytes", default=1024 * 1024)
    idle_timeout: float = _opt("seconds an MLLP connection may stay silent", default=300.0)
    max_connections: int = _opt("concurrent MLLP connections", default=200)
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
    protocol_code_source: str = _opt(
        "OBR-4 components feeding the protocol code: alternate-first, primary or alternate",
        default="alternate-first",
    )
    station_rules: list[StationRule] = _opt(
        "scheduled station rules (config file only)", cli=False, default_factory=list
    )

    # Worklist life cycle
    hidden_statuses: list[str] = _opt(
        "SPS statuses that C-FIND does not return",
        cli=False,
        default_factory=lambda: list(FINISHED_STATUSES),
    )
    finished_retention: float = _opt(
        "hours a finished (completed, cancelled, discontinued) item's file is kept; 0 deletes it",
        default=0.0,
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
    acse_timeout: float = _opt("DICOM ACSE timeout, seconds", default=30.0)
    dimse_timeout: float = _opt("DICOM DIMSE timeout, seconds", default=30.0)
    network_timeout: float = _opt("DICOM network timeout, seconds", default=60.0)
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


def _coerce(name: str, value: Any) -> Any:
    f = setting_names()[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if name == "station_rules":
        return [StationRule(**{k.replace("-", "_"): v for k, v in rule.items()}) for rule in value]
    if isinstance(default, Path):
        return Path(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list")
        return [str(v) for v in value]
    if not isinstance(value, type(default)):
        raise ValueError(f"{name} must be of type {type(default).__name__}")
    return value


def load_settings(config: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from defaults, then the TOML file, then non-None overrides (command line)."""
    values: dict[str, Any] = {}
    known = setting_names()
    if config is not None:
        with open(config, "rb") as f:
            data = tomllib.load(f)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{config}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    for name, value in (overrides or {}).items():
        if value is not None and name in known:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    choices = {
        "worklist_layout": ("flat", "per-ae"),
        "translation_log_format": ("logfmt", "json"),
        "missing_study_uid": ("derive", "reject"),
        "overlong_values": ("reject", "truncate"),
        "protocol_code_source": ("alternate-first", "primary", "alternate"),
    }
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}")
    if not 1 <= len(settings.ae_title) <= 16:
        raise ValueError("ae_title must be 1 to 16 characters")
    if settings.max_frame_size < 1024:
        raise ValueError("max_frame_size must be at least 1024 bytes")
    from bridge.order import check_station_rules  # the rules' HL7 locations and expressions

    check_station_rules(settings.station_rules)
    from bridge.http.settings import check_http_settings

    check_http_settings(settings)
