"""The web view: server-rendered pages, the bridge's own CSS and a little plain JavaScript.

Every value shown is HTML-escaped (HL7 fields are whatever a sender put in them). Pages work
without JavaScript; the script only asks before a removal and refreshes the log page.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

from twisted.internet import threads
from twisted.web import server

from bridge.dicom.worklist_item import SPS_STATUSES
from bridge.http import api, items, logsearch, outbound
from bridge.http.actions import ActionError
from bridge.http.auth import COOKIE, SESSION_LIFETIME, Principal
from bridge.http.site import HTML, Context, HttpApp, Response

STATIC = {
    "wlbridge.css": "text/css; charset=utf-8",
    "wlbridge.js": "text/javascript; charset=utf-8",
}
LATEST_LINES = 20  # translation-log lines on the worklist page
LOG_COLUMNS = ("time", "type", "control_id", "peer", "calling_ae", "receiver", "accession",
               "patient_id", "pps_status", "order_status", "outcome", "ack", "status", "answers",
               "attempt", "by", "reason", "note", "keys", "mpps_uid", "ms")  # fmt: skip


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(ctx: Context | None, title: str, body: str, status: int = 200) -> Response:
    principal = ctx.principal if ctx is not None else None
    nav = ""
    if principal is not None:
        nav = (
            '<nav><a href="/">Worklist</a> <a href="/log">Log</a> '
            '<a href="/rejected">Rejected</a> <a href="/outbox">Outbox</a> <a href="/mpps">MPPS</a>'
            f'<span class="who">{e(principal.who)}</span>'
        )
        if principal.session_id:
            nav += (
                f'<form method="post" action="/logout" class="inline">{csrf_field(principal)}'
                '<button type="submit">Sign out</button></form>'
            )
        nav += "</nav>"
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)} · wlbridge</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/wlbridge.css">'
        '<script src="/static/wlbridge.js" defer></script></head><body>'
        f"<header><strong>wlbridge</strong>{nav}</header><main><h1>{e(title)}</h1>{body}</main>"
        "</body></html>"
    )
    return Response(status, text.encode("utf-8"), HTML)


def csrf_field(principal: Principal | None) -> str:
    if principal is None or not principal.session_id:
        return ""
    return f'<input type="hidden" name="csrf" value="{e(principal.csrf)}">'


def sign_in_page(request: server.Request, status: int = 200, error: str = "") -> Response:
    body = (
        (f'<p class="error">{e(error)}</p>' if error else "")
        + '<form method="post" action="/login" class="signin">'
        '<label>Token <input type="password" name="token" autocomplete="current-password" '
        'required autofocus></label> <button type="submit">Sign in</button></form>'
    )
    return page(None, "Sign in", body, status)


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def log_table(records: list[dict[str, Any]]) -> str:
    shown = [c for c in LOG_COLUMNS if any(c in r for r in records)]
    rows = [[e(r.get(c, "")) for c in shown] for r in records]
    return table(shown, rows, "log") if records else "<p>No lines.</p>"


def chart(title: str, series: list[int]) -> str:
    """A small inline SVG bar chart (one bar a minute)."""
    width, height = 300, 60
    peak = max(series, default=0) or 1
    bar = width / max(len(series), 1)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - v * height / peak:.1f}"'
        f' width="{max(bar - 1, 1):.1f}" '
        f'height="{v * height / peak:.1f}" fill="#3b6ea5"><title>{v}</title></rect>'
        for i, v in enumerate(series)
    )
    return (
        f'<figure class="chart"><figcaption>{e(title)} (peak {max(series, default=0)}/min, '
        f"last {len(series)} min)</figcaption>"
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{e(title)}"><rect width="{width}" height="{height}" fill="#f4f6f8"/>'
        f"{bars}</svg></figure>"
    )


def _redirect(location: str, headers: dict[str, str] | None = None) -> Response:
    return Response(303, b"", HTML, {"Location": location, **(headers or {})})


# -- pages
def worklist_page(ctx: Context):
    p = ctx.params
    filters = {
        "ScheduledStationAETitle": p.get("station", ""),
        "Modality": p.get("modality", ""),
        "date": p.get("date", ""),
        "status": p.get("status", ""),
    }
    patient = p.get("patient", "").strip()
    include_hidden = bool(filters["status"]) or p.get("include_hidden") == "1"
    found: list[items.Found] = []
    seen: dict[str, items.Found] = {}
    error = ""
    total = 0
    try:
        searches = [dict(filters)]
        if patient:  # an ID, or part of a name
            searches = [{**filters, "PatientID": patient},
                        {**filters, "PatientName": f"*{patient}*"}]  # fmt: skip
        for f in searches:
            query = items.build_query(ctx.app.settings, f, include_hidden)
            hits, n = items.search(ctx.app.server.index, query, 500)
            total += n
            seen.update((h.id, h) for h in hits)
        found = list(seen.values())
    except (ValueError, items.QueryError) as exc:
        error = str(exc)
    statuses = "".join(
        f'<option value="{s}"{" selected" if s == filters["status"] else ""}>{s}</option>'
        for s in ("", *SPS_STATUSES)
    )
    form = (
        '<form method="get" action="/" class="filters">'
        f'<label>Station <input name="station" value="{e(filters["ScheduledStationAETitle"])}'
        f'"></label>'
        f'<label>Modality <input name="modality" value="{e(filters["Modality"])}" size="4"></label>'
        f'<label>Date <input name="date" value="{e(filters["date"])}"'
        f' placeholder="YYYYMMDD[-YYYYMMDD]"></label>'
        f'<label>Status <select name="status">{statuses}</select></label>'
        f'<label>Patient <input name="patient" value="{e(patient)}"'
        f' placeholder="ID or name"></label>'
        '<button type="submit">Filter</button></form>'
    )  # fmt: skip
    rows = []
    summaries = [items.summary(f) for f in found]
    summaries.sort(key=lambda s: (s["ScheduledProcedureStepStartDate"],
                                  s["ScheduledProcedureStepStartTime"]))  # fmt: skip
    for s in summaries:
        f = seen[s["id"]]
        rows.append(
            [
                f'<a href="/items/{quote(f.id)}">{e(s["AccessionNumber"] or f.id)}</a>',
                e(s["PatientName"]), e(s["PatientID"]), e(s["Modality"]),
                e(_text(s["ScheduledStationAETitle"])),
                e(f"{s['ScheduledProcedureStepStartDate']} {s['ScheduledProcedureStepStartTime']}"),
                e(s["RequestedProcedureDescription"] or s["ScheduledProcedureStepDescription"]),
                f'<span class="status">{e(s["status"])}</span>',
            ]
        )  # fmt: skip
    series = ctx.app.metrics.per_minute.series()
    charts = chart("HL7 messages per minute", [m for _t, m, _q in series]) + chart(
        "C-FIND queries per minute", [q for _t, _m, q in series]
    )
    body = (
        f'<div class="charts">{charts}</div>{form}'
        + (f'<p class="error">{e(error)}</p>' if error else "")
        + f"<p>{len(found)} item(s)</p>"
        + table(
            [
                "accession",
                "patient",
                "patient id",
                "modality",
                "station",
                "scheduled",
                "procedure",
                "status",
            ],
            rows,
            "items",
        )  # fmt: skip
    )
    path = ctx.app.server.translation_log.path

    def render(result: logsearch.LogResult) -> Response:
        latest = '<h2>Latest log lines <a href="/log">(all)</a></h2>' + log_table(result.records)
        return page(ctx, "Worklist", body + latest)

    latest = logsearch.LogQuery(limit=LATEST_LINES)
    return threads.deferToThread(logsearch.search_log, path, latest).addCallback(render)


def _text(value: Any) -> str:
    return "\\".join(value) if isinstance(value, list) else str(value or "")


def _attribute_rows(attrs: dict[str, Any], depth: int = 0) -> list[list[str]]:
    rows = []
    for name, value in attrs.items():
        label = "&gt; " * depth + e(name)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            rows.append([label, f"({len(value)} item(s))"])
            for item in value:
                rows.extend(_attribute_rows(item, depth + 1))
        else:
            rows.append([label, e(_text(value))])
    return rows


def item_page(ctx: Context):
    ident = ctx.match["id"]
    try:
        found = items.find(ctx.app.server.index, ident)
    except items.ItemNotFound:
        return page(ctx, "No such item", f"<p>No item {e(ident)}.</p>", 404)
    summary = items.summary(found)
    attrs = items.record_json(found.record)
    term = items.history_terms(found)
    path = ctx.app.server.translation_log.path

    def render(histories: dict) -> Response:
        p = ctx.principal
        actions = ""
        if p is not None and p.can_write:
            options = "".join(
                f'<option value="{s}"{" selected" if s == summary["status"] else ""}>{s}</option>'
                for s in SPS_STATUSES
            )
            actions = (
                f'<form method="post" action="/items/{quote(ident)}/status" class="inline">'
                f'{csrf_field(p)}<select name="status">{options}</select> '
                '<button type="submit">Set status</button></form> '
                f'<form method="post" action="/items/{quote(ident)}/delete" class="inline confirm" '
                'data-confirm="Remove this item from the worklist?">'
                f'{csrf_field(p)}<button type="submit" class="danger">Remove</button></form>'
            )
        body = (
            f'<p>Status <span class="status">{e(summary["status"])}</span>'
            f' · file {e(found.path.name)}</p>'
            f'<div class="actions">{actions}</div>'
            "<h2>History</h2>" + log_table(histories.get(term, []))
            + "<h2>Attributes</h2>" + table(["attribute", "value"], _attribute_rows(attrs), "attrs")
        )  # fmt: skip
        title = f"{summary['PatientName'] or summary['PatientID']} · {summary['AccessionNumber']}"
        return page(ctx, title, body)

    return threads.deferToThread(logsearch.histories, path, [term], 200).addCallback(render)


def item_status_form(ctx: Context):
    ctx.app.actions.set_status(ctx.match["id"], ctx.params.get("status", ""), ctx.who)
    return _redirect(f"/items/{quote(ctx.match['id'])}")


def item_delete_form(ctx: Context):
    ctx.app.actions.remove(ctx.match["id"], ctx.who)
    return _redirect("/")


def log_page(ctx: Context):
    q = ctx.params.get("q", "")
    query = api.log_query(ctx)
    path = ctx.app.server.translation_log.path
    form = (
        '<form method="get" action="/log" class="filters">'
        f'<label>Search <input name="q" value="{e(q)}"'
        f' placeholder="accession, patient, AE, text"></label>'
        f'<label>Type <input name="type" value="{e(query.type)}"'
        f' placeholder="C-FIND, ORM^O01" size="10"></label>'
        '<button type="submit">Search</button> '
        '<label><input type="checkbox" id="autorefresh"> refresh every 5 s</label></form>'
    )  # fmt: skip
    if path is None:
        return page(ctx, "Translation log", form + "<p>The log goes to standard output.</p>")

    def render(result: logsearch.LogResult) -> Response:
        more = "" if result.complete else "<p>(older lines not searched)</p>"
        return page(ctx, "Translation log", form + log_table(result.records) + more)

    return threads.deferToThread(logsearch.search_log, path, query).addCallback(render)


def rejected_page(ctx: Context):
    def render(entries: list[dict[str, Any]]) -> Response:
        p = ctx.principal
        rows = []
        for entry in entries:
            button = ""
            if p is not None and p.can_write:
                button = (
                    f'<form method="post" action="/rejected/{quote(entry["name"])}/replay" '
                    f'class="inline">{csrf_field(p)}<button type="submit">Replay</button></form>'
                )
            rows.append([e(entry["kept_at"]), e(entry["control_id"]), e(entry["name"]),
                         e(entry["reason"]), button])  # fmt: skip
        note = e(ctx.params.get("result", ""))
        body = (f'<p class="note">{note}</p>' if note else "") + (
            table(["kept at", "control id", "name", "reason", ""], rows, "rejected")
            if rows
            else "<p>No rejected messages kept.</p>"
        )
        return page(ctx, "Rejected messages", body)

    return threads.deferToThread(api.rejected_entries, ctx.app, 200).addCallback(render)


def replay_form(ctx: Context):
    name = ctx.match["name"]

    def shown(answer: Any) -> Response:
        result = f"{name}: {answer.ack_code} {answer.text}".strip()
        return _redirect("/rejected?" + urlencode({"result": result}))

    answer = ctx.app.actions.replay(name, ctx.who)
    if hasattr(answer, "addCallback"):  # the shared table's (PostgreSQL), in the thread pool
        return answer.addCallback(shown)
    return shown(answer)


OUTBOX_SHOWN = 500  # messages on the outbox page


def outbox_page(ctx: Context):
    outbox = getattr(ctx.app.server, "outbox", None)
    if outbox is None:
        return page(ctx, "Outbox", "<p>This bridge sends no outbound messages.</p>")
    state = ctx.params.get("state", "")
    state = state if state in ("pending", "parked") else ""
    return threads.deferToThread(outbound.entries, outbox, state).addCallback(
        lambda listed: _outbox_listing(ctx, listed)
    )


def _outbox_listing(ctx: Context, listed: list[dict[str, Any]]) -> Response:
    p = ctx.principal
    rows = []
    for m in listed[:OUTBOX_SHOWN]:
        buttons = ""
        if p is not None and p.can_write:
            action = f"/outbox/{quote(m['id'])}"
            retry = "Retry" if m["state"] == "parked" else "Send now"
            buttons = (
                f'<form method="post" action="{action}/retry" class="inline">{csrf_field(p)}'
                f'<button type="submit">{retry}</button></form> '
                f'<form method="post" action="{action}/drop" class="inline confirm" '
                f'data-confirm="Delete this message? The receiver will never get it.">'
                f'{csrf_field(p)}<button type="submit" class="danger">Drop</button></form>'
            )
        accession = m["accession"]
        rows.append([
            e(m["id"]), e(m["receiver"]), f'<span class="status">{e(m["state"])}</span>',
            e(m["control_id"]), e(m["order_status"]),
            f'<a href="/log?{urlencode({"q": accession})}">{e(accession)}</a>' if accession else "",
            e(f"{m['age']:.0f} s"), e(m["attempts"]), e(m["reason"]), buttons,
        ])  # fmt: skip
    state_info = api.outbox_state(ctx.app.server) or {}
    receivers = "".join(
        f"<li>{e(name)}: {e(r['depth'])} waiting, {e(r['parked'])} parked, "
        f"oldest {e(round(r['oldest_age']))} s</li>"
        for name, r in sorted(state_info.get("receivers", {}).items())
    )
    note = e(ctx.params.get("result", ""))
    body = (
        (f'<p class="note">{note}</p>' if note else "")
        + (f'<ul class="receivers">{receivers}</ul>' if receivers
           else "<p>No [[outbound]] receivers are configured.</p>")
        + (table(["id", "receiver", "state", "control id", "ORC-5", "accession", "age",
                  "attempts", "reason", ""], rows, "outbox") if rows
           else "<p>The outbox is empty.</p>")
        + (f"<p>{len(listed) - OUTBOX_SHOWN} more not shown.</p>"
           if len(listed) > OUTBOX_SHOWN else "")
    )  # fmt: skip
    return page(ctx, "Outbox", body)


def outbox_form(ctx: Context):
    ident = outbound.entry_id(ctx.match["receiver"], ctx.match["sequence"])
    action = ctx.match["action"]
    if action not in ("retry", "drop"):
        raise ActionError(404, "not found")

    def answer(done: dict[str, Any]) -> Response:
        result = f"{done['id']} ({done['control_id']}): " + (
            "dropped" if action == "drop" else "queued to be sent again"
        )
        return _redirect("/outbox?" + urlencode({"result": result}))

    def refused(failure: Any) -> Response:
        failure.trap(ActionError)
        return _redirect("/outbox?" + urlencode({"result": f"{ident}: {failure.value.message}"}))

    if outbound.on_database(ctx.app.server):
        return (
            outbound.act_in_thread(ctx.app.server, ident, action, ctx.who)
            .addCallback(answer)
            .addErrback(refused)
        )
    try:
        return answer(outbound.act(ctx.app.server, ident, action, ctx.who))
    except ActionError as exc:
        return _redirect("/outbox?" + urlencode({"result": f"{ident}: {exc.message}"}))


MPPS_SHOWN = 200  # instances on the MPPS page


def mpps_page(ctx: Context):
    store = getattr(ctx.app.server, "mpps_store", None)
    if store is None:
        return page(ctx, "MPPS", "<p>This bridge keeps no MPPS instances.</p>")
    status = ctx.params.get("status", "").upper()
    # on the thread that writes the folder's store; a database's in the thread pool
    known = None if outbound.on_database(ctx.app.server) else store.snapshot()

    def render(result: tuple[list[dict[str, Any]], int]) -> Response:
        listed, total = result
        options = "".join(
            f'<option value="{e(s)}"{" selected" if s == status else ""}>{e(s)}</option>'
            for s in ("", "IN PROGRESS", "COMPLETED", "DISCONTINUED")
        )
        form = (
            '<form method="get" action="/mpps" class="filters">'
            f'<label>Status <select name="status">{options}</select></label>'
            '<button type="submit">Filter</button></form>'
        )
        rows = [
            [
                f'<a href="/mpps/{quote(m["uid"])}">{e(m["uid"])}</a>',
                f'<span class="status">{e(m.get("PerformedProcedureStepStatus", ""))}</span>',
                e(m.get("PatientName", "")), e(m.get("PatientID", "")),
                e(m.get("PerformedStationAETitle", "")),
                e(" ".join((m.get("PerformedProcedureStepStartDate", ""),
                            m.get("PerformedProcedureStepStartTime", "")))),
                e(", ".join(s["AccessionNumber"] for s in m.get("scheduled_steps", []))),
                e(m.get("error", "")),
            ]
            for m in listed
        ]  # fmt: skip
        body = form + f"<p>{total} instance(s)</p>" + (
            table(["uid", "status", "patient", "patient id", "station", "started",
                   "accession", ""], rows, "mpps") if rows else ""
        )  # fmt: skip
        return page(ctx, "MPPS", body)

    return threads.deferToThread(
        outbound.mpps_listing, store, known, status, "", MPPS_SHOWN
    ).addCallback(render)


def mpps_instance_page(ctx: Context):
    store = getattr(ctx.app.server, "mpps_store", None)
    uid = ctx.match["uid"]
    if store is None or uid not in store:
        return page(ctx, "No such MPPS instance", f"<p>No MPPS instance {e(uid)}.</p>", 404)
    path = ctx.app.server.translation_log.path
    query = logsearch.LogQuery(any_of=[("mpps_uid", uid)], limit=200)

    def read() -> Response:
        detail = outbound.mpps_detail(store, uid)
        history = logsearch.search_log(path, query).records if path is not None else []
        body = (
            f'<p>Status <span class="status">{e(detail["PerformedProcedureStepStatus"])}</span>'
            f" · stored {e(detail.get('stored_at', ''))}</p>"
            "<h2>History</h2>" + log_table(history)
            + "<h2>Attributes</h2>"
            + table(["attribute", "value"], _attribute_rows(detail["attributes"]), "attrs")
        )  # fmt: skip
        return page(ctx, f"MPPS {uid}", body)

    return threads.deferToThread(read)


def login(ctx: Context):
    token = ctx.params.get("token", "")
    principal = ctx.app.auth.sign_in(token) if token else None
    if principal is None:
        return sign_in_page(ctx.request, 401, "That token is not valid.")
    secure = "; Secure" if ctx.app.settings.http_tls_cert else ""
    cookie = (
        f"{COOKIE}={principal.session_id}; Path=/; HttpOnly; SameSite=Strict; "
        f"Max-Age={int(SESSION_LIFETIME)}{secure}"
    )
    return _redirect("/", {"Set-Cookie": cookie})


def logout(ctx: Context):
    if ctx.principal is not None and ctx.principal.session_id:
        ctx.app.auth.sign_out(ctx.principal.session_id)
    return _redirect(
        "/", {"Set-Cookie": f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"}
    )


def static(ctx: Context):
    name = ctx.match["name"]
    if name not in STATIC:
        raise ActionError(404, "not found")
    data = resources.files("bridge.http").joinpath("static", name).read_bytes()
    return Response(200, data, STATIC[name], {"Cache-Control": "max-age=3600"})


def add_routes(app: HttpApp) -> None:
    r = app.route
    r("GET", "/", "read", web=True)(worklist_page)
    r("GET", "/items/{id}", "read", web=True)(item_page)
    r("POST", "/items/{id}/status", "write", web=True)(item_status_form)
    r("POST", "/items/{id}/delete", "write", web=True)(item_delete_form)
    r("GET", "/log", "read", web=True)(log_page)
    r("GET", "/rejected", "read", web=True)(rejected_page)
    r("POST", "/rejected/{name}/replay", "write", web=True)(replay_form)
    r("GET", "/outbox", "read", web=True)(outbox_page)
    r("POST", "/outbox/{receiver}/{sequence}/{action}", "write", web=True)(outbox_form)
    r("GET", "/mpps", "read", web=True)(mpps_page)
    r("GET", "/mpps/{uid}", "read", web=True)(mpps_instance_page)
    r("GET", "/login", "public")(lambda ctx: sign_in_page(ctx.request))
    r("POST", "/login", "public")(login)
    r("POST", "/logout", "read", web=True)(logout)
    r("GET", "/static/{name}", "public")(static)
