"""A fake medical device: a real OpenSSH `sshd -D -e -f <cfg> -p <port>` on loopback with its own host key."""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from helpers import HelperTimeoutError, find_binary
from helpers.accounts import (
    accounts_supported,
    create_account,
    delete_account,
    make_shared_dir,
    new_account_name,
    remove_stale_accounts,
)
from helpers.clients import known_hosts_entry, write_known_hosts
from helpers.devicetree import DeviceTree, make_device_tree
from helpers.keys import KeyPair, generate_keypair
from helpers.net import free_port
from helpers.procs import kill_tree, living_descendants

__all__ = [
    "PasswordDeviceUnavailableError",
    "SshdDevice",
    "SshdStartError",
    "device_accounts_supported",
    "live_devices",
    "openssh_version",
    "password_devices_supported",
    "remove_stale_accounts",
]

_SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
)
_LISTENING = re.compile(r"Server listening on \S+ port (\d+)")
_PORT_RETRIES = 3
_REAPER = Path(__file__).with_name("reaper.py")
_LIVE: set[SshdDevice] = set()
_housekeeping_done = False


class SshdStartError(RuntimeError):
    """sshd did not come up; the message holds its log and config."""


class PasswordDeviceUnavailableError(RuntimeError):
    """A password device needs a throwaway local account, which only root can create."""


def live_devices() -> list[SshdDevice]:
    """Return devices that were started or prepared and not yet closed (for the leftover check)."""
    return list(_LIVE)


@lru_cache(maxsize=1)
def openssh_version() -> tuple[int, int]:
    """Return the (major, minor) version of the installed OpenSSH client, e.g. (9, 2)."""
    ssh = find_binary("ssh") or "ssh"
    proc = subprocess.run([ssh, "-V"], capture_output=True, timeout=10, check=False)
    match = re.search(rb"OpenSSH_(\d+)\.(\d+)", proc.stderr + proc.stdout)
    if match is None:
        raise RuntimeError(f"cannot parse `ssh -V`: {proc.stderr!r}")
    return int(match.group(1)), int(match.group(2))


def device_accounts_supported() -> bool:
    """Return True when devices log in as throwaway local accounts (root with useradd, chpasswd and userdel).

    Then every device's login is its own account with /bin/sh as shell, never root: root's shell rc
    files here (pyenv init, which can wait 60 s on a stale lock) must not run for each device command.
    """
    return accounts_supported()


def password_devices_supported() -> bool:
    """Return True when password devices can be made here (they need a throwaway account: root only)."""
    return accounts_supported()


def _close_live_devices() -> None:
    """atexit: close devices a caller forgot (outside pytest's session-end check), so no account outlives us."""
    for device in list(_LIVE):
        try:
            device.close()
        except Exception:  # noqa: BLE001 - exiting anyway; the next run's remove_stale_accounts retries
            pass


def _housekeeping() -> None:
    """Once per process, before the first throwaway account: sweep stale ones and arm the atexit cleanup."""
    global _housekeeping_done
    if _housekeeping_done:
        return
    _housekeeping_done = True
    atexit.register(_close_live_devices)
    remove_stale_accounts()


class SshdDevice:
    """A real sshd acting as one medical device on 127.0.0.1.

    workdir: private dir for config, host key, pid file and logs (e.g. a pytest tmp_path subdir).
    authorized_keys: keys (KeyPair, public-key line, or .pub path) that may log in; default: a fresh
      ed25519 pair is generated and exposed as `client_key` (the broker's device credential).
    password: if given, the device also accepts password auth for its account (root only: raises
      PasswordDeviceUnavailableError otherwise).
    port: fixed port (default: a free one, retried up to 3 times if taken meanwhile).
    tree: create the fake device filesystem (see `tree`, `root`).
    exposed: False (default) makes a *contained* device: as root, the patient directories (`patient_dirs`:
      data/dicom, var/spool/hl7, opt/lis/data) belong to root with mode 0700, so the maintenance login
      cannot read them. True makes an *exposed* device: the login owns and can read the whole tree, as on
      scanners whose vendor owns the OS. Not root: always exposed (the login is the current user).
    extra_config: extra sshd_config lines, placed *before* the defaults because sshd keeps the first
      value it reads for a keyword (so "MaxSessions 1" or "Ciphers ..." override); no Match blocks.

    The account: as root (as in CI) every device gets a throwaway local account `mbdev<pid>x<n>` with
    /bin/sh as its shell, made at start and deleted at close; the tree, its home, lives in a
    world-traversable /tmp/mbdev-<pid>-* dir and belongs to it, except the patient directories of a
    contained device (see `exposed`); it can write tmp/ and service/firmware/. Not root: the current user.

    Attributes: host, port, login (the account's name; for root, valid once started), password,
    host_key (KeyPair), host_key_line ("ssh-ed25519 AAAA..."),
    host_key_fingerprint ("SHA256:..."), client_key (KeyPair | None), tree (DeviceTree | None),
    root (Path), log_path, sftp_log_path, config_path, authorized_keys_path, pid.
    Use as a context manager (start/close) or through the `device` fixture; close() always cleans up.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        authorized_keys: Sequence[KeyPair | str | Path] | None = None,
        password: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        tree: bool = True,
        max_sessions: int = 10,
        client_alive_interval: int = 15,
        extra_config: Sequence[str] = (),
        startup_timeout: float = 10.0,
        exposed: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port: int = port or 0
        self._fixed_port = port is not None
        self.password = password
        self.max_sessions = max_sessions
        self.client_alive_interval = client_alive_interval
        self.extra_config = tuple(extra_config)
        self.startup_timeout = startup_timeout
        self.exposed = exposed
        if password is not None and not password_devices_supported():
            raise PasswordDeviceUnavailableError(
                "a password device needs root (it creates a throwaway local account with useradd/chpasswd); "
                "run the tests as root, as CI does"
            )
        self.host_key = generate_keypair(self.workdir, "ssh_host_ed25519_key", comment="device-host-key")
        self.client_key: KeyPair | None = None
        if authorized_keys is None:
            self.client_key = generate_keypair(self.workdir / "client", "device_key", comment="broker-device-key")
            authorized_keys = [self.client_key]
        else:
            self.client_key = next((k for k in authorized_keys if isinstance(k, KeyPair)), None)
        self._initial_keys = list(authorized_keys)
        self.login = pwd.getpwuid(os.geteuid()).pw_name
        self._use_account = device_accounts_supported()
        self._account_created = False
        # Files the logged-in account must read or write live in `shared`: for a throwaway account that
        # is a world-traversable /tmp dir, because pytest's tmp dirs are 0700 root.
        self._shared_dir = self.workdir
        if self._use_account:
            self._shared_dir = make_shared_dir()
        self.root = self._shared_dir / "root"
        self.authorized_keys_path = self._shared_dir / "authorized_keys"
        self.sftp_log_path = self._shared_dir / "sftp.log"
        self.config_path = self.workdir / "sshd_config"
        self.log_path = self.workdir / "sshd.log"
        self.pid_path = self.workdir / "sshd.pid"
        self.tree: DeviceTree | None = None
        self._want_tree = tree
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._closed = False

    # ----------------------------------------------------------------- keys and known_hosts
    @property
    def host_key_line(self) -> str:
        """Return the device's public host key as "ssh-ed25519 BASE64" (what `--host-key` takes)."""
        return self.host_key.public_key

    @property
    def host_key_fingerprint(self) -> str:
        """Return the host key's "SHA256:..." fingerprint."""
        return self.host_key.fingerprint

    def known_hosts_line(self) -> str:
        """Return the known_hosts line pinning this device: "[127.0.0.1]:PORT ssh-ed25519 BASE64"."""
        return known_hosts_entry(self.host, self.port, self.host_key_line)

    def write_known_hosts(self, path: Path | str) -> Path:
        """Append this device's known_hosts line to `path` (created if missing) and return the path."""
        return write_known_hosts(path, self.host, self.port, self.host_key_line, append=True)

    def add_authorized_key(self, key: KeyPair | str | Path) -> None:
        """Allow one more key to log in; takes effect for the next connection (no restart)."""
        line = self._key_line(key)
        with self.authorized_keys_path.open("a") as handle:
            handle.write(line + "\n")

    @staticmethod
    def _key_line(key: KeyPair | str | Path) -> str:
        if isinstance(key, KeyPair):
            return key.public_line
        if isinstance(key, Path):
            return key.read_text().strip()
        return key.strip()

    # ----------------------------------------------------------------- lifecycle
    @property
    def pid(self) -> int | None:
        """Return the pid of the device's process-tree root (the reaper shim) while it runs, else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def sshd_pid(self) -> int | None:
        """Return the listening sshd's own pid (from its PidFile) while it runs, else None."""
        if not self.is_running or not self.pid_path.exists():
            return None
        return int(self.pid_path.read_text().strip())

    @property
    def is_running(self) -> bool:
        """Return True while the device's processes run."""
        return self.pid is not None

    def _prepare(self) -> None:
        if self._prepared:
            return
        _LIVE.add(self)
        self._prepared = True
        self.authorized_keys_path.write_text("".join(self._key_line(k) + "\n" for k in self._initial_keys))
        self.authorized_keys_path.chmod(0o644)  # sshd reads it as the account
        self.sftp_log_path.touch()
        if self._want_tree:
            self.tree = make_device_tree(self.root)
        else:
            self.root.mkdir(exist_ok=True)
        if self._use_account:
            self._create_account()
        if os.geteuid() == 0:
            # Privilege-separation dir; containers and fresh VMs often lack it (systemd makes it at boot).
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _create_account(self) -> None:
        _housekeeping()
        self.login = new_account_name()
        self._account_created = True  # set first: close() deletes it even if useradd died half-way
        # Home = the tree, inside the shared dir, so sshd can chdir there.
        entry = create_account(self.login, self.root, password=self.password)
        for path in [self.root, *self.root.rglob("*"), self.sftp_log_path]:
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        if not self.exposed and self.tree is not None:
            # Contained: the patient trees belong to root, mode 0700; the maintenance login cannot read
            # (or traverse) them, so only an exposed device depends on the broker's own guards.
            for path in self.patient_dirs:
                os.chown(path, 0, 0, follow_symlinks=False)
                path.chmod(0o700)

    @property
    def patient_dirs(self) -> tuple[Path, ...]:
        """The fake tree's patient directories (DICOM store, HL7 spool, LIS data); empty without a tree."""
        if self.tree is None:
            return ()
        p = self.tree.patient
        return (p["dicom_dir"], p["hl7_dir"], p["astm_file"].parent)

    @property
    def contained(self) -> bool:
        """True when the login cannot read the patient directories (a throwaway account and exposed=False)."""
        return self._account_created and not self.exposed and self.tree is not None

    def _sftp_subsystem(self) -> str:
        server = next((p for p in _SFTP_SERVER_CANDIDATES if os.access(p, os.X_OK)), None)
        if server is None:
            return "internal-sftp"  # no per-request log then; sftp_log_text() stays empty
        # sshd runs the subsystem through the login shell, so the redirect gives a per-request log.
        return f"{server} -e -l VERBOSE 2>>{shlex.quote(str(self.sftp_log_path))}"

    def _config_text(self) -> str:
        lines = [
            *self.extra_config,
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key.private_path}",
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            f"AllowUsers {self.login}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            f"PasswordAuthentication {'yes' if self.password is not None else 'no'}",
            "KbdInteractiveAuthentication no",
            "PermitEmptyPasswords no",
            f"Subsystem sftp {self._sftp_subsystem()}",
            "LogLevel VERBOSE",
            f"MaxSessions {self.max_sessions}",
            "MaxStartups 50:30:100",
            f"ClientAliveInterval {self.client_alive_interval}",
            "ClientAliveCountMax 3",
            "LoginGraceTime 30",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "AllowTcpForwarding yes",
        ]
        if os.geteuid() == 0:
            lines.append("PermitRootLogin prohibit-password")
        if openssh_version() >= (9, 8):
            # 9.8+ penalises sources that fail auth; every test client is 127.0.0.1.
            lines.append("PerSourcePenalties no")
        return "\n".join(lines) + "\n"

    def start(self) -> SshdDevice:
        """Start sshd and wait (bounded by startup_timeout) until it logs "Server listening" and accepts.

        Returns self. Raises SshdStartError with sshd's log and config if it does not come up.
        """
        if self._closed:
            raise RuntimeError("this SshdDevice was closed; make a new one")
        if self.is_running:
            return self
        self._prepare()
        sshd = find_binary("sshd")
        if sshd is None:
            raise SshdStartError("sshd is not installed; run scripts/install.sh")
        for _ in range(_PORT_RETRIES):
            if not self._fixed_port:
                self.port = free_port(self.host)
            self.config_path.write_text(self._config_text())
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.pid_path.unlink(missing_ok=True)
            with self.log_path.open("ab") as log:
                # The reaper shim adopts sshd's orphaned session processes, so the whole device is one
                # process tree under our Popen: reaped as it runs, killable as a unit.
                self._proc = subprocess.Popen(
                    [sys.executable, str(_REAPER), sshd, "-D", "-e", "-f", str(self.config_path), "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            outcome = self._wait_listening(log_offset)
            if outcome == "up":
                return self
            if outcome != "port-taken" or self._fixed_port:
                break
        log = self._read_log(log_offset)
        self.stop()
        raise SshdStartError(
            f"sshd did not start on {self.host}:{self.port} within {self.startup_timeout}s.\n"
            f"--- sshd output ---\n{log}\n--- {self.config_path} ---\n{self.config_path.read_text()}"
        )

    def _read_log(self, offset: int = 0) -> str:
        with self.log_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")

    def _wait_listening(self, log_offset: int) -> str:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = self._read_log(log_offset)
            if self._proc.poll() is not None:
                self._proc.wait()
                return "port-taken" if "Address already in use" in text else "died"
            # sshd writes its PidFile just after it starts listening.
            if _LISTENING.search(text) and self.pid_path.exists() and self.pid_path.read_text().strip():
                return "up"
            time.sleep(0.01)
        return "timeout"

    def drop_connections(self, timeout: float = 5.0) -> list[int]:
        """Kill every session process (live connections die; the listener keeps running).

        Returns the killed pids. Bounded by `timeout` seconds.
        """
        listener = self.sshd_pid
        if listener is None or self._proc is None:
            return []
        killed = kill_tree(listener, include_root=False)
        # Anything that slipped out of the listener's tree re-parented to the reaper shim: sweep it.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            strays = [p.pid for p in living_descendants(self._proc.pid) if p.pid != listener]
            if not strays:
                break
            for pid in strays:
                kill_tree(pid)
            killed += strays
            time.sleep(0.01)
        return killed

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the device: the reaper shim kills sshd and every session process, then exits. Idempotent.

        Falls back to SIGKILLing the whole tree if the shim does not exit within `timeout` seconds.
        """
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(self._proc.pid)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:  # SIGKILL cannot be ignored; this means a stuck kernel
            raise HelperTimeoutError(f"device process {self._proc.pid} survived SIGKILL for {timeout}s") from exc
        self._proc = None

    def restart(self) -> SshdDevice:
        """Stop and start again on the same port with the same host key and files (a device reboot)."""
        self.stop()
        self._fixed_port = True
        return self.start()

    def close(self) -> None:
        """Stop sshd and undo everything start() did outside workdir (throwaway account, /tmp dir)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            try:
                if self._account_created:
                    delete_account(self.login)
                    self._account_created = False
            finally:
                if self._shared_dir != self.workdir:
                    shutil.rmtree(self._shared_dir, ignore_errors=True)
                _LIVE.discard(self)

    def __enter__(self) -> SshdDevice:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- logs
    def log_text(self) -> str:
        """Return everything sshd has logged so far (VERBOSE: connections, auth, sessions)."""
        return self._read_log() if self.log_path.exists() else ""

    def sftp_log_text(self) -> str:
        """Return the device-side SFTP request log (open/close with byte counts, opendir, realpath, ...)."""
        return self.sftp_log_path.read_text(errors="replace") if self.sftp_log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 5.0, *, sftp: bool = False) -> re.Match[str]:
        """Poll the sshd log (or the SFTP log) until regex `pattern` matches; return the match.

        Raises HelperTimeoutError with the log after `timeout` seconds.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.sftp_log_text() if sftp else self.log_text()
            match = regex.search(text)
            if match is not None:
                return match
            if time.monotonic() >= deadline:
                raise HelperTimeoutError(
                    f"{pattern!r} not in the {'sftp' if sftp else 'sshd'} log after {timeout}s:\n{text}"
                )
            time.sleep(0.02)

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<SshdDevice {self.login}@{self.host}:{self.port} {state}>"
