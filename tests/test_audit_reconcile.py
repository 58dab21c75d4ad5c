"""``medbroker audit verify`` reconciles the sessions table and the recordings with the audit chain's
session.start / session.end / session.sealed rows (issue 11 finding 8): after real sessions through the broker,
each edit an attacker with write access to the database and the recordings directory could make is named
(session id, what differs, expected vs found) and exits 1; untouched and retention-redacted evidence exits 0."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app as cli_app
from sessions.recwriter import RecordingWriter
from frontdoor_support import close_world, events, wait, world_with

pytestmark = pytest.mark.openssh


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A home after three real sessions (alice on ct-01) and one refused at connect, the broker stopped."""
    world = world_with(tmp_path_factory.mktemp("reconcile"))
    try:
        world.grant()
        for text in ("first", "second", "third"):
            r = world.ssh("alice@ct-01", f"echo {text} session")
            assert r.returncode == 0, r.stderr
        assert wait(lambda: len(events(world, "session.end")) == 3)
        # a session whose device connection fails: a sessions row and session.end, never session.start
        _sql(world.app.home, "UPDATE devices SET port = 1 WHERE name = 'ct-01'")
        r = world.ssh("alice@ct-01", "echo never")
        assert r.returncode != 0
        assert wait(lambda: len(events(world, "session.end")) == 4)
    finally:
        close_world(world)
    return world.app.home


def _sql(home: Path, statement: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(home / "medbroker.db")
    try:
        with conn:
            return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


@pytest.fixture
def home(original, tmp_path) -> Path:
    """A private copy of the evidence (recording paths moved with it; the audit chain is untouched)."""
    copy = tmp_path / "home"
    shutil.copytree(original, copy)
    _sql(copy, "UPDATE sessions SET recording = replace(recording, ?, ?)", (str(original), str(copy)))
    return copy


def _verify(home: Path) -> tuple[int, dict, str]:
    r = CliRunner().invoke(cli_app, ["--home", str(home), "audit", "verify", "--json"])
    assert "Traceback" not in r.stdout + r.stderr
    text = CliRunner().invoke(cli_app, ["--home", str(home), "audit", "verify"])
    assert text.exit_code == r.exit_code
    return r.exit_code, json.loads(r.stdout), text.stdout + text.stderr


def _sessions(home: Path) -> list[dict]:
    conn = sqlite3.connect(home / "medbroker.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM sessions ORDER BY started_at")]
    finally:
        conn.close()


def _closed(home: Path) -> list[dict]:
    return [s for s in _sessions(home) if s["status"] == "closed"]


def _differences(doc: dict, sid: str) -> dict[str, dict]:
    return {d["what"]: d for d in doc["differences"] if d["session_id"] == sid}


def test_untouched_evidence_verifies(home):
    rc, doc, text = _verify(home)
    assert rc == 0, text
    assert doc["ok"] and doc["differences"] == []
    assert doc["counts"] == {"ok": 4, "live": 0, "open": 0, "incomplete": 0, "broken": 0}
    failed = [s for s in _sessions(home) if s["status"] == "failed"]
    assert len(failed) == 1, "the refused-at-connect session is a known, consistent row"


def test_deleted_row_and_recording_are_named(home):
    victim = _closed(home)[1]
    _sql(home, "DELETE FROM sessions WHERE id = ?", (victim["id"],))
    (home / "recordings" / victim["recording"]).unlink()
    rc, doc, text = _verify(home)
    assert rc == 1
    diff = _differences(doc, victim["id"])
    assert diff["sessions row"]["expected"] == "present" and diff["sessions row"]["found"] == "missing"
    assert f"recording {victim['id']}: BROKEN: the sessions row is missing" in text
    assert victim["id"] in text.split("verification failed")[1]
    assert [d["session_id"] for d in doc["differences"]] == [victim["id"]], "nothing else is blamed"


def test_finished_session_set_back_to_live_is_named(home):
    victim = _closed(home)[0]
    _sql(home, "UPDATE sessions SET status = 'live', final_hash = NULL, signature = NULL, ended_at = NULL "
               "WHERE id = ?", (victim["id"],))
    path = (home / "recordings" / victim["recording"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, doc, text = _verify(home)
    assert rc == 1
    diff = _differences(doc, victim["id"])
    assert diff["status"]["expected"] == "closed" and diff["status"]["found"] == "live"
    entry = next(r for r in doc["recordings"] if r["session_id"] == victim["id"])
    assert entry["state"] == "broken" and any("final hash differs" in p or "truncated" in p
                                              for p in entry["problems"]), entry["problems"]
    assert f"session {victim['id']}: status: expected closed (audit chain), found live" in text


@pytest.mark.parametrize("column, value", [("user_name", "mallory"), ("device", "mr-02"), ("grant_id", 999)])
def test_changed_who_what_and_grant_are_named(home, column, value):
    victim = _closed(home)[2]
    _sql(home, f"UPDATE sessions SET {column} = ? WHERE id = ?", (value, victim["id"]))
    rc, doc, text = _verify(home)
    assert rc == 1
    diff = _differences(doc, victim["id"])[column]
    assert str(diff["expected"]) == str(victim[column]) and str(diff["found"]) == str(value)
    assert f"found {value}" in text and victim["id"] in text


def test_deleted_recording_only_is_named(home):
    victim = _closed(home)[0]
    (home / "recordings" / victim["recording"]).unlink()
    rc, doc, _ = _verify(home)
    assert rc == 1 and _differences(doc, victim["id"])["recording file"]["found"] == "missing"


def test_swapped_recordings_are_named(home):
    one, two = _closed(home)[:2]
    p1, p2 = home / "recordings" / one["recording"], home / "recordings" / two["recording"]
    b1, b2 = p1.read_bytes(), p2.read_bytes()
    p1.write_bytes(b2)
    p2.write_bytes(b1)
    rc, doc, _ = _verify(home)
    assert rc == 1
    for mine, theirs in ((one, two), (two, one)):
        diff = _differences(doc, mine["id"])["recording header session_id"]
        assert (diff["expected"], diff["found"]) == (mine["id"], theirs["id"])


def test_edited_final_hash_is_named(home):
    victim = _closed(home)[1]
    _sql(home, "UPDATE sessions SET final_hash = ? WHERE id = ?", ("ab" * 32, victim["id"]))
    rc, doc, _ = _verify(home)
    assert rc == 1
    diff = _differences(doc, victim["id"])["final_hash"]
    assert diff["expected"] == victim["final_hash"] and diff["found"] == "ab" * 32


def test_changed_status_and_invented_row_are_named(home):
    one = _closed(home)[0]
    _sql(home, "UPDATE sessions SET status = 'expired' WHERE id = ?", (one["id"],))
    _sql(home, "INSERT INTO sessions (id, user_name, device, grant_id, source, started_at, status, recording) "
               "SELECT 'invented', user_name, device, grant_id, source, started_at, 'closed', recording "
               "FROM sessions WHERE id = ?", (one["id"],))
    rc, doc, _ = _verify(home)
    assert rc == 1
    assert _differences(doc, one["id"])["status"]["found"] == "expired"
    assert _differences(doc, "invented")["audit rows"]["found"] == "none"


def test_live_without_end_row_is_open_and_unknown_live_row_is_named(home):
    """A broker that died mid-session (before the next start sealed it) leaves live + session.start only:
    'open', exit 0. A live row the chain never heard of, whose broker is gone, is a difference."""
    from broker.app import open_app

    victim = _closed(home)[0]
    for sid in ("open-1", "invented-live"):
        _sql(home, "INSERT INTO sessions (id, user_name, device, grant_id, source, started_at, status, recording, "
                   "broker_pid) SELECT ?, user_name, device, grant_id, source, started_at, 'live', "
                   "replace(recording, id, ?), 2147483646 FROM sessions WHERE id = ?", (sid, sid, victim["id"]))
    a = open_app(home)
    try:
        header = {"session_id": "open-1", "user": victim["user_name"], "device": victim["device"],
                  "grant_id": victim["grant_id"], "started_at": victim["started_at"]}
        w = RecordingWriter(home / "recordings" / victim["recording"].replace(victim["id"], "open-1"), header, clock=a.clock)
        w.append_data(1, "output", b"still running\r\n")
        w.close("the test ends it; the row stays live")
        a.audit.record("session.start", user=victim["user_name"], device=victim["device"], session_id="open-1",
                       grant_id=victim["grant_id"], recording="open-1.mbr")
    finally:
        a.close()
    rc, doc, text = _verify(home)
    states = {r["session_id"]: r["state"] for r in doc["recordings"]}
    assert states["invented-live"] == "broken" and _differences(doc, "invented-live")["audit rows"]["found"] == "none"
    assert "open-1" not in {d["session_id"] for d in doc["differences"]}
    assert states["open-1"] == "open" and doc["counts"]["open"] == 1 and "1 open" in text
    assert rc == 1 and {d["session_id"] for d in doc["differences"]} == {"invented-live"}
    _sql(home, "DELETE FROM sessions WHERE id = 'invented-live'")
    rc, doc, text = _verify(home)
    assert rc == 0 and doc["ok"], text


def test_retention_redacted_recordings_still_verify(home):
    from broker.app import open_app
    from broker.clock import utc_iso
    from sessions.retention import is_redacted, redact_recording

    a = open_app(home)
    try:
        for row in _closed(home)[:2]:
            redact_recording(a.recordings.local_path(row["recording"]), private_key=a.signing_key, removed_at=a.clock.now(), policy_days=180,
                             expected_final_hash=row["final_hash"], signature=row["signature"])
            a.store.mark_payload_removed(row["id"], utc_iso(a.clock.now()))
            assert is_redacted(a.recordings.local_path(row["recording"]))
    finally:
        a.close()
    rc, doc, text = _verify(home)
    assert rc == 0, text
    assert doc["differences"] == [] and "payload removed by retention" in text


def test_a_session_named_only_by_a_refusal_is_not_a_difference(home):
    """A start refused before session.start may leave only e.g. session.refused / device.unreachable rows."""
    from broker.app import open_app

    victim = _closed(home)[0]
    _sql(home, "INSERT INTO sessions (id, user_name, device, grant_id, source, started_at, status, recording) "
               "SELECT 'refused-1', user_name, device, grant_id, source, started_at, 'failed', "
               "replace(recording, id, 'refused-1') FROM sessions WHERE id = ?", (victim["id"],))
    a = open_app(home)
    try:
        header = {"session_id": "refused-1", "user": victim["user_name"], "device": victim["device"],
                  "grant_id": victim["grant_id"], "started_at": victim["started_at"]}
        RecordingWriter(home / "recordings" / victim["recording"].replace(victim["id"], "refused-1"), header, clock=a.clock).close("failed")
        a.audit.record("device.unreachable", user=victim["user_name"], device=victim["device"],
                       session_id="refused-1", error="timed out")
    finally:
        a.close()
    rc, doc, _ = _verify(home)
    assert "refused-1" not in {d["session_id"] for d in doc["differences"]}
    entry = next(r for r in doc["recordings"] if r["session_id"] == "refused-1")
    assert any("device.unreachable" in n for n in entry["notes"])
