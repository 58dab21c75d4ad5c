"""The staff toolkit (migration 2): the command index and search text, and retention."""

from __future__ import annotations

from typing import Any

from broker.store.base import StoreBase


class SearchQueries(StoreBase):
    """The command index, search text, retention: part of :class:`broker.store.Store`."""

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
        # SQLite's LIKE ignores ASCII case (and the FTS5 trigram index serves it); PostgreSQL's ILIKE, served by
        # pg_trgm's GIN index, does the same.
        like_op = "LIKE" if self.dialect == "sqlite" else "ILIKE"
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = ('SELECT t.session_id, t."offset", t.kind, t.text, s.user_name, s.device, s.started_at '
               f"FROM search_text t JOIN sessions s ON s.id = t.session_id WHERE t.text {like_op} ? ESCAPE '\\'")
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
