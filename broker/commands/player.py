"""Interactive ``medbroker replay`` on a terminal: pause, seek, skip a pause and change speed with keys."""

import os
import re
import select
import termios
import time
import tty
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from broker.errors import UsageError

__all__ = ["Player", "KEYS_HELP", "terminal_keys", "play_on_terminal", "parse_offset", "format_offset"]

KEYS_HELP = "keys: space pause/resume, ←/→ seek 10s, n skip this pause, +/- speed, q quit"
SEEK_STEP = 10.0
_ARROWS = {"\x1b[C": "right", "\x1bOC": "right", "\x1b[D": "left", "\x1bOD": "left"}
_CLEAR = b"\x1b[H\x1b[2J"


_UNITS = re.compile(r"(?:(\d{1,6})h)?(?:(\d{1,8})m)?(?:(\d{1,9}(?:\.\d{1,6})?)s)?", re.ASCII)
_CLOCK = re.compile(r"(?:(\d{1,6}):)?(\d{1,8}):(\d{1,2}(?:\.\d{1,6})?)", re.ASCII)
_MAX_OFFSET = 3650 * 86400


def parse_offset(text: str, *, what: str = "offset") -> float:
    """A point in a recording or a pause length: ``0``, ``90s``, ``2.5s``, ``1m30s``, ``1h2m3s``, or
    ``[HH:]MM:SS[.d]`` as ``sessions show``/``search`` print offsets (a leading ``+`` is allowed).

    :returns: seconds (>= 0)
    :raises UsageError: anything else
    """
    raw = (text or "").strip().removeprefix("+")
    if raw == "0":
        return 0.0
    m = _UNITS.fullmatch(raw)
    if m and raw:
        h, mi, s = m.groups()
        seconds = int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)
    elif (c := _CLOCK.fullmatch(raw)) is not None:
        h, mi, s = c.groups()
        seconds = int(h or 0) * 3600 + int(mi) * 60 + float(s)
    else:
        raise UsageError(f"{what} {text!r} is not a duration",
                         "e.g. 90s, 1m30s, 2h5m or 00:01:30 (as sessions show and search print them)")
    if seconds > _MAX_OFFSET:
        raise UsageError(f"{what} {text!r} is longer than ten years", "e.g. 90s or 1m30s")
    return seconds


def format_offset(seconds: float) -> str:
    """Whole seconds as ``parse_offset`` reads them: ``1h2m3s``, ``1m30s``, ``45s``, ``0s``."""
    total = max(0, int(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")


class _Seek(Exception):
    def __init__(self, to: float) -> None:
        self.to = to


class _Quit(Exception):
    pass


def _key_name(text: str) -> str | None:
    if text in _ARROWS:
        return _ARROWS[text]
    return {" ": "pause", "q": "quit", "Q": "quit", "\x03": "quit", "n": "next", "+": "faster", "=": "faster",
            "-": "slower", "l": "right", "h": "left"}.get(text[:1])


class Player:
    """Timed replay driven by keys; the keys come from ``read_key(timeout)`` so tests can script them.

    :param open_frames: returns a fresh frame iterator (seeking restarts from the file)
    :param write: terminal bytes out
    :param read_key: waits at most ``timeout`` seconds (None: forever) and returns the raw key text or None
    :param play: ``sessions.replay.replay`` (injected to keep this module free of the recording layer)
    """

    def __init__(self, open_frames: Callable[[], Iterator[Any]], write: Callable[[bytes], None], *,
                 read_key: Callable[[float | None], str | None], play: Callable[..., Any], speed: float = 1.0,
                 max_idle: float | None = None, start_at: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.open_frames = open_frames
        self.write = write
        self.read_key = read_key
        self.play = play
        self.speed = speed
        self.max_idle = max_idle
        self.start_at = start_at
        self.clock = clock
        self.pos = 0.0       # offset of the frame about to be written
        self.shown = 0.0     # offset of the last frame written
        self.finished = False

    def run(self) -> float:
        """Play until the end or ``q``; returns the offset reached (seconds into the session)."""
        target = self.start_at
        while True:
            frames = self.open_frames()
            try:
                self.shown = target
                self.play(self._track(frames), self._write, speed=1.0, max_idle=self.max_idle, start_at=target,
                          sleep=self._sleep)
                self.finished = True
                return self.shown
            except _Seek as seek:
                target = max(0.0, seek.to)
                self.write(_CLEAR)
            except _Quit:
                return self.shown
            finally:
                close = getattr(frames, "close", None)
                if close is not None:
                    close()

    def _track(self, frames: Iterable[Any]) -> Iterator[Any]:
        for frame in frames:
            self.pos = frame.mono_ns / 1e9
            yield frame

    def _write(self, data: bytes) -> None:
        self.shown = max(self.shown, self.pos)
        self.write(data)

    def _title(self, text: str) -> None:
        self.write(f"\x1b]2;medbroker replay: {text}\x07".encode())

    def _handle(self, key: str | None) -> str | None:
        """Act on one key; returns "next" to end the current pause, None to keep waiting."""
        name = _key_name(key) if key else None
        if name == "quit":
            raise _Quit()
        if name == "right":
            raise _Seek(self.shown + SEEK_STEP)
        if name == "left":
            raise _Seek(self.shown - SEEK_STEP)
        if name == "faster":
            self.speed = min(self.speed * 2, 64.0)
            self._title(f"speed {self.speed:g}x")
        elif name == "slower":
            self.speed = max(self.speed / 2, 0.125)
            self._title(f"speed {self.speed:g}x")
        elif name == "next":
            return "next"
        elif name == "pause":
            self._title(f"paused at {self.shown:.0f}s (space resumes)")
            while True:
                again = _key_name(self.read_key(None) or "")
                if again == "pause":
                    self._title(f"playing at {self.speed:g}x")
                    return None
                if again in ("quit", "right", "left", "next"):
                    return self._handle({"quit": "q", "right": "l", "left": "h", "next": "n"}[again])
        return None

    def _sleep(self, recorded: float) -> None:
        """Wait out ``recorded`` seconds of session time at the current speed, reacting to keys."""
        remaining = recorded
        while remaining > 1e-6:
            started = self.clock()
            key = self.read_key(remaining / self.speed)
            remaining -= (self.clock() - started) * self.speed
            if key is not None and self._handle(key) == "next":
                return


def terminal_keys(fd: int) -> Callable[[float | None], str | None]:
    """A ``read_key`` over a terminal file descriptor (put it in cbreak mode first)."""

    def read_key(timeout: float | None) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(fd, 16)
        return data.decode("utf-8", "replace") if data else "q"  # EOF on the terminal: stop

    return read_key


def play_on_terminal(open_frames: Callable[[], Iterator[Any]], write: Callable[[bytes], None], *, fd: int,
                     play: Callable[..., Any], speed: float, max_idle: float | None, start_at: float) -> Player:
    """Run a :class:`Player` with keys from terminal ``fd`` (cbreak mode, restored afterwards)."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        player = Player(open_frames, write, read_key=terminal_keys(fd), play=play, speed=speed, max_idle=max_idle,
                        start_at=start_at)
        player.run()
        return player
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
