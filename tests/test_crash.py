"""Crash consistency: ``medbroker serve`` killed with SIGKILL mid-session leaves a readable, verifiable prefix;
the next start seals it, and ``audit verify`` calls it incomplete, not tampered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.keys import FileKeyProvider
from broker.store import open_store
from frontdoor_support import Serve, prepared_home, wait
from helpers.clients import write_known_hosts
from helpers.net import free_port
from helpers.pty import PtySession
from sessions.recording import read_frames

pytestmark = pytest.mark.openssh
REPO = Path(__file__).resolve().parent.parent


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    return subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(home), *args], capture_output=True,
                          env=env, cwd=REPO, timeout=60)


def _typed_text(path: str, keys: FileKeyProvider) -> tuple[bytes, bytes]:
    frames = list(read_frames(path, key_lookup=keys.get, strict=False))
    inp = b"".join(f.payload for f in frames if f.kind == "input")
    out = b"".join(f.payload for f in frames if f.kind == "output")
    return inp, out


def test_sigkill_mid_session_then_restart_seals_an_incomplete_recording(tmp_path, device):
    home, people = prepared_home(tmp_path, device())
    keys = FileKeyProvider(home / "keys" / "data.key")
    port = free_port()
    known_hosts = write_known_hosts(tmp_path / "known_hosts", "127.0.0.1", port,
                                    (home / "keys" / "host_ed25519.pub").read_text())
    broker = Serve(home, port, tmp_path / "broker.log")
    term = None
    try:
        term = PtySession.spawn_ssh("alice@ct-01", "127.0.0.1", port, people["alice"].private_path, "cat",
                                    known_hosts=known_hosts)
        term.sendline("typed before the crash 6x7")
        term.expect(b"typed before the crash 6x7\r\n" * 2, timeout=20)  # pty echo, then cat's copy
        store = open_store(home / "medbroker.db", migrate=False)
        try:
            [row] = store.list_sessions()
        finally:
            store.close()
        assert row["status"] == "live"
        # The writer thread writes right behind the relay; wait until the bytes are on disk, then kill.
        path = home / "recordings" / row["recording"]  # rows name recordings by key (issue 12)
        assert wait(lambda: b"typed before the crash" in _typed_text(path, keys)[1], timeout=10)
        broker.kill9()
        assert term.wait(15) == 255  # ssh: connection lost

        broker = Serve(home, port, tmp_path / "broker.log")  # the next start seals what the crash left
        store = open_store(home / "medbroker.db", migrate=False)
        try:
            sealed = store.get_session(row["id"])
            events = [e for e in store.audit_rows(event="session.sealed") if e["session_id"] == row["id"]]
        finally:
            store.close()
        assert sealed["status"] == "incomplete"
        assert sealed["end_reason"] == "broker stopped unexpectedly; recording sealed"
        assert sealed["final_hash"] and sealed["signature"]
        assert len(events) == 1 and json.loads(events[0]["details"])["final_hash"] == sealed["final_hash"]

        verify = _cli(home, "audit", "verify", "--json")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        [entry] = [r for r in report["recordings"] if r["session_id"] == row["id"]]
        assert entry["state"] == "incomplete" and entry["problems"] == []
        assert report["audit"]["ok"] and report["counts"]["broken"] == 0

        typed, shown = _typed_text(path, keys)
        assert b"typed before the crash 6x7" in typed
        assert b"typed before the crash 6x7" in shown
    finally:
        if term is not None:
            term.close()
        broker.stop()
