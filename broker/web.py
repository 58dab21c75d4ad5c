"""The web console: a Starlette app served by uvicorn on the broker's own event loop (``serve --web``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from broker import web_stream as s
from broker import web_views as v
from broker.app import App
from broker.config import parse_listen
from broker.errors import ConfigError
from broker.health import Health, health_routes, serve_asgi, stop_asgi
from broker.web_base import Web
from broker.access_links import console_url
from broker.web_notify import notify_enabled, prepare_notifier, run_notifier

__all__ = ["Web", "WebHandle", "create_web_app", "start_web", "stop_web"]

log = logging.getLogger("medbroker.web")
_HERE = Path(__file__).resolve().parent
NOTIFIER_STOP_S = 15.0


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
