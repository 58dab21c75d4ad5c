"""broker/proxy_header.py: PROXY protocol v2 headers as HAProxy sends them, and everything else refused cleanly."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.proxy_header import (MAX_HEADER, SIGNATURE, ProxyHeader, ProxyHeaderError, build_proxy_header,
                                 looks_like_proxy, parse_proxy_header)
from helpers import FUZZ_EXAMPLES, FUZZ_EXAMPLES_OTHER

# Captured from HAProxy 2.6.12 (Debian 12): `server n1 ... send-proxy-v2 check check-send-proxy`, a client bound
# to 127.0.0.5:40000 connecting to its frontend 127.0.0.1:23457 (28 bytes, no TLVs), and a health check (16 bytes).
HAPROXY_TCP4 = b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c\x7f\x00\x00\x05\x7f\x00\x00\x01\x9c@[\xa1"
HAPROXY_CHECK = b"\r\n\r\n\x00\r\nQUIT\n \x00\x00\x00"


def test_tcp4_header_gives_the_client_and_what_follows() -> None:
    data = HAPROXY_TCP4 + b"SSH-2.0-OpenSSH_9.2\r\n"
    header = parse_proxy_header(data)
    assert header == ProxyHeader(local=False, length=28, source="127.0.0.5", source_port=40000,
                                 dest="127.0.0.1", dest_port=23457)
    assert data[header.length:] == b"SSH-2.0-OpenSSH_9.2\r\n"


def test_tcp6_header_and_an_ipv4_mapped_client_reads_as_ipv4() -> None:
    header = parse_proxy_header(build_proxy_header("2001:db8::7", 5555, "2001:db8::1", 22))
    assert header is not None and (header.source, header.source_port, header.length) == ("2001:db8::7", 5555, 52)
    mapped = parse_proxy_header(build_proxy_header("::ffff:10.1.2.3", 1, "::ffff:10.0.0.1", 22))
    assert mapped is not None and mapped.source == "10.1.2.3"


def test_tlvs_are_skipped_and_must_fit() -> None:
    tlvs = bytes([0x04, 0, 3]) + b"abc" + bytes([0x05, 0, 0])  # NOOP padding, an empty unique id
    header = parse_proxy_header(build_proxy_header("10.0.0.9", 1234, tlvs=tlvs) + b"rest")
    assert header is not None and header.source == "10.0.0.9" and header.length == 28 + len(tlvs)
    with pytest.raises(ProxyHeaderError, match="TLV type 0x04 claims 9 bytes"):
        parse_proxy_header(build_proxy_header("10.0.0.9", 1234, tlvs=bytes([0x04, 0, 9]) + b"abc"))
    with pytest.raises(ProxyHeaderError, match="TLV header is cut short"):
        parse_proxy_header(build_proxy_header("10.0.0.9", 1234, tlvs=b"\x04\x00"))


def test_local_is_the_balancers_own_connection() -> None:
    assert parse_proxy_header(HAPROXY_CHECK) == ProxyHeader(local=True, length=16)
    assert build_proxy_header(None) == HAPROXY_CHECK
    # LOCAL with an address block (HAProxy's check-send-proxy may send one): the block is ignored
    body = bytes(12)
    local_with_block = SIGNATURE + b"\x20\x11" + len(body).to_bytes(2, "big") + body
    assert parse_proxy_header(local_with_block) == ProxyHeader(local=True, length=28)


def test_incomplete_headers_ask_for_more() -> None:
    data = HAPROXY_TCP4
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None, cut
    assert parse_proxy_header(data) is not None


@pytest.mark.parametrize("data,needle", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "starts with an SSH version line"),
    (b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 2222\r\n", "version 1 (text) header"),
    (b"GET / HTTP/1.1\r\n", "no PROXY protocol v2 signature"),
    (SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1; only version 2"),
    (SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "command 0x2"),
    (SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "UDP over IPv4"),
    (SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), "a UNIX stream socket"),
    (SIGNATURE + b"\x21\x00\x00\x00", "UNSPEC"),
    (SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "8 bytes of addresses; TCP over IPv4 needs 12"),
    (SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "TCP over IPv6 needs 36"),
    (SIGNATURE + b"\x21\x11\xff\xff", f"at most {MAX_HEADER} are accepted"),
])
def test_refusals_say_why(data: bytes, needle: str) -> None:
    with pytest.raises(ProxyHeaderError) as info:
        parse_proxy_header(data)
    assert needle in info.value.message


def test_an_oversize_length_is_refused_before_its_bytes_arrive() -> None:
    """The length field alone decides: the broker never buffers more than MAX_HEADER waiting for a header."""
    with pytest.raises(ProxyHeaderError, match="at most"):
        parse_proxy_header(SIGNATURE + b"\x21\x11" + (MAX_HEADER - 15).to_bytes(2, "big"))
    assert parse_proxy_header(SIGNATURE + b"\x21\x11" + (MAX_HEADER - 16).to_bytes(2, "big")) is None


def test_looks_like_proxy_sees_headers_and_their_prefixes_but_not_ssh() -> None:
    assert looks_like_proxy(HAPROXY_TCP4) and looks_like_proxy(b"\r") and looks_like_proxy(b"PROXY TCP4 ")
    assert looks_like_proxy(b"PRO")
    assert not looks_like_proxy(b"SSH-2.0-OpenSSH_9.2\r\n") and not looks_like_proxy(b"") and not looks_like_proxy(b"S")


# The header is the front door's first bytes: fuzzed like the login-name parser (4_000 examples in CI).
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2 * MAX_HEADER))
def test_any_bytes_give_a_header_more_or_a_clean_error(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError as exc:
        assert exc.message
        return
    if header is not None:
        assert 16 <= header.length <= min(len(data), MAX_HEADER)
        assert header.local or header.source is not None


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 15), st.integers(0, 255), st.binary(max_size=80))
def test_mutated_signatures_and_fields_never_raise_anything_else(prefix: bytes, ver_cmd_low: int, family: int,
                                                                   body: bytes) -> None:
    """Past the signature too: random command, family, length and body bytes, and corrupted signatures."""
    for data in (SIGNATURE + bytes([0x20 | ver_cmd_low, family]) + len(body).to_bytes(2, "big") + body,
                 SIGNATURE + bytes([0x20 | ver_cmd_low, family]) + body,
                 prefix + SIGNATURE[len(prefix) % 12:] + body):
        try:
            header = parse_proxy_header(data)
        except ProxyHeaderError:
            continue
        if header is not None and not header.local:
            assert header.source is not None and 0 <= header.source_port <= 65535


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=200))
def test_what_a_balancer_builds_parses_back(source, sport: int, dport: int, tail: bytes) -> None:
    data = build_proxy_header(str(source), sport, "192.0.2.1", dport) + tail
    header = parse_proxy_header(data)
    assert header is not None and header.source == str(source) and header.source_port == sport
    assert header.dest_port == dport and data[header.length:] == tail
