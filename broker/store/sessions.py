"""Sessions, their file transfers and forwarded connections, kill requests."""

from __future__ import annotations

from typing import Any

from broker.store.base import StoreBase


class SessionQueries(StoreBase):
    """Sessions, their file transfers and forwarded connections: part of :class:`broker.store.Store`."""

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
        sql = "SELECT * FROM sessions WHERE 1=1"
        params: list[Any] = []
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
        sources = "group_concat(DISTINCT source)" if self.dialect == "sqlite" else "string_agg(DISTINCT source, ',')"
        for start in range(0, len(session_ids), 500):
            chunk = session_ids[start:start + 500]
            marks = ", ".join("?" for _ in chunk)
            for row in self.query(
                    f'SELECT session_id, count(*) AS n, {sources} AS sources, '
                    f'(SELECT command FROM commands c2 WHERE c2.session_id = c.session_id ORDER BY "offset", id '
                    f'LIMIT 1) AS first FROM commands c WHERE session_id IN ({marks}) GROUP BY session_id',
                    tuple(chunk)):
                out[row["session_id"]] = {"commands": row["n"], "sources": row["sources"], "first": row["first"]}
            for row in self.query(f"SELECT session_id, count(*) AS n FROM file_transfers WHERE session_id IN ({marks}) "
                                  "GROUP BY session_id", tuple(chunk)):
                out.setdefault(row["session_id"], {"commands": 0, "sources": None, "first": None})["files"] = row["n"]
        return out

    def sessions_to_stop(self, pid: int, now: str, node_id: str | None = None) -> list[dict[str, Any]]:
        """Live sessions of this broker process that must end: killed, grant revoked, or the people and
        things they were authorised with changed (user disabled or gone, login key removed, role changed,
        device removed). ``user_disabled``/``key_gone``/``role_now``/``device_gone`` say which.

        :param node_id: this process's cluster node: a process id names a process only on its own machine"""
        differs = "IS NOT" if self.dialect == "sqlite" else "IS DISTINCT FROM"
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
            "WHERE s.status = 'live' AND s.broker_pid = ? "
            + ("AND (s.node_id = ? OR s.node_id IS NULL) " if node_id is not None else "") +
            "AND (s.kill_requested_at IS NOT NULL "
            "OR g.revoked_at IS NOT NULL OR u.name IS NULL OR u.disabled != 0 "
            "OR (s.auth_key IS NOT NULL AND k.id IS NULL) "
            f"OR (s.user_role IS NOT NULL AND u.role {differs} s.user_role) OR d.name IS NULL)",
            (pid, node_id) if node_id is not None else (pid,),
        )

    def insert_transfer(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.execute(f"INSERT INTO file_transfers ({cols}) VALUES ({marks})", tuple(row.values()))

    def insert_forward(self, row: dict[str, Any]) -> int:
        """One forwarded connection opened (port forwards, issue 14); returns its row id."""
        return self.insert("forward_connections", row)

    def close_forward(self, row_id: int, **values: Any) -> None:
        """A forwarded connection ended: its byte counts, TLS flag and outcome."""
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE forward_connections SET {sets} WHERE id = ?", (*values.values(), row_id))

    def forwards(self, session_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM forward_connections WHERE session_id = ? ORDER BY id", (session_id,))

    def transfers(self, session_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM file_transfers WHERE session_id = ? ORDER BY id", (session_id,))

    def request_session_kill(self, session_id: str, by: str, reason: str | None, now: str) -> bool:
        """Ask the broker hosting a live session to end it; False when it is not live or already asked."""
        cur = self.execute_ending("UPDATE sessions SET kill_requested_at = ?, kill_requested_by = ?, kill_reason = ? "
                           "WHERE id = ? AND status = 'live' AND kill_requested_at IS NULL",
                           (now, by, reason, session_id))
        return cur.rowcount == 1
