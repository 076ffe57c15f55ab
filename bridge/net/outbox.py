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

With the PostgreSQL store the messages wait in a table shared by several bridges instead
(`PostgresQueue`): each bridge claims a receiver's head message for a lease, so one bridge
sends it, and another once a dead bridge's lease ends (same bytes, same MSH-10). The delivery
logic above is the same over both queues (`Outbox`); `outbox_for(settings, ...)` picks one.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, task, threads
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IHandshakeListener
from twisted.python import threadable
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
# Beside a waiting message its delivery attempts so far, "<tries> <refusals>", so a restarted
# bridge goes on counting toward parking (max-attempts) instead of starting again from 1.
COUNTS = ".tries"
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
                for path in folder.glob("*" + COUNTS):  # of a message sent or dropped since
                    if not path.with_suffix(SUFFIX).exists():
                        path.unlink(missing_ok=True)
        self._sequence = itertools.count(highest + 1)
        return removed

    def counts(self) -> dict[str, tuple[int, int]]:
        """Entry id -> (tries, refusals) of every waiting message that was tried before."""
        found = {}
        for name in self.receivers():
            for path in (self.root / name).glob("[0-9]*" + COUNTS):
                try:
                    tries, refusals = (int(n) for n in path.read_text("ascii").split())
                except (OSError, ValueError):  # gone, or torn by a crash: count afresh
                    continue
                found[f"{name}/{path.stem}"] = (tries, refusals)
        return found

    def write_counts(self, message: Path, tries: int, refusals: int) -> None:
        """Not synced: a crash may lose the latest count (the message is then tried a little
        more often before it parks), never the message."""
        counts = message.with_suffix(COUNTS)
        temporary = counts.with_name(f".{counts.name}.tmp")
        try:
            temporary.write_text(f"{tries} {refusals}\n", "ascii")
            os.replace(temporary, counts)
        except OSError as exc:
            log.warning("cannot keep the attempt count of %s: %s", message.name, exc)

    def forget_counts(self, entry_id: str) -> None:
        receiver, _, sequence = entry_id.partition("/")
        (self.root / receiver / f"{sequence}{COUNTS}").unlink(missing_ok=True)

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
        """Every message, waiting then parked; `attempts` by entry id (else as kept beside
        the messages)."""
        if attempts is None:
            attempts = {entry_id: tries for entry_id, (tries, _) in self.counts().items()}
        now = time.time()
        result = []
        for receiver in self.receivers():
            for state, paths in (
                ("pending", self.pending(receiver)),
                ("parked", self.parked(receiver)),
            ):
                for path in paths:
                    read = self.read_entry(path, state, attempts, now)
                    if read is not None:  # else delivered meanwhile
                        result.append(read[0])
        return result

    def read_entry(
        self, path: Path, state: str, attempts: dict[str, int] | None, now: float | None = None
    ) -> tuple[OutboxEntry, bytes] | None:
        """The listing entry of the message file at `path` (in `state`: pending or parked)
        and its bytes; None when the file is gone."""
        try:
            data = path.read_bytes()
            age = max(0.0, (time.time() if now is None else now) - path.stat().st_mtime)
            reason = ""
            if state == "parked":
                reason_file = path.with_suffix(".reason")
                if reason_file.exists():
                    reason = reason_file.read_text("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        facts = message_facts(data)
        entry_id = self.entry_id(path)
        entry = OutboxEntry(
            id=entry_id,
            receiver=entry_id.partition("/")[0],
            state=state,
            control_id=facts.control_id,
            order_status=facts.order_status,
            accession=facts.accession,
            age=round(age, 1),
            attempts=(attempts or {}).get(entry_id, 0),
            reason=reason,
        )
        return entry, data

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
        path.with_suffix(COUNTS).unlink(missing_ok=True)
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
# The queues: where the messages wait (the folder, or PostgreSQL shared by several bridges)


@dataclass(frozen=True)
class Queued:
    """The head message of a receiver's queue, taken for one delivery attempt."""

    id: str  # `<receiver>/<sequence>`
    receiver: str
    data: bytes
    attempt: int  # the number of this try (1 for the first)
    refusals: int  # earlier tries the receiver refused (they lead to parking)
    handle: Any = None  # the queue's own reference (a path, a claim)


class FolderQueue:
    """The outbox folder (`outbox-dir`), for one bridge. Attempt counts are kept beside the
    messages (OutboxFolder.write_counts): a restarted bridge goes on counting."""

    in_thread = False  # file operations are quick: they run where they are called
    leases = False

    def __init__(self, root: Path) -> None:
        self.folder = OutboxFolder(root)
        self.tries: dict[str, int] = {}  # entry id -> delivery attempts so far (this run)
        self.refusals: dict[str, int] = {}  # entry id -> attempts that count toward parking
        self._numbers = itertools.count(1)

    def describe(self) -> str:
        return str(self.folder.root)

    def prepare(self, receivers: list[str]) -> int:
        removed = len(self.folder.prepare(receivers))
        for entry_id, (tries, refusals) in self.folder.counts().items():
            self.tries[entry_id] = tries
            self.refusals[entry_id] = refusals
        return removed

    def enqueue(self, receiver: str, build) -> tuple[str, bytes]:
        """`build(number)` -> (control ID, message, order keys); returns (entry id, message)."""
        _control_id, data, _keys = build(next(self._numbers))
        path = self.folder.enqueue(receiver, data)
        return self.folder.entry_id(path), data

    def take(self, receiver: str, lease: float) -> Queued | None:
        for _ in range(100):  # a file dropped between the listing and the read: the next one
            path = self._head(receiver)
            if path is None:
                return None
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            entry_id = self.folder.entry_id(path)
            return Queued(
                entry_id,
                receiver,
                data,
                self.tries.get(entry_id, 0) + 1,
                self.refusals.get(entry_id, 0),
                path,
            )
        return None

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

    def renew(self, message: Queued, lease: float) -> bool:
        return True

    def complete(self, message: Queued) -> None:
        message.handle.unlink(missing_ok=True)
        _fsync_folder(message.handle.parent)
        self._forget(message.id)

    def retry_later(self, message: Queued, delay: float, reason: str, refused: bool) -> None:
        self.tries[message.id] = message.attempt
        if refused:
            self.refusals[message.id] = message.refusals + 1
        self.folder.write_counts(message.handle, message.attempt, self.refusals.get(message.id, 0))

    def park(self, message: Queued, reason: str) -> bool:
        if not message.handle.exists():
            return False  # dropped meanwhile
        self.folder.park(message.handle, reason)
        self._forget(message.id)
        return True

    def release(self, message: Queued) -> None:
        pass  # the file is still there: sent again next time

    def _forget(self, entry_id: str) -> None:
        self.tries.pop(entry_id, None)
        self.refusals.pop(entry_id, None)
        self.folder.forget_counts(entry_id)

    # -- what `wlbridge outbox`, the API and the metrics see

    def entries(self) -> list[OutboxEntry]:
        return self.folder.entries(self.tries)

    def lookup(self, name: str) -> tuple[OutboxEntry, bytes]:
        """A message by id or control ID: its listing entry and its bytes; OutboxError."""
        receiver, _, sequence = name.partition("/")
        if not sequence:
            return self.lookup(self.folder.entry_id(self.folder.find(name)))
        for path, state in (
            (self.folder.root / receiver / f"{sequence}{SUFFIX}", "pending"),
            (self.folder.root / receiver / PARKED / f"{sequence}{SUFFIX}", "parked"),
        ):
            read = self.folder.read_entry(path, state, self.tries)
            if read is not None:
                return read
        raise OutboxError(f"no message {name!r} in the outbox")

    def retry(self, name: str) -> tuple[str, str]:
        """(entry id, receiver): a parked message back in its place, or a waiting one as it is."""
        path = self.folder.find(name)
        receiver = path.parent.parent.name if path.parent.name == PARKED else path.parent.name
        if path.parent.name == PARKED:
            return self.folder.retry(name), receiver
        return self.folder.entry_id(path), receiver

    def drop(self, name: str) -> str:
        found = self.folder.drop(name)
        self._forget(found)
        return found

    def refresh(self) -> None:
        pass  # read when asked: a listing of each folder

    def state(self, receivers: list[str]) -> dict[str, dict[str, Any]]:
        now = time.time()
        state = {}
        for name in sorted(set(receivers) | set(self.folder.receivers())):
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

    def close(self) -> None:
        pass


class OutboxStateError(OSError):
    """The outbox's state could not be read (the database is down): metrics say so."""


class PostgresQueue:
    """The outbox table in PostgreSQL, shared by every bridge of the store: a bridge claims a
    receiver's head message for a lease (bridge.storage.postgres.outbox). Attempt and refusal
    counts are kept in the table, so a bridge that takes a message over continues them.

    Two connections: the writer's (enqueue, on the worklist writer's thread, never waiting
    behind a delivery's call) and the deliveries' (claims, outcomes, listings, in threads)."""

    in_thread = True  # a database call can wait up to the connect timeout: never on the reactor
    leases = True

    def __init__(self, dsn: str, bridge_id: str | None = None) -> None:
        from bridge.storage.postgres.outbox import PostgresOutbox

        self.bridge_id = bridge_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.writer = PostgresOutbox(dsn, self.bridge_id)
        self.worker = PostgresOutbox(dsn, self.bridge_id)
        self._state: dict[str, Any] = {}
        self._state_at = 0.0  # time.monotonic() of the last refresh
        self._state_error = ""

    def describe(self) -> str:
        from bridge.storage.postgres.connection import redacted

        return redacted(self.writer.db.dsn)

    def prepare(self, receivers: list[str]) -> int:
        return 0  # nothing half-written: a transaction commits whole or not at all

    def enqueue(self, receiver: str, build) -> tuple[str, bytes]:
        built: list[bytes] = []

        def build_once(number: int) -> tuple[str, bytes, set[str]]:
            control_id, data, keys = build(number)
            built[:] = [data]
            return control_id, data, keys

        message_id = self.writer.enqueue_built(receiver, build_once)
        return _pg_id(receiver, message_id), built[0]

    def take(self, receiver: str, lease: float) -> Queued | None:
        claim = self.worker.claim(receiver, lease)
        if claim is None:
            return None
        return Queued(
            _pg_id(receiver, claim.id), receiver, claim.data, claim.attempts, claim.refusals, claim
        )

    def renew(self, message: Queued, lease: float) -> bool:
        return self.worker.renew(message.handle, lease)

    def complete(self, message: Queued) -> None:
        if not self.worker.complete(message.handle):
            log.warning(
                "outbox %s: %s was taken over by another bridge before its ACK came "
                "(it may reach the receiver twice)",
                message.receiver,
                message.id,
            )

    def retry_later(self, message: Queued, delay: float, reason: str, refused: bool) -> None:
        self.worker.retry_later(message.handle, delay, reason, refused)

    def park(self, message: Queued, reason: str) -> bool:
        return self.worker.park(message.handle, reason)

    def release(self, message: Queued) -> None:
        self.worker.release(message.handle)

    # -- what `wlbridge outbox`, the API and the metrics see

    def entries(self) -> list[OutboxEntry]:
        return [_pg_entry(m) for m in self.worker.messages()]

    def _find(self, name: str):
        receiver, _, number = name.partition("/")
        if number:
            found = self.worker.message(int(number)) if number.isdigit() else None
            if found is not None and found.receiver == receiver:
                return found
        else:
            found = self.worker.by_control_id(name)
            if found is not None:
                return found
        raise OutboxError(f"no message {name!r} in the outbox {self.describe()}")

    def lookup(self, name: str) -> tuple[OutboxEntry, bytes]:
        found = self._find(name)
        return _pg_entry(found), found.data

    def retry(self, name: str) -> tuple[str, str]:
        found = self._find(name)
        if found.parked:
            self.worker.unpark(found.id)
        else:
            self.worker.due_now(found.id)
        return _pg_id(found.receiver, found.id), found.receiver

    def drop(self, name: str) -> str:
        found = self._find(name)
        if not self.worker.drop(found.id):
            raise OutboxError(f"no message {name!r} in the outbox {self.describe()}")
        return _pg_id(found.receiver, found.id)

    def refresh(self) -> None:
        """Read the per-receiver counts (in a thread, at each poll): `state()` answers from
        them without a database call, so a metrics scrape never waits on the database."""
        try:
            summary = self.worker.summary()
        except StoreError as exc:
            self._state_error = str(exc)
            return
        self._state = {name: dataclasses.asdict(s) for name, s in summary.items()}
        self._state_at = time.monotonic()
        self._state_error = ""

    def state(self, receivers: list[str]) -> dict[str, dict[str, Any]]:
        if self._state_error:
            raise OutboxStateError(f"outbox {self.describe()}: {self._state_error}")
        since = time.monotonic() - self._state_at
        state = {}
        for name in sorted(set(receivers) | set(self._state)):
            known = self._state.get(name, {"depth": 0, "parked": 0, "oldest_age": 0.0})
            oldest = known["oldest_age"] + since if known["depth"] else 0.0
            state[name] = {
                "depth": known["depth"],
                "parked": known["parked"],
                "oldest_age": round(oldest, 1),
            }
        return state

    def close(self) -> None:
        self.writer.close()
        self.worker.close()


def _pg_id(receiver: str, message_id: int) -> str:
    return f"{receiver}/{message_id:012d}"


def _pg_entry(message) -> OutboxEntry:
    facts = message_facts(message.data)
    return OutboxEntry(
        id=_pg_id(message.receiver, message.id),
        receiver=message.receiver,
        state="parked" if message.parked else "pending",
        control_id=message.control_id,
        order_status=facts.order_status,
        accession=facts.accession,
        age=round(message.age, 1),
        attempts=message.attempts,
        reason=message.reason if message.parked else "",
    )


def queue_for(settings: Settings):
    """The folder queue, or the PostgreSQL one when `store` is a PostgreSQL URL."""
    from bridge.storage.postgres import is_postgres_url

    if is_postgres_url(settings.store):
        return PostgresQueue(settings.store)
    return FolderQueue(settings.outbox_dir)


# ---------------------------------------------------------------------------------------------
# The outbox


class _Lane:
    """One receiver's queue: one message in flight, retries waiting on a timer."""

    def __init__(self, receiver: OutboundReceiver) -> None:
        self.receiver = receiver
        self.busy = False  # taking the head, sending it, or recording how it went
        self.in_flight: _SenderFactory | None = None
        self.in_flight_message: Queued | None = None
        self.renewer: task.LoopingCall | None = None
        self.retry_timer = None
        self.failures = 0  # consecutive failed attempts, for the backoff
        # An acknowledged message whose removal failed (the database down): removed before
        # anything else is sent, rather than sent again, while this bridge still holds it.
        self.unrecorded: tuple[Queued, Callable[[object], None]] | None = None


class Outbox:
    """Queues status updates durably and delivers them; see the module's docstring. The
    queue is the folder or PostgreSQL (`queue_for`); delivery is the same over both."""

    def __init__(self, settings: Settings, reactor, translation_log=None, queue=None) -> None:
        self.settings = settings
        self.reactor = reactor
        self.translation_log = translation_log
        self.queue = queue if queue is not None else FolderQueue(settings.outbox_dir)
        self.lanes = {r.name: _Lane(r) for r in settings.outbound}
        self._poller: task.LoopingCall | None = None
        self._running = False

    @property
    def folder(self) -> OutboxFolder | None:
        """The outbox folder (None on PostgreSQL)."""
        return getattr(self.queue, "folder", None)

    # -- enqueue (the writer's thread) --------------------------------------------------------

    def prepare(self) -> None:
        removed = self.queue.prepare(list(self.lanes))
        if removed:
            log.warning("removed %d unfinished outbox write(s)", removed)

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

            def build(number: int, receiver=receiver) -> tuple[str, bytes, set[str]]:
                control_id = _control_id(number)
                data = build_status_message(change, receiver, control_id, now)
                return control_id, data, message_facts(data).order_keys

            try:
                entry_id, data = self.queue.enqueue(receiver.name, build)
            except (OSError, StoreError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.error("outbox %s: cannot queue a status message: %s", receiver.name, exc)
                raise OutboxWriteError(f"outbox {receiver.name}: cannot write: {why}") from exc
            self._log(receiver, message_facts(data), "queued", file=entry_id)
        if self._running:
            self.reactor.callFromThread(self.kick)

    # -- delivery (the reactor) ---------------------------------------------------------------

    def _io(self, function, *args) -> defer.Deferred:
        """Call the queue: in a thread for PostgreSQL, at once for the folder."""
        if self.queue.in_thread:
            return threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), function, *args
            )
        return defer.maybeDeferred(function, *args)

    def start(self) -> None:
        self._running = True
        if self.lanes:
            self._poller = task.LoopingCall(self._poll)
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
        self.queue.close()  # a later call connects again (a restarted server)

    def _poll(self) -> None:
        # The folder is looked at for `wlbridge outbox retry`; PostgreSQL for the messages other
        # bridges queued, leases that ended and backoffs that ran out: a short poll (one claim
        # per idle receiver), not LISTEN/NOTIFY, since an ended lease or backoff notifies nobody.
        self.kick()
        if self.queue.in_thread:
            self._io(self.queue.refresh).addErrback(lambda f: log.warning("%s", f.value))

    def kick(self) -> None:
        """Start the next delivery on every idle receiver."""
        for lane in self.lanes.values():
            self._next(lane)

    def _next(self, lane: _Lane) -> None:
        if not self._running or lane.busy:
            return
        if lane.retry_timer is not None and lane.retry_timer.active():
            return
        lane.busy = True
        if lane.unrecorded is not None:
            message, sent = lane.unrecorded
            lane.unrecorded = None
            self._record_sent(lane, message, sent)
            return
        d = self._io(self.queue.take, lane.receiver.name, self.settings.outbox_lease)
        d.addCallback(self._send, lane)
        d.addErrback(self._cannot_start, lane)

    def _record_sent(self, lane: _Lane, message: Queued, sent: Callable[[object], None]) -> None:
        def unrecorded(failure) -> None:
            lane.unrecorded = (message, sent)
            self._cannot_start(failure, lane)

        self._io(self.queue.complete, message).addCallbacks(sent, unrecorded)

    def _cannot_start(self, failure, lane: _Lane) -> None:
        # An unreadable file, a certificate gone bad, the database down: try again later. A
        # message whose outcome could not be recorded stays claimed: it is sent again (same
        # MSH-10) once its lease ends, by this bridge or another.
        if failure.check(StoreError):
            log.warning("outbox %s: delivery interrupted: %s", lane.receiver.name, failure.value)
        else:
            log.error(
                "outbox %s: delivery interrupted",
                lane.receiver.name,
                exc_info=(failure.type, failure.value, failure.getTracebackObject()),
            )
        lane.busy = False
        lane.in_flight = None
        lane.in_flight_message = None
        self._stop_renewing(lane)
        if self._running and (lane.retry_timer is None or not lane.retry_timer.active()):
            lane.retry_timer = self.reactor.callLater(
                lane.receiver.retry_max, self._retry_now, lane
            )

    def _send(self, message: Queued | None, lane: _Lane) -> None:
        if message is None:
            lane.busy = False
            return
        if not self._running:  # stopped while the head was being taken
            lane.busy = False
            self._io(self.queue.release, message).addErrback(lambda f: None)
            return
        lane.failures = max(lane.failures, message.attempt - 1)  # continued from another bridge
        lane.in_flight_message = message
        lane.in_flight = send_message(self.reactor, lane.receiver, message.data)
        if self.queue.leases:
            lease = self.settings.outbox_lease
            lane.renewer = task.LoopingCall(self._renew, lane, message)
            lane.renewer.clock = self.reactor
            lane.renewer.start(lease / 3, now=False)
        lane.in_flight.result.addCallback(self._done, lane, message)
        lane.in_flight.result.addErrback(self._cannot_start, lane)

    def _renew(self, lane: _Lane, message: Queued) -> None:
        def renewed(kept: bool) -> None:
            if not kept:
                log.warning(
                    "outbox %s: the lease of %s was lost to another bridge (it may "
                    "reach the receiver twice)",
                    lane.receiver.name,
                    message.id,
                )

        d = self._io(self.queue.renew, message, self.settings.outbox_lease)
        d.addCallbacks(
            renewed,
            lambda f: log.warning(
                "outbox %s: cannot renew the lease of %s: %s",
                lane.receiver.name,
                message.id,
                f.value,
            ),
        )

    def _stop_renewing(self, lane: _Lane) -> None:
        if lane.renewer is not None and lane.renewer.running:
            lane.renewer.stop()
        lane.renewer = None

    def _done(self, attempt: Attempt, lane: _Lane, message: Queued) -> defer.Deferred | None:
        lane.in_flight = None
        lane.in_flight_message = None
        self._stop_renewing(lane)
        receiver = lane.receiver
        facts = message_facts(message.data)
        entry_id = message.id
        if not self._running and attempt.failure == "the bridge stopped":
            lane.busy = False
            if self.queue.in_thread:  # give the claim up: another bridge need not wait
                try:
                    self.queue.release(message)
                except StoreError:
                    pass  # its lease ends by itself
            return None
        accepted = attempt.ack_code in ("AA", "CA") and attempt.ack_control_id == facts.control_id
        if attempt.ack_code in ("AA", "CA") and not accepted:
            attempt = dataclasses.replace(
                attempt, failure=f"the ACK is for control ID {attempt.ack_control_id!r}"
            )
        number = message.attempt  # every try of this message
        if accepted:

            def sent(_: object) -> None:
                lane.failures = 0
                self._log(
                    receiver, facts, "sent", ack=attempt.ack_code, attempt=number, file=entry_id
                )
                self._after(lane, 0)

            self._record_sent(lane, message, sent)
            return None
        lane.failures += 1
        failure = attempt.failure or f"answered {attempt.ack_code}"
        refusals = message.refusals + (1 if attempt.written else 0)
        delay = min(receiver.retry_max, receiver.retry_initial * 2 ** (lane.failures - 1))

        def retrying(_: object) -> None:
            self._log(
                receiver,
                facts,
                "retrying",
                ack=attempt.ack_code,
                reason=failure,
                attempt=number,
                file=entry_id,
                note=f"next try in {delay:g} s",
            )
            self._after(lane, delay)

        def later(_: object = None) -> defer.Deferred:
            d = self._io(self.queue.retry_later, message, delay, failure, attempt.written)
            return d.addCallback(retrying)

        if attempt.written and refusals >= receiver.max_attempts:
            why = f"{failure} (refused {refusals} times, {number} tries)"

            def parked(done: bool) -> defer.Deferred | None:
                if not done:  # dropped (or taken over) meanwhile
                    return later()
                lane.failures = 0
                self._log(
                    receiver,
                    facts,
                    "parked",
                    ack=attempt.ack_code,
                    reason=failure,
                    attempt=number,
                    file=entry_id,
                )
                self._after(lane, 0)
                return None

            return self._io(self.queue.park, message, why).addCallback(parked)
        return later()

    def _after(self, lane: _Lane, delay: float) -> None:
        """The attempt is recorded: the lane is free, its next message due after `delay`."""
        lane.busy = False
        if not self._running:
            return
        if delay:
            lane.retry_timer = self.reactor.callLater(delay, self._retry_now, lane)
        else:
            self.reactor.callLater(0, self._next, lane)

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

    # -- for the CLI and the HTTP API (in a thread for PostgreSQL) -----------------------------

    def list(self) -> list[OutboxEntry]:
        return self.queue.entries()

    def lookup(self, entry_id: str) -> tuple[OutboxEntry, bytes]:
        """(its listing entry, its bytes) by id or control ID; OutboxError when not there."""
        return self.queue.lookup(entry_id)

    def resolve(self, name: str) -> str:
        """The `<receiver>/<sequence>` id of a message named by id or control ID."""
        return self.queue.lookup(name)[0].id

    def retry(self, entry_id: str) -> str:
        """Send a parked message again (in its place in the queue), or a waiting one now."""
        found, receiver = self.queue.retry(entry_id)
        self._on_reactor(self._retried, receiver)
        return found

    def _on_reactor(self, function: Any, *args: Any) -> None:
        """The lanes are the reactor's: a retry or drop made in a thread (a database outbox,
        from the HTTP API) hands their part over."""
        if threadable.ioThread is None or threadable.isInIOThread():  # (no reactor running)
            function(*args)
        else:
            self.reactor.callFromThread(function, *args)

    def _retried(self, receiver: str) -> None:
        lane = self.lanes.get(receiver)
        if lane is not None:
            if lane.retry_timer is not None and lane.retry_timer.active():
                lane.retry_timer.cancel()
            lane.retry_timer = None
            lane.failures = 0
            if self._running:
                self.reactor.callLater(0, self._next, lane)

    def drop(self, entry_id: str) -> str:
        found = self.queue.drop(entry_id)
        self._on_reactor(self._dropped)
        return found

    def _dropped(self) -> None:
        if self._running:
            self.reactor.callLater(0, self.kick)  # it may have held others

    def state(self) -> dict[str, dict[str, Any]]:
        """Per receiver (configured, or with messages left in the outbox): messages waiting,
        messages parked, and the seconds the oldest waiting one has waited."""
        return self.queue.state(list(self.lanes))

    def depth(self, receiver: str | None = None) -> int:
        """Messages waiting to be sent (not parked), for one receiver or all."""
        state = self.state()
        return sum(s["depth"] for name, s in state.items() if receiver in (None, name))

    def oldest_age(self, receiver: str | None = None) -> float:
        """Seconds the oldest waiting message has waited; 0 when none waits."""
        state = self.state()
        return max(
            (s["oldest_age"] for name, s in state.items() if receiver in (None, name)), default=0.0
        )


def _control_id(number: int) -> str:
    # Unique across restarts (milliseconds) and within one (the number: a counter, or on
    # PostgreSQL a sequence no other bridge shares): at most 20 characters, MSH-10's length
    # in 2.3.1 and 2.5.1.
    return f"WB{int(time.time() * 1000):013d}{number % 100000:05d}"


def outbox_for(settings: Settings, reactor, translation_log=None) -> Outbox:
    """The server's outbox: over the folder, or over PostgreSQL when `store` is a URL."""
    return Outbox(settings, reactor, translation_log, queue=queue_for(settings))
