"""Running as a service: the systemd unit, its ExecStart run the way systemd would (sd_notify), backup and restore."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.service import UnitSpec, render_unit
from helpers.net import free_port

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _unit_fields(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            fields.setdefault(key, []).append(value)
    return fields


def test_unit_is_hardened_and_names_this_home(tmp_path):
    home = tmp_path / "home"
    assert runner.invoke(app, ["--home", str(home), "init"]).exit_code == 0
    r = runner.invoke(app, ["--home", str(home), "service", "install", "--print", "--user", "mb"])
    assert r.exit_code == 0, r.output
    f = _unit_fields(r.stdout)
    argv = shlex.split(f["ExecStart"][0])
    assert argv[1:] == ["--home", str(home.resolve()), "serve"] and Path(argv[0]).name == "medbroker"
    assert os.access(argv[0], os.X_OK)
    assert f["Type"] == ["notify"] and f["User"] == ["mb"] and f["Restart"] == ["on-failure"]
    assert f["ProtectSystem"] == ["strict"] and f["NoNewPrivileges"] == ["yes"]
    assert f["ReadWritePaths"] == [str(home.resolve())]
    assert f["StandardOutput"] == ["journal"] and f["CapabilityBoundingSet"] == [""]
    low = render_unit(UnitSpec(home=Path("/var/lib/medbroker"), executable="/usr/bin/medbroker", listen="0.0.0.0:22",
                               low_port=True))
    assert _unit_fields(low)["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert _unit_fields(low)["ProtectHome"] == ["yes"]
    bad = runner.invoke(app, ["--home", str(home), "service", "install", "--print", "--user", "0bad"])
    assert bad.exit_code == 2 and "user name" in bad.output


@pytest.mark.skipif(os.geteuid() != 0, reason="writes a unit and may create a system account (root)")
def test_install_writes_the_unit_and_owns_the_home(tmp_path):
    home = tmp_path / "home"
    assert runner.invoke(app, ["--home", str(home), "init"]).exit_code == 0
    r = runner.invoke(app, ["--home", str(home), "service", "install", "--user", "root", "--unit-dir",
                            str(tmp_path / "units"), "--name", "mb-test", "--no-start"])
    assert r.exit_code == 0, r.output
    unit = tmp_path / "units" / "mb-test.service"
    assert unit.stat().st_mode & 0o777 == 0o644 and "--home " + str(home.resolve()) in unit.read_text()
    assert "systemctl daemon-reload" in r.stdout or "started" in r.stdout


def test_exec_start_runs_as_systemd_would_ready_and_stopping(tmp_path):
    """Run the unit's ExecStart with a NOTIFY_SOCKET: READY=1 once it accepts SSH, STOPPING=1 on SIGTERM."""
    home = tmp_path / "home"
    assert runner.invoke(app, ["--home", str(home), "init"]).exit_code == 0
    port = free_port()
    r = runner.invoke(app, ["--home", str(home), "service", "install", "--print", "--listen", f"127.0.0.1:{port}"])
    argv = shlex.split(_unit_fields(r.stdout)["ExecStart"][0])
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    env.update(NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    messages: list[str] = []

    def receive_until(word: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                continue
            if any(word in m for m in messages):
                return True
        return False

    try:
        assert receive_until("READY=1", 60), (messages, proc.poll())
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={proc.pid}" in ready
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # READY means it accepts now
            assert conn.recv(64).startswith(b"SSH-2.0-")
        proc.send_signal(signal.SIGTERM)
        assert receive_until("STOPPING=1", 30), messages
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and b"Traceback" not in err, err
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_backup_of_a_live_home_restores_and_verifies(world, tmp_path):
    """A home with real recorded sessions, backed up while the broker runs, restores elsewhere and verifies
    its own files (not the original's: the original's recordings are removed before the check)."""
    world.grant()
    for word in ("one", "two"):
        r = world.ssh("alice@ct-01", f"echo {word}")
        assert r.returncode == 0 and r.stdout == f"{word}\n".encode()
    home = world.app.config.home
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(s["status"] == "live" for s in world.app.store.list_sessions()):
        time.sleep(0.1)
    out = tmp_path / "backup"
    r = runner.invoke(app, ["--home", str(home), "backup", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert "medbroker.db" in manifest["files"] and sum(k.startswith("recordings/") for k in manifest["files"]) == 2
    assert runner.invoke(app, ["--home", str(home), "backup", "-o", str(out)]).exit_code == 1  # never overwrites

    new = tmp_path / "restored"
    # The original's recordings vanish: a restored home that still pointed at them would fail now.
    moved = tmp_path / "elsewhere"
    (home / "recordings").rename(moved)
    try:
        r = runner.invoke(app, ["restore", str(out), "--home", str(new), "--json"])
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        # rows name recordings by key, relative to the recordings directory: nothing to rebase (issue 12)
        assert result["ok"] and result["recordings_rebased"] == 0 and result["audit"]["rows"] > 0
        v = runner.invoke(app, ["--home", str(new), "audit", "verify", "--json"])
        assert v.exit_code == 0, v.output
        recs = json.loads(v.stdout)["recordings"]
        assert all(r["state"] == "ok" and not r["recording"].startswith("/") for r in recs) and len(recs) == 2
        with sqlite3.connect(new / "medbroker.db") as db:
            assert db.execute("select count(*) from sessions").fetchone()[0] == 2
    finally:
        moved.rename(home / "recordings")


def test_restore_refuses_a_damaged_backup_and_a_used_home(tmp_path):
    home = tmp_path / "home"
    assert runner.invoke(app, ["--home", str(home), "init"]).exit_code == 0
    out = tmp_path / "backup"
    assert runner.invoke(app, ["--home", str(home), "backup", "-o", str(out)]).exit_code == 0
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    r = runner.invoke(app, ["restore", str(out), "--home", str(used)])
    assert r.exit_code == 1 and "not empty" in r.output
    (out / "broker.toml").write_text((out / "broker.toml").read_text() + "\n# edited\n")
    r = runner.invoke(app, ["restore", str(out), "--home", str(tmp_path / "new")])
    assert r.exit_code == 1 and "broker.toml: content differs" in r.output
    assert not (tmp_path / "new").exists()
