"""SSH_MSG_IGNORE before every packet only where it protects something: a pinned asyncssh hook.

asyncssh sends an empty SSH_MSG_IGNORE in front of every packet after the key exchange (``send_packet``: "if
we're encrypting ... insert an ignore packet into the stream"). That is the countermeasure of RFC 4251 §9.3.1
for CBC mode, where the next packet's IV is the previous packet's last ciphertext block, which an attacker has
already seen: a packet the attacker cannot predict in front of each one takes that away. Under an AEAD cipher
(AES-GCM, ChaCha20-Poly1305: every packet's nonce comes from its sequence number, nothing chains) it protects
nothing, and OpenSSH sends no such packets. It costs the broker one more packet, encryption and ``write()``
system call for every packet it sends: a keystroke's echo, and each 32 KiB of a bulk transfer.

The hook drops asyncssh's ignore packets while the connection's outgoing cipher is AEAD; under any other
cipher (the CBC and CTR modes a device may still negotiate) they go out as before. asyncssh sends
SSH_MSG_IGNORE from this one place only (checked at install). Private names are touched, so the asyncssh range
is pinned in pyproject.toml; when they changed, nothing is installed and asyncssh sends them as before.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from asyncssh import connection as _conn
from asyncssh import encryption as _enc
from asyncssh.constants import MSG_IGNORE

__all__ = ["install_ignore_packet_hook", "ignore_packet_hook_active", "AEAD"]

log = logging.getLogger("medbroker.ignorepackets")

_SENDER = "self.send_packet(MSG_IGNORE, String(b''))"
AEAD: tuple[type, ...] = tuple(c for c in (getattr(_enc, "GCMEncryption", None), getattr(_enc, "ChachaEncryption", None))
                               if isinstance(c, type))
"""asyncssh's packet encryption classes of the AEAD ciphers (aes*-gcm@openssh.com, chacha20-poly1305@openssh.com)."""

_active = False


def _private_api_problem() -> str | None:
    """What changed in asyncssh's private names the hook relies on, or None."""
    if len(AEAD) != 2:
        return "asyncssh.encryption no longer has GCMEncryption and ChachaEncryption"
    cls: Any = _conn.SSHConnection
    if not callable(getattr(cls, "send_packet", None)):
        return "SSHConnection.send_packet is gone"
    try:
        module = inspect.getsource(_conn)
        method = inspect.getsource(cls.send_packet)
    except (OSError, TypeError):  # installed without sources: tests/test_ignorepackets.py pins the behaviour
        return None
    if _SENDER not in method or "self._send_encryption" not in method:
        return "SSHConnection.send_packet no longer inserts its ignore packet as before"
    if module.count("send_packet(MSG_IGNORE") != 1:
        return "asyncssh sends SSH_MSG_IGNORE from more than one place"
    return None


def install_ignore_packet_hook() -> bool:
    """Install once per process (idempotent); False when asyncssh's private names changed (nothing installed)."""
    global _active
    if _active:
        return True
    problem = _private_api_problem()
    if problem is not None:
        log.warning("asyncssh sends an ignore packet before every packet: asyncssh changed (%s)", problem)
        return False
    cls: Any = _conn.SSHConnection
    original = cls.send_packet
    aead = AEAD

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and isinstance(self._send_encryption, aead):
            return  # the CBC countermeasure protects nothing under an AEAD cipher
        original(self, pkttype, *args, handler=handler)

    cls.send_packet = send_packet
    _active = True
    return True


def ignore_packet_hook_active() -> bool:
    """Whether asyncssh's per-packet ignore packets are left out under AEAD ciphers in this process."""
    return _active
