"""The deep output scanner end to end: encodings, compression and opaque output on an exposed device.

The patient file is copied out of its protected directory on the device side first (as a test setup), so
the command line names no protected path and the output scanner is the only layer that can stop it.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import poll as _wait

from sessions.recording import read_frames

pytestmark = pytest.mark.openssh
CANARY = b"TEST^PATIENT^THREE"


def _alert(w) -> dict:
    """The last alert.exfiltration row's fields."""
    row = w.events("alert.exfiltration")[-1]
    detail = row.get("detail") or row.get("details") or row.get("data") or {}
    if isinstance(detail, str):
        import json

        detail = json.loads(detail)
    return {**row, **detail}


@pytest.fixture
def staged(exposed_world):
    """(world, path on the device of a copy of the HL7 file under a benign name)."""
    w = exposed_world
    w.grant()
    src = w.device.tree.patient["hl7_file"]
    dst = w.device.tree.root / "tmp" / "notes-0417.txt"
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
    assert CANARY in dst.read_bytes()
    return w, dst


def _assert_stopped(w, r, expected_output: bytes, content: str) -> None:
    assert r.returncode != 0
    assert CANARY not in r.stdout
    assert expected_output[:48] not in r.stdout  # not even the start of the encoded file reached the vendor
    assert b"output contained" in r.stderr and b"patient data" in r.stderr, r.stderr  # the scanner, not a refusal
    assert _wait(lambda: w.events("alert.exfiltration")), (r.stderr, [e["event"] for e in w.events()])
    alert = _alert(w)
    assert alert["content"].startswith(content), alert
    assert _wait(lambda: w.app.store.list_sessions()[-1]["status"] == "stopped")
    row = w.app.store.list_sessions()[-1]
    frames = list(read_frames(w.app.recordings.local_path(row["recording"]), key_lookup=w.app.keys.get))
    alerts = [f.event() for f in frames if f.kind == "alert"]
    assert alerts and alerts[0]["content"] == alert["content"]
    recorded = b"".join(f.payload for f in frames if f.kind == "output")
    assert CANARY not in recorded and expected_output[:48] not in recorded


@pytest.mark.parametrize("command, content", [
    ("gzip -c {f}", "HL7v2/gzip"),
    ("gzip -c {f} | base64", "HL7v2/gzip/base64"),
    ("tr A-Za-z N-ZA-Mn-za-m < {f}", "HL7v2"),
    ("base32 {f}", "HL7v2/base32"),
    ("xxd -i {f}", "HL7v2"),
    ("od -b {f}", "HL7v2"),
    # JSON around a short base64 field, as Ansible's slurp prints it (inline Python that builds strings is
    # refused before it runs on an exposed device: docs/data-protection.md, "Commands resolved like files")
    ("printf '{{\"changed\":false,\"content\":\"'; base64 -w0 {f}; printf '\",\"encoding\":\"base64\"}}\\n'",
     "HL7v2/base64"),
])
def test_encoded_patient_data_in_exec_output_stops_the_session(staged, command, content):
    w, f = staged
    command = command.format(f=f)
    expected = subprocess.run(["sh", "-c", command], capture_output=True, check=True).stdout
    assert CANARY not in expected  # the device's own output, encoded
    r = w.ssh("alice@ct-01", command)
    if b'"content":"' in expected:  # JSON around a short base64 field (Ansible's slurp)
        expected = expected[expected.index(b'"content":"') + 11:]
    _assert_stopped(w, r, expected, content)


@pytest.mark.parametrize("command, content", [
    ("od -t u1 {f}", "HL7v2"),           # decimal bytes
    ("od -A n -t d1 {f}", "HL7v2"),      # signed decimal, no offsets
    ("xxd -b {f}", "HL7v2"),             # binary digits, six bytes a line
    ("od -x {f}", "HL7v2"),              # little-endian 16-bit words
    ("od -t o2 {f}", "HL7v2"),           # octal words
    ("basenc --base2msbf {f}", "HL7v2"),  # one long run of bits, wrapped mid-byte
    ("bzip2 -c {f} | od -t x1", "HL7v2/bzip2"),
    ("python3 -c \"print(list(open('{f}','rb').read()))\"", "HL7v2"),
    ("rev {f}", "HL7v2"),                 # /reversed or /fields: which check sees it first depends on the pieces
    ("sed 's/./& /g' {f}", "HL7v2/spaced"),
])
def test_patient_data_as_numbers_or_respelled_stops_the_session(staged, command, content):
    """Any numeric dump is read back into bytes (radix, word size, byte and bit order do not matter), and
    reversed or spaced-out text is recognised: variants of the od/xxd family the listed forms would miss."""
    w, f = staged
    command = command.format(f=f)
    expected = subprocess.run(["sh", "-c", command], capture_output=True, check=True).stdout
    assert CANARY not in expected
    r = w.ssh("alice@ct-01", command)
    _assert_stopped(w, r, expected, content)


def test_random_output_over_the_opaque_budget_ends_the_session(staged):
    w, _ = staged
    r = w.ssh("alice@ct-01", "head -c 200000 /dev/urandom | base64")
    assert r.returncode != 0
    assert len(r.stdout) < 64 * 1024 + 48 * 1024, len(r.stdout)  # the budget plus what was in flight
    assert b"could not be inspected" in r.stderr, r.stderr
    assert _wait(lambda: w.events("alert.exfiltration"))
    alert = _alert(w)
    assert alert["content"] == "opaque" and "could not be inspected" in alert["reason"]
    assert alert["limit_bytes"] == 65536 and alert["opaque_bytes"] > 65536
    assert _wait(lambda: w.app.store.list_sessions()[-1]["status"] == "stopped")
    row = w.app.store.list_sessions()[-1]
    frames = list(read_frames(w.app.recordings.local_path(row["recording"]), key_lookup=w.app.keys.get))
    assert any(f.kind == "alert" and f.event()["content"] == "opaque" for f in frames)


def test_ordinary_output_does_not_trip_the_budget(staged):
    w, _ = staged
    r = w.ssh("alice@ct-01", "ps aux; ls -lR /usr/share/doc | head -c 300000; dmesg 2>/dev/null | tail -n 200; "
                             "dpkg -l 2>/dev/null | head -n 400; cat /usr/bin/ls | head -c 100000 | wc -c")
    assert r.returncode == 0, r.stderr
    assert b"could not be inspected" not in r.stderr
    assert not w.events("alert.exfiltration")


@pytest.mark.parametrize("command", ["gzip -c {f} | base64", "base32 {f} | tr A-Z a-z", "od -c {f}"])
def test_encoded_patient_data_typed_in_an_interactive_shell_is_stopped(staged, command):
    import re

    w, f = staged
    term = w.pty("alice@ct-01")
    try:
        term.expect(re.compile(rb"[#$] "), timeout=15)
        term.sendline(command.format(f=f))
        term.read_until_eof(timeout=15)
    finally:
        term.wait(timeout=10)
        term.close()
    shown = bytes(term.output)
    encoded = subprocess.run(["sh", "-c", command.format(f=f)], capture_output=True, check=True).stdout
    assert CANARY not in shown and encoded[:48] not in shown.replace(b"\r\n", b"\n")
    assert b"patient data" in shown
    assert _wait(lambda: w.events("alert.exfiltration"))
    assert _alert(w)["content"].startswith("HL7v2")
