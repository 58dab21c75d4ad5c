"""The medbroker CLI as a person uses it: typer's CliRunner in-process, and real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from broker.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers
class Home:
    """One broker home driven through the CLI, with a few read-only DB helpers for assertions."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *args: str, input: str | None = None):
        result = runner.invoke(app, ["--home", str(self.path), *args], input=input)
        assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
        assert "\x1b[" not in result.stdout, "colour codes on a non-terminal stdout"
        return result

    def ok(self, *args: str, input: str | None = None):
        result = self.run(*args, input=input)
        assert result.exit_code == 0, f"{args} -> {result.exit_code}\n{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str, input: str | None = None):
        return json.loads(self.ok(*args, "--json", input=input).stdout)

    def fails(self, code: int, *args: str, input: str | None = None):
        result = self.run(*args, input=input)
        assert result.exit_code == code, f"{args} -> {result.exit_code}\n{result.stdout}\n{result.stderr}"
        assert result.stderr.startswith("Error: "), result.stderr
        return result

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.path / "medbroker.db")
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def count(self, table: str) -> int:
        return self.rows(f"SELECT count(*) FROM {table}")[0][0]

    def events(self, name: str) -> list[tuple]:
        return self.rows("SELECT actor, user_name, device, request_id, grant_id, details FROM audit_events "
                         "WHERE event = ? ORDER BY id", (name,))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """ssh-keygen key pairs shared by this module's tests (read-only): name -> KeyPair."""
    from helpers import missing_openssh_binaries
    from helpers.keys import generate_keypair

    if "ssh-keygen" in missing_openssh_binaries():
        pytest.skip("ssh-keygen is missing")
    directory = tmp_path_factory.mktemp("keys")
    return {name: generate_keypair(directory, name) for name in ("alice", "laptop", "device", "host", "host2")}


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path / "home")
    h.ok("init")
    return h


@pytest.fixture
def people(home, keys) -> Home:
    """alice (vendor, with a key), bob and dave (approvers), carol (security), root (admin)."""
    home.ok("user", "add", "alice", "--role", "vendor", "--key", str(keys["alice"].public_path),
            "--company", "Acme Imaging")
    for name, role in (("bob", "approver"), ("dave", "approver"), ("carol", "security"), ("root", "admin")):
        home.ok("user", "add", name, "--role", role)
    return home


@pytest.fixture
def device_key(keys):
    return keys["device"]


@pytest.fixture
def world(people, device_key, keys) -> Home:
    """people plus ct-01 (standard) and mri-01 (critical)."""
    hk = keys["host"].public_key
    people.ok("device", "add", "ct-01", "--host", "127.0.0.1", "--login", "service", "--key",
              str(device_key.private_path), "--host-key", hk, "--protect", "/data/dicom")
    people.ok("device", "add", "mri-01", "--host", "127.0.0.1", "--login", "service", "--key",
              str(device_key.private_path), "--host-key", hk, "--class", "critical")
    return people


def _request(h: Home, *extra: str, device: str = "ct-01", user: str = "alice") -> int:
    doc = h.json("request", device, "--user", user, "--for", "2h", "--reason", "tube replacement", *extra)
    return doc["id"]


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


# ----------------------------------------------------------------------------- requests and grants
def test_request_approve_and_grants_list(world):
    r = world.ok("request", "ct-01", "--user", "alice", "--for", "2h", "--reason", "tube replacement",
                 "--ticket", "WO-1234")
    assert r.stdout.startswith("Request 1 created: alice → ct-01 for 2h (pending; approvers run: "
                               "medbroker approve 1 --by NAME)")
    pending = world.json("grants", "list")
    assert pending["grants"] == [] and [p["id"] for p in pending["pending_requests"]] == [1]
    assert world.json("requests", "list", "--pending")["requests"][0]["ticket"] == "WO-1234"
    decision = world.json("approve", "1", "--by", "bob", "--for", "30m")
    grant = decision["grant"]
    assert decision["approvals_needed"] == 0 and decision["request"]["status"] == "approved"
    assert grant["user"] == "alice" and grant["device"] == "ct-01" and grant["approved_by"] == ["bob"]
    assert grant["state"] == "active" and 1790 <= grant["remaining_s"] <= 1800
    listed = world.json("grants", "list", "--active")
    assert [g["id"] for g in listed["grants"]] == [grant["id"]] and listed["pending_requests"] == []
    assert world.json("grants", "list", "--user", "bob")["grants"] == []
    human = world.ok("grants", "list").stdout
    assert "alice" in human and "active" in human and "Pending requests" in human
    ((actor, user, device, rid, gid, _),) = world.events("grant.created")
    assert (actor, user, device, rid, gid) == ("bob", "alice", "ct-01", 1, grant["id"])
    assert world.events("request.created")[0][0] == "alice"


def test_request_with_forwards_and_mode(world):
    doc = world.json("request", "ct-01", "--user", "alice", "--for", "45m", "--reason", "service UI",
                     "--forward", "127.0.0.1:8080", "--forward", "[::1]:443", "--mode", "read-only")
    assert doc["forwards"] == ["127.0.0.1:8080", "[::1]:443"] and doc["mode"] == "read-only"
    assert doc["duration_s"] == 2700 and doc["status"] == "pending"
    grant = world.json("approve", str(doc["id"]), "--by", "bob")["grant"]
    assert grant["forwards"] == doc["forwards"] and grant["mode"] == "read-only"
    assert "is not HOST:PORT" in world.fails(2, "request", "ct-01", "--user", "alice", "--for", "1h", "--reason",
                                             "x", "--forward", "8080").stderr
    assert "mode 'write' is not known" in world.fails(2, "request", "ct-01", "--user", "alice", "--for", "1h",
                                                      "--reason", "x", "--mode", "write").stderr
    assert world.count("access_requests") == 1
    table = world.ok("requests", "list").stdout
    assert "service UI" in table and "approved" in table


def test_human_approve_prints_the_grant_and_window(world):
    rid = _request(world)
    out = world.ok("approve", str(rid), "--by", "bob").stdout
    assert f"Request {rid} approved: grant 1 lets alice on ct-01" in out and "(2h)" in out


def test_critical_device_needs_two_distinct_approvers(world):
    rid = _request(world, device="mri-01")
    first = world.ok("approve", str(rid), "--by", "bob")
    assert "1 of 2 approvals recorded" in first.stdout and "a second approver must approve" in first.stdout
    assert world.count("grants") == 0
    assert "already approved" in world.fails(1, "approve", str(rid), "--by", "bob").stderr
    doc = world.json("approve", str(rid), "--by", "dave")
    assert doc["grant"]["approved_by"] == ["bob", "dave"]


def test_own_request_is_refused_and_audited(world):
    rid = _request(world, user="bob")
    r = world.fails(1, "approve", str(rid), "--by", "bob")
    assert "bob cannot approve their own request" in r.stderr and "Hint: another approver" in r.stderr
    assert world.count("grants") == 0
    assert world.events("request.refused")[-1][:4] == ("bob", "bob", "ct-01", rid)


def test_approving_twice_is_refused_and_changes_nothing(world):
    rid = _request(world)
    world.ok("approve", str(rid), "--by", "bob")
    r = world.fails(1, "approve", str(rid), "--by", "dave")
    assert f"request {rid} was already approved by bob" in r.stderr
    assert world.count("grants") == 1


def test_vendor_cannot_approve(world):
    rid = _request(world)
    r = world.fails(1, "approve", str(rid), "--by", "alice")
    assert "alice (vendor) may not approve requests" in r.stderr
    assert world.count("grants") == 0
    assert world.rows("SELECT status FROM access_requests WHERE id = ?", (rid,)) == [("pending",)]


def test_approving_an_expired_request_is_refused(tmp_path, keys):
    h = Home(tmp_path / "short")
    h.path.mkdir()
    (h.path / "broker.toml").write_text('[grants]\nrequest_ttl = "1s"\n')
    h.ok("init")
    h.ok("user", "add", "alice", "--role", "vendor")
    h.ok("user", "add", "bob", "--role", "approver")
    h.ok("device", "add", "ct-01", "--host", "10.1.2.3", "--login", "svc", "--key",
         str(keys["device"].private_path), "--host-key", keys["host"].public_key)
    rid = _request(h)
    time.sleep(1.1)
    assert h.json("requests", "list")["requests"][0]["status"] == "expired"
    r = h.fails(1, "approve", str(rid), "--by", "bob")
    assert f"request {rid} expired undecided" in r.stderr and "request again" in r.stderr
    assert h.count("grants") == 0
    assert h.rows("SELECT status FROM access_requests") == [("expired",)]
    assert len(h.events("request.expired")) == 1


@pytest.mark.parametrize("duration, message", [
    ("0s", "must be longer than zero"),
    ("-5m", "is not a duration"),
    ("999d", "longer than the 8h maximum"),
    ("abc", "is not a duration"),
])
def test_bad_durations_are_usage_errors_and_change_nothing(world, duration, message):
    before = world.count("audit_events")
    r = world.fails(2, "request", "ct-01", "--user", "alice", "--for", duration, "--reason", "x")
    assert message in r.stderr and "Hint:" in r.stderr
    assert world.count("access_requests") == 0 and world.count("audit_events") == before
    rid = _request(world)
    before = world.count("audit_events")
    if duration != "999d":  # approving for longer than requested is refused separately below
        assert message in world.fails(2, "approve", str(rid), "--by", "bob", "--for", duration).stderr
    assert world.count("grants") == 0 and world.count("audit_events") == before


def test_approve_cannot_lengthen_the_window(world):
    rid = _request(world)
    assert "may shorten the window, not lengthen it" in world.fails(2, "approve", str(rid), "--by", "bob",
                                                                    "--for", "3h").stderr
    assert world.count("grants") == 0 and world.count("approvals") == 0


def test_unknown_device_user_and_ids(world):
    r = world.fails(1, "request", "ct-99", "--user", "alice", "--for", "1h", "--reason", "x")
    assert "device ct-99 is not registered" in r.stderr
    assert "user zed does not exist" in world.fails(1, "request", "ct-01", "--user", "zed", "--for", "1h",
                                                    "--reason", "x").stderr
    assert "request 42 does not exist" in world.fails(1, "approve", "42", "--by", "bob").stderr
    assert "grant 42 does not exist" in world.fails(1, "revoke", "42", "--by", "carol").stderr
    r = world.run("approve", "twelve", "--by", "bob")
    assert r.exit_code == 2 and "REQUEST_ID" in r.stderr and "integer" in r.stderr
    assert world.count("access_requests") == 0


def test_deny_and_deny_after_decision(world):
    rid = _request(world)
    doc = world.json("deny", str(rid), "--by", "bob", "--reason", "not during clinic hours")
    assert doc["status"] == "denied" and doc["decision_reason"] == "not during clinic hours"
    assert "already denied" in world.fails(1, "approve", str(rid), "--by", "dave").stderr
    assert world.events("request.denied")[0][0] == "bob"


def test_revoke(world):
    rid = _request(world)
    gid = world.json("approve", str(rid), "--by", "bob")["grant"]["id"]
    assert "alice (vendor) may not revoke grants" in world.fails(1, "revoke", str(gid), "--by", "alice").stderr
    doc = world.json("revoke", str(gid), "--by", "carol", "--reason", "vendor left the site")
    assert doc["grant"]["state"] == "revoked" and doc["grant"]["revoked_by"] == "carol"
    assert doc["ending_sessions"] == []
    assert world.json("grants", "list", "--active")["grants"] == []
    assert "already revoked" in world.fails(1, "revoke", str(gid), "--by", "carol").stderr
    ((actor, user, device, _, g, details),) = world.events("grant.revoked")
    assert (actor, user, device, g) == ("carol", "alice", "ct-01", gid)
    assert json.loads(details)["reason"] == "vendor left the site"


def test_disabled_people_cannot_act(world):
    rid = _request(world)
    world.ok("user", "disable", "bob")
    assert "bob is disabled" in world.fails(1, "approve", str(rid), "--by", "bob").stderr
    world.ok("user", "disable", "alice")
    assert "alice is disabled" in world.fails(1, "request", "ct-01", "--user", "alice", "--for", "1h",
                                              "--reason", "x").stderr
    assert world.count("grants") == 0 and world.count("access_requests") == 1


# ----------------------------------------------------------------------------- audit
def test_audit_log_filters(world):
    rid = _request(world)
    world.ok("approve", str(rid), "--by", "bob")
    events = world.json("audit", "log")["events"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    grants = world.json("audit", "log", "--event", "grant")["events"]
    assert [e["event"] for e in grants] == ["grant.created"] and grants[0]["details"]["approved_by"] == ["bob"]
    last = world.json("audit", "log", "--limit", "2")["events"]
    assert [e["event"] for e in last] == ["request.approved", "grant.created"]
    assert "grant.created" in world.ok("audit", "log", "--limit", "1").stdout
    assert "not in the catalogue" in world.fails(2, "audit", "log", "--event", "nonsense").stderr


def test_audit_verify_passes_then_names_a_tampered_row(world):
    _request(world)
    assert world.json("audit", "verify")["ok"] is True
    assert "audit chain: ok" in world.ok("audit", "verify").stdout
    conn = sqlite3.connect(world.path / "medbroker.db")
    try:
        with conn:
            conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE id = 3")
    finally:
        conn.close()
    r = world.fails(1, "audit", "verify")
    assert "audit row 3: content does not match its hash (altered)" in r.stdout
    assert "verification failed: audit chain" in r.stderr
    doc = json.loads(world.run("audit", "verify", "--json").stdout)
    assert doc["ok"] is False and doc["audit"]["problems"] == ["audit row 3: content does not match its hash (altered)"]


def test_audit_verify_notices_a_deleted_row(world):
    conn = sqlite3.connect(world.path / "medbroker.db")
    try:
        with conn:
            conn.execute("DELETE FROM audit_events WHERE id = 2")
    finally:
        conn.close()
    r = world.fails(1, "audit", "verify")
    assert "audit row 2: missing" in r.stdout


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
