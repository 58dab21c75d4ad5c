"""broker/packetlog.py: with the hook, asyncssh formats no packet log line unless it writes it (debug level 3), and
at debug level 3 the packet lines read as they always did. An asyncssh server and client talk over loopback."""

from __future__ import annotations

import asyncio
import logging

import asyncssh
import pytest
from asyncssh import packet as asyncssh_packet

from broker.packetlog import install_packet_log_hook, packet_log_hook_active


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self):
        return _Echo()


class _Echo(asyncssh.SSHServerSession):
    def connection_made(self, chan) -> None:
        self.chan = chan

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data, datatype) -> None:
        self.chan.write(data)


async def _echo(rounds: int) -> bytes:
    """Type ``rounds`` keys through an in-process asyncssh server and return what came back."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key])
    port = server.sockets[0].getsockname()[1]
    got: asyncio.Queue[str] = asyncio.Queue()

    class Client(asyncssh.SSHClientSession):
        def data_received(self, data, datatype) -> None:
            got.put_nowait(data)

    try:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="x", password="") as conn:
            chan, _ = await conn.create_session(Client)
            echoed = ""
            for i in range(rounds):
                chan.write(f"{i % 10}")
                echoed += await asyncio.wait_for(got.get(), 10)
            chan.close()
    finally:
        server.close()
        await server.wait_closed()
    return echoed.encode()


@pytest.fixture
def counted(monkeypatch):
    """How often asyncssh's packet logger formatted a size (``plural``, called for every formatted line)."""
    calls = []
    original = asyncssh_packet.plural

    def plural(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(asyncssh_packet, "plural", plural)
    return calls


def test_below_debug_level_3_no_packet_line_is_formatted(counted):
    assert install_packet_log_hook() and packet_log_hook_active()
    asyncssh.set_debug_level(1)
    assert asyncio.run(_echo(20)) == b"01234567890123456789"
    assert counted == []  # without the hook: one per packet, ~140 here


def test_at_debug_level_3_packet_lines_are_written_as_before(counted, caplog):
    assert install_packet_log_hook()
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            assert asyncio.run(_echo(3)) == b"012"
    finally:
        asyncssh.set_debug_level(1)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("asyncssh")]
    sent = [line for line in lines if "Sent MSG_CHANNEL_DATA (94), " in line]
    received = [line for line in lines if "Received MSG_CHANNEL_DATA (94), " in line]
    assert len(sent) >= 6 and len(received) >= 6, lines[-20:]  # 3 keys and 3 echoes, each seen by both ends
    assert len(counted) >= 12  # each of them formatted by asyncssh's own method
