"""Worklist items for tests and benchmarks: complete Table K.6-1 items written as .wl files."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

MWL_FIND = "1.2.840.10008.5.1.4.31"
MODALITIES = ("CT", "MR", "US", "CR", "NM", "XA", "MG", "DX")


def uid_for(text: str) -> str:
    """A stable UID derived from `text` (2.25 form)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, text).int}"


def make_item(
    accession: str,
    *,
    patient_id: str = "PID1",
    patient_name: str = "DOE^JOHN",
    date: str = "20240105",
    time: str = "083000",
    modality: str = "CT",
    station_aets: str | list[str] = "CT1",
    status: str = "SCHEDULED",
    charset: str | None = "ISO_IR 100",
    **overrides: Any,
) -> Dataset:
    """An item carrying every Type 1 and 2 key of Table K.6-1; `overrides` set or (None)
    delete top-level keywords, `sps_*` keywords apply to the scheduled procedure step."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = "REFERRER^RITA"
    ds.ReferencedStudySequence = []
    ds.ReferencedPatientSequence = []
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.PatientWeight = "70"
    ds.MedicalAlerts = ""
    ds.Allergies = ""
    ds.PregnancyStatus = 4
    ds.StudyInstanceUID = uid_for(f"study-{accession}")
    ds.RequestingPhysician = "ORDERER^OSCAR"
    ds.RequestedProcedureDescription = f"{modality} EXAM"
    ds.RequestedProcedureCodeSequence = [_code("P1", "Procedure one")]
    ds.AdmissionID = ""
    ds.SpecialNeeds = ""
    ds.CurrentPatientLocation = ""
    ds.PatientState = ""
    ds.RequestedProcedureID = f"RP{accession}"[:16]
    ds.RequestedProcedurePriority = "ROUTINE"
    ds.PatientTransportArrangements = ""
    ds.ConfidentialityConstraintOnPatientDataDescription = ""
    sps = Dataset()
    sps.Modality = modality
    sps.RequestedContrastAgent = ""
    sps.ScheduledStationAETitle = station_aets
    sps.ScheduledProcedureStepStartDate = date
    sps.ScheduledProcedureStepStartTime = time
    sps.ScheduledPerformingPhysicianName = ""
    sps.ScheduledProcedureStepDescription = f"{modality} STEP"
    sps.ScheduledProtocolCodeSequence = [_code("X1", "Protocol one")]
    sps.ScheduledProcedureStepID = f"SPS{accession}"[:16]
    sps.ScheduledStationName = f"{modality}ROOM"
    sps.ScheduledProcedureStepLocation = ""
    sps.PreMedication = ""
    sps.ScheduledProcedureStepStatus = status
    for key, value in overrides.items():
        target, name = (sps, key[4:]) if key.startswith("sps_") else (ds, key)
        if value is None:
            delattr(target, name)
        else:
            setattr(target, name, value)
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


def query(sps: dict | None = None, charset: str | None = None, **top: Any) -> Dataset:
    """A C-FIND identifier: `top` keywords, and `sps` keywords in a one-item
    ScheduledProcedureStepSequence (with `charset` as its SpecificCharacterSet)."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    for key, value in top.items():
        setattr(ds, key, value)
    if sps is not None:
        item = Dataset()
        for key, value in sps.items():
            setattr(item, key, value)
        ds.ScheduledProcedureStepSequence = [item]
    return ds


def _code(value: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = "LOCAL"
    code.CodeMeaning = meaning
    return code


def write_item(path: Path, ds: Dataset) -> Path:
    """Write `ds` as a DICOM file (Explicit VR Little Endian, with file meta)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MWL_FIND
    meta.MediaStorageSOPInstanceUID = uid_for(f"file-{path.name}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def day_after(date: str, days: int) -> str:
    start = datetime.date(int(date[:4]), int(date[4:6]), int(date[6:]))
    return (start + datetime.timedelta(days=days)).strftime("%Y%m%d")


def generate(folder: Path, count: int, *, today: str = "20240105", days: int = 10,
             prefix: str = "", start: int = 0) -> None:  # fmt: skip
    """Items `start`..`count`-1 spread over MODALITIES (station AE title `<modality>1`), `days`
    days from `today`, one patient for every two items; file names `<prefix>item<N>.wl`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, count):
        modality = MODALITIES[i % len(MODALITIES)]
        day = day_after(today, (i // len(MODALITIES)) % days)
        ds = make_item(
            f"A{i:07d}",
            patient_id=f"P{i // 2:07d}",
            patient_name=f"PATIENT{i // 2}^TEST",
            date=day,
            time=f"{8 + i % 10:02d}{(i * 7) % 60:02d}00",
            modality=modality,
            station_aets=f"{modality}1",
        )
        write_item(folder / f"{prefix}item{i:07d}.wl", ds)
