"""The recording file format, shared by the writer (sessions/recwriter.py), the reader and sealer
(sessions/recording.py) and retention: magic and version, frame kinds, the frame layout, the hash chain and
encryption (key derivation, associated data), packing a frame, and the low-level write both writers use.

docs/recording-format.md describes the format; this module is its only definition in code.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "MAGIC", "VERSION", "KINDS", "KIND_NAMES", "DATA_KINDS", "MAX_PAYLOAD", "MAX_HEADER", "PRELUDE", "LEN", "FIXED",
    "FLAG_ENCRYPTED", "TAG", "END_CODE", "EPOCH", "MICROSECOND", "json_object", "dump_json", "derive_key",
    "RecordingKey", "recording_key", "frame_aad", "pack_frame", "write_all", "fsync_dir", "describe_error",
]

MAGIC = b"MEDBREC\x00"
VERSION = 1
# Kind codes are stored in files: add new ones at the end, never renumber.
KINDS: dict[str, int] = {name: code for code, name in enumerate((
    "input", "output", "stderr", "resize", "pty", "exec", "shell", "subsystem", "env", "signal", "break",
    "eof", "sftp-request", "sftp-reply-summary", "file-transfer", "policy-denial", "alert", "notice",
    "channel-open", "channel-close", "exit", "end",
    "containment", "forward-bytes"), start=1)}
KIND_NAMES: dict[int, str] = {code: name for name, code in KINDS.items()}
DATA_KINDS = frozenset({"input", "output", "stderr"})
MAX_PAYLOAD = 1 << 20  # larger data is split into several frames; larger events are refused
MAX_HEADER = 1 << 20
PRELUDE = struct.Struct(">8sHI")  # magic, version, header length
LEN = struct.Struct(">II")  # body length, body length XOR 0xFFFFFFFF (tells a torn tail from damage)
FIXED = struct.Struct(">QQqIBB")  # seq, mono_ns, wall_us, channel, kind, flags
FLAG_ENCRYPTED = 0x01
TAG = 16
END_CODE = KINDS["end"]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)


def json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def dump_json(value: dict[str, Any]) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:  # lone surrogates (e.g. surrogateescape'd paths): keep them as \u escapes
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


class RecordingKey(bytes):
    """One recording's own key (HKDF output: 32 bytes AES key ‖ 8 bytes key check), not a data key.

    A key lookup may answer with one (evidence bundles carry these instead of the broker's data keys): it opens
    that one recording and nothing else.
    """


def recording_key(key: bytes, salt: bytes, session_id: str) -> RecordingKey:
    """The per-recording key derived from a data key: HKDF-SHA256(key, salt, "medbroker recording v1" ‖ id)."""
    if isinstance(key, RecordingKey):
        return key
    return RecordingKey(HKDF(algorithm=hashes.SHA256(), length=40, salt=salt,
                             info=b"medbroker recording v1\x00" + session_id.encode()).derive(key))


def derive_key(key: bytes, salt: bytes, session_id: str) -> tuple[AESGCM, str]:
    """Per-recording AES key and a key check value, both from HKDF(key, salt, session id); ``key`` may be the
    :class:`RecordingKey` itself."""
    okm = recording_key(key, salt, session_id)
    if len(okm) != 40:
        raise ValueError("a recording key is 40 bytes")
    return AESGCM(okm[:32]), okm[32:].hex()


def frame_aad(session_id: str) -> bytes:
    return b"medbroker-rec-v1\x00" + session_id.encode() + b"\x00"


def pack_frame(prev: bytes, fixed: bytes, payload: bytes, out: list[bytes]) -> bytes:
    """Append the stored form of one frame to ``out``; returns its chain hash."""
    h = hashlib.sha256(prev)
    h.update(fixed)
    h.update(payload)
    digest = h.digest()
    size = len(fixed) + len(payload)
    out += (LEN.pack(size, size ^ 0xFFFFFFFF), fixed, payload, digest)
    return digest


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def describe_error(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)


def fsync_dir(path: str) -> None:
    # Make the new directory entry durable too; some filesystems refuse, which costs only durability.
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
