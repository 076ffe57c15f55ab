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
