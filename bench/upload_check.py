"""Upload-check cost (sessions/upload_check.py): MB/s per data kind, in 32 KiB feeds, lazy and eager.

Times are the thread's CPU time (time.thread_time); --repeat N reports the best of N runs. With
ansible-core installed, --ansible also times the real AnsiballZ wrappers of a few modules.
Run: python3 bench/upload_check.py [--size MiB] [--repeat N] [--ansible]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sessions.policy import ProtectedPaths, load_protected_paths  # noqa: E402
from sessions.upload_check import UploadJudge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTECTED = ProtectedPaths.build("bench", ["/srv/dev/data/dicom", "/srv/dev/var/spool/hl7", "/srv/dev/opt/lis/data"],
                                 load_protected_paths(ROOT / "config" / "protected-paths.toml"))


def _docs(total: int) -> bytes:
    parts, size = [], 0
    for p in sorted(Path("/usr/share/doc").rglob("copyright")):
        parts.append(p.read_bytes())
        size += len(parts[-1])
        if size > total:
            break
    blob = b"".join(parts) or b"the quick brown fox\n"
    return (blob * (total // len(blob) + 1))[:total]


def _time(data: bytes, eager: bool, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        judge = UploadJudge(PROTECTED, "/srv/dev", eager=eager)
        start = time.thread_time()
        for i in range(0, len(data), 32768):
            judge.feed(data[i:i + 32768])
        judge.finish()
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8, help="MiB per data kind")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ansible", action="store_true", help="also time real AnsiballZ wrappers")
    args = ap.parse_args()
    n = args.size << 20
    kinds = {"random": os.urandom(n), "base64 (wrapped)": base64.encodebytes(os.urandom(n * 3 // 4)),
             "hex": os.urandom(n // 2).hex().encode(), "text (/usr/share/doc)": _docs(n),
             "gzip of text": gzip.compress(_docs(n))}
    if args.ansible:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers.ansible import build_module_payloads

        with tempfile.TemporaryDirectory() as tmp:
            wrappers = build_module_payloads(Path(tmp), [("setup", {}), ("command", {"cmd": "uptime"}),
                                                         ("lineinfile", {"path": "/tmp/x", "line": "a"})])
        kinds.update({f"AnsiballZ_{k}.py": v for k, v in wrappers.items()})
    print(f"{'kind':28} {'bytes':>10} {'lazy MB/s':>10} {'eager MB/s':>11} {'lazy ms':>8}")
    for name, data in kinds.items():
        lazy, eager = _time(data, False, args.repeat), _time(data, True, args.repeat)
        print(f"{name:28} {len(data):>10} {len(data) / lazy / 1e6:>10.1f} {len(data) / eager / 1e6:>11.1f} "
              f"{lazy * 1000:>8.1f}")


if __name__ == "__main__":
    main()
