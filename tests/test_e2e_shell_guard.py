"""Patient data never leaves through exec or shell output: command checks and the output scanner, end to end."""

from __future__ import annotations

import re
import shutil

import pytest

from helpers import poll as _wait
from helpers.broker import World

pytestmark = pytest.mark.openssh
PROMPT = re.compile(rb"[#$] ")


@pytest.fixture
def world(tmp_path, device):
    # Exposed: the login can read the patient directories, so these tests show the broker's own guards.
    w = World(tmp_path, device(exposed=True)).setup()
    w.grant()
    try:
        yield w
    finally:
        w.close()


def test_exec_naming_a_protected_path_is_refused_and_audited(world):
    dicom = world.device.tree.dicom_dir
    for command in (f"cat {dicom}/2026/11/study-0001.dcm", f"cd {dicom} && tar cf - .",
                    f"cat '{dicom}'/*", f"cp -r {dicom.parent}/di* /tmp/x"):
        r = world.ssh("alice@ct-01", command)
        assert r.returncode == 1, command
        assert b"protected" in r.stderr and b"DICM" not in r.stdout, (command, r.stderr)
    assert _wait(lambda: len(world.events("exec.denied")) >= 4)
    assert world.device.log_text().count("Starting session: command") == 0  # nothing reached the device


def test_ordinary_maintenance_commands_still_work(world):
    log = world.device.tree.system_log
    r = world.ssh("alice@ct-01", f"tail -n 2 {log}; ls {world.device.tree.firmware_dir}")
    assert r.returncode == 0 and b"version.txt" in r.stdout and r.stderr == b""


@pytest.mark.parametrize("how", ["cat", "base64", "tar", "xxd"])
def test_patient_data_in_exec_output_stops_the_session(world, how):
    disguised = world.device.tree.patient["renamed_dicom"]  # a DICOM file copied to tmp/ as report.pdf
    command = {"cat": f"cat {disguised}", "base64": f"base64 {disguised}",
               "tar": f"tar cf - -C {disguised.parent} {disguised.name}", "xxd": f"xxd -p {disguised}"}[how]
    r = world.ssh("alice@ct-01", command)
    assert r.returncode != 0
    assert b"TEST^PATIENT" not in r.stdout and b"DICM" not in r.stdout
    assert b"patient data" in r.stderr
    assert _wait(lambda: world.events("alert.exfiltration"))
    assert _wait(lambda: world.app.store.list_sessions()[-1]["status"] == "stopped")


def test_patient_data_shown_in_an_interactive_shell_is_stopped(world):
    # A copy outside the protected tree (made before the session): no command check can know it is patient
    # data, and lines naming the protected tree are refused before they run (tests/test_e2e_cmdpath.py).
    copy = world.device.tree.tmp_dir / "innocent.txt"
    shutil.copyfile(world.device.tree.patient["hl7_file"], copy)
    copy.chmod(0o644)
    term = world.pty("alice@ct-01")
    try:
        term.expect(PROMPT, timeout=15)
        term.sendline(f"cat {copy}")
        term.read_until_eof(timeout=15)
    finally:
        term.wait(timeout=10)
        term.close()
    shown = bytes(term.output)
    assert b"TEST^PATIENT^THREE" not in shown
    assert b"patient data" in shown
    assert _wait(lambda: world.events("alert.exfiltration"))
