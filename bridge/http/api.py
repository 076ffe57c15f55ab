"""The JSON API (docs/http-api.md), /metrics, /healthz and /readyz."""

from __future__ import annotations

import time
from datetime import UTC
from pathlib import Path
from typing import Any

from prometheus_client.twisted import MetricsResource
from twisted.internet import defer, threads

from bridge import __version__
from bridge.dicom.matching import QueryError
from bridge.http import items, logsearch, outbound
from bridge.http.actions import ActionError
from bridge.http.health import readiness
from bridge.http.metrics import mpps_state, outbox_state, rejected_count
from bridge.http.site import Context, HttpApp, json_error, json_response

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_REASON = 4000  # characters of a kept message's reason shown
MAX_MESSAGE_SHOWN = 1024 * 1024  # bytes of a kept message returned by GET /api/rejected/{name}


def limit_of(ctx: Context, default: int = DEFAULT_LIMIT) -> int:
    text = ctx.params.get("limit", "")
    if not text:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ActionError(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def flag(ctx: Context, name: str) -> bool:
    return ctx.params.get(name, "").lower() in ("1", "true", "yes", "on")


# -- items
def list_items(ctx: Context, with_history: bool | None = None):
    app = ctx.app
    filters = {name: ctx.params.get(name, "") for name in items.ITEM_FILTERS}
    filters["status"] = filters["status"].upper()  # SPS statuses are upper case
    include_hidden = flag(ctx, "include_hidden") or bool(filters["status"])
    try:
        query = items.build_query(app.settings, filters, include_hidden)
    except (QueryError, ValueError) as exc:
        raise ActionError(400, str(exc)) from None
    limit = limit_of(ctx)
    found, total = items.search(app.server.index, query, limit)
    listed = [items.summary(f) for f in found]
    if with_history is None:
        with_history = ctx.params.get("history", "1") not in ("0", "false", "no")
    body = {"items": listed, "count": len(listed), "total": total}
    if not with_history or not found:
        return json_response(body)
    terms = [items.history_terms(f) for f in found]
    path = app.server.translation_log.path

    def attach(histories: dict) -> Any:
        for entry, term in zip(listed, terms, strict=True):
            entry["history"] = histories.get(term, [])
        return json_response(body)

    return threads.deferToThread(logsearch.histories, path, terms).addCallback(attach)


def _item_detail(app: HttpApp, ident: str, history: bool = True):
    try:
        found = items.find(app.server.index, ident)
    except items.ItemNotFound:
        raise ActionError(404, f"no item {ident}") from None
    body = items.summary(found)
    body["attributes"] = items.record_json(found.record)
    if not history:
        return json_response(body)
    path = app.server.translation_log.path
    term = items.history_terms(found)

    def attach(histories: dict) -> Any:
        body["history"] = histories.get(term, [])
        return body

    return threads.deferToThread(
        logsearch.histories, path, [term], 200, logsearch.DEFAULT_MAX_BYTES
    ).addCallback(attach)


def get_item(ctx: Context):
    result = _item_detail(ctx.app, ctx.match["id"])
    return result.addCallback(json_response) if hasattr(result, "addCallback") else result


def set_status(ctx: Context):
    body = ctx.json_body()
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        raise ActionError(400, 'the body must be {"status": "<SPS status>"}')
    ctx.app.actions.set_status(ctx.match["id"], body["status"], ctx.who)
    return get_item(ctx)


def delete_item(ctx: Context):
    name = ctx.app.actions.remove(ctx.match["id"], ctx.who)
    return json_response({"id": ctx.match["id"], "file": name, "removed": True})


def create_item(ctx: Context, replace_id: str | None = None):
    fields = ctx.json_body()
    if not isinstance(fields, dict):
        raise ActionError(400, "the body must be a JSON object")
    answer = ctx.app.actions.schedule_from_json(fields, ctx.who, replace_id)
    if answer.ack_code != "AA":
        status = 422 if answer.ack_code == "AE" else 400
        return json_error(status, answer.text or "refused", ack=answer.ack_code)
    if answer.item_id is None:
        return json_response({"ack": "AA", "id": None}, 201 if replace_id is None else 200)
    detail = _item_detail(ctx.app, answer.item_id, history=False)
    detail.status = 201 if replace_id is None else 200
    return detail


def replace_item(ctx: Context):
    return create_item(ctx, ctx.match["id"])


# -- the translation log
def log_query(ctx: Context) -> logsearch.LogQuery:
    p = ctx.params
    return logsearch.LogQuery(
        accession=p.get("accession", ""),
        patient_id=p.get("patient_id", ""),
        control_id=p.get("control_id", ""),
        outcome=p.get("outcome", ""),
        type=p.get("type", ""),
        calling_ae=p.get("calling_ae", ""),
        file=p.get("file", ""),
        text=p.get("q", "")[:200],
        since=p.get("since", ""),
        until=p.get("until", ""),
        limit=limit_of(ctx),
    )


def search_messages(ctx: Context, query: logsearch.LogQuery | None = None):
    query = query or log_query(ctx)
    path = ctx.app.server.translation_log.path
    if path is None:
        return json_response(
            {"messages": [], "note": "the translation log goes to standard output"}
        )

    def answer(result: logsearch.LogResult) -> Any:
        return json_response(
            {
                "messages": result.records,
                "count": len(result.records),
                "complete": result.complete,
                "scanned_bytes": result.scanned_bytes,
            }
        )

    return threads.deferToThread(logsearch.search_log, path, query).addCallback(answer)


# -- kept (rejected) messages
def rejected_entries(app: HttpApp, limit: int) -> list[dict[str, Any]]:
    """The newest kept messages, newest first: the shared table's on PostgreSQL (whichever
    bridge refused them), else this bridge's folder. Reads files or the database: run it in
    the thread pool."""
    shared = app.actions.shared_rejected()
    if shared is not None:
        return [_row_entry(row) for row in shared.entries(limit)]
    folder = Path(app.server.bridge.rejected_dir)
    try:
        names = sorted((p.name for p in folder.glob("*.hl7")), reverse=True)[:limit]
    except OSError:
        return []
    out = []
    for name in names:
        path = folder / name
        stem = name.removesuffix(".hl7")
        reason = ""
        try:
            reason = path.with_suffix(".reason").read_text("utf-8", "replace")[:MAX_REASON].strip()
            size = path.stat().st_size
        except OSError:
            size = 0
        parts = stem.split("-")
        out.append(
            {
                "name": stem,
                "kept_at": _stamp(parts[0]),
                "control_id": "-".join(parts[1:-1]),
                "size": size,
                "reason": reason,
            }
        )
    return out


def _row_entry(row: Any) -> dict[str, Any]:
    """A row of the shared table (memory.KeptRow), in the shape of a folder's entry."""
    return {
        "name": row.name,
        "kept_at": row.received_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "control_id": row.control_id,
        "size": row.size,
        "reason": row.reason[:MAX_REASON].strip(),
    }


def _stamp(text: str) -> str:
    try:
        t = time.strptime(text[:15], "%Y%m%dT%H%M%S")
    except ValueError:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", t)


def list_rejected(ctx: Context):
    limit = limit_of(ctx)
    return threads.deferToThread(rejected_entries, ctx.app, limit).addCallback(
        lambda entries: json_response({"rejected": entries, "count": len(entries)})
    )


def get_rejected(ctx: Context):
    shared = ctx.app.actions.shared_rejected()
    if shared is not None:
        name = ctx.match["name"]

        def shown(found: Any) -> Any:
            if found is None:
                raise ActionError(404, f"no kept message {name}")
            row, data = found
            message = data.decode("utf-8", "replace")
            return json_response({**_row_entry(row), "message": message})

        return threads.deferToThread(shared.entry, name, MAX_MESSAGE_SHOWN).addCallback(shown)
    path = ctx.app.actions.rejected_path(ctx.match["name"])
    with open(path, "rb") as f:
        data = f.read(MAX_MESSAGE_SHOWN)
    entry = next((e for e in rejected_entries(ctx.app, MAX_LIMIT) if e["name"] == path.stem), {})
    return json_response({**entry, "name": path.stem, "message": data.decode("utf-8", "replace")})


def replay_rejected(ctx: Context):
    def answered(answer: Any) -> Any:
        status = 200 if answer.ack_code == "AA" else 422
        return json_response(
            {"name": ctx.match["name"], "ack": answer.ack_code, "text": answer.text}, status
        )

    answer = ctx.app.actions.replay(ctx.match["name"], ctx.who)
    if isinstance(answer, defer.Deferred):  # the shared table's, through the thread pool
        return answer.addCallback(answered)
    return answered(answer)


# -- the outbox and MPPS
def list_outbox(ctx: Context):
    outbox = getattr(ctx.app.server, "outbox", None)
    if outbox is None:
        return json_response({"messages": [], "note": "this bridge sends no outbound messages"})
    p = ctx.params
    state = p.get("state", "")
    if state not in ("", "pending", "parked"):
        raise ActionError(400, "state must be pending or parked")
    limit = limit_of(ctx)
    receiver, accession = p.get("receiver", ""), p.get("accession", "")

    def answer(listed: list[dict[str, Any]]) -> Any:
        body: dict[str, Any] = {
            "messages": listed[:limit],
            "count": min(len(listed), limit),
            "total": len(listed),
            **(outbox_state(ctx.app.server) or {}),
        }
        if not outbox.lanes:
            body["note"] = "no [[outbound]] receivers are configured"
        return json_response(body)

    return threads.deferToThread(outbound.entries, outbox, state, receiver, accession).addCallback(
        answer
    )


def _outbox_ident(ctx: Context) -> str:
    if getattr(ctx.app.server, "outbox", None) is None:
        raise ActionError(404, "this bridge has no outbox")
    return outbound.entry_id(ctx.match["receiver"], ctx.match.groupdict().get("sequence"))


def get_outbox_message(ctx: Context):
    ident = _outbox_ident(ctx)
    return threads.deferToThread(outbound.detail, ctx.app.server.outbox, ident).addCallback(
        json_response
    )


def outbox_action(ctx: Context):
    ident = _outbox_ident(ctx)
    action = ctx.match["action"]
    if action not in ("retry", "drop"):
        raise ActionError(404, "not found")
    server = ctx.app.server
    if outbound.on_database(server):
        return outbound.act_in_thread(server, ident, action, ctx.who).addCallback(json_response)
    if "/" in ident:
        return json_response(outbound.act(server, ident, action, ctx.who))
    # A control ID: found in the thread pool (it reads every file), then acted on here.
    return threads.deferToThread(outbound.resolve, server.outbox, ident).addCallback(
        lambda found: json_response(outbound.act(server, found, action, ctx.who))
    )


def list_mpps(ctx: Context):
    store = getattr(ctx.app.server, "mpps_store", None)
    if store is None:
        return json_response({"mpps": [], "note": "this bridge has no MPPS store"})
    status = ctx.params.get("status", "").upper()
    patient_id = ctx.params.get("patient_id", "")
    limit = limit_of(ctx)
    # here, on the thread that writes the folder's store; a database's in the thread pool
    known = None if outbound.on_database(ctx.app.server) else store.snapshot()

    def answer(result: tuple[list, int]) -> Any:
        listed, total = result
        return json_response({"mpps": listed, "count": len(listed), "total": total})

    return threads.deferToThread(
        outbound.mpps_listing, store, known, status, patient_id, limit
    ).addCallback(answer)


def get_mpps(ctx: Context):
    store = getattr(ctx.app.server, "mpps_store", None)
    uid = ctx.match["uid"]
    if store is None or uid not in store:
        raise ActionError(404, f"no MPPS instance {uid}")
    path = ctx.app.server.translation_log.path
    query = logsearch.LogQuery(any_of=[("mpps_uid", uid)], limit=200)

    def read() -> dict[str, Any]:
        body = outbound.mpps_detail(store, uid)
        found = logsearch.search_log(path, query) if path is not None else None
        body["history"] = found.records if found is not None else []
        return body

    return threads.deferToThread(read).addCallback(json_response)


def _plain(value: Any) -> Any:
    if isinstance(value, dict | list | str | int | float | bool) or value is None:
        return value
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if hasattr(value, "to_json_dict"):
        return value.to_json_dict()
    return str(value)


# -- summary, health, metrics
def status_summary(app: HttpApp, rejected: tuple[int, int] | None = None) -> dict[str, Any]:
    """`rejected`: (kept, today) of the shared table, read in the thread pool; without it
    this bridge's folder is counted."""
    s = app.settings
    server = app.server
    kept, today = rejected or rejected_count(Path(server.bridge.rejected_dir))
    mllp_port = server.mllp_port.getHost().port if server.mllp_port is not None else None
    return {
        "version": __version__,
        "listeners": {
            "mllp": {"host": s.host, "port": mllp_port, "tls": bool(s.mllp_tls_cert)},
            "dicom": {
                "host": s.host,
                "port": s.dicom_port,
                "ae_title": s.ae_title,
                "tls": bool(s.dicom_tls_cert),
                "up": server.dicom_server is not None,
            },
            "http": {"host": s.http_host, "port": s.http_port, "tls": bool(s.http_tls_cert)},
        },  # fmt: skip
        "items": len(server.index),
        "items_by_status": items.status_counts(server.index),
        "last_message": app.metrics.last_message,
        "last_query_by_calling_ae": dict(app.metrics.last_query),
        "outbox": outbox_state(server),
        "mpps": mpps_state(server),
        "rejected": {"kept": kept, "today": today},
    }


def add_routes(app: HttpApp) -> None:
    metrics_resource = MetricsResource(app.metrics.registry)

    def metrics(ctx: Context):
        return metrics_resource.render(ctx.request)

    def healthz(ctx: Context):
        return json_response({"status": "ok"})

    def readyz(ctx: Context):
        ready, checks = readiness(app.server)
        failed = [name for name, c in checks.items() if not c["ok"]]
        body = {"status": "ready" if ready else "not ready", "failed": failed, "checks": checks}
        return json_response(body, 200 if ready else 503)

    r = app.route
    r("GET", "/healthz", "public")(healthz)
    r("GET", "/readyz", "public")(readyz)
    r("GET", "/metrics", "read" if app.settings.http_metrics_need_token else "public")(metrics)

    def status(ctx: Context):
        shared = app.actions.shared_rejected()
        if shared is None:
            return json_response(status_summary(app))
        return threads.deferToThread(shared.count).addCallback(
            lambda counted: json_response(status_summary(app, counted))
        )

    r("GET", "/api/status", "read")(status)
    r("GET", "/api/items", "read")(list_items)
    r("POST", "/api/items", "write")(create_item)
    r("GET", "/api/items/{id}", "read")(get_item)
    r("PUT", "/api/items/{id}", "write")(replace_item)
    r("DELETE", "/api/items/{id}", "write")(delete_item)
    r("POST", "/api/items/{id}/status", "write")(set_status)
    r("GET", "/api/messages", "read")(search_messages)
    r("GET", "/api/rejected", "read")(list_rejected)
    r("GET", "/api/rejected/{name}", "read")(get_rejected)
    r("POST", "/api/rejected/{name}/replay", "write")(replay_rejected)
    r("GET", "/api/outbox", "read")(list_outbox)
    r("GET", "/api/outbox/{receiver}/{sequence}", "read")(get_outbox_message)
    r("POST", "/api/outbox/{receiver}/{sequence}/{action}", "write")(outbox_action)
    r("POST", "/api/outbox/{receiver}/{action}", "write")(outbox_action)  # by control ID
    r("GET", "/api/mpps", "read")(list_mpps)
    r("GET", "/api/mpps/{uid}", "read")(get_mpps)
