"""False alarms and opaque volume of the deep output scanner on this machine's files and on common commands.

For each corpus, every file is fed to a fresh DeepScanner as ``cat FILE`` output would be (32 KiB chunks),
with an opaque budget large enough never to trip: prints files, bytes, patient-data findings (should be
0) and how many bytes the opaque meter counted. Commands (``ps aux``, ``dmesg``, ...) are run here and
their output fed the same way. docs/data-protection.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sessions.decoders import DeepScanner  # noqa: E402
from sessions.entropy import OPAQUE, OpaqueBudget  # noqa: E402

COMMANDS = {
    "ps aux": "ps aux",
    "dmesg": "dmesg 2>/dev/null || true",
    "dpkg -l": "dpkg -l",
    "journalctl": "journalctl --no-pager -n 20000 2>/dev/null || true",
    "ls -lR /usr": "ls -lR /usr 2>/dev/null",
    "top -b -n 3": "top -b -n 3 -w 200 2>/dev/null || true",
    "cat /var/log/*.log": "cat /var/log/*.log 2>/dev/null || true",
    "zcat /usr/share/doc/*/changelog*.gz": "zcat /usr/share/doc/*/changelog*.gz 2>/dev/null | head -c 50000000",
}


def scan(data: bytes, chunk: int = 32 * 1024) -> tuple[str | None, int]:
    """(patient-data finding or None, opaque bytes counted) for one stream."""
    budget = OpaqueBudget(1 << 62)
    scanner = DeepScanner(budget)
    for i in range(0, len(data), chunk):
        hit = scanner.feed(data[i:i + chunk])
        if hit and hit != OPAQUE:
            return hit, budget.used
    return None, budget.used


def corpus(name: str, paths: list[Path], limit: int) -> None:
    files = total = opaque = 0
    alarms = []
    start = time.thread_time()
    for path in paths:
        try:
            data = path.read_bytes()[:limit]
        except OSError:
            continue
        hit, used = scan(data)
        files, total, opaque = files + 1, total + len(data), opaque + used
        if hit:
            alarms.append((str(path), hit))
    cpu = time.thread_time() - start
    print(f"{name:34} files {files:6}  MB {total / 1e6:8.1f}  patient-data alarms {len(alarms)}  "
          f"opaque MB {opaque / 1e6:7.2f} ({100 * opaque / max(total, 1):5.1f} %)  {total / 1e6 / max(cpu, 1e-9):6.0f} MB/s")
    for path, hit in alarms[:20]:
        print(f"    ALARM {hit}: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=64 << 20, help="bytes read per file (default 64 MiB)")
    ap.add_argument("--random-mib", type=int, default=64, help="MiB of random data (default 64)")
    args = ap.parse_args()
    docs = sorted(p for p in Path("/usr/share/doc").rglob("*") if p.is_file() and not p.is_symlink())
    corpus("/usr/share/doc (all files)", docs, args.limit)
    corpus("/usr/share/doc (not .gz)", [p for p in docs if p.suffix != ".gz"], args.limit)
    corpus("/usr/share/doc (.gz only)", [p for p in docs if p.suffix == ".gz"], args.limit)
    binaries = sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink())
    corpus("/usr/bin (cat of each binary)", binaries, args.limit)
    rnd = Path("/tmp") / f"content-false-alarms-{os.getpid()}.bin"
    try:
        rnd.write_bytes(os.urandom(args.random_mib << 20))
        corpus(f"random ({args.random_mib} MiB, one stream)", [rnd], 1 << 40)
    finally:
        rnd.unlink(missing_ok=True)
    for name, command in COMMANDS.items():
        out = subprocess.run(["sh", "-c", command], capture_output=True).stdout
        hit, used = scan(out)
        print(f"{name:34} MB {len(out) / 1e6:8.2f}  patient-data alarm {hit or 'none'}  opaque bytes {used}")


if __name__ == "__main__":
    main()
