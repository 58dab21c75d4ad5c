"""Patient-data content sniffing: DICOM/HL7 v2/ASTM signatures in file heads and in byte streams.

Two entry points, both pure and stdlib-only (layer 2):

* :func:`detect_patient_data` looks at the first :data:`HEAD_BYTES` of one file.
* :class:`OutputScanner` watches a whole byte stream (shell/exec output, an SFTP download) chunk by
  chunk and reports the first chunk that carries a signature, raw, inside a tar member, base64 encoded
  (any of the three byte alignments, wrapped or not) or hex dumped.

Both are best effort by design: anything the device can compute (gzip, encryption, a custom encoding)
hides the signatures. They stop the ordinary ways of copying patient data (``cat``, ``tar``,
``base64``, ``xxd``, SFTP ``get``); docs/data-protection.md explains what closes the rest.
"""

from __future__ import annotations

import base64
import re
import struct

from sessions.anchors import Anchors, literal

__all__ = ["HEAD_BYTES", "DICOM", "HL7", "ASTM", "detect_patient_data", "OutputScanner"]

HEAD_BYTES = 256
"""Bytes of a file's head that :func:`detect_patient_data` needs (DICM sits at 128..132)."""

DICOM, HL7, ASTM = "DICOM", "HL7v2", "ASTM"

# Value representations of DICOM PS3.5 §6.2; the long form has a 2-byte pad and a 4-byte length.
_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
                 b"UR US UT UV".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT UV".split())
_TEXT_VRS = frozenset(b"AE AS CS DA DS DT IS LO LT PN SH ST TM UC UR UT".split())
_PRINTABLE = bytes(range(0x20, 0x7F))
_UID_CHARS = b"0123456789.\x00"
# Implicit VR little endian has no VR on the wire; these header tags are checked by value shape instead.
_IMPLICIT_UID_TAGS = frozenset({0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00080016, 0x00080018})
_IMPLICIT_TEXT_TAGS = frozenset({0x00080005, 0x00080008, 0x00080012, 0x00080013, 0x00080020, 0x00080050,
                                 0x00080060, 0x00080070, 0x00080090})
_BOM = b"\xef\xbb\xbf"
_PUNCT = frozenset(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def detect_patient_data(head: bytes) -> str | None:
    """Recognise patient data from a file's first bytes.

    Recognised: DICOM Part 10 (``DICM`` at offset 128, whatever the preamble holds); DICOM without
    preamble (group 0002 or 0008 data elements at offset 0, explicit or implicit VR little endian,
    checked strictly: two ascending, well-formed elements with even lengths and sane values); HL7 v2
    (``MSH|``, ``FHS|`` or ``BHS|`` with valid encoding characters, optionally after a BOM or the
    MLLP start byte 0x0B); ASTM E1394 (``H`` + four delimiters such as ``H|\\^&``, optionally after
    STX and a frame number).

    :param head: the first bytes of the file; :data:`HEAD_BYTES` are enough, fewer are accepted
    :return: ``"DICOM"``, ``"HL7v2"``, ``"ASTM"`` or None
    """
    if head[128:132] == b"DICM":
        return DICOM
    if head[:2] in (b"\x02\x00", b"\x08\x00") and _bare_dicom(head):
        return DICOM
    return _text_record(head, 0)


def _bare_dicom(head: bytes) -> bool:
    """True if ``head`` starts with DICOM data elements and no preamble (see detect_patient_data)."""
    group, elem = struct.unpack_from("<HH", head, 0) if len(head) >= 4 else (0, 0xFFFF)
    if group not in (0x0002, 0x0008) or elem > 0x0020:
        return False
    explicit = head[4:6] in _VRS
    pos, last, count, verified = 0, -1, 0, False
    while count < 3 and pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        tag = group << 16 | elem
        if tag <= last or (count == 0 and group not in (0x0002, 0x0008)):
            return False
        if explicit:
            vr = head[pos + 4:pos + 6]
            if vr not in _VRS:
                return False
            if vr in _LONG_VRS:
                if pos + 12 > len(head) or head[pos + 6:pos + 8] != b"\0\0":
                    return count >= 2 and verified
                (length,), start = struct.unpack_from("<I", head, pos + 8), pos + 12
            else:
                (length,), start = struct.unpack_from("<H", head, pos + 6), pos + 8
        else:
            vr = None
            (length,), start = struct.unpack_from("<I", head, pos + 4), pos + 8
        if length % 2 or length > 4096:
            return False
        value = head[start:start + length]
        if len(value) == length:  # judge values that are fully inside the head
            ok = _value_ok(tag, vr, value)
            if ok is False:
                return False
            verified = verified or ok is True
        count, last, pos = count + 1, tag, start + length
    return count >= 2 and verified


def _value_ok(tag: int, vr: bytes | None, value: bytes) -> bool | None:
    """True: value has the expected shape; False: it cannot be DICOM; None: nothing to check."""
    if not value:
        return None
    if vr == b"UI" or (vr is None and tag in _IMPLICIT_UID_TAGS):
        return not value.translate(None, _UID_CHARS) and value[:1].isdigit()
    if (vr in _TEXT_VRS) or (vr is None and tag in _IMPLICIT_TEXT_TAGS):
        return not value.translate(None, _PRINTABLE + b"\0")
    if tag == 0x00020000 or tag == 0x00080000:  # group length, UL 4
        return len(value) == 4
    return None


def _delims_ok(buf: bytes, i: int, field: int, lo: int, hi: int, *, eol_ok: bool) -> bool:
    """At ``buf[i:]``: ``lo``..``hi`` distinct punctuation bytes other than ``field``, then ``field``
    (or CR/LF when ``eol_ok``: an ASTM header may end right after its delimiters, an MSH segment may not)."""
    seen: set[int] = set()
    for k in range(i, min(i + hi + 1, len(buf))):
        c = buf[k]
        if c == field or (eol_ok and (c == 0x0D or c == 0x0A)):
            return lo <= len(seen)
        if c not in _PUNCT or c in seen:
            return False
        seen.add(c)
    return False


def _text_record(buf: bytes, i: int) -> str | None:
    """HL7 v2 or ASTM header record at ``buf[i:]`` (after optional BOM, MLLP VT, ENQ/STX/frame no.)."""
    if buf.startswith(_BOM, i):
        i += 3
    if buf[i:i + 1] == b"\x0b":
        i += 1
    if buf[i:i + 3] in (b"MSH", b"FHS", b"BHS") and len(buf) > i + 4:
        field = buf[i + 3]
        if field in _PUNCT and _delims_ok(buf, i + 4, field, 3, 5, eol_ok=False):
            return HL7
    if buf[i:i + 1] == b"\x05":
        i += 1
    if buf[i:i + 1] == b"\x02":
        i += 1
        if buf[i:i + 1].isdigit():
            i += 1
    if buf[i:i + 1] == b"H" and len(buf) > i + 2:
        field = buf[i + 1]
        if field in _PUNCT and _delims_ok(buf, i + 2, field, 3, 3, eol_ok=True):
            return ASTM
    return None


def _record_start(buf: bytes, j: int, origin: bool) -> bool:
    """``buf[j]`` starts a line, or follows STX (and a frame number) of ASTM's low-level framing;
    ``buf[0]`` only when ``origin`` says that it is the stream's first byte."""
    if j == 0:
        return origin
    return buf[j - 1] in b"\r\n\x02" or (48 <= buf[j - 1] <= 55 and buf[j - 2:j - 1] == b"\x02")


def _b64_needles(sig: bytes) -> list[bytes]:
    """The base64 characters that depend only on ``sig``, for each of the three byte alignments."""
    out = []
    for align in range(3):
        enc = base64.b64encode(b"\0" * align + sig + b"\0\0")
        first, end = -(-8 * align // 6), 8 * (align + len(sig)) // 6
        out.append(enc[first:end])
    return out


def _hex_needles(sig: bytes) -> tuple[list[bytes], list[bytes]]:
    """(plain hex, dump-style hex) renderings of ``sig``: ``xxd -p``; ``xxd`` groups (both byte
    alignments) and ``od -t x1`` / ``hexdump -C`` spaced bytes. Lower case; callers lower() the input."""
    h = sig.hex().encode()
    pairs = [h[k:k + 2] for k in range(0, len(h), 2)]
    even = b" ".join(b"".join(pairs[k:k + 2]) for k in range(0, len(pairs), 2))
    odd = pairs[0] + b" " + b" ".join(b"".join(pairs[k:k + 2]) for k in range(1, len(pairs), 2))
    return [h], [even, odd, b" ".join(pairs)]


def _pattern(text: bytes, fold: bool) -> bytes:
    """Regex source matching ``text`` literally; with ``fold``, ``a``-``f`` match either case (hex digits)."""
    return b"".join(b"[%c%c]" % (c, c - 32) if fold and 0x61 <= c <= 0x66 else re.escape(bytes([c])) for c in text)


def _anchored(needles: list[bytes], anchors: tuple[bytes, ...], *, fold: bool = False) -> list[re.Pattern[bytes]]:
    """Regexes that together match exactly where one of ``needles`` occurs, one per anchor.

    Each regex starts with its anchor literal, so ``re`` skips through the text to that literal in C;
    an alternation whose branches start with different bytes would instead be tried at every byte. A
    needle is verified around its anchor by a lookbehind. Anchors must not contain letters when ``fold``.
    """
    groups: dict[bytes, list[bytes]] = {a: [] for a in anchors}
    for needle in needles:
        anchor = next(a for a in anchors if a in needle)
        rest = needle[needle.index(anchor) + len(anchor):]
        groups[anchor].append(_pattern(rest, fold) + b"(?<=" + _pattern(needle, fold) + b")")
    return [re.compile(re.escape(a) + b"(?:" + b"|".join(alts) + b")") for a, alts in groups.items() if alts]


# Base64 and hex forms use the standard delimiter spellings; raw streams accept any delimiters.
_ENCODED_SIGS = ((DICOM, b"DICM\x02\x00"), (HL7, b"MSH|^~\\&"), (ASTM, b"H|\\^&|"))
_B64 = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _b64_needles(sig)]
_HEX_PLAIN = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _hex_needles(sig)[0]]
_HEX_DUMP = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _hex_needles(sig)[1]]
# Every base64 needle holds one of A, X, x; every hex needle 44 (DICOM) or 48 (ASTM, and HL7's MSH|).
_B64_RES = _anchored([n for _, n in _B64], (b"A", b"X", b"x"))
_HEX_ANCHORS = (b"44", b"48")
_PLAIN_RES = _anchored([n for _, n in _HEX_PLAIN], _HEX_ANCHORS, fold=True)
_DUMP_RES = _anchored([n for _, n in _HEX_DUMP], _HEX_ANCHORS, fold=True)
_HEX_RES = _anchored([n for _, n in _HEX_PLAIN + _HEX_DUMP], _HEX_ANCHORS, fold=True)
# the bytes that end a needle (either case for hex): a needle ends in new text only if one of them is there
_NEEDLE_END_RE = re.compile(b"[" + re.escape(bytes(sorted({n[-1] for _, n in _B64} | {
    c for _, n in _HEX_PLAIN + _HEX_DUMP for c in n[-1:] + n[-1:].upper()}))) + b"]")
_QUICK = 64       # new encoded text up to this long gets that check first
_KEEP = max(len(n) for _, n in _B64 + _HEX_PLAIN + _HEX_DUMP) - 1  # encoded text that a needle may share with
# the previous search
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
_DUMP_CHARS = b"0123456789abcdefABCDEF :\r\n"
_HEX_LOWER = b"0123456789abcdef\r\n"
# A probe is all base64 characters (group b64), or ASCII with at most two bytes outside the dump alphabet;
# one re call per probe, which fails within a few bytes on text and binary data.
_PROBE_RE = re.compile(rb"(?P<b64>[A-Za-z0-9+/=\r\n]*+\Z)|[0-9a-fA-F :\r\n]*+(?:[^0-9a-fA-F :\r\n\x80-\xff]"
                       rb"[0-9a-fA-F :\r\n]*+){0,2}+\Z")
_DICM_RE = re.compile(re.escape(b"DICM\x02\x00"))
# Binary windows (random data, firmware, compressed files read over SFTP): one Hyperscan pass for both literal
# searches below (sessions/anchors.py); each then runs only where its literal occurs. Text keeps the memchr gates.
_BINARY_ANCHORS = Anchors({"dicm": literal(b"DICM\x02\x00"), "record": literal(b"H|")}, min_size=4096)
_RECORD_RE = re.compile(rb"H\|")
_USTAR_RE = re.compile(rb"ustar")
_NUL_RUN = b"\0" * 32
_TAIL = 1024      # bytes of the previous chunk kept: covers split signatures and tar headers
_RECORD_BACK = 16 # an H| this far before the new bytes may still be completed by them (HL7 needs 8)
_TAR_BACK = 520   # a ustar magic needs 511 more bytes: the rest of its header and the member's head
_WINDOW = 32      # encoded-data probe width ...
_PROBES = 8       # ... about this many per chunk ...
_MIN_STRIDE = 256 # ... but at least this far apart


class OutputScanner:
    """Streaming detector of patient data in a byte stream; feed it every chunk in order.

    Each chunk is searched together with the last 1 KiB of the stream before it (the window), so
    signatures split across chunks are found:

    * raw: ``DICM\\x02\\x00`` anywhere (DICOM Part 10 meta header); ``H|`` anchors verified as HL7 v2
      ``MSH|`` + encoding characters, or as an ASTM header (``H|\\^&|`` anywhere, other delimiters at
      a record start); the stream's own first bytes through :func:`detect_patient_data`;
    * tar: when the window holds a 32-NUL run, every ``ustar`` magic whose 512-byte header checksum is
      valid; a regular member's first bytes go through :func:`detect_patient_data` (so DICOM without
      preamble is caught there too);
    * encoded: only when one of about eight 32-byte probes of the chunk (at least 256 bytes apart,
      plus its last 32 bytes), or of the previous chunk, looks like base64 or a hex dump, the window
      with line breaks removed is searched for the base64 forms of the three signatures in all three
      alignments and for their ``xxd -p``, ``xxd``, ``od -t x1`` and ``hexdump -C`` forms (any case).
      So an encoded block shorter than an eighth of its chunk (4 KiB in a full 32 KiB SSH packet)
      mixed with other output can slip through.

    Once something is found, every later feed reports it again. Not detected: compressed or encrypted
    data, DICOM without preamble in the middle of raw output, base64 of files whose signature lies
    beyond a line break that splits a hex-dump line.

    Cost: what an earlier window already settled is not searched again, so a one-byte feed (keystroke
    echo) looks at a few dozen bytes, and encoded text only when a byte that can end a needle arrived.
    Every search is one C-level pass that skips to a literal anchor: ``DICM\\x02\\x00`` only when the
    window has a NUL, ``H|`` only when it has a ``|`` (memchr first), base64 needles by ``A``/``X``/``x``
    and hex by ``44``/``48`` (re with lookbehinds); Python looks only at the rare anchor hits. So random
    data costs two passes, text mostly two memchr calls and the probes. bench/content_throughput.py
    measures it.
    """

    def __init__(self) -> None:
        self._tail = b""
        self._pos = 0          # stream bytes consumed so far
        self._head = b""       # the stream's first HEAD_BYTES
        self._prev_encoded = False  # the previous chunk looked encoded
        self._found: str | None = None
        # stream offsets up to which the gated searches (tar, base64 + plain hex, hex dumps) have run
        self._tar_done = self._b64_done = self._dump_done = 0

    @property
    def position(self) -> int:
        """Number of bytes fed so far."""
        return self._pos

    def feed(self, chunk: bytes) -> str | None:
        """Scan the next chunk of the stream.

        :param chunk: the next bytes, in stream order
        :return: None, or what was found: ``"DICOM"``, ``"HL7v2"`` or ``"ASTM"``, with ``"/tar"``,
            ``"/base64"`` or ``"/hex"`` appended when it was found inside that wrapping; after a
            finding, the same finding for every later chunk
        """
        if self._found or not chunk:
            self._pos += len(chunk)
            return self._found
        hit = None
        if self._pos < HEAD_BYTES:
            self._head += chunk[:HEAD_BYTES - self._pos]
            hit = detect_patient_data(self._head)
        old = len(self._tail)          # window[:old] was searched with the previous chunk
        origin = self._pos - old       # stream offset of window[0]
        window = self._tail + chunk if old else chunk
        self._pos += len(chunk)
        self._tail = window[-_TAIL:]
        since = old - _RECORD_BACK if old > _RECORD_BACK else 0
        seen = _BINARY_ANCHORS.all
        if not hit and window.find(b"\0") != -1:  # DICOM meta and tar headers have NULs; most text has none
            seen = _BINARY_ANCHORS.present(window, min(since, max(old - 5, 0)))
            hit = self._find_binary(window, old, origin, "dicm" in seen)
        if not hit and "record" in seen and window.find(b"|", since) != -1:  # memchr: text seldom has a |
            record = _RECORD_RE.search(window, since)
            hit = _find_records(window, record, origin == 0) if record else None
        self._found = hit = hit or self._find_encoded(window, chunk, origin)
        return hit

    def _find_binary(self, window: bytes, old: int, origin: int, dicm: bool) -> str | None:
        if dicm and _DICM_RE.search(window, max(old - 5, 0)):
            return DICOM
        # every regular-file tar header holds a NUL-padded linkname field; random data has no such run
        if window.find(_NUL_RUN) == -1:
            return None
        since = max(self._tar_done - origin - _TAR_BACK, 0)
        self._tar_done = self._pos
        return _find_tar(window, since)

    def _find_encoded(self, window: bytes, chunk: bytes, origin: int) -> str | None:
        b64, dump = _looks_encoded(chunk)
        now = b64 or dump
        if self._prev_encoded:  # the previous chunk was encoded: a needle may straddle into this one
            b64 = dump = True
        self._prev_encoded = now
        if not (b64 or dump):
            return None
        # Search only text that no earlier search covered (plus what a needle may share with it).
        b64_since, dump_since = self._b64_done - origin, self._dump_done - origin
        since = min(b64_since if b64 else len(window), dump_since if dump else len(window))
        if len(window) - since <= _QUICK and not _NEEDLE_END_RE.search(window, since):
            # no byte that could end a needle arrived since the last search (keystroke echo, mostly)
            if b64:
                self._b64_done = self._pos
            if dump:
                self._dump_done = self._pos
            return None
        if b64 and dump and b64_since == dump_since:
            self._b64_done = self._dump_done = self._pos
            text = _flat_since(window, b64_since)
            return (_search(text, _B64_RES, _B64, "/base64")
                    or _search(text, _HEX_RES, _HEX_PLAIN + _HEX_DUMP, "/hex", fold=True))
        hit = None
        if b64:
            self._b64_done = self._pos
            text = _flat_since(window, b64_since)
            hit = (_search(text, _B64_RES, _B64, "/base64")
                   or _search(text, _PLAIN_RES, _HEX_PLAIN, "/hex", fold=True))
        if dump:
            self._dump_done = self._pos
            hit = hit or _search(_flat_since(window, dump_since), _DUMP_RES, _HEX_DUMP, "/hex", fold=True)
        return hit


def _find_records(window: bytes, m: re.Match[bytes] | None, origin: bool) -> str | None:
    """HL7 v2 or ASTM header at the ``H|`` found by ``m`` or a later one (``origin``: window[0] is the
    stream's first byte)."""
    while m:
        j = m.start()
        if j >= 2 and window[j - 2:j] == b"MS" and _delims_ok(window, j + 2, 0x7C, 3, 5, eol_ok=False):
            return HL7
        # ASTM in a stream: the standard header H|\^&| anywhere; other delimiters only at a record
        # start, so that random bytes do not raise alarms (about one per 3 GB otherwise)
        if window.startswith(b"\\^&|", j + 2) or (_record_start(window, j, origin) and _delims_ok(
                window, j + 2, 0x7C, 3, 3, eol_ok=window.startswith(b"\\^&", j + 2))):
            return ASTM
        m = _RECORD_RE.search(window, j + 1)
    return None


def _find_tar(window: bytes, since: int) -> str | None:
    """Patient data in a tar member whose header's ``ustar`` magic lies at or after ``window[since]``."""
    m = _USTAR_RE.search(window, since)
    while m:
        start = m.start() - 257
        if start >= 0 and len(window) >= start + 512 and window[start + 156:start + 157] in b"07\0":
            header = window[start:start + 512]
            size = _tar_number(header[124:136])
            data = window[start + 512:start + 512 + min(size, HEAD_BYTES)]
            if size and len(data) == min(size, HEAD_BYTES) and _tar_checksum_ok(header):
                kind = detect_patient_data(data)
                if kind:
                    return kind + "/tar"
        m = _USTAR_RE.search(window, m.start() + 1)
    return None


def _looks_encoded(chunk: bytes) -> tuple[bool, bool]:
    """(looks like base64 or plain hex, looks like a hex dump), from 32-byte probes of ``chunk``.

    A probe looks base64-like when all its bytes are base64 characters (or CR/LF), except all-lowercase
    ones (paths and words) that are not plain hex; hex-dump-like when it is ASCII with at most 2 bytes
    outside the dump alphabet and at most 10 outside the base64 one.
    """
    return _LOOKS_ENCODED_1[chunk[0]] if len(chunk) == 1 else _probe(chunk)


def _probe(chunk: bytes) -> tuple[bool, bool]:
    b64 = dump = False
    size = len(chunk)
    stride = max(_MIN_STRIDE, size // _PROBES)
    for k in [*range(0, size, stride), size - _WINDOW] if size > _WINDOW else (0,):
        probe = chunk[k:k + _WINDOW]
        m = _PROBE_RE.match(probe) if probe.isascii() else None
        if m is None:
            continue
        if m.lastgroup:
            # all-lowercase runs are paths and words, unless they are plain hex (xxd -p)
            b64 = b64 or not probe.islower() or not probe.translate(None, _HEX_LOWER)
        else:
            dump = dump or len(probe.translate(None, _B64_CHARS)) <= _WINDOW // 3
    return b64, dump


_LOOKS_ENCODED_1 = [_probe(bytes([c])) for c in range(256)]


def _flat_since(window: bytes, since: int) -> bytes:
    """``window[since:]`` without CR/LF, after the last :data:`_KEEP` such bytes before it: all the
    text in which an encoded needle that ends at or after ``window[since]`` can lie."""
    if since <= 0:
        return _strip_eol(window)
    pre = _strip_eol(window[max(since - 4 * _KEEP, 0):since])
    if len(pre) < _KEEP and since > 4 * _KEEP:  # mostly line breaks: take all of it
        pre = _strip_eol(window[:since])
    return pre[-_KEEP:] + _strip_eol(window[since:])


def _strip_eol(text: bytes) -> bytes:
    return text.replace(b"\n", b"").replace(b"\r", b"")


def _search(text: bytes, patterns: list[re.Pattern[bytes]], needles: list[tuple[str, bytes]], wrap: str,
            *, fold: bool = False) -> str | None:
    """``kind + wrap`` of the first of ``needles`` in ``text`` (case-insensitive with ``fold``), if
    ``patterns`` (one pass each) see any of them."""
    if not any(p.search(text) for p in patterns):
        return None
    low = text.lower() if fold else text
    return next((kind + wrap for kind, needle in needles if needle in low), None)


def _tar_number(field: bytes) -> int:
    """A tar numeric field: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return 0


def _tar_checksum_ok(header: bytes) -> bool:
    """POSIX header checksum: byte sum with the checksum field read as spaces."""
    stored = _tar_number(header[148:156])
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:512])
