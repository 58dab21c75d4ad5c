"""``medbroker retention apply``: remove recording payloads past the retention period, keeping them verifiable."""

from datetime import timedelta
from typing import Annotated, Any

import typer

from broker.clock import utc_iso
from broker.commands.common import JSON_HELP, admin_actor, emit_json, open_home, print_table, say, when
from broker.errors import BrokerError, RecordingError, UsageError

__all__ = ["app", "apply", "FLOOR_DAYS", "RETENTION_ROLES"]

FLOOR_DAYS = 180
RETENTION_ROLES = ("security", "admin")

app = typer.Typer(help="Retention: remove recording payloads older than the policy (metadata and hashes stay).",
                  no_args_is_help=True, rich_markup_mode=None)


def _process(a, row: dict[str, Any], *, actor: str, now, days: int, dry_run: bool) -> dict[str, Any]:
    """Redact one session's recording (or say why not); returns its result entry."""
    from sessions.retention import is_redacted, read_redaction_info, verify_redacted

    entry: dict[str, Any] = {"session_id": row["id"], "user": row["user_name"], "device": row["device"],
                             "ended_at": row["ended_at"] or row["started_at"], "state": None, "detail": None}
    recordings = a.recordings
    try:
        path = recordings.local_path(row["recording"])
    except BrokerError as exc:  # the row names a file outside the recordings directory
        entry.update(state="broken", detail=exc.message)
        return entry
    if not recordings.exists(row["recording"]):
        entry.update(state="skipped", detail="recording file is missing (see: medbroker audit verify)")
        return entry
    if not row["final_hash"] or not row["signature"]:
        entry.update(state="skipped", detail="the recording was never closed or sealed; start the broker once to "
                                             "seal it, then run retention again")
        return entry
    if is_redacted(path):  # an earlier run replaced the file but stopped before recording it
        check = verify_redacted(path, expected_final_hash=row["final_hash"], signature=row["signature"],
                                public_key=a.signing_key.public_key())
        if not check.ok:
            entry.update(state="broken", detail="; ".join(check.problems))
            return entry
        if not dry_run:
            try:
                recordings.rewritten(row["recording"])  # an archived copy still unredacted is replaced
            except BrokerError as exc:
                entry.update(state="broken", detail=exc.message)
                return entry
            a.store.mark_payload_removed(row["id"], read_redaction_info(path)["removed_at"])
        entry.update(state="removed", detail="finished an interrupted earlier run")
        return entry
    size = recordings.size(row["recording"])
    entry["bytes_before"] = size
    if dry_run:
        entry.update(state="would remove", detail=f"{size} bytes")
        return entry
    try:
        result = recordings.remove_payload(row["recording"], private_key=a.signing_key, removed_at=now,
                                           policy_days=days, expected_final_hash=row["final_hash"],
                                           signature=row["signature"])
    except RecordingError as exc:
        entry.update(state="broken", detail=exc.message)
        return entry
    at = utc_iso(now)
    a.store.mark_payload_removed(row["id"], at)
    a.audit.record("retention.applied", actor=actor, user=row["user_name"],
                   device=row["device"], session_id=row["id"], grant_id=row["grant_id"], source="cli",
                   policy_days=days, below_floor=days < FLOOR_DAYS, frames=result.frames,
                   removed_frames=result.removed_frames, removed_bytes=result.removed_bytes,
                   original_bytes=result.original_bytes, original_sha256=result.original_sha256,
                   redacted_bytes=result.redacted_bytes, redacted_sha256=result.redacted_sha256,
                   final_hash=result.final_hash)
    entry.update(state="removed", detail=f"{result.removed_frames} data frames, {result.original_bytes} → "
                                         f"{result.redacted_bytes} bytes", bytes_after=result.redacted_bytes)
    return entry


@app.command("apply")
def apply(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    confirm_below_floor: Annotated[bool, typer.Option(
        "--confirm-below-floor",
        help=f"Required (and audited) when retention.days is below the {FLOOR_DAYS}-day floor, which in turn "
             "needs retention.allow_below_floor = true.")] = False,
    by: Annotated[str | None, typer.Option(
        "--by", metavar="NAME", help="Security or admin user applying it (audited; default: local:<your OS login>).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Remove the terminal data of recordings whose session ended more than retention.days ago.

    Input, output and stderr bytes go; the header, every event (commands run, file transfers with
    sha256, denials, alerts, exit), the hash chain and the signatures stay, and the redacted file is signed,
    so `medbroker audit verify` still passes and notes "payload removed by retention on DATE". Recordings
    that fail verification are kept unchanged as evidence (exit 1). See docs/retention.md.
    """
    a = open_home(ctx)
    days = a.config.retention.days
    below = days < FLOOR_DAYS
    if below and not confirm_below_floor:
        raise UsageError(f"retention.days = {days} is below the {FLOOR_DAYS}-day floor",
                         "retention.allow_below_floor permits it, but every run must say so: "
                         "medbroker retention apply --confirm-below-floor (audited as retention.below_floor)")
    actor = admin_actor(a, by, action="apply retention", roles=RETENTION_ROLES)
    now = a.clock.now()
    cutoff = now - timedelta(days=days)
    rows = a.store.retention_candidates(utc_iso(cutoff))
    if below and not dry_run:
        a.audit.record("retention.below_floor", actor=actor, source="cli", policy_days=days, floor_days=FLOOR_DAYS,
                       cutoff=utc_iso(cutoff), candidates=len(rows))
    results = [_process(a, r, actor=actor, now=now, days=days, dry_run=dry_run) for r in rows]
    broken = [r for r in results if r["state"] == "broken"]
    if as_json:
        emit_json({"policy_days": days, "below_floor": below, "cutoff": utc_iso(cutoff), "dry_run": dry_run,
                   "sessions": results})
    else:
        say(f"Retention {days} days{' (below the floor, confirmed)' if below else ''}: sessions that ended before "
            f"{when(cutoff)}{' (dry run: nothing changed)' if dry_run else ''}.")
        print_table(["session", "user", "device", "ended", "result", "detail"],
                    ([r["session_id"], r["user"], r["device"], when(r["ended_at"]), r["state"], r["detail"]]
                     for r in results), empty="nothing to remove")
    if broken:
        raise BrokerError(f"{len(broken)} recording(s) failed verification and were kept unchanged: "
                          + ", ".join(r["session_id"] for r in broken[:5]) + (" …" if len(broken) > 5 else ""),
                          "keep them as evidence and run: medbroker audit verify")
