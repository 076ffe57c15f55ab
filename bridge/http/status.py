"""`wlbridge status`: GET /api/status and print it on one screen."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from bridge.config import Settings
from bridge.http.settings import read_token

DEFAULT_URL = "http://127.0.0.1:8080"


def fetch_status(
    url: str, token_file: str, settings: Settings | None, tls_ca: str = "", timeout: float = 10.0
) -> dict[str, Any]:
    """The summary; ValueError or OSError with a sentence when it cannot be had."""
    if not url:
        if settings is not None and settings.http_port:
            scheme = "https" if settings.http_tls_cert else "http"
            url = f"{scheme}://{settings.http_host}:{settings.http_port}"
        else:
            url = DEFAULT_URL
    if not token_file and settings is not None:
        token_file = settings.http_read_token_file or settings.http_token_file
    if not token_file:
        raise ValueError("give --token-file (or --config naming http-read-token-file)")
    token = read_token(token_file, "--token-file")
    request = urllib.request.Request(
        url.rstrip("/") + "/api/status", headers={"Authorization": f"Bearer {token}"}
    )
    context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read(4 * 1024 * 1024))
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise OSError(f"{url}: {exc.reason}") from None


def _line(record: dict[str, Any] | None, keys: tuple[str, ...]) -> str:
    if not record:
        return "none since start"
    return " ".join(f"{k}={record[k]}" for k in keys if record.get(k))


def format_status(summary: dict[str, Any]) -> str:
    out = [f"wlbridge {summary.get('version', '')}"]
    for name, listener in (summary.get("listeners") or {}).items():
        tls = " TLS" if listener.get("tls") else ""
        extra = f" AE {listener['ae_title']}" if listener.get("ae_title") else ""
        out.append(f"  {name:<6} {listener.get('host')}:{listener.get('port')}{tls}{extra}")
    counts = summary.get("items_by_status") or {}
    shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    out.append(f"items   {summary.get('items', 0)}: {shown}")
    out.append(
        "last message  "
        + _line(summary.get("last_message"), ("time", "control_id", "type", "outcome", "ack"))
    )
    queries = summary.get("last_query_by_calling_ae") or {}
    out.append("last query by calling AE:" + ("" if queries else " none since start"))
    for ae, record in sorted(queries.items()):
        out.append(f"  {ae:<16} " + _line(record, ("time", "answers", "status", "ms")))
    outbox = summary.get("outbox")
    if outbox is None:
        out.append("outbox  none")
    else:
        out.append(
            f"outbox  {outbox.get('depth', 0)} waiting, {outbox.get('parked', 0)} parked, "
            f"oldest {outbox.get('oldest_age', 0):.0f} s"
        )
        for name, state in sorted((outbox.get("receivers") or {}).items()):
            out.append(
                f"  {name:<16} {state.get('depth', 0)} waiting, {state.get('parked', 0)} parked, "
                f"oldest {state.get('oldest_age', 0):.0f} s"
            )
    mpps = summary.get("mpps")
    if mpps is not None:
        kept = f"{mpps['instances']} kept" if "instances" in mpps else "kept: see /metrics"
        removed = sum((mpps.get("removed") or {}).values())
        out.append(
            f"mpps    {kept} (at most {mpps.get('max_instances', 0)}), {removed} removed by "
            f"the retention, {mpps.get('refused_full', 0)} N-CREATE(s) refused: store full"
        )
    rejected = summary.get("rejected") or {}
    out.append(f"rejected  {rejected.get('kept', 0)} kept, {rejected.get('today', 0)} today")
    return "\n".join(out)
