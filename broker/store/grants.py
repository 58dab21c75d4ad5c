"""Access requests, approvals and grants."""

from __future__ import annotations

import json
from typing import Any

from broker.store.base import StoreBase


class GrantQueries(StoreBase):
    """Access requests, approvals, grants: part of :class:`broker.store.Store`."""

    def insert_request(self, row: dict[str, Any]) -> int:
        return self.insert("access_requests", row)

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
        # One statement: of several nodes expiring at once, each request is expired (and reported) by one, and a
        # request an approver holds locked (lock_request) is decided first, then skipped here.
        rows = self.execute("UPDATE access_requests SET status = 'expired', decided_at = ? WHERE status = 'pending' "
                            "AND expires_at <= ? RETURNING id", (now, now)).rows
        return sorted(r[0] for r in rows)

    def lock_request(self, request_id: int) -> None:
        """Inside a transaction: hold this request's row until it ends, so a decision about it (approve, deny,
        expire) made elsewhere waits (PostgreSQL; SQLite's write transaction already excludes every other)."""
        if self.dialect == "postgresql":
            self.conn.execute("SELECT id FROM access_requests WHERE id = ? FOR UPDATE", (request_id,))

    def add_approval(self, request_id: int, approver: str, at: str, duration_s: int | None = None,
                     allow_shell: bool = False, strikes: tuple[int, ...] = ()) -> bool:
        """Record one person's approval (with the window, shell choice and struck forward ports they chose);
        False when they had already approved this request."""
        cur = self.execute("INSERT INTO approvals (request_id, approver, at, duration_s, allow_shell, "
                           "strikes) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
            gid = self.insert("grants", grant)
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
        cur = self.execute_ending(
            "UPDATE grants SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ? AND revoked_at IS NULL",
            (at, by, reason, grant_id),
        )
        return cur.rowcount == 1

    def decided_requests(self, limit: int = 50) -> list[dict[str, Any]]:
        """Requests that are no longer pending, newest decision first."""
        return self.query("SELECT * FROM access_requests WHERE status != 'pending' "
                          "ORDER BY coalesce(decided_at, created_at) DESC, id DESC LIMIT ?", (int(limit),))
