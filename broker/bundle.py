"""The evidence bundle file: one uncompressed POSIX tar of named members, a manifest with the sha256 of each,
signed with the broker's key; written in one go, read by a reader that trusts nothing in it.

Why tar: one header per member, read front to back (a zip's two directories, local headers and the central
one, can disagree about names and sizes); any reviewer lists and unpacks it with ``tar`` and checks it with
``sha256sum`` and ``openssl`` (docs/ha.md); recordings are encrypted and do not compress, so no gzip.

The reader never extracts by the archive's names: it accepts only regular files whose names are on the list
of members a bundle can hold (:func:`check_member_name`), each at most once, within size limits, and copies
each one to a file it names itself in a private temporary directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.errors import BrokerError, StorageError

__all__ = ["VERSION", "AUDIT_COLUMNS", "PREFIX", "MANIFEST", "SIGNATURE", "PUBLIC_KEY", "README", "EVENTS",
           "CHECKPOINTS", "RECORDING_KEYS", "FORMAT", "BundleError", "BundleWriter", "BundleContents", "read_bundle", "check_member_name",
           "recording_member", "table_member", "public_pem", "write_readme", "MAX_METADATA", "MAX_MEMBERS"]

FORMAT = "medbroker-evidence"
VERSION = 1
AUDIT_COLUMNS = ("id", "at", "event", "actor", "user_name", "device", "session_id", "grant_id", "request_id",
                 "source", "details", "prev_hash", "hash")
PREFIX = "medbroker-evidence/"
MANIFEST = PREFIX + "manifest.json"
SIGNATURE = PREFIX + "manifest.sig"      # raw 64-byte ed25519 signature of manifest.json's exact bytes
PUBLIC_KEY = PREFIX + "signing-key.pem"  # the broker's public signing key (SubjectPublicKeyInfo PEM)
README = PREFIX + "README.txt"
EVENTS = PREFIX + "audit/events.jsonl"
CHECKPOINTS = PREFIX + "audit/checkpoints.json"
RECORDING_KEYS = PREFIX + "keys/recording-keys.json"
TABLES = ("sessions", "transfers", "forwards", "grants", "requests", "approvals")
MAX_METADATA = 256 << 20  # any member that is not a recording (JSON, PEM, text)
MAX_RECORDING = 64 << 30
MAX_MEMBERS = 100_000
_FIXED = {MANIFEST, SIGNATURE, PUBLIC_KEY, README, EVENTS, CHECKPOINTS, RECORDING_KEYS} | {
    f"{PREFIX}db/{t}.json" for t in TABLES}
_RECORDING = re.compile(r"recordings/([A-Za-z0-9][A-Za-z0-9._-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3})")


class BundleError(BrokerError):
    """The file is not a readable evidence bundle (names the member and the problem)."""


def recording_member(key: str) -> str:
    """The member name of a recording stored under ``key``."""
    return f"{PREFIX}recordings/{key}"


def table_member(table: str) -> str:
    """The member name of one table's rows (``sessions``, ``transfers``, ...)."""
    if table not in TABLES:
        raise ValueError(table)
    return f"{PREFIX}db/{table}.json"


def check_member_name(name: str) -> str:
    """``name`` if a bundle may hold a member by that name, else :class:`BundleError`.

    Allowed: the fixed names, and ``recordings/KEY`` where KEY is a relative name of plain parts ending in
    ``.mbr`` (no ``..``, no absolute path, no backslash, no control characters).
    """
    if name in _FIXED:
        return name
    rest = name[len(PREFIX):] if name.startswith(PREFIX) else None
    m = _RECORDING.fullmatch(rest or "")
    if m is None or not name.endswith(".mbr") or any(p in (".", "..") for p in PurePosixPath(m.group(1)).parts):
        raise BundleError(f"bundle member {name[:200]!r} is not a member an evidence bundle can hold",
                          "the file was altered or is not a medbroker evidence bundle")
    return name


# ---------------------------------------------------------------------------------------------------- writing
class BundleWriter:
    """Writes members to a temporary file beside ``path`` and hashes them as they go; :meth:`finish` adds the
    signed manifest and moves the file into place (complete or not at all, mode 0600)."""

    def __init__(self, path: Path, *, mtime: float | None = None) -> None:
        self.path = Path(path)
        self.members: dict[str, dict[str, Any]] = {}
        self.mtime = int(time.time() if mtime is None else mtime)
        directory = self.path.parent if str(self.path.parent) else Path(".")
        if not directory.is_dir():
            raise StorageError(f"cannot write {path}: no such directory {directory}", "choose a writable -o path")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, 0o600)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(check_member_name(name))
        info.size, info.mtime, info.mode, info.type = size, self.mtime, 0o600, tarfile.REGTYPE
        info.uname = info.gname = "medbroker"
        return info

    def add_bytes(self, name: str, data: bytes) -> None:
        self._tar.addfile(self._info(name, len(data)), io.BytesIO(data))
        self.members[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def add_json(self, name: str, value: Any) -> None:
        self.add_bytes(name, json.dumps(value, indent=1, ensure_ascii=False, sort_keys=True).encode() + b"\n")

    def add_file(self, name: str, source: BinaryIO) -> None:
        """Copy a seekable stream (a recording as stored), hashing what was copied."""
        source.seek(0, os.SEEK_END)
        size = source.tell()
        source.seek(0)
        digest = hashlib.sha256()

        class _Hashing:
            def read(self, n: int = -1) -> bytes:
                data = source.read(n)
                digest.update(data)
                return data

        self._tar.addfile(self._info(name, size), _Hashing())  # type: ignore[arg-type]  # tarfile only reads
        self.members[name] = {"sha256": digest.hexdigest(), "bytes": size}

    def finish(self, manifest: dict[str, Any], sign: Any, public_pem: bytes) -> dict[str, Any]:
        """Add the public key, the manifest (listing every member written so far) and its signature.

        :param sign: ``sign(bytes) -> bytes`` (raw ed25519 signature)
        :returns: the manifest as written
        """
        self.add_bytes(PUBLIC_KEY, public_pem)
        manifest = {**manifest, "members": dict(sorted(self.members.items()))}
        body = json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True).encode() + b"\n"
        self._tar.addfile(self._info(MANIFEST, len(body)), io.BytesIO(body))
        signature = sign(body)
        self._tar.addfile(self._info(SIGNATURE, len(signature)), io.BytesIO(signature))
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        return manifest

    def abort(self) -> None:
        try:
            self._tar.close()
            self._fh.close()
        except (OSError, tarfile.TarError):
            pass
        self._tmp.unlink(missing_ok=True)


def public_pem(public: Any) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of an ed25519 public key, as ``openssl pkeyutl -pubin`` reads it."""
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class BundleContents:
    """A bundle's members, copied into a private temporary directory (remove it with :meth:`close`).

    ``files`` maps member name → local copy; ``sha256`` and ``sizes`` what was read.
    """

    path: Path
    tmp: Path
    files: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def read(self, name: str, limit: int = MAX_METADATA) -> bytes | None:
        """A member's bytes, or None when the bundle has no such member."""
        local = self.files.get(name)
        if local is None:
            return None
        if self.sizes[name] > limit:
            raise BundleError(f"bundle member {name} is {self.sizes[name]} bytes, more than {limit} allowed")
        return local.read_bytes()

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "BundleContents":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _member_limit(name: str) -> int:
    return MAX_RECORDING if name.startswith(PREFIX + "recordings/") else MAX_METADATA


def read_bundle(path: Path, *, tmp_parent: str | None = None) -> BundleContents:
    """Copy the members of the bundle at ``path`` into a new private temporary directory.

    :raises BundleError: not an uncompressed tar, a member that is not a regular file, a name a bundle cannot
        hold, a name twice, a member larger than allowed or than what is left of the file, too many members,
        or not enough free space for the copies (each names the member)
    """
    path = Path(path)
    try:
        total = path.stat().st_size
        fh = open(path, "rb")
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}", "check the path") from None
    tmp = Path(tempfile.mkdtemp(prefix="medbroker-bundle-", dir=tmp_parent))
    contents = BundleContents(path, tmp)
    try:
        with fh:
            try:
                tar = tarfile.open(fileobj=fh, mode="r:")  # uncompressed only: no decompression bombs
            except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                raise BundleError(f"{path} is not an evidence bundle (not an uncompressed tar: {exc})",
                                  "medbroker evidence export writes them") from None
            with tar:
                _copy_members(tar, contents, total)
    except BaseException:
        contents.close()
        raise
    if not contents.files:
        contents.close()
        raise BundleError(f"{path} holds no members", "medbroker evidence export writes evidence bundles")
    return contents


def _copy_members(tar: tarfile.TarFile, contents: BundleContents, total: int) -> None:
    free = shutil.disk_usage(contents.tmp).free
    used = 0
    count = 0
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError) as exc:
            raise BundleError(f"bundle {contents.path} is damaged after {count} member(s): {exc}",
                              "the file was altered or cut short; ask for a new export") from None
        if member is None:
            return
        count += 1
        name = member.name
        if count > MAX_MEMBERS:
            raise BundleError(f"bundle {contents.path} has more than {MAX_MEMBERS} members")
        if not member.isreg() or member.issparse():
            kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk() else
                    "a directory" if member.isdir() else "a sparse file" if member.issparse() else "not a regular file")
            raise BundleError(f"bundle member {name[:200]!r} is {kind}; a bundle holds regular files only",
                              "the file was altered or is not a medbroker evidence bundle")
        check_member_name(name)
        if name in contents.files:
            raise BundleError(f"bundle member {name} appears twice", "the file was altered; ask for a new export")
        if member.size > _member_limit(name):
            raise BundleError(f"bundle member {name} is {member.size} bytes, more than {_member_limit(name)} "
                              "allowed for it")
        if member.offset_data + member.size > total:
            raise BundleError(f"bundle member {name} claims {member.size} bytes, but the file ends before that",
                              "the file was cut short; ask for a new export")
        used += member.size
        if used > free - (64 << 20):
            raise BundleError(f"not enough space in {contents.tmp.parent} to check bundle member {name}",
                              "free space there or set TMPDIR to a larger directory")
        local = contents.tmp / f"m{count:06d}"
        source = tar.extractfile(member)
        assert source is not None  # a regular file always has a stream
        digest = hashlib.sha256()
        copied = 0
        with open(local, "xb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                copied += len(chunk)
        if copied != member.size:
            raise BundleError(f"bundle member {name} is cut short ({copied} of {member.size} bytes)")
        contents.files[name] = local
        contents.sha256[name] = digest.hexdigest()
        contents.sizes[name] = copied


def write_readme(writer: BundleWriter, text: str) -> None:
    """Add README.txt (how to check the bundle by hand)."""
    writer.add_bytes(README, text.encode())
