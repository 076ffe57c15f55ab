"""One message through the pipeline, in-process: ACKs, outcomes, retries, ADT, kept rejects."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest

from bridge.config import Settings
from bridge.hl7.pipeline import Bridge
from bridge.ops.translation_log import TranslationLog, parse_logfmt
from bridge.storage.index import WorklistIndex
from bridge.storage.store import StoreError, WorklistStore
from tests.messages import orm, segment


class Harness:
    def __init__(self, tmp_path: Path, **overrides) -> None:
        self.settings = Settings(
            worklist_dir=tmp_path / "wl", rejected_dir=tmp_path / "rejected", **overrides
        )
        self.index = WorklistIndex(self.settings)
        self.store = WorklistStore(self.settings, self.index)
        self.store.prepare()
        self.index.load()
        self.log_path = tmp_path / "translation.log"
        self.log = TranslationLog(self.log_path)
        self.bridge = Bridge(self.settings, self.store, self.index, self.log)

    def send(self, text: str | bytes) -> tuple[str, str, bytes]:
        raw = text.encode("latin-1") if isinstance(text, str) else text
        ack = self.bridge.handle(raw, "127.0.0.1:1234")
        match = re.search(rb"MSA\|([A-Z]{2})\|([^|\r]*)", ack)
        return match.group(1).decode(), match.group(2).decode(), ack

    def records(self) -> list[dict[str, str]]:
        return [parse_logfmt(line) for line in self.log_path.read_text("utf-8").splitlines()]

    def items(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.store.folder.glob("*.wl"))]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def status_of(item: pydicom.Dataset) -> str:
    return item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus


def test_new_order_is_written_before_the_aa_and_logged(h):
    code, control, _ = h.send(orm(control_id="C1"))
    assert (code, control) == ("AA", "C1")
    [item] = h.items()
    assert item.AccessionNumber == "ACC0001" and status_of(item) == "SCHEDULED"
    [record] = h.records()
    assert record["outcome"] == "created" and record["order_control"] == "NW"
    assert (h.store.folder / record["file"]).exists()


def test_resent_nw_updates_in_place_and_xo_for_unknown_order_creates(h):
    h.send(orm(control_id="C1"))
    h.send(orm(control_id="C2", patient_name="DOE^JANET"))
    [item] = h.items()
    assert str(item.PatientName) == "DOE^JANET"
    h.send(orm(control_id="C3", order_control="XO", accession="OTHER", placer="P9", filler="F9",
               sps_id="S9", study_uid="1.2.3.99"))  # fmt: skip
    assert len(h.items()) == 2
    assert [r["outcome"] for r in h.records()] == ["created", "updated", "created"]


def test_status_rows_keep_or_remove_the_item(h):
    h.send(orm(control_id="S1"))
    h.send(orm(control_id="S2", order_control="SC", order_status="A"))
    assert status_of(h.items()[0]) == "ARRIVED"
    h.send(orm(control_id="S3", order_control="XO", order_status="IP"))
    assert status_of(h.items()[0]) == "STARTED"
    h.send(orm(control_id="S4", order_control="SC", order_status="CM"))
    assert h.items() == []
    assert [r["outcome"] for r in h.records()] == ["created", "arrived", "started", "removed"]


def test_cancel_of_an_unknown_order_is_acknowledged_and_logged(h):
    code, _, _ = h.send(orm(control_id="X1", order_control="CA", order_status="CA"))
    assert code == "AA"
    assert h.records()[0]["outcome"] == "nothing-to-cancel"


def test_finished_items_are_kept_with_their_status_during_retention(tmp_path):
    h = Harness(tmp_path, finished_retention=24.0)
    h.send(orm(control_id="R1"))
    h.send(orm(control_id="R2", order_control="DC", order_status="DC"))
    [item] = h.items()
    assert status_of(item) == "DISCONTINUED"
    assert h.bridge.sweep_finished() == []  # younger than 24 h
    h.settings.finished_retention = 1e-9
    removed = h.bridge.sweep_finished()
    assert len(removed) == 1 and h.items() == []
    assert h.records()[-1]["outcome"] == "expired"


def test_a_retry_with_the_same_control_id_is_applied_once_and_answered_the_same(h):
    message = orm(control_id="DUP1")
    first = h.send(message)
    h.send(orm(control_id="OTHER", order_control="CA", order_status="CA"))
    assert h.items() == []
    again = h.send(message)  # the engine lost the ACK and re-sends: not applied a second time
    assert again[2] == first[2]
    assert h.items() == []
    assert h.records()[-1]["outcome"] == "duplicate"


def test_a_message_with_several_steps_makes_several_items_or_none(h):
    code, _, _ = h.send(orm(control_id="M1", extra_groups=2))
    assert code == "AA"
    assert sorted(i.AccessionNumber for i in h.items()) == ["ACC0001", "ACC0001-1", "ACC0001-2"]
    assert h.records()[0]["outcome"] == "created,created,created"
    bad = orm(control_id="M2", extra_groups=1, accession="NEW").replace(
        "^^^202612011030^^R", "^^^not-a-date^^R", 3
    )
    code, _, _ = h.send(bad)
    assert code == "AE"
    assert len(h.items()) == 3  # nothing of the bad message was applied


def test_rejected_messages_are_kept_byte_for_byte_with_their_reason(h):
    raw = orm(control_id="BAD/../1", start="garbage").encode()
    code, _, ack = h.send(raw)
    assert code == "AE" and b"ERR|" in ack
    record = h.records()[0]
    kept = Path(record["kept_as"])
    assert kept.parent == h.settings.rejected_dir  # the control ID never becomes a path
    assert kept.read_bytes() == raw
    assert "102" in kept.with_suffix(".reason").read_text()


def test_disk_failure_is_ar_207_and_the_next_message_is_tried_afresh(h, monkeypatch):
    real_write = h.store.write

    def full_disk(*args, **kwargs):
        raise StoreError("cannot write x.wl: No space left on device")

    monkeypatch.setattr(h.store, "write", full_disk)
    code, _, ack = h.send(orm(control_id="D1"))
    assert code == "AR" and b"207" in ack and b"No space left" in ack
    monkeypatch.setattr(h.store, "write", real_write)
    assert h.send(orm(control_id="D1"))[0] == "AA"  # same ID again: not answered from memory
    assert len(h.items()) == 1


def test_a_failure_after_some_steps_says_which_were_applied(h, monkeypatch):
    real_write = h.store.write
    calls = []

    def second_write_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise StoreError("cannot write x.wl: No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(h.store, "write", second_write_fails)
    code, _, _ = h.send(orm(control_id="P1", extra_groups=1))
    assert code == "AR"
    assert h.records()[0]["outcome"] == "created,rejected"
    assert len(h.items()) == 1  # a retry applies both (the first is rewritten in place)


def adt(event: str, control_id: str, pid: str, name: str, mrg: str = "") -> str:
    segments = [
        segment("MSH", {3: "ADT", 4: "HOSP", 7: "20261127", 9: f"ADT^{event}", 10: control_id,
                        11: "P", 12: "2.5.1"}),
        segment("EVN", {2: "20261127"}),
        segment("PID", {1: "1", 3: f"{pid}^^^HOSP^MR", 5: name, 7: "19700101", 8: "F"}),
    ]  # fmt: skip
    if mrg:
        segments.append(segment("MRG", {1: f"{mrg}^^^HOSP^MR"}))
    segments.append(segment("PV1", {1: "1", 2: "O"}))
    return "\r".join(segments) + "\r"


def test_adt_updates_merges_and_arrivals_reach_the_items(h):
    h.send(orm(control_id="O1", patient_id="OLD1"))
    code, _, _ = h.send(adt("A08", "A1", "OLD1", "SMITH^ANNA"))
    assert code == "AA"
    assert str(h.items()[0].PatientName) == "SMITH^ANNA"
    h.send(adt("A40", "A2", "NEW1", "SMITH^ANNA", mrg="OLD1"))
    assert h.items()[0].PatientID == "NEW1"
    h.send(adt("A10", "A3", "NEW1", "SMITH^ANNA"))
    assert status_of(h.items()[0]) == "ARRIVED"
    code, _, _ = h.send(adt("A03", "A4", "NEW1", "SMITH^ANNA"))
    assert code == "AA"
    outcomes = [r["outcome"] for r in h.records()]
    assert outcomes == [
        "created",
        "patient-updated",
        "patient-merged",
        "patient-arrived",
        "ignored",
    ]


def test_garbage_gets_an_answer_and_a_log_line(h):
    ack = h.bridge.handle(b"\x00garbage", "127.0.0.1:9")
    assert b"MSA|AR" in ack
    assert h.records()[0]["outcome"] == "rejected"


def test_a_dropped_frame_gets_a_log_line_naming_its_control_id(h):
    h.bridge.record_dropped(orm(control_id="CUT1").encode()[:120], "127.0.0.1:7", "closed early")
    [record] = h.records()
    assert (record["control_id"], record["outcome"]) == ("CUT1", "dropped")
    assert record["reason"] == "unfinished frame: closed early"
    assert "ack" not in record


def test_a_cancel_naming_the_order_by_its_placer_number_only_removes_it(h):
    h.send(orm(control_id="K1"))
    code, _, _ = h.send(orm(control_id="K2", order_control="CA", order_status="CA", accession=""))
    assert code == "AA"
    assert h.items() == []
    assert h.records()[-1]["outcome"] == "removed"


def test_a_replacement_without_zds_keeps_the_study_instance_uid(h):
    h.send(orm(control_id="U1", study_uid="1.2.826.0.1.3680043.10.543.77"))
    xo = orm(control_id="U2", order_control="XO", start="202612031200")
    xo = "\r".join(seg for seg in xo.split("\r") if not seg.startswith("ZDS"))
    assert h.send(xo)[0] == "AA"
    [item] = h.items()
    assert item.StudyInstanceUID == "1.2.826.0.1.3680043.10.543.77"
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20261203"


def test_arrival_does_not_bring_back_finished_items(tmp_path):
    h = Harness(tmp_path, finished_retention=24.0)
    h.send(orm(control_id="F1", patient_id="PA"))
    h.send(orm(control_id="F2", patient_id="PA", order_control="SC", order_status="CM"))
    h.send(orm(control_id="F3", patient_id="PA", accession="ACC2", placer="P2", filler="F2",
               sps_id="S2", study_uid="1.2.3.9"))  # fmt: skip
    h.send(adt("A10", "A1", "PA", "DOE^JANE"))
    statuses = sorted(status_of(i) for i in h.items())
    assert statuses == ["ARRIVED", "COMPLETED"]


def test_an_item_the_update_cannot_apply_to_does_not_hold_back_the_others(h):
    h.send(orm(control_id="G1", patient_id="PG"))
    foreign = pydicom.Dataset()
    foreign.PatientID = "PG"
    foreign.PatientName = "OTHER^PROGRAM"
    foreign.ScheduledProcedureStepSequence = pydicom.Sequence([])  # no step item at all
    foreign.file_meta = pydicom.dataset.FileMetaDataset()
    foreign.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    foreign.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    foreign.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    foreign.save_as(h.store.folder / "foreign.wl", enforce_file_format=True)
    h.index.load()
    code, _, _ = h.send(adt("A10", "A2", "PG", "DOE^JANE"))
    assert code == "AA"
    assert "ARRIVED" in [status_of(i) for i in h.items() if i.ScheduledProcedureStepSequence]


def test_a_translation_log_that_cannot_be_written_does_not_cost_the_ack(h, caplog):
    h.log._stream.close()
    code, control, _ = h.send(orm(control_id="L1"))
    assert (code, control) == ("AA", "L1")
    assert "cannot write the translation log" in caplog.text


def test_an_order_for_another_patient_never_replaces_the_first_patients_item(h):
    assert h.send(orm(control_id="P1", patient_id="PAT001", patient_name="FIRST^ANN"))[0] == "AA"
    [before] = h.items()
    # Another RIS (or one reusing accession numbers): same order identifiers, other patient.
    for control, order_control in (("P2", "NW"), ("P3", "XO")):
        code, _control, ack = h.send(
            orm(control_id=control, order_control=order_control, patient_id="PAT999",
                patient_name="SECOND^BOB")
        )  # fmt: skip
        assert code == "AE" and b"|205" in ack, ack
    [after] = h.items()
    assert after.PatientID == "PAT001" and str(after.PatientName) == "FIRST^ANN"
    assert after == before
    rejected = [r for r in h.records() if r["control_id"] in ("P2", "P3")]
    assert [r["outcome"] for r in rejected] == ["rejected", "rejected"]
    assert all("belongs to patient PAT001" in r["reason"] for r in rejected)
    assert all(Path(r["kept_as"]).is_file() for r in rejected)
    # the same patient still updates its order
    assert h.send(orm(control_id="P4", order_control="XO", patient_name="FIRST^ANNA"))[0] == "AA"
    assert str(h.items()[0].PatientName) == "FIRST^ANNA"


def test_an_order_for_the_same_id_of_another_issuer_is_refused_naming_both(h):
    """PID-3.1 alone does not make the same patient: the ERR names both issuers, or an
    engineer reads "belongs to patient PAT001, not PAT001"."""
    assert h.send(orm(control_id="I1"))[0] == "AA"
    other = orm(control_id="I2", order_control="XO").replace("PAT001^^^HOSP^", "PAT001^^^CLINIC^")
    code, _control, ack = h.send(other)
    assert code == "AE" and b"|205" in ack, ack
    text = ack.decode()
    assert "belongs to patient PAT001 (HOSP), not PAT001 (CLINIC)" in text, text
    [record] = [r for r in h.records() if r["control_id"] == "I2"]
    assert "not PAT001 (CLINIC)" in record["reason"]


def test_allow_patient_change_by_order_relaxes_it_and_says_so(tmp_path):
    h = Harness(tmp_path, allow_patient_change_by_order=True)
    assert h.send(orm(control_id="Q1", patient_id="PAT001"))[0] == "AA"
    assert h.send(orm(control_id="Q2", order_control="XO", patient_id="PAT777"))[0] == "AA"
    assert h.items()[0].PatientID == "PAT777"
    note = h.records()[-1]["note"]
    assert "patient changed from PAT001 (HOSP) to PAT777 (HOSP)" in note
    assert "allow-patient-change-by-order" in note


def test_retries_of_one_rejected_message_keep_one_file(h):
    message = orm(control_id="R50", version="3.0")  # AR: evaluated afresh on each retry
    for _ in range(50):
        assert h.send(message)[0] == "AR"
    kept = sorted(p.name for p in h.settings.rejected_dir.iterdir())
    assert len(kept) == 2 and kept[0].endswith(".hl7") and kept[1].endswith(".reason")
    assert {r["kept_as"] for r in h.records()} == {str(h.settings.rejected_dir / kept[0])}
    assert len(h.records()) == 50  # each retry still logged
    h.send(orm(control_id="R51", version="3.0"))  # other bytes: kept apart
    assert len(list(h.settings.rejected_dir.glob("*.hl7"))) == 2
