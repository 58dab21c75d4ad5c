"""Tamper evidence end to end: after real sessions through the broker, a flipped recording byte, an edited audit
row and a re-chained audit tail are each named by ``medbroker audit verify`` (a real process), exit 1."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from broker.audit import checkpoint_message, row_hash, write_checkpoint
from broker.keys import load_signing_key, verify_hex
from frontdoor_support import close_world, events, wait, world_with

pytestmark = pytest.mark.openssh
REPO = Path(__file__).resolve().parent.parent


def _verify(home: Path, *, process: bool = False) -> tuple[int, dict, str]:
    """``medbroker audit verify --json``: in-process (CliRunner), or as a real process with ``process=True``."""
    if process:
        env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
        r = subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(home), "audit", "verify", "--json"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        return r.returncode, json.loads(r.stdout), r.stderr
    from typer.testing import CliRunner

    from broker.cli import app

    r = CliRunner().invoke(app, ["--home", str(home), "audit", "verify", "--json"])
    return r.exit_code, json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A home after two real sessions, the broker stopped (its final checkpoint written)."""
    world = world_with(tmp_path_factory.mktemp("tamper"))
    try:
        world.grant()
        for text in ("first session", "second session"):
            r = world.ssh("alice@ct-01", f"echo {text}")
            assert r.returncode == 0, r.stderr
        assert wait(lambda: all(s["status"] != "live" for s in world.app.store.list_sessions()))
        assert wait(lambda: events(world, "audit.checkpoint")), "a checkpoint 0.5 s after the start"
    finally:
        close_world(world)
    return world.app.home


@pytest.fixture
def db(home):
    conn = sqlite3.connect(home / "medbroker.db", isolation_level=None)
    yield conn
    conn.close()


def _sessions(db) -> list[tuple[str, str]]:
    return db.execute("SELECT id, recording FROM sessions ORDER BY started_at").fetchall()


def test_untouched_evidence_verifies_and_the_last_row_is_signed(home, db):
    rc, report, _ = _verify(home, process=True)
    assert rc == 0 and report["ok"] and report["counts"] == {"ok": 2, "live": 0, "open": 0, "incomplete": 0, "broken": 0}
    last_id, last_hash, last_event = db.execute(
        "SELECT id, hash, event FROM audit_events ORDER BY id DESC LIMIT 1").fetchone()
    event_id, cp_hash, signature = db.execute(
        "SELECT event_id, hash, signature FROM audit_checkpoints ORDER BY id DESC LIMIT 1").fetchone()
    assert (event_id, cp_hash, last_event) == (last_id, last_hash, "audit.checkpoint"), "stop signs the tail"
    public = load_signing_key(home / "keys" / "signing_ed25519.pem").public_key()
    assert verify_hex(public, checkpoint_message(event_id, cp_hash), signature)


def test_a_flipped_recording_byte_names_that_session_only(home, db):
    (first, key), (second, _) = _sessions(db)
    path = home / "recordings" / key  # rows name recordings by key, relative to recording.dir (issue 12)
    data = bytearray(Path(path).read_bytes())
    original = bytes(data)
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
    try:
        rc, report, err = _verify(home, process=True)
        assert rc == 1 and not report["ok"] and f"1 recording(s): {first}" in err
        states = {r["session_id"]: r for r in report["recordings"]}
        assert states[first]["state"] == "broken" and states[first]["problems"]
        assert states[second]["state"] == "ok"
        assert report["audit"]["ok"]
    finally:
        Path(path).write_bytes(original)
    assert _verify(home)[0] == 0


def test_an_edited_audit_row_is_named(home, db):
    row_id, details = db.execute(
        "SELECT id, details FROM audit_events WHERE event = 'session.start' ORDER BY id LIMIT 1").fetchone()
    forged = json.dumps({**json.loads(details), "recording": "elsewhere.mbr"})
    db.execute("UPDATE audit_events SET details = ? WHERE id = ?", (forged, row_id))
    try:
        rc, report, err = _verify(home)
        assert rc == 1 and "audit chain" in err
        assert f"audit row {row_id}: content does not match its hash (altered)" in report["audit"]["problems"]
    finally:
        db.execute("UPDATE audit_events SET details = ? WHERE id = ?", (details, row_id))
    assert _verify(home)[0] == 0


def test_a_rechained_tail_is_caught_by_the_signed_checkpoint(home, db):
    """Delete a row and re-hash everything after it, as someone without the signing key would."""
    saved = db.execute("SELECT * FROM audit_events ORDER BY id").fetchall()
    cols = [c[0] for c in db.execute("SELECT * FROM audit_events LIMIT 0").description]
    victim = db.execute("SELECT id FROM audit_events WHERE event = 'session.end' ORDER BY id DESC LIMIT 1").fetchone()[0]
    rows = [dict(zip(cols, r)) for r in saved]
    try:
        db.execute("BEGIN")
        db.execute("DELETE FROM audit_events WHERE id >= ?", (victim,))
        prev = rows[victim - 2]["hash"]
        for row in rows[victim:]:
            row = {**row, "id": row["id"] - 1, "prev_hash": prev}
            row["hash"] = prev = row_hash(prev, row)
            db.execute(f"INSERT INTO audit_events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       tuple(row[c] for c in cols))
        db.execute("COMMIT")
        rc, report, _ = _verify(home)
        assert rc == 1
        problems = report["audit"]["problems"]
        assert not any("does not match its hash" in p or "does not link" in p for p in problems), "chain is consistent"
        assert any(p.startswith("checkpoint ") and ("is missing" in p or "differs from the signed checkpoint" in p)
                   for p in problems), problems
    finally:
        db.execute("DELETE FROM audit_events")
        db.executemany(f"INSERT INTO audit_events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", saved)
    assert _verify(home)[0] == 0


def test_checkpoints_are_written_only_when_the_chain_grew(home):
    from broker.app import open_app

    app = open_app(home)
    try:
        assert write_checkpoint(app.audit, app.signing_key) is None  # nothing new since the broker's last one
        app.audit.record("user.created", user="zoe", source="test")
        cp = write_checkpoint(app.audit, app.signing_key)
        assert cp is not None and cp["event_id"] == app.store.last_audit_id()
        assert write_checkpoint(app.audit, app.signing_key) is None
    finally:
        app.close()
    assert _verify(home)[0] == 0
