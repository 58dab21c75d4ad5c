"""broker/grants.py: requests, approvals (incl. two-person rule), denials, revocation, windows, audit rows, races."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.audit import AuditLog, parse_details, verify_chain
from broker.clock import FakeClock, utc_iso
from broker.errors import (
    ApprovalRequiredError,
    ConflictError,
    GrantExpiredError,
    NotFoundError,
    PermissionDeniedError,
    UsageError,
)
from broker.grants import (
    Decision,
    GrantRules,
    approve_request,
    deny_request,
    expire_requests,
    find_active_grant,
    get_grant,
    get_request,
    list_grants,
    list_requests,
    request_grant,
    request_hint,
    revoke_grant,
)
from broker.identity import Principal, add_user, get_principal
from broker.store import Store, open_store

RULES = GrantRules(max_duration_s=8 * 3600, request_ttl_s=24 * 3600, critical_approvers=2)
HOUR = 3600


def _device_row(name: str, device_class: str) -> dict[str, Any]:
    return {"name": name, "host": "127.0.0.1", "port": 22, "login": "service", "auth_kind": "password",
            "credential": "k1:sealed", "host_key": "ssh-ed25519 AAAA", "host_key_fingerprint": "SHA256:x",
            "device_class": device_class, "created_at": "2026-01-01T00:00:00.000000Z"}


def populate(store: Store, clock: FakeClock) -> None:
    for name, role in [("alice", "vendor"), ("eve", "vendor"), ("bob", "approver"), ("carol", "approver"),
                       ("dave", "admin"), ("sec", "security"), ("olga", "approver")]:
        add_user(store, name, role, None, clock.now())
    store.set_user_disabled("olga", True)
    store.insert_device(_device_row("ct-01", "standard"))
    store.insert_device(_device_row("mri-01", "critical"))


class World:
    """One broker's domain state: store, clock, audit log and the people in it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.clock = FakeClock()
        self.audit = AuditLog(store, self.clock)

    def who(self, name: str) -> Principal:
        return get_principal(self.store, name)

    @property
    def now(self):  # noqa: ANN201 - datetime
        return self.clock.now()

    def request(self, device: str = "ct-01", duration_s: int = 2 * HOUR, user: str = "alice", **kw: Any):
        return request_grant(self.store, self.audit, RULES, self.who(user), device, duration_s,
                             kw.pop("reason", "replace X-ray tube"), self.now, **kw)

    def approve(self, rid: int, by: str = "bob", **kw: Any) -> Decision:
        return approve_request(self.store, self.audit, RULES, rid, self.who(by), self.now, **kw)

    def deny(self, rid: int, by: str = "bob", reason: str | None = None):
        return deny_request(self.store, self.audit, rid, self.who(by), self.now, reason)

    def events(self, after: int = 0) -> list[tuple]:
        return [(r["event"], r["actor"], r["request_id"], r["grant_id"]) for r in self.store.audit_rows(after_id=after)]

    def last_id(self) -> int:
        rows = self.store.audit_rows()
        return rows[-1]["id"] if rows else 0

    def details(self, event: str) -> list[dict[str, Any]]:
        return [parse_details(r) for r in self.store.audit_rows(event=event) if r["event"] == event]


@pytest.fixture
def w(store_target: Path | str) -> World:
    store = open_store(store_target)
    world = World(store)
    populate(store, world.clock)
    yield world
    store.close()


# ---------------------------------------------------------------- requesting


def test_request_creates_a_pending_request(w: World) -> None:
    req = w.request(ticket="WO-1234", forwards=("127.0.0.1:8080",), mode="read-only", source="192.0.2.5")
    assert (req.user, req.device, req.duration_s, req.status, req.ticket, req.mode) == (
        "alice", "ct-01", 2 * HOUR, "pending", "WO-1234", "read-only")
    assert req.forwards == (8080,)  # stored as the port on the device
    assert req.created_at == w.now and req.expires_at == w.now + timedelta(seconds=RULES.request_ttl_s)
    assert req.grant_id is None and req.approvals == ()
    assert list_requests(w.store, status="pending") == [req]
    assert w.events() == [("request.created", "alice", req.id, None)]
    row = w.store.audit_rows()[0]
    assert (row["user_name"], row["device"], row["source"]) == ("alice", "ct-01", "192.0.2.5")
    assert w.details("request.created") == [{"duration_s": 7200, "reason": "replace X-ray tube", "ticket": "WO-1234",
                                             "forwards": [8080], "mode": "read-only"}]
    assert req.as_dict()["duration"] == "2h"


def test_reason_is_stripped(w: World) -> None:
    assert w.request(reason="  tube  ").reason == "tube"


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        ({"duration_s": 0}, UsageError, "longer than zero"),
        ({"duration_s": -60}, UsageError, "longer than zero"),
        ({"duration_s": 8 * HOUR + 1}, UsageError, "8h maximum"),
        ({"duration_s": 3 * 86400}, UsageError, "3d is longer than the 8h maximum"),
        ({"reason": ""}, UsageError, "reason"),
        ({"reason": "   "}, UsageError, "reason"),
        ({"reason": "x" * 501}, UsageError, "reason"),
        ({"reason": "tube\nreplacement"}, UsageError, "reason"),
        ({"reason": "tube \x1b[2J\x1b[H approved!"}, UsageError, "reason"),
        ({"reason": "tube \x9b2J approved"}, UsageError, "reason"),  # C1 CSI: clears an approver's xterm too
        ({"reason": "tube\x7f"}, UsageError, "reason"),
        ({"ticket": ""}, UsageError, "ticket"),
        ({"ticket": "W" * 101}, UsageError, "ticket"),
        ({"ticket": "WO\x00-1"}, UsageError, "ticket"),
        ({"ticket": "WO\x85-1"}, UsageError, "ticket"),
        ({"mode": "write-all"}, UsageError, "mode 'write-all'"),
        ({"forwards": ("127.0.0.1",)}, UsageError, "forward"),
        ({"forwards": ("127.0.0.1:0",)}, UsageError, "forward"),
        ({"forwards": ("127.0.0.1:70000",)}, UsageError, "forward"),
        ({"device": "ct-99"}, NotFoundError, "device ct-99 is not registered"),
        ({"user": "olga"}, PermissionDeniedError, "olga is disabled"),
    ],
)
def test_bad_requests_change_nothing(w: World, kwargs: dict, exc: type, needle: str) -> None:
    with pytest.raises(exc) as info:
        w.request(**kwargs)
    assert needle in info.value.message, info.value.message
    assert info.value.hint or exc in (UsageError,)
    assert w.store.list_requests() == []
    assert [e[0] for e in w.events()] in ([], ["request.refused"])


def test_refused_requests_by_disabled_users_or_for_unknown_devices_are_audited(w: World) -> None:
    with pytest.raises(PermissionDeniedError):
        w.request(user="olga")
    with pytest.raises(NotFoundError):
        w.request(device="ct-99")
    assert [(e[0], e[1]) for e in w.events()] == [("request.refused", "olga"), ("request.refused", "alice")]
    assert [d["action"] for d in w.details("request.refused")] == ["request", "request"]


def test_reason_of_exactly_500_printable_characters(w: World) -> None:
    assert len(w.request(reason="é" * 500).reason) == 500


def test_forwards_are_ports_on_the_device(w: World) -> None:
    req = w.request(forwards=("443", "localhost:8080", "ct-01:8443"))
    assert req.forwards == (443, 8080, 8443)
    with pytest.raises(UsageError, match="another host"):
        w.request(forwards=("pacs:443",))
    with pytest.raises(PermissionDeniedError, match="can never be forwarded"):
        w.request(forwards=("11112",))


# ---------------------------------------------------------------- approving


def test_approval_creates_a_grant_starting_at_approval(w: World) -> None:
    req = w.request(duration_s=2 * HOUR)
    requested_at = w.now
    w.clock.advance(40 * 60)  # the approver reads the request 40 minutes later
    mark = w.last_id()
    dec = w.approve(req.id)
    g = dec.grant
    assert g is not None and dec.approvals_needed == 0
    assert g.starts_at == requested_at + timedelta(minutes=40) == w.now
    assert g.ends_at == w.now + timedelta(hours=2)
    assert (g.user, g.device, g.approved_by, g.request_id, g.mode) == ("alice", "ct-01", ("bob",), req.id, "normal")
    assert dec.request.status == "approved" and dec.request.grant_id == g.id and dec.request.decided_by == "bob"
    assert dec.request.approvals == ("bob",)
    assert w.events(mark) == [("request.approved", "bob", req.id, g.id), ("grant.created", "bob", req.id, g.id)]
    created = w.details("grant.created")[0]
    assert created["starts_at"] == utc_iso(g.starts_at) and created["ends_at"] == utc_iso(g.ends_at)
    assert created["approved_by"] == ["bob"]
    assert get_grant(w.store, g.id) == g and list_grants(w.store, user="alice") == [g]


def test_find_active_grant_over_the_window(w: World) -> None:
    req = w.request(duration_s=HOUR)
    with pytest.raises(ApprovalRequiredError) as info:
        find_active_grant(w.store, "alice", "ct-01", w.now)  # requested, not approved
    assert info.value.message == "no approved access for alice to ct-01 now"
    assert info.value.hint == request_hint("alice", "ct-01")
    assert "ssh -p 2222 alice@broker request ct-01 --for 2h" in info.value.hint
    g = w.approve(req.id).grant
    assert find_active_grant(w.store, "alice", "ct-01", w.now) == g
    assert g.state(w.now) == "active" and g.as_dict(w.now)["remaining_s"] == HOUR
    w.clock.advance(HOUR - 1)
    assert find_active_grant(w.store, "alice", "ct-01", w.now).id == g.id
    w.clock.advance(1)  # exactly at ends_at: over
    with pytest.raises(ApprovalRequiredError):
        find_active_grant(w.store, "alice", "ct-01", w.now)
    assert g.state(w.now) == "expired" and g.as_dict(w.now)["remaining_s"] == 0
    with pytest.raises(ApprovalRequiredError):
        find_active_grant(w.store, "alice", "ct-01", g.starts_at - timedelta(seconds=1))
    for user, device in [("eve", "ct-01"), ("alice", "mri-01")]:
        with pytest.raises(ApprovalRequiredError):
            find_active_grant(w.store, user, device, g.starts_at)


def test_find_active_grant_custom_hint_and_the_longest_window(w: World) -> None:
    short = w.approve(w.request(duration_s=HOUR).id).grant
    long = w.approve(w.request(duration_s=3 * HOUR).id, by="carol").grant
    assert find_active_grant(w.store, "alice", "ct-01", w.now).id == long.id
    assert short.id != long.id
    with pytest.raises(ApprovalRequiredError) as info:
        find_active_grant(w.store, "eve", "ct-01", w.now, hint="ask at the desk")
    assert info.value.hint == "ask at the desk"


def test_a_shorter_approval_window(w: World) -> None:
    req = w.request(duration_s=4 * HOUR)
    g = w.approve(req.id, duration_s=HOUR).grant
    assert g.ends_at - g.starts_at == timedelta(hours=1)


@pytest.mark.parametrize("duration_s", [4 * HOUR + 1, 0, -1])
def test_an_approval_cannot_lengthen_or_zero_the_window(w: World, duration_s: int) -> None:
    req = w.request(duration_s=4 * HOUR)
    mark = w.last_id()
    with pytest.raises(UsageError) as info:
        w.approve(req.id, duration_s=duration_s)
    assert "requested 4h" in info.value.message
    assert get_request(w.store, req.id).status == "pending" and get_request(w.store, req.id).approvals == ()
    assert w.store.list_grants() == [] and w.events(mark) == []


def test_admin_may_approve(w: World) -> None:
    assert w.approve(w.request().id, by="dave").grant is not None


@pytest.mark.parametrize("by,needle", [
    ("eve", "eve (vendor) may not approve requests"),
    ("sec", "sec (security) may not approve requests"),
    ("olga", "olga is disabled"),
    ("alice", "alice (vendor) may not approve"),
])
def test_who_may_not_approve(w: World, by: str, needle: str) -> None:
    req = w.request()
    mark = w.last_id()
    with pytest.raises(PermissionDeniedError) as info:
        w.approve(req.id, by=by)
    assert needle in info.value.message
    assert get_request(w.store, req.id).status == "pending"
    assert w.events(mark) == [("request.refused", by, req.id, None)]
    refused = w.details("request.refused")[-1]
    assert refused["action"] == "approve" and needle in refused["reason"]


def test_own_request_refused(w: World) -> None:
    req = w.request(user="bob")  # approvers may ask for access too, but not approve it themselves
    mark = w.last_id()
    for decide in (w.approve, w.deny):
        with pytest.raises(PermissionDeniedError) as info:
            decide(req.id, by="bob")
        assert f"bob cannot {decide.__name__} their own request {req.id}" in info.value.message
        assert "another approver" in info.value.hint
    assert [e[0] for e in w.events(mark)] == ["request.refused", "request.refused"]
    assert get_request(w.store, req.id).status == "pending"
    assert w.approve(req.id, by="carol").grant.user == "bob"


def test_approving_twice(w: World) -> None:
    req = w.request()
    g = w.approve(req.id).grant
    mark = w.last_id()
    for by in ("bob", "carol"):
        with pytest.raises(ConflictError) as info:
            w.approve(req.id, by=by)
        assert f"request {req.id} was already approved by bob" in info.value.message
    assert w.events(mark) == [("request.refused", "bob", req.id, None), ("request.refused", "carol", req.id, None)]
    assert [x.id for x in list_grants(w.store)] == [g.id]


def test_deny(w: World) -> None:
    req = w.request()
    w.clock.advance(60)
    mark = w.last_id()
    denied = w.deny(req.id, by="carol", reason="no ticket")
    assert (denied.status, denied.decided_by, denied.decision_reason, denied.decided_at) == (
        "denied", "carol", "no ticket", w.now)
    assert w.events(mark) == [("request.denied", "carol", req.id, None)]
    assert w.details("request.denied") == [{"reason": "no ticket"}]
    with pytest.raises(ConflictError, match="already denied by carol"):
        w.approve(req.id)
    with pytest.raises(ApprovalRequiredError):
        find_active_grant(w.store, "alice", "ct-01", w.now)


def test_deny_after_approve(w: World) -> None:
    req = w.request()
    g = w.approve(req.id).grant
    mark = w.last_id()
    with pytest.raises(ConflictError) as info:
        w.deny(req.id, by="carol")
    assert "already approved by bob" in info.value.message and info.value.hint == "nothing changed"
    assert w.events(mark) == [("request.refused", "carol", req.id, None)]
    assert find_active_grant(w.store, "alice", "ct-01", w.now).id == g.id


@pytest.mark.parametrize("reason", ["x" * 501, "line\nbreak", "esc\x1b[0m", "c1\x9b"])
def test_deny_reason_validation(w: World, reason: str) -> None:
    req = w.request()
    with pytest.raises(UsageError):
        w.deny(req.id, reason=reason)
    assert get_request(w.store, req.id).status == "pending"


def test_unknown_request(w: World) -> None:
    with pytest.raises(NotFoundError, match="request 42 does not exist"):
        w.approve(42)
    with pytest.raises(NotFoundError):
        w.deny(42)
    with pytest.raises(NotFoundError, match="grant 42 does not exist"):
        get_grant(w.store, 42)


# ---------------------------------------------------------------- expiry


def test_expired_request_cannot_be_approved(w: World) -> None:
    req = w.request()
    w.clock.advance(RULES.request_ttl_s)  # exactly at expires_at
    mark = w.last_id()
    with pytest.raises(GrantExpiredError) as info:
        w.approve(req.id)
    assert f"request {req.id} expired undecided" in info.value.message
    assert "request again" in info.value.hint
    assert get_request(w.store, req.id).status == "expired"
    assert w.events(mark) == [("request.expired", None, req.id, None), ("request.refused", "bob", req.id, None)]
    with pytest.raises(GrantExpiredError):
        w.deny(req.id, by="carol")
    assert w.store.list_grants() == []


def test_request_just_before_expiry_can_be_approved(w: World) -> None:
    req = w.request()
    w.clock.advance(RULES.request_ttl_s - 1)
    assert w.approve(req.id).grant is not None


def test_expire_requests_sweeps_and_audits(w: World) -> None:
    old = w.request()
    w.clock.advance(HOUR)
    fresh = w.request(user="eve")
    w.clock.advance(RULES.request_ttl_s - HOUR)
    mark = w.last_id()
    assert expire_requests(w.store, w.audit, w.now) == [old.id]
    assert w.events(mark) == [("request.expired", None, old.id, None)]
    assert get_request(w.store, fresh.id).status == "pending"
    assert expire_requests(w.store, w.audit, w.now) == []


# ---------------------------------------------------------------- critical devices


def test_critical_device_needs_two_distinct_approvers(w: World) -> None:
    req = w.request(device="mri-01", duration_s=2 * HOUR)
    mark = w.last_id()
    first = w.approve(req.id, by="bob")
    assert first.grant is None and first.approvals_needed == 1
    assert first.request.status == "pending" and first.request.approvals == ("bob",)
    assert w.details("request.approved")[-1] == {"approvals": 1, "needed": 2, "final": False, "duration_s": 7200,
                                                 "allow_shell": False, "containment": "unknown"}
    with pytest.raises(ApprovalRequiredError):
        find_active_grant(w.store, "alice", "mri-01", w.now)

    with pytest.raises(ConflictError) as info:  # the same approver again
        w.approve(req.id, by="bob")
    assert "bob already approved" in info.value.message and "different approver" in info.value.hint
    assert get_request(w.store, req.id).approvals == ("bob",)

    w.clock.advance(600)
    second = w.approve(req.id, by="dave")
    g = second.grant
    assert g is not None and second.approvals_needed == 0
    assert g.approved_by == ("bob", "dave")
    assert g.starts_at == w.now  # the window starts when the last approval arrives
    assert second.request.status == "approved" and second.request.decided_by == "bob,dave"
    assert w.events(mark) == [
        ("request.approved", "bob", req.id, None),
        ("request.refused", "bob", req.id, None),
        ("request.approved", "dave", req.id, g.id),
        ("grant.created", "dave", req.id, g.id),
    ]
    assert w.details("request.approved")[-1] == {"approvals": 2, "needed": 2, "final": True, "duration_s": 7200,
                                                 "allow_shell": False, "containment": "unknown"}
    assert find_active_grant(w.store, "alice", "mri-01", w.now).id == g.id


def test_critical_request_can_still_be_denied_after_one_approval(w: World) -> None:
    req = w.request(device="mri-01")
    w.approve(req.id, by="bob")
    assert w.deny(req.id, by="carol", reason="not today").status == "denied"
    assert w.store.list_grants() == []


def test_one_approver_suffices_when_configured(w: World) -> None:
    req = w.request(device="mri-01")
    dec = approve_request(w.store, w.audit, GrantRules(critical_approvers=1), req.id, w.who("bob"), w.now)
    assert dec.grant is not None


# ---------------------------------------------------------------- revocation


def test_revoke(w: World) -> None:
    g = w.approve(w.request().id).grant
    w.clock.advance(300)
    mark = w.last_id()
    revoked = revoke_grant(w.store, w.audit, g.id, w.who("sec"), w.now, "vendor left the site")
    assert (revoked.revoked_at, revoked.revoked_by, revoked.revoke_reason) == (w.now, "sec", "vendor left the site")
    assert revoked.state(w.now) == "revoked"
    assert w.events(mark) == [("grant.revoked", "sec", None, g.id)]
    assert w.details("grant.revoked") == [{"reason": "vendor left the site"}]
    with pytest.raises(ApprovalRequiredError):
        find_active_grant(w.store, "alice", "ct-01", w.now)
    with pytest.raises(ConflictError, match="already revoked"):
        revoke_grant(w.store, w.audit, g.id, w.who("bob"), w.now)
    assert w.events(mark)[-1] == ("request.refused", "bob", None, g.id)
    assert get_grant(w.store, g.id).revoked_by == "sec"


@pytest.mark.parametrize("by", ["alice", "eve", "olga"])
def test_who_may_not_revoke(w: World, by: str) -> None:
    g = w.approve(w.request().id).grant
    mark = w.last_id()
    with pytest.raises(PermissionDeniedError):
        revoke_grant(w.store, w.audit, g.id, w.who(by), w.now)
    assert get_grant(w.store, g.id).revoked_at is None
    assert w.events(mark) == [("request.refused", by, None, g.id)]
    assert w.details("request.refused")[-1]["action"] == "revoke"


def test_revoke_unknown_grant(w: World) -> None:
    with pytest.raises(NotFoundError):
        revoke_grant(w.store, w.audit, 99, w.who("sec"), w.now)


# ---------------------------------------------------------------- the whole story keeps the chain


def test_audit_chain_verifies_after_a_day_of_decisions(w: World) -> None:
    a = w.request()
    w.approve(a.id)
    b = w.request(device="mri-01", user="eve")
    w.approve(b.id, by="bob")
    with pytest.raises(ConflictError):
        w.approve(b.id, by="bob")
    w.approve(b.id, by="carol")
    c = w.request()
    w.deny(c.id, reason="duplicate")
    w.clock.advance(2 * 86400)
    d = w.request()
    w.clock.advance(RULES.request_ttl_s)
    expire_requests(w.store, w.audit, w.now)
    assert get_request(w.store, d.id).status == "expired"
    result = verify_chain(w.store)
    assert result.ok and result.rows == len(w.store.audit_rows()) >= 10


# ---------------------------------------------------------------- races across connections


def _race(db: Path, rid: int, approvers: tuple[str, str]) -> tuple[list[Any], list[Store]]:
    """Run two approvals of one request on two threads with two connections; both pass their checks
    before either writes (a barrier at each thread's first write transaction)."""
    stores = [open_store(db) for _ in approvers]
    barrier = threading.Barrier(len(approvers), timeout=10)
    results: list[Any] = [None] * len(approvers)

    def hold_until_both_checked(started: list[bool]) -> Callable[[str], None]:
        def trace(sql: str) -> None:
            if sql.startswith("BEGIN") and not started:
                started.append(True)
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    pass

        return trace

    def run(i: int) -> None:
        s = stores[i]
        clock = FakeClock()
        clock.advance(60)
        try:
            results[i] = approve_request(s, AuditLog(s, clock), RULES, rid, get_principal(s, approvers[i]),
                                         clock.now())
        except BaseException as exc:
            results[i] = exc

    for s in stores:
        s.db.conn.set_trace_callback(hold_until_both_checked([]))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(approvers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.db.conn.set_trace_callback(None)
    assert not any(t.is_alive() for t in threads)
    return results, stores


@pytest.fixture
def file_world(tmp_path: Path) -> World:
    store = open_store(tmp_path / "medbroker.db")
    world = World(store)
    populate(store, world.clock)
    yield world
    store.close()


@pytest.mark.parametrize("approvers", [("bob", "carol"), ("bob", "bob")])
def test_two_concurrent_approvals_make_exactly_one_grant(file_world: World, tmp_path: Path,
                                                         approvers: tuple[str, str]) -> None:
    w = file_world
    req = w.request()
    results, stores = _race(tmp_path / "medbroker.db", req.id, approvers)
    try:
        grants = [r for r in results if isinstance(r, Decision)]
        errors = [r for r in results if not isinstance(r, Decision)]
        assert len(grants) == 1 and grants[0].grant is not None, results
        assert len(errors) == 1 and isinstance(errors[0], ConflictError), results
        assert len(w.store.list_grants()) == 1
        assert get_request(w.store, req.id).status == "approved"
        assert [e[0] for e in w.events()].count("grant.created") == 1
        assert "request.refused" in [e[0] for e in w.events()]
        assert verify_chain(w.store).ok
    finally:
        for s in stores:
            s.close()


def test_two_concurrent_approvals_of_a_critical_request_make_one_grant(file_world: World, tmp_path: Path) -> None:
    """Both approvers pass their checks seeing no approval yet; the second write must still see the first."""
    w = file_world
    req = w.request(device="mri-01")
    results, stores = _race(tmp_path / "medbroker.db", req.id, ("bob", "carol"))
    try:
        assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, ConflictError)], results
        assert len(w.store.list_grants()) == 1, results
        final = get_request(w.store, req.id)
        assert final.status == "approved" and set(final.approvals) == {"bob", "carol"}
        assert set(w.store.list_grants()[0]["approved_by"].split(",")) == {"bob", "carol"}
    finally:
        for s in stores:
            s.close()


def test_forwards_round_trip_through_the_store(w: World) -> None:
    req = w.request(forwards=("127.0.0.1:8080", "[::1]:443", "8443"))
    g = w.approve(req.id, strike=("8443",)).grant
    assert g.forwards == (443, 8080)  # the approved set: requested minus struck, as ports
    assert json.loads(w.store.get_grant(g.id)["forwards"]) == [443, 8080]
    assert w.details("grant.created")[-1]["struck"] == [8443]
    with pytest.raises(UsageError, match="not among the request's forwards"):
        w.approve(w.request(forwards=("443",)).id, strike=("80",))
