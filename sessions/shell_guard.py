"""Each command line of an interactive shell is judged before the device runs it.

With a PTY (:class:`ShellLineGuard`) the line is read off a live terminal emulator at the vendor's Enter
(sessions/shell_lines.py), because keystrokes lie (editing, history, completion); without a PTY
(:class:`PipedLineGuard`: ``ssh -T host < script``, ``bash`` reading a pipe) the input lines are the
commands. The judge is sessions/cmd_judge.py's (lexical check, then the device's realpath).
docs/data-protection.md, "Commands resolved like files".
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Awaitable, Callable

from sessions.cmd_lines import closed_for_judging, incomplete, strip_heredocs
from sessions.tasks import TaskSet, watch

__all__ = ["ShellLineGuard", "PipedLineGuard", "typed_text", "ECHO_IDLE_S", "ECHO_MAX_S", "PASTE_MAX", "LINE_MAX"]

log = logging.getLogger("medbroker.shell_guard")

JUDGE_TIMEOUT_S = 10.0
ECHO_IDLE_S = 0.015  # the device's echo of the keys before an Enter has settled when it was quiet this long
ECHO_MAX_S = 0.3
DRAW_IDLE_S = 0.05  # the screen is drawn once the device's output paused this long
PASTE_MAX = 64 << 10
LINE_MAX = 64 << 10
_PASTE_START, _PASTE_END = b"\x1b[200~", b"\x1b[201~"
_PASTE_ON, _PASTE_OFF = b"\x1b[?2004h", b"\x1b[?2004l"
_CUTS = re.compile(rb"[\r\n\x0f]|" + re.escape(_PASTE_START))  # the first of them: where a line may end
_INTERRUPT = b"\x03"  # Ctrl-C: the shell drops the line (and any here-doc or continuation) and prompts again


QUEUE_MAX = 256 << 10  # vendor input held while a line is judged before the vendor side is paused


async def _none() -> None:
    return None


class _Guard:
    """What both guards share: a queue of vendor input held while a line is judged, EOF kept in order."""

    def __init__(self, judge: Callable[[str], Awaitable[str | None]], send: Callable[[bytes], None],
                 send_eof: Callable[[], None], refused: Callable[[str, str], None], timeout: float,
                 hold_input: Callable[[bool], None] | None = None) -> None:
        self._judge, self._send, self._send_eof, self._refused, self._timeout = judge, send, send_eof, refused, timeout
        self._busy = False
        self._queue = bytearray()
        self._eof = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._tasks = TaskSet(log)  # lines judged as they run: kept until they end, a failure logged
        self._closed = False
        self._pending = ""  # lines of a command the shell is still reading (open quote, here-doc, for ... do)
        self._allowed: str | None = None  # the text last allowed (a here-doc body line does not change it)
        self._hold_input = hold_input
        self.judged: list[float] = []  # seconds each judged line was held before it went on (measured)

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        drawing = getattr(self, "_drawing", None)
        if drawing is not None:
            drawing.cancel()

    def vendor_data(self, data: bytes) -> None:
        if self._busy:
            self._queue += data
            if len(self._queue) > QUEUE_MAX and self._hold_input is not None:
                self._hold_input(True)  # flow control: the vendor waits, memory stays bounded
            return
        self._process(bytes(data))

    def vendor_eof(self) -> None:
        self._eof = True
        if not self._busy:
            self._at_eof()

    def device_output(self, data: bytes) -> None:
        pass

    def resize(self, cols: int, rows: int) -> None:
        pass

    def _forward(self, data: bytes) -> None:
        if data and not self._closed:
            self._send(data)

    def _hold(self, coro, rest: bytes) -> None:
        """Judge asynchronously; input (and EOF) that arrives meanwhile waits behind it."""
        self._busy = True
        self._queue = bytearray(rest)
        self._task = watch(self._loop.create_task(coro), log, "judging a command line")

    async def _verdict(self, line: str) -> str | None:
        try:
            return await asyncio.wait_for(self._judge(line), self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # fail closed: a line the broker could not check is not run
            return (f"medbroker could not check this command line on the device "
                    f"({type(exc).__name__}: {exc or 'no answer'}); it was not run")

    async def _judge_lines(self, lines: list[str]) -> tuple[str, str | None]:
        """Judge the line(s) just ended (screen and keys for a PTY), each with the earlier lines of a command
        the shell is still reading. Returns (what was judged, refusal or None); keeps the pending lines."""
        composed = list(dict.fromkeys(f"{self._pending}\n{t}" if self._pending else t for t in lines if t.strip()))
        if not composed:
            return "", None
        texts = [closed_for_judging(text) for text in composed]
        # A here-document body line leaves the command unchanged: judged once, not again for every line.
        reasons = await asyncio.gather(*(self._verdict(t) if t != self._allowed else _none() for t in texts))
        for text, reason in zip(composed, reasons):
            if reason:
                self._pending, self._allowed = "", None
                return text, reason
        self._allowed = texts[0]
        self._pending = strip_heredocs(composed[0])[0] if incomplete(composed[0]) else ""
        if len(self._pending) > LINE_MAX:
            self._pending = ""
            return composed[0][:200], f"a command longer than {LINE_MAX // 1024} KiB cannot be checked"
        return composed[0], None

    def _resume(self, rest: bytes) -> None:
        self._queue.clear()
        self._busy = False
        self._task = None
        if self._hold_input is not None:
            self._hold_input(False)
        if rest:
            self._process(rest)
        if self._eof and not self._busy:
            self._at_eof()

    def _process(self, data: bytes) -> None:
        raise NotImplementedError

    def _at_eof(self) -> None:
        if not self._closed:
            self._send_eof()


class ShellLineGuard(_Guard):
    """A PTY shell: ordinary keys go straight through; at Enter (CR or LF from the vendor) the line is read
    off the live screen and judged while further input waits, in order. Allowed: the Enter is sent.
    Refused: the Enter is not sent, ``refused(line, reason)`` tells the vendor and the audit, Ctrl-C clears
    the line on the device, typeahead is dropped. A bracketed paste that holds a newline is judged line by
    line before any of it is sent.

    :param screen: a ``sessions.shell_lines.LiveScreen``, fed here with the device's output
    :param judge: ``await judge(line) -> refusal or None``; raising or not answering in ``timeout`` refuses
    :param send: writes bytes to the device's channel; ``send_eof`` sends EOF there
    :param refused: ``refused(line, reason)``
    :param end: ``end(reason)`` ends the session: a line ran without an Enter the guard saw (a key bound to
        accept-line; bash >= 5.1 says so by turning bracketed paste off) and was refused as it ran
    :param pause: ``pause(True/False)`` stops/resumes reading the device while such a line is judged
    """

    def __init__(self, screen, judge: Callable[[str], Awaitable[str | None]], send: Callable[[bytes], None],
                 send_eof: Callable[[], None], refused: Callable[[str, str], None], *,
                 end: Callable[[str], None] | None = None, pause: Callable[[bool], None] | None = None,
                 hold_input: Callable[[bool], None] | None = None, timeout: float = JUDGE_TIMEOUT_S) -> None:
        super().__init__(judge, send, send_eof, refused, timeout, hold_input)
        self.screen = screen
        self._end, self._pause = end, pause
        self._armed = False  # an Enter (or Ctrl-C/Ctrl-D) went to the shell since its last prompt
        self._drawing: asyncio.TimerHandle | None = None
        self._tail = b""
        self._paste: bytearray | None = None
        self._last_output = self._last_sent = -1.0
        self._typed = bytearray()  # keys sent since the line began: judged too, in case the screen does not show them

    def device_output(self, data: bytes) -> None:
        self._last_output = self._loop.time()
        seen = self._tail + data
        self._tail = seen[-8:]
        ran = seen.rfind(_PASTE_OFF)
        if ran >= 0 and seen.rfind(_PASTE_ON) < ran and not self._armed and self.screen.start is not None:
            # bash (>= 5.1) turns bracketed paste off when it runs a line: this one ran without an Enter the
            # guard judged (a key bound to accept-line). Judge it as it runs; a hit ends the session.
            self.screen.output(data[:max(0, len(data) - (len(seen) - ran))])
            line = self.screen.line()
            self.screen.line_done()
            self._typed.clear()
            self._armed = True
            if self._pause is not None:  # no more of its output until it is judged
                self._pause(True)
            self._tasks.spawn(self._judge_ran(line), "judging a command line that ran")
        elif seen.rfind(_PASTE_ON) > ran:
            self._armed = False
        self.screen.output(data)
        if self._drawing is None:  # draw when the output pauses, so the next keystroke rarely has to
            self._drawing = self._loop.call_later(DRAW_IDLE_S, self._draw)

    def _draw(self) -> None:
        if self._closed:
            return
        if self._loop.time() - self._last_output < DRAW_IDLE_S:
            self._drawing = self._loop.call_later(DRAW_IDLE_S, self._draw)
            return
        self._drawing = None
        self.screen.settle()

    async def _judge_ran(self, line: str) -> None:
        judged, reason = await self._judge_lines([line])
        if reason and not self._closed:
            self._refused(judged, reason)
            if self._end is not None:
                self._end(reason)
                return
        if self._pause is not None:
            self._pause(False)

    def resize(self, cols: int, rows: int) -> None:
        self.screen.resize(cols, rows)

    def _forward(self, data: bytes) -> None:
        if data and not self._closed:
            self._last_sent = self._loop.time()
            self._send(data)

    def _process(self, data: bytes) -> None:
        while data and not self._closed:
            if self._paste is not None:
                end = data.find(_PASTE_END)
                self._paste += data if end < 0 else data[:end + len(_PASTE_END)]
                if end < 0 and len(self._paste) <= PASTE_MAX:
                    return
                paste, self._paste = bytes(self._paste), None
                data = b"" if end < 0 else data[end + len(_PASTE_END):]
                body = paste[len(_PASTE_START):]
                body = body[:-len(_PASTE_END)] if body.endswith(_PASTE_END) else body
                if b"\r" in body or b"\n" in body or len(paste) > PASTE_MAX:
                    self._hold(self._judge_paste(paste, body), data)
                    return
                self._forward(paste)
                continue
            cut = _CUTS.search(data)  # CR, LF and Ctrl-O (readline's operate-and-get-next) run the line
            if cut is None:
                self._key(data)
                return
            i = cut.start()
            if i:
                self._key(data[:i])
            if data.startswith(_PASTE_START, i):
                self.screen.keystroke()
                self._paste = bytearray()
                data = data[i:]
                continue
            n = 2 if data[i:i + 2] == b"\r\n" else 1
            enter, rest = data[i:i + n], data[i + n:]
            if self.screen.start is None or not self.screen.reading_command():
                self._line_done()  # nothing typed, or a full-screen program / a command reading input
                self._armed = True
                self._forward(enter)
                data = rest
                continue
            self._hold(self._enter(enter), rest)
            return

    def _key(self, data: bytes) -> None:
        # Sent first: the screen work below cannot see the key's echo before this callback returns, so drawing
        # after sending marks the same line start and keeps pyte off the keystroke's round trip.
        self._forward(data)
        self.screen.keystroke()
        if len(self._typed) < LINE_MAX:
            self._typed += data
        if b"\x04" in data:  # on an empty line the shell exits
            self._armed = True
        if b"\x03" in data:  # the shell drops the line, and a command it was still reading
            self._armed = True
            self._pending = ""
            self._line_done()

    def _line_done(self) -> None:
        self.screen.line_done()
        self._typed.clear()

    async def _settled(self) -> None:
        """Wait (briefly) until the device echoed the keys sent so far, so the screen shows the whole line."""
        deadline = self._loop.time() + ECHO_MAX_S
        while self._loop.time() < deadline:
            if self._last_output >= self._last_sent and self._loop.time() - self._last_output >= ECHO_IDLE_S:
                return
            await asyncio.sleep(ECHO_IDLE_S / 2)

    async def _enter(self, enter: bytes) -> None:
        began = self._loop.time()
        await self._settled()
        line, typed = self.screen.line(), typed_text(bytes(self._typed))
        # The screen shows what the shell will run (editing, history, completion); the keys count too, for a
        # shell that does not echo them (stty -echo) or echoes them late.
        # A single typed word without a slash names no path (it would be a command name): not sent to the
        # device's realpath, so a password typed at a prompt that does not echo is not either.
        if not any(c in typed.strip() for c in " \t/"):
            typed = ""
        judged, reason = await self._judge_lines([line, typed])
        self.judged.append(self._loop.time() - began)
        self._line_done()
        self._finish(enter, judged or line, reason)

    async def _judge_paste(self, paste: bytes, body: bytes) -> None:
        await self._settled()
        prefix = self.screen.line() if self.screen.start is not None else ""
        reason, shown = None, ""
        if len(paste) > PASTE_MAX:
            reason = f"a paste of more than {PASTE_MAX // 1024} KiB cannot be checked; paste less at a time"
        text = (prefix + body.decode("utf-8", "replace")).replace("\r\n", "\n").replace("\r", "\n")
        pending = self._pending
        for line in text.split("\n"):
            if reason is None:
                shown, reason = await self._judge_lines([line])
        if reason is None:  # the pasted text stays in the shell's buffer until Enter: that Enter judges it again
            self._pending = pending
        self._finish(paste, shown, reason)

    def _finish(self, allowed: bytes, line: str, reason: str | None) -> None:
        if self._closed:
            return
        self._armed = True
        if reason is None:
            self._forward(allowed)
            self._resume(bytes(self._queue))
            return
        self._line_done()
        self._refused(line, reason)  # first, so the shell's fresh prompt comes after the reason
        self._forward(_INTERRUPT)
        self._resume(b"")  # typeahead was typed on the assumption that the refused line ran


def typed_text(keys: bytes) -> str:
    """The line a plain terminal would hold after ``keys``: backspace, Ctrl-U and Ctrl-W applied, escape
    sequences (arrows, function keys) and other control characters left out."""
    out: list[str] = []
    text = keys.decode("utf-8", "replace")
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\x7f\x08":
            if out:
                out.pop()
        elif c == "\x15":
            out.clear()
        elif c == "\x17":
            while out and out[-1] == " ":
                out.pop()
            while out and out[-1] != " ":
                out.pop()
        elif c == "\x1b":
            j = i + 1
            if j < len(text) and text[j] in "[O":
                j += 1
                while j < len(text) and not ("@" <= text[j] <= "~"):
                    j += 1
            i = j + 1
            continue
        elif c >= " " or c == "\t":
            out.append(c)
        i += 1
    return "".join(out)


class PipedLineGuard(_Guard):
    """A shell without a PTY reads its commands from the vendor's input: each line is judged before it is
    sent; a refused line is not sent (the vendor reads why on stderr) and the next one is judged in turn.
    A line the broker cannot hold (over LINE_MAX bytes) is refused."""

    def __init__(self, judge: Callable[[str], Awaitable[str | None]], send: Callable[[bytes], None],
                 send_eof: Callable[[], None], refused: Callable[[str, str], None], *,
                 hold_input: Callable[[bool], None] | None = None, timeout: float = JUDGE_TIMEOUT_S) -> None:
        super().__init__(judge, send, send_eof, refused, timeout, hold_input)
        self._line = bytearray()

    def _process(self, data: bytes) -> None:
        while data and not self._closed:
            cut = data.find(b"\n")
            if cut < 0:
                self._line += data
                if len(self._line) > LINE_MAX:
                    self._line.clear()
                    self._refused("", f"a command line longer than {LINE_MAX // 1024} KiB cannot be checked")
                return
            line, data = bytes(self._line) + data[:cut + 1], data[cut + 1:]
            self._line.clear()
            self._hold(self._judge_line(line), data)
            return

    def _at_eof(self) -> None:
        if self._line:  # a last line without a newline is a command too
            line = bytes(self._line)
            self._line.clear()
            self._hold(self._judge_line(line), b"")
            return
        super()._at_eof()

    async def _judge_line(self, line: bytes) -> None:
        began = self._loop.time()
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        judged, reason = await self._judge_lines([text])
        self.judged.append(self._loop.time() - began)
        if self._closed:
            return
        if reason is None:
            self._forward(line)
        else:
            self._refused(judged, reason)
        self._resume(bytes(self._queue))
