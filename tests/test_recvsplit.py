"""broker/recvsplit.py: a large read reaches asyncssh's parser in pieces of at most 32 KiB, in order, byte for byte;
a read that ends the connection is not parsed further; when asyncssh changed, nothing is installed. An asyncssh
server and client transfer 8 MiB over loopback with the hook, and the parser's buffer stays small."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from types import SimpleNamespace

import asyncssh
import pytest
from asyncssh import connection as asyncssh_connection
from hypothesis import given, settings
from hypothesis import strategies as st

import broker.recvsplit as recvsplit
from broker.recvsplit import PIECE, install_recv_split_hook, recv_split_hook_active

TOTAL = 8 << 20


class _Fake(SimpleNamespace):
    """Stands in for an SSHConnection: the parser takes everything it is given, or ends the connection."""

    def __init__(self, end_after: int | None = None) -> None:
        super().__init__(_inpbuf=b"", _transport=object(), parsed=[], buffered=[])
        self.end_after = end_after

    def _recv_data(self) -> None:
        self.buffered.append(len(self._inpbuf))
        self.parsed.append(self._inpbuf)
        self._inpbuf = b""
        if self.end_after is not None and len(self.parsed) >= self.end_after:
            self._transport = None  # what asyncssh's _force_close does


@pytest.fixture
def hooked():
    assert install_recv_split_hook() and recv_split_hook_active()
    return asyncssh_connection.SSHConnection.data_received


def test_a_large_read_is_parsed_in_pieces_of_at_most_32_kib_in_order(hooked):
    data = os.urandom(3 * PIECE + 1234)
    conn = _Fake()
    hooked(conn, data)
    assert b"".join(conn.parsed) == data
    assert conn.buffered == [PIECE, PIECE, PIECE, 1234]


def test_a_read_of_at_most_32_kib_is_parsed_whole(hooked):
    for size in (0, 1, PIECE - 1, PIECE):
        conn = _Fake()
        conn._inpbuf = b"partial packet"  # left over from the read before
        hooked(conn, b"x" * size)
        assert conn.parsed == [b"partial packet" + b"x" * size]


def test_a_piece_that_ends_the_connection_stops_the_parsing_of_its_read(hooked):
    conn = _Fake(end_after=2)
    data = os.urandom(5 * PIECE)
    hooked(conn, data)
    assert b"".join(conn.parsed) == data[:2 * PIECE] and conn._inpbuf == b""


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=6), left=st.binary(max_size=200))
def test_any_sequence_of_reads_reaches_the_parser_whole_in_order_and_in_bounded_pieces(sizes, left):
    hooked = asyncssh_connection.SSHConnection.data_received
    assert install_recv_split_hook()
    conn = _Fake()
    conn._inpbuf = left
    reads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    for read in reads:
        hooked(conn, read)
    assert b"".join(conn.parsed) == left + b"".join(reads)
    assert max(conn.buffered) <= PIECE + len(left)  # the first piece joins what the read before left


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self):
        return _Sink()


class _Sink(asyncssh.SSHServerSession):
    def connection_made(self, chan) -> None:
        self.chan = chan
        self.hash = hashlib.sha256()
        self.size = 0

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data, datatype) -> None:
        self.hash.update(data)
        self.size += len(data)

    def eof_received(self) -> bool:
        self.chan.write(f"{self.size} {self.hash.hexdigest()}\n".encode())
        self.chan.exit(0)
        return False


async def _upload(payload: bytes) -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="x", password="") as conn:
            proc = await conn.create_process(encoding=None)
            proc.stdin.write(payload)
            proc.stdin.write_eof()
            return (await asyncio.wait_for(proc.stdout.read(), 60)).decode().strip()
    finally:
        server.close()
        await server.wait_closed()


def test_an_ssh_transfer_through_the_hook_arrives_byte_for_byte_and_the_parse_buffer_stays_small(hooked,
                                                                                                monkeypatch):
    reads: list[int] = []
    buffered: list[int] = []
    recv_data = asyncssh_connection.SSHConnection._recv_data

    def counted_read(self, data, datatype=None):
        reads.append(len(data))
        return hooked(self, data, datatype)

    def counted_parse(self):
        buffered.append(len(self._inpbuf))
        return recv_data(self)

    monkeypatch.setattr(asyncssh_connection.SSHConnection, "data_received", counted_read)
    monkeypatch.setattr(asyncssh_connection.SSHConnection, "_recv_data", counted_parse)
    payload = os.urandom(TOTAL)
    assert asyncio.run(_upload(payload)) == f"{TOTAL} {hashlib.sha256(payload).hexdigest()}"
    assert max(reads) > 2 * PIECE, "no large read happened: the test did not exercise the hook"
    # without the hook the buffer holds a whole read (up to 256 KiB); with it, one piece plus a partial packet
    assert max(buffered) <= PIECE + (40 << 10), max(buffered)


def test_when_asyncssh_changed_nothing_is_installed_and_a_warning_says_so(monkeypatch, caplog):
    def data_received(self, data, datatype=None):  # a different implementation
        self._recv_buffer.extend(data)

    monkeypatch.setattr(recvsplit, "_active", False)
    monkeypatch.setattr(asyncssh_connection.SSHConnection, "data_received", data_received)
    with caplog.at_level(logging.WARNING, logger="medbroker.recvsplit"):
        assert install_recv_split_hook() is False
    assert asyncssh_connection.SSHConnection.data_received is data_received
    assert not recv_split_hook_active()
    assert "asyncssh parses large reads whole" in caplog.text and "no longer appends" in caplog.text
