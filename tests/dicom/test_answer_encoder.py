"""AnswerEncoder writes, byte for byte, what pydicom writes for Query.answer(), over varied
records and queries: its plans (shared by queries of the same return keys), its per-value
elements (per character set) and its choice of steps for records the search found
(`matched=True`) must never change a byte."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from bench.worklist_items import _code, make_item, query
from bridge.dicom.matching import AnswerEncoder, Record, compile_query, record_from_dataset

pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR", "ignore:The value length", "ignore:The PN component length"
)


def stored(ds: Dataset):
    """The record of `ds` after a real encode/decode, as the index would hold it."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return record_from_dataset(pydicom.dcmread(buf))


def pydicom_bytes(ds: Dataset, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _steps(ds: Dataset, *changes: dict) -> Dataset:
    """`ds` with one step per `changes` (copies of its first step, changed)."""
    first = ds.ScheduledProcedureStepSequence[0]
    steps = []
    for change in changes:
        step = copy.deepcopy(first)
        for key, value in change.items():
            setattr(step, key, value)
        steps.append(step)
    ds.ScheduledProcedureStepSequence = steps
    return ds


def records() -> list:
    long_text = "Ein langer Kommentar über das Kontrastmittel. " * 7  # LT past the short headers
    return [
        stored(make_item("A")),
        # The same layout in two character sets: the same name is other bytes in each.
        stored(make_item("L1", patient_name="Müller^Hans", charset="ISO_IR 100")),
        stored(make_item("L2", patient_name="Müller^Hans", charset="ISO_IR 192")),
        stored(
            make_item(
                "G", charset="ISO_IR 192", patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう"
            )
        ),  # fmt: skip
        stored(make_item("C", charset=None)),  # no Specific Character Set
        # Multi-valued text, odd lengths, UIDs needing their NUL, numbers as text.
        stored(
            make_item(
                "MV",
                station_aets=["CT1", "CT22"],
                OtherPatientIDs=["X1", "Y22"],
                StudyInstanceUID="1.2.345",
                PatientWeight="70.5",
                PatientSize="1.8",
                PatientBirthDate="",
            )
        ),  # fmt: skip
        # Values around the lengths whose headers are held ready (64), and a long LT.
        stored(
            make_item(
                "LEN",
                RequestedProcedureDescription="D" * 63,
                PatientComments=long_text,
                AdmissionID="A" * 64,
                sps_ScheduledProcedureStepDescription="S" * 65,
            )
        ),  # fmt: skip
        # Empty values and absent keys.
        stored(
            make_item(
                "E",
                patient_id="",
                PatientSex="",
                PatientWeight=None,
                IssuerOfPatientID=None,
                sps_ScheduledStationAETitle="",
            )
        ),  # fmt: skip
        # Three steps, some of which match the step queries below.
        stored(
            _steps(
                make_item("S3"),
                {"Modality": "CT", "ScheduledProcedureStepID": "S1"},
                {
                    "Modality": "MR",
                    "ScheduledStationAETitle": "MR1",
                    "ScheduledProcedureStepID": "S2",
                },
                {
                    "Modality": "CT",
                    "ScheduledStationAETitle": "CT2",
                    "ScheduledProcedureStepStatus": "COMPLETED",
                    "ScheduledProcedureStepID": "S3",
                },
            )
        ),  # fmt: skip
        # One step with two protocol codes: a nested sequence query selects among them.
        stored(
            make_item(
                "P",
                sps_ScheduledProtocolCodeSequence=[
                    _code("X1", "Protocol one"),
                    _code("X2", "Protocol two"),
                ],
            )
        ),  # fmt: skip
        stored(_steps(make_item("MR"), {"Modality": "MR", "ScheduledStationAETitle": "MR1"})),
        # Not ASCII in an AE title: pydicom writes such VRs in its default encoding, whatever
        # the item's character set.
        stored(make_item("NA", charset="ISO_IR 192", station_aets="CTÄ1")),
    ]


def queries() -> list[Dataset]:
    universal = Dataset()
    for elem in make_item("U"):
        universal.add_new(elem.tag, elem.VR, [Dataset()] if elem.VR == "SQ" else None)
    nested = query(PatientID="", sps={"Modality": "", "ScheduledProtocolCodeSequence": [
        Dataset()]})  # fmt: skip
    nested.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeValue = "X2"
    nested_all = query(PatientID="", sps={"ScheduledProtocolCodeSequence": [Dataset()]})
    nested_all.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeValue = ""
    before_charset = query(PatientID="")
    before_charset.add_new(0x00080001, "UL", None)  # a key that sorts before the charset's
    return [
        universal,
        before_charset,
        # The same return keys with other values: plans are shared, the steps chosen are not.
        query(PatientName="", PatientID="", sps={"Modality": "CT", "ScheduledProcedureStepID": ""}),
        query(PatientName="", PatientID="", sps={"Modality": "MR", "ScheduledProcedureStepID": ""}),
        query(PatientName="", PatientID="", sps={"Modality": "", "ScheduledProcedureStepID": ""}),
        query(
            charset="ISO_IR 100",
            PatientName="",
            AccessionNumber="",
            OtherPatientIDs="",
            StudyInstanceUID="",
            PatientWeight="",
            PatientSize="",
            PregnancyStatus=None,
            PatientBirthDate="",
            PatientSex="",
            AdmissionID="",
            PatientComments="",
            RequestedProcedureDescription="",
            sps={
                "ScheduledStationAETitle": "",
                "ScheduledProcedureStepDescription": "",
                "ScheduledProcedureStepStatus": "",
                "ScheduledProcedureStepStartDate": "",
                "ScheduledProcedureStepStartTime": "",
            },
        ),  # fmt: skip
        query(PatientID="", sps={"ScheduledStationAETitle": "CT*", "Modality": ""}),
        query(PatientID="", ReferencedStudySequence=[], ScheduledProcedureStepSequence=[]),
        nested,
        nested_all,
        query(PatientName="*^Hans", sps={"Modality": ""}),
    ]


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_every_answer_is_what_pydicom_writes(implicit):
    """One encoder per query over every record (its plans and elements reused across records),
    queries of the same shape one after the other (their plans shared); `matched=True` for the
    records the query matches. The hidden statuses make the steps' selection run as well."""
    recs = records()
    hidden = ("COMPLETED", "DISCONTINUED")
    matched_pairs = multi_step_matched = 0
    for identifier in queries():
        cq = compile_query(identifier, hidden_statuses=hidden)
        encoder = AnswerEncoder(cq, implicit)
        found = AnswerEncoder(cq, implicit, matched=True)
        for rec in recs:
            expected = pydicom_bytes(cq.answer(rec), implicit)
            assert encoder.encode(rec) == expected, (identifier, rec)
            if cq.matches(rec):
                matched_pairs += 1
                assert found.encode(rec) == expected, (identifier, rec)
                steps = rec.get(0x00400100)
                multi_step_matched += len(steps) > 1
    assert matched_pairs > 40 and multi_step_matched >= 8  # the matrix holds what it claims


def test_steps_chosen_by_the_query_not_by_a_shared_plan():
    """Queries of one shape share plans; each still returns only its own matching steps, and a
    record with one step that does not match (encoded without `matched`) returns none."""
    three = records()[8]
    ct = compile_query(query(PatientID="", sps={"Modality": "CT", "ScheduledProcedureStepID": ""}))
    mr = compile_query(query(PatientID="", sps={"Modality": "MR", "ScheduledProcedureStepID": ""}))
    for cq, ids in ((ct, ["S1", "S3"]), (mr, ["S2"]), (ct, ["S1", "S3"])):
        data = AnswerEncoder(cq, True, matched=True).encode(three)
        assert data == pydicom_bytes(cq.answer(three), True)
        assert [s.ScheduledProcedureStepID for s in cq.answer(three).ScheduledProcedureStepSequence
                ] == ids  # fmt: skip
    ct_only = records()[0]
    assert not mr.matches(ct_only)
    data = AnswerEncoder(mr, False).encode(ct_only)
    assert data == pydicom_bytes(mr.answer(ct_only), False)
    assert len(mr.answer(ct_only).ScheduledProcedureStepSequence) == 0


def test_one_layout_in_two_character_sets():
    """The same value under the same layout is other bytes in another character set: an element
    kept by value is kept per character set."""
    latin, utf8 = records()[1:3]
    assert latin.layout is utf8.layout
    cq = compile_query(query(PatientName="", PatientID=""))
    for implicit in (True, False):
        encoder = AnswerEncoder(cq, implicit)
        for rec in (latin, utf8, latin, utf8):
            assert encoder.encode(rec) == pydicom_bytes(cq.answer(rec), implicit)
        assert "Müller".encode("latin_1") in encoder.encode(latin)
        assert "Müller".encode() in encoder.encode(utf8)


def test_what_it_leaves_to_pydicom_and_what_follows_it():
    """A value too long for an explicit VR length, a PN with empty trailing groups: declined
    (None), and the next record of the same layout is encoded as before."""
    cq = compile_query(query(PatientName="", PatientComments=""))
    # As the index holds items that the bridge writes itself (no file: a file would say UN).
    too_long = record_from_dataset(make_item("T", PatientComments="x" * 70000))
    fine = record_from_dataset(make_item("F", PatientComments="fine"))
    values = list(fine.values)
    values[fine.layout.pos[0x00100010]] = "DOE^JOHN="  # as a plain item may hold it
    dangling = Record(fine.layout, tuple(values))
    assert too_long.layout is fine.layout
    explicit, implicit = AnswerEncoder(cq, False), AnswerEncoder(cq, True)
    assert explicit.encode(too_long) is None  # LT has a 2-byte length in explicit VR
    assert implicit.encode(too_long) == pydicom_bytes(cq.answer(too_long), True)
    for encoder in (explicit, implicit):
        assert encoder.encode(dangling) is None
        assert encoder.encode(fine) == pydicom_bytes(cq.answer(fine), encoder.implicit)
