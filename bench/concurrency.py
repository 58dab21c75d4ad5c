"""Concurrency runs: the load generator in its own process, broker and device CPU/memory sampled from /proc."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from bench.sysinfo import cpu_seconds, descendants, our_cpu_jiffies, rss_bytes, system_busy, tree_cpu_seconds
from bench.clients import setup_time
from bench.world import REPO, _raise_nofile

if TYPE_CHECKING:  # pragma: no cover
    from bench.world import BenchWorld

__all__ = ["run_level", "pss_bytes", "threads", "broker_pids", "broker_rss"]


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size summed over processes (shared pages split fairly), from smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def threads(pid: int) -> int | None:
    """Thread count of one process."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def broker_pids(broker) -> list[int]:
    """The broker's processes: the one ``serve`` process, or a supervisor and its workers (listen.workers > 1)."""
    return [broker.pid, *descendants(broker.pid)]


def broker_rss(broker) -> int | None:
    """RSS summed over the broker's processes (with workers, pages they share are counted in each)."""
    values = [rss_bytes(pid) for pid in broker_pids(broker)]
    return sum(v for v in values if v is not None) if any(v is not None for v in values) else None


def _spec(world: "BenchWorld", path: str, sessions: int, duration_s: float, interval_s: float) -> dict:
    spec = {"sessions": sessions, "duration_s": duration_s, "interval_s": interval_s,
            "known_hosts": str(world.known_hosts), "key": str(world.client_key), "ramp_concurrency": 16}
    if path == "direct":
        spec.update(port=world.device_port, user=world.account)
    elif path == "proxyjump":
        spec.update(port=world.device_port, user=world.account, jump_port=world.jump_port, jump_user=world.account)
    else:  # a medbroker path or the bare relay
        spec.update(port=world.brokers[path].port, user=world.brokers[path].user)
    return spec


class _Lines:
    """JSON lines from the load generator's stdout, read with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.buf = proc, b""

    def wait_for(self, want: str, deadline: float, on_idle=None) -> dict:
        fd = self.proc.stdout.fileno()
        while True:
            while (nl := self.buf.find(b"\n")) >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                obj = json.loads(line)
                if obj.get("event") == want:
                    return obj
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"load generator: no {want!r} event in time")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"load generator exited before {want!r} (rc {self.proc.poll()})")
                self.buf += chunk
            elif on_idle is not None:
                on_idle()


def run_level(world: "BenchWorld", path: str, sessions: int, duration_s: float, interval_s: float,
              log=print, *, on_window=None, restart: bool = True) -> dict:
    """One path at one concurrency level; a fresh broker process for medbroker so its memory starts clean.

    :param on_window: ``on_window("start"|"end")`` is called right before typing starts and right after it ends
        (the profiler attaches there)
    :param restart: restart the broker first (False keeps the running process, e.g. one py-spy watches)

    :returns: the load generator's statistics plus broker/device/system CPU and memory
    """
    broker = world.brokers.get(path)
    if broker is not None and restart:
        broker.restart()
        # one session first (a few with workers: the kernel picks one per connection), so one-off costs
        # (lazy imports, first recording, store warm-up) are not counted per session
        for _ in range(1 if broker.workers == 1 else 3 * broker.workers):
            warm = setup_time(world, path, 60)
            if not warm.ok:
                return {"path": path, "sessions": sessions, "error": f"warm-up failed: {warm.error or warm.refused}"}
        time.sleep(2.0)
    spec_path = world.root / f"loadgen-{path}-{sessions}.json"
    spec_path.write_text(json.dumps(_spec(world, path, sessions, duration_s, interval_s)))
    err_path = world.root / f"loadgen-{path}-{sessions}.err"
    idle_rss = broker_rss(broker) if broker else None
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(spec_path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, cwd=REPO, start_new_session=True,
                                preexec_fn=_raise_nofile)
    out: dict = {"path": path, "sessions": sessions, "duration_s": duration_s, "interval_s": interval_s}
    try:
        lines = _Lines(proc)
        ready = lines.wait_for("ready", time.monotonic() + 120 + sessions * 0.5)
        out["ready"] = ready
        log(f"    {path} x{sessions}: {ready['connected']} sessions open in {ready['ramp_s']:.1f} s"
            f" ({ready['setup_errors']} setup errors); measuring {duration_s:.0f} s")
        dev_root = world.device_sshd.pid
        rss_peak = [0]

        def sample_rss() -> None:
            if broker is not None:
                rss_peak[0] = max(rss_peak[0], broker_rss(broker) or 0)

        if on_window:
            on_window("start")
        before = _sample(world, broker, path, proc.pid)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        lines.wait_for("measured", time.monotonic() + duration_s + 120, on_idle=sample_rss)
        after = _sample(world, broker, path, proc.pid)
        if on_window:
            on_window("end")
        dev_pids = descendants(dev_root)
        out["device_pss_bytes"] = pss_bytes(dev_pids)
        proc.stdin.write(b"close\n")
        proc.stdin.flush()
        done = lines.wait_for("done", time.monotonic() + 180)
        out["loadgen"] = done
        secs = after["t"] - before["t"]
        out["window_s"] = secs
        busy = (after["sys"].busy - before["sys"].busy) / max(1, after["sys"].total - before["sys"].total)
        out["machine_busy_pct"] = busy * 100 * (os.cpu_count() or 1)
        out["loadgen_cpu_pct"] = (after["loadgen"] - before["loadgen"]) / secs * 100
        out["device_cpu_pct"] = (after["device"][0] - before["device"][0]) / secs * 100
        out["device_processes"] = after["device"][1]
        out["device_pss_per_session_bytes"] = out["device_pss_bytes"] / max(1, ready["connected"])
        out["other_cpu_pct"] = _other_pct(before, after)
        if path == "proxyjump":
            out["jump_cpu_pct"] = (after["jump"][0] - before["jump"][0]) / secs * 100
            out["jump_processes"] = after["jump"][1]
        if broker is not None:
            cpu = after["broker_cpu"] - before["broker_cpu"]
            out["broker_cpu_pct"] = cpu / secs * 100
            out["broker_cpu_us_per_key"] = cpu / max(1, done["keystrokes"]) * 1e6
            out["broker_rss_idle_bytes"] = idle_rss
            out["broker_rss_bytes"] = after["broker_rss"]
            out["broker_rss_peak_bytes"] = max(rss_peak[0], after["broker_rss"] or 0)
            out["broker_threads"] = after["broker_threads"]
            out["broker_processes"] = after["broker_processes"]
            n = max(1, done["connected"])
            out["broker_rss_per_session_bytes"] = ((after["broker_rss"] or 0) - (idle_rss or 0)) / n
        proc.wait(60)
    except (TimeoutError, EOFError, json.JSONDecodeError, subprocess.TimeoutExpired) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}; stderr: {err_path.read_text(errors='replace')[-800:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
    return out


def _other_pct(before: dict, after: dict) -> float:
    """CPU used by processes that are not part of this bench (other work on a shared machine), in % of one core."""
    total = max(1, after["sys"].total - before["sys"].total)
    ours = after["ours"] - before["ours"]
    return max(0.0, (after["sys"].busy - before["sys"].busy - ours) / total * 100 * (os.cpu_count() or 1))


def _sample(world: "BenchWorld", broker, path: str, loadgen_pid: int) -> dict:
    s = {"t": time.monotonic(), "sys": system_busy(), "ours": our_cpu_jiffies(), "device": tree_cpu_seconds(world.device_sshd.pid),
         "loadgen": cpu_seconds(loadgen_pid) or 0.0}
    if path == "proxyjump":
        s["jump"] = tree_cpu_seconds(world.jump_sshd.pid)
    if broker is not None:  # summed over the supervisor and its workers when listen.workers > 1
        pids = broker_pids(broker)
        s["broker_cpu"] = sum(cpu_seconds(pid) or 0.0 for pid in pids)
        s["broker_rss"] = broker_rss(broker)
        s["broker_threads"] = sum(threads(pid) or 0 for pid in pids)
        s["broker_processes"] = len(pids)
    return s
