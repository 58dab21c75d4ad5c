"""Commands resolved like files (sessions/cmd_paths.py, cmd_judge.py, shell_guard.py, shell_lines.py) without SSH.

The device's realpath/readlink/listdir come from a real local directory tree with real symlinks (LocalPaths:
the same three calls DevicePaths makes over SFTP, answered by this machine's filesystem).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from sessions.cmd_judge import judge_command
from sessions.cmd_paths import MAX_PATHS, analyze_command
from sessions.policy import ProtectedPaths
from sessions.shell_guard import PipedLineGuard, ShellLineGuard
from sessions.shell_lines import LiveScreen


class LocalPaths:
    """DevicePaths over a local tree: relative paths and ``~`` count from ``home``; SFTP-like errors."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.round_trips = 0

    def _abs(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            path = path[2:]
        return path if path.startswith("/") else os.path.join(self.home, path)

    async def realpath(self, path: str) -> str:
        self.round_trips += 1
        p = self._abs(path)
        if not os.path.exists(os.path.dirname(os.path.realpath(p))) or not (
                os.path.lexists(p) or os.path.isdir(os.path.dirname(p))):
            raise asyncssh.SFTPNoSuchFile("no such file")
        return os.path.realpath(p)

    async def readlink(self, path: str) -> str:
        self.round_trips += 1
        try:
            return os.readlink(self._abs(path))
        except OSError:
            raise asyncssh.SFTPNoSuchFile("not a link") from None

    async def scandir(self, path: str) -> list[tuple[str, str]]:
        self.round_trips += 1
        try:
            entries = list(os.scandir(self._abs(path)))
        except OSError:
            raise asyncssh.SFTPNoSuchFile("no such directory") from None
        return [(e.name, "link" if e.is_symlink() else "dir" if e.is_dir() else "other") for e in entries]

    async def listdir(self, path: str) -> list[str]:
        self.round_trips += 1
        try:
            return os.listdir(self._abs(path))
        except OSError:
            raise asyncssh.SFTPNoSuchFile("no such directory") from None


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, ProtectedPaths]:
    root = tmp_path_factory.mktemp("device")
    for d in ("data/dicom/2026", "var/spool/hl7", "service/logs", "service/firmware", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "data/dicom/2026/IM1.dcm").write_bytes(b"DICM")
    (root / "var/spool/hl7/adt_a01.hl7").write_text("MSH|")
    (root / "service/logs/system.log").write_text("boot\n")
    (root / "service/firmware/version.txt").write_text("4.2.1\n")
    (root / "service/latest.dcm").symlink_to(root / "data/dicom/2026/IM1.dcm")
    (root / "service/patients-link").symlink_to("../var/spool/hl7")  # relative link
    (root / "service/up").symlink_to("..")
    (root / "tmp/deep").symlink_to(root / "service/patients-link")  # a link to a link
    pp = ProtectedPaths.build("ct-01", [str(root / "data/dicom"), str(root / "var/spool/hl7")])
    return root, pp


def judge(tree, command, *, strict=True, shell=None):
    root, pp = tree
    return asyncio.run(judge_command(command, pp, LocalPaths(root), strict=strict, shell=shell))


SYMLINKED = [
    "tail -c +140 service/latest.dcm", "cut -c2- service/patients-link/adt_a01.hl7", "cat service/patients-link",
    "cd service && tail -c +140 latest.dcm", "cd service; cd patients-link; cat adt_a01.hl7",
    "cd service/patients-link && cat *", "cat service/*.dcm", "cat service/*/adt*", "grep -a PID service/patients-link/*",
    "tar cf - service/patients-link/", "cat tmp/deep/adt_a01.hl7", "cat ./service/../service/latest.dcm",
    "cat service/up/data/dicom/2026/IM1.dcm", "tar cf - service/up", "CDPATH=service cd patients-link && cat adt_a01.hl7",
    "export CDPATH=:service; cd patients-link; cat adt_a01.hl7", "cat ~/service/latest.dcm", "cat $HOME/service/latest.dcm",
    "D=service/patients-link; cat $D/adt_a01.hl7", "for f in service/latest.dcm; do od -c $f; done",
    "dd if=service/latest.dcm", "cat < service/latest.dcm", "sort -o /tmp/x service/patients-link/adt_a01.hl7",
    "sh -c 'tail service/latest.dcm'", "sudo -u root tail service/latest.dcm", "find service/patients-link -type f",
    "python3 -c 'print(open(\"service/latest.dcm\").read())'", "cp service/latest.dcm /tmp/x",
    "rsync -a service/patients-link/ /tmp/y", "ln -s service/patients-link /tmp/z",
    "C=tail; $C -c +140 service/latest.dcm", "cat $(echo service/latest.dcm)", "cat \"`echo service/patients-link/adt_a01.hl7`\"",
    # metadata too, as over SFTP (stat, listing): names and sizes of patient files stay on the device
    "ls -la service/patients-link", "stat service/latest.dcm", "ls service/*", "readlink service/latest.dcm",
]
RUNTIME = [
    "cat $(echo c2VydmljZS9sYXRlc3QuZGNt | base64 -d)", "cat `printf %b 'service/latest\\x2edcm'`",
    "echo service/latest.dcm | xargs cat", "find service -name '*.dcm' | xargs -n1 cat", "IFS=_; c=cat_x; $c",
    "python3 -c \"print(open('serv'+'ice/latest.dcm').read())\"", "perl -e 'open F, \"serv\" . \"ice/x\"; print <F>'",
    "python3 -c 'import os; [print(p) for p in os.walk(\".\")]'", "python3 -c 'print(open(\"dicom\").read())'",
    "while read p; do cat \"$p\"; done < /tmp/list", "echo Y2F0 | base64 -d | sh", "eval \"$CMD\"", "sh -c \"$X\"",
    "cat ${F:-service/latest.dcm}", "cd $(cat /tmp/dir) && cat x", "cat <(cat service/latest.dcm)",
    "printf -v P '%s' service; cat $P/latest.dcm", "read -r P < /tmp/p; cat \"$P\"", "bash < /tmp/script",
    "echo 'cat x' | bash -s", "awk 'BEGIN { while ((getline l < (\"serv\" \"ice/latest.dcm\")) > 0) print l }'",
    "ruby -e 'puts File.read(\"a\"+\"b\")'", "node -e 'require(\"fs\").readFileSync(\"x\"+\"y\")'",
    "mapfile -t L < /tmp/l; cat ${L[0]}", "cat ~root/x", "python3 < /tmp/prog.py",
    # a directory holding links into a protected tree, walked by a command that can follow them
    "find service -name latest.dcm -exec cat {} +", "find -L service -type f", "grep -R PID service",
    "tar chf - service", "cp -rL service /tmp/s", "grep -R PID serv*", "cat serv*/*/adt*", "tar -C service -chf - patients-link",
    "tar --directory=service -chf - patients-link/adt_a01.hl7", "cd service && grep -R PID .", "rsync -aL service/ /tmp/s",
]
BENIGN = [
    "ls service", "cat service/logs/system.log", "tail -f service/logs/system.log", "tail -f logs", "cd service && ls",
    "cd service/logs; grep boot system.log", "ls -l service", "echo hello from $(hostname)", "for f in service/logs/*.log; do wc -l $f; done",
    "uptime; df -h", "systemctl status orthanc", "cat service/firmware/version.txt > /tmp/v", "du -sh service",
    "ls service/logs/*", "echo $HOME $USER $$", "python3 -c 'print(42)'", "awk '{print $1}' service/logs/system.log",
    "find service/logs -name '*.log'", "grep -r error service/logs", "tar czf /tmp/l.tgz service/logs",
    "tar cf - -C service logs", "tar -C service -cf - logs", "ls /usr/share/doc/*/copyright",
    "ls -lR service", "grep -r PID service", "tar cf - service", "cp -r service /tmp/s", "find service -name '*.log'",
    "rsync --server --sender -logDtpre.iLsfxCIvu . service/logs/",
    "cp /tmp/fw.bin service/firmware/", "journalctl -u vendor --since today",
    "bash -c 'ls service'", "X=service/logs; cat $X/system.log", "ps aux | grep vendor | head",
    # Ansible's own commands (ansible-core 2.x, sh shell plugin)
    "/bin/sh -c 'echo ~ && sleep 0'",
    "/bin/sh -c '( umask 77 && mkdir -p \"` echo ~/.ansible/tmp `\"&& mkdir \"` echo ~/.ansible/tmp/ansible-tmp-1-2 `\" "
    "&& echo ansible-tmp-1-2=\"` echo ~/.ansible/tmp/ansible-tmp-1-2 `\" ) && sleep 0'",
]


@pytest.mark.parametrize("command", SYMLINKED)
def test_paths_that_resolve_into_patient_data_are_refused_in_both_modes(tree, command):
    for strict in (True, False):
        d = judge(tree, command, strict=strict)
        assert not d.allowed, (command, strict)
        assert "protected patient-data directory" in d.reason or "only known when they run" in d.reason


@pytest.mark.parametrize("command", RUNTIME)
def test_paths_built_at_run_time_are_refused_when_strict(tree, command):
    d = judge(tree, command)
    assert not d.allowed, command
    assert d.event == "exec.denied"


@pytest.mark.parametrize("command", BENIGN)
def test_ordinary_maintenance_is_allowed_in_both_modes(tree, command):
    for strict in (True, False):
        d = judge(tree, command, strict=strict)
        assert d.allowed, (command, strict, d.reason)


# Inline code that assembles a path a way the first list missed (found in stop 13's review): interpolation in
# Perl/PHP/Ruby/Tcl strings, Python's rf-strings, bytes of numbers, slices and strip of a longer literal.
ASSEMBLED = [
    "perl -e '$a=\"postgr\";$b=\"esql\";open(F,\"/var/lib/$a$b/15/main/PG_VERSION\");print <F>'",
    "perl -e '$d=\"/var/lib\";open(F,\"$d/x\");print <F>'",
    "php -r '$a=\"di\";$b=\"com\";readfile(\"/srv/$a$b/x\");'",
    "php -r '$a=\"/srv\";readfile(\"{$a}/x\");'",
    "ruby -e 'a=\"di\";b=\"com\";print File.read(\"/srv/#{a}#{b}/x\")'",
    "python3 -c \"a='/srv/di';b='com';print(open(rf'{a}{b}/x').read())\"",
    "python3 -c \"a='/srv/di';b='com';print(open(Rf'{a}{b}/x').read())\"",
    "python3 -c \"print(open(bytes([47,115,114,118]),'rb').read())\"",
    "python3 -c \"x='/srv/dicomx';print(open(x[:-1]).read())\"",
    "python3 -c \"x='/srv/dicomx';print(open(x.rstrip('x')).read())\"",
    "ruby -e 'x=\"/srv/dicomx\";print File.read(x[0..-2])'",
    "ruby -e 'x=\"/srv/dicomx\";print File.read(x.chomp(\"x\"))'",
    "php -r '$x=\"/srv/dicomx\";readfile(trim($x, \"x\"));'",
    "perl -e '$x=\"/srv/dicomx\";chop $x;open(F,$x);print <F>'",
    "Rscript -e 'readLines(paste0(\"/srv/di\",\"com/x\"))'",
]
# Inline code that names its paths outright, whose letters happen to spell one of the run-time words
# ("qx", "find", "cat", "tr") or a protected directory's name inside a longer one: a literal path is resolved,
# not read as code (CI, stop 12: a temp directory named …bqxfqkom refused a plain open()).
LITERAL = [
    "python3 -c \"print(open('/tmp/mbdev-20217-bqxfqkom/root/tmp/notes-0417.txt','rb').read())\"",
    "python3 -c \"print(list(open('/tmp/catalog/find/tr-sub/x.txt','rb').read()))\"",
    "python3 -c \"print(open('./service/logs/system.log').read())\"",
    "python3 -c \"print(open('/tmp/mbdev-1-xhl7k5fwe/metadata/x').read())\"",
    "perl -ne 'print \"$.: $_\"' service/logs/system.log",
    "perl -e 'print \"$x\\n\"'",
    "ruby -e 'puts File.read(\"/tmp/walk-glob/x\")'",
    "python3 -c \"print(open('/etc/hostname').read().strip())\"",  # strip() of what was read: whitespace only
]


@pytest.mark.parametrize("command", ASSEMBLED)
def test_paths_assembled_inside_inline_code_are_refused_when_strict(tree, command):
    d = judge(tree, command)
    assert not d.allowed, command
    assert "only known when they run" in d.reason, d.reason


@pytest.mark.parametrize("command", LITERAL)
def test_literal_paths_in_inline_code_are_resolved_not_read_as_code(tree, command):
    for strict in (True, False):
        d = judge(tree, command, strict=strict)
        assert d.allowed, (command, strict, d.reason)


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=8, max_size=8),
       st.sampled_from(["python3 -c \"print(open('{p}','rb').read())\"",
                        "python3 -c \"print(list(open('{p}','rb').read()))\"",
                        "perl -e 'open(F, \"{p}\"); print <F>'", "ruby -e 'print File.read(\"{p}\")'"]))
def test_a_temporary_directory_name_never_decides(tree, name, form):
    """Whatever letters mkdtemp picks, a literal path to an ordinary file is judged by where it resolves."""
    root, _ = tree
    d = judge(tree, form.format(p=f"{root}/tmp/mbdev-{name}/notes-0417.txt"))
    assert d.allowed, d.reason


def test_contained_mode_leaves_run_time_paths_to_the_device(tree):
    assert judge(tree, "cat $(echo c2VydmljZS9sYXRlc3QuZGNt | base64 -d)", strict=False).allowed
    assert judge(tree, "echo service/latest.dcm | xargs cat", strict=False).allowed


def test_refusal_names_the_word_and_where_it_leads(tree):
    root, _ = tree
    d = judge(tree, "tail -c +140 service/latest.dcm")
    assert d.reason.startswith(f"the command names service/latest.dcm (it resolves to {root}/data/dicom/2026/IM1.dcm), "
                               f"inside the protected patient-data directory {root}/data/dicom on ct-01")
    assert d.path == f"{root}/data/dicom/2026/IM1.dcm"


def test_an_interactive_shell_keeps_its_directory_across_lines(tree):
    state: dict = {}
    assert judge(tree, "cd service", shell=state).allowed
    assert not judge(tree, "tail -c +140 latest.dcm", shell=state).allowed
    assert judge(tree, "cat logs/system.log", shell=state).allowed
    assert judge(tree, "cd", shell=state).allowed
    assert judge(tree, "ls", shell=state).allowed


def test_shells_on_the_vendors_input_are_marked_for_line_by_line_judging(tree):
    _, pp = tree
    for command in ("bash", "sh -i", "su -", "sudo -i", "sudo su -", "bash -l", "exec bash"):
        found = analyze_command(command, pp)
        assert found.reads_input and found.runtime is None, command
    for command in ("echo x | sh", "bash < /tmp/x", "ls; bash", "sudo ls"):
        assert not analyze_command(command, pp).reads_input, command


def test_too_many_paths_are_refused_not_judged_in_part(tree):
    _, pp = tree
    line = "cat " + " ".join(f"f{i}" for i in range(MAX_PATHS + 5))
    assert analyze_command(line, pp).runtime
    assert not judge(tree, line, strict=True).allowed
    assert not judge(tree, line, strict=False).allowed  # resolution holds on contained devices too


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300))
def test_analyze_never_raises_and_is_quick(text):
    _, pp = PP_TREE
    began = time.perf_counter()
    found = analyze_command(text, pp)
    assert time.perf_counter() - began < 1.0
    assert len(found.paths) <= MAX_PATHS


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="abcs/.-_ *?{},=:~$'\"\\;&|<>()`\nlatest.dcmservicepatients-link", max_size=120),
       st.booleans())
def test_judge_never_raises_on_shell_noise(tree, text, strict):
    d = judge(tree, text, strict=strict)
    assert d.event in ("exec.allowed", "exec.denied") and (d.allowed or d.reason)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="abcdefg/.-_ *?{},=:~$'\"\\;&|<>()`", max_size=60), st.booleans())
def test_a_symlinked_patient_file_stays_refused_whatever_comes_before(tree, noise, strict):
    assert not judge(tree, f"{noise} ; tail -c +140 service/latest.dcm", strict=strict).allowed


PP_TREE = (None, ProtectedPaths.build("ct-01", ["/data/dicom", "/var/spool/hl7"]))


# ------------------------------------------------------------------------------------------ shell guards
class _Sink:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.eof = False
        self.refusals: list[tuple[str, str]] = []


async def _run_guard(chunks: list[tuple[bytes, bytes]], refuse_word: str = "secret") -> _Sink:
    """Feed (device echo, vendor input) pairs through a ShellLineGuard whose judge refuses lines naming
    ``refuse_word``; the device echo is what a shell would print for the previous input."""
    sink = _Sink()

    async def judge_line(line: str) -> str | None:
        await asyncio.sleep(0.005)  # a realpath round trip
        return "names a secret" if refuse_word in line else None

    guard = ShellLineGuard(LiveScreen(80, 24), judge_line, sink.sent.extend, lambda: setattr(sink, "eof", True),
                           lambda line, reason: sink.refusals.append((line, reason)))
    guard.device_output(b"$ ")
    for echo, keys in chunks:
        if echo:
            guard.device_output(echo)
        guard.vendor_data(keys)
        await asyncio.sleep(0.05)
    guard.vendor_eof()
    # EOF goes out once every line before it was judged: each Enter waits up to ECHO_MAX_S (0.3 s) for an echo
    # these tests do not send; wait for it (bounded) rather than a fixed time a loaded machine can overrun
    deadline = asyncio.get_running_loop().time() + 10
    while not sink.eof and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # anything the guard would still send after EOF would arrive here
    return sink


def test_ordinary_keys_pass_at_once_and_an_allowed_enter_follows():
    async def go():
        sink = _Sink()
        guard = ShellLineGuard(LiveScreen(80, 24), lambda line: asyncio.sleep(0, None), sink.sent.extend,
                               lambda: None, lambda *a: None)
        guard.device_output(b"$ ")
        guard.vendor_data(b"ls")
        assert bytes(sink.sent) == b"ls"  # synchronously: no judgement for ordinary keys
        guard.device_output(b"ls")
        guard.vendor_data(b"\r")
        assert bytes(sink.sent) == b"ls"  # the Enter waits for the verdict
        await asyncio.sleep(0.2)
        assert bytes(sink.sent) == b"ls\r"
        return guard
    guard = asyncio.run(go())
    assert guard.judged and max(guard.judged) < 0.2


def test_a_refused_line_is_interrupted_and_typeahead_dropped():
    sink = asyncio.run(_run_guard([(b"", b"cat secret\rrm -rf x\r")]))
    assert bytes(sink.sent) == b"cat secret\x03" and sink.refusals[0][0] == "cat secret"
    assert sink.eof


def test_a_line_edited_on_screen_is_judged_as_shown():
    # typed "cat nothing", erased it with Ctrl-U (the shell redraws), typed "cat secret": the screen decides
    sink = asyncio.run(_run_guard([(b"", b"cat nothing"), (b"cat nothing", b"\x15"),
                                   (b"\r\x1b[K$ ", b"cat secret"), (b"cat secret", b"\r")]))
    assert sink.refusals and sink.refusals[0][0] == "cat secret" and not bytes(sink.sent).endswith(b"\r")


def test_a_multi_line_bracketed_paste_is_judged_before_any_of_it_is_sent():
    sink = asyncio.run(_run_guard([(b"", b"\x1b[200~ls\rcat secret\r\x1b[201~")]))
    assert bytes(sink.sent) == b"\x03" and sink.refusals[0][0] == "cat secret"
    sink = asyncio.run(_run_guard([(b"", b"\x1b[200~ls\rdf\r\x1b[201~")]))
    assert bytes(sink.sent) == b"\x1b[200~ls\rdf\r\x1b[201~" and not sink.refusals


def test_full_screen_programs_are_not_judged():
    sink = asyncio.run(_run_guard([(b"\x1b[?1049h", b"i cat secret"), (b"i cat secret", b"\r")]))
    assert bytes(sink.sent) == b"i cat secret\r" and not sink.refusals


def test_a_shell_without_a_pty_has_each_input_line_judged_and_eof_waits():
    async def go():
        sink = _Sink()

        async def judge_line(line):
            await asyncio.sleep(0.005)
            return "no" if "secret" in line else None
        guard = PipedLineGuard(judge_line, sink.sent.extend, lambda: setattr(sink, "eof", True),
                               lambda line, reason: sink.refusals.append((line, reason)))
        guard.vendor_data(b"ls\ncat sec")
        guard.vendor_data(b"ret\necho done")
        guard.vendor_eof()
        assert not sink.eof  # EOF waits behind the lines still being judged
        await asyncio.sleep(0.3)
        return sink
    sink = asyncio.run(go())
    assert bytes(sink.sent) == b"ls\necho done" and sink.eof and sink.refusals[0][0] == "cat secret"


def test_a_judge_that_fails_refuses_the_line():
    async def go():
        sink = _Sink()

        async def broken(line):
            raise ConnectionError("device gone")
        guard = PipedLineGuard(broken, sink.sent.extend, lambda: None,
                               lambda line, reason: sink.refusals.append((line, reason)), timeout=1)
        guard.vendor_data(b"ls\n")
        await asyncio.sleep(0.1)
        return sink
    sink = asyncio.run(go())
    assert sink.sent == b"" and "could not check" in sink.refusals[0][1]


def test_the_emulator_cost_stays_bounded_after_a_flood_of_output():
    screen = LiveScreen(80, 24)
    chunk = b"x" * 1023 + b"\n"
    began = time.perf_counter()
    for _ in range(20 * 1024):  # 20 MiB of output between two keystrokes
        screen.output(chunk)
    screen.keystroke()
    assert time.perf_counter() - began < 2.0
    assert len(screen.held) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=200))
def test_the_screen_reader_and_key_editor_never_raise(output, keys):
    from sessions.shell_guard import typed_text

    screen = LiveScreen(40, 10)
    screen.output(output)
    screen.keystroke()
    screen.output(keys)
    assert isinstance(screen.line(), str) and len(screen.line()) <= 8192
    assert isinstance(typed_text(keys), str)


def _piped(lines: bytes) -> _Sink:
    async def go():
        sink = _Sink()

        async def judge_line(text):
            await asyncio.sleep(0.002)
            return "no" if "secret" in text else None
        guard = PipedLineGuard(judge_line, sink.sent.extend, lambda: setattr(sink, "eof", True),
                               lambda line, reason: sink.refusals.append((line, reason)))
        guard.vendor_data(lines)
        guard.vendor_eof()
        await asyncio.sleep(0.3)
        return sink
    return asyncio.run(go())


def test_a_command_spread_over_lines_is_judged_whole_and_never_unjudged():
    sink = _piped(b"echo 'one\ntwo' && cat secret\nls\n")  # the second line completes a refused command
    assert bytes(sink.sent) == b"echo 'one\nls\n" and "cat secret" in sink.refusals[0][0]
    sink = _piped(b"cat secret # it's a comment\nls\n")  # looks incomplete to a reader that misses comments
    assert bytes(sink.sent) == b"ls\n" and sink.refusals
    sink = _piped(b"cat > /tmp/x <<EOF\nit's a secret in the body\nEOF\nls\n")  # a here-doc body is input
    assert bytes(sink.sent) == b"cat > /tmp/x <<EOF\nit's a secret in the body\nEOF\nls\n" and not sink.refusals


@pytest.mark.parametrize("text, expected", [
    ("echo 'multi", True), ("echo 'multi\nline'", False), ("cat <<EOF", True), ("cat <<EOF\nit's\nEOF", False),
    ("for f in *; do", True), ("for f in *; do\necho $f\ndone", False), ("ls |", True), ("if true; then", True),
    ("if true; then echo; fi", False), ("echo a \\", True), ("cat <<< x", False), ("{ ls;", True), ("ls", False)])
def test_incomplete_commands(text, expected):
    from sessions.cmd_lines import incomplete

    assert incomplete(text) is expected


def test_a_line_run_without_a_judged_enter_is_judged_as_it_runs_and_ends_the_session():
    async def go():
        sink, ended = _Sink(), []

        async def judge_line(text):
            return "no" if "secret" in text else None
        guard = ShellLineGuard(LiveScreen(80, 24), judge_line, sink.sent.extend, lambda: None,
                               lambda line, reason: sink.refusals.append((line, reason)), end=ended.append)
        guard.device_output(b"\x1b[?2004h$ ")
        guard.vendor_data(b"cat secret")
        guard.device_output(b"cat secret")
        guard.vendor_data(b"x")  # a key rebound to accept-line: bash runs the line and says so
        guard.device_output(b"\x1b[?2004l\r\n")
        await asyncio.sleep(0.05)
        return sink, ended
    sink, ended = asyncio.run(go())
    assert sink.refusals and sink.refusals[0][0].startswith("cat secret") and ended == ["no"]


def test_ctrl_c_and_a_judged_enter_do_not_count_as_running_unjudged():
    async def go():
        sink, ended = _Sink(), []

        async def judge_line(text):
            return "no" if "secret" in text else None
        guard = ShellLineGuard(LiveScreen(80, 24), judge_line, sink.sent.extend, lambda: None,
                               lambda line, reason: sink.refusals.append((line, reason)), end=ended.append)
        guard.device_output(b"\x1b[?2004h$ ")
        guard.vendor_data(b"cat secret")
        guard.device_output(b"cat secret")
        guard.vendor_data(b"\x03")  # the vendor gives up on the line
        guard.device_output(b"^C\x1b[?2004l\r\r\n\x1b[?2004h$ ")
        guard.vendor_data(b"ls")
        guard.device_output(b"ls")
        guard.vendor_data(b"\x0f")  # Ctrl-O runs the line too: judged like Enter
        await asyncio.sleep(0.4)
        guard.device_output(b"\x1b[?2004l\r\nfile\r\n\x1b[?2004h$ ")
        await asyncio.sleep(0.05)
        return sink, ended
    sink, ended = asyncio.run(go())
    assert not sink.refusals and not ended and bytes(sink.sent) == b"cat secret\x03ls\x0f"


def test_a_long_here_document_is_judged_once_and_held_input_is_bounded():
    async def go():
        sink, calls, holds = _Sink(), [], []

        async def judge_line(text):
            calls.append(text)
            await asyncio.sleep(0.001)
            return None
        guard = PipedLineGuard(judge_line, sink.sent.extend, lambda: setattr(sink, "eof", True),
                               lambda line, reason: sink.refusals.append((line, reason)), hold_input=holds.append)
        body = b"".join(b"TWFuIGlzIGRpc3Rpbmd1aXNoZWQsIG5vdCBvbmx5IGJ5IGhpcyByZWFzb24s%06d\n" % i for i in range(5000))
        script = b"base64 -d > /tmp/fw.bin <<EOF\n" + body + b"EOF\nls\n"
        for i in range(0, len(script), 4096):  # as the channel delivers it, while lines are being judged
            guard.vendor_data(script[i:i + 4096])
        guard.vendor_eof()
        for _ in range(200):
            await asyncio.sleep(0.05)
            if sink.eof:
                break
        return sink, calls, holds
    sink, calls, holds = asyncio.run(go())
    assert sink.eof and bytes(sink.sent).endswith(b"EOF\nls\n") and not sink.refusals
    assert len(calls) <= 4  # the command, its end, ls: not once per body line
    assert True in holds and holds[-1] is False
