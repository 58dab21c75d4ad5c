"""Append-only, hash-chained audit log with signed checkpoints and an event catalogue."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from broker.clock import Clock, utc_iso
from broker.keys import sign_hex
from broker.store import Store, dumps

__all__ = ["EVENTS", "AuditLog", "row_hash", "verify_chain", "ChainResult", "checkpoint_message", "write_checkpoint",
           "sink_name"]

log = logging.getLogger("medbroker.audit")

# The stable event catalogue (area.action[.outcome]). Names are API: add, never rename.
EVENTS: dict[str, str] = {
    "auth.success": "a user authenticated (method, key fingerprint)",
    "auth.failure": "an authentication attempt failed (reason; never the secret)",
    "auth.lockout": "too many failures from one user and address; the pair is locked",
    "auth.penalty": "an address was penalised (failed logins, logins held until the timeout): refused for a while",
    "auth.totp.enrolled": "a user enrolled TOTP",
    "auth.totp.removed": "an administrator removed a user's TOTP enrolment (key alone from now on)",
    "keys.rotated": "a new data key became current; device credentials and TOTP secrets were re-sealed with it",
    "login.refused": "an authenticated user was refused (no grant, unknown device, bad username)",
    "user.created": "an administrator created a user (or the directory did: actor directory, via directory)",
    "user.directory.synced": "a directory user's role, state or SSH keys changed to what the directory says",
    "user.key.added": "a public key was registered for a user",
    "user.key.removed": "a user's public key was removed; sessions that logged in with it end",
    "user.role.changed": "a user's role changed; their live sessions end",
    "user.disabled": "a user was disabled",
    "user.enabled": "a user was enabled again",
    "device.added": "a device was registered (host key fingerprint, protected paths)",
    "device.removed": "a device was removed",
    "device.hostkey.mismatch": "a device presented a host key other than the pinned one",
    "device.unreachable": "the broker could not reach a device",
    "device.legacy_algorithms": "a connection to a device used per-device legacy algorithms",
    "device.containment": "a containment check: can the device login read a protected path (state, exposed paths, trigger)",
    "device.changed": "an administrator changed a device setting (e.g. what an exposed device allows)",
    "request.created": "a vendor requested access",
    "request.approved": "an approver approved (partially, for critical devices)",
    "request.denied": "an approver denied a request",
    "request.expired": "a pending request expired undecided",
    "request.refused": "a request or decision was refused (own request, wrong role, bad state)",
    "grant.created": "an approved request became an access window",
    "grant.revoked": "a grant was revoked; its live sessions end",
    "session.start": "a device session started (recording path)",
    "session.end": "a device session ended (reason, final hash, bytes)",
    "session.refused": "a session was refused (no grant, recording unavailable, device down)",
    "session.warning": "a vendor was warned that the window is ending",
    "session.killed": "security staff ended a live session",
    "session.expired": "a session ended because its window ended",
    "session.sealed": "an interrupted recording was sealed and its session marked incomplete: at startup, when a "
                      "worker died, or by a surviving node when its node died (node, by)",
    "session.stopped": "a live session ended because what it was opened with was withdrawn (user disabled, login "
                       "key removed, role changed, device removed)",
    "channel.refused": "a channel or request was refused (forwarding, agent, X11, subsystem; protocol = tls: a TLS "
                       "forwarded connection [policy] forward_tls does not allow; kind or protocol = packet: an SSH "
                       "data packet over the 32 KiB announced, the channel was ended)",
    "jump.open": "a self-service login opened a ProxyJump channel (ssh -J) to a device name; the broker serves "
                 "SSH on it (docs/security.md)",
    "jump.login": "the vendor logged in through a ProxyJump channel (same key as the first hop); the session that "
                  "follows carries via=proxyjump",
    "jump.close": "a ProxyJump channel closed (bytes each way through it, the session it carried)",
    "forward.open": "an approved port forward opened a connection to a port on the device (port, origin)",
    "forward.close": "a forwarded connection ended (port, bytes each way, TLS or plain text, reason)",
    "connection.closed": "an open connection was closed because its login no longer stands (user disabled, "
                         "key removed, role changed)",
    "proxy.refused": "a connection was closed before SSH began: from a balancer address (listen.proxy_protocol_from) "
                     "without a valid PROXY protocol v2 header in time, or from any other address with one (source "
                     "= the connecting address, reason); at most one row a second per address",
    "exec.denied": "an exec command naming a protected path was refused",
    "channel.protocol.denied": "a file-transfer protocol (sftp, scp, rsync, tar, cpio, ssh) flowed on a shell or exec "
                               "channel or a plain-text port forward (kind = forward, port), or a forwarded "
                               "connection that started as TLS stopped being TLS (protocol = not-tls); that "
                               "channel or connection was ended",
    "sftp.denied": "an SFTP request was refused by policy",
    "sftp.protocol.denied": "an SFTP peer broke the protocol (malformed or oversize packet, request before INIT, "
                            "reused request id, unexpected packet or reply); the channel was closed at once",
    "sftp.summary": "bytes per file at the end of an SFTP channel",
    "scp.denied": "a legacy scp transfer was refused",
    "transfer.file": "a file crossed the broker (path, direction, bytes, sha256)",
    "alert.exfiltration": "patient-data content was detected in a stream; the session was stopped",
    "recording.failed": "a recording could not be written",
    "recording.replayed": "someone replayed a recording",
    "recording.exported": "someone exported a recording",
    "recording.archived": "a sealed recording was uploaded to the [archive] object store, read back and verified "
                          "(key, url, bytes, sha256, parts, parts reused from an interrupted upload, local_removed)",
    "recording.archive.failed": "archiving a recording failed (key, error); the next pass resumes the upload",
    "recording.local_removed": "the local copy of an archived recording was removed (archive.delete_local_after); "
                               "the object still verifies",
    "recording.watched": "someone watched a live session",
    "audit.checkpoint": "a signed checkpoint of the audit chain",
    "retention.applied": "recording payloads past retention were removed",
    "report.created": "a maintenance report was generated",
    "evidence.exported": "someone exported an evidence bundle (sessions, sha256 of the file, whether recording "
                         "keys were included)",
    "recording.searched": "someone searched the text of recorded sessions (query, filters, number of hits)",
    "retention.below_floor": "retention ran with a policy below the 180-day floor (explicit override)",
    "web.link.created": "a one-time web console sign-in link was issued over SSH",
    "web.signin": "someone signed in to the web console (link or password + TOTP)",
    "web.signin.failed": "a web console sign-in failed (expired or used link, wrong password or code)",
    "web.signout": "a web console session ended (sign-out, idle timeout, lifetime)",
    "web.denied": "the web console refused a page or action (role, CSRF check, disabled user)",
    "web.password.set": "a user set a web console password",
    "session.kill.requested": "security staff asked the broker to end a live session (from the web console)",
    "recording.shared": "security staff created an expiring auditor link to a recording",
    "recording.share.revoked": "an auditor link was revoked before it expired",
    "notify.failed": "a notification (webhook or e-mail) could not be delivered",
    "broker.started": "the broker started serving",
    "broker.stopped": "the broker stopped",
    "broker.worker.started": "a worker process began accepting on the shared port (listen.workers > 1)",
    "broker.worker.stopped": "a worker process stopped cleanly (its live sessions ended first)",
    "broker.worker.failed": "a worker process ended unexpectedly (exit status or signal); the supervisor "
                            "sealed its live recordings and starts a new worker",
    "cluster.node.joined": "a broker node joined the cluster (registered its id, host, pid, address and version; "
                           "previous: how its last run ended)",
    "cluster.node.stopped": "a broker node left the cluster on a clean shutdown (its leases released)",
    "cluster.node.dead": "a surviving node declared a node dead: no heartbeat for longer than [cluster] dead_after "
                         "(its live sessions are recovered next)",
    "cluster.node.fenced": "a node found it had been declared dead by another node and exited at once, leaving the "
                           "sessions that node sealed alone",
    "cluster.listener.reconnected": "a node's listening connection to PostgreSQL (LISTEN for kills, revokes and "
                                    "withdrawn logins) was lost and is back (down_s, error); meanwhile the 0.25 s "
                                    "poll ended sessions",
    "cluster.sessions.recovered": "a surviving node sealed the live sessions of a dead node and marked them "
                                  "incomplete (per session: final hash and where it was sealed from)",
}

_HASHED = ("id", "at", "event", "actor", "user_name", "device", "session_id", "grant_id", "request_id",
           "source", "details")


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """``sha256(prev_hash ‖ canonical JSON of the row's fields)`` as hex."""
    body = dumps({k: row.get(k) for k in _HASHED})
    return hashlib.sha256(prev_hash.encode() + body.encode()).hexdigest()


@dataclass
class AuditLog:
    """Writes audit rows; ``sinks`` get each committed row (JSON lines, syslog, alerts).

    A sink that raises never undoes or blocks the row: the failure is logged and counted in
    ``sink_failures`` (by :func:`sink_name`), which ``/metrics`` exports.
    """

    store: Store
    clock: Clock
    sinks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    sink_failures: dict[str, int] = field(default_factory=dict)

    def record(self, event: str, *, actor: str | None = None, user: str | None = None,
               device: str | None = None, session_id: str | None = None, grant_id: int | None = None,
               request_id: int | None = None, source: str | None = None, **details: Any) -> dict[str, Any]:
        """Append one event and hand it to the sinks after the commit.

        :param event: a name from :data:`EVENTS`
        :raises ValueError: for an event name not in the catalogue
        """
        if event not in EVENTS:
            raise ValueError(f"audit event {event!r} is not in the catalogue")
        row = {
            "at": utc_iso(self.clock.now()),
            "event": event,
            "actor": actor,
            "user_name": user,
            "device": device,
            "session_id": session_id,
            "grant_id": grant_id,
            "request_id": request_id,
            "source": source,
            "details": dumps(details),
        }
        full = self.store.append_audit(row, row_hash)
        for sink in self.sinks:
            try:
                sink(full)
            except Exception as exc:  # noqa: BLE001 - a broken sink must not undo or block the audit row
                self._sink_failed(sink, full, exc)
        return full

    def _sink_failed(self, sink: Callable[[dict[str, Any]], None], row: dict[str, Any], exc: Exception) -> None:
        name = sink_name(sink)
        n = self.sink_failures[name] = self.sink_failures.get(name, 0) + 1
        # The traceback once per sink: a sink that stays broken fails on every row.
        log.warning("audit sink %s failed on row %s (%s): %s: %s; the row is committed, not exported there "
                    "(%d failures of this sink)", name, row.get("id"), row.get("event"), type(exc).__name__, exc,
                    n, exc_info=n == 1)


@dataclass(frozen=True)
class ChainResult:
    """Outcome of :func:`verify_chain`."""

    ok: bool
    rows: int
    problems: tuple[str, ...]
    last_hash: str


def verify_chain(store: Store, *, verify_signature: Callable[[bytes, str], bool] | None = None) -> ChainResult:
    """Walk the audit chain and the signed checkpoints.

    :param verify_signature: ``fn(message, signature_hex) -> bool`` for checkpoints (optional)
    :returns: a :class:`ChainResult` naming every broken row
    """
    problems: list[str] = []
    prev_hash = "0" * 64
    expected_id = 1
    hashes: dict[int, str] = {}
    rows = store.audit_rows()
    for row in rows:
        if row["id"] != expected_id:
            problems.append(f"audit row {expected_id}: missing (next row is {row['id']})")
        if row["prev_hash"] != prev_hash:
            problems.append(f"audit row {row['id']}: prev_hash does not link to row {row['id'] - 1}")
        if row_hash(row["prev_hash"], row) != row["hash"]:
            problems.append(f"audit row {row['id']}: content does not match its hash (altered)")
        prev_hash = row["hash"]
        expected_id = row["id"] + 1
        hashes[row["id"]] = row["hash"]
    for cp in store.checkpoints():
        eid = cp["event_id"]
        if eid not in hashes:
            problems.append(f"checkpoint {cp['id']}: audit row {eid} is missing (rows deleted)")
        elif hashes[eid] != cp["hash"]:
            problems.append(f"checkpoint {cp['id']}: audit row {eid} hash differs from the signed checkpoint")
        if verify_signature is not None and not verify_signature(checkpoint_message(eid, cp["hash"]), cp["signature"]):
            problems.append(f"checkpoint {cp['id']}: signature invalid")
    return ChainResult(ok=not problems, rows=len(rows), problems=tuple(problems), last_hash=prev_hash)


def sink_name(sink: Callable[[dict[str, Any]], None]) -> str:
    """A short label for a sink: its ``sink_name`` attribute, else its function or class name."""
    name = getattr(sink, "sink_name", None) or getattr(sink, "__name__", None) or type(sink).__name__
    return str(name).strip("_")


def checkpoint_message(event_id: int, hash_: str) -> bytes:
    """What a checkpoint's signature covers: the row id and its chain hash."""
    return f"{event_id}:{hash_}".encode()


def write_checkpoint(log: AuditLog, signing_key: Any) -> dict[str, Any] | None:
    """Sign the head of the audit chain, so a rewritten tail (rows re-hashed after deletion) is detected.

    An ``audit.checkpoint`` row is appended first and the checkpoint covers that row, so a quiet broker
    does not write a new checkpoint every period: nothing happens when no row was added since the last one.

    :param signing_key: the broker's ed25519 private key (``App.signing_key``)
    :returns: the checkpoint (``event_id``, ``hash``, ``signature``, ``at``), or None when nothing changed
    """
    store = log.store
    last = store.last_checkpoint()
    if last is not None and last["event_id"] >= store.last_audit_id():
        return None
    row = log.record("audit.checkpoint", previous_event_id=last["event_id"] if last else None,
                     previous_checkpoint_at=last["at"] if last else None)
    checkpoint = {"event_id": row["id"], "hash": row["hash"],
                  "signature": sign_hex(signing_key, checkpoint_message(row["id"], row["hash"])),
                  "at": utc_iso(log.clock.now())}
    store.insert_checkpoint(checkpoint["event_id"], checkpoint["hash"], checkpoint["signature"], checkpoint["at"])
    return checkpoint


def parse_details(row: dict[str, Any]) -> dict[str, Any]:
    """The ``details`` JSON column as a dict."""
    try:
        return json.loads(row.get("details") or "{}")
    except json.JSONDecodeError:
        return {}
