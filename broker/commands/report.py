"""``medbroker report``: signed maintenance reports per device, and the check behind ``audit verify --report``."""

import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.app import App
from broker.commands.common import admin_actor, emit_json, open_home, safe, say, write_output_file
from broker.errors import BrokerError, NotFoundError, UsageError
from broker.report import REPORT_FORMATS, build_report, parse_time_bound, render_report, sign_report, verify_report

__all__ = ["report", "register", "session_verification", "verify_report_file", "REPORT_ROLES"]

REPORT_ROLES = ("approver", "security", "admin")
_MAX_REPORT = 256 << 20


def session_verification(a: App, row: dict[str, Any]) -> dict[str, Any]:
    """A session's recording check for reports: ``state`` (ok, live, incomplete, broken), summary, problems, notes
    (``broker.session_ops.session_verification``, as the console shows it)."""
    from broker.session_ops import session_verification as check

    return {k: v for k, v in check(a, row).items() if k != "result"}


def report(
    ctx: typer.Context,
    start: Annotated[str, typer.Option("--from", metavar="DATE", help="First day (2026-11-01) or a UTC timestamp.")],
    end: Annotated[str, typer.Option("--to", metavar="DATE", help="Last day, included (2026-11-30), or a timestamp.")],
    device: Annotated[str | None, typer.Option("--device", metavar="D", help="Only this device.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="md (Markdown), html (one self-contained page) or json.")
                   ] = "md",
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", metavar="FILE", dir_okay=False,
        help="Write the report here plus its signature FILE.sig (without -o: unsigned, on stdout).")] = None,
    by: Annotated[str | None, typer.Option(
        "--by", metavar="NAME", help="Approver, security or admin user asking for it (audited; default: "
                                     "local:<your OS login>).")] = None,
) -> None:
    """Maintenance report per device: each session with requester and company, approvers, reason and ticket,
    approved window, actual start and end, commands, files moved with sha256, denials and alerts, and
    whether the recording verifies. With -o it is signed by the broker (check: medbroker audit verify --report FILE).
    """
    if fmt not in REPORT_FORMATS:
        raise UsageError(f"format {fmt!r} is not known", f"use one of: {', '.join(REPORT_FORMATS)}")
    a = open_home(ctx)
    now = a.clock.now()
    lo = parse_time_bound(start, now, what="--from")
    hi = parse_time_bound(end, now, what="--to", end=True)
    if device is not None and a.store.get_device(device) is None and not a.store.list_sessions(device=device):
        raise NotFoundError(f"device {device!r} is unknown and has no recorded sessions"[:200],
                            "see: medbroker device list")
    actor = admin_actor(a, by, action="create maintenance reports", roles=REPORT_ROLES)
    doc = build_report(a.store, start=lo, end=hi, device=device, verify=lambda row: session_verification(a, row),
                       generated_at=now, generated_by=actor, display_timezone=a.config.display.timezone)
    data = render_report(doc, fmt).encode("utf-8")
    summary = doc["summary"]
    if output is None or str(output) == "-":
        a.audit.record("report.created", actor=actor, device=device, source="cli", format=fmt, path="-",
                       period=doc["period"], sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                       sessions=summary["sessions"], signed=False)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        typer.echo("medbroker: the report on stdout is not signed; use -o FILE for a signed report", err=True)
        return
    sig = sign_report(data, a.signing_key, file_name=output.name, signed_at=now)
    sig_path = Path(f"{output}.sig")
    write_output_file(output, data)
    write_output_file(sig_path, (json.dumps(sig, indent=1) + "\n").encode())
    a.audit.record("report.created", actor=actor, device=device, source="cli", format=fmt,
                   path=str(output.absolute()), period=doc["period"], sha256=sig["sha256"], bytes=len(data),
                   sessions=summary["sessions"], signed=True, key=sig["key"])
    say(f"Wrote {output} ({summary['sessions']} session(s) on {summary['devices']} device(s), "
        f"{summary['recordings_failing_verification']} recording(s) failing verification) and its signature "
        f"{sig_path}; check with: medbroker audit verify --report {output}")


def verify_report_file(a: App, path: Path, signature: Path | None, *, as_json: bool) -> None:
    """``audit verify --report FILE``: check a report against its signature file and the audit log.

    :raises BrokerError: the signature does not match (exit 1)
    :raises UsageError: unreadable files
    """
    sig_path = signature or Path(f"{path}.sig")
    try:
        if path.stat().st_size > _MAX_REPORT:
            raise UsageError(f"{path} is larger than {_MAX_REPORT >> 20} MiB", "is this a medbroker report?")
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read report {path}: {exc.strerror or exc}", "check the path") from None
    try:
        sig_doc = json.loads(sig_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no signature file {sig_path}",
                         "reports are signed when written with -o FILE; pass --signature SIG if it was moved") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read signature {sig_path}: {exc}", "is this a medbroker report signature?") from None
    check = verify_report(data, sig_doc, a.signing_key.public_key())
    recorded = [r for r in a.store.audit_rows(event="report.created")
                if json.loads(r["details"] or "{}").get("sha256") == check.sha256]
    doc = {"ok": check.ok, "report": str(path), "signature": str(sig_path), "sha256": check.sha256,
           "signed_at": check.signed_at, "problems": list(check.problems),
           "audit_rows": [{"id": r["id"], "at": r["at"], "actor": r["actor"]} for r in recorded]}
    if as_json:
        emit_json(doc)
    elif check.ok:
        where = (f"recorded in the audit log (row {recorded[0]['id']}, by {safe(recorded[0]['actor'])})" if recorded
                 else "not found in this broker's audit log")
        say(f"report {path}: signature ok (sha256 {check.sha256[:16]}…, signed {safe(check.signed_at)}); {where}")
    else:
        say(f"report {path}: BROKEN: {safe('; '.join(check.problems))}")
    if not check.ok:
        raise BrokerError(f"report {path} failed verification: {check.problems[0]}",
                          "this is not the report the broker signed; ask for a fresh copy")


def register(app: typer.Typer) -> None:
    """Add ``report`` to the root app."""
    app.command("report")(report)
