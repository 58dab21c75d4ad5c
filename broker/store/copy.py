"""Copying every table of one store into another (``medbroker migrate``: a home's SQLite file to PostgreSQL).

Rows keep their ids (the audit chain hashes them), identity sequences continue after the highest copied id,
and the whole copy is one transaction on the target: it lands completely or not at all.
"""

from __future__ import annotations

from typing import Any

from broker.errors import ConflictError, StorageError
from broker.store.base import StoreBase

__all__ = ["copy_tables", "table_counts", "NOT_COPIED"]

# Kept by each store itself: its applied migrations (the target is migrated first) and the audit lock row.
NOT_COPIED = frozenset({"schema_migrations", "audit_head"})
_BATCH = 1000


def table_counts(store: StoreBase) -> dict[str, int]:
    """Rows per copied table."""
    return {t: int(store.scalar(f'SELECT count(*) FROM "{t}"'))
            for t in store.conn.tables() if t not in NOT_COPIED}


def copy_tables(source: StoreBase, target: StoreBase, *, overwrite: bool = False) -> dict[str, int]:
    """Copy every row of every table of ``source`` into ``target`` (both at the same schema version).

    :param overwrite: empty a target that already holds rows first (else refuse)
    :returns: rows copied per table
    :raises ConflictError: the target holds rows and ``overwrite`` is false
    :raises StorageError: the schemas differ
    """
    if source.schema_version() != target.schema_version():
        raise StorageError(f"the source is at schema {source.schema_version()}, the target at "
                           f"{target.schema_version()}", "run the same medbroker version on both")
    tables = [t for t in source.conn.tables() if t not in NOT_COPIED]
    missing = sorted(set(tables) - set(target.conn.tables()))
    if missing:
        raise StorageError(f"the target has no table {', '.join(missing)}", "run the same medbroker version on both")
    full = {t: n for t, n in table_counts(target).items() if n}
    if full and not overwrite:
        held = ", ".join(f"{t}: {n}" for t, n in sorted(full.items()))
        raise ConflictError(f"the target already holds data ({held})",
                            "copy into an empty database, or add --overwrite to replace what it holds")
    copied: dict[str, int] = {}
    order = _in_dependency_order(tables)
    table = ""
    try:
        with target.transaction(lock="medbroker.migrate") as out:
            if full:
                if target.dialect == "postgresql":
                    out.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in order) + " RESTART IDENTITY")
                else:
                    for t in reversed(order):
                        out.execute(f'DELETE FROM "{t}"')
            for table in order:
                copied[table] = _copy_table(source, out, table)
                if target.dialect == "postgresql" and copied[table] and _has_identity_id(out, table):
                    out.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                f'(SELECT max(id) FROM "{table}"))')
    except target.conn.errors as exc:
        raise StorageError(f"copying table {table or '?'} failed, nothing was copied: "
                           f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}",
                           "fix the cause named here and run the migration again") from exc
    return copied


def _in_dependency_order(tables: list[str]) -> list[str]:
    # Foreign keys: users before user_keys, access_requests before approvals and grants.
    first = ["users", "devices", "access_requests"]
    return [t for t in first if t in tables] + [t for t in tables if t not in first]


def _has_identity_id(conn: Any, table: str) -> bool:
    return bool(conn.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                             "AND table_name = ? AND column_name = 'id' AND is_identity = 'YES'", (table,)).rows)


def _copy_table(source: StoreBase, out: Any, table: str) -> int:
    n = 0
    with source._lock:
        for cols, rows in source.conn.batches(f'SELECT * FROM "{table}"', _BATCH):
            names = ", ".join(f'"{c}"' for c in cols)
            out.executemany(f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" for _ in cols)})',
                            [tuple(r) for r in rows])
            n += len(rows)
    return n
