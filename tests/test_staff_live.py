"""Live sessions for security staff: list, watch and kill from separate medbroker processes, against real OpenSSH."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app as cli_app
from helpers.broker import World

pytestmark = pytest.mark.openssh
PROMPT = re.compile(rb"[#$] ")
REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


class Cli:
    """``medbroker`` as a separate process, with its output collected by a thread (bounded waits)."""

    def __init__(self, home: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
        self.proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "--home", str(home), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
        self.out = bytearray()
        self.err = bytearray()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(pipe, sink: bytearray) -> None:
        for chunk in iter(lambda: pipe.read1(65536), b""):
            sink += chunk

    def wait_for(self, needle: bytes, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.out:
                return True
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                return needle in self.out
            time.sleep(0.05)
        return False

    def wait(self, timeout: float = 15.0) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def _cli(world: World, *args: str):
    r = runner.invoke(cli_app, ["--home", str(world.app.home), *args])
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def _live_id(world: World) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = world.app.store.list_sessions(status="live")
        if rows:
            return rows[0]["id"]
        time.sleep(0.05)
    raise AssertionError("no live session")


def _wait_ended(world: World, sid: str) -> dict:
    """ssh exits a moment before the broker has stored the session's outcome."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = world.app.store.get_session(sid)
        if row["status"] != "live":
            return row
        time.sleep(0.05)
    raise AssertionError(f"session {sid} still live")


def test_watch_and_kill_from_other_processes(world):
    grant = world.grant()
    term = world.pty("alice@ct-01", cols=100, rows=30)
    watcher = None
    try:
        term.expect(PROMPT)
        sid = _live_id(world)

        # sessions list (another process would see the same rows): live, user, device, grant end, idle
        doc = json.loads(_cli(world, "sessions", "list", "--live", "--json").stdout)
        live = doc["sessions"][0]
        assert (live["id"], live["user"], live["device"], live["status"]) == (sid, "alice", "ct-01", "live")
        assert live["grant_ends_at"] and live["grant_ends_at"].startswith(grant.ends_at.strftime("%Y-%m-%dT%H:%M"))
        assert isinstance(live["idle_s"], int) and live["idle_s"] >= 0
        text = _cli(world, "sessions", "list", "--live").stdout
        assert "grant ends" in text and "idle" in text and sid in text

        term.sendline("echo before-watch-$((6*7))")
        term.expect(b"before-watch-42")
        watcher = Cli(world.app.home, "sessions", "watch", sid, "--by", "carol")
        # the watcher first shows what happened before it started, then follows
        assert watcher.wait_for(b"before-watch-42"), (bytes(watcher.out), bytes(watcher.err))
        term.sendline("echo marker-$((7*6))-live")
        term.expect(b"marker-42-live")
        assert watcher.wait_for(b"marker-42-live"), (bytes(watcher.out), bytes(watcher.err))

        # watching is read-only: the watcher's stdin is not connected to the session at all
        killer = Cli(world.app.home, "sessions", "kill", sid, "--reason", "audit hold 7", "--by", "carol")
        assert killer.wait() == 0, bytes(killer.err)
        assert b"will end within about a second" in killer.out
        killer.close()

        term.expect(b"security staff ended this session: audit hold 7", timeout=10)
        assert term.wait(15) != 0  # ssh reports the session's exit status 1

        # the watcher saw the same notice and ends by itself when the session ends
        assert watcher.wait_for(b"security staff ended this session: audit hold 7")
        assert watcher.wait(15) == 0, bytes(watcher.err)
        assert b"watching session " + sid.encode() in watcher.err
        assert re.search(rb"session \S+ ended \(killed: security staff ended this session: audit hold 7\)",
                         bytes(watcher.err)), bytes(watcher.err)
    finally:
        if watcher is not None:
            watcher.close()
        term.close()

    row = _wait_ended(world, sid)
    assert row["status"] == "killed" and row["kill_requested_by"] == "carol" and row["kill_reason"] == "audit hold 7"
    watched = world.events("recording.watched")
    assert [(e["actor"], e["session_id"], e["user_name"], e["device"]) for e in watched] == [
        ("carol", sid, "alice", "ct-01")]
    requested = world.events("session.kill.requested")
    assert requested[-1]["actor"] == "carol" and json.loads(requested[-1]["details"])["reason"] == "audit hold 7"
    killed = world.events("session.killed")
    assert killed[-1]["session_id"] == sid and json.loads(killed[-1]["details"]) == {"by": "carol",
                                                                                     "reason": "audit hold 7"}

    # afterwards: the session is indexed; show lists its commands with timestamps and the kill as an alert
    deadline = time.monotonic() + 10
    while not world.app.store.get_session(sid)["indexed_at"] and time.monotonic() < deadline:
        time.sleep(0.05)
    shown = json.loads(_cli(world, "sessions", "show", sid, "--json").stdout)
    commands = [c["command"] for c in shown["commands"]]
    assert "echo before-watch-$((6*7))" in commands and "echo marker-$((7*6))-live" in commands
    assert all(c["at"].startswith(row["started_at"][:10]) and c["offset"] > 0 for c in shown["commands"])
    assert "session.killed" in [e["event"] for e in shown["alerts"]]
    text = _cli(world, "sessions", "show", sid).stdout
    assert "Commands" in text and "echo marker-$((7*6))-live" in text and "Denials and alerts" in text


def test_watch_refuses_ended_sessions_and_wrong_roles(world):
    world.grant()
    r = world.ssh("alice@ct-01", "echo done")
    assert r.returncode == 0
    sid = world.app.store.list_sessions()[0]["id"]
    _wait_ended(world, sid)
    res = _cli(world, "sessions", "watch", sid, "--by", "carol")
    assert res.exit_code == 1 and "is not live" in res.stderr and f"medbroker replay {sid}" in res.stderr
    term = world.pty("alice@ct-01")
    try:
        term.expect(PROMPT)
        live = _live_id(world)
        res = _cli(world, "sessions", "watch", live, "--by", "alice")
        assert res.exit_code == 1 and "may not" in res.stderr
        res = _cli(world, "sessions", "watch", "no-such-session")
        assert res.exit_code == 1 and "does not exist" in res.stderr
        assert world.events("recording.watched") == []
        # --for bounds a watch of a session that goes on
        w = Cli(world.app.home, "sessions", "watch", live, "--for", "1s", "--by", "carol")
        try:
            assert w.wait(20) == 0, bytes(w.err)
            assert b"still live" in w.err
        finally:
            w.close()
    finally:
        term.close()


def test_kill_twice_and_kill_of_ended_session(world):
    world.grant()
    term = world.pty("alice@ct-01")
    try:
        term.expect(PROMPT)
        sid = _live_id(world)
        assert _cli(world, "sessions", "kill", sid, "--reason", "x\x1b[2J", "--by", "carol").exit_code == 2
        first = _cli(world, "sessions", "kill", sid, "--by", "carol")
        assert first.exit_code == 0, first.stderr
        again = _cli(world, "sessions", "kill", sid, "--by", "carol")
        assert again.exit_code == 1 and ("already" in again.stderr or "not live" in again.stderr)
        term.expect(b"security staff ended this session: no reason given", timeout=10)
        term.wait(15)
    finally:
        term.close()
    _wait_ended(world, sid)
    res = _cli(world, "sessions", "kill", sid, "--by", "carol")
    assert res.exit_code == 1 and "is not live" in res.stderr
    assert len(world.events("session.kill.requested")) == 1
