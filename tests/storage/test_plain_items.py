"""New items go from the message to the file and the index as plain elements, without pydicom
Datasets: the bytes and records must be exactly those of the Dataset path (pydicom's writer, its
reader, record_from_dataset), over many generated orders in several charsets."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from bench.ingest import order_message
from bridge.config import Settings
from bridge.dicom import worklist_item
from bridge.dicom.matching import record_from_dataset, record_from_elements
from bridge.dicom.wlfile import record_from_bytes
from bridge.hl7.errors import HL7Error
from bridge.hl7.message import HL7Message, parse_message
from bridge.hl7.order import read_message
from bridge.storage.index import WorklistIndex
from bridge.storage.store import (
    WorklistStore,
    _file_meta,
    _pydicom_encode_file,
    encode_elements,
    encode_file,
)
from tests.hl7.test_order import CHARSET_NAMES, base_orm, build, settings

UID = "2.25.329800735698586629295641978511506172918"

_TEXTS = ["", "PACEMAKER", "Allergic to iodine\\E\\contrast", "tab\there", "line\\.br\\two"]


def generated(count: int) -> list[HL7Message]:
    """Orders in every charset the tests know, with other IDs, allergies (several values), codes
    or only texts, empty Type 2 values, several steps, derived UIDs, escapes and tabs."""
    rnd = random.Random(20261128)
    out = []
    for n in range(count):
        charset, name, text = rnd.choice([("", "DOE^JANE^Q", "PLAIN"), *CHARSET_NAMES])
        changes: dict = {
            "PID": {
                3: f"PAT{n}^^^HOSP^MR" + rnd.choice(["", f"~{n}9^^^NHS^NH~X{n}^^^{text[:8]}^PI"]),
                5: rnd.choice([name, "O'BRIEN^PAT", f"{name}^^^DR"]),
                7: rnd.choice(["19800102", ""]),
                8: rnd.choice(["F", "M", ""]),
                11: rnd.choice(["", f"{text}^^Springfield"]),
            },
            "PV1": {8: rnd.choice(["", "1234^WELBY^MARCUS", name])},
            "ORC": {2: f"PLC{n}^RIS", 3: f"FIL{n}^PACS"},
            "OBR": {
                2: f"PLC{n}^RIS",
                3: f"FIL{n}^PACS",
                4: rnd.choice(["CTH^CT HEAD^L^P123^HEAD PROTOCOL^99LOC", f"^{text}", "MR1^X^L"]),
                12: rnd.choice(["", "FASTING"]),
                13: rnd.choice([*_TEXTS, text]),
                18: f"ACC{n}",
                19: f"RP{n}",
                20: f"SPS{n}",
                31: rnd.choice(["", f"^{text}"]),
            },
        }
        drop: tuple[str, ...] = rnd.choice([(), ("ZDS",)])
        segments = base_orm()
        for a in range(rnd.choice([0, 0, 1, 3])):
            segments.append(("AL1", {1: str(a + 1), 3: f"^{rnd.choice(['Latex', text])}"}))
        out.append(build(segments, changes, drop, charset))
    out += [parse_message(order_message("P", n)[2]) for n in range(count // 4)]
    return out


def plain_and_datasets(message: HL7Message, s: Settings):
    intent = read_message(message, s)
    for step in intent.steps:
        item = worklist_item.build_elements(message, intent, step, s)
        yield item, item.to_dataset()


@pytest.mark.parametrize("overlong", ["truncate", "reject"])
def test_plain_items_give_the_bytes_and_records_of_their_datasets(overlong):
    s = settings(overlong_values=overlong)
    plain_path = fallbacks = 0
    charsets, multi_valued = set(), 0
    for message in generated(400):
        try:
            pairs = list(plain_and_datasets(message, s))
        except HL7Error as exc:  # an overlong value refused (the same for both paths)
            assert overlong == "reject", exc
            continue
        for item, ds in pairs:
            body = encode_elements(item.elements)
            expected = _pydicom_encode_file(ds.copy(), UID)  # pydicom's own writer
            assert encode_file(ds, UID) == expected
            if body is None:
                fallbacks += 1
            else:
                plain_path += 1
                assert _file_meta(UID) + body == expected
            record = record_from_elements(item.elements)
            charsets.add(ds.get("SpecificCharacterSet", ""))
            multi_valued += isinstance(ds.get("Allergies"), pydicom.multival.MultiValue)
            assert _same(record, record_from_dataset(ds))
            assert _same(record, record_from_dataset(pydicom.dcmread(io.BytesIO(expected))))
            from_bytes = record_from_bytes(expected)  # None: a charset it leaves to pydicom
            assert from_bytes is None or _same(record, from_bytes)
    assert plain_path > 300 and fallbacks == 0
    assert len(charsets) == 7 and multi_valued > 20  # ASCII, six charsets; several values


def test_build_item_is_the_dataset_of_the_plain_item():
    message = generated(1)[0]
    s = settings()
    intent = read_message(message, s)
    ds = worklist_item.build_item(message, intent, intent.steps[0], s)
    assert isinstance(ds, Dataset) and ds == next(plain_and_datasets(message, s))[1]


def _same(a, b) -> bool:
    """Records equal value for value, and of the same types."""
    return _typed(a) == _typed(b)


def _typed(value):
    from bridge.dicom.matching import Record

    if isinstance(value, Record):
        return ("R", tuple((tag, vr, _typed(v)) for tag, vr, v in value.items()))
    if isinstance(value, tuple):
        return ("T", tuple(_typed(v) for v in value))
    return (type(value).__name__, value)


def _store(tmp_path: Path, name: str) -> tuple[WorklistStore, WorklistIndex]:
    s = Settings(worklist_dir=tmp_path / name)
    index = WorklistIndex(s)
    store = WorklistStore(s, index)
    store.prepare()
    return store, index


@pytest.mark.parametrize(
    "obx",
    [None, ("OBX", {1: "1", 2: "NM", 3: "3141-9^Body weight^LN", 5: "72.5", 6: "kg"})],
    ids=["plain", "weight"],
)
@pytest.mark.parametrize("charset", ["", "8859/1", "UNICODE UTF-8"])
def test_the_store_writes_and_indexes_a_plain_item_as_its_dataset(tmp_path, obx, charset):
    segments = base_orm()
    if obx is not None:
        segments.insert(-1, obx)  # after the OBR, before the ZDS
    message = build(segments, {"PID": {5: "MÜLLER^Jörg" if charset else "DOE^JANE"}}, (), charset)
    s = settings()
    intent = read_message(message, s)
    item = worklist_item.build_elements(message, intent, intent.steps[0], s)
    if obx is not None:
        assert encode_elements(item.elements) is not None  # DS: our own text, written as is
        assert item.to_dataset().PatientWeight == 72.5
    plain_store, plain_index = _store(tmp_path, "plain")
    ds_store, ds_index = _store(tmp_path, "dataset")
    plain_path = plain_store.path_for("x")
    ds_path = ds_store.path_for("x")
    plain_store.write(plain_path, item, "x")
    ds_store.write(ds_path, item.to_dataset(), "x")
    assert plain_path.read_bytes() == ds_path.read_bytes()
    assert _same(
        plain_index._entries[str(plain_path)].record, ds_index._entries[str(ds_path)].record
    )


def test_a_kept_study_uid_replaces_the_plain_items_own(tmp_path):
    message = build(base_orm(), {}, ("ZDS",))
    s = settings()
    intent = read_message(message, s)
    item = worklist_item.build_elements(message, intent, intent.steps[0], s)
    item.set("StudyInstanceUID", pydicom.uid.UID("1.2.3.4"))
    tags = [tag for tag, _vr, _value in item.elements]
    assert tags == sorted(tags) and len(tags) == len(set(tags))
    assert item.to_dataset().StudyInstanceUID == "1.2.3.4"
    written = pydicom.dcmread(io.BytesIO(_file_meta(UID) + encode_elements(item.elements)))
    assert written.StudyInstanceUID == "1.2.3.4"
