"""The DICOM side: Modality Worklist C-FIND SCP (with C-ECHO), over the worklist index.

pynetdicom runs the server in its own threads: an accept thread, and threads per association.
Handlers here run in the association's thread and only read the index (bridge.index), whose
lock is held for dictionary look-ups only.

Answering is where the time goes, so two things bypass pynetdicom's per-answer path, each with a
fallback to plain pynetdicom if its internals are not what we expect (see _FastSender and
_poll_briskly): answers are encoded straight from the compact records and handed to the upper
layer as one P-DATA-TF PDU each, and the upper layer polls briskly while an association is busy.
Per association, the association thread waits for requests instead of sleeping 1 ms a turn
(_react_briskly), and pynetdicom's logging handlers are left out while they would log nothing
(_quiet_logging).
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pynetdicom
from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification
from pynetdicom.transport import ThreadedAssociationServer

from bridge.config import Settings
from bridge.index import WorklistIndex
from bridge.matching import AnswerEncoder, Query, QueryError, Record, compile_query

LOG = logging.getLogger("bridge.cfind")

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # a requested optional key is not supported for matching
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700  # max_answers exceeded
IDENTIFIER_ERROR = 0xA900  # identifier does not match the SOP class (bad key values)
UNABLE_TO_PROCESS = 0xC312  # an answer could not be encoded (as pynetdicom reports it)

# A-ASSOCIATE-RJ: rejected permanent (1), by the service user (1), with a reason.
_REJECT_CALLING = (0x01, 0x01, 0x03)  # calling AE title not recognised
_REJECT_CALLED = (0x01, 0x01, 0x07)  # called AE title not recognised


def make_dicom_ae(settings: Settings, index: WorklistIndex) -> AE:
    """An AE offering Modality Worklist FIND and Verification, with the settings' limits."""
    pynetdicom_log = logging.getLogger("pynetdicom")
    if pynetdicom_log.level == logging.NOTSET:
        pynetdicom_log.setLevel(logging.WARNING)  # it logs identifiers (patient data) at DEBUG
    _skip_identifier_logging()
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

    def __init__(
        self, settings: Settings, index: WorklistIndex, on_query: Callable[..., None] | None = None
    ) -> None:
        self.settings = settings
        self.index = index
        self.on_query = on_query  # told of every C-FIND once answered (the translation log)
        self.per_ae = settings.worklist_layout == "per-ae"
        self.allowed = {t.strip() for t in settings.allowed_calling_aets}
        self.hidden = tuple(s.upper() for s in settings.hidden_statuses)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, self.on_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_FIND, self.on_find),
        ]

    def on_open(self, event: Any) -> None:
        assoc = event.assoc
        _poll_briskly(getattr(assoc, "dul", None))
        _react_briskly(assoc)
        _quiet_logging(assoc)

    def on_requested(self, event: Any) -> None:
        """Refuse unknown calling AE titles and (per-ae) unknown called AE titles.

        A called AE title is only ever compared with the names of the sub-folders that
        exist, never joined into a path."""
        assoc = event.assoc
        _stay_brisk(getattr(assoc, "dul", None))
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
        _stay_brisk(getattr(event.assoc, "dul", None))
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
            send = _FastSender.create(event, query, status) if records else None
            stalled = 0  # seconds the peer has not been reading our answers
            for record in records:
                stalled = stalled + 1 if _drain(dul, assoc) else 0
                if stalled >= max(self.settings.dimse_timeout, 1):
                    # Answers would pile up in memory for a peer that stopped reading.
                    outcome = "aborted: the peer stopped reading the answers"
                    _hang_up(dul)
                    return
                if not assoc.is_established:
                    outcome = "association ended"
                    return
                if event.is_cancelled:
                    outcome = "cancelled"
                    yield CANCEL, None
                    return
                if limit and sent >= limit:
                    outcome = f"truncated at max_answers={limit}"
                    comment = f"{total} matches, {limit} sent: narrow the query"
                    yield _failure(OUT_OF_RESOURCES, comment), None
                    return
                if send is None:
                    yield status, query.answer(record)  # pynetdicom encodes and sends it
                elif not send(record):
                    outcome = "failed: an answer could not be encoded"
                    yield _failure(UNABLE_TO_PROCESS, "cannot encode an answer"), None
                    return
                sent += 1
        finally:
            _stay_brisk(getattr(assoc, "dul", None))  # the release follows
            LOG.info(
                "C-FIND %s->%s keys: %s; %d answers (%d matched), %s, %.1f ms",
                calling, called, keys, sent, total, outcome,
                (time.perf_counter() - started) * 1000,
            )  # fmt: skip
            if self.on_query is not None:
                self.on_query(calling=calling, called=called, keys=keys, answers=sent,
                              matched=total, outcome=outcome,
                              ms=(time.perf_counter() - started) * 1000)  # fmt: skip


class _FastSender:
    """Sends one C-FIND's pending responses without pynetdicom's per-response work.

    pynetdicom turns each yielded (status, Dataset) into a DIMSE message: it encodes the Dataset
    and a fresh command set with pydicom, and queues a P-DATA for each (two PDUs an answer). Here
    the command set is encoded once per query by pynetdicom itself (all pending responses of a
    query share it), each answer is encoded from its record (bridge.matching.AnswerEncoder), and
    both go to the upper layer (DUL) as one P-DATA primitive: one PDU per answer, sent by the
    DUL thread like any other, so the socket is still used by that thread only. Only one message
    per PDU: pynetdicom's own receiver drops whatever follows a complete message in a PDU.

    Relies on pynetdicom internals (C_FIND_RSP.primitive_to_message/encode_msg, P_DATA,
    dul.send_pdu, dimse.maximum_pdu_size), checked in `create`: when anything is not as
    expected, `create` returns None and answers are yielded to pynetdicom as before."""

    def __init__(self, dul: Any, context_id: int, command: bytes, max_pdu: int,
                 to_bytes: Callable[[Record], bytes | None], p_data: Any) -> None:  # fmt: skip
        self.dul = dul
        self.context_id = context_id
        self.command = command  # the command PDV: control header byte + command set
        self.max_pdu = max_pdu  # the peer's maximum PDU length, 0 for no limit
        self.to_bytes = to_bytes
        self.p_data = p_data

    @classmethod
    def create(cls, event: Any, query: Query, status: int) -> _FastSender | None:
        try:
            from pynetdicom.dsutils import encode
            from pynetdicom.pdu_primitives import P_DATA

            assoc = event.assoc
            dul = assoc.dul
            context = event.context
            context_id = int(context.context_id)
            max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
            request = event.request
            command = _command_pdv(
                context_id, int(request.MessageID), str(request.AffectedSOPClassUID), status
            )
            if command[:1] != b"\x03" or (max_pdu and len(command) + 6 + 8 > max_pdu):
                return None
            if not callable(dul.send_pdu):
                return None
            ts = UID(context.transfer_syntax)
            fast = None
            if ts == ImplicitVRLittleEndian or ts == ExplicitVRLittleEndian:
                fast = AnswerEncoder(query, implicit=ts == ImplicitVRLittleEndian)
            implicit, little, deflated = ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated

            def to_bytes(record: Record) -> bytes | None:
                data = fast.encode(record) if fast is not None else None
                if data is None:  # what pynetdicom would have sent
                    data = encode(query.answer(record), implicit, little, deflated)
                return data or None

            return cls(dul, context_id, command, max_pdu, to_bytes, P_DATA)
        except Exception as exc:  # a pynetdicom that differs from 3.0: answer the slow way
            LOG.debug("fast C-FIND responses unavailable: %r", exc)
            return None

    def __call__(self, record: Record) -> bool:
        """Queue the pending response for `record`; False if it cannot be encoded."""
        data = self.to_bytes(record)
        if data is None:
            return False
        cx, command, room = self.context_id, self.command, self.max_pdu
        if not room or (4 + 1 + len(command)) + (4 + 1 + 1 + len(data)) <= room:
            self._queue([[cx, command], [cx, b"\x02" + data]])
        else:  # fragments, as pynetdicom cuts them: PDVs of at most max_pdu - 6 bytes of data
            self._queue([[cx, command]])
            step = room - 6
            for start in range(0, len(data), step):
                last = start + step >= len(data)
                self._queue([[cx, (b"\x02" if last else b"\x00") + data[start : start + step]]])
        _stay_brisk(self.dul)
        return True

    def _queue(self, pdvs: list) -> None:
        primitive = self.p_data()
        primitive.presentation_data_value_list = pdvs
        self.dul.send_pdu(primitive)


@functools.lru_cache(maxsize=256)
def _command_pdv(context_id: int, message_id: int, sop_class: str, status: int) -> bytes:
    """The command PDV (control header byte + command set) of a C-FIND pending response with a
    data set, as pynetdicom encodes it."""
    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = status
    rsp.Identifier = io.BytesIO(b"\0\0")  # any data set: "a data set follows"
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    pdata = next(iter(message.encode_msg(context_id, 0)))  # 0: no PDU limit, one PDV
    ((_cx, command),) = pdata.presentation_data_value_list
    return bytes(command)


# pynetdicom's upper layer (DUL) thread loops over its outgoing queue and the socket and sleeps
# `_run_loop_delay` (1 ms) whenever both are idle, so every hand-over between it and the
# association's thread (association request, C-FIND request, answers, release) waits up to 1 ms.
# While an association is busy, and for a moment after, it polls every 0.2 ms instead; an idle
# association goes back to 1 ms so that it does not spin.
_BRISK_DELAY = 0.0002  # s between polls while busy
_BRISK_FOR = 0.5  # s of brisk polling after the last activity seen (request, answer, echo)


class _BriskDUL(DULServiceProvider):
    """pynetdicom's DUL with `_run_loop_delay` (read before each sleep) made a property."""

    @property
    def _run_loop_delay(self) -> float:
        if time.monotonic() < self.__dict__.get("_brisk_until", 0.0):
            return _BRISK_DELAY
        return self.__dict__["_run_loop_delay"]  # the value pynetdicom set

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        self.__dict__["_run_loop_delay"] = value

    def _is_transport_event(self) -> bool:
        _ack_promptly(self.__dict__.get("socket"))
        return super()._is_transport_event()


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


def _ack_promptly(association_socket: Any) -> None:
    """Acknowledge what the peer sent at once. A client that keeps Nagle's algorithm on (as
    pynetdicom's does) holds each small write until the previous one is acknowledged, and a
    delayed ACK makes that ~40 ms a message: most of such a client's query time. Quick-ack mode
    is not permanent (the kernel leaves it by itself), so the DUL re-arms it on every turn;
    setting it also sends an ACK that is being held."""
    raw = getattr(association_socket, "socket", None)
    if _TCP_QUICKACK is None or raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except (OSError, ValueError):
        pass  # closed, or not TCP


def _poll_briskly(dul: Any) -> None:
    """Let `dul` poll briskly when _stay_brisk asks, by swapping its class for _BriskDUL (same
    layout). Anything but pynetdicom's own DUL, as we know it, is left as it is."""
    if type(dul) is DULServiceProvider and isinstance(vars(dul).get("_run_loop_delay"), float):
        dul.__class__ = _BriskDUL
        _stay_brisk(dul)


def _is_brisk(dul: Any) -> bool:
    return time.monotonic() < getattr(dul, "__dict__", {}).get("_brisk_until", 0.0)


def _stay_brisk(dul: Any) -> None:
    if type(dul) is _BriskDUL:
        dul.__dict__["_brisk_until"] = time.monotonic() + _BRISK_FOR


class _BriskAssociation(Association):
    """pynetdicom's Association with a reactor that reacts to requests without delay."""

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's Association._run_reactor, statement for statement, except for its
        first: instead of sleeping 1 ms a turn (up to 1 ms between a request's arrival and its
        handling, and again for the release), wait on the DIMSE message queue for as long, or
        for _BRISK_DELAY while the DUL polls briskly (the release request comes through the
        DUL's own queue, which cannot be waited on at the same time)."""
        self._is_paused = False
        incoming = self.dimse.msg_queue
        while not self._kill:
            _wait_for_message(incoming, _BRISK_DELAY if _is_brisk(self.dul) else 0.001)

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _PYNETDICOM_ASSOC_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _PYNETDICOM_ASSOC_LOG.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                _PYNETDICOM_ASSOC_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


_PYNETDICOM_ASSOC_LOG = logging.getLogger("pynetdicom.association")
# The reactor above is a copy of pynetdicom 3.0's: any other version keeps its own.
_REACTOR_KNOWN = pynetdicom.__version__.split(".")[:2] == ["3", "0"] and all(
    callable(getattr(Association, name, None))
    for name in ("_run_reactor", "_serve_request", "kill", "release", "abort")
)


def _wait_for_message(incoming: queue.Queue, timeout: float) -> None:
    """Wait until `incoming` holds something or `timeout` passed, taking nothing from it (the
    reactor takes the message after its pause checkpoint, as pynetdicom does)."""
    with incoming.not_empty:
        if not incoming.queue:
            incoming.not_empty.wait(timeout)


def _react_briskly(assoc: Any) -> None:
    """Give `assoc` the _BriskAssociation reactor (same layout), if it is pynetdicom 3.0's
    Association as we know it and not yet running; anything else is left as it is."""
    try:
        dimse, acse, dul = assoc.dimse, assoc.acse, assoc.dul
        known = (
            _REACTOR_KNOWN
            and type(assoc) is Association
            and not assoc.is_alive()
            and type(dimse.msg_queue) is queue.Queue
            and isinstance(dimse.msg_queue.queue, collections.deque)
            and isinstance(assoc._reactor_checkpoint, threading.Event)
            and all(
                callable(f)
                for f in (
                    dimse.get_msg,
                    acse.is_release_requested,
                    acse.is_aborted,
                    acse.send_release,
                    dul.receive_pdu,
                    dul.idle_timer_expired,
                    dul.is_alive,
                )
            )
            and isinstance(assoc.network_timeout_response, str)
        )
    except Exception:  # not the pynetdicom we know
        return
    if known:
        assoc.__class__ = _BriskAssociation


# pynetdicom binds handlers to every association that format log lines for each PDU and DIMSE
# message (the whole A-ASSOCIATE-RQ, for one) and log them at DEBUG/INFO, whether or not those
# levels are enabled.
def _standard_log_handlers() -> tuple[tuple[Any, Any], ...]:
    try:
        from pynetdicom import _handlers as h

        return (
            (evt.EVT_PDU_RECV, h.standard_pdu_recv_handler),
            (evt.EVT_PDU_SENT, h.standard_pdu_sent_handler),
            (evt.EVT_DIMSE_RECV, h.standard_dimse_recv_handler),
            (evt.EVT_DIMSE_SENT, h.standard_dimse_sent_handler),
        )
    except Exception:  # named otherwise in another pynetdicom: they stay bound
        return ()


_STANDARD_LOG_HANDLERS = _standard_log_handlers()


def _quiet_logging(assoc: Any) -> None:
    """Unbind pynetdicom's standard log handlers from `assoc` while its handler logger would not
    log a line (the bridge sets pynetdicom's loggers to WARNING unless configured otherwise)."""
    if logging.getLogger("pynetdicom._handlers").isEnabledFor(logging.INFO):
        return
    for event, handler in _STANDARD_LOG_HANDLERS:
        try:
            if any(bound is handler for bound, _args in assoc.get_handlers(event)):
                assoc.unbind(event, handler)
        except Exception as exc:  # not the pynetdicom we know: logging stays as it is
            LOG.debug("pynetdicom log handlers stay bound: %r", exc)
            return


def _skip_identifier_logging() -> None:
    """pynetdicom decodes every C-FIND request's identifier with pydicom and pretty-prints it
    for an INFO log line (~0.5 ms a query), and would print each answer for DEBUG lines: turned
    off (process-wide; never turned on) when pynetdicom would not log them."""
    try:
        from pynetdicom import _config

        if not logging.getLogger("pynetdicom.service_class").isEnabledFor(logging.INFO):
            _config.LOG_REQUEST_IDENTIFIERS = False
        if not logging.getLogger("pynetdicom.service_class").isEnabledFor(logging.DEBUG):
            _config.LOG_RESPONSE_IDENTIFIERS = False
    except Exception as exc:  # another pynetdicom: it logs as it does
        LOG.debug("pynetdicom identifier logging unchanged: %r", exc)


_MAX_QUEUED = 16  # outgoing PDUs (one an answer)


def _drain(dul: Any, assoc: Any) -> bool:
    """Pause while pynetdicom's upper layer has much to send, or has data from the peer to
    read. Its thread reads from the network only when it has nothing left to send: without
    this pause a long answer is queued whole (in memory) before a C-CANCEL can even be read.
    Returns True when, after a second, there is still too much to send: the peer is not
    reading."""
    outgoing = getattr(dul, "to_provider_queue", None)
    sock = getattr(dul, "socket", None)
    if outgoing is None:
        return False
    deadline = time.monotonic() + 1.0  # never stall an answer on pynetdicom's internals
    while assoc.is_established and time.monotonic() < deadline:
        if outgoing.qsize() > _MAX_QUEUED or (sock is not None and sock.ready):
            time.sleep(0.0002)
            continue
        return False
    return outgoing.qsize() > _MAX_QUEUED


def _hang_up(dul: Any) -> None:
    """Close the connection under pynetdicom: its upper layer is blocked sending to a peer that
    does not read, so an A-ABORT could never be sent (and `abort()` would wait for it)."""
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


def _failure(code: int, comment: str, tag: int | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO
    if tag is not None:
        status.OffendingElement = [tag]
    return status


class _Server(ThreadedAssociationServer):
    """Does the TLS handshake in a thread of its own, with a timeout: pynetdicom does it in the
    accept thread, where one silent client blocks every new association. Turns Nagle's
    algorithm off: pynetdicom writes each response in several small sends, and Nagle plus
    delayed ACKs added ~90 ms to every C-FIND."""

    tls_context: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0

    def process_request(self, request: Any, client_address: Any) -> None:
        """Without TLS, nothing here can block (the association gets its own thread when
        created), so skip the extra thread per connection that only starts that thread."""
        if self.tls_context is None:
            self.process_request_thread(request, client_address)
        else:
            super().process_request(request, client_address)

    def service_actions(self) -> None:
        """pynetdicom runs a full gc.collect() after every 60th connection, in this thread, just
        as that connection's association starts (~65 ms with 10,000 items in memory): put it
        off until no association is active. Python's own collector still runs as usual."""
        counter = getattr(self, "_gc", None)
        try:
            due = isinstance(counter, list) and counter[0] >= counter[1]
            if due and self.active_associations:
                return
        except Exception:  # another pynetdicom: as it does it
            pass
        super().service_actions()

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
    settings: Settings,
    index: WorklistIndex,
    ssl_context: ssl.SSLContext | None = None,
    on_query: Callable[..., None] | None = None,
) -> ThreadedAssociationServer:
    """Start the C-FIND/C-ECHO server on (settings.host, settings.dicom_port) without
    blocking. Stop it with `server.ae.shutdown()` (aborts open associations too)."""
    ae = make_dicom_ae(settings, index)
    scp = WorklistSCP(settings, index, on_query)
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
