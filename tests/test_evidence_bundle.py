"""The evidence bundle reader against hostile archives: path traversal, links, devices, duplicate names, huge or
cut-short members, compressed or random files. Each is a clean error naming the member (exit 1 from the CLI),
and nothing is written anywhere but the reader's own temporary directory, which is removed."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from broker.bundle import MAX_METADATA, MAX_RECORDING, BundleError, check_member_name, read_bundle

REPO = Path(__file__).resolve().parent.parent
P = "medbroker-evidence/"


def _tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"{}") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The reader's temporary directories go here; the test checks it is empty afterwards."""
    d = tmp_path / "scratch"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    monkeypatch.chdir(tmp_path)
    return d


def _refused(path: Path, scratch: Path, *needles: str) -> str:
    before = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(BundleError) as err:
        read_bundle(path)
    text = str(err.value)
    for needle in needles:
        assert needle in text, text
    assert list(scratch.iterdir()) == [], "the temporary copies are removed"
    assert sorted(p.name for p in path.parent.iterdir()) == before, "nothing was written beside the bundle"
    return text


@pytest.mark.parametrize("name", [
    "../escape.json", "/tmp/escape.json", P + "recordings/../../escape.mbr", P + "recordings/a\\b.mbr",
    P + "db/../../escape.json", P + "manifest.json/../../escape", "medbroker-evidence/../escape.mbr",
    P + "recordings/.hidden.mbr", P + "recordings/x.mbr\n", P + "recordings/x.sh", P + "recordings//x.mbr",
    "escape.json", P + "db/other.json", P + "recordings/" + "a/" * 6 + "x.mbr",
])
def test_names_a_bundle_cannot_hold_are_refused(tmp_path, scratch, name):
    bundle = _tar(tmp_path / "b.tar", [_file(P + "README.txt", b"hi"), _file(name)])
    _refused(bundle, scratch, "is not a member an evidence bundle can hold")
    assert not (tmp_path.parent / "escape.json").exists() and not Path("/tmp/escape.json").exists()
    with pytest.raises(BundleError):
        check_member_name(name)


@pytest.mark.parametrize("kind,words", [
    (tarfile.SYMTYPE, "is a symbolic link"), (tarfile.LNKTYPE, "is a hard link"), (tarfile.DIRTYPE, "is a directory"),
    (tarfile.FIFOTYPE, "not a regular file"), (tarfile.CHRTYPE, "not a regular file"),
])
def test_links_directories_and_devices_are_refused(tmp_path, scratch, kind, words):
    name = P + "recordings/20261207-000000-aaaaaa.mbr"
    bundle = _tar(tmp_path / "b.tar", [_file(P + "README.txt", b"hi"), _special(name, kind, "/etc/passwd")])
    _refused(bundle, scratch, name, words)


def test_a_link_followed_by_a_member_through_it_writes_nothing_outside(tmp_path, scratch):
    """The classic: a symlink ``recordings`` to / and then ``recordings/etc/x.mbr``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    bundle = _tar(tmp_path / "b.tar", [_special(P + "recordings", tarfile.SYMTYPE, str(outside)),
                                       _file(P + "recordings/x.mbr", b"MEDBREC\x00")])
    _refused(bundle, scratch)
    assert list(outside.iterdir()) == []


def test_a_name_twice_is_refused(tmp_path, scratch):
    bundle = _tar(tmp_path / "b.tar", [_file(P + "manifest.json", b"{}"), _file(P + "manifest.json", b"[]")])
    _refused(bundle, scratch, f"{P}manifest.json appears twice")


@pytest.mark.parametrize("name,size,words", [
    (P + "audit/events.jsonl", MAX_METADATA + 1, "allowed for it"),
    (P + "recordings/x.mbr", MAX_RECORDING + 1, "allowed for it"),
    (P + "recordings/x.mbr", 10 << 20, "the file ends before that"),
    (P + "db/sessions.json", 1 << 40, "allowed for it"),
])
def test_huge_or_cut_short_members_are_refused_before_copying(tmp_path, scratch, name, size, words):
    """Only a header claiming the size is written: nothing of that size exists, and nothing is copied."""
    info = tarfile.TarInfo(name)
    info.size = size
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(info.tobuf(tarfile.PAX_FORMAT) + b"x" * 4096)
    _refused(bundle, scratch, name, words)


@pytest.mark.parametrize("make", ["gzip", "empty", "random", "text", "zip"])
def test_files_that_are_not_uncompressed_tars_are_refused(tmp_path, scratch, make):
    plain = _tar(tmp_path / "p.tar", [_file(P + "README.txt", b"hello")])
    bundle = tmp_path / "b.tar"
    if make == "gzip":
        bundle.write_bytes(gzip.compress(plain.read_bytes()))
    elif make == "empty":
        bundle.write_bytes(b"")
    elif make == "random":
        bundle.write_bytes(os.urandom(10240))
    elif make == "text":
        bundle.write_text("not a bundle\n" * 100)
    else:
        import zipfile

        with zipfile.ZipFile(bundle, "w") as z:
            z.writestr(P + "README.txt", "hello")
    plain.unlink()
    _refused(bundle, scratch)


def test_a_valid_looking_archive_is_copied_to_files_the_reader_names(tmp_path, scratch):
    bundle = _tar(tmp_path / "b.tar", [_file(P + "README.txt", b"hello"),
                                       _file(P + "recordings/2026/12/x.mbr", b"MEDBREC\x00")])
    with read_bundle(bundle) as contents:
        assert sorted(contents.files) == [P + "README.txt", P + "recordings/2026/12/x.mbr"]
        assert all(p.parent.parent == scratch for p in contents.files.values())
        assert contents.read(P + "README.txt") == b"hello"
    assert list(scratch.iterdir()) == []


def test_the_cli_reports_a_hostile_bundle_in_one_line_and_exits_1(tmp_path):
    bundle = _tar(tmp_path / "b.tar", [_file("../../escape.json")])
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-m", "broker.cli", "audit", "verify", "--bundle", str(bundle)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("Error: bundle member '../../escape.json' is not a member an evidence bundle can hold")
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar"]


def test_a_recording_key_opens_its_own_recording_and_no_other(tmp_path):
    """What --include-data-key ships: the HKDF-derived key of one recording, not the data key."""
    from broker.clock import FakeClock
    from broker.errors import RecordingError
    from sessions.recformat import RecordingKey, recording_key
    from sessions.recording import read_frames, read_header, verify_recording
    from sessions.recwriter import RecordingWriter

    data_key = os.urandom(32)
    paths = {}
    for sid in ("s-one", "s-two"):
        w = RecordingWriter(tmp_path / f"{sid}.mbr", {"session_id": sid}, clock=FakeClock(), aead_key=data_key,
                            key_id="k1")
        w.append_data(1, "output", f"secret of {sid}".encode())
        w.close()
        paths[sid] = tmp_path / f"{sid}.mbr"

    def key_of(sid: str) -> RecordingKey:
        enc = read_header(paths[sid])["encryption"]
        return recording_key(data_key, bytes.fromhex(enc["salt"]), sid)

    one = key_of("s-one")
    assert len(one) == 40 and data_key not in one and one != key_of("s-two")
    frames = list(read_frames(paths["s-one"], key_lookup=lambda _id: one))
    assert b"secret of s-one" in b"".join(f.payload for f in frames if f.kind == "output")
    with pytest.raises(RecordingError, match="wrong key for this recording"):
        list(read_frames(paths["s-two"], key_lookup=lambda _id: one))
    assert verify_recording(paths["s-one"], key_lookup=lambda _id: one).ok
    assert not verify_recording(paths["s-two"], key_lookup=lambda _id: one).ok
