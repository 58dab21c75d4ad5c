"""Large socket reads handed to asyncssh in 32 KiB pieces: a pinned asyncssh hook.

asyncssh keeps a connection's unparsed input in one ``bytes`` object, ``SSHConnection._inpbuf``: each read is
appended to it, and each SSH packet parsed from it is cut off the front by slicing (``_inpbuf[n:]``, twice per
packet: header, then body and MAC). Every cut copies what is left. The event loop reads up to 256 KiB at a time,
and during a bulk transfer nearly every read is that large (measured in the broker: 88 % of an exec download's
bytes from the device, 97 % of an upload's bytes from the vendor came in reads of 224-256 KiB), so each 32 KiB
packet copies the rest of a 256 KiB buffer twice: ~1.2 MiB copied per 256 KiB read. The same slicing pattern
costs 1.45 s of CPU per GiB with 256 KiB reads and 0.13 s with 32 KiB ones (docs/performance.md, "Stop 18").

The hook hands a read larger than 32 KiB to asyncssh in 32 KiB pieces (memoryview slices, no extra copy), each
parsed before the next is appended, so the buffer stays under one packet plus one piece. To asyncssh this is
the same as the kernel returning smaller reads, which it must handle anyway (a TCP stream may be split
anywhere). Once a piece ends the connection (asyncssh drops its transport), the rest of the read is not
parsed: asyncssh itself parses nothing after it closed. Private names are touched, so the asyncssh range is
pinned in pyproject.toml; when they changed, nothing is installed and asyncssh parses as before.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from asyncssh import connection as _conn

__all__ = ["install_recv_split_hook", "recv_split_hook_active", "PIECE"]

log = logging.getLogger("medbroker.recvsplit")

PIECE = 32 << 10
"""Bytes of a read handed to asyncssh at a time: one full-size SSH packet's worth."""

_active = False


def _private_api_problem() -> str | None:
    """What changed in asyncssh's private names the hook relies on, or None."""
    cls: Any = _conn.SSHConnection
    if not callable(getattr(cls, "_recv_data", None)):
        return "SSHConnection._recv_data is gone"
    try:
        source = inspect.getsource(cls.data_received)
    except (OSError, TypeError):  # installed without sources: tests/test_recvsplit.py pins the behaviour
        return None
    if "self._inpbuf += data" not in source or "self._recv_data()" not in source:
        return "SSHConnection.data_received no longer appends to _inpbuf and parses"
    return None


def install_recv_split_hook() -> bool:
    """Install once per process (idempotent); False when asyncssh's private names changed (nothing installed)."""
    global _active
    if _active:
        return True
    problem = _private_api_problem()
    if problem is not None:
        log.warning("asyncssh parses large reads whole (slower bulk transfers): asyncssh changed (%s)", problem)
        return False
    cls: Any = _conn.SSHConnection
    original = cls.data_received

    def data_received(self: Any, data: bytes, datatype: Any = None) -> None:
        size = len(data)
        if size <= PIECE:
            original(self, data, datatype)
            return
        view = memoryview(data)
        for start in range(0, size, PIECE):
            if start and not self._transport:
                return  # the connection ended inside this read: asyncssh parses nothing after that
            self._inpbuf += view[start:start + PIECE]
            self._recv_data()

    cls.data_received = data_received
    _active = True
    return True


def recv_split_hook_active() -> bool:
    """Whether large reads are handed to asyncssh in :data:`PIECE`-sized pieces in this process."""
    return _active
