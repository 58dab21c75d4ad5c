"""Recordings on local disk first, then in the object store: the :class:`RecordingStore` when [archive] is on.

New recordings are written locally (:meth:`path_for_new`); ``broker/archive.py`` uploads sealed ones and may
remove the local copy. Readers do not notice: a recording that is only in the object store is downloaded to
a cache outside the recordings directory (``<home>/archive-cache``) when a reader needs a file
(:meth:`local_path`), checked against the SHA-256 the object carries, and reused while the object is unchanged.
Retention on an archived recording rewrites that file, uploads the replacement, reads it back and reports the
new checksum (``on_replaced``), so the database keeps naming what the store holds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator

from medcore.errors import StorageError
from sessions.objectstore import ObjectInfo, ObjectStore, sha256_file
from sessions.storage import SUFFIX, LocalRecordingStore, RecordingStore, check_key

__all__ = ["ArchivedRecordingStore"]


class ArchivedRecordingStore(RecordingStore):
    """A :class:`LocalRecordingStore` backed by an :class:`ObjectStore` for recordings no longer on disk."""

    def __init__(self, local: LocalRecordingStore, objects: ObjectStore, cache_dir: Path, *, part_size: int,
                 on_replaced: Callable[[str, str, int], None] | None = None) -> None:
        """
        :param cache_dir: where downloaded recordings are kept (outside ``local.root``)
        :param part_size: multipart part size for replacements
        :param on_replaced: ``(key, sha256, size)`` after an archived object was replaced and verified
        """
        self.local = local
        self.objects = objects
        self.cache_dir = Path(cache_dir)
        self.part_size = part_size
        self.on_replaced = on_replaced

    def __repr__(self) -> str:
        return f"ArchivedRecordingStore({self.local!r}, {self.objects!r})"

    # ------------------------------------------------------------------ keys
    def key_of(self, stored: str | os.PathLike[str]) -> str:
        return self.local.key_of(stored)

    # ------------------------------------------------------------------ reading
    def _cache_path(self, key: str) -> Path:
        return self.cache_dir.joinpath(*PurePosixPath(check_key(key)).parts)

    def local_path(self, stored: str | os.PathLike[str]) -> Path:
        """The local file when there is one (also a live recording being written); otherwise the object
        downloaded into the cache. A recording in neither place answers the local path (readers then report
        it missing).

        :raises StorageError: the download failed, or the object's bytes do not match its recorded SHA-256
        """
        path = self.local.local_path(stored)
        if path.is_file():
            return path
        key = self.key_of(stored)
        info = self.objects.head(key)
        if info is None:
            return path
        return self._cached(key, info)

    def _cached(self, key: str, info: ObjectInfo) -> Path:
        cache = self._cache_path(key)
        stamp = cache.with_name(cache.name + ".sha256")
        want = info.sha256
        if cache.is_file() and stamp.is_file() and want and stamp.read_text().strip() == want \
                and cache.stat().st_size == info.size:
            os.utime(cache)  # used now: prune_cache keeps it
            return cache
        sha, size = self.objects.download(key, cache)
        if want and sha != want:
            cache.unlink(missing_ok=True)
            raise StorageError(f"archived recording {key}: the object's SHA-256 is {sha}, but it was archived with "
                               f"{want}", "the object store altered it; restore it from a backup of the bucket, "
                                      "then run: medbroker audit verify")
        stamp.write_text(sha + "\n")
        return cache

    def prune_cache(self, older_than_s: float) -> int:
        """Remove downloads not used for ``older_than_s`` seconds (a reader holding one open keeps reading it);
        returns how many recordings went."""
        if not self.cache_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.cache_dir.rglob("*"):
            if path.is_file() and not path.name.endswith(".sha256") and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".sha256").unlink(missing_ok=True)
                removed += 1
        return removed

    def open_for_read(self, stored: str | os.PathLike[str]) -> BinaryIO:
        return open(self.local_path(stored), "rb")

    def exists(self, stored: str | os.PathLike[str]) -> bool:
        if self.local.exists(stored):
            return True
        return self.objects.head(self.key_of(stored)) is not None

    def size(self, stored: str | os.PathLike[str]) -> int:
        if self.local.exists(stored):
            return self.local.size(stored)
        info = self.objects.head(self.key_of(stored))
        if info is None:
            raise FileNotFoundError(f"recording {self.key_of(stored)} is neither on disk nor archived")
        return info.size

    def iter_keys(self) -> Iterator[str]:
        keys = set(self.local.iter_keys())
        keys.update(k for k in self.objects.keys() if k.endswith(SUFFIX) and not PurePosixPath(k).name.startswith("."))
        return iter(sorted(keys))

    # ------------------------------------------------------------------ writing
    def path_for_new(self, session_id: str) -> tuple[str, Path]:
        return self.local.path_for_new(session_id)

    def remove_payload(self, stored: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Redact where the recording is; when it is archived, upload the redacted file in its place, read it
        back, and report the new checksum through ``on_replaced``.

        :raises StorageError: the replacement could not be stored or did not read back identically (the
            local or cached file is redacted already; running retention again re-uploads it)
        """
        from sessions.retention import redact_recording

        key = self.key_of(stored)
        info = self.objects.head(key)
        path = self.local_path(stored)
        result = redact_recording(path, **kwargs)
        if info is None:  # an archive pass may have completed an upload meanwhile (it re-checks the file too)
            info = self.objects.head(key)
        if info is not None:
            self.replace_object(key, path)
        return result

    def rewritten(self, stored: str | os.PathLike[str]) -> None:
        """Upload the rewritten file when the archived object still holds something else."""
        key = self.key_of(stored)
        info = self.objects.head(key)
        path = self.local_path(stored)
        if info is not None and path.is_file() and info.sha256 != sha256_file(path)[0]:
            self.replace_object(key, path)

    def replace_object(self, key: str, path: Path) -> tuple[str, int]:
        """Upload ``path`` as the archived object ``key``, read it back, check it; ``on_replaced`` is told.

        :returns: ``(sha256, size)``
        """
        sha, size = sha256_file(path)
        self.objects.put_file(key, path, sha, self.part_size)
        back_sha, back_size = self.objects.read_back(key)
        if (back_sha, back_size) != (sha, size):
            raise StorageError(f"archived recording {key}: the replacement reads back as {back_sha} ({back_size} "
                               f"bytes), not {sha} ({size} bytes)", "run retention again; it re-uploads the file")
        if path.parent.is_relative_to(self.cache_dir):
            path.with_name(path.name + ".sha256").write_text(sha + "\n")
        if self.on_replaced is not None:
            self.on_replaced(key, sha, size)
        return sha, size
