"""Session recordings: append-only, hash-chained, optionally encrypted frame files; read, verify, seal.

The format is defined in sessions/recformat.py (its names are re-exported here); the writer is
sessions/recwriter.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Generator, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medcore.clock import Clock, SystemClock, utc_iso
from medcore.errors import BrokerError, RecordingError, UsageError
from sessions.recformat import (
    DATA_KINDS, END_CODE, EPOCH, FIXED, FLAG_ENCRYPTED, KIND_NAMES, KINDS, LEN, MAGIC, MAX_HEADER, MAX_PAYLOAD,
    MICROSECOND, PRELUDE, TAG, VERSION, derive_key, describe_error, dump_json, frame_aad, json_object, pack_frame,
    write_all,
)

__all__ = [
    "MAGIC", "VERSION", "KINDS", "KIND_NAMES", "DATA_KINDS", "MAX_PAYLOAD", "Frame", "VerifyResult",
    "read_header", "read_frames", "TailSource", "verify_recording", "seal_recording",
    "sign_final_hash", "verify_final_hash_signature",
]

_MAX_PROBLEMS = 50
_VERIFY_HINT = "run: medbroker audit verify (for the full report)"


@dataclass(frozen=True)
class Frame:
    """One decoded frame. ``payload`` is plaintext; ``hash`` is the stored chain hash (hex)."""

    seq: int
    mono_ns: int
    wall_us: int
    channel: int
    kind: str
    payload: bytes
    hash: str

    @property
    def offset(self) -> float:
        """Seconds since the session started (monotonic)."""
        return self.mono_ns / 1e9

    @property
    def wall_at(self) -> datetime:
        """Aware UTC wall time of the frame."""
        return EPOCH + self.wall_us * MICROSECOND

    def event(self) -> dict[str, Any]:
        """The JSON object of an event frame.

        :raises RecordingError: a data frame (input/output/stderr) or a payload that is not a JSON object
        """
        if self.kind in DATA_KINDS:
            raise RecordingError(f"frame {self.seq} is {self.kind} data, not an event")
        value = json_object(self.payload)
        if value is None:
            raise RecordingError(f"frame {self.seq}: {self.kind} payload is not a JSON object")
        return value


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_recording`. ``ok`` means no problem; ``incomplete`` is not a problem."""

    ok: bool
    frames: int
    final_hash: str
    incomplete: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    torn_tail_bytes: int = 0
    end_reason: str | None = None
    encrypted: bool = False


# ---------------------------------------------------------------- reading


class _Corrupt(Exception):
    """The file cannot be parsed past this point."""


@dataclass(frozen=True)
class _Raw:
    index: int
    offset: int
    seq: int
    mono_ns: int
    wall_us: int
    channel: int
    code: int
    flags: int
    fixed: bytes
    payload: bytes
    stored: bytes
    computed: bytes
    skipped: bool = False  # read_frames(want_data=...) did not want it: payload neither copied nor hashed


class _Scanner:
    """Incremental parser: header, then frames; returns None where the file ends mid-record."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # file offset of _buf[0]
        self.header: dict[str, Any] | None = None
        self.header_problem: str | None = None
        self.prev = b""
        self.last: _Raw | None = None
        self.index = 0

    @property
    def offset(self) -> int:
        """File offset just after the last complete record."""
        return self._base + self._pos

    @property
    def leftover(self) -> int:
        return len(self._buf) - self._pos

    def fill(self) -> bool:
        chunk = self._fh.read(1 << 20)
        if not chunk:
            return False
        if self._pos > (1 << 20):
            del self._buf[:self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += chunk
        return True

    def _need(self, n: int) -> bool:
        while self.leftover < n:
            if not self.fill():
                return False
        return True

    def read_head(self) -> bool:
        if not self._need(PRELUDE.size):
            if not MAGIC.startswith(bytes(self._buf[:8])):
                raise _Corrupt("not a medbroker recording (bad magic)")
            return False
        magic, version, size = PRELUDE.unpack_from(self._buf, 0)
        if magic != MAGIC:
            raise _Corrupt("not a medbroker recording (bad magic)")
        if version != VERSION:
            raise _Corrupt(f"unsupported recording format version {version} (this broker reads {VERSION})")
        if size > MAX_HEADER:
            raise _Corrupt("header: corrupt length field")
        end = PRELUDE.size + size
        if not self._need(end + 32):
            return False
        header = json_object(bytes(self._buf[PRELUDE.size:end]))
        if header is None or not isinstance(header.get("session_id"), str):
            self.header_problem = "header: not a valid JSON object with a session_id"
        else:
            self.header = header
        self.prev = bytes(self._buf[end:end + 32])
        if hashlib.sha256(self._buf[:end]).digest() != self.prev:
            self.header_problem = self.header_problem or "header: hash mismatch (the header was modified)"
        self._pos = end + 32
        return True

    def next_frame(self, skip: Callable[[int, int], bool] | None = None) -> _Raw | None:
        """The next frame, or None at the end of the file; ``skip(channel, code)`` True: leave the payload."""
        if not self._need(LEN.size):
            return None
        size, guard = LEN.unpack_from(self._buf, self._pos)
        if guard != size ^ 0xFFFFFFFF or not FIXED.size <= size <= FIXED.size + MAX_PAYLOAD + TAG:
            raise _Corrupt(f"frame {self.index + 1}: corrupt length field at byte {self.offset}")
        if not self._need(LEN.size + size + 32):
            return None
        p = self._pos + LEN.size
        fixed = bytes(self._buf[p:p + FIXED.size])
        fields = FIXED.unpack(fixed)
        stored = bytes(self._buf[p + size:p + size + 32])
        self.index += 1
        if skip is not None and skip(fields[3], fields[4]):
            # *fields: FIXED unpacks to the six header fields, a count mypy cannot see through struct
            raw = _Raw(self.index, self.offset, *fields, fixed, b"", stored, stored, skipped=True)  # type: ignore[misc, call-arg]
        else:
            payload = bytes(self._buf[p + FIXED.size:p + size])
            h = hashlib.sha256(self.prev)
            h.update(fixed)
            h.update(payload)
            raw = _Raw(self.index, self.offset, *fields, fixed, payload, stored, h.digest())  # type: ignore[call-arg]
        self._pos = p + size + 32
        self.prev, self.last = stored, raw
        return raw


def _key_for(header: dict[str, Any], key_lookup: Callable[[str], bytes] | None,
             path: str) -> tuple[AESGCM, bytes] | None:
    """The recording's AEAD (or None if clear). :raises RecordingError: no or wrong key, bad header."""
    enc = header.get("encryption")
    if enc is None:
        return None
    if not isinstance(enc, dict) or enc.get("alg") != "AES-256-GCM" or not isinstance(enc.get("key_id"), str):
        raise RecordingError(f"{path}: unsupported encryption header {enc!r}")
    key_id = enc["key_id"]
    if key_lookup is None:
        raise RecordingError(f"{path} is encrypted with key {key_id!r}; no key was given",
                             "pass the broker's data keys (keys/data.key)")
    try:
        key = key_lookup(key_id)
        aead, check = derive_key(key, bytes.fromhex(enc.get("salt", "")), header["session_id"])
    except BrokerError:
        raise
    except Exception as exc:  # noqa: BLE001 - the caller's lookup: any failure means "no key"
        raise RecordingError(f"{path}: cannot get key {key_id!r}: {exc!r}", "restore keys/data.key") from None
    if check != enc.get("key_check"):
        raise RecordingError(f"{path}: wrong key for this recording (key id {key_id!r})",
                             "the key file does not hold the key this recording was written with")
    return aead, frame_aad(header["session_id"])


class _Checker:
    """Per-frame checks shared by the reader, verify and seal; produces problems and decoded frames."""

    def __init__(self, header: dict[str, Any] | None, aead: tuple[AESGCM, bytes] | None) -> None:
        self.encrypted = bool(header and "encryption" in header)
        self.aead = aead
        self.expected = 1
        self.last_mono = 0
        self.ended = False
        self.end_reason: str | None = None

    def check(self, raw: _Raw) -> tuple[list[str], Frame | None]:
        n, problems = raw.index, []
        if raw.computed != raw.stored:
            problems.append(f"frame {n}: hash mismatch")
        if raw.seq != self.expected:
            what = "sequence gap" if raw.seq > self.expected else "sequence out of order"
            problems.append(f"frame {n}: {what} (expected {self.expected}, got {raw.seq})")
        self.expected = raw.seq + 1
        if raw.mono_ns < self.last_mono:
            problems.append(f"frame {n}: monotonic time goes backwards ({raw.mono_ns} < {self.last_mono} ns)")
        self.last_mono = max(self.last_mono, raw.mono_ns)
        kind = KIND_NAMES.get(raw.code)
        if kind is None:
            problems.append(f"frame {n}: unknown kind code {raw.code}")
        if raw.flags & ~FLAG_ENCRYPTED:
            problems.append(f"frame {n}: unknown flags 0x{raw.flags:02x}")
        if raw.skipped:
            return problems, None
        payload: bytes | None = raw.payload
        if raw.flags & FLAG_ENCRYPTED:
            if not self.encrypted:
                problems.append(f"frame {n}: marked encrypted but the header has no encryption")
                payload = None
            elif self.aead is None:
                payload = None
            else:
                try:
                    payload = self.aead[0].decrypt(raw.seq.to_bytes(12, "big"), raw.payload, self.aead[1] + raw.fixed)
                except InvalidTag:
                    problems.append(f"frame {n}: cannot be decrypted (ciphertext or frame fields modified)")
                    payload = None
        elif self.encrypted and kind != "end":
            problems.append(f"frame {n}: stored in clear in an encrypted recording")
        if payload is not None and kind is not None and kind not in DATA_KINDS:
            event = json_object(payload)
            if event is None:
                problems.append(f"frame {n}: {kind} payload is not a JSON object")
            elif kind == "end":
                self.end_reason = str(event.get("reason"))
        if kind == "end":
            self.ended = True
        if payload is None or kind is None:
            return problems, None
        return problems, Frame(raw.seq, raw.mono_ns, raw.wall_us, raw.channel, kind, payload, raw.stored.hex())


def _open_read(path: Any, mode: str = "rb") -> Any:
    if hasattr(path, "read"):  # a TailSource (e.g. broker/journal.py's JournalTail): the caller's stream
        return contextlib.nullcontext(path)
    try:
        return open(path, mode, buffering=0)
    except OSError as exc:
        raise RecordingError(f"cannot open recording {os.fspath(path)}: {describe_error(exc)}",
                             "check the session id and the recordings directory") from exc


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header object (caller's fields plus ``encryption``). Does not check hashes: use verify.

    :raises RecordingError: unreadable, not a recording, or the header is incomplete or damaged
    """
    with _open_read(path) as fh:
        sc = _Scanner(fh)
        try:
            complete = sc.read_head()
        except _Corrupt as exc:
            raise RecordingError(f"{os.fspath(path)}: {exc}", _VERIFY_HINT) from None
        if not complete or sc.header is None:
            raise RecordingError(f"{os.fspath(path)}: header is incomplete or damaged", _VERIFY_HINT)
        return sc.header


def _appended(fh: Any, sc: _Scanner) -> str:
    if not hasattr(fh, "fileno"):
        return f"appended data after the end frame (at byte {sc.offset})"
    extra = os.fstat(fh.fileno()).st_size - sc.offset
    return f"appended data after the end frame ({extra} bytes at byte {sc.offset})"


def _writer_gone(fh: Any) -> bool:
    """True if no writer holds the recording's lock (local files), or the source says its writer is gone."""
    if hasattr(fh, "writer_gone"):
        return bool(fh.writer_gone())
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return True


class TailSource(Protocol):
    """A recording that is not a local file (broker/journal.py's ``JournalTail``), for :func:`read_frames`."""

    name: str

    def read(self, size: int = -1) -> bytes:
        """The next bytes of the recording; ``b""`` when nothing more is there yet."""

    def writer_gone(self) -> bool:
        """True once no more bytes will come."""


def read_frames(path: str | os.PathLike[str] | TailSource, key_lookup: Callable[[str], bytes] | None = None,
                follow: bool = False, *, strict: bool = True, stop: Callable[[], bool] | None = None,
                timeout: float | None = None, poll_interval: float = 0.1,
                sleep: Callable[[float], None] = time.sleep,
                want_data: Callable[[int, str], bool] | None = None) -> Generator[Frame, None, None]:
    """Yield the frames of a recording in order, decrypted, checking the chain as it goes.

    A torn tail ends the iteration quietly (see :func:`verify_recording`). With ``follow=True`` it tails a
    file another process is writing, polling every ``poll_interval`` seconds, and ends at the ``end``
    frame, when the writer is gone (its lock is free and no more data comes), when ``stop()`` returns
    True, or after ``timeout`` seconds; at least one of ``stop``/``timeout`` is required.

    :param path: the recording file, or a :class:`TailSource` (followed the same way; its
        ``writer_gone()`` replaces the file lock check)
    :param key_lookup: key id → 32-byte key, for encrypted recordings
    :param strict: raise on the first chain problem; False skips damaged frames and stops where the
        file cannot be parsed (for exporting damaged evidence)
    :param want_data: ``want_data(channel, kind)`` is asked before each input/output/stderr frame is
        decoded; False leaves that frame out unread: not copied, hash-checked, decrypted or yielded (its
        sequence number and time are still checked). For indexers; events are always decoded.
    :raises RecordingError: unreadable, not a recording, encrypted without the right key, or (strict)
        a chain problem, naming the frame
    :raises UsageError: ``follow`` without ``stop`` or ``timeout``
    """
    if follow and stop is None and timeout is None:
        raise UsageError("read_frames(follow=True) needs stop= or timeout=")
    deadline = None if timeout is None else time.monotonic() + timeout
    name = path.name if hasattr(path, "read") else os.fspath(path)  # type: ignore[union-attr, arg-type]

    def keep_waiting() -> bool:
        if not follow or (stop is not None and stop()) or (deadline is not None and time.monotonic() >= deadline):
            return False
        sleep(poll_interval)
        return True

    def problem(text: str) -> None:
        if strict:
            raise RecordingError(f"{name}: {text}", _VERIFY_HINT)

    with _open_read(path) as fh:
        sc = _Scanner(fh)
        try:
            while not sc.read_head():
                if not keep_waiting():
                    if follow:
                        return
                    raise RecordingError(f"{name}: header is incomplete ({sc.leftover} bytes)", _VERIFY_HINT)
        except _Corrupt as exc:
            raise RecordingError(f"{name}: {exc}", _VERIFY_HINT) from None
        if sc.header is None:
            raise RecordingError(f"{name}: {sc.header_problem}", _VERIFY_HINT)
        if sc.header_problem:
            problem(sc.header_problem)
        checker = _Checker(sc.header, _key_for(sc.header, key_lookup, name))
        skip = None if want_data is None else \
            (lambda channel, code: (kind := KIND_NAMES.get(code)) in DATA_KINDS and not want_data(channel, kind))
        while True:
            try:
                raw = sc.next_frame(skip)
                if raw is None and follow and _writer_gone(fh):
                    raw = sc.next_frame(skip)  # the writer may have written its last batch just before exiting
                    if raw is None:
                        return
            except _Corrupt as exc:
                problem(str(exc))
                return
            if raw is None:
                if not keep_waiting():
                    return
                continue
            problems, frame = checker.check(raw)
            for text in problems:
                problem(text)
            if frame is not None:
                yield frame
            if checker.ended:
                if not follow and (sc.leftover or sc.fill()):
                    problem(_appended(fh, sc))
                return


def verify_recording(path: str | os.PathLike[str], *, expected_final_hash: str | None = None,
                     signature: str | None = None, public_key: Ed25519PublicKey | None = None,
                     key_lookup: Callable[[str], bytes] | None = None) -> VerifyResult:
    """Check a recording's header, chain, sequence, times and structure, without needing its key.

    Problems name the position in the file ("frame 9: sequence gap (expected 9, got 10)"). A torn tail
    or a missing end frame sets ``incomplete`` and a note, not a problem.

    :param expected_final_hash: the hash stored in the database at close
    :param signature: hex ed25519 signature of the final hash (with ``public_key``)
    :param key_lookup: optional; also authenticates every encrypted frame
    :raises RecordingError: the file cannot be opened
    :raises UsageError: ``signature`` without ``public_key``
    """
    if signature is not None and public_key is None:
        raise UsageError("verify_recording: a signature needs the broker's public key")
    problems: list[str] = []
    notes: list[str] = []
    torn = 0
    with _open_read(path) as fh:
        sc = _Scanner(fh)
        checker = _Checker(None, None)
        try:
            if not sc.read_head():
                problems.append(f"header is incomplete ({sc.leftover} bytes)")
            else:
                if sc.header_problem:
                    problems.append(sc.header_problem)
                aead = None
                if sc.header is not None and key_lookup is not None:
                    try:
                        aead = _key_for(sc.header, key_lookup, os.fspath(path))
                    except RecordingError as exc:
                        problems.append(exc.message)
                checker = _Checker(sc.header, aead)
                while (raw := sc.next_frame()) is not None:
                    problems += checker.check(raw)[0]
                    if checker.ended:
                        break
                if checker.ended and (sc.leftover or sc.fill()):
                    problems.append(_appended(fh, sc))
                elif sc.leftover:
                    torn = sc.leftover
                    notes.append(f"torn tail: the last {torn} bytes are a partial frame (the writer stopped "
                                 "mid-frame); run seal to close the recording")
        except _Corrupt as exc:
            problems.append(str(exc))
    final = sc.prev.hex()
    incomplete = not checker.ended
    if incomplete and not torn:
        notes.append("no end frame: the recording was not closed (broker stopped, or still being written)")
    if expected_final_hash is not None and expected_final_hash.lower() != final:
        problems.append("final hash differs from the one stored in the database")
    if signature is not None and public_key is not None \
            and not verify_final_hash_signature(public_key, final, signature):
        problems.append("signature invalid")
    if len(problems) > _MAX_PROBLEMS:
        problems[_MAX_PROBLEMS:] = [f"... and {len(problems) - _MAX_PROBLEMS} more problems"]
    return VerifyResult(ok=not problems, frames=sc.index, final_hash=final, incomplete=incomplete,
                        problems=tuple(problems), notes=tuple(notes), torn_tail_bytes=torn,
                        end_reason=checker.end_reason, encrypted=checker.encrypted)


def seal_recording(path: str | os.PathLike[str], *, clock: Clock | None = None) -> tuple[str, int]:
    """Close a recording a crash left open: drop a torn last frame, append ``end`` (reason "incomplete").

    A complete recording is left unchanged. The end frame is stored in clear (so no key is needed) with
    the last frame's ``mono_ns`` and the current wall time.

    :returns: (final hash hex, bytes dropped from the torn tail)
    :raises RecordingError: unreadable, still being written, no complete header, or damaged (changes nothing)
    """
    name = os.fspath(path)
    with _open_read(path, "r+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RecordingError(f"{name} is still being written by a running broker",
                                 "seal only recordings whose session has ended") from None
        sc = _Scanner(fh)
        problems: list[str] = []
        checker = _Checker(None, None)
        try:
            if not sc.read_head():
                raise RecordingError(f"{name}: no complete header; nothing to seal",
                                     "the session never started recording; keep the file as evidence")
            problems += [sc.header_problem] if sc.header_problem else []
            checker = _Checker(sc.header, None)
            while (raw := sc.next_frame()) is not None:
                problems += checker.check(raw)[0]
                if checker.ended:
                    break
        except _Corrupt as exc:
            problems.append(str(exc))
        if checker.ended and not problems and (sc.leftover or sc.fill()):
            problems.append(_appended(fh, sc))
        if problems:
            raise RecordingError(f"refusing to seal {name}: {problems[0]}",
                                 "a damaged recording is evidence: keep it unchanged; " + _VERIFY_HINT)
        if checker.ended:
            return sc.prev.hex(), 0
        end_at = sc.offset
        dropped = os.fstat(fh.fileno()).st_size - end_at
        last = sc.last
        now = (clock or SystemClock()).now()
        event = {"reason": "incomplete", "sealed_at": utc_iso(now), "dropped_bytes": dropped,
                 "frames": sc.index + 1}
        fixed = FIXED.pack((last.seq if last else 0) + 1, last.mono_ns if last else 0,
                            (now - EPOCH) // MICROSECOND, 0, END_CODE, 0)
        out: list[bytes] = []
        digest = pack_frame(sc.prev, fixed, dump_json(event), out)
        try:
            os.ftruncate(fh.fileno(), end_at)
            os.lseek(fh.fileno(), end_at, os.SEEK_SET)
            write_all(fh.fileno(), b"".join(out))
            os.fsync(fh.fileno())
        except OSError as exc:
            raise RecordingError(f"cannot seal {name}: {describe_error(exc)}", "free space, then retry") from exc
        return digest.hex(), dropped


def _signed_message(final_hash_hex: str) -> bytes:
    try:
        digest = bytes.fromhex(final_hash_hex)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise RecordingError(f"{final_hash_hex!r} is not a 64-digit hex sha256")
    return b"medbroker recording final hash v1\x00" + digest


def sign_final_hash(private_key: Ed25519PrivateKey, final_hash_hex: str) -> str:
    """Sign a recording's final hash with the broker's ed25519 key; returns the signature as hex.

    :raises RecordingError: ``final_hash_hex`` is not 64 hex digits
    """
    return private_key.sign(_signed_message(final_hash_hex)).hex()


def verify_final_hash_signature(public_key: Ed25519PublicKey, final_hash_hex: str, signature_hex: str) -> bool:
    """True when ``signature_hex`` is the broker's signature of ``final_hash_hex``; never raises on bad input."""
    try:
        public_key.verify(bytes.fromhex(signature_hex), _signed_message(final_hash_hex))
        return True
    except (InvalidSignature, ValueError, RecordingError):
        return False
