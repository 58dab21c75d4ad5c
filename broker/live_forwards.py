"""Forwarded connections of a live session (``ssh -L``, issue 14): deciding, opening, recording, auditing.

``open_forward`` answers the server's ``connection_requested`` for a device login (the login is handed down as
a value); ``SessionForwards`` is the part of ``LiveSession`` (broker/live.py) that opens a forward over the
session's device connection and hears its findings and its end.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine

import asyncssh

from broker.clock import utc_iso
from broker.devices import Device
from broker.errors import ApprovalRequiredError, BrokerError, DeviceUnreachableError
from broker.forwards import forward_refusal, grant_ports, tls_refusal
from broker.grants import Grant, find_active_grant, request_hint
from broker.identity import standing_refusal
from broker.session_context import SessionIdentity, SessionServices, VendorLogin
from sessions.decoders import DeepScanner
from sessions.entropy import OPAQUE
from sessions.forward import ForwardContext, ForwardRelay
from sessions.relay import RelaySession

__all__ = ["SessionForwards", "open_forward"]

log = logging.getLogger("medbroker.live")


class SessionForwards:
    """The forwards of a :class:`broker.live.LiveSession`, which this class is a part of: a forward is a channel
    of the session (``max_channels``, ended with it), recorded and scanned like its shell and exec channels."""

    # Given by LiveSession (broker/live.py):
    services: SessionServices
    who: SessionIdentity
    id: str
    user: str
    device: Device
    grant: Grant
    recorder: Any
    channels: set
    numbers: int
    upconn: asyncssh.SSHClientConnection | None
    ending: bool
    finished: asyncio.Event
    containment: Any
    terminate: Callable[..., Coroutine[Any, Any, None]]
    _opaque_detail: Callable[[str], dict[str, Any]]

    async def open_forward(self, port: int, dest_host: str, origin: str) -> ForwardRelay:
        """A forwarded connection to 127.0.0.1:``port`` on the device, through this session's device connection
        (issue 14): a channel of the session (max_channels, ended with it), recorded and scanned.

        :raises BrokerError: too many channels, or the device refused the connection (the reason says which)
        """
        if self.upconn is None or self.ending:
            raise DeviceUnreachableError("the session is ending")
        if len(self.channels) >= self.services.settings.max_channels:
            raise BrokerError(f"at most {self.services.settings.max_channels} channels per connection",
                              "close some sessions or forwarded connections on this connection")
        self.numbers += 1
        number = self.numbers
        policy = self.services.policy_for(self)
        relay = ForwardRelay(ForwardContext(
            number=number, port=port, recorder=self.recorder, make_scanner=policy.make_scanner,
            make_input_scanner=DeepScanner if policy.scan_output else None,
            make_handshake_scanner=DeepScanner if policy.scan_output else None,
            make_stream_judge=policy.make_stream_judge, tls_refusal=lambda: self._tls_refusal(port),
            on_detection=self._forward_detected, on_refused=self._forward_refused, on_closed=self._forward_closed,
            forward_unrecorded=not self.services.settings.strict, session_id=self.id))
        if self.recorder.paused:
            relay.hold("vendor", "recorder")
            relay.hold("device", "recorder")
        self.channels.add(relay)
        self.recorder.append_event(number, "channel-open", {"type": "direct-tcpip", "port": port,
                                                            "host": dest_host, "origin": origin})
        try:
            up, _ = await self.upconn.create_connection(relay.device_session, "127.0.0.1", port)
        except (asyncssh.Error, OSError) as exc:
            why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            relay.close(f"device refused: {why}")
            raise DeviceUnreachableError(f"{self.device.name} refused the connection to its port {port} ({why})",
                              "is the service running on the device? try again or call the hospital") from None
        if self.ending or relay.closed:
            up.close()
            relay.close("the session ended while the forward opened")
            raise BrokerError("the session is ending")
        relay.attach_device(up)
        relay.row_id = None
        fields = dict(self.who.audit_fields(), channel=number, port=port, target=f"{dest_host}:{port}", origin=origin)
        self.services.audit_soon("forward.open", **fields)

        async def insert() -> None:
            relay.row_id = await self.services.db(self.services.app.store.insert_forward, {
                "session_id": self.id, "channel": number, "port": port,
                "opened_at": utc_iso(self.services.app.clock.now())})
            if relay.closed:  # closed before the row existed: write its end now
                await self._save_forward(relay)
        relay.inserted = self.services.spawn(insert())
        return relay

    def _tls_refusal(self, port: int) -> str | None:
        """``[policy] forward_tls`` for this session's device (its containment at session start)."""
        state = self.containment.state if self.containment is not None else None
        return tls_refusal(self.services.app.config.policy.forward_tls, state, self.device.name, port)

    def _forward_detected(self, relay: ForwardRelay, what: str, direction: str) -> None:
        """A finding in a forward's plain text (or TLS handshake). Patient data (or the opaque budget) ends the
        session, as in shell/exec output (``_detected``); an SSH server on the port ends that connection only."""
        fields = dict(self.who.audit_fields(), channel=relay.ctx.number, content=what, port=relay.ctx.port,
                      direction=direction, kind="forward")
        if what == "ssh":
            message = (f"an SSH server answered on the forwarded port {relay.ctx.port}; SSH to {self.device.name} goes "
                       f"through medbroker (ssh {self.user}@{self.device.name}@{self.services.settings.public_host}), "
                       "so the forwarded connection was closed and security staff were alerted")
            self.recorder.append_event(relay.ctx.number, "alert", {"content": what, "action": "forward closed",
                                                                   "port": relay.ctx.port, "reason": message})
            self.services.audit_soon("alert.exfiltration", **fields)
            for other in list(self.channels):  # the vendor's terminal (if any) says why the page stopped
                if isinstance(other, RelaySession):
                    other.notice(message)
            return
        if what == OPAQUE:  # the session's opaque-output budget (sessions/entropy.py), shared with exec output
            budget = getattr(self, "opaque_budget", None)
            why = budget.describe() if budget else "too much output that could not be inspected"
            message = (f"the session produced {why}, which the patient-data guard cannot check; the session was "
                       "ended and security staff were alerted")
        elif direction == "to-vendor":
            message = (f"output contained {what} patient data, which may not leave the hospital; the session "
                       "was ended and security staff were alerted")
        else:
            message = (f"a forwarded connection to port {relay.ctx.port} carried {what} patient data to the device; "
                       "the session was ended and security staff were alerted")
        self.recorder.append_event(relay.ctx.number, "alert", {"content": what, "action": "session ended",
                                                               "port": relay.ctx.port, "reason": message})
        self.services.audit_soon("alert.exfiltration", **fields, **self._opaque_detail(what))
        self.services.spawn(self.terminate("stopped", message))

    def _forward_refused(self, relay: ForwardRelay, kind: str, direction: str, message: str) -> None:
        """A forwarded connection ended by a rule: TLS not allowed here ("tls": ``channel.refused``), a TLS
        start that stopped being TLS ("not-tls": ``channel.protocol.denied``), a file-transfer protocol
        ("protocol": the stream judge audited it). The vendor's terminal, if a shell is open, says why."""
        fields = dict(self.who.audit_fields(), channel=relay.ctx.number, port=relay.ctx.port)
        if kind in ("tls", "packet"):
            self.services.audit_soon("channel.refused", **fields, kind="direct-tcpip", protocol=kind,
                                     target=f"{self.device.name}:{relay.ctx.port}", reason=message)
        elif kind == "not-tls":
            self.services.audit_soon("channel.protocol.denied", **fields, kind="forward", protocol="not-tls",
                                     direction=direction, reason=message)
            message = (f"a forwarded connection to port {relay.ctx.port} was closed: {message} (medbroker records "
                       "TLS as sizes only, so a stream that starts as TLS must stay TLS)")
        for other in list(self.channels):
            if isinstance(other, RelaySession):
                other.notice(message)

    def _forward_closed(self, relay: ForwardRelay) -> None:
        self.channels.discard(relay)
        if relay.up is None:  # never opened on the device (refused there): open_forward tells the vendor why
            return
        self.services.audit_soon("forward.close", **self.who.audit_fields(), channel=relay.ctx.number,
                                 port=relay.ctx.port, bytes_to_device=relay.bytes_to_device,
                                 bytes_to_vendor=relay.bytes_to_vendor, tls=bool(relay.tls), reason=relay.reason)
        if getattr(relay, "row_id", None) is not None:
            self.services.spawn(self._save_forward(relay))

    async def _save_forward(self, relay: ForwardRelay) -> None:
        row_id = relay.row_id
        if row_id is None or getattr(relay, "saved", False):
            return
        relay.saved = True
        values = dict(closed_at=utc_iso(self.services.app.clock.now()), bytes_to_device=relay.bytes_to_device,
                      bytes_to_vendor=relay.bytes_to_vendor, tls=int(bool(relay.tls)), outcome=relay.reason)
        await self.services.db(lambda: self.services.app.store.close_forward(row_id, **values))


async def open_forward(services: SessionServices, login: VendorLogin, current: Callable[[], SessionForwards | None],
                       ensure_live: Callable[[], Awaitable[SessionForwards]], dest_host: str, dest_port: int,
                       origin: str) -> ForwardRelay:
    """``connection_requested`` on a device login (``ssh -L 8443:ct-01:443 alice@ct-01@broker``): the port must be
    in the grant, never a protected one; the session starts here if no channel started it (grant, recording,
    device connection: ``ensure_live``). Refusals reach OpenSSH as "open failed: administratively prohibited:
    medbroker: <reason>" and are audited as ``channel.refused``.

    :param login: who asks (handed down by the server, never read back from it)
    :param current: the connection's live session now, or None
    :param ensure_live: the connection's live session, started if there is none (or it is ending)
    :raises asyncssh.ChannelOpenError: refused, or the device refused the connection
    """
    b = services
    target = f"{dest_host}:{dest_port}"

    def refused(text: str, code: int = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED) -> asyncssh.ChannelOpenError:
        live = current()
        if live is not None and live.recorder is not None and not live.finished.is_set():
            live.recorder.append_event(0, "policy-denial", {"kind": "forward", "target": target, "reason": text})
        b.audit_soon("channel.refused", **login.audit_fields(), kind="direct-tcpip", target=target, reason=text,
                     session_id=live.id if live else None, grant_id=live.grant.id if live else None)
        return asyncssh.ChannelOpenError(code, f"medbroker: {text}")

    try:
        refusal = await b.db(standing_refusal, b.app.store, login.user, login.key, login.role)
        if refusal:
            raise refused(f"{refusal}; new channels on this connection are refused")
        live = current()
        if live is None or live.ending:  # decide before starting a session (and a recording) for nothing
            now, name = b.app.clock.now(), login.device
            assert name is not None  # open_forward serves device logins only
            hint = request_hint(login.user, name, b.settings.public_host, b.settings.port) + f" --forward {dest_port}"
            try:
                grant = await b.db(lambda: find_active_grant(b.app.store, login.user, name, now, hint=hint))
                device = await b.db(b.app.store.get_device, name)
            except ApprovalRequiredError as exc:
                raise refused(f"{exc.message}; {exc.hint}") from None
            why = forward_refusal(dest_host, dest_port, name, grant_ports(grant.forwards), b.app.protected_ports,
                                  (device or {}).get("port"))
            if why:
                raise refused(why)
        live = await ensure_live()
        why = forward_refusal(dest_host, dest_port, live.device.name, grant_ports(live.grant.forwards),
                              b.app.protected_ports, live.device.port)
        if why:
            raise refused(why)
        return await live.open_forward(dest_port, dest_host, origin)
    except asyncssh.ChannelOpenError:
        raise
    except BrokerError as exc:
        code = asyncssh.OPEN_CONNECT_FAILED if isinstance(exc, DeviceUnreachableError) \
            else asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        raise refused(exc.message + (f"; {exc.hint}" if exc.hint else ""), code) from None
    except asyncio.CancelledError:
        raise
    except Exception:  # the per-channel boundary: logged with the session, refused (never an open channel)
        log.exception("opening a forward to %s for %s failed", target, login.user)
        raise refused("medbroker could not open this forward; see the broker log") from None
