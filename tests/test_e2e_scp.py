"""Patient data never leaves over scp: OpenSSH scp in SFTP mode and legacy ``scp -O`` through the real broker.

Legacy scp is served by the broker itself (sessions/scp.py) over the device's SFTP: the device never
runs an ``scp`` command (its sshd log shows no exec session), every path goes through the same policy
as SFTP, and refusals arrive in the SCP error record, which OpenSSH's scp prints. The module shares
one broker and one real sshd device (see tests/transfer_support.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers.clients import paramiko_exec
from transfer_support import PATIENT_MARKERS, Transfers, make_transfer_world, patient_bytes_in, sha256, wait

pytestmark = pytest.mark.openssh


@pytest.fixture(scope="module")
def t(tmp_path_factory) -> Transfers:
    world = make_transfer_world(tmp_path_factory.mktemp("scp-e2e"))
    try:
        yield world
        world.assert_device_untouched()
        # legacy scp never ran on the device: every channel there was the broker's own SFTP
        assert "Starting session: command" not in world.device.log_text()
    finally:
        world.world.close()
        world.device.close()


def _payload(size: int) -> bytes:
    block = bytes(range(256)) * 16
    return (b"FWIMG\x01" + block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("legacy", [True, False], ids=["scp-O", "scp-sftp"])
def test_scp_maintenance_both_ways(t, tmp_path, legacy):
    tag = "o" if legacy else "s"
    mark, known = t.last_event_id(), t.session_ids()
    log = t.path("service/logs/system.log")
    fw = tmp_path / f"fw-{tag}.bin"
    fw.write_bytes(_payload(3_000_000))
    os.utime(fw, (1_700_000_000, 1_700_000_000))
    tree = tmp_path / "bundle"
    (tree / "sub").mkdir(parents=True)
    (tree / "notes.txt").write_text("service notes\n")
    (tree / "sub" / "cfg.xml").write_text("<cfg/>\n")

    r = t.scp("REMOTE:service/logs/system.log", str(tmp_path / "system.log"), legacy=legacy)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert (tmp_path / "system.log").read_bytes() == log.read_bytes()
    r = t.scp("-p", str(fw), "REMOTE:service/firmware/", legacy=legacy)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    on_device = t.path(f"service/firmware/fw-{tag}.bin")
    assert on_device.read_bytes() == fw.read_bytes() and int(on_device.stat().st_mtime) == 1_700_000_000
    r = t.scp("-r", str(tree), f"REMOTE:tmp/bundle-{tag}", legacy=legacy)
    assert r.returncode == 0, r.stderr
    assert t.path(f"tmp/bundle-{tag}/sub/cfg.xml").read_text() == "<cfg/>\n"
    r = t.scp("-r", "REMOTE:var/log/vendor", str(tmp_path / "vendor-logs"), legacy=legacy)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "vendor-logs/service.log").read_bytes() == t.path("var/log/vendor/service.log").read_bytes()

    rows = t.wait_events(mark, "transfer.file", 6)
    by = {(e["details"]["path"], e["details"]["direction"]): e["details"] for e in rows}
    assert by[(str(log), "download")]["sha256"] == sha256(log.read_bytes())
    up = by[(str(on_device), "upload")]
    assert (up["sha256"], up["bytes"], up["outcome"]) == (sha256(fw.read_bytes()), fw.stat().st_size, "ok")
    assert up["started_at"] and up["ended_at"] >= up["started_at"]
    assert up.get("protocol") == ("scp" if legacy else None)
    kept = Path(up["kept"])
    wait(lambda: kept.exists())
    assert kept.read_bytes() == fw.read_bytes()
    sessions = t.finished_sessions(known, 4)
    stored = [x for s in sessions for x in t.world.app.store.transfers(s["id"])]
    assert (str(on_device), "upload", up["sha256"]) in {(x["path"], x["direction"], x["sha256"]) for x in stored}
    framed = [f.event() for s in sessions for f in t.frames(s) if f.kind == "file-transfer"]
    assert up["sha256"] in {e["sha256"] for e in framed}
    execs = [f.event() for s in sessions for f in t.frames(s) if f.kind == "exec"]
    assert len(execs) == (4 if legacy else 0) and all(e.get("served_by") == "medbroker" for e in execs), execs


def _legacy_refusals(t: Transfers, tmp_path: Path) -> dict[str, tuple[tuple[str, ...], bytes]]:
    d = t.device.tree.patient["dicom_file"]
    rel = d.relative_to(t.root)
    up = tmp_path / "up.bin"
    up.write_bytes(b"vendor file\n")
    out = str(tmp_path / "out")
    protected = b"protected patient-data directory"
    return {
        "direct": ((f"REMOTE:{d}", out), protected),
        "relative": ((f"REMOTE:{rel}", out), protected),
        "dotdot": ((f"REMOTE:tmp/../{rel.parent}/./../11//{rel.name}", out), protected),
        "symlink": ((f"REMOTE:tmp/images/2026/11/{rel.name}", out), protected),
        "symlink-dir": (("-r", "REMOTE:tmp/images", out), protected),
        "recursive-parent": (("-r", "REMOTE:data", f"{out}-data"), protected),
        "hl7-spool": (("REMOTE:var/spool/hl7/adt_a01.hl7", out), protected),
        "lis": (("REMOTE:opt/lis/data/result.txt", out), protected),
        "glob": (("REMOTE:data/dicom/2026/11/*", out), b"does not expand wildcards"),
        "glob-class": (("REMOTE:tmp/report.pd[f]", out), b"does not expand wildcards"),
        "brace": (("REMOTE:data/{dicom,x}", out), b"shell syntax"),
        "substitution": (("REMOTE:$(printf data/dicom)", out), b"shell syntax"),
        "backquote": (("REMOTE:`echo data`/dicom", out), b"shell syntax"),
        "injection": (("REMOTE:service/logs/system.log;cat data/dicom/2026/11/study-0001.dcm", out),
                      b"shell syntax"),
        "two-paths": (("REMOTE:service/logs/system.log data/dicom/DICOMDIR", out), b"exactly one path"),
        "other-home": (("REMOTE:~root/x", out), b"another user's home"),
        "disguised": (("REMOTE:tmp/report.pdf", out), b"contains DICOM patient data"),
        "bare": (("REMOTE:tmp/export.raw", out), b"contains DICOM patient data"),
        "dual": (("REMOTE:tmp/dual.tif", out), b"contains DICOM patient data"),
        "hl7": (("REMOTE:tmp/messages.txt", out), b"contains HL7v2 patient data"),
        "astm": (("REMOTE:tmp/results.log", out), b"contains ASTM patient data"),
        "device-node": (("REMOTE:/dev/zero", out), b"not a regular file"),
        "upload-into": ((str(up), f"REMOTE:{t.protected[0]}/up.bin"), protected),
        "upload-via-link": ((str(up), "REMOTE:tmp/images/up.bin"), protected),
        "upload-dir-into": (("-r", str(tmp_path), "REMOTE:data/dicom/"), protected),
        "upload-over": ((str(up), f"REMOTE:{d}"), protected),
    }


def test_legacy_scp_refusals_say_why_and_leak_nothing(t, tmp_path):
    mark, known, log_mark = t.last_event_id(), t.session_ids(), t.sftp_log_mark()
    cases = _legacy_refusals(t, tmp_path)
    for name, (args, reason) in cases.items():
        r = t.scp(*args, legacy=True)
        assert r.returncode == 1, (name, r.stderr)
        assert reason in r.stderr and b"medbroker: " in r.stderr, (name, r.stderr)
    assert patient_bytes_in(tmp_path) == []
    t.assert_device_untouched()
    t.assert_no_device_access(log_mark)
    denied = t.wait_events(mark, "scp.denied", len(cases))
    assert {e["details"]["op"] for e in denied} >= {"open", "command", "mkdir"}
    sessions = t.finished_sessions(known, len(cases))
    for row in sessions:
        sent = b"".join(f.payload for f in t.frames(row) if f.kind in ("output", "stderr"))
        assert not [m for m in PATIENT_MARKERS if m in sent]
    assert any(f.kind == "policy-denial" for s in sessions for f in t.frames(s))


def test_scp_in_sftp_mode_is_guarded_by_the_sftp_filter(t, tmp_path):
    d = t.device.tree.patient["dicom_file"]
    for args in ((f"REMOTE:{d}", str(tmp_path)), ("REMOTE:tmp/*", str(tmp_path)), ("-r", "REMOTE:data", str(tmp_path)),
                 ("-r", "REMOTE:tmp/images", str(tmp_path / "img")),
                 ("-r", str(tmp_path), f"REMOTE:{t.protected[1]}/x")):
        r = t.scp(*args)
        assert r.returncode == 1 and b"medbroker: " in r.stderr, (args, r.stderr)
    assert patient_bytes_in(tmp_path) == []
    t.assert_device_untouched()


def test_legacy_scp_follows_the_grant_mode(t, tmp_path):
    t.add_vendor("rosa", "read-only")
    t.add_vendor("uma", "upload-only")
    up = tmp_path / "up.bin"
    up.write_bytes(b"update\n")
    r = t.scp(str(up), "REMOTE:service/firmware/ro.bin", legacy=True, user="rosa")
    assert r.returncode == 1 and b"this grant is read-only" in r.stderr
    assert not t.path("service/firmware/ro.bin").exists()
    r = t.scp("REMOTE:service/logs/system.log", str(tmp_path / "ro.log"), legacy=True, user="rosa")
    assert r.returncode == 0 and (tmp_path / "ro.log").read_bytes() == t.path("service/logs/system.log").read_bytes()
    r = t.scp("REMOTE:service/logs/system.log", str(tmp_path / "uo.log"), legacy=True, user="uma")
    assert r.returncode == 1 and b"this grant is upload-only" in r.stderr and not (tmp_path / "uo.log").exists()
    r = t.scp(str(up), "REMOTE:service/firmware/uo.bin", legacy=True, user="uma")
    assert r.returncode == 0 and t.path("service/firmware/uo.bin").read_bytes() == b"update\n"


def _scp_exec(t: Transfers, command: str, data: bytes) -> tuple[int, bytes, bytes]:
    with t.paramiko() as client:
        return paramiko_exec(client, command, input=data, timeout=30)


def test_crafted_scp_records_cannot_escape_the_target(t):
    mark = t.last_event_id()
    target = "tmp/crafted"
    t.device_file(f"{target}/.keep", b"")
    evil = [
        (b"C0644 5 ../escape.txt\nhello\0", b"unexpected file name"),
        (b"C0644 5 sub/escape.txt\nhello\0", b"unexpected file name"),
        (b"C0644 5 ..\nhello\0", b"unexpected file name"),
        (b"D0755 0 dir\nE\n", b"without -r"),
        (b"E\n", b"end-of-directory"),
        (b"C0644 99999999999999999999 big\n", b"unexpected SCP record"),
        (b"X nonsense\n", b"unexpected SCP record"),
        (b"C0644 5 x" + b"y" * 5000 + b"\n", b"longer than"),
    ]
    for data, reason in evil:
        status, out, _ = _scp_exec(t, f"scp -t {target}", data)
        assert status == 1 and reason in out, (data[:40], out)
    assert sorted(p.name for p in t.path(target).iterdir()) == [".keep"]
    assert not t.path("tmp/escape.txt").exists()
    # records split byte by byte and coalesced with data are parsed statefully
    body = b"T1700000000 0 1700000000 0\nC0640 11 split.txt\nsplit file\n\0"
    with t.paramiko() as client:
        chan = client.get_transport().open_session(timeout=15)
        chan.exec_command(f"scp -tp {target}")
        assert chan.recv(1) == b"\0"
        for i in range(len(body)):
            chan.sendall(body[i:i + 1])
            time.sleep(0.001)
        chan.shutdown_write()
        acks = b""
        deadline = time.monotonic() + 15
        while not chan.exit_status_ready() and time.monotonic() < deadline:
            acks += chan.recv(100) if chan.recv_ready() else b""
            time.sleep(0.01)
        assert chan.recv_exit_status() == 0, acks
        chan.close()
    split = t.path(f"{target}/split.txt")
    assert split.read_bytes() == b"split file\n" and int(split.stat().st_mtime) == 1_700_000_000
    assert split.stat().st_mode & 0o777 == 0o640
    assert t.wait_events(mark, "transfer.file", 1)


def test_scp_command_lines_never_reach_a_shell(t):
    marker = t.path("tmp/pwned")
    for command in (f"scp -f service/logs/system.log; touch {marker}", f"scp -t tmp/$(touch {marker})",
                    f"scp -f service/logs/system.log && touch {marker}",
                    f"scp -f service/logs/system.log | tee {marker}",
                    f"/usr/bin/scp -f `touch {marker}`", f"sh -c 'scp -f x; touch {marker}'",
                    "scp -f -o ProxyCommand=x service/logs/system.log"):
        status, out, _ = _scp_exec(t, command, None)
        assert status == 1 and out.startswith(b"\x01medbroker: "), (command, out)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [True, False], ids=["scp-O", "scp-sftp"])
def test_patient_data_deep_inside_an_archive_is_stopped_mid_stream(t, tmp_path, legacy):
    import io
    import tarfile

    from fixtures.patientdata import dicom_bare

    name = f"tmp/archive-{'o' if legacy else 's'}.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # a harmless member first, so the head check passes
        for member, data in (("service.log", _payload(600_000)), ("export.raw", dicom_bare("TEST^PATIENT^TEN"))):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    t.device_file(name, buf.getvalue())
    mark = t.last_event_id()
    r = t.scp(f"REMOTE:{name}", str(tmp_path / "archive.tar"), legacy=legacy)
    assert r.returncode == 1 and b"DICOM/tar patient data" in r.stderr, r.stderr
    assert patient_bytes_in(tmp_path) == []
    event = "scp.denied" if legacy else "sftp.denied"
    assert t.wait_events(mark, event)[0]["details"]["content"] == "DICOM/tar"
    if legacy:
        record = t.wait_events(mark, "transfer.file")[0]["details"]
        assert record["outcome"] == "stopped" and record["bytes"] < len(buf.getvalue())


def test_asyncssh_scp_client_is_served_too(t, tmp_path):
    import asyncio

    import asyncssh

    async def run() -> str:
        async with asyncssh.connect("127.0.0.1", t.world.port, username=t.login, known_hosts=None, config=None,
                                    client_keys=[str(t.world.keys["alice"].private_path)], agent_path=None) as conn:
            await asyncssh.scp((conn, "service/logs/system.log"), str(tmp_path / "system.log"))
            await asyncssh.scp(str(tmp_path / "system.log"), (conn, "tmp/asyncssh-up.log"), preserve=True)
            await asyncssh.scp((conn, "var/log/vendor"), str(tmp_path / "vendor"), recurse=True)
            try:
                await asyncssh.scp((conn, "tmp/report.pdf"), str(tmp_path / "report.pdf"))
            except asyncssh.SFTPError as exc:
                return exc.reason
            return "not refused"

    reason = asyncio.run(asyncio.wait_for(run(), 60))
    assert "contains DICOM patient data" in reason
    log = t.path("service/logs/system.log").read_bytes()
    assert (tmp_path / "system.log").read_bytes() == log == t.path("tmp/asyncssh-up.log").read_bytes()
    assert sorted(p.name for p in (tmp_path / "vendor").iterdir()) == ["counters.csv", "service.log"]
    assert patient_bytes_in(tmp_path) == []


def test_a_vendor_who_hangs_up_mid_transfer_leaves_an_interrupted_record(t):
    big = t.device_file("tmp/hangup.bin", _payload(8_000_000))
    mark = t.last_event_id()
    with t.paramiko() as client:
        chan = client.get_transport().open_session(timeout=15)
        chan.settimeout(15)
        chan.exec_command("scp -f tmp/hangup.bin")
        chan.sendall(b"\0")
        got = b""
        while b"\n" not in got:
            got += chan.recv(100)
        assert got.startswith(b"C0644 8000000 hangup.bin\n")
        chan.sendall(b"\0")  # go ahead: the data follows
        while len(got) < 300_000:
            got += chan.recv(65536)
        chan.close()
    record = t.wait_events(mark, "transfer.file")[0]["details"]
    assert record["path"] == str(big) and record["outcome"] == "interrupted" and record["bytes"] < 8_000_000
    # the broker is fine: the next transfer works
    r = t.scp("REMOTE:service/logs/system.log", "/dev/null", legacy=True)
    assert r.returncode == 0, r.stderr
