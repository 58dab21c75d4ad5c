"""Retention: payloads of old recordings removed, metadata, hashes and signatures kept, verification still passing."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import RecordingError
from sessions.retention import is_redacted, open_frames, read_redaction_info, redact_recording, verify_redacted
from staff_support import make_staff_home

OLD = datetime.now(timezone.utc) - timedelta(days=200)
SECRET = b"PATIENT Jane Doe 1970-01-01"
SCRIPT = [(0, "pty", 1, {"term": "xterm", "cols": 80, "rows": 24}), (0, "shell", 1, {}),
          (1, "output", 1, b"$ "), (1, "input", 1, b"cat /var/log/scan.log\r"),
          (0.1, "output", 1, b"cat /var/log/scan.log\r\n" + SECRET + b"\r\n" + b"scan ok\r\n" * 2000 + b"$ "),
          (0, "exec", 3, {"command": "uptime"}), (0.1, "output", 3, b" 10:00 up 3 days\n"), (0, "exit", 3, {"status": 0}),
          (2, "file-transfer", 2, {"path": "/opt/fw.bin", "direction": "put", "bytes": 4, "sha256": "ef" * 32}),
          (1, "policy-denial", 2, {"op": "open", "path": "/data/dicom/1.dcm", "reason": "protected path"})]


@pytest.fixture
def home(tmp_path):
    h = make_staff_home(tmp_path)
    g = h.grant()
    h.record_session("20260501-080000-old001", SCRIPT, grant_id=g.id, started=OLD)
    h.record_session("20260502-080000-old002", SCRIPT[:5], grant_id=g.id, started=OLD + timedelta(days=1),
                     encrypt=False)
    h.record_session("20261120-080000-new001", SCRIPT, grant_id=g.id)
    yield h
    h.close()


def _row(h, sid):
    return h.app.store.get_session(sid)


def test_dry_run_changes_nothing(home):
    before = {sid: Path(_row(home, sid)["recording"]).read_bytes() for sid in ("20260501-080000-old001",)}
    doc = home.json("retention", "apply", "--dry-run")
    assert doc["dry_run"] is True and doc["policy_days"] == 180
    assert [(s["session_id"], s["state"]) for s in doc["sessions"]] == [
        ("20260501-080000-old001", "would remove"), ("20260502-080000-old002", "would remove")]
    assert Path(_row(home, "20260501-080000-old001")["recording"]).read_bytes() == before["20260501-080000-old001"]
    assert home.app.store.audit_rows(event="retention") == []


def test_old_payloads_removed_metadata_and_verification_kept(home):
    old, new = _row(home, "20260501-080000-old001"), _row(home, "20261120-080000-new001")
    size_before = os.path.getsize(old["recording"])
    new_bytes = Path(new["recording"]).read_bytes()
    doc = home.json("retention", "apply", "--by", "carol")
    assert {s["session_id"]: s["state"] for s in doc["sessions"]} == {
        "20260501-080000-old001": "removed", "20260502-080000-old002": "removed"}

    # the old recordings lost their terminal data, the new one is untouched
    for sid in ("20260501-080000-old001", "20260502-080000-old002"):
        path = _row(home, sid)["recording"]
        assert is_redacted(path) and SECRET not in Path(path).read_bytes()
    assert Path(new["recording"]).read_bytes() == new_bytes
    assert os.path.getsize(old["recording"]) < size_before

    # database: marked, hashes and signatures unchanged, output text no longer searchable, commands still are
    row = _row(home, "20260501-080000-old001")
    assert row["payload_removed_at"] and (row["final_hash"], row["signature"]) == (old["final_hash"], old["signature"])
    assert {m["session_id"] for m in home.json("sessions", "search", "Jane Doe")["matches"]} == {
        "20261120-080000-new001"}
    hits = home.json("sessions", "search", "scan.log")["matches"]
    assert {(m["session_id"], m["kind"]) for m in hits} >= {("20260501-080000-old001", "command")}
    assert ("20260501-080000-old001", "output") not in {(m["session_id"], m["kind"]) for m in hits}
    assert ("20261120-080000-new001", "output") in {(m["session_id"], m["kind"]) for m in hits}

    # audit: one retention.applied per session, with the hashes needed to prove what was removed
    applied = home.app.store.audit_rows(event="retention.applied")
    assert [(r["session_id"], r["actor"]) for r in applied] == [("20260501-080000-old001", "carol"),
                                                               ("20260502-080000-old002", "carol")]
    details = json.loads(applied[0]["details"])
    assert details["policy_days"] == 180 and details["below_floor"] is False
    assert details["final_hash"] == old["final_hash"] and details["original_bytes"] == size_before
    assert details["removed_frames"] == 4 and details["removed_bytes"] > len(SECRET)

    # audit verify still passes and says why the payload is gone
    verify = home.json("audit", "verify")
    assert verify["ok"] is True
    entry = next(r for r in verify["recordings"] if r["session_id"] == "20260501-080000-old001")
    assert entry["state"] == "ok" and entry["notes"][0].startswith(
        f"payload removed by retention on {row['payload_removed_at'][:10]}")
    assert "payload removed by retention" in home.cli("audit", "verify").stdout

    # events survive: export shows the exec, the transfer and the denial; replay says there is nothing to play
    text = home.cli("export", "20260501-080000-old001", "--format", "text", "-o", "-").stdout
    assert "uptime" in text and "/opt/fw.bin" in text and "/data/dicom/1.dcm" in text and "Jane" not in text
    r = home.cli("replay", "20260501-080000-old001", code=1)
    assert "removed by retention" in r.stderr and "sessions show" in r.stderr
    shown = home.cli("sessions", "show", "20260501-080000-old001").stdout
    assert "Retention: terminal content removed" in shown and "cat /var/log/scan.log" in shown

    # a second run has nothing left to do
    assert home.json("retention", "apply")["sessions"] == []


def test_tampering_with_a_redacted_recording_is_detected(home):
    home.cli("retention", "apply")
    row = _row(home, "20260502-080000-old002")
    path = Path(row["recording"])
    good = path.read_bytes()
    pub = home.app.signing_key.public_key()
    assert verify_redacted(path, expected_final_hash=row["final_hash"], signature=row["signature"], public_key=pub).ok
    info_end = good.index(b"}") + 1
    for offset, expect in ((info_end + 40, "header"), (len(good) - 200, None), (len(good) - 10, "redaction signature")):
        bad = bytearray(good)
        bad[offset] ^= 0x20
        path.write_bytes(bytes(bad))
        res = verify_redacted(path, expected_final_hash=row["final_hash"], signature=row["signature"], public_key=pub)
        assert not res.ok, offset
        if expect:
            assert any(expect in p for p in res.problems), res.problems
    path.write_bytes(good[:-30])
    assert not verify_redacted(path, public_key=pub).ok
    path.write_bytes(good)
    r = home.cli("audit", "verify")
    assert r.exit_code == 0
    path.write_bytes(good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 1]) + good[len(good) // 2 + 1:])
    r = home.cli("audit", "verify", code=1)
    assert "20260502-080000-old002" in r.stdout and "BROKEN" in r.stdout


def test_damaged_and_unclosed_recordings_are_kept_as_evidence(home):
    row = _row(home, "20260501-080000-old001")
    data = bytearray(Path(row["recording"]).read_bytes())
    data[300] ^= 1
    Path(row["recording"]).write_bytes(bytes(data))
    home.sql("UPDATE sessions SET final_hash = NULL, signature = NULL WHERE id = ?", ("20260502-080000-old002",))
    r = home.cli("retention", "apply", "--json", code=1)
    doc = json.loads(r.stdout)
    states = {s["session_id"]: s["state"] for s in doc["sessions"]}
    assert states == {"20260501-080000-old001": "broken", "20260502-080000-old002": "skipped"}
    assert "failed verification and were kept unchanged" in r.stderr
    assert Path(row["recording"]).read_bytes() == bytes(data)
    assert not is_redacted(_row(home, "20260502-080000-old002")["recording"])
    assert home.app.store.audit_rows(event="retention.applied") == []


def test_an_interrupted_run_is_finished(home):
    """The file was replaced but the broker stopped before the database said so: the next run completes it."""
    row = _row(home, "20260501-080000-old001")
    redact_recording(row["recording"], private_key=home.app.signing_key, removed_at=OLD + timedelta(days=190),
                     policy_days=180, expected_final_hash=row["final_hash"], signature=row["signature"])
    doc = home.json("retention", "apply")
    entry = next(s for s in doc["sessions"] if s["session_id"] == "20260501-080000-old001")
    assert entry["state"] == "removed" and "interrupted" in entry["detail"]
    assert _row(home, "20260501-080000-old001")["payload_removed_at"] == \
        read_redaction_info(row["recording"])["removed_at"]
    with pytest.raises(RecordingError, match="already removed"):
        redact_recording(row["recording"], private_key=home.app.signing_key, removed_at=OLD, policy_days=180,
                         expected_final_hash=row["final_hash"], signature=row["signature"])


def test_below_the_floor_needs_config_and_confirmation_and_is_audited(tmp_path):
    h = make_staff_home(tmp_path, config="[retention]\ndays = 30\nallow_below_floor = true\n")
    try:
        g = h.grant()
        h.record_session("20261001-080000-mid001", SCRIPT, grant_id=g.id,
                         started=datetime.now(timezone.utc) - timedelta(days=40))
        r = h.cli("retention", "apply", code=2)
        assert "below the 180-day floor" in r.stderr and "--confirm-below-floor" in r.stderr
        assert not is_redacted(h.app.store.get_session("20261001-080000-mid001")["recording"])
        doc = h.json("retention", "apply", "--confirm-below-floor", "--by", "carol")
        assert doc["below_floor"] is True and doc["sessions"][0]["state"] == "removed"
        floor = h.app.store.audit_rows(event="retention.below_floor")
        assert len(floor) == 1 and floor[0]["actor"] == "carol"
        assert json.loads(floor[0]["details"])["policy_days"] == 30
        assert json.loads(h.app.store.audit_rows(event="retention.applied")[0]["details"])["below_floor"] is True
    finally:
        h.close()
    # without allow_below_floor the configuration itself is refused
    (tmp_path / "home" / "broker.toml").write_text("[retention]\ndays = 30\n")
    from typer.testing import CliRunner

    from broker.cli import app

    r = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "retention", "apply", "--confirm-below-floor"])
    assert r.exit_code == 2 and "below the 180-day floor" in r.stderr


def test_wrong_roles_cannot_apply(home):
    r = home.cli("retention", "apply", "--by", "alice", code=1)
    assert "may not" in r.stderr
    assert not is_redacted(_row(home, "20260501-080000-old001")["recording"])


def test_redacted_export_json_and_html(home, tmp_path):
    home.cli("retention", "apply")
    doc = json.loads(home.cli("export", "20260501-080000-old001", "--format", "json", "-o", "-").stdout)
    kinds = [f["kind"] for f in doc["frames"]]
    assert "output" not in kinds and {"exec", "file-transfer", "policy-denial", "end"} <= set(kinds)
    assert doc["verification"]["ok"] is True and "payload removed by retention" in doc["verification"]["notes"][0]
    home.cli("export", "20260501-080000-old001", "--format", "html", "-o", str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert "payload removed by retention" in page and "Jane" not in page


@pytest.fixture(scope="module")
def redacted_file(tmp_path_factory):
    """One redacted recording (bytes) and the public key that signed it."""
    tmp = tmp_path_factory.mktemp("fuzz")
    h = make_staff_home(tmp)
    try:
        g = h.grant()
        row = h.record_session("20260501-080000-fuzz01", SCRIPT, grant_id=g.id, started=OLD, encrypt=False)
        redact_recording(row["recording"], private_key=h.app.signing_key, removed_at=OLD, policy_days=180,
                         expected_final_hash=row["final_hash"], signature=row["signature"])
        return Path(row["recording"]).read_bytes(), h.app.signing_key.public_key(), tmp
    finally:
        h.close()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_redacted_reader_fuzz(redacted_file, data):
    """Flipped, cut and spliced bytes: verify names a problem and reading never crashes."""
    good, public, tmp = redacted_file
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if op == "flip" and blob:
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del blob[pos:pos + data.draw(st.integers(1, 64))]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp / "fuzz.mbr"
    path.write_bytes(bytes(blob))
    res = verify_redacted(path, public_key=public)
    assert res.ok == (bytes(blob) == good), res.problems
    try:
        list(open_frames(path, strict=False))
    except RecordingError:
        pass
