"""The HTTP side put together: the app with the API's and the web view's routes, its Site and
its listener. The one module of bridge.http that imports them all (the composition of HTTP)."""

from __future__ import annotations

from typing import Any

from twisted.web import server

from bridge.http import api, web
from bridge.http.site import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    HttpApp,
    _BoundedRequest,
    _LimitedConnections,
    _Root,
)


def make_site(bridge_server: Any) -> tuple[server.Site, HttpApp]:
    app = HttpApp(bridge_server, (api.add_routes, web.add_routes), web.sign_in_page)
    site = server.Site(_Root(app), timeout=REQUEST_TIMEOUT)
    site.requestFactory = _BoundedRequest
    site.displayTracebacks = False
    site.noisy = False
    return site, app


def start_http(bridge_server: Any, reactor: Any) -> tuple[Any, HttpApp]:
    """Listen on (http_host, http_port), with TLS when http_tls_cert is set."""
    s = bridge_server.settings
    site, app = make_site(bridge_server)
    factory = _LimitedConnections(site, MAX_CONNECTIONS)
    if s.http_tls_cert:
        from twisted.internet import ssl as tssl

        with open(s.http_tls_cert, "rb") as f:
            cert_pem = f.read()
        with open(s.http_tls_key or s.http_tls_cert, "rb") as f:
            key_pem = f.read()
        options = tssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem).options()
        port = reactor.listenSSL(s.http_port, factory, options, interface=s.http_host)
    else:
        port = reactor.listenTCP(s.http_port, factory, interface=s.http_host)
    return port, app
