"""PROXY protocol version 2 headers (what HAProxy's ``send-proxy-v2`` sends first on a connection): parse one.

The format is HAProxy's specification (doc/proxy-protocol.txt, section 2.2): a 12-byte signature, a
version/command byte, a family/transport byte, a 16-bit length, then the addresses and TLVs. Only what a
TCP balancer in front of an SSH server sends is accepted: version 2, command LOCAL (the balancer's own
health check) or PROXY over TCP/IPv4 or TCP/IPv6. TLVs are walked to check they fit and are otherwise
ignored. The parser is incremental (``None`` = send more bytes) and bounded: a header longer than
:data:`MAX_HEADER` is refused before it is read, and any malformed input raises :class:`ProxyHeaderError`
with a sentence, never IndexError or struct.error.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from medcore.errors import BrokerError

__all__ = ["SIGNATURE", "MAX_HEADER", "ProxyHeader", "ProxyHeaderError", "parse_proxy_header", "looks_like_proxy",
           "build_proxy_header"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every version 2 header starts with (chosen so that no text protocol starts like it)."""
_V1_PREFIX = b"PROXY "  # version 1, the text form (HAProxy's plain send-proxy)
MAX_HEADER = 16 + 1024
"""Largest header accepted, fixed part included. HAProxy sends 28 (IPv4) or 52 (IPv6) bytes plus any TLVs
it was told to add (unique id, TLS details, authority): a kibibyte covers those; the 16-bit length field
alone would let a peer make the broker buffer 64 KiB before it can say no."""

_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6 = 0x11, 0x21
_FAMILIES = {0x00: "UNSPEC", 0x11: "TCP over IPv4", 0x12: "UDP over IPv4", 0x21: "TCP over IPv6",
             0x22: "UDP over IPv6", 0x31: "a UNIX stream socket", 0x32: "a UNIX datagram socket"}


class ProxyHeaderError(BrokerError):
    """The bytes are not a PROXY protocol v2 header this broker accepts (the message says why)."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header. ``local``: the balancer's own connection (a health check), no client address.
    ``source``/``source_port``: the client as the balancer saw it (an IPv4-mapped IPv6 address is given as
    IPv4); ``dest``/``dest_port``: the address the client connected to. ``length``: bytes the header took."""

    local: bool
    length: int
    source: str | None = None
    source_port: int = 0
    dest: str | None = None
    dest_port: int = 0


def looks_like_proxy(data: bytes) -> bool:
    """Do these first bytes of a connection start a PROXY protocol header (version 1 or 2)? Also true for a
    prefix of one: an SSH client's first bytes are ``SSH-``, which starts neither."""
    if not data:
        return False
    n = min(len(data), len(SIGNATURE))
    m = min(len(data), len(_V1_PREFIX))
    return data[:n] == SIGNATURE[:n] or data[:m] == _V1_PREFIX[:m]


def _address(raw: bytes) -> str:
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _check_tlvs(data: bytes) -> None:
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyHeaderError(f"PROXY header: a TLV header is cut short ({len(data) - i} bytes left)")
        size = int.from_bytes(data[i + 1:i + 3], "big")
        if i + 3 + size > len(data):
            raise ProxyHeaderError(f"PROXY header: TLV type 0x{data[i]:02x} claims {size} bytes; "
                                   f"{len(data) - i - 3} remain")
        i += 3 + size


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the header at the start of ``data``.

    :returns: the header (``length`` bytes of ``data`` belong to it; what follows is the client's stream), or
        None when ``data`` is a correct beginning that needs more bytes
    :raises ProxyHeaderError: not a version 2 header, a version or command other than 2 / LOCAL / PROXY, a
        family other than TCP over IPv4/IPv6, addresses cut short, TLVs that do not fit, or longer than
        :data:`MAX_HEADER`
    """
    head = data[:len(SIGNATURE)]
    if head != SIGNATURE[:len(head)]:
        if _V1_PREFIX.startswith(data[:len(_V1_PREFIX)]):
            raise ProxyHeaderError("a PROXY protocol version 1 (text) header; this broker reads version 2 only",
                                   "use send-proxy-v2 on the balancer's server lines")
        if data.startswith(b"SSH-"):
            raise ProxyHeaderError("no PROXY protocol header: the connection starts with an SSH version line",
                                   "a client connected to the broker directly from a balancer address; "
                                   "connect through the balancer, or remove the address from "
                                   "listen.proxy_protocol_from")
        raise ProxyHeaderError(f"no PROXY protocol v2 signature (first bytes {data[:12]!r})")
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"PROXY header version {version}; only version 2 is accepted")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY header command 0x{command:x}; expected LOCAL (0) or PROXY (1)")
    size = int.from_bytes(data[14:16], "big")
    if 16 + size > MAX_HEADER:
        raise ProxyHeaderError(f"PROXY header of {16 + size} bytes; at most {MAX_HEADER} are accepted")
    if len(data) < 16 + size:
        return None
    body = data[16:16 + size]
    family = data[13]
    if command == _LOCAL:  # the balancer speaking for itself: the spec says to ignore the address block
        return ProxyHeader(local=True, length=16 + size)
    if family == _TCP4:
        need, alen = 12, 4
    elif family == _TCP6:
        need, alen = 36, 16
    else:
        what = _FAMILIES.get(family, f"unknown family 0x{family:02x}")
        raise ProxyHeaderError(f"PROXY header for {what}; only TCP over IPv4 or IPv6 is accepted")
    if size < need:
        raise ProxyHeaderError(f"PROXY header: {size} bytes of addresses; TCP over "
                               f"IPv{4 if alen == 4 else 6} needs {need}")
    _check_tlvs(body[need:])
    return ProxyHeader(local=False, length=16 + size, source=_address(body[:alen]),
                       source_port=int.from_bytes(body[2 * alen:2 * alen + 2], "big"),
                       dest=_address(body[alen:2 * alen]),
                       dest_port=int.from_bytes(body[2 * alen + 2:2 * alen + 4], "big"))


def build_proxy_header(source: str | None, source_port: int = 0, dest: str = "127.0.0.1", dest_port: int = 0,
                       *, tlvs: bytes = b"") -> bytes:
    """A version 2 header as a balancer sends it (``source=None``: LOCAL); for tests and the benchmark."""
    if source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    body = src.packed + dst.packed + source_port.to_bytes(2, "big") + dest_port.to_bytes(2, "big") + tlvs
    family = _TCP4 if src.version == 4 else _TCP6
    return SIGNATURE + bytes([0x21, family]) + len(body).to_bytes(2, "big") + body
