"""Post-session indexing: big recordings are indexed by a niced child process; the broker keeps the same rows."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from broker.clock import FakeClock
from broker.errors import RecordingError, StorageError
from broker.indexer import build_index_rows, session_rows
from sessions.recwriter import RecordingWriter
from sessions.textindex import index_recording

KEY = bytes(range(32))


def keys(key_id: str) -> bytes:
    if key_id != "k1":
        raise StorageError(f"data key {key_id!r} is not in keys/data.key")
    return KEY


def record(path: Path, *, encrypted: bool = True) -> Path:
    """A shell with one typed command, an exec channel with a DICOM-like blob and one with log text."""
    clock = FakeClock()
    w = RecordingWriter(path, {"session_id": path.stem}, clock=clock, aead_key=KEY if encrypted else None,
                        key_id="k1" if encrypted else None)
    w.append_event(1, "pty", {"term": "xterm", "cols": 80, "rows": 24})
    w.append_event(1, "shell", {})
    w.append_data(1, "output", b"$ ")
    for b in b"uname -a\r":
        clock.advance(0.1)
        w.append_data(1, "input", bytes([b]))
        w.append_data(1, "output", bytes([b]) if b != 13 else b"\r\nLinux ct-01 6.1.0\r\n$ ")
    w.append_event(2, "exec", {"command": "cat /srv/dicom/study.dcm"})
    w.append_data(2, "output", b"\x00" * 128 + b"DICM" + os.urandom(100_000))
    w.append_event(3, "exec", {"command": "tail /var/log/gantry.log"})
    w.append_data(3, "output", b"".join(b"gantry line %d\n" % i for i in range(2000)))
    w.append_event(4, "file-transfer", {"direction": "get", "path": "/srv/report.pdf"})
    w.close()
    return path


def rows_in_thread(path: Path) -> tuple[list, list]:
    rows = session_rows(index_recording(path, keys))
    return rows.commands, rows.texts


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("encrypted", [True, False])
def test_the_child_gives_the_same_rows_as_indexing_in_the_broker(tmp_path: Path, encrypted: bool, caplog) -> None:
    path = record(tmp_path / "s.mbr", encrypted=encrypted)
    rows = run(build_index_rows(path, keys, child_min_bytes=0))
    assert (rows.commands, rows.texts) == rows_in_thread(path)
    assert [c[3] for c in rows.commands] == ["uname -a", "cat /srv/dicom/study.dcm", "tail /var/log/gantry.log"]
    assert (0.9, "output", "Linux ct-01 6.1.0") in [(round(o, 1), k, t) for o, k, t in rows.texts]
    assert any(t == "gantry line 1999" for _, _, t in rows.texts)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no fallback: the child did it


def test_a_child_that_cannot_start_or_fails_falls_back_to_a_thread(tmp_path: Path, caplog) -> None:
    path = record(tmp_path / "s.mbr")
    expected = rows_in_thread(path)
    rows = run(build_index_rows(path, keys, child_min_bytes=0, python=str(tmp_path / "no-such-python")))
    assert (rows.commands, rows.texts) == expected
    assert "cannot start the indexer process" in caplog.text and "indexing s.mbr on a broker thread" in caplog.text
    caplog.clear()
    rows = run(build_index_rows(path, keys, child_min_bytes=0, python="/bin/false"))
    assert (rows.commands, rows.texts) == expected
    assert "indexer process failed (exit status 1" in caplog.text
    assert KEY.hex() not in caplog.text


def test_small_recordings_stay_in_the_broker_and_errors_name_the_problem(tmp_path: Path) -> None:
    path = record(tmp_path / "s.mbr")
    assert path.stat().st_size < 1 << 20
    rows = run(build_index_rows(path, keys, child_min_bytes=1 << 20, python="/bin/false"))  # never started
    assert (rows.commands, rows.texts) == rows_in_thread(path)
    with pytest.raises(RecordingError, match="wrong key"):  # raised in the child, reported by the broker
        run(build_index_rows(path, lambda key_id: bytes(32), child_min_bytes=0))
    with pytest.raises(StorageError, match="data key 'k2'"):
        run(build_index_rows(path, lambda key_id: keys("k2"), child_min_bytes=0))
    (tmp_path / "junk.mbr").write_bytes(b"not a recording at all")
    with pytest.raises(RecordingError, match="not a medbroker recording"):
        run(build_index_rows(tmp_path / "junk.mbr", keys, child_min_bytes=0))
    with pytest.raises(OSError):
        run(build_index_rows(tmp_path / "gone.mbr", keys, child_min_bytes=0))


def _indexer_children() -> list[int]:
    """Processes of ours running ``-m broker.indexer`` (read from /proc, as ps would)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"broker.indexer" in cmdline:
            found.append(int(entry.name))
    return found


def test_cancelling_stops_the_child(tmp_path: Path) -> None:
    path = record(tmp_path / "s.mbr")

    async def scenario() -> None:
        task = asyncio.create_task(build_index_rows(path, keys, child_min_bytes=0))
        deadline = time.monotonic() + 20
        while not _indexer_children() and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert _indexer_children(), "the child never showed up"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _indexer_children() == []  # killed and reaped, not left running

    run(scenario())


@pytest.mark.openssh
def test_a_big_session_is_indexed_by_the_child_and_searchable(world, caplog) -> None:
    world.grant()
    result = world.ssh("alice@ct-01", "seq 1 70000; echo needle-$((6*7))")
    assert result.returncode == 0 and result.stdout.endswith(b"69999\n70000\nneedle-42\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (world.app.store.list_sessions()
                                                and world.app.store.list_sessions()[-1]["indexed_at"]):
        time.sleep(0.05)
    session = world.app.store.list_sessions()[-1]
    assert world.app.recordings.local_path(session["recording"]).stat().st_size >= 256 << 10  # big enough for the child
    assert [c["command"] for c in world.app.store.session_commands(session["id"])] == \
        ["seq 1 70000; echo needle-$((6*7))"]
    assert [h["text"] for h in world.app.store.search_sessions("needle-42")] == ["needle-42"]
    assert [h["text"] for h in world.app.store.search_sessions("69999")] == ["69999"]
    assert "indexer process" not in caplog.text and "cannot index" not in caplog.text  # no fallback


def test_at_most_max_children_index_at_once(tmp_path: Path) -> None:
    """A shutdown ends every session together: their children queue instead of starting all at once."""
    from broker.indexer import MAX_CHILDREN

    paths = [record(tmp_path / f"s{i}.mbr") for i in range(MAX_CHILDREN + 3)]
    seen: list[int] = []

    async def scenario() -> list:
        jobs = asyncio.gather(*(build_index_rows(p, keys, child_min_bytes=0) for p in paths))
        deadline = time.monotonic() + 60
        while not jobs.done() and time.monotonic() < deadline:
            seen.append(len(_indexer_children()))
            await asyncio.sleep(0.005)
        return await jobs

    results = run(scenario())
    assert [(r.commands, r.texts) for r in results] == [rows_in_thread(p) for p in paths]
    assert max(seen) == MAX_CHILDREN  # they did overlap, and never beyond the limit
