"""Per-device SSH host keys for ProxyJump: the key the broker presents as device ``NAME`` inside a jump.

``ssh -J alice@broker ct-01`` talks SSH to "ct-01" through the broker, and the broker answers as ct-01 with a
key of its own (broker/jump.py), never the device's real key (the broker holds the device's credential; the
vendor never reaches the device). One ed25519 key per device name, created on first use as
``HOME/keys/jump/NAME_ed25519`` (mode 0600), so a vendor's known_hosts pins each device separately and
``medbroker backup`` copies them with the rest of the home. ``medbroker ssh-config`` prints the lines to pin.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import asyncssh

from broker.app import App
from broker.identity import validate_name
from broker.keys import openssh_fingerprint

__all__ = ["JUMP_KEY_DIR", "device_host_key", "device_key_path", "fingerprint", "known_hosts_line", "public_line"]

JUMP_KEY_DIR = "keys/jump"


def device_key_path(app: App, name: str) -> Path:
    """Where the jump host key of device ``name`` lives (the name is validated: it becomes a file name).

    :raises UsageError: ``name`` is not a valid device name
    """
    return app.config.home / JUMP_KEY_DIR / f"{validate_name(name, what='device name')}_ed25519"


def device_host_key(app: App, name: str) -> asyncssh.SSHKey:
    """The broker's ed25519 host key for device ``name`` inside a jump, created on first use.

    Safe when several worker processes ask at once: a new key is written to a private temporary file and
    linked into place only if no key is there yet, so every process ends up reading the same key.

    :raises UsageError: ``name`` is not a valid device name
    :raises OSError: the key directory cannot be written or the key read
    """
    path = device_key_path(app, name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"medbroker-jump-{name}")
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.export_private_key("openssh"))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # never replaces a key another process made first
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    return asyncssh.read_private_key(str(path))


def public_line(app: App, name: str) -> str:
    """``ssh-ed25519 BASE64`` of device ``name``'s jump host key."""
    algorithm, blob = device_host_key(app, name).export_public_key("openssh").decode().split()[:2]
    return f"{algorithm} {blob}"


def known_hosts_line(app: App, name: str, alias: str | None = None) -> str:
    """The known_hosts line that pins device ``name`` reached through the jump (``ssh -J … NAME``).

    :param alias: the name the vendor's ssh checks instead (``HostKeyAlias``); default the device name,
        which is what ``ssh -J alice@broker:2222 alice@NAME`` looks up
    """
    return f"{alias or name} {public_line(app, name)}"


def fingerprint(app: App, name: str) -> str:
    """``SHA256:…`` of device ``name``'s jump host key."""
    return openssh_fingerprint(device_host_key(app, name).public_data)
