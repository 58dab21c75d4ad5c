"""``medbroker sessions …``: live and past device sessions, and ending a live one."""

import json
from typing import Annotated, Any

import typer

from broker.app import App
from broker.clock import parse_utc, utc_iso
from broker.commands.common import (JSON_HELP, admin_actor, emit_json, open_home, print_fields, print_table, safe,
                                    say, when)
from broker.config import format_duration
from broker.session_ops import KILL_ROLES, check_kill_reason, get_session, request_kill

__all__ = ["app", "session_doc", "get_session_row"]

app = typer.Typer(help="Device sessions: list, inspect, end a live one.", no_args_is_help=True, rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
SessionId = Annotated[str, typer.Argument(metavar="ID", help="Session id, e.g. 20261128-141530-3fa2c1.")]


def get_session_row(a: App, session_id: str) -> dict[str, Any]:
    """:raises NotFoundError: unknown or malformed session id (``broker.session_ops.get_session``)"""
    return get_session(a.store, session_id)


def session_doc(row: dict[str, Any]) -> dict[str, Any]:
    """A session row for people and JSON (``user`` instead of ``user_name``; duration in seconds)."""
    doc = {"id": row["id"], "user": row["user_name"]} | {k: v for k, v in row.items() if k not in ("id", "user_name")}
    end = row["ended_at"]
    if row["started_at"] and end:
        doc["duration_s"] = int((parse_utc(end) - parse_utc(row["started_at"])).total_seconds())
    else:
        doc["duration_s"] = None
    return doc


def _length(doc: dict[str, Any]) -> str:
    if doc["duration_s"] is not None:
        return format_duration(doc["duration_s"])
    return "running" if doc["status"] == "live" else "-"


@app.command("list")
def list_(
    ctx: typer.Context,
    live: Annotated[bool, typer.Option("--live", help="Only sessions running now.")] = False,
    user: Annotated[str | None, typer.Option("--user", metavar="NAME", help="Only this user's.")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="NAME", help="Only on this device.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="T", help="Only sessions started at or after T: a duration back from now (7d, 12h), "
                                     "a date (2026-11-28) or an ISO-8601 time.")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", metavar="T", help="Only sessions started before T (a date includes that whole day).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, max=1_000_000, metavar="N",
                                       help="At most N sessions, newest first (0 = all).")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List sessions, newest first (live ones with their grant end and idle time; what was run or copied)."""
    from broker.commands.session_extras import idle_text, live_extras
    from broker.report import parse_time_bound

    a = open_home(ctx)
    now = a.clock.now()
    start = None if since is None else utc_iso(parse_time_bound(since, now, what="--since"))
    end = None if until is None else utc_iso(parse_time_bound(until, now, what="--until", end=True))
    rows = a.store.list_sessions(status="live" if live else None, user=user, device=device, since=start, until=end,
                                 newest_first=True, limit=(limit + 1) if limit else None)
    more = bool(limit) and len(rows) > limit
    rows = rows[:limit] if limit else rows
    kinds = a.store.session_kinds([r["id"] for r in rows])
    docs = [session_doc(r) | live_extras(a, r) | {"activity": kinds.get(r["id"])} for r in rows]
    if as_json:
        emit_json({"sessions": docs, "more": more})
        return
    print_table(["id", "user", "device", "status", "started", "length", "in", "out", "idle", "what", "grant",
                 "grant ends", "source"],
                ([d["id"], d["user"], d["device"], d["status"], when(d["started_at"]), _length(d), d["bytes_in"],
                  d["bytes_out"], idle_text(d), _what(d["activity"]), d["grant_id"], when(d["grant_ends_at"]),
                  d["source"]] for d in docs),
                empty="no live sessions" if live else "no sessions")
    if more:
        say(f"(the newest {limit}; narrow with --since/--until/--user/--device or raise --limit, 0 = all)")


def transfer_hash_text(t: dict) -> str:
    """The sha256 cell of a transfer: a resumed or scattered one says what its hash covers."""
    try:
        details = json.loads(t.get("details") or "{}")
    except ValueError:
        details = {}
    if details.get("partial"):
        start = int(details.get("offset") or 0)
        return f"{t['sha256']} (partial: bytes {start}..{start + int(t['bytes'] or 0)} only)"
    return t["sha256"] or "-"


def _what(activity: dict | None) -> str:
    """One cell: the first command and how many more, or the files moved (from the command index)."""
    if not activity:
        return "-"
    parts = []
    if activity.get("first"):
        first = activity["first"] if len(activity["first"]) <= 32 else activity["first"][:31] + "…"
        more = activity["commands"] - 1
        parts.append(f"{activity['sources'] or ''}: {first}" + (f" (+{more})" if more > 0 else ""))
    if activity.get("files"):
        parts.append(f"{activity['files']} file(s)")
    return safe("; ".join(parts)) or "-"


@app.command("show")
def show(ctx: typer.Context, session_id: SessionId, as_json: JsonOpt = False) -> None:
    """Show one session: who, where, when, outcome, recording, commands, file transfers, denials and alerts."""
    from broker.commands.session_extras import live_extras, print_activity, session_activity

    a = open_home(ctx)
    row = get_session_row(a, session_id)
    doc = session_doc(row) | live_extras(a, row)
    transfers = a.store.transfers(session_id)
    forwards = a.store.forwards(session_id)
    activity = session_activity(a, row)
    if as_json:
        emit_json(doc | {"transfers": transfers, "forwards": forwards} | activity)
        return
    print_fields([("session", doc["id"]), ("user", doc["user"]), ("device", doc["device"]),
                  ("grant", doc["grant_id"]), ("source", doc["source"]), ("status", doc["status"]),
                  ("containment", (doc.get("containment") or "-").replace("exposed", "EXPOSED")),
                  ("started", when(doc["started_at"])), ("ended", when(doc["ended_at"])), ("length", _length(doc)),
                  ("end reason", doc["end_reason"]), ("bytes in/out", f"{doc['bytes_in']} / {doc['bytes_out']}"),
                  ("last activity", when(doc["last_activity_at"])), ("recording", doc["recording"]),
                  ("final hash", doc["final_hash"]), ("signed", bool(doc["signature"]))])
    if doc["kill_requested_at"]:
        say(f"kill requested: {when(doc['kill_requested_at'])} by {safe(doc['kill_requested_by'])}: "
            f"{safe(doc['kill_reason'])}")
    if transfers:
        print_table(["at", "direction", "path", "bytes", "sha256", "outcome"],
                    ([when(t["at"]), t["direction"], t["path"], t["bytes"], transfer_hash_text(t), t["outcome"]]
                     for t in transfers), title="File transfers")
    if forwards:
        print_table(["opened", "closed", "forward port", "to device", "to vendor", "content", "outcome"],
                    ([when(f["opened_at"]), when(f["closed_at"]), f"forward port {f['port']}", f["bytes_to_device"],
                      f["bytes_to_vendor"], "TLS (sizes only)" if f["tls"] else "plain text", safe(f["outcome"] or "")]
                     for f in forwards), title="Port forwards")
    print_activity(row, activity)
    say(f"Replay: medbroker replay {doc['id']}    Export: medbroker export {doc['id']} --format text -o FILE")


@app.command("kill")
def kill(
    ctx: typer.Context,
    session_id: SessionId,
    reason: Annotated[str | None, typer.Option("--reason", help="Shown to the vendor and audited.")] = None,
    by: Annotated[str | None, typer.Option(
        "--by", metavar="NAME", help="Security or admin user acting (default: local:<your OS login>).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """End a live session: the broker serving it closes it within about a second."""
    check_kill_reason(reason)
    a = open_home(ctx)
    row = get_session_row(a, session_id)
    actor = admin_actor(a, by, action="end sessions", roles=KILL_ROLES)
    request_kill(a, session_id, actor=actor, reason=reason, source="cli")
    if as_json:
        emit_json(session_doc(get_session_row(a, session_id)))
        return
    say(f"Session {session_id} ({row['user_name']} on {row['device']}) will end within about a second; "
        f"check with: medbroker sessions show {session_id}")
