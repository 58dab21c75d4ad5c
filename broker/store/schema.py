"""The schema: numbered migrations, applied in order by :meth:`broker.store.Store.migrate`."""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

# Numbered migrations, applied in order and never edited once landed. Numbers are reserved per
# feature so parallel work does not collide: 2 staff toolkit (search, commands), 3 web console,
# 4 front-door security (MFA, checkpoints), 5 file guard, 7 containment and grant shell modes, 8 session
# lifecycle (issue 11), 15 operations (directory users), 17 ProxyJump, 18-21 HA (issue 13: 18 PostgreSQL store,
# 19 recording journal, 20 cluster nodes, 21 archive).
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
    # 19: the recording journal (issue 13): each row is exactly the bytes one writer batch appended to the
    # session's .mbr file (seq 0: the header and its hash; otherwise the first frame's sequence number), so the
    # file is the concatenation of its rows in seq order. Rows go once the recording is sealed (and archived).
    19: [
        """CREATE TABLE recording_journal (
            session_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            at TEXT NOT NULL,
            size BIGINT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (session_id, seq)
        )""",
    ],
    # 20: cluster nodes (issue 13 item 4): each `medbroker serve` node, its heartbeat and end (stopped cleanly,
    # or declared dead by a survivor); leases that let exactly one node run a cluster-wide duty or recovery;
    # the node that serves each session
    20: [
        """CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            address TEXT NOT NULL,
            version TEXT NOT NULL,
            started_at TEXT NOT NULL,
            heartbeat_at TEXT NOT NULL,
            stopped_at TEXT,
            dead_at TEXT,
            dead_by TEXT
        )""",
        """CREATE TABLE duty_leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            expires_at TEXT NOT NULL
        )""",
        "ALTER TABLE sessions ADD COLUMN node_id TEXT",
        "CREATE INDEX sessions_node_status ON sessions(node_id, status)",
    ],
    # 21: recordings archived to S3-compatible storage (issue 13): when and with which SHA-256 a session's
    # recording was verified in the object store, when its local copy went; multipart uploads in progress
    # (upload id and the parts already stored) so a pass killed mid-upload resumes instead of starting over
    21: [
        "ALTER TABLE sessions ADD COLUMN archived_at TEXT",
        "ALTER TABLE sessions ADD COLUMN archive_sha256 TEXT",
        "ALTER TABLE sessions ADD COLUMN archive_size BIGINT",
        "ALTER TABLE sessions ADD COLUMN local_removed_at TEXT",
        """CREATE TABLE archive_uploads (
            session_id TEXT PRIMARY KEY,
            object_key TEXT NOT NULL,
            upload_id TEXT NOT NULL,
            size BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            part_size INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 1,
            last_error TEXT
        )""",
        """CREATE TABLE archive_upload_parts (
            upload_id TEXT NOT NULL,
            part_number INTEGER NOT NULL,
            etag TEXT NOT NULL,
            size BIGINT NOT NULL,
            uploaded_at TEXT NOT NULL,
            PRIMARY KEY (upload_id, part_number)
        )""",
    ],
}
