"""The DICOM side: Modality Worklist C-FIND SCP (with C-ECHO), over the worklist index.

pynetdicom runs the server in its own threads: an accept thread, and threads per association.
Handlers here run in the association's thread and only read the index (bridge.storage.index), whose
lock is held for dictionary look-ups only; matching runs there too, never on the reactor.

This module uses pynetdicom's public API only. What reaches below it (the bounds on what a peer
may send, and the speed-ups of the answer path) is in bridge.net.pynetdicom_internals.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from bridge.config import Settings
from bridge.dicom.matching import AnswerEncoder, Query, QueryError, SearchStopped, compile_query
from bridge.net.pynetdicom_internals import (
    FastSender,
    Limits,
    Server,
    Tuning,
    close_before_request,
    hang_up,
    peer_data_waiting,
    prepare_association,
    skip_identifier_logging,
    start_server,
    wait_for_peer,
)
from bridge.storage.index import WorklistIndex
from bridge.storage.mpps_store import MPPS_SOP_CLASS

LOG = logging.getLogger("bridge.net.cfind")

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # a requested optional key is not supported for matching
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700  # max_answers exceeded, or the search ran out of time
IDENTIFIER_ERROR = 0xA900  # identifier does not match the SOP class (bad key values)
UNABLE_TO_PROCESS = 0xC312  # an answer could not be encoded (as pynetdicom reports it)

# A-ASSOCIATE-RJ: result, source, reason.
_REJECT_CALLING = (0x01, 0x01, 0x03)  # permanent, service user: calling AE title not recognised
_REJECT_CALLED = (0x01, 0x01, 0x07)  # permanent, service user: called AE title not recognised
_REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, service provider (presentation): local limit

# Connections that have not sent their A-ASSOCIATE-RQ: one source may keep SILENT_PER_SOURCE of
# them (per process: each DICOM worker counts its own) silent for more than SILENT_AFTER seconds;
# its next connections are closed as they open, until those are dropped (ACSE timeout) or speak.
SILENT_PER_SOURCE = 10
SILENT_AFTER = 0.25
# ...and a process keeps at most AWAITING_REQUEST connections waiting for their request, from
# all sources (each holds two threads and a descriptor): past it, new ones are closed at once.
AWAITING_REQUEST = 1024
SILENT_LOG_EVERY = 10.0  # seconds between two log lines about one source's closed connections
# DICOM workers count each source's associations in SOURCE_BUCKETS buckets per worker (by a hash
# of the address, the same in every process); two sources in one bucket share its count.
SOURCE_BUCKETS = 4096
PYNETDICOM_ASSOCIATIONS = 1 << 20  # pynetdicom's limit: never reached (see make_dicom_ae)


def make_dicom_ae(settings: Settings, index: WorklistIndex) -> AE:
    """An AE offering Modality Worklist FIND and Verification, with the settings' limits."""
    pynetdicom_log = logging.getLogger("pynetdicom")
    if pynetdicom_log.level == logging.NOTSET:
        pynetdicom_log.setLevel(logging.WARNING)  # it logs identifiers (patient data) at DEBUG
    skip_identifier_logging(Tuning(settings.dicom_speedups))
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(ModalityWorklistInformationFind)
    ae.add_supported_context(Verification)
    ae.add_supported_context(MPPS_SOP_CLASS)  # its handlers: bridge.dicom.mpps
    # max-associations is WorklistSCP.on_requested's check, which counts associations only and
    # logs its refusals; pynetdicom's own counts connections still waiting for their request too
    # (a peer holding silent ones would keep every modality out), and refuses without a word.
    ae.maximum_associations = PYNETDICOM_ASSOCIATIONS
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
        # Called before each search: a DICOM worker's index catches up with the writer there.
        self.before_query: Callable[[], None] | None = None
        self.association_counts: tuple[Any, int] | None = None  # workers: (shared array, slot)
        # workers: (shared array of SOURCE_BUCKETS counts per worker, this worker's slot)
        self.source_counts: tuple[Any, int] | None = None
        self.accept_gate: Any = None  # a DICOM worker's AcceptGate: told of each connection
        self.silent = SilentConnections(
            forget_after=settings.acse_timeout + 5.0, has_data=peer_data_waiting
        )
        self.per_ae = settings.worklist_layout == "per-ae"
        self.allowed = {t.strip() for t in settings.allowed_calling_aets}
        self.hidden = tuple(s.upper() for s in settings.hidden_statuses)
        self.tuning = Tuning(settings.dicom_speedups)
        self.answer_cache = AnswerCache(own_items_only=settings.own_items_only)
        self.compiled_queries = CompiledQueries(own_items_only=settings.own_items_only)
        self.limits = Limits(
            max_pdu=16382,  # what we advertise: the AE's maximum_pdu_size (pynetdicom's default)
            max_associate_request=settings.max_associate_request_size,
            max_message=settings.max_identifier_size,
            acse_timeout=settings.acse_timeout,
            network_timeout=settings.network_timeout,
        )

    def handlers(self) -> list[tuple[Any, Any]]:
        """(event, handler) pairs for the AE's server; add other services' handlers here."""
        return [
            (evt.EVT_CONN_OPEN, self.on_open),
            (evt.EVT_CONN_CLOSE, self.on_close),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_FIND, self.on_find),
        ]

    def on_open(self, event: Any) -> None:
        assoc = event.assoc
        host = str(getattr(assoc.requestor, "address", "") or "")
        refused, why = self.silent.opened(assoc, host)
        if refused:
            if self.silent.should_log(host):
                LOG.warning("DICOM peer %s: connection closed at once (%d refused so far): %s",
                            host, refused, why)  # fmt: skip
            close_before_request(assoc)
            return
        if self.accept_gate is not None:
            self.accept_gate.opened(assoc)
        prepare_association(assoc, self.tuning, self.limits)

    def on_close(self, event: Any) -> None:
        waited = self.silent.closed(event.assoc)
        if waited is not None and waited >= self.settings.acse_timeout:
            LOG.warning("DICOM peer %s dropped: no A-ASSOCIATE-RQ within the ACSE timeout (%g s)",
                        event.assoc.requestor.address, self.settings.acse_timeout)  # fmt: skip
        if self.accept_gate is not None:
            self.accept_gate.closed(event.assoc)
        if self.association_counts is not None:  # this one is still counted as open
            self._open_associations(event.assoc, leaving=event.assoc)
        if self.source_counts is not None and event.assoc.requestor.primitive is not None:
            self._associations_from(event.assoc, leaving=event.assoc)

    def _open_associations(self, assoc: Any, leaving: Any = None) -> int:
        """The server's open associations as acceptor: this process's, plus (DICOM workers)
        the other workers' last published counts."""
        # Connections still waiting for their request are not associations (SilentConnections
        # bounds them): a peer holding idle connections does not take the modalities' slots.
        active = sum(
            1
            for a in assoc.ae.active_associations
            if a.is_acceptor and a is not leaving and a.requestor.primitive is not None
        )
        if self.association_counts is None:
            return active
        counts, slot = self.association_counts
        counts[slot] = active
        return sum(counts)

    def _associations_from(self, assoc: Any, leaving: Any = None) -> int:
        """The server's open associations from `assoc`'s source address: this process's, plus
        (DICOM workers) the other workers' last published counts for its bucket."""
        host = str(assoc.requestor.address)
        bucket = _source_bucket(host) if self.source_counts is not None else None
        active = sum(
            1
            for a in assoc.ae.active_associations
            if a.is_acceptor and a is not leaving and a.requestor.primitive is not None
            and (str(a.requestor.address) == host if bucket is None
                 else _source_bucket(str(a.requestor.address)) == bucket)
        )  # fmt: skip
        if self.source_counts is None:
            return active
        counts, slot = self.source_counts
        counts[slot * SOURCE_BUCKETS + bucket] = active
        workers = len(counts) // SOURCE_BUCKETS
        return sum(counts[w * SOURCE_BUCKETS + bucket] for w in range(workers))

    def on_requested(self, event: Any) -> None:
        """Refuse unknown calling AE titles, (per-ae) unknown called AE titles, and requests
        past `max-associations`.

        A called AE title is only ever compared with the names of the sub-folders that
        exist, never joined into a path."""
        assoc = event.assoc
        self.silent.requested(assoc)
        if self.accept_gate is not None:
            self.accept_gate.requested(assoc)
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
        active = self._open_associations(assoc)
        if active > self.settings.max_associations:
            LOG.warning("association from %s refused: %d associations open (max-associations)",
                        calling, active - 1)  # fmt: skip
            assoc.acse.send_reject(*_REJECT_BUSY)
            assoc.kill()
            return
        per_source = self.settings.max_associations_per_source
        if per_source:
            from_source = self._associations_from(assoc)
            if from_source > per_source:
                LOG.warning("association from %s at %s refused: %d associations open from that "
                            "address (max-associations-per-source)", calling,
                            assoc.requestor.address, from_source - 1)  # fmt: skip
                assoc.acse.send_reject(*_REJECT_BUSY)
                assoc.kill()

    def _compile(self, event: Any, calling: str) -> Query:
        return compile_query(
            event.identifier,
            pn_case_insensitive=self.settings.pn_case_insensitive,
            hidden_statuses=self.hidden,
            station_aet=calling if self.settings.own_items_only else None,
        )

    def on_echo(self, event: Any) -> int:
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
                query = self.compiled_queries.query(event, calling, self._compile)
            except QueryError as exc:
                outcome = f"refused ({exc})"
                yield _failure(IDENTIFIER_ERROR, str(exc), exc.tag), None
                return
            except Exception as exc:  # an identifier pydicom cannot decode
                outcome = f"refused (undecodable identifier: {exc})"
                yield _failure(IDENTIFIER_ERROR, "cannot decode the identifier"), None
                return
            keys = " ".join(query.given) or "(universal)"
            budget = self.settings.max_search_time
            query.guard = _search_guard(event, time.monotonic() + budget)
            if self.before_query is not None:
                self.before_query()
            try:
                records = self.index.search(query, called if self.per_ae else None)
            except SearchStopped as stop:
                outcome = f"search stopped: {stop}"
                if stop.reason == "cancelled":
                    yield CANCEL, None
                elif stop.reason == "budget":
                    comment = f"search longer than {budget:g} s: narrow the query"
                    yield _failure(OUT_OF_RESOURCES, comment), None
                return
            finally:
                query.guard = None
            total = len(records)
            status = PENDING_WARNING if query.unsupported else PENDING
            if query.unsupported:
                outcome = "success; not matched on " + ",".join(query.unsupported)
            limit = self.settings.max_answers
            send = None
            if records:
                cached = self.answer_cache.encoder(event, query, calling, records)
                send = FastSender.create(event, self.tuning, cached, query.answer, status)
            if send is not None and send.raw is not None:
                # Answers written to the socket in batches, from this thread.
                outcome, sent, final = self._write_answers(event, send, records, total, outcome)
                if final is not None:
                    yield final, None
                return
            stalled = 0  # seconds the peer has not been reading our answers
            for record in records:
                stalled = stalled + 1 if wait_for_peer(assoc) else 0
                if stalled >= max(self.settings.dimse_timeout, 1):
                    # Answers would pile up in memory for a peer that stopped reading.
                    outcome = "aborted: the peer stopped reading the answers"
                    hang_up(assoc)
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
            LOG.info(
                "C-FIND %s->%s keys: %s; %d answers (%d matched), %s, %.1f ms",
                calling, called, keys, sent, total, outcome,
                (time.perf_counter() - started) * 1000,
            )  # fmt: skip
            if self.on_query is not None:
                self.on_query(calling=calling, called=called, keys=keys, answers=sent,
                              matched=total, outcome=outcome,
                              ms=(time.perf_counter() - started) * 1000)  # fmt: skip

    def _write_answers(
        self, event: Any, send: FastSender, records: list, total: int, outcome: str
    ) -> tuple[str, int, Any]:
        """Send the pending responses for `records`, ANSWER_BATCH at a time, written by this
        thread (`FastSender.write`); between batches, the checks of the one-by-one path.
        Returns (outcome, answers sent, the final status to yield instead of success or
        None)."""
        assoc = event.assoc
        limit = self.settings.max_answers
        stall_limit = max(self.settings.dimse_timeout, 1)
        to_send = records[:limit] if limit else records
        sent = 0
        for start in range(0, len(to_send), ANSWER_BATCH):
            if not assoc.is_established:
                return "association ended", sent, None
            if event.is_cancelled:
                return "cancelled", sent, CANCEL
            pdus = []
            failed = False
            for record in to_send[start : start + ANSWER_BATCH]:
                pdu = send.pdu(record)
                if pdu is None:
                    failed = True
                    break
                pdus.append(pdu)
            problem = send.write(b"".join(pdus), stall_limit) if pdus else ""
            if problem == "stalled":
                hang_up(assoc)  # answers would pile up for a peer that stopped reading
                return "aborted: the peer stopped reading the answers", sent, None
            if problem:
                return "association ended", sent, None
            sent += len(pdus)
            if failed:
                failure = _failure(UNABLE_TO_PROCESS, "cannot encode an answer")
                return "failed: an answer could not be encoded", sent, failure
        if limit and total > limit:
            if not assoc.is_established:
                return "association ended", sent, None
            if event.is_cancelled:
                return "cancelled", sent, CANCEL
            comment = f"{total} matches, {limit} sent: narrow the query"
            return f"truncated at max_answers={limit}", sent, _failure(OUT_OF_RESOURCES, comment)
        return outcome, sent, None


class SilentConnections:
    """The connections of one process that have not sent their A-ASSOCIATE-RQ yet, by source
    address. A modality sends its request as soon as it connects: a connection with no request
    and no bytes waiting to be read (`has_data`) after `silent_after` seconds is silent. A
    source with `limit` silent connections is holding them: its next connections are refused
    as they open (each would hold two threads and a descriptor for the ACSE timeout). So is any
    connection without bytes waiting once `most` wait for their request, from all sources. A
    burst of modalities behind one address is not refused: their requests come within
    milliseconds, and wait to be read if the process is busy."""

    def __init__(self, forget_after: float, limit: int = SILENT_PER_SOURCE,
                 silent_after: float = SILENT_AFTER, most: int = AWAITING_REQUEST,
                 has_data: Callable[[Any], bool] = lambda assoc: False,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.forget_after = forget_after  # past the ACSE timeout: dropped by then
        self.limit = limit
        self.most = most  # connections waiting for their request, all sources
        self.silent_after = silent_after
        self.has_data = has_data
        self.clock = clock
        # id(association) -> (source, since, association)
        self.waiting: dict[int, tuple[str, float, Any]] = {}
        self.refused: dict[str, int] = {}  # source -> connections refused (for the log)
        self.logged: dict[str, float] = {}  # source -> when a refusal was last logged
        self.lock = threading.Lock()

    def opened(self, assoc: Any, host: str) -> tuple[int, str]:
        """(0, "") if `assoc`'s connection may wait for its request (and it is counted), else
        the number of connections of `host` refused so far, this one included, and why (close
        it)."""
        now = self.clock()
        with self.lock:
            self.waiting = {k: v for k, v in self.waiting.items() if now - v[1] < self.forget_after}
            silent = sum(
                1 for source, since, other in self.waiting.values()
                if source == host and now - since >= self.silent_after
                and not self.has_data(other)
            )  # fmt: skip
            if silent >= self.limit:
                why = f"{silent} of its connections have sent no A-ASSOCIATE-RQ for " \
                      f"{self.silent_after:g} s (at most {self.limit})"  # fmt: skip
            elif len(self.waiting) >= self.most and not self.has_data(assoc):
                why = f"{len(self.waiting)} connections (all sources) wait for their " \
                      f"A-ASSOCIATE-RQ (at most {self.most})"  # fmt: skip
            else:
                self.waiting[id(assoc)] = (host, now, assoc)
                return 0, ""
            if len(self.refused) >= 4096:
                self.refused.clear()  # never grows without bound
                self.logged.clear()
            self.refused[host] = self.refused.get(host, 0) + 1
            return self.refused[host], why

    def should_log(self, host: str) -> bool:
        """True at most once every SILENT_LOG_EVERY seconds for `host`."""
        now = self.clock()
        with self.lock:
            if now - self.logged.get(host, -1e9) < SILENT_LOG_EVERY:
                return False
            self.logged[host] = now
            return True

    def requested(self, assoc: Any) -> None:
        with self.lock:
            self.waiting.pop(id(assoc), None)

    def closed(self, assoc: Any) -> float | None:
        """Seconds `assoc`'s connection waited without a request, or None if it sent one."""
        with self.lock:
            entry = self.waiting.pop(id(assoc), None)
        return None if entry is None else self.clock() - entry[1]


# Answers written at once by the direct path: a C-CANCEL is noticed between two batches.
ANSWER_BATCH = 16


class CompiledQueries:
    """The compiled form of recent identifiers, by their bytes as the SCU sent them: a modality
    that polls asks the same question each time, and decoding and compiling it again took a
    tenth of a worker's time. A compiled query is immutable but for its per-search state
    (guard, count), which each search gets fresh in a copy. Bounded: QUERIES identifiers, the
    least recently used dropped first; identifiers longer than LONGEST are not kept."""

    QUERIES = 256
    LONGEST = 4096  # bytes

    def __init__(self, own_items_only: bool) -> None:
        self.own_items_only = own_items_only  # the calling AE title is then part of the query
        self.compiled: collections.OrderedDict[tuple, Query] = collections.OrderedDict()
        self.lock = threading.Lock()

    def query(self, event: Any, calling: str, compile_: Callable[[Any, str], Query]) -> Query:
        """The event's identifier compiled (by `compile_(event, calling)` unless kept)."""
        try:
            raw = event.request.Identifier.getvalue()
            syntax = str(event.context.transfer_syntax)
        except AttributeError:
            return compile_(event, calling)
        if len(raw) > self.LONGEST:
            return compile_(event, calling)
        key = (raw, syntax, calling if self.own_items_only else None)
        with self.lock:
            kept = self.compiled.get(key)
            if kept is not None:
                self.compiled.move_to_end(key)
        if kept is None:
            kept = compile_(event, calling)  # a QueryError is not kept: it is cheap to repeat
            with self.lock:
                self.compiled[key] = kept
                if len(self.compiled) > self.QUERIES:
                    self.compiled.popitem(last=False)
        return dataclasses.replace(kept, guard=None, matched=0)


class AnswerCache:
    """The encoded answers of recent queries, by the query's identifier (its bytes, as the SCU
    sent them) and each record, for modalities that ask the same question again and again.

    An answer is a function of the query, the record and the transfer syntax: records are
    immutable, and an item that changes gets a new record, so a cached answer is never stale.
    Bounded: QUERIES identifiers and TOTAL answers over all of them (least recently used
    queries dropped first); a query's answers are pruned to the records it returned last once
    they hold more than twice as many; queries with more than MOST_ANSWERS answers are not
    cached, and no query keeps more than MOST_ANSWERS."""

    QUERIES = 256
    MOST_ANSWERS = 2000
    TOTAL = 20000  # answers held at most (about 10-20 MB of encoded answers and their records)

    def __init__(self, own_items_only: bool) -> None:
        self.own_items_only = own_items_only  # the calling AE title is then part of the query
        self.queries: collections.OrderedDict[tuple, dict[int, tuple[Any, bytes]]] = (
            collections.OrderedDict()
        )
        self.lock = threading.Lock()
        self.total = 0  # answers held over all queries

    def encoder(
        self, event: Any, query: Any, calling: str, records: list
    ) -> Callable[[bool], Callable[[Any], bytes | None]]:
        """`make_encoder` for FastSender.create, for the answers `records`: AnswerEncoder's,
        through the cache."""

        def make_encoder(implicit: bool) -> Callable[[Any], bytes | None]:
            encode = AnswerEncoder(query, implicit=implicit, matched=True).encode  # found by search
            if len(records) > self.MOST_ANSWERS:
                return encode
            key, answers = self._answers(event, implicit, calling)
            if answers is None:
                return encode
            if len(answers) > 2 * len(records) + 16:  # items replaced since: never asked again
                current = {id(r) for r in records}
                with self.lock:
                    if self.queries.get(key) is not answers:
                        return encode  # dropped meanwhile
                    for stale in [k for k in list(answers) if k not in current]:
                        if answers.pop(stale, None) is not None:
                            self.total -= 1

            def cached(record: Any) -> bytes | None:
                hit = answers.get(id(record))
                if hit is not None and hit[0] is record:
                    return hit[1]
                data = encode(record)
                if data is not None and len(answers) < self.MOST_ANSWERS:
                    with self.lock:
                        if self.queries.get(key) is not answers:
                            return data  # dropped meanwhile: not counted any more
                        if id(record) not in answers:
                            self.total += 1
                        answers[id(record)] = (record, data)  # the record held: its id stays
                        self._shed(keep=answers)
                return data

            return cached

        return make_encoder

    def _answers(self, event: Any, implicit: bool, calling: str) -> tuple[tuple, dict | None]:
        try:
            identifier = event.request.Identifier.getvalue()
        except AttributeError:
            return (), None
        key = (identifier, implicit, calling if self.own_items_only else None)
        with self.lock:
            answers = self.queries.get(key)
            if answers is None:
                answers = self.queries[key] = {}
                if len(self.queries) > self.QUERIES:
                    _key, dropped = self.queries.popitem(last=False)
                    self.total -= len(dropped)
            else:
                self.queries.move_to_end(key)
        return key, answers

    def _shed(self, keep: dict) -> None:
        """Drop the least recently used queries' answers until TOTAL holds (under the lock)."""
        while self.total > self.TOTAL and self.queries:
            key, answers = next(iter(self.queries.items()))
            if answers is keep:  # the query being answered is the only one left
                break
            del self.queries[key]
            self.total -= len(answers)

    def __len__(self) -> int:
        return self.total


def _source_bucket(host: str) -> int:
    return zlib.crc32(host.encode()) % SOURCE_BUCKETS


def _search_guard(event: Any, deadline: float) -> Callable[[], None]:
    """The check a query runs every few records while searching: raises SearchStopped when
    the search ran past `deadline`, the peer sent C-CANCEL, or the association ended."""
    assoc = event.assoc

    def guard() -> None:
        if event.is_cancelled:
            raise SearchStopped("cancelled")
        if not assoc.is_established:
            raise SearchStopped("association ended")
        if time.monotonic() > deadline:
            raise SearchStopped("budget")

    return guard


def _failure(code: int, comment: str, tag: int | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO
    if tag is not None:
        status.OffendingElement = [tag]
    return status


def start_dicom_server(
    settings: Settings,
    index: WorklistIndex,
    ssl_context: ssl.SSLContext | None = None,
    extra_handlers: list | None = None,  # other services' handlers on the same AE
    on_query: Callable[..., None] | None = None,
    listening_socket: socket.socket | None = None,  # a DICOM worker's, shared with the others
    before_query: Callable[[], None] | None = None,
    association_counts: tuple[Any, int] | None = None,  # (shared array, this worker's slot)
    source_counts: tuple[Any, int] | None = None,  # (shared array, this worker's slot)
    accept_gate: Any = None,  # a DICOM worker's: accept only while it has room
) -> Server:
    """Start the C-FIND/C-ECHO server on (settings.host, settings.dicom_port) without
    blocking. Stop it with `server.ae.shutdown()` (aborts open associations too)."""
    ae = make_dicom_ae(settings, index)
    scp = WorklistSCP(settings, index, on_query)
    scp.before_query = before_query
    scp.association_counts = association_counts
    scp.source_counts = source_counts
    scp.accept_gate = accept_gate
    scp.limits = dataclasses.replace(scp.limits, max_pdu=int(ae.maximum_pdu_size or 0))
    LOG.info("DICOM: %s", scp.tuning.describe())
    if not scp.tuning.bounds:
        LOG.warning("DICOM: PDU lengths are not bounded with this pynetdicom version")
    server = start_server(
        ae,
        (settings.host, settings.dicom_port),
        scp.handlers() + (extra_handlers or []),
        scp.tuning,
        network_timeout=settings.network_timeout,
        handshake_timeout=settings.acse_timeout,
        ssl_context=ssl_context,
        listening_socket=listening_socket,
        accept_gate=accept_gate,
    )
    server.worklist_scp = scp  # for tests and metrics: its answer cache, its limits
    return server
