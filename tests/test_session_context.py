"""broker/session_context.py: who/what/where of a session as one value, and the audit columns it fills."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from broker.audit import AuditLog
from broker.clock import FakeClock
from broker.devices import Device
from broker.grants import Grant
from broker.session_context import SessionIdentity, VendorLogin, new_session_id
from broker.store import open_store

NOW = datetime(2026, 11, 28, 14, 15, 30, tzinfo=timezone.utc)


def _device() -> Device:
    return Device("ct-01", "10.0.0.7", 22, "service", "key", "<sealed>", "ssh-ed25519 AAAA", "SHA256:dev", (),
                  "standard", {}, None, "2026-01-01T00:00:00Z")


def _grant() -> Grant:
    return Grant(41, 7, "alice", "ct-01", NOW, NOW + timedelta(hours=2), ("bob",), (), "read-write", None, None,
                 None)


def _login(via: str | None = None) -> VendorLogin:
    return VendorLogin(user="alice", role="vendor", key="SHA256:abc", source="192.0.2.9", device="ct-01", via=via)


def test_a_session_identity_carries_the_login_device_and_grant_with_a_new_id():
    who = SessionIdentity.for_login(_login(), _device(), _grant(), NOW)
    assert re.fullmatch(r"20261128-141530-[0-9a-f]{6}", who.session_id)
    assert (who.user, who.role, who.key, who.source, who.via) == ("alice", "vendor", "SHA256:abc", "192.0.2.9", None)
    assert who.device.name == "ct-01" and who.grant.id == 41
    assert SessionIdentity.for_login(_login(), _device(), _grant(), NOW).session_id != who.session_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        who.user = "mallory"  # type: ignore[misc]


def test_audit_fields_name_the_session_and_add_source_or_drop_the_grant_only_when_asked():
    who = SessionIdentity.for_login(_login(), _device(), _grant(), NOW)
    sid = who.session_id
    assert who.audit_fields() == {"user": "alice", "device": "ct-01", "session_id": sid, "grant_id": 41}
    assert who.audit_fields(source=True) == {"user": "alice", "device": "ct-01", "session_id": sid,
                                             "grant_id": 41, "source": "192.0.2.9"}
    assert who.audit_fields(grant=False) == {"user": "alice", "device": "ct-01", "session_id": sid}
    assert _login().audit_fields() == {"user": "alice", "device": "ct-01", "source": "192.0.2.9"}


def test_via_is_said_only_for_a_proxyjump_session():
    assert SessionIdentity.for_login(_login(), _device(), _grant(), NOW).via_fields() == {}
    jumped = SessionIdentity.for_login(_login("proxyjump"), _device(), _grant(), NOW)
    assert jumped.via_fields() == {"via": "proxyjump"}


def test_the_audit_fields_fill_the_audit_row_columns_not_its_details(store_target):
    """The fields are the audit row's own columns (user_name, device, session_id, grant_id, source), so SIEM
    rules and ``audit log --session`` find the row; nothing of them lands in the free-form details."""
    store = open_store(store_target)
    audit = AuditLog(store, FakeClock(NOW))
    who = SessionIdentity.for_login(_login(), _device(), _grant(), NOW)
    audit.record("session.warning", **who.audit_fields(source=True), seconds_left=300)
    row = store.search_audit(event="session.warning")[0]
    assert (row["user_name"], row["device"], row["session_id"], row["grant_id"], row["source"]) == \
        ("alice", "ct-01", who.session_id, 41, "192.0.2.9")
    assert json.loads(row["details"]) == {"seconds_left": 300}
    store.close()


def test_new_session_id_sorts_by_time():
    assert new_session_id(NOW) < new_session_id(NOW + timedelta(seconds=1))
