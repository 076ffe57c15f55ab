"""The order status update (ORC-1 SC) built from a stored worklist item, in each receiver shape:
valid for its HL7 version (the bridge's hl7apy-derived checks and hl7apy's strict parser), with the
order's identity from the item, values escaped, encoded in the receiver's charset."""

from __future__ import annotations

from datetime import datetime

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message as hl7apy_parse
from pydicom import Dataset

from bridge.config import OutboundReceiver, Settings
from bridge.core.events import StatusChange
from bridge.dicom import worklist_item
from bridge.hl7.message import parse_message
from bridge.hl7.pipeline import interpret
from bridge.hl7.schema import check_message, check_structure
from bridge.hl7.status_message import build_status_message, dtm_from_dt, order_status
from tests.messages import orm

NOW = datetime(2026, 12, 1, 11, 0, 0)
SHAPES = {"ORM^O01": "2.3.1", "OMG^O19": "2.5.1", "OMI^O23": "2.5.1"}


def stored_item(**fields) -> Dataset:
    """A worklist item as the bridge stores it for an ORM (the mapping's own output)."""
    raw = orm(**fields).encode()
    message = parse_message(raw)
    intent = interpret(message, Settings())
    return worklist_item.build_item(message, intent, intent.steps[0], Settings())


def receiver(message: str = "ORM^O01", **fields) -> OutboundReceiver:
    values = {"receiving_application": "RIS", "receiving_facility": "RAD"} | fields
    return OutboundReceiver(name="ris", host="127.0.0.1", port=2576, message=message, **values)


def change(item: Dataset, status: str = "STARTED", **fields) -> StatusChange:
    values = {"performed_start": "20261201103512", "performing_station": "CT01"} | fields
    return StatusChange(item=item, old_status="SCHEDULED", new_status=status, cause="mpps",
                        **values)  # fmt: skip


def valid(data: bytes) -> hl7.Message:
    """The message passes the bridge's checks (strict structure) and hl7apy's strict parser;
    returned as python-hl7 parsed it."""
    message = parse_message(data)
    check_message(message, Settings())
    check_structure(message, strict=True)
    text = data.decode("utf-8")
    hl7apy_parse(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    return hl7.parse(text)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("status,code", [("STARTED", "IP"), ("COMPLETED", "CM"),
                                         ("DISCONTINUED", "DC")])  # fmt: skip
def test_each_shape_is_valid_and_carries_the_orders_identity(shape, status, code):
    item = stored_item(accession="ACC42", placer="PLC42", filler="FIL42")
    data = build_status_message(change(item, status), receiver(shape), "WB00000000000000001", NOW)
    msg = valid(data)
    msh, pid, pv1, orc, obr = (msg.segment(n) for n in ("MSH", "PID", "PV1", "ORC", "OBR"))
    assert str(msh[9]).startswith(shape) and str(msh[12]) == SHAPES[shape]
    assert (str(msh[5]), str(msh[6]), str(msh[10])) == ("RIS", "RAD", "WB00000000000000001")
    assert str(msh[18]) == "UNICODE UTF-8"
    assert (str(orc[1]), str(orc[2]), str(orc[3]), str(orc[5])) == ("SC", "PLC42", "FIL42", code)
    assert (str(obr[2]), str(obr[3]), str(obr[18]), str(obr[19])) == ("PLC42", "FIL42", "ACC42",
                                                                      "RP0001")  # fmt: skip
    assert str(obr[4]) == "CTHEAD^CT Head w/o contrast^LOCAL"
    assert str(pid[3]) == "PAT001^^^HOSP"  # with its assigning authority
    assert str(pid[5]) == "DOE^JANE^Q"
    assert str(pv1[2]) == "U"
    assert str(orc[18]) == "CT01"
    if shape == "ORM^O01":
        assert str(orc[7]) == "^^^20261201103512"
        assert b"\rTQ1|" not in data  # 2.3.1 has no TQ1: the start is in ORC-7.4
    else:
        assert str(msg.segment("TQ1")[7]) == "20261201103512"
        assert str(orc[7]) == ""
    if shape == "OMG^O19":
        obx = msg.segment("OBX")
        assert str(obx[3]) == "110180^Study Instance UID^DCM"
        assert str(obx[5]) == "1.2.826.0.1.3680043.10.543.1"
    if shape == "OMI^O23":
        ipc = msg.segment("IPC")
        assert [str(ipc[n]) for n in (1, 2, 3, 4, 5, 9)] == [
            "ACC42", "RP0001", "1.2.826.0.1.3680043.10.543.1", "SPS0001", "CT", "CT01"
        ]  # fmt: skip
        assert str(ipc[6]) == "CTHEAD^CT Head w/o contrast^LOCAL"


def test_identity_comes_from_the_item_not_the_change():
    """An MPPS without placer/filler numbers changes nothing: the item's numbers are sent."""
    item = stored_item(placer="PLACER-9", filler="FILLER-9")
    data = build_status_message(change(item, performing_station="", performed_start=""),
                                receiver(), "C1", NOW)  # fmt: skip
    orc = valid(data).segment("ORC")
    assert (str(orc[2]), str(orc[3])) == ("PLACER-9", "FILLER-9")
    assert str(orc[7]) == ""  # no PPS start known: ORC-7 left empty
    assert str(orc[18]) == "WLBRIDGE"  # the scheduled station stands in for the performing one


def test_delimiters_in_values_are_escaped_and_read_back():
    item = stored_item()
    item.PlacerOrderNumberImagingServiceRequest = "P|1^2~3\\4&5"
    item.AccessionNumber = "A&B|C"
    item.PatientName = "O'NEIL~X^ANN"
    data = build_status_message(change(item), receiver("OMI^O23"), "C2", NOW)
    assert b"P\\F\\1\\S\\2\\R\\3\\E\\4\\T\\5" in data
    message = parse_message(data)  # decodes the escapes
    assert message.first("ORC").value(2) == "P|1^2~3\\4&5"
    assert message.first("OBR").value(18) == "A&B|C"
    assert message.first("IPC").value(1) == "A&B|C"
    assert message.first("PID").value(5, 1) == "O'NEIL~X"
    valid(data)


def test_the_receivers_charset_encodes_the_message():
    item = stored_item()
    item.SpecificCharacterSet = "ISO_IR 192"
    item.PatientName = "MÜLLER^JÖRG"
    latin = build_status_message(change(item), receiver(charset="8859/1"), "C3", NOW)
    assert "MÜLLER^JÖRG".encode("latin-1") in latin and b"|8859/1" in latin.split(b"\r")[0]
    assert parse_message(latin).first("PID").value(5) == "MÜLLER"
    utf8 = build_status_message(change(item), receiver(), "C4", NOW)
    assert "MÜLLER^JÖRG".encode() in utf8
    ascii_only = build_status_message(change(item), receiver(charset="ASCII"), "C5", NOW)
    assert b"M?LLER^J?RG" in ascii_only  # cannot be carried: replaced, never a crash
    assert ascii_only.split(b"\r")[0].endswith(b"|2.3.1")  # no MSH-18 for the default


def test_statuses_that_are_not_reported():
    assert [order_status(s) for s in ("STARTED", "COMPLETED", "DISCONTINUED")] == ["IP", "CM", "DC"]
    for status in ("SCHEDULED", "ARRIVED", "READY", "CANCELED"):
        assert order_status(status) is None
        with pytest.raises(ValueError):
            build_status_message(change(stored_item(), status), receiver(), "C6", NOW)


def test_dicom_date_times_become_hl7_dtm():
    assert dtm_from_dt("20261201103512") == "20261201103512"
    assert dtm_from_dt("20261201103512.123456+0100") == "20261201103512.1234+0100"
    assert dtm_from_dt("20261201") == "20261201"
    assert dtm_from_dt("20261301") == ""  # month 13: not sent
    assert dtm_from_dt("") == ""


def test_without_a_procedure_code_the_description_is_sent():
    item = stored_item()
    del item.RequestedProcedureCodeSequence
    data = build_status_message(change(item), receiver(), "C7", NOW)
    assert str(valid(data).segment("OBR")[4]) == "^CT Head w/o contrast"
