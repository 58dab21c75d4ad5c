"""Where the PTY line guard cuts vendor input (sessions/shell_guard.py ``_CUTS``): at the first CR, LF, Ctrl-O or
bracketed-paste start, exactly as four ``find`` calls and their minimum did (one regex search since issue 16)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.shell_guard import _CUTS, _PASTE_START

_PIECES = st.sampled_from([b"a", b" ", b"\r", b"\n", b"\x0f", b"\x1b", b"[", b"2", b"0", b"~",
                           _PASTE_START, b"\x1b[201~"])


def _first_of_four(data: bytes) -> int | None:
    found = [i for i in (data.find(b"\r"), data.find(b"\n"), data.find(b"\x0f"), data.find(_PASTE_START)) if i >= 0]
    return min(found) if found else None


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=24).map(b"".join))
def test_the_cut_is_the_first_line_end_or_paste_start(data: bytes) -> None:
    m = _CUTS.search(data)
    assert (None if m is None else m.start()) == _first_of_four(data)


def test_a_plain_key_has_no_cut_and_a_split_paste_start_is_not_one() -> None:
    assert _CUTS.search(b"a") is None
    assert _CUTS.search(b"\x1b[200") is None
    assert _CUTS.search(b"ls\x1b[200~x\r").start() == 2
