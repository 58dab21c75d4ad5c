"""``medbroker device add --fetch-host-key`` and ``--password-stdin`` against a real sshd and a real terminal."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app
from helpers.net import SilentListener, closed_port
from helpers.pty import PtySession

pytestmark = pytest.mark.openssh
runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    (h / "broker.toml").write_text('[upstream]\nconnect_timeout = "1s"\n')
    r = runner.invoke(app, ["--home", str(h), "init"])
    assert r.exit_code == 0, r.stderr
    return h


def _cli(home: Path, *args: str, input: str | None = None):
    r = runner.invoke(app, ["--home", str(home), *args], input=input)
    assert "Traceback" not in r.stdout + r.stderr
    return r


def _devices(home: Path) -> list[str]:
    return [d["name"] for d in json.loads(_cli(home, "device", "list", "--json").stdout)["devices"]]


def _add_fetch(home: Path, dev, *extra: str):
    return _cli(home, "device", "add", "ct-01", "--host", dev.host, "--port", str(dev.port), "--login", dev.login,
                "--key", str(dev.client_key.private_path), "--fetch-host-key", *extra)


def test_fetch_host_key_with_yes_pins_what_the_device_presents(home, device):
    dev = device(tree=False)
    r = _add_fetch(home, dev, "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    assert f"presented a ssh-ed25519 host key with fingerprint {dev.host_key_fingerprint}" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["host_key_fingerprint"] == dev.host_key_fingerprint and doc["host_key"] == dev.host_key_line


def test_fetch_host_key_without_a_person_refuses(home, device):
    dev = device(tree=False)
    r = _add_fetch(home, dev)  # CliRunner's stdin is not a terminal
    assert r.exit_code == 2
    assert dev.host_key_fingerprint in r.stderr  # shown, so a script's author can compare it
    assert "refusing to pin a fetched host key" in r.stderr and "--yes" in r.stderr and "--host-key" in r.stderr
    assert _devices(home) == []


def test_fetch_host_key_from_a_dead_or_silent_address_fails_fast(home):
    t0 = time.monotonic()
    r = _cli(home, "device", "add", "ct-01", "--host", "127.0.0.1", "--port", str(closed_port()), "--login", "svc",
             "--password-stdin", "--fetch-host-key", "--yes", input="pw\n")
    assert r.exit_code == 1 and "cannot fetch the host key of 127.0.0.1" in r.stderr
    with SilentListener(banner=b"SSH-2.0-Hung\r\n") as hung:
        r = _cli(home, "device", "add", "ct-01", "--host", "127.0.0.1", "--port", str(hung.port), "--login", "svc",
                 "--password-stdin", "--fetch-host-key", "--yes", input="pw\n")
    assert r.exit_code == 1 and "did not answer within 1s" in r.stderr
    assert time.monotonic() - t0 < 10
    assert _devices(home) == []


def _pty(home: Path, *args: str) -> PtySession:
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "MEDBROKER_HOME")}
    env["TERM"] = "xterm"
    return PtySession([sys.executable, "-m", "broker.cli", "--home", str(home), *args], env=env)


@pytest.mark.parametrize("answer, code", [("y", 0), ("n", 1), ("", 1)])
def test_fetch_host_key_asks_a_person_on_a_terminal(home, device, answer, code):
    dev = device(tree=False)
    with _pty(home, "device", "add", "ct-01", "--host", dev.host, "--port", str(dev.port), "--login", dev.login,
              "--key", str(dev.client_key.private_path), "--fetch-host-key") as term:
        term.expect(dev.host_key_fingerprint.encode(), timeout=30)
        term.expect(b"Pin this host key for ct-01? [y/N]", timeout=10)
        term.sendline(answer)
        assert term.wait(30) == code
        out = bytes(term.output)
    if code == 0:
        assert b"Device ct-01 added" in out and _devices(home) == ["ct-01"]
    else:
        assert b"not pinned; nothing changed" in out and _devices(home) == []


def test_password_on_a_terminal_is_not_echoed(home, tmp_path):
    from helpers.keys import generate_keypair

    host_key = generate_keypair(tmp_path / "k", "host").public_key
    password = "Terminal-pw-93"
    with _pty(home, "device", "add", "us-01", "--host", "10.0.0.9", "--login", "svc", "--password-stdin",
              "--host-key", host_key) as term:
        term.expect(b"Password for svc@10.0.0.9 (not echoed): ", timeout=30)
        term.sendline(password)
        assert term.wait(30) == 0
        out = bytes(term.output)
    assert password.encode() not in out and b"Device us-01 added" in out
    assert json.loads(_cli(home, "device", "show", "us-01", "--json").stdout)["auth"] == "password"
