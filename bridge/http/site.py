"""The HTTP listener: one twisted.web Site on the bridge's reactor, routing every path.

Handlers run on the reactor thread; those that read files (log searches, kept messages) do the
reading in the reactor's thread pool and answer when it is done. Writes go through
bridge.http.actions.WorklistActions, on the reactor thread.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.web import resource, server

from bridge.http.actions import ActionError, WorklistActions
from bridge.http.auth import COOKIE, Auth, Principal, csrf_ok
from bridge.http.metrics import BridgeMetrics

log = logging.getLogger("bridge.http")

MAX_BODY = 256 * 1024  # bytes of a request body (an item as JSON is ~2 KB)
REQUEST_TIMEOUT = 60  # seconds an HTTP connection may stay idle
MAX_CONNECTIONS = 100  # concurrent HTTP connections; more are closed at once

JSON = "application/json; charset=utf-8"
HTML = "text/html; charset=utf-8"
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8"))


def json_error(status: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status)


@dataclass
class Context:
    request: server.Request
    principal: Principal | None
    params: dict[str, str]
    match: re.Match
    app: HttpApp

    def body(self) -> bytes:
        content = self.request.content
        if content is None:
            return b""
        content.seek(0)
        return content.read(MAX_BODY + 1)

    def json_body(self) -> Any:
        data = self.body()
        if len(data) > MAX_BODY:
            raise ActionError(413, f"the body is larger than {MAX_BODY} bytes")
        try:
            return json.loads(data or b"{}")
        except ValueError as exc:
            raise ActionError(400, f"the body is not JSON: {exc}") from None

    def form(self) -> dict[str, str]:
        """Fields of a form post (application/x-www-form-urlencoded; twisted parses it)."""
        return self.params

    @property
    def who(self) -> str:
        return self.principal.who if self.principal else ""


Handler = Callable[[Context], "Response | defer.Deferred"]


@dataclass
class Route:
    method: str
    pattern: re.Pattern
    handler: Handler
    access: str  # "public", "read", "write"
    web: bool  # a page for people: sign-in form instead of a bare 401


class HttpApp:
    """The routes, auth and the objects handlers use."""

    def __init__(
        self,
        bridge_server: Any,
        add_routes: tuple[Callable[[HttpApp], None], ...] = (),
        sign_in_page: Callable[..., Response] | None = None,
    ) -> None:
        """`add_routes` register the API's and the web view's routes, `sign_in_page` answers a
        web page asked for without a session: passed in by bridge.http.serve, so that this
        module does not import the modules that build on it."""
        self.server = bridge_server
        self.settings = bridge_server.settings
        self.auth = Auth(self.settings)
        self.actions = WorklistActions(bridge_server)
        self.metrics = BridgeMetrics(bridge_server)
        bridge_server.translation_log.subscribe(self.metrics.on_record)
        self.routes: list[Route] = []
        self.sign_in_page = sign_in_page
        for add in add_routes:
            add(self)

    def route(self, method: str, path: str, access: str, web: bool = False):
        pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")

        def register(handler: Handler) -> Handler:
            self.routes.append(Route(method, pattern, handler, access, web))
            return handler

        return register

    def principal(self, request: server.Request) -> Principal | None:
        found = self.auth.bearer(request.getHeader("authorization"))
        if found is None:
            cookie = request.getCookie(COOKIE.encode())
            found = self.auth.session(cookie.decode("latin-1") if cookie else None)
        return found

    def dispatch(self, request: server.Request) -> Response | defer.Deferred:
        path = unquote(request.path.decode("latin-1"))
        method = request.method.decode("latin-1")
        if method == "HEAD":
            method = "GET"
        allowed: list[str] = []
        for route in self.routes:
            match = route.pattern.match(path)
            if not match:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            return self._call(route, match, request)
        if allowed:
            return Response(
                405, json.dumps({"error": "method not allowed"}).encode(),
                headers={"Allow": ", ".join(sorted(set(allowed)))},
            )  # fmt: skip
        return json_error(404, "not found")

    def _call(self, route: Route, match: re.Match, request: server.Request):
        principal = self.principal(request) if route.access != "public" else None
        if route.access != "public" and principal is None:
            if route.web and self.sign_in_page is not None:
                return self.sign_in_page(request, status=401)
            return Response(
                401, json.dumps({"error": "a bearer token is required"}).encode(),
                headers={"WWW-Authenticate": 'Bearer realm="wlbridge"'},
            )  # fmt: skip
        params = {
            k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
            for k, v in (request.args or {}).items()
            if v
        }
        if route.access == "write":
            if not principal.can_write:
                return json_error(403, "this token may only read")
            given = request.getHeader("x-csrf-token") or params.get("csrf")
            if not csrf_ok(principal, given):
                return json_error(403, "missing or wrong CSRF token")
        ctx = Context(request, principal, params, match, self)
        try:
            return route.handler(ctx)
        except ActionError as exc:
            return json_error(exc.status, exc.message)


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, app: HttpApp) -> None:
        super().__init__()
        self.app = app

    def render(self, request: server.Request):
        try:
            answer = self.app.dispatch(request)
        except Exception:
            log.exception("HTTP handler failed on %s", request.path)
            answer = json_error(500, "internal error (see the bridge's log)")
        if isinstance(answer, defer.Deferred):
            finished = [False]
            request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

            def deliver(result: Any) -> None:
                if finished[0]:
                    return  # the client went away
                if isinstance(result, Failure):
                    if result.check(ActionError):
                        exc = result.value
                        result = json_error(exc.status, exc.message)
                    else:
                        log.error("HTTP handler failed: %s", result.getTraceback())
                        result = json_error(500, "internal error (see the bridge's log)")
                if result is not server.NOT_DONE_YET:
                    request.write(_write(request, result))
                    request.finish()

            answer.addBoth(deliver)
            return server.NOT_DONE_YET
        if answer is server.NOT_DONE_YET:
            return answer
        return _write(request, answer)


def _write(request: server.Request, answer: Response) -> bytes:
    request.setResponseCode(answer.status)
    request.setHeader("Content-Type", answer.content_type)
    request.setHeader("Cache-Control", "no-store")
    request.setHeader("X-Content-Type-Options", "nosniff")
    request.setHeader("Referrer-Policy", "no-referrer")
    if answer.content_type.startswith("text/html"):
        request.setHeader("Content-Security-Policy", CSP)
        request.setHeader("X-Frame-Options", "DENY")
    for name, value in answer.headers.items():
        request.setHeader(name, value)
    return b"" if request.method == b"HEAD" else answer.body


class _BoundedRequest(server.Request):
    """A request whose body may not exceed MAX_BODY: twisted.web would otherwise spool any
    size to a temporary file."""

    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        transport = self.channel.transport if self.channel else None
        if transport is not None and not getattr(self, "_refused", False):
            self._refused = True
            transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            transport.loseConnection()


class _LimitedConnections(policies.WrappingFactory):
    """Closes connections beyond `limit` as they arrive: each open one costs a file descriptor
    and a twisted.web channel."""

    def __init__(self, factory: server.Site, limit: int) -> None:
        super().__init__(factory)
        self.limit = limit

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.limit:
            log.warning("refused HTTP connection from %s: %d open", addr, len(self.protocols))
            return None
        return super().buildProtocol(addr)
