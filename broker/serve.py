"""``medbroker serve``: the SSH port (and the web console when configured) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from broker.app import App
from broker.service import sd_notify
from broker.listener import start_server, stop_server

__all__ = ["run_server", "run_worker"]


def _runner():
    try:
        import uvloop  # measured +25 % bulk throughput (asyncssh-notes, baseline table)
        return uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run


def run_server(app: App, address: str, *, on_ready=None) -> None:
    """Serve until SIGINT/SIGTERM (``medbroker serve``).

    With ``listen.workers = 1`` this process is the broker. With more, it is the supervisor of that many
    worker processes sharing the port (broker/workers.py); ``on_ready(port)`` is then called once every
    worker accepts connections.

    :param on_ready: ``on_ready(port)`` once the broker accepts connections (port 0 resolved)
    :raises OSError: the port is taken
    """
    if app.config.listen.workers > 1:
        from broker.workers import supervise

        _runner()(supervise(app, address, on_ready=on_ready))
        return
    import signal

    async def main() -> None:
        # Signals first: a SIGTERM while the listeners start (systemd, a health probe's owner) stops cleanly.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        acceptor, broker = await start_server(app, address)
        web = None
        if app.config.web.address:  # [web] address or `serve --web`
            from broker.web import start_web  # lazily: no web stack without a console

            try:
                web = await start_web(app, app.config.web.address, broker=broker)
            except BaseException:
                await stop_server(acceptor, broker)
                raise
        metrics = None
        if app.config.metrics.address:
            from broker.health import start_metrics_listener

            try:
                metrics = await start_metrics_listener(app, app.config.metrics.address, broker=broker)
            except BaseException:
                if web is not None:
                    from broker.web import stop_web

                    await stop_web(web)
                await stop_server(acceptor, broker)
                raise
        if on_ready:
            on_ready(broker.port)
        await stop.wait()
        sd_notify("STOPPING=1")
        if metrics is not None:
            from broker.health import stop_metrics_listener

            await stop_metrics_listener(metrics)
        if web is not None:
            from broker.web import stop_web

            await stop_web(web)
        await stop_server(acceptor, broker)

    _runner()(main())


def run_worker(app: App, address: str, *, index: int, supervisor_pid: int) -> None:
    """One worker process of a supervisor (``serve --worker-of``), until SIGTERM or the supervisor is gone.

    :raises OSError: the port cannot be shared
    """
    from broker.workers import serve_worker

    _runner()(serve_worker(app, address, index=index, supervisor_pid=supervisor_pid))
