"""Search text of a finished session: one pass over the recording; binary output and full caps are left unread."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import FUZZ_EXAMPLES_OTHER as FUZZ_EXAMPLES  # an index builder, not a front-door parser: 2_000 in ci
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.clock import FakeClock
from sessions import textindex
from sessions.recording import DATA_KINDS, Frame, read_frames
from sessions.recwriter import RecordingWriter
from sessions.textindex import SessionText, TextIndex, build_session_text, index_recording

KEY = bytes(range(32))


def keys(key_id: str) -> bytes:
    return {"k1": KEY}[key_id]


def record(path: Path, script: list[tuple[str, int, Any]], *, encrypted: bool = True) -> Path:
    """A closed recording of (kind, channel, bytes or event) steps, 0.1 s apart."""
    clock = FakeClock()
    w = RecordingWriter(path, {"session_id": path.stem}, clock=clock, aead_key=KEY if encrypted else None,
                        key_id="k1" if encrypted else None)
    for kind, channel, value in script:
        clock.advance(0.1)
        if kind in DATA_KINDS:
            w.append_data(channel, kind, value)
        else:
            w.append_event(channel, kind, value)
    w.close()
    return path


def typed(channel: int, line: bytes, output: bytes) -> list[tuple[str, int, Any]]:
    """A command typed key by key with its echo, then what it printed."""
    steps: list[tuple[str, int, Any]] = []
    for b in line:
        steps += [("input", channel, bytes([b])), ("output", channel, bytes([b]))]
    return steps + [("input", channel, b"\r"), ("output", channel, b"\r\n" + output)]


def texts(text: SessionText, channel: int | None = None) -> list[str]:
    return [line for _, ch, line in text.lines if channel is None or ch == channel]


DICOM = b"\x00" * 128 + b"DICM" + random.Random(7).randbytes(6000) + b"\nneedle-in-binary\n"


def test_one_pass_gives_commands_text_and_transfers_and_skips_binary_channels(tmp_path: Path) -> None:
    script = [("pty", 1, {"term": "xterm", "cols": 80, "rows": 24}), ("shell", 1, {}), ("output", 1, b"$ ")]
    script += typed(1, b"ls -la", "total 4\r\nBefund-Müller.pdf\r\n$ ".encode())
    script += [("exec", 2, {"command": "cat /srv/dicom/study.dcm"})]
    script += [("output", 2, DICOM[i:i + 700]) for i in range(0, len(DICOM), 700)]
    script += [("exec", 3, {"command": "dmesg | tail -1"}), ("output", 3, b"needle-in-text\n"),
               ("stderr", 3, "Fehler: Gerät nicht bereit\n".encode("latin-1"))]
    script += [("subsystem", 4, {"name": "sftp"}), ("input", 4, b"PROTOCOL-BYTES\n"),
               ("output", 4, b"PROTOCOL-BYTES\n"), ("file-transfer", 4, {"direction": "get", "path": "/srv/a.pdf"})]
    path = record(tmp_path / "s.mbr", script)
    text = index_recording(path, keys)
    assert [(c.channel, c.command, c.source) for c in text.commands] == [
        (1, "ls -la", "shell"), (2, "cat /srv/dicom/study.dcm", "exec"), (3, "dmesg | tail -1", "exec")]
    assert texts(text, 1) == ["$ ls -la", "total 4", "Befund-Müller.pdf", "$"]  # the last prompt too
    assert texts(text, 2) == []  # a DICOM file is not terminal text: not one line of it
    assert texts(text, 3) == ["needle-in-text", "Fehler: Ger\ufffdt nicht bereit"]  # Latin-1 is still text
    assert texts(text, 4) == [] and [t[1:] for t in text.transfers] == [(4, "get /srv/a.pdf")]
    assert not text.truncated
    # Leaving frames unread changes nothing: the same as indexing every frame.
    assert text == build_session_text(lambda: read_frames(path, key_lookup=keys))


def test_binary_is_judged_on_the_first_kib_of_each_channel(tmp_path: Path) -> None:
    build_log = b"".join(b"build step %d ok\n" % i for i in range(80))
    stray_nul = b"ready\x00\n" + b"".join(b"status line %d\n" % i for i in range(100))
    path = record(tmp_path / "b.mbr", [
        ("exec", 1, {"command": "make"}), ("output", 1, build_log), ("output", 1, DICOM),
        ("exec", 2, {"command": "cat blob"}), ("output", 2, random.Random(1).randbytes(900)),
        ("output", 2, b"\nlater-text-on-a-binary-channel\n"),
        ("exec", 3, {"command": "status"}), ("output", 3, stray_nul),
        ("exec", 4, {"command": "echo short"}), ("output", 4, b"short\n"),
    ])
    text = index_recording(path, keys)
    assert texts(text, 1)[:2] == ["build step 0 ok", "build step 1 ok"] and "needle-in-binary" not in texts(text, 1)
    assert texts(text, 2) == []  # binary from its first bytes: what follows is not read either
    assert texts(text, 3)[:2] == ["ready", "status line 0"]  # one stray NUL is not binary
    assert texts(text, 4) == ["short"]  # under a KiB in all: judged at the end
    assert text == build_session_text(lambda: read_frames(path, key_lookup=keys))


def test_full_caps_stop_reading_output_but_shell_commands_still_count(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(textindex, "MAX_EXAMINED", 4000)
    script = [("exec", 1, {"command": "cat /var/log/gantry.log"})]
    script += [("output", 1, b"".join(b"log-%03d\n" % (i * 100 + j) for j in range(100))) for i in range(10)]
    script += [("pty", 2, {"cols": 80, "rows": 24}), ("shell", 2, {}), ("output", 2, b"$ ")]
    script += typed(2, b"uptime", b" 10:00 up 3 days\r\n$ ")
    path = record(tmp_path / "c.mbr", script)
    index = TextIndex()
    asked: list[tuple[int, str, bool]] = []

    def want(channel: int, kind: str) -> bool:
        asked.append((channel, kind, index.wants(channel, kind)))
        return asked[-1][2]

    for frame in read_frames(path, key_lookup=keys, want_data=want):
        index.feed(frame)
    text = index.finish()
    assert text.truncated and texts(text, 1)[0] == "log-000" and len(texts(text, 1)) == 500  # 5 frames of 800 bytes
    assert [wanted for ch, kind, wanted in asked if ch == 1] == [True] * 5 + [False] * 5  # the rest: not decrypted
    assert [c.command for c in text.commands] == ["cat /var/log/gantry.log", "uptime"]  # PTY output still read
    assert {(kind, wanted) for ch, kind, wanted in asked if ch == 2} == {("input", True), ("output", True)}
    assert text == build_session_text(lambda: read_frames(path, key_lookup=keys))


_kinds = st.sampled_from(["input", "output", "output", "stderr", "pty", "exec", "exec-served", "subsystem",
                          "file-transfer", "resize"])
_payloads = st.one_of(st.binary(max_size=300), st.sampled_from([
    b"$ ", b"ls\r", b"a\r\nb\r\n", b"\x00\x00\x01", "Grüße\n".encode("latin-1"), b"\x1b[31mred\x1b[0m\n"]))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_kinds, st.integers(0, 3), _payloads), max_size=60), st.integers(16, 2000),
       st.integers(8, 1000))
def test_leaving_out_unwanted_frames_never_changes_the_index(steps: list[tuple[str, int, bytes]], examined: int,
                                                             text_cap: int) -> None:
    frames = []
    for seq, (kind, channel, data) in enumerate(steps, start=1):
        if kind == "exec-served":
            kind, data = "exec", json.dumps({"command": "scp -f x", "served_by": "medbroker"}).encode()
        elif kind not in DATA_KINDS:
            data = json.dumps({"cols": len(data) % 200, "rows": len(data) % 50, "command": data.hex()[:20],
                               "name": "sftp", "direction": "put", "path": "/x"}).encode()
        frames.append(Frame(seq, seq * 10**8, seq, channel, kind, data, ""))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(textindex, "MAX_EXAMINED", examined)
        mp.setattr(textindex, "MAX_TEXT", text_cap)
        everything = build_session_text(lambda: frames)
        index = TextIndex()
        for frame in frames:
            if frame.kind not in DATA_KINDS or index.wants(frame.channel, frame.kind):
                index.feed(frame)
        assert index.finish() == everything
