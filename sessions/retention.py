"""Retention: replace a recording's terminal data by a signed, still-verifiable redacted file (docs/retention.md)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medcore.clock import utc_iso
from medcore.errors import RecordingError
from sessions import recording as rec
from sessions.recformat import fsync_dir
from sessions.recording import DATA_KINDS, KIND_NAMES, KINDS, MAGIC, VERSION, Frame, VerifyResult

__all__ = ["REDACTED_MAGIC", "RedactionResult", "is_redacted", "redact_recording", "verify_redacted", "verify_any",
           "read_redaction_info", "read_any_header", "open_frames"]

REDACTED_MAGIC = b"MEDBRED\x00"
REDACTED_VERSION = 1
_PRELUDE = struct.Struct(">8sHI")   # magic, version, length of the next part
_LEN = struct.Struct(">II")        # original frames: body length, body length XOR 0xFFFFFFFF
_FIXED = struct.Struct(">QQqIBB")  # seq, mono_ns, wall_us, channel, kind, flags
_U32 = struct.Struct(">I")
# A run of removed data frames: frames, first/last seq, first/last mono_ns, first/last wall_us,
# input/output/stderr bytes, sha256 over the removed frames' stored bodies, the last frame's stored hash.
_RUN = struct.Struct(">IQQQQqqQQQ32s32s")
_KEPT, _REMOVED, _TRAILER = 1, 2, 0xFF
_SIG_CONTEXT = b"medbroker redacted recording v1\x00"
_MAX_INFO = 1 << 20
_MAX_HEAD = (1 << 20) + 64
_MAX_BODY = _FIXED.size + rec.MAX_PAYLOAD + 16
_END = KINDS["end"]
_DATA_CODES = frozenset(KINDS[k] for k in DATA_KINDS)


@dataclass(frozen=True)
class RedactionResult:
    """What :func:`redact_recording` did."""

    frames: int
    removed_frames: int
    removed_bytes: int
    original_bytes: int
    original_sha256: str
    redacted_bytes: int
    redacted_sha256: str
    final_hash: str


class _Damaged(Exception):
    """The file cannot be parsed past this point."""


def _read_exact(fh: BinaryIO, n: int, digest: Any | None = None) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Damaged(f"file ends early ({len(data)} of {n} bytes at byte {fh.tell() - len(data)})")
    if digest is not None:
        digest.update(data)
    return data


def is_redacted(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a redacted recording (its payload was removed by retention)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(REDACTED_MAGIC)) == REDACTED_MAGIC
    except OSError:
        return False


def _open(path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise RecordingError(f"cannot open recording {os.fspath(path)}: {exc.strerror or exc}",
                             "check the session id and the recordings directory") from exc


def _parse_original_head(head: bytes) -> tuple[dict[str, Any] | None, bytes, list[str]]:
    """(header, h0, problems) of an original prelude ‖ header ‖ h0 block."""
    if len(head) < _PRELUDE.size + 32:
        return None, b"", ["header is incomplete"]
    magic, version, size = _PRELUDE.unpack_from(head)
    if magic != MAGIC or version != VERSION or _PRELUDE.size + size + 32 != len(head):
        return None, b"", ["header: not a medbroker recording header"]
    body, h0 = head[:_PRELUDE.size + size], head[_PRELUDE.size + size:]
    problems = [] if hashlib.sha256(body).digest() == h0 else ["header: hash mismatch (the header was modified)"]
    try:
        header = json.loads(head[_PRELUDE.size:_PRELUDE.size + size])
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("session_id"), str):
        return None, h0, problems + ["header: not a valid JSON object with a session_id"]
    return header, h0, problems


# ----------------------------------------------------------------------------- writing
def _redact_stream(src: BinaryIO, out: BinaryIO, info: dict[str, Any]) -> tuple[int, int, int, str]:
    """Copy ``src`` (a verified original) to ``out`` in redacted form; returns (frames, removed, bytes, final)."""
    prelude = _read_exact(src, _PRELUDE.size)
    size = _PRELUDE.unpack(prelude)[2]
    head = prelude + _read_exact(src, size + 32)
    info_bytes = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    out.write(_PRELUDE.pack(REDACTED_MAGIC, REDACTED_VERSION, len(info_bytes)) + info_bytes)
    out.write(_U32.pack(len(head)) + head)
    frames = removed = removed_bytes = 0
    run: dict[str, Any] | None = None
    final = ""

    def flush_run() -> None:
        nonlocal run
        if run is not None:
            out.write(bytes([_REMOVED]) + _RUN.pack(
                run["frames"], run["first_seq"], run["last_seq"], run["first_mono"], run["last_mono"],
                run["first_wall"], run["last_wall"], run["bytes"][1], run["bytes"][2], run["bytes"][3],
                run["digest"].digest(), run["last_hash"]))
            run = None

    while True:
        word = src.read(_LEN.size)
        if not word:
            break
        if len(word) != _LEN.size:
            raise _Damaged("torn frame length")
        length, guard = _LEN.unpack(word)
        if guard != length ^ 0xFFFFFFFF or not _FIXED.size <= length <= _MAX_BODY:
            raise _Damaged(f"frame {frames + 1}: corrupt length field")
        body = _read_exact(src, length)
        stored = _read_exact(src, 32)
        fixed, payload = body[:_FIXED.size], body[_FIXED.size:]
        seq, mono, wall, _channel, code, _flags = _FIXED.unpack(fixed)
        frames += 1
        if code in _DATA_CODES:
            if run is None:
                run = {"frames": 0, "first_seq": seq, "first_mono": mono, "first_wall": wall,
                       "bytes": {1: 0, 2: 0, 3: 0}, "digest": hashlib.sha256()}
            run["frames"] += 1
            run["last_seq"], run["last_mono"], run["last_wall"], run["last_hash"] = seq, mono, wall, stored
            run["bytes"][code] += len(payload)
            run["digest"].update(body)
            removed += 1
            removed_bytes += len(payload)
            continue
        flush_run()
        out.write(bytes([_KEPT]) + fixed + _U32.pack(len(payload)) + payload + stored)
        final = stored.hex()
        if code == _END:
            break
    flush_run()
    return frames, removed, removed_bytes, final


def redact_recording(path: str | os.PathLike[str], *, private_key: Ed25519PrivateKey, removed_at: datetime,
                     policy_days: int, expected_final_hash: str, signature: str) -> RedactionResult:
    """Replace a closed recording by its redacted form: terminal data (input, output, stderr) removed, every
    event frame, the header, the chain hashes and the final hash kept, and the whole file signed.

    The original must verify completely (chain, end frame, database hash, signature) first; a damaged or
    unclosed recording is evidence and is left unchanged. The new file is written beside the original,
    verified, then renamed over it (a crash leaves one or the other, never a mix).

    :raises RecordingError: unreadable, still being written, not verifying, already redacted, or a write failed
    """
    name = os.fspath(path)
    if is_redacted(path):
        raise RecordingError(f"{name}: the payload was already removed", "nothing to do")
    public = private_key.public_key()
    check = rec.verify_recording(path, expected_final_hash=expected_final_hash, signature=signature,
                                 public_key=public)
    if not check.ok or check.incomplete:
        why = check.problems[0] if check.problems else "the recording has no end frame"
        raise RecordingError(f"refusing to remove the payload of {name}: {why}",
                             "a damaged or unclosed recording is evidence: it stays unchanged; "
                             "run: medbroker audit verify")
    original = hashlib.sha256()
    with _open(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            original.update(chunk)
        original_bytes = fh.tell()
    info = {"format": "medbroker-redacted-recording", "reason": "retention", "removed_at": utc_iso(removed_at),
            "policy_days": policy_days, "original_bytes": original_bytes, "original_sha256": original.hexdigest(),
            "removed_kinds": sorted(DATA_KINDS)}
    directory = os.path.dirname(os.path.abspath(name))
    fd, tmp = tempfile.mkstemp(prefix=".redact-", suffix=".mbr", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as out, _open(path) as src:
            frames, removed, removed_bytes, final = _redact_stream(src, out, info)
            out.flush()
            out.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: out.read(1 << 20), b""):
                digest.update(chunk)
            sig = private_key.sign(_SIG_CONTEXT + digest.digest())
            out.write(bytes([_TRAILER]) + sig)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        result = verify_redacted(tmp, expected_final_hash=expected_final_hash, signature=signature, public_key=public)
        if not result.ok or final != check.final_hash:
            raise RecordingError(f"the redacted copy of {name} does not verify: {'; '.join(result.problems)}",
                                 "the original was left unchanged; report this as a medbroker bug")
        with open(tmp, "rb") as fh:
            redacted = hashlib.sha256(fh.read()).hexdigest()
        os.replace(tmp, name)
    except _Damaged as exc:
        os.unlink(tmp)
        raise RecordingError(f"{name}: {exc}", "the original was left unchanged") from None
    except OSError as exc:
        os.unlink(tmp)
        raise RecordingError(f"cannot write the redacted copy of {name}: {exc.strerror or exc}",
                             "free disk space in the recordings directory and retry") from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(name)
    return RedactionResult(frames=frames, removed_frames=removed, removed_bytes=removed_bytes,
                           original_bytes=original_bytes, original_sha256=original.hexdigest(),
                           redacted_bytes=os.path.getsize(name), redacted_sha256=redacted, final_hash=final)


# ----------------------------------------------------------------------------- reading and verifying
@dataclass
class _Parsed:
    info: dict[str, Any] | None = None
    header: dict[str, Any] | None = None
    frames: int = 0
    removed_frames: int = 0
    removed_bytes: int = 0
    final_hash: str = ""
    ended: bool = False
    end_reason: str | None = None
    signature: bytes | None = None
    signed_digest: bytes = b""


def _walk(fh: BinaryIO, on_kept: Callable[[tuple, bytes, bytes], None] | None, problems: list[str]) -> _Parsed:
    """Parse and check a redacted file, calling ``on_kept((fields), payload, stored)`` for each kept frame."""
    p = _Parsed()
    digest = hashlib.sha256()
    try:
        magic, version, size = _PRELUDE.unpack(_read_exact(fh, _PRELUDE.size, digest))
        if magic != REDACTED_MAGIC:
            raise _Damaged("not a redacted medbroker recording (bad magic)")
        if version != REDACTED_VERSION:
            raise _Damaged(f"unsupported redacted recording version {version}")
        if size > _MAX_INFO:
            raise _Damaged("redaction info: corrupt length field")
        info = json.loads(_read_exact(fh, size, digest) or b"null")
        if not isinstance(info, dict) or not isinstance(info.get("removed_at"), str):
            raise _Damaged("redaction info is not a JSON object with removed_at")
        p.info = info
        head_len = _U32.unpack(_read_exact(fh, _U32.size, digest))[0]
        if head_len > _MAX_HEAD:
            raise _Damaged("header: corrupt length field")
        p.header, prev, head_problems = _parse_original_head(_read_exact(fh, head_len, digest))
        problems += head_problems
        expected, last_mono = 1, 0
        while True:
            tag = fh.read(1)
            if not tag:
                raise _Damaged("the redaction signature is missing (file truncated)")
            if tag[0] == _TRAILER:
                p.signed_digest = digest.digest()
                p.signature = _read_exact(fh, 64)
                if fh.read(1):
                    problems.append("data after the redaction signature")
                break
            digest.update(tag)
            if p.ended:
                raise _Damaged(f"record after the end frame at byte {fh.tell() - 1}")
            if tag[0] == _KEPT:
                fixed = _read_exact(fh, _FIXED.size, digest)
                n = _U32.unpack(_read_exact(fh, _U32.size, digest))[0]
                if n > _MAX_BODY:
                    raise _Damaged(f"frame {p.frames + 1}: corrupt length field")
                payload = _read_exact(fh, n, digest)
                stored = _read_exact(fh, 32, digest)
                fields = _FIXED.unpack(fixed)
                seq, mono, _wall, _channel, code, flags = fields
                p.frames += 1
                if hashlib.sha256(prev + fixed + payload).digest() != stored:
                    problems.append(f"frame {seq}: hash mismatch")
                if seq != expected:
                    problems.append(f"frame {seq}: sequence gap (expected {expected})")
                if mono < last_mono:
                    problems.append(f"frame {seq}: monotonic time goes backwards")
                if code not in KIND_NAMES:
                    problems.append(f"frame {seq}: unknown kind code {code}")
                if flags & ~0x01:
                    problems.append(f"frame {seq}: unknown flags 0x{flags:02x}")
                expected, last_mono, prev = seq + 1, max(last_mono, mono), stored
                if code == _END:
                    p.ended = True
                    try:
                        p.end_reason = str(json.loads(payload).get("reason"))
                    except (ValueError, AttributeError, UnicodeDecodeError):
                        p.end_reason = None
                if on_kept is not None:
                    on_kept(fields, payload, stored)
            elif tag[0] == _REMOVED:
                (count, first, last, first_mono, last_mono_run, _fw, _lw, b_in, b_out, b_err, _d, last_hash
                 ) = _RUN.unpack(_read_exact(fh, _RUN.size, digest))
                if count < 1 or last - first + 1 != count:
                    problems.append(f"removed frames {first}-{last}: count {count} does not match")
                if first != expected:
                    problems.append(f"frame {first}: sequence gap (expected {expected})")
                if first_mono < last_mono or last_mono_run < first_mono:
                    problems.append(f"removed frames {first}-{last}: monotonic time goes backwards")
                p.frames += count
                p.removed_frames += count
                p.removed_bytes += b_in + b_out + b_err
                expected, last_mono, prev = last + 1, max(last_mono, last_mono_run), last_hash
            else:
                raise _Damaged(f"unknown record tag {tag[0]} at byte {fh.tell() - 1}")
        p.final_hash = prev.hex()
    except _Damaged as exc:
        problems.append(str(exc))
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        problems.append(f"damaged redacted recording: {exc}")
    return p


def read_redaction_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The redaction info (``removed_at``, ``policy_days``, ``original_sha256``…) of a redacted recording.

    :raises RecordingError: unreadable or not a redacted recording
    """
    with _open(path) as fh:
        try:
            _magic, _version, size = _PRELUDE.unpack(_read_exact(fh, _PRELUDE.size))
            if _magic != REDACTED_MAGIC or size > _MAX_INFO:
                raise _Damaged("not a redacted recording")
            info = json.loads(_read_exact(fh, size))
        except (_Damaged, ValueError, UnicodeDecodeError) as exc:
            raise RecordingError(f"{os.fspath(path)}: {exc}", "run: medbroker audit verify") from None
    if not isinstance(info, dict):
        raise RecordingError(f"{os.fspath(path)}: redaction info is not a JSON object", "run: medbroker audit verify")
    return info


def verify_redacted(path: str | os.PathLike[str], *, expected_final_hash: str | None = None,
                    signature: str | None = None, public_key: Ed25519PublicKey | None = None,
                    key_lookup: Callable[[str], bytes] | None = None) -> VerifyResult:
    """Verify a redacted recording: header hash, the chain through every kept frame, sequence and time order
    across removed runs, the final hash and its signature, and the broker's signature over the whole file.

    Removed payloads cannot be checked any more; that is reported as a note ("payload removed by retention
    on DATE …"), not a problem. ``key_lookup`` is accepted for symmetry and not needed.

    :raises RecordingError: the file cannot be opened
    """
    problems: list[str] = []
    notes: list[str] = []
    with _open(path) as fh:
        p = _walk(fh, None, problems)
    if p.info is not None and p.signature is not None:
        if public_key is None:
            notes.append("redaction signature not checked (no public key given)")
        else:
            try:
                public_key.verify(p.signature, _SIG_CONTEXT + p.signed_digest)
            except InvalidSignature:
                problems.append("redaction signature invalid (the redacted file was changed)")
    if p.info is not None and not p.ended and not any("truncated" in x for x in problems):
        problems.append("no end frame in the redacted recording")
    if expected_final_hash is not None and expected_final_hash.lower() != p.final_hash:
        problems.append("final hash differs from the one stored in the database")
    if signature is not None and public_key is not None \
            and not rec.verify_final_hash_signature(public_key, p.final_hash, signature):
        problems.append("signature invalid")
    if p.info is not None:
        notes.insert(0, f"payload removed by retention on {str(p.info['removed_at'])[:10]}: {p.removed_frames} of "
                        f"{p.frames} frames ({p.removed_bytes} bytes of terminal data); their content can no longer "
                        "be checked, their place in the chain is covered by the broker's redaction signature")
    return VerifyResult(ok=not problems, frames=p.frames, final_hash=p.final_hash, incomplete=False,
                        problems=tuple(problems[:50]), notes=tuple(notes), end_reason=p.end_reason,
                        encrypted=bool(p.header and "encryption" in p.header))


def verify_any(path: str | os.PathLike[str], **kwargs: Any) -> VerifyResult:
    """:func:`verify_redacted` for a redacted recording, else ``sessions.recording.verify_recording``."""
    return verify_redacted(path, **kwargs) if is_redacted(path) else rec.verify_recording(path, **kwargs)


def read_any_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The original recording header, also of a redacted recording.

    :raises RecordingError: unreadable or damaged
    """
    if not is_redacted(path):
        return rec.read_header(path)
    with _open(path) as fh:
        try:
            size = _PRELUDE.unpack(_read_exact(fh, _PRELUDE.size))[2]
            if size > _MAX_INFO:
                raise _Damaged("redaction info: corrupt length field")
            _read_exact(fh, size)
            head_len = _U32.unpack(_read_exact(fh, _U32.size))[0]
            if head_len > _MAX_HEAD:
                raise _Damaged("header: corrupt length field")
            head = _read_exact(fh, head_len)
        except _Damaged as exc:
            raise RecordingError(f"{os.fspath(path)}: {exc}", "run: medbroker audit verify") from None
    header, _h0, problems = _parse_original_head(head)
    if header is None:
        raise RecordingError(f"{os.fspath(path)}: {problems[0]}", "run: medbroker audit verify")
    return header


def _kept_frames(path: str | os.PathLike[str], key_lookup: Callable[[str], bytes] | None,
                 strict: bool) -> Generator[Frame, None, None]:
    header = read_any_header(path)
    aead = rec._key_for(header, key_lookup, os.fspath(path))  # the recording module's key derivation
    kept: list[Frame] = []
    problems: list[str] = []

    def on_kept(fields: tuple, payload: bytes, stored: bytes) -> None:
        seq, mono, wall, channel, code, flags = fields
        if flags & 0x01:
            if aead is None:
                problems.append(f"frame {seq}: marked encrypted but the header has no encryption")
                return
            try:
                payload = aead[0].decrypt(seq.to_bytes(12, "big"), payload, aead[1] + _FIXED.pack(*fields))
            except InvalidTag:
                problems.append(f"frame {seq}: cannot be decrypted")
                return
        kept.append(Frame(seq, mono, wall, channel, KIND_NAMES.get(code, "?"), payload, stored.hex()))

    with _open(path) as fh:
        _walk(fh, on_kept, problems)
    if strict and problems:
        raise RecordingError(f"{os.fspath(path)}: {problems[0]}", "run: medbroker audit verify")
    yield from kept


def open_frames(path: str | os.PathLike[str], key_lookup: Callable[[str], bytes] | None = None, *,
                strict: bool = True) -> Generator[Frame, None, None]:
    """Frames of a recording for export: all of them, or for a redacted recording only the kept (event) frames.

    :raises RecordingError: as ``sessions.recording.read_frames``
    """
    if is_redacted(path):
        return _kept_frames(path, key_lookup, strict)
    return rec.read_frames(path, key_lookup=key_lookup, strict=strict)
