"""The vendor-facing SSH server: asyncssh callbacks → identity/grant decisions → recorded relay.

One ``BrokerServer`` per vendor connection (asyncssh creates it). One ``LiveSession`` per vendor
connection that opens channels to a device: one upstream connection, one recording, one grant
window with its warnings. ``Broker`` holds what the whole process shares.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from typing import Any, Awaitable, Callable, Sequence

import asyncssh

from broker.app import App, default_policy_file
from broker.archive import archive_pass
from broker.audit import write_checkpoint
from broker.clock import display_zone, parse_utc, utc_iso
from broker.config import format_duration, parse_duration
from broker.directory import refresh_for_login, run_directory_sync
from broker.devices import Device, device_credential, get_device
from broker.errors import ApprovalRequiredError, BrokerError, NotFoundError, PermissionDeniedError, UsageError
from broker.grants import (Grant, ended_grant_refusal, expire_requests, find_active_grant, putty_line,
                           request_hint, unknown_device_refusal)
from broker.identity import Principal, authenticate_key, parse_login, standing_refusal
from broker.keys import openssh_fingerprint
from broker.lockout import LockoutPolicy, clear_failures, lockout_left, record_failure
from broker.mfa import mfa_hook_status
from broker.totp import check_code
from broker.selfservice import run_command
from broker.startups import Admission, StartupGate, StartupPolicy
from broker.store.notify import StopListener
from broker.channels import SessionPolicy
from broker.cluster import node_id_of
from broker.live import LiveSession, seal_interrupted_sessions
from broker.nodes import Node
from broker.live_forwards import open_forward
from broker.session_context import SessionIdentity, SessionSettings, VendorLogin
from sessions.policy import load_protected_paths
from sessions.relay import OneShotSession, RefusalSession
from sessions.chanreq import AGENT, X11, watch_refused_requests
from sessions.tasks import watch

__all__ = ["Broker", "BrokerServer", "JumpOpener", "VENDOR_ALGORITHMS", "listen_options"]

log = logging.getLogger("medbroker.server")

# Opens a ProxyJump channel for a self-service login: (outer server, host, port) -> the channel session.
JumpOpener = Callable[["BrokerServer", str, int], Awaitable[asyncssh.SSHTCPSession]]

# Vendor side: AEAD ciphers only, modern kex with the post-quantum hybrid first, no SHA-1, no
# compression (asyncssh-notes §1.7 and §3.2: AES-GCM is ~2.6x faster than chacha20 in asyncssh).
VENDOR_ALGORITHMS: dict[str, list[str]] = {
    "kex_algs": ["mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org"],
    "encryption_algs": ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"],
    "mac_algs": ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"],
    "compression_algs": ["none"],
    "signature_algs": ["ssh-ed25519", "sk-ssh-ed25519@openssh.com", "ecdsa-sha2-nistp256",
                       "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "sk-ecdsa-sha2-nistp256@openssh.com",
                       "rsa-sha2-512", "rsa-sha2-256"],
}
MAX_KEY_TRIES = 6  # distinct keys per connection (OpenSSH's MaxAuthTries default)
EXPIRY_S = 30.0  # between sweeps for expired pending requests (a cluster-wide duty)
MAX_CODE_TRIES = 3  # verification codes per connection (each wrong one also counts toward the lockout)
CODE_PROMPT = "Verification code: "
STOP_POLL_S = 0.25  # how often the control loop looks for sessions to end: revoke/kill/disable reach them in < 1 s
RECENT_TICKS = 60  # control-loop ticks between refreshes of recently successful addresses (other workers' logins)
CHECKPOINT_S = 300.0  # a signed audit checkpoint at start, then every 5 minutes (a cluster-wide duty)
# What a vendor reads when asking for agent or X11 forwarding on a session channel (sessions/chanreq.py).
REFUSED_REQUESTS = {
    AGENT: "agent forwarding (ssh -A) is not available through medbroker: the device must never reach your "
           "keys, and medbroker logs in to it with its own credential; connect without -A (ForwardAgent no; "
           "PuTTY: Connection > SSH > Auth, untick 'Allow agent forwarding')",
    X11: "X11 forwarding (ssh -X/-Y) is not available through medbroker: windows from the device would leave "
         "unrecorded; connect without -X (ForwardX11 no; PuTTY: Connection > SSH > X11, untick 'Enable X11 "
         "forwarding') and copy files with scp or sftp",
}
REFUSAL_GRACE_S = 3.0  # an over-cap connection gets this long to reach user auth and read why it is refused


class Broker:
    """Process-wide state: the app, live sessions, connection counters, the control loop.

    ``worker`` is this process's index under a supervisor (``listen.workers > 1``, broker/workers.py), or None
    for a broker that runs alone. Only a broker that is not a worker has ``duties``: it is its node in the
    cluster (``node``, broker/nodes.py: joined by ``join_cluster``) and runs the cluster-wide periodic work
    (signed audit checkpoints, expiring pending requests, directory sync) under leases, so that exactly one
    node of the cluster does each.
    """

    def __init__(self, app: App, *, open_jump: JumpOpener, port: int = 2222, worker: int | None = None) -> None:
        self.app = app
        self.open_jump = open_jump  # ProxyJump: broker/jump.py's open_jump, handed in (jump.py builds on this module)
        self.port = port
        self.worker = worker
        self.duties = worker is None
        self.live: dict[str, LiveSession] = {}
        self.unauthenticated = 0
        self.per_address: dict[str, int] = {}
        self.limit_audited: dict[str, float] = {}  # source -> loop time of its last audited cap refusal
        self.gate = StartupGate(StartupPolicy.from_config(app.config))  # pre-auth slots (finding 9)
        self.pid = os.getpid()
        self.node_id = node_id_of(app.config)  # sessions rows carry it; workers get their supervisor's
        self.node: Node | None = None  # set by join_cluster (the process with duties)
        self._control: asyncio.Task | None = None
        self._wake = asyncio.Event()  # set by the PostgreSQL listener: look for sessions to end now
        self.listener: StopListener | None = None  # [store] url on PostgreSQL: LISTEN for session-ending writes
        self.tasks: set[asyncio.Task] = set()
        self.starting: set[asyncio.Task] = set()  # LiveSession.start() still connecting; stop_server cancels them
        self.starting_sessions: dict[str, tuple[LiveSession, asyncio.Future]] = {}  # the same, by session id
        self.stopping = False  # set by stop_server: no new device session starts after it
        self.refusing: set[asyncio.Future] = set()  # refusal channels not yet shown; stop_server lets them show
        self.archiving = False  # an archive pass is running in this process ([archive]; one at a time)
        self.connections: set[asyncssh.SSHServerConnection] = set()
        cfg = app.config
        policy_file = cfg.path(cfg.policy.protected_paths_file) if cfg.policy.protected_paths_file \
            else default_policy_file()
        self.default_protected = tuple(load_protected_paths(policy_file))
        self.settings = SessionSettings(
            recordings_dir=cfg.recordings_dir,
            strict=cfg.recording.mode == "strict",
            encrypt=cfg.recording.encrypt,
            warnings_s=tuple(parse_duration(w) for w in cfg.grants.warnings),
            connect_timeout_s=cfg.seconds("upstream", "connect_timeout"),
            keepalive_s=cfg.seconds("upstream", "keepalive_interval"),
            max_channels=cfg.limits.max_channels_per_connection,
            public_host=cfg.listen.public_host,
            port=port,
        )

    # ---------------------------------------------------------------- store access
    async def db(self, fn, *args):
        """Run a synchronous domain call on the store thread."""
        return await self.app.store.run(fn, *args)

    async def audit(self, event: str, **fields: Any) -> None:
        """Append an audit row off the event loop."""
        await self.db(lambda: self.app.audit.record(event, **fields))

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` in the background; ``stop_server`` waits for every such task; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return watch(task, log, f"background task {getattr(coro, '__qualname__', coro)!s}")

    def audit_soon(self, event: str, **fields: Any) -> None:
        """Fire-and-forget audit from a synchronous callback (ordering kept by the single store thread)."""
        self.spawn(self.audit(event, **fields))

    # ---------------------------------------------------------------- control loop
    async def join_cluster(self, address: str) -> Node:
        """Join the cluster as this broker's node and hand it the cluster-wide duties (the process with duties).

        :raises BrokerError: another live process serves under this node id
        """
        node = Node(self, node_id=self.node_id, address=address, pid=self.pid)
        node.add_duty("audit.checkpoint", CHECKPOINT_S, self.write_checkpoint)
        node.add_duty("requests.expire", EXPIRY_S, lambda: self.db(
            lambda: expire_requests(self.app.store, self.app.audit, self.app.clock.now())))
        if self.app.config.directory.url:  # [directory]: re-read every directory user
            node.add_duty("directory.sync", self.app.config.seconds("directory", "sync_interval"),
                          lambda: run_directory_sync(self.app, self.db))
        if self.app.config.archive.url:  # [archive]: sealed recordings to the object store, by one node a period
            node.add_duty("archive", self.app.config.seconds("archive", "interval"), self.run_archive)
        await node.join()
        self.node = node
        return node

    async def leave_cluster(self) -> None:
        """A clean shutdown: this node is stopped, its leases released."""
        if self.node is not None:
            await self.node.leave()

    def start_control(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._control = loop.create_task(self._control_loop())
        serves = self.worker is not None or self.app.config.listen.workers <= 1  # a supervisor serves no session
        if serves and self.app.store.dialect == "postgresql" and self.app.config.store.url:
            self.listener = StopListener(
                self.app.config.store.url, lambda: loop.call_soon_threadsafe(self._wake.set),
                name=f"medbroker-listen {self.node_id}",
                on_reconnect=lambda d: loop.call_soon_threadsafe(
                    lambda: self.audit_soon("cluster.listener.reconnected", node=self.node_id, pid=self.pid, **d)))
            self.listener.start()

    async def stop_control(self) -> None:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            await asyncio.to_thread(listener.stop)
        if self._control:
            self._control.cancel()
            try:
                await self._control
            except asyncio.CancelledError:
                pass

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less when the listener says a session-ending write was committed; True then."""
        if self.listener is None:
            await asyncio.sleep(seconds)
            return False
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        self._wake.clear()
        return True

    async def _control_loop(self) -> None:
        """Every 0.25 s: end this process's sessions that were killed, revoked or withdrawn (from any process or
        node), and let the node (the process with duties) heartbeat and run the cluster-wide duties that are due.
        On PostgreSQL the listener also wakes it at once when such a write is committed (a look for sessions to
        end only; the ticks keep their 0.25 s rhythm)."""
        loop = asyncio.get_running_loop()
        tick = beat = 0
        due = loop.time() + STOP_POLL_S
        while True:
            woken = await self._pause(max(0.0, due - loop.time()))
            new_tick = False
            if not woken:
                due = loop.time() + STOP_POLL_S
                beat += 1
                new_tick = beat % 2 == 0
                if self.node is not None:
                    self.node.tick()  # heartbeat, dead nodes, duties under leases: each in its own task
            if new_tick:
                tick += 1
                if tick % RECENT_TICKS == 0:
                    self.spawn(self.refresh_recent())
                if self.connections:
                    self.spawn(self._close_withdrawn())
            elif woken and self.connections:
                self.spawn(self._close_withdrawn())  # a login withdrawn: connections without a session too
            if not self.live and not self.starting_sessions:
                continue
            try:
                rows = await self.db(self.app.store.sessions_to_stop, self.pid, utc_iso(self.app.clock.now()),
                                     self.node_id)
                for row in rows:
                    if row["id"] in self.starting_sessions:  # still connecting to the device: never starts
                        self._abort_start(row)
                        continue
                    live = self.live.get(row["id"])
                    if live is None or live.ending:
                        continue
                    # Each in its own task: one slow or broken session never delays another's end.
                    self.spawn(self._stop_session(live, row))
                if new_tick and tick % 10 == 0:
                    for live in list(self.live.values()):
                        await live.save_counters()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive a transient DB error
                log.exception("control loop iteration failed")

    async def _close_withdrawn(self) -> None:
        """Authenticated connections without a device session whose login no longer stands (user disabled, key
        removed, role changed) are closed with the reason; sessions are ended by ``sessions_to_stop``."""
        owners = [c.get_owner() for c in list(self.connections)]
        servers = [(s, s.vendor) for s in owners if isinstance(s, BrokerServer) and s.authenticated and not s.gone
                   and s.live is None and s._starting is None and s.vendor is not None]
        if not servers:
            return
        logins = {(v.user, v.key, v.role) for _, v in servers}
        try:
            verdicts = await self.db(lambda: {t: standing_refusal(self.app.store, *t) for t in logins})
        except Exception:  # the next tick tries again
            log.exception("checking open connections failed")
            return
        for s, v in servers:
            why = verdicts.get((v.user, v.key, v.role))
            if why and not s.gone and s.live is None:
                self.audit_soon("connection.closed", **v.audit_fields(), reason=why)
                s.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"medbroker: {why}; this connection was closed")

    def _abort_start(self, row: dict[str, Any]) -> None:
        """A session killed, revoked or withdrawn while it still connects to its device: cancel the start
        (LiveSession.start closes the row with this status and reason; the vendor is refused with it)."""
        live, start = self.starting_sessions.pop(row["id"])
        status, message, kw = stop_decision(row, live.device.name)
        live.abort_reason = (status, message)
        start.cancel()
        event = kw.pop("event", None)
        if event:
            self.audit_soon(event, **live.who.audit_fields(), **kw)

    async def _stop_session(self, live: LiveSession, row: dict[str, Any]) -> None:
        """End one live session for the reason ``row`` (from ``Store.sessions_to_stop``) gives."""
        try:
            status, message, kw = stop_decision(row, live.device.name)
            await live.terminate(status, message, **kw)
        except asyncio.CancelledError:
            raise
        except Exception:  # logged with the session id; the others are ended by their own tasks
            log.exception("ending session %s failed", live.id)
            try:
                await live.finish("failed", reason="ending the session failed; see the broker log")
            except Exception:
                log.exception("finishing session %s failed", live.id)

    async def refresh_recent(self) -> None:
        """Learn the addresses that logged in recently through any process (workers share the database)."""
        try:
            now_utc, now = self.app.clock.now(), asyncio.get_running_loop().time()
            window = self.gate.policy.recent_s
            since = utc_iso(datetime.fromtimestamp(now_utc.timestamp() - window, tz=now_utc.tzinfo))
            rows = await self.db(self.app.store.recent_login_sources, since)
            for row in rows:
                at = now - (now_utc - parse_utc(row["at"])).total_seconds()
                if at > self.gate.recent.get(row["source"], float("-inf")):
                    self.gate.recent[row["source"]] = at
        except Exception:
            log.exception("reading recent logins failed")

    async def write_checkpoint(self) -> None:
        """Sign the audit chain's head (broker/audit.py); a failure is logged, the next period tries again."""
        try:
            await self.db(lambda: write_checkpoint(self.app.audit, self.app.signing_key))
        except Exception:
            log.exception("writing the audit checkpoint failed")

    async def run_archive(self) -> None:
        """One archive pass (broker/archive.py) on a thread of its own (uploads take long; the store thread and
        the loop stay free); it stops between parts once the broker is stopping, and the next start resumes."""
        if self.archiving:  # the previous pass is still uploading (a pass may outlast the interval)
            return
        self.archiving = True
        try:
            await asyncio.to_thread(archive_pass, self.app, source="serve", should_stop=lambda: self.stopping)
        except Exception:  # logged; the next interval tries again
            log.exception("archive pass failed")
        finally:
            self.archiving = False

    def policy_for(self, live: LiveSession) -> SessionPolicy:
        """The data-protection policy for one live session's channels."""
        return SessionPolicy(self, live)

    async def seal_interrupted(self) -> None:
        """Seal recordings left 'live' by a crashed broker process (verify prefix, mark incomplete)."""
        await seal_interrupted_sessions(self)


def stop_decision(row: dict[str, Any], device: str) -> tuple[str, str, dict[str, Any]]:
    """``(status, message for the vendor, terminate keywords: audit event and fields)`` for a row of
    ``Store.sessions_to_stop``."""
    if row["kill_requested_at"]:
        reason = row["kill_reason"] or "no reason given"
        return ("killed", f"security staff ended this session: {reason}",
                dict(event="session.killed", by=row["kill_requested_by"], reason=reason))
    if row["revoked_at"]:
        why = row["revoke_reason"] or "no reason given"
        return ("revoked", f"your access to {device} was revoked by {row['revoked_by']}: {why}. "
                "Ask the hospital before reconnecting.", {})
    user = row["user_name"]
    if row["user_disabled"]:
        cause, text = "user.disabled", f"the account {user} was disabled by the hospital's medbroker administrators"
    elif row["key_gone"]:
        cause, text = "user.key.removed", f"the SSH key this session logged in with ({row['auth_key']}) was removed"
    elif row["device_gone"]:
        cause, text = "device.removed", f"{device} was removed from medbroker"
    else:
        cause, text = "user.role.changed", f"the role of {user} changed from {row['user_role']} to {row['role_now']}"
    return ("stopped", f"{text}, so this session was ended. Ask the hospital's medbroker administrators.",
            dict(event="session.stopped", cause=cause))


class BrokerServer(asyncssh.SSHServer):
    """asyncssh adapter for one vendor connection: thin callbacks, decisions in the domain layer.

    Authentication ends in a :class:`VendorLogin` (``self.vendor``); from there on, who is connected travels
    down as that value (into the ``SessionIdentity`` of a device session), never read back from this object.
    """

    via: str | None = None  # how the vendor came: "proxyjump" for the inner login of ssh -J (broker/jump.py)
    jumps: set | None = None  # this connection's open ProxyJump channels, made on the first (broker/jump.py)

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # set by connection_made, which asyncssh calls before any other callback of this object
        self.conn: asyncssh.SSHServerConnection = None  # type: ignore[assignment]
        self.source = "?"
        self.login: str | None = None
        self.user: str | None = None
        self.device_name: str | None = None
        self.login_error: str | None = None
        self.principal: Principal | None = None
        self.fingerprint: str | None = None
        self.vendor: VendorLogin | None = None  # who logged in: set once authentication completes
        self.tried_keys: set[str] = set()
        self.refreshed = False  # the directory was asked about this user on this connection
        self.key_verified = False  # asyncssh checked the signature (set by the MFA hook, broker/mfa.py)
        self.code_ok = False
        self.code_tries = 0
        self.not_counted = False  # this connection's failure is already counted, or was no failure
        self.refusal: str | None = None  # over a connection cap: said at user auth, then disconnected
        self._refusal_timer: asyncio.TimerHandle | None = None
        self.authenticated = False
        self.counted_unauth = False
        self.gated = False  # holds one of the gate's per-address pre-auth slots (an address without a recent login)
        self.dropped = False  # refused by the gate at connect: nothing more is counted for it
        self.connected_at = 0.0
        self.live: LiveSession | None = None
        self.live_lock = asyncio.Lock()
        self.gone = False  # connection_lost ran: nothing may start for this connection any more
        self._starting: tuple[LiveSession, asyncio.Future] | None = None  # a device session being set up
        self.pending_notices: list[str] = []  # refusals of global requests (ssh -R), told on the next channel

    # ---------------------------------------------------------------- connection
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.broker.connections.add(conn)
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.source = f"{peer[0]}"
        b, limits = self.broker, self.broker.app.config.limits
        b.per_address[self.source] = b.per_address.get(self.source, 0) + 1
        b.unauthenticated += 1
        self.counted_unauth = True
        self.connected_at = now = asyncio.get_running_loop().time()
        over = max(b.unauthenticated / limits.max_unauthenticated if limits.max_unauthenticated else 3.0,
                   b.per_address[self.source] / limits.max_connections_per_address
                   if limits.max_connections_per_address else 3.0)
        if over <= 1:
            if not b.gate.is_recent(self.source, now):  # recent addresses: only the two caps apply
                verdict = b.gate.admit(self.source, b.unauthenticated, now)
                if verdict.reason:
                    self._drop(verdict)
                    return
                b.gate.started(self.source)
                self.gated = True
            return
        loop = asyncio.get_running_loop()
        per_address = b.per_address[self.source] > limits.max_connections_per_address
        # A flood must not flood the audit log: one row a second per address, one for the broker-wide cap.
        audit_key = self.source if per_address else "*"
        if loop.time() - b.limit_audited.get(audit_key, -60.0) >= 1.0:
            if len(b.limit_audited) > 1024:  # many addresses: forget the old ones (the cost is an extra row)
                b.limit_audited.clear()
            b.limit_audited[audit_key] = loop.time()
            b.audit_soon("auth.failure", source=self.source, reason="connection limit reached",
                         connections_from_source=b.per_address[self.source], unauthenticated=b.unauthenticated)
        if over > 2:  # far over: drop at once, no key exchange spent on it
            conn.abort()
            return
        # Slightly over: a DISCONNECT sent now would arrive before the version line (OpenSSH shows "banner line
        # contains invalid characters"), so refuse with a readable reason at user auth, or drop after a grace.
        if per_address:
            self.refusal = (f"too many connections from {self.source}; close some (or share one with "
                            "ssh -o ControlMaster=auto) and try again in a minute")
        else:
            self.refusal = "the broker has too many logins in progress; try again in a minute"
        self._refusal_timer = loop.call_later(REFUSAL_GRACE_S, conn.abort)

    def _drop(self, verdict: Admission) -> None:
        """Refused by the gate: closed at once, before any key exchange (OpenSSH drops these too)."""
        b = self.broker
        self.dropped = self.not_counted = True
        self._leave_unauth()
        loop = asyncio.get_running_loop()
        key = f"gate:{self.source}"  # one row a second per address, however fast it reconnects
        if loop.time() - b.limit_audited.get(key, -60.0) >= 1.0:
            if len(b.limit_audited) > 1024:
                b.limit_audited.clear()
            b.limit_audited[key] = loop.time()
            extra = {"penalty_left_s": round(verdict.penalty_left)} if verdict.penalty_left else {}
            b.audit_soon("auth.failure", source=self.source, reason=verdict.reason,
                         unauthenticated=b.unauthenticated, **extra)
        self.conn.abort()

    def _penalise(self, kind: str) -> None:
        """OpenSSH PerSourcePenalties: audited once, when the address becomes refused."""
        b = self.broker
        seconds = b.gate.penalise(self.source, kind, asyncio.get_running_loop().time())
        if seconds:
            b.audit_soon("auth.penalty", source=self.source, penalty_s=round(seconds), reason=kind,
                         user=self.user)

    def connection_lost(self, exc: Exception | None) -> None:
        b = self.broker
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
        if not self.authenticated and not self.dropped and self.refusal is None:
            timeout = b.app.config.seconds("listen", "login_timeout")
            if asyncio.get_running_loop().time() - self.connected_at >= timeout - 0.5:
                self._penalise("grace")  # held a pre-auth slot until the login timeout
        b.connections.discard(self.conn)
        b.per_address[self.source] = b.per_address.get(self.source, 1) - 1
        if b.per_address[self.source] <= 0:
            b.per_address.pop(self.source, None)
        self._leave_unauth()
        if isinstance(exc, asyncssh.IllegalUserName) and not self.authenticated:  # NUL/CR/LF/ESC, ≥1024 bytes:
            # asyncssh refuses these names before begin_auth, so the name itself is not known (issue 11)
            b.audit_soon("auth.failure", source=self.source, reason="malformed login name", login=None,
                         error=f"refused by the SSH layer: {str(exc.reason)[:80]}")
        self.gone = True
        if self._starting is not None:  # still connecting to the device: stop, close the row and device link
            live, start = self._starting
            live.abort_reason = ("closed", "the vendor disconnected while medbroker was connecting to the device")
            start.cancel()
        if not self.authenticated and self.user and self.tried_keys and not self.not_counted:
            if self.key_verified:  # right key, no code typed (Ctrl-C at the prompt, BatchMode): no guess made
                b.audit_soon("auth.failure", user=self.user, source=self.source, method="keyboard-interactive",
                             reason="no verification code entered")
            else:
                b.spawn(self._count_failure("no accepted key", method="publickey", keys=len(self.tried_keys)))
        if self.live is not None:
            if exc is not None:  # not a goodbye: a reset, or no answer to keepalives (listen.keepalive_interval)
                self.live.vendor_lost(exc)
            b.spawn(self.live.finish("closed"))

    def _leave_unauth(self) -> None:
        if self.counted_unauth:
            self.counted_unauth = False
            self.broker.unauthenticated -= 1
        if self.gated:
            self.gated = False
            self.broker.gate.ended(self.source)

    # ---------------------------------------------------------------- authentication
    # Key, then (for users with TOTP enrolled) a code: asyncssh cannot send partial success itself, so
    # broker/mfa.py's hook asks second_factor_needed() once the key's signature is verified. docs/mfa.md.
    def begin_auth(self, username: str) -> bool:
        # asyncssh calls this again when the client switches user names mid-way: start over.
        self.principal, self.fingerprint, self.user, self.device_name = None, None, None, None
        self.refreshed = False
        self.key_verified = self.code_ok = False
        self.login = username
        if self.refusal:
            self.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, self.refusal)
            return True
        try:
            target = parse_login(username)
            self.user, self.device_name = target.user, target.device
        except UsageError as exc:
            # Say what is wrong with the name itself; it reveals nothing about users or devices.
            self.login_error = exc.message
            self.user = None
            example = f"ssh -p {self.broker.port} alice@ct-01@{self.broker.settings.public_host}"
            self.conn.send_auth_banner(f"medbroker: {exc.message}; log in as USER@DEVICE, e.g. {example}\n"
                                       f"{putty_line(example)}\n")
            self.broker.audit_soon("auth.failure", source=self.source, reason="malformed login name",
                                   login=ascii(username[:80])[1:-1], login_length=len(username))
        return True

    def public_key_auth_supported(self) -> bool:
        return not self.key_verified

    def _lockout_policy(self) -> LockoutPolicy:
        return LockoutPolicy.from_config(self.broker.app.config)

    async def _refuse_if_locked(self) -> bool:
        """Disconnect with the time left when (user, source) is locked; the attempt is not a failure."""
        b = self.broker
        locked = await b.db(lockout_left, b.app.store, self.user, self.source, b.app.clock.now(),
                            self._lockout_policy())
        if not locked:
            return False
        self.not_counted = True
        await b.audit("auth.failure", user=self.user, source=self.source, reason="locked out", remaining_s=locked)
        self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                             f"too many failed logins for {self.user} from {self.source}; "
                             f"try again in {format_duration(locked)}")
        return True

    async def _count_failure(self, reason: str, **fields: Any) -> int:
        """Audit a failed attempt and count it; audits ``auth.lockout`` when it starts one (returns its length)."""
        b = self.broker
        await b.audit("auth.failure", user=self.user, source=self.source, reason=reason, **fields)
        self._penalise("authfail")
        policy = self._lockout_policy()
        started = await b.db(record_failure, b.app.store, self.user, self.source, b.app.clock.now(), policy)
        if started:
            await b.audit("auth.lockout", user=self.user, source=self.source, lockout_s=started,
                          max_failures=policy.max_failures, window_s=policy.window_s)
        return started

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        b = self.broker
        if self.user is None or self.key_verified:
            return False
        fingerprint = openssh_fingerprint(key.public_data)
        self.tried_keys.add(fingerprint)  # asyncssh asks twice per key (query, then signed): count keys
        if len(self.tried_keys) > MAX_KEY_TRIES:
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 f"too many keys offered (at most {MAX_KEY_TRIES}); "
                                 "choose the key with ssh -i FILE -o IdentitiesOnly=yes")
            return False
        if await self._refuse_if_locked():
            return False
        if b.app.config.directory.url and not self.refreshed:
            self.refreshed = True  # directory users: keys, role and state as the directory says now (once)
            await refresh_for_login(b.app, b.db, self.user)
        try:
            principal = await b.db(authenticate_key, b.app.store, self.user, fingerprint)
        except PermissionDeniedError:
            return False
        if principal.totp_enrolled and not mfa_hook_status().active:
            # Fail closed: without the hook a key alone would let this user in.
            self.not_counted = True
            await b.audit("auth.failure", user=self.user, source=self.source, key=fingerprint,
                          reason=f"second factor unavailable: {mfa_hook_status().reason}")
            self.conn.send_auth_banner("medbroker: your account needs a verification code, and this broker "
                                       "cannot ask for one right now; tell the hospital's medbroker administrators\n")
            return False
        self.principal, self.fingerprint = principal, fingerprint
        return True

    def second_factor_needed(self) -> bool:
        """Called by the MFA hook after asyncssh verified the key's signature: True = ask for a code next."""
        self.key_verified = True
        return bool(self.principal and self.principal.totp_enrolled and not self.code_ok)

    def kbdint_auth_supported(self) -> bool:
        return (self.key_verified and self.principal is not None and self.principal.totp_enrolled
                and not self.code_ok and self.code_tries < MAX_CODE_TRIES)

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str):
        if not self.kbdint_auth_supported():
            return False
        return "", "", "", [(CODE_PROMPT, False)]

    async def validate_kbdint_response(self, username: str, responses: Sequence[str]):
        b = self.broker
        if not self.kbdint_auth_supported():
            return False
        self.code_tries += 1
        if await self._refuse_if_locked():  # another connection may have locked the pair meanwhile
            return False
        answer = responses[0] if len(responses) == 1 else None
        try:
            result = await b.db(check_code, b.app.store, b.app.keys, self.user, answer, b.app.clock.now())
        except BrokerError as exc:  # the sealed secret does not decrypt: refuse, never fall back to key only
            self.not_counted = True
            log.error("TOTP check for %s failed: %s", self.user, exc.message)
            await b.audit("auth.failure", user=self.user, source=self.source, method="keyboard-interactive",
                          reason="TOTP secret unreadable", error=exc.message)
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 "medbroker cannot check verification codes right now; "
                                 "tell the hospital's medbroker administrators")
            return False
        if result.ok:
            self.code_ok = True
            return True
        self.not_counted = True  # each wrong code is counted here, not again when the connection ends
        started = await self._count_failure(f"{result.reason} verification code", method="keyboard-interactive",
                                            attempt=self.code_tries)
        if started:
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 f"too many failed logins for {self.user} from {self.source}; "
                                 f"try again in {format_duration(started)}")
            return False
        left = MAX_CODE_TRIES - self.code_tries
        if left <= 0:
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 "wrong or already used verification code; wait for the next code in your "
                                 "authenticator app, then connect again")
            return False
        return ("", f"medbroker: wrong or already used code; enter the next code from your authenticator app "
                f"({left} {'try' if left == 1 else 'tries'} left)", "", [(CODE_PROMPT, False)])

    async def auth_completed(self) -> None:
        # Checked before the first await: channel requests can arrive as soon as asyncssh sent success.
        if self.principal is None or (self.principal.totp_enrolled and not self.code_ok):
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "authentication incomplete")
            self.not_counted = True
            self.broker.audit_soon("auth.failure", user=self.user, source=self.source,
                                   reason="second factor missing at completion (MFA hook inactive?)")
            return
        self.authenticated = True
        assert self.user is not None  # begin_auth set it before any credential was checked
        self.vendor = VendorLogin(user=self.user, role=self.principal.role, key=self.fingerprint, source=self.source,
                                  device=self.device_name, via=self.via)
        self._leave_unauth()
        b = self.broker
        b.gate.logged_in(self.source, asyncio.get_running_loop().time())
        b.spawn(b.db(clear_failures, b.app.store, self.user, self.source))
        await b.audit("auth.success", user=self.user, device=self.device_name, source=self.source,
                      method="publickey+totp" if self.code_ok else "publickey", key=self.fingerprint)

    # ---------------------------------------------------------------- channels
    def session_requested(self):
        # Our own channel object (asyncssh takes a (channel, session) pair, the session here still to be
        # awaited), so agent (ssh -A) and X11 (ssh -X) requests on it are told and audited (sessions/chanreq.py).
        chan = watch_refused_requests(self.conn.create_server_channel(), self._request_refused)
        return chan, self._opened(chan)

    async def _opened(self, chan: asyncssh.SSHServerChannel) -> asyncssh.SSHServerSession:
        session = await self._session_for_channel()
        if self.pending_notices:  # refused remote forwards: told once asyncssh confirmed the open (same step)
            asyncio.get_running_loop().call_soon(self._tell_pending, chan)
        return session

    def _request_refused(self, chan: asyncssh.SSHServerChannel, kind: str) -> None:
        """``ssh -A`` / ``ssh -X`` on a session channel: refused as before, now said and audited."""
        text = REFUSED_REQUESTS[kind]
        self._refuse_channel(kind, "session channel", reason=text)
        self._tell(chan, text)

    def _tell_pending(self, chan: asyncssh.SSHServerChannel) -> None:
        notices, self.pending_notices = self.pending_notices, []
        for text in notices:
            self._tell(chan, text)

    @staticmethod
    def _tell(chan: asyncssh.SSHServerChannel, text: str) -> None:
        try:
            chan.write_stderr(f"medbroker: {text}\r\n".encode())
        except (OSError, asyncssh.Error):  # the channel closed meanwhile: the audit row still says it
            pass

    async def _session_for_channel(self) -> asyncssh.SSHServerSession:
        b = self.broker
        # Every channel asks again whether this login still stands: disabling the user, removing the key
        # or changing the role refuses new channels on connections that are already open (ControlMaster).
        who = self.vendor
        assert who is not None  # channels open only after authentication, which sets it
        refusal = await b.db(standing_refusal, b.app.store, who.user, who.key, who.role)
        if refusal:
            await b.audit("channel.refused", **who.audit_fields(), kind="session", reason=refusal,
                          session_id=self.live.id if self.live else None)
            return self._refusal(f"{refusal}; new channels on this connection are refused. "
                                 "Ask the hospital's medbroker administrators.")
        if who.device is None:
            return SelfServiceSession(self)
        try:
            return await (await self._ensure_live()).new_channel()
        except BrokerError as exc:
            return self._refusal(exc.message + (f"; {exc.hint}" if exc.hint else ""))

    def _refusal(self, text: str) -> RefusalSession:
        """A channel that shows ``text``, counted in ``broker.refusing`` until it is shown or closed: the client
        still has to ask for its shell or command, and a stopping broker waits for that before it disconnects."""
        b = self.broker
        shown: asyncio.Future = asyncio.get_running_loop().create_future()
        b.refusing.add(shown)

        def done() -> None:
            if not shown.done():
                shown.set_result(None)
            b.refusing.discard(shown)

        return RefusalSession(text, on_shown=done, on_closed=done)

    async def _ensure_live(self) -> LiveSession:
        """This connection's device session, started now if there is none (or it is ending).

        :raises BrokerError: no grant, unknown device, recording or device unavailable (the reason says which)
        """
        async with self.live_lock:
            if self.live is None or self.live.ending:
                self.live = await self._start_live()
            return self.live

    async def _start_live(self) -> LiveSession:
        """Decide and set up a device session: grant, device, recording, upstream."""
        b = self.broker
        now = b.app.clock.now()
        login = self.vendor
        assert login is not None and login.device is not None  # a device login, authenticated
        user, device_name = login.user, login.device
        hint = request_hint(user, device_name, b.settings.public_host, b.port)
        try:
            device: Device = await b.db(get_device, b.app.store, device_name)
            grant: Grant = await b.db(lambda: find_active_grant(b.app.store, user, device_name, now, hint=hint))
        except NotFoundError:
            await b.audit("session.refused", **login.audit_fields(), reason="unknown device")
            # A vendor with no grant history gets the "no grant" wording (learns nothing about the inventory);
            # one with history hears the device is unknown and which of their own devices exist.
            raise await b.db(unknown_device_refusal, b.app.store, user, device_name, hint) from None
        except ApprovalRequiredError:
            await b.audit("session.refused", **login.audit_fields(), reason="no active grant")
            raise await b.db(lambda: ended_grant_refusal(b.app.store, user, device_name, now, hint,
                                                         self._zone())) from None
        credential = await b.db(device_credential, device, b.app.keys)
        if self.gone:  # the vendor left while the grant was looked up: nothing is opened for nobody
            raise BrokerError("the connection closed before the session started")
        if b.stopping:  # checked and registered below without an await between: stop_server misses none
            await b.audit("session.refused", **login.audit_fields(), reason="broker stopping")
            raise BrokerError("the broker is shutting down; reconnect in a moment", "nothing was run on the device")
        live = LiveSession(b, SessionIdentity.for_login(login, device, grant, now), credential, self.conn.close)
        start = asyncio.ensure_future(live.start())
        b.starting.add(start)
        b.starting_sessions[live.id] = (live, start)  # the control loop cancels it when killed or revoked
        self._starting = (live, start)  # connection_lost cancels it (LiveSession.start then cleans up)
        try:
            await start
        except asyncio.CancelledError:
            if (task := asyncio.current_task()) is not None and task.cancelling():  # this coroutine itself is being cancelled
                raise
            # start() was cancelled (vendor gone, broker stopping) and has closed the recording and the row
            why = live.abort_reason[1] if live.abort_reason else "the broker is shutting down; reconnect in a moment"
            raise BrokerError(why, "nothing was run on the device") from None
        finally:
            b.starting.discard(start)
            b.starting_sessions.pop(live.id, None)
            self._starting = None
        if self.gone:  # gone between start's end and here (connection_lost found no live session to finish)
            await live.finish("closed", reason="the vendor disconnected while the session was starting")
            raise BrokerError("the connection closed before the session started")
        return live

    def _zone(self):
        """The display time zone for times told to the vendor (UTC is always given too)."""
        try:
            return display_zone(self.broker.app.config.display.timezone)
        except ValueError:
            return None

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
        if self.device_name is None:  # ProxyJump (ssh -J USER@broker DEVICE): decided and served in broker/jump.py
            return self.broker.open_jump(self, dest_host, dest_port)
        assert self.vendor is not None  # forwards are asked for only after authentication
        return open_forward(self.broker, self.vendor, lambda: self.live, self._ensure_live, dest_host, dest_port,
                            f"{orig_host}:{orig_port}")  # ssh -L on a device login

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        text = (f"remote port forwarding (ssh -R {listen_port}:…) is not available through medbroker: it would "
                "open a way into the hospital network that nothing records or checks; copy files with scp or sftp")
        self._refuse_channel("tcpip-forward", f"{listen_host}:{listen_port}", reason=text)
        self._remember_notice(text)
        return False

    def unix_connection_requested(self, dest_path: str):
        self._refuse_channel("direct-streamlocal", dest_path)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "medbroker: socket forwarding is not allowed")

    def unix_server_requested(self, listen_path: str) -> bool:
        text = ("socket forwarding (ssh -R with a socket path) is not available through medbroker; copy files "
                "with scp or sftp")
        self._refuse_channel("streamlocal-forward", listen_path, reason=text)
        self._remember_notice(text)
        return False

    def _remember_notice(self, text: str) -> None:
        """A refusal with no channel to say it on (a global request): said on the next session channel."""
        if text not in self.pending_notices and len(self.pending_notices) < 8:
            self.pending_notices.append(text)

    def _refuse_channel(self, kind: str, target: str, *, reason: str | None = None) -> None:
        extra = {"reason": reason} if reason else {}
        who = self.vendor.audit_fields() if self.vendor else dict(user=self.user, device=self.device_name,
                                                                   source=self.source)
        self.broker.audit_soon("channel.refused", **who, kind=kind, target=target,
                               session_id=self.live.id if self.live else None, **extra)


class SelfServiceSession(OneShotSession):
    """``ssh alice@broker [command]``: status, request, approve, deny."""

    def __init__(self, server: BrokerServer) -> None:
        super().__init__()
        self.server = server

    def session_started(self) -> None:
        self.server.broker.spawn(self._run())

    async def _run(self) -> None:
        s, b = self.server, self.server.broker
        if self.subsystem:
            reply_status, out, err = 1, "", (f"{self.subsystem} needs a device: use "
                                             f"USER@DEVICE@{b.settings.public_host}\n")
        else:
            principal = s.principal
            assert principal is not None  # a session channel opens only after authentication
            reply = await b.db(lambda: run_command(b.app, principal, self.command, source=s.source, port=b.port))
            reply_status, out, err = reply.status, reply.stdout, reply.stderr
        if self.pty:
            out, err = out.replace("\n", "\r\n"), err.replace("\n", "\r\n")
        if out:
            self.chan.write(out.encode())
        if err:
            self.chan.write_stderr(err.encode())
        self.chan.exit(reply_status)


def listen_options(app: App) -> dict[str, Any]:
    """asyncssh server options for the vendor port (host key, algorithms, timeouts); jump.py's inner servers too."""
    cfg = app.config
    host_key = asyncssh.read_private_key(str(cfg.path(cfg.listen.host_key)))
    return dict(
        server_host_keys=[host_key],
        server_version=cfg.listen.server_version,
        login_timeout=cfg.seconds("listen", "login_timeout"),
        keepalive_interval=cfg.seconds("listen", "keepalive_interval"),
        encoding=None,
        line_editor=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        gss_host=None,
        config=None,
        **VENDOR_ALGORITHMS,
    )
