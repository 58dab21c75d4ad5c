"""Recordings archived to a real S3-compatible store (OpenStack Swift + s3api): uploaded, verified, resumable,
and read back through the recording store by replay, export, audit verify and retention."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sessions.retention import is_redacted
from staff_support import StaffHome, make_staff_home

OLD = datetime.now(timezone.utc) - timedelta(days=200)
SECRET = b"PATIENT Jane Doe 1970-01-01"
SCRIPT = [(0, "pty", 1, {"term": "xterm", "cols": 80, "rows": 24}), (0, "shell", 1, {}),
          (1, "output", 1, b"$ "), (1, "input", 1, b"cat /var/log/scan.log\r"),
          (0.1, "output", 1, b"cat /var/log/scan.log\r\n" + SECRET + b"\r\n" + b"scan ok\r\n" * 2000 + b"$ "),
          (0, "exec", 3, {"command": "uptime"}), (0.1, "output", 3, b" 10:00 up 3 days\n"), (0, "exit", 3, {"status": 0})]
REPO = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_bucket(swift: Any) -> str:
    return swift.create_bucket(f"mb-{uuid.uuid4().hex[:16]}")


def archive_home(tmp_path: Path, swift: Any, *, prefix: str = "site-a/", extra: str = "", **archive: str) -> StaffHome:
    bucket = new_bucket(swift)
    keys = tmp_path / "s3keys"
    keys.mkdir()
    cfg = swift.config(keys, bucket, prefix, **archive) + extra
    h = make_staff_home(tmp_path, cfg)
    h.bucket = bucket  # type: ignore[attr-defined]
    return h


def obj(swift: Any, bucket: str, key: str) -> bytes:
    return swift.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_sealed_recordings_are_uploaded_verified_and_recorded_once(tmp_path, swift):
    h = archive_home(tmp_path, swift)
    try:
        g = h.grant()
        a = h.record_session("20261201-080000-arc001", SCRIPT, grant_id=g.id,
                             started=datetime.now(timezone.utc) - timedelta(hours=1))
        b = h.record_session("20261201-090000-arc002", SCRIPT[:4], grant_id=g.id, encrypt=False)
        local = {r["id"]: Path(r["recording"]).read_bytes() for r in (a, b)}
        first = h.json("archive", "run", "--limit", "1")  # the one that ended first
        assert [s["session_id"] for s in first["sessions"]] == [a["id"]]
        assert first["backlog"] == {"waiting": 1, "uploading": 0}
        doc = h.json("archive", "run")
        assert (doc["archived"], doc["failed"], doc["local_removed"]) == (1, 0, 0)
        assert doc["url"] == f"s3://{h.bucket}/site-a/" and doc["backlog"] == {"waiting": 0, "uploading": 0}
        for sid, data in local.items():
            # the object (looked at with another client) holds exactly the local bytes, under prefix + key
            assert obj(swift, h.bucket, f"site-a/{sid}.mbr") == data
            row = h.app.store.get_session(sid)
            assert row["archived_at"] and row["archive_sha256"] == sha(data) and row["archive_size"] == len(data)
            assert row["local_removed_at"] is None and Path(row["recording"]).read_bytes() == data  # kept: "never"
        events = h.app.store.audit_rows(event="recording.archived")
        assert sorted(e["session_id"] for e in events) == sorted(local)
        details = json.loads(events[0]["details"])
        assert details["sha256"] == sha(local[events[0]["session_id"]]) and details["parts"] == 1
        assert details["local_removed"] is False
        # a second pass finds nothing to do and changes nothing
        again = h.json("archive", "run")
        assert (again["archived"], again["sessions"]) == (0, [])
        assert len(h.app.store.audit_rows(event="recording.archived")) == 2
        # a live session is never archived
        assert h.app.store.archive_candidates() == []
    finally:
        h.close()


def test_archived_only_recordings_replay_export_verify_and_retention(tmp_path, swift):
    """delete_local_after = now: only the object store has the recording; every reader still works, byte for byte,
    and retention redacts the archived object (download, rewrite, upload the replacement, read it back)."""
    h = archive_home(tmp_path, swift, delete_local_after="true")
    try:
        g = h.grant()
        old = h.record_session("20260501-080000-arc003", SCRIPT, grant_id=g.id, started=OLD, encrypt=False)
        sid = old["id"]
        replay_before = h.cli("replay", sid, "--instant").stdout
        export_before = tmp_path / "before.cast"
        h.cli("export", sid, "--format", "asciicast", "-o", str(export_before))
        local = Path(old["recording"])
        original = local.read_bytes()
        assert SECRET in original  # stored in clear, so its absence after retention means something

        doc = h.json("archive", "run")
        assert doc["archived"] == 1 and doc["local_removed"] == 1
        assert not local.exists() and h.app.store.get_session(sid)["local_removed_at"]
        assert obj(swift, h.bucket, f"site-a/{sid}.mbr") == original

        assert SECRET.decode() in replay_before
        assert h.cli("replay", sid, "--instant").stdout == replay_before
        export_after = tmp_path / "after.cast"
        h.cli("export", sid, "--format", "asciicast", "-o", str(export_after))
        assert export_after.read_bytes() == export_before.read_bytes()
        verify = h.json("audit", "verify")
        assert [r["state"] for r in verify["recordings"]] == ["ok"], verify
        assert not local.exists()  # readers used a cached download, never the recordings directory

        # a copied home whose bucket lost the object: verify says missing (nothing is read from elsewhere)
        swift.client().copy_object(Bucket=h.bucket, Key="keep", CopySource={"Bucket": h.bucket,
                                                                            "Key": f"site-a/{sid}.mbr"})
        swift.client().delete_object(Bucket=h.bucket, Key=f"site-a/{sid}.mbr")
        h.cli("audit", "verify", code=1)
        swift.client().copy_object(Bucket=h.bucket, Key=f"site-a/{sid}.mbr", CopySource={"Bucket": h.bucket,
                                                                                         "Key": "keep"})
        # retention on the archived-only recording
        ret = h.json("retention", "apply", "--by", "carol")
        assert [(s["session_id"], s["state"]) for s in ret["sessions"]] == [(sid, "removed")], ret
        redacted = obj(swift, h.bucket, f"site-a/{sid}.mbr")
        probe = tmp_path / "probe.mbr"
        probe.write_bytes(redacted)
        assert is_redacted(probe) and SECRET not in redacted and len(redacted) < len(original)
        row = h.app.store.get_session(sid)
        assert row["payload_removed_at"] and row["archive_sha256"] == sha(redacted)
        assert row["archive_size"] == len(redacted)
        assert not local.exists()
        verify = h.json("audit", "verify")
        assert [r["state"] for r in verify["recordings"]] == ["ok"], verify
        assert "removed by retention" in h.cli("replay", sid, "--instant", code=1).stderr
        text = tmp_path / "after.txt"
        h.cli("export", sid, "--format", "text", "-o", str(text))  # metadata and events, from the object
        assert "uptime" in text.read_text() and SECRET.decode() not in text.read_text()
    finally:
        h.close()


def test_archive_failure_is_reported_and_audited_once(tmp_path, swift):
    """A bucket that does not exist: the pass fails with the reason and exit 1, audits it once per distinct error."""
    h = archive_home(tmp_path, swift)
    try:
        g = h.grant()
        h.record_session("20261201-080000-arc004", SCRIPT, grant_id=g.id)
        swift.client().delete_bucket(Bucket=h.bucket)
        r = h.cli("archive", "run", "--json", code=1)
        doc = json.loads(r.stdout)
        assert doc["failed"] == 1 and "NoSuchBucket" in doc["sessions"][0]["detail"]
        h.cli("archive", "run", "--json", code=1)
        failed = h.app.store.audit_rows(event="recording.archive.failed")
        assert len(failed) == 1 and "NoSuchBucket" in json.loads(failed[0]["details"])["error"]
        assert h.app.store.get_session("20261201-080000-arc004")["archived_at"] is None
        swift.create_bucket(h.bucket)
        assert h.json("archive", "run")["archived"] == 1
    finally:
        h.close()


def test_local_copies_go_only_after_their_age_and_only_while_the_object_verifies(tmp_path, swift):
    h = archive_home(tmp_path, swift, delete_local_after='"1d"')
    try:
        g = h.grant()
        row = h.record_session("20261201-080000-arc005", SCRIPT, grant_id=g.id)
        assert h.json("archive", "run")["local_removed"] == 0
        assert Path(row["recording"]).exists()
        # archived two days ago (as if): the next pass removes the local copy, once the object checks out
        h.sql("UPDATE sessions SET archived_at = ? WHERE id = ?",
              ((datetime.now(timezone.utc) - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), row["id"]))
        swift.client().put_object(Bucket=h.bucket, Key=f"site-a/{row['id']}.mbr", Body=b"replaced by someone")
        doc = h.json("archive", "run")
        assert [s["state"] for s in doc["sessions"]] == ["skipped"] and Path(row["recording"]).exists()
        swift.client().put_object(Bucket=h.bucket, Key=f"site-a/{row['id']}.mbr",
                                  Body=Path(row["recording"]).read_bytes(),
                                  Metadata={"sha256": h.app.store.get_session(row["id"])["archive_sha256"]})
        doc = h.json("archive", "run")
        assert [s["state"] for s in doc["sessions"]] == ["local_removed"]
        assert not Path(row["recording"]).exists()
        assert [e["session_id"] for e in h.app.store.audit_rows(event="recording.local_removed")] == [row["id"]]
    finally:
        h.close()


def test_a_tampered_object_is_refused_when_read(tmp_path, swift):
    h = archive_home(tmp_path, swift, delete_local_after="true")
    try:
        g = h.grant()
        row = h.record_session("20261201-080000-arc006", SCRIPT, grant_id=g.id)
        h.json("archive", "run")
        data = bytearray(obj(swift, h.bucket, f"site-a/{row['id']}.mbr"))
        data[-10] ^= 1
        swift.client().put_object(Bucket=h.bucket, Key=f"site-a/{row['id']}.mbr", Body=bytes(data),
                                  Metadata={"sha256": row_sha(h, row["id"])})
        r = h.cli("replay", row["id"], "--instant", code=1)
        assert "archived with" in r.stderr and "object store altered it" in r.stderr
        h.cli("audit", "verify", code=1)
        assert report(h, tmp_path)["summary"]["recordings_failing_verification"] == 1
    finally:
        h.close()


def report(h: StaffHome, tmp_path: Path) -> dict[str, Any]:
    """The signed JSON maintenance report of today (it verifies every recording through the store)."""
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = tmp_path / "report.json"
    h.cli("report", "--from", today, "--to", today, "--format", "json", "-o", str(out), "--by", "carol")
    doc = json.loads(out.read_text())
    assert doc["summary"]["sessions"] == 1
    return doc


def row_sha(h: StaffHome, sid: str) -> str:
    return h.app.store.get_session(sid)["archive_sha256"]


# ---------------------------------------------------------------------------- kill the store mid-upload
def big_script(mib: int) -> list[tuple[float, str, int, Any]]:
    block = os.urandom(256 * 1024)
    out: list[tuple[float, str, int, Any]] = [(0, "shell", 1, {})]
    for i in range(mib * 4):
        out.append((0.001, "output", 1, block[i % 7:] + block[:i % 7]))  # no two frames alike
    return out


def _parts(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM archive_upload_parts").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def test_killing_the_object_store_mid_upload_resumes_on_the_next_pass(tmp_path, swift):
    h = archive_home(tmp_path, swift, part_size='"5MiB"')
    try:
        g = h.grant()
        row = h.record_session("20261201-080000-big001", big_script(48), grant_id=g.id, encrypt=False, index=False)
        size = Path(row["recording"]).stat().st_size
        assert size > 48 * 2**20
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        first = subprocess.Popen([sys.executable, "-m", "broker.cli", "--home", str(h.path), "archive", "run",
                                  "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 120
        while _parts(h.path / "medbroker.db") < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        stored_before_kill = _parts(h.path / "medbroker.db")
        swift.kill()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 1, (out, err)
        doc = json.loads(out)
        assert doc["failed"] == 1 and doc["archived"] == 0
        assert 3 <= stored_before_kill < 10
        upload = h.app.store.archive_upload(row["id"])
        assert upload is not None and len(upload["parts"]) >= 3
        assert h.app.store.get_session(row["id"])["archived_at"] is None
        swift.start()
        started = time.monotonic()
        doc = h.json("archive", "run")
        took = time.monotonic() - started
        assert doc["archived"] == 1, doc
        result = doc["sessions"][0]
        assert result["parts"] == -(-size // (5 * 2**20)) and result["parts_reused"] >= 3
        data = Path(row["recording"]).read_bytes()
        assert sha(obj(swift, h.bucket, f"site-a/{row['id']}.mbr")) == sha(data)
        assert h.app.store.archive_upload(row["id"]) is None
        assert h.app.store.get_session(row["id"])["archive_sha256"] == sha(data)
        print(f"\nresume after kill: {result['parts_reused']} of {result['parts']} parts reused, "
              f"{size / 2**20:.1f} MiB object finished and verified in {took:.2f} s")
    finally:
        if any(p.poll() is not None for p in swift.procs.values()):
            swift.start()
        h.close()


def test_retention_interrupted_before_the_upload_replaces_the_archived_copy_next_run(tmp_path, swift):
    """Retention rewrote the local copy but died before replacing the archived object: the next run finds the
    redacted local file and uploads it, so the store never keeps the payload retention removed."""
    from sessions.retention import redact_recording

    h = archive_home(tmp_path, swift)
    try:
        g = h.grant()
        row = h.record_session("20260501-080000-arc007", SCRIPT, grant_id=g.id, started=OLD, encrypt=False)
        h.json("archive", "run")
        assert SECRET in obj(swift, h.bucket, f"site-a/{row['id']}.mbr")
        redact_recording(Path(row["recording"]), private_key=h.app.signing_key, removed_at=datetime.now(timezone.utc),
                         policy_days=180, expected_final_hash=row["final_hash"], signature=row["signature"])
        ret = h.json("retention", "apply", "--by", "carol")
        assert [(s["state"], s["detail"]) for s in ret["sessions"]] == [("removed", "finished an interrupted earlier run")]
        stored = obj(swift, h.bucket, f"site-a/{row['id']}.mbr")
        assert SECRET not in stored and stored == Path(row["recording"]).read_bytes()
        assert row_sha(h, row["id"]) == sha(stored)
        assert [r["state"] for r in h.json("audit", "verify")["recordings"]] == ["ok"]
    finally:
        h.close()


def test_check_reports_the_archive(tmp_path, swift):
    from broker.app import check_home

    h = archive_home(tmp_path, swift)
    try:
        h.json("archive", "run")
        [line] = [c for c in check_home(h.path) if c.name == "archive"]
        assert line.ok and f"s3://{h.bucket}/site-a/" in line.detail and swift.endpoint in line.detail
        secret = tmp_path / "s3keys" / "s3-secret"
        secret.write_text("not-the-secret\n")
        [line] = [c for c in check_home(h.path) if c.name == "archive"]
        assert not line.ok and "SignatureDoesNotMatch" in line.detail and "not-the-secret" not in line.detail
        secret.chmod(0o644)
        [line] = [c for c in check_home(h.path) if c.name == "archive"]
        assert not line.ok and "chmod 600" in line.detail
        secret.unlink()
        [line] = [c for c in check_home(h.path) if c.name == "archive"]
        assert not line.ok and "archive.secret_key_file" in line.detail
    finally:
        h.close()


def test_archive_run_without_an_archive_says_how_to_configure_one(tmp_path):
    h = make_staff_home(tmp_path)
    try:
        r = h.cli("archive", "run", code=1)
        assert "archiving is off" in r.stderr and "s3://BUCKET/PREFIX" in r.stderr
    finally:
        h.close()


def test_downloads_are_cached_while_used_and_pruned_after(tmp_path, swift):
    h = archive_home(tmp_path, swift, delete_local_after="true")
    try:
        g = h.grant()
        row = h.record_session("20261201-080000-arc008", SCRIPT, grant_id=g.id)
        h.json("archive", "run")
        cached = h.app.recordings.local_path(row["recording"])
        assert cached.is_relative_to(h.path / "archive-cache") and cached.read_bytes() == obj(
            swift, h.bucket, f"site-a/{row['id']}.mbr")
        assert not (h.path / "recordings" / f"{row['id']}.mbr").exists()
        old = time.time() - 2 * 86400
        os.utime(cached, (old, old))
        assert h.app.recordings.local_path(row["recording"]) == cached and cached.stat().st_mtime > old  # reused
        os.utime(cached, (old, old))
        h.json("archive", "run")  # a pass prunes downloads unused for a day
        assert not cached.exists()
        assert [r["state"] for r in h.json("audit", "verify")["recordings"]] == ["ok"]  # downloads again
        assert report(h, tmp_path)["summary"]["recordings_failing_verification"] == 0
    finally:
        h.close()


def test_metrics_show_the_archive_backlog_and_archived_bytes(tmp_path, swift):
    from prometheus_client.parser import text_string_to_metric_families

    from broker.health import Health

    def samples(health: Health) -> dict[str, float]:
        return {s.name: s.value for f in text_string_to_metric_families(health.render().decode()) for s in f.samples
                if s.name.startswith(("medbroker_archive", "medbroker_archived"))}

    h = archive_home(tmp_path, swift)
    try:
        health = Health(h.app)
        g = h.grant()
        samples(health)  # the first scrape starts the counters at the current audit row
        row = h.record_session("20261201-080000-arc009", SCRIPT, grant_id=g.id)
        assert samples(health)["medbroker_archive_waiting"] == 1
        h.json("archive", "run")
        after = samples(health)
        assert after["medbroker_archive_waiting"] == 0 and after["medbroker_archive_uploads"] == 0
        assert after["medbroker_archived_bytes_total"] == Path(row["recording"]).stat().st_size
    finally:
        h.close()


def test_a_recording_only_in_the_journal_is_archived_from_it_and_the_rows_dropped(tmp_path, swift):
    """Another node's session: no file here, but the journal (issue 13) holds its bytes. The pass rebuilds it,
    uploads it only when it verifies against the row's signed final hash, then drops the journal rows; a journal
    that rebuilds to something else (the end missing) is skipped and kept, and the pass goes on."""
    h = archive_home(tmp_path, swift)
    try:
        g = h.grant()
        whole = h.record_session("20261201-080000-jrn001", SCRIPT, grant_id=g.id)
        cut = h.record_session("20261201-090000-jrn002", SCRIPT, grant_id=g.id)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        data = {}
        for row, keep in ((cut, -200), (whole, None)):  # the cut one lacks its last 200 bytes (the end frame)
            data[row["id"]] = raw = Path(row["recording"]).read_bytes()
            head = 512  # any split: rebuild concatenates the rows in seq order
            h.app.store.append_journal(row["id"], 0, now, raw[:head])
            h.app.store.append_journal(row["id"], 1, now, raw[head:keep])
            Path(row["recording"]).unlink()  # the file is on the node that recorded it, not here
        doc = h.json("archive", "run")
        states = {s["session_id"]: s for s in doc["sessions"]}
        assert states[cut["id"]]["state"] == "skipped" and "journal rebuilds to something other" in \
            states[cut["id"]]["detail"]
        assert states[whole["id"]]["state"] == "archived" and states[whole["id"]]["local_removed"] is True
        assert obj(swift, h.bucket, f"site-a/{whole['id']}.mbr") == data[whole["id"]]
        assert not h.app.store.has_journal(whole["id"]) and h.app.store.has_journal(cut["id"])
        assert not Path(whole["recording"]).exists()  # nothing left behind on this node
        assert h.app.store.get_session(whole["id"])["archive_sha256"] == sha(data[whole["id"]])
        doc = json.loads(h.cli("audit", "verify", "--json", code=1).stdout)  # the cut one is on no node here
        verify = {r["session_id"]: r["state"] for r in doc["recordings"]}
        assert verify == {whole["id"]: "ok", cut["id"]: "broken"}
    finally:
        h.close()
