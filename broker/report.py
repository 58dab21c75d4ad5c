"""Maintenance reports per device (who, why, approved by whom, what was done, files, denials, verification),
rendered as Markdown, HTML or JSON and signed with the broker's key (detached ``FILE.sig``)."""

from __future__ import annotations

import hashlib
import html
import json
import contextvars
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.clock import display_zone, local_text, parse_utc, utc_iso
from broker.config import format_duration, parse_duration
from broker.errors import UsageError
from broker.keys import sign_hex, verify_hex
from broker.siem import event_severity
from broker.store import Store

__all__ = ["parse_time_bound", "build_report", "render_report", "sign_report", "verify_report", "ReportCheck",
           "REPORT_FORMATS", "SIGNATURE_FORMAT", "public_key_id"]

REPORT_FORMATS = ("md", "html", "json")
SIGNATURE_FORMAT = "medbroker-report-signature"
_SIG_CONTEXT = b"medbroker report v1\x00"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def parse_time_bound(text: str, now: datetime, *, what: str = "time", end: bool = False) -> datetime:
    """A point in time as a person writes it: ``7d`` (that long before ``now``), ``2026-11-28`` (midnight
    UTC; with ``end=True`` the following midnight, so the day is included) or an ISO-8601 timestamp.

    :raises UsageError: none of these
    """
    text = (text or "").strip()
    if _DATE.fullmatch(text):
        try:
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
            return day + timedelta(days=1) if end else day
        except (ValueError, OverflowError):
            raise UsageError(f"{what} {text!r} is not a valid date", "e.g. 2026-11-28") from None
    if text and text[-1] in "smhd" and text[:-1].isascii() and text[:-1].strip().isdigit():
        return now - timedelta(seconds=parse_duration(text, what=what))
    try:
        if not text.isascii() or "T" not in text.upper():
            raise ValueError
        return parse_utc(text.upper())
    except (ValueError, OverflowError):
        raise UsageError(f"{what} {text!r} is not a date, a timestamp or a duration",
                         "e.g. 2026-11-28, 2026-11-28T14:00:00Z or 7d") from None


# ----------------------------------------------------------------------------- building
def _is_flagged(event: str) -> bool:
    """Denials, refusals, alerts, kills and revocations: what a report lists under "denials and alerts"."""
    return event_severity(event) <= 4


def _details(row: dict[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(row.get("details") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event_doc(row: dict[str, Any]) -> dict[str, Any]:
    return {"at": row["at"], "event": row["event"], "actor": row["actor"], "user": row["user_name"],
            "audit_id": row["id"], "details": _details(row)}


def _session_doc(store: Store, row: dict[str, Any], verify: Callable[[dict[str, Any]], dict[str, Any]]
                 ) -> dict[str, Any]:
    sid = row["id"]
    grant = store.get_grant(row["grant_id"]) or {}
    request = store.get_request(grant["request_id"]) if grant.get("request_id") else None
    request = request or {}
    user = store.get_user(row["user_name"]) or {}
    approvals = store.approvals(request["id"]) if request.get("id") else []
    approvers = [{"name": a["approver"], "at": a["at"], "window_s": a.get("duration_s") or request.get("duration_s")}
                 for a in approvals]
    if not approvers and grant.get("approved_by"):
        approvers = [{"name": n, "at": None} for n in grant["approved_by"].split(",") if n]
    started = parse_utc(row["started_at"])
    commands = [{"offset": round(float(c["offset"]), 3), "at": utc_iso(started + timedelta(seconds=float(c["offset"]))),
                 "command": c["command"], "source": c["source"]} for c in store.session_commands(sid)]
    files = [{"at": t["at"], "direction": t["direction"], "path": t["path"], "bytes": t["bytes"], "sha256": t["sha256"],
              "outcome": t["outcome"], **_partial(t)} for t in store.transfers(sid)]
    flagged = [_event_doc(e) for e in store.audit_rows(session_id=sid) if _is_flagged(e["event"])]
    forwards = forward_summary(store.forwards(sid))
    return {
        "id": sid,
        "requester": {"name": row["user_name"], "company": user.get("company")},
        "request_id": request.get("id"), "reason": request.get("reason"), "ticket": request.get("ticket"),
        "requested_at": request.get("created_at"),
        "approvers": approvers,
        "grant_id": row["grant_id"],
        "window": {"from": grant.get("starts_at"), "to": grant.get("ends_at")},
        "revoked": ({"at": grant["revoked_at"], "by": grant.get("revoked_by"), "reason": grant.get("revoke_reason")}
                    if grant.get("revoked_at") else None),
        "source": row["source"], "started_at": row["started_at"], "ended_at": row["ended_at"],
        "status": row["status"], "end_reason": row["end_reason"],
        "containment": row.get("containment"), "shell": grant.get("shell"), "mode": grant.get("mode"),
        "bytes_in": row["bytes_in"], "bytes_out": row["bytes_out"],
        "payload_removed_at": row.get("payload_removed_at"),
        "commands": commands, "files": files, "forwards": forwards, "denials_and_alerts": flagged,
        "verification": verify(row),
    }


def forward_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Forwarded connections of one session per port (issue 14): connections, bytes each way, TLS or plain."""
    ports: dict[int, dict[str, Any]] = {}
    for r in rows:
        p = ports.setdefault(r["port"], {"port": r["port"], "connections": 0, "bytes_to_device": 0,
                                         "bytes_to_vendor": 0, "tls": False, "first_at": r["opened_at"]})
        p["connections"] += 1
        p["bytes_to_device"] += r["bytes_to_device"] or 0
        p["bytes_to_vendor"] += r["bytes_to_vendor"] or 0
        p["tls"] = p["tls"] or bool(r["tls"])
    return list(ports.values())


def _forward_line(f: dict[str, Any]) -> str:
    return (f"port {f['port']}: {f['connections']} connection(s), {f['bytes_to_device']} bytes to the device, "
            f"{f['bytes_to_vendor']} bytes to the vendor, " + ("TLS (sizes only)" if f["tls"] else "plain text recorded"))


def _partial(t: dict[str, Any]) -> dict[str, Any]:
    """A resumed (reget/reput) or scattered transfer: what its sha256 covers, said plainly."""
    try:
        details = json.loads(t.get("details") or "{}")
    except ValueError:
        return {}
    return {"partial": True, "covers": details.get("covers")} if details.get("partial") else {}


def _containment_doc(info: dict[str, Any]) -> dict[str, Any] | None:
    """The device's last containment check: state, when, which protected paths its login could read."""
    if not info:
        return None
    details = _details({"details": info.get("containment_details")})
    return {"state": info.get("containment") or "unknown", "checked_at": info.get("containment_checked_at"),
            "exposed_paths": [p.get("path") for p in details.get("paths", [])
                              if isinstance(p, dict) and p.get("status") in ("readable", "readable-by-name")]}


def _containment_line(c: dict[str, Any] | None) -> str:
    if not c:
        return "Containment: unknown."
    when = f" (checked {_when(c['checked_at'])})" if c.get("checked_at") else " (never checked)"
    if c["state"] == "exposed":
        return (f"Containment: EXPOSED{when}: the device login can read {', '.join(c['exposed_paths'])}; "
                "`medbroker device check` says how to fix it.")
    return f"Containment: {c['state']}{when}."


def build_report(store: Store, *, start: datetime, end: datetime, device: str | None,
                 verify: Callable[[dict[str, Any]], dict[str, Any]], generated_at: datetime,
                 generated_by: str, display_timezone: str = "") -> dict[str, Any]:
    """Collect the maintenance report for sessions that started in ``[start, end)``.

    :param device: one device, or None for every registered device and every device with sessions
    :param verify: session row → ``{"state", "summary", "problems", "notes"}`` (the CLI verifies recordings)
    :param display_timezone: the zone Markdown and HTML show times in (``[display] timezone``; "" = the
        host's); JSON keeps UTC
    :raises UsageError: ``end`` is not after ``start``
    """
    if end <= start:
        raise UsageError(f"the period is empty: --to ({utc_iso(end)}) must be after --from ({utc_iso(start)})",
                         "e.g. --from 2026-11-01 --to 2026-11-30 (both days included)")
    lo, hi = utc_iso(start), utc_iso(end)
    rows = [r for r in store.list_sessions(device=device, since=lo) if r["started_at"] < hi]
    names = [device] if device else sorted({d["name"] for d in store.list_devices()} | {r["device"] for r in rows})
    devices: list[dict[str, Any]] = []
    for name in names:
        info = store.get_device(name) or {}
        sessions = [_session_doc(store, r, verify) for r in rows if r["device"] == name]
        outside = [_event_doc(e) for e in reversed(store.search_audit(device=name, since=lo, until=hi, limit=100_000))
                   if e["session_id"] is None and _is_flagged(e["event"])]
        devices.append({"name": name, "registered": bool(info), "host": info.get("host"),
                        "class": info.get("device_class"), "description": info.get("description"),
                        "containment": _containment_doc(info),
                        "sessions": sessions, "refusals_outside_sessions": outside})
    all_sessions = [s for d in devices for s in d["sessions"]]
    summary = {
        "devices": len(devices), "sessions": len(all_sessions),
        "commands": sum(len(s["commands"]) for s in all_sessions),
        "files": sum(len(s["files"]) for s in all_sessions),
        "denials_and_alerts": sum(len(s["denials_and_alerts"]) for s in all_sessions)
        + sum(len(d["refusals_outside_sessions"]) for d in devices),
        "recordings_failing_verification": sum(1 for s in all_sessions if s["verification"]["state"] == "broken"),
    }
    return {"format": "medbroker-maintenance-report", "version": 1, "generated_at": utc_iso(generated_at),
            "generated_by": generated_by, "display_timezone": display_timezone,
            "period": {"from": lo, "to": hi}, "device_filter": device,
            "summary": summary, "devices": devices}


# ----------------------------------------------------------------------------- rendering
def _plain(value: Any) -> str:
    if value is None:
        return "-"
    return _CONTROLS.sub("?", str(value))


def _md(value: Any) -> str:
    """Text for a Markdown table cell or list item: no line breaks, pipes and markup escaped."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", _plain(value))


_ZONE: contextvars.ContextVar[Any] = contextvars.ContextVar("report_zone", default=None)


def _when(value: str | None) -> str:
    """A time in the report's display zone (``display_timezone`` of the document)."""
    return "-" if not value else local_text(value, _ZONE.get())


def _period(p: dict[str, str]) -> str:
    """``FROM to TO`` with the exclusive end shown as the last second included."""
    last = utc_iso(parse_utc(p["to"]) - timedelta(seconds=1))
    return f"{_when(p['from'])} to {_when(last)}"


def _approvers(s: dict[str, Any]) -> str:
    def one(a: dict[str, Any]) -> str:
        bits = [_when(a["at"])] if a["at"] else []
        if a.get("window_s"):
            bits.append(f"window {format_duration(a['window_s'])}")
        return a["name"] + (f" ({', '.join(bits)})" if bits else "")

    return ", ".join(one(a) for a in s["approvers"]) or "-"


def _session_containment(x: dict[str, Any]) -> str:
    state = x.get("containment") or "not recorded"
    return state.replace("exposed", "EXPOSED") + (" · files only" if x.get("shell") == "files-only" else "")


def _event_line(e: dict[str, Any]) -> str:
    bits = [f"{k}={v}" for k, v in e["details"].items() if v not in (None, "", [], {})]
    return f"{_when(e['at'])} {e['event']}" + (f" ({e['user']})" if e["user"] else "") + (
        ": " + "; ".join(bits) if bits else "")


def _render_md(doc: dict[str, Any]) -> str:
    p, s = doc["period"], doc["summary"]
    out = [f"# Maintenance report {_period(p)}", "",
           f"Generated {_when(doc['generated_at'])} by {_md(doc['generated_by'])}"
           + (f" for device {_md(doc['device_filter'])}" if doc["device_filter"] else "") + ". "
           "Signed by the broker: check with `medbroker audit verify --report FILE`.", "",
           f"{s['devices']} device(s), {s['sessions']} session(s), {s['commands']} command(s), {s['files']} file "
           f"transfer(s), {s['denials_and_alerts']} denial(s) and alert(s), {s['recordings_failing_verification']} "
           "recording(s) failing verification.", ""]
    for d in doc["devices"]:
        out += [f"## Device {_md(d['name'])}", ""]
        if not d["registered"]:
            out += ["(no longer registered)", ""]
        elif d["description"]:
            out += [_md(d["description"]), ""]
        if d["registered"]:
            out += [_md(_containment_line(d.get("containment"))).replace("\\`", "`"), ""]
        if not d["sessions"]:
            out += ["No maintenance sessions in this period.", ""]
        for x in d["sessions"]:
            out += [f"### Session {_md(x['id'])}", "", "| field | value |", "|---|---|"]
            rows = [("requester", f"{x['requester']['name']} ({x['requester']['company'] or 'no company'})"),
                    ("approver(s)", _approvers(x)), ("reason", x["reason"]), ("ticket", x["ticket"]),
                    ("request / grant", f"#{x['request_id']} / #{x['grant_id']}"),
                    ("approved window", f"{_when(x['window']['from'])} to {_when(x['window']['to'])}"),
                    ("actual start", _when(x["started_at"])), ("actual end", _when(x["ended_at"])),
                    ("outcome", f"{x['status']}: {_plain(x['end_reason'])}"),
                    ("bytes in / out", f"{x['bytes_in']} / {x['bytes_out']}"), ("source", x["source"]),
                    ("containment at start", _session_containment(x)),
                    ("recording", x["verification"]["summary"])]
            if x["revoked"]:
                rows.append(("revoked", f"{_when(x['revoked']['at'])} by {x['revoked']['by']}: "
                                        f"{_plain(x['revoked']['reason'])}"))
            if x["payload_removed_at"]:
                rows.append(("retention", f"terminal content removed {_when(x['payload_removed_at'])}"))
            out += [f"| {k} | {_md(v)} |" for k, v in rows] + [""]
            out += ["Commands:", ""] + ([f"- `{_when(c['at'])}` {_md(c['command'])}" for c in x["commands"]]
                                        or ["- none recorded"]) + [""]
            if x["files"]:
                out += ["Files moved:", "", "| at | direction | path | bytes | sha256 | outcome |",
                        "|---|---|---|---|---|---|"]
                out += [f"| {_when(f['at'])} | {_md(f['direction'])} | {_md(f['path'])} | {f['bytes']} | "
                        f"{_md(f['sha256'])}{' (partial: ' + _md(f['covers']) + ')' if f.get('partial') else ''} | "
                        f"{_md(f['outcome'])} |" for f in x["files"]]
            else:
                out += ["Files moved: none."]
            if x.get("forwards"):
                out += ["", "Port forwards:", ""] + [f"- {_md(_forward_line(f))}" for f in x["forwards"]]
            out += [""] + (["Denials and alerts:", ""] + [f"- {_md(_event_line(e))}" for e in x["denials_and_alerts"]]
                           if x["denials_and_alerts"] else ["Denials and alerts: none."]) + [""]
        if d["refusals_outside_sessions"]:
            out += ["### Refusals outside sessions", ""]
            out += [f"- {_md(_event_line(e))}" for e in d["refusals_outside_sessions"]] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


_CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#111;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #bbb;padding:.25em .5em;"
        "text-align:left;vertical-align:top}th{background:#eee}code{font-family:ui-monospace,monospace}"
        ".broken{color:#a00;font-weight:bold}h2{border-bottom:2px solid #333;margin-top:2em}"
        "@media print{body{margin:0}}")


def _h(value: Any) -> str:
    return html.escape(_plain(value), quote=True)


def _render_html(doc: dict[str, Any]) -> str:
    p, s = doc["period"], doc["summary"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">',
           f"<title>Maintenance report {_h(_period(p))}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>Maintenance report {_h(_period(p))}</h1>",
           f"<p>Generated {_h(_when(doc['generated_at']))} by {_h(doc['generated_by'])}"
           + (f" for device {_h(doc['device_filter'])}" if doc["device_filter"] else "")
           + ". Signed by the broker: check with <code>medbroker audit verify --report FILE</code>.</p>",
           f"<p>{s['devices']} device(s), {s['sessions']} session(s), {s['commands']} command(s), {s['files']} file "
           f"transfer(s), {s['denials_and_alerts']} denial(s) and alert(s), "
           f"{s['recordings_failing_verification']} recording(s) failing verification.</p>"]
    for d in doc["devices"]:
        out.append(f"<h2>Device {_h(d['name'])}</h2>")
        if not d["registered"]:
            out.append("<p>(no longer registered)</p>")
        elif d["description"]:
            out.append(f"<p>{_h(d['description'])}</p>")
        if d["registered"]:
            out.append(f"<p>{_h(_containment_line(d.get('containment')))}</p>")
        if not d["sessions"]:
            out.append("<p>No maintenance sessions in this period.</p>")
        for x in d["sessions"]:
            ver = x["verification"]
            rows = [("Requester", f"{x['requester']['name']} ({x['requester']['company'] or 'no company'})"),
                    ("Approver(s)", _approvers(x)), ("Reason", x["reason"]), ("Ticket", x["ticket"]),
                    ("Request / grant", f"#{x['request_id']} / #{x['grant_id']}"),
                    ("Approved window", f"{_when(x['window']['from'])} to {_when(x['window']['to'])}"),
                    ("Actual start", _when(x["started_at"])), ("Actual end", _when(x["ended_at"])),
                    ("Outcome", f"{x['status']}: {_plain(x['end_reason'])}"),
                    ("Bytes in / out", f"{x['bytes_in']} / {x['bytes_out']}"), ("Source", x["source"]),
                    ("Containment at start", _session_containment(x))]
            if x["revoked"]:
                rows.append(("Revoked", f"{_when(x['revoked']['at'])} by {x['revoked']['by']}: "
                                        f"{_plain(x['revoked']['reason'])}"))
            if x["payload_removed_at"]:
                rows.append(("Retention", f"terminal content removed {_when(x['payload_removed_at'])}"))
            cls = ' class="broken"' if ver["state"] == "broken" else ""
            out.append(f"<h3>Session {_h(x['id'])}</h3><table>"
                       + "".join(f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in rows)
                       + f"<tr><th>Recording</th><td{cls}>{_h(ver['summary'])}</td></tr></table>")
            out.append("<h4>Commands</h4>" + ("<table><tr><th>at</th><th>command</th></tr>" + "".join(
                f"<tr><td>{_h(_when(c['at']))}</td><td><code>{_h(c['command'])}</code></td></tr>"
                for c in x["commands"]) + "</table>" if x["commands"] else "<p>None recorded.</p>"))
            out.append("<h4>Files moved</h4>" + ("<table><tr><th>at</th><th>direction</th><th>path</th><th>bytes</th>"
                       "<th>sha256</th><th>outcome</th></tr>" + "".join(
                f"<tr><td>{_h(_when(f['at']))}</td><td>{_h(f['direction'])}</td><td><code>{_h(f['path'])}</code></td>"
                f"<td>{_h(f['bytes'])}</td><td><code>{_h(f['sha256'])}</code>"
                f"{'<br>partial: ' + _h(f['covers']) if f.get('partial') else ''}</td><td>{_h(f['outcome'])}</td></tr>"
                for f in x["files"]) + "</table>" if x["files"] else "<p>None.</p>"))
            if x.get("forwards"):
                out.append("<h4>Port forwards</h4><ul>" + "".join(f"<li>{_h(_forward_line(f))}</li>"
                                                                  for f in x["forwards"]) + "</ul>")
            out.append("<h4>Denials and alerts</h4>" + ("<ul>" + "".join(
                f"<li>{_h(_event_line(e))}</li>" for e in x["denials_and_alerts"]) + "</ul>"
                if x["denials_and_alerts"] else "<p>None.</p>"))
        if d["refusals_outside_sessions"]:
            out.append("<h3>Refusals outside sessions</h3><ul>" + "".join(
                f"<li>{_h(_event_line(e))}</li>" for e in d["refusals_outside_sessions"]) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_report(doc: dict[str, Any], fmt: str) -> str:
    """The report as ``md``, ``html`` or ``json`` text.

    :raises UsageError: unknown format
    """
    if fmt == "json":
        return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"
    if fmt in ("md", "html"):
        try:
            zone = display_zone(doc.get("display_timezone") or "")
        except ValueError:
            zone = None
        token = _ZONE.set(zone)
        try:
            return _render_md(doc) if fmt == "md" else _render_html(doc)
        finally:
            _ZONE.reset(token)
    raise UsageError(f"report format {fmt!r} is not known", f"use one of: {', '.join(REPORT_FORMATS)}")


# ----------------------------------------------------------------------------- signing
def public_key_id(public: Ed25519PublicKey) -> str:
    """``ed25519:<sha256 of the raw public key, first 16 hex digits>``: names the key that signed."""
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def sign_report(data: bytes, key: Ed25519PrivateKey, *, file_name: str, signed_at: datetime) -> dict[str, Any]:
    """The detached signature document (``FILE.sig``) of a report's exact bytes.

    Signed message: ``b"medbroker report v1\\0" ‖ sha256(file bytes)``.
    """
    digest = hashlib.sha256(data).digest()
    return {"format": SIGNATURE_FORMAT, "version": 1, "file": file_name, "bytes": len(data), "sha256": digest.hex(),
            "signed_at": utc_iso(signed_at), "key": public_key_id(key.public_key()),
            "signature": sign_hex(key, _SIG_CONTEXT + digest)}


@dataclass(frozen=True)
class ReportCheck:
    """Outcome of :func:`verify_report`."""

    ok: bool
    sha256: str
    problems: tuple[str, ...]
    signed_at: str | None = None


def verify_report(data: bytes, signature_doc: Any, public: Ed25519PublicKey) -> ReportCheck:
    """Check a report's bytes against its signature document; never raises on bad input."""
    digest = hashlib.sha256(data).digest()
    problems: list[str] = []
    if not isinstance(signature_doc, dict) or signature_doc.get("format") != SIGNATURE_FORMAT:
        return ReportCheck(False, digest.hex(), ("the signature file is not a medbroker report signature",))
    if signature_doc.get("version") != 1:
        problems.append(f"unsupported signature version {signature_doc.get('version')!r}")
    if signature_doc.get("sha256") != digest.hex():
        problems.append("the report's sha256 differs from the signed one (the file was changed)")
    if signature_doc.get("key") != public_key_id(public):
        problems.append(f"signed with another key ({signature_doc.get('key')!r}), not this broker's "
                        f"({public_key_id(public)})")
    signature = signature_doc.get("signature")
    if not isinstance(signature, str) or not verify_hex(public, _SIG_CONTEXT + digest, signature):
        problems.append("signature invalid")
    signed_at = signature_doc.get("signed_at") if isinstance(signature_doc.get("signed_at"), str) else None
    return ReportCheck(not problems, digest.hex(), tuple(problems), signed_at)
