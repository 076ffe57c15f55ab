"""Rejected messages on a PostgreSQL store: two real `wlbridge serve` processes on one database
list, show and replay the kept messages of the shared table, whichever bridge refused them,
and a message is replayed exactly once (the row's replay lock, then its removal)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from bridge.storage.postgres.memory import RejectedMessages, ReplayRefused
from bridge.storage.postgres.schema import upgrade
from tests.http_helpers import HttpBridge, start_http_bridge
from tests.messages import orm
from tests.peers import eventually
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401
from tests.test_two_bridges import accessions, ack_code, send, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def start(tmp_path: Path, name: str, dsn: str, only_production: bool = False) -> HttpBridge:
    """A bridge with HTTP on the database; `only_production`: its config refuses MSH-11 `T`
    (a misconfigured bridge: the other one accepts what this one refuses)."""
    folder = tmp_path / name
    folder.mkdir()
    extra: tuple[str, ...] = ("--store", dsn)
    if only_production:
        config = folder / "wlbridge.toml"
        config.write_text('processing-ids = ["P"]\n')
        extra += ("--config", str(config), "--dicom-workers", "0")
    return start_http_bridge(folder, *extra)


def refused_by(bridge: HttpBridge, control_id: str, accession: str) -> None:
    message = orm(control_id=control_id, accession=accession, processing_id="T")
    assert ack_code(send(bridge.bridge.mllp_port, message)) in ("AE", "AR")


def stop(*bridges: HttpBridge) -> None:
    for web in bridges:
        assert web.bridge.stop() == 0, "".join(web.bridge.stderr_lines)


def test_a_message_refused_by_one_bridge_is_listed_shown_and_replayed_once_from_the_other(
    tmp_path: Path, dsn: str
):
    a = start(tmp_path, "a", dsn, only_production=True)
    b = start(tmp_path, "b", dsn)
    try:
        refused_by(a, "REJ-A1", "ACC-RA1")
        listed = b.call("GET", "/api/rejected")
        assert listed.status == 200, listed.body
        (entry,) = listed.json()["rejected"]
        assert listed.json()["count"] == 1
        assert entry["control_id"] == "REJ-A1" and entry["kept_at"].endswith("Z")
        assert entry["reason"].startswith(("AE ", "AR ")) and entry["size"] > 100
        assert set(entry) == {"name", "kept_at", "control_id", "size", "reason"}  # the folder's
        assert a.call("GET", "/api/rejected").json()["rejected"] == [entry]  # the same table
        assert b.call("GET", "/api/status").json()["rejected"]["kept"] == 1

        shown = b.call("GET", f"/api/rejected/{entry['name']}")
        assert shown.status == 200, shown.body
        assert "REJ-A1" in shown.json()["message"] and shown.json()["name"] == entry["name"]

        replayed = b.call("POST", f"/api/rejected/{entry['name']}/replay")
        assert replayed.status == 200 and replayed.json()["ack"] == "AA", replayed.body
        logged = [r for r in b.bridge.log_records() if r.get("control_id") == "REJ-A1"]
        assert logged[-1]["ack"] == "AA" and logged[-1]["peer"] == "http:admin replay"
        assert accessions(b.bridge, tmp_path / "find-b") == {"ACC-RA1": "SCHEDULED"}
        found = wait_for(a.bridge, tmp_path / "find-a", lambda f: "ACC-RA1" in f)
        assert found == {"ACC-RA1": "SCHEDULED"}

        again = a.call("POST", f"/api/rejected/{entry['name']}/replay")
        assert again.status == 404 and "replayed already" in again.json()["error"], again.body
        assert a.call("GET", "/api/rejected").json()["rejected"] == []
        assert a.call("GET", f"/api/rejected/{entry['name']}").status == 404
        assert a.call("GET", "/api/status").json()["rejected"]["kept"] == 0
        assert b.call("POST", "/api/rejected/20261202T000000000000-X-r99999/replay").status == 404
        assert b.call("POST", "/api/rejected/..%2Fx/replay").status == 404
    finally:
        stop(a, b)


def test_a_replay_refused_again_keeps_the_row_with_its_new_reason(tmp_path: Path, dsn: str):
    a = start(tmp_path, "a", dsn, only_production=True)
    try:
        refused_by(a, "REJ-A2", "ACC-RA2")
        (entry,) = a.call("GET", "/api/rejected").json()["rejected"]
        again = a.call("POST", f"/api/rejected/{entry['name']}/replay")
        assert again.status == 422 and again.json()["ack"] in ("AE", "AR"), again.body
        (still,) = a.call("GET", "/api/rejected").json()["rejected"]
        assert still["name"] == entry["name"]  # one row, not replayed away
        page = a.call("GET", "/rejected")  # the web view lists the table's rows too
        assert page.status == 200 and entry["name"] in page.body.decode()
        form = a.call("POST", f"/rejected/{entry['name']}/replay")  # its Replay button
        assert form.status in (302, 303) and "result=" in form.headers["location"], form
        assert "AE" in form.headers["location"] or "AR" in form.headers["location"]
        assert [e["name"] for e in a.call("GET", "/api/rejected").json()["rejected"]] == [
            entry["name"]
        ]
    finally:
        stop(a)


def test_a_message_being_replayed_is_refused_to_a_second_replay(tmp_path: Path, dsn: str):
    refuser = start(tmp_path, "refuser", dsn, only_production=True)
    try:
        refused_by(refuser, "REJ-A3", "ACC-RA3")
    finally:
        stop(refuser)
    a = start(tmp_path, "a", dsn)  # both accept it
    b = start(tmp_path, "b", dsn)
    shared = RejectedMessages(dsn)
    try:
        (entry,) = b.call("GET", "/api/rejected").json()["rejected"]
        claimed = shared.claim(entry["name"], 1 << 20)  # another replay holds it
        try:
            with pytest.raises(ReplayRefused) as refused:
                shared.claim(entry["name"], 1 << 20)
            assert refused.value.status == 409
            busy = b.call("POST", f"/api/rejected/{entry['name']}/replay")
            assert busy.status == 409 and "being replayed" in busy.json()["error"], busy.body
        finally:
            claimed.finish(False)  # given up: it stays
        # two people at once, one on each bridge: exactly one replay happens
        answers: list = []
        calls = [
            threading.Thread(
                target=lambda w=w: answers.append(
                    w.call("POST", f"/api/rejected/{entry['name']}/replay")
                )
            )
            for w in (a, b)
        ]
        for call in calls:
            call.start()
        for call in calls:
            call.join(60)
        assert sorted(x.status for x in answers) in ([200, 404], [200, 409]), answers
        applied = [
            r
            for w in (a, b)
            for r in w.bridge.log_records()
            if r.get("control_id") == "REJ-A3" and r.get("peer") == "http:admin replay"
        ]
        assert len(applied) == 1 and applied[0]["ack"] == "AA"
    finally:
        shared.close()
        stop(a, b)


def test_wlbridge_replay_with_the_store_lists_and_replays_once(tmp_path: Path, dsn: str):
    a = start(tmp_path, "a", dsn, only_production=True)
    b = start(tmp_path, "b", dsn)

    def replay(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bridge", "replay", "--store", dsn, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        refused_by(a, "REJ-A4", "ACC-RA4")
        listing = replay()
        assert listing.returncode == 0, listing.stderr
        (line,) = listing.stdout.splitlines()
        name = line.split()[0]
        assert (
            "REJ-A4" in line
            and name == b.call("GET", "/api/rejected").json()["rejected"][0]["name"]
        )
        done = replay(name, "--port", str(b.bridge.mllp_port))
        assert done.returncode == 0 and f"{name}: AA REJ-A4" in done.stdout, done
        assert accessions(b.bridge, tmp_path / "find-b") == {"ACC-RA4": "SCHEDULED"}
        twice = replay(name, "--port", str(a.bridge.mllp_port))
        assert twice.returncode == 1 and "replayed already" in twice.stdout, twice
        assert replay().stdout == ""
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0] == 0
        down = subprocess.run(
            [sys.executable, "-m", "bridge", "replay", "--store", "postgresql://x@127.0.0.1:1/x"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert down.returncode == 2 and "store unavailable" in down.stderr, down
        assert "Traceback" not in down.stderr
    finally:
        stop(a, b)


def rejected_kept_metric(bridge: HttpBridge) -> tuple[float | None, str]:
    """(wlbridge_rejected_kept's value or None when left out, its help text) of /metrics."""
    text = bridge.call("GET", "/metrics").body.decode()
    value = help_text = None
    for line in text.splitlines():
        if line.startswith("wlbridge_rejected_kept "):
            value = float(line.split()[1])
        elif line.startswith("# HELP wlbridge_rejected_kept "):
            help_text = line
    return value, help_text or ""


def test_the_kept_metric_counts_what_the_api_lists_on_every_bridge(tmp_path: Path, dsn: str):
    a = start(tmp_path, "a", dsn, only_production=True)
    b = start(tmp_path, "b", dsn)
    try:
        for n in (1, 2):
            refused_by(a, f"REJ-M{n}", f"ACC-RM{n}")
        assert not list(b.bridge.rejected_dir.glob("*.hl7"))  # b's own folder: empty
        for bridge in (a, b):
            value, help_text = rejected_kept_metric(bridge)
            assert value == 2 == len(bridge.call("GET", "/api/rejected").json()["rejected"])
            assert "shared table" in help_text and "/api/rejected" in help_text
        first = row_named_on(b, "REJ-M1")
        assert b.call("POST", f"/api/rejected/{first}/replay").json()["ack"] == "AA"
        assert rejected_kept_metric(b)[0] == 1 == rejected_kept_metric(a)[0]
    finally:
        stop(a, b)


def row_named_on(bridge: HttpBridge, control_id: str) -> str:
    rows = bridge.call("GET", "/api/rejected").json()["rejected"]
    return next(r["name"] for r in rows if r["control_id"] == control_id)


def test_the_kept_metric_is_left_out_while_the_database_cannot_count(tmp_path: Path, postgres):  # noqa: F811
    upgrade(postgres.dsn)
    a = start(tmp_path, "a", postgres.dsn, only_production=True)
    try:
        refused_by(a, "REJ-DOWN", "ACC-RDOWN")
        assert rejected_kept_metric(a)[0] == 1
        postgres.stop()
        try:
            started = time.monotonic()
            scrape = a.call("GET", "/metrics")
            took = time.monotonic() - started
            assert scrape.status == 200 and b"wlbridge_items" in scrape.body
            # not the folder's count (1) passed off as the table's: left out
            assert b"wlbridge_rejected_kept" not in scrape.body
            assert len(list(a.bridge.rejected_dir.glob("*.hl7"))) == 1
            assert took < 10, f"a scrape took {took:.1f} s with the database down"
        finally:
            postgres.start()
        assert eventually(lambda: rejected_kept_metric(a)[0] == 1, "the gauge back", timeout=30)
    finally:
        stop(a)
