"""``medbroker replay``: timing options on a synthetic recording, and the keys of the terminal player."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.commands.player import Player
from broker.errors import UsageError
from helpers import FUZZ_EXAMPLES_OTHER
from helpers.pty import PtySession
from sessions.recording import read_frames
from sessions.replay import replay
from staff_support import make_staff_home

SCRIPT = [(0, "pty", 1, {"term": "xterm", "cols": 80, "rows": 24}), (0, "shell", 1, {}),
          (1, "output", 1, b"FIRST\r\n"), (100, "output", 1, b"SECOND\r\n"), (5, "output", 1, b"THIRD\r\n"),
          (30, "output", 1, b"FOURTH\r\n")]
SID = "20261128-100000-rep001"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path):
    h = make_staff_home(tmp_path)
    g = h.grant()
    h.record_session(SID, SCRIPT, grant_id=g.id)
    yield h
    h.close()


class Keys:
    """A scripted keyboard on a fake clock: (seconds after start, key) pairs."""

    def __init__(self, script: list[tuple[float, str]]) -> None:
        self.script = list(script)
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def read_key(self, timeout: float | None) -> str | None:
        if self.script and (timeout is None or self.script[0][0] <= self.now + timeout):
            at, key = self.script.pop(0)
            self.now = max(self.now, at)
            return key
        assert timeout is not None, "the player waits for a key that never comes"
        self.now += timeout
        return None


def _play(path: str, keys: Keys, **kwargs) -> tuple[list[tuple[float, bytes]], Player]:
    out: list[tuple[float, bytes]] = []
    player = Player(lambda: read_frames(path), lambda b: out.append((round(keys.now, 3), b)), read_key=keys.read_key,
                    play=replay, clock=keys.clock, **kwargs)
    player.run()
    return [(t, b) for t, b in out if not b.startswith(b"\x1b]2;")], player


def _recording(tmp_path) -> str:
    h = make_staff_home(tmp_path)
    try:
        return h.record_session(SID, SCRIPT, grant_id=h.grant().id, encrypt=False)["recording"]
    finally:
        h.close()


def test_player_without_keys_keeps_recorded_timing_speed_and_max_idle(tmp_path):
    path = _recording(tmp_path)
    out, player = _play(path, Keys([]))
    assert out == [(1.0, b"FIRST\r\n"), (101.0, b"SECOND\r\n"), (106.0, b"THIRD\r\n"), (136.0, b"FOURTH\r\n")]
    assert player.finished
    out, _ = _play(path, Keys([]), speed=2.0, max_idle=10.0)
    assert [t for t, _ in out] == [0.5, 5.5, 8.0, 13.0]
    out, _ = _play(path, Keys([]), start_at=103.0)
    assert out == [(0.0, b"FIRST\r\n"), (0.0, b"SECOND\r\n"), (3.0, b"THIRD\r\n"), (33.0, b"FOURTH\r\n")]


def test_pause_skip_speed_and_quit(tmp_path):
    path = _recording(tmp_path)
    # pause at 50 s for 1000 s, then "n" skips the rest of the wait for SECOND
    out, _ = _play(path, Keys([(50, " "), (1050, " "), (1060, "n")]))
    assert [t for t, _ in out] == [1.0, 1060.0, 1065.0, 1095.0]
    # "+" at 21 s: the remaining 80 s of the gap pass at 2x (40 s); later gaps too
    out, player = _play(path, Keys([(21, "+")]))
    assert [t for t, _ in out] == [1.0, 61.0, 63.5, 78.5] and player.speed == 2.0
    # "q" during the long gap: SECOND is never written
    out, player = _play(path, Keys([(10, "q")]))
    assert out == [(1.0, b"FIRST\r\n")] and not player.finished and player.shown == 1.0


def test_seek_forward_and_back_redraws_from_the_recording(tmp_path):
    path = _recording(tmp_path)
    # at 5 s: seek +10 s (to 11 s): the screen is cleared and redrawn up to there, then SECOND plays at 101-11 s later
    out, _ = _play(path, Keys([(5, "\x1b[C")]))
    assert out[:3] == [(1.0, b"FIRST\r\n"), (5.0, b"\x1b[H\x1b[2J"), (5.0, b"FIRST\r\n")]
    assert out[3] == (95.0, b"SECOND\r\n")
    # after THIRD (106 s) seek back 10 s to 96 s: FIRST redrawn at once, SECOND after 5 s again
    out, _ = _play(path, Keys([(108, "h")]))
    i = out.index((108.0, b"\x1b[H\x1b[2J"))
    assert out[i + 1:i + 3] == [(108.0, b"FIRST\r\n"), (113.0, b"SECOND\r\n")]


def test_cli_timing_options_and_audit(home):
    r = home.cli("replay", SID, "--max-idle", "0s", "--speed", "4", "--by", "carol")
    assert b"FIRST\r\nSECOND\r\nTHIRD\r\nFOURTH\r\n" in r.stdout_bytes
    assert "verified" in r.stderr and f"end of session {SID}" in r.stderr
    r = home.cli("replay", SID, "--from", "3m", "--instant")
    assert "FOURTH" in r.stdout
    rows = home.app.store.audit_rows(event="recording.replayed")
    assert [json.loads(x["details"]) for x in rows] == [
        {"instant": False, "max_idle": 0.0, "speed": 4.0, "start": 0.0},
        {"instant": True, "max_idle": None, "speed": 1.0, "start": 180.0}]
    assert rows[0]["actor"] == "carol" and rows[0]["session_id"] == SID
    assert "--speed" in home.cli("replay", SID, "--speed", "0", code=2).stderr
    assert "not a duration" in home.cli("replay", SID, "--max-idle", "soon", code=2).stderr


def test_keys_on_a_real_terminal(home):
    """medbroker replay in a pty: "n" skips the 100 s pause, "q" stops before the end; the terminal is restored."""
    argv = [sys.executable, "-m", "broker.cli", "--home", str(home.path), "replay", SID, "--by", "carol"]
    with PtySession(argv) as term:
        term.expect(b"keys: space pause/resume", timeout=20)
        term.expect(b"FIRST", timeout=20)
        term.send("n")
        term.expect(b"SECOND", timeout=10)
        term.send("q")
        term.expect(b"stopped at 101s of session " + SID.encode(), timeout=10)
        assert term.wait(10) == 0
        assert b"FOURTH" not in term.output
    with PtySession(argv + ["--speed", "1000"]) as term:
        term.expect(b"FIRST", timeout=20)
        term.expect(b"FOURTH", timeout=10)
        term.expect(b"end of session " + SID.encode(), timeout=10)
        assert term.wait(10) == 0


def test_offsets_as_people_and_listings_write_them(home):
    from broker.commands.player import format_offset, parse_offset

    assert [parse_offset(t) for t in ("0", "0s", "90s", "1m30s", "1h2m3s", "2.5s", "00:01:30", "+00:00:31.6")] == [
        0.0, 0.0, 90.0, 90.0, 3723.0, 2.5, 90.0, 31.6]
    assert [format_offset(s) for s in (0, 45, 90, 3723, 3600)] == ["0s", "45s", "1m30s", "1h2m3s", "1h"]
    r = home.cli("replay", SID, "--from", "1m30s", "--instant")
    assert "SECOND" in r.stdout
    assert json.loads(home.app.store.audit_rows(event="recording.replayed")[-1]["details"])["start"] == 90.0
    assert "not a duration" in home.cli("replay", SID, "--from", "1m30", code=2).stderr


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text(max_size=24))
def test_parse_offset_fuzz(text):
    from broker.commands.player import format_offset, parse_offset

    try:
        seconds = parse_offset(text)
    except UsageError:
        return
    assert 0 <= seconds <= 3650 * 86400
    assert parse_offset(format_offset(seconds)) == int(seconds)
