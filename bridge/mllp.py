"""Step 1 of the pipeline: MLLP framing over TCP (HL7 v2.5.1 appendix C).

Each message travels as <VT> message <FS><CR>. TCP gives no boundaries, so the receiver keeps a
buffer: one read may hold half a frame or several frames. Bytes outside a frame are discarded; a
frame that grows past the size limit is refused and the connection closed, without the process
holding the rest of its bytes. Messages on one connection are answered in the order they came.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from twisted.internet import defer, protocol
from twisted.protocols.policies import TimeoutMixin

START = b"\x0b"
END = b"\x1c"
CR = b"\x0d"

log = logging.getLogger("bridge.mllp")


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
        self.peer = ""

    def connectionMade(self) -> None:
        address = self.transport.getPeer()
        self.peer = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        self.setTimeout(self.factory.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self.resetTimeout()
        pos, size = 0, len(data)
        while pos < size:
            if not self._in_frame:
                start = data.find(START, pos)
                if start < 0:
                    break  # noise between frames is discarded
                self._in_frame = True
                pos = start + 1
            end = data.find(END, pos)
            restart = data.find(START, pos, end if end >= 0 else size)
            if restart >= 0:
                # A new frame began before this one ended: the unfinished one is dropped.
                self._buffer += memoryview(data)[pos:restart][: self.factory.max_frame_size]
                self._drop_unfinished("a new frame began before it ended")
                pos = restart + 1
                continue
            if end < 0:
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
        self._drain()

    def _drain(self) -> None:
        """Answer queued messages in order; an asynchronous answer resumes the queue when done."""
        if self._busy:
            return
        while self._queue and self.connected:
            message = self._queue.popleft()
            self._busy = True
            d = defer.maybeDeferred(self.factory.handler, message, self.peer)
            d.addCallbacks(self._answer, self._failed)
            if not d.called:
                d.addBoth(self._resume)
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
    hears of frames dropped unfinished.
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
    ) -> None:
        self.handler = handler
        self.max_frame_size = max_frame_size
        self.idle_timeout = idle_timeout or None
        self.max_connections = max_connections
        self.allowed_sources = set(allowed_sources or [])
        self.on_oversized = on_oversized
        self.on_dropped = on_dropped
        self.connections: set[MLLPReceiver] = set()

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if self.allowed_sources and host not in self.allowed_sources:
            log.warning("refused MLLP connection from %s: not in the allowed sources", host)
            return None
        if len(self.connections) >= self.max_connections:
            log.warning(
                "refused MLLP connection from %s: %d connections open", host, len(self.connections)
            )
            return None
        proto = super().buildProtocol(addr)
        self.connections.add(proto)
        return proto

    def connection_closed(self, proto: MLLPReceiver) -> None:
        self.connections.discard(proto)
