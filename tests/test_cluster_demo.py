"""scripts/cluster-demo.sh: the whole cluster on one machine, run as a person would run it.

``--check`` starts real PostgreSQL, Swift (s3api), HAProxy, two ``medbroker serve`` nodes and an sshd device,
then drives a real ssh client through HAProxy, SIGKILLs the node that served it and checks what the script
promises; the interactive mode is stopped with ``cluster-demo.sh stop`` from "another terminal".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from broker.demo import find_sshd
from helpers import openssh_required
from helpers.haproxy import haproxy_binary
from helpers.postgres import postgres_bindir
from helpers.swift import swift_binaries

pytestmark = [pytest.mark.openssh, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "cluster-demo.sh"


@pytest.fixture
def state():
    missing = [name for name, found in (("PostgreSQL", postgres_bindir()), ("Swift", swift_binaries()),
                                        ("haproxy", haproxy_binary()), ("sshd", find_sshd())) if not found]
    if missing:
        if openssh_required():
            pytest.fail(f"{', '.join(missing)} missing and MEDBROKER_REQUIRE_OPENSSH=1; run scripts/install.sh",
                        pytrace=False)
        pytest.skip(f"{', '.join(missing)} missing; run scripts/install.sh (CI fails here instead of skipping)")
    # under /tmp, not pytest's 0700 tmp_path: PostgreSQL runs as nobody and the device login must get in
    parent = Path(tempfile.mkdtemp(prefix="medbroker-cdt-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent / "demo"
    shutil.rmtree(parent, ignore_errors=True)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"} | {"PYTHON": sys.executable}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # reaped by nobody yet: not running


def test_check_mode_kills_the_serving_node_and_everything_else_holds(state: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--no-install", "--check", "--dir", str(state)], capture_output=True,
                          text=True, timeout=240, env=_env(), stdin=subprocess.DEVNULL, cwd="/")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAILED" not in out
    oks = [line for line in out.splitlines() if line.startswith("ok: ")]
    assert oks[0] == "ok: ssh through HAProxy ran a command on the device", out
    assert "ok: the session shows the vendor's address 127.0.0.5" in oks
    killed = re.search(r"^ok: kill -9 (node-[ab]) \(pid (\d+)\): the vendor's ssh ended, exit 255$", out, re.M)
    assert killed, out
    survivor = "node-a" if killed.group(1) == "node-b" else "node-b"
    assert re.search(rf"^ok: {survivor} sealed \S+ as incomplete$", out, re.M), out
    for step in (f"ok: cluster status shows {killed.group(1)} dead",
                 "ok: the vendor reconnected through HAProxy (exit 0)", "ok: the sealed recording replays",
                 "ok: archive run uploaded the sealed recordings to Swift", "ok: the bucket holds 2 recordings",
                 "ok: audit verify passed", "ok: evidence export wrote the killed session's bundle",
                 "ok: audit verify --bundle passed"):
        assert step in oks, out
    assert len(oks) == 12, out
    assert f"stopped; removed {state}" in out and not state.exists()


def test_the_interactive_demo_serves_vendors_and_stop_tears_it_down(state: Path) -> None:
    demo = subprocess.Popen(["bash", str(SCRIPT), "--no-install", "--dir", str(state)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_env(), stdin=subprocess.DEVNULL, cwd="/", text=True)
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("Press Ctrl-C") for line in lines):
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert any(line.startswith("Press Ctrl-C") for line in lines), text
        pids = [int(p) for p in re.findall(r"node-[ab]: pid (\d+)", text)]
        assert len(pids) == 2, text
        # the printed vendor command, as printed
        command = re.search(r"^ {5}(ssh -F \S+ alice@ct-01@broker) 'echo continued'$", text, re.M)
        assert command, text
        vendor = subprocess.run([*command.group(1).split(), "echo through-haproxy"], capture_output=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        assert vendor.returncode == 0 and vendor.stdout == b"through-haproxy\n", vendor.stderr
        status = subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(state / "home"), "cluster",
                                 "status"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert status.returncode == 0 and re.search(r"^node-a\s+alive", status.stdout, re.M) \
            and re.search(r"^node-b\s+alive", status.stdout, re.M), status.stdout + status.stderr

        stop = subprocess.run(["bash", str(SCRIPT), "stop", "--dir", str(state)], capture_output=True, text=True,
                              timeout=90, stdin=subprocess.DEVNULL)
        assert stop.returncode == 0 and stop.stdout.strip() == "cluster-demo: stopped", stop.stdout + stop.stderr
        rest, _ = demo.communicate(timeout=30)
        assert demo.returncode == 0, text + rest
        assert f"stopped; removed {state}" in rest and not state.exists()
        assert all(_gone(pid) for pid in pids)
        again = subprocess.run(["bash", str(SCRIPT), "stop", "--dir", str(state)], capture_output=True, text=True,
                               timeout=30, stdin=subprocess.DEVNULL)
        assert again.returncode == 1 and "nothing running" in again.stderr
    finally:
        if demo.poll() is None:
            demo.terminate()
            demo.wait(60)
