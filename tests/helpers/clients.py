"""Run the real OpenSSH clients (ssh, scp, sftp, ControlMaster) and paramiko against host:port, bounded."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from helpers import HelperTimeoutError, find_binary
from helpers.keys import KeyPair
from helpers.procs import kill_tree

if TYPE_CHECKING:
    import paramiko

__all__ = [
    "ControlMaster",
    "ProcResult",
    "client_environment",
    "known_hosts_entry",
    "paramiko_connect",
    "paramiko_exec",
    "paramiko_session",
    "paramiko_sftp",
    "run_command",
    "run_scp",
    "run_sftp_batch",
    "run_ssh",
    "scp_download",
    "scp_upload",
    "ssh_control_master",
    "ssh_options",
    "write_known_hosts",
]

KeyLike = KeyPair | Path | str | None


class ProcResult(NamedTuple):
    """What a client run produced: unpack as `rc, out, err = run_ssh(...)`."""

    returncode: int
    stdout: bytes
    stderr: bytes


def _binary(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed; run scripts/install.sh")
    return path


def run_command(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> ProcResult:
    """Run argv with stdin = input (or /dev/null), collect stdout/stderr with communicate(timeout).

    On timeout the whole process tree is killed and HelperTimeoutError is raised with the partial output.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate(timeout=10)
        raise HelperTimeoutError(
            f"{argv[0]} did not finish within {timeout}s: {' '.join(argv)}\n"
            f"stdout: {out[-2000:]!r}\nstderr: {err[-2000:]!r}"
        ) from None
    return ProcResult(proc.returncode, out, err)


def known_hosts_entry(host: str, port: int, host_key_line: str) -> str:
    """Return a known_hosts line: "[host]:port TYPE BASE64" (plain "host ..." for port 22)."""
    algorithm, blob = host_key_line.split()[:2]
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {algorithm} {blob}"


def write_known_hosts(path: Path | str, host: str, port: int, host_key_line: str, *, append: bool = False) -> Path:
    """Write (or append) one known_hosts line pinning host:port to host_key_line; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as handle:
        handle.write(known_hosts_entry(host, port, host_key_line) + "\n")
    return path


def ssh_options(
    *,
    key: KeyLike,
    known_hosts: Path | str,
    host_key_checking: str,
    connect_timeout: int = 10,
    batch: bool = True,
) -> list[str]:
    """Return the hermetic option list every helper passes to ssh/scp/sftp.

    -F /dev/null, BatchMode, UserKnownHostsFile=known_hosts (GlobalKnownHostsFile=/dev/null),
    StrictHostKeyChecking=host_key_checking, IdentitiesOnly=yes, no agent, ConnectTimeout, and -i key;
    with key=None public-key auth is switched off (so nothing from ~/.ssh is ever offered).
    """
    opts = [
        "-F", "/dev/null",
        "-o", f"BatchMode={'yes' if batch else 'no'}",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"StrictHostKeyChecking={host_key_checking}",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", f"ConnectTimeout={connect_timeout}",
    ]  # fmt: skip
    if key is None:
        opts += ["-o", "PubkeyAuthentication=no"]
    else:
        opts += ["-i", os.fspath(key)]
    return opts


def client_environment(
    scratch: Path, known_hosts: Path | str | None, host_key_checking: str | None, password: str | None
) -> tuple[str, str, dict[str, str]]:
    """Prepare one client run: return (known_hosts path, StrictHostKeyChecking value, env).

    scratch: a private dir the caller removes afterwards; it receives a throwaway known_hosts (when
    known_hosts is None, checked with accept-new; a given file is checked with "yes") and, with a
    password, an SSH_ASKPASS script that answers every prompt with it. env drops SSH_AUTH_SOCK/DISPLAY.
    """
    if known_hosts is None:
        known_hosts = scratch / "known_hosts"
        checking = host_key_checking or "accept-new"
    else:
        checking = host_key_checking or "yes"
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")}
    if password is not None:
        # ssh asks SSH_ASKPASS for passwords and keyboard-interactive answers (e.g. a TOTP code).
        secret = scratch / "answer"
        secret.write_text(password)
        askpass = scratch / "askpass"
        askpass.write_text(f"#!/bin/sh\nexec cat '{secret}'\n")
        askpass.chmod(0o700)
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
    return str(known_hosts), checking, env


@contextmanager
def _client_setup(
    known_hosts: Path | str | None, host_key_checking: str | None, password: str | None
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """client_environment() in a scratch dir that lives for the block."""
    scratch = Path(tempfile.mkdtemp(prefix="mbcli-"))
    try:
        yield client_environment(scratch, known_hosts, host_key_checking, password)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_ssh(
    user_string: str,
    host: str,
    port: int,
    key: KeyLike,
    command: str | None = None,
    input: bytes | None = None,
    extra_opts: Sequence[str] = (),
    timeout: float = 30.0,
    *,
    known_hosts: Path | str | None = None,
    host_key_checking: str | None = None,
    connect_timeout: int = 10,
    tty: bool = False,
    password: str | None = None,
) -> ProcResult:
    """Run `ssh -p port user_string@host [command]` with the hermetic options (see ssh_options).

    user_string: e.g. "root" or "alice@ct-01" (the broker's routing syntax); key: private key
    (KeyPair or path) or None; input: bytes for stdin (default /dev/null); known_hosts: a pinned
    known_hosts file (then StrictHostKeyChecking=yes), or None for a throwaway file with accept-new
    (which adds a "Permanently added" warning to stderr); tty: pass -tt; password: answer every
    password / keyboard-interactive prompt with this text via SSH_ASKPASS (BatchMode off).
    Returns ProcResult(returncode, stdout, stderr); 255 is ssh's own failure. Raises HelperTimeoutError.
    """
    with _client_setup(known_hosts, host_key_checking, password) as (kh, checking, env):
        argv = [
            _binary("ssh"),
            *ssh_options(
                key=key,
                known_hosts=kh,
                host_key_checking=checking,
                connect_timeout=connect_timeout,
                batch=password is None,
            ),
        ]
        argv += ["-p", str(port), *(["-tt"] if tty else []), *extra_opts, f"{user_string}@{host}"]
        if command is not None:
            argv.append(command)
        return run_command(argv, input=input, timeout=timeout, env=env)


def run_scp(
    paths: Sequence[str],
    port: int,
    key: KeyLike,
    *,
    legacy: bool = False,
    recursive: bool = False,
    extra_opts: Sequence[str] = (),
    timeout: float = 30.0,
    known_hosts: Path | str | None = None,
    host_key_checking: str | None = None,
    connect_timeout: int = 10,
) -> ProcResult:
    """Run `scp -P port [-O] [-r] paths...`; remote paths are written "user@host:/path".

    legacy: pass -O (the old scp/rcp protocol, i.e. exec "scp -t/-f" on the server) instead of SFTP mode.
    """
    with _client_setup(known_hosts, host_key_checking, None) as (kh, checking, env):
        argv = [
            _binary("scp"),
            *ssh_options(key=key, known_hosts=kh, host_key_checking=checking, connect_timeout=connect_timeout),
        ]
        argv += ["-P", str(port), *(["-O"] if legacy else []), *(["-r"] if recursive else []), *extra_opts]
        argv += list(paths)
        return run_command(argv, timeout=timeout, env=env)


def scp_upload(
    user_string: str, host: str, port: int, key: KeyLike, local: Path | str, remote_path: str, **kwargs: object
) -> ProcResult:
    """Copy a local file (or dir with recursive=True) to remote_path; kwargs as for run_scp."""
    return run_scp([os.fspath(local), f"{user_string}@{host}:{remote_path}"], port, key, **kwargs)  # type: ignore[arg-type]


def scp_download(
    user_string: str, host: str, port: int, key: KeyLike, remote_path: str, local: Path | str, **kwargs: object
) -> ProcResult:
    """Copy remote_path to a local file or dir; kwargs as for run_scp (legacy=True for scp -O)."""
    return run_scp([f"{user_string}@{host}:{remote_path}", os.fspath(local)], port, key, **kwargs)  # type: ignore[arg-type]


def run_sftp_batch(
    batch_text: str,
    user_string: str,
    host: str,
    port: int,
    key: KeyLike,
    *,
    extra_opts: Sequence[str] = (),
    timeout: float = 30.0,
    known_hosts: Path | str | None = None,
    host_key_checking: str | None = None,
    connect_timeout: int = 10,
) -> ProcResult:
    """Run `sftp -b - user_string@host` feeding batch_text on stdin.

    sftp stops at the first failing command (exit 1) unless the command is prefixed with "-".
    stdout echoes each command as "sftp> cmd" followed by its output.
    """
    with _client_setup(known_hosts, host_key_checking, None) as (kh, checking, env):
        argv = [
            _binary("sftp"),
            *ssh_options(key=key, known_hosts=kh, host_key_checking=checking, connect_timeout=connect_timeout),
        ]
        argv += ["-P", str(port), *extra_opts, "-b", "-", f"{user_string}@{host}"]
        return run_command(argv, input=batch_text.encode(), timeout=timeout, env=env)


class ControlMaster:
    """An OpenSSH ControlMaster connection, with commands multiplexed over it.

    start() opens the master (`ssh -M -N -o ControlMaster=yes -o ControlPath=...`); run() executes a
    command as a mux client *without any key* (so a dead master cannot silently fall back to a fresh,
    authenticated connection); stop() sends `-O exit` and kills whatever is left. persist: a
    ControlPersist value (e.g. "60"): the master then forks into the background (`-f`) and is tracked by
    the pid `-O check` reports. Use as a context manager or via ssh_control_master().
    """

    def __init__(
        self,
        user_string: str,
        host: str,
        port: int,
        key: KeyLike,
        *,
        known_hosts: Path | str | None = None,
        host_key_checking: str | None = None,
        persist: str | None = None,
        extra_opts: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> None:
        self.destination = f"{user_string}@{host}"
        self.port = port
        self.key = key
        self.persist = persist
        self.extra_opts = tuple(extra_opts)
        self.timeout = timeout
        # Unix socket paths are limited to ~108 bytes and ssh appends a 17-byte suffix while binding.
        self._dir = Path(tempfile.mkdtemp(prefix="mbcm-", dir="/tmp"))
        self.control_path = str(self._dir / "s")
        self._log_path = self._dir / "master.stderr"
        self._known_hosts = known_hosts if known_hosts is not None else self._dir / "known_hosts"
        self._checking = host_key_checking or ("yes" if known_hosts is not None else "accept-new")
        self._proc: subprocess.Popen[bytes] | None = None
        self.master_pid: int | None = None

    def _argv(self, key: KeyLike, *args: str) -> list[str]:
        return [
            _binary("ssh"),
            *ssh_options(key=key, known_hosts=self._known_hosts, host_key_checking=self._checking),
            "-p", str(self.port), "-o", f"ControlPath={self.control_path}", *self.extra_opts, *args,
        ]  # fmt: skip

    def start(self) -> ControlMaster:
        """Open the master connection and wait (bounded by timeout) until `-O check` answers; return self.

        Raises HelperTimeoutError (with ssh's stderr) if the master does not come up.
        """
        persist = ["-f", "-o", f"ControlPersist={self.persist}"] if self.persist else ["-o", "ControlPersist=no"]
        argv = self._argv(self.key, "-M", "-N", "-o", "ControlMaster=yes", *persist, self.destination)
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            check = self.check()
            match = re.search(rb"pid=(\d+)", check.stderr)
            if check.returncode == 0 and match:
                self.master_pid = int(match.group(1))
                return self
            if self._proc.poll() is not None and not self.persist:
                break  # the foreground master died
            time.sleep(0.02)
        stderr = self.master_stderr()
        self.stop()
        raise HelperTimeoutError(f"ControlMaster to {self.destination}:{self.port} did not come up: {stderr!r}")

    def master_stderr(self) -> bytes:
        """Return what the master ssh process wrote on stderr so far."""
        return self._log_path.read_bytes() if self._log_path.exists() else b""

    def check(self) -> ProcResult:
        """Run `ssh -O check`; stderr says "Master running (pid=N)" when it is up."""
        return run_command(self._argv(None, "-O", "check", self.destination), timeout=10)

    def run(self, command: str, input: bytes | None = None, timeout: float = 30.0) -> ProcResult:
        """Run one command over the master (ControlMaster=no, no key); return ProcResult."""
        argv = self._argv(None, "-o", "ControlMaster=no", self.destination, command)
        return run_command(argv, input=input, timeout=timeout)

    def stop(self) -> None:
        """Send `-O exit`, wait for the master to end (bounded), kill it if needed, remove the socket dir."""
        try:
            if Path(self.control_path).exists():
                run_command(self._argv(None, "-O", "exit", self.destination), timeout=10)
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    kill_tree(self._proc.pid)
                    self._proc.wait(timeout=5)
            if self.persist and self.master_pid is not None:
                # The backgrounded master is not our Popen child: kill and reap it by pid.
                kill_tree(self.master_pid, reap_root=True)
        finally:
            self._proc = None
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ControlMaster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def ssh_control_master(
    user_string: str, host: str, port: int, key: KeyLike, **kwargs: object
) -> Iterator[ControlMaster]:
    """Context manager: a started ControlMaster (kwargs as for ControlMaster), always stopped at exit."""
    with ControlMaster(user_string, host, port, key, **kwargs) as master:  # type: ignore[arg-type]
        yield master


# --------------------------------------------------------------------------- paramiko (second client)
def paramiko_connect(
    host: str,
    port: int,
    username: str,
    *,
    key: KeyLike = None,
    password: str | None = None,
    host_key_line: str | None = None,
    timeout: float = 10.0,
) -> paramiko.SSHClient:
    """Connect with paramiko (look_for_keys=False, allow_agent=False) and return the SSHClient.

    key: private key file (KeyPair or path); password: for password auth; host_key_line: pin the server
    key ("ssh-ed25519 BASE64"; a mismatch raises paramiko.BadHostKeyException), or None to accept any.
    Caller closes the client (or use paramiko_session).
    """
    import paramiko

    client = paramiko.SSHClient()
    if host_key_line is not None:
        algorithm, blob = host_key_line.split()[:2]
        server_key = paramiko.PKey.from_type_string(algorithm, base64.b64decode(blob))
        client.get_host_keys().add(f"[{host}]:{port}" if port != 22 else host, algorithm, server_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    pkey = paramiko.PKey.from_path(os.fspath(key)) if key is not None else None
    try:
        client.connect(
            host, port=port, username=username, pkey=pkey, password=password,
            look_for_keys=False, allow_agent=False,
            timeout=timeout, banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
        )  # fmt: skip
    except BaseException:
        client.close()
        raise
    return client


@contextmanager
def paramiko_session(host: str, port: int, username: str, **kwargs: object) -> Iterator[paramiko.SSHClient]:
    """Context manager around paramiko_connect that always closes the client."""
    client = paramiko_connect(host, port, username, **kwargs)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        client.close()


def paramiko_exec(
    client: paramiko.SSHClient, command: str, input: bytes | None = None, timeout: float = 30.0
) -> ProcResult:
    """Exec `command` on a new channel, send input then EOF, and collect everything until exit.

    Returns ProcResult(exit status, stdout, stderr). Raises HelperTimeoutError after `timeout` seconds.
    """
    transport = client.get_transport()
    if transport is None:
        raise RuntimeError("paramiko client is not connected")
    chan = transport.open_session(timeout=timeout)
    try:
        chan.exec_command(command)
        if input:
            chan.sendall(input)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        while True:
            progressed = False
            if chan.recv_ready():
                out += chan.recv(65536)
                progressed = True
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                progressed = True
            if chan.exit_status_ready() and (chan.eof_received or chan.closed) \
                    and not chan.recv_ready() and not chan.recv_stderr_ready():
                # sshd may send exit-status before the last stderr bytes (it reads the pipes after the
                # child exits), so wait for EOF too; data before EOF is then all here.
                break
            if time.monotonic() > deadline:
                raise HelperTimeoutError(f"paramiko exec {command!r} did not finish in {timeout}s; out={bytes(out)!r}")
            if not progressed:
                time.sleep(0.005)
        return ProcResult(chan.recv_exit_status(), bytes(out), bytes(err))
    finally:
        chan.close()


def paramiko_sftp(client: paramiko.SSHClient) -> paramiko.SFTPClient:
    """Open an SFTP session on a paramiko client (close it, or use it as a context manager)."""
    return client.open_sftp()
