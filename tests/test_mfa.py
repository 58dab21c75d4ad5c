"""Key + TOTP: the pinned asyncssh hook with stock OpenSSH (terminal and SSH_ASKPASS) and paramiko; codes are
single-use; a key alone never gets in; sealed secrets; ``medbroker user totp``."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import paramiko
import pyotp
import pytest

import asyncssh
import broker.mfa as mfa
from broker.keys import FileKeyProvider
from broker.totp import check_code, code_for_step, current_step, enrol_totp, normalise_code, totp_secret
from broker.store import open_store
from frontdoor_support import add_person, close_world, code as _code, details as _details, events as _events
from frontdoor_support import wait as _wait, world_with
from helpers.broker import World
from helpers.clients import paramiko_exec

pytestmark = pytest.mark.openssh


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = world_with(tmp_path_factory.mktemp("mfa"))
    try:
        yield w
    finally:
        close_world(w)


@pytest.fixture
def vendor(world):
    """A fresh vendor with a key, TOTP and a grant on ct-01: (name, secret)."""
    return add_person(world)


# ----------------------------------------------------------------------------- the hook itself
def test_hook_is_installed_on_the_pinned_asyncssh(world):
    """Regression guard: an asyncssh upgrade that moves the private names must fail here, loudly."""
    status = mfa.install_mfa_hook()
    assert status.active, f"key + TOTP hook inactive with asyncssh {asyncssh.__version__}: {status.reason}"
    assert asyncssh.__version__ in mfa.TESTED_ASYNCSSH, (
        f"asyncssh {asyncssh.__version__} is not a release the MFA hook was verified with "
        f"({mfa.TESTED_ASYNCSSH}); rerun this file and docs/mfa.md's manual check, then add it")
    handler = asyncssh.auth._server_auth_handlers[b"publickey"]
    assert getattr(handler, "_medbroker_mfa", False) and issubclass(handler, asyncssh.auth._ServerPublicKeyAuth)
    assert mfa.install_mfa_hook() is status  # idempotent


# ----------------------------------------------------------------------------- stock OpenSSH
def test_openssh_terminal_prompts_for_the_code_then_runs_the_command(world, vendor):
    name, secret = vendor
    with world.pty(f"{name}@ct-01", "echo mfa-$((40+2))") as term:
        started = time.monotonic()
        term.expect(f"({name}@ct-01@127.0.0.1) Verification code:".encode(), timeout=15)
        prompted = time.monotonic()
        term.sendline(_code(secret))
        term.expect(b"mfa-42", timeout=15)
        assert term.wait(15) == 0
    success = _events(world, "auth.success", name)[-1]
    assert _details(success)["method"] == "publickey+totp"
    print(f"key verified -> prompt {1000 * (prompted - started):.0f} ms")


def test_openssh_askpass_code_works_once_then_is_rejected_as_reused(world, vendor):
    name, secret = vendor
    code = _code(secret)
    first = world.ssh(f"{name}@ct-01", "echo first-login", key=name, password=code)
    assert first.returncode == 0, first.stderr
    assert first.stdout == b"first-login\n"
    again = world.ssh(f"{name}@ct-01", "echo replayed", key=name, password=code)
    assert again.returncode == 255
    assert b"replayed" not in again.stdout
    assert b"wrong or already used" in again.stderr
    reasons = [_details(r)["reason"] for r in _events(world, "auth.failure", name)]
    assert reasons[0] == "reused verification code"
    later = world.ssh(f"{name}@ct-01", "echo next-step", key=name, password=_code(secret, 1))
    assert later.returncode == 0 and later.stdout == b"next-step\n", later.stderr


def _wrong(secret: str) -> str:
    valid = {_code(secret, k) for k in (-1, 0, 1, 2)}
    return next(c for c in ("000000", "111111", "222222", "333333", "444444") if c not in valid)


def test_wrong_codes_end_after_three_tries_with_a_clear_message(world, vendor):
    name, secret = vendor
    r = world.ssh(f"{name}@ct-01", "echo nope", key=name, password=_wrong(secret))
    assert r.returncode == 255 and b"nope" not in r.stdout
    assert b"2 tries left" in r.stderr and b"1 try left" in r.stderr
    assert b"wait for the next code in your authenticator app" in r.stderr
    failures = _events(world, "auth.failure", name)
    assert [_details(f)["reason"] for f in failures] == ["wrong verification code"] * 3
    assert all(_details(f)["method"] == "keyboard-interactive" for f in failures)


def test_batch_mode_cannot_answer_and_nothing_is_counted(world, vendor):
    name, _ = vendor
    r = world.ssh(f"{name}@ct-01", "true", key=name)  # BatchMode=yes: ssh skips keyboard-interactive
    assert r.returncode == 255
    assert b"Permission denied (keyboard-interactive)" in r.stderr
    assert _wait(lambda: any(_details(f)["reason"] == "no verification code entered"
                             for f in _events(world, "auth.failure", name)))
    assert world.app.store.last_auth_failures(name, "127.0.0.1", 10) == []


def test_users_without_totp_still_log_in_with_their_key_alone(world):
    r = world.ssh("bob", "grants")
    assert r.returncode == 0, r.stderr
    assert _details(_events(world, "auth.success", "bob")[-1])["method"] == "publickey"


# ----------------------------------------------------------------------------- paramiko
def _transport(world: World) -> paramiko.Transport:
    transport = paramiko.Transport(("127.0.0.1", world.port))
    transport.start_client(timeout=10)
    return transport


def test_paramiko_publickey_then_keyboard_interactive(world, vendor):
    name, secret = vendor
    key = paramiko.PKey.from_path(world.keys[name].private_path)
    transport = _transport(world)
    try:
        remaining = transport.auth_publickey(f"{name}@ct-01", key)
        assert remaining == ["keyboard-interactive"]  # partial success
        assert not transport.is_authenticated()
        prompts_seen = []

        def answer(title, instructions, prompts):
            prompts_seen.append([p for p, _ in prompts])
            return [_code(secret)] * len(prompts)

        assert transport.auth_interactive(f"{name}@ct-01", answer) == []
        assert transport.is_authenticated()
        assert prompts_seen == [["Verification code: "]]
        client = paramiko.SSHClient()
        client._transport = transport  # reuse the authenticated transport for the exec helper
        rc, out, _ = paramiko_exec(client, "echo via-paramiko")
        assert (rc, out) == (0, b"via-paramiko\n")
    finally:
        transport.close()


def test_a_key_alone_opens_nothing_and_a_code_alone_is_not_offered(world, vendor):
    name, secret = vendor
    key = paramiko.PKey.from_path(world.keys[name].private_path)
    transport = _transport(world)
    try:
        transport.auth_publickey(f"{name}@ct-01", key)
        with pytest.raises(paramiko.SSHException):
            transport.open_session(timeout=5)
    finally:
        transport.close()
    transport = _transport(world)
    try:  # keyboard-interactive before any key: not even offered
        with pytest.raises(paramiko.BadAuthenticationType) as info:
            transport.auth_interactive(f"{name}@ct-01", lambda *a: [_code(secret)])
        assert info.value.allowed_types == ["publickey"]
    finally:
        transport.close()


def test_without_the_hook_totp_users_are_refused_not_let_in(world, vendor, monkeypatch):
    """Fail closed: if the hook could not be installed, a key alone must not be enough."""
    name, secret = vendor
    monkeypatch.setattr(mfa, "_status", mfa.HookStatus(False, "simulated asyncssh change", "x"))
    r = world.ssh(f"{name}@ct-01", "echo should-not-run", key=name, password=_code(secret))
    assert r.returncode == 255 and b"should-not-run" not in r.stdout
    assert b"cannot ask for one right now" in r.stderr
    assert _wait(lambda: any("second factor unavailable" in _details(f)["reason"]
                             for f in _events(world, "auth.failure", name)))
    ok = world.ssh("bob", "grants")  # users without TOTP are unaffected
    assert ok.returncode == 0, ok.stderr


# ----------------------------------------------------------------------------- storage of the secret
def test_secret_is_sealed_and_bound_to_its_user(world, vendor, tmp_path):
    name, secret = vendor
    row = world.app.store.get_user(name)
    assert secret not in row["totp_secret"] and ":" in row["totp_secret"]
    assert base64.b64encode(base64.b32decode(secret)).decode()[:20] not in row["totp_secret"]
    assert totp_secret(world.app.store, world.app.keys, name).reveal() == secret
    # moving the sealed secret to another user does not give them these codes: it does not decrypt
    store = open_store(tmp_path / "copy.db")
    try:
        store.insert_user("bob", "vendor", None, "2026-01-01T00:00:00.000000Z")
        store.set_user_totp("bob", row["totp_secret"])
        from broker.errors import StorageError

        with pytest.raises(StorageError):
            check_code(store, world.app.keys, "bob", _code(secret), world.app.clock.now())
    finally:
        store.close()
