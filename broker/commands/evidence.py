"""``medbroker evidence export`` and the bundle side of ``audit verify --bundle``: sessions as one signed file,
checked offline."""

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.commands.common import JSON_HELP, admin_actor, emit_json, open_home, safe, say
from broker.errors import BrokerError

__all__ = ["app", "export", "verify_bundle_file", "check_doc"]

app = typer.Typer(help="Evidence bundles: chosen sessions as one signed file anyone can verify offline.",
                  no_args_is_help=True, rich_markup_mode=None)

EXPORT_ROLES = ("security", "admin")


@app.command("export")
def export(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", dir_okay=False,
                                         help="Where to write the bundle (an uncompressed tar).")],
    session: Annotated[list[str] | None, typer.Option(
        "--session", metavar="ID", help="This session (repeat for several).")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="NAME", help="Sessions on this device.")] = None,
    user: Annotated[str | None, typer.Option("--user", metavar="NAME", help="Sessions of this user.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="WHEN", help="Sessions started at or after: 2026-11-28, an ISO timestamp, or 7d.")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", metavar="WHEN", help="Sessions started before (a date includes that day).")] = None,
    include_data_key: Annotated[bool, typer.Option(
        "--include-data-key", help="Also the key of each exported recording (opens those recordings only, never "
                                   "the broker's data keys), so the reviewer can replay them.")] = False,
    by: Annotated[str | None, typer.Option(
        "--by", metavar="NAME", help="Security or admin user exporting (audited; default: local:<your OS login>).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Export chosen sessions as one signed evidence bundle: recordings, audit rows with their signed chain
    context, session and transfer rows, the public signing key; verify it with audit verify --bundle.

    Every given selector must match; at least one is required. Live sessions are left out.
    """
    from broker.evidence import Selection, export_bundle
    from broker.evidence_verify import verify_bundle
    from broker.report import parse_time_bound

    a = open_home(ctx)
    now = a.clock.now()
    sel = Selection(tuple(dict.fromkeys(session or ())), device, user,
                    parse_time_bound(since, now, what="--since") if since else None,
                    parse_time_bound(until, now, what="--until", end=True) if until else None)
    actor = admin_actor(a, by, action="export evidence", roles=EXPORT_ROLES)
    started = time.monotonic()
    result = export_bundle(a, sel, output, actor=actor, include_data_key=include_data_key)
    took = time.monotonic() - started
    check = verify_bundle(output)
    doc = {"path": str(output.absolute()), "sha256": result.sha256, "bytes": result.bytes,
           "sessions": list(result.sessions), "skipped_live": list(result.skipped_live),
           "audit_rows": result.audit_rows, "segments": [list(s) for s in result.segments],
           "signing_key": result.key_id, "data_key_included": result.data_key_included,
           "seconds": round(took, 3), "verified": check.ok, "problems": check.problems}
    if as_json:
        emit_json(doc)
    else:
        say(f"Exported {len(result.sessions)} session(s) to {output} ({result.bytes} bytes, sha256 {result.sha256}).")
        say(f"Audit rows: {result.audit_rows} in {len(result.segments)} stretch(es) ending at signed checkpoints; "
            f"signed with {result.key_id}.")
        if result.skipped_live:
            say(f"Left out {len(result.skipped_live)} live session(s): {', '.join(result.skipped_live[:5])}")
        say("Recording keys included: the bundle can be replayed by whoever holds it; keep it like the recordings."
            if include_data_key else "Recording keys not included: the bundle verifies anywhere, its terminal "
                                     "content is readable only on this broker.")
        say("Checked the written bundle: " + ("ok" if check.ok else f"{len(check.problems)} problem(s)"))
        for p in check.problems[:20]:
            say(f"  {safe(p)}")
    if not check.ok:
        raise BrokerError(f"the bundle {output} was written, but does not verify ({len(check.problems)} problem(s)): "
                          "the broker's own evidence is damaged",
                          "keep the bundle and the broker home unchanged; run: medbroker audit verify")


def check_doc(check: Any) -> dict[str, Any]:
    """``audit verify --bundle --json``: the check as one document."""
    m = check.manifest
    return {"ok": check.ok, "bundle": str(check.path), "signing_key": check.key_id,
            "created_at": m.get("created_at"), "exported_by": m.get("exported_by"),
            "data_key_included": m.get("data_key_included"), "audit_rows": check.audit_rows,
            "checkpoints": check.checkpoints, "sessions": check.sessions, "problems": check.problems}


def verify_bundle_file(path: Path, *, expect_key: str | None, as_json: bool) -> None:
    """``medbroker audit verify --bundle FILE``: offline; exit 1 naming every missing or altered member."""
    from broker.evidence_verify import verify_bundle

    check = verify_bundle(path, expect_key=expect_key)
    if as_json:
        emit_json(check_doc(check))
    else:
        m = check.manifest
        say(f"bundle {path}: exported {safe(m.get('created_at'))} by {safe(m.get('exported_by'))}, "
            f"signed with {safe(check.key_id)}")
        say(f"audit rows: {check.audit_rows}, signed checkpoints: {check.checkpoints}")
        for s in check.sessions:
            say(f"session {safe(s['session_id'])}: {s['state']}" + (f" ({s['frames']} frames)" if s["frames"] else ""))
        for p in check.problems:
            say(f"FAILED: {safe(p)}")
        counts = {k: sum(1 for s in check.sessions if s["state"] == k) for k in ("ok", "incomplete", "broken")}
        say(f"recordings: {counts['ok']} ok, {counts['incomplete']} incomplete, {counts['broken']} broken")
        if check.ok and expect_key is None:
            say(f"compare the signing key {check.key_id} with the one your broker publishes "
                "(or pass --expect-key): a copy re-signed with another key verifies only against that key")
    if not check.ok:
        first = check.problems[0]
        raise BrokerError(f"bundle verification failed: {len(check.problems)} problem(s), first: {first}",
                          "the bundle was altered or damaged after export; ask the hospital for a new export")
