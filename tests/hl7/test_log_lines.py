"""What the translation log says each message became: station, modality and SPS start beside the
file; a rejected message's accession, order control and patient ID, read as far as they can be."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.config import StationRule
from bridge.hl7.message import parse_message
from bridge.net.client import MLLPClient
from bridge.ops.translation_log import FIELD_ORDER
from tests.conftest import SAMPLES
from tests.hl7.test_pipeline import Harness
from tests.messages import orm

HOSTILE = Path(__file__).parent.parent / "hostile"


def keys_in_order(line: str) -> list[str]:
    return [part.split("=", 1)[0] for part in line.split(" ") if "=" in part and part[0] != '"']


def test_an_applied_order_says_its_station_modality_and_start_beside_the_file(tmp_path):
    h = Harness(tmp_path)
    assert h.send(orm(control_id="L1", modality="MR"))[0] == "AA"
    [record] = h.records()
    assert record["station"] == "WLBRIDGE"  # no IPC-9, no rule: the bridge's own AE title
    assert record["modality"] == "MR"
    assert record["sps_date"] == "20261201" and record["sps_time"] == "103000"
    line = h.log_path.read_text("utf-8").splitlines()[0]
    keys = keys_in_order(line)
    assert keys == [k for k in FIELD_ORDER if k in keys]
    assert keys.index("file") + 1 == keys.index("station")
    assert keys[keys.index("station") :][:4] == ["station", "modality", "sps_date", "sps_time"]


def test_several_steps_and_several_station_titles(tmp_path):
    h = Harness(
        tmp_path, station_rules=[StationRule(match={"OBR-24": "CT"}, ae_titles=["CT1", "CT2"])]
    )
    assert h.send(orm(control_id="L2", extra_groups=1))[0] == "AA"
    [record] = h.records()
    assert record["outcome"] == "created,created"
    assert record["station"] == "CT1+CT2,CT1+CT2"
    assert record["modality"] == "CT,CT"
    assert record["sps_date"] == "20261201,20261201"


def test_a_cancel_says_what_it_named(tmp_path):
    h = Harness(tmp_path)
    assert h.send(orm(control_id="L3"))[0] == "AA"
    assert h.send(orm(control_id="L4", order_control="CA", order_status="CA"))[0] == "AA"
    record = h.records()[-1]
    assert record["outcome"] == "removed" and record["modality"] == "CT"


def test_a_message_refused_for_its_content_keeps_its_identifiers(tmp_path):
    h = Harness(tmp_path)
    code, _, _ = h.send(orm(control_id="L5", accession="A" * 21))  # SH allows 16: AE 102
    assert code == "AE"
    [record] = h.records()
    assert record["outcome"] == "rejected"
    assert record["accession"] == "A" * 21
    assert record["order_control"] == "NW" and record["patient_id"] == "PAT001"
    assert "station" not in record and "modality" not in record  # nothing became an item


def test_a_message_refused_before_reading_keeps_its_identifiers(tmp_path):
    h = Harness(tmp_path)
    code, _, _ = h.send(orm(control_id="L6", version="3.0", order_control="XO"))
    assert code == "AR"
    [record] = h.records()
    assert record["order_control"] == "XO" and record["accession"] == "ACC0001"
    assert record["patient_id"] == "PAT001"


def test_a_message_that_does_not_parse_keeps_what_the_raw_segments_show(tmp_path):
    h = Harness(tmp_path)
    raw = (HOSTILE / "non-utf8-declared-utf8.hl7").read_bytes()  # MSH-18 UTF-8, bytes are not
    code, _, _ = h.send(raw)
    assert code in ("AE", "AR")
    [record] = h.records()
    assert record["outcome"] == "rejected"
    assert record["patient_id"] == "PAT001" and record["order_control"] == "NW"
    assert record["accession"] == "ACC0001"


def test_raw_reading_uses_the_separators_msh_declares(tmp_path):
    h = Harness(tmp_path)
    # an unknown MSH-18 over 8-bit bytes stops parsing; the field separator is '#'
    text = orm(control_id="L7", charset="NO-SUCH-CHARSET", patient_name="DO\xe9^JANE")
    h.bridge.handle(text.replace("|", "#").encode("latin-1"), "127.0.0.1:1")
    [record] = h.records()
    assert record["outcome"] == "rejected" and "MSH^1^18" in record["reason"]
    assert record["patient_id"] == "PAT001" and record["accession"] == "ACC0001"
    assert record["order_control"] == "NW"


def test_an_oversized_frame_keeps_the_identifiers_of_its_first_bytes(tmp_path):
    h = Harness(tmp_path)
    head = orm(control_id="L8").encode()[:4096]
    h.bridge.refuse_oversized(head, "127.0.0.1:1")
    [record] = h.records()
    assert record["ack"] == "AR" and record["patient_id"] == "PAT001"
    assert record["order_control"] == "NW"


def test_identifiers_of_a_hostile_message_are_bounded(tmp_path):
    h = Harness(tmp_path)
    text = orm(control_id="L9", patient_id="P" * 5000, extra_groups=60)
    h.send(text)
    [record] = h.records()
    assert record["outcome"] == "rejected"
    assert len(record["patient_id"]) <= 64
    assert len(record["order_control"].split(",")) <= 32


def test_the_server_writes_the_new_keys(bridge):
    with MLLPClient("127.0.0.1", bridge.mllp_port, timeout=30) as client:
        assert b"MSA|AA|" in client.send((SAMPLES / "orm_o01_v251_nw.hl7").read_bytes())
    [record] = [r for r in bridge.log_records() if r.get("control_id") == "UMC-000101"]
    assert record["modality"] == "MR" and record["station"] == bridge.ae_title
    assert record["sps_date"] == "20250616" and record["sps_time"] == "081500"


def test_readme_lists_the_keys_in_the_order_lines_have_them():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    section = readme.split("## The translation log", 1)[1].split("\n## ", 1)[0]
    sentence = section.split("The keys, in order:", 1)[1].split(". `station`", 1)[0]
    named = re.findall(r"`([a-z_]+)`", sentence)
    assert named == list(FIELD_ORDER)


def test_readme_quick_start_queries_the_modality_of_the_order_it_sends():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    [sample] = re.findall(r"wlbridge send samples/(\S+)", quick)
    modality = parse_message((SAMPLES / sample).read_bytes()).first("OBR").value(24)
    assert re.findall(r"query --modality (\S+)", quick) == [modality]
    assert re.findall(r"Modality=(\w+)", quick) == [modality]
