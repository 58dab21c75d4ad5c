"""``python -m bench.ha``: two nodes behind HAProxy against one, with the recording journal on PostgreSQL or off.

The cluster is the one scripts/cluster-demo.sh starts (scripts/cluster_demo.py: PostgreSQL with fsync on,
Swift, HAProxy, ``medbroker serve --node-id node-a|node-b`` on one home, a real sshd device), in the same run:

- ``1 node``: node-b stopped (HAProxy marks it DOWN), every vendor lands on node-a;
- ``2 nodes``: both up; vendors come from many loopback addresses (``balance source`` hashes them), chosen so
  that each node gets the same number;

each with ``[recording] journal = false`` and ``true`` (nodes restarted in between). Per combination:

- keystroke round trips (bench/loadgen.py: N interactive PTY sessions, one key every ``--interval``, echo
  checked) at each ``--levels`` concurrency: p50 / p99 in ms, errors;
- bulk: ``head -c MIB /dev/zero`` through an exec channel, one stream, and (2 nodes) one stream per node at
  once: MB/s summed.

The archive pass is put off (``[archive] interval = "1h"``) so uploads do not run inside the measurements.
The machine is shared: the 1-minute load average is printed beside every number. ``--json FILE`` writes
everything (bench/results/ha.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO)]

from bench.concurrency import _Lines  # noqa: E402
from bench.world import _raise_nofile  # noqa: E402
from cluster_demo import Cluster  # noqa: E402

NODES = ("node-a", "node-b")


def load() -> float:
    return round(os.getloadavg()[0], 1)


def _ssh(cluster: Cluster, source: str, command: str) -> subprocess.Popen:
    argv = ["ssh", "-F", str(cluster.state / "ssh_config"), "-o", f"BindAddress={source}", "alice@ct-01@broker",
            command]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ok(proc: subprocess.Popen, timeout: float) -> None:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ssh exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")


def assign(cluster: Cluster, candidates: list[str]) -> dict[str, str]:
    """{source address: node} as HAProxy's source hash places them (one `true` session per address)."""
    store = cluster.world.app.store
    for addr in candidates:
        _wait_ok(_ssh(cluster, addr, "true"), 30)
    rows = store.query("SELECT source, node_id FROM sessions WHERE source IN (%s)" % ",".join("?" * len(candidates)),
                       tuple(candidates))
    return {r["source"]: r["node_id"] for r in rows}


def bulk(cluster: Cluster, sources: list[str], mib: int) -> dict:
    """One ``head -c`` download per source at once; MB/s summed over them."""
    t0 = time.perf_counter()
    procs = [_ssh(cluster, s, f"head -c {mib << 20} /dev/zero") for s in sources]
    for p in procs:
        _wait_ok(p, 600)
    took = time.perf_counter() - t0
    return {"streams": len(sources), "mib_each": mib, "seconds": round(took, 2),
            "mbs": round(len(sources) * mib * 1.048576 / took, 1), "load": load()}


def keystrokes(cluster: Cluster, sessions: int, duration_s: float, interval_s: float, sources: list[str]) -> dict:
    assert cluster.haproxy is not None
    spec = {"sessions": sessions, "duration_s": duration_s, "interval_s": interval_s, "ramp_concurrency": 8,
            "known_hosts": str(cluster.state / "known_hosts"), "key": str(cluster.state / "people" / "alice"),
            "port": cluster.haproxy.port, "user": "alice@ct-01", "local_addrs": sources}
    spec_path = cluster.state / f"loadgen-{sessions}.json"
    spec_path.write_text(json.dumps(spec))
    err_path = cluster.state / f"loadgen-{sessions}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(spec_path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, cwd=REPO, start_new_session=True,
                                preexec_fn=_raise_nofile)
    assert proc.stdin is not None
    try:
        lines = _Lines(proc)
        ready = lines.wait_for("ready", time.monotonic() + 120 + sessions)
        load_before = load()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        lines.wait_for("measured", time.monotonic() + duration_s + 120)
        load_after = load()
        proc.stdin.write(b"close\n")
        proc.stdin.flush()
        done = lines.wait_for("done", time.monotonic() + 180)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rtt = done["rtt_ms"]
    return {"sessions": sessions, "connected": ready["connected"], "setup_errors": ready["setup_errors"],
            "keystrokes": done["keystrokes"], "p50_ms": round(rtt["50"], 2) if rtt["50"] is not None else None,
            "p99_ms": round(rtt["99"], 2) if rtt["99"] is not None else None, "errors": done["errors"],
            "error_samples": done["error_samples"][:3], "load": [load_before, load_after]}


def restart_nodes(cluster: Cluster, names: tuple[str, ...]) -> None:
    assert cluster.haproxy is not None
    for node in cluster.nodes.values():
        node.stop()
    for name in names:
        cluster.nodes[name].start()
    cluster.haproxy.wait_state({n: ("UP" if n in names else "DOWN") for n in NODES}, timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="10,40,80", help="concurrent interactive sessions, comma-separated")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of typing per level")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between one session's keys")
    ap.add_argument("--mib", type=int, default=64, help="bulk download size per stream")
    ap.add_argument("--reverse", action="store_true",
                    help="journal on before off, two nodes before one (a second run against drift in the load)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "ha.json")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    parent = Path(tempfile.mkdtemp(prefix="medbroker-bench-ha-", dir="/tmp"))
    parent.chmod(0o755)
    cluster = Cluster(parent / "state", archive_interval="1h", durable_pg=True)
    results: dict = {"levels": levels, "duration_s": args.duration, "interval_s": args.interval,
                     "cpus": os.cpu_count(), "runs": []}
    try:
        cluster.start(log)
        candidates = [f"127.0.3.{i}" for i in range(1, 25)]
        placed = assign(cluster, candidates)
        per_node = {n: [a for a in candidates if placed.get(a) == n] for n in NODES}
        even = min(len(v) for v in per_node.values())
        if even == 0:
            raise RuntimeError(f"every probe address landed on one node: {placed}")
        both = [a for pair in zip(per_node["node-a"][:even], per_node["node-b"][:even]) for a in pair]
        log(f"{even} addresses per node: {both}")
        results["sources"] = {"node-a": per_node["node-a"][:even], "node-b": per_node["node-b"][:even]}
        combos = [(journal, names) for journal in (False, True) for names in (("node-a",), NODES)]
        for journal, names in reversed(combos) if args.reverse else combos:
            cluster.journal = journal
            cluster.write_config()
            restart_nodes(cluster, names)
            sources = both if len(names) == 2 else per_node["node-a"][:even]
            run: dict = {"journal": journal, "nodes": len(names)}
            log(f"journal {'on' if journal else 'off'}, {len(names)} node(s): bulk ...")
            run["bulk_1"] = bulk(cluster, sources[:1], args.mib)
            if len(names) == 2:
                run["bulk_2"] = bulk(cluster, both[:2], args.mib)  # one stream on each node
            else:
                run["bulk_2"] = bulk(cluster, sources[:2], args.mib)  # two streams on the one node
            run["keys"] = []
            for level in levels:
                got = keystrokes(cluster, level, args.duration, args.interval, sources)
                log(f"  x{level}: p50 {got['p50_ms']} ms p99 {got['p99_ms']} ms errors {got['errors']} "
                    f"load {got['load']}")
                run["keys"].append(got)
            log(f"  bulk 1 stream {run['bulk_1']['mbs']} MB/s, 2 streams {run['bulk_2']['mbs']} MB/s")
            results["runs"].append(run)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"{'journal':8} {'nodes':5} {'bulk 1 MB/s':>12} {'bulk 2 MB/s':>12}  keystrokes p50/p99 ms per level")
        for run in results["runs"]:
            keys = "  ".join(f"x{k['sessions']}: {k['p50_ms']}/{k['p99_ms']} (load {k['load'][1]})"
                             for k in run["keys"])
            print(f"{'on' if run['journal'] else 'off':8} {run['nodes']:5} {run['bulk_1']['mbs']:12} "
                  f"{run['bulk_2']['mbs']:12}  {keys}")
        return 0
    finally:
        cluster.stop()
        import shutil

        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
