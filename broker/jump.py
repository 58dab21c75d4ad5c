"""ProxyJump: ``ssh -J alice@broker:2222 alice@ct-01`` is an ordinary recorded medbroker session to ct-01.

A self-service login (``alice@broker``, no device in the name) may open a direct-tcpip channel to
``DEVICE:22`` (or the device's own SSH port number), where DEVICE is a registered device name. Nothing is
connected to the device for it: the broker serves SSH itself on that channel (a socketpair, one end run by
asyncssh as a :class:`JumpServer`, the other pumped to and from the channel with both sides' flow
control). The vendor's client then logs in to that inner server, which is a :class:`BrokerServer` for the
outer login's user and this device: same key again (the fingerprint must equal the outer one), grant check,
broker-held device credential, recording, file guard, scanners, window, kill and revoke, all unchanged. The
inner host key is the per-device key of broker/jumpkeys.py.

The identity is always the outer login's: the name typed for the inner hop (``service``, ``alice``,
``alice@ct-01``) is recorded but never selects a user; a name ending in ``@OTHER`` for another device is
refused. Every other direct-tcpip target (an unknown name, an IP address, the device's real address, another
port) is refused with one neutral sentence that does not say which names exist. docs/security.md §ProxyJump.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

import asyncssh

from broker.devices import Device, list_devices
from broker.grants import list_grants
from broker.identity import standing_refusal
from broker.jumpkeys import device_host_key
from broker.keys import openssh_fingerprint
from broker.server import BrokerServer, listen_options

if TYPE_CHECKING:  # pragma: no cover
    from broker.server import Broker

__all__ = ["JumpChannel", "JumpServer", "inner_login_refusal", "jump_target", "open_jump"]

log = logging.getLogger("medbroker.jump")

JUMP_PORT = 22
PIPE_HIGH_WATER = 256 * 1024  # bytes buffered towards the inner server before the outer channel stops reading


def jump_target(devices: list[Device], host: str, port: int) -> Device | None:
    """The registered device a direct-tcpip request to ``host:port`` may reach, or None.

    Only a device *name*, spelled as registered, with port 22 or the device's own SSH port: never an address.
    """
    for device in devices:
        if device.name == host and port in (JUMP_PORT, device.port):
            return device
    return None


def inner_login_refusal(login: str, device: str) -> str | None:
    """Why the name typed for the inner hop is refused, or None. Only a name that names another device is;
    any other name is accepted and ignored (the outer login decides who this is)."""
    _, sep, named = login.rpartition("@")
    if sep and named != device:
        return (f"the login name {ascii(login[:80])[1:-1]} names the device {ascii(named[:63])[1:-1]}, but this jump "
                f"goes to {device}; use your own name, e.g. ssh -J USER@BROKER {device}")
    return None


def _refusal_text(user: str, host: str, port: int, public_host: str, broker_port: int,
                  known: Device | None) -> str:
    shown = f"{ascii(host[:80])[1:-1]}:{port}"
    if known is not None:  # a device this vendor has been granted before: say what is wrong
        ports = "22" if known.port == JUMP_PORT else f"22 or {known.port}"
        return (f"medbroker: a jump to {known.name} goes to its SSH port ({ports}), not {port}; "
                f"use: ssh -J {user}@{public_host}:{broker_port} {user}@{known.name}")
    return (f"medbroker: {shown} is not a destination of this broker; a jump goes to a medbroker device name and "
            f"its SSH port: ssh -J {user}@{public_host}:{broker_port} {user}@DEVICE (your devices: "
            f"ssh -p {broker_port} {user}@{public_host})")


def _decide(store: Any, user: str, host: str, port: int) -> tuple[Device | None, Device | None]:
    """(the target device, or None; when refused, the named device if this user was ever granted it)."""
    devices = list_devices(store)
    target = jump_target(devices, host, port)
    if target is not None:
        return target, None
    named = next((d for d in devices if d.name == host), None)
    if named is not None and any(g.device == named.name for g in list_grants(store, user=user)):
        return None, named
    return None, None


async def open_jump(outer: BrokerServer, host: str, port: int) -> "JumpChannel":
    """Decide a direct-tcpip request of a self-service login (``connection_requested`` returns this coroutine;
    asyncssh awaits it before answering the channel open).

    :raises asyncssh.ChannelOpenError: the target is not a registered device's SSH port, the login no longer
        stands, or this connection has too many jumps open (the reason reaches the vendor's terminal; audited)
    """
    b = outer.broker
    target = f"{host}:{port}"

    async def refuse(reason: str) -> None:
        await b.audit("channel.refused", user=outer.user, device=None, source=outer.source, kind="direct-tcpip",
                      target=ascii(target[:120])[1:-1], reason=reason)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, reason)

    try:
        standing = await b.db(standing_refusal, b.app.store, outer.user, outer.fingerprint,
                              outer.principal.role if outer.principal else None)
        if standing:
            await refuse(f"medbroker: {standing}; new channels on this connection are refused. "
                         "Ask the hospital's medbroker administrators.")
        device, known = await b.db(_decide, b.app.store, outer.user, host, port)
        if device is None:
            assert outer.user is not None  # jumps are asked for only after authentication
            await refuse(_refusal_text(outer.user, host, port, b.settings.public_host, b.port, known))
        jumps = getattr(outer, "jumps", None)
        if jumps is None:
            jumps = outer.jumps = set()
        limit = b.app.config.limits.max_channels_per_connection
        if len(jumps) >= limit:
            await refuse(f"medbroker: at most {limit} jumps at a time on one connection; close some first")
        if b.stopping:
            await refuse("medbroker: the broker is shutting down; reconnect in a moment")
        key = await b.db(device_host_key, b.app, device.name)
    except asyncssh.ChannelOpenError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception:  # the per-connection boundary: never an internal error that kills the outer connection
        log.exception("jump to %s for %s failed", target, outer.user)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                        "medbroker: the jump could not be set up; try again, or tell the "
                                        "hospital's medbroker administrators") from None
    channel = JumpChannel(outer, device, key)
    jumps.add(channel)
    await b.audit("jump.open", user=outer.user, device=device.name, source=outer.source, target=target)
    return channel


class _Pipe(asyncio.Protocol):
    """The channel's end of the socketpair: inner server → vendor, with the channel's window as backpressure."""

    def __init__(self, channel: "JumpChannel") -> None:
        self.channel = channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(high=PIPE_HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.channel.to_vendor(data)

    def eof_received(self) -> bool:
        return False  # the inner server closed its end: the transport closes, connection_lost closes the channel

    def pause_writing(self) -> None:  # the inner server is behind: stop reading the vendor's channel
        self.channel.hold(True)

    def resume_writing(self) -> None:
        self.channel.hold(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel.inner_gone()


class JumpChannel(asyncssh.SSHTCPSession):
    """The outer direct-tcpip channel of one jump: bytes to and from the inner server, both ways bounded.

    Nothing is set up before asyncssh confirms the channel (a channel that never opens leaves no socket
    behind); until the inner side is ready the vendor's first bytes wait here with the channel paused.
    """

    def __init__(self, outer: BrokerServer, device: Device, key: asyncssh.SSHKey) -> None:
        self.outer, self.device, self.key = outer, device, key
        self.broker: "Broker" = outer.broker
        self.chan: asyncssh.SSHTCPChannel | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.early_eof = False
        self.closed = False
        self.inner: JumpServer | None = None
        self.bytes_in = self.bytes_out = 0
        self._held: set[str] = set()

    # ------------------------------------------------------------ asyncssh side (the vendor's channel)
    def connection_made(self, chan: asyncssh.SSHTCPChannel) -> None:
        self.chan = chan

    def session_started(self) -> None:
        self.broker.spawn(self._start())

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.bytes_in += len(data)
        if self.transport is None:
            self.early.append(data)
            self.hold(True, "starting")
            return
        self.transport.write(data)

    def eof_received(self) -> bool:
        if self.transport is None:
            self.early_eof = True
        elif self.transport.can_write_eof():
            self.transport.write_eof()
        return True  # half-close: the inner server may still answer

    def pause_writing(self) -> None:  # the vendor's window is full: stop reading the inner server
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        jumps = getattr(self.outer, "jumps", None)
        if jumps is not None:
            jumps.discard(self)
        if self.transport is not None:
            self.transport.close()  # the inner server sees its connection end (its session finishes)
        self.broker.audit_soon("jump.close", user=self.outer.user, device=self.device.name, source=self.outer.source,
                               session_id=self.inner.live.id if self.inner and self.inner.live else None,
                               bytes_in=self.bytes_in, bytes_out=self.bytes_out)

    # ------------------------------------------------------------ pipe side (the inner server)
    def hold(self, on: bool, reason: str = "inner") -> None:
        """Stop (or go on) reading the vendor's channel; reasons stack."""
        was = bool(self._held)
        (self._held.add if on else self._held.discard)(reason)
        if self.chan is None or bool(self._held) == was:
            return
        if self._held:
            self.chan.pause_reading()
        else:
            self.chan.resume_reading()

    def to_vendor(self, data: bytes) -> None:
        if self.chan is not None and not self.closed:
            self.bytes_out += len(data)
            self.chan.write(data)

    def inner_gone(self) -> None:
        if self.chan is not None and not self.closed:
            self.chan.close()  # asyncssh sends what is still buffered first

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            self.transport, _ = await loop.create_connection(lambda: _Pipe(self), sock=ours)
        except (OSError, RuntimeError):
            ours.close()
            theirs.close()
            log.exception("jump to %s: the socketpair could not be set up", self.device.name)
            self.inner_gone()
            return
        if self.closed:  # the vendor left meanwhile
            self.transport.close()
            theirs.close()
            return
        for data in self.early:
            self.transport.write(data)
        self.early.clear()
        if self.early_eof:
            self.transport.write_eof()
        self.hold(False, "starting")
        await self._serve(theirs)

    async def _serve(self, sock: socket.socket) -> None:
        """Run the inner SSH server until the vendor is logged in (or refused); the session then runs on."""
        b = self.broker
        options = listen_options(b.app)
        options["server_host_keys"] = [self.key]
        try:
            await asyncssh.run_server(sock, server_factory=self._make_server, **options)
        except asyncio.CancelledError:
            sock.close()
            raise
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:  # refused or gone before login: audited
            log.debug("jump to %s ended before login: %r", self.device.name, exc)  # by the inner server itself
            sock.close()
            self.inner_gone()
        except Exception:
            log.exception("jump to %s failed", self.device.name)
            sock.close()
            self.inner_gone()

    def _make_server(self) -> "JumpServer":
        self.inner = JumpServer(self.broker, self.outer, self.device.name)
        return self.inner


class JumpServer(BrokerServer):
    """The inner SSH server of one jump: a :class:`BrokerServer` for the outer login's user and the jump's
    device, from the outer connection's address. Authentication: the outer login's key again (the same
    fingerprint; any other key is refused), and the outer login's verification code where TOTP is enrolled
    (it was checked on this very connection: asking again would make the vendor wait for the next code)."""

    via = "proxyjump"

    def __init__(self, broker: "Broker", outer: BrokerServer, device: str) -> None:
        super().__init__(broker)
        self.outer = outer
        self.target = device
        self.inner_login: str | None = None
        self.key_banner_sent = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        conn.set_extra_info(peername=(self.outer.source, 0))  # counted and audited as the vendor's address
        super().connection_made(conn)

    def begin_auth(self, username: str) -> bool:
        self.principal, self.fingerprint = None, None
        self.refreshed = False
        self.key_verified = self.code_ok = False
        self.login = self.inner_login = username
        self.login_error = None
        if self.refusal:
            self.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, self.refusal)
            return True
        self.user, self.device_name = self.outer.user, self.target
        why = inner_login_refusal(username, self.target)
        if why:
            self.user = None
            self.login_error = why
            self.conn.send_auth_banner(f"medbroker: {why}\n")
            self.broker.audit_soon("auth.failure", user=self.outer.user, device=self.target, source=self.source,
                                   reason="jump login names another device", login=ascii(username[:80])[1:-1])
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self.user is None or self.key_verified:
            return False
        fingerprint = openssh_fingerprint(key.public_data)
        if fingerprint != self.outer.fingerprint:
            self.tried_keys.add(fingerprint)  # counted as a failed login when the connection ends unauthenticated
            if not self.key_banner_sent:
                self.key_banner_sent = True
                self.conn.send_auth_banner(f"medbroker: log in to {self.target} with the same key you used for "
                                           "the broker (the jump's first hop)\n")
            return False
        ok = await super().validate_public_key(username, key)
        if ok and self.outer.code_ok:
            self.code_ok = True  # the outer hop's code, verified on this connection: no second prompt
        return ok

    async def auth_completed(self) -> None:
        await super().auth_completed()
        if self.authenticated:
            await self.broker.audit("jump.login", user=self.user, device=self.target, source=self.source,
                                    login=ascii((self.inner_login or "")[:80])[1:-1], key=self.fingerprint)
