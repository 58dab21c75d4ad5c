"""DeepScanner (sessions/decoders.py) and the opaque-output budget (sessions/entropy.py)."""

from __future__ import annotations

import base64
import bz2
import codecs
import gzip
import json
import lzma
import os
import random
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fixtures.patientdata import astm_message, dicom_bare, dicom_p10, hl7_message
from sessions.decoders import DeepScanner
from sessions.entropy import OPAQUE, OpaqueBudget, OpaqueMeter, sample_opaque

pytestmark = pytest.mark.usefixtures("anchor_engine")  # with and without Hyperscan (sessions/anchors.py)

HL7, DCM, ASTM = hl7_message("TEST^PATIENT^THREE"), dicom_p10("TEST^PATIENT^ONE"), astm_message()

# random test data built at collection time comes from a seeded generator: every pytest-xdist worker must
# collect the same test ids (scripts/test.sh runs the suite in several processes)
_SEEDED = random.Random(20261207)


def _scan(data: bytes, size: int, budget: OpaqueBudget | None = None) -> str | None:
    scanner = DeepScanner(budget)
    for i in range(0, len(data), size):
        hit = scanner.feed(data[i:i + size])
        if hit:
            return hit
    return None


def _sh(command: str, data: bytes) -> bytes:
    return subprocess.run(["sh", "-c", command], input=data, capture_output=True, check=True).stdout


def _utf16(data: bytes, codec: str) -> bytes:
    return data.decode("latin-1").encode(codec)


def _rot13(data: bytes) -> bytes:
    return codecs.encode(data.decode("latin-1"), "rot13").encode("latin-1")


CASES = {
    "gzip": (lambda: gzip.compress(HL7), "HL7v2/gzip"),
    "gzip dicom": (lambda: gzip.compress(DCM), "DICOM/gzip"),
    "zlib": (lambda: zlib.compress(HL7), "HL7v2/zlib"),
    "bzip2": (lambda: bz2.compress(ASTM), "ASTM/bzip2"),
    "xz": (lambda: lzma.compress(DCM), "DICOM/xz"),
    "gzip in base64": (lambda: base64.encodebytes(gzip.compress(HL7)), "HL7v2/gzip/base64"),
    "xz in hex": (lambda: _sh("xxd -p", lzma.compress(HL7)), "HL7v2/xz/hex"),
    "base32": (lambda: base64.b32encode(HL7), "HL7v2/base32"),
    "base32 wrapped": (lambda: _sh("base32", DCM), "DICOM/base32"),
    "rot13": (lambda: _rot13(HL7), "HL7v2"),
    "lower case": (lambda: HL7.lower(), "HL7v2"),
    "rot13 astm": (lambda: b"log\n" + _rot13(ASTM), "ASTM"),
    "no MSH": (lambda: b"segments:\n" + HL7[HL7.index(b"PID|"):], "HL7v2"),
    "no MSH lower": (lambda: b"segments:\n" + HL7[HL7.index(b"PID|"):].lower(), "HL7v2"),
    "utf-16-le": (lambda: _utf16(HL7, "utf-16-le"), "HL7v2/utf-16"),
    "utf-16-be": (lambda: _utf16(HL7, "utf-16-be"), "HL7v2/utf-16"),
    "xxd -i": (lambda: _sh("xxd -i", HL7), "HL7v2/dump"),
    "xxd -i dicom": (lambda: _sh("xxd -i", DCM), "DICOM/dump"),
    "od -b": (lambda: _sh("od -b", ASTM), "ASTM/dump"),
    "od -c": (lambda: _sh("od -c", HL7), "HL7v2/dump"),
    "hex with colons": (lambda: b":".join(b"%02x" % c for c in HL7), "HL7v2/dump"),
    "python escapes": (lambda: repr(HL7).encode(), "HL7v2"),
    "json base64 field": (lambda: json.dumps({"changed": False, "content": base64.b64encode(HL7).decode(),
                                              "encoding": "base64"}).encode(), "HL7v2/base64"),
    "short base64 in text": (lambda: b"note=" + base64.b64encode(b"PID|1||42^^^H||DOE^JO") + b" end", "HL7v2/base64"),
    "base64url": (lambda: base64.urlsafe_b64encode(DCM), "DICOM/base64"),
    "narrow base64 of gzip": (lambda: _sh("gzip -c | base64 -w 16", HL7 * 40), "HL7v2/gzip/base64"),
    "base64 -w0 of gzip": (lambda: base64.b64encode(gzip.compress(HL7 * 200)), "HL7v2/gzip/base64"),
    "dicom json": (lambda: b'[{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}}]', "DICOM"),
    "dicom json spaced": (lambda: json.dumps([{"00080016": {"vr": "UI", "Value": ["1.2.3"]}}], indent=2).encode(),
                          "DICOM"),
    "dicom xml": (lambda: b'<?xml version="1.0"?>\n<NativeDicomModel xml:space="preserve">\n'
                          b'<DicomAttribute keyword="PatientName" tag="00100010" vr="PN">', "DICOM"),
    "dicom bare mid-stream": (lambda: b"log line\n" * 50 + dicom_bare("TEST^PATIENT^SIX"), "DICOM"),
    "dicom implicit mid-stream": (lambda: b"x" * 333 + dicom_bare(explicit=False), "DICOM"),
    "dicom big endian": (lambda: b"junk\n" + bytes.fromhex("00080016") + b"UI" + (26).to_bytes(2, "big")
                         + b"1.2.840.10008.5.1.4.1.1.2\0" + bytes(40), "DICOM"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("size", [1, 7, 300, 4096, 1 << 20])
def test_deep_scanner_finds_each_form_at_any_chunk_size(name, size):
    make, expected = CASES[name]
    data = make()
    if size == 1 and len(data) > 20000:
        size = 3
    assert _scan(data, size) == expected


def test_zip_bomb_is_bounded():
    bomb = gzip.compress(bytes(200 << 20), 9)  # 200 MiB of zeros in about 200 KiB
    budget = OpaqueBudget(0)
    start = time.thread_time()
    assert _scan(bomb, 32 * 1024, budget) is None
    assert time.thread_time() - start < 5
    assert budget.inflated <= 17 << 20  # the per-stream cap, not 200 MiB


def test_many_compression_headers_cost_bounded_time():
    data = (b"\x1f\x8b\x08\x00" + b"\x78\x9c" + b"BZh91AY&SY" + b"\xfd7zXZ\x00") * 5000
    start = time.thread_time()
    _scan(data, 32 * 1024)
    assert time.thread_time() - start < 5


def test_opaque_budget_ends_random_output_and_is_shared_by_channels():
    budget = OpaqueBudget(64 * 1024)
    one, two = DeepScanner(budget), DeepScanner(budget)
    assert one.feed(os.urandom(24 * 1024)) is None
    assert two.feed(base64.encodebytes(os.urandom(18 * 1024))) is None  # another channel of the session
    hits = [two.feed(base64.encodebytes(os.urandom(30 * 1024))) for _ in range(3)]
    assert OPAQUE in hits and budget.used > 64 * 1024
    assert "could not be inspected" in budget.describe() and "64 KiB" in budget.describe()


@pytest.mark.parametrize("kind", ["random", "base64", "hex", "base32"])
def test_random_data_is_opaque_but_never_patient_data(kind):
    raw = os.urandom(1 << 20)
    data = {"random": raw, "base64": base64.encodebytes(raw), "hex": raw.hex().encode(),
            "base32": base64.b32encode(raw)}[kind]
    assert _scan(data, 32 * 1024) is None  # no patient-data alarm without a budget
    assert _scan(data, 32 * 1024, OpaqueBudget(64 * 1024)) == OPAQUE


def test_limit_zero_turns_the_budget_off():
    assert _scan(os.urandom(1 << 20), 32 * 1024, OpaqueBudget(0)) is None


@pytest.mark.parametrize("text", [
    b"\x1b[H\x1b[2J top - 10:00:01 up 3 days,  load average: 0.00, 0.01, 0.05\r\n" * 2000,
    b"ii  libc6:amd64  2.36-9+deb12u4  amd64  GNU C Library: Shared libraries\n" * 2000,
    b"[12345.678901] usb 1-1: new high-speed USB device number 2 using xhci_hcd\n" * 2000,
    b"".join(b"/usr/lib/x86_64-linux-gnu/libfoo%d.so.%d\n" % (i, i % 7) for i in range(20000)),
    b"".join(b"%s\n" % _SEEDED.randbytes(8).hex().encode() for _ in range(100)) + b"done\n",  # a few hashes
], ids=lambda t: repr(t[:24]))
def test_maintenance_output_is_not_opaque(text):
    meter = OpaqueMeter(random.Random(1))
    assert sum(meter.feed(text[i:i + 4096]) for i in range(0, len(text), 4096)) == 0


def test_sample_opaque_shapes():
    assert sample_opaque(os.urandom(128))
    assert sample_opaque(base64.b64encode(os.urandom(96)))
    assert not sample_opaque(b"the quick brown fox jumps over the lazy dog " * 3)
    assert not sample_opaque(b"abcdefghijklmnopqrstuvwxyz" * 5)
    assert not sample_opaque(bytes(128))


def _docs() -> list[Path]:
    root = Path("/usr/share/doc")
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())[:400]


def test_no_false_alarms_on_documentation_and_binaries():
    files = _docs() + sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink())[:60]
    for path in files:
        data = path.read_bytes()[:2 << 20]
        assert _scan(data, 32 * 1024) is None, path


# ------------------------------------------------------------------------------------------------ fuzz
_PAYLOADS = [CASES[n][0] for n in ("gzip", "gzip in base64", "base32 wrapped", "rot13", "no MSH", "json base64 field",
                                    "xxd -i", "dicom json", "dicom bare mid-stream", "utf-16-le")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_PAYLOADS) - 1), st.binary(max_size=300), st.binary(max_size=300),
       st.lists(st.integers(1, 5000), min_size=1, max_size=8))
@example(0, b"", b"H|\\^&", [1])  # the ASTM header after the payload, fed a byte at a time
def test_any_chunking_finds_the_same_payload(k, before, after, sizes):
    data = b"text before\n" + before.replace(b"\0", b"") + b"\n" + _PAYLOADS[k]() + b"\n" + after
    whole = DeepScanner().feed(data)
    assert whole
    scanner, pos, found, i = DeepScanner(), 0, None, 0
    while pos < len(data) and not found:
        n = sizes[i % len(sizes)]
        found, pos, i = scanner.feed(data[pos:pos + n]), pos + n, i + 1
    assert found
    # Random bytes around the payload can be patient data themselves (hypothesis drew ``after=b"H|\\^&"``, an
    # ASTM header): then whichever the chunking meets first is a right answer; otherwise the same kind.
    if DeepScanner().feed(b"text before\n" + before.replace(b"\0", b"") + b"\n\n" + after) is None:
        assert found.split("/")[0] == whole.split("/")[0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000), st.lists(st.integers(1, 700), min_size=1, max_size=6))
def test_arbitrary_bytes_never_raise(data, sizes):
    scanner, pos, i = DeepScanner(OpaqueBudget(4096)), 0, 0
    start = time.thread_time()
    while pos < len(data):
        n = sizes[i % len(sizes)]
        scanner.feed(data[pos:pos + n])
        pos, i = pos + n, i + 1
    assert time.thread_time() - start < 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"\x1f\x8b\x08", b"x\x9c", b"BZh91AY&SY", b"\xfd7zXZ\x00", b"1.2.840.10008.",
                                 b"MSH|", b"pid|", b"H|\\^&", b"TVNIfF5+XCZ8", b"0x4d, ", b"115 ", b"\0", b"|^",
                                 b"\n", b"\r\n", b"{\"vr\":\"PN\"}", b"<DicomAttribute tag=", b"AAAA" * 5]),
                max_size=200), st.integers(1, 64))
def test_signature_fragments_never_raise(parts, size):
    data = b"".join(parts)
    scanner = DeepScanner()
    for i in range(0, len(data), size):
        scanner.feed(data[i:i + size])


def test_wide_lines_in_tiny_pieces_cost_linear_time():
    # a block of 60 000-character lines sent a few bytes at a time must not be re-copied on every feed
    line = base64.b64encode(os.urandom(45_000)) + b"\n"
    data = line * 3
    scanner = DeepScanner()
    start = time.thread_time()
    for i in range(0, len(data), 5):
        scanner.feed(data[i:i + 5])
    assert time.thread_time() - start < 20


def test_wide_wrapped_base64_is_read_across_pieces():
    data = b"".join(base64.b64encode(HL7 * 300)[i:i + 20000] + b"\n" for i in range(0, 80000, 20000))
    for size in (3, 1000, 7000):
        assert _scan(data, size) == "HL7v2/base64"


@pytest.mark.parametrize("data", [
    b"a|" * 16384, b"ABC|" * 8192, b"\nPID|1|2|3|" * 3000, b"\x1f\x8b\x08" * 10922, b"x\x9c" * 16384,
    b'{"vr":"PN"' * 3276, b"<DicomAttribute " * 2048, "PID|1|".encode("utf-16-le") * 2730, b"4d:" * 10922,
    b" ".join(base64.b64encode(_SEEDED.randbytes(12)) for _ in range(1900)),
    b"".join(base64.b64encode(_SEEDED.randbytes(12)) + b"\n" for _ in range(2000)),
], ids=lambda d: repr(d[:12]))
def test_hostile_chunks_cost_bounded_time(data):
    # output built to make the scanner work hardest: the event loop must not stall (measured: <= ~7 ms)
    start = time.thread_time()
    for _ in range(5):
        DeepScanner(OpaqueBudget(1 << 62)).feed(data[:32768])
    assert (time.thread_time() - start) / 5 < 0.05
