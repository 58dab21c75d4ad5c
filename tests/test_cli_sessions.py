"""CLI over recorded sessions: sessions list/show/kill, replay, export and audit verify of recordings."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.app import App, init_home, open_app
from broker.clock import utc_iso
from broker.devices import add_device
from broker.grants import approve_request, request_grant
from broker.identity import add_user, get_principal
from sessions.recording import seal_recording, sign_final_hash
from sessions.recwriter import RecordingWriter

from broker.cli import app as cli_app

runner = CliRunner()
OUTPUT = [b"\x1b[1mct-01 service shell\x1b[0m\r\n", b"$ ", b"tail system.log\r\n", b"tube temp 41C\r\n"]


class Env:
    """A broker home with users, a device, a grant, and recorded sessions written with the real recorder."""

    def __init__(self, home: Path, keys) -> None:
        self.home = home
        a = init_home(home)
        try:
            now = a.clock.now()
            for name, role in (("alice", "vendor"), ("bob", "approver"), ("carol", "security")):
                add_user(a.store, name, role, None, now)
            add_device(a.store, a.audit, a.keys, name="ct-01", host="127.0.0.1", port=22, login="svc",
                       host_key=keys["host"].public_key, now=now, key_text=keys["device"].private_path.read_text())
            req = request_grant(a.store, a.audit, a.rules, get_principal(a.store, "alice"), "ct-01", 3600, "work", now)
            self.grant_id = approve_request(a.store, a.audit, a.rules, req.id, get_principal(a.store, "bob"),
                                            now).grant.id
        finally:
            a.close()
        self.writers: list[RecordingWriter] = []

    def app(self) -> App:
        return open_app(self.home)

    def record(self, sid: str, *, close: bool = True, encrypt: bool = True) -> Path:
        """A session the way the broker records it: session row, recording frames, signed final hash, audit."""
        a = self.app()
        try:
            now = a.clock.now()
            path = a.config.recordings_dir / f"{sid}.mbr"
            key_id, key = a.keys.current() if encrypt else (None, None)
            header = {"session_id": sid, "user": "alice", "device": "ct-01", "grant_id": self.grant_id,
                      "started_at": utc_iso(now)}
            w = RecordingWriter(path, header, clock=a.clock, aead_key=key, key_id=key_id)
            w.append_event(1, "pty", {"term": "xterm-256color", "cols": 100, "rows": 30})
            w.append_event(1, "shell", {})
            for chunk in OUTPUT:
                w.append_data(1, "output", chunk)
            w.append_data(1, "input", b"tail system.log\r")
            w.append_event(1, "exit", {"status": 0})
            a.store.insert_session({"id": sid, "user_name": "alice", "device": "ct-01", "grant_id": self.grant_id,
                                    "source": "127.0.0.1:50000", "started_at": utc_iso(now), "status": "live",
                                    "recording": str(path), "broker_pid": os.getpid()})
            a.audit.record("session.start", user="alice", device="ct-01", session_id=sid, grant_id=self.grant_id)
            if not close:
                assert w.drain(10)
                self.writers.append(w)
                return path
            final = w.close("vendor disconnected")
            a.store.update_session(sid, status="closed", ended_at=utc_iso(a.clock.now()), final_hash=final,
                                   signature=sign_final_hash(a.signing_key, final), end_reason="vendor disconnected",
                                   bytes_out=sum(map(len, OUTPUT)))
            a.audit.record("session.end", user="alice", device="ct-01", session_id=sid, grant_id=self.grant_id,
                           final_hash=final)
            return path
        finally:
            a.close()

    def record_crashed(self, sid: str) -> Path:
        """A session whose broker died (no end frame), sealed at the next start: status incomplete."""
        path = self.record(sid, close=False)
        partial = path.read_bytes()  # what the disk held when the process died
        self.writers.pop().close("not reached")
        path.write_bytes(partial)
        final, _ = seal_recording(path)
        a = self.app()
        try:
            a.store.update_session(sid, status="incomplete", final_hash=final, ended_at=utc_iso(a.clock.now()),
                                   signature=sign_final_hash(a.signing_key, final))
            a.audit.record("session.sealed", user="alice", device="ct-01", session_id=sid, final_hash=final)
        finally:
            a.close()
        return path

    def cli(self, *args: str, input: str | None = None):
        r = runner.invoke(cli_app, ["--home", str(self.home), *args], input=input)
        assert "Traceback" not in r.stdout + r.stderr
        return r

    def ok(self, *args: str):
        r = self.cli(*args)
        assert r.exit_code == 0, f"{args}: {r.exit_code}\n{r.stdout}\n{r.stderr}"
        return r

    def sql(self, statement: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.home / "medbroker.db")
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    def close(self) -> None:
        for w in self.writers:
            w.close("test over")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from helpers import missing_openssh_binaries
    from helpers.keys import generate_keypair

    if "ssh-keygen" in missing_openssh_binaries():
        pytest.skip("ssh-keygen is missing")
    directory = tmp_path_factory.mktemp("keys")
    return {name: generate_keypair(directory, name) for name in ("device", "host")}


@pytest.fixture
def env(tmp_path, keys):
    e = Env(tmp_path / "home", keys)
    try:
        yield e
    finally:
        e.close()


def _flip_byte(path: Path, offset_from_end: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- list / show
def test_sessions_list_and_show(env):
    env.record("s-closed")
    env.record("s-live", close=False)
    docs = json.loads(env.ok("sessions", "list", "--json").stdout)["sessions"]
    assert {d["id"]: d["status"] for d in docs} == {"s-closed": "closed", "s-live": "live"}
    live = json.loads(env.ok("sessions", "list", "--live", "--json").stdout)["sessions"]
    assert [d["id"] for d in live] == ["s-live"] and live[0]["user"] == "alice"
    shown = json.loads(env.ok("sessions", "show", "s-closed", "--json").stdout)
    assert shown["status"] == "closed" and shown["final_hash"] and shown["end_reason"] == "vendor disconnected"
    assert shown["bytes_out"] == sum(map(len, OUTPUT)) and shown["transfers"] == []
    human = env.ok("sessions", "show", "s-closed").stdout
    assert "medbroker replay s-closed" in human and "alice" in human
    assert "s-live" in env.ok("sessions", "list").stdout
    events = json.loads(env.ok("audit", "log", "--session", "s-closed", "--json").stdout)["events"]
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    assert {e["session_id"] for e in events} == {"s-closed"}
    r = env.cli("sessions", "show", "nope")
    assert r.exit_code == 1 and "session 'nope' does not exist" in r.stderr


def test_sessions_list_is_newest_first_bounded_and_says_what_ran(env):
    """Staff look for yesterday's session among months of them: newest first, --since/--until/--limit,
    and a column that says what the session ran (first command of the index, files moved)."""
    a = env.app()
    try:
        for day in range(1, 6):
            sid = f"s-2026-11-0{day}"
            a.store.insert_session({"id": sid, "user_name": "alice", "device": "ct-01", "grant_id": env.grant_id,
                                    "source": "127.0.0.1", "started_at": f"2026-11-0{day}T10:00:00.000000Z",
                                    "status": "closed", "recording": str(a.config.recordings_dir / f"{sid}.mbr")})
        a.store.save_session_text("s-2026-11-04", [(1.0, 1, "exec", "tail -n 50 /var/log/vendor/service.log"),
                                                   (2.0, 1, "exec", "uptime")], [], "2026-11-04T10:05:00Z")
    finally:
        a.close()
    docs = json.loads(env.ok("sessions", "list", "--json").stdout)["sessions"]
    assert [d["id"] for d in docs] == [f"s-2026-11-0{d}" for d in (5, 4, 3, 2, 1)]
    assert docs[1]["activity"] == {"commands": 2, "sources": "exec", "first": "tail -n 50 /var/log/vendor/service.log"}
    got = json.loads(env.ok("sessions", "list", "--since", "2026-11-02", "--until", "2026-11-04", "--json").stdout)
    assert [d["id"] for d in got["sessions"]] == ["s-2026-11-04", "s-2026-11-03", "s-2026-11-02"] and not got["more"]
    got = json.loads(env.ok("sessions", "list", "--limit", "2", "--json").stdout)
    assert [d["id"] for d in got["sessions"]] == ["s-2026-11-05", "s-2026-11-04"] and got["more"]
    human = env.ok("sessions", "list", "--limit", "2").stdout
    assert "exec: tail -n 50" in human and "(+1)" in human and "the newest 2" in human
    assert env.cli("sessions", "list", "--since", "yesterday-ish").exit_code == 2
    assert env.cli("sessions", "list", "--limit", "-1").exit_code == 2


def test_a_redirected_table_is_never_cut_to_an_exported_terminal_width(env, monkeypatch):
    """`medbroker sessions list > file` with COLUMNS=80 exported (pytest-xdist and some shells export it): the
    headers and values reach the file whole, as without COLUMNS."""
    a = env.app()
    try:
        a.store.insert_session({"id": "s-wide", "user_name": "alice", "device": "ct-01", "grant_id": env.grant_id,
                                "source": "127.0.0.1", "started_at": "2026-11-01T10:00:00.000000Z",
                                "status": "closed", "recording": str(a.config.recordings_dir / "s-wide.mbr")})
    finally:
        a.close()
    monkeypatch.setenv("COLUMNS", "80")
    narrow = env.ok("sessions", "list").stdout
    monkeypatch.delenv("COLUMNS")
    assert narrow == env.ok("sessions", "list").stdout
    for header in ("status", "started", "length", "grant"):
        assert header in narrow, narrow


# ----------------------------------------------------------------------------- replay
def test_replay_instant_prints_the_terminal_and_is_audited(env):
    env.record("s1")
    r = env.ok("replay", "s1", "--instant", "--by", "carol")
    assert r.stdout_bytes == b"".join(OUTPUT) + b"\r\n"  # byte-exact terminal output; input is not repeated
    assert "replaying session s1" in r.stderr and "verified" in r.stderr
    ((actor, sid, details),) = env.sql("SELECT actor, session_id, details FROM audit_events "
                                       "WHERE event = 'recording.replayed'")
    assert (actor, sid) == ("carol", "s1") and json.loads(details)["instant"] is True


def test_replay_with_timing_options(env):
    env.record("s1")
    r = env.ok("replay", "s1", "--speed", "50", "--max-idle", "1s", "--from", "0s")
    assert "tube temp 41C" in r.stdout
    assert env.sql("SELECT actor FROM audit_events WHERE event = 'recording.replayed'")[0][0].startswith("local:")


@pytest.mark.parametrize("args, message", [
    (["--speed", "0"], "--speed 0.0 must be above 0"),
    (["--max-idle", "soon"], "--max-idle 'soon' is not a duration"),
    (["--from", "-1m"], "--from '-1m' is not a duration"),
])
def test_replay_bad_options_are_usage_errors(env, args, message):
    env.record("s1")
    r = env.cli("replay", "s1", *args)
    assert r.exit_code == 2 and message in r.stderr
    assert env.sql("SELECT count(*) FROM audit_events WHERE event = 'recording.replayed'") == [(0,)]


def test_replay_refuses_vendors_and_tampered_recordings(env):
    path = env.record("s1")
    r = env.cli("replay", "s1", "--by", "alice")
    assert r.exit_code == 1 and "alice (vendor) may not replay recordings" in r.stderr
    _flip_byte(path)
    r = env.cli("replay", "s1", "--instant")
    assert r.exit_code == 1 and "failed verification" in r.stderr and "medbroker export s1" in r.stderr
    assert r.stdout == ""
    assert env.sql("SELECT count(*) FROM audit_events WHERE event = 'recording.replayed'") == [(0,)]


# ----------------------------------------------------------------------------- export
def test_export_asciicast_text_and_json(env, tmp_path):
    env.record("s1")
    cast = tmp_path / "s1.cast"
    r = env.ok("export", "s1", "--format", "asciicast", "-o", str(cast))
    assert "Exported session s1 as asciicast" in r.stdout and "verified" in r.stdout
    lines = cast.read_text().splitlines()
    head = json.loads(lines[0])
    assert head["version"] == 2 and (head["width"], head["height"]) == (100, 30)
    assert "verified" in head["env"]["MEDBROKER_VERIFICATION"]
    events = [json.loads(line) for line in lines[1:]]
    assert "".join(e[2] for e in events if e[1] == "o") == b"".join(OUTPUT).decode()
    assert cast.stat().st_mode & 0o077 == 0
    text = tmp_path / "s1.txt"
    env.ok("export", "s1", "--format", "text", "-o", str(text))
    transcript = text.read_text()
    assert "tube temp 41C" in transcript and "\x1b" not in transcript
    doc = json.loads(env.ok("export", "s1", "--format", "json", "-o", "-").stdout)
    assert doc["verification"]["ok"] is True and doc["header"]["session_id"] == "s1"
    assert [f["kind"] for f in doc["frames"]][:3] == ["pty", "shell", "output"]
    rows = env.sql("SELECT actor, details FROM audit_events WHERE event = 'recording.exported' ORDER BY id")
    assert [json.loads(d)["format"] for _, d in rows] == ["asciicast", "text", "json"]
    assert json.loads(rows[0][1])["path"] == str(cast)


def test_export_of_a_damaged_recording_says_so(env, tmp_path):
    path = env.record("s1")
    _flip_byte(path)
    out = tmp_path / "s1.json"
    r = env.ok("export", "s1", "--format", "json", "-o", str(out), "--json")
    summary = json.loads(r.stdout)
    assert summary["verification"]["ok"] is False and summary["verification"]["problems"]
    assert "Warning: the recording failed verification" in r.stderr
    assert json.loads(out.read_text())["verification"]["ok"] is False


def test_export_bad_format_and_unknown_session(env, tmp_path):
    env.record("s1")
    r = env.cli("export", "s1", "--format", "mp4", "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "format 'mp4' is not known" in r.stderr
    assert not (tmp_path / "x").exists()
    r = env.cli("export", "s9", "--format", "text", "-o", str(tmp_path / "x"))
    assert r.exit_code == 1 and "session 's9' does not exist" in r.stderr


# ----------------------------------------------------------------------------- audit verify with recordings
def test_audit_verify_reports_ok_live_and_incomplete(env):
    env.record("s-ok")
    env.record("s-live", close=False)
    env.record_crashed("s-crashed")
    r = env.ok("audit", "verify")
    assert "recording s-live: live" in r.stdout and "recording s-crashed: incomplete" in r.stdout
    assert "recordings: 1 ok, 1 live, 1 incomplete, 0 broken" in r.stdout
    doc = json.loads(env.ok("audit", "verify", "--json").stdout)
    states = {rec["session_id"]: rec["state"] for rec in doc["recordings"]}
    assert states == {"s-ok": "ok", "s-live": "live", "s-crashed": "incomplete"} and doc["ok"] is True


@pytest.mark.parametrize("damage, problem", [
    ("flip", "hash mismatch"),
    ("delete", "recording file is missing"),
    ("db-hash", "final hash differs from the one stored in the database"),
    ("signature", "signature invalid"),
    ("truncate", "final hash differs"),
])
def test_audit_verify_names_a_damaged_recording(env, damage, problem):
    env.record("s-good")
    path = env.record("s-bad")
    if damage == "flip":
        _flip_byte(path)
    elif damage == "delete":
        path.unlink()
    elif damage == "db-hash":
        env.sql("UPDATE sessions SET final_hash = ? WHERE id = 's-bad'", ("ab" * 32,))
    elif damage == "signature":
        env.sql("UPDATE sessions SET signature = ? WHERE id = 's-bad'", ("00" * 64,))
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    r = env.cli("audit", "verify")
    assert r.exit_code == 1, r.stdout + r.stderr
    broken = [line for line in r.stdout.splitlines() if line.startswith("recording s-bad: BROKEN")]
    assert broken and problem in broken[0], r.stdout
    assert "s-good" not in r.stdout.replace("recording s-good: ok", "")
    assert "verification failed: 1 recording(s): s-bad" in r.stderr
    doc = json.loads(env.cli("audit", "verify", "--json").stdout)
    assert {rec["session_id"]: rec["state"] for rec in doc["recordings"]} == {"s-good": "ok", "s-bad": "broken"}


def test_startup_seals_an_interrupted_recording_off_the_store_thread(env, monkeypatch):
    """The seal reads the whole recording: on the store's single thread it held up every database call."""
    import asyncio
    import threading

    from broker import live
    from broker.jump import open_jump
    from broker.server import Broker

    path = env.record("s-interrupted", close=False)
    partial = path.read_bytes()  # what the disk held when the process died
    env.writers.pop().close("not reached")
    path.write_bytes(partial)
    threads: list[str] = []
    real_seal = live.seal_recording

    def seal(p):  # our own function, observed: which thread runs it
        threads.append(threading.current_thread().name)
        return real_seal(p)

    monkeypatch.setattr(live, "seal_recording", seal)
    a = env.app()
    try:
        asyncio.run(Broker(a, open_jump=open_jump).seal_interrupted())
        row = a.store.get_session("s-interrupted")
        sealed = a.store.audit_rows(event="session.sealed")
    finally:
        a.close()
    assert row["status"] == "incomplete" and row["final_hash"] and row["signature"]
    assert [e["session_id"] for e in sealed] == ["s-interrupted"]
    assert len(threads) == 1 and not threads[0].startswith("medbroker-store"), threads


def test_audit_verify_cross_checks_the_audit_log(env):
    env.record("s1")
    other = "cd" * 32
    a = env.app()
    try:  # a forger who rewrites the DB row (hash and a valid signature) still disagrees with the audit chain
        env.sql("UPDATE sessions SET final_hash = ?, signature = ? WHERE id = 's1'",
                (other, sign_final_hash(a.signing_key, other)))
    finally:
        a.close()
    r = env.cli("audit", "verify")
    assert r.exit_code == 1 and "differs from the one in the audit log" in r.stdout


# ----------------------------------------------------------------------------- kill
def test_sessions_kill_marks_a_live_session_and_audits(env):
    env.record("s-live", close=False)
    env.record("s-closed")
    r = env.cli("sessions", "kill", "s-live", "--by", "alice", "--reason", "x")
    assert r.exit_code == 1 and "alice (vendor) may not end sessions" in r.stderr
    doc = json.loads(env.ok("sessions", "kill", "s-live", "--by", "carol", "--reason", "copying images",
                            "--json").stdout)
    assert doc["kill_requested_by"] == "carol" and doc["kill_reason"] == "copying images"
    assert doc["kill_requested_at"]
    ((actor, details),) = env.sql("SELECT actor, details FROM audit_events WHERE event = 'session.kill.requested'")
    assert actor == "carol" and json.loads(details)["reason"] == "copying images"
    r = env.cli("sessions", "kill", "s-live")
    assert r.exit_code == 1 and "already" in r.stderr
    r = env.cli("sessions", "kill", "s-closed")
    assert r.exit_code == 1 and "is not live (status closed)" in r.stderr


@pytest.mark.openssh
def test_sessions_kill_ends_a_real_session(tmp_path, device):
    """Real ssh → broker → sshd; `medbroker sessions kill` through the CLI ends it within about a second."""
    from helpers.broker import World
    from helpers.clients import ssh_options

    world = World(tmp_path, device()).setup()
    proc = None
    try:
        world.grant(600)
        argv = ["ssh", *ssh_options(key=world.keys["alice"].private_path, known_hosts=world.known_hosts,
                                    host_key_checking="yes"), "-p", str(world.port), "alice@ct-01@127.0.0.1",
                "sleep 30"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while world.harness.live_count() != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert world.harness.live_count() == 1
        (sid,) = [s["id"] for s in world.app.store.list_sessions(status="live")]
        home = world.app.home
        r = runner.invoke(cli_app, ["--home", str(home), "sessions", "kill", sid, "--by", "carol",
                                    "--reason", "unexpected copy"])
        assert r.exit_code == 0, r.stderr
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 3.0
        assert b"unexpected copy" in err
        deadline = time.monotonic() + 10
        while world.app.store.get_session(sid)["status"] == "live" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert world.app.store.get_session(sid)["status"] == "killed"
        shown = json.loads(runner.invoke(cli_app, ["--home", str(home), "sessions", "show", sid, "--json"]).stdout)
        assert shown["status"] == "killed"
        r = runner.invoke(cli_app, ["--home", str(home), "audit", "verify"])
        assert r.exit_code == 0, r.stdout + r.stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        world.close()
