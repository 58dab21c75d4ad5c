"""The shared recording writer thread: many recordings at once, group commit, one failing recording."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from broker.clock import FakeClock, SystemClock
from broker.errors import RecordingError
from sessions.recording import read_frames, verify_recording
from sessions.recwriter import RecordingWriter
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


# --- the acknowledgment window (issue 11, finding 7; docs/recording-format.md) ---------------------------------
class _SlowVolume:
    """A fifo as the recording "file", drained by a thread at a throttled pace: a disk slower than the session."""

    def __init__(self, tmp_path: Path, name: str, read_size: int = 16384, pause_s: float = 0.0005) -> None:
        self.path = tmp_path / name
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.stop = threading.Event()
        self.read_size, self.pause_s = read_size, pause_s
        self.thread = threading.Thread(target=self._drain, daemon=True)

    def _drain(self) -> None:
        while not self.stop.is_set():
            try:
                if not os.read(self.fd, self.read_size):
                    time.sleep(self.pause_s)
            except BlockingIOError:
                pass
            time.sleep(self.pause_s)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        os.close(self.fd)


class _StuckFifo:
    """A fifo as the recording "file" with a 4 KiB pipe that nobody reads until :meth:`drain`: the writer thread
    blocks inside its first batch larger than that."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        import fcntl

        self.path = tmp_path / name
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        fcntl.fcntl(self.fd, 1031, 4096)  # F_SETPIPE_SZ
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)

    def _drain(self) -> None:
        while not self.stop.is_set():
            try:
                os.read(self.fd, 65536)
            except BlockingIOError:
                time.sleep(0.0005)

    def drain(self) -> None:
        """Start reading (once)."""
        if not self.thread.is_alive():
            self.thread.start()

    def close(self, writer: RecordingWriter) -> None:
        """Drain while ``writer`` closes (its end frame must get through), then stop and close the fifo."""
        self.drain()
        writer.close()
        self.stop.set()
        self.thread.join(5)
        os.close(self.fd)


def _forward_through(w: RecordingWriter, held: threading.Event, sizes: list[int]) -> int:
    """What the relay does: append each unit, then hand it on; never hand on while held. Returns the most
    bytes that were ever handed on but not yet written (appended == handed on here, so that is pending_bytes)."""
    worst = 0
    for n in sizes:
        deadline = time.monotonic() + 10
        while held.is_set():
            assert time.monotonic() < deadline, "the writer never caught up"
            time.sleep(0.0002)
        assert w.append_data(1, "output", b"o" * n)
        worst = max(worst, w.pending_bytes)  # only the writer thread lowers it meanwhile
    return worst


@pytest.mark.parametrize("seed, largest, announced", [(1, 32768, 0), (2, 32768, 0), (3, 262144, 262144),
                                                      (4, 1024, 0), (5, 262144 - 1024, 262144)])
def test_the_ack_window_bounds_what_is_handed_on_before_it_is_written(tmp_path: Path, seed, largest,
                                                                     announced) -> None:
    import random

    from sessions.recwriter import ACK_WINDOW

    rnd = random.Random(seed)
    sizes = [largest]
    while sum(sizes) < 3 << 20:  # 3 MiB through a volume that takes ~30 MB/s at most
        sizes.append(rnd.randint(1, largest))
    rnd.shuffle(sizes)
    vol = _SlowVolume(tmp_path, "slow.mbr")
    held = threading.Event()
    pauses: list[int] = []
    w = RecordingWriter(vol.path, {"session_id": "slow"}, clock=SystemClock(), window=ACK_WINDOW,
                        on_pause=lambda: (held.set(), pauses.append(1)), on_resume=held.clear)
    vol.thread.start()
    try:
        if announced:
            w.expect_unit(announced)  # the relay does this for SFTP and broker-served scp channels
        worst = _forward_through(w, held, sizes)
        assert worst <= ACK_WINDOW, f"{worst} bytes handed on before they were written"
        assert pauses, "the slow volume never paused the session: the test proves nothing"
        assert w.drain(10) and w.pending_bytes == 0
    finally:
        vol.close()


def test_a_failed_writer_reports_once_and_leaves_nothing_paused(tmp_path: Path) -> None:
    """After a write failure nothing stays queued or paused (best-effort sessions go on), appends are refused
    (0: strict relays then hand nothing on), and the failure time is kept for the audit row."""
    from sessions.recwriter import ACK_WINDOW

    vol = _SlowVolume(tmp_path, "dies.mbr")
    errors: list[BaseException] = []
    held = threading.Event()
    w = RecordingWriter(vol.path, {"session_id": "dies"}, clock=SystemClock(), window=ACK_WINDOW,
                        on_pause=held.set, on_resume=held.clear, on_error=errors.append)
    w.append_data(1, "output", b"x" * 200_000)  # a pipe holds 64 KiB: the writer blocks, the session pauses
    w.append_data(1, "output", b"y" * 60_000)
    assert w.paused and held.is_set()
    vol.stop.set()
    os.close(vol.fd)  # the "volume" goes away under the blocked writer: EPIPE
    assert _wait(lambda: w.failed is not None)
    assert errors == [w.failed] and w.failed_at is not None
    assert not w.paused and w.pending_bytes == 0
    assert w.append_data(1, "output", b"after") == 0
    with pytest.raises(RecordingError):
        w.close()


def test_a_frame_queued_while_paused_is_written_at_once_not_at_the_next_tick(tmp_path: Path, monkeypatch) -> None:
    """Issue 16: an SFTP upload ran at 24 MB/s because a reply's few bytes, queued while the session was paused
    and the writer was busy, then waited a whole group-commit tick: the session waited on the writer, the writer
    waited for company. Here the tick is a minute, so only an immediate write lets the session go on."""
    from sessions import recwriter
    from sessions.recwriter import ACK_WINDOW

    monkeypatch.setattr(recwriter, "FLUSH_INTERVAL", 60.0)
    fifo = _StuckFifo(tmp_path, "narrow.mbr")
    held = threading.Event()
    w = RecordingWriter(fifo.path, {"session_id": "narrow"}, clock=SystemClock(), window=ACK_WINDOW,
                        on_pause=held.set, on_resume=held.clear)
    try:
        w.expect_unit(ACK_WINDOW)  # lock step, as a broker-served scp channel runs
        w.append_data(1, "output", b"b" * 32768)
        assert held.is_set() and _wait(lambda: w._inflight)  # the writer took the block and is stuck in write()
        w.append_data(1, "output", b"status reply")  # queued while paused
        fifo.drain()
        assert _wait(lambda: not held.is_set(), 10), "the session stayed paused: the writer waited for its tick"
        assert w.pending_bytes == 0
    finally:
        fifo.close(w)


def test_keyed_units_can_shrink_and_the_window_still_bounds_what_is_handed_on(tmp_path: Path) -> None:
    """An SFTP channel announces the largest reply its outstanding requests can bring and lowers it again
    (an upload's WRITEs bring 28-byte statuses): the window must hold through every change, and a small unit
    must really let the session run ahead of the writer instead of in lock step."""
    import random

    from sessions.recwriter import ACK_WINDOW

    rnd = random.Random(16)
    vol = _SlowVolume(tmp_path, "claims.mbr")
    held = threading.Event()
    w = RecordingWriter(vol.path, {"session_id": "claims"}, clock=SystemClock(), window=ACK_WINDOW,
                        on_pause=held.set, on_resume=held.clear)
    vol.thread.start()
    worst = 0
    try:
        for _ in range(400):
            claim = rnd.choice([8192, 32768, 32768, 65536, ACK_WINDOW])
            w.expect_unit(claim, key="sftp-1")
            sizes = [rnd.randint(1, claim) for _ in range(rnd.randint(1, 6))]
            assert _forward_through(w, held, sizes) <= ACK_WINDOW
            worst = max(worst, w.pending_bytes)
        w.expect_unit(0, key="sftp-1")
        assert w.drain(10) and not held.is_set()
    finally:
        vol.close()
    assert worst <= ACK_WINDOW
    # A small unit lets the session run ahead: 50 KiB queued behind a writer stuck in write(), no pause.
    fifo = _StuckFifo(tmp_path, "stuck.mbr")
    pauses: list[int] = []
    w2 = RecordingWriter(fifo.path, {"session_id": "small"}, clock=SystemClock(), window=ACK_WINDOW,
                         on_pause=lambda: pauses.append(w2.pending_bytes))
    try:
        w2.expect_unit(ACK_WINDOW, key="ch")
        w2.expect_unit(1024, key="ch")
        for _ in range(50):
            assert w2.append_data(1, "output", b"s" * 1024)
        assert not pauses and not w2.paused, f"a 1 KiB unit still paused the session at {pauses} bytes"
        w2.expect_unit(ACK_WINDOW, key="ch")  # a large reply may come: the session pauses at once
        assert pauses and w2.paused
    finally:
        fifo.close(w2)
