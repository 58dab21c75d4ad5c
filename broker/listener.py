"""Start and stop the vendor SSH port: the one place that wires the asyncssh adapter (broker/server.py) to
ProxyJump (broker/jump.py), so that jump.py builds on server.py and server.py never imports jump.py.
"""

from __future__ import annotations

import asyncio
import logging
import os

import asyncssh

from broker.app import App
from broker.config import parse_listen
from broker.containment import check_devices
from broker.jump import open_jump
from broker.mfa import install_mfa_hook
from broker.server import Broker, BrokerServer, listen_options

__all__ = ["start_server", "stop_server"]

log = logging.getLogger("medbroker.server")


async def start_server(app: App, address: str, *, seal: bool = True,
                       worker: int | None = None) -> tuple[asyncssh.SSHAcceptor, Broker]:
    """Start listening; returns the acceptor (``.sockets``, ``.close()``) and the broker state.

    :param seal: first seal recordings that crashed broker processes left live
    :param worker: this process's index under a supervisor (broker/workers.py): it shares the port with
        SO_REUSEPORT, leaves broker-wide duties to the supervisor and audits ``broker.worker.started``
    :raises UsageError: bad address
    :raises OSError: the port is taken
    :raises BrokerError: another live process serves under this cluster node id
    """
    host, port = parse_listen(address)
    install_mfa_hook()  # key + TOTP (broker/mfa.py); when it cannot install, TOTP users are refused
    broker = Broker(app, port=port, worker=worker, open_jump=open_jump)
    if seal:
        await broker.seal_interrupted()
    if broker.duties:  # devices never checked get a containment check now (bounded wait; the rest goes on)
        await asyncio.wait([broker.spawn(check_devices(app, broker.default_protected))], timeout=3)
    shared = app.config.listen.workers > 1 or worker is not None  # several processes accept on this port
    acceptor = await asyncssh.listen(host, port, server_factory=lambda: BrokerServer(broker),
                                     reuse_address=True, reuse_port=shared,
                                     **listen_options(app))
    broker.port = acceptor.sockets[0].getsockname()[1] if port == 0 else port
    broker.settings = broker.settings.with_port(broker.port)
    if broker.duties:  # this process is its cluster node (a worker's supervisor is)
        try:
            await broker.join_cluster(f"{host}:{broker.port}")
        except BaseException:
            acceptor.close()
            await acceptor.wait_closed()
            raise
    await broker.refresh_recent()
    broker.start_control()
    if worker is None:
        await broker.audit("broker.started", address=f"{host}:{broker.port}", pid=broker.pid)
    else:
        await broker.audit("broker.worker.started", address=f"{host}:{broker.port}", pid=broker.pid, worker=worker,
                           supervisor_pid=os.getppid())
    return acceptor, broker


async def _cancel_starts(broker: Broker) -> None:
    """Sessions still connecting to their device never begin: each closes its recording, marked failed."""
    for start in list(broker.starting):
        start.cancel()
    if broker.starting:
        await asyncio.wait(list(broker.starting), timeout=10)


async def stop_server(acceptor: asyncssh.SSHAcceptor, broker: Broker) -> None:
    """Stop listening, end live sessions cleanly, flush recordings."""
    acceptor.close()
    await acceptor.wait_closed()
    broker.stopping = True
    await _cancel_starts(broker)
    lives = list(broker.live.values())
    results = await asyncio.gather(*(live.terminate("shutdown", "the broker is shutting down; reconnect in a moment")
                                     for live in lives), return_exceptions=True)
    for live, result in zip(lives, results):
        if isinstance(result, Exception):  # all end together; one failure is logged, never stops the others
            log.error("ending session %s at shutdown failed: %r", live.id, result)
    await broker.stop_control()
    for conn in list(broker.connections):  # anyone still connected (connecting, self-service) is told why
        conn.disconnect(asyncssh.DISC_BY_APPLICATION, "medbroker: the broker is shutting down; reconnect in a moment")
    for conn in list(broker.connections):
        try:
            await asyncio.wait_for(conn.wait_closed(), 5)
        except asyncio.TimeoutError:
            conn.abort()
    for _ in range(3):  # finishing sessions may audit, which spawns more tasks
        pending = [t for t in broker.tasks if not t.done()]
        if not pending:
            break
        await asyncio.wait(pending, timeout=10)
    if broker.worker is not None:  # the supervisor signs the chain once every worker has stopped
        await broker.audit("broker.worker.stopped", pid=broker.pid, worker=broker.worker)
        return
    await broker.leave_cluster()
    await broker.audit("broker.stopped", pid=broker.pid)
    await broker.write_checkpoint()  # the last rows of this run are signed too
