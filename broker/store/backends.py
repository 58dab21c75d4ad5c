"""One small connection adapter per database engine, so the queries above them are written once.

:class:`SqliteConnection` is today's store (one file in the broker home, ``BEGIN IMMEDIATE`` serialising every
writer); :class:`PostgresConnection` (psycopg 3) is the shared store of several broker nodes. Both take
``?`` placeholders (and ``:name`` with a dict) and give :class:`Result` objects; PostgreSQL's are translated
to psycopg's ``%s`` outside quoted text. What differs between the engines and is not a placeholder lives in
the query modules as explicit per-dialect SQL (``StoreBase.dialect``), never in a clever rewrite.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import sqlite3
import threading
import time
from typing import Any, Iterator, Sequence

from broker.config import redact_url
from broker.errors import StorageError

__all__ = ["Result", "SqliteConnection", "PostgresConnection", "pg_ddl", "redact_url", "is_postgres_url",
           "advisory_key"]

_DISK_HINT = "nothing was written; free disk space in the broker home (or fix its permissions) and retry"
_PG_HINT = "check that PostgreSQL is running and reachable at [store] url, then retry"


class Result:
    """The rows of one statement (fetched at once), its column names and how many rows it changed."""

    __slots__ = ("columns", "rows", "rowcount")

    def __init__(self, columns: list[str], rows: list[tuple], rowcount: int) -> None:
        self.columns, self.rows, self.rowcount = columns, rows, rowcount

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple]:
        return list(self.rows)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.rows)

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r)) for r in self.rows]


def is_postgres_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith(("postgresql://", "postgres://"))


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` from a lock's name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


# ---------------------------------------------------------------- SQLite


def _is_disk_error(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return any(s in text for s in ("disk is full", "disk I/O error", "readonly database"))


class SqliteConnection:
    """Today's store: one sqlite3 connection in autocommit mode; transactions are ``BEGIN IMMEDIATE``."""

    dialect = "sqlite"
    retryable: tuple[type[BaseException], ...] = ()
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.raw = conn

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Result:
        cur = self.raw.execute(sql, params)
        cols = [c[0] for c in cur.description or ()]
        rows = cur.fetchall() if cur.description else []
        return Result(cols, rows, cur.rowcount)

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> None:
        self.raw.executemany(sql, seq)

    def batches(self, sql: str, size: int) -> Iterator[tuple[list[str], list[tuple]]]:
        """The rows of a read in batches of ``size`` (never all of a big table in memory)."""
        cur = self.raw.execute(sql)
        cols = [c[0] for c in cur.description or ()]
        while rows := cur.fetchmany(size):
            yield cols, rows

    def begin(self) -> None:
        try:
            self.raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StorageError(f"database is busy or unwritable: {exc}", "retry in a moment") from exc

    def lock(self, name: str) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already serialises every writer."""

    def set_lock_wait(self, seconds: float) -> None:
        """Wait at most ``seconds`` for another writer's lock before a statement fails."""
        self.raw.execute(f"PRAGMA busy_timeout = {max(1, int(seconds * 1000))}")

    def commit(self) -> None:
        try:
            self.raw.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self.raw.in_transaction:
                self.raw.execute("ROLLBACK")
            raise StorageError(f"database write failed: {exc}", _DISK_HINT) from exc

    def rollback(self, exc: BaseException) -> BaseException | None:
        """Undo the open transaction; a replacement error to raise instead of ``exc``, or None."""
        # SQLite may already have rolled back (SQLITE_FULL, IOERR, BUSY): a second ROLLBACK would
        # replace the real error with "cannot rollback - no transaction is active".
        if self.raw.in_transaction:
            self.raw.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and _is_disk_error(exc):
            return StorageError(f"database write failed: {exc}", _DISK_HINT)
        return None

    def has_table(self, name: str) -> bool:
        return bool(self.raw.execute("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?",
                                     (name,)).fetchone())

    def tables(self) -> list[str]:
        """Ordinary tables (not FTS5's shadow tables), by name."""
        rows = self.raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
        virtual = {n for n, sql in rows if (sql or "").startswith("CREATE VIRTUAL TABLE")}
        return [n for n, _ in rows if n.rsplit("_", 1)[0] not in virtual and not n.startswith("sqlite_")]

    def close(self) -> None:
        self.raw.close()


# ---------------------------------------------------------------- PostgreSQL

_QUOTED = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=2048)
def to_pyformat(sql: str) -> str:
    """``?`` and ``:name`` placeholders as psycopg's ``%s`` / ``%(name)s``, outside quoted text; ``%`` doubled."""
    out = []
    for i, part in enumerate(_QUOTED.split(sql)):
        part = part.replace("%", "%%")
        if i % 2 == 0:
            part = _NAMED.sub(r"%(\1)s", part.replace("?", "%s"))
        out.append(part)
    return "".join(out)


_DDL = [
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
]


def pg_ddl(statement: str) -> str:
    """A migration statement written for SQLite, as PostgreSQL DDL: 64-bit integers, identity keys, doubles,
    byte strings."""
    for pattern, replacement in _DDL:
        statement = pattern.sub(replacement, statement)
    return statement


def _param(value: Any) -> Any:
    # PostgreSQL will not store a boolean in an INTEGER column: the schema's flags are 0/1 as in SQLite.
    return int(value) if isinstance(value, bool) else value


def _params(params: Sequence[Any] | dict[str, Any]) -> Sequence[Any] | dict[str, Any]:
    if isinstance(params, dict):
        return {k: _param(v) for k, v in params.items()}
    return [_param(v) for v in params]


_SESSION_DEFAULTS = (("lock_timeout", "30s"), ("idle_in_transaction_session_timeout", "60s"))


class PostgresConnection:
    """One psycopg 3 connection in autocommit mode; transactions are ``BEGIN`` (READ COMMITTED) plus the explicit
    row and advisory locks each read-then-write decision takes. A broken connection is reopened before the next
    statement outside a transaction."""

    dialect = "postgresql"

    def __init__(self, url: str, *, connect_timeout: int = 10) -> None:
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self.connect_timeout = connect_timeout
        self.retryable = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
        self.errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        self._waits: list[tuple[str, str]] = []  # set_lock_wait's settings, applied again after a reconnect
        # set_lock_wait's bound, kept by this client: a frozen server (SIGSTOP, a hung machine) enforces no
        # timeout of its own, and a statement would wait on its socket for ever
        self._bound: float | None = None
        self._calls = 0  # which statement the armed watchdog belongs to
        self._cut_call = -1  # the statement whose socket the watchdog shut
        self._guard = threading.Lock()
        self.raw = self._connect()

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout,
                                   application_name="medbroker")
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL at {redact_url(self.url)}: {_first_line(exc)}",
                               _PG_HINT) from None
        conn.execute("SET TIME ZONE 'UTC'")
        # Bound every wait: a node that stopped mid-transaction (frozen, not dead) must not hold the audit head
        # or a request's row for ever. Values given in the URL (options=-c lock_timeout=...) win.
        for name, value in _SESSION_DEFAULTS:
            if conn.execute(f"SHOW {name}").fetchone()[0] in ("0", "0ms"):
                conn.execute(f"SET {name} = '{value}'")
        for name, value in getattr(self, "_waits", ()):
            conn.execute(f"SET {name} = '{value}'")
        return conn

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR,
                                                     TransactionStatus.ACTIVE)

    def _ensure(self) -> None:
        if (self.raw.closed or self.raw.broken) and not self.in_transaction:
            self.raw = self._connect()

    @contextlib.contextmanager
    def _bounded(self) -> Iterator[None]:
        """With :meth:`set_lock_wait`'s bound: shut this connection's socket when a call has not returned within
        it, so the waiting call fails at once (the connection is broken; the next statement reconnects)."""
        if self._bound is None:
            yield
            return
        with self._guard:
            self._calls += 1
            call = self._calls
        timer = threading.Timer(self._bound, self._cut, (call,))
        timer.daemon = True
        timer.start()
        try:
            yield
        except self._psycopg.OperationalError as exc:
            if self._cut_call == call:
                raise StorageError(f"PostgreSQL at {redact_url(self.url)} did not answer within {self._bound:g}s "
                                   "(the server is frozen or cut off)", _PG_HINT) from exc
            raise
        finally:
            with self._guard:
                self._calls += 1  # a watchdog that fires now finds another call and leaves the socket alone
            timer.cancel()

    def _cut(self, call: int) -> None:
        with self._guard:
            if self._calls != call:
                return
            self._cut_call = call
            try:
                with socket.socket(fileno=os.dup(self.raw.pgconn.socket)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except Exception:  # noqa: BLE001 - already closed: nothing waits on it
                pass

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Result:
        self._ensure()
        try:
            with self._bounded():
                cur = self.raw.execute(to_pyformat(sql), _params(params)) if params else self.raw.execute(sql)
                cols = [c.name for c in cur.description or ()]
                rows = cur.fetchall() if cur.description else []
        except self._psycopg.OperationalError as exc:
            if not isinstance(exc, self.retryable):
                raise StorageError(f"PostgreSQL at {redact_url(self.url)} failed: {_first_line(exc)}",
                                   _PG_HINT) from exc
            raise
        return Result(cols, rows, cur.rowcount)

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> None:
        if not seq:
            return
        self._ensure()
        with self.raw.cursor() as cur:
            cur.executemany(to_pyformat(sql), [_params(p) for p in seq])

    def batches(self, sql: str, size: int) -> Iterator[tuple[list[str], list[tuple]]]:
        self._ensure()
        with self.raw.cursor() as cur:
            cur.execute(sql)
            cols = [c.name for c in cur.description or ()]
            while rows := cur.fetchmany(size):
                yield cols, rows

    def begin(self) -> None:
        self.execute("BEGIN")

    def lock(self, name: str) -> None:
        """Hold the named advisory lock until this transaction ends (several nodes take turns)."""
        self.execute("SELECT pg_advisory_xact_lock(?)", (advisory_key(name),))

    def set_lock_wait(self, seconds: float) -> None:
        """Let no statement (a lock wait included) or reconnect take more than ``seconds``: a connection whose
        writes must fail in bounded time (the recording journal's)."""
        ms = f"{max(1, int(seconds * 1000))}ms"
        self._waits = [("lock_timeout", ms), ("statement_timeout", ms)]
        self.connect_timeout = max(2, int(seconds))  # libpq takes whole seconds, and treats 1 as 2
        for name, value in self._waits:
            self.execute(f"SET {name} = '{value}'")
        # this client's own bound, a little later than the server's: a live server answers with its error first
        self._bound = seconds + 0.5

    def commit(self) -> None:
        try:
            with self._bounded():
                self.raw.execute("COMMIT")
        except StorageError:
            raise
        except self._psycopg.Error as exc:
            raise StorageError(f"database write failed: {_first_line(exc)}", _PG_HINT) from exc

    def rollback(self, exc: BaseException) -> BaseException | None:
        if not self.raw.closed and not self.raw.broken and self.in_transaction:
            try:
                self.raw.execute("ROLLBACK")
            except self._psycopg.OperationalError:  # the connection is gone: the server rolls back without us
                pass
        if isinstance(exc, self._psycopg.OperationalError) and not isinstance(exc, self.retryable):
            return StorageError(f"database write failed: {_first_line(exc)}", _PG_HINT)
        return None

    def has_table(self, name: str) -> bool:
        return self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).rows[0][0]

    def tables(self) -> list[str]:
        return [r[0] for r in self.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename")]

    def close(self) -> None:
        self.raw.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def backoff(attempt: int) -> None:
    """A short, growing pause before retrying a transaction that lost a race."""
    time.sleep(min(0.005 * 2 ** attempt, 0.2))
