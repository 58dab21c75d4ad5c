"""SFTP v3 wire format: incremental packet framing, request and reply parsing, reply builders (no SSH).

draft-ietf-secsh-filexfer-02 (version 3, what OpenSSH speaks) plus the OpenSSH extensions in
PROTOCOL.sftp-server-ish form. Every parser works on one complete packet (as :class:`PacketReader`
returns it, length prefix included) and raises :class:`SftpProtocolError` with a sentence for any
truncated or malformed input, never IndexError or struct.error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Collection, Iterable

from medcore.errors import BrokerError

__all__ = [
    "FXP_INIT", "FXP_VERSION", "FXP_OPEN", "FXP_CLOSE", "FXP_READ", "FXP_WRITE", "FXP_LSTAT", "FXP_FSTAT",
    "FXP_SETSTAT", "FXP_FSETSTAT", "FXP_OPENDIR", "FXP_READDIR", "FXP_REMOVE", "FXP_MKDIR", "FXP_RMDIR",
    "FXP_REALPATH", "FXP_STAT", "FXP_RENAME", "FXP_READLINK", "FXP_SYMLINK", "FXP_STATUS", "FXP_HANDLE",
    "FXP_DATA", "FXP_NAME", "FXP_ATTRS", "FXP_EXTENDED", "FXP_EXTENDED_REPLY",
    "FX_OK", "FX_EOF", "FX_NO_SUCH_FILE", "FX_PERMISSION_DENIED", "FX_FAILURE", "FX_BAD_MESSAGE",
    "FX_NO_CONNECTION", "FX_CONNECTION_LOST", "FX_OP_UNSUPPORTED",
    "FXF_READ", "FXF_WRITE", "FXF_APPEND", "FXF_CREAT", "FXF_TRUNC", "FXF_EXCL",
    "DEFAULT_MAX_LEN", "EXTENSION_OPS", "REQUEST_OPS",
    "SftpProtocolError", "PacketReader", "SftpAttrs", "SftpName", "SftpRequest", "SftpReply",
    "parse_request", "rewrite_request_paths", "parse_reply", "parse_attrs", "frame", "u32", "u64", "string", "attrs_bytes",
    "status_reply", "version_packet", "init_packet", "rewrite_version", "read_request", "limits_payload",
    "parse_limits", "extended_reply",
]

FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ, FXP_WRITE = 1, 2, 3, 4, 5, 6
FXP_LSTAT, FXP_FSTAT, FXP_SETSTAT, FXP_FSETSTAT, FXP_OPENDIR, FXP_READDIR = 7, 8, 9, 10, 11, 12
FXP_REMOVE, FXP_MKDIR, FXP_RMDIR, FXP_REALPATH, FXP_STAT, FXP_RENAME = 13, 14, 15, 16, 17, 18
FXP_READLINK, FXP_SYMLINK = 19, 20
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS = 101, 102, 103, 104, 105
FXP_EXTENDED, FXP_EXTENDED_REPLY = 200, 201

FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE = 0, 1, 2, 3, 4
FX_BAD_MESSAGE, FX_NO_CONNECTION, FX_CONNECTION_LOST, FX_OP_UNSUPPORTED = 5, 6, 7, 8

FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_ACMODTIME, _ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000

DEFAULT_MAX_LEN = 256 * 1024 + 1024
"""Largest accepted packet length field (OpenSSH's SFTP_MAX_MSG_LENGTH is 256 KiB)."""

# request type -> (op name, argument layout); layout letters: p path, h handle, a attrs, o u64 offset,
# l u32 length, d data string, f u32 pflags
_REQUESTS = {
    FXP_OPEN: ("open", "pfa"), FXP_CLOSE: ("close", "h"), FXP_READ: ("read", "hol"), FXP_WRITE: ("write", "hod"),
    FXP_LSTAT: ("lstat", "p"), FXP_FSTAT: ("fstat", "h"), FXP_SETSTAT: ("setstat", "pa"),
    FXP_FSETSTAT: ("fsetstat", "ha"), FXP_OPENDIR: ("opendir", "p"), FXP_READDIR: ("readdir", "h"),
    FXP_REMOVE: ("remove", "p"), FXP_MKDIR: ("mkdir", "pa"), FXP_RMDIR: ("rmdir", "p"),
    FXP_REALPATH: ("realpath", "p"), FXP_STAT: ("stat", "p"), FXP_RENAME: ("rename", "pp"),
    FXP_READLINK: ("readlink", "p"), FXP_SYMLINK: ("symlink", "pp"),
}
_EXTENSIONS = {
    b"posix-rename@openssh.com": ("posix-rename", "pp"), b"hardlink@openssh.com": ("hardlink", "pp"),
    b"statvfs@openssh.com": ("statvfs", "p"), b"fstatvfs@openssh.com": ("fstatvfs", "h"),
    b"fsync@openssh.com": ("fsync", "h"), b"lsetstat@openssh.com": ("lsetstat", "pa"),
    b"limits@openssh.com": ("limits", ""), b"expand-path@openssh.com": ("expand-path", "p"),
    b"copy-data": ("copy-data", "hoL"), b"home-directory": ("home-directory", "s"),
    b"users-groups-by-id@openssh.com": ("users-groups-by-id", "ss"),
}
EXTENSION_OPS = {name: op for name, (op, _) in _EXTENSIONS.items()}
"""Extension request name -> op name used by sessions/policy.py."""
REQUEST_OPS = frozenset({"init", *(op for op, _ in _REQUESTS.values()), *EXTENSION_OPS.values()})


class SftpProtocolError(BrokerError):
    """A peer sent bytes that are not a well-formed SFTP v3 packet; the channel should be closed."""


def u32(n: int) -> bytes:
    """uint32, big endian."""
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    """uint64, big endian."""
    return struct.pack(">Q", n)


def string(b: bytes) -> bytes:
    """SSH string: uint32 length + bytes."""
    return struct.pack(">I", len(b)) + b


def frame(ptype: int, body: bytes) -> bytes:
    """A complete packet: uint32 length, byte type, body."""
    return struct.pack(">IB", len(body) + 1, ptype) + body


@dataclass(frozen=True)
class SftpAttrs:
    """SFTP v3 ATTRS; absent fields are None."""

    flags: int = 0
    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    permissions: int | None = None
    atime: int | None = None
    mtime: int | None = None
    extended: tuple[tuple[bytes, bytes], ...] = ()


def attrs_bytes(a: SftpAttrs) -> bytes:
    """Encode ATTRS (flags recomputed from the fields present)."""
    flags, out = 0, b""
    if a.size is not None:
        flags, out = flags | _ATTR_SIZE, out + u64(a.size)
    if a.uid is not None and a.gid is not None:
        flags, out = flags | _ATTR_UIDGID, out + u32(a.uid) + u32(a.gid)
    if a.permissions is not None:
        flags, out = flags | _ATTR_PERMISSIONS, out + u32(a.permissions)
    if a.atime is not None and a.mtime is not None:
        flags, out = flags | _ATTR_ACMODTIME, out + u32(a.atime) + u32(a.mtime)
    if a.extended:
        flags = flags | _ATTR_EXTENDED
        out += u32(len(a.extended)) + b"".join(string(k) + string(v) for k, v in a.extended)
    return u32(flags) + out


@dataclass(frozen=True)
class SftpName:
    """One entry of a NAME reply."""

    filename: bytes
    longname: bytes
    attrs: SftpAttrs


@dataclass(frozen=True)
class SftpRequest:
    """A parsed client request. ``raw`` is the whole packet, length prefix included.

    ``paths`` lists every path argument in wire order (both for rename/symlink/links). ``op`` is the
    policy name (``open``, ``posix-rename``; ``extended`` for unknown extensions, ``unknown`` for
    unknown packet types). ``args`` holds op-specific extras: for ``copy-data`` (write handle, write
    offset); for ``home-directory`` (user name,); for ``users-groups-by-id`` (uid list, gid list).
    """

    type: int
    id: int | None
    op: str
    paths: tuple[bytes, ...] = ()
    pflags: int | None = None
    handle: bytes | None = None
    offset: int | None = None
    length: int | None = None
    extension: bytes | None = None
    attrs: SftpAttrs | None = None
    data: bytes | None = None
    version: int | None = None
    args: tuple = ()
    raw: bytes = b""


@dataclass(frozen=True)
class SftpReply:
    """A parsed server reply. ``op`` is status, handle, data, name, attrs, extended-reply, version or
    unknown; ``payload`` is the body of an EXTENDED_REPLY (its layout depends on the request)."""

    type: int
    id: int | None
    op: str
    code: int | None = None
    message: bytes = b""
    lang: bytes = b""
    handle: bytes | None = None
    data: bytes | None = None
    names: tuple[SftpName, ...] = ()
    attrs: SftpAttrs | None = None
    payload: bytes = b""
    version: int | None = None
    extensions: tuple[tuple[bytes, bytes], ...] = ()
    raw: bytes = b""


class PacketReader:
    """Splits a byte stream into complete SFTP packets (each returned with its length prefix).

    :param max_len: the largest acceptable length field; longer ones raise (memory DoS guard)
    """

    def __init__(self, max_len: int = DEFAULT_MAX_LEN) -> None:
        self._buf = bytearray()
        self._max = max_len
        self._error: SftpProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back, waiting for the rest of a packet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the packets they complete, in order.

        :raises SftpProtocolError: a length field of 0 or over ``max_len``; once raised, every later
            call raises the same error (the stream cannot be resynchronised)
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = struct.unpack_from(">I", buf, pos)
            if n == 0 or n > self._max:
                self._error = SftpProtocolError(
                    f"SFTP packet length {n} is outside 1..{self._max} bytes; the peer is not speaking SFTP v3 "
                    "or is misbehaving", "the channel is closed; reconnect with a standard sftp client")
                raise self._error
            if end - pos < 4 + n:
                break
            out.append(bytes(buf[pos:pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


class _Cursor:
    """Bounds-checked reader over one packet; every shortfall becomes SftpProtocolError."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise SftpProtocolError(f"truncated SFTP {self.what}: {n} more bytes needed at offset {self.pos} "
                                    f"of a {len(self.buf)}-byte packet")

    def u32(self) -> int:
        self._need(4)
        (v,) = struct.unpack_from(">I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self._need(8)
        (v,) = struct.unpack_from(">Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> bytes:
        n = self.u32()
        self._need(n)
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def attrs(self) -> SftpAttrs:
        flags = self.u32()
        size = self.u64() if flags & _ATTR_SIZE else None
        uid, gid = (self.u32(), self.u32()) if flags & _ATTR_UIDGID else (None, None)
        perms = self.u32() if flags & _ATTR_PERMISSIONS else None
        atime, mtime = (self.u32(), self.u32()) if flags & _ATTR_ACMODTIME else (None, None)
        ext: list[tuple[bytes, bytes]] = []
        if flags & _ATTR_EXTENDED:
            count = self.u32()
            self._need(8 * count)  # each pair is at least two empty strings
            ext = [(self.string(), self.string()) for _ in range(count)]
        return SftpAttrs(flags, size, uid, gid, perms, atime, mtime, tuple(ext))

    def rest(self) -> bool:
        return self.pos < len(self.buf)


def parse_attrs(buf: bytes, pos: int = 0) -> tuple[SftpAttrs, int]:
    """Parse ATTRS at ``buf[pos:]``; return them and the offset after them.

    :raises SftpProtocolError: truncated attributes
    """
    cur = _Cursor(buf, pos, "attributes")
    return cur.attrs(), cur.pos


def _header(packet: bytes, what: str) -> tuple[int, int]:
    if len(packet) < 5:
        raise SftpProtocolError(f"truncated SFTP {what}: {len(packet)} bytes, at least 5 needed")
    (n,) = struct.unpack_from(">I", packet, 0)
    if n != len(packet) - 4:
        raise SftpProtocolError(f"SFTP {what} length field says {n} bytes but {len(packet) - 4} follow")
    return n, packet[4]


def parse_request(packet: bytes) -> SftpRequest:
    """Parse one client->server packet.

    :param packet: a complete packet, length prefix included (as PacketReader returns it)
    :return: the request; unknown packet types give ``op="unknown"``, unknown extensions ``op="extended"``
    :raises SftpProtocolError: truncated or malformed packet
    """
    _, ptype = _header(packet, "request")
    if ptype == FXP_INIT:
        cur = _Cursor(packet, 5, "INIT")
        version = cur.u32()
        return SftpRequest(ptype, None, "init", version=version, raw=packet)
    cur = _Cursor(packet, 5, f"request type {ptype}")
    rid = cur.u32()
    if ptype in _REQUESTS:
        op, layout = _REQUESTS[ptype]
        ext = None
    elif ptype == FXP_EXTENDED:
        ext = cur.string()
        op, layout = _EXTENSIONS.get(ext, ("extended", ""))
    else:
        return SftpRequest(ptype, rid, "unknown", raw=packet)
    cur.what = f"{op} request"
    fields: dict = {"paths": []}
    args: list = []
    for code in layout:
        if code == "p":
            fields["paths"].append(cur.string())
        elif code == "h":
            fields.setdefault("handle", cur.string())
        elif code == "f":
            fields["pflags"] = cur.u32()
        elif code == "a":
            fields["attrs"] = cur.attrs()
        elif code == "o":
            fields["offset"] = cur.u64()
        elif code == "l":
            fields["length"] = cur.u32()
        elif code == "d":
            fields["data"] = cur.string()
        elif code == "L":  # copy-data: read length (u64), write handle, write offset
            fields["length"] = cur.u64()
            args = [cur.string(), cur.u64()]
        elif code == "s":
            args.append(cur.string())
    return SftpRequest(ptype, rid, op, tuple(fields.pop("paths")), extension=ext, args=tuple(args), raw=packet,
                       **fields)


def rewrite_request_paths(packet: bytes, rewrite: Callable[[bytes], bytes | None]) -> bytes | None:
    """The request ``packet`` with each path argument ``p`` replaced by ``rewrite(p)`` (None keeps it), length
    prefix fixed; None when no path changed. Other fields are copied byte for byte.

    :raises SftpProtocolError: truncated or malformed packet (as :func:`parse_request`)
    """
    _, ptype = _header(packet, "request")
    if ptype == FXP_INIT:
        return None
    cur = _Cursor(packet, 5, f"request type {ptype}")
    cur.u32()  # request id
    if ptype in _REQUESTS:
        layout = _REQUESTS[ptype][1]
    elif ptype == FXP_EXTENDED:
        layout = _EXTENSIONS.get(cur.string(), ("extended", ""))[1]
    else:
        return None
    pieces: list[bytes] = []
    last, changed = 4, False  # copy from after the length prefix
    for code in layout:
        if code != "p":
            if code in "hds":
                cur.string()
            elif code == "a":
                cur.attrs()
            elif code == "o":
                cur.u64()
            elif code in "lf":
                cur.u32()
            elif code == "L":
                cur.u64(), cur.string(), cur.u64()
            continue
        start = cur.pos
        path = cur.string()
        new = rewrite(path)
        if new is not None and new != path:
            pieces += [packet[last:start], string(new)]
            last, changed = cur.pos, True
    if not changed:
        return None
    body = b"".join(pieces) + packet[last:]
    return u32(len(body)) + body


def parse_reply(packet: bytes) -> SftpReply:
    """Parse one server->client packet.

    :param packet: a complete packet, length prefix included
    :return: the reply (``op="unknown"`` for unknown types, with only ``id`` parsed)
    :raises SftpProtocolError: truncated or malformed packet
    """
    _, ptype = _header(packet, "reply")
    if ptype == FXP_VERSION:
        cur = _Cursor(packet, 5, "VERSION")
        version = cur.u32()
        ext = []
        while cur.rest():
            ext.append((cur.string(), cur.string()))
        return SftpReply(ptype, None, "version", version=version, extensions=tuple(ext), raw=packet)
    cur = _Cursor(packet, 5, f"reply type {ptype}")
    rid = cur.u32()
    if ptype == FXP_STATUS:
        cur.what = "STATUS reply"
        code = cur.u32()
        msg = cur.string() if cur.rest() else b""  # some old servers omit message and language
        lang = cur.string() if cur.rest() else b""
        return SftpReply(ptype, rid, "status", code=code, message=msg, lang=lang, raw=packet)
    if ptype == FXP_HANDLE:
        cur.what = "HANDLE reply"
        return SftpReply(ptype, rid, "handle", handle=cur.string(), raw=packet)
    if ptype == FXP_DATA:
        cur.what = "DATA reply"
        return SftpReply(ptype, rid, "data", data=cur.string(), raw=packet)
    if ptype == FXP_NAME:
        cur.what = "NAME reply"
        count = cur.u32()
        cur._need(12 * count)  # each entry is at least two empty strings and a flags word
        names = tuple(SftpName(cur.string(), cur.string(), cur.attrs()) for _ in range(count))
        return SftpReply(ptype, rid, "name", names=names, raw=packet)
    if ptype == FXP_ATTRS:
        cur.what = "ATTRS reply"
        return SftpReply(ptype, rid, "attrs", attrs=cur.attrs(), raw=packet)
    if ptype == FXP_EXTENDED_REPLY:
        return SftpReply(ptype, rid, "extended-reply", payload=packet[9:], raw=packet)
    return SftpReply(ptype, rid, "unknown", raw=packet)


def status_reply(rid: int, code: int, message: str, lang: str = "en") -> bytes:
    """A STATUS packet: the broker's local answer to a request it will not forward."""
    return frame(FXP_STATUS, u32(rid) + u32(code) + string(message.encode("utf-8")) + string(lang.encode()))


def version_packet(version: int, extensions: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A VERSION packet advertising ``extensions`` as (name, data) pairs."""
    return frame(FXP_VERSION, u32(version) + b"".join(string(n) + string(d) for n, d in extensions))


def init_packet(version: int = 3) -> bytes:
    """An INIT packet."""
    return frame(FXP_INIT, u32(version))


def rewrite_version(packet: bytes, allowed: Collection[bytes], *, max_version: int = 3) -> bytes:
    """Keep only ``allowed`` extensions (in the server's order) in a VERSION packet.

    :raises SftpProtocolError: not a VERSION packet, or a version above ``max_version``
    """
    reply = parse_reply(packet)
    if reply.op != "version":
        raise SftpProtocolError(f"expected an SFTP VERSION packet, got type {reply.type}")
    if reply.version is None or reply.version > max_version:
        raise SftpProtocolError(f"the server chose SFTP version {reply.version}; medbroker speaks version 3 only")
    return version_packet(reply.version, [(n, d) for n, d in reply.extensions if n in allowed])


def read_request(rid: int, handle: bytes, offset: int, length: int) -> bytes:
    """A READ packet (used to cap read lengths)."""
    return frame(FXP_READ, u32(rid) + string(handle) + u64(offset) + u32(length))


def extended_reply(rid: int, payload: bytes) -> bytes:
    """An EXTENDED_REPLY packet."""
    return frame(FXP_EXTENDED_REPLY, u32(rid) + payload)


def limits_payload(max_packet: int, max_read: int, max_write: int, max_handles: int) -> bytes:
    """The body of a ``limits@openssh.com`` reply."""
    return u64(max_packet) + u64(max_read) + u64(max_write) + u64(max_handles)


def parse_limits(payload: bytes) -> tuple[int, int, int, int]:
    """(max packet, max read, max write, max open handles) from a ``limits@openssh.com`` reply body.

    :raises SftpProtocolError: fewer than 32 bytes
    """
    cur = _Cursor(payload, 0, "limits reply")
    return cur.u64(), cur.u64(), cur.u64(), cur.u64()
