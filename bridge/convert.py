"""`wlbridge convert`: what a message would become, without a server.

Integration engineers run it on their feed's messages before go-live: it prints the ACK the bridge
would send and each worklist item; with an output folder it applies the message there as the
server would (same pipeline, same files).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from bridge import worklist_item
from bridge.ack import build_ack
from bridge.client import ack_summary
from bridge.config import Settings
from bridge.errors import HL7Error
from bridge.hl7message import parse_message, read_header
from bridge.order import OrderMessage
from bridge.pipeline import Bridge, interpret
from bridge.store import WorklistStore
from bridge.translation_log import TranslationLog


@dataclass
class Report:
    ack_code: str
    text: str


def convert_message(raw: bytes, settings: Settings, write: bool = False) -> Report:
    lines: list[str] = []
    try:
        message = parse_message(raw, settings)
        intent = interpret(message, settings)
        if isinstance(intent, OrderMessage):
            store = WorklistStore(settings)
            for step in intent.steps:
                item = worklist_item.build_item(message, intent, step, settings)
                lines.append(
                    f"--- {step.order_control}/{step.order_status or '-'}: {step.action.value}, "
                    f"status {step.status}, file {store.path_for(step.identity).name}"
                )
                lines.append(str(item))
        else:
            lines.append(f"--- {type(intent).__name__}: {intent}")
    except HL7Error:
        pass  # the ACK below says why
    if write:
        ack = _apply(raw, settings)
    else:
        ack = _would_answer(raw, settings)
    code, _, _ = ack_summary(ack)
    lines.append("--- ACK")
    lines.append(ack.decode("utf-8", "replace").replace("\r", "\n").rstrip())
    return Report(code, "\n".join(lines))


def _would_answer(raw: bytes, settings: Settings) -> bytes:
    header = read_header(raw.strip(b"\r\n\t "))
    try:
        message = parse_message(raw, settings)
        intent = interpret(message, settings)
        if isinstance(intent, OrderMessage):  # values too long for their VR are refused here
            for step in intent.steps:
                worklist_item.build_elements(message, intent, step, settings)
    except HL7Error as exc:
        return build_ack(header, exc.ack_code, [exc], text=exc.text)
    return build_ack(header, "AA")


def _apply(raw: bytes, settings: Settings) -> bytes:
    from bridge.index import WorklistIndex

    index = WorklistIndex(settings)
    store = WorklistStore(settings, index)
    store.prepare()
    index.load()
    with tempfile.TemporaryDirectory() as rejected:
        log = TranslationLog("-", settings.translation_log_format)
        bridge = Bridge(settings, store, index, log, rejected_dir=Path(rejected))
        return bridge.handle(raw, peer="convert")
