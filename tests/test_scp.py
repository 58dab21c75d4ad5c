"""Legacy scp grammar and records (sessions/scp_grammar.py): the strict command parser, the record parser, the input buffer.

The protocol engine itself runs end to end with OpenSSH's scp in tests/test_e2e_scp.py.
"""

from __future__ import annotations

import asyncio
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from sessions.scp_grammar import (
    ScpCommand, ScpCommandError, ScpInput, ScpProtocolError, is_scp_command, parse_record, parse_scp_command,
    transfer_server_refusal,
)


@pytest.mark.parametrize("command, expected", [
    ("scp -f service/logs/system.log", ScpCommand(False, b"service/logs/system.log")),
    ("scp -t .", ScpCommand(True, b".")),
    ("scp -v -r -p -d -t -- -odd-name", ScpCommand(True, b"-odd-name", True, True, True)),
    ("scp -rpf /srv/logs", ScpCommand(False, b"/srv/logs", recursive=True, preserve=True)),
    ("/usr/bin/scp -f '/tmp/a b.log'", ScpCommand(False, b"/tmp/a b.log")),
    ('scp -f "/tmp/a b.log"', ScpCommand(False, b"/tmp/a b.log")),
    (r"scp -f /tmp/a\ b.log", ScpCommand(False, b"/tmp/a b.log")),
    ("scp -f '*.log'", ScpCommand(False, b"*.log")),  # quoted: a literal name, never a pattern
    ("scp -t ~", ScpCommand(True, b".")),
    ("scp -f ~/logs/x", ScpCommand(False, b"logs/x")),
    ("scp -f '~/x'", ScpCommand(False, b"~/x")),
    ("scp -t ''", ScpCommand(True, b".")),
    ("scp -f /data/naïve.log", ScpCommand(False, "/data/naïve.log".encode())),
])
def test_accepted_scp_commands(command, expected):
    assert parse_scp_command(command) == expected
    assert is_scp_command(command)


@pytest.mark.parametrize("command, why", [
    ("scp -f /tmp/*.log", "wildcards"), ("scp -f /tmp/a?.log", "wildcards"), ("scp -f /tmp/[ab]", "wildcards"),
    ("scp -f /tmp/{a,b}", "shell syntax"), ("scp -f $(echo /data/dicom)", "shell syntax"),
    ("scp -f `id`", "shell syntax"), ("scp -f x; cat /etc/passwd", "shell syntax"), ("scp -f x|y", "shell syntax"),
    ("scp -f x > y", "shell syntax"), ("scp -f x && y", "shell syntax"), ("scp -f ${HOME}", "shell syntax"),
    ('scp -f "$HOME/x"', "shell expansion"), ('scp -f "`id`"', "shell expansion"), ("scp -f #x", "shell syntax"),
    ("scp -f ~root/x", "another user's home"), ("scp -f a b", "exactly one path"), ("scp -f", "exactly one path"),
    ("scp -t -f x", "exactly one of -t and -f"), ("scp -rtf x", "exactly one of -t and -f"),
    ("scp -S ssh -f x", "option -S"), ("scp -f -o ProxyCommand=x y", "option -o"), ("scp -f 'x", "unterminated"),
    ("scp -f x\\", "backslash"), ("scp -f x\ny", "control character"), ("scp -f x\x00", "control character"),
    ("sh -c 'scp -f x'", "accepts only"), ("sudo scp -f x", "accepts only"),
])
def test_refused_scp_commands_say_why(command, why):
    assert is_scp_command(command)
    with pytest.raises(ScpCommandError) as info:
        parse_scp_command(command)
    assert why in str(info.value) and "scp without -O" in str(info.value)


@pytest.mark.parametrize("command", ["ls -la", "scp file otherhost:", "tar -tf x.tar", "echo scp", "cat -f"])
def test_other_commands_are_not_scp_servers(command):
    assert not is_scp_command(command)


@pytest.mark.parametrize("command, refused", [
    ("/usr/lib/openssh/sftp-server", True), ("exec /usr/libexec/sftp-server -e", True), ("internal-sftp", True),
    ("rsync --server --sender -vlogDtprze.iLsfxC . /data", True), ("rsync --version", False),
    ("ls /usr/lib/openssh/", False), ("cat sftp-server.log", False),
])
def test_transfer_servers_run_as_commands_are_refused(command, refused):
    assert (transfer_server_refusal(command) is not None) is refused


@given(st.text(min_size=1, max_size=60).filter(lambda p: "\0" not in p and not any(ord(c) < 0x20 or c == "\x7f"
                                                                                   for c in p)))
@settings(max_examples=FUZZ_EXAMPLES_OTHER)
def test_any_quoted_path_round_trips_literally(path):
    assert parse_scp_command(f"scp -f -- {shlex.quote(path)}").path == path.encode("utf-8", "surrogateescape")


@given(st.text(max_size=80))
@settings(max_examples=FUZZ_EXAMPLES_OTHER)
def test_command_parser_accepts_only_plain_paths(command):
    try:
        cmd = parse_scp_command(command)
    except ScpCommandError:
        return
    bare = command.replace("'", "").replace('"', "").replace("\\", "")
    if bare == command:  # nothing quoted: nothing a shell could expand got through
        assert not set(command) & set("*?[]{}$`;&|<>()!")
    assert cmd.path and b"\0" not in cmd.path


@pytest.mark.parametrize("line, kind, fields", [
    (b"C0644 12 notes.txt", "C", {"mode": 0o644, "size": 12, "name": b"notes.txt"}),
    (b"D0755 0 logs", "D", {"mode": 0o755, "name": b"logs"}),
    (b"D0755 0 .", "D", {"name": b"."}),  # scp -r . host:dir
    (b"C0600 0 with space.txt", "C", {"name": b"with space.txt"}),
    (b"T1700000000 0 1700000001 0", "T", {"mtime": 1700000000, "atime": 1700000001}),
    (b"E", "E", {}),
    (b"\x01scp: cannot open x", "1", {"message": "scp: cannot open x"}),
    (b"\x02fatal", "2", {"message": "fatal"}),
])
def test_records(line, kind, fields):
    rec = parse_record(line)
    assert rec.kind == kind and all(getattr(rec, k) == v for k, v in fields.items())


@pytest.mark.parametrize("line", [
    b"", b"C0644 5 ../x", b"C0644 5 a/b", b"C0644 5 ..", b"C0644 5 .", b"C0644 5 ", b"C0644 5 a\0b", b"C644 5 x",
    b"C0648 5 x", b"C0644 -5 x", b"C0644 5x y", b"C0644 99999999999999999999 x", b"T1 2 3", b"Ex", b"Z", b"D0755 0",
])
def test_bad_records_are_protocol_errors(line):
    with pytest.raises(ScpProtocolError):
        parse_record(line)


@given(st.binary(max_size=64))
@settings(max_examples=FUZZ_EXAMPLES_OTHER)
def test_record_parser_never_accepts_a_path(line):
    try:
        rec = parse_record(line)
    except ScpProtocolError:
        return
    if rec.kind in "CD":
        assert rec.name not in (b"", b"..") and b"/" not in rec.name and b"\0" not in rec.name
        assert rec.name != b"." or rec.kind == "D"


@given(st.lists(st.binary(min_size=0, max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=8),
       st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=30))
@settings(max_examples=FUZZ_EXAMPLES_OTHER)
def test_input_yields_the_same_lines_however_the_stream_is_split(lines, cuts):
    stream = b"".join(line + b"\n" for line in lines)
    holds: list[bool] = []

    async def run() -> list[bytes]:
        buf = ScpInput(lambda: holds.append(True), lambda: holds.append(False))
        pos, i = 0, 0
        while pos < len(stream):
            n = cuts[i % len(cuts)]
            buf.feed(stream[pos:pos + n])
            pos, i = pos + n, i + 1
        buf.feed_eof()
        out = []
        while (line := await buf.readline()) is not None:
            out.append(line)
        return out

    assert asyncio.run(run()) == lines
    assert holds == []  # never near the high-water mark here


def test_input_holds_the_vendor_while_too_much_waits_and_refuses_endless_lines():
    holds: list[bool] = []

    async def run() -> None:
        buf = ScpInput(lambda: holds.append(True), lambda: holds.append(False))
        buf.feed(b"x" * (5 << 20))
        assert holds == [True]
        assert len(await buf.read_some(4 << 20)) == 4 << 20
        assert holds == [True, False]
        with pytest.raises(ScpProtocolError):
            await buf.readline()

    asyncio.run(run())
