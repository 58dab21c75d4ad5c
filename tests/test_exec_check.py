"""Exec command check: protected paths named through quotes, escapes, cd, globs, sh -c and friends."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from sessions.exec_check import check_command_line
from sessions.policy import ProtectedPaths

PP = ProtectedPaths.build("ct-01", ["/data/dicom"], ["/var/lib/orthanc", "/var/spool/hl7"])
HOME = "/home/svc"

REFUSED = [
    "cat /data/dicom/x.dcm",
    "cat '/data/dic'\"om\"/x",
    "cat /data/di\\com/x",
    "cat /data//dicom/./x",
    "cat /tmp/../data/dicom/x",
    "cd /data && cat dicom/x",
    "cd /data; tar cf - dicom",
    "cd /; cd data; cat dicom/IM000001",
    "cd /data/dicom",
    "tar -C /data -cf - dicom",
    "tar cf - /data",
    "ls -R /data",
    "ls -laR /var",
    "cp -r /data /tmp/copy",
    "cat /data/di*/x",
    "cat /data/dicom/*",
    "cat /data/[d]icom/x",
    "ls /d*",
    "du -sh /var/lib/*",
    "cat /data/{dicom,x}/y",
    "sh -c 'cat /data/dicom/x'",
    "bash -c \"cd /data; cat dicom/*\"",
    "su -c 'tar cf - /var/spool/hl7' root",
    "cat $'\\x2fdata/dicom/x'",
    "cat $'\\057data/dicom/x'",
    "cat ${HOME}/../../../data/dicom/x",
    "cat ~/../../data/dicom/x",
    "D=/data/dicom; cat $D/x",
    "scp -f /data/dicom/x",
    "rsync -a host:/data/dicom /tmp",
    "dd if=/data/dicom/x of=/tmp/y",
    "cat </data/dicom/x",
    "cat</data/dicom/x",
    "echo $(cat /data/dicom/x)",
    "cat `echo /data/dicom/x`",
    "sudo -u root cat /var/spool/hl7/a.hl7",
    "timeout 10 nice -n 5 cat /var/lib/orthanc/db/index",
    "find / -name '*.dcm'",
    "/data/dicom/run.sh",
    "cat 'unbalanced",
]

ALLOWED = [
    "uptime",
    "",
    "systemctl status orthanc",
    "journalctl -u orthanc --since today",
    "tail -n 100 /var/log/syslog",
    "df -h",
    "ls /",
    "ls -la /data",
    "du -sh /var/lib",
    "stat /data/dicom.bak",
    "cat /var/lib/orthancx/config.json",
    "grep -r error /var/log/vendor",
    "tar czf /tmp/logs.tgz /var/log/vendor",
    "find /var/log -name '*.log' -mtime -1",
    "cp fw.bin /data/",
    "ps aux | grep orthanc",
    "ls *.log",
    "echo 'hello world' > /tmp/x",
    "cat ~/notes.txt",
    "cat /DATA/DICOM/x",  # Linux paths are case-sensitive
]


@pytest.mark.parametrize("command", REFUSED)
def test_refused(command: str) -> None:
    d = check_command_line(command, PP, HOME)
    assert not d.allowed and d.event == "exec.denied" and d.op == "exec"
    assert "ct-01" in d.reason or "could not read this command line" in d.reason


@pytest.mark.parametrize("command", ALLOWED)
def test_allowed(command: str) -> None:
    d = check_command_line(command, PP, HOME)
    assert d.allowed, d.reason
    assert d.event == "exec.allowed"


def test_reasons_name_the_path_and_what_to_do() -> None:
    d = check_command_line("cat /data/dicom/2026/IM000001", PP, HOME)
    assert d.path == "/data/dicom/2026/IM000001"
    assert d.reason.startswith("the command names /data/dicom/2026/IM000001, inside the protected patient-data "
                               "directory /data/dicom on ct-01;")
    assert "de-identified export" in d.reason
    glob = check_command_line("ls /data/di*", PP, HOME)
    assert "the pattern /data/di* could match the protected patient-data directory /data/dicom" in glob.reason
    ancestor = check_command_line("tar cf - /data", PP, HOME)
    assert "/data, which contains the protected patient-data directory /data/dicom" in ancestor.reason
    assert "Name a more specific directory" in ancestor.reason


def test_unknown_home_judges_relative_paths_from_root() -> None:
    assert not check_command_line("cat data/dicom/x", PP, None).allowed
    # but plain words are not treated as ancestors, and relative globs stay usable
    assert check_command_line("grep var notes.txt", PP, None).allowed
    assert check_command_line("ls *.log", PP, None).allowed
    assert not check_command_line("cat dicom/x", PP, "/data").allowed


def test_home_is_the_starting_directory() -> None:
    assert not check_command_line("cat dicom/x", PP, "/data").allowed
    assert check_command_line("cat dicom/x", PP, "/home/svc").allowed
    assert not check_command_line("cd; cat ../../data/dicom/x", PP, "/home/svc").allowed


# A path split into random segments, each quoted or escaped differently, is still the same path.
def _quote(segment: str, style: int) -> str:
    if style == 0:
        return segment
    if style == 1:
        return "'" + segment + "'"
    if style == 2:
        return '"' + segment + '"'
    if style == 3:
        return "".join("\\" + c for c in segment)
    return "$'" + "".join(f"\\x{ord(c):02x}" for c in segment) + "'"


@settings(max_examples=300)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8), st.lists(st.integers(0, 4), min_size=8, max_size=8),
       st.sampled_from(["cat", "base64", "xxd", "tar cf -", "sudo cat", "sh -c 'cat \"$0\"'"]))
def test_any_quoting_of_a_protected_path_is_refused(cuts: list[int], styles: list[int], cmd: str) -> None:
    target, pos, parts = "/data/dicom/2026/IM000001", 0, []
    for cut, style in zip(cuts + [len("/data/dicom/2026/IM000001")], styles):
        parts.append(_quote(target[pos:pos + cut], style))
        pos += cut
        if pos >= len(target):
            break
    if pos < len(target):
        parts.append(target[pos:])
    line = f"{cmd} {''.join(parts)}"
    assert not check_command_line(line, PP, HOME).allowed, line


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text(max_size=200), st.sampled_from([None, "/home/svc", "/"]))
def test_check_command_never_raises(command: str, home: str | None) -> None:
    d = check_command_line(command, PP, home)
    assert d.event in ("exec.allowed", "exec.denied")
    assert d.allowed or d.reason


@settings(max_examples=200)
@given(st.text(alphabet="abcdefg/.-_ *?{},=:~$'\"\\;&|<>()`", max_size=60))
def test_naming_the_protected_path_literally_is_always_refused(noise: str) -> None:
    assert not check_command_line(f"{noise} ; cat /data/dicom/x", PP, HOME).allowed


def test_home_inside_a_protected_tree_protects_every_relative_path() -> None:
    assert not check_command_line("cat notes.txt", PP, "/data/dicom/export").allowed
    assert check_command_line("cat notes.txt", PP, "/home/svc").allowed


def test_long_scripts_are_checked_to_the_end() -> None:
    script = "; ".join(f"cd /opt/vendor/d{i} && ls -la x{i} /var/log/f{i}.log | grep -v y > /tmp/o{i}"
                       for i in range(300))
    assert check_command_line(script, PP, HOME).allowed
    assert not check_command_line(script + "; cd /data; cat dicom/x", PP, HOME).allowed
