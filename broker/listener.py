"""Start and stop the vendor SSH port: the one place that wires the asyncssh adapter (broker/server.py) to
ProxyJump (broker/jump.py), so that jump.py builds on server.py and server.py never imports jump.py.
"""

from __future__ import annotations

import asyncio
import logging
import os

import asyncssh

from broker.app import App
from broker.balancer import BalancerTrust, ProxyListener
from broker.config import parse_listen
from broker.containment import check_devices
from broker.ignorepackets import install_ignore_packet_hook
from broker.jump import open_jump
from broker.keepalive import install_keepalive_hook
from broker.mfa import install_mfa_hook
from broker.packetlog import install_packet_log_hook
from broker.recvsplit import install_recv_split_hook
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
    install_keepalive_hook()  # one keepalive timer per interval, not per read (broker/keepalive.py)
    install_packet_log_hook()  # packet log lines formatted only when asyncssh writes them (broker/packetlog.py)
    install_recv_split_hook()  # large reads parsed in 32 KiB pieces, not sliced whole (broker/recvsplit.py)
    install_ignore_packet_hook()  # no ignore packet before every packet under AEAD ciphers (broker/ignorepackets.py)
    broker = Broker(app, port=port, worker=worker, open_jump=open_jump)
    if seal:
        await broker.seal_interrupted()
    if broker.duties:  # devices never checked get a containment check now (bounded wait; the rest goes on)
        await asyncio.wait([broker.spawn(check_devices(app, broker.default_protected))], timeout=3)
    shared = app.config.listen.workers > 1 or worker is not None  # several processes accept on this port
    trust = BalancerTrust(app.config.listen.proxy_protocol_from)
    if trust:  # behind a balancer (docs/ha.md, "Balancer"): PROXY v2 from it, the client's address from that
        front = ProxyListener(trust, on_refused=_refusal_reporter(broker), reuse_port=shared,
                              header_timeout=app.config.seconds("listen", "login_timeout"))
        acceptor = await asyncssh.listen(host, port, server_factory=lambda: BrokerServer(broker), tunnel=front,
                                         **listen_options(app))
    else:
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
    balancers = {"proxy_protocol_from": list(app.config.listen.proxy_protocol_from)} if trust else {}
    if worker is None:
        await broker.audit("broker.started", address=f"{host}:{broker.port}", pid=broker.pid, **balancers)
    else:
        await broker.audit("broker.worker.started", address=f"{host}:{broker.port}", pid=broker.pid, worker=worker,
                           supervisor_pid=os.getppid(), **balancers)
    return acceptor, broker


def _refusal_reporter(broker: Broker):
    """``proxy.refused`` for a connection closed before SSH; like the connection caps, at most one row a second
    per address, however fast it reconnects (a flood must not flood the audit log)."""
    def report(peer: str, peer_port: int, reason: str) -> None:
        now = asyncio.get_running_loop().time()
        key = f"proxy:{peer}"
        if now - broker.limit_audited.get(key, -60.0) < 1.0:
            return
        if len(broker.limit_audited) > 1024:  # many addresses: forget the old ones (the cost is an extra row)
            broker.limit_audited.clear()
        broker.limit_audited[key] = now
        broker.audit_soon("proxy.refused", source=peer, reason=reason, port=peer_port)
    return report


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
    if broker.refusing:  # a start cancelled above is being refused: the vendor reads why before the disconnect
        await asyncio.wait(list(broker.refusing), timeout=3)
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
