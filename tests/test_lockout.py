"""Lockout per (user, source address) and its expiry, wrong TOTP codes counting, connection and channel caps,
login timeout: asyncssh has none of these built in, so the broker counts (asyncssh-notes pitfall 14)."""

from __future__ import annotations

import socket
import time

import pytest

from frontdoor_support import add_person, close_world, code, details, events, wait, world_with
from broker.lockout import LockoutPolicy, lockout_left
from helpers.clients import paramiko_session, run_ssh

pytestmark = pytest.mark.openssh

CONFIG = """\
[listen]
login_timeout = "3s"

[limits]
max_auth_failures = 3
failure_window = "10s"
lockout = "2s"
max_connections_per_address = 4
max_unauthenticated = 6
max_startups = "100:30:100"  # no random early drop below the cap: these tests count exact caps (test_startups.py)
max_channels_per_connection = 2
"""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory):
    """A broker on each store: lockout counting is a read-then-write decision the store must keep right."""
    url = None
    if request.param == "postgresql":
        postgres = request.getfixturevalue("postgres")
        url = postgres.new_database()
    try:
        w = world_with(tmp_path_factory.mktemp("lockout"), CONFIG + (f'\n[store]\nurl = "{url}"\n' if url else ""))
        try:
            assert w.app.store.dialect == request.param
            yield w
        finally:
            close_world(w)
    finally:
        if url:
            postgres.drop(url)


@pytest.fixture(scope="module")
def stranger(world, tmp_path_factory):
    from helpers.keys import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("stranger"), "stranger")


def _locked(world, user: str, source: str = "127.0.0.1") -> int:
    return lockout_left(world.app.store, user, source, world.app.clock.now(), LockoutPolicy.from_config(world.app.config))


def _failures(world, user: str, source: str = "127.0.0.1") -> int:
    return len(world.app.store.last_auth_failures(user, source, 100))


def test_wrong_keys_lock_the_pair_for_the_configured_time_then_it_opens_again(world, stranger):
    name, _ = add_person(world, totp=False)
    for _ in range(3):
        r = run_ssh(name, "127.0.0.1", world.port, stranger.private_path, "grants", known_hosts=world.known_hosts)
        assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr
    assert wait(lambda: len(events(world, "auth.lockout", name)) == 1), "the third failure starts a lockout"
    lockout = events(world, "auth.lockout", name)[0]
    assert lockout["source"] == "127.0.0.1" and details(lockout)["lockout_s"] == 2
    assert [details(f)["reason"] for f in events(world, "auth.failure", name)] == ["no accepted key"] * 3

    refused = world.ssh(name, "grants", key=name)  # the right key, during the lockout
    assert refused.returncode == 255
    assert f"too many failed logins for {name} from 127.0.0.1; try again in".encode() in refused.stderr
    assert _failures(world, name) == 3, "an attempt refused because of the lockout is not another failure"

    other_source = world.ssh(name, "grants", key=name, extra_opts=["-b", "127.0.0.2"])
    assert other_source.returncode == 0, other_source.stderr  # the lock is per (user, source address)
    someone_else = world.ssh("bob", "grants")
    assert someone_else.returncode == 0, someone_else.stderr

    assert wait(lambda: _locked(world, name) == 0, timeout=5), "the lockout ends after limits.lockout"
    again = world.ssh(name, "grants", key=name)
    assert again.returncode == 0, again.stderr
    assert wait(lambda: _failures(world, name) == 0), "a complete login clears the pair's failures"
    assert len(events(world, "auth.lockout", name)) == 1, "audited once, when it started"


def test_wrong_codes_count_toward_the_lockout(world):
    name, secret = add_person(world)
    valid = {code(secret, k) for k in (-1, 0, 1, 2)}
    wrong = next(c for c in ("000000", "111111", "222222", "333333", "444444") if c not in valid)
    r = world.ssh(f"{name}@ct-01", "echo nope", key=name, password=wrong)
    assert r.returncode == 255 and b"nope" not in r.stdout
    assert b"2 tries left" in r.stderr and b"1 try left" in r.stderr
    assert f"too many failed logins for {name} from 127.0.0.1; try again in 2s".encode() in r.stderr
    assert [details(f)["reason"] for f in events(world, "auth.failure", name)] == ["wrong verification code"] * 3
    assert len(events(world, "auth.lockout", name)) == 1
    blocked = world.ssh(f"{name}@ct-01", "echo blocked", key=name, password=code(secret))
    assert blocked.returncode == 255 and b"blocked" not in blocked.stdout
    assert b"too many failed logins" in blocked.stderr
    assert wait(lambda: _locked(world, name) == 0, timeout=5)
    ok = world.ssh(name, "grants", key=name, password=code(secret, 1))
    assert ok.returncode == 0, ok.stderr


def test_more_keys_than_allowed_are_cut_off(world, tmp_path):
    from helpers.keys import generate_keypair

    name, _ = add_person(world, totp=False)
    extra = [generate_keypair(tmp_path, f"k{i}") for i in range(7)]
    opts = [o for k in extra[1:] for o in ("-i", str(k.private_path))]
    r = run_ssh(name, "127.0.0.1", world.port, extra[0].private_path, "grants", known_hosts=world.known_hosts,
                extra_opts=opts)
    assert r.returncode == 255
    assert b"too many keys offered (at most 6)" in r.stderr
    assert wait(lambda: _failures(world, name) == 1), "one connection with many wrong keys is one failure"


def _raw_connection(port: int, source: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    """A TCP connection that never speaks SSH, and the first bytes the broker sent (b"" if it dropped it)."""
    s = socket.socket()
    s.settimeout(5)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        try:
            first = s.recv(64)  # the broker's version line: the connection is counted by now
        except ConnectionResetError:
            first = b""
    except BaseException:
        s.close()
        raise
    return s, first


def test_connections_per_address_and_unauthenticated_caps(world):
    held = []
    try:
        for _ in range(4):
            s, first = _raw_connection(world.port)
            held.append(s)
            assert first.startswith(b"SSH-2.0-medbroker")
        r = world.ssh("bob", "grants")
        assert r.returncode == 255
        assert b"too many connections from 127.0.0.1; close some" in r.stderr
        other = world.ssh("bob", "grants", extra_opts=["-b", "127.0.0.2"])
        assert other.returncode == 0, other.stderr  # the per-address cap is per address
        for _ in range(2):  # 6 unauthenticated in all: the broker-wide cap
            held.append(_raw_connection(world.port, "127.0.0.2")[0])
        r = world.ssh("bob", "grants", extra_opts=["-b", "127.0.0.3"])
        assert r.returncode == 255 and b"the broker has too many logins in progress" in r.stderr
        for _ in range(4):  # 8 from 127.0.0.1, twice the cap: the next one is dropped before any kex
            held.append(_raw_connection(world.port)[0])
        s, first = _raw_connection(world.port)
        held.append(s)
        assert first == b""
    finally:
        for s in held:
            s.close()
    assert wait(lambda: world.ssh("bob", "grants").returncode == 0, timeout=10), "caps free up when connections end"
    refusals = [f for f in events(world, "auth.failure") if details(f)["reason"] == "connection limit reached"]
    assert {f["source"] for f in refusals} >= {"127.0.0.1", "127.0.0.3"}


def test_login_timeout_drops_silent_connections(world):
    s, first = _raw_connection(world.port)
    assert first.startswith(b"SSH-2.0-")
    try:
        s.settimeout(10)
        started = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        waited = time.monotonic() - started
    finally:
        s.close()
    assert 2 <= waited <= 9, f"closed after {waited:.1f}s, login_timeout is 3s"


def test_channels_per_connection_are_capped(world):
    name, _ = add_person(world, totp=False)
    with paramiko_session("127.0.0.1", world.port, f"{name}@ct-01", key=world.keys[name].private_path) as client:
        transport = client.get_transport()
        first = transport.open_session(timeout=10)
        first.exec_command("sleep 5")
        second = transport.open_session(timeout=10)
        second.exec_command("sleep 5")
        third = transport.open_session(timeout=10)
        third.exec_command("echo third")
        out = third.makefile_stderr("rb").read()
        assert third.recv_exit_status() == 1
        assert b"at most 2 channels per connection" in out
        for chan in (first, second, third):
            chan.close()
