"""Patient data never leaves over SFTP: real OpenSSH sftp, paramiko, asyncssh and raw SFTP through the real broker.

One broker and one real sshd device (the fixture tree; data/dicom, var/spool/hl7 and opt/lis/data
protected) are shared by the module; every test uses its own names on the device and its own local
directory. Assertions are on what the vendor got (local files, stderr), on the device (file hashes,
its sftp-server request log) and on the records (audit rows, file_transfers, the recording).
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import asyncssh
import pytest

from helpers.clients import run_sftp_batch
from sessions.sftp_codec import (
    FX_OK, FX_OP_UNSUPPORTED, FX_PERMISSION_DENIED, FXF_APPEND, FXF_CREAT, FXF_READ, PacketReader, frame, init_packet,
    parse_reply, string, u32,
)
from transfer_support import PATIENT_MARKERS, Transfers, make_transfer_world, patient_bytes_in, sha256, wait

pytestmark = pytest.mark.openssh

FXP_OPEN, FXP_CLOSE, FXP_READ, FXP_OPENDIR, FXP_READDIR, FXP_REALPATH, FXP_SYMLINK, FXP_EXTENDED = (
    3, 4, 5, 11, 12, 16, 20, 200)


@pytest.fixture(scope="module")
def t(tmp_path_factory) -> Transfers:
    world = make_transfer_world(tmp_path_factory.mktemp("sftp-e2e"))
    try:
        yield world
        world.assert_device_untouched()
    finally:
        world.world.close()
        world.device.close()


def _firmware(size: int, seed: int) -> bytes:
    """Deterministic bytes with no patient-data marker in them."""
    data = random.Random(seed).randbytes(size)
    for marker in PATIENT_MARKERS:
        data = data.replace(marker, b"\0" * len(marker))
    return data


def _no_patient_bytes_recorded(t: Transfers, known: set[str], n: int = 1) -> list[dict]:
    rows = t.finished_sessions(known, n)
    for row in rows:
        sent = b"".join(f.payload for f in t.frames(row) if f.kind in ("output", "stderr"))
        assert not [m for m in PATIENT_MARKERS if m in sent], "patient data reached the vendor's channel"
    return rows


def test_sftp_maintenance_transfers_work_and_are_recorded(t, tmp_path):
    known, mark = t.session_ids(), t.last_event_id()
    fw = tmp_path / "fw-5.0.1.bin"
    fw.write_bytes(_firmware(700_000, 1))
    log, vlog = t.path("service/logs/system.log"), t.path("var/log/vendor/service.log")
    r = t.sftp(f"ls service\nget {log} {tmp_path}/system.log\nget var/log/vendor/service.log {tmp_path}/service.log\n"
               f"put {fw} service/firmware/fw-5.0.1.bin\nls -l service/firmware\n")
    assert r.returncode == 0, r.stderr
    assert b"medbroker" not in r.stderr
    assert b"logs" in r.stdout and b"firmware" in r.stdout and b"fw-5.0.1.bin" in r.stdout
    assert (tmp_path / "system.log").read_bytes() == log.read_bytes()
    assert (tmp_path / "service.log").read_bytes() == vlog.read_bytes()
    uploaded = t.path("service/firmware/fw-5.0.1.bin")
    assert uploaded.read_bytes() == fw.read_bytes()

    rows = {(e["details"]["path"], e["details"]["direction"]): e["details"]
            for e in t.wait_events(mark, "transfer.file", 3)}
    down = rows[(str(log), "download")]
    assert (down["bytes"], down["sha256"], down["outcome"]) == (len(log.read_bytes()), sha256(log.read_bytes()), "ok")
    assert down["started_at"] <= down["ended_at"] and down["sequential"] is True
    up = rows[(str(uploaded), "upload")]
    assert (up["bytes"], up["sha256"], up["outcome"]) == (len(fw.read_bytes()), sha256(fw.read_bytes()), "ok")
    session = _no_patient_bytes_recorded(t, known)[0]
    # keep_uploads: a copy named by its sha256, beside a note naming the device path
    kept = Path(up["kept"])
    assert kept.parent == t.world.app.config.home / "uploads" / session["id"] and kept.name == up["sha256"]
    wait(lambda: kept.exists() and kept.with_suffix(".json").exists())
    assert kept.read_bytes() == fw.read_bytes()
    assert json.loads(kept.with_suffix(".json").read_text())["device_path"] == str(uploaded)

    stored = t.world.app.store.transfers(session["id"])
    assert {(x["path"], x["direction"], x["sha256"], x["outcome"]) for x in stored} == {
        (str(log), "download", down["sha256"], "ok"), (str(vlog), "download", sha256(vlog.read_bytes()), "ok"),
        (str(uploaded), "upload", up["sha256"], "ok")}
    framed = [f.event() for f in t.frames(session) if f.kind == "file-transfer"]
    assert {(e["path"], e["sha256"]) for e in framed} == {(x["path"], x["sha256"]) for x in stored}
    # what staff see: sessions show --json and export --format json
    shown = json.loads(t.cli("sessions", "show", session["id"], "--json"))
    assert {x["sha256"] for x in shown["transfers"]} == {x["sha256"] for x in stored}
    assert up["sha256"] in t.cli("sessions", "show", session["id"])
    out = tmp_path / "export.json"
    t.cli("export", session["id"], "--format", "json", "-o", str(out))
    exported = [f["event"] for f in json.loads(out.read_text())["frames"] if f["kind"] == "file-transfer"]
    assert {e["sha256"] for e in exported} == {x["sha256"] for x in stored}


def test_a_resumed_download_says_what_its_hash_covers(t, tmp_path):
    """`reget` continues a download at the size of the local partial file: the broker sees only the rest, and
    the record says so (offset, range, partial) instead of passing the hash of a part for the file's."""
    fw = t.path("opt/vendor/firmware/fw-4.2.1.bin")
    data = fw.read_bytes()
    half = len(data) // 2
    (tmp_path / "fw.bin").write_bytes(data[:half])
    known, mark = t.session_ids(), t.last_event_id()
    r = t.sftp(f"reget opt/vendor/firmware/fw-4.2.1.bin {tmp_path}/fw.bin\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fw.bin").read_bytes() == data
    rec = t.wait_events(mark, "transfer.file")[0]["details"]
    assert rec["bytes"] == len(data) - half and rec["sha256"] == sha256(data[half:])
    assert rec["partial"] is True and rec["offset"] == half and rec["sequential"] is False
    assert f"bytes {half}..{len(data)}" in rec["covers"] and "not of the whole file" in rec["covers"]
    session = t.finished_sessions(known)[0]
    shown = json.loads(t.cli("sessions", "show", session["id"], "--json"))["transfers"][0]
    assert json.loads(shown["details"])["covers"] == rec["covers"]
    assert "partial" in " ".join(t.cli("sessions", "show", session["id"]).split())


def test_sftp_reads_of_protected_paths_are_refused_however_they_are_named(t, tmp_path):
    known, mark, log_mark = t.session_ids(), t.last_event_id(), t.sftp_log_mark()
    dicom = t.device.tree.patient["dicom_file"]
    rel = dicom.relative_to(t.root)
    r = t.sftp("\n".join([
        f"lcd {tmp_path}",
        f"-get {dicom}",                                      # absolute
        f"-get {rel}",                                        # relative to the login's home
        f"-get tmp/../{rel.parent}/./../11//{rel.name}",      # .. . //
        f"-get {t.root}/data/dicom/2026/11/*",                # glob
        "-get -r data",                                       # recursive get of the parent
        "-get -r tmp/images",                                 # a symlink into the protected tree
        f"-get tmp/images/2026/11/{rel.name}",
        "-get var/spool/hl7/adt_a01.hl7",
        "-get opt/lis/data/result.txt",
        "-ls data/dicom",
        "-ls -l tmp/images/",
        "-cd data/dicom",
        "-df data/dicom",
        "ls -l data",                                         # listing the parent is ordinary
    ]) + "\n")
    assert r.returncode == 0, r.stderr
    assert b"dicom" in r.stdout.split(b"sftp> ls -l data")[1]
    assert patient_bytes_in(tmp_path) == []
    shown = r.stdout + r.stderr
    for hidden in (b"PA000000", b"IM000001", b"DICOMDIR", b"adt_a01.mllp", b"result.frames"):
        assert hidden not in shown, hidden  # nothing inside a protected directory was listed
    reasons = [line for line in r.stderr.splitlines() if line.startswith(b"medbroker: ")]
    assert len(reasons) >= 12 and all(b"protected patient-data directory" in line for line in reasons)
    t.assert_no_device_access(log_mark)
    denied = t.wait_events(mark, "sftp.denied", 12)
    assert {e["details"]["op"] for e in denied} >= {"opendir", "stat", "lstat", "statvfs", "realpath"}
    assert all(any(e["details"]["path"].startswith(str(p)) for p in t.protected) for e in denied)
    session = _no_patient_bytes_recorded(t, known)[0]
    frames = [f.event() for f in t.frames(session) if f.kind == "policy-denial"]
    assert len(frames) == len(t.events_since(mark, "sftp.denied")) and all("protected patient-data directory" in f["reason"] for f in frames)


def test_sftp_patient_data_outside_protected_dirs_is_refused_by_content(t, tmp_path):
    known, mark = t.session_ids(), t.last_event_id()
    disguised = {"tmp/report.pdf": "DICOM", "tmp/export.raw": "DICOM", "tmp/dual.tif": "DICOM",
                 "tmp/messages.txt": "HL7v2", "tmp/adt.mllp": "HL7v2", "tmp/results.log": "ASTM"}
    r = t.sftp(f"lcd {tmp_path}\n" + "".join(f"-get {p}\n-reget {p}\n" for p in disguised)
               + "get service/logs/system.log\n")
    assert r.returncode == 0, r.stderr
    assert patient_bytes_in(tmp_path) == []
    assert (tmp_path / "system.log").exists()  # the session goes on after each refusal
    for path, kind in disguised.items():
        assert f"{t.path(path)} on ct-01 contains {kind} patient data".encode() in r.stderr
    denied = t.wait_events(mark, "sftp.denied", len(disguised))
    assert {(e["details"]["path"], e["details"].get("content")) for e in denied} >= {
        (str(t.path(p)), kind) for p, kind in disguised.items()}
    _no_patient_bytes_recorded(t, known)


def test_sftp_namespace_and_attribute_tricks_leave_the_device_untouched(t, tmp_path):
    mark, log_mark = t.last_event_id(), t.sftp_log_mark()
    dicom = t.device.tree.patient["dicom_file"]
    local = tmp_path / "payload.bin"
    local.write_bytes(b"not patient data\n")
    r = t.sftp("\n".join([
        f"-rename {dicom} tmp/ns-out.dcm",                    # posix-rename out of the tree
        "-rename data tmp/ns-data",                           # move the whole parent
        "-rename tmp/images/2026 tmp/ns-2026",                # through the symlink
        f"-ln {dicom} tmp/ns-hard.dcm",                       # hardlink out
        "-ln service/logs/system.log data/dicom/ns-in.log",   # hardlink in
        f"-ln -s {dicom} tmp/ns-soft.dcm",                    # symlink pointing in
        "-ln -s ../data/dicom tmp/ns-soft-dir",               # relative symlink pointing in
        "-ln -s /etc/hostname data/dicom/ns-link",            # symlink created inside
        f"-chmod 666 {dicom}", f"-chown 0 {dicom}", f"-chgrp 0 {dicom}",
        "-chmod 777 tmp/images",                              # setstat through the symlink
        f"-put {local} data/dicom/ns-up.bin", f"-put {local} tmp/images/ns-up.bin",
        "-mkdir data/dicom/ns-dir", "-mkdir tmp/images/ns-dir",
        "-rmdir data/dicom/2026/11", f"-rm {dicom}", f"-rm tmp/images/2026/11/{dicom.name}",
    ]) + "\n")
    assert r.returncode == 0, r.stderr
    reasons = [line for line in r.stderr.splitlines() if line.startswith(b"medbroker: ")]
    assert len(reasons) >= 19, r.stderr
    t.assert_device_untouched()
    assert not [p for p in t.path("tmp").iterdir() if p.name.startswith("ns-")]
    t.assert_no_device_access(log_mark)
    ops = {e["details"]["op"] for e in t.wait_events(mark, "sftp.denied", 19)}
    assert ops >= {"posix-rename", "hardlink", "symlink", "setstat", "open", "mkdir", "rmdir", "remove"}


def test_paramiko_sftp_client_gets_the_same_answers(t, tmp_path):
    mark, log_mark = t.last_event_id(), t.sftp_log_mark()
    dicom, log = str(t.device.tree.patient["dicom_file"]), t.path("service/logs/system.log")
    fw = tmp_path / "fw-paramiko.bin"
    fw.write_bytes(_firmware(300_000, 2))
    with t.paramiko() as client, client.open_sftp() as sftp:
        sftp.get(str(log), str(tmp_path / "system.log"))
        sftp.put(str(fw), "service/firmware/fw-paramiko.bin")
        assert {"logs", "firmware"} <= set(sftp.listdir("service"))
        assert "dicom" in sftp.listdir("data")
        attempts = {
            "get": lambda: sftp.get(dicom, str(tmp_path / "x.dcm")),
            "open": lambda: sftp.open(dicom).read(),
            "listdir": lambda: sftp.listdir(str(t.protected[0])),
            "listdir-link": lambda: sftp.listdir("tmp/images"),
            "stat": lambda: sftp.stat(dicom), "lstat": lambda: sftp.lstat(dicom),
            "normalize": lambda: sftp.normalize("tmp/images/2026"),
            "rename": lambda: sftp.rename(dicom, "tmp/pm-out.dcm"),
            "posix-rename": lambda: sftp.posix_rename(dicom, "tmp/pm-out.dcm"),
            "symlink": lambda: sftp.symlink(dicom, "tmp/pm-link"),
            "chmod": lambda: sftp.chmod(dicom, 0o666), "utime": lambda: sftp.utime(dicom, (1, 1)),
            "truncate": lambda: sftp.truncate(dicom, 0),
            "put": lambda: sftp.put(str(fw), "data/dicom/pm.bin"),
            "remove": lambda: sftp.remove(dicom), "mkdir": lambda: sftp.mkdir("data/dicom/pm"),
            "rmdir": lambda: sftp.rmdir("data/dicom/2026/11"),
            "disguised-dicom": lambda: sftp.open("tmp/report.pdf").read(),
            "bare-dicom": lambda: sftp.open("tmp/export.raw").read(),
            "hl7": lambda: sftp.open("tmp/messages.txt").read(),
            "astm": lambda: sftp.open("tmp/results.log").read(),
            "device-node": lambda: sftp.open("/dev/zero").read(4096),
        }
        for name, attempt in attempts.items():
            with pytest.raises(PermissionError) as info:
                attempt()
            assert "medbroker" in str(info.value) or "patient data" in str(info.value), name
        assert "regular file" in _refusal(lambda: sftp.open("/dev/zero").read(4096))
    assert (tmp_path / "system.log").read_bytes() == log.read_bytes()
    assert t.path("service/firmware/fw-paramiko.bin").read_bytes() == fw.read_bytes()
    assert not (tmp_path / "x.dcm").exists() or patient_bytes_in(tmp_path) == []
    t.assert_device_untouched()
    t.assert_no_device_access(log_mark)
    assert len(t.wait_events(mark, "sftp.denied", len(attempts))) >= len(attempts)


def _refusal(attempt) -> str:
    try:
        attempt()
    except PermissionError as exc:
        return str(exc)
    raise AssertionError("not refused")


class _RawSftp:
    """SFTP by hand over a paramiko channel: send any packet, read the answer."""

    def __init__(self, client) -> None:
        self.chan = client.get_transport().open_session(timeout=15)
        self.chan.settimeout(15)
        self.chan.invoke_subsystem("sftp")
        self.reader = PacketReader(1 << 20)
        self.packets: list[bytes] = []
        self.next_id = 0
        self.chan.sendall(init_packet(3))
        self.version = self.recv()

    def recv(self):
        while not self.packets:
            data = self.chan.recv(65536)
            assert data, "channel closed"
            self.packets += self.reader.feed(data)
        return parse_reply(self.packets.pop(0))

    def request(self, ptype: int, body: bytes):
        self.next_id += 1
        self.chan.sendall(frame(ptype, u32(self.next_id) + body))
        reply = self.recv()
        assert reply.id == self.next_id
        return reply

    def open(self, path: str, pflags: int):
        return self.request(FXP_OPEN, string(path.encode()) + u32(pflags) + u32(0))

    def extended(self, name: bytes, args: bytes = b""):
        return self.request(FXP_EXTENDED, string(name) + args)


def test_raw_sftp_requests_a_stock_client_would_not_send_are_judged_too(t):
    mark, log_mark = t.last_event_id(), t.sftp_log_mark()
    log = t.path("service/logs/system.log")
    with t.paramiko() as client:
        raw = _RawSftp(client)
        names = [name for name, _ in (raw.version.extensions or ())]
        assert b"copy-data" not in names and b"posix-rename@openssh.com" in names
        # OpenSSH's sftp-server opens read-only when neither READ nor WRITE is set: still content-checked
        for pflags in (0, FXF_APPEND, FXF_CREAT, FXF_READ):
            reply = raw.open("tmp/report.pdf", pflags)
            assert (reply.op, reply.code) == ("status", FX_PERMISSION_DENIED), pflags
            assert b"DICOM patient data" in reply.message
        assert raw.open(str(t.protected[0] / "2026/11/study-0001.dcm"), 0).code == FX_PERMISSION_DENIED
        handle = raw.open(str(log), 0).handle
        data = raw.request(FXP_READ, string(handle) + u32(0) + u32(0) + u32(4096))
        assert data.data == log.read_bytes()[:4096]
        assert raw.request(FXP_CLOSE, string(handle)).code == FX_OK
        copy = raw.extended(b"copy-data", string(b"h1") + bytes(16) + string(b"h2") + bytes(8))
        assert copy.code == FX_PERMISSION_DENIED and b"copy-data" in copy.message
        assert raw.extended(b"check-file-name", string(b"tmp/report.pdf")).code == FX_OP_UNSUPPORTED
        assert raw.request(FXP_REALPATH, string(b"tmp/images")).code == FX_PERMISSION_DENIED
        expanded = raw.extended(b"expand-path@openssh.com", string(b"~/data/dicom"))
        assert expanded.code in (FX_PERMISSION_DENIED, FX_OP_UNSUPPORTED)
        for args in ((b"tmp/raw-link", b"../data/dicom"), (b"../data/dicom", b"tmp/raw-link")):
            assert raw.request(FXP_SYMLINK, string(args[0]) + string(args[1])).code == FX_PERMISSION_DENIED
        handle = raw.request(FXP_OPENDIR, string(b"data")).handle
        listed = raw.request(FXP_READDIR, string(handle))
        assert b"dicom" in [n.filename for n in listed.names]
        raw.chan.close()
    assert not t.path("tmp/raw-link").exists()
    t.assert_no_device_access(log_mark)
    assert t.wait_events(mark, "sftp.denied", 10)


def test_asyncssh_client_cannot_copy_on_the_device(t):
    async def attempt() -> str:
        async with asyncssh.connect("127.0.0.1", t.world.port, username=t.login, known_hosts=None, config=None,
                                    client_keys=[str(t.world.keys["alice"].private_path)], agent_path=None) as conn:
            async with conn.start_sftp_client() as sftp:
                try:
                    await sftp.remote_copy("tmp/report.pdf", "tmp/ac-copy.pdf")
                except asyncssh.SFTPError as exc:
                    return type(exc).__name__
                return "copied"

    assert asyncio.run(asyncio.wait_for(attempt(), 60)) in ("SFTPOpUnsupported", "SFTPPermissionDenied")
    assert not t.path("tmp/ac-copy.pdf").exists()


def test_other_channels_to_the_same_files(t, tmp_path):
    log = t.path("service/logs/system.log")
    r = t.ssh(f"cat {log}")
    assert r.returncode == 0 and r.stdout == log.read_bytes()
    r = t.ssh(f"cat {t.device.tree.patient['dicom_file']}")
    assert r.returncode == 1 and b"protected" in r.stderr and not [m for m in PATIENT_MARKERS if m in r.stdout]
    # the SFTP server run as an exec command would skip the SFTP filter: refused with a reason
    r = run_sftp_batch(f"lcd {tmp_path}\nget tmp/report.pdf\n", t.login, "127.0.0.1", t.world.port,
                       t.world.keys["alice"].private_path, known_hosts=t.world.known_hosts,
                       extra_opts=["-s", "/usr/lib/openssh/sftp-server"], timeout=60)
    assert r.returncode != 0 and b"sftp -s" in r.stderr
    assert patient_bytes_in(tmp_path) == []
    r = t.ssh("rsync --server --sender -vlogDtprze.iLsfxC . tmp/")
    assert r.returncode == 1 and b"rsync is not available" in r.stderr and r.stdout == b""
    # a reverse tunnel the device could push files through is refused too
    r = t.ssh("true", extra_opts=["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22"])
    assert r.returncode == 255 and b"forwarding failed" in r.stderr
