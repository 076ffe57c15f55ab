"""An MPPS instance as every MPPS store keeps it: Part 10 bytes from one encoder, and what a
store remembers of it (status, patient). Shared by the folder store (bridge.storage.mpps_store)
and the PostgreSQL one (bridge.storage.postgres.mpps), which import it, not each other."""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from bridge.storage.store import StoreError

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step
FINISHED = ("COMPLETED", "DISCONTINUED")  # final PPS statuses (PS3.3 C.4.14)
# The kinds of removal a retention sweep counts (metrics, the log).
REMOVED_FINISHED, REMOVED_IN_PROGRESS = "finished", "in-progress"
REMOVED_UNREAD = "past-both"  # removed at start without reading: older than both retentions


@dataclass(frozen=True)
class Retention:
    """How long instances are kept after their last change, in seconds: finished ones
    (`finished`, mpps-retention) and those not finished (`in_progress`,
    mpps-in-progress-retention, never shorter). Shared by both MPPS stores."""

    finished: float
    in_progress: float

    @classmethod
    def of(cls, settings) -> Retention:
        return cls(settings.mpps_retention * 3600, settings.mpps_in_progress_retention * 3600)

    def limit(self, status: str) -> float:
        """Seconds an instance in `status` is kept (anything not final counts as open)."""
        return self.finished if status in FINISHED else self.in_progress

    @property
    def longest(self) -> float:
        return max(self.finished, self.in_progress)


def removal_kind(status: str) -> str:
    return REMOVED_FINISHED if status in FINISHED else REMOVED_IN_PROGRESS


@dataclass
class Known:
    """What the store keeps in memory of one instance."""

    status: str
    patient_id: str
    issuer: str


def encode_instance(uid: str, dataset: Dataset) -> bytes:
    """An MPPS instance as Part 10 bytes (Explicit VR Little Endian), its UIDs set; StoreError
    for a value pydicom cannot write as the peer sent it. Shared by every MPPS backend."""
    dataset.SOPClassUID = MPPS_SOP_CLASS
    dataset.SOPInstanceUID = uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MPPS_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta = meta
    buffer = io.BytesIO()
    try:
        dataset.save_as(buffer, enforce_file_format=True)
    except Exception as exc:
        raise StoreError(f"cannot encode MPPS instance: {type(exc).__name__}: {exc}") from exc
    return buffer.getvalue()


def known_of(ds: Dataset) -> Known:
    return Known(
        status=str(ds.get("PerformedProcedureStepStatus", "")),
        patient_id=str(ds.get("PatientID", "")),
        issuer=str(ds.get("IssuerOfPatientID", "")),
    )
