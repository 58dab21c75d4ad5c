"""The command line a vendor is typing in an interactive shell, read off a live terminal emulator (pyte).

sessions/cmd_index.py reads finished recordings the same way; this is its live twin for the relay: the
device's output is drawn (only its tail after a long stretch, so the cost per session stays bounded), the
position of the first keystroke marks where the line began, and at Enter the text from there to the
cursor row is the line the shell will run (after editing, history recall and tab completion).
"""

from __future__ import annotations

import re

import pyte

from sessions.cmd_index import HeldOutput

__all__ = ["LiveScreen"]

_MAX_LINE = 8192
# Output between two keystrokes is drawn in full up to _EXACT bytes; of a longer stretch only the last _TAIL
# bytes from a line start (pyte draws ~0.35 MB/s: 32 KiB is ~0.1 s, drawn when the output pauses).
_EXACT = 32 << 10
_TAIL = 16 << 10
_ALT_SCREENS = frozenset(m << 5 for m in (47, 1047, 1049))  # pyte keeps private modes shifted left by 5
_BRACKETED_PASTE = 2004 << 5
# readline's incremental search shows "(reverse-i-search)`aXb': echo aXbc"; Enter runs what follows the prompt.
_SEARCH = re.compile(r"^\((?:failed )?(?:reverse-|bck-|fwd-)?i-search\)`[^']*': ")


class LiveScreen:
    """One PTY channel's screen, fed with the device's output, read at the vendor's Enter."""

    def __init__(self, cols: int, rows: int) -> None:
        self.screen = pyte.Screen(max(cols, 2), max(rows, 2))
        self.stream = pyte.ByteStream(self.screen)
        self.start: tuple[int, int] | None = None
        self.held = HeldOutput(_EXACT, _TAIL)
        self.paste_seen = False  # the shell turned bracketed paste on at least once (bash >= 5.1 at its prompt)

    def resize(self, cols: int, rows: int) -> None:
        self.settle()
        self.screen.resize(max(rows, 2), max(cols, 2))

    def output(self, data: bytes) -> None:
        """Device output: held, drawn when a keystroke needs the screen or :meth:`settle` is called."""
        self.held.add(data)

    def settle(self) -> None:
        """Draw the held output (only its tail, from a line start, if it was long)."""
        data = self.held.take()
        if not data:
            return
        try:
            self.stream.feed(data)
        except Exception:  # pyte on hostile escape sequences: start from a clean screen rather than fail
            self.screen.reset()
            self.start = None
        if _BRACKETED_PASTE in self.screen.mode:
            self.paste_seen = True

    def keystroke(self) -> None:
        """The vendor typed something: the line begins at the cursor unless it began already."""
        self.settle()
        if self.start is None:
            self.start = (self.screen.cursor.x, self.screen.cursor.y)

    def reading_command(self) -> bool:
        """Whether an Enter now ends a command line: not inside a full-screen program (alternate screen), and
        for a shell that uses bracketed paste at its prompt, only while it is on (bash turns it off while a
        command runs, so lines typed into ``cat``, ``passwd`` or a REPL are not taken for commands)."""
        self.settle()
        mode = self.screen.mode
        if mode & _ALT_SCREENS:
            return False
        return _BRACKETED_PASTE in mode or not self.paste_seen

    def line(self) -> str:
        """The command line from where the first keystroke was to the end of the cursor row."""
        self.settle()
        y_end = self.screen.cursor.y
        start = self.start or (0, y_end)
        rows = self.screen.display
        if not 0 <= start[1] < len(rows) or start[1] > y_end:
            start = (0, y_end)
        parts = [rows[start[1]][start[0]:]] + [rows[y] for y in range(start[1] + 1, y_end + 1)]
        text = "".join(parts).rstrip()
        if self.start is None and text.startswith("> "):  # bash's PS2
            text = text[2:]
        search = _SEARCH.match(rows[y_end])  # the search prompt replaces the whole row, prompt included
        if search:
            text = rows[y_end][search.end():].rstrip()
        return text[:_MAX_LINE]

    def line_done(self) -> None:
        self.start = None
