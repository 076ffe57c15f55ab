"""The field map as data: the attribute registry, built-in rows, a site's [mapping] and
[code-tables], `wlbridge mapping`, and what C-FIND serves with them (real server, findscu and
pynetdicom as the modality)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hl7apy import load_reference

from bridge.app.cli import main
from bridge.app.settings_checks import load_settings
from bridge.config import Settings
from bridge.core.attributes import ATTRIBUTES, ORDER, SPS_SEQUENCE, by_level, find
from bridge.dicom import matching
from bridge.dicom.worklist_item import REQUIRED_KEYS, SPS_REQUIRED_KEYS, build_item
from bridge.hl7.mapping import SEGMENT_FIELDS, check_mapping, default_rows, format_toml
from bridge.hl7.message import parse_message
from bridge.hl7.order import DEFAULT_ROWS, ORDER_FIELDS, field_rows, read_message
from bridge.net.client import MLLPClient, worklist_query
from bridge.net.client import find as cfind
from tests.conftest import ROOT, SAMPLES, start_bridge
from tests.messages import orm
from tests.peers import findscu_answers, free_port

SITE = """
[mapping]
CurrentPatientLocation = "PV1-3"
"ScheduledProcedureStepSequence.Modality" = ["OBR-24", "OBR-4.1"]

[code-tables.Modality]
RX = "CR"
NMR = "MR"
"""


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return path


def item_of(text: str, settings: Settings):
    message = parse_message(text.encode("utf-8"))
    intent = read_message(message, settings)
    [step] = intent.steps
    return build_item(message, intent, step, settings)


# --- The registry ------------------------------------------------------------------------------


def test_matching_checks_the_same_k61_keys_as_the_registry():
    # matching.py keeps its own tag tables (the C-FIND side); they must say what the registry says
    def required(level):
        return {a.tag: int(a.type) for a in by_level(level) if a.type in ("1", "2")}

    assert matching.REQUIRED_TOP == required("top")
    assert matching.REQUIRED_SPS == required("sps")
    one_of = {
        (ATTRIBUTES["RequestedProcedureDescription"].tag, ATTRIBUTES[k].tag)
        for k in ("RequestedProcedureCodeSequence",)
    }
    assert set(matching.ONE_OF_TOP) == one_of
    assert set(matching.ONE_OF_SPS) == {
        (
            ATTRIBUTES["ScheduledProcedureStepDescription"].tag,
            ATTRIBUTES["ScheduledProtocolCodeSequence"].tag,
        )
    }


def test_worklist_item_key_lists_come_from_the_registry():
    assert REQUIRED_KEYS == {a.keyword: a.type for a in by_level("top") if a.type != "3"}
    assert SPS_REQUIRED_KEYS == {a.keyword: a.type for a in by_level("sps") if a.type != "3"}
    assert ATTRIBUTES["CurrentPatientLocation"].vr == "LO"
    assert ATTRIBUTES["CurrentPatientLocation"].max_length == 64
    assert ATTRIBUTES["Modality"].tag == 0x00080060 and ATTRIBUTES["Modality"].level == "sps"


def test_a_keyword_is_found_bare_or_with_its_sequence_only_where_it_is():
    assert find("Modality") is find(f"{SPS_SEQUENCE}.Modality") is ATTRIBUTES["Modality"]
    assert find(f"{SPS_SEQUENCE}.AccessionNumber") is None  # a top-level attribute
    assert find("ReferencedStudySequence.Modality") is None
    assert find("CodeValue") is None  # inside code items only
    assert find("Modalty") is None


def test_every_built_in_row_names_a_mappable_attribute_and_the_registry_refuses_others():
    assert {row.keyword for row in DEFAULT_ROWS} == {row[0] for row in ORDER_FIELDS}
    assert all(ATTRIBUTES[row.keyword].source == ORDER for row in DEFAULT_ROWS)
    with pytest.raises(ValueError, match="Modalty"):
        default_rows((("Modalty", "OBR-24", "=", "upper"),))
    with pytest.raises(ValueError, match="PatientName"):
        default_rows((("PatientName", "PID-5", "=", "text"),))


def test_every_value_the_order_reader_produces_is_an_attribute_of_the_item():
    settings = Settings()
    for path in sorted(SAMPLES.glob("*.hl7")):
        message = parse_message(path.read_bytes())
        intent = read_message(message, settings)
        for step in getattr(intent, "steps", []):
            assert set(step.values) <= set(ATTRIBUTES), path.name


def test_segment_field_counts_are_those_of_hl7_v251():
    for segment, count in SEGMENT_FIELDS.items():
        if segment == "ZDS":
            continue  # IHE's Z-segment: not in hl7apy
        fields = load_reference(segment, "Segment", "2.5.1")[1]
        assert count == max(int(child[0].split("_")[1]) for child in fields), segment


# --- Built-in rows -----------------------------------------------------------------------------


def test_pv1_3_reaches_current_patient_location_by_default():
    item = item_of((SAMPLES / "orm_o01_v251_nw.hl7").read_text("utf-8"), Settings())
    assert item.CurrentPatientLocation == "WARD4"  # PV1-3.1, the point of care
    item = item_of(orm(), Settings())
    assert item.CurrentPatientLocation == "RAD"


def test_without_pv1_3_current_patient_location_is_present_and_empty():
    text = orm().replace("|O|RAD^^^HOSP|", "|O||")
    item = item_of(text, Settings())
    assert "CurrentPatientLocation" in item and item.CurrentPatientLocation in ("", None)


# --- A site's rows and code tables -------------------------------------------------------------


def test_a_site_row_replaces_the_built_in_row_and_a_list_falls_back_in_order(tmp_path):
    settings = load_settings(config(tmp_path, SITE))
    assert item_of(orm(modality="CT"), settings).ScheduledProcedureStepSequence[0].Modality == "CT"
    # OBR-24 empty: OBR-4.1 is the next source (built in, an empty OBR-24 is AE 101)
    text = orm(modality="", procedure="MR^MR brain^LOCAL")
    assert item_of(text, settings).ScheduledProcedureStepSequence[0].Modality == "MR"
    with pytest.raises(Exception, match="modality"):
        item_of(text, Settings())


def test_a_code_table_translates_listed_values_and_passes_the_others(tmp_path):
    settings = load_settings(config(tmp_path, SITE))

    def modality(value: str) -> str:
        return item_of(orm(modality=value), settings).ScheduledProcedureStepSequence[0].Modality

    assert modality("RX") == "CR"
    assert modality("nmr") == "MR"  # upper-cased first, as the built-in row reads OBR-24
    assert modality("US") == "US"


def test_star_is_the_value_for_anything_unlisted(tmp_path):
    text = SITE + '"*" = "OT"\n'
    settings = load_settings(config(tmp_path, text))
    assert item_of(orm(modality="RAD"), settings).ScheduledProcedureStepSequence[0].Modality == "OT"
    assert item_of(orm(modality="RX"), settings).ScheduledProcedureStepSequence[0].Modality == "CR"


def test_bare_keyword_and_sequence_path_mean_the_same_attribute(tmp_path):
    bare = load_settings(config(tmp_path, '[mapping]\nModality = "OBR-4.1"\n'))
    path = load_settings(
        config(tmp_path, '[mapping]\n"ScheduledProcedureStepSequence.Modality" = "OBR-4.1"\n')
    )
    assert field_rows(bare) == field_rows(path)
    tables = load_settings(
        config(tmp_path, '[code-tables."ScheduledProcedureStepSequence.Modality"]\nCT = "MR"\n')
    )
    assert item_of(orm(), tables).ScheduledProcedureStepSequence[0].Modality == "MR"


def test_an_unquoted_sequence_path_is_the_same_key(tmp_path):
    # TOML reads ScheduledProcedureStepSequence.Modality without quotes as a nested table
    text = (
        '[mapping]\nScheduledProcedureStepSequence.Modality = "OBR-4.1"\n'
        '[code-tables.ScheduledProcedureStepSequence.Modality]\nMR = "OT"\n'
    )
    settings = load_settings(config(tmp_path, text))
    item = item_of(orm(procedure="MR^MR brain^LOCAL"), settings)
    assert item.ScheduledProcedureStepSequence[0].Modality == "OT"


def test_a_family_table_sets_orm_and_omi_sources_apart(tmp_path):
    settings = load_settings(
        config(tmp_path, '[mapping]\nCurrentPatientLocation = { ORM = "PV1-3.4" }\n')
    )
    [row] = [r for r in field_rows(settings) if r.keyword == "CurrentPatientLocation"]
    assert row.orm == ("PV1-3.4",) and row.omi == ("PV1-3",)  # OMI keeps the built-in row
    assert item_of(orm(), settings).CurrentPatientLocation == "HOSP"


def with_field(text: str, segment: str, field_no: int, value: str) -> str:
    lines = text.split("\r")
    for n, line in enumerate(lines):
        if line.startswith(segment + "|"):
            fields = line.split("|")
            fields += [""] * (field_no + 1 - len(fields))
            fields[field_no] = value
            lines[n] = "|".join(fields)
    return "\r".join(lines)


def test_a_new_row_for_an_attribute_without_a_built_in_one(tmp_path):
    settings = load_settings(config(tmp_path, '[mapping]\nSpecialNeeds = "OBR-31"\n'))
    text = with_field(orm(), "OBR", 31, "Claustrophobic")
    assert item_of(text, settings).SpecialNeeds == "Claustrophobic"
    assert item_of(text, Settings()).SpecialNeeds in ("", None)  # Type 2: present, empty


def test_an_optional_attribute_is_written_only_when_its_row_finds_a_value(tmp_path):
    settings = load_settings(
        config(
            tmp_path,
            '[mapping]\nRequestingService = "PV1-3"\nRequestedProcedureComments = "OBR-13"\n',
        )
    )
    item = item_of(with_field(orm(), "OBR", 13, "Pacemaker"), settings)
    assert item.RequestingService == "RAD" and item.RequestedProcedureComments == "Pacemaker"
    item = item_of(orm(), settings)
    assert "RequestedProcedureComments" not in item  # Type 3: absent rather than empty
    assert "RequestingService" not in item_of(orm(), Settings())


@pytest.mark.parametrize(
    ("text", "setting", "says"),
    [
        ('[mapping]\nModalty = "OBR-24"\n', "mapping.Modalty", "not an attribute"),
        ('[mapping]\nModality = "OBX-24"\n', "mapping.Modality", "segment OBX"),
        ('[mapping]\nModality = "OBR-99"\n', "mapping.Modality", "OBR has 50 fields"),
        ('[mapping]\nModality = "OBR24"\n', "mapping.Modality", "not an HL7 location"),
        ("[mapping]\nModality = 24\n", "mapping.Modality", "not an HL7 location"),
        ('[mapping]\nPatientName = "PID-5"\n', "mapping.PatientName", "patient rules"),
        (
            '[mapping]\nScheduledProcedureStepStartTime = "TQ1-7"\n',
            "mapping.ScheduledProcedureStepStartTime",
            "set by the bridge",
        ),
        ('[mapping]\nModality = { OMG = "OBR-24" }\n', "mapping.Modality", "message family"),
        (
            '[mapping]\nModality = "OBR-24"\n"ScheduledProcedureStepSequence.Modality" = "IPC-5"\n',
            "mapping.ScheduledProcedureStepSequence.Modality",
            "already mapped",
        ),
        ('[code-tables.Modalit]\nRX = "CR"\n', "code-tables.Modalit", "not an attribute"),
        ('[code-tables.Modality]\nRX = "cr"\n', "code-tables.Modality.RX", "code string"),
        ('[code-tables.Modality]\nRX = "CR" \nNM = 3\n', "code-tables.Modality.NM", "string"),
        (
            '[code-tables.ScheduledProcedureStepStartDate]\nX = "Y"\n',
            "code-tables.ScheduledProcedureStepStartDate",
            "not a single code",
        ),
        ('code-tables = { Modality = "CR" }\n', "code-tables.Modality", "table of values"),
        ('mapping = "OBR-24"\n', "mapping", "mapping"),  # the type check names it
    ],
)
def test_a_mapping_mistake_is_a_sentence_naming_the_setting(tmp_path, capsys, text, setting, says):
    path = config(tmp_path, text)
    with pytest.raises(ValueError) as raised:
        load_settings(path)
    assert setting in str(raised.value) and says in str(raised.value), raised.value
    # the command that prints the map refuses it the same way, without a traceback
    assert main(["mapping", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and setting in err


def test_a_mapping_mistake_stops_the_server_before_it_listens(tmp_path):
    path = config(tmp_path, '[mapping]\nCurrentPatientLocation = "PV9-3"\n')
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(path),
         "--mllp-port", str(free_port()), "--dicom-port", str(free_port()),
         "--worklist-dir", str(tmp_path / "wl"), "--translation-log", str(tmp_path / "t.log")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "mapping.CurrentPatientLocation" in result.stderr and "PV9" in result.stderr
    assert "Traceback" not in result.stderr and "wlbridge serving" not in result.stdout


def test_check_mapping_accepts_the_documented_example():
    data = tomllib.loads(SITE)
    check_mapping(data["mapping"], data["code-tables"])


# --- wlbridge mapping and docs/mapping.md ------------------------------------------------------


def test_the_mapping_command_prints_the_rows_in_effect_as_a_config_that_loads_back(
    tmp_path, capsys
):
    site = config(tmp_path, SITE)
    assert main(["mapping", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert '"ScheduledProcedureStepSequence.Modality" = ["OBR-24", "OBR-4.1"]' in out
    assert 'CurrentPatientLocation = "PV1-3"' in out
    assert 'AccessionNumber = { ORM = "OBR-18", OMI = "IPC-1" }' in out
    assert re.search(r'\[code-tables\."ScheduledProcedureStepSequence.Modality"\]\nRX = "CR"', out)
    # what it prints is a config giving the same rows
    printed = tmp_path / "printed.toml"
    printed.write_text(out, encoding="utf-8")

    def plain(rows):
        return [(r.keyword, r.orm, r.omi, r.kind, r.codes) for r in rows]

    again = load_settings(printed)
    assert plain(field_rows(again)) == plain(field_rows(load_settings(site)))


def test_docs_show_the_built_in_rows_as_the_mapping_command_prints_them():
    docs = (ROOT / "docs" / "mapping.md").read_text("utf-8")
    for line in format_toml(DEFAULT_ROWS).splitlines():
        assert line in docs, line


# --- What C-FIND serves ------------------------------------------------------------------------


def _query() -> object:
    query = worklist_query()
    query.CurrentPatientLocation = ""
    return query


def _send(bridge, *messages: str) -> None:
    with MLLPClient("127.0.0.1", bridge.mllp_port, timeout=30) as client:
        for text in messages:
            assert b"MSA|AA|" in client.send(text.encode("utf-8"))


def test_cfind_serves_what_the_site_mapping_and_code_table_make(tmp_path):
    running = start_bridge(tmp_path, "--config", str(config(tmp_path, SITE)))
    try:
        _send(
            running,
            orm(control_id="M1", accession="A1", modality="RX"),
            orm(
                control_id="M2",
                accession="A2",
                modality="",
                procedure="NMR^NMR knee^LOCAL",
                placer="P2",
                filler="F2",
                sps_id="S2",
            ),  # fmt: skip
        )
        status, answers = cfind("127.0.0.1", running.dicom_port, _query(), running.ae_title)
        assert status == 0
        by_accession = {a.AccessionNumber: a for a in answers}
        assert by_accession["A1"].ScheduledProcedureStepSequence[0].Modality == "CR"
        assert by_accession["A2"].ScheduledProcedureStepSequence[0].Modality == "MR"
        assert {a.CurrentPatientLocation for a in answers} == {"RAD"}
        # a modality asking for its own modality finds the translated value (findscu)
        [answer] = findscu_answers(
            running.dicom_port,
            [
                "AccessionNumber",
                "CurrentPatientLocation",
                "ScheduledProcedureStepSequence[0].Modality=MR",
            ],  # fmt: skip
            called_aet=running.ae_title,
            out_dir=tmp_path / "answers",
        )
        assert answer.AccessionNumber == "A2" and answer.CurrentPatientLocation == "RAD"
    finally:
        assert running.stop() == 0, "".join(running.stderr_lines)


def test_cfind_serves_pv1_3_as_current_patient_location_by_default(bridge, tmp_path):
    _send(bridge, (SAMPLES / "orm_o01_v251_nw.hl7").read_text("utf-8"))
    [answer] = findscu_answers(
        bridge.dicom_port,
        ["PatientID", "CurrentPatientLocation", "ScheduledProcedureStepSequence[0].Modality=MR"],
        called_aet=bridge.ae_title,
        out_dir=tmp_path / "answers",
    )
    assert answer.CurrentPatientLocation == "WARD4"
