"""Notifications on new requests and decisions: a JSON webhook and/or e-mail, each with a link to the request.

The notifier tails the audit log (so requests made over SSH, the CLI or another broker process count too)
and keeps its position in ``web_state``, so a restart neither repeats nor skips a notification.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import smtplib
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from broker.errors import BrokerError
from broker.grants import get_request
from broker.web_base import Web
from broker.access_links import console_url

__all__ = ["NOTIFY_EVENTS", "notify_enabled", "prepare_notifier", "run_notifier", "build_notification", "send_webhook",
           "send_email", "sign_webhook", "SIGNATURE_HEADER", "TIMESTAMP_HEADER"]

log = logging.getLogger("medbroker.web.notify")
NOTIFY_EVENTS = ("request.created", "request.approved", "request.denied", "request.expired")
_CURSOR = "notify_cursor"
POLL_S = 1.0
TIMEOUT_S = 10.0
ATTEMPTS = 3
SIGNATURE_HEADER = "X-Medbroker-Signature"  # "sha256=" + hex HMAC-SHA256(secret, TIMESTAMP + "." + body)
TIMESTAMP_HEADER = "X-Medbroker-Timestamp"  # Unix seconds when sent; receivers refuse old ones (replay)


def _request_as_of(store: Any, req: Any, row: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The request as it stood right after the audit row ``row`` (the notifier may run later, when the
    request has moved on: a ``request.created`` must not arrive already showing ``approved``)."""
    state = req.as_dict()
    approvers = [a["approver"] for a in store.approvals(req.id) if a["at"] <= row["at"]]
    event, final = row["event"], details.get("final", True)
    if event == "request.created":
        approvers, status = [], "pending"
    elif event == "request.approved":
        approvers = approvers[:int(details.get("approvals") or len(approvers))]
        status = "approved" if final else "pending"
    else:
        status = "denied" if event == "request.denied" else "expired"
    state.update(status=status, approvals=approvers)
    if status == "pending":
        state.update(decided_at=None, decided_by=None, decision_reason=None, grant_id=None)
    return state


def build_notification(web: Web, row: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for one audit row about a request (also the source of the e-mail text).

    ``request`` is the request as of that event; ``text`` is one line for chat tools (Slack, Mattermost,
    Teams webhooks show it as the message).
    """
    app = web.app
    req = get_request(app.store, row["request_id"])
    details = json.loads(row["details"] or "{}")
    user = app.store.get_user(req.user) or {}
    device = app.store.get_device(req.device) or {}
    who = f"{req.user}" + (f" ({user['company']})" if user.get("company") else "")
    length = req.as_dict()["duration"]
    if row["event"] == "request.created":
        summary = f"{who} asks for {req.device} for {length}: {req.reason}"
    elif row["event"] == "request.approved" and not details.get("final", True):
        summary = (f"{row['actor']} approved {req.user} on {req.device}; {details.get('needed', 2) - details.get('approvals', 1)}"
                   " more approver needed (critical device)")
    elif row["event"] == "request.approved":
        summary = f"{row['actor']} approved {req.user} on {req.device}"
    elif row["event"] == "request.denied":
        summary = f"{row['actor']} denied {req.user} on {req.device}" + (
            f": {details['reason']}" if details.get("reason") else "")
    else:
        summary = f"request of {req.user} for {req.device} expired undecided"
    url = f"{console_url(app.config)}/requests/{req.id}"
    where = f" ({device['description']})" if device.get("description") else ""
    return {"event": row["event"], "at": row["at"], "actor": row["actor"], "audit_id": row["id"],
            "summary": summary, "text": f"medbroker: {summary}{where} - {url}", "url": url,
            "device_description": device.get("description"),
            "request": _request_as_of(app.store, req, row, details)}


def sign_webhook(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 over ``TIMESTAMP.BODY`` (docs/web.md)."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def send_webhook(url: str, body: dict[str, Any], secret: bytes | None = None) -> None:
    """POST ``body`` as JSON, signed when ``secret`` is set; raises OSError on a network error or a non-2xx
    answer."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "medbroker"}
    if secret:
        stamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = stamp
        headers[SIGNATURE_HEADER] = sign_webhook(secret, stamp, data)
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:  # noqa: S310 - URL from broker.toml
            resp.read(4096)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise OSError(f"webhook answered HTTP {exc.code}") from None


def send_email(cfg: Any, body: dict[str, Any]) -> None:
    """Send one plain-text e-mail to ``web.smtp_to``; raises OSError / smtplib.SMTPException."""
    msg = EmailMessage()
    req = body["request"]
    msg["Subject"] = f"[medbroker] request {req['id']}: {body['summary']}"[:200]
    msg["From"] = cfg.smtp_from
    msg["To"] = ", ".join(cfg.smtp_to)
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("medbroker", domain=cfg.smtp_from.rpartition("@")[2] or None)
    lines = [body["summary"], "", f"Open it: {body['url']}", "",
             f"Device:    {req['device']}" + (f" ({body['device_description']})" if body.get("device_description") else ""),
             f"Vendor:    {req['user']}", f"Length:    {req['duration']}",
             f"Reason:    {req['reason']}", f"Ticket:    {req['ticket'] or '-'}", f"Status:    {req['status']}",
             f"Approvals: {', '.join(req['approvals']) or '-'}"]
    msg.set_content("\n".join(lines) + "\n")
    with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port or 25, timeout=TIMEOUT_S) as smtp:
        if cfg.smtp_starttls:
            smtp.starttls()
        smtp.send_message(msg)


async def _deliver(web: Web, body: dict[str, Any]) -> None:
    cfg = web.app.config.web
    loop = asyncio.get_running_loop()
    channels = []
    if cfg.webhook_url:
        secret = web_secret(web.app.config)
        channels.append(("webhook", lambda: send_webhook(cfg.webhook_url, body, secret)))
    if cfg.smtp_host and cfg.smtp_to:
        channels.append(("email", lambda: send_email(cfg, body)))
    for name, send in channels:
        error = None
        for attempt in range(ATTEMPTS):
            try:
                await loop.run_in_executor(None, send)
                error = None
                break
            except (OSError, smtplib.SMTPException) as exc:
                error = str(exc) or type(exc).__name__
                await asyncio.sleep(0.5 * (attempt + 1))
        if error is not None:
            log.warning("notification %s failed: %s", name, error)
            await web.audit("notify.failed", request_id=body["request"]["id"], channel=name, error=error[:300],
                            about=body["event"])


def web_secret(config: Any) -> bytes | None:
    """The webhook signing secret from ``[web] webhook_secret_file`` (None when unset).

    :raises OSError: the file cannot be read (the delivery fails and is audited as notify.failed)
    """
    name = config.web.webhook_secret_file
    if not name:
        return None
    secret = config.path(name).read_bytes().strip()
    if len(secret) < 16:
        raise OSError(f"{config.path(name)}: the webhook secret is shorter than 16 bytes")
    return secret


def notify_enabled(web: Web) -> bool:
    cfg = web.app.config.web
    return bool(cfg.webhook_url or (cfg.smtp_host and cfg.smtp_to))


def _start_cursor(store: Any) -> int:
    with store.transaction(lock="web_state:" + _CURSOR):
        text = store.get_web_state(_CURSOR)
        if text is None:  # first start: begin now, do not announce history
            cursor = store.last_audit_id()
            store.set_web_state(_CURSOR, str(cursor))
            return cursor
        return int(text)


async def prepare_notifier(web: Web) -> int:
    """Fix where notifying starts before the console accepts anything (so nothing slips between)."""
    return await web.db(_start_cursor, web.app.store)


async def run_notifier(web: Web, cursor: int) -> None:
    """Tail the audit log from ``cursor`` and notify about requests and decisions, until ``web.closing``.

    Stopping waits for the notification in flight and its saved position (see :func:`broker.web.stop_web`),
    so a restart does not send it twice.
    """
    store = web.app.store
    while not web.closing.is_set():
        try:
            rows = await web.db(lambda: store.audit_rows(after_id=cursor, event="request", limit=50))
            for row in rows:
                if row["event"] in NOTIFY_EVENTS and row["request_id"]:
                    try:
                        body = await web.db(build_notification, web, row)
                        await _deliver(web, body)
                    except BrokerError as exc:
                        log.warning("cannot build a notification for audit row %s: %s", row["id"], exc)
                cursor = row["id"]
                await web.db(store.set_web_state, _CURSOR, str(cursor))
                if web.closing.is_set():
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # the loop must survive a transient database error
            log.exception("notifier iteration failed")
        try:
            await asyncio.wait_for(web.closing.wait(), POLL_S)
        except asyncio.TimeoutError:
            pass
