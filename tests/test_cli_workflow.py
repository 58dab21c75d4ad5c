"""The approval workflow through the CLI: request, approve, deny, revoke, grants/requests list, audit log/verify."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from cli_support import Home, device_key, home, keys, people, request_id as _request, world  # noqa: F401


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
    assert doc["forwards"] == [8080, 443] and doc["mode"] == "read-only"
    assert doc["duration_s"] == 2700 and doc["status"] == "pending"
    grant = world.json("approve", str(doc["id"]), "--by", "bob")["grant"]
    assert grant["forwards"] == sorted(doc["forwards"]) and grant["mode"] == "read-only"
    assert "is not a port on the device" in world.fails(2, "request", "ct-01", "--user", "alice", "--for", "1h",
                                                        "--reason", "x", "--forward", "web").stderr
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
