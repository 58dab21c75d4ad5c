"""Containment (issue 11, finding 2 first layer), grant shell modes (finding 4), shortest window (finding 6).

Real sshd devices in both setups: ``world`` (contained: the patient directories are root-only 0700) and
``exposed_world`` (the device login owns and reads them). Everything is asserted as people observe it:
exit codes, what the vendor's terminal and disk show, device files, audit rows, recordings.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.clock import utc_iso
from broker.cli import app as cli_app
from broker.grants import approve_request, request_grant
from broker.identity import get_principal
from sessions.recording import read_frames, read_header

pytestmark = pytest.mark.openssh
runner = CliRunner()


def cli(w, *args: str, input: str | None = None):
    r = runner.invoke(cli_app, ["--home", str(w.app.home), *args], input=input)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def _request(w, *, mode: str = "normal", seconds: int = 3600, user: str = "alice"):
    return request_grant(w.app.store, w.app.audit, w.app.rules, get_principal(w.app.store, user), "ct-01", seconds,
                         "test work", w.app.clock.now(), mode=mode)


def _approve(w, rid: int, who: str, **kw):
    return approve_request(w.app.store, w.app.audit, w.app.rules, rid, get_principal(w.app.store, who),
                           w.app.clock.now(), **kw)


def _stale(w) -> None:
    """Age the cached containment check so the next session start checks the device again."""
    old = utc_iso(w.app.clock.now() - timedelta(hours=1))
    w.app.store.execute("UPDATE devices SET containment_checked_at = ? WHERE name = 'ct-01'", (old,))


def _sftp(w, batch: str, cwd: Path) -> subprocess.CompletedProcess:
    key = w.keys["alice"].private_path
    return subprocess.run(
        ["sftp", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={w.known_hosts}",
         "-o", "StrictHostKeyChecking=yes", "-i", str(key), "-P", str(w.port), "-b", "-", "alice@ct-01@127.0.0.1"],
        input=batch.encode(), capture_output=True, timeout=60, cwd=cwd)


# ----------------------------------------------------------------------------- measuring containment
def test_contained_device_is_measured_contained_at_broker_start_and_by_device_check(world):
    dev = world.app.store.get_device("ct-01")
    assert dev["containment"] == "contained" and dev["containment_checked_at"]
    r = cli(world, "device", "check", "ct-01")
    assert r.exit_code == 0, r.stdout + r.stderr
    dicom = str(world.device.tree.root / "data" / "dicom")
    assert "ct-01: contained" in r.stdout
    assert f"{dicom}: not readable" in r.stdout and "fix:" not in r.stdout
    doc = json.loads(cli(world, "device", "check", "ct-01", "--json").stdout)
    assert doc["state"] == "contained"
    assert {p["path"]: p["status"] for p in doc["paths"]}[dicom] == "not-readable"
    checks = [json.loads(e["details"]) for e in world.events("device.containment")]
    assert [c["trigger"] for c in checks] == ["broker-start", "device-check", "device-check"]


def test_exposed_device_check_names_each_readable_path_and_the_fix(exposed_world):
    w = exposed_world
    r = cli(w, "device", "check", "ct-01")
    assert r.exit_code == 1, r.stdout + r.stderr
    for path in w.device.patient_dirs:
        assert f"{path}: READABLE" in r.stdout
        assert f"fix: on the device, as root: chown root:root {path} && chmod 0700 {path}" in r.stdout
    assert f"it belongs to {w.device.login}" in r.stdout
    assert "two-approvers (site default)" in r.stdout
    doc = json.loads(cli(w, "device", "check", "ct-01", "--json").stdout)
    assert doc["state"] == "exposed" and doc["exposed_allows"] == "two-approvers"
    assert {str(p) for p in w.device.patient_dirs} <= {p["path"] for p in doc["paths"] if p["status"] == "readable"}
    assert cli(w, "device", "check", "nope").exit_code == 1
    assert cli(w, "device", "check").exit_code == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change ownership on the device")
def test_directory_the_login_can_enter_but_not_list_is_readable_by_name(world):
    dicom = world.device.tree.root / "data" / "dicom"
    os.chmod(dicom, 0o711)  # root-owned, others may traverse: known file names can still be opened
    r = cli(world, "device", "check", "ct-01")
    assert r.exit_code == 1
    assert f"{dicom}: READABLE BY NAME" in r.stdout and "can enter" in r.stdout
    os.chmod(dicom, 0o700)
    assert cli(world, "device", "check", "ct-01").exit_code == 0


def test_device_list_and_show_show_containment(exposed_world):
    w = exposed_world
    r = cli(w, "device", "list")
    assert "EXPOSED" in r.stdout and "containment" in r.stdout
    doc = json.loads(cli(w, "device", "list", "--json").stdout)["devices"][0]
    assert doc["containment"] == "exposed" and doc["containment_checked_at"]
    assert {str(p) for p in w.device.patient_dirs} <= set(doc["containment_paths"] and
                                                          [p["path"] for p in doc["containment_paths"]])
    show = cli(w, "device", "show", "ct-01").stdout
    assert "EXPOSED" in show and str(w.device.patient_dirs[0]) in show and "two-approvers" in show


# ----------------------------------------------------------------------------- exposed devices: two approvers
def test_exposed_device_needs_two_approvers_and_then_allows_a_shell(exposed_world):
    w = exposed_world
    req = _request(w)
    card = json.loads(cli(w, "requests", "show", str(req.id), "--json").stdout)["card"]
    assert card["containment"] == "exposed" and card["approvals_needed"] == 2
    assert any("EXPOSED" in n and "accept that risk" in n for n in card["notes"])
    text = cli(w, "requests", "show", str(req.id)).stdout
    assert "containment: exposed" in text and "EXPOSED" in text
    r = w.ssh("bob", "requests")
    assert b"device containment: EXPOSED" in r.stdout and b"accept that risk" in r.stdout
    assert b"(needs 2)" in r.stdout
    r = cli(w, "approve", str(req.id), "--by", "bob")
    assert r.exit_code == 0 and "1 of 2 approvals" in r.stdout and "exposed" in r.stdout
    assert w.app.store.get_request(req.id)["status"] == "pending"
    r = cli(w, "approve", str(req.id), "--by", "dave")
    assert r.exit_code == 0 and "approved" in r.stdout
    out = w.ssh("alice@ct-01", "echo shell-ok")
    assert out.returncode == 0 and out.stdout == b"shell-ok\n", out.stderr
    row = w.app.store.list_sessions()[-1]
    assert row["containment"] == "exposed"


def test_shell_refused_when_device_became_exposed_after_one_approval(world):
    w = world
    grant = w.grant()  # contained: one approver is enough
    assert grant.approved_by == ("bob",) and grant.containment == "contained"
    assert w.ssh("alice@ct-01", "echo before").stdout == b"before\n"
    for path in w.device.patient_dirs:  # someone loosens the patient directories on the device
        os.chmod(path, 0o755)
    _stale(w)
    out = w.ssh("alice@ct-01", "echo x > /dev/null; echo ran")
    assert out.returncode == 1 and b"ran" not in out.stdout
    assert b"exposed" in out.stderr and b"two approvers" in out.stderr and b"device check ct-01" in out.stderr
    pty = w.pty("alice@ct-01")
    try:
        pty.expect(b"exposed", timeout=20)
    finally:
        pty.close()
    denied = [json.loads(e["details"]) for e in w.events("exec.denied")]
    assert any("exposed" in d["reason"] for d in denied)
    assert any(json.loads(e["details"]).get("kind") == "shell" for e in w.events("channel.refused"))
    sessions = w.app.store.list_sessions()
    assert sessions[0]["containment"] == "contained" and sessions[-1]["containment"] == "exposed"
    # the first session after the change: the header holds the last known state, the check that applied follows
    frames = [f for f in read_frames(w.app.recordings.local_path(sessions[1]["recording"]), key_lookup=w.app.keys.get) if f.kind == "containment"]
    assert [json.loads(f.payload)["state"] for f in frames] == ["exposed"]
    assert json.loads(frames[0].payload)["cached"] is False
    assert read_header(w.app.recordings.local_path(sessions[1]["recording"]))["containment"] == "contained"
    assert read_header(w.app.recordings.local_path(sessions[-1]["recording"]))["containment"] == "exposed"


def test_exposed_device_policy_files_only_and_allow(exposed_world):
    w = exposed_world
    r = cli(w, "device", "set", "ct-01", "--exposed-shell", "files-only")
    assert r.exit_code == 0 and "files-only (device setting)" in r.stdout
    w.grant()  # two approvers still recorded? files-only needs one: the grant is made at once
    out = w.ssh("alice@ct-01", "echo x")
    assert out.returncode == 1 and b"only sftp and scp" in out.stderr
    r = cli(w, "device", "set", "ct-01", "--exposed-shell", "allow")
    assert r.exit_code == 0
    req = _request(w)
    assert _approve(w, req.id, "bob").grant is not None  # allow: one approver
    assert w.ssh("alice@ct-01", "echo allowed").stdout == b"allowed\n"
    assert cli(w, "device", "set", "ct-01", "--exposed-shell", "sometimes").exit_code == 2
    changes = [json.loads(e["details"]) for e in w.events("device.changed")]
    assert [c["after"] for c in changes] == ["files-only", "allow"]


# ----------------------------------------------------------------------------- finding 4: files-only grants
def test_read_only_grant_is_files_only_on_every_channel(world, tmp_path):
    w = world
    grant = w.grant(mode="read-only")
    assert grant.shell == "files-only"
    target = w.device.tree.root / "tmp" / "f"
    for cmd in (f"echo x > {target}", f"cat > {target}", "id"):
        out = w.ssh("alice@ct-01", cmd, input=b"data\n")
        assert out.returncode == 1 and b"files-only" in out.stderr and b"--allow-shell" in out.stderr, out.stderr
    assert not target.exists()
    pty = w.pty("alice@ct-01")
    try:
        pty.expect(b"files-only", timeout=20)
    finally:
        pty.close()
    (tmp_path / "dl").mkdir()
    readme = w.device.tree.system_log
    r = _sftp(w, f"get {readme} got\n", tmp_path / "dl")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dl" / "got").read_bytes() == readme.read_bytes()
    r = _sftp(w, f"put {tmp_path / 'dl' / 'got'} {w.device.tree.root / 'tmp' / 'up'}\n", tmp_path)
    assert r.returncode != 0 and not (w.device.tree.root / "tmp" / "up").exists()  # read-only still enforced
    from helpers.clients import scp_download, scp_upload

    for legacy in (True, False):  # legacy scp is served by the broker itself; both stay usable
        out = tmp_path / f"scp-{legacy}"
        r = scp_download("alice@ct-01", "127.0.0.1", w.port, w.keys["alice"].private_path, str(readme), out,
                         legacy=legacy, known_hosts=w.known_hosts)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == readme.read_bytes()
        r = scp_upload("alice@ct-01", "127.0.0.1", w.port, w.keys["alice"].private_path, out,
                       str(w.device.tree.root / "tmp" / "up2"), legacy=legacy, known_hosts=w.known_hosts)
        assert r.returncode != 0 and not (w.device.tree.root / "tmp" / "up2").exists()


def test_upload_only_grant_with_allow_shell_opens_a_shell(world):
    w = world
    req = _request(w, mode="upload-only")
    r = cli(w, "approve", str(req.id), "--by", "bob", "--allow-shell")
    assert r.exit_code == 0 and "Files only" not in r.stdout
    assert w.ssh("alice@ct-01", "echo shell").stdout == b"shell\n"
    grant = json.loads(cli(w, "grants", "list", "--json").stdout)["grants"][-1]
    assert grant["shell"] == "allowed" and grant["mode"] == "upload-only"


def test_files_only_choice_shown_to_the_approver_over_ssh(world):
    w = world
    req = _request(w, mode="read-only")
    r = w.ssh("bob", "requests")
    assert r.returncode == 0 and b"(read-only)" in r.stdout and b"--allow-shell" in r.stdout
    assert b"device containment: contained" in r.stdout
    r = w.ssh("bob", f"approve {req.id}")
    assert r.returncode == 0 and b"Files only" in r.stdout
    out = w.ssh("alice@ct-01", "echo x")
    assert out.returncode == 1 and b"files-only" in out.stderr
    req2 = _request(w, mode="read-only")
    r = w.ssh("bob", f"approve {req2.id} --allow-shell --json")
    assert r.returncode == 0 and json.loads(r.stdout)["grant"]["shell"] == "allowed"


# ----------------------------------------------------------------------------- finding 6: shortest window
def test_first_approvers_shorter_window_is_kept(world):
    w = world
    w.app.store.execute("UPDATE devices SET device_class = 'critical' WHERE name = 'ct-01'")
    req = _request(w, seconds=8 * 3600)
    r = cli(w, "approve", str(req.id), "--by", "bob", "--for", "5m")
    assert r.exit_code == 0 and "bob (5m)" in r.stdout
    doc = json.loads(cli(w, "approve", str(req.id), "--by", "dave", "--json").stdout)
    g = doc["grant"]
    from broker.clock import parse_utc
    assert (parse_utc(g["ends_at"]) - parse_utc(g["starts_at"])).total_seconds() == 300
    details = {a["approver"]: a["duration_s"] for a in doc["request"]["approval_details"]}
    assert details == {"bob": 300, "dave": None}
    created = json.loads(w.events("grant.created")[-1]["details"])
    assert created["window_s"] == 300
    assert [(a["approver"], a["duration_s"]) for a in created["approvals"]] == [("bob", 300), ("dave", 8 * 3600)]
    listing = cli(w, "requests", "list").stdout
    assert "bob (5m)" in listing and "dave (as requested)" in listing


def test_second_approver_may_shorten_further_but_not_lengthen(world):
    w = world
    w.app.store.execute("UPDATE devices SET device_class = 'critical' WHERE name = 'ct-01'")
    req = _request(w, seconds=2 * 3600)
    _approve(w, req.id, "bob", duration_s=3600)
    dec = _approve(w, req.id, "dave", duration_s=600)
    assert (dec.grant.ends_at - dec.grant.starts_at).total_seconds() == 600


# ----------------------------------------------------------------------------- displays
def test_session_record_and_report_show_containment(world, tmp_path):
    w = world
    w.grant()
    assert w.ssh("alice@ct-01", "true").returncode == 0
    sid = w.app.store.list_sessions()[-1]["id"]
    show = cli(w, "sessions", "show", sid).stdout
    assert "containment" in show and "contained" in show
    assert json.loads(cli(w, "sessions", "show", sid, "--json").stdout)["containment"] == "contained"
    day = w.app.clock.now().strftime("%Y-%m-%d")
    r = cli(w, "report", "--from", day, "--to", day, "--format", "json", "-o", str(tmp_path / "r.json"))
    assert r.exit_code == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    dev = doc["devices"][0]
    assert dev["containment"]["state"] == "contained"
    assert dev["sessions"][0]["containment"] == "contained"
    r = cli(w, "report", "--from", day, "--to", day, "-o", str(tmp_path / "r.md"))
    assert "Containment: contained" in (tmp_path / "r.md").read_text()


# ----------------------------------------------------------------------------- device add
@pytest.fixture
def cli_home(tmp_path) -> Path:
    h = tmp_path / "cli-home"
    h.mkdir()
    (h / "broker.toml").write_text('[upstream]\nconnect_timeout = "2s"\n')
    assert runner.invoke(cli_app, ["--home", str(h), "init"]).exit_code == 0
    return h


def _add(home: Path, dev, *extra: str, port: int | None = None):
    r = runner.invoke(cli_app, ["--home", str(home), "device", "add", "ct-01", "--host", dev.host, "--port",
                                str(port or dev.port), "--login", dev.login, "--key", str(dev.client_key.private_path),
                                "--host-key", dev.host_key_line, *extra])
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def test_device_add_checks_containment_and_records_unknown_when_unreachable(cli_home, device):
    from helpers.net import closed_port

    exposed = device(exposed=True)
    protect = [a for p in exposed.patient_dirs for a in ("--protect", str(p))]
    r = _add(cli_home, exposed, *protect)
    assert r.exit_code == 0, r.stderr
    assert "Containment: EXPOSED" in r.stdout and "medbroker device check ct-01" in r.stdout
    runner.invoke(cli_app, ["--home", str(cli_home), "device", "remove", "ct-01"])
    r = _add(cli_home, exposed, "--json", *protect, port=closed_port())
    assert r.exit_code == 0, r.stderr  # added anyway
    doc = json.loads(r.stdout)
    assert doc["containment"] == "unknown" and "cannot connect" in doc["containment_check"]["error"]
    r = runner.invoke(cli_app, ["--home", str(cli_home), "device", "check", "ct-01"])
    assert r.exit_code == 1 and "unknown" in r.stdout


def test_world_grant_on_an_exposed_device_gets_two_approvers_and_runs_commands(exposed_world):
    """Other tests rely on this: on ``exposed_world`` ``w.grant()`` gives a grant that opens exec and
    shell, so the broker's own guards (not the approval rule) are what those tests exercise."""
    w = exposed_world
    grant = w.grant()
    assert grant.approved_by == ("bob", "dave") and grant.containment == "exposed"
    assert w.ssh("alice@ct-01", "echo runs").stdout == b"runs\n"
    pty = w.pty("alice@ct-01")
    try:
        pty.sendline("echo shell-$((40+2))")
        pty.expect(b"shell-42", timeout=20)
    finally:
        pty.close()


# ----------------------------------------------------------------------------- the decision, exhaustively
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(kind=st.sampled_from(["shell", "exec"]), shell=st.sampled_from(["allowed", "files-only"]),
       mode=st.sampled_from(["normal", "read-only", "upload-only"]),
       approvers=st.lists(st.sampled_from(["bob", "dave", "erin"]), min_size=1, max_size=3),
       state=st.sampled_from(["contained", "exposed", "unknown", None]),
       device_policy=st.sampled_from([None, "allow", "files-only", "two-approvers"]),
       site=st.sampled_from(["allow", "files-only", "two-approvers"]))
def test_channel_decision_table(kind, shell, mode, approvers, state, device_policy, site):
    from datetime import datetime, timezone

    from broker.containment import ContainmentReport, channel_refusal
    from broker.devices import Device
    from broker.grants import Grant

    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    grant = Grant(7, 3, "alice", "ct-01", now, now + timedelta(hours=1), tuple(approvers), (), mode, None, None, None,
                  shell, "contained")
    device = Device("ct-01", "h", 22, "svc", "key", "x", "k", "fp", ("/data/dicom",), "standard", {}, None, "t",
                    state or "unknown", None, None, device_policy)
    report = None if state is None else ContainmentReport("ct-01", "svc", state, "t")
    refusal = channel_refusal(kind, grant, device, report, site)
    policy = device_policy or site
    allowed = shell == "allowed" and (state == "contained" or policy == "allow" or (
        policy == "two-approvers" and len(set(approvers)) >= 2))
    assert (refusal is None) == allowed
    if refusal is not None:
        assert "files-only" in refusal or "exposed" in refusal or "unknown" in refusal
