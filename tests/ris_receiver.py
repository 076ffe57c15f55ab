"""A RIS for the tests: a real MLLP listener (threads and sockets) that records what it receives
and answers each message as told: AA, AE, AR, an AA for another control ID, nothing (silent), or
by closing the connection (drop). Messages are parsed with python-hl7, an HL7 reader independent of
the bridge's."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass

import hl7

START, END = b"\x0b", b"\x1c\x0d"
ANSWERS = ("AA", "AE", "AR", "wrong-id", "silent", "drop")


@dataclass
class Received:
    raw: bytes
    message: hl7.Message
    answer: str  # how it was answered

    @property
    def control_id(self) -> str:
        return str(self.message.segment("MSH")[10])

    def field(self, segment: str, number: int) -> str:
        return str(self.message.segment(segment)[number])


class RISReceiver:
    """Listens on 127.0.0.1:`port` (a free one by default) until `stop()`; `start()` again
    listens on the same port, so a test can take the RIS down and bring it back."""

    def __init__(
        self, port: int = 0, answer: str = "AA", tls: ssl.SSLContext | None = None
    ) -> None:
        self.answer = answer
        self.tls = tls  # MLLP over TLS: the server-side context
        self.handshake_failures = 0
        self.script: deque[str] = deque()  # answers for the next messages, then `answer`
        self.received: list[Received] = []
        self.connections = 0
        self._changed = threading.Condition()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._clients: set[socket.socket] = set()
        self.port = port
        self.start()

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        self._sock = sock
        thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Stop listening and close every open connection (the RIS goes down)."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        for client in list(self._clients):
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            self.connections += 1
            self._clients.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        buffer = b""
        client.settimeout(60)
        if self.tls is not None:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                self.handshake_failures += 1
                client.close()
                return
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                buffer += data
                while START in buffer and END in buffer:
                    start = buffer.index(START)
                    end = buffer.index(END, start)
                    raw, buffer = buffer[start + 1 : end], buffer[end + 2 :]
                    if not self._answer(client, raw):
                        return
        except OSError:
            return
        finally:
            self._clients.discard(client)
            client.close()

    def _answer(self, client: socket.socket, raw: bytes) -> bool:
        """Record and answer one message; False when the connection must end."""
        with self._changed:
            answer = self.script.popleft() if self.script else self.answer
        message = hl7.parse(raw.decode("utf-8"))
        control_id = str(message.segment("MSH")[10])
        with self._changed:
            self.received.append(Received(raw, message, answer))
            self._changed.notify_all()
        if answer == "drop":
            return False
        if answer == "silent":
            return True
        code = "AA" if answer == "wrong-id" else answer
        acked = "SOMETHING-ELSE" if answer == "wrong-id" else control_id
        stamp = time.strftime("%Y%m%d%H%M%S")
        ack = (
            f"MSH|^~\\&|RIS|RAD|WLBRIDGE||{stamp}||ACK|A{control_id}|P|2.5.1\r"
            f"MSA|{code}|{acked}" + ("|unknown order" if code != "AA" else "")
        )
        client.sendall(START + ack.encode() + END)
        return True

    def accepted(self) -> list[Received]:
        """Messages answered AA (with their control ID): what the RIS took."""
        with self._changed:
            return [r for r in self.received if r.answer == "AA"]

    def wait_for(self, count: int, accepted_only: bool = True, timeout: float = 30.0) -> list:
        """Block until `count` messages were accepted (or received); returns them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                pool = [r for r in self.received if r.answer == "AA" or not accepted_only]
                if len(pool) >= count:
                    return pool
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"the RIS got {len(pool)} of {count} messages in {timeout:g} s: "
                        f"{[(r.control_id, r.answer) for r in self.received]}"
                    )
                self._changed.wait(left)
