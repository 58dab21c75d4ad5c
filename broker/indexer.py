"""Post-session indexing in a niced child process, so a big recording never holds the live sessions' GIL."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from broker.errors import BrokerError, RecordingError
from sessions.recording import read_header

if TYPE_CHECKING:  # pragma: no cover
    from sessions.textindex import SessionText

__all__ = ["CHILD_MIN_BYTES", "MAX_CHILDREN", "IndexRows", "build_index_rows", "session_rows", "run_child"]

log = logging.getLogger("medbroker.indexer")

CHILD_MIN_BYTES = 256 << 10
"""Smaller recordings are indexed on a thread of the broker: starting a child costs ~0.3 s of CPU, more
than indexing a few hundred KiB does."""

MAX_CHILDREN = 2
"""Children indexing at once per broker process; the rest wait (a shutdown ends every session together)."""

_BATCH = 1 << 16  # answer bytes parsed at a time
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()
_ROOT = str(Path(__file__).resolve().parents[1])  # holds broker/ and sessions/: the child imports from here


@dataclass(frozen=True)
class IndexRows:
    """A session's index as ``Store.save_session_text`` takes it."""

    commands: list[tuple[Any, ...]]  # (offset, channel, source, command)
    texts: list[tuple[Any, ...]]  # (offset, "command" | "output" | "transfer", text)


def session_rows(text: SessionText) -> IndexRows:
    """The database rows of an index: commands, and the search text (commands, output lines, transfers)."""
    commands = [(c.offset, c.channel, c.source, c.command) for c in text.commands]
    texts = [(c.offset, "command", c.command) for c in text.commands]
    texts += [(offset, "output", line) for offset, _, line in text.lines]
    texts += [(offset, "transfer", what) for offset, _, what in text.transfers]
    return IndexRows(commands, texts)


def _index_here(path: Path, key_lookup: Callable[[str], bytes]) -> IndexRows:
    from sessions.textindex import index_recording  # lazily: the terminal emulator (pyte) is not needed at start-up

    return session_rows(index_recording(path, key_lookup))


def _job(path: Path, key_lookup: Callable[[str], bytes]) -> bytes:
    """The child's instructions: the path and, for an encrypted recording, the one key it needs."""
    enc = read_header(path).get("encryption")
    job: dict[str, Any] = {"path": str(path)}
    if isinstance(enc, dict) and isinstance(enc.get("key_id"), str):
        job["key_id"], job["key"] = enc["key_id"], key_lookup(enc["key_id"]).hex()
    return json.dumps(job).encode()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    return env


async def build_index_rows(path: Path, key_lookup: Callable[[str], bytes], *,
                           child_min_bytes: int = CHILD_MIN_BYTES, python: str = sys.executable) -> IndexRows:
    """Index a closed recording without holding the event loop or, when it is big, the broker's GIL.

    Recordings of ``child_min_bytes`` or more are indexed by ``python -m broker.indexer`` at nice 10, at
    most :data:`MAX_CHILDREN` at once; the key travels through its stdin, never argv or environment. If
    the child cannot start or dies without an answer, this logs a warning and indexes on a thread of the
    broker instead.

    :param key_lookup: key id → 32-byte key (``KeyProvider.get``); called in the broker only
    :param python: the interpreter for the child
    :returns: the rows to store (the database write stays with the caller)
    :raises RecordingError: the recording cannot be read, or its key is missing
    :raises BrokerError: ``key_lookup`` failed
    :raises OSError: the file is gone
    """
    loop = asyncio.get_running_loop()
    if (await loop.run_in_executor(None, os.stat, path)).st_size < child_min_bytes:
        return await loop.run_in_executor(None, _index_here, path, key_lookup)
    job = await loop.run_in_executor(None, _job, path, key_lookup)
    async with _SLOTS.setdefault(loop, asyncio.Semaphore(MAX_CHILDREN)):
        answer, err, status = await _run_child(path, job, python)
    if status is None:
        return await loop.run_in_executor(None, _index_here, path, key_lookup)
    if status != 0 or answer is None:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no usable answer"]
        log.warning("indexer process failed (exit status %s: %s); indexing %s on a broker thread",
                    status, last[0][:300], path.name)
        return await loop.run_in_executor(None, _index_here, path, key_lookup)
    if isinstance(answer, str):
        raise RecordingError(answer)
    return answer


async def _run_child(path: Path, job: bytes, python: str) -> tuple[IndexRows | str | None, bytes, int | None]:
    """(answer, stderr, exit status); status None: it could not start (logged)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            python, "-P", "-m", "broker.indexer", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=_child_env())
    except OSError as exc:
        log.warning("cannot start the indexer process (%s); indexing %s on a broker thread", exc, path.name)
        return None, b"", None
    try:
        answer, err = await _talk(proc, job)
    except BaseException:  # cancelled (broker stopping): the child goes too
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return answer, err, proc.returncode


async def _talk(proc: asyncio.subprocess.Process, job: bytes) -> tuple[IndexRows | str | None, bytes]:
    """Send the job; read the answer as it comes, a batch at a time (one json.loads of a 5 MB answer held the
    GIL for 50-90 ms). Returns (rows, or the child's error message, or None if unusable; its stderr)."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def send() -> None:
        try:
            stdin.write(job)
            await stdin.drain()
        except ConnectionError:  # it died before reading: the exit status tells
            pass
        finally:
            stdin.close()

    async def receive() -> IndexRows | str | None:
        answer = _Answer()
        while chunk := await stdout.read(_BATCH):
            answer.feed(chunk)
        return answer.result()

    _, answer, err = await asyncio.gather(send(), receive(), proc.stderr.read())
    await proc.wait()
    return answer, err


class _Answer:
    """The child's answer, JSON lines: ``["c", offset, channel, source, command]``, ``["t", offset, kind,
    text]``, then ``["end", commands, texts]``; or ``["error", message]``."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.texts: list[tuple[Any, ...]] = []
        self.error: str | None = None
        self.end: tuple[Any, Any] | None = None
        self.rest = b""
        self.bad = False

    def feed(self, chunk: bytes) -> None:
        lines = (self.rest + chunk).split(b"\n")
        self.rest = lines.pop()
        if self.bad or not lines:
            return
        try:
            items = json.loads(b"[" + b",".join(lines) + b"]")
        except ValueError:
            self.bad = True
            return
        for item in items:
            tag, size = (item[0], len(item)) if isinstance(item, list) and item else (None, 0)
            if tag == "c" and size == 5:
                self.commands.append(tuple(item[1:]))
            elif tag == "t" and size == 4:
                self.texts.append(tuple(item[1:]))
            elif tag == "error" and size == 2:
                self.error = str(item[1])
            elif tag == "end" and size == 3:
                self.end = (item[1], item[2])
            else:
                self.bad = True

    def result(self) -> IndexRows | str | None:
        if self.bad or self.rest:
            return None
        if self.error is not None:
            return self.error
        if self.end != (len(self.commands), len(self.texts)):  # cut short
            return None
        return IndexRows(self.commands, self.texts)


def run_child(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The child's side: read the job from ``stdin``, write the rows (or the error) to ``stdout`` as JSON lines.

    :returns: the exit status (0; a crash exits non-zero by itself)
    """
    os.nice(10)
    job = json.loads(stdin.read())
    key_id, key = job.get("key_id"), bytes.fromhex(job.get("key") or "")

    def lookup(wanted: str) -> bytes:
        if wanted != key_id:
            raise RecordingError(f"the indexer was not given key {wanted!r}")
        return key

    try:
        rows = _index_here(Path(job["path"]), lookup)
    except (OSError, BrokerError) as exc:
        stdout.write(json.dumps(["error", str(exc)]).encode() + b"\n")
        stdout.flush()
        return 0
    items: list[list[Any]] = [["c", *row] for row in rows.commands] + [["t", *row] for row in rows.texts]
    items.append(["end", len(rows.commands), len(rows.texts)])
    for i in range(0, len(items), 1000):
        stdout.write("".join(json.dumps(item) + "\n" for item in items[i:i + 1000]).encode())
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(run_child(sys.stdin.buffer, sys.stdout.buffer))
