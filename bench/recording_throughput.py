"""Recording throughput: MB/s of append() on the calling thread and of the drained writer, clear and encrypted."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.clock import SystemClock  # noqa: E402
from sessions.recording import verify_recording  # noqa: E402
from sessions.recwriter import RecordingWriter  # noqa: E402


def run(directory: Path, total: int, chunk: int, encrypted: bool) -> dict[str, float]:
    """Append ``total`` bytes in ``chunk``-byte output frames; returns MB/s figures."""
    data = os.urandom(chunk)
    path = directory / f"bench-{'enc' if encrypted else 'clear'}.mbr"
    key = os.urandom(32) if encrypted else None
    # The relay would pause at high water; the bench keeps the whole backlog so append() never waits.
    w = RecordingWriter(path, {"session_id": "bench"}, clock=SystemClock(), aead_key=key,
                        key_id="k1" if encrypted else None, high_water=total + chunk, low_water=0,
                        max_pending=total + 2 * chunk)
    start = time.perf_counter()
    for _ in range(total // chunk):
        w.append_data(1, "output", data)
    appended = time.perf_counter()
    w.drain()
    drained = time.perf_counter()
    w.close()
    closed = time.perf_counter()
    verify_start = time.perf_counter()
    result = verify_recording(path)
    verified = time.perf_counter()
    assert result.ok, result.problems
    size = path.stat().st_size
    path.unlink()
    mb = total / 1e6
    return {"append_MBps": mb / (appended - start), "append_us_per_call": (appended - start) / (total // chunk) * 1e6,
            "drained_MBps": mb / (drained - start), "closed_MBps": mb / (closed - start), "verify_MBps": size / 1e6 / (verified - verify_start),
            "overhead_pct": (size - total) / total * 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="MiB to append per run (default 256)")
    parser.add_argument("--chunk-kib", type=int, default=32, help="chunk size in KiB (default 32)")
    parser.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; the best is shown (default 3)")
    args = parser.parse_args()
    print(f"{args.mib} MiB in {args.chunk_kib} KiB output frames; best of {args.repeat}; "
          "append = calling thread, drained = all frames written (page cache), closed = + fsync")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for encrypted in (False, True):
            runs = [run(Path(tmp), args.mib << 20, args.chunk_kib << 10, encrypted) for _ in range(args.repeat)]
            r = {k: max(x[k] for x in runs) if k != "append_us_per_call" else min(x[k] for x in runs)
                 for k in runs[0]}
            print(f"{'AES-256-GCM' if encrypted else 'clear      '}  append {r['append_MBps']:6.0f} MB/s "
                  f"({r['append_us_per_call']:.1f} us/call)  drained {r['drained_MBps']:5.0f} MB/s  "
                  f"closed {r['closed_MBps']:5.0f} MB/s  verify {r['verify_MBps']:5.0f} MB/s  "
                  f"size overhead {r['overhead_pct']:.2f}%")


if __name__ == "__main__":
    main()
