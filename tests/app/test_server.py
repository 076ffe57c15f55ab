"""The running server: SIGHUP reopens the translation log, allow-lists by network, and what the
start-up line says."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bridge.app.server import AllowedSources
from bridge.net.client import MLLPClient, ack_summary
from tests.conftest import ROOT, RunningBridge, start_bridge
from tests.messages import orm


def wait_for_output(running: RunningBridge, text: str, timeout: float = 30.0) -> str:
    """The first stderr line holding `text`, once the server has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in running.stderr_lines:
            if text in line:
                return line
        assert running.process.poll() is None, "".join(running.stderr_lines)
        time.sleep(0.05)  # the pump thread appends lines; nothing to block on here
    raise AssertionError(f"no {text!r} in:\n" + "".join(running.stderr_lines))


def send(running: RunningBridge, control_id: str, accession: str) -> str:
    message = orm(control_id=control_id, accession=accession).encode()
    with MLLPClient("127.0.0.1", running.mllp_port) as client:
        return ack_summary(client.send(message))[0]


def test_sighup_reopens_the_translation_log_after_a_rename(tmp_path):
    running = start_bridge(tmp_path)
    try:
        assert send(running, "ROT-1", "ACCROT1") == "AA"
        rotated = running.log_path.with_name("translation.log.1")
        os.rename(running.log_path, rotated)
        running.process.send_signal(signal.SIGHUP)
        wait_for_output(running, "reopened the translation log")
        assert running.process.poll() is None  # still serving
        assert send(running, "ROT-2", "ACCROT2") == "AA"
        new_lines = running.log_path.read_text("utf-8")
        old_lines = rotated.read_text("utf-8")
        assert "control_id=ROT-2" in new_lines and "ROT-1" not in new_lines
        assert "control_id=ROT-1" in old_lines and "ROT-2" not in old_lines
        # Only the log: the worklist is served as before.
        assert len(running.wl_files()) == 2
        # A message sent right after the signal already goes to the new file.
        os.rename(running.log_path, running.log_path.with_name("translation.log.2"))
        running.process.send_signal(signal.SIGHUP)
        assert send(running, "ROT-3", "ACCROT3") == "AA"
        assert "control_id=ROT-3" in running.log_path.read_text("utf-8")
    finally:
        assert running.stop() == 0, "".join(running.stderr_lines)


def test_a_network_in_allowed_sources_admits_its_addresses(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('allowed-mllp-sources = ["127.0.0.0/8"]\n')
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        assert send(running, "NET-1", "ACCNET1") == "AA"
    finally:
        assert running.stop() == 0


def test_a_source_outside_the_allowed_networks_is_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('allowed-mllp-sources = ["10.0.0.0/8", "192.0.2.7"]\n')
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        sock = socket.create_connection(("127.0.0.1", running.mllp_port), timeout=30)
        with sock:
            sock.sendall(b"\x0b" + orm(control_id="NET-2").encode() + b"\x1c\r")
            try:
                answer = sock.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed unanswered
        wait_for_output(running, "refused MLLP connection from 127.0.0.1")
    finally:
        assert running.stop() == 0


def test_allowed_sources_hold_addresses_and_networks():
    allowed = AllowedSources(["10.1.2.3", "10.9.0.0/16", "2001:db8::/32"])
    assert "10.1.2.3" in allowed and "10.9.200.1" in allowed
    assert "::ffff:10.1.2.3" in allowed  # IPv4-mapped, as a dual-stack socket reports it
    assert "2001:db8::5" in allowed
    assert "10.1.2.4" not in allowed and "not-an-address" not in allowed
    assert not AllowedSources([])  # empty: any source (the factory checks truthiness)


def test_a_folder_that_exists_is_not_announced_as_created(tmp_path: Path):
    folder = tmp_path / "wl"
    folder.mkdir()
    running = start_bridge(tmp_path, worklist_dir=folder)
    try:
        assert not [line for line in running.stderr_lines if "did not exist" in line]
    finally:
        assert running.stop() == 0


def test_the_systemd_unit_runs_unprivileged_restarts_on_failure_and_names_the_config():
    unit = (ROOT / "samples" / "wlbridge.service").read_text()
    service = dict(
        line.split("=", 1) for line in unit.split("[Service]")[1].split("[Install]")[0].splitlines()
        if "=" in line and not line.startswith("#")
    )  # fmt: skip
    assert service["User"] not in ("", "root")
    assert service["Restart"] == "on-failure"
    assert "serve --config /etc/wlbridge/wlbridge.toml" in service["ExecStart"]
    assert "-HUP" in service["ExecReload"]  # systemctl reload: reopen the translation log


def test_make_run_installs_the_bridge_without_the_test_tools(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    dry = subprocess.run([make, "-n", "run"], cwd=tmp_path, capture_output=True, text=True)
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all("[test]" not in line for line in installs), dry.stdout
    dry = subprocess.run([make, "-n", "test"], cwd=tmp_path, capture_output=True, text=True)
    assert "'.[test]'" in dry.stdout, dry.stdout
