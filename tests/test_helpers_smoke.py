"""The test helpers against a real sshd directly (no broker): exec, PTY, sftp, scp, paramiko, pinning, mux."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
from pathlib import Path

import paramiko
import pytest

from helpers.clients import (
    paramiko_exec,
    paramiko_session,
    paramiko_sftp,
    run_sftp_batch,
    run_ssh,
    scp_download,
    scp_upload,
    ssh_control_master,
    write_known_hosts,
)
from helpers.devicetree import make_device_tree
from helpers.keys import generate_keypair
from helpers.net import SilentListener, closed_port
from helpers.procs import living_descendants
from helpers.pty import PtySession
from helpers.sshd import SshdDevice

pytestmark = pytest.mark.openssh
PROMPT = re.compile(rb"[#$] $")


@pytest.fixture
def dev(device):
    """One started device with its own key."""
    return device()


@pytest.fixture
def pinned(dev, tmp_path: Path) -> Path:
    """A known_hosts file pinning dev's host key."""
    return dev.write_known_hosts(tmp_path / "known_hosts")


def ssh(dev, pinned, command, **kwargs):
    return run_ssh(dev.login, dev.host, dev.port, dev.client_key, command, known_hosts=pinned, **kwargs)


def test_exec_returns_stdout_stderr_and_exit_status_separately(dev, pinned):
    assert ssh(dev, pinned, "echo hi") == (0, b"hi\n", b"")
    assert ssh(dev, pinned, "exit 7").returncode == 7
    assert ssh(dev, pinned, "echo out; echo err >&2; exit 3") == (3, b"out\n", b"err\n")
    assert ssh(dev, pinned, "cat", input=b"\x00\xffbinary\n") == (0, b"\x00\xffbinary\n", b"")
    assert re.search(
        rf"Accepted publickey for {dev.login} .* ED25519 {re.escape(dev.client_key.fingerprint)}", dev.log_text()
    )


def test_pty_shell_sees_typed_input_and_window_resizes(dev, pinned):
    with PtySession.spawn_ssh(
        dev.login, dev.host, dev.port, dev.client_key, known_hosts=pinned, cols=80, rows=24
    ) as term:
        # Type only after the prompt: earlier keystrokes race ssh switching the local tty to raw mode.
        term.expect(PROMPT)
        term.sendline("echo $((6*7))")
        term.expect(re.compile(rb"[\r\n]42\r\n"))
        term.expect(PROMPT)
        term.sendline("stty size")
        term.expect(re.compile(rb"[\r\n]24 80\r\n"))
        term.expect(PROMPT)
        term.resize(132, 40)
        term.sendline("stty size")
        term.expect(re.compile(rb"[\r\n]40 132\r\n"))
        term.expect(PROMPT)
        term.sendline("exit 5")
        assert term.wait(timeout=10) == 5


def test_sftp_batch_put_and_get_keep_bytes(dev, pinned, tmp_path: Path):
    payload = os.urandom(300_000)
    local = tmp_path / "upload.bin"
    local.write_bytes(payload)
    remote = dev.tree.tmp_dir / "upload.bin"
    back = tmp_path / "back.bin"
    rc, out, err = run_sftp_batch(
        f"put {local} {remote}\nget {remote} {back}\n",
        dev.login,
        dev.host,
        dev.port,
        dev.client_key,
        known_hosts=pinned,
    )
    assert (rc, err) == (0, b""), err
    assert out.splitlines()[0] == f"sftp> put {local} {remote}".encode()
    assert remote.read_bytes() == payload
    assert back.read_bytes() == payload
    dev.wait_for_log(rf'close "{re.escape(str(remote))}" bytes read 0 written {len(payload)}', sftp=True)


def test_sftp_batch_stops_at_first_error(dev, pinned):
    rc, out, err = run_sftp_batch(
        "get /nonexistent/file\nls /\n", dev.login, dev.host, dev.port, dev.client_key, known_hosts=pinned
    )
    assert rc == 1
    assert b"not found" in err
    assert b"sftp> ls" not in out


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-mode", "legacy-O"])
def test_scp_round_trip(dev, pinned, tmp_path: Path, legacy: bool):
    payload = os.urandom(70_000)
    local = tmp_path / "fw.bin"
    local.write_bytes(payload)
    remote = dev.tree.tmp_dir / "fw.bin"
    up = scp_upload(
        dev.login, dev.host, dev.port, dev.client_key, local, str(remote), legacy=legacy, known_hosts=pinned
    )
    assert up == (0, b"", b""), up
    assert remote.read_bytes() == payload
    log_file = str(dev.tree.system_log)
    down = scp_download(
        dev.login,
        dev.host,
        dev.port,
        dev.client_key,
        log_file,
        tmp_path / "system.log",
        legacy=legacy,
        known_hosts=pinned,
    )
    assert down.returncode == 0, down
    assert (tmp_path / "system.log").read_bytes() == dev.tree.system_log.read_bytes()
    log = dev.log_text()
    # scp -O execs "scp -t/-f" on the server; the default mode uses the sftp subsystem.
    assert ("Starting session: subsystem 'sftp'" in log) is (not legacy)
    assert ("Starting session: command" in log) is legacy


def test_paramiko_exec_and_sftp(dev, tmp_path: Path):
    with paramiko_session(dev.host, dev.port, dev.login, key=dev.client_key, host_key_line=dev.host_key_line) as client:
        assert paramiko_exec(client, "echo hi; echo oops >&2; exit 3") == (3, b"hi\n", b"oops\n")
        assert paramiko_exec(client, "cat", input=b"round trip") == (0, b"round trip", b"")
        with paramiko_sftp(client) as sftp:
            assert sorted(sftp.listdir(str(dev.root / "service"))) == ["firmware", "logs"]
            sftp.putfo(io.BytesIO(b"uploaded by paramiko"), str(dev.tree.tmp_dir / "p.txt"))
            assert (dev.tree.tmp_dir / "p.txt").read_bytes() == b"uploaded by paramiko"
            sftp.get(str(dev.tree.system_log), str(tmp_path / "log"))
    assert (tmp_path / "log").read_bytes() == dev.tree.system_log.read_bytes()


def test_wrong_pinned_host_key_is_refused(dev, tmp_path: Path):
    impostor = generate_keypair(tmp_path / "impostor", "host")
    wrong = write_known_hosts(tmp_path / "wrong_known_hosts", dev.host, dev.port, impostor.public_key)
    rc, out, err = run_ssh(dev.login, dev.host, dev.port, dev.client_key, "echo hi", known_hosts=wrong)
    assert rc == 255
    assert out == b""
    assert b"Host key verification failed." in err
    with pytest.raises(paramiko.BadHostKeyException):
        paramiko_session(
            dev.host, dev.port, dev.login, key=dev.client_key, host_key_line=impostor.public_key
        ).__enter__()


def test_unknown_key_is_refused(dev, pinned, ssh_keys):
    stranger = ssh_keys("stranger")
    rc, _, err = run_ssh(dev.login, dev.host, dev.port, stranger, "echo hi", known_hosts=pinned)
    assert rc == 255
    assert b"Permission denied (publickey)" in err


def test_extra_config_overrides_defaults(device, tmp_path: Path):
    dev = device(extra_config=["PubkeyAuthentication no"])
    pinned = dev.write_known_hosts(tmp_path / "kh")
    rc, _, err = run_ssh(dev.login, dev.host, dev.port, dev.client_key, "true", known_hosts=pinned)
    assert rc == 255
    assert b"Permission denied ()" in err  # no auth method left: the override took effect
    assert "Accepted publickey" not in dev.log_text()


def test_control_master_runs_three_commands_over_one_connection(dev, pinned):
    with ssh_control_master(dev.login, dev.host, dev.port, dev.client_key, known_hosts=pinned) as master:
        results = [master.run(f"echo {n}; exit {n}") for n in (1, 2, 3)]
        control_path = Path(master.control_path)
        assert control_path.exists()
        master_pid = master.master_pid
    assert results == [(n, f"{n}\n".encode(), b"") for n in (1, 2, 3)]
    assert dev.log_text().count("Accepted publickey") == 1
    assert not control_path.exists()
    assert master_pid not in {p.pid for p in living_descendants(os.getpid())}


def test_backgrounded_control_persist_master_is_cleaned_up(dev, pinned):
    with ssh_control_master(dev.login, dev.host, dev.port, dev.client_key, known_hosts=pinned, persist="30") as master:
        assert master.run("echo via-persist") == (0, b"via-persist\n", b"")
        master_pid = master.master_pid
    assert master_pid not in {p.pid for p in living_descendants(os.getpid())}


def test_silent_listener_times_out_at_connect_timeout(dev):
    with SilentListener() as hung:
        rc, _, err = run_ssh(dev.login, hung.host, hung.port, dev.client_key, "true", connect_timeout=1, timeout=15)
        assert hung.accepted == 1
    assert rc == 255
    assert b"timed out during banner exchange" in err


def test_closed_port_is_refused(dev):
    rc, _, err = run_ssh(dev.login, "127.0.0.1", closed_port(), dev.client_key, "true", timeout=15)
    assert rc == 255
    assert b"Connection refused" in err


def test_drop_connections_ends_live_session_and_restart_keeps_identity(dev, pinned):
    with PtySession.spawn_ssh(
        dev.login, dev.host, dev.port, dev.client_key, "echo ready; sleep 60", known_hosts=pinned
    ) as term:
        term.expect(b"ready")
        assert dev.drop_connections()
        assert term.wait(timeout=10) == 255
    port = dev.port
    dev.restart()
    assert dev.port == port
    assert ssh(dev, pinned, "echo back") == (0, b"back\n", b"")


def test_close_leaves_no_process_behind(tmp_path: Path):
    with SshdDevice(tmp_path / "d") as dev:
        pinned = dev.write_known_hosts(tmp_path / "kh")
        term = PtySession.spawn_ssh(dev.login, dev.host, dev.port, dev.client_key, "sleep 60", known_hosts=pinned)
        dev.wait_for_log("Starting session")
        config = str(dev.config_path)
    # The vendor-side client sees the device vanish; no sshd of this device survives.
    assert term.wait(timeout=10) == 255
    term.close()
    assert not [p for p in living_descendants(os.getpid()) if config in p.cmdline or "sleep 60" in p.cmdline]


def test_password_device(device, tmp_path: Path):
    dev = device(password="Corr3ct-horse")
    pinned = dev.write_known_hosts(tmp_path / "kh")
    assert dev.login != "root"
    with paramiko_session(
        dev.host, dev.port, dev.login, password="Corr3ct-horse", host_key_line=dev.host_key_line
    ) as c:
        assert paramiko_exec(c, "id -un; pwd") == (0, f"{dev.login}\n{dev.root}\n".encode(), b"")
        assert paramiko_exec(c, f"cat {dev.tree.system_log}").stdout == dev.tree.system_log.read_bytes()
    ok = run_ssh(dev.login, dev.host, dev.port, None, "echo pw-ok", known_hosts=pinned, password="Corr3ct-horse")
    assert ok == (0, b"pw-ok\n", b"")
    bad = run_ssh(dev.login, dev.host, dev.port, None, "echo no", known_hosts=pinned, password="wrong")
    assert bad.returncode == 255 and b"Permission denied" in bad.stderr
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_session(dev.host, dev.port, dev.login, password="wrong", host_key_line=dev.host_key_line).__enter__()
    login = dev.login
    dev.close()
    assert subprocess.run(["getent", "passwd", login], capture_output=True, check=False).returncode == 2


@pytest.mark.parametrize("key_type", ["ed25519", "rsa", "ecdsa"])
def test_keypair_matches_ssh_keygen(tmp_path: Path, key_type: str):
    key = generate_keypair(tmp_path, key_type=key_type, bits=2048 if key_type == "rsa" else None)
    printed = subprocess.run(["ssh-keygen", "-lf", str(key.private_path)], capture_output=True, check=True, timeout=10)
    assert printed.stdout.split()[1].decode() == key.fingerprint
    assert key.fingerprint.startswith("SHA256:")
    assert (
        key.public_key.split()[0]
        == {"ed25519": "ssh-ed25519", "rsa": "ssh-rsa", "ecdsa": "ecdsa-sha2-nistp256"}[key_type]
    )
    assert oct(key.private_path.stat().st_mode & 0o777) == "0o600"


def test_device_tree_layout(tmp_path: Path):
    tree = make_device_tree(tmp_path / "dev")
    assert tree.system_log == tmp_path / "dev/service/logs/system.log"
    assert tree.dicom_files
    assert all(p.is_relative_to(tmp_path / "dev/data/dicom") for p in tree.dicom_files)
    assert any(p.read_bytes()[128:132] == b"DICM" for p in tree.dicom_files)
    assert any(p.suffix == "" and p.name != "DICOMDIR" for p in tree.dicom_files)
    assert (tree.firmware_dir / "version.txt").read_text() == "4.2.1\n"
    assert tree.patient["link_into_dicom"].is_symlink()
    assert tree.tmp_dir.is_dir()


def test_silent_listener_with_banner_holds_the_connection():
    with SilentListener(banner=b"SSH-2.0-Hung\r\n") as hung:
        with socket.create_connection((hung.host, hung.port), timeout=5) as sock:
            assert sock.recv(100) == b"SSH-2.0-Hung\r\n"
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(100)
