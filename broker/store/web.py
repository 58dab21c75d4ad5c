"""The web console: sign-in tokens, console sessions, shares, passwords, state."""

from __future__ import annotations

from typing import Any

from broker.store.base import StoreBase


class WebQueries(StoreBase):
    """The web console's tables: part of :class:`broker.store.Store`."""

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
        return self.insert("web_shares", row)

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
