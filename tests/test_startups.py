"""Pre-authentication slots (issue 11, finding 9): a few addresses holding idle connections cannot starve
everyone else; recent addresses keep a reserved share; penalties for failed or unfinished logins, audited.
The gate itself without SSH, then every [limits] key end to end with real OpenSSH and raw TCP sockets."""

from __future__ import annotations

import json
import random
import socket
import time
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import parse_startups
from broker.errors import ConfigError, UsageError
from broker.startups import StartupGate, StartupPolicy
from helpers import poll as _wait
from helpers.broker import World

POLICY = StartupPolicy(max_unauthenticated=64, per_address=8, drop_start=32, drop_rate=30, drop_full=64,
                       reserved=16, recent_s=3600, penalty_authfail_s=5, penalty_grace_s=20, penalty_min_s=30,
                       penalty_max_s=600)


# ----------------------------------------------------------------------------------------- the gate
def test_per_address_share_and_reserved_slots():
    gate = StartupGate(POLICY, rng=random.Random(1))
    for _ in range(8):
        assert gate.admit("10.0.0.2", 10, 0).reason is None
        gate.started("10.0.0.2")
    assert "from this address" in gate.admit("10.0.0.2", 10, 0).reason
    gate.ended("10.0.0.2")
    assert gate.admit("10.0.0.2", 10, 0).reason is None
    assert "kept for recent addresses" in gate.admit("10.0.0.9", 49, 0).reason  # 64 - 16 reserved


def test_random_early_drop_follows_start_rate_full():
    gate = StartupGate(POLICY, rng=random.Random(7))

    def dropped(n: int) -> float:
        return sum(gate.admit(f"10.1.{i // 250}.{i % 250}", n, 0).reason is not None for i in range(4000)) / 4000

    assert dropped(32) == 0  # at start: nothing dropped yet
    assert 0.25 < dropped(33) < 0.37  # just above: about the rate (30 %)
    assert 0.42 < dropped(40) < 0.54  # 30 + 70 * 8/32 = 47.5 %; over 48 the reserved share refuses all
    assert dropped(49) == 1.0


def test_penalties_accumulate_activate_cap_and_are_forgiven_by_a_login():
    gate = StartupGate(POLICY)
    assert gate.penalise("10.0.0.3", "authfail", 0) == 0  # 5 s: below the 30 s minimum, not refused
    assert gate.penalty_left("10.0.0.3", 0) == 0
    assert gate.penalise("10.0.0.3", "grace", 0) == 0  # 25 s
    assert gate.penalise("10.0.0.3", "authfail", 0) == 30  # 30 s: refused from now on, audited once
    assert gate.admit("10.0.0.3", 1, 1).reason == "penalised"
    assert gate.penalise("10.0.0.3", "grace", 1) == 0  # already refused: not audited again
    for _ in range(100):
        gate.penalise("10.0.0.3", "grace", 2)
    assert gate.penalty_left("10.0.0.3", 2) == 600  # never more than penalty_max
    assert gate.penalty_left("10.0.0.3", 603) == 0  # served
    gate.penalise("10.0.0.4", "grace", 0)
    gate.penalise("10.0.0.4", "grace", 0)
    assert gate.penalty_left("10.0.0.4", 1) > 0
    gate.logged_in("10.0.0.4", 1)
    assert gate.penalty_left("10.0.0.4", 1) == 0 and gate.is_recent("10.0.0.4", 3000)
    assert not gate.is_recent("10.0.0.4", 3602)
    assert gate.penalise("10.0.0.4", "authfail", 2) == 0 and "10.0.0.4" not in gate.penalties  # recent: exempt


@settings(max_examples=300)
@given(st.text(max_size=20))
def test_parse_startups_fuzz(text):
    try:
        start, rate, full = parse_startups(text)
    except UsageError as exc:
        assert "max_startups" in exc.message
        return
    assert 0 <= start <= full <= 100 and 0 <= rate <= 100
    assert set(text) <= set("0123456789:")


@pytest.mark.parametrize("bad,what", [
    ('max_startups = "10:30"', "start:rate:full"), ('max_startups = "60:30:50"', "start <= full"),
    ('max_startups = "10:130:100"', "rate <= 100"), ('max_startups = "a:b:c"', "start:rate:full"),
    ("reserved_for_recent = 95", "over 90"), ("max_unauthenticated_per_address = 0", "at least 1"),
    ('penalty_min = "20m"', "penalty_min is longer"), ('penalty_grace = "0s"', "penalty_grace"),
    ('recent_login_window = "soon"', "recent_login_window"),
])
def test_limits_keys_are_validated(tmp_path, bad, what):
    from broker.config import load_config

    (tmp_path / "broker.toml").write_text(f"[limits]\n{bad}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "broker.toml", home=tmp_path)
    assert what in err.value.message


# ----------------------------------------------------------------------------------------- end to end
pytestmark_e2e = pytest.mark.openssh


def _raw(port: int, source: str) -> tuple[socket.socket, bool]:
    """A TCP connection from ``source`` that never speaks SSH; True when the broker sent its version line
    (it holds a pre-auth slot), False when it was dropped at once."""
    s = socket.socket()
    s.settimeout(3)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        try:
            held = s.recv(64).startswith(b"SSH-2.0-")
        except (ConnectionResetError, socket.timeout):
            held = False
    except BaseException:
        s.close()
        raise
    return s, held


@contextmanager
def _held(port: int, sources: list[str], each: int):
    socks, held = [], {src: 0 for src in sources}
    try:
        for src in sources:
            for _ in range(each):
                s, ok = _raw(port, src)
                socks.append(s)
                held[src] += ok
        yield held
    finally:
        for s in socks:
            s.close()


@contextmanager
def _world(tmp_path, device, config: str):
    w = World(tmp_path, device()).setup(config=config)
    try:
        yield w
    finally:
        w.close()


def _details(world, event: str) -> list[dict]:
    return [dict(json.loads(e["details"]), source=e["source"]) for e in world.events(event)]


@pytestmark_e2e
def test_90_idle_connections_from_three_addresses_cannot_refuse_other_logins(tmp_path, device):
    """The finding: 30 idle TCP connections from each of 127.0.0.2/.3/.4 (under the per-address cap of 32).
    A recent address (127.0.0.1) and a fresh one (127.0.0.5) still log in; the idle holders are penalised when
    the login timeout drops them (auth.penalty), and are then refused at once."""
    with _world(tmp_path, device, '[listen]\nlogin_timeout = "3s"\n') as w:
        w.grant()
        assert w.ssh("alice", "status").returncode == 0  # 127.0.0.1 has logged in: a recent address
        with _held(w.port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 30) as held:
            assert held == {"127.0.0.2": 8, "127.0.0.3": 8, "127.0.0.4": 8}  # limits.max_unauthenticated_per_address
            r = w.ssh("alice@ct-01", "echo in")
            assert r.returncode == 0 and r.stdout == b"in\n", r.stderr
            fresh = w.ssh("bob", "status", extra_opts=["-b", "127.0.0.5"])
            assert fresh.returncode == 0, fresh.stderr
            # the idle ones time out (listen.login_timeout): 8 x 20 s each, capped at 10 min
            assert _wait(lambda: {d["source"] for d in _details(w, "auth.penalty")} >= {
                "127.0.0.2", "127.0.0.3", "127.0.0.4"}, 15)
        penalties = {d["source"]: d for d in _details(w, "auth.penalty")}
        assert penalties["127.0.0.2"]["reason"] == "grace" and 30 <= penalties["127.0.0.2"]["penalty_s"] <= 600
        t0 = time.monotonic()
        s, held_again = _raw(w.port, "127.0.0.2")
        s.close()
        assert not held_again and time.monotonic() - t0 < 1  # refused fast, no key exchange
        assert _wait(lambda: any(d["reason"] == "penalised" and d["source"] == "127.0.0.2"
                                 for d in _details(w, "auth.failure")))
        refusals = {d["reason"] for d in _details(w, "auth.failure")}
        assert "too many logins in progress from this address" in refusals
        assert w.ssh("alice@ct-01", "echo still").returncode == 0


@pytestmark_e2e
def test_reserved_share_and_recent_login_window(tmp_path, device):
    config = ('[limits]\nmax_unauthenticated = 10\nreserved_for_recent = 50\nmax_startups = "100:0:100"\n'
              'recent_login_window = "3s"\n')
    with _world(tmp_path, device, config) as w:
        assert w.ssh("alice", "status").returncode == 0
        with _held(w.port, ["127.0.0.2"], 5) as held:
            assert held == {"127.0.0.2": 5}  # the 5 slots outside the reserved share
            fresh = w.ssh("bob", "status", extra_opts=["-b", "127.0.0.3"])
            assert fresh.returncode == 255 and b"status" not in fresh.stdout
            recent = w.ssh("alice", "status")
            assert recent.returncode == 0, recent.stderr  # 127.0.0.1 uses the reserved share
            time.sleep(3.5)  # past recent_login_window: 127.0.0.1 is an address like any other again
            late = w.ssh("alice", "status")
            assert late.returncode == 255
        assert any(d["reason"].startswith("no pre-authentication slot") for d in _details(w, "auth.failure"))


@pytestmark_e2e
def test_max_startups_drops_at_random_above_start(tmp_path, device):
    config = '[limits]\nmax_unauthenticated = 10\nmax_startups = "10:100:100"\nreserved_for_recent = 0\n'
    with _world(tmp_path, device, config) as w:
        with _held(w.port, ["127.0.0.2"], 1) as held:
            assert held == {"127.0.0.2": 1}  # 1 in progress: at start (10 % of 10), not above
            r = w.ssh("bob", "status", extra_opts=["-b", "127.0.0.3"])
            assert r.returncode == 255  # above start with rate 100: always dropped
        assert w.ssh("bob", "status", extra_opts=["-b", "127.0.0.3"]).returncode == 0  # freed again
        assert any(d["reason"].startswith("random early drop") for d in _details(w, "auth.failure"))


@pytestmark_e2e
def test_failed_logins_penalise_the_address(tmp_path, device, ssh_keys):
    config = '[limits]\npenalty_authfail = "15s"\npenalty_min = "20s"\npenalty_max = "25s"\nmax_auth_failures = 10\n'
    stranger = ssh_keys("stranger")
    with _world(tmp_path, device, config) as w:
        from helpers.clients import run_ssh

        def attempt():
            return run_ssh("bob", "127.0.0.1", w.port, stranger.private_path, "status", known_hosts=w.known_hosts,
                           extra_opts=["-b", "127.0.0.6"])

        assert b"Permission denied" in attempt().stderr
        assert not _details(w, "auth.penalty")  # 15 s < penalty_min
        assert b"Permission denied" in attempt().stderr
        assert _wait(lambda: _details(w, "auth.penalty"))
        pen = _details(w, "auth.penalty")[0]
        assert pen["source"] == "127.0.0.6" and pen["reason"] == "authfail" and pen["penalty_s"] == 25  # capped
        refused = w.ssh("bob", "status", extra_opts=["-b", "127.0.0.6"])  # even with the right key
        assert refused.returncode == 255 and b"Permission denied" not in refused.stderr
        assert w.ssh("bob", "status", extra_opts=["-b", "127.0.0.7"]).returncode == 0  # only that address
