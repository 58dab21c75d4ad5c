"""The unfinished last line of an output chunk, held back briefly while it looks like record text.

Output is scanned chunk by chunk, and a chunk can end inside a record whose telling part comes later (the
start of a reversed or cut HL7 segment, a name before its segment id). :class:`TailHold` holds the
unfinished last line while it looks like record text (printable, with ``|`` or ``^``) until the next output
completes it (the scanner judges it with that context) or :data:`TAIL_HOLD_S` passes. Shared by shell/exec
channels (sessions/relay.py) and plain-text port forwards (sessions/forward.py).
"""

from __future__ import annotations

import asyncio
from typing import Callable

__all__ = ["TailHold", "TAIL_HOLD_S", "TAIL_HOLD_MAX", "UNDECIDED_HOLD_MAX"]

TAIL_HOLD_S = 0.02  # longest a record-like unfinished output line waits for the rest
TAIL_HOLD_MAX = 8192
UNDECIDED_HOLD_MAX = 64 * 1024  # longest output held whole while the scanner is undecided (see take)
_TAIL_TEXT = bytes(range(0x20, 0x7F)) + b"\t\r\x1b"


class TailHold:
    """One output stream's held tail. ``take(data)`` returns what may go on now; the held rest reaches
    ``release(held)`` when nothing completed it in time (or at :meth:`flush`)."""

    def __init__(self, release: Callable[[bytes], None]) -> None:
        self._release = release
        self._held = b""
        self._timer: asyncio.TimerHandle | None = None

    @property
    def held(self) -> bytes:
        return self._held

    def take(self, data: bytes, undecided: bool = False) -> bytes:
        """``data`` (after anything held before) minus a record-like unfinished last line, which is held.

        ``undecided`` (DeepScanner.undecided): the scanner is inside a compressed stream that may still prove to
        be patient data, so all of it is held (up to UNDECIDED_HOLD_MAX, at most TAIL_HOLD_S from the first
        held byte) until a later chunk decides; a hit then drops it unseen (the first line of ``gzip | base64``
        reached the vendor when a terminal delivered it alone)."""
        if self._held:
            data = self._held + data
            self._held = b""
        if undecided and len(data) <= UNDECIDED_HOLD_MAX:
            self._held = data
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(TAIL_HOLD_S, self._expired)
            return b""
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if (tail and len(tail) <= TAIL_HOLD_MAX and (tail.find(b"|") != -1 or tail.find(b"^") != -1)
                and not tail.translate(None, _TAIL_TEXT)):
            self._held = tail
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(TAIL_HOLD_S, self._expired)
            return data[:cut]
        return data

    def _expired(self) -> None:
        """Nothing more came: the scanner has seen the held line with all the context there is."""
        self._timer = None
        held, self._held = self._held, b""
        if held:
            self._release(held)

    def flush(self) -> None:
        """Hand the held line on now (the stream ended: EOF, exit status)."""
        self.cancel()
        held, self._held = self._held, b""
        if held:
            self._release(held)

    def cancel(self) -> None:
        """Stop the timer; what is held stays held (and is dropped with the hold)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
