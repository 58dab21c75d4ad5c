"""Fail closed: a recordings volume that is full refuses new sessions and ends live ones with the reason;
the broker still starts and ``medbroker check`` names the cause. Uses a small tmpfs, so it needs root."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from frontdoor_support import close_world, details, events, wait, world_with
from helpers import HelperTimeoutError
from helpers.clients import run_command
from helpers.procs import finish_piped

pytestmark = [pytest.mark.openssh, pytest.mark.root]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    r = run_command(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], timeout=10)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if run_command(["umount", str(path)], timeout=10).returncode != 0:
            run_command(["umount", "-l", str(path)], timeout=10)  # busy: detach now, freed when closed


def fill(volume: Path) -> Path:
    """Write a file until the volume reports ENOSPC; returns it (delete it to free the space)."""
    filler = volume / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:
        for _ in range(100_000):  # bounded: 6 GiB at most, the tmpfs is far smaller
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError(f"{volume} never filled up")
    for size in (4096, 512, 1):  # top up the last partial page too
        try:
            with open(filler, "ab", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * size)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def _config(recordings: Path) -> str:
    return f'[recording]\ndir = "{recordings}"\nmode = "strict"\n'


def _check(world) -> subprocess.CompletedProcess:
    from typer.testing import CliRunner

    from broker.cli import app

    return CliRunner().invoke(app, ["--home", str(world.app.home), "check"])


def test_full_volume_refuses_sessions_but_the_broker_starts_and_check_names_it(tmp_path):
    with tmpfs(tmp_path / "recs", "1m") as recs:
        filler = fill(recs)
        world = world_with(tmp_path, _config(recs))  # the broker starts although nothing can be recorded
        try:
            world.grant()
            helpful = world.ssh("bob", "grants")  # the broker itself keeps working
            assert helpful.returncode == 0, helpful.stderr
            r = world.ssh("alice@ct-01", "echo should-not-run")
            assert r.returncode == 1 and b"should-not-run" not in r.stdout
            assert b"recording is unavailable, and medbroker never runs a session it cannot record" in r.stderr
            assert b"tell the hospital's security team" in r.stderr
            assert world.app.store.list_sessions() == []
            failed = events(world, "recording.failed", "alice")
            assert failed and "No space left on device" in details(failed[-1])["error"]
            assert details(events(world, "session.refused", "alice")[-1])["reason"] == "recording unavailable"

            check = _check(world)
            assert check.exit_code == 2
            line = next(ln for ln in check.stdout.splitlines() if "recordings" in ln)
            assert line.startswith("FAIL") and str(recs) in line and "sessions will be refused" in line

            filler.unlink()  # space again: sessions work without restarting the broker
            ok = world.ssh("alice@ct-01", "echo recorded-again")
            assert ok.returncode == 0 and ok.stdout == b"recorded-again\n", ok.stderr
        finally:
            close_world(world)


def test_live_session_hitting_a_full_volume_is_ended_and_told_why(tmp_path):
    with tmpfs(tmp_path / "recs", "2m") as recs:
        world = world_with(tmp_path, _config(recs))
        try:
            world.grant()
            with world.pty("alice@ct-01", "cat") as term:
                term.sendline("before the disk filled")
                term.expect(b"before the disk filled\r\n" * 2, timeout=20)
                [row] = world.app.store.list_sessions()
                assert wait(lambda: world.app.recordings.size(row["recording"]) > 0)
                fill(recs)
                told = b"recording failed (No space left on device), and medbroker never runs a session it cannot record"
                for i in range(200):  # up to ~200 KiB of echoed text: the writer's next batches hit ENOSPC
                    try:
                        term.sendline(f"{i:04d} " + "x" * 1000)
                        term.expect(told, timeout=0.05)  # also drains the echo, so ssh never blocks on the pty
                        break
                    except HelperTimeoutError:
                        if term.returncode is not None:
                            break
                assert told in term.output
                assert term.wait(20) != 0
            assert wait(lambda: world.app.store.get_session(row["id"])["status"] != "live")
            ended = world.app.store.get_session(row["id"])
            assert ended["status"] == "recording-failed"
            failed = [e for e in events(world, "recording.failed") if e["session_id"] == row["id"]]
            assert failed and "No space left on device" in details(failed[0])["error"]
            # the sessions row is updated before the session.end audit row is written: wait for the row
            assert wait(lambda: [e for e in events(world, "session.end") if e["session_id"] == row["id"]])
            end = [e for e in events(world, "session.end") if e["session_id"] == row["id"]]
            assert len(end) == 1 and details(end[0])["status"] == "recording-failed"
        finally:
            close_world(world)


# --- finding 7 of issue 11: the acknowledgment rule -------------------------------------------------------
ACK_WINDOW = 256 << 10  # docs/recording-format.md, "The acknowledgment rule"


class _Broker:
    """``medbroker serve`` in a child process (its own GIL, as in production) with recordings on ``recs``;
    alice holds a grant on ct-01 (a real sshd)."""

    def __init__(self, tmp_path: Path, device, recs: Path, mode: str) -> None:
        from frontdoor_support import Serve, prepared_home
        from helpers.clients import write_known_hosts
        from helpers.net import free_port

        # The opaque-output budget (64 KiB of random base64 by default) would end the session long before the
        # recordings volume fills: this test is about the recording path, so the budget is set out of the way.
        self.recs = recs  # sessions rows name recordings by key, relative to this directory
        self.home, self.people = prepared_home(tmp_path, device(), f'[recording]\ndir = "{recs}"\nmode = "{mode}"\n'
                                               '[policy]\nmax_opaque_output = "1GiB"\n')
        self.port = free_port()
        self.known_hosts = write_known_hosts(tmp_path / "known_hosts", "127.0.0.1", self.port,
                                             (self.home / "keys" / "host_ed25519.pub").read_text())
        self.serve = Serve(self.home, self.port, tmp_path / "broker.log")

    def store(self):
        from broker.store import open_store

        return open_store(self.home / "medbroker.db", migrate=False)

    def session(self) -> dict:
        store = self.store()
        try:
            [row] = store.list_sessions()
            return dict(row)
        finally:
            store.close()

    def audit(self, name: str, session_id: str) -> list[dict]:
        store = self.store()
        try:
            return [details(e) for e in store.audit_rows(event=name) if e["session_id"] == session_id]
        finally:
            store.close()

    def recorded_output(self, path: str) -> int:
        from broker.keys import FileKeyProvider
        from sessions.recording import read_frames

        keys = FileKeyProvider(self.home / "keys" / "data.key")
        return sum(len(f.payload) for f in read_frames(self.recs / path, key_lookup=keys.get, strict=False)
                   if f.kind in ("output", "stderr"))


class _Vendor:
    """A real ``ssh alice@ct-01@broker CMD`` whose stdout is counted as it arrives (never stored)."""

    def __init__(self, broker: _Broker, command: str) -> None:
        import threading
        import time

        from helpers.clients import ssh_options

        argv = ["ssh", *ssh_options(key=broker.people["alice"].private_path, known_hosts=broker.known_hosts,
                                    host_key_checking="yes"),
                "-p", str(broker.port), "alice@ct-01@127.0.0.1", command]
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")}
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.received = 0
        self.eof_at: float | None = None  # wall time the vendor's stdout closed (the channel and ssh ended)
        self.stderr = b""

        def pump_out() -> None:
            while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
                self.received += len(chunk)
            self.eof_at = time.time()

        def pump_err() -> None:
            self.stderr = self.proc.stderr.read()

        self._threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
        for t in self._threads:
            t.start()

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            finish_piped(self.proc, self._threads)
        return code


def _seconds(iso: str) -> float:
    from broker.clock import parse_utc

    return parse_utc(iso).timestamp()


LOG_LINES = "seq -f 'maintenance log line %.0f: all good' 1 900000"  # ordinary text, 34,088,895 bytes


def _fill_while_streaming(tmp_path: Path, device, command: str) -> tuple[int, float]:
    """One strict session streaming ``command`` into a fresh 3 MiB recordings volume; checks what the vendor
    and the audit see and returns (output bytes the vendor got that the recording lacks, ms from the
    writer's failure to the vendor's channel closing)."""
    with tmpfs(tmp_path / "recs", "3m") as recs:
        broker = _Broker(tmp_path, device, recs, "strict")
        try:
            vendor = _Vendor(broker, command)
            code = vendor.wait(120)
            assert code != 0, (f"the session should have been ended; vendor got {vendor.received} B, stderr "
                               f"{vendor.stderr[-500:]!r}; broker log:\n{broker.serve.log.read_text()[-3000:]}")
            assert b"recording failed (No space left on device)" in vendor.stderr, vendor.stderr
            row = broker.session()
            assert wait(lambda: broker.session()["status"] != "live", timeout=20)
            assert broker.session()["status"] == "recording-failed"
            recorded = broker.recorded_output(row["recording"])
            unrecorded = vendor.received - recorded
            # (finish() adds a second row, without failed_at, when closing re-raises the same error)
            failed = [e for e in broker.audit("recording.failed", row["id"]) if e.get("failed_at")]
            assert len(failed) == 1 and "No space left on device" in failed[0]["error"]
            ended_after_ms = (vendor.eof_at - _seconds(failed[0]["failed_at"])) * 1000
            print(f"\n{command!r}: vendor received {vendor.received} B, recording holds {recorded} B of output, "
                  f"unrecorded {unrecorded} B ({unrecorded / 1024:.1f} KiB); vendor's channel closed "
                  f"{ended_after_ms:.1f} ms after the write failed (load average {os.getloadavg()[0]:.1f})")
            assert 1 << 20 < recorded < 3 << 20  # the volume really filled mid-session
            assert unrecorded <= ACK_WINDOW, f"{unrecorded} bytes reached the vendor unrecorded"
            [end] = broker.audit("session.end", row["id"])
            assert end["status"] == "recording-failed"
            return unrecorded, ended_after_ms
        finally:
            broker.serve.stop()


@pytest.mark.parametrize("command", [
    "head -c 20000000 /dev/urandom | base64",  # the reproduction: 27 MB of high-entropy text
    LOG_LINES,
])
def test_full_volume_lets_at_most_the_ack_window_out_unrecorded_and_ends_within_100ms(tmp_path, device, command):
    """Finding 7: tens of MB of output into a 3 MiB recordings volume. What the vendor received beyond what the
    recording holds is at most the acknowledgment window (256 KiB), and the session ends (the vendor's ssh
    sees its channel close) within 100 ms of the writer's failure, with "recording failed".

    The byte bound is checked on every attempt. The 100 ms deadline is a wall-clock figure, which an
    overloaded machine can blow by not scheduling the broker (seen at load 6-7 on 2 cores,
    docs/recording-format.md), so it gets up to five fresh sessions to meet it.
    """
    times = []
    for attempt in range(5):
        _, ended_after_ms = _fill_while_streaming(tmp_path / f"try{attempt}", device, command)
        times.append(ended_after_ms)
        if ended_after_ms <= 100:
            break
    assert min(times) <= 100, f"the session ended {', '.join(f'{t:.0f}' for t in times)} ms after the failure"


def test_an_sftp_download_into_a_full_volume_lets_at_most_the_ack_window_out_unrecorded(tmp_path, device):
    """The rule holds on SFTP channels too, where replies reach the vendor whole and, while the writer is behind,
    wait in the relay's outbox (issue 16: the device's next reply is read and judged meanwhile). A 24 MB download
    into a 3 MiB recordings volume: what the vendor's sftp wrote to its disk beyond what the recording holds is at
    most 256 KiB, and the vendor is told why the session ended."""
    from helpers.clients import run_sftp_batch

    dev = device()
    big = dev.root / "tmp" / "firmware-dump.bin"
    big.write_bytes(os.urandom(24 << 20))
    big.chmod(0o644)
    local = tmp_path / "got.bin"
    with tmpfs(tmp_path / "recs", "3m") as recs:
        broker = _Broker(tmp_path, lambda: dev, recs, "strict")
        try:
            r = run_sftp_batch(f"get {big} {local}\n", "alice@ct-01", "127.0.0.1", broker.port,
                               broker.people["alice"].private_path, known_hosts=broker.known_hosts, timeout=120)
            assert r.returncode != 0, r.stderr
            assert b"recording failed (No space left on device)" in r.stderr, r.stderr
            assert wait(lambda: broker.session()["status"] != "live", timeout=20)
            row = broker.session()
            assert row["status"] == "recording-failed"
            recorded = broker.recorded_output(row["recording"])
            got = local.stat().st_size if local.exists() else 0
            print(f"\nsftp get: vendor wrote {got} B, recording holds {recorded} B of output")
            assert 1 << 20 < recorded < 3 << 20  # the volume really filled mid-download
            assert got <= recorded + ACK_WINDOW, f"{got - recorded} bytes reached the vendor unrecorded"
        finally:
            broker.serve.stop()


def test_best_effort_mode_warns_and_delivers_everything_when_the_volume_fills(tmp_path, device):
    """recording.mode = "best_effort" keeps its meaning: the vendor is warned once and the session goes on
    (every byte delivered, exit status 0), while recording.failed is audited."""
    expected = sum(len(f"maintenance log line {i}: all good\n") for i in range(1, 900001))
    with tmpfs(tmp_path / "recs", "3m") as recs:
        broker = _Broker(tmp_path, device, recs, "best_effort")
        try:
            vendor = _Vendor(broker, LOG_LINES)
            assert vendor.wait(120) == 0, vendor.stderr
            assert vendor.received == expected
            assert vendor.stderr.count(b"warning: recording failed; this session continues unrecorded") == 1
            row = broker.session()
            assert wait(lambda: broker.session()["status"] != "live", timeout=20)
            failed = broker.audit("recording.failed", row["id"])
            assert failed and "No space left on device" in failed[0]["error"]
            assert 1 << 20 < broker.recorded_output(row["recording"]) < 3 << 20
        finally:
            broker.serve.stop()
