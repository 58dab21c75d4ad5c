"""The store's plumbing: one SQLite connection, its lock, write transactions, queries, the store thread.

Every query area (broker/store/users.py, devices.py, ...) builds on :class:`StoreBase`; the front class
:class:`broker.store.Store` combines them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

from sqlite_utils import Database

from broker.errors import NotFoundError, StorageError
from broker.store.schema import MIGRATIONS

__all__ = ["StoreBase", "dumps", "inserted_id"]

T = TypeVar("T")


_DISK_HINT = "nothing was written; free disk space in the broker home (or fix its permissions) and retry"


def _is_disk_error(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return any(s in text for s in ("disk is full", "disk I/O error", "readonly database"))


def inserted_id(cursor: sqlite3.Cursor) -> int:
    """The row id an INSERT through ``cursor`` gave its row (sqlite3 types lastrowid as optional)."""
    return int(cursor.lastrowid)  # type: ignore[arg-type]  # set by every INSERT


def _row(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    cols = [c[0] for c in cursor.description or ()]
    return [dict(zip(cols, r)) for r in cursor.fetchall()]


def _out_of_range() -> NotFoundError:
    # A safety net behind the edges' own id checks (issue 11 finding 10): OverflowError used to escape as an
    # HTTP 500 or a hung SSH channel.
    return NotFoundError("no such record: a number in the request is out of range",
                         "ids are whole numbers as medbroker printed them")


class StoreBase:
    """The connection and what every query needs: migrations, transactions, reads, writes, :meth:`run`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._executor: ThreadPoolExecutor | None = None
        # One connection, possibly used from two threads of one process (the store thread, and a CLI call or a
        # test in the serving process): a write transaction belongs to the thread that began it. Without this,
        # a second thread's write either joined the first one's open transaction or failed with "cannot
        # start a transaction within a transaction".
        self._lock = threading.RLock()

    def migrate(self) -> int:
        """Apply pending numbered migrations; returns the schema version."""
        conn = self.db.conn
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for number, sql in sorted(MIGRATIONS.items()):
            if number in done:
                continue
            # A migration is one string of ';'-separated statements, or a list of statements
            # (use a list when a statement contains ';', e.g. a trigger body).
            statements = sql if isinstance(sql, list) else sql.split(";")
            with self.transaction():
                # Re-check under the write lock: another process (listen.workers > 1) may have applied it
                # since we read ``done``; running it twice failed with "table ... already exists".
                if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (number,)).fetchone():
                    continue
                for statement in statements:
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, datetime('now'))", (number,)
                )
        return max(MIGRATIONS)

    def schema_version(self) -> int:
        """The highest applied migration, 0 for an empty database."""
        try:
            row = self.db.conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        except sqlite3.OperationalError:
            return 0
        return row[0] or 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE write transaction (serialises writers across processes, and threads of this one)."""
        with self._lock:
            yield from self._transaction()

    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.db.conn
        if conn.in_transaction:
            yield conn
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StorageError(f"database is busy or unwritable: {exc}", "retry in a moment") from exc
        try:
            yield conn
        except BaseException as exc:
            # SQLite may already have rolled back (SQLITE_FULL, IOERR, BUSY): a second ROLLBACK would
            # replace the real error with "cannot rollback - no transaction is active".
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _is_disk_error(exc):
                raise StorageError(f"database write failed: {exc}", _DISK_HINT) from exc
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"database write failed: {exc}", _DISK_HINT) from exc

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        """Run a read query and return rows as dicts.

        :raises NotFoundError: a number beyond SQLite's 64-bit integers (it can name no row)
        """
        try:
            with self._lock:
                return _row(self.db.conn.execute(sql, params))
        except OverflowError:
            raise _out_of_range() from None

    def one(self, sql: str, params: tuple | dict = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        """Run one write statement in its own transaction (or the enclosing one)."""
        try:
            with self.transaction() as conn:
                return conn.execute(sql, params)
        except OverflowError:
            raise _out_of_range() from None

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
        self.db.close()


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON for JSON columns."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
