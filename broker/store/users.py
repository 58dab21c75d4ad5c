"""Users, their login keys and TOTP secrets, and failed logins (the lockout)."""

from __future__ import annotations

from typing import Any

from broker.store.base import StoreBase


class UserQueries(StoreBase):
    """Users, their login keys and TOTP secrets, failed logins: part of :class:`broker.store.Store`."""

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
        self.execute_ending("UPDATE users SET disabled = ? WHERE name = ?", (int(disabled), name))

    def set_user_source(self, name: str, source: str) -> None:
        self.execute("UPDATE users SET source = ? WHERE name = ?", (source, name))

    def set_user_role(self, name: str, role: str) -> None:
        self.execute_ending("UPDATE users SET role = ? WHERE name = ?", (role, name))

    def set_user_company(self, name: str, company: str | None) -> None:
        self.execute("UPDATE users SET company = ? WHERE name = ?", (company, name))

    def replace_user_keys(self, name: str, keys: list[tuple[str, str]], at: str) -> None:
        """Make ``name``'s keys exactly ``keys`` ((fingerprint, line) pairs), in one transaction."""
        with self.transaction() as conn:
            old = {row[0] for row in conn.execute("SELECT fingerprint FROM user_keys WHERE user_name = ?", (name,))}
            conn.execute("DELETE FROM user_keys WHERE user_name = ?", (name,))
            if old - {fp for fp, _ in keys}:  # a key went: a session it opened ends
                self.notify_ending(conn)
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
            "INSERT INTO user_keys (user_name, fingerprint, public_key, added_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (name, fingerprint, public_key, at),
        )

    def user_keys(self, name: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM user_keys WHERE user_name = ? ORDER BY id", (name,))

    def find_key(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM user_keys WHERE user_name = ? AND fingerprint = ?", (name, fingerprint))

    def delete_user_key(self, name: str, fingerprint: str) -> int:
        return self.execute_ending("DELETE FROM user_keys WHERE user_name = ? AND fingerprint = ?",
                            (name, fingerprint)).rowcount

    def add_auth_failure(self, user: str, source: str, at: str) -> None:
        self.execute("INSERT INTO auth_failures (user_name, source, at) VALUES (?, ?, ?)", (user, source, at))

    def count_auth_failures(self, user: str, source: str, since: str) -> int:
        return int(self.scalar("SELECT count(*) FROM auth_failures WHERE user_name = ? AND source = ? AND at > ?",
                               (user, source, since)))

    def last_auth_failures(self, user: str, source: str, n: int) -> list[str]:
        rows = self.query("SELECT at FROM auth_failures WHERE user_name = ? AND source = ? ORDER BY at DESC LIMIT ?",
                          (user, source, n))
        return [r["at"] for r in rows]

    def recent_login_sources(self, since: str) -> list[dict[str, Any]]:
        """Addresses with a successful SSH login at or after ``since``, each with its latest one."""
        return self.query("SELECT source, max(at) AS at FROM audit_events WHERE event = 'auth.success' AND at >= ? "
                          "AND source IS NOT NULL GROUP BY source", (since,))

    def clear_auth_failures(self, user: str, source: str) -> None:
        self.execute("DELETE FROM auth_failures WHERE user_name = ? AND source = ?", (user, source))
