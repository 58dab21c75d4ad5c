"""Copies of the files a vendor uploads, kept for malware forensics (``[recording] keep_uploads = true``).

Used by both upload paths: legacy scp (sessions/scp.py) and the SFTP filter (sessions/sftp.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["KeptFile", "KeptUploads"]

log = logging.getLogger("medbroker.scp")  # the logger these messages always had


class KeptUploads:
    """Copies of the files a vendor uploads, for malware forensics (``[recording] keep_uploads = true``).

    Each copy is written by one worker thread (off the event loop) to ``directory/.partial-N`` at the
    offsets the upload used, then named by the sha256 of its content, with ``<sha256>.json`` beside it
    naming the device path. One instance per channel; :meth:`close` lets queued writes finish.

    :param directory: e.g. ``$MEDBROKER_HOME/uploads/<session id>``; created 0700 on first use
    """

    def __init__(self, directory: Path, logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        """:param logger: where failed copies are logged (an adapter naming the session, sessions/sessionlog.py)"""
        self.directory = directory
        self._log = logger
        self._pool: ThreadPoolExecutor | None = None
        self._serial = itertools.count(1)

    def open(self, device_path: str) -> "KeptFile":
        """Start a copy of one uploaded file."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="medbroker-uploads")
        return KeptFile(self._pool, self.directory, device_path, next(self._serial), self._log)

    def close(self) -> None:
        """No more uploads on this channel; queued writes still finish."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class KeptFile:
    """One kept upload; see :class:`KeptUploads`. Errors are logged: a failed copy never stops the transfer."""

    def __init__(self, pool: ThreadPoolExecutor, directory: Path, device_path: str, serial: int,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        self._pool, self._dir, self._device_path, self._log = pool, directory, device_path, logger
        self._tmp = directory / f".partial-{os.getpid()}-{id(self):x}-{serial}"
        self._fd: int | None = None
        self._offset = 0

    def write(self, data: bytes, offset: int | None = None) -> None:
        """Copy ``data`` (at ``offset``; default: after the previous write)."""
        if offset is None:
            offset = self._offset
        self._offset = offset + len(data)
        self._pool.submit(self._pwrite, data, offset)

    def finish(self, sha256: str | None = None) -> str:
        """Seal the copy; returns where it will be: ``DIR/<sha256>`` (``sha256``: the stream's hash when the
        upload was sequential, which is the content's), else ``DIR`` (named by its content hash)."""
        self._pool.submit(self._seal)
        return str(self._dir / sha256) if sha256 else str(self._dir)

    def discard(self) -> None:
        """Drop the copy (nothing was uploaded, or the upload failed)."""
        self._pool.submit(self._drop)

    def _pwrite(self, data: bytes, offset: int) -> None:
        try:
            if self._fd is None:
                self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.pwrite(self._fd, data, offset)
        except OSError as exc:
            self._log.error("cannot keep a copy of the upload to %s: %s", self._device_path, exc)

    def _seal(self) -> None:
        if self._fd is None:
            return
        try:
            os.close(self._fd)
            self._fd = None
            digest = hashlib.sha256()
            with open(self._tmp, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            name = digest.hexdigest()
            os.replace(self._tmp, self._dir / name)
            meta = self._dir / f"{name}.json"
            meta.write_text(json.dumps({"device_path": self._device_path, "sha256": name}) + "\n")
            meta.chmod(0o600)
        except OSError as exc:
            self._log.error("cannot keep a copy of the upload to %s: %s", self._device_path, exc)

    def _drop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)
