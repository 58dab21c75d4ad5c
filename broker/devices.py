"""Device inventory: address, broker-held credential (sealed), pinned host key, protected paths."""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.audit import AuditLog
from broker.clock import utc_iso
from broker.errors import ConflictError, NotFoundError, UsageError
from broker.identity import parse_public_key, validate_name
from broker.keys import KeyProvider, Secret
from broker.store import Store, dumps

__all__ = ["Device", "DeviceSpec", "load_inventory", "CLASSES", "LEGACY_KEYS", "add_device", "get_device", "list_devices", "remove_device",
           "device_credential", "validate_protected_path", "SHELL_POLICIES", "CONTAINMENT_STATES",
           "set_exposed_shell", "shell_policy"]

CLASSES = ("standard", "critical")
# What an *exposed* device (its login can read a protected path) allows: shell and exec for any grant,
# files only (SFTP/scp), or shell and exec only on grants two distinct approvers approved.
SHELL_POLICIES = ("allow", "files-only", "two-approvers")
CONTAINMENT_STATES = ("contained", "exposed", "unknown")
LEGACY_KEYS = ("kex_algs", "encryption_algs", "mac_algs", "server_host_key_algs")
# Matched with fullmatch and re.ASCII: '$' also matched before a final newline and \d any Unicode digit.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                   r"[A-Za-z0-9])?|\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f:]{2,39}", re.ASCII)
_LOGIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", re.ASCII)


@dataclass(frozen=True)
class Device:
    """A registered device. ``credential`` is sealed; see :func:`device_credential`."""

    name: str
    host: str
    port: int
    login: str
    auth_kind: str
    credential: str
    host_key: str
    host_key_fingerprint: str
    protected_paths: tuple[str, ...]
    device_class: str
    legacy_algorithms: dict
    description: str | None
    created_at: str
    containment: str = "unknown"
    containment_checked_at: str | None = None
    containment_details: dict | None = None
    exposed_shell: str | None = None  # None: the site default ([policy] exposed_shell)

    def as_dict(self) -> dict:
        """Public view: never the credential."""
        return {
            "name": self.name, "host": self.host, "port": self.port, "login": self.login,
            "auth": self.auth_kind, "host_key": self.host_key, "host_key_fingerprint": self.host_key_fingerprint,
            "protected_paths": list(self.protected_paths), "class": self.device_class,
            "legacy_algorithms": self.legacy_algorithms, "description": self.description,
            "created_at": self.created_at, "containment": self.containment,
            "containment_checked_at": self.containment_checked_at,
            "containment_paths": (self.containment_details or {}).get("paths", []),
            "exposed_shell": self.exposed_shell,
        }


@dataclass(frozen=True)
class DeviceSpec:
    """One ``[[device]]`` entry of an inventory file (what ``device add`` needs, key by path)."""

    name: str
    host: str
    port: int
    login: str
    key: str
    host_key: str
    protect: tuple[str, ...]
    device_class: str


_SPEC_KEYS = {"name", "host", "port", "login", "key", "host_key", "protect", "class"}


def load_inventory(path) -> list[DeviceSpec]:
    """Parse and validate a device inventory TOML file (``config/devices.example.toml``).

    :raises UsageError: unknown keys, missing fields, bad names, hosts, ports, host keys, paths or classes
    """
    import tomllib

    try:
        with open(path, encoding="utf-8") as fh:
            raw = tomllib.loads(fh.read())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the inventory: {exc}") from None
    if set(raw) - {"device"} or not isinstance(raw.get("device", []), list):
        raise UsageError(f"{path}: expected only [[device]] tables")
    specs = []
    for i, entry in enumerate(raw.get("device", []), start=1):
        where = f"{path}: device {i}"
        if not isinstance(entry, dict) or set(entry) - _SPEC_KEYS:
            raise UsageError(f"{where}: unknown keys {sorted(set(entry) - _SPEC_KEYS)}", f"known: {sorted(_SPEC_KEYS)}")
        missing = {"name", "host", "login", "key", "host_key"} - set(entry)
        if missing:
            raise UsageError(f"{where}: missing {sorted(missing)}")
        validate_name(entry["name"], what="device name")
        if not _HOST.match(str(entry["host"])):
            raise UsageError(f"{where}: host {entry['host']!r} is not a host name or IP address")
        port = entry.get("port", 22)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise UsageError(f"{where}: port {port!r} is out of range")
        parse_public_key(entry["host_key"])
        cls = entry.get("class", "standard")
        if cls not in CLASSES:
            raise UsageError(f"{where}: class {cls!r} is not known", "use standard or critical")
        specs.append(DeviceSpec(entry["name"], entry["host"], port, entry["login"], entry["key"], entry["host_key"],
                                tuple(validate_protected_path(p) for p in entry.get("protect", [])), cls))
    return specs


def _device(row: dict) -> Device:
    return Device(row["name"], row["host"], row["port"], row["login"], row["auth_kind"], row["credential"],
                  row["host_key"], row["host_key_fingerprint"], tuple(json.loads(row["protected_paths"])),
                  row["device_class"], json.loads(row["legacy_algorithms"]), row["description"], row["created_at"],
                  row.get("containment") or "unknown", row.get("containment_checked_at"),
                  json.loads(row.get("containment_details") or "{}"), row.get("exposed_shell"))


def shell_policy(exposed_shell: str | None, site_default: str) -> str:
    """What an exposed device allows: its own setting, else the site default."""
    return exposed_shell or site_default


def _check_shell_policy(value: str | None) -> None:
    if value is not None and value not in SHELL_POLICIES:
        raise UsageError(f"shell policy {value!r} is not known", f"use one of: {', '.join(SHELL_POLICIES)}")


def set_exposed_shell(store: Store, audit: AuditLog, name: str, value: str | None, *,
                      actor: str | None = None) -> Device:
    """Set what ``name`` allows while it is exposed (None: the site default).

    :raises NotFoundError: unknown device
    :raises UsageError: not one of :data:`SHELL_POLICIES`
    """
    _check_shell_policy(value)
    before = get_device(store, name)
    store.update_device(name, exposed_shell=value)
    audit.record("device.changed", actor=actor, device=name, setting="exposed_shell",
                 before=before.exposed_shell, after=value)
    return get_device(store, name)


def validate_protected_path(path: str) -> str:
    """Normalise an absolute protected path (``/data/dicom/`` → ``/data/dicom``).

    :raises UsageError: relative, empty or with control characters
    """
    if not path or not path.startswith("/") or any(ord(c) < 0x20 for c in path):
        raise UsageError(f"protected path {path!r} must be an absolute path", "e.g. --protect /data/dicom")
    norm = posixpath.normpath(path)
    return "/" if norm in ("/", "//") else norm.replace("//", "/")


def add_device(store: Store, audit: AuditLog, keys: KeyProvider, *, name: str, host: str, port: int, login: str,
               host_key: str, now: datetime, key_text: str | None = None, password: str | None = None,
               protect: tuple[str, ...] = (), device_class: str = "standard",
               legacy_algorithms: dict | None = None, description: str | None = None,
               actor: str | None = None, exposed_shell: str | None = None) -> Device:
    """Register a device with its pinned host key and the credential the broker logs in with.

    :raises UsageError: bad name/host/port/login/host key/class, or not exactly one credential
    :raises ConflictError: the name is taken
    """
    validate_name(name, what="device name")
    if not isinstance(host, str) or not _HOST.fullmatch(host):
        raise UsageError(f"host {host!r} is not a host name or IP address")
    if isinstance(port, bool) or not isinstance(port, int):
        raise UsageError(f"port {port!r} is not a number", "use 1-65535")
    if not 0 < port < 65536:
        raise UsageError(f"port {port} is out of range", "use 1-65535")
    if not isinstance(login, str) or not _LOGIN.fullmatch(login):
        raise UsageError(f"login {login!r} is not a valid device account name")
    if (key_text is None) == (password is None):
        raise UsageError("give exactly one credential", "--key FILE or --password-stdin")
    if key_text is not None and "PRIVATE KEY" not in key_text:
        raise UsageError("the --key file is not a private key", "pass the private key the broker logs in with")
    if password is not None and (not password or "\n" in password):
        raise UsageError("the password is empty or has several lines")
    if device_class not in CLASSES:
        raise UsageError(f"class {device_class!r} is not known", "use standard or critical")
    legacy = legacy_algorithms or {}
    for k, v in legacy.items():
        if k not in LEGACY_KEYS or not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise UsageError(f"legacy algorithm setting {k!r} is not valid", f"keys: {', '.join(LEGACY_KEYS)}")
    _check_shell_policy(exposed_shell)
    hk = parse_public_key(host_key)
    paths = tuple(dict.fromkeys(validate_protected_path(p) for p in protect))
    if store.get_device(name):
        raise ConflictError(f"device {name} already exists", f"remove it first: medbroker device remove {name}")
    secret = key_text if key_text is not None else password
    assert secret is not None  # checked above: a key or a password
    store.insert_device({
        "name": name, "host": host, "port": int(port), "login": login,
        "auth_kind": "key" if key_text is not None else "password",
        "credential": keys.seal(secret.encode(), context=f"device:{name}".encode()),
        "host_key": hk.line, "host_key_fingerprint": hk.fingerprint, "protected_paths": dumps(list(paths)),
        "device_class": device_class, "legacy_algorithms": dumps(legacy), "description": description,
        "created_at": utc_iso(now), **({"exposed_shell": exposed_shell} if exposed_shell else {}),
    })
    shell_detail: dict[str, Any] = {"exposed_shell": exposed_shell} if exposed_shell else {}
    audit.record("device.added", actor=actor, device=name, host=host, port=int(port), login=login,
                 host_key_fingerprint=hk.fingerprint, protected_paths=list(paths), device_class=device_class,
                 legacy_algorithms=legacy, **shell_detail)
    return get_device(store, name)


def get_device(store: Store, name: str) -> Device:
    """:raises NotFoundError: unknown device"""
    row = store.get_device(name)
    if not row:
        raise NotFoundError(f"device {name} is not registered", "see: medbroker device list")
    return _device(row)


def list_devices(store: Store) -> list[Device]:
    return [_device(r) for r in store.list_devices()]


def remove_device(store: Store, audit: AuditLog, name: str, *, actor: str | None = None) -> None:
    """:raises NotFoundError: unknown device"""
    get_device(store, name)
    store.delete_device(name)
    audit.record("device.removed", actor=actor, device=name)


def device_credential(device: Device, keys: KeyProvider) -> Secret[str]:
    """Unseal the device's credential (private key text or password) as a :class:`Secret`."""
    return Secret(keys.unseal(device.credential, context=f"device:{device.name}".encode()).decode())
