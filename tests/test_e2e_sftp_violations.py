"""End to end (issue 11, finding 12): a broken SFTP client never leaves its channel hanging in the broker.

A protocol violation ends the channel at once with the reason (stderr, exit 1, ``sftp.protocol.denied``,
a policy-denial frame). Four threads sharing one paramiko SFTPClient are a client bug that breaks the
client itself: the broker answers every request it was sent (``sftp.summary``: nothing unanswered), just
as the device's own sshd does, and ends the channel as soon as the garbled writes break the protocol."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paramiko
import pytest

from helpers import poll as _wait
from helpers.clients import paramiko_session
from sessions.recording import read_frames
from sessions.sftp_codec import FXP_OPENDIR, FXP_STAT, frame, init_packet, string, u32

pytestmark = pytest.mark.openssh


def _details(w, event: str) -> list[dict]:
    return [json.loads(r["details"] or "{}") for r in w.events(event)]


def _raw_sftp(w, client: paramiko.SSHClient, packets: bytes) -> tuple[bytes, bytes, int | None, float]:
    """Open the sftp subsystem, send ``packets``, and read until the channel closes (at most 10 s):
    (stdout, stderr, exit status, seconds until it closed)."""
    chan = client.get_transport().open_session(timeout=10)
    chan.invoke_subsystem("sftp")
    started = time.monotonic()
    chan.sendall(packets)
    out, err = bytearray(), bytearray()
    while time.monotonic() - started < 10:
        if chan.recv_ready():
            out += chan.recv(65536)
        elif chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        elif chan.exit_status_ready() and chan.closed:
            break
        else:
            time.sleep(0.01)
    took = time.monotonic() - started
    status = chan.recv_exit_status() if chan.exit_status_ready() else None
    chan.close()
    return bytes(out), bytes(err), status, took


@pytest.mark.parametrize("name,packets,reason", [
    ("reused id", lambda d: init_packet(3) + frame(FXP_OPENDIR, u32(7) + string(d)) + frame(FXP_STAT, u32(7) + string(d)),
     "request id 7 is used by a request still in flight"),
    ("before INIT", lambda d: frame(FXP_STAT, u32(1) + string(d)), "before INIT"),
    ("second INIT", lambda d: init_packet(3) + init_packet(3), "a second INIT"),
    ("a reply type", lambda d: init_packet(3) + frame(102, u32(1) + string(b"h")), "packet type 102 is not"),
    ("malformed", lambda d: init_packet(3) + frame(FXP_STAT, u32(1) + u32(5000)), "truncated SFTP stat request"),
    ("oversize", lambda d: init_packet(3) + u32(64 << 20) + b"\x03", "outside 1.."),
])
def test_violations_close_the_channel_at_once(world, name, packets, reason):
    w = world
    w.grant()
    logs = str(w.device.tree.system_log.parent).encode()
    with paramiko_session("127.0.0.1", w.port, "alice@ct-01", key=w.keys["alice"].private_path) as client:
        out, err, status, took = _raw_sftp(w, client, packets(logs))
    assert status == 1 and took < 2.0, (name, took, err)
    assert b"medbroker: vendor broke the SFTP protocol: " in err and reason.encode() in err, err
    assert _wait(lambda: _details(w, "sftp.protocol.denied"))
    row = _details(w, "sftp.protocol.denied")[0]
    assert reason in row["reason"] and w.events("sftp.protocol.denied")[0]["user_name"] == "alice"
    assert _wait(lambda: any(reason in (d.get("error") or "") for d in _details(w, "sftp.summary")))
    assert _wait(lambda: w.app.store.list_sessions()[-1]["final_hash"])
    frames = list(read_frames(w.app.recordings.local_path(w.app.store.list_sessions()[-1]["recording"]), key_lookup=w.app.keys.get))
    assert any(f.kind == "policy-denial" and reason in f.event().get("violation", "") for f in frames)


def test_four_threads_sharing_one_sftp_client(world, tmp_path):
    """The issue's reproduction: four threads share one paramiko SFTPClient. paramiko's threads then read each
    other's replies (and interleave large writes), so the client breaks itself; the broker must not add a hang:
    every request it forwarded is answered at once, or the channel ends at once on a garbled packet."""
    w = world
    w.grant()
    src = tmp_path / "fw.bin"
    src.write_bytes(bytes(range(256)) * 2048)  # 512 KiB: several write packets per thread
    logs = str(w.device.tree.system_log.parent)
    errors: list[BaseException] = []
    with paramiko_session("127.0.0.1", w.port, "alice@ct-01", key=w.keys["alice"].private_path) as client:
        sftp = client.open_sftp()
        sftp.get_channel().settimeout(3)  # bounded: the client's own wait for a reply it already consumed

        def work(i: int) -> None:
            try:
                sftp.stat(logs)
                sftp.put(str(src), f"{w.device.tree.tmp_dir}/fw-{i}.bin")
            except Exception as exc:  # the client breaks itself (stolen reply, garbled packet)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        took = time.monotonic() - started
        assert not any(t.is_alive() for t in threads)
        sftp.close()
    assert took < 12
    assert _wait(lambda: _details(w, "sftp.summary"))
    summary = _details(w, "sftp.summary")[0]
    violations = _details(w, "sftp.protocol.denied")
    if violations:  # garbled writes reached the broker: the channel ended then, naming the violation
        assert "vendor broke the SFTP protocol" in violations[0]["reason"]
        assert summary["error"] == violations[0]["reason"]
    else:  # every request the broker forwarded was answered by the device and passed on
        assert summary["unanswered"] == 0 and summary["replied"] == summary["forwarded"], summary
    session = w.app.store.list_sessions()[-1]
    assert _wait(lambda: w.app.store.list_sessions()[-1]["final_hash"])
    frames = list(read_frames(w.app.recordings.local_path(session["recording"]), key_lookup=w.app.keys.get))
    assert any(f.kind == "sftp-reply-summary" for f in frames)
