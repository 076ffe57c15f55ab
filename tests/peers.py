"""Real peers for the tests: dcmtk's findscu and wlmscpfs, free ports, waiting for listeners.

A missing peer skips the test on a developer's machine and fails it under CI (CI=true): the
interoperability tests are the point, so they must never vanish silently there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() == "true"
# Public sample messages (dcm4che's test data) are not part of the repository: they are read
# from WLBRIDGE_PUBLIC_SAMPLES, else from ../shared/samples/public beside the project.
SHARED_SAMPLES = Path(
    os.environ.get("WLBRIDGE_PUBLIC_SAMPLES")
    or Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "public"
)


def require_tool(name: str) -> str:
    """Path of an external program, or skip (fail under CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install dcmtk)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_public_samples() -> Path:
    """The public dcm4che samples folder beside the project, or skip where it is absent."""
    folder = SHARED_SAMPLES / "dcm4che"
    if not folder.is_dir():
        if IN_CI:
            pytest.fail(f"public samples missing at {folder}")
        pytest.skip(f"public samples not found at {folder}")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(
    check: Callable[[], T],
    what: str | Callable[[], str] = "the condition",
    timeout: float = 60.0,
) -> T:
    """Poll `check` (another process's state, files, log lines: nothing announces them) until
    it returns something true, and return that; AssertionError after `timeout` seconds
    (generous: the machine is shared). `what` may be a function, called on failure, that
    describes what was still wrong."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what() if callable(what) else what}")
        time.sleep(0.05)


def wait_for_port(
    port: int, timeout: float = 15.0, process: subprocess.Popen | None = None
) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a port that is not yet bound: no event to wait on
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def findscu(
    port: int,
    keys: list[str],
    called_aet: str = "WLBRIDGE",
    calling_aet: str = "FINDSCU",
    extra: list[str] | None = None,
    out_dir: Path | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:
    """Run `findscu -W` (worklist model) with `-k` keys; with out_dir, answers are written there
    as rsp*.dcm files (`-X`)."""
    exe = require_tool("findscu")
    cmd = [exe, "-W", "-aet", calling_aet, "-aec", called_aet]
    for key in keys:
        cmd += ["-k", key]
    if out_dir is not None:
        cmd += ["-X", "-od", str(out_dir)]
    cmd += list(extra or []) + ["127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def findscu_answers(
    port: int, keys: list[str], out_dir: Path, called_aet: str = "WLBRIDGE", **options
) -> list:
    """The answers `findscu` (dcmtk) gets for `keys`, read from the files it writes into
    `out_dir` (made here); a findscu that fails fails the test."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = findscu(port, keys, called_aet=called_aet, out_dir=out_dir, **options)
    assert result.returncode == 0, result.stderr
    return read_answers(out_dir)


def read_answers(out_dir: Path) -> list:
    """The datasets that `findscu -X` wrote, in the order received."""
    import pydicom

    files = sorted(out_dir.glob("rsp*.dcm"))
    return [pydicom.dcmread(f) for f in files]


@contextmanager
def wlmscpfs(data_files_path: Path, port: int | None = None) -> Iterator[int]:
    """Run dcmtk's wlmscpfs on `data_files_path` (which holds one folder per called AE title,
    each with a `lockfile`); yields its port."""
    exe = require_tool("wlmscpfs")
    port = port or free_port()
    with serving([exe, "-dfp", str(data_files_path), str(port)], port):
        yield port


@contextmanager
def serving(cmd: list[str], port: int) -> Iterator[subprocess.Popen]:
    """Run a server process for the duration of the block, once it accepts on `port`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dump2dcm(dump: Path, out: Path) -> Path:
    """Convert a dcmtk dump file (plain or .gz) to a DICOM file with dcmtk's dump2dcm."""
    import gzip

    exe = require_tool("dump2dcm")
    if dump.suffix == ".gz":
        plain = out.with_suffix(".dump")
        plain.write_bytes(gzip.decompress(dump.read_bytes()))
        dump = plain
    subprocess.run([exe, "-q", str(dump), str(out)], check=True, capture_output=True, timeout=30)
    return out


def findscu_file(port: int, query_file: Path, called_aet: str = "WLBRIDGE",
                 calling_aet: str = "FINDSCU", out_dir: Path | None = None,
                 timeout: float = 30.0) -> subprocess.CompletedProcess:  # fmt: skip
    """Run `findscu -W` with a query file (as dcmtk's example queries are used)."""
    exe = require_tool("findscu")
    cmd = [exe, "-W", "-aet", calling_aet, "-aec", called_aet]
    if out_dir is not None:
        cmd += ["-X", "-od", str(out_dir)]
    cmd += ["127.0.0.1", str(port), str(query_file)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@contextmanager
def orthanc_worklists(folder: Path, work: Path) -> Iterator[int]:
    """Orthanc with its worklist plugin serving `folder`; yields its DICOM port."""
    exe = require_tool("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
    if not plugin.exists():
        require_tool("libModalityWorklists.so")  # skips, or fails under CI
    port = free_port()
    config = {
        "Name": "wlbridge-test", "DicomAet": "ORTHANC", "DicomPort": port,
        "HttpPort": free_port(), "HttpServerEnabled": True, "RemoteAccessAllowed": False,
        "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "storage"),
        "Plugins": [str(plugin)], "DicomAlwaysAllowFindWorklist": True,
        "Worklists": {"Enable": True, "Database": str(folder)},
    }  # fmt: skip
    (work / "orthanc.json").write_text(json.dumps(config))
    with serving([exe, str(work / "orthanc.json")], port):
        yield port
