"""The only SQL in medbroker: schema, numbered migrations and queries over SQLite or PostgreSQL.

Every timestamp is UTC ISO-8601 text in an ``*_at`` column. SQL is portable (``?`` placeholders, ``ON CONFLICT``,
``RETURNING``); the few statements that differ are written per engine (``StoreBase.dialect``).

One front, :class:`Store`, over a package split by concern: ``schema.py`` (the numbered migrations),
``backends.py`` (one connection adapter per engine), ``base.py`` (the connection, its lock, transactions,
queries, the store thread), one module of queries per area (``users``, ``devices``, ``grants``, ``sessions``,
``audit``, ``search``, ``web``, ``journal``, ``cluster``, ``archive``) and ``copy.py`` (moving a home's SQLite
database to PostgreSQL).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database

from broker.errors import StorageError
from broker.store.archive import ArchiveQueries
from broker.store.audit import AuditQueries
from broker.store.backends import PostgresConnection, SqliteConnection, is_postgres_url, redact_url
from broker.store.base import dumps
from broker.store.cluster import ClusterQueries
from broker.store.devices import DeviceQueries
from broker.store.grants import GrantQueries
from broker.store.journal import JournalQueries
from broker.store.schema import MIGRATIONS
from broker.store.search import SearchQueries
from broker.store.sessions import SessionQueries
from broker.store.users import UserQueries
from broker.store.web import WebQueries

__all__ = ["Store", "MIGRATIONS", "open_store", "dumps", "is_postgres_url", "redact_url"]


class Store(UserQueries, DeviceQueries, GrantQueries, SessionQueries, AuditQueries, SearchQueries, WebQueries,
            JournalQueries, ClusterQueries, ArchiveQueries):
    """Synchronous access to the broker database.

    Async code calls :meth:`run`, which serialises every call on one worker thread.
    """


def open_store(target: Path | str | None, *, migrate: bool = True) -> Store:
    """Open (and by default migrate) the database; ``None`` gives an in-memory SQLite store for tests.

    :param target: an SQLite file, or a ``postgresql://`` URL (``[store] url``)
    :raises StorageError: when the file cannot be opened or PostgreSQL cannot be reached
    """
    if is_postgres_url(target):
        store = Store(PostgresConnection(str(target)))
    else:
        store = _open_sqlite(target)
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store


def _open_sqlite(path: Path | str | None) -> Store:
    try:
        if path is None:
            conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}", "check the broker home and its permissions") from exc
    return Store(SqliteConnection(conn), Database(conn))
