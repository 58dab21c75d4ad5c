"""What the CLI and the web console both do with a session: look it up, end it, verify its recording, list
the live ones. The faces translate; the behaviour (limits, messages, checks) lives here once."""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol

from broker.app import ALERT_EVENTS, App
from broker.clock import utc_iso
from broker.errors import BrokerError, ConflictError, NotFoundError, UsageError
from broker.grants import check_text
from broker.store import Store

__all__ = ["MAX_KILL_REASON", "KILL_ROLES", "get_session", "check_kill_reason", "request_kill", "verify_session",
           "session_verification", "list_live_sessions", "running_counters"]

MAX_KILL_REASON = 500  # the CLI's limit; the console allowed only 300 (issue 12: one limit, checked here)
KILL_ROLES = ("security", "admin")
_KILL_EXAMPLE = '--reason "copying images"'
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# ---------------------------------------------------------------------------- lookup
def get_session(store: Store, session_id: str) -> dict[str, Any]:
    """The sessions row of ``session_id``.

    :raises NotFoundError: unknown or malformed id (the same sentence for both: a malformed id is unknown)
    """
    row = store.get_session(session_id) if _ID.fullmatch(session_id or "") else None
    if row is None:
        raise NotFoundError(f"session {session_id[:64]!r} does not exist",
                            "list them with: medbroker sessions list (or the console's Sessions page)")
    return row


# ---------------------------------------------------------------------------- ending a live session
def check_kill_reason(reason: str | None) -> str | None:
    """The reason shown to the vendor: none at all, or 1-500 printable characters on one line.

    :raises UsageError: empty, too long, or holding a control or invisible formatting character
    """
    if reason is None:
        return None
    if not reason.strip():
        raise UsageError(f"the reason must be 1-{MAX_KILL_REASON} printable characters; the vendor sees it",
                         f"e.g. {_KILL_EXAMPLE}")
    check_text(reason, "the reason", MAX_KILL_REASON, _KILL_EXAMPLE)
    return reason


def request_kill(app: App, session_id: str, *, actor: str, reason: str | None, source: str) -> dict[str, Any]:
    """Ask the broker process serving a live session to end it (it polls and closes it within about a second);
    audited as ``session.kill.requested``. Call on the store thread.

    :returns: the session row as it was before the request
    :raises UsageError: see :func:`check_kill_reason`
    :raises NotFoundError: unknown session
    :raises ConflictError: not live, or a kill was already requested
    """
    reason = check_kill_reason(reason)
    row = get_session(app.store, session_id)
    if row["status"] != "live":
        raise ConflictError(f"session {session_id} is not live (status {row['status']})", "nothing changed")
    if not app.store.request_session_kill(session_id, by=actor, reason=reason, now=utc_iso(app.clock.now())):
        raise ConflictError(f"session {session_id} already ended or a kill was already requested",
                            f"see: medbroker sessions show {session_id}")
    app.audit.record("session.kill.requested", actor=actor, user=row["user_name"], device=row["device"],
                     session_id=session_id, grant_id=row["grant_id"], source=source, reason=reason)
    return row


# ---------------------------------------------------------------------------- verifying a recording
def verify_session(app: App, row: Mapping[str, Any]):
    """Verify a session's recording, complete or retention-redacted, against the database's final hash and
    signature (a live one only for its chain so far).

    :returns: a ``sessions.recording.VerifyResult``
    :raises RecordingError: the file cannot be opened
    :raises StorageError: the row names a recording outside the recordings directory
    """
    from sessions.retention import verify_any

    live = row["status"] == "live"
    return verify_any(
        app.recordings.local_path(row["recording"]),
        expected_final_hash=None if live else row["final_hash"],
        signature=None if live else row["signature"],
        public_key=app.signing_key.public_key() if row["signature"] and not live else None,
        key_lookup=app.keys.get,
    )


def session_verification(app: App, row: Mapping[str, Any], *, name_signature: bool = False) -> dict[str, Any]:
    """A session's recording check for people: ``state`` (ok, live, incomplete, broken), ``summary``,
    ``problems``, ``notes`` and ``result`` (the ``VerifyResult``, None when the file could not be read).

    :param name_signature: say ", signature valid" in the summary when a signature was checked
    """
    from sessions.replay import verification_summary

    try:
        present = app.recordings.exists(row["recording"])
    except BrokerError as exc:
        return _broken(exc.message)
    if not present:
        return _broken("recording file is missing")
    try:
        res = verify_session(app, row)
    except BrokerError as exc:  # unreadable file, unknown data key id
        return _broken(exc.message)
    live = row["status"] == "live"
    problems = list(res.problems)
    if not live and row["final_hash"] and not row["signature"]:
        problems.append("final hash is not signed")
    state = "broken" if problems else "live" if live else (
        "incomplete" if res.incomplete or row["status"] == "incomplete" or not row["final_hash"] else "ok")
    summary = verification_summary(res) if not problems or not res.ok else f"FAILED: {problems[0]}"
    if name_signature and state != "broken" and row["signature"] and not live:
        summary += ", signature valid"
    if row.get("payload_removed_at") and state != "broken":
        summary += f"; terminal content removed by retention on {row['payload_removed_at'][:10]}"
    return {"state": state, "summary": summary, "problems": problems, "notes": list(res.notes), "result": res}


def _broken(problem: str) -> dict[str, Any]:
    return {"state": "broken", "summary": f"FAILED: {problem}", "problems": [problem], "notes": [], "result": None}


# ---------------------------------------------------------------------------- live sessions
class Counted(Protocol):
    """A running session of this process (``broker.live.LiveSession``)."""

    def counters(self) -> Mapping[str, int]: ...


def running_counters(live: Mapping[str, Counted] | None) -> dict[str, Mapping[str, int]]:
    """Byte counters of this process's running sessions. Call it on their event loop (never the store thread),
    then hand the result to :func:`list_live_sessions`."""
    return {sid: session.counters() for sid, session in (live or {}).items()}


def list_live_sessions(store: Store, running: Mapping[str, Mapping[str, int]] | None = None, *,
                       details: bool = True) -> list[dict[str, Any]]:
    """Live sessions, newest first, with byte counters: ``running`` (session id → counters taken on the event
    loop of the broker serving it) where known, else the ones its broker last saved (every 5 s).

    :param details: also the grant's end (``ends_at``), the number of alerts and denials (``alerts``) and the
        newest one's event (``last_alert``)
    """
    rows = []
    for s in reversed(store.list_sessions(status="live")):
        c = (running or {}).get(s["id"]) or {}
        row = s | {"bytes_in": c.get("bytes_in", s["bytes_in"]), "bytes_out": c.get("bytes_out", s["bytes_out"])}
        if details:
            grant = store.get_grant(s["grant_id"]) or {}
            alerts = [a for a in store.search_audit(session_id=s["id"], limit=200)
                      if a["event"].startswith(ALERT_EVENTS) or a["event"].endswith(".denied")]
            row |= {"ends_at": grant.get("ends_at"), "alerts": len(alerts),
                    "last_alert": alerts[0]["event"] if alerts else None}
        rows.append(row)
    return rows
