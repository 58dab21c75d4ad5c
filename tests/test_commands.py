"""Command index: commands reconstructed from what the terminal showed, through a real shell."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from sessions.cmd_index import index_commands
from sessions.recording import read_frames

PROMPT = re.compile(rb"[#$] ")


def _commands(world):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = world.app.store.list_sessions()
        if rows and rows[-1]["final_hash"]:
            break
        time.sleep(0.05)
    frames = list(read_frames(world.app.recordings.local_path(rows[-1]["recording"]), key_lookup=world.app.keys.get))
    return [c.command for c in index_commands(frames)]


@pytest.mark.openssh
def test_editing_keys_history_and_search_give_the_command_that_ran(world):
    world.grant()
    term = world.pty("alice@ct-01", command="bash --norc --noprofile -i", cols=120, rows=30)
    try:
        term.expect(PROMPT, timeout=15)
        term.send(b"PS1='$ '\r")
        # The new prompt on its own line: PROMPT alone matches the echoed "PS1='$ '" and the next keys
        # would then race the prompt (the index would read "$ echo ..." as the command).
        term.expect(re.compile(rb"\n[^\n']*\$ "), timeout=10)

        def run(keys: bytes, marker: bytes) -> None:
            # The command's output line, then the next prompt on the line after it: the marker alone can match
            # the line being edited (Ctrl-R shows "echo aXbc" before Enter) and a prompt alone the one bash
            # redraws with the accepted line, and the next keys would then race the command (flaky under load).
            term.send(keys)
            term.expect(re.compile(re.escape(marker) + rb"\r?\n[^\n]*[#$] "), timeout=10)

        run(b"echo hexo\x7f\x7fllo world\r", b"hello world")            # backspace
        run(b"echo abc\x1b[D\x1b[DX\r", b"aXbc")                        # left arrow, insert
        run(b"\x1b[A\x1b[A\r", b"hello world")                          # history recall (two up)
        run(b"\x12aXb\r", b"aXbc")                                      # Ctrl-R reverse search
        run(b"ech\ttab-done\r", b"tab-done")                          # tab completion
        term.send(b"echo 'multi\r")                                     # a quoted newline, typed
        term.expect(re.compile(rb"> "), timeout=10)
        run(b"line'\r", b"line")
        run(b"echo 'paste\rd'\r", b"d")                                # the same, pasted in one go
        term.send(b"exit\r")
        term.wait(timeout=10)
    finally:
        term.close()
    cmds = _commands(world)
    assert "bash --norc --noprofile -i" in cmds  # the exec command of the channel
    shell = [c for c in cmds if not c.startswith("bash ")]
    assert shell[:6] == ["PS1='$ '", "echo hello world", "echo aXbc", "echo hello world", "echo aXbc",
                         "echo tab-done"], shell
    assert shell[6:10] == ["echo 'multi", "line'", "echo 'paste", "d'"], shell
    assert shell[-1] == "exit"


class _F:
    def __init__(self, kind, payload=b"", event=None, offset=0.0, channel=1):
        self.kind, self.payload, self._event, self.offset, self.channel = kind, payload, event or {}, offset, channel

    def event(self):
        return self._event


def test_exec_commands_and_screen_lines_without_ssh():
    frames = [_F("exec", event={"command": "uname -a"}, channel=2), _F("pty", event={"cols": 40, "rows": 5}),
              _F("output", b"$ "), _F("input", b"ls -l\x7f\x7fla\r", offset=1.0), _F("output", b"ls -la\r\nx\r\n$ ")]
    assert [(c.command, c.source) for c in index_commands(frames)] == [("uname -a", "exec"), ("ls -la", "shell")]


def _typed(line: bytes, offset: float) -> list:
    return [_F("input", line + b"\r", offset=offset), _F("output", line + b"\r\n", offset=offset)]


def test_long_output_between_commands_is_drawn_from_its_tail_with_the_same_result(monkeypatch):
    """A long `cat` in the shell: the emulator draws only its last part (pyte draws ~0.35 MB/s), same commands.

    Limits scaled down 16x so the exact run stays fast."""
    import sessions.cmd_index as commands

    monkeypatch.setattr(commands, "_EXACT", 16 << 10)
    monkeypatch.setattr(commands, "_TAIL", 4 << 10)
    log = b"".join(b"\x1b[32mOK\x1b[0m gantry step %d \xc3\xa4 done\r\n" % i for i in range(6000))
    frames = [_F("pty", event={"cols": 80, "rows": 24}), _F("output", b"$ ")]
    frames += _typed(b"cat /var/log/gantry.log", 1.0)
    frames += [_F("output", log[i:i + 4096], offset=2.0) for i in range(0, len(log), 4096)]
    frames += [_F("output", b"$ "), _F("resize", event={"cols": 100, "rows": 30})] + _typed(b"uptime", 3.0)
    frames += [_F("output", b" 10:00 up 3 days\r\n" * 3000 + b"$ ", offset=3.5)]
    frames += [_F("input", b"ls -l", offset=4.0), _F("output", b"ls -l", offset=4.0)]
    frames += [_F("input", b"a\r", offset=4.2), _F("output", b"a\r\n" + log[:50_000] + b"$ ", offset=4.3)]
    assert len(log) > 10 * commands._EXACT
    tail_fed = [(c.command, c.offset) for c in index_commands(frames)]
    monkeypatch.setattr(commands, "_EXACT", 1 << 40)  # draw every byte
    exact = [(c.command, c.offset) for c in index_commands(frames)]
    assert tail_fed == exact == [("cat /var/log/gantry.log", 1.0), ("uptime", 3.0), ("ls -la", 4.2)]


from hypothesis import given, strategies as st  # noqa: E402


@given(st.lists(st.tuples(st.sampled_from(["input", "output", "resize", "pty"]), st.binary(max_size=64),
                          st.integers(1, 300), st.integers(1, 100)), max_size=40))
def test_random_terminal_traffic_never_breaks_the_index(items):
    frames = [_F(kind, data, {"cols": cols, "rows": rows}, float(i)) for i, (kind, data, cols, rows) in
              enumerate(items)]
    for entry in index_commands(frames):
        assert isinstance(entry.command, str) and len(entry.command) <= 4096


@pytest.mark.openssh
def test_finished_sessions_are_searchable_and_show_their_commands(world):
    world.grant()
    assert world.ssh("alice@ct-01", "echo needle-$((7*6)); ls /").returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (world.app.store.list_sessions()
                                                and world.app.store.list_sessions()[-1]["indexed_at"]):
        time.sleep(0.05)
    session = world.app.store.list_sessions()[-1]
    assert [c["command"] for c in world.app.store.session_commands(session["id"])] == ["echo needle-$((7*6)); ls /"]
    hits = world.app.store.search_sessions("needle-42")
    assert [(h["session_id"], h["kind"], h["text"]) for h in hits] == [(session["id"], "output", "needle-42")]
    assert world.app.store.search_sessions("needle", device="ct-01", user="alice")
    assert world.app.store.search_sessions("needle", user="bob") == []
    assert world.app.store.search_sessions("no-such-text") == []
