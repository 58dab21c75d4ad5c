"""sessions/fastscan.py and its C extension: each compiled scan answers exactly what its pure-Python expression
answers (random buffers, every block boundary, planted needles), bad arguments are refused the same way, the
extension is built wherever a C compiler is, and the deep scanner's verdicts do not depend on it."""

from __future__ import annotations

import random
import shutil
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES, FUZZ_EXAMPLES_OTHER
from sessions import fastscan

needs_native = pytest.mark.skipif(not fastscan.built(), reason="sessions._fastscan was not built (no C compiler)")
PRE = bytes(0x61 if c in fastscan.RUN_CHARS else 0x20 for c in range(256))


@pytest.fixture
def both():
    """Run a callable with the compiled scans, then without: (native, python)."""
    before = fastscan.native()

    def run(fn):
        try:
            fastscan.set_native(True)
            a = fn()
            fastscan.set_native(False)
            b = fn()
        finally:
            fastscan.set_native(before)
        return a, b

    return run


def test_the_extension_is_built_wherever_a_c_compiler_and_the_python_headers_are():
    """setup.py marks the extension optional (a machine without a compiler still installs); where one is present,
    a build that silently failed would cost every session its speed, so it fails here instead."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers.exists():
        pytest.skip("no C compiler or no Python.h here: the pure-Python scans are what runs")
    assert fastscan.built(), "a C compiler is present but sessions._fastscan did not build (see the pip output)"
    assert fastscan.native(), "built but not in use"


# bytes that sit on every edge of the run class: letters at both ends of each range, digits, '+', and neighbours
EDGES = b"AZaz09+@[`{/:-_ \n\x00\x7f\x80\xc1\xdb\xe0\xfa\xff"


@needs_native
@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(EDGES)), st.integers(1, 40)), max_size=30), st.integers(0, 400))
def test_run16_is_translate_and_find(runs, start):
    buf = b"".join(bytes([c]) * n for c, n in runs)
    start = min(start, len(buf) + 2)
    want = buf.translate(PRE).find(b"a" * 16, start)
    fastscan.set_native(True)
    assert fastscan.run16(buf, start) == want
    fastscan.set_native(False)
    try:
        assert fastscan.run16(buf, start) == want
    finally:
        fastscan.set_native(True)


@needs_native
def test_run16_finds_a_run_at_every_offset_and_length_around_the_block_edges(both):
    """Every placement of a run of 15, 16 and 17 class bytes in buffers of 0..200 bytes (the compiled loop reads
    64-byte blocks and carries a run across them; the tail is read byte by byte)."""
    rnd = random.Random(7)
    checked = 0
    for size in list(range(0, 140)) + [191, 192, 193, 255, 256, 257]:
        for length in (15, 16, 17):
            for at in range(0, max(1, size - length + 1)):
                buf = bytearray(b" " * size)
                buf[at:at + length] = bytes(rnd.choice(fastscan.RUN_CHARS) for _ in range(length))[:size - at]
                buf = bytes(buf)
                for start in (0, at, at + 1):
                    want = buf.translate(PRE).find(b"a" * 16, start)
                    assert both(lambda: fastscan.run16(buf, start)) == (want, want), (size, length, at, start)
                    checked += 1
    assert checked > 10_000


@needs_native
@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.binary(max_size=5000), st.sampled_from([b"", b" ", b"\t\r\n ", b"x \n"]), st.integers(0, 9000))
def test_count_blanks_is_len_minus_translate(data, pad, times):
    buf = data + pad * (times % 3000)
    want = len(buf) - len(buf.translate(None, b" \t\r\n"))
    fastscan.set_native(True)
    assert fastscan.count_blanks(buf) == want
    assert fastscan.count_blanks(bytearray(buf)) == want and fastscan.count_blanks(memoryview(buf)) == want


@needs_native
def test_count_blanks_over_the_lane_counters_limit(both):
    """The SSE2 loop adds per-lane counts that would wrap at 256: buffers of only blanks, far past 255 x 16."""
    for size in (16 * 255 - 1, 16 * 255, 16 * 255 + 1, 16 * 255 * 2 + 17, 1 << 20):
        assert both(lambda: fastscan.count_blanks(b" " * size)) == (size, size)
        buf = (b"\t\xff" * size)[:size]
        assert both(lambda: fastscan.count_blanks(buf)) == ((size + 1) // 2,) * 2


@needs_native
@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.randoms(use_true_random=False), st.binary(min_size=2, max_size=40), st.integers(0, 6), st.integers(0, 600),
       st.integers(0, 700))
def test_find_is_bytes_find(rnd, needle, count, size, start):
    # a haystack of the needle's own bytes (near misses everywhere) with whole copies planted
    buf = bytearray(rnd.choice(needle + b"\x00") for _ in range(size))
    for _ in range(count):
        at = rnd.randrange(0, size + 1)
        buf[at:at] = needle
    buf = bytes(buf)
    fastscan.set_native(True)
    assert fastscan.find(buf, needle, start) == buf.find(needle, start)


@needs_native
def test_find_at_every_offset_near_the_block_edges(both):
    uid = b"1.2.840.10008."
    for size in range(len(uid), 120):
        for at in range(0, size - len(uid) + 1):
            buf = b"1" * at + uid + b"." * (size - at - len(uid))
            for start in (0, at, at + 1):
                want = buf.find(uid, start)
                assert both(lambda: fastscan.find(buf, uid, start)) == (want, want), (size, at, start)


def test_bad_arguments_are_refused_the_same_way_by_both(both):
    """A negative start is refused (bytes.find would count it from the end; the callers never mean that), and
    a short needle or a non-buffer is what bytes.find makes of it."""
    for fn in (lambda: fastscan.run16(b"x" * 40, -1), lambda: fastscan.find(b"abc", b"bc", -2)):
        with pytest.raises(ValueError):
            fn()
        if fastscan.built():
            fastscan.set_native(not fastscan.native())
            try:
                with pytest.raises(ValueError):
                    fn()
            finally:
                fastscan.set_native(not fastscan.native())
    assert fastscan.find(b"abcabc", b"c", 3) == 5 and fastscan.find(b"abc", b"", 1) == 1
    for bad in ("text", 12, None):
        with pytest.raises(TypeError):
            fastscan.count_blanks(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            fastscan.run16(bad)  # type: ignore[arg-type]


def test_set_native_refuses_what_was_not_built(monkeypatch):
    monkeypatch.setattr(fastscan, "_ext", None)
    with pytest.raises(ValueError, match="not built"):
        fastscan.set_native(True)
    assert fastscan.built() is False


@needs_native
@pytest.mark.parametrize("at", [0, 40_000, 250_000])
def test_the_deep_scanner_finds_the_same_at_the_same_place_with_and_without_the_compiled_scans(both, at):
    """Each odd spelling of patient data inside a device log (spaced, folded, strings of DICOM, base64 runs and
    a word of exactly 16 base64 characters): the same finding at the same chunk either way, and the one expected."""
    from test_anchors import _deep_forms, _deep_verdict
    from bench.world import device_log

    log = b"".join(device_log(320 << 10))
    for form, (inserted, want) in sorted(_deep_forms().items()):
        if inserted:
            inserted *= -(-40_000 // len(inserted))
        data = log[:at] + inserted + log[at:]
        native, python = both(lambda: _deep_verdict(data))
        assert native == python, form
        assert python[0] == want or (want and want.endswith("/") and python[0] and python[0].startswith(want)), form
