"""Legacy scp (``scp -O``: exec ``scp -t`` / ``scp -f``) served by the broker itself over the device's SFTP.

The device never sees the command line: :func:`parse_scp_command` accepts one strict grammar
(``scp -t|-f [-r] [-p] [-d] [-v] [--] PATH``, one path, no globs, no shell syntax, no ``~user``) and
:class:`ScpServer` speaks the SCP protocol to the vendor's client itself (C/D/E/T records parsed from
a buffer, so split or coalesced records are fine), doing every file operation on the device through
an asyncssh SFTP client on the session's upstream connection. Each path is resolved with the
device's own ``realpath`` and judged by :meth:`ProtectedPaths.decide_sftp`, exactly like the SFTP
filter (sessions/sftp.py); files are opened by their canonical path, checked for patient data on
the opened handle before the first byte is sent, scanned per block, and hashed (sha256) as they
pass. Refusals travel in the SCP error record (``\\x01medbroker: reason\\n``), which OpenSSH's scp
prints on the vendor's terminal. docs/data-protection.md explains why this design was chosen over
asyncssh's own (private) SCP server.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncssh

from medcore.errors import BrokerError, PermissionDeniedError
from sessions.policy import HEAD_BYTES, PFLAG_CREAT, PFLAG_READ, PFLAG_TRUNC, PFLAG_WRITE, Decision, OutputScanner, \
    ProtectedPaths, detect_patient_data, normalize_path
from sessions.tasks import watch

__all__ = ["ScpCommand", "ScpCommandError", "ScpProtocolError", "ScpRecord", "ScpServer", "is_scp_command",
           "parse_record", "parse_scp_command", "transfer_server_refusal", "KeptUploads", "KeptFile", "BLOCK"]

log = logging.getLogger("medbroker.scp")

BLOCK = 256 * 1024
"""Bytes read from the device per step of a download (asyncssh splits it into parallel SFTP reads)."""
_MAX_LINE = 4096
_MAX_DEPTH = 64
_INPUT_HIGH = 4 * 1024 * 1024
_UNQUOTED_SYNTAX = set(";&|<>()$`{}!")
_GLOB = set("*?[]")
_FLAG_LETTERS = set("tfrpdv")
_HINT = "or use scp without -O (it speaks SFTP) or sftp (PuTTY: pscp -sftp or psftp)"
_PREFIX = "medbroker: "


class ScpCommandError(PermissionDeniedError):
    """An exec command for the scp server that medbroker will not run; the message says why."""


class ScpProtocolError(BrokerError):
    """The vendor's client broke the SCP protocol (bad record, oversized line, lost data)."""


@dataclass(frozen=True)
class ScpCommand:
    """A parsed ``scp -t``/``scp -f`` command. ``sink``: the vendor uploads (``-t``); else it downloads."""

    sink: bool
    path: bytes
    recursive: bool = False
    preserve: bool = False
    must_be_dir: bool = False


@dataclass(frozen=True)
class ScpRecord:
    """One SCP control record: ``kind`` is C, D, E or T (or 1/2 for an error the client reports)."""

    kind: str
    mode: int = 0
    size: int = 0
    name: bytes = b""
    mtime: int = 0
    atime: int = 0
    message: str = ""


def _naive_words(command: str) -> list[str]:
    return command.replace("'", "").replace('"', "").replace("\\", "").split()


def is_scp_command(command: str) -> bool:
    """True if ``command`` asks for an scp server (``scp`` with ``-t`` or ``-f``), however it is spelled.

    Deliberately wide (``/usr/bin/scp -rf x``, ``'scp' -t .``, ``sh -c 'scp -f x'``): such commands are
    served by :class:`ScpServer` or refused by :func:`parse_scp_command`, never run on the device.
    """
    words = _naive_words(command)
    has_scp = any(posixpath.basename(w) == "scp" for w in words)
    return has_scp and any(w.startswith("-") and w != "--" and set(w[1:]) & {"t", "f"} for w in words)


def transfer_server_refusal(command: str) -> str | None:
    """A refusal for exec commands that start a file-transfer server the guards cannot read, else None.

    ``sftp -s /usr/lib/openssh/sftp-server`` runs the SFTP server as an exec command (bypassing the
    SFTP filter, which only sits on the ``sftp`` subsystem); ``rsync -e ssh`` runs ``rsync --server``,
    whose stream can be compressed so the content check cannot see patient data in it.
    """
    words = _naive_words(command)
    names = {posixpath.basename(w) for w in words}
    if names & {"sftp-server", "internal-sftp"}:
        return ("running the SFTP server as a command (sftp -s) is not available through medbroker; use sftp or "
                "scp without -s, where medbroker checks every file")
    if "rsync" in names and "--server" in words:
        return ("rsync is not available through medbroker: its stream can be compressed, so the patient-data "
                "check cannot read it; use scp or sftp")
    return None


def _split_words(command: str) -> list[tuple[str, bool]]:
    """Split like a POSIX shell, but refuse everything a shell would expand: (word, starts with bare ``~``)."""
    words: list[tuple[str, bool]] = []
    cur: list[str] | None = None
    tilde = False
    i, n = 0, len(command)
    while i < n:
        c = command[i]
        if c in " \t":
            if cur is not None:
                words.append(("".join(cur), tilde))
                cur = None
            i += 1
            continue
        if ord(c) < 0x20 or c == "\x7f":
            raise ScpCommandError(f"the scp command contains a control character ({c!r}); medbroker refuses it",
                                  _HINT)
        start = cur is None
        if start:
            cur, tilde = [], c == "~"
        assert cur is not None
        if c == "'":
            end = command.find("'", i + 1)
            if end < 0:
                raise ScpCommandError("the scp command has an unterminated quote", _HINT)
            cur.append(command[i + 1:end])
            i = end + 1
        elif c == '"':
            end = command.find('"', i + 1)
            if end < 0:
                raise ScpCommandError("the scp command has an unterminated quote", _HINT)
            inner = command[i + 1:end]
            if set(inner) & set("$`\\"):
                raise ScpCommandError(f"the scp path {inner!r} uses shell expansion, which medbroker does not run; "
                                      "name the file literally", _HINT)
            cur.append(inner)
            i = end + 1
        elif c == "\\":
            if i + 1 >= n:
                raise ScpCommandError("the scp command ends with a backslash", _HINT)
            cur.append(command[i + 1])
            i += 2
        elif c in _GLOB:
            raise ScpCommandError(
                "legacy scp (scp -O) through medbroker copies exactly one named file or directory and does not "
                f"expand wildcards ({c!r})", "name the file, copy a directory with -r, " + _HINT)
        elif c in _UNQUOTED_SYNTAX or (c == "#" and start):
            raise ScpCommandError(f"{c!r} is shell syntax, and medbroker runs legacy scp itself without a shell; "
                                  "it accepts one plain path", _HINT)
        else:
            cur.append(c)
            i += 1
    if cur is not None:
        words.append(("".join(cur), tilde))
    return words


def parse_scp_command(command: str) -> ScpCommand:
    """Parse an scp server command strictly: ``scp -t|-f [-r] [-p] [-d] [-v] [--] PATH``.

    Flags may be combined (``-rf``); ``PATH`` is one word after shell-style quote removal; ``~`` and
    ``~/x`` mean the login's home (the device's SFTP working directory); an empty path means ``.``.

    :param command: the exec command line as the vendor's client sent it
    :return: the :class:`ScpCommand`
    :raises ScpCommandError: anything else (globs, shell syntax, ``~user``, other options, not one path)
    """
    words = _split_words(command)
    if not words or posixpath.basename(words[0][0]) != "scp":
        raise ScpCommandError("medbroker serves legacy scp itself and accepts only "
                              "'scp -t|-f [-r] [-p] [-d] [-v] [--] PATH'", _HINT)
    flags: set[str] = set()
    operands: list[tuple[str, bool]] = []
    options_done = False
    for word, tilde in words[1:]:
        if not options_done and word == "--":
            options_done = True
        elif not options_done and word.startswith("-") and len(word) > 1:
            unknown = set(word[1:]) - _FLAG_LETTERS
            if unknown:
                raise ScpCommandError(f"the scp option -{sorted(unknown)[0]} is not supported through medbroker",
                                      "use scp -O with -r or -p only, " + _HINT)
            flags |= set(word[1:])
        else:
            operands.append((word, tilde))
    if ("t" in flags) == ("f" in flags):
        raise ScpCommandError("an scp server command needs exactly one of -t and -f", _HINT)
    if len(operands) != 1:
        raise ScpCommandError(f"legacy scp through medbroker takes exactly one path, not {len(operands)} "
                              "(quote a path with spaces)", _HINT)
    path, tilde = operands[0]
    if "\0" in path:
        raise ScpCommandError("the scp path contains a NUL byte", _HINT)
    if tilde:
        if path == "~" or path.startswith("~/"):
            path = path[2:] or "."
        else:
            raise ScpCommandError(f"{path.split('/')[0]!r} (another user's home) is not available through "
                                  "medbroker's legacy scp", "use an absolute path, " + _HINT)
    return ScpCommand(sink="t" in flags, path=(path or ".").encode("utf-8", "surrogateescape"),
                      recursive="r" in flags, preserve="p" in flags, must_be_dir="d" in flags)


_CD = re.compile(rb"([CD])([0-7]{4}) ([0-9]{1,19}) (.*)", re.DOTALL)
_T = re.compile(rb"T([0-9]{1,19}) ([0-9]{1,6}) ([0-9]{1,19}) ([0-9]{1,6})")


def parse_record(line: bytes) -> ScpRecord:
    """Parse one control record from the vendor's scp (the line without its ``\\n``).

    :raises ScpProtocolError: anything but a well-formed C, D, E, T record or a 1/2 error record;
        C/D names that are empty, ``..`` or contain ``/`` or NUL (they would escape the target), and
        ``.`` as a file name (``D0755 0 .`` is what ``scp -r . host:dir`` sends: the target itself)
    """
    if not line:
        raise ScpProtocolError("empty SCP record")
    kind = line[:1]
    if kind in (b"\x01", b"\x02"):
        return ScpRecord("1" if kind == b"\x01" else "2", message=line[1:].decode("utf-8", "replace"))
    if line == b"E":
        return ScpRecord("E")
    m = _T.fullmatch(line)
    if m:
        return ScpRecord("T", mtime=int(m.group(1)), atime=int(m.group(3)))
    m = _CD.fullmatch(line)
    if m is None:
        raise ScpProtocolError(f"unexpected SCP record {line[:60]!r}")
    name = m.group(4)
    if name in (b"", b"..") or (name == b"." and m.group(1) == b"C") or b"/" in name or b"\0" in name:
        raise ScpProtocolError(f"unexpected file name {name[:60]!r} in an SCP record")
    size = int(m.group(3))
    if size >= 1 << 63:
        raise ScpProtocolError("file size out of range in an SCP record")
    return ScpRecord(m.group(1).decode(), mode=int(m.group(2), 8), size=size, name=name)


def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _one_line(text: str) -> bytes:
    return " ".join(text.split())[:1500].encode("utf-8", "replace")


class _Input:
    """Bytes from the vendor, consumed by the protocol task; holds the vendor channel while too much waits."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._buf = bytearray()
        self._eof = False
        self._event = asyncio.Event()
        self._pause, self._resume, self._paused = pause, resume, False

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._event.set()
        if len(self._buf) > _INPUT_HIGH and not self._paused:
            self._paused = True
            self._pause()

    def feed_eof(self) -> None:
        self._eof = True
        self._event.set()

    async def _more(self) -> bool:
        if self._eof:
            return False
        self._event.clear()
        await self._event.wait()
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        if self._paused and len(self._buf) < _INPUT_HIGH // 2:
            self._paused = False
            self._resume()
        return out

    async def readline(self) -> bytes | None:
        """One line without its newline; None at a clean end of input."""
        while True:
            end = self._buf.find(b"\n", 0, _MAX_LINE + 1)
            if end >= 0:
                return self._take(end + 1)[:-1]
            if len(self._buf) > _MAX_LINE:
                raise ScpProtocolError(f"SCP record longer than {_MAX_LINE} bytes")
            if not await self._more():
                if self._buf:
                    raise ScpProtocolError("the connection ended in the middle of an SCP record")
                return None

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one); b"" at the end of input."""
        while not self._buf:
            if not await self._more():
                return b""
        return self._take(n)


class _Hangup(Exception):
    """The vendor's channel closed: stop at the next step (cancelling would orphan asyncssh's parallel reads)."""


class ScpServer:
    """The broker's scp server for one exec channel; see the module docstring.

    :param command: the exec command line (parsed with :func:`parse_scp_command` on :meth:`start`)
    :param policy: the device's protected paths
    :param start_client: ``await start_client()`` -> an ``asyncssh.SFTPClient`` on the device, made with
        ``path_encoding=None`` (names as bytes); it is closed when the transfer ends
    :param send: writes bytes to the vendor's channel (and records them)
    :param finish: ``finish(exit_status)``: end the vendor's channel
    :param hold_input: ``hold_input(True|False)``: stop/resume reading the vendor's channel
    :param record_event: ``record_event("transfer.file", details)`` for each file that crossed
    :param on_denied: ``on_denied(decision, details)`` for each refusal (already sent in-band to the vendor)
    :param mode: the grant's mode (``normal``, ``read-only``, ``upload-only``)
    :param now: UTC ISO timestamp for transfer records
    :param uploads: a :class:`KeptUploads` to keep a copy of every uploaded file, or None
    :param op_timeout: seconds one device operation may take
    :param upload_guard: ``upload_guard(path)`` -> a :class:`sessions.upload_check.StreamGuard` judging each
        uploaded file, or None: a file naming a protected path is refused (``scp.denied``) and removed
    """

    def __init__(self, command: str, policy: ProtectedPaths, start_client: Callable[[], Awaitable[Any]],
                 send: Callable[[bytes], None], finish: Callable[[int], None], hold_input: Callable[[bool], None],
                 record_event: Callable[[str, dict], None], on_denied: Callable[[Decision, dict], None], *,
                 mode: str = "normal", now: Callable[[], str] = lambda: "", uploads: "KeptUploads | None" = None,
                 op_timeout: float = 60.0, upload_guard: Callable[[str], Any] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        """:param logger: where this channel logs (an adapter naming the session and channel, sessions/sessionlog.py)"""
        self._log = logger
        self.command = command
        self._upload_guard = upload_guard
        self._policy, self._start_client, self._send, self._finish = policy, start_client, send, finish
        self._record, self._on_denied, self._mode, self._now = record_event, on_denied, mode, now
        self._uploads, self._timeout = uploads, op_timeout
        self._input = _Input(lambda: hold_input(True), lambda: hold_input(False))
        self._writable = asyncio.Event()
        self._writable.set()
        self._sftp: Any = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.errors = 0
        self.transfers: list[dict] = []

    # ------------------------------------------------------------------------------- channel hooks
    def start(self) -> None:
        """Begin serving (called once the vendor's channel is open)."""
        self._task = watch(asyncio.get_running_loop().create_task(self._run()), self._log, "the legacy scp channel")

    def vendor_data(self, data: bytes) -> None:
        self._input.feed(data)

    def vendor_eof(self) -> None:
        self._input.feed_eof()

    def pause_writing(self) -> None:
        if not self._closed:  # a pause after close (the recorder catching up) must not strand the protocol task
            self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def close(self) -> None:
        """The channel is gone: stop the transfer and the device session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._input.feed_eof()  # the protocol task stops at its next step and closes the device session
        self._writable.set()

    # ------------------------------------------------------------------------------- plumbing
    async def _run(self) -> None:
        status = 1
        try:
            try:
                cmd = parse_scp_command(self.command)
            except ScpCommandError as exc:
                self._deny(Decision(False, str(exc), "scp.denied", "command", ""), command=self.command)
                return
            try:
                self._sftp = await self._dev(self._start_client())
            except (asyncssh.Error, OSError, TimeoutError, asyncio.TimeoutError) as exc:
                reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
                raise ScpProtocolError(f"medbroker serves legacy scp through the SFTP server of "
                                       f"{self._policy.device}, which did not start ({reason}); ask the hospital "
                                       "to enable it, or use sftp") from None
            if cmd.sink:
                await self._serve_sink(cmd)
            else:
                await self._serve_source(cmd)
            status = 1 if self.errors else 0
        except _Hangup:
            pass
        except ScpProtocolError as exc:
            self._emit(b"\x02" + _PREFIX.encode() + _one_line(exc.message) + b"\n")
        except (asyncssh.Error, OSError, TimeoutError, asyncio.TimeoutError) as exc:
            reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
            self._emit(b"\x02" + _PREFIX.encode() + _one_line(f"the device stopped answering ({reason})") + b"\n")
        except Exception:  # the channel's boundary: fail closed, say so, keep the broker running
            self._log.exception("legacy scp channel failed")
            self._emit(b"\x02" + _PREFIX.encode() + b"internal error; the transfer was stopped\n")
        finally:
            if self._sftp is not None:
                self._sftp.exit()
            if self._uploads is not None:
                self._uploads.close()
            if not self._closed:
                self._closed = True
                self._finish(status)

    def _emit(self, data: bytes) -> None:
        if not self._closed:
            self._send(data)

    async def _write(self, data: bytes) -> None:
        self._emit(data)
        await self._writable.wait()
        if self._closed:
            raise _Hangup()

    async def _dev(self, awaitable: Awaitable[Any]) -> Any:
        async with asyncio.timeout(self._timeout):
            return await awaitable

    def _error(self, text: str, *, ours: bool = True) -> None:
        """A non-fatal error record: OpenSSH's scp prints it and exits 1 at the end."""
        self.errors += 1
        self._emit(b"\x01" + (_PREFIX if ours else "scp: ").encode() + _one_line(text) + b"\n")

    def _deny(self, decision: Decision, **details: Any) -> None:
        self._error(decision.reason)
        self._on_denied(decision, {"op": decision.op, "path": decision.path, **details})

    def _device_error(self, path: bytes, exc: Exception) -> None:
        if isinstance(exc, asyncssh.SFTPNoSuchFile):
            why = "No such file or directory"
        elif isinstance(exc, asyncssh.SFTPPermissionDenied):
            why = "Permission denied"
        else:
            why = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
        self._error(f"{_text(path)}: {why}", ours=False)

    async def _ack(self) -> str | None:
        """The client's answer: None for OK, else its (non-fatal) error message."""
        first = await self._input.read_some(1)
        if first == b"\0":
            return None
        if not first:
            raise ScpProtocolError("the connection ended while medbroker waited for the scp client")
        line = await self._input.readline()
        if line is None:
            raise ScpProtocolError("the connection ended while medbroker waited for the scp client")
        if first == b"\x02":
            raise ScpProtocolError(f"the scp client gave up: {line.decode('utf-8', 'replace')}")
        self.errors += 1
        return (first + line).decode("utf-8", "replace").lstrip("\x01")

    async def _realpath(self, path: bytes) -> str:
        return normalize_path(_text(await self._dev(self._sftp.realpath(path))))

    async def _resolve_new(self, path: bytes) -> str:
        """Canonical path of an upload target: the file itself if it resolves, else parent + name."""
        try:
            return await self._realpath(path)
        except asyncssh.SFTPNoSuchFile:
            pass
        try:
            await self._dev(self._sftp.lstat(path))
        except asyncssh.SFTPNoSuchFile:
            parent, _, base = path.rstrip(b"/").rpartition(b"/")
            return normalize_path(await self._realpath(parent or (b"/" if path.startswith(b"/") else b"."))
                                  + "/" + _text(base))
        raise PermissionDeniedError(f"{_text(path)} is a symbolic link medbroker cannot resolve on "
                                    f"{self._policy.device}; it refuses to write through it")

    def _decide(self, op: str, path: str, pflags: int = 0) -> Decision:
        return self._policy.decide_sftp(op, [path], mode=self._mode, pflags=pflags)

    def _transfer(self, path: str, direction: str, nbytes: int, digest: str, started: str, outcome: str,
                  **extra: Any) -> None:
        details = {"path": path, "direction": direction, "bytes": nbytes, "sha256": digest, "sequential": True,
                   "started_at": started, "ended_at": self._now(), "outcome": outcome, "protocol": "scp", **extra}
        self.transfers.append(details)
        self._record("transfer.file", details)

    # ------------------------------------------------------------------------------- download (scp -f)
    async def _serve_source(self, cmd: ScpCommand) -> None:
        if await self._ack() is not None:  # the client's go-ahead
            return
        try:
            resolved = await self._realpath(cmd.path)
        except asyncssh.SFTPError as exc:
            self._device_error(cmd.path, exc)
            return
        stripped = cmd.path.rstrip(b"/") or b"/"
        await self._send_item(posixpath.basename(stripped) or stripped, resolved, cmd, ())

    async def _send_item(self, name: bytes, resolved: str, cmd: ScpCommand, parents: tuple[str, ...]) -> None:
        try:
            decision = self._decide("open", resolved, PFLAG_READ)
            if not decision.allowed:
                self._deny(decision, resolved=resolved)
                return
            if b"\n" in name:
                self._error(f"{resolved}: skipping, the file name contains a newline")
                return
            attrs = await self._dev(self._sftp.stat(resolved.encode("utf-8", "surrogateescape")))
            if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY and cmd.recursive:
                await self._send_dir(name, resolved, attrs, cmd, parents)
            elif attrs.type == asyncssh.FILEXFER_TYPE_REGULAR:
                await self._send_file(name, resolved, cmd)
            elif attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                self._error(f"{resolved}: not a regular file (use -r for directories)", ours=False)
            else:  # a device node (a raw disk), FIFO or socket
                self._deny(Decision(False, f"{resolved} on {self._policy.device} is not a regular file, and "
                                    "medbroker only transfers regular files", "scp.denied", "open", resolved))
        except asyncssh.SFTPError as exc:
            self._device_error(resolved.encode("utf-8", "surrogateescape"), exc)

    async def _times(self, attrs: Any) -> bool:
        await self._write(b"T%d 0 %d 0\n" % (attrs.mtime or 0, attrs.atime or 0))
        return await self._ack() is None

    async def _send_dir(self, name: bytes, resolved: str, attrs: Any, cmd: ScpCommand,
                        parents: tuple[str, ...]) -> None:
        if resolved in parents or len(parents) >= _MAX_DEPTH:
            self._error(f"{resolved}: skipping, a directory loop or more than {_MAX_DEPTH} levels")
            return
        if cmd.preserve and not await self._times(attrs):
            return
        await self._write(b"D%04o 0 %s\n" % ((attrs.permissions or 0o755) & 0o7777, name))
        if await self._ack() is not None:
            return
        raw = resolved.encode("utf-8", "surrogateescape")
        try:
            async with asyncio.timeout(self._timeout):
                entries = sorted([e async for e in self._sftp.scandir(raw)], key=lambda e: e.filename)
        except asyncssh.SFTPError as exc:
            self._device_error(raw, exc)
            entries = []
        for entry in entries:
            child = entry.filename
            if child in (b".", b".."):
                continue
            try:
                real = await self._realpath(raw.rstrip(b"/") + b"/" + child)
            except asyncssh.SFTPError as exc:
                self._device_error(raw.rstrip(b"/") + b"/" + child, exc)
                continue
            await self._send_item(child, real, cmd, parents + (resolved,))
        await self._write(b"E\n")
        await self._ack()

    async def _send_file(self, name: bytes, resolved: str, cmd: ScpCommand) -> None:
        raw = resolved.encode("utf-8", "surrogateescape")
        f = await self._dev(self._sftp.open(raw, "rb"))
        started, digest, sent, real, outcome = self._now(), hashlib.sha256(), 0, 0, "ok"
        try:
            attrs = await self._dev(f.stat())
            if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
                self._error(f"{resolved}: not a regular file; medbroker only transfers regular files")
                return
            size = attrs.size or 0
            head = await self._dev(f.read(HEAD_BYTES, 0)) if size else b""
            kind = detect_patient_data(head)
            if kind:
                self._deny(Decision(False, self._policy.content_reason(resolved, kind), "scp.denied", "open",
                                    resolved), resolved=resolved, content=kind)
                return
            if cmd.preserve and not await self._times(attrs):
                return
            await self._write(b"C%04o %d %s\n" % ((attrs.permissions or 0o644) & 0o7777, size, name))
            if await self._ack() is not None:
                outcome = "refused-by-client"
                return
            scanner, failure = OutputScanner(), None
            while sent < size:
                n = min(BLOCK, size - sent)
                if failure is None:
                    try:
                        block = await self._dev(f.read(n, sent))
                    except asyncssh.SFTPError as exc:
                        block, failure = b"", f"{resolved}: {exc.reason}"
                    if failure is None and not block:
                        failure = f"{resolved}: the file shrank while it was sent"
                    found = scanner.feed(block) if block else None
                    if found:
                        failure, outcome = self._policy.content_reason(resolved, found), "stopped"
                        self._on_denied(Decision(False, failure, "scp.denied", "read", resolved),
                                        {"op": "read", "path": resolved, "content": found, "offset": sent})
                    elif block:
                        digest.update(block)
                        await self._write(block)
                        sent += len(block)
                        real += len(block)
                        continue
                await self._write(bytes(n))  # the client expects `size` bytes: fill, then report the error
                sent += n
            if failure is not None:
                outcome = "stopped" if outcome == "stopped" else "failed"
                self._error(failure)
            else:
                self._emit(b"\0")
            if await self._ack() is not None and outcome == "ok":
                outcome = "failed"
        except (_Hangup, asyncio.CancelledError):
            outcome = "interrupted"
            raise
        finally:
            await self._close_quietly(f)
            if real or outcome != "ok":
                self._transfer(resolved, "download", real, digest.hexdigest(), started, outcome)

    async def _close_quietly(self, f: Any) -> None:
        closing = f.close()
        try:
            await self._dev(closing)
        except (asyncssh.Error, OSError, TimeoutError, asyncio.TimeoutError):
            pass
        finally:
            closing.close()  # cancelled before it ran (the vendor hung up): no "never awaited" coroutine

    # ------------------------------------------------------------------------------- upload (scp -t)
    async def _serve_sink(self, cmd: ScpCommand) -> None:
        target = cmd.path
        if cmd.must_be_dir and not await self._is_dir(target):
            self._error(f"{_text(target)}: Not a directory", ours=False)
            return
        self._emit(b"\0")
        stack: list[bytes] = [target]
        times: ScpRecord | None = None
        while True:
            line = await self._input.readline()
            if line is None:
                return
            rec = parse_record(line)
            if rec.kind == "2":
                raise ScpProtocolError(f"the scp client gave up: {rec.message}")
            if rec.kind == "1":  # the client could not read one of its files; it says so itself
                self.errors += 1
            elif rec.kind == "T":
                times = rec
                self._emit(b"\0")
            elif rec.kind == "E":
                if len(stack) < 2:
                    raise ScpProtocolError("an SCP end-of-directory record without a directory")
                stack.pop()
                self._emit(b"\0")
            else:
                here = stack[-1]
                dest = here.rstrip(b"/") + b"/" + rec.name if await self._is_dir(here) else here
                if rec.kind == "D":
                    if not cmd.recursive:
                        raise ScpProtocolError("received a directory without -r")
                    if await self._recv_dir(dest, rec):
                        stack.append(dest)
                else:
                    await self._recv_file(dest, rec, times if cmd.preserve else None)
                times = None

    async def _discard(self, raw: bytes, resolved: str, reason: str, guard: Any, keep: Any, started: str, got: int,
                       digest: str) -> None:
        """An upload named a protected path (sessions/upload_check.py): remove what was written, refuse it."""
        try:
            await self._dev(self._sftp.remove(raw))
            outcome = "removed"
        except (asyncssh.SFTPError, PermissionDeniedError) as exc:
            outcome = f"not removed: {getattr(exc, 'reason', None) or exc}"
        if keep is not None:
            keep.discard()
        ref = getattr(guard, "reference", None)
        self._deny(Decision(False, reason, "scp.denied", "write", resolved), resolved=resolved,
                   names=ref.path if ref else None, via=ref.via if ref else None, discarded=outcome)
        self._transfer(resolved, "upload", got, digest, started, "refused")

    async def _is_dir(self, path: bytes) -> bool:
        try:
            attrs = await self._dev(self._sftp.stat(path))
        except asyncssh.SFTPError:
            return False
        return attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY

    async def _recv_dir(self, dest: bytes, rec: ScpRecord) -> bool:
        try:
            resolved = await self._resolve_new(dest)
            decision = self._decide("mkdir", resolved)
            if not decision.allowed:
                self._deny(decision, resolved=resolved)
                return False
            raw = resolved.encode("utf-8", "surrogateescape")
            if not await self._is_dir(raw):
                await self._dev(self._sftp.mkdir(raw, asyncssh.SFTPAttrs(permissions=rec.mode & 0o777 | 0o700)))
        except PermissionDeniedError as exc:
            self._deny(Decision(False, exc.message, "scp.denied", "mkdir", _text(dest)))
            return False
        except asyncssh.SFTPError as exc:
            self._device_error(dest, exc)
            return False
        self._emit(b"\0")
        return True

    async def _recv_file(self, dest: bytes, rec: ScpRecord, times: ScpRecord | None) -> None:
        started, refusal = self._now(), None
        try:
            resolved = await self._resolve_new(dest)
            decision = self._decide("open", resolved, PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC)
            if not decision.allowed:
                self._deny(decision, resolved=resolved)
                return
            raw = resolved.encode("utf-8", "surrogateescape")
            try:
                attrs = await self._dev(self._sftp.stat(raw))
                if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
                    refusal = f"{resolved} is not a regular file; medbroker only writes regular files"
            except asyncssh.SFTPNoSuchFile:
                pass
            if refusal:
                self._deny(Decision(False, refusal, "scp.denied", "open", resolved), resolved=resolved)
                return
            f = await self._dev(self._sftp.open(raw, "wb", asyncssh.SFTPAttrs(permissions=rec.mode & 0o777)))
        except PermissionDeniedError as exc:
            self._deny(Decision(False, exc.message, "scp.denied", "open", _text(dest)))
            return
        except asyncssh.SFTPError as exc:
            self._device_error(dest, exc)
            return
        keep = self._uploads.open(resolved) if self._uploads is not None else None
        guard = self._upload_guard(resolved) if self._upload_guard is not None else None
        digest, got, written, failure, refused = hashlib.sha256(), 0, 0, None, None
        try:
            self._emit(b"\0")
            pending = bytearray()
            while got < rec.size:
                chunk = await self._input.read_some(min(BLOCK, rec.size - got))
                if not chunk:
                    self._transfer(resolved, "upload", got, digest.hexdigest(), started, "interrupted")
                    if keep is not None:
                        keep.discard()
                    raise ScpProtocolError("the connection ended in the middle of a file")
                got += len(chunk)
                digest.update(chunk)
                if keep is not None:
                    keep.write(chunk)
                pending += chunk
                if guard is not None and refused is None:  # a script naming a protected path: stop writing
                    refused = guard.feed(chunk) or (guard.finish() if got == rec.size else None)
                if failure is None and refused is None and (len(pending) >= BLOCK or got == rec.size):
                    try:
                        await self._dev(f.write(bytes(pending), written))
                        written += len(pending)
                    except asyncssh.SFTPError as exc:
                        failure = f"{resolved}: {exc.reason}"
                    pending.clear()
            client_error = await self._ack()
        finally:
            await self._close_quietly(f)
        if refused is not None:
            await self._discard(raw, resolved, refused, guard, keep, started, got, digest.hexdigest())
            return
        kept = keep.finish(digest.hexdigest()) if keep is not None and failure is None and not client_error \
            else (keep.discard() if keep is not None else None)
        if failure is None and times is not None:
            try:
                await self._dev(self._sftp.setstat(raw, asyncssh.SFTPAttrs(
                    atime=times.atime, mtime=times.mtime, permissions=rec.mode & 0o777)))
            except asyncssh.SFTPError as exc:
                failure = f"{resolved}: {exc.reason}"
        if failure is not None:
            self._error(failure, ours=False)
        else:
            self._emit(b"\0")
        outcome = "failed" if failure else ("incomplete" if client_error else "ok")
        self._transfer(resolved, "upload", got, digest.hexdigest(), started, outcome,
                       **({"kept": kept} if kept else {}))


class KeptUploads:
    """Copies of the files a vendor uploads, for malware forensics (``[recording] keep_uploads = true``).

    Each copy is written by one worker thread (off the event loop) to ``directory/.partial-N`` at the
    offsets the upload used, then named by the sha256 of its content, with ``<sha256>.json`` beside it
    naming the device path. One instance per channel; :meth:`close` lets queued writes finish.

    :param directory: e.g. ``$MEDBROKER_HOME/uploads/<session id>``; created 0700 on first use
    """

    def __init__(self, directory: Path, logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        """:param logger: where failed copies are logged (an adapter naming the session, sessions/sessionlog.py)"""
        self.directory = directory
        self._log = logger
        self._pool: ThreadPoolExecutor | None = None
        self._serial = itertools.count(1)

    def open(self, device_path: str) -> "KeptFile":
        """Start a copy of one uploaded file."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="medbroker-uploads")
        return KeptFile(self._pool, self.directory, device_path, next(self._serial), self._log)

    def close(self) -> None:
        """No more uploads on this channel; queued writes still finish."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class KeptFile:
    """One kept upload; see :class:`KeptUploads`. Errors are logged: a failed copy never stops the transfer."""

    def __init__(self, pool: ThreadPoolExecutor, directory: Path, device_path: str, serial: int,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        self._pool, self._dir, self._device_path, self._log = pool, directory, device_path, logger
        self._tmp = directory / f".partial-{os.getpid()}-{id(self):x}-{serial}"
        self._fd: int | None = None
        self._offset = 0

    def write(self, data: bytes, offset: int | None = None) -> None:
        """Copy ``data`` (at ``offset``; default: after the previous write)."""
        if offset is None:
            offset = self._offset
        self._offset = offset + len(data)
        self._pool.submit(self._pwrite, data, offset)

    def finish(self, sha256: str | None = None) -> str:
        """Seal the copy; returns where it will be: ``DIR/<sha256>`` (``sha256``: the stream's hash when the
        upload was sequential, which is the content's), else ``DIR`` (named by its content hash)."""
        self._pool.submit(self._seal)
        return str(self._dir / sha256) if sha256 else str(self._dir)

    def discard(self) -> None:
        """Drop the copy (nothing was uploaded, or the upload failed)."""
        self._pool.submit(self._drop)

    def _pwrite(self, data: bytes, offset: int) -> None:
        try:
            if self._fd is None:
                self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.pwrite(self._fd, data, offset)
        except OSError as exc:
            self._log.error("cannot keep a copy of the upload to %s: %s", self._device_path, exc)

    def _seal(self) -> None:
        if self._fd is None:
            return
        try:
            os.close(self._fd)
            self._fd = None
            digest = hashlib.sha256()
            with open(self._tmp, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            name = digest.hexdigest()
            os.replace(self._tmp, self._dir / name)
            meta = self._dir / f"{name}.json"
            meta.write_text(json.dumps({"device_path": self._device_path, "sha256": name}) + "\n")
            meta.chmod(0o600)
        except OSError as exc:
            self._log.error("cannot keep a copy of the upload to %s: %s", self._device_path, exc)

    def _drop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)
