"""The store's plumbing: one connection (SQLite or PostgreSQL), its lock, write transactions, queries, the store
thread.

Every query area (broker/store/users.py, devices.py, ...) builds on :class:`StoreBase`; the front class
:class:`broker.store.Store` combines them. The engine is behind a small adapter (broker/store/backends.py);
``self.dialect`` names it for the few statements written per engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar, Union

from broker.errors import NotFoundError
from broker.store.backends import PostgresConnection, Result, SqliteConnection, backoff, pg_ddl
from broker.store.notify import STOP_CHANNEL
from broker.store.schema import MIGRATIONS, PerDialect

__all__ = ["StoreBase", "dumps", "Connection", "Result"]

T = TypeVar("T")
Connection = Union[SqliteConnection, PostgresConnection]

_RETRIES = 5  # a transaction that lost a serialization race or a deadlock is run again this many times


@contextlib.contextmanager
def _numbers_in_range() -> Iterator[None]:
    """A number beyond 64-bit integers (either engine's error) becomes the NotFoundError it means."""
    try:
        yield
    except OverflowError:
        raise _out_of_range() from None
    except Exception as exc:
        if _is_out_of_range(exc):
            raise _out_of_range() from None
        raise


def _out_of_range() -> NotFoundError:
    # A safety net behind the edges' own id checks (issue 11 finding 10): OverflowError used to escape as an
    # HTTP 500 or a hung SSH channel.
    return NotFoundError("no such record: a number in the request is out of range",
                         "ids are whole numbers as medbroker printed them")


def _statements(dialect: str, sql: Any) -> list[str]:
    # A migration is one string of ';'-separated statements, or a list of statements (use a list when a
    # statement contains ';', e.g. a trigger body); an item may be a PerDialect pair of explicit statements.
    items = sql if isinstance(sql, list) else sql.split(";")
    out: list[str] = []
    for item in items:
        if isinstance(item, PerDialect):
            chosen = getattr(item, dialect)
            out.extend(chosen if isinstance(chosen, list) else [chosen])
        elif item.strip():
            out.append(item if dialect == "sqlite" else pg_ddl(item))
    return out


class StoreBase:
    """The connection and what every query needs: migrations, transactions, reads, writes, :meth:`run`."""

    def __init__(self, conn: Connection, db: Any = None) -> None:
        self.conn = conn
        self.dialect = conn.dialect
        # sqlite_utils' Database over the same sqlite3 connection (SQLite only; None on PostgreSQL): kept for
        # the tests that use sqlite3's own hooks.
        self.db = db
        self._executor: ThreadPoolExecutor | None = None
        # One connection, possibly used from two threads of one process (the store thread, and a CLI call or a
        # test in the serving process): a write transaction belongs to the thread that began it. Without this,
        # a second thread's write either joined the first one's open transaction or failed with "cannot
        # start a transaction within a transaction".
        self._lock = threading.RLock()

    def migrate(self) -> int:
        """Apply pending numbered migrations; returns the schema version.

        Several processes or nodes may start at once: each migration is applied under the write lock (SQLite) or
        the ``medbroker.migrate`` advisory lock (PostgreSQL) after checking again that nobody applied it meanwhile.
        """
        version_type = "INTEGER" if self.dialect == "sqlite" else "BIGINT"
        with self.transaction(lock="medbroker.migrate") as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS schema_migrations (version {version_type} PRIMARY KEY, "
                         "applied_at TEXT)")
        done = {r[0] for r in self.conn.execute("SELECT version FROM schema_migrations")}
        for number, sql in sorted(MIGRATIONS.items()):
            if number in done:
                continue
            with self.transaction(lock="medbroker.migrate") as conn:
                # Re-check under the lock: another process (listen.workers > 1, another node) may have applied it
                # since we read ``done``; running it twice failed with "table ... already exists".
                if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (number,)).fetchone():
                    continue
                for statement in _statements(self.dialect, sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                             (number, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())))
        return max(MIGRATIONS)

    def schema_version(self) -> int:
        """The highest applied migration, 0 for an empty database."""
        with self._lock:
            if not self.conn.has_table("schema_migrations"):
                return 0
            row = self.conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return (row[0] if row else 0) or 0

    @contextlib.contextmanager
    def transaction(self, *, lock: str | None = None) -> Iterator[Connection]:
        """A write transaction that serialises writers across processes and nodes, and threads of this one.

        SQLite: ``BEGIN IMMEDIATE`` (one writer at a time). PostgreSQL: READ COMMITTED, plus the advisory lock
        named ``lock`` when given (a read-then-write decision about one thing, e.g. a user's failed logins);
        a decision about one row takes that row's lock (e.g. :meth:`lock_request`). A nested call joins the
        enclosing transaction (and takes its lock there).
        """
        with self._lock:
            conn = self.conn
            if conn.in_transaction:
                if lock:
                    conn.lock(lock)
                yield conn
                return
            conn.begin()
            try:
                if lock:
                    conn.lock(lock)
                yield conn
            except BaseException as exc:
                replacement = conn.rollback(exc)
                if replacement is not None:
                    raise replacement from exc
                raise
            else:
                conn.commit()

    def atomic(self, fn: Callable[[Connection], T], *, lock: str | None = None) -> T:
        """``fn(conn)`` in one transaction; run again (a bounded number of times) when PostgreSQL aborted it for a
        serialization failure or a deadlock. Inside an enclosing transaction it runs once, as part of it."""
        attempt = 0
        while True:
            with self._lock:
                nested = self.conn.in_transaction
                try:
                    with self.transaction(lock=lock) as conn:
                        return fn(conn)
                except self.conn.retryable:
                    if nested or attempt >= _RETRIES:
                        raise
            backoff(attempt)
            attempt += 1

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        """Run a read query and return rows as dicts.

        :raises NotFoundError: a number beyond 64-bit integers (it can name no row)
        """
        with _numbers_in_range(), self._lock:
            return self.conn.execute(sql, params).dicts()

    def one(self, sql: str, params: tuple | dict = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: tuple | dict = ()) -> Any:
        """The first column of the first row (None when there is no row)."""
        with self._lock:
            row = self.conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def execute(self, sql: str, params: tuple | dict = ()) -> Result:
        """Run one write statement in its own transaction (or the enclosing one)."""
        with _numbers_in_range():
            return self.atomic(lambda conn: conn.execute(sql, params))

    def execute_ending(self, sql: str, params: tuple | dict = ()) -> Result:
        """:meth:`execute` for a write that may end live sessions (a kill, a revoke, a user disabled, a key or
        role changed, a device removed). On PostgreSQL the same transaction also sends ``NOTIFY`` on
        :data:`broker.store.notify.STOP_CHANNEL` when it changed a row, so every node's listener wakes its
        control loop at the commit (broker/store/notify.py); SQLite nodes find the change by their poll."""
        def write(conn: Connection) -> Result:
            result = conn.execute(sql, params)
            if result.rowcount:
                self.notify_ending(conn)
            return result

        with _numbers_in_range():
            return self.atomic(write)

    def notify_ending(self, conn: Connection) -> None:
        """Inside a write transaction that may end live sessions: wake the nodes at its commit (PostgreSQL)."""
        if self.dialect == "postgresql":
            conn.execute(f"NOTIFY {STOP_CHANNEL}")

    def insert(self, table: str, row: dict[str, Any]) -> int:
        """Insert ``row`` into ``table`` (columns are code, never input) and return its new ``id``."""
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        result = self.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks}) RETURNING id", tuple(row.values()))
        return int(result.rows[0][0])

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the single store worker thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medbroker-store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

    def close(self) -> None:
        """Stop the worker and close the connection."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.conn.close()


def _is_out_of_range(exc: Exception) -> bool:
    # psycopg refuses a Python int beyond bigint before sending it ("int too large to convert"), PostgreSQL a
    # numeric compared with a bigint column does not fail but matches nothing; both name no row.
    return type(exc).__name__ in ("DataError", "NumericValueOutOfRange") and "out of range" in str(exc)


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON for JSON columns."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
