"""Archive throughput: a 100 MiB recording to a local OpenStack Swift (s3api), and the resume after a kill.

    python3 bench/archive_throughput.py [--mib 100] [--rounds 3] [--part-size 16MiB]

Starts the same Swift the tests use (tests/helpers/swift.py: one replica, one device, everything on loopback),
writes signed recordings with the broker's RecordingWriter, and times ``archive_pass`` per recording: SHA-256 of
the local file, the multipart upload (Content-MD5 per part) and the read-back SHA-256 of the whole object. The
read-back alone is timed too, so the cost of verifying is visible. Then one upload is cut off by SIGKILLing
every Swift server after a few parts, Swift restarted, and the next pass timed (parts reused, seconds).
Numbers are MB/s = 10^6 bytes per second of recording size. Prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from broker.archive import archive_pass  # noqa: E402
from broker.config import parse_size  # noqa: E402
from helpers.swift import Swift  # noqa: E402
from staff_support import make_staff_home  # noqa: E402


def script(mib: int) -> list:
    block = os.urandom(256 * 1024)
    return [(0, "shell", 1, {})] + [(0.001, "output", 1, block[i % 7:] + block[:i % 7]) for i in range(mib * 4)]


def parts_stored(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM archive_upload_parts").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--part-size", default="16MiB")
    args = ap.parse_args()
    swift = Swift()
    tmp = Path(tempfile.mkdtemp(prefix="medbroker-archive-bench-"))
    try:
        bucket = swift.create_bucket(f"bench-{uuid.uuid4().hex[:12]}")
        (tmp / "keys").mkdir()
        h = make_staff_home(tmp, swift.config(tmp / "keys", bucket, "bench/", part_size=f'"{args.part_size}"'))
        g = h.grant()
        rounds = []
        for i in range(args.rounds):
            row = h.record_session(f"20261207-0000{i:02d}-bench{i}", script(args.mib), grant_id=g.id, encrypt=True,
                                   index=False)
            size = Path(row["recording"]).stat().st_size
            t0 = time.perf_counter()
            [res] = archive_pass(h.app)
            total = time.perf_counter() - t0
            assert res.state == "archived", res
            t1 = time.perf_counter()
            h.app.recordings.objects.read_back(res.key)  # type: ignore[attr-defined]
            read_back = time.perf_counter() - t1
            rounds.append({"bytes": size, "pass_s": total, "pass_MBps": size / total / 1e6,
                           "read_back_s": read_back, "read_back_MBps": size / read_back / 1e6, "parts": res.parts})
        # resume after a kill: a separate process uploads, Swift is SIGKILLed after 3 parts, restarted, resumed
        row = h.record_session("20261207-010000-killed", script(args.mib), grant_id=g.id, encrypt=True, index=False)
        size = Path(row["recording"]).stat().st_size
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "--home", str(h.path), "archive", "run",
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 120
        while parts_stored(h.path / "medbroker.db") < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        swift.kill()
        proc.communicate(timeout=120)
        killed_rc = proc.returncode
        t_restart = time.perf_counter()
        swift.start()
        restart_s = time.perf_counter() - t_restart
        t0 = time.perf_counter()
        [res] = archive_pass(h.app)
        resume_s = time.perf_counter() - t0
        h.close()
        part = parse_size(args.part_size)
        doc = {"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
               "mib": args.mib, "part_size": args.part_size, "rounds": rounds,
               "median_pass_MBps": statistics.median(r["pass_MBps"] for r in rounds),
               "median_read_back_MBps": statistics.median(r["read_back_MBps"] for r in rounds),
               "resume": {"bytes": size, "first_pass_exit": killed_rc, "swift_restart_s": restart_s,
                          "state": res.state, "parts": res.parts, "parts_reused": res.parts_reused,
                          "resume_pass_s": resume_s, "bytes_resent": size - res.parts_reused * part}}
        print(json.dumps(doc, indent=2))
        print(f"\n| {args.mib} MiB recording, parts {args.part_size} | value |\n|---|---|")
        print(f"| archive pass (hash + upload + read-back verify), median of {args.rounds} | "
              f"{doc['median_pass_MBps']:.1f} MB/s |")
        print(f"| read-back SHA-256 alone | {doc['median_read_back_MBps']:.1f} MB/s |")
        print(f"| resume after SIGKILL of Swift | {res.parts_reused} of {res.parts} parts reused, "
              f"{resume_s:.2f} s to finish and verify (Swift restart {restart_s:.1f} s) |")
    finally:
        swift.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
