"""Matching rules of PS3.4 C.2.2.2 on Modality Worklist items, and the answers built."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom import Dataset

from bench.worklist_items import make_item, query, write_item
from bridge.dicom.matching import (
    GUARD_EVERY,
    AnswerEncoder,
    QueryError,
    SearchStopped,
    compile_query,
    missing_required,
    record_from_dataset,
    wildcard_matcher,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def stored(ds: Dataset):
    """The record of `ds` after a real encode/decode, as the index would hold it."""
    buf = io.BytesIO()
    write_item_to(buf, ds)
    buf.seek(0)
    return record_from_dataset(pydicom.dcmread(buf))


def write_item_to(buf, ds):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.save_as(buf, enforce_file_format=True)


def matches(q: Dataset, rec, **kwargs) -> bool:
    return compile_query(q, **kwargs).matches(rec)


@pytest.fixture(scope="module")
def item():
    return stored(
        make_item("ACC1", patient_id="PID1", patient_name="Müller^Hans",
                  station_aets=["CT1", "CT2"], date="20240105", time="233000")
    )  # fmt: skip


def test_single_value_is_exact_and_case_sensitive_outside_pn(item):
    assert matches(query(PatientID="PID1"), item)
    assert not matches(query(PatientID="pid1"), item)
    assert not matches(query(PatientID="PID"), item)
    assert matches(query(AccessionNumber="ACC1"), item)
    assert not matches(query(AccessionNumber="ACC2"), item)


def test_universal_matching_empty_and_lone_star(item):
    assert matches(query(PatientID="", PatientName=""), item)
    assert matches(query(PatientID="*"), item)
    assert matches(query(sps={"ScheduledProcedureStepStartDate": "*"}), item)


@pytest.mark.parametrize(
    "keys",
    [
        {"PatientID": "PID*"},
        {"PatientID": "P?D1"},
        {"PatientID": "*1"},
        {"sps": {"ScheduledStationAETitle": "CT*"}},
        {"sps": {"Modality": "C?"}},
        {"sps": {"ScheduledProcedureStepDescription": "*STEP"}},
    ],
)
def test_wildcards_on_ids_ae_titles_and_modality(item, keys):
    sps = keys.pop("sps", None)
    assert matches(query(sps=sps, **keys), item)


@pytest.mark.parametrize(
    "keys",
    [{"PatientID": "X*"}, {"sps": {"ScheduledStationAETitle": "MR*"}}, {"sps": {"Modality": "M?"}}],
)
def test_wildcards_that_do_not_match(item, keys):
    sps = keys.pop("sps", None)
    assert not matches(query(sps=sps, **keys), item)


@pytest.mark.parametrize(
    "keys",
    [
        {"StudyInstanceUID": "1.2.*"},
        {"sps": {"ScheduledProcedureStepStartDate": "2024*"}},
        {"sps": {"ScheduledProcedureStepStartTime": "23?000"}},
        {"sps": {"ScheduledProcedureStepStartDate": "2024-01-05"}},  # ISO form: not a DA
        {"sps": {"ScheduledProcedureStepStartDate": "20241305x"}},
    ],
)
def test_wildcards_and_bad_values_on_da_tm_ui_are_refused(keys):
    sps = keys.pop("sps", None)
    with pytest.raises(QueryError):
        compile_query(query(sps=sps, **keys))


def test_query_on_study_uid_or_sps_id_does_not_return_everything(item):
    other = stored(make_item("ACC2"))
    q = query(StudyInstanceUID=item.get(0x0020000D))
    assert matches(q, item) and not matches(q, other)
    q = query(sps={"ScheduledProcedureStepID": "SPSACC2"})
    assert matches(q, other) and not matches(q, item)


def test_uid_list_matching(item):
    uid = item.get(0x0020000D)
    assert matches(query(StudyInstanceUID=["1.2.3", uid]), item)
    assert not matches(query(StudyInstanceUID=["1.2.3", "1.2.4"]), item)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("20240105", True),
        ("20240104", False),
        ("20240101-20240105", True),
        ("20240106-20240110", False),
        ("20240105-", True),
        ("20240106-", False),
        ("-20240105", True),
        ("-20240104", False),
    ],
)
def test_date_single_and_range(item, value, expected):
    assert matches(query(sps={"ScheduledProcedureStepStartDate": value}), item) is expected


@pytest.mark.parametrize(
    "value, expected",
    [("2330", True), ("23", True), ("2331", False), ("2300-2359", True), ("-2329", False),
     ("2330-", True), ("2200-0100", True), ("0100-2200", False)],
)  # fmt: skip
def test_time_single_range_and_wrap_across_midnight(item, value, expected):
    assert matches(query(sps={"ScheduledProcedureStepStartTime": value}), item) is expected


def test_combined_date_time_range_across_midnight():
    def at(date, time):
        return stored(make_item("X", date=date, time=time))

    q = compile_query(query(sps={"ScheduledProcedureStepStartDate": "20240105-20240106",
                                 "ScheduledProcedureStepStartTime": "2200-0200"}))  # fmt: skip
    assert q.matches(at("20240105", "230000"))
    assert q.matches(at("20240106", "013000"))
    assert not q.matches(at("20240105", "013000"))  # before the start instant
    assert not q.matches(at("20240106", "230000"))  # after the end instant
    assert q.hints.date_range == ("20240105", "20240106")
    # Open end: everything from the 5th at 22:00 on.
    q = compile_query(query(sps={"ScheduledProcedureStepStartDate": "20240105-",
                                 "ScheduledProcedureStepStartTime": "2200-"}))  # fmt: skip
    assert q.matches(at("20240107", "010000")) and not q.matches(at("20240105", "210000"))


def test_one_date_with_a_time_range_across_midnight_is_that_night():
    def at(date, time):
        return stored(make_item("X", date=date, time=time))

    q = compile_query(query(sps={"ScheduledProcedureStepStartDate": "20240105",
                                 "ScheduledProcedureStepStartTime": "2200-0200"}))  # fmt: skip
    assert q.matches(at("20240105", "230000"))
    assert q.matches(at("20240106", "013000"))
    assert not q.matches(at("20240105", "013000"))
    assert not q.matches(at("20240106", "030000"))
    assert q.hints.date_range == ("20240105", "20240106")


def test_multi_valued_station_ae_matches_on_any_value(item):
    assert matches(query(sps={"ScheduledStationAETitle": "CT2"}), item)
    assert matches(query(sps={"ScheduledStationAETitle": "CT1"}), item)
    assert not matches(query(sps={"ScheduledStationAETitle": "CT3"}), item)


def test_person_names_case_insensitive_by_default(item):
    assert matches(query(PatientName="MÜLLER^HANS"), item)
    assert matches(query(PatientName="müller*"), item)
    assert not matches(query(PatientName="MÜLLER^HANS"), item, pn_case_insensitive=False)
    assert matches(query(PatientName="Müller^Hans"), item, pn_case_insensitive=False)
    assert not matches(query(PatientName="MULLER^HANS"), item)  # accents are significant


@pytest.mark.parametrize(
    "item_charset, query_charset, name, asked",
    [
        ("ISO_IR 100", "ISO_IR 192", "Gaël^Zoë", "GAËL^ZOË"),
        ("ISO_IR 192", "ISO_IR 100", "Gaël^Zoë", "gaël^zoë"),
        ("ISO_IR 192", "ISO_IR 192", "Dvořák^Antonín", "DVOŘÁK^*"),
        ("ISO_IR 100", "ISO_IR 100", "Ødegård^Åse", "ødegård^åse"),
    ],
)
def test_accented_names_across_character_sets(item_charset, query_charset, name, asked):
    rec = stored(make_item("X", patient_name=name, charset=item_charset))
    cq = compile_query(stored_query(query(PatientName=asked, charset=query_charset)))
    assert cq.matches(rec)
    assert not compile_query(
        stored_query(query(PatientName="X" + asked, charset=query_charset))
    ).matches(rec)
    answer = cq.answer(rec)
    assert answer.SpecificCharacterSet == item_charset
    # The answer encodes in the item's character set and decodes back to the same name.
    assert str(stored_query(answer).PatientName) == name


def stored_query(q: Dataset) -> Dataset:
    """The query as an SCP receives it: encoded with its character set, then decoded."""
    buf = io.BytesIO()
    write_item_to(buf, q)
    buf.seek(0)
    return pydicom.dcmread(buf)


def test_multi_component_person_names():
    rec = stored(make_item("X", patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
                           charset="ISO_IR 192"))  # fmt: skip
    assert matches(query(PatientName="YAMADA^TAROU"), rec)
    assert matches(query(PatientName="山田^太郎"), rec)  # any group when the query has no "="
    assert matches(query(PatientName="=山田*"), rec)  # the ideographic group only
    assert not matches(query(PatientName="=やまだ^たろう"), rec)  # phonetic name, wrong group
    assert matches(query(PatientName="Yamada*=山田^太郎"), rec)
    assert not matches(query(PatientName="SMITH=山田^太郎"), rec)


def test_padding_and_trailing_components_are_not_significant():
    rec = stored(make_item("X", patient_name="DOE^JOHN^^", station_aets="CT1 "))
    assert matches(query(PatientName="DOE^JOHN"), rec)
    assert matches(query(PatientName="DOE^JOHN^"), rec)
    assert matches(query(sps={"ScheduledStationAETitle": "CT1 "}), rec)
    assert matches(query(sps={"ScheduledStationAETitle": "CT1"}), rec)


def two_step_item():
    ds = make_item("X", modality="CT", station_aets="CT1", date="20240105")
    step2 = copy.deepcopy(ds.ScheduledProcedureStepSequence[0])
    step2.Modality = "MR"
    step2.ScheduledStationAETitle = "MR1"
    step2.ScheduledProcedureStepStartDate = "20240106"
    step2.ScheduledProcedureStepID = "SPS2"
    ds.ScheduledProcedureStepSequence.append(step2)
    return stored(ds)


def test_sequence_matching_needs_one_item_matching_every_key():
    rec = two_step_item()
    assert matches(query(sps={"Modality": "MR", "ScheduledStationAETitle": "MR1"}), rec)
    # Modality of the first step, station of the second: no single step has both.
    assert not matches(query(sps={"Modality": "CT", "ScheduledStationAETitle": "MR1"}), rec)


def test_answer_carries_the_matching_steps_with_the_requested_keys_only():
    rec = two_step_item()
    q = compile_query(query(PatientID="", sps={"Modality": "MR", "ScheduledProcedureStepID": ""}))
    answer = q.answer(rec)
    assert [e.keyword for e in answer] == [
        "SpecificCharacterSet", "PatientID", "ScheduledProcedureStepSequence"]  # fmt: skip
    steps = answer.ScheduledProcedureStepSequence
    assert len(steps) == 1
    assert [e.keyword for e in steps[0]] == ["Modality", "ScheduledProcedureStepID"]
    assert steps[0].ScheduledProcedureStepID == "SPS2"


def test_empty_sequence_in_query_is_universal_and_returns_whole_items():
    rec = two_step_item()
    q = query(PatientID="")
    q.ScheduledProcedureStepSequence = []
    cq = compile_query(q)
    assert cq.matches(rec)
    steps = cq.answer(rec).ScheduledProcedureStepSequence
    assert len(steps) == 2 and steps[1].ScheduledStationAETitle == "MR1"
    assert steps[0].ScheduledProtocolCodeSequence[0].CodeValue == "X1"


def test_nested_sequence_matching():
    rec = stored(make_item("X"))
    code = Dataset()
    code.CodeValue = "X1"
    code.CodeMeaning = ""
    q = query(sps={"Modality": ""})
    q.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence = [code]
    assert matches(q, rec)
    code.CodeValue = "X2"
    assert not matches(q, rec)


def test_requested_key_absent_from_item_is_returned_empty():
    rec = stored(make_item("X", AdmissionID=None))
    q = compile_query(query(AdmissionID="", PatientID="PID1", sps={"Modality": ""}))
    answer = q.answer(rec)
    assert "AdmissionID" in answer and answer.AdmissionID in ("", None)
    assert "AccessionNumber" not in answer
    assert answer.PatientID == "PID1"


def test_key_with_value_absent_from_item_does_not_match():
    rec = stored(make_item("X", AdmissionID=None))
    assert not matches(query(AdmissionID="ADM1"), rec)
    assert not matches(query(AdmissionID="*1"), rec)


def test_empty_value_matching():
    rec = stored(make_item("X", AdmissionID=""))
    assert matches(query(AdmissionID='""'), rec)
    assert not matches(query(AccessionNumber='""'), rec)


def test_keys_we_cannot_match_on_are_reported():
    q = query(PatientID="PID1")
    q.add_new(0x00091010, "OB", b"\x01\x02")  # a binary key: no matching rule for it
    cq = compile_query(q)
    assert cq.unsupported == ("(0009,1010)",)
    assert cq.matches(stored(make_item("X")))
    assert compile_query(query(PatientID="PID1")).unsupported == ()


def test_keys_not_matched_on_are_return_keys_answered_ff01():
    """dcmjs-dimse's stock worklist query sends PregnancyStatus = 0: Table K.6-1 makes it a
    return key only. It must not empty the worklist: returned, not matched on, FF01."""
    rec = stored(make_item("X"))  # PregnancyStatus 4
    for value in (0, 1, 4):
        cq = compile_query(query(PregnancyStatus=value, PatientID=""))
        assert cq.matches(rec)
        assert cq.unsupported == ("PregnancyStatus",)
        assert cq.answer(rec).PregnancyStatus == 4


def test_specific_character_set_is_never_answered_empty():
    rec = stored(make_item("N", charset=None))
    asked = query(PatientID="")
    asked.SpecificCharacterSet = ""
    cq = compile_query(asked)
    assert cq.answer(rec).SpecificCharacterSet == "ISO_IR 6"
    for implicit in (True, False):
        data = AnswerEncoder(cq, implicit).encode(rec)
        assert data == _pydicom_bytes(cq.answer(rec), implicit)
    with_charset = stored(make_item("L", charset="ISO_IR 100"))
    assert cq.answer(with_charset).SpecificCharacterSet == "ISO_IR 100"


def test_requested_sequences_the_item_lacks():
    """Type 2 sequences of Table K.6-1 come back empty (PS3.4 K.2.2.1.2); others are left out,
    as wlmscpfs and Orthanc do."""
    ds = make_item("S")
    for keyword in ("ReferencedStudySequence", "RequestedProcedureCodeSequence"):
        if keyword in ds:
            del ds[keyword]
    del ds.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence
    rec = stored(ds)
    q = query(PatientID="", ReferencedStudySequence=[], RequestedProcedureCodeSequence=[],
              sps={"Modality": "", "ScheduledProtocolCodeSequence": []})  # fmt: skip
    q.add_new(0x00400275, "SQ", [])  # RequestAttributesSequence: not in Table K.6-1
    cq = compile_query(q)
    answer = cq.answer(rec)
    assert "ReferencedStudySequence" in answer and len(answer.ReferencedStudySequence) == 0
    assert "RequestedProcedureCodeSequence" not in answer
    assert "RequestAttributesSequence" not in answer
    step = answer.ScheduledProcedureStepSequence[0]
    assert "ScheduledProtocolCodeSequence" not in step and step.Modality
    for implicit in (True, False):
        assert AnswerEncoder(cq, implicit).encode(rec) == _pydicom_bytes(answer, implicit)


def _reference_match(pattern: str, value: str) -> bool:
    """Wildcard matching by definition (dynamic programming), for comparison."""
    n, m = len(value), len(pattern)
    can = [[False] * (n + 1) for _ in range(m + 1)]
    can[0][0] = True
    for i in range(1, m + 1):
        p = pattern[i - 1]
        for j in range(n + 1):
            if p == "*":
                can[i][j] = can[i - 1][j] or (j > 0 and can[i][j - 1])
            elif j > 0 and (p == "?" or p == value[j - 1]):
                can[i][j] = can[i - 1][j - 1]
    return can[m][n]


def test_wildcard_matcher_agrees_with_the_definition():
    import random

    rng = random.Random(7)
    for _ in range(4000):
        pattern = "".join(rng.choice("ab*?") for _ in range(rng.randint(0, 7)))
        value = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        assert wildcard_matcher(pattern)(value) == _reference_match(pattern, value), (
            pattern,
            value,
        )


def test_catastrophic_wildcards_take_linear_time():
    import time

    rec = stored(make_item("W", RequestedProcedureDescription="a" * 64))
    started = time.process_time()
    for pattern in ("*?*?*?*?*?*?*?*?*?#", "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", "?" * 63 + "#"):
        assert not matches(query(RequestedProcedureDescription=pattern), rec)
        assert not wildcard_matcher(pattern)("a" * 10000)
    assert time.process_time() - started < 1.0  # a backtracking regex takes minutes


@pytest.mark.parametrize(
    "keys",
    [
        {"PatientID": "P" * 65},
        {"AccessionNumber": "A" * 17},
        {"sps": {"ScheduledStationAETitle": "S" * 17}},
        {"PatientName": "N" * 65},
        {"RequestedProcedureDescription": "*?" * 33},
        {"sps": {"ScheduledProcedureStepStartDate": "2024010512"}},
    ],
)
@pytest.mark.filterwarnings("ignore:The value length", "ignore:The PN component length")
def test_values_longer_than_their_vr_allows_are_refused(keys):
    sps = keys.pop("sps", None)
    with pytest.raises(QueryError, match="longer than"):
        compile_query(query(sps=sps, **keys))


def test_values_as_long_as_their_vr_allows_are_matched():
    rec = stored(make_item("L" * 16, patient_id="P" * 64))
    assert matches(query(PatientID="P" * 64, AccessionNumber="L" * 16), rec)
    assert matches(query(PatientName="A" * 64 + "=" + "B" * 64), rec) is False
    both = query(sps={"ScheduledProcedureStepStartDate": "20240101-20991231"})
    compile_query(both)  # a range holds two values


def test_the_guard_runs_while_matching_and_can_stop_it():
    rec = stored(make_item("G"))
    cq = compile_query(query(PatientID=""))
    calls = []
    cq.guard = lambda: calls.append(1)
    for _ in range(GUARD_EVERY * 3):
        cq.matches(rec)
    assert len(calls) == 3

    def stop():
        raise SearchStopped("cancelled")

    cq.guard = stop
    with pytest.raises(SearchStopped):
        for _ in range(GUARD_EVERY):
            cq.matches(rec)


def test_more_than_one_item_in_a_query_sequence_is_refused():
    q = query(sps={"Modality": "CT"})
    q.ScheduledProcedureStepSequence.append(Dataset())
    with pytest.raises(QueryError):
        compile_query(q)


def test_hidden_statuses_unless_asked_for():
    done = stored(make_item("X", status="COMPLETED"))
    hidden = ["COMPLETED", "CANCELED"]
    assert not matches(query(PatientID=""), done, hidden_statuses=hidden)
    assert not matches(query(sps={"ScheduledProcedureStepStatus": "*"}), done,
                       hidden_statuses=hidden)  # fmt: skip
    assert matches(query(sps={"ScheduledProcedureStepStatus": "COMPLETED"}), done,
                   hidden_statuses=hidden)  # fmt: skip
    assert matches(query(PatientID=""), done)


def test_station_scoping_applies_only_without_a_station_in_the_query(item):
    assert matches(query(PatientID=""), item, station_aet="CT2")
    assert not matches(query(PatientID=""), item, station_aet="MR1")
    assert not matches(query(sps={"Modality": ""}), item, station_aet="MR1")
    assert matches(query(sps={"ScheduledStationAETitle": "CT1"}), item, station_aet="MR1")
    cq = compile_query(query(PatientID=""), station_aet="MR1")
    assert cq.hints.station_aets == frozenset({"MR1"})


@pytest.mark.parametrize("station", ["*", "**", "?*", "*1", "CT?", "CT1\\MR1", "MR1\\CT2", '""'])
def test_station_scoping_is_not_widened_by_wildcards_or_lists(item, station):
    """Only a query naming one station exactly is answered for that station; any other
    station key is matched within the calling AE title's own steps."""
    other = query(sps={"ScheduledStationAETitle": station})
    assert not matches(other, item, station_aet="MR1")  # the item is CT1's and CT2's


@pytest.mark.parametrize("station", ["*", "**", "?*", "*1", "CT?", "CT1\\MR1"])
def test_station_wildcards_still_find_own_items(item, station):
    assert matches(query(sps={"ScheduledStationAETitle": station}), item, station_aet="CT1")


def test_hints_name_exact_values_only():
    hints = compile_query(query(PatientID="P1", AccessionNumber="A*",
                                sps={"ScheduledStationAETitle": "CT1", "Modality": "",
                                     "ScheduledProcedureStepStartDate": "20240101-"}),
                          ).hints  # fmt: skip
    assert hints.patient_ids == frozenset({"P1"})
    assert hints.accession_numbers is None
    assert hints.station_aets == frozenset({"CT1"})
    assert hints.modalities is None
    assert hints.date_range == ("20240101", "")


def test_missing_required_attributes_are_named(tmp_path):
    ds = make_item("X", PatientBirthDate=None, sps_ScheduledStationAETitle="",
                   sps_ScheduledProcedureStepDescription=None,
                   sps_ScheduledProtocolCodeSequence=None)  # fmt: skip
    path = write_item(tmp_path / "x.wl", ds)
    missing = missing_required(record_from_dataset(pydicom.dcmread(path)))
    assert missing == [
        "PatientBirthDate",
        "ScheduledProcedureStepSequence>ScheduledProcedureStepDescription or "
        "ScheduledProtocolCodeSequence",
        "ScheduledProcedureStepSequence>ScheduledStationAETitle",
    ]
    assert missing_required(stored(make_item("Y"))) == []


def _pydicom_bytes(ds: Dataset, implicit: bool) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _universal(ds: Dataset) -> Dataset:
    """Every attribute of `ds` as a universal return key (sequences with an empty item)."""
    q = Dataset()
    for elem in ds:
        q.add_new(elem.tag, elem.VR, [Dataset()] if elem.VR == "SQ" else None)
    return q


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_answers_encoded_from_records_are_what_pydicom_writes(implicit):
    """AnswerEncoder writes, byte for byte, pydicom's encoding of Query.answer()."""
    two = two_step_item()
    items = [
        stored(make_item("A")),
        stored(make_item("U", patient_name="Dvořák^Antonín=ドヴォルザーク", charset="ISO_IR 192")),
        stored(make_item("L", patient_name="Gaël^Zoë", station_aets=["US1", "US9"])),
        stored(make_item("N", charset=None, PatientWeight="70.5", AdmissionID=None)),
        two,
    ]
    queries = [
        _universal(make_item("A")),
        query(PatientName="", PatientID="", PatientWeight="", PregnancyStatus=None,
              AdmissionID="", sps={"Modality": "", "ScheduledStationAETitle": "",
                                   "ScheduledProcedureStepStartDate": ""}),  # fmt: skip
        query(charset="ISO_IR 100", AccessionNumber="", sps={"Modality": "MR",
                                                             "ScheduledProcedureStepID": ""}),
        query(PatientID="", ReferencedStudySequence=[], ScheduledProcedureStepSequence=[]),
    ]  # fmt: skip
    for q in queries:
        cq = compile_query(q)
        encoder = AnswerEncoder(cq, implicit)
        for rec in items:
            assert encoder.encode(rec) == _pydicom_bytes(cq.answer(rec), implicit)


def test_answers_with_values_left_to_pydicom():
    """What the encoder does not write exactly as pydicom would, it declines (None)."""
    ds = make_item("B")
    ds.add_new(0x00091010, "OB", b"\x01\x02\x03")  # binary VRs: pydicom pads them
    rec = stored(ds)
    q = query(PatientID="")
    q.add_new(0x00091010, "OB", None)
    assert AnswerEncoder(compile_query(q), True).encode(rec) is None
    jis = stored(make_item("J", charset=["ISO 2022 IR 6", "ISO 2022 IR 87"]))  # code extensions
    assert AnswerEncoder(compile_query(query(PatientName="")), True).encode(jis) is None


def test_the_required_key_tables_are_the_registry_s() -> None:
    """matching's K.6-1 tables and worklist_item's key lists come from one registry: an item the
    bridge builds is never one the index calls incomplete."""
    from bridge.core.attributes import ATTRIBUTES
    from bridge.dicom.matching import ONE_OF_SPS, ONE_OF_TOP, REQUIRED_SPS, REQUIRED_TOP
    from bridge.dicom.worklist_item import REQUIRED_KEYS, SPS_REQUIRED_KEYS

    def by_tag(keys: dict[str, str]) -> dict[int, int]:
        return {ATTRIBUTES[k].tag: int(t) for k, t in keys.items() if t in ("1", "2")}

    assert REQUIRED_TOP == by_tag(REQUIRED_KEYS)
    assert REQUIRED_SPS == by_tag(SPS_REQUIRED_KEYS)
    one_of_top = {ATTRIBUTES[k].tag for k, t in REQUIRED_KEYS.items() if t == "1C"}
    one_of_sps = {ATTRIBUTES[k].tag for k, t in SPS_REQUIRED_KEYS.items() if t == "1C"}
    assert {t for pair in ONE_OF_TOP for t in pair} == one_of_top == {0x00321060, 0x00321064}
    assert {t for pair in ONE_OF_SPS for t in pair} == one_of_sps == {0x00400007, 0x00400008}
