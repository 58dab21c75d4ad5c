"""Web console pages and actions: sign-in, approver inbox, live sessions, recordings, admin lists."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from broker.app import App
from broker.audit import EVENTS, parse_details
from broker.clock import clock_text, display_zone, parse_utc, utc_iso
from broker.config import format_duration, id_in_range, parse_duration, parse_id
from broker.errors import BrokerError, ConflictError, GrantExpiredError, NotFoundError, PermissionDeniedError, UsageError
from broker.grants import (approval_card, approvals_text, approve_request, deny_request, expire_requests, get_request,
                           list_grants, list_requests)
from broker.identity import get_principal
from broker.session_ops import get_session, list_live_sessions, request_kill, running_counters, session_verification
from broker.web_base import HOME, Web, origin_ok, page, source_of
from broker.web_auth import COOKIE, SignedOut, directory_password_signin, end_session, load_session, \
    password_signin, set_password, signin_locked, start_session, uses_directory
from broker.access_links import issue_share_link, redeem_signin_link, resolve_share_link, safe_next_path, token_hash

APPROVE_ROLES = ("approver", "admin")
SHORTER = (("15m", 900), ("30m", 1800), ("1h", 3600), ("2h", 7200), ("4h", 14400))
SIGNED_OUT = {
    "signin": "Sign in to continue.",
    "idle": "You were signed out because the console was idle for too long.",
    "lifetime": "Your console session reached its maximum length.",
    "ended": "That console session has ended.",
    "disabled": "Your account is disabled.",
    "signedout": "You signed out.",
}


def _web(request: Request) -> Web:
    return request.app.state.web


def _back(request: Request, default: str) -> RedirectResponse:
    target = safe_next_path(request.state.form.get("next") if hasattr(request.state, "form") else None)
    return RedirectResponse(target if target != "/" else default, status_code=303)


def _cookie(response: Response, value: str, max_age: int) -> None:
    response.set_cookie(COOKIE, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="lax")


# ---------------------------------------------------------------------------- sign-in
async def home(request: Request) -> Response:
    web = _web(request)
    try:
        viewer = await web.db(lambda: load_session(web.app, request.cookies.get(COOKIE), web.now(), touch=False,
                                                   source=source_of(request)))
    except SignedOut:
        return RedirectResponse("/signin", status_code=303)
    return RedirectResponse(HOME.get(viewer.role, "/account"), status_code=303)


async def _signed_in(web: Web, request: Request, user: str, method: str, next_path: str | None) -> Response:
    raw = await web.db(lambda: start_session(web.app, user, method, web.now(), source=source_of(request),
                                             user_agent=request.headers.get("user-agent")))
    role = (await web.db(get_principal, web.app.store, user)).role
    target = safe_next_path(next_path)
    response = RedirectResponse(target if target != "/" else HOME.get(role, "/account"), status_code=303)
    _cookie(response, raw, web.app.config.seconds("web", "session_max"))
    return response


async def signin_page(request: Request) -> Response:
    web = _web(request)
    reason = request.query_params.get("reason", "signin")
    next_path = safe_next_path(request.query_params.get("next"))
    error = None
    if request.method == "POST":
        form = await request.form(max_files=0, max_fields=8)
        next_field = form.get("next")  # max_files=0: a field is text, never an upload
        next_path = safe_next_path(next_field if isinstance(next_field, str) else None)
        if not origin_ok(web, request):
            error = "this form did not come from the console"
        else:
            name, password = str(form.get("user", "")).strip()[:64], str(form.get("password", ""))
            code, src = str(form.get("code", "")), source_of(request)
            try:
                if await web.db(uses_directory, web.app, name):
                    user = await _directory_signin(web, name, password, code, src)
                    return await _signed_in(web, request, user, "directory+totp", next_path)
                user = await web.db(lambda: password_signin(web.app, name, password, code, web.now(), source=src))
                return await _signed_in(web, request, user, "password+totp", next_path)
            except BrokerError as exc:
                error = exc.message
    return web.render(request, "signin.html", status=401 if error else 200, error=error, next_path=next_path,
                      notice=SIGNED_OUT.get(reason, SIGNED_OUT["signin"]))


async def _directory_signin(web: Web, name: str, password: str, code: str, source: str) -> str:
    """Directory password (asked off the loop and off the store thread), then the TOTP code."""
    from broker.directory import DirectoryError, directory_for, directory_signin

    locked = await web.db(lambda: signin_locked(web.app, name, web.now(), source=source))
    if locked:
        raise PermissionDeniedError(f"too many failed sign-ins; try again in {format_duration(locked)}")
    directory = directory_for(web.app)
    assert directory is not None  # the caller asked uses_directory(), which needs [directory] url
    try:
        checked = await asyncio.get_running_loop().run_in_executor(
            None, lambda: directory_signin(web.app, directory, name, password, web.now()))
    except PermissionDeniedError:
        checked = None
    except DirectoryError as exc:
        await web.audit("web.signin.failed", user=name, source=source, method="directory", reason=exc.message)
        raise
    return await web.db(lambda: directory_password_signin(web.app, checked, name, code, web.now(), source=source))


def _peek_token(app: App, token: str, now) -> dict:
    row = app.store.get_web_token(token_hash(token)) if len(token) < 100 else None
    if row is None:
        raise NotFoundError("this sign-in link is not valid")
    if row["used_at"]:
        raise GrantExpiredError(f"this sign-in link was already used at {row['used_at'][11:19]} UTC")
    if parse_utc(row["expires_at"]) <= now:
        raise GrantExpiredError(f"this sign-in link expired at {row['expires_at'][11:19]} UTC")
    user = app.store.get_user(row["user_name"])
    assert user is not None  # users are disabled, never deleted
    return row | {"role": user["role"]}


async def signin_link(request: Request) -> Response:
    """GET shows a button (link scanners must not burn the link); POST signs in once."""
    web = _web(request)
    token = request.path_params["token"]
    src = source_of(request)
    try:
        if request.method == "GET":
            row = await web.db(_peek_token, web.app, token, web.now())
            return web.render(request, "signin_link.html", user=row["user_name"], role=row["role"])
        if not origin_ok(web, request):
            raise PermissionDeniedError("this form did not come from the console")
        row = await web.db(redeem_signin_link, web.app.store, token, web.now(), src)
        return await _signed_in(web, request, row["user_name"], "ssh-link", row["next_path"])
    except BrokerError as exc:
        await web.audit("web.signin.failed", source=src, method="ssh-link", reason=exc.message)
        exc.hint = f"get a new link over SSH: {web.ssh_hint}"
        return web.error(request, exc)


@page(action="sign out")
async def signout(request: Request, viewer) -> Response:
    web = _web(request)
    await web.db(lambda: end_session(web.app, viewer, web.now(), source=source_of(request)))
    response = RedirectResponse("/signin?reason=signedout", status_code=303)
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="lax")
    return response


@page(action="change account settings")
async def account(request: Request, viewer) -> Response:
    web = _web(request)
    if request.method == "POST":
        f = request.state.form
        try:
            await web.db(lambda: set_password(web.app, viewer, str(f.get("password", "")), str(f.get("confirm", "")),
                                              str(f.get("code", "")), web.now()))
            web.flash(viewer, "ok", "Password set. You can now sign in with user name, password and an "
                                    "authenticator code.")
        except UsageError as exc:
            web.flash(viewer, "error", str(exc))
        return RedirectResponse("/account", status_code=303)
    user = await web.db(web.app.store.get_user, viewer.name)
    has_pw = await web.db(web.app.store.get_web_password, viewer.name)
    return web.render(request, "account.html", viewer=viewer, totp=bool(user["totp_secret"]),
                      has_password=bool(has_pw))


# ---------------------------------------------------------------------------- approver inbox
def _request_cards(app: App, requests: list, viewer_name: str) -> list[dict[str, Any]]:
    now = app.clock.now()
    cards = []
    for r in requests:
        dev = app.store.get_device(r.device) or {}
        user = app.store.get_user(r.user) or {}
        critical = dev.get("device_class") == "critical"
        card = approval_card(app.store, app.rules, r)
        needed = card["approvals_needed"]
        cards.append({
            "containment": card["containment"], "notes": card["notes"], "exposed_paths": card["exposed_paths"],
            "approvals_text": approvals_text(r), "shell_choice": r.mode != "normal", "forwards": card["forwards"],
            "r": r, "critical": critical, "needed": needed, "company": user.get("company"),
            "description": dev.get("description"),
            "waiting": format_duration((now - r.created_at).total_seconds()),
            "requested": format_duration(r.duration_s), "mine": r.user == viewer_name,
            "approved_by_me": viewer_name in r.approvals, "more": max(0, needed - len(r.approvals)),
            "shorter": [(label, s) for label, s in SHORTER if s < r.duration_s],
        })
    return cards


def _inbox_data(app: App, viewer_name: str) -> dict[str, Any]:
    expire_requests(app.store, app.audit, app.clock.now())
    pending = list_requests(app.store, status="pending")
    decided = [get_request(app.store, row["id"]) for row in app.store.decided_requests(25)]
    return {"cards": _request_cards(app, pending, viewer_name), "history": decided}


@page(*APPROVE_ROLES, action="open the approval inbox")
async def inbox(request: Request, viewer) -> Response:
    web = _web(request)
    data = await web.db(_inbox_data, web.app, viewer.name)
    name = "inbox_list.html" if request.query_params.get("part") == "list" else "inbox.html"
    return web.render(request, name, viewer=viewer, **data)


@page(*APPROVE_ROLES, "vendor", action="view access requests")
async def request_page(request: Request, viewer) -> Response:
    web = _web(request)
    rid = request.path_params["rid"]
    req = await web.db(get_request, web.app.store, rid)
    if viewer.role == "vendor" and req.user != viewer.name:
        raise NotFoundError(f"request {rid} does not exist")
    cards = await web.db(_request_cards, web.app, [req], viewer.name)
    return web.render(request, "request.html", viewer=viewer, card=cards[0])


@page(*APPROVE_ROLES, action="approve requests")
async def approve(request: Request, viewer) -> Response:
    web = _web(request)
    rid = request.path_params["rid"]
    text = str(request.state.form.get("duration") or "").strip()
    allow_shell = str(request.state.form.get("allow_shell") or "") == "yes"
    form = request.state.form
    # One checkbox per requested forward (checked = allowed); the form lists what it showed, so an unchecked box
    # is a strike (an unchecked checkbox sends nothing).
    shown = [str(v) for v in form.getlist("forward_shown")] if hasattr(form, "getlist") else []
    kept = {str(v) for v in form.getlist("forward")} if hasattr(form, "getlist") else set()
    strike = tuple(p for p in shown if p not in kept)

    def run():
        dur = parse_duration(text, what="window") if text else None
        principal = get_principal(web.app.store, viewer.name)
        return approve_request(web.app.store, web.app.audit, web.app.rules, rid, principal, web.now(), duration_s=dur,
                               allow_shell=allow_shell, strike=strike)

    try:
        dec = await web.db(run)
    except BrokerError as exc:
        web.flash(viewer, "error", f"Request {rid}: {exc}")
        return _back(request, "/inbox")
    if dec.grant is None:
        why = "exposed" if dec.request.device and (web.app.store.get_device(dec.request.device) or {}).get(
            "containment") == "exposed" else "critical"
        web.flash(viewer, "ok", f"Approval recorded for request {rid} ({dec.request.device} is {why}): "
                                f"{dec.approvals_needed} more approver needed.")
    else:
        left = format_duration((dec.grant.ends_at - dec.grant.starts_at).total_seconds())
        files = " Files only (sftp and scp): no shell or commands." if dec.grant.shell == "files-only" else ""
        web.flash(viewer, "ok", f"Request {rid} approved: {dec.grant.user} may use {dec.grant.device} for {left}, "
                                f"until {clock_text(dec.grant.ends_at, display_zone(web.app.config.display.timezone), seconds=False)} (approved by "
                                f"{approvals_text(dec.request)}).{files}")
    return _back(request, "/inbox")


@page(*APPROVE_ROLES, action="deny requests")
async def deny(request: Request, viewer) -> Response:
    web = _web(request)
    rid = request.path_params["rid"]
    reason = str(request.state.form.get("reason") or "").strip()
    try:
        if not reason:
            raise UsageError("say why you deny it", "the vendor sees the reason")
        principal = await web.db(get_principal, web.app.store, viewer.name)
        await web.db(lambda: deny_request(web.app.store, web.app.audit, rid, principal, web.now(), reason))
        web.flash(viewer, "ok", f"Request {rid} denied.")
    except BrokerError as exc:
        web.flash(viewer, "error", f"Request {rid}: {exc}")
    return _back(request, "/inbox")


@page("vendor", action="view your own access")
async def mine(request: Request, viewer) -> Response:
    web = _web(request)

    def data():
        now = web.now()
        return {"requests": list(reversed(list_requests(web.app.store, user=viewer.name)))[:30],
                "grants": [g for g in list_grants(web.app.store, user=viewer.name) if g.state(now) == "active"]}

    return web.render(request, "mine.html", viewer=viewer, **await web.db(data))


# ---------------------------------------------------------------------------- live sessions
def _running(web: Web) -> dict[str, Any]:
    """This process's live byte counters, taken on the event loop (the store thread must not read live sessions)."""
    return running_counters(web.broker.live if web.broker is not None else None)


@page("approver", "security", "admin", action="see live sessions")
async def sessions_page(request: Request, viewer) -> Response:
    web = _web(request)
    rows = await web.db(list_live_sessions, web.app.store, _running(web))
    name = "sessions_list.html" if request.query_params.get("part") == "list" else "sessions.html"
    return web.render(request, name, viewer=viewer, rows=rows)


async def _session(web: Web, sid: str) -> dict[str, Any]:
    return await web.db(get_session, web.app.store, sid)


@page("security", action="watch live sessions")
async def watch_page(request: Request, viewer) -> Response:
    web = _web(request)
    row = await _session(web, request.path_params["sid"])
    grant = await web.db(web.app.store.get_grant, row["grant_id"]) or {}
    return web.render(request, "watch.html", viewer=viewer, s=row, ends_at=grant.get("ends_at"))


@page("security", action="end live sessions")
async def kill(request: Request, viewer) -> Response:
    web = _web(request)
    sid = request.path_params["sid"]
    reason = str(request.state.form.get("reason") or "").strip()
    try:
        row = await web.db(lambda: request_kill(web.app, sid, actor=viewer.name, reason=reason,
                                                source=source_of(request)))
    except NotFoundError:
        raise
    except BrokerError as exc:
        web.flash(viewer, "error", exc.message[:1].upper() + exc.message[1:] + ".")
    else:
        web.flash(viewer, "ok", f"Ending session {sid} of {row['user_name']} on {row['device']} "
                                "(within a second); the vendor sees your reason.")
    return _back(request, f"/sessions/{sid}/watch")


# ---------------------------------------------------------------------------- recordings
@page("security", action="search recordings")
async def recordings_page(request: Request, viewer) -> Response:
    web = _web(request)
    q = {k: (request.query_params.get(k) or "").strip()[:100] for k in ("q", "user", "device")}
    store = web.app.store
    searchable = hasattr(store, "search_sessions")

    def data():
        rows = store.list_sessions(user=q["user"] or None, device=q["device"] or None)
        hits: dict[str, list] = {}
        if q["q"] and searchable:
            for h in store.search_sessions(q["q"], user=q["user"] or None, device=q["device"] or None, limit=300):
                hits.setdefault(h["session_id"], []).append(h)
            rows = [r for r in rows if r["id"] in hits]
        return list(reversed(rows))[:200], hits

    rows, hits = await web.db(data)
    return web.render(request, "recordings.html", viewer=viewer, rows=rows, hits=hits, q=q, searchable=searchable)


async def _player_context(web: Web, row: dict[str, Any]) -> dict[str, Any]:
    store = web.app.store
    check = await asyncio.get_running_loop().run_in_executor(
        None, lambda: session_verification(web.app, row, name_signature=True))
    verification = check["summary"]
    commands = await web.db(store.session_commands, row["id"]) if hasattr(store, "session_commands") else None
    transfers = await web.db(store.transfers, row["id"])
    return {"s": row, "verification": verification, "verified": not verification.startswith("FAILED"),
            "commands": commands, "transfers": transfers}


@page("security", action="replay recordings")
async def player_page(request: Request, viewer) -> Response:
    web = _web(request)
    row = await _session(web, request.path_params["sid"])
    ctx = await _player_context(web, row)
    shares = await web.db(web.app.store.list_web_shares, row["id"])
    return web.render(request, "player.html", viewer=viewer, cast_url=f"/recordings/{row['id']}/cast", shares=shares,
                      share_choices=(("1d", "1 day"), ("7d", "7 days"), ("30d", "30 days")), shared=False, **ctx)


@page("security", action="share recordings")
async def share(request: Request, viewer) -> Response:
    web = _web(request)
    sid = request.path_params["sid"]
    form = request.state.form
    try:
        ttl = parse_duration(str(form.get("ttl") or "7d"), what="link lifetime")
        link = await web.db(lambda: issue_share_link(web.app.store, web.app.audit, web.app.config, sid, viewer.name,
                                                     web.now(), ttl, str(form.get("note") or "")))
        web.flash(viewer, "share", link.url)
    except BrokerError as exc:
        web.flash(viewer, "error", str(exc))
    return RedirectResponse(f"/recordings/{sid}", status_code=303)


@page("security", action="revoke replay links")
async def revoke_share(request: Request, viewer) -> Response:
    web = _web(request)
    share_id = request.path_params["share_id"]
    ok = id_in_range(share_id) and await web.db(web.app.store.revoke_web_share, share_id, viewer.name,
                                                utc_iso(web.now()))
    if ok:
        await web.audit("recording.share.revoked", actor=viewer.name, share_id=share_id)
        web.flash(viewer, "ok", f"Link {share_id} revoked; it no longer opens the recording.")
    else:
        web.flash(viewer, "error", f"Link {share_id} does not exist or was already revoked.")
    return _back(request, "/recordings")


async def shared_player(request: Request) -> Response:
    """An auditor's view: no account, the token is the permission; every open is audited."""
    web = _web(request)
    token = request.path_params["token"]
    try:
        share_row = await web.db(resolve_share_link, web.app.store, token, web.now()) if len(token) < 100 else None
        if share_row is None:
            raise NotFoundError("this replay link is not valid")
        row = await _session(web, share_row["session_id"])
    except BrokerError as exc:
        await web.audit("web.denied", source=source_of(request), reason="share link", error=exc.message)
        return web.error(request, exc)
    ctx = await _player_context(web, row)
    return web.render(request, "player.html", cast_url=f"/shared/{token}/cast", shares=[], share_choices=(),
                      shared=True, share=share_row, **ctx)


# ---------------------------------------------------------------------------- admin and audit
@page("security", "admin", action="read the audit log")
async def audit_page(request: Request, viewer) -> Response:
    web = _web(request)
    keys = ("event", "actor", "user", "device", "session", "since", "until")
    f = {k: (request.query_params.get(k) or "").strip()[:80] for k in keys}
    try:
        before_text = request.query_params.get("before") or ""
        before = parse_id(before_text, what="before") if before_text.strip() not in ("", "0") else None
        since = utc_iso(parse_utc(f["since"])) if f["since"] else None
        until = utc_iso(parse_utc(f["until"]) + (timedelta(days=1) if len(f["until"]) == 10 else timedelta()))\
            if f["until"] else None
    except (ValueError, OverflowError):
        raise UsageError("dates are written 2026-05-01 or 2026-05-01T08:30", "fix the filter") from None
    rows = await web.db(lambda: web.app.store.search_audit(
        event=f["event"] or None, actor=f["actor"] or None, user=f["user"] or None, device=f["device"] or None,
        session_id=f["session"] or None, since=since, until=until, before_id=before, limit=100))
    for r in rows:
        r["details_dict"] = parse_details(r)
    older = None
    if len(rows) == 100:
        older = "/audit?" + urlencode({k: v for k, v in f.items() if v} | {"before": rows[-1]["id"]})
    return web.render(request, "audit.html", viewer=viewer, rows=rows, f=f, older=older,
                      events=sorted({e.split(".")[0] for e in EVENTS}) + sorted(EVENTS))


@page("security", "admin", action="list devices")
async def devices_page(request: Request, viewer) -> Response:
    web = _web(request)
    rows = await web.db(web.app.store.list_devices)
    for r in rows:
        r["paths"] = json.loads(r["protected_paths"] or "[]")
    return web.render(request, "devices.html", viewer=viewer, rows=rows)


@page("security", "admin", action="list users")
async def users_page(request: Request, viewer) -> Response:
    web = _web(request)

    def data():
        return [{k: v for k, v in u.items() if k not in ("totp_secret", "totp_last_step")}
                | {"keys": len(web.app.store.user_keys(u["name"])), "totp": bool(u["totp_secret"])}
                for u in web.app.store.list_users()]

    return web.render(request, "users.html", viewer=viewer, rows=await web.db(data))


def _set_disabled(app: App, actor: str, name: str, disabled: bool) -> None:
    row = app.store.get_user(name)
    if row is None:
        raise NotFoundError(f"user {name} does not exist")
    if name == actor:
        raise PermissionDeniedError("you cannot disable yourself", "ask another administrator")
    if bool(row["disabled"]) == disabled:
        raise ConflictError(f"user {name} is already {'disabled' if disabled else 'enabled'}", "nothing changed")
    app.store.set_user_disabled(name, disabled)
    app.audit.record("user.disabled" if disabled else "user.enabled", actor=actor, user=name, via="web")


@page("admin", action="disable users")
async def user_disable(request: Request, viewer) -> Response:
    web = _web(request)
    name = request.path_params["name"]
    await web.db(_set_disabled, web.app, viewer.name, name, True)
    web.flash(viewer, "ok", f"{name} is disabled: no new SSH logins, requests or console sessions.")
    return RedirectResponse("/admin/users", status_code=303)


@page("admin", action="enable users")
async def user_enable(request: Request, viewer) -> Response:
    web = _web(request)
    name = request.path_params["name"]
    await web.db(_set_disabled, web.app, viewer.name, name, False)
    web.flash(viewer, "ok", f"{name} is enabled again.")
    return RedirectResponse("/admin/users", status_code=303)
