"""Recordings archived to object storage: which sealed sessions still need it, uploads in progress, results."""

from __future__ import annotations

import json
from typing import Any

from broker.store.base import StoreBase


class ArchiveQueries(StoreBase):
    """The archive's rows (migration 21): part of :class:`broker.store.Store`."""

    def archive_candidates(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Finished sessions (closed or sealed: final hash and signature present) not archived yet, oldest first."""
        sql = ("SELECT * FROM sessions WHERE status != 'live' AND final_hash IS NOT NULL AND signature IS NOT NULL "
               "AND archived_at IS NULL ORDER BY ended_at, id")
        return self.query(sql + (" LIMIT ?" if limit is not None else ""), (int(limit),) if limit is not None else ())

    def archived_with_local_copy(self, archived_before: str) -> list[dict[str, Any]]:
        """Archived sessions whose local copy is still there and was archived before ``archived_before``."""
        return self.query("SELECT * FROM sessions WHERE archived_at IS NOT NULL AND local_removed_at IS NULL "
                          "AND archived_at <= ? ORDER BY archived_at, id", (archived_before,))

    def archive_backlog(self) -> dict[str, int]:
        """How much is waiting: finished sessions not archived, and uploads in progress."""
        waiting = self.one("SELECT count(*) AS n FROM sessions WHERE status != 'live' AND final_hash IS NOT NULL "
                           "AND signature IS NOT NULL AND archived_at IS NULL")
        uploads = self.one("SELECT count(*) AS n FROM archive_uploads")
        return {"waiting": int(waiting["n"]) if waiting else 0, "uploading": int(uploads["n"]) if uploads else 0}

    # ------------------------------------------------------------------ uploads in progress
    def archive_upload(self, session_id: str) -> dict[str, Any] | None:
        """The multipart upload in progress for a session, with ``parts``: {part number: (etag, size)}."""
        row = self.one("SELECT * FROM archive_uploads WHERE session_id = ?", (session_id,))
        if row is None:
            return None
        row["parts"] = {r["part_number"]: (r["etag"], r["size"]) for r in self.query(
            "SELECT part_number, etag, size FROM archive_upload_parts WHERE upload_id = ?", (row["upload_id"],))}
        return row

    def begin_archive_upload(self, session_id: str, *, object_key: str, upload_id: str, size: int, sha256: str,
                             part_size: int, now: str) -> None:
        """Remember a new multipart upload (replacing an abandoned one of the same session)."""
        with self.transaction() as conn:
            old = conn.execute("SELECT upload_id FROM archive_uploads WHERE session_id = ?", (session_id,)).fetchone()
            if old is not None:
                conn.execute("DELETE FROM archive_upload_parts WHERE upload_id = ?", (old[0],))
            conn.execute("DELETE FROM archive_uploads WHERE session_id = ?", (session_id,))
            conn.execute("INSERT INTO archive_uploads (session_id, object_key, upload_id, size, sha256, part_size, "
                         "started_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (session_id, object_key, upload_id, size, sha256, part_size, now, now))

    def record_archive_part(self, session_id: str, upload_id: str, part_number: int, etag: str, size: int,
                            now: str) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO archive_upload_parts (upload_id, part_number, etag, size, uploaded_at) "
                         "VALUES (?, ?, ?, ?, ?)", (upload_id, part_number, etag, size, now))
            conn.execute("UPDATE archive_uploads SET updated_at = ? WHERE session_id = ?", (now, session_id))

    def note_archive_attempt(self, session_id: str, *, error: str | None, now: str, resumed: bool) -> None:
        """Count a (resumed) attempt and keep the last error, for operators (``archive run --json``)."""
        self.execute("UPDATE archive_uploads SET attempts = attempts + ?, last_error = ?, updated_at = ? "
                     "WHERE session_id = ?", (1 if resumed else 0, error, now, session_id))

    def drop_archive_upload(self, session_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM archive_upload_parts WHERE upload_id IN "
                         "(SELECT upload_id FROM archive_uploads WHERE session_id = ?)", (session_id,))
            conn.execute("DELETE FROM archive_uploads WHERE session_id = ?", (session_id,))

    def last_archive_error(self, session_id: str) -> str | None:
        """The error of the session's latest ``recording.archive.failed`` audit row (to audit each error once)."""
        row = self.one("SELECT details FROM audit_events WHERE event = 'recording.archive.failed' AND session_id = ? "
                       "ORDER BY id DESC LIMIT 1", (session_id,))
        if row is None:
            return None
        return str(json.loads(row["details"]).get("error"))

    # ------------------------------------------------------------------ results
    def mark_archived(self, session_id: str, *, sha256: str, size: int, now: str) -> None:
        """The recording is in the object store, read back and verified; the upload bookkeeping goes."""
        with self.transaction() as conn:
            conn.execute("UPDATE sessions SET archived_at = ?, archive_sha256 = ?, archive_size = ? WHERE id = ?",
                         (now, sha256, size, session_id))
            conn.execute("DELETE FROM archive_upload_parts WHERE upload_id IN "
                         "(SELECT upload_id FROM archive_uploads WHERE session_id = ?)", (session_id,))
            conn.execute("DELETE FROM archive_uploads WHERE session_id = ?", (session_id,))

    def set_archive_checksum(self, key: str, *, sha256: str, size: int) -> int:
        """The archived object of recording ``key`` was replaced (retention's redacted form): its new checksum
        and size. Rows name the recording by key, or (written before keys) by a path ending in it.

        :returns: the number of sessions changed
        """
        return self.execute("UPDATE sessions SET archive_sha256 = ?, archive_size = ? WHERE archived_at IS NOT NULL "
                            "AND (recording = ? OR substr(recording, -?) = ?)",
                            (sha256, size, key, len(key) + 1, "/" + key)).rowcount

    def mark_local_removed(self, session_id: str, now: str) -> None:
        self.execute("UPDATE sessions SET local_removed_at = ? WHERE id = ?", (now, session_id))
