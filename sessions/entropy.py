"""Output that cannot be inspected (compressed, encrypted or random data): measured and bounded per session.

:class:`OpaqueMeter` judges a stream in 8 KiB blocks from one 128-byte sample at a random offset
(unpredictable to the device): a binary sample is *opaque* when it holds nearly as many distinct byte
values as random data does (>= 80 of 128; random data gives 89..115, x86 code and text far fewer); an
ASCII sample when it is base64, base32 or hex whose decoded bytes look random that way. A block judged
opaque counts in full. :class:`OpaqueBudget` adds the counts of all channels of one session and says when
the configured volume (``[policy] max_opaque_output``) is exceeded; it also caps how many bytes the
scanner may decompress per session (zip bombs). Pure and stdlib-only (layer 2).

What a sample cannot see: random data diluted with at least as much plain text at a finer grain than
128 bytes passes as text; docs/data-protection.md states this limit.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import random

__all__ = ["OPAQUE", "OpaqueBudget", "OpaqueMeter", "format_size"]

OPAQUE = "opaque"
"""What :class:`sessions.decoders.DeepScanner` reports when the session's opaque budget is exceeded."""

BLOCK = 8192
SAMPLE = 128
_BINARY_MIN = 80           # distinct byte values of 128 that make a binary sample opaque
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\r\n"
_HEX_CHARS = b"0123456789abcdefABCDEF\r\n"
_B32_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=\r\n"
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = b"abcdefghijklmnopqrstuvwxyz"
_DIGITS = b"0123456789"


def format_size(n: int) -> str:
    """``65536`` -> ``"64 KiB"``; used in alert messages."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.0f} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class OpaqueBudget:
    """One session's count of opaque output bytes (all its channels) and of decompressed bytes."""

    def __init__(self, limit: int, *, inflate_limit: int = 64 << 20, dump_limit: int = 32 << 20) -> None:
        """:param limit: opaque bytes allowed per session; 0 turns the budget off
        :param inflate_limit: bytes the scanner may decompress per session
        :param dump_limit: bytes of numeric dump text (od, xxd, ...) the scanner reads back into bytes per
            session; dump text past it is counted as opaque (reading dumps back costs ~0.2 s of CPU per MB)"""
        self.limit = limit
        self.used = 0
        self.inflate_limit = inflate_limit
        self.inflated = 0
        self.dump_limit = dump_limit
        self.dumped = 0
        # Set by any scanner of the session whose compressed stream took input in the current top-level feed and
        # has not ended (reset at each top-level feed): the output so far may still turn out to be patient
        # data once more of the stream arrives (DeepScanner.undecided).
        self.open_compressed = False

    def dump(self, n: int) -> bool:
        """Count ``n`` bytes of dump text; False when the per-session cap of decoded dumps is reached."""
        self.dumped += n
        return self.dumped <= self.dump_limit

    def add(self, n: int) -> bool:
        """Count ``n`` more opaque bytes; True when the session is now over its limit."""
        self.used += n
        return 0 < self.limit < self.used

    def inflate(self, n: int) -> bool:
        """Count ``n`` decompressed bytes; False when the per-session decompression cap is reached."""
        self.inflated += n
        return self.inflated <= self.inflate_limit

    def describe(self) -> str:
        """Why the budget ended the session, for the vendor, the alert and the recording."""
        return (f"more than {format_size(self.limit)} of output that could not be inspected (compressed, "
                f"encrypted or random data)")


class OpaqueMeter:
    """Counts the opaque bytes of one output stream (see module doc); feed every chunk in order."""

    def __init__(self, rnd: random.Random | None = None) -> None:
        self._pend = bytearray()
        self._rnd = rnd or random.Random(os.urandom(16))

    def feed(self, chunk: bytes) -> int:
        """:return: bytes of ``chunk`` (and earlier pending bytes) judged opaque now"""
        if self._pend or len(chunk) < BLOCK:
            self._pend += chunk
            if len(self._pend) < BLOCK:
                return 0
            data = bytes(self._pend)
        else:
            data = chunk
        n = len(data)
        full = n - n % BLOCK
        count = 0
        rnd = self._rnd.randrange
        for k in range(0, full, BLOCK):
            off = k + rnd(BLOCK - SAMPLE)
            if sample_opaque(data[off:off + SAMPLE]):
                count += BLOCK
        self._pend = bytearray(data[full:])
        return count


def sample_opaque(s: bytes) -> bool:
    """True if ``s`` (about 128 bytes) looks random: raw, or encoded as base64/base32/hex."""
    if not s.isascii():
        return len(set(s)) >= _BINARY_MIN * len(s) // SAMPLE
    if s.translate(None, _B64_CHARS):
        return False  # spaces or punctuation: text
    flat = s.translate(None, b"\r\n=")
    if not flat.translate(None, _HEX_CHARS):
        data = binascii.unhexlify(flat[:len(flat) & ~1])
        return _random_like(data)
    # base64 of random data mixes cases and digits; word lists and paths do not
    n = len(flat)
    upper, lower = n - len(flat.translate(None, _UPPER)), n - len(flat.translate(None, _LOWER))
    digits = n - len(flat.translate(None, _DIGITS))
    if not flat.translate(None, _B32_CHARS) and digits * 10 >= n:
        try:
            data = base64.b32decode(flat[:len(flat) & ~7])
        except (binascii.Error, ValueError):
            return False
        return _random_like(data)
    if upper * 5 < n or lower * 5 < n or digits * 20 < n:
        return False
    try:
        data = binascii.a2b_base64(flat[:len(flat) & ~3].translate(_URLSAFE))
    except binascii.Error:
        return False
    return _random_like(data)


def _random_like(data: bytes) -> bool:
    """At least 85 % of the distinct byte values that ``len(data)`` random bytes have on average."""
    return len(data) >= 32 and len(set(data)) >= _EXPECTED[min(len(data), SAMPLE)]


_URLSAFE = bytes.maketrans(b"-_", b"+/")
_EXPECTED = [int(0.85 * 256 * (1 - math.exp(-n / 256))) for n in range(SAMPLE + 1)]
