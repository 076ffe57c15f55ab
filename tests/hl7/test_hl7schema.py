"""Checks against hl7apy's structures: header acceptance, segment sequence, required fields,
date/time formats; the public samples; the compiled tables against hl7apy itself."""

from __future__ import annotations

import pytest

from bridge.config import Settings
from bridge.hl7.errors import HL7Error
from bridge.hl7.message import parse_message
from bridge.hl7.schema import (
    check_fields,
    check_message,
    check_structure,
    compile_structure,
    dtm_problem,
    rules_version,
    structure_of,
    validate_header,
)
from tests.peers import require_public_samples

PID = "PID|||583295^^^ADT1||DOE^JOHN||19700101|M"
PV1 = "PV1||O|||||||||||||||||V1"
ORC = "ORC|NW|A1^PLC|B1^FIL||SC||^^^200007010900^^R"
OBR = "OBR|1|A1^PLC|B1^FIL|P1^Procedure 1^ERL||||||||||||||ACC1|RP1|SPS1||||CT"
TQ1 = "TQ1|1||||||200008161510"
IPC = "IPC|ACC|RPID|1.2.3.4|SPSID|CT"


def msg(*segments: str, version: str = "2.5.1", msh9: str = "ORM^O01", msh7: str = "20240102",
        msh11: str = "P") -> bytes:  # fmt: skip
    msh = f"MSH|^~\\&|RIS|HOSP|WLB|RAD|{msh7}||{msh9}|CTRL1|{msh11}|{version}"
    return "\r".join([msh, *segments]).encode()


def error_of(fn, *args) -> HL7Error:
    with pytest.raises(HL7Error) as info:
        fn(*args)
    return info.value


# --- header ---------------------------------------------------------------------------------


def test_header_accepts_a_good_message():
    validate_header(parse_message(msg(PID)), Settings())


@pytest.mark.parametrize(
    ("raw", "ack", "code", "location"),
    [
        (msg(PID, msh9=""), "AR", "101", "MSH^1^9"),
        (msg(PID, version=""), "AR", "101", "MSH^1^12"),
        (msg(PID, version="2.6"), "AR", "203", "MSH^1^12"),
        (msg(PID, msh11=""), "AR", "101", "MSH^1^11"),
        (msg(PID, msh11="X"), "AR", "202", "MSH^1^11"),
        (msg(PID, msh7="2024-01-02"), "AE", "102", "MSH^1^7^1^1"),
    ],
)
def test_header_failures(raw, ack, code, location):
    # the standard to the letter
    err = error_of(validate_header, parse_message(raw), Settings(strict=True))
    assert (err.ack_code, err.code, err.location) == (ack, code, location)


@pytest.mark.parametrize(
    ("raw", "ack", "code", "location"),
    [
        (msg(PID, msh9=""), "AR", "101", "MSH^1^9"),
        (msg(PID, version=""), "AR", "101", "MSH^1^12"),
        (msg(PID, version="3.0"), "AR", "203", "MSH^1^12"),
        (msg(PID, version="two"), "AR", "203", "MSH^1^12"),
        (msg(PID, msh11="X"), "AR", "202", "MSH^1^11"),
        (msg(PID, msh11="1"), "AR", "202", "MSH^1^11"),
    ],
)
def test_header_failures_outside_strict_mode(raw, ack, code, location):
    err = error_of(validate_header, parse_message(raw), Settings())
    assert (err.ack_code, err.code, err.location) == (ack, code, location)


@pytest.mark.parametrize(
    ("raw", "note"),
    [
        (msg(PID, msh11=""), "MSH-11 (processing ID) is empty"),
        (msg(PID, msh7="2017-04-25 07:31:13.123456"), "is not an HL7 date/time; not used"),
        (msg(PID).replace(b"CTRL1", b""), "MSH-10 (message control ID) is empty"),
    ],
)
def test_header_fields_the_worklist_does_not_use_are_notes(raw, note):
    message = parse_message(raw)
    validate_header(message, Settings())
    assert any(note in n for n in message.notes), message.notes


@pytest.mark.parametrize(
    ("declared", "rules"),
    [("2.5.0", "2.5"), ("2.3.0", "2.3"), ("2.6", "2.5.1"), ("2.7.1", "2.5.1"), ("2.8", "2.5.1"),
     ("2.9", "2.5.1"), ("2.1", "2.3"), ("2.2", "2.3"), ("2.4.1", "2.4"), ("2.5.1", "2.5.1")],
)  # fmt: skip
def test_versions_are_read_with_the_nearest_rules(declared, rules):
    message = parse_message(msg(PID, ORC, OBR, version=declared))
    validate_header(message, Settings())
    assert (message.version, message.header.version) == (rules, declared)
    if declared != rules:
        assert f"HL7 {declared} read with the rules of {rules}" in message.notes
    check_structure(message)
    check_fields(message)
    assert rules_version(declared, strict=True) == (declared, "")


def test_control_ids_longer_than_199_characters_are_refused():
    validate_header(parse_message(msg(PID).replace(b"CTRL1", b"C" * 199)), Settings())
    err = error_of(
        validate_header, parse_message(msg(PID).replace(b"CTRL1", b"C" * 200)), Settings()
    )
    assert (err.ack_code, err.code, err.location) == ("AE", "102", "MSH^1^10")


def test_header_checks_follow_the_standards_order():
    # HL7 2.9.2: version before processing ID; both before content errors (MSH-7)
    raw = msg(version="9.9", msh11="X", msh7="")
    err = error_of(validate_header, parse_message(raw), Settings())
    assert err.code == "203"
    err = error_of(validate_header, parse_message(msg(msh11="X", msh7="")), Settings())
    assert err.code == "202"


def test_processing_ids_come_from_settings():
    raw = msg(PID, msh11="T")
    validate_header(parse_message(raw), Settings())
    err = error_of(validate_header, parse_message(raw), Settings(processing_ids=["P"]))
    assert err.code == "202" and "'T'" in err.text


def test_msh7_is_optional_in_231_as_hl7apy_says():
    message = parse_message(msg(PID, version="2.3.1", msh7=""))
    validate_header(message, Settings())
    assert message.notes == []


def test_empty_msh7_where_required_is_accepted_with_a_note():
    # The worklist does not use MSH-7; real feeds leave it empty.
    message = parse_message(msg(PID, version="2.5.1", msh7=""))
    validate_header(message, Settings())
    assert any("MSH-7" in note for note in message.notes)


# --- structure ------------------------------------------------------------------------------


def test_orm_with_two_orders_and_z_segments():
    raw = msg(PID, PV1, ORC, OBR, "ZDS|1.2.3^100^Application^DICOM", ORC, OBR, "ZDS|1.2.4",
              version="2.3.1")  # fmt: skip
    check_structure(parse_message(raw))


def test_orm_25_choice_group_and_notes():
    raw = msg("NTE|1||message note", PID, "NTE|1||patient note", PV1, ORC, OBR, "NTE|1||x",
              "OBX|1|ST|x||y", "NTE|2||z")  # fmt: skip
    check_structure(parse_message(raw), strict=True)


def test_pid_after_the_order_is_out_of_place():
    err = error_of(check_structure, parse_message(msg(ORC, OBR, PID)))
    assert (err.code, err.location, err.ack_code) == ("100", "PID^1", "AE")
    assert "PID (segment 4) is out of place after OBR (segment 3)" in err.text
    assert "expected" in err.text and "ORC" in err.text


def test_second_obr_in_one_order_is_out_of_place():
    err = error_of(check_structure, parse_message(msg(PID, ORC, OBR, OBR)))
    assert err.location == "OBR^2"


def test_orm_without_order_is_a_sequence_error():
    err = error_of(check_structure, parse_message(msg(PID, PV1)))
    assert err.code == "100" and "ORDER group" in err.text and "end of the message" in err.text


def test_omi_needs_ipc_in_every_order():
    ok = msg(PID, PV1, ORC, TQ1, OBR, IPC, IPC, ORC, OBR, IPC, msh9="OMI^O23")
    check_structure(parse_message(ok))
    bad = msg(PID, ORC, OBR, ORC, OBR, IPC, msh9="OMI^O23")
    err = error_of(check_structure, parse_message(bad))
    # the first order lacks its IPC: the second ORC is where it was expected
    assert err.location == "ORC^2"
    assert "IPC required in the ORDER group that starts at ORC (segment 3)" in err.text


def test_tq1_after_obr_is_out_of_place_in_omi():
    err = error_of(check_structure, parse_message(msg(PID, ORC, OBR, TQ1, IPC, msh9="OMI^O23")))
    assert err.location == "TQ1^1"


def test_zds_must_follow_the_obr_of_its_order():
    err = error_of(check_structure, parse_message(msg(PID, ORC, "ZDS|1.2.3", OBR)))
    assert (err.code, err.location) == ("100", "ZDS^1")


def test_other_z_segments_go_anywhere():
    check_structure(parse_message(msg("ZPI|x", PID, "ZPV|y", ORC, "ZOR|1", OBR, "ZZZ|1")))


def test_relaxed_mode_passes_over_unread_segments_strict_does_not():
    raw = msg("EVN||20240101", PID, "NTE|1||note", msh9="ADT^A31^ADT_A05")
    check_structure(parse_message(raw))  # PV1 missing and NTE unknown to ADT_A05: not read
    err = error_of(check_structure, parse_message(raw), True)
    assert err.location == "NTE^1"


def test_structure_from_msh93_and_event_table():
    assert structure_of(parse_message(msg(PID, msh9="ADT^A08"))) == "ADT_A01"
    assert structure_of(parse_message(msg(PID, msh9="ADT^A31"))) == "ADT_A05"
    assert structure_of(parse_message(msg(PID, msh9="ADT^A31", version="2.3.1"))) == "ADT_A01"
    assert structure_of(parse_message(msg(PID, msh9="ADT^A40"))) == "ADT_A39"
    assert structure_of(parse_message(msg(PID, msh9="ORM^O01^OMI_O23"))) == "OMI_O23"
    assert structure_of(parse_message(msg(PID, msh9="XYZ^Q99"))) is None
    err = error_of(structure_of, parse_message(msg(PID, msh9="ORM^O01^NOPE_X1")))
    assert (err.code, err.location) == ("103", "MSH^1^9^1^3")


def test_unknown_structure_is_left_to_the_order_module():
    check_structure(parse_message(msg("ANY|thing", msh9="XYZ^Q99")))


def test_adt_merge_needs_mrg():
    err = error_of(check_structure, parse_message(msg("EVN||2024", PID, msh9="ADT^A40")))
    assert "MRG required" in err.text


def test_version_group_names_differ_but_both_compile():
    g231 = compile_structure("ORM_O01", "2.3.1", True)
    g251 = compile_structure("ORM_O01", "2.5.1", True)
    names = lambda g: [c.name for c in g.root.children]  # noqa: E731
    assert names(g231)[-1] == names(g251)[-1] == "ORDER"
    detail = lambda g: g.root.children[-1].children[1].children[0]  # noqa: E731
    assert detail(g231).name == "CHOICE" and detail(g231).choice
    assert detail(g251).name == "OBRRQDRQ1RXOODSODT_SUPPGRP" and detail(g251).choice


def test_compiled_grammar_matches_hl7apy_reference():
    """The strict grammar carries every segment and cardinality hl7apy defines."""
    from hl7apy import load_reference

    def flatten_ref(ref):
        out = []
        for name, child, card, kind in ref[1]:
            out.append((name.split("_")[-1] if kind == "GRP" else name, card))
            if kind == "GRP":
                out.extend(flatten_ref(child))
        return out

    def flatten_node(node):
        out = []
        for c in node.children:
            out.append((c.name.split("_")[-1], (c.min, -1 if c.max > 1000 else c.max)))
            if c.children is not None:
                out.extend(flatten_node(c))
        return out

    for structure in ("ORM_O01", "OMI_O23", "ADT_A39"):
        grammar = compile_structure(structure, "2.5.1", True)
        ref = flatten_ref(load_reference(structure, "Message", "2.5.1"))
        assert flatten_node(grammar.root) == ref


# --- fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "location"),
    [
        (("PID|||^^^ADT1||DOE", ORC, OBR), "PID^1^3"),  # PID-3 without an ID
        (('PID|||1||""', ORC, OBR), "PID^1^5"),  # explicit null
        (("PID|||1||DOE", "ORC||A1", OBR), "ORC^1^1"),
        ((PID, ORC, OBR, ORC, "OBR|1|A2"), "OBR^2^4"),  # the second order's OBR
    ],
)
def test_required_fields_that_the_worklist_reads(segments, location):
    err = error_of(check_fields, parse_message(msg(*segments)), True)
    assert (err.code, err.location, err.ack_code) == ("101", location, "AE")
    if location != "OBR^2^4":  # OBR-4: the order module notes its absence
        err = error_of(check_fields, parse_message(msg(*segments)))
        assert (err.code, err.location, err.ack_code) == ("101", location, "AE")


def test_orc_7_and_obr_27_are_demanded_in_strict_mode_only():
    # hl7apy's 2.3 tables make them (1,1); 2.3.1 and the 2.3-era chapter 4 do not
    raw = msg(PID, "ORC|CA|A1^PLC|B1^FIL||CA", "OBR|1|A1|B1|P1^Proc", version="2.3")
    check_fields(parse_message(raw))
    err = error_of(check_fields, parse_message(raw), True)
    assert (err.code, err.location) == ("101", "ORC^1^7")


def test_pid_2_stands_in_for_an_empty_pid_3_when_allowed():
    raw = msg("PID||999888|||DOE^JOHN", ORC, OBR)
    check_fields(parse_message(raw), False, True)
    assert error_of(check_fields, parse_message(raw), False, False).location == "PID^1^3"
    assert error_of(check_fields, parse_message(raw), True, True).location == "PID^1^3"


def test_obr_4_may_be_empty_when_ipc_or_obr_44_names_the_procedure():
    omi = msg(PID, ORC, TQ1, "OBR|1|A1|B1", IPC, msh9="OMI^O23")
    check_fields(parse_message(omi))
    with_obr44 = "OBR|1|A1|B1" + "|" * 41 + "P1^Procedure 1^ERL"  # OBR-44
    check_fields(parse_message(msg(PID, ORC, with_obr44)))
    err = error_of(check_fields, parse_message(msg(PID, ORC, "OBR|1|A1|B1")), True)
    assert err.location == "OBR^1^4"


def test_ipc_1_to_4_are_required_in_omi():
    raw = msg(PID, ORC, OBR, "IPC|ACC|RP||SPS", msh9="OMI^O23")
    err = error_of(check_fields, parse_message(raw), True)
    assert err.location == "IPC^1^3"
    check_fields(parse_message(raw))  # derived, as in ORM without ZDS


def test_required_fields_not_read_are_not_demanded():
    # PV1-2 (patient class) is required by HL7 but not read: an empty one passes
    check_fields(parse_message(msg(PID, "PV1|||", ORC, OBR)))


def test_orc1_is_optional_in_231_per_hl7apy():
    check_fields(parse_message(msg(PID, "ORC||A1", OBR, version="2.3.1")))


@pytest.mark.parametrize(
    ("segment", "location"),
    [
        ("PID|||1||DOE||19701301", "PID^1^7^1^1"),
        ("ORC|NW" + "|" * 6 + "^^^2000-07-01", "ORC^1^7^1^4"),
        ("TQ1|||||||20000816 1510", "TQ1^1^7^1^1"),
        ("OBR|1|||P1" + "|" * 23 + "^^^200002300900", "OBR^1^27^1^4"),
    ],
)
def test_bad_dates_that_the_worklist_reads(segment, location):
    segs = [s for s in (PID, ORC, OBR) if s[:3] != segment[:3]] + [segment]
    segs.sort(key=lambda s: ["PID", "ORC", "TQ1", "OBR"].index(s[:3]))
    err = error_of(check_fields, parse_message(msg(*segs, msh9="OMI^O23")), True)
    assert (err.code, err.location) == ("102", location)
    # ISO 8601 is read (with a note) outside strict mode; a bad PID-7 is left out (order module)
    if "2000-07-01" not in segment and not segment.startswith("PID"):
        err = error_of(check_fields, parse_message(msg(*segs, msh9="OMI^O23")))
        assert (err.code, err.location) == ("102", location)


def test_bad_dates_in_fields_not_read_pass():
    check_fields(parse_message(msg(PID, "ORC|NW|||||||||||||||not a date", OBR)))


@pytest.mark.parametrize(
    "value", ["2024", "202401", "20240229", "202401021530", "20240102153045.1234", "20240102+0100"]
)
def test_dtm_accepts(value):
    assert dtm_problem(value) is None


@pytest.mark.parametrize(
    "value",
    ["", "24", "2024-01-02", "20230229", "20241301", "2024010225", "202401021260", "20240102x",
     "20240102.5", "20240102+1500", "202401021530455"],
)  # fmt: skip
def test_dtm_rejects(value):
    assert dtm_problem(value)


# --- the public samples ---------------------------------------------------------------------

VALID = [
    "ORM_O01.hl7",
    "OMI_O23.hl7",
    "OMI_O23-ImagingOrder.hl7",
    "OMG_O19-GeneralClinicalOrder-Eyecare.hl7",
    "ADT_A08.hl7",
    "ADT_A31-UpdatePersonInfo.hl7",
    "ADT_A40-PatientMerge.hl7",
    "ADT_A47-ChangePatientID.hl7",
]


@pytest.mark.parametrize("name", VALID)
def test_public_samples_have_a_valid_structure(name):
    check_structure(parse_message((require_public_samples() / name).read_bytes()))


def test_public_sample_declaring_omi_without_ipc_is_rejected():
    raw = (require_public_samples() / "ORM_O01-GeneralOrder.hl7").read_bytes()
    err = error_of(check_structure, parse_message(raw))
    assert (err.code, err.location, err.ack_code) == ("100", "ORC^1", "AE")
    assert err.text == (
        "OMI_O23 (2.5.1): IPC required in the ORDER group that starts at ORC (segment 5), "
        "found the end of the message"
    )


# Samples that leave MSH-7 empty although their version requires it: accepted, with a note.
SAMPLES_WITHOUT_MSH7 = ("OMI_O23.hl7", "ADT_A08.hl7")


@pytest.mark.parametrize("name", VALID)
def test_public_samples_header_and_fields(name):
    message = parse_message((require_public_samples() / name).read_bytes())
    check_message(message, Settings())
    if name in SAMPLES_WITHOUT_MSH7:
        assert any("MSH-7" in note for note in message.notes)


def test_an_iso_date_time_is_left_to_the_order_module_outside_strict_mode():
    raw = msg(PID, ORC, "TQ1|1||||||2025-06-12 10:15:00", OBR)
    check_fields(parse_message(raw))
    err = error_of(check_fields, parse_message(raw), True)
    assert (err.code, err.location) == ("102", "TQ1^1^7^1^1")


def test_an_msh_9_3_the_version_does_not_define_is_a_note_outside_strict_mode():
    message = parse_message(msg(PID, msh9="ADT^A08^ADT_A08"))
    check_structure(message, lenient=True)
    assert any("'ADT_A08' is not a structure of HL7 2.5.1" in n for n in message.notes)
    err = error_of(check_structure, parse_message(msg(PID, msh9="ADT^A08^ADT_A08")))
    assert (err.code, err.location) == ("103", "MSH^1^9^1^3")


def test_a_segment_fused_into_the_field_before_is_named_there():
    raw = msg(PID, "PV1||O||||||||VORC|NW|A1^PLC", OBR, version="2.3")
    err = error_of(check_structure, parse_message(raw))
    assert (err.code, err.location) == ("100", "PV1^1^10")
    assert "ORC seems fused into PV1-10" in err.text
