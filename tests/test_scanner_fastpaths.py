"""The output scanner's fast paths (issue 16) answer exactly as the plain forms they replace.

Each gate below skips work only when a cheap necessary condition fails (a memchr for a byte every needle holds,
one translate that bounds a density, a regex anchored on "\\n" instead of "(?m)^"); hypothesis draws the
inputs near the boundaries that matter (the 4 KiB probe of dump_lines, 3/8 blanks, chunk sizes 0–40 KiB).
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from sessions import decoders, dumps

_OFFSET_LINE = re.compile(rb"(?m)^(?:[0-9a-f]{8}: |[0-7]{7} |[0-9a-f]{8}  )[0-9a-f]")
_UU_START = re.compile(rb"(?m)^M[ -`]{60}$")


def _dump_lines_plain(chunk: bytes) -> bool:
    return _OFFSET_LINE.search(chunk, 0, 4096) is not None or _UU_START.search(chunk, 0, 4096) is not None


def _spaced_plain(chunk: bytes) -> bool:
    return any(len(half.translate(None, b" \t\r\n")) * 4 <= len(half) for half in (chunk[1::2], chunk[0::2]))


_PIECES = st.sampled_from([b"0000000 ", b"00000010: ", b"000001a0  ", b"4d53", b"M" + b"`" * 60, b"M" + b"!" * 59,
                           b"\n", b"\r\n", b" ", b"\t", b"x", b"MSH|", b"word ", b"a b c d ", b"0", b"f", b"7"])


@st.composite
def _texts(draw) -> bytes:
    parts = draw(st.lists(_PIECES, max_size=60))
    pad = draw(st.sampled_from([0, 4000, 4030, 4080, 4090, 4095, 4096, 4100]))
    filler = draw(st.sampled_from([b"a", b" ", b"\n", b"a b"]))
    head = (filler * pad)[:pad]
    return head + b"".join(parts) if draw(st.booleans()) else b"".join(parts) + head


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(_texts())
@example(b"0000000 4" + b"x" * 5000)
@example(b"a" * 4095 + b"\n00000010: 4d")
@example(b"a" * 4000 + b"\nM" + b"`" * 60 + b"\n")
@example(b"a" * 4034 + b"\nM" + b"`" * 60)
def test_dump_lines_anchored_on_line_breaks_answers_as_the_multiline_search(text):
    assert dumps.dump_lines(text) == _dump_lines_plain(text)


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.binary(max_size=64) | _texts() | st.lists(st.sampled_from([b"x ", b"xx", b"x", b" ", b"\n", b"  "]),
                                                   max_size=400).map(b"".join))
@example(b"m s h | ^ ~ \\ & ")
@example(b"x" * 5 + b" " * 3)
@example(b"x x x x x xx")
def test_the_blank_density_gate_never_hides_spaced_text(text):
    assert decoders._spaced(text) == _spaced_plain(text)


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.lists(st.sampled_from([b"^@", b"^", b"@", b"\\x00", b"\\0", b"\\r", b"text ", b"M-^@", b"\n"]),
                max_size=80).map(b"".join))
def test_escaped_with_its_memchr_gate_answers_as_before(text):
    plain = (text.find(b"\\") != -1 or text.find(b"^@") != -1) and text[:512].isascii() and not \
        text[:512].translate(None, bytes(range(0x20, 0x7F)) + b"\t\r\n") and (
            text.count(b"\\x") + text.count(b"\\0") + text.count(b"\\r") >= 4 or text.count(b"^@") >= 4)
    assert dumps.escaped(text) == plain


def test_reversed_and_doubled_needles_all_hold_both_gate_bytes():
    """odd_forms looks for these only where a "|" and a "&" arrived: every needle must contain both."""
    for needle, _ in decoders._REVERSED + decoders._DOUBLED:
        assert b"|" in needle and b"&" in needle, needle
    window = b"x" * 300 + b"&\\~^|HSM" + b"y" * 10
    assert decoders.odd_forms(window, 0, window) == "HL7v2/reversed"
