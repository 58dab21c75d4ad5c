"""Numeric dumps read back into bytes (sessions/dumps.py) and odd spellings: real od/xxd/basenc output."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.patientdata import dicom_p10, hl7_message
from helpers import FUZZ_EXAMPLES_OTHER
from sessions.decoders import DeepScanner
from sessions.dumps import DumpReader
from sessions.entropy import OPAQUE, OpaqueBudget

pytestmark = pytest.mark.usefixtures("anchor_engine")  # with and without Hyperscan (sessions/anchors.py)

FORMS = ["od -a", "od -c", "od -A n -c", "hexdump -c", "od -t u1", "od -A n -t d1", "od -t u2", "od -x", "od -t x4", "od -t o2", "od -b", "od -t x1",
         "xxd", "xxd -b", "xxd -e", "xxd -i", "hexdump -C", "basenc --base2msbf", "basenc --base2lsbf",
         "python3 -c 'import sys; print(list(open(sys.argv[1], \"rb\").read()))'",
         "perl -ne 'print join(\",\", map {ord} split //), \"\\n\"'", "bzip2 -c FILE | od -t x1",
         "gzip -c FILE | xxd", "xz -c FILE | hexdump -C"]


def _run(form: str, path) -> bytes:
    cmd = form.replace("FILE", str(path)) if "FILE" in form else f"{form} {path}"
    tool = cmd.split()[0]
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing on this machine (Debian's coreutils/xxd/bsdextrautils)")
    return subprocess.run(["sh", "-c", cmd], capture_output=True, check=True, timeout=30).stdout


def _scan(data: bytes, size: int) -> str | None:
    s = DeepScanner()
    for k in range(0, len(data), size):
        hit = s.feed(data[k:k + size])
        if hit:
            return hit
    return s.flush()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dumps")
    (d / "msg.hl7").write_bytes(hl7_message("TEST^PATIENT^THREE"))
    (d / "image.dcm").write_bytes(dicom_p10("TEST^PATIENT^ONE"))
    return d


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name, kind", [("msg.hl7", "HL7v2"), ("image.dcm", "DICOM")])
@pytest.mark.parametrize("size", [7, 333, 4096, 1 << 20])
def test_every_dump_form_is_read_back(files, form, name, kind, size):
    out = _run(form, files / name)
    assert b"TEST^PATIENT" not in out  # the dump itself does not show the name: only decoding finds it
    hit = _scan(out, size)
    assert hit is not None and hit.startswith(kind), (form, hit)


@pytest.mark.parametrize("cmd, what", [("rev FILE", "HL7v2/reversed"), ("sed 's/./& /g' FILE", "HL7v2/spaced"),
                                       ("fold -w1 FILE", "HL7v2/spaced")])
def test_respelled_text(files, cmd, what):
    out = subprocess.run(["sh", "-c", cmd.replace("FILE", str(files / "msg.hl7"))], capture_output=True,
                         check=True).stdout
    assert _scan(out, 4096) == what


@pytest.mark.parametrize("cmd", ["strings FILE", "cat -v FILE"])
def test_dicom_printed_as_text(files, cmd):
    out = subprocess.run(["sh", "-c", cmd.replace("FILE", str(files / "image.dcm"))], capture_output=True,
                         check=True).stdout
    assert _scan(out, 4096) in ("DICOM/text", "DICOM/escaped")


def test_dumps_of_programs_raise_no_patient_data_alarm():
    """Hex, decimal and binary dumps of 10 programs from /usr/bin (seeded sample, first 1 MB of each dump)."""
    rnd = random.Random(11)
    programs = [p for p in sorted(os.listdir("/usr/bin")) if os.path.isfile(f"/usr/bin/{p}")]
    for name in rnd.sample(programs, 10):
        for form in ("xxd", "od -t u1", "od -x", "hexdump -C", "xxd -b", "od -c", "od -a", "cat -A", "sed -n l"):
            out = _run(form, f"/usr/bin/{name}")[:1 << 20]
            hit = _scan(out, 32768)
            assert hit in (None, OPAQUE), (form, name, hit)


def test_dump_text_past_the_cap_counts_as_opaque(files):
    """Reading dumps back costs CPU; past the per-session cap, dump text is bounded like unreadable output."""
    budget = OpaqueBudget(64 << 10, dump_limit=256 << 10)
    s = DeepScanner(budget)
    benign = _run("xxd", "/usr/bin/ls")
    hit = None
    for k in range(0, len(benign), 32768):
        hit = s.feed(benign[k:k + 32768])
        if hit:
            break
    assert hit == OPAQUE and budget.dumped > budget.dump_limit


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.lists(st.binary(max_size=300) | st.sampled_from([b"0000000 077 083\n", b"00000000: 4d53 487c  MS\n",
                                                           b"01001101" * 9 + b"\n", b"M" + b"!" * 60 + b"\n"]),
                max_size=20))
def test_reader_takes_any_bytes(chunks):
    seen = []
    r = DumpReader(lambda: type("S", (), {"feed": lambda self, d: seen.append(d)})())
    for c in chunks:
        assert r.feed(c) is None
    r.flush()


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "0x", "\\x", "-"]),
                          st.text("0123456789abcdefABCDEF", min_size=1, max_size=9),
                          st.sampled_from([" ", ",", ", ", "  ", "\t", ";", "\n", "|", ":"])), max_size=40),
       st.sampled_from(["", "0000000 ", "00000010: ", "[", "0000020  "]))
def test_number_shaped_lines_never_raise(tokens, prefix):
    """Lines made of number-like tokens and separators of every kind (the shapes the decoders match) decode
    or are skipped; nothing raises into the relay."""
    line = (prefix + "".join(a + b + c for a, b, c in tokens)).encode()
    seen = []
    r = DumpReader(lambda: type("S", (), {"feed": lambda self, d: seen.append(d)})())
    r.feed(line + b"\n")
    r.flush()
    s = DeepScanner()
    s.feed(line + b"\n")


@pytest.mark.parametrize("cmd, what", [("fold -w 3 FILE", "HL7v2/folded"), ("fold -w 1 FILE", "HL7v2")])
@pytest.mark.parametrize("size", [7, 4096])
def test_text_folded_into_short_lines(files, cmd, what, size):
    out = subprocess.run(["sh", "-c", cmd.replace("FILE", str(files / "msg.hl7"))], capture_output=True,
                         check=True).stdout
    hit = _scan(out, size)
    assert hit is not None and hit.startswith(what.split("/")[0]), hit


@pytest.mark.parametrize("size", [7, 4096])
def test_escaped_astm_and_binary(files, tmp_path, size):
    from fixtures.patientdata import astm_message, dicom_bare

    (tmp_path / "r.txt").write_bytes(astm_message("TEST^PATIENT^FOUR"))
    (tmp_path / "bare.raw").write_bytes(dicom_bare("TEST^PATIENT^SIX"))
    for cmd, kind in (("sed -n l r.txt", "ASTM"), ("python3 -c \"print(repr(open('r.txt','rb').read()))\"", "ASTM"),
                      ("cat -A bare.raw", "DICOM"), ("cat -v bare.raw", "DICOM"), ("sed -n l bare.raw", "DICOM"),
                      ("python3 -c \"print(repr(open('bare.raw','rb').read()))\"", "DICOM")):
        out = subprocess.run(["sh", "-c", cmd], capture_output=True, check=True, cwd=tmp_path).stdout
        hit = _scan(out, size)
        assert hit is not None and hit.startswith(kind), (cmd, hit)


def test_cat_v_notation_of_a_binary_is_not_hl7_field_texture(files):
    """``cat -A`` of a program (seen: Debian's uwsgi-core) printed a 3 KB line of caret notation with pipes, empty
    fields and ``XX^YY`` pairs: the "HL7 fields without a segment name" heuristic called it patient data. NULs
    and high control bytes (``^@``, ``M-^``) say binary; an HL7 piece cut from a real message is still caught."""
    binary = (b"^@^@^@1M-vLM-^IM-WM-hM-^Q~M-{|M-^?IM-^IM-E||AU^LM-^M-.^?^B^@ATUSHM-^AM-l|M-^X^@^@^@dHM-^K^D%(^@|"
              b"HM-^IM-^D$M-^H^@^@^@1M-@HM-^IM-cHM-^IM-_M-hM-^T{M-{M-^?M->^K^@^@^@HM-^IM-_|AB^CD|M-hgzM-{M-^?1M-RHM-^I")
    assert _scan(binary + b"$\n", 4096) in (None, OPAQUE)
    piece = b"|||DOE^JANE^Q||19610203|F|||12 MAIN ST^^SPRINGFIELD^IL^62701||555-0100|||S\r\n"
    assert _scan(piece, 4096) == "HL7v2/fields"
