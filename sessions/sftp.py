"""SFTP packet relay filter: resolve, decide and answer denied requests locally; forward the rest verbatim.

One :class:`SftpFilter` sits in each relayed ``sftp`` subsystem channel. The relay hands it the raw
bytes of both directions and it calls back to send bytes on, record events and report denials.
asyncssh-notes §6 and pitfalls 19-27 explain the choices; docs/data-protection.md the limits.

* Requests are parsed (sessions/sftp_codec.py). Every path-bearing one is resolved through the
  device's own realpath on a second SFTP session (create/rename/link targets: parent + basename),
  after every earlier rename/link/remove/mkdir has been answered, then decided by
  :meth:`ProtectedPaths.decide_sftp`. Denied ones get ``SSH_FX_PERMISSION_DENIED`` and the reason;
  allowed ones are forwarded byte for byte, in order: later requests wait behind a pending check,
  except READ/WRITE on handles already open, which stream through.
* OPEN for reading pre-reads the file's first :data:`HEAD_BYTES` on the second session and refuses
  DICOM/HL7/ASTM before the vendor's OPEN reaches the device, so no byte of such a file is ever
  forwarded and the refusal names the file at once. Chosen over holding back DATA replies because
  clients read at any offsets, out of order and in short pieces; holding replies until offset 0 is
  known would need reordering logic and still answer late. Every DATA reply is also run through an
  :class:`OutputScanner` per handle (tar members, base64, content that changed after the check).
* VERSION is cut down to :data:`ALLOWED_EXTENSIONS`; ``limits@openssh.com`` replies are capped so
  packets stay under the framing limit; ``copy-data`` is refused; unknown extensions and packet
  types get ``SSH_FX_OP_UNSUPPORTED``. Each file handle's bytes are hashed (sha256) as they pass and
  reported as a ``transfer.file`` event at CLOSE; ``sftp.summary`` at :meth:`SftpFilter.close`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

import asyncssh

from medcore.errors import BrokerError
from sessions.policy import HEAD_BYTES, Decision, OutputScanner, ProtectedPaths, detect_patient_data, normalize_path
from sessions.sftp_codec import (
    DEFAULT_MAX_LEN, FX_NO_SUCH_FILE, FX_OP_UNSUPPORTED, FX_PERMISSION_DENIED, FXF_CREAT, FXF_READ,
    FXF_WRITE,
    PacketReader, SftpProtocolError, SftpRequest, extended_reply, init_packet, limits_payload, parse_limits,
    parse_reply, parse_request, read_request, rewrite_request_paths, rewrite_version, status_reply,
)
from sessions.tasks import watch

if TYPE_CHECKING:
    from sessions.kept_uploads import KeptFile
    from sessions.upload_check import StreamGuard

__all__ = ["SftpFilter", "SftpSummary", "TransferRecord", "ALLOWED_EXTENSIONS", "MAX_DATA"]

log = logging.getLogger("medbroker.sftp")

ALLOWED_EXTENSIONS = frozenset({
    b"posix-rename@openssh.com", b"hardlink@openssh.com", b"lsetstat@openssh.com", b"statvfs@openssh.com",
    b"expand-path@openssh.com", b"home-directory",  # path-bearing: checked (expand-path/home: on the reply)
    b"fstatvfs@openssh.com", b"fsync@openssh.com", b"limits@openssh.com", b"users-groups-by-id@openssh.com",
})
"""Extensions the broker advertises (if the device does): those it checks, and handle-only benign ones."""
MAX_DATA = 256 * 1024 - 1024
"""Largest READ length forwarded and read/write length advertised in limits (OpenSSH's own values)."""
DEVICE_MAX_LEN = 4 * 1024 * 1024 + 1024
_NAMESPACE_OPS = frozenset({"remove", "mkdir", "rmdir", "rename", "posix-rename", "symlink", "hardlink"})
_NOFOLLOW_OPS = frozenset({"lstat", "readlink", "remove", "rmdir", "rename", "posix-rename", "hardlink", "lsetstat"})
_RESOLVED_OPS = frozenset({"open", "opendir", "stat", "setstat", "statvfs", "mkdir", "symlink"}) | _NOFOLLOW_OPS
_REPLY_CHECKED = frozenset({"realpath", "expand-path", "home-directory"})
_FORWARDED = frozenset({"init", "close", "fstat", "fsetstat", "readdir", "fstatvfs", "fsync", "limits",
                        "users-groups-by-id", "read", "write"}) | _REPLY_CHECKED
_MAX_QUEUE = 1024
SMALL_REPLY = 32 * 1024
"""The largest reply the device may send to a request answered by STATUS, HANDLE, ATTRS or one NAME (real
servers send tens or hundreds of bytes); a larger one breaks the protocol. Announced to the recorder as the
channel's unit while only such requests are outstanding (issue 16: an upload no longer runs in lock step)."""
_SMALL_REPLY_OPS = frozenset({
    "open", "opendir", "close", "write", "lstat", "fstat", "stat", "setstat", "fsetstat", "lsetstat", "remove",
    "mkdir", "rmdir", "realpath", "rename", "posix-rename", "readlink", "symlink", "hardlink", "fsync", "statvfs",
    "fstatvfs", "limits", "expand-path", "home-directory"})
_DATA_HEADER = 13  # length, type, id, data length: a DATA reply is this much longer than its data
_REPLY_OPS = {  # reply type -> the requests it may answer (STATUS answers any)
    "handle": frozenset({"open", "opendir"}), "data": frozenset({"read"}),
    "name": frozenset({"readdir", "realpath", "readlink", "expand-path", "home-directory"}),
    "attrs": frozenset({"stat", "lstat", "fstat"}),
    "extended-reply": frozenset({"statvfs", "fstatvfs", "limits", "users-groups-by-id", "extended"}),
}


class _DeviceStatus(Exception):
    """The device answered a resolution with an SFTP error; the vendor gets the same answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class TransferRecord:
    """Bytes of one file that crossed the broker through one handle. ``sequential``: the bytes were read
    or written from offset 0 without gaps, so ``sha256`` is the hash of the file's first ``bytes`` bytes."""

    path: str
    direction: str
    bytes: int
    sha256: str
    sequential: bool
    started_at: str = ""
    ended_at: str = ""
    outcome: str = "ok"
    kept: str | None = None
    first_offset: int = 0
    """Where the first byte through this handle sat in the file (a resumed ``reget``/``reput`` starts late)."""
    contiguous: bool = True
    """Every piece followed the one before (true of a resumed transfer too; false for random access)."""

    def as_dict(self) -> dict:
        out = {"path": self.path, "direction": self.direction, "bytes": self.bytes, "sha256": self.sha256,
               "sequential": self.sequential, "outcome": self.outcome}
        if not self.sequential:
            # Say plainly what the hash covers: the broker saw only these bytes, not the whole file.
            out["partial"] = True
            out["offset"] = self.first_offset
            out["covers"] = (f"bytes {self.first_offset}..{self.first_offset + self.bytes} of the file (resumed "
                             f"transfer); the sha256 is of those bytes only, not of the whole file"
                             if self.contiguous else "pieces at scattered offsets; the sha256 is of the bytes in "
                             "the order they passed, not of the file")
        if self.started_at:
            out |= {"started_at": self.started_at, "ended_at": self.ended_at}
        return out | ({"kept": self.kept} if self.kept else {})


@dataclass(frozen=True)
class SftpSummary:
    """What one SFTP channel did, returned by :meth:`SftpFilter.close`."""

    requests: int
    forwarded: int
    denied: int
    bytes_down: int
    bytes_up: int
    transfers: tuple[TransferRecord, ...]
    error: str | None = None
    replied: int = 0
    """Device replies passed on (forwarded requests answered); ``forwarded - replied`` were still in flight."""
    unanswered: int = 0
    """Forwarded requests the device had not answered when the channel closed."""

    def as_dict(self) -> dict:
        return {"requests": self.requests, "forwarded": self.forwarded, "denied": self.denied,
                "replied": self.replied, "unanswered": self.unanswered,
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "error": self.error,
                "files": [t.as_dict() for t in self.transfers]}


@dataclass
class _Handle:
    path: str
    kind: str
    may_read: bool
    may_write: bool
    closing: bool = False
    poisoned: str | None = None
    scanner: OutputScanner = field(default_factory=OutputScanner)
    hashes: dict = field(default_factory=lambda: {"download": hashlib.sha256(), "upload": hashlib.sha256()})
    counts: dict = field(default_factory=lambda: {"download": 0, "upload": 0})
    next_offset: dict = field(default_factory=lambda: {"download": 0, "upload": 0})
    sequential: dict = field(default_factory=lambda: {"download": True, "upload": True})
    first_offset: dict = field(default_factory=lambda: {"download": None, "upload": None})
    contiguous: dict = field(default_factory=lambda: {"download": True, "upload": True})
    opened_at: str = ""
    keep: KeptFile | None = None  # a copy of the upload when uploads are kept
    guard: StreamGuard | None = None  # judges what is written (uploads)
    refused: str | None = None  # the upload named a protected path: writes and CLOSE are refused

    def account(self, direction: str, offset: int, data: bytes) -> None:
        self.hashes[direction].update(data)
        if self.first_offset[direction] is None:
            self.first_offset[direction] = offset
        elif offset != self.next_offset[direction]:
            self.contiguous[direction] = False
        self.counts[direction] += len(data)
        if offset != self.next_offset[direction]:
            self.sequential[direction] = False
        self.next_offset[direction] = offset + len(data)


@dataclass
class _Item:
    req: SftpRequest
    check: bool


@dataclass
class _Inflight:
    req: SftpRequest
    resolved: tuple[str, ...] = ()
    bound: int = 0


def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _effective_pflags(pflags: int | None) -> int:
    """OpenSSH's sftp-server opens a file read-only when neither READ nor WRITE is set (``flags_from_portable``):
    such an OPEN yields a readable handle, so it is judged and content-checked as a read."""
    pflags = pflags or 0
    return pflags | FXF_READ if not pflags & (FXF_READ | FXF_WRITE) else pflags


class SftpFilter:
    """The SFTP policy proxy for one channel; see the module docstring.

    :param policy: the device's protected paths
    :param realpath: ``await realpath(path) -> bytes``: the device's canonical path, from a second SFTP
        session (``sessions.sftp_device.DeviceSftp.realpath``); raises ``asyncssh.SFTPError`` as the device does
    :param head_reader: ``await head_reader(path, n) -> bytes``: the first ``n`` bytes of a regular file
        (``DeviceSftp.head``); raises ``asyncssh.SFTPError``, or a BrokerError whose message says why not
    :param send_to_device: writes bytes to the device's channel
    :param send_to_vendor: writes bytes to the vendor's channel
    :param record_event: ``record_event(name, details)``: ``sftp.request`` (allowed path operations),
        ``transfer.file`` (per file at CLOSE), ``sftp.summary`` (at close), ``sftp.unexpected-reply``
    :param on_denied: ``on_denied(decision, details)`` for every local refusal; the relay should audit
        it and show ``decision.reason`` on the vendor's stderr (OpenSSH's sftp prints only the code)
    :param mode: the grant's mode (``normal``, ``read-only``, ``upload-only``)
    :param on_fatal: called once with a sentence when a peer breaks the protocol (oversize or garbage
        packet); the relay should close the channel. Without it, :meth:`vendor_data` and
        :meth:`device_data` raise :class:`SftpProtocolError` instead.
    :param check_timeout: seconds a path check (including the wait for earlier renames) may take
    :param now: UTC ISO timestamp for transfer records (``started_at``/``ended_at``)
    :param uploads: a :class:`sessions.kept_uploads.KeptUploads` to keep a copy of every uploaded file, or None
    :param upload_guard: ``upload_guard(path)`` -> a :class:`sessions.upload_check.StreamGuard` for a file
        opened for writing, or None: an upload that names a protected path (a script, an Ansible module)
        has the write that shows it and every later one refused, and its CLOSE answered PERMISSION_DENIED
        after ``discard_upload(path)`` removed the file from the device
    :param rewrite_path: ``rewrite_path(path) -> bytes | None``: a path argument as the device should see it
        (``~alice@ct-01/x`` -> ``x``, sessions/tilde.py), or None to keep it; applied to each request before
        anything judges it, recorded as ``sftp.path.rewritten``
    """

    def __init__(self, policy: ProtectedPaths, realpath: Callable[[bytes], Awaitable[bytes]],
                 head_reader: Callable[[bytes, int], Awaitable[bytes]], send_to_device: Callable[[bytes], None],
                 send_to_vendor: Callable[[bytes], None], record_event: Callable[[str, dict], None],
                 on_denied: Callable[[Decision, dict], None], *, mode: str = "normal",
                 on_fatal: Callable[[str], None] | None = None, check_timeout: float = 30.0,
                 now: Callable[[], str] = lambda: "", uploads=None,
                 upload_guard: Callable[[str], StreamGuard | None] | None = None,
                 discard_upload: Callable[[str], Awaitable[None]] | None = None,
                 rewrite_path: Callable[[bytes], bytes | None] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter = log,
                 expect_reply: Callable[[int], None] | None = None) -> None:
        """:param logger: where this channel logs (an adapter naming the session and channel, sessions/sessionlog.py)
        :param expect_reply: ``expect_reply(n)``: the largest packet the vendor may be sent next is ``n`` bytes
            (the largest reply an outstanding request can bring, at least :data:`SMALL_REPLY`); called before a
            request that may bring a larger reply is forwarded, and after the reply that allowed a smaller value
            went out; 0 when the filter closes. The relay hands it to the recorder's acknowledgment window
            (docs/recording-format.md)."""
        self._log = logger
        self._policy, self._realpath, self._head_reader = policy, realpath, head_reader
        self._to_device, self._to_vendor = send_to_device, send_to_vendor
        self._record, self._on_denied, self._on_fatal = record_event, on_denied, on_fatal
        self._mode, self._timeout = mode, check_timeout
        self._now, self._uploads = now, uploads
        self._upload_guard, self._discard_upload = upload_guard, discard_upload
        self._rewrite_path = rewrite_path
        self._discards: set[asyncio.Task] = set()
        self._vreader, self._dreader = PacketReader(DEFAULT_MAX_LEN), PacketReader(DEVICE_MAX_LEN)
        self._queue: deque[_Item] = deque()
        self._worker: asyncio.Task | None = None
        self._inflight: dict[int, _Inflight] = {}
        self._expect_reply = expect_reply
        self._bounds: dict[int, int] = {}  # reply bound -> requests in flight with it
        self._announced = 0
        self._queued_ids: set[int] = set()
        self._handles: dict[bytes, _Handle] = {}
        self._ns_inflight = 0
        self._ns_idle = asyncio.Event()
        self._ns_idle.set()
        self._transfers: list[TransferRecord] = []
        self._n = {"requests": 0, "forwarded": 0, "denied": 0, "replied": 0, "down": 0, "up": 0}
        self._error: str | None = None
        self._init = self._version = False  # INIT seen from the vendor, VERSION from the device
        self._closed = False
        self._summary: SftpSummary | None = None
        self._announce()

    # ------------------------------------------------------------------------------------ vendor side
    def vendor_data(self, data: bytes) -> None:
        """Bytes the vendor's client sent on the channel."""
        if self._closed:
            return
        try:
            for packet in self._vreader.feed(data):
                if self._closed:  # a fatal error earlier in this batch
                    break
                req = parse_request(packet)
                if self._rewrite_path is not None and req.paths:
                    req = self._rewritten(req)
                self._from_vendor(req)
        except SftpProtocolError as exc:
            self._fatal("vendor", exc)

    def _rewritten(self, req: SftpRequest) -> SftpRequest:
        """``req`` with its paths rewritten (``~alice@ct-01/x`` -> ``x``); recorded when anything changed."""
        assert self._rewrite_path is not None  # the caller checked
        packet = rewrite_request_paths(req.raw, self._rewrite_path)
        if packet is None:
            return req
        new = parse_request(packet)
        self._record("sftp.path.rewritten", {"id": req.id, "op": req.op, "sent": [_text(p) for p in req.paths],
                                             "paths": [_text(p) for p in new.paths]})
        return new

    def _from_vendor(self, req: SftpRequest) -> None:
        self._n["requests"] += 1
        # Protocol violations end the channel at once (issue 11, finding 12): a client that breaks the
        # protocol cannot be answered consistently, and a half-served channel only hangs it.
        if req.op == "init":  # the first packet; clamp the version to the one medbroker parses
            if self._init:
                raise SftpProtocolError("a second INIT on the same channel")
            self._init = True
            self._forward(req, init_packet(3) if (req.version or 0) > 3 else None)
            return
        if not self._init:
            raise SftpProtocolError(f"a {req.op} request (packet type {req.type}) before INIT")
        if req.op == "unknown":
            raise SftpProtocolError(f"packet type {req.type} is not an SFTP v3 request")
        if req.id in self._inflight or req.id in self._queued_ids:
            raise SftpProtocolError(f"request id {req.id} is used by a request still in flight (a {req.op} "
                                    "request reused it); replies could not be told apart")
        handle = self._handles.get(req.handle) if req.handle is not None else None
        if req.op == "close" and handle is not None:
            handle.closing = True  # later READ/WRITE on it must not overtake this CLOSE
            if handle.guard is not None:
                self._judge_upload(req, handle)
        if req.op in ("read", "write") and handle is not None and not handle.closing:
            self._stream(req, handle)  # open handle: no check needed, never waits behind the queue
            return
        check = req.op in _RESOLVED_OPS
        if not check and req.op not in _FORWARDED:
            self._refuse_unsupported(req)
        elif check or self._queue:
            self._enqueue(req, check)
        else:
            self._forward_plain(req)

    def _enqueue(self, req: SftpRequest, check: bool) -> None:
        if len(self._queue) >= _MAX_QUEUE:
            self._fatal("vendor", SftpProtocolError(f"more than {_MAX_QUEUE} SFTP requests wait for path checks"))
            return
        self._queue.append(_Item(req, check))
        if req.id is not None:
            self._queued_ids.add(req.id)
        if self._worker is None:
            self._worker = watch(asyncio.get_running_loop().create_task(self._drain()), self._log,
                                 "the SFTP request queue")

    def _stream(self, req: SftpRequest, handle: _Handle) -> None:
        if req.op == "read":
            if handle.poisoned:
                self._reply_local(req, Decision(False, handle.poisoned, "sftp.denied", "read", handle.path))
                return
            if not handle.may_read:
                self._reply_local(req, self._policy.decide_sftp("read", [handle.path], mode=self._mode))
                return
            if (req.length or 0) > MAX_DATA:
                assert req.id is not None and req.handle is not None and req.offset is not None  # a parsed READ
                self._forward(req, read_request(req.id, req.handle, req.offset, MAX_DATA))
            else:
                self._forward(req, None)
        else:
            if not handle.may_write:
                self._reply_local(req, self._policy.decide_sftp("write", [handle.path], mode=self._mode))
                return
            if handle.guard is not None and self._judge_upload(req, handle):
                return
            handle.account("upload", req.offset or 0, req.data or b"")
            if handle.keep is not None:
                handle.keep.write(req.data or b"", req.offset or 0)
            self._n["up"] += len(req.data or b"")
            self._forward(req)

    def _judge_upload(self, req: SftpRequest, handle: _Handle) -> bool:
        """Judge a WRITE or CLOSE of an upload (sessions/upload_check.py); True if the WRITE was refused.
        A refused CLOSE is still forwarded (the device must release the handle) and answered later."""
        assert handle.guard is not None  # the caller checked
        if handle.refused is None:
            if req.op == "close":
                handle.refused = handle.guard.finish()
            elif handle.counts["upload"] and req.offset != handle.next_offset["upload"]:
                handle.refused = "medbroker checks uploads in order; this write skipped ahead or went back"
            else:
                handle.refused = handle.guard.feed(req.data or b"")
            if handle.refused is None:
                return False
            ref = handle.guard.reference
            decision = Decision(False, handle.refused, "sftp.denied", req.op, handle.path)
            details = {"id": req.id, "op": req.op, "paths": [], "resolved": [handle.path],
                       "names": ref.path if ref else None, "via": ref.via if ref else None}
            self._n["denied"] += 1
            self._on_denied(decision, details)
        if req.op != "close":
            self._to_vendor(status_reply(req.id or 0, FX_PERMISSION_DENIED, handle.refused))
        return True

    def _hold_refusal(self, req: SftpRequest, reason: str, path: str) -> None:
        """The device closed a refused upload: remove the file there, then answer the CLOSE with the refusal."""
        reply = status_reply(req.id or 0, FX_PERMISSION_DENIED, reason)

        async def discard() -> None:
            try:
                if self._discard_upload is not None:
                    await self._discard_upload(path)
            finally:
                if not self._closed:
                    self._to_vendor(reply)

        task = watch(asyncio.get_running_loop().create_task(discard()), self._log, "discarding a kept upload")
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    def _forward_plain(self, req: SftpRequest) -> None:
        """Forward a request that names no path to check (handle ops, limits; realpath is checked on
        the reply), unless the grant's mode forbids it."""
        handle = self._handles.get(req.handle) if req.handle is not None else None
        if req.op in ("fsetstat", "write", "read"):
            decision = self._policy.decide_sftp(req.op, [handle.path] if handle else [], mode=self._mode)
            if not decision.allowed:
                self._reply_local(req, decision)
                return
        if req.op in ("read", "write") and handle is not None:
            self._stream(req, handle)
            return
        self._forward(req)

    def _refuse_unsupported(self, req: SftpRequest) -> None:
        if req.op == "copy-data":
            self._reply_local(req, self._policy.decide_sftp("copy-data", []))
            return
        name = _text(req.extension) if req.extension else f"packet type {req.type}"
        self._reply_local(req, Decision(False, f"the SFTP request {name} is not supported through medbroker",
                                        "sftp.denied", req.op), FX_OP_UNSUPPORTED)

    def _forward(self, req: SftpRequest, packet: bytes | None = None, resolved: tuple[str, ...] = ()) -> None:
        if req.id is not None:
            if req.op == "read":
                bound = _DATA_HEADER + min(req.length or 0, MAX_DATA)
            else:
                bound = SMALL_REPLY if req.op in _SMALL_REPLY_OPS else DEVICE_MAX_LEN + 4
            self._inflight[req.id] = _Inflight(req, resolved, bound)
            self._bounds[bound] = self._bounds.get(bound, 0) + 1
            if bound > self._announced:
                self._announce()
        if req.op in _NAMESPACE_OPS:
            self._ns_inflight += 1
            self._ns_idle.clear()
        self._n["forwarded"] += 1
        self._to_device(packet or req.raw)

    def _reply_local(self, req: SftpRequest, decision: Decision, code: int = FX_PERMISSION_DENIED,
                     **details: object) -> None:
        self._n["denied"] += 1
        self._to_vendor(status_reply(req.id or 0, code, decision.reason))
        self._on_denied(decision, {"id": req.id, "op": req.op, "paths": [_text(p) for p in req.paths], **details})

    # ------------------------------------------------------------------------------------ path checks
    async def _drain(self) -> None:
        try:
            while self._queue and not self._closed:
                item = self._queue[0]
                if item.check:
                    try:
                        async with asyncio.timeout(self._timeout):
                            while self._ns_inflight:  # earlier renames/links must land before we resolve
                                await self._ns_idle.wait()
                            await self._check(item.req)
                    except (asyncio.TimeoutError, TimeoutError):
                        self._reply_local(item.req, Decision(False, f"medbroker could not check this path on "
                                                             f"{self._policy.device} in time; the request was "
                                                             "refused, try again", "sftp.denied", item.req.op))
                else:
                    self._forward_plain(item.req)
                self._queue.popleft()
                if item.req.id is not None:
                    self._queued_ids.discard(item.req.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a callback failed (channel gone): stop filtering, fail closed
            self._fatal("broker", exc, may_raise=False)
        finally:
            self._worker = None

    async def _check(self, req: SftpRequest) -> None:
        try:
            resolved = await (self._resolve_symlink(req.paths) if req.op == "symlink" else
                              self._resolve_all(req.paths, follow=req.op not in _NOFOLLOW_OPS))
        except _DeviceStatus as status:  # the device said no (no such file, ...): answer as it would
            self._to_vendor(status_reply(req.id or 0, status.code, status.message))
            return
        except (asyncio.CancelledError, asyncio.TimeoutError, TimeoutError):
            raise
        except Exception as exc:  # cannot resolve: fail closed
            self._reply_local(req, Decision(False, f"medbroker could not resolve the path on {self._policy.device} "
                                            f"({exc}); the request was refused", "sftp.denied", req.op))
            return
        pflags = _effective_pflags(req.pflags) if req.op == "open" else req.pflags or 0
        decision = self._policy.decide_sftp(req.op, resolved, mode=self._mode, pflags=pflags)
        if not decision.allowed:
            self._reply_local(req, decision, resolved=list(resolved))
            return
        if req.op == "open" and pflags & FXF_READ:
            refusal = await self._check_content(req, resolved[0])
            if refusal:
                return
        self._record("sftp.request", {"id": req.id, "op": req.op, "paths": [_text(p) for p in req.paths],
                                      "resolved": list(resolved), "pflags": req.pflags})
        self._forward(req, resolved=resolved)

    async def _check_content(self, req: SftpRequest, path: str) -> bool:
        """Pre-read the head of a file opened for reading; True if the request was answered locally."""
        try:
            head = await self._head_reader(path.encode("utf-8", "surrogateescape"), HEAD_BYTES)
        except asyncssh.SFTPError as exc:
            if exc.code == FX_NO_SUCH_FILE and (req.pflags or 0) & FXF_CREAT:
                return False  # a new file has no content yet
            self._to_vendor(status_reply(req.id or 0, exc.code, exc.reason))
            return True
        except (asyncio.CancelledError, asyncio.TimeoutError, TimeoutError):
            raise
        except Exception as exc:
            why = exc.message if isinstance(exc, BrokerError) else f"its content could not be checked ({exc})"
            self._reply_local(req, Decision(False, f"{path} on {self._policy.device}: {why}; medbroker refused to "
                                            "open it", "sftp.denied", "open", path), resolved=[path])
            return True
        kind = detect_patient_data(head)
        if kind is None:
            return False
        self._reply_local(req, Decision(False, self._policy.content_reason(path, kind), "sftp.denied", "open", path),
                          resolved=[path], content=kind)
        return True

    async def _resolve_all(self, paths: tuple[bytes, ...], *, follow: bool) -> tuple[str, ...]:
        return tuple([await self._resolve(p, follow=follow) for p in paths])

    async def _resolve(self, path: bytes, *, follow: bool) -> str:
        """The device's canonical path; for targets that do not exist yet and for operations on a link
        itself (lstat, remove, rename...), the canonical parent plus the last component."""
        if follow:
            try:
                return normalize_path(_text(await self._realpath(path)))
            except asyncssh.SFTPError as exc:
                if exc.code != FX_NO_SUCH_FILE:
                    raise _DeviceStatus(exc.code, exc.reason) from None
        stripped = path.rstrip(b"/")
        parent, slash, base = stripped.rpartition(b"/")
        if not stripped or base in (b".", b".."):  # "/", "x/..": no final link to keep, resolve it all
            parent, base = stripped or b"/", b""
        elif not slash:
            parent = b"."
        elif not parent:
            parent = b"/"
        try:
            canonical = _text(await self._realpath(parent))
        except asyncssh.SFTPError as exc:
            raise _DeviceStatus(exc.code, exc.reason) from None
        return normalize_path(canonical + "/" + _text(base)) if base else normalize_path(canonical)

    async def _resolve_symlink(self, paths: tuple[bytes, ...]) -> tuple[str, ...]:
        """SYMLINK's argument order differs between the draft and OpenSSH: treat each string both as the
        new link's location and as its target (relative targets count from the other's directory)."""
        where = await self._resolve_all(paths, follow=False)
        out = list(where)
        for i, target in enumerate(paths):
            link_dir = (where[1 - i].rsplit("/", 1)[0] or "/") if len(paths) == 2 else "/"
            joined = target if target.startswith(b"/") else link_dir.encode("utf-8", "surrogateescape") + b"/" + target
            try:
                out.append(await self._resolve(joined, follow=True))
            except _DeviceStatus:
                out.append(normalize_path(_text(joined)))  # dangling targets are legal: judge them lexically
        return tuple(out)

    # ------------------------------------------------------------------------------------ device side
    def device_data(self, data: bytes) -> None:
        """Bytes the device's sftp-server sent on the channel."""
        if self._closed:
            return
        try:
            for packet in self._dreader.feed(data):
                if self._closed:
                    break
                self._from_device(packet)
        except SftpProtocolError as exc:
            self._fatal("device", exc)

    def _announce(self) -> None:
        """Tell the relay the largest reply that may reach the vendor next (see ``expect_reply``)."""
        unit = 0 if self._closed else max(SMALL_REPLY, max(self._bounds, default=0))
        if unit != self._announced:
            self._announced = unit
            if self._expect_reply is not None:
                self._expect_reply(unit)

    def _from_device(self, packet: bytes) -> None:
        rep = parse_reply(packet)
        if rep.op == "version":
            if self._version or not self._init:
                raise SftpProtocolError("a VERSION " + ("after the first" if self._version else "before any INIT"))
            self._version = True
            self._n["replied"] += 1
            self._to_vendor(rewrite_version(packet, ALLOWED_EXTENSIONS))
            return
        if not self._version:
            raise SftpProtocolError(f"a reply (packet type {rep.type}) before VERSION")
        if rep.op == "unknown":
            raise SftpProtocolError(f"packet type {rep.type} is not an SFTP v3 reply")
        inflight = self._inflight.pop(rep.id, None) if rep.id is not None else None
        if inflight is None:
            self._record("sftp.unexpected-reply", {"id": rep.id, "type": rep.type})
            raise SftpProtocolError(f"a {rep.op} reply to request id {rep.id}, which is not in flight")
        req = inflight.req
        left = self._bounds[inflight.bound] - 1
        if left:
            self._bounds[inflight.bound] = left
        else:
            del self._bounds[inflight.bound]
        if rep.op != "status" and req.op not in _REPLY_OPS.get(rep.op, ()):
            raise SftpProtocolError(f"a {rep.op} reply to a {req.op} request (id {rep.id})")
        if len(packet) > inflight.bound:  # the recorder's window was sized for at most this (issue 16)
            raise SftpProtocolError(f"a {rep.op} reply of {len(packet)} bytes to a {req.op} request (id {rep.id}); "
                                    f"at most {inflight.bound} bytes can answer it")
        self._n["replied"] += 1
        if req.op in _NAMESPACE_OPS:
            self._ns_inflight -= 1
            if not self._ns_inflight:
                self._ns_idle.set()
        out: bytes | None = packet
        if rep.op == "handle" and req.op in ("open", "opendir") and rep.handle is not None:
            self._open_handle(req, inflight.resolved, rep.handle)
        elif rep.op == "data" and req.op == "read":
            out = self._data(req, rep.data or b"", packet)
        elif rep.op == "name" and req.op in _REPLY_CHECKED:
            out = self._check_names(req, [_text(n.filename) for n in rep.names], packet)
        elif rep.op == "extended-reply" and req.op == "limits":
            mp, mr, mw, mh = parse_limits(rep.payload)  # 0 means "no limit"
            unlimited = 1 << 62
            out = extended_reply(rep.id or 0, limits_payload(min(mp or unlimited, DEFAULT_MAX_LEN - 1024),
                                                             min(mr or unlimited, MAX_DATA),
                                                             min(mw or unlimited, MAX_DATA), mh))
        elif req.op == "close" and rep.op == "status":
            closed = self._handles.get(req.handle) if req.handle is not None else None
            self._close_handle(req.handle, "refused" if closed and closed.refused else "ok")
            if closed is not None and closed.refused is not None:
                self._hold_refusal(req, closed.refused, closed.path)
                out = None
        if out is not None:
            self._to_vendor(out)
        if not left and inflight.bound == self._announced:
            self._announce()  # after the reply went out: it may have needed the larger unit

    def _open_handle(self, req: SftpRequest, resolved: tuple[str, ...], handle: bytes) -> None:
        path = resolved[0] if resolved else _text(req.paths[0])
        may_read = req.op == "open" and self._policy.decide_sftp("read", [path], mode=self._mode).allowed
        may_write = req.op == "open" and self._policy.decide_sftp("write", [path], mode=self._mode).allowed
        keep = self._uploads.open(path) if self._uploads is not None and may_write and req.op == "open" else None
        guard = self._upload_guard(path) if self._upload_guard is not None and may_write and req.op == "open" \
            and (req.pflags or 0) & FXF_WRITE else None
        self._handles[handle] = _Handle(path, "file" if req.op == "open" else "dir", may_read, may_write,
                                        opened_at=self._now(), keep=keep, guard=guard)

    def _data(self, req: SftpRequest, data: bytes, packet: bytes) -> bytes | None:
        handle = self._handles.get(req.handle) if req.handle is not None else None
        if handle is None or handle.poisoned:
            reason = handle.poisoned if handle and handle.poisoned else \
                "medbroker cannot check data read through an unknown handle"
            return status_reply(req.id or 0, FX_PERMISSION_DENIED, reason)
        found = handle.scanner.feed(data)
        if found:
            handle.poisoned = self._policy.content_reason(handle.path, found)
            self._reply_local(req, Decision(False, handle.poisoned, "sftp.denied", "read", handle.path),
                              resolved=[handle.path], content=found, offset=req.offset)
            return None
        handle.account("download", req.offset or 0, data)
        self._n["down"] += len(data)
        return packet

    def _check_names(self, req: SftpRequest, names: list[str], packet: bytes) -> bytes | None:
        for name in names:
            if self._policy.is_protected(name):
                self._reply_local(req, Decision(False, self._policy.protected_reason(name), "sftp.denied", req.op,
                                                normalize_path(name)), resolved=[name])
                return None
        return packet

    def _close_handle(self, handle_id: bytes | None, outcome: str = "ok") -> None:
        handle = self._handles.pop(handle_id, None) if handle_id is not None else None
        if handle is None or handle.kind != "file":
            return
        kept = None
        if handle.keep is not None:
            if handle.counts["upload"]:
                kept = handle.keep.finish(handle.hashes["upload"].hexdigest() if handle.sequential["upload"] else None)
            else:
                handle.keep.discard()
        for direction in ("download", "upload"):
            if handle.counts[direction]:
                record = TransferRecord(handle.path, direction, handle.counts[direction],
                                        handle.hashes[direction].hexdigest(), handle.sequential[direction],
                                        handle.opened_at, self._now(),
                                        "stopped" if handle.poisoned and direction == "download" else outcome,
                                        kept if direction == "upload" else None,
                                        handle.first_offset[direction] or 0, handle.contiguous[direction])
                self._transfers.append(record)
                self._record("transfer.file", record.as_dict())

    # ------------------------------------------------------------------------------------ lifecycle
    def _fatal(self, side: str, exc: Exception, *, may_raise: bool = True) -> None:
        if self._summary is not None and self._error is not None:
            if may_raise and self._on_fatal is None:
                raise exc
            return
        self._error = f"{side} broke the SFTP protocol: {exc}" if isinstance(exc, SftpProtocolError) else \
            f"SFTP filter stopped: {exc}"
        self.close()
        if self._on_fatal is not None:
            self._on_fatal(self._error)
        elif may_raise:
            raise exc

    def close(self) -> SftpSummary:
        """Stop filtering; report open handles' transfers and ``sftp.summary``. Idempotent.

        :return: the channel's :class:`SftpSummary`
        """
        if self._summary is not None:
            return self._summary
        self._closed = True
        self._announce()  # withdrawn: no reply of this channel reaches the vendor any more
        if self._worker is not None:
            self._worker.cancel()
        for handle_id in list(self._handles):
            self._close_handle(handle_id, "interrupted")  # the channel ended with the file still open
        if self._uploads is not None:
            self._uploads.close()
        n = self._n
        self._summary = SftpSummary(n["requests"], n["forwarded"], n["denied"], n["down"], n["up"],
                                    tuple(self._transfers), self._error, n["replied"], len(self._inflight))
        self._record("sftp.summary", self._summary.as_dict())
        return self._summary

    async def wait_closed(self) -> None:
        """Wait until a cancelled path check has finished unwinding."""
        worker = self._worker
        if worker is not None:
            try:
                await worker
            except asyncio.CancelledError:
                pass
