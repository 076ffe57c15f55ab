"""The settings checks that need the modules owning a setting's meaning.

bridge.config reads and checks the settings on its own (it imports nothing from the rest of the
package); what only another module can judge (an HL7 charset, a mapping row's attribute, a
receiver's message shape, the HTTP tokens) is checked here, by that module's own check, so that
a mistake is still one sentence naming the setting and where it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge import config
from bridge.config import SettingCheck, Settings
from bridge.hl7.mapping import check_mapping
from bridge.hl7.message import check_charset_settings
from bridge.hl7.order import check_station_rules
from bridge.http.settings import check_http_settings
from bridge.net.outbox import check_outbound

CHECKS: tuple[SettingCheck, ...] = (
    (
        "default_charset",
        lambda s: check_charset_settings(s.default_charset, s.charset_fallback),
    ),
    ("station_rules", lambda s: check_station_rules(s.station_rules)),  # locations, expressions
    ("mapping", lambda s: check_mapping(s.mapping, s.code_tables)),  # attributes, locations
    ("outbound", check_outbound),
    ("http_port", check_http_settings),
)


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """bridge.config.load_settings with every module's checks: what the CLI and servers use."""
    return config.load_settings(config_file, overrides, CHECKS)


def validate(settings: Settings) -> None:
    """bridge.config.validate with every module's checks."""
    config.validate(settings, CHECKS)
