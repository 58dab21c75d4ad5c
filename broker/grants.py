"""Access requests, approvals and time-limited grants: the pure decision logic."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from broker.audit import AuditLog
from broker.clock import clock_text, local_text, parse_utc, utc_iso
from broker.config import format_duration, id_in_range, unsafe_char
from broker.devices import shell_policy
from broker.forwards import ProtectedPorts, forwards_text, grant_ports, parse_forwards, parse_strikes, tls_rule_text
from broker.errors import (
    ApprovalRequiredError,
    ConflictError,
    GrantExpiredError,
    NotFoundError,
    PermissionDeniedError,
    UsageError,
)
from broker.identity import Principal, require_role
from broker.store import Store, dumps

__all__ = [
    "GrantRules",
    "ended_grant_refusal",
    "unknown_device_refusal",
    "approvals_needed",
    "approval_card",
    "approvals_text",
    "ApprovalRequest",
    "Grant",
    "Decision",
    "MODES",
    "request_grant",
    "approve_request",
    "deny_request",
    "find_active_grant",
    "revoke_grant",
    "expire_requests",
    "get_request",
    "get_grant",
    "list_requests",
    "list_grants",
    "request_hint",
    "putty_line",
]

MODES = ("normal", "read-only", "upload-only")
MAX_REASON = 500


def _printable(text: str) -> bool:
    """No control or invisible formatting character (:func:`broker.config.unsafe_char`): reasons and tickets
    are shown on approvers' terminals, where ESC or the one-byte CSI (U+009B) would run terminal commands,
    and in pages and mails, where bidi overrides and zero-width characters change what the approver reads."""
    return unsafe_char(text) is None


def check_text(text: str, what: str, max_len: int, example: str) -> None:
    """Refuse a reason, ticket or note that is too long or holds a character :func:`_printable` refuses.

    :raises UsageError: naming the offending character (e.g. ``U+202E (RIGHT-TO-LEFT OVERRIDE)``)
    """
    if len(text) > max_len:
        raise UsageError(f"{what} is {len(text)} characters long; at most {max_len} are allowed", example)
    bad = unsafe_char(text)
    if bad:
        raise UsageError(f"{what} contains {bad}, a control or invisible formatting character that could hide or "
                         "reorder what an approver reads", f"type it as plain text, e.g. {example}")


@dataclass(frozen=True)
class GrantRules:
    """Limits from ``[grants]`` in broker.toml."""

    max_duration_s: int = 8 * 3600
    request_ttl_s: int = 24 * 3600
    critical_approvers: int = 2
    exposed_shell: str = "two-approvers"  # [policy] exposed_shell: what an exposed device allows by default
    protected_ports: ProtectedPorts = field(default_factory=ProtectedPorts)  # never forwarded (broker/forwards.py)
    forward_tls: str = "contained-only"  # [policy] forward_tls: TLS through forwards (broker/forwards.py)


def approvals_needed(rules: GrantRules, device_row: dict | None) -> int:
    """Distinct approvers a request on this device needs: the critical-class rule, and two when the device
    is known to be exposed and allows shell/exec only with two approvers (so approvers knowingly accept it)."""
    dev = device_row or {}
    needed = rules.critical_approvers if dev.get("device_class") == "critical" else 1
    if dev.get("containment") == "exposed" and \
            shell_policy(dev.get("exposed_shell"), rules.exposed_shell) == "two-approvers":
        needed = max(needed, 2)
    return needed


@dataclass(frozen=True)
class ApprovalRequest:
    """A vendor's request for a window on a device."""

    id: int
    user: str
    device: str
    duration_s: int
    reason: str
    ticket: str | None
    forwards: tuple[str, ...]
    mode: str
    status: str
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decision_reason: str | None
    grant_id: int | None
    approvals: tuple[str, ...] = ()
    approval_details: tuple[dict, ...] = ()  # per approval: approver, at, duration_s (None = as requested), allow_shell,
    # struck (forward ports this approver did not allow)

    @property
    def struck(self) -> tuple[int, ...]:
        """Forward ports any approver struck so far (none of them reaches the grant)."""
        out: dict[int, None] = {}
        for a in self.approval_details:
            out.update(dict.fromkeys(a.get("struck") or ()))
        return tuple(out)

    def as_dict(self) -> dict:
        return {
            "id": self.id, "user": self.user, "device": self.device, "duration_s": self.duration_s,
            "duration": format_duration(self.duration_s), "reason": self.reason, "ticket": self.ticket,
            "forwards": list(self.forwards), "mode": self.mode, "status": self.status,
            "created_at": utc_iso(self.created_at), "expires_at": utc_iso(self.expires_at),
            "decided_at": utc_iso(self.decided_at) if self.decided_at else None,
            "decided_by": self.decided_by, "decision_reason": self.decision_reason,
            "grant_id": self.grant_id, "approvals": list(self.approvals),
            "approval_details": [dict(a) for a in self.approval_details], "struck": list(self.struck),
        }


@dataclass(frozen=True)
class Grant:
    """An approved window: ``user`` may open sessions on ``device`` from ``starts_at`` to ``ends_at``."""

    id: int
    request_id: int
    user: str
    device: str
    starts_at: datetime
    ends_at: datetime
    approved_by: tuple[str, ...]
    forwards: tuple[str, ...]
    mode: str
    revoked_at: datetime | None
    revoked_by: str | None
    revoke_reason: str | None
    shell: str = "allowed"  # "files-only": exec and shell channels are refused (SFTP/scp only)
    containment: str | None = None  # the device's containment as the approvers saw it

    def state(self, now: datetime) -> str:
        if self.revoked_at:
            return "revoked"
        if now < self.starts_at:
            return "future"
        return "active" if now < self.ends_at else "expired"

    def as_dict(self, now: datetime | None = None) -> dict:
        d = {
            "id": self.id, "request_id": self.request_id, "user": self.user, "device": self.device,
            "starts_at": utc_iso(self.starts_at), "ends_at": utc_iso(self.ends_at),
            "approved_by": list(self.approved_by), "forwards": list(self.forwards), "mode": self.mode,
            "revoked_at": utc_iso(self.revoked_at) if self.revoked_at else None,
            "revoked_by": self.revoked_by, "revoke_reason": self.revoke_reason, "shell": self.shell,
            "containment_at_approval": self.containment,
        }
        if now is not None:
            d["state"] = self.state(now)
            d["remaining_s"] = max(0, int((self.ends_at - now).total_seconds())) if d["state"] == "active" else 0
        return d


@dataclass(frozen=True)
class Decision:
    """What an approval did: the request after it, and the grant when one was created."""

    request: ApprovalRequest
    grant: Grant | None
    approvals_needed: int


def _opt_dt(text: str | None) -> datetime | None:
    return parse_utc(text) if text else None


def _approval_detail(a: dict) -> dict:
    try:
        struck = [int(p) for p in json.loads(a.get("strikes") or "[]")]
    except (ValueError, TypeError):
        struck = []
    return {"approver": a["approver"], "at": a["at"], "duration_s": a.get("duration_s"),
            "duration": format_duration(a["duration_s"]) if a.get("duration_s") else None,
            "allow_shell": bool(a.get("allow_shell")), "struck": struck}


def _request(store: Store, row: dict) -> ApprovalRequest:
    rows = store.approvals(row["id"])
    approvals = tuple(a["approver"] for a in rows)
    return ApprovalRequest(
        row["id"], row["user_name"], row["device"], row["duration_s"], row["reason"], row["ticket"],
        tuple(json.loads(row["forwards"])), row["mode"], row["status"], parse_utc(row["created_at"]),
        parse_utc(row["expires_at"]), _opt_dt(row["decided_at"]), row["decided_by"], row["decision_reason"],
        row["grant_id"], approvals, tuple(_approval_detail(a) for a in rows),
    )


def _grant(row: dict) -> Grant:
    return Grant(
        row["id"], row["request_id"], row["user_name"], row["device"], parse_utc(row["starts_at"]),
        parse_utc(row["ends_at"]), tuple(row["approved_by"].split(",")), tuple(json.loads(row["forwards"])),
        row["mode"], _opt_dt(row["revoked_at"]), row["revoked_by"], row["revoke_reason"],
        row.get("shell") or "allowed", row.get("containment"),
    )


def approval_card(store: Store, rules: GrantRules, req: ApprovalRequest) -> dict:
    """What an approver must know before approving ``req``: the device's containment, what approving
    means on it, the grant's shell mode, and the approvals so far with their windows (CLI, SSH and web)."""
    dev = store.get_device(req.device) or {}
    containment = dev.get("containment") or "unknown"
    policy = shell_policy(dev.get("exposed_shell"), rules.exposed_shell)
    try:
        details = json.loads(dev.get("containment_details") or "{}")
    except ValueError:
        details = {}
    exposed = [p.get("path") for p in details.get("paths", []) if p.get("status") in ("readable", "readable-by-name")]
    notes = []
    if containment == "exposed":
        notes.append(f"{req.device} is EXPOSED: its maintenance login can read {', '.join(exposed) or 'protected paths'}, "
                     "so only the broker's guards keep that patient data on the device. " + {
                         "two-approvers": "A shell or exec opens only when two approvers approve: approving means "
                                          "you accept that risk.",
                         "files-only": "Only sftp and scp work on it (no shell or exec), whoever approves.",
                         "allow": "Shell and exec are allowed on it anyway (its policy is allow)."}[policy])
    elif containment == "unknown":
        notes.append(f"{req.device}'s containment is unknown (not checked yet); it is checked when the session "
                     "starts, and if the device is exposed a single approval gives no shell or exec.")
    else:
        notes.append(f"{req.device} is contained: its maintenance login cannot read the protected paths.")
    ports = sorted(grant_ports(req.forwards))
    if ports:
        struck = set(req.struck)
        tls = tls_rule_text(rules.forward_tls)
        notes.append(f"port forwards to {req.device}: "
                     f"{', '.join(str(p) + (' (struck)' if p in struck else f' ({tls})') for p in ports)}"
                     f". Each forwarded connection is recorded (plain text in full and inspected; TLS, e.g. HTTPS, only "
                     f"its sizes: its content cannot be inspected). Strike a port you do not allow: approve {req.id} "
                     "--strike PORT.")
    if req.mode != "normal":
        notes.append(f"{req.mode} request: files only (sftp and scp, no shell or exec) unless you approve it "
                     "with --allow-shell (every approver must).")
    return {"containment": containment, "containment_checked_at": dev.get("containment_checked_at"),
            "exposed_paths": exposed, "exposed_allows": policy, "approvals_needed": approvals_needed(rules, dev),
            "notes": notes, "approvals": [dict(a) for a in req.approval_details],
            "forwards": [{"port": p, "struck": p in set(req.struck), "tls": tls_rule_text(rules.forward_tls)}
                         for p in ports]}


def approvals_text(req: ApprovalRequest) -> str:
    """``bob (5m, shell allowed), dave (as requested)``: each approval with its window and shell choice."""
    parts = []
    for a in req.approval_details:
        window = a.get("duration") or "as requested"
        shell = ", shell allowed" if a.get("allow_shell") and req.mode != "normal" else ""
        struck = f", struck {forwards_text(a['struck'])}" if a.get("struck") else ""
        parts.append(f"{a['approver']} ({window}{shell}{struck})")
    return ", ".join(parts) or "-"


def request_hint(user: str, device: str, public_host: str = "broker", port: int = 2222) -> str:
    """The copy-paste command a vendor runs to ask for access, and its PuTTY spelling on a second line."""
    command = f'ssh -p {port} {user}@{public_host} request {device} --for 2h --reason "..."'
    return f"request it with: {command}\n{putty_line(command)}"


_PUTTY_SPELLINGS = (("ssh -p ", "plink -P "), ("scp -P ", "pscp -P "), ("sftp -P ", "psftp -P "))


def putty_line(command: str) -> str:
    """The PuTTY equivalent of an OpenSSH command line the broker prints to a vendor, as a line of its own:
    ``ssh -p 2222 alice@ct-01@broker`` → ``PuTTY: plink -P 2222 alice@ct-01@broker`` (``scp -P`` → ``pscp -P``,
    ``sftp -P`` → ``psftp -P``; the rest is the same for PuTTY's tools). docs/vendors.md explains the PuTTY window.

    :raises ValueError: ``command`` is not one of those forms (a programming error)
    """
    for openssh, putty in _PUTTY_SPELLINGS:
        if command.startswith(openssh):
            return f"PuTTY: {putty}{command[len(openssh):]}"
    raise ValueError(f"no PuTTY spelling for {command!r}")


def get_request(store: Store, request_id: int) -> ApprovalRequest:
    """:raises NotFoundError: unknown id"""
    row = store.get_request(request_id) if id_in_range(request_id) else None
    if not row:
        raise NotFoundError(f"request {request_id} does not exist", "list requests with: medbroker grants list")
    return _request(store, row)


def get_grant(store: Store, grant_id: int) -> Grant:
    """:raises NotFoundError: unknown id"""
    row = store.get_grant(grant_id) if id_in_range(grant_id) else None
    if not row:
        raise NotFoundError(f"grant {grant_id} does not exist", "list grants with: medbroker grants list")
    return _grant(row)


def list_requests(store: Store, *, status: str | None = None, user: str | None = None) -> list[ApprovalRequest]:
    return [_request(store, r) for r in store.list_requests(status=status, user=user)]


def list_grants(store: Store, *, user: str | None = None) -> list[Grant]:
    return [_grant(r) for r in store.list_grants(user=user)]


def expire_requests(store: Store, audit: AuditLog, now: datetime) -> list[int]:
    """Expire pending requests past their TTL (audited)."""
    ids = store.expire_requests(utc_iso(now))
    for rid in ids:
        row = store.get_request(rid)
        assert row is not None  # just expired: the row exists
        audit.record("request.expired", user=row["user_name"], device=row["device"], request_id=rid)
    return ids


def request_grant(store: Store, audit: AuditLog, rules: GrantRules, requester: Principal, device: str,
                  duration_s: int, reason: str, now: datetime, *, ticket: str | None = None,
                  forwards: tuple[str, ...] = (), mode: str = "normal", source: str | None = None
                  ) -> ApprovalRequest:
    """Create a pending request for ``requester`` on ``device``.

    :raises NotFoundError: unknown device
    :raises UsageError: duration over the cap, empty reason, bad forward or mode
    :raises PermissionDeniedError: disabled requester
    """
    def refuse(exc: Exception) -> None:
        audit.record("request.refused", actor=requester.name, user=requester.name, device=device, source=source,
                     action="request", reason=str(exc))
        raise exc

    if requester.disabled:
        refuse(PermissionDeniedError(f"user {requester.name} is disabled", "ask a medbroker administrator"))
    if not store.get_device(device):
        refuse(NotFoundError(f"device {device} is not registered", "ask the hospital which device name to use"))
    if duration_s <= 0:
        raise UsageError("the requested duration must be longer than zero", "e.g. --for 2h")
    if duration_s > rules.max_duration_s:
        raise UsageError(
            f"{format_duration(duration_s)} is longer than the {format_duration(rules.max_duration_s)} maximum",
            f"ask for at most --for {format_duration(rules.max_duration_s)}",
        )
    reason = (reason or "").strip()
    if not reason:
        raise UsageError("a reason of 1-500 printable characters is required",
                         'say what the work is, e.g. --reason "replace X-ray tube"')
    check_text(reason, "the reason", MAX_REASON, '--reason "replace X-ray tube"')
    if ticket is not None and not ticket.strip():
        raise UsageError("ticket must be 1-100 printable characters", "e.g. --ticket WO-1234")
    if ticket is not None:
        check_text(ticket, "the ticket", 100, "--ticket WO-1234")
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not known", f"use one of: {', '.join(MODES)}")
    try:
        device_row = store.get_device(device)
        assert device_row is not None  # refused above when the device is not registered
        ports = parse_forwards(forwards, device, rules.protected_ports, device_row.get("port"))
    except PermissionDeniedError as exc:  # a patient-data port: refused and audited like other refusals
        refuse(exc)
    rid = store.insert_request({
        "user_name": requester.name, "device": device, "duration_s": duration_s, "reason": reason,
        "ticket": ticket, "forwards": dumps(list(ports)), "mode": mode, "status": "pending",
        "created_at": utc_iso(now), "expires_at": utc_iso(now + timedelta(seconds=rules.request_ttl_s)),
    })
    audit.record("request.created", actor=requester.name, user=requester.name, device=device, request_id=rid,
                 source=source, duration_s=duration_s, reason=reason, ticket=ticket, forwards=list(ports),
                 mode=mode)
    return get_request(store, rid)


def _check_decidable(store: Store, audit: AuditLog, request_id: int, approver: Principal, now: datetime,
                     action: str) -> ApprovalRequest:
    req = get_request(store, request_id)

    def refuse(exc: Exception) -> None:
        audit.record("request.refused", actor=approver.name, user=req.user, device=req.device,
                     request_id=request_id, action=action, reason=str(exc))
        raise exc

    if approver.disabled:
        refuse(PermissionDeniedError(f"user {approver.name} is disabled"))
    try:
        require_role(approver, "approver", "admin", action=f"{action} requests")
    except PermissionDeniedError as exc:
        refuse(exc)
    if approver.name == req.user:
        refuse(PermissionDeniedError(f"{approver.name} cannot {action} their own request {request_id}",
                                     "another approver has to decide it"))
    if req.status == "pending" and now >= req.expires_at:
        expire_requests(store, audit, now)
        req = get_request(store, request_id)
    if req.status == "expired":
        refuse(GrantExpiredError(f"request {request_id} expired undecided at {utc_iso(req.expires_at)}",
                                 "the vendor has to request again"))
    if req.status != "pending":
        by = f" by {req.decided_by}" if req.decided_by else ""
        refuse(ConflictError(f"request {request_id} was already {req.status}{by}", "nothing changed"))
    if approver.name in req.approvals:
        refuse(ConflictError(f"{approver.name} already approved request {request_id}",
                             "a second, different approver is needed"))
    return req


def _struck(struck: Any) -> dict[str, Any]:
    """The audit detail naming the ports struck from a request, or nothing."""
    return {"struck": list(struck)} if struck else {}


def approve_request(store: Store, audit: AuditLog, rules: GrantRules, request_id: int, approver: Principal,
                    now: datetime, *, duration_s: int | None = None, allow_shell: bool = False,
                    strike: tuple[str, ...] = ()) -> Decision:
    """Approve a pending request; the grant window starts now.

    Critical devices need ``rules.critical_approvers`` distinct approvers, exposed devices two (unless
    their shell policy says otherwise): earlier approvals are recorded and the request stays pending.
    The window is the shortest any approver chose. A read-only or upload-only grant is files-only (no
    exec or shell channel) unless every approver allowed a shell.

    :param duration_s: an optional shorter window than requested
    :param allow_shell: for a read-only or upload-only request: also allow shell and exec channels
    :param strike: forward ports of the request this approver does not allow (``"8080"``); the grant holds the
        requested ports minus every approver's strikes, and never a port that can never be forwarded
    :raises PermissionDeniedError: not an approver, own request, disabled
    :raises ConflictError: already decided or already approved by this person
    :raises GrantExpiredError: the request expired
    :raises UsageError: ``duration_s`` longer than requested
    """
    req = _check_decidable(store, audit, request_id, approver, now, "approve")
    struck = parse_strikes(strike, req.forwards)
    if duration_s is not None and not 0 < duration_s <= req.duration_s:
        raise UsageError(f"an approval may shorten the window, not lengthen it (requested "
                         f"{format_duration(req.duration_s)})")
    dev = store.get_device(req.device)
    needed = approvals_needed(rules, dev)
    containment = (dev or {}).get("containment") or "unknown"
    conflict: ConflictError | None = None
    gid: int | None = None
    # Re-check, record and count under one write lock: approvals arriving together must see each other
    # (two approvers of a critical device both counted one approval and left it pending for good).
    with store.transaction():
        store.lock_request(request_id)  # other nodes' approvals, denials and expiry of it wait (PostgreSQL)
        current = get_request(store, request_id)
        if current.status != "pending":
            by = f" by {current.decided_by}" if current.decided_by else ""
            conflict = ConflictError(f"request {request_id} was already {current.status}{by}", "nothing changed")
        elif not store.add_approval(request_id, approver.name, utc_iso(now), duration_s, allow_shell, struck):
            conflict = ConflictError(f"{approver.name} already approved request {request_id}",
                                     "a second, different approver is needed")
        else:
            rows = store.approvals(request_id)
            approvers = tuple(a["approver"] for a in rows)
            # The shortest window any approver chose (finding 6: a first approver's --for 5m was dropped).
            length = min([a["duration_s"] for a in rows if a.get("duration_s")] + [req.duration_s])
            shell = "allowed" if req.mode == "normal" or all(a.get("allow_shell") for a in rows) else "files-only"
            all_struck = set(struck)
            for a in rows:
                all_struck.update(_approval_detail(a)["struck"])
            # Checked again at approval: a port the site protected after the request was made never reaches a grant.
            dev_port = (dev or {}).get("port")
            allowed = [p for p in sorted(grant_ports(req.forwards))
                       if p not in all_struck and rules.protected_ports.reason(p, dev_port) is None]
            if len(approvers) >= needed:
                gid = store.decide_request(request_id, "approved", ",".join(approvers), utc_iso(now), None, {
                    "request_id": request_id, "user_name": req.user, "device": req.device,
                    "starts_at": utc_iso(now), "ends_at": utc_iso(now + timedelta(seconds=length)),
                    "approved_by": ",".join(approvers), "forwards": dumps(allowed), "mode": req.mode,
                    "shell": shell, "containment": containment,
                })
    if conflict is not None:  # somebody decided or approved between our check and our write
        audit.record("request.refused", actor=approver.name, user=req.user, device=req.device,
                     request_id=request_id, action="approve", reason=str(conflict))
        raise conflict
    if gid is None:
        audit.record("request.approved", actor=approver.name, user=req.user, device=req.device,
                     request_id=request_id, approvals=len(approvers), needed=needed, final=False,
                     duration_s=duration_s or req.duration_s, allow_shell=allow_shell, containment=containment,
                     **_struck(struck))
        return Decision(get_request(store, request_id), None, needed - len(approvers))
    audit.record("request.approved", actor=approver.name, user=req.user, device=req.device, request_id=request_id,
                 grant_id=gid, approvals=len(approvers), needed=needed, final=True,
                 duration_s=duration_s or req.duration_s, allow_shell=allow_shell, containment=containment,
                 **_struck(struck))
    grant = get_grant(store, gid)
    audit.record("grant.created", actor=approver.name, user=req.user, device=req.device, request_id=request_id,
                 grant_id=gid, starts_at=utc_iso(grant.starts_at), ends_at=utc_iso(grant.ends_at),
                 approved_by=list(approvers), window_s=length, shell=shell, mode=req.mode, containment=containment,
                 forwards=list(grant.forwards), struck=sorted(grant_ports(req.forwards) - set(grant.forwards)),
                 approvals=[{"approver": a["approver"], "duration_s": a.get("duration_s") or req.duration_s,
                             "allow_shell": bool(a.get("allow_shell"))} for a in rows])
    return Decision(get_request(store, request_id), grant, 0)


def deny_request(store: Store, audit: AuditLog, request_id: int, approver: Principal, now: datetime,
                 reason: str | None = None) -> ApprovalRequest:
    """Deny a pending request.

    :raises PermissionDeniedError | ConflictError | GrantExpiredError: as for :func:`approve_request`
    """
    _check_decidable(store, audit, request_id, approver, now, "deny")
    if reason is not None:
        check_text(reason, "the reason", MAX_REASON, '--reason "no work order for this week"')
    if store.decide_request(request_id, "denied", approver.name, utc_iso(now), reason, None) is None:
        raise ConflictError(f"request {request_id} was decided concurrently", "nothing changed")
    req = get_request(store, request_id)
    audit.record("request.denied", actor=approver.name, user=req.user, device=req.device, request_id=request_id,
                 reason=reason)
    return req


def find_active_grant(store: Store, user: str, device: str, now: datetime, *, hint: str | None = None) -> Grant:
    """The grant that lets ``user`` on ``device`` now (the one ending last).

    :raises ApprovalRequiredError: none; the hint says how to request one
    """
    rows = store.active_grants(user, device, utc_iso(now))
    if not rows:
        raise ApprovalRequiredError(f"no approved access for {user} to {device} now",
                                    hint or request_hint(user, device))
    return _grant(rows[0])


def unknown_device_refusal(store: Store, user: str, device: str, hint: str) -> ApprovalRequiredError:
    """The answer to ``alice@nosuch@broker``. A vendor who has held grants learns the device is unknown and
    which of *their* devices exist (never the rest of the inventory); one with no history gets the same
    words as "no grant", so an outsider with a stolen key learns nothing about which devices exist."""
    mine = store.granted_devices(user)
    if not mine:
        return ApprovalRequiredError(f"no approved access for {user} to {device} now", hint)
    return ApprovalRequiredError(f"no device {device!r} among those you have had access to: {', '.join(mine)}",
                                 "ask the hospital for the exact device name")


def ended_grant_refusal(store: Store, user: str, device: str, now: datetime, hint: str,
                        zone=None) -> ApprovalRequiredError:
    """No active grant: say which grant ended when (its window, or a revocation), else the plain refusal.

    :param hint: how to request again (``request_hint``)
    :param zone: the display time zone (broker/clock.py ``display_zone``); UTC is always given too
    """
    row = store.last_ended_grant(user, device, utc_iso(now))
    if row is None:
        return ApprovalRequiredError(f"no approved access for {user} to {device} now", hint)
    grant = _grant(row)
    ended = parse_utc(row["ended_at"])
    when = clock_text(ended, zone) if now - ended < timedelta(hours=20) else local_text(ended, zone)
    if grant.revoked_at is not None and grant.revoked_at < grant.ends_at:
        why = f": {grant.revoke_reason}" if grant.revoke_reason else ""
        text = f"your access to {device} (grant {grant.id}) was revoked by {grant.revoked_by} at {when}{why}"
    else:
        text = f"your access to {device} (grant {grant.id}) ended at {when}"
    text = f"no approved access for {user} to {device} now: {text}"
    return ApprovalRequiredError(text, hint.replace("request it with:", "request again:", 1))


def revoke_grant(store: Store, audit: AuditLog, grant_id: int, by: Principal, now: datetime,
                 reason: str | None = None) -> Grant:
    """Revoke a grant; live sessions are ended by the broker that hosts them.

    :raises PermissionDeniedError: vendors and disabled users cannot revoke (audited)
    :raises ConflictError: already revoked (audited)
    """
    def refuse(exc: Exception) -> None:
        audit.record("request.refused", actor=by.name, grant_id=grant_id if id_in_range(grant_id) else None,
                     action="revoke", reason=str(exc))
        raise exc

    if reason is not None:
        check_text(reason, "the reason", MAX_REASON, '--reason "work finished early"')
    if by.disabled:
        refuse(PermissionDeniedError(f"user {by.name} is disabled"))
    try:
        require_role(by, "approver", "security", "admin", action="revoke grants")
    except PermissionDeniedError as exc:
        refuse(exc)
    grant = get_grant(store, grant_id)
    if not store.revoke_grant(grant_id, by.name, utc_iso(now), reason):
        refuse(ConflictError(f"grant {grant_id} was already revoked", "nothing changed"))
    audit.record("grant.revoked", actor=by.name, user=grant.user, device=grant.device, grant_id=grant_id,
                 reason=reason)
    return get_grant(store, grant_id)
