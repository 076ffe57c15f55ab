"""HTTPS: the HTTP listener with a certificate, like the other listeners."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.http_helpers import READ_TOKEN, start_http_bridge
from tests.net.test_tls import make_pki


def test_https_serves_the_api_and_plain_http_gets_nothing(tmp_path: Path):
    pki = make_pki(tmp_path)
    web = start_http_bridge(
        tmp_path, "--http-tls-cert", str(pki.server_cert), "--http-tls-key", str(pki.server_key)
    )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        conn = http.client.HTTPSConnection("127.0.0.1", web.http_port, context=context, timeout=30)
        conn.request("GET", "/api/status", headers={"Authorization": f"Bearer {READ_TOKEN}"})
        answer = conn.getresponse()
        assert answer.status == 200
        assert b'"tls": true' in answer.read()
        conn.close()
        # a plain HTTP request gets no HTTP answer
        with socket.create_connection(("127.0.0.1", web.http_port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                data = sock.recv(1024)
            except OSError:
                data = b""
        assert not data.startswith(b"HTTP/")
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "status", "--url", f"https://127.0.0.1:{web.http_port}",
             "--token-file", str(tmp_path / "reader.token"), "--tls-ca", str(pki.ca)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert " TLS" in result.stdout
    finally:
        assert web.bridge.stop() == 0, "".join(web.bridge.stderr_lines)
