"""``medbroker demo`` as a newcomer runs it: the real CLI, then the exact printed commands with real ``ssh``."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.procs import kill_tree, living_descendants

pytestmark = pytest.mark.openssh

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 60  # five ssh-keygen runs, a broker home, sshd: seconds normally
COMMAND_S = 30


@dataclass
class Demo:
    """A running ``medbroker demo``: its process, what it printed, and the walkthrough's steps."""

    proc: subprocess.Popen
    out_path: Path
    err_path: Path
    env: dict[str, str]
    text: str = ""
    steps: dict[int, list[str]] | None = None

    def run(self, line: str, *, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run one printed command line as a shell would, with a bounded wait."""
        return subprocess.run(["/bin/sh", "-c", line], input=input if input is not None else b"",
                              capture_output=True, timeout=COMMAND_S, env=self.env, cwd=REPO, check=False)


def _newcomer_env(scratch: Path) -> dict[str, str]:
    """PATH with a ``medbroker`` that is this checkout's CLI; no agent, no home override; mkdtemp in ``scratch``."""
    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "medbroker"
    # cwd is the repository for every command, so `-m broker.cli` is this checkout's code (installed or not).
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m broker.cli \"$@\"\n")
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MEDBROKER_HOME", "SSH_AUTH_SOCK", "SSH_AGENT_PID")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["TMPDIR"] = str(scratch)  # the demo's default directory (tempfile.mkdtemp) lands here, removed afterwards
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _steps(text: str) -> dict[int, list[str]]:
    """The walkthrough's numbered steps -> the command lines printed under each."""
    steps: dict[int, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"(\d+)\. ", line)
        if head:
            current = int(head.group(1))
            steps[current] = []
        elif current is not None and re.match(r"\s+(ssh|\S*medbroker) ", line):
            steps[current].append(line.strip())
    return steps


def _wait_printed(demo: Demo) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        demo.text = demo.out_path.read_text(errors="replace")
        if "Press Ctrl-C" in demo.text:
            demo.steps = _steps(demo.text)
            return
        if demo.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"the demo did not print its walkthrough within {STARTUP_S}s (exit {demo.proc.poll()}):\n"
                         f"{demo.text}\n--- stderr ---\n{demo.err_path.read_text(errors='replace')}")


def _cmdline(pid: int) -> str:
    """A process's command line, "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        kill_tree(proc.pid)
    proc.wait(timeout=COMMAND_S)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A world-traversable dir under /tmp (the demo's device account must reach the demo files), removed after."""
    path = Path(tempfile.mkdtemp(prefix="medbroker-demo-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def demo(scratch: Path) -> Iterator[Demo]:
    """``medbroker demo --port 0`` started as a newcomer would (default directory), walkthrough parsed."""
    env = _newcomer_env(scratch)
    out_path, err_path = scratch / "demo.out", scratch / "demo.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        # Its own process group, like a job in a terminal: Ctrl-C is SIGINT to that group.
        proc = subprocess.Popen(["medbroker", "demo", "--port", "0"], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
    running = Demo(proc, out_path, err_path, env)
    try:
        _wait_printed(running)
        yield running
    finally:
        _stop(proc)


def test_walkthrough_commands_work_as_printed_and_ctrl_c_stops_everything(demo: Demo):
    steps = demo.steps
    assert steps is not None and sorted(steps) == [1, 2, 3, 4, 5], demo.text
    ssh_config = Path(shlex.split(steps[1][0])[2])
    root = ssh_config.parent
    home = root / "home"
    device_pid = int((root / "device" / "sshd.pid").read_text())
    device_port = int(re.search(r"device ct-01 .*?127\.0\.0\.1:(\d+)", demo.text).group(1))

    # 1. No approval yet: refused, told why and what to do next.
    r = demo.run(steps[1][0])
    assert r.returncode == 1, r
    assert b"no approved access for alice to ct-01" in r.stderr and b"request" in r.stderr
    assert r.stdout == b""

    # 2. Alice requests access; the id is printed.
    r = demo.run(steps[2][0])
    assert r.returncode == 0, r
    request_id = re.search(rb"Request (\d+) created", r.stdout).group(1).decode()

    # 3. Bob approves "the id printed in step 2".
    approve = shlex.split(steps[3][0])
    assert approve[-2] == "approve"
    r = demo.run(shlex.join([*approve[:-1], request_id]))
    assert r.returncode == 0, r
    assert f"Request {request_id} approved".encode() in r.stdout

    # 4. Alice works: a shell (commands on stdin, no terminal here), then the printed tail.
    r = demo.run(steps[4][0], input=b"id -un\necho $((6*7))\n")
    assert r.returncode == 0, r
    expected_login = "medbroker-demo" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    assert r.stdout.split()[-2:] == [expected_login.encode(), b"42"]
    tail = shlex.split(steps[4][1])
    assert tail[-4:-1] == ["tail", "-n", "3"]
    r = demo.run(steps[4][1])
    assert r.returncode == 0, r
    assert r.stdout.splitlines() == Path(tail[-1]).read_bytes().splitlines()[-3:]
    assert b"tube temperature" in r.stdout
    # The device account can read patient data; the broker's policy is what refuses it.
    dicom = re.search(r"patient data under (\S+)", demo.text).group(1)
    r = demo.run(f"{steps[4][0]} cat {dicom}/2026/11/IM000001")
    assert r.returncode == 1 and b"protected patient-data directory" in r.stderr and r.stdout == b"", r

    # 5. Security: the sessions are listed and the audit chain and recordings verify.
    # The printed medbroker runs as printed: this installation's launcher by absolute path unless the PATH
    # finds that same launcher (here the PATH's medbroker is the test's wrapper, so the absolute path).
    medbroker = [c for c in steps[5] if f" --home {home} " in c]
    launcher = shlex.split(medbroker[0])[0]
    assert launcher == str(Path(sys.executable).parent / "medbroker"), medbroker[0]
    sessions_list = next(c for c in medbroker if c.endswith(" sessions list"))
    r = demo.run(f"{sessions_list} --json")
    assert r.returncode == 0, r
    sessions = json.loads(r.stdout)["sessions"]
    assert len(sessions) >= 2 and {s["user"] for s in sessions} == {"alice"}
    assert {s["device"] for s in sessions} == {"ct-01"}
    assert all(s["status"] == "closed" for s in sessions), sessions
    r = demo.run(f"{next(c for c in medbroker if c.endswith(' audit verify'))} --json")
    assert r.returncode == 0, r
    report = json.loads(r.stdout)
    assert report["ok"] and report["audit"]["ok"] and report["audit"]["rows"] > 0
    assert report["counts"]["broken"] == 0 and report["counts"]["ok"] >= 2

    # Ctrl-C: the demo exits 0, the device sshd with it; nothing of the demo keeps running.
    os.killpg(demo.proc.pid, signal.SIGINT)
    assert demo.proc.wait(timeout=COMMAND_S) == 0, demo.err_path.read_text(errors="replace")
    assert b"Traceback" not in demo.err_path.read_bytes()
    assert str(root) not in _cmdline(device_pid)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", device_port), timeout=5).close()
    assert not [p for p in living_descendants(os.getpid()) if str(root) in p.cmdline]


@pytest.mark.root
def test_demo_dir_the_device_account_cannot_reach_is_refused_before_anything_is_made(scratch: Path, tmp_path: Path):
    # pytest's tmp dirs are 0700 root: the demo's device account could not read anything below them.
    target = tmp_path / "demo"
    r = subprocess.run(["medbroker", "demo", "--dir", str(target), "--port", "0"], capture_output=True,
                       timeout=COMMAND_S, env=_newcomer_env(scratch), cwd=REPO, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 1, r
    assert b"Error: the demo device account medbroker-demo could not reach" in r.stderr
    assert b"Hint: " in r.stderr and b"--dir" in r.stderr
    assert not target.exists()
