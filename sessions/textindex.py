"""Searchable text of a finished session: commands, output lines and file-transfer paths."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from sessions.cmd_index import CommandEntry, CommandIndex
from sessions.recording import read_frames
from sessions.replay import _Plain as PlainText

__all__ = ["SessionText", "TextIndex", "build_session_text", "index_recording"]

MAX_TEXT = 4_000_000  # characters of output indexed per session; bulk data beyond that is not text anyway
MAX_EXAMINED = 16 << 20  # output bytes looked at per session: a 256 MiB `cat` is not read as text
MAX_LINE = 1000
SNIFF = 1024  # output bytes of a channel looked at before deciding whether it is terminal text at all


@dataclass
class SessionText:
    """What ``sessions search`` can find in one session."""

    commands: list[CommandEntry] = field(default_factory=list)
    lines: list[tuple[float, int, str]] = field(default_factory=list)  # (offset, channel, text)
    transfers: list[tuple[float, int, str]] = field(default_factory=list)  # (offset, channel, "get /path")
    truncated: bool = False


def _looks_binary(head: bytes) -> bool:
    """Clearly not terminal text: NUL bytes, or invalid UTF-8 for a quarter of the characters or more.

    A stray NUL, or legacy 8-bit text (Latin-1 umlauts in a device's log), still counts as text.
    """
    if head.count(0) >= 2:
        return True
    text = head.decode("utf-8", "replace")
    return text.count("\ufffd") * 4 > len(text) + 4


class TextIndex:
    """Builds a :class:`SessionText` in one pass: ``feed`` every frame in order, then ``finish``.

    ``wants(channel, kind)`` tells a reader which data frames still matter (``read_frames(want_data=...)``);
    frames it does not want may be left out, which changes nothing in the result.
    """

    def __init__(self) -> None:
        self._commands = CommandIndex()
        self._out = SessionText()
        self._plains: dict[int, PlainText] = {}
        self._partial: dict[int, str] = {}
        self._protocol: set[int] = set()  # sftp, or legacy scp served by the broker: file bytes, not terminal text
        self._binary: set[int] = set()  # channels whose first output was clearly not text
        self._heads: dict[int, list[tuple[float, bytes]]] = {}  # output held back until SNIFF bytes are seen
        self._head_bytes: dict[int, int] = {}
        self._sniffed: set[int] = set()
        self._used = self._examined = 0

    def _wants_text(self, channel: int) -> bool:
        return channel not in self._protocol and channel not in self._binary and self._used < MAX_TEXT \
            and self._examined < MAX_EXAMINED

    def wants(self, channel: int, kind: str) -> bool:
        """For ``read_frames(want_data=...)``: the data frames the command index or the text still needs."""
        return self._commands.wants(channel, kind) or (kind != "input" and self._wants_text(channel))

    def feed(self, frame: Any) -> None:
        """Take the next frame (a ``sessions.recording.Frame``-like object), in recording order."""
        self._commands.feed(frame)
        kind = frame.kind
        if kind == "subsystem" or (kind == "exec" and frame.event().get("served_by")):
            self._protocol.add(frame.channel)
        elif kind == "file-transfer":
            ev = frame.event()
            self._out.transfers.append((frame.offset, frame.channel,
                                        f"{ev.get('direction', '?')} {ev.get('path', '?')}"[:MAX_LINE]))
        elif kind in ("output", "stderr") and self._wants_text(frame.channel):
            if frame.channel in self._sniffed:
                self._text(frame.channel, frame.offset, frame.payload)
                return
            self._heads.setdefault(frame.channel, []).append((frame.offset, frame.payload))
            self._head_bytes[frame.channel] = self._head_bytes.get(frame.channel, 0) + len(frame.payload)
            if self._head_bytes[frame.channel] >= SNIFF:
                self._decide(frame.channel)

    def _decide(self, channel: int) -> None:
        """Text or binary, from the first SNIFF bytes; text goes on to the line index as it came."""
        head = self._heads.pop(channel)
        del self._head_bytes[channel]
        self._sniffed.add(channel)
        if _looks_binary(b"".join(p for _, p in head)[:SNIFF]):
            self._binary.add(channel)
            return
        for offset, payload in head:
            if self._wants_text(channel):
                self._text(channel, offset, payload)

    def _text(self, channel: int, offset: float, payload: bytes) -> None:
        out = self._out
        self._examined += len(payload)
        if self._examined >= MAX_EXAMINED:
            out.truncated = True
        text = self._plains.setdefault(channel, PlainText()).feed(payload)
        if text.count("\ufffd") * 4 > len(text) + 4:  # binary data, not terminal text
            return
        pieces = (self._partial.pop(channel, "") + text).split("\n")
        self._partial[channel] = pieces.pop()[-MAX_LINE:]
        for line in pieces:
            line = line.strip()
            if line:
                out.lines.append((offset, channel, line[:MAX_LINE]))
                self._used += len(line)
        if self._used >= MAX_TEXT:
            out.truncated = True

    def finish(self) -> SessionText:
        """The index; call once, after the last frame."""
        for channel in list(self._heads):  # channels that printed less than SNIFF bytes in all
            self._decide(channel)
        for channel, rest in self._partial.items():
            if rest.strip():
                self._out.lines.append((0.0, channel, rest.strip()))
        self._out.commands = self._commands.result()
        return self._out


def build_session_text(read: Callable[[], Iterable[Any]]) -> SessionText:
    """Index frames in one pass. ``read()`` is called once and returns the frames in recording order.

    Protocol channels (the sftp subsystem, legacy scp served by the broker) contribute their transfer
    paths, not their bytes; a channel whose first KiB of output is clearly binary contributes no lines.
    """
    builder = TextIndex()
    for frame in read():
        builder.feed(frame)
    return builder.finish()


def index_recording(path: str | os.PathLike[str], key_lookup: Callable[[str], bytes] | None = None) -> SessionText:
    """Index a closed recording in one pass, leaving unread the data frames nothing needs any more.

    Damaged frames are skipped (``strict=False``). Once the text caps are reached, or a channel turned
    out binary, its output is not decrypted unless the command index needs it (PTY channels).

    :param key_lookup: key id → 32-byte key, for encrypted recordings
    :raises RecordingError: unreadable, not a recording, or encrypted without the right key
    :raises OSError: the file vanished while being read
    """
    builder = TextIndex()
    for frame in read_frames(path, key_lookup=key_lookup, strict=False, want_data=builder.wants):
        builder.feed(frame)
    return builder.finish()
