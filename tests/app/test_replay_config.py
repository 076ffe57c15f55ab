"""`wlbridge replay --config FILE`: the shared table's kept messages replayed with the store,
the MLLP address and TLS of the bridge's config (the command line still wins); a config that
cannot be used is one sentence naming the setting, exit 2. Real bridges on a real PostgreSQL,
MLLP over TLS with certificates made for the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.http.test_rejected_postgres import dsn, refused_by, start, stop  # noqa: F401
from tests.http_helpers import start_http_bridge
from tests.net.test_tls import make_pki
from tests.postgres import postgres_dsn, postgres_session  # noqa: F401 (fixtures)


def replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "replay", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_replay_takes_the_store_address_and_tls_from_the_config(tmp_path: Path, dsn: str):  # noqa: F811
    pki = make_pki(_folder(tmp_path / "pki"))
    refuser = start(tmp_path, "refuser", dsn, only_production=True)
    tls = _folder(tmp_path / "tls")
    b = start_http_bridge(
        tls, "--store", dsn,
        "--mllp-tls-cert", str(pki.server_cert), "--mllp-tls-key", str(pki.server_key),
    )  # fmt: skip
    config = tmp_path / "wlbridge.toml"
    config.write_text(
        f'store = "{dsn}"\nhost = "127.0.0.1"\nmllp-port = {b.bridge.mllp_port}\n'
        f'mllp-tls-cert = "{pki.server_cert}"\nmllp-tls-key = "{pki.server_key}"\n'
    )
    try:
        refused_by(refuser, "CFG-1", "ACC-CFG1")
        listing = replay("--config", str(config))
        assert listing.returncode == 0, listing.stderr
        (line,) = listing.stdout.splitlines()
        name = line.split()[0]
        assert "CFG-1" in line
        done = replay("--config", str(config), name)  # over TLS, to the config's port
        assert done.returncode == 0 and f"{name}: AA CFG-1" in done.stdout, done
        logged = [r for r in b.bridge.log_records() if r.get("control_id") == "CFG-1"]
        assert [r["ack"] for r in logged] == ["AA"]
        assert replay("--config", str(config)).stdout == ""  # replayed: no longer listed
        # the command line wins: a port where nothing listens
        elsewhere = replay("--config", str(config), "--port", "1", name)
        assert elsewhere.returncode == 2 and "127.0.0.1:1: " in elsewhere.stderr, elsewhere
        # a folder's file name is not one of the table's: said, not looked up
        folder_name = "20261201T101500123456-CFG-1-0a1b2c3d"
        wrong = replay("--config", str(config), folder_name)
        assert wrong.returncode == 1 and "a rejected folder's file" in wrong.stdout, wrong
    finally:
        stop(refuser, b)


def test_a_config_that_cannot_be_used_is_one_sentence_naming_the_setting(tmp_path: Path):
    folders = tmp_path / "no-store.toml"
    folders.write_text('worklist-dir = "wl"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("store = \n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('stor = "postgresql://x@127.0.0.1:1/x"\n')
    for config, expected in (
        (folders, f"{folders}: store must be a postgresql://"),
        (tmp_path / "missing.toml", "no such config file"),
        (broken, "not valid TOML"),
        (unknown, "unknown setting 'stor'"),
    ):
        result = replay("--config", str(config))
        assert result.returncode == 2, result
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and result.stdout == "", result.stderr
    down = tmp_path / "down.toml"
    down.write_text('store = "postgresql://x@127.0.0.1:1/x"\n')
    unreachable = replay("--config", str(down))
    assert unreachable.returncode == 2 and "store unavailable" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
