"""The medbroker CLI as a person uses it: home, users, devices, help for every command, real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from broker.cli import app
from cli_support import Home, device_key, home, keys, people, runner, world  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- home
def test_init_creates_the_home_and_check_passes(tmp_path):
    h = Home(tmp_path / "new")
    doc = h.json("init")
    assert doc["created"] is True and doc["host_key_fingerprint"].startswith("SHA256:")
    for rel in ("broker.toml", "medbroker.db", "keys/host_ed25519", "keys/signing_ed25519.pem", "keys/data.key"):
        assert (h.path / rel).is_file(), rel
    assert (h.path / "recordings").is_dir()
    assert (h.path / "keys/signing_ed25519.pem").stat().st_mode & 0o077 == 0
    again = h.json("init")  # keeps every existing file
    assert again["created"] is False and again["host_key_fingerprint"] == doc["host_key_fingerprint"]
    out = h.ok("check").stdout
    for name in ("config", "host key", "signing key", "data key", "database", "recordings"):
        assert any(line.startswith("ok") and name in line for line in out.splitlines()), (name, out)
    checks = h.json("check")
    assert checks["ok"] is True and {c["name"] for c in checks["checks"]} >= {"config", "database", "recordings"}


def test_check_names_a_deleted_key_file_and_exits_2(home):
    (home.path / "keys" / "signing_ed25519.pem").unlink()
    r = home.fails(2, "check")
    assert any(line.startswith("FAIL") and "signing key" in line and "missing" in line
               for line in r.stdout.splitlines()), r.stdout
    assert "signing key" in r.stderr and "Hint:" in r.stderr


def test_check_and_every_command_refuse_an_unknown_config_key(home):
    cfg = home.path / "broker.toml"
    cfg.write_text(cfg.read_text().replace('max_duration = "8h"', 'max_durration = "8h"'))
    r = home.fails(2, "check")
    assert "unknown key grants.max_durration" in r.stdout + r.stderr
    r = home.fails(2, "user", "list")
    assert "unknown key grants.max_durration" in r.stderr
    assert "known keys in [grants]" in r.stderr  # the hint lists what is allowed


def test_missing_home_is_a_usage_error_with_the_init_command(tmp_path):
    h = Home(tmp_path / "nowhere")
    r = h.fails(2, "user", "list")
    assert "not a medbroker home" in r.stderr
    assert f"medbroker --home {h.path} init" in r.stderr
    assert not h.path.exists()


def test_home_comes_from_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "from-env"
    monkeypatch.setenv("MEDBROKER_HOME", str(target))
    r = runner.invoke(app, ["init"])
    assert r.exit_code == 0, r.stderr
    assert (target / "broker.toml").is_file()


# ----------------------------------------------------------------------------- users
def test_user_add_list_show_disable_enable_with_json(home, keys):
    key = keys["alice"]
    doc = home.json("user", "add", "alice", "--role", "vendor", "--key", str(key.public_path), "--company", "Acme")
    assert doc["name"] == "alice" and doc["role"] == "vendor" and doc["company"] == "Acme"
    assert [k["fingerprint"] for k in doc["keys"]] == [key.fingerprint]
    home.ok("user", "add", "bob", "--role", "approver")
    users = home.json("user", "list")["users"]
    assert [(u["name"], u["role"], len(u["keys"])) for u in users] == [("alice", "vendor", 1), ("bob", "approver", 0)]
    assert home.json("user", "show", "alice")["disabled"] is False
    assert home.json("user", "disable", "alice", "--reason", "left Acme")["disabled"] is True
    assert home.json("user", "show", "alice")["disabled"] is True
    assert "already disabled" in home.fails(1, "user", "disable", "alice").stderr
    assert home.json("user", "enable", "alice")["disabled"] is False
    (created,) = home.events("user.created")[:1]
    assert created[0].startswith("local:") and created[1] == "alice"
    assert home.events("user.key.added")[0][1] == "alice"
    assert [e[1] for e in home.events("user.disabled")] == ["alice"]
    human = home.ok("user", "show", "alice").stdout
    assert key.fingerprint in human and "role:" in human and "vendor" in human


def test_user_add_with_a_bad_key_file_creates_nothing(home, tmp_path, keys):
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 not-base64!!\n")
    r = home.fails(2, "user", "add", "alice", "--role", "vendor", "--key", str(keys["laptop"].public_path),
                   "--key", str(bad))
    assert str(bad) in r.stderr
    assert home.count("users") == 0 and home.count("user_keys") == 0 and home.events("user.created") == []


@pytest.mark.parametrize("args, message", [
    (["Alice", "--role", "vendor"], "user name 'Alice' is not valid"),
    (["alice", "--role", "boss"], "role 'boss' is not known"),
])
def test_user_add_rejects_bad_input(home, args, message):
    assert message in home.fails(2, "user", "add", *args).stderr
    assert home.count("users") == 0


def test_user_add_twice_and_unknown_user(home):
    home.ok("user", "add", "alice", "--role", "vendor")
    assert "already exists" in home.fails(1, "user", "add", "alice", "--role", "vendor").stderr
    r = home.fails(1, "user", "show", "zed")
    assert "user zed does not exist" in r.stderr and "Hint: see: medbroker user list" in r.stderr


def test_user_key_add_and_admin_actor(home, keys):
    home.ok("user", "add", "root", "--role", "admin")
    home.ok("user", "add", "alice", "--role", "vendor", "--by", "root")
    key = keys["laptop"]
    doc = home.json("user", "key", "add", "alice", str(key.public_path), "--by", "root")
    assert [k["fingerprint"] for k in doc["keys"]] == [key.fingerprint]
    assert "already registered" in home.fails(1, "user", "key", "add", "alice", str(key.public_path)).stderr
    assert home.events("user.key.added")[-1][0] == "root"
    assert home.events("user.created")[-1][0] == "root"
    r = home.fails(1, "user", "add", "mallory", "--role", "admin", "--by", "alice")
    assert "alice (vendor) may not add users" in r.stderr
    assert home.rows("SELECT count(*) FROM users WHERE name = 'mallory'") == [(0,)]


# ----------------------------------------------------------------------------- devices
def test_device_add_with_a_real_key_file_and_pinned_host_key(people, device_key, keys):
    host = keys["host"]
    doc = people.json("device", "add", "ct-01", "--host", "10.1.2.3", "--port", "2022", "--login", "service",
                      "--key", str(device_key.private_path), "--host-key", host.public_key,
                      "--protect", "/data/dicom/", "--protect", "/var/lib/hl7", "--description", "CT, room 4")
    assert doc["name"] == "ct-01" and doc["port"] == 2022 and doc["auth"] == "key"
    assert doc["host_key_fingerprint"] == host.fingerprint
    assert doc["protected_paths"] == ["/data/dicom", "/var/lib/hl7"]
    shown = people.run("device", "show", "ct-01", "--json").stdout + people.run("device", "list").stdout
    secret = device_key.private_path.read_text()
    assert "PRIVATE KEY" not in shown
    ((credential,),) = people.rows("SELECT credential FROM devices WHERE name = 'ct-01'")
    assert "PRIVATE KEY" not in credential and secret.splitlines()[1] not in credential  # sealed at rest
    assert people.events("device.added")[0][2] == "ct-01"
    assert "ct-01" in people.ok("device", "list").stdout


def test_device_add_with_a_broken_host_key_changes_nothing(people, device_key):
    r = people.fails(2, "device", "add", "ct-01", "--host", "10.1.2.3", "--login", "service",
                     "--key", str(device_key.private_path), "--host-key", "ssh-ed25519 AAAAbroken")
    assert "--host-key" in r.stderr and "ssh-keyscan" in r.stderr
    assert people.count("devices") == 0 and people.events("device.added") == []


@pytest.mark.parametrize("case", ["public-key-as-key", "passphrase", "no-credential", "two-host-keys", "bad-class",
                                  "bad-legacy-alg", "relative-protect"])
def test_device_add_refuses_bad_input(people, device_key, keys, tmp_path, case):
    host = keys["host"].public_key
    args = ["device", "add", "ct-01", "--host", "10.1.2.3", "--login", "service"]
    cred = ["--key", str(device_key.private_path)]
    hk = ["--host-key", host]
    expected = {
        "public-key-as-key": (["--key", str(device_key.public_path), *hk], "is not an SSH private key"),
        "no-credential": (hk, "give exactly one credential"),
        "two-host-keys": ([*cred, *hk, "--fetch-host-key"], "give exactly one of --host-key"),
        "bad-class": ([*cred, *hk, "--class", "vital"], "--class 'vital' is not known"),
        "bad-legacy-alg": ([*cred, *hk, "--legacy-kex", "diffie-hellman-group1-sha"], "is not an algorithm"),
        "relative-protect": ([*cred, *hk, "--protect", "data/dicom"], "must be an absolute path"),
    }
    if case == "passphrase":
        locked = tmp_path / "locked"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "correct horse", "-f", str(locked)], check=True,
                       timeout=30)
        extra, message = ["--key", str(locked), *hk], "protected by a passphrase"
    else:
        extra, message = expected[case]
    r = people.fails(2, *args, *extra)
    assert message in r.stderr
    assert people.count("devices") == 0


def test_device_password_from_stdin_is_never_shown_or_stored_in_clear(people, keys):
    password = "Sup3r-s3cret-pw"
    r = people.ok("device", "add", "us-02", "--host", "10.1.2.4", "--login", "svc", "--password-stdin",
                  "--host-key", keys["host"].public_key, input=password + "\n")
    assert password not in r.stdout + r.stderr
    assert people.json("device", "show", "us-02")["auth"] == "password"
    rows = people.rows("SELECT * FROM devices") + people.rows("SELECT * FROM audit_events")
    dump = "\n".join(str(row) for row in rows)
    assert password not in dump
    people.ok("device", "add", "us-04", "--host", "10.1.2.4", "--login", "svc", "--password-stdin",
              "--host-key", keys["host"].public_key, input=password + "\r\n")
    from broker.app import open_app
    from broker.devices import device_credential, get_device

    a = open_app(people.path)
    try:  # the stored credential is exactly the line, without its CR/LF ending
        assert device_credential(get_device(a.store, "us-04"), a.keys).reveal() == password
    finally:
        a.close()
    r = people.fails(2, "device", "add", "us-03", "--host", "10.1.2.4", "--login", "svc", "--password-stdin",
                     "--host-key", keys["host2"].public_key, input="\n")
    assert "password is empty" in r.stderr


def test_device_remove_and_unknown_device(world):
    people = world
    assert "device ct-99 is not registered" in people.fails(1, "device", "show", "ct-99").stderr
    assert people.json("device", "remove", "ct-01") == {"removed": "ct-01"}
    assert [d["name"] for d in people.json("device", "list")["devices"]] == ["mri-01"]
    assert people.events("device.removed")[0][2] == "ct-01"
    people.fails(1, "device", "remove", "ct-01")


def test_stored_control_characters_are_not_sent_to_the_terminal(world):
    from broker.app import open_app

    a = open_app(world.path)
    try:
        a.store.update_device("ct-01", description="evil \x1b]0;pwned\x07\x1b[2J text")
    finally:
        a.close()
    out = world.ok("device", "show", "ct-01").stdout
    assert "\x1b" not in out and "\x07" not in out and "evil ?]0;pwned??[2J text" in out
    assert json.loads(world.ok("device", "show", "ct-01", "--json").stdout)["description"].startswith("evil \x1b]0;")


# ----------------------------------------------------------------------------- help, meta
def _command_paths() -> list[list[str]]:
    """Every command path of the typer app, walked from its click command tree."""
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd, prefix: list[str]) -> None:
        paths.append(prefix)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, [*prefix, name])

    walk(root, [])
    return paths


def test_the_command_tree_holds_the_contract():
    names = {" ".join(p) for p in _command_paths()}
    contract = {"init", "check", "serve", "demo", "device add", "device list", "device show", "device remove",
                "user add", "user list", "user show", "user disable", "user enable", "user key add", "request",
                "approve", "deny", "grants list", "requests list", "revoke", "sessions list", "sessions show",
                "sessions kill", "replay", "export", "audit verify", "audit log"}
    assert contract <= names, contract - names


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "medbroker")
def test_every_command_has_help(path):
    r = runner.invoke(app, [*path, "--help"])
    assert r.exit_code == 0, r.stderr
    assert "Usage:" in r.stdout
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    assert (cmd.help or "").strip(), f"{' '.join(path)} has no help text"


def test_usage_errors_exit_2_without_traceback(home):
    r = home.run("device", "add", "ct-01")
    assert r.exit_code == 2 and "Missing option" in r.stderr
    r = home.run("no-such-command")
    assert r.exit_code == 2


# ----------------------------------------------------------------------------- real processes
def _proc(args: list[str], home: Path, *, input: str | None = None, exe: list[str] | None = None):
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    env["MEDBROKER_HOME"] = str(home)
    return subprocess.run([*(exe or [sys.executable, "-m", "broker.cli"]), *args], input=input, capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)


def test_subprocess_init_check_and_broken_config(tmp_path):
    home = tmp_path / "home"
    r = _proc(["init"], home)
    assert r.returncode == 0, r.stderr
    assert "Initialised medbroker home" in r.stdout
    r = _proc(["check"], home)
    assert r.returncode == 0 and "FAIL" not in r.stdout
    (home / "keys" / "host_ed25519").unlink()
    r = _proc(["check"], home)
    assert r.returncode == 2
    assert any(line.startswith("FAIL") and "host key" in line for line in r.stdout.splitlines())
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr


def test_subprocess_request_flow_and_json(world):
    """The same workflow through a real process: stdout/stderr split, exit codes, no traceback."""
    r = _proc(["request", "ct-01", "--user", "alice", "--for", "90s", "--reason", "check", "--json"], world.path)
    assert r.returncode == 0, r.stderr
    rid = json.loads(r.stdout)["id"]
    r = _proc(["approve", str(rid), "--by", "alice"], world.path)
    assert r.returncode == 1 and r.stderr.splitlines()[0] == "Error: alice (vendor) may not approve requests"
    assert r.stderr.splitlines()[1].startswith("Hint: ") and r.stdout == ""
    r = _proc(["approve", str(rid), "--by", "bob", "--json"], world.path)
    assert r.returncode == 0 and json.loads(r.stdout)["grant"]["ends_at"]
    r = _proc(["request", "ct-01", "--user", "alice", "--for", "abc", "--reason", "x"], world.path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'abc' is not a duration" in r.stderr


def test_console_script_runs(tmp_path):
    exe = shutil.which("medbroker")
    if exe is None:
        pytest.skip("medbroker console script not installed (pip install -e .)")
    r = _proc(["--help"], tmp_path / "home", exe=[exe])
    assert r.returncode == 0 and "medbroker" in r.stdout and "audit" in r.stdout
    r = _proc(["user", "list"], tmp_path / "home", exe=[exe])
    assert r.returncode == 2 and "not a medbroker home" in r.stderr
