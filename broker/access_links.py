"""One-time web console sign-in links and expiring auditor share links: issue, hash, redeem (no HTTP here)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.audit import AuditLog
from broker.clock import parse_utc, utc_iso
from broker.config import BrokerConfig, format_duration, parse_listen, unsafe_char
from broker.errors import ConfigError, GrantExpiredError, NotFoundError, PermissionDeniedError, UsageError
from broker.store import Store

__all__ = ["SigninLink", "ShareLink", "token_hash", "console_url", "issue_signin_link", "redeem_signin_link",
           "issue_share_link", "resolve_share_link", "safe_next_path"]

_TOKEN_BYTES = 32


@dataclass(frozen=True)
class SigninLink:
    """A freshly issued sign-in link; ``url`` carries the only copy of the secret."""

    user: str
    url: str
    expires_at: datetime


@dataclass(frozen=True)
class ShareLink:
    """An auditor's read-only link to one recording."""

    id: int
    session_id: str
    url: str
    expires_at: datetime


def token_hash(token: str) -> str:
    """The stored form of a bearer token (sha256 hex): a database reader cannot use it."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def console_url(config: BrokerConfig) -> str:
    """The console's base URL without a trailing slash: ``web.public_url``, else ``http://web.address``.

    :raises ConfigError: the console is not enabled
    """
    web = config.web
    if web.public_url:
        return web.public_url.rstrip("/")
    if not web.address:
        raise ConfigError("the web console is not enabled on this broker",
                          "ask an administrator to set web.address in broker.toml or run: medbroker serve --web "
                          "HOST:PORT")
    host, port = parse_listen(web.address)
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if web.tls_cert and web.tls_key else "http"
    return f"{scheme}://{host}:{port}"


def safe_next_path(path: str | None) -> str:
    """A same-site path to go to after sign-in; anything else (``//evil``, ``https://…``) becomes ``/``."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path or len(path) > 200 \
            or any(ord(c) < 0x21 or ord(c) > 0x7E for c in path):
        return "/"
    return path


def issue_signin_link(store: Store, audit: AuditLog, config: BrokerConfig, user: str, now: datetime, *,
                      next_path: str | None = None, source: str | None = None) -> SigninLink:
    """Create a one-time sign-in link for ``user`` (the caller has authenticated them, e.g. over SSH).

    :raises ConfigError: the console is not enabled
    :raises PermissionDeniedError: unknown or disabled user
    """
    base = console_url(config)
    row = store.get_user(user)
    if not row or row["disabled"]:
        raise PermissionDeniedError(f"user {user} may not sign in to the web console", "ask an administrator")
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    ttl = config.seconds("web", "link_ttl")
    expires = now + timedelta(seconds=ttl)
    store.insert_web_token({"token_hash": token_hash(token), "user_name": user,
                            "next_path": safe_next_path(next_path), "created_at": utc_iso(now),
                            "expires_at": utc_iso(expires)})
    audit.record("web.link.created", actor=user, user=user, source=source, expires_at=utc_iso(expires),
                 ttl=format_duration(ttl))
    return SigninLink(user, f"{base}/signin/{token}", expires)


def redeem_signin_link(store: Store, token: str, now: datetime, source: str | None) -> dict:
    """Use a sign-in token once.

    :returns: the token row (``user_name``, ``next_path``)
    :raises GrantExpiredError: the link expired or was already used (the message says which)
    :raises NotFoundError: no such link
    """
    digest = token_hash(token)
    row = store.claim_web_token(digest, utc_iso(now), source)
    if row is not None:
        return row
    old = store.get_web_token(digest)
    again = "get a new one with: ssh -p PORT USER@broker web"
    if old is None:
        raise NotFoundError("this sign-in link is not valid", again)
    if old["used_at"]:
        raise GrantExpiredError(f"this sign-in link was already used at {old['used_at'][11:19]} UTC", again)
    raise GrantExpiredError(f"this sign-in link expired at {old['expires_at'][11:19]} UTC", again)


def issue_share_link(store: Store, audit: AuditLog, config: BrokerConfig, session_id: str, by: str,
                     now: datetime, ttl_s: int, note: str | None = None) -> ShareLink:
    """Create an expiring read-only replay link for an auditor.

    :raises NotFoundError: unknown session
    :raises UsageError: ``ttl_s`` not positive or over ``web.share_max``; note too long
    """
    if not store.get_session(session_id):
        raise NotFoundError(f"session {session_id} does not exist", "pick one from the recordings list")
    limit = config.seconds("web", "share_max")
    if not 0 < ttl_s <= limit:
        raise UsageError(f"a share link may live at most {format_duration(limit)}", "pick a shorter time")
    note = (note or "").strip() or None
    if note is not None and (len(note) > 200 or unsafe_char(note)):
        raise UsageError("the note must be at most 200 printable characters"
                         + (f"; it contains {unsafe_char(note)}" if unsafe_char(note) else ""))
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    expires = now + timedelta(seconds=ttl_s)
    share_id = store.insert_web_share({"token_hash": token_hash(token), "session_id": session_id, "created_by": by,
                                       "note": note, "created_at": utc_iso(now), "expires_at": utc_iso(expires)})
    audit.record("recording.shared", actor=by, session_id=session_id, share_id=share_id,
                 expires_at=utc_iso(expires), note=note)
    return ShareLink(share_id, session_id, f"{console_url(config)}/shared/{token}", expires)


def resolve_share_link(store: Store, token: str, now: datetime) -> dict:
    """The share row for a token that may be used now.

    :raises NotFoundError: no such link
    :raises GrantExpiredError: expired or revoked
    """
    row = store.get_web_share(token_hash(token))
    if row is None:
        raise NotFoundError("this replay link is not valid", "ask the security team for a new link")
    if row["revoked_at"]:
        raise GrantExpiredError("this replay link was revoked", "ask the security team for a new link")
    if parse_utc(row["expires_at"]) <= now:
        raise GrantExpiredError(f"this replay link expired at {row['expires_at'][:16].replace('T', ' ')} UTC",
                                "ask the security team for a new link")
    return row
