"""Commands people run over SSH against the broker itself: ``ssh -p 2222 alice@broker request …``.

Pure: takes a principal and argv, returns exit status and output text. The SSH server runs it on
the store thread and writes the result to the channel.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass
from typing import NoReturn

from broker.app import App
from broker.clock import clock_text, display_zone, utc_iso
from broker.config import escape_unsafe, format_duration, parse_duration, parse_id
from broker.devices import list_devices
from broker.errors import BrokerError, UsageError
from broker.forwards import forwards_text
from broker.grants import (approval_card, approvals_text, approve_request, deny_request, expire_requests, list_grants,
                           list_requests, putty_line, request_grant)
from broker.identity import Principal, get_principal
from broker.sshconfig import build_ssh_config, render_openssh, render_putty
from broker.access_links import issue_signin_link

__all__ = ["Reply", "run_command", "split_command", "HELP"]

HELP = """\
medbroker over SSH. Commands:
  (no command)                       what you may do: your grants, pending requests, devices
  request DEVICE --for 2h --reason TEXT [--ticket REF] [--forward PORT] [--mode read-only]
                                     --forward 443 (repeatable): a port on the device to reach
                                     with ssh -L 8443:DEVICE:443 USER@DEVICE@BROKER during the window
                                     the reason runs to the next option or the end of the
                                     line, as typed: no quotes needed, apostrophes welcome
  approve ID [--for DURATION] [--allow-shell] [--strike PORT]
                                     approvers: approve a request (optionally a shorter window; the
                                     shortest any approver chose applies); --allow-shell lets a
                                     read-only/upload-only grant open a shell (else files only);
                                     --strike 8080 (repeatable) leaves a requested forward out
  deny ID [--reason TEXT]            approvers: deny a request
  requests                           pending requests (approvers see everyone's)
  grants                             your grants (approvers and security see all)
  web                                a one-time sign-in link for the web console
  ssh-config [--putty]               Host blocks for ~/.ssh/config (direct and ProxyJump) and the host
                                     keys to pin; --putty: a PuTTY session file with plink lines
  help                               this text
Add --json to any command for machine-readable output.
Open a device session with: ssh -p PORT USER@DEVICE@BROKER
PuTTY: plink -P PORT in place of ssh -p PORT (files: psftp -P PORT, pscp -P PORT, WinSCP); in the PuTTY
window, Host Name USER@DEVICE@BROKER and Port PORT
"""


@dataclass(frozen=True)
class Reply:
    """What the channel prints and its exit status."""

    status: int
    stdout: str = ""
    stderr: str = ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # never print or exit from inside the server
        raise UsageError(message, "run: help")


def _request_id(text: str) -> int:
    try:
        return parse_id(text, what="request id")
    except UsageError as exc:  # argparse turns ArgumentTypeError into error() → UsageError with this text
        raise argparse.ArgumentTypeError(exc.message) from None


def _parser() -> _Parser:
    p = _Parser(prog="", add_help=False)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("request", add_help=False)
    r.add_argument("device")
    r.add_argument("--for", dest="duration", required=True)
    # ssh joins its arguments with spaces, so `--reason "tube replacement"` typed at a shell arrives as
    # two words: take every word up to the next option.
    r.add_argument("--reason", required=True, nargs="+")
    r.add_argument("--ticket")
    r.add_argument("--forward", action="append", default=[])
    r.add_argument("--mode", default="normal")
    r.add_argument("--json", action="store_true")
    a = sub.add_parser("approve", add_help=False)
    a.add_argument("id", type=_request_id)
    a.add_argument("--for", dest="duration")
    a.add_argument("--allow-shell", action="store_true")
    a.add_argument("--strike", action="append", default=[])
    a.add_argument("--json", action="store_true")
    d = sub.add_parser("deny", add_help=False)
    d.add_argument("id", type=_request_id)
    d.add_argument("--reason", nargs="+")
    d.add_argument("--json", action="store_true")
    c = sub.add_parser("ssh-config", add_help=False)
    c.add_argument("--putty", action="store_true")
    c.add_argument("--json", action="store_true")
    for name in ("requests", "grants", "status", "help", "web"):
        s = sub.add_parser(name, add_help=False)
        s.add_argument("--json", action="store_true")
    return p


_OPTIONS = ("for", "reason", "ticket", "forward", "mode", "json", "allow-shell", "strike", "user", "putty")
_REASON = re.compile(r"(?:^|(?<=\s))--reason(?:=|(?=\s)|$)")
_NEXT_OPTION = re.compile(r"(?:^|\s)--(?:" + "|".join(re.escape(o) for o in _OPTIONS) + r")(?==|\s|$)")


def split_command(command: str) -> list[str]:
    """Split a self-service command line into words; the text after ``--reason`` is taken as it arrived.

    ssh (and plink) join their arguments with spaces, so ``--reason "customer's scanner won't boot"`` typed
    at the vendor's shell arrives as ``--reason customer's scanner won't boot``: shell quoting rules would
    fail on one apostrophe and silently eat two. The reason runs to the next option (``--for``, ``--ticket``,
    …) or the end; one pair of quotes around all of it is removed. Everything else is split like a shell.

    :raises ValueError: unbalanced quotes outside the reason
    """
    match = _REASON.search(command)
    if match is None:
        return shlex.split(command)
    rest = command[match.end():]
    if rest.startswith("="):
        rest = rest[1:]
    end = _NEXT_OPTION.search(rest)
    reason, tail = (rest[:end.start()], rest[end.start():]) if end else (rest, "")
    reason = reason.strip()
    if len(reason) >= 2 and reason[0] == reason[-1] and reason[0] in "'\"" and reason[0] not in reason[1:-1]:
        reason = reason[1:-1].strip()
    return shlex.split(command[:match.start()]) + ["--reason"] + ([reason] if reason else []) + split_command(tail)


def _not_a_command(app: App, principal: Principal, word: str, port: int, host: str) -> Reply:
    """``ssh alice@broker ls``: a device command sent to the broker itself. Say how to reach a device."""
    staff = principal.role in ("approver", "security", "admin")
    devices = [d.name for d in list_devices(app.store)] if staff else app.store.granted_devices(principal.name)
    example = devices[0] if devices else "DEVICE"
    shown = escape_unsafe(word[:40])
    text = (f"error: '{shown}' is not a medbroker command. To run it on a device, log in as "
            f"{principal.name}@DEVICE: ssh -p {port} {principal.name}@{example}@{host} {shown}\n"
            f"PuTTY: plink -P {port} {principal.name}@{example}@{host} {shown}\n")
    if devices:
        text += f"{'devices' if staff else 'your devices'}: {', '.join(devices)}\n"
    text += (f"medbroker's own commands: ssh -p {port} {principal.name}@{host} help\n"
             f"PuTTY: plink -P {port} {principal.name}@{host} help\n")
    return Reply(2, stderr=text)


def run_command(app: App, principal: Principal, command: str | None, *, source: str | None = None,
                port: int = 2222) -> Reply:
    """Run one broker command for ``principal``.

    :param command: the SSH exec string, or None for an interactive login (status summary)
    :returns: a :class:`Reply`; errors become exit 1 (refused) or 2 (usage) with a message and hint
    """
    now = app.clock.now()
    host = app.config.listen.public_host
    if command and len(command) > 4096:
        return Reply(2, stderr="error: command too long\n")
    try:
        argv = split_command(command) if command else ["status"]
    except ValueError as exc:
        return Reply(2, stderr=f"error: cannot parse the command: {exc}\n"
                               "hint: put --reason last; its text needs no quotes, apostrophes included "
                               f"(ssh -p {port} USER@{host} request DEVICE --for 2h --reason customer's scanner "
                               "won't boot); quote other values with double quotes (plink: the same)\n")
    if len(argv) > 64:
        return Reply(2, stderr="error: command too long\n")
    try:
        args = _parser().parse_args(argv)
        principal = get_principal(app.store, principal.name)  # re-read: disabled since login?
        expire_requests(app.store, app.audit, now)
        if args.cmd in (None, "help"):
            return Reply(0, _help_text(port, host))
        if args.cmd == "request":
            req = request_grant(app.store, app.audit, app.rules, principal, args.device,
                                parse_duration(args.duration, what="--for"), " ".join(args.reason), now,
                                ticket=args.ticket,
                                forwards=tuple(args.forward), mode=args.mode, source=source)
            if args.json:
                return Reply(0, json.dumps(req.as_dict()) + "\n")
            return Reply(0, f"Request {req.id} created: {req.user} -> {req.device} for "
                            f"{format_duration(req.duration_s)} (pending).\n"
                            f"An approver decides it with: ssh -p {port} APPROVER@{host} approve {req.id}\n"
                            f"Then connect with: ssh -p {port} {req.user}@{req.device}@{host}\n"
                            f"{putty_line(f'ssh -p {port} {req.user}@{req.device}@{host}')}\n")
        if args.cmd == "approve":
            dur = parse_duration(args.duration, what="--for") if args.duration else None
            dec = approve_request(app.store, app.audit, app.rules, args.id, principal, now, duration_s=dur,
                                  allow_shell=args.allow_shell, strike=tuple(args.strike))
            card = approval_card(app.store, app.rules, dec.request)
            if args.json:
                return Reply(0, json.dumps({"request": dec.request.as_dict(),
                                            "grant": dec.grant.as_dict(now) if dec.grant else None,
                                            "approvals_needed": dec.approvals_needed, "card": card}) + "\n")
            notes = "".join(f"  ! {n}\n" for n in card["notes"])
            if dec.grant is None:
                why = "exposed device" if card["containment"] == "exposed" else "critical device"
                return Reply(0, f"Approval recorded for request {args.id} ({approvals_text(dec.request)}); "
                                f"{dec.approvals_needed} more approver(s) needed ({why}).\n" + notes)
            files = " Files only (sftp and scp): no shell or commands." if dec.grant.shell == "files-only" else ""
            fwd = f" Port forwards: {forwards_text(dec.grant.forwards)}." if dec.request.forwards else ""
            return Reply(0, f"Request {args.id} approved: grant {dec.grant.id} lets {dec.grant.user} on "
                            f"{dec.grant.device} until {utc_iso(dec.grant.ends_at)} (approved by "
                            f"{approvals_text(dec.request)}).{files}{fwd}\n" + notes)
        if args.cmd == "deny":
            req = deny_request(app.store, app.audit, args.id, principal, now,
                               " ".join(args.reason) if args.reason else None)
            if args.json:
                return Reply(0, json.dumps(req.as_dict()) + "\n")
            return Reply(0, f"Request {args.id} denied.\n")
        if args.cmd == "ssh-config":  # the caller's own name filled in (broker/sshconfig.py)
            config = build_ssh_config(app, principal.name, port=port)
            if args.json:
                return Reply(0, json.dumps(config.as_dict()) + "\n")
            return Reply(0, render_putty(config) if args.putty else render_openssh(config))
        if args.cmd == "web":
            link = issue_signin_link(app.store, app.audit, app.config, principal.name, now, source=source)
            if args.json:
                return Reply(0, json.dumps({"url": link.url, "expires_at": utc_iso(link.expires_at)}) + "\n")
            left = format_duration((link.expires_at - now).total_seconds())
            return Reply(0, f"Web console sign-in for {principal.name} ({principal.role}); it works once, for "
                            f"{left} (until {clock_text(link.expires_at, display_zone(app.config.display.timezone))}):\n  {link.url}\n"
                            "Do not forward it: whoever opens it first is signed in as you.\n")
        return _status(app, principal, args.cmd, args.json, now, port)
    except BrokerError as exc:
        if isinstance(exc, UsageError) and exc.message.startswith("argument cmd: invalid choice") \
                and argv and not argv[0].startswith("-"):  # not one of the broker's own commands: meant for a device
            return _not_a_command(app, principal, argv[0], port, host)
        status = 2 if isinstance(exc, UsageError) else 1
        text = f"error: {exc.message}\n" + (f"hint: {exc.hint}\n" if exc.hint else "")
        return Reply(status, stderr=text)


def _help_text(port: int, host: str) -> str:
    """HELP with this broker's port and host name in the connection instructions only (a ``PORT`` in an
    option such as ``--forward`` names a port on the device and stays as it is)."""
    text = re.sub(r"(?<=-p |-P )PORT|(?<=Port )PORT", str(port), HELP)
    return text.replace("BROKER", host)


def _status(app: App, principal: Principal, cmd: str, as_json: bool, now, port: int) -> Reply:
    staff = principal.role in ("approver", "security", "admin")
    grants = [g for g in list_grants(app.store, user=None if staff else principal.name)
              if g.state(now) == "active"]
    pending = list_requests(app.store, status="pending", user=None if principal.role in ("approver", "admin")
                            else principal.name)
    devices = [d.name for d in list_devices(app.store)]
    cards = {r.id: approval_card(app.store, app.rules, r) for r in pending}
    data = {"user": principal.name, "role": principal.role,
            "active_grants": [g.as_dict(now) for g in grants],
            "pending_requests": [r.as_dict() | {"card": cards[r.id]} for r in pending], "devices": devices}
    if cmd == "requests":
        data = {"pending_requests": data["pending_requests"]}
    elif cmd == "grants":
        data = {"active_grants": data["active_grants"]}
    if as_json:
        return Reply(0, json.dumps(data) + "\n")
    host = app.config.listen.public_host
    lines = [f"medbroker: {principal.name} ({principal.role}{', ' + principal.company if principal.company else ''})"]
    if "active_grants" in data:
        lines.append("Active grants:" if grants else "Active grants: none")
        for g in grants:
            left = format_duration((g.ends_at - now).total_seconds())
            lines.append(f"  grant {g.id}: {g.user} on {g.device} until {utc_iso(g.ends_at)} ({left} left)"
                         + (" files only (sftp/scp)" if g.shell == "files-only" else "")
                         + (f" forwards {forwards_text(g.forwards)}" if g.forwards else "")
                         + f"  -> ssh -p {port} {g.user}@{g.device}@{host}")
    if "pending_requests" in data:
        lines.append("Pending requests:" if pending else "Pending requests: none")
        for r in pending:
            card = cards[r.id]
            lines.append(f"  request {r.id}: {r.user} -> {r.device} for {format_duration(r.duration_s)}"
                         + (f" ({r.mode})" if r.mode != "normal" else "") + f": {escape_unsafe(r.reason)}"
                         + (f" [{escape_unsafe(r.ticket)}]" if r.ticket else "")
                         + (f"; forwards: {forwards_text(r.forwards)}" if r.forwards else ""))
            lines.append(f"    device containment: {card['containment'].replace('exposed', 'EXPOSED')}; approvals: "
                         f"{approvals_text(r)} (needs {card['approvals_needed']})")
            if staff:
                lines += [f"    ! {n}" for n in card["notes"]]
    if cmd == "status":
        if devices:
            lines.append("Devices: " + ", ".join(devices))
        lines.append(f"Request access: ssh -p {port} {principal.name}@{host} request DEVICE --for 2h "
                     f'--reason "..."   (help: ssh -p {port} {principal.name}@{host} help)')
        device = grants[0].device if grants and not staff else "DEVICE"
        lines.append(f"PuTTY: plink -P {port} in place of ssh -p {port}; in the PuTTY window, Host Name "
                     f"{principal.name}@{device}@{host} and Port {port}")
    return Reply(0, "\n".join(lines) + "\n")
