"""Post-session indexing cost: CPU and wall time of indexing one recording, and what it does to a live event loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.clock import FakeClock  # noqa: E402
from sessions.recording import read_frames  # noqa: E402
from sessions.recwriter import RecordingWriter  # noqa: E402
from sessions.textindex import build_session_text  # noqa: E402

_CHUNK = 32 << 10  # what the relay records per SSH packet
_LINES = [b"Jan 12 03:14:07 ct-01 gantry[812]: tube temperature %d C, rotor %d rpm, scan %d done\r\n" % (i, i * 7, i)
          for i in range(64)]


def make_recording(path: Path, key: bytes | None, *, binary_mib: int, text_mib: int, commands: int) -> int:
    """One session: a shell where ``commands`` commands are typed key by key, an exec channel that prints
    ``binary_mib`` MiB of random bytes (``cat study.dcm``), and optionally a shell ``cat`` of ``text_mib``
    MiB of log lines. Returns the file size."""
    clock = FakeClock()
    w = RecordingWriter(path, {"session_id": path.stem, "user": "alice", "device": "ct-01"}, clock=clock,
                        aead_key=key, key_id="k1" if key else None, high_water=96 << 20, low_water=0,
                        max_pending=128 << 20)

    def tick(seconds: float = 0.05) -> None:
        clock.advance(seconds)

    w.append_event(1, "pty", {"term": "xterm", "cols": 120, "rows": 30})
    w.append_event(1, "shell", {})
    w.append_data(1, "output", b"Welcome to ct-01\r\n$ ")
    for i in range(commands):
        line = b"grep -i error /var/log/gantry.log | tail -n %d" % (i + 1)
        for b in line:
            tick()
            w.append_data(1, "input", bytes([b]))
            w.append_data(1, "output", bytes([b]))
        tick()
        w.append_data(1, "input", b"\r")
        w.append_data(1, "output", b"\r\n" + b"".join(_LINES[:i % 8 + 1]) + b"$ ")
    if text_mib:
        for b in b"cat /var/log/gantry.log\r":
            tick()
            w.append_data(1, "input", bytes([b]))
            w.append_data(1, "output", bytes([b]) if b != 13 else b"\r\n")
        block = b"".join(_LINES)
        for _ in range((text_mib << 20) // len(block)):
            w.append_data(1, "output", block)
        w.append_data(1, "output", b"$ ")
        w.drain()
    w.append_event(2, "exec", {"command": "cat /srv/dicom/study-0001.dcm"})
    noise = os.urandom(_CHUNK * 64)
    for i in range((binary_mib << 20) // _CHUNK):
        w.append_data(2, "output", noise[(i % 64) * _CHUNK:(i % 64 + 1) * _CHUNK])
        if i % 256 == 255:
            w.drain()
    w.append_event(2, "exit", {"status": 0})
    w.close("closed")
    return path.stat().st_size


async def _ticker(stop: asyncio.Event, lags: list[float]) -> None:
    """A stand-in for a live session: wakes every millisecond, does a little Python work, notes how late it was."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)
        sum(range(200))


async def _measure(run: Callable[[], Any], *, with_ticker: bool) -> dict[str, Any]:
    stop, lags = asyncio.Event(), []
    ticker = asyncio.create_task(_ticker(stop, lags)) if with_ticker else None
    await asyncio.sleep(0.05)
    lags.clear()
    cpu0, kids0, wall0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = await run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    if ticker is not None:
        await ticker
    lags.sort()
    commands = len(result.commands)
    texts = len(result.texts) if hasattr(result, "texts") else commands + len(result.lines) + len(result.transfers)
    return {"rows": f"{commands}/{texts}", "wall": wall, "cpu": cpu,
            "child_cpu": max(0.0, kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime),
            "lag_p50": statistics.median(lags) * 1e3 if lags else 0.0,
            "lag_p99": lags[int(len(lags) * 0.99)] * 1e3 if lags else 0.0, "lag_max": lags[-1] * 1e3 if lags else 0.0}


def methods(path: Path, keys: Callable[[str], bytes]) -> dict[str, Callable[[], Any]]:
    """The ways to index available in this tree (the bench also runs against older trees)."""
    loop = asyncio.get_running_loop()

    def reader() -> Any:
        return read_frames(path, key_lookup=keys, strict=False)

    found: dict[str, Callable[[], Any]] = {
        "thread: build_session_text(read)": lambda: loop.run_in_executor(None, build_session_text, reader)}
    try:
        from sessions.textindex import index_recording
    except ImportError:
        return found
    found["thread: index_recording (one pass, skips)"] = lambda: loop.run_in_executor(None, index_recording, path, keys)
    try:
        from broker.indexer import build_index_rows
    except ImportError:
        return found
    found["child: build_index_rows"] = lambda: build_index_rows(path, keys, child_min_bytes=0)
    return found


async def bench(path: Path, keys: Callable[[str], bytes], repeat: int) -> None:
    """Each method ``repeat`` times alone (CPU, wall: the cheapest run) and ``repeat`` times beside the ticker
    (lag: the median run by p99)."""
    for name in list(methods(path, keys)):
        alone = [await _measure(methods(path, keys)[name], with_ticker=False) for _ in range(repeat)]
        beside = [await _measure(methods(path, keys)[name], with_ticker=True) for _ in range(repeat)]
        best = min(alone, key=lambda r: r["cpu"] + r["child_cpu"])
        lag = sorted(beside, key=lambda r: r["lag_p99"])[len(beside) // 2]
        print(f"  {name:44s} wall {best['wall']:6.2f} s  broker CPU {best['cpu']:6.2f} s  child CPU "
              f"{best['child_cpu']:5.2f} s  loop lag p50/p99/max {lag['lag_p50']:5.1f}/{lag['lag_p99']:5.1f}/"
              f"{lag['lag_max']:6.1f} ms  rows {best['rows']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary-mib", type=int, default=64, help="random output on an exec channel (default 64)")
    parser.add_argument("--text-mib", type=int, default=0, help="log text cat'ed in the shell (default 0)")
    parser.add_argument("--commands", type=int, default=40, help="commands typed in the shell (default 40)")
    parser.add_argument("--clear", action="store_true", help="unencrypted recording (default: AES-256-GCM)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method and measurement (default 2)")
    parser.add_argument("--dir", default=None, help="directory for the recording (default: a temp dir)")
    args = parser.parse_args()
    key = None if args.clear else os.urandom(32)
    keys = {"k1": key}.__getitem__
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench-index.mbr"
        size = make_recording(path, key, binary_mib=args.binary_mib, text_mib=args.text_mib, commands=args.commands)
        print(f"recording: {size / 2**20:.1f} MiB ({args.binary_mib} MiB random exec output, {args.text_mib} MiB "
              f"shell text, {args.commands} typed commands, {'clear' if key is None else 'AES-256-GCM'}); "
              f"CPU and wall: cheapest of {args.repeat} runs; loop lag: lateness of a 1 ms timer on this process's "
              f"event loop while indexing, median of {args.repeat} runs; rows = commands/search-text rows found")
        asyncio.run(bench(path, keys, args.repeat))


if __name__ == "__main__":
    main()
