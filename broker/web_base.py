"""What every web console page builds on: the per-process ``Web`` state, the ``page`` decorator (sign-in,
roles, CSRF and origin checks, errors as pages), navigation and template filters.

The routes (broker/web_views.py, broker/web_stream.py), the notifier (broker/web_notify.py) and the app
itself (broker/web.py) import this module; it imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import unicodedata
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

import jinja2
import markupsafe
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from broker.app import App
from broker.clock import display_zone, local_text, parse_utc
from broker.config import format_duration, parse_listen
from broker.errors import (BrokerError, ConfigError, ConflictError, GrantExpiredError, NotFoundError,
                           PermissionDeniedError, UsageError)
from broker.web_auth import COOKIE, SignedOut, Viewer, check_csrf, load_session
from broker.access_links import console_url, safe_next_path

__all__ = ["Web", "page", "origin_ok", "source_of", "NAV", "HOME", "MAX_FORM_FIELDS", "Handler"]

_HERE = Path(__file__).resolve().parent
NAV = (  # (path, label, roles)
    ("/inbox", "Inbox", ("approver", "admin")),
    ("/mine", "My access", ("vendor",)),
    ("/sessions", "Live sessions", ("approver", "security", "admin")),
    ("/recordings", "Recordings", ("security",)),
    ("/audit", "Audit log", ("security", "admin")),
    ("/admin/devices", "Devices", ("security", "admin")),
    ("/admin/users", "Users", ("security", "admin")),
    ("/account", "Account", ("vendor", "approver", "security", "admin")),
)
HOME = {"approver": "/inbox", "admin": "/inbox", "security": "/sessions", "vendor": "/mine"}
_STATUS = ((PermissionDeniedError, 403), (NotFoundError, 404), (ConflictError, 409), (GrantExpiredError, 410),
           (UsageError, 400))
MAX_FORM_FIELDS = 20


def _ago(value: str | None, now) -> str:
    if not value:
        return ""
    return format_duration((now - parse_utc(value)).total_seconds())


def _hhmm(value: str | None, zone=None) -> str:
    """A time to the minute in the display zone (``[display] timezone``; the host's by default)."""
    return local_text(value, zone, seconds=False) if value else ""


def _visible(value: Any) -> Any:
    """Bidi overrides, zero-width and other format characters in stored text are shown as ``<U+202E>``, not
    obeyed (issue 11): they would reorder or hide what an approver reads. Markup (tojson, safe) is left alone."""
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup) and not value.isascii():
        return "".join(f"<U+{ord(c):04X}>" if unicodedata.category(c) in ("Cf", "Cs", "Zl", "Zp") else c
                       for c in value)
    return value


def _bytes(count: int | None) -> str:
    n: float = int(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Web:
    """Per-process console state: the broker home, templates, flash messages, the optional SSH broker."""

    def __init__(self, app: App, broker: Any = None) -> None:
        self.app = app
        self.broker = broker
        self.closing = asyncio.Event()
        self.flashes: dict[str, list[tuple[str, str]]] = {}
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_HERE / "templates")), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                      finalize=_visible)
        zone = display_zone(app.config.display.timezone)
        self.env.filters.update(hhmm=lambda v: _hhmm(v, zone), nbytes=_bytes, duration=format_duration)

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous store/domain call on the single store thread."""
        return await self.app.store.run(fn, *args)

    def now(self):
        return self.app.clock.now()

    @property
    def ssh_port(self) -> int:
        return self.broker.port if self.broker is not None else parse_listen(self.app.config.listen.address)[1]

    @property
    def ssh_hint(self) -> str:
        """``ssh -p PORT YOU@HOST web``, the way to get a fresh sign-in link."""
        return f"ssh -p {self.ssh_port} YOU@{self.app.config.listen.public_host} web"

    def flash(self, viewer: Viewer, kind: str, text: str) -> None:
        """Queue a one-time message for the viewer's next page."""
        box = self.flashes.setdefault(viewer.session_hash, [])
        box.append((kind, text))
        del box[:-5]

    def render(self, request: Request, name: str, *, viewer: Viewer | None = None, status: int = 200,
               **ctx: Any) -> HTMLResponse:
        """Render a template with the viewer, navigation and pending flash messages."""
        nav = [(p, label) for p, label, roles in NAV if viewer and viewer.role in roles]
        flashes = self.flashes.pop(viewer.session_hash, []) if viewer else []
        html = self.env.get_template(name).render(
            request=request, viewer=viewer, nav=nav, path=request.url.path, flashes=flashes, now=self.now(),
            ago=lambda v: _ago(v, self.now()), ssh_hint=self.ssh_hint, ssh_port=self.ssh_port,
            public_host=self.app.config.listen.public_host, **ctx)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def error(self, request: Request, exc: BrokerError, viewer: Viewer | None = None) -> HTMLResponse:
        status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 400)
        return self.render(request, "error.html", viewer=viewer, status=status, message=exc.message, hint=exc.hint)

    async def audit(self, event: str, **fields: Any) -> None:
        await self.db(lambda: self.app.audit.record(event, **fields))


def source_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def origin_ok(web: Web, request: Request) -> bool:
    """A POST must come from our own pages: the Origin header (when sent) is this site."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    allowed = {f"{request.url.scheme}://{host}"}
    with contextlib.suppress(ConfigError):
        u = urlsplit(console_url(web.app.config))
        allowed.add(f"{u.scheme}://{u.netloc}")
    return origin in allowed


Handler = Callable[[Request, Viewer], Awaitable[Response]]


def page(*roles: str, action: str, touch: bool = True, stream: bool = False) -> Callable[[Handler], Any]:
    """Wrap a handler: signed-in viewer, server-side role check, CSRF on POST, errors as pages.

    :param roles: roles allowed (empty: any signed-in user)
    :param action: what the page does, for refusal messages ("open the approval inbox")
    :param touch: the request counts as activity for the idle timeout
    :param stream: a live stream: answer 401/403 plainly instead of redirecting
    """
    def deco(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            web: Web = request.app.state.web
            src = source_of(request)
            try:
                viewer = await web.db(lambda: load_session(web.app, request.cookies.get(COOKIE), web.now(),
                                                           touch=touch, source=src))
            except SignedOut as out:
                if stream or request.method != "GET":
                    return Response("signed out", status_code=401)
                target = quote(safe_next_path(request.url.path + (f"?{request.url.query}" if request.url.query
                                                                  else "")), safe="")
                return RedirectResponse(f"/signin?reason={out.reason}&next={target}", status_code=303)
            if roles and viewer.role not in roles:
                await web.audit("web.denied", actor=viewer.name, user=viewer.name, source=src, reason="role",
                                path=request.url.path, action=action)
                exc = PermissionDeniedError(f"{viewer.name} ({viewer.role}) may not {action}",
                                            f"this needs the role {' or '.join(roles)}; ask a medbroker "
                                            "administrator")
                return Response("forbidden", 403) if stream else web.error(request, exc, viewer)
            if request.method == "POST":
                form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
                csrf = form.get("csrf")  # max_files=0: a field is text, never an upload
                if not check_csrf(viewer, csrf if isinstance(csrf, str) else None) or not origin_ok(web, request):
                    await web.audit("web.denied", actor=viewer.name, user=viewer.name, source=src, reason="csrf",
                                    path=request.url.path, action=action)
                    exc = PermissionDeniedError("this form is stale or did not come from the console (CSRF check)",
                                                "reload the page and try again")
                    return web.error(request, exc, viewer)
                request.state.form = form
            try:
                return await fn(request, viewer)
            except BrokerError as exc:
                return web.error(request, exc, viewer)
        return handler
    return deco
