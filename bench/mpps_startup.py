"""Start-up time of `wlbridge serve` with many MPPS instance files in `mpps-dir`.

    python -m bench.mpps_startup [--instances 10000] [--runs 3] [--tree PATH]

`--tree` names the source tree whose `bridge` package is started (default: this one), so two
versions are measured with the same files. Each run writes the instance files afresh (a
start with a retention removes expired ones), all COMPLETED, with their file times set to the
scenario's age, then starts the bridge (DICOM in-process, an empty worklist) and times it from
the process's start to its "wlbridge serving" line; VmRSS is read at that moment. An empty
`mpps-dir` gives the start-up cost without instances.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from bridge.storage.mpps_instance import encode_instance  # noqa: E402
from tests.peers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DAY = 86400.0
SCENARIOS = (("(empty folder)", 0, 0.0), ("1 day old", None, 1.0), ("45 days old", None, 45.0),
             ("400 days old", None, 400.0))  # fmt: skip


def instance(n: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"BENCH^PATIENT{n}"
    ds.PatientID = f"P{n % 997}"
    step = Dataset()
    step.StudyInstanceUID = f"1.2.826.0.1.3680043.10.543.9.{n}"
    step.AccessionNumber = f"A{n}"
    step.ScheduledProcedureStepID = f"S{n}"
    ds.ScheduledStepAttributesSequence = Sequence([step])
    ds.PerformedProcedureStepID = f"PPS{n}"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedProcedureStepStartDate = "20261201"
    ds.PerformedProcedureStepStartTime = "103500"
    ds.PerformedProcedureStepEndDate = "20261201"
    ds.PerformedProcedureStepEndTime = "110000"
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.Modality = "CT"
    series = Dataset()
    series.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.543.8.{n}"
    series.ReferencedImageSequence = Sequence()
    ds.PerformedSeriesSequence = Sequence([series])
    return ds


def write_instances(folder: Path, count: int, age_days: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    then = time.time() - age_days * DAY
    for n in range(count):
        uid = f"1.2.826.0.1.3680043.10.543.7.{n}"
        path = folder / (hashlib.sha256(uid.encode()).hexdigest()[:32] + ".dcm")
        path.write_bytes(encode_instance(uid, instance(n)))
        os.utime(path, (then, then))


def start_once(tree: Path, folder: Path) -> tuple[float, int, int]:
    """Seconds to ready, VmRSS in kB at ready, instance files left."""
    cmd = [
        sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1",
        "--mllp-port", str(free_port()), "--dicom-port", str(free_port()),
        "--dicom-workers", "0", "--worklist-dir", str(folder / "wl"),
        "--translation-log", str(folder / "translation.log"),
        "--rejected-dir", str(folder / "rejected"), "--mpps-dir", str(folder / "mpps"),
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in process.stdout:
            if "wlbridge serving" in line:
                elapsed = time.perf_counter() - started
                break
        else:
            raise RuntimeError("the bridge exited before it was ready")
        rss = 0
        for status in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if status.startswith("VmRSS:"):
                rss = int(status.split()[1])
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    return elapsed, rss, len(list((folder / "mpps").glob("*.dcm")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=ROOT)
    args = parser.parse_args()
    print(f"tree {args.tree}, {args.instances} instance files, {args.runs} runs")
    print("| instance files | start s (median) | runs | VmRSS MB | files left |")
    print("|---|---|---|---|---|")
    for name, count, age_days in SCENARIOS:
        count = args.instances if count is None else count
        times, rss, left = [], 0, 0
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="wlbridge-mpps-bench-") as temp:
                folder = Path(temp)
                write_instances(folder / "mpps", count, age_days)
                elapsed, rss, left = start_once(args.tree, folder)
                times.append(elapsed)
        shown = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {count:,} {name} | {statistics.median(times):.2f} | {shown} | "
              f"{rss / 1024:.0f} | {left:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
