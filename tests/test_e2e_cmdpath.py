"""Commands resolved like files, end to end: exec and interactive shell lines whose paths reach patient data
through symlinks in the service area, or are built at run time, never run; ordinary maintenance still does.

Real OpenSSH against the broker and a real sshd device, contained (``world``) and exposed (``exposed_world``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import time

import pytest
from helpers import poll as _wait

pytestmark = pytest.mark.openssh
PROMPT = re.compile(rb"[#$] $")
PS2 = re.compile(rb"> $")
DICOM_CANARY = b"TEST^PATIENT"
HL7_CANARY = b"TEST^PATIENT^THREE"

SYMLINKED = ["tail -c +140 service/latest.dcm", "cut -c2- service/patients-link/adt_a01.hl7",
             "cd service && tail -c +140 latest.dcm", "cd service/patients-link; cat adt_a01.hl7",
             "cat service/*.dcm", "od -c service/patients-link/adt_a01.hl7",
             "grep -a PID service/patients-link/*", "tar cf - service/patients-link/",
             "CDPATH=service cd patients-link && cat adt_a01.hl7"]
RUNTIME = ["cat $(echo c2VydmljZS9sYXRlc3QuZGNt | base64 -d)", "cat `printf %b 'service/latest\\x2edcm'`",
           "echo c2VydmljZS9sYXRlc3QuZGNt | base64 -d | xargs cat",
           "IFS=_; c=cat_service/latest.dcm; $c",
           "python3 -c \"print(open('serv'+'ice/latest.dcm','rb').read()[132:])\"",
           "perl -e 'open F, \"serv\" . \"ice/patients-link/adt_a01.hl7\"; print <F>'",
           "while read p; do cat \"$p\"; done <<< service/latest.dcm",
           "echo Y2F0IHNlcnZpY2UvbGF0ZXN0LmRjbQ== | base64 -d | sh",
           "X=service/latest.dcm; sh -c \"tail -c +140 $X\"",
           "find service -name latest.dcm -exec tail -c +140 {} +", "grep -R -a PID service", "tar chf - service"]
BENIGN = ["ls service", "cat service/logs/system.log", "tail -n 1 service/logs/system.log",
          "cd service && ls", "cd service/logs && grep -c boot system.log", "ls -la service/firmware",
          "echo hello from $(hostname)", "for f in service/logs/*.log; do wc -l $f; done",
          "grep -r gantry service/logs", "find service/firmware -type f"]


def _links(w):
    """service/latest.dcm -> a DICOM file, service/patients-link -> the HL7 spool; owned by the device login."""
    tree = w.device.tree
    service = tree.root / "service"
    latest, link = service / "latest.dcm", service / "patients-link"
    latest.symlink_to(tree.patient["dicom_file"])
    link.symlink_to(tree.patient["hl7_dir"])
    if os.geteuid() == 0 and w.device.login:
        entry = pwd.getpwnam(w.device.login)
        for p in (latest, link):
            os.chown(p, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return latest, link


@pytest.fixture
def exposed(exposed_world):
    _links(exposed_world)
    exposed_world.grant()
    return exposed_world


@pytest.fixture
def contained(world):
    _links(world)
    world.grant()
    return world


@pytest.mark.parametrize("command", SYMLINKED)
def test_exec_through_a_symlink_into_patient_data_is_refused(exposed, command):
    before = len(exposed.events("exec.denied"))
    r = exposed.ssh("alice@ct-01", command)
    assert r.returncode != 0, command
    assert DICOM_CANARY not in r.stdout and HL7_CANARY not in r.stdout and b"DICM" not in r.stdout
    assert b"protected patient-data directory" in r.stderr, r.stderr
    assert _wait(lambda: len(exposed.events("exec.denied")) > before)
    row = _details(exposed.events("exec.denied")[-1])
    assert row["command"] == command and row["kind"] == "exec"
    assert exposed.device.log_text().count("Starting session: command") == 0  # the device never ran it


@pytest.mark.parametrize("command", RUNTIME)
def test_exec_building_paths_at_run_time_is_refused_on_an_exposed_device(exposed, command):
    r = exposed.ssh("alice@ct-01", command)
    assert r.returncode != 0, command
    assert DICOM_CANARY not in r.stdout and HL7_CANARY not in r.stdout
    assert b"medbroker refuses commands whose paths are only known when they run" in r.stderr or \
        b"protected patient-data directory" in r.stderr, r.stderr
    assert _wait(lambda: exposed.events("exec.denied"))


@pytest.mark.parametrize("command", BENIGN)
def test_ordinary_maintenance_still_runs_on_an_exposed_device(exposed, command):
    r = exposed.ssh("alice@ct-01", command)
    assert r.returncode == 0 and r.stderr == b"", (command, r.stderr)
    assert r.stdout


@pytest.mark.parametrize("command", BENIGN + ["tail -c +140 service/latest.dcm"])
def test_contained_device_runs_maintenance_and_the_symlink_is_refused_too(contained, command):
    r = contained.ssh("alice@ct-01", command)
    if "latest.dcm" in command:  # the broker refuses before the device's own permission check would
        assert r.returncode != 0 and b"protected patient-data directory" in r.stderr
        assert DICOM_CANARY not in r.stdout
    else:
        assert r.returncode == 0 and r.stderr == b"", (command, r.stderr)


def _shell(w):
    term = w.pty("alice@ct-01")
    term.expect(PROMPT, timeout=15)
    return term


def _line(term, text, timeout=10):
    """Type a line, wait for the next prompt, return what the terminal showed for it."""
    start = len(term.output)
    term.sendline(text)
    term.expect(PROMPT, timeout=timeout)
    return bytes(term.output[start:])


@pytest.mark.parametrize("world_name", ["exposed", "contained"])
def test_shell_lines_through_symlinks_are_refused_before_they_run(request, world_name):
    w = request.getfixturevalue(world_name)
    term = _shell(w)
    try:
        shown = _line(term, "tail -c +140 service/latest.dcm")
        assert b"protected patient-data directory" in shown and DICOM_CANARY not in shown
        shown = _line(term, "cd service")
        shown += _line(term, "tail -c +140 latest.dcm")  # relative to where the shell is now
        assert b"protected patient-data directory" in shown and DICOM_CANARY not in shown
        if world_name == "exposed":  # (the contained world protects data/dicom only)
            shown = _line(term, "cut -c2- patients-link/adt_a01.hl7")
            assert b"protected patient-data directory" in shown and HL7_CANARY not in shown
        shown = _line(term, "cat logs/system.log")  # the shell is still usable, in service/
        assert b"gantry: rotation error" in shown
        term.sendline("exit")
        term.read_until_eof(timeout=15)
    finally:
        term.wait(timeout=10)
        term.close()
    everything = bytes(term.output)
    assert DICOM_CANARY not in everything and HL7_CANARY not in everything
    assert _wait(lambda: len([e for e in w.events("exec.denied") if _kind(e) == "shell-line"]) >= 2)
    assert "Starting session: shell" in w.device.log_text()
    assert "latest.dcm" in _details([e for e in w.events("exec.denied") if _kind(e) == "shell-line"][0])["command"]
    assert not w.events("alert.exfiltration")  # refused before running, not caught in the output afterwards


def _details(row):
    details = row.get("details") or "{}"
    return {**row, **(json.loads(details) if isinstance(details, str) else details)}


def _kind(row):
    return _details(row).get("kind")


def test_shell_lines_built_at_run_time_are_refused_on_an_exposed_device(exposed):
    term = _shell(exposed)
    try:
        for line in ("cat $(echo c2VydmljZS9sYXRlc3QuZGNt | base64 -d)",
                     "echo c2VydmljZS9sYXRlc3QuZGNt | base64 -d | xargs cat",
                     "python3 -c \"print(open('serv'+'ice/latest.dcm','rb').read()[132:])\""):
            shown = _line(term, line)
            assert b"refused" in shown and DICOM_CANARY not in shown, shown
        shown = _line(term, "ls service")
        assert b"patients-link" in shown and b"refused" not in shown
        shown = _line(term, "tail -c +140 service/latest.dcm # it's only a comment")
        assert b"refused" in shown and DICOM_CANARY not in shown
        term.sendline("for f in service/logs/*.log; do")
        term.expect(PS2, timeout=10)
        term.sendline("wc -l $f")
        term.expect(PS2, timeout=10)
        shown = _line(term, "done")
        assert b"system.log" in shown and b"refused" not in shown, shown
        term.sendline("cat > /tmp/cmdpath-$$.txt <<'EOF'")
        term.expect(PS2, timeout=10)
        term.sendline("it's a note; cat service/latest.dcm")  # a here-doc body is data, not a command
        term.expect(PS2, timeout=10)
        shown = _line(term, "EOF")
        shown += _line(term, "cat /tmp/cmdpath-$$.txt; rm -f /tmp/cmdpath-$$.txt")
        assert b"it's a note" in shown and b"refused" not in shown, shown
        term.sendline("exit")
        term.read_until_eof(timeout=15)
    finally:
        term.wait(timeout=10)
        term.close()
    assert DICOM_CANARY not in bytes(term.output)


def test_shell_without_a_pty_has_each_input_line_judged(exposed):
    script = b"tail -c +140 service/latest.dcm\nls service\ncd service\ncut -c2- patients-link/adt_a01.hl7\necho done"
    r = exposed.ssh("alice@ct-01", None, input=script)
    assert DICOM_CANARY not in r.stdout and HL7_CANARY not in r.stdout
    assert b"patients-link" in r.stdout and r.stdout.rstrip().endswith(b"done")  # the others ran, in order
    assert r.stderr.count(b"protected patient-data directory") == 2, r.stderr
    assert _wait(lambda: len([e for e in exposed.events("exec.denied") if _kind(e) == "shell-line"]) == 2)


def test_an_interactive_program_started_by_exec_with_a_pty_is_guarded_too(exposed):
    term = exposed.pty("alice@ct-01", "sh -i")  # a shell started as an exec command, e.g. su or sudo -i
    try:
        term.expect(PROMPT, timeout=15)
        shown = _line(term, "tail -c +140 service/latest.dcm")
        assert b"protected patient-data directory" in shown and DICOM_CANARY not in shown
        shown = _line(term, "cat service/logs/system.log")
        assert b"gantry" in shown
        term.sendline("exit")
        term.read_until_eof(timeout=15)
    finally:
        term.wait(timeout=10)
        term.close()


def test_exec_of_a_shell_reading_the_vendors_input_has_each_line_judged(exposed):
    r = exposed.ssh("alice@ct-01", "sh", input=b"tail -c +140 service/latest.dcm\nls service\n")
    # Refused either line by line (the line guard) or as a whole (the input guard of an interpreter's
    # program: sessions/upload_check.py, which judges the stream before any of it runs); never run.
    assert DICOM_CANARY not in r.stdout and r.returncode != 0
    assert b"protected patient-data directory" in r.stderr


def test_a_line_run_by_a_rebound_key_is_judged_as_it_runs_and_ends_the_session(exposed):
    term = exposed.pty("alice@ct-01", "bash --norc --noprofile -i")
    try:
        term.expect(PROMPT, timeout=15)
        _line(term, "bind '\"\\C-x\": accept-line'")  # Ctrl-X now runs the line, no Enter needed
        term.send("tail -c +140 service/latest.dcm")
        time.sleep(0.2)
        term.send(b"\x18")
        term.read_until_eof(timeout=15)
    finally:
        term.wait(timeout=10)
        term.close()
    shown = bytes(term.output)
    assert b"was ended" in shown and DICOM_CANARY not in shown, shown
    assert _wait(lambda: exposed.app.store.list_sessions()[-1]["status"] == "stopped")
    # Two guards race here, and either one must end it: when the device's echo of the line and the file's
    # first bytes arrive in separate packets, the line judge sees the line ran and refuses it (its output held
    # while judged); when sshd sends them in one packet, the output scanner sees the DICOM bytes first and
    # ends the session before the line judge gets the echo (seen once in a CI run under load).
    if b"refused" in shown:
        assert _wait(lambda: [e for e in exposed.events("exec.denied") if _kind(e) == "shell-line"])
    else:
        assert b"DICOM" in shown, shown
        assert _wait(lambda: exposed.events("alert.exfiltration"))


def test_on_a_contained_device_run_time_paths_are_left_to_the_device(contained):
    # base64 of service/latest.dcm: the broker cannot know the path; the device's permissions refuse the read
    r = contained.ssh("alice@ct-01", "tail -c +140 $(echo c2VydmljZS9sYXRlc3QuZGNt | base64 -d)")
    assert r.returncode != 0 and DICOM_CANARY not in r.stdout
    assert b"Permission denied" in r.stderr and b"medbroker" not in r.stderr, r.stderr
