"""Cost of the acknowledgment rule in isolation: an event loop appends like the relay (32 KiB units, or
256 KiB SFTP-sized units) and stops at ``on_pause`` until ``on_resume``; the old 8 MiB backlog vs the 256 KiB
window (docs/recording-format.md, "The acknowledgment rule"). Reports MB/s (wall) and CPU s per GiB."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.clock import SystemClock  # noqa: E402
from sessions.recwriter import RecordingWriter  # noqa: E402
from sessions.recwriter import ACK_WINDOW  # noqa: E402


async def _run(directory: Path, total: int, unit: int, window: int | None, encrypted: bool) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    go.set()
    path = directory / "ack.mbr"
    key = os.urandom(32) if encrypted else None
    w = RecordingWriter(path, {"session_id": "ack"}, clock=SystemClock(), aead_key=key,
                        key_id="k1" if encrypted else None, window=window,
                        on_pause=go.clear, on_resume=lambda: loop.call_soon_threadsafe(go.set))
    if unit > 32 << 10:
        w.expect_unit(unit)
    data = os.urandom(unit)
    pauses = worst = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(total // unit):
        if not go.is_set():
            pauses += 1
            await go.wait()
        w.append_data(1, "output", data)  # "forwarded" right after, like RelaySession.from_device
        worst = max(worst, w.pending_bytes)
        if i % 8 == 7:
            await asyncio.sleep(0)  # the loop also serves sockets
    await asyncio.to_thread(w.drain)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    w.close()
    path.unlink()
    return {"mb_s": total / wall / 1e6, "cpu_s_per_gib": cpu * (1 << 30) / total, "pauses": pauses,
            "worst_unwritten_kib": worst / 1024}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir on /dev/shm if present)")
    a = p.parse_args(argv)
    base = a.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    with tempfile.TemporaryDirectory(dir=base) as d:
        for encrypted in (False, True):
            for unit in (32 << 10, 256 << 10):
                for label, window in (("8 MiB backlog", None), ("256 KiB window", ACK_WINDOW)):
                    runs = [asyncio.run(_run(Path(d), a.mib << 20, unit, window, encrypted)) for _ in range(a.repeat)]
                    best = max(runs, key=lambda r: r["mb_s"])
                    print(f"{'AES-GCM' if encrypted else 'clear  '} unit {unit >> 10:3} KiB {label:15}: "
                          + ", ".join(f"{r['mb_s']:.0f}" for r in runs) + " MB/s; "
                          + f"CPU {min(r['cpu_s_per_gib'] for r in runs):.2f} s/GiB (best); "
                          + f"{best['pauses']} pauses; most unwritten {max(r['worst_unwritten_kib'] for r in runs):.0f} KiB",
                          flush=True)


if __name__ == "__main__":
    main()
