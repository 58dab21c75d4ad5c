"""``python -m bench``: direct vs ProxyJump vs ProxyJump AES-GCM vs the bare asyncssh relay vs medbroker,
interleaved, in one run.

Phases: interleaved rounds (bulk exec, SFTP, scp, keystrokes, setup), concurrency levels (load generator
process), then a py-spy profile of the broker. Writes ``bench/results/<date>-<mode>.json`` and regenerates
``bench/RESULTS.md`` (``--quick`` runs go to ``bench/work/`` unless ``--save``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from bench import clients
from bench.concurrency import run_level
from bench.profiling import Spy, summarize_collapsed
from bench.report import LABELS, render_markdown, summarize
from bench.sysinfo import child_pids, cpu_seconds, machine_facts, our_cpu_jiffies, system_busy
from bench.world import BENCH, REPO, BenchWorld, code_fingerprint

__all__ = ["Plan", "QUICK", "FULL", "main"]

ROUND_METRICS = ("bulk_download", "bulk_upload", "sftp_get", "sftp_put", "scp_get", "scp_put", "keystroke", "setup")
GROUPS = {"bulk": ("bulk_download", "bulk_upload"), "sftp": ("sftp_get", "sftp_put"), "scp": ("scp_get", "scp_put"),
          "keys": ("keystroke",), "setup": ("setup",)}


@dataclass(frozen=True)
class Plan:
    """Sizes, counts and durations of one run."""

    mode: str
    blob_mib: int
    rounds: int
    keys_per_round: int
    key_gap_ms: float
    setups_per_round: int
    levels: tuple[int, ...]
    load_duration_s: float
    load_interval_ms: float
    load_paths: tuple[str, ...]
    profile_transfers: int
    profile_sessions: int
    settle_max_s: float
    only: tuple[str, ...] = ("bulk", "sftp", "scp", "keys", "setup", "load", "interference", "profile")


QUICK = Plan("quick", blob_mib=32, rounds=2, keys_per_round=100, key_gap_ms=5, setups_per_round=2, levels=(50,),
             load_duration_s=8, load_interval_ms=100, load_paths=("direct", "bare", "medbroker"), profile_transfers=1,
             profile_sessions=0, settle_max_s=120)
FULL = Plan("full", blob_mib=256, rounds=5, keys_per_round=500, key_gap_ms=5, setups_per_round=4,
            levels=(50, 200, 500), load_duration_s=30, load_interval_ms=100,
            load_paths=("direct", "proxyjump", "bare", "medbroker", "medbroker-2w"), profile_transfers=2,
            profile_sessions=200,
            settle_max_s=600)


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def _rotate(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def _busy_threads(pid: int) -> int:
    """Threads of ``pid`` running or in uninterruptible I/O (fsync) right now, plus its living indexer
    child processes (the post-session search index is built in one: its work is the broker's work).
    Worker processes of a multi-worker broker are children too, and do not count."""
    n = 0
    for child in child_pids(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                n += b"broker.indexer" in fh.read()
        except OSError:
            continue
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return n
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                text = fh.read()
        except OSError:
            continue
        if text[text.rindex(")") + 2] in "RD":
            n += 1
    return n


def _settle(world: BenchWorld, max_s: float, quiet_needed: int = 5) -> dict:
    """Wait until every broker is idle: 5 consecutive 0.1 s windows under 5 % CPU with no thread running or
    in disk I/O (closing a recording fsyncs, then the search index is built). Returns the CPU used meanwhile."""
    out = {}
    for b in world.brokers.values():
        if b.proc is None:
            continue
        t0, c0 = time.monotonic(), cpu_seconds(b.pid, reaped_children=True) or 0.0
        quiet, last = 0, c0
        while quiet < quiet_needed and time.monotonic() - t0 < max_s:
            time.sleep(0.1)
            now = cpu_seconds(b.pid, reaped_children=True)
            if now is None:
                break
            quiet = quiet + 1 if now - last < 0.005 and _busy_threads(b.pid) == 0 else 0
            last = now
        out[b.name] = {"cpu_s": last - c0, "wait_s": time.monotonic() - t0,
                       "timed_out": time.monotonic() - t0 >= max_s}
    return out


def _other_pct(sys0, ours0: int) -> float:
    """CPU other work on the machine used since (sys0, ours0), in % of one core."""
    sys1, ours1 = system_busy(), our_cpu_jiffies()
    total = max(1, sys1.total - sys0.total)
    return max(0.0, (sys1.busy - sys0.busy - (ours1 - ours0)) / total * 100 * (os.cpu_count() or 1))


def _measure(world: BenchWorld, plan: Plan, metric: str, path: str, rnd: int) -> dict:
    timeout = 60 + plan.blob_mib * 1.5
    fns = {
        "bulk_download": lambda: clients.bulk_download(world, path, timeout),
        "bulk_upload": lambda: clients.bulk_upload(world, path, timeout),
        "sftp_get": lambda: clients.sftp_transfer(world, path, "get", timeout),
        "sftp_put": lambda: clients.sftp_transfer(world, path, "put", timeout),
        "scp_get": lambda: clients.scp_transfer(world, path, "get", timeout),
        "scp_put": lambda: clients.scp_transfer(world, path, "put", timeout),
        "keystroke": lambda: clients.keystrokes(world, path, plan.keys_per_round, plan.key_gap_ms / 1000, 120),
        "setup": lambda: clients.setup_time(world, path, 60),
    }
    _settle(world, plan.settle_max_s)
    broker = world.brokers.get(path)
    cpu0 = cpu_seconds(broker.pid, reaped_children=True) if broker else None
    sys0, ours0 = system_busy(), our_cpu_jiffies()
    s = fns[metric]()
    s.extra["other_cpu_pct"] = _other_pct(sys0, ours0)
    if broker is not None:
        s.extra["broker_cpu_s"] = (cpu_seconds(broker.pid, reaped_children=True) or 0.0) - (cpu0 or 0.0)
        after = _settle(world, plan.settle_max_s).get(broker.name, {})
        s.extra["post_session_cpu_s"] = after.get("cpu_s")
        s.extra["post_session_wait_s"] = after.get("wait_s")
    if metric.startswith(("bulk", "sftp", "scp")):
        s.extra["bytes"] = world.blob_size
    return {"metric": metric, "path": path, "round": rnd, "ok": s.ok, "value": s.value, "error": s.error,
            "refused": s.refused, "extra": s.extra}


def _show(rec: dict) -> str:
    if rec["ok"]:
        unit = "ms" if rec["metric"].startswith(("keystroke", "setup")) else "MB/s"
        extra = ""
        if rec["extra"].get("post_session_cpu_s"):
            extra = f" (broker after-session CPU {rec['extra']['post_session_cpu_s']:.1f} s)"
        return f"{rec['value']:.2f} {unit}{extra}"
    return f"not available yet ({rec['refused']})" if rec["refused"] else f"ERROR {rec['error']}"


def run_rounds(world: BenchWorld, plan: Plan, result: dict) -> None:
    """Round-robin over paths for every metric; the starting path rotates each round."""
    paths = [p for p in ("direct", "proxyjump", "proxyjump-gcm", "bare", "medbroker")]
    metrics = [m for g in plan.only if g in GROUPS for m in GROUPS[g]]
    metrics = [m for m in ROUND_METRICS if m in metrics]
    for rnd in range(1, plan.rounds + 1):
        for b in world.brokers.values():
            b.clear_recordings()
        sys0, ours0, t0 = system_busy(), our_cpu_jiffies(), time.monotonic()
        load0 = os.getloadavg()[0]
        order = _rotate(paths, rnd - 1)
        _log(f"round {rnd}/{plan.rounds}: order {', '.join(order)}")
        for metric in metrics:
            mpaths = list(order)
            if metric.startswith("bulk") and "medbroker-tmpfs" in world.brokers:
                mpaths = _rotate(paths + ["medbroker-tmpfs"], rnd - 1)
            reps = plan.setups_per_round if metric == "setup" else 1
            for _ in range(reps):
                for path in mpaths:
                    rec = _measure(world, plan, metric, path, rnd)
                    result["samples"].append(rec)
                    if metric != "setup" or not rec["ok"]:
                        _log(f"  {metric:14} {LABELS[path]:32} {_show(rec)}")
            if metric == "setup":
                for path in mpaths:
                    vals = [s["value"] for s in result["samples"] if s["metric"] == "setup" and s["path"] == path
                            and s["round"] == rnd and s["ok"]]
                    if vals:
                        _log(f"  {'setup':14} {LABELS[path]:32} median {sorted(vals)[len(vals) // 2]:.0f} ms")
        other = _other_pct(sys0, ours0)
        result["noise"].append({"round": rnd, "seconds": time.monotonic() - t0, "other_cpu_pct": other,
                                "loadavg_1m_at_start": load0})
        _log(f"round {rnd} done in {time.monotonic() - t0:.0f} s; other load on the machine {other:.0f} % of a core")


def run_concurrency(world: BenchWorld, plan: Plan, result: dict) -> None:
    for i, n in enumerate(plan.levels):
        for path in _rotate(list(plan.load_paths), i):
            _settle(world, plan.settle_max_s)
            _log(f"concurrency: {n} sessions via {LABELS[path]}")
            res = run_level(world, path, n, plan.load_duration_s, plan.load_interval_ms / 1000, log=_log)
            result["concurrency"].append(res)
            if "loadgen" in res:
                lg = res["loadgen"]
                _log(f"    p50 {lg['rtt_ms']['50']:.2f} ms, p99 {lg['rtt_ms']['99']:.2f} ms, errors {lg['errors']}"
                     + (f", broker CPU {res['broker_cpu_pct']:.0f} %, RSS/session "
                        f"{res['broker_rss_per_session_bytes'] / 1024:.0f} KiB" if "broker_cpu_pct" in res else ""))
            else:
                _log(f"    failed: {res.get('error')}")


def run_interference(world: BenchWorld, plan: Plan, result: dict) -> None:
    """Keystrokes on a new medbroker session right after a bulk download session closed (no settling), i.e.
    while the broker finishes that session (recording close, search indexing), versus after settling."""
    for rnd in range(1, plan.rounds + 1):
        for busy in (True, False):
            _settle(world, plan.settle_max_s)
            d = clients.bulk_download(world, "medbroker", 60 + plan.blob_mib * 1.5)
            if not busy:
                _settle(world, plan.settle_max_s)
            b = world.brokers["medbroker"]
            c0 = cpu_seconds(b.pid, reaped_children=True) or 0.0
            k = clients.keystrokes(world, "medbroker", plan.keys_per_round, plan.key_gap_ms / 1000, 300)
            rec = {"metric": "keystroke_after_bulk" if busy else "keystroke_after_bulk_settled", "path": "medbroker",
                   "round": rnd, "ok": k.ok and d.ok, "value": k.value, "error": k.error or d.error,
                   "refused": k.refused, "extra": dict(k.extra, broker_cpu_s=(cpu_seconds(b.pid, reaped_children=True) or 0.0) - c0)}
            result["samples"].append(rec)
            _log(f"  {rec['metric']:30} round {rnd}: {_show(rec)}")


def run_profile(world: BenchWorld, plan: Plan, result: dict, out_dir: Path, stamp: str) -> None:
    """py-spy on a fresh broker: during bulk exec and SFTP transfers, during the after-session work, and under
    interactive load. Each part is its own py-spy run, so settling between transfers is not mixed in. The bare
    relay is profiled during the same transfers ("bare_bulk", "bare_sftp"): where asyncssh's own time goes."""
    b = world.brokers["medbroker"]
    b.restart()
    _settle(world, plan.settle_max_s)
    files: dict[str, list[Path]] = {"bulk": [], "sftp": [], "after_session": [], "interactive": [], "bare_bulk": [],
                                    "bare_sftp": []}
    errors, workload = [], []
    timeout = 60 + plan.blob_mib * 1.5
    runs = (("bulk", "bulk_download", lambda p: clients.bulk_download(world, p, timeout)),
            ("bulk", "bulk_upload", lambda p: clients.bulk_upload(world, p, timeout)),
            ("sftp", "sftp_get", lambda p: clients.sftp_transfer(world, p, "get", timeout)),
            ("sftp", "sftp_put", lambda p: clients.sftp_transfer(world, p, "put", timeout)))
    bare = world.brokers.get("bare")
    for i in range(plan.profile_transfers):
        for part, metric, fn in runs:
            if bare is not None:
                _settle(world, plan.settle_max_s)
                spy = Spy(bare.pid, out_dir / f"profile-{stamp}-bare_{part}-{metric}-{i}.txt")
                if spy.start():
                    s = fn("bare")
                    workload.append({"path": "bare", "metric": metric, "ok": s.ok, "value": s.value,
                                     "error": s.error or s.refused})
                spy.stop()
                files[f"bare_{part}"].append(spy.out)
                errors += [spy.error] if spy.error else []
            _settle(world, plan.settle_max_s)
            spy = Spy(b.pid, out_dir / f"profile-{stamp}-{part}-{metric}-{i}.txt")
            if spy.start():
                s = fn("medbroker")
                workload.append({"metric": metric, "ok": s.ok, "value": s.value, "error": s.error or s.refused})
            spy.stop()
            files[part].append(spy.out)
            errors += [spy.error] if spy.error else []
            spy = Spy(b.pid, out_dir / f"profile-{stamp}-after-{metric}-{i}.txt")
            if spy.start():
                _settle(world, plan.settle_max_s)
            spy.stop()
            files["after_session"].append(spy.out)
            errors += [spy.error] if spy.error else []
    if plan.profile_sessions:
        spy = Spy(b.pid, out_dir / f"profile-{stamp}-interactive.txt")

        def window(event: str) -> None:
            spy.start() if event == "start" else spy.stop()

        b.restart()
        spy.pid = b.pid
        res = run_level(world, "medbroker", plan.profile_sessions, min(20.0, plan.load_duration_s),
                        plan.load_interval_ms / 1000, log=_log, on_window=window, restart=False)
        spy.stop()
        workload.append({"interactive_sessions": plan.profile_sessions, "rtt_ms": res.get("loadgen", {}).get("rtt_ms"),
                         "broker_cpu_us_per_key": res.get("broker_cpu_us_per_key"), "error": res.get("error")})
        files["interactive"].append(spy.out)
        errors += [spy.error] if spy.error else []
    prof: dict = {"tool": "py-spy record --rate 200 --threads (blocking sampling)", "workload": workload,
                  "errors": errors}
    for name, paths in files.items():
        existing = [p for p in paths if p.exists()]
        if existing:
            prof[name] = summarize_collapsed(existing)
            merged = out_dir / f"profile-{stamp}-{name}.collapsed.txt.gz"  # flamegraph.pl input, gzipped
            with gzip.open(merged, "wt") as fh:
                fh.write("".join(p.read_text(errors="replace") for p in existing))
            prof[name]["raw"] = merged.name
        for p in paths:
            p.unlink(missing_ok=True)
    result["profile"] = prof


def _product_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=30, check=False).stdout.decode()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    dirty = [line for line in git("status", "--porcelain", "--", "broker", "sessions").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown", "dirty": bool(dirty), "dirty_files": dirty[:50]}


def _parse(argv: list[str] | None) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and short runs (~3 min); results go to bench/work/")
    p.add_argument("--save", action="store_true", help="write a --quick run to bench/results/ and RESULTS.md too")
    p.add_argument("--rounds", type=int)
    p.add_argument("--mib", type=int, help="bulk payload size in MiB (full: 256)")
    p.add_argument("--keys", type=int, help="keystrokes per path per round (full: 500)")
    p.add_argument("--key-gap-ms", type=float)
    p.add_argument("--setups", type=int, help="setup runs per path per round (full: 4, i.e. 20 in 5 rounds)")
    p.add_argument("--levels", help="concurrency levels, e.g. 50,200,500")
    p.add_argument("--load-duration", type=float, help="seconds of typing per concurrency level (full: 30)")
    p.add_argument("--load-paths", help="paths for the concurrency phase, e.g. direct,proxyjump,bare,medbroker,medbroker-2w "
                                        "(bare: the bare asyncssh relay; medbroker-2w: the same broker with "
                                        "listen.workers = 2)")
    p.add_argument("--only", help="phases: bulk,sftp,scp,keys,setup,load,interference,profile (default: all)")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="first wait up to this many seconds for the 1-minute load average to drop below --quiet-load")
    p.add_argument("--quiet-load", type=float, default=0.5, help="load average that counts as quiet (default 0.5)")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs) for inspection")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    changes = {k: v for k, v in (("rounds", a.rounds), ("blob_mib", a.mib), ("keys_per_round", a.keys),
                                 ("key_gap_ms", a.key_gap_ms), ("setups_per_round", a.setups),
                                 ("load_duration_s", a.load_duration)) if v is not None}
    if a.levels:
        changes["levels"] = tuple(int(x) for x in a.levels.split(",") if x)
    if a.load_paths:
        changes["load_paths"] = tuple(x for x in a.load_paths.split(",") if x)
    if a.only:
        changes["only"] = tuple(x for x in a.only.split(",") if x)
    unknown = set(changes.get("only", ())) - set(GROUPS) - {"load", "interference", "profile"}
    if unknown or set(changes.get("load_paths", ())) - {"direct", "proxyjump", "bare", "medbroker", "medbroker-2w"}:
        p.error(f"unknown phase or load path: {sorted(unknown) or changes.get('load_paths')}")
    return replace(plan, **changes), a


def _wait_quiet(limit_s: float, level: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s and os.getloadavg()[0] >= level:
        time.sleep(5)
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when any measurement failed with an error)."""
    plan, args = _parse(argv)

    def _term(signum, frame):  # SIGTERM/SIGHUP: unwind through the finally blocks and clean up
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)
    save = plan.mode == "full" or args.save
    out_dir = BENCH / ("results" if save else "work")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y-%m-%d") + f"-{plan.mode}"
    if (out_dir / f"{stamp}.json").exists():
        stamp = now.strftime("%Y-%m-%dT%H%M%S") + f"-{plan.mode}"
    if args.wait_quiet:
        _log(f"waiting up to {args.wait_quiet:.0f} s for a quiet machine; load average now {os.getloadavg()[0]:.2f}")
        _log(f"load average {_wait_quiet(args.wait_quiet, args.quiet_load):.2f}")
    result: dict = {"schema": 1, "mode": plan.mode, "plan": asdict(plan), "started_at": now.isoformat(timespec="seconds"),
                    "machine": machine_facts(), "product": _product_state(), "samples": [], "noise": [],
                    "concurrency": []}
    world = BenchWorld(blob_mib=plan.blob_mib, log=_log, keep=args.keep,
                       multi_worker="load" in plan.only and "medbroker-2w" in plan.load_paths)
    interrupted = None
    try:
        _log(f"starting the bench world in {world.root} ({plan.mode} plan)")
        world.start()
        result["product"]["launcher"] = world.launcher_label
        result["world"] = {"recordings_tmpfs": world.rec_tmpfs_reason, "notes": world.notes,
                           "device_account": world.account, "device_data": str(world.data),
                           "device_sshd_port": world.device_port, "jump_sshd_port": world.jump_port,
                           "broker_banner": world.brokers["medbroker"].banner,
                           "payload": "a synthetic device log for exec downloads (medbroker's output scanner reads "
                                      "it all; random bytes would hit its 64 KiB opaque-output budget), random "
                                      "bytes (firmware-like) for uploads, SFTP and scp"}
        _log(f"device sshd :{world.device_port}, jump sshd :{world.jump_port}, brokers "
             + ", ".join(f"{b.name} :{b.port}" for b in world.brokers.values()) + f" ({world.launcher_label})")
        for path in ("direct", "proxyjump", "proxyjump-gcm", *world.brokers):  # warm-up, not recorded
            s = clients.setup_time(world, path, 60)
            if not s.ok:
                raise RuntimeError(f"warm-up via {path} failed: {s.error or s.refused}")
        if any(g in plan.only for g in GROUPS):
            run_rounds(world, plan, result)
        if "load" in plan.only:
            run_concurrency(world, plan, result)
        if "interference" in plan.only and "medbroker" in world.brokers:
            _log("keystrokes while the broker finishes a bulk session, vs settled")
            run_interference(world, plan, result)
        if "profile" in plan.only:
            _log("profiling the broker with py-spy")
            run_profile(world, plan, result, out_dir, stamp)
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "Ctrl-C"
        _log(f"interrupted ({interrupted}); cleaning up")
    finally:
        world.close()
        result["product"]["code_versions"] = {b.name: b.code_versions for b in world.brokers.values()}
        result["product"]["code_at_end"] = code_fingerprint()
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if interrupted:
        result["interrupted"] = interrupted
        out_dir, save = BENCH / "work", False
        out_dir.mkdir(exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    summary = summarize(result)
    md = render_markdown(result, summary, json_path.name, "results/" if save else "")
    md_path = BENCH / "RESULTS.md" if save else out_dir / f"{stamp}.md"
    md_path.write_text(md)
    _log(f"wrote {json_path} and {md_path}")
    print(md)
    failed = any(not s["ok"] and not s["refused"] for s in result["samples"]) or any(
        "error" in c for c in result["concurrency"])
    return 1 if failed or interrupted else 0
