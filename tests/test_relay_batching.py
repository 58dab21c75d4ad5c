"""Device output in full-size packets is handed to the relay's layers as one batch per read (sessions/relay.py
``UpstreamSession``): the bytes, their order, EOF and exit status are exactly what the device sent, interactive
output is not delayed, and a batch waits while the recorder's acknowledgment window is full."""

from __future__ import annotations

import asyncio
import re

import pytest

from sessions.recording import read_frames
from sessions.relay import BATCH_BYTES, BATCH_MIN, MAX_PACKET, UpstreamSession
from helpers import poll

STDERR = 2  # asyncssh.EXTENDED_DATA_STDERR


class _Recorder:
    def __init__(self) -> None:
        self.paused = False
        self.claims: dict[object, int] = {}

    def expect_unit(self, size: int, key: object = None) -> None:
        if size:
            self.claims[key] = size
        else:
            self.claims.pop(key, None)


class _Ctx:
    def __init__(self) -> None:
        self.recorder = _Recorder()


class _Relay:
    """What UpstreamSession calls on the relay, in order."""

    def __init__(self) -> None:
        self.ctx = _Ctx()
        self.upstream = None
        self.filter = None  # a subsystem's filter (SFTP): its output is not batched
        self.calls: list[tuple] = []

    def from_device(self, data: bytes, datatype, batched: bool = False) -> None:
        self.calls.append(("data", data, datatype, batched))

    def device_eof(self) -> None:
        self.calls.append(("eof",))

    def device_exited(self, **kw) -> None:
        self.calls.append(("exit", kw))

    def device_closed(self, session, exc) -> None:
        self.calls.append(("closed", exc))


def _packet(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


def test_small_packets_pass_at_once_and_full_ones_are_joined_per_loop_turn():
    async def go():
        relay = _Relay()
        up = UpstreamSession(relay)  # type: ignore[arg-type]
        assert relay.upstream is up
        up.data_received(b"$ ", None)  # an echo, a prompt: at once, no loop turn
        assert relay.calls == [("data", b"$ ", None, False)]
        full = [_packet(MAX_PACKET, 0x41 + i) for i in range(6)]
        for p in full:
            up.data_received(p, None)
        # nothing of the bulk yet (it waits for the read to end); but the cap: 4 packets are one batch already
        assert [len(c[1]) for c in relay.calls[1:]] == [BATCH_BYTES]
        await asyncio.sleep(0)
        assert [len(c[1]) for c in relay.calls[1:]] == [BATCH_BYTES, 2 * MAX_PACKET]
        assert b"".join(c[1] for c in relay.calls[1:]) == b"".join(full)
        assert all(c[3] for c in relay.calls[1:])
        assert relay.ctx.recorder.claims == {up: BATCH_BYTES}  # the window is told the unit
        up.connection_lost(None)
        assert relay.ctx.recorder.claims == {} and relay.calls[-1] == ("closed", None)
    asyncio.run(go())


def test_order_is_kept_across_stderr_small_output_eof_and_exit():
    async def go():
        relay = _Relay()
        up = UpstreamSession(relay)  # type: ignore[arg-type]
        a, b = _packet(MAX_PACKET, 0x61), _packet(BATCH_MIN, 0x62)
        up.data_received(a, None)
        up.data_received(b, STDERR)  # another stream: the stdout batch goes first
        up.data_received(b"x" * (BATCH_MIN - 1), None)  # small: the stderr batch goes first, then it
        up.data_received(a, None)
        up.exit_status_received(3)  # the exit follows the data before it
        up.eof_received()
        await asyncio.sleep(0)
        assert relay.calls == [("data", a, None, True), ("data", b, STDERR, True),
                               ("data", b"x" * (BATCH_MIN - 1), None, False), ("data", a, None, True),
                               ("exit", {"status": 3}), ("eof",)]
    asyncio.run(go())


def test_a_batch_waits_while_the_recorder_is_paused_and_goes_when_it_has_room():
    """Another channel filled the acknowledgment window after this batch was read: it is not appended (or
    forwarded) until the relay says the recorder has room; new data after it keeps the order."""
    async def go():
        relay = _Relay()
        up = UpstreamSession(relay)  # type: ignore[arg-type]
        a = _packet(MAX_PACKET, 0x61)
        up.data_received(a, None)
        relay.ctx.recorder.paused = True
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert relay.calls == []
        relay.ctx.recorder.paused = False
        up.data_received(a, None)  # reading resumed: asyncssh delivers what it buffered, behind the batch
        up.flush_soon()  # what RelaySession.release(..., "recorder") calls
        await asyncio.sleep(0)
        assert relay.calls == [("data", a + a, None, True)]
    asyncio.run(go())


def test_a_subsystem_channel_is_not_batched():
    """SFTP replies go to the filter packet by packet (its outbox and the recorder's unit do the rest)."""
    async def go():
        relay = _Relay()
        relay.filter = object()
        up = UpstreamSession(relay)  # type: ignore[arg-type]
        full = _packet(MAX_PACKET, 1)
        up.data_received(full, None)
        up.data_received(full, None)
        assert relay.calls == [("data", full, None, False)] * 2 and relay.ctx.recorder.claims == {}
    asyncio.run(go())


def test_an_oversize_packet_is_handed_on_alone_for_the_relay_to_refuse():
    async def go():
        relay = _Relay()
        up = UpstreamSession(relay)  # type: ignore[arg-type]
        up.data_received(_packet(MAX_PACKET, 1), None)
        up.data_received(_packet(MAX_PACKET + 1, 2), None)
        assert [(len(c[1]), c[3]) for c in relay.calls] == [(MAX_PACKET, True), (MAX_PACKET + 1, False)]
    asyncio.run(go())


@pytest.mark.openssh
def test_bulk_output_with_stderr_between_arrives_whole_and_is_recorded_as_sent(world):
    """A real sshd device writes 40 KB blocks of stdout with a stderr line after each, then exits 3: the stock
    client gets every byte of both streams and the status, and the recording holds the same bytes."""
    world.grant()
    block = 40_000
    command = (f"for i in $(seq 1 40); do head -c {block} /dev/zero | tr '\\000' a; echo err$i >&2; done; "
               "head -c 3000000 /dev/urandom | od -An -tx1 | head -c 2000000; exit 3")
    r = world.ssh("alice@ct-01", command)
    assert r.returncode == 3, r.stderr[-500:]
    assert r.stdout[:40 * block] == b"a" * (40 * block)
    tail = r.stdout[40 * block:]
    assert len(tail) == 2_000_000 and re.fullmatch(rb"[0-9a-f \n]+", tail)
    assert r.stderr.count(b"err") == 40 and b"err40\n" in r.stderr
    assert poll(lambda: world.app.store.list_sessions() and world.app.store.list_sessions()[0]["status"] == "closed")
    row = world.app.store.list_sessions()[0]
    frames = list(read_frames(world.app.recordings.local_path(row["recording"]), key_lookup=world.app.keys.get))
    assert b"".join(f.payload for f in frames if f.kind == "output") == r.stdout
    assert b"".join(f.payload for f in frames if f.kind == "stderr") == r.stderr[r.stderr.index(b"err1\n"):]
    kinds = [f.kind for f in frames]
    assert kinds.index("exit") > max(i for i, k in enumerate(kinds) if k in ("output", "stderr")), \
        [(f.kind, len(f.payload)) for f in frames[-10:]][-5:]
