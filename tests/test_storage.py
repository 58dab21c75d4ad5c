"""sessions/storage.py: recordings by key relative to the storage root; legacy absolute rows; keys that escape."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.app import init_home
from broker.clock import FakeClock, utc_iso
from broker.errors import StorageError
from broker.session_ops import session_verification
from sessions.recording import sign_final_hash
from sessions.recwriter import RecordingWriter
from sessions.storage import LocalRecordingStore, RecordingStore

SID = "20261206-231919-b031da"


@pytest.fixture
def store(tmp_path: Path) -> LocalRecordingStore:
    root = tmp_path / "recordings"
    root.mkdir()
    return LocalRecordingStore(root)


def _write(path: Path, data: bytes = b"x" * 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_new_recordings_get_a_relative_key(store):
    key, path = store.path_for_new(SID)
    assert key == f"{SID}.mbr" and path == store.root / key
    assert not store.exists(key)
    _write(path, b"0123456789")
    assert store.exists(key) and store.size(key) == 10
    with store.open_for_read(key) as fh:  # ranges: seek and read
        fh.seek(3)
        assert fh.read(4) == b"3456"
    assert list(store.iter_keys()) == [key]
    assert isinstance(store, RecordingStore)


def test_legacy_absolute_paths_under_the_root_resolve_to_their_key(store, tmp_path):
    _write(store.root / f"{SID}.mbr")
    absolute = str(store.root / f"{SID}.mbr")
    assert store.key_of(absolute) == f"{SID}.mbr"
    assert store.local_path(absolute) == store.local_path(f"{SID}.mbr") == store.root / f"{SID}.mbr"
    assert store.key_of(str(store.root / "sub" / ".." / f"{SID}.mbr")) == f"{SID}.mbr"  # normalised first
    # the same directory reached through a symbolic link (a home moved behind a link, /var -> /private/var)
    link = tmp_path / "link"
    link.symlink_to(store.root)
    assert store.key_of(str(link / f"{SID}.mbr")) == f"{SID}.mbr"
    assert LocalRecordingStore(link).key_of(absolute) == f"{SID}.mbr"


@pytest.mark.parametrize("bad", ["", "../outside.mbr", "a/../../outside.mbr", "./x.mbr", "a//b.mbr", "a/",
                                 "a\\..\\b.mbr", "x\x00.mbr"])
def test_keys_that_escape_or_are_not_plain_are_refused(store, bad):
    with pytest.raises(StorageError, match="not a plain name inside the recordings directory"):
        store.local_path(bad)


def test_absolute_paths_outside_the_root_are_refused(store, tmp_path):
    outside = tmp_path / "elsewhere" / f"{SID}.mbr"
    _write(outside)
    for stored in (str(outside), "/etc/passwd", str(store.root) + "-evil/x.mbr", str(store.root)):
        with pytest.raises(StorageError, match="outside the recordings directory") as err:
            store.open_for_read(stored)
        assert "medbroker audit verify" in (err.value.hint or "")
    with pytest.raises(StorageError):
        store.exists(str(outside))  # never reported as merely "missing"


def test_a_link_inside_the_root_cannot_lead_out(store, tmp_path):
    secret = tmp_path / "secret.mbr"
    _write(secret)
    (store.root / "sneaky").symlink_to(tmp_path)
    (store.root / "alias.mbr").symlink_to(secret)
    for key in ("sneaky/secret.mbr", "alias.mbr"):
        with pytest.raises(StorageError, match="leads outside the recordings directory"):
            store.open_for_read(key)
    with pytest.raises(StorageError, match="outside the recordings directory"):
        store.key_of(str(secret))


def _closed_session(app, clock, sid: str, stored: str) -> dict:
    path = app.recordings.local_path(stored)
    w = RecordingWriter(path, {"session_id": sid, "user": "alice", "device": "ct-01",
                               "started_at": utc_iso(clock.now())}, clock=clock)
    w.append_data(1, "output", b"hello\r\n")
    final = w.close("closed")
    app.store.insert_session({"id": sid, "user_name": "alice", "device": "ct-01", "grant_id": 1,
                              "started_at": utc_iso(clock.now()), "ended_at": utc_iso(clock.now()),
                              "status": "closed", "recording": stored, "final_hash": final,
                              "signature": sign_final_hash(app.signing_key, final)})
    return app.store.get_session(sid)


def test_rows_with_keys_and_legacy_rows_both_verify_and_a_moved_home_keeps_its_keys(tmp_path):
    """New rows hold keys; rows written before issue 12 hold absolute paths and keep working; ``service restore``
    still rebases legacy rows (the key rows need nothing: they are relative)."""
    clock = FakeClock()
    home = tmp_path / "home"
    home.mkdir()
    app = init_home(home, clock=clock)
    try:
        new = _closed_session(app, clock, "20260101-080000-aaaaaa", "20260101-080000-aaaaaa.mbr")
        old = _closed_session(app, clock, "20260101-090000-bbbbbb",
                              str(app.config.recordings_dir / "20260101-090000-bbbbbb.mbr"))
        assert not os.path.isabs(new["recording"]) and os.path.isabs(old["recording"])
        for row in (new, old):
            check = session_verification(app, row)
            assert check["state"] == "ok", check
        # the legacy row's directory moves (a restore into another home): rebasing rewrites only the old paths
        assert app.store.rebase_recordings(str(app.config.recordings_dir), "/srv/new/recordings") == 1
        moved = app.store.get_session(old["id"])["recording"]
        assert moved == "/srv/new/recordings/20260101-090000-bbbbbb.mbr"
        assert app.store.get_session(new["id"])["recording"] == new["recording"]
        check = session_verification(app, app.store.get_session(old["id"]))
        assert check["state"] == "broken" and "outside the recordings directory" in check["summary"]
    finally:
        app.close()
