"""Sample the broker process with py-spy during a workload and rank its hot spots (self and inclusive)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

__all__ = ["Spy", "summarize_collapsed", "IDLE_LEAVES"]

_THREAD = re.compile(r"^thread \(\d+\): (.*)$")
_LINE = re.compile(r":\d+\)$")
# Leaf frames of threads that are blocked, which py-spy --nonblocking cannot always tell from running.
# A thread-pool worker whose leaf frame is _worker itself is blocked in work_queue.get().
IDLE_LEAVES = ("Condition.wait (threading.py", "Event.wait (threading.py", "SimpleQueue.get", "Thread.join (threading.py",
               "_worker (concurrent/futures/thread.py")


def _short(frame: str) -> str:
    """``fn (/long/site-packages/asyncssh/x.py:12)`` → ``fn (asyncssh/x.py:12)``."""
    return re.sub(r"\(.*?(?:site-packages|lib/python3\.\d+|/work/main)/", "(", frame)


def _thread_group(name: str) -> str:
    if name.startswith("recording-"):
        return "recording writers"
    if name in ("MainThread",):
        return "event loop (MainThread)"
    if "ThreadPoolExecutor" in name or name.startswith(("uvloop", "asyncio")):
        return f"executor threads ({name.split('_')[0]})"
    return name


def _lines(paths: Path | list[Path]):
    for p in [paths] if isinstance(paths, Path) else paths:
        if p.exists():
            yield from p.read_text(errors="replace").splitlines()


def summarize_collapsed(path: Path | list[Path], top: int = 25) -> dict:
    """Rank frames of py-spy ``--format raw --threads`` files (several files are added up).

    :returns: ``{"samples": N, "self": [...], "inclusive": [...], "self_functions": [...], "threads": {...}}``,
        entries ``{"frame": text, "pct": % of samples}``
    """
    self_c: Counter = Counter()
    self_fn: Counter = Counter()
    incl: Counter = Counter()
    thr: Counter = Counter()
    total = idle = 0
    for line in _lines(path):
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        m = _THREAD.match(frames[0])
        if m:
            frames = frames[1:]
        if not frames:
            continue
        leaf = _short(frames[-1])
        if leaf.startswith(IDLE_LEAVES):
            idle += n
            continue
        total += n
        if m:
            thr[_thread_group(m.group(1))] += n
        self_c[leaf] += n
        self_fn[_LINE.sub(")", leaf)] += n
        for f in {_LINE.sub(")", _short(f)) for f in frames}:
            incl[f] += n
    pct = (lambda c: [{"frame": f, "pct": v / total * 100} for f, v in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "idle_samples_dropped": idle, "self": pct(self_c), "self_functions": pct(self_fn), "inclusive": pct(incl),
            "threads": {k: v / max(1, sum(thr.values())) * 100 for k, v in thr.most_common()}}


class Spy:
    """``py-spy record`` attached to one process between ``start()`` and ``stop()``."""

    def __init__(self, pid: int, out: Path, rate: int = 200, nonblocking: bool = False) -> None:
        self.pid, self.out, self.rate, self.nonblocking = pid, out, rate, nonblocking
        self.proc: subprocess.Popen | None = None
        self.log = out.with_suffix(".log")
        self.error: str | None = None
        self.samples = self.errors = 0

    def start(self) -> bool:
        spy = shutil.which("py-spy")
        if spy is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return False
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([spy, "record", "--pid", str(self.pid), "--format", "raw", "--threads",
                                          "--rate", str(self.rate), "-o", str(self.out)]
                                         + (["--nonblocking"] if self.nonblocking else []),
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(1.0)
        if self.proc.poll() is not None:
            self.error = f"py-spy exited: {self.log.read_text(errors='replace')[-500:]}"
            return False
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None and not self.log.exists():
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        m = re.search(r"Samples: (\d+) Errors: (\d+)", text)
        if m:
            self.samples, self.errors = int(m.group(1)), int(m.group(2))
        elif self.error is None and not self.out.exists():
            self.error = f"no profile written: {text[-500:]}"
        self.log.unlink(missing_ok=True)
