"""HL7 ingest benchmark: orders per second and ACK latency of `wlbridge serve`, and of the
Orthanc Team's HL7 worklist server (PyPI `orthanc-tools`) on the same messages.

    python -m bench.ingest [--orders 600] [--no-orthanc] [--json FILE]

Each run starts a fresh server (free ports, temporary folders) and sends N distinct ORM^O01 new
orders, in one of these ways:

- `per-connection`: one message per connection, the client opening one connection after the
  other (`x4`: four such clients at once);
- `long-lived xK`: K connections kept open, each sending its share one message after the other.

Every ACK must be AA for its own control ID. For the bridge, every order must then be found by
a C-FIND, and a few orders are also looked for right after their ACK (visible at once). For the
Orthanc Team's server, which answers AA whatever happened, the .wl files are counted instead.
The orthanc-tools server closes the connection after each message: only `per-connection`
applies to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/ingest.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_seconds, free_port, percentile, wait_port  # noqa: E402
from bridge.net.client import find, worklist_query

START, END = b"\x0b", b"\x1c\x0d"
ROOT = Path(__file__).resolve().parents[1]

FAMILY = ("SMITH", "MÜLLER", "GARCIA", "NGUYEN", "O'BRIEN", "DUBOIS", "ROSSI", "KOWALSKI")
GIVEN = ("JANE", "JOHN", "MARIA", "AHMED", "CHEN", "OLGA", "PIERRE", "FATIMA")
PROCEDURES = (
    ("CT", "CTHEAD", "CT Head w/o contrast"),
    ("CT", "CTCHABD", "CT Chest Abdomen Pelvis with contrast"),
    ("MR", "MRKNEE", "MR Knee left"),
    ("MR", "MRBRAIN", "MR Brain with and without contrast"),
    ("US", "USABD", "US Abdomen complete"),
    ("CR", "CRCHEST", "XR Chest 2 views"),
    ("MG", "MGSCREEN", "Screening mammography bilateral"),
)


# ---- the messages ---------------------------------------------------------------------------


def _segment(name: str, fields: dict[int, str]) -> str:
    return "|".join([name] + [fields.get(i, "") for i in range(1, max(fields) + 1)])


def order_message(run: str, n: int) -> tuple[str, str, bytes]:
    """A realistic ORM^O01 (v2.5.1) new order: (control ID, accession number, message).

    Every field the bridge maps is filled (PID, PV1, ORC, OBR with a timing quantity, ZDS);
    identifiers are distinct per run and order so nothing is a duplicate or an update."""
    rnd = random.Random(f"{run}-{n}")
    modality, code, text = rnd.choice(PROCEDURES)
    family, given = rnd.choice(FAMILY), rnd.choice(GIVEN)
    control, accession = f"{run}{n:06d}", f"{run}A{n:06d}"
    placer, filler = f"{run}P{n:06d}", f"{run}F{n:06d}"
    start = f"2026120{1 + n % 5}{8 + n % 9:02d}{(n * 5) % 60:02d}"
    birth = f"19{rnd.randint(30, 99)}{rnd.randint(1, 12):02d}{rnd.randint(1, 28):02d}"
    segments = [
        "MSH|^~\\&|RIS|HOSP|WLBRIDGE|RAD|20261127101500||ORM^O01^ORM_O01|"
        + f"{control}|P|2.5.1|||AL|NE||UNICODE UTF-8",
        _segment("PID", {
            1: "1", 3: f"{run}PAT{n % 400:05d}^^^HOSP^MR~{rnd.randint(10**8, 10**9)}^^^NHS^NH",
            5: f"{family}^{given}^Q", 7: birth, 8: rnd.choice("FM"),
            11: f"{n} MAIN ST^^SPRINGFIELD^^01101", 13: "555-0100",
        }),
        _segment("PV1", {
            1: "1", 2: "O", 3: f"RAD^ROOM{n % 7}^^HOSP", 8: "1234^WELBY^MARCUS^A^^DR",
            19: f"V{n:07d}",
        }),
        _segment("ORC", {
            1: "NW", 2: f"{placer}^RIS", 3: f"{filler}^PACS", 5: "SC", 7: f"^^^{start}^^R",
            9: "20261127101500", 12: "7101^ESTRADA^JAIME^P^^DR",
        }),
        _segment("OBR", {
            1: "1", 2: f"{placer}^RIS", 3: f"{filler}^PACS", 4: f"{code}^{text}^LOCAL",
            16: "7101^ESTRADA^JAIME^P^^DR", 18: accession, 19: f"RP{run}{n:06d}",
            20: f"SPS{run}{n:06d}", 24: modality, 27: f"^^^{start}^^R",
        }),
        f"ZDS|1.2.826.0.1.3680043.10.543.{zlib.crc32(run.encode())}.{n}^100^Application^DICOM",
    ]  # fmt: skip
    return control, accession, ("\r".join(segments) + "\r").encode("utf-8")


# ---- the client -----------------------------------------------------------------------------


def _read_ack(sock: socket.socket, buffer: bytearray) -> bytes:
    while True:
        end = buffer.find(END)
        if end >= 0:
            ack = bytes(buffer[buffer.find(START) + 1 : end])
            del buffer[: end + len(END)]
            return ack
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed without an ACK")
        buffer += chunk


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _send_all(
    port: int, messages: list[tuple[str, str, bytes]], per_connection: bool, out: list
) -> None:
    """Send `messages` one after the other; append (control ID, ACK, latency) to `out`."""
    sock, buffer = None, bytearray()
    try:
        for control, _, message in messages:
            started = time.perf_counter()
            if per_connection or sock is None:
                sock, buffer = _connect(port), bytearray()
            sock.sendall(START + message + END)
            ack = _read_ack(sock, buffer)
            if per_connection:
                sock.close()
                sock = None
            out.append((control, ack, time.perf_counter() - started))
    finally:
        if sock is not None:
            sock.close()


@dataclass
class Result:
    server: str
    mode: str
    orders: int
    seconds: float
    per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_ms: float  # server CPU time per message
    aa: int
    checked: str
    problems: list[str] = field(default_factory=list)


def run_load(
    server: str, mode: str, port: int, pid: int, messages: list, clients: int, per_connection: bool
) -> Result:
    shares = [messages[i::clients] for i in range(clients)]
    outs: list[list] = [[] for _ in range(clients)]
    errors: list[str] = []

    def worker(i: int) -> None:
        try:
            _send_all(port, shares[i], per_connection, outs[i])
        except Exception as exc:  # reported, and the run marked as failed
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    answers = [a for out in outs for a in out]
    latencies = sorted(latency * 1000 for _, _, latency in answers)
    aa = sum(1 for control, ack, _ in answers if re.search(rb"MSA\|AA\|" + control.encode(), ack))
    problems = list(errors)
    if aa != len(messages):
        problems.append(f"{len(messages) - aa} of {len(messages)} orders without AA")
    return Result(
        server=server,
        mode=mode,
        orders=len(messages),
        seconds=round(seconds, 3),
        per_second=round(len(answers) / seconds, 1),
        p50_ms=round(percentile(latencies, 0.50), 2) if latencies else 0.0,
        p95_ms=round(percentile(latencies, 0.95), 2) if latencies else 0.0,
        p99_ms=round(percentile(latencies, 0.99), 2) if latencies else 0.0,
        max_ms=round(latencies[-1], 2) if latencies else 0.0,
        server_cpu_ms=round(cpu / max(len(answers), 1) * 1000, 2),
        aa=aa,
        checked="",
        problems=problems,
    )


# ---- the servers ----------------------------------------------------------------------------


class BridgeProcess:
    """`wlbridge serve` on free ports with its folders in `root`."""

    AE = "WLBRIDGE"

    def __init__(self, root: Path, profile: Path | None = None) -> None:
        self.root = root
        self.mllp_port, self.dicom_port = free_port(), free_port()
        self.worklists = root / "worklists"
        # cProfile sees the reactor thread, where the HL7 work is; written on SIGINT
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        cmd = [
            sys.executable, *profiler, "-m", "bridge", "serve", "--host", "127.0.0.1",
            "--mllp-port", str(self.mllp_port), "--dicom-port", str(self.dicom_port),
            "--ae-title", self.AE, "--worklist-dir", str(self.worklists),
            "--translation-log", str(root / "translation.log"),
            "--rejected-dir", str(root / "rejected"),
        ]  # fmt: skip
        self.log = open(root / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.mllp_port, self.proc)
        wait_port(self.dicom_port, self.proc)

    def accessions(self) -> set[str]:
        status, answers = find("127.0.0.1", self.dicom_port, worklist_query(), self.AE)
        if status != 0:
            raise RuntimeError(f"C-FIND ended with status {status:#06x}")
        return {str(a.AccessionNumber) for a in answers}

    def found_at_once(self, run: str, count: int) -> int:
        """Send `count` orders on one connection, each looked for by C-FIND right after its AA."""
        found = 0
        with _connect(self.mllp_port) as sock:
            buffer = bytearray()
            for n in range(count):
                _, accession, message = order_message(run, n)
                sock.sendall(START + message + END)
                if b"MSA|AA|" not in _read_ack(sock, buffer):
                    continue
                query = worklist_query(accession=accession)
                status, answers = find("127.0.0.1", self.dicom_port, query, self.AE)
                found += status == 0 and len(answers) == 1
        return found

    def stop(self) -> int:
        self.proc.send_signal(2)  # SIGINT: the bridge finishes the message in hand and exits 0
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code


# The same set-up as its command line (`hl7_worklist_server_for_orthanc`), run as a library
# with logging at WARNING: its command line logs every message at INFO, which is most of its cost.
ORTHANC_TOOLS_LIBRARY = """
import logging, sys, time
from orthanc_tools import MLLPServer, DicomWorklistBuilder, Hl7WorklistParser
from orthanc_tools import Hl7OrmWorklistMsgHandler
logging.basicConfig(level=logging.WARNING)
handler = Hl7OrmWorklistMsgHandler(
    parser=Hl7WorklistParser(), builder=DicomWorklistBuilder(folder=sys.argv[2])
)
handlers = {
    "ORM^O01": (handler.handle_orm_message,),
    "ORM^O01^ORM_O01": (handler.handle_orm_message,),
}
with MLLPServer(host="127.0.0.1", port=int(sys.argv[1]), handlers=handlers):
    while True:
        time.sleep(1)
"""


class OrthancToolsProcess:
    """The orthanc-tools HL7 worklist server writing .wl files into `root`/worklists.

    `library`: run it as a library with WARNING logging instead of its command line (INFO)."""

    MODULE = "orthanc_tools.hl7_worklist_server_for_orthanc"

    def __init__(self, root: Path, python: str, library: bool = False) -> None:
        self.port = free_port()
        self.worklists = root / "worklists"
        self.worklists.mkdir(parents=True)
        self.log = open(root / "server.log", "wb")
        if library:
            cmd = [python, "-c", ORTHANC_TOOLS_LIBRARY, str(self.port), str(self.worklists)]
        else:
            cmd = [python, "-m", self.MODULE, "--port", str(self.port)]
            cmd += ["--folder", str(self.worklists)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)

    def stop(self) -> int:
        self.proc.kill()  # it has no clean shutdown: it sleeps until killed
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code


def orthanc_tools_available(python: str) -> bool:
    check = "import importlib.util as u, sys; sys.exit(u.find_spec('orthanc_tools') is None)"
    return subprocess.run([python, "-c", check]).returncode == 0


# ---- the runs -------------------------------------------------------------------------------

BRIDGE_MODES = (
    ("per-connection", 1, True),
    ("per-connection x4", 4, True),
    ("long-lived x1", 1, False),
    ("long-lived x4", 4, False),
)
ORTHANC_MODES = BRIDGE_MODES[:2]


def bench_bridge(orders: int, workdir: Path, profile: Path | None = None) -> list[Result]:
    results = []
    for i, (mode, clients, per_connection) in enumerate(BRIDGE_MODES):
        if profile is not None and mode != "long-lived x4":
            continue
        run = f"B{i}"
        messages = [order_message(run, n) for n in range(orders)]
        root = workdir / f"bridge-{i}"
        root.mkdir()
        server = BridgeProcess(root, profile)
        try:
            result = run_load(
                "wlbridge", mode, server.mllp_port, server.proc.pid, messages, clients,
                per_connection,
            )  # fmt: skip
            found = server.accessions()
            missing = {a for _, a, _ in messages} - found
            result.checked = f"C-FIND finds {orders - len(missing)}/{orders}"
            if missing:
                result.problems.append(f"{len(missing)} acknowledged orders not found by C-FIND")
            if i == 0:
                at_once = server.found_at_once("V", 20)
                result.checked += f"; {at_once}/20 found right after their ACK"
                if at_once != 20:
                    result.problems.append(f"only {at_once}/20 found right after their ACK")
        finally:
            code = server.stop()
        if code != 0:
            result.problems.append(f"wlbridge exited with {code} on SIGINT")
        results.append(result)
        print(_row(result), flush=True)
    return results


def bench_orthanc_tools(
    orders: int, workdir: Path, python: str, library: bool = False
) -> list[Result]:
    results = []
    for i, (mode, clients, per_connection) in enumerate(ORTHANC_MODES):
        run = f"{'L' if library else 'O'}{i}"
        messages = [order_message(run, n) for n in range(orders)]
        name = "orthanc-tools (library, WARNING)" if library else "orthanc-tools"
        root = workdir / f"orthanc-tools-{'library-' if library else ''}{i}"
        root.mkdir()
        server = OrthancToolsProcess(root, python, library)
        try:
            result = run_load(
                name, mode, server.port, server.proc.pid, messages, clients,
                per_connection,
            )  # fmt: skip
            # it answers before its file is written (its handler thread goes on): wait for them
            deadline = time.monotonic() + 10
            files = len(list(server.worklists.glob("*.wl")))
            while files < orders and time.monotonic() < deadline:
                time.sleep(0.1)
                files = len(list(server.worklists.glob("*.wl")))
            result.checked = f"{files}/{orders} .wl files written"
            if files != orders:
                result.problems.append(f"{orders - files} orders without a .wl file")
        finally:
            server.stop()
        results.append(result)
        print(_row(result), flush=True)
    return results


# ---- the report -----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the numbers were measured on: CPUs, Python, and the disk the folders were on."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tmp = Path(tempfile.gettempdir()).resolve()
    disk = "?"
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        best = max(
            (m for m in mounts if str(tmp).startswith(m[1].rstrip("/") + "/") or m[1] == "/"),
            key=lambda m: len(m[1]),
        )
        device, fs = best[0], best[2]
        name = Path(device).name.rstrip("0123456789")
        rotational = Path(f"/sys/block/{name}/queue/rotational")
        kind = ""
        if rotational.exists():
            kind = ", rotational" if rotational.read_text().strip() == "1" else ", non-rotational"
        disk = f"{device} ({fs}{kind}) mounted on {best[1]}"
    except (OSError, ValueError):
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "disk": disk,
    }


HEADER = (
    "| server | mode | orders | msg/s | p50 ms | p95 ms | p99 ms | max ms | server CPU ms/msg "
    "| checked |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _row(r: Result) -> str:
    checked = r.checked + ("; PROBLEMS: " + "; ".join(r.problems) if r.problems else "")
    return (
        f"| {r.server} | {r.mode} | {r.orders} | {r.per_second:.0f} | {r.p50_ms:.2f} "
        f"| {r.p95_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.2f} | {r.server_cpu_ms:.2f} | {checked} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=600, help="orders per run (default 600)")
    parser.add_argument("--no-orthanc", action="store_true", help="skip the orthanc-tools server")
    parser.add_argument(
        "--orthanc-python",
        default=sys.executable,
        help="the Python with orthanc-tools installed (it pins hl7==0.4.2, which the tests' "
        "python-hl7 0.4.5 conflicts with: a separate venv keeps both); default: this one",
    )
    parser.add_argument(
        "--orthanc-cli",
        action="store_true",
        help="also run orthanc-tools' own command line (it logs every message at INFO); by "
        "default only its library set-up with WARNING logging, the faster of the two, is run",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="only the long-lived x4 run, with the bridge under cProfile writing to FILE "
        "(read it with `python -m pstats FILE`); numbers are slower under the profiler",
    )
    args = parser.parse_args(argv)

    info = machine()
    print(", ".join(f"{k}: {v}" for k, v in info.items()))
    print(HEADER, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="wlbridge-bench-ingest-"))
    try:
        results = bench_bridge(args.orders, workdir, args.profile)
        if not args.no_orthanc and args.profile is None:
            if orthanc_tools_available(args.orthanc_python):
                results += bench_orthanc_tools(args.orders, workdir, args.orthanc_python, True)
                if args.orthanc_cli:
                    results += bench_orthanc_tools(args.orders, workdir, args.orthanc_python)
            else:
                print("orthanc-tools not installed (pip install orthanc-tools): not compared")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "results": [asdict(r) for r in results]}, indent=2)
        )
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
