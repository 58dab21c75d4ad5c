"""What ``sessions list``/``show`` add for security staff: grant end and idle time, command index, alerts."""

from datetime import timedelta
from typing import Any

from broker.app import App
from broker.audit import parse_details
from broker.clock import parse_utc, utc_iso
from broker.commands.common import print_table, say, when
from broker.config import format_duration
from broker.siem import event_severity

__all__ = ["live_extras", "session_activity", "print_activity", "idle_text", "offset_text"]


def live_extras(a: App, row: dict[str, Any]) -> dict[str, Any]:
    """``grant_ends_at`` (and ``grant_revoked_at``) and, for a live session, ``idle_s`` since its last data."""
    grant = a.store.get_grant(row["grant_id"]) or {}
    idle = None
    if row["status"] == "live" and row["last_activity_at"]:
        idle = max(0, int((a.clock.now() - parse_utc(row["last_activity_at"])).total_seconds()))
    return {"grant_ends_at": grant.get("ends_at"), "grant_revoked_at": grant.get("revoked_at"), "idle_s": idle}


def idle_text(doc: dict[str, Any]) -> str:
    """Idle time for a table cell: ``3m20s``, ``0s``, or ``-`` for ended sessions."""
    return "-" if doc.get("idle_s") is None else format_duration(doc["idle_s"])


def offset_text(seconds: float) -> str:
    """Seconds into a session as ``+HH:MM:SS.d``."""
    tenths = int(max(0.0, seconds) * 10)
    s, tenth = divmod(tenths, 10)
    m, sec = divmod(s, 60)
    h, minute = divmod(m, 60)
    return f"+{h:02d}:{minute:02d}:{sec:02d}.{tenth}"


def session_activity(a: App, row: dict[str, Any]) -> dict[str, Any]:
    """The session's command index with timestamps, and its denials and alerts from the audit log."""
    started = parse_utc(row["started_at"])
    commands = [{"offset": round(float(c["offset"]), 3), "at": utc_iso(started + timedelta(seconds=float(c["offset"]))),
                 "channel": c["channel"], "source": c["source"], "command": c["command"]}
                for c in a.store.session_commands(row["id"])]
    alerts = [{"id": e["id"], "at": e["at"], "event": e["event"], "actor": e["actor"], "details": parse_details(e)}
              for e in a.store.audit_rows(session_id=row["id"]) if event_severity(e["event"]) <= 4]
    return {"commands": commands, "alerts": alerts, "indexed": bool(row.get("indexed_at"))}


def _summary(details: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in details.items() if v not in (None, "", [], {})]
    text = " ".join(parts)
    return text if len(text) <= 140 else text[:139] + "…"


def print_activity(row: dict[str, Any], activity: dict[str, Any]) -> None:
    """Print the command index and the alerts of :func:`session_activity`."""
    if activity["commands"]:
        print_table(["offset", "at", "channel", "how", "command"],
                    ([offset_text(c["offset"]), when(c["at"]), c["channel"], c["source"], c["command"]]
                     for c in activity["commands"]), title="Commands")
    elif row["status"] == "live":
        say("Commands: indexed when the session ends (watch it now: medbroker sessions watch " + row["id"] + ")")
    else:
        say("Commands: none recorded" + ("" if activity["indexed"] else " (the recording is not indexed)"))
    if activity["alerts"]:
        print_table(["at", "event", "by", "details"],
                    ([when(e["at"]), e["event"], e["actor"], _summary(e["details"])] for e in activity["alerts"]),
                    title="Denials and alerts")
    if row.get("payload_removed_at"):
        say(f"Retention: terminal content removed on {when(row['payload_removed_at'])}; commands, transfers, "
            "alerts and hashes remain")
