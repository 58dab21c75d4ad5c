"""One measurement with the stock OpenSSH clients (ssh, sftp, scp) over one path; every byte is checked.

Each function returns a :class:`Sample`. A broker refusal ("medbroker: ..." on stderr) is reported as
``refused`` rather than as an error, so a path that does not offer a feature yet reads "not available".
All waits are bounded by a deadline; a client that overruns is killed (its own process group).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from bench.world import BenchWorld

__all__ = ["Sample", "bulk_download", "bulk_upload", "sftp_transfer", "scp_transfer", "keystrokes", "setup_time",
           "sha256_file"]

_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


@dataclass
class Sample:
    """One measurement: ``value`` in the metric's unit when ok; ``refused`` holds the broker's message."""

    ok: bool
    value: float | None = None
    error: str | None = None
    refused: str | None = None
    extra: dict = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _refusal(stderr: bytes) -> str | None:
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("medbroker:"):
            return line.strip()
    return None


def _spawn(world: "BenchWorld", argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, env=world.client_env, start_new_session=True, **kw)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _finish(proc: subprocess.Popen, deadline: float) -> tuple[int | None, bytes]:
    """Wait for exit within the deadline (kill otherwise); returns (returncode or None, stderr)."""
    try:
        proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        return None, _read_err(proc)
    return proc.returncode, _read_err(proc)


def _read_err(proc: subprocess.Popen) -> bytes:
    if proc.stderr is None:
        return b""
    try:
        return proc.stderr.read() or b""
    except (OSError, ValueError):
        return b""


def _failed(proc_rc: int | None, err: bytes, what: str) -> Sample:
    refused = _refusal(err)
    if refused:
        return Sample(False, refused=refused)
    why = "timed out" if proc_rc is None else f"exit {proc_rc}"
    return Sample(False, error=f"{what}: {why}: {err.decode(errors='replace').strip()[-400:]}")


def _check_file(path: Path, size: int, sha: str) -> str | None:
    try:
        got = path.stat().st_size
    except OSError as exc:
        return f"{path} missing: {exc.strerror}"
    if got != size:
        return f"{path}: {got} bytes, expected {size}"
    if sha256_file(path) != sha:
        return f"{path}: sha256 differs from the source"
    return None


def bulk_download(world: "BenchWorld", host: str, timeout: float) -> Sample:
    """``ssh host cat LOG`` (the device log payload, see bench.world.device_log) into a tmpfs file; MB/s from
    the first byte to EOF."""
    dest = world.local / f"down-{host}.bin"
    deadline = time.monotonic() + timeout
    proc = _spawn(world, ["ssh", "-F", str(world.ssh_config), host, f"cat {world.log_blob}"],
                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd = proc.stdout.fileno()
    _big_pipe(fd)
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    first = end = None
    n = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                _kill(proc)
                return Sample(False, error=f"download via {host} timed out after {n} bytes")
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                end = time.perf_counter()
                break
            if first is None:
                first = time.perf_counter()
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
            n += len(chunk)
    finally:
        os.close(out)
        proc.stdout.close()
    rc, err = _finish(proc, deadline)
    try:
        if rc != 0:
            return _failed(rc, err, f"download via {host}")
        bad = _check_file(dest, world.blob_size, world.log_sha)
        if bad:
            return Sample(False, error=f"download via {host}: {bad}")
        return Sample(True, n / (end - first) / 1e6, extra={"seconds": end - first})
    finally:
        dest.unlink(missing_ok=True)


def _big_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass


def bulk_upload(world: "BenchWorld", host: str, timeout: float) -> Sample:
    """``ssh host 'echo R; cat > F; echo D'`` fed from a tmpfs file; MB/s from R to D (all bytes on the device)."""
    remote = world.data / f"up-{host}.bin"
    remote.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    proc = _spawn(world, ["ssh", "-F", str(world.ssh_config), host, f"echo R; cat > {remote} && echo D"],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    win, rout = proc.stdin.fileno(), proc.stdout.fileno()
    _big_pipe(win)
    os.set_blocking(win, False)
    got = b""
    start = end = None
    src = open(world.local_blob, "rb")
    pending = memoryview(b"")
    try:
        while end is None:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(proc)
                return Sample(False, error=f"upload via {host} timed out")
            wants_write = start is not None and not proc.stdin.closed
            r, w, _ = select.select([rout], [win] if wants_write else [], [], left)
            if r:
                chunk = os.read(rout, 4096)
                if not chunk:
                    break
                got += chunk
                if start is None and b"R\n" in got:
                    start = time.perf_counter()
                if b"D\n" in got:
                    end = time.perf_counter()
            if w:
                if not pending:
                    pending = memoryview(src.read(_CHUNK))
                    if not pending:
                        proc.stdin.close()
                        continue
                try:
                    pending = pending[os.write(win, pending):]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    proc.stdin.close()
    finally:
        src.close()
        if not proc.stdin.closed:
            proc.stdin.close()
        proc.stdout.close()
    rc, err = _finish(proc, deadline)
    try:
        if rc != 0 or end is None:
            return _failed(rc, err, f"upload via {host}")
        bad = _check_file(remote, world.blob_size, world.blob_sha)
        if bad:
            return Sample(False, error=f"upload via {host}: {bad}")
        return Sample(True, world.blob_size / (end - start) / 1e6, extra={"seconds": end - start})
    finally:
        remote.unlink(missing_ok=True)


def sftp_transfer(world: "BenchWorld", host: str, direction: str, timeout: float) -> Sample:
    """``sftp -b`` get or put of the blob; MB/s between two local ``!date`` marks around the transfer."""
    marks = world.local / f"marks-{host}"
    if direction == "get":
        dest, op = world.local / f"sftp-{host}.bin", f"get {world.blob} {world.local / f'sftp-{host}.bin'}"
    else:
        dest = world.data / f"sftp-{host}.bin"
        op = f"put {world.local_blob} {dest}"
    dest.unlink(missing_ok=True)
    batch = world.local / f"batch-{host}"
    batch.write_text(f"!date +%s%N > {marks}.0\n{op}\n!date +%s%N > {marks}.1\n")
    deadline = time.monotonic() + timeout
    proc = _spawn(world, ["sftp", "-q", "-F", str(world.ssh_config), "-b", str(batch), host],
                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rc, err = _finish(proc, deadline)
    try:
        if rc != 0:
            return _failed(rc, err, f"sftp {direction} via {host}")
        t0, t1 = (int((marks.parent / f"{marks.name}.{i}").read_text()) for i in (0, 1))
        bad = _check_file(dest, world.blob_size, world.blob_sha)
        if bad:
            return Sample(False, error=f"sftp {direction} via {host}: {bad}")
        return Sample(True, world.blob_size / ((t1 - t0) / 1e9) / 1e6, extra={"seconds": (t1 - t0) / 1e9})
    finally:
        dest.unlink(missing_ok=True)
        for i in (0, 1):
            (marks.parent / f"{marks.name}.{i}").unlink(missing_ok=True)


def scp_transfer(world: "BenchWorld", host: str, direction: str, timeout: float) -> Sample:
    """``scp`` (SFTP protocol, the OpenSSH >= 9.0 default) get or put; MB/s over the whole run incl. setup."""
    if direction == "get":
        dest = world.local / f"scp-{host}.bin"
        argv = ["scp", "-q", "-F", str(world.ssh_config), f"{host}:{world.blob}", str(dest)]
    else:
        dest = world.data / f"scp-{host}.bin"
        argv = ["scp", "-q", "-F", str(world.ssh_config), str(world.local_blob), f"{host}:{dest}"]
    dest.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    proc = _spawn(world, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rc, err = _finish(proc, deadline)
    elapsed = time.perf_counter() - t0
    try:
        if rc != 0:
            return _failed(rc, err, f"scp {direction} via {host}")
        bad = _check_file(dest, world.blob_size, world.blob_sha)
        if bad:
            return Sample(False, error=f"scp {direction} via {host}: {bad}")
        return Sample(True, world.blob_size / elapsed / 1e6, extra={"seconds": elapsed})
    finally:
        dest.unlink(missing_ok=True)


def _read_until(fd: int, want: bytes, deadline: float) -> bytes:
    buf = b""
    while want not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"waiting for {want!r}; got {buf[-200:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the client side of the pty is gone
            chunk = b""
        if not chunk:
            raise EOFError(f"EOF waiting for {want!r}; got {buf[-200:]!r}")
        buf += chunk
    return buf


def keystrokes(world: "BenchWorld", host: str, count: int, gap_s: float, timeout: float) -> Sample:
    """Single bytes through ``ssh -tt host 'stty raw -echo; printf R; exec cat'`` on a local pty.

    Time from writing one byte to the pty master to reading the same byte back; ``value`` is the p50 in ms
    and ``extra["rtt_ms"]`` holds every round trip.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    tty.setraw(slave)
    env = dict(world.client_env, TERM="xterm")
    deadline = time.monotonic() + timeout
    err_path = world.local / f"keys-{host}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(["ssh", "-F", str(world.ssh_config), "-tt", host, "stty raw -echo; printf R; exec cat"],
                                stdin=slave, stdout=slave, stderr=err, env=env, start_new_session=True)
    os.close(slave)
    rtts: list[float] = []
    try:
        try:
            _read_until(master, b"R", deadline)
            for i in range(count):
                key = bytes([97 + i % 26])
                t0 = time.perf_counter_ns()
                os.write(master, key)
                got = _read_until(master, key, deadline)
                t1 = time.perf_counter_ns()
                if got != key:
                    return Sample(False, error=f"keystrokes via {host}: sent {key!r}, read {got!r}")
                rtts.append((t1 - t0) / 1e6)
                if gap_s:
                    time.sleep(gap_s)
        except (TimeoutError, EOFError) as exc:
            _kill(proc)
            text = err_path.read_bytes()
            refused = _refusal(text)
            if refused:
                return Sample(False, refused=refused)
            return Sample(False, error=f"keystrokes via {host} after {len(rtts)}: {exc}; {text[-300:]!r}")
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _kill(proc)
        os.close(master)
        err_path.unlink(missing_ok=True)
    srt = sorted(rtts)
    return Sample(True, srt[len(srt) // 2], extra={"rtt_ms": rtts})


def setup_time(world: "BenchWorld", host: str, timeout: float) -> Sample:
    """Wall time of ``ssh host true``: process start, connect, key exchange, auth, session, exit."""
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    proc = _spawn(world, ["ssh", "-F", str(world.ssh_config), host, "true"],
                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rc, err = _finish(proc, deadline)
    elapsed = time.perf_counter() - t0
    if rc != 0:
        return _failed(rc, err, f"setup via {host}")
    return Sample(True, elapsed * 1000)
