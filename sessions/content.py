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
import struct

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


def _record_start(buf: bytes, j: int) -> bool:
    """``buf[j]`` starts a line, or follows STX (and a frame number) of ASTM's low-level framing."""
    return j == 0 or buf[j - 1] in b"\r\n\x02" or (48 <= buf[j - 1] <= 55 and buf[j - 2:j - 1] == b"\x02")


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


# Base64 and hex forms use the standard delimiter spellings; raw streams accept any delimiters.
_ENCODED_SIGS = ((DICOM, b"DICM\x02\x00"), (HL7, b"MSH|^~\\&"), (ASTM, b"H|\\^&|"))
_B64 = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _b64_needles(sig)]
_HEX_PLAIN = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _hex_needles(sig)[0]]
_HEX_DUMP = [(kind, n) for kind, sig in _ENCODED_SIGS for n in _hex_needles(sig)[1]]
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
_DUMP_CHARS = b"0123456789abcdefABCDEF :\r\n"
_HEX_LOWER = b"0123456789abcdef\r\n"
_NUL_RUN = b"\0" * 32
_TAIL = 1024      # bytes of the previous chunk searched again: covers split signatures and tar headers
_WINDOW = 32      # encoded-data probe width ...
_PROBES = 8       # ... about this many per chunk ...
_MIN_STRIDE = 256 # ... but at least this far apart


class OutputScanner:
    """Streaming detector of patient data in a byte stream; feed it every chunk in order.

    Per chunk (plus the last 1 KiB of the previous one, so signatures split across chunks are found):

    * raw: ``DICM\\x02\\x00`` anywhere (DICOM Part 10 meta header); ``H|`` anchors verified as HL7 v2
      ``MSH|`` + encoding characters, or as an ASTM header (``H|\\^&|`` anywhere, other delimiters at
      a record start); the stream's own first bytes through :func:`detect_patient_data`;
    * tar: every ``ustar`` magic whose 512-byte header checksum is valid; a regular member's first
      bytes go through :func:`detect_patient_data` (so DICOM without preamble is caught there too);
    * encoded: only when one of about eight 32-byte probes of the chunk (at least 256 bytes apart,
      plus its last 32 bytes) looks like base64 or a hex dump, the chunk with newlines removed is
      searched for the base64 forms of the three signatures in all three alignments and for their
      ``xxd -p``, ``xxd``, ``od -t x1`` and ``hexdump -C`` forms. So an encoded block shorter than an
      eighth of its chunk (4 KiB in a full 32 KiB SSH packet) mixed with other output can slip through.

    Not detected: compressed or encrypted data, DICOM without preamble in the middle of raw output,
    base64 of files whose signature lies beyond a line break that splits a hex-dump line.
    Cost is a few ``bytes.find`` passes per chunk; bench/content_throughput.py measures it.
    """

    def __init__(self) -> None:
        self._tail = b""
        self._pos = 0          # stream bytes consumed so far
        self._head = b""       # the stream's first HEAD_BYTES
        self._prev_encoded = False  # the previous chunk looked encoded

    @property
    def position(self) -> int:
        """Number of bytes fed so far."""
        return self._pos

    def feed(self, chunk: bytes) -> str | None:
        """Scan the next chunk of the stream.

        :param chunk: the next bytes, in stream order
        :return: None, or what was found: ``"DICOM"``, ``"HL7v2"`` or ``"ASTM"``, with ``"/tar"``,
            ``"/base64"`` or ``"/hex"`` appended when it was found inside that wrapping
        """
        if not chunk:
            return None
        hit = None
        if self._pos < HEAD_BYTES:
            self._head += chunk[:HEAD_BYTES - self._pos]
            hit = detect_patient_data(self._head)
        self._pos += len(chunk)
        window = self._tail + chunk if self._tail else chunk
        self._tail = window[-_TAIL:]
        if hit:
            return hit
        if b"\0" in window:  # DICOM meta headers and tar headers contain NULs; most text has none
            if window.find(b"DICM\x02\x00") != -1:
                return DICOM
            # every regular-file tar header holds a NUL-padded linkname field; random data has no such run
            hit = self._find_tar(window) if window.find(_NUL_RUN) != -1 else None
            if hit:
                return hit
        hit = self._find_records(window)
        if hit:
            return hit
        return self._find_encoded(window, chunk)

    @staticmethod
    def _find_records(window: bytes) -> str | None:
        j = window.find(b"H|")
        while j != -1:
            if j >= 2 and window[j - 2:j] == b"MS" and _delims_ok(window, j + 2, 0x7C, 3, 5, eol_ok=False):
                return HL7
            # ASTM in a stream: the standard header H|\^&| anywhere; other delimiters only at a record
            # start, so that random bytes do not raise alarms (about one per 3 GB otherwise)
            if window.startswith(b"\\^&|", j + 2) or (_record_start(window, j) and _delims_ok(
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
                # all-lowercase runs are paths and words, unless they are plain hex (xxd -p)
                b64 = b64 or not probe.islower() or not probe.translate(None, _HEX_LOWER)
            elif len(rest) <= _WINDOW // 3 and len(probe.translate(None, _DUMP_CHARS)) <= 2:
                dump = True
        now = b64 or dump
        if prev := self._prev_encoded:  # the previous chunk was encoded: a needle may straddle into this one
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
