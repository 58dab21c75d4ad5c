"""Real Ansible (ansible-core from PyPI) through the broker: modules that read protected paths get nothing,
ordinary automation works, and the metadata of protected files stays on the device on every channel.

Ansible sends each module as a program: uploaded over SFTP (``ssh_transfer_method`` smart: sftp, then scp,
then ``dd`` on stdin) and run by ``/bin/sh -c 'python3 …/AnsiballZ_stat.py'``, or with pipelining on the
stdin of ``/bin/sh -c 'python3 && sleep 0'``. The path a module reads travels inside that program, where
the command check cannot see it; sessions/upload_check.py judges it (docs/data-protection.md,
"Automation clients (Ansible)").
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from helpers.ansible import AnsibleTarget, ansible_available, result_text, run_ansible, run_playbook
from helpers.broker import World
from helpers import poll as wait_for
from helpers.clients import paramiko_connect, paramiko_sftp, run_sftp_batch, scp_upload
from sessions.recording import read_frames

pytestmark = [pytest.mark.openssh,
              pytest.mark.skipif(not ansible_available(), reason="ansible-core is not installed (the test extra)")]

MODES = {"sftp-upload": {}, "pipelining": {"pipelining": True}}
CANARY = b"TEST^PATIENT"  # every synthetic patient name on the fake device


def target(w: World, **kw) -> AnsibleTarget:
    return AnsibleTarget("127.0.0.1", w.port, "alice@ct-01", Path(w.keys["alice"].private_path), w.known_hosts, **kw)


def frames_of_all_sessions(w: World) -> list:
    wait_for(lambda: all(r["final_hash"] for r in w.app.store.list_sessions()))
    return [f for r in w.app.store.list_sessions()
            for f in read_frames(w.app.recordings.local_path(r["recording"]), key_lookup=w.app.keys.get)]


def secrets_of(path: Path) -> list[bytes]:
    """What must never reach the vendor about a protected file: content, its encodings, hashes, size."""
    data = path.read_bytes()
    return [CANARY, data[:40], base64.b64encode(data)[:40], hashlib.sha1(data).hexdigest().encode(),
            hashlib.sha256(data).hexdigest().encode(), hashlib.md5(data).hexdigest().encode()]


def assert_nothing_about(result, path: Path) -> None:
    seen = result_text(result).encode()
    for secret in secrets_of(path):
        assert secret not in seen, secret
    assert "stat" not in result.result and "content" not in result.result and "files" not in result.result
    assert result.failed, result.result


def guard_events(w: World, mode: str) -> list[dict]:
    name = "exec.denied" if mode == "pipelining" else "sftp.denied"
    return [dict(e, details=json.loads(e["details"])) for e in wait_for(lambda: w.events(name))]


# ---------------------------------------------------------------- exposed device: the broker's own guard
@pytest.mark.parametrize("mode", list(MODES))
def test_ansible_stat_and_slurp_of_a_protected_file_get_nothing(exposed_world, mode):
    w = exposed_world
    w.grant()
    hl7 = w.device.tree.patient["hl7_file"]
    t = target(w, **MODES[mode])
    stat = run_ansible(t, "stat", {"path": str(hl7), "get_mime": True, "get_checksum": True})
    slurp = run_ansible(t, "slurp", {"src": str(hl7)})
    for result in (stat, slurp):
        assert_nothing_about(result, hl7)
    for result in (stat, slurp):  # the broker's reason is in Ansible's result, not a broken pipe
        if mode == "pipelining":  # the module's stderr
            assert "medbroker: the input of this command names " + str(hl7) in result.result["module_stderr"]
        else:  # sftp, scp, then `dd of=…` on stdin: Ansible reports the last one's stderr
            assert "failed to transfer file" in result.result["msg"], result.result
            assert "medbroker: the input of this command names " + str(hl7) in result.result["msg"]
    events = guard_events(w, mode)
    assert len(events) >= 2 and all(str(hl7) in e["details"]["reason"] for e in events)
    assert all("protected patient-data directory" in e["details"]["reason"] for e in events)
    if mode == "sftp-upload":
        assert {e["details"]["op"] for e in events} == {"write"}  # the write carrying the path was refused
        assert all(e["details"]["path"].endswith((".py",)) and "AnsiballZ_" in e["details"]["path"] for e in events)
    denials = [f.event() for f in frames_of_all_sessions(w) if f.kind == "policy-denial"]
    assert len(denials) >= 2 and all(str(hl7) in d["reason"] for d in denials)
    assert not any(CANARY in f.payload for f in frames_of_all_sessions(w) if f.kind in ("output", "stderr"))


@pytest.mark.parametrize("mode", list(MODES))
def test_ansible_relative_paths_and_directory_listings_are_refused(exposed_world, mode):
    """A home-relative path and ``find`` inside a protected directory: no names, sizes or owners."""
    w = exposed_world
    w.grant()
    t = target(w, **MODES[mode])
    hl7 = w.device.tree.patient["hl7_file"]
    rel = run_ansible(t, "slurp", {"src": "var/spool/hl7/adt_a01.hl7"})
    assert_nothing_about(rel, hl7)
    found = run_ansible(t, "find", {"paths": str(w.device.tree.dicom_dir), "recurse": True})
    assert_nothing_about(found, w.device.tree.patient["dicom_file"])
    assert b"study-0001" not in result_text(found).encode() and b"IM000001" not in result_text(found).encode()
    assert len(guard_events(w, mode)) >= 2


def test_a_script_uploaded_with_sftp_naming_a_protected_path_is_refused_and_removed(exposed_world, tmp_path):
    """Plain OpenSSH sftp: the write is refused with the reason and nothing of the script stays on the device;
    an ordinary script uploads as before."""
    w = exposed_world
    w.grant()
    tree = w.device.tree
    hl7 = tree.patient["hl7_file"]
    bad = tmp_path / "collect.py"
    bad.write_text("import sys\n" * 2000 + f"print(open({str(hl7)!r}).read())\n" + "# end\n" * 2000)
    zipped = tmp_path / "collect_payload.py"  # hidden the AnsiballZ way: base64 of a zip, judged at CLOSE
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("__main__.py", f"print(open({'var/spool/' + 'hl7/adt_a01.hl7'!r}).read())")
    zipped.write_bytes(base64.b64encode(buf.getvalue()))  # no delimiter: judged whole at CLOSE
    good = tmp_path / "health.py"
    good.write_text("import os\nprint(os.uname())\nprint(open('service/logs/system.log').read())\n")
    for local in (bad, zipped):
        r = run_sftp_batch(f"put {local} tmp/{local.name}\n", "alice@ct-01", "127.0.0.1", w.port,
                           w.keys["alice"].private_path, known_hosts=w.known_hosts)
        assert r.returncode != 0
        assert b"medbroker: the uploaded file " in r.stderr and b"protected patient-data directory" in r.stderr
        assert wait_for(lambda: not (tree.tmp_dir / local.name).exists(), 5), f"{local.name} left on the device"
    r = run_sftp_batch(f"put {good} tmp/health.py\n", "alice@ct-01", "127.0.0.1", w.port,
                       w.keys["alice"].private_path, known_hosts=w.known_hosts)
    assert r.returncode == 0, r.stderr
    assert (tree.tmp_dir / "health.py").read_bytes() == good.read_bytes()
    events = guard_events(w, "sftp-upload")
    assert [e["details"]["op"] for e in events] == ["write", "close"]
    assert events[1]["details"]["via"].startswith("base64 > zip:__main__.py")
    discarded = [f.event() for f in frames_of_all_sessions(w)
                 if f.kind == "sftp-request" and f.event().get("event") == "sftp.upload.discarded"]
    assert [d["outcome"] for d in discarded] == ["removed", "removed"]


def test_an_upload_written_out_of_order_is_refused(exposed_world):
    """The judge reads an upload as a stream: a write that skips ahead (where a path could be split across
    pieces sent in reverse) is refused with the reason; in-order writes at any size pass."""
    w = exposed_world
    w.grant()
    host_key = (w.app.config.home / "keys" / "host_ed25519.pub").read_text()
    client = paramiko_connect("127.0.0.1", w.port, "alice@ct-01", key=w.keys["alice"].private_path,
                              host_key_line=host_key)
    try:
        with paramiko_sftp(client) as sftp:
            with sftp.open("tmp/inorder.bin", "wb") as f:
                for _ in range(5):
                    f.write(b"x" * 40000)
            assert sftp.stat("tmp/inorder.bin").st_size == 200000
            with pytest.raises(PermissionError, match="checks uploads in order"):
                with sftp.open("tmp/holes.py", "wb") as f:
                    f.write(b"print(1)\n")
                    f.seek(100000)
                    f.write(b"print(2)\n")
                    f.flush()
    finally:
        client.close()
    assert not (w.device.tree.tmp_dir / "holes.py").exists()
    assert [json.loads(e["details"])["op"] for e in wait_for(lambda: w.events("sftp.denied"))] == ["write"]


def test_a_script_uploaded_with_legacy_scp_naming_a_protected_path_is_refused_and_removed(exposed_world, tmp_path):
    """``scp -O`` (served by the broker itself, sessions/scp.py): the same judge, the reason in scp's error."""
    w = exposed_world
    w.grant()
    tree = w.device.tree
    bad = tmp_path / "collect.sh"
    bad.write_text("#!/bin/sh\n" + "echo collecting\n" * 5000 + "tail -c +1 opt/lis/data/result.txt\n")
    good = tmp_path / "rotate.sh"
    good.write_text("#!/bin/sh\nfind service/logs -name '*.log' -mtime +30 -delete\n")
    results = {}
    for local, ok in ((bad, False), (good, True)):
        r = results[local.name] = scp_upload("alice@ct-01", "127.0.0.1", w.port, w.keys["alice"].private_path,
                                             local, f"tmp/{local.name}", legacy=True, known_hosts=w.known_hosts)
        assert (r.returncode == 0) is ok, r.stderr
        assert (tree.tmp_dir / local.name).exists() is ok
    assert b"medbroker: the uploaded file " in results["collect.sh"].stderr
    assert b"opt/lis/data/result.txt" in results["collect.sh"].stderr
    denied = [json.loads(e["details"]) for e in wait_for(lambda: w.events("scp.denied"))]
    assert len(denied) == 1 and denied[0]["op"] == "write" and denied[0]["discarded"] == "removed"
    assert denied[0]["names"].endswith("opt/lis/data/result.txt")  # home-relative, judged without the home


@pytest.mark.parametrize("script", [
    "print(open('{hl7}').read())",
    "import base64;print(open(base64.b64decode('{b64}').decode()).read())",
])
def test_interpreter_stdin_naming_a_protected_path_ends_the_channel(exposed_world, script):
    w = exposed_world
    w.grant()
    hl7 = str(w.device.tree.patient["hl7_file"])
    text = script.format(hl7=hl7, b64=base64.b64encode(hl7.encode()).decode())
    r = w.ssh("alice@ct-01", "python3", input=text.encode() + b"\n")
    assert r.returncode == 1 and CANARY not in r.stdout
    assert b"medbroker: the input of this command names " + hl7.encode() in r.stderr
    ok = w.ssh("alice@ct-01", "python3", input=b"print(6 * 7)\n")
    assert ok.returncode == 0 and ok.stdout == b"42\n"


def test_an_encoded_path_on_the_command_line_is_refused(exposed_world):
    w = exposed_world
    w.grant()
    hl7 = str(w.device.tree.patient["hl7_file"])
    script = base64.b64encode(f"cat {hl7}".encode()).decode()
    r = w.ssh("alice@ct-01", f"echo {script} | base64 -d | sh")
    assert r.returncode == 1 and CANARY not in r.stdout
    assert b"medbroker: this command names " + hl7.encode() in r.stderr


@pytest.mark.parametrize("mode", list(MODES))
def test_slurp_of_patient_data_outside_a_protected_directory_is_stopped_in_the_output(exposed_world, mode):
    """Finding 11 as reported: the HL7 message came back base64-encoded inside slurp's JSON. Here the file
    lies where no path rule applies (a copy in tmp/), so only the output scanner can stop it: it must read
    a short base64 run inside JSON. DEPENDS ON the scanner branch (sessions/content.py, issue 11)."""
    w = exposed_world
    w.grant()
    tree = w.device.tree
    disguised = tree.tmp_dir / "adt-export.txt"
    disguised.write_bytes(tree.patient["hl7_file"].read_bytes())
    result = run_ansible(target(w, **MODES[mode]), "slurp", {"src": "tmp/adt-export.txt"})
    assert_nothing_about(result, disguised)
    alerts = wait_for(lambda: w.events("alert.exfiltration"))
    assert alerts and json.loads(alerts[0]["details"])["content"].startswith("HL7")  # "HL7v2/base64"
    frames = frames_of_all_sessions(w)
    assert any(f.kind == "alert" for f in frames)
    assert not any(CANARY in f.payload or base64.b64encode(disguised.read_bytes())[:40] in f.payload
                   for f in frames if f.kind in ("output", "stderr"))


# ---------------------------------------------------------------- metadata on the other channels
def test_metadata_of_protected_files_is_refused_on_sftp_and_exec(exposed_world):
    w = exposed_world
    w.grant()
    tree = w.device.tree
    hl7, hl7_dir = tree.patient["hl7_file"], tree.patient["hl7_dir"]
    r = run_sftp_batch(f"-ls -l {hl7_dir}\n-ls -l {hl7}\n-ls -l var/spool\n", "alice@ct-01", "127.0.0.1",
                       w.port, w.keys["alice"].private_path, known_hosts=w.known_hosts)
    shown = r.stdout + r.stderr
    assert b"adt_a01.mllp" not in shown and b"-rw" not in shown.split(b"sftp> -ls -l var/spool")[0]
    assert b"hl7" in shown.split(b"sftp> -ls -l var/spool")[1]  # the protected directory itself may be named
    for command in (f"stat {hl7}", f"ls -l {hl7_dir}", f"sha1sum {hl7}", f"file {hl7}", f"ls -lR {tree.root}/var",
                    f"find {tree.root}/var -name '*.hl7'", f"du -a {tree.root}/var/spool", f"wc -c {hl7}",
                    "stat var/spool/hl7/adt_a01.hl7", "md5sum var/spool/hl7/*"):
        r = w.ssh("alice@ct-01", command)
        assert r.returncode == 1 and b"adt_a01" not in r.stdout, command
        assert b"medbroker: " in r.stderr, command
    digest = hashlib.sha1(hl7.read_bytes()).hexdigest().encode()
    frames = frames_of_all_sessions(w)
    assert not any(digest in f.payload for f in frames)
    assert not any(b"adt_a01.mllp" in f.payload for f in frames if f.kind in ("output", "stderr"))


@pytest.mark.parametrize("command", ["ls -lR var/spool", "du -a var", "find var -name '*.hl7' -ls"])
def test_home_relative_recursive_listing_of_an_ancestor_is_refused(exposed_world, command):
    w = exposed_world
    w.grant()
    r = w.ssh("alice@ct-01", command)
    assert b"adt_a01" not in r.stdout and r.returncode == 1


# ---------------------------------------------------------------- contained device: containment first
def test_contained_device_ansible_gets_nothing_even_without_the_upload_check(tmp_path, device):
    """On a contained device the login cannot read the patient trees: with every broker-side command and
    upload check switched off, Ansible's stat and slurp still get no metadata and no content."""
    w = World(tmp_path, device()).setup(config="[policy]\ncheck_commands = false\n")
    try:
        w.grant()
        dcm = w.device.tree.patient["dicom_file"]
        assert w.device.contained
        for mode in MODES:
            t = target(w, **MODES[mode])
            stat = run_ansible(t, "stat", {"path": str(dcm), "get_checksum": True, "get_mime": True})
            # the device itself answers: the login cannot traverse the directory ("Permission denied")
            assert_nothing_about(stat, dcm)
            assert "Permission denied" in stat.result["msg"], stat.result
            slurp = run_ansible(t, "slurp", {"src": str(dcm)})
            assert_nothing_about(slurp, dcm)
        assert w.events("sftp.denied") == [] and w.events("exec.denied") == []
    finally:
        w.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_contained_device_the_upload_check_answers_first(world, mode):
    w = world
    w.grant()
    dcm = w.device.tree.patient["dicom_file"]  # the contained world protects data/dicom
    result = run_ansible(target(w, **MODES[mode]), "stat", {"path": str(dcm), "get_checksum": True})
    assert_nothing_about(result, dcm)
    assert guard_events(w, mode)


# ---------------------------------------------------------------- ordinary automation works
# Every transfer method with pipelining off and on, as four inventory hosts run in parallel by one playbook.
PLAY_HOSTS = {f"{transfer}-{'pipe' if pipe else 'nopipe'}": {"transfer": transfer, "pipelining": pipe}
              for transfer in ("sftp", "scp") for pipe in (False, True)}
NOTES = "firmware 4.2.1 notes: tube warm-up OK\n"


def test_ordinary_ansible_use_works_through_the_broker(exposed_world):
    """ping, facts, shell, copy (content, a file, a ``~/`` destination), lineinfile, slurp and fetch,
    over sftp and scp (OpenSSH 9's scp speaks SFTP), with pipelining off and on. Ansible expands ``~`` as
    ``~alice@ct-01`` (its ansible_user); the broker makes that the device login's home, so nothing but what
    was copied is left on the device: no literal ``~alice@ct-01`` directory, no module temp directories."""
    w = exposed_world
    w.grant()
    tree = w.device.tree
    local = w.tmp / "fetched"
    firmware = w.tmp / "fw-4.3.0.bin"  # a firmware image that happens to contain a protected path's name
    firmware.write_bytes(os.urandom(1 << 20) + b"\0datadir=/var/lib/mysql\0" + os.urandom(1 << 20))
    h = "{{ inventory_hostname }}"
    tasks = [
        {"ping": {}, "register": "p"},
        {"setup": {"gather_subset": ["!all", "!min", "python"]}},
        {"shell": "uname -s && echo shell-$((6 * 7)) && cd tmp && pwd", "register": "sh"},
        {"copy": {"content": NOTES, "dest": f"{tree.tmp_dir}/{h}-notes.txt"}},
        {"copy": {"content": NOTES, "dest": f"~/tmp/{h}-tilde.txt"}},
        {"copy": {"src": str(firmware), "dest": f"{tree.tmp_dir}/{h}-fw.bin"}},
        {"lineinfile": {"path": f"{tree.root}/etc/vendor/{h}.conf", "line": "log_level=debug", "create": True}},
        {"slurp": {"src": f"tmp/{h}-notes.txt"}, "register": "back"},
        {"fetch": {"src": str(tree.system_log), "dest": f"{local}/{h}/system.log", "flat": True}},
        {"assert": {"that": ["p.ping == 'pong'", "ansible_facts.python.executable == '/usr/bin/python3'",
                             f"sh.stdout == 'Linux\\nshell-42\\n{tree.tmp_dir}'",
                             "(back.content | b64decode) == " + json.dumps(NOTES)]}},
    ]
    targets = {name: target(w, **opts) for name, opts in PLAY_HOSTS.items()}
    r = run_playbook(targets, tasks)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode == 0, out
    for name in PLAY_HOSTS:
        assert re.search(rf"{name}\s+: ok=10 .*failed=0", out), out
        assert (tree.tmp_dir / f"{name}-notes.txt").read_text() == NOTES
        assert (tree.tmp_dir / f"{name}-tilde.txt").read_text() == NOTES
        assert (tree.tmp_dir / f"{name}-fw.bin").read_bytes() == firmware.read_bytes()
        assert "log_level=debug" in (tree.root / f"etc/vendor/{name}.conf").read_text()
        assert (local / name / "system.log").read_bytes() == tree.system_log.read_bytes()
    home = tree.root  # the device login's home
    assert not list(home.glob("~*")), sorted(p.name for p in home.iterdir())
    assert not list((home / ".ansible" / "tmp").iterdir())  # every module temp directory was removed
    assert w.events("sftp.denied") == [] and w.events("exec.denied") == [] and w.events("alert.exfiltration") == []
    rewritten = [f.event() for f in frames_of_all_sessions(w) if f.kind == "exec" and "sent" in f.event()]
    assert rewritten and all("~alice@ct-01" in e["sent"] and "~alice@ct-01" not in e["command"] for e in rewritten)


@pytest.mark.parametrize("name, how", [("collect.txt", "python3 tmp/collect.txt"), ("run", "sh tmp/run"),
                                       ("tool", "./tmp/tool --all"), ("tool2", "cd tmp && ./tool2")])
def test_a_file_run_by_an_interpreter_is_read_and_judged_first(exposed_world, name, how):
    """A file that does not look like a program passes the upload check (configuration files name the
    directories they configure); when a command runs it, the broker reads it on the device and judges it."""
    w = exposed_world
    w.grant()
    tree = w.device.tree
    hl7 = tree.patient["hl7_file"]
    text = f"print(open({str(hl7)!r}).read())\n" if how.startswith("python") else f"cat {hl7}\n"
    target_file = tree.tmp_dir / name
    target_file.write_text(text)
    target_file.chmod(0o755)
    import shutil
    shutil.chown(target_file, w.device.login, w.device.login)
    r = w.ssh("alice@ct-01", how)
    assert r.returncode == 1 and CANARY not in r.stdout, r
    assert b"medbroker: the script " in r.stderr and str(hl7).encode() in r.stderr
    assert json.loads(wait_for(lambda: w.events("exec.denied"))[0]["details"])["command"] == how
    target_file.write_text("print('ok')\n" if how.startswith("python") else "echo ok\n")
    assert w.ssh("alice@ct-01", how).stdout == b"ok\n"


def test_a_configuration_file_naming_a_protected_directory_uploads(exposed_world, tmp_path):
    """my.cnf names /var/lib/mysql, orthanc.json its StorageDirectory: data, not programs, so they upload."""
    w = exposed_world
    w.grant()
    conf = tmp_path / "orthanc.json"
    conf.write_text(json.dumps({"StorageDirectory": "/var/lib/orthanc/db", "IndexDirectory": "/var/lib/orthanc/db"}))
    r = run_sftp_batch(f"put {conf} tmp/orthanc.json\n", "alice@ct-01", "127.0.0.1", w.port,
                       w.keys["alice"].private_path, known_hosts=w.known_hosts)
    assert r.returncode == 0, r.stderr
    assert (w.device.tree.tmp_dir / "orthanc.json").read_bytes() == conf.read_bytes()
    assert w.events("sftp.denied") == []


@pytest.mark.parametrize("mode", list(MODES))
def test_ansible_through_a_symlink_into_a_protected_tree_gets_nothing(exposed_world, mode):
    """tmp/images -> data/dicom on the device: the module's path names no protected directory; the broker
    resolves the program's paths through the device's realpath before it runs (the uploaded file before
    the command that runs it; piped input before its EOF reaches python)."""
    w = exposed_world
    w.grant()
    dcm = w.device.tree.patient["dicom_file"]
    via_link = "tmp/images/" + str(dcm.relative_to(w.device.tree.dicom_dir))
    result = run_ansible(target(w, **MODES[mode]), "stat", {"path": via_link, "get_checksum": True})
    assert_nothing_about(result, dcm)
    denied = [json.loads(e["details"]) for e in wait_for(lambda: w.events("exec.denied"))]
    assert denied and f"names {via_link}, which is {dcm} is inside" in denied[0]["reason"]


def test_a_configuration_file_piped_to_cat_is_data_but_a_script_piped_to_dd_is_judged(exposed_world):
    """exec stdin of a command that is no interpreter (cat > f, dd of=f) is judged only when it is a
    program: my.cnf passes, a #! script naming a protected path does not (Ansible's piped transfer)."""
    w = exposed_world
    w.grant()
    tree = w.device.tree
    conf = b"[mysqld]\ndatadir=/var/lib/mysql\n"
    r = w.ssh("alice@ct-01", "cat > tmp/my.cnf", input=conf)
    assert r.returncode == 0, r.stderr
    assert (tree.tmp_dir / "my.cnf").read_bytes() == conf
    hl7 = str(tree.patient["hl7_file"])
    r = w.ssh("alice@ct-01", "dd of=tmp/collect.py bs=65536", input=f"#!/usr/bin/python3\nopen({hl7!r})\n".encode())
    assert r.returncode == 1 and b"medbroker: the input of this command names " in r.stderr
    assert not (tree.tmp_dir / "collect.py").exists() or hl7.encode() not in (tree.tmp_dir / "collect.py").read_bytes()
