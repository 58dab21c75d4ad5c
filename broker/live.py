"""A live device session: one vendor connection's upstream link, recording, channels and window timers."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import asyncssh

from broker.clock import clock_text, display_zone, utc_iso
from broker.containment import session_containment
from broker.config import format_duration, parse_size
from broker.devices import Device
from broker.errors import BrokerError, DeviceUnreachableError, HostKeyMismatchError, RecordingError
from broker.grants import Grant, putty_line
from broker.indexer import build_index_rows
from broker.journal import UNREACHABLE, JournalError, JournalSink, rebuild_from_journal
from broker.keys import Secret, openssh_fingerprint
from broker.live_forwards import SessionForwards
from broker.session_context import SessionIdentity, SessionServices
from sessions.cmd_judge import DevicePaths
from sessions.entropy import OPAQUE, OpaqueBudget
from sessions.recording import seal_recording, sign_final_hash
from sessions.recwriter import RecordingWriter
from sessions.forward import ForwardRelay
from sessions.relay import ChannelContext, RelaySession
from sessions.sessionlog import session_log

__all__ = ["LiveSession", "INTERRUPTED_REASON", "process_alive", "seal_interrupted_sessions", "seal_orphaned_sessions"]

log = logging.getLogger("medbroker.live")

# Upstream: prefer AES-GCM (fast in asyncssh); the device's own list decides what is possible.
UPSTREAM_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                    "aes128-ctr", "aes256-ctr"]
VENDOR_LEFT = "vendor disconnected"  # a session's end reason when nothing else ended it


def _why(exc: BaseException) -> str:
    """asyncssh's reason for a lost connection ("Client not responding to keepalive"), else the error."""
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


class LiveSession(SessionForwards):
    """Everything one vendor connection to one device shares.

    :param services: what the session asks of the broker process (audit, store, spawn, settings, policy)
    :param who: who, what and where, decided before the session starts (id, login, device, grant)
    :param credential: the broker-held device credential
    :param close_vendor: closes the vendor's connection (when the session is ended from here)
    """

    # made on first use by the channel policy (broker/channels.py), shared by all channels of the session
    device_paths: DevicePaths | None = None
    opaque_budget: OpaqueBudget | None = None

    def __init__(self, services: SessionServices, who: SessionIdentity, credential: Secret[str],
                 close_vendor: Callable[[], None]) -> None:
        self.services = broker = services  # the Broker, seen only through SessionServices
        self.who = who
        self.device: Device = who.device
        self.grant: Grant = who.grant
        self._credential = credential
        self._close_vendor = close_vendor
        self.id = who.session_id
        self.log = session_log(log, self.id)  # "[session=ID] ..." on every line
        self.user = who.user
        self.channels: set[RelaySession | ForwardRelay] = set()
        self.numbers = 0
        self.upconn: asyncssh.SSHClientConnection | None = None
        self.recorder: RecordingWriter | None = None
        # the row names the recording by its key in the recording store; the writer needs a local file
        self.recording_key, self.path = broker.app.recordings.path_for_new(self.id)
        self.ending = False
        self.finished = asyncio.Event()
        self._finish_task: asyncio.Future | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._end_status = "closed"
        self._end_reason = VENDOR_LEFT
        self.abort_reason: tuple[str, str] | None = None  # (status, reason) when start() is cancelled on purpose
        self.containment = None  # the ContainmentReport that applies (broker/containment.py), set at start

    # ---------------------------------------------------------------- setup
    async def start(self) -> None:
        """Open the recording (fail closed), the session row and the upstream connection.

        :raises RecordingError: recording unavailable in strict mode
        :raises DeviceUnreachableError: the device is down, slow, or its host key is wrong
        """
        b, s = self.services, self.services.settings
        now = b.app.clock.now()
        header = {
            "session_id": self.id, "user": self.user, "device": self.device.name, "grant_id": self.grant.id,
            "source": self.who.source, "started_at": utc_iso(now), "device_host": self.device.host,
            "device_host_key": self.device.host_key_fingerprint, "grant_ends_at": utc_iso(self.grant.ends_at),
            "containment": self.device.containment, "containment_checked_at": self.device.containment_checked_at,
        }
        header.update(self.who.via_fields())  # "proxyjump": reached through ssh -J (broker/jump.py)
        key_id, key = b.app.keys.current() if s.encrypt else (None, None)
        loop = asyncio.get_running_loop()
        rec_cfg = b.app.config.recording
        try:
            # [recording] journal: each batch is acknowledged only once it is also committed to the database
            journal = JournalSink(b.app.journal_store, self.id, b.app.clock,
                                  b.app.config.seconds("recording", "journal_timeout")) if rec_cfg.journal else None
            self.recorder = RecordingWriter(
                self.path, header, clock=b.app.clock, aead_key=key, key_id=key_id,
                on_error=lambda exc: loop.call_soon_threadsafe(self._recording_failed, exc),
                on_pause=self._recorder_behind,
                on_resume=lambda: loop.call_soon_threadsafe(self._recorder_caught_up),
                window=parse_size(rec_cfg.ack_window), journal=journal)  # the acknowledgment rule:
            # docs/recording-format.md (recording.ack_window, 256 KiB by default)
        except (OSError, BrokerError) as exc:
            await b.audit("recording.failed", **self.who.audit_fields(source=True, grant=False), error=str(exc))
            await b.audit("session.refused", user=self.user, device=self.device.name, source=self.who.source,
                          reason="recording unavailable")
            raise RecordingError(
                "recording is unavailable, and medbroker never runs a session it cannot record",
                "try again later and tell the hospital's security team") from None
        # From here on every way out (device error, the vendor leaving, the broker stopping: both cancel this
        # task, each naming itself in abort_reason) closes the recording, the row and any device connection.
        try:
            # Shielded: a cancel must not drop the queued insert, or session.end would name a row never written.
            await asyncio.shield(b.db(b.app.store.insert_session, {
                "id": self.id, "user_name": self.user, "device": self.device.name, "grant_id": self.grant.id,
                "source": self.who.source, "started_at": utc_iso(now), "status": "live",
                "recording": self.recording_key, "broker_pid": b.pid, "node_id": b.node_id,
                "last_activity_at": utc_iso(now),
                "auth_key": self.who.key, "user_role": self.who.role, **self.who.via_fields(),
            }))
            self.upconn = await self._connect()
            self.containment = await session_containment(b, self)  # cached briefly; a 'containment' frame follows
            self.upconn_closed = False
            if self.ending:  # the recording failed while connecting (e.g. the journal stayed down): never start
                self.upconn.close()
                raise RecordingError("recording is unavailable, and medbroker never runs a session it cannot record",
                                     "try again later and tell the hospital's security team")
            b.live[self.id] = self
            await b.audit("session.start", **self.who.audit_fields(source=True), recording=self.path.name,
                          grant_ends_at=utc_iso(self.grant.ends_at), containment=self.containment.state,
                          **self.who.via_fields())
        except BrokerError as exc:
            await self.finish("failed", reason=exc.message)
            raise
        except asyncio.CancelledError:
            status, reason = self.abort_reason or ("failed", "the broker stopped while connecting to the device")
            await asyncio.shield(self.finish(status, reason=reason))
            raise
        self._schedule_window()

    async def _connect(self) -> asyncssh.SSHClientConnection:
        b, s, dev = self.services, self.services.settings, self.device
        secret = self._credential.reveal()
        opts: dict[str, Any] = dict(
            username=dev.login, known_hosts=([asyncssh.import_public_key(dev.host_key)], [], []),
            config=None, agent_path=None, agent_forwarding=False, gss_auth=False, gss_kex=False,
            connect_timeout=s.connect_timeout_s, keepalive_interval=s.keepalive_s, keepalive_count_max=3,
            encryption_algs=UPSTREAM_CIPHERS, compression_algs=["none"],
        )
        if dev.auth_kind == "key":
            opts.update(client_keys=[asyncssh.import_private_key(secret)], preferred_auth="publickey")
        else:
            opts.update(password=secret, client_keys=None, preferred_auth="password,keyboard-interactive")
        for k, v in dev.legacy_algorithms.items():
            opts[k] = "+" + ",".join(v)
        if dev.legacy_algorithms:
            await b.audit("device.legacy_algorithms", device=dev.name, session_id=self.id,
                          algorithms=dev.legacy_algorithms)
        try:
            return await _connect_or_close(asyncssh.connect(dev.host, dev.port, **opts), s.connect_timeout_s + 1)
        except asyncssh.HostKeyNotVerifiable:
            seen = await self._presented_key()
            await b.audit("device.hostkey.mismatch", **self.who.audit_fields(grant=False),
                          pinned=dev.host_key_fingerprint, presented=seen)
            raise HostKeyMismatchError(
                f"{dev.name} presented a host key that does not match the pinned one, so medbroker refused "
                f"to connect (possible impersonation)",
                "tell the hospital's biomedical engineering team; nothing was sent to the device") from None
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else (
                getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__)
            await b.audit("device.unreachable", **self.who.audit_fields(grant=False), error=why)
            raise DeviceUnreachableError(f"{dev.name} is unreachable ({why})",
                                         "try again in a few minutes; if it persists, call the hospital") from None

    async def _presented_key(self) -> str | None:
        try:
            key = await asyncio.wait_for(asyncssh.get_server_host_key(self.device.host, self.device.port), 3)
            return openssh_fingerprint(key.public_data) if key else None
        except (OSError, asyncio.TimeoutError, asyncssh.Error):
            return None

    # ---------------------------------------------------------------- channels
    async def new_channel(self) -> RelaySession:
        """A relayed channel for this session.

        :raises BrokerError: too many channels on this connection
        """
        if len(self.channels) >= self.services.settings.max_channels:
            raise BrokerError(f"at most {self.services.settings.max_channels} channels per connection",
                              "close some sessions on this connection")
        recorder = self.recorder
        assert recorder is not None  # start() opened it before any channel
        self.numbers += 1
        policy = self.services.policy_for(self)
        ctx = ChannelContext(
            number=self.numbers, recorder=recorder, open_upstream=self._open_upstream,
            check_exec=policy.check_exec, rewrite_command=policy.rewrite_command, check_subsystem=policy.check_subsystem, make_filter=policy.make_filter,
            check_shell=policy.check_shell,
            make_scanner=policy.make_scanner, make_exec_handler=policy.make_exec_handler,
            judge_exec=policy.judge_exec, make_line_guard=policy.make_line_guard,
            make_stream_judge=policy.make_stream_judge,
            make_input_guard=policy.make_input_guard, vet_exec=policy.vet_exec,
            on_detection=self._detected, on_closed=self._channel_closed,
            on_refused=self._refused, on_upstream_error=self._upstream_error, on_device_lost=self._device_lost,
            forward_unrecorded=not self.services.settings.strict, session_id=self.id,
        )
        relay = RelaySession(ctx)
        if recorder.paused:
            relay.hold("vendor", "recorder")
            relay.hold("device", "recorder")
        self.channels.add(relay)
        recorder.append_event(self.numbers, "channel-open", {"type": "session"})
        return relay

    async def _open_upstream(self, factory, command, subsystem, env, term_type, term_size, term_modes):
        if self.upconn is None or self.ending:
            raise DeviceUnreachableError("the session is ending")
        kw: dict[str, Any] = dict(encoding=None, env=env)
        if term_type is not None:
            kw.update(term_type=term_type, term_size=term_size, term_modes=term_modes, request_pty="force")
        else:
            kw["request_pty"] = False
        return await self.upconn.create_session(factory, command, subsystem=subsystem, **kw)

    def _upstream_error(self, relay: RelaySession, exc: Exception) -> str:
        reason = _why(exc)
        self.services.audit_soon("session.refused", **self.who.audit_fields(grant=False),
                                 reason=f"device refused the channel: {reason}")
        return f"{self.device.name} refused the channel ({reason}); try again or call the hospital"

    def vendor_lost(self, exc: Exception) -> None:
        """The vendor's connection ended with an error: the session's end says so (unless it was ending already)."""
        if not self.ending and self._end_reason == VENDOR_LEFT:
            self._end_reason = f"the vendor's connection was lost ({_why(exc)})"

    def _device_lost(self, relay: RelaySession, exc: Exception) -> str:
        """The device's connection died under a channel: the vendor is told, and the session's end names the
        device, not the vendor leaving that follows."""
        what = f"the connection to {self.device.name} was lost ({_why(exc)})"
        if not self.ending:
            self._end_reason = what
        return f"{what}; connect again, and call the hospital if it keeps happening"

    def _refused(self, relay: RelaySession, kind: str, message: str) -> None:
        event = "exec.denied" if kind == "exec" else "channel.refused"
        self.services.audit_soon(event, **self.who.audit_fields(), kind=kind, command=relay.command,
                                 subsystem=relay.subsystem, reason=message)

    def _detected(self, relay: RelaySession, what: str) -> None:
        """Patient-data content in an output stream: stop it, end the session, raise an alert."""
        self.services.audit_soon("alert.exfiltration", **self.who.audit_fields(), channel=relay.ctx.number,
                                 content=what, command=relay.command, **self._opaque_detail(what))
        if what == OPAQUE:  # the opaque-output budget (sessions/entropy.py), not a signature
            budget = getattr(self, "opaque_budget", None)
            why = budget.describe() if budget else "too much output that could not be inspected"
            message = (f"the session produced {why}, which the patient-data guard cannot check; the session was "
                       "ended and security staff were alerted")
        else:
            message = (f"output contained {what} patient data, which may not leave the hospital; the session "
                       "was ended and security staff were alerted")
        assert self.recorder is not None  # channels exist only after start() opened it
        self.recorder.append_event(relay.ctx.number, "alert", {"content": what, "action": "session ended",
                                                               "reason": message})
        relay.notice(message)
        relay.exit(1)
        self.services.spawn(self.terminate("stopped", message))

    def _opaque_detail(self, what: str) -> dict[str, Any]:
        budget = getattr(self, "opaque_budget", None)
        if what != OPAQUE or budget is None:
            return {}
        return {"reason": budget.describe(), "opaque_bytes": budget.used, "limit_bytes": budget.limit}

    def _channel_closed(self, relay: RelaySession) -> None:
        self.channels.discard(relay)

    def _recorder_behind(self) -> None:
        """The recording backlog crossed its high-water mark: stop reading both sides until it drains."""
        for relay in list(self.channels):
            relay.hold("vendor", "recorder")
            relay.hold("device", "recorder")

    def _recorder_caught_up(self) -> None:
        """The writer was back under its mark when it scheduled this (``on_resume`` runs on the writer thread and
        reaches the loop later). If the loop has paused it again since, that pause stands and brings its own
        resume: releasing now would let reading run on with the writer paused and no pause to come (an SFTP
        upload of 256 MiB grew the backlog past its 64 MiB limit and failed the recording)."""
        if self.recorder is not None and self.recorder.paused:
            return
        for relay in list(self.channels):
            for side in ("vendor", "device"):
                relay.release(side, "recorder")
                if self.recorder is not None and self.recorder.paused:
                    # Releasing delivered held data (asyncssh hands buffered packets over at once, an SFTP channel
                    # sends its waiting replies) and that paused the writer again: what is not released yet stays
                    # held, and that pause brings its own resume.
                    return

    # ---------------------------------------------------------------- window
    def _schedule_window(self) -> None:
        loop = asyncio.get_running_loop()
        left = (self.grant.ends_at - self.services.app.clock.now()).total_seconds()
        for w in self.services.settings.warnings_s:
            if left - w > 0.5:
                self._timers.append(loop.call_later(left - w, self._warn, w))
        self._timers.append(loop.call_later(max(0.0, left), lambda: self.services.spawn(self._expired())))

    def _zone(self):
        """The display zone for times told to the vendor (UTC is always given too)."""
        try:
            return display_zone(self.services.app.config.display.timezone)
        except ValueError:
            return None

    def _warn(self, seconds_left: int) -> None:
        when = clock_text(self.grant.ends_at, self._zone())
        again = (f"ssh -p {self.services.settings.port} {self.user}@{self.services.settings.public_host} request "
                 f"{self.device.name} --for 1h --reason ...")
        text = (f"your access to {self.device.name} ends in {format_duration(seconds_left)} (at {when}); "
                f"save your work. To continue later, request again: {again}\n{putty_line(again)}")
        for relay in list(self.channels):
            relay.notice(text)
        self.services.audit_soon("session.warning", **self.who.audit_fields(), seconds_left=seconds_left)

    async def _expired(self) -> None:
        again = (f"ssh -p {self.services.settings.port} {self.user}@{self.services.settings.public_host} request "
                 f'{self.device.name} --for 1h --reason "..."')
        await self.terminate(
            "expired", f"your approved window for {self.device.name} ended at "
            f"{clock_text(self.grant.ends_at, self._zone())}, so the session is closed. To continue, request again: "
            f"{again}", event="session.expired", vendor_note=putty_line(again))

    def _recording_failed(self, exc: BaseException) -> None:
        """The writer thread could not write (runs on the loop, via call_soon_threadsafe).

        Strict: every channel stops reading at once (the relays already drop what the recorder refuses), the
        vendor is told why and the channels close now; at most the acknowledgment window of output went out
        unwritten. Best effort: the session goes on unrecorded, with a warning.
        """
        failed_at = getattr(self.recorder, "failed_at", None)
        self.services.audit_soon("recording.failed", **self.who.audit_fields(grant=False),
                                 error=str(exc), failed_at=utc_iso(failed_at) if failed_at else None)
        cause = exc.__cause__
        why = (getattr(cause, "strerror", None) or type(cause).__name__) if cause is not None else "write failed"
        if isinstance(exc, JournalError):  # the database stayed down past [recording] journal_timeout
            message = (f"{UNREACHABLE}; medbroker never runs a session it cannot record, so the session was "
                       "ended. Try again in a few minutes; if it persists, tell the hospital's IT team.")
        else:
            message = (f"recording failed ({why}), and medbroker never runs a session it cannot record; the "
                       "session was ended. Tell the hospital's security team.")
        if self.services.settings.strict:
            for relay in list(self.channels):
                relay.hold("vendor", "recording-failed")
                relay.hold("device", "recording-failed")
            self.services.spawn(self.terminate("recording-failed", message))
        else:
            self._recorder_caught_up()  # the writer dropped its backlog: nothing to wait for any more
            for relay in list(self.channels):
                relay.notice("warning: recording failed; this session continues unrecorded (best-effort mode)")

    # ---------------------------------------------------------------- teardown
    async def terminate(self, status: str, message: str, *, event: str | None = None, vendor_note: str = "",
                        **fields: Any) -> None:
        """End the session now: tell the vendor why (``message``, then ``vendor_note`` on its own line, e.g. the
        PuTTY spelling of a command; the session row keeps ``message`` only), close every channel and the
        connection."""
        if self.ending:
            return
        self.ending = True
        self._end_status, self._end_reason = status, message
        # The vendor is told and cut off first, before any await: the audit row below waits for the store thread.
        for relay in list(self.channels):
            if relay.chan is None:  # the vendor left before asyncssh opened this channel: nothing to tell
                self.channels.discard(relay)
                continue
            try:
                relay.notice(f"{message}\n{vendor_note}" if vendor_note else message)
                relay.exit(1)
            except Exception:  # one broken channel must not keep the others (or the device link) open
                self.log.channel(relay.ctx.number).exception("ending the channel failed")
        asyncio.get_running_loop().call_later(0.5, self._close_vendor)
        if event:
            await self.services.audit(event, **self.who.audit_fields(), **fields)
        await self.finish(status, reason=message)

    async def finish(self, status: str | None = None, *, reason: str | None = None) -> None:
        """Close upstream and the recording, sign it, store the outcome. Idempotent: a second call waits for
        the first one's work. The work runs in its own task, so a caller cancelled half-way (the vendor gone
        while a failed start was being closed, the control loop, shutdown) never leaves the row ``live`` with
        ``finished`` already set: the ghost rows of issue 11."""
        if self._finish_task is None:
            self.finished.set()
            self.ending = True
            self._finish_task = asyncio.ensure_future(self._finish(status, reason))
        await asyncio.shield(self._finish_task)

    async def _finish(self, status: str | None, reason: str | None) -> None:
        status = status if status and self._end_status == "closed" else self._end_status
        reason = reason or self._end_reason
        for t in self._timers:
            t.cancel()
        b = self.services
        b.live.pop(self.id, None)
        if self.upconn is not None:
            self.upconn.close()
            try:
                await asyncio.wait_for(self.upconn.wait_closed(), 5)
            except asyncio.TimeoutError:
                self.upconn.abort()
        final_hash = signature = None
        if self.recorder is not None:
            rec = self.recorder
            try:
                final_hash = await asyncio.get_running_loop().run_in_executor(None, rec.close, status)
                signature = sign_final_hash(b.app.signing_key, final_hash)
                b.app.recordings.sealed(self.recording_key)
            except Exception as exc:  # a failed close is itself evidence; keep going
                self.log.exception("closing the recording failed")
                await b.audit("recording.failed", session_id=self.id, error=str(exc))
        now = utc_iso(b.app.clock.now())
        counters = self._counters()
        await b.db(lambda: b.app.store.update_session(
            self.id, ended_at=now, status=status, end_reason=reason, final_hash=final_hash, signature=signature,
            **counters))
        await b.audit("session.end", **self.who.audit_fields(), status=status, reason=reason, final_hash=final_hash,
                      **counters)
        if final_hash:
            await index_session(b, self.id, self.path)
            b.spawn(drop_journal(b, self.id, grace=JOURNAL_DROP_GRACE_S))

    def counters(self) -> dict[str, Any]:
        """Byte counters so far (``bytes_in``, ``bytes_out``); read them on the event loop, never another thread."""
        return self._counters()

    def _counters(self) -> dict[str, Any]:
        rec = self.recorder
        if rec is None:
            return {}
        return {"bytes_in": getattr(rec, "bytes_in", 0), "bytes_out": getattr(rec, "bytes_out", 0)}

    async def save_counters(self) -> None:
        """Persist byte counters and last activity for ``sessions list`` in other processes."""
        rec = self.recorder
        if rec is None or self.finished.is_set():
            return
        idle_s = max(0.0, (self.services.app.clock.monotonic_ns() - getattr(rec, "last_activity_mono_ns", 0)) / 1e9)
        last = datetime.fromtimestamp(self.services.app.clock.now().timestamp() - idle_s, tz=self.grant.ends_at.tzinfo)
        await self.services.db(lambda: self.services.app.store.update_session(
            self.id, last_activity_at=utc_iso(last), **self._counters()))


async def _connect_or_close(connect, timeout: float) -> asyncssh.SSHClientConnection:
    """Await ``connect`` for at most ``timeout``; when cancelled or timed out, a connection that still
    arrives is closed. (A cancel that lands just as asyncssh's own wait_for finishes is swallowed there and
    the connection returned; a plain nested wait_for then drops it, open, on the floor: the ghost device
    connections of issue 11.)"""
    task = asyncio.ensure_future(connect)
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except BaseException:
        task.cancel()
        task.add_done_callback(_close_late_connection)
        raise


def _close_late_connection(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


async def index_session(broker: SessionServices, session_id: str, path: Path) -> None:
    """Build the command index and search text of a closed recording (off the loop; big ones in a child)."""
    try:
        rows = await build_index_rows(path, broker.app.keys.get)
    except (OSError, BrokerError) as exc:
        log.warning("cannot index %s: %s", session_id, exc)
        return
    now = utc_iso(broker.app.clock.now())
    await broker.db(lambda: broker.app.store.save_session_text(session_id, rows.commands, rows.texts, now))


JOURNAL_DROP_GRACE_S = 5.0
"""Seconds a sealed session's journal rows stay: a live view on another node follows the journal (polling every
0.1 s) and reads the last rows, the end frame among them, before they go."""


async def drop_journal(broker: SessionServices, session_id: str, *, force: bool = False, grace: float = 0.0) -> None:
    """The recording is sealed: its journal rows go, unless ``[recording] journal_keep``, or ``[archive]`` is on
    (then the archive pass drops them once the recording is archived and verified: any node can archive it from
    the journal). Only with ``[recording] journal`` on, or ``force`` (rows a journaling broker left). A
    failure only leaves rows behind (logged), never fails the session. ``grace``: wait that long first (cut
    short when the broker stops), so watchers on other nodes see the session's end."""
    rec = broker.app.config.recording
    if rec.journal_keep or broker.app.config.archive.url or not (rec.journal or force):
        return
    loop = asyncio.get_running_loop()
    until = loop.time() + grace
    while loop.time() < until and not getattr(broker, "stopping", False):
        await asyncio.sleep(min(0.1, max(until - loop.time(), 0.0)))
    try:
        await broker.db(broker.app.store.drop_journal, session_id)
    except BrokerError as exc:
        log.warning("cannot drop the journal rows of %s: %s", session_id, exc)


INTERRUPTED_REASON = "broker stopped unexpectedly; recording sealed"


async def seal_interrupted_sessions(broker: SessionServices) -> None:
    """At startup and when a worker died: this node's live sessions whose broker process is gone are sealed and
    marked incomplete (sessions of other nodes are recovered when those nodes are dead: broker/nodes.py)."""
    app = broker.app
    rows = await broker.db(lambda: app.store.list_sessions(status="live"))
    orphans = []
    for row in rows:
        if row.get("node_id") not in (None, broker.node_id):
            continue  # another node's: a process id means nothing here; its heartbeat decides (broker/nodes.py)
        pid = row["broker_pid"]
        if pid and pid != os.getpid() and process_alive(pid):
            continue  # another worker still serves it
        orphans.append(row)
    await seal_orphaned_sessions(broker, orphans, INTERRUPTED_REASON)


async def seal_orphaned_sessions(broker: SessionServices, rows: list[dict[str, Any]], reason: str,
                                 **fields: Any) -> list[dict[str, Any]]:
    """Seal the recordings of sessions whose broker is gone, mark them incomplete with ``reason``, index them.

    One path for a crashed process of this node and for a dead node (broker/nodes.py). A recording is sealed
    from its file when it is readable here (a torn tail dropped, an ``end`` frame appended), else rebuilt from
    the recording journal when this broker has one; otherwise the session is marked incomplete without a
    final hash. Each is audited ``session.sealed`` (with ``fields``, e.g. the dead node).

    :returns: per session: ``id``, ``final_hash`` (None: nothing could be sealed) and ``sealed_from``
        (``file``, ``journal`` or None)
    """
    app = broker.app
    results = []
    for row in rows:
        key = row["recording"]
        final_hash = signature = path = None
        dropped, source = 0, None
        extra: dict[str, Any] = {}
        try:
            path = app.recordings.local_path(key)
            # File I/O (a whole recording is read) on the default executor: the store thread keeps answering.
            final_hash, dropped = await asyncio.get_running_loop().run_in_executor(None, seal_recording, path)
            source = "file"
        except (OSError, BrokerError) as exc:
            log.warning("cannot seal %s from its file: %s", key, exc)
            if path is not None and not path.exists():
                final_hash, dropped, source, rebuilt = await _seal_from_journal(broker, row["id"], path)
                if source == "journal":
                    extra["rebuilt_from_journal_bytes"] = rebuilt
        if final_hash is not None:
            signature = sign_final_hash(app.signing_key, final_hash)
            app.recordings.sealed(key)
        now = utc_iso(app.clock.now())
        await broker.db(lambda: app.store.update_session(
            row["id"], status="incomplete", ended_at=now, end_reason=reason, final_hash=final_hash,
            signature=signature))
        await broker.audit("session.sealed", user=row["user_name"], device=row["device"], session_id=row["id"],
                           final_hash=final_hash, dropped_bytes=dropped, sealed_from=source, reason=reason, **extra,
                           **fields)
        if final_hash is not None:
            await drop_journal(broker, row["id"], force=True)
        if final_hash is not None and path is not None:
            await index_session(broker, row["id"], path)
        results.append({"id": row["id"], "final_hash": final_hash, "sealed_from": source})
    return results


async def _seal_from_journal(broker: SessionServices, session_id: str,
                             dest: Path) -> tuple[str | None, int, str | None, int]:
    """Rebuild a recording that is not on this machine from the recording journal
    (:func:`broker.journal.rebuild_from_journal`), then seal it: what was acknowledged is sealed. No journal rows:
    ``(None, 0, None, 0)``, the session is marked incomplete without a hash.

    :returns: final hash, dropped bytes, ``"journal"``, bytes rebuilt
    """
    store = broker.app.store
    try:
        if not await broker.db(store.has_journal, session_id):
            return None, 0, None, 0
        loop = asyncio.get_running_loop()
        # File I/O on the default executor: the store thread keeps answering (the store is safe across threads).
        size = await loop.run_in_executor(None, rebuild_from_journal, store, session_id, dest)
        log.warning("rebuilt %s from the recording journal (%d bytes)", dest, size)
        final_hash, dropped = await loop.run_in_executor(None, seal_recording, dest)
        return final_hash, dropped, "journal", size
    except (OSError, BrokerError) as exc:
        log.warning("cannot rebuild %s from the journal: %s", session_id, exc)
        return None, 0, None, 0


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a pid names a process only here)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
