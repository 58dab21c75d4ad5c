"""Command index: the command lines a vendor actually ran, reconstructed from the terminal itself.

Raw keystrokes lie (backspace, arrow keys, history recall, Ctrl-R, tab completion), so every PTY
channel is replayed through a terminal emulator (pyte) and the edited line is read off the screen at
each Enter, just before the shell's newline scrolls it away. Exec commands come from exec frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import pyte

__all__ = ["CommandEntry", "CommandIndex", "HeldOutput", "index_commands"]

_MAX_COMMAND = 4096
# pyte draws ~0.35 MB/s. Output between two command lines is emulated in full up to _EXACT bytes; of a longer
# stretch (a 100 MiB `cat` in the shell) only the last _TAIL bytes, from a line start: what is left on screen.
_EXACT = 256 << 10
_TAIL = 64 << 10


class HeldOutput:
    """Terminal output waiting to be drawn. pyte is slow, so of a long stretch only the tail is kept: up to
    ``exact`` bytes are drawn in full, past that only the last ``tail`` bytes, from a line start (what a
    terminal would still show). Shared by the command index and the live screen (sessions/shell_lines.py)."""

    def __init__(self, exact: int, tail: int) -> None:
        self.exact, self.tail = exact, tail
        self._data = bytearray()
        self._trimmed = False  # the head was dropped

    def __len__(self) -> int:
        return len(self._data)

    def add(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > (2 * self.tail if self._trimmed else self.exact):
            del self._data[:-self.tail]
            self._trimmed = True

    def take(self) -> bytes:
        """What to draw now (b"" when nothing is held); the hold is empty afterwards."""
        if not self._data:
            return b""
        data = bytes(self._data)
        if self._trimmed:
            data = data[data.find(b"\n") + 1:]
        self._data.clear()
        self._trimmed = False
        return data


@dataclass(frozen=True)
class CommandEntry:
    """One command: seconds since the session started, its channel, the text, and where it came from."""

    offset: float
    channel: int
    command: str
    source: str  # "shell" or "exec"

    def as_dict(self) -> dict[str, Any]:
        return {"offset": round(self.offset, 3), "channel": self.channel, "command": self.command,
                "source": self.source}


class _Terminal:
    """One PTY channel's screen and the state of the line being typed."""

    def __init__(self, cols: int, rows: int) -> None:
        self.screen = pyte.Screen(max(cols, 2), max(rows, 2))
        self.stream = pyte.ByteStream(self.screen)
        self.start: tuple[int, int] | None = None  # (x, y) where the current command line began
        self.pending: list[float] = []  # offsets of Enters whose lines are not read yet (typeahead, paste)
        self.held = HeldOutput(_EXACT, _TAIL)  # output since the last command line, not yet drawn

    def resize(self, cols: int, rows: int) -> None:
        self._settle()
        self.screen.resize(max(rows, 2), max(cols, 2))

    def keystrokes(self, offset: float, data: bytes) -> None:
        self._settle()
        if self.start is None and not self.pending:
            self.start = (self.screen.cursor.x, self.screen.cursor.y)
        self.pending.extend(offset for b in data if b in (0x0D, 0x0A))

    def output(self, data: bytes, out: list[CommandEntry], channel: int) -> None:
        if self.start is None and not self.pending:  # between command lines: draw it when it matters
            self._hold(data)
            return
        self._settle()
        # Read each edited line right before the shell's newline moves the cursor off it.
        while self.pending:
            cut = data.find(b"\n")
            if cut < 0:
                break
            self._feed(data[:cut])
            self._take(out, channel)
            data = data[cut:]
            self._feed(data[:1])
            data = data[1:]
        if self.start is None and not self.pending:
            self._hold(data)
        else:
            self._feed(data)

    def _hold(self, data: bytes) -> None:
        self.held.add(data)

    def _settle(self) -> None:
        """Draw the held output (only its tail, from a line start, if it was long)."""
        data = self.held.take()
        if data:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        if data:
            self.stream.feed(data)

    def _take(self, out: list[CommandEntry], channel: int) -> None:
        offset = self.pending.pop(0)
        continuation = self.start is None  # a pasted second line: no keystroke marked where it began
        start = self.start or (0, self.screen.cursor.y)
        y_end = self.screen.cursor.y
        rows = self.screen.display
        if not 0 <= start[1] < len(rows) or start[1] > y_end:  # the screen scrolled: take the cursor row
            start = (0, y_end)
        parts = [rows[start[1]][start[0]:]] + [rows[y] for y in range(start[1] + 1, y_end + 1)]
        text = "".join(parts).rstrip()
        if continuation and text.startswith("> "):  # bash's default PS2
            text = text[2:]
        if text:
            out.append(CommandEntry(offset, channel, text[:_MAX_COMMAND], "shell"))
        self.start = None


class CommandIndex:
    """Builds the command index one frame at a time (see :func:`index_commands`), for single-pass indexers."""

    def __init__(self) -> None:
        self._out: list[CommandEntry] = []
        self._terms: dict[int, _Terminal] = {}

    def wants(self, channel: int, kind: str) -> bool:
        """Whether a data frame matters here: input and output of PTY channels (stderr never does)."""
        return kind in ("input", "output") and channel in self._terms

    def feed(self, frame: Any) -> None:
        """Take the next frame (a ``sessions.recording.Frame``-like object), in recording order."""
        kind = frame.kind
        if kind == "exec":
            self._out.append(CommandEntry(frame.offset, frame.channel, str(frame.event().get("command", "")), "exec"))
        elif kind == "pty":
            ev = frame.event()
            self._terms[frame.channel] = _Terminal(int(ev.get("cols") or 80), int(ev.get("rows") or 24))
        elif kind == "resize" and frame.channel in self._terms:
            ev = frame.event()
            self._terms[frame.channel].resize(int(ev.get("cols") or 80), int(ev.get("rows") or 24))
        elif kind == "input" and frame.channel in self._terms:
            self._terms[frame.channel].keystrokes(frame.offset, frame.payload)
        elif kind == "output" and frame.channel in self._terms:
            self._terms[frame.channel].output(frame.payload, self._out, frame.channel)

    def result(self) -> list[CommandEntry]:
        """The commands so far, in time order."""
        return sorted(self._out, key=lambda c: c.offset)


def index_commands(frames: Iterable[Any]) -> list[CommandEntry]:
    """Reconstruct the commands of a session from its frames (``sessions.recording.Frame`` objects).

    :returns: commands in time order; shell lines read from the emulated screen, exec commands verbatim
    """
    index = CommandIndex()
    for frame in frames:
        index.feed(frame)
    return index.result()
