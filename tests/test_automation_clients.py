"""Automation clients keep working through the broker (issue 14 item 6): fabric (paramiko), ``lftp mirror``
(OpenSSH's sftp under lftp) and rclone's SFTP backend (Go's own SSH) copy maintenance files both ways, and
none of them gets patient data from a device whose login could read it. Real tools, real broker and sshd."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import fabric
import pytest

from helpers import poll
from helpers.clients import ssh_options

pytestmark = pytest.mark.openssh

CANARY = b"TEST^PATIENT"


def _tree_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def _maintenance_dir(w) -> Path:
    """A directory of service files on the device (readable by the maintenance login, no patient data)."""
    d = w.device.tree.root / "service" / "bundle"
    d.mkdir(parents=True, exist_ok=True)
    (d / "version.txt").write_bytes(b"firmware 4.2.1\n")
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "calibration.csv").write_bytes(b"axis,offset\nx,0.12\ny,-0.03\n" * 50)
    for p in [d, d / "sub", *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


def test_lftp_mirror_both_ways_and_nothing_from_the_patient_tree(exposed_world, tmp_path):
    w = exposed_world
    w.grant()
    src = _maintenance_dir(w)
    connect = " ".join(["ssh", "-a", "-x", *ssh_options(key=w.keys["alice"].private_path, known_hosts=w.known_hosts,
                                                       host_key_checking="yes")])
    script = tmp_path / "lftp.cmds"
    up = tmp_path / "upload"
    (up / "logs").mkdir(parents=True)
    (up / "logs" / "note.txt").write_bytes(b"replaced fan, 2026-12-06\n")
    dicom_dir = w.device.tree.patient["dicom_dir"]
    script.write_text("\n".join([
        "set cmd:fail-exit no", "set net:max-retries 1", "set net:timeout 10",
        f"set sftp:connect-program \"{connect}\"",
        f"open -u alice@ct-01, -p {w.port} sftp://127.0.0.1",
        f"mirror {src} {tmp_path / 'down'}",
        f"mirror -R {up} {src.parent / 'from-vendor'}",
        f"mirror {dicom_dir} {tmp_path / 'patient'}",
        "bye", ""]))
    r = subprocess.run(["lftp", "-f", str(script)], capture_output=True, timeout=90, stdin=subprocess.DEVNULL)
    assert (tmp_path / "down" / "sub" / "calibration.csv").read_bytes() == (src / "sub" / "calibration.csv").read_bytes()
    assert (tmp_path / "down" / "version.txt").read_bytes() == b"firmware 4.2.1\n"
    assert (src.parent / "from-vendor" / "logs" / "note.txt").read_bytes() == b"replaced fan, 2026-12-06\n"
    got = _tree_bytes(tmp_path / "patient") if (tmp_path / "patient").exists() else b""
    assert CANARY not in got and b"DICM" not in got
    assert b"ermission denied" in r.stderr or b"Access failed" in r.stderr, r.stderr[-2000:]
    assert poll(lambda: w.events("sftp.denied"))  # the audit row is written off the loop


def test_rclone_sftp_copies_and_gets_nothing_from_the_patient_tree(exposed_world, tmp_path):
    w = exposed_world
    w.grant()
    src = _maintenance_dir(w)
    remote = (f":sftp,host=127.0.0.1,port={w.port},user='alice@ct-01',key_file='{w.keys['alice'].private_path}',"
              f"known_hosts_file='{w.known_hosts}'")
    env = {"RCLONE_CONFIG": str(tmp_path / "none.conf"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def rclone(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["rclone", "--retries", "1", "--low-level-retries", "1", "--contimeout", "10s", *args],
                              capture_output=True, timeout=90, env=env, stdin=subprocess.DEVNULL)

    r = rclone("copy", f"{remote}:{src}", str(tmp_path / "down"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "down" / "sub" / "calibration.csv").read_bytes() == (src / "sub" / "calibration.csv").read_bytes()
    r = rclone("copy", f"{remote}:{w.device.tree.patient['hl7_dir']}", str(tmp_path / "patient"))
    assert r.returncode != 0
    got = _tree_bytes(tmp_path / "patient") if (tmp_path / "patient").exists() else b""
    assert CANARY not in got and b"MSH|" not in got
    # rclone shows only "permission denied"; the reason is in the audit (docs/vendors.md says where)
    assert b"ermission denied" in r.stderr, r.stderr[-2000:]
    assert poll(lambda: w.events("sftp.denied"))  # the audit row is written off the loop


def test_fabric_runs_puts_and_gets_and_is_refused_the_patient_tree(exposed_world, tmp_path):
    w = exposed_world
    w.grant()
    src = _maintenance_dir(w)
    conn = fabric.Connection("127.0.0.1", port=w.port, user="alice@ct-01", connect_timeout=15, connect_kwargs={
        "key_filename": str(w.keys["alice"].private_path), "look_for_keys": False, "allow_agent": False})
    conn.client.load_host_keys(str(w.known_hosts))
    try:
        assert conn.run("cat " + str(src / "version.txt"), hide=True, in_stream=False).stdout == "firmware 4.2.1\n"
        conn.get(str(src / "sub" / "calibration.csv"), str(tmp_path / "cal.csv"))
        assert hashlib.sha256((tmp_path / "cal.csv").read_bytes()).digest() == \
            hashlib.sha256((src / "sub" / "calibration.csv").read_bytes()).digest()
        (tmp_path / "patch.txt").write_bytes(b"patch 7\n")
        conn.put(str(tmp_path / "patch.txt"), str(src.parent / "patch.txt"))
        assert (src.parent / "patch.txt").read_bytes() == b"patch 7\n"
        with pytest.raises(PermissionError) as refused:
            conn.get(str(w.device.tree.patient["hl7_file"]), str(tmp_path / "adt.hl7"))
        assert "refuses reads" in str(refused.value)  # paramiko passes the broker's reason on
        out = conn.run("cat " + str(w.device.tree.patient["hl7_file"]), hide=True, warn=True, in_stream=False)
        assert out.failed and CANARY.decode() not in out.stdout
    finally:
        conn.close()
    assert not (tmp_path / "adt.hl7").exists() or CANARY not in (tmp_path / "adt.hl7").read_bytes()
