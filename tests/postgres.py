"""A real PostgreSQL server for the tests: initdb and pg_ctl in a temporary folder, on a free port.

Run as an unprivileged user: as root (CI), the server's files belong to the `postgres` account
that Debian's package creates and its programs run as that account; otherwise as the current user.
A missing PostgreSQL skips the test on a developer's machine and fails it under CI.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import IN_CI, free_port, wait_for_port


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl (the newest installed version), or skip / fail."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if not found:
        initdb = shutil.which("initdb")
        if initdb is None:
            message = "PostgreSQL is not installed (apt-get install postgresql)"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        return Path(initdb).resolve().parent
    return Path(found[-1]).parent


def _version(path: str) -> tuple[int, ...]:
    parts = Path(path).parts
    return tuple(int(p) for p in parts[parts.index("postgresql") + 1].split(".") if p.isdigit())


class PostgresServer:
    """One server in its own temporary data folder; `stop()` and `start()` may be repeated."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="wlbridge-pg-"))
        self.data = self.folder / "data"
        self.user = "wlbridge"
        self._account = None
        if os.geteuid() == 0:
            self._account = pwd.getpwnam("postgres")
            os.chown(self.folder, self._account.pw_uid, self._account.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        cmd = [str(self.bin / program), *args]
        kwargs = {}
        if self._account is not None:
            uid, gid = self._account.pw_uid, self._account.pw_gid

            def demote() -> None:
                os.setgid(gid)
                os.setuid(uid)

            kwargs["preexec_fn"] = demote
        subprocess.run(cmd, check=True, capture_output=True, cwd=self.folder, timeout=120, **kwargs)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w",
            "start",
        )  # fmt: skip
        wait_for_port(self.port, timeout=30)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)


def _running_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres():
    """A running PostgreSQL server, removed after the test."""
    yield from _running_server()


@pytest.fixture(scope="session")
def postgres_session():
    """One server for the tests that never stop it (each gets its own database)."""
    yield from _running_server()


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def postgres_dsn(postgres_session) -> str:
    """The URL of a new, empty database on the session's server."""
    import psycopg

    name = f"test_{next(_databases)}"
    with psycopg.connect(postgres_session.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql://{postgres_session.user}@127.0.0.1:{postgres_session.port}/{name}"
