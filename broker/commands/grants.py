"""The approval workflow: ``request``, ``approve``, ``deny``, ``revoke``, ``grants list``, ``requests list``."""

from datetime import datetime
from typing import Annotated

import typer

from broker.commands.common import JSON_HELP, emit_json, open_home, print_table, safe, say, when
from broker.config import format_duration, parse_duration
from broker.forwards import forwards_text
from broker.grants import (MODES, ApprovalRequest, Grant, approval_card, approvals_text, approve_request, deny_request,
                           get_request, list_grants, list_requests, request_grant, revoke_grant)
from broker.identity import get_principal
from broker.grants import check_text

__all__ = ["register", "grants_app", "requests_app", "request_state"]

grants_app = typer.Typer(help="Access windows: active and past grants.", no_args_is_help=True,
                         rich_markup_mode=None)
requests_app = typer.Typer(help="Access requests waiting for (or past) a decision.", no_args_is_help=True,
                           rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
ByOpt = Annotated[str, typer.Option("--by", metavar="NAME", help="The approver deciding (audited as the actor).")]
APPROVER_ROLES = ("approver", "admin")


def request_state(req: ApprovalRequest, now: datetime) -> str:
    """The request's status as of ``now`` (a pending request past its expiry reads as expired)."""
    return "expired" if req.status == "pending" and now >= req.expires_at else req.status


def _request_doc(req: ApprovalRequest, now: datetime) -> dict:
    return req.as_dict() | {"status": request_state(req, now)}


def _say_request(req: ApprovalRequest) -> None:
    say(f"Request {req.id} created: {req.user} → {req.device} for {format_duration(req.duration_s)} "
        f"(pending; approvers run: medbroker approve {req.id} --by NAME)")


def request(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(metavar="DEVICE", help="Device name, e.g. ct-01.")],
    user: Annotated[str, typer.Option("--user", metavar="NAME", help="The person who needs access (the requester).")],
    duration: Annotated[str, typer.Option("--for", metavar="DURATION", help="Window length: 90s, 15m, 2h, 1d.")],
    reason: Annotated[str, typer.Option("--reason", help="What the work is (shown to approvers, audited).")],
    ticket: Annotated[str | None, typer.Option("--ticket", metavar="REF", help="Work order or ticket.")] = None,
    forward: Annotated[list[str] | None, typer.Option(
        "--forward", metavar="PORT", help="A port on the device the window should let the vendor forward to "
                                          "(ssh -L 8443:DEVICE:443); repeatable. localhost:PORT and DEVICE:PORT "
                                          "are accepted; other hosts and patient-data ports are refused.")] = None,
    mode: Annotated[str, typer.Option("--mode", help=f"{', '.join(MODES)}.")] = "normal",
    as_json: JsonOpt = False,
) -> None:
    """Request access to a device for a time window; prints the request id."""
    seconds = parse_duration(duration, what="--for")
    a = open_home(ctx)
    principal = get_principal(a.store, user)  # request_grant refuses disabled users
    now = a.clock.now()
    req = request_grant(a.store, a.audit, a.rules, principal, device, seconds, reason, now, ticket=ticket,
                        forwards=tuple(forward or ()), mode=mode, source="cli")
    if as_json:
        emit_json(_request_doc(req, now))
    else:
        _say_request(req)


def approve(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument(metavar="REQUEST_ID", help="The id `request` printed.")],
    by: ByOpt,
    duration: Annotated[str | None, typer.Option(
        "--for", metavar="DURATION", help="Grant a shorter window than requested (the shortest any approver "
                                          "chose applies).")] = None,
    allow_shell: Annotated[bool, typer.Option(
        "--allow-shell", help="For a read-only or upload-only request: also allow a shell and commands "
                              "(otherwise the grant is files-only: sftp and scp).")] = False,
    strike: Annotated[list[str] | None, typer.Option(
        "--strike", metavar="PORT", help="Leave this requested port forward out of the grant (repeatable; "
                                         "audited).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a pending request: the grant window starts now."""
    seconds = parse_duration(duration, what="--for") if duration is not None else None
    a = open_home(ctx)
    approver = get_principal(a.store, by)  # the domain checks (and audits) role, state and own-request
    now = a.clock.now()
    dec = approve_request(a.store, a.audit, a.rules, request_id, approver, now, duration_s=seconds,
                          allow_shell=allow_shell, strike=tuple(strike or ()))
    card = approval_card(a.store, a.rules, dec.request)
    if as_json:
        emit_json({"request": _request_doc(dec.request, now), "grant": dec.grant.as_dict(now) if dec.grant else None,
                   "approvals_needed": dec.approvals_needed, "card": card})
        return
    if dec.grant is None:
        have = len(dec.request.approvals)
        total = have + dec.approvals_needed
        more = ("a second approver" if dec.approvals_needed == 1 and have == 1
                else f"{dec.approvals_needed} more approver(s)")
        why = "critical" if card["containment"] != "exposed" else card["containment"]
        say(f"{have} of {total} approvals recorded for request {request_id} ({dec.request.device} is {why}; "
            f"approvals so far: {approvals_text(dec.request)}); "
            f"{more} must approve: medbroker approve {request_id} --by NAME")
        return
    g = dec.grant
    files = (" Files only (sftp and scp): no shell or commands." if g.shell == "files-only" else "")
    say(f"Request {request_id} approved: grant {g.id} lets {g.user} on {g.device} from {when(g.starts_at)} "
        f"until {when(g.ends_at)} ({format_duration((g.ends_at - g.starts_at).total_seconds())}), approved by "
        f"{approvals_text(dec.request)}.{files}"
        + (f" Port forwards: {forwards_text(g.forwards)}." if dec.request.forwards else ""))


def deny(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument(metavar="REQUEST_ID", help="The request to deny.")],
    by: ByOpt,
    reason: Annotated[str | None, typer.Option("--reason", help="Why (shown to the requester, audited).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Deny a pending request."""
    a = open_home(ctx)
    approver = get_principal(a.store, by)
    now = a.clock.now()
    req = deny_request(a.store, a.audit, request_id, approver, now, reason)
    if as_json:
        emit_json(_request_doc(req, now))
        return
    say(f"Request {request_id} denied ({req.user} → {req.device})" + (f": {safe(reason)}" if reason else "."))


def revoke(
    ctx: typer.Context,
    grant_id: Annotated[int, typer.Argument(metavar="GRANT_ID", help="The grant to end.")],
    by: Annotated[str, typer.Option("--by", metavar="NAME", help="Approver, security or admin (audited).")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (shown to the vendor, audited).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a grant: its live sessions end at once (the broker checks every half second)."""
    if reason is not None:
        check_text(reason, "the reason", 500, '--reason "work finished early"')
    a = open_home(ctx)
    principal = get_principal(a.store, by)  # revoke_grant checks (and audits) role and state
    now = a.clock.now()
    grant = revoke_grant(a.store, a.audit, grant_id, principal, now, reason)
    live = [s["id"] for s in a.store.list_sessions(status="live") if s["grant_id"] == grant_id]
    if as_json:
        emit_json({"grant": grant.as_dict(now), "ending_sessions": live})
        return
    tail = f"; {len(live)} live session(s) end now: {', '.join(live)}" if live else "; no live sessions"
    say(f"Grant {grant_id} revoked ({grant.user} on {grant.device}){tail}.")


def _grant_rows(grants: list[Grant], now: datetime):
    for g in grants:
        state = g.state(now)
        left = format_duration((g.ends_at - now).total_seconds()) if state == "active" else "-"
        mode = g.mode + (" (files only)" if g.shell == "files-only" else "")
        yield [g.id, g.user, g.device, state, when(g.starts_at), when(g.ends_at), left, ",".join(g.approved_by),
               mode, g.request_id]


def _request_rows(reqs: list[ApprovalRequest], now: datetime, store=None):
    for r in reqs:
        dev = (store.get_device(r.device) or {}) if store is not None else {}
        device = r.device + (" (EXPOSED)" if dev.get("containment") == "exposed" else "")
        yield [r.id, r.user, device, format_duration(r.duration_s), request_state(r, now), r.reason, r.ticket,
               approvals_text(r) if r.approvals else "", when(r.created_at), when(r.expires_at)]


_REQUEST_COLUMNS = ["id", "user", "device", "for", "status", "reason", "ticket", "approvals", "created", "expires"]


@grants_app.command("list")
def grants_list(
    ctx: typer.Context,
    active: Annotated[bool, typer.Option("--active", help="Only grants usable now.")] = False,
    user: Annotated[str | None, typer.Option("--user", metavar="NAME", help="Only this user's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Active and past grants, plus the requests still waiting for approval."""
    a = open_home(ctx)
    now = a.clock.now()
    grants = [g for g in list_grants(a.store, user=user) if not active or g.state(now) == "active"]
    pending = [r for r in list_requests(a.store, status="pending", user=user) if request_state(r, now) == "pending"]
    if as_json:
        emit_json({"grants": [g.as_dict(now) for g in grants], "pending_requests": [_request_doc(r, now)
                                                                                    for r in pending]})
        return
    print_table(["id", "user", "device", "state", "starts", "ends", "left", "approved by", "mode", "request"],
                _grant_rows(grants, now), title="Grants", empty="no active grants" if active else "no grants")
    print_table(_REQUEST_COLUMNS, _request_rows(pending, now, a.store), title="Pending requests", empty="none")


@requests_app.command("list")
def requests_list(
    ctx: typer.Context,
    pending: Annotated[bool, typer.Option("--pending", help="Only requests waiting for a decision.")] = False,
    user: Annotated[str | None, typer.Option("--user", metavar="NAME", help="Only this user's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Access requests and their decisions."""
    a = open_home(ctx)
    now = a.clock.now()
    reqs = [r for r in list_requests(a.store, user=user) if not pending or request_state(r, now) == "pending"]
    if as_json:
        emit_json({"requests": [_request_doc(r, now) for r in reqs]})
        return
    print_table(_REQUEST_COLUMNS, _request_rows(reqs, now, a.store),
                empty="no pending requests" if pending else "no requests")


@requests_app.command("show")
def requests_show(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument(metavar="REQUEST_ID", help="The request.")],
    as_json: JsonOpt = False,
) -> None:
    """One request as an approver sees it: the device's containment, what approving means, the approvals."""
    a = open_home(ctx)
    now = a.clock.now()
    req = get_request(a.store, request_id)
    card = approval_card(a.store, a.rules, req)
    if as_json:
        emit_json(_request_doc(req, now) | {"card": card})
        return
    typer.echo(f"Request {req.id}: {req.user} -> {req.device} for {format_duration(req.duration_s)} "
               f"({req.mode}), {request_state(req, now)}")
    typer.echo(f"  reason: {safe(req.reason)}" + (f"  ticket: {safe(req.ticket)}" if req.ticket else ""))
    typer.echo(f"  containment: {card['containment']}"
               + (f" (checked {card['containment_checked_at']})" if card["containment_checked_at"] else ""))
    for note in card["notes"]:
        typer.echo(f"  ! {safe(note)}")
    if card["forwards"]:
        typer.echo("  forwards: " + ", ".join(f"{f['port']}" + (" (struck)" if f["struck"] else "")
                                              for f in card["forwards"]))
    typer.echo(f"  approvals: {safe(approvals_text(req))} (needs {card['approvals_needed']})")


def register(app: typer.Typer) -> None:
    """Add the workflow verbs to the root app."""
    app.command("request")(request)
    app.command("approve")(approve)
    app.command("deny")(deny)
    app.command("revoke")(revoke)
