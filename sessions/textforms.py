"""Patient data spelled differently in text: HL7/ASTM in any case or rot13, HL7 without MSH, DICOM JSON/XML, dumps.

Pure functions over a window of output, used by :class:`sessions.decoders.DeepScanner` (which documents
when each runs). Stdlib only (layer 2).
"""

from __future__ import annotations

import re

from sessions.content import ASTM, DICOM, HL7, _delims_ok, _record_start

__all__ = ["text_hit", "dumpish", "dump_hit"]

# ---------------------------------------------------------------------------------------- text variants
_ROT13 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"NOPQRSTUVWXYZABCDEFGHIJKLM")
_HEADERS = frozenset({b"MSH", b"FHS", b"BHS"})
_SEGMENTS = frozenset(b"PID PD1 PV1 PV2 NK1 OBX OBR ORC EVN DG1 AL1 IN1 GT1 MRG SCH TXA RXE RXA SPM NTE".split())
_NAMES3 = sorted(_HEADERS | _SEGMENTS | {n.translate(_ROT13) for n in _HEADERS | _SEGMENTS})
# anchored on the "|" itself (re skips to it in C); only known record names (any case, rot13) behind it,
# so that output full of "x|" costs no Python work per "|"
_SEG_RE = re.compile(rb"\|(?:(?<=[A-Za-z][A-Za-z0-9]{2}\|)(?<=(?<![A-Za-z0-9])(?i:" + b"|".join(_NAMES3)
                     + rb")\|)|(?<=(?<![A-Za-z0-9])[HhPpUuCc]\|))")
_ASTM_SEQ_RE = re.compile(rb"\d{1,4}\|")
_VR_RE = re.compile(rb'"vr"\s*:\s*"[A-Z]{2}"')
_TAGKEY_RE = re.compile(rb'"[0-9A-Fa-f]{8}"\s*:\s*\{\s*')
_XML_TAG_RE = re.compile(rb'tag\s*=\s*["\'][0-9A-Fa-f]{8}["\']')


def _line_fields(buf: bytes, i: int) -> bool:
    """The rest of the line at ``buf[i:]`` has at least three ``|`` and a ``^`` (HL7/ASTM field shapes)."""
    line = buf[i:i + 512]
    for eol in (b"\r", b"\n"):
        k = line.find(eol)
        if k != -1:
            line = line[:k]
    return line.count(b"|") >= 3 and b"^" in line


def _starts(buf: bytes, j: int, origin: bool) -> bool:
    """A record starts at ``buf[j]``: after a line break, STX, or an escaped ``\\r``/``\\n`` (JSON, repr)."""
    return _record_start(buf, j, origin) or buf[j - 2:j] in (b"\\r", b"\\n") and j >= 2


def text_hit(buf: bytes, since: int, origin: bool) -> str | None:
    """HL7/ASTM records in any case or rot13, HL7 segments without MSH, DICOM JSON/XML in ``buf[since:]``."""
    if buf.find(b"|", since) != -1:
        for m in _SEG_RE.finditer(buf, since):
            end = m.end()
            word = buf[end - 2:end - 1] if not buf[end - 3:end - 2].isalnum() else buf[end - 4:end - 1]
            word = word.upper()
            start = end - 1 - len(word)
            for name in (word, word.translate(_ROT13)):
                if name in _HEADERS:
                    if _delims_ok(buf, end, 0x7C, 3, 5, eol_ok=False) or buf.startswith(b"^~\\\\&|", end):
                        return HL7  # the second: inside a JSON string or a Python repr
                elif name == b"H":
                    if buf.startswith(b"\\^&", end) or (
                            _starts(buf, start, origin)
                            and _delims_ok(buf, end, 0x7C, 3, 3, eol_ok=False)):
                        return ASTM
                elif name == b"P":
                    if (_starts(buf, start, origin) and _ASTM_SEQ_RE.match(buf, end)
                            and _line_fields(buf, end)):
                        return ASTM
                elif name in _SEGMENTS and _starts(buf, start, origin) and _line_fields(buf, end):
                    return HL7
    if buf.find(b"{", since) != -1:
        # PS3.18: "00100010": {"vr": "PN", ...}; "vr" comes first in the standard's examples, pydicom and dcmtk
        for m in _TAGKEY_RE.finditer(buf, since):
            if _VR_RE.match(buf, m.end()) or _VR_RE.search(buf, m.end(), m.end() + 160):
                return DICOM
    if buf.find(b"<", since) != -1:
        if buf.find(b"<NativeDicomModel", since) != -1:
            return DICOM
        k = buf.find(b"<DicomAttribute", since)
        while k != -1:
            if _XML_TAG_RE.search(buf, k, k + 160):
                return DICOM
            k = buf.find(b"<DicomAttribute", k + 15)
    return None



# ----------------------------------------------------------------------------------------------- dumps
def _od_c(sig: bytes) -> bytes:
    esc = {0: b"\\0", 7: b"\\a", 8: b"\\b", 9: b"\\t", 10: b"\\n", 11: b"\\v", 12: b"\\f", 13: b"\\r"}
    cells = [(b"   " + bytes([c])) if 0x20 <= c < 0x7F else
             (b"  " + esc[c] if c in esc else b" %03o" % c) for c in sig]
    return b"".join(cells)


_DUMP_SIGS = ((HL7, b"MSH|^~\\&"), (DICOM, b"DICM\x02\x00"), (ASTM, b"H|\\^&"))
_DUMP_NEEDLES = [(kind, form) for kind, sig in _DUMP_SIGS for form in (
    b" ".join(b"%03o" % c for c in sig),                         # od -b
    b", ".join(b"0x%02x" % c for c in sig),                      # xxd -i
    b"".join(b"\\x%02x" % c for c in sig),                        # \x4d\x53
    b"".join(b"%%%02x" % c for c in sig),                         # %4d%53 (URL encoding)
    b" ".join(b"0x%02x" % c for c in sig),
    *(sep.join(b"%02x" % c for c in sig) for sep in (b":", b"-", b",", b", ")))]
_OD_C_NEEDLES = [(kind, _od_c(sig)) for kind, sig in _DUMP_SIGS]
_DUMP_KEEP = max(len(n) for _, n in _DUMP_NEEDLES + _OD_C_NEEDLES)


_DUMP_ALPHABET = b"0123456789abcdefABCDEFxX,:-%\\ \t\r\n"


def _dump_probe(p: bytes) -> bool:
    """A probe of dump text: nearly all hex/octal digits and separators, or od -c's 4-wide cells."""
    return len(p) >= 24 and (len(p.translate(None, _DUMP_ALPHABET)) * 16 <= len(p) or p.count(b"   ") * 8 >= len(p))


def dumpish(chunk: bytes) -> bool:
    """True if a probe of ``chunk`` looks like a dump (so :func:`dump_hit` is worth running)."""
    size = len(chunk)
    if size <= 192:  # overlapping probes: a dump line may follow a prompt in the same small chunk
        return any(_dump_probe(chunk[k:k + 96]) for k in range(0, max(size - 48, 1), 48))
    stride = min(4096, max(96, size // 8))  # at least eight probes: a short dump may sit in the middle
    return any(_dump_probe(chunk[k:k + 96]) for k in (*range(0, size - 96, stride), size - 96))


def dump_hit(window: bytes, since: int) -> str | None:
    """A dump form of a signature in ``window`` ending at or after ``window[since]``: ``KIND/dump``."""
    text = window[max(0, since - 3 * _DUMP_KEEP):]  # a needle may span a line break and its indentation
    text = text.replace(b"\n", b"").replace(b"\r", b"") if b"\n" in text else text
    low = text.lower()
    bare = low.translate(None, b" \t")
    for kind, needle in _DUMP_NEEDLES:
        if needle in low or needle.translate(None, b" ") in bare:
            return kind + "/dump"
    for kind, needle in _OD_C_NEEDLES:
        if needle in text:
            return kind + "/dump"
    return None
