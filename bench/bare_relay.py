"""The bare asyncssh relay: the bench's reference for what asyncssh itself costs (issue 16).

Written for the bench, not a product: no policy, no guards, no store, no audit, no encryption of the
recording. An asyncssh server with the broker's vendor-side algorithms (AES-GCM, line editor off, uvloop
like ``medbroker serve``) logs in to one device per vendor connection with asyncssh (the broker's upstream
cipher list) and forwards session channels: PTY, shell, exec and subsystems (SFTP passes through as
bytes), window changes, signals, breaks, EOF, exit status, with flow control both ways (the broker's
write-buffer limits). Every byte of both directions is appended to one raw file per channel before it is
passed on, as records ``direction (1 byte: i = vendor to device, o = device stdout, e = device stderr),
length (4 bytes, big-endian), bytes``; :func:`read_recording` reads them back.

    python -m bench.bare_relay --listen 127.0.0.1:PORT --host-key KEY --authorized-keys FILE \\
        --device 127.0.0.1:PORT --device-user USER --device-key KEY --device-host-key PUBFILE --recordings DIR
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import struct
from pathlib import Path

import asyncssh

from broker.live import UPSTREAM_CIPHERS
from broker.server import VENDOR_ALGORITHMS
from sessions.relay import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW

__all__ = ["main", "read_recording"]

HEADER = struct.Struct("!cI")
_channels = itertools.count(1)


def read_recording(path: Path) -> dict[bytes, bytes]:
    """Direction (b"i", b"o", b"e") -> every byte recorded in that direction, in order."""
    raw, out, pos = path.read_bytes(), {}, 0
    while pos < len(raw):
        direction, n = HEADER.unpack_from(raw, pos)
        out[direction] = out.get(direction, b"") + raw[pos + HEADER.size:pos + HEADER.size + n]
        pos += HEADER.size + n
    return out


class Connection(asyncssh.SSHServer):
    """One vendor connection: logs in to the device once authenticated; its session channels share that login."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, None

    def auth_completed(self) -> None:
        a = self.args
        host, _, port = a.device.rpartition(":")
        self.device = asyncio.ensure_future(asyncssh.connect(
            host, int(port), username=a.device_user, client_keys=[a.device_key], preferred_auth="publickey",
            known_hosts=([asyncssh.import_public_key(Path(a.device_host_key).read_text())], [], []),
            config=None, agent_path=None, gss_auth=False, gss_kex=False, connect_timeout=30,
            encryption_algs=UPSTREAM_CIPHERS, compression_algs=["none"]))

    def session_requested(self) -> "Channel":
        return Channel(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.device is not None:
            if self.device.done() and not self.device.cancelled() and self.device.exception() is None:
                self.device.result().close()
            self.device.cancel()


class Channel(asyncssh.SSHServerSession):
    """Vendor side of one session channel."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.up, self.early = conn, None, []
        self.pty: dict = {}
        self.command: str | None = None
        self.subsystem: str | None = None
        self.fd: int | None = None

    def connection_made(self, chan) -> None:
        self.chan = chan
        chan.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)

    def pty_requested(self, term_type, term_size, term_modes) -> bool:
        self.pty = {"term_type": term_type, "term_size": term_size, "term_modes": term_modes}
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.subsystem = subsystem
        return True

    def session_started(self) -> None:
        path = Path(self.conn.args.recordings) / f"{os.getpid()}-{next(_channels):07d}.raw"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        try:
            device = await self.conn.device
            up, _ = await device.create_session(lambda: Upstream(self), self.command, subsystem=self.subsystem,
                                                encoding=None, **self.pty)
        except (OSError, asyncssh.Error, asyncio.CancelledError) as exc:
            self.chan.write_stderr(f"bare relay: the device refused: {exc}\r\n".encode())
            self.chan.exit(255)
            return
        up.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        self.up = up
        for action in self.early:
            action(up)

    def record(self, direction: bytes, data: bytes) -> None:
        os.writev(self.fd, [HEADER.pack(direction, len(data)), data])

    def to_device(self, action) -> None:
        self.early.append(action) if self.up is None else action(self.up)

    def data_received(self, data: bytes, datatype) -> None:
        self.record(b"i", data)
        if self.up is not None:
            self.up.write(data)
        else:
            self.early.append(lambda up: up.write(data))

    def eof_received(self) -> bool:
        self.to_device(lambda up: up.write_eof())
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self.to_device(lambda up: up.change_terminal_size(width, height, pixwidth, pixheight))

    def signal_received(self, signal: str) -> None:
        self.to_device(lambda up: up.send_signal(signal))

    def break_received(self, msec: int) -> bool:
        self.to_device(lambda up: up.send_break(msec))
        return True

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Upstream(asyncssh.SSHClientSession):
    """Device side of one session channel."""

    def __init__(self, down: Channel) -> None:
        self.down, self.exit_status, self.exit_signal = down, None, None

    def data_received(self, data: bytes, datatype) -> None:
        if self.down.fd is not None:
            self.down.record(b"e" if datatype else b"o", data)
            self.down.chan.write(data, datatype)

    def eof_received(self) -> bool:
        self.down.chan.write_eof()
        return True

    # asyncssh reports the exit at once, but data and the close in order (a paused channel still holds data):
    # the exit is passed on when the channel closes, after the last byte.
    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        self.down.chan.pause_reading()

    def resume_writing(self) -> None:
        self.down.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.exit_signal is not None:
            self.down.chan.exit_with_signal(*self.exit_signal)
        elif self.exit_status is not None:
            self.down.chan.exit(self.exit_status)
        else:
            self.down.chan.close()


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM/SIGINT; prints ``bare relay listening on HOST:PORT`` once it accepts."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    host, _, port = args.listen.rpartition(":")
    server = await asyncssh.create_server(
        lambda: Connection(args), host, int(port), server_host_keys=[args.host_key],
        authorized_client_keys=args.authorized_keys, login_timeout=60, encoding=None, line_editor=False,
        agent_forwarding=False, x11_forwarding=False, allow_scp=False, gss_host=None, config=None,
        **VENDOR_ALGORITHMS)
    print(f"bare relay listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.bare_relay``: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m bench.bare_relay", description=__doc__.splitlines()[0])
    for name in ("listen", "host-key", "authorized-keys", "device", "device-user", "device-key", "device-host-key",
                 "recordings"):
        p.add_argument(f"--{name}", required=True)
    args = p.parse_args(argv)
    try:
        import uvloop  # as broker/serve.py

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    run(serve(args))


if __name__ == "__main__":
    main()
