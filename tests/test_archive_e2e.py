"""End to end: a session through a real sshd device, archived by the broker's own duty to a real Swift, the local
copy removed, then replay, export, audit verify and retention working from the object store alone."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app as cli_app
from helpers import poll
from helpers.broker import World
from sessions.retention import is_redacted

pytestmark = pytest.mark.openssh
_runner = CliRunner()


def cli(home: Path, *args: str, code: int = 0):
    r = _runner.invoke(cli_app, ["--home", str(home), *args])
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.exit_code == code, f"{args} -> {r.exit_code}\n{r.stdout}\n{r.stderr}"
    return r


def test_a_real_session_is_archived_by_serve_and_read_back_from_the_object_store(tmp_path, device, swift):
    bucket = swift.create_bucket(f"mb-{uuid.uuid4().hex[:16]}")
    keys = tmp_path / "s3keys"
    keys.mkdir()
    config = swift.config(keys, bucket, "e2e/", interval='"1s"', delete_local_after='"4s"', part_size='"5MiB"') \
        + "[retention]\ndays = 0\nallow_below_floor = true\n"
    world = World(tmp_path, device()).setup(config=config)
    home = world.app.home
    try:
        world.grant()
        r = world.ssh("alice@ct-01", "echo archived-session-marker; head -c 300000 /dev/zero | tr '\\0' y; echo")
        assert r.returncode == 0 and b"archived-session-marker" in r.stdout
        sid = poll(lambda: [s["id"] for s in world.app.store.list_sessions() if s["final_hash"]], timeout=20)[0]
        # the serve duty (every archive.interval) uploads it; the local copy stays for delete_local_after
        row = poll(lambda: (s := world.app.store.get_session(sid)) and s["archived_at"] and s, timeout=30)
        assert row, "the serve duty did not archive the session"
        local = world.app.recordings.local_path(row["recording"])
        original = local.read_bytes()
        assert row["archive_sha256"] == hashlib.sha256(original).hexdigest()
        replay_before = cli(home, "replay", sid, "--instant").stdout
        assert "archived-session-marker" in replay_before and "y" * 1000 in replay_before
        cli(home, "export", sid, "--format", "asciicast", "-o", str(tmp_path / "before.cast"))
        obj = swift.client().get_object(Bucket=bucket, Key=f"e2e/{row['recording']}")["Body"].read()
        assert obj == original
        # ... and removes the local copy once it is old enough (the object still verifying)
        assert poll(lambda: world.app.store.get_session(sid)["local_removed_at"], timeout=30)
        assert not local.exists()
        events = [json.loads(e["details"]) for e in world.events("recording.archived")]
        assert [e["sha256"] for e in events] == [row["archive_sha256"]]
        assert [e["session_id"] for e in world.events("recording.local_removed")] == [sid]

        assert cli(home, "replay", sid, "--instant").stdout == replay_before
        cli(home, "export", sid, "--format", "asciicast", "-o", str(tmp_path / "after.cast"))
        assert (tmp_path / "after.cast").read_bytes() == (tmp_path / "before.cast").read_bytes()
        verify = json.loads(cli(home, "audit", "verify", "--json").stdout)
        assert [(r["session_id"], r["state"]) for r in verify["recordings"]] == [(sid, "ok")], verify
        assert not local.exists()

        # retention works on the archived object: redacted in the store, still verifying
        ret = json.loads(cli(home, "retention", "apply", "--confirm-below-floor", "--json").stdout)
        assert [(s["session_id"], s["state"]) for s in ret["sessions"]] == [(sid, "removed")], ret
        redacted = swift.client().get_object(Bucket=bucket, Key=f"e2e/{row['recording']}")["Body"].read()
        (tmp_path / "probe.mbr").write_bytes(redacted)
        assert is_redacted(tmp_path / "probe.mbr") and b"archived-session-marker" not in redacted
        assert world.app.store.get_session(sid)["archive_sha256"] == hashlib.sha256(redacted).hexdigest()
        verify = json.loads(cli(home, "audit", "verify", "--json").stdout)
        assert [(r["session_id"], r["state"]) for r in verify["recordings"]] == [(sid, "ok")], verify
        assert not local.exists()
    finally:
        world.close()


def test_with_the_journal_on_rows_stay_until_the_recording_is_archived(tmp_path, device, swift):
    """[recording] journal + [archive]: sealing keeps the journal rows (any node can archive from them); the
    archive pass drops them once the object is verified, and the object is the recording byte for byte."""
    bucket = swift.create_bucket(f"mb-{uuid.uuid4().hex[:16]}")
    keys = tmp_path / "s3keys"
    keys.mkdir()
    config = swift.config(keys, bucket, "", interval='"1h"') + "[recording]\njournal = true\n"
    world = World(tmp_path, device()).setup(config=config)
    home = world.app.home
    try:
        world.grant()
        r = world.ssh("alice@ct-01", "echo journaled-and-archived")
        assert r.returncode == 0 and b"journaled-and-archived" in r.stdout
        sid = poll(lambda: [s["id"] for s in world.app.store.list_sessions() if s["final_hash"]], timeout=20)[0]
        row = world.app.store.get_session(sid)
        assert world.app.store.has_journal(sid), "sealing dropped the journal although [archive] needs it"
        doc = json.loads(cli(home, "archive", "run", "--json").stdout)
        assert [(s["session_id"], s["state"]) for s in doc["sessions"]] == [(sid, "archived")]
        assert not world.app.store.has_journal(sid)
        local = world.app.recordings.local_path(row["recording"])
        obj = swift.client().get_object(Bucket=bucket, Key=row["recording"])["Body"].read()
        assert obj == local.read_bytes()
    finally:
        world.close()
