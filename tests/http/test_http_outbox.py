"""The HTTP API against the real MPPS SCP and outbox: pynetdicom as the modality's MPPS SCU, a
real MLLP receiver as the RIS (tests/ris_receiver.py), a real `wlbridge serve`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from tests.conftest import ROOT
from tests.dicom.test_mpps import final, in_progress, n_create, n_set, order
from tests.http_helpers import READ_TOKEN, HttpBridge, start_http_bridge
from tests.ris_receiver import RISReceiver
from tests.test_mpps_outbox import eventually


@pytest.fixture
def ris() -> Iterator[RISReceiver]:
    receiver = RISReceiver()
    yield receiver
    receiver.stop()


def outbound_config(tmp_path: Path, ris_port: int, *top: str, **receiver: object) -> Path:
    """A config with one `[[outbound]]` receiver "ris" (quick retries), and `top` lines."""
    table = {"name": "ris", "host": "127.0.0.1", "port": ris_port, "message": "ORM^O01",
             "retry-initial": 0.2, "retry-max": 0.5, "ack-timeout": 30.0} | receiver  # fmt: skip
    lines = [f"outbox-dir = {json.dumps(str(tmp_path / 'outbox'))}", *top, "[[outbound]]"]
    lines += [f"{key.replace('_', '-')} = {json.dumps(value)}" for key, value in table.items()]
    config = tmp_path / "wlbridge.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def start(tmp_path: Path, config: Path, *extra: str) -> HttpBridge:
    # Finished items stay a while: their page and history are looked at after COMPLETED.
    return start_http_bridge(
        tmp_path, "--config", str(config), "--finished-retention", "3600", *extra
    )


def stop(web: HttpBridge) -> None:
    assert web.bridge.stop() == 0, "".join(web.bridge.stderr_lines)


def outbox(web: HttpBridge, **params: str) -> dict:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    answer = web.call("GET", "/api/outbox" + (f"?{query}" if query else ""), token=READ_TOKEN)
    assert answer.status == 200, answer.body
    return answer.json()


def parked(web: HttpBridge) -> list[dict]:
    return outbox(web, state="parked")["messages"]


def metrics(web: HttpBridge) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    text = web.call("GET", "/metrics", token=None).body.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def item_id(web: HttpBridge, accession: str = "ACC0001") -> str:
    listed = web.call("GET", f"/api/items?AccessionNumber={accession}&include_hidden=1").json()
    (item,) = listed["items"]
    return item["id"]


def test_a_parked_message_is_retried_over_http_and_delivered_another_dropped(tmp_path, ris):
    ris.answer = "AE"  # the RIS refuses everything until told otherwise
    web = start(tmp_path, outbound_config(tmp_path, ris.port, max_attempts=2))
    try:
        order(web.bridge, control_id="OB1")
        ident = item_id(web)
        uid = generate_uid()
        assert n_create(web.bridge, in_progress(), uid)[0].Status == 0
        (entry,) = eventually(lambda: parked(web), "the IP message parked after 2 refusals")
        assert entry["receiver"] == "ris" and entry["order_status"] == "IP"
        assert entry["accession"] == "ACC0001" and entry["id"].startswith("ris/")
        assert "refused 2 times" in entry["reason"] and entry["control_id"]
        assert len(ris.received) == 2 and not ris.accepted()
        listing = outbox(web)
        assert listing["parked"] == 1 and listing["depth"] == 0
        assert listing["receivers"]["ris"] == {"depth": 0, "parked": 1, "oldest_age": 0.0}
        values = metrics(web)
        assert sample(values, "wlbridge_outbox_parked", receiver="ris") == 1
        assert sample(values, "wlbridge_outbound_queued_total", receiver="ris") == 1
        assert sample(values, "wlbridge_outbound_attempts_total", receiver="ris",
                      outcome="retrying") == 1  # fmt: skip
        assert sample(values, "wlbridge_outbound_attempts_total", receiver="ris",
                      outcome="parked") == 1  # fmt: skip
        assert sample(values, "wlbridge_mpps_events_total", event="N-CREATE",
                      outcome="started") == 1  # fmt: skip
        assert sample(values, "wlbridge_mpps_status_changes_total", status="STARTED") == 1
        # The HL7 counters count HL7 received only: not MPPS, not outbound lines.
        hl7 = [k for k in values if k[0] == "wlbridge_hl7_messages_total"]
        assert [dict(k[1])["type"] for k in hl7] == ["ORM"]

        detail = web.call("GET", f"/api/outbox/{entry['id']}", token=READ_TOKEN).json()
        assert "ORC|SC|PLC0001|FIL0001||IP" in detail["message"]
        assert detail["state"] == "parked"

        # A reader may not act; an unknown message or a path outside the outbox is a 404.
        assert web.call("POST", f"/api/outbox/{entry['id']}/retry", token=READ_TOKEN).status == 403
        assert web.call("POST", "/api/outbox/ris/999999/retry").status == 404
        assert web.call("POST", "/api/outbox/../000000000001/retry").status == 404
        assert web.call("POST", "/api/outbox/NO-SUCH-ID/drop").status == 404

        ris.answer = "AA"
        answer = web.call("POST", f"/api/outbox/{entry['control_id']}/retry")  # by MSH-10
        assert answer.status == 200, answer.body
        assert answer.json() == {"id": entry["id"], "action": "retry", "was": "parked",
                                 "control_id": entry["control_id"]}  # fmt: skip
        (delivered,) = ris.wait_for(1)
        assert delivered.control_id == entry["control_id"]  # the same MSH-10 as the first tries
        assert delivered.field("ORC", 5) == "IP"
        eventually(lambda: outbox(web)["total"] == 0, "the outbox empty once delivered")
        retried = [r for r in web.bridge.log_records() if r.get("outcome") == "outbox-retry"]
        assert len(retried) == 1
        assert retried[0]["by"] == "admin" and retried[0]["peer"] == "http:admin"
        assert retried[0]["control_id"] == entry["control_id"]
        assert retried[0]["accession"] == "ACC0001"

        # The CM is refused and parked too; a drop deletes it, and the RIS never hears of it.
        ris.answer = "AE"
        assert n_set(web.bridge, uid, final("COMPLETED")).Status == 0
        (cm,) = eventually(lambda: parked(web), "the CM message parked")
        assert cm["order_status"] == "CM"
        answer = web.call("POST", f"/api/outbox/{cm['id']}/drop")
        assert answer.status == 200 and answer.json()["was"] == "parked"
        assert outbox(web)["total"] == 0
        assert not list((tmp_path / "outbox" / "ris" / "parked").glob("*.hl7"))
        assert web.call("POST", f"/api/outbox/{cm['id']}/drop").status == 404  # gone
        dropped = [r for r in web.bridge.log_records() if r.get("outcome") == "outbox-drop"]
        assert [(r["by"], r["control_id"], r["order_status"]) for r in dropped] == [
            ("admin", cm["control_id"], "CM")
        ]
        assert [r.field("ORC", 5) for r in ris.accepted()] == ["IP"]
        values = metrics(web)
        assert sample(values, "wlbridge_outbound_attempts_total", receiver="ris",
                      outcome="sent") == 1  # fmt: skip
        assert sample(values, "wlbridge_mpps_events_total", event="N-SET",
                      outcome="completed") == 1  # fmt: skip
        assert sample(values, "wlbridge_outbox_parked", receiver="ris") == 0
        assert sample(values, "wlbridge_api_changes_total", outcome="outbox-drop", by="admin") == 1

        # The item's history: its HL7 order, both MPPS events, the outbound lines, the retry.
        item = web.call("GET", f"/api/items/{ident}", token=READ_TOKEN).json()
        assert item["status"] == "COMPLETED"
        lines = [(r.get("type"), r.get("outcome")) for r in item["history"]]
        for expected in [
            ("ORM^O01", "created"),
            ("MPPS^N-CREATE", "started"),
            ("MPPS^N-SET", "completed"),
            ("ORM^O01", "queued"),
            ("ORM^O01", "parked"),
            ("ORM^O01", "sent"),
            ("api", "outbox-retry"),
            ("api", "outbox-drop"),
        ]:
            assert expected in lines, (expected, lines)
        # The same in a listing's shorter history.
        listed = web.call("GET", "/api/items?AccessionNumber=ACC0001&include_hidden=1").json()
        assert ("MPPS^N-CREATE", "started") in [
            (r.get("type"), r.get("outcome")) for r in listed["items"][0]["history"]
        ]
    finally:
        stop(web)


def test_mpps_instances_are_listed_and_shown_with_their_log_lines(tmp_path, ris):
    web = start(tmp_path, outbound_config(tmp_path, ris.port))
    try:
        order(web.bridge, control_id="MP1")
        first, second = generate_uid(), generate_uid()
        assert n_create(web.bridge, in_progress(), first)[0].Status == 0
        assert n_set(web.bridge, first, final("COMPLETED")).Status == 0
        unscheduled = in_progress(patient_id="WALKIN")
        unscheduled.ScheduledStepAttributesSequence[0].AccessionNumber = "NO-SUCH"
        unscheduled.ScheduledStepAttributesSequence[0].StudyInstanceUID = "1.2.3.4.99"
        assert n_create(web.bridge, unscheduled, second)[0].Status == 0

        listing = web.call("GET", "/api/mpps", token=READ_TOKEN).json()
        assert listing["total"] == 2
        assert [m["uid"] for m in listing["mpps"]] == [second, first]  # newest first
        by_uid = {m["uid"]: m for m in listing["mpps"]}
        assert by_uid[first]["PerformedProcedureStepStatus"] == "COMPLETED"
        assert by_uid[first]["PerformedProcedureStepEndTime"] == "110000"
        assert by_uid[first]["scheduled_steps"][0]["AccessionNumber"] == "ACC0001"
        assert by_uid[second]["PatientID"] == "WALKIN"
        completed = web.call("GET", "/api/mpps?status=COMPLETED", token=READ_TOKEN).json()
        assert [m["uid"] for m in completed["mpps"]] == [first]
        walkin = web.call("GET", "/api/mpps?patient_id=WALKIN", token=READ_TOKEN).json()
        assert [m["uid"] for m in walkin["mpps"]] == [second]
        assert web.call("GET", "/api/mpps?limit=1", token=READ_TOKEN).json()["count"] == 1

        detail = web.call("GET", f"/api/mpps/{first}", token=READ_TOKEN).json()
        assert detail["attributes"]["PerformedSeriesSequence"][0]["SeriesInstanceUID"] == (
            "1.2.3.4.5.6"
        )
        assert [(r["type"], r["outcome"]) for r in detail["history"]] == [
            ("MPPS^N-SET", "completed"),
            ("MPPS^N-CREATE", "started"),
        ]
        assert detail["history"][0]["file"].endswith(".wl")  # the item it moved
        unmatched = web.call("GET", f"/api/mpps/{second}", token=READ_TOKEN).json()
        assert [r["outcome"] for r in unmatched["history"]] == ["unmatched"]
        assert web.call("GET", "/api/mpps/1.2.3.404", token=READ_TOKEN).status == 404
        assert web.call("GET", "/api/mpps").status == 200
        assert web.call("GET", "/api/mpps", token=None).status == 401
        values = metrics(web)
        assert sample(values, "wlbridge_mpps_events_total", event="N-CREATE",
                      outcome="unmatched") == 1  # fmt: skip
    finally:
        stop(web)


def test_readyz_fails_while_a_message_waits_longer_than_ready_outbox_max_age(tmp_path, ris):
    ris.stop()  # the RIS is down: the message waits (never parked: not the message's fault)
    config = outbound_config(tmp_path, ris.port, "ready-outbox-max-age = 2.0")
    web = start(tmp_path, config)
    try:
        assert web.call("GET", "/readyz", token=None).status == 200
        order(web.bridge, control_id="RZ1")
        assert n_create(web.bridge, in_progress(), generate_uid())[0].Status == 0

        def not_ready():
            answer = web.call("GET", "/readyz", token=None)
            return answer.json() if answer.status == 503 else None

        body = eventually(not_ready, "/readyz 503 once the message waited over 2 s")
        assert body["failed"] == ["outbox"]
        check = body["checks"]["outbox"]
        assert check["depth"] == 1 and check["oldest_age"] > 2.0 and check["max_age"] == 2.0
        values = metrics(web)
        assert sample(values, "wlbridge_outbox_depth", receiver="ris") == 1
        assert sample(values, "wlbridge_outbox_oldest_age_seconds", receiver="ris") > 2.0
        summary = web.call("GET", "/api/status", token=READ_TOKEN).json()
        assert summary["outbox"]["receivers"]["ris"]["depth"] == 1
        shown = subprocess.run(
            [sys.executable, "-m", "bridge", "status", "--url", f"http://127.0.0.1:{web.http_port}",
             "--token-file", str(tmp_path / "reader.token")],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"^  ris +1 waiting, 0 parked, oldest \d+ s$", shown.stdout, re.M), (
            shown.stdout
        )

        ris.start()  # back on the same port: the message goes, the bridge is ready again
        ris.wait_for(1)
        eventually(lambda: web.call("GET", "/readyz", token=None).status == 200, "ready again")
        assert sample(metrics(web), "wlbridge_outbox_depth", receiver="ris") == 0
    finally:
        stop(web)
