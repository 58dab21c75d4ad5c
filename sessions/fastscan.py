"""Three byte scans of the deep scanner, compiled when the package was built with its C extension.

The deep scanner (sessions/decoders.py) asks three questions of every chunk of output: is there a run of 16
base64-ish characters (the encoded-run prefilter), how many blanks does it hold (the spaced-text test) and where
is the DICOM UID root. In CPython each is a ``translate``, ``find`` or a Hyperscan pass costing 0.3-1.3 s/GiB; on
a device log they were a quarter of the broker's event loop in an exec download (docs/performance.md, stop 17).
``sessions/_fastscan.c`` answers them with SSE2 loops at a fraction of that.

Every function here returns exactly what its pure-Python expression returns (shown in each docstring; they are
the fallback, used when the extension is not built or :func:`set_native` turned it off, and
tests/test_fastscan.py compares the two on random and planted buffers). The extension is optional at build time
(setup.py): a machine without a C compiler installs medbroker with the same verdicts, only slower. ``medbroker
serve`` says which is in use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RUN_CHARS", "RUN_NEEDLE", "RUN_TABLE", "count_blanks", "find", "native", "run16", "set_native"]

RUN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+"
"""The characters :func:`run16` counts (base64's alphabet without ``/``, which paths are full of)."""
BLANKS = b" \t\r\n"
RUN_TABLE = bytes(0x61 if c in RUN_CHARS else 0x20 for c in range(256))
"""``translate`` table: :data:`RUN_CHARS` to ``a``, every other byte to a space."""
RUN_NEEDLE = b"a" * 16
"""Where ``buf.translate(RUN_TABLE)`` holds this, ``buf`` has a run of 16 :data:`RUN_CHARS`."""


def _load() -> Any:
    try:
        return importlib.import_module("sessions._fastscan")
    except ImportError:  # not built (no compiler at install time): the pure-Python expressions below
        return None


_ext: Any = _load()
_on = _ext is not None


def _bytes(buf: Any) -> bytes:
    """What the extension takes (any bytes-like object; TypeError for anything else), for the Python paths."""
    return buf if type(buf) is bytes else bytes(memoryview(buf))


def native() -> bool:
    """True when the compiled scans are in use."""
    return _on


def built() -> bool:
    """True when the extension was built and loads (whether or not it is in use)."""
    return _ext is not None


def set_native(on: bool) -> None:
    """Use the compiled scans (the default when built) or the pure-Python ones (tests and the bench compare both).

    :raises ValueError: ``on`` when the extension was not built
    """
    global _on
    if on and _ext is None:
        raise ValueError("the compiled scanner (sessions._fastscan) was not built; reinstall with a C compiler")
    _on = bool(on)


def run16(buf: bytes, start: int = 0) -> int:
    """``buf.translate(RUN_TABLE).find(RUN_NEEDLE, start)``: where the first run of 16 :data:`RUN_CHARS` starting at or
    after ``start`` (>= 0) begins, or -1."""
    if start < 0:
        raise ValueError("start must be >= 0")
    if _on:
        return int(_ext.run16(buf, start))
    return _bytes(buf).translate(RUN_TABLE).find(RUN_NEEDLE, start)


def count_blanks(buf: bytes) -> int:
    """``len(buf) - len(buf.translate(None, b" \\t\\r\\n"))``: how many bytes are space, tab, CR or LF."""
    if _on:
        return int(_ext.count_blanks(buf))
    buf = _bytes(buf)
    return len(buf) - len(buf.translate(None, BLANKS))


def find(buf: bytes, needle: bytes, start: int = 0) -> int:
    """``buf.find(needle, start)`` (``start`` >= 0)."""
    if start < 0:
        raise ValueError("start must be >= 0")
    if _on and len(needle) >= 2:
        return int(_ext.find(buf, needle, start))
    return _bytes(buf).find(needle, start)
