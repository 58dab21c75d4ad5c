"""sessions/anchors.py: the compiled anchor search reports exactly the patterns ``re`` finds, and the stream judge
reaches the same verdict at the same offset with it as without it (it only leaves out checks that cannot fire)."""

from __future__ import annotations

import base64
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from sessions import anchors
from sessions.anchors import Anchors, literal
from sessions.streams import _BINARY_ANCHORS, DEVICE, VENDOR, StreamJudge

DEFAULT = anchors.engine()  # restored after each test that switches
needs_hyperscan = pytest.mark.skipif(not anchors._module(), reason="hyperscan is not installed "
                                     "(pip install 'medbroker[fast]'); the pure-Python path is tested below")


@pytest.fixture
def engine():
    before = anchors.engine()
    yield anchors.set_engine
    anchors.set_engine(before)


# what the judge's binary checks start from, planted into random data below
NEEDLES = [b"ustar", b"0707", b"@RSYNCD: ", b"SSH-", b"\x01\x00\x00\x00\x03", b"\x02\x00\x00\x00\x06",
           b"\x00\x00\x01\x05\x01", b"\x00\x00\x00\x05\x01\x00\x00\x00\x03"]


def _planted(rnd: random.Random, size: int, count: int) -> bytes:
    buf = bytearray(rnd.randbytes(size))
    for _ in range(count):
        needle = rnd.choice(NEEDLES)
        at = rnd.randrange(0, max(1, size - len(needle)))
        buf[at:at + len(needle)] = needle[:size - at]
    return bytes(buf)


def _both_engines(run):
    """``run()`` with the pure-Python anchor search, then with Hyperscan's: (slow, fast)."""
    try:
        anchors.set_engine("python")
        slow = run()
        anchors.set_engine("hyperscan")
        fast = run()
    finally:
        anchors.set_engine(DEFAULT)
    return slow, fast


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_a_literal_pattern_matches_its_bytes_and_nothing_else(needle):
    pattern = literal(needle)
    assert re.fullmatch(pattern, needle, re.S)
    assert not re.search(pattern, needle[:-1], re.S)


def test_without_the_engine_every_pattern_is_reported(engine):
    engine("python")
    a = Anchors({"x": literal(b"ustar"), "y": literal(b"SSH-")})
    assert a.present(b"nothing here") == {"x", "y"}  # so every check runs, as before the engine existed
    assert anchors.engine() == "python"


def test_an_unknown_engine_is_refused(engine):
    with pytest.raises(ValueError, match="engine must be one of"):
        engine("pcre")


def test_hyperscan_cannot_be_chosen_when_it_is_missing(engine, monkeypatch):
    monkeypatch.setattr(anchors, "_hs", False)
    with pytest.raises(ValueError, match="not installed"):
        engine("hyperscan")
    assert anchors.engine() == "python"


@needs_hyperscan
@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 9000), st.integers(0, 6), st.integers(0, 9000))
def test_hyperscan_reports_exactly_the_patterns_re_finds(rnd, size, count, start):
    anchors.set_engine("hyperscan")
    try:
        buf = _planted(rnd, size, count)
        start = min(start, len(buf))
        for (direction, init_seen), a in _BINARY_ANCHORS.items():
            want = {name for name, src in zip(a.names, a._sources) if re.compile(src, re.S).search(buf, start)}
            assert a.present(buf, start) == want, (direction, init_seen)
    finally:
        anchors.set_engine(DEFAULT)


@needs_hyperscan
def test_a_failing_engine_reports_every_pattern(engine):
    engine("hyperscan")
    a = Anchors({"x": literal(b"ustar"), "y": literal(b"SSH-")})
    assert a.present(b"..ustar..") == {"x"}

    class Broken:
        def scan(self, *args, **kwargs):
            raise RuntimeError("engine fault")
    a._db = Broken()
    assert a.present(b"..ustar..") == {"x", "y"}


@needs_hyperscan
def test_a_pattern_the_engine_cannot_compile_leaves_every_check_on(engine):
    engine("hyperscan")
    a = Anchors({"bad": rb"(?<=x)y", "x": literal(b"ustar")})  # lookbehind: Python re only
    assert a.present(b"nothing") == {"bad", "x"}


def _verdicts(stream: list[tuple[str, bytes]]) -> tuple:
    judge = StreamJudge()
    for direction, data in stream:
        if judge.feed(direction, data):
            break
    hit = judge.hit
    return (hit.protocol, hit.direction, hit.offset) if hit else None


@needs_hyperscan
@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 5))
def test_the_judge_reaches_the_same_verdict_with_and_without_hyperscan(rnd, count):
    # binary streams both ways, in random pieces, with anchors (and sometimes whole headers) planted in them
    stream = []
    for _ in range(rnd.randrange(1, 12)):
        data = _planted(rnd, rnd.randrange(1, 40000), count)
        if rnd.random() < 0.2:
            data += b"\n" + b"SSH-2.0-OpenSSH_9.2\r\n" if rnd.random() < 0.5 else b"\x00" * 40
        stream.append((rnd.choice([VENDOR, DEVICE]), data))
    slow, fast = _both_engines(lambda: _verdicts(stream))
    assert fast == slow


def _tar_bytes() -> bytes:
    import io
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("study/IM0001")
        info.size = 600
        tar.addfile(info, io.BytesIO(b"x" * 600))
    return out.getvalue()


@needs_hyperscan
@pytest.mark.parametrize("signature,direction,protocol", [
    (_tar_bytes(), VENDOR, "tar"),
    (b"\n" + b"SSH-2.0-OpenSSH_9.2\r\n", DEVICE, "ssh"),
    (b"\x00\x00\x00\x05\x02\x00\x00\x00\x03", DEVICE, "sftp"),  # a bare VERSION after the vendor's loose INIT
    (b"070701" + b"0" * 88 + b"0000000B" + b"0" * 8 + b"study/IM01\x00", VENDOR, "cpio"),
])
def test_signatures_inside_random_binary_data_are_found_at_the_same_offset_by_both_engines(signature, direction,
                                                                                          protocol):
    rnd = random.Random(7)
    stream = [(VENDOR, rnd.randbytes(5000) + b"\x00\x00\x00\x09\x01\x00\x00\x00\x03" + rnd.randbytes(3000)),
              (direction, rnd.randbytes(70000) + signature + rnd.randbytes(9000))]
    chunked = [(d, data[i:i + 32768]) for d, data in stream for i in range(0, len(data), 32768)]
    slow, fast = _both_engines(lambda: _verdicts(chunked))
    assert slow is not None and slow[0] == protocol
    assert fast == slow


def _deep_verdict(data: bytes, size: int = 32768) -> tuple:
    from sessions.decoders import DeepScanner
    from sessions.entropy import OpaqueBudget

    scanner = DeepScanner(OpaqueBudget(64 << 10))
    for i in range(0, len(data), size):
        hit = scanner.feed(data[i:i + size])
        if hit:
            return hit, i
    return None, len(data)


def _spaced(data: bytes, sep: bytes) -> bytes:
    return b"".join(data[i:i + 1] + sep for i in range(len(data)))  # as sed 's/./& /g': after every character


def _deep_forms() -> dict[str, tuple[bytes, str | None]]:
    from fixtures.patientdata import dicom_p10, hl7_message

    hl7, dcm = hl7_message("TEST^PATIENT^NINE"), dicom_p10("TEST^PATIENT^NINE")
    return {
        "plain log": (b"", None),
        "spaced HL7 (sed 's/./& /g')": (_spaced(hl7, b" "), "HL7v2/spaced"),
        "spaced HL7 upper case, tabs": (_spaced(hl7.upper(), b"\t"), "HL7v2/spaced"),
        "one character per line (fold -w1)": (_spaced(hl7, b"\n"), "HL7v2/"),
        "three per line (fold -w3)": (b"\n".join(hl7[i:i + 3] for i in range(0, len(hl7), 3)), "HL7v2/folded"),
        "spaced DICM before the UID root": (b"d i c m\n" + _spaced(b"1.2.840.10008.5.1.4.1.1.2", b" "),
                                            "DICOM/spaced"),
        "strings of a DICOM file": (b"DICM\nUL\n1.2.840.10008.5.1.4.1.1.2\n", "DICOM/text"),
        "base64 of a DICOM file": (base64.encodebytes(dcm), "DICOM/base64"),
        "one long base64 line": (base64.b64encode(dcm * 30), "DICOM/base64"),
        "a word of exactly 16 base64 characters": (b" " + base64.b64encode(b"..DICM\x02\x00....") + b" ",
                                                   "DICOM/base64"),
    }


@needs_hyperscan
@pytest.mark.parametrize("form", sorted(_deep_forms()))
@pytest.mark.parametrize("at", [0, 40_000, 65_530, 250_000])
def test_the_deep_scanner_finds_the_same_at_the_same_place_with_and_without_hyperscan(form, at):
    from bench.world import device_log

    log = b"".join(device_log(320 << 10))
    inserted, want = _deep_forms()[form]
    if inserted:  # the density checks judge whole chunks: the form fills at least one
        inserted *= -(-40_000 // len(inserted))
    data = log[:at] + inserted + log[at:]
    slow, fast = _both_engines(lambda: _deep_verdict(data))
    assert slow[0] == want or (want and want.endswith("/") and slow[0] and slow[0].startswith(want)), slow
    assert fast == slow


@needs_hyperscan
@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.randoms(use_true_random=False), st.sampled_from([b"DICM\x02\x00", b"\nMSH|^~\\&|A|B|C\r", b"\nH|\\^&|||X\r",
                                                           b"H|", b"DICM\x02"]),
       st.integers(0, 3), st.sampled_from([4096, 32768, 65536]))
def test_the_signature_scanner_finds_the_same_at_the_same_place_with_and_without_hyperscan(rnd, sig, count, size):
    from sessions.content import OutputScanner

    data = bytearray(rnd.randbytes(rnd.randrange(1, 200_000)))
    for _ in range(count):
        at = rnd.randrange(0, len(data))
        data[at:at] = sig
    def scan() -> tuple:
        scanner = OutputScanner()
        for i in range(0, len(data), size):
            hit = scanner.feed(bytes(data[i:i + size]))
            if hit:
                return hit, i
        return None, len(data)

    verdicts = _both_engines(scan)
    assert verdicts[0] == verdicts[1]
    if count and sig == b"DICM\x02\x00":
        assert verdicts[0][0] == "DICOM"  # the planted signature is found (the comparison is not vacuous)


@needs_hyperscan
def test_a_buffer_below_min_size_reports_every_pattern_without_a_scan(engine):
    engine("hyperscan")
    a = Anchors({"x": literal(b"ustar"), "y": literal(b"SSH-")}, min_size=4096)
    assert a.present(b"..ustar.." * 10) == {"x", "y"}  # the caller's own checks are cheaper there
    assert a.present(b"..ustar.." * 1000) == {"x"}
    assert a.present(b"..ustar.." * 1000, start=9000 - 100) == {"x", "y"}
