"""Web console sign-in and browser sessions: cookies, idle timeout, CSRF tokens, password + TOTP, roles."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timedelta

from broker.app import App
from broker.clock import parse_utc, utc_iso
from broker.config import format_duration
from broker.errors import PermissionDeniedError, UsageError
from broker.identity import Principal, get_principal, lockout_remaining
from broker.totp import check_code
from broker.access_links import token_hash

__all__ = ["COOKIE", "Viewer", "SignedOut", "start_session", "load_session", "end_session", "check_csrf",
           "hash_password", "check_password", "set_password", "password_signin", "require"]

# __Host-: the browser only keeps it when Secure, Path=/ and no Domain (no subdomain can overwrite it).
COOKIE = "__Host-medbroker"
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
MIN_PASSWORD = 12
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


@dataclass(frozen=True)
class Viewer:
    """The signed-in person behind one browser request."""

    name: str
    role: str
    company: str | None
    csrf: str
    session_hash: str
    expires_at: datetime

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.role, self.company, False, False)


class SignedOut(Exception):
    """No usable browser session; ``reason`` says why (shown on the sign-in page)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def start_session(app: App, user: str, method: str, now: datetime, *, source: str | None,
                  user_agent: str | None) -> str:
    """Create a browser session for ``user`` (already authenticated); returns the cookie value.

    :raises PermissionDeniedError: the user is disabled or unknown
    """
    principal = get_principal(app.store, user)
    if principal.disabled:
        raise PermissionDeniedError(f"user {user} is disabled", "ask a medbroker administrator")
    raw = secrets.token_urlsafe(32)
    expires = now + timedelta(seconds=app.config.seconds("web", "session_max"))
    app.store.insert_web_session({
        "id_hash": token_hash(raw), "user_name": user, "csrf": secrets.token_urlsafe(32), "method": method,
        "source": source, "user_agent": (user_agent or "")[:200], "created_at": utc_iso(now),
        "last_seen_at": utc_iso(now), "expires_at": utc_iso(expires),
    })
    app.audit.record("web.signin", actor=user, user=user, source=source, method=method,
                     session=token_hash(raw)[:12])
    return raw


def load_session(app: App, cookie: str | None, now: datetime, *, touch: bool, source: str | None) -> Viewer:
    """The viewer for a session cookie, ending the session if it idled out or outlived ``session_max``.

    :param touch: count this request as activity (pages and actions; not live streams)
    :raises SignedOut: no cookie, unknown, ended, idle, too old, or the user was disabled
    """
    if not cookie or len(cookie) > 100:
        raise SignedOut("signin")
    digest = token_hash(cookie)
    row = app.store.get_web_session(digest)
    if row is None:
        raise SignedOut("signin")
    if row["ended_at"]:
        raise SignedOut("ended")
    idle = app.config.seconds("web", "idle_timeout")
    reason = None
    if now >= parse_utc(row["expires_at"]):
        reason = "lifetime"
    elif (now - parse_utc(row["last_seen_at"])).total_seconds() > idle:
        reason = "idle"
    user = app.store.get_user(row["user_name"])
    if reason is None and (user is None or user["disabled"]):
        reason = "disabled"
    if reason is not None:
        if app.store.end_web_session(digest, utc_iso(now), reason):
            app.audit.record("web.signout", actor=row["user_name"], user=row["user_name"], source=source,
                             reason=reason, idle_timeout=format_duration(idle), session=digest[:12])
        raise SignedOut(reason)
    assert user is not None  # a missing user was signed out above
    if touch:
        app.store.touch_web_session(digest, utc_iso(now))
    return Viewer(user["name"], user["role"], user["company"], row["csrf"], digest, parse_utc(row["expires_at"]))


def end_session(app: App, viewer: Viewer, now: datetime, *, source: str | None) -> None:
    """Sign out (audited)."""
    if app.store.end_web_session(viewer.session_hash, utc_iso(now), "signed out"):
        app.audit.record("web.signout", actor=viewer.name, user=viewer.name, source=source, reason="signed out",
                         session=viewer.session_hash[:12])


def check_csrf(viewer: Viewer, submitted: str | None) -> bool:
    """True when a form carries this session's CSRF token (constant-time compare)."""
    return bool(submitted) and hmac.compare_digest(viewer.csrf.encode(), str(submitted).encode("utf-8", "replace"))


def require(viewer: Viewer, *roles: str, action: str) -> None:
    """Server-side role check for a page or action.

    :raises PermissionDeniedError: naming the role needed
    """
    if viewer.role not in roles:
        raise PermissionDeniedError(f"{viewer.name} ({viewer.role}) may not {action}",
                                    f"this needs the role {' or '.join(roles)}; ask a medbroker administrator")


# ---------------------------------------------------------------------------- passwords + TOTP
def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) for storage."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(stored: str, password: str) -> bool:
    """Constant-time check of ``password`` against :func:`hash_password` output; False for malformed input."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(want, got)


def _totp_ok(app: App, user: str, code: str, now: datetime) -> bool:
    """A current, unused code for ``user`` (sealed secret, replay-protected: broker/totp.py)."""
    return check_code(app.store, app.keys, user, code, now).ok


def set_password(app: App, viewer: Viewer, password: str, confirm: str, code: str, now: datetime) -> None:
    """Set the signed-in user's console password; needs an enrolled TOTP and a current code.

    :raises UsageError: too short, mismatch, no TOTP enrolled, wrong code
    """
    user = app.store.get_user(viewer.name)
    if not user or not user["totp_secret"]:
        raise UsageError("a password needs TOTP as a second factor, and you have none enrolled",
                         f"ask an administrator to run: medbroker user totp {viewer.name}")
    if len(password) < MIN_PASSWORD or len(password) > 200:
        raise UsageError(f"the password must be {MIN_PASSWORD}-200 characters long", "a passphrase of 3-4 words works")
    if password != confirm:
        raise UsageError("the two passwords differ", "type the same password twice")
    if not _totp_ok(app, viewer.name, code, now):
        raise UsageError("the authenticator code is wrong or was already used", "wait for the next code")
    app.store.set_web_password(viewer.name, hash_password(password), utc_iso(now))
    app.audit.record("web.password.set", actor=viewer.name, user=viewer.name)


def signin_locked(app: App, name: str, now: datetime, *, source: str) -> int:
    """Seconds the web sign-in of ``name`` from ``source`` stays locked (0: not locked); audits a refusal."""
    limits = app.config.limits
    locked = lockout_remaining(app.store, name, f"web:{source}", now, max_failures=limits.max_auth_failures,
                               window_s=app.config.seconds("limits", "failure_window"),
                               lockout_s=app.config.seconds("limits", "lockout"))
    if locked:
        app.audit.record("web.signin.failed", user=name, source=source, method="password", reason="locked out")
    return locked


def uses_directory(app: App, name: str) -> bool:
    """Does the directory decide ``name``'s sign-in? (Not for local users: they keep their console password.)"""
    if not app.config.directory.url:
        return False
    row = app.store.get_user(name)
    return row is None or row.get("source") == "directory"


def directory_password_signin(app: App, checked: Any, name: str, code: str, now: datetime, *,
                              source: str) -> str:
    """Finish a directory sign-in on the store thread: ``checked`` is the :class:`DirectoryUser` whose password
    the directory accepted (None when it did not); mirrors the account, then wants the TOTP code.

    :raises PermissionDeniedError: one message for every failure (counted toward the lockout)
    """
    from broker.directory import sync_from_directory

    row = sync_from_directory(app, checked, name, now) if checked is not None else None
    ok = bool(checked is not None and row and not row["disabled"] and row["totp_secret"]
              and _totp_ok(app, name, code, now))
    if not ok:
        app.store.add_auth_failure(name, f"web:{source}", utc_iso(now))
        why = "wrong user, directory password or code" if not (checked and row and not row["totp_secret"]) \
            else "no TOTP enrolled"
        app.audit.record("web.signin.failed", user=name, source=source, method="directory", reason=why)
        raise PermissionDeniedError("sign-in failed: wrong user name, password or code",
                                    "a first sign-in needs a verification code: ask a medbroker administrator "
                                    "to enrol you (medbroker user totp NAME), or get a one-time link over SSH")
    app.store.clear_auth_failures(name, f"web:{source}")
    return name


def password_signin(app: App, user: str, password: str, code: str, now: datetime, *, source: str) -> str:
    """Check user + password + TOTP code (with the SSH lockout rules); returns the user name.

    :raises PermissionDeniedError: one message for every failure, or a lockout with the time left
    """
    limits = app.config.limits
    key = f"web:{source}"
    name = (user or "").strip()[:64]
    locked = lockout_remaining(app.store, name, key, now, max_failures=limits.max_auth_failures,
                               window_s=app.config.seconds("limits", "failure_window"),
                               lockout_s=app.config.seconds("limits", "lockout"))
    if locked:
        app.audit.record("web.signin.failed", user=name, source=source, method="password", reason="locked out")
        raise PermissionDeniedError(f"too many failed sign-ins; try again in {format_duration(locked)}")
    row = app.store.get_user(name)
    pw = app.store.get_web_password(name) if row else None
    # Always run scrypt, so the answer time does not tell whether the user has a password.
    good_pw = check_password(pw["hash"] if pw else _DUMMY_HASH, password or "") and pw is not None
    ok = bool(row and not row["disabled"] and good_pw and row["totp_secret"]
              and _totp_ok(app, name, code, now))
    if not ok:
        app.store.add_auth_failure(name, key, utc_iso(now))
        app.audit.record("web.signin.failed", user=name, source=source, method="password",
                         reason="wrong user, password or code")
        raise PermissionDeniedError("sign-in failed: wrong user name, password or code",
                                    "or get a one-time link over SSH: ssh -p PORT YOU@broker web")
    app.store.clear_auth_failures(name, key)
    return name
