"""End to end (issue 11, finding 3): file-transfer protocols on exec and shell channels end the channel,
however the command was spelled. paramiko, OpenSSH and rsync → medbroker → a real sshd device whose
maintenance login can read the patient directories (exposed), so only the broker stands in the way."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import paramiko
import pytest

from helpers import poll as _wait
from helpers.clients import paramiko_exec, paramiko_session
from sessions.recording import read_frames

pytestmark = pytest.mark.openssh
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
PROMPT = re.compile(rb"[#$] ")


def _denials(w, protocol: str) -> list[dict]:
    rows = [json.loads(r["details"] or "{}") for r in w.events("channel.protocol.denied")]
    return [d for d in rows if d.get("protocol") == protocol]


def _client(w):
    return paramiko_session("127.0.0.1", w.port, "alice@ct-01", key=w.keys["alice"].private_path)


def _drain(chan: paramiko.Channel, timeout: float = 10.0) -> tuple[bytes, bytes, int | None]:
    """Everything the vendor receives on ``chan`` until it closes: (stdout, stderr, exit status)."""
    out, err = bytearray(), bytearray()
    chan.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = False
        while chan.recv_ready():
            out += chan.recv(65536)
            got = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
            got = True
        if chan.exit_status_ready() and (chan.closed or chan.eof_received) and not got:
            break
        if not got:
            time.sleep(0.02)
    status = chan.recv_exit_status() if chan.exit_status_ready() else None
    return bytes(out), bytes(err), status


def _recording_denials(w) -> list[dict]:
    frames = []
    for row in w.app.store.list_sessions():
        if row.get("recording") and w.app.recordings.local_path(row["recording"]).exists():
            frames += [f.event() for f in read_frames(w.app.recordings.local_path(row["recording"]), key_lookup=w.app.keys.get)
                       if f.kind == "policy-denial"]
    return frames


# ------------------------------------------------------------------------------------------------- SFTP
SFTP_SERVER_COMMANDS = [
    "S=/usr/lib/openssh/sftp-ser; ${S}ver",  # the finding, verbatim
    'exec "$(printf /usr/lib/openssh/sftp-%s server)"',
    "python3 -c 'import os; p=\"/usr/lib/openssh/sftp-\"+\"server\"; os.execv(p, [p])'",
]
# On an exposed device the command judge (docs/data-protection.md, "Commands resolved like files") refuses
# commands built at run time before they start; the stream judge is shown on them on a contained device.
_BUILT_AT_RUN_TIME = SFTP_SERVER_COMMANDS[1:]


@pytest.mark.parametrize("command", SFTP_SERVER_COMMANDS)
def test_sftp_server_started_from_exec_cannot_list_or_read(exposed_world, command):
    w = exposed_world
    w.grant()
    dicom = str(w.device.tree.dicom_dir)
    with _client(w) as client:
        chan = client.get_transport().open_session(timeout=10)
        chan.exec_command(command)
        started = time.monotonic()
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            sftp = paramiko.SFTPClient(chan)  # sends INIT and waits for VERSION
            sftp.listdir(dicom)
        assert time.monotonic() - started < 5
        out, err, status = _drain(chan)
    assert status == 1 and b"study-0001" not in out and b"DICM" not in out
    if command in _BUILT_AT_RUN_TIME:
        assert b"only known when they run" in err, err
        return
    assert b"an SFTP server or client was detected" in err and b"Use sftp or scp through medbroker" in err
    assert _wait(lambda: _denials(w, "sftp"))
    denial = _denials(w, "sftp")[0]
    assert denial["direction"] == "vendor" and denial["command"] == command and denial["kind"] == "exec"


def test_openssh_sftp_with_a_server_command(exposed_world, tmp_path):
    """``sftp -s PATH`` runs the server as an exec command; the path is spelled so the command check misses it."""
    from helpers.clients import run_sftp_batch

    w = exposed_world
    w.grant()
    r = run_sftp_batch(f"ls {w.device.tree.dicom_dir}\nget {w.device.tree.patient['hl7_file']} {tmp_path}/x\n",
                       "alice@ct-01", "127.0.0.1", w.port, w.keys["alice"].private_path, known_hosts=w.known_hosts,
                       extra_opts=["-s", "S=/usr/lib/openssh/sftp-ser; ${S}ver"])
    assert r.returncode != 0 and b"study-0001" not in r.stdout and not (tmp_path / "x").exists()
    assert b"an SFTP server or client was detected" in r.stderr
    assert _wait(lambda: _denials(w, "sftp"))


@pytest.mark.parametrize("command", SFTP_SERVER_COMMANDS)
def test_sftp_server_from_exec_on_a_contained_device_ends_too(world, command):
    """On a contained device the login cannot read the patient tree anyway; the stream still ends the channel,
    because an unguarded SFTP server would still reach everything else the login can (and leave no records)."""
    w = world
    w.grant()
    with _client(w) as client:
        chan = client.get_transport().open_session(timeout=10)
        chan.exec_command(command)
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            paramiko.SFTPClient(chan).listdir(str(w.device.tree.system_log.parent))
        out, err, status = _drain(chan)
    assert status == 1 and b"system.log" not in out and b"SFTP" in err
    assert _wait(lambda: _denials(w, "sftp"))


def test_sftp_server_after_output_is_caught_on_the_device_reply(exposed_world):
    """A hand-made client: output before the server, and an INIT whose version field is not a usual one,
    so only the server's VERSION reply gives it away; nothing after it reaches the vendor."""
    w = exposed_world
    w.grant()
    dicom = str(w.device.tree.dicom_dir).encode()
    opendir = b"\x0b\x00\x00\x00\x02" + len(dicom).to_bytes(4, "big") + dicom
    with _client(w) as client:
        chan = client.get_transport().open_session(timeout=10)
        chan.exec_command("echo starting; S=/usr/lib/openssh/sftp-ser; exec ${S}ver")
        chan.sendall(b"\x00\x00\x00\x05\x01\x00\x00\x01\x00" + len(opendir).to_bytes(4, "big") + opendir)
        out, err, status = _drain(chan)
    assert status == 1 and out in (b"", b"starting\n")
    assert b"sent by the device" in err
    assert _wait(lambda: _denials(w, "sftp"))
    assert _denials(w, "sftp")[0]["direction"] == "device"
    assert any(d.get("protocol") == "sftp" for d in _recording_denials(w)) or _wait(
        lambda: any(d.get("protocol") == "sftp" for d in _recording_denials(w)))


def test_sftp_server_inside_an_interactive_shell(exposed_world):
    w = exposed_world
    w.grant()
    with _client(w) as client:
        chan = client.get_transport().open_session(timeout=10)
        chan.get_pty(term="xterm", width=80, height=24)
        chan.invoke_shell()
        seen = bytearray()
        deadline = time.monotonic() + 15
        while not PROMPT.search(seen) and time.monotonic() < deadline:
            if chan.recv_ready():
                seen += chan.recv(4096)
            else:
                time.sleep(0.05)
        assert PROMPT.search(seen), seen
        chan.sendall(b"stty raw -echo; echo rea''dy; S=/usr/lib/openssh/sftp-ser; exec ${S}ver\r")
        while b"ready" not in seen and time.monotonic() < deadline:
            if chan.recv_ready():
                seen += chan.recv(4096)
            else:
                time.sleep(0.05)
        time.sleep(0.3)
        dicom = str(w.device.tree.dicom_dir).encode()
        opendir = b"\x0b\x00\x00\x00\x02" + len(dicom).to_bytes(4, "big") + dicom
        chan.sendall(b"\x00\x00\x00\x05\x01\x00\x00\x00\x03" + len(opendir).to_bytes(4, "big") + opendir)
        out, err, status = _drain(chan)
    assert b"study-0001" not in seen + out
    assert b"SFTP" in err and status == 1
    assert _wait(lambda: _denials(w, "sftp"))
    assert _denials(w, "sftp")[0]["kind"] == "shell"


# ------------------------------------------------------------------------------------------------- scp
def test_scp_source_protocol_by_hand_over_exec(exposed_world):
    w = exposed_world
    w.grant()
    log = w.device.tree.system_log
    with _client(w) as client:
        chan = client.get_transport().open_session(timeout=10)
        chan.exec_command(f"S=sc; ${{S}}p -f {log}")  # not recognisably scp: the broker's own scp server is not asked
        chan.sendall(b"\x00")  # "ready": scp answers with its C record, then waits for the next \0
        out, err, status = _drain(chan)
    assert status == 1 and out == b"" and b"legacy scp protocol" in err
    assert _wait(lambda: _denials(w, "scp"))


def test_scp_sink_protocol_upload_by_hand(exposed_world):
    w = exposed_world
    w.grant()
    target = w.device.tree.tmp_dir / "dropped.txt"
    with _client(w) as client:
        chan = client.get_transport().open_session(timeout=10)
        chan.exec_command(f"T=-t; s''cp $T {w.device.tree.tmp_dir}")
        time.sleep(0.5)
        chan.sendall(b"C0644 6 dropped.txt\nhello\n\x00")
        out, err, status = _drain(chan)
    assert status == 1 and b"legacy scp protocol" in err
    assert not target.exists()
    assert _wait(lambda: _denials(w, "scp")) and _denials(w, "scp")[0]["direction"] == "vendor"


def test_legacy_scp_served_by_the_broker_still_works(exposed_world, tmp_path):
    w = exposed_world
    w.grant()
    from helpers.clients import scp_download

    r = scp_download("alice@ct-01", "127.0.0.1", w.port, w.keys["alice"].private_path, str(w.device.tree.system_log),
                     tmp_path / "system.log", known_hosts=w.known_hosts, legacy=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "system.log").read_bytes() == w.device.tree.system_log.read_bytes()
    assert not w.events("channel.protocol.denied")


# ------------------------------------------------------------------------------------------------- rsync
@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (scripts/install.sh installs it)")
@pytest.mark.parametrize("direction", ["download", "upload", "daemon"])
def test_real_rsync_through_the_broker(exposed_world, tmp_path, direction):
    w = exposed_world
    w.grant()
    rsh = (f"ssh -F /dev/null -o BatchMode=yes -o UserKnownHostsFile={w.known_hosts} -o IdentitiesOnly=yes "
           f"-i {w.keys['alice'].private_path} -p {w.port}")
    remote_logs = str(w.device.tree.system_log.parent)
    local = tmp_path / "local"
    local.mkdir()
    (local / "upload.txt").write_text("firmware notes\n")
    # --rsync-path hides the word rsync from the command line: only the stream gives it away
    rsync_path = "R=rsy; ${R}nc"
    if direction == "download":
        argv = ["rsync", "-a", "-e", rsh, f"--rsync-path={rsync_path}", f"alice@ct-01@127.0.0.1:{remote_logs}/", str(local)]
    elif direction == "daemon":  # rsync daemon over ssh: "@RSYNCD: 32.0 ..." greetings
        argv = ["rsync", "-a", "-e", rsh, f"--rsync-path={rsync_path}", "alice@ct-01@127.0.0.1::logs/", str(local)]
    else:
        argv = ["rsync", "-a", "-e", rsh, f"--rsync-path={rsync_path}", str(local) + "/",
                f"alice@ct-01@127.0.0.1:{w.device.tree.tmp_dir}/up/"]
    r = subprocess.run(argv, capture_output=True, timeout=60)
    assert r.returncode != 0
    assert b"the rsync protocol was detected" in r.stderr, r.stderr
    assert not (local / "system.log").exists()
    assert not (w.device.tree.tmp_dir / "up" / "upload.txt").exists()
    assert _wait(lambda: _denials(w, "rsync"))


# ------------------------------------------------------------------------------------------------- tar
def test_tar_download_and_upload_streams(exposed_world):
    w = exposed_world
    w.grant()
    with _client(w) as client:
        r = paramiko_exec(client, "cd service && tar cf - logs", timeout=20)
        assert r.returncode == 1 and b"gantry" not in r.stdout and b"tar archive stream" in r.stderr
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = b"#!/bin/sh\necho planted\n"
            info = tarfile.TarInfo("planted.sh")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        r = paramiko_exec(client, f"tar xf - -C {w.device.tree.tmp_dir}", input=buf.getvalue(), timeout=20)
        assert r.returncode == 1 and b"tar archive stream" in r.stderr and b"sent by you" in r.stderr
    assert not (w.device.tree.tmp_dir / "planted.sh").exists()
    assert _wait(lambda: len(_denials(w, "tar")) == 2)
    assert {d["direction"] for d in _denials(w, "tar")} == {"vendor", "device"}
    assert _wait(lambda: sum(d.get("protocol") == "tar" for d in _recording_denials(w)) == 2)


def test_tunnelled_ssh_to_the_device_sshd(exposed_world):
    w = exposed_world
    w.grant()
    port = w.device.port
    with _client(w) as client:
        r = paramiko_exec(client, "python3 -c 'import socket,sys; s=socket.create_connection((\"127.0.0.1\", "
                                  f"{port})); sys.stdout.buffer.write(s.recv(200)); sys.stdout.flush()'; sleep 2",
                          timeout=20)
    assert r.returncode == 1 and b"SSH-2.0" not in r.stdout and b"SSH connection tunnelled" in r.stderr


# ------------------------------------------------------------------------------------------------- no false alarms
def test_ordinary_maintenance_is_not_ended(exposed_world):
    w = exposed_world
    w.grant()
    ls = Path("/usr/bin/ls").read_bytes()
    with _client(w) as client:
        for command, check in (
            ("cat /usr/bin/ls", lambda out: out == ls),
            ("dmesg 2>/dev/null | tail -n 50; echo done", lambda out: out.endswith(b"done\n")),
            ("top -b -n 1 | head -n 20", lambda out: b"PID" in out),
            ("seq 1 300000", lambda out: out.endswith(b"300000\n")),
            ("cat /usr/share/doc/*/copyright | head -c 3000000 | wc -c", lambda out: out.strip() == b"3000000"),
            ("tar tvf /dev/null; ls -la service/logs", lambda out: b"system.log" in out),
        ):
            r = paramiko_exec(client, command, timeout=30)
            assert r.returncode == 0 and check(r.stdout), (command, r.stderr[:300])
    term = w.pty("alice@ct-01")
    try:
        term.expect(PROMPT, timeout=15)
        term.sendline("ls -l service; uname -a; top -b -n 1 | head -5")
        term.expect(PROMPT, timeout=15)
        term.sendline("top -d 0.2")  # full screen, redrawn five times a second, for two seconds
        time.sleep(2)
        term.send("q")
        term.expect(PROMPT, timeout=15)
        term.sendline("dmesg 2>/dev/null | tail -n 20; seq 1 20000 | tail -n 1")
        term.expect(rb"20000", timeout=15)
        term.sendline("exit")
        term.read_until_eof(timeout=15)
    finally:
        term.wait(timeout=10)
        term.close()
    assert b"medbroker:" not in bytes(term.output)
    assert not w.events("channel.protocol.denied")
