"""Issue 11 finding 10: what people type and what a vendor's device prints cannot hurt staff or the broker.

- every id and number from people gets a clean refusal (CLI exit 1/2, SSH self-service exit 1/2, HTTP 400/404),
  never an OverflowError, a hung channel or an HTTP 500;
- replay, watch and exports for players neutralise OSC 52/8/0-2, DCS, APC, PM, SOS, reports and other sequences
  that make the analyst's terminal act, while the recording keeps every byte;
- reasons and tickets with bidi overrides, zero-width or other control/format characters are refused naming the
  character, and stored ones are shown escaped;
- logins with NUL/CR/LF/ESC or 70 000 characters leave an ``auth.failure`` row (escaped, truncated).
"""

from __future__ import annotations

import json
import re
import time

import paramiko
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from broker.app import init_home
from broker.cli import app as cli_app
from broker.config import MAX_ID, parse_id, unsafe_char
from broker.errors import BrokerError, UsageError
from broker.grants import get_request, request_grant
from broker.identity import add_user, get_principal
from broker.selfservice import run_command
from frontdoor_support import wait
from helpers import FUZZ_EXAMPLES_OTHER
from sessions.recording import read_frames
from sessions.replay import replay, to_asciicast
from sessions.termguard import TerminalGuard

runner = CliRunner()
HUGE = "99999999999999999999999"
PROMPT = re.compile(rb"[#$] ")
# What must never reach a staff terminal: OSC (any number), DCS, SOS, PM, APC, 8-bit C1 (raw or UTF-8 encoded),
# device/cursor/window reports, and ENQ.
_DANGEROUS = re.compile(rb"\x1b[\]PX^_]|\x1b\[[0-9;]*[nc]|\x1b\[[0-9;]*t|\x05"
                       rb"|\x1b\[\?(?:[0-9;]*;)?(?:9|100[0-6]|1015)(?:;[0-9;]*)?[hl]|\x1b ?[FG]|\x1bZ")


def dangerous(out: bytes) -> bool:
    """Whether ``out`` holds a sequence that makes a terminal act, or a C1 control (raw or UTF-8 encoded)."""
    text = out.decode("utf-8", "surrogateescape")
    return bool(_DANGEROUS.search(out)) or any(0x80 <= ord(c) <= 0x9F or 0xDC80 <= ord(c) <= 0xDC9F for c in text)


TEXT = b"\x1b[1;31mred\x1b[0m \x1b[2J\x1b[H\x1b[10;5Hmoved\x1b[K\x1b[?25l\x1b[?1049h\x1b(0q\x1b(B\r\n\xc3\xa9\xe2\x98\x83"


# ----------------------------------------------------------------------------- ids and numbers
@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.one_of(st.text(max_size=40), st.integers().map(str), st.integers(), st.just(HUGE), st.just("1_000"),
                 st.just("\u0661\u0662"), st.just(" 7 ")))
def test_parse_id_accepts_only_row_ids(text):
    try:
        value = parse_id(text, what="request id")
    except UsageError as exc:
        assert "is not a valid id" in exc.message and len(exc.message) < 400 and exc.message.isascii()
    else:
        assert 1 <= value <= MAX_ID
        assert value == int(text.strip() if isinstance(text, str) else text)
        assert not isinstance(text, str) or text.strip().isascii() and text.strip().isdigit()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    app = init_home(tmp_path_factory.mktemp("hostile") / "home")
    now = app.clock.now()
    for name, role in (("alice", "vendor"), ("bob", "approver"), ("carol", "security")):
        add_user(app.store, name, role, None, now)
    import asyncssh

    from broker.devices import add_device

    host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    add_device(app.store, app.audit, app.keys, name="ct-01", host="127.0.0.1", port=22, login="service",
               host_key=host_key, now=now,
               key_text=asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode())
    yield app
    app.close()


_NUMBERS = st.one_of(st.integers(min_value=-(2**80), max_value=2**80).map(str), st.just(HUGE), st.just(str(2**63)),
                     st.just("0"), st.just("-1"), st.just("1e9"), st.just("0x10"), st.just("1_0"),
                     st.text(alphabet="0123456789", min_size=19, max_size=400))


@settings(max_examples=FUZZ_EXAMPLES_OTHER // 4, deadline=None)
@given(verb=st.sampled_from(["approve", "deny", "approve {} --for", "request ct-01 --reason r --for"]), number=_NUMBERS,
       unit=st.sampled_from(["", "s", "m", "h", "d"]))
@example(verb="approve", number=HUGE, unit="")
@example(verb="deny", number=HUGE, unit="")
@example(verb="request ct-01 --reason r --for", number="9" * 5000, unit="d")
def test_self_service_numbers_get_a_clean_refusal(home, verb, number, unit):
    command = verb.replace("{}", "1") + " " + number + unit if "{}" in verb or "--for" in verb else f"{verb} {number}"
    who = get_principal(home.store, "alice" if verb.startswith("request") else "bob")
    reply = run_command(home, who, command)  # must return, never raise (a raise hung the SSH channel)
    assert reply.status in (0, 1, 2)
    if reply.status:
        assert reply.stderr.startswith("error: ") and "Traceback" not in reply.stderr and len(reply.stderr) < 2000


def test_huge_ids_over_ssh_self_service_end_the_channel_at_once(world):
    for command, want in ((f"approve {HUGE}", "is not a valid id"), (f"deny {HUGE} --reason x", "is not a valid id"),
                          ("approve 9223372036854775807", "does not exist")):
        start = time.monotonic()
        r = world.ssh("bob", command, timeout=20)
        assert time.monotonic() - start < 10
        err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
        assert r.returncode in (1, 2) and want in err, (command, r.returncode, err)


@pytest.mark.parametrize("args", [
    ["approve", HUGE, "--by", "bob"], ["deny", HUGE, "--by", "bob"], ["revoke", HUGE, "--by", "carol"],
    ["revoke", str(2**63), "--by", "alice"], ["approve", str(2**63), "--by", "bob"],
    ["sessions", "kill", HUGE, "--by", "carol"], ["sessions", "show", HUGE], ["replay", HUGE, "--speed", "1e400"],
    ["replay", HUGE, "--speed", "nan"], ["audit", "log", "--limit", HUGE],
    ["sessions", "watch", HUGE, "--for", "9" * 30 + "d"], ["serve", "--listen", "127.0.0.1:" + "9" * 5000],
    ["approve", "9" * 5000, "--by", "bob"], ["replay", HUGE, "--from", HUGE + ":00:00"],
    ["sessions", "search", "x", "--limit", HUGE],
])
def test_cli_numbers_get_a_clean_refusal(home, args):
    r = runner.invoke(cli_app, ["--home", str(home.home), *args])
    out = r.stdout + r.stderr
    assert "internal error" not in out and "Traceback" not in out and not isinstance(r.exception, OverflowError)
    assert r.exit_code in (0, 1, 2), out
    if r.exit_code:
        assert "Error" in out


# ----------------------------------------------------------------------------- reasons and tickets
BAD_TEXT = ["tube \u202ereplacement", "fix\u2066 it\u2069", "zero\u200bwidth", "rlm\u200f", "joiner\u2060x",
            "bom\ufeff", "esc\x1b[31m", "nul\x00", "c1\x9b31m", "line\u2028sep", "tag\U000e0041", "lrm\u200e"]


@pytest.mark.parametrize("text", BAD_TEXT)
def test_reasons_and_tickets_with_invisible_or_control_characters_are_refused(home, text):
    alice = get_principal(home.store, "alice")
    bad = unsafe_char(text)
    assert bad and bad.startswith("U+")
    for reason, ticket in ((text, None), ("tube replacement", text)):
        with pytest.raises(UsageError) as err:
            request_grant(home.store, home.audit, home.rules, alice, "ct-01", 3600, reason, home.clock.now(),
                          ticket=ticket)
        assert bad in err.value.message and "plain text" in err.value.hint
    # CLI and SSH self-service say the same
    r = runner.invoke(cli_app, ["--home", str(home.home), "request", "ct-01", "--user", "alice", "--for", "1h",
                                "--reason", text])
    assert r.exit_code == 2 and bad in r.stderr, r.stderr
    reply = run_command(home, alice, f"request ct-01 --for 1h --reason ok --ticket '{text}'")
    assert reply.status == 2 and bad in reply.stderr, reply.stderr


@pytest.mark.parametrize("text", BAD_TEXT[:6])
def test_deny_kill_and_revoke_reasons_are_refused(home, text):
    bob = get_principal(home.store, "bob")
    rid = request_grant(home.store, home.audit, home.rules, get_principal(home.store, "alice"), "ct-01", 3600,
                        "tube replacement", home.clock.now()).id
    r = runner.invoke(cli_app, ["--home", str(home.home), "deny", str(rid), "--by", "bob", "--reason", text])
    assert r.exit_code == 2 and unsafe_char(text) in r.stderr
    reply = run_command(home, bob, f"deny {rid} --reason '{text}'")
    assert reply.status == 2 and unsafe_char(text) in reply.stderr
    assert get_request(home.store, rid).status == "pending"
    for args in (["revoke", "1", "--by", "carol", "--reason", text],
                 ["sessions", "kill", "nope", "--by", "carol", "--reason", text]):
        r = runner.invoke(cli_app, ["--home", str(home.home), *args])
        assert r.exit_code == 2 and unsafe_char(text) in r.stderr, r.stderr


def test_stored_invisible_characters_are_shown_escaped(home):
    """Reasons stored before this check (or written by other tools) are shown, not obeyed."""
    rid = request_grant(home.store, home.audit, home.rules, get_principal(home.store, "alice"), "ct-01", 3600,
                        "placeholder", home.clock.now()).id
    home.store.execute("UPDATE access_requests SET reason = ? WHERE id = ?", ("evil\u202eexe.txt\u200b", rid))
    r = runner.invoke(cli_app, ["--home", str(home.home), "grants", "list"])
    assert r.exit_code == 0 and "\u202e" not in r.stdout and "\u200b" not in r.stdout
    assert "evil<U+202E>exe.txt<U+200B>" in r.stdout
    reply = run_command(home, get_principal(home.store, "bob"), "requests")
    assert "evil<U+202E>exe.txt<U+200B>" in reply.stdout and "\u202e" not in reply.stdout


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.text(max_size=60))
def test_unsafe_char_agrees_with_what_the_cli_shows(text):
    from broker.commands.common import safe

    shown = safe(text)
    if unsafe_char(text) is None:
        assert shown == text
    assert unsafe_char(shown.replace("\t", " ")) is None


# ----------------------------------------------------------------------------- staff terminals
@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([
    b"\x1b]52;c;ZXZpbA==\x07", b"\x1b]8;;https://evil.example/\x1b\\", b"\x1b]0;title\x07", b"\x1b]4;1;?\x1b\\",
    b"\x1b]11;?\x07", b"\x1bP+q544e\x1b\\", b"\x1b_apc\x1b\\", b"\x1b^pm\x1b\\", b"\x1bXsos\x1b\\", b"\x1b[21t",
    b"\x1b[6n", b"\x1b[c", b"\x1b[>c", b"\x1b[?1000h", b"\x1b[?1004h", b"\x9d52;c;eA==\x07", b"\xc2\x9d0;t\x07",
    b"\x9b6n", b"\x1b G", b"\x1bZ", b"\x05", b"\x1b]1337;File=x\x07", b"\x1b]", b"\x1b[", b"\x1b", b"\xc2",
    b"\x1b[" + b"1;" * 31 + b"m", b"\x1b[" + b"1;" * 33 + b"m", b"\x1b[1    q", b"\x1b[1     q", b"\x1b[1 2q",
    b"\x1b[2 q", b"\x1b[!p", b"\xe2\x98", b"\xf0\x9f\x98\x80"]),
    st.just(TEXT)), max_size=12), st.data())
def test_terminal_guard_drops_what_makes_terminals_act_in_any_chunking(parts, data):
    stream = b"".join(parts)
    whole = TerminalGuard()
    out = whole.feed(stream) + whole.flush()
    assert not dangerous(out), out
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    guard, pieces, last = TerminalGuard(), [], 0
    for cut in cuts + [len(stream)]:
        pieces.append(guard.feed(stream[last:cut]))
        last = cut
    assert b"".join(pieces) + guard.flush() == out


def test_terminal_guard_keeps_what_draws_the_screen():
    assert TerminalGuard().feed(TEXT) == TEXT


def test_guard_speed():
    data = (TEXT + b"plain log line with some text 0123456789\r\n" * 20) * 2000
    start = time.perf_counter()
    TerminalGuard().feed(data)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{len(data) / elapsed / 1e6:.1f} MB/s"


EVIL = r"printf '\033]52;c;ZXZpbA==\a\033]8;;https://evil.example/\033\\link\033]8;;\033\\\033]0;pwned\a\033[21t\033P+q544e\033\\\033]11;?\a'"


def _recorded_output(world, sid: str) -> bytes:
    row = world.app.store.get_session(sid)
    return b"".join(f.payload for f in read_frames(world.app.recordings.local_path(row["recording"]), key_lookup=world.app.keys.get)
                    if f.kind in ("output", "stderr"))


def test_replay_watch_and_asciicast_neutralise_what_the_recording_keeps(world, tmp_path):
    world.grant()
    term = world.pty("alice@ct-01", cols=100, rows=30)
    try:
        term.expect(PROMPT)
        sid = next(s["id"] for s in world.app.store.list_sessions() if s["status"] == "live")
        term.sendline(EVIL + "; echo; echo after-$((6*7))")
        term.expect(b"after-42")
        assert wait(lambda: b"after-42" in _recorded_output(world, sid))
        watched = runner.invoke(cli_app, ["--home", str(world.app.home), "sessions", "watch", sid, "--for", "1s",
                                          "--by", "carol"])
        assert watched.exit_code == 0, watched.stderr
        assert b"after-42" in watched.stdout_bytes and not dangerous(watched.stdout_bytes)
        assert b"link" in watched.stdout_bytes  # the hyperlink's text stays, the link does not
    finally:
        term.close()
    assert wait(lambda: world.app.store.get_session(sid)["status"] != "live")
    recorded = _recorded_output(world, sid)
    assert b"\x1b]52;c;ZXZpbA==\x07" in recorded and b"\x1b]8;;https://evil.example/" in recorded
    replayed = runner.invoke(cli_app, ["--home", str(world.app.home), "replay", sid, "--instant", "--by", "carol"])
    assert replayed.exit_code == 0, replayed.stderr
    assert b"after-42" in replayed.stdout_bytes and not dangerous(replayed.stdout_bytes)
    assert b"\x1b]" not in replayed.stdout_bytes and b"\x1bP" not in replayed.stdout_bytes
    assert b"\r\nlink\r\nafter-42" in replayed.stdout_bytes  # the hyperlink's text stays, the link does not
    out = tmp_path / "s.cast"
    r = runner.invoke(cli_app, ["--home", str(world.app.home), "export", sid, "--format", "asciicast", "-o", str(out),
                                "--by", "carol"])
    assert r.exit_code == 0, r.stderr
    played = "".join(e[2] for e in map(json.loads, out.read_text().splitlines()[1:]) if e[1] == "o").encode()
    assert b"after-42" in played and not dangerous(played)
    raw = tmp_path / "s.json"
    runner.invoke(cli_app, ["--home", str(world.app.home), "export", sid, "--format", "json", "-o", str(raw),
                            "--by", "carol"])
    assert raw.stat().st_size > 0  # the JSON export is evidence: every byte, base64


# ----------------------------------------------------------------------------- hostile login names
@pytest.mark.parametrize("name", ["al\x00ice@ct-01", "alice\r\n@ct-01", "alice\n@ct-01", "alice\x1b[31m@ct-01",
                                  "a" * 70_000, "b" * 1023, "c" * 900 + "@ct-01", "al ice@ct-01", "\u00e9ve@ct-01",
                                  "alice@@ct-01"])
def test_hostile_login_names_leave_an_auth_failure_row(world, name):
    before = len([r for r in world.events("auth.failure") if r["event"] == "auth.failure"])
    t = paramiko.Transport(("127.0.0.1", world.port))
    t.start_client(timeout=10)
    try:
        with pytest.raises(paramiko.SSHException):  # BadAuthenticationType or the transport closed
            t.auth_none(name)
    finally:
        t.close()
    assert wait(lambda: len([r for r in world.events("auth.failure") if r["event"] == "auth.failure"]) > before)
    row = [r for r in world.events("auth.failure") if r["event"] == "auth.failure"][-1]
    details = json.loads(row["details"])
    assert details["reason"] == "malformed login name" and row["user_name"] is None
    login = details["login"]
    if login is not None:  # names asyncssh passes on: kept escaped and truncated
        assert len(login) <= 400 and login.isascii() and login.isprintable()
        assert details["login_length"] == len(name)
    else:  # asyncssh refuses NUL/CR/LF/ESC and names of 1024 bytes or more before medbroker sees the name
        assert "refused by the SSH layer" in details["error"]
    # the broker is still fine
    assert world.ssh("alice", "help").returncode == 0


# ----------------------------------------------------------------------------- the web console
@pytest.fixture
def console(tmp_path):
    from test_web_http import Console

    c = Console(tmp_path)
    try:
        yield c
    finally:
        c.close()


def test_web_numbers_get_400_or_404_never_500(console):
    bob, carol = console.client("bob"), console.client("carol")
    token = bob.csrf("/inbox")
    for path in (f"/requests/{HUGE}", f"/requests/{2**63}", f"/sessions/{HUGE}/watch", f"/recordings/{HUGE}"):
        status, _, page = bob.get(path) if path.startswith("/requests") else carol.get(path)
        assert status == 404, (path, status)
    for path, form in ((f"/requests/{HUGE}/approve", {"duration": "30m"}), (f"/requests/{HUGE}/deny", {"reason": "x"}),
                       (f"/requests/1/approve", {"duration": "9" * 400 + "d"})):
        status, _, _ = bob.post(path, {"csrf": token, **form})
        assert status == 303, (path, status)
        assert "Internal" not in bob.get("/inbox")[2]
    ctoken = carol.csrf("/recordings")
    assert carol.post(f"/shares/{HUGE}/revoke", {"csrf": ctoken})[0] == 303
    assert "does not exist" in carol.get("/recordings")[2]
    for query in (f"before={HUGE}", "before=-1", "before=abc", "until=9999-12-31", "since=99999-01-01"):
        status, _, _ = carol.get(f"/audit?{query}")
        assert status == 400, (query, status)
    assert carol.get("/audit?before=5")[0] == 200


def test_web_reasons_with_invisible_characters_are_refused_and_stored_ones_shown_escaped(console):
    rid = console.request()
    bob = console.client("bob")
    token = bob.csrf("/inbox")
    bob.post(f"/requests/{rid}/deny", {"csrf": token, "reason": "no \u202eredro krow"})
    assert get_request(console.app.store, rid).status == "pending"
    assert "U+202E" in bob.get("/inbox")[2]
    console.app.store.execute("UPDATE access_requests SET reason = ? WHERE id = ?", ("evil\u202eexe.txt\u200b", rid))
    page = bob.get(f"/requests/{rid}")[2]
    assert "\u202e" not in page and "\u200b" not in page and "evil&lt;U+202E&gt;exe.txt&lt;U+200B&gt;" in page


def test_web_live_view_drops_osc_split_across_frames():
    from types import SimpleNamespace

    from broker.web_stream import _frame_event

    decoders: dict = {}
    events = [_frame_event(SimpleNamespace(kind="output", channel=1, mono_ns=i, payload=p), decoders)
              for i, p in enumerate((b"ok \x1b]52;c;ZXZp", b"bA==\x07\x1b[1mbold\x1b[0m \xe2\x98", b"\x83"))]
    text = "".join(json.loads(e.split("data: ", 1)[1])["d"] for e in events if e)
    assert text == "ok \x1b[1mbold\x1b[0m \u2603"
