"""Failed-login counting per (user, source address) and the lockout decision, without SSH."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from broker.clock import utc_iso
from broker.config import BrokerConfig
from broker.identity import lockout_remaining
from broker.store import Store

__all__ = ["LockoutPolicy", "lockout_left", "record_failure", "clear_failures"]


@dataclass(frozen=True)
class LockoutPolicy:
    """``max_failures`` failures within ``window_s`` lock the pair for ``lockout_s`` (``[limits]``)."""

    max_failures: int
    window_s: int
    lockout_s: int

    @classmethod
    def from_config(cls, cfg: BrokerConfig) -> "LockoutPolicy":
        """Read ``limits.max_auth_failures``, ``limits.failure_window`` and ``limits.lockout``."""
        return cls(cfg.limits.max_auth_failures, cfg.seconds("limits", "failure_window"),
                   cfg.seconds("limits", "lockout"))


def lockout_left(store: Store, user: str, source: str, now: datetime, policy: LockoutPolicy) -> int:
    """Seconds the pair stays locked; 0 when it may try to authenticate."""
    return lockout_remaining(store, user, source, now, max_failures=policy.max_failures,
                             window_s=policy.window_s, lockout_s=policy.lockout_s)


def record_failure(store: Store, user: str, source: str, now: datetime, policy: LockoutPolicy) -> int:
    """Count one failed authentication (a wrong key set, a wrong or reused code).

    Attempts refused *because* the pair is locked are not failures: call this only after a credential
    was actually checked, so a lockout ends ``lockout_s`` after it started however often the pair retries.

    :returns: the lockout's length in seconds when this failure started one, else 0 (so the caller
        audits ``auth.lockout`` exactly once per lockout, also with several broker processes)
    """
    # The pair's own lock (PostgreSQL nodes; SQLite's write transaction excludes everyone): failures arriving
    # together on several nodes are each counted, and exactly one of them starts the lockout.
    with store.transaction(lock=f"auth_failures:{user}:{source}"):
        before = lockout_left(store, user, source, now, policy)
        store.add_auth_failure(user, source, utc_iso(now))
        after = lockout_left(store, user, source, now, policy)
    return after if after and not before else 0


def clear_failures(store: Store, user: str, source: str) -> None:
    """Forget the pair's failures after a complete, successful login."""
    store.clear_auth_failures(user, source)
