"""The ACK: header echo, MSA, ERR layout per version, escaping, charsets, garbage input."""

from __future__ import annotations

import re

import pytest
from hl7apy.parser import parse_message as hl7apy_parse

from bridge.hl7.ack import build_ack, escape
from bridge.hl7.errors import HL7Error
from bridge.hl7.message import Delimiters, parse_message, read_header
from tests.peers import require_public_samples


def message(version: str = "2.5.1", charset: str = "", trigger: str = "O01",
            control_id: str = "MSG00042", delims: str = "|^~\\&") -> bytes:  # fmt: skip
    f, c = delims[0], delims[1]
    msh = f.join(
        ["MSH", delims[1:], f"RIS{c}1.2.3{c}ISO", "HOSP", "WLBRIDGE", "RAD", "20240102030405", "",
         f"ORM{c}{trigger}", control_id, "T", version, "", "", "", "", "", charset]
    )  # fmt: skip
    return (msh + "\rPID|||123||DOE^JOHN\r").encode("latin-1")


def segments(ack: bytes, codec: str = "latin-1") -> list[list[str]]:
    text = ack.decode(codec)
    assert text.endswith("\r") and "\n" not in text
    return [line.split("|") for line in text.rstrip("\r").split("\r")]


def test_aa_swaps_sender_and_receiver_and_echoes_header():
    ack = build_ack(read_header(message()), "AA")
    msh, msa = segments(ack)
    assert msh[:2] == ["MSH", "^~\\&"]
    assert msh[2:6] == ["WLBRIDGE", "RAD", "RIS^1.2.3^ISO", "HOSP"]
    assert re.fullmatch(r"\d{14}[+-]\d{4}", msh[6])
    assert msh[8] == "ACK^O01^ACK"
    assert msh[9] and msh[9] != "MSG00042" and len(msh[9]) <= 20
    assert msh[10:12] == ["T", "2.5.1"]
    assert msa == ["MSA", "AA", "MSG00042"]


def test_control_ids_are_fresh():
    header = read_header(message())
    ids = {segments(build_ack(header, "AA"))[0][9] for _ in range(500)}
    assert len(ids) == 500


def test_msh18_is_echoed_and_sets_the_encoding():
    header = read_header(message(charset="8859/1"))
    err = HL7Error("103", "PID^1^5", "unknown name Müller")
    ack = build_ack(header, "AE", [err])
    assert segments(ack)[0][17] == "8859/1"
    assert "Müller".encode("latin-1") in ack

    header = read_header(message(charset="UNICODE UTF-8"))
    ack = build_ack(header, "AE", [HL7Error("103", "PID^1^5", "unknown name Žižka 日本")])
    assert "Žižka 日本".encode() in ack


def test_unencodable_text_is_replaced_not_raised():
    ack = build_ack(read_header(message()), "AE", [HL7Error("102", "PID^1^5", "name 日本 Ø")])
    assert b"name ?? ?" in ack  # ASCII message: no 8-bit bytes in the answer
    assert all(b < 0x80 for b in ack)


def test_v251_err_has_location_code_severity_and_text():
    errors = [
        HL7Error("101", "PID^1^3^1^1", "PID-3 (patient identifier list) is empty"),
        HL7Error("102", "OBR^5^27^1^4", "OBR-27.4 is not a date"),
    ]
    ack = build_ack(read_header(message()), "AE", errors)
    _msh, msa, err1, err2 = segments(ack)
    assert msa == ["MSA", "AE", "MSG00042", "PID-3 (patient identifier list) is empty"]
    assert err1 == ["ERR", "", "PID^1^3^1^1", "101^Required field missing^HL70357", "E", "", "",
                    "", "PID-3 (patient identifier list) is empty"]  # fmt: skip
    assert err2[2:5] == ["OBR^5^27^1^4", "102^Data type error^HL70357", "E"]


def test_long_text_is_cut_in_user_message_and_whole_in_diagnostic():
    long_text = "x" * 150
    ack = build_ack(read_header(message()), "AE", [HL7Error("100", "OBX^6", long_text)])
    _msh, msa, err = segments(ack)
    assert len(msa[3]) == 80 and msa[3].endswith("...")
    assert err[7] == long_text
    assert len(err[8]) == 80


def test_explicit_text_wins_in_msa3():
    ack = build_ack(read_header(message()), "AR", [HL7Error("207", "", "disk full")], "try later")
    assert segments(ack)[1][3] == "try later"


@pytest.mark.parametrize("version", ["2.3.1", "2.4"])
def test_pre_25_errors_are_repetitions_of_one_err1(version):
    errors = [
        HL7Error("101", "PID^1^3^1^1", "PID-3 is empty"),
        HL7Error("207", "", "disk full"),
    ]
    ack = build_ack(read_header(message(version=version)), "AE", errors)
    segs = segments(ack)
    assert [s[0] for s in segs] == ["MSH", "MSA", "ERR"]
    assert segs[0][8] == "ACK^O01^ACK" and segs[0][11] == version
    assert segs[2] == [
        "ERR",
        "PID^1^3^101&Required field missing&HL70357~^^^207&Application internal error&HL70357",
    ]


def test_v23_message_type_has_no_structure_component():
    ack = build_ack(read_header(message(version="2.3")), "AA")
    assert segments(ack)[0][8] == "ACK^O01"


def test_text_with_delimiters_and_newlines_is_escaped():
    text = "bad|value^with~all&the\\delims\r\nand a break"
    ack = build_ack(read_header(message()), "AE", [HL7Error("102", "PID^1^5", text)])
    _msh, msa, err = segments(ack)
    escaped = "bad\\F\\value\\S\\with\\R\\all\\T\\the\\E\\delims and a break"
    assert msa[3] == escaped
    assert err[8] == escaped
    # and our own parser reads the original back
    parsed = parse_message(ack)
    assert parsed.first("ERR").value(8) == "bad|value^with~all&the\\delims and a break"


def test_message_delimiters_are_used():
    raw = message(delims="#:*!@", control_id="ID!S!1")  # escaped ":" in MSH-10
    header = read_header(raw)
    assert header.delimiters == Delimiters("#", ":", "*", "!", "@")
    ack = build_ack(header, "AE", [HL7Error("101", "PID^1^3", "a#b")])
    text = ack.decode()
    assert text.startswith("MSH#:*!@#WLBRIDGE#RAD#RIS:1.2.3:ISO#HOSP#")
    assert "#ACK:O01:ACK#" in text
    assert "\rMSA#AE#ID!S!1#a!F!b\r" in text
    assert "\rERR##PID:1:3#101:Required field missing:HL70357#E####a!F!b\r" in text


def test_garbage_gets_a_minimal_ack():
    assert read_header(b"\x00\xffnot hl7 at all") is None
    ack = build_ack(None, "AR", [HL7Error("100", "MSH^1", "the message does not start with MSH")])
    msh, msa, err = segments(ack)
    assert msh[:2] == ["MSH", "^~\\&"] and msh[8] == "ACK^^ACK" and msh[11] == "2.5.1"
    assert msh[10] == "P"
    assert msa[:3] == ["MSA", "AR", ""]
    assert err[2:5] == ["MSH^1", "100^Segment sequence error^HL70357", "E"]


def test_error_without_location_leaves_err2_empty():
    ack = build_ack(read_header(message()), "AR", [HL7Error("207", "", "disk full")])
    assert segments(ack)[2][1:5] == ["", "", "207^Application internal error^HL70357", "E"]


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5", "2.5.1"])
def test_hl7apy_reads_the_ack_in_its_version(version):
    """hl7apy's strict parser (the version's ACK structure) accepts what we build."""
    errors = [HL7Error("101", "PID^1^3^1^1", "PID-3 is empty"), HL7Error("102", "PID^1^7", "date")]
    ack = build_ack(read_header(message(version=version)), "AE", errors)
    parsed = hl7apy_parse(ack.decode("ascii"), validation_level=1, find_groups=True)  # 1: strict
    assert parsed.msa.msa_1.value == "AE"
    assert parsed.msa.msa_2.value == "MSG00042"
    if version.startswith("2.5"):
        assert len(parsed.err) == 2
        assert parsed.err[0].err_3.err_3_1.value == "101"
        assert parsed.err[0].err_2.err_2_3.value == "3"
    else:
        assert parsed.err.err_1[1].to_er7() == "PID^1^7^102&Data type error&HL70357"


def test_acks_for_the_public_samples():
    folder = require_public_samples()
    for path in sorted(folder.glob("*.hl7")):
        raw = path.read_bytes()
        header = read_header(raw)
        ack = build_ack(header, "AA")
        msh, msa = segments(ack)
        assert msa == ["MSA", "AA", header.control_id], path.name
        assert msh[2:6] == [header.receiving_application, header.receiving_facility,
                            header.sending_application, header.sending_facility]  # fmt: skip
        assert msh[11] == header.version


def test_escape_round_trips_through_unescape():
    d = Delimiters()
    from bridge.hl7.message import unescape

    for text in ["", "plain", "|^~\\&", "\\X41\\", "a\\b", "~~~"]:
        assert unescape(escape(text, d), d) == text


def test_msh18_repetitions_are_echoed():
    header = read_header(message(charset="8859/1~ISO IR87"))
    assert segments(build_ack(header, "AA"))[0][17] == "8859/1~ISO IR87"
