"""ProcedureStep -> worklist item: the field map value by value, every Type 1/2 key of PS3.4
Table K.6-1, names, lengths, charsets written and read back, ADT updates, and dcmtk's wlmscpfs
serving what is built."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from bridge.dicom.worklist_item import (
    REQUIRED_KEYS,
    SPS_REQUIRED_KEYS,
    apply_patient,
    build_item,
    missing_keys,
    set_status,
)
from bridge.hl7.errors import HL7Error
from bridge.hl7.message import parse_message
from bridge.hl7.order import Patient, read_message
from bridge.storage.store import WORKLIST_SOP_CLASS
from tests.hl7.test_order import CHARSET_NAMES, base_omi, base_orm, build, settings
from tests.peers import (
    findscu_answers,
    orthanc_worklists,
    require_public_samples,
    wlmscpfs,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def items(message, **kwargs) -> list[Dataset]:
    s = settings(**kwargs)
    result = read_message(message, s)
    return [build_item(message, result, step, s) for step in result.steps]


def item_of(changes: dict | None = None, drop=(), charset: str = "", **kwargs) -> Dataset:
    return items(build(base_orm(), changes, drop, charset), **kwargs)[0]


def save_and_read(ds: Dataset, path: Path) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = WORKLIST_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


# --- Table K.6-1 -------------------------------------------------------------------------------

K61_TYPE_1_AND_2 = {
    "AccessionNumber", "ReferringPhysicianName", "ReferencedStudySequence",
    "ReferencedPatientSequence", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "PatientWeight", "MedicalAlerts", "Allergies", "PregnancyStatus", "StudyInstanceUID",
    "RequestingPhysician", "RequestedProcedureID", "RequestedProcedurePriority", "AdmissionID",
    "PatientTransportArrangements", "CurrentPatientLocation", "PatientState", "SpecialNeeds",
    "ConfidentialityConstraintOnPatientDataDescription", "ScheduledProcedureStepSequence",
}  # fmt: skip
K61_SPS_TYPE_1_AND_2 = {
    "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime", "Modality", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepID", "ScheduledStationName", "ScheduledProcedureStepLocation",
    "PreMedication", "RequestedContrastAgent",
}  # fmt: skip


def test_required_key_tables_cover_k61():
    assert {k for k, t in REQUIRED_KEYS.items() if t in ("1", "2", "2C")} == K61_TYPE_1_AND_2
    assert {k for k, t in SPS_REQUIRED_KEYS.items() if t in ("1", "2", "2C")} == (
        K61_SPS_TYPE_1_AND_2
    )
    for keyword in (*REQUIRED_KEYS, *SPS_REQUIRED_KEYS):
        assert tag_for_keyword(keyword) is not None, keyword


def assert_complete(ds: Dataset) -> None:
    assert missing_keys(ds) == []
    sps = ds.ScheduledProcedureStepSequence
    assert len(sps) == 1
    for keys, where in ((REQUIRED_KEYS, ds), (SPS_REQUIRED_KEYS, sps[0])):
        for keyword, kind in keys.items():
            if kind in ("1", "2", "2C"):
                assert keyword in where, keyword
            if kind == "1":
                assert not where[keyword].is_empty, keyword
    assert ds.get("RequestedProcedureDescription") or ds.get("RequestedProcedureCodeSequence")
    assert sps[0].get("ScheduledProcedureStepDescription") or sps[0].get(
        "ScheduledProtocolCodeSequence"
    )


@pytest.mark.parametrize(
    "message",
    [build(base_orm()), build(base_omi()), build(base_orm("2.3.1"), drop=("TQ1", "ZDS"),
     changes={"ORC": {7: "^^^20250101"}}), build(base_orm(), {"OBR": {4: "^ONLY TEXT"}})],
)  # fmt: skip
def test_every_item_has_every_type_1_and_2_key(message):
    for ds in items(message):
        assert_complete(ds)


def test_type2_keys_are_empty_when_unknown():
    ds = item_of({"OBR": {12: "", 13: "", 30: ""}, "PV1": {8: ""}})
    for keyword in ("PatientState", "MedicalAlerts", "PatientTransportArrangements",
                    "ReferringPhysicianName", "PatientWeight", "Allergies", "PregnancyStatus",
                    "ReferencedStudySequence", "ReferencedPatientSequence"):  # fmt: skip
        assert keyword in ds and ds[keyword].is_empty, keyword
    sps = ds.ScheduledProcedureStepSequence[0]
    for keyword in ("ScheduledStationName", "ScheduledProcedureStepLocation", "PreMedication",
                    "RequestedContrastAgent"):  # fmt: skip
        assert keyword in sps and sps[keyword].is_empty, keyword
    assert "TimezoneOffsetFromUTC" not in ds  # optional and unknown: left out


def test_missing_keys_notices_a_missing_key():
    ds = item_of()
    del ds.PatientSex
    del ds.ScheduledProcedureStepSequence[0].Modality
    assert missing_keys(ds) == ["PatientSex", ">Modality"]


# --- The field map, value by value -------------------------------------------------------------


def test_orm_item_values():
    ds = item_of({"TQ1": {7: "20250612101500+0100", 9: "S"}})
    expected = {
        "AccessionNumber": "ACC100",
        "PatientID": "PAT001",
        "IssuerOfPatientID": "HOSP",
        "PatientBirthDate": "19800102",
        "PatientSex": "F",
        "PatientAddress": "1 Main St^^Springfield^^12345^US",
        "AdmissionID": "VISIT77",
        "StudyInstanceUID": "1.2.3.4.5.100",
        "RequestedProcedureID": "RP100",
        "RequestedProcedureDescription": "CT HEAD",
        "RequestedProcedurePriority": "STAT",
        "PlacerOrderNumberImagingServiceRequest": "PLC100",
        "FillerOrderNumberImagingServiceRequest": "FIL100",
        "MedicalAlerts": "PACEMAKER",
        "PatientState": "FASTING",
        "PatientTransportArrangements": "WALK",
        "ReasonForTheRequestedProcedure": "HEADACHE",
        "TimezoneOffsetFromUTC": "+0100",
    }
    for keyword, value in expected.items():
        assert ds[keyword].value == value, keyword
    assert str(ds.PatientName) == "DOE^JANE^Q^MRS^JR PHD"
    assert str(ds.ReferringPhysicianName) == "WELBY^MARCUS^A^DR^III MD"
    assert str(ds.RequestingPhysician) == "HOUSE^GREGORY^^DR"
    code = ds.RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "CTH", "L", "CT HEAD")  # fmt: skip
    sps = ds.ScheduledProcedureStepSequence[0]
    assert (sps.ScheduledProcedureStepStartDate, sps.ScheduledProcedureStepStartTime) == (
        "20250612", "101500")  # fmt: skip
    assert sps.Modality == "CT"
    assert sps.ScheduledProcedureStepID == "SPS100"
    assert sps.ScheduledStationAETitle == "DEFAULT_AE"
    assert str(sps.ScheduledPerformingPhysicianName) == "CHASE^ROBERT"
    assert sps.ScheduledProcedureStepDescription == "HEAD PROTOCOL"
    protocol = sps.ScheduledProtocolCodeSequence[0]
    assert (protocol.CodeValue, protocol.CodingSchemeDesignator) == ("P123", "99LOC")
    assert sps.ScheduledProcedureStepStatus == "SCHEDULED"
    assert "SpecificCharacterSet" not in ds  # pure ASCII: the default repertoire


def test_omi_item_values():
    first, = items(build(base_omi()))  # fmt: skip
    sps = first.ScheduledProcedureStepSequence[0]
    assert sps.ScheduledStationAETitle == ["MRAE1", "MRAE2"]  # multi-valued
    assert (sps.ScheduledStationName, sps.ScheduledProcedureStepLocation) == (
        "MRSTATION",
        "MR ROOM",
    )
    assert (sps.Modality, sps.ScheduledProcedureStepID) == ("MR", "SPS201")
    assert (first.AccessionNumber, first.RequestedProcedureID) == ("ACC200", "RP200")
    assert first.StudyInstanceUID == "1.2.3.4.5.200"
    assert sps.ScheduledProtocolCodeSequence[0].CodeValue == "PRT1"


def test_other_patient_ids_and_weight():
    segs = base_orm() + [("OBX", {3: "3141-9^Body weight^LN", 5: "81", 6: "kg"})]
    ds = items(build(segs, {"PID": {3: "A1^^^X~B2^^^Y"}}), primary_issuer="Y")[0]
    assert (ds.PatientID, ds.IssuerOfPatientID) == ("B2", "Y")
    other = ds.OtherPatientIDsSequence[0]
    assert (other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID) == ("A1", "X", "TEXT")
    assert float(ds.PatientWeight) == 81.0


def test_a_cancel_still_builds_a_complete_item_with_its_status():
    ds = item_of({"ORC": {1: "CA", 5: "CA"}})
    assert ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "CANCELED"


def test_description_stands_in_for_a_missing_protocol_code():
    ds = item_of({"OBR": {4: "CTH^CT HEAD^L"}}, protocol_code_source="alternate")
    sps = ds.ScheduledProcedureStepSequence[0]
    assert "ScheduledProtocolCodeSequence" not in sps  # 1C: absent rather than empty
    assert sps.ScheduledProcedureStepDescription == "CT HEAD"
    assert_complete(ds)


# --- Lengths and value rules -------------------------------------------------------------------


def test_overlong_value_is_102_at_its_hl7_field():
    with pytest.raises(HL7Error) as info:
        item_of({"OBR": {18: "A" * 17}})
    assert (info.value.code, info.value.location) == ("102", "OBR^1^18")
    assert "AccessionNumber" in info.value.text and "16" in info.value.text


def test_overlong_ae_title_from_ipc9():
    with pytest.raises(HL7Error) as info:
        items(build(base_omi(), {"IPC": {9: "OK~" + "B" * 17}}))
    assert (info.value.code, info.value.location) == ("102", "IPC^1^9")


def test_overlong_values_truncated_with_a_note():
    message = build(base_orm(), {"OBR": {18: "A" * 20, 13: "M" * 70}})
    s = settings(overlong_values="truncate")
    result = read_message(message, s)
    ds = build_item(message, result, result.steps[0], s)
    assert ds.AccessionNumber == "A" * 16
    assert ds.MedicalAlerts == "M" * 64
    assert any("OBR^1^18" in n and "AccessionNumber" in n for n in message.notes)
    assert any("OBR^1^13" in n for n in message.notes)


def test_descriptive_values_are_cut_and_identifiers_refused_by_default():
    address = "RUE MARIE CURIE^BRUXELLES^^74850^99100" + "x" * 60  # 94+ characters
    message = build(base_orm(), {"PID": {11: address}, "OBR": {13: "M" * 70}})
    s = settings()
    result = read_message(message, s)
    ds = build_item(message, result, result.steps[0], s)
    assert len(ds.PatientAddress) == 64 and ds.MedicalAlerts == "M" * 64
    assert any("PatientAddress cut from" in n for n in message.notes)
    for changes, location in (({"OBR": {18: "A" * 17}}, "OBR^1^18"),
                              ({"OBR": {20: "S" * 24}}, "OBR^1^20")):  # fmt: skip
        with pytest.raises(HL7Error) as info:
            item_of(changes)
        assert info.value.location == location
    with pytest.raises(HL7Error):  # strict: descriptions too
        item_of({"PID": {11: address}}, strict=True)


def test_a_bad_study_uid_is_refused_even_when_truncating():
    with pytest.raises(HL7Error) as info:
        item_of({"ZDS": {1: "1.2.03.x"}}, overlong_values="truncate")
    assert (info.value.code, info.value.location) == ("102", "ZDS^1^1")


def test_modality_is_upper_case_and_checked():
    assert item_of({"OBR": {24: "mr"}}).ScheduledProcedureStepSequence[0].Modality == "MR"
    with pytest.raises(HL7Error) as info:
        item_of({"OBR": {24: "C-T"}})
    assert (info.value.code, info.value.location) == ("102", "OBR^1^24")
    assert "Modality" in info.value.text


def test_backslash_is_not_a_value_separator_in_text():
    ds = item_of({"OBR": {13: "A\\E\\B"}})
    assert ds.MedicalAlerts == "A/B"


# --- Charsets: written and read back ------------------------------------------------------------

DICOM_CHARSETS = {
    "8859/1": ("ISO_IR 100", "latin-1"),
    "8859/2": ("ISO_IR 101", "iso8859-2"),
    "8859/5": ("ISO_IR 144", "iso8859-5"),
    "8859/7": ("ISO_IR 126", "iso8859-7"),
    "8859/15": ("ISO_IR 203", "iso8859-15"),
    "UNICODE UTF-8": ("ISO_IR 192", "utf-8"),
}


@pytest.mark.parametrize(("charset", "name", "text"), CHARSET_NAMES)
def test_accented_items_round_trip_through_a_file(tmp_path, charset, name, text):
    ds = item_of({"PID": {5: name}, "OBR": {13: text}}, charset=charset)
    dicom_charset, codec = DICOM_CHARSETS[charset]
    assert ds.SpecificCharacterSet == dicom_charset
    back = save_and_read(ds, tmp_path / "item.wl")
    assert back.SpecificCharacterSet == dicom_charset
    assert str(back.PatientName) == name
    assert back.MedicalAlerts == text
    raw = (tmp_path / "item.wl").read_bytes()
    assert name.encode(codec) in raw  # written in the declared charset, byte for byte


@pytest.mark.parametrize("charset", ["8859/1", "UNICODE UTF-8"])
def test_ascii_values_need_no_charset(tmp_path, charset):
    ds = item_of(charset=charset)
    assert "SpecificCharacterSet" not in ds
    assert save_and_read(ds, tmp_path / "a.wl").PatientID == "PAT001"


# --- ADT updates and status ---------------------------------------------------------------------


def test_apply_patient_switches_to_utf8_when_the_charset_cannot_carry_the_name(tmp_path):
    ds = item_of({"PID": {5: "MÜLLER^Jürgen"}, "OBR": {13: "Kontrastmittel: Ödem"}},
                 charset="8859/1")  # fmt: skip
    stored = save_and_read(ds, tmp_path / "a.wl")
    assert stored.SpecificCharacterSet == "ISO_IR 100"
    message = build(base_orm(), {"PID": {5: "ИВАНОВ^Пётр"}}, charset="8859/5")
    new = Patient(patient_id="NEW1", issuer="HOSP", name="ИВАНОВ^Пётр", sex="M",
                  birth_date="19700101", other_ids=[("OLD1", "HOSP")])  # fmt: skip
    apply_patient(stored, new, message)
    assert stored.SpecificCharacterSet == "ISO_IR 192"  # neither 8859/1 nor 8859/5 carries both
    back = save_and_read(stored, tmp_path / "b.wl")
    assert str(back.PatientName) == "ИВАНОВ^Пётр"
    assert (back.PatientID, back.PatientSex, back.PatientBirthDate) == ("NEW1", "M", "19700101")
    assert back.OtherPatientIDsSequence[0].PatientID == "OLD1"
    assert back.MedicalAlerts == "Kontrastmittel: Ödem"
    assert back.AccessionNumber == "ACC100"  # order-level values untouched


def test_apply_patient_uses_the_message_charset_when_it_fits(tmp_path):
    stored = save_and_read(item_of(), tmp_path / "a.wl")
    assert "SpecificCharacterSet" not in stored
    message = build(base_orm(), {"PID": {5: "DURAND^Élodie"}}, charset="8859/1")
    apply_patient(stored, Patient(patient_id="PAT001", name="DURAND^Élodie"), message)
    assert stored.SpecificCharacterSet == "ISO_IR 100"
    assert str(save_and_read(stored, tmp_path / "b.wl").PatientName) == "DURAND^Élodie"


def test_apply_patient_keeps_a_charset_that_fits(tmp_path):
    ds = item_of({"PID": {5: "NOVÁK^Jan"}}, charset="8859/2")
    stored = save_and_read(ds, tmp_path / "a.wl")
    message = build(base_orm(), {"PID": {5: "DVOŘÁK^Jan"}}, charset="UNICODE UTF-8")
    apply_patient(stored, Patient(patient_id="PAT001", name="DVOŘÁK^Jan"), message)
    assert stored.SpecificCharacterSet == "ISO_IR 101"
    assert "OtherPatientIDsSequence" not in stored


def test_set_status():
    ds = item_of()
    set_status(ds, "STARTED")
    assert ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "STARTED"
    with pytest.raises(ValueError):
        set_status(ds, "DONE")


# --- Samples and peers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.hl7")))
def test_our_samples_build_complete_items(tmp_path, name):
    message = parse_message((SAMPLES / name).read_bytes())
    for ds in items(message):
        assert_complete(ds)
        back = save_and_read(ds, tmp_path / "x.wl")
        assert str(back.PatientName) == str(ds.PatientName)


def test_public_placeholder_sample_under_both_length_policies():
    message = parse_message((require_public_samples() / "OMI_O23.hl7").read_bytes())
    with pytest.raises(HL7Error) as info:
        items(message, strict=True)  # "ScheduledStationName" is 20 characters, SH allows 16
    assert (info.value.code, info.value.location) == ("102", "IPC^1^7")
    assert "ScheduledStationName" in info.value.text
    for kwargs in ({"overlong_values": "truncate", "strict": True}, {}):  # a name: cut
        ds = items(message, **kwargs)[0]
        assert ds.ScheduledProcedureStepSequence[0].ScheduledStationName == "ScheduledStation"
        assert_complete(ds)


def test_vrs_of_written_keys_match_the_dictionary():
    ds = item_of()
    for elem in ds.iterall():
        if elem.keyword:
            assert elem.VR == dictionary_VR(tag_for_keyword(elem.keyword)), elem.keyword


def test_wlmscpfs_serves_the_items(tmp_path):
    folder = tmp_path / "db" / "WLQUERY"
    folder.mkdir(parents=True)
    (folder / "lockfile").touch()
    for n, message in enumerate([build(base_orm()), build(base_omi()),
                                 build(base_orm(), {"PID": {5: "MÜLLER^Jürgen"}},
                                       charset="8859/1")]):  # fmt: skip
        for m, ds in enumerate(items(message)):
            save_and_read(ds, folder / f"item{n}_{m}.wl")
    with wlmscpfs(tmp_path / "db") as port:
        answers = findscu_answers(
            port,
            ["PatientName", "PatientID", "AccessionNumber",
             "ScheduledProcedureStepSequence[0].Modality",
             "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
             "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID"],
            called_aet="WLQUERY", out_dir=tmp_path / "answers",
        )  # fmt: skip
    # every file is served: wlmscpfs skips incomplete ones without a word
    assert len(answers) == 3
    assert sorted(a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
                  for a in answers) == ["SPS100", "SPS100", "SPS201"]  # fmt: skip
    assert "MÜLLER^Jürgen" in {str(a.PatientName) for a in answers}


def test_orthanc_serves_the_items(tmp_path):
    folder = tmp_path / "worklists"
    folder.mkdir()
    accented = build(base_orm(), {"PID": {5: "MÜLLER^Jürgen"}, "OBR": {18: "ACC300"}},
                     charset="8859/1")  # fmt: skip
    for n, message in enumerate([build(base_orm()), build(base_omi()), accented]):
        for m, ds in enumerate(items(message)):
            save_and_read(ds, folder / f"item{n}_{m}.wl")
    with orthanc_worklists(folder, tmp_path) as port:
        answers = findscu_answers(
            port,
            ["SpecificCharacterSet=ISO_IR 192", "PatientName", "PatientID", "AccessionNumber",
             "ScheduledProcedureStepSequence[0].Modality",
             "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID"],
            called_aet="ORTHANC", out_dir=tmp_path / "answers",
        )  # fmt: skip
    assert sorted(a.AccessionNumber for a in answers) == ["ACC100", "ACC200", "ACC300"]
    assert "MÜLLER^Jürgen" in {str(a.PatientName) for a in answers}


def test_control_characters_become_spaces_outside_text_vrs():
    message = build(base_orm(), {"PID": {5: "DOE\tX^JANE"}, "OBR": {13: "Line one\\.br\\Line two"}})
    [item] = items(message)
    assert str(item.PatientName) == "DOE X^JANE"
    assert item.MedicalAlerts == "Line one  Line two"
    assert any("control characters in PatientName" in n for n in message.notes)


def test_invisible_characters_are_removed_from_identifiers_and_names():
    # RLO (U+202E), ZWSP (U+200B), a line separator, a C1 CSI: what disguises a value on screen.
    message = build(
        base_orm(),
        {"PID": {5: "DOE\u202eEOD^JA\u200bNE"}, "OBR": {18: "ACC\u200b1\u2028\x9b2"}},
        charset="UNICODE UTF-8",
    )
    [item] = items(message)
    assert str(item.PatientName) == "DOEEOD^JANE"
    assert item.AccessionNumber == "ACC1  2"
    values = str(item.PatientName) + item.AccessionNumber
    assert all(c.isprintable() for c in values)
    assert any("invisible removed" in n for n in message.notes)
