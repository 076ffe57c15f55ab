"""Load benchmark: K modalities querying at once while an engine sends orders.

    python -m bench.load --items 10000 --modalities 1,5,20,50 [--rate 50] [--seconds 10]
                         [--data DIR] [--servers bridge,wlmscpfs,orthanc] [--json FILE]

Generates N items (as bench.cfind does: 50 a day for each of 8 stations, kept in DIR for later
runs) and, for each server and each K, runs K modality threads that query in a loop for D
seconds, one association a query, each for its station and one day (about 50 answers). For the
bridge an HL7 sender sends ORM^O01 orders at the given rate on one connection meanwhile; after
each AA it looks the order up by accession with a C-FIND (read-your-writes).

Prints, a row per server and K: queries/s, query p50/p99/max, ACK p50/p99/max, orders found at
once after their ACK, connection attempts the kernel dropped at a listen queue (TcpExt
ListenOverflows + ListenDrops, machine-wide: run it on a quiet machine), errors and the server's
CPU time per query; then, for each K, the bridge's queries/s against the faster peer's and the
issue's checks (query p99 < 200 ms, ACK p99 < 20 ms, >= 30x, no drops, every order found), and
the load average.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.cfind import (
    AE_FOLDER,
    TODAY,
    _encode,
    c_find,
    ensure_items,
    machine,
    start_orthanc,
    start_wlmscpfs,
    stop,
)
from bench.common import cpu_seconds, free_port, percentile, wait_port
from bench.ingest import END, START, _read_ack, order_message
from bench.worklist_items import MODALITIES, day_after, query

ROOT = Path(__file__).resolve().parents[1]


def listen_drops() -> int:
    """TcpExt ListenOverflows + ListenDrops, machine-wide, as `nstat` shows them."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    total = 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if not names.startswith("TcpExt:"):
            continue
        row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
        total += int(row.get("ListenOverflows", 0)) + int(row.get("ListenDrops", 0))
    return total


@dataclass
class Result:
    server: str
    items: int
    modalities: int
    seconds: float
    queries: int = 0
    query_ms: list[float] = field(default_factory=list, repr=False)
    acks_ms: list[float] = field(default_factory=list, repr=False)
    orders: int = 0
    found_after_ack: int = 0
    listen_drops: int = 0
    server_cpu_s: float = 0.0  # the server's processes' CPU time during the run
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        row = asdict(self)
        del row["query_ms"], row["acks_ms"]
        row["errors"] = len(self.errors)
        row["queries_per_s"] = round(self.queries / self.seconds, 1)
        row["server_cpu_s"] = round(self.server_cpu_s, 2)
        row["cpu_ms_per_query"] = round(1000 * self.server_cpu_s / max(self.queries, 1), 2)
        for name, values in (("query", self.query_ms), ("ack", self.acks_ms)):
            for label, q in (("p50", 0.5), ("p99", 0.99)):
                row[f"{name}_{label}_ms"] = round(percentile(values, q), 1)
            row[f"{name}_max_ms"] = round(max(values), 1) if values else float("nan")
        return row


def settle(pid: int, timeout: float = 120.0) -> None:
    """Wait until the server is idle (its start-up work done: the index cache written, the
    workers loaded), so that a run measures the queries only."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - before < 0.05:
            return
        before = now


class BridgeUnderLoad:
    """`wlbridge serve` on a copy of the generated folder (per-ae layout, so the bridge's own
    orders land beside the generated items in the AE folder and every query scans the same
    partition). The copy is of hard links: the bridge replaces files by renaming, so the
    generated folder keeps its N items for the next run and for the peers."""

    def __init__(self, root: Path, logs: Path, options: list[str] = ()) -> None:
        self.mllp_port, self.dicom_port = free_port(), free_port()
        served = logs / "worklist"
        shutil.copytree(root, served, copy_function=os.link)
        root = served
        cmd = [
            sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1",
            "--mllp-port", str(self.mllp_port), "--dicom-port", str(self.dicom_port),
            "--ae-title", AE_FOLDER, "--worklist-dir", str(root),
            "--worklist-layout", "per-ae", "--max-associations", "200",
            "--max-associations-per-source", "0",  # every modality here is 127.0.0.1
            "--translation-log", str(logs / "translation.log"),
            "--rejected-dir", str(logs / "rejected"), "--mpps-dir", str(logs / "mpps"),
            "--outbox-dir", str(logs / "outbox"), *options,
        ]  # fmt: skip
        self.log = open(logs / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.mllp_port, self.proc, timeout=900)
        wait_port(self.dicom_port, self.proc, timeout=900)
        settle(self.proc.pid)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def _modality_queries(k: int, items: int) -> list[bytes]:
    """One query per modality thread: its station and a day."""
    days = max(1, items // (50 * len(MODALITIES)))
    out = []
    for i in range(k):
        modality = MODALITIES[i % len(MODALITIES)]
        sps = {
            "ScheduledStationAETitle": f"{modality}1",
            "ScheduledProcedureStepStartDate": day_after(TODAY, (i // len(MODALITIES)) % days),
            "Modality": "",
            "ScheduledProcedureStepStartTime": "",
        }
        out.append(_encode(query(sps, PatientName="", PatientID="", AccessionNumber="")))
    return out


def _query_loop(
    port: int, identifier: bytes, calling: str, deadline: float, result: Result, lock
) -> None:
    while time.time() < deadline:
        started = time.perf_counter()
        try:
            _, status = c_find(port, identifier, AE_FOLDER, calling=calling)
        except (OSError, RuntimeError) as exc:
            with lock:
                result.errors.append(f"{calling}: {exc}")
            continue
        elapsed = (time.perf_counter() - started) * 1000
        with lock:
            if status != 0:
                result.errors.append(f"{calling}: status {status:#06x}")
            result.queries += 1
            result.query_ms.append(elapsed)


def _modality_group(
    port: int, jobs: list[tuple[bytes, str]], start_at: float, deadline: float, out
) -> None:
    """Some of the modalities, one thread each, in a client process of their own: one
    client process for all of them would measure its own GIL more than the server."""
    result = Result("", 0, 0, 0.0)
    lock = threading.Lock()
    time.sleep(max(0.0, start_at - time.time()))  # all groups start together
    threads = [
        threading.Thread(target=_query_loop, args=(port, ident, calling, deadline, result, lock))
        for ident, calling in jobs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((result.queries, result.query_ms, result.errors))


def _sender_loop(bridge: BridgeUnderLoad, rate: float, deadline: float, result: Result, lock):
    """Orders at `rate` on one connection. Each AA's accession goes to the checker, whose
    C-FIND starts after that ACK arrived (read-your-writes) without holding up the sender."""
    run = f"L{int(time.time()) % 100000:05d}"
    interval = 1.0 / rate
    acked: queue.Queue = queue.Queue()
    checker = threading.Thread(target=_check_loop, args=(bridge, acked, result, lock))
    checker.start()
    try:
        with socket.create_connection(("127.0.0.1", bridge.mllp_port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = bytearray()
            n = 0
            next_send = time.monotonic()
            while time.time() < deadline:
                _, accession, message = order_message(run, n)
                n += 1
                started = time.perf_counter()
                sock.sendall(START + message + END)
                ack = _read_ack(sock, buffer)
                elapsed = (time.perf_counter() - started) * 1000
                if b"MSA|AA|" in ack:
                    acked.put(accession)
                with lock:
                    result.orders += 1
                    result.acks_ms.append(elapsed)
                    if b"MSA|AA|" not in ack:
                        result.errors.append(f"order {n}: {ack[:80]!r}")
                next_send += interval
                pause = next_send - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # the sending rate, not a synchronisation
    finally:
        acked.put(None)
        checker.join()


def _check_loop(bridge: BridgeUnderLoad, acked: queue.Queue, result: Result, lock) -> None:
    while (accession := acked.get()) is not None:
        ident = _encode(query({}, AccessionNumber=accession))
        try:
            answers, _ = c_find(bridge.dicom_port, ident, AE_FOLDER, calling="ENGINE")
        except (OSError, RuntimeError) as exc:
            with lock:
                result.errors.append(f"read-your-writes {accession}: {exc}")
            continue
        with lock:
            result.found_after_ack += answers == 1
            if answers != 1:
                result.errors.append(f"{accession}: {answers} answers right after its AA")


def run_once(
    name: str,
    port: int,
    pid: int,
    k: int,
    items: int,
    seconds: float,
    bridge: BridgeUnderLoad | None,
    rate: float,
    processes: int = 4,
) -> Result:
    result = Result(name, items, k, seconds)
    lock = threading.Lock()
    jobs = [(ident, f"MOD{i:03d}") for i, ident in enumerate(_modality_queries(k, items))]
    groups = [jobs[i :: min(processes, k)] for i in range(min(processes, k))]
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    start_at = time.time() + 2.0  # the client processes are up by then
    deadline = start_at + seconds
    clients = [
        spawn.Process(target=_modality_group, args=(port, g, start_at, deadline, out))
        for g in groups
    ]
    for c in clients:
        c.start()
    time.sleep(max(0.0, start_at - time.time()))
    drops_before = listen_drops()
    cpu_before = cpu_seconds(pid)
    sender = None
    if bridge is not None and rate > 0:
        sender = threading.Thread(target=_sender_loop, args=(bridge, rate, deadline, result, lock))
        sender.start()
    for _ in clients:
        queries, query_ms, errors = out.get()
        result.queries += queries
        result.query_ms += query_ms
        result.errors += errors
    for c in clients:
        c.join()
    if sender is not None:
        sender.join()
    # Queries in flight at the deadline still count: divide by the time they took, not D.
    result.seconds = max(seconds, time.time() - start_at)
    result.listen_drops = listen_drops() - drops_before
    result.server_cpu_s = cpu_seconds(pid) - cpu_before
    return result


def _row(s: dict) -> str:
    return (
        f"| {s['server']} | {s['items']} | {s['modalities']} | {s['queries_per_s']} | "
        f"{s['query_p50_ms']} / {s['query_p99_ms']} / {s['query_max_ms']} | "
        f"{s['ack_p50_ms']} / {s['ack_p99_ms']} / {s['ack_max_ms']} | "
        f"{s['found_after_ack']}/{s['orders']} | {s['listen_drops']} | {s['errors']} | "
        f"{s['cpu_ms_per_query']} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--modalities", default="1,5,20,50", help="comma-separated K values")
    parser.add_argument("--rate", type=float, default=50.0, help="orders a second (0: none)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--data", type=Path, default=None, help="folder for the items (kept)")
    parser.add_argument("--servers", default="bridge,wlmscpfs,orthanc")
    parser.add_argument("--clients", type=int, default=4, help="client processes (modalities)")
    parser.add_argument(
        "--bridge-options", default="", help="extra `wlbridge serve` options, space-separated"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.modalities.split(",")]
    servers = args.servers.split(",")
    with tempfile.TemporaryDirectory(prefix="wlbridge-load-") as tmp:
        tmp_path = Path(tmp)
        data = args.data or tmp_path / "items"
        ensure_items(data, args.items)
        rows = []
        print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f} at the start")
        print("| server | items | K | queries/s | query p50 / p99 / max ms | "
              "ACK p50 / p99 / max ms | found after ACK | listen drops | errors | "
              "server CPU ms / query |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in servers:
            bridge = None
            if name == "bridge":
                logs = tmp_path / "bridge"
                logs.mkdir()
                bridge = BridgeUnderLoad(data, logs, args.bridge_options.split())
                proc, port = bridge.proc, bridge.dicom_port
            elif name == "wlmscpfs":
                started = start_wlmscpfs(data)
                if started is None:
                    print("| wlmscpfs | not installed |")
                    continue
                proc, port = started
            elif name == "orthanc":
                (tmp_path / "orthanc").mkdir()
                started = start_orthanc(data, tmp_path / "orthanc")
                if started is None:
                    print("| Orthanc | not installed |")
                    continue
                proc, port = started
            else:
                parser.error(f"unknown server {name!r}")
            try:
                for k in ks:
                    result = run_once(
                        name,
                        port,
                        proc.pid,
                        k,
                        args.items,
                        args.seconds,
                        bridge,
                        args.rate,
                        args.clients,
                    )
                    summary = result.summary()
                    rows.append(summary)
                    print(_row(summary), flush=True)
                    for error in result.errors[:3]:
                        print(f"    e.g. {error}", file=sys.stderr)
            finally:
                if bridge is not None:
                    bridge.stop()
                else:
                    stop(proc)
        for line in verdicts(rows):
            print(line)
        print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


# The checks for the bridge under load (20 modalities, 10,000 items, an HL7 sender).
QUERY_P99_MS = 200.0
ACK_P99_MS = 20.0
PEER_FACTOR = 30.0


def verdicts(rows: list[dict]) -> list[str]:
    """For each K the bridge ran: its queries/s against the faster peer's, and whether each of
    the issue's checks holds (listen drops, query and ACK p99, orders found after their ACK)."""
    out = []
    for row in (r for r in rows if r["server"] == "bridge"):
        k = row["modalities"]
        peers = [
            r["queries_per_s"] for r in rows if r["server"] != "bridge" and r["modalities"] == k
        ]
        checks = [
            ("no listen drops", row["listen_drops"] == 0),
            (f"query p99 < {QUERY_P99_MS:g} ms", row["query_p99_ms"] < QUERY_P99_MS),
            (f"ACK p99 < {ACK_P99_MS:g} ms", row["ack_p99_ms"] < ACK_P99_MS),
            ("every order found after its ACK", row["found_after_ack"] == row["orders"]),
            ("no errors", row["errors"] == 0),
        ]
        ratio = ""
        if peers and max(peers) > 0:
            factor = row["queries_per_s"] / max(peers)
            ratio = f"; {factor:.0f}x the faster peer's queries/s"
            checks.append((f">= {PEER_FACTOR:g}x the faster peer", factor >= PEER_FACTOR))
        marks = ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks)
        out.append(f"K = {k}{ratio}. {marks}")
    return out


if __name__ == "__main__":
    sys.exit(main())
