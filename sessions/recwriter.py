"""Recording writer: frames queued on the event loop, then encrypted, chained and written in batches by one shared thread."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from collections import deque
from datetime import datetime
from typing import Any, Callable

from medcore.clock import Clock
from medcore.errors import RecordingError, UsageError
from sessions.recformat import (
    DATA_KINDS, END_CODE, FIXED, FLAG_ENCRYPTED, KINDS, MAGIC, MAX_HEADER, MAX_PAYLOAD, PRELUDE,
    VERSION, derive_key, describe_error, dump_json, frame_aad, fsync_dir, pack_frame, write_all,
)

__all__ = ["RecordingWriter", "FLUSH_INTERVAL", "BATCH_BYTES", "ACK_WINDOW", "writer_stats"]

FLUSH_INTERVAL = 0.02
"""Seconds a queued frame may wait for the writer thread (group commit): readers see it at most this late."""
BATCH_BYTES = 256 << 10
"""Queued payload of one recording that wakes the writer thread at once instead of at the next tick."""
ACK_WINDOW = 256 << 10
"""The acknowledgment rule (docs/recording-format.md): payload a session may have handed on (to the vendor or
the device) before the writer thread has written it. A writer built with ``window=ACK_WINDOW`` pauses its
session before the next unit could push its unwritten payload past this bound."""

COALESCE_BYTES = 256 << 10
COALESCE_NS = 5_000_000
"""Data appended to the same channel and stream within 5 ms of the previous frame's first bytes, while that frame
still waits for the writer, joins it, up to ``COALESCE_BYTES``: a bulk transfer's 32 KiB packets become frames of
up to 256 KiB, so the writer thread takes the GIL once per frame instead of eight times (docs/performance.md,
"Stop 16"). A frame's time is its first bytes' time, so replay timing stays within 5 ms; empty data never joins."""
_WRITE_BATCH = 1 << 20  # payload bytes per write() in the writer thread
_IOV_MAX = 1020  # stay under the kernel's 1024 iovecs (4 per frame)


def _writev_all(fd: int, parts: list[bytes]) -> None:
    """Write ``parts`` (at most IOV_MAX of them) without joining them first."""
    done = os.writev(fd, parts)
    total = sum(map(len, parts))
    if done < total:  # short write (signal, full pipe): finish the rest the slow way
        write_all(fd, b"".join(parts)[done:])


def _open_new(path: str) -> int:
    """Create ``path`` for appending and lock it; never reuses an existing regular file."""
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if stat.S_ISREG(os.stat(path).st_mode):
                raise RecordingError(f"recording {path} already exists",
                                     "recordings are never overwritten; use a new session id") from None
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)  # a device or pipe (tests)
    except OSError as exc:
        raise RecordingError(f"cannot create recording {path}: {describe_error(exc)}",
                             "check the recordings directory exists and is writable: medbroker check") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise RecordingError(f"recording {path} is already being written", "use a new session id") from exc
    return fd


def _report_callback_error(exc: Exception) -> None:
    threading.excepthook(threading.ExceptHookArgs((type(exc), exc, exc.__traceback__, threading.current_thread())))


class _Pool:
    """The one writer thread of this process and the lock every writer's queue lives under.

    Appending never wakes the thread for each frame: the thread writes everything queued every
    ``FLUSH_INTERVAL`` while there is work, at once when a recording has ``BATCH_BYTES`` queued, when one
    ends, or when someone drains. An idle thread sleeps until the next frame arrives. One thread for all
    sessions: 500 sessions are 500 queues, not 500 threads and 10,000 thread wake-ups a second.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)  # the writer thread waits here
        self.done = threading.Condition(self.lock)  # drain()/close() wait here (wait_done_locked)
        self.waiting = 0  # threads waiting on ``done``: a batch notifies only then (notify_all is ~0.6 µs of Python)
        self.ready: dict[int, RecordingWriter] = {}  # writers with queued frames, in arrival order
        self.urgent = False
        self.sleeping = True
        self.thread: threading.Thread | None = None
        self.stats = {"writes": 0, "seconds": 0.0, "max_seconds": 0.0}  # batch writes (``writer_stats``)

    def start_locked(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="medbroker-recording-writer", daemon=True)
            self.thread.start()

    def wait_done_locked(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """``done.wait_for`` for drain() and close(), counted so that writes notify only a waiter."""
        self.waiting += 1
        try:
            return self.done.wait_for(predicate, timeout)
        finally:
            self.waiting -= 1

    def notify_done_locked(self) -> None:
        if self.waiting:
            self.done.notify_all()

    def hurry_locked(self) -> None:
        """Make the thread write now (an end frame, a drain, a full batch)."""
        if not self.urgent:
            self.urgent = True
            self.sleeping = False
            self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.ready:
                    self.wake.wait(FLUSH_INTERVAL)  # one idle tick first: a busy session must not wake us per frame
                    if not self.ready:
                        self.sleeping = True
                        while not self.ready:
                            self.wake.wait()
                        if not self.urgent:
                            self.wake.wait(FLUSH_INTERVAL)  # the first frame after a pause: collect company
                elif not self.urgent:
                    self.wake.wait(FLUSH_INTERVAL)  # collect more frames: one write for many
                work = list(self.ready.values())
                self.ready.clear()
                self.urgent = False
                batches = []
                for w in work:
                    batches.append((w, w._queue))
                    w._queue = deque()
                    w._open = None
                    w._queued = 0
                    w._inflight = True
            for w, batch in batches:
                started = time.perf_counter()
                w._write_batch(batch)
                took = time.perf_counter() - started
                stats = self.stats  # read without the lock by writer_stats(): a torn read costs one sample
                stats["writes"] += 1
                stats["seconds"] += took
                if took > stats["max_seconds"]:
                    stats["max_seconds"] = took


_pool = _Pool()


def writer_stats(*, reset_max: bool = False) -> dict[str, float]:
    """Batch writes of this process's recording writer: how many, total seconds, the slowest one (since the
    last ``reset_max``); for ``/metrics``."""
    stats = dict(_pool.stats)
    if reset_max:
        _pool.stats["max_seconds"] = 0.0
    return stats


def _reset_after_fork() -> None:  # a forked child has no writer thread; its recordings start a new one
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_reset_after_fork)


class RecordingWriter:
    """Appends frames to one session's recording; the process's shared writer thread writes them in batches.

    ``append_data``/``append_event`` only stamp the frame and queue it (no disk I/O, no hashing, no thread
    wake-up in the common case), so they are safe and cheap on the event loop. Call them from one thread.
    The writer thread encrypts, chains and writes whole batches, every :data:`FLUSH_INTERVAL` while
    frames are queued (so ``sessions watch`` and a crash lose at most that window), at once when
    :data:`BATCH_BYTES` are queued, for the end frame and for :meth:`drain`. The constructor creates the
    file and writes the header synchronously, so a recording that cannot even start fails there (strict
    mode refuses the session before connecting).

    Flow control: ``pending_bytes`` is the payload queued but not yet written. When it reaches
    ``high_water``, ``paused`` turns True and ``on_pause()`` runs on the appending thread; the relay should
    stop reading from both sides. When the writer has brought it down to ``low_water``, ``paused`` turns
    False and ``on_resume()`` runs on the writer thread (use ``loop.call_soon_threadsafe``). Above
    ``max_pending`` the recording fails instead of growing memory without bound.

    Acknowledgment window: with ``window`` set (the broker uses :data:`ACK_WINDOW`), the marks follow the
    largest unit the caller appends in one call (``append_data``, or announced by :meth:`expect_unit`):
    ``paused`` turns True as soon as ``pending_bytes`` plus one such unit would exceed ``window``, and False
    when the backlog is down to half of ``window`` minus that unit. A caller that appends each unit before
    handing it on and stops handing on synchronously in ``on_pause`` therefore never has more than
    ``window`` bytes handed on but not yet written. Pausing also wakes the writer thread at once.

    Errors (disk full, EIO, a vanished volume) set ``failed`` to a :class:`RecordingError` whose
    ``__cause__`` is the ``OSError``, and call ``on_error(error)`` exactly once, from the writer thread
    (or from the thread whose append/close found it): wire it with ``loop.call_soon_threadsafe``.
    Appends after a failure or after close are dropped and counted in ``dropped_frames`` (they never
    raise, so late asyncssh callbacks and best-effort mode keep working); strict mode ends the session
    from ``on_error``.

    All recordings of a process share one writer thread, so a recordings volume that blocks writes
    stalls every recording (and, through the backlog, pauses every session) rather than one.

    Journal (issue 13): with ``journal`` set, every write is also handed to ``journal(seq, data)`` on the
    writer thread, after the local write and before the bytes count as written: ``data`` is exactly what was
    appended to the file, ``seq`` 0 for the header (and its hash) the constructor wrote, else the sequence
    number of the first frame in ``data``. So the file is the concatenation of the journaled pieces in seq
    order, and nothing is acknowledged (``pending_bytes`` drops, the window reopens) before the journal
    returned. The journal blocks as long as it needs (it owns its timeout) and raises to fail the recording;
    a :class:`RecordingError` it raises is the recording's ``failed`` as it is. The header goes out on the
    writer thread as soon as the writer exists, not on the caller's.

    :param path: the new file (must not exist)
    :param header: JSON object; needs a non-empty ``session_id``; ``encryption`` is reserved
    :param clock: monotonic offsets (``mono_ns``, from construction) and UTC wall time (``wall_us``)
    :param aead_key: 32-byte AES-256-GCM key, or None for a clear recording
    :param key_id: the key's id, stored in the header so readers can look it up (required with a key)
    :param fsync: fsync after every batch (close always fsyncs)
    :param on_error: ``on_error(RecordingError)``, called once, usually from the writer thread
    :param on_pause: called on the appending thread when ``pending_bytes`` reaches ``high_water``
    :param on_resume: called on the writer thread when it is back at ``low_water``
    :param high_water: backlog (payload bytes) that pauses; default 8 MiB
    :param low_water: backlog that resumes; default 2 MiB
    :param max_pending: backlog at which the recording fails; default 64 MiB
    :param window: acknowledgment window in bytes; replaces ``high_water``/``low_water`` (see above)
    :param journal: ``journal(seq, data)``, called on the writer thread for every write (see above)
    :raises RecordingError: bad header or key, file exists, cannot be created or written
    :raises UsageError: water marks out of order
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any], *, clock: Clock,
                 aead_key: bytes | None = None, key_id: str | None = None, fsync: bool = False,
                 on_error: Callable[[RecordingError], object] | None = None,
                 on_pause: Callable[[], object] | None = None, on_resume: Callable[[], object] | None = None,
                 high_water: int = 8 << 20, low_water: int = 2 << 20, max_pending: int = 64 << 20,
                 window: int | None = None, journal: Callable[[int, bytes], object] | None = None) -> None:
        self.path = os.fspath(path)
        if not isinstance(header, dict) or not isinstance(header.get("session_id"), str) \
                or not header["session_id"]:
            raise RecordingError("recording header needs a non-empty 'session_id' string")
        if "encryption" in header:
            raise RecordingError("recording header key 'encryption' is reserved for the writer")
        if not 0 <= low_water <= high_water <= max_pending:
            raise UsageError(f"need 0 <= low_water <= high_water <= max_pending; got "
                             f"{low_water}, {high_water}, {max_pending}")
        if window is not None and not 0 < window <= max_pending:
            raise UsageError(f"need 0 < window <= max_pending; got {window}, {max_pending}")
        full = dict(header)
        self._aead = None
        if aead_key is not None:
            if len(aead_key) != 32 or not key_id:
                raise RecordingError("recording encryption needs a 32-byte key and a key_id")
            salt = os.urandom(16)
            self._aead, check = derive_key(aead_key, salt, header["session_id"])
            full["encryption"] = {"alg": "AES-256-GCM", "kdf": "HKDF-SHA256", "key_id": key_id,
                                  "salt": salt.hex(), "key_check": check, "nonce": "seq"}
        elif key_id is not None:
            raise RecordingError("key_id given without aead_key")
        try:
            body = json.dumps(full, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise RecordingError(f"recording header is not JSON-serialisable: {exc}") from None
        if len(body) > MAX_HEADER:
            raise RecordingError(f"recording header is {len(body)} bytes; the limit is {MAX_HEADER}")
        head = PRELUDE.pack(MAGIC, VERSION, len(body)) + body
        self.header: dict[str, Any] = full
        self._aad = frame_aad(header["session_id"])
        self._last_hash = hashlib.sha256(head).digest()
        self._fd = _open_new(self.path)
        try:
            write_all(self._fd, head + self._last_hash)
            if fsync:
                os.fsync(self._fd)
        except OSError as exc:
            os.close(self._fd)
            if stat.S_ISREG(os.stat(self.path).st_mode):
                os.unlink(self.path)
            raise RecordingError(f"cannot write recording {self.path}: {describe_error(exc)}",
                                 "free space on the recordings volume, then retry") from exc
        self._clock, self._fsync = clock, fsync
        self._on_error, self._on_pause, self._on_resume = on_error, on_pause, on_resume
        self._high, self._low, self._max = high_water, low_water, max_pending
        self._window, self._unit, self._floor = window, 0, 0
        self._claims: dict[object, int] = {}
        self._batch = BATCH_BYTES if window is None else min(BATCH_BYTES, max(1, window // 2))
        self.failed_at: datetime | None = None  # wall time (clock.now()) the failure was found, for the audit row
        self._mono0 = clock.monotonic_ns()
        self.last_activity_mono_ns = self._mono0
        self.bytes_in = self.bytes_out = 0
        self._seq = self._pending = self._queued = self.dropped_frames = 0
        self._paused = self._stopping = self._closed = self._ended = self._inflight = False
        self._failed: RecordingError | None = None
        self._final: str | None = None
        self._queue: deque[tuple[int, int, int, int, int, bytes | list[bytes]]] = deque()
        self._open: list[bytes] | None = None  # the parts of the last queued data frame, while it may grow
        self._open_key = (0, 0)  # its (channel, kind code)
        self._open_size = self._open_mono = 0
        self._pool = _pool
        self._close_lock = threading.Lock()
        self._journal = journal
        self._journal_head: bytes | None = None
        if journal is not None:  # the header's journal row goes out on the writer thread, now
            self._journal_head = head + self._last_hash
            with self._pool.lock:
                self._pool.ready[id(self)] = self
                self._pool.hurry_locked()
                self._pool.start_locked()

    # -- state the relay and `sessions list` poll (plain attribute reads, no locks) --
    @property
    def pending_bytes(self) -> int:
        """Payload bytes queued but not yet written."""
        return self._pending

    @property
    def paused(self) -> bool:
        """True from crossing ``high_water`` until the backlog is back at ``low_water``."""
        return self._paused

    def _over_locked(self) -> bool:
        if self._window is None:
            return self._pending >= self._high
        return self._pending + self._unit > self._window

    def _under_locked(self) -> bool:
        if self._window is None:
            return self._pending <= self._low
        return self._pending <= max(0, self._window - self._unit) // 2

    def expect_unit(self, size: int, key: object = None) -> None:
        """Announce that single appends of up to ``size`` bytes will follow (an SFTP reply, an scp block).

        With a ``window``, the session pauses from now on early enough for such a unit to fit, including
        the first one; ``on_pause`` may run at once. Without a window this does nothing.

        Without ``key`` the announcement stands for the rest of the recording. With a ``key`` (an SFTP
        channel) it replaces that key's earlier one and may be smaller: the unit is the largest standing
        announcement or unannounced append, so a channel whose outstanding requests can only bring small
        replies (an upload's WRITE statuses) no longer holds the session in lock step. ``size`` 0 withdraws
        the key's announcement. Announcements above ``window`` count as ``window`` (a unit that cannot fit
        would pause the session for good); such a unit overshoots the bound by its excess.
        """
        pause = False
        with self._pool.lock:
            if self._window is None:
                return
            size = min(max(0, size), self._window)
            if key is None:
                self._floor = max(self._floor, size)
            elif size:
                self._claims[key] = size
            else:
                self._claims.pop(key, None)
            unit = max(self._floor, max(self._claims.values(), default=0))
            lower, self._unit = unit <= self._unit, unit
            if lower:  # a smaller unit only loosens the marks: the next write's resume check uses it
                return
            if not self._paused and self._failed is None and not self._stopping and self._over_locked():
                self._paused = pause = True
                self._pool.hurry_locked()
        if pause and self._on_pause is not None:
            self._on_pause()

    @property
    def failed(self) -> RecordingError | None:
        """The error that stopped the recording, or None."""
        return self._failed

    @property
    def frames(self) -> int:
        """Frames appended so far (the last sequence number)."""
        return self._seq

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    # -- hot path --
    def append_data(self, channel: int, kind: str, data: bytes) -> int:
        """Queue raw bytes of ``input``, ``output`` or ``stderr``; returns the last sequence number.

        Data over :data:`MAX_PAYLOAD` becomes several consecutive frames. Returns 0 when the frame was
        dropped because the recording failed or is closed (see ``failed``).

        :raises RecordingError: not a data kind, or a channel outside 0..2**32-1
        """
        if kind not in DATA_KINDS:
            raise RecordingError(f"{kind!r} is not a data kind ({', '.join(sorted(DATA_KINDS))}); "
                                 "use append_event")
        data = data if type(data) is bytes else bytes(data)
        code = KINDS[kind]
        if len(data) > self._unit:  # an unannounced unit: it stands from now on (the writer reads it under the lock)
            self._floor = self._unit = min(len(data), MAX_PAYLOAD)
        if len(data) <= MAX_PAYLOAD:
            return self._enqueue(channel, code, data)
        seq = 0
        for start in range(0, len(data), MAX_PAYLOAD):
            seq = self._enqueue(channel, code, data[start:start + MAX_PAYLOAD])
        return seq

    def append_event(self, channel: int, kind: str, event: dict[str, Any]) -> int:
        """Queue an event frame whose payload is ``event`` as compact UTF-8 JSON; returns its sequence number.

        Returns 0 when dropped because the recording failed or is closed.

        :raises RecordingError: unknown or data kind, ``end`` (use close), not a JSON object, too large,
            a channel outside 0..2**32-1
        """
        code = KINDS.get(kind)
        if code is None or kind in DATA_KINDS or code == END_CODE:
            raise RecordingError(f"{kind!r} is not an event kind", "event kinds: " + ", ".join(
                k for k in KINDS if k not in DATA_KINDS and k != "end"))
        if not isinstance(event, dict):
            raise RecordingError(f"{kind} event must be a dict, got {type(event).__name__}")
        try:
            payload = dump_json(event)
        except (TypeError, ValueError) as exc:
            raise RecordingError(f"{kind} event is not JSON-serialisable: {exc}") from None
        if len(payload) > MAX_PAYLOAD:
            raise RecordingError(f"{kind} event is {len(payload)} bytes; the limit is {MAX_PAYLOAD}")
        return self._enqueue(channel, code, payload)

    def _enqueue(self, channel: int, code: int, payload: bytes, *, end_reason: str | None = None) -> int:
        if not 0 <= channel <= 0xFFFFFFFF:
            raise RecordingError(f"channel {channel} is out of range 0..2**32-1")
        final = end_reason is not None
        pause = False
        pool = self._pool
        with pool.lock:
            if self._failed is not None or self._stopping:
                if not final:
                    self.dropped_frames += 1
                return 0
            if final:  # built under the lock so the counts match the frames before it
                payload = dump_json({"reason": end_reason, "frames": self._seq + 1, "bytes_in": self.bytes_in,
                                     "bytes_out": self.bytes_out})
            n = len(payload)
            if not final and self._pending + n > self._max:
                overflow = RecordingError(
                    f"recording {self.path}: backlog over {self._max} bytes (disk slower than the session)",
                    "the relay must pause reading while writer.paused is True")
            else:
                overflow = None
                mono = self._clock.monotonic_ns()
                parts = self._open
                if code <= 3 and parts is not None and self._open_key == (channel, code) and n \
                        and self._open_size + n <= COALESCE_BYTES and mono - self._open_mono <= COALESCE_NS:
                    parts.append(payload)  # joins the frame still queued (COALESCE_BYTES)
                    self._open_size += n
                    seq = self._seq
                elif code <= 3 and n:
                    self._seq = seq = self._seq + 1
                    self._open, self._open_key, self._open_size, self._open_mono = [payload], (channel, code), n, mono
                    self._queue.append((seq, mono - self._mono0, self._clock.wall_us(), channel, code, self._open))
                else:
                    self._seq = seq = self._seq + 1
                    self._open = None
                    self._queue.append((seq, mono - self._mono0, self._clock.wall_us(), channel, code, payload))
                self._pending += n
                self._queued += n
                if code == 1:
                    self.bytes_in += n
                elif code <= 3:
                    self.bytes_out += n
                if code <= 3:
                    self.last_activity_mono_ns = mono
                if not self._paused and self._over_locked():
                    self._paused = pause = True
                if final:  # atomically with the end frame: nothing may follow it
                    self._stopping = True
                pool.ready[id(self)] = self
                if final or self._paused or self._queued >= self._batch:  # paused: the session waits on us
                    pool.hurry_locked()
                elif pool.sleeping:
                    pool.sleeping = False
                    pool.wake.notify()
                pool.start_locked()
        if overflow is not None:
            self.dropped_frames += 1
            self._fail(overflow)
            return 0
        if pause and self._on_pause is not None:
            self._on_pause()
        return seq

    # -- writer thread --
    def _write_batch(self, batch: deque[tuple[int, int, int, int, int, bytes | list[bytes]]]) -> None:
        """Encrypt, chain and write one batch (writer thread; ``_inflight`` is set)."""
        prev, aead, aad = self._last_hash, self._aead, self._aad
        out: list[bytes] = []
        size = first = 0
        ended = False
        try:
            if self._failed is None and self._journal_head is not None and self._journal is not None:
                self._journal(0, self._journal_head)
                self._journal_head = None
            if self._failed is None:
                for seq, mono, wall, channel, code, parts in batch:
                    payload = b"".join(parts) if isinstance(parts, list) else parts  # one part: itself, no copy
                    if not out:
                        first = seq
                    size += len(payload)
                    flags = FLAG_ENCRYPTED if aead is not None and code != END_CODE else 0
                    fixed = FIXED.pack(seq, mono, wall, channel, code, flags)
                    if aead is not None and flags:  # flags is FLAG_ENCRYPTED only with a key
                        payload = aead.encrypt(seq.to_bytes(12, "big"), payload, aad + fixed)
                    prev = pack_frame(prev, fixed, payload, out)
                    ended = ended or code == END_CODE
                    if size >= _WRITE_BATCH or len(out) >= _IOV_MAX:  # write in steps: bounded latency for readers
                        self._flush(out, size, prev, first)
                        out, size = [], 0
                if out:
                    self._flush(out, size, prev, first)
        except Exception as exc:  # noqa: BLE001 - any write failure must surface, never die silently
            self._fail(exc)
        finally:
            with self._pool.lock:
                self._inflight = False
                self._ended = self._ended or ended
                self._pool.notify_done_locked()

    def _flush(self, parts: list[bytes], size: int, last_hash: bytes, first_seq: int) -> None:
        _writev_all(self._fd, parts)
        if self._fsync:
            os.fsync(self._fd)
        self._last_hash = last_hash
        if self._journal is not None:  # acknowledged only once it is durable off the node too
            self._journal(first_seq, b"".join(parts))
        with self._pool.lock:
            self._pending -= size
            resume = self._paused and self._under_locked()
            if resume:
                self._paused = False
            self._pool.notify_done_locked()
        if resume and self._on_resume is not None:
            try:
                self._on_resume()
            except Exception as exc:  # noqa: BLE001 - the caller's bug: report it, keep recording
                _report_callback_error(exc)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, RecordingError):
            err = exc
        else:
            err = RecordingError(f"recording {self.path}: write failed: {describe_error(exc)}",
                                 "free space or fix the recordings volume (medbroker check); "
                                 "the session could not be recorded")
            err.__cause__ = exc
        pool = self._pool
        with pool.lock:
            if self._failed is not None:
                return
            self._failed = err
            self.failed_at = self._clock.now()
            self._paused = False  # nothing is queued any more: best-effort sessions must not stay paused
            self._queue.clear()
            self._open = None
            pool.ready.pop(id(self), None)
            self._pending = self._queued = 0
            pool.notify_done_locked()
        if self._on_error is not None:
            try:
                self._on_error(err)
            except Exception as cb_exc:  # noqa: BLE001 - the caller's bug: report it
                _report_callback_error(cb_exc)

    # -- lifecycle --
    def drain(self, timeout: float | None = None) -> bool:
        """Block until everything queued is written (or the writer failed); False on timeout."""
        pool = self._pool
        with pool.lock:
            if self._queue:
                pool.hurry_locked()
            return pool.wait_done_locked(
                lambda: self._failed is not None or (self._pending == 0 and not self._queue and not self._inflight),
                timeout)

    def close(self, reason: str = "closed") -> str:
        """Append the ``end`` frame, drain, fsync, close; returns the final chain hash (hex). Idempotent.

        Blocks until the writer has finished: from async code use :meth:`aclose`.

        :raises RecordingError: the recording failed (the same error on every call)
        """
        pool = self._pool
        with self._close_lock:
            if not self._closed:
                try:
                    self._enqueue(0, END_CODE, b"", end_reason=str(reason))
                    with pool.lock:
                        self._stopping = True
                        pool.wait_done_locked(lambda: not self._inflight and (
                            self._failed is not None or (self._ended and not self._queue)))
                    if self._failed is None:
                        try:
                            os.fsync(self._fd)
                        except OSError as exc:
                            if exc.errno != errno.EINVAL:  # pipes and devices cannot fsync
                                self._fail(exc)
                finally:
                    self._closed = True
                    os.close(self._fd)
                if self._failed is None:
                    self._final = self._last_hash.hex()
                    fsync_dir(self.path)
            if self._failed is not None:
                raise self._failed
            assert self._final is not None
            return self._final

    async def aclose(self, reason: str = "closed") -> str:
        """:meth:`close` in a worker thread, for the event loop."""
        return await asyncio.to_thread(self.close, reason)
