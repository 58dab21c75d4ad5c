"""The only SQL in medbroker: schema, numbered migrations and queries over SQLite (sqlite-utils).

Every timestamp is UTC ISO-8601 text in an ``*_at`` column. SQL is kept portable where it costs
nothing, so a PostgreSQL store can implement the same methods later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sqlite_utils import Database

from broker.errors import NotFoundError, StorageError

__all__ = ["Store", "MIGRATIONS", "open_store"]

T = TypeVar("T")

# Numbered migrations, applied in order and never edited once landed. Numbers are reserved per
# feature so parallel work does not collide: 2 staff toolkit (search, commands), 3 web console,
# 4 front-door security (MFA, checkpoints), 5 file guard, 7 containment and grant shell modes, 8 session
# lifecycle (issue 11), 15 operations (directory users), 17 ProxyJump.
MIGRATIONS: dict[int, str | list[str]] = {
    # 1: the vertical slice
    1: """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        company TEXT,
        disabled INTEGER NOT NULL DEFAULT 0,
        totp_secret TEXT,
        totp_last_step INTEGER,
        created_at TEXT NOT NULL
    );
    CREATE TABLE user_keys (
        id INTEGER PRIMARY KEY,
        user_name TEXT NOT NULL REFERENCES users(name),
        fingerprint TEXT NOT NULL,
        public_key TEXT NOT NULL,
        added_at TEXT NOT NULL,
        UNIQUE (user_name, fingerprint)
    );
    CREATE TABLE devices (
        name TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        login TEXT NOT NULL,
        auth_kind TEXT NOT NULL,
        credential TEXT NOT NULL,
        host_key TEXT NOT NULL,
        host_key_fingerprint TEXT NOT NULL,
        protected_paths TEXT NOT NULL DEFAULT '[]',
        device_class TEXT NOT NULL DEFAULT 'standard',
        legacy_algorithms TEXT NOT NULL DEFAULT '{}',
        description TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE access_requests (
        id INTEGER PRIMARY KEY,
        user_name TEXT NOT NULL,
        device TEXT NOT NULL,
        duration_s INTEGER NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT,
        forwards TEXT NOT NULL DEFAULT '[]',
        mode TEXT NOT NULL DEFAULT 'normal',
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        decided_at TEXT,
        decided_by TEXT,
        decision_reason TEXT,
        grant_id INTEGER
    );
    CREATE INDEX access_requests_status ON access_requests(status);
    CREATE TABLE approvals (
        id INTEGER PRIMARY KEY,
        request_id INTEGER NOT NULL REFERENCES access_requests(id),
        approver TEXT NOT NULL,
        at TEXT NOT NULL,
        UNIQUE (request_id, approver)
    );
    CREATE TABLE grants (
        id INTEGER PRIMARY KEY,
        request_id INTEGER NOT NULL UNIQUE REFERENCES access_requests(id),
        user_name TEXT NOT NULL,
        device TEXT NOT NULL,
        starts_at TEXT NOT NULL,
        ends_at TEXT NOT NULL,
        approved_by TEXT NOT NULL,
        forwards TEXT NOT NULL DEFAULT '[]',
        mode TEXT NOT NULL DEFAULT 'normal',
        revoked_at TEXT,
        revoked_by TEXT,
        revoke_reason TEXT
    );
    CREATE INDEX grants_user_device ON grants(user_name, device);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user_name TEXT NOT NULL,
        device TEXT NOT NULL,
        grant_id INTEGER NOT NULL,
        source TEXT,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        status TEXT NOT NULL,
        end_reason TEXT,
        recording TEXT NOT NULL,
        final_hash TEXT,
        signature TEXT,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        last_activity_at TEXT,
        kill_requested_at TEXT,
        kill_requested_by TEXT,
        kill_reason TEXT,
        broker_pid INTEGER
    );
    CREATE INDEX sessions_status ON sessions(status);
    CREATE TABLE audit_events (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        actor TEXT,
        user_name TEXT,
        device TEXT,
        session_id TEXT,
        grant_id INTEGER,
        request_id INTEGER,
        source TEXT,
        details TEXT NOT NULL DEFAULT '{}',
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_events_event ON audit_events(event);
    CREATE TABLE audit_checkpoints (
        id INTEGER PRIMARY KEY,
        event_id INTEGER NOT NULL,
        hash TEXT NOT NULL,
        signature TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE auth_failures (
        id INTEGER PRIMARY KEY,
        user_name TEXT NOT NULL,
        source TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX auth_failures_pair ON auth_failures(user_name, source, at);
    CREATE TABLE file_transfers (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        at TEXT NOT NULL,
        path TEXT NOT NULL,
        direction TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT,
        outcome TEXT NOT NULL,
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX file_transfers_session ON file_transfers(session_id);
    """,
    # 2: staff toolkit: command index and full-text search over commands, output and transfer paths
    2: [
        """CREATE TABLE commands (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            "offset" REAL NOT NULL,
            channel INTEGER NOT NULL,
            source TEXT NOT NULL,
            command TEXT NOT NULL
        )""",
        "CREATE INDEX commands_session ON commands(session_id)",
        """CREATE VIRTUAL TABLE search_text USING fts5(
            session_id UNINDEXED, "offset" UNINDEXED, kind UNINDEXED, text, tokenize = 'trigram'
        )""",
        "ALTER TABLE sessions ADD COLUMN indexed_at TEXT",
    ],
    # 3: web console: one-time sign-in links, browser sessions, auditor share links, passwords, state
    3: [
        """CREATE TABLE web_tokens (
            token_hash TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            next_path TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT,
            used_from TEXT
        )""",
        """CREATE TABLE web_sessions (
            id_hash TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            csrf TEXT NOT NULL,
            method TEXT NOT NULL,
            source TEXT,
            user_agent TEXT,
            created_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            ended_at TEXT,
            end_reason TEXT
        )""",
        "CREATE INDEX web_sessions_user ON web_sessions(user_name)",
        """CREATE TABLE web_shares (
            id INTEGER PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL,
            created_by TEXT NOT NULL,
            note TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            revoked_at TEXT,
            revoked_by TEXT
        )""",
        "CREATE INDEX web_shares_session ON web_shares(session_id)",
        """CREATE TABLE web_passwords (
            user_name TEXT PRIMARY KEY,
            hash TEXT NOT NULL,
            set_at TEXT NOT NULL
        )""",
        """CREATE TABLE web_state (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
    ],
    # 6: staff toolkit: when retention removed a recording's payload (metadata, hashes and signatures stay)
    6: ["ALTER TABLE sessions ADD COLUMN payload_removed_at TEXT"],
    # 7: containment (can the device login read the protected paths?), what an exposed device allows,
    # per-approval windows and shell choices, the grant's shell mode, containment in the session record
    7: [
        "ALTER TABLE devices ADD COLUMN containment TEXT NOT NULL DEFAULT 'unknown'",
        "ALTER TABLE devices ADD COLUMN containment_checked_at TEXT",
        "ALTER TABLE devices ADD COLUMN containment_details TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE devices ADD COLUMN exposed_shell TEXT",
        "ALTER TABLE approvals ADD COLUMN duration_s INTEGER",
        "ALTER TABLE approvals ADD COLUMN allow_shell INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE grants ADD COLUMN shell TEXT NOT NULL DEFAULT 'allowed'",
        "ALTER TABLE grants ADD COLUMN containment TEXT",
        # a read-only or upload-only grant means the same on every channel: files only (finding 4)
        "UPDATE grants SET shell = 'files-only' WHERE mode != 'normal'",
        "ALTER TABLE sessions ADD COLUMN containment TEXT",
    ],
    # 8: session lifecycle: the key and role a session was authorised with, so removing the key or changing
    # the role ends it (control loop, any process)
    8: ["ALTER TABLE sessions ADD COLUMN auth_key TEXT", "ALTER TABLE sessions ADD COLUMN user_role TEXT"],
    # 15: operations (issue 15): users mirrored from the directory ('directory'), never changed by hand
    15: ["ALTER TABLE users ADD COLUMN source TEXT NOT NULL DEFAULT 'local'"],
    # 16: approved port forwards (issue 14): ports each approver struck; one row per forwarded connection
    16: [
        "ALTER TABLE approvals ADD COLUMN strikes TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE forward_connections (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            channel INTEGER NOT NULL,
            port INTEGER NOT NULL,
            opened_at TEXT NOT NULL,
            closed_at TEXT,
            bytes_to_device INTEGER NOT NULL DEFAULT 0,
            bytes_to_vendor INTEGER NOT NULL DEFAULT 0,
            tls INTEGER NOT NULL DEFAULT 0,
            outcome TEXT
        )""",
        "CREATE INDEX forward_connections_session ON forward_connections(session_id)",
    ],
    # 17: ProxyJump (issue 14): how the vendor reached the session ('proxyjump' through ssh -J; NULL direct)
    17: ["ALTER TABLE sessions ADD COLUMN via TEXT"],
}


_DISK_HINT = "nothing was written; free disk space in the broker home (or fix its permissions) and retry"


def _is_disk_error(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return any(s in text for s in ("disk is full", "disk I/O error", "readonly database"))


def _row(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    cols = [c[0] for c in cursor.description or ()]
    return [dict(zip(cols, r)) for r in cursor.fetchall()]


def _out_of_range() -> NotFoundError:
    # A safety net behind the edges' own id checks (issue 11 finding 10): OverflowError used to escape as an
    # HTTP 500 or a hung SSH channel.
    return NotFoundError("no such record: a number in the request is out of range",
                         "ids are whole numbers as medbroker printed them")


class Store:
    """Synchronous access to the broker database.

    Async code calls :meth:`run`, which serialises every call on one worker thread.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._executor: ThreadPoolExecutor | None = None
        # One connection, possibly used from two threads of one process (the store thread, and a CLI call or a
        # test in the serving process): a write transaction belongs to the thread that began it. Without this,
        # a second thread's write either joined the first one's open transaction or failed with "cannot
        # start a transaction within a transaction".
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ plumbing
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

    # ------------------------------------------------------------------ users
    def insert_user(self, name: str, role: str, company: str | None, at: str) -> None:
        self.execute(
            "INSERT INTO users (name, role, company, disabled, created_at) VALUES (?, ?, ?, 0, ?)",
            (name, role, company, at),
        )

    def get_user(self, name: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM users WHERE name = ?", (name,))

    def list_users(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM users ORDER BY name")

    def set_user_disabled(self, name: str, disabled: bool) -> None:
        self.execute("UPDATE users SET disabled = ? WHERE name = ?", (int(disabled), name))

    def set_user_source(self, name: str, source: str) -> None:
        self.execute("UPDATE users SET source = ? WHERE name = ?", (source, name))

    def set_user_role(self, name: str, role: str) -> None:
        self.execute("UPDATE users SET role = ? WHERE name = ?", (role, name))

    def set_user_company(self, name: str, company: str | None) -> None:
        self.execute("UPDATE users SET company = ? WHERE name = ?", (company, name))

    def replace_user_keys(self, name: str, keys: list[tuple[str, str]], at: str) -> None:
        """Make ``name``'s keys exactly ``keys`` ((fingerprint, line) pairs), in one transaction."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM user_keys WHERE user_name = ?", (name,))
            conn.executemany("INSERT INTO user_keys (user_name, fingerprint, public_key, added_at) VALUES (?, ?, ?, ?)",
                             [(name, fp, line, at) for fp, line in keys])

    def set_user_totp(self, name: str, secret: str | None) -> None:
        self.execute("UPDATE users SET totp_secret = ?, totp_last_step = NULL WHERE name = ?", (secret, name))

    def claim_totp_step(self, name: str, step: int) -> bool:
        """Record ``step`` as used; False when it (or a later one) was already used (replay)."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE users SET totp_last_step = ? WHERE name = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
                (step, name, step),
            )
            return cur.rowcount == 1

    def add_user_key(self, name: str, fingerprint: str, public_key: str, at: str) -> None:
        self.execute(
            "INSERT OR IGNORE INTO user_keys (user_name, fingerprint, public_key, added_at) VALUES (?, ?, ?, ?)",
            (name, fingerprint, public_key, at),
        )

    def user_keys(self, name: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM user_keys WHERE user_name = ? ORDER BY id", (name,))

    def find_key(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM user_keys WHERE user_name = ? AND fingerprint = ?", (name, fingerprint))

    def delete_user_key(self, name: str, fingerprint: str) -> int:
        return self.execute("DELETE FROM user_keys WHERE user_name = ? AND fingerprint = ?",
                            (name, fingerprint)).rowcount


    # ------------------------------------------------------------------ devices
    def insert_device(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.execute(f"INSERT INTO devices ({cols}) VALUES ({marks})", tuple(row.values()))

    def get_device(self, name: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM devices WHERE name = ?", (name,))

    def list_devices(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM devices ORDER BY name")

    def delete_device(self, name: str) -> int:
        return self.execute("DELETE FROM devices WHERE name = ?", (name,)).rowcount

    def set_device_containment(self, name: str, state: str, checked_at: str, details: str) -> None:
        """Store the result of a containment check (shared by every broker process: the session-start cache)."""
        self.execute("UPDATE devices SET containment = ?, containment_checked_at = ?, containment_details = ? "
                     "WHERE name = ?", (state, checked_at, details, name))

    def update_device(self, name: str, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE devices SET {sets} WHERE name = ?", (*values.values(), name))

    # ------------------------------------------------------------------ requests and grants
    def insert_request(self, row: dict[str, Any]) -> int:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cur = self.execute(f"INSERT INTO access_requests ({cols}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid)

    def get_request(self, request_id: int) -> dict[str, Any] | None:
        return self.one("SELECT * FROM access_requests WHERE id = ?", (request_id,))

    def list_requests(self, *, status: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM access_requests WHERE 1=1", []
        if status:
            sql += " AND status = ?"
            params.append(status)
        if user:
            sql += " AND user_name = ?"
            params.append(user)
        return self.query(sql + " ORDER BY id", tuple(params))

    def expire_requests(self, now: str) -> list[int]:
        """Mark pending requests past their expiry as expired; returns their ids."""
        with self.transaction() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM access_requests WHERE status = 'pending' AND expires_at <= ?", (now,))]
            for rid in ids:
                conn.execute("UPDATE access_requests SET status = 'expired', decided_at = ? WHERE id = ?", (now, rid))
            return ids

    def add_approval(self, request_id: int, approver: str, at: str, duration_s: int | None = None,
                     allow_shell: bool = False, strikes: tuple[int, ...] = ()) -> bool:
        """Record one person's approval (with the window, shell choice and struck forward ports they chose);
        False when they had already approved this request."""
        cur = self.execute("INSERT OR IGNORE INTO approvals (request_id, approver, at, duration_s, allow_shell, "
                           "strikes) VALUES (?, ?, ?, ?, ?, ?)",
                           (request_id, approver, at, duration_s, int(allow_shell), json.dumps(list(strikes))))
        return cur.rowcount == 1

    def approvals(self, request_id: int) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM approvals WHERE request_id = ? ORDER BY id", (request_id,))

    def decide_request(self, request_id: int, status: str, by: str, at: str, reason: str | None,
                       grant: dict[str, Any] | None) -> int | None:
        """Atomically move a pending request to ``status`` (and create its grant); None if not pending."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE access_requests SET status = ?, decided_at = ?, decided_by = ?, decision_reason = ? "
                "WHERE id = ? AND status = 'pending'",
                (status, at, by, reason, request_id),
            )
            if cur.rowcount != 1:
                return None
            if grant is None:
                return 0
            cols = ", ".join(grant)
            marks = ", ".join("?" for _ in grant)
            gid = int(conn.execute(f"INSERT INTO grants ({cols}) VALUES ({marks})", tuple(grant.values())).lastrowid)
            conn.execute("UPDATE access_requests SET grant_id = ? WHERE id = ?", (gid, request_id))
            return gid

    def get_grant(self, grant_id: int) -> dict[str, Any] | None:
        return self.one("SELECT * FROM grants WHERE id = ?", (grant_id,))

    def list_grants(self, *, user: str | None = None) -> list[dict[str, Any]]:
        if user:
            return self.query("SELECT * FROM grants WHERE user_name = ? ORDER BY id", (user,))
        return self.query("SELECT * FROM grants ORDER BY id")

    def active_grants(self, user: str, device: str, now: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM grants WHERE user_name = ? AND device = ? AND revoked_at IS NULL "
            "AND starts_at <= ? AND ends_at > ? ORDER BY ends_at DESC",
            (user, device, now, now),
        )

    def granted_devices(self, user: str) -> list[str]:
        """Devices ``user`` has ever held a grant for that are still registered, by name."""
        return [r["device"] for r in self.query(
            "SELECT DISTINCT g.device FROM grants g JOIN devices d ON d.name = g.device WHERE g.user_name = ? "
            "ORDER BY g.device", (user,))]

    def last_ended_grant(self, user: str, device: str, now: str) -> dict[str, Any] | None:
        """The grant of ``user`` on ``device`` that ended (window over or revoked) most recently, or None."""
        rows = self.query(
            "SELECT *, CASE WHEN revoked_at IS NOT NULL AND revoked_at < ends_at THEN revoked_at ELSE ends_at END "
            "AS ended_at FROM grants WHERE user_name = ? AND device = ? AND (ends_at <= ? OR revoked_at IS NOT NULL) "
            "ORDER BY ended_at DESC, id DESC LIMIT 1", (user, device, now))
        return rows[0] if rows else None

    def revoke_grant(self, grant_id: int, by: str, at: str, reason: str | None) -> bool:
        cur = self.execute(
            "UPDATE grants SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ? AND revoked_at IS NULL",
            (at, by, reason, grant_id),
        )
        return cur.rowcount == 1

    # ------------------------------------------------------------------ sessions
    def insert_session(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.execute(f"INSERT INTO sessions ({cols}) VALUES ({marks})", tuple(row.values()))

    def update_session(self, session_id: str, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE sessions SET {sets} WHERE id = ?", (*values.values(), session_id))

    def rebase_recordings(self, old_dir: str, new_dir: str) -> int:
        """Point recording paths under ``old_dir`` at the same names under ``new_dir`` (a restored home).

        :return: the number of sessions changed
        """
        old = old_dir.rstrip("/") + "/"
        rows = self.query("SELECT id, recording FROM sessions WHERE substr(recording, 1, ?) = ?", (len(old), old))
        with self.transaction() as conn:
            for row in rows:
                conn.execute("UPDATE sessions SET recording = ? WHERE id = ?",
                             (new_dir.rstrip("/") + "/" + row["recording"][len(old):], row["id"]))
        return len(rows)

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM sessions WHERE id = ?", (session_id,))

    def list_sessions(self, *, status: str | None = None, user: str | None = None,
                      device: str | None = None, since: str | None = None, until: str | None = None,
                      newest_first: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM sessions WHERE 1=1", []
        for col, val in (("status", status), ("user_name", user), ("device", device)):
            if val:
                sql += f" AND {col} = ?"
                params.append(val)
        if since:
            sql += " AND started_at >= ?"
            params.append(since)
        if until:
            sql += " AND started_at < ?"
            params.append(until)
        sql += " ORDER BY started_at DESC, id DESC" if newest_first else " ORDER BY started_at"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self.query(sql, tuple(params))

    def session_kinds(self, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Per session: what was run (from the command index: the first command, how many, their sources)
        and how many files moved; sessions not indexed yet are absent."""
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(session_ids), 500):
            chunk = session_ids[start:start + 500]
            marks = ", ".join("?" for _ in chunk)
            for row in self.query(
                    f'SELECT session_id, count(*) AS n, group_concat(DISTINCT source) AS sources, '
                    f'(SELECT command FROM commands c2 WHERE c2.session_id = c.session_id ORDER BY "offset", id '
                    f'LIMIT 1) AS first FROM commands c WHERE session_id IN ({marks}) GROUP BY session_id',
                    tuple(chunk)):
                out[row["session_id"]] = {"commands": row["n"], "sources": row["sources"], "first": row["first"]}
            for row in self.query(f"SELECT session_id, count(*) AS n FROM file_transfers WHERE session_id IN ({marks}) "
                                  "GROUP BY session_id", tuple(chunk)):
                out.setdefault(row["session_id"], {"commands": 0, "sources": None, "first": None})["files"] = row["n"]
        return out

    def sessions_to_stop(self, pid: int, now: str) -> list[dict[str, Any]]:
        """Live sessions of this broker process that must end: killed, grant revoked, or the people and
        things they were authorised with changed (user disabled or gone, login key removed, role changed,
        device removed). ``user_disabled``/``key_gone``/``role_now``/``device_gone`` say which."""
        return self.query(
            "SELECT s.id, s.user_name, s.device, s.user_role, s.auth_key, s.kill_reason, s.kill_requested_by, "
            "s.kill_requested_at, g.revoked_at, g.revoked_by, g.revoke_reason, "
            "(u.name IS NULL OR u.disabled != 0) AS user_disabled, "
            "(s.auth_key IS NOT NULL AND k.id IS NULL) AS key_gone, u.role AS role_now, "
            "(d.name IS NULL) AS device_gone "
            "FROM sessions s JOIN grants g ON g.id = s.grant_id "
            "LEFT JOIN users u ON u.name = s.user_name "
            "LEFT JOIN user_keys k ON k.user_name = s.user_name AND k.fingerprint = s.auth_key "
            "LEFT JOIN devices d ON d.name = s.device "
            "WHERE s.status = 'live' AND s.broker_pid = ? AND (s.kill_requested_at IS NOT NULL "
            "OR g.revoked_at IS NOT NULL OR u.name IS NULL OR u.disabled != 0 "
            "OR (s.auth_key IS NOT NULL AND k.id IS NULL) "
            "OR (s.user_role IS NOT NULL AND u.role IS NOT s.user_role) OR d.name IS NULL)",
            (pid,),
        )

    def insert_transfer(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.execute(f"INSERT INTO file_transfers ({cols}) VALUES ({marks})", tuple(row.values()))

    def insert_forward(self, row: dict[str, Any]) -> int:
        """One forwarded connection opened (port forwards, issue 14); returns its row id."""
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        return int(self.execute(f"INSERT INTO forward_connections ({cols}) VALUES ({marks})",
                                tuple(row.values())).lastrowid)

    def close_forward(self, row_id: int, **values: Any) -> None:
        """A forwarded connection ended: its byte counts, TLS flag and outcome."""
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE forward_connections SET {sets} WHERE id = ?", (*values.values(), row_id))

    def forwards(self, session_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM forward_connections WHERE session_id = ? ORDER BY id", (session_id,))

    def transfers(self, session_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM file_transfers WHERE session_id = ? ORDER BY id", (session_id,))

    # ------------------------------------------------------------------ audit
    def append_audit(self, row: dict[str, Any], chain: Callable[[str, dict[str, Any]], str]) -> dict[str, Any]:
        """Append one audit row atomically: read the last hash, compute this row's hash, insert.

        :param row: the event's columns (without id, prev_hash, hash)
        :param chain: ``chain(prev_hash, row_with_id) -> hash`` (the audit module's hash function)
        """
        with self.transaction() as conn:
            last = conn.execute("SELECT id, hash FROM audit_events ORDER BY id DESC LIMIT 1").fetchone()
            prev_id, prev_hash = (last[0], last[1]) if last else (0, "0" * 64)
            full = {"id": prev_id + 1, **row}
            full["prev_hash"] = prev_hash
            full["hash"] = chain(prev_hash, full)
            cols = ", ".join(full)
            marks = ", ".join("?" for _ in full)
            conn.execute(f"INSERT INTO audit_events ({cols}) VALUES ({marks})", tuple(full.values()))
            return full

    def audit_rows(self, *, after_id: int = 0, limit: int | None = None, event: str | None = None,
                   session_id: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM audit_events WHERE id > ?", [after_id]
        if event:
            sql += " AND (event = ? OR event LIKE ?)"
            params += [event, event + ".%"]
        if session_id:
            sql += " AND session_id = ?"
            params.append(session_id)
        sql += " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.query(sql, tuple(params))

    def insert_checkpoint(self, event_id: int, hash_: str, signature: str, at: str) -> None:
        self.execute(
            "INSERT INTO audit_checkpoints (event_id, hash, signature, at) VALUES (?, ?, ?, ?)",
            (event_id, hash_, signature, at),
        )

    def checkpoints(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM audit_checkpoints ORDER BY id")

    def last_checkpoint(self) -> dict[str, Any] | None:
        """The newest signed audit checkpoint, or None."""
        return self.one("SELECT * FROM audit_checkpoints ORDER BY id DESC LIMIT 1")

    # ------------------------------------------------------------------ lockout
    def add_auth_failure(self, user: str, source: str, at: str) -> None:
        self.execute("INSERT INTO auth_failures (user_name, source, at) VALUES (?, ?, ?)", (user, source, at))

    def count_auth_failures(self, user: str, source: str, since: str) -> int:
        row = self.db.conn.execute(
            "SELECT count(*) FROM auth_failures WHERE user_name = ? AND source = ? AND at > ?", (user, source, since)
        ).fetchone()
        return int(row[0])

    def last_auth_failures(self, user: str, source: str, n: int) -> list[str]:
        rows = self.db.conn.execute(
            "SELECT at FROM auth_failures WHERE user_name = ? AND source = ? ORDER BY at DESC LIMIT ?",
            (user, source, n),
        ).fetchall()
        return [r[0] for r in rows]

    def recent_login_sources(self, since: str) -> list[dict[str, Any]]:
        """Addresses with a successful SSH login at or after ``since``, each with its latest one."""
        return self.query("SELECT source, max(at) AS at FROM audit_events WHERE event = 'auth.success' AND at >= ? "
                          "AND source IS NOT NULL GROUP BY source", (since,))

    def clear_auth_failures(self, user: str, source: str) -> None:
        self.execute("DELETE FROM auth_failures WHERE user_name = ? AND source = ?", (user, source))

    # ------------------------------------------------------------------ staff toolkit (migration 2)
    def save_session_text(self, session_id: str, commands: list[tuple], texts: list[tuple], at: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM commands WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM search_text WHERE session_id = ?", (session_id,))
            conn.executemany('INSERT INTO commands (session_id, "offset", channel, source, command) '
                             "VALUES (?, ?, ?, ?, ?)", [(session_id, *c) for c in commands])
            conn.executemany('INSERT INTO search_text (session_id, "offset", kind, text) VALUES (?, ?, ?, ?)',
                             [(session_id, *t) for t in texts])
            conn.execute("UPDATE sessions SET indexed_at = ? WHERE id = ?", (at, session_id))

    def session_commands(self, session_id: str) -> list[dict[str, Any]]:
        return self.query('SELECT "offset", channel, source, command FROM commands WHERE session_id = ? '
                          'ORDER BY "offset", id', (session_id,))

    def search_sessions(self, text: str, *, device: str | None = None, user: str | None = None,
                        since: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        # Substring match (trigram index for 3+ characters; LIKE for shorter needles).
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = ('SELECT t.session_id, t."offset", t.kind, t.text, s.user_name, s.device, s.started_at '
               "FROM search_text t JOIN sessions s ON s.id = t.session_id WHERE t.text LIKE ? ESCAPE '\\'")
        params: list[Any] = [like]
        for col, val in (("s.device", device), ("s.user_name", user)):
            if val:
                sql += f" AND {col} = ?"
                params.append(val)
        if since:
            sql += " AND s.started_at >= ?"
            params.append(since)
        sql += ' ORDER BY s.started_at, t."offset" LIMIT ?'
        params.append(int(limit))
        return self.query(sql, tuple(params))

    def retention_candidates(self, ended_before: str) -> list[dict[str, Any]]:
        """Sessions that ended before ``ended_before`` and still have their recording payload (oldest first)."""
        return self.query("SELECT * FROM sessions WHERE status != 'live' AND payload_removed_at IS NULL "
                          "AND coalesce(ended_at, started_at) < ? ORDER BY started_at", (ended_before,))

    def mark_payload_removed(self, session_id: str, at: str) -> None:
        """Record that retention removed a session's payload, and drop its indexed output text with it
        (commands and transfer paths stay searchable: they are metadata)."""
        with self.transaction() as conn:
            conn.execute("UPDATE sessions SET payload_removed_at = ? WHERE id = ?", (at, session_id))
            conn.execute("DELETE FROM search_text WHERE session_id = ? AND kind = 'output'", (session_id,))

    # ------------------------------------------------------------------ web console
    def insert_web_token(self, row: dict[str, Any]) -> None:
        self.execute("INSERT INTO web_tokens (token_hash, user_name, next_path, created_at, expires_at) "
                     "VALUES (:token_hash, :user_name, :next_path, :created_at, :expires_at)", row)

    def get_web_token(self, token_hash: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM web_tokens WHERE token_hash = ?", (token_hash,))

    def claim_web_token(self, token_hash: str, now: str, source: str | None) -> dict[str, Any] | None:
        """Mark an unused, unexpired sign-in token used; the row, or None when it cannot be used."""
        with self.transaction() as conn:
            cur = conn.execute("UPDATE web_tokens SET used_at = ?, used_from = ? WHERE token_hash = ? "
                               "AND used_at IS NULL AND expires_at > ?", (now, source, token_hash, now))
            if cur.rowcount != 1:
                return None
            return self.one("SELECT * FROM web_tokens WHERE token_hash = ?", (token_hash,))

    def insert_web_session(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.execute(f"INSERT INTO web_sessions ({cols}) VALUES ({marks})", tuple(row.values()))

    def get_web_session(self, id_hash: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM web_sessions WHERE id_hash = ?", (id_hash,))

    def touch_web_session(self, id_hash: str, now: str) -> None:
        self.execute("UPDATE web_sessions SET last_seen_at = ? WHERE id_hash = ? AND ended_at IS NULL", (now, id_hash))

    def end_web_session(self, id_hash: str, now: str, reason: str) -> bool:
        cur = self.execute("UPDATE web_sessions SET ended_at = ?, end_reason = ? WHERE id_hash = ? "
                           "AND ended_at IS NULL", (now, reason, id_hash))
        return cur.rowcount == 1

    def insert_web_share(self, row: dict[str, Any]) -> int:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        return int(self.execute(f"INSERT INTO web_shares ({cols}) VALUES ({marks})", tuple(row.values())).lastrowid)

    def get_web_share(self, token_hash: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM web_shares WHERE token_hash = ?", (token_hash,))

    def list_web_shares(self, session_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT id, session_id, created_by, note, created_at, expires_at, revoked_at, revoked_by "
                          "FROM web_shares WHERE session_id = ? ORDER BY id", (session_id,))

    def revoke_web_share(self, share_id: int, by: str, now: str) -> bool:
        cur = self.execute("UPDATE web_shares SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
                           (now, by, share_id))
        return cur.rowcount == 1

    def get_web_password(self, user: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM web_passwords WHERE user_name = ?", (user,))

    def set_web_password(self, user: str, hash_: str, now: str) -> None:
        self.execute("INSERT INTO web_passwords (user_name, hash, set_at) VALUES (?, ?, ?) "
                     "ON CONFLICT (user_name) DO UPDATE SET hash = excluded.hash, set_at = excluded.set_at",
                     (user, hash_, now))

    def get_web_state(self, key: str) -> str | None:
        row = self.one("SELECT value FROM web_state WHERE key = ?", (key,))
        return row["value"] if row else None

    def set_web_state(self, key: str, value: str) -> None:
        self.execute("INSERT INTO web_state (key, value) VALUES (?, ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def request_session_kill(self, session_id: str, by: str, reason: str, now: str) -> bool:
        """Ask the broker hosting a live session to end it; False when it is not live or already asked."""
        cur = self.execute("UPDATE sessions SET kill_requested_at = ?, kill_requested_by = ?, kill_reason = ? "
                           "WHERE id = ? AND status = 'live' AND kill_requested_at IS NULL",
                           (now, by, reason, session_id))
        return cur.rowcount == 1

    def decided_requests(self, limit: int = 50) -> list[dict[str, Any]]:
        """Requests that are no longer pending, newest decision first."""
        return self.query("SELECT * FROM access_requests WHERE status != 'pending' "
                          "ORDER BY coalesce(decided_at, created_at) DESC, id DESC LIMIT ?", (int(limit),))

    def last_audit_id(self) -> int:
        row = self.db.conn.execute("SELECT coalesce(max(id), 0) FROM audit_events").fetchone()
        return int(row[0])

    def search_audit(self, *, event: str | None = None, actor: str | None = None, user: str | None = None,
                     device: str | None = None, session_id: str | None = None, since: str | None = None,
                     until: str | None = None, before_id: int | None = None, limit: int = 100
                     ) -> list[dict[str, Any]]:
        """Audit rows matching every given filter, newest first (``event`` also matches its sub-events)."""
        sql, params = "SELECT * FROM audit_events WHERE 1=1", []
        if event:
            sql += " AND (event = ? OR event LIKE ?)"
            params += [event, event.replace("%", "").replace("_", "") + ".%"]
        for col, val in (("actor", actor), ("user_name", user), ("device", device), ("session_id", session_id)):
            if val:
                sql += f" AND {col} = ?"
                params.append(val)
        if since:
            sql += " AND at >= ?"
            params.append(since)
        if until:
            sql += " AND at < ?"
            params.append(until)
        if before_id:
            sql += " AND id < ?"
            params.append(int(before_id))
        return self.query(sql + " ORDER BY id DESC LIMIT ?", (*params, int(limit)))


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


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON for JSON columns."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
