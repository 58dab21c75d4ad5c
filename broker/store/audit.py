"""The audit chain (one atomic append per event), its signed checkpoints, searching it."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from broker.store.base import StoreBase


class AuditQueries(StoreBase):
    """The audit chain and its checkpoints: part of :class:`broker.store.Store`."""

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
        sql = "SELECT * FROM audit_events WHERE id > ?"
        params: list[Any] = [after_id]
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

    def audit_ids_about(self, *, session_ids: Sequence[str] = (), grant_ids: Sequence[int] = (),
                        request_ids: Sequence[int] = ()) -> list[int]:
        """Ids of the audit rows naming any of these sessions, grants or access requests, ascending (for
        evidence bundles)."""
        found: set[int] = set()
        for column, values in (("session_id", list(session_ids)), ("grant_id", list(grant_ids)),
                               ("request_id", list(request_ids))):
            for i in range(0, len(values), 500):  # SQLite's limit on bound parameters
                chunk = values[i:i + 500]
                marks = ", ".join("?" for _ in chunk)
                found.update(r["id"] for r in self.query(
                    f"SELECT id FROM audit_events WHERE {column} IN ({marks})", tuple(chunk)))
        return sorted(found)

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

    def last_audit_id(self) -> int:
        row = self.db.conn.execute("SELECT coalesce(max(id), 0) FROM audit_events").fetchone()
        return int(row[0])

    def search_audit(self, *, event: str | None = None, actor: str | None = None, user: str | None = None,
                     device: str | None = None, session_id: str | None = None, since: str | None = None,
                     until: str | None = None, before_id: int | None = None, limit: int = 100
                     ) -> list[dict[str, Any]]:
        """Audit rows matching every given filter, newest first (``event`` also matches its sub-events)."""
        sql = "SELECT * FROM audit_events WHERE 1=1"
        params: list[Any] = []
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
