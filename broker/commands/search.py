"""``medbroker sessions search``: find commands, output lines and file paths across recorded sessions (audited)."""

from datetime import timedelta
from typing import Annotated, Any

import typer

from broker.clock import parse_utc, utc_iso
from broker.commands.common import JSON_HELP, admin_actor, emit_json, open_home, print_table, say
from broker.commands.player import format_offset
from broker.commands.session_extras import offset_text
from broker.errors import UsageError
from broker.report import parse_time_bound

__all__ = ["register", "search", "SEARCH_ROLES", "MAX_QUERY"]

SEARCH_ROLES = ("security", "admin")
MAX_QUERY = 200
_SHOWN = 160


def _match_doc(row: dict[str, Any]) -> dict[str, Any]:
    at = parse_utc(row["started_at"]) + timedelta(seconds=float(row["offset"]))
    return {"session_id": row["session_id"], "offset": round(float(row["offset"]), 3), "at": utc_iso(at),
            "kind": row["kind"], "text": row["text"], "user": row["user_name"], "device": row["device"]}


def search(
    ctx: typer.Context,
    text: Annotated[str, typer.Argument(metavar="TEXT", help="Text to find (substring, case-insensitive for ASCII).")],
    device: Annotated[str | None, typer.Option("--device", metavar="D", help="Only sessions on this device.")] = None,
    user: Annotated[str | None, typer.Option("--user", metavar="U", help="Only this user's sessions.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="T", help="Only sessions started since T: a duration back from now (7d, 12h), a date "
                                     "(2026-11-28) or a UTC timestamp (2026-11-28T14:00:00Z).")] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, max=10000, help="At most N matches.")] = 200,
    by: Annotated[str | None, typer.Option(
        "--by", metavar="NAME", help="Security or admin user searching (audited; default: local:<your OS login>).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Search the commands, terminal output and file-transfer paths of ended sessions.

    Prints each match with its session, time offset and line. Sessions are indexed when they end, so a
    live session is not searchable yet (watch it: medbroker sessions watch ID).
    """
    if not text.strip() or len(text) > MAX_QUERY or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"the search text must be 1-{MAX_QUERY} printable characters", 'e.g. "rm -rf" or dicom')
    a = open_home(ctx)
    start = None if since is None else utc_iso(parse_time_bound(since, a.clock.now(), what="--since"))
    actor = admin_actor(a, by, action="search recordings", roles=SEARCH_ROLES)
    rows = a.store.search_sessions(text, device=device, user=user, since=start, limit=limit + 1)
    truncated = len(rows) > limit
    docs = [_match_doc(r) for r in rows[:limit]]
    a.audit.record("recording.searched", actor=actor, source="cli", query=text, device_filter=device,
                   user_filter=user, since=start, hits=len(docs), sessions=len({d["session_id"] for d in docs}))
    if as_json:
        emit_json({"query": text, "device": device, "user": user, "since": start, "matches": docs,
                   "truncated": truncated})
        return
    print_table(["session", "offset", "at", "user", "device", "kind", "line"],
                ([d["session_id"], offset_text(d["offset"]), d["at"].replace("T", " ")[:19] + "Z", d["user"], d["device"],
                  d["kind"], d["text"] if len(d["text"]) <= _SHOWN else d["text"][:_SHOWN - 1] + "…"] for d in docs),
                empty="no matches")
    if truncated:
        say(f"(first {limit} matches; narrow with --device, --user, --since or raise --limit)")
    elif docs:
        first = docs[0]
        say(f"{len(docs)} match(es) in {len({d['session_id'] for d in docs})} session(s); replay the first from just "
            f"before it: medbroker replay {first['session_id']} --from {format_offset(first['offset'] - 5)}")


def register(sessions_app: typer.Typer) -> None:
    """Add ``search`` to ``medbroker sessions``."""
    sessions_app.command("search")(search)
