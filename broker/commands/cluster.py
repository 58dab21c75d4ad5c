"""``medbroker cluster …``: the broker nodes sharing this database, their state and sessions."""

from typing import Annotated

import typer

from broker.cluster import cluster_status
from broker.commands.common import JSON_HELP, emit_json, open_home, print_table, say, when

__all__ = ["app"]

app = typer.Typer(help="Broker nodes sharing one database: their state and sessions.", no_args_is_help=True,
                  rich_markup_mode=None)


def _backlog(value: dict[str, int] | None) -> str:
    if value is None:
        return "n/a (no [archive])"
    return f"{value['waiting']} recordings waiting, {value['uploading']} uploads in progress"


@app.command("status")
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Nodes (alive, dead or stopped; last heartbeat; live sessions), each node's sessions, the recording
    journal's lag (rows not yet dropped) and the archive backlog ("n/a" without [archive])."""
    a = open_home(ctx)
    doc = cluster_status(a.store, a.clock.now(), a.config.seconds("cluster", "dead_after"),
                         archiving=bool(a.config.archive.url))
    if as_json:
        emit_json(doc)
        return
    print_table(["node", "state", "address", "host", "pid", "heartbeat", "age", "sessions", "version"],
                ([n["id"], n["state"], n["address"], n["host"], n["pid"], when(n["heartbeat_at"]),
                  f"{n['heartbeat_age_s']:.1f}s", len(n["live_sessions"]), n["version"]] for n in doc["nodes"]),
                title="nodes", empty="no node has joined yet (start one with: medbroker serve)")
    print_table(["session", "node", "pid", "user", "device", "started", "source"],
                ([s["id"], s["node_id"], s["pid"], s["user"], s["device"], when(s["started_at"]), s["source"]]
                 for s in doc["sessions"]), title="live sessions", empty="no live sessions")
    say(f"journal lag: {doc['journal_lag']} rows; archive backlog: {_backlog(doc['archive_backlog'])}; a node is dead after {doc['dead_after_s']:.0f}s "
        "without a heartbeat")
