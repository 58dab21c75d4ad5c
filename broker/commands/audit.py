"""``medbroker audit verify`` and ``audit log``: the hash-chained audit trail and every recording's integrity."""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.app import App
from broker.audit import EVENTS, parse_details, verify_chain
from broker.commands.common import JSON_HELP, emit_json, open_home, print_table, safe, say, when
from broker.errors import BrokerError, RecordingError, StorageError, UsageError
from broker.session_ops import verify_session

__all__ = ["app", "check_recordings"]

app = typer.Typer(help="The audit trail: verify its integrity, read it.", no_args_is_help=True, rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
_SEALED_EVENTS = ("session.end", "session.sealed")
_FACT_EVENTS = ("session.start",) + _SEALED_EVENTS


class _Chain:
    """What the hash-chained audit rows say about one session (the truth the sessions table must match)."""

    def __init__(self) -> None:
        self.start: dict[str, Any] | None = None
        self.closing: dict[str, Any] | None = None  # the last session.end or session.sealed row
        self.closing_details: dict[str, Any] = {}

    def expected(self, column: str) -> Any:
        """The value the chain recorded for a sessions column (start row first, then the closing row)."""
        for row in (self.start, self.closing):
            if row is not None and row[column] is not None:
                return row[column]
        return None

    @property
    def final_hash(self) -> str | None:
        return self.closing_details.get("final_hash") or None

    @property
    def status(self) -> str | None:
        """The status the closing row implies: sealed → incomplete, session.end → its status (None if unsaid)."""
        if self.closing is None:
            return None
        if self.closing["event"] == "session.sealed":
            return "incomplete"
        status = self.closing_details.get("status")
        return status if isinstance(status, str) else None


def _chain_facts(a: App) -> tuple[dict[str, _Chain], dict[str, str]]:
    """session id → what session.start / session.end / session.sealed rows recorded (the last closing row wins),
    and session id → the first other event naming it (a session refused while starting may have only those)."""
    out: dict[str, _Chain] = {}
    mentioned: dict[str, str] = {}
    for row in a.store.audit_rows():
        if not row["session_id"]:
            continue
        if row["event"] not in _FACT_EVENTS:
            mentioned.setdefault(row["session_id"], row["event"])
            continue
        facts = out.setdefault(row["session_id"], _Chain())
        if row["event"] == "session.start":
            facts.start = row
        else:
            facts.closing, facts.closing_details = row, parse_details(row)
    return out, mentioned


def _differ(entry: dict[str, Any], what: str, expected: Any, found: Any, text: str) -> None:
    """Name one difference between the audit chain and the sessions table or the recording."""
    entry["differences"].append({"what": what, "expected": expected, "found": found})
    entry["problems"].append(text)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # exists, owned by someone else
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def _missing_row_entry(sid: str, facts: _Chain) -> dict[str, Any]:
    name = parse_details(facts.start).get("recording") if facts.start is not None else None
    entry: dict[str, Any] = {"session_id": sid, "status": None, "recording": name, "frames": None,
                             "problems": [], "notes": [], "differences": [], "state": "broken"}
    if facts.start is not None:
        seen = "session.start"
    else:
        assert facts.closing is not None  # a chain with neither has no entry
        seen = facts.closing["event"]
    _differ(entry, "sessions row", "present", "missing",
            f"the sessions row is missing, but the audit chain recorded {seen} for it "
            f"(user {facts.expected('user_name')!r}, device {facts.expected('device')!r})")
    return entry


def _reconcile_row(entry: dict[str, Any], row: dict[str, Any], facts: _Chain | None, live: bool,
                   mentioned: str | None = None) -> None:
    """Compare one sessions row with the audit chain's session.start / session.end / session.sealed rows."""
    if facts is None:  # a running broker inserts the row before session.start, while it connects to the device
        if mentioned and not live:  # refused while starting: the chain names it, but holds no start or end
            entry["notes"].append(f"the audit chain names this session only in {mentioned} rows "
                                  "(no session.start or session.end)")
        elif not live or not _pid_alive(row["broker_pid"]):
            _differ(entry, "audit rows", "session.start or session.end", "none",
                    f"the sessions row (status {row['status']!r}) is unknown to the audit chain: no session.start, "
                    "session.end or session.sealed row names it" + (
                        " (if a broker crashed while connecting, its next start seals the row)" if live else ""))
        return
    for column, label in (("user_name", "user"), ("device", "device"), ("grant_id", "grant")):
        want, got = facts.expected(column), row[column]
        if want is not None and str(want) != str(got):
            _differ(entry, column, want, got,
                    f"{label} is {got!r} in the sessions table, but the audit chain recorded {want!r}")
    name = parse_details(facts.start).get("recording") if facts.start is not None else None
    if name and os.path.basename(str(row["recording"] or "")) != name:
        _differ(entry, "recording", name, os.path.basename(str(row["recording"] or "")),
                f"the sessions row names recording {os.path.basename(str(row['recording'] or ''))!r}, but the "
                f"audit chain recorded {name!r}")
    if facts.closing is not None:
        want = facts.status
        if live:
            _differ(entry, "status", want or "ended", "live",
                    f"status is 'live' in the sessions table, but the audit chain recorded "
                    f"{facts.closing['event']} (status {want or 'ended'!r}) at {facts.closing['at']}")
        elif want is not None and row["status"] != want:
            _differ(entry, "status", want, row["status"],
                    f"status is {row['status']!r} in the sessions table, but the audit chain recorded {want!r}")


def _check_header(a: App, entry: dict[str, Any], row: dict[str, Any], facts: _Chain | None) -> None:
    """The recording's own (hash-protected) header must name this session, its user, device and grant."""
    from sessions.retention import read_any_header

    try:
        header = read_any_header(a.recordings.local_path(row["recording"]))
    except (RecordingError, StorageError, OSError, ValueError):
        return  # verification already names an unreadable file
    sid = row["id"]
    if header.get("session_id") != sid:
        _differ(entry, "recording header session_id", sid, header.get("session_id"),
                f"the recording file holds session {header.get('session_id')!r}, not {sid!r} (files swapped "
                "or replaced)")
        return
    for key, column in (("user", "user_name"), ("device", "device"), ("grant_id", "grant_id")):
        want = facts.expected(column) if facts is not None else None
        want = row[column] if want is None else want
        got = header.get(key)
        if got is not None and want is not None and str(got) != str(want):
            _differ(entry, f"recording header {key}", want, got,
                    f"the recording's header says {key} {got!r}, but the session is recorded as {want!r}")


def check_recordings(a: App) -> list[dict[str, Any]]:
    """Verify every session's recording and reconcile the sessions table with the audit chain.

    Each entry has ``session_id``, ``state``, ``problems`` (human sentences), ``differences`` (``what``,
    ``expected``, ``found``: the audit chain's value against the table's or the recording's) and ``notes``.
    States: ``ok``, ``live`` (still being written by a running broker), ``open`` (live in the table, no end
    in the audit chain, its broker process is gone: the next broker start seals it), ``incomplete`` (sealed
    after a crash, chain intact), ``broken`` (missing, altered, unsigned or not matching the database or the
    audit chain).
    """
    chain, mentioned = _chain_facts(a)
    rows = a.store.list_sessions()
    known = {row["id"] for row in rows}
    results = []
    for row in rows:
        sid, live = row["id"], row["status"] == "live"
        facts = chain.get(sid)
        entry: dict[str, Any] = {"session_id": sid, "status": row["status"], "recording": row["recording"],
                                 "frames": None, "problems": [], "notes": [], "differences": []}
        problems: list[str] = entry["problems"]
        incomplete = False
        logged = facts.final_hash if facts is not None else None
        _reconcile_row(entry, row, facts, live, mentioned.get(sid))
        try:
            present = a.recordings.exists(row["recording"])
        except StorageError as exc:  # the row names a file outside the recordings directory
            present = None
            problems.append(exc.message)
        if present is False:
            _differ(entry, "recording file", "present", "missing", "recording file is missing")
        elif present:
            try:
                if live and logged:  # the chain says it ended: check the file against the hash it recorded
                    res = verify_session(a, {**row, "status": "ended", "final_hash": logged, "signature": None})
                else:
                    res = verify_session(a, row)
            except (RecordingError, StorageError) as exc:  # unreadable file, unknown data key id
                problems.append(exc.message)
            else:
                entry["frames"] = res.frames
                entry["notes"] = list(res.notes) + entry["notes"]
                problems += res.problems
                incomplete = res.incomplete
            _check_header(a, entry, row, facts)
        if not live:
            stored = row["final_hash"]
            if logged and stored != logged:
                _differ(entry, "final_hash", logged, stored,
                        "final hash in the database differs from the one in the audit log"
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
            pid = row["broker_pid"]
            if _pid_alive(pid):
                entry["state"] = "live"
            else:
                entry["state"] = "open"
                entry["notes"].append(f"live in the sessions table, but its broker process ({pid}) is not running "
                                      "here; the next broker start seals the recording")
        else:
            entry["state"] = "incomplete" if incomplete or row["status"] == "incomplete" else "ok"
        results.append(entry)
    for sid, facts in chain.items():
        if sid not in known:
            results.append(_missing_row_entry(sid, facts))
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
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", metavar="FILE", dir_okay=False,
        help="Instead: check an evidence bundle from `medbroker evidence export`, offline (no broker home needed): "
             "only what it holds.")] = None,
    expect_key: Annotated[str | None, typer.Option(
        "--expect-key", metavar="KEY", help="With --bundle: the broker's signing key id (ed25519:…) it must carry.")
    ] = None,
) -> None:
    """Verify the audit chain, its signed checkpoints and every session recording; exit 1 naming what is broken."""
    if bundle is not None:
        from broker.commands.evidence import verify_bundle_file

        if report is not None:
            raise UsageError("--bundle and --report check different files; give one of them",
                             "e.g. medbroker audit verify --bundle FILE")

        verify_bundle_file(bundle, expect_key=expect_key, as_json=as_json)
        return
    if expect_key is not None:
        raise UsageError("--expect-key goes with --bundle FILE", "e.g. medbroker audit verify --bundle FILE "
                                                                  "--expect-key ed25519:0123456789abcdef")
    a = open_home(ctx)
    if report is not None:
        from broker.commands.report import verify_report_file

        verify_report_file(a, report, signature, as_json=as_json)
        return
    chain = verify_chain(a.store, verify_signature=a.verify_signature)
    recordings = check_recordings(a)
    broken = [r for r in recordings if r["state"] == "broken"]
    ok = chain.ok and not broken
    counts = {s: sum(1 for r in recordings if r["state"] == s) for s in ("ok", "live", "open", "incomplete", "broken")}
    differences = [{"session_id": r["session_id"], **d} for r in recordings for d in r["differences"]]
    if as_json:
        emit_json({"ok": ok, "audit": {"ok": chain.ok, "rows": chain.rows, "problems": list(chain.problems),
                                       "last_hash": chain.last_hash},
                   "recordings": recordings, "counts": counts, "differences": differences})
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
                for d in r["differences"]:
                    say(f"  session {safe(r['session_id'])}: {safe(d['what'])}: expected {safe(d['expected'])} "
                        f"(audit chain), found {safe(d['found'])}")
            elif r["state"] != "ok":
                say(f"recording {r['session_id']}: {r['state']}")
            elif r["notes"] and r["notes"][0].startswith("payload removed by retention"):
                say(f"recording {r['session_id']}: ok; {safe(r['notes'][0].split(':')[0])}")
        say(f"recordings: {counts['ok']} ok, {counts['live']} live, {counts['incomplete']} incomplete, "
            f"{counts['broken']} broken" + (f", {counts['open']} open" if counts["open"] else ""))
    if not ok:
        what = []
        if not chain.ok:
            what.append(f"audit chain ({len(chain.problems)} problem(s))")
        if broken:
            what.append(f"{len(broken)} recording(s): {', '.join(safe(r['session_id']) for r in broken[:5])}"
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
