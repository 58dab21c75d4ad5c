"""The vendor port behind a TCP balancer: PROXY protocol v2 from ``listen.proxy_protocol_from``, nothing from others.

asyncssh accepts a *listener tunnel* in ``asyncssh.listen(tunnel=...)``: an object whose ``create_server``
is handed asyncssh's own connection factory. :class:`ProxyListener` is that object. It listens with
``loop.create_server`` and puts a small protocol, :class:`_Front`, in front of each accepted connection:

- from a balancer address, ``_Front`` reads the PROXY v2 header (broker/proxy_header.py) before asyncssh sees
  a byte; then it makes asyncssh's connection, tells it the client's real address (``peername``, as
  broker/jump.py does for ProxyJump's inner connection), hands it the transport with
  ``transport.set_protocol`` and passes on the bytes that followed the header. From then on the socket
  transport calls asyncssh directly: no extra copy, no Python pump.
- from any other address, asyncssh's connection starts at once (its version line goes out as usual);
  ``_Front`` only looks at the first bytes the client sends. A PROXY header there is refused (a vendor must
  not choose the address the broker audits and locks out); anything else goes to asyncssh and ``_Front``
  steps out of the way.

A missing, malformed or late header (``listen.login_timeout``) closes the connection before SSH starts and is
reported through ``on_refused`` (audited ``proxy.refused``); a LOCAL header (the balancer's health check)
and a balancer connection that closes without sending a byte are closed quietly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any, Callable, Iterable

from broker.proxy_header import ProxyHeaderError, looks_like_proxy, parse_proxy_header

__all__ = ["BalancerTrust", "ProxyListener"]

log = logging.getLogger("medbroker.balancer")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# on_refused(peer address, peer port, reason): one refused connection (the caller audits, rate-limited)
RefusalHandler = Callable[[str, int, str], None]


def _plain(address: str) -> str:
    """``::ffff:10.0.0.1`` (an IPv4 client on a dual-stack socket) as ``10.0.0.1``; anything else unchanged."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class BalancerTrust:
    """The balancer addresses (``listen.proxy_protocol_from``, validated by broker/config.py)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n, strict=True) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        """Is ``address`` (a peer's IP as text) one of the balancers?"""
        try:
            addr = ipaddress.ip_address(_plain(address))
        except ValueError:
            return False
        return any(addr.version == net.version and addr in net for net in self.networks)


class _ProxyServer:
    """The ``asyncio.Server`` asyncssh's ``SSHAcceptor`` wraps; closing it also closes connections still
    waiting for their header (they would otherwise wait out the header timeout)."""

    def __init__(self, server: asyncio.AbstractServer, fronts: set["_Front"]) -> None:
        self._server = server
        self._fronts = fronts

    @property
    def sockets(self) -> Any:
        return self._server.sockets  # type: ignore[attr-defined]  # asyncio.Server has them; the ABC does not

    def close(self) -> None:
        self._server.close()
        for front in list(self._fronts):
            front.close_waiting()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class ProxyListener:
    """asyncssh's listener-tunnel seam (``asyncssh.listen(host, port, tunnel=ProxyListener(...))``).

    :param trust: the balancer addresses; their connections must start with a PROXY v2 header, others must not
    :param on_refused: called once per refused connection with the peer's address, port and the reason
    :param header_timeout: seconds a balancer connection may take to send its header
    :param reuse_port: share the port with other worker processes (SO_REUSEPORT; broker/workers.py)
    """

    def __init__(self, trust: BalancerTrust, *, on_refused: RefusalHandler, header_timeout: float,
                 reuse_port: bool = False) -> None:
        self.trust = trust
        self.on_refused = on_refused
        self.header_timeout = header_timeout
        self.reuse_port = reuse_port
        self.fronts: set[_Front] = set()  # balancer connections still waiting for their header

    async def create_server(self, session_factory: Callable[[str, int], Any], listen_host: str,
                            listen_port: int) -> Any:
        """Listen on ``listen_host:listen_port``; asyncssh calls this with its connection factory."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Front(self, session_factory), listen_host, listen_port,
                                          reuse_address=True, reuse_port=self.reuse_port or None)
        return _ProxyServer(server, self.fronts)

    def close(self) -> None:
        """Part of asyncssh's tunnel protocol; the listening socket is closed through the acceptor."""

    async def wait_closed(self) -> None:
        """Part of asyncssh's tunnel protocol."""


class _Front(asyncio.Protocol):
    """The first protocol on an accepted connection; replaced by asyncssh's as soon as it is known to be SSH."""

    def __init__(self, listener: ProxyListener, session_factory: Callable[[str, int], Any]) -> None:
        self.listener = listener
        self.session_factory = session_factory
        self.transport: asyncio.Transport | None = None
        self.peer, self.peer_port = "?", 0
        self.buffer = b""
        self.conn: Any = None  # asyncssh's SSHServerConnection once made (it is an asyncio.Protocol)
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # refused, closed quietly or handed over: nothing more to do here

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (create_server)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer, self.peer_port = _plain(str(peer[0])), int(peer[1]) if len(peer) > 1 else 0
        if self.listener.trust.trusts(self.peer):
            self.listener.fronts.add(self)
            self.timer = asyncio.get_running_loop().call_later(self.listener.header_timeout, self._late)
            return
        # Not a balancer: SSH starts now (the server speaks first); the client's first bytes are checked.
        self.conn = self.session_factory(self.peer, self.peer_port)
        self.conn.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.conn is not None:  # a direct client: its first bytes must not be a PROXY header
            if looks_like_proxy(data):
                self._refuse("a PROXY protocol header from an address not in listen.proxy_protocol_from")
                return
            self.done = True
            self._hand_over(data)
            return
        self.buffer += data
        try:
            header = parse_proxy_header(self.buffer)
        except ProxyHeaderError as exc:
            self._refuse(exc.message)
            return
        if header is None:
            return
        self._settle()
        if header.local:  # the balancer's health check: it only wanted to see the port answer
            assert self.transport is not None
            self.transport.close()
            return
        assert header.source is not None
        self.conn = self.session_factory(header.source, header.source_port)
        # The client's address is what asyncssh and the broker report (server.py reads peername for caps,
        # lockout, audit); where the bytes physically came from is kept as "balancer".
        self.conn.set_extra_info(peername=(header.source, header.source_port),
                                 balancer=(self.peer, self.peer_port))
        assert self.transport is not None
        self.transport.set_protocol(self.conn)
        self.conn.connection_made(self.transport)
        rest = self.buffer[header.length:]
        self.buffer = b""
        if rest and not self.transport.is_closing():
            self.conn.data_received(rest)

    def eof_received(self) -> bool | None:
        if self.conn is not None:
            return self.conn.eof_received()
        if not self.done:
            if self.buffer:
                self._refuse(f"the connection closed after {len(self.buffer)} bytes of an incomplete PROXY header")
            else:
                self._settle()  # a balancer's bare TCP check (or a port scan from its address): nothing to say
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.connection_lost(exc)
            return
        self._settle()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()

    # ------------------------------------------------------------------ helpers
    def _hand_over(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.set_protocol(self.conn)
        self.conn.data_received(data)

    def _settle(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.listener.fronts.discard(self)

    def _late(self) -> None:
        self.timer = None
        if self.done:
            return
        got = f" ({len(self.buffer)} bytes of it arrived)" if self.buffer else ""
        self._refuse(f"no complete PROXY protocol v2 header within {self.listener.header_timeout:g} s{got}")

    def close_waiting(self) -> None:
        """The listener is closing: a connection still waiting for its header goes, without a report."""
        self._settle()
        if self.transport is not None:
            self.transport.close()

    def _refuse(self, reason: str) -> None:
        self._settle()
        log.info("refused a connection from %s:%s before SSH: %s", self.peer, self.peer_port, reason)  # audited
        assert self.transport is not None
        self.transport.abort()
        try:
            self.listener.on_refused(self.peer, self.peer_port, reason)
        except Exception:  # noqa: BLE001 - per-connection boundary: a failed report never breaks the listener
            log.exception("reporting a refused connection from %s failed", self.peer)
