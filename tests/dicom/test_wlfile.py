"""The short worklist file reader: the records pydicom's path gives, or the file left to it."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from bench.worklist_items import make_item, write_item
from bridge.dicom.matching import Record, record_from_dataset
from bridge.dicom.wlfile import (
    MAX_FILE_SIZE,
    UnsafeFile,
    incomplete,
    read_dataset,
    record_from_bytes,
)
from bridge.storage.index import read_record
from bridge.storage.store import encode_file
from tests import peers

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about the odd values below

DCMTK_WORKLISTS = Path("/usr/share/doc/dcmtk/examples/wlistdb/OFFIS")


def plain(value):
    """A record as nested tuples, with the type of every value, for exact comparison."""
    if isinstance(value, Record):
        return tuple((tag, vr, plain(v)) for tag, vr, v in value.items())
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return (type(value).__name__, value)


def pydicom_record(data: bytes):
    return record_from_dataset(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))


def part10(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def undefined_lengths(ds: Dataset) -> Dataset:
    """Every sequence and item of `ds` (nested too) written with undefined length."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.value = Sequence(elem.value)
            elem.value.is_undefined_length = True
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                undefined_lengths(item)
    return ds


def assert_same(data: bytes, handled: bool = True) -> None:
    fast = record_from_bytes(data)
    if handled:
        assert fast is not None, "left to pydicom"
    if fast is not None:
        assert plain(fast) == plain(pydicom_record(data))


ITEMS = {
    "latin1": dict(patient_name="Gaël^Zoë", station_aets=["US1", "US9"]),
    "utf8": dict(patient_name="Dvořák^Antonín=ドヴォルザーク", charset="ISO_IR 192"),
    "no charset": dict(charset=None, PatientWeight="70.5", AdmissionID=None),
    "cyrillic": dict(patient_name="Иванов^Иван", charset="ISO_IR 144"),
    "greek": dict(patient_name="Παπαδόπουλος^Γιώργος", charset="ISO_IR 126"),
    "ascii": dict(charset="ISO_IR 6", MedicalAlerts="a\\b", PatientSize="1.85"),
}


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                         ids=["explicit", "implicit"])  # fmt: skip
@pytest.mark.parametrize("kind", list(ITEMS))
def test_generated_items_give_pydicoms_records(kind, syntax):
    assert_same(part10(make_item("A1", **ITEMS[kind]), syntax))
    assert_same(part10(undefined_lengths(make_item("A2", **ITEMS[kind])), syntax))


def test_the_bridges_own_files_are_read_directly():
    data = encode_file(make_item("OWN", patient_name="Müller^Hans"), "1.2.3")
    assert_same(data)


_TEXT = st.text(st.sampled_from("AZaz09 ^=\\.-+éßЖ\x00"), max_size=12)
_NUMBER = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(str),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda f: f"{f:.6g}"),
    _TEXT,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_TEXT, pid=_TEXT, code=_TEXT, number=_NUMBER, weight=_NUMBER, uid=_TEXT,
    charset=st.sampled_from([None, "ISO_IR 100", "ISO_IR 192", "ISO_IR 144", "ISO 2022 IR 100",
                             "ISO_IR 13", "ISO-IR 100", ["ISO 2022 IR 6", "ISO 2022 IR 87"]]),
    implicit=st.booleans(), undefined=st.booleans(),
)  # fmt: skip
def test_any_item_gives_pydicoms_record_or_is_left_to_pydicom(
    name, pid, code, number, weight, uid, charset, implicit, undefined
):
    ds = make_item("H", charset=charset)
    for tag, vr, value in [(0x00100010, "PN", name), (0x00100020, "LO", pid),
                           (0x00100040, "CS", code), (0x001021C0, "US", None),
                           (0x00101030, "DS", weight), (0x00101020, "DS", number),
                           (0x00200013, "IS", number), (0x0020000D, "UI", uid)]:  # fmt: skip
        try:
            ds.add_new(tag, vr, value)
        except Exception:
            pass  # a value pydicom refuses to hold
    if undefined:
        undefined_lengths(ds)
    try:
        data = part10(ds, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    except Exception:
        return  # pydicom cannot write it
    fast = record_from_bytes(data)
    try:
        slow = plain(pydicom_record(data))
    except Exception:
        assert fast is None  # pydicom's failure is kept: the file is left to it
        return
    if fast is not None:
        assert plain(fast) == slow
    simple = all(v.isascii() and v.isalnum() for v in (name, pid, code, uid))
    if simple and charset in (None, "ISO_IR 100", "ISO_IR 192") and number.isdigit():
        assert fast is not None  # plain items are not all left to pydicom


def test_dcmtk_example_worklists(tmp_path):
    dumps = sorted(DCMTK_WORKLISTS.glob("*.dump"))
    if not dumps:
        message = f"dcmtk's example worklists are missing at {DCMTK_WORKLISTS}"
        pytest.fail(message) if peers.IN_CI else pytest.skip(message)
    for dump in dumps:
        path = peers.dump2dcm(dump, tmp_path / f"{dump.stem}.wl")
        data = path.read_bytes()
        assert_same(data)
        ds = pydicom.dcmread(path)  # and the same items written by pydicom, implicit VR
        assert_same(part10(ds, ImplicitVRLittleEndian))


@pytest.mark.parametrize(
    "syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian], ids=["big endian", "deflate"]
)
def test_other_transfer_syntaxes_are_left_to_pydicom(syntax, tmp_path):
    ds = make_item("BE", patient_name="Gaël^Zoë")
    if syntax == ExplicitVRBigEndian:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds.file_meta.TransferSyntaxUID = syntax
        path = tmp_path / "be.wl"
        ds.save_as(path, enforce_file_format=True, little_endian=False, implicit_vr=False)
        data = path.read_bytes()
    else:
        data = part10(ds, syntax)
    assert record_from_bytes(data) is None
    path = tmp_path / "x.wl"
    path.write_bytes(data)
    record, _sig = read_record(str(path))
    assert plain(record) == plain(pydicom_record(data))
    assert record.get(0x00080050) == "BE" and record.get(0x00100010) == "Gaël^Zoë"


def test_code_extensions_and_odd_vrs_are_left_to_pydicom():
    jis = make_item("J", patient_name="Yamada^Tarou=山田^太郎", charset=["", "ISO 2022 IR 87"])
    private = make_item("P")
    private.add_new(0x00091010, "UN", b"\x01\x02")
    tagged = make_item("T")
    tagged.add_new(0x00209165, "AT", 0x00100010)
    for ds, syntax in [(jis, ExplicitVRLittleEndian), (private, ImplicitVRLittleEndian),
                       (tagged, ExplicitVRLittleEndian)]:  # fmt: skip
        data = part10(ds, syntax)
        assert record_from_bytes(data) is None
        assert pydicom_record(data).get(0x00080050) in ("J", "P", "T")


def outcome(path: Path):
    """read_record's record, or the kind of failure."""
    try:
        return plain(read_record(str(path))[0])
    except Exception as exc:
        return type(exc).__name__


def pydicom_outcome(data: bytes):
    try:
        return plain(pydicom_record(data))
    except Exception as exc:
        return type(exc).__name__


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined lengths"])
def test_truncated_and_corrupt_files_are_refused_or_read_as_pydicom_reads_them(tmp_path, undefined):
    """A file that does not parse completely is refused (pydicom serves its cut values); any
    other fares as with pydicom."""
    ds = make_item("CUT", patient_name="Gaël^Zoë")
    data = part10(undefined_lengths(ds) if undefined else ds)
    path = tmp_path / "cut.wl"
    rng = random.Random(7)
    cuts = sorted({*range(0, 200, 3), *rng.sample(range(200, len(data)), 60)})
    flips = [(rng.randrange(132, len(data)), rng.randrange(256)) for _ in range(120)]
    cases = [data[:cut] for cut in cuts]
    cases += [data[:at] + bytes([byte]) + data[at + 1 :] for at, byte in flips]
    failed = refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            path.write_bytes(case)
            expected = pydicom_outcome(case)
            if incomplete(case) is not None:
                assert outcome(path) == "UnsafeFile"
                refused += not isinstance(expected, str)  # pydicom would have served it
            else:
                assert outcome(path) == expected
            failed += isinstance(expected, str)
    assert failed > 20  # the cases do reach pydicom's failures, not only its successes
    assert refused > 20  # and cut copies that pydicom reads without a word


def test_read_record_uses_the_short_reader(tmp_path, monkeypatch):
    path = write_item(tmp_path / "a.wl", make_item("A"))
    monkeypatch.setattr(pydicom, "dcmread", None)  # would fail if it were called
    record, sig = read_record(str(path))
    assert record.get(0x00080050) == "A" and sig[0] == path.stat().st_size


def flat(record: Record) -> dict:
    """Top-level and nested values by tag path, for comparing a record with the original's."""
    out = {}

    def walk(rec, prefix):
        for tag, _vr, value in rec.items():
            if isinstance(value, tuple) and value and isinstance(value[0], Record):
                for n, item in enumerate(value):
                    walk(item, (*prefix, tag, n))
            else:
                out[(*prefix, tag)] = value

    walk(record, ())
    return out


CUT_ITEM = part10(make_item("CUT-PROPERTY", patient_id="PAT-0093117-LONGID",
                            patient_name="Gaël^Zoë"))  # fmt: skip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(min_value=0, max_value=len(CUT_ITEM) - 1), st.booleans())
def test_a_cut_copy_is_refused_or_holds_only_whole_values(tmp_path, cut, undefined):
    data = CUT_ITEM
    if undefined:
        data = part10(undefined_lengths(pydicom.dcmread(io.BytesIO(CUT_ITEM))))
        cut = min(cut, len(data) - 1)
    whole = flat(read_record_of(tmp_path, data))
    try:
        served = flat(read_record_of(tmp_path, data[:cut]))
    except Exception:
        return  # refused: fine
    assert all(whole.get(path) == value for path, value in served.items()), cut


def read_record_of(folder: Path, data: bytes) -> Record:
    path = folder / "item.wl"
    path.write_bytes(data)
    return read_record(str(path))[0]


def test_fifos_devices_huge_and_preamble_only_files_are_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "fifo.wl"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.wl"
    zero.symlink_to("/dev/zero")
    huge = tmp_path / "huge.wl"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_SIZE + 1)
    preamble = tmp_path / "preamble.wl"
    preamble.write_bytes(b"\0" * 128 + b"DICM")
    for path, why in ((fifo, "a FIFO"), (zero, "a character device"), (huge, "more than"),
                      (preamble, "does not parse completely")):  # fmt: skip
        with pytest.raises(UnsafeFile, match=why):
            read_record(str(path))
    with pytest.raises(UnsafeFile, match="a FIFO"):
        read_dataset(fifo)
    assert incomplete(b"\0" * 128 + b"DICM") is not None


def test_a_symlink_out_of_the_folder_is_refused_inside_is_read(tmp_path):
    folder = tmp_path / "wl"
    folder.mkdir()
    outside = write_item(tmp_path / "elsewhere.wl", make_item("OUT"))
    inside = write_item(folder / "real.wl", make_item("IN"))
    (folder / "out.wl").symlink_to(outside)
    (folder / "in.wl").symlink_to(inside)
    with pytest.raises(UnsafeFile, match="outside the worklist folder"):
        read_record(str(folder / "out.wl"), str(folder))
    assert read_record(str(folder / "in.wl"), str(folder))[0].get(0x00080050) == "IN"
