"""Which of a fixed set of byte patterns occur in a buffer: one compiled pass instead of one Python pass each.

The stream judge (sessions/streams.py) looks for literal anchors (``ustar``, ``SSH-``, an SFTP hello ...) before
its exact checks run, and so do parts of the output scanners (sessions/content.py, decoders.py). In random or
compressed data each ``bytes.find`` or ``re`` search for a multi-byte needle costs CPython 0.5-0.7 ns per byte (no
byte can be skipped: any may start a needle), so the judge spent ~3 s/GiB of CPU on an upload of random data,
against ~4 s/GiB for all that a bare asyncssh relay does with it (bench/ablation.py measured the judge at 4.7
s/GiB inside the broker).

With Hyperscan (the ``hyperscan`` package, a manylinux wheel that bundles Intel's engine: ``pip install
'medbroker[fast]'``) one pass over the buffer reports every anchor that occurs (0.27 s/GiB for the judge's
six). An :class:`Anchors` never decides anything: callers run their own exact checks for the anchors it
reports, and they are the same checks either way. Without Hyperscan, or if the engine fails, every anchor is
reported present, so every check runs as it always did. The engine can make a scan cheaper; it cannot change
a verdict (tests/test_anchors.py compares what it reports with ``re`` on random and planted buffers).
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

__all__ = ["Anchors", "literal", "engine", "set_engine", "ENGINES"]

ENGINES = ("hyperscan", "python")
log = logging.getLogger(__name__)

_hs: Any = None        # the hyperscan module once imported, False when it cannot be
_wanted = "hyperscan"  # set_engine(): tests and bench/ablation.py compare both engines


def _module() -> Any:
    global _hs
    if _hs is None:
        try:
            _hs = importlib.import_module("hyperscan")
        except Exception:  # noqa: BLE001 - not installed, or a wheel that does not load here: pure Python
            _hs = False
    return _hs


def engine() -> str:
    """``"hyperscan"`` when scans use it, else ``"python"`` (every anchor reported, every check runs)."""
    return "hyperscan" if _wanted == "hyperscan" and _module() else "python"


def set_engine(name: str) -> None:
    """Choose the engine for scans from now on (tests and the bench; the product uses Hyperscan when present).

    :raises ValueError: an unknown name, or ``"hyperscan"`` when it is not installed
    """
    global _wanted
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {name!r}")
    if name == "hyperscan" and not _module():
        raise ValueError("hyperscan is not installed (pip install 'medbroker[fast]')")
    _wanted = name


def literal(needle: bytes) -> bytes:
    """A pattern matching exactly ``needle``, every byte as a ``\\xHH`` escape (the same in ``re`` and Hyperscan,
    which reads its patterns as C strings: a raw NUL would end one)."""
    return b"".join(b"\\x%02x" % c for c in needle)


class Anchors:
    """A named set of patterns (Python ``re`` syntax for bytes, matched with DOTALL) and one question:
    which of them occur in ``buf[start:]``?"""

    def __init__(self, patterns: dict[str, bytes], *, min_size: int = 0) -> None:
        """:param min_size: shorter buffers (from ``start``) report every pattern without a scan, for callers whose
            own checks cost less than a call into the engine there"""
        if not patterns:
            raise ValueError("Anchors needs at least one pattern")
        self.min_size = min_size
        self.names = tuple(patterns)
        self.all = frozenset(self.names)
        self._sources = [patterns[n] for n in self.names]
        self._db: Any = None      # compiled on first use; False when compiling failed
        self._warned = False
        self._lock = threading.Lock()  # one compile, whichever thread scans first
        self._local = threading.local()  # Hyperscan scratch space is per thread (and per database)

    def present(self, buf: bytes, start: int = 0) -> frozenset[str]:
        """Names of the patterns with a match lying wholly in ``buf[start:]``; all names without the engine (or
        below ``min_size``).

        A match may be reported that a caller's search from ``start`` would also find; a pattern is left out
        only when it does not occur there at all.
        """
        if engine() != "hyperscan" or len(buf) - start < self.min_size:
            return self.all
        db = self._db if self._db is not None else self._compile()
        if db is False:
            return self.all
        if start >= len(buf):
            return frozenset()
        found: set[int] = set()
        scratch = getattr(self._local, "scratch", None)
        try:
            if scratch is None:
                scratch = self._local.scratch = _hs.Scratch(db)
            db.scan(memoryview(buf)[start:] if start else buf,
                    match_event_handler=lambda i, frm, to, flags, ctx: found.add(i), scratch=scratch)
        except Exception as exc:  # noqa: BLE001 - the engine failed: every check runs, as without it
            if not self._warned:  # once: a failing engine must not flood the log for every chunk
                self._warned = True
                log.warning("hyperscan scan failed (%s); checking every pattern in Python", exc)
            return self.all
        return frozenset(self.names[i] for i in found)

    def _compile(self) -> Any:
        with self._lock:
            if self._db is None:
                self._db = self._build()
            return self._db

    def _build(self) -> Any:
        hs = _hs
        try:
            db = hs.Database(mode=hs.HS_MODE_BLOCK)
            flag = hs.HS_FLAG_DOTALL | hs.HS_FLAG_SINGLEMATCH  # one report per pattern and scan
            db.compile(expressions=self._sources, ids=list(range(len(self._sources))),
                       elements=len(self._sources), flags=[flag] * len(self._sources))
        except Exception as exc:  # noqa: BLE001 - a pattern Hyperscan does not take: every check runs
            log.warning("hyperscan cannot compile %s (%s); checking them in Python", ", ".join(self.names), exc)
            db = False
        return db
