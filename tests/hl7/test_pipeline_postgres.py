"""The pipeline on a PostgreSQL store shared with another bridge: a patient update re-reads each
item under its order's lock, so what the other bridge committed in between is kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.core.events import EventBus
from bridge.core.worklist_service import WorklistService
from bridge.dicom.worklist_item import set_status
from bridge.hl7.pipeline import Bridge
from bridge.ops.translation_log import TranslationLog
from bridge.storage.index import WorklistIndex
from bridge.storage.postgres.schema import upgrade
from bridge.storage.postgres.storage import ItemFiles, PostgresStorage
from tests.hl7.test_pipeline import adt
from tests.messages import orm
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


class PgHarness:
    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.settings = Settings(
            worklist_dir=tmp_path / "wl", rejected_dir=tmp_path / "rejected", store=dsn
        )
        self.storage = PostgresStorage(self.settings)
        self.storage.prepare()
        self.index = WorklistIndex(self.settings)
        self.service = WorklistService(
            self.settings, ItemFiles(self.storage), self.index, EventBus(), storage=self.storage
        )
        self.bridge = Bridge(
            self.settings,
            ItemFiles(self.storage),
            self.index,
            TranslationLog(tmp_path / "translation.log"),
            service=self.service,
        )

    def send(self, text: str) -> str:
        ack = self.bridge.handle(text.encode("latin-1"), "127.0.0.1:1234")
        return re.search(rb"MSA\|([A-Z]{2})", ack).group(1).decode()

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def bridges(tmp_path: Path, dsn: str):
    a = PgHarness(tmp_path / "a", dsn)
    b = PgHarness(tmp_path / "b", dsn)
    yield a, b
    a.close()
    b.close()


def change_after_the_look_up(harness: PgHarness, change) -> None:
    """The other bridge's change lands between the patient look-up and the write (the race)."""
    look_up = harness.service.items_of_patient

    def items_then_change(*args, **kwargs):
        found = look_up(*args, **kwargs)
        change()
        return found

    harness.service.items_of_patient = items_then_change


def test_an_a08_does_not_bring_back_an_order_the_other_bridge_cancelled(bridges):
    a, b = bridges
    assert a.send(orm(control_id="C1", patient_id="P1")) == "AA"
    [key] = [k for k, _ in b.storage.scan()]
    change_after_the_look_up(a, lambda: b.service.delete(key, "hl7"))
    assert a.send(adt("A08", "A1", "P1", "SMITH^ANNA")) == "AA"
    assert not b.storage.contains(key)  # the cancel stands


def test_an_a08_keeps_the_status_the_other_bridge_set_meanwhile(bridges):
    a, b = bridges
    assert a.send(orm(control_id="C1", patient_id="P1")) == "AA"
    [key] = [k for k, _ in b.storage.scan()]

    def started_by_b() -> None:
        item = b.storage.dataset(key)
        set_status(item, "STARTED")
        b.service.put(key, item, "mpps")

    change_after_the_look_up(a, started_by_b)
    assert a.send(adt("A08", "A1", "P1", "SMITH^ANNA")) == "AA"
    item = b.storage.dataset(key)
    assert str(item.PatientName) == "SMITH^ANNA"
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "STARTED"
