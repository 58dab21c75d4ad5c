"""End to end: stock OpenSSH (and paramiko) → medbroker → a real sshd device, for the vertical slice."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

from broker.devices import add_device
from broker.grants import get_grant, revoke_grant
from broker.identity import get_principal
from helpers.clients import ControlMaster, paramiko_exec, paramiko_session
from helpers import poll as _wait
from helpers.net import SilentListener, closed_port

pytestmark = pytest.mark.openssh
PROMPT = re.compile(rb"[#$] ")


def test_no_grant_refused_with_hint_and_audited(world):
    r = world.ssh("alice@ct-01", "echo should-not-run")
    assert r.returncode == 1
    assert b"should-not-run" not in r.stdout
    assert b"no approved access for alice to ct-01" in r.stderr
    assert b"request ct-01 --for" in r.stderr
    refused = world.events("session.refused")
    assert refused and refused[-1]["user_name"] == "alice" and refused[-1]["device"] == "ct-01"
    assert world.app.store.list_sessions() == []


def test_unknown_device_looks_like_no_grant(world):
    r = world.ssh("alice@mri-99", "true")
    assert r.returncode == 1
    assert b"no approved access for alice to mri-99" in r.stderr


def test_wrong_key_reveals_nothing(world, ssh_keys):
    stranger = ssh_keys("stranger")
    from helpers.clients import run_ssh

    r = run_ssh("alice@ct-01", "127.0.0.1", world.port, stranger.private_path, "true", known_hosts=world.known_hosts)
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr
    assert b"ct-01" not in r.stderr.replace(b"alice@ct-01@127.0.0.1", b"")
    assert _wait(lambda: world.events("auth.failure"))


@pytest.mark.parametrize("login", ["a@b@c@d", "@ct-01", "alice@", "al ice@ct-01", "Alice@ct-01", "a" * 300],
                         ids=["many-at", "no-user", "no-device", "space", "upper", "long"])
def test_malformed_login_names_get_a_clear_line(world, login):
    r = world.ssh(login, "true", key="alice")
    assert r.returncode == 255
    assert b"medbroker:" in r.stderr and b"USER@DEVICE" in r.stderr
    assert world.app.store.list_sessions() == []


def test_control_characters_in_login_refused_for_paramiko(world):
    """OpenSSH's client refuses such names itself; paramiko sends them, so the broker must refuse."""
    import paramiko

    from helpers.clients import paramiko_connect

    for login in ("alice@ct\x01", "alice\x00@ct-01", "alice@ct-01\n"):
        with pytest.raises(paramiko.AuthenticationException):
            paramiko_connect("127.0.0.1", world.port, login, key=world.keys["alice"].private_path)
    assert world.app.store.list_sessions() == []


def test_absurdly_long_login_is_cut_off_by_the_ssh_layer(world):
    r = world.ssh("a" * 2000 + "@ct-01", "true", key="alice")
    assert r.returncode == 255 and b"Username too long" in r.stderr


def test_request_and_approve_over_ssh_then_exec(world):
    r = world.ssh("alice", 'request ct-01 --for 30m --reason "tube replacement" --ticket WO-1234 --json')
    assert r.returncode == 0, r.stderr
    req = json.loads(r.stdout)
    assert req["status"] == "pending" and req["ticket"] == "WO-1234"
    # the vendor cannot approve, nor can anyone approve their own request
    r = world.ssh("alice", f"approve {req['id']}")
    assert r.returncode == 1 and b"may not approve" in r.stderr
    r = world.ssh("bob", f"approve {req['id']} --json")
    assert r.returncode == 0, r.stderr
    grant = json.loads(r.stdout)["grant"]
    assert grant["user"] == "alice" and grant["state"] == "active"
    r = world.ssh("bob", f"approve {req['id']}")
    assert r.returncode == 1 and b"already approved" in r.stderr
    r = world.ssh("alice@ct-01", "echo hello from $(hostname)")
    assert r.returncode == 0 and r.stdout.startswith(b"hello from")
    status = world.ssh("alice", "grants --json")
    assert json.loads(status.stdout)["active_grants"][0]["id"] == grant["id"]


def test_exec_output_exit_codes_stderr_and_stdin(world):
    world.grant()
    r = world.ssh("alice@ct-01", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    data = os.urandom(3 * 1024 * 1024 + 17)
    r = world.ssh("alice@ct-01", "sha256sum", input=data)
    assert r.returncode == 0
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = world.ssh("alice@ct-01", "head -c 5000000 /dev/zero | tr '\\0' x")
    assert r.stdout == b"x" * 5_000_000


def test_exit_signal_passes_through(world):
    world.grant()
    r = world.ssh("alice@ct-01", "kill -TERM $$")
    assert r.returncode == 255  # what OpenSSH's ssh reports for a remote command killed by a signal
    host_key = (world.app.home / "keys" / "host_ed25519.pub").read_text()
    with paramiko_session("127.0.0.1", world.port, "alice@ct-01", key=world.keys["alice"].private_path,
                          host_key_line=host_key) as client:
        res = paramiko_exec(client, "kill -KILL $$")
        assert res.returncode == -1  # paramiko: exit-signal, no exit-status
        res = paramiko_exec(client, "echo paramiko; exit 3")
        assert (res.returncode, res.stdout) == (3, b"paramiko\n")


def test_pty_typing_and_resize(world):
    world.grant()
    term = world.pty("alice@ct-01", cols=100, rows=30)
    try:
        term.expect(PROMPT, timeout=15)
        term.sendline("stty size; echo $((6*7))")
        term.expect(re.compile(rb"30 100\r?\n"), timeout=10)
        term.expect(re.compile(rb"42\r?\n"), timeout=10)
        term.resize(132, 43)
        time.sleep(0.3)
        term.sendline("stty size")
        term.expect(rb"43 132", timeout=10)
        term.sendline("exit 5")
        assert term.wait(timeout=10) == 5
    finally:
        term.close()
    assert _wait(lambda: world.app.store.list_sessions()[-1]["status"] == "closed")


def test_controlmaster_multiplexes_channels_in_one_session(world, tmp_path):
    world.grant()
    with ControlMaster("alice@ct-01", "127.0.0.1", world.port, world.keys["alice"].private_path,
                       known_hosts=world.known_hosts) as cm:
        results = [cm.run(f"echo ch{i}; exit {i}") for i in range(3)]
    assert [(r.returncode, r.stdout) for r in results] == [(i, f"ch{i}\n".encode()) for i in range(3)]
    assert len(world.app.store.list_sessions()) == 1


def test_short_grant_warns_then_expires_mid_session(world):
    world.grant(3)
    term = world.pty("alice@ct-01")
    try:
        term.expect(PROMPT, timeout=15)
        out = term.read_until_eof(timeout=10)
    finally:
        code = term.wait(timeout=10)
        term.close()
    text = bytes(term.output)
    assert b"approved window for ct-01 ended" in text and b"request again" in text
    assert code != 0
    assert _wait(lambda: world.app.store.list_sessions()[-1]["status"] == "expired")
    assert world.events("session.expired")
    # and a new session after the end is refused
    r = world.ssh("alice@ct-01", "true")
    assert r.returncode == 1 and b"no approved access" in r.stderr


def test_revoke_ends_live_session_within_a_second(world):
    grant = world.grant(600)
    import subprocess

    from helpers.clients import ssh_options

    argv = ["ssh", *ssh_options(key=world.keys["alice"].private_path, known_hosts=world.known_hosts,
                                host_key_checking="yes"), "-p", str(world.port), "alice@ct-01@127.0.0.1", "sleep 30"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert _wait(lambda: world.harness.live_count() == 1, 15)
        t0 = time.monotonic()
        revoke_grant(world.app.store, world.app.audit, grant.id, get_principal(world.app.store, "bob"),
                     world.app.clock.now(), "vendor left the site")
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert elapsed < 2.0  # revoke reaches the session through a 0.5 s control loop, plus teardown
    assert b"revoked by bob: vendor left the site" in err
    assert _wait(lambda: world.app.store.list_sessions()[-1]["status"] == "revoked")


def test_host_key_mismatch_refused_and_audited(world, ssh_keys):
    impostor = ssh_keys("impostor")
    now = world.app.clock.now()
    add_device(world.app.store, world.app.audit, world.app.keys, name="ct-02", host="127.0.0.1",
               port=world.device.port, login=world.device.login, host_key=impostor.public_key, now=now,
               key_text=Path(world.device.client_key.private_path).read_text())
    world.grant(device="ct-02")
    r = world.ssh("alice@ct-02", "echo must-not-run")
    assert r.returncode == 1
    assert b"does not match the pinned one" in r.stderr
    ev = world.events("device.hostkey.mismatch")
    assert ev and json.loads(ev[-1]["details"])["presented"] == world.device.host_key_fingerprint


def test_device_down_and_slow_device_fail_fast_with_clear_message(world):
    now = world.app.clock.now()
    key = Path(world.device.client_key.private_path).read_text()
    add_device(world.app.store, world.app.audit, world.app.keys, name="down-01", host="127.0.0.1",
               port=closed_port(), login="root", host_key=world.device.host_key_line, now=now, key_text=key)
    world.grant(device="down-01")
    r = world.ssh("alice@down-01", "true")
    assert r.returncode == 1 and b"down-01 is unreachable" in r.stderr
    with SilentListener() as silent:
        add_device(world.app.store, world.app.audit, world.app.keys, name="slow-01", host="127.0.0.1",
                   port=silent.port, login="root", host_key=world.device.host_key_line, now=now, key_text=key)
        world.grant(device="slow-01")
        t0 = time.monotonic()
        r = world.ssh("alice@slow-01", "true", timeout=60)
    assert r.returncode == 1 and b"slow-01 is unreachable" in r.stderr
    assert time.monotonic() - t0 < 20
    assert world.events("device.unreachable")


def test_broker_stopping_while_a_session_connects_closes_it_cleanly(world):
    """A stop during the device connect ends that session as failed, with a sealed recording and no leaks."""
    import gc
    import threading

    from sessions.recording import verify_recording

    now = world.app.clock.now()
    key = Path(world.device.client_key.private_path).read_text()
    results = []
    with SilentListener() as silent:
        add_device(world.app.store, world.app.audit, world.app.keys, name="slow-01", host="127.0.0.1",
                   port=silent.port, login="root", host_key=world.device.host_key_line, now=now, key_text=key)
        world.grant(device="slow-01")
        client = threading.Thread(target=lambda: results.append(world.ssh("alice@slow-01", "true", timeout=60)))
        client.start()
        assert _wait(lambda: silent.accepted >= 1, timeout=20)
        t0 = time.monotonic()
        world.harness.stop()  # the device never answers: the connect is still pending
        stopped_in = time.monotonic() - t0
        client.join(30)
    assert not client.is_alive() and results and results[0].returncode != 0
    # told why, not just cut; whichever comes first (the refused channel or the disconnect) says the same
    assert b"the broker is shutting down; reconnect in a moment" in results[0].stderr
    assert stopped_in < 8  # cancelled, not waited out (the connect timeout is 10 s)
    row = world.app.store.list_sessions()[-1]
    assert row["device"] == "slow-01" and row["status"] == "failed"
    assert "stopped while connecting" in row["end_reason"] and row["final_hash"]
    assert verify_recording(world.app.recordings.local_path(row["recording"]), expected_final_hash=row["final_hash"],
                            key_lookup=world.app.keys.get).ok
    gc.collect()  # an abandoned connect would surface here as an unraisable ResourceWarning (an error)


def test_forwarding_agent_and_subsystems_refused(world):
    world.grant()
    r = world.ssh("alice@ct-01", None, extra_opts=["-W", "127.0.0.1:22"])
    assert r.returncode == 255
    r = world.ssh("alice@ct-01", "echo agent=$SSH_AUTH_SOCK", extra_opts=["-A"])
    assert r.returncode == 0 and r.stdout == b"agent=\n"
    assert _wait(lambda: world.events("channel.refused"))


def test_audit_chain_verifies_after_sessions(world):
    from broker.audit import verify_chain

    world.grant()
    assert world.ssh("alice@ct-01", "true").returncode == 0
    assert _wait(lambda: world.events("session.end"))
    result = verify_chain(world.app.store)
    assert result.ok, result.problems
    names = [r["event"] for r in world.events()]
    for expected in ("request.created", "request.approved", "grant.created", "auth.success", "session.start",
                     "session.end"):
        assert expected in names


def _finished_session(world):
    assert _wait(lambda: world.app.store.list_sessions() and world.app.store.list_sessions()[-1]["final_hash"])
    return world.app.store.list_sessions()[-1]


def test_recording_holds_typed_input_output_and_verifies(world, tmp_path):
    import shutil
    import subprocess

    from sessions.recording import read_frames, read_header, verify_recording
    from sessions.replay import to_asciicast

    world.grant()
    term = world.pty("alice@ct-01", cols=90, rows=25)
    try:
        term.expect(PROMPT, timeout=15)
        term.sendline("echo MARKER-$((40+2))")
        term.expect(re.compile(rb"MARKER-42"), timeout=10)
        term.resize(100, 30)
        term.sendline("exit 0")
        term.wait(timeout=10)
    finally:
        term.close()
    row = _finished_session(world)
    path = world.app.recordings.local_path(row["recording"])
    header = read_header(path)
    assert header["user"] == "alice" and header["device"] == "ct-01" and "encryption" in header
    assert b"MARKER" not in path.read_bytes()  # encrypted at rest
    public = world.app.signing_key.public_key()
    result = verify_recording(path, expected_final_hash=row["final_hash"], signature=row["signature"],
                              public_key=public)
    assert result.ok and not result.incomplete, result.problems
    frames = list(read_frames(path, key_lookup=world.app.keys.get))
    kinds = [f.kind for f in frames]
    for kind in ("pty", "shell", "input", "output", "resize", "exit", "end"):
        assert kind in kinds
    typed = b"".join(f.payload for f in frames if f.kind == "input")
    shown = b"".join(f.payload for f in frames if f.kind == "output")
    assert b"echo MARKER-$((40+2))" in typed and b"MARKER-42" in shown
    assert any(f.kind == "resize" and f.event()["cols"] == 100 for f in frames)
    monos = [f.mono_ns for f in frames]
    assert monos == sorted(monos)
    cast = to_asciicast(frames, header=header, verify_result=result)
    lines = cast.splitlines()
    assert json.loads(lines[0])["version"] == 2 and json.loads(lines[0])["width"] == 90
    assert any("MARKER-42" in line for line in lines[1:])
    if shutil.which("asciinema") and shutil.which("script"):
        cast_file = tmp_path / "s.cast"
        cast_file.write_text(cast)
        # asciinema cat needs a terminal; script(1) gives it one
        out = subprocess.run(["script", "-qec", f"asciinema cat {cast_file}", "/dev/null"], capture_output=True,
                             stdin=subprocess.DEVNULL, timeout=30)
        assert out.returncode == 0 and b"MARKER-42" in out.stdout
    # an exec session is its own recording with the command, stdout, stderr and status
    assert world.ssh("alice@ct-01", "echo exec-marker; echo oops >&2; exit 4").returncode == 4
    assert _wait(lambda: len(world.app.store.list_sessions()) == 2 and _finished_session(world)["id"] != row["id"])
    exec_row = _finished_session(world)
    frames = list(read_frames(world.app.recordings.local_path(exec_row["recording"]), key_lookup=world.app.keys.get))
    assert any(f.kind == "exec" and f.event()["command"].startswith("echo exec-marker") for f in frames)
    assert b"oops\n" in b"".join(f.payload for f in frames if f.kind == "stderr")
    assert any(f.kind == "exit" and f.event().get("status") == 4 for f in frames)


def test_tampered_recording_is_detected(world):
    from sessions.recording import verify_recording

    world.grant()
    assert world.ssh("alice@ct-01", "echo tamper-me").returncode == 0
    row = _finished_session(world)
    path = world.app.recordings.local_path(row["recording"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_recording(path, expected_final_hash=row["final_hash"], signature=row["signature"],
                              public_key=world.app.signing_key.public_key())
    assert not result.ok and result.problems


def test_multi_word_reason_typed_at_a_shell_works_over_ssh(world):
    """ssh joins its arguments with spaces: --reason "tube replacement" arrives as two words."""
    import subprocess

    from helpers.clients import ssh_options

    argv = ["ssh", *ssh_options(key=world.keys["alice"].private_path, known_hosts=world.known_hosts,
                                host_key_checking="yes"), "-p", str(world.port), "alice@127.0.0.1",
            "request", "ct-01", "--for", "2h", "--reason", "tube replacement", "--ticket", "WO-1234", "--json"]
    r = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    req = json.loads(r.stdout)
    assert req["reason"] == "tube replacement" and req["ticket"] == "WO-1234"
    argv[argv.index("alice@127.0.0.1")] = "bob@127.0.0.1"
    argv[argv.index("-i") + 1] = str(world.keys["bob"].private_path)
    r = subprocess.run([*argv[:argv.index("bob@127.0.0.1") + 1], "deny", str(req["id"]), "--reason", "not", "today"],
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert json.loads(world.events("request.denied")[-1]["details"])["reason"] == "not today"


def test_oversize_data_packets_from_a_client_end_the_channel_unrecorded_and_unforwarded(world):
    """Issue 16: the recorder's acknowledgment window is sized for the 32 KiB SSH packets medbroker announces, but
    asyncssh accepts channel data up to its 256 KiB transport limit. A client that ignores the announced size (a
    hostile one: paramiko with its packet size raised) gets its channel ended with the reason; the device sees
    none of the packet, the recording holds none of it, and the refusal is audited."""
    world.grant()
    host_key = (world.app.home / "keys" / "host_ed25519.pub").read_text()
    with paramiko_session("127.0.0.1", world.port, "alice@ct-01", key=world.keys["alice"].private_path,
                          host_key_line=host_key) as client:
        transport = client.get_transport()
        assert transport is not None
        chan = transport.open_session(timeout=10)
        chan.exec_command("wc -c")
        chan.out_max_packet_size = 200_000  # what the broker announced was 32768
        chan.sendall(b"z" * 150_000)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + 20
        while not (chan.exit_status_ready() and chan.closed) and time.monotonic() < deadline:
            if chan.recv_ready():
                out += chan.recv(65536)
            elif chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            else:
                time.sleep(0.01)
        err += chan.recv_stderr(65536) if chan.recv_stderr_ready() else b""
        status = chan.recv_exit_status()
        res = paramiko_exec(client, "echo still here")  # the session itself goes on
    assert status == 1 and b"150000 bytes in one SSH data packet; the channel announced at most 32768" in err, err
    assert b"150000" not in out and out.strip() in (b"", b"0"), out
    assert (res.returncode, res.stdout) == (0, b"still here\n")
    refused = [json.loads(e["details"]) for e in world.events("channel.refused")]
    assert any(d["kind"] == "packet" and "150000 bytes in one SSH data packet" in d["reason"] for d in refused), refused
    from sessions.recording import read_frames

    row = _finished_session(world)
    frames = list(read_frames(world.app.recordings.local_path(row["recording"]), key_lookup=world.app.keys.get))
    assert not any(f.kind == "input" and b"zzzz" in f.payload for f in frames), "the oversize packet was recorded"
    assert any(f.kind == "policy-denial" and b"one SSH data packet" in f.payload for f in frames)
