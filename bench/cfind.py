"""C-FIND benchmark: the bridge against dcmtk's wlmscpfs and Orthanc's worklist plugin.

    python -m bench.cfind --items 10000 [--reps 7] [--data DIR] [--startup-only]

Generates N items (50 a day for each of 8 stations) into DIR/<AE>/ (kept for later runs),
starts each server on that folder, and times representative queries, one association each,
with the same small client for every server. Also measures the bridge's start-up time (without
and with its cache) and resident memory, in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from bench.common import free_port, wait_port
from bench.worklist_items import MODALITIES, day_after, generate

AE_FOLDER = "WORKLIST"
TODAY = "20240105"
PER_STATION_PER_DAY = 50
MWL_FIND = "1.2.840.10008.5.1.4.31"
IMPLICIT_LE = "1.2.840.10008.1.2"
ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libModalityWorklists.so"


# ---- a minimal DICOM client: one association, one C-FIND, release -----------------------


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(payload)) + payload


def _associate_rq(called: str, calling: str) -> bytes:
    ctx = bytes([1, 0, 0, 0]) + _item(0x30, MWL_FIND.encode()) + _item(0x40, IMPLICIT_LE.encode())
    user = _item(0x51, struct.pack(">I", 0)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1")
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
        + bytes(32) + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, ctx)
        + _item(0x50, user)
    )  # fmt: skip
    return struct.pack(">BxI", 1, len(body)) + body


def _encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = True
    write_dataset(buf, ds)
    return buf.getvalue()


def _command(cancel: bool = False) -> bytes:
    cmd = Dataset()
    if cancel:  # C-CANCEL-RQ for message 1
        cmd.CommandField = 0x0FFF
        cmd.MessageIDBeingRespondedTo = 1
        cmd.CommandDataSetType = 0x0101
    else:  # C-FIND-RQ, message 1
        cmd.AffectedSOPClassUID = MWL_FIND
        cmd.CommandField = 0x0020
        cmd.MessageID = 1
        cmd.Priority = 0
        cmd.CommandDataSetType = 0x0000
    body = _encode(cmd)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body  # (0000,0000) UL group length


def _pdata(data: bytes, command: bool) -> bytes:
    pdv = bytes([1, 0x03 if command else 0x02]) + data
    return struct.pack(">BxI", 4, len(pdv) + 4) + struct.pack(">I", len(pdv)) + pdv


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = _recv_exact(sock, 6)
    kind, length = struct.unpack(">BxI", head)
    return kind, _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def c_find(port: int, query: bytes, called: str, calling: str = "BENCH",
           cancel_after: int | None = None) -> tuple[int, int]:  # fmt: skip
    """Associate, send one C-FIND (and a C-CANCEL once `cancel_after` answers arrived), count
    the pending answers, release. Returns (answers, final status)."""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_associate_rq(called, calling))
        kind, _ = _recv_pdu(sock)
        if kind != 2:
            raise RuntimeError(f"association refused by port {port}")
        sock.sendall(_pdata(_command(), True) + _pdata(query, False))
        answers = 0
        command = b""
        while True:
            kind, body = _recv_pdu(sock)
            if kind != 4:
                raise RuntimeError(f"unexpected PDU {kind}")
            pos = 0
            while pos < len(body):
                (length,) = struct.unpack(">I", body[pos : pos + 4])
                header = body[pos + 5]
                data = body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if not header & 0x01:
                    continue  # identifier fragments: counted through their command
                command += data
                if not header & 0x02:
                    continue
                status = _status(command)
                command = b""
                if status in (0xFF00, 0xFF01):
                    answers += 1
                    if answers == cancel_after:
                        sock.sendall(_pdata(_command(cancel=True), True))
                else:
                    sock.sendall(struct.pack(">BxI", 5, 4) + bytes(4))  # A-RELEASE-RQ
                    _recv_pdu(sock)
                    return answers, status


def _status(command: bytes) -> int:
    """The Status (0000,0900) of a command set (implicit VR little endian). A walk over the
    elements rather than pydicom: at ~30 µs a message, decoding was a measurable part of a
    100-answer query, for every server alike."""
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, pos)
        if (group, element) == (0x0000, 0x0900):
            return struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + length
    raise RuntimeError("response without a status")


# ---- the servers ---------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serve_bridge(root: Path, port: int) -> None:
    """Child process: load the index, serve, print READY with the start-up seconds."""
    started = time.monotonic()
    from bridge.config import Settings
    from bridge.net.cfind import start_dicom_server
    from bridge.storage.index import WorklistIndex

    settings = Settings(worklist_dir=root, worklist_layout="per-ae", host="127.0.0.1",
                        dicom_port=port)  # fmt: skip
    index = WorklistIndex(settings)
    index.load(save_cache=False)  # as `wlbridge serve`: the cache is written once serving
    start_dicom_server(settings, index)
    print(f"READY {time.monotonic() - started:.3f}", flush=True)
    if index.cache_is_stale:
        index.save_cache()
    print("CACHED", flush=True)  # the parent waits for it before stopping a first start
    sys.stdin.read()  # until the parent closes our stdin


def start_bridge(root: Path) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cfind", "--serve", str(root), str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        raise RuntimeError("bridge did not start")
    return proc, port, float(line.split()[1])


def start_wlmscpfs(root: Path) -> tuple[subprocess.Popen, int] | None:
    exe = shutil.which("wlmscpfs")
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "-dfp", str(root), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_port(port, proc, timeout=900)
    return proc, port


def start_orthanc(root: Path, tmp: Path) -> tuple[subprocess.Popen, int] | None:
    if not (os.path.exists(ORTHANC) and os.path.exists(ORTHANC_PLUGIN)):
        return None
    port, http = free_port(), free_port()
    config = {
        "Name": "bench", "DicomAet": AE_FOLDER, "DicomPort": port, "HttpPort": http,
        "StorageDirectory": str(tmp / "storage"), "IndexDirectory": str(tmp / "storage"),
        "RemoteAccessAllowed": False, "Plugins": [ORTHANC_PLUGIN],
        "Worklists": {"Enable": True, "Database": str(root / AE_FOLDER)},
        "DicomAlwaysAllowFindWorklist": True, "DicomCheckCalledAet": False,
    }  # fmt: skip
    (tmp / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([ORTHANC, str(tmp / "orthanc.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_port(port, proc, timeout=900)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.stdin:
        proc.stdin.close()
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the run ---------------------------------------------------------------------------------


def queries(items: int) -> dict[str, bytes]:
    def q(sps: dict, **top: str) -> bytes:
        ds = Dataset()
        for key in ("AccessionNumber", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "StudyInstanceUID", "RequestedProcedureID"):  # fmt: skip
            setattr(ds, key, top.get(key, ""))
        step = Dataset()
        for key in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID"):  # fmt: skip
            setattr(step, key, sps.get(key, ""))
        ds.ScheduledProcedureStepSequence = [step]
        return _encode(ds)

    patient = f"P{(items // 2) // 3:07d}"
    return {
        "station CT1 + today": q({"ScheduledStationAETitle": "CT1",
                                  "ScheduledProcedureStepStartDate": TODAY}),
        "patient ID": q({}, PatientID=patient),
        "MR, 2-day date range": q({"Modality": "MR", "ScheduledProcedureStepStartDate":
                                   f"{TODAY}-{day_after(TODAY, 1)}"}),
    }  # fmt: skip


def _generate_chunk(args: tuple) -> None:
    folder, start, end, days = args
    generate(Path(folder), end, start=start, today=TODAY, days=days)


def ensure_items(root: Path, items: int) -> None:
    folder = root / AE_FOLDER
    marker = root / f".generated-{items}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "lockfile").touch()  # wlmscpfs needs it
    days = max(1, items // (PER_STATION_PER_DAY * len(MODALITIES)))
    step = 2000
    chunks = [(str(folder), s, min(items, s + step), days) for s in range(0, items, step)]
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_generate_chunk, chunks)
    marker.touch()


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--peer-reps", type=int, default=None, help="repetitions for peers")
    parser.add_argument("--data", type=Path, default=None, help="folder for the items (kept)")
    parser.add_argument(
        "--startup-only",
        action="store_true",
        help="measure the bridge's start-up and memory only (no queries, no peers)",
    )
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_bridge(Path(args.serve[0]), int(args.serve[1]))
        return 0

    root = args.data or Path(tempfile.gettempdir()) / f"wlbridge-bench-{args.items}"
    t = time.monotonic()
    ensure_items(root, args.items)
    print(f"{args.items} items in {root} ({time.monotonic() - t:.0f} s to prepare)")
    print(machine())

    (root / ".wlbridge-index.cache").unlink(missing_ok=True)
    proc, _, cold = start_bridge(root)
    proc.stdout.readline()  # CACHED: the cache is written (after READY, as `wlbridge serve` does)
    stop(proc)
    proc, port, warm = start_bridge(root)
    rss = _rss_mb(proc.pid)
    if args.startup_only:
        stop(proc)
        print(f"bridge start-up: {cold:.2f} s without cache, {warm:.2f} s with cache; "
              f"RSS {rss:.0f} MB")  # fmt: skip
        return 0
    servers = {"bridge": (proc, port)}
    tmp = Path(tempfile.mkdtemp(prefix="wlbench-"))
    for name, started in (
        ("wlmscpfs", start_wlmscpfs(root)),
        ("orthanc", start_orthanc(root, tmp)),
    ):
        if started is not None:
            servers[name] = started
    print(f"bridge start-up: {cold:.2f} s without cache, {warm:.2f} s with cache; RSS {rss:.0f} MB")

    rows = []
    try:
        for label, query in queries(args.items).items():
            medians = {}
            counts = {}
            for name, (_p, port) in servers.items():
                reps = args.reps if name == "bridge" else (args.peer_reps or args.reps)
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    counts[name] = c_find(port, query, AE_FOLDER)[0]
                    times.append((time.perf_counter() - t) * 1000)
                medians[name] = statistics.median(times)
            rows.append((label, medians, counts))
    finally:
        for proc, _port in servers.values():
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    names = list(servers)
    print()
    print("| query | answers | " + " | ".join(f"{n} ms" for n in names) + " | speed-up |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for label, medians, counts in rows:
        peers = [medians[n] for n in names if n != "bridge"]
        speedup = f"{min(peers) / medians['bridge']:.0f}x" if peers else "-"
        answers = "/".join(str(counts[n]) for n in names)
        cells = " | ".join(f"{medians[n]:.1f}" for n in names)
        print(f"| {label} | {answers} | {cells} | {speedup} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
