"""Storage benchmark: item writes to the folder store and to PostgreSQL, and how soon another
bridge's change stream sees a PostgreSQL write.

    python -m bench.pgstore [--items 500] [--dsn postgresql://...]

Without --dsn it runs its own PostgreSQL (initdb in a temporary folder, as the tests do; fsync
and synchronous_commit at their defaults, on). Each write is durable before it returns: the
folder store fsyncs the file and the folder, PostgreSQL commits. Items are the same Part 10
bytes for both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread  # noqa: E402

from bench.common import percentile  # noqa: E402
from bridge.config import Settings  # noqa: E402
from bridge.storage.postgres.schema import upgrade  # noqa: E402
from bridge.storage.postgres.worklist import ItemKey, PostgresWorklist  # noqa: E402
from bridge.storage.store import WorklistStore  # noqa: E402


def _item(n: int) -> bytes:
    from tests.storage.test_postgres_store import item_bytes

    return item_bytes(f"BENCH{n}", patient_id=f"P{n % 97}")


def _percentiles(values: list[float]) -> str:
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


def folder_writes(items: list[bytes]) -> list[float]:
    import io

    with tempfile.TemporaryDirectory() as folder:
        store = WorklistStore(Settings(worklist_dir=Path(folder)))
        store.prepare()
        datasets = [dcmread(io.BytesIO(data)) for data in items]
        times = []
        for n, ds in enumerate(datasets):
            started = time.perf_counter()
            store.write(store.path_for(f"acc:BENCH{n}"), ds, f"acc:BENCH{n}")
            times.append(time.perf_counter() - started)
        return times


def postgres_writes(dsn: str, items: list[bytes]) -> tuple[list[float], list[float]]:
    upgrade(dsn)
    writer, reader = PostgresWorklist(dsn), PostgresWorklist(dsn)
    list(reader.scan())
    arrived: dict[str, float] = {}
    cond = threading.Condition()

    def seen(_kind, key, _item) -> None:
        with cond:
            arrived[key.identity] = time.perf_counter()
            cond.notify_all()

    listener = reader.watch(seen)
    listener.connected.wait(30)
    writes, visible = [], []
    for n, data in enumerate(items):
        key = ItemKey("", f"acc:BENCH{n}")
        started = time.perf_counter()
        writer.put(key, data)
        committed = time.perf_counter()
        writes.append(committed - started)
        with cond:
            cond.wait_for(lambda identity=key.identity: identity in arrived, 30)
        visible.append(arrived[key.identity] - committed)
    writer.close()
    reader.close()
    return writes, visible


def parallel_writes(dsn: str, items: list[bytes], writers: int) -> float:
    """Writes per second of `writers` store objects (bridges) writing distinct orders at once."""
    stores = [PostgresWorklist(dsn) for _ in range(writers)]

    def write(k: int) -> None:
        for n in range(k, len(items), writers):
            stores[k].put(ItemKey("", f"acc:PAR{n}"), items[n])

    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for s in stores:
        s.close()
    return len(items) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--dsn", default="")
    args = parser.parse_args()
    items = [_item(n) for n in range(args.items)]
    server = None
    dsn = args.dsn
    if not dsn:
        from tests.postgres import PostgresServer

        server = PostgresServer()
        server.start()
        dsn = server.dsn
    try:
        folder = folder_writes(items)
        pg, visible = postgres_writes(dsn, items)
        two = parallel_writes(dsn, items, 2)
    finally:
        if server is not None:
            server.remove()
    print(f"{args.items} items, each write durable before it returns")
    print(f"folder store write:      {_percentiles(folder)}  ({len(folder) / sum(folder):.0f}/s)")
    print(f"PostgreSQL put (commit): {_percentiles(pg)}  ({len(pg) / sum(pg):.0f}/s)")
    print(f"commit -> other bridge's change callback: {_percentiles(visible)}")
    print(f"PostgreSQL, two writers at once: {two:.0f}/s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
