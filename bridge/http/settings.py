"""Checks of the HTTP settings (called through bridge.app.settings_checks) and reading the
tokens."""

from __future__ import annotations

from pathlib import Path

from bridge.config import Settings

MAX_TOKEN_FILE = 4096  # bytes: a token file is one line


def read_token(path: str, setting: str) -> str:
    """The token in `path` (surrounding whitespace stripped); ValueError naming the setting."""
    try:
        data = Path(path).read_bytes()[: MAX_TOKEN_FILE + 1]
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_FILE:
        raise ValueError(f"{setting}: {path} is larger than {MAX_TOKEN_FILE} bytes")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{setting}: {path} is not UTF-8 text") from None
    if not token:
        raise ValueError(f"{setting}: {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{setting}: the token in {path} must be one word without spaces")
    return token


def check_http_settings(settings: Settings) -> None:
    """Raise ValueError (a sentence naming the setting) for an HTTP setting that cannot work."""
    if not 0 <= settings.http_port <= 65535:
        raise ValueError("http_port must be 0 (off) or a port number up to 65535")
    if settings.http_port == 0:
        return
    if not settings.http_token_file:
        raise ValueError("http_port is set but http_token_file is not: the API needs a token")
    admin = read_token(settings.http_token_file, "http_token_file")
    if settings.http_read_token_file:
        reader = read_token(settings.http_read_token_file, "http_read_token_file")
        if reader == admin:
            raise ValueError("http_read_token_file holds the same token as http_token_file")
    if settings.http_tls_key and not settings.http_tls_cert:
        raise ValueError("http_tls_key is set but http_tls_cert is not")
    for name in ("http_tls_cert", "http_tls_key"):
        value = getattr(settings, name)
        if value and not Path(value).is_file():
            raise ValueError(f"{name}: {value} is not a file")
    if settings.ready_min_free_mb < 0:
        raise ValueError("ready_min_free_mb must not be negative")
    if settings.ready_outbox_max_age <= 0:
        raise ValueError("ready_outbox_max_age must be positive")
