"""Every use of pynetdicom's internals, in one place, behind one exact version gate.

The C-FIND SCP (bridge.net.cfind) uses pynetdicom's public API only, and calls this module for two
kinds of work that reach below it:

- Bounds (always on with the pynetdicom version below): pynetdicom trusts a PDU's length field
  and reads the whole claimed length (`DULServiceProvider._read_pdu_data`), with no read
  deadline, and an association whose peer closed before its request waits out the ACSE timeout
  holding its slot. `_BoundedDUL` reads each PDU against a deadline (the ACSE timeout before the
  association is established, the network timeout after) and refuses with an A-ABORT any PDU
  longer than allowed and any message (command or identifier) longer than allowed, before
  reading it; a connection lost before its association request frees its slot at once.
- Speed-ups (on unless `dicom-speedups = false`): pending C-FIND responses encoded from the
  records and written in batches by the association's thread (`FastSender`), an upper layer
  that waits for the socket or for work instead of polling (`_BriskDUL`), an association reactor
  that waits for requests instead of sleeping 1 ms a turn (`_BriskAssociation`, a copy of
  upstream's), quiet logging, and pynetdicom's full garbage collection put off while
  associations are active.

What is copied from pynetdicom is checked by `UPSTREAM_SOURCES` (hashes of the upstream functions'
source, compared by the contract tests): an upgrade that changes them fails the tests. Any other
pynetdicom version gets neither bounds nor speed-ups (a warning at start-up says so) and is served
through the public API, with a read timeout on every accepted socket.
"""

from __future__ import annotations

import collections
import copy
import functools
import gc
import hashlib
import inspect
import io
import logging
import os
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynetdicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

LOG = logging.getLogger("bridge.net.cfind")

# The pynetdicom release the copies and the attribute checks below were taken from.
PYNETDICOM_VERSION = "3.0.4"
VERSION_MATCHES = pynetdicom.__version__ == PYNETDICOM_VERSION

# sha256 of inspect.getsource() of each upstream function this module copies or depends on the
# body of. The contract tests compare them with the installed pynetdicom.
UPSTREAM_SOURCES: dict[str, str] = {
    "pynetdicom.association.Association._run_reactor": (
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee"
    ),
    "pynetdicom.association.Association.run_reactor": (
        "ed8bbbe3b3d6ddaee3e8673ba25b2ab2a4c45f25bc1d8ae7b48ebafd09499e6d"
    ),
    "pynetdicom.dul.DULServiceProvider._read_pdu_data": (
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b"
    ),
    "pynetdicom.dul.DULServiceProvider._is_transport_event": (
        "8725ed03bb8fbdefef249d5d9888c120e6277d7b6aa2c4f537e23027186e1253"
    ),
    "pynetdicom.dul.DULServiceProvider.run_reactor": (
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803"
    ),
    # every PDU the upper layer sends goes through it (the send lock relies on that)
    "pynetdicom.transport.AssociationSocket.send": (
        "1ea8158c0b51facac667a0340b93f495b947fdc4f55663946fb30d456c804e09"
    ),
    # copies the server's presentation contexts with copy.deepcopy() (see _ContextList)
    "pynetdicom.transport.RequestHandler._create_association": (
        "05c8d12b79863cdbdb901ce37187b7030a0434c5cd89d219ed0bedbda679a61e"
    ),
    "pynetdicom.transport.AssociationServer.service_actions": (
        "0a0853a3615ac7c5260a57dcdc8b0e9908d655919b7d64737c89534869758873"
    ),
}

# Private attributes of pynetdicom objects used here (checked by the contract tests).
PRIVATE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "DULServiceProvider instance": ("_run_loop_delay", "_recv_pdu", "_decode_pdu", "_idle_timer"),
    "Association instance": (
        "_reactor_checkpoint", "_serve_request", "_is_paused", "_kill", "_server",
    ),
    "ApplicationEntity instance": ("_servers",),
    "pynetdicom._config": ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS"),
    "pynetdicom._handlers": (
        "standard_pdu_recv_handler", "standard_pdu_sent_handler",
        "standard_dimse_recv_handler", "standard_dimse_sent_handler",
    ),
}  # fmt: skip


def upstream_source_hash(qualified_name: str) -> str:
    """sha256 of the source of `qualified_name` (module.Class.function) as installed."""
    module_name, class_name, function_name = qualified_name.rsplit(".", 2)
    module = __import__(module_name, fromlist=[class_name])
    function = getattr(getattr(module, class_name), function_name)
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def missing_private_attributes() -> list[str]:
    """The PRIVATE_ATTRIBUTES the installed pynetdicom lacks (or holds in another form)."""
    from pynetdicom import _config, _handlers

    ae = AE()
    assoc = Association(ae, "acceptor")
    owners = {
        "DULServiceProvider instance": assoc.dul,
        "Association instance": assoc,
        "ApplicationEntity instance": ae,
        "pynetdicom._config": _config,
        "pynetdicom._handlers": _handlers,
    }
    missing = [
        f"{owner}: {name}"
        for owner, names in PRIVATE_ATTRIBUTES.items()
        for name in names
        if not hasattr(owners[owner], name)
    ]
    if type(assoc.dul) is not DULServiceProvider:
        missing.append("Association.dul is not a DULServiceProvider")
    if not isinstance(vars(assoc.dul).get("_run_loop_delay"), float):
        missing.append("DULServiceProvider: _run_loop_delay is not a float attribute")
    if not isinstance(getattr(ae, "_servers", None), list):
        missing.append("ApplicationEntity: _servers is not a list")
    return missing


@dataclass(frozen=True)
class Limits:
    """What one peer may send (bytes, seconds); see bridge.config's C-FIND settings."""

    max_pdu: int  # the maximum PDU length we advertise (0: none)
    max_associate_request: int
    max_message: int  # a C-FIND identifier (or any message's data set)
    acse_timeout: float
    network_timeout: float


_MAX_COMMAND = 64 * 1024  # a command set is a few hundred bytes
_MAX_OTHER_PDU = 1024  # A-RELEASE and A-ABORT PDUs are 10 bytes
_ABORT_INVALID_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"  # provider, invalid parameter


class Tuning:
    """Which of this module's work is on, decided once per server."""

    def __init__(self, speedups: bool) -> None:
        self.bounds = VERSION_MATCHES
        self.speedups = VERSION_MATCHES and speedups

    def describe(self) -> str:
        if not VERSION_MATCHES:
            return (
                f"pynetdicom {pynetdicom.__version__} is not {PYNETDICOM_VERSION}: DICOM speed-ups"
                " and PDU bounds are off (read timeouts only)"
            )
        state = "on" if self.speedups else "off (dicom-speedups = false)"
        return f"pynetdicom {PYNETDICOM_VERSION}: PDU bounds on, speed-ups {state}"


# ---------------------------------------------------------------------------------------------
# The upper layer (DUL): bounded reads, and waits instead of polling


class _BoundedDUL(DULServiceProvider):
    """pynetdicom's DUL with `_read_pdu_data` bounded: a read deadline per PDU, a length limit
    per PDU type checked before the body is read, and a limit on the bytes of one message."""

    def _read_pdu_data(self) -> None:
        limits: Limits = self.__dict__["_wlb_limits"]
        wrapper = self.socket
        raw = getattr(wrapper, "socket", None)
        if raw is None:
            self.event_queue.put("Evt17")
            return
        state = self.state_machine.current_state
        before = state in ("Sta1", "Sta2", "Sta3")  # the association is not yet established
        timeout = limits.acse_timeout if before else limits.network_timeout
        deadline = time.monotonic() + timeout
        header = _read_exactly(raw, 6, deadline, limits.network_timeout)
        if not header:  # closed between two PDUs: as pynetdicom, without a word
            self._close_now(state)
            return
        if len(header) < 6:
            self._lost(state, f"closed, silent or too slow in a PDU header ({timeout:g} s)")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            self.event_queue.put("Evt19")  # as pynetdicom: an A-ABORT follows
            return
        if pdu_type in (0x01, 0x02, 0x03):
            allowed = limits.max_associate_request
        elif pdu_type == 0x04:
            allowed = limits.max_pdu or limits.max_message + 1024
        else:
            allowed = _MAX_OTHER_PDU
        if length > allowed:
            self._refuse(f"a PDU of type {pdu_type} claims {length} bytes (at most {allowed})")
            return
        body = _read_exactly(raw, length, deadline, limits.network_timeout)
        if len(body) < length:
            self._lost(state, f"closed or too slow within a PDU ({timeout:g} s)")
            return
        if pdu_type == 0x04:
            problem = self._count_message_bytes(body, limits.max_message)
            if problem:
                self._refuse(problem)
                return
        try:
            pdu, event = self._decode_pdu(bytearray(header + body))
        except Exception as exc:
            LOG.warning("DICOM peer %s: undecodable PDU: %s", _peer(raw), exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _count_message_bytes(self, body: bytes, max_message: int) -> str:
        """Add up the fragments of the message being received; a problem, or ""."""
        pending = self.__dict__.setdefault("_wlb_pending", [0, 0])  # data set, command
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            control = body[offset + 5]
            is_command = control & 1
            pending[is_command] += max(item_length - 2, 0)
            limit = _MAX_COMMAND if is_command else max_message
            if pending[is_command] > limit:
                kind = "command" if is_command else "identifier"
                return f"a DIMSE {kind} longer than {limit} bytes"
            if control & 2:  # the last fragment
                pending[is_command] = 0
            offset += 4 + item_length
        return ""

    def _refuse(self, why: str) -> None:
        """A-ABORT and close, without reading what the peer claims it will send."""
        raw = getattr(self.socket, "socket", None)
        LOG.warning("DICOM peer %s refused with A-ABORT: %s", _peer(raw), why)
        self._penalise(raw)
        if raw is not None:
            try:
                raw.settimeout(1.0)
                raw.sendall(_ABORT_INVALID_PDU)
            except (OSError, ValueError):
                pass
        self._close_now(self.state_machine.current_state)

    def _lost(self, state: str, why: str) -> None:
        raw = getattr(self.socket, "socket", None)
        LOG.warning("DICOM peer %s dropped: %s", _peer(raw), why)
        self._penalise(raw)
        self._close_now(state)

    def _penalise(self, raw: Any) -> None:
        penalties = getattr(getattr(self.assoc, "_server", None), "penalties", None)
        if isinstance(penalties, Penalties):
            penalties.note(_peer(raw).rpartition(":")[0])

    def _close_now(self, state: str) -> None:
        self.socket.close()  # puts Evt17 (transport closed) on the state machine's queue
        if state in _BEFORE_REQUEST and self.assoc.requestor.primitive is None:
            # The association thread waits (up to the ACSE timeout) for the request that will
            # never come; None is what its wait returns on a timeout: it frees the slot now.
            self.to_user_queue.put(None)


# States of an acceptor whose association thread still waits for the A-ASSOCIATE-RQ: Sta1 when
# the peer's data (or its close) is read before the connection event is processed.
_BEFORE_REQUEST = ("Sta1", "Sta2")


class Penalties:
    """Recent refusals (A-ABORT for a bound, or a drop for a deadline) by source address. A
    source refused `limit` times within `window` seconds has its next connections closed as
    they are accepted, before any association work, for the rest of that window: a peer
    reconnecting in a loop then costs the process little."""

    def __init__(self, limit: int = 8, window: float = 2.0, most_sources: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.clock = clock
        self.limit = limit
        self.window = window
        self.most_sources = most_sources
        self.refusals: dict[str, collections.deque] = {}
        self.lock = threading.Lock()

    def note(self, host: str) -> None:
        now = self.clock()
        with self.lock:
            times = self.refusals.get(host)
            if times is None:
                if len(self.refusals) >= self.most_sources:
                    self.refusals.clear()  # never grows without bound
                times = self.refusals[host] = collections.deque(maxlen=self.limit)
            times.append(now)

    def penalised(self, host: str) -> bool:
        now = self.clock()
        with self.lock:
            times = self.refusals.get(host)
            if times is None or len(times) < self.limit:
                return False
            return now - times[0] <= self.window


def _read_exactly(raw: Any, count: int, deadline: float, then: float) -> bytes:
    """`count` bytes read before `deadline`, or fewer (closed, silent, too slow, or an error).
    The socket's timeout is `then` afterwards (what sends to the peer wait at most)."""
    chunks = []
    got = 0
    try:
        while got < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            raw.settimeout(remaining)
            chunk = raw.recv(min(count - got, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except (OSError, ValueError):  # TimeoutError is an OSError
        pass
    finally:
        try:
            raw.settimeout(then)
        except (OSError, ValueError):
            pass
    return b"".join(chunks)


def _peer(raw: Any) -> str:
    try:
        host, port = raw.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "(gone)"


# pynetdicom's DUL thread loops over its outgoing queue and the socket and sleeps
# `_run_loop_delay` (1 ms) whenever both are idle: 1,000 turns a second per association, busy or
# not, and each hand-over between it and the association thread waits up to 1 ms. Here it waits
# instead until the socket is readable or the association's thread hands it something (a wake-up
# eventfd written by `send_pdu` and `kill_dul`), for at most _IDLE_WAIT (its timers).
# The association thread likewise waits on its message queue, which is also signalled when the
# DUL hands it a release or abort indication and when the DUL ends: no thread polls, so the CPU
# an association costs does not grow with how long it lasts (under load, every query lasts
# longer: polling threads then took more CPU the busier the machine was).
_IDLE_WAIT = 0.1  # s an idle DUL or association thread waits per turn (timers, kills)


class _Wakeup:
    """An eventfd (a pipe where there is none) that another thread writes to wake the DUL's
    wait; closed with the DUL, never written after (its number could be reused by then)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        if hasattr(os, "eventfd"):
            self.read_fd = self.write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self.read_fd, self.write_fd = os.pipe()
            os.set_blocking(self.read_fd, False)
            os.set_blocking(self.write_fd, False)

    def signal(self) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                os.write(self.write_fd, _ONE)
            except OSError:  # full (a pipe): a wake-up is pending anyway
                pass

    def drain(self) -> None:
        try:
            os.read(self.read_fd, 8 if self.read_fd == self.write_fd else 4096)
        except OSError:
            pass

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for fd in {self.read_fd, self.write_fd}:
                try:
                    os.close(fd)
                except OSError:
                    pass


_ONE = (1).to_bytes(8, sys.byteorder)  # what an eventfd write adds


class _BriskDUL(_BoundedDUL):
    """The bounded DUL with `_run_loop_delay` (read before each sleep) made a property that
    waits for work instead: the socket, or a wake-up from the association's thread."""

    @property
    def _run_loop_delay(self) -> float:
        wakeup = self.__dict__.get("_wlb_wakeup")
        if (
            threading.current_thread() is not self
            or wakeup is None
            or self.state_machine.current_state == "Sta1"  # closed: stop_dul() waits for us
        ):
            return self.__dict__["_run_loop_delay"]  # the value pynetdicom set
        if self.to_provider_queue.empty() and self.event_queue.empty() and not self._kill_thread:
            _wait_readable(self.__dict__.get("socket"), _IDLE_WAIT, wakeup)
        return 0.0

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        self.__dict__["_run_loop_delay"] = value

    def _is_transport_event(self) -> bool:
        _ack_promptly(self.__dict__.get("socket"))
        return super()._is_transport_event()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        wakeup = self.__dict__.get("_wlb_wakeup")
        if wakeup is not None:
            wakeup.signal()

    def kill_dul(self) -> None:
        super().kill_dul()
        wakeup = self.__dict__.get("_wlb_wakeup")
        if wakeup is not None:
            wakeup.signal()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            wakeup = self.__dict__.get("_wlb_wakeup")
            if wakeup is not None:
                wakeup.close()
            _notify(self.assoc)  # the association thread sees at once that the DUL ended


class _NotifyingQueue(queue.Queue):
    """The DUL's queue to the association (A-RELEASE and A-ABORT indications, among others):
    a put also wakes the association thread waiting on its DIMSE message queue."""

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        _notify(self.__dict__.get("_wlb_assoc"))


def _notify(assoc: Any) -> None:
    incoming = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    condition = getattr(incoming, "not_empty", None)
    if condition is None:
        return
    with condition:
        condition.notify_all()


def _wait_readable(association_socket: Any, timeout: float, wakeup: _Wakeup) -> None:
    """Until the peer's data, a wake-up, or `timeout`."""
    raw = getattr(association_socket, "socket", None)
    waiter = select.poll()
    waiter.register(wakeup.read_fd, select.POLLIN)
    try:
        if raw is not None:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return
            waiter.register(raw, select.POLLIN)
        ready = waiter.poll(timeout * 1000)
    except (OSError, ValueError):
        return  # closed: the DUL's next turn finds out
    if any(fd == wakeup.read_fd for fd, _ in ready):
        wakeup.drain()


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


# ---------------------------------------------------------------------------------------------
# The association reactor


class _BriskAssociation(Association):
    """pynetdicom's Association with a reactor that reacts to requests without delay."""

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's Association._run_reactor, statement for statement, except for its
        first: instead of sleeping 1 ms a turn (up to 1 ms between a request's arrival and its
        handling, and again for the release), wait on the DIMSE message queue, which the DUL
        also signals when it hands over a release or abort indication and when it ends
        (`_NotifyingQueue`, `_BriskDUL.run_reactor`); at most _IDLE_WAIT, for the timers."""
        self._is_paused = False
        incoming = self.dimse.msg_queue
        while not self._kill:
            _wait_for_message(incoming, self.dul.to_user_queue, _IDLE_WAIT)

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


def _wait_for_message(incoming: queue.Queue, indications: queue.Queue, timeout: float) -> None:
    """Wait until `incoming` holds something or `timeout` passed, taking nothing from it (the
    reactor takes the message after its pause checkpoint, as pynetdicom does). An indication
    from the DUL (release, abort) waiting already: a millisecond at most (the reactor acts on
    those it knows at once; this bounds the turns if another sits there)."""
    with incoming.not_empty:
        if not incoming.queue:
            incoming.not_empty.wait(0.001 if indications.queue else timeout)


def _reactor_is_known(assoc: Any) -> bool:
    try:
        dimse = assoc.dimse
        return (
            type(assoc) is Association
            and not assoc.is_alive()
            and type(dimse.msg_queue) is queue.Queue
            and type(assoc.dul.to_user_queue) is queue.Queue
            and isinstance(dimse.msg_queue.queue, collections.deque)
            and isinstance(assoc._reactor_checkpoint, threading.Event)
            and isinstance(assoc.network_timeout_response, str)
        )
    except Exception:  # not the pynetdicom we know
        return False


# ---------------------------------------------------------------------------------------------
# Per association


def peer_data_waiting(assoc: Any) -> bool:
    """Whether the peer of `assoc` has sent bytes its upper layer has not read yet (a look at
    the socket from any thread: nothing is read)."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    try:
        if raw is None or raw.fileno() < 0:
            return False
        waiter = select.poll()
        waiter.register(raw, select.POLLIN)
        return bool(waiter.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def close_before_request(assoc: Any) -> None:
    """Close a connection that has just opened (EVT_CONN_OPEN, before its threads start),
    without waiting for its A-ASSOCIATE-RQ: its association thread, which would wait for the
    request up to the ACSE timeout, ends at once (None is what that wait returns on a
    timeout)."""
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    try:
        sock.close()  # shuts the socket down; Evt17 for the upper layer
    except (OSError, AttributeError):
        pass
    incoming = getattr(dul, "to_user_queue", None)
    if incoming is not None:
        incoming.put(None)


def prepare_association(assoc: Any, tuning: Tuning, limits: Limits) -> None:
    """Called as the connection opens (before its threads start): bounds and speed-ups."""
    raw = getattr(getattr(assoc, "dul", None), "socket", None)
    raw = getattr(raw, "socket", None)
    if raw is not None:
        try:
            raw.settimeout(limits.network_timeout)  # sends to a peer that stopped reading end
        except OSError:
            pass
    if not tuning.bounds:
        return
    dul = assoc.dul
    if type(dul) is not DULServiceProvider or not isinstance(
        vars(dul).get("_run_loop_delay"), float
    ):
        return
    dul.__class__ = _BriskDUL if tuning.speedups else _BoundedDUL
    dul.__dict__["_wlb_limits"] = limits
    if not tuning.speedups:
        return
    _lock_sends(dul.socket)
    wakeup = dul.__dict__["_wlb_wakeup"] = _Wakeup()
    weakref.finalize(dul, wakeup.close)  # should its thread never run
    _quick_final_response(assoc)
    if _reactor_is_known(assoc):
        dul.to_user_queue.__class__ = _NotifyingQueue
        dul.to_user_queue.__dict__["_wlb_assoc"] = assoc
        assoc.__class__ = _BriskAssociation
    _quiet_logging(assoc)


def _lock_sends(association_socket: Any) -> None:
    """Make every send of the upper layer take a lock, which `FastSender.write` also takes to
    write answers from the association's thread: PDUs are never interleaved."""
    send = getattr(association_socket, "send", None)
    if type(association_socket) is not AssociationSocket or not callable(send):
        return
    lock = threading.Lock()

    def locked_send(bytestream: bytes) -> None:
        with lock:
            send(bytestream)

    association_socket.send = locked_send
    association_socket.__dict__["_wlb_send_lock"] = lock


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
HANDLERS_LOGGER = "pynetdicom._handlers"  # the logger those handlers write to


def _quiet_logging(assoc: Any) -> None:
    """Unbind pynetdicom's standard log handlers from `assoc` while its handler logger would not
    log a line (the bridge sets pynetdicom's loggers to WARNING unless configured otherwise)."""
    if logging.getLogger(HANDLERS_LOGGER).isEnabledFor(logging.INFO):
        return
    for event, handler in _STANDARD_LOG_HANDLERS:
        try:
            if any(bound is handler for bound, _args in assoc.get_handlers(event)):
                assoc.unbind(event, handler)
        except Exception as exc:  # not the pynetdicom we know: logging stays as it is
            LOG.debug("pynetdicom log handlers stay bound: %r", exc)
            return


def skip_identifier_logging(tuning: Tuning) -> None:
    """pynetdicom decodes every C-FIND request's identifier with pydicom and pretty-prints it
    for an INFO log line (~0.5 ms a query), and would print each answer for DEBUG lines: turned
    off (process-wide; never turned on) when pynetdicom would not log them."""
    if not tuning.speedups:
        return
    from pynetdicom import _config

    if not logging.getLogger("pynetdicom.service_class").isEnabledFor(logging.INFO):
        _config.LOG_REQUEST_IDENTIFIERS = False
    if not logging.getLogger("pynetdicom.service_class").isEnabledFor(logging.DEBUG):
        _config.LOG_RESPONSE_IDENTIFIERS = False


# ---------------------------------------------------------------------------------------------
# C-FIND answers


class FastSender:
    """Sends one C-FIND's pending responses without pynetdicom's per-response work.

    pynetdicom turns each yielded (status, Dataset) into a DIMSE message: it encodes the Dataset
    and a fresh command set with pydicom, and queues a P-DATA for each (two PDUs an answer). Here
    the command set is encoded once per query by pynetdicom itself (all pending responses of a
    query share it), each answer is encoded by `encode_answer` (or pydicom), and both go to the
    upper layer (DUL) as one P-DATA primitive: one PDU per answer, sent by the DUL thread like
    any other, so the socket is still used by that thread only. Only one message per PDU:
    pynetdicom's own receiver drops whatever follows a complete message in a PDU."""

    def __init__(self, dul: Any, context_id: int, command: bytes, max_pdu: int,
                 to_bytes: Callable[[Any], bytes | None], p_data: Any) -> None:  # fmt: skip
        self.dul = dul
        self.context_id = context_id
        self.command = command  # the command PDV: control header byte + command set
        self.max_pdu = max_pdu  # the peer's maximum PDU length, 0 for no limit
        self.to_bytes = to_bytes
        self.p_data = p_data
        # The plain TCP socket, when answers may be written to it from the association's
        # thread (`pdu`, `write`); None with TLS (an SSL object is not to be written by one
        # thread while another reads it) or without the send lock of `prepare_association`.
        self.raw: socket.socket | None = None
        self.send_lock: Any = None
        sock = getattr(dul, "socket", None)
        lock = getattr(sock, "__dict__", {}).get("_wlb_send_lock")
        raw = getattr(sock, "socket", None)
        if lock is not None and type(raw) is socket.socket:
            self.raw, self.send_lock = raw, lock

    @classmethod
    def create(
        cls,
        event: Any,
        tuning: Tuning,
        make_encoder: Callable[[bool], Callable[[Any], bytes | None]],
        make_dataset: Callable[[Any], Any],
        status: int,
    ) -> FastSender | None:
        """A sender for `event`'s C-FIND, or None (answer through pynetdicom).

        `make_encoder(implicit)` gives a function record -> bytes | None (None: use pydicom on
        `make_dataset(record)`)."""
        if not tuning.speedups:
            return None
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
                fast = make_encoder(ts == ImplicitVRLittleEndian)
            implicit, little, deflated = ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated

            def to_bytes(record: Any) -> bytes | None:
                data = fast(record) if fast is not None else None
                if data is None:  # what pynetdicom would have sent
                    data = encode(make_dataset(record), implicit, little, deflated)
                return data or None

            return cls(dul, context_id, command, max_pdu, to_bytes, P_DATA)
        except Exception as exc:  # not the pynetdicom we know: answer the slow way
            LOG.debug("fast C-FIND responses unavailable: %r", exc)
            return None

    def __call__(self, record: Any) -> bool:
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
        return True

    def _queue(self, pdvs: list) -> None:
        primitive = self.p_data()
        primitive.presentation_data_value_list = pdvs
        self.dul.send_pdu(primitive)

    def pdu(self, record: Any) -> bytes | None:
        """The P-DATA-TF PDU(s) of the pending response for `record`, as pynetdicom would
        encode them from `__call__`'s PDVs; None if it cannot be encoded."""
        data = self.to_bytes(record)
        if data is None:
            return None
        cx, command, room = self.context_id, self.command, self.max_pdu
        command_pdv = _PDV_HEADER.pack(len(command) + 1, cx) + command
        if not room or len(command_pdv) + 6 + len(data) <= room:
            data_pdv = _PDV_HEADER.pack(len(data) + 2, cx) + b"\x02" + data
            return _PDU_HEADER.pack(4, 0, len(command_pdv) + len(data_pdv)) + command_pdv + data_pdv
        parts = [_PDU_HEADER.pack(4, 0, len(command_pdv)), command_pdv]
        step = room - 6
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            header = b"\x02" if start + step >= len(data) else b"\x00"
            parts += [_PDU_HEADER.pack(4, 0, len(piece) + 6),
                      _PDV_HEADER.pack(len(piece) + 2, cx), header, piece]  # fmt: skip
        return b"".join(parts)

    def write(self, data: bytes, stall_limit: float) -> str:
        """Write `data` (whole PDUs, from `pdu`) to the peer from the calling thread, under
        the lock every send of the upper layer takes: no PDU of its own comes in between.
        Returns "" once written, "stalled" when the peer took nothing for `stall_limit`
        seconds, "closed" when the connection is gone.

        The socket's timeout is not relied upon (the upper layer's reads change it): the
        writes wait for room with poll(), then send what fits."""
        raw = self.raw
        view = memoryview(data)
        waiter = select.poll()
        try:
            waiter.register(raw, select.POLLOUT)
        except (OSError, ValueError):
            return "closed"
        with self.send_lock:
            progress = time.monotonic()
            while view:
                sent = 0
                try:
                    if waiter.poll(1000):
                        sent = raw.send(view)
                except (BlockingIOError, InterruptedError, TimeoutError):
                    pass
                except (OSError, ValueError):
                    return "closed"
                if sent:
                    view = view[sent:]
                    progress = time.monotonic()
                elif time.monotonic() - progress >= stall_limit:
                    return "stalled"
        timer = getattr(self.dul, "_idle_timer", None)
        if timer is not None:
            timer.restart()  # what the upper layer does for the PDUs it sends
        return ""


_PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
_PDV_HEADER = struct.Struct(">LB")  # item length, presentation context ID (control byte follows)


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


@functools.lru_cache(maxsize=256)
def _final_pdv(context_id: int, message_id: int, sop_class: str) -> bytes:
    """The command PDV (control header byte + command set) of a C-FIND success response
    without a data set, as pynetdicom encodes it."""
    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = 0x0000
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    pdata = next(iter(message.encode_msg(context_id, 0)))
    ((_cx, command),) = pdata.presentation_data_value_list
    return bytes(command)


def _quick_final_response(assoc: Any) -> None:
    """pynetdicom builds and encodes every C-FIND's final success response with pydicom (a
    command Dataset, validated, then written: ~12% of a query's CPU): for that one message,
    with nothing else in it, the association sends the bytes pynetdicom makes once per message
    ID (`_final_pdv`) through the same upper-layer queue. Every other message, or with a
    handler bound to EVT_DIMSE_SENT, goes pynetdicom's way."""
    dimse = getattr(assoc, "dimse", None)
    send_msg = getattr(dimse, "send_msg", None)
    if send_msg is None:
        return
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.pdu_primitives import P_DATA

    def send(primitive: Any, context_id: int) -> None:
        try:
            quick = (
                type(primitive) is C_FIND
                and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status == 0x0000
                and primitive.Identifier is None
                and primitive.ErrorComment is None
                and primitive.OffendingElement is None
                and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
            )
            if quick:
                command = _final_pdv(int(context_id), int(primitive.MessageIDBeingRespondedTo),
                                     str(primitive.AffectedSOPClassUID))  # fmt: skip
                room = int(dimse.maximum_pdu_size or 0)
                quick = not room or len(command) + 6 <= room
        except Exception:  # not the pynetdicom we know
            quick = False
        if not quick:
            send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[int(context_id), command]]
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send


_MAX_QUEUED = 16  # outgoing PDUs (one an answer)


def wait_for_peer(assoc: Any) -> bool:
    """Pause while pynetdicom's upper layer has much to send, or has data from the peer to
    read. Its thread reads from the network only when it has nothing left to send: without
    this pause a long answer is queued whole (in memory) before a C-CANCEL can even be read.
    Returns True when, after a second, there is still too much to send: the peer is not
    reading."""
    dul = getattr(assoc, "dul", None)
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


def hang_up(assoc: Any) -> None:
    """Close the connection under pynetdicom: its upper layer is blocked sending to a peer that
    does not read, so an A-ABORT could never be sent (and `abort()` would wait for it)."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# The server


class Server(ThreadedAssociationServer):
    """Does the TLS handshake in a thread of its own, with a timeout: pynetdicom does it in the
    accept thread, where one silent client blocks every new association. Turns Nagle's
    algorithm off: pynetdicom writes each response in several small sends, and Nagle plus
    delayed ACKs added ~90 ms to every C-FIND. Listens with a backlog for bursts of modalities
    (socketserver's default is 5)."""

    request_queue_size = 4096  # capped by the kernel at net.core.somaxconn (4096 by default)
    tls_context: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0
    network_timeout: float = 60.0
    tuning: Tuning = Tuning(speedups=False)
    # pynetdicom runs a full gc.collect() after every 60th connection, in the accept thread, just
    # as that connection's association starts (~65 ms with 10,000 items in memory, the whole
    # process stopped meanwhile), to free the reference cycles of ended associations. With the
    # speed-ups, the bridge counts connections itself and, once none is active, collects the
    # young generations only: the cycles of recent associations are there, and it takes
    # a fraction of a millisecond; Python's own collector still runs as usual.
    collect_every = 60
    connections_since_collect = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.penalties = Penalties()
        self.penalty_logged: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    # A listening socket made by another process (the bridge's main process, for its DICOM
    # workers): every worker accepts from the one queue, so a busy worker never leaves a
    # connection waiting while another is free, and no worker may shut that queue down.
    inherited_socket: socket.socket | None = None

    def server_bind(self) -> None:
        if self.inherited_socket is None:
            super().server_bind()
            return
        self.socket.close()  # the one socketserver made, never bound
        self.socket = self.inherited_socket
        self.socket.setblocking(False)  # another worker may take a connection first
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.inherited_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        if self.inherited_socket is None:
            super().server_close()
        else:
            self.socket.close()  # not shutdown(): that would stop the other workers' accepts

    accept_gate: Any = None  # a DICOM worker's (bridge.net.dicom_workers.AcceptGate)

    def get_request(self) -> Any:
        """Accept, once the worker has room (a worker that waited finds the connection taken
        by another, as often as not: its non-blocking accept then raises, and it selects
        again)."""
        if self.accept_gate is not None:
            self.accept_gate.wait_for_room()
        return self.socket.accept()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Without TLS, nothing here can block (the association gets its own thread when
        created), so skip the extra thread per connection that only starts that thread."""
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        if self.tuning.bounds and self.penalties.penalised(host):
            if time.monotonic() - self.penalty_logged.get(host, -1e9) > self.penalties.window:
                self.penalty_logged[host] = time.monotonic()
                LOG.warning("DICOM peer %s: new connections closed at once (%d refused in %g s)",
                            host, self.penalties.limit, self.penalties.window)  # fmt: skip
            self.shutdown_request(request)
            return
        if self.tls_context is None:
            self.process_request_thread(request, client_address)
        else:
            super().process_request(request, client_address)

    def service_actions(self) -> None:
        if not self.tuning.speedups:
            super().service_actions()
            return
        if self.connections_since_collect >= self.collect_every and not self.active_associations:
            self.connections_since_collect = 0
            gc.collect(1)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self.connections_since_collect += 1
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not a TCP socket
        try:
            request.settimeout(self.network_timeout)  # no recv or send waits forever
        except OSError:
            pass
        if self.tls_context is not None:
            try:
                request.settimeout(self.handshake_timeout)
                request = self.tls_context.wrap_socket(request, server_side=True)
                request.settimeout(self.network_timeout)
            except (OSError, ssl.SSLError) as exc:
                LOG.warning("TLS handshake with %s failed: %s", client_address, exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _ContextList(list):
    """The server's presentation contexts, copied for each association without deepcopy().

    pynetdicom gives each association `deepcopy(server.contexts)` (a few UID strings and lists in
    each of a few objects), which took 6% of a DICOM worker's time under 20 modalities. The
    strings are immutable: a copy of each context with fresh lists is as independent."""

    def __deepcopy__(self, memo: Any) -> list:
        copies = []
        for context in self:
            twin = copy.copy(context)
            for name, value in vars(twin).items():
                if isinstance(value, list):
                    setattr(twin, name, list(value))
            copies.append(twin)
        return copies


def start_server(
    ae: AE,
    address: tuple[str, int],
    handlers: list[tuple[Any, Any]],
    tuning: Tuning,
    network_timeout: float,
    handshake_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    listening_socket: socket.socket | None = None,
    accept_gate: Any = None,
) -> Server:
    """Start `ae`'s server on `address` (or on `listening_socket`, listening already) in a
    thread of its own; `ae.shutdown()` stops it."""
    server_class = Server
    if listening_socket is not None:
        server_class = type(
            "InheritedSocketServer", (Server,), {"inherited_socket": listening_socket}
        )
    server = ae.make_server(address, evt_handlers=handlers, server_class=server_class)
    server.tls_context = ssl_context
    server.handshake_timeout = handshake_timeout
    server.network_timeout = network_timeout
    server.tuning = tuning
    server.accept_gate = accept_gate
    if tuning.speedups:
        server.contexts = _ContextList(server.contexts)
    thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does, so that ae.shutdown() stops it
    return server
