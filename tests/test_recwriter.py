"""The shared recording writer thread: many recordings at once, group commit, one failing recording."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from broker.clock import FakeClock, SystemClock
from broker.errors import RecordingError
from sessions.recording import RecordingWriter, read_frames, verify_recording
from sessions.recwriter import FLUSH_INTERVAL

KEY = bytes(range(32))


def _keys(key_id: str) -> bytes:
    assert key_id == "k1"
    return KEY


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_many_recordings_share_one_writer_thread_and_all_verify(tmp_path: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    writers = [RecordingWriter(tmp_path / f"s{i}.mbr", {"session_id": f"s{i}"}, clock=FakeClock(), aead_key=KEY,
                               key_id="k1") for i in range(40)]
    for n in range(50):  # interleaved, like 40 sessions typing
        for i, w in enumerate(writers):
            w.append_data(0, "input", f"{i}:{n}\r".encode())
            w.append_data(0, "output", f"echo {i}:{n}\r\n".encode())
    new_threads = {t.name for t in threading.enumerate()} - before
    assert len([t for t in new_threads if "recording" in t]) <= 1  # one shared writer, not 40
    finals = [w.close() for w in writers]
    for i, (w, final) in enumerate(zip(writers, finals)):
        assert verify_recording(w.path, expected_final_hash=final, key_lookup=_keys).ok
        frames = [f for f in read_frames(w.path, key_lookup=_keys) if f.kind == "input"]
        assert [f.payload for f in frames] == [f"{i}:{n}\r".encode() for n in range(50)]


def test_frames_reach_the_file_without_a_drain(tmp_path: Path) -> None:
    """Group commit: a lone keystroke is on disk within about FLUSH_INTERVAL (watchers follow the file)."""
    path = tmp_path / "watch.mbr"
    w = RecordingWriter(path, {"session_id": "watch"}, clock=SystemClock())
    size = path.stat().st_size
    w.append_data(0, "output", b"typed before the watcher looked")
    assert _wait(lambda: path.stat().st_size > size, timeout=max(2.0, 50 * FLUSH_INTERVAL))
    assert any(f.payload == b"typed before the watcher looked" for f in read_frames(path))
    w.close()


def test_one_failing_recording_does_not_stop_the_others(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    errors: list[BaseException] = []
    broken = RecordingWriter(pipe, {"session_id": "broken"}, clock=FakeClock(), on_error=errors.append)
    good = RecordingWriter(tmp_path / "good.mbr", {"session_id": "good"}, clock=FakeClock())
    os.close(reader)  # the pipe's reader is gone: every write to it fails (EPIPE)
    broken.append_data(0, "output", b"x" * 1000)
    good.append_data(0, "output", b"still recorded")
    assert _wait(lambda: broken.failed is not None)
    assert errors == [broken.failed] and isinstance(broken.failed.__cause__, OSError)
    good.append_data(0, "output", b"and after the other one failed")
    final = good.close()
    assert verify_recording(good.path, expected_final_hash=final).ok
    assert [f.payload for f in read_frames(good.path) if f.kind == "output"] == [
        b"still recorded", b"and after the other one failed"]
    assert broken.append_data(0, "output", b"dropped") == 0 and broken.dropped_frames == 1
    with pytest.raises(RecordingError):
        broken.close()
