"""A tiny init for test daemons: `python reaper.py PROG ARGS...` adopts, reaps and finally kills PROG's tree.

sshd's per-connection processes call setsid() and outlive their parents in normal operation; without
a subreaper they re-parent to PID 1 (which in some sandboxes never reaps them) and escape cleanup.
This shim is their subreaper and reaps everything. On SIGTERM/SIGINT/SIGHUP, or when PROG exits, it
SIGKILLs every child and keeps killing whatever re-parents to it until nothing is left, then exits
with PROG's status (128+N if PROG died of signal N). Nothing can escape a live subreaper, so this
teardown has no race. Standalone: stdlib only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return found


def main(argv: list[str]) -> int:
    """Run argv[0] with argv as its arguments; return its exit status (128+N if killed by signal N)."""
    if not argv:
        print("usage: reaper.py PROG [ARGS...]", file=sys.stderr)
        return 2
    _become_subreaper()
    child = os.fork()
    if child == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)

    state: dict[str, int | bool | None] = {"status": None, "terminating": False}

    def kill_children() -> None:
        for pid in _children(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def terminate(_signum: int, _frame: object) -> None:
        state["terminating"] = True
        kill_children()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, terminate)
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            return state["status"] or 0
        if pid == child:
            code = os.waitstatus_to_exitcode(wait_status)
            state["status"] = 128 - code if code < 0 else code
            state["terminating"] = True
        if state["terminating"]:
            # A dead child's children re-parented to us before wait() returned it: kill them next.
            kill_children()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
