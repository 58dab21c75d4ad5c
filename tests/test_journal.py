"""The recording journal (issue 13, item 3): store methods, the writer's journal hook (acknowledged only once
committed), the journal timeout, rebuilding a recording byte for byte, and following a journal.

Store-agnostic: everything goes through the Store methods, on an SQLite file and on PostgreSQL (``store_target``);
only the blocker that holds the database's write lock is written per engine."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from broker.clock import FakeClock, SystemClock
from broker.errors import StorageError
from broker.journal import JournalError, JournalSink, JournalTail, rebuild_from_journal
from broker.store import open_store
from helpers import journal_bytes
from sessions.recording import read_frames, seal_recording, verify_recording
from sessions.recwriter import ACK_WINDOW, FLUSH_INTERVAL, RecordingWriter

KEY = bytes(range(32))


def _keys(key_id: str) -> bytes:
    assert key_id == "k1"
    return KEY


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def db(store_target):
    path = store_target
    open_store(path).close()  # migrated once, like a broker home
    stores = []

    def connect():
        s = open_store(path, migrate=False)
        stores.append(s)
        return s

    connect.path = path  # type: ignore[attr-defined]
    yield connect
    for s in stores:
        s.close()


@contextlib.contextmanager
def _write_locked(db):
    """Another connection holds what every journal commit needs: SQLite's write lock (BEGIN IMMEDIATE), or on
    PostgreSQL an EXCLUSIVE lock on the journal table (reads go on, inserts wait)."""
    if isinstance(db.path, Path):
        blocker = sqlite3.connect(db.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    holder = open_store(db.path, migrate=False)
    try:
        with holder.transaction() as conn:
            conn.execute("LOCK TABLE recording_journal IN EXCLUSIVE MODE")
            yield
    finally:
        holder.close()



# ---------------------------------------------------------------- store


def test_store_appends_reads_in_bounded_batches_reports_backlog_and_drops(db) -> None:
    s = db()
    for seq in (0, 1, 5, 9):
        s.append_journal("a", seq, "2026-12-07T00:00:00Z", bytes([seq]) * (seq + 1))
    s.append_journal("a", 5, "2026-12-07T00:00:01Z", b"different")  # a retried commit: changes nothing
    s.append_journal("b", 0, "2026-12-07T00:00:00Z", b"hdr")
    assert s.read_journal("a") == [(0, b"\x00"), (1, b"\x01\x01"), (5, b"\x05" * 6), (9, b"\x09" * 10)]
    assert s.read_journal("a", 1, limit=2) == [(5, b"\x05" * 6), (9, b"\x09" * 10)]
    assert s.read_journal("a", 9) == []
    assert all(isinstance(d, bytes) for _, d in s.read_journal("a"))
    assert s.journal_backlog() == [
        {"session_id": "a", "rows": 4, "bytes": 1 + 2 + 6 + 10, "last_at": "2026-12-07T00:00:00Z"},
        {"session_id": "b", "rows": 1, "bytes": 3, "last_at": "2026-12-07T00:00:00Z"}]
    assert s.has_journal("a") and not s.has_journal("c")
    assert s.drop_journal("a") == 4
    assert not s.has_journal("a") and s.has_journal("b")


# ---------------------------------------------------------------- the writer's hook


def _writer(path: Path, journal, **kw) -> RecordingWriter:
    return RecordingWriter(path, {"session_id": "s1"}, clock=FakeClock(), aead_key=KEY, key_id="k1",
                           journal=journal, **kw)


def test_journal_rows_are_exactly_the_file_one_row_per_batch_header_first(tmp_path: Path, db) -> None:
    s = db()
    sink = JournalSink(db(), "s1", SystemClock(), 5)
    w = _writer(tmp_path / "s1.mbr", sink)
    for n in range(300):  # keystrokes and echoes, then bulk output over several writes
        w.append_data(1, "input", f"{n}\r".encode())
        w.append_data(1, "output", f"echo {n}\r\n".encode())
    w.append_data(1, "output", bytes(range(256)) * 12000)  # 3 MiB: several 1 MiB writes
    final = w.close()
    data = (tmp_path / "s1.mbr").read_bytes()
    assert journal_bytes(s, "s1") == data
    rows = s.read_journal("s1", limit=10_000)
    assert rows[0][0] == 0 and data.startswith(rows[0][1]) and rows[0][1].startswith(b"MEDBREC")
    assert len(rows[0][1]) == data.index(rows[1][1])  # the header row is the header and its hash, no frame
    assert [seq for seq, _ in rows] == sorted(seq for seq, _ in rows)
    assert 3 < len(rows) < w.frames / 4  # batched: not one row per frame
    assert verify_recording(tmp_path / "s1.mbr", expected_final_hash=final, key_lookup=_keys).ok


def test_nothing_is_acknowledged_before_the_journal_commits_and_the_window_pauses(tmp_path: Path, db) -> None:
    """A journal that is locked (another connection holds the write lock) keeps the batch unacknowledged:
    pending_bytes stays up, the writer pauses the session at the window, and resumes once the commit lands."""
    s = db()
    s.set_lock_wait(30)
    sink = JournalSink(s, "s1", SystemClock(), 30)
    paused, resumed = threading.Event(), threading.Event()
    w = _writer(tmp_path / "s1.mbr", sink, window=ACK_WINDOW, on_pause=paused.set, on_resume=resumed.set)
    assert _wait(lambda: db().has_journal("s1"))  # the header went out on the writer thread
    with _write_locked(db):  # every journal commit now waits
        size = (tmp_path / "s1.mbr").stat().st_size
        w.append_data(1, "output", b"one keystroke's echo")
        assert _wait(lambda: (tmp_path / "s1.mbr").stat().st_size > size)  # written locally ...
        time.sleep(10 * FLUSH_INTERVAL)
        assert w.pending_bytes == len(b"one keystroke's echo")  # ... but not acknowledged: the journal waits
        size = (tmp_path / "s1.mbr").stat().st_size
        unit = 32 << 10
        for _ in range(1000):  # bounded: 32 MiB, far past the window
            if paused.is_set():
                break
            w.append_data(1, "output", b"x" * unit)
            assert w.pending_bytes <= ACK_WINDOW
            time.sleep(0.001)
        assert paused.is_set(), "the writer never paused although nothing was acknowledged"
        time.sleep(20 * FLUSH_INTERVAL)
        assert w.paused and w.pending_bytes > ACK_WINDOW - 2 * unit  # the window is full of unacknowledged bytes
        assert not resumed.is_set()
    assert resumed.wait(10) and w.pending_bytes < ACK_WINDOW // 2
    w.close()
    assert journal_bytes(db(), "s1") == (tmp_path / "s1.mbr").read_bytes()


def test_a_journal_down_past_its_timeout_fails_the_recording_once(tmp_path: Path, db) -> None:
    s = db()
    s.set_lock_wait(1)
    errors: list[Exception] = []
    w = _writer(tmp_path / "s1.mbr", JournalSink(s, "s1", SystemClock(), 1), on_error=errors.append)
    assert _wait(lambda: db().has_journal("s1"))
    with _write_locked(db):
        started = time.monotonic()
        w.append_data(1, "output", b"after the database went away")
        assert _wait(lambda: w.failed is not None, timeout=10)
        took = time.monotonic() - started
    assert 0.9 < took < 5, took
    assert isinstance(w.failed, JournalError) and len(errors) == 1 and errors[0] is w.failed
    assert w.failed.message.startswith("the recording store is unreachable: session s1's recording could not be "
                                       "journaled for 1s")
    assert w.append_data(1, "output", b"dropped") == 0
    with pytest.raises(JournalError):
        w.close()
    assert b"after the database" not in journal_bytes(db(), "s1")


def test_a_failing_header_commit_fails_the_recording(tmp_path: Path) -> None:
    def down(seq: int, data: bytes) -> None:
        raise JournalError("the recording store is unreachable: test")

    errors: list[Exception] = []
    w = _writer(tmp_path / "s1.mbr", down, on_error=errors.append)
    assert _wait(lambda: w.failed is not None) and len(errors) == 1
    with pytest.raises(JournalError):
        w.close()


# ---------------------------------------------------------------- rebuild


def test_rebuild_is_byte_exact_and_seals_like_a_crashed_file(tmp_path: Path, db) -> None:
    s = db()
    w = _writer(tmp_path / "s1.mbr", JournalSink(db(), "s1", SystemClock(), 5))
    for n in range(200):
        w.append_data(1, "output", f"line {n}\r\n".encode())
    assert w.drain(10)
    written = (tmp_path / "s1.mbr").read_bytes()  # what a node had written when it died (no end frame)
    dest = tmp_path / "rebuilt" / "s1.mbr"
    dest.parent.mkdir()
    assert rebuild_from_journal(s, "s1", dest) == len(written)
    assert dest.read_bytes() == written
    assert [p.name for p in dest.parent.iterdir()] == ["s1.mbr"]  # no temporary file left behind
    final, dropped = seal_recording(dest)
    result = verify_recording(dest, expected_final_hash=final, key_lookup=_keys)
    assert result.ok and result.end_reason == "incomplete" and dropped == 0
    shown = b"".join(f.payload for f in read_frames(dest, key_lookup=_keys) if f.kind == "output")
    assert shown == b"".join(f"line {n}\r\n".encode() for n in range(200))
    with pytest.raises(StorageError, match="exists"):
        rebuild_from_journal(s, "s1", dest)
    with pytest.raises(StorageError, match="no rows for session nobody"):
        rebuild_from_journal(s, "nobody", tmp_path / "nobody.mbr")
    assert not (tmp_path / "nobody.mbr").exists()
    w.close()


# ---------------------------------------------------------------- following


def test_journal_tail_follows_a_live_recording_and_ends_with_it(tmp_path: Path, db) -> None:
    live = threading.Event()
    live.set()
    w = _writer(tmp_path / "s1.mbr", JournalSink(db(), "s1", SystemClock(), 5))
    tail = JournalTail(db(), "s1", live.is_set)
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(
        f.payload for f in read_frames(tail, key_lookup=_keys, follow=True, timeout=20, poll_interval=0.02)
        if f.kind == "output"))
    reader.start()
    for n in range(50):
        w.append_data(1, "output", f"live {n}\r\n".encode())
        time.sleep(0.002)
    sent = b"".join(f"live {n}\r\n".encode() for n in range(50))  # the fake clock stands still: lines share frames
    assert _wait(lambda: b"".join(seen) == sent)
    w.close()
    live.clear()
    reader.join(10)
    assert not reader.is_alive()
    assert b"".join(seen) == sent and len(seen) >= 2  # several frames, read while they were written
