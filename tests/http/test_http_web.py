"""The web view in a real browser: Debian's chromium, driven headless by Playwright."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_helpers import ADMIN_TOKEN, READ_TOKEN, HttpBridge, start_http_bridge
from tests.messages import orm
from tests.test_end_to_end import msa, raw_send

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install '.[test]')")
        sync_playwright = None
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        why = "needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return sync_playwright


@pytest.fixture
def browser():
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[HttpBridge]:
    running = start_http_bridge(tmp_path)
    yield running
    code = running.bridge.stop()
    assert code == 0, "".join(running.bridge.stderr_lines)


def test_sign_in_see_the_item_its_history_and_the_log(web, browser):
    sent = orm(control_id="WEB1", accession="ACC-WEB", patient_name="LEFEVRE^Marie")
    assert msa(raw_send(web.bridge.mllp_port, sent))[0] == "AA"
    base = f"http://127.0.0.1:{web.http_port}"
    page = browser.new_page()
    response = page.goto(base + "/")
    assert response.status == 401  # the sign-in form, nothing else
    assert page.locator("table").count() == 0
    page.fill("input[name=token]", "wrong")
    page.click("button[type=submit]")
    assert "not valid" in page.content()
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("table.items")
    assert "LEFEVRE^Marie" in page.inner_text("table.items")
    cookie = next(c for c in page.context.cookies() if c["name"] == "wlbridge_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["value"] != ADMIN_TOKEN
    assert "WEB1" in page.inner_text("table.log")  # the latest log lines, under the worklist

    page.click("text=ACC-WEB")  # the item's page, with its history
    page.wait_for_selector("table.attrs")
    assert "WEB1" in page.inner_text("table.log")
    assert "ACC-WEB" in page.inner_text("table.attrs")

    page.goto(base + "/log?q=ACC-WEB")
    assert "WEB1" in page.inner_text("table.log")

    # a status change from the item's page: C-FIND stops returning it
    page.goto(base + "/")
    page.click("text=ACC-WEB")
    page.select_option("select[name=status]", "COMPLETED")
    page.click("text=Set status")
    page.wait_for_selector("text=COMPLETED")
    listed = web.call("GET", "/api/items?AccessionNumber=ACC-WEB&include_hidden=1").json()
    assert listed["items"][0]["status"] == "COMPLETED"
    line = [r for r in web.bridge.log_records() if r.get("outcome") == "completed"][-1]
    assert line["by"] == "admin"


def test_a_reader_sent_by_header_sees_no_write_buttons_and_hl7_text_is_escaped(web, browser):
    hostile = orm(
        control_id="XSS1", accession="ACC-X", patient_name="<b>X</b><script>alert(1)</script>^Bob"
    )
    assert msa(raw_send(web.bridge.mllp_port, hostile))[0] == "AA"
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {READ_TOKEN}"})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"http://127.0.0.1:{web.http_port}/")
    text = page.inner_text("table.items")
    assert "<b>X</b><script>alert(1)</script>" in text  # shown as text, not markup
    assert page.locator("table.items b").count() == 0
    page.click("text=ACC-X")
    page.wait_for_selector("table.attrs")
    assert page.locator("text=Set status").count() == 0  # a reader: no write forms
    assert dialogs == []


def test_a_form_post_without_the_session_csrf_token_is_refused(web, browser):
    raw_send(web.bridge.mllp_port, orm(control_id="CS1", accession="ACC-CS"))
    ident = web.call("GET", "/api/items?AccessionNumber=ACC-CS").json()["items"][0]["id"]
    page = browser.new_page()
    base = f"http://127.0.0.1:{web.http_port}"
    page.goto(base + "/login")
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("table.items")
    # the session cookie alone does not make a write
    refused = page.request.post(base + f"/items/{ident}/delete", form={"csrf": "forged"})
    assert refused.status == 403
    assert web.call("GET", f"/api/items/{ident}").status == 200
    page.goto(base + f"/items/{ident}")
    page.once("dialog", lambda d: d.accept())  # the removal asks first
    page.click("text=Remove")
    page.wait_for_selector("table.items")
    assert web.call("GET", f"/api/items/{ident}").status == 404


def test_the_outbox_page_lists_parked_messages_with_csrf_protected_retry_and_drop(
    tmp_path, browser
):
    from pydicom.uid import generate_uid

    from tests.dicom.test_mpps import final, in_progress, n_create, n_set, order
    from tests.http.test_http_outbox import outbound_config, parked, start
    from tests.ris_receiver import RISReceiver
    from tests.test_mpps_outbox import eventually

    ris = RISReceiver(answer="AE")
    web = start(tmp_path, outbound_config(tmp_path, ris.port, max_attempts=1))
    try:
        order(web.bridge, control_id="WOB1")
        uid = generate_uid()
        assert n_create(web.bridge, in_progress(), uid)[0].Status == 0
        (entry,) = eventually(lambda: parked(web), "the IP message parked")
        base = f"http://127.0.0.1:{web.http_port}"

        reader = browser.new_context(extra_http_headers={"Authorization": f"Bearer {READ_TOKEN}"})
        shown = reader.new_page()
        shown.goto(base + "/outbox")
        assert entry["control_id"] in shown.inner_text("table.outbox")
        assert shown.locator("table.outbox button").count() == 0  # a reader: no buttons

        page = browser.new_page()
        page.goto(base + "/login")
        page.fill("input[name=token]", ADMIN_TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("table.items")
        page.goto(base + "/outbox")
        row = page.inner_text("table.outbox")
        assert entry["id"] in row and "parked" in row and "IP" in row and "ACC0001" in row
        # the session cookie alone does not make a write
        forged = page.request.post(base + f"/outbox/{entry['id']}/retry", form={"csrf": "x"})
        assert forged.status == 403
        assert [m["id"] for m in parked(web)] == [entry["id"]]

        ris.answer = "AA"
        page.click("text=Retry")
        page.wait_for_selector("p.note")
        assert "queued to be sent again" in page.inner_text("p.note")
        assert ris.wait_for(1)[0].control_id == entry["control_id"]

        ris.answer = "AE"
        assert n_set(web.bridge, uid, final("COMPLETED")).Status == 0
        (cm,) = eventually(lambda: parked(web), "the CM message parked")
        # the item's page: its history holds the MPPS events and the outbound messages
        listed = web.call("GET", "/api/items?AccessionNumber=ACC0001&include_hidden=1").json()
        page.goto(base + f"/items/{listed['items'][0]['id']}")
        history = page.inner_text("table.log")
        for text in ("MPPS^N-CREATE", "MPPS^N-SET", "COMPLETED", "parked", "sent", "outbox-retry"):
            assert text in history, text
        assert uid in history and cm["control_id"] in history
        # the MPPS page lists the instance; its own page shows its log lines and attributes
        page.goto(base + "/mpps")
        assert "COMPLETED" in page.inner_text("table.mpps")
        page.click(f"text={uid}")
        page.wait_for_selector("table.attrs")
        assert "MPPS^N-SET" in page.inner_text("table.log")
        assert "PerformedSeriesSequence" in page.inner_text("table.attrs")
        page.goto(base + "/outbox")
        page.once("dialog", lambda d: d.accept())  # a drop asks first
        page.click("text=Drop")
        page.wait_for_selector("p.note")
        assert "dropped" in page.inner_text("p.note")
        assert "The outbox is empty." in page.content()
        assert parked(web) == []
        writes = [(r["outcome"], r["by"], r["control_id"]) for r in web.bridge.log_records()
                  if r.get("outcome", "").startswith("outbox-")]  # fmt: skip
        assert writes == [
            ("outbox-retry", "admin", entry["control_id"]),
            ("outbox-drop", "admin", cm["control_id"]),
        ]
        assert [r.field("ORC", 5) for r in ris.accepted()] == ["IP"]
    finally:
        ris.stop()
        assert web.bridge.stop() == 0
