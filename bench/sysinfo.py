"""Process CPU/RSS from /proc, process-tree walks, and the machine/version facts a result must carry."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

__all__ = ["CpuSample", "cpu_seconds", "rss_bytes", "descendants", "tree_cpu_seconds", "system_busy", "our_cpu_jiffies",
           "machine_facts", "CLK_TCK", "child_pids"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """Busy and total jiffies of the whole machine (from /proc/stat)."""

    busy: int
    total: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds of one process (its threads included), or None when it is gone.

    :param reaped_children: add the CPU of its children that have exited and been reaped (the broker's
        post-session indexer runs in a child process); not for process trees summed live
    """
    f = _stat_fields(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if reaped_children else 0)) / CLK_TCK


def child_pids(pid: int) -> list[int]:
    """Living direct children of ``pid`` (e.g. the broker's indexer processes)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except (OSError, ValueError):
        return []


def rss_bytes(pid: int) -> int | None:
    """Resident set size of one process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (children, grandchildren, ...), from one /proc scan."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None and f[0] != "Z":
                children.setdefault(int(f[1]), []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def tree_cpu_seconds(root: int) -> tuple[float, int]:
    """CPU seconds of ``root`` and its live descendants (exited ones are lost), and how many processes."""
    pids = [root, *descendants(root)]
    total = 0.0
    for pid in pids:
        total += cpu_seconds(pid) or 0.0
    return total, len(pids)


def our_cpu_jiffies() -> int:
    """CPU jiffies of this process and every descendant, reaped children included (cutime/cstime).

    Compared with :func:`system_busy` it tells how much of the machine other work used meanwhile.
    """
    total = 0
    for pid in [os.getpid(), *descendants(os.getpid())]:
        f = _stat_fields(pid)
        if f is not None:
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total


def system_busy() -> CpuSample:
    """Machine-wide busy/total jiffies; compare two samples for utilisation."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return CpuSample(sum(parts) - idle, sum(parts))


def _version(argv: list[str], pattern: str) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, (proc.stdout + proc.stderr).decode(errors="replace"))
    return m.group(0) if m else None


def _dist(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    """Core count, CPU model, kernel and the versions of everything on the measured path."""
    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem = None
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "openssh": _version(["ssh", "-V"], r"OpenSSH_[^\s,]+(?:,\s*OpenSSL [^\s]+)?"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "asyncssh": _dist("asyncssh"),
        "cryptography": _dist("cryptography"),
        "uvloop": _dist("uvloop"),
        "py_spy": _version(["py-spy", "--version"], r"\d+\.\d+\.\d+"),
    }
