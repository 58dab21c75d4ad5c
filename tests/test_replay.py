"""Replay and exports: timing with a fake sleep, asciicast v2 (checked by asciinema), transcript, JSON."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.clock import FakeClock
from broker.errors import UsageError
from sessions.recording import KINDS, Frame, read_frames, read_header, verify_recording
from sessions.recwriter import RecordingWriter
from sessions.replay import replay, to_asciicast, to_json, to_text, verification_summary

HEADER = {"session_id": "s-42", "user": "alice", "device": "ct-01", "started_at": "2026-01-01T08:00:00.000000Z"}


def record(path: Path, script: list[tuple[float, str, int, Any]]) -> Path:
    """Write a recording from (seconds to wait, kind, channel, bytes or event dict) steps, one frame per step (each
    data step is drained, so the next one cannot join its frame: these scripts cut sequences across frames)."""
    clock = FakeClock()
    w = RecordingWriter(path, HEADER, clock=clock)
    for wait, kind, channel, value in script:
        clock.advance(wait)
        if isinstance(value, bytes):
            w.append_data(channel, kind, value)
            w.drain()
        else:
            w.append_event(channel, kind, value)
    w.close()
    return path


TIMED = [
    (0.0, "pty", 0, {"term": "xterm", "cols": 100, "rows": 30}),
    (0.0, "shell", 0, {}),
    (1.0, "output", 0, b"$ "),
    (0.25, "input", 0, b"l"),
    (0.25, "output", 0, b"l"),
    (10.0, "output", 0, b"s\r\n"),
    (0.5, "notice", 0, {"text": "your access window ends in 5 minutes"}),
    (0.5, "subsystem", 1, {"name": "sftp"}),
    (0.0, "output", 1, b"\x00\x00\x00\x05\x02SFTP"),
    (0.5, "stderr", 0, b"oops\r\n"),
]
NOTICE = b"\r\nmedbroker: your access window ends in 5 minutes\r\n"


@pytest.fixture
def timed(tmp_path: Path) -> Path:
    return record(tmp_path / "t.mbr", TIMED)


def play(path: Path, **kwargs: Any) -> tuple[list[tuple[str, Any]], Any]:
    log: list[tuple[str, Any]] = []
    stats = replay(read_frames(path), lambda b: log.append(("write", b)), sleep=lambda s: log.append(("sleep", s)),
                   **kwargs)
    return log, stats


def test_replay_keeps_recorded_timing(timed: Path) -> None:
    log, stats = play(timed)
    assert log == [("sleep", 1.0), ("write", b"$ "), ("sleep", 0.5), ("write", b"l"), ("sleep", 10.0),
                   ("write", b"s\r\n"), ("sleep", 0.5), ("write", NOTICE), ("sleep", 1.0), ("write", b"oops\r\n")]
    assert (stats.frames, stats.bytes_written, stats.slept, stats.recorded_seconds) == (5, 12 + len(NOTICE), 13.0, 13.0)


def test_replay_speed_and_max_idle(timed: Path) -> None:
    assert [v for k, v in play(timed, speed=2.0)[0] if k == "sleep"] == [0.5, 0.25, 5.0, 0.25, 0.5]
    assert [v for k, v in play(timed, max_idle=2.0)[0] if k == "sleep"] == [1.0, 0.5, 2.0, 0.5, 1.0]
    assert [v for k, v in play(timed, max_idle=2.0, speed=4.0)[0] if k == "sleep"] == [0.25, 0.125, 0.5, 0.125, 0.25]


def test_replay_start_at_applies_earlier_output_at_once(timed: Path) -> None:
    log, stats = play(timed, start_at=5.0)
    assert log == [("write", b"$ "), ("write", b"l"), ("sleep", 6.5), ("write", b"s\r\n"), ("sleep", 0.5),
                   ("write", NOTICE), ("sleep", 1.0), ("write", b"oops\r\n")]
    assert stats.slept == 8.0


def test_replay_instant_and_channel_choice(timed: Path) -> None:
    log, _ = play(timed, instant=True)
    assert all(k == "write" for k, _ in log) and b"".join(v for _, v in log) == b"$ ls\r\n" + NOTICE + b"oops\r\n"
    log, _ = play(timed, instant=True, channels=[1])
    assert [v for _, v in log] == [b"\x00\x00\x00\x05\x02SFTP"]
    with pytest.raises(UsageError, match="speed must be positive"):
        play(timed, speed=0)
    with pytest.raises(UsageError):
        play(timed, max_idle=-1)


def cast_lines(text: str) -> tuple[dict[str, Any], list[list[Any]]]:
    assert text.endswith("\n") and all(len(line.splitlines()) == 1 for line in text[:-1].split("\n"))
    lines = text[:-1].split("\n")
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_asciicast_structure(tmp_path: Path) -> None:
    path = record(tmp_path / "a.mbr", TIMED + [
        (1.0, "resize", 0, {"cols": 120, "rows": 40}),
        (0.0, "exec", 2, {"command": "ls -l /data"}),
        (0.0, "policy-denial", 1, {"op": "open", "path": "/data/dicom/1.dcm", "reason": "protected path"}),
        (0.0, "file-transfer", 1, {"path": "/tmp/log.txt", "direction": "download", "bytes": 12, "sha256": "ab"}),
        (0.0, "alert", 0, {"content": "HL7 message", "action": "session ended"}),
    ])
    result = verify_recording(path)
    head, events = cast_lines(to_asciicast(read_frames(path), header=read_header(path), verify_result=result))
    assert head["version"] == 2 and (head["width"], head["height"]) == (100, 30)
    assert head["timestamp"] == 1767254400 and head["env"]["TERM"] == "xterm"
    assert "verified (16 frames" in head["title"] and head["env"]["MEDBROKER_VERIFICATION"].startswith("verified")
    assert all(isinstance(e[0], float) and e[1] in "oirm" and isinstance(e[2], str) for e in events)
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert [e for e in events if e[1] == "i"] == [[1.25, "i", "l"]]
    assert [e for e in events if e[1] == "r"] == [[14.0, "r", "120x40"]]
    assert [e[2] for e in events if e[1] == "m"] == [
        "notice: your access window ends in 5 minutes", "exec: ls -l /data",
        "denied: open /data/dicom/1.dcm: protected path", "transfer: download /tmp/log.txt (12 bytes, sha256 ab)",
        'alert: {"content":"HL7 message","action":"session ended"}']
    assert "".join(e[2] for e in events if e[1] == "o") == "$ ls\r\n" + NOTICE.decode() + "oops\r\n"


def test_asciicast_defaults_and_failed_verification(tmp_path: Path) -> None:
    path = record(tmp_path / "a.mbr", [(0.5, "output", 0, b"hi")])
    data = path.read_bytes()
    path.write_bytes(data.replace(b"hi", b"ho"))
    result = verify_recording(path)
    head, events = cast_lines(to_asciicast(read_frames(path, strict=False), header=read_header(path),
                                           verify_result=result))
    assert (head["width"], head["height"]) == (80, 24) and events == [[0.5, "o", "ho"]]
    assert "[FAILED: frame 1: hash mismatch]" in head["title"]
    assert verification_summary(None) == "not verified"


def test_utf8_split_across_frames(tmp_path: Path) -> None:
    text = "é€😀 ok"
    raw = text.encode()
    pieces = [raw[:1], raw[1:3], raw[3:4], raw[4:8], raw[8:]]  # every multibyte char is cut
    path = record(tmp_path / "u.mbr", [(0.1, "output", 0, p) for p in pieces] + [(0.1, "output", 0, b"\xff!")])
    _, events = cast_lines(to_asciicast(read_frames(path), header=HEADER))
    joined = "".join(e[2] for e in events if e[1] == "o")
    assert joined == text + "\ufffd!"
    transcript = to_text(read_frames(path), header=HEADER)
    assert transcript.splitlines()[1] == text + "\ufffd!"


@pytest.mark.skipif(shutil.which("asciinema") is None or shutil.which("script") is None,
                    reason="asciinema or script (util-linux) is not installed")
def test_asciinema_plays_the_export(tmp_path: Path) -> None:
    raw = "ünïcode ✓".encode()
    path = record(tmp_path / "p.mbr", TIMED + [(0.1, "output", 0, raw[:2]), (0.1, "output", 0, raw[2:])])
    cast = tmp_path / "p.cast"
    cast.write_text(to_asciicast(read_frames(path), header=read_header(path), verify_result=verify_recording(path)))
    # asciinema cat needs a terminal: script(1) gives it one; it then writes the "o" events byte for byte.
    proc = subprocess.run(["script", "-qec", f"asciinema cat {cast}", "/dev/null"], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == b"$ ls\r\n" + NOTICE + b"oops\r\n" + raw
    broken = tmp_path / "broken.cast"
    broken.write_text('{"version": 7}\n')
    proc = subprocess.run(["script", "-qec", f"asciinema cat {broken}", "/dev/null"], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert b"printing failed" in proc.stdout + proc.stderr  # the check above can fail


def test_text_transcript(tmp_path: Path) -> None:
    path = record(tmp_path / "t.mbr", [
        (0.0, "pty", 0, {"term": "xterm", "cols": 80, "rows": 24}),
        (1.0, "output", 0, b"\x1b]0;alice@ct-01: ~\x07\x1b[1;32malice@ct-01\x1b[0m:~$ "),
        (0.2, "output", 0, b"ls\x1b[3"),  # a colour code cut in half
        (0.0, "output", 0, b"4mX\x1b[0m\r\nfile1  fi\x08\x08file2\r\n\x1b]0;ti"),  # and a title
        (2.0, "output", 0, b"tle\x07$ "),
        (0.0, "exec", 0, {"command": "ls -l"}),
        (0.1, "subsystem", 1, {"name": "sftp"}),
        (0.0, "output", 1, b"\x00\x00\x00\x05\x02SFTPBINARY"),
        (0.0, "exit", 0, {"status": 0}),
    ])
    result = verify_recording(path)
    lines = to_text(read_frames(path), header=read_header(path), verify_result=result).splitlines()
    assert lines[0] == ("# medbroker session s-42 alice@ct-01 started 2026-01-01T08:00:00.000000Z; "
                        f"recording verified (10 frames, final hash {result.final_hash[:16]}…)")
    assert lines[1:] == [
        "[00:00:00.0 pty] xterm 80x24",
        "alice@ct-01:~$ lsX",
        "file1  file2",
        "$ ",
        "[00:00:03.2 exec] ls -l",
        "[00:00:03.3 subsystem] sftp",
        "[00:00:03.3 exit] status 0",
        "[00:00:03.3 end] closed",
    ]


def test_json_export(tmp_path: Path) -> None:
    blob = bytes(range(256))
    path = record(tmp_path / "j.mbr", [(0.5, "output", 0, blob), (0.5, "exec", 3, {"command": "uname -a"})])
    result = verify_recording(path)
    doc = json.loads(to_json(read_frames(path), header=read_header(path), verify_result=result))
    assert doc["format"] == "medbroker-recording-export" and doc["header"] == HEADER
    assert doc["verification"]["ok"] is True and doc["verification"]["final_hash"] == result.final_hash
    first, second, end = doc["frames"]
    assert base64.b64decode(first["data_b64"]) == blob and first["text_preview"].startswith("\x00\x01\x02")
    assert (first["seq"], first["kind"], first["offset"], first["at"]) == (1, "output", 0.5,
                                                                            "2026-01-01T08:00:00.500000Z")
    assert second["event"] == {"command": "uname -a"} and second["channel"] == 3
    assert end["kind"] == "end" and end["hash"] == result.final_hash


_frames = st.lists(st.builds(
    lambda i, ch, kind, payload: (ch, kind, payload),
    st.integers(), st.integers(0, 3), st.sampled_from(sorted(KINDS)),
    st.one_of(st.binary(max_size=80), st.dictionaries(st.sampled_from(["cols", "rows", "text", "command", "term"]),
                                                       st.one_of(st.integers(-5, 500), st.text(max_size=10)))
              .map(lambda d: json.dumps(d).encode())),
), max_size=30)


# Exports only see frames a reader produced; the byte-level parser fuzz (FUZZ_EXAMPLES) is in test_recording.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=_frames)
def test_fuzz_exports_never_break(items: list[tuple[int, str, bytes]]) -> None:
    frames = [Frame(seq=i + 1, mono_ns=i * 1_000_000, wall_us=i, channel=ch, kind=kind, payload=payload, hash="00")
              for i, (ch, kind, payload) in enumerate(items)]
    head, events = cast_lines(to_asciicast(frames, header={}))
    assert head["width"] > 0 and head["height"] > 0 and [e[0] for e in events] == sorted(e[0] for e in events)
    assert to_text(frames).startswith("# medbroker session ?")
    assert len(json.loads(to_json(frames, header={}))["frames"]) == len(frames)
    written: list[bytes] = []
    replay(frames, written.append, instant=True)
    assert all(isinstance(b, bytes) for b in written)
