"""Packet log lines formatted only when asyncssh would write them: a pinned asyncssh hook.

asyncssh logs every SSH packet through ``SSHPacketLogger._log_packet``, which builds its message (the handler
name, ``plural()`` of the size, an f-string or two) and only then asks ``SSHLogger.packet`` whether packets are
logged at all: they are only at asyncssh's debug level 3 (``asyncssh.set_debug_level(3)``, which also needs the
``asyncssh`` logger at DEBUG). A keystroke round trip through the broker sends and receives seven packets, so
the broker formatted seven log lines per key that nobody reads: ~1 µs each (an echo of 20,000 round trips over
loopback, client and server in one process: 95-102 -> 87-93 µs CPU per round trip, docs/performance.md).

The hook asks first: below debug level 3 nothing is formatted; at level 3 asyncssh's own method runs, so packet
dumps read exactly as before (tests/test_packetlog.py). Private names are touched, so the asyncssh range is
pinned in pyproject.toml; when they changed, nothing is installed and asyncssh formats as before.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from asyncssh import logging as _alog
from asyncssh import packet as _packet

__all__ = ["install_packet_log_hook", "packet_log_hook_active"]

log = logging.getLogger("medbroker.packetlog")

_active = False


def _private_api_problem() -> str | None:
    """What changed in asyncssh's private names the hook relies on, or None."""
    if not callable(getattr(_packet.SSHPacketLogger, "_log_packet", None)):
        return "SSHPacketLogger._log_packet is gone"
    if not isinstance(getattr(_alog.SSHLogger, "_debug_level", None), int):
        return "SSHLogger._debug_level is gone"
    try:
        source = inspect.getsource(_alog.SSHLogger.packet)
    except (OSError, TypeError):  # installed without sources: tests/test_packetlog.py pins the behaviour
        return None
    if "self._debug_level >= 3" not in source:
        return "SSHLogger.packet no longer logs at debug level 3 only"
    return None


def install_packet_log_hook() -> bool:
    """Install once per process (idempotent); False when asyncssh's private names changed (nothing installed)."""
    global _active
    if _active:
        return True
    problem = _private_api_problem()
    if problem is not None:
        log.warning("asyncssh packet log lines stay formatted per packet: asyncssh changed (%s)", problem)
        return False
    cls: Any = _packet.SSHPacketLogger
    original = cls._log_packet
    logger_cls: Any = _alog.SSHLogger

    def _log_packet(self: Any, msg: str, pkttype: int, pktid: int | None, packet: Any, note: str) -> None:
        if logger_cls._debug_level >= 3:  # the only level at which SSHLogger.packet writes anything
            original(self, msg, pkttype, pktid, packet, note)

    cls._log_packet = _log_packet
    _active = True
    return True


def packet_log_hook_active() -> bool:
    """Whether packet log lines in this process are formatted only at asyncssh's debug level 3."""
    return _active
