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
                assert wait(lambda: os.path.getsize(row["recording"]) > 0)
                fill(recs)
                told = b"recording became unavailable, and medbroker never runs a session it cannot record"
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
            end = [e for e in events(world, "session.end") if e["session_id"] == row["id"]]
            assert len(end) == 1 and details(end[0])["status"] == "recording-failed"
        finally:
            close_world(world)
