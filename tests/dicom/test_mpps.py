"""The MPPS SCP against a real `wlbridge serve`, with pynetdicom as the modality's MPPS SCU:
PS3.4 F.7 statuses, the worklist following the performed steps, restarts, the log."""

from __future__ import annotations

import signal

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from bridge.net.client import find, worklist_query
from tests.conftest import start_bridge
from tests.messages import orm, segment
from tests.net.test_tls import make_pki
from tests.peers import findscu_answers
from tests.test_end_to_end import msa, raw_send

MPPS = "1.2.840.10008.3.1.2.3.3"
STUDY = "1.2.826.0.1.3680043.10.543.1"


def in_progress(*steps: Dataset, patient_id: str = "PAT001") -> Dataset:
    """An N-CREATE attribute list as a modality sends it (RAD-6)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "DOE^JANE^Q"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.ScheduledStepAttributesSequence = Sequence(list(steps) or [step()])
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedProcedureStepStartDate = "20261201"
    ds.PerformedProcedureStepStartTime = "103500"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT Head"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = Sequence()
    return ds


def step(study_uid: str = STUDY, sps_id: str = "SPS0001", accession: str = "ACC0001") -> Dataset:
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = accession
    item.RequestedProcedureID = "RP0001"
    item.ScheduledProcedureStepID = sps_id
    return item


def final(status: str = "COMPLETED") -> Dataset:
    """An N-SET modification list ending the step (RAD-7)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261201"
    ds.PerformedProcedureStepEndTime = "110000"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4.5.6"
    series.ReferencedImageSequence = Sequence()
    ds.PerformedSeriesSequence = Sequence([series])
    return ds


def associate(bridge, calling: str = "CT1"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", bridge.dicom_port, ae_title=bridge.ae_title)
    assert assoc.is_established
    return assoc


def n_create(bridge, attributes: Dataset, uid: str | None) -> tuple[Dataset, Dataset | None]:
    """One N-CREATE on an association of its own."""
    assoc = associate(bridge)
    try:
        status, reply = assoc.send_n_create(attributes, MPPS, uid)
    finally:
        assoc.release()
    assert status is not None and "Status" in status
    return status, reply


def n_set(bridge, uid: str, modifications: Dataset) -> Dataset:
    assoc = associate(bridge)
    try:
        status, _ = assoc.send_n_set(modifications, MPPS, uid)
    finally:
        assoc.release()
    assert status is not None and "Status" in status
    return status


def statuses(bridge, **match: str) -> list[str]:
    """SPS statuses C-FIND returns (status key empty: hidden statuses stay hidden)."""
    code, answers = find("127.0.0.1", bridge.dicom_port, worklist_query(**match), bridge.ae_title)
    assert code == 0
    return [a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus for a in answers]


def stored_statuses(bridge) -> list[str]:
    return [
        pydicom.dcmread(p).ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus
        for p in bridge.wl_files()
    ]


def mpps_records(bridge) -> list[dict[str, str]]:
    return [r for r in bridge.log_records() if r.get("type", "").startswith("MPPS^")]


def order(bridge, **fields: str) -> None:
    assert msa(raw_send(bridge.mllp_port, orm(**fields)))[0] == "AA"


def test_started_hides_the_item_and_completed_removes_it(bridge, tmp_path):
    order(bridge, control_id="M1")
    assert statuses(bridge, patient_id="PAT001") == ["SCHEDULED"]
    uid = generate_uid()
    status, _ = n_create(bridge, in_progress(), uid)
    assert status.Status == 0x0000
    assert stored_statuses(bridge) == ["STARTED"]
    assert statuses(bridge, patient_id="PAT001") == []  # STARTED is hidden by default
    # findscu (dcmtk) sees the same; asking for STARTED finds it.
    answers = findscu_answers(bridge.dicom_port, ["PatientID=PAT001", "AccessionNumber"],
                              tmp_path / "answers", called_aet=bridge.ae_title)  # fmt: skip
    assert answers == []
    started = worklist_query(patient_id="PAT001")
    started.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = "STARTED"
    _, answers = find("127.0.0.1", bridge.dicom_port, started, bridge.ae_title)
    assert [a.AccessionNumber for a in answers] == ["ACC0001"]

    status = n_set(bridge, uid, final("COMPLETED"))  # another association
    assert status.Status == 0x0000
    assert bridge.wl_files() == []  # finished-retention 0: removed, as HL7-finished items
    assert [p.name for p in (tmp_path / "mpps").glob("*.dcm")] != []
    stored = pydicom.dcmread(next((tmp_path / "mpps").glob("*.dcm")))
    assert stored.SOPInstanceUID == uid and stored.PerformedProcedureStepStatus == "COMPLETED"
    assert stored.PerformedSeriesSequence[0].SeriesInstanceUID == "1.2.3.4.5.6"
    create, complete = mpps_records(bridge)
    assert create["type"] == "MPPS^N-CREATE" and create["outcome"] == "started"
    assert create["calling_ae"] == "CT1" and create["mpps_uid"] == uid
    assert create["accession"] == "ACC0001" and create["status"] == "0x0000"
    assert create["file"] and create["pps_status"] == "IN PROGRESS"
    assert complete["type"] == "MPPS^N-SET" and complete["outcome"] == "completed"
    assert complete["file"] == create["file"]


def test_retention_keeps_a_completed_item_with_its_status(tmp_path):
    running = start_bridge(tmp_path, "--finished-retention", "1")
    try:
        order(running, control_id="R1")
        uid = generate_uid()
        assert n_create(running, in_progress(), uid)[0].Status == 0
        assert n_set(running, uid, final("DISCONTINUED")).Status == 0
        assert stored_statuses(running) == ["DISCONTINUED"]
        assert statuses(running, patient_id="PAT001") == []
    finally:
        assert running.stop() == 0


def test_final_instances_are_immutable_0110_a710(bridge):
    order(bridge, control_id="F1")
    uid = generate_uid()
    assert n_create(bridge, in_progress(), uid)[0].Status == 0
    assert n_set(bridge, uid, final("COMPLETED")).Status == 0
    for again in (final("COMPLETED"), final("DISCONTINUED"), final("IN PROGRESS")):
        status = n_set(bridge, uid, again)
        assert status.Status == 0x0110
        assert status.ErrorID == 0xA710
        assert status.ErrorComment == "Performed Procedure Step Object may no longer be updated"
    assert mpps_records(bridge)[-1]["outcome"] == "refused"


def test_unknown_instance_0112_and_duplicate_0111(bridge):
    assert n_set(bridge, "1.2.3.999", final()).Status == 0x0112
    uid = generate_uid()
    assert n_create(bridge, in_progress(), uid)[0].Status == 0
    assert n_create(bridge, in_progress(), uid)[0].Status == 0x0111
    outcomes = [(r["type"], r["status"], r["outcome"]) for r in mpps_records(bridge)]
    assert outcomes == [
        ("MPPS^N-SET", "0x0112", "refused"),
        ("MPPS^N-CREATE", "0x0000", "unmatched"),
        ("MPPS^N-CREATE", "0x0111", "refused"),
    ]


def test_n_create_must_be_in_progress_0106_naming_the_attribute(bridge):
    order(bridge, control_id="S1")
    attributes = in_progress()
    attributes.PerformedProcedureStepStatus = "COMPLETED"
    status, _ = n_create(bridge, attributes, generate_uid())
    assert status.Status == 0x0106
    assert status.ErrorComment.startswith("(0040,0252)")  # N-CREATE-RSP has no attribute list
    del attributes.PerformedProcedureStepStatus
    status, _ = n_create(bridge, attributes, generate_uid())
    assert status.Status == 0x0120 and "(0040,0252)" in status.ErrorComment
    # An N-SET to a status PS3.4 does not know: 0106 with the attribute named.
    uid = generate_uid()
    assert n_create(bridge, in_progress(), uid)[0].Status == 0
    status = n_set(bridge, uid, final("ABANDONED"))
    assert status.Status == 0x0106 and status.AttributeIdentifierList == 0x00400252
    assert stored_statuses(bridge) == ["STARTED"]  # only the valid N-CREATE changed it


def test_a_missing_affected_sop_instance_uid_is_generated_and_returned(bridge):
    order(bridge, control_id="G1")
    returned = []

    def on_response(event):  # the N-CREATE-RSP's command set carries the UID
        returned.append(str(event.message.command_set.AffectedSOPInstanceUID))

    ae = AE(ae_title="CT1")
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", bridge.dicom_port, ae_title=bridge.ae_title,
                         evt_handlers=[(evt.EVT_DIMSE_RECV, on_response)])  # fmt: skip
    try:
        status, _ = assoc.send_n_create(in_progress(), MPPS, None)  # no Affected SOP Instance UID
    finally:
        assoc.release()
    assert status.Status == 0
    [uid] = returned
    [record] = mpps_records(bridge)
    assert record["mpps_uid"] == uid and "generated" in record["note"]
    assert n_set(bridge, uid, final()).Status == 0  # the returned UID names the instance
    assert bridge.wl_files() == []


def test_a_group_case_moves_every_referenced_step(bridge):
    order(bridge, control_id="GR1")
    order(bridge, control_id="GR2", accession="ACC0002", placer="PLC0002", filler="FIL0002",
          requested_procedure_id="RP0002", sps_id="SPS0002", study_uid="1.2.3.4.2")  # fmt: skip
    order(bridge, control_id="GR3", accession="ACC0003", placer="PLC0003", filler="FIL0003",
          requested_procedure_id="RP0003", sps_id="SPS0003", study_uid="1.2.3.4.3")  # fmt: skip
    uid = generate_uid()
    group = in_progress(step(), step("1.2.3.4.2", "SPS0002", "ACC0002"))
    assert n_create(bridge, group, uid)[0].Status == 0
    assert sorted(stored_statuses(bridge)) == ["SCHEDULED", "STARTED", "STARTED"]
    assert n_set(bridge, uid, final()).Status == 0
    assert stored_statuses(bridge) == ["SCHEDULED"]  # the third order was not performed
    assert len(mpps_records(bridge)[-1]["file"].split(",")) == 2


def test_matching_falls_back_to_the_accession_never_the_patient(bridge):
    order(bridge, control_id="A1")
    coerced = in_progress(step(study_uid="1.2.999.1", sps_id="SPS0001"))  # archive's Study UID
    uid = generate_uid()
    assert n_create(bridge, coerced, uid)[0].Status == 0
    assert stored_statuses(bridge) == ["STARTED"]
    # Same patient, no study/step or accession of hers: unmatched, the item is left alone.
    order(bridge, control_id="A2", accession="ACC0009", placer="PLC0009", filler="FIL0009",
          requested_procedure_id="RP0009", sps_id="SPS0009", study_uid="1.2.3.9")  # fmt: skip
    other = in_progress(step(study_uid="1.2.3.777", sps_id="", accession=""))
    assert n_create(bridge, other, generate_uid())[0].Status == 0
    assert sorted(stored_statuses(bridge)) == ["SCHEDULED", "STARTED"]
    assert mpps_records(bridge)[-1]["outcome"] == "unmatched"


def test_an_unscheduled_mpps_is_accepted_stored_and_logged(bridge, tmp_path):
    unscheduled = in_progress(step(study_uid="1.2.3.55", sps_id="", accession=""))
    uid = generate_uid()
    assert n_create(bridge, unscheduled, uid)[0].Status == 0
    assert n_set(bridge, uid, final("DISCONTINUED")).Status == 0
    [created, ended] = mpps_records(bridge)
    assert created["outcome"] == "unmatched" and ended["outcome"] == "unmatched"
    assert ended["pps_status"] == "DISCONTINUED"
    [stored] = (tmp_path / "mpps").glob("*.dcm")
    assert pydicom.dcmread(stored).PerformedProcedureStepStatus == "DISCONTINUED"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_n_create_and_n_set_across_a_restart_of_the_bridge(tmp_path, sig):
    """A success status promises a durable instance: even kill -9 right after it keeps it."""
    first = start_bridge(tmp_path)
    try:
        order(first, control_id="RS1")
        uid = generate_uid()
        assert n_create(first, in_progress(), uid)[0].Status == 0
    finally:
        first.stop(sig)
    second = start_bridge(tmp_path)
    try:
        assert statuses(second, patient_id="PAT001") == []  # still STARTED, still hidden
        assert n_create(second, in_progress(), uid)[0].Status == 0x0111  # known after restart
        assert n_set(second, uid, final()).Status == 0
        assert second.wl_files() == []
        assert n_set(second, uid, final()).Status == 0x0110
    finally:
        assert second.stop() == 0


def test_what_a_peer_sends_is_bounded(bridge):
    many = in_progress(*[step(sps_id=f"S{i}") for i in range(101)])
    status, _ = n_create(bridge, many, generate_uid())
    assert status.Status == 0x0213
    assert [r["outcome"] for r in mpps_records(bridge)] == ["refused"]
    # A data set past max-identifier-size (256 KiB) is refused before it is assembled: the
    # association is aborted, nothing is stored.
    huge = in_progress()
    huge.add_new(0x00091010, "UT", "y" * (1024 * 1024 + 10))  # a private element
    uid = generate_uid()
    assoc = associate(bridge)
    try:
        status, _ = assoc.send_n_create(huge, MPPS, uid)
    finally:
        assoc.release()
    assert status is None or "Status" not in status
    assert assoc.is_aborted or not assoc.is_established
    assert uid not in {str(r.get("mpps_uid")) for r in mpps_records(bridge)}
    # The server goes on serving.
    assert n_create(bridge, in_progress(), generate_uid())[0].Status == 0


def test_an_adt_merge_moves_the_stored_mpps_to_the_surviving_patient(bridge, tmp_path):
    order(bridge, control_id="AD1", patient_id="OLD1")
    uid = generate_uid()
    assert n_create(bridge, in_progress(patient_id="OLD1"), uid)[0].Status == 0
    merge = "\r".join([
        segment("MSH", {3: "ADT", 4: "HOSP", 7: "20261127", 9: "ADT^A40", 10: "AD2", 11: "P",
                        12: "2.5.1"}),
        segment("EVN", {2: "20261127"}),
        segment("PID", {1: "1", 3: "NEW1^^^HOSP^MR", 5: "SMITH^ANNA", 7: "19700101", 8: "F"}),
        segment("MRG", {1: "OLD1^^^HOSP^MR"}),
        segment("PV1", {1: "1", 2: "O"}),
    ]) + "\r"  # fmt: skip
    assert msa(raw_send(bridge.mllp_port, merge))[0] == "AA"
    [stored] = (tmp_path / "mpps").glob("*.dcm")
    instance = pydicom.dcmread(stored)
    assert instance.PatientID == "NEW1" and str(instance.PatientName) == "SMITH^ANNA"
    # The instance still completes the merged patient's item.
    assert n_set(bridge, uid, final()).Status == 0
    assert bridge.wl_files() == []


@pytest.mark.parametrize("calling", ["INTRUDER"])
def test_the_calling_ae_allow_list_applies_to_mpps(tmp_path, calling):
    config = tmp_path / "bridge.toml"
    config.write_text('allowed-calling-aets = ["CT1"]\n', encoding="utf-8")
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        ae = AE(ae_title=calling)
        ae.add_requested_context(MPPS)
        assoc = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
        assert assoc.is_rejected
        assert n_create(running, in_progress(), generate_uid())[0].Status == 0  # CT1 is allowed
    finally:
        assert running.stop() == 0


def mpps_over_tls_completes_an_order(tmp_path, *options: str) -> None:
    """A bridge with DICOM TLS (and `options`): plain TCP gets no association; N-CREATE and
    N-SET through TLS with a client certificate complete the order (retention 0: removed)."""
    pki = make_pki(tmp_path)
    running = start_bridge(tmp_path, *options, "--dicom-tls-cert", str(pki.server_cert),
                           "--dicom-tls-key", str(pki.server_key),
                           "--dicom-tls-ca", str(pki.ca))  # fmt: skip
    try:
        order(running, control_id="T1")
        ae = AE(ae_title="CT1")
        ae.add_requested_context(MPPS)
        plain = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title)
        assert not plain.is_established  # plain TCP gets no association
        assoc = ae.associate("127.0.0.1", running.dicom_port, ae_title=running.ae_title,
                             tls_args=(pki.client_context(), "localhost"))  # fmt: skip
        assert assoc.is_established
        try:
            uid = generate_uid()
            assert assoc.send_n_create(in_progress(), MPPS, uid)[0].Status == 0
            assert assoc.send_n_set(final(), MPPS, uid)[0].Status == 0
        finally:
            assoc.release()
        assert running.wl_files() == []
    finally:
        assert running.stop() == 0


def test_mpps_over_dicom_tls_with_a_client_certificate(tmp_path):
    mpps_over_tls_completes_an_order(tmp_path)
