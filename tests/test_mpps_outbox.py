"""The whole loop against real peers: an order by HL7, the modality's MPPS (pynetdicom as the SCU,
N-CREATE and N-SET on separate associations) and the RIS hearing ORC-1 SC with ORC-5 IP, CM or DC
(tests/ris_receiver.py, a real MLLP listener), through a real `wlbridge serve`."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from bridge.net.outbox import OutboxFolder, message_facts
from tests.conftest import start_bridge
from tests.dicom.test_mpps import (
    STUDY,
    final,
    in_progress,
    n_create,
    n_set,
    order,
    statuses,
    step,
    stored_statuses,
)
from tests.peers import eventually
from tests.ris_receiver import Received

WAIT = 60.0  # generous: two cores shared by many workers


def write_config(tmp_path: Path, ris_port: int, message: str = "ORM^O01", **extra) -> Path:
    """A config with one `[[outbound]]` receiver; the rest comes from start_bridge's options."""
    receiver = {"name": "ris", "host": "127.0.0.1", "port": ris_port, "message": message,
                "retry-initial": 0.2, "retry-max": 1.0, "ack-timeout": 30.0} | extra  # fmt: skip
    lines = [f"outbox-dir = {json.dumps(str(tmp_path / 'outbox'))}", "[[outbound]]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in receiver.items()]
    config = tmp_path / "wlbridge.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def start(tmp_path: Path, config: Path, *extra: str):
    return start_bridge(tmp_path, "--config", str(config), *extra)


def component(received: Received, segment: str, number: int, index: int) -> str:
    return (received.field(segment, number).split("^") + [""] * index)[index - 1]


def summary(received: list[Received]) -> list[tuple[str, str]]:
    """(accession OBR-18, ORC-5) of each message, in the order received."""
    return [(r.field("OBR", 18), r.field("ORC", 5)) for r in received]


def outbound_records(bridge, **match: str) -> list[dict[str, str]]:
    return [
        r
        for r in bridge.log_records()
        if r.get("receiver") == "ris" and all(r.get(k) == v for k, v in match.items())
    ]


def mpps_record(bridge, kind: str, uid: str) -> dict[str, str]:
    (record,) = [
        r for r in bridge.log_records() if r.get("type") == kind and r.get("mpps_uid") == uid
    ]
    return record


def pending_control_ids(outbox: Path) -> list[str]:
    control_ids = []
    for path in OutboxFolder(outbox).pending("ris"):
        try:
            control_ids.append(message_facts(path.read_bytes()).control_id)
        except FileNotFoundError:
            pass  # delivered meanwhile
    return control_ids


def assert_order_identity(received: Received, suffix: str = "") -> None:
    """The order's identity comes from the stored item (what the RIS sent)."""
    assert received.field("ORC", 1) == "SC"
    assert received.field("ORC", 2) == "PLC0001" + suffix
    assert received.field("ORC", 3) == "FIL0001" + suffix
    assert received.field("OBR", 2) == "PLC0001" + suffix
    assert received.field("OBR", 3) == "FIL0001" + suffix
    assert received.field("OBR", 18) == "ACC0001" + suffix
    assert received.field("OBR", 19) == "RP0001" + suffix
    assert received.field("PID", 3).split("^")[0] == "PAT001"


def performed(received: Received) -> tuple[str, str]:
    """(PPS start, performing station) as the message's shape carries them."""
    version = received.field("MSH", 12)
    if version == "2.3.1":
        start_time = component(received, "ORC", 7, 4)
    else:
        start_time = received.field("TQ1", 7)
    return start_time, received.field("ORC", 18)


@pytest.mark.parametrize(
    ("shape", "msh9", "version"),
    [
        ("ORM^O01", "ORM^O01", "2.3.1"),
        ("OMG^O19", "OMG^O19^OMG_O19", "2.5.1"),
        ("OMI^O23", "OMI^O23^OMI_O23", "2.5.1"),
    ],
)
def test_started_then_completed_reach_the_ris_with_the_orders_identity(
    tmp_path, ris, shape, msh9, version
):
    bridge = start(tmp_path, write_config(tmp_path, ris.port, shape))
    try:
        order(bridge, control_id="L1")
        assert statuses(bridge, patient_id="PAT001") == ["SCHEDULED"]
        uid = generate_uid()
        # The modality drops placer and filler, and names its station in the PPS.
        attributes = in_progress(step())
        attributes.PerformedStationAETitle = "CTROOM3"
        assert n_create(bridge, attributes, uid)[0].Status == 0x0000
        assert stored_statuses(bridge) == ["STARTED"]
        assert statuses(bridge, patient_id="PAT001") == []  # hidden once started
        (started,) = ris.wait_for(1, timeout=WAIT)
        assert started.field("MSH", 9) == msh9 and started.field("MSH", 12) == version
        assert started.field("ORC", 5) == "IP"
        assert_order_identity(started)
        assert performed(started) == ("20261201103500", "CTROOM3")
        if shape == "OMI^O23":
            assert started.field("IPC", 1) == "ACC0001" and started.field("IPC", 3) == STUDY
            assert started.field("IPC", 9) == "CTROOM3"

        assert n_set(bridge, uid, final("COMPLETED")).Status == 0x0000  # another association
        assert bridge.wl_files() == []  # finished-retention 0: removed...
        _, completed = ris.wait_for(2, timeout=WAIT)
        assert completed.field("ORC", 5) == "CM"  # ...and still reported with its identity
        assert_order_identity(completed)
        assert performed(completed) == ("20261201103500", "CTROOM3")
        assert started.control_id != completed.control_id

        # The translation log: the MPPS events, then each message queued and sent.
        create = mpps_record(bridge, "MPPS^N-CREATE", uid)
        assert create["outcome"] == "started" and create["calling_ae"] == "CT1"
        assert create["accession"] == "ACC0001" and create["status"] == "0x0000"
        complete = mpps_record(bridge, "MPPS^N-SET", uid)
        assert complete["outcome"] == "completed" and complete["pps_status"] == "COMPLETED"
        eventually(lambda: len(outbound_records(bridge, outcome="sent")) == 2, "two sent lines")
        for message, code in ((started, "IP"), (completed, "CM")):
            queued = outbound_records(bridge, outcome="queued", control_id=message.control_id)
            sent = outbound_records(bridge, outcome="sent", control_id=message.control_id)
            assert len(queued) == 1 and len(sent) == 1
            assert queued[0]["order_status"] == code and queued[0]["accession"] == "ACC0001"
            assert sent[0]["ack"] == "AA" and sent[0]["attempt"] == "1"
            assert sent[0]["type"] == shape and sent[0]["patient_id"] == "PAT001"
        assert pending_control_ids(tmp_path / "outbox") == []
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_discontinued_is_dc_and_the_station_falls_back_to_the_calling_ae(tmp_path, ris):
    bridge = start(tmp_path, write_config(tmp_path, ris.port, "OMG^O19"),
                   "--finished-retention", "1")  # fmt: skip
    try:
        order(bridge, control_id="D1")
        uid = generate_uid()
        attributes = in_progress(step())
        del attributes.PerformedStationAETitle  # optional (type 1 in RAD-6, often empty)
        assert n_create(bridge, attributes, uid)[0].Status == 0x0000
        assert n_set(bridge, uid, final("DISCONTINUED")).Status == 0x0000
        assert stored_statuses(bridge) == ["DISCONTINUED"]  # kept per finished-retention
        assert statuses(bridge, patient_id="PAT001") == []
        started, stopped = ris.wait_for(2, timeout=WAIT)
        assert summary([started, stopped]) == [("ACC0001", "IP"), ("ACC0001", "DC")]
        assert_order_identity(stopped)
        assert performed(started) == ("20261201103500", "CT1")  # the calling AE
        assert performed(stopped) == ("20261201103500", "CT1")
        assert mpps_record(bridge, "MPPS^N-SET", uid)["outcome"] == "discontinued"
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_a_group_case_reports_every_referenced_order(tmp_path, ris):
    bridge = start(tmp_path, write_config(tmp_path, ris.port, "OMI^O23"))
    try:
        order(bridge, control_id="G1", extra_groups=1)  # two orders, two scheduled steps
        assert sorted(stored_statuses(bridge)) == ["SCHEDULED", "SCHEDULED"]
        uid = generate_uid()
        steps = (step(), step(f"{STUDY}.1", "SPS0001-1", "ACC0001-1"))
        assert n_create(bridge, in_progress(*steps), uid)[0].Status == 0x0000
        assert stored_statuses(bridge) == ["STARTED", "STARTED"]
        assert n_set(bridge, uid, final("COMPLETED")).Status == 0x0000
        assert bridge.wl_files() == []
        got = ris.wait_for(4, timeout=WAIT)
        assert sorted(summary(got)) == [
            ("ACC0001", "CM"), ("ACC0001", "IP"), ("ACC0001-1", "CM"), ("ACC0001-1", "IP"),
        ]  # fmt: skip
        for accession in ("ACC0001", "ACC0001-1"):  # per order, IP before CM
            assert [code for acc, code in summary(got) if acc == accession] == ["IP", "CM"]
        for message in got:
            assert_order_identity(message, message.field("OBR", 18).removeprefix("ACC0001"))
        record = mpps_record(bridge, "MPPS^N-SET", uid)
        assert len(record["file"].split(",")) == 2
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_ris_down_and_kill_9_lose_nothing_and_keep_the_order(tmp_path, ris):
    ris.stop()  # the RIS is down from the start
    config = write_config(tmp_path, ris.port, "ORM^O01")
    bridge = start(tmp_path, config)
    accessions = ("K1", "K2", "K3")
    uids = {accession: generate_uid() for accession in accessions}
    try:
        for n, accession in enumerate(accessions):
            order(bridge, control_id=f"K{n}", accession=accession, placer=f"P{n}",
                  filler=f"F{n}", sps_id=f"S{n}", study_uid=f"{STUDY}.{n + 7}")  # fmt: skip
        # Interleaved, as several rooms work: K1 IP, K2 IP, K1 CM, K3 IP, K2 CM, K3 CM.
        plan = [("K1", "IN PROGRESS"), ("K2", "IN PROGRESS"), ("K1", "COMPLETED"),
                ("K3", "IN PROGRESS"), ("K2", "COMPLETED"), ("K3", "COMPLETED")]  # fmt: skip
        for accession, status in plan:
            n = accessions.index(accession)
            if status == "IN PROGRESS":
                attributes = in_progress(step(f"{STUDY}.{n + 7}", f"S{n}", accession))
                assert n_create(bridge, attributes, uids[accession])[0].Status == 0x0000
            else:
                assert n_set(bridge, uids[accession], final(status)).Status == 0x0000
        # Every success status above came after its message was durable; the bridge has tried.
        eventually(lambda: outbound_records(bridge, outcome="retrying"), "a failed try")
        assert all(
            "cannot connect" in r["reason"] for r in outbound_records(bridge, outcome="retrying")
        )
        queued = [r["control_id"] for r in outbound_records(bridge, outcome="queued")]
    finally:
        bridge.process.send_signal(signal.SIGKILL)
        bridge.process.wait(timeout=WAIT)
    control_ids = pending_control_ids(tmp_path / "outbox")
    assert control_ids == queued and len(set(control_ids)) == 6
    assert bridge.wl_files() == []

    ris.start()  # back, on the same port
    bridge = start(tmp_path, config)
    try:
        got = ris.wait_for(6, timeout=WAIT)
        assert summary(got) == [("K1", "IP"), ("K2", "IP"), ("K1", "CM"),
                                ("K3", "IP"), ("K2", "CM"), ("K3", "CM")]  # fmt: skip
        assert [r.control_id for r in got] == control_ids  # the same MSH-10 on re-send
        assert [r.field("ORC", 2) for r in got] == ["P0", "P1", "P0", "P2", "P1", "P2"]
        # The log line of a delivery follows the removal of its file.
        eventually(lambda: len(outbound_records(bridge, outcome="sent")) == 6, "six sent lines")
        sent = [r["control_id"] for r in outbound_records(bridge, outcome="sent")]
        assert sent == control_ids
        assert not pending_control_ids(tmp_path / "outbox")
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)
    assert len(ris.received) == 6  # none twice: the first run never reached the RIS


def test_a_kill_9_between_in_progress_and_completed_still_reports_both(tmp_path, ris):
    config = write_config(tmp_path, ris.port, "OMI^O23")
    bridge = start(tmp_path, config)
    uid = generate_uid()
    try:
        order(bridge, control_id="R1")
        assert n_create(bridge, in_progress(), uid)[0].Status == 0x0000
        (started,) = ris.wait_for(1, timeout=WAIT)
        # Settled (its file removed) before the kill; else it is re-sent, same MSH-10.
        eventually(lambda: outbound_records(bridge, outcome="sent"), "the IP sent")
    finally:
        bridge.process.send_signal(signal.SIGKILL)
        bridge.process.wait(timeout=WAIT)
    bridge = start(tmp_path, config)  # the MPPS instance and the STARTED item are read back
    try:
        assert n_set(bridge, uid, final("COMPLETED")).Status == 0x0000
        assert bridge.wl_files() == []
        _, completed = ris.wait_for(2, timeout=WAIT)
        assert summary([started, completed]) == [("ACC0001", "IP"), ("ACC0001", "CM")]
        assert_order_identity(completed)
        assert performed(completed) == ("20261201103500", "CT1")
        assert completed.control_id != started.control_id
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_an_outbox_that_cannot_be_written_fails_the_mpps_and_leaves_the_item(tmp_path, ris):
    bridge = start(tmp_path, write_config(tmp_path, ris.port, "ORM^O01"))
    folder = tmp_path / "outbox" / "ris"
    try:
        order(bridge, control_id="F1")
        uid = generate_uid()
        # The receiver's folder becomes something no message can be written into.
        shutil.rmtree(folder)
        folder.write_text("not a folder")
        status, _ = n_create(bridge, in_progress(), uid)
        assert status.Status == 0x0110
        assert "outbox" in str(status.get("ErrorComment", ""))
        assert stored_statuses(bridge) == ["SCHEDULED"]  # not made
        assert statuses(bridge, patient_id="PAT001") == ["SCHEDULED"]
        assert list((tmp_path / "mpps").glob("*.dcm")) == []  # the retry is not a duplicate
        failed = mpps_record(bridge, "MPPS^N-CREATE", uid)
        assert failed["outcome"] == "failed" and failed["status"] == "0x0110"
        assert "outbox" in failed["reason"]
        assert not outbound_records(bridge, outcome="queued")
        assert any("not made: a subscriber failed" in line for line in bridge.stderr_lines)
        assert any("outbox ris: cannot queue" in line for line in bridge.stderr_lines)

        folder.unlink()  # fixed; the modality retries
        (folder / "parked").mkdir(parents=True)
        assert n_create(bridge, in_progress(), uid)[0].Status == 0x0000
        assert stored_statuses(bridge) == ["STARTED"]
        # The same for the N-SET: failed, the item stays STARTED; then the retry goes through.
        shutil.rmtree(folder)
        folder.write_text("not a folder")
        assert n_set(bridge, uid, final("COMPLETED")).Status == 0x0110
        assert stored_statuses(bridge) == ["STARTED"]
        folder.unlink()
        (folder / "parked").mkdir(parents=True)
        assert n_set(bridge, uid, final("COMPLETED")).Status == 0x0000
        assert bridge.wl_files() == []
        got = ris.wait_for(2, timeout=WAIT)
        assert summary(got) == [("ACC0001", "IP"), ("ACC0001", "CM")]
        assert len(ris.received) == 2
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)
