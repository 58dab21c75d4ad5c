"""Process-tree bookkeeping for tests: find descendants via /proc, kill whole trees, adopt orphans."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcInfo", "enable_subreaper", "kill_tree", "living_descendants", "reap", "reap_zombie_children"]

_PR_SET_CHILD_SUBREAPER = 36
_FREEZE_ROUNDS = 20


@dataclass(frozen=True)
class ProcInfo:
    """One process from /proc: pid, parent pid, state letter (R, S, Z, ...) and its command line."""

    pid: int
    ppid: int
    state: str
    cmdline: str


def _read_proc(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw_cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ..."; comm may contain spaces and parentheses, so split at the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    cmdline = raw_cmd.replace(b"\0", b" ").decode(errors="replace").strip()
    return ProcInfo(pid=pid, ppid=int(fields[1]), state=fields[0], cmdline=cmdline)


def _all_procs() -> list[ProcInfo]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_proc(int(entry))
            if info is not None:
                procs.append(info)
    return procs


def living_descendants(root_pid: int) -> list[ProcInfo]:
    """Return every descendant of root_pid (children, grandchildren, ...) that is not a zombie."""
    children: dict[int, list[ProcInfo]] = {}
    for info in _all_procs():
        children.setdefault(info.ppid, []).append(info)
    found: list[ProcInfo] = []
    seen = {root_pid}
    stack = [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child.pid not in seen:
                seen.add(child.pid)
                found.append(child)
                stack.append(child.pid)
    return [p for p in found if p.state != "Z"]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _freeze(pids: list[int], timeout: float = 2.0) -> None:
    """SIGSTOP pids and wait (bounded) until each is really stopped, dead or a zombie.

    kill() only queues the signal; a process still running could fork once more after we listed it.
    """
    for pid in pids:
        _signal(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if (info := _read_proc(pid)) is not None and info.state not in "TtZX"]
        if pending:
            time.sleep(0.001)


def kill_tree(root_pid: int, *, include_root: bool = True, reap_root: bool = False, timeout: float = 5.0) -> list[int]:
    """SIGKILL root_pid's whole process tree without races; return the pids that were signalled.

    The tree is frozen first (SIGSTOP, repeated until no new descendant appears, at most 20 rounds) so
    nothing can fork or be re-parented away between listing and killing. Descendants that end up as our
    children (see enable_subreaper) are reaped, waiting at most `timeout` seconds.
    include_root: also kill root_pid itself; reap_root: also reap it (only when no Popen owns it; a
    Popen-owned root is left for Popen.wait()).
    """
    frozen: list[int] = []
    if include_root:
        _freeze([root_pid])
        frozen.append(root_pid)
    for _ in range(_FREEZE_ROUNDS):
        fresh = [p.pid for p in living_descendants(root_pid) if p.pid not in frozen]
        if not fresh:
            break
        _freeze(fresh)
        frozen.extend(fresh)
    for pid in frozen:
        _signal(pid, signal.SIGKILL)
    reap([pid for pid in frozen if pid != root_pid or reap_root], dying=set(frozen), timeout=timeout)
    return frozen


def reap(pids: list[int], *, dying: set[int] | None = None, timeout: float = 5.0) -> None:
    """Collect the exit status of pids that are (or are about to become) our children by re-parenting.

    A pid whose parent is in `dying` is waited for until that parent's death hands it to us; a pid owned
    by any other live process is left alone. Never pass a pid a Popen object owns. Bounded by `timeout`.
    """
    me = os.getpid()
    dying = dying or set()
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending:
        for pid in list(pending):
            info = _read_proc(pid)
            if info is None:
                pending.discard(pid)  # already gone
            elif info.ppid == me:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pending.discard(pid)
            elif info.ppid not in dying:
                pending.discard(pid)  # someone else's child (e.g. init without a subreaper)
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(0.005)


def reap_zombie_children() -> int:
    """Reap every zombie child of this process and return how many there were.

    Only for the end of a test run: a zombie may belong to a Popen nobody waited for (Popen then sees
    ECHILD and reports returncode 0).
    """
    me = os.getpid()
    zombies = [p.pid for p in _all_procs() if p.ppid == me and p.state == "Z"]
    for pid in zombies:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return len(zombies)


def enable_subreaper() -> bool:
    """Make this process adopt orphaned descendants (Linux PR_SET_CHILD_SUBREAPER); return success.

    Without it, sshd's per-connection children and backgrounded ssh masters re-parent to PID 1, out of
    sight of the leftover-process check (and PID 1 in some sandboxes never reaps them).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def finish_piped(proc: subprocess.Popen[bytes], pumps: list[threading.Thread], timeout: float = 5.0) -> None:
    """End a client whose stdout/stderr threads ``pumps`` read: kill it if it still runs, let the threads take
    the rest, close the pipes. Harmless a second time (test vendors call it from wait() and from teardown)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout)
    for t in pumps:
        t.join(10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
