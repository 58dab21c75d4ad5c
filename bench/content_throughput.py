"""Patient-data guard cost: OutputScanner and DeepScanner MB/s per data kind and µs per small feed; SFTP codec MB/s.

``--scanner deep`` (default) measures what the broker runs on shell/exec output (sessions/decoders.py,
with the opaque-output budget metering but no limit), ``--scanner base`` the signature scanner alone.

Times are the thread's CPU time (time.thread_time), so other load on a shared machine inflates them
less than wall-clock time would; --repeat N reports the best of N runs.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sessions.content import OutputScanner  # noqa: E402
from sessions.decoders import DeepScanner  # noqa: E402
from sessions.entropy import OpaqueBudget  # noqa: E402

SCANNERS = {"base": OutputScanner, "deep": lambda: DeepScanner(OpaqueBudget(1 << 62))}
make_scanner = SCANNERS["deep"]
from sessions.sftp_codec import FXP_DATA, PacketReader, frame, parse_reply, string, u32  # noqa: E402


def _text(total: int) -> bytes:
    """Real documentation text from this machine, repeated up to ``total`` bytes."""
    parts, size = [], 0
    for p in sorted(Path("/usr/share/doc").rglob("copyright")):
        data = p.read_bytes()
        parts.append(data)
        size += len(data)
        if size > 16 * 1024 * 1024:
            break
    blob = b"".join(parts) or b"the quick brown fox jumps over the lazy dog\n"
    return (blob * (total // len(blob) + 1))[:total]


def _tar(total: int) -> bytes:
    buf, rnd, n = io.BytesIO(), random.Random(1), 0
    with tarfile.open(fileobj=buf, mode="w") as tar:
        while buf.tell() < total:
            data = rnd.randbytes(rnd.randint(1000, 200_000))
            info = tarfile.TarInfo(f"logs/file{n}.bin")
            info.size, n = len(data), n + 1
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()[:total]


def _hexdump(data: bytes) -> bytes:
    """``xxd``-style dump of ``data`` (offset, eight 2-byte groups, ASCII column), built here."""
    lines = []
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        groups = " ".join(row[k:k + 2].hex() for k in range(0, 16, 2))
        text = row.translate(_DOTS).decode("ascii")
        lines.append(f"{off:08x}: {groups:<39}  {text}\n")
    return "".join(lines).encode()


_DOTS = bytes(b if 0x20 <= b < 0x7F else 0x2E for b in range(256))


def _shell(total: int) -> bytes:
    """Interactive shell output: prompts, commands and ``ls``-like listings."""
    rnd, lines, size = random.Random(7), [], 0
    while size < total:
        line = (b"svc@ct-01:~$ ls -l /var/log/device\r\n" if rnd.random() < 0.1 else
                b"-rw-r--r-- 1 svc svc %7d Nov 28 12:%02d service-%04d.log\r\n"
                % (rnd.randint(1, 9_999_999), rnd.randint(0, 59), rnd.randint(0, 9999)))
        lines.append(line)
        size += len(line)
    return b"".join(lines)[:total]


def feed_cost(data: bytes, chunk: int) -> float:
    """µs per OutputScanner.feed of ``chunk``-byte pieces of ``data`` (asserts nothing is found)."""
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    scanner = make_scanner()
    start = time.thread_time()
    for c in chunks:
        if scanner.feed(c):
            raise AssertionError("benchmark data unexpectedly matched")
    return (time.thread_time() - start) / len(chunks) * 1e6


def scan_rate(data: bytes, chunk: int) -> float:
    """MB/s of OutputScanner.feed over ``data`` in ``chunk``-byte pieces (asserts nothing is found)."""
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    scanner = make_scanner()
    start = time.thread_time()
    for c in chunks:
        if scanner.feed(c):
            raise AssertionError("benchmark data unexpectedly matched")
    return len(data) / (time.thread_time() - start) / 1e6


def codec_rate(total: int, size: int) -> float:
    """MB/s of framing + parsing DATA replies of ``size`` bytes arriving in 32 KiB chunks."""
    pkt = frame(FXP_DATA, u32(1) + string(os.urandom(size)))
    stream = pkt * max(1, total // len(pkt))
    reader = PacketReader(max_len=4 * 1024 * 1024 + 1024)
    start = time.thread_time()
    for i in range(0, len(stream), 32 * 1024):
        for p in reader.feed(stream[i:i + 32 * 1024]):
            parse_reply(p)
    return len(stream) / (time.thread_time() - start) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="MiB of each data kind (default 256)")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of this many runs (default 1)")
    ap.add_argument("--scanner", choices=sorted(SCANNERS), default="deep", help="which scanner (default deep)")
    args = ap.parse_args()
    global make_scanner
    make_scanner = SCANNERS[args.scanner]
    best = range(max(1, args.repeat))
    total = args.mib * 1024 * 1024
    kinds = {"random": os.urandom(total), "text": _text(total)}
    kinds["base64"] = base64.encodebytes(kinds["random"][: total * 3 // 4])[:total]
    kinds["hexdump"] = _hexdump(kinds["random"][: total // 4])[:total]
    kinds["hex"] = kinds["random"][: total // 2].hex().encode()
    kinds["tar"] = _tar(total)
    kinds["shell"] = _shell(total)
    from bench.world import device_log  # what the bench's exec downloads read (issue 16)
    kinds["devlog"] = b"".join(device_log(total))
    print(f"{args.scanner} scanner, {args.mib} MiB per kind, best of {len(best)}, python {sys.version.split()[0]}")
    for name, data in kinds.items():
        rates = [f"{chunk // 1024:>4} KiB chunks {max(scan_rate(data, chunk) for _ in best):7.0f} MB/s"
                 for chunk in (32768, 262144)]
        print(f"  {name:7} " + "   ".join(rates))
    shell = _shell(min(total, 4 * 1024 * 1024))
    small = {"shell": shell, "random": kinds["random"][:len(shell)], "base64": kinds["base64"][:len(shell)]}
    print(f"{args.scanner} scanner, µs per feed of small chunks (keystroke echo, short output)")
    for name, data in small.items():
        costs = [f"{chunk:>4} B {min(feed_cost(data[:chunk * 100_000], chunk) for _ in best):6.2f} µs"
                 for chunk in (1, 16, 256, 4096)]
        print(f"  {name:7} " + "   ".join(costs))
    for size in (32 * 1024, 255 * 1024):
        print(f"SFTP DATA framing+parse, {size // 1024} KiB replies: {codec_rate(total // 4, size):7.0f} MB/s")


if __name__ == "__main__":
    main()
