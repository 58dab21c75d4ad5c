"""Patient-data policy: protected path prefixes, SFTP and exec decisions, content sniffing (pure, no SSH).

Layer 2: stdlib and medcore/errors.py only. The SFTP proxy (sessions/sftp.py) resolves every path
through the device's own realpath first and then asks :meth:`ProtectedPaths.decide_sftp`; the relay
asks ``sessions.exec_check.check_command_line`` before running an exec command and feeds shell/exec output
through :class:`OutputScanner`. Content sniffing lives in sessions/content.py and is re-exported here.
docs/data-protection.md describes what this protects and what it cannot.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from medcore.errors import ConfigError
from sessions.content import ASTM, DICOM, HEAD_BYTES, HL7, OutputScanner, detect_patient_data

__all__ = ["Decision", "ProtectedPaths", "normalize_path", "load_protected_paths",
           "SFTP_OPS", "MODES", "PFLAG_READ", "PFLAG_WRITE", "PFLAG_APPEND", "PFLAG_CREAT", "PFLAG_TRUNC",
           "PFLAG_EXCL", "HEAD_BYTES", "DICOM", "HL7", "ASTM", "detect_patient_data", "OutputScanner"]

MODES = ("normal", "read-only", "upload-only")

# SSH_FXF_* open flags (draft-ietf-secsh-filexfer-02 §6.3)
PFLAG_READ, PFLAG_WRITE, PFLAG_APPEND, PFLAG_CREAT, PFLAG_TRUNC, PFLAG_EXCL = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_PFLAGS_MODIFY = PFLAG_WRITE | PFLAG_APPEND | PFLAG_CREAT | PFLAG_TRUNC | PFLAG_EXCL

# Every SFTP operation the broker knows, by the names sessions/sftp_codec.py gives them.
_HANDLE_OPS = frozenset({"init", "close", "read", "write", "fstat", "fsetstat", "readdir", "fstatvfs", "fsync",
                         "limits", "users-groups-by-id", "home-directory"})
_PATH_OPS = frozenset({"open", "opendir", "stat", "lstat", "setstat", "remove", "mkdir", "rmdir", "realpath",
                       "rename", "readlink", "symlink", "posix-rename", "hardlink", "lsetstat", "statvfs",
                       "expand-path"})
SFTP_OPS = _HANDLE_OPS | _PATH_OPS | {"copy-data"}
_WRITE_OPS = {"write": "writing to", "fsetstat": "changing attributes of", "setstat": "changing attributes of",
              "lsetstat": "changing attributes of", "remove": "deleting", "mkdir": "creating",
              "rmdir": "removing", "rename": "renaming", "posix-rename": "renaming", "symlink": "linking",
              "hardlink": "linking"}
_MOVE_OPS = frozenset({"rename", "posix-rename", "hardlink", "symlink"})
_GLOB = frozenset("*?[")
_EXPORT_HINT = "Ask the hospital's biomedical engineer if you need a de-identified export."


@dataclass(frozen=True)
class Decision:
    """The answer to one request: allowed or not, a sentence for the person, the audit event name.

    ``event`` is ``sftp.denied`` / ``exec.denied`` for refusals (the audit catalogue names) and
    ``sftp.allowed`` / ``exec.allowed`` otherwise; ``op`` and ``path`` say what was judged.
    """

    allowed: bool
    reason: str
    event: str
    op: str = ""
    path: str = ""


def normalize_path(path: str, cwd: str = "/") -> str:
    """Normalise a POSIX path lexically: join to ``cwd`` if relative, drop ``.``, empty components and
    trailing slashes, apply ``..`` (never above ``/``). Idempotent.

    Lexical ``..`` is only right for paths without symlinks, i.e. paths the device already resolved.

    :param path: the path
    :param cwd: the absolute directory a relative ``path`` is relative to
    :return: an absolute path such as ``/data/dicom``
    """
    if not path.startswith("/"):
        path = cwd + "/" + path
    parts: list[str] = []
    for comp in path.split("/"):
        if comp == "..":
            if parts:
                parts.pop()
        elif comp and comp != ".":
            parts.append(comp)
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class ProtectedPaths:
    """The protected path prefixes of one device (its own plus the site defaults), frozen.

    A prefix protects itself and everything below it, component-wise: ``/data/dicom`` protects
    ``/data/dicom/x`` but not ``/data/dicomx``. Build with :meth:`build`.
    """

    device: str
    prefixes: tuple[str, ...]
    case_insensitive: bool = False

    @classmethod
    def build(cls, device: str, paths: Iterable[str], defaults: Iterable[str] = (), *,
              case_insensitive: bool = False) -> "ProtectedPaths":
        """Validate and normalise the device's protected paths plus the defaults.

        :param device: device name used in refusal messages
        :param paths: the device's own protected paths (``device add --protect``)
        :param defaults: the site-wide defaults (:func:`load_protected_paths`)
        :param case_insensitive: compare case-insensitively (Windows devices)
        :raises ConfigError: a path that is not absolute or contains control characters
        """
        out: dict[str, None] = {}
        for raw in [*defaults, *paths]:
            if not isinstance(raw, str) or not raw.startswith("/") or any(ord(c) < 0x20 for c in raw):
                raise ConfigError(f"protected path {raw!r} for {device} must be an absolute path",
                                  "e.g. /data/dicom")
            out[normalize_path(raw)] = None
        return cls(device, tuple(sorted(out, key=lambda p: (p.count("/"), p))), case_insensitive)

    def _key(self, path: str) -> str:
        return path.casefold() if self.case_insensitive else path

    def protecting(self, path: str) -> str | None:
        """The outermost protected prefix that covers ``path`` (normalised first), or None."""
        p = self._key(normalize_path(path))
        for prefix in self.prefixes:  # sorted by depth: the first hit is the outermost
            k = self._key(prefix)
            if p == k or p.startswith(k + "/") or k == "/":
                return prefix
        return None

    def is_protected(self, path: str) -> bool:
        """True if ``path`` is a protected prefix or lies below one.

        :param path: an absolute, device-resolved path (relative paths count from ``/``)
        """
        return self.protecting(path) is not None

    def revealed_by(self, path: str) -> str | None:
        """The protected prefix strictly below ``path`` (``path`` is its ancestor), or None."""
        p = self._key(normalize_path(path))
        for prefix in self.prefixes:
            k = self._key(prefix)
            if k != p and (p == "/" or k.startswith(p + "/")):
                return prefix
        return None

    def reveals(self, path: str) -> bool:
        """True if ``path`` is an ancestor of a protected tree: listing it is fine, but renaming,
        linking or recursively reading it would reach protected data."""
        return self.revealed_by(path) is not None

    def decide_sftp(self, op: str, paths: Iterable[str], *, mode: str = "normal", pflags: int = 0) -> Decision:
        """Decide one SFTP request whose paths the device already resolved (realpath).

        Refused: ``copy-data`` always (the bytes would not cross the broker); unknown operations;
        any path at or below a protected prefix, for every operation; renaming, linking or
        symlinking an ancestor of a protected tree (it would move the tree); in ``read-only`` mode
        anything that writes (OPEN with write/create/truncate/append flags, SETSTAT, REMOVE, MKDIR,
        RMDIR, RENAME, SYMLINK, links, WRITE); in ``upload-only`` mode anything that reads file
        content (OPEN with the read flag, READ).

        :param op: operation name as in :data:`SFTP_OPS` (``open``, ``posix-rename``, ...)
        :param paths: every path the request names, resolved on the device (both for renames/links)
        :param mode: the grant's mode, one of :data:`MODES`
        :param pflags: the OPEN request's SSH_FXF_* flags
        :return: a :class:`Decision`; ``event`` is ``sftp.denied`` when refused
        """
        paths = list(paths)
        first = paths[0] if paths else ""
        if op == "copy-data":
            return self._deny(op, first, f"server-side copy (copy-data) is refused on {self.device}: the bytes "
                              "would not pass medbroker's patient-data check or the recording. Download and "
                              "upload the file instead.")
        if op not in SFTP_OPS:
            return self._deny(op, first, f"the SFTP operation {op!r} is not supported through medbroker")
        if mode not in MODES:
            return self._deny(op, first, f"unknown grant mode {mode!r}; medbroker refuses the request")
        for path in paths:
            if "\0" in path:
                return self._deny(op, path, f"the path {path!r} contains a NUL byte; medbroker refuses it")
            root = self.protecting(path)
            if root is not None:
                return self._deny(op, path, self.protected_reason(path, root))
            below = self.revealed_by(path) if op in _MOVE_OPS else None
            if below is not None:
                return self._deny(op, path, f"{normalize_path(path)} contains the protected patient-data "
                                  f"directory {below} on {self.device}; medbroker refuses to rename or link it. "
                                  f"{_EXPORT_HINT}")
        where = f" ({normalize_path(first)})" if first else ""
        if mode == "read-only" and (op in _WRITE_OPS or (op == "open" and pflags & _PFLAGS_MODIFY)):
            what = _WRITE_OPS.get(op, "writing to")
            return self._deny(op, first, f"this grant is read-only: medbroker refuses {what} files on "
                              f"{self.device}{where}. Ask for a grant with write access if the work needs it.")
        if mode == "upload-only" and (op == "read" or (op == "open" and pflags & PFLAG_READ)):
            return self._deny(op, first, f"this grant is upload-only: medbroker refuses downloads from "
                              f"{self.device}{where}. Ask for a normal grant if you need to fetch files.")
        return Decision(True, "", "sftp.allowed", op, normalize_path(first) if first else "")

    def protected_reason(self, path: str, root: str | None = None) -> str:
        """The sentence shown when ``path`` is refused because it is protected."""
        root = root or self.protecting(path) or path
        norm = normalize_path(path)
        what = (f"{root} is a protected patient-data directory" if self._key(norm) == self._key(root) else
                f"{norm} is inside {root}, a protected patient-data directory")
        return f"{what} on {self.device}; medbroker refuses reads, writes and renames there. {_EXPORT_HINT}"

    def content_reason(self, path: str, kind: str) -> str:
        """The sentence shown when a file's content was recognised as patient data."""
        return (f"{normalize_path(path)} on {self.device} contains {kind} patient data; medbroker refuses to "
                f"transfer it. {_EXPORT_HINT}")

    def _deny(self, op: str, path: str, reason: str) -> Decision:
        return Decision(False, reason, "sftp.denied", op, normalize_path(path) if path else "")


def load_protected_paths(path: str | Path) -> list[str]:
    """Load the site's default protected paths (config/protected-paths.toml).

    The file has exactly one table, ``[protected]``, with one key, ``paths``: a list of absolute
    directory paths. Unknown keys, relative paths, glob patterns and ``/`` are errors.

    :param path: the TOML file
    :return: the normalised paths, duplicates removed, in file order
    :raises ConfigError: the file is missing, unreadable, not TOML, or breaks the rules above
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: protected-paths file not found",
                          "set policy.protected_paths_file in broker.toml or restore the shipped file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the protected-paths file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"protected", "ports"})  # [ports]: broker/forwards.py
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}", "the file holds one table: [protected] paths = [...]")
    table = data.get("protected")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: missing [protected] table", 'add: [protected]\npaths = ["/data/dicom"]')
    unknown = sorted(set(table) - {"paths"})
    if unknown:
        raise ConfigError(f"{path}: unknown key protected.{unknown[0]}", "the [protected] table has one key: paths")
    entries = table.get("paths")
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: protected.paths must be a list of absolute paths", 'e.g. paths = ["/data/dicom"]')
    out: dict[str, None] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: protected.paths[{i}] = {entry!r}"
        if not isinstance(entry, str):
            raise ConfigError(f"{where} is not a string", 'write it in quotes, e.g. "/data/dicom"')
        if not entry.startswith("/"):
            raise ConfigError(f"{where} is relative; protected paths must be absolute", "e.g. /data/dicom")
        if any(ord(c) < 0x20 for c in entry):
            raise ConfigError(f"{where} contains a control character")
        if _GLOB & set(entry):
            raise ConfigError(f"{where} is a glob pattern; list the directory itself", "e.g. /var/lib/orthanc")
        norm = normalize_path(entry)
        if norm == "/":
            raise ConfigError(f"{where} would protect every file", "list the patient-data directories themselves")
        out[norm] = None
    return list(out)

