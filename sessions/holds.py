"""Why each side of a relayed channel is not being read: the recorder behind, a full peer, held input.

Reading a side resumes only when every reason for holding it is released, so the recorder's back-pressure
and the channels' own windows cannot undo each other. Shared by shell/exec/SFTP channels
(sessions/relay.py) and port forwards (sessions/forward.py).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Holds"]


class Holds:
    """The reasons holding each side ("vendor" or "device"); ``channel(side)`` is that side's asyncssh
    channel, or None while it is not open (it is paused when it opens, see ``holds[side]``)."""

    def __init__(self, channel: Callable[[str], Any]) -> None:
        self._channel = channel
        self._reasons: dict[str, set[str]] = {"vendor": set(), "device": set()}

    def __getitem__(self, side: str) -> set[str]:
        return self._reasons[side]

    def hold(self, side: str, reason: str) -> bool:
        """Stop reading ``side`` for ``reason``; True when this is the first reason (reading just stopped)."""
        reasons = self._reasons[side]
        first = not reasons
        if first:
            chan = self._channel(side)
            if chan is not None:
                chan.pause_reading()
        reasons.add(reason)
        return first

    def release(self, side: str, reason: str) -> bool:
        """Drop ``reason``; True when it was the last one (reading just resumed)."""
        reasons = self._reasons[side]
        if reason not in reasons:
            return False
        reasons.discard(reason)
        if reasons:
            return False
        chan = self._channel(side)
        if chan is not None:
            chan.resume_reading()
        return True
