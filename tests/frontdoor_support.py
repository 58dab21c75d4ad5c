"""Shared helpers for the front-door tests (MFA, lockout, limits, secrets, crash, fail-closed)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from itertools import count
from pathlib import Path
from typing import Callable

import pyotp

from broker.identity import add_user, add_user_key
from broker.totp import enrol_totp
from helpers.broker import World
from helpers.keys import generate_keypair

__all__ = ["Serve", "add_person", "close_world", "code", "details", "events", "prepared_home", "wait", "world_with"]

REPO = Path(__file__).resolve().parent.parent

_serial = count(1)


def code(secret: str, offset: int = 0) -> str:
    """What an authenticator app shows now (``offset=1``: the next 30-second step), computed by pyotp."""
    return pyotp.TOTP(secret).at(time.time(), counter_offset=offset)


def add_person(world: World, *, role: str = "vendor", totp: bool = True, grant: bool = True,
               prefix: str = "v") -> tuple[str, str | None]:
    """A new user with an ssh-keygen key (``world.ssh(..., key=name)`` works), TOTP and a grant on ct-01.

    Codes are single-use per user and 30-second step, so tests that log in several times take a fresh
    person instead of waiting for the next step. Returns (name, base32 secret or None).
    """
    name = f"{prefix}{next(_serial)}"
    app = world.app
    now = app.clock.now()
    world.keys[name] = generate_keypair(world.tmp / "people", name)
    add_user(app.store, name, role, "Acme Imaging" if role == "vendor" else None, now)
    add_user_key(app.store, name, world.keys[name].public_key, now)
    secret = enrol_totp(app.store, app.keys, name).secret.reveal() if totp else None
    if grant and role == "vendor":
        world.grant(user=name)
    return name, secret


def events(world: World, name: str, user: str | None = None) -> list[dict]:
    """Audit rows of exactly this event (optionally for one user), oldest first."""
    rows = [r for r in world.events(name) if r["event"] == name]
    return [r for r in rows if user is None or r["user_name"] == user]


def details(row: dict) -> dict:
    """An audit row's details column."""
    return json.loads(row["details"])


def wait(predicate: Callable[[], object], timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true (bounded); returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def world_with(tmp: Path, config: str | None = None, **device_kwargs) -> World:
    """A started World (broker + sshd device) with ``config`` as broker.toml; close both with ``close_world``."""
    from helpers.sshd import SshdDevice

    device = SshdDevice(tmp / "device", **device_kwargs).start()
    try:
        return World(tmp, device).setup(config=config)
    except BaseException:
        device.close()
        raise


def close_world(world: World) -> None:
    """Stop the broker and the device of a :func:`world_with` world."""
    try:
        world.close()
    finally:
        world.device.close()


def prepared_home(tmp: Path, device, config: str | None = None) -> tuple[Path, dict]:
    """A broker home (alice vendor with a 1 h grant on ct-01, bob approver) for a ``medbroker serve`` process.

    Same people and device as :class:`World`, but no broker is started and the app is closed again.
    Returns (home, {name: KeyPair}).
    """
    from broker.app import init_home
    from broker.devices import add_device
    from broker.grants import approve_request, request_grant
    from broker.identity import get_principal

    home = tmp / "home"
    if config is not None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "broker.toml").write_text(config)
    app = init_home(home)
    try:
        now = app.clock.now()
        keys = {}
        for name, role in (("alice", "vendor"), ("bob", "approver")):
            keys[name] = generate_keypair(tmp / "people", name)
            add_user(app.store, name, role, None, now)
            add_user_key(app.store, name, keys[name].public_key, now)
        add_device(app.store, app.audit, app.keys, name="ct-01", host=device.host, port=device.port,
                   login=device.login, host_key=device.host_key_line, now=now,
                   key_text=Path(device.client_key.private_path).read_text())
        req = request_grant(app.store, app.audit, app.rules, get_principal(app.store, "alice"), "ct-01", 3600,
                            "crash test", now)
        approve_request(app.store, app.audit, app.rules, req.id, get_principal(app.store, "bob"), now)
    finally:
        app.close()
    return home, keys


class Serve:
    """``python -m broker.cli --home HOME serve`` as a child process, stderr to a log file."""

    def __init__(self, home: Path, port: int, log: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "--home", str(home), "serve", "--listen", f"127.0.0.1:{port}",
                 *args], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        self._await_line(b"medbroker listening", 60)

    def _await_line(self, needle: bytes, timeout: float) -> None:
        deadline, seen = time.monotonic() + timeout, b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while needle not in seen:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    self.stop()
                    raise AssertionError(f"broker did not start: {seen!r}\n{self.log.read_text()[-3000:]}")
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        continue
                    seen += chunk

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)  # reaped: a zombie would still look alive to the next broker's pid check
        self.proc.stdout.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self.proc.stdout.closed:
            self.proc.stdout.close()
        return self.proc.returncode
