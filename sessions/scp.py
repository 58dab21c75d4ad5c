"""Legacy scp (``scp -O``: exec ``scp -t`` / ``scp -f``) served by the broker itself over the device's SFTP.

The device never sees the command line: :func:`parse_scp_command` (sessions/scp_grammar.py) accepts one strict grammar
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
import logging
import posixpath
from typing import Any, Awaitable, Callable

import asyncssh

from medcore.errors import PermissionDeniedError
from sessions.kept_uploads import KeptUploads
from sessions.policy import HEAD_BYTES, PFLAG_CREAT, PFLAG_READ, PFLAG_TRUNC, PFLAG_WRITE, Decision, OutputScanner, \
    ProtectedPaths, detect_patient_data, normalize_path
from sessions.scp_grammar import ScpCommand, ScpCommandError, ScpInput, ScpProtocolError, ScpRecord, parse_record, \
    parse_scp_command
from sessions.tasks import watch

__all__ = ["ScpServer", "BLOCK"]

log = logging.getLogger("medbroker.scp")

BLOCK = 256 * 1024
"""Bytes read from the device per step of a download (asyncssh splits it into parallel SFTP reads)."""
_MAX_DEPTH = 64
_PREFIX = "medbroker: "


def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _one_line(text: str) -> bytes:
    return " ".join(text.split())[:1500].encode("utf-8", "replace")


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
                 mode: str = "normal", now: Callable[[], str] = lambda: "", uploads: KeptUploads | None = None,
                 op_timeout: float = 60.0, upload_guard: Callable[[str], Any] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        """:param logger: where this channel logs (an adapter naming the session and channel, sessions/sessionlog.py)"""
        self._log = logger
        self.command = command
        self._upload_guard = upload_guard
        self._policy, self._start_client, self._send, self._finish = policy, start_client, send, finish
        self._record, self._on_denied, self._mode, self._now = record_event, on_denied, mode, now
        self._uploads, self._timeout = uploads, op_timeout
        self._input = ScpInput(lambda: hold_input(True), lambda: hold_input(False))
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
        kept = None
        if keep is not None and failure is None and not client_error:
            kept = keep.finish(digest.hexdigest())
        elif keep is not None:
            keep.discard()
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
