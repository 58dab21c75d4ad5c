"""Who may hold a pre-authentication slot: OpenSSH's answers (MaxStartups random early drop, 9.8's
PerSourcePenalties, PerSourceMaxStartups) plus a share kept for addresses that logged in recently.

Pure bookkeeping on loop time (seconds); the SSH server asks it at every new TCP connection and tells it
about logins, failures and timeouts. docs/security.md, "Pre-authentication slots".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from broker.config import BrokerConfig, parse_startups

__all__ = ["StartupPolicy", "StartupGate", "Admission"]


@dataclass(frozen=True)
class StartupPolicy:
    """The ``[limits]`` settings the gate uses, in absolute numbers."""

    max_unauthenticated: int
    per_address: int
    drop_start: int      # early drop begins above this many logins in progress ...
    drop_rate: int       # ... with this probability (percent) ...
    drop_full: int       # ... rising linearly to 100 % here
    reserved: int        # slots only recent addresses may use
    recent_s: int
    penalty_authfail_s: int
    penalty_grace_s: int
    penalty_min_s: int
    penalty_max_s: int

    @classmethod
    def from_config(cls, cfg: BrokerConfig) -> "StartupPolicy":
        lim = cfg.limits
        full_n = lim.max_unauthenticated
        start, rate, full = parse_startups(lim.max_startups)
        return cls(full_n, lim.max_unauthenticated_per_address, full_n * start // 100, rate, full_n * full // 100,
                   full_n * lim.reserved_for_recent // 100, cfg.seconds("limits", "recent_login_window"),
                   cfg.seconds("limits", "penalty_authfail"), cfg.seconds("limits", "penalty_grace"),
                   cfg.seconds("limits", "penalty_min"), cfg.seconds("limits", "penalty_max"))


@dataclass(frozen=True)
class Admission:
    """The gate's answer for one new connection: ``reason`` is None when it may go on."""

    reason: str | None = None
    penalty_left: float = 0.0


@dataclass
class _Penalty:
    until: float
    active: bool = False


@dataclass
class StartupGate:
    """Per-process state: recent addresses, penalties, and logins in progress of non-recent addresses."""

    policy: StartupPolicy
    rng: random.Random = field(default_factory=random.Random)
    recent: dict[str, float] = field(default_factory=dict)      # address -> loop time of its last login
    penalties: dict[str, _Penalty] = field(default_factory=dict)
    in_progress: dict[str, int] = field(default_factory=dict)   # non-recent address -> logins in progress

    MAX_TRACKED = 65536  # like OpenSSH's max-sources: beyond it the oldest entries are forgotten

    def is_recent(self, source: str, now: float) -> bool:
        at = self.recent.get(source)
        return at is not None and now - at <= self.policy.recent_s

    def admit(self, source: str, unauthenticated: int, now: float) -> Admission:
        """May a new connection from ``source`` take a pre-authentication slot? ``unauthenticated`` counts
        the logins in progress broker-wide, this one included. Recent addresses are not asked (only the
        broker-wide and per-address caps apply to them)."""
        p = self.policy
        left = self.penalty_left(source, now)
        if left:
            return Admission("penalised", left)
        if self.in_progress.get(source, 0) >= p.per_address:
            return Admission("too many logins in progress from this address")
        if unauthenticated > p.max_unauthenticated - p.reserved:
            return Admission("no pre-authentication slot left outside the share kept for recent addresses")
        if unauthenticated > p.drop_start:
            span = max(1, p.drop_full - p.drop_start)
            chance = p.drop_rate + (100 - p.drop_rate) * min(1.0, (unauthenticated - p.drop_start) / span)
            if self.rng.random() * 100 < chance:
                return Admission("random early drop (too many logins in progress)")
        return Admission()

    def started(self, source: str) -> None:
        self.in_progress[source] = self.in_progress.get(source, 0) + 1

    def ended(self, source: str) -> None:
        n = self.in_progress.get(source, 0) - 1
        if n > 0:
            self.in_progress[source] = n
        else:
            self.in_progress.pop(source, None)

    def logged_in(self, source: str, now: float) -> None:
        """A successful login: the address is recent from now on and its penalty is forgiven."""
        self._bound(self.recent)
        self.recent[source] = now
        self.penalties.pop(source, None)

    def penalty_left(self, source: str, now: float) -> float:
        pen = self.penalties.get(source)
        if pen is None:
            return 0.0
        if pen.until <= now:
            del self.penalties[source]
            return 0.0
        return pen.until - now if pen.active else 0.0

    def penalise(self, source: str, kind: str, now: float) -> float:
        """Add the penalty for ``kind`` ("authfail" or "grace"); returns its length when this made the
        address refused (to be audited once), else 0. Recent addresses are never penalised."""
        if self.is_recent(source, now):
            return 0.0
        p = self.policy
        add = p.penalty_authfail_s if kind == "authfail" else p.penalty_grace_s
        pen = self.penalties.get(source)
        if pen is None or pen.until <= now:
            self._bound(self.penalties)
            pen = self.penalties[source] = _Penalty(now)
        pen.until = min(max(pen.until, now) + add, now + p.penalty_max_s)
        if not pen.active and pen.until - now >= p.penalty_min_s:
            pen.active = True
            return pen.until - now
        return 0.0

    def _bound(self, table: dict) -> None:
        if len(table) >= self.MAX_TRACKED:
            for key in list(table)[: len(table) // 4]:  # insertion order: the oldest quarter
                del table[key]
