"""Where recordings live: the ``RecordingStore`` interface and its local-directory implementation.

The database names a recording by a *key* relative to the storage root ("20261206-231919-b031da.mbr"), never
by where the bytes happen to be. Rows written before keys existed hold absolute paths; :meth:`key_of` turns
a path under the root into its key, so they keep working, and refuses anything that escapes the root.

Seams for the HA issue (13): an object-store implementation is a new subclass. Readers that take ranges or
stream use :meth:`open_for_read` (a seekable binary stream); readers that need a file on this machine (the
frame reader tails a live file; retention rewrites one) ask :meth:`local_path`, which an object store
answers with a cached download of the sealed object. New recordings are written on local disk at
:meth:`path_for_new` and :meth:`sealed` is called once the file is final (the local directory has nothing to
do; an object store uploads it there).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator

from medcore.errors import StorageError

__all__ = ["RecordingStore", "LocalRecordingStore", "SUFFIX"]

SUFFIX = ".mbr"


class RecordingStore(ABC):
    """Recordings by key. Keys are relative POSIX paths without ``.``/``..`` parts."""

    # ---------------------------------------------------------------- keys
    @abstractmethod
    def key_of(self, stored: str | os.PathLike[str]) -> str:
        """The key for what a sessions row holds: a key as it is, or a legacy absolute path under the root.

        :raises StorageError: empty, or it escapes the storage root
        """

    def key_for_new(self, session_id: str) -> str:
        """The key a new session's recording gets."""
        return check_key(f"{session_id}{SUFFIX}")

    # ---------------------------------------------------------------- reading
    @abstractmethod
    def open_for_read(self, stored: str | os.PathLike[str]) -> BinaryIO:
        """A seekable binary stream of the recording (read it in ranges with ``seek``/``read``).

        :raises StorageError: the key escapes the root
        :raises OSError: the recording does not exist or cannot be read (``FileNotFoundError`` when missing)
        """

    @abstractmethod
    def local_path(self, stored: str | os.PathLike[str]) -> Path:
        """A file on this machine holding the recording, for readers that need one (tailing, rewriting).

        :raises StorageError: the key escapes the root
        """

    @abstractmethod
    def exists(self, stored: str | os.PathLike[str]) -> bool:
        """Whether the recording is there (a key escaping the root raises, it is never just "missing")."""

    @abstractmethod
    def size(self, stored: str | os.PathLike[str]) -> int:
        """The recording's size in bytes. :raises OSError: missing"""

    @abstractmethod
    def iter_keys(self) -> Iterator[str]:
        """Every recording's key, sorted."""

    # ---------------------------------------------------------------- writing
    @abstractmethod
    def path_for_new(self, session_id: str) -> tuple[str, Path]:
        """``(key, local path)`` where a new session's recording is written; store the key in its row."""

    def sealed(self, stored: str | os.PathLike[str]) -> None:
        """The recording is final (closed or sealed); an object store uploads it here. Local: nothing to do."""

    def rewritten(self, stored: str | os.PathLike[str]) -> None:
        """The file at :meth:`local_path` was rewritten in place by an earlier, interrupted
        :meth:`remove_payload` (retention finishes it); an object store replaces its copy if it differs.
        Local: nothing to do."""

    @abstractmethod
    def remove_payload(self, stored: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Replace the recording by its retention-redacted form (``sessions.retention.redact_recording``
        arguments); the replacement is complete or absent, never a mix.

        :returns: a ``sessions.retention.RedactionResult``
        :raises RecordingError: see ``redact_recording``
        """


def check_key(key: str) -> str:
    """``key`` if it is a safe relative key, else :class:`StorageError`."""
    parts = PurePosixPath(key).parts
    if (not key or "\\" in key or "\x00" in key or key.startswith("/") or not parts
            or any(p in (".", "..") for p in parts) or key != str(PurePosixPath(*parts))):
        raise StorageError(f"recording key {key[:200]!r} is not a plain name inside the recordings directory",
                           "the sessions row was altered; run: medbroker audit verify")
    return key


class LocalRecordingStore(RecordingStore):
    """Recordings as files in one directory (``recording.dir``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))

    def __repr__(self) -> str:
        return f"LocalRecordingStore({str(self.root)!r})"

    def key_of(self, stored: str | os.PathLike[str]) -> str:
        text = os.fspath(stored)
        if not os.path.isabs(text):
            return check_key(text)
        path = os.path.normpath(text)
        for root in dict.fromkeys((str(self.root), os.path.realpath(self.root))):
            for candidate in dict.fromkeys((path, os.path.realpath(path))):
                if candidate.startswith(root.rstrip("/") + "/"):
                    return check_key(Path(candidate).relative_to(root).as_posix())
        raise StorageError(f"recording {text[:300]} is outside the recordings directory {self.root}",
                           "move it into recording.dir (after a restore: medbroker service restore rebases "
                           "the rows); then run: medbroker audit verify")

    def local_path(self, stored: str | os.PathLike[str]) -> Path:
        key = self.key_of(stored)
        path = self.root.joinpath(*PurePosixPath(key).parts)
        real_root = os.path.realpath(self.root)
        if not os.path.realpath(path).startswith(real_root.rstrip("/") + "/"):  # a symbolic link leading out
            raise StorageError(f"recording {key[:200]} leads outside the recordings directory {self.root}",
                               "a link in the recordings directory points elsewhere; run: medbroker audit verify")
        return path

    def open_for_read(self, stored: str | os.PathLike[str]) -> BinaryIO:
        return open(self.local_path(stored), "rb")

    def exists(self, stored: str | os.PathLike[str]) -> bool:
        return self.local_path(stored).is_file()

    def size(self, stored: str | os.PathLike[str]) -> int:
        return self.local_path(stored).stat().st_size

    def iter_keys(self) -> Iterator[str]:
        if not self.root.is_dir():
            return iter(())
        return iter(sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob(f"*{SUFFIX}")
                           if p.is_file() and not p.name.startswith(".")))

    def path_for_new(self, session_id: str) -> tuple[str, Path]:
        key = self.key_for_new(session_id)
        return key, self.local_path(key)

    def remove_payload(self, stored: str | os.PathLike[str], **kwargs: Any) -> Any:
        from sessions.retention import redact_recording  # the redacted format lives there

        return redact_recording(self.local_path(stored), **kwargs)
