"""Step 1 of the pipeline: MLLP framing over TCP (HL7 v2.5.1 appendix C).

Each message travels as <VT> message <FS><CR>. TCP gives no boundaries, so the receiver keeps a
buffer: one read may hold half a frame or several frames. Bytes outside a frame are discarded; a
frame that grows past the size limit is refused and the connection closed, without the process
holding the rest of its bytes; a frame that does not end within the frame timeout (a sender
trickling a byte a second, which the idle timeout never sees) is dropped with its connection.
Messages on one connection are answered in the order they came.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python import failure

START = b"\x0b"
END = b"\x1c"
CR = b"\x0d"

log = logging.getLogger("bridge.net.mllp")


# A TLS record of type handshake (22) and version 3.x: a ClientHello sent to the plain port.
_TLS_HANDSHAKE = (0x16, 0x03)


def frame(message: bytes) -> bytes:
    return START + message + END + CR


class MLLPReceiver(protocol.Protocol, TimeoutMixin):
    """Splits the byte stream into messages, hands each to the factory's handler and writes the
    answer back framed, one message at a time."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._in_frame = False
        self._refused = False
        self._queue: deque[bytes] = deque()
        self._busy = False
        self._first_read = True
        self._frame_timer: Any = None
        self.peer = ""
        self.host = ""

    def connectionMade(self) -> None:
        address = self.transport.getPeer()
        self.host = getattr(address, "host", "?")
        self.peer = f"{self.host}:{getattr(address, 'port', '?')}"
        self.setTimeout(self.factory.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._refused or self.transport.disconnecting:
            return  # closing: nothing more is handled (as Twisted's LineOnlyReceiver does)
        self.resetTimeout()
        if self._first_read:
            self._first_read = False
            if not self.factory.tls and tuple(data[:2]) == _TLS_HANDSHAKE:
                self._refuse_connection("a TLS handshake on the plain MLLP port")
                return
        pos, size = 0, len(data)
        while pos < size:
            if not self._in_frame:
                start = data.find(START, pos)
                if start < 0:
                    break  # noise between frames is discarded
                self._in_frame = True
                pos = start + 1  # its frame timer starts below unless it ends in this read
            end = data.find(END, pos)
            restart = data.find(START, pos, end if end >= 0 else size)
            if restart >= 0:
                # A new frame began before this one ended: the unfinished one is dropped.
                self._buffer += memoryview(data)[pos:restart][: self.factory.max_frame_size]
                self._drop_unfinished("a new frame began before it ended")
                self._stop_frame_timer()  # the new frame's starts below unless it ends here
                pos = restart + 1
                continue
            if end < 0:
                if self._frame_timer is None:  # the frame goes on past this read: timed from now
                    self._start_frame_timer()
                self._buffer += memoryview(data)[pos:]
                if len(self._buffer) > self.factory.max_frame_size:
                    self._refuse_oversized()
                return
            self._buffer += memoryview(data)[pos:end]
            pos = end + 1
            if len(self._buffer) > self.factory.max_frame_size:
                self._refuse_oversized()
                return
            self._queue.append(bytes(self._buffer))
            self._buffer.clear()
            self._in_frame = False
            self._stop_frame_timer()
        self._drain()

    def _start_frame_timer(self) -> None:
        self._stop_frame_timer()
        if self.factory.frame_timeout:
            self._frame_timer = self.factory.clock.callLater(
                self.factory.frame_timeout, self._frame_timed_out
            )

    def _stop_frame_timer(self) -> None:
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        self._frame_timer = None

    def _frame_timed_out(self) -> None:
        self._frame_timer = None
        if not self._in_frame or self._refused:
            return
        why = f"the frame did not end within the frame timeout of {self.factory.frame_timeout:g} s"
        self._drop_unfinished(why)
        self._in_frame = False
        self._refused = True
        self._queue.clear()
        self.transport.abortConnection()

    def _refuse_connection(self, why: str) -> None:
        """Close a connection that is not MLLP, with a log line, keeping none of its bytes."""
        self._refused = True
        log.warning("refused MLLP connection from %s: %s", self.peer, why)
        self.factory.refused(self.peer, why)
        self.transport.abortConnection()

    def _drain(self) -> None:
        """Answer queued messages in order; an asynchronous answer resumes the queue when done."""
        if self._busy:
            return
        while self._queue and self.connected and not self.transport.disconnecting:
            message = self._queue.popleft()
            self._busy = True
            try:
                answer = self.factory.handler(message, self.peer)
            except Exception:
                self._busy = False
                self._failed(failure.Failure())
                continue
            if not isinstance(answer, defer.Deferred):
                # answered at once (the usual case): no Deferred to build for it
                self._busy = False
                self._answer(answer)
                continue
            answer.addCallbacks(self._answer, self._failed)
            if not answer.called:
                answer.addBoth(self._resume)
                return
            self._busy = False

    def _resume(self, _: object) -> None:
        self._busy = False
        self._drain()

    def _answer(self, ack: bytes | None) -> None:
        if ack is None:
            self.transport.loseConnection()
            return
        self.transport.write(frame(ack))

    def _failed(self, failure) -> None:
        log.error("handler failed for a message from %s: %s", self.peer, failure.getTraceback())
        self.transport.loseConnection()

    def _refuse_oversized(self) -> None:
        head = bytes(self._buffer[:4096])
        self._buffer = bytearray()
        self._in_frame = False
        self._refused = True
        self._queue.clear()
        if self.factory.on_oversized is not None:
            ack = self.factory.on_oversized(head, self.peer)
            if ack:
                self.transport.write(frame(ack))
        self.transport.pauseProducing()  # stop reading the rest of it
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        log.info("closing idle MLLP connection from %s", self.peer)
        self.transport.abortConnection()

    def _drop_unfinished(self, why: str) -> None:
        """An unfinished frame is never answered (the sender will retry it) but is reported."""
        head = bytes(self._buffer[:4096])
        self._buffer.clear()
        log.warning("dropped an unfinished MLLP frame from %s: %s", self.peer, why)
        if self.factory.on_dropped is not None:
            self.factory.on_dropped(head, self.peer, why)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.setTimeout(None)
        self._stop_frame_timer()
        if self.factory.tls and not self._refused and _is_tls_failure(reason):
            why = f"TLS failure: {reason.getErrorMessage()}"
            log.warning("refused MLLP connection from %s: %s", self.peer, why)
            self.factory.refused(self.peer, why)
        if self._in_frame and self._buffer and not self._refused:
            self._drop_unfinished("the connection closed before the frame ended")
        self._buffer = bytearray()
        self._queue.clear()
        self.factory.connection_closed(self)


class MLLPFactory(protocol.ServerFactory):
    """Accepts MLLP connections within the limits and hands every message to `handler`.

    `handler(message, peer)` returns the answer (bytes, or a Deferred firing with bytes), or None
    to close the connection without an answer. `on_oversized(head, peer)` may return an answer
    for a frame refused for its size (built from its first bytes). `on_dropped(head, peer, why)`
    hears of frames dropped unfinished, `on_refused(peer, why)` of connections refused (source
    not allowed, too many, a TLS failure, a TLS handshake on the plain port).
    """

    protocol = MLLPReceiver

    def __init__(
        self,
        handler: Callable[[bytes, str], bytes | None | defer.Deferred],
        max_frame_size: int = 1024 * 1024,
        idle_timeout: float | None = 300.0,
        max_connections: int = 200,
        allowed_sources: list[str] | None = None,
        on_oversized: Callable[[bytes, str], bytes | None] | None = None,
        on_dropped: Callable[[bytes, str, str], None] | None = None,
        frame_timeout: float | None = 30.0,
        max_connections_per_source: int = 0,
        on_refused: Callable[[str, str], None] | None = None,
        tls: bool = False,
        clock: Any = None,
    ) -> None:
        self.handler = handler
        self.max_frame_size = max_frame_size
        self.idle_timeout = idle_timeout or None
        self.max_connections = max_connections
        self.allowed_sources = set(allowed_sources or [])
        self.on_oversized = on_oversized
        self.on_dropped = on_dropped
        self.frame_timeout = frame_timeout or None
        self.max_connections_per_source = max_connections_per_source
        self.on_refused = on_refused
        self.tls = tls  # a TLS listener: handshake failures are refusals
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.connections: set[MLLPReceiver] = set()
        self._per_source: dict[str, int] = {}

    @staticmethod
    def settings_options(settings: Any, on_refused: Callable[[str, str], None] | None) -> dict:
        """The keyword arguments for the limits that come from `settings` besides the basic
        ones: frame timeout, per-source limit, TLS, and where refusals are reported."""
        return {
            "frame_timeout": settings.frame_timeout,
            "max_connections_per_source": settings.max_connections_per_source,
            "tls": bool(settings.mllp_tls_cert),
            "on_refused": on_refused,
        }

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        peer = f"{host}:{getattr(addr, 'port', '?')}"
        if self.allowed_sources and host not in self.allowed_sources:
            return self._refuse(peer, "not in the allowed sources")
        if len(self.connections) >= self.max_connections:
            return self._refuse(peer, f"{len(self.connections)} connections open (max-connections)")
        held = self._per_source.get(host, 0)
        if self.max_connections_per_source and held >= self.max_connections_per_source:
            return self._refuse(
                peer, f"{held} connections open from this address (max-connections-per-source)"
            )
        proto = super().buildProtocol(addr)
        self.connections.add(proto)
        self._per_source[host] = held + 1
        proto.source = host
        return proto

    def _refuse(self, peer: str, why: str) -> None:
        log.warning("refused MLLP connection from %s: %s", peer, why)
        self.refused(peer, why)
        return None

    def refused(self, peer: str, why: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(peer, why)
            except Exception:  # a log that cannot be written must not cost the listener
                log.exception("cannot record a refused MLLP connection")

    def connection_closed(self, proto: MLLPReceiver) -> None:
        if proto in self.connections:
            self.connections.discard(proto)
            source = getattr(proto, "source", "")
            left = self._per_source.get(source, 1) - 1
            if left > 0:
                self._per_source[source] = left
            else:
                self._per_source.pop(source, None)


def _is_tls_failure(reason: Any) -> bool:
    try:
        from OpenSSL import SSL
    except ImportError:
        return False
    return reason is not None and reason.check(SSL.Error) is not None
