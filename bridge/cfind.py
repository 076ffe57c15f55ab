"""The DICOM side: Modality Worklist C-FIND SCP (with C-ECHO), over the worklist index.

pynetdicom runs the server in its own threads: an accept thread, and threads per association.
Handlers here run in the association's thread and only read the index (bridge.index), whose
lock is held for dictionary look-ups only.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification
from pynetdicom.transport import ThreadedAssociationServer

from bridge.config import Settings
from bridge.index import WorklistIndex
from bridge.matching import QueryError, compile_query

LOG = logging.getLogger("bridge.cfind")

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # a requested optional key is not supported for matching
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700  # max_answers exceeded
IDENTIFIER_ERROR = 0xA900  # identifier does not match the SOP class (bad key values)

# A-ASSOCIATE-RJ: rejected permanent (1), by the service user (1), with a reason.
_REJECT_CALLING = (0x01, 0x01, 0x03)  # calling AE title not recognised
_REJECT_CALLED = (0x01, 0x01, 0x07)  # called AE title not recognised


def make_dicom_ae(settings: Settings, index: WorklistIndex) -> AE:
    """An AE offering Modality Worklist FIND and Verification, with the settings' limits."""
    pynetdicom_log = logging.getLogger("pynetdicom")
    if pynetdicom_log.level == logging.NOTSET:
        pynetdicom_log.setLevel(logging.WARNING)  # it logs identifiers (patient data) at DEBUG
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(ModalityWorklistInformationFind)
    ae.add_supported_context(Verification)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    if settings.allowed_calling_aets:
        ae.require_calling_aet = [t.strip() for t in settings.allowed_calling_aets]
    return ae


class WorklistSCP:
    """The event handlers: association checks, C-ECHO and C-FIND."""

    def __init__(self, settings: Settings, index: WorklistIndex) -> None:
        self.settings = settings
        self.index = index
        self.per_ae = settings.worklist_layout == "per-ae"
        self.allowed = {t.strip() for t in settings.allowed_calling_aets}
        self.hidden = tuple(s.upper() for s in settings.hidden_statuses)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_FIND, self.on_find),
        ]

    def on_requested(self, event: Any) -> None:
        """Refuse unknown calling AE titles and (per-ae) unknown called AE titles.

        A called AE title is only ever compared with the names of the sub-folders that
        exist, never joined into a path."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        if self.allowed and calling not in self.allowed:
            LOG.warning("association from %s refused: calling AE title not allowed", calling)
            assoc.acse.send_reject(*_REJECT_CALLING)
            assoc.kill()
            return
        if self.per_ae:
            if called not in self.index.ae_folders():
                LOG.warning("association from %s refused: no worklist for called AE title %r",
                            calling, called)  # fmt: skip
                assoc.acse.send_reject(*_REJECT_CALLED)
                assoc.kill()
                return
            assoc.acceptor.ae_title = called  # answer as the AE title that was called

    def on_echo(self, event: Any) -> int:
        return 0x0000

    def on_find(self, event: Any) -> Iterator[tuple[Any, Dataset | None]]:
        started = time.perf_counter()
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        called = str(assoc.acceptor.ae_title).strip()
        outcome = "success"
        keys = "-"
        sent = total = 0
        try:
            try:
                identifier = event.identifier
                query = compile_query(
                    identifier,
                    pn_case_insensitive=self.settings.pn_case_insensitive,
                    hidden_statuses=self.hidden,
                    station_aet=calling if self.settings.own_items_only else None,
                )
            except QueryError as exc:
                outcome = f"refused ({exc})"
                yield _failure(IDENTIFIER_ERROR, str(exc), exc.tag), None
                return
            except Exception as exc:  # an identifier pydicom cannot decode
                outcome = f"refused (undecodable identifier: {exc})"
                yield _failure(IDENTIFIER_ERROR, "cannot decode the identifier"), None
                return
            keys = " ".join(query.given) or "(universal)"
            records = self.index.search(query, called if self.per_ae else None)
            total = len(records)
            status = PENDING_WARNING if query.unsupported else PENDING
            if query.unsupported:
                outcome = "success; not matched on " + ",".join(query.unsupported)
            limit = self.settings.max_answers
            dul = getattr(assoc, "dul", None)
            for record in records:
                _drain(dul, assoc)
                if event.is_cancelled:
                    outcome = "cancelled"
                    yield CANCEL, None
                    return
                if limit and sent >= limit:
                    outcome = f"truncated at max_answers={limit}"
                    comment = f"{total} matches, {limit} sent: narrow the query"
                    yield _failure(OUT_OF_RESOURCES, comment), None
                    return
                yield status, query.answer(record)
                sent += 1
        finally:
            LOG.info(
                "C-FIND %s->%s keys: %s; %d answers (%d matched), %s, %.1f ms",
                calling, called, keys, sent, total, outcome,
                (time.perf_counter() - started) * 1000,
            )  # fmt: skip


_MAX_QUEUED = 8  # outgoing PDUs


def _drain(dul: Any, assoc: Any) -> None:
    """Pause while pynetdicom's upper layer has much to send, or has data from the peer to
    read. Its thread reads from the network only when it has nothing left to send: without
    this pause a long answer is queued whole (in memory) before a C-CANCEL can even be read."""
    outgoing = getattr(dul, "to_provider_queue", None)
    sock = getattr(dul, "socket", None)
    if outgoing is None:
        return
    deadline = time.monotonic() + 1.0  # never stall an answer on pynetdicom's internals
    while assoc.is_established and time.monotonic() < deadline:
        if outgoing.qsize() > _MAX_QUEUED or (sock is not None and sock.ready):
            time.sleep(0.0002)
            continue
        return


def _failure(code: int, comment: str, tag: int | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO
    if tag is not None:
        status.OffendingElement = [tag]
    return status


class _Server(ThreadedAssociationServer):
    """Does the TLS handshake in the association's thread, with a timeout: pynetdicom does it
    in the accept thread, where one silent client blocks every new association. Turns Nagle's
    algorithm off: pynetdicom writes each response in several small sends, and Nagle plus
    delayed ACKs added ~90 ms to every C-FIND."""

    tls_context: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not a TCP socket
        if self.tls_context is not None:
            try:
                request.settimeout(self.handshake_timeout)
                request = self.tls_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                LOG.warning("TLS handshake with %s failed: %s", client_address, exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def start_dicom_server(
    settings: Settings, index: WorklistIndex, ssl_context: ssl.SSLContext | None = None
) -> ThreadedAssociationServer:
    """Start the C-FIND/C-ECHO server on (settings.host, settings.dicom_port) without
    blocking. Stop it with `server.ae.shutdown()` (aborts open associations too)."""
    ae = make_dicom_ae(settings, index)
    scp = WorklistSCP(settings, index)
    server = ae.make_server(
        (settings.host, settings.dicom_port),
        evt_handlers=scp.handlers(),
        server_class=_Server,
    )
    server.tls_context = ssl_context
    server.handshake_timeout = settings.acse_timeout
    thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does, so that ae.shutdown() stops it
    return server
