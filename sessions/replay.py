"""Replay and export of recorded sessions: timed terminal playback, asciicast v2, text transcript, JSON."""

from __future__ import annotations

import base64
import codecs
import json
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from medcore.clock import parse_utc, utc_iso
from medcore.errors import UsageError
from sessions.termguard import TerminalGuard

__all__ = ["FrameLike", "ReplayStats", "replay", "to_asciicast", "to_text", "to_json", "verification_summary",
           "notice_bytes", "TerminalGuard"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_DATA = ("input", "output", "stderr")
_MARKED = ("notice", "policy-denial", "alert", "exec", "file-transfer")
_PREVIEW = 256


class FrameLike(Protocol):
    """What exports need of a frame (``sessions.recording.Frame`` fits); read-only, so frozen frames fit."""

    @property
    def seq(self) -> int: ...
    @property
    def mono_ns(self) -> int: ...
    @property
    def wall_us(self) -> int: ...
    @property
    def channel(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def hash(self) -> str: ...


@dataclass(frozen=True)
class ReplayStats:
    """What :func:`replay` did: frames and bytes written, seconds slept, recorded seconds covered."""

    frames: int
    bytes_written: int
    slept: float
    recorded_seconds: float


def _parsed(frame: FrameLike) -> dict[str, Any] | None:
    """The event object of a frame, or None for data frames and payloads that are not a JSON object."""
    if frame.kind in _DATA:
        return None
    try:
        value = json.loads(frame.payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _event(frame: FrameLike) -> dict[str, Any]:
    return _parsed(frame) or {}


class _Channels:
    """Which channels are terminals: not subsystems (sftp packets) nor scp/rsync protocol streams."""

    def __init__(self, only: Collection[int] | None) -> None:
        self.only = None if only is None else set(only)
        self.protocol: set[int] = set()

    def observe(self, frame: FrameLike, event: dict[str, Any]) -> None:
        if frame.kind == "subsystem" or (frame.kind == "channel-open" and event.get("type") == "direct-tcpip"):
            self.protocol.add(frame.channel)  # a port forward's bytes are a TCP stream, not a terminal
        elif frame.kind == "exec":
            words = str(event.get("command", "")).split(maxsplit=1)
            if words and words[0].rsplit("/", 1)[-1] in ("scp", "rsync", "sftp-server"):
                self.protocol.add(frame.channel)

    def shows(self, channel: int) -> bool:
        return channel in self.only if self.only is not None else channel not in self.protocol


def forward_marker(kind: str, event: dict[str, Any]) -> str | None:
    """A port forward's opening or end as one line (issue 14), or None for any other frame."""
    if kind == "channel-open" and event.get("type") == "direct-tcpip":
        return f"forward to port {event.get('port', '?')} opened ({event.get('host', '?')}:{event.get('port', '?')}" \
               f" from {event.get('origin', '?')})"
    if kind == "channel-close" and "port" in event:
        content = "TLS, sizes only" if event.get("tls") else "plain text recorded"
        return (f"forward to port {event.get('port')} closed: {event.get('bytes_to_device', '?')} bytes to the device, "
                f"{event.get('bytes_to_vendor', '?')} to the vendor ({content}); {event.get('reason', '')}")
    return None


def notice_bytes(event: dict[str, Any]) -> bytes:
    """How the relay showed a broker ``notice`` on the vendor's terminal (``medbroker: TEXT`` on its own line)."""
    return f"\r\nmedbroker: {event.get('text', '')}\r\n".encode()


def replay(frames: Iterable[FrameLike], write: Callable[[bytes], None], *, speed: float = 1.0,
           max_idle: float | None = None, start_at: float = 0.0, instant: bool = False,
           sleep: Callable[[float], None] = time.sleep, channels: Collection[int] | None = None,
           raw: bool = False) -> ReplayStats:
    """Play a session's terminal (output, stderr and broker notices) with its recorded timing.

    Pauses between frames are the recorded gaps, each clamped to ``max_idle`` then divided by ``speed``.
    Everything before ``start_at`` seconds is written at once (the screen state stays right), and timing
    resumes from there. Subsystem (SFTP) and scp/rsync channels are left out unless named in ``channels``.

    :param write: receives terminal bytes (flush it yourself)
    :param raw: write the recorded bytes unchanged; by default :class:`TerminalGuard` drops what would make the
        analyst's terminal act (clipboard writes, hyperlinks, titles, reports), keeping what draws the screen
    :param sleep: injectable for tests
    :returns: frames and bytes written, seconds slept, recorded seconds covered
    :raises UsageError: ``speed`` not positive, ``max_idle`` or ``start_at`` negative
    """
    if not speed > 0:
        raise UsageError(f"replay speed must be positive, got {speed}", "try --speed 1 or --speed 4")
    if (max_idle is not None and max_idle < 0) or start_at < 0:
        raise UsageError("--max-idle and --from must not be negative")
    term = _Channels(channels)
    guards: dict[int, TerminalGuard] = {}
    shown = start_at
    count = written = 0
    slept = last = 0.0
    for frame in frames:
        event = _event(frame)
        term.observe(frame, event)
        marker = forward_marker(frame.kind, event) if term.only is None else None
        if frame.kind in ("output", "stderr") and term.shows(frame.channel):
            data = frame.payload
        elif frame.kind == "notice" and term.shows(frame.channel):
            data = notice_bytes(event)
        elif marker is not None:  # forwards are not terminals: one line each when they open and close
            data = f"\r\n[medbroker {marker}]\r\n".encode()
        else:
            continue
        if not raw and frame.channel not in term.protocol:  # a protocol channel named in ``channels`` is a
            # binary stream asked for by number (for a pipe), not a terminal
            data = guards.setdefault(frame.channel, TerminalGuard()).feed(data) \
                if frame.kind not in ("notice", "channel-open", "channel-close") else TerminalGuard().feed(data)
            if not data:
                continue
        t = frame.mono_ns / 1e9
        if not instant and t > shown:
            gap = t - shown if max_idle is None else min(t - shown, max_idle)
            if gap > 0:
                sleep(gap / speed)
                slept += gap / speed
        shown = max(shown, t)
        last = max(last, t)
        write(data)
        count += 1
        written += len(data)
    return ReplayStats(frames=count, bytes_written=written, slept=slept, recorded_seconds=max(0.0, last - start_at))


def verification_summary(result: Any) -> str:
    """One line on a :class:`VerifyResult` (or None): ``verified``, ``verified, incomplete``, ``FAILED: …``."""
    if result is None:
        return "not verified"
    if not result.ok:
        problems = list(result.problems)
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"FAILED: {problems[0] if problems else 'unknown problem'}{more}"
    state = "verified, incomplete" if result.incomplete else "verified"
    return f"{state} ({result.frames} frames, final hash {result.final_hash[:16]}…)"


def _verification_dict(result: Any) -> dict[str, Any] | None:
    if result is None:
        return None
    return {"ok": result.ok, "frames": result.frames, "final_hash": result.final_hash,
            "incomplete": result.incomplete, "problems": list(result.problems),
            "notes": list(getattr(result, "notes", ())), "summary": verification_summary(result)}


def _summary(kind: str, ev: dict[str, Any]) -> str:
    """A short human label for an event frame."""
    get = ev.get
    if kind == "exec":
        return str(get("command", ""))
    if kind == "pty":
        return f"{get('term', '?')} {get('cols', '?')}x{get('rows', '?')}"
    if kind == "resize":
        return f"{get('cols', '?')}x{get('rows', '?')}"
    if kind == "subsystem":
        return str(get("name", ""))
    if kind == "env":
        return f"{get('name', '?')}={get('value', '')}"
    if kind == "notice":
        return str(get("text", "")).strip()
    if kind == "file-transfer":
        return f"{get('direction', '?')} {get('path', '?')} ({get('bytes', '?')} bytes, sha256 {get('sha256', '?')})"
    if kind == "policy-denial":
        what = " ".join(str(get(k)) for k in ("op", "path") if get(k) is not None)
        return f"{what}: {get('reason', '')}" if what else str(get("reason", ""))
    if kind == "exit":
        if get("signal") is not None:
            return f"signal {get('signal')}" + (" (core dumped)" if get("core_dumped") else "")
        return f"status {get('status')}"
    if kind == "end":
        return str(get("reason", ""))
    return json.dumps(ev, separators=(",", ":"), ensure_ascii=False) if ev else ""


def _marker(kind: str, ev: dict[str, Any]) -> str:
    labels = {"policy-denial": "denied", "file-transfer": "transfer"}
    return f"{labels.get(kind, kind)}: {_summary(kind, ev)}"


def _started_epoch(header: dict[str, Any], first_wall_us: int | None) -> int | None:
    started = header.get("started_at")
    if isinstance(started, str):
        try:
            return int(parse_utc(started).timestamp())
        except ValueError:
            pass
    return None if first_wall_us is None else first_wall_us // 1_000_000


def to_asciicast(frames: Iterable[FrameLike], *, header: dict[str, Any], verify_result: Any = None,
                 channels: Collection[int] | None = None, raw: bool = False) -> str:
    """Render an asciicast v2 file: ``o`` output/stderr/notices, ``i`` input, ``r`` resizes, ``m`` markers.

    Output passes :class:`TerminalGuard` (players write it to a terminal) unless ``raw``; the JSON export and
    the recording keep every byte.

    Markers label notices, policy denials, alerts, exec commands and file transfers. Size comes from the
    first pty/resize frame (default 80x24). The verification status goes in the title and in
    ``env.MEDBROKER_VERIFICATION``. Bytes are decoded with one incremental UTF-8 decoder per channel and
    stream, so characters split across frames survive.

    :param header: the recording header (session_id, user, device, started_at)
    :param verify_result: a ``VerifyResult`` or None
    """
    term = _Channels(channels)
    size: tuple[int, int] | None = None
    term_type = "xterm-256color"
    decoders: dict[tuple[int, str], Any] = {}
    guards: dict[int, TerminalGuard] = {}
    events: list[list[Any]] = []
    first_wall = None
    t = 0.0
    for frame in frames:
        first_wall = frame.wall_us if first_wall is None else first_wall
        t = max(t, round(frame.mono_ns / 1e9, 6))  # players need non-decreasing times, even if damaged
        ev = _event(frame)
        term.observe(frame, ev)
        kind, shows = frame.kind, term.shows(frame.channel)
        if kind in _DATA:
            if not shows:
                continue
            code = "i" if kind == "input" else "o"
            dec = decoders.setdefault((frame.channel, code), codecs.getincrementaldecoder("utf-8")("replace"))
            payload = frame.payload if code == "i" or raw else \
                guards.setdefault(frame.channel, TerminalGuard()).feed(frame.payload)
            text = dec.decode(payload)
            if text:
                events.append([t, code, text])
        elif kind in ("pty", "resize") and shows:
            cols, rows = ev.get("cols"), ev.get("rows")
            if isinstance(cols, int) and isinstance(rows, int) and cols > 0 and rows > 0:
                if size is None:
                    size = (cols, rows)
                if kind == "resize":
                    events.append([t, "r", f"{cols}x{rows}"])
            if kind == "pty" and isinstance(ev.get("term"), str):
                term_type = ev["term"]
        if kind == "notice" and shows:
            notice = notice_bytes(ev) if raw else TerminalGuard().feed(notice_bytes(ev))
            events.append([t, "o", notice.decode("utf-8", "replace")])
        if kind in _MARKED:
            events.append([t, "m", _marker(kind, ev)])
        elif forward_marker(kind, ev):
            events.append([t, "m", forward_marker(kind, ev)])
    for (_, code), dec in decoders.items():
        tail = dec.decode(b"", final=True)
        if tail:
            events.append([t, code, tail])
    status = verification_summary(verify_result)
    who = f"{header.get('user', '?')}@{header.get('device', '?')}"
    head: dict[str, Any] = {"version": 2, "width": (size or (80, 24))[0], "height": (size or (80, 24))[1]}
    stamp = _started_epoch(header, first_wall)
    if stamp is not None:
        head["timestamp"] = stamp
    head["title"] = f"medbroker session {header.get('session_id', '?')} {who} [{status}]"
    head["env"] = {"TERM": term_type, "MEDBROKER_SESSION": str(header.get("session_id", "")),
                   "MEDBROKER_VERIFICATION": status}
    lines = [_json_line(head)]
    lines += (_json_line(e) for e in events)
    return "\n".join(lines) + "\n"


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(value: Any) -> str:
    """Compact UTF-8 JSON that stays on one line for every line splitter (NEL, LS, PS escaped)."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_BREAKS)


# CSI, OSC (BEL or ST), DCS/SOS/PM/APC strings, two-byte escapes, 8-bit CSI.
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[PX^_][^\x1b]*\x1b\\"
                     r"|\x1b[ -/]*[0-~]|\x9b[0-?]*[ -/]*[@-~]")
# A sequence cut off by the end of a chunk: kept for the next one.
_PARTIAL = re.compile(r"(?:\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[PX^_][^\x1b]*\x1b?|[ -/]*)|\x9b[0-?]*[ -/]*)\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BACKSPACED = re.compile(r"[^\n\x08]\x08")


class _Plain:
    """Streaming terminal-to-text: strips escape sequences (also split across chunks) and controls."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.carry = ""

    def feed(self, data: bytes, final: bool = False) -> str:
        text = self.carry + self.decoder.decode(data, final=final)
        self.carry = ""
        partial = None if final else _PARTIAL.search(text)
        if partial is not None and len(text) - partial.start() < 4096:
            text, self.carry = text[:partial.start()], text[partial.start():]
        text = _ESCAPE.sub("", text)
        for _ in range(64):  # apply backspaces (bounded: pathological input just keeps a few)
            text, n = _BACKSPACED.subn("", text)
            if not n:
                break
        return _CONTROL.sub("", text.replace("\r", ""))


def _offset(mono_ns: int) -> str:
    tenths = max(0, mono_ns) // 100_000_000
    seconds, tenth = divmod(tenths, 10)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{hour:02d}:{minute:02d}:{second:02d}.{tenth}"


def to_text(frames: Iterable[FrameLike], *, header: dict[str, Any] | None = None, verify_result: Any = None,
            channels: Collection[int] | None = None) -> str:
    """A plain transcript: terminal output without escape sequences, plus ``[HH:MM:SS.d kind] …`` event lines.

    The first line names the session and its verification status. Input is not repeated (a terminal
    echoes it); protocol channels (SFTP, scp) show only their events.
    """
    header = header or {}
    out = [f"# medbroker session {header.get('session_id', '?')} {header.get('user', '?')}@"
           f"{header.get('device', '?')} started {header.get('started_at', '?')}; "
           f"recording {verification_summary(verify_result)}\n"]
    term = _Channels(channels)
    plains: dict[int, _Plain] = {}
    at_line_start = True

    def put(text: str) -> None:
        nonlocal at_line_start
        if text:
            out.append(text)
            at_line_start = text.endswith("\n")

    for frame in frames:
        ev = _event(frame)
        term.observe(frame, ev)
        if frame.kind in ("output", "stderr"):
            if term.shows(frame.channel):
                put(plains.setdefault(frame.channel, _Plain()).feed(frame.payload))
        elif frame.kind == "forward-bytes" or (frame.kind == "eof" and frame.channel in term.protocol):
            continue  # a TLS forward's sizes: its channel-close line has the totals
        elif frame.kind != "input":
            summary = forward_marker(frame.kind, ev) or _summary(frame.kind, ev)
            line = f"[{_offset(frame.mono_ns)} {frame.kind}] {summary}".rstrip()
            put(("" if at_line_start else "\n") + line + "\n")
    for plain in plains.values():
        put(plain.feed(b"", final=True))
    if not at_line_start:
        out.append("\n")
    return "".join(out)


def to_json(frames: Iterable[FrameLike], *, header: dict[str, Any], verify_result: Any = None) -> str:
    """Every frame as JSON, with the header and the verification status.

    Data frames carry ``data_b64`` (exact bytes) and ``text_preview`` (first 256 bytes as UTF-8 with
    replacement); event frames carry ``event`` (the parsed object, or ``data_b64`` if it is not one).
    """
    rows = []
    for frame in frames:
        row: dict[str, Any] = {
            "seq": frame.seq, "channel": frame.channel, "kind": frame.kind, "offset": frame.mono_ns / 1e9,
            "mono_ns": frame.mono_ns, "wall_us": frame.wall_us,
            "at": utc_iso(_EPOCH + timedelta(microseconds=frame.wall_us)), "hash": frame.hash}
        ev = _parsed(frame)
        if ev is not None:
            row["event"] = ev
        else:
            row["data_b64"] = base64.b64encode(frame.payload).decode()
            row["text_preview"] = frame.payload[:_PREVIEW].decode("utf-8", "replace")
        rows.append(row)
    doc = {"format": "medbroker-recording-export", "version": 1, "header": header,
           "verification": _verification_dict(verify_result), "frames": rows}
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"
