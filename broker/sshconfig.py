"""``medbroker ssh-config`` / ``ssh alice@broker ssh-config``: Host blocks and the host keys to pin, for a vendor.

For every device the vendor may request (every registered device: medbroker has no per-vendor device
restriction) two OpenSSH Host blocks: the direct form (``ssh ct-01`` → ``alice@ct-01@broker``, the broker's
key pinned under ``HostKeyAlias medbroker``) and the ProxyJump form (``ssh ct-01-jump`` → ``ssh -J
alice@broker:PORT ct-01``, the device's jump key pinned under its own alias), then the known_hosts lines.
``--putty`` gives the same as a PuTTY registry file (one saved session per device, host key pinned) with
plink command lines, including the jump through ``-proxycmd … -nc``, in its comments. docs/vendors.md.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from broker.app import App
from broker.devices import list_devices
from broker.jumpkeys import public_line

__all__ = ["SshConfig", "build_ssh_config", "render_openssh", "render_putty"]

BROKER_ALIAS = "medbroker"


@dataclass(frozen=True)
class SshConfig:
    """What a vendor needs to paste: who, where, which devices, which keys."""

    user: str
    host: str
    port: int
    broker_key: str  # "ssh-ed25519 BASE64"
    devices: tuple[tuple[str, str], ...]  # (device name, its jump host key "TYPE BASE64")

    def as_dict(self) -> dict:
        return {"user": self.user, "host": self.host, "port": self.port, "broker_host_key": self.broker_key,
                "broker_host_key_alias": BROKER_ALIAS,
                "devices": [{"name": n, "jump_host_key": k, "jump_host_key_alias": _alias(n),
                             "direct": {"host": n, "user": f"{self.user}@{n}"},
                             "jump": {"host": f"{n}-jump", "proxy_jump": self._jump()}} for n, k in self.devices],
                "known_hosts": self.known_hosts()}

    def _jump(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def known_hosts(self) -> list[str]:
        first_hop = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return [f"{BROKER_ALIAS} {self.broker_key}", f"{first_hop} {self.broker_key}",
                *(f"{_alias(n)} {k}" for n, k in self.devices)]


def _alias(device: str) -> str:
    return f"{BROKER_ALIAS}-jump-{device}"


def build_ssh_config(app: App, user: str, *, port: int, host: str | None = None) -> SshConfig:
    """The config for ``user`` (not checked here: the callers name a real user) at ``host:port``.

    Creates the devices' jump host keys that do not exist yet (broker/jumpkeys.py).
    """
    cfg = app.config
    broker_key = " ".join(_pub_path(app).read_text().split()[:2])
    devices = tuple((d.name, public_line(app, d.name)) for d in list_devices(app.store))
    return SshConfig(user=user, host=host or cfg.listen.public_host, port=port, broker_key=broker_key,
                     devices=devices)


def _pub_path(app: App) -> Path:
    cfg = app.config
    path = cfg.path(cfg.listen.host_key)
    return path.with_name(path.name + ".pub")


def render_openssh(c: SshConfig) -> str:
    """Host blocks for ~/.ssh/config, then the known_hosts lines (as comments to move into known_hosts)."""
    out = [f"# medbroker: ssh config for {c.user} at {c.host}:{c.port}. Paste the Host blocks into ~/.ssh/config",
           "# and the known_hosts lines at the end into ~/.ssh/known_hosts (without the leading '# ').",
           f"# Direct: ssh DEVICE  ·  ProxyJump: ssh DEVICE-jump  ·  status and requests: ssh -p {c.port} "
           f"{c.user}@{c.host}", ""]
    for name, _ in c.devices:
        out += [f"Host {name}", f"  HostName {c.host}", f"  Port {c.port}", f"  User {c.user}@{name}",
                f"  HostKeyAlias {BROKER_ALIAS}", "",
                f"Host {name}-jump", f"  HostName {name}", f"  User {c.user}", f"  ProxyJump {c._jump()}",
                f"  HostKeyAlias {_alias(name)}", ""]
    if not c.devices:
        out += ["# (no devices are registered yet)", ""]
    out += ["# known_hosts:"] + [f"# {line}" for line in c.known_hosts()]
    return "\n".join(out) + "\n"


def _sha256(key_line: str) -> str:
    blob = base64.b64decode(key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def render_putty(c: SshConfig) -> str:
    """A PuTTY registry export (``reg import`` or double-click): one saved session per device, the broker's host
    key pinned (``SSHManualHostKeys``). Its comments hold the plink/pscp/psftp command lines, the jump too."""
    broker_fp = _sha256(c.broker_key)
    lines = ["Windows Registry Editor Version 5.00", "",
             f"; medbroker: PuTTY sessions for {c.user} at {c.host}:{c.port}. Save as medbroker.reg and double-click",
             "; it (or: reg import medbroker.reg); then open the session 'medbroker-DEVICE' in PuTTY. In PuTTY set",
             "; Connection > SSH > Auth > Credentials > Private key to your .ppk file.",
             f"; The broker's host key: {broker_fp}", ";",
             "; plink (cmd.exe or PowerShell), direct and through the jump (PuTTY 0.78 has no -J: -proxycmd … -nc):"]
    for name, key in c.devices:
        lines += [f";   plink -ssh -P {c.port} -hostkey {broker_fp} -i KEY.ppk {c.user}@{name}@{c.host}",
                  f";   plink -ssh -hostkey {_sha256(key)} -i KEY.ppk -proxycmd \"plink -ssh -batch -P {c.port} "
                  f"-hostkey {broker_fp} -i KEY.ppk -nc {name}:22 {c.user}@{c.host}\" {c.user}@{name}",
                  f";   pscp -P {c.port} -hostkey {broker_fp} -i KEY.ppk FILE {c.user}@{name}@{c.host}:/tmp/",
                  f";   psftp -P {c.port} -hostkey {broker_fp} -i KEY.ppk {c.user}@{name}@{c.host}"]
    lines.append("")
    for name, _ in c.devices:
        lines += [f"[HKEY_CURRENT_USER\\Software\\SimonTatham\\PuTTY\\Sessions\\medbroker-{name}]",
                  f"\"HostName\"=\"{c.host}\"", f"\"PortNumber\"=dword:{c.port:08x}",
                  f"\"UserName\"=\"{c.user}@{name}\"", "\"Protocol\"=\"ssh\"",
                  f"\"SSHManualHostKeys\"=\"{broker_fp}\"", ""]
    return "\n".join(lines) + "\n"
