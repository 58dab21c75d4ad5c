"""The recording journal (issue 13): frames durable off the node before they are acknowledged, rebuilt or
followed from the database when the recording file is not on this machine.

Three parts, each over the :class:`broker.store.Store` journal methods (broker/store/journal.py):

* :class:`JournalSink` is the ``journal`` callable a :class:`sessions.recwriter.RecordingWriter` calls on its
  writer thread for each write (header, then each batch): one INSERT per call, retried until
  ``[recording] journal_timeout``, then :class:`JournalError` fails the recording (strict mode ends the session).
* :func:`rebuild_from_journal` writes the recording file back, byte for byte, from the journal: the
  recovery path after a node died (the cluster's survivor calls it, then seals what was acknowledged).
* :class:`JournalTail` is a file-like source for ``sessions.recording.read_frames(follow=True)``, so
  ``sessions watch`` and the web live view follow a session recorded on another node;
  :func:`live_source` picks the local file or the journal.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from broker.clock import utc_iso
from broker.errors import RecordingError, StorageError
from medcore.clock import Clock
from sessions.recformat import fsync_dir

__all__ = ["JournalError", "JournalSink", "JournalTail", "rebuild_from_journal", "live_source", "UNREACHABLE"]

UNREACHABLE = "the recording store is unreachable"
"""How the vendor and the audit row name a journal that stayed down (strict mode ends the session)."""

_FIRST_RETRY_S = 0.05
_MAX_RETRY_S = 1.0


class JournalError(RecordingError):
    """The journal could not commit a batch within ``journal_timeout``: the recording failed."""


class JournalSink:
    """``journal(seq, data)`` for one session's :class:`~sessions.recwriter.RecordingWriter`.

    Runs on the writer thread, with a store connection only that thread uses (``store``: SQLite's lock
    waits are per connection, and a write must not queue behind the store thread's work). Blocks until the
    row is committed; on an error it retries (50 ms, doubling to 1 s) until ``timeout`` seconds have passed
    since the first attempt, then raises :class:`JournalError`.

    :param store: a journal-only :class:`broker.store.Store` (see ``App.journal_store``)
    :param session_id: whose rows these are
    :param clock: UTC time for the rows' ``at``
    :param timeout: seconds a batch may wait for the journal (``[recording] journal_timeout``)
    """

    def __init__(self, store: Any, session_id: str, clock: Clock, timeout: float) -> None:
        self.store, self.session_id, self.clock, self.timeout = store, session_id, clock, timeout
        self.rows = self.bytes = 0

    def __call__(self, seq: int, data: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        delay = _FIRST_RETRY_S
        while True:
            try:
                self.store.append_journal(self.session_id, seq, utc_iso(self.clock.now()), data)
                self.rows += 1
                self.bytes += len(data)
                return
            except Exception as exc:  # noqa: BLE001 - whatever the database says, the batch is not durable
                left = deadline - time.monotonic()
                if left <= 0:
                    why = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                    err = JournalError(
                        f"{UNREACHABLE}: session {self.session_id}'s recording could not be journaled for "
                        f"{self.timeout:g}s ({why})",
                        "check the database ([store]) is up and writable; medbroker never runs a session it "
                        "cannot record")
                    err.__cause__ = exc
                    raise err from exc
                time.sleep(min(delay, left))
                delay = min(delay * 2, _MAX_RETRY_S)


def rebuild_from_journal(store: Any, session_id: str, dest: Path) -> int:
    """Write the session's recording to ``dest`` from its journal rows: header, then every journaled batch in
    seq order, exactly the bytes the node wrote (the journal holds whole frames, so the file ends at the last
    acknowledged batch, without an end frame: seal it with ``sessions.recording.seal_recording``).

    ``dest`` must not exist (a recording is never overwritten); it is written to a temporary name beside it,
    fsynced, then renamed, so a crash leaves either nothing or the whole file.

    :param store: the broker's :class:`broker.store.Store` (any backend)
    :returns: bytes written
    :raises StorageError: the journal has no rows for the session, its first row is not the header, or
        ``dest`` exists or cannot be written
    """
    dest = Path(dest)
    rows = store.read_journal(session_id, -1)
    if not rows:
        raise StorageError(f"the recording journal has no rows for session {session_id}",
                           "it was never journaled ([recording] journal = false) or was dropped after sealing; "
                           "look for the recording file or its archived copy")
    if rows[0][0] != 0:
        raise StorageError(f"the recording journal of session {session_id} does not start with the header "
                           f"(first row seq {rows[0][0]})", "keep the rows as evidence; run: medbroker audit verify")
    if dest.exists():
        raise StorageError(f"cannot rebuild {dest}: it exists", "recordings are never overwritten; move it aside")
    tmp = dest.with_name(f".{dest.name}.rebuild-{os.getpid()}")
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            while rows:
                for _, data in rows:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    written += len(data)
                rows = store.read_journal(session_id, rows[-1][0])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, dest)  # never replaces a file that appeared meanwhile
        os.unlink(tmp)
        fsync_dir(str(dest))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot rebuild {dest} from the journal: {exc.strerror or exc}",
                           "free space or fix the recordings directory, then retry") from exc
    return written


class JournalTail:
    """A read-only byte stream of a session's recording from its journal, for ``read_frames``.

    ``read(n)`` returns what the journal holds past what was returned so far (``b""``: nothing new yet; the
    reader polls), fetching a few rows at a time. ``writer_gone()`` is True once the session is no longer
    live, which ``read_frames(follow=True)`` takes as "no more data will come".

    :param store: the broker's store (read from this thread only; each call is a short query)
    :param session_id: the session to follow
    :param is_live: True while the session runs (asked when no new rows come)
    """

    def __init__(self, store: Any, session_id: str, is_live: Callable[[], bool]) -> None:
        self.store, self.session_id, self._is_live = store, session_id, is_live
        self._after = -1
        self._buf = bytearray()
        self.name = f"journal:{session_id}"

    def read(self, size: int = -1) -> bytes:
        if not self._buf:
            for seq, data in self.store.read_journal(self.session_id, self._after):
                self._buf += data
                self._after = seq
        n = len(self._buf) if size is None or size < 0 else size
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def writer_gone(self) -> bool:
        return not self._is_live()

    def close(self) -> None:
        self._buf.clear()

    def __enter__(self) -> "JournalTail":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def live_source(app: Any, row: dict[str, Any]) -> Path | JournalTail:
    """Where to follow a session from: its recording file when it is on this machine, else (recorded on
    another node) its journal.

    :param app: the broker home (``recordings``, ``store``)
    :param row: the session's row
    """
    key = row["recording"]
    if app.recordings.exists(key) or not app.store.has_journal(row["id"]):
        return app.recordings.local_path(key)
    store, sid = app.store, row["id"]

    def is_live() -> bool:
        current = store.get_session(sid)
        return current is not None and current["status"] == "live"

    return JournalTail(store, sid, is_live)

