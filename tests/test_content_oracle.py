"""OutputScanner against a reference copy of the original multi-pass scanner: same first hit, any chunking."""

from __future__ import annotations

import base64
import io
import random
import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.patientdata import astm_message, dicom_bare, dicom_p10, hl7_message
from sessions.content import ASTM, DICOM, HEAD_BYTES, HL7, OutputScanner, detect_patient_data

# ------------------------------------------------------------------------------------------------ reference
# The scanner as it was before the single-pass rewrite (commit 8076b17), kept verbatim as the oracle except
# for one deliberate fix: the first byte of the search window counted as a record start (ASTM with
# non-standard delimiters) even when the window began mid-stream; now only the stream's first byte does.

_PUNCT = frozenset(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _delims_ok(buf: bytes, i: int, field: int, lo: int, hi: int, *, eol_ok: bool) -> bool:
    seen: set[int] = set()
    for k in range(i, min(i + hi + 1, len(buf))):
        c = buf[k]
        if c == field or (eol_ok and (c == 0x0D or c == 0x0A)):
            return lo <= len(seen)
        if c not in _PUNCT or c in seen:
            return False
        seen.add(c)
    return False


def _record_start(buf: bytes, j: int, origin: bool) -> bool:
    return (j == 0 and origin) or (j > 0 and (buf[j - 1] in b"\r\n\x02" or (
        48 <= buf[j - 1] <= 55 and buf[j - 2:j - 1] == b"\x02")))


def _b64_needles(sig: bytes) -> list[bytes]:
    out = []
    for align in range(3):
        enc = base64.b64encode(b"\0" * align + sig + b"\0\0")
        first, end = -(-8 * align // 6), 8 * (align + len(sig)) // 6
        out.append(enc[first:end])
    return out


def _hex_needles(sig: bytes) -> tuple[list[bytes], list[bytes]]:
    h = sig.hex().encode()
    pairs = [h[k:k + 2] for k in range(0, len(h), 2)]
    even = b" ".join(b"".join(pairs[k:k + 2]) for k in range(0, len(pairs), 2))
    odd = pairs[0] + b" " + b" ".join(b"".join(pairs[k:k + 2]) for k in range(1, len(pairs), 2))
    return [h], [even, odd, b" ".join(pairs)]


_ENCODED_SIGS = ((DICOM, b"DICM\x02\x00"), (HL7, b"MSH|^~\\&"), (ASTM, b"H|\\^&|"))
_B64 = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _b64_needles(sig)]
_HEX_PLAIN = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _hex_needles(sig)[0]]
_HEX_DUMP = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _hex_needles(sig)[1]]
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
_DUMP_CHARS = b"0123456789abcdefABCDEF :\r\n"
_HEX_LOWER = b"0123456789abcdef\r\n"
_NUL_RUN = b"\0" * 32
_TAIL, _WINDOW, _PROBES, _MIN_STRIDE = 1024, 32, 8, 256


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return 0


def _tar_checksum_ok(header: bytes) -> bool:
    stored = _tar_number(header[148:156])
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:512])


class ReferenceScanner:
    """The original OutputScanner: each signature searched in its own pass over tail + chunk."""

    def __init__(self) -> None:
        self._tail = b""
        self._pos = 0
        self._head = b""
        self._prev_encoded = False

    def feed(self, chunk: bytes) -> str | None:
        if not chunk:
            return None
        hit = None
        if self._pos < HEAD_BYTES:
            self._head += chunk[:HEAD_BYTES - self._pos]
            hit = detect_patient_data(self._head)
        origin = self._pos == len(self._tail)  # the window starts at the stream's first byte (the one fix)
        self._pos += len(chunk)
        window = self._tail + chunk if self._tail else chunk
        self._tail = window[-_TAIL:]
        if hit:
            return hit
        if b"\0" in window:
            if window.find(b"DICM\x02\x00") != -1:
                return DICOM
            hit = self._find_tar(window) if window.find(_NUL_RUN) != -1 else None
            if hit:
                return hit
        hit = self._find_records(window, origin)
        if hit:
            return hit
        return self._find_encoded(window, chunk)

    @staticmethod
    def _find_records(window: bytes, origin: bool) -> str | None:
        j = window.find(b"H|")
        while j != -1:
            if j >= 2 and window[j - 2:j] == b"MS" and _delims_ok(window, j + 2, 0x7C, 3, 5, eol_ok=False):
                return HL7
            if window.startswith(b"\\^&|", j + 2) or (_record_start(window, j, origin) and _delims_ok(
                    window, j + 2, 0x7C, 3, 3, eol_ok=window.startswith(b"\\^&", j + 2))):
                return ASTM
            j = window.find(b"H|", j + 1)
        return None

    @staticmethod
    def _find_tar(window: bytes) -> str | None:
        j = window.find(b"ustar")
        while j != -1:
            start = j - 257
            if start >= 0 and len(window) >= start + 512 and window[start + 156:start + 157] in b"07\0":
                header = window[start:start + 512]
                size = _tar_number(header[124:136])
                data = window[start + 512:start + 512 + min(size, HEAD_BYTES)]
                if size and len(data) == min(size, HEAD_BYTES) and _tar_checksum_ok(header):
                    kind = detect_patient_data(data)
                    if kind:
                        return kind + "/tar"
            j = window.find(b"ustar", j + 1)
        return None

    def _find_encoded(self, window: bytes, chunk: bytes) -> str | None:
        b64 = dump = False
        size = len(chunk)
        stride = max(_MIN_STRIDE, size // _PROBES)
        for k in [*range(0, size, stride), max(size - _WINDOW, 0)]:
            probe = chunk[k:k + _WINDOW]
            if not probe.isascii():
                continue
            rest = probe.translate(None, _B64_CHARS)
            if not rest:
                b64 = b64 or not probe.islower() or not probe.translate(None, _HEX_LOWER)
            elif len(rest) <= _WINDOW // 3 and len(probe.translate(None, _DUMP_CHARS)) <= 2:
                dump = True
        now = b64 or dump
        if prev := self._prev_encoded:
            b64 = dump = True
        self._prev_encoded = now
        if not (now or prev):
            return None
        flat = window.translate(None, b"\r\n")
        if b64:
            for kind, needle in _B64:
                if flat.find(needle) != -1:
                    return kind + "/base64"
        low = flat.lower()
        for kind, needle in (_HEX_PLAIN if b64 else []) + (_HEX_DUMP if dump else []):
            if low.find(needle) != -1:
                return kind + "/hex"
        return None


# ------------------------------------------------------------------------------------------------ streams
def _tar_bytes(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()[:2048]  # header + the member's first bytes; the end-of-archive blocks add nothing


_SIGS = [b"DICM\x02\x00", b"MSH|^~\\&", b"H|\\^&|", b"MSH|^~\\&|LAB|", b"H|\\^&|||"]
_PUNCTS = b"!#$%&*+-./:;=?@^_~\\|"


def _mixed_case(rnd: random.Random, text: bytes) -> bytes:
    return bytes(c ^ 0x20 if 0x61 <= c <= 0x66 and rnd.random() < 0.4 else c for c in text)


def _wrap(rnd: random.Random, text: bytes) -> bytes:
    width = rnd.choice([0, 16, 64, 76, 3])
    if not width:
        return text
    nl = rnd.choice([b"\n", b"\r\n"])
    return nl.join(text[i:i + width] for i in range(0, len(text), width))


def _item(rnd: random.Random) -> bytes:
    """One embedded thing: a signature in some wrapping, or a near miss of one."""
    kind = rnd.randrange(12)
    sig = rnd.choice(_SIGS)
    if kind == 0:  # raw signature, maybe broken
        out = bytearray(sig + rnd.randbytes(rnd.randint(0, 8)))
        if rnd.random() < 0.4:
            out[rnd.randrange(len(sig))] = rnd.randrange(256)
        return bytes(out)
    if kind == 1:  # ASTM header with any delimiters, at a record start or not
        lead = rnd.choice([b"", b"\r", b"\n", b"\x02", b"\x023", b"\x029", b"x", b"\x05\x02"])
        delims = bytes(rnd.sample(_PUNCTS, rnd.randint(2, 4)))
        return lead + b"H|" + delims + rnd.choice([b"|", b"\r", b"\n", b""]) + b"P|1"
    if kind == 2:  # HL7 with any delimiters
        delims = bytes(rnd.choice(_PUNCTS) for _ in range(rnd.randint(2, 6)))
        return b"MSH|" + delims + rnd.choice([b"|", b"\r", b""]) + b"LAB"
    if kind == 3:
        return _tar_bytes(f"m{rnd.randrange(99)}", rnd.choice([dicom_bare(), dicom_bare(explicit=False),
                                                                 b"plain notes\n" * 30]))
    if kind == 4:  # base64 in any alignment, wrapped or not
        enc = base64.b64encode(rnd.randbytes(rnd.randint(0, 5)) + sig + rnd.randbytes(rnd.randint(0, 9)))
        return _wrap(rnd, enc)
    if kind == 5:  # plain hex, any case
        return _wrap(rnd, _mixed_case(rnd, (rnd.randbytes(rnd.randint(0, 3)) + sig).hex().encode()))
    if kind == 6:  # dump-style hex: groups of 2 or 1 bytes, odd/even start, any case
        h = (rnd.randbytes(rnd.randint(0, 3)) + sig + rnd.randbytes(3)).hex()
        step = rnd.choice([2, 4])
        text = " ".join(h[i:i + step] for i in range(rnd.choice([0, 2]), len(h), step)).encode()
        return _wrap(rnd, _mixed_case(rnd, text))
    if kind == 7:
        return rnd.choice([dicom_p10(), hl7_message(), astm_message(), astm_message(framed=True)])[:300]
    if kind == 8:  # base64 of a near miss
        return base64.b64encode(sig[:-1] + bytes([sig[-1] ^ 1]))
    if kind == 9:
        return b"ustar" + bytes(rnd.randint(0, 40)) + b"DICM"
    if kind == 10:
        return b"H|" * rnd.randint(1, 5)
    return bytes(rnd.randint(0, 300))


def _background(rnd: random.Random, size: int) -> bytes:
    kind = rnd.randrange(5)
    if kind == 0:
        return rnd.randbytes(size)
    if kind == 1:  # shell-ish text
        words = [b"ls", b"-la", b"/var/log", b"OK", b"ERROR", b"4d", b"Hello", b"deadbeef", b"|", b"H", b"1234",
                 b"\r\n", b"\n", b"  ", b"MSH", b"ABCDEFGH", b"ustar"]
        return b" ".join(rnd.choice(words) for _ in range(size // 4))[:size]
    if kind == 2:
        return _wrap(rnd, base64.b64encode(rnd.randbytes(size * 3 // 4)))
    if kind == 3:
        return _wrap(rnd, _mixed_case(rnd, " ".join(rnd.randbytes(size // 3).hex(" ").split()).encode()))
    return bytes(rnd.choice(b"\0\0\0 ab|H\r\n") for _ in range(size))


def _stream(rnd: random.Random, size: int, items: int) -> bytes:
    parts = [_background(rnd, rnd.randint(0, size))]
    for _ in range(items):
        parts += [_item(rnd), _background(rnd, rnd.randint(0, size // max(1, items)))]
    return b"".join(parts)


def _chunks(rnd: random.Random, data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, k = [], 0, 0
    while pos < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[pos:pos + n])
        pos, k = pos + n, k + 1
    return out


def _first_hit(scanner: OutputScanner | ReferenceScanner, chunks: list[bytes]) -> tuple[int, str] | None:
    for i, chunk in enumerate(chunks):
        hit = scanner.feed(chunk)
        if hit:
            return i, hit
    return None


# ------------------------------------------------------------------------------------------------ tests
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(0, 4000), st.integers(0, 4),
       st.lists(st.one_of(st.integers(1, 40), st.integers(1, 3000)), min_size=1, max_size=12))
def test_scanner_agrees_with_reference(seed: int, size: int, items: int, sizes: list[int]) -> None:
    rnd = random.Random(seed)
    data = _stream(rnd, size, items)
    chunks = _chunks(rnd, data, sizes)
    expected = _first_hit(ReferenceScanner(), chunks)
    assert _first_hit(OutputScanner(), chunks) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 3))
def test_scanner_agrees_with_reference_byte_by_byte(seed: int, items: int) -> None:
    # keystroke echo: one byte per feed
    rnd = random.Random(seed)
    chunks = _chunks(rnd, _stream(rnd, 600, items), [1])
    assert _first_hit(OutputScanner(), chunks) == _first_hit(ReferenceScanner(), chunks)


def test_scanner_agrees_with_reference_on_large_streams() -> None:
    rnd = random.Random(2026)
    hits = 0
    for _ in range(12):
        data = _stream(rnd, 200_000, rnd.randint(0, 3))
        for sizes in ([32 * 1024], [rnd.randint(1, 70_000) for _ in range(5)]):
            chunks = _chunks(rnd, data, sizes)
            expected = _first_hit(ReferenceScanner(), chunks)
            assert _first_hit(OutputScanner(), chunks) == expected
            hits += expected is not None
    assert hits > 3  # the streams did carry signatures the reference found


def test_reference_window_start_fix() -> None:
    # The one difference from the original algorithm, shown on the scanner: "xH|!#$|" is not an ASTM header
    # (no record start), whichever chunk boundary puts it at the start of the 1 KiB search window.
    data = b"x" * 1500 + b"xH|!#$|" + b"y" * 3000
    for size in (1, 7, 500, 1501):
        chunks = _chunks(random.Random(0), data, [size])
        assert _first_hit(OutputScanner(), chunks) is None
        assert _first_hit(ReferenceScanner(), chunks) is None
    assert _first_hit(OutputScanner(), [b"\nH|!#$|"]) == (0, "ASTM")
    assert _first_hit(OutputScanner(), [b"H|!#$|"]) == (0, "ASTM")


def test_scanner_searches_text_left_while_the_probes_said_plain() -> None:
    # HL7's base64 needle 1TSHxeflwm ends in "lwm": one-byte probes of l, w, m look like words, so
    # nothing is searched until the Z; the search then still covers the needle, as the original did.
    needle = base64.b64encode(b"\0" + b"MSH|^~\\&" + b"\0")[2:12]
    assert needle == b"1TSHxeflwm"
    chunks = [bytes([c]) for c in b"log: " + needle] + [b"Z"]
    assert _first_hit(ReferenceScanner(), chunks) == (len(chunks) - 1, "HL7v2/base64")
    assert _first_hit(OutputScanner(), chunks) == (len(chunks) - 1, "HL7v2/base64")


def test_scanner_keeps_reporting_after_a_finding() -> None:
    scanner, record = OutputScanner(), b"\nMSH|^~\\&|LAB|"
    assert scanner.feed(b"x" * 300) is None
    assert scanner.feed(record) == "HL7v2"
    assert scanner.feed(b"more output") == "HL7v2" and scanner.feed(b"") == "HL7v2"
    assert scanner.position == 300 + len(record) + len(b"more output")
