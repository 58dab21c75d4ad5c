"""The bench world: a real sshd device, a plain sshd jump host, medbroker brokers and the bare asyncssh relay
(bench/bare_relay.py) as separate processes.

Everything listens on 127.0.0.1 only. ``BenchWorld.close()`` stops every process the world started (by
pid) and removes its files and tmpfs mounts, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BenchWorld", "BrokerProc", "BareRelayProc", "BenchSetupError", "PATHS", "DEVICE_ACCOUNT", "code_fingerprint"]

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DEVICE_ACCOUNT = "mbbench"
DEVICE_ACCOUNT_HOME = "/var/lib/medbroker-bench"
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")
# ssh_config Host aliases; "medbroker-tmpfs" is the same broker code with recordings on tmpfs, "medbroker-2w"
# the same home config with [listen] workers = 2 (a supervisor and two worker processes on one port); "bare" the
# bare asyncssh relay (bench/bare_relay.py: what asyncssh itself costs, the reference for the product's overhead).
PATHS = ("direct", "proxyjump", "proxyjump-gcm", "bare", "medbroker", "medbroker-tmpfs", "medbroker-2w")
MULTI_WORKER = {"medbroker-2w": 2}  # broker path -> listen.workers
GCM = "aes128-gcm@openssh.com"


class BenchSetupError(RuntimeError):
    """The bench world could not be built; the message says what and where the logs are."""


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _keygen(path: Path, comment: str) -> str:
    proc = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    if proc.returncode != 0:
        raise BenchSetupError(f"ssh-keygen failed: {proc.stderr.decode(errors='replace')}")
    return path.with_suffix(".pub").read_text().strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_banner(port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float = 30) -> str:
    """Wait until ``port`` answers with an SSH banner; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchSetupError(f"{what} exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                banner = s.recv(256)
                if banner.startswith(b"SSH-"):
                    return banner.split(b"\r\n")[0].decode(errors="replace")
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchSetupError(f"{what} did not answer on 127.0.0.1:{port} within {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop one process we started: ``sig``, wait, then SIGKILL its own process group."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            pass
        proc.wait(10)


def _is_tmpfs(path: str) -> bool:
    try:
        with open("/proc/mounts") as fh:
            return any(line.split()[1] == path and line.split()[2] == "tmpfs" for line in fh)
    except OSError:
        return False


def code_fingerprint() -> str:
    """HEAD plus a hash of every .py file under broker/ and sessions/ as they are on disk now.

    Several engineers share this working tree: a broker started later in a run may run different code.
    """
    h = hashlib.sha256()
    for d in ("broker", "sessions"):
        for p in sorted((REPO / d).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode() + b"\0")
            try:
                h.update(p.read_bytes())
            except OSError:
                pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, timeout=30,
                              check=False).stdout.decode().strip()
    except (OSError, subprocess.TimeoutExpired):
        head = "?"
    return f"{head or '?'}+{h.hexdigest()[:10]}"


def broker_launcher() -> tuple[list[str], str]:
    """argv prefix that runs the broker, and a label: ``medbroker serve`` if the CLI has it, else bench/serve.py."""
    if importlib.util.find_spec("broker.cli") is not None:
        cli = [sys.executable, "-c", "import sys; from broker.cli import main; sys.argv[0] = 'medbroker'; main()"]
        try:
            probe = subprocess.run(cli + ["serve", "--help"], capture_output=True, timeout=60, cwd=REPO, check=False)
            if probe.returncode == 0 and b"--listen" in probe.stdout:
                return cli, "medbroker serve"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return [sys.executable, str(BENCH / "serve.py")], "bench/serve.py (broker.serve.run_server)"


@dataclass
class BrokerProc:
    """One broker process serving one bench home."""

    name: str
    home: Path
    port: int
    recordings: Path
    launcher: list[str]
    workers: int = 1
    """listen.workers: > 1 means this process is a supervisor and the workers are its children."""
    user: str = "alice@ct-01"
    """The login the clients use (medbroker's routing syntax: vendor@device)."""
    proc: subprocess.Popen | None = None
    banner: str = ""
    log: Path = field(init=False)
    code_versions: list = field(default_factory=list)
    """(time, fingerprint) at every start: the product code each process ran."""

    def __post_init__(self) -> None:
        self.log = self.home.parent / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, extra: list[str] | None = None, env: dict | None = None) -> None:
        """Start and wait for the SSH banner.

        :raises BenchSetupError: it exits or does not answer
        """
        argv = self.argv()
        self.code_versions.append((time.strftime("%H:%M:%S"), code_fingerprint()))
        log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv + (extra or []), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=REPO, start_new_session=True, env=env,
                                         preexec_fn=_raise_nofile)
        self.banner = _wait_banner(self.port, self.proc, self.log, f"broker {self.name}")
        if self.workers > 1:  # the first worker answers the banner; measure only once every worker accepts
            _wait_log(self.log, log_start, b"medbroker listening on", self.proc, f"broker {self.name}")

    def argv(self) -> list[str]:
        if self.launcher[-1].endswith("serve.py"):
            return self.launcher + ["--home", str(self.home), "--listen", f"127.0.0.1:{self.port}"]
        return self.launcher + ["--home", str(self.home), "serve", "--listen", f"127.0.0.1:{self.port}"]

    def stop(self) -> None:
        """SIGTERM (the broker ends sessions and flushes recordings), then SIGKILL after 30 s."""
        _stop(self.proc, timeout=30)
        self.proc = None

    def restart(self, extra: list[str] | None = None, env: dict | None = None) -> None:
        self.stop()
        self.start(extra, env)

    recording_glob = "*.mbr"

    def clear_recordings(self, older_than_s: float = 3.0) -> None:
        """Delete finished recordings (not touched for a while) so tmpfs and disk do not fill up."""
        now = time.time()
        for p in self.recordings.glob(self.recording_glob):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
            except OSError:
                pass


class BareRelayProc(BrokerProc):
    """The bare asyncssh relay (bench/bare_relay.py) in its own process; ``launcher`` is its whole argv but
    ``--listen``. Its recordings (raw, one file per channel) go to disk next to medbroker's."""

    recording_glob = "*.raw"

    def argv(self) -> list[str]:
        return self.launcher + ["--listen", f"127.0.0.1:{self.port}"]


def _wait_log(log: Path, offset: int, needle: bytes, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    """Wait until ``needle`` appears in ``log`` after ``offset`` (the log is appended to across restarts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchSetupError(f"{what} exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        with open(log, "rb") as fh:
            fh.seek(offset)
            if needle in fh.read():
                return
        time.sleep(0.1)
    raise BenchSetupError(f"{what} did not report {needle.decode()!r} within {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_DAEMONS = ("gantryd", "tubectl", "recon", "detector", "coolant", "dosemon", "netcfg", "updater", "couch", "hvgen")
_EVENTS = ("rotation {a}.{b:02d} s/rev, slip ring ok", "tube {a} kV {b} mA, anode {c} C", "frame {d:08d} crc {e:08x} ok",
           "detector temp {a}.{b} C, fan {c} rpm", "dose index {a}.{b:02d} mGy, limit {c} mGy",
           "link eth0 up {c} Mb/s, rx {d} tx {e}", "queue depth {a}, job {d:08d} done in {b} ms",
           "warning: coolant flow {a}.{b} l/min below {c}", "self-test step {a}/{c} passed ({b} ms)",
           "error E-{c:04d} cleared by service key")


def device_log(size: int, block: int = 8 << 20):
    """``size`` bytes of a synthetic device service log (timestamped daemon lines, numbers, short hex), yielded in
    blocks; 8 MiB of distinct lines, repeated with the date changed so generation stays fast (seeded: the same
    bytes in every run).

    Exec downloads use it, not random bytes: medbroker's output scanner ends a session after 64 KiB of output
    it cannot inspect (``[policy] max_opaque_output``), which is what `cat` of a firmware image through a shell
    should get. Log files are what vendors read through exec; they pass the scanner's full inspection (no
    findings, no opaque bytes), so the bench measures the product with every guard on, at its defaults.
    """
    rng, lines, n, t = random.Random(16), [], 0, 0.0
    while n < min(size, block):
        t += rng.random() * 0.02
        ev = rng.choice(_EVENTS).format(a=rng.randrange(100), b=rng.randrange(100), c=rng.randrange(10000),
                                        d=rng.randrange(10**8), e=rng.getrandbits(32))
        line = (f"2026-12-07T{int(t // 3600) % 24:02d}:{int(t // 60) % 60:02d}:{t % 60:09.6f}Z ct-01 "
                f"{rng.choice(_DAEMONS)}[{rng.randrange(100, 9999)}]: {ev}\n")
        lines.append(line)
        n += len(line)
    body = "".join(lines).encode()[:block]
    for i, off in enumerate(range(0, size, block)):
        yield body.replace(b"2026-12-07T", f"2026-{1 + i // 28 % 12:02d}-{1 + i % 28:02d}T".encode())[:size - off]


class BenchWorld:
    """Build with ``start()``; tear down with ``close()`` (idempotent)."""

    def __init__(self, *, blob_mib: int, log=print, keep: bool = False, multi_worker: bool = False) -> None:
        """:param multi_worker: also start the "medbroker-2w" broker (two worker processes)"""
        self.blob_size = blob_mib << 20
        self.multi_worker = multi_worker
        self.log = log
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="medbroker-bench-"))
        self.is_root = os.geteuid() == 0
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[Path] = []
        self.brokers: dict[str, BrokerProc] = {}
        self.notes: list[str] = []
        self.data: Path | None = None
        self.rec_tmpfs_reason = ""
        self._closed = False

    # ------------------------------------------------------------------ setup
    def start(self) -> "BenchWorld":
        os.chmod(self.root, 0o755)  # the device account reads authorized_keys below it
        self.account = self._device_account()
        self._data_dir()
        self._keys()
        self.device_port, self.jump_port = _free_port(), _free_port()
        self.device_sshd = self._sshd("device", self.device_port, forwarding=False)
        self.jump_sshd = self._sshd("jump", self.jump_port, forwarding=True)
        self._brokers()
        self._ssh_config()
        self._blob()
        return self

    def _device_account(self) -> str:
        if not self.is_root:
            name = pwd.getpwuid(os.geteuid()).pw_name
            self.notes.append(f"not root: the device account is the current user {name!r} (its shell rc files run)")
            return name
        try:
            pwd.getpwnam(DEVICE_ACCOUNT)
        except KeyError:
            proc = _run(["useradd", "--system", "--create-home", "--home-dir", DEVICE_ACCOUNT_HOME,
                         "--shell", "/bin/sh", DEVICE_ACCOUNT])
            if proc.returncode != 0 and b"already exists" not in proc.stderr:
                raise BenchSetupError(f"useradd {DEVICE_ACCOUNT} failed: {proc.stderr.decode(errors='replace')}")
            self.log(f"created system account {DEVICE_ACCOUNT} (home {DEVICE_ACCOUNT_HOME}, shell /bin/sh)")
        # useradd leaves the password "!" (locked); sshd without PAM refuses locked accounts even for keys.
        # "*" means "no password can match" without being "locked".
        shadow = _run(["getent", "shadow", DEVICE_ACCOUNT]).stdout.decode()
        if shadow.split(":")[1:2] != ["*"]:
            proc = _run(["usermod", "-p", "*", DEVICE_ACCOUNT])
            if proc.returncode != 0:
                raise BenchSetupError(f"usermod -p '*' {DEVICE_ACCOUNT} failed: {proc.stderr.decode(errors='replace')}")
        return DEVICE_ACCOUNT

    def _data_dir(self) -> None:
        """Device-side files on tmpfs (no disk noise in the transfers), owned by the device account."""
        base = "/dev/shm" if _is_tmpfs("/dev/shm") else None
        self.data = Path(tempfile.mkdtemp(prefix="medbroker-bench-data-", dir=base))
        if base is None:
            self.notes.append(f"/dev/shm is not tmpfs: device files on {self.data.parent} (disk)")
        os.chmod(self.data, 0o755)
        if self.is_root:
            pw = pwd.getpwnam(self.account)
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
        self.local = Path(tempfile.mkdtemp(prefix="medbroker-bench-client-", dir=base))

    def _keys(self) -> None:
        k = self.root / "keys"
        k.mkdir()
        self.client_key = k / "client"
        self.client_pub = _keygen(self.client_key, "bench client (vendor alice, direct, jump)")
        self.broker_key = k / "broker_device"
        broker_pub = _keygen(self.broker_key, "medbroker -> device")
        self.device_host_pub = _keygen(k / "device_host", "bench device host key")
        self.jump_host_pub = _keygen(k / "jump_host", "bench jump host key")
        auth = self.root / "authorized_keys"
        auth.write_text(f"{self.client_pub}\n{broker_pub}\n")
        os.chmod(auth, 0o644)

    def _sshd(self, name: str, port: int, *, forwarding: bool) -> subprocess.Popen:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        sftp = next((p for p in SFTP_SERVERS if os.path.exists(p)), "internal-sftp")
        cfg = self.root / f"{name}_sshd_config"
        cfg.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {self.root / 'keys' / (name + '_host')}",
            f"PidFile {self.root / (name + '_sshd.pid')}", f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", f"Subsystem sftp {sftp}", "PrintMotd no", "PrintLastLog no",
            "LogLevel ERROR", "UseDNS no", "MaxStartups 2000", "MaxSessions 20", "ClientAliveInterval 0",
            "X11Forwarding no", "AcceptEnv LANG LC_*",
            f"AllowTcpForwarding {'yes' if forwarding else 'no'}", f"AllowUsers {self.account}", "",
        ]))
        if self.is_root:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = self.root / f"{name}_sshd.log"
        proc = subprocess.Popen([sshd, "-D", "-E", str(log), "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_raise_nofile)
        self.procs.append(proc)
        _wait_banner(port, proc, log, f"{name} sshd")
        return proc

    def _brokers(self) -> None:
        from broker.app import init_home
        from broker.devices import add_device
        from broker.grants import approve_request, request_grant
        from broker.identity import add_user, add_user_key, get_principal

        launcher, self.launcher_label = broker_launcher()
        template = (BENCH / "broker.toml").read_text()
        rec_tmpfs = self._recordings_tmpfs()
        names = [("medbroker", None), ("medbroker-tmpfs", rec_tmpfs)]
        if self.multi_worker:
            names += [(name, None) for name in MULTI_WORKER]
        for name, rec in names:
            if name == "medbroker-tmpfs" and rec is None:
                continue
            home = self.root / name / "home"
            home.mkdir(parents=True)
            text = template
            if rec is not None:
                text, n = re.subn(r'(?m)^dir = "recordings"', f'dir = "{rec}"', text)
                assert n == 1, "bench/broker.toml must contain the line: dir = \"recordings\""
            workers = MULTI_WORKER.get(name, 1)
            if workers > 1:
                text, n = re.subn(r"(?m)^\[listen\]\n", f"[listen]\nworkers = {workers}\n", text)
                assert n == 1, "bench/broker.toml must contain a [listen] section"
            (home / "broker.toml").write_text(text)
            app = init_home(home)
            try:
                now = app.clock.now()
                add_user(app.store, "alice", "vendor", "Bench Imaging", now)
                add_user_key(app.store, "alice", self.client_pub, now)
                add_user(app.store, "bob", "approver", "Biomedical Engineering", now)
                add_device(app.store, app.audit, app.keys, name="ct-01", host="127.0.0.1", port=self.device_port,
                           login=self.account, host_key=self.device_host_pub, now=now,
                           key_text=self.broker_key.read_text(), protect=("/srv/bench-protected",),
                           description="bench device (local sshd)", actor="bench")
                req = request_grant(app.store, app.audit, app.rules, get_principal(app.store, "alice"), "ct-01",
                                    8 * 3600, "benchmark", now)
                approve_request(app.store, app.audit, app.rules, req.id, get_principal(app.store, "bob"), now)
                recordings = app.config.recordings_dir
                host_pub = (home / "keys" / "host_ed25519.pub").read_text().strip()
            finally:
                app.close()
            b = BrokerProc(name, home, _free_port(), recordings, launcher, workers)
            b.host_pub = host_pub  # type: ignore[attr-defined]
            self.brokers[name] = b
            b.start()
        self._bare_relay()

    def _bare_relay(self) -> None:
        """The bare asyncssh relay: logs in to the device with the broker's device key, recordings on disk."""
        home = self.root / "bare" / "home"
        recordings = home / "recordings"
        recordings.mkdir(parents=True)
        host_pub = _keygen(home / "host_ed25519", "bare relay host key")
        (home / "authorized_keys").write_text(self.client_pub + "\n")
        (home / "device_host.pub").write_text(self.device_host_pub + "\n")
        argv = [sys.executable, "-m", "bench.bare_relay", "--host-key", str(home / "host_ed25519"),
                "--authorized-keys", str(home / "authorized_keys"), "--device", f"127.0.0.1:{self.device_port}",
                "--device-user", self.account, "--device-key", str(self.broker_key),
                "--device-host-key", str(home / "device_host.pub"), "--recordings", str(recordings)]
        b = BareRelayProc("bare", home, _free_port(), recordings, argv, user=self.account)
        b.host_pub = host_pub  # type: ignore[attr-defined]
        self.brokers["bare"] = b
        b.start()

    def _recordings_tmpfs(self) -> Path | None:
        """A tmpfs for the second broker's recordings: our own mount as root, else /dev/shm, else none."""
        target = self.root / "recordings-tmpfs"
        target.mkdir()
        if self.is_root:
            proc = _run(["mount", "-t", "tmpfs", "-o", "size=12g,mode=0700", "tmpfs", str(target)])
            if proc.returncode == 0:
                self.mounts.append(target)
                self.rec_tmpfs_reason = f"tmpfs mounted at {target}"
                return target
            why = proc.stderr.decode(errors="replace").strip()
        else:
            why = "not root, cannot mount"
        if _is_tmpfs("/dev/shm"):
            rec = Path(tempfile.mkdtemp(prefix="medbroker-bench-rec-", dir="/dev/shm"))
            self.rec_tmpfs_reason = f"{why}; using /dev/shm ({rec})"
            return rec
        self.rec_tmpfs_reason = f"skipped: {why}, and /dev/shm is not tmpfs"
        return None

    def _ssh_config(self) -> None:
        kh = self.root / "known_hosts"
        lines = [f"[127.0.0.1]:{self.device_port} {' '.join(self.device_host_pub.split()[:2])}",
                 f"[127.0.0.1]:{self.jump_port} {' '.join(self.jump_host_pub.split()[:2])}"]
        for b in self.brokers.values():
            lines.append(f"[127.0.0.1]:{b.port} {' '.join(b.host_pub.split()[:2])}")  # type: ignore[attr-defined]
        kh.write_text("\n".join(lines) + "\n")
        self.known_hosts = kh
        host = lambda alias, port, user, *extra: "\n  ".join(  # noqa: E731
            [f"Host {alias}", "HostName 127.0.0.1", f"Port {port}", f"User {user}", *extra]) + "\n"
        parts = [
            host("direct", self.device_port, self.account),
            host("jump", self.jump_port, self.account),
            host("jump-gcm", self.jump_port, self.account, f"Ciphers {GCM}"),
            host("proxyjump", self.device_port, self.account, "ProxyJump jump"),
            # Both hops AES-GCM: the strongest OpenSSH configuration, the bulk target's reference.
            host("proxyjump-gcm", self.device_port, self.account, "ProxyJump jump-gcm", f"Ciphers {GCM}"),
        ]
        for b in self.brokers.values():
            parts.append(host(b.name, b.port, b.user))
        parts.append("\n  ".join([
            "Host *", f"IdentityFile {self.client_key}", "IdentitiesOnly yes", "IdentityAgent none",
            f"UserKnownHostsFile {kh}", "GlobalKnownHostsFile /dev/null", "StrictHostKeyChecking yes",
            "BatchMode yes", "ConnectTimeout 20", "LogLevel ERROR", "Compression no", "ControlMaster no",
            "ControlPath none", "ForwardAgent no", "ForwardX11 no", "UpdateHostKeys no", "RequestTTY auto",
            "ServerAliveInterval 0",
        ]) + "\n")
        self.ssh_config = self.root / "ssh_config"
        self.ssh_config.write_text("\n".join(parts))
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY", "SSH_ASKPASS")}
        self.client_env = env

    def _blob(self) -> None:
        """The payloads on the device's tmpfs, with their sha256: ``blob`` (random bytes, like a firmware image:
        exec uploads, SFTP and scp both ways) and ``log`` (a device log: exec downloads). See :func:`device_log`."""
        assert self.data is not None
        self.log_blob = self.data / "device.log"
        h = hashlib.sha256()
        with open(self.log_blob, "wb") as fh:
            for block in device_log(self.blob_size):
                h.update(block)
                fh.write(block)
        os.chmod(self.log_blob, 0o644)
        self.log_sha = h.hexdigest()
        self.blob = self.data / "blob.bin"
        h = hashlib.sha256()
        chunk = 4 << 20
        with open(self.blob, "wb") as fh:
            left = self.blob_size
            while left > 0:
                part = os.urandom(min(chunk, left))
                h.update(part)
                fh.write(part)
                left -= len(part)
        os.chmod(self.blob, 0o644)
        self.blob_sha = h.hexdigest()
        self.local_blob = self.local / "blob.bin"
        shutil.copyfile(self.blob, self.local_blob)

    def chown_device(self, path: Path) -> None:
        """Hand a file or directory under the data dir to the device account (uploads land there)."""
        if self.is_root:
            pw = pwd.getpwnam(self.account)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for b in self.brokers.values():
            try:
                b.stop()
            except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                self.log(f"stopping broker {b.name}: {exc}")
        for proc in reversed(self.procs):
            _stop(proc)
        for m in self.mounts:
            _run(["umount", str(m)])
        if not self.keep:
            for d in (self.root, self.data, getattr(self, "local", None)):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)
            for b in self.brokers.values():
                if str(b.recordings).startswith("/dev/shm/"):
                    shutil.rmtree(b.recordings, ignore_errors=True)
