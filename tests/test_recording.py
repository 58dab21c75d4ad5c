"""Recording format: round trips, tamper detection, torn tails and sealing, encryption, follow mode, failures."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import FUZZ_EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.clock import FakeClock
from broker.errors import BrokerError, RecordingError, UsageError
from sessions.recording import (
    DATA_KINDS,
    KIND_NAMES,
    KINDS,
    MAX_PAYLOAD,
    read_frames,
    read_header,
    seal_recording,
    sign_final_hash,
    verify_final_hash_signature,
    verify_recording,
)
from sessions.recwriter import COALESCE_BYTES, COALESCE_NS, RecordingWriter, _Pool

REPO = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))
HEADER = {"session_id": "s-0001", "user": "alice", "device": "ct-01", "grant_id": 7,
          "started_at": "2026-01-01T08:00:00.000000Z", "broker_host_key": "SHA256:abc"}
EVENT_KINDS = sorted(k for k in KINDS if k not in DATA_KINDS and k != "end")
ROUND_TRIP_EXAMPLES = max(300, settings.default.max_examples)


# tmpfs when there is one: these tests write thousands of small files and fsync at every close.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def keys(key_id: str) -> bytes:
    return {"k1": KEY}[key_id]


def write_sample(path: Path, *, frames: int = 20, encrypted: bool = False, close: bool = True) -> str | RecordingWriter:
    """A recording with ``frames`` frames before the end frame: pty, then output/input/events."""
    clock = FakeClock()
    w = RecordingWriter(path, HEADER, clock=clock, aead_key=KEY if encrypted else None,
                        key_id="k1" if encrypted else None)
    w.append_event(0, "pty", {"term": "xterm", "cols": 80, "rows": 24})
    for i in range(2, frames + 1):
        clock.advance(0.5)
        if i % 3 == 0:
            w.append_event(0, "exec", {"command": f"cat /tmp/file{i}"})
        else:
            w.append_data(0, "output" if i % 2 else "input", f"PATIENT-SECRET-{i} \u00e9\r\n".encode())
    return w.close() if close else w


def frame_spans(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Independent parse of the documented layout: (end of header block, [(start, end) of each frame])."""
    _, _, hlen = struct.unpack_from(">8sHI", data, 0)
    pos = head_end = 14 + hlen + 32
    spans = []
    while pos < len(data):
        size, guard = struct.unpack_from(">II", data, pos)
        assert guard == size ^ 0xFFFFFFFF
        spans.append((pos, pos + 8 + size + 32))
        pos += 8 + size + 32
    return head_end, spans


def rechain(data: bytes) -> bytes:
    """Recompute every stored hash, as an attacker without the database or signing key could."""
    head_end, spans = frame_spans(data)
    out = bytearray(data)
    prev = hashlib.sha256(data[:head_end - 32]).digest()
    out[head_end - 32:head_end] = prev
    for start, end in spans:
        body = bytes(out[start + 8:end - 32])
        prev = hashlib.sha256(prev + body).digest()
        out[end - 32:end] = prev
    return bytes(out)


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, str, bytes]:
    path = tmp_path / "s.mbr"
    final = write_sample(path)
    return path, final, path.read_bytes()


# ---------------------------------------------------------------- round trips

_event_values = st.one_of(st.text(max_size=20), st.integers(-2**53, 2**53), st.booleans(), st.none())
_ops = st.lists(st.one_of(
    st.tuples(st.just("data"), st.sampled_from(sorted(DATA_KINDS)), st.integers(0, 3), st.binary(max_size=700),
              st.integers(0, 5_000_000)),
    st.tuples(st.just("event"), st.sampled_from(EVENT_KINDS), st.integers(0, 2**32 - 1),
              st.dictionaries(st.text(max_size=8), _event_values, max_size=4), st.integers(0, 5_000_000)),
), max_size=25)


@settings(max_examples=ROUND_TRIP_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, encrypted=st.booleans())
def test_round_trip_every_kind_and_arbitrary_bytes(ops: list[tuple[Any, ...]], encrypted: bool) -> None:
    clock = FakeClock()
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        path = Path(tmp) / "r.mbr"
        w = RecordingWriter(path, HEADER, clock=clock, aead_key=KEY if encrypted else None,
                            key_id="k1" if encrypted else None)
        start_mono, expected = clock.monotonic_ns(), []
        for how, kind, channel, value, wait_ns in ops:
            clock.advance(wait_ns / 1e9)
            (w.append_data if how == "data" else w.append_event)(channel, kind, value)
            expected.append((kind, channel, value, clock.monotonic_ns() - start_mono))
        final = w.close("vendor disconnected")
        frames = list(read_frames(path, key_lookup=keys))
        result = verify_recording(path, expected_final_hash=final)
        header = read_header(path)
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
    _assert_frames_are_the_appends(frames[:-1], expected)
    assert frames[-1].kind == "end" and frames[-1].event()["reason"] == "vendor disconnected"
    assert frames[-1].hash == final
    assert result.ok and not result.incomplete and result.frames == len(frames) and result.encrypted == encrypted
    assert ("encryption" in header) == encrypted and header["session_id"] == HEADER["session_id"]
    assert w.bytes_in == sum(len(v) for h, k, _, v, _ in ops if k == "input")
    assert w.bytes_out == sum(len(v) for h, k, _, v, _ in ops if k in ("output", "stderr"))


def _assert_frames_are_the_appends(frames: list[Any], expected: list[tuple[Any, ...]]) -> None:
    """Each frame is one append, or (data only) several consecutive non-empty appends to the same channel and
    stream within COALESCE_NS of the first, joined up to COALESCE_BYTES; the frame has the first one's time."""
    ops = iter(expected)
    for frame in frames:
        kind, channel, value, mono = next(ops)
        assert (frame.kind, frame.channel, frame.mono_ns) == (kind, channel, mono)
        if kind not in DATA_KINDS:
            assert frame.event() == value
            continue
        joined = value
        while len(joined) < len(frame.payload):
            more_kind, more_channel, more, more_mono = next(ops)
            assert (more_kind, more_channel) == (kind, channel) and more and value, "only like appends join"
            assert more_mono - mono <= COALESCE_NS
            joined += more
        assert frame.payload == joined and len(joined) <= max(COALESCE_BYTES, len(value))
    assert next(ops, None) is None, "every append is in a frame"


def test_appends_join_a_queued_frame_only_when_alike_and_close_in_time(tmp_path: Path) -> None:
    clock = FakeClock()
    w = RecordingWriter(tmp_path / "j.mbr", HEADER, clock=clock)
    pool = w._pool = _Pool()  # its own writer thread, not started yet: nothing takes the queue meanwhile
    pool.start_locked = lambda: None  # type: ignore[method-assign]
    seqs = [w.append_data(1, "output", b"a"), w.append_data(1, "output", b"b")]  # joins
    clock.advance(0.004)
    seqs.append(w.append_data(1, "output", b"c"))  # 4 ms after the frame's first bytes: joins
    clock.advance(0.002)
    seqs.append(w.append_data(1, "output", b"d"))  # 6 ms: a new frame
    seqs += [w.append_data(2, "output", b"e"), w.append_data(2, "stderr", b"f"), w.append_data(2, "input", b"g")]
    seqs.append(w.append_event(2, "resize", {"cols": 80, "rows": 24}))  # an event ends the open frame
    seqs.append(w.append_data(2, "input", b"h"))
    seqs.append(w.append_data(2, "input", b""))  # empty: its own frame, and nothing joins it
    seqs.append(w.append_data(2, "input", b"i"))
    seqs.append(w.append_data(2, "input", b"j" * COALESCE_BYTES))  # would pass COALESCE_BYTES: a new frame
    assert seqs == [1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    del pool.start_locked  # the writer thread may run now
    with pool.lock:
        pool.start_locked()
    w.close()
    frames = list(read_frames(tmp_path / "j.mbr"))[:-1]
    assert [(f.channel, f.kind, f.payload if f.kind in DATA_KINDS else f.event()) for f in frames] == [
        (1, "output", b"abc"), (1, "output", b"d"), (2, "output", b"e"), (2, "stderr", b"f"), (2, "input", b"g"),
        (2, "resize", {"cols": 80, "rows": 24}), (2, "input", b"h"), (2, "input", b""), (2, "input", b"i"),
        (2, "input", b"j" * COALESCE_BYTES)]


def test_data_larger_than_a_frame_is_split_and_rejoined(tmp_path: Path) -> None:
    blob = os.urandom(2 * MAX_PAYLOAD + 123)
    w = RecordingWriter(tmp_path / "big.mbr", HEADER, clock=FakeClock())
    assert w.append_data(3, "output", blob) == 3
    w.close()
    frames = list(read_frames(tmp_path / "big.mbr"))
    assert [len(f.payload) for f in frames[:-1]] == [MAX_PAYLOAD, MAX_PAYLOAD, 123]
    assert b"".join(f.payload for f in frames[:-1]) == blob


def test_kind_table_is_complete_and_two_way() -> None:
    spec = ("input output stderr resize pty exec shell subsystem env signal break eof sftp-request "
            "sftp-reply-summary file-transfer policy-denial alert notice channel-open channel-close exit end "
            "containment forward-bytes").split()
    assert sorted(KINDS) == sorted(spec)
    assert len(set(KINDS.values())) == len(spec) and all(0 < c < 256 for c in KINDS.values())
    assert all(KIND_NAMES[code] == name for name, code in KINDS.items())


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "a.mbr", HEADER, clock=FakeClock())
    with pytest.raises(RecordingError, match="'exec' is not a data kind"):
        w.append_data(0, "exec", b"x")
    for kind in ("output", "end", "nope"):
        with pytest.raises(RecordingError, match=f"'{kind}' is not an event kind"):
            w.append_event(0, kind, {})
    with pytest.raises(RecordingError, match="must be a dict"):
        w.append_event(0, "exec", ["ls"])  # type: ignore[arg-type]
    with pytest.raises(RecordingError, match="not JSON-serialisable"):
        w.append_event(0, "exec", {"command": object()})
    with pytest.raises(RecordingError, match="channel -1 is out of range"):
        w.append_data(-1, "input", b"x")
    w.close()
    assert [f.kind for f in read_frames(tmp_path / "a.mbr")] == ["end"]
    with pytest.raises(RecordingError, match="session_id"):
        RecordingWriter(tmp_path / "b.mbr", {"user": "alice"}, clock=FakeClock())
    with pytest.raises(RecordingError, match="reserved"):
        RecordingWriter(tmp_path / "b.mbr", {**HEADER, "encryption": {}}, clock=FakeClock())
    with pytest.raises(RecordingError, match="32-byte key"):
        RecordingWriter(tmp_path / "b.mbr", HEADER, clock=FakeClock(), aead_key=b"short", key_id="k1")
    assert not (tmp_path / "b.mbr").exists()
    before = (tmp_path / "a.mbr").read_bytes()
    with pytest.raises(RecordingError, match="already exists"):
        RecordingWriter(tmp_path / "a.mbr", HEADER, clock=FakeClock())
    assert (tmp_path / "a.mbr").read_bytes() == before


def test_lone_surrogates_in_events_survive(tmp_path: Path) -> None:
    path = b"/data/\xff\xfe.dcm".decode("utf-8", "surrogateescape")
    w = RecordingWriter(tmp_path / "a.mbr", HEADER, clock=FakeClock())
    w.append_event(1, "sftp-request", {"op": "open", "path": path})
    w.close()
    assert next(read_frames(tmp_path / "a.mbr")).event()["path"] == path


def test_counters_last_activity_close_idempotent(tmp_path: Path) -> None:
    clock = FakeClock()
    w = RecordingWriter(tmp_path / "a.mbr", HEADER, clock=clock)
    w.append_data(0, "input", b"abc")
    clock.advance(2)
    w.append_data(0, "output", b"hello")
    w.append_data(0, "stderr", b"!!")
    data_at = clock.monotonic_ns()
    clock.advance(5)
    w.append_event(0, "notice", {"text": "window ends in 5 minutes"})
    assert (w.bytes_in, w.bytes_out, w.last_activity_mono_ns, w.frames) == (3, 7, data_at, 4)
    final = asyncio.run(w.aclose("revoked"))
    assert w.close() == final and w.closed
    assert w.append_data(0, "output", b"late") == 0 and w.dropped_frames == 1
    end = list(read_frames(tmp_path / "a.mbr"))[-1].event()
    assert end == {"reason": "revoked", "frames": 5, "bytes_in": 3, "bytes_out": 7}


def test_close_while_another_thread_appends_leaves_nothing_after_end(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "race.mbr", HEADER, clock=FakeClock())
    started = threading.Event()

    def pump() -> None:
        for i in range(200_000):
            if w.append_data(0, "output", b"x") == 0:
                return
            if i == 1000:
                started.set()

    t = threading.Thread(target=pump)
    t.start()
    assert started.wait(timeout=10)
    final = w.close("raced")
    t.join(timeout=30)
    result = verify_recording(tmp_path / "race.mbr", expected_final_hash=final)
    assert result.ok and not result.incomplete and w.dropped_frames == 1
    frames = list(read_frames(tmp_path / "race.mbr"))
    end = frames[-1]
    assert end.event()["frames"] == end.seq == result.frames
    assert end.event()["bytes_out"] == sum(len(f.payload) for f in frames[:-1]) == w.bytes_out


# ---------------------------------------------------------------- tamper detection


def test_every_flipped_bit_anywhere_is_detected(sample: tuple[Path, str, bytes]) -> None:
    path, final, data = sample
    assert verify_recording(path, expected_final_hash=final).ok
    undetected = []
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        bad = Path(tmp) / "bad.mbr"
        for i in range(len(data)):
            for bit in (0x01, 0x80):
                bad.write_bytes(data[:i] + bytes([data[i] ^ bit]) + data[i + 1:])
                if verify_recording(bad).ok:  # no database hash: the file alone must show it
                    undetected.append((i, bit))
    assert undetected == []


def test_flipped_bytes_are_named_precisely(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    head_end, spans = frame_spans(data)
    bad = tmp_path / "bad.mbr"
    i = data.index(b'"alice"') + 1
    bad.write_bytes(data[:i] + b"A" + data[i + 1:])
    assert verify_recording(bad).problems == ("header: hash mismatch (the header was modified)",)
    assert read_header(bad)["user"] == "Alice"  # the header parses; only verify/readers judge it
    with pytest.raises(RecordingError, match="header: hash mismatch"):
        list(read_frames(bad))
    start, end = spans[4]
    bad.write_bytes(data[:end - 40] + bytes([data[end - 40] ^ 1]) + data[end - 39:])  # frame 5 payload
    assert verify_recording(bad).problems == ("frame 5: hash mismatch",)
    with pytest.raises(RecordingError, match="frame 5: hash mismatch"):
        list(read_frames(bad))
    bad.write_bytes(data[:start] + bytes([data[start] ^ 1]) + data[start + 1:])  # frame 5 length
    assert verify_recording(bad).problems == (f"frame 5: corrupt length field at byte {start}",)
    bad.write_bytes(b"NOTAREC!" + data[8:])
    assert verify_recording(bad).problems == ("not a medbroker recording (bad magic)",)
    with pytest.raises(RecordingError, match="bad magic"):
        read_header(bad)


def test_deleted_frame(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    _, spans = frame_spans(data)
    bad = tmp_path / "bad.mbr"
    bad.write_bytes(data[:spans[8][0]] + data[spans[8][1]:])
    result = verify_recording(bad, expected_final_hash=final)
    assert result.problems == ("frame 9: hash mismatch", "frame 9: sequence gap (expected 9, got 10)")
    assert not result.ok and result.frames == 20 and result.final_hash == final  # the tail still chains


def test_reordered_frames(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    _, spans = frame_spans(data)
    (a, b), (_, c) = spans[4], spans[5]
    bad = tmp_path / "bad.mbr"
    bad.write_bytes(data[:a] + data[b:c] + data[a:b] + data[c:])
    assert verify_recording(bad).problems == (
        "frame 5: hash mismatch", "frame 5: sequence gap (expected 5, got 6)",
        "frame 6: hash mismatch", "frame 6: sequence out of order (expected 7, got 5)",
        "frame 6: monotonic time goes backwards (2000000000 < 2500000000 ns)",
        "frame 7: hash mismatch", "frame 7: sequence gap (expected 6, got 7)")


def test_truncated_middle(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    _, spans = frame_spans(data)
    cut = spans[6][0] + 20
    bad = tmp_path / "bad.mbr"
    bad.write_bytes(data[:cut] + data[cut + 90:])
    result = verify_recording(bad)
    assert not result.ok and result.problems[0].startswith("frame 7: ")


def test_appended_junk(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    bad = tmp_path / "bad.mbr"
    bad.write_bytes(data + b"junk!")
    result = verify_recording(bad, expected_final_hash=final)
    assert result.problems == (f"appended data after the end frame (5 bytes at byte {len(data)})",)
    with pytest.raises(RecordingError, match="appended data after the end frame"):
        list(read_frames(bad))
    with pytest.raises(RecordingError, match="refusing to seal"):
        seal_recording(bad)
    assert bad.read_bytes() == data + b"junk!"


def test_database_hash_and_signature(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    key = Ed25519PrivateKey.generate()
    sig = sign_final_hash(key, final)
    assert verify_recording(path, expected_final_hash=final, signature=sig, public_key=key.public_key()).ok
    other = Ed25519PrivateKey.generate().public_key()
    assert verify_recording(path, signature=sig, public_key=other).problems == ("signature invalid",)
    assert verify_recording(path, expected_final_hash="0" * 64).problems == (
        "final hash differs from the one stored in the database",)
    with pytest.raises(UsageError):
        verify_recording(path, signature=sig)
    # An attacker rewrites a frame and re-chains the whole file: only the database hash and signature catch it.
    forged = tmp_path / "forged.mbr"
    forged.write_bytes(rechain(data.replace(b"PATIENT-SECRET-5", b"nothing-to-see-5")))
    assert verify_recording(forged).ok
    assert verify_recording(forged, expected_final_hash=final, signature=sig, public_key=key.public_key()).problems \
        == ("final hash differs from the one stored in the database", "signature invalid")


def test_signature_helpers() -> None:
    key = Ed25519PrivateKey.generate()
    digest = hashlib.sha256(b"x").hexdigest()
    sig = sign_final_hash(key, digest)
    assert verify_final_hash_signature(key.public_key(), digest, sig)
    assert not verify_final_hash_signature(key.public_key(), hashlib.sha256(b"y").hexdigest(), sig)
    assert not verify_final_hash_signature(key.public_key(), digest, "zz")
    assert not verify_final_hash_signature(key.public_key(), "nothex", sig)
    with pytest.raises(RecordingError, match="not a 64-digit hex sha256"):
        sign_final_hash(key, "abc")


# ---------------------------------------------------------------- crashes, torn tails, seal


def test_every_torn_tail_is_reported_and_sealed(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    _, spans = frame_spans(data)
    last_start, _ = spans[-1]
    torn = tmp_path / "torn.mbr"
    for cut in range(last_start + 1, len(data)):
        torn.write_bytes(data[:cut])
        result = verify_recording(torn)
        assert result.ok and result.incomplete and result.problems == ()
        assert result.torn_tail_bytes == cut - last_start and "torn tail" in result.notes[0]
        assert [f.seq for f in read_frames(torn)] == list(range(1, 21))
        sealed_hash, dropped = seal_recording(torn, clock=FakeClock())
        assert dropped == cut - last_start
        after = verify_recording(torn, expected_final_hash=sealed_hash)
        assert after.ok and not after.incomplete and after.end_reason == "incomplete" and after.frames == 21
        end = list(read_frames(torn))[-1]
        assert end.event()["dropped_bytes"] == dropped and end.mono_ns == 19 * 500_000_000


def test_missing_end_frame_and_seal_noop(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    _, spans = frame_spans(data)
    cut = tmp_path / "cut.mbr"
    cut.write_bytes(data[:spans[-1][0]])
    result = verify_recording(cut)
    assert result.ok and result.incomplete and result.torn_tail_bytes == 0 and "no end frame" in result.notes[0]
    new_hash, dropped = seal_recording(cut)
    assert dropped == 0 and verify_recording(cut, expected_final_hash=new_hash).ok
    assert seal_recording(path) == (final, 0) and path.read_bytes() == data  # complete: untouched


def test_seal_refuses_damage_and_live_writers(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    _, spans = frame_spans(data)
    bad = tmp_path / "bad.mbr"
    at = spans[0][0] + 20
    damaged = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:spans[-1][0] + 5]
    bad.write_bytes(damaged)
    with pytest.raises(RecordingError, match="refusing to seal .*: frame 1: hash mismatch"):
        seal_recording(bad)
    assert bad.read_bytes() == damaged
    bad.write_bytes(data[:30])
    with pytest.raises(RecordingError, match="no complete header"):
        seal_recording(bad)
    live = write_sample(tmp_path / "live.mbr", close=False)
    assert isinstance(live, RecordingWriter)
    with pytest.raises(RecordingError, match="still being written"):
        seal_recording(live.path)
    live.close()


_KILLED_WRITER = """
import sys
from broker.clock import SystemClock
from sessions.recwriter import RecordingWriter
w = RecordingWriter(sys.argv[1], {"session_id": "killed"}, clock=SystemClock())
for i in range(1, 2_000_001):
    w.append_data(i % 2, "output", b"x" * (i % 5000))  # two channels: one frame per append (no joining)
    if i == 200:
        w.drain(timeout=10)
        print("ready", flush=True)
"""


def test_sigkill_leaves_a_readable_prefix_that_seals(tmp_path: Path) -> None:
    path = tmp_path / "killed.mbr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    result = verify_recording(path)
    assert result.ok and result.incomplete and result.frames >= 200
    final, _ = seal_recording(path)
    after = verify_recording(path, expected_final_hash=final)
    assert after.ok and not after.incomplete and after.end_reason == "incomplete"


# ---------------------------------------------------------------- encryption


def test_encrypted_recording_verifies_without_key(tmp_path: Path) -> None:
    path = tmp_path / "e.mbr"
    final = write_sample(path, encrypted=True)
    raw = path.read_bytes()
    assert b"PATIENT-SECRET" not in raw and b"cat /tmp/file" not in raw and KEY.hex().encode() not in raw
    header = read_header(path)
    assert header["encryption"]["key_id"] == "k1" and header["encryption"]["alg"] == "AES-256-GCM"
    result = verify_recording(path, expected_final_hash=final)
    assert result.ok and result.encrypted and result.frames == 21
    assert verify_recording(path, key_lookup=keys).ok
    texts = [f.payload for f in read_frames(path, key_lookup=keys) if f.kind == "output"]
    assert texts[0] == "PATIENT-SECRET-5 \u00e9\r\n".encode()


def test_encrypted_recording_without_or_with_wrong_key(tmp_path: Path) -> None:
    path = tmp_path / "e.mbr"
    write_sample(path, encrypted=True)
    with pytest.raises(RecordingError, match="encrypted with key 'k1'; no key was given"):
        list(read_frames(path))
    with pytest.raises(RecordingError, match="wrong key for this recording"):
        list(read_frames(path, key_lookup=lambda kid: b"\x07" * 32))
    with pytest.raises(RecordingError, match="cannot get key 'k1'"):
        list(read_frames(path, key_lookup={}.__getitem__))
    assert verify_recording(path, key_lookup=lambda kid: b"\x07" * 32).problems == (
        f"{path}: wrong key for this recording (key id 'k1')",)


def test_encrypted_frames_are_authenticated(tmp_path: Path) -> None:
    path = tmp_path / "e.mbr"
    write_sample(path, encrypted=True)
    data = path.read_bytes()
    _, spans = frame_spans(data)
    start, end = spans[3]
    bad = tmp_path / "bad.mbr"
    bad.write_bytes(rechain(data[:end - 40] + bytes([data[end - 40] ^ 1]) + data[end - 39:]))
    assert verify_recording(bad).ok  # chain rebuilt: without the key nothing is visible ...
    assert verify_recording(bad, key_lookup=keys).problems == (
        "frame 4: cannot be decrypted (ciphertext or frame fields modified)",)  # ... with it, AEAD is
    with pytest.raises(RecordingError, match="frame 4: cannot be decrypted"):
        list(read_frames(bad, key_lookup=keys))
    flags_at = start + 8 + 29
    bad.write_bytes(rechain(data[:flags_at] + b"\x00" + data[flags_at + 1:]))
    assert "frame 4: stored in clear in an encrypted recording" in verify_recording(bad).problems


def test_want_data_leaves_unwanted_data_frames_unread(tmp_path: Path) -> None:
    """Indexers ask for some data frames only: the rest are neither decrypted nor yielded; events always are."""
    path = tmp_path / "w.mbr"
    clock = FakeClock()
    w = RecordingWriter(path, HEADER, clock=clock, aead_key=KEY, key_id="k1")
    for i in range(12):
        clock.advance(0.25)
        w.append_data(i % 3, ("input", "output", "stderr")[i % 2 + (i % 5 == 0)], b"chunk-%d" % i)
        if i % 4 == 0:
            w.append_event(i % 3, "exec", {"command": f"run {i}"})
    w.close()
    full = list(read_frames(path, key_lookup=keys))
    asked: list[tuple[int, str]] = []

    def want(channel: int, kind: str) -> bool:
        asked.append((channel, kind))
        return channel == 1 and kind == "output"

    part = list(read_frames(path, key_lookup=keys, want_data=want))
    assert part == [f for f in full if f.kind not in DATA_KINDS or (f.channel, f.kind) == (1, "output")]
    assert asked == [(f.channel, f.kind) for f in full if f.kind in DATA_KINDS]
    assert any(f.kind == "output" and f.channel == 1 for f in part) and any(f.kind == "end" for f in part)
    # A damaged frame that is not wanted is not even read; a wanted one still fails the strict reader.
    data = path.read_bytes()
    _, spans = frame_spans(data)
    victim = next(i for i, f in enumerate(full) if (f.channel, f.kind) == (0, "input"))
    end = spans[victim][1]
    bad = tmp_path / "bad.mbr"
    bad.write_bytes(data[:end - 40] + bytes([data[end - 40] ^ 1]) + data[end - 39:])
    assert list(read_frames(bad, key_lookup=keys, want_data=lambda c, k: c != 0)) == \
        [f for f in full if f.kind not in DATA_KINDS or f.channel != 0]
    with pytest.raises(RecordingError, match=f"frame {victim + 1}: hash mismatch"):
        list(read_frames(bad, key_lookup=keys, want_data=lambda c, k: c == 0))


# ---------------------------------------------------------------- follow mode


def test_follow_reads_while_another_thread_writes(tmp_path: Path) -> None:
    path = tmp_path / "live.mbr"
    w = RecordingWriter(path, HEADER, clock=FakeClock(), aead_key=KEY, key_id="k1")
    w.append_data(0, "output", b"first")
    w.drain(timeout=10)
    first_seen, errors = threading.Event(), []

    def produce() -> None:
        try:
            assert first_seen.wait(timeout=10)
            for i in range(100):
                w.append_data(0, "output", f"line {i}\r\n".encode())
                if i % 10 == 0:
                    w.drain(timeout=10)
            w.close("done")
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            w.close()

    t = threading.Thread(target=produce)
    t.start()
    got = []
    for frame in read_frames(path, key_lookup=keys, follow=True, timeout=30, poll_interval=0.005):
        got.append(frame)
        first_seen.set()
    t.join(timeout=30)
    assert errors == [] and not t.is_alive()
    # the fake clock stands still, so lines queued together share a frame (COALESCE_NS); drains every 10 lines
    assert b"".join(f.payload for f in got[1:-1]) == b"".join(f"line {i}\r\n".encode() for i in range(100))
    assert len(got) >= 12 and got[-1].kind == "end" and [f.seq for f in got] == list(range(1, len(got) + 1))


def test_follow_stops_when_the_writer_is_gone(sample: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, final, data = sample
    _, spans = frame_spans(data)
    dead = tmp_path / "dead.mbr"
    dead.write_bytes(data[:spans[-1][0] + 10])  # crashed writer: no end frame, torn tail, no lock held
    sleeps: list[float] = []
    frames = list(read_frames(dead, follow=True, timeout=30, sleep=sleeps.append))
    assert len(frames) == 20 and sleeps == []


def test_follow_stop_condition_and_bounds(tmp_path: Path) -> None:
    w = write_sample(tmp_path / "live.mbr", close=False)
    assert isinstance(w, RecordingWriter)
    w.drain(timeout=10)
    polls: list[float] = []
    frames = list(read_frames(w.path, follow=True, stop=lambda: len(polls) >= 3, sleep=polls.append,
                              poll_interval=0.25))
    assert len(frames) == 20 and polls == [0.25, 0.25, 0.25]
    with pytest.raises(UsageError, match="needs stop= or timeout="):
        next(read_frames(w.path, follow=True))
    w.close()


# ---------------------------------------------------------------- failures and flow control


def test_disk_full_at_start_fails_clearly() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is missing")
    with pytest.raises(RecordingError, match="No space left on device") as info:
        RecordingWriter("/dev/full", HEADER, clock=FakeClock())
    assert isinstance(info.value.__cause__, OSError)


def test_unwritable_path_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(RecordingError, match="cannot create recording .*Not a directory"):
        RecordingWriter(tmp_path / "plain-file" / "s.mbr", HEADER, clock=FakeClock())


def _fifo(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    return path, reader


def test_write_failure_in_the_writer_thread_surfaces(tmp_path: Path) -> None:
    path, reader = _fifo(tmp_path)
    errors: list[BaseException] = []
    reported = threading.Event()

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        reported.set()

    w = RecordingWriter(path, HEADER, clock=FakeClock(), on_error=on_error)
    os.close(reader)  # the "disk" goes away: writes now fail with EPIPE
    w.append_data(0, "output", b"lost")
    assert reported.wait(timeout=10)
    assert w.failed is errors[0] and isinstance(w.failed, RecordingError)
    assert "write failed" in str(w.failed) and isinstance(w.failed.__cause__, BrokenPipeError)
    assert w.append_data(0, "output", b"more") == 0 and w.dropped_frames == 1
    for _ in range(2):
        with pytest.raises(RecordingError, match="write failed") as info:
            w.close()
        assert info.value is errors[0]
    assert len(errors) == 1


_SMALL_DISK = """
import resource, signal, sys
from broker.clock import SystemClock
from sessions.recwriter import RecordingWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
w = RecordingWriter(sys.argv[1], {"session_id": "full"}, clock=SystemClock())
for i in range(100):
    w.append_data(0, "output", bytes([65 + i % 26]) * 3000)
    w.drain(timeout=10)
try:
    w.close()
except Exception as exc:
    print(type(exc).__name__, exc, "| cause:", type(exc.__cause__).__name__, "| dropped", w.dropped_frames > 0)
"""


def test_volume_full_mid_session_keeps_a_sealable_prefix(tmp_path: Path) -> None:
    path = tmp_path / "full.mbr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _SMALL_DISK, str(path)], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert out.startswith("RecordingError recording ") and "File too large" in out
    assert out.strip().endswith("| cause: OSError | dropped True")
    result = verify_recording(path)
    assert result.ok and result.incomplete and 0 < path.stat().st_size <= 65536
    final, dropped = seal_recording(path)
    assert dropped == result.torn_tail_bytes and verify_recording(path, expected_final_hash=final).ok


def test_backpressure_pauses_and_resumes(tmp_path: Path) -> None:
    path, reader = _fifo(tmp_path)
    os.set_blocking(reader, True)
    pauses, resumed = [], threading.Event()
    w = RecordingWriter(path, HEADER, clock=FakeClock(), high_water=256 << 10, low_water=64 << 10,
                        max_pending=4 << 20, on_pause=lambda: pauses.append(w.pending_bytes),
                        on_resume=resumed.set)
    chunk = os.urandom(32 << 10)
    for _ in range(100):  # the pipe holds 64 KiB and nobody reads: the backlog must grow to high water
        w.append_data(0, "output", chunk)
        if w.paused:
            break
    assert w.paused and len(pauses) == 1 and w.pending_bytes >= 256 << 10
    received = bytearray()

    def drain_pipe() -> None:
        while block := os.read(reader, 1 << 16):
            received.extend(block)

    t = threading.Thread(target=drain_pipe)
    t.start()
    try:
        assert resumed.wait(timeout=10) and w.drain(timeout=10)
        assert not w.paused and w.pending_bytes == 0
        final = w.close()
    finally:
        t.join(timeout=10)
        os.close(reader)
    copy = tmp_path / "copy.mbr"
    copy.write_bytes(bytes(received))
    assert verify_recording(copy, expected_final_hash=final).ok


def test_backlog_over_the_limit_fails_instead_of_growing(tmp_path: Path) -> None:
    path, reader = _fifo(tmp_path)
    errors: list[BaseException] = []
    w = RecordingWriter(path, HEADER, clock=FakeClock(), high_water=128 << 10, low_water=0,
                        max_pending=256 << 10, on_error=errors.append)
    for _ in range(100):
        if w.append_data(0, "output", b"z" * (32 << 10)) == 0:
            break
    assert w.failed is not None and "backlog over 262144 bytes" in str(w.failed) and errors == [w.failed]
    assert w.pending_bytes == 0 and w.dropped_frames == 1
    os.close(reader)  # unblock the writer thread's pending write so close() can finish
    with pytest.raises(RecordingError, match="backlog"):
        w.close()


# ---------------------------------------------------------------- fuzz


def _base(encrypted: bool) -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        path = Path(tmp) / "base.mbr"
        final = write_sample(path, frames=6, encrypted=encrypted)
        return path.read_bytes(), str(final)


_BASES = {False: _base(False), True: _base(True)}
_mutations = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(0, 0)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 200)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=40)),
), min_size=1, max_size=4)


def _mutate(data: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    for how, at, arg in mutations:
        at = at % (len(data) + 1)
        if how == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ arg]) + data[at + 1:]
        elif how == "cut":
            data = data[:at]
        elif how == "delete":
            data = data[:at] + data[at + arg:]
        elif how == "insert":
            data = data[:at] + arg + data[at:]
    return data


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encrypted=st.booleans(), mutations=_mutations, noise=st.one_of(st.none(), st.binary(max_size=300)))
def test_fuzz_readers_only_raise_recording_error(encrypted: bool, mutations: list[tuple[str, int, Any]],
                                                 noise: bytes | None) -> None:
    base, base_final = _BASES[encrypted]
    data = noise if noise is not None else _mutate(base, mutations)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        path = Path(tmp) / "fuzz.mbr"
        path.write_bytes(data)
        for strict in (True, False):
            try:
                for frame in read_frames(path, key_lookup=keys, strict=strict):
                    assert frame.kind in KINDS
            except RecordingError:
                pass
        try:
            assert isinstance(read_header(path), dict)
        except RecordingError:
            pass
        result = verify_recording(path, key_lookup=keys)
        if data != base:  # any change shows as a problem, an incomplete file or another final hash
            assert not (result.ok and not result.incomplete and result.final_hash == base_final)
        try:
            final, _ = seal_recording(path)
        except RecordingError:
            return
        after = verify_recording(path, expected_final_hash=final)
        assert after.ok and not after.incomplete


def test_errors_are_broker_errors() -> None:
    assert issubclass(RecordingError, BrokerError)
    with pytest.raises(RecordingError, match="cannot open recording"):
        verify_recording("/nonexistent/x.mbr")
    with pytest.raises(RecordingError, match="cannot open recording"):
        list(read_frames("/nonexistent/x.mbr"))
