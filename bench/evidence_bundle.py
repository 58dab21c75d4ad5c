"""Evidence bundle cost: export and offline verify of N real sessions (real sshd device, real ssh), small ones
and ones that printed M MiB each. Run: python -m bench.evidence_bundle [--sessions 20] [--mib 0 4]."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"} | {"PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True, text=True, env=env,
                       timeout=600)
    return time.monotonic() - started, r


def run(sessions: int, mib: int, tmp: Path) -> dict:
    from frontdoor_support import close_world, wait, world_with

    w = world_with(tmp / f"w{mib}")
    try:
        w.grant()
        command = (f"seq 1 100000000 | head -c {mib << 20}") if mib else "echo hello"
        for _ in range(sessions):
            r = w.ssh("alice@ct-01", command, timeout=300)
            assert r.returncode == 0, r.stderr
        assert wait(lambda: all(s["status"] != "live" and s["indexed_at"] for s in w.app.store.list_sessions()), 300)
    finally:
        close_world(w)
    home = w.app.home
    bundle = tmp / f"b{mib}.tar"
    took, r = _cli("--home", str(home), "evidence", "export", "--user", "alice", "-o", str(bundle), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    v_took, v = _cli("audit", "verify", "--bundle", str(bundle), "--json")
    assert v.returncode == 0, v.stderr
    from broker.evidence_verify import verify_bundle

    started = time.monotonic()
    assert verify_bundle(bundle).ok
    v_inner = time.monotonic() - started
    recorded = sum(p.stat().st_size for p in (home / "recordings").iterdir())
    return {"sessions": sessions, "mib_printed_each": mib, "recordings_bytes": recorded, "bundle_bytes": doc["bytes"],
            "audit_rows": doc["audit_rows"], "export_inner_s": doc["seconds"], "export_process_s": round(took, 2),
            "verify_inner_s": round(v_inner, 3), "verify_process_s": round(v_took, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--mib", type=int, nargs="+", default=[0, 4])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for mib in args.mib:
            print(json.dumps(run(args.sessions, mib, Path(d))))


if __name__ == "__main__":
    main()
