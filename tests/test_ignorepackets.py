"""broker/ignorepackets.py: under an AEAD cipher no SSH_MSG_IGNORE goes out in front of every packet; under any
other cipher asyncssh's CBC countermeasure stays; when asyncssh changed, nothing is installed. An asyncssh server
and client talk over loopback; asyncssh's own packet log (debug level 3) says what crossed the wire."""

from __future__ import annotations

import asyncio
import logging

import asyncssh
import pytest
from asyncssh import connection as asyncssh_connection

import broker.ignorepackets as ignorepackets
from broker.ignorepackets import ignore_packet_hook_active, install_ignore_packet_hook
from test_packetlog import _Server  # the echo server of the packet-log hook's tests


async def _echo(cipher: str, rounds: int) -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key], encryption_algs=[cipher])
    port = server.sockets[0].getsockname()[1]
    got: asyncio.Queue[str] = asyncio.Queue()

    class Client(asyncssh.SSHClientSession):
        def data_received(self, data, datatype) -> None:
            got.put_nowait(data)

    try:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="x", password="",
                                    encryption_algs=[cipher]) as conn:
            chan, _ = await conn.create_session(Client)
            echoed = ""
            for i in range(rounds):
                chan.write(f"{i % 10}" * (i + 1))
                while len(echoed) < sum(range(1, i + 2)):
                    echoed += await asyncio.wait_for(got.get(), 10)
            chan.close()
    finally:
        server.close()
        await server.wait_closed()
    return echoed


def _wire(cipher: str, rounds: int, caplog) -> tuple[str, list[str]]:
    """What came back, and asyncssh's packet log lines of both ends."""
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            echoed = asyncio.run(_echo(cipher, rounds))
    finally:
        asyncssh.set_debug_level(1)
    return echoed, [r.getMessage() for r in caplog.records if r.name.startswith("asyncssh")]


EXPECTED = "".join(f"{i % 10}" * (i + 1) for i in range(8))


@pytest.mark.parametrize("cipher", ["aes256-gcm@openssh.com", "aes128-gcm@openssh.com",
                                    "chacha20-poly1305@openssh.com"])
def test_under_an_aead_cipher_no_ignore_packet_goes_out(cipher, caplog):
    assert install_ignore_packet_hook() and ignore_packet_hook_active()
    echoed, lines = _wire(cipher, 8, caplog)
    assert echoed == EXPECTED
    data = [line for line in lines if "Sent MSG_CHANNEL_DATA (94)" in line]
    assert len(data) >= 16, lines[-20:]  # 8 writes and 8 echoes at least, each logged by its sender
    assert not [line for line in lines if "MSG_IGNORE" in line]


def test_under_a_non_aead_cipher_the_ignore_packets_stay(caplog):
    assert install_ignore_packet_hook()
    echoed, lines = _wire("aes128-ctr", 8, caplog)
    assert echoed == EXPECTED
    sent_data = [line for line in lines if "Sent MSG_CHANNEL_DATA (94)" in line]
    sent_ignore = [line for line in lines if "Sent MSG_IGNORE (2)" in line]
    received_ignore = [line for line in lines if "Received MSG_IGNORE (2)" in line]
    assert len(sent_ignore) >= len(sent_data) >= 16  # one in front of each packet after the key exchange
    assert len(received_ignore) >= 16  # and the peer got them (the last ones may be cut off by the close)


def test_when_asyncssh_changed_nothing_is_installed_and_a_warning_says_so(monkeypatch, caplog):
    def send_packet(self, pkttype, *args, handler=None):  # a different implementation
        self._queue.append((pkttype, args))

    monkeypatch.setattr(ignorepackets, "_active", False)
    monkeypatch.setattr(asyncssh_connection.SSHConnection, "send_packet", send_packet)
    with caplog.at_level(logging.WARNING, logger="medbroker.ignorepackets"):
        assert install_ignore_packet_hook() is False
    assert asyncssh_connection.SSHConnection.send_packet is send_packet
    assert not ignore_packet_hook_active()
    assert "ignore packet before every packet" in caplog.text and "no longer inserts" in caplog.text
