"""`wlbridge convert`: what messages would become, without a server.

Integration engineers run it on their feed's messages before go-live. It drives the very `Bridge`
the server runs, with the same settings, so it answers what the server would answer: the same ACK
code and ERR, the same items. Without an output folder the items go to a temporary folder that is
removed afterwards; with one, messages are applied there as the server would (same files). Messages
are applied in order, so a file with a new order and then its cancel converts as the server would
process them. Messages that are not applied are not kept (the server keeps them in rejected-dir).
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset

from bridge.config import Settings
from bridge.hl7.pipeline import Bridge
from bridge.net.client import ack_summary
from bridge.ops.translation_log import TranslationLog
from bridge.storage.index import WorklistIndex
from bridge.storage.store import WorklistStore


@dataclass
class Report:
    ack_code: str
    text: str
    ack: bytes = b""
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    items: list[Any] = dataclasses.field(default_factory=list)  # the Datasets written


class _CapturedLog(TranslationLog):
    """The translation log's line for each message, kept for the report. `kept_as` is left
    out: convert keeps no rejected copy, and must never name a folder it has removed."""

    def __init__(self, fmt: str) -> None:
        super().__init__("-", fmt)
        self._stream = io.StringIO()
        self.records: list[dict[str, Any]] = []

    def record(self, **fields: Any) -> dict[str, Any]:
        fields.pop("kept_as", None)
        record = super().record(**fields)
        self.records.append(record)
        return record

    def take_line(self) -> str:
        line = self._stream.getvalue().rstrip("\n")
        self._stream.seek(0)
        self._stream.truncate()
        return line


class Converter:
    """One Bridge over a worklist folder (a temporary one unless `output` is given)."""

    def __init__(self, settings: Settings, output: Path | None = None) -> None:
        self._temporary = tempfile.TemporaryDirectory(prefix="wlbridge-convert-")
        scratch = Path(self._temporary.name)
        self.settings = dataclasses.replace(
            settings,
            worklist_dir=output if output is not None else scratch / "worklists",
            rejected_dir=scratch / "rejected",
            translation_log="-",
        )
        self.index = WorklistIndex(self.settings)
        self.store = WorklistStore(self.settings, self.index)
        self.store.prepare()
        self.index.load(save_cache=False)
        self.log = _CapturedLog(self.settings.translation_log_format)
        self.bridge = Bridge(
            self.settings, self.store, self.index, self.log, rejected_dir=scratch / "rejected"
        )

    def convert(self, raw: bytes) -> Report:
        """Apply one message as the server would; the report says the ACK and the items."""
        ack = self.bridge.handle(raw, peer="convert")
        code, _, _ = ack_summary(ack)
        record = self.log.records[-1] if self.log.records else {}
        lines = []
        items = []
        outcomes = str(record.get("outcome", "")).split(",")
        controls = str(record.get("order_control", "")).split(",")
        for n, name in enumerate(f for f in str(record.get("file", "")).split(",") if f):
            outcome = outcomes[n] if n < len(outcomes) else ""
            control = controls[n] if n < len(controls) else ""
            path = self._find(name)
            lines.append(f"--- {control or record.get('type', '')}: {outcome}, file {name}")
            dataset = self.store.read(path) if path is not None else None
            if dataset is None:
                lines.append("(no item: the file was removed)")
            else:
                items.append(dataset)
                shown = Dataset()  # the item's attributes, without the Part 10 file meta
                for element in dataset:
                    shown.add(element)
                lines.append(str(shown))
        lines.append("--- translation log")
        lines.append(self.log.take_line())
        lines.append("--- ACK")
        lines.append(ack.decode("utf-8", "replace").replace("\r", "\n").rstrip())
        return Report(code, "\n".join(lines), ack, record, items)

    def _find(self, name: str) -> Path | None:
        direct = self.store.folder / name
        if direct.exists():
            return direct
        return next(iter(sorted(self.settings.worklist_dir.rglob(name))), None)

    def close(self) -> None:
        self._temporary.cleanup()

    def __enter__(self) -> Converter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def convert_message(raw: bytes, settings: Settings, output: Path | None = None) -> Report:
    """One message through a fresh Converter."""
    with Converter(settings, output) as converter:
        return converter.convert(raw)
