"""Cost of ``[recording] journal`` (issue 13) through a real broker: bulk MB/s (``ssh cat BLOB``) and keystroke
round trips (p50/p99) with the journal off and on, SQLite store, alternating per round on one broker process.

Run: ``python3 -m bench.journal_cost --mib 32 --keys 300 --rounds 3`` (as root, like ``python -m bench``: it
builds the same BenchWorld, a real sshd device and ``medbroker serve``, and restarts the broker between modes).
``--writer-only`` measures the writer alone (an event loop appending 32 KiB units under the acknowledgment
window, like bench/ack_window.py), journal off and on, without SSH: the journal's own cost, less noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import clients  # noqa: E402
from bench.world import BenchWorld  # noqa: E402


def _set_journal(home: Path, on: bool) -> None:
    path = home / "broker.toml"
    text = re.sub(r"(?m)^journal = (true|false)\n", "", path.read_text())
    text, n = re.subn(r"(?m)^\[recording\]\n", f"[recording]\njournal = {'true' if on else 'false'}\n", text)
    assert n == 1, "bench/broker.toml must contain a [recording] section"
    path.write_text(text)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def _writer_run(directory: Path, total: int, journal: bool) -> dict[str, float]:
    from broker.clock import SystemClock
    from broker.journal import JournalSink
    from broker.store import open_store
    from sessions.recwriter import ACK_WINDOW, RecordingWriter

    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    go.set()
    db = directory / "journal.db"
    open_store(db).close()
    store = open_store(db, migrate=False)
    sink = JournalSink(store, "bench", SystemClock(), 10) if journal else None
    path = directory / "bench.mbr"
    w = RecordingWriter(path, {"session_id": "bench"}, clock=SystemClock(), aead_key=os.urandom(32), key_id="k1",
                        window=ACK_WINDOW, journal=sink, on_pause=go.clear,
                        on_resume=lambda: loop.call_soon_threadsafe(go.set))
    data = os.urandom(32 << 10)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(total // len(data)):
        if not go.is_set():
            await go.wait()
        w.append_data(1, "output", data)
        if i % 8 == 7:
            await asyncio.sleep(0)
    await asyncio.to_thread(w.drain)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    w.close()
    rows = store.journal_backlog()
    store.close()
    path.unlink()
    for f in directory.glob("journal.db*"):
        f.unlink()
    return {"mb_s": total / wall / 1e6, "cpu_s_per_gib": cpu * (1 << 30) / total,
            "journal_rows": rows[0]["rows"] if rows else 0}


def writer_only(mib: int, rounds: int) -> int:
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="medbroker-journal-bench-") as tmp:
        for rnd in range(rounds):
            for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
                r = asyncio.run(_writer_run(Path(tmp), mib << 20, mode == "on"))
                results[mode].append(r)
                print(f"round {rnd + 1} journal {mode:3}: {r['mb_s']:.1f} MB/s, {r['cpu_s_per_gib']:.2f} CPU s/GiB, "
                      f"{r['journal_rows']:.0f} journal rows (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    print(f"journal | writer MB/s (median of {rounds}) | CPU s per GiB")
    for mode in ("off", "on"):
        print(f"{mode:7} | {_pct([r['mb_s'] for r in results[mode]], 0.5):.1f} | "
              f"{_pct([r['cpu_s_per_gib'] for r in results[mode]], 0.5):.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=32, help="bulk payload in MiB (default 32)")
    p.add_argument("--keys", type=int, default=300, help="keystrokes per mode per round (default 300)")
    p.add_argument("--key-gap-ms", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the raw samples here")
    p.add_argument("--writer-only", action="store_true", help="measure the writer alone (no SSH, no broker)")
    a = p.parse_args(argv)
    if a.writer_only:
        return writer_only(a.mib, a.rounds)
    world = BenchWorld(blob_mib=a.mib, log=lambda m: print(m, file=sys.stderr)).start()
    samples: dict[str, dict[str, list[float]]] = {m: {"bulk": [], "rtt": []} for m in ("off", "on")}
    try:
        broker = world.brokers["medbroker"]
        # The blob is random bytes: the opaque-output guard would (rightly) end the session after 64 KiB. The
        # recording path is what is measured here, so the guard is switched off for this broker.
        with open(broker.home / "broker.toml", "a") as fh:
            fh.write('\n[policy]\nmax_opaque_output = "0"\n')
        for rnd in range(a.rounds):
            for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
                _set_journal(broker.home, mode == "on")
                broker.restart()
                bulk = clients.bulk_download(world, "medbroker", 60 + a.mib * 2)
                keys = clients.keystrokes(world, "medbroker", a.keys, a.key_gap_ms / 1000, 120)
                if not (bulk.ok and keys.ok):
                    print(f"round {rnd + 1} journal {mode}: bulk {bulk.error or bulk.refused}, "
                          f"keys {keys.error or keys.refused}", file=sys.stderr)
                    return 1
                samples[mode]["bulk"].append(bulk.value)
                samples[mode]["rtt"] += keys.extra["rtt_ms"]
                print(f"round {rnd + 1} journal {mode:3}: bulk {bulk.value:6.1f} MB/s, keystroke p50 "
                      f"{_pct(keys.extra['rtt_ms'], 0.5):.2f} ms p99 {_pct(keys.extra['rtt_ms'], 0.99):.2f} ms "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
                broker.clear_recordings(older_than_s=0)
    finally:
        world.close()
    print(f"journal | bulk MB/s (median of {a.rounds}) | keystroke p50 ms | p99 ms | keystrokes")
    for mode in ("off", "on"):
        s = samples[mode]
        print(f"{mode:7} | {_pct(s['bulk'], 0.5):6.1f} | {_pct(s['rtt'], 0.5):.2f} | {_pct(s['rtt'], 0.99):.2f} | "
              f"{len(s['rtt'])}")
    if a.json:
        Path(a.json).write_text(json.dumps(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
