"""Patient data that OutputScanner cannot read on its own: decoded, decompressed, re-spelled, and what is left bounded.

:class:`DeepScanner` runs :class:`sessions.content.OutputScanner` on a stream and adds, per chunk:

* **text variants** where a ``|`` arrived: HL7 headers (``MSH|``, ``FHS|``, ``BHS|`` with encoding
  characters) in any case and in rot13 (``ZFU|``); HL7 segments without an MSH (``PID|``, ``OBX|``,
  ``PV1|``, ``EVN|`` ... in any case or rot13, at a line start, with at least three more ``|`` and a
  ``^`` on the line); ASTM headers (``H|\\^&``) and patient records (``P|1|``) likewise;
* **UTF-16** (LE or BE): when a sample of the chunk is at least a quarter NUL, the same text checks on the
  window with its NULs removed;
* **DICOM JSON and XML** (PS3.18 ``"00100010": {"vr": "PN"``, PS3.19 ``<NativeDicomModel>`` /
  ``<DicomAttribute tag="00100010" ...>``), where a ``{`` or ``<`` arrived;
* **DICOM without preamble**, little or big endian, explicit or implicit VR, anywhere in the stream: the
  DICOM UID root ``1.2.840.10008.`` behind a group 0002/0008 element header, or a Patient's Name
  element header (0010,0010) PN with a printable value;
* **compression**: gzip, zlib, bzip2 and xz streams are decompressed as they arrive and the output is
  scanned (a nested DeepScanner); at most :data:`MAX_STREAMS` at a time, :data:`STREAM_CAP` bytes each,
  :data:`FEED_CAP` per chunk and the session's ``inflate_limit``, so a zip bomb costs bounded time;
* **encoded runs**: every run of at least 16 base64/base32/hex characters (prefilter: sessions/fastscan.py
  ``run16``, compiled, or one ``translate`` and one ``find``) is decoded and the bytes scanned; lines of one
  width (``base64``, ``base32``, ``xxd -p`` output) are decoded as one stream, so a file's head, DICM at 128 and
  compressed streams inside are seen; runs longer than a line are decoded as they arrive;
* **dumps**: ``od -b``, ``od -c``, ``xxd -i`` and hex with separators (``4d:53``, ``\\x4d``, ``%4D``) of
  the signatures, where a probe of the chunk looks like such a dump; and every numeric dump read back into
  bytes and scanned (sessions/dumps.py: any radix, word size, byte or bit order, offsets and text columns,
  uuencode), up to the budget's ``dump_limit`` per session, after which dump text counts as opaque;
* **odd spellings**: lines reversed (``rev``), characters spaced apart, DICOM printed as text
  (``strings``, ``cat -v``: ``DICM`` shortly before the DICOM UID root);
* the **opaque budget** (sessions/entropy.py): high-entropy output counts against a per-session volume;
  over it, :data:`sessions.entropy.OPAQUE` is reported.

Findings are ``"DICOM"``, ``"HL7v2"``, ``"ASTM"`` with the wrappings appended (``"HL7v2/base64/gzip"``),
or ``"opaque"``. The text variants and dumps live in sessions/textforms.py. Pure and stdlib-only (layer 2);
bench/content_throughput.py measures the cost, bench/content_false_alarms.py the false alarms.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import lzma
import re
import zlib
from typing import Any

from sessions import fastscan
from sessions.anchors import Anchors, literal
from sessions.content import DICOM, OutputScanner
from sessions.entropy import OPAQUE, OpaqueBudget, OpaqueMeter
from sessions.dumps import DumpReader, dump_lines, escaped, unescape
from sessions.textforms import dump_hit, dumpish, text_hit

__all__ = ["DeepScanner", "MAX_DEPTH"]

MAX_DEPTH = 3          # raw -> decoded -> decompressed -> decoded
MAX_STREAMS = 6        # compressed streams decompressed at once per stream
STREAM_CAP = 16 << 20  # decompressed bytes per compressed stream
FEED_CAP = 1 << 20     # decompressed bytes per compressed stream per chunk
_BACK = 256            # text checks look this far back (a record's fields may arrive after its name)
_TAIL = 1024
_PARTIAL_MAX = 4096    # run characters kept for the next chunk at most (more are decoded now)
_DUMP_STICKY = 64 << 10  # after a chunk that looks like a dump, the dump reader sees this much more output

# ------------------------------------------------------------------------------------ odd spellings
_LINES = re.compile(rb"[\r\n]+")
_TEXT_BYTES = bytes(range(0x20, 0x7F)) + b"\t"  # an HL7 line is printable text (binary data is not)
_NAMEISH = re.compile(rb"[A-Za-z]{2,}\^[A-Za-z]{2,}")  # a person-name-like component: FAMILY^GIVEN
_DOUBLED = ((b"H|\\\\^&", "ASTM/escaped"), (b"MSH|^~\\\\&", "HL7v2"))  # repr, sed -n l, JSON
_REVERSED = ((b"&\\~^|HSM", "HL7v2/reversed"), (b"&^\\|H", "ASTM/reversed"))
_SQUEEZE = b" \t\r\n"
_SQUEEZED = ((b"msh|^~\\&", "HL7v2/spaced"), (b"h|\\^&", "ASTM/spaced"), (b"dicm", "DICOM/spaced"))


def _spaced(chunk: bytes) -> bool:
    """Characters spaced apart: in one of the two interleavings, at least three in four are blanks."""
    if (len(chunk) - fastscan.count_blanks(chunk)) * 8 > len(chunk) * 5 + 8:
        return False  # fewer than 3/8 blanks in all: neither half can be 3/4 blanks (one pass, not two slices)
    for half in (chunk[1::2], chunk[0::2]):
        if len(half.translate(None, _SQUEEZE)) * 4 <= len(half):
            return True
    return False


def _blank_spaced(needle: bytes) -> bytes:
    """A pattern for ``needle`` (lower case) with any blanks between its characters, any case: where it is, the
    squeezed window (blanks deleted, lower-cased) holds ``needle``."""
    return rb"[ \t\r\n]*".join(b"(?:%s|%s)" % (literal(bytes([c])), literal(bytes([c]).upper()))
                                  if bytes([c]).isalpha() else literal(bytes([c])) for c in needle)


# What odd_forms can act on in window[since:] (sessions/anchors.py): a squeezed needle, the UID root. Without the
# compiled scans (sessions/fastscan.py), Hyperscan's one pass answers both and the spaced-text density (a translate
# of the chunk) is computed only behind a needle; with them, the blank count comes first (it is cheaper than any
# search) and the UID root is one SIMD find.
_ENGINE_MIN = 4096  # smaller windows: the Python checks cost less than a call into the engine
_ODD_ANCHORS = Anchors({**{needle.decode(): _blank_spaced(needle) for needle, _ in _SQUEEZED},
                        "uid": literal(b"1.2.840.10008.")}, min_size=_ENGINE_MIN)


def odd_forms(window: bytes, since: int, chunk: bytes) -> str | None:
    """Spellings no decoder undoes: lines reversed (``rev``), characters spaced apart (``sed 's/./& /g'``,
    ``fold -w1``), and DICOM shown as text (``strings``, ``cat -v``: DICM shortly before the DICOM UID root)."""
    if len(chunk) < 192:  # a small chunk: judge the shapes on the recent window
        chunk = window[-len(chunk) - 192:]
    if fastscan.native():
        spaced, uid = len(chunk) >= 8 and _spaced(chunk), True
    else:
        seen = _ODD_ANCHORS.present(window, since)
        spaced = len(seen) > ("uid" in seen) and len(chunk) >= 8 and _spaced(chunk)  # a squeezed needle may be there
        uid = "uid" in seen
    if window.find(b"|", since) != -1 and window.find(b"&", since) != -1:  # in every needle (memchr: cheap)
        for needle, what in _REVERSED + _DOUBLED:
            if window.find(needle, since) != -1:
                return what
    if chunk.find(b"^") != -1 and chunk.find(b"|") != -1:  # HL7/ASTM-ish: also read the window backwards
        hit = text_hit(window[::-1], 0, False)  # (rev of \r-separated HL7 puts the PID segment first)
        if hit:
            return hit + "/reversed"
        # HL7 field texture without any segment name in view (the first piece of a reversed or cut message):
        # a line with five or more field separators, an empty field and component separators
        for line in _LINES.split(chunk):
            if (line.count(b"|") >= 5 and line.count(b"^") >= 2 and b"||" in line and len(line) <= 4096
                    and not line.translate(None, _TEXT_BYTES) and _NAMEISH.search(line)
                    and line.count(b"^@") + line.count(b"M-^") < 3):  # cat -v/-A of a binary: NULs, high controls
                return "HL7v2/fields"
    if spaced:
        squeezed = window[since:].translate(None, _SQUEEZE).lower()
        for needle, what in _SQUEEZED:
            k = squeezed.find(needle)
            if k != -1 and (needle != b"dicm" or squeezed.find(b"1.2.840.10008", k, k + 400) != -1):
                return what
    # lines cut short (fold -w 3): rejoin. Every form found there needs a "|", "{" or "<" (text_hit, the needles).
    if len(chunk) >= 24 and (window.find(b"|", since) != -1 or window.find(b"{", since) != -1
                             or window.find(b"<", since) != -1) and chunk.count(b"\n") * 12 >= len(chunk):
        joined = window[since:].replace(b"\n", b"")
        hit = text_hit(joined, 0, False)
        if hit:
            return hit + "/folded"
        for needle, what in _SQUEEZED:
            if needle != b"dicm" and joined.lower().find(needle) != -1:
                return what.split("/")[0] + "/folded"
    k = fastscan.find(window, _UID_ROOT, since) if uid else -1
    while k != -1:
        d = window.rfind(b"DICM", max(0, k - 400), k)
        if d != -1:
            return "DICOM/text"
        k = fastscan.find(window, _UID_ROOT, k + 1)
    return None


# ------------------------------------------------------------------------------------ binary structures
_MAGICS = ((b"\x1f\x8b\x08", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_ZLIB_RE = re.compile(rb"x[\x01\x5e\x9c\xda]")
_BZIP2_RE = re.compile(rb"BZh[1-9]1AY&SY")
_UID_ROOT = b"1.2.840.10008."
# bytes that text (ASCII or UTF-8, with tabs and terminal escapes) does not have; binary data has many
_CONTROL = bytes(0 if c < 0x20 and c not in b"\t\r\n\x1b\x0c" or c == 0x7F else 1 for c in range(256))


def _dicom_element(buf: bytes, s: int) -> bool:
    """A DICOM data element's value starts at ``buf[s]`` (the UID root behind a group 0002/0008 element
    header: explicit VR little or big endian, or implicit VR little endian)."""
    if s < 8:
        return False
    tag = buf[s - 8:s - 4]
    groups = (int.from_bytes(tag[:2], "little"), int.from_bytes(tag[:2], "big"))
    if buf[s - 4:s - 2] == b"UI":  # explicit VR, either byte order
        return 2 in groups or 8 in groups
    length = int.from_bytes(buf[s - 4:s], "little")  # implicit VR little endian
    return int.from_bytes(tag[:2], "little") in (2, 8) and 14 <= length <= 64


class _Inflater:
    """One compressed stream being decompressed into a nested scanner, within the caps."""

    def __init__(self, kind: str, child: "DeepScanner", budget: OpaqueBudget) -> None:
        self.kind, self.child, self.budget = kind, child, budget
        self.out = 0
        self.start = -1
        self.done = False
        self._zlib = kind in ("gzip", "zlib")
        if kind == "gzip":
            # zlib, bz2 or lzma decompressor: they share decompress(data, max_length) but no base class
            self._d: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif kind == "zlib":
            self._d = zlib.decompressobj()
        elif kind == "bzip2":
            self._d = bz2.BZ2Decompressor()
        else:
            self._d = lzma.LZMADecompressor()

    def feed(self, data: bytes) -> str | None:
        d, made, hit = self._d, 0, None
        try:
            while not self.done:
                want = min(64 * 1024, FEED_CAP - made, STREAM_CAP - self.out)
                if want <= 0 or not self.budget.inflate(0):
                    self.done = True  # over a cap: the rest stays uninspected (and counts as opaque)
                    break
                if self._zlib:
                    out = d.decompress(data, want)
                    data = d.unconsumed_tail
                    if d.eof:
                        self.done = True
                else:
                    out = d.decompress(data, want)
                    data = b""
                    if d.eof:  # type: ignore[attr-defined]
                        self.done = True
                made += len(out)
                self.out += len(out)
                self.budget.inflate(len(out))
                if out:
                    hit = self.child.feed(out)
                    if hit:
                        return f"{hit}/{self.kind}"
                if not out and (not data if self._zlib else d.needs_input):  # type: ignore[attr-defined]
                    break
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError):
            self.done = True
        if not self.done:
            self.budget.open_compressed = True
        return None


# ------------------------------------------------------------------------------------------ encoded runs
_RUN_CHARS = fastscan.RUN_CHARS + b"/-_"
_CLASS = bytes(0x61 if c in _RUN_CHARS else 0x20 for c in range(256))
# the prefilter: 16 letters/digits/+ in a row (text has about 4 such words per 32 KiB, base64 one per line);
# fastscan.run16 answers pre.find(_A16, i) without the translate
_PRE, _A16 = fastscan.RUN_TABLE, fastscan.RUN_NEEDLE
_TRAIL_RE = re.compile(rb"[A-Za-z0-9+/_-]*\Z")
# exactly where data.translate(_PRE) holds _A16
_RUN_ANCHORS = Anchors({"run": rb"[A-Za-z0-9+]{16}"}, min_size=_ENGINE_MIN)
_HEX = b"0123456789abcdefABCDEF"
_B32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567abcdefghijklmnopqrstuvwxyz"
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _decode(enc: str, text: bytes) -> bytes:
    """Decode whole groups of ``text`` (caller keeps the rest); b"" when it is not that encoding."""
    try:
        if enc == "base64":
            return binascii.a2b_base64(text.translate(_URLSAFE))
        if enc == "hex":
            return binascii.unhexlify(text)
        return base64.b32decode(text.upper())
    except (binascii.Error, ValueError):
        return b""


def _pad(enc: str, text: bytes) -> bytes:
    """The last, partial group of a run made decodable (base64/base32 padding, odd hex digit dropped)."""
    if enc == "hex":
        return text[:len(text) & ~1]
    if enc == "base64":
        return text[:-1] if len(text) % 4 == 1 else text + b"=" * (-len(text) % 4)
    keep = {0: 0, 1: 0, 2: 2, 3: 2, 4: 4, 5: 5, 6: 5, 7: 7}[len(text) % 8]
    text = text[:len(text) - len(text) % 8 + keep]
    return text + b"=" * (-len(text) % 8)


_GROUP = {"base64": 4, "base32": 8, "hex": 2}


def _encodings(text: bytes) -> list[str]:
    encs = ["base64"]
    if not text.translate(None, _HEX):
        encs.append("hex")
    if not text.translate(None, _B32) and (text.isupper() or text.islower()):
        encs.append("base32")
    return encs


class _Stream:
    """One encoded run decoded as it arrives (all encodings its characters allow) into nested scanners."""

    def __init__(self, depth: int, budget: OpaqueBudget, width: int | None) -> None:
        self.depth, self.budget, self.width = depth, budget, width
        self.next = 0              # where the next line must start (in the current data)
        self.first: bytes | None = None  # the first line, until a second of the same width arrives
        self.dec: dict[str, list] | None = None  # enc -> [rest, scanner]
        self.queue: list[bytes] = []
        self.total = 0             # characters of the first line (a run longer than a chunk)
        self.line_done = 0         # characters of the current line already decoded (a wide line in pieces)
        self.line_start = False    # that line started a line

    def add(self, text: bytes) -> None:
        """Queue ``text``; decoded at the next :meth:`flush` (one decode and scan per chunk, not per line)."""
        self.queue.append(text)

    def flush(self) -> str | None:
        if not self.queue:
            return None
        text = self.queue[0] if len(self.queue) == 1 else b"".join(self.queue)
        self.queue = []
        return self.feed(text)

    def feed(self, text: bytes, short: "_Runs | None" = None) -> str | None:
        """Decode ``text`` (the run's next characters); the first line of a block is also scanned on its own
        through ``short`` at once, so a head in it is found before the second line arrives."""
        if self.dec is None:
            if self.first is None and self.width is not None and self.total == 0:
                self.first = text
                if short is not None:
                    short.single(text)  # scanned with this chunk's other runs, at the end of the feed
                return None
            start = (self.first or b"") + text
            self.first = None
            self.dec = {e: [b"", DeepScanner(self.budget, depth=self.depth + 1)] for e in _encodings(start)}
            text = start
        for enc in list(self.dec):
            rest, scanner = self.dec[enc]
            if enc != "base64" and text.translate(None, _HEX if enc == "hex" else _B32):
                del self.dec[enc]
                continue
            text2 = rest + text
            k = len(text2) - len(text2) % _GROUP[enc]
            self.dec[enc][0] = text2[k:]
            hit = scanner.feed(_decode(enc, text2[:k])) if k else None
            if hit:
                return f"{hit}/{enc}"
        return None

    def close(self, short: "_Runs") -> str | None:
        hit = self.flush()
        if hit:
            return hit
        return None  # a lone first line was scanned on its own when it arrived
        for enc, (rest, scanner) in self.dec.items():
            if rest:
                hit = scanner.feed(_decode(enc, _pad(enc, rest)))
                if hit:
                    return f"{hit}/{enc}"
        return None


class _Classes:
    """Where run characters end, around a few positions of ``data``: translates only the slices it needs
    (text has a few runs per chunk; a base64 stream is one run, translated once)."""

    _STEP = 512

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.full: bytes | None = None

    def _all(self) -> bytes:
        if self.full is None:
            self.full = self.data.translate(_CLASS)
        return self.full

    def find(self, sub: bytes, j: int = 0) -> int:
        """First non-run character at or after ``j`` (``sub`` is always b" "), or -1."""
        if self.full is None:
            piece = self.data[j:j + self._STEP].translate(_CLASS)
            k = piece.find(sub)
            if k != -1:
                return j + k
            if j + self._STEP >= len(self.data):
                return -1
        return self._all().find(sub, j)

    def rfind(self, sub: bytes, lo: int, j: int) -> int:
        """Last non-run character in ``data[lo:j]``, or -1."""
        if self.full is None:
            a = max(lo, j - self._STEP)
            k = self.data[a:j].translate(_CLASS).rfind(sub)
            if k != -1:
                return a + k
            if a == lo:
                return -1
        return self._all().rfind(sub, lo, j)


class _Runs:
    """Finds encoded runs of >= 16 characters in a stream and decodes them (see DeepScanner)."""

    def __init__(self, depth: int, budget: OpaqueBudget) -> None:
        self.depth, self.budget = depth, budget
        self.partial = b""          # run characters at the end of the data, not yet ended
        self.line_start = True      # the next data starts a line
        self.block: _Stream | None = None
        self.short: dict[str, DeepScanner] = {}
        self.singles: dict[str, list[bytes]] = {}

    def single(self, text: bytes) -> None:
        """A run on its own: decoded whole; the runs of one chunk are scanned together (:meth:`flush_singles`)
        by one long-lived scanner per encoding, each run after a line break. Words (lower-case letters only,
        not hex) are skipped: base64 of any data longer than a few bytes has capitals or digits."""
        if text.isalpha() and text.islower() and text.translate(None, _HEX):
            return
        for enc in _encodings(text):
            self.singles.setdefault(enc, []).append(_decode(enc, _pad(enc, text)))

    def flush_singles(self) -> str | None:
        singles, self.singles = self.singles, {}
        for enc, parts in singles.items():
            scanner = self.short.get(enc)
            if scanner is None:
                scanner = self.short[enc] = DeepScanner(self.budget, depth=self.depth + 1)
            hit = scanner.feed(b"\n" + b"\n".join(parts))
            if hit:
                return f"{hit}/{enc}"
        return None

    def feed(self, chunk: bytes) -> str | None:
        data = self.partial + chunk if self.partial else chunk
        pre: bytes | None = None  # None: the compiled run16 answers what pre.find(_A16, i) would
        if fastscan.native():
            none = self.block is None and fastscan.run16(data) == -1
        elif self.block is None and not _RUN_ANCHORS.present(data):
            none = True  # no 16 run characters in a row (one Hyperscan pass instead of the translate and find)
        else:
            pre = data.translate(_PRE)
            none = self.block is None and pre.find(_A16) == -1
        if none:
            # the pattern matches the empty string at the end, so search never returns None
            self._set_partial(data, _TRAIL_RE.search(data, max(0, len(data) - 64)).start())  # type: ignore[union-attr]
            return None
        hit = self._slow(data, _Classes(data), pre)
        return hit or self.flush_singles()

    def _set_partial(self, data: bytes, s: int) -> None:
        self.line_start = s == 0 and self.line_start or (s > 0 and data[s - 1] == 0x0A)
        self.partial = data[s:]

    def _close_block(self) -> str | None:
        block, self.block = self.block, None
        return block.close(self) if block else None

    def _slow(self, data: bytes, t: "_Classes", pre: bytes | None) -> str | None:
        n, i, hit = len(data), 0, None
        block = self.block
        if block is not None and block.width is None and block.next == 0 and block.line_start and block.total >= 16:
            # the whole line came before its line break: lines of its width may follow
            nl = 1 if data[:1] == b"\n" else 2 if data[:2] == b"\r\n" else 0
            if nl:
                block.width, block.next = block.total, nl
        while True:
            block = self.block
            if block is not None and i <= block.next < n and t.find(b" ", block.next) != block.next:
                # the open block's next line, whatever it holds (the prefilter needs 16 letters/digits in a row)
                s = block.next
                e = t.find(b" ", s)
            else:
                j = fastscan.run16(data, i) if pre is None else pre.find(_A16, i)
                if j == -1:
                    break
                s = max(t.rfind(b" ", i, j) + 1, i)
                e = t.find(b" ", j)
            e = n if e == -1 else e
            i = e
            if e == n:  # the run may go on in the next chunk
                if (block is not None and block.next == s and block.width is not None
                        and block.line_done + n - s <= block.width):
                    block.next = 0
                    if n - s <= _PARTIAL_MAX:
                        self._set_partial(data, s)
                        return hit
                    # a wide line arriving in small pieces: decode what came, keep little (no quadratic copying)
                    k = (n - s) - (n - s) % 8
                    block.add(data[s:s + k])
                    block.line_done += k
                    self.partial, self.line_start = data[s + k:], False
                    return hit or block.flush()
                if n - s < 16:
                    if block is not None and block.next != s:
                        hit = hit or self._close_block()
                    elif block is not None:
                        block.next = 0
                    self._set_partial(data, s)
                    return hit
                if block is None or block.next != s or block.width is not None:
                    hit = hit or self._close_block()
                    block = self.block = _Stream(self.depth, self.budget, None)
                    block.line_start = (s == 0 and self.line_start) or (s > 0 and data[s - 1] == 0x0A)
                k = (n - s) - (n - s) % 8
                hit = hit or block.feed(data[s:s + k])
                block.total += k
                block.next = 0
                self.line_start = False
                self.partial = data[s + k:]
                return hit
            starts = (s == 0 and self.line_start) or (s > 0 and data[s - 1] == 0x0A)
            nl = 1 if data[e] == 0x0A else 2 if data[e:e + 2] == b"\r\n" else 0
            full = starts and nl > 0
            if block is not None and block.next == s and block.width is None:
                # a run longer than a chunk ended; if it was a whole line, more lines of its width may follow
                hit = hit or block.feed(data[s:e])
                block.total += e - s
                if nl and block.line_start and block.total >= 16:
                    block.width, block.next = block.total, e + nl
                else:
                    hit = hit or self._close_block()
                continue
            if (block is not None and block.next == s and block.width is not None and nl
                    and (starts or (s == 0 and block.line_done)) and block.line_done + e - s <= block.width):
                block.add(data[s:e])
                line, block.line_done = block.line_done + e - s, 0
                if line < block.width:
                    hit = hit or self._close_block()
                else:
                    block.next = e + nl
                continue
            hit = hit or self._close_block()
            if e - s < 16:
                continue
            if full:
                self.block = _Stream(self.depth, self.budget, e - s)
                self.block.next = e + nl
                hit = hit or self.block.feed(data[s:e], self)
            else:
                self.single(data[s:e])
        # run characters that may grow into a run (the pattern matches the empty string at the end: never None)
        tail = _TRAIL_RE.search(data, max(0, n - 64)).start()  # type: ignore[union-attr]
        if self.block is not None:
            if self.block.next == n or self.block.next == tail:
                self.block.next = 0
                hit = hit or self.block.flush()
            else:
                hit = hit or self._close_block()
        self._set_partial(data, tail)
        return hit


# -------------------------------------------------------------------------------------------- scanner
class DeepScanner:
    """OutputScanner plus the layers of the module doc; feed every chunk of one stream in order."""

    def __init__(self, budget: OpaqueBudget | None = None, *, depth: int = 0) -> None:
        """:param budget: the session's shared budget (opaque bytes, decompressed bytes); None: a private
            one without an opaque limit (tests, SFTP)
        :param depth: nesting level; nested scanners read decoded or decompressed bytes"""
        self._base = OutputScanner()
        self._budget = budget if budget is not None else OpaqueBudget(0)
        self._meter = OpaqueMeter() if depth == 0 and self._budget.limit else None
        self._depth = depth
        self._tail = b""
        self._pos = 0
        self._found: str | None = None
        self._inflaters: list[_Inflater] = []
        self._bin_done = 0
        self._runs = _Runs(depth, self._budget) if depth < MAX_DEPTH else None
        self._dump_prev = False
        self._dumps: DumpReader | None = None
        self._dump_until = -1
        self._reader_at = -1  # stream position up to which the dump reader has been fed
        self._unescaped: DeepScanner | None = None  # binary shown as escapes, read back (see dumps.unescape)
        self._esc_carry = b""
        self._esc_until = -1
        self._esc_at = -1

    @property
    def position(self) -> int:
        """Number of bytes fed so far."""
        return self._pos

    @property
    def budget(self) -> OpaqueBudget:
        return self._budget

    def undecided(self) -> bool:
        """After :meth:`feed`: a compressed stream (at any depth: plain, or inside base64/hex/...) took input from
        this chunk and has not ended, so what was fed may still prove to be patient data when the rest arrives
        (the first line of ``gzip | base64`` decodes to a header and a few compressed bytes). The relays hold
        such output back briefly (sessions/tailhold.py) instead of forwarding it before the verdict."""
        return self._budget.open_compressed

    def feed(self, chunk: bytes) -> str | None:
        """Scan the next chunk; returns what was found (see module doc), then the same for every later chunk."""
        if self._depth == 0:
            self._budget.open_compressed = False
        if self._found or not chunk:
            self._pos += len(chunk)
            return self._found
        hit = self._base.feed(chunk)
        old = len(self._tail)
        origin = self._pos - old
        window = self._tail + chunk if old else chunk
        self._pos += len(chunk)
        self._tail = window[-_TAIL:]
        since = max(old - _BACK, 0)
        if not hit:
            hit = text_hit(window, since, origin == 0)
        if not hit and self._inflaters:
            hit = self._feed_inflaters(chunk)
        if not hit and (chunk.find(b"\0") != -1 if chunk.isascii() else chunk.translate(_CONTROL).find(b"\0") != -1):
            hit = self._binary(window, old, origin)
        if not hit and self._runs is not None:
            hit = self._runs.feed(chunk)
        if not hit and self._depth == 0:
            dump = dumpish(chunk if len(chunk) > 192 else window[-len(chunk) - 96:]) or dump_lines(chunk)
            if dump:
                self._dump_until = self._pos + _DUMP_STICKY
            if dump or self._dump_prev:
                hit = dump_hit(window, old)
            # A dump is read back line by line, so the reader gets every chunk while dumps were seen lately
            # (a small chunk of a dump may not look like one on its own); dump chunks count toward the cap.
            if not hit and (dump or self._pos <= self._dump_until):
                if not dump or self._budget.dump(len(chunk)):
                    piece = chunk
                    if self._dumps is None or self._reader_at < origin + old:  # (re)engaged: from the line start
                        self._dumps = self._dumps or DumpReader(lambda: DeepScanner(self._budget, depth=1))
                        start = window.rfind(b"\n", 0, old) + 1
                        piece = window[start:] if self._reader_at < origin + start else chunk
                    hit = self._dumps.feed(piece)
                    self._reader_at = self._pos
                elif self._budget.add(len(chunk)):  # past the cap: dumps count as opaque
                    hit = OPAQUE
            self._dump_prev = dump
        if not hit and self._depth == 0 and escaped(chunk if len(chunk) > 192 else window[-len(chunk) - 192:]):
            self._esc_until = self._pos + _DUMP_STICKY
        if not hit and self._depth == 0 and self._pos <= self._esc_until:
            # first time: from the window's last line start (a small chunk alone did not show the escapes)
            text = self._esc_carry + chunk if self._unescaped is not None and self._esc_at == origin + old else \
                window[window.rfind(b"\n", 0, max(old - 1, 0)) + 1:]
            self._esc_at = self._pos
            cut = max(len(text) - 8, 0)  # an escape split by the chunk boundary waits for the next chunk
            back = text.rfind(b"\\", cut)
            back = max(back, text.rfind(b"^", cut), text.rfind(b"M-", cut))
            keep = back if back != -1 else len(text)
            self._esc_carry = text[keep:]
            if self._unescaped is None:
                self._unescaped = DeepScanner(self._budget, depth=1)
            found = self._unescaped.feed(unescape(text[:keep]))
            if found:
                hit = found + "/escaped"
        if not hit and self._depth == 0:
            hit = odd_forms(window, since, chunk)
        if not hit and self._meter is not None:
            count = self._meter.feed(chunk)
            if count and self._budget.add(count):
                hit = OPAQUE
        self._found = hit
        return hit

    def flush(self) -> str | None:
        """The stream paused (a prompt after the output): decode a dump's last line that has no line break."""
        if not self._found and self._dumps is not None:
            self._found = self._dumps.flush()
        return self._found

    def _binary(self, window: bytes, old: int, origin: int) -> str | None:
        # UTF-16 text: the text checks on the window without its NULs
        probe = window[-256:]
        if probe.count(b"\0") * 4 >= len(probe) or window[:256].count(b"\0") * 4 >= min(len(window), 256):
            hit = text_hit(window.replace(b"\0", b""), 0, origin == 0)
            if hit:
                return hit + "/utf-16"
        since = max(self._bin_done - origin - 16, 0)
        self._bin_done = self._pos
        k = window.find(_UID_ROOT, since)
        while k != -1:
            if _dicom_element(window, k):
                return DICOM
            k = window.find(_UID_ROOT, k + 1)
        if self._depth >= MAX_DEPTH:
            return None
        starts: list[tuple[int, str]] = []
        for magic, kind in _MAGICS:
            k = window.find(magic, since)
            while k != -1 and len(starts) < 16:
                if kind != "bzip2" or _BZIP2_RE.match(window, k) or len(window) - k < 10:
                    starts.append((k, kind))
                k = window.find(magic, k + 1)
        starts += [(m.start(), "zlib") for m in _ZLIB_RE.finditer(window, since)][:16]
        for k, kind in sorted(starts):
            start = origin + k
            if len(self._inflaters) >= MAX_STREAMS or any(f.start == start for f in self._inflaters):
                continue
            inflater = _Inflater(kind, DeepScanner(self._budget, depth=self._depth + 1), self._budget)
            inflater.start = start
            hit = inflater.feed(window[k:])
            if hit:
                return hit
            if not inflater.done:
                self._inflaters.append(inflater)
        return None

    def _feed_inflaters(self, chunk: bytes) -> str | None:
        hit = None
        for inflater in self._inflaters:
            hit = hit or inflater.feed(chunk)
        self._inflaters = [f for f in self._inflaters if not f.done]
        return hit
