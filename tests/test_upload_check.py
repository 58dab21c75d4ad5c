"""sessions/upload_check.py: protected paths named in uploaded scripts and interpreter input (pure, no SSH)."""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import json
import lzma
import os
import random
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from helpers.ansible import ansible_available, build_module_payloads
from sessions.policy import ProtectedPaths, load_protected_paths
from sessions.upload_check import (JUDGE_MAX, StreamGuard, UploadJudge, find_reference, looks_like_program,
                                   path_tokens, runs_interpreter, script_candidates)

ROOT = "/srv/dev"  # the device login's home, as in the tests' device tree
DEFAULTS = load_protected_paths(Path(__file__).parent.parent / "config" / "protected-paths.toml")
PROTECTED = ProtectedPaths.build("ct-01", [f"{ROOT}/data/dicom", f"{ROOT}/var/spool/hl7", f"{ROOT}/opt/lis/data"],
                                 DEFAULTS)
HL7 = f"{ROOT}/var/spool/hl7/adt_a01.hl7"


def judge(data: bytes, home: str | None = ROOT, chunk: int = 4096, **kw):
    j = UploadJudge(PROTECTED, home, **kw)
    for i in range(0, len(data), chunk):
        j.feed(data[i:i + chunk])
    return j.finish()


def zipped(name: str, text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ansible/__init__.py", "")
        z.writestr(name, text)
    return buf.getvalue()


@pytest.mark.parametrize("text, path", [
    (f"open('{HL7}').read()", HL7),
    ("cat var/spool/hl7/adt_a01.hl7", HL7),  # home-relative
    ("cat ~/data/dicom/2026/11/study-0001.dcm", f"{ROOT}/data/dicom/2026/11/study-0001.dcm"),
    ("cat ./tmp/../opt/lis/data/result.txt", f"{ROOT}/opt/lis/data/result.txt"),
    (f"ls {ROOT}/data/dicom", f"{ROOT}/data/dicom"),  # the directory itself
    ("tar cf - /var/lib/mysql", "/var/lib/mysql"),  # a site default
    ("PATH=/usr/bin:/srv/dev/var/spool/hl7/x", f"{ROOT}/var/spool/hl7/x"),
    (f"file://{HL7}", HL7),
])
def test_plain_references_are_found(text, path):
    found = find_reference(text.encode(), PROTECTED, ROOT)
    assert found is not None and found.path == path and found.via == "plain"


def test_relative_paths_are_found_without_knowing_the_home():
    """A module may chdir anywhere: a relative path repeating a protected tree's last components counts."""
    found = find_reference(b'{"path": "../dev/var/spool/hl7/adt.hl7"}', PROTECTED, None)
    assert found is not None and found.root == f"{ROOT}/var/spool/hl7"
    assert find_reference(b"cat spool/hl7/x", PROTECTED, None) is not None
    assert find_reference(b"cat hl7/x", PROTECTED, None) is None  # one component is too weak a sign


def encodings():
    target = f"stat('{HL7}')".encode()
    ansible_args = repr(json.dumps({"ANSIBLE_MODULE_ARGS": {"path": HL7 + "\u00e9"}}))
    return {
        "json-escapes": json.dumps({"path": HL7}).replace("/", "\\/").encode(),
        "unicode-escapes": "".join(f"\\u{ord(c):04x}" for c in HL7).encode(),
        "python-repr-of-json": ansible_args.encode(),
        "base64": b"echo " + base64.b64encode(target) + b" | base64 -d | python3",
        "base64url": base64.urlsafe_b64encode(b"\xfb\xff" + target),
        "base64-wrapped": base64.encodebytes(target * 4),
        "hex": target.hex().encode(),
        "gzip+base64": base64.b64encode(gzip.compress(target)),
        "xz": lzma.compress(target),
        "bzip2+base64": base64.b64encode(bz2.compress(target)),
        "base64+base64": base64.b64encode(base64.b64encode(target)),
        "zip member (AnsiballZ payload)": b"zip_data='" + base64.b64encode(zipped("ansible/modules/x.py",
                                                                                    f"P = {HL7!r}")) + b"'",
        "raw zipapp": b"#!/usr/bin/python3\n" + zipped("__main__.py", f"open({HL7!r})"),
    }


@pytest.mark.parametrize("name", list(encodings()))
@pytest.mark.parametrize("chunk", [1 << 20, 4096, 61])
def test_encoded_references_are_found_in_any_chunking(name, chunk):
    found = judge(encodings()[name], chunk=chunk)
    assert found is not None and found.root == f"{ROOT}/var/spool/hl7", name


@pytest.mark.parametrize("text", [
    f"cat {ROOT}/data/dicomx/a", f"ls {ROOT}/data", f"ls {ROOT}/var/spool", "cat data/dicom.txt",
    "cp firmware/fw-4.2.1.bin tmp/", "echo metadata hl7 dicom", f"cat {ROOT}/tmp/notes.txt",
    "grep -r error /var/log", "ls /var/lib", "cat /data/dicomweb/config",
])
def test_neighbours_and_ancestors_are_not_references(text):
    assert find_reference(text.encode(), PROTECTED, ROOT) is None


def test_eager_mode_sees_a_path_before_the_run_ends():
    """On an exec channel's stdin a decoder (base64 -d | sh) acts on a run while it streams: eager mode
    refuses the chunk that completes the path, long before the run ends."""
    script = b"echo hi\n" * 2000 + f"cat {HL7}\n".encode() + b"echo bye\n" * 2000
    stream = base64.b64encode(script)
    at = stream.index(base64.b64encode(script)[len(b"echo hi\n" * 2000) * 4 // 3 + 64:][:8])
    j = UploadJudge(PROTECTED, ROOT, eager=True)
    hit_at = None
    for i in range(0, len(stream), 61):
        if j.feed(stream[i:i + 61]) and hit_at is None:
            hit_at = i
    assert hit_at is not None and hit_at < at + 4096
    lazy = UploadJudge(PROTECTED, ROOT)
    assert all(lazy.feed(stream[i:i + 61]) is None for i in range(0, len(stream), 61))
    assert lazy.finish() is not None


def test_the_judge_reads_at_most_its_limit():
    j = UploadJudge(PROTECTED, ROOT, limit=1 << 16)
    for _ in range(8):
        assert j.feed(os.urandom(1 << 14)) is None
    j.feed(f" {HL7} ".encode())
    assert j.finish() is None and j.unjudged > 0 and j.judged <= 1 << 16
    assert JUDGE_MAX >= 16 << 20


def test_stream_guard_says_why():
    guard = StreamGuard(PROTECTED, "the uploaded file /srv/dev/tmp/x.py", ROOT)
    assert guard.feed(b"import os\n") is None
    reason = guard.feed(f"open('{HL7}')\n".encode())
    assert reason and HL7 in reason and "protected patient-data directory on ct-01" in reason
    assert guard.finish() == reason and guard.reference.path == HL7


# ---------------------------------------------------------------- no false alarms
def test_no_false_alarm_on_random_data_and_system_files():
    rng = random.Random(11)
    blobs = [rng.randbytes(1 << 20), base64.encodebytes(rng.randbytes(1 << 19)), rng.randbytes(1 << 19).hex().encode(),
             gzip.compress(rng.randbytes(1 << 18))]
    docs = [p for p in sorted(Path("/usr/share/doc").rglob("*"))[:1500]
            if p.is_file() and not p.is_symlink() and p.stat().st_size < 1 << 20]
    blobs += [p.read_bytes() for p in docs if p.suffix != ".gz"]
    blobs += [p.read_bytes() for p in docs if p.suffix == ".gz"][:40]  # judged whole, expanded: slower
    bins = sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink())[:60]
    blobs += [p.read_bytes()[:2 << 20] for p in bins]
    hits = [(i, judge(b, chunk=32768)) for i, b in enumerate(blobs)]
    assert [h for h in hits if h[1] is not None] == []


@pytest.fixture(scope="module")
def ansible_payloads(tmp_path_factory):
    if not ansible_available():
        pytest.skip("ansible-core is not installed (pip install -e '.[test]')")
    protected_file = f"{ROOT}/var/spool/hl7/adt_a01.hl7"
    return build_module_payloads(tmp_path_factory.mktemp("ansiballz"), [
        ("setup", {}), ("command", {"cmd": "uptime"}), ("ping", {}),
        ("lineinfile", {"path": "/tmp/mb-ansible-svc.conf", "line": "log_level=debug", "create": True}),
        ("file", {"path": "/tmp/mb-ansible-fw", "state": "directory"}),
        ("find", {"paths": "/tmp", "patterns": "*.log"}),
        ("stat", {"path": protected_file, "get_mime": True}), ("slurp", {"src": protected_file}),
    ])


BENIGN = ("setup", "command", "ping", "lineinfile", "file", "find")


@pytest.mark.parametrize("module", BENIGN)
def test_ordinary_ansible_modules_pass(ansible_payloads, module):
    payload = ansible_payloads[module]
    assert payload.startswith(b"#!") and b"_ansiballz_main" in payload
    assert judge(payload, chunk=32768) is None
    assert judge(payload, chunk=32768, eager=True) is None


@pytest.mark.parametrize("module", ["stat", "slurp"])
def test_ansible_modules_reading_protected_paths_are_found(ansible_payloads, module):
    found = judge(ansible_payloads[module], chunk=32768)
    assert found is not None and found.root == f"{ROOT}/var/spool/hl7"


def test_ansible_module_args_inside_the_zip_are_found(ansible_payloads):
    """Older ansible-core (and a hand-made wrapper) put the arguments inside the zipped payload."""
    benign = ansible_payloads["command"]
    start = benign.index(b"zip_data='") + len(b"zip_data='")
    end = benign.index(b"'", start)
    buf = io.BytesIO(base64.b64decode(benign[start:end]))
    with zipfile.ZipFile(buf, "a") as z:
        z.writestr("ansible/module_utils/args.json", json.dumps({"ANSIBLE_MODULE_ARGS": {"src": HL7}}))
    crafted = benign[:start] + base64.b64encode(buf.getvalue()) + benign[end:]
    found = judge(crafted, chunk=32768)
    assert found is not None and found.via.startswith("base64 > zip:ansible/module_utils/args.json")


# ---------------------------------------------------------------- fuzz
_WRAP = {
    "plain": lambda b: b,
    "base64": base64.b64encode,
    "hex": lambda b: b.hex().encode(),
    "gzip+base64": lambda b: base64.b64encode(gzip.compress(b)),
    "json": lambda b: json.dumps(b.decode()).replace("/", "\\/").encode(),
}
_filler = st.text(st.sampled_from(list("abc xyz=\n;'\"{}0123456789/.-_")), max_size=300)


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(before=_filler, after=_filler, how=st.sampled_from(sorted(_WRAP)),
       cuts=st.lists(st.integers(min_value=1, max_value=97), max_size=40), eager=st.booleans())
def test_fuzz_a_path_is_found_whatever_surrounds_and_splits_it(before, after, how, cuts, eager):
    body = _WRAP[how](f"open('{HL7}')".encode())
    data = before.encode() + b" " + body + b" " + after.encode()
    j, at = UploadJudge(PROTECTED, ROOT, eager=eager), 0
    for n in cuts:
        j.feed(data[at:at + n])
        at += n
    j.feed(data[at:])
    found = j.finish()
    assert found is not None and found.root == f"{ROOT}/var/spool/hl7"


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=10),
       eager=st.booleans())
def test_fuzz_arbitrary_bytes_never_crash(data, cuts, eager):
    j, at = UploadJudge(PROTECTED, ROOT, eager=eager), 0
    for n in cuts:
        j.feed(data[at:at + n])
        at += n
    j.feed(data[at:])
    j.finish()
    find_reference(data, PROTECTED, None)


# ---------------------------------------------------------------- programs vs data, scripts a command runs
@pytest.mark.parametrize("name, head, program", [
    ("AnsiballZ_stat.py", b"#!/usr/bin/python3\n", True), ("source", b"#!/bin/sh\necho", True),
    ("collect.pl", b"use strict;", True), ("app.pyz", b"PK\x03\x04", True), ("tool", b"\x7fELF\x02", True),
    ("my.cnf", b"[mysqld]\ndatadir=/var/lib/mysql\n", False), ("orthanc.json", b'{"StorageDirectory"', False),
    ("fw-4.2.1.img", b"\x00\x01\x02", False),
])
def test_looks_like_program(name, head, program):
    assert looks_like_program(name, head) is program


def test_configuration_files_are_not_judged_as_programs():
    config = b"[mysqld]\ndatadir=/var/lib/mysql\nsocket=/var/run/mysqld/mysqld.sock\n"
    assert judge(config) is not None  # it does name a protected directory...
    j = UploadJudge(PROTECTED, ROOT, program="/etc/mysql/my.cnf")
    assert j.feed(config) is None and j.finish() is None and j.unjudged == len(config)  # ...but is not a program
    script = UploadJudge(PROTECTED, ROOT, program="/srv/dev/tmp/collect.sh")
    script.feed(b"#!/bin/sh\ncat " + HL7.encode() + b"\n")
    assert script.finish() is not None


@pytest.mark.parametrize("command, scripts", [
    ("/bin/sh -c '/usr/bin/python3 ~alice@ct-01/.ansible/tmp/ansible-tmp-1/AnsiballZ_stat.py && sleep 0'",
     ["~alice@ct-01/.ansible/tmp/ansible-tmp-1/AnsiballZ_stat.py"]),
    ("/bin/sh -c '/usr/bin/python3 && sleep 0'", []), ("python3 -u tmp/x.txt arg", ["tmp/x.txt"]),
    ("./collect --all", ["./collect"]), ("FOO=1 ~/run.sh", ["~/run.sh"]), ("env python3 tmp/a", ["tmp/a"]),
    ("sudo python3 x.py", ["x.py"]), ("timeout 5 ./a.sh", ["./a.sh"]), ("echo hi | sh tmp/s", ["tmp/s"]),
    ("awk -f prog.awk data", ["prog.awk"]), ("python3 -c 'print(1)'", []), ("perl -e 1", []),
    ("ls -l /tmp", []), ("cat tmp/x", []), ("/usr/bin/uptime", []), ("uname -a; df -h", []),
    ("cd tmp && ./tool", ["tmp/./tool"]), ("cd /opt/vendor; python3 diag.py", ["/opt/vendor/diag.py"]),
    ("cd tmp; cd sub && sh run", ["tmp/sub/run"]), ("cd ~ && ./x", ["./x"]),
])
def test_script_candidates(command, scripts):
    assert script_candidates(command) == scripts


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text(max_size=300))
def test_fuzz_script_candidates_never_crash(command):
    assert len(script_candidates(command)) <= 4


def test_path_tokens_are_the_paths_a_script_names():
    script = (b"#!/usr/bin/python3\nimport os\nP = 'tmp/images/2026/11/study-0001.dcm'\n"
              b"os.system('/usr/bin/uptime')\nopen(\"~/service/latest.dcm\"); u = 'https://example.org/x'\n"
              b"open('tmp/images/2026/11/study-0001.dcm')\n")
    # once each, in order; system programs and URLs ("https" then "//example.org/x") are not resolved
    assert path_tokens(script) == ["tmp/images/2026/11/study-0001.dcm", "~/service/latest.dcm"]
    assert len(path_tokens(b" ".join(b"d%d/f" % i for i in range(100)))) == 32


def test_stream_guard_vet_resolves_the_words_of_the_stream():
    import asyncio
    asked = []

    async def resolve(data: bytes):
        asked.append(path_tokens(data))
        return ("tmp/images/x.dcm", f"{ROOT}/data/dicom/x.dcm") if b"tmp/images" in data else None

    guard = StreamGuard(PROTECTED, "the input of this command", ROOT, resolve=resolve)
    assert guard.feed(b"print(open('tmp/images/x.dcm').read())\n") is None and guard.finish() is None
    reason = asyncio.run(guard.vet())
    assert reason.startswith("the input of this command names tmp/images/x.dcm, which is ")
    assert f"{ROOT}/data/dicom/x.dcm is inside {ROOT}/data/dicom" in reason and asked == [["tmp/images/x.dcm"]]
    plain = StreamGuard(PROTECTED, "x", ROOT, resolve=resolve)
    plain.feed(b"print(1)\n")
    assert asyncio.run(plain.vet()) is None


@pytest.mark.parametrize("command, interpreter", [
    ("/bin/sh -c '/usr/bin/python3 && sleep 0'", True), ("python3 -", True), ("sh -s", True), ("perl", True),
    ("env python3", True), ("sudo bash", True), ("cat > /etc/mysql/my.cnf", False),
    ("dd of=~/.ansible/tmp/x/AnsiballZ_ping.py bs=65536", False), ("tee tmp/notes.txt", False),
    ("cat | python3", True), ("LANG=C awk '{print}'", True),
])
def test_runs_interpreter(command, interpreter):
    assert runs_interpreter(command) is interpreter
