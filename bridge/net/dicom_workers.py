"""The DICOM service in worker processes (`dicom-workers` = N > 0, or -1: one per CPU), sharing one
listening socket.

Why: in one process, the reactor thread (HL7 intake, the worklist's one writer) shares one GIL with
pynetdicom's two threads per association; under 20 querying modalities its ACKs waited for the
GIL, and the C-FIND work could use one core at most. Here the main process makes the listening
socket (bound, listening, backlog 4096) and starts N worker processes that all accept from it;
the kernel's one accept queue serves whichever worker is free.

Each worker has its own WorklistIndex following the folder through inotify, like any other
program's reader. Read-your-writes: before each C-FIND the worker applies the inotify events
queued so far (`WorklistIndex.sync_now`, on its reactor thread); the main process renames an
order's file into place before it sends the AA, and the rename queues the event, so a C-FIND that
starts after the ACK finds the order, on every worker.

The worklist keeps its one writer: a worker answers MPPS N-CREATE / N-SET by forwarding the
request (the raw attribute list and its transfer syntax) over a pipe to the main process, which
runs the same handlers as in-process and sends back their answer. The C-FIND lines of the
translation log go the same way, so that file keeps one writer too.

A worker stops with the main process: on its shutdown the main process sends SIGTERM and waits
(SIGKILL after `WORKER_STOP_TIMEOUT`); a worker whose parent is gone stops by itself.
A worker that ends while the main process runs is replaced (`DicomWorkers._replace`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from bridge.config import Settings, dicom_worker_count

log = logging.getLogger("bridge.net.dicom_workers")

# Connection attempts the kernel queues while every worker is busy (Linux caps it at
# net.core.somaxconn, 4096 by default): with the accept gate, a burst waits there.
LISTEN_BACKLOG = 4096
WORKER_START_TIMEOUT = 900.0  # seconds a worker may take to load the index (100,000s of items)
WORKER_STOP_TIMEOUT = 10.0  # seconds a worker gets to close its associations at shutdown
PARENT_CHECK_INTERVAL = 1.0  # seconds between a worker's checks that the main process lives
# A worker that ends while the server runs (killed, crashed) is replaced at once; one that lived
# less than WORKER_STABLE_AFTER seconds is replaced after RESTART_DELAY, doubled each time up to
# RESTART_DELAY_MOST (a worker that cannot start does not spin).
WORKER_STABLE_AFTER = 60.0
RESTART_DELAY = 1.0
RESTART_DELAY_MOST = 60.0


class DicomWorkers:
    """The main process's side: the listening socket, the worker processes, and one thread per
    worker answering its MPPS requests and recording its queries."""

    def __init__(
        self,
        settings: Settings,
        mpps_handlers: dict[str, Callable[[Any], tuple[Any, Any]]],
        on_query: Callable[..., None] | None,
    ) -> None:
        self.settings = settings
        self.mpps_handlers = mpps_handlers  # "n-create" / "n-set" -> handler(event)
        self.on_query = on_query
        self.socket: socket.socket | None = None
        self.processes: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self._stopped = threading.Event()
        self.lock = threading.Lock()  # self.processes, replaced by the link threads
        self.started_at: dict[int, float] = {}  # worker number -> when it was started
        # PostgreSQL store: the change number of the main process's last commit, which a
        # worker waits to have applied before a C-FIND (read-your-writes); set by the server
        self.committed = multiprocessing.get_context("spawn").Value("q", 0, lock=False)
        # Each worker's open associations, so that max-associations is the whole server's
        # limit (not a share per worker that one busy worker would reach alone)
        self.open_associations = multiprocessing.get_context("spawn").Array(
            "i", max(1, dicom_worker_count(settings)), lock=False
        )
        # ...and their associations from each source, in SOURCE_BUCKETS buckets per worker
        from bridge.net.cfind import SOURCE_BUCKETS

        self.source_associations = multiprocessing.get_context("spawn").Array(
            "i", max(1, dicom_worker_count(settings)) * SOURCE_BUCKETS, lock=False
        )

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    def start(self) -> None:
        """Listen, then start the workers (OSError if the port cannot be had)."""
        s = self.settings
        sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((s.host, s.dicom_port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        count = dicom_worker_count(s)
        links = [self._spawn(number, count) for number in range(count)]
        for number, link in enumerate(links):
            if not self._ready(link):
                self.stop()
                raise OSError(f"DICOM worker {number} did not start (see its log lines above)")
            thread = threading.Thread(
                target=self._serve_worker, args=(link, number, count), daemon=True,
                name=f"dicom-worker-link-{number}",
            )  # fmt: skip
            thread.start()
            self.threads.append(thread)
        log.info("DICOM: %d worker process(es) share port %d", count, self.server_address[1])

    def _spawn(self, number: int, count: int) -> Any:
        """Start worker `number` (in self.processes at that place); the main process's end of
        its pipe."""
        spawn = multiprocessing.get_context("spawn")  # no copy of the reactor's state
        parent_end, child_end = spawn.Pipe()
        process = spawn.Process(
            target=worker_main,
            args=(self.settings, self.socket, child_end, number, count, self.committed,
                  self.open_associations, self.source_associations),
            name=f"wlbridge-dicom-{number}",
            daemon=True,
        )  # fmt: skip
        process.start()
        child_end.close()
        with self.lock:
            if self.stopping:  # stop() has taken its list of workers already
                process.terminate()
                raise OSError("the server is stopping")
            if number < len(self.processes):
                self.processes[number] = process
            else:
                self.processes.append(process)
            self.started_at[number] = time.monotonic()
        return parent_end

    @staticmethod
    def _ready(link: Any) -> bool:
        """Until the worker serves (its index loaded): queries find the whole worklist."""
        try:
            return bool(link.poll(WORKER_START_TIMEOUT) and link.recv() == ("ready",))
        except (EOFError, OSError):
            return False

    def _replace(self, number: int, count: int) -> Any:
        """A worker that ended while the server runs is replaced (its connections are lost,
        the modalities reconnect); one that keeps ending soon after its start is replaced
        less and less often (RESTART_DELAY, doubled up to RESTART_DELAY_MOST). Returns the
        new worker's link, or None once the server stops."""
        delay = 0.0
        while not self.stopping:
            with self.lock:
                if number >= len(self.processes):  # emptied by stop()
                    return None
                process = self.processes[number]
            process.join(5)  # reaped: no zombie left
            lived = time.monotonic() - self.started_at.get(number, 0.0)
            self.open_associations[number] = 0  # its associations died with it
            buckets = len(self.source_associations) // len(self.open_associations)
            self.source_associations[number * buckets : (number + 1) * buckets] = [0] * buckets
            if lived < WORKER_STABLE_AFTER:
                delay = min(max(delay * 2, RESTART_DELAY), RESTART_DELAY_MOST)
            log.error(
                "DICOM worker %d (pid %s) ended unexpectedly (%s) after %.0f s: its connections"
                " are lost; starting a new one%s", number, process.pid, _exit_reason(process),
                lived, f" in {delay:g} s" if delay else "",
            )  # fmt: skip
            if delay and self._stopped.wait(delay):
                return None
            try:
                link = self._spawn(number, count)
            except (OSError, ValueError) as exc:  # the socket closed by stop() meanwhile
                log.error("DICOM worker %d cannot be started: %s", number, exc)
                continue
            with self.lock:
                replacement = self.processes[number] if number < len(self.processes) else None
            if replacement is None:
                link.close()
                return None
            if self._ready(link) and not self.stopping:
                log.info("DICOM worker %d replaced (pid %s)", number, replacement.pid)
                return link
            link.close()
            if self.stopping:  # stop() may have missed it
                replacement.terminate()
        return None

    def _serve_worker(self, link: Any, number: int, count: int) -> None:
        while True:
            try:
                message = link.recv()
            except (EOFError, OSError):
                if self.stopping:
                    return
                link.close()
                link = self._replace(number, count)
                if link is None:
                    return
                continue
            kind = message[0]
            if kind == "query":
                if self.on_query is not None:
                    try:
                        self.on_query(**message[1])
                    except Exception as exc:
                        log.error("cannot record a worker's C-FIND: %s", exc)
                continue
            answer: tuple[Any, Any]
            try:
                answer = self.mpps_handlers[kind](ForwardedEvent(*message[1:]))
            except Exception as exc:  # answered, never left waiting
                log.exception("MPPS from DICOM worker %d failed: %s", number, exc)
                from bridge.dicom.mpps import PROCESSING_FAILURE

                failure = _status_dataset(PROCESSING_FAILURE)
                answer = (failure, None)
            try:
                link.send(answer)
            except (OSError, ValueError):
                pass  # the worker is gone: the next recv() says so, and it is replaced

    def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after WORKER_STOP_TIMEOUT) and close the
        listening socket."""
        self.stopping = True
        self._stopped.set()
        with self.lock:
            processes = list(self.processes)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(WORKER_STOP_TIMEOUT)
            if process.is_alive():
                log.warning("DICOM worker %s did not stop: killed", process.pid)
                process.kill()
                process.join(5)
        with self.lock:
            self.processes = []
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _exit_reason(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        try:
            import signal

            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _status_dataset(code: int) -> Any:
    from pydicom import Dataset

    status = Dataset()
    status.Status = code
    return status


class ForwardedEvent:
    """What the MPPS handlers (bridge.dicom.mpps) read of a pynetdicom event, rebuilt in the main
    process from what a worker sent."""

    def __init__(
        self, calling: str, address: str, port: int, uids: dict[str, str], raw: bytes,
        transfer_syntax: str, list_name: str,
    ) -> None:  # fmt: skip
        self.assoc = SimpleNamespace(
            requestor=SimpleNamespace(ae_title=calling, address=address, port=port)
        )
        stream = io.BytesIO(raw) if raw else None
        self.request = SimpleNamespace(
            AffectedSOPInstanceUID=uids.get("affected") or None,
            RequestedSOPInstanceUID=uids.get("requested") or None,
            AttributeList=stream,
            ModificationList=stream,
        )
        self._raw = raw
        self._transfer_syntax = transfer_syntax
        self._list_name = list_name

    def _decode(self) -> Any:
        from pydicom import Dataset
        from pydicom.uid import UID
        from pynetdicom.dsutils import decode

        if not self._raw:
            return Dataset()
        ts = UID(self._transfer_syntax)
        return decode(io.BytesIO(self._raw), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)

    @property
    def attribute_list(self) -> Any:
        return self._decode()

    @property
    def modification_list(self) -> Any:
        return self._decode()


# ---- the worker process ----------------------------------------------------------------------


class _Link:
    """The worker's end of its pipe to the main process, shared by its association threads."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.lock = threading.Lock()

    def call(self, *message: Any) -> Any:
        with self.lock:
            self.connection.send(message)
            return self.connection.recv()

    def notify(self, *message: Any) -> None:
        with self.lock:
            self.connection.send(message)


def _forwarding_handlers(link: _Link) -> list[tuple[Any, Any, list[Any]]]:
    from pynetdicom import evt

    def forward(event: Any, kind: str, stream_name: str) -> tuple[Any, Any]:
        request = event.request
        stream = getattr(request, stream_name, None)
        raw = stream.getvalue() if stream is not None else b""
        requestor = event.assoc.requestor
        uids = {
            "affected": str(getattr(request, "AffectedSOPInstanceUID", "") or ""),
            "requested": str(getattr(request, "RequestedSOPInstanceUID", "") or ""),
        }
        return link.call(
            kind, str(requestor.ae_title), str(requestor.address), int(requestor.port or 0),
            uids, raw, str(event.context.transfer_syntax), stream_name,
        )  # fmt: skip

    return [
        (evt.EVT_N_CREATE, forward, ["n-create", "AttributeList"]),
        (evt.EVT_N_SET, forward, ["n-set", "ModificationList"]),
    ]


WORKER_NICE = 10  # how much less CPU priority a worker has than the main process


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker as soon as the main process dies, even by SIGKILL.
    The worker holds the listening socket too: lingering, it would keep the port from a
    restarted bridge, and take some of its connections. Elsewhere the parent check below
    stops the worker within PARENT_CHECK_INTERVAL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.debug("no parent-death signal: %s", exc)


def _lower_priority() -> None:
    """The main process (HL7 intake, the one writer) wins the CPU over the workers: under
    query load its ACKs then wait for no C-FIND. A nice level of 10 gives a worker about a
    tenth of a busy main process's share of a contended core; idle cores serve the workers."""
    try:
        os.nice(WORKER_NICE)
    except OSError as exc:
        log.warning("DICOM worker keeps the main process's priority: %s", exc)


ACCEPT_ROOM = 2  # fresh connections a worker serves at once; more wait for a free worker
FRESH_FOR = 0.2  # seconds a connection counts against ACCEPT_ROOM at most
# Seconds after its accept within which a connection's A-ASSOCIATE-RQ is expected to have
# arrived: past it, a connection that has neither sent a request nor has bytes waiting is
# silent, and no longer counts (a modality sends its request as soon as it connects).
REQUEST_GRACE = 0.005


class AcceptGate:
    """How many connections a DICOM worker takes on at once.

    The workers accept from one kernel queue. Without a gate, each worker's accept thread takes
    whatever arrives: one worker may hold 14 of 20 modalities' queries while the other holds 6,
    and its threads take turns at its one GIL. With the gate, a worker that already serves
    `room` fresh connections leaves the next one in the kernel's queue for a worker with room:
    queries are served about in their order of arrival, by whichever worker is free. Measured
    with 20 modalities on 2 cores: query p99 about 30% lower, and about 10% less CPU a query.

    A connection counts as fresh until it closes, for `fresh_for` seconds at most: an idle
    association, or a slow peer, never keeps a worker from accepting for longer than that. One
    that has not sent its A-ASSOCIATE-RQ counts only while `has_data(association)` (its bytes
    wait to be read) or within `grace` seconds of its accept: connections that say nothing,
    from however many addresses, do not hold up the accepts (at `fresh_for` each, 200 of them
    kept a modality waiting 10 s in the kernel's queue). cfind.SilentConnections bounds them."""

    def __init__(self, room: int = ACCEPT_ROOM, fresh_for: float = FRESH_FOR,
                 grace: float = REQUEST_GRACE,
                 has_data: Callable[[Any], bool] = lambda association: False) -> None:  # fmt: skip
        self.room = room
        self.fresh_for = fresh_for
        self.grace = grace
        self.has_data = has_data
        # id(association) -> [when its connection came, the association, its request came]
        self._opened: dict[int, list] = {}
        self._changed = threading.Condition()

    def _busy(self, entry: list, now: float) -> bool:
        when, association, requested = entry
        return requested or now - when < self.grace or self.has_data(association)

    def wait_for_room(self, longest: float = 0.5) -> None:
        """Return once fewer than `room` connections are fresh (or after `longest` seconds,
        so that the accept loop sees a shutdown)."""
        deadline = time.monotonic() + longest
        with self._changed:
            while True:
                now = time.monotonic()
                # Only fresh ones are kept: one whose close was never told is forgotten too.
                self._opened = {
                    k: e for k, e in self._opened.items() if now - e[0] < self.fresh_for
                }
                busy = [e for e in self._opened.values() if self._busy(e, now)]
                if len(busy) < self.room or now >= deadline:
                    return
                wake = min(e[0] for e in busy) + self.fresh_for
                if not all(e[2] for e in busy):  # one may fall silent: look again soon
                    wake = min(wake, now + self.grace)
                self._changed.wait(max(min(deadline, wake) - now, 0.0))

    def opened(self, association: Any) -> None:
        with self._changed:
            self._opened[id(association)] = [time.monotonic(), association, False]

    def requested(self, association: Any) -> None:
        with self._changed:
            entry = self._opened.get(id(association))
            if entry is not None:
                entry[2] = True

    def closed(self, association: Any) -> None:
        with self._changed:
            if self._opened.pop(id(association), None) is not None:
                self._changed.notify()


def _skip_value_checks() -> None:
    """pydicom checks every value it reads against its VR's pattern (a regular expression per
    UID of each association request, per element of each identifier): about 6% of a worker's
    time under 20 modalities. With pydicom's default (warn) a bad value is read all the same;
    the query compiler checks the values it matches on itself."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def worker_main(settings: Settings, sock: socket.socket, connection: Any, number: int,
                count: int, committed: Any = None, open_associations: Any = None,
                source_associations: Any = None) -> None:  # fmt: skip
    """A DICOM worker process: its own index of the folder, the C-FIND/C-ECHO server on the
    shared socket, MPPS and the query log forwarded to the main process."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s[dicom-{number}] %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # identifiers are patient data
    _die_with_parent()
    _lower_priority()
    _skip_value_checks()
    from twisted.internet import reactor, task, threads

    from bridge.net.cfind import start_dicom_server
    from bridge.net.pynetdicom_internals import peer_data_waiting
    from bridge.net.tls import dicom_ssl_context
    from bridge.storage.index import WorklistIndex, freeze_loaded

    # The association limit is the whole server's: the workers count their open associations
    # in one shared array (without it, as before, each takes its share).
    if open_associations is None:
        share = max(1, settings.max_associations // count)
        settings = dataclasses.replace(settings, max_associations=share)
    link = _Link(connection)
    index = WorklistIndex(settings, log=logging.getLogger("bridge.storage.index"))
    index.refresh_inline = True  # changes are read by whoever calls sync_now()
    sync_now = index.sync_now
    if settings.store:  # PostgreSQL: the worker follows the database, not a folder
        from bridge.storage.postgres.storage import follow_in_worker

        sync_now = follow_in_worker(settings, index, committed)
    else:
        # Before the load: nothing written meanwhile is missed (events wait for sync_now).
        index.start_watching(reactor, read_in_reactor=False)
        index.load(save_cache=False)
    parent = os.getppid()

    def record_query(**fields: Any) -> None:
        try:
            link.notify("query", fields)
        except (OSError, ValueError):
            pass  # the main process is stopping

    server = start_dicom_server(
        settings,
        index,
        ssl_context=dicom_ssl_context(settings),
        extra_handlers=_forwarding_handlers(link),
        on_query=record_query,
        listening_socket=sock,
        before_query=sync_now,  # in the association's thread: no hand-over
        association_counts=(open_associations, number) if open_associations is not None else None,
        source_counts=(source_associations, number) if source_associations is not None else None,
        accept_gate=AcceptGate(has_data=peer_data_waiting),
    )

    def keep_up() -> Any:  # while no query comes, changes are applied all the same
        return threads.deferToThread(sync_now).addErrback(
            lambda f: log.error("worklist sync failed: %s", f.getErrorMessage())
        )

    def check_parent() -> None:
        if os.getppid() != parent:
            log.warning("the main process is gone: DICOM worker %d stops", number)
            reactor.stop()

    freeze_loaded()
    link.notify("ready")
    checker = task.LoopingCall(check_parent)
    checker.start(PARENT_CHECK_INTERVAL, now=False)
    follower = task.LoopingCall(keep_up)
    follower.start(PARENT_CHECK_INTERVAL, now=True)
    # The index cache is the main process's to write: no stop_watching() here.
    reactor.addSystemEventTrigger("before", "shutdown", server.ae.shutdown)
    reactor.run()
