"""``medbroker audit verify`` and ``audit log``: the hash-chained audit trail and every recording's integrity."""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.app import App
from broker.audit import EVENTS, parse_details, verify_chain
from broker.commands.common import JSON_HELP, emit_json, open_home, print_table, safe, say, when
from broker.commands.recordings import verify_session_recording
from broker.errors import BrokerError, RecordingError, StorageError, UsageError

__all__ = ["app", "check_recordings"]

app = typer.Typer(help="The audit trail: verify its integrity, read it.", no_args_is_help=True, rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
_SEALED_EVENTS = ("session.end", "session.sealed")


def _audited_final_hashes(a: App) -> dict[str, str]:
    """session id → the final hash the audit chain recorded at close or seal (the last one wins)."""
    out: dict[str, str] = {}
    for event in _SEALED_EVENTS:
        for row in a.store.audit_rows(event=event):
            if row["event"] != event or not row["session_id"]:
                continue
            final = parse_details(row).get("final_hash")
            if final:
                out[row["session_id"]] = final
    return out


def check_recordings(a: App) -> list[dict[str, Any]]:
    """Verify every session's recording; each entry has ``session_id``, ``state`` and ``problems``.

    States: ``ok``, ``live`` (still being written), ``incomplete`` (sealed after a crash, chain intact),
    ``broken`` (missing, altered, unsigned or not matching the database or the audit chain).
    """
    audited = _audited_final_hashes(a)
    results = []
    for row in a.store.list_sessions():
        sid, live = row["id"], row["status"] == "live"
        entry: dict[str, Any] = {"session_id": sid, "status": row["status"], "recording": row["recording"],
                                 "frames": None, "problems": [], "notes": []}
        problems: list[str] = entry["problems"]
        incomplete = False
        if not os.path.exists(row["recording"]):
            problems.append("recording file is missing")
        else:
            try:
                res = verify_session_recording(a, row)
            except (RecordingError, StorageError) as exc:  # unreadable file, unknown data key id
                problems.append(exc.message)
            else:
                entry["frames"] = res.frames
                entry["notes"] = list(res.notes)
                problems += res.problems
                incomplete = res.incomplete
        if not live:
            stored, logged = row["final_hash"], audited.get(sid)
            if logged and stored != logged:
                problems.append("final hash in the database differs from the one in the audit log"
                                if stored else "the database lost the final hash the audit log recorded")
            if stored and not row["signature"]:
                problems.append("final hash is not signed")
            if stored and not logged:
                entry["notes"].append("the audit log has no final hash for this session")
            if not stored:
                incomplete = True
                entry["notes"].append("no final hash: the recording was never closed or sealed")
        if problems:
            entry["state"] = "broken"
        elif live:
            entry["state"] = "live"
        else:
            entry["state"] = "incomplete" if incomplete or row["status"] == "incomplete" else "ok"
        results.append(entry)
    return results


@app.command("verify")
def verify(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    report: Annotated[Path | None, typer.Option(
        "--report", metavar="FILE", dir_okay=False,
        help="Instead: check a report from `medbroker report -o FILE` against its signature FILE.sig.")] = None,
    signature: Annotated[Path | None, typer.Option(
        "--signature", metavar="SIG", dir_okay=False, help="The report's signature file (default: FILE.sig).")] = None,
) -> None:
    """Verify the audit chain, its signed checkpoints and every session recording; exit 1 naming what is broken."""
    a = open_home(ctx)
    if report is not None:
        from broker.commands.report import verify_report_file

        verify_report_file(a, report, signature, as_json=as_json)
        return
    chain = verify_chain(a.store, verify_signature=a.verify_signature)
    recordings = check_recordings(a)
    broken = [r for r in recordings if r["state"] == "broken"]
    ok = chain.ok and not broken
    counts = {s: sum(1 for r in recordings if r["state"] == s) for s in ("ok", "live", "incomplete", "broken")}
    if as_json:
        emit_json({"ok": ok, "audit": {"ok": chain.ok, "rows": chain.rows, "problems": list(chain.problems),
                                       "last_hash": chain.last_hash},
                   "recordings": recordings, "counts": counts})
    else:
        if chain.ok:
            say(f"audit chain: ok ({chain.rows} rows, last hash {chain.last_hash[:16]}…)")
        else:
            say(f"audit chain: BROKEN ({len(chain.problems)} problem(s) in {chain.rows} rows)")
            for p in chain.problems:
                say(f"  {safe(p)}")
        for r in recordings:
            if r["state"] == "broken":
                say(f"recording {r['session_id']}: BROKEN: {safe('; '.join(r['problems']))}")
            elif r["state"] != "ok":
                say(f"recording {r['session_id']}: {r['state']}")
            elif r["notes"] and r["notes"][0].startswith("payload removed by retention"):
                say(f"recording {r['session_id']}: ok; {safe(r['notes'][0].split(':')[0])}")
        say(f"recordings: {counts['ok']} ok, {counts['live']} live, {counts['incomplete']} incomplete, "
            f"{counts['broken']} broken")
    if not ok:
        what = []
        if not chain.ok:
            what.append(f"audit chain ({len(chain.problems)} problem(s))")
        if broken:
            what.append(f"{len(broken)} recording(s): {', '.join(r['session_id'] for r in broken[:5])}"
                        + (" …" if len(broken) > 5 else ""))
        raise BrokerError("verification failed: " + "; ".join(what),
                          "keep the database and recordings unchanged as evidence and tell the security team")


def _event_doc(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "at": row["at"], "event": row["event"], "actor": row["actor"], "user": row["user_name"],
            "device": row["device"], "session_id": row["session_id"], "grant_id": row["grant_id"],
            "request_id": row["request_id"], "source": row["source"], "details": parse_details(row),
            "hash": row["hash"]}


@app.command("log")
def log(
    ctx: typer.Context,
    event: Annotated[str | None, typer.Option(
        "--event", metavar="E", help="Only this event or area, e.g. grant.revoked or request.")] = None,
    session: Annotated[str | None, typer.Option("--session", metavar="ID", help="Only this session's events.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", metavar="N", min=1, help="Only the newest N events.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show audit events, oldest first."""
    if event is not None and not any(e == event or e.startswith(event + ".") for e in EVENTS):
        raise UsageError(f"event {event!r} is not in the catalogue",
                         "areas: " + ", ".join(sorted({e.split('.')[0] for e in EVENTS})))
    a = open_home(ctx)
    rows = a.store.audit_rows(event=event, session_id=session)
    if limit is not None:
        rows = rows[-limit:]
    docs = [_event_doc(r) for r in rows]
    if as_json:
        emit_json({"events": docs})
        return
    print_table(["id", "at", "event", "actor", "user", "device", "session", "details"],
                ([d["id"], when(d["at"]), d["event"], d["actor"], d["user"], d["device"], d["session_id"],
                  _details(d)] for d in docs), empty="no matching events")


def _details(doc: dict[str, Any]) -> str:
    parts = []
    for key in ("grant_id", "request_id", "source"):
        if doc[key] is not None:
            parts.append(f"{key}={doc[key]}")
    for key, value in doc["details"].items():
        if value is None or value == [] or value == {}:
            continue
        parts.append(f"{key}={value if isinstance(value, (str, int, float)) else json.dumps(value)}")
    text = " ".join(parts)
    return text if len(text) <= 160 else text[:159] + "…"
