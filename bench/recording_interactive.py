"""Recording cost of interactive sessions: CPU per keystroke frame with many sessions typing at once."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.clock import SystemClock  # noqa: E402


def run(writer_cls, directory: Path, sessions: int, rate: float, seconds: float, encrypted: bool) -> dict[str, float]:
    """``sessions`` recordings; ``rate`` keystrokes/s in total, each an input and an output frame (1 byte)."""
    key = os.urandom(32) if encrypted else None
    writers = [writer_cls(directory / f"s{i}.mbr", {"session_id": f"s{i}"}, clock=SystemClock(), aead_key=key,
                          key_id="k1" if encrypted else None) for i in range(sessions)]
    threads = threading.active_count()
    gap = 1.0 / rate
    n = int(rate * seconds)
    cpu0, main0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    for i in range(n):  # bounded: n keystrokes, paced
        w = writers[i % sessions]
        w.append_data(0, "input", b"k")
        w.append_data(0, "output", b"k")
        delay = t0 + (i + 1) * gap - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    main = time.thread_time() - main0  # the appending thread (the event loop in the broker)
    threads = threading.active_count() - 1
    for w in writers:
        w.drain(timeout=30)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    for w in writers:
        w.close()
    # the paced loop itself (perf_counter, sleep) costs CPU too: measured separately by the caller's baseline
    return {"frames": 2 * n, "cpu_s": cpu, "wall_s": wall, "us_per_frame": cpu / (2 * n) * 1e6,
            "main_us_per_frame": main / (2 * n) * 1e6, "threads": threads}


def baseline(rate: float, seconds: float) -> float:
    """CPU of the pacing loop alone (no recording), in µs per keystroke."""
    gap, n = 1.0 / rate, int(rate * seconds)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        delay = t0 + (i + 1) * gap - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return (time.process_time() - cpu0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2000.0, help="keystrokes per second in total (default 2000)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--module", default="sessions.recwriter", help="module providing RecordingWriter")
    args = parser.parse_args()
    cls = importlib.import_module(args.module).RecordingWriter
    base = baseline(args.rate, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        r = run(cls, Path(tmp), args.sessions, args.rate, args.seconds, encrypted=True)
    per_frame, main = r["us_per_frame"] - base / 2, r["main_us_per_frame"] - base / 2
    print(f"{args.module}: {args.sessions} sessions, {args.rate:.0f} keystrokes/s for {args.seconds:.0f} s, "
          f"encrypted: {per_frame:.1f} us CPU per 1-byte frame in all threads, {main:.1f} us on the appending "
          f"thread (pacing loop subtracted: {base:.1f} us per keystroke), {r['threads']} other threads")


if __name__ == "__main__":
    main()
