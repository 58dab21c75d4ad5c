"""``medbroker demo``: a throwaway home, a real local sshd playing CT scanner "ct-01", sample people.

Everything is real: the broker is the product, the device is OpenSSH's sshd on loopback, and the
commands printed are the ones a vendor, an approver and a security officer would type.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from broker.app import App, init_home
from broker.devices import add_device
from broker.errors import BrokerError
from broker.identity import add_user, add_user_key

__all__ = ["DEMO_ACCOUNT", "DemoWorld", "build_demo", "ensure_demo_account", "run_demo", "find_sshd"]

_SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")
# Run as root, the demo device is logged in to with a dedicated maintenance account, as on a real
# device: never root (whose shell rc files may do anything, e.g. pyenv waiting on a stale lock).
DEMO_ACCOUNT = "medbroker-demo"
DEMO_ACCOUNT_HOME = Path("/var/lib/medbroker-demo")
_ACCOUNT_TOOLS = ("useradd", "usermod", "getent")


def find_sshd() -> str | None:
    """Path of OpenSSH's sshd, or None."""
    for cand in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)


def _admin(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL)


def ensure_demo_account() -> pwd.struct_passwd:
    """As root: create (once) the system account ``medbroker-demo``, shell /bin/sh, home /var/lib/medbroker-demo.

    Idempotent: an existing account is kept (its password field is set to ``*`` if it is locked,
    because sshd without PAM refuses locked accounts even for public keys).
    Returns its passwd entry.

    :raises BrokerError: not root, the shadow tools are missing, or useradd/usermod fail
    """
    if os.geteuid() != 0:
        raise BrokerError("only root can create the demo device account", "run medbroker demo as root, or as "
                          "yourself: the demo device then logs in as you")
    missing = [tool for tool in _ACCOUNT_TOOLS if not shutil.which(tool)]
    if missing:
        raise BrokerError(f"cannot create the demo device account {DEMO_ACCOUNT}: {', '.join(missing)} missing",
                          "install the passwd package (useradd, usermod), or run the demo as a normal user")
    try:
        pwd.getpwnam(DEMO_ACCOUNT)
    except KeyError:
        proc = _admin(["useradd", "--system", "--create-home", "--home-dir", str(DEMO_ACCOUNT_HOME),
                       "--shell", "/bin/sh", "-p", "*", "-c", "medbroker demo device maintenance", DEMO_ACCOUNT])
        if proc.returncode != 0 and b"already exists" not in proc.stderr:  # a parallel demo made it
            raise BrokerError(f"useradd {DEMO_ACCOUNT} failed: {proc.stderr.decode(errors='replace').strip()}",
                              "create the account by hand (shell /bin/sh), then run medbroker demo again")
    shadow = _admin(["getent", "shadow", DEMO_ACCOUNT]).stdout.decode(errors="replace").split(":")
    if len(shadow) > 1 and shadow[1].startswith("!"):
        proc = _admin(["usermod", "-p", "*", DEMO_ACCOUNT])
        if proc.returncode != 0:
            raise BrokerError(f"usermod -p '*' {DEMO_ACCOUNT} failed: {proc.stderr.decode(errors='replace').strip()}",
                              f"unlock the account by hand: usermod -p '*' {DEMO_ACCOUNT}")
    entry = pwd.getpwnam(DEMO_ACCOUNT)
    DEMO_ACCOUNT_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd chdirs there
    os.chown(DEMO_ACCOUNT_HOME, entry.pw_uid, entry.pw_gid)
    return entry


def _share_with(root: Path, tree_root: Path, device_dir: Path, entry: pwd.struct_passwd) -> None:
    """Let the device account reach what it needs: the tree (read), firmware/ and tmp/ (write), authorized_keys.

    The demo root comes from mkdtemp (0700); people/ (private keys) and home/ (the broker's) stay closed.
    """
    root.chmod(0o755)
    device_dir.chmod(0o755)
    (device_dir / "authorized_keys").chmod(0o644)
    for path in [tree_root, *tree_root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)
    for writable in (tree_root / "service" / "firmware", tree_root / "tmp"):
        for path in [writable, *writable.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _check_reachable(root: Path) -> None:
    """Refuse a demo root the device account could not reach, before anything is created.

    :raises BrokerError: an existing directory above ``root`` is closed to other users (``--dir`` under /root)
    """
    for parent in root.absolute().parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            raise BrokerError(f"the demo device account {DEMO_ACCOUNT} could not reach {root}: {parent} is closed "
                              f"to other users", f"leave --dir out (a new directory under /tmp is used), choose "
                              f"a --dir under /tmp, or: chmod o+x {parent}")


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise BrokerError("no free port on 127.0.0.1")


def _fake_dicom(patient: str) -> bytes:
    """A tiny synthetic DICOM Part 10 file (no real patient data)."""
    def elem(group: int, element: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b" "
        return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value
    meta = elem(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")
    body = elem(0x0008, 0x0018, b"UI", b"1.2.3.4.5.6.7") + elem(0x0010, 0x0010, b"PN", patient.encode())
    return b"\0" * 128 + b"DICM" + meta + body


def _make_device_tree(root: Path) -> dict[str, Path]:
    dicom = root / "data" / "dicom" / "2026" / "11"
    hl7 = root / "var" / "spool" / "hl7"
    logs = root / "service" / "logs"
    fw = root / "service" / "firmware"
    for d in (dicom, hl7, logs, fw, root / "tmp"):
        d.mkdir(parents=True, exist_ok=True)
    (dicom / "IM000001").write_bytes(_fake_dicom("DEMO^PATIENT^ONE"))
    (dicom / "study-0002.dcm").write_bytes(_fake_dicom("DEMO^PATIENT^TWO"))
    (hl7 / "adt-0001.hl7").write_bytes(b"MSH|^~\\&|RIS|HOSP|CT|HOSP|202611281200||ADT^A01|1|P|2.5\r"
                                       b"PID|1||12345||DEMO^PATIENT\r")
    (logs / "system.log").write_text("".join(f"2026-11-28T0{i}:00:00Z tube temperature {40 + i} C ok\n"
                                             for i in range(8)))
    (logs / "errors.log").write_text("2026-11-28T03:12:09Z E1042 gantry rotation sensor timeout\n")
    (fw / "README").write_text("Upload firmware images here.\n")
    link = root / "service" / "logs" / "old-studies"  # a symlink into protected data: the guard resolves it
    if not link.is_symlink():
        link.symlink_to(root / "data" / "dicom")
    return {"dicom": root / "data" / "dicom", "hl7": hl7, "logs": logs, "firmware": fw}


@dataclass
class DemoWorld:
    """What ``build_demo`` made, for the printout and for tests."""

    root: Path
    home: Path
    app: App
    sshd: subprocess.Popen
    device_port: int
    broker_port: int
    ssh_config: Path
    tree: dict[str, Path]
    device_login: str = ""

    def stop(self) -> None:
        if self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait(timeout=5)
        self.app.close()


def build_demo(root: Path, *, broker_port: int = 2222) -> DemoWorld:
    """Create the demo world under ``root`` and start the device sshd (not the broker).

    Run as root, the device is logged in to as the system account ``medbroker-demo`` (created once),
    otherwise as the current user.

    :raises BrokerError: sshd or ssh-keygen missing, sshd does not start, or (root) the demo account
        cannot be made or could not reach ``root``
    """
    sshd_bin = find_sshd()
    if not sshd_bin or not shutil.which("ssh-keygen"):
        raise BrokerError("OpenSSH is not installed", "run: bash scripts/install.sh (installs openssh-server)")
    if os.geteuid() == 0:
        _check_reachable(root)
    root.mkdir(parents=True, exist_ok=True)
    people, dev = root / "people", root / "device"
    people.mkdir(exist_ok=True)
    dev.mkdir(exist_ok=True)
    for name in ("alice", "bob", "carol"):
        if not (people / name).exists():
            _keygen(people / name, f"{name}@demo")
    if not (dev / "ssh_host_ed25519_key").exists():
        _keygen(dev / "ssh_host_ed25519_key", "ct-01 host key")
        _keygen(dev / "broker_login_key", "medbroker -> ct-01")
    (dev / "authorized_keys").write_text((dev / "broker_login_key.pub").read_text())
    tree = _make_device_tree(root / "ct-01-fs")
    if os.geteuid() == 0:
        account = ensure_demo_account()
        _share_with(root, root / "ct-01-fs", dev, account)
        for patient_dir in (tree["dicom"], tree["hl7"]):  # contained: the login cannot read patient data
            patient_dir.chmod(0o700)                       # (root-owned; docs/data-protection.md "Containment")
        login = account.pw_name
    else:
        login = pwd.getpwuid(os.geteuid()).pw_name
    device_port = _free_port(22022)
    sftp = next((p for p in _SFTP_SERVERS if os.path.exists(p)), "internal-sftp")
    (dev / "sshd_config").write_text(
        f"Port {device_port}\nListenAddress 127.0.0.1\nHostKey {dev / 'ssh_host_ed25519_key'}\n"
        f"PidFile {dev / 'sshd.pid'}\nAuthorizedKeysFile {dev / 'authorized_keys'}\nAllowUsers {login}\n"
        f"StrictModes no\nUsePAM no\nPermitRootLogin no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nSubsystem sftp {sftp}\nPrintMotd no\nLogLevel VERBOSE\n"
        f"Banner none\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(dev / "sshd.log", "ab")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(dev / "sshd_config")], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"the demo device's sshd exited: {(dev / 'sshd.log').read_text()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", device_port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise BrokerError("the demo device's sshd did not start within 10 s")
    home = root / "home"
    app = init_home(home)
    now = app.clock.now()
    if not app.store.get_device("ct-01"):
        add_user(app.store, "alice", "vendor", "Acme Imaging Service", now)
        add_user_key(app.store, "alice", (people / "alice.pub").read_text(), now)
        add_user(app.store, "bob", "approver", "Biomedical Engineering", now)
        add_user_key(app.store, "bob", (people / "bob.pub").read_text(), now)
        add_user(app.store, "carol", "security", "Information Security", now)
        add_user_key(app.store, "carol", (people / "carol.pub").read_text(), now)
        add_device(app.store, app.audit, app.keys, name="ct-01", host="127.0.0.1", port=device_port, login=login,
                   host_key=(dev / "ssh_host_ed25519_key.pub").read_text(), now=now,
                   key_text=(dev / "broker_login_key").read_text(),
                   protect=(str(tree["dicom"]), str(tree["hl7"])), description="Demo CT scanner (local sshd)",
                   actor="demo",
                   # Not root, the demo device's login is you and reads its patient data (exposed): let the
                   # sandbox walkthrough open a shell with one approver anyway.
                   exposed_shell=None if os.geteuid() == 0 else "allow")
    else:
        app.store.update_device("ct-01", port=device_port, login=login)
    broker_port = _free_port(broker_port)
    host_pub = (home / "keys" / "host_ed25519.pub").read_text().split()[:2]
    (root / "known_hosts").write_text(f"[127.0.0.1]:{broker_port} {' '.join(host_pub)}\n")
    ssh_config = root / "ssh_config"
    lines = [f"Host broker\n  HostName 127.0.0.1\n  Port {broker_port}\n  UserKnownHostsFile {root / 'known_hosts'}\n"
             f"  StrictHostKeyChecking yes\n  IdentitiesOnly yes\n  LogLevel ERROR\n"]
    for name in ("alice", "bob", "carol"):
        lines.append(f"Match originalhost broker user {name},{name}@*\n  IdentityFile {people / name}\n")
    ssh_config.write_text("".join(lines))
    return DemoWorld(root, home, app, proc, device_port, broker_port, ssh_config, tree, login)


def medbroker_command() -> str:
    """How a person runs this medbroker from a shell, as printed in hints.

    ``medbroker`` when the PATH finds this installation's own launcher; otherwise that launcher's absolute
    path (a venv's bin, or a pyenv without a rehash, is not on the PATH); ``python -m broker.cli`` when
    there is no launcher (a checkout run with ``python -m``).
    """
    launcher = Path(sys.executable).parent / "medbroker"
    if launcher.is_file() and os.access(launcher, os.X_OK):
        found = shutil.which("medbroker")
        if found and Path(found).resolve() == launcher.resolve():
            return "medbroker"
        return shlex.quote(str(launcher))
    return f"{shlex.quote(sys.executable)} -m broker.cli"


def instructions(world: DemoWorld) -> str:
    """The copy-paste walkthrough printed by ``medbroker demo``."""
    F = f"ssh -F {world.ssh_config}"
    home = world.home
    mb = medbroker_command()
    return f"""
medbroker demo is running.
  broker (vendor SSH port): 127.0.0.1:{world.broker_port}
  device ct-01 (real OpenSSH sshd, maintenance login {world.device_login}): 127.0.0.1:{world.device_port}
    patient data under {world.tree['dicom']}
  people: alice (vendor, Acme Imaging), bob (approver), carol (security); keys in {world.root / 'people'}
  broker home: {home}

1. Vendor alice tries to connect. Refused: no approval yet.
     {F} alice@ct-01@broker
2. Alice asks for access over SSH (ssh sends the command as one line: quote it whole):
     {F} alice@broker "request ct-01 --for 30m --reason 'tube temperature check'"
3. Approver bob approves (use the id printed in step 2):
     {F} bob@broker approve 1
4. Alice connects and works (the device login is never shown to her):
     {F} alice@ct-01@broker
     {F} alice@ct-01@broker tail -n 3 {world.tree['logs']}/system.log
5. Security reviews (in another terminal):
     {mb} --home {home} sessions list
     {mb} --home {home} replay SESSION_ID --instant
     {mb} --home {home} audit verify
     {mb} --home {home} audit log

Press Ctrl-C to stop the demo (the broker and the device sshd stop; files stay in {world.root}).
"""


def run_demo(root: Path | None = None, *, broker_port: int = 2222, echo=print, duration_s: float | None = None) -> None:
    """Build the demo world, start the broker, print the walkthrough, serve until Ctrl-C.

    :param duration_s: stop by itself after this many seconds (tests)
    """
    from broker.serve import run_server

    root = root or Path(tempfile.mkdtemp(prefix="medbroker-demo-"))
    world = build_demo(root, broker_port=broker_port)
    try:
        def ready(port: int) -> None:
            echo(instructions(world))
            if duration_s is not None:
                import signal
                import threading

                threading.Timer(duration_s, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()

        run_server(world.app, f"127.0.0.1:{world.broker_port}", on_ready=ready)
    finally:
        world.stop()
