"""The whole product as a hospital runs it: a real `wlbridge serve` process, orders sent by
python-hl7's mllp_send and by raw sockets, worklists pulled by dcmtk's findscu and by pynetdicom,
and the same folder served by dcmtk's wlmscpfs."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from bridge.net.client import find, worklist_query
from tests.conftest import SAMPLES, start_bridge
from tests.messages import orm
from tests.peers import findscu_answers, require_tool, wlmscpfs

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def raw_send(port: int, message: bytes | str, timeout: float = 10.0) -> bytes:
    """Send one framed message on a fresh socket and read its framed answer."""
    data = message.encode("ascii") if isinstance(message, str) else message
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(VT + data + FS + CR)
        answer = b""
        while FS not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.strip(VT).split(FS)[0]


def msa(ack: bytes) -> tuple[str, str]:
    match = re.search(rb"MSA\|([A-Z]{2})\|([^|\r]*)", ack)
    assert match, ack
    return match.group(1).decode(), match.group(2).decode()


def mllp_send_tool() -> str:
    exe = Path(sys.executable).parent / "mllp_send"
    if exe.exists():
        return str(exe)
    return require_tool("mllp_send")


def run_mllp_send(port: int, path: Path) -> str:
    result = subprocess.run(
        [
            "timeout",
            "30",
            mllp_send_tool(),
            "--loose",
            "-p",
            str(port),
            "-f",
            str(path),
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def full_query(**match: str) -> Dataset:
    """A modality-style query asking for the values the field map promises."""
    q = worklist_query(**match)
    q.PatientBirthDate = ""
    q.PatientSex = ""
    q.ReferringPhysicianName = ""
    q.RequestedProcedureDescription = ""
    q.RequestedProcedureCodeSequence = Sequence()
    step = q.ScheduledProcedureStepSequence[0]
    step.ScheduledProtocolCodeSequence = Sequence()
    return q


def query(bridge, **match: str) -> list[Dataset]:
    status, answers = find("127.0.0.1", bridge.dicom_port, full_query(**match), bridge.ae_title)
    assert status == 0x0000
    return answers


@pytest.mark.parametrize("version", ["v231", "v251"])
def test_samples_sent_by_mllp_send_become_items_found_by_cfind(bridge, version):
    output = run_mllp_send(bridge.mllp_port, SAMPLES / f"orm_o01_{version}_nw.hl7")
    assert "MSA|AA|" in output
    control_id = re.search(r"MSA\|AA\|([^|\r\n]+)", output).group(1)
    [record] = [r for r in bridge.log_records() if r.get("control_id") == control_id]
    assert record["outcome"] == "created" and record["ack"] == "AA"
    answers = query(bridge)
    assert len(answers) == 1
    assert answers[0].AccessionNumber == record["accession"]
    assert len(bridge.wl_files()) == 1


def test_order_values_reach_the_modality_in_dicom_form(bridge):
    ack = raw_send(bridge.mllp_port, orm(control_id="E2E-1", patient_name="DOE^JANE^Q^^DR"))
    assert msa(ack) == ("AA", "E2E-1")
    [item] = query(bridge, patient_id="PAT001")
    assert item.PatientID == "PAT001"
    assert str(item.PatientName) == "DOE^JANE^Q^DR"  # XPN prefix moves to PN's 4th component
    assert item.PatientBirthDate == "19700101" and item.PatientSex == "F"
    assert item.AccessionNumber == "ACC0001"
    assert item.RequestedProcedureID == "RP0001"
    assert item.StudyInstanceUID == "1.2.826.0.1.3680043.10.543.1"
    assert str(item.ReferringPhysicianName) == "WELBY^MARCUS^A^DR"
    step = item.ScheduledProcedureStepSequence[0]
    assert step.ScheduledProcedureStepID == "SPS0001"
    assert step.Modality == "CT"
    assert step.ScheduledProcedureStepStartDate == "20261201"
    assert step.ScheduledProcedureStepStartTime.startswith("1030")


def test_findscu_finds_the_order_with_the_field_map_values(bridge, tmp_path):
    assert msa(raw_send(bridge.mllp_port, orm(control_id="E2E-F")))[0] == "AA"
    [answer] = findscu_answers(
        bridge.dicom_port,
        [
            "PatientName",
            "PatientID=PAT001",
            "AccessionNumber",
            "StudyInstanceUID",
            "ScheduledProcedureStepSequence[0].Modality=CT",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261201-20261231",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
        ],
        called_aet=bridge.ae_title,
        out_dir=tmp_path / "answers",
    )
    assert answer.PatientID == "PAT001" and answer.AccessionNumber == "ACC0001"
    assert str(answer.PatientName) == "DOE^JANE^Q"
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "SPS0001"


def test_xo_changes_the_item_in_place_and_ca_removes_it(bridge):
    assert msa(raw_send(bridge.mllp_port, orm(control_id="L1")))[0] == "AA"
    [first_file] = bridge.wl_files()
    xo = orm(
        control_id="L2",
        order_control="XO",
        start="202612021415",
        procedure="MRBRAIN^MR Brain^LOCAL",
        modality="MR",
    )
    assert msa(raw_send(bridge.mllp_port, xo)) == ("AA", "L2")
    assert bridge.wl_files() == [first_file]  # same file, replaced
    [item] = query(bridge)
    step = item.ScheduledProcedureStepSequence[0]
    assert step.ScheduledProcedureStepStartDate == "20261202" and step.Modality == "MR"
    ca = orm(control_id="L3", order_control="CA", order_status="CA")
    assert msa(raw_send(bridge.mllp_port, ca)) == ("AA", "L3")
    assert query(bridge) == []
    outcomes = {r["control_id"]: r["outcome"] for r in bridge.log_records()}
    assert outcomes == {"L1": "created", "L2": "updated", "L3": "removed"}


def test_bad_orders_get_ae_or_ar_with_err_and_the_server_goes_on(bridge):
    bad_timing = orm(control_id="BAD1", start="20261301")  # month 13
    ack = raw_send(bridge.mllp_port, bad_timing)
    assert msa(ack) == ("AE", "BAD1")
    assert b"\rERR|" in ack
    unknown_type = orm(control_id="BAD2", message_type="ORU^R01")
    ack = raw_send(bridge.mllp_port, unknown_type)
    assert msa(ack) == ("AR", "BAD2")
    assert b"200" in ack.split(b"\rERR|")[1]
    # garbage in a frame: the connection closes or an AR comes back; either way, the server
    # still serves the next sender
    try:
        raw_send(bridge.mllp_port, b"\x00\x01 not hl7 at all")
    except OSError:
        pass
    assert msa(raw_send(bridge.mllp_port, orm(control_id="GOOD")))[0] == "AA"
    rejected = {r.get("control_id"): r for r in bridge.log_records() if r.get("ack") != "AA"}
    assert {"BAD1", "BAD2"} <= set(rejected)
    assert all(r["outcome"] == "rejected" and r.get("reason") for r in rejected.values())
    kept = sorted(p.name for p in bridge.rejected_dir.glob("*.hl7"))
    assert any("BAD1" in name for name in kept)
    assert (bridge.rejected_dir / kept[0]).read_bytes()  # kept byte for byte


def test_many_messages_on_one_connection_and_several_connections(bridge):
    messages = [
        orm(
            control_id=f"M{i}",
            accession=f"ACC{i}",
            placer=f"P{i}",
            filler=f"F{i}",
            sps_id=f"S{i}",
            study_uid=f"1.2.3.{i}",
        )
        for i in range(20)
    ]
    with socket.create_connection(("127.0.0.1", bridge.mllp_port), timeout=10) as sock:
        sock.sendall(b"".join(VT + m.encode() + FS + CR for m in messages[:10]))
        data = b""
        while data.count(FS) < 10:
            data += sock.recv(65536)
    acks = [part for part in data.split(VT) if part]
    assert [msa(a) for a in acks] == [("AA", f"M{i}") for i in range(10)]
    for m in messages[10:]:
        assert msa(raw_send(bridge.mllp_port, m))[0] == "AA"
    assert len(query(bridge)) == 20


def test_translation_log_names_every_message(bridge):
    ids = ["T-1", "T-2", "T-3"]
    raw_send(bridge.mllp_port, orm(control_id="T-1"))
    raw_send(bridge.mllp_port, orm(control_id="T-2", order_control="XX"))
    raw_send(bridge.mllp_port, orm(control_id="T-3", order_control="CA", order_status="CA"))
    records = bridge.log_records()
    assert [r["control_id"] for r in records] == ids
    for record in records:
        assert {"time", "peer", "type", "outcome", "ack"} <= set(record)
    assert records[0]["patient_id"] == "PAT001" and records[0]["file"].endswith(".wl")
    assert records[1]["ack"] == "AE" and records[1]["reason"].startswith("103")


def test_wlmscpfs_serves_the_folder_the_bridge_wrote(bridge, tmp_path):
    assert msa(raw_send(bridge.mllp_port, orm(control_id="W1")))[0] == "AA"
    # the bridge's folder is <tmp>/worklists/WLBRIDGE: wlmscpfs serves it as called AE WLBRIDGE
    with wlmscpfs(bridge.worklist_dir.parent) as port:
        [answer] = findscu_answers(
            port,
            [
                "PatientName",
                "PatientID=PAT001",
                "AccessionNumber",
                "ScheduledProcedureStepSequence[0].Modality=CT",
                "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
            ],
            called_aet="WLBRIDGE",
            out_dir=tmp_path / "wlm",
        )
    assert answer.AccessionNumber == "ACC0001"
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "SPS0001"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_both_servers_and_exit_zero(tmp_path, sig):
    running = start_bridge(tmp_path)
    assert msa(raw_send(running.mllp_port, orm(control_id="S1")))[0] == "AA"
    assert running.stop(sig) == 0
    for port in (running.mllp_port, running.dicom_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_send_and_query_commands(bridge):
    wlbridge = [sys.executable, "-m", "bridge"]
    sent = subprocess.run(
        [*wlbridge, "send", "--port", str(bridge.mllp_port), str(SAMPLES / "orm_o01_v251_nw.hl7")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert " AA " in sent.stdout
    shown = subprocess.run(
        [*wlbridge, "query", "--port", str(bridge.dicom_port), "--called-aet", bridge.ae_title],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    [answer] = query(bridge)
    assert answer.AccessionNumber in shown.stdout
    assert "1 item(s)" in shown.stdout
