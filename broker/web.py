"""The web console: a Starlette app served by uvicorn on the broker's own event loop (``serve --web``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

import jinja2
import markupsafe
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from broker.app import App
from broker.health import Health, health_routes, serve_asgi, stop_asgi
from broker.clock import display_zone, local_text, parse_utc, utc_iso
from broker.config import format_duration, parse_listen
from broker.errors import (BrokerError, ConfigError, ConflictError, GrantExpiredError, NotFoundError,
                           PermissionDeniedError, UsageError)
from broker.web_auth import COOKIE, SignedOut, Viewer, check_csrf, load_session
from broker.web_links import console_url, safe_next_path

__all__ = ["Web", "WebHandle", "create_web_app", "start_web", "stop_web", "page"]

log = logging.getLogger("medbroker.web")
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
NOTIFIER_STOP_S = 15.0


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


def _bytes(n: int | None) -> str:
    n = int(n or 0)
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


def _origin_ok(web: Web, request: Request) -> bool:
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
                if not check_csrf(viewer, form.get("csrf")) or not _origin_ok(web, request):
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


class SecurityHeaders:
    """ASGI middleware: strict CSP (own scripts and styles only), referrer only to ourselves (tokens live in URLs), no framing."""

    HEADERS = [
        (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                                     b" connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                     b"form-action 'self'; object-src 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
        (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    ]

    def __init__(self, asgi: Any, *, hsts: bool) -> None:
        self.asgi = asgi
        self.extra = list(self.HEADERS) + ([(b"strict-transport-security", b"max-age=31536000")] if hsts else [])

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.extra
            await send(message)

        await self.asgi(scope, receive, send_with_headers)


def create_web_app(app: App, *, broker: Any = None) -> Starlette:
    """Build the ASGI application for one broker home.

    :param broker: the running SSH ``Broker`` in this process (live byte counters), or None
    """
    from broker import web_views as v
    from broker import web_stream as s

    web = Web(app, broker)
    routes = [
        Route("/", v.home),
        Route("/signin", v.signin_page, methods=["GET", "POST"]),
        Route("/signin/{token}", v.signin_link, methods=["GET", "POST"]),
        Route("/signout", v.signout, methods=["POST"]),
        Route("/account", v.account, methods=["GET", "POST"]),
        Route("/inbox", v.inbox),
        Route("/requests/{rid:int}", v.request_page),
        Route("/requests/{rid:int}/approve", v.approve, methods=["POST"]),
        Route("/requests/{rid:int}/deny", v.deny, methods=["POST"]),
        Route("/mine", v.mine),
        Route("/sessions", v.sessions_page),
        Route("/sessions/{sid}/watch", v.watch_page),
        Route("/sessions/{sid}/kill", v.kill, methods=["POST"]),
        Route("/recordings", v.recordings_page),
        Route("/recordings/{sid}", v.player_page),
        Route("/recordings/{sid}/cast", s.cast),
        Route("/recordings/{sid}/share", v.share, methods=["POST"]),
        Route("/shares/{share_id:int}/revoke", v.revoke_share, methods=["POST"]),
        Route("/shared/{token}", v.shared_player),
        Route("/shared/{token}/cast", s.shared_cast),
        Route("/audit", v.audit_page),
        Route("/admin/devices", v.devices_page),
        Route("/admin/users", v.users_page),
        Route("/admin/users/{name}/disable", v.user_disable, methods=["POST"]),
        Route("/admin/users/{name}/enable", v.user_enable, methods=["POST"]),
        Route("/events/{topic}", s.changes),
        Route("/sessions/{sid}/stream", s.watch_stream),
        Mount("/static", app=StaticFiles(directory=str(_HERE / "static")), name="static"),
        *health_routes(Health(app, broker)),
    ]
    asgi = Starlette(routes=routes)
    asgi.state.web = web
    return asgi


@dataclass
class WebHandle:
    """A running console: ``url`` is where it listens; pass the handle to :func:`stop_web`."""

    server: uvicorn.Server
    task: asyncio.Task
    web: Web
    notifier: asyncio.Task | None
    url: str
    port: int


async def start_web(app: App, address: str, *, broker: Any = None, notify: bool = True) -> WebHandle:
    """Serve the console on ``address`` (HOST:PORT, port 0 picks one) in the running event loop.

    When ``web.public_url`` is empty, ``app.config`` is updated to the bound address, so the sign-in
    links that ``ssh USER@broker web`` prints point here.

    :param broker: the SSH ``Broker`` running in this loop, if any
    :param notify: run the webhook/e-mail notifier
    :raises ConfigError: bad address, network address without TLS, half a TLS key pair
    :raises OSError: the port is taken
    """
    from broker.web_notify import notify_enabled, prepare_notifier, run_notifier

    cfg = app.config.with_web(address)
    host, port = parse_listen(address)
    web_cfg = cfg.web
    if bool(web_cfg.tls_cert) != bool(web_cfg.tls_key):
        raise ConfigError("web.tls_cert and web.tls_key go together", "set both or neither")
    tls = {}
    if web_cfg.tls_cert:
        tls = {"ssl_certfile": str(cfg.path(web_cfg.tls_cert)), "ssl_keyfile": str(cfg.path(web_cfg.tls_key))}
    asgi = create_web_app(app, broker=broker)
    web: Web = asgi.state.web
    cursor = await prepare_notifier(web) if notify and notify_enabled(web) else None
    hsts = bool(tls) or web_cfg.public_url.startswith("https://")
    server, task, bound = await serve_asgi(SecurityHeaders(asgi, hsts=hsts), host, port, "web console",
                                           timeout_graceful_shutdown=3, **tls)
    if not web_cfg.public_url:
        shown = f"[{host}]" if ":" in host else host
        app.config = app.config.with_web(f"{shown}:{bound}")
    else:
        app.config = replace(app.config, web=replace(app.config.web, address=f"{host}:{bound}"))
    notifier = None if cursor is None else asyncio.get_running_loop().create_task(run_notifier(web, cursor))
    await web.audit("broker.started", address=f"{host}:{bound}", component="web")
    return WebHandle(server, task, web, notifier, console_url(app.config), bound)


async def stop_web(handle: WebHandle) -> None:
    """Stop the console: end live streams, stop the notifier, close connections."""
    handle.web.closing.set()
    if handle.notifier is not None:
        try:  # let a notification in flight finish and record its position (bounded)
            await asyncio.wait_for(asyncio.shield(handle.notifier), NOTIFIER_STOP_S)
        except asyncio.TimeoutError:
            handle.notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handle.notifier
    await stop_asgi(handle.server, handle.task)
    await handle.web.audit("broker.stopped", component="web")
