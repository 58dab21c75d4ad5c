"""Approved port forwards (issue 14 item 2): which device ports a grant may forward, and which never.

A forward is a TCP port on the device itself (``ssh -L 8443:ct-01:443 alice@ct-01@broker``): the broker opens
it on the device side, through the session's own device connection, to 127.0.0.1:PORT. Requests name ports
only (``--forward 443``; ``localhost:443``, ``127.0.0.1:443`` and ``DEVICE:443`` are accepted and stored as
443); another host is refused. Ports that carry patient data (DICOM, HL7 MLLP) and the device's SSH port can
never be requested, approved or opened; a site adds more in the policy file (``[ports] never = [...]``) and
can never remove the built-in ones. TLS through a forward cannot be inspected: ``[policy] forward_tls`` says where
it is allowed (:func:`tls_refusal`, :func:`tls_rule_text`). Pure: no SSH, no SQL.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Iterable

from broker.errors import ConfigError, PermissionDeniedError, UsageError

__all__ = ["BUILTIN_NEVER", "LOCAL_NAMES", "ProtectedPorts", "load_protected_ports", "parse_forward_port",
           "parse_forwards", "grant_ports", "parse_strikes", "forward_refusal", "forwards_text", "FORWARD_TLS",
           "tls_refusal", "tls_rule_text"]

# Ports that carry patient data or would bypass the broker: never forwarded, whatever a site configures.
BUILTIN_NEVER: dict[int, str] = {
    104: "DICOM (patient images)",
    11112: "DICOM (patient images)",
    4242: "DICOM (Orthanc's DICOM port, patient images)",
    2575: "HL7 MLLP (patient records)",
    22: "SSH to the device itself (use ssh USER@DEVICE@broker, which is recorded)",
}
# Names of the device itself in a forward destination (besides the device's own name).
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost"})
_SPEC = re.compile(r"(?:(?P<host>[A-Za-z0-9._\-]{1,253}|\[[0-9A-Fa-f:]{2,39}\]):)?(?P<port>[0-9]{1,5})", re.ASCII)
MAX_FORWARDS = 16
FORWARD_TLS = ("contained-only", "allow", "refuse")  # [policy] forward_tls


class ProtectedPorts:
    """The ports no grant may forward: the built-in ones plus the site's (policy file)."""

    def __init__(self, site: dict[int, str] | None = None) -> None:
        self.reasons: dict[int, str] = {**(site or {}), **BUILTIN_NEVER}

    def reason(self, port: int, device_port: int | None = None) -> str | None:
        """Why ``port`` can never be forwarded, or None. ``device_port``: the device's SSH port."""
        if port in self.reasons:
            return self.reasons[port]
        if device_port is not None and port == device_port:
            return BUILTIN_NEVER[22]
        return None

    def __contains__(self, port: int) -> bool:
        return port in self.reasons

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProtectedPorts) and other.reasons == self.reasons

    def __hash__(self) -> int:
        return hash(frozenset(self.reasons.items()))

    def __repr__(self) -> str:
        return f"ProtectedPorts({sorted(self.reasons)})"


def load_protected_ports(path: str | Path) -> ProtectedPorts:
    """The ``[ports]`` table of the policy file (broker/defaults/protected-paths.toml or the site's copy):
    ``never = [8042, ...]``, whole numbers 1-65535. A file without ``[ports]`` adds nothing.

    :raises ConfigError: unreadable file, unknown key, or a value that is not a port
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: policy file not found",
                          "set policy.protected_paths_file in broker.toml or restore the shipped file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the policy file ({exc})") from None
    table = data.get("ports", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: ports must be a table", "[ports]\nnever = [8042]")
    unknown = sorted(set(table) - {"never"})
    if unknown:
        raise ConfigError(f"{path}: unknown key ports.{unknown[0]}", "the [ports] table has one key: never")
    entries = table.get("never", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: ports.never must be a list of port numbers", "e.g. never = [8042]")
    site: dict[int, str] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, bool) or not isinstance(entry, int) or not 0 < entry < 65536:
            raise ConfigError(f"{path}: ports.never[{i}] = {entry!r} is not a port number (1-65535)",
                              "e.g. never = [8042]")
        site[entry] = "listed in the site's policy file as a patient-data port"
    return ProtectedPorts(site)


def parse_forward_port(text: str, device: str, protected: ProtectedPorts, device_port: int | None = None) -> int:
    """A requested forward: ``PORT``, or ``localhost:PORT`` / ``127.0.0.1:PORT`` / ``DEVICE:PORT``.

    :returns: the port
    :raises UsageError: not a port, or another host named
    :raises PermissionDeniedError: a port that can never be forwarded (patient data, the device's SSH)
    """
    m = _SPEC.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m or not 0 < int(m.group("port")) < 65536:
        raise UsageError(f"forward {text!r} is not a port on the device",
                         f"name the device's port, e.g. --forward 443 (then: ssh -L 8443:{device}:443 ...)")
    host = m.group("host")
    if host is not None and host.lower() not in LOCAL_NAMES and host.lower() != device.lower():
        raise UsageError(f"forward {text!r} names another host ({host}); forwards reach ports on {device} only",
                         f"request the port on {device}, e.g. --forward {m.group('port')}; other hosts are not "
                         "reachable through medbroker")
    port = int(m.group("port"))
    why = protected.reason(port, device_port)
    if why:
        raise PermissionDeniedError(
            f"port {port} can never be forwarded: {why}; patient data stays on the device",
            "request the device's service or web port instead; ask the hospital's biomedical engineers if the "
            "work needs this data")
    return port


def parse_forwards(texts: Iterable[str], device: str, protected: ProtectedPorts,
                   device_port: int | None = None) -> tuple[int, ...]:
    """Every ``--forward`` of a request, deduplicated in order (at most MAX_FORWARDS).

    :raises UsageError | PermissionDeniedError: as :func:`parse_forward_port`
    """
    out: dict[int, None] = {}
    for text in texts:
        out[parse_forward_port(text, device, protected, device_port)] = None
    if len(out) > MAX_FORWARDS:
        raise UsageError(f"{len(out)} forwards requested; at most {MAX_FORWARDS}", "request the ports the work needs")
    return tuple(out)


def grant_ports(forwards: Iterable[object]) -> frozenset[int]:
    """The ports a stored request or grant allows. Entries are ports (ints); rows written before forwards
    worked hold ``HOST:PORT`` text: a local name gives its port, anything else allows nothing."""
    ports = set()
    for f in forwards:
        if isinstance(f, int) and not isinstance(f, bool):
            ports.add(f)
        elif isinstance(f, str):
            host, _, port = f.rpartition(":")
            if port.isascii() and port.isdigit() and (not host or host.lower() in LOCAL_NAMES):
                ports.add(int(port))
    return frozenset(p for p in ports if 0 < p < 65536)


def parse_strikes(texts: Iterable[str], requested: Iterable[object]) -> tuple[int, ...]:
    """``--strike 8080`` (repeatable, or ``8080,8443``): ports of the request the approver does not allow.

    :raises UsageError: not a port, or a port the request did not ask for
    """
    asked = grant_ports(requested)
    out: dict[int, None] = {}
    for text in texts:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if not (part.isascii() and part.isdigit()) or not 0 < int(part) < 65536:
                raise UsageError(f"--strike {part!r} is not a port", "e.g. --strike 8080")
            if int(part) not in asked:
                have = ", ".join(str(p) for p in sorted(asked)) or "no forwards"
                raise UsageError(f"port {part} is not among the request's forwards ({have})",
                                 "strike only ports the request asks for; nothing changed")
            out[int(part)] = None
    return tuple(out)


def forwards_text(ports: Iterable[object]) -> str:
    """``443, 8080`` for people (``-`` when none)."""
    return ", ".join(str(p) for p in sorted(grant_ports(ports))) or "-"


def forward_refusal(dest_host: str, dest_port: int, device: str, allowed: frozenset[int],
                    protected: ProtectedPorts, device_port: int | None = None) -> str | None:
    """Why a ``direct-tcpip`` channel to ``dest_host:dest_port`` is refused on a session to ``device`` whose
    grant allows ``allowed``, or None to open it (to 127.0.0.1:dest_port on the device)."""
    host = (dest_host or "").lower()
    if host not in LOCAL_NAMES and host != device.lower():
        return (f"forwards reach ports on {device} only, not {dest_host}; use ssh -L LOCALPORT:{device}:PORT "
                f"with a port your grant allows")
    why = protected.reason(dest_port, device_port)
    if why:
        return f"port {dest_port} can never be forwarded ({why}); patient data stays on the device"
    if dest_port not in allowed:
        have = ", ".join(str(p) for p in sorted(allowed))
        return (f"port {dest_port} on {device} is not in your grant"
                + (f" (it allows {have})" if have else " (it allows no forwards)")
                + f"; request it: request {device} --for 1h --reason ... --forward {dest_port}")
    return None


def tls_rule_text(rule: str) -> str:
    """What an approver reads next to each port: is TLS on it inspected, and where is it allowed."""
    if rule == "allow":
        return "TLS: inspected? no — allowed on every device (policy forward_tls = allow)"
    if rule == "refuse":
        return "TLS: refused (policy forward_tls = refuse); plain text only, inspected"
    return "TLS: inspected? no — allowed only on contained devices"


def tls_refusal(rule: str, containment: str | None, device: str, port: int) -> str | None:
    """Why a TLS connection through a forward to ``port`` on ``device`` (containment state ``containment``) is
    refused under ``[policy] forward_tls = rule``, or None to allow it. Unknown containment counts as exposed."""
    if rule == "allow":
        return None
    after = (f"so this connection to port {port} on {device} was closed before it reached the device. Use the "
             "device's plain-text (http) port if it has one")
    if rule == "refuse":
        return ("TLS through port forwards is refused on this broker (medbroker cannot inspect it), "
                f"{after}, or ask the hospital's security team")
    if containment == "contained":
        return None
    state = ("exposed: its maintenance login can read patient data" if containment == "exposed"
             else "not known to be contained (its containment check has not succeeded)")
    return (f"TLS through a port forward is allowed only on contained devices, and {device} is {state}; medbroker "
            f"cannot inspect TLS, {after}, or ask the hospital's biomedical engineers to contain the device")
