"""The outbox and the MPPS store on PostgreSQL through a real `wlbridge serve` (store = a real
server's URL, tests/postgres.py): what the HTTP API, /metrics and `wlbridge outbox` show and do
is the outbox table's; MPPS instances live in the table, an ADT merge rewrites them there."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from bridge.storage.postgres.schema import upgrade
from tests.conftest import ROOT
from tests.dicom.test_mpps import final, in_progress, n_create, n_set, order
from tests.http.test_http_outbox import metrics, outbox, parked, sample
from tests.http_helpers import READ_TOKEN, HttpBridge, start_http_bridge
from tests.messages import segment
from tests.postgres import postgres_dsn, postgres_session  # noqa: F401 (fixtures)
from tests.test_end_to_end import msa, raw_send
from tests.test_mpps_outbox import eventually, summary


@pytest.fixture
def dsn(postgres_dsn) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def start(tmp_path: Path, dsn: str, ris_port: int, **receiver: object) -> HttpBridge:
    table = {"name": "ris", "host": "127.0.0.1", "port": ris_port, "message": "ORM^O01",
             "retry-initial": 0.2, "retry-max": 0.5, "ack-timeout": 30.0} | receiver  # fmt: skip
    lines = [f"store = {json.dumps(dsn)}", f"outbox-dir = {json.dumps(str(tmp_path / 'outbox'))}"]
    lines += ["[[outbound]]"] + [
        f"{k.replace('_', '-')} = {json.dumps(v)}" for k, v in table.items()
    ]
    config = tmp_path / "wlbridge.toml"
    config.write_text("\n".join(lines) + "\n")
    return start_http_bridge(tmp_path, "--config", str(config), "--finished-retention", "3600")


def wlbridge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)  # fmt: skip


def test_api_metrics_and_the_outbox_command_read_and_change_the_table(tmp_path, dsn, ris):
    ris.answer = "AE"
    web = start(tmp_path, dsn, ris.port, max_attempts=2)
    try:
        order(web.bridge, control_id="PQ1")
        uid = generate_uid()
        assert n_create(web.bridge, in_progress(), uid)[0].Status == 0
        (entry,) = eventually(lambda: parked(web), "the IP message parked after 2 refusals")
        assert entry["id"] == "ris/000000000001" and entry["order_status"] == "IP"
        assert "refused 2 times" in entry["reason"] and entry["attempts"] == 2
        detail = web.call("GET", f"/api/outbox/{entry['id']}", token=READ_TOKEN).json()
        assert detail["control_id"] == entry["control_id"] and "ORC|SC" in detail["message"]
        # /metrics reads what the last poll counted (never the database itself).
        eventually(
            lambda: sample(metrics(web), "wlbridge_outbox_parked", receiver="ris") == 1,
            "the parked gauge",
        )
        assert outbox(web)["receivers"]["ris"] == {"depth": 0, "parked": 1, "oldest_age": 0.0}
        assert not (tmp_path / "outbox" / "ris").exists()  # nothing in the folder

        listed = wlbridge("outbox", "list", "--store", dsn)
        assert listed.returncode == 0, listed.stderr
        assert "1 message(s), 1 parked" in listed.stdout and "attempts=2" in listed.stdout
        ris.answer = "AA"
        retried = wlbridge("outbox", "retry", entry["control_id"], "--store", dsn)
        assert retried.returncode == 0 and f"{entry['id']}: queued again" in retried.stdout
        (sent,) = ris.wait_for(1)  # the server's poll found it
        assert sent.control_id == entry["control_id"]  # the same MSH-10
        eventually(lambda: outbox(web)["messages"] == [], "an empty outbox")

        ris.answer = "AE"
        assert n_set(web.bridge, uid, final("COMPLETED")).Status == 0
        (cm,) = eventually(lambda: parked(web), "the CM message parked")
        dropped = web.call("POST", f"/api/outbox/{cm['control_id']}/drop")  # by control ID
        assert dropped.status == 200 and dropped.json()["id"] == cm["id"]
        assert dropped.json()["was"] == "parked"
        assert outbox(web)["messages"] == []
        unknown = wlbridge("outbox", "drop", "ris/000000000999", "--store", dsn)
        assert unknown.returncode == 1 and "no message 'ris/000000000999'" in unknown.stderr
        assert wlbridge("outbox", "list", "--store", "not-a-url").returncode == 2
    finally:
        assert web.bridge.stop() == 0, "".join(web.bridge.stderr_lines)


def mpps_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT uid, status, patient_id, data FROM mpps_instances").fetchall()


def test_mpps_instances_live_in_the_table_and_follow_a_merge(tmp_path, dsn, ris):
    web = start(tmp_path, dsn, ris.port)
    try:
        order(web.bridge, control_id="PM1", patient_id="OLD1")
        uid = generate_uid()
        assert n_create(web.bridge, in_progress(patient_id="OLD1"), uid)[0].Status == 0
        assert n_create(web.bridge, in_progress(patient_id="OLD1"), uid)[0].Status == 0x0111
        ((stored_uid, status, patient, _),) = mpps_rows(dsn)
        assert (stored_uid, status, patient) == (uid, "IN PROGRESS", "OLD1")
        assert not (tmp_path / "mpps").exists() or not list((tmp_path / "mpps").iterdir())
        merge = "\r".join([
            segment("MSH", {3: "ADT", 4: "HOSP", 7: "20261127", 9: "ADT^A40", 10: "PM2",
                            11: "P", 12: "2.5.1"}),
            segment("EVN", {2: "20261127"}),
            segment("PID", {1: "1", 3: "NEW1^^^HOSP^MR", 5: "SMITH^ANNA", 7: "19700101",
                            8: "F"}),
            segment("MRG", {1: "OLD1^^^HOSP^MR"}),
            segment("PV1", {1: "1", 2: "O"}),
        ]) + "\r"  # fmt: skip
        assert msa(raw_send(web.bridge.mllp_port, merge))[0] == "AA"
        ((_, _, patient, data),) = mpps_rows(dsn)
        instance = dcmread(io.BytesIO(bytes(data)))
        assert patient == "NEW1" and str(instance.PatientName) == "SMITH^ANNA"
        assert n_set(web.bridge, uid, final()).Status == 0  # completes the merged item
        assert n_set(web.bridge, uid, final()).Status == 0x0110  # final: no more updates
        assert mpps_rows(dsn)[0][1] == "COMPLETED"
        assert summary(ris.wait_for(2)) == [("ACC0001", "IP"), ("ACC0001", "CM")]
        listing = web.call("GET", "/api/mpps", token=READ_TOKEN).json()
        assert [m["uid"] for m in listing["mpps"]] == [uid] and listing["total"] == 1
        assert listing["mpps"][0]["PatientID"] == "NEW1" and listing["mpps"][0]["stored_at"]
        detail = web.call("GET", f"/api/mpps/{uid}", token=READ_TOKEN).json()
        assert detail["attributes"]["PerformedProcedureStepStatus"] == "COMPLETED"
    finally:
        assert web.bridge.stop() == 0, "".join(web.bridge.stderr_lines)
