"""The store's short Part 10 encoder writes exactly what pydicom writes, or leaves it to pydicom."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom import Dataset

from bench.ingest import order_message
from bridge.config import Settings
from bridge.dicom import worklist_item
from bridge.hl7.message import parse_message
from bridge.hl7.pipeline import interpret
from bridge.storage.store import _pydicom_encode_file, encode_dataset, encode_file
from tests.messages import orm

UID = "2.25.329800735698586629295641978511506172918"


def items(raw: bytes) -> list[Dataset]:
    message = parse_message(raw)
    intent = interpret(message, Settings())
    return [worklist_item.build_item(message, intent, s, Settings()) for s in intent.steps]


MESSAGES = [
    order_message("T", 1)[2],
    order_message("T", 2)[2],
    orm(patient_name="MÜLLER^JÖRG", charset="8859/1").encode("latin-1"),
    orm(patient_name="ŠEVČÍK^€", charset="UNICODE UTF-8").encode("utf-8"),
    orm(extra_groups=2).encode("ascii"),
]


@pytest.mark.parametrize("raw", MESSAGES)
def test_the_items_the_bridge_builds_are_encoded_as_pydicom_does(raw):
    for ds in items(raw):
        assert encode_dataset(ds) is not None  # the short path is taken
        assert encode_file(ds, UID) == _pydicom_encode_file(copy.deepcopy(ds), UID)


def test_an_item_read_back_and_changed_is_encoded_as_pydicom_does():
    (ds,) = items(MESSAGES[2])
    read = pydicom.dcmread(io.BytesIO(encode_file(ds, UID)))
    worklist_item.set_status(read, "STARTED")
    del read.file_meta
    assert encode_file(read, UID) == _pydicom_encode_file(copy.deepcopy(read), UID)


def test_what_it_does_not_cover_is_left_to_pydicom():
    (ds,) = items(MESSAGES[0])
    ds.PatientWeight = "72.5"  # DS: pydicom keeps the original text
    assert encode_dataset(ds) is None
    assert pydicom.dcmread(io.BytesIO(encode_file(ds, UID))).PatientWeight == 72.5
    ds = Dataset()
    ds.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]  # code extensions
    ds.PatientName = "Yamada^Tarou"
    assert encode_dataset(ds) is None
