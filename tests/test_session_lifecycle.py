"""Session lifecycle (issue 11, findings 1 and 5): a vendor who leaves mid-start leaves nothing behind, and
kill / revoke / disable / key removal / role change / device removal end live sessions within a second,
however many other sessions are starting and dying around them. Real OpenSSH, paramiko and sshd."""

from __future__ import annotations

import asyncio
import json
import re
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app as cli_app
from broker.devices import add_device
from broker.grants import revoke_grant
from broker.identity import add_user, add_user_key, get_principal
from helpers.clients import ControlMaster, paramiko_connect, ssh_options
from helpers.keys import generate_keypair
from helpers import poll as _wait
from helpers.net import SilentListener

pytestmark = pytest.mark.openssh
runner = CliRunner()


def _ssh_argv(world, login: str, *extra: str, key: str | None = None) -> list[str]:
    who = key or login.split("@")[0]
    return ["ssh", *ssh_options(key=world.keys[who].private_path, known_hosts=world.known_hosts,
                                host_key_checking="yes"), "-p", str(world.port), *extra, f"{login}@127.0.0.1"]


def _device_connections(port: int) -> int:
    """Established TCP connections to the device's sshd (only the broker connects there)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True,
                         text=True, timeout=10).stdout
    return len([line for line in out.splitlines() if line.strip()])


def _no_ghosts(world) -> None:
    """No live row, no live session in the broker, no device connection left over."""
    assert _wait(lambda: not world.app.store.list_sessions(status="live"), 15), \
        world.app.store.list_sessions(status="live")
    assert world.harness.live_count() == 0
    assert _wait(lambda: _device_connections(world.device.port) == 0, 10)
    assert _wait(lambda: world.harness.call(_per_address(world.harness.broker)) == {}, 10), \
        world.harness.call(_per_address(world.harness.broker))  # every connection gone, counted out


async def _per_address(broker):
    return dict(broker.per_address)


def _cli(world, *args: str):
    r = runner.invoke(cli_app, ["--home", str(world.app.home), *args])
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


# ----------------------------------------------------------------------------------------- finding 1
def test_refused_forward_quits_ssh_mid_start_and_leaves_no_ghost(world):
    """``ssh -o ExitOnForwardFailure=yes -R ...``: ssh opens the session channel, the -R is refused, ssh quits
    while the broker is still connecting to the device. Repeated: nothing stays live, no device link stays."""
    world.grant()
    for _ in range(8):
        r = subprocess.run(_ssh_argv(world, "alice@ct-01", "-o", "ExitOnForwardFailure=yes",
                                     "-R", "0:127.0.0.1:22") + ["true"],
                           capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode != 0
    _no_ghosts(world)
    for row in world.app.store.list_sessions():
        assert row["status"] in ("closed", "failed"), row
        assert row["ended_at"] and row["end_reason"]
    ends = [json.loads(e["details"]) for e in world.events("session.end")]
    assert len(ends) == len(world.app.store.list_sessions())
    verify = _cli(world, "audit", "verify")  # the aborted starts reconcile with the audit chain
    assert verify.exit_code == 0, verify.stdout + verify.stderr


def test_vendor_gone_while_device_is_slow_cancels_the_start(world):
    """A device that never answers keeps the start pending; the vendor leaving cancels it at once: the row is
    closed with the reason, the recording sealed, the device's half-open connection closed."""
    from sessions.recording import verify_recording

    now = world.app.clock.now()
    key = Path(world.device.client_key.private_path).read_text()
    with SilentListener() as silent:
        add_device(world.app.store, world.app.audit, world.app.keys, name="slow-01", host="127.0.0.1",
                   port=silent.port, login="root", host_key=world.device.host_key_line, now=now, key_text=key)
        world.grant(device="slow-01")
        proc = subprocess.Popen(_ssh_argv(world, "alice@slow-01") + ["true"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert _wait(lambda: silent.accepted >= 1, 20)
            assert world.app.store.list_sessions(status="live")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert _wait(lambda: not world.app.store.list_sessions(status="live"), 5)
            ended_in = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        row = world.app.store.list_sessions()[-1]
        assert ended_in < 2  # cancelled, not left for the 10 s connect timeout
        assert row["status"] == "closed" and "disconnected while medbroker was connecting" in row["end_reason"]
        assert verify_recording(world.app.recordings.local_path(row["recording"]), expected_final_hash=row["final_hash"],
                                key_lookup=world.app.keys.get).ok
        assert world.harness.live_count() == 0


def test_revoke_during_a_slow_start_ends_it_within_a_second(world):
    """The grant is revoked while the broker still waits for a device that does not answer: the start is
    cancelled, the vendor told why, the row ends 'revoked', no device connection is left."""
    now = world.app.clock.now()
    key = Path(world.device.client_key.private_path).read_text()
    with SilentListener() as silent:
        add_device(world.app.store, world.app.audit, world.app.keys, name="slow-01", host="127.0.0.1",
                   port=silent.port, login="root", host_key=world.device.host_key_line, now=now, key_text=key)
        grant = world.grant(device="slow-01")
        proc = subprocess.Popen(_ssh_argv(world, "alice@slow-01") + ["echo must-not-run"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert _wait(lambda: silent.accepted >= 1, 20)
            t0 = time.monotonic()
            revoke_grant(world.app.store, world.app.audit, grant.id, get_principal(world.app.store, "bob"),
                         world.app.clock.now(), "wrong device")
            out, err = proc.communicate(timeout=10)
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert elapsed < 1.0 and proc.returncode != 0 and b"must-not-run" not in out
        assert b"your access to slow-01 was revoked by bob: wrong device" in err
        row = world.app.store.list_sessions()[-1]
        assert row["status"] == "revoked" and "revoked by bob" in row["end_reason"]
        assert world.harness.live_count() == 0


@pytest.mark.parametrize("when", [0.0, 0.02, 0.05, 0.1, 0.2])
def test_paramiko_closing_right_after_the_channel_open_leaves_nothing(world, when):
    world.grant()
    for _ in range(4):
        client = paramiko_connect("127.0.0.1", world.port, "alice@ct-01", key=world.keys["alice"].private_path)
        transport = client.get_transport()
        _open_async(transport)  # the open may not have finished when the client goes: that is the point
        time.sleep(when)
        _reset(client)
    _no_ghosts(world)


def _reset(client) -> None:
    """Drop the connection the hard way (TCP RST, like a killed client or a lost link), then clean up."""
    sock = client.get_transport().sock
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    client.close()


def _open_async(transport) -> None:
    """Send CHANNEL_OPEN without waiting for the answer (paramiko's open_channel blocks for it)."""
    threading.Thread(target=lambda: _quiet(lambda: transport.open_session(timeout=5)), daemon=True).start()


def _quiet(fn) -> None:
    try:
        fn()
    except Exception:
        pass


async def _finish_cancelled_half_way(broker) -> dict:
    """Start ``finish`` on the one live session, cancel its caller while it closes the device link, then
    call it again: the second call must wait for the first one's work, not return at once."""
    live = next(iter(broker.live.values()))
    caller = asyncio.ensure_future(live.finish("killed", reason="ended by the test"))
    for _ in range(10_000):  # cancelled at every wait until it gives up (asyncio.wait_for swallows a cancel
        await asyncio.sleep(0)  # that lands as its inner wait finishes, so one cancel may not reach it)
        if caller.done():
            break
        caller.cancel()
    try:
        await caller
    except asyncio.CancelledError:
        pass
    await asyncio.wait_for(live.finish("closed"), 15)
    return broker.app.store.get_session(live.id)


def test_a_finish_whose_caller_is_cancelled_half_way_still_ends_the_row(world):
    """The ghost class behind finding 1: ending a session is interrupted (the vendor leaves while a failed
    start is closed, the broker stops): the row still ends, with the first caller's status, and the device
    link and the vendor's connection close."""
    world.grant()
    proc = subprocess.Popen(_ssh_argv(world, "alice@ct-01") + ["sleep 60"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: world.harness.live_count() == 1, 20)
        row = world.harness.call(_finish_cancelled_half_way(world.harness.broker))
        assert row["status"] == "killed" and row["end_reason"] == "ended by the test" and row["ended_at"]
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _no_ghosts(world)


def test_kill_revoke_and_expiry_never_fail_on_half_started_sessions(world):
    """Many vendors vanish mid-start while security kills one session and revokes another's grant: every
    real session ends, the control loop keeps running, no ghost remains."""
    grant = world.grant(600)
    procs = [subprocess.Popen(_ssh_argv(world, "alice@ct-01") + ["sleep 60"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        assert _wait(lambda: world.harness.live_count() == 2, 20)
        sid = world.app.store.list_sessions(status="live")[0]["id"]  # a real one, before the storm's rows exist
        storm = _Storm(world, 30, logins=["alice@ct-01"])
        storm.start()
        r = _cli(world, "sessions", "kill", sid, "--reason", "test kill", "--by", "carol")
        assert r.exit_code == 0, r.stdout + r.stderr
        time.sleep(0.3)
        revoke_grant(world.app.store, world.app.audit, grant.id, get_principal(world.app.store, "bob"),
                     world.app.clock.now(), "done")
        errs = [p.communicate(timeout=10)[1] for p in procs]
        storm.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert any(b"security staff ended this session: test kill" in e for e in errs)
    assert any(b"revoked by bob: done" in e for e in errs)
    _no_ghosts(world)


# ----------------------------------------------------------------------------------------- load test
class _Storm:
    """``count`` paramiko clients that log in, open a session channel (the broker starts connecting to the
    device) and drop the connection at once, ``parallel`` at a time, cycling through ``logins``."""

    def __init__(self, world, count: int, *, logins: list[str], parallel: int = 10) -> None:
        self.world, self.count, self.logins, self.parallel = world, count, logins, parallel
        self.done = 0
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(parallel)]

    def start(self) -> "_Storm":
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "storm clients hung"

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._next >= self.count:
                    return
                n = self._next
                self._next += 1
            login = self.logins[n % len(self.logins)]
            who = login.split("@")[0]
            try:
                client = paramiko_connect("127.0.0.1", self.world.port, login, key=self.world.keys[who].private_path,
                                          timeout=20)
            except Exception:  # refused (no grant any more, caps): also a client that came and went
                continue
            try:
                transport = client.get_transport()
                chan = transport.open_session(timeout=20) if n % 3 == 0 else None
                if chan is None:
                    _open_async(transport)
                    time.sleep((n % 5) * 0.01)
                elif n % 2:
                    chan.exec_command("true")
            except Exception:
                pass
            finally:
                _reset(client) if n % 2 == 0 else client.close()
            with self._lock:
                self.done += 1


def test_revoke_within_a_second_during_100_connect_and_vanish_vendors(world, tmp_path):
    """The required load test: 3 real sessions live, 100 clients that open a session channel and vanish
    (half as alice on the grant being revoked, half as eve on her own grant), revoke in the middle: every
    session of the grant ends within 1 s; afterwards no live row and no device connection is left."""
    now = world.app.clock.now()
    world.keys["eve"] = generate_keypair(tmp_path / "people", "eve")
    add_user(world.app.store, "eve", "vendor", "Other Co", now)
    add_user_key(world.app.store, "eve", world.keys["eve"].public_key, now)
    grant = world.grant(600)
    world.grant(600, user="eve")
    procs = [subprocess.Popen(_ssh_argv(world, "alice@ct-01") + ["sleep 60"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    storm = _Storm(world, 100, logins=["alice@ct-01", "eve@ct-01"], parallel=12)
    ended: dict[int, float] = {}
    try:
        assert _wait(lambda: world.harness.live_count() >= 3, 20)
        storm.start()
        assert _wait(lambda: storm.done >= 30, 60)  # mid-storm
        t0 = time.monotonic()
        revoke_grant(world.app.store, world.app.audit, grant.id, get_principal(world.app.store, "bob"),
                     world.app.clock.now(), "load test")
        while len(ended) < 3 and time.monotonic() - t0 < 10:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - t0
            time.sleep(0.01)
        errs = [p.communicate(timeout=10)[1] for p in procs]
        storm.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    print("ports broker", world.port, "device", world.device.port)
    worst = max(ended.values()) if len(ended) == 3 else float("inf")
    print(f"revoke → vendor ssh exited: {sorted(round(v, 3) for v in ended.values())} s; storm {storm.done} clients")
    assert worst < 1.0, ended
    assert all(b"revoked by bob: load test" in e for e in errs)
    _no_ghosts(world)
    statuses = {row["status"] for row in world.app.store.list_sessions()}
    assert statuses <= {"closed", "failed", "revoked"}, statuses
    verify = _cli(world, "audit", "verify")
    assert verify.exit_code == 0, verify.stdout + verify.stderr


# ----------------------------------------------------------------------------------------- finding 5
def _wait_exit(proc, t0: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return time.monotonic() - t0


def test_disable_ends_a_live_pty_session_within_a_second_and_says_why(world):
    world.grant()
    with world.pty("alice@ct-01") as term:
        term.expect(re.compile(rb"[#$] "), timeout=20)
        t0 = time.monotonic()
        r = _cli(world, "user", "disable", "alice", "--reason", "left the company")
        assert r.exit_code == 0, r.stdout + r.stderr
        elapsed = None
        term.expect(b"was disabled", timeout=5)
        assert term.wait(5) != 0
        elapsed = time.monotonic() - t0
        screen = bytes(term.output)
    print(f"user disable → vendor's ssh exited in {elapsed:.3f} s")
    assert elapsed < 1.0
    assert b"the account alice was disabled by the hospital's medbroker administrators" in screen
    assert "end within a second" in r.stdout
    _no_ghosts(world)
    stopped = [json.loads(e["details"]) for e in world.events("session.stopped")]
    assert stopped and stopped[-1]["cause"] == "user.disabled"
    row = world.app.store.list_sessions()[-1]
    assert row["status"] == "stopped" and "disabled" in row["end_reason"]


@pytest.mark.parametrize("change", ["key", "role", "device"])
def test_key_removal_role_change_and_device_removal_end_live_sessions(world, change):
    world.grant()
    proc = subprocess.Popen(_ssh_argv(world, "alice@ct-01") + ["sleep 60"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: world.harness.live_count() == 1, 20)
        fingerprint = world.app.store.user_keys("alice")[0]["fingerprint"]
        assert world.app.store.list_sessions(status="live")[0]["auth_key"] == fingerprint
        args = {"key": ["user", "key", "remove", "alice", fingerprint],
                "role": ["user", "role", "alice", "approver"],
                "device": ["device", "remove", "ct-01"]}[change]
        t0 = time.monotonic()
        r = _cli(world, *args)
        assert r.exit_code == 0, r.stdout + r.stderr
        elapsed = _wait_exit(proc, t0)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{change} change → vendor's ssh exited in {elapsed:.3f} s")
    assert elapsed < 1.0
    expected = {"key": f"the SSH key this session logged in with ({fingerprint}) was removed".encode(),
                "role": b"the role of alice changed from vendor to approver",
                "device": b"ct-01 was removed from medbroker"}[change]
    assert expected in err and b"so this session was ended" in err
    cause = {"key": "user.key.removed", "role": "user.role.changed", "device": "device.removed"}[change]
    assert _wait(lambda: world.events("session.stopped"), 5)
    assert json.loads(world.events("session.stopped")[-1]["details"])["cause"] == cause
    assert world.events({"key": "user.key.removed", "role": "user.role.changed", "device": "device.removed"}[change])
    _no_ghosts(world)


def test_new_channels_on_an_open_connection_are_refused_after_disable(world):
    """ControlMaster connections that are already authenticated: a device one without a live session yet, a
    device one with a live session, and one to the broker itself (self-service): all refuse new channels."""
    world.grant()
    kw = dict(known_hosts=world.known_hosts)
    key = world.keys["alice"].private_path
    with ControlMaster("alice@ct-01", "127.0.0.1", world.port, key, **kw) as idle, \
            ControlMaster("alice@ct-01", "127.0.0.1", world.port, key, **kw) as busy, \
            ControlMaster("alice", "127.0.0.1", world.port, key, **kw) as selfservice:
        assert busy.run("echo one").stdout == b"one\n"
        assert selfservice.run("status").returncode == 0
        r = _cli(world, "user", "disable", "alice")
        assert r.exit_code == 0
        for cm in (idle, selfservice):
            res = cm.run("echo two")
            assert res.returncode != 0 and b"two" not in res.stdout
            # refused with the reason, or (once the control loop got there) the whole connection closed with it
            assert (b"the account alice was disabled" in res.stderr
                    and b"new channels on this connection are refused" in res.stderr) or \
                b"the account alice was disabled" in cm.master_stderr(), (res.stderr, cm.master_stderr())
        time.sleep(1.0)  # the live session on `busy` has been ended and its connection closed meanwhile
        res = busy.run("echo three")
        assert res.returncode != 0 and b"three" not in res.stdout
        for cm in (idle, selfservice):  # idle authenticated connections are closed too, with the reason
            assert _wait(lambda: b"the account alice was disabled" in cm.master_stderr()
                         and b"this connection was closed" in cm.master_stderr(), 5), cm.master_stderr()
    reasons = [json.loads(e["details"]).get("reason", "") for e in world.events("channel.refused")] + \
        [json.loads(e["details"]).get("reason", "") for e in world.events("connection.closed")]
    assert sum("was disabled" in r for r in reasons) >= 2
    _no_ghosts(world)


def test_channel_on_an_open_connection_is_refused_right_after_disable(world):
    """Before the control loop closes the connection, a new channel is refused with the reason (paramiko)."""
    import paramiko

    world.grant()
    for _ in range(5):  # the control loop closes such connections within 0.5 s: try to beat it
        world.app.store.set_user_disabled("alice", False)
        client = paramiko_connect("127.0.0.1", world.port, "alice@ct-01", key=world.keys["alice"].private_path)
        try:
            world.app.store.set_user_disabled("alice", True)  # what `user disable` writes
            chan = client.get_transport().open_session(timeout=10)
            chan.exec_command("echo must-not-run")
            out, err = chan.makefile("rb").read(), chan.makefile_stderr("rb").read()
            assert chan.recv_exit_status() == 1
            break
        except (paramiko.SSHException, EOFError):  # the loop closed the connection first
            continue
        finally:
            client.close()
    else:
        pytest.fail("the connection was closed before every channel open")
    assert b"must-not-run" not in out
    assert b"the account alice was disabled" in err and b"new channels on this connection are refused" in err
