"""Secrets hygiene: a TOTP code typed at the keyboard-interactive prompt and the TOTP secret never reach the
recording, the database, the broker's log (at debug level) or any --json output; ``medbroker keys rotate``
re-seals stored secrets and keeps every recording readable."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.app import open_app
from broker.cli import app as cli
from broker.keys import FileKeyProvider
from broker.totp import enrol_totp
from frontdoor_support import Serve, add_person, close_world, code, details, events, prepared_home, wait, world_with
from helpers.clients import write_known_hosts
from helpers.net import free_port
from helpers.pty import PtySession
from sessions.recording import read_frames, read_header

pytestmark = pytest.mark.openssh


def _token(value: str) -> re.Pattern[bytes]:
    """``value`` standing alone: not inside a longer run of hex digits or a timestamp's fraction."""
    return re.compile(rb"(?<![0-9A-Fa-f.])" + re.escape(value.encode()) + rb"(?![0-9A-Fa-f])")


def _cli(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def test_a_typed_code_and_the_secret_appear_nowhere(tmp_path, device):
    home, people = prepared_home(tmp_path, device())
    a = open_app(home)
    try:
        secret = enrol_totp(a.store, a.keys, "alice").secret.reveal()
    finally:
        a.close()
    port = free_port()
    known_hosts = write_known_hosts(tmp_path / "known_hosts", "127.0.0.1", port,
                                    (home / "keys" / "host_ed25519.pub").read_text())
    log = tmp_path / "broker.log"
    broker = Serve(home, port, log, "--log-level", "debug")
    try:
        typed = code(secret)
        with PtySession.spawn_ssh("alice@ct-01", "127.0.0.1", port, people["alice"].private_path,
                                  "echo session-output-$((6*7)); cat", known_hosts=known_hosts) as term:
            term.expect(b"Verification code:", timeout=15)
            term.sendline(typed)
            term.expect(b"session-output-42", timeout=15)
            term.sendline("a line typed in the session")
            term.expect(b"a line typed in the session\r\n" * 2, timeout=15)
            term.send(b"\x04")  # ^D: cat ends, the session closes cleanly
            assert term.wait(15) == 0
            shown = bytes(term.output)
    finally:
        assert broker.stop() == 0
    assert typed.encode() not in shown.replace(b"Verification code:", b""), "the code is not echoed back"

    a = open_app(home)
    try:
        [session] = a.store.list_sessions()
        assert session["status"] == "closed"
        frames = list(read_frames(a.recordings.local_path(session["recording"]), key_lookup=a.keys.get))
        assert b"a line typed in the session" in b"".join(f.payload for f in frames if f.kind == "input")
        json_outputs = [_cli(home, *args).stdout for args in (
            ("user", "show", "alice", "--json"), ("user", "list", "--json"), ("audit", "log", "--json"),
            ("sessions", "show", session["id"], "--json"), ("sessions", "list", "--json"))]
        success = [e for e in a.store.audit_rows(event="auth.success") if e["user_name"] == "alice"]
        assert details(success[-1])["method"] == "publickey+totp"
    finally:
        a.close()
    export = tmp_path / "export.json"
    assert _cli(home, "export", session["id"], "--format", "json", "-o", str(export)).exit_code == 0

    places = {
        "recording (raw)": a.recordings.local_path(session["recording"]).read_bytes(),
        "recording (decrypted)": b"\n".join(f.payload for f in frames),
        "export": export.read_bytes(),
        "broker log (debug)": log.read_bytes(),
        **{f"--json output {i}": out.encode() for i, out in enumerate(json_outputs)},
        **{f"database file {p.name}": p.read_bytes() for p in home.glob("medbroker.db*")},
        **{f"file {p.relative_to(home)}": p.read_bytes() for p in home.rglob("*.jsonl")},
    }
    assert len(log.read_bytes()) > 1000 and b"DEBUG" in log.read_bytes(), "the log really was at debug level"
    raw_secret = base64.b32decode(secret)
    for where, data in places.items():
        assert not _token(typed).search(data), f"the typed TOTP code is in the {where}"
        assert secret.encode() not in data and secret.lower().encode() not in data, f"the TOTP secret is in the {where}"
        assert raw_secret not in data, f"the raw TOTP secret is in the {where}"


# ----------------------------------------------------------------------------- key rotation
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = world_with(tmp_path_factory.mktemp("rotate"))
    try:
        yield w
    finally:
        close_world(w)


def test_rotation_reseals_secrets_and_keeps_old_recordings_readable(world, tmp_path):
    home = world.app.home
    name, secret = add_person(world)
    before = world.ssh(f"{name}@ct-01", "echo before rotation", key=name, password=code(secret))
    assert before.returncode == 0, before.stderr
    assert wait(lambda: all(s["status"] != "live" for s in world.app.store.list_sessions()))
    [old_session] = [s for s in world.app.store.list_sessions() if s["user_name"] == name]
    old_key = read_header(world.app.recordings.local_path(old_session["recording"]))["encryption"]["key_id"]
    sealed_before = (world.app.store.get_device("ct-01")["credential"], world.app.store.get_user(name)["totp_secret"])

    r = _cli(home, "keys", "rotate", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["old_key"] == old_key and doc["new_key"] != old_key
    assert doc["devices_resealed"] == 1 and doc["totp_secrets_resealed"] == 1
    sealed_after = (world.app.store.get_device("ct-01")["credential"], world.app.store.get_user(name)["totp_secret"])
    assert all(s.startswith(doc["new_key"] + ":") for s in sealed_after) and sealed_after != sealed_before
    assert details(events(world, "keys.rotated")[-1])["new_key"] == doc["new_key"]

    # the running broker reads the new key file: the re-sealed device credential and TOTP secret work
    after = world.ssh(f"{name}@ct-01", "echo after rotation", key=name, password=code(secret, 1))
    assert after.returncode == 0 and after.stdout == b"after rotation\n", after.stderr
    assert wait(lambda: all(s["status"] != "live" for s in world.app.store.list_sessions()))
    new_session = [s for s in world.app.store.list_sessions() if s["user_name"] == name and s["id"] != old_session["id"]][0]
    assert read_header(world.app.recordings.local_path(new_session["recording"]))["encryption"]["key_id"] == doc["new_key"]

    out = tmp_path / "old.txt"
    exported = _cli(home, "export", old_session["id"], "--format", "text", "-o", str(out))
    assert exported.exit_code == 0, exported.output
    assert "before rotation" in out.read_text()
    assert _cli(home, "audit", "verify").exit_code == 0


def test_rotation_refuses_and_changes_nothing_when_a_secret_does_not_decrypt(world):
    home = world.app.home
    name, _ = add_person(world)
    key_file = FileKeyProvider(home / "keys" / "data.key").path
    keys_before = key_file.read_bytes()
    good = world.app.store.get_user(name)["totp_secret"]
    world.app.store.set_user_totp(name, good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB"))
    try:
        r = _cli(home, "keys", "rotate")
        assert r.exit_code == 1
        assert "nothing was rotated" in r.stderr and "could not be decrypted" in r.stderr
        assert key_file.read_bytes() == keys_before
    finally:
        world.app.store.set_user_totp(name, good)
