"""Patient-data guard throughput: OutputScanner MB/s on random, text, base64 and tar; SFTP codec packets/s."""

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


def scan_rate(data: bytes, chunk: int) -> float:
    """MB/s of OutputScanner.feed over ``data`` in ``chunk``-byte pieces (asserts nothing is found)."""
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    scanner = OutputScanner()
    start = time.perf_counter()
    for c in chunks:
        if scanner.feed(c):
            raise AssertionError("benchmark data unexpectedly matched")
    return len(data) / (time.perf_counter() - start) / 1e6


def codec_rate(total: int, size: int) -> float:
    """MB/s of framing + parsing DATA replies of ``size`` bytes arriving in 32 KiB chunks."""
    pkt = frame(FXP_DATA, u32(1) + string(os.urandom(size)))
    stream = pkt * max(1, total // len(pkt))
    reader = PacketReader(max_len=4 * 1024 * 1024 + 1024)
    start = time.perf_counter()
    for i in range(0, len(stream), 32 * 1024):
        for p in reader.feed(stream[i:i + 32 * 1024]):
            parse_reply(p)
    return len(stream) / (time.perf_counter() - start) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="MiB of each data kind (default 256)")
    args = ap.parse_args()
    total = args.mib * 1024 * 1024
    kinds = {"random": os.urandom(total), "text": _text(total)}
    kinds["base64"] = base64.encodebytes(kinds["random"][: total * 3 // 4])[:total]
    kinds["tar"] = _tar(total)
    print(f"OutputScanner, {args.mib} MiB per kind, python {sys.version.split()[0]}")
    for name, data in kinds.items():
        rates = [f"{chunk // 1024:>4} KiB chunks {scan_rate(data, chunk):7.0f} MB/s" for chunk in (32768, 262144)]
        print(f"  {name:7} " + "   ".join(rates))
    for size in (32 * 1024, 255 * 1024):
        print(f"SFTP DATA framing+parse, {size // 1024} KiB replies: {codec_rate(total // 4, size):7.0f} MB/s")


if __name__ == "__main__":
    main()
