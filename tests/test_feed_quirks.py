"""Quirks of real order feeds that still hold a worklist item, through a real `wlbridge serve`
and dcmtk's findscu: an OMG^O19 built with TQ1 under a 2.3.1 MSH-12, a DG1 in the patient part
of an ORM, a birth date that is not a date. Each is answered AA, with a note on the log line,
and served with the order's patient, accession, modality and date."""

from __future__ import annotations

from tests.messages import orm
from tests.peers import findscu_answers
from tests.test_end_to_end import msa, raw_send


def _quirky_omg() -> str:
    """An OMG^O19 (2.4 and later) labelled 2.3.1, with TQ1 for its timing, a DG1 between PV1
    and ORC, and PID-7 with seven digits."""
    message = orm(
        control_id="Q-OMG",
        message_type="OMG^O19",
        version="2.3.1",
        patient_id="QPAT7",
        accession="QACC7",
        modality="MR",
        start="202612031415",
    )
    segments = message.rstrip("\r").split("\r")
    segments[1] = segments[1].replace("|19700101|", "|1970101|")
    orc = next(i for i, s in enumerate(segments) if s.startswith("ORC"))
    segments.insert(orc, "DG1|1|I10|R05^Cough^I10")
    segments.insert(orc + 2, "TQ1|1||||||202612031415")
    return "\r".join(segments) + "\r"


def test_quirky_feed_is_acknowledged_and_served(bridge, tmp_path):
    assert msa(raw_send(bridge.mllp_port, _quirky_omg())) == ("AA", "Q-OMG")
    [line] = [r for r in bridge.log_records() if r.get("control_id") == "Q-OMG"]
    assert "OMG^O19 does not exist in HL7 2.3.1; read with the rules of 2.5.1" in line["note"]
    assert "DG1 (segment 4) before the first ORC" in line["note"]
    assert "PID^1^7: birth date '1970101' is not a date; left empty" in line["note"]
    [answer] = findscu_answers(
        bridge.dicom_port,
        [
            "PatientID=QPAT7",
            "AccessionNumber",
            "PatientBirthDate",
            "ScheduledProcedureStepSequence[0].Modality",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
        ],
        called_aet=bridge.ae_title,
        out_dir=tmp_path / "answers",
    )
    step = answer.ScheduledProcedureStepSequence[0]
    assert (answer.PatientID, answer.AccessionNumber, answer.PatientBirthDate) == (
        "QPAT7",
        "QACC7",
        "",
    )
    assert (step.Modality, step.ScheduledProcedureStepStartDate) == ("MR", "20261203")
    assert step.ScheduledProcedureStepStartTime.startswith("1415")


def test_strict_mode_refuses_the_same_feed(tmp_path):
    from tests.conftest import start_bridge

    running = start_bridge(tmp_path, "--strict")
    try:
        code, control_id = msa(raw_send(running.mllp_port, _quirky_omg()))
        assert (code, control_id) == ("AR", "Q-OMG")  # OMG^O19 does not exist in 2.3.1
        assert not running.wl_files()
    finally:
        running.stop()
