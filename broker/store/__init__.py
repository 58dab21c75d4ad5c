"""The only SQL in medbroker: schema, numbered migrations and queries over SQLite (sqlite-utils).

Every timestamp is UTC ISO-8601 text in an ``*_at`` column. SQL is kept portable where it costs
nothing, so a PostgreSQL store can implement the same methods later.

One front, :class:`Store`, over a package split by concern: ``schema.py`` (the numbered migrations),
``base.py`` (the connection, its lock, transactions, queries, the store thread) and one module of queries
per area (``users``, ``devices``, ``grants``, ``sessions``, ``audit``, ``search``, ``web``, ``journal``,
``cluster``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database

from broker.errors import StorageError
from broker.store.archive import ArchiveQueries
from broker.store.audit import AuditQueries
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

__all__ = ["Store", "MIGRATIONS", "open_store", "dumps"]


class Store(UserQueries, DeviceQueries, GrantQueries, SessionQueries, AuditQueries, SearchQueries, WebQueries,
            JournalQueries, ClusterQueries, ArchiveQueries):
    """Synchronous access to the broker database.

    Async code calls :meth:`run`, which serialises every call on one worker thread.
    """


def open_store(path: Path | str | None, *, migrate: bool = True) -> Store:
    """Open (and by default migrate) the database; ``None`` gives an in-memory store for tests.

    :raises StorageError: when the file cannot be opened
    """
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
    store = Store(Database(conn))
    if migrate:
        store.migrate()
    return store
