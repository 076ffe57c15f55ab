"""Prometheus metrics, fed from one seam: the translation log's records (HL7 and C-FIND alike),
plus gauges read from the server when scraped.

Label values that peers choose (message types, calling AE titles) are bounded: past
`MAX_LABELS` distinct values, new ones are counted as `other`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bridge.http import items
from bridge.storage.store import StoreError

MAX_LABELS = 200
# Outcomes of the outbox's lines (bridge.net.outbox): one queued line per message, one per attempt.
OUTBOUND_OUTCOMES = ("queued", "sent", "retrying", "parked")
MINUTES = 60  # per-minute history kept for the web view's charts
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
log = logging.getLogger("bridge.http.metrics")
_ANSWER_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000)


class _Labels:
    """Bounded label values."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def __call__(self, *values: str) -> tuple[str, ...]:
        key = tuple(v[:64] for v in values)
        with self._lock:
            if key in self._seen:
                return key
            if len(self._seen) < MAX_LABELS:
                self._seen.add(key)
                return key
        return tuple("other" for _ in values)


class PerMinute:
    """Counts per minute over the last hour, for the charts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: deque[list[int]] = deque(maxlen=MINUTES)  # [minute, messages, queries]

    def add(self, kind: int, now: float | None = None) -> None:
        minute = int((now if now is not None else time.time()) // 60)
        with self._lock:
            if not self._counts or self._counts[-1][0] != minute:
                self._counts.append([minute, 0, 0])
            self._counts[-1][kind] += 1

    def series(self, now: float | None = None) -> list[tuple[int, int, int]]:
        """(minute, messages, queries) for each of the last MINUTES minutes, oldest first."""
        current = int((now if now is not None else time.time()) // 60)
        with self._lock:
            held = {c[0]: (c[1], c[2]) for c in self._counts}
        return [(m, *held.get(m, (0, 0))) for m in range(current - MINUTES + 1, current + 1)]


class BridgeMetrics:
    """The registry /metrics serves, and the live state the status summary shows."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.registry = CollectorRegistry()
        r = self.registry
        self.hl7_messages = Counter(
            "wlbridge_hl7_messages", "HL7 messages received, by type, trigger and ACK code",
            ["type", "trigger", "ack"], registry=r,
        )  # fmt: skip
        self.hl7_apply = Histogram(
            "wlbridge_hl7_apply_seconds", "time from a message's arrival to its ACK",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cfind_requests = Counter(
            "wlbridge_cfind_requests", "C-FIND requests, by calling AE title and final status",
            ["calling_ae", "status"], registry=r,
        )  # fmt: skip
        self.cfind_seconds = Histogram(
            "wlbridge_cfind_seconds", "time to answer a C-FIND", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.cfind_answers = Histogram(
            "wlbridge_cfind_answers", "answers sent per C-FIND", buckets=_ANSWER_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.api_changes = Counter(
            "wlbridge_api_changes", "worklist changes made over HTTP, by outcome and who",
            ["outcome", "by"], registry=r,
        )  # fmt: skip
        self.mpps_events = Counter(
            "wlbridge_mpps_events", "MPPS N-CREATE and N-SET requests, by event and outcome",
            ["event", "outcome"], registry=r,
        )  # fmt: skip
        self.mpps_status_changes = Counter(
            "wlbridge_mpps_status_changes", "SPS status changes MPPS made, by new status",
            ["status"], registry=r,
        )  # fmt: skip
        self.outbound_queued = Counter(
            "wlbridge_outbound_queued", "order status messages queued, by receiver",
            ["receiver"], registry=r,
        )  # fmt: skip
        self.outbound_attempts = Counter(
            "wlbridge_outbound_attempts", "delivery attempts, by receiver and outcome "
            "(sent, retrying, parked)", ["receiver", "outcome"], registry=r,
        )  # fmt: skip
        r.register(_ServerCollector(server))
        self._hl7_labels = _Labels()
        self._ae_labels = _Labels()
        self._mpps_labels = _Labels()
        self._receiver_labels = _Labels()
        self.per_minute = PerMinute()
        self._lock = threading.Lock()
        self.last_message: dict[str, Any] | None = None
        self.last_query: dict[str, dict[str, Any]] = {}  # by calling AE title (bounded)
        events = getattr(server, "events", None)
        if events is not None:
            from bridge.core.events import StatusChange

            events.subscribe(StatusChange, self.on_status_change)

    def on_record(self, record: dict[str, Any]) -> None:
        """A translation-log subscriber (any thread)."""
        kind = str(record.get("type", ""))
        if kind == "C-FIND":
            ae = str(record.get("calling_ae", ""))
            (label,) = self._ae_labels(ae)
            self.cfind_requests.labels(label, str(record.get("status") or "none")).inc()
            self.cfind_seconds.observe(_seconds(record))
            self.cfind_answers.observe(_int(record.get("answers")))
            self.per_minute.add(2)
            with self._lock:
                if ae in self.last_query or len(self.last_query) < MAX_LABELS:
                    self.last_query[ae] = record
        elif kind.startswith("MPPS^"):
            event = self._mpps_labels(kind.removeprefix("MPPS^"), str(record.get("outcome", "")))
            self.mpps_events.labels(*event).inc()
        elif "receiver" in record and record.get("outcome") in OUTBOUND_OUTCOMES:
            (receiver,) = self._receiver_labels(str(record["receiver"]))
            if record["outcome"] == "queued":
                self.outbound_queued.labels(receiver).inc()
            else:
                self.outbound_attempts.labels(receiver, str(record["outcome"])).inc()
        elif kind == "api":
            self.api_changes.labels(str(record.get("outcome", "")), str(record.get("by", ""))).inc()
        elif "^" in kind or "ack" in record or (not kind and "peer" in record and "ms" in record):
            # an HL7 message (one without a readable header has no type)
            message_type, _, trigger = kind.partition("^")
            labels = self._hl7_labels(
                message_type or "unknown", trigger or "", str(record.get("ack", ""))
            )
            self.hl7_messages.labels(*labels).inc()
            if record.get("ms"):
                self.hl7_apply.observe(_seconds(record))
            self.per_minute.add(1)
            with self._lock:
                self.last_message = record

    def on_status_change(self, event: Any) -> None:
        if getattr(event, "cause", "") == "mpps" and event.old_status != event.new_status:
            self.mpps_status_changes.labels(str(event.new_status)).inc()


def _seconds(record: dict[str, Any]) -> float:
    try:
        return float(record.get("ms", 0)) / 1000
    except (TypeError, ValueError):
        return 0.0


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def rejected_count(folder: Path) -> tuple[int, int]:
    """(messages kept in the rejected folder, of which kept today (UTC))."""
    today = time.strftime("%Y%m%d", time.gmtime())
    total = today_count = 0
    try:
        for entry in folder.iterdir():
            if entry.suffix == ".hl7":
                total += 1
                today_count += entry.name.startswith(today)
    except OSError:
        pass
    return total, today_count


REJECTED_KEPT_HELP = (
    "rejected messages kept for replay, as /api/rejected lists them: on PostgreSQL every "
    "bridge's (the shared table, counted up to 10000), else this bridge's rejected folder"
)


def rejected_kept(server: Any) -> int | None:
    """The kept messages /api/rejected lists: the shared table's rows on PostgreSQL (on its
    own session, bounded; None when the database cannot say, and the gauge is left out),
    else the folder's. Scrapes run in the thread pool (WSGIResource), never on the reactor."""
    shared = getattr(server.bridge, "rejected_store", None)
    if shared is None:
        return rejected_count(Path(server.bridge.rejected_dir))[0]
    try:
        return shared.pending_count()
    except StoreError as exc:
        log.warning("wlbridge_rejected_kept left out of the metrics: %s", exc)
        return None


def outbox_state(server: Any) -> dict[str, Any] | None:
    """Messages waiting and parked, and the oldest waiting one's age, over all receivers and
    per receiver; None where the server has no outbox."""
    outbox = getattr(server, "outbox", None)
    if outbox is None:
        return None
    try:
        receivers = outbox.state()
    except OSError as exc:  # the folder gone or unreadable: report, do not fail the scrape
        return {"error": exc.strerror or str(exc)}
    return {
        "depth": sum(r["depth"] for r in receivers.values()),
        "parked": sum(r["parked"] for r in receivers.values()),
        "oldest_age": max((r["oldest_age"] for r in receivers.values()), default=0.0),
        "receivers": receivers,
    }


def mpps_state(server: Any) -> dict[str, Any] | None:
    """The MPPS instances kept, the cap, the retention's removals since start by kind, and the
    N-CREATEs refused for the cap. A shared store's count is the one its last sweep read (in a
    worker thread: a scrape never waits for the database)."""
    mpps = getattr(server, "mpps", None)
    retention = getattr(server, "mpps_retention", None)
    if mpps is None or retention is None:
        return None
    state: dict[str, Any] = {
        "max_instances": mpps.max_instances,
        "refused_full": mpps.refused_full,
        "removed": retention.totals(),
    }
    kept = retention.kept if getattr(server, "shared_store", False) else len(mpps.store)
    if kept is not None:
        state["instances"] = kept
    return state


class _ServerCollector:
    """Gauges read when scraped."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._counts: tuple[int, dict[str, int]] = (-1, {})

    def _status_counts(self) -> dict[str, int]:
        """Counted again only after the index changed (a count of 100,000 items takes ~0.1 s)."""
        generation, counts = self._counts
        if generation != self.server.index.generation:
            generation = self.server.index.generation
            counts = items.status_counts(self.server.index)
            self._counts = (generation, counts)
        return counts

    def describe(self) -> list:
        return []  # collected at scrape time only

    def collect(self):
        s = self.server
        items_by_status = GaugeMetricFamily(
            "wlbridge_items", "worklist items, by SPS status", labels=["status"]
        )
        for status, n in sorted(self._status_counts().items()):
            items_by_status.add_metric([status], n)
        yield items_by_status
        dicom = getattr(s, "dicom_server", None)
        assoc = 0
        if dicom is not None:
            try:
                assoc = len(dicom.active_associations)
            except Exception:
                assoc = 0
        yield GaugeMetricFamily("wlbridge_dicom_associations_open", "open DICOM associations",
                                value=assoc)  # fmt: skip
        factory = getattr(getattr(s, "mllp_port", None), "factory", None)
        yield GaugeMetricFamily(
            "wlbridge_mllp_connections_open", "open MLLP connections",
            value=len(getattr(factory, "connections", ()) or ()),
        )  # fmt: skip
        kept = rejected_kept(s)
        if kept is not None:
            yield GaugeMetricFamily("wlbridge_rejected_kept", REJECTED_KEPT_HELP, value=kept)
        mpps = mpps_state(s)
        if mpps is not None:
            if "instances" in mpps:
                yield GaugeMetricFamily(
                    "wlbridge_mpps_instances", "MPPS instances kept (at most mpps-max-instances)",
                    value=mpps["instances"],
                )  # fmt: skip
            removed = CounterMetricFamily(
                "wlbridge_mpps_instances_removed", "MPPS instances the retention removed, by "
                "kind (finished, in-progress, past-both: at start, unread)", labels=["kind"],
            )  # fmt: skip
            for kind, n in sorted(mpps["removed"].items()):
                removed.add_metric([kind], n)
            yield removed
            yield CounterMetricFamily(
                "wlbridge_mpps_refused_full", "N-CREATEs refused 0213: mpps-max-instances reached",
                value=mpps["refused_full"],
            )  # fmt: skip
        outbox = outbox_state(s) or {}
        receivers = outbox.get("receivers", {})
        for name, help_text, key in (
            ("wlbridge_outbox_depth", "outbound messages waiting to be sent", "depth"),
            ("wlbridge_outbox_parked", "outbound messages parked (need a retry or a drop)",
             "parked"),
            ("wlbridge_outbox_oldest_age_seconds", "age of the oldest waiting outbound message",
             "oldest_age"),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, help_text, labels=["receiver"])
            for receiver, state in sorted(receivers.items()):
                family.add_metric([receiver], state[key])
            yield family
