"""One approved port forward: a vendor ``direct-tcpip`` channel ⇄ a device ``direct-tcpip`` channel, recorded.

The device side is opened through the session's own device connection (to 127.0.0.1:PORT on the device), so
nothing but the device is reachable. Every byte is recorded before it is handed on (the acknowledgment rule,
docs/recording-format.md): plain text in full as ``input``/``output`` frames of the forward's channel, a TLS
stream as ``forward-bytes`` size frames only.

TLS is a verified property, not a first impression (issue 14 follow-up): a stream that starts like a
ClientHello (0x16 0x03) is first put to the site's rule (``[policy] forward_tls``: the session's
``tls_refusal``; refused before any byte reaches the device), then both directions must stay well-formed TLS
records (sessions/tlsrecords.py) with a ServerHello first from the device; the moment either is not, the
connection ends ("not TLS after a TLS start"). The cleartext handshake bytes are scanned.

Plain text is judged in both directions like shell/exec output: the patient-data scanners (a finding ends
the whole session, LiveSession), the file-transfer stream judge (sessions/streams.py: tar, zip, sftp, ...
end this connection) and, device to vendor, the held unfinished record-like line (sessions/tailhold.py).
Flow control is the relay's: stacked hold reasons per side. Imports only its sibling helpers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

import asyncssh

from sessions.holds import Holds
from sessions.relay import MAX_PACKET, oversize_reason
from sessions.sessionlog import session_log
from sessions.tailhold import TailHold
from sessions.tlsrecords import TLS_ALERT_ACCESS_DENIED, TlsRecords, is_tls_start

__all__ = ["ForwardContext", "ForwardRelay", "is_tls_start"]

log = logging.getLogger("medbroker.forward")

WRITE_BUFFER_HIGH = 1 << 20  # as sessions/relay.py
WRITE_BUFFER_LOW = 256 << 10


@dataclass
class ForwardContext:
    """What the session gives one forwarded connection."""

    number: int
    port: int
    recorder: Any
    """``append_data(channel, kind, bytes) -> int`` and ``append_event(channel, kind, dict) -> int``"""
    make_scanner: Callable[[], Any] | None = None
    """A patient-data scanner (``feed(bytes) -> str | None``) for what the device sends, or None (scanning off)."""
    make_input_scanner: Callable[[], Any] | None = None
    """The same for what the vendor sends (uploads never count against the opaque-output budget)."""
    make_handshake_scanner: Callable[[], Any] | None = None
    """A scanner for the cleartext TLS handshake bytes (no opaque budget: certificates look random), or None."""
    make_stream_judge: Callable[["ForwardRelay"], Any] | None = None
    """The file-transfer protocol judge for plain text (``feed("vendor"|"device", bytes) -> str | None``, which
    records and audits its finding itself), or None."""
    tls_refusal: Callable[[], str | None] = lambda: None
    """Asked when the vendor's first bytes start a TLS handshake: why TLS is not allowed here, or None."""
    on_detection: Callable[["ForwardRelay", str, str], None] = lambda relay, what, direction: None
    on_refused: Callable[["ForwardRelay", str, str, str], None] = lambda relay, kind, direction, message: None
    """``(relay, kind, direction, message)``: the connection ends for ``kind`` "tls" (the site's rule), "not-tls"
    (a TLS start, then no TLS), "protocol" (a file-transfer protocol, already audited by the judge) or "packet" (an
    SSH data packet over the announced 32 KiB)."""
    on_closed: Callable[["ForwardRelay"], None] = lambda relay: None
    forward_unrecorded: bool = False
    session_id: str = "?"
    """Named in every log line of the connection: ``[session=ID channel=N]`` (sessions/sessionlog.py)."""


class _DeviceSide(asyncssh.SSHTCPSession):
    def __init__(self, relay: "ForwardRelay") -> None:
        self.relay = relay

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.relay.from_device(data)

    def eof_received(self) -> bool:
        self.relay.device_eof()
        return True

    def pause_writing(self) -> None:
        self.relay.hold("vendor", "device-full")

    def resume_writing(self) -> None:
        self.relay.release("vendor", "device-full")

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.close("device closed" if exc is None else f"device error: {exc}")


class ForwardRelay(asyncssh.SSHTCPSession):
    """Vendor side of one forwarded connection (asyncssh server TCP session)."""

    kind = "forward"
    command = None
    subsystem = None

    def __init__(self, ctx: ForwardContext) -> None:
        self.ctx = ctx
        self.log = session_log(log, ctx.session_id, ctx.number)
        self.chan: asyncssh.SSHTCPChannel | None = None
        self.up: asyncssh.SSHTCPChannel | None = None
        self.tls: bool | None = None  # decided by the vendor's first bytes (None: not yet)
        self.bytes_to_device = 0
        self.bytes_to_vendor = 0
        self.closed = False
        self.reason = "closed"
        self._early: list[bytes] = []  # device bytes before the vendor channel exists
        self._first = b""  # the vendor's first byte(s) while too few to tell TLS
        self._holds = Holds(lambda side: self.chan if side == "vendor" else self.up)
        self._scan = {"vendor": ctx.make_input_scanner() if ctx.make_input_scanner else None,
                      "device": ctx.make_scanner() if ctx.make_scanner else None}
        self._tls: dict[str, TlsRecords] = {}  # per side, once the vendor started a TLS handshake
        self.judge = ctx.make_stream_judge(self) if ctx.make_stream_judge else None
        # the broker's bookkeeping of this forward's row (broker/live_forwards.py)
        self.row_id: int | None = None
        self.inserted: asyncio.Task | None = None
        self.saved = False
        self._tail = TailHold(self._release_tail)  # device to vendor, plain text (sessions/tailhold.py)

    def device_session(self) -> _DeviceSide:
        """The session factory's product for the device side (``create_connection``)."""
        return _DeviceSide(self)

    def attach_device(self, up: asyncssh.SSHTCPChannel) -> None:
        self.up = up
        up.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        if self._holds["device"]:
            up.pause_reading()

    # ------------------------------------------------------------ vendor side (asyncssh callbacks)
    def connection_made(self, chan: asyncssh.SSHTCPChannel) -> None:
        self.chan = chan
        chan.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        if self._holds["vendor"]:
            chan.pause_reading()
        early, self._early = self._early, []
        for data in early:
            self._to_vendor(data)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.closed or self._oversize("vendor", data):
            return
        if self.tls is None:
            data = self._first + data
            if len(data) < 2 and data[:1] == b"\x16":
                self._first = data  # one byte that may start a ClientHello: wait for the next
                return
            self._first = b""
            self.tls = is_tls_start(data)
            if self.tls and not self._start_tls(data):
                return
        if not self._judge("vendor", data):
            return
        self.bytes_to_device += len(data)
        if self._record("input", "device", data) and self.up is not None:
            self.up.write(data)

    def eof_received(self) -> bool:
        if self._first and not self.closed:  # a lone first byte: nothing more comes, hand it on
            first, self._first = self._first, b""
            self.tls = False
            self.data_received(first, None)
        self.ctx.recorder.append_event(self.ctx.number, "eof", {"from": "vendor"})
        if self.up is not None and not self.closed:
            self.up.write_eof()
        return True

    def pause_writing(self) -> None:
        self.hold("device", "vendor-full")

    def resume_writing(self) -> None:
        self.release("device", "vendor-full")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("vendor closed" if exc is None else f"vendor error: {exc}")

    # ------------------------------------------------------------ device side
    def from_device(self, data: bytes) -> None:
        if self.closed or self._oversize("device", data):
            return
        if self.tls is None:
            self.tls = False  # the device spoke first: not a TLS client hello
        if not self.bytes_to_vendor and not self.tls and data.startswith(b"SSH-"):
            self._ssh_refused()  # an SSH server on the device: an encrypted session past every guard
            return
        if not self._judge("device", data):
            return
        scanner = self._scan.get("device")
        if not self.tls and scanner is not None:
            # a record-like unfinished last line, or output inside an undecided compressed stream, waits briefly
            data = self._tail.take(data, scanner.undecided())
            if not data:
                return
        self._deliver(data)

    def _release_tail(self, held: bytes) -> None:
        if not self.closed:
            self._deliver(held)

    def _deliver(self, data: bytes) -> None:
        self.bytes_to_vendor += len(data)
        if self.chan is None:
            if self._record("output", "vendor", data):
                self._early.append(data)
            return
        if self._record("output", "vendor", data):
            self.chan.write(data)

    def _to_vendor(self, data: bytes) -> None:
        if self.chan is not None and not self.closed:
            self.chan.write(data)

    def device_eof(self) -> None:
        self._tail.flush()
        self.ctx.recorder.append_event(self.ctx.number, "eof", {"from": "device"})
        if self.chan is not None and not self.closed:
            self.chan.write_eof()

    # ------------------------------------------------------------ recording and judging
    def _record(self, kind: str, to: str, data: bytes) -> bool:
        """Queue the bytes (plain text) or their size (TLS) in the recording before they are handed on; False
        when the recorder did not take them (strict mode: they are dropped, never passed on unrecorded)."""
        if self.tls:
            taken = self.ctx.recorder.append_event(self.ctx.number, "forward-bytes", {"to": to, "bytes": len(data)})
        else:
            taken = self.ctx.recorder.append_data(self.ctx.number, kind, data)
        return bool(taken) or self.ctx.forward_unrecorded

    def _start_tls(self, first: bytes) -> bool:
        """The vendor's first bytes start a TLS handshake: the site's rule decides (before anything reaches the
        device), then both directions are held to the TLS record layer. False when refused."""
        refusal = self.ctx.tls_refusal()
        if refusal is None:
            self._tls = {"vendor": TlsRecords("client"), "device": TlsRecords("server")}
            return True
        self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {
            "protocol": "tls", "stream": "input", "port": self.ctx.port, "reason": refusal,
            "bytes_withheld": len(first)})
        self.ctx.on_refused(self, "tls", "to-device", refusal)
        # A TLS client shows a fatal access_denied alert ("tlsv1 alert access denied"), not a bare reset.
        if self.chan is not None and self._record("output", "vendor", TLS_ALERT_ACCESS_DENIED):
            self.chan.write(TLS_ALERT_ACCESS_DENIED)
        self.close(refusal)
        return False

    def _oversize(self, side: str, data: bytes) -> bool:
        """More data in one SSH packet than the 32 KiB announced (sessions/relay.py ``RelaySession._oversize``):
        nothing of it is recorded or forwarded, and the connection ends. True when that happened."""
        if len(data) <= MAX_PACKET:
            return False
        direction = "to-device" if side == "vendor" else "to-vendor"
        why = oversize_reason(side, len(data), "closed the forwarded connection")
        self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {
            "stream": "input" if side == "vendor" else "output", "reason": why, "port": self.ctx.port})
        self.ctx.on_refused(self, "packet", direction, why)
        self.close(why)
        return True

    def _judge(self, side: str, data: bytes) -> bool:
        """TLS is held to the record layer (its cleartext handshake scanned); plain text is scanned and judged
        for file-transfer protocols in both directions. True when ``data`` may pass."""
        direction = "to-device" if side == "vendor" else "to-vendor"
        if self.tls:
            records = self._tls[side]
            why = records.feed(data)
            if why:
                self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {
                    "protocol": "not-tls", "stream": "input" if side == "vendor" else "output",
                    "port": self.ctx.port, "reason": why})
                self.ctx.on_refused(self, "not-tls", direction, why)
                self.close(why)
                return False
            if not records.handshake:
                return True
            scanner = self._scan.setdefault(f"{side}-handshake", self.ctx.make_handshake_scanner()
                                            if self.ctx.make_handshake_scanner else None)
            return scanner is None or self._content(scanner.feed(records.handshake), side, direction)
        scanner = self._scan.get(side)
        if scanner is not None and not self._content(scanner.feed(data), side, direction):
            return False
        if self.judge is not None:
            refusal = self.judge.feed(side, data)
            if refusal is not None:
                self.judge = None
                self.ctx.on_refused(self, "protocol", direction, refusal)
                self.close(refusal)
                return False
        return True

    def _content(self, hit: str | None, side: str, direction: str) -> bool:
        """A scanner's verdict: patient data ends the connection here and the session (LiveSession)."""
        if not hit:
            return True
        self._scan = {}
        self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {
            "content": hit, "stream": "input" if side == "vendor" else "output", "port": self.ctx.port})
        self.close(f"{hit} patient data {direction}")
        self.ctx.on_detection(self, hit, direction)
        return False

    def _ssh_refused(self) -> None:
        self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {
            "protocol": "ssh", "stream": "output", "port": self.ctx.port,
            "reason": "an SSH server answered on a forwarded port; SSH to the device goes through medbroker"})
        self.ctx.on_detection(self, "ssh", "to-vendor")
        self.close("an SSH server answered on the forwarded port")

    # ------------------------------------------------------------ flow control
    def hold(self, side: str, reason: str) -> None:
        """Stop reading ``side`` ("vendor" or "device") until every reason is released (sessions/holds.py)."""
        self._holds.hold(side, reason)

    def release(self, side: str, reason: str) -> None:
        self._holds.release(side, reason)

    # ------------------------------------------------------------ broker actions (LiveSession)
    def notice(self, message: str, **_: Any) -> None:
        """A forwarded TCP stream has no terminal: the message is recorded only (the session's shell shows it)."""
        if not self.closed:
            self.ctx.recorder.append_event(self.ctx.number, "notice", {"text": message})

    def exit(self, status: int) -> None:
        """End the forwarded connection on the broker's initiative (session ended, killed, window over)."""
        self.close("ended by medbroker")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self._tail.cancel()
        for chan in (self.chan, self.up):
            if chan is not None:
                try:
                    chan.close()
                except Exception:  # already gone
                    self.log.debug("closing a forward channel failed", exc_info=True)
        self.ctx.recorder.append_event(self.ctx.number, "channel-close", {
            "port": self.ctx.port, "bytes_to_device": self.bytes_to_device, "bytes_to_vendor": self.bytes_to_vendor,
            "tls": bool(self.tls), "reason": reason})
        self.ctx.on_closed(self)
