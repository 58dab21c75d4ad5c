"""Key + TOTP: the pinned asyncssh hook with stock OpenSSH (terminal and SSH_ASKPASS) and paramiko; codes are
single-use; a key alone never gets in; sealed secrets; ``medbroker user totp``."""

from __future__ import annotations

import base64
import json
import re
import time

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


# ----------------------------------------------------------------------------- medbroker user totp
def _cli(world: World, *args: str, input: str | None = None):
    from typer.testing import CliRunner

    from broker.cli import app

    return CliRunner().invoke(app, ["--home", str(world.app.home), *args], input=input)


def test_cli_enrols_prints_uri_and_qr_and_the_code_then_works(world):
    name, _ = add_person(world, totp=False)
    r = _cli(world, "user", "totp", name)
    assert r.exit_code == 0, r.output
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://totp/"))
    assert f"medbroker%20broker%3A{name}?secret=" in uri and "&digits=6&period=30" in uri
    assert "█" in r.stdout or "▀" in r.stdout  # the QR code
    secret = re.search(r"secret=([A-Z2-7]+)", uri).group(1)
    assert secret not in world.app.store.get_user(name)["totp_secret"]  # stored sealed
    enrolled = _events(world, "auth.totp.enrolled", name)
    assert len(enrolled) == 1 and secret not in enrolled[0]["details"]
    ok = world.ssh(name, "grants", key=name, password=_code(secret))
    assert ok.returncode == 0, ok.stderr
    assert _details(_events(world, "auth.success", name)[-1])["method"] == "publickey+totp"

    again = _cli(world, "user", "totp", name)
    assert again.exit_code == 1 and "already has TOTP enrolled" in again.stderr and "--reset" in again.stderr
    reset = _cli(world, "user", "totp", name, "--reset", "--no-qr")
    assert reset.exit_code == 0 and "re-enrolled" in reset.stdout and "█" not in reset.stdout
    new_secret = re.search(r"secret=([A-Z2-7]+)", reset.stdout).group(1)
    old = world.ssh(name, "grants", key=name, password=_code(secret, 1))
    assert old.returncode == 255, "the replaced secret stops working at once"
    removed = _cli(world, "user", "totp", name, "--remove")
    assert removed.exit_code == 0 and "key alone" in removed.stdout
    assert len(_events(world, "auth.totp.removed", name)) == 1
    key_only = world.ssh(name, "grants", key=name)
    assert key_only.returncode == 0, key_only.stderr
    assert new_secret != secret


def test_cli_json_never_holds_the_secret_and_needs_a_private_file(world, tmp_path):
    name, _ = add_person(world, totp=False)
    r = _cli(world, "user", "totp", name, "--json")
    assert r.exit_code == 2 and "needs --uri-file" in r.stderr
    assert not world.app.store.get_user(name)["totp_secret"], "a refused command changes nothing"
    target = tmp_path / "uri.txt"
    r = _cli(world, "user", "totp", name, "--json", "--uri-file", str(target))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["totp_enrolled"] is True and doc["uri_file"] == str(target)
    uri = target.read_text().strip()
    secret = re.search(r"secret=([A-Z2-7]+)", uri).group(1)
    assert secret not in r.stdout and (target.stat().st_mode & 0o777) == 0o600
    shown = _cli(world, "user", "show", name, "--json")
    assert json.loads(shown.stdout)["totp_enrolled"] is True and secret not in shown.stdout
    exists = _cli(world, "user", "totp", name, "--reset", "--uri-file", str(target))
    assert exists.exit_code == 2 and "already exists" in exists.stderr
    assert totp_secret(world.app.store, world.app.keys, name).reveal() == secret, "unchanged after the refusal"
    unknown = _cli(world, "user", "totp", "nobody-here")
    assert unknown.exit_code == 1 and "does not exist" in unknown.stderr


# ----------------------------------------------------------------------------- pure TOTP logic
def test_codes_match_pyotp_and_rfc6238_vectors():
    secret = base64.b32encode(b"12345678901234567890").decode()
    for t, expected in ((59, "287082"), (1111111109, "081804"), (1234567890, "005924"), (2000000000, "279037")):
        assert code_for_step(secret, t // 30) == expected  # RFC 6238 appendix B, last six digits
    random_secret = pyotp.random_base32()
    for t in range(0, 10**9, 7_777_777):
        assert code_for_step(random_secret, t // 30) == pyotp.TOTP(random_secret).at(t)


@pytest.mark.parametrize("typed,expected", [("123456", "123456"), (" 123 456 ", "123456"), ("123-456", "123456"),
                                            ("12345", None), ("1234567", None), ("12345a", None),
                                            ("١٢٣٤٥٦", None), ("", None), (None, None), ("1" * 100, None)])
def test_code_normalisation(typed, expected):
    assert normalise_code(typed) == expected


def test_check_code_window_and_replay(tmp_path):
    from datetime import datetime, timezone

    from broker.identity import add_user

    store = open_store(tmp_path / "t.db")
    keys = FileKeyProvider(tmp_path / "data.key")
    keys.rotate()
    try:
        now = datetime(2026, 1, 1, 8, 0, 10, tzinfo=timezone.utc)
        add_user(store, "erin", "vendor", None, now)
        secret = enrol_totp(store, keys, "erin").secret.reveal()
        step = current_step(now)
        assert check_code(store, keys, "erin", code_for_step(secret, step - 2), now).reason == "wrong"
        assert check_code(store, keys, "erin", code_for_step(secret, step - 1), now).ok  # phone a step behind
        assert check_code(store, keys, "erin", code_for_step(secret, step - 1), now).reason == "reused"
        assert check_code(store, keys, "erin", code_for_step(secret, step + 1), now).ok  # phone a step ahead
        assert check_code(store, keys, "erin", code_for_step(secret, step), now).reason == "reused"  # older step
        assert check_code(store, keys, "erin", "12 34", now).reason == "malformed"
        add_user(store, "fay", "vendor", None, now)
        assert check_code(store, keys, "fay", "123456", now).reason == "not-enrolled"
    finally:
        store.close()
