"""What a vendor's output may do to a staff terminal: :class:`TerminalGuard`, a streaming filter for replay and watch."""

from __future__ import annotations

import functools
import re

__all__ = ["TerminalGuard"]

# What a vendor's output may do to the terminal of the analyst who replays or watches it (issue 11 finding 10).
# Kept: text, UTF-8, ordinary C0 controls, SGR colours, cursor movement, erase/insert/delete, scroll regions,
# the alternate screen, cursor visibility and style, charset designations. Dropped: every OSC (titles 0/1/2,
# colour queries 4/10/11, hyperlinks 8, clipboard 52, notifications, file transfer), DCS, SOS, PM and APC
# strings, CSI reports and window operations (DSR n, DA c, 21t and all of t, DECRQM $p, media copy i), mouse
# and focus reporting modes, ESC Z, ESC SP F/G (8-bit control selection), ENQ (answerback) and C1 controls
# (raw 0x80-0x9F bytes outside UTF-8 and UTF-8-encoded U+0080-U+009F). Sequences may be split across chunks.
_CSI_FINALS = frozenset(b"@ABCDEFGHIJKLMPSTXZ`abdefgmrsu")
_CSI_MODES = frozenset({b"4"})  # IRM (insert mode); KAM (2) would lock the keyboard, SRM (12) local echo
_CSI_DEC_MODES = frozenset(b"?" + m for m in (b"1", b"3", b"5", b"6", b"7", b"12", b"25", b"47", b"1047", b"1048",
                                               b"1049", b"2004"))
_ESC_FINALS = frozenset(b"78=>DEHMNOc\\")
_ESC_CHARSET = frozenset(b"()*+-./#%")
_MAX_SEQ = 64
_WHOLE_CSI = re.compile(rb"\x1b\[[0-?]{0,64}[ -/]{0,4}[@-~]")
_SAFE_RUN = re.compile(rb"(?:[\x00-\x04\x06-\x1a\x1c-\x7f]+|\xc2[\xa0-\xbf]|[\xc3-\xdf][\x80-\xbf]"
                       rb"|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
                       rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})+")
# Well-formed UTF-8 (RFC 3629): the range of the byte after each lead byte (no overlongs, surrogates, > U+10FFFF).
_FIRST = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
(_GROUND, _ESC, _ESC_INTER, _CSI, _STRING, _STRING_ESC, _UTF8, _C2) = range(8)


def _csi_allowed(params: bytes, inter: bytes, final: int) -> bool:
    if inter:
        return (inter, final) in ((b" ", 0x71), (b"!", 0x70))  # DECSCUSR cursor style, DECSTR soft reset
    if final in (0x68, 0x6C):  # h / l: only modes that change how the screen looks, never reports
        modes = params.split(b";")
        if params[:1] == b"?":
            return all((m if m.startswith(b"?") else b"?" + m) in _CSI_DEC_MODES for m in modes)
        return all(m in _CSI_MODES for m in modes)
    if params[:1] in (b"<", b"=", b">", b"?"):
        return final == 0x6D and params[:1] == b">"  # xterm modifyOtherKeys (CSI > 4;1 m) is harmless
    return final in _CSI_FINALS


_SIMPLE = re.compile(_SAFE_RUN.pattern[:-2] + rb"|" + _WHOLE_CSI.pattern + rb")+")


@functools.lru_cache(maxsize=4096)
def _csi_verdict(seq: bytes) -> bool:
    """Whether a whole ``ESC [ … final`` sequence may reach a staff terminal (cached: output repeats them)."""
    body = seq[2:-1]
    cut = len(body) - len(body.lstrip(b"0123456789:;<=>?"))
    return _csi_allowed(body[:cut], body[cut:], seq[-1])


class TerminalGuard:
    """Streaming filter for terminal bytes shown to staff: keeps what draws the screen, drops what makes the
    terminal act (clipboard, links, titles, reports, printer). Feed chunks in order; the recording is not
    touched, only what is written to the analyst's terminal."""

    def __init__(self) -> None:
        self.state = _GROUND
        self.seq = bytearray()  # the CSI or ESC sequence being collected
        self.need = 0  # UTF-8 continuation bytes still expected
        self.pending = bytearray()  # the UTF-8 character being collected
        self.dropped = 0  # sequences dropped (for tests and notes)

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` fit for a staff terminal (an unfinished sequence waits for the next chunk)."""
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self.state == _GROUND:  # fast path: text, UTF-8, harmless controls and whole CSI sequences
                m = _SIMPLE.match(data, i)
                if m:
                    out += _WHOLE_CSI.sub(self._judge_csi, m.group())
                    i = m.end()
                    continue
            self._byte(data[i], out)
            i += 1
        return bytes(out)

    def _byte(self, b: int, out: bytearray) -> None:
        st = self.state
        if b in (0x18, 0x1A) and st not in (_GROUND, _UTF8, _C2):  # CAN / SUB abort any sequence
            self._drop()
            return
        if st == _STRING:
            if b == 0x1B:
                self.state = _STRING_ESC
            elif b in (0x07, 0x9C):  # BEL ends an OSC; 0x9C is the 8-bit ST
                self.state = _GROUND
            return
        if st == _STRING_ESC:
            self.state = _GROUND
            if b != 0x5C:  # not ST: the ESC starts a new sequence (terminals abort the string the same way)
                self._byte(0x1B, out)
                self._byte(b, out)
            return
        if st == _ESC:
            if b == 0x5B:
                self.state, self.seq = _CSI, bytearray()
            elif b in (0x5D, 0x50, 0x58, 0x5E, 0x5F):  # OSC, DCS, SOS, PM, APC
                self.state = _STRING
                self.dropped += 1
            elif 0x20 <= b <= 0x2F:
                self.state, self.seq = _ESC_INTER, bytearray([b])
            elif b in _ESC_FINALS:
                self.state = _GROUND
                out += bytes((0x1B, b))
            elif b == 0x1B:
                self.dropped += 1
            elif b < 0x20:  # a C0 control inside an escape sequence is executed; the ESC is dropped
                self._drop()
                self._ground(b, out)
            else:
                self._drop()
            return
        if st == _ESC_INTER:
            if 0x20 <= b <= 0x2F and len(self.seq) < 4:
                self.seq.append(b)
            elif 0x30 <= b <= 0x7E and self.seq[0] in _ESC_CHARSET and len(self.seq) == 1:
                out += b"\x1b" + bytes(self.seq) + bytes((b,))
                self.state = _GROUND
            else:
                self._drop()
            return
        if st == _CSI:
            if 0x40 <= b <= 0x7E:
                raw = bytes(self.seq)
                cut = len(raw) - len(raw.lstrip(b"0123456789:;<=>?"))
                params, inter = raw[:cut], raw[cut:]
                if _csi_allowed(params, inter, b) and all(0x20 <= c <= 0x2F for c in inter):
                    out += b"\x1b[" + raw + bytes((b,))
                else:
                    self.dropped += 1
                self.state = _GROUND
            elif 0x30 <= b <= 0x3F and len(self.seq) < _MAX_SEQ and not any(c < 0x30 for c in self.seq):
                self.seq.append(b)  # parameters: at most 64, before any intermediate (as _WHOLE_CSI)
            elif 0x20 <= b <= 0x2F and sum(c < 0x30 for c in self.seq) < 4:
                self.seq.append(b)  # intermediates: at most 4
            elif b < 0x20 and b != 0x1B:  # executed mid-sequence by terminals
                self._ground(b, out)
            else:
                self._drop()
                if b == 0x1B:
                    self.state = _ESC
            return
        if st == _C2:  # after 0xC2: 0x80-0x9F would be a C1 control encoded in UTF-8
            self.state = _GROUND
            if 0x80 <= b <= 0x9F:
                self.dropped += 1
                return
            if 0xA0 <= b <= 0xBF:
                out += bytes((0xC2, b))
            else:
                out.append(0x3F)
                self._byte(b, out)
            return
        if st == _UTF8:  # a character is written whole or, if broken off, as '?' (no stray 0x80-0x9F byte)
            lo, hi = _FIRST.get(self.pending[0], (0x80, 0xBF)) if len(self.pending) == 1 else (0x80, 0xBF)
            if lo <= b <= hi:
                self.pending.append(b)
                self.need -= 1
                if self.need == 0:
                    out += self.pending
                    self.state, self.pending = _GROUND, bytearray()
                return
            out.append(0x3F)
            self.state, self.need, self.pending = _GROUND, 0, bytearray()
        self._ground(b, out)

    def _ground(self, b: int, out: bytearray) -> None:
        if b == 0x1B:
            self.state = _ESC
        elif b == 0x9B:  # 8-bit CSI outside UTF-8: collect and judge like ESC [
            self.state, self.seq = _CSI, bytearray()
        elif b in (0x90, 0x9D, 0x98, 0x9E, 0x9F):  # 8-bit DCS, OSC, SOS, PM, APC
            self.state = _STRING
            self.dropped += 1
        elif 0x80 <= b <= 0xBF:  # a stray continuation byte: C1 controls among them are dropped
            if b >= 0xA0:
                out.append(b)
            else:
                self.dropped += 1
        elif b == 0xC2:
            self.state = _C2
        elif 0xC3 <= b <= 0xF4:
            self.pending = bytearray((b,))
            self.state, self.need = _UTF8, (1 if b < 0xE0 else 2 if b < 0xF0 else 3)
        elif b == 0x05:  # ENQ makes the terminal send its answerback message
            self.dropped += 1
        else:
            self.state = _GROUND
            out.append(b)

    def _judge_csi(self, m: re.Match[bytes]) -> bytes:
        if _csi_verdict(m.group()):
            return m.group()
        self.dropped += 1
        return b""

    def _drop(self) -> None:
        self.state = _GROUND
        self.seq = bytearray()
        self.dropped += 1

    def flush(self) -> bytes:
        """At the end of the stream: an unfinished sequence is dropped, a broken-off character shown as '?'."""
        tail = b"?" if self.state in (_C2, _UTF8) else b""
        self.state, self.seq, self.need, self.pending = _GROUND, bytearray(), 0, bytearray()
        return tail
