"""SFTP filter cost: download/upload MB/s and per-file open latency, direct vs through SftpFilter (loopback).

Everything runs in one asyncio loop in one process (asyncssh client, a minimal relay, asyncssh's
chrooted SFTP server as the device), like asyncssh-notes Appendix B: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncssh  # noqa: E402

from sessions.policy import ProtectedPaths  # noqa: E402
from sessions.sftp import SftpFilter  # noqa: E402
from sessions.sftp_device import DeviceSftp  # noqa: E402

CLIENT = dict(known_hosts=None, config=None, client_keys=None, agent_path=None, username="bench",
              encryption_algs=["aes128-gcm@openssh.com"])


class _NoAuth(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False


class _Up(asyncssh.SSHClientSession):
    def __init__(self, relay: "_Relay") -> None:
        self.relay = relay

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.relay.plain:
            self.relay.chan.write(data)
        else:
            self.relay.filter.device_data(data)

    def pause_writing(self) -> None:
        self.relay.chan.pause_reading()

    def resume_writing(self) -> None:
        self.relay.chan.resume_reading()


class _Relay(asyncssh.SSHServerSession):
    def __init__(self, port: int, policy: ProtectedPaths, plain: bool) -> None:
        self.port, self.policy, self.pending, self.filter, self.up, self.conn = port, policy, [], None, None, None
        self.plain = plain  # relay bytes without the filter, to separate the hop's cost from the filter's

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        return True

    def session_started(self) -> None:
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        self.conn = await asyncssh.connect("127.0.0.1", self.port, **CLIENT)
        self.up, _ = await self.conn.create_session(lambda: _Up(self), subsystem="sftp", encoding=None)
        dev = DeviceSftp(self.conn.start_sftp_client)
        self.filter = SftpFilter(self.policy, dev.realpath, dev.head, self.up.write, self.chan.write,
                                 lambda n, d: None, lambda d, x: None)
        for data in self.pending:
            self._vendor(data)

    def _vendor(self, data: bytes) -> None:
        (self.up.write(data) if self.plain else self.filter.vendor_data(data))

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        (self._vendor(data) if self.filter else self.pending.append(data))

    def pause_writing(self) -> None:
        if self.up:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.filter:
            self.filter.close()
        if self.conn:
            self.conn.close()


async def _measure(port: int, root: Path, files: int) -> dict[str, float]:
    out = {}
    async with asyncssh.connect("127.0.0.1", port, **CLIENT) as conn:
        async with conn.start_sftp_client() as sftp:
            size = (root / "big.bin").stat().st_size
            t = time.perf_counter()
            await sftp.get("/big.bin", str(root / "got.bin"), block_size=32768)
            out["download MB/s"] = size / (time.perf_counter() - t) / 1e6
            t = time.perf_counter()
            await sftp.put(str(root / "big.bin"), "/up.bin", block_size=32768)
            out["upload MB/s"] = size / (time.perf_counter() - t) / 1e6
            t = time.perf_counter()
            for i in range(files):
                async with sftp.open(f"/small/{i}.log", "rb") as f:
                    await f.read()
            out["open+read+close ms/file"] = (time.perf_counter() - t) / files * 1e3
    return out


async def main(mib: int, files: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "big.bin").write_bytes(os.urandom(mib * 1024 * 1024))
        (root / "small").mkdir()
        for i in range(files):
            (root / "small" / f"{i}.log").write_bytes(b"log line %d\n" % i * 50)
        key = asyncssh.generate_private_key("ssh-ed25519")
        device = await asyncssh.listen("127.0.0.1", 0, server_factory=_NoAuth, server_host_keys=[key],
                                       sftp_factory=functools.partial(asyncssh.SFTPServer, chroot=tmp))
        dport = device.sockets[0].getsockname()[1]
        policy = ProtectedPaths.build("bench", ["/data/dicom"])
        results, listeners = {}, []
        for label, plain in (("relay only", True), ("relay+filter", False)):
            class Broker(_NoAuth):
                def session_requested(self, plain: bool = plain) -> _Relay:
                    return _Relay(dport, policy, plain)

            broker = await asyncssh.listen("127.0.0.1", 0, server_factory=Broker, server_host_keys=[key],
                                           encoding=None, line_editor=False)
            listeners.append(broker)
            results[label] = await _measure(broker.sockets[0].getsockname()[1], root, files)
        results = {"direct": await _measure(dport, root, files), **results}
        print(f"{mib} MiB file, {files} small files, 32 KiB blocks, python {sys.version.split()[0]}")
        for k in results["direct"]:
            print(f"  {k:26} " + "   ".join(f"{label} {r[k]:7.2f}" for label, r in results.items()))
        for listener in [*listeners, device]:
            listener.close()
            await listener.wait_closed()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=200)
    args = ap.parse_args()
    asyncio.run(main(args.mib, args.files))
