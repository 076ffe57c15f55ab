"""Two bridges on one PostgreSQL: how soon an order acknowledged by bridge A is answered by
bridge B's C-FIND, and the ingest rate of one MLLP connection, PostgreSQL against the folder.

    python -m bench.pgfollow [--orders 200] [--dsn postgresql://...]

Without --dsn it runs its own PostgreSQL (as the tests do: fsync and synchronous_commit on).
Visibility: after each AA from A, B is asked (one association kept open, C-FIND by accession
number, back to back) until it answers the order; the time from the AA to that answer is
the figure (it includes one C-FIND round trip, ~1-3 ms). Ingest: N orders over one MLLP
connection, each waiting for its ACK, against a bridge on the folder, then on PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # noqa: E402

from bridge.storage.postgres.schema import upgrade  # noqa: E402
from tests.conftest import start_bridge  # noqa: E402
from tests.messages import orm  # noqa: E402


def _frame(message: str) -> bytes:
    return b"\x0b" + message.encode("latin-1") + b"\x1c\r"


def _ack(conn: socket.socket) -> bytes:
    answer = b""
    while not answer.endswith(b"\x1c\r"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the ACK")
        answer += chunk
    return answer


def _percentiles(values: list[float]) -> str:
    values = sorted(values)
    p = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return (
        f"p50 {p(0.5) * 1000:.1f} ms, p90 {p(0.9) * 1000:.1f} ms, p99 {p(0.99) * 1000:.1f} ms, "
        f"max {values[-1] * 1000:.1f} ms (n={len(values)})"
    )


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def visibility(tmp: Path, dsn: str, orders: int) -> list[float]:
    a = start_bridge(tmp / "a", "--store", dsn, worklist_dir=tmp / "a" / "wl")
    b = start_bridge(tmp / "b", "--store", dsn, worklist_dir=tmp / "b" / "wl")
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", b.dicom_port, ae_title=b.ae_title)
    assert assoc.is_established
    delays = []
    try:
        with socket.create_connection(("127.0.0.1", a.mllp_port)) as conn:
            for n in range(orders):
                accession = f"VIS{n}"
                conn.sendall(_frame(orm(control_id=f"V{n}", accession=accession)))
                assert b"MSA|AA" in _ack(conn)
                acked = time.perf_counter()
                query = Dataset()
                query.AccessionNumber = accession
                while True:
                    if not assoc.is_established:  # aborted (a loaded machine): once more
                        assoc = ae.associate("127.0.0.1", b.dicom_port, ae_title=b.ae_title)
                        continue
                    found = [
                        ident
                        for status, ident in assoc.send_c_find(
                            query, ModalityWorklistInformationFind
                        )
                        if status and status.Status in (0xFF00, 0xFF01) and ident is not None
                    ]
                    if found:
                        break
                delays.append(time.perf_counter() - acked)
    finally:
        assoc.release()
        a.stop()
        b.stop()
    return delays


def ingest(tmp: Path, orders: int, *store: str) -> tuple[float, float]:
    """(orders a second over one connection, CPU ms of the bridge an order)."""
    bridge = start_bridge(tmp, *store, worklist_dir=tmp / "wl")
    try:
        cpu_before = _cpu_seconds(bridge.process.pid)
        with socket.create_connection(("127.0.0.1", bridge.mllp_port)) as conn:
            started = time.perf_counter()
            for n in range(orders):
                conn.sendall(_frame(orm(control_id=f"I{n}", accession=f"ING{n}")))
                assert b"MSA|AA" in _ack(conn)
            elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(bridge.process.pid) - cpu_before
    finally:
        bridge.stop()
    return orders / elapsed, cpu / orders * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--dsn", default="")
    args = parser.parse_args()
    server = None
    dsn = args.dsn
    if not dsn:
        from tests.postgres import PostgresServer

        server = PostgresServer()
        server.start()
        dsn = server.dsn
    try:
        upgrade(dsn)
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            load = os.getloadavg()[0]
            delays = visibility(tmp / "vis", dsn, args.orders)
            print(f"AA on A -> answered by B's C-FIND: {_percentiles(delays)}")
            rate, cpu = ingest(tmp / "folder", args.orders)
            print(f"ingest, folder store: {rate:.0f} orders/s, {cpu:.2f} CPU ms/order")
            rate, cpu = ingest(tmp / "pg", args.orders, "--store", dsn)
            print(f"ingest, PostgreSQL:   {rate:.0f} orders/s, {cpu:.2f} CPU ms/order")
            print(f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}")
    finally:
        if server is not None:
            server.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
