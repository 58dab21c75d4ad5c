"""The staff toolkit (migration 2): the command index and search text, and retention."""

from __future__ import annotations

import json
from typing import Any

from broker.store.base import StoreBase


def _rows(rows: list[tuple], width: int) -> list[tuple]:
    """The rows checked for width, with NUL in their text as U+FFFD: PostgreSQL's text cannot hold a NUL (a session
    whose output had a stray one failed to index there) and SQLite's JSON functions would cut the text at it; a
    NUL is nothing anyone searches for, and undecodable bytes are U+FFFD in the index already."""
    out = []
    for row in rows:
        if len(row) != width:
            raise ValueError(f"an index row has {len(row)} fields, not {width}: {row[:width + 1]!r}")
        if any(isinstance(v, str) and "\0" in v for v in row):
            row = tuple(v.replace("\0", "\ufffd") if isinstance(v, str) else v for v in row)
        out.append(row)
    return out


def _json_rows(rows: list[tuple], width: int) -> str:
    """The rows as one JSON array of arrays (non-ASCII kept as is: a lone surrogate fails to encode, as it would
    bound as a parameter)."""
    return json.dumps(_rows(rows, width), ensure_ascii=False, allow_nan=False)


class SearchQueries(StoreBase):
    """The command index, search text, retention: part of :class:`broker.store.Store`."""

    def save_session_text(self, session_id: str, commands: list[tuple], texts: list[tuple], at: str) -> None:
        """Replace a session's command index (``(offset, channel, source, command)`` rows) and search text
        (``(offset, kind, text)`` rows) and stamp it indexed.

        Each table is written with one statement, not a statement per row: a big session has ~50,000 rows, and
        every row of ``executemany`` gives the GIL back and waits to get it again (up to the 5 ms switch interval
        while the event loop is busy). Beside a busy thread that took 99-104 s for 50,000 rows, holding the store
        thread (every other store call of the process queues behind it) and SQLite's write lock all along; one
        statement per table takes 0.6 s (docs/performance.md, stop 17)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM commands WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM search_text WHERE session_id = ?", (session_id,))
            if self.dialect == "sqlite":  # the rows as one JSON array, spread by json_each
                if commands:
                    conn.execute('INSERT INTO commands (session_id, "offset", channel, source, command) '
                                 "SELECT ?, value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?)",
                                 (session_id, _json_rows(commands, 4)))
                if texts:
                    conn.execute('INSERT INTO search_text (session_id, "offset", kind, text) '
                                 "SELECT ?, value ->> 0, value ->> 1, value ->> 2 FROM json_each(?)",
                                 (session_id, _json_rows(texts, 3)))
            else:  # PostgreSQL: one array per column, spread by unnest
                if commands:
                    rows = _rows(commands, 4)
                    conn.execute('INSERT INTO commands (session_id, "offset", channel, source, command) '
                                 "SELECT ?, * FROM unnest(?::float8[], ?::int8[], ?::text[], ?::text[])",
                                 (session_id, [float(r[0]) for r in rows], [int(r[1]) for r in rows],
                                  [r[2] for r in rows], [r[3] for r in rows]))
                if texts:
                    rows = _rows(texts, 3)
                    conn.execute('INSERT INTO search_text (session_id, "offset", kind, text) '
                                 "SELECT ?, * FROM unnest(?::float8[], ?::text[], ?::text[])",
                                 (session_id, [float(r[0]) for r in rows], [r[1] for r in rows],
                                  [r[2] for r in rows]))
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
