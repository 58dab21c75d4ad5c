"""Searchable text of a finished session: commands, output lines and file-transfer paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from sessions.commands import CommandEntry, index_commands
from sessions.replay import _Plain as PlainText

__all__ = ["SessionText", "build_session_text"]

MAX_TEXT = 4_000_000  # characters of output indexed per session; bulk data beyond that is not text anyway
MAX_EXAMINED = 16 << 20  # output bytes looked at per session: a 256 MiB `cat` is not read as text
MAX_LINE = 1000


@dataclass
class SessionText:
    """What ``sessions search`` can find in one session."""

    commands: list[CommandEntry] = field(default_factory=list)
    lines: list[tuple[float, int, str]] = field(default_factory=list)  # (offset, channel, text)
    transfers: list[tuple[float, int, str]] = field(default_factory=list)  # (offset, channel, "get /path")
    truncated: bool = False


def build_session_text(read: Callable[[], Iterable[Any]]) -> SessionText:
    """Index a recording. ``read()`` must return a fresh iterator of frames each call (two passes).

    Protocol channels (the sftp subsystem, legacy scp served by the broker) contribute their transfer
    paths, not their bytes.
    """
    out = SessionText(commands=index_commands(read()))
    plains: dict[int, PlainText] = {}
    partial: dict[int, str] = {}
    protocol: set[int] = set()
    used = examined = 0
    for frame in read():
        kind = frame.kind
        if kind == "subsystem" or (kind == "exec" and frame.event().get("served_by")):
            protocol.add(frame.channel)  # sftp, or legacy scp served by the broker: file bytes, not terminal text
        elif kind == "file-transfer":
            ev = frame.event()
            out.transfers.append((frame.offset, frame.channel,
                                  f"{ev.get('direction', '?')} {ev.get('path', '?')}"[:MAX_LINE]))
        elif kind in ("output", "stderr") and frame.channel not in protocol and used < MAX_TEXT \
                and examined < MAX_EXAMINED:
            examined += len(frame.payload)
            if examined >= MAX_EXAMINED:
                out.truncated = True
            text = plains.setdefault(frame.channel, PlainText()).feed(frame.payload)
            if text.count("\ufffd") * 4 > len(text) + 4:  # binary data, not terminal text
                continue
            pieces = (partial.pop(frame.channel, "") + text).split("\n")
            partial[frame.channel] = pieces.pop()[-MAX_LINE:]
            for line in pieces:
                line = line.strip()
                if line:
                    out.lines.append((frame.offset, frame.channel, line[:MAX_LINE]))
                    used += len(line)
            if used >= MAX_TEXT:
                out.truncated = True
    for channel, rest in partial.items():
        if rest.strip():
            out.lines.append((0.0, channel, rest.strip()))
    return out
