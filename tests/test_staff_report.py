"""``medbroker report``: contents field by field, Markdown/HTML/JSON, signature checked by ``audit verify --report``."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import UsageError
from broker.report import parse_time_bound
from helpers import FUZZ_EXAMPLES_OTHER
from staff_support import make_staff_home

TODAY = datetime.now(timezone.utc).strftime("%Y-%m-%d")
PTY = [(0, "pty", 1, {"term": "xterm", "cols": 80, "rows": 24}), (0, "shell", 1, {})]
S1, S2, S3 = "20261128-080000-rpt001", "20261128-090000-rpt002", "20261128-100000-rpt003"
SHA = "ab" * 32


@pytest.fixture
def home(tmp_path):
    h = make_staff_home(tmp_path)
    store, audit = h.app.store, h.app.audit
    g1 = h.grant(reason="tube replacement", ticket="WO-1234")
    row1 = h.record_session(S1, PTY + [
        (1, "output", 1, b"$ "), (2, "input", 1, b"systemctl restart gantry\r"),
        (0.1, "output", 1, b"systemctl restart gantry\r\n$ "), (3, "input", 1, b"tail -n 5 /var/log/tube.log\r"),
        (0.1, "output", 1, b"tail -n 5 /var/log/tube.log\r\nok\r\n$ ")], grant_id=g1.id)
    store.insert_transfer({"session_id": S1, "at": row1["ended_at"], "path": "/opt/firmware/fw-2.1.bin",
                           "direction": "upload", "bytes": 1048576, "sha256": SHA, "outcome": "ok"})
    audit.record("sftp.denied", user="alice", device="ct-01", session_id=S1, grant_id=g1.id, op="open",
                 path="/data/dicom/1.dcm", reason="protected path")
    audit.record("session.refused", user="alice", device="ct-01", source="10.0.0.9:5000", reason="no grant")
    g2 = h.grant(device="mri-01", approvers=("bob", "dave"), reason="coil check", ticket=None)
    h.record_session(S2, PTY + [(1, "output", 1, b"$ ")], grant_id=g2.id, device="mri-01")
    audit.record("alert.exfiltration", user="alice", device="mri-01", session_id=S2, content="DICOM")
    store.revoke_grant(g2.id, "carol", store.get_grant(g2.id)["ends_at"], "alert")
    g3 = h.grant(reason="second visit")
    row3 = h.record_session(S3, PTY + [(1, "output", 1, b"$ done\r\n")], grant_id=g3.id)
    data = bytearray(Path(row3["recording"]).read_bytes())
    data[-80] ^= 1  # damage the third recording
    Path(row3["recording"]).write_bytes(bytes(data))
    yield h
    h.close()


def _report(h, tmp_path, fmt="json", *extra):
    out = tmp_path / f"report.{fmt}"
    r = h.cli("report", "--from", TODAY, "--to", TODAY, "--format", fmt, "-o", str(out), "--by", "carol", *extra)
    return out, r


def test_json_report_field_by_field(home, tmp_path):
    out, r = _report(home, tmp_path)
    assert "1 recording(s) failing verification" in r.stdout and "audit verify --report" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["format"] == "medbroker-maintenance-report" and doc["generated_by"] == "carol"
    assert doc["period"]["from"] == TODAY + "T00:00:00.000000Z"
    assert doc["period"]["to"] == (datetime.strptime(TODAY, "%Y-%m-%d") + timedelta(days=1)).strftime(
        "%Y-%m-%dT00:00:00.000000Z")
    assert doc["summary"] == {"devices": 2, "sessions": 3, "commands": 2, "files": 1, "denials_and_alerts": 3,
                              "recordings_failing_verification": 1}
    devices = {d["name"]: d for d in doc["devices"]}
    ct, mri = devices["ct-01"], devices["mri-01"]
    assert (ct["class"], mri["class"], ct["description"]) == ("standard", "critical", "ct-01 in radiology")

    s1 = next(s for s in ct["sessions"] if s["id"] == S1)
    row1 = home.app.store.get_session(S1)
    grant1 = home.app.store.get_grant(row1["grant_id"])
    assert s1["requester"] == {"name": "alice", "company": "Acme Imaging"}
    assert [a["name"] for a in s1["approvers"]] == ["bob"] and s1["approvers"][0]["at"]
    assert (s1["reason"], s1["ticket"], s1["request_id"], s1["grant_id"]) == (
        "tube replacement", "WO-1234", grant1["request_id"], grant1["id"])
    assert s1["window"] == {"from": grant1["starts_at"], "to": grant1["ends_at"]}
    assert (s1["started_at"], s1["ended_at"], s1["status"]) == (row1["started_at"], row1["ended_at"], "closed")
    assert [c["command"] for c in s1["commands"]] == ["systemctl restart gantry", "tail -n 5 /var/log/tube.log"]
    assert all(c["at"] > row1["started_at"] for c in s1["commands"])
    assert s1["files"] == [{"at": row1["ended_at"], "direction": "upload", "path": "/opt/firmware/fw-2.1.bin",
                            "bytes": 1048576, "sha256": SHA, "outcome": "ok"}]
    assert [(e["event"], e["details"]["path"]) for e in s1["denials_and_alerts"]] == [
        ("sftp.denied", "/data/dicom/1.dcm")]
    assert s1["verification"]["state"] == "ok" and s1["verification"]["summary"].startswith("verified")
    assert s1["revoked"] is None

    s3 = next(s for s in ct["sessions"] if s["id"] == S3)
    assert s3["verification"]["state"] == "broken" and s3["verification"]["summary"].startswith("FAILED")
    assert s3["reason"] == "second visit" and s3["ticket"] == "WO-1234"
    assert [e["event"] for e in ct["refusals_outside_sessions"]] == ["session.refused"]
    assert ct["refusals_outside_sessions"][0]["details"]["reason"] == "no grant"

    s2 = mri["sessions"][0]
    assert [a["name"] for a in s2["approvers"]] == ["bob", "dave"]
    assert s2["ticket"] is None and s2["reason"] == "coil check" and s2["commands"] == [] and s2["files"] == []
    assert s2["revoked"]["by"] == "carol" and s2["revoked"]["reason"] == "alert"
    assert [e["event"] for e in s2["denials_and_alerts"]] == ["alert.exfiltration"]


def test_signature_verifies_and_tampering_is_named(home, tmp_path):
    out, _ = _report(home, tmp_path, "md")
    sig = json.loads(Path(f"{out}.sig").read_text())
    assert sig["format"] == "medbroker-report-signature" and sig["file"] == out.name
    created = home.app.store.audit_rows(event="report.created")
    details = json.loads(created[-1]["details"])
    assert created[-1]["actor"] == "carol" and details["sha256"] == sig["sha256"] and details["signed"] is True
    r = home.cli("audit", "verify", "--report", str(out))
    assert "signature ok" in r.stdout and f"row {created[-1]['id']}, by carol" in r.stdout
    doc = json.loads(home.cli("audit", "verify", "--report", str(out), "--json").stdout)
    assert doc["ok"] is True and doc["audit_rows"][0]["id"] == created[-1]["id"]

    good = out.read_bytes()
    out.write_bytes(good.replace(b"WO-1234", b"WO-9999"))
    r = home.cli("audit", "verify", "--report", str(out), code=1)
    assert "was changed" in r.stdout + r.stderr
    out.write_bytes(good)
    forged = dict(sig, signature="00" * 64)
    other = tmp_path / "forged.sig"
    other.write_text(json.dumps(forged))
    r = home.cli("audit", "verify", "--report", str(out), "--signature", str(other), code=1)
    assert "signature invalid" in r.stdout
    r = home.cli("audit", "verify", "--report", str(tmp_path / "missing.md"), code=2)
    assert "cannot read report" in r.stderr
    Path(f"{out}.sig").unlink()
    assert "no signature file" in home.cli("audit", "verify", "--report", str(out), code=2).stderr


def test_markdown_and_html_carry_the_same_facts(home, tmp_path):
    md, _ = _report(home, tmp_path, "md")
    text = md.read_text()
    for needle in ("## Device ct-01", "## Device mri-01", f"### Session {S1}", "| requester | alice (Acme Imaging) |",
                   "| approver(s) | bob (", "| reason | tube replacement |", "| ticket | WO-1234 |",
                   "systemctl restart gantry", "/opt/firmware/fw-2.1.bin", SHA, "sftp.denied", "FAILED",
                   "Refusals outside sessions", "dave", "revoked"):
        assert needle in text, needle
    html_path, _ = _report(home, tmp_path, "html")
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    for needle in ("Device ct-01", "alice (Acme Imaging)", "tube replacement", "WO-1234", "systemctl restart gantry",
                   SHA, "alert.exfiltration", 'class="broken"'):
        assert needle in page, needle
    assert "signature ok" in home.cli("audit", "verify", "--report", str(html_path)).stdout


def test_filters_periods_and_errors(home, tmp_path):
    out = tmp_path / "mri.json"
    home.cli("report", "--device", "mri-01", "--from", TODAY, "--to", TODAY, "--format", "json", "-o", str(out))
    doc = json.loads(out.read_text())
    assert [d["name"] for d in doc["devices"]] == ["mri-01"] and doc["summary"]["sessions"] == 1
    past = tmp_path / "past.md"
    home.cli("report", "--from", "2020-01-01", "--to", "2020-01-31", "-o", str(past))
    assert past.read_text().count("No maintenance sessions in this period.") == 2
    r = home.cli("report", "--from", TODAY, "--to", TODAY, "--format", "md")
    assert f"### Session {S1}" in r.stdout and "not signed" in r.stderr
    assert json.loads(home.app.store.audit_rows(event="report.created")[-1]["details"])["signed"] is False
    assert "unknown" in home.cli("report", "--device", "ct-99", "--from", TODAY, "--to", TODAY, code=1).stderr
    assert "not a date" in home.cli("report", "--from", "last week", "--to", TODAY, code=2).stderr
    assert "period is empty" in home.cli("report", "--from", TODAY, "--to", "2020-01-01", code=2).stderr
    assert "format" in home.cli("report", "--from", TODAY, "--to", TODAY, "--format", "pdf", code=2).stderr
    assert "may not" in home.cli("report", "--from", TODAY, "--to", TODAY, "--by", "alice", code=1).stderr


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text(max_size=40))
def test_parse_time_bound_fuzz(text):
    now = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    try:
        start = parse_time_bound(text, now, what="--from")
    except UsageError as exc:
        assert exc.message.startswith("--from") and exc.hint
        return
    assert start.tzinfo is not None
    end = parse_time_bound(text, now, what="--to", end=True)
    assert end >= start


def test_parse_time_bound_forms():
    now = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    assert parse_time_bound("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert parse_time_bound("2026-11-01", now, end=True) == datetime(2026, 11, 2, tzinfo=timezone.utc)
    assert parse_time_bound("7d", now) == datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
    assert parse_time_bound("2026-11-01T08:30:00Z", now) == datetime(2026, 11, 1, 8, 30, tzinfo=timezone.utc)
    assert parse_time_bound("2026-11-01T08:30:00+01:00", now) == datetime(2026, 11, 1, 7, 30, tzinfo=timezone.utc)
    with pytest.raises(UsageError):
        parse_time_bound("9999-12-31", now, what="--to", end=True)
