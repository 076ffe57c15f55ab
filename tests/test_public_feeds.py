"""Imaging orders that other projects published (orthanc-tools' nine senders, nHapi, HAPI, the
OpenMRS radiology module, LinuxForHealth, Microsoft's FHIR-Converter, single senders from Taiwan,
Korea, Uruguay and Cayman), through the running server and through `wlbridge convert`.

Each message has its expected answer, decided by reading it: accepted (AA) unless it lacks what a
worklist item needs, then refused with the field named in ERR. For the accepted orders, the
values a modality must receive over C-FIND (patient, accession, modality, date) are checked with
dcmtk's findscu. The messages are read from the shared public samples at run time (feeds/ with
its SOURCES.md), never copied here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.net.client import MLLPClient, split_messages
from tests.conftest import ROOT, RunningBridge, start_bridge
from tests.peers import IN_CI, SHARED_SAMPLES, findscu_answers, require_tool


@dataclass(frozen=True)
class Item:
    """What a modality must receive for an accepted order."""

    patient_id: str
    accession: str
    modality: str
    date: str


@dataclass(frozen=True)
class Refusal:
    ack: str
    code: str
    location: str


CANCEL = "cancel"  # accepted, removes (or finds nothing to remove)
PATIENT = "patient"  # ADT: accepted, changes patients' items or nothing

# By file prefix. Refusals are the messages that truly lack a worklist item's needs.
EXPECTED: dict[str, Item | Refusal | str] = {
    "01": Item("201102956", "269539", "CT", "20140811"),  # MSH-7 not a DTM, no OBR-20
    "02": Refusal("AE", "101", "OBR^1^24"),  # no modality anywhere (only ^^^^ECHO in OBR-21)
    "03": Item("202303295", "1714293", "DX", "20250130"),  # no OBR-19/20, start in OBR-36
    "04": Item("0195313690", "", "CR", "20080221"),  # as sent
    "05": Refusal("AE", "100", "PV1^1^51"),  # ORC fused into PV1 (its field 51 ends in VORC)
    # 06 reuses 01's order (placer 723085, accession 269539) for another patient: on one
    # worklist the order identity cannot cross patients (AE 205); alone it is an item, see below
    "06": Refusal("AE", "205", "PID^1^3"),
    "07": Item("201102956", "123456", "CT", "20170608"),  # Latin-1, empty MSH-18
    "08": Refusal("AE", "101", "OBR^1^24"),  # no modality (OBR-24 empty)
    "09": Item("5343197", "", "NMR", "20201001"),  # 8859/15, OBR-24 NMR (noted), no OBR-18/19/20
    "10": PATIENT,  # ADT^A04: not used by the worklist
    "11": Refusal("AE", "102", "OBR^1^20"),  # an SPS ID of 24 characters
    "12": Item("999888777", "", "DX", "20170731"),  # "2.5.0", Latin-1, PID-2, modality in OBR-21
    "13": Item("999888777", "", "DX", "20170731"),  # BOM, CRLF, UTF-8 with an empty MSH-18
    "14": Refusal("AE", "100", "PID^1^5"),  # a bare CR inside PID-5
    "15": Item("1932", "", "CT", "20251029"),  # no OBR-4: accepted with a note
    "16": CANCEL,  # 2.3 cancel without ORC-7, OBR-19/20
    "17": CANCEL,  # the same in 2.5, with an EVN that ORM does not define
    "18": PATIENT,
    "19": PATIENT,  # UTF-8 in IN1 with an empty MSH-18
    "20": Item("N00804", "", "B999", "19940426"),  # 2.2, XR read as XO
    "21": Item("N00829", "", "A999", "19940503"),  # 2.2, local section code A999
    "22": Refusal("AR", "202", "MSH^1^11"),  # MSH-11 "1", order control AF
    "23": PATIENT,
    "24": Item("100-07", "", "CT", "20130824"),  # empty MSH-10
    "25": Item("100-07", "", "CT", "20130824"),  # LF, MSH-18 "encoding", empty MSH-10
    "26": Item("100", "", "CT", "20150204"),  # empty MSH-10
    "27": CANCEL,  # cancels 26 (found by its identity)
    "28": Item("777777", "987861", "CT", "20130424"),  # ISO_IR 100, empty MSH-7 and MSH-11
    "29": Item("0a1f7838-4230-4752-b8f6-948b07c38b25", "", "P", "20210407"),  # SN, start ORC-15
    "30": PATIENT,  # 2.6 ADT^A40
    "31": Refusal("AE", "101", "OBR^1^24"),  # no modality in either order
    "32": Refusal("AE", "100", "ORC^1"),  # OMI without IPC
    "33": Refusal("AE", "101", "ORC^1^1"),  # no PID-3 and no ORC-1
    "34": Refusal("AE", "102", "IPC^1^4"),  # placeholder SPS ID of 27 characters
}


def feeds_folder() -> Path:
    folder = SHARED_SAMPLES / "feeds"
    if not folder.is_dir():
        if IN_CI:
            pytest.fail(f"public feeds missing at {folder}")
        pytest.skip(f"public feeds not found at {folder}")
    return folder


def feed_files() -> list[Path]:
    return sorted(feeds_folder().glob("*.hl7"))


def message_of(path: Path) -> bytes:
    """The message as a sender puts it on the wire: unwrapped when the file holds MLLP framing,
    else byte for byte (BOM, LF or CRLF line ends and all)."""
    data = path.read_bytes()
    if b"\x0b" in data:
        (message,) = split_messages(data)
        return message
    return data


def ack_fields(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, the first error's location) of an ACK in either ERR layout."""
    text = ack.decode("latin-1")
    sep = text[3:4]
    msa = err = []
    for segment in re.split(r"\r\n|\r|\n", text):
        fields = segment.split(sep)
        if fields[0] == "MSA":
            msa = fields
        elif fields[0] == "ERR" and not err:
            err = fields
    location = ""
    if err:
        if len(err) > 2 and err[2]:  # 2.5 and later: ERR-2 (ERL)
            location = err[2]
        else:  # ELD in ERR-1: SEG^seq^field^code&text&table
            location = "^".join(p for p in err[1].split("^")[:3] if p)
    msa += ["", "", ""]
    return msa[1], msa[2], location


def test_every_feed_has_an_expected_outcome():
    names = [path.name[:2] for path in feed_files()]
    assert names == sorted(EXPECTED), "a feed was added or removed: give it its outcome"


# --- Through the running server, C-FIND answers from findscu ------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> RunningBridge:
    require_tool("findscu")
    running = start_bridge(tmp_path_factory.mktemp("feeds"))
    yield running
    code = running.stop()
    assert code == 0, "".join(running.stderr_lines)


def answers_for(server: RunningBridge, patient_id: str, out: Path) -> list:
    keys = [
        f"PatientID={patient_id}",
        "PatientName",
        "AccessionNumber",
        "RequestedProcedureID",
        "ScheduledProcedureStepSequence[0].Modality",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    ]
    return findscu_answers(server.dicom_port, keys, out, called_aet=server.ae_title)


def served(answer) -> Item:
    step = answer.ScheduledProcedureStepSequence[0]
    return Item(
        str(answer.PatientID),
        str(answer.get("AccessionNumber", "")),
        str(step.Modality),
        str(step.ScheduledProcedureStepStartDate),
    )


def test_feeds_through_the_server(server, tmp_path):
    with MLLPClient("127.0.0.1", server.mllp_port) as client:
        for path in feed_files():
            key = path.name[:2]
            expected = EXPECTED[key]
            ack = client.send(message_of(path))
            code, control, location = ack_fields(ack)
            if isinstance(expected, Refusal):
                assert (code, location) == (expected.ack, expected.location), (path.name, ack)
                assert f"{expected.code}" in ack.decode("latin-1"), path.name
                continue
            assert code == "AA", (path.name, ack)
            if isinstance(expected, Item):
                # served at once: the next message may replace it (same order, new values)
                found = [served(a) for a in answers_for(server, expected.patient_id,
                                                        tmp_path / key)]  # fmt: skip
                assert expected in found, (path.name, found)
    records = {r.get("control_id"): r for r in server.log_records()}
    # the cancel of the OpenMRS order (27) took 26's item off the worklist
    assert answers_for(server, "100", tmp_path / "after-cancel") == []
    # notes say what was bent: the charset, the made-up IDs, the version
    notes = " ".join(r.get("note", "") for r in server.log_records())
    for note in (
        "MSH-18 is empty; read as 8859/1",
        "MSH-18 is empty; the bytes are UTF-8",
        "requested procedure ID",
        "HL7 2.2 read with the rules of 2.3",
        "modality 'A999' is not a DICOM defined term",
        "PatientAddress cut from 94",
    ):
        assert note in notes, note
    assert records["6af22cb1-38af-4dc7-93d5-83e749394237"]["outcome"] == "created"


def test_a_message_without_msh10_is_answered_with_an_empty_msa2_and_retried_once(server):
    message = message_of(feeds_folder() / "26-openmrs-nw-ord20-v231.hl7")
    with MLLPClient("127.0.0.1", server.mllp_port) as client:
        first = client.send(message)
        again = client.send(message)
    assert ack_fields(first)[:2] == ("AA", "")
    assert again == first  # the retry memory is keyed by the message's digest
    last = server.log_records()[-1]
    assert (last.get("control_id", ""), last["outcome"], last["ack"]) == ("", "duplicate", "AA")


# --- Through `wlbridge convert` ---------------------------------------------------------------


def convert(config: Path | None = None, text: str = "") -> dict[str, str]:
    """The report of `wlbridge convert` on every feed (with `text` as its config file), by
    file prefix."""
    files = [str(p) for p in feed_files()]
    options = []
    if config is not None:
        config.write_text(text, encoding="utf-8")
        options = ["--config", str(config)]
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "convert", *options, *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr
    sections = re.split(r"^=== ", result.stdout, flags=re.MULTILINE)[1:]
    return {Path(s.split("\n", 1)[0]).name[:2]: s for s in sections}


def report_ack(section: str) -> tuple[str, str, str]:
    ack = section.split("--- ACK\n", 1)[1]
    return ack_fields(ack.replace("\n", "\r").encode("latin-1", "replace"))


def test_feeds_through_convert():
    reports = convert()
    assert sorted(reports) == sorted(EXPECTED)
    for key, expected in EXPECTED.items():
        code, _, location = report_ack(reports[key])
        if isinstance(expected, Refusal):
            assert (code, location) == (expected.ack, expected.location), reports[key]
            continue
        assert code == "AA", reports[key]
        if isinstance(expected, Item):
            text = reports[key]
            assert re.search(rf"Patient ID\s+LO: '{re.escape(expected.patient_id)}'", text)
            assert re.search(rf"Accession Number\s+SH: '{expected.accession}'", text) or (
                not expected.accession and re.search(r"Accession Number\s+SH: (''|None)", text)
            ), text
            assert re.search(rf"Modality\s+CS: '{expected.modality}'", text), text
            assert re.search(rf"Start Date\s+DA: '{expected.date}'", text), text


# Sent alone, to a worklist that does not hold 01's order: Latin-1 under an empty MSH-18, a long
# address cut with a note.
ALONE = {"06": Item("1234567", "269539", "CT", "20170914")}


def test_a_feed_that_reuses_another_patients_order_is_an_item_on_its_own(tmp_path):
    for key, expected in ALONE.items():
        [path] = [p for p in feed_files() if p.name.startswith(key)]
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "convert", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        section = result.stdout
        assert report_ack(section)[0] == "AA", section
        assert re.search(rf"Patient ID\s+LO: '{expected.patient_id}'", section), section
        assert re.search(rf"Accession Number\s+SH: '{expected.accession}'", section), section
        assert re.search(rf"Modality\s+CS: '{expected.modality}'", section), section
        assert re.search(rf"Start Date\s+DA: '{expected.date}'", section), section


# What the standard to the letter refuses of these: `strict = true` restores each check.
STRICT_REFUSALS = {
    "01": "MSH^1^7^1^1",  # not a DTM
    "03": "OBR^1^19",  # no requested procedure ID
    "06": "PID^1^5",  # 8-bit bytes under an empty MSH-18
    "12": "OBR^1^4",  # Latin-1 bytes under an empty MSH-18 (before its version "2.5.0")
    "13": "OBR^1^4",  # UTF-8 under an empty MSH-18
    "16": "ORC^1^7",  # hl7apy's 2.3 tables
    "20": "MSH^1^12",  # 2.2
    "24": "MSH^1^10",  # empty MSH-10
    "25": "MSH^1^18",  # unknown label
    "28": "MSH^1^18",  # ISO_IR 100 is DICOM's name
    "30": "MSH^1^12",  # 2.6
}


def test_strict_restores_the_refusals(tmp_path):
    reports = convert(tmp_path / "strict.toml", "strict = true\n")
    for key, location in STRICT_REFUSALS.items():
        code, _, found = report_ack(reports[key])
        # the ELD of 2.3-2.4 stops at the field
        assert code in ("AE", "AR"), (key, reports[key][-400:])
        assert found.split("^")[:3] == location.split("^")[:3], (key, reports[key][-400:])
    assert report_ack(reports["04"])[0] == "AA"  # what was valid stays valid


def test_ascii_default_charset_refuses_8bit_bytes_but_reads_utf8(tmp_path):
    reports = convert(tmp_path / "ascii.toml", 'default-charset = "ascii"\n')
    for key in ("06", "07", "12"):  # Latin-1 bytes under an empty MSH-18
        code, _, location = report_ack(reports[key])
        assert code == "AE" and location.startswith(("PID^1^5", "OBR^1^4")), reports[key]
    assert report_ack(reports["13"])[0] == "AA"  # valid UTF-8 is UTF-8 whatever the default
    assert report_ack(reports["19"])[0] == "AA"


def test_a_cancel_without_procedure_ids_finds_the_order_by_its_numbers(server, tmp_path):
    """nHapi's cancel (16) names its order by placer and filler number only: it removes the
    item that the order's NW created with OBR-19/OBR-20, as a change (XO) without them updates
    it."""
    cancel = message_of(feeds_folder() / "16-nhapi-it-ca-addome-v23.hl7").decode()
    cancel = cancel.replace("|1234567890|", "|CA-AFTER-NW|").replace(
        "PID|||1^^^XXX", "PID|||77^^^XXX"
    )
    obr = "OBR|1|1410|3121|RX50^ADDOME SUPINO" + "|" * 15 + "RP77|SPS77||||CR"
    new = (
        cancel.replace("|CA-AFTER-NW|", "|NW-1|")
        .replace("ORC|CA|1410|3121||CA", "ORC|NW|1410|3121||SC||^^^20180504090000")
        .replace("OBR|1|1410|3121|RX50^ADDOME SUPINO", obr)
    )
    change = new.replace("|NW-1|", "|XO-1|").replace("ORC|NW|", "ORC|XO|")
    change = change.replace(obr, "OBR|1|1410|3121|RX50^ADDOME SUPINO" + "|" * 20 + "CR")
    change = change.replace("^^^20180504090000", "^^^20180505100000")
    with MLLPClient("127.0.0.1", server.mllp_port) as client:
        assert ack_fields(client.send(new.encode()))[0] == "AA"
        assert [served(a) for a in answers_for(server, "77", tmp_path / "nw")] == [
            Item("77", "", "CR", "20180504")
        ]
        assert ack_fields(client.send(change.encode()))[0] == "AA"
        assert [served(a) for a in answers_for(server, "77", tmp_path / "xo")] == [
            Item("77", "", "CR", "20180505")
        ]
        assert ack_fields(client.send(cancel.encode()))[0] == "AA"
    assert server.log_records()[-1]["outcome"] == "removed"
    assert answers_for(server, "77", tmp_path / "ca") == []
