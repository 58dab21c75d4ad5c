"""broker/store/: migrations, schema version, WAL, transactions, atomic decisions, the store worker."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from broker.errors import StorageError
from broker.store import MIGRATIONS, Store, open_store

AT = "2026-01-01T08:00:00.000000Z"


@pytest.fixture
def mem() -> Store:
    s = open_store(None)
    yield s
    s.close()


@pytest.fixture
def store(store_target: Path | str) -> Store:
    """A migrated store on each backend (SQLite file, PostgreSQL database)."""
    s = open_store(store_target)
    yield s
    s.close()


INTEGRITY = (sqlite3.IntegrityError, psycopg.IntegrityError)


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "medbroker.db"


def schema(store: Store) -> list[tuple[str, str]]:
    return [(r["name"], r["sql"]) for r in store.query("SELECT name, sql FROM sqlite_master ORDER BY name")]


def _request_row(**over: object) -> dict:
    row = {"user_name": "alice", "device": "ct-01", "duration_s": 3600, "reason": "tube", "status": "pending",
           "created_at": AT, "expires_at": "2026-01-02T08:00:00.000000Z"}
    row.update(over)
    return row


# ---------------------------------------------------------------- migrations


def test_fresh_store_is_at_the_latest_schema(mem: Store) -> None:
    assert mem.schema_version() == max(MIGRATIONS)
    applied = [r["version"] for r in mem.query("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == sorted(MIGRATIONS)
    tables = {r["name"] for r in mem.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"users", "user_keys", "devices", "access_requests", "approvals", "grants", "sessions", "audit_events",
            "audit_checkpoints", "auth_failures", "file_transfers"} <= tables


SCHEMA_FILE = Path(__file__).parent / "fixtures" / "schema.sql"


def schema_text(store: Store) -> str:
    """The whole schema as SQLite keeps it (every table, index, trigger and virtual table), plus the versions."""
    rows = store.query("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
    virtual = {r["name"] for r in rows if (r["sql"] or "").startswith("CREATE VIRTUAL TABLE")}
    # FTS5's own shadow tables (search_text_data, ...) are SQLite's to shape and differ between its versions.
    rows = [r for r in rows if not (r["type"] == "table" and r["name"].rsplit("_", 1)[0] in virtual)]
    versions = [r["version"] for r in store.query("SELECT version FROM schema_migrations ORDER BY version")]
    out = [f"-- schema_migrations: {versions}"]
    out += [f"-- {r['type']} {r['name']} on {r['tbl_name']}\n{r['sql'] or '(no sql)'};" for r in rows]
    return "\n".join(out) + "\n"


def write_schema() -> None:
    """Rewrite tests/fixtures/schema.sql from a fresh store (after adding a migration on purpose)."""
    s = open_store(None)
    SCHEMA_FILE.write_text(schema_text(s), encoding="utf-8")
    s.close()


def test_a_fresh_store_has_exactly_the_recorded_schema(db_file: Path) -> None:
    """The migrations' effect is pinned: moving or reformatting them (broker/store/schema.py) changes nothing.

    A new migration changes the schema on purpose; then rewrite the file and review its diff:
    python3 -c "import sys; sys.path[:0]=['tests','.']; import test_store; test_store.write_schema()"
    """
    expected = SCHEMA_FILE.read_text(encoding="utf-8")
    mem = open_store(None)
    assert schema_text(mem) == expected
    mem.close()
    on_disk = open_store(db_file)  # a file database (WAL) migrates to the same schema
    assert schema_text(on_disk) == expected
    on_disk.close()


def test_migrations_are_idempotent(db_file: Path) -> None:
    s = open_store(db_file)
    before = schema(s)
    assert s.migrate() == max(MIGRATIONS)
    assert s.migrate() == max(MIGRATIONS)
    assert schema(s) == before
    assert s.one("SELECT count(*) AS n FROM schema_migrations")["n"] == len(MIGRATIONS)
    s.close()
    again = open_store(db_file)  # reopening migrates again: still nothing to do
    assert schema(again) == before and again.schema_version() == max(MIGRATIONS)
    again.close()


def test_schema_version_of_an_empty_database(db_file: Path) -> None:
    s = open_store(db_file, migrate=False)
    assert s.schema_version() == 0
    s.migrate()
    assert s.schema_version() == max(MIGRATIONS)
    s.close()


def test_a_migration_that_another_process_applied_meanwhile_is_skipped(db_file: Path) -> None:
    """Two brokers (listen.workers > 1) start after an upgrade: both see migration N pending, one applies it,
    the other must skip it instead of failing on 'table already exists'."""
    first = open_store(db_file, migrate=False)
    second = open_store(db_file, migrate=False)
    reached_begin, first_done = threading.Event(), threading.Event()

    def pause_before_begin(sql: str) -> None:
        # sqlite3's public trace hook: `second` has read the applied versions and is about to take the write lock.
        if sql.startswith("BEGIN") and not reached_begin.is_set():
            reached_begin.set()
            first_done.wait(10)

    second.db.conn.set_trace_callback(pause_before_begin)
    errors: list[BaseException] = []

    def migrate_second() -> None:
        try:
            second.migrate()
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=migrate_second)
    worker.start()
    try:
        assert reached_begin.wait(10)
        first.migrate()
    finally:
        first_done.set()
        worker.join(20)
    second.db.conn.set_trace_callback(None)
    assert not worker.is_alive()
    assert errors == []
    assert second.schema_version() == max(MIGRATIONS)
    assert second.one("SELECT count(*) AS n FROM schema_migrations")["n"] == len(MIGRATIONS)
    first.close()
    second.close()


# ---------------------------------------------------------------- connection settings


def test_file_databases_use_wal(db_file: Path) -> None:
    s = open_store(db_file)
    assert s.one("PRAGMA journal_mode")["journal_mode"] == "wal"
    assert s.one("PRAGMA foreign_keys")["foreign_keys"] == 1
    s.close()
    raw = sqlite3.connect(db_file)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    raw.close()


def test_memory_store_has_foreign_keys(mem: Store) -> None:
    assert mem.one("PRAGMA foreign_keys")["foreign_keys"] == 1
    with pytest.raises(sqlite3.IntegrityError):
        mem.add_user_key("ghost", "SHA256:x", "ssh-ed25519 AAAA", AT)


@pytest.mark.parametrize("kind", ["directory", "missing-parent", "garbage"])
def test_unopenable_databases_raise_storage_error(tmp_path: Path, kind: str) -> None:
    path = {"directory": tmp_path, "missing-parent": tmp_path / "no" / "such" / "db",
            "garbage": tmp_path / "garbage.db"}[kind]
    if kind == "garbage":
        path.write_bytes(b"this is not an SQLite database, just text " * 100)
    with pytest.raises(StorageError) as info:
        open_store(path)
    assert str(path) in info.value.message
    assert info.value.hint


# ---------------------------------------------------------------- transactions


def test_transaction_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.transaction() as conn:
            conn.execute("INSERT INTO users (name, role, created_at) VALUES ('alice', 'vendor', ?)", (AT,))
            store.insert_user("bob", "vendor", None, AT)  # joins the enclosing transaction
            raise RuntimeError("boom")
    assert store.list_users() == []
    assert not store.conn.in_transaction
    store.insert_user("carol", "vendor", None, AT)  # the connection is usable afterwards
    assert [u["name"] for u in store.list_users()] == ["carol"]


def test_failed_statement_rolls_back_the_whole_transaction(store: Store) -> None:
    store.insert_user("alice", "vendor", None, AT)
    with pytest.raises(INTEGRITY):
        with store.transaction():
            store.insert_user("bob", "vendor", None, AT)
            store.insert_user("alice", "vendor", None, AT)  # duplicate primary key
    assert [u["name"] for u in store.list_users()] == ["alice"]


def test_transaction_commits(db_file: Path) -> None:
    s = open_store(db_file)
    with s.transaction():
        s.insert_user("alice", "vendor", None, AT)
    other = open_store(db_file)
    assert other.get_user("alice")["role"] == "vendor"
    s.close()
    other.close()


def test_busy_database_is_a_storage_error(db_file: Path) -> None:
    holder, waiter = open_store(db_file), open_store(db_file)
    waiter.db.conn.execute("PRAGMA busy_timeout=50")  # a config seam: do not wait the default 10 s
    with holder.transaction():
        with pytest.raises(StorageError) as info:
            waiter.insert_user("alice", "vendor", None, AT)
    assert "busy" in info.value.message and info.value.hint
    assert waiter.get_user("alice") is None
    holder.close()
    waiter.close()


# ---------------------------------------------------------------- atomic decisions


def test_decide_request_happens_once(store: Store) -> None:
    rid = store.insert_request(_request_row())
    grant = {"request_id": rid, "user_name": "alice", "device": "ct-01", "starts_at": AT,
             "ends_at": "2026-01-01T09:00:00.000000Z", "approved_by": "bob"}
    gid = store.decide_request(rid, "approved", "bob", AT, None, grant)
    assert gid and store.get_request(rid)["grant_id"] == gid and store.get_request(rid)["status"] == "approved"
    assert store.decide_request(rid, "denied", "carol", AT, "no", None) is None
    assert store.decide_request(rid, "approved", "carol", AT, None, dict(grant)) is None
    assert store.get_request(rid)["decided_by"] == "bob"
    assert len(store.list_grants()) == 1


def test_expire_requests_only_touches_pending_ones_past_expiry(store: Store) -> None:
    old = store.insert_request(_request_row(expires_at="2026-01-01T07:00:00.000000Z"))
    fresh = store.insert_request(_request_row())
    decided = store.insert_request(_request_row(status="denied", expires_at="2026-01-01T07:00:00.000000Z"))
    assert store.expire_requests(AT) == [old]
    assert store.get_request(old)["status"] == "expired"
    assert store.get_request(fresh)["status"] == "pending"
    assert store.get_request(decided)["status"] == "denied"
    assert store.expire_requests(AT) == []


def test_revoke_grant_once(store: Store) -> None:
    rid = store.insert_request(_request_row())
    gid = store.decide_request(rid, "approved", "bob", AT, None, {
        "request_id": rid, "user_name": "alice", "device": "ct-01", "starts_at": AT,
        "ends_at": "2026-01-01T09:00:00.000000Z", "approved_by": "bob"})
    assert store.active_grants("alice", "ct-01", "2026-01-01T08:30:00.000000Z")
    assert store.revoke_grant(gid, "sec", AT, "done")
    assert not store.revoke_grant(gid, "sec2", AT, "again")
    assert store.get_grant(gid)["revoked_by"] == "sec"
    assert store.active_grants("alice", "ct-01", "2026-01-01T08:30:00.000000Z") == []


def test_audit_rows_are_appended_with_consecutive_ids(store: Store) -> None:
    def chain(prev: str, row: dict) -> str:
        return f"h{row['id']}"

    for i in range(3):
        full = store.append_audit({"at": AT, "event": "broker.started", "details": "{}"}, chain)
        assert full["id"] == i + 1
        assert full["prev_hash"] == ("0" * 64 if i == 0 else f"h{i}")
    assert [r["hash"] for r in store.audit_rows()] == ["h1", "h2", "h3"]
    assert [r["id"] for r in store.audit_rows(after_id=1, limit=1)] == [2]


# ---------------------------------------------------------------- the store worker


def test_run_uses_one_worker_thread_and_close_stops_it(store_target: Path | str) -> None:
    s = open_store(store_target)

    async def main() -> set[str]:
        names = await asyncio.gather(*(s.run(lambda: threading.current_thread().name) for _ in range(20)))
        await s.run(s.insert_user, "alice", "vendor", None, AT)
        return set(names)

    names = asyncio.run(main())
    assert len(names) == 1 and next(iter(names)).startswith("medbroker-store")
    assert s.get_user("alice")
    s.close()
    assert not any(t.name.startswith("medbroker-store") for t in threading.enumerate())


def test_run_propagates_errors(store: Store) -> None:
    async def main() -> None:
        await store.run(store.insert_user, "alice", "vendor", None, AT)
        await store.run(store.insert_user, "alice", "vendor", None, AT)

    with pytest.raises(INTEGRITY):
        asyncio.run(main())
    assert len(store.list_users()) == 1


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 4 MiB tmpfs (root only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            for _ in range(4096):  # bounded: 16 MiB of attempts into a 4 MiB filesystem
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.mark.root
@pytest.mark.parametrize("size", [100, 2_000_000])  # commits in one WAL frame / spills pages mid-transaction
def test_full_disk_is_a_storage_error_and_writes_nothing(tiny_fs: Path, size: int) -> None:
    s = open_store(tiny_fs / "medbroker.db")
    try:
        s.insert_user("alice", "vendor", None, AT)
        filler = _fill(tiny_fs)
        with pytest.raises(StorageError) as info:
            with s.transaction():
                s.insert_user("bob", "vendor", "x" * size, AT)
                s.insert_user("carol", "vendor", "y" * size, AT)
        assert "full" in info.value.message and info.value.hint
        assert not s.db.conn.in_transaction
        assert [u["name"] for u in s.list_users()] == ["alice"]
        filler.unlink()
        s.insert_user("dave", "vendor", None, AT)  # usable again once there is space
        assert [u["name"] for u in s.list_users()] == ["alice", "dave"]
    finally:
        s.close()
