"""`wlbridge serve`: the MLLP listener and the DICOM SCP (C-FIND, MPPS) in one process.

The reactor thread does all HL7 work (so changes to one order never interleave), and the MPPS
handlers and the housekeeping hand their changes to it (bridge.core.worklist_service);
pynetdicom serves associations in its own threads and reads the index, which the reactor keeps
in step with the folder. SIGINT and SIGTERM stop accepting, let the message in hand finish,
close both servers. SIGHUP reopens the translation log at its configured path (after logrotate
renamed it).

A mistake in the settings stops start-up with a sentence (ConfigError) naming the setting.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import signal
import sys

from twisted.internet import defer, task, threads
from twisted.internet import reactor as default_reactor
from twisted.internet.error import CannotListenError

from bridge.config import ConfigError, Settings, check_files, dicom_worker_count, parse_sources
from bridge.core.events import EventBus, PatientMerged, StatusChange
from bridge.core.worklist_service import WorklistService
from bridge.dicom.mpps import MPPSService, mpps_handlers
from bridge.hl7.pipeline import Bridge
from bridge.net.cfind import start_dicom_server
from bridge.net.dicom_workers import DicomWorkers
from bridge.net.mllp import MLLPFactory
from bridge.net.outbox import outbox_for
from bridge.net.tls import dicom_ssl_context, mllp_tls_options
from bridge.ops.housekeeping import Housekeeping
from bridge.ops.mpps_retention import MppsRetention
from bridge.ops.translation_log import TranslationLog, query_recorder
from bridge.storage.index import WorklistIndex, freeze_loaded
from bridge.storage.mpps_store import mpps_store_for
from bridge.storage.protocol import FolderStorage, StorageChange
from bridge.storage.store import StoreError, WorklistStore

log = logging.getLogger("bridge.app.server")

SWEEP_INTERVAL = 60.0  # seconds between removals of finished items past their retention
MPPS_SWEEP_INTERVAL = 600.0  # seconds between removals of MPPS instances past their retention
STORE_PING_INTERVAL = 2.0  # seconds between checks that a PostgreSQL store answers (/readyz)
RETRY_MEMORY_PRUNE_INTERVAL = 600.0  # seconds between prunings of the shared retry memory
# seconds a delete stays visible to the change stream: a bridge whose stream was cut for
# longer would miss it (a restart reloads everything)
TOMBSTONE_RETENTION = 7 * 24 * 3600.0


class AllowedSources:
    """`allowed-mllp-sources` as networks: an address is allowed when any of them holds it
    (what MLLPFactory asks with `in`; empty: any source)."""

    def __init__(self, values: list[str]) -> None:
        self.networks = parse_sources(values)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: object) -> bool:
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def _origin(settings: Settings, name: str) -> str:
    return getattr(settings, "sources", {}).get(name, "the defaults")


class BridgeServer:
    """Everything `serve` starts, so tests can run it in-process too."""

    def __init__(self, settings: Settings, reactor=default_reactor) -> None:
        self.settings = settings
        self.reactor = reactor
        check_files(settings)
        try:
            self.translation_log = TranslationLog(
                settings.translation_log, settings.translation_log_format
            )
        except OSError as exc:
            raise ConfigError(
                f"{_origin(settings, 'translation_log')}: translation-log: cannot open "
                f"{settings.translation_log} ({exc.strerror or exc})"
            ) from None
        self.index = WorklistIndex(settings, log=logging.getLogger("bridge.storage.index"))
        self.events = EventBus()
        self.shared_store = bool(settings.store)  # PostgreSQL, shared with other bridges
        self._sweep_lock = self._housekeeping_lock = self._mpps_sweep_lock = None
        if self.shared_store:
            from bridge.storage.postgres import storage as pg

            self.storage = pg.PostgresStorage(settings)
            self.store = pg.ItemFiles(self.storage)  # read by path, expiry: in the database
            # one bridge at a time runs a sweep or a housekeeping round
            self._sweep_lock = pg.RoundLock(settings.store, pg.SWEEP_LOCK)
            self._housekeeping_lock = pg.RoundLock(settings.store, pg.HOUSEKEEPING_LOCK)
            from bridge.storage.postgres.mpps import MPPS_SWEEP_LOCK

            self._mpps_sweep_lock = pg.RoundLock(settings.store, MPPS_SWEEP_LOCK)
        else:
            self.store = WorklistStore(settings)  # the index follows the service's events
            self.storage = FolderStorage(settings, self.store, self.index)
        self._store_pinger: task.LoopingCall | None = None
        self._memory_pruner: task.LoopingCall | None = None
        self._copies_follower: task.LoopingCall | None = None
        # The one writer of the worklist: HL7 (the pipeline), MPPS, the housekeeping and HTTP
        # hand it their changes; it applies them on the reactor thread and publishes events.
        self.worklist = WorklistService(
            settings, self.store, self.index, self.events, reactor, storage=self.storage
        )
        retry_memory = rejected_store = None
        if self.shared_store:  # a retry sent to another bridge gets the same answer
            from bridge.ops.rejected_copies import RejectedCopies
            from bridge.storage.postgres.memory import RejectedMessages, RetryMemory

            retry_memory = RetryMemory(settings.store)
            rejected_store = RejectedMessages(settings.store)
            self.rejected_copies = RejectedCopies(settings.rejected_dir, rejected_store)
        self.bridge = Bridge(
            settings,
            self.store,
            self.index,
            self.translation_log,
            events=self.events,
            service=self.worklist,
            retry_memory=retry_memory,
            rejected_store=rejected_store,
        )
        self.mpps_store = mpps_store_for(settings)
        self.mpps = MPPSService(
            self.mpps_store,
            self.worklist,
            self.translation_log,
            max_instances=settings.mpps_max_instances,
            retention_hours=settings.mpps_retention,
        )
        self.mpps_retention = MppsRetention(settings, self.mpps_store, self.worklist.on_writer)
        self._mpps_sweeper: task.LoopingCall | None = None
        self.mpps_sweeping: defer.Deferred | None = None  # the sweep under way, if any
        self.events.subscribe(PatientMerged, self.mpps.on_patient_merged)
        self.housekeeping = Housekeeping(settings, self.worklist, self.translation_log)
        self._housekeeper: task.LoopingCall | None = None
        # Order status updates to the receivers: queued durably inside the publication.
        self.outbox = outbox_for(settings, reactor, self.translation_log)
        self.events.subscribe(StatusChange, self.outbox.on_status_change)
        self.mllp_port = None
        self.dicom_server = None
        self.http_port = None  # the HTTP listener (admin API, web view, metrics), when on
        self.http = None  # its bridge.http.site.HttpApp
        self._sweeper: task.LoopingCall | None = None

    def start(self) -> None:
        s = self.settings
        if self.shared_store:
            self._open_shared_store()
        else:
            self._open_folder()
        instances = self.mpps_store.load()  # the folder's: expired ones removed, not read
        self.mpps_retention.count(getattr(self.mpps_store, "removed_at_load", {}), "at start")
        if instances:
            log.info("%d MPPS instance(s) in %s", instances, self.mpps_store.folder)
        self.outbox.prepare()
        factory = MLLPFactory(
            self.bridge.handle,
            max_frame_size=s.max_frame_size,
            idle_timeout=s.idle_timeout,
            max_connections=s.max_connections,
            allowed_sources=s.allowed_mllp_sources,
            on_oversized=self.bridge.refuse_oversized,
            on_dropped=self.bridge.record_dropped,
            **MLLPFactory.settings_options(s, self.bridge.record_refused),
        )
        factory.allowed_sources = AllowedSources(s.allowed_mllp_sources)  # networks, not strings
        ssl_context = self._tls("dicom", dicom_ssl_context)
        try:
            if dicom_worker_count(s) > 0:
                self.dicom_server = self._start_dicom_workers()
            else:
                self.dicom_server = start_dicom_server(
                    s,
                    self.index,
                    ssl_context=ssl_context,
                    extra_handlers=mpps_handlers(self.mpps),
                    on_query=query_recorder(self.translation_log),
                )
        except OSError as exc:
            raise ConfigError(self._cannot_listen("dicom_port", s.dicom_port, exc)) from None
        # MLLP listens once DICOM serves (the workers take a second or two to start): an engine
        # that connects meanwhile is refused and retries, rather than waiting for its ACK.
        tls = self._tls("mllp", mllp_tls_options)
        try:
            if tls is not None:
                self.mllp_port = self.reactor.listenSSL(s.mllp_port, factory, tls, interface=s.host)
            else:
                self.mllp_port = self.reactor.listenTCP(s.mllp_port, factory, interface=s.host)
        except CannotListenError as exc:
            self._stop_dicom()
            raise ConfigError(
                self._cannot_listen("mllp_port", s.mllp_port, exc.socketError)
            ) from None
        if s.http_port:
            from bridge.http.serve import start_http

            try:
                self.http_port, self.http = start_http(self, self.reactor)
            except CannotListenError as exc:
                self.mllp_port.stopListening()
                self.mllp_port = None
                self._stop_dicom()
                raise ConfigError(
                    self._cannot_listen("http_port", s.http_port, exc.socketError)
                ) from None
        if not self.shared_store:
            self.index.start_watching(self.reactor)
        if not self.shared_store and self.index.cache_is_stale:
            threads.deferToThread(self.index.save_cache).addErrback(
                lambda f: log.warning("cannot write the index cache: %s", f.getErrorMessage())
            )
        if s.finished_retention > 0:
            self._sweeper = task.LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(SWEEP_INTERVAL, now=True)
        self._mpps_sweeper = task.LoopingCall(self.sweep_mpps)
        self._mpps_sweeper.clock = self.reactor
        self._mpps_sweeper.start(MPPS_SWEEP_INTERVAL, now=True)
        if s.housekeeping:
            self._housekeeper = task.LoopingCall(self._housekeep)
            self._housekeeper.clock = self.reactor
            self._housekeeper.start(s.housekeeping_interval, now=True)
        self.outbox.start()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        # Last: connections still open at shutdown are dropped after "before", and say so.
        self.reactor.addSystemEventTrigger("after", "shutdown", self.translation_log.close)
        # Once the reactor runs: its SIGINT/SIGTERM handlers are in place by then, so whoever
        # waits for this line may stop the server at once.
        self.reactor.callWhenRunning(lambda: log.info("%s", self.startup_line()))

    def _stop_dicom(self) -> None:
        """Stop the DICOM service of a start that failed after it."""
        if isinstance(self.dicom_server, DicomWorkers):
            self.dicom_server.stop()
        elif self.dicom_server is not None:
            self.dicom_server.ae.shutdown()
        self.dicom_server = None

    def _open_shared_store(self) -> None:
        """Connect, check the schema, load the index from the database and follow the other
        bridges' changes from the change number of that load on."""
        s = self.settings
        try:
            self.storage.prepare()
            self.index.load_records(
                ((self.storage.path_of(key), record) for key, record in self.storage.scan()),
                [self.storage.own_partition],
            )
        except StoreError as exc:
            raise ConfigError(f"{_origin(s, 'store')}: store: {exc}") from None
        self.storage.watch(self._follow_store, self.reactor)
        self._store_pinger = task.LoopingCall(
            lambda: threads.deferToThread(self.storage.ping).addErrback(
                lambda f: log.error("store check failed: %s", f.getErrorMessage())
            )
        )
        self._store_pinger.clock = self.reactor
        self._store_pinger.start(STORE_PING_INTERVAL, now=False)
        self._memory_pruner = task.LoopingCall(
            lambda: threads.deferToThread(self._prune_shared).addErrback(
                lambda f: log.warning("cannot prune the shared store: %s", f.getErrorMessage())
            )
        )
        self._memory_pruner.clock = self.reactor
        self._memory_pruner.start(RETRY_MEMORY_PRUNE_INTERVAL, now=True)
        # this bridge's rejected folder follows the shared table's replays, and the reverse
        from bridge.ops.rejected_copies import RECONCILE_INTERVAL

        self._copies_follower = task.LoopingCall(self._follow_rejected)
        self._copies_follower.clock = self.reactor
        self._copies_follower.start(RECONCILE_INTERVAL, now=True)

    def _follow_rejected(self):
        """Reconcile the rejected folder with the shared table (bridge.ops.rejected_copies):
        the database in a worker thread, the moves on this one."""
        copies = self.rejected_copies
        d = threads.deferToThread(copies.find)
        d.addCallback(copies.move)
        d.addErrback(
            lambda f: log.warning(
                "cannot reconcile the rejected folder with the store: %s", f.getErrorMessage()
            )
        )
        return d

    def _prune_shared(self) -> None:
        """Forget old answers to control IDs and old deletes (in a worker thread)."""
        self.bridge.retry_memory.prune()
        self.bridge.rejected_store.prune_replayed()
        self.storage.worklist.prune_tombstones(TOMBSTONE_RETENTION)

    def _follow_store(self, change: StorageChange) -> None:
        """Another bridge's change (on the reactor thread): the index serves it from now on."""
        path = self.storage.path_of(change.key)
        if change.record is None:
            self.index.discard(path)
        else:
            self.index.put_record(path, change.record)

    def _open_folder(self) -> None:
        s = self.settings
        # The configured folder, not per-ae's sub-folder of our own AE title (made on first use).
        created_empty = not s.worklist_dir.exists()
        try:
            leftovers = self.store.prepare()
        except OSError as exc:
            raise ConfigError(
                f"{_origin(s, 'worklist_dir')}: worklist-dir: cannot use "
                f"{self.store.folder.absolute()} ({exc.strerror or exc}); give a folder the "
                "bridge's user can write"
            ) from None
        if created_empty:
            # Said once and loudly: a typo in worklist-dir would otherwise serve an empty list.
            log.warning(
                "worklist-dir %s did not exist: created it EMPTY (from %s); if the worklist "
                "is elsewhere, correct worklist-dir",
                s.worklist_dir.absolute(),
                _origin(s, "worklist_dir"),
            )
        if leftovers:
            log.warning("removed %d temporary file(s) left by an interrupted write", len(leftovers))
        self.index.load(save_cache=False)  # written once both servers listen

    def _start_dicom_workers(self) -> DicomWorkers:
        from bridge.dicom.mpps import handle_n_create, handle_n_set

        workers = DicomWorkers(
            self.settings,
            {
                "n-create": lambda event: handle_n_create(event, self.mpps),
                "n-set": lambda event: handle_n_set(event, self.mpps),
            },
            query_recorder(self.translation_log),
        )
        workers.start()
        if self.shared_store:  # the workers' read-your-writes: our last commit's number
            from bridge.core.events import ItemRemoved, ItemWritten

            def committed(_event: object) -> None:
                workers.committed.value = self.storage.worklist.last_seq

            self.events.subscribe(ItemWritten, committed)
            self.events.subscribe(ItemRemoved, committed)
        return workers

    def startup_line(self) -> str:
        """What is on, in one line: each listener, its TLS, its allow-list, and the folder."""
        s = self.settings

        def tls(cert: str, ca: str) -> str:
            if not cert:
                return "plain TCP"
            return "TLS, client certificate required" if ca else "TLS, no client certificate"

        sources = ", ".join(s.allowed_mllp_sources) or "any"
        callers = ", ".join(s.allowed_calling_aets) or "any"
        dicom_port = self.dicom_server.server_address[1] if self.dicom_server else s.dicom_port
        return (
            f"wlbridge serving MLLP on {s.host}:{self.mllp_port.getHost().port} "
            f"({tls(s.mllp_tls_cert, s.mllp_tls_ca)}; sources: {sources}) "
            f"and DICOM {s.ae_title} on {s.host}:{dicom_port} "
            f"({tls(s.dicom_tls_cert, s.dicom_tls_ca)}; calling AE titles: {callers}"
            f"{'; own items only' if s.own_items_only else ''}), "
            f"worklist {self._worklist_name()} ({s.worklist_layout}, "
            f"{len(self.index)} item(s))"
            + (
                f", HTTP admin API and web view on {s.http_host}:{self.http_port.getHost().port} "
                f"({tls(s.http_tls_cert, '')})"
                if self.http_port is not None
                else ""
            )
        )

    def _worklist_name(self) -> str:
        if self.shared_store:
            from bridge.storage.postgres.connection import redacted

            return f"in {redacted(self.settings.store)}"
        return str(self.store.folder.absolute())

    def _tls(self, side: str, build):
        """The listener's TLS options, or a ConfigError naming the settings that failed."""
        try:
            return build(self.settings)
        except Exception as exc:  # OpenSSL and ssl errors have no common base
            names = ", ".join(f"{side}-tls-{p}" for p in ("cert", "key", "ca"))
            origin = _origin(self.settings, f"{side}_tls_cert")
            raise ConfigError(
                f"{origin}: {names}: cannot load the certificate, key or CA "
                f"({type(exc).__name__}: {exc}); give PEM files, the key matching the certificate"
            ) from None

    def _cannot_listen(self, name: str, port: int, exc: object) -> str:
        reason = getattr(exc, "strerror", None) or str(exc)
        flag = name.replace("_", "-")
        where = (
            f"{_origin(self.settings, name)}: {flag}: cannot listen on {self.settings.host}:{port}"
        )
        if getattr(exc, "errno", None) == errno.EADDRINUSE:
            return (
                f"{where} (port {port} is already in use); stop the other program that uses "
                f"it, or choose another {flag}"
            )
        return (
            f"{where} ({reason}); host must be an address of this machine (0.0.0.0: all), "
            f"{flag} a port this user may open"
        )

    def reopen_log(self) -> None:
        """Reopen the translation log (on the reactor thread)."""
        try:
            self.translation_log.reopen()
        except OSError as exc:
            log.error(
                "cannot reopen the translation log %s: %s", self.settings.translation_log, exc
            )
            return
        log.info("reopened the translation log %s", self.settings.translation_log)

    def on_sighup(self, *_: object) -> None:
        """SIGHUP: the translation log only. Reopened in the handler itself when the log is not
        in the middle of a line, so that a message sent right after the signal is written to
        the new file; otherwise on the reactor thread, once that line is done."""
        try:
            reopened = self.translation_log.reopen(blocking=False)
        except OSError as exc:
            self.reactor.callFromThread(
                log.error,
                "cannot reopen the translation log %s: %s",
                self.settings.translation_log,
                exc,
            )
            return
        if reopened:
            self.reactor.callFromThread(
                log.info, "reopened the translation log %s", self.settings.translation_log
            )
        else:
            self.reactor.callFromThread(self.reopen_log)

    def _sweep(self):
        """Find expired items in a worker thread (it reads files), delete them on this one."""
        d = self._round(self._sweep_lock, self.bridge.expired_items, self.bridge.remove_expired)
        d.addErrback(lambda f: log.error("expiry sweep failed: %s", f.getErrorMessage()))
        return d  # the LoopingCall waits for it before the next round

    def sweep_mpps(self):
        """Remove MPPS instances past their retention, in a worker thread (the folder store's
        removals in batches on this one); a Deferred of the removals by kind (None: another
        bridge of a shared store ran this round)."""
        d = self._round(self._mpps_sweep_lock, self.mpps_retention.sweep, lambda found: found)
        d.addErrback(lambda f: log.error("MPPS retention sweep failed: %s", f.getErrorMessage()))
        self.mpps_sweeping = d

        def done(result):
            if self.mpps_sweeping is d:
                self.mpps_sweeping = None
            return result

        return d.addBoth(done)

    def _housekeep(self):
        """Find idle items in a worker thread (it reads files), change them on this one."""
        d = self._round(self._housekeeping_lock, self.housekeeping.find, self.housekeeping.apply)
        d.addErrback(lambda f: log.error("housekeeping failed: %s", f.getErrorMessage()))
        return d

    def _round(self, lock, find, apply):
        """`find` in a worker thread, `apply` what it found on this one; with a shared store,
        only while this bridge holds the round's lock (another bridge's round: skipped)."""

        def find_if_ours():
            if lock is not None and not lock.try_acquire():
                return None
            return find()

        def apply_found(found):
            if found is not None:
                return apply(found)
            return None

        def release(result):
            if lock is not None:
                lock.release()
            return result

        # this server's reactor's pool (an in-process server may run on a reactor of its own)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), find_if_ours)
        d.addCallback(apply_found)
        d.addBoth(release)
        return d

    def stop(self):
        """Stop accepting, then close both servers. Returns a Deferred for the MLLP side."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._housekeeper is not None and self._housekeeper.running:
            self._housekeeper.stop()
        if self._mpps_sweeper is not None and self._mpps_sweeper.running:
            self._mpps_sweeper.stop()
        if self.shared_store:
            for loop in (self._store_pinger, self._memory_pruner, self._copies_follower):
                if loop is not None and loop.running:
                    loop.stop()
            self.storage.stop_watching()
        else:
            self.index.stop_watching()
        self.outbox.stop()
        if isinstance(self.dicom_server, DicomWorkers):
            self.dicom_server.stop()  # each worker aborts its open associations
            self.dicom_server = None
        elif self.dicom_server is not None:
            self.dicom_server.ae.shutdown()  # aborts open associations too
            self.dicom_server = None
        if self.http_port is not None:
            self.http_port.stopListening()
            self.http_port = None
        d = self.mllp_port.stopListening() if self.mllp_port is not None else None
        self.mllp_port = None
        return d


def serve(settings: Settings) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # identifiers are patient data
    try:
        server = BridgeServer(settings)
        server.start()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except Exception as exc:
        log.error("cannot start: %s: %s", type(exc).__name__, exc)
        return 1
    signal.signal(signal.SIGHUP, server.on_sighup)
    freeze_loaded()  # here, not in start(): tests start and drop servers in one process
    default_reactor.run()
    return 0
