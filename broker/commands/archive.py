"""``medbroker archive run``: copy sealed recordings to the [archive] object store (one pass, resumable)."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.commands.common import JSON_HELP, emit_json, open_home, print_table, safe, say

__all__ = ["app", "run"]

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                  help="Recordings in S3-compatible object storage ([archive] in broker.toml, docs/ha.md).")


@app.command("run")
def run(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option("--limit", min=1, metavar="N",
                                              help="Upload at most N recordings this pass.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Archive every sealed recording not archived yet, then remove local copies that are due.

    Each recording is uploaded in parts (archive.part_size), read back and checked against the SHA-256 of the
    local file before its session row says archived; an upload cut off (this command or the object store
    killed) resumes at the next run from the parts already stored. The pass stops at the first failure and
    exits 1. `medbroker serve` runs the same pass every archive.interval.
    """
    from broker.archive import archive_pass

    a = open_home(ctx)
    results = archive_pass(a, limit=limit, source="cli")
    failed = [r for r in results if r.state == "failed"]
    archived = [r for r in results if r.state == "archived"]
    total = sum(r.bytes for r in archived)
    seconds = sum(r.seconds for r in archived)
    if as_json:
        emit_json({"url": a.recordings.objects.url if hasattr(a.recordings, "objects") else None,
                   "archived": len(archived), "failed": len(failed),
                   "local_removed": sum(1 for r in results if r.local_removed),
                   "bytes": total, "seconds": round(seconds, 3),
                   "backlog": a.store.archive_backlog(), "sessions": [r.as_dict() for r in results]})
    else:
        print_table(["session", "result", "bytes", "parts (reused)", "MB/s", "detail"],
                    ([r.session_id, r.state, r.bytes or "-", f"{r.parts} ({r.parts_reused})" if r.parts else "-",
                      f"{r.bytes / r.seconds / 1e6:.1f}" if r.state == "archived" and r.seconds > 0 else "-",
                      safe(r.detail)] for r in results), empty="nothing to archive")
        backlog = a.store.archive_backlog()
        say(f"Archived {len(archived)} recording(s), {total} bytes; {len(failed)} failed; "
            f"{backlog['waiting']} waiting, {backlog['uploading']} upload(s) to resume.")
    if failed:
        raise typer.Exit(1)
