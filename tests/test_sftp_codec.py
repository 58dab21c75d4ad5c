"""SFTP v3 codec: framing under any chunking, every request and reply type, builders, garbage handling."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from sessions.sftp_codec import (
    DEFAULT_MAX_LEN,
    EXTENSION_OPS,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    FXF_CREAT,
    FXF_READ,
    FXF_WRITE,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_EXTENDED,
    FXP_FSETSTAT,
    FXP_HANDLE,
    FXP_INIT,
    FXP_LSTAT,
    FXP_MKDIR,
    FXP_NAME,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READDIR,
    FXP_REALPATH,
    FXP_REMOVE,
    FXP_RENAME,
    FXP_RMDIR,
    FXP_SETSTAT,
    FXP_STAT,
    FXP_STATUS,
    FXP_SYMLINK,
    FXP_WRITE,
    PacketReader,
    SftpAttrs,
    SftpProtocolError,
    attrs_bytes,
    extended_reply,
    frame,
    init_packet,
    limits_payload,
    parse_attrs,
    parse_limits,
    parse_reply,
    parse_request,
    read_request,
    rewrite_version,
    status_reply,
    string,
    u32,
    u64,
    version_packet,
)

EMPTY = u32(0)
FULL_ATTRS = SftpAttrs(0x8000000F, 1234, 1000, 1000, 0o100644, 1700000000, 1700000001, ((b"acl@x", b"v"),))


def _req(ptype: int, rid: int, body: bytes) -> bytes:
    return frame(ptype, u32(rid) + body)


def _ext(rid: int, name: bytes, body: bytes = b"") -> bytes:
    return frame(FXP_EXTENDED, u32(rid) + string(name) + body)


REQUESTS = {
    "open": _req(FXP_OPEN, 1, string(b"/a") + u32(FXF_READ) + attrs_bytes(FULL_ATTRS)),
    "close": _req(FXP_CLOSE, 2, string(b"h1")),
    "read": read_request(3, b"h1", 65536, 32768),
    "write": _req(FXP_WRITE, 4, string(b"h1") + u64(10) + string(b"payload")),
    "lstat": _req(FXP_LSTAT, 5, string(b"/l")),
    "setstat": _req(FXP_SETSTAT, 6, string(b"/s") + attrs_bytes(SftpAttrs(permissions=0o600))),
    "fsetstat": _req(FXP_FSETSTAT, 7, string(b"h") + EMPTY),
    "opendir": _req(FXP_OPENDIR, 8, string(b"/d")),
    "readdir": _req(FXP_READDIR, 9, string(b"h2")),
    "remove": _req(FXP_REMOVE, 10, string(b"/r")),
    "mkdir": _req(FXP_MKDIR, 11, string(b"/m") + EMPTY),
    "rmdir": _req(FXP_RMDIR, 12, string(b"/rm")),
    "realpath": _req(FXP_REALPATH, 13, string(b".")),
    "stat": _req(FXP_STAT, 14, string(b"/st")),
    "rename": _req(FXP_RENAME, 15, string(b"/old") + string(b"/new")),
    "symlink": _req(FXP_SYMLINK, 16, string(b"/target") + string(b"/link")),
    "posix-rename": _ext(17, b"posix-rename@openssh.com", string(b"/o") + string(b"/n")),
    "hardlink": _ext(18, b"hardlink@openssh.com", string(b"/o") + string(b"/n")),
    "statvfs": _ext(19, b"statvfs@openssh.com", string(b"/")),
    "fstatvfs": _ext(20, b"fstatvfs@openssh.com", string(b"h")),
    "fsync": _ext(21, b"fsync@openssh.com", string(b"h")),
    "lsetstat": _ext(22, b"lsetstat@openssh.com", string(b"/ls") + EMPTY),
    "limits": _ext(23, b"limits@openssh.com"),
    "expand-path": _ext(24, b"expand-path@openssh.com", string(b"~/x")),
    "copy-data": _ext(25, b"copy-data", string(b"hr") + u64(0) + u64(100) + string(b"hw") + u64(5)),
    "home-directory": _ext(26, b"home-directory", string(b"alice")),
    "users-groups-by-id": _ext(27, b"users-groups-by-id@openssh.com", string(u32(0)) + string(b"")),
}


def test_parse_every_request_type() -> None:
    parsed = {op: parse_request(raw) for op, raw in REQUESTS.items()}
    for op, req in parsed.items():
        assert req.op == op and req.raw == REQUESTS[op]
    assert parsed["open"].paths == (b"/a",) and parsed["open"].pflags == FXF_READ and parsed["open"].attrs == FULL_ATTRS
    assert (parsed["read"].handle, parsed["read"].offset, parsed["read"].length) == (b"h1", 65536, 32768)
    assert parsed["write"].data == b"payload" and parsed["write"].offset == 10
    assert parsed["rename"].paths == (b"/old", b"/new") and parsed["symlink"].paths == (b"/target", b"/link")
    assert parsed["posix-rename"].extension == b"posix-rename@openssh.com"
    assert parsed["posix-rename"].paths == (b"/o", b"/n") and parsed["hardlink"].paths == (b"/o", b"/n")
    cd = parsed["copy-data"]
    assert (cd.handle, cd.offset, cd.length, cd.args) == (b"hr", 0, 100, (b"hw", 5))
    assert parsed["home-directory"].args == (b"alice",) and parsed["home-directory"].paths == ()
    assert parsed["realpath"].id == 13


def test_init_unknown_type_and_unknown_extension() -> None:
    init = parse_request(init_packet(3))
    assert (init.op, init.version, init.id) == ("init", 3, None)
    assert parse_request(_req(21, 5, b"whatever")).op == "unknown"
    ext = parse_request(_ext(6, b"check-file-name", string(b"/x")))
    assert (ext.op, ext.extension, ext.id) == ("extended", b"check-file-name", 6)
    assert set(EXTENSION_OPS.values()) <= {r.op for r in map(parse_request, REQUESTS.values())}


def test_parse_replies() -> None:
    st_ = parse_reply(status_reply(7, FX_PERMISSION_DENIED, "nope: /data/dicom"))
    assert (st_.op, st_.id, st_.code, st_.message, st_.lang) == ("status", 7, 3, b"nope: /data/dicom", b"en")
    short = parse_reply(frame(FXP_STATUS, u32(8) + u32(0)))  # old servers omit message and language
    assert (short.code, short.message) == (0, b"")
    assert parse_reply(frame(FXP_HANDLE, u32(1) + string(b"\x00\x01"))).handle == b"\x00\x01"
    assert parse_reply(frame(FXP_DATA, u32(2) + string(b"abc"))).data == b"abc"
    names = parse_reply(frame(FXP_NAME, u32(3) + u32(2) + string(b"a") + string(b"-rw a") + attrs_bytes(FULL_ATTRS)
                              + string(b"b") + string(b"") + EMPTY)).names
    assert [n.filename for n in names] == [b"a", b"b"] and names[0].attrs == FULL_ATTRS
    assert parse_reply(frame(FXP_ATTRS, u32(4) + attrs_bytes(FULL_ATTRS))).attrs == FULL_ATTRS
    ext = parse_reply(extended_reply(5, limits_payload(262144, 261120, 261120, 1024)))
    assert ext.op == "extended-reply" and parse_limits(ext.payload) == (262144, 261120, 261120, 1024)
    ver = parse_reply(version_packet(3, [(b"posix-rename@openssh.com", b"1")]))
    assert (ver.op, ver.version, ver.extensions) == ("version", 3, ((b"posix-rename@openssh.com", b"1"),))
    assert parse_reply(frame(99, u32(9))).op == "unknown"


def test_rewrite_version_keeps_only_allowed_extensions_in_server_order() -> None:
    v = version_packet(3, [(b"copy-data", b"1"), (b"posix-rename@openssh.com", b"1"), (b"ranges@asyncssh.com", b"1"),
                           (b"limits@openssh.com", b"1")])
    out = parse_reply(rewrite_version(v, {b"limits@openssh.com", b"posix-rename@openssh.com"}))
    assert out.extensions == ((b"posix-rename@openssh.com", b"1"), (b"limits@openssh.com", b"1"))
    with pytest.raises(SftpProtocolError, match="version 6"):
        rewrite_version(version_packet(6), set())
    with pytest.raises(SftpProtocolError, match="expected an SFTP VERSION"):
        rewrite_version(status_reply(1, 0, "ok"), set())


def test_status_reply_is_what_clients_expect() -> None:
    pkt = status_reply(0x01020304, FX_OP_UNSUPPORTED, "no")
    assert pkt == (struct.pack(">IBIII", 21, FXP_STATUS, 0x01020304, FX_OP_UNSUPPORTED, 2) + b"no"
                   + struct.pack(">I", 2) + b"en")
    assert pkt[:4] == struct.pack(">I", len(pkt) - 4) and pkt[4] == FXP_STATUS
    assert parse_reply(pkt).code == FX_OP_UNSUPPORTED


# ---------------------------------------------------------------------------------------------- framing
packets = st.lists(st.sampled_from(sorted(REQUESTS.values())) | st.binary(min_size=1, max_size=300).map(
    lambda b: frame(b[0], b[1:])), min_size=1, max_size=20)


@given(packets, st.lists(st.integers(1, 64), min_size=1, max_size=30))
def test_any_split_yields_the_same_packets(pkts: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(pkts)
    reader, out, pos, k = PacketReader(), [], 0, 0
    while pos < len(stream):
        size = sizes[k % len(sizes)]
        out += reader.feed(stream[pos:pos + size])
        pos, k = pos + size, k + 1
    assert out == pkts and reader.buffered == 0


def test_partial_packet_is_held_back() -> None:
    pkt = REQUESTS["open"]
    reader = PacketReader()
    assert reader.feed(pkt[:-1]) == [] and reader.buffered == len(pkt) - 1
    assert reader.feed(pkt[-1:] + pkt[:2]) == [pkt] and reader.buffered == 2


@given(st.integers(DEFAULT_MAX_LEN + 1, 2**32 - 1) | st.just(0))
def test_oversize_or_empty_length_is_rejected_and_sticks(n: int) -> None:
    reader = PacketReader()
    with pytest.raises(SftpProtocolError, match=f"length {n} is outside"):
        reader.feed(REQUESTS["stat"] + struct.pack(">I", n) + b"\x03")
    with pytest.raises(SftpProtocolError):
        reader.feed(REQUESTS["stat"])  # the stream cannot be resynchronised


def test_max_len_is_configurable() -> None:
    big = _req(FXP_WRITE, 1, string(b"h") + u64(0) + string(b"x" * 5000))
    assert PacketReader(max_len=10_000).feed(big) == [big]
    with pytest.raises(SftpProtocolError):
        PacketReader(max_len=4096).feed(big)


# ---------------------------------------------------------------------------------------------- garbage
@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.binary(max_size=400))
def test_garbage_never_raises_anything_but_protocol_error(data: bytes) -> None:
    for parse in (parse_request, parse_reply):
        for candidate in (data, frame(data[0], data[1:]) if data else data):
            try:
                parse(candidate)
            except SftpProtocolError as exc:
                assert str(exc)
    try:
        PacketReader().feed(data)
    except SftpProtocolError:
        pass
    try:
        parse_attrs(data)
    except SftpProtocolError:
        pass


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.sampled_from(sorted(REQUESTS.values())), st.data())
def test_every_truncation_is_a_clear_error(pkt: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(5, len(pkt) - 1))
    body = pkt[4:cut]
    truncated = struct.pack(">I", len(body)) + body
    try:
        req = parse_request(truncated)
    except SftpProtocolError as exc:
        assert "truncated" in str(exc)
    else:  # only layouts that end in optional parts can be cut and still parse (e.g. empty trailing attrs)
        assert req.op in ("extended", "unknown", "limits") or req.raw == truncated


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.binary(min_size=1, max_size=200))
def test_bit_flipped_requests_give_a_request_or_a_protocol_error(noise: bytes) -> None:
    for pkt in REQUESTS.values():
        body = bytearray(pkt[4:])
        for i, b in enumerate(noise[:len(body)]):
            body[i] ^= b
        try:
            parse_request(frame(body[0], bytes(body[1:])))
        except SftpProtocolError:
            pass


def test_attrs_count_cannot_force_huge_allocation() -> None:
    evil = u32(0x80000000) + u32(0xFFFFFFFF)
    with pytest.raises(SftpProtocolError, match="truncated"):
        parse_attrs(evil)
    with pytest.raises(SftpProtocolError, match="truncated"):
        parse_reply(frame(FXP_NAME, u32(1) + u32(0xFFFFFFFF)))


def test_error_messages_say_what_was_truncated() -> None:
    with pytest.raises(SftpProtocolError, match=r"truncated SFTP open request: 100 more bytes needed"):
        parse_request(frame(FXP_OPEN, u32(1) + u32(100) + b"ab"))
    with pytest.raises(SftpProtocolError, match="at least 5 needed"):
        parse_request(b"\0\0\0")
    with pytest.raises(SftpProtocolError, match="length field says"):
        parse_request(REQUESTS["stat"] + b"x")
    assert isinstance(SftpProtocolError("x"), Exception)
    assert FXF_CREAT | FXF_WRITE == 0x0A and FXP_INIT == 1
