"""Injectable clocks, defined in medcore/clock.py (layer 0, shared with sessions/); re-exported here so
``from broker.clock import …`` keeps working for the broker and for users."""

from __future__ import annotations

from medcore.clock import Clock, FakeClock, SystemClock, clock_text, display_zone, local_text, parse_utc, utc_iso

__all__ = ["Clock", "SystemClock", "FakeClock", "utc_iso", "parse_utc", "display_zone", "local_text", "clock_text"]
