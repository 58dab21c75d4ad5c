"""``medbroker sessions search``: hits and misses over commands, output and transfer paths, filters, audit."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from staff_support import make_staff_home

PTY = [(0, "pty", 1, {"term": "xterm", "cols": 80, "rows": 24}), (0, "shell", 1, {})]


@pytest.fixture
def home(tmp_path):
    h = make_staff_home(tmp_path)
    g1 = h.grant()
    g2 = h.grant(device="mri-01", approvers=("bob", "dave"))
    h.record_session("20261101-080000-aaaaaa", PTY + [
        (1, "output", 1, b"$ "), (2, "input", 1, b"grep -r calib /opt/scanner\r"),
        (0.1, "output", 1, b"grep -r calib /opt/scanner\r\n/opt/scanner/calib.ini: gain=7\r\n$ "),
        (40, "input", 1, b"exit\r"),
        (0, "sftp-request", 2, {"op": "open", "path": "/opt/scanner/firmware-v2.bin"}),
        (0.5, "file-transfer", 2, {"path": "/opt/scanner/firmware-v2.bin", "direction": "put", "bytes": 4,
                                   "sha256": "cd" * 32})],
        grant_id=g1.id, started=datetime.now(timezone.utc) - timedelta(days=3))
    h.record_session("20261102-080000-bbbbbb", PTY + [
        (1, "output", 1, b"$ "), (1, "input", 1, b"journalctl -u gantry\r"),
        (0.2, "output", 1, b"journalctl -u gantry\r\ngantry: calibration done\r\n$ ")],
        grant_id=g2.id, device="mri-01")
    yield h
    h.close()


def test_hits_name_session_offset_and_line(home):
    doc = home.json("sessions", "search", "calib", "--by", "carol")
    got = {(m["session_id"], m["kind"], m["text"]) for m in doc["matches"]}
    assert ("20261101-080000-aaaaaa", "command", "grep -r calib /opt/scanner") in got
    assert ("20261101-080000-aaaaaa", "output", "/opt/scanner/calib.ini: gain=7") in got
    assert ("20261102-080000-bbbbbb", "output", "gantry: calibration done") in got
    cmd = next(m for m in doc["matches"] if m["kind"] == "command")
    assert 2.9 < cmd["offset"] < 3.2 and cmd["user"] == "alice" and cmd["device"] == "ct-01"
    row = home.app.store.get_session("20261101-080000-aaaaaa")
    assert cmd["at"][:16] == (datetime.fromisoformat(row["started_at"].replace("Z", "+00:00"))
                              + timedelta(seconds=cmd["offset"])).strftime("%Y-%m-%dT%H:%M")
    text = home.cli("sessions", "search", "calib").stdout
    assert "20261101-080000-aaaaaa" in text and "+00:00:03" in text and "gain=7" in text
    assert "medbroker replay 20261101-080000-aaaaaa --from 0s" in text


def test_transfer_paths_and_case(home):
    doc = home.json("sessions", "search", "FIRMWARE-V2")
    assert [(m["kind"], m["text"]) for m in doc["matches"]] == [("transfer", "put /opt/scanner/firmware-v2.bin")]


def test_filters_and_misses(home):
    assert home.json("sessions", "search", "calib", "--device", "mri-01")["matches"][0]["session_id"] == \
        "20261102-080000-bbbbbb"
    assert {m["session_id"] for m in home.json("sessions", "search", "calib", "--device", "ct-01")["matches"]} == \
        {"20261101-080000-aaaaaa"}
    assert home.json("sessions", "search", "calib", "--user", "bob")["matches"] == []
    since = {m["session_id"] for m in home.json("sessions", "search", "calib", "--since", "1d")["matches"]}
    assert since == {"20261102-080000-bbbbbb"}
    day = (datetime.now(timezone.utc) - timedelta(days=5)).strftime("%Y-%m-%d")
    assert len({m["session_id"] for m in home.json("sessions", "search", "calib", "--since", day)["matches"]}) == 2
    assert home.json("sessions", "search", "no such words anywhere")["matches"] == []
    assert "(no matches)" in home.cli("sessions", "search", "zzzq").stdout


def test_limit_and_audit(home):
    doc = home.json("sessions", "search", "a", "--limit", "2")
    assert len(doc["matches"]) == 2 and doc["truncated"] is True
    rows = home.app.store.audit_rows(event="recording.searched")
    assert rows, "searches are audited"
    details = json.loads(rows[-1]["details"])
    assert details["query"] == "a" and details["hits"] == 2 and rows[-1]["actor"].startswith("local:")
    home.cli("sessions", "search", "calib", "--by", "carol", "--device", "ct-01")
    last = home.app.store.audit_rows(event="recording.searched")[-1]
    assert last["actor"] == "carol" and json.loads(last["details"])["device_filter"] == "ct-01"


@pytest.mark.parametrize("args,code,needle", [
    (["", ], 2, "1-200 printable"),
    (["x" * 201], 2, "1-200 printable"),
    (["a\x1b[2J"], 2, "printable"),
    (["calib", "--since", "yesterday"], 2, "not a date"),
    (["calib", "--since", "2026-13-40"], 2, "not a valid date"),
    (["calib", "--by", "alice"], 1, "may not"),
])
def test_bad_input_is_refused_and_not_audited(home, args, code, needle):
    r = home.cli("sessions", "search", *args, code=code)
    assert needle in r.stderr
    assert home.app.store.audit_rows(event="recording.searched") == []
