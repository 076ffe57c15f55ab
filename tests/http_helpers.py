"""A running bridge with its HTTP listener on, and a small client for its API."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import RunningBridge, start_bridge
from tests.peers import free_port

ADMIN_TOKEN = "admin-9f8e7d6c5b4a"
READ_TOKEN = "reader-0a1b2c3d4e5f"


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpBridge:
    bridge: RunningBridge
    http_port: int

    def call(
        self,
        method: str,
        path: str,
        token: str | None = ADMIN_TOKEN,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            sent = dict(headers or {})
            if token:
                sent["Authorization"] = f"Bearer {token}"
            data = raw
            if body is not None:
                data = json.dumps(body).encode()
                sent["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return Answer(
                response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
            )
        finally:
            conn.close()


def start_http_bridge(tmp_path: Path, *extra: str) -> HttpBridge:
    admin = tmp_path / "admin.token"
    admin.write_text(ADMIN_TOKEN + "\n")
    reader = tmp_path / "reader.token"
    reader.write_text(READ_TOKEN + "\n")
    port = free_port()
    running = start_bridge(
        tmp_path,
        "--http-port", str(port),
        "--http-token-file", str(admin),
        "--http-read-token-file", str(reader),
        *extra,
    )  # fmt: skip
    return HttpBridge(running, port)
