"""HL7 message -> OrderMessage / PatientUpdate / Ignored: the order-control table, the field
map's sources, the settings that change it, charsets, ADT events and what is refused."""

from __future__ import annotations

import re

import pytest

from bridge.config import Settings, StationRule
from bridge.hl7.errors import HL7Error
from bridge.hl7.message import HL7Message, parse_message
from bridge.hl7.order import (
    MAX_OTHER_IDS,
    ORDER_CONTROL_TABLE,
    Action,
    Ignored,
    OrderMessage,
    PatientUpdate,
    check_station_rules,
    derive_study_uid,
    read_message,
)
from bridge.hl7.pipeline import interpret
from tests.peers import require_public_samples

# codec of each MSH-18 value the tests use
CODECS = {
    "": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
}


def segment(name: str, fields: dict[int, str]) -> str:
    if not fields:
        return name
    if name == "MSH":  # MSH-1 is the separator itself: MSH-2 is the first text after "MSH|"
        return "MSH|" + "|".join(fields.get(i, "") for i in range(2, max(fields) + 1))
    return name + "|" + "|".join(fields.get(i, "") for i in range(1, max(fields) + 1))


def base_orm(version: str = "2.5.1") -> list[tuple[str, dict[int, str]]]:
    return [
        ("MSH", {2: "^~\\&", 3: "RIS", 4: "HOSP", 5: "WLBRIDGE", 6: "HOSP", 7: "20250611090000",
                 9: "ORM^O01", 10: "CTRL1", 11: "P", 12: version}),
        ("PID", {3: "PAT001^^^HOSP^MR", 5: "DOE^JANE^Q^JR^MRS^PHD", 7: "19800102", 8: "F",
                 11: "1 Main St^^Springfield^^12345^US", 18: "ACCT9"}),
        ("PV1", {2: "O", 3: "RAD^R1^B1", 8: "1234^WELBY^MARCUS^A^III^DR^MD", 19: "VISIT77"}),
        ("ORC", {1: "NW", 2: "PLC100^RIS", 3: "FIL100^PACS", 5: "SC",
                 12: "5678^HOUSE^GREGORY^^^DR"}),
        ("TQ1", {1: "1", 7: "20250612101500", 9: "R"}),
        ("OBR", {1: "1", 2: "PLC100^RIS", 3: "FIL100^PACS",
                 4: "CTH^CT HEAD^L^P123^HEAD PROTOCOL^99LOC", 12: "FASTING", 13: "PACEMAKER",
                 16: "9999^CUDDY^LISA^^^DR", 18: "ACC100", 19: "RP100", 20: "SPS100", 24: "CT",
                 30: "WALK", 31: "^HEADACHE", 34: "4321&CHASE&ROBERT"}),
        ("ZDS", {1: "1.2.3.4.5.100^RIS^Application^DICOM"}),
    ]  # fmt: skip


def base_omi() -> list[tuple[str, dict[int, str]]]:
    segs = [s for s in base_orm("2.5.1") if s[0] != "ZDS"]
    segs[0][1][9] = "OMI^O23^OMI_O23"
    obr = dict(segs[-1][1])
    for f in (18, 19, 20, 24):
        obr.pop(f)
    segs[-1] = ("OBR", obr)
    segs.append(("IPC", {1: "ACC200", 2: "RP200", 3: "1.2.3.4.5.200", 4: "SPS201", 5: "MR",
                         6: "PRT1^Protocol one^99LOC", 7: "MRSTATION", 8: "MR ROOM",
                         9: "MRAE1~MRAE2"}))  # fmt: skip
    return segs


def build(segments: list[tuple[str, dict[int, str]]], changes: dict | None = None,
          drop: tuple[str, ...] = (), charset: str = "") -> HL7Message:  # fmt: skip
    """Apply `changes` ({"OBR": {24: "MR"}} changes the first OBR; a key "OBR#2" the second),
    drop segments by name, set MSH-18, encode with its codec and parse."""
    changes = changes or {}
    seen: dict[str, int] = {}
    lines = []
    for name, fields in segments:
        if name in drop:
            continue
        seen[name] = seen.get(name, 0) + 1
        fields = dict(fields)
        key = name if seen[name] == 1 else f"{name}#{seen[name]}"
        fields.update(changes.get(key, {}))
        if name == "MSH" and charset:
            fields[18] = charset
        lines.append(segment(name, fields))
    return parse_message("\r".join(lines).encode(CODECS[charset]))


def settings(**kwargs) -> Settings:
    """Settings with a default station rule unless the test gives its own rules."""
    kwargs.setdefault("station_rules", [StationRule(match={}, ae_titles=["DEFAULT_AE"])])
    return Settings(**kwargs)


def read(message: HL7Message, **kwargs) -> OrderMessage | PatientUpdate | Ignored:
    return read_message(message, settings(**kwargs))


def order(changes: dict | None = None, drop: tuple[str, ...] = (), charset: str = "",
          version: str = "2.5.1", **kwargs) -> OrderMessage:  # fmt: skip
    result = read(build(base_orm(version), changes, drop, charset), **kwargs)
    assert isinstance(result, OrderMessage)
    return result


def refused(message: HL7Message, **kwargs) -> HL7Error:
    with pytest.raises(HL7Error) as info:
        read(message, **kwargs)
    return info.value


# --- Order control and status -----------------------------------------------------------------

TABLE_ROWS = [
    (control, status, action, sps)
    for controls, statuses, action, sps in ORDER_CONTROL_TABLE
    for control in controls
    for status in statuses
]
EXPECTED_ROWS = {
    ("NW", "SC"): (Action.SCHEDULE, "SCHEDULED"),
    ("NW", "IP"): (Action.SCHEDULE, "SCHEDULED"),
    ("NW", ""): (Action.SCHEDULE, "SCHEDULED"),
    ("XO", "SC"): (Action.SCHEDULE, "SCHEDULED"),
    ("XO", ""): (Action.SCHEDULE, "SCHEDULED"),
    ("XO", "IP"): (Action.STATUS, "STARTED"),
    ("SC", "IP"): (Action.STATUS, "STARTED"),
    ("XO", "CM"): (Action.REMOVE, "COMPLETED"),
    ("SC", "CM"): (Action.REMOVE, "COMPLETED"),
    ("CA", "CA"): (Action.REMOVE, "CANCELED"),
    ("CA", ""): (Action.REMOVE, "CANCELED"),
    ("OC", "CA"): (Action.REMOVE, "CANCELED"),
    ("OC", ""): (Action.REMOVE, "CANCELED"),
    ("DC", "CA"): (Action.REMOVE, "DISCONTINUED"),
    ("DC", "DC"): (Action.REMOVE, "DISCONTINUED"),
    ("DC", ""): (Action.REMOVE, "DISCONTINUED"),
    ("OD", "CA"): (Action.REMOVE, "DISCONTINUED"),
    ("OD", "DC"): (Action.REMOVE, "DISCONTINUED"),
    ("OD", ""): (Action.REMOVE, "DISCONTINUED"),
    ("SC", "A"): (Action.STATUS, "ARRIVED"),
}


def test_the_table_is_the_reference_table():
    assert {(c, s): (a, sps) for c, s, a, sps in TABLE_ROWS} == EXPECTED_ROWS


@pytest.mark.parametrize(("control", "status"), sorted(EXPECTED_ROWS))
def test_every_order_control_row(control, status):
    result = order({"ORC": {1: control, 5: status}})
    step = result.steps[0]
    assert (step.action, step.status) == EXPECTED_ROWS[(control, status)]
    assert (step.order_control, step.order_status) == (control, status)
    assert step.values["ScheduledProcedureStepStatus"] == EXPECTED_ROWS[(control, status)][1]


@pytest.mark.parametrize(
    ("control", "status", "field_no"),
    [("ZZ", "SC", 1), ("RE", "", 1), ("NW", "CM", 5), ("XO", "CA", 5), ("SC", "SC", 5),
     ("SC", "", 5), ("CA", "IP", 5), ("DC", "A", 5)],
)  # fmt: skip
def test_unknown_combinations_are_refused_with_103(control, status, field_no):
    error = refused(build(base_orm(), {"ORC": {1: control, 5: status}}), strict=True)
    assert (error.ack_code, error.code, error.location) == ("AE", "103", f"ORC^1^{field_no}")
    if (control, status) not in (("NW", "CM"), ("SC", "SC")):
        error = refused(build(base_orm(), {"ORC": {1: control, 5: status}}))
        assert (error.code, error.location) == ("103", f"ORC^1^{field_no}")


@pytest.mark.parametrize(
    ("control", "status", "expected", "note"),
    [("NW", "FINAL", (Action.SCHEDULE, "SCHEDULED"), "ORC^1^5: order status 'FINAL' ignored"),
     ("NW", "CM", (Action.SCHEDULE, "SCHEDULED"), "ORC^1^5: order status 'CM' ignored"),
     ("SC", "SC", (Action.SCHEDULE, "SCHEDULED"), "SC with order status SC read as an update"),
     ("XR", "", (Action.SCHEDULE, "SCHEDULED"), "order control XR read as XO"),
     ("XR", "CM", (Action.REMOVE, "COMPLETED"), "order control XR read as XO"),
     ("SN", "", (Action.SCHEDULE, "SCHEDULED"), "order control SN read as NW")],
)  # fmt: skip
def test_order_controls_whose_meaning_is_clear_are_read_with_a_note(control, status, expected,
                                                                     note):  # fmt: skip
    message = build(base_orm(), {"ORC": {1: control, 5: status}})
    step = read(message).steps[0]
    assert (step.action, step.status) == expected
    assert (step.order_control, step.order_status) == (control, status)
    assert any(note in n for n in message.notes), message.notes


def test_lower_case_order_control_is_accepted():
    assert order({"ORC": {1: "nw", 5: "sc"}}).steps[0].action is Action.SCHEDULE


# --- Identity and Study Instance UID ----------------------------------------------------------


def test_identity_survives_changed_times_and_procedure():
    nw = order().steps[0]
    xo = order({"ORC": {1: "XO"}, "TQ1": {7: "20250701080000"}, "OBR": {4: "MRH^MR HEAD^L"}})
    ca = order({"ORC": {1: "CA", 5: "CA"}, "TQ1": {7: "20250702"}})
    assert nw.identity == xo.steps[0].identity == ca.steps[0].identity
    assert nw.identity == "acc:ACC100|rp:RP100|sps:SPS100"


def test_identity_differs_between_steps_and_orders():
    a = order().steps[0].identity
    assert order({"OBR": {20: "SPS101"}}).steps[0].identity != a
    assert order({"OBR": {18: "ACC101"}}).steps[0].identity != a


def test_identity_falls_back_to_the_placer_order_number():
    step = order({"OBR": {18: ""}}).steps[0]
    assert step.identity == "placer:PLC100^RIS|rp:RP100|sps:SPS100"


def test_derived_study_uid_is_stable_and_valid():
    nw = order(drop=("ZDS",)).steps[0].values["StudyInstanceUID"]
    xo = order({"ORC": {1: "XO"}, "TQ1": {7: "20260101"}}, drop=("ZDS",))
    assert nw == xo.steps[0].values["StudyInstanceUID"]
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", nw) and len(nw) <= 64
    assert nw == derive_study_uid("acc:ACC100", "RP100")
    other = order({"OBR": {19: "RP101"}}, drop=("ZDS",)).steps[0].values["StudyInstanceUID"]
    assert other != nw


def test_given_study_uid_is_kept():
    assert order().steps[0].values["StudyInstanceUID"] == "1.2.3.4.5.100"


def test_missing_study_uid_rejected_by_setting():
    error = refused(build(base_orm(), drop=("ZDS",)), missing_study_uid="reject")
    assert (error.code, error.location) == ("101", "ZDS^1^1")
    omi = build(base_omi(), {"IPC": {3: ""}})
    error = refused(omi, missing_study_uid="reject")
    assert (error.code, error.location) == ("101", "IPC^1^3")
    # a cancel without ZDS still removes the item: the UID is not part of the identity
    cancel = order({"ORC": {1: "CA", 5: "CA"}}, drop=("ZDS",), missing_study_uid="reject")
    assert cancel.steps[0].action is Action.REMOVE


@pytest.mark.parametrize(
    ("changes", "location"),
    [({"OBR": {19: ""}}, "OBR^1^19"), ({"OBR": {20: ""}}, "OBR^1^20"),
     ({"OBR": {24: ""}}, "OBR^1^24"), ({"OBR": {4: ""}}, "OBR^1^4"),
     ({"PID": {3: ""}}, "PID^1^3"), ({"PID": {5: ""}}, "PID^1^5")],
)  # fmt: skip
def test_missing_type1_sources_are_refused_with_101(changes, location):
    error = refused(build(base_orm(), changes), strict=True)
    assert (error.code, error.location) == ("101", location)
    if location not in ("OBR^1^19", "OBR^1^20", "OBR^1^4"):  # defaulted or noted otherwise
        error = refused(build(base_orm(), changes))
        assert (error.code, error.location) == ("101", location)


@pytest.mark.parametrize(
    ("changes", "rp_id", "sps_id"),
    [({"OBR": {19: ""}}, "ACC100", "SPS100"),
     ({"OBR": {20: ""}}, "RP100", "RP100"),
     ({"OBR": {18: "", 19: "", 20: ""}}, "FIL100", "FIL100"),
     ({"OBR": {3: "", 18: "", 19: "", 20: ""}, "ORC": {3: ""}}, "PLC100", "PLC100"),
     ({"OBR": {18: "A" * 17, 19: "", 20: ""}}, "FIL100", "FIL100"),
     ({"OBR": {2: "P" * 20, 3: "", 18: "", 19: "", 20: ""}, "ORC": {2: "P" * 20, 3: ""}},
      "1", "1")],
)  # fmt: skip
def test_empty_procedure_ids_are_defaulted_with_a_note(changes, rp_id, sps_id):
    message = build(base_orm(), changes)
    step = read(message).steps[0]
    assert (step.values["RequestedProcedureID"], step.values["ScheduledProcedureStepID"]) == (
        rp_id, sps_id)  # fmt: skip
    assert step.ids_defaulted
    assert any("empty: requested procedure ID" in n or "empty: scheduled procedure step ID" in n
               for n in message.notes)  # fmt: skip
    # the same order always gets the same IDs: a later change or cancel finds the item
    assert read(build(base_orm(), changes)).steps[0].identity == step.identity


def test_ids_of_an_omi_are_defaulted_at_ipc():
    message = build(base_omi(), {"IPC": {2: "", 4: ""}})
    step = read(message).steps[0]
    assert (step.values["RequestedProcedureID"], step.values["ScheduledProcedureStepID"]) == (
        "ACC200", "ACC200")  # fmt: skip
    assert step.locations["RequestedProcedureID"] == "IPC^1^2"


def test_an_order_numbered_in_obr_only_has_an_identity():
    step = order({"ORC": {2: "", 3: ""}, "OBR": {2: "", 18: ""}}).steps[0]
    assert step.identity.startswith("filler:FIL100^PACS|")


def test_no_procedure_is_a_note_outside_strict_mode():
    message = build(base_orm(), {"OBR": {4: ""}})
    step = read(message).steps[0]
    assert not step.values["RequestedProcedureDescription"]
    assert any("no procedure" in n for n in message.notes)


def test_a_code_too_long_for_a_code_is_the_description():
    message = build(base_orm(), {"OBR": {4: "my-description-of-the-exam"}})
    step = read(message).steps[0]
    assert step.values["RequestedProcedureCodeSequence"] == []
    assert step.values["RequestedProcedureDescription"] == "my-description-of-the-exam"
    assert any("too long for a code" in n for n in message.notes)


@pytest.mark.parametrize(
    ("changes", "modality", "note"),
    [({"OBR": {24: "A999"}}, "A999", "modality 'A999' is not a DICOM defined term"),
     ({"OBR": {24: "NMR"}}, "NMR", "modality 'NMR' is not a DICOM defined term"),
     ({"OBR": {21: "DX", 24: "ZUG"}}, "DX", "modality DX taken from OBR^1^21"),
     ({"OBR": {21: "^^^^ECHO", 24: "CT"}}, "CT", None)],
)  # fmt: skip
def test_modality_not_a_dicom_term_is_named(changes, modality, note):
    message = build(base_orm(), changes)
    step = read(message).steps[0]
    assert step.values["Modality"] == modality
    if note:
        assert any(note in n for n in message.notes), message.notes
    else:
        assert not any("modality" in n for n in message.notes)


def test_no_modality_anywhere_is_still_refused():
    error = refused(build(base_orm(), {"OBR": {21: "^^^^ECHO", 24: ""}}))
    assert (error.code, error.location) == ("101", "OBR^1^24")


def test_pid_2_is_the_patient_id_when_pid_3_is_empty():
    message = build(base_orm(), {"PID": {2: "999888777", 3: ""}})
    result = read(message)
    assert result.patient.patient_id == "999888777"
    assert result.patient.locations["PatientID"] == "PID^1^2"
    assert any("patient ID taken from PID-2" in n for n in message.notes)
    for kwargs in ({"pid2_as_patient_id": False}, {"strict": True}):
        error = refused(build(base_orm(), {"PID": {2: "999888777", 3: ""}}), **kwargs)
        assert (error.code, error.location) == ("101", "PID^1^3")


@pytest.mark.parametrize(
    ("changes", "date", "location"),
    [({"OBR": {6: "20250613080000"}}, "20250613", "OBR^1^6"),
     ({"OBR": {7: "20250614080000"}}, "20250614", "OBR^1^7"),
     ({"OBR": {6: "20250613080000", 7: "20250614080000"}}, "20250613", "OBR^1^6")],
)  # fmt: skip
def test_start_falls_back_to_obr_6_and_obr_7(changes, date, location):
    message = build(base_orm(), changes, drop=("TQ1",))
    step = read(message).steps[0]
    assert step.values["ScheduledProcedureStepStartDate"] == date
    assert step.locations["ScheduledProcedureStepStartDate"] == location
    assert f"scheduled start taken from {location}" in message.notes
    error = refused(build(base_orm(), changes, drop=("TQ1",)), strict=True)
    assert (error.code, error.location) == ("101", "ORC^1^7")


def test_a_cancel_needs_no_modality_or_time():
    step = order({"ORC": {1: "CA", 5: "CA"}, "OBR": {24: ""}, "TQ1": {7: ""}}).steps[0]
    assert step.action is Action.REMOVE


# --- Shapes: several groups, several IPC ------------------------------------------------------


def test_orm_with_several_groups_gives_one_step_each():
    segs = base_orm()
    segs += [("ORC", {1: "NW", 2: "PLC101^RIS", 5: "SC"}), ("TQ1", {7: "20250613"}),
             ("OBR", {2: "PLC101^RIS", 4: "XR^XR CHEST^L", 18: "ACC101", 19: "RP101",
                      20: "SPS101", 24: "CR"}), ("ZDS", {1: "1.2.3.4.5.101"})]  # fmt: skip
    result = read(build(segs))
    assert [s.values["AccessionNumber"] for s in result.steps] == ["ACC100", "ACC101"]
    assert [s.values["Modality"] for s in result.steps] == ["CT", "CR"]
    assert [s.values["StudyInstanceUID"] for s in result.steps] == [
        "1.2.3.4.5.100",
        "1.2.3.4.5.101",
    ]
    assert result.steps[1].values["PlacerOrderNumberImagingServiceRequest"] == "PLC101"
    assert result.steps[1].values["ScheduledProcedureStepStartDate"] == "20250613"


@pytest.mark.parametrize(
    ("changes", "code", "location"),
    [({"ORC#2": {1: "ZZ"}}, "103", "ORC^2^1"), ({"TQ1#2": {7: "tomorrow"}}, "102", "TQ1^2^7"),
     ({"OBR#2": {24: ""}}, "101", "OBR^2^24"), ({"ZDS#2": {1: ""}}, "101", "ZDS^2^1")],
)  # fmt: skip
def test_locations_count_occurrences_not_positions(changes, code, location):
    # ERR-2.2 is the segment's occurrence (the 2nd OBR is OBR^2), not its place in the message
    segs = base_orm() + [
        ("ORC", {1: "NW", 2: "PLC101^RIS", 5: "SC"}), ("TQ1", {7: "20250613"}),
        ("OBR", {2: "PLC101^RIS", 4: "XR^XR CHEST^L", 18: "ACC101", 19: "RP101", 20: "SPS101",
                 24: "CR"}), ("ZDS", {1: "1.2.3.4.5.101"})]  # fmt: skip
    error = refused(build(segs, changes), missing_study_uid="reject")
    assert (error.code, error.location) == (code, location)


def test_omi_with_several_ipc_gives_one_step_each():
    segs = base_omi()
    segs.append(("IPC", {1: "ACC200", 2: "RP200", 3: "1.2.3.4.5.200", 4: "SPS202", 5: "MR",
                         6: "PRT2^Protocol two^99LOC", 9: "MRAE3"}))  # fmt: skip
    result = read(build(segs))
    assert result.message_type == "OMI^O23"
    assert [s.values["ScheduledProcedureStepID"] for s in result.steps] == ["SPS201", "SPS202"]
    first, second = result.steps
    assert first.values["ScheduledStationAETitle"] == ["MRAE1", "MRAE2"]
    assert second.values["ScheduledStationAETitle"] == ["MRAE3"]
    assert first.values["ScheduledProtocolCodeSequence"][0]["CodeValue"] == "PRT1"
    assert second.values["ScheduledProcedureStepDescription"] == "Protocol two"
    assert first.values["ScheduledStationName"] == "MRSTATION"
    assert first.values["ScheduledProcedureStepLocation"] == "MR ROOM"
    assert first.values["AccessionNumber"] == "ACC200"
    assert first.values["RequestedProcedureID"] == "RP200"
    assert first.values["StudyInstanceUID"] == "1.2.3.4.5.200"
    assert first.identity != second.identity


def test_omi_is_accepted_in_2_5():
    assert len(read(build(base_omi(), {"MSH": {12: "2.5"}})).steps) == 1


@pytest.mark.parametrize("version", ["2.3.1", "2.4"])
def test_omi_before_2_5_is_refused(version):
    error = refused(build(base_omi(), {"MSH": {12: version}}))
    assert (error.ack_code, error.code) == ("AR", "203")


@pytest.mark.parametrize(("kind", "version"), [("OMI^O23", "2.4"), ("OMG^O19", "2.3.1")])
def test_a_message_labelled_older_than_its_type_is_read_with_its_rules(kind, version):
    # What a KIS sends: OMG^O19 with TQ1, under a 2.3.1 MSH-12 (OMG exists from 2.4)
    segs = base_omi() if kind.startswith("OMI") else base_orm()
    message = build(segs, {"MSH": {9: kind, 12: version}})
    result = interpret(message, settings())
    assert [s.values["Modality"] for s in result.steps] == ["MR" if "OMI" in kind else "CT"]
    assert (message.version, message.header.version) == ("2.5.1", version)
    assert f"{kind} does not exist in HL7 {version}; read with the rules of 2.5.1" in message.notes
    with pytest.raises(HL7Error) as info:
        interpret(build(segs, {"MSH": {9: kind, 12: version}}), settings(strict=True))
    assert (info.value.ack_code, info.value.code, info.value.location) == ("AR", "203", "MSH^1^12")


def test_order_detail_segments_before_the_first_orc_are_passed_over():
    # A DG1 (and insurance segments) in the patient part, as an ADT-minded HIS writes its ORM
    segs = base_orm()
    segs.insert(3, ("DG1", {1: "1", 4: "CHRONIC COUGH"}))
    message = build(segs)
    result = read(message)
    assert [s.values["AccessionNumber"] for s in result.steps] == ["ACC100"]
    assert "DG1 (segment 4) before the first ORC: not part of an order, passed over" in (
        message.notes
    )
    error = refused(build(segs), strict=True)
    assert (error.code, error.location) == ("100", "DG1^1")
    # an OBR before any ORC still has no order to belong to
    segs.insert(3, ("OBR", {1: "1", 2: "PLC0", 24: "CT"}))
    assert (refused(build(segs)).code, refused(build(segs)).location) == ("100", "OBR^1")


def test_omg_is_read_like_orm():
    result = read(build(base_orm(), {"MSH": {9: "OMG^O19^OMG_O19"}}))
    assert result.message_type == "OMG^O19"
    assert result.steps[0].values["AccessionNumber"] == "ACC100"


def test_msh9_omi_with_orm_segments_is_a_clear_100():
    error = refused(build(base_orm(), {"MSH": {9: "OMI^O23^OMI_O23"}}))
    assert (error.ack_code, error.code, error.location) == ("AE", "100", "ZDS^1")
    assert "declares OMI^O23" in error.text and "no IPC" in error.text


def test_msh9_orm_with_ipc_is_a_clear_100():
    error = refused(build(base_omi(), {"MSH": {9: "ORM^O01"}}))
    assert (error.code, error.location) == ("100", "IPC^1")
    assert "declares ORM^O01" in error.text and "IPC" in error.text


def test_obr_before_orc_is_a_sequence_error():
    segs = base_orm()
    segs.insert(3, segs.pop(5))  # OBR before ORC
    error = refused(build(segs))
    assert (error.code, error.location) == ("100", "OBR^1")


def test_order_without_orc_is_refused():
    error = refused(build(base_orm(), drop=("ORC", "TQ1", "OBR", "ZDS")))
    assert (error.code, error.location) == ("100", "ORC^1")


# --- Message types ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["SIU^S12", "ORU^R01", "QRY^A19", "^"])
def test_unsupported_message_types_are_ar_200(kind):
    error = refused(build(base_orm(), {"MSH": {9: kind}}))
    assert (error.ack_code, error.code, error.location) == ("AR", "200", "MSH^1^9")


@pytest.mark.parametrize("kind", ["ORM^O02", "OMI^O19", "OMG^O23", "ORM"])
def test_unsupported_triggers_are_ar_201(kind):
    error = refused(build(base_orm(), {"MSH": {9: kind}}))
    assert (error.ack_code, error.code, error.location) == ("AR", "201", "MSH^1^9^1^2")


# --- Timing and priority ----------------------------------------------------------------------


def start(step) -> tuple[str, str, str]:
    v = step.values
    return (v["ScheduledProcedureStepStartDate"], v["ScheduledProcedureStepStartTime"],
            v["TimezoneOffsetFromUTC"])  # fmt: skip


def test_tq1_wins_over_orc7_and_obr27():
    step = order({"ORC": {7: "^^^20250101080000"}, "OBR": {27: "^^^20250202090000"}}).steps[0]
    assert start(step) == ("20250612", "101500", "")


def test_orc7_wins_over_obr27():
    changes = {"ORC": {7: "1^once^^20250101080000^^S"}, "OBR": {27: "^^^20250202090000"}}
    step = order(changes, drop=("TQ1",)).steps[0]
    assert start(step) == ("20250101", "080000", "")
    assert step.values["RequestedProcedurePriority"] == "STAT"


def test_obr27_when_nothing_else():
    step = order({"OBR": {27: "^^^20250202090000"}}, drop=("TQ1",), version="2.3.1").steps[0]
    assert start(step) == ("20250202", "090000", "")


def test_orc7_timestamp_with_degree_of_precision_subcomponent():
    step = order({"ORC": {7: "^^^20250101083000&M"}}, drop=("TQ1",)).steps[0]
    assert start(step)[:2] == ("20250101", "083000")


def test_fallbacks_obr36_then_orc15_with_a_note():
    message = build(base_orm(), {"OBR": {36: "20250303111500"}, "ORC": {15: "20250404"}},
                    drop=("TQ1",))  # fmt: skip
    step = read(message).steps[0]
    assert start(step)[:2] == ("20250303", "111500")
    assert any("OBR^1^36" in note for note in message.notes)
    message = build(base_orm(), {"ORC": {15: "20250404"}}, drop=("TQ1",))
    assert start(read(message).steps[0])[:2] == ("20250404", "000000")
    assert any("ORC^1^15" in note for note in message.notes)


def test_no_start_at_all_is_101():
    error = refused(build(base_orm(), drop=("TQ1",)))
    assert (error.code, error.location) == ("101", "ORC^1^7")


@pytest.mark.parametrize(
    ("dtm", "expected"),
    [("202506121015+0200", ("20250612", "101500", "+0200")),
     ("20250612101530-0500", ("20250612", "101530", "-0500")),
     ("20250612101530.25+0000", ("20250612", "101530.25", "+0000")),
     ("20250612", ("20250612", "000000", "")),
     ("2025061210", ("20250612", "100000", ""))],
)  # fmt: skip
def test_dtm_precisions_and_offsets(dtm, expected):
    assert start(order({"TQ1": {7: dtm}}).steps[0]) == expected


@pytest.mark.parametrize("dtm", ["2025-06-12", "20251312", "20250231", "202506121075",
                                 "tomorrow", "20250612+2500", "2025061210153"])  # fmt: skip
def test_bad_timing_is_102_naming_the_field(dtm):
    strict = {"strict": True} if "-" in dtm else {}  # ISO 8601 is read outside strict mode
    error = refused(build(base_orm(), {"TQ1": {7: dtm}}), **strict)
    assert (error.code, error.location) == ("102", "TQ1^1^7")
    assert dtm in error.text
    error = refused(build(base_orm(), {"ORC": {7: f"^^^{dtm}"}}, drop=("TQ1",)), **strict)
    assert (error.code, error.location) == ("102", "ORC^1^7^1^4")


@pytest.mark.parametrize(
    ("code", "priority"),
    [("S", "STAT"), ("A", "HIGH"), ("P", "HIGH"), ("C", "HIGH"), ("R", "ROUTINE"),
     ("T", "MEDIUM"), ("", "")],
)  # fmt: skip
def test_priorities(code, priority):
    assert order({"TQ1": {9: code}}).steps[0].values["RequestedProcedurePriority"] == priority
    step = order({"ORC": {7: f"^^^20250101^^{code}"}}, drop=("TQ1",)).steps[0]
    assert step.values["RequestedProcedurePriority"] == priority


def test_unknown_priority_is_left_empty_with_a_note():
    message = build(base_orm(), {"TQ1": {9: "XYZ"}})
    assert read(message).steps[0].values["RequestedProcedurePriority"] == ""
    assert any("XYZ" in note for note in message.notes)


# --- The field map ----------------------------------------------------------------------------


def test_orm_field_map_sources():
    result = order()
    v = result.steps[0].values
    assert v["PlacerOrderNumberImagingServiceRequest"] == "PLC100"
    assert v["FillerOrderNumberImagingServiceRequest"] == "FIL100"
    assert v["AccessionNumber"] == result.steps[0].accession_number == "ACC100"
    assert v["RequestedProcedureID"] == "RP100"
    assert v["ScheduledProcedureStepID"] == "SPS100"
    assert v["Modality"] == "CT"
    assert v["RequestingPhysician"] == "HOUSE^GREGORY^^DR"  # ORC-12 wins over OBR-16
    assert v["ReferringPhysicianName"] == "WELBY^MARCUS^A^DR^III MD"
    assert v["ScheduledPerformingPhysicianName"] == "CHASE^ROBERT"  # NDL: id&family&given
    assert v["PatientState"] == "FASTING"
    assert v["MedicalAlerts"] == "PACEMAKER"
    assert v["PatientTransportArrangements"] == "WALK"
    assert v["ReasonForTheRequestedProcedure"] == "HEADACHE"
    assert v["RequestedProcedureDescription"] == "CT HEAD"
    assert v["RequestedProcedureCodeSequence"] == [
        {"CodeValue": "CTH", "CodingSchemeDesignator": "L", "CodeMeaning": "CT HEAD"}
    ]
    assert v["ScheduledProcedureStepStatus"] == "SCHEDULED"
    assert v["ScheduledStationAETitle"] == ["DEFAULT_AE"]


def test_requesting_physician_from_obr16_when_orc12_is_empty():
    v = order({"ORC": {12: ""}}).steps[0].values
    assert v["RequestingPhysician"] == "CUDDY^LISA^^DR"


def test_obr34_as_xcn_in_older_messages():
    v = order({"OBR": {34: "7101^ESTRADA^JAIME^P^^DR"}}, version="2.3.1").steps[0].values
    assert v["ScheduledPerformingPhysicianName"] == "ESTRADA^JAIME^P^DR"


def test_obr44_wins_for_the_requested_procedure_code():
    v = order({"OBR": {44: "24725-4^CT Head^LN"}}).steps[0].values
    assert v["RequestedProcedureCodeSequence"][0]["CodeValue"] == "24725-4"
    assert v["RequestedProcedureDescription"] == "CT Head"


def test_weight_size_and_allergies():
    segs = base_orm() + [
        ("OBX", {1: "1", 2: "NM", 3: "29463-7^Body weight^LN", 5: "72.5", 6: "kg"}),
        ("OBX", {1: "2", 2: "NM", 3: "^Body Height", 5: "180", 6: "cm"}),
    ]
    segs.insert(3, ("AL1", {1: "1", 3: "^Iodinated contrast"}))
    segs.insert(4, ("AL1", {1: "2", 3: "PEN^Penicillin"}))
    v = read(build(segs)).steps[0].values
    assert (v["PatientWeight"], v["PatientSize"]) == ("72.5", "1.8")
    assert v["Allergies"] == ["Iodinated contrast", "Penicillin"]


# --- Settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "code", "meaning"),
    [("alternate-first", "P123", "HEAD PROTOCOL"), ("primary", "CTH", "CT HEAD"),
     ("alternate", "P123", "HEAD PROTOCOL")],
)  # fmt: skip
def test_protocol_code_source(source, code, meaning):
    v = order(protocol_code_source=source).steps[0].values
    assert v["ScheduledProtocolCodeSequence"][0]["CodeValue"] == code
    assert v["ScheduledProcedureStepDescription"] == meaning


def test_protocol_code_source_without_alternate():
    changes = {"OBR": {4: "CTH^CT HEAD^L"}}
    assert order(changes).steps[0].values["ScheduledProtocolCodeSequence"][0]["CodeValue"] == "CTH"
    v = order(changes, protocol_code_source="alternate").steps[0].values
    assert v["ScheduledProtocolCodeSequence"] == []
    assert v["ScheduledProcedureStepDescription"] == "CT HEAD"  # the step is still described


RULES = [
    StationRule(match={"OBR-24": "MR"}, ae_titles=["MR1"], station_name="MR ONE"),
    StationRule(match={"OBR-24": "/^C[TR]$/", "MSH-4": "HOSP"}, ae_titles=["CT1", "CT2"],
                station_name="CT ONE"),
    StationRule(match={"PV1-3.1": "ER"}, ae_titles=["ER1"]),
    StationRule(match={}, ae_titles=["ANY"], station_name="DEFAULT"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "aets", "name"),
    [({"OBR": {24: "MR"}}, ["MR1"], "MR ONE"),
     ({}, ["CT1", "CT2"], "CT ONE"),
     ({"OBR": {24: "CR"}}, ["CT1", "CT2"], "CT ONE"),
     ({"MSH": {4: "OTHER"}}, ["ANY"], "DEFAULT"),
     ({"OBR": {24: "US"}, "PV1": {3: "ER^1"}}, ["ER1"], ""),
     ({"OBR": {24: "XCT"}}, ["ANY"], "DEFAULT")],
)  # fmt: skip
def test_station_rules_first_match_wins(changes, aets, name):
    v = order(changes, station_rules=RULES).steps[0].values
    assert v["ScheduledStationAETitle"] == aets
    assert v.get("ScheduledStationName", "") == name


def test_check_station_rules():
    check_station_rules(RULES)
    with pytest.raises(ValueError, match="rule 2"):
        check_station_rules([RULES[0], StationRule(match={"OBR-24": "/[CT/"})])
    with pytest.raises(ValueError, match="rule 1"):
        check_station_rules([StationRule(match={"OBR24": "CT"})])


def test_ipc9_wins_over_station_rules():
    v = read(build(base_omi()), station_rules=RULES).steps[0].values
    assert v["ScheduledStationAETitle"] == ["MRAE1", "MRAE2"]
    assert v["ScheduledStationName"] == "MRSTATION"


def test_without_ipc9_or_matching_rule_the_bridge_ae_title_is_the_station():
    message = build(base_orm())
    v = read_message(message, Settings(ae_title="BRIDGE1")).steps[0].values
    assert v["ScheduledStationAETitle"] == ["BRIDGE1"]
    assert message.notes == []  # no rules configured: the documented default, no note
    rules = [StationRule(match={"OBR-24": "MR"}, ae_titles=["MR1"])]
    message = build(base_orm())
    v = read_message(message, Settings(station_rules=rules)).steps[0].values
    assert v["ScheduledStationAETitle"] == ["WLBRIDGE"]
    assert any("no station rule matches" in note for note in message.notes)


def test_other_ids_are_kept_once_each_and_at_most_sixteen():
    repeated = "~".join(["111^^^A", "222^^^B", "222^^^B"] + [f"{n}^^^X" for n in range(40)])
    message = build(base_orm(), {"PID": {3: repeated}})
    patient = read_message(message, Settings()).patient
    assert patient.other_ids[:2] == [("222", "B"), ("0", "X")]  # the duplicate 222 kept once
    assert len(patient.other_ids) == MAX_OTHER_IDS
    assert any("43 repetitions" in note for note in message.notes)


def test_primary_issuer_chooses_the_patient_id():
    pid = {3: "111^^^CLINIC~222^^^HOSP~333^^^NATIONAL"}
    patient = order({"PID": pid}).patient
    assert (patient.patient_id, patient.issuer) == ("111", "CLINIC")
    assert patient.other_ids == [("222", "HOSP"), ("333", "NATIONAL")]
    patient = order({"PID": pid}, primary_issuer="HOSP").patient
    assert (patient.patient_id, patient.issuer) == ("222", "HOSP")
    assert patient.other_ids == [("111", "CLINIC"), ("333", "NATIONAL")]
    assert patient.locations["PatientID"] == "PID^1^3^2^1"
    patient = order({"PID": pid}, primary_issuer="ABSENT").patient
    assert patient.patient_id == "111"


# --- Patients, names, escapes, charsets -------------------------------------------------------


def test_patient_fields():
    p = order().patient
    assert p.name == "DOE^JANE^Q^MRS^JR PHD"  # XPN suffix/prefix swapped, degree joins suffix
    assert (p.birth_date, p.sex, p.admission_id) == ("19800102", "F", "VISIT77")
    assert p.address == "1 Main St^^Springfield^^12345^US"


def test_admission_id_from_pid18_without_pv1_19():
    assert order({"PV1": {19: ""}}).patient.admission_id == "ACCT9"


@pytest.mark.parametrize(
    ("hl7", "dicom"), [("F", "F"), ("M", "M"), ("O", "O"), ("A", "O"), ("N", "O"), ("U", ""),
                       ("X", ""), ("", "")],
)  # fmt: skip
def test_sex_mapping(hl7, dicom):
    assert order({"PID": {8: hl7}}).patient.sex == dicom


def test_birth_date_keeps_the_date_and_leaves_garbage_out():
    assert order({"PID": {7: "198001021230"}}).patient.birth_date == "19800102"
    for garbage in ("1980", "1990505", "19801301"):
        message = build(base_orm(), {"PID": {7: garbage}})
        result = read(message)
        assert result.patient.birth_date == "" and result.patient.patient_id == "PAT001"
        assert f"PID^1^7: birth date {garbage!r} is not a date; left empty" in message.notes
        error = refused(build(base_orm(), {"PID": {7: garbage}}), strict=True)
        assert (error.code, error.location) == ("102", "PID^1^7")


def test_escapes_are_decoded():
    changes = {
        "PID": {5: "O\\T\\BRIEN^ANNE\\S\\MARIE"},
        "OBR": {13: "Allergy\\F\\Latex \\E\\ more\\R\\x", 30: "\\X57414C4B\\"},
    }
    result = order(changes)
    assert result.patient.name == "O&BRIEN^ANNE MARIE"  # a ^ inside a component is no separator
    v = result.steps[0].values
    assert v["MedicalAlerts"] == "Allergy|Latex \\ more~x"
    assert v["PatientTransportArrangements"] == "WALK"


CHARSET_NAMES = [
    ("8859/1", "MÜLLER^Jürgen", "Hôpital Saint-Éloi"),
    ("8859/2", "NOVÁK^Řehoř", "Dvořák Łódź"),
    ("8859/5", "ИВАНОВ^Пётр", "Москва"),
    ("8859/7", "ΠΑΠΑΔΟΠΟΥΛΟΣ^Γιώργος", "Αθήνα"),
    ("8859/15", "ŠŽŒ^Ÿves", "Prix 12 €"),
    ("UNICODE UTF-8", "山田^太郎", "Zürich – 東京"),
]


@pytest.mark.parametrize(("charset", "name", "text"), CHARSET_NAMES)
def test_charsets(charset, name, text):
    message = build(base_orm(), {"PID": {5: name}, "OBR": {13: text}}, charset=charset)
    result = read(message)
    assert result.patient.name == name
    assert result.steps[0].values["MedicalAlerts"] == text


# --- ADT --------------------------------------------------------------------------------------


def adt(event: str, mrg: dict | None = None, pid: dict | None = None) -> HL7Message:
    segs = [s for s in base_orm() if s[0] in ("MSH", "PID", "PV1")]
    segs[0][1][9] = f"ADT^{event}"
    segs.insert(1, ("EVN", {1: event, 2: "20250611090000"}))
    if mrg is not None:
        segs.append(("MRG", mrg))
    return build(segs, {"PID": pid or {}})


@pytest.mark.parametrize("event", ["A08", "A31", "A10"])
def test_adt_demographics_and_arrival(event):
    result = read(adt(event, pid={5: "SMITH^ANNA", 8: "F"}))
    assert isinstance(result, PatientUpdate)
    assert result.event == event
    assert (result.patient.patient_id, result.patient.name) == ("PAT001", "SMITH^ANNA")
    assert result.previous_id == ""


@pytest.mark.parametrize("event", ["A40", "A47"])
def test_adt_merge_and_identifier_change(event):
    result = read(adt(event, mrg={1: "OLD1^^^HOSP~OLD2^^^OTHER"}, pid={3: "NEW1^^^HOSP"}))
    assert (result.event, result.patient.patient_id) == (event, "NEW1")
    assert (result.previous_id, result.previous_issuer) == ("OLD1", "HOSP")
    result = read(adt(event, mrg={1: "OLD1^^^HOSP~OLD2^^^OTHER"}), primary_issuer="OTHER")
    assert (result.previous_id, result.previous_issuer) == ("OLD2", "OTHER")


def test_adt_merge_without_mrg_is_refused():
    error = refused(adt("A40"))
    assert (error.code, error.location) == ("100", "MRG^1") and "MRG" in error.text
    error = refused(adt("A47", mrg={1: ""}))
    assert (error.code, error.location) == ("101", "MRG^1^1")


@pytest.mark.parametrize("event", ["A01", "A04", "A03", "A28"])
def test_other_adt_events_are_ignored(event):
    result = read(adt(event))
    assert result == Ignored(f"ADT^{event} is not used by the worklist")


def test_adt_names_too_long_follow_the_policy():
    long_name = "A" * 70 + "^B"
    error = refused(adt("A08", pid={5: long_name}), strict=True)
    assert (error.code, error.location) == ("102", "PID^1^5")
    message = adt("A08", pid={5: long_name})  # a name describes: cut, with a note
    assert len(read_message(message, settings()).patient.name) == 64 and message.notes
    error = refused(adt("A08", pid={3: "P" * 65}))  # an identifier cut is another patient's
    assert (error.code, error.location) == ("102", "PID^1^3")
    message = adt("A08", pid={5: long_name})
    result = read_message(message, settings(overlong_values="truncate"))
    assert len(result.patient.name) == 64 and message.notes


# --- Our samples and the public ones ----------------------------------------------------------

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "samples"
SAMPLE_RULES = [StationRule(match={"OBR-24": "CT"}, ae_titles=["CT01"]),
                StationRule(match={"OBR-24": "MR"}, ae_titles=["MR01"])]  # fmt: skip


def sample(name: str) -> HL7Message:
    return parse_message((SAMPLES / name).read_bytes())


@pytest.mark.parametrize("version", ["v231", "v251"])
def test_sample_nw_xo_ca_are_one_order(version):
    s = Settings(station_rules=SAMPLE_RULES)
    nw, xo, ca = (read_message(sample(f"orm_o01_{version}_{c}.hl7"), s) for c in ("nw", "xo", "ca"))
    assert [r.steps[0].action for r in (nw, xo, ca)] == [
        Action.SCHEDULE, Action.SCHEDULE, Action.REMOVE]  # fmt: skip
    assert nw.steps[0].identity == xo.steps[0].identity == ca.steps[0].identity
    assert start(nw.steps[0]) != start(xo.steps[0])
    nv, xv = nw.steps[0].values, xo.steps[0].values
    assert nv["RequestedProcedureDescription"] != xv["RequestedProcedureDescription"]
    assert nv["StudyInstanceUID"] == xv["StudyInstanceUID"]
    assert ca.steps[0].status == "CANCELED"


def test_sample_omi_two_steps():
    result = read_message(sample("omi_o23_v251_nw.hl7"), Settings())
    assert [s.values["ScheduledStationAETitle"] for s in result.steps] == [
        ["CTNORD1"], ["CTNORD1", "CTNORD2"]]  # fmt: skip
    assert result.patient.name == "MÜLLER^Jürgen^Otto^Dr."
    assert start(result.steps[0]) == ("20250612", "093000", "+0200")


def public(name: str) -> HL7Message:
    return parse_message((require_public_samples() / name).read_bytes())


def test_public_orm_o01():
    result = read_message(public("ORM_O01.hl7"), Settings(station_rules=SAMPLE_RULES))
    step = result.steps[0]
    assert (result.patient.patient_id, result.patient.name) == ("583295", "DOE^J1")
    assert step.identity == "acc:MOF5026|rp:RP1026|sps:SPS2032"
    assert step.values["StudyInstanceUID"] == "1.113654.3.13.1026"
    assert step.values["ScheduledStationAETitle"] == ["MR01"]
    assert step.values["RequestedProcedurePriority"] == "STAT"  # ORC-7.6
    assert start(step)[:2] == ("20000701", "090000")  # no timing: ORC-15, noted


def test_public_orm_declared_as_omi_is_refused():
    error = refused(public("ORM_O01-GeneralOrder.hl7"))
    assert (error.code, error.location) == ("100", "ZDS^1")
    assert "OMI^O23" in error.text


def test_public_omi_o23():
    result = read_message(public("OMI_O23.hl7"), Settings())
    step = result.steps[0]
    assert step.identity == "acc:ACC|rp:RPID|sps:SPSID"
    assert step.values["ScheduledStationAETitle"] == ["MODALITY"]  # IPC-9, no rule needed
    assert step.values["StudyInstanceUID"] == "1.2.392.200036.9125.0.199402091242.1"
    assert step.values["ScheduledProtocolCodeSequence"][0]["CodeValue"] == "ProtocolCode"
    assert start(step) == ("20000816", "151000", "")  # TQ1-7
    assert result.patient.patient_id == "4711471151"


@pytest.mark.parametrize("name", ["OMI_O23-ImagingOrder.hl7",
                                  "OMG_O19-GeneralClinicalOrder-Eyecare.hl7"])  # fmt: skip
def test_public_placeholder_orders(name):
    # read_message accepts them (lengths are checked when the item is built)
    result = read_message(public(name), settings())
    step = result.steps[0]
    assert step.values["AccessionNumber"] == "AccessionNumber"
    assert step.values["RequestedProcedurePriority"] == ""  # "RequestedProcedurePriority"
    assert step.values["StudyInstanceUID"] == "1.2.392.200036.9125.0.198811291108.7"


@pytest.mark.parametrize(
    ("name", "event", "patient_id", "previous"),
    [("ADT_A08.hl7", "A08", "583295", ""), ("ADT_A31-UpdatePersonInfo.hl7", "A31", "PID_1", ""),
     ("ADT_A40-PatientMerge.hl7", "A40", "NEW_PID_1", "OLD_PID_1"),
     ("ADT_A47-ChangePatientID.hl7", "A47", "NEW_PID_1", "OLD_PID_1")],
)  # fmt: skip
def test_public_adt(name, event, patient_id, previous):
    result = read_message(public(name), Settings())
    assert (result.event, result.patient.patient_id, result.previous_id) == (
        event, patient_id, previous)  # fmt: skip


def test_public_siu_is_unsupported():
    error = refused(public("SIU_S12-NewAppointmentBooking.hl7"))
    assert (error.ack_code, error.code) == ("AR", "200")


def test_a_number_that_cannot_be_a_uid_in_zds_1_gives_way_to_a_derived_uid():
    message = build(base_orm(), {"ZDS": {1: "987861"}})
    step = read(message).steps[0]
    assert step.values["StudyInstanceUID"].startswith("2.25.") and step.study_uid_derived
    assert any("'987861' is not a UID" in n for n in message.notes)
    strict = read(build(base_orm(), {"ZDS": {1: "987861"}}), strict=True).steps[0]
    assert strict.values["StudyInstanceUID"] == "987861"


@pytest.mark.parametrize(
    ("written", "date", "time", "offset"),
    [("2025-06-12 10:15:00", "20250612", "101500", ""),
     ("2025-06-12T10:15:00+02:00", "20250612", "101500", "+0200"),
     ("20250612101500.123456", "20250612", "101500.1234", "")],
)  # fmt: skip
def test_iso_and_long_fraction_start_times_are_read_with_a_note(written, date, time, offset):
    message = build(base_orm(), {"TQ1": {7: written}})
    step = read(message).steps[0]
    values = step.values
    assert (values["ScheduledProcedureStepStartDate"], values["ScheduledProcedureStepStartTime"],
            values["TimezoneOffsetFromUTC"]) == (date, time, offset)  # fmt: skip
    assert any("read as the DTM" in n for n in message.notes)
    error = refused(build(base_orm(), {"TQ1": {7: written}}), strict=True)
    assert (error.code, error.location) == ("102", "TQ1^1^7")


def test_an_iso_birth_date_is_read_with_a_note():
    message = build(base_orm(), {"PID": {7: "1952-11-03"}})
    assert read(message).patient.birth_date == "19521103"
    assert any("read as 19521103" in n for n in message.notes)
