"""broker/session_ops.py: what the CLI and the console both do with a session, behaving once."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.app import init_home
from broker.clock import FakeClock, utc_iso
from broker.errors import ConflictError, NotFoundError, UsageError
from broker.session_ops import (MAX_KILL_REASON, check_kill_reason, get_session, list_live_sessions, request_kill,
                                running_counters, session_verification)

SID = "20260101-080000-abc123"


@pytest.fixture
def app(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    a = init_home(home, clock=FakeClock())
    a.store.insert_session({"id": SID, "user_name": "alice", "device": "ct-01", "grant_id": 7,
                            "started_at": utc_iso(a.clock.now()), "status": "live", "recording": f"{SID}.mbr",
                            "broker_pid": 1, "bytes_in": 5, "bytes_out": 6})
    try:
        yield a
    finally:
        a.close()


@pytest.mark.parametrize("sid", ["20260101-080000-ffffff", "x" * 65, "../etc/passwd", "", "a b", "\x1b[2J"])
def test_unknown_and_malformed_ids_get_one_answer(app, sid):
    with pytest.raises(NotFoundError) as err:
        get_session(app.store, sid)
    assert err.value.message == f"session {sid[:64]!r} does not exist"
    assert "medbroker sessions list" in err.value.hint
    assert get_session(app.store, SID)["user_name"] == "alice"


def test_one_reason_rule():
    assert check_kill_reason(None) is None
    assert check_kill_reason("r" * MAX_KILL_REASON) == "r" * MAX_KILL_REASON
    for bad, why in (("", "1-500 printable"), ("  ", "1-500 printable"), ("r" * 501, "at most 500"),
                     ("a\u202eb", r"U\+202E"), ("a\tb", r"U\+0009")):
        with pytest.raises(UsageError, match=why):
            check_kill_reason(bad)


def test_request_kill_marks_audits_and_refuses_twice(app):
    with pytest.raises(UsageError):
        request_kill(app, SID, actor="carol", reason="r" * 501, source="cli")
    assert app.store.get_session(SID)["kill_requested_at"] is None
    request_kill(app, SID, actor="carol", reason="copying images", source="10.0.0.9")
    row = app.store.get_session(SID)
    assert (row["kill_requested_by"], row["kill_reason"]) == ("carol", "copying images")
    [event] = app.store.audit_rows(event="session.kill.requested")
    assert event["actor"] == "carol" and event["source"] == "10.0.0.9" and event["grant_id"] == 7
    with pytest.raises(ConflictError, match="already requested"):
        request_kill(app, SID, actor="carol", reason=None, source="cli")
    app.store.update_session(SID, status="closed")
    with pytest.raises(ConflictError, match=r"not live \(status closed\)"):
        request_kill(app, SID, actor="carol", reason=None, source="cli")


class _Running:
    def __init__(self, bytes_in: int, bytes_out: int) -> None:
        self.values = {"bytes_in": bytes_in, "bytes_out": bytes_out}

    def counters(self):
        return self.values


def test_live_sessions_use_the_running_counters_else_the_saved_ones(app):
    [saved] = list_live_sessions(app.store)
    assert (saved["bytes_in"], saved["bytes_out"], saved["alerts"], saved["last_alert"]) == (5, 6, 0, None)
    running = running_counters({SID: _Running(500, 600)})
    [live] = list_live_sessions(app.store, running)
    assert (live["bytes_in"], live["bytes_out"]) == (500, 600)
    [brief] = list_live_sessions(app.store, running, details=False)
    assert "alerts" not in brief and brief["bytes_out"] == 600
    app.store.update_session(SID, status="closed")
    assert list_live_sessions(app.store, running) == []


def test_a_missing_recording_is_broken_not_an_error(app):
    check = session_verification(app, app.store.get_session(SID))
    assert check["state"] == "broken" and check["summary"] == "FAILED: recording file is missing"
    check = session_verification(app, app.store.get_session(SID) | {"recording": "../x.mbr"})
    assert check["state"] == "broken" and "not a plain name" in check["summary"]
