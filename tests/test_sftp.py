"""SFTP policy proxy: real asyncssh client ⇄ a minimal relay running SftpFilter ⇄ real asyncssh sftp-server.

The device is asyncssh's own SFTP server chrooted into a generated device tree; the vendor is
asyncssh's SFTP client (and OpenSSH's ``sftp`` in one test). Nothing is mocked: bytes cross real SSH
channels on loopback. The relay here is deliberately tiny; the product wiring is broker/server.py.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import os
import shutil
import tarfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.patientdata import astm_message, dicom_bare, write_device_tree
from helpers import FUZZ_EXAMPLES_OTHER
from sessions.policy import Decision, ProtectedPaths
from sessions.sftp import ALLOWED_EXTENSIONS, MAX_DATA, SftpFilter, SftpSummary
from sessions.sftp_device import DeviceSftp
from sessions.sftp_codec import (
    FX_NO_SUCH_FILE, FX_OK, FX_OP_UNSUPPORTED, FX_PERMISSION_DENIED, FXF_CREAT, FXF_READ, FXF_TRUNC,
    FXF_WRITE,
    FXP_EXTENDED, FXP_OPEN, FXP_REALPATH, FXP_RENAME, FXP_STAT, PacketReader, frame, init_packet, parse_limits,
    parse_reply, parse_request, read_request, string, u32, u64,
)

TIMEOUT = 20


class _SlowRenameServer(asyncssh.SFTPServer):
    """A device whose renames take a while, so a check that does not wait for them would see old state."""

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await asyncio.sleep(0.3)
        super().rename(oldpath, newpath)


class _NoAuth(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False


@dataclass
class World:
    """One device, one broker, what the filter reported."""

    root: Path
    tree: dict[str, Path]
    policy: ProtectedPaths
    mode: str = "normal"
    events: list[tuple[str, dict]] = field(default_factory=list)
    denials: list[tuple[Decision, dict]] = field(default_factory=list)
    summaries: list[SftpSummary] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    device_port: int = 0
    broker_port: int = 0
    key: asyncssh.SSHKey | None = None
    relays: list["_MiniRelay"] = field(default_factory=list)

    def event(self, name: str) -> list[dict]:
        return [d for n, d in self.events if n == name]


class _Up(asyncssh.SSHClientSession):
    def __init__(self, relay: "_MiniRelay") -> None:
        self.relay = relay

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.relay.filter.device_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.chan.close()


class _MiniRelay(asyncssh.SSHServerSession):
    """Just enough relay to put an SftpFilter between a vendor channel and a device channel."""

    def __init__(self, world: World) -> None:
        self.world, self.pending, self.filter, self.up = world, [], None, None
        self.upconn: asyncssh.SSHClientConnection | None = None
        self.device: DeviceSftp | None = None
        self.task: asyncio.Task | None = None
        world.relays.append(self)

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        w = self.world
        self.upconn = await asyncssh.connect("127.0.0.1", w.device_port, username="svc", known_hosts=None,
                                             config=None, client_keys=None, agent_path=None)
        self.up, _ = await self.upconn.create_session(lambda: _Up(self), subsystem="sftp", encoding=None)
        self.device = DeviceSftp(self.upconn.start_sftp_client)

        def denied(decision: Decision, details: dict) -> None:
            w.denials.append((decision, details))
            self.chan.write_stderr(f"medbroker: {decision.reason}\n".encode())

        def fatal(message: str) -> None:
            w.fatal.append(message)
            self.chan.write_stderr(f"medbroker: {message}\n".encode())
            self.chan.exit(1)

        self.filter = SftpFilter(w.policy, self.device.realpath, self.device.head, self.up.write, self.chan.write,
                                 lambda name, details: w.events.append((name, details)), denied, mode=w.mode,
                                 on_fatal=fatal, check_timeout=TIMEOUT)
        for data in self.pending:
            self.filter.vendor_data(data)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        (self.filter.vendor_data(data) if self.filter else self.pending.append(data))

    def eof_received(self) -> bool:
        if self.up is not None:
            self.up.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.filter is not None:
            self.world.summaries.append(self.filter.close())
        if self.up is not None:
            self.up.close()
        if self.device is not None:
            self.device.close()
        if self.upconn is not None:
            self.upconn.close()

    async def wait_closed(self) -> None:
        if self.task is not None:
            await self.task
        if self.filter is not None:
            await self.filter.wait_closed()
        if self.upconn is not None:
            await self.upconn.wait_closed()


class _Broker(asyncssh.SSHServer):
    def __init__(self, world: World) -> None:
        self.world = world

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> _MiniRelay:
        return _MiniRelay(self.world)


@asynccontextmanager
async def world_running(tmp_path: Path, mode: str = "normal",
                        server: type[asyncssh.SFTPServer] = asyncssh.SFTPServer) -> AsyncIterator[World]:
    root = tmp_path / "device"
    tree = write_device_tree(root)
    policy = ProtectedPaths.build("ct-01", ["/data/dicom"], ["/var/spool/hl7", "/var/lib/orthanc"])
    w = World(root, tree, policy, mode, key=asyncssh.generate_private_key("ssh-ed25519"))
    device = await asyncssh.listen("127.0.0.1", 0, server_factory=_NoAuth, server_host_keys=[w.key],
                                   sftp_factory=functools.partial(server, chroot=str(root)))
    broker = await asyncssh.listen("127.0.0.1", 0, server_factory=lambda: _Broker(w), server_host_keys=[w.key],
                                   encoding=None, line_editor=False)
    w.device_port = device.sockets[0].getsockname()[1]
    w.broker_port = broker.sockets[0].getsockname()[1]
    try:
        yield w
    finally:
        broker.close()
        await broker.wait_closed()
        for relay in w.relays:
            await relay.wait_closed()
        device.close()
        await device.wait_closed()


@asynccontextmanager
async def vendor(w: World) -> AsyncIterator[asyncssh.SFTPClient]:
    async with asyncssh.connect("127.0.0.1", w.broker_port, username="alice", known_hosts=None, config=None,
                                client_keys=None, agent_path=None) as conn:
        async with conn.start_sftp_client() as sftp:
            yield sftp


def run(coro_fn, tmp_path: Path, mode: str = "normal") -> World:
    """Run ``coro_fn(world, sftp)`` against a fresh world; returns the world for assertions after close."""

    async def main() -> World:
        async with world_running(tmp_path, mode) as w:
            async with vendor(w) as sftp:
                await coro_fn(w, sftp)
        return w

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))


async def _denied(coro, *fragments: str) -> str:
    with pytest.raises(asyncssh.SFTPPermissionDenied) as err:
        await coro
    for fragment in fragments:
        assert fragment in err.value.reason, err.value.reason
    return err.value.reason


# ---------------------------------------------------------------------------------------------- reads
def test_allowed_download_is_byte_exact_and_hashed(tmp_path: Path) -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "tmp").mkdir()
    (tmp_path / "device" / "tmp" / "service-dump.bin").write_bytes(big)

    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        log = w.tree["log"].read_bytes()
        async with sftp.open("/var/log/vendor/service.log", "rb") as f:
            assert await f.read() == log
        local = tmp_path / "got.bin"
        await sftp.get("/tmp/service-dump.bin", str(local))  # parallel 16 KiB..255 KiB reads
        assert local.read_bytes() == big

    w = run(body, tmp_path)
    files = {t["path"]: t for t in w.event("transfer.file")}
    assert files["/var/log/vendor/service.log"]["sha256"] == hashlib.sha256(w.tree["log"].read_bytes()).hexdigest()
    dump = files["/tmp/service-dump.bin"]
    assert dump == {"path": "/tmp/service-dump.bin", "direction": "download", "bytes": len(big),
                    "sha256": hashlib.sha256(big).hexdigest(), "sequential": True, "outcome": "ok"}
    summary = w.summaries[0]
    assert summary.denied == 0 and summary.bytes_down == len(big) + len(w.tree["log"].read_bytes())
    assert w.event("sftp.summary")[0]["files"] == [t.as_dict() for t in summary.transfers]


def test_protected_directory_refused_with_reason(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        await _denied(sftp.open("/data/dicom/2026/11/study-0001.dcm", "rb"),
                      "/data/dicom/2026/11/study-0001.dcm is inside /data/dicom, a protected patient-data "
                      "directory on ct-01", "de-identified export")
        await _denied(sftp.listdir("/data/dicom"), "/data/dicom is a protected patient-data directory on ct-01")
        await _denied(sftp.stat("/data/dicom/DICOMDIR"))
        await _denied(sftp.lstat("/data/dicom"))
        await _denied(sftp.open("/var/spool/hl7/adt_a01.hl7", "rb"), "/var/spool/hl7")
        await _denied(sftp.realpath("/data/dicom/DICOM"))
        assert "dicom" in await sftp.listdir("/data")  # listing the parent is fine
        assert (await sftp.stat("/data")).type == asyncssh.FILEXFER_TYPE_DIRECTORY

    w = run(body, tmp_path)
    assert {d.op for d, _ in w.denials} >= {"open", "opendir", "stat", "lstat", "realpath"}
    assert all(d.event == "sftp.denied" for d, _ in w.denials)
    assert not w.event("transfer.file")


def test_symlinks_and_dotdot_are_resolved_on_the_device(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        await _denied(sftp.open("/tmp/images/2026/11/study-0001.dcm", "rb"), "inside /data/dicom")
        await _denied(sftp.listdir("/tmp/images"), "/data/dicom is a protected")
        await _denied(sftp.open("/tmp/../data/./dicom/DICOMDIR", "rb"))
        await _denied(sftp.open("../../data/dicom/DICOMDIR", "rb"))  # relative to the login directory
        assert (await sftp.lstat("/tmp/images")).type == asyncssh.FILEXFER_TYPE_SYMLINK  # the link itself
        await sftp.remove("/tmp/images")  # removing the link does not touch the data

    w = run(body, tmp_path)
    assert w.tree["dicom_file"].exists() and not os.path.lexists(w.tree["link_into_dicom"])


def test_patient_data_outside_protected_paths_is_refused_by_content(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        await _denied(sftp.open("/tmp/report.pdf", "rb"), "/tmp/report.pdf on ct-01 contains DICOM patient data")
        await _denied(sftp.open("/tmp/export.raw", "rb"), "contains DICOM")
        await _denied(sftp.open("/tmp/dual.tif", "rb"), "contains DICOM")
        await _denied(sftp.open("/opt/lis/data/result.txt", "rb"), "contains ASTM")
        await _denied(sftp.open("/opt/lis/data/result.frames", "r+b"), "contains ASTM")
        async with sftp.open("/tmp/report.pdf", "wb") as f:  # write-only opens need no content check
            await f.write(b"overwritten")

    w = run(body, tmp_path)
    assert [d["content"] for _, d in w.denials if "content" in d] == ["DICOM", "DICOM", "DICOM", "ASTM", "ASTM"]
    assert w.tree["renamed_dicom"].read_bytes() == b"overwritten"


def test_non_regular_files_are_not_read(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        await _denied(sftp.open("/tmp/fifo", "rb"), "not a regular file")

    (tmp_path / "device" / "tmp").mkdir(parents=True)
    os.mkfifo(tmp_path / "device" / "tmp" / "fifo")
    run(body, tmp_path)


def test_tar_with_patient_data_is_stopped_mid_download(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("logs/big.log", os.urandom(300_000)), ("export/IM000009", dicom_bare())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "device" / "tmp").mkdir(parents=True)
    (tmp_path / "device" / "tmp" / "backup.tar").write_bytes(buf.getvalue())

    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        with pytest.raises(asyncssh.SFTPPermissionDenied, match="contains DICOM/tar patient data"):
            await sftp.get("/tmp/backup.tar", str(tmp_path / "backup.tar"))
        async with sftp.open("/tmp/backup.tar", "rb") as f:  # once found, the whole handle stays refused
            await f.read(65536, 0)
            await _denied(f.read(65536, 300_000), "DICOM/tar")
            await _denied(f.read(10, 0), "DICOM/tar")

    w = run(body, tmp_path)
    hits = [d for _, d in w.denials if d.get("content") == "DICOM/tar"]
    assert hits and hits[0]["offset"] > 0


def test_content_changed_after_the_check_is_caught_in_the_stream(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        path = w.root / "tmp" / "swap.bin"
        path.write_bytes(b"harmless" * 100)
        async with sftp.open("/tmp/swap.bin", "rb") as f:
            path.write_bytes(astm_message())  # a concurrent shell rewrites the file after the OPEN check
            await _denied(f.read(4096, 0), "contains ASTM")

    run(body, tmp_path)


# ---------------------------------------------------------------------------------------------- writes, moves
def test_upload_is_hashed_and_lands(tmp_path: Path) -> None:
    payload = os.urandom(700_000)

    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        src = tmp_path / "fw.bin"
        src.write_bytes(payload)
        await sftp.put(str(src), "/tmp/fw-4.3.0.bin")

    w = run(body, tmp_path)
    assert (w.root / "tmp" / "fw-4.3.0.bin").read_bytes() == payload
    up = [t for t in w.event("transfer.file") if t["direction"] == "upload"]
    assert up == [{"path": "/tmp/fw-4.3.0.bin", "direction": "upload", "bytes": len(payload),
                   "sha256": hashlib.sha256(payload).hexdigest(), "sequential": True, "outcome": "ok"}]


def test_moves_and_links_across_the_protection_boundary_are_refused(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        for call in (sftp.rename("/data/dicom/DICOMDIR", "/tmp/dd"), sftp.rename("/tmp/report.pdf", "/data/dicom/r"),
                     sftp.posix_rename("/data/dicom/DICOMDIR", "/tmp/dd"), sftp.rename("/data", "/tmp/data"),
                     sftp.link("/data/dicom/DICOMDIR", "/tmp/dd"), sftp.symlink("/data/dicom", "/tmp/l2"),
                     sftp.symlink("../data/dicom/DICOMDIR", "/tmp/l3"), sftp.symlink("/data", "/tmp/l4"),
                     sftp.mkdir("/data/dicom/new"), sftp.remove("/data/dicom/DICOMDIR"),
                     sftp.rmdir("/data/dicom/DICOM"), sftp.chmod("/data/dicom", 0o777),
                     sftp.chmod("/tmp/images", 0o777)):
            await _denied(call)
        await sftp.symlink("/var/log/vendor/service.log", "/tmp/log-link")
        await sftp.rename("/tmp/log-link", "/tmp/log-link2")
        assert await sftp.readlink("/tmp/log-link2") == "/var/log/vendor/service.log"

    w = run(body, tmp_path)
    assert w.tree["dicomdir_file"].exists() and w.tree["renamed_dicom"].exists()
    assert not os.path.lexists(w.root / "tmp" / "l2") and not os.path.lexists(w.root / "tmp" / "l3")
    assert (w.root / "data" / "dicom").stat().st_mode & 0o777 != 0o777


def test_read_only_grant(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        assert await (await sftp.open("/var/log/vendor/service.log", "rb")).read(5) == b"2026-"
        await _denied(sftp.open("/tmp/new.txt", "wb"), "this grant is read-only")
        await _denied(sftp.remove("/var/log/vendor/service.log"), "read-only")
        await _denied(sftp.rename("/var/log/vendor/service.log", "/tmp/x"), "read-only")

    w = run(body, tmp_path, mode="read-only")
    assert not (w.root / "tmp" / "new.txt").exists() and w.tree["log"].exists()


def test_upload_only_grant(tmp_path: Path) -> None:
    async def body(w: World, sftp: asyncssh.SFTPClient) -> None:
        await _denied(sftp.open("/var/log/vendor/service.log", "rb"), "this grant is upload-only")
        async with sftp.open("/tmp/fw.bin", "wb") as f:
            await f.write(b"firmware")
        await _denied(sftp.open("/tmp/fw.bin", "r+b"), "upload-only")

    w = run(body, tmp_path, mode="upload-only")
    assert (w.root / "tmp" / "fw.bin").read_bytes() == b"firmware"


# ---------------------------------------------------------------------------------------------- raw protocol
class RawSftp(asyncssh.SSHClientSession):
    """An SFTP channel spoken by hand with the codec, to send what stock clients never send."""

    def __init__(self) -> None:
        self.reader = PacketReader(4 * 1024 * 1024 + 1024)
        self.packets: asyncio.Queue[bytes] = asyncio.Queue()
        self.stderr = b""
        self.closed = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.stderr += data
            return
        for pkt in self.reader.feed(data):
            self.packets.put_nowait(pkt)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    async def reply_list(self, n: int) -> list:
        return [parse_reply(await asyncio.wait_for(self.packets.get(), TIMEOUT)) for _ in range(n)]

    async def replies(self, n: int) -> dict:
        return {rep.id: rep for rep in await self.reply_list(n)}


def run_raw(coro_fn, tmp_path: Path, server: type[asyncssh.SFTPServer] = asyncssh.SFTPServer) -> World:
    async def main() -> World:
        async with world_running(tmp_path, server=server) as w:
            async with asyncssh.connect("127.0.0.1", w.broker_port, username="alice", known_hosts=None, config=None,
                                        client_keys=None, agent_path=None) as conn:
                chan, raw = await conn.create_session(RawSftp, subsystem="sftp", encoding=None)
                await coro_fn(w, chan, raw)
                chan.close()
        return w

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))


def _ext(rid: int, name: bytes, body: bytes = b"") -> bytes:
    return frame(FXP_EXTENDED, u32(rid) + string(name) + body)


def test_version_limits_copy_data_and_unknown_requests(tmp_path: Path) -> None:
    async def body(w: World, chan: asyncssh.SSHClientChannel, raw: RawSftp) -> None:
        chan.write(init_packet(6))  # clamped to 3 on the way to the device
        version = (await raw.replies(1))[None]
        assert version.version == 3
        names = {n for n, _ in version.extensions}
        assert names <= ALLOWED_EXTENSIONS and b"copy-data" not in names and b"ranges@asyncssh.com" not in names
        assert b"posix-rename@openssh.com" in names and b"limits@openssh.com" in names
        chan.write(_ext(1, b"limits@openssh.com") + _ext(2, b"copy-data", string(b"h") + u64(0) + u64(9)
                   + string(b"h") + u64(0)) + _ext(3, b"check-file-name", string(b"/tmp")) + _ext(4, b"foo@example.com")
                   + frame(FXP_REALPATH, u32(5) + string(b"/tmp/images/2026")))
        got = await raw.replies(5)
        packet, read, write, _ = parse_limits(got[1].payload)
        assert (packet, read, write) == (256 * 1024, MAX_DATA, MAX_DATA)
        assert got[2].code == FX_PERMISSION_DENIED and b"copy-data" in got[2].message
        assert got[3].code == FX_OP_UNSUPPORTED and b"check-file-name" in got[3].message
        assert got[4].code == FX_OP_UNSUPPORTED
        assert got[5].code == FX_PERMISSION_DENIED and b"/data/dicom/2026" in got[5].message
        firmware = b"/tmp/../opt/vendor/firmware/fw-4.2.1.bin"
        chan.write(frame(FXP_OPEN, u32(6) + string(firmware) + u32(FXF_READ) + u32(0)))
        handle = (await raw.replies(1))[6].handle
        chan.write(read_request(7, handle, 0, 4 * 1024 * 1024))  # capped so replies fit the framing limit
        data = (await raw.replies(1))[7].data
        assert data == w.tree["firmware"].read_bytes()[:MAX_DATA] and len(data) <= MAX_DATA

    run_raw(body, tmp_path)


def test_pipelined_requests_wait_for_earlier_renames(tmp_path: Path) -> None:
    async def body(w: World, chan: asyncssh.SSHClientChannel, raw: RawSftp) -> None:
        chan.write(init_packet(3))
        await raw.replies(1)
        (w.root / "tmp" / "a.log").write_bytes(b"benign log\n")
        # rename, then immediately open the new name: its check must see the rename's result
        chan.write(frame(FXP_RENAME, u32(1) + string(b"/tmp/a.log") + string(b"/tmp/b.log"))
                   + frame(FXP_OPEN, u32(2) + string(b"/tmp/b.log") + u32(FXF_READ) + u32(0))
                   + frame(FXP_STAT, u32(3) + string(b"/tmp/nope/x"))
                   + frame(FXP_OPEN, u32(4) + string(b"/tmp/c.log") + u32(FXF_WRITE | FXF_CREAT | FXF_TRUNC) + u32(0)))
        replies = await raw.reply_list(4)
        got = {r.id: r for r in replies}
        assert got[1].code == FX_OK and got[2].op == "handle" and got[4].op == "handle"
        assert got[3].code == FX_NO_SUCH_FILE  # the device's own answer, given locally

    run_raw(body, tmp_path, server=_SlowRenameServer)


def test_a_reused_request_id_ends_the_channel_at_once(tmp_path: Path) -> None:
    """Two requests in flight with one id (four threads sharing one client, issue 11 finding 12): their
    replies could not be told apart, so the channel ends with the reason instead of serving one of them."""
    async def body(w: World, chan: asyncssh.SSHClientChannel, raw: RawSftp) -> None:
        chan.write(init_packet(3))
        await raw.replies(1)
        started = asyncio.get_running_loop().time()
        chan.write(frame(FXP_RENAME, u32(1) + string(b"/tmp/a.log") + string(b"/tmp/b.log"))
                   + frame(FXP_STAT, u32(1) + string(b"/tmp")))  # id 1 again while the rename is pending
        await asyncio.wait_for(raw.closed.wait(), TIMEOUT)
        assert asyncio.get_running_loop().time() - started < 2
        assert b"vendor broke the SFTP protocol: request id 1 is used by a request still in flight" in raw.stderr

    w = run_raw(body, tmp_path, server=_SlowRenameServer)
    assert w.fatal and "request id 1" in w.fatal[0] and w.summaries[0].error == w.fatal[0]


def test_garbage_from_the_vendor_ends_the_channel(tmp_path: Path) -> None:
    async def body(w: World, chan: asyncssh.SSHClientChannel, raw: RawSftp) -> None:
        chan.write(init_packet(3))
        await raw.replies(1)
        chan.write(u32(10 * 1024 * 1024) + b"\x03")
        await asyncio.wait_for(raw.closed.wait(), TIMEOUT)
        assert b"vendor broke the SFTP protocol" in raw.stderr

    w = run_raw(body, tmp_path)
    assert w.fatal and "outside 1..263168 bytes" in w.fatal[0]
    assert w.summaries[0].error == w.fatal[0]


# ---------------------------------------------------------------------------------------------- OpenSSH client
@pytest.mark.openssh
@pytest.mark.skipif(shutil.which("sftp") is None, reason="OpenSSH sftp not installed")
def test_openssh_sftp_client_through_the_filter(tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    local = tmp_path / "local"
    local.mkdir()
    (local / "fw.bin").write_bytes(b"firmware 4.3\n")
    batch.write_text(f"get /var/log/vendor/service.log {local}/service.log\n"
                     f"put {local}/fw.bin /tmp/fw.bin\n"
                     "rename /tmp/fw.bin /tmp/fw-4.3.bin\n"
                     "ls /data\n"
                     f"-get /data/dicom/DICOMDIR {local}/stolen\n"
                     f"-get /tmp/report.pdf {local}/report.pdf\n"
                     "-rename /data/dicom/DICOMDIR /tmp/x\n")

    async def main() -> tuple[World, int, bytes, bytes]:
        async with world_running(tmp_path) as w:
            proc = await asyncio.create_subprocess_exec(
                "sftp", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={tmp_path / 'kh'}", "-P", str(w.broker_port), "-b", str(batch),
                "alice@127.0.0.1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
            for relay in w.relays:
                await relay.wait_closed()
        return w, proc.returncode, out, err

    w, code, out, err = asyncio.run(main())
    assert code == 0, err
    assert (local / "service.log").read_bytes() == w.tree["log"].read_bytes()
    assert (w.root / "tmp" / "fw-4.3.bin").read_bytes() == b"firmware 4.3\n"
    assert b"dicom" in out
    assert not (local / "stolen").exists() and not (local / "report.pdf").exists()
    # OpenSSH's sftp prints only "Permission denied"; the reason reaches the person on stderr
    assert b"medbroker: /data/dicom/DICOMDIR is inside /data/dicom, a protected patient-data directory" in err
    assert b"medbroker: /tmp/report.pdf on ct-01 contains DICOM patient data" in err
    assert w.tree["dicomdir_file"].exists()
    assert {d.op for d, _ in w.denials} >= {"open", "posix-rename"}


# ---------------------------------------------------------------------------------------------- filter edges
class Wire:
    """The filter's callbacks as plain lists: the device is scripted by the test (no SSH here)."""

    def __init__(self, *, fatal: bool = True) -> None:
        self.to_device: list[bytes] = []
        self.to_vendor: list[bytes] = []
        self.events: list[tuple[str, dict]] = []
        self.denied: list[Decision] = []
        self.fatal: list[str] = []
        policy = ProtectedPaths.build("ct-01", ["/data/dicom"])

        async def realpath(path: bytes) -> bytes:
            return path if path.startswith(b"/") else b"/home/svc/" + path

        async def head(path: bytes, n: int) -> bytes:
            return b"benign"

        self.filter = SftpFilter(policy, realpath, head, self.to_device.append, self.to_vendor.append,
                                 lambda n, d: self.events.append((n, d)), lambda d, x: self.denied.append(d),
                                 on_fatal=self.fatal.append if fatal else None)

    def vendor_replies(self) -> list:
        return [parse_reply(p) for p in self.to_vendor]


def test_filter_edge_cases_without_ssh() -> None:
    async def main() -> None:
        w = Wire()
        f = w.filter
        f.vendor_data(init_packet(3))
        f.device_data(frame(2, u32(3) + string(b"copy-data") + string(b"1")))  # VERSION with copy-data
        assert parse_reply(w.to_vendor[-1]).extensions == ()
        f.vendor_data(_ext(1, b"expand-path@openssh.com", string(b"~/x")))
        f.device_data(frame(104, u32(1) + u32(1) + string(b"/data/dicom/x") + string(b"") + u32(0)))  # NAME
        assert w.vendor_replies()[-1].code == FX_PERMISSION_DENIED
        f.vendor_data(read_request(2, b"never-opened", 0, 10))  # unknown handle: forwarded, data refused
        f.device_data(frame(103, u32(2) + string(b"DICM")))
        assert w.vendor_replies()[-1].code == FX_PERMISSION_DENIED
        f.device_data(u32(0))  # garbage from the device
        assert w.fatal and "device broke the SFTP protocol" in w.fatal[0]
        assert f.close().error == w.fatal[0]
        sent = len(w.to_device)
        f.vendor_data(REQUEST_STAT)  # closed: nothing more is forwarded
        assert len(w.to_device) == sent

    asyncio.run(main())


REQUEST_STAT = frame(FXP_STAT, u32(9) + string(b"/tmp"))


def test_filter_without_on_fatal_raises_to_the_relay() -> None:
    from sessions.sftp_codec import SftpProtocolError

    async def main() -> None:
        w = Wire(fatal=False)
        with pytest.raises(SftpProtocolError, match="outside 1..263168"):
            w.filter.vendor_data(u32(1 << 30))
        assert w.filter.close().error

    asyncio.run(main())


def test_filter_bounds_the_check_queue() -> None:
    async def main() -> None:
        w = Wire()
        w.filter.vendor_data(init_packet(3) + b"".join(frame(FXP_STAT, u32(i) + string(b"/tmp/%d" % i))
                                                       for i in range(1100)))
        assert w.fatal and "more than 1024 SFTP requests" in w.fatal[0]
        await w.filter.wait_closed()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- protocol violations
def _version_reply() -> bytes:
    return frame(2, u32(3))


@pytest.mark.parametrize("name,vendor,device,reason", [
    ("request before INIT", [REQUEST_STAT], [], "a stat request (packet type 17) before INIT"),
    ("second INIT", [init_packet(3), init_packet(3)], [], "a second INIT"),
    ("a reply type from the vendor", [init_packet(3), frame(101, u32(1) + u32(0) + string(b"") + string(b""))], [],
     "packet type 101 is not an SFTP v3 request"),
    ("an unknown request type", [init_packet(3), frame(42, u32(4))], [], "packet type 42 is not an SFTP v3 request"),
    ("reused id", [init_packet(3), frame(FXP_STAT, u32(9) + string(b"/tmp/a")), REQUEST_STAT], [],
     "request id 9 is used by a request still in flight"),
    ("truncated request", [init_packet(3), frame(FXP_STAT, u32(9) + u32(100))], [], "truncated SFTP stat request"),
    ("oversize", [u32(1 << 30)], [], "outside 1..263168 bytes"),
    ("reply before VERSION", [init_packet(3)], [frame(101, u32(1) + u32(0))], "before VERSION"),
    ("second VERSION", [init_packet(3)], [_version_reply(), _version_reply()], "a VERSION after the first"),
    ("reply nobody asked for", [init_packet(3)], [_version_reply(), frame(101, u32(77) + u32(0))],
     "a status reply to request id 77, which is not in flight"),
    ("unknown reply type", [init_packet(3)], [_version_reply(), frame(150, u32(1))], "packet type 150 is not"),
])
def test_protocol_violations_end_the_channel_with_the_reason(name, vendor, device, reason) -> None:
    async def main() -> Wire:
        w = Wire()
        for packet in vendor:
            w.filter.vendor_data(packet)
        for packet in device:
            w.filter.device_data(packet)
        await asyncio.sleep(0)
        return w

    w = asyncio.run(main())
    assert len(w.fatal) == 1 and reason in w.fatal[0], (name, w.fatal)
    assert w.filter.close().error == w.fatal[0]


def test_a_reply_of_the_wrong_type_ends_the_channel() -> None:
    async def main() -> Wire:
        w = Wire()
        w.filter.vendor_data(init_packet(3))
        w.filter.device_data(_version_reply())
        w.filter.vendor_data(frame(FXP_STAT, u32(5) + string(b"/tmp")))
        for _ in range(20):  # the path check resolves asynchronously
            await asyncio.sleep(0.01)
            if w.to_device[1:]:
                break
        assert parse_request(w.to_device[-1]).op == "stat"
        w.filter.device_data(frame(103, u32(5) + string(b"secret bytes")))  # DATA answering a STAT
        return w

    w = asyncio.run(main())
    assert w.fatal and "a data reply to a stat request (id 5)" in w.fatal[0]
    assert not any(b"secret bytes" in p for p in w.to_vendor)


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=80)), max_size=12))
def test_fuzz_any_bytes_either_side_end_cleanly_or_pass(chunks) -> None:
    """Whatever both peers send, the filter never raises to the relay and never hangs: it forwards, answers
    locally, or ends the channel once with a sentence."""
    async def main() -> Wire:
        w = Wire()
        w.filter.vendor_data(init_packet(3))
        w.filter.device_data(_version_reply())
        for from_vendor, data in chunks:
            (w.filter.vendor_data if from_vendor else w.filter.device_data)(data)
        await asyncio.sleep(0)
        w.filter.close()
        await w.filter.wait_closed()
        return w

    w = asyncio.run(main())
    assert len(w.fatal) <= 1 and all(isinstance(m, str) and "SFTP" in m for m in w.fatal)


# ---------------------------------------------------------------------------------------------- reply units (issue 16)
def test_the_filter_announces_the_largest_reply_before_the_request_that_can_bring_it() -> None:
    """The recorder's acknowledgment window needs the largest packet the vendor may be sent next. An upload's
    WRITEs bring 28-byte statuses, so its unit stays small (the session is not held in lock step); a 300 KiB READ
    announces its DATA reply before the device sees the request, and the unit drops again only after that reply
    went out. A reply larger than its request allows ends the channel before any of it reaches the vendor."""
    from sessions.sftp import SMALL_REPLY
    from sessions.sftp_codec import FXP_WRITE

    log: list[tuple[str, object]] = []

    async def main() -> tuple[SftpFilter, list[str], list[tuple[str, object]]]:
        fatal: list[str] = []

        async def realpath(path: bytes) -> bytes:
            return path

        async def head(path: bytes, n: int) -> bytes:
            return b"benign"

        f = SftpFilter(ProtectedPaths.build("ct-01", ["/data/dicom"]), realpath, head,
                       lambda p: log.append(("device", parse_request(p))),
                       lambda p: log.append(("vendor", p)), lambda n, d: None, lambda d, x: None,
                       on_fatal=fatal.append, expect_reply=lambda n: log.append(("unit", n)))
        f.vendor_data(init_packet(3))
        f.device_data(_version_reply())
        f.vendor_data(frame(FXP_OPEN, u32(1) + string(b"/tmp/up.bin") + u32(FXF_READ | FXF_WRITE | FXF_CREAT)
                            + u32(0)))
        for _ in range(200):  # the path check resolves asynchronously
            await asyncio.sleep(0.01)
            if any(kind == "device" and r.op == "open" for kind, r in log):
                break
        f.device_data(frame(102, u32(1) + string(b"h1")))  # HANDLE
        for i in range(2, 10):  # pipelined writes, as `sftp put` sends them
            f.vendor_data(frame(FXP_WRITE, u32(i) + string(b"h1") + u64((i - 2) * 32768) + string(b"w" * 32768)))
        for i in range(2, 10):
            f.device_data(frame(101, u32(i) + u32(FX_OK) + string(b"") + string(b"")))
        mark = len(log)
        f.vendor_data(read_request(20, b"h1", 0, 300 * 1024))
        f.device_data(frame(103, u32(20) + string(b"r" * MAX_DATA)))
        after_read = log[mark:]
        f.vendor_data(read_request(21, b"h1", 0, 10))
        f.device_data(frame(103, u32(21) + string(b"x" * 11)))  # one byte more than asked for
        return f, fatal, after_read

    f, fatal, after_read = asyncio.run(main())
    units = [n for kind, n in log if kind == "unit"]
    assert units[0] == SMALL_REPLY, "the channel's first announcement is the small unit"
    writes_end = next(i for i, (kind, r) in enumerate(log) if kind == "device" and getattr(r, "id", None) == 9)
    assert [n for kind, n in log[:writes_end + 9] if kind == "unit"] == [SMALL_REPLY], \
        "writes and their statuses must not raise the unit"
    kinds = [kind for kind, _ in after_read]
    assert kinds == ["unit", "device", "vendor", "unit"], after_read
    assert after_read[0][1] == 13 + MAX_DATA and after_read[1][1].length == MAX_DATA
    assert after_read[3][1] == SMALL_REPLY
    assert fatal and "a data reply of 24 bytes to a read request (id 21); at most 23 bytes" in fatal[0]
    assert not any(kind == "vendor" and p.endswith(b"x" * 11) for kind, p in log)
    assert units[-1] == 0, "a closed channel withdraws its announcement"
