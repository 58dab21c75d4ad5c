"""Stream judge (sessions/streams.py): cost in MB/s and µs per small feed, and false alarms on real data.

False alarms: every regular file under the given roots (default /usr/bin, /usr/lib/x86_64-linux-gnu,
/usr/share/doc, /var/log) is fed whole, in 32 KiB chunks, in both directions; random bytes too. Any hit
is printed with its file: each one is a false alarm (none of those files is a transfer protocol stream,
except archives, which are listed separately as expected hits).

    python bench/stream_judge.py [--roots DIR ...] [--limit-mb N] [--engine python|hyperscan]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sessions import anchors  # noqa: E402
from sessions.streams import DEVICE, VENDOR, StreamJudge  # noqa: E402

CHUNK = 32 * 1024
_ARCHIVES = (".tar", ".cpio", ".deb")  # genuinely tar/cpio-shaped (a .deb holds tar members)


def _feed_all(data: bytes, direction: str, chunk: int = CHUNK) -> str | None:
    judge = StreamJudge()
    for i in range(0, len(data), chunk):
        hit = judge.feed(direction, data[i:i + chunk])
        if hit:
            return f"{hit}@{judge.hit.offset}"
    return None


def _throughput(name: str, data: bytes, chunk: int) -> None:
    judge = StreamJudge()
    start = time.thread_time()
    for i in range(0, len(data), chunk):
        judge.feed(DEVICE, data[i:i + chunk])
    spent = max(time.thread_time() - start, 1e-9)
    print(f"  {name:<28} chunk {chunk:>6}: {len(data) / spent / 1e6:8.1f} MB/s"
          f"  ({spent / max(1, len(data) // chunk) * 1e6:7.1f} µs per feed)")


def _sample(roots: list[str], limit: int) -> list[Path]:
    files, total = [], 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in sorted(names):
                p = Path(dirpath) / name
                try:
                    if not p.is_file() or p.is_symlink():
                        continue
                    size = p.stat().st_size
                except OSError:
                    continue
                if total + size > limit:
                    continue
                files.append(p)
                total += size
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roots", nargs="*", default=["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc",
                                                   "/var/log"])
    ap.add_argument("--limit-mb", type=int, default=400, help="stop sampling after this many MB per root")
    ap.add_argument("--engine", choices=anchors.ENGINES, help="anchor search (sessions/anchors.py); default: "
                    "Hyperscan when installed")
    args = ap.parse_args()
    if args.engine:
        anchors.set_engine(args.engine)
    print(f"anchor search: {anchors.engine()}")

    text = b"".join(p.read_bytes() for p in sorted(Path("/usr/share/doc").rglob("copyright"))[:2000])
    binary = b"".join(p.read_bytes() for p in sorted(Path("/usr/bin").iterdir())[:200] if p.is_file())
    rnd = random.Random(1).randbytes(32 * 1024 * 1024)
    print("cost (thread CPU time):")
    for name, data in (("text (/usr/share/doc)", text), ("binaries (/usr/bin)", binary), ("random", rnd)):
        _throughput(name, data[:32 * 1024 * 1024], CHUNK)
    _throughput("text, 1-byte keystrokes", text[:200_000], 1)
    _throughput("text, 100-byte terminal lines", text[:4_000_000], 100)

    print("false alarms:")
    for root in args.roots:
        files = _sample([root], args.limit_mb * 1024 * 1024)
        size, alarms, expected = 0, [], []
        for p in files:
            try:
                data = p.read_bytes()
            except OSError:
                continue
            size += len(data)
            for direction in (DEVICE, VENDOR):
                hit = _feed_all(data, direction)
                if hit:
                    (expected if p.suffix in _ARCHIVES else alarms).append(f"{p} ({direction}): {hit}")
        print(f"  {root}: {len(files)} files, {size / 1e6:.1f} MB, both directions: {len(alarms)} false alarms"
              f"{f', {len(expected)} archives recognised' if expected else ''}")
        for line in alarms[:20]:
            print("    " + line)
    hits = sum(1 for seed in range(64) if _feed_all(random.Random(seed).randbytes(1 << 20), DEVICE))
    print(f"  random: 64 MiB in 1 MiB streams: {hits} false alarms")


if __name__ == "__main__":
    main()
