"""`wlbridge serve`: the MLLP listener and the C-FIND SCP in one process, on Twisted's reactor.

The reactor thread does all HL7 work (so changes to one order never interleave); pynetdicom serves
associations in its own threads and reads the index, which the reactor keeps in step with the
folder. SIGINT and SIGTERM stop accepting, let the message in hand finish, close both servers.
"""

from __future__ import annotations

import logging
import sys

from twisted.internet import reactor as default_reactor
from twisted.internet import task, threads

from bridge.cfind import start_dicom_server
from bridge.config import Settings
from bridge.index import WorklistIndex
from bridge.mllp import MLLPFactory
from bridge.pipeline import Bridge
from bridge.store import WorklistStore
from bridge.tls import dicom_ssl_context, mllp_tls_options
from bridge.translation_log import TranslationLog, query_recorder

log = logging.getLogger("bridge.server")

SWEEP_INTERVAL = 60.0  # seconds between removals of finished items past their retention


class BridgeServer:
    """Everything `serve` starts, so tests can run it in-process too."""

    def __init__(self, settings: Settings, reactor=default_reactor) -> None:
        self.settings = settings
        self.reactor = reactor
        self.translation_log = TranslationLog(
            settings.translation_log, settings.translation_log_format
        )
        self.index = WorklistIndex(settings, log=logging.getLogger("bridge.index"))
        self.store = WorklistStore(settings, self.index)
        self.bridge = Bridge(settings, self.store, self.index, self.translation_log)
        self.mllp_port = None
        self.dicom_server = None
        self.http_port = None  # the HTTP listener (admin API, web view, metrics), when on
        self.http = None  # its bridge.http.site.HttpApp
        self._sweeper: task.LoopingCall | None = None

    def start(self) -> None:
        leftovers = self.store.prepare()
        if leftovers:
            log.warning("removed %d temporary file(s) left by an interrupted write", len(leftovers))
        self.index.load(save_cache=False)  # written once both servers listen
        s = self.settings
        factory = MLLPFactory(
            self.bridge.handle,
            max_frame_size=s.max_frame_size,
            idle_timeout=s.idle_timeout,
            max_connections=s.max_connections,
            allowed_sources=s.allowed_mllp_sources,
            on_oversized=self.bridge.refuse_oversized,
            on_dropped=self.bridge.record_dropped,
        )
        tls = mllp_tls_options(s)
        if tls is not None:
            self.mllp_port = self.reactor.listenSSL(s.mllp_port, factory, tls, interface=s.host)
        else:
            self.mllp_port = self.reactor.listenTCP(s.mllp_port, factory, interface=s.host)
        self.dicom_server = start_dicom_server(
            s, self.index, ssl_context=dicom_ssl_context(s),
            on_query=query_recorder(self.translation_log),
        )  # fmt: skip
        if s.http_port:
            from bridge.http.site import start_http

            self.http_port, self.http = start_http(self, self.reactor)
        self.index.start_watching(self.reactor)
        if self.index.cache_is_stale:
            threads.deferToThread(self.index.save_cache).addErrback(
                lambda f: log.warning("cannot write the index cache: %s", f.getErrorMessage())
            )
        if s.finished_retention > 0:
            self._sweeper = task.LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(SWEEP_INTERVAL, now=True)
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        # Last: connections still open at shutdown are dropped after "before", and say so.
        self.reactor.addSystemEventTrigger("after", "shutdown", self.translation_log.close)
        log.info(
            "wlbridge serving MLLP on %s:%d and DICOM %s on %s:%d, worklist %s",
            s.host,
            self.mllp_port.getHost().port,
            s.ae_title,
            s.host,
            s.dicom_port,
            self.store.folder,
        )
        if self.http_port is not None:
            log.info(
                "HTTP admin API and web view on %s:%d", s.http_host, self.http_port.getHost().port
            )

    def _sweep(self):
        """Find expired items in a worker thread (it reads files), delete them on this one."""
        d = threads.deferToThread(self.bridge.expired_items)
        d.addCallback(self.bridge.remove_expired)
        d.addErrback(lambda f: log.error("expiry sweep failed: %s", f.getErrorMessage()))
        return d  # the LoopingCall waits for it before the next round

    def stop(self):
        """Stop accepting, then close both servers. Returns a Deferred for the MLLP side."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self.index.stop_watching()
        if self.dicom_server is not None:
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
    server = BridgeServer(settings)
    try:
        server.start()
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    default_reactor.run()
    return 0
