"""``medbroker serve`` as a real process: listens, answers SSH, stops cleanly on SIGTERM; bad addresses fail."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app
from helpers.net import free_port
from sessions import anchors, fastscan

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    assert runner.invoke(app, ["--home", str(h), "init"]).exit_code == 0
    return h


def _serve(home: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    return subprocess.Popen([sys.executable, "-m", "broker.cli", "--home", str(home), "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=REPO)


def _read_line(stream, timeout: float) -> bytes:
    """One line from a pipe within ``timeout`` seconds (b"" at EOF)."""
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line within {timeout}s; got {buf!r}")
            if sel.select(remaining):
                chunk = os.read(stream.fileno(), 1)
                if not chunk:
                    break
                buf += chunk
    return buf


def test_serve_listens_answers_ssh_and_stops_on_sigterm(home):
    port = free_port()
    proc = _serve(home, "--listen", f"127.0.0.1:{port}", "--log-level", "warning")
    try:
        line = _read_line(proc.stdout, 60)
        assert line.startswith(f"medbroker listening on 127.0.0.1:{port}".encode()), line
        # which search judges binary streams (sessions/anchors.py): Hyperscan when this Python has it
        # and whether the deep scanner's byte scans are compiled (sessions/fastscan.py)
        scans = "compiled" if fastscan.native() else "python"
        assert f"binary stream search: {anchors.engine()}; output scans: {scans})".encode() in line, line
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            banner = sock.recv(256)
        assert banner.startswith(b"SSH-2.0-medbroker")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    events = json.loads(runner.invoke(app, ["--home", str(home), "audit", "log", "--event", "broker", "--json"]).stdout)
    assert [e["event"] for e in events["events"]] == ["broker.started", "broker.stopped"]


def test_serve_refuses_a_bad_address_and_a_taken_port(home):
    r = runner.invoke(app, ["--home", str(home), "serve", "--listen", "localhost"])
    assert r.exit_code == 2 and "listen address 'localhost' is not HOST:PORT" in r.stderr
    r = runner.invoke(app, ["--home", str(home), "serve", "--log-level", "chatty"])
    assert r.exit_code == 2 and "--log-level" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _serve(home, "--listen", f"127.0.0.1:{port}")
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, err
    lines = err.decode().splitlines()
    assert f"Error: cannot listen on 127.0.0.1:{port}: Address already in use" in lines, lines
    assert lines[-1].startswith("Hint: ") and b"Traceback" not in err
