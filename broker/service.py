"""Running medbroker as a system service: the hardened systemd unit, sd_notify readiness, backup and restore.

``medbroker service install`` writes the unit (docs/deploy.md); ``serve`` tells systemd when it accepts
connections (``Type=notify``) and when it stops. ``medbroker backup`` copies a live home consistently
(SQLite's online backup API for the database, then the recordings, keys and configuration, each file with
its SHA-256 in ``MANIFEST.json``); ``medbroker restore`` checks every hash, refuses a non-empty target and
verifies the restored audit chain and recordings before it says done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from broker.errors import StorageError, UsageError

__all__ = ["sd_notify", "render_unit", "UnitSpec", "backup_home", "restore_home", "BACKUP_FORMAT"]

BACKUP_FORMAT = "medbroker-backup-1"
_DB_NAME = "medbroker.db"
_SKIP = {_DB_NAME, f"{_DB_NAME}-wal", f"{_DB_NAME}-shm", f"{_DB_NAME}-journal"}


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's notification socket when ``$NOTIFY_SOCKET`` is set.

    The protocol of sd_notify(3): one datagram on an AF_UNIX socket; a leading ``@`` names the abstract
    namespace. Returns False (and does nothing) outside systemd; errors are swallowed (never fatal).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class UnitSpec:
    """What the unit file says: who runs which medbroker for which home, on which port."""

    home: Path
    executable: str
    user: str = "medbroker"
    listen: str | None = None
    low_port: bool = False


def render_unit(spec: UnitSpec) -> str:
    """The systemd unit text: Type=notify, own user, the home the only writable path, restart on failure."""
    home = str(spec.home)
    if any(c in home for c in "\n\"'\\ ") or not spec.home.is_absolute():
        raise UsageError(f"the broker home {home!r} cannot go into a unit file",
                         "use an absolute path without spaces or quotes, e.g. /var/lib/medbroker")
    argv = [spec.executable, "--home", home, "serve"]
    if spec.listen:
        argv += ["--listen", spec.listen]
    under_home = any(home == p or home.startswith(p + "/") for p in ("/home", "/root", "/run/user"))
    caps = "CAP_NET_BIND_SERVICE" if spec.low_port else ""
    return f"""# medbroker for the home {home}; written by `medbroker service install` (docs/deploy.md)
[Unit]
Description=medbroker remote-maintenance access broker ({home})
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
User={spec.user}
Group={spec.user}
ExecStart={shlex.join(argv)}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2s
TimeoutStartSec=60s
TimeoutStopSec=45s
KillMode=mixed
UMask=0077
LimitNOFILE=65536
StandardOutput=journal
StandardError=journal
SyslogIdentifier=medbroker

# Hardening: the home is the only writable path; no privilege gain, no devices, no kernel knobs.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={home}
ProtectHome={'read-only' if under_home else 'yes'}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
CapabilityBoundingSet={caps}
AmbientCapabilities={caps}

[Install]
WantedBy=multi-user.target
"""


# ---------------------------------------------------------------------- backup and restore
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def backup_home(home: Path, out: Path, recordings_dir: Path | None = None) -> dict:
    """Copy a (possibly running) broker home to ``out``, which must not exist or be empty.

    The database goes through SQLite's online backup API (a consistent snapshot while the broker writes);
    recordings still being written are copied as they are (a readable prefix: restore seals them like a
    crashed broker's). Returns the manifest.

    :raises StorageError: ``out`` is not empty, or a copy fails
    """
    home, out = Path(home), Path(out)
    recordings_dir = Path(recordings_dir or home / "recordings")
    if recordings_dir.resolve() != (home / "recordings").resolve():
        raise StorageError(f"the recordings are kept outside the home ({recordings_dir}); this backup copies "
                           "the home only", "back that directory up with the storage's own tools, or keep "
                           "recordings in HOME/recordings")
    if not (home / _DB_NAME).is_file():
        raise StorageError(f"{home} is not a broker home (no {_DB_NAME})", "name the home with --home DIR")
    if out.exists() and any(out.iterdir()):
        raise StorageError(f"{out} is not empty; a backup never overwrites files", "choose a new directory")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        src = sqlite3.connect(f"file:{home / _DB_NAME}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(out / _DB_NAME)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        os.chmod(out / _DB_NAME, 0o600)
        for path in sorted(home.rglob("*")):
            rel = path.relative_to(home)
            if rel.parts[0] in _SKIP or path.name.startswith(".probe-") or path.name.startswith(".readyz-"):
                continue
            target = out / rel
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True, mode=0o700)
            elif path.is_file():
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                shutil.copy2(path, target)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"backup to {out} failed: {exc}", "check the space and permissions there") from None
    files = {str(p.relative_to(out)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {"format": BACKUP_FORMAT, "source_home": str(home), "source_recordings": str(recordings_dir),
                "files": files}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.chmod(out / "MANIFEST.json", 0o600)
    return manifest


def restore_home(backup: Path, new_home: Path) -> dict:
    """Copy a backup into ``new_home`` after checking every file against ``MANIFEST.json``.

    :raises StorageError: no manifest, a file missing, changed or extra, or ``new_home`` not empty
    """
    backup, new_home = Path(backup), Path(new_home)
    try:
        manifest = json.loads((backup / "MANIFEST.json").read_text())
    except (OSError, ValueError) as exc:
        raise StorageError(f"{backup} is not a medbroker backup ({exc})", "name the directory `medbroker backup` wrote") from None
    if manifest.get("format") != BACKUP_FORMAT or not isinstance(manifest.get("files"), dict):
        raise StorageError(f"{backup}/MANIFEST.json is not a {BACKUP_FORMAT} manifest")
    problems = []
    present = {str(p.relative_to(backup)) for p in backup.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    for rel, meta in manifest["files"].items():
        path = backup / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif _sha256(path) != meta.get("sha256"):
            problems.append(f"{rel}: content differs from the manifest")
    problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(manifest["files"]))]
    if problems:
        raise StorageError(f"the backup in {backup} is damaged: " + "; ".join(problems[:10]),
                           "nothing was restored; use another backup")
    if new_home.exists() and any(new_home.iterdir()):
        raise StorageError(f"{new_home} is not empty; restore never overwrites a home", "choose a new directory")
    new_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    for rel in manifest["files"]:
        target = new_home / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copy2(backup / rel, target)
    return manifest
