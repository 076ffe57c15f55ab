"""One connection to PostgreSQL, opened on demand and opened again after a failure."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import psycopg

from bridge.storage.store import StoreError

T = TypeVar("T")
CONNECT_TIMEOUT = 5  # seconds: an unreachable database is an AR within a few seconds, not a hang
STATEMENT_TIMEOUT_MS = 30_000  # a lock wait or a query that never ends fails instead
# A bridge that vanished inside a transaction (a crash of its host, a network cut) would hold
# its order's and the change sequence's locks until the server noticed (~2 h of TCP
# keepalive): the server ends such a session after this long idle in a transaction instead.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 20_000  # a lock wait fails (AR) before the statement timeout would
# A database that stops answering (blackholed) fails a call within seconds, not after the
# kernel's ~15 min of retransmissions with the reactor waiting.
TCP_USER_TIMEOUT_MS = 15_000


class StoreUnavailable(StoreError):
    """The database is down, unreachable, or refused the connection, or the connection was
    lost. A change that was under way may have committed all the same (the answer lost):
    `backend_pid` is the server process it went to, so a caller can tell once it is gone."""

    backend_pid: int | None = None


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def redacted(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the PostgreSQL URL (unparsable)"
    host = info.get("host", "localhost")
    port = info.get("port", "5432")
    return f"postgresql://{info.get('user', '')}@{host}:{port}/{info.get('dbname', '')}"


def connect(
    dsn: str, autocommit: bool = False, settings: dict[str, str] | None = None
) -> psycopg.Connection:
    """A new connection (with `settings`: server settings for its session), or
    StoreUnavailable saying why not."""
    options = (
        f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}"
        f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"
    )
    for name, value in (settings or {}).items():
        options += f" -c {name}={value}"
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT,
            options=options,
            application_name="wlbridge",
            # A peer that vanished (a network cut, not a closed socket) is noticed in ~25 s.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            tcp_user_timeout=TCP_USER_TIMEOUT_MS,
        )
    except psycopg.Error as exc:
        raise StoreUnavailable(
            f"store unavailable: cannot connect to {redacted(dsn)}: {_first_line(exc)}"
        ) from exc
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Batch:
    """The open transaction of Database.batched_transaction: `cursor` runs a statement at
    once (after the deferred ones, so it sees them); `defer` queues one to go with the next
    statement sent, at the latest with the COMMIT."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self._deferred: list[tuple[str, Any, Callable[[tuple | None], None] | None]] = []

    @property
    def cursor(self) -> psycopg.Cursor:
        self.send()
        return self.conn.cursor()

    def defer(
        self, sql: str, params: Any = None, then: Callable[[tuple | None], None] | None = None
    ) -> None:
        """Send `sql` later; `then(first row or None)` once it ran."""
        self._deferred.append((sql, params, then))

    def send(self, commit: bool = False) -> None:
        """The deferred statements (and with `commit`, the COMMIT) in one round trip."""
        deferred, self._deferred = self._deferred, []
        if not deferred and not commit:
            return
        with self.conn.pipeline():
            cursors = [self.conn.execute(sql, params) for sql, params, _ in deferred]
            if commit:
                self.conn.execute("COMMIT")
        for cursor, (_sql, _params, then) in zip(cursors, deferred, strict=True):
            if then is not None:
                then(cursor.fetchone() if cursor.description is not None else None)


class Database:
    """A connection shared by one store's callers (one at a time, under a lock).

    `transaction()` gives a cursor inside a transaction that commits when the block ends;
    `fetchall` and `execute` outside one are a single statement (one round trip, the
    connection is in autocommit mode). A lost connection becomes StoreUnavailable and is
    dropped, so the next call connects again: a restarted database needs no new object.
    """

    def __init__(self, dsn: str, settings: dict[str, str] | None = None) -> None:
        self.dsn = dsn
        self.settings = settings  # server settings of the session (synchronous_commit...)
        self._conn: psycopg.Connection | None = None
        self._lock = threading.RLock()
        self._batch: Batch | None = None  # the open batched_transaction's
        self._backend_pid: int | None = None  # the server process of the last connection

    def _unavailable(self, exc: psycopg.Error) -> StoreUnavailable:
        """The error a lost or refused connection becomes (the DSN without its password)."""
        error = StoreUnavailable(f"store unavailable: {redacted(self.dsn)}: {_first_line(exc)}")
        error.backend_pid = self._backend_pid
        return error

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.dsn, autocommit=True, settings=self.settings)
            self._backend_pid = self._conn.info.backend_pid
        return self._conn

    def _begin(self) -> tuple[psycopg.Connection, ExitStack]:
        """A connection with a transaction begun. A kept connection the server dropped since
        (a restart, an idle timeout) fails at BEGIN, before anything was done: then once more
        on a new connection, so the first change after a database restart is not refused."""
        reused = self._conn is not None and not (self._conn.closed or self._conn.broken)
        for last in (not reused, True):
            conn = self._connection()
            stack = ExitStack()
            try:
                stack.enter_context(conn.transaction())
                return conn, stack
            except psycopg.OperationalError as exc:
                self._drop()
                if last:
                    raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor]:
        with self._lock:
            conn, begun = self._begin()
            try:
                with begun, conn.cursor() as cursor:
                    yield cursor
            except psycopg.OperationalError as exc:
                self._drop()
                raise self._unavailable(exc) from exc
            except psycopg.Error as exc:
                if conn.closed or conn.broken:
                    self._drop()
                    raise self._unavailable(exc) from exc
                raise StoreError(f"database error: {_first_line(exc)}") from exc

    @contextmanager
    def batched_transaction(
        self, first: Sequence[tuple[str, Any]] = ()
    ) -> Iterator[tuple[Batch, list[psycopg.Cursor]]]:
        """A transaction whose statements travel together (psycopg's pipeline mode): BEGIN
        and the `first` statements in one round trip (their cursors are yielded, results
        read), and the statements the block `defer`s sent with the COMMIT in one more. The
        COMMIT has succeeded when the block ends without an exception (then each deferred
        statement's `then` got its row). On an exception nothing is committed, except after
        StoreUnavailable: the COMMIT may have gone through with only its answer lost."""
        with self._lock:
            reused = self._conn is not None and not (self._conn.closed or self._conn.broken)
            for last in (not reused, True):
                conn = self._connection()
                try:
                    with conn.pipeline():
                        conn.execute("BEGIN")
                        cursors = [conn.execute(sql, params) for sql, params in first]
                    break
                except psycopg.OperationalError as exc:
                    # a kept connection the server dropped since: nothing was done (as _begin)
                    self._drop()
                    if last:
                        raise self._unavailable(exc) from exc
                except psycopg.Error as exc:
                    self._rollback_or_drop(conn)
                    raise StoreError(f"database error: {_first_line(exc)}") from exc
            batch = self._batch = Batch(conn)
            try:
                yield batch, cursors
                self._batch = None
                batch.send(commit=True)
            except psycopg.OperationalError as exc:
                self._drop()
                raise self._unavailable(exc) from exc
            except psycopg.Error as exc:
                self._rollback_or_drop(conn)
                if self._conn is None:
                    raise self._unavailable(exc) from exc
                raise StoreError(f"database error: {_first_line(exc)}") from exc
            except BaseException:
                self._rollback_or_drop(conn)
                raise
            finally:
                self._batch = None

    def _rollback_or_drop(self, conn: psycopg.Connection) -> None:
        """End a failed or abandoned transaction; a connection that cannot is dropped."""
        if conn.closed or conn.broken:
            self._drop()
            return
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except psycopg.Error:
            self._drop()

    def run(self, work: Callable[[psycopg.Cursor], T]) -> T:
        """`work(cursor)` in one transaction."""
        with self.transaction() as cursor:
            return work(cursor)

    def fetchall(self, sql: str, params: Any = None) -> list[tuple]:
        """The rows of one statement: inside an open transaction() of this thread, part of it;
        else on its own (one round trip)."""
        return self._statement(sql, params, rows=True)

    def execute(self, sql: str, params: Any = None) -> None:
        """One statement, committed on its own (or part of an open transaction())."""
        self._statement(sql, params, rows=False)

    def _statement(self, sql: str, params: Any, rows: bool) -> Any:
        with self._lock:
            conn = self._conn
            if conn is not None and not (conn.closed or conn.broken):
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    # part of this thread's open transaction(), which turns an error into
                    # StoreError / StoreUnavailable and rolls back
                    if self._batch is not None:
                        self._batch.send()  # what it deferred first: this statement sees it
                    cursor = conn.execute(sql, params)
                    return cursor.fetchall() if rows else None
            # A kept connection the server dropped since fails before anything was done:
            # then once more on a new one (as _begin).
            reused = conn is not None and not (conn.closed or conn.broken)
            for last in (not reused, True):
                try:
                    cursor = self._connection().execute(sql, params)
                    return cursor.fetchall() if rows else None
                except psycopg.OperationalError as exc:
                    self._drop()
                    if last:
                        raise self._unavailable(exc) from exc
                except psycopg.Error as exc:
                    if self._conn is None or self._conn.closed or self._conn.broken:
                        self._drop()
                        raise self._unavailable(exc) from exc
                    raise StoreError(f"database error: {_first_line(exc)}") from exc
            raise AssertionError("unreachable")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()
