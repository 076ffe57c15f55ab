"""High-availability benchmark: `wlbridge serve` on the folder store against `--store
postgresql://...` with PostgreSQL on the same machine.

    python -m bench.ha [--orders 400] [--visibility 200] [--items 10000] [--reps 15]
                       [--dsn postgresql://user@host/db] [--skip ingest,visibility,cfind]
                       [--json FILE]

Three parts, each on fresh bridges (free ports, temporary folders) and fresh databases:

- **ingest**: the same N ORM^O01 new orders (bench.ingest's messages) sent one message per
  connection, one client after the other (`per-connection`) and four such clients at once
  (`per-connection x4`), to a bridge on the folder store and to one on PostgreSQL. Every ACK
  must be AA and every order then found by C-FIND. CPU time per message is read from /proc for
  the bridge and, for PostgreSQL, for the database server's processes.
- **visibility**: two bridges on one database. Orders go to one and the other in turn; a
  poller on the other bridge runs C-FIND after C-FIND for the order's accession number (a 2 ms
  pause between them; bench.cfind's minimal client, one association each) from before the order
  is sent until one finds it. The latency is from the AA to the end of the first C-FIND that
  found the order (an upper bound), and to the start of the last one that did not (a lower
  bound); a C-FIND may find the order before the sender has read its AA.
- **cfind**: the same generated items (bench.cfind's, the items of its AE folder, flat layout)
  in a folder and, through `wlbridge import`, in PostgreSQL; bench.cfind's three queries
  against both bridges, one association each, alternating between the two, medians and the
  bridges' CPU time per query.

Without --dsn it runs its own PostgreSQL (initdb in a temporary folder, as the tests do; fsync
and synchronous_commit on). With --dsn, that server is used: its role must be allowed to
create databases (one per run, dropped at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

from bench.cfind import AE_FOLDER, _encode, c_find, ensure_items, queries
from bench.common import cpu_seconds, free_port, load_average, percentile, wait_port
from bench.ingest import (
    END,
    START,
    Result,
    _connect,
    _read_ack,
    machine,
    order_message,
    run_load,
)
from bench.load import settle
from bench.worklist_items import query

ROOT = Path(__file__).resolve().parents[1]
INGEST_MODES = (("per-connection", 1), ("per-connection x4", 4))


# ---- the database ---------------------------------------------------------------------------


class Databases:
    """A PostgreSQL server (our own, or the one --dsn names) handing out fresh databases."""

    def __init__(self, dsn: str = "") -> None:
        self.server = None
        if not dsn:
            from tests.postgres import PostgresServer

            self.server = PostgresServer()
            self.server.start()
            dsn = self.server.dsn
        self.dsn = dsn
        self.created: list[str] = []

    def new(self) -> str:
        """The URL of a new database with the bridge's tables."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        from bridge.storage.postgres.schema import upgrade

        name = f"wlbridge_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.created.append(name)
        info = conninfo_to_dict(self.dsn)
        host, port = info.pop("host", "localhost"), info.pop("port", "5432")
        auth = quote(info.pop("user", ""), safe="")
        if "password" in info:
            auth += ":" + quote(info.pop("password"), safe="")
        info.pop("dbname", None)
        # a URL (what --store takes), with the server's other options as its parameters
        url = f"postgresql://{auth}@{host}:{port}/{name}" + (f"?{urlencode(info)}" if info else "")
        upgrade(url)
        return url

    def server_pid(self) -> int | None:
        """The postmaster's PID when it runs here (its children are the backends)."""
        if self.server is None:
            return None
        return int((self.server.data / "postmaster.pid").read_text().split()[0])

    def close(self) -> None:
        if self.server is not None:
            self.server.remove()
            return
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# ---- the bridges ----------------------------------------------------------------------------


class Bridge:
    """`wlbridge serve` on free ports, its logs in `root`, on the folder `worklists` or the
    PostgreSQL `store`."""

    def __init__(
        self,
        root: Path,
        *,
        store: str = "",
        worklists: Path | None = None,
        ae_title: str = "WLBRIDGE",
        options: tuple[str, ...] = (),
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.mllp_port, self.dicom_port = free_port(), free_port()
        where = ["--store", store] if store else []
        cmd = [
            sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1",
            "--mllp-port", str(self.mllp_port), "--dicom-port", str(self.dicom_port),
            "--ae-title", ae_title, "--worklist-dir", str(worklists or root / "worklists"),
            "--translation-log", str(root / "translation.log"),
            "--rejected-dir", str(root / "rejected"), "--mpps-dir", str(root / "mpps"),
            *where, *options,
        ]  # fmt: skip
        self.log = open(root / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.mllp_port, self.proc, timeout=900)
        wait_port(self.dicom_port, self.proc, timeout=900)
        settle(self.proc.pid)  # start-up work (index load, cache) is not measured

    def count(self, identifier: bytes | None = None) -> int:
        ident = identifier or _encode(query({"Modality": ""}, AccessionNumber=""))
        answers, status = c_find(self.dicom_port, ident, self.ae_title)
        if status != 0:
            raise RuntimeError(f"C-FIND ended with status {status:#06x}")
        return answers

    def stop(self) -> int:
        self.proc.send_signal(2)  # SIGINT: a clean stop
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


# ---- ingest ---------------------------------------------------------------------------------


@dataclass
class IngestRow:
    store: str
    mode: str
    orders: int
    per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    bridge_cpu_ms: float
    database_cpu_ms: float | None
    found: int
    problems: list[str] = field(default_factory=list)
    load: str = ""


def bench_ingest(orders: int, workdir: Path, databases: Databases) -> list[IngestRow]:
    rows = []
    for mode, clients in INGEST_MODES:
        # the same messages for both stores: each run has a bridge and a store of its own
        messages = [order_message(f"H{clients}", n) for n in range(orders)]
        for store in ("folder", "postgresql"):
            root = workdir / f"ingest-{store}-{clients}"
            url = databases.new() if store == "postgresql" else ""
            bridge = Bridge(root, store=url)
            db_pid = databases.server_pid() if url else None
            db_before = cpu_seconds(db_pid) if db_pid else 0.0
            load = load_average()
            try:
                result: Result = run_load(
                    store, mode, bridge.mllp_port, bridge.proc.pid, messages, clients, True
                )
                db_cpu = cpu_seconds(db_pid) - db_before if db_pid else None
                found = bridge.count()
            finally:
                code = bridge.stop()
            if code != 0:
                result.problems.append(f"wlbridge exited with {code} on SIGINT")
            if found != orders:
                result.problems.append(f"C-FIND finds {found} of {orders} orders")
            row = IngestRow(
                store=store,
                mode=mode,
                orders=orders,
                per_second=result.per_second,
                p50_ms=result.p50_ms,
                p99_ms=result.p99_ms,
                max_ms=result.max_ms,
                bridge_cpu_ms=result.server_cpu_ms,
                database_cpu_ms=round(db_cpu / orders * 1000, 2) if db_cpu is not None else None,
                found=found,
                problems=result.problems,
                load=load,
            )
            rows.append(row)
            print(_ingest_row(row), flush=True)
    return rows


INGEST_HEADER = (
    "| store | mode | orders | msg/s | ACK p50 ms | p99 ms | max ms | bridge CPU ms/msg "
    "| database CPU ms/msg | found by C-FIND | load |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _ingest_row(r: IngestRow) -> str:
    db = f"{r.database_cpu_ms:.2f}" if r.database_cpu_ms is not None else "-"
    problems = "; PROBLEMS: " + "; ".join(r.problems) if r.problems else ""
    return (
        f"| {r.store} | {r.mode} | {r.orders} | {r.per_second:.0f} | {r.p50_ms:.2f} "
        f"| {r.p99_ms:.2f} | {r.max_ms:.2f} | {r.bridge_cpu_ms:.2f} | {db} "
        f"| {r.found}/{r.orders}{problems} | {r.load} |"
    )


# ---- cross-bridge visibility ----------------------------------------------------------------


@dataclass
class Visibility:
    orders: int
    p50_ms: float  # from the AA to the end of the first C-FIND that found the order
    p99_ms: float
    max_ms: float
    lower_p50_ms: float  # from the AA to the start of the last C-FIND that did not find it
    lower_p99_ms: float
    before_ack: int  # orders a C-FIND on the other bridge found before the AA was read
    queries: int
    query_p50_ms: float
    ack_p50_ms: float
    load: str = ""
    problems: list[str] = field(default_factory=list)


class Poller(threading.Thread):
    """C-FIND after C-FIND (a pause of `interval` between them) on one bridge for the
    accession number it is given; records (start, end, found) of each."""

    def __init__(self, bridge: Bridge, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.bridge, self.interval = bridge, interval
        self.identifier: bytes | None = None
        self.records: list[tuple[float, float, bool]] = []
        self.found = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.error: Exception | None = None

    def look_for(self, accession: str) -> None:
        with self.lock:
            self.identifier = _encode(query({"Modality": ""}, AccessionNumber=accession))
            self.records = []
            self.found.clear()

    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                identifier = self.identifier
            if identifier is None or self.found.is_set():
                self.stopping.wait(self.interval)
                continue
            started = time.perf_counter()
            try:
                answers, _ = c_find(self.bridge.dicom_port, identifier, self.bridge.ae_title)
            except (OSError, RuntimeError) as exc:
                self.error = exc
                return
            ended = time.perf_counter()
            with self.lock:
                if identifier is self.identifier:  # not a query for the previous order
                    self.records.append((started, ended, answers > 0))
                    if answers:
                        self.found.set()
            self.stopping.wait(self.interval)


def bench_visibility(count: int, workdir: Path, databases: Databases) -> Visibility:
    """Orders sent to one bridge and the other in turn; a poller on the other bridge queries
    for each from before it is sent until a C-FIND finds it."""
    url = databases.new()
    bridges = [Bridge(workdir / f"visibility-{n}", store=url) for n in ("a", "b")]
    pollers = [Poller(b) for b in bridges]
    upper, lower, acks, durations, problems = [], [], [], [], []
    before_ack = 0
    load = load_average()
    try:
        for poller in pollers:
            poller.start()
        socks = [_connect(b.mllp_port) for b in bridges]
        buffers = [bytearray(), bytearray()]
        for n in range(count):
            source, poller = n % 2, pollers[1 - n % 2]
            control, accession, message = order_message("VIS", n)
            poller.look_for(accession)
            sent = time.perf_counter()
            socks[source].sendall(START + message + END)
            ack = _read_ack(socks[source], buffers[source])
            acked = time.perf_counter()
            acks.append(acked - sent)
            if b"MSA|AA|" + control.encode() not in ack:
                problems.append(f"{control}: {ack[:60]!r}")
                continue
            if not poller.found.wait(30):
                problems.append(f"{accession}: not on the other bridge 30 s after its AA")
                continue
            with poller.lock:
                records = list(poller.records)
            first = min(end for _, end, found in records if found)
            misses = [start for start, _, found in records if not found and start < first]
            upper.append(max(0.0, first - acked))
            lower.append(max(0.0, max(misses) - acked) if misses else 0.0)
            before_ack += first < acked
            durations += [end - start for start, end, _ in records]
        for sock in socks:
            sock.close()
    finally:
        for poller in pollers:
            poller.stopping.set()
            poller.join(10)
            if poller.error is not None:
                problems.append(f"poller: {poller.error}")
        for bridge in bridges:
            bridge.stop()

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1000, 2)  # NaN when there are none

    return Visibility(
        orders=count,
        p50_ms=ms(upper, 0.5),
        p99_ms=ms(upper, 0.99),
        max_ms=round(max(upper) * 1000, 2) if upper else float("nan"),
        lower_p50_ms=ms(lower, 0.5),
        lower_p99_ms=ms(lower, 0.99),
        before_ack=before_ack,
        queries=len(durations),
        query_p50_ms=ms(durations, 0.5),
        ack_p50_ms=ms(acks, 0.5),
        load=load,
        problems=problems,
    )


# ---- C-FIND on each store -------------------------------------------------------------------


@dataclass
class CFindRow:
    query: str
    answers: str
    folder_ms: float
    postgresql_ms: float
    folder_per_s: float
    postgresql_per_s: float
    folder_cpu_ms: float
    postgresql_cpu_ms: float
    load: str = ""


def import_items(folder: Path, url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "import", str(folder), "--store", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wlbridge import failed: {done.stdout}{done.stderr}")


def bench_cfind(items: int, reps: int, workdir: Path, databases: Databases) -> list[CFindRow]:
    data = Path(tempfile.gettempdir()) / f"wlbridge-bench-{items}"
    ensure_items(data, items)  # kept for later runs, as bench.cfind keeps it
    url = databases.new()
    started = time.monotonic()
    import_items(data / AE_FOLDER, url)  # flat: the AE folder's items, no partition
    print(f"({items} items imported into PostgreSQL in {time.monotonic() - started:.0f} s)")
    # The flat layout on both (bench.cfind's AE folder as the worklist): the same items, keys
    # and queries, without the per-ae partition look-up on either side.
    servers = {
        "folder": Bridge(workdir / "cfind-folder", worklists=data / AE_FOLDER, ae_title=AE_FOLDER),
        "postgresql": Bridge(workdir / "cfind-pg", store=url, ae_title=AE_FOLDER),
    }
    rows = []
    try:
        for label, identifier in queries(items).items():
            times: dict[str, list[float]] = {name: [] for name in servers}
            cpu: dict[str, float] = {name: 0.0 for name in servers}
            counts: dict[str, int] = {}
            load = load_average()
            for _ in range(reps):
                for name, bridge in servers.items():  # alternating: the same load for both
                    before = cpu_seconds(bridge.proc.pid)
                    t = time.perf_counter()
                    counts[name] = c_find(bridge.dicom_port, identifier, AE_FOLDER)[0]
                    times[name].append(time.perf_counter() - t)
                    cpu[name] += cpu_seconds(bridge.proc.pid) - before
            medians = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
            row = CFindRow(
                query=label,
                answers="/".join(str(counts[n]) for n in servers),
                folder_ms=round(medians["folder"], 2),
                postgresql_ms=round(medians["postgresql"], 2),
                folder_per_s=round(reps / sum(times["folder"]), 1),
                postgresql_per_s=round(reps / sum(times["postgresql"]), 1),
                folder_cpu_ms=round(cpu["folder"] / reps * 1000, 2),
                postgresql_cpu_ms=round(cpu["postgresql"] / reps * 1000, 2),
                load=load,
            )
            rows.append(row)
            print(_cfind_row(row), flush=True)
    finally:
        for bridge in servers.values():
            bridge.stop()
    return rows


CFIND_HEADER = (
    "| query | answers (folder/PostgreSQL) | folder ms | PostgreSQL ms | folder q/s "
    "| PostgreSQL q/s | folder CPU ms/q | PostgreSQL CPU ms/q | load |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _cfind_row(r: CFindRow) -> str:
    return (
        f"| {r.query} | {r.answers} | {r.folder_ms:.1f} | {r.postgresql_ms:.1f} "
        f"| {r.folder_per_s:.0f} | {r.postgresql_per_s:.0f} | {r.folder_cpu_ms:.2f} "
        f"| {r.postgresql_cpu_ms:.2f} | {r.load} |"
    )


# ---- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=400, help="orders per ingest run")
    parser.add_argument("--visibility", type=int, default=200, help="orders timed across")
    parser.add_argument("--items", type=int, default=10000, help="items for the C-FIND part")
    parser.add_argument("--reps", type=int, default=15, help="repetitions of each query")
    parser.add_argument("--dsn", default="", help="a PostgreSQL server to use (CREATEDB)")
    parser.add_argument("--skip", default="", help="parts to leave out: ingest,visibility,cfind")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    skip = {part for part in args.skip.split(",") if part}

    info = machine()
    info["load_at_start"] = load_average()
    print(", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="wlbridge-bench-ha-"))
    databases = Databases(args.dsn)
    report: dict = {"machine": info}
    problems = False
    try:
        if "ingest" not in skip:
            print(INGEST_HEADER, flush=True)
            ingest = bench_ingest(args.orders, workdir, databases)
            report["ingest"] = [asdict(r) for r in ingest]
            problems |= any(r.problems for r in ingest)
        if "visibility" not in skip:
            vis = bench_visibility(args.visibility, workdir, databases)
            report["visibility"] = asdict(vis)
            print(
                f"\nAA on one bridge -> found by C-FIND on the other ({vis.orders} orders, "
                f"alternating directions; load {vis.load}):\n"
                f"  p50 {vis.p50_ms} ms, p99 {vis.p99_ms} ms, max {vis.max_ms} ms "
                f"(lower bound p50 {vis.lower_p50_ms} ms, p99 {vis.lower_p99_ms} ms; "
                f"{vis.before_ack} found before their AA was read; {vis.queries} C-FINDs, "
                f"p50 {vis.query_p50_ms} ms; ACK p50 {vis.ack_p50_ms} ms)"
            )
            for problem in vis.problems[:5]:
                print(f"  PROBLEM: {problem}")
            problems |= bool(vis.problems)
        if "cfind" not in skip:
            print(f"\nC-FIND, {args.items} items, {args.reps} repetitions, one association each:")
            print(CFIND_HEADER, flush=True)
            report["cfind"] = [asdict(r) for r in bench_cfind(args.items, args.reps, workdir,
                                                              databases)]  # fmt: skip
    finally:
        databases.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_at_end"] = load_average()
    print(f"load average at the end: {report['machine']['load_at_end']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
