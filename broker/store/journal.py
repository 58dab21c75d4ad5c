"""The recording journal (migration 19): writer batches committed off the node, read back by seq, dropped once sealed."""

from __future__ import annotations

from typing import Any

from broker.store.base import StoreBase

__all__ = ["JournalQueries", "JOURNAL_READ_ROWS"]

JOURNAL_READ_ROWS = 16
"""Rows :meth:`JournalQueries.read_journal` returns at most per call (a row is one writer batch, <= ~1 MiB)."""


class JournalQueries(StoreBase):
    """The recording journal: part of :class:`broker.store.Store`. Portable SQL (``?`` placeholders, bytes for
    the BLOB); ``seq`` 0 is the recording's header, then the sequence number of each row's first frame."""

    def append_journal(self, session_id: str, seq: int, at: str, data: bytes) -> None:
        """Commit one batch (one INSERT, its own transaction). Repeating an append that did commit (a retry
        after a lost reply) changes nothing.

        :raises StorageError: the database is busy or unwritable
        """
        self.execute("INSERT INTO recording_journal (session_id, seq, at, size, data) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT (session_id, seq) DO NOTHING", (session_id, int(seq), at, len(data), bytes(data)))

    def read_journal(self, session_id: str, after: int = -1, limit: int = JOURNAL_READ_ROWS) -> list[tuple[int, bytes]]:
        """Up to ``limit`` rows after ``after`` (seq order) as ``(seq, data)``; ``after=-1`` starts at the header."""
        rows = self.query("SELECT seq, data FROM recording_journal WHERE session_id = ? AND seq > ? "
                          "ORDER BY seq LIMIT ?", (session_id, int(after), int(limit)))
        return [(int(r["seq"]), bytes(r["data"])) for r in rows]

    def has_journal(self, session_id: str) -> bool:
        """Whether the journal holds any row of the session."""
        return self.one("SELECT 1 AS x FROM recording_journal WHERE session_id = ? LIMIT 1", (session_id,)) is not None

    def drop_journal(self, session_id: str) -> int:
        """Delete the session's rows (its recording is sealed, and archived where that is on); returns how many."""
        return int(self.execute("DELETE FROM recording_journal WHERE session_id = ?", (session_id,)).rowcount)

    def journal_backlog(self) -> list[dict[str, Any]]:
        """Per session with journal rows: ``session_id``, ``rows``, ``bytes`` (payload), ``last_at``."""
        return self.query("SELECT session_id, count(*) AS rows, sum(size) AS bytes, max(at) AS last_at "
                          "FROM recording_journal GROUP BY session_id ORDER BY session_id")

    def set_lock_wait(self, seconds: float) -> None:
        """Wait at most ``seconds`` for another writer's lock before a statement fails (this connection only).

        The journal's own connection uses it so a locked database fails a batch within ``journal_timeout``
        instead of the store's default 10 s.
        """
        with self._lock:
            self.db.conn.execute(f"PRAGMA busy_timeout = {max(1, int(seconds * 1000))}")
