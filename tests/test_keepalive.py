"""``listen.keepalive_interval`` and ``upstream.keepalive_interval`` end a session whose peer stopped answering,
and only then: a stock OpenSSH client frozen with SIGSTOP, a real sshd device frozen the same way. The
broker re-arms asyncssh's keepalive timer lazily (broker/keepalive.py); these are its behaviour checks."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from broker.keepalive import install_keepalive_hook, keepalive_hook_active
from helpers import poll
from helpers.broker import World
from helpers.procs import living_descendants

PROMPT = re.compile(rb"[#$] ")
CONFIG = """\
[listen]
keepalive_interval = "1s"

[upstream]
keepalive_interval = "1s"
"""
# asyncssh's keepalive_count_max is 3: the 4th unanswered tick ends the connection, ~4 s after the last read.


@pytest.fixture
def kworld(tmp_path: Path, device) -> World:
    w = World(tmp_path, device()).setup(config=CONFIG)
    try:
        yield w
    finally:
        w.close()


def _ends(world: World) -> list[dict]:
    return [json.loads(e["details"]) for e in world.events("session.end")]


def test_the_hook_is_installed_on_the_pinned_asyncssh(kworld: World) -> None:
    assert keepalive_hook_active(), "the broker installs it when it starts listening"
    assert install_keepalive_hook() is True  # idempotent


def test_a_busy_session_outlives_many_intervals_and_a_frozen_client_is_dropped(kworld: World) -> None:
    kworld.grant()
    term = kworld.pty("alice@ct-01")
    try:
        term.expect(PROMPT, timeout=20)
        # Typing for 5 intervals: every read postpones the keepalive, and the live client would answer anyway.
        for i in range(10):
            term.send(f"echo k{i}\r")
            term.expect(f"k{i}\r\n".encode(), timeout=10)
            time.sleep(0.5)
        assert not _ends(kworld), "an active session must not be ended by keepalives"
        os.kill(term.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            ended = poll(lambda: _ends(kworld), timeout=20)
            took = time.monotonic() - frozen
        finally:
            os.kill(term.pid, signal.SIGCONT)
        assert ended, "a client that stopped answering keepalives must be dropped"
        # 3 unanswered keepalives are allowed, 1 s apart: not before ~4 s of silence, not much after.
        assert 3.0 <= took <= 12.0, f"dropped {took:.1f} s after the client froze"
        assert ended[0]["status"] == "closed", ended[0]
        assert ended[0]["reason"] == "the vendor's connection was lost (Client not responding to keepalive)"
    finally:
        term.close()


def test_a_frozen_device_ends_the_session_with_a_reason_for_the_vendor(kworld: World) -> None:
    kworld.grant()
    master = kworld.device.pid
    assert master is not None
    before = {p.pid for p in living_descendants(master)}
    term = kworld.pty("alice@ct-01")
    frozen: list[int] = []
    try:
        term.expect(PROMPT, timeout=20)
        frozen = [p.pid for p in living_descendants(master) if p.pid not in before]
        assert frozen, "the device's per-connection sshd processes"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        tail = term.read_until_eof(timeout=20)
        took = time.monotonic() - started
        assert 3.0 <= took <= 12.0, f"the vendor's session ended {took:.1f} s after the device froze"
        assert b"medbroker" in tail and b"keepalive" in tail, tail
        ended = poll(lambda: _ends(kworld), timeout=10)
        assert ended and ended[0]["reason"] == "the connection to ct-01 was lost (Server not responding to keepalive)"
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        term.close()
