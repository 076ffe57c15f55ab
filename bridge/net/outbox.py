"""The durable outbox: order status updates wait here until their receiver acknowledges them.

`Outbox.on_status_change` runs on the worklist writer's thread, inside the publication of a
`StatusChange`, before the MPPS that caused it is answered: it writes one message per receiver
durably (temporary file, fsync, rename, fsync of the folder) and returns. Delivery runs on the
reactor, one message in flight per receiver, oldest first:

- AA or CA (with our MSH-10 in MSA-2) ends a message: its file is removed.
- AE, AR, no ACK within `ack-timeout`, or a connection dropped after the message was written is a
  refusal: the message is tried again after a backoff (`retry-initial`, doubled up to
  `retry-max`); after `max-attempts` refusals it is parked (moved to `parked/` with the reason).
- A receiver that cannot be reached is not the message's fault: it is retried with the same
  backoff and never parked, so a RIS that is down for hours gets everything, in order, once up.
- A parked message lets the messages of other orders go, but holds those of its own order
  (same accession, placer or filler number) behind it, so a RIS never hears CM before IP.
  `retry` puts it back in its place; `drop` deletes it and releases the ones it held.

Layout: `<outbox-dir>/<receiver>/<sequence>.hl7` (the message as sent, MSH-10 included, so a
restart re-sends the same control ID) and `<receiver>/parked/<sequence>.hl7` + `.reason`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from bridge.config import OutboundReceiver, Settings, receivers_from_toml  # noqa: F401 (re-export)
from bridge.core.events import StatusChange
from bridge.hl7.message import CHARSETS, parse_message
from bridge.hl7.status_message import MESSAGE_SHAPES, build_status_message, order_status
from bridge.net.mllp import END, START, frame
from bridge.storage.store import StoreError

log = logging.getLogger("bridge.net.outbox")

RECEIVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_ACK_SIZE = 64 * 1024  # an answer larger than this is not an ACK
POLL_INTERVAL = 2.0  # seconds between looks at the folder (for `wlbridge outbox retry`)
SUFFIX = ".hl7"
PARKED = "parked"
# Causes reported to every receiver; "housekeeping" only to those that ask. Changes the RIS
# itself made (cause "hl7") are never echoed back.
REPORTED_CAUSES = ("mpps", "operator")


# ---------------------------------------------------------------------------------------------
# Settings


def check_outbound(settings: Settings) -> None:
    """The receivers' settings; raises ValueError with a sentence naming the setting."""
    seen: set[str] = set()
    for number, r in enumerate(settings.outbound, 1):
        where = f"outbound #{number}" + (f" ({r.name})" if r.name else "")
        if not RECEIVER_NAME.match(r.name):
            raise ValueError(
                f"{where}: name must be 1 to 64 letters, digits, '.', '_' or '-' "
                "(it names the receiver's outbox folder)"
            )
        if r.name in seen:
            raise ValueError(f"{where}: name {r.name!r} is used by two receivers")
        seen.add(r.name)
        if not r.host:
            raise ValueError(f"{where}: host is empty")
        if not 1 <= r.port <= 65535:
            raise ValueError(f"{where}: port must be 1 to 65535")
        if r.message not in MESSAGE_SHAPES:
            raise ValueError(f"{where}: message must be one of {', '.join(MESSAGE_SHAPES)}")
        if r.charset.strip().upper() not in CHARSETS:
            raise ValueError(
                f"{where}: charset {r.charset!r} is not an HL7 charset the bridge writes "
                f"({', '.join(c for c in CHARSETS if c)})"
            )
        if r.processing_id not in ("P", "T", "D"):
            raise ValueError(f"{where}: processing-id must be P, T or D")
        for name in ("connect_timeout", "ack_timeout", "retry_initial", "retry_max"):
            if getattr(r, name) <= 0:
                raise ValueError(f"{where}: {name.replace('_', '-')} must be more than 0 seconds")
        if r.retry_max < r.retry_initial:
            raise ValueError(f"{where}: retry-max must not be less than retry-initial")
        if r.max_attempts < 1:
            raise ValueError(f"{where}: max-attempts must be at least 1")
        if r.tls_key and not r.tls_cert:
            raise ValueError(f"{where}: tls-key is set without tls-cert")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(r, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{where}: {name.replace('_', '-')} {path!r} is not a file")
        try:
            _client_tls(r)
        except Exception as exc:  # a PEM that does not load: say so now, not at the first send
            raise ValueError(
                f"{where}: tls-ca, tls-cert or tls-key cannot be used: {exc}"
            ) from None


# ---------------------------------------------------------------------------------------------
# The folder


@dataclass(frozen=True)
class MessageFacts:
    control_id: str = ""
    message_type: str = ""
    order_status: str = ""  # ORC-5
    accession: str = ""
    placer: str = ""
    filler: str = ""
    patient_id: str = ""

    @property
    def order_keys(self) -> set[str]:
        keys = {("acc", self.accession), ("placer", self.placer), ("filler", self.filler)}
        return {f"{kind}:{value}" for kind, value in keys if value}


def message_facts(data: bytes) -> MessageFacts:
    try:
        message = parse_message(data)
    except Exception:  # a file someone edited by hand: still listable and droppable
        return MessageFacts()
    orc, obr, pid = message.first("ORC"), message.first("OBR"), message.first("PID")
    return MessageFacts(
        control_id=message.control_id,
        message_type=message.message_type,
        order_status=orc.value(5) if orc else "",
        accession=obr.value(18) if obr else "",
        placer=orc.value(2) if orc else "",
        filler=orc.value(3) if orc else "",
        patient_id=pid.value(3) if pid else "",
    )


@dataclass(frozen=True)
class OutboxEntry:
    """One message in the outbox, as `list()` shows it."""

    id: str  # `<receiver>/<sequence>`
    receiver: str
    state: str  # pending or parked
    control_id: str
    order_status: str
    accession: str
    age: float  # seconds since it was queued
    attempts: int = 0  # delivery attempts so far (this run of the bridge)
    reason: str = ""  # why it was parked

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class OutboxError(Exception):
    """An outbox operation that cannot be done (unknown id...); the text says why."""


class OutboxWriteError(StoreError, OSError):
    """A status message could not be made durable (folder gone, disk full, permissions): the
    change that caused it must not be acknowledged. The text names the receiver, short enough
    for a DICOM Error Comment."""


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


class OutboxFolder:
    """The files of the outbox; what `wlbridge outbox` works on, with or without a server."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._sequence = itertools.count(1)

    def prepare(self, receivers: list[str]) -> list[Path]:
        """Create the folders; remove temporary files left by an interrupted write (their
        status change was never acknowledged). Returns what was removed."""
        removed = []
        for name in receivers:
            (self.root / name / PARKED).mkdir(parents=True, exist_ok=True)
        highest = 0
        for name in self.receivers():
            for folder in (self.root / name, self.root / name / PARKED):
                for path in folder.glob(".*.tmp"):
                    path.unlink(missing_ok=True)
                    removed.append(path)
                for path in folder.glob("*" + SUFFIX):
                    if path.stem.isdigit():
                        highest = max(highest, int(path.stem))
        self._sequence = itertools.count(highest + 1)
        return removed

    def receivers(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def enqueue(self, receiver: str, data: bytes) -> Path:
        folder = self.root / receiver
        while True:  # never replace a waiting message, whatever the counter says
            path = folder / f"{next(self._sequence):012d}{SUFFIX}"
            if not path.exists() and not (folder / PARKED / path.name).exists():
                break
        _write_durably(path, data)
        return path

    def pending(self, receiver: str) -> list[Path]:
        return sorted((self.root / receiver).glob("[0-9]*" + SUFFIX))

    def parked(self, receiver: str) -> list[Path]:
        return sorted((self.root / receiver / PARKED).glob("[0-9]*" + SUFFIX))

    def park(self, path: Path, reason: str) -> Path:
        target = path.parent / PARKED / path.name
        target.parent.mkdir(exist_ok=True)
        _write_durably(target.with_suffix(".reason"), reason.encode("utf-8") + b"\n")
        os.replace(path, target)
        _fsync_folder(target.parent)
        _fsync_folder(path.parent)
        return target

    def entry_id(self, path: Path) -> str:
        receiver = path.parent.parent.name if path.parent.name == PARKED else path.parent.name
        return f"{receiver}/{path.stem}"

    def entries(self, attempts: dict[str, int] | None = None) -> list[OutboxEntry]:
        now = time.time()
        result = []
        for receiver in self.receivers():
            for state, paths in (
                ("pending", self.pending(receiver)),
                ("parked", self.parked(receiver)),
            ):
                for path in paths:
                    try:
                        data = path.read_bytes()
                        age = max(0.0, now - path.stat().st_mtime)
                    except FileNotFoundError:
                        continue  # delivered meanwhile
                    facts = message_facts(data)
                    reason = ""
                    if state == "parked":
                        reason_file = path.with_suffix(".reason")
                        if reason_file.exists():
                            reason = reason_file.read_text("utf-8", "replace").strip()
                    entry_id = self.entry_id(path)
                    result.append(
                        OutboxEntry(
                            id=entry_id,
                            receiver=receiver,
                            state=state,
                            control_id=facts.control_id,
                            order_status=facts.order_status,
                            accession=facts.accession,
                            age=round(age, 1),
                            attempts=(attempts or {}).get(entry_id, 0),
                            reason=reason,
                        )
                    )
        return result

    def find(self, name: str) -> Path:
        """A message by its id (`ris/000000000012`) or its control ID (MSH-10)."""
        receiver, _, stem = name.partition("/")
        if stem:
            for path in (
                self.root / receiver / f"{stem}{SUFFIX}",
                self.root / receiver / PARKED / f"{stem}{SUFFIX}",
            ):
                if path.exists():
                    return path
        for entry in self.entries():
            if entry.control_id == name:
                return self.find(entry.id)
        raise OutboxError(f"no message {name!r} in the outbox {self.root}")

    def retry(self, name: str) -> str:
        """Put a parked message back in its place in the queue; returns its id."""
        path = self.find(name)
        if path.parent.name != PARKED:
            raise OutboxError(f"{self.entry_id(path)} is not parked: it is waiting to be sent")
        target = path.parent.parent / path.name
        os.replace(path, target)
        _fsync_folder(target.parent)
        path.with_suffix(".reason").unlink(missing_ok=True)
        return self.entry_id(target)

    def drop(self, name: str) -> str:
        """Delete a message (pending or parked); returns its id."""
        path = self.find(name)
        entry_id = self.entry_id(path)
        path.unlink(missing_ok=True)
        path.with_suffix(".reason").unlink(missing_ok=True)
        _fsync_folder(path.parent)
        return entry_id


# ---------------------------------------------------------------------------------------------
# The MLLP client


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt came to."""

    ack_code: str = ""  # MSA-1, when an ACK came
    ack_control_id: str = ""  # MSA-2
    written: bool = False  # the message reached the connection (a refusal counts)
    failure: str = ""  # why there is no usable ACK


def _read_ack(ack: bytes) -> tuple[str, str, str]:
    """MSA-1, MSA-2 and the text (MSA-3 or the first ERR) of an ACK."""
    text = ack.decode("latin-1")
    sep = text[3:4] or "|"
    code = control = detail = ""
    for segment in re.split(r"\r\n|\r|\n", text):
        fields = segment.split(sep)
        if fields[0] == "MSA":
            code = fields[1].strip().upper() if len(fields) > 1 else ""
            control = fields[2].strip() if len(fields) > 2 else ""
            detail = detail or (fields[3] if len(fields) > 3 else "")
        elif fields[0] == "ERR" and len(fields) > 1:
            detail = sep.join(fields[1:])[:200]
    return code, control, detail


@implementer(IHandshakeListener)
class _AckReader(protocol.Protocol):
    """Writes one framed message and waits for one framed answer."""

    def connectionMade(self) -> None:
        factory: _SenderFactory = self.factory
        self._buffer = bytearray()
        self.transport.write(frame(factory.message))  # over TLS: sent once the handshake is done
        # A refused TLS handshake is the connection's fault, like a refused connection, so the
        # message counts as written only once the handshake completed.
        factory.written = not factory.tls
        factory.ack_timer = factory.reactor.callLater(
            factory.ack_timeout, self._no_ack, factory.ack_timeout
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        start = self._buffer.find(START)
        end = self._buffer.find(END, start + 1) if start >= 0 else -1
        if end >= 0:
            ack = bytes(self._buffer[start + 1 : end])
            code, control, detail = _read_ack(ack)
            failure = "" if code else "the answer has no MSA-1"
            if code and detail and code not in ("AA", "CA"):
                failure = detail
            self.factory.finish(Attempt(code, control, True, failure))
            self.transport.loseConnection()
        elif len(self._buffer) > MAX_ACK_SIZE:
            self.factory.finish(Attempt(written=True, failure="the answer is too large"))
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self.factory.written = True

    def _no_ack(self, seconds: float) -> None:
        self.factory.finish(Attempt(written=True, failure=f"no ACK within {seconds:g} s"))
        self.transport.abortConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        written = self.factory.written
        if self.factory.tls and _is_tls_error(reason):
            # In TLS 1.3 the server refuses a client certificate after the client has finished
            # its handshake: still the connection's fault, not the message's.
            written = False
        why = "connection closed before the ACK"
        if not written:
            why = f"TLS: {reason.getErrorMessage()}"
        self.factory.finish(Attempt(written=written, failure=why))


def _is_tls_error(reason) -> bool:
    from OpenSSL.SSL import Error

    return reason.check(Error) is not None


class _SenderFactory(protocol.ClientFactory):
    protocol = _AckReader

    def __init__(self, reactor, message: bytes, ack_timeout: float, tls: bool = False) -> None:
        self.reactor = reactor
        self.tls = tls
        self.message = message
        self.ack_timeout = ack_timeout
        self.written = False
        self.ack_timer = None
        self.connector = None
        self.result: defer.Deferred[Attempt] = defer.Deferred()

    def finish(self, attempt: Attempt) -> None:
        if self.ack_timer is not None and self.ack_timer.active():
            self.ack_timer.cancel()
        if not self.result.called:
            self.result.callback(attempt)

    def clientConnectionFailed(self, connector, reason) -> None:
        why = reason.value
        text = why.osError if isinstance(why, ConnectError) and why.osError else why
        self.finish(Attempt(failure=f"cannot connect: {text}".strip()))

    def abort(self) -> None:
        """Stop the attempt (bridge shutting down); the message stays in the outbox."""
        if self.connector is not None:
            self.connector.disconnect()
        self.finish(Attempt(written=self.written, failure="the bridge stopped"))


def _client_tls(receiver: OutboundReceiver):
    if not (receiver.tls_ca or receiver.tls_cert):
        return None
    from twisted.internet import ssl as tssl

    trust = tssl.platformTrust()
    if receiver.tls_ca:
        trust = tssl.Certificate.loadPEM(Path(receiver.tls_ca).read_bytes())
    client_certificate = None
    if receiver.tls_cert:
        pem = Path(receiver.tls_cert).read_bytes()
        key = Path(receiver.tls_key).read_bytes() if receiver.tls_key else b""
        client_certificate = tssl.PrivateCertificate.loadPEM(pem + b"\n" + key)
    return tssl.optionsForClientTLS(
        receiver.host, trustRoot=trust, clientCertificate=client_certificate
    )


def send_message(reactor, receiver: OutboundReceiver, message: bytes) -> _SenderFactory:
    """Start delivering one message; `factory.result` fires with an `Attempt`, never fails."""
    tls = _client_tls(receiver)
    factory = _SenderFactory(reactor, message, receiver.ack_timeout, tls=tls is not None)
    outer: protocol.ClientFactory = factory
    if tls is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        # As reactor.connectSSL does, but on our reactor's clock rather than the global one.
        outer = TLSMemoryBIOFactory(tls, True, factory, clock=reactor)
    factory.connector = reactor.connectTCP(
        receiver.host, receiver.port, outer, timeout=receiver.connect_timeout
    )
    return factory


# ---------------------------------------------------------------------------------------------
# The outbox


class _Lane:
    """One receiver's queue: one message in flight, retries waiting on a timer."""

    def __init__(self, receiver: OutboundReceiver) -> None:
        self.receiver = receiver
        self.in_flight: _SenderFactory | None = None
        self.in_flight_path: Path | None = None
        self.retry_timer = None
        self.failures = 0  # consecutive failed attempts, for the backoff


class Outbox:
    """Queues status updates durably and delivers them; see the module's docstring."""

    def __init__(self, settings: Settings, reactor, translation_log=None) -> None:
        self.settings = settings
        self.reactor = reactor
        self.translation_log = translation_log
        self.folder = OutboxFolder(settings.outbox_dir)
        self.lanes = {r.name: _Lane(r) for r in settings.outbound}
        self.tries: dict[str, int] = {}  # entry id -> delivery attempts so far (this run)
        self.refusals: dict[str, int] = {}  # entry id -> attempts that count toward parking
        self._control_ids = itertools.count(1)
        self._poller: task.LoopingCall | None = None
        self._running = False

    # -- enqueue (the writer's thread) --------------------------------------------------------

    def prepare(self) -> None:
        removed = self.folder.prepare(list(self.lanes))
        if removed:
            log.warning("removed %d unfinished outbox write(s)", len(removed))

    def wants(self, receiver: OutboundReceiver, change: StatusChange) -> bool:
        if order_status(change.new_status) is None or change.old_status == change.new_status:
            return False
        if change.cause == "housekeeping":
            return receiver.send_housekeeping
        return change.cause in REPORTED_CAUSES

    def on_status_change(self, change: StatusChange) -> None:
        """Write the change's message for every receiver that hears it, durably, then return.
        Raises when a message cannot be written (the change must then not be acknowledged)."""
        now = datetime.now()
        for lane in self.lanes.values():
            receiver = lane.receiver
            if not self.wants(receiver, change):
                continue
            control_id = self._next_control_id()
            data = build_status_message(change, receiver, control_id, now)
            try:
                path = self.folder.enqueue(receiver.name, data)
            except OSError as exc:
                log.error("outbox %s: cannot queue a status message: %s", receiver.name, exc)
                raise OutboxWriteError(
                    f"outbox {receiver.name}: cannot write: {exc.strerror or exc}"
                ) from exc
            self._log(receiver, message_facts(data), "queued", file=self.folder.entry_id(path))
        if self._running:
            self.reactor.callFromThread(self.kick)

    def _next_control_id(self) -> str:
        # Unique across restarts (milliseconds) and within one (the counter): at most 20
        # characters, MSH-10's length in 2.3.1 and 2.5.1.
        return f"WB{int(time.time() * 1000):013d}{next(self._control_ids) % 100000:05d}"

    # -- delivery (the reactor) ---------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        if self.lanes:
            self._poller = task.LoopingCall(self.kick)
            self._poller.clock = self.reactor
            self._poller.start(POLL_INTERVAL, now=True)

    def stop(self) -> None:
        """Stop delivering; a message in flight stays queued and is sent again next time."""
        self._running = False
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        for lane in self.lanes.values():
            if lane.retry_timer is not None and lane.retry_timer.active():
                lane.retry_timer.cancel()
            if lane.in_flight is not None:
                lane.in_flight.abort()

    def kick(self) -> None:
        """Start the next delivery on every idle receiver."""
        for lane in self.lanes.values():
            self._next(lane)

    def _next(self, lane: _Lane) -> None:
        try:
            self._start_next(lane)
        except Exception:  # an unreadable file, a certificate gone bad: try again later
            log.exception("outbox %s: cannot start a delivery", lane.receiver.name)
            lane.in_flight = None
            if self._running and (lane.retry_timer is None or not lane.retry_timer.active()):
                lane.retry_timer = self.reactor.callLater(
                    lane.receiver.retry_max, self._retry_now, lane
                )

    def _start_next(self, lane: _Lane) -> None:
        if not self._running or lane.in_flight is not None:
            return
        if lane.retry_timer is not None and lane.retry_timer.active():
            return
        path = self._head(lane.receiver.name)
        if path is None:
            return
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # dropped meanwhile
            self.reactor.callLater(0, self._next, lane)
            return
        lane.in_flight_path = path
        lane.in_flight = send_message(self.reactor, lane.receiver, data)
        lane.in_flight.result.addCallback(self._done, lane, path, data)

    def _head(self, receiver: str) -> Path | None:
        """The oldest pending message not held behind a parked one of the same order."""
        held: set[str] = set()
        for parked in self.folder.parked(receiver):
            try:
                held |= message_facts(parked.read_bytes()).order_keys
            except FileNotFoundError:
                continue
        for path in self.folder.pending(receiver):
            if not held:
                return path
            try:
                keys = message_facts(path.read_bytes()).order_keys
            except FileNotFoundError:
                continue
            if not keys & held:
                return path
        return None

    def _done(self, attempt: Attempt, lane: _Lane, path: Path, data: bytes) -> None:
        lane.in_flight = None
        lane.in_flight_path = None
        receiver = lane.receiver
        facts = message_facts(data)
        entry_id = self.folder.entry_id(path)
        if not self._running and attempt.failure == "the bridge stopped":
            return
        accepted = attempt.ack_code in ("AA", "CA") and attempt.ack_control_id == facts.control_id
        if attempt.ack_code in ("AA", "CA") and not accepted:
            attempt = dataclasses.replace(
                attempt, failure=f"the ACK is for control ID {attempt.ack_control_id!r}"
            )
        number = self.tries.get(entry_id, 0) + 1  # every try of this message, this run
        self.tries[entry_id] = number
        if accepted:
            path.unlink(missing_ok=True)
            _fsync_folder(path.parent)
            self._forget(entry_id)
            lane.failures = 0
            self._log(receiver, facts, "sent", ack=attempt.ack_code, attempt=number, file=entry_id)
            self.reactor.callLater(0, self._next, lane)
            return
        lane.failures += 1
        failure = attempt.failure or f"answered {attempt.ack_code}"
        if attempt.written:
            refusals = self.refusals.get(entry_id, 0) + 1
            self.refusals[entry_id] = refusals
            if refusals >= receiver.max_attempts and path.exists():
                self.folder.park(path, f"{failure} (refused {refusals} times, {number} tries)")
                self._forget(entry_id)
                lane.failures = 0
                self._log(receiver, facts, "parked", ack=attempt.ack_code, reason=failure,
                          attempt=number, file=entry_id)  # fmt: skip
                self.reactor.callLater(0, self._next, lane)
                return
        delay = min(receiver.retry_max, receiver.retry_initial * 2 ** (lane.failures - 1))
        self._log(receiver, facts, "retrying", ack=attempt.ack_code, reason=failure,
                  attempt=number, file=entry_id, note=f"next try in {delay:g} s")  # fmt: skip
        if self._running:
            lane.retry_timer = self.reactor.callLater(delay, self._retry_now, lane)

    def _forget(self, entry_id: str) -> None:
        self.tries.pop(entry_id, None)
        self.refusals.pop(entry_id, None)

    def _retry_now(self, lane: _Lane) -> None:
        lane.retry_timer = None
        self._next(lane)

    def _log(self, receiver: OutboundReceiver, facts: MessageFacts, outcome: str, **fields) -> None:
        if self.translation_log is None:
            return
        self.translation_log.record(
            peer=f"{receiver.host}:{receiver.port}",
            receiver=receiver.name,
            control_id=facts.control_id,
            type=receiver.message,
            order_control="SC",
            order_status=facts.order_status,
            accession=facts.accession,
            patient_id=facts.patient_id.split("^")[0],
            outcome=outcome,
            **fields,
        )

    # -- for the CLI and a later HTTP API -----------------------------------------------------

    def list(self) -> list[OutboxEntry]:
        return self.folder.entries(self.tries)

    def retry(self, entry_id: str) -> str:
        """Send a parked message again (in its place in the queue), or a waiting one now."""
        path = self.folder.find(entry_id)
        receiver = path.parent.parent.name if path.parent.name == PARKED else path.parent.name
        parked = path.parent.name == PARKED
        found = self.folder.retry(entry_id) if parked else self.folder.entry_id(path)
        lane = self.lanes.get(receiver)
        if lane is not None:
            if lane.retry_timer is not None and lane.retry_timer.active():
                lane.retry_timer.cancel()
            lane.retry_timer = None
            lane.failures = 0
            if self._running:
                self.reactor.callLater(0, self._next, lane)
        return found

    def drop(self, entry_id: str) -> str:
        found = self.folder.drop(entry_id)
        self._forget(found)
        if self._running:
            self.reactor.callLater(0, self.kick)  # it may have held others
        return found

    def depth(self, receiver: str | None = None) -> int:
        """Messages waiting to be sent (not parked), for one receiver or all."""
        names = [receiver] if receiver else self.folder.receivers()
        return sum(len(self.folder.pending(name)) for name in names)

    def state(self) -> dict[str, dict[str, Any]]:
        """Per receiver (configured, or with files left in the outbox): messages waiting,
        messages parked, and the seconds the oldest waiting one has waited."""
        now = time.time()
        state = {}
        for name in sorted(set(self.lanes) | set(self.folder.receivers())):
            pending = self.folder.pending(name)  # one listing of the folder: scraped often
            oldest = 0.0
            for path in pending[:1]:
                try:
                    oldest = max(0.0, now - path.stat().st_mtime)
                except FileNotFoundError:  # sent meanwhile
                    pass
            parked = len(self.folder.parked(name))
            state[name] = {"depth": len(pending), "parked": parked, "oldest_age": round(oldest, 1)}
        return state

    def oldest_age(self, receiver: str | None = None) -> float:
        """Seconds the oldest waiting message has waited; 0 when none waits."""
        names = [receiver] if receiver else self.folder.receivers()
        oldest = None
        for name in names:
            for path in self.folder.pending(name)[:1]:
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                oldest = mtime if oldest is None else min(oldest, mtime)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)
