"""Who is asking: a bearer token (scripts), or a session cookie (people, after the sign-in form).

Two tokens, read from files at start-up: the admin token (read and write) and, optionally, the
reader token (GET only). Tokens are compared in constant time. A session cookie holds a random
session id, never the token; it is HttpOnly and SameSite=Strict, and a write made with it must
also carry the session's CSRF token (form field `csrf` or header `X-CSRF-Token`).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from bridge.config import Settings
from bridge.http.settings import read_token

COOKIE = "wlbridge_session"
SESSION_LIFETIME = 12 * 3600.0  # seconds
MAX_SESSIONS = 1000  # the oldest are dropped beyond: sign-ins must not grow memory


@dataclass
class Principal:
    role: str  # "admin" or "reader"
    who: str  # what the log says did a change
    csrf: str = ""  # set for a session; empty for a bearer token
    session_id: str = ""

    @property
    def can_write(self) -> bool:
        return self.role == "admin"


@dataclass
class _Session:
    principal: Principal
    expires: float


class Auth:
    def __init__(self, settings: Settings) -> None:
        self._tokens: list[tuple[bytes, str]] = [
            (read_token(settings.http_token_file, "http_token_file").encode(), "admin")
        ]
        if settings.http_read_token_file:
            reader = read_token(settings.http_read_token_file, "http_read_token_file")
            self._tokens.append((reader.encode(), "reader"))
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def check_token(self, token: str) -> Principal | None:
        given = token.strip().encode("utf-8", "replace")
        role = None
        for known, name in self._tokens:  # every token is compared: no early exit to time
            if hmac.compare_digest(given, known):
                role = name
        return Principal(role, role) if role else None

    def bearer(self, header: str | bytes | None) -> Principal | None:
        if not header:
            return None
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return self.check_token(token)

    def sign_in(self, token: str) -> Principal | None:
        principal = self.check_token(token)
        if principal is None:
            return None
        principal.session_id = secrets.token_urlsafe(32)
        principal.csrf = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[principal.session_id] = _Session(principal, now + SESSION_LIFETIME)
        return principal

    def session(self, session_id: str | None) -> Principal | None:
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            held = self._sessions.get(session_id)
            if held is None or held.expires < now:
                self._sessions.pop(session_id, None)
                return None
            return held.principal

    def sign_out(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[key]


def csrf_ok(principal: Principal, given: str | None) -> bool:
    """A write by a session needs its CSRF token; a bearer token needs none (no cookie)."""
    if not principal.session_id:
        return True
    return bool(given) and hmac.compare_digest(given.encode(), principal.csrf.encode())
