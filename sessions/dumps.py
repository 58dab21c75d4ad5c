"""Numeric dumps decoded back into bytes: whatever radix, grouping or layout, the bytes are scanned.

``od``, ``xxd``, ``hexdump``, ``basenc --base2msbf``, a Python ``list(data)`` or a Perl ``join(",", map
{ord} ...)`` print a file as numbers. Matching the signatures' dump forms (sessions/textforms.py) finds only
the spellings somebody listed; this reads the numbers back instead. Each line of a dump is split into
tokens after an optional offset column (``0000020``, ``00000010:``) and before a text column (``|MSH|^~|``
or xxd's two spaces), and the longest run of tokens of one shape is decoded:

* 2 hex digits (``od -t x1``, ``hexdump -C``, ``xxd -i``'s ``0x4d``, ``\\x4d``): bytes;
* 4 hex digits (``xxd``, ``od -x``): 16-bit words, read both big- and little-endian;
* 8 hex digits (``od -t x4``, ``xxd -e``): 32-bit words, both byte orders;
* 8 binary digits (``xxd -b``) or a run of binary digits whose length is a multiple of 8 (``basenc
  --base2msbf``/``--base2lsbf``): bytes, both bit orders;
* 3 octal digits with leading zeros (``od -b``): bytes; 6 octal digits (``od -o``): little-endian words;
* decimal numbers 0..255 (``od -t u1``/``d1`` with negatives, lists from any language): bytes;
  5-digit decimal 0..65535 (``od -t u2``/``d2``): little-endian words.

Each shape keeps its own byte stream across lines, fed to a nested scanner, so a signature split over
lines, at any offset, or a compressed stream inside the dump is found. Pure, stdlib-only (layer 2).
"""

from __future__ import annotations

import binascii
import re
from typing import Any, Callable

__all__ = ["DumpReader", "dump_lines", "unescape", "escaped"]

_OFFSET = re.compile(rb"[ \t]*(?:0x)?[0-9A-Fa-f]{4,16}:?(?=[ \t])")
_OFFSET_LINE = re.compile(rb"(?m)^(?:[0-9a-f]{8}: |[0-7]{7} |[0-9a-f]{8}  )[0-9a-f]")
_UU_LINE = re.compile(rb"[!-M][ -`]{1,61}")
_SEP = re.compile(rb"[\s,;\[\]{}()]+")
_LINE_MAX = 1 << 16   # a "line" longer than this is cut at its last separator and decoded
_TOKENS_MAX = 1 << 14  # tokens decoded per line at most (the rest of a huge line waits for the next cut)

# A run of tokens of one shape at the start of a line's data (C-level matching; decoding in bulk).
_RUN_HEX2 = re.compile(rb"(?:(?:0x|\\x)?[0-9A-Fa-f]{2}(?:[\s,]+|$))+")
_RUN_HEX4 = re.compile(rb"(?:(?:0x)?[0-9A-Fa-f]{4}(?:[\s,]+|$))+")
_RUN_HEX8 = re.compile(rb"(?:(?:0x)?[0-9A-Fa-f]{8}(?:[\s,]+|$))+")
_RUN_BIN = re.compile(rb"(?:(?:[01]{8})+(?:[\s,]+|$))+")
_RUN_OCT3 = re.compile(rb"(?:[0-3][0-7]{2}(?:[\s,]+|$))+")
_RUN_OCT6 = re.compile(rb"(?:[01][0-7]{5}(?:[\s,]+|$))+")
_RUN_DEC = re.compile(rb"(?:-?\d{1,3}(?:[\s,;]+|$))+")
_RUN_DEC5 = re.compile(rb"(?:-?\d{1,5}(?:[\s,;]+|$))+")
_DROP = bytes.maketrans(b"", b"")
_NOT_HEX = b" \t\r\n,xX\\"
_NUM = re.compile(rb"-?\d+")
_OCT_TOK = re.compile(rb"[0-7]+")


def _swap16(data: bytes) -> bytes:
    out = bytearray(len(data) - len(data) % 2)
    out[0::2], out[1::2] = data[1:len(out):2], data[0:len(out):2]
    return bytes(out)


def _swap32(data: bytes) -> bytes:
    n = len(data) - len(data) % 4
    out = bytearray(n)
    for k in range(4):
        out[k::4] = data[3 - k:n:4]
    return bytes(out)


def _bits(token: bytes, lsb: bool) -> bytes:
    n = len(token) - len(token) % 8
    if not n:
        return b""
    if lsb:
        return bytes(int(token[k:k + 8][::-1], 2) for k in range(0, n, 8))
    return int(token[:n], 2).to_bytes(n // 8, "big")


def _hex(run: bytes) -> bytes:
    text = run.replace(b"0x", b"").replace(b"0X", b"").translate(_DROP, _NOT_HEX)
    return bytes.fromhex(text.decode("ascii")) if len(text) % 2 == 0 else b""


def _decode(body: bytes) -> list[tuple[str, bytes]]:
    """Candidate decodings of one line's data: (shape, bytes) for each shape its leading tokens fit."""
    out: list[tuple[str, bytes]] = []
    m = _RUN_BIN.match(body)
    if m and m.end() >= 16:
        bits = m.group().translate(_DROP, b" \t\r\n,")
        return [("bin", _bits(bits, False)), ("bin-lsb", _bits(bits, True))]
    m = _RUN_HEX2.match(body)
    if m and m.end() >= 11:
        out.append(("hex2", _hex(m.group())))
    m = _RUN_HEX4.match(body)
    if m and m.end() >= 9:
        data = _hex(m.group())
        out += [("hex4-be", data), ("hex4-le", _swap16(data))]
    m = _RUN_HEX8.match(body)
    if m and m.end() >= 17:
        data = _hex(m.group())
        out += [("hex8-be", data), ("hex8-le", _swap32(data))]
    m = _RUN_OCT3.match(body)
    if m and m.end() >= 15 and body[3:4] in (b" ", b"\t", b","):
        out.append(("oct3", bytes(int(t, 8) & 0xFF for t in _OCT_TOK.findall(m.group()))))
    m = _RUN_OCT6.match(body)
    if m and m.end() >= 13:
        words = [int(t, 8) for t in _OCT_TOK.findall(m.group())]
        out.append(("oct6", b"".join(w.to_bytes(2, "little") for w in words if w <= 0xFFFF)))
    m = _RUN_DEC.match(body)
    if m and m.end() >= 8:
        values = list(map(int, _NUM.findall(m.group())))
        if len(values) >= 4 and max(values) <= 255 and min(values) >= -128:
            out.append(("dec", bytes(v & 0xFF for v in values)))
    m = _RUN_DEC5.match(body)
    if m and m.end() >= 10:
        values = list(map(int, _NUM.findall(m.group())))
        if len(values) >= 2 and max(values) > 255 and max(values) <= 65535 and min(values) >= -32768:
            out.append(("dec5", b"".join((v & 0xFFFF).to_bytes(2, "little") for v in values)))
    return out


_OD_A_NAMES = (b"nul soh stx etx eot enq ack bel bs ht nl vt ff cr so si dle dc1 dc2 dc3 dc4 nak syn etb can em sub "
               b"esc fs gs rs us sp").split()
_OD_A = {name: i for i, name in enumerate(_OD_A_NAMES)} | {b"sp": 0x20, b"del": 0x7F}
_OD_C_CELL = re.compile(rb"   ([^ ])|  \\([0abtnvfr])| ([0-7]{3})|(    )| ( ?[a-z][a-z0-9]{1,2})")
_OD_C_LINE = re.compile(rb"(?:   [^ ]|  \\[0abtnvfr]| [0-7]{3}|    | (?: [a-z][a-z0-9]|[a-z][a-z0-9]{2}))+")
_OD_C_ESC = {b"0": 0, b"a": 7, b"b": 8, b"t": 9, b"n": 10, b"v": 11, b"f": 12, b"r": 13}


def _od_c(body: bytes) -> bytes | None:
    """``od -c`` cells (4 wide: a character, a backslash escape, or 3 octal digits) back into bytes."""
    if len(body) < 16 or len(body) % 4 or body[0::4].strip(b" ") or not _OD_C_LINE.fullmatch(body):
        return None  # (every od -c/-a cell starts with a blank: a cheap test before the expression)
    out = bytearray()
    for m in _OD_C_CELL.finditer(body):
        char, esc, octal, blank, name = m.groups()
        if name is not None:  # od -a: named characters (nul, bs, nl, sp, del ...)
            code = _OD_A.get(name.strip())
            if code is None:
                return None
            out.append(code)
        elif char is not None:
            out += char
        elif esc is not None:
            out.append(_OD_C_ESC[esc])
        elif octal is not None:
            out.append(int(octal, 8) & 0xFF)
        else:
            out.append(0x20)
    return bytes(out)


_UU_START = re.compile(rb"(?m)^M[ -`]{60}$")
# The same two shapes at a line start, searched as "\n" + shape (re skips to each "\n" in C; "(?m)^" makes it
# try every position: 5x slower) plus a match at the chunk's first byte.
_OFFSET_SHAPE = re.compile(_OFFSET_LINE.pattern[len(rb"(?m)^"):])
_OFFSET_NL = re.compile(rb"\n" + _OFFSET_SHAPE.pattern)
_UU_SHAPE = re.compile(rb"(?m)" + _UU_START.pattern[len(rb"(?m)^"):])
_UU_NL = re.compile(rb"(?m)\n" + _UU_START.pattern[len(rb"(?m)^"):])


def dump_lines(chunk: bytes) -> bool:
    """Lines that start like ``xxd``/``od``/``hexdump`` lines (whose text column can be anything), or full
    uuencoded lines, in the first 4 KiB: the probes of sessions/textforms.py miss these, the reader must see
    them. (The same answer as ``_OFFSET_LINE``/``_UU_START.search(chunk, 0, 4096)``, found faster.)"""
    return (_OFFSET_SHAPE.match(chunk, 0, 4096) is not None or _OFFSET_NL.search(chunk, 0, 4096) is not None
            or _UU_SHAPE.match(chunk, 0, 4096) is not None or _UU_NL.search(chunk, 0, 4096) is not None)


class DumpReader:
    """Feed output; decoded dump bytes go to ``make_scanner()`` scanners, one per shape (batched per feed);
    ``feed`` returns the first finding (``KIND/.../dump``)."""

    def __init__(self, make_scanner: Callable[[], Any]) -> None:
        self._make = make_scanner
        self._scanners: dict[str, Any] = {}
        self._pending: dict[str, bytearray] = {}
        self._buf = b""
        self._bits = b""  # binary digits of lines wrapped mid-byte (basenc --base2msbf wraps at 76)
        self._found: str | None = None
        self.decoded = 0

    def feed(self, chunk: bytes) -> str | None:
        if self._found:
            return self._found
        buf = self._buf + chunk if self._buf else chunk
        cut = buf.rfind(b"\n") + 1
        if not cut and len(buf) > _LINE_MAX:
            m = None
            for m in _SEP.finditer(buf, len(buf) - 64):
                pass
            cut = m.end() if m else len(buf)
        lines, self._buf = buf[:cut], buf[cut:]
        if len(self._buf) > _LINE_MAX:
            self._buf = self._buf[-_LINE_MAX:]
        for line in lines.split(b"\n"):
            self._line(line)
        self._found = self._drain()
        return self._found

    def flush(self) -> str | None:
        """Decode a last line that has no line break yet (an interactive prompt follows a dump)."""
        if self._found or not self._buf:
            return self._found
        line, self._buf = self._buf, b""
        self._line(line)
        self._found = self._drain()
        return self._found

    def _line(self, line: bytes) -> None:
        try:
            self._decode_line(line)
        except (ValueError, OverflowError):  # a shape the regexes let through but the decoder refuses: skip it
            pass

    def _decode_line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if len(line) < 8:
            return
        if len(line) >= 32 and line.strip(b"01") == b"":  # a wrapped run of binary digits
            bits = self._bits + line
            whole = len(bits) - len(bits) % 8
            self._bits = bits[whole:]
            self._add("bits", _bits(bits[:whole], False))
            self._add("bits-lsb", _bits(bits[:whole], True))
            return
        if line[:1] == b"M" and len(line) == 61 and _UU_LINE.fullmatch(line):  # uuencode's full lines
            try:
                self._add("uu", binascii.a2b_uu(line))
                return
            except binascii.Error:
                pass
        m = _OFFSET.match(line)
        chars = _od_c(line[m.end():] if m else line)  # od -c: columns matter, so before any stripping
        if chars:
            self._add("od-c", chars)
            return
        if m:  # an offset column: ends with ':' or is wider than the data tokens after it (od, hexdump)
            nxt = _SEP.split(line[m.end():].lstrip(), 1)[0]
            if not (m.group().endswith(b":") or len(m.group().strip()) != len(nxt)):
                m = None
        body = line[m.end():].lstrip() if m else line.lstrip(b" \t[({")
        bar = body.find(b"|")  # hexdump -C's text column
        if bar != -1:
            body = body[:bar]
        for shape, data in _decode(body.replace(b"\\x", b" \\x").lstrip() if b"\\x" in body else body):
            self._add(shape, data)

    def _add(self, shape: str, data: bytes) -> None:
        if not data:
            return
        pending = self._pending.get(shape)
        if pending is None:
            if len(self._pending) >= 16:
                return
            pending = self._pending[shape] = bytearray()
        pending += data

    def _drain(self) -> str | None:
        for shape, data in self._pending.items():
            if not data:
                continue
            scanner = self._scanners.get(shape)
            if scanner is None:
                scanner = self._scanners[shape] = self._make()
            self.decoded += len(data)
            hit = scanner.feed(bytes(data))
            data.clear()
            if hit:
                return f"{hit}/dump"
        return None


# ------------------------------------------------------------------------------- escaped binary as text
_ESC = re.compile(rb"\\x([0-9A-Fa-f]{2})|\\([0-7]{1,3})|\\([abtnvfr\\'\"])|M-\^(.)|M-(.)|\^(.)|\$(?=\n)")
_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\t\r\n"
_ESC_CHAR = {b"a": 7, b"b": 8, b"t": 9, b"n": 10, b"v": 11, b"f": 12, b"r": 13, b"\\": 92, b"'": 39, b'"': 34}


def escaped(chunk: bytes) -> bool:
    """Binary shown as escapes: Python/C ``\\x00``/``\\000`` (repr, ``sed -n l``, ``printf %q``) or caret
    notation (``cat -v``/``cat -A``: ``^@``, ``M-^@``)."""
    if chunk.find(b"\\") == -1 and (chunk.find(b"^") == -1 or chunk.find(b"^@") == -1):  # memchr first
        return False
    probe = chunk[:512]
    if not probe.isascii() or probe.translate(None, _PRINTABLE):  # escapes are printable text; binary is not
        return False
    return (chunk.count(b"\\x") + chunk.count(b"\\0") + chunk.count(b"\\r") >= 4) or chunk.count(b"^@") >= 4


def _one(m: re.Match[bytes]) -> bytes:
    hexa, octal, esc, meta_ctl, meta, ctl = m.groups()
    if hexa is not None:
        return bytes([int(hexa, 16)])
    if octal is not None:
        return bytes([int(octal, 8) & 0xFF])
    if esc is not None:
        return bytes([_ESC_CHAR[esc]])
    if meta_ctl is not None:
        return bytes([0x80 | (0x7F if meta_ctl == b"?" else ord(meta_ctl) & 0x1F)])
    if meta is not None:
        return bytes([0x80 | ord(meta)])
    if ctl is not None:
        return bytes([0x7F if ctl == b"?" else ord(ctl) & 0x1F])
    return b""  # cat -A's "$" before a line break


def unescape(text: bytes) -> bytes:
    """Undo the escapes :func:`escaped` looks for (best effort: a ``^`` of real text becomes a control byte,
    which only this extra view of the output sees)."""
    return _ESC.sub(_one, text)
