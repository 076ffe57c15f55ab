"""The HTTP admin API against a real `wlbridge serve`: auth, items, log, rejected, metrics."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.net.client import find, worklist_query
from tests.conftest import ROOT
from tests.http_helpers import ADMIN_TOKEN, READ_TOKEN, HttpBridge, start_http_bridge
from tests.messages import orm
from tests.test_end_to_end import msa, raw_send


@pytest.fixture
def web(tmp_path: Path) -> Iterator[HttpBridge]:
    running = start_http_bridge(tmp_path)
    yield running
    code = running.bridge.stop()
    assert code == 0, "".join(running.bridge.stderr_lines)


def cfind(web: HttpBridge, **keys: str) -> list:
    status, answers = find(
        "127.0.0.1", web.bridge.dicom_port, worklist_query(**keys), "WLBRIDGE", "CT_SCANNER_1"
    )
    assert status == 0
    return answers


def samples(metrics_text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lab), v in values.items()
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items())
    )


def test_health_needs_no_token_and_the_api_needs_one(web):
    assert web.call("GET", "/healthz", token=None).status == 200
    ready = web.call("GET", "/readyz", token=None)
    assert ready.status == 200, ready.body
    assert ready.json()["status"] == "ready" and ready.json()["failed"] == []
    unauthorised = web.call("GET", "/api/items", token=None)
    assert unauthorised.status == 401
    assert unauthorised.headers["www-authenticate"].startswith("Bearer")
    assert web.call("GET", "/api/items", token="not-the-token").status == 401
    assert web.call("GET", "/api/items", token=READ_TOKEN).status == 200
    # the reader token may only read
    answer = web.call("DELETE", "/api/items/0123abcd", token=READ_TOKEN)
    assert answer.status == 403
    assert web.call("DELETE", "/api/items/0123abcd", token=ADMIN_TOKEN).status == 404


def test_metrics_parse_and_count_hl7_and_cfind(web):
    before = samples(web.call("GET", "/metrics", token=None).body.decode())
    assert msa(raw_send(web.bridge.mllp_port, orm(control_id="MET1")))[0] == "AA"
    assert (
        msa(raw_send(web.bridge.mllp_port, orm(control_id="MET2", order_control="XX")))[0] == "AE"
    )
    assert len(cfind(web, accession="ACC0001")) == 1
    after = samples(web.call("GET", "/metrics", token=None).body.decode())
    name = "wlbridge_hl7_messages_total"
    aa = dict(type="ORM", trigger="O01", ack="AA")
    assert total(after, name, **aa) == total(before, name, **aa) + 1
    assert total(after, name, ack="AE") == total(before, name, ack="AE") + 1
    queries = "wlbridge_cfind_requests_total"
    assert total(after, queries, calling_ae="CT_SCANNER_1", status="0000") == 1
    assert total(after, "wlbridge_cfind_answers_sum") == 1
    assert total(after, "wlbridge_hl7_apply_seconds_count") == 2
    assert total(after, "wlbridge_items", status="SCHEDULED") == 1
    assert total(after, "wlbridge_rejected_kept") == 1


def test_an_order_found_completed_hidden_and_deleted_with_its_log(web):
    assert msa(raw_send(web.bridge.mllp_port, orm(control_id="O1", accession="ACC-77")))[0] == "AA"
    listed = web.call("GET", "/api/items?AccessionNumber=ACC-77").json()
    assert listed["count"] == 1
    item = listed["items"][0]
    assert item["status"] == "SCHEDULED" and item["PatientID"] == "PAT001"
    assert [h["control_id"] for h in item["history"]] == ["O1"]
    ident = item["id"]
    assert (
        web.call("GET", f"/api/items/{ident}").json()["attributes"]["AccessionNumber"] == "ACC-77"
    )
    assert len(cfind(web, accession="ACC-77")) == 1

    changed = web.call("POST", f"/api/items/{ident}/status", body={"status": "COMPLETED"})
    assert changed.status == 200, changed.body
    assert changed.json()["status"] == "COMPLETED"
    assert cfind(web, accession="ACC-77") == []  # hidden from modalities
    assert web.call("GET", "/api/items?AccessionNumber=ACC-77").json()["count"] == 0
    hidden = web.call("GET", "/api/items?AccessionNumber=ACC-77&include_hidden=1").json()
    assert hidden["items"][0]["status"] == "COMPLETED"
    bad = web.call("POST", f"/api/items/{ident}/status", body={"status": "DONE"})
    assert bad.status == 422

    assert web.call("DELETE", f"/api/items/{ident}").status == 200
    assert web.call("GET", f"/api/items/{ident}").status == 404
    assert not web.bridge.wl_files()
    lines = [r for r in web.bridge.log_records() if r.get("accession") == "ACC-77"]
    removal = [r for r in lines if r.get("outcome") == "removed"]
    assert removal and removal[0]["by"] == "admin" and removal[0]["type"] == "api"
    assert any(r.get("outcome") == "completed" and r.get("by") == "admin" for r in lines)

    found = web.call("GET", "/api/messages?accession=ACC-77").json()["messages"]
    assert found[0]["outcome"] == "removed"  # newest first
    assert {r.get("control_id") for r in found} >= {"O1"}
    assert any(r.get("type") == "C-FIND" for r in found)
    only_one = web.call("GET", "/api/messages?accession=ACC-77&limit=1").json()
    assert only_one["count"] == 1
    assert web.call("GET", "/api/messages?limit=0").status == 400


def test_every_cfind_gets_a_log_line_with_what_was_asked_and_answered(web):
    raw_send(web.bridge.mllp_port, orm(control_id="Q1", modality="MR"))
    cfind(web, modality="MR")
    cfind(web, modality="US")
    queries = web.call("GET", "/api/messages?type=C-FIND").json()["messages"]
    assert [q["answers"] for q in queries] == ["0", "1"]
    newest = queries[0]
    assert newest["calling_ae"] == "CT_SCANNER_1" and newest["called_ae"] == "WLBRIDGE"
    assert "Modality=US" in newest["keys"] and newest["status"] == "0000"
    assert float(newest["ms"]) >= 0


def test_a_rejected_message_is_listed_and_replayed_once_fixed(web):
    bad = orm(control_id="REJ1", accession="ACC-R", start="20261301")  # month 13
    assert msa(raw_send(web.bridge.mllp_port, bad))[0] == "AE"
    kept = web.call("GET", "/api/rejected").json()["rejected"]
    assert len(kept) == 1 and kept[0]["control_id"] == "REJ1"
    assert kept[0]["reason"].startswith("AE 102")
    name = kept[0]["name"]
    assert "MSH|" in web.call("GET", f"/api/rejected/{name}").json()["message"]

    again = web.call("POST", f"/api/rejected/{name}/replay")
    assert again.status == 422 and again.json()["ack"] == "AE"  # not fixed yet
    path = web.bridge.rejected_dir / f"{name}.hl7"
    path.write_text(orm(control_id="REJ1", accession="ACC-R"))  # the file, fixed
    fixed = web.call("POST", f"/api/rejected/{name}/replay")
    assert fixed.status == 200 and fixed.json()["ack"] == "AA", fixed.body
    assert web.call("GET", "/api/items?AccessionNumber=ACC-R").json()["count"] == 1
    assert web.call("GET", "/api/rejected").json()["rejected"] == []
    assert (web.bridge.rejected_dir / "replayed" / f"{name}.hl7").exists()
    replayed = [r for r in web.bridge.log_records() if r.get("control_id") == "REJ1"]
    assert replayed[-1]["ack"] == "AA" and replayed[-1]["peer"] == "http:admin replay"
    assert web.call("POST", "/api/rejected/..%2Fx/replay").status == 404


WALK_IN = {
    "PatientID": "W-1",
    "PatientName": "DOE^Jane",
    "PatientBirthDate": "19800101",
    "PatientSex": "F",
    "AccessionNumber": "WALK-1",
    "RequestedProcedureID": "RP-W1",
    "ScheduledProcedureStepID": "SPS-W1",
    "Modality": "CT",
    "ScheduledStationAETitle": "CT_SCANNER_1",
    "ScheduledProcedureStepStartDateTime": "202612011500",
    "RequestedProcedureCode": "CTHEAD",
    "RequestedProcedureDescription": "CT head",
}


def test_a_walk_in_scheduled_from_json_goes_through_the_hl7_checks(web):
    created = web.call("POST", "/api/items", body=WALK_IN)
    assert created.status == 201, created.body
    item = created.json()
    assert item["ScheduledStationAETitle"] == "CT_SCANNER_1" and item["status"] == "SCHEDULED"
    assert item["StudyInstanceUID"].startswith("2.25.")
    answers = cfind(web, station="CT_SCANNER_1")
    assert [str(a.PatientName) for a in answers] == ["DOE^Jane"]
    line = [r for r in web.bridge.log_records() if r.get("accession") == "WALK-1"][0]
    assert line["type"] == "OMI^O23" and line["ack"] == "AA" and line["peer"] == "http:admin"

    # the same checks as HL7: a bad date is the ACK's ERR text, nothing is stored
    refused = web.call("POST", "/api/items", body={**WALK_IN, "AccessionNumber": "WALK-2",
                                                   "ScheduledProcedureStepStartDateTime":
                                                       "202613011500"})  # fmt: skip
    assert refused.status == 422 and refused.json()["error"].startswith("102 TQ1^1^7"), refused.body
    assert web.call("GET", "/api/items?AccessionNumber=WALK-2").json()["count"] == 0
    assert web.call("POST", "/api/items", body={"Colour": "blue"}).status == 400
    assert web.call("POST", "/api/items", raw=b"{not json").status == 400

    # HL7 delimiters in a JSON value are escaped, not read as structure
    odd = {**WALK_IN, "AccessionNumber": "WALK-3", "ScheduledProcedureStepID": "SPS-W3",
           "RequestedProcedureDescription": "CT | head & neck ~ 2 \\ ^x"}  # fmt: skip
    made = web.call("POST", "/api/items", body=odd)
    assert made.status == 201, made.body
    # (a backslash, DICOM's value separator, becomes "/" as it does from HL7 escapes)
    assert made.json()["RequestedProcedureDescription"] == "CT | head & neck ~ 2 / ^x"

    replaced = web.call("PUT", f"/api/items/{item['id']}", body={"Modality": "MR"})
    assert replaced.status == 200, replaced.body
    assert replaced.json()["Modality"] == "MR" and replaced.json()["id"] == item["id"]
    assert replaced.json()["PatientName"] == "DOE^Jane"  # kept from the item


def test_bounds_and_odd_paths(web):
    big = web.call("POST", "/api/items", raw=b"{" + b" " * (300 * 1024) + b"}")
    assert big.status == 413
    assert web.call("GET", "/api/items/..%2F..%2Fetc").status == 404
    assert web.call("GET", "/api/nothing").status == 404
    assert web.call("PATCH", "/api/items").status == 405
    assert web.call("GET", "/api/items?PatientName=" + "A" * 500).status == 400
    assert web.call("GET", "/healthz", token=None).status == 200  # still serving


def test_status_summary_and_the_status_command(web):
    raw_send(web.bridge.mllp_port, orm(control_id="S1"))
    cfind(web, accession="ACC0001")
    summary = web.call("GET", "/api/status", token=READ_TOKEN).json()
    assert summary["items_by_status"] == {"SCHEDULED": 1}
    assert summary["last_message"]["control_id"] == "S1"
    assert "CT_SCANNER_1" in summary["last_query_by_calling_ae"]
    token_file = web.bridge.worklist_dir.parents[1] / "reader.token"
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "status", "--url", f"http://127.0.0.1:{web.http_port}",
         "--token-file", str(token_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "SCHEDULED" in result.stdout and "S1" in result.stdout and "CT_SCANNER_1" in result.stdout
    )


def test_http_settings_mistakes_are_sentences(tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bridge", "serve", "--worklist-dir", str(tmp_path / "wl"),
             *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    result = serve("--http-port", "8080")
    assert result.returncode == 2 and "http_token_file" in result.stderr
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    result = serve("--http-port", "8080", "--http-token-file", str(empty))
    assert result.returncode == 2 and "is empty" in result.stderr
    result = serve("--http-port", "8080", "--http-token-file", str(tmp_path / "missing"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_outbox_and_mpps_answer_empty_lists_without_receivers_or_instances(web):
    outbox = web.call("GET", "/api/outbox", token=READ_TOKEN).json()
    assert outbox["messages"] == [] and "[[outbound]]" in outbox["note"]
    assert outbox["depth"] == 0 and outbox["receivers"] == {}
    assert web.call("GET", "/api/mpps", token=READ_TOKEN).json()["mpps"] == []
    assert web.call("POST", "/api/outbox/1/retry").status == 404
    assert web.call("GET", "/readyz", token=None).json()["checks"]["outbox"]["ok"] is True


def test_the_mpps_count_cap_and_refusals_reach_metrics_and_status(tmp_path):
    from tests.dicom.test_mpps import in_progress, n_create

    web = start_http_bridge(tmp_path, "--mpps-max-instances", "1")
    try:
        bridge = web.bridge
        assert n_create(bridge, in_progress(), "1.2.3.4.100")[0].Status == 0
        assert n_create(bridge, in_progress(), "1.2.3.4.101")[0].Status == 0x0213
        values = samples(web.call("GET", "/metrics", token=None).body.decode())
        assert total(values, "wlbridge_mpps_instances") == 1
        assert total(values, "wlbridge_mpps_refused_full_total") == 1
        summary = web.call("GET", "/api/status", token=READ_TOKEN).json()["mpps"]
        assert summary == {"max_instances": 1, "refused_full": 1, "removed": {}, "instances": 1}
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "status", "--url", f"http://127.0.0.1:{web.http_port}",
             "--token-file", str(tmp_path / "reader.token")],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "mpps    1 kept (at most 1)" in result.stdout
        assert "1 N-CREATE(s) refused: store full" in result.stdout
    finally:
        assert web.bridge.stop() == 0
