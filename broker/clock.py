"""Injectable clocks: UTC wall time for timestamps, monotonic nanoseconds for ordering."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

__all__ = ["Clock", "SystemClock", "FakeClock", "utc_iso", "parse_utc"]


class Clock:
    """Interface: ``now()`` is aware UTC, ``monotonic_ns()`` never goes back."""

    def now(self) -> datetime:  # pragma: no cover - interface
        raise NotImplementedError

    def monotonic_ns(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class SystemClock(Clock):
    """The real clocks."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


class FakeClock(Clock):
    """A clock tests move by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, 8, 0, tzinfo=timezone.utc)
        self._mono = 1_000_000_000

    def now(self) -> datetime:
        return self._now

    def monotonic_ns(self) -> int:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        self._now += timedelta(seconds=seconds)
        self._mono += int(seconds * 1e9)


def utc_iso(dt: datetime) -> str:
    """Format an aware datetime as UTC ISO-8601 with a ``Z`` suffix, microsecond precision."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> datetime:
    """Parse what :func:`utc_iso` wrote (or any ISO-8601 string) into an aware UTC datetime."""
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)
