"""Per-channel policy of a live session: which channels it may open and the guards they run through.

``SessionPolicy`` answers a ``RelaySession``'s questions (sessions/relay.py ``ChannelContext``): may this exec,
shell or subsystem run, with which scanner, line guard, stream judge, SFTP filter or scp server. The
``Guarded*`` classes glue one channel's filter to the session: recording frames, audit rows, transfer rows,
what the vendor is told. The broker hands a session its policy through ``SessionServices.policy_for``, so
broker/live.py never imports this module (nor broker/server.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncssh

from broker.clock import utc_iso
from broker.config import parse_size
from broker.containment import channel_refusal
from broker.errors import BrokerError
from broker.live import LiveSession
from broker.session_context import SessionServices
from sessions.cmd_judge import DevicePaths, judge_command
from sessions.cmd_paths import analyze_command
from sessions.decoders import DeepScanner
from sessions.entropy import OpaqueBudget
from sessions.exec_check import check_command_line
from sessions.forward import ForwardRelay
from sessions.policy import ProtectedPaths
from sessions.recwriter import RecordingWriter
from sessions.relay import RelaySession
from sessions.kept_uploads import KeptUploads
from sessions.scp import ScpServer
from sessions.scp_grammar import is_scp_command, transfer_server_refusal
from sessions.sftp import SftpFilter
from sessions.sftp_device import DeviceSftp
from sessions.shell_guard import PipedLineGuard, ShellLineGuard
from sessions.shell_lines import LiveScreen
from sessions.streams import StreamJudge, stream_refusal
from sessions.tilde import LoginTilde
from sessions.upload_check import StreamGuard, find_reference, path_tokens, runs_interpreter, script_candidates

__all__ = ["GuardedScp", "GuardedSftp", "GuardedStreams", "SessionPolicy"]


def _recorder(live: LiveSession) -> RecordingWriter:
    """The session's recording writer: LiveSession.start() sets it before any channel opens."""
    assert live.recorder is not None
    return live.recorder


def _upconn(live: LiveSession) -> asyncssh.SSHClientConnection:
    """The device connection: LiveSession.start() sets it (once) before any channel opens."""
    assert live.upconn is not None
    return live.upconn


class SessionPolicy:
    """Which channels a live session may open, and the filters they run through (patient-data guard)."""

    def __init__(self, services: SessionServices, live: LiveSession) -> None:
        self.services = services
        self.live = live
        self.protected = ProtectedPaths.build(live.device.name, live.device.protected_paths,
                                              services.default_protected)
        policy = services.app.config.policy
        self.scan_output = policy.scan_output
        self.check_commands = policy.check_commands
        self.keep_uploads = services.app.config.recording.keep_uploads
        # Commands that build paths at run time are refused unless the device is known to be contained
        # (its login cannot read the protected paths; broker/containment.py): unknown counts as exposed.
        containment = getattr(live, "containment", None)
        self.strict_commands = getattr(containment, "state", None) != "contained"
        self._shell: dict = {}  # this channel's interactive shell: where earlier lines may have left it (cd)
        # ~alice@ct-01 (the vendor's login as a tilde prefix, as Ansible sends it) means the device login's home
        self.tilde = LoginTilde(f"{live.user}@{live.device.name}")

    def rewrite_command(self, command: str) -> str | None:
        """An exec command with ``~USER@DEVICE`` made the device login's home (sessions/tilde.py), or None."""
        return self.tilde.rewrite_command(command)

    def kept_uploads(self) -> KeptUploads | None:
        """Where one channel keeps copies of uploaded files (``[recording] keep_uploads``), or None."""
        return KeptUploads(self.services.app.config.home / "uploads" / self.live.id,
                           self.live.log.named("medbroker.scp")) if self.keep_uploads else None

    def check_shell(self) -> str | None:
        """A refusal message for an interactive shell (files-only grant, or an exposed device), or None."""
        return self._containment_refusal("shell")

    def _containment_refusal(self, kind: str) -> str | None:
        live = self.live
        return channel_refusal(kind, live.grant, live.device, live.containment,
                               self.services.app.config.policy.exposed_shell)

    def check_exec(self, command: str) -> str | None:
        """A refusal message for an exec command, or None to run it. Legacy scp never gets here when
        :meth:`make_exec_handler` serves it; without that handler it is refused, never run on the device."""
        refusal = self._containment_refusal("exec")  # files-only grant or exposed device (broker/containment.py)
        if refusal:
            return refusal
        if is_scp_command(command):
            return ("legacy scp (scp -O) is not available on this channel; use scp without -O (it speaks SFTP, "
                    "which the patient-data guard checks) or sftp; PuTTY: pscp -sftp or psftp")
        refusal = transfer_server_refusal(command)
        if refusal:
            return refusal
        if self.check_commands:
            decision = check_command_line(command, self.protected, None)
            if not decision.allowed:
                return decision.reason
            # a path inside an encoded or quoted payload (echo <base64> | base64 -d | python3)
            found = find_reference(command.encode("utf-8", "surrogateescape"), self.protected)
            if found:
                return found.reason(self.protected.device, "this command")
        return None

    def _device_paths(self) -> DevicePaths:
        """One realpath session per live session (it ends with the device connection)."""
        paths = getattr(self.live, "device_paths", None)
        if paths is None:
            paths = DevicePaths(lambda: _upconn(self.live).start_sftp_client(path_encoding=None))
            self.live.device_paths = paths
        return paths

    async def judge_exec(self, command: str, pty: bool = False) -> str | None:
        """After :meth:`check_exec`: the command's paths resolved on the device (sessions/cmd_judge.py). A shell
        run on the vendor's input (``bash``, ``sudo -i``) is allowed here: :meth:`make_line_guard` judges its
        lines one by one."""
        if not self.check_commands or is_scp_command(command):
            return None
        decision = await judge_command(command, self.protected, self._device_paths(), strict=self.strict_commands,
                                       lexical=False)
        return None if decision.allowed else decision.reason

    async def judge_line(self, line: str) -> str | None:
        """A command line read off an interactive shell: the lexical check, then the device's realpath."""
        refusal = transfer_server_refusal(line)
        if refusal:
            return refusal
        decision = await judge_command(line, self.protected, self._device_paths(), strict=self.strict_commands,
                                       shell=self._shell)
        return None if decision.allowed else decision.reason

    def make_line_guard(self, relay: RelaySession) -> ShellLineGuard | PipedLineGuard | None:
        """Each command line typed into a PTY channel (a shell, or ``su``/``sudo -i`` run by exec) is judged
        before its Enter reaches the device; a shell without a PTY has each input line judged."""
        if not self.check_commands or relay.up is None or relay.kind not in ("shell", "exec"):
            return None
        if relay.pty is None and relay.kind == "exec" and not analyze_command(relay.command or "",
                                                                               self.protected).reads_input:
            return None  # an ordinary command: judged as a whole before it ran
        up = relay.up

        def refused(line: str, reason: str) -> None:
            live = self.live
            _recorder(live).append_event(relay.ctx.number, "policy-denial",
                                        {"kind": "shell-line", "command": line, "reason": reason})
            self.services.audit_soon("exec.denied", **live.who.audit_fields(), kind="shell-line", command=line,
                                     reason=reason)
            relay.notice(f"refused: {reason}", stdout=relay.pty is not None)

        def hold_input(on: bool) -> None:
            (relay.hold if on else relay.release)("vendor", "line-judge")

        if relay.pty is None:
            return PipedLineGuard(self.judge_line, up.write, up.write_eof, refused, hold_input=hold_input)
        size = relay.pty[1] or (80, 24)

        def ran_anyway(reason: str) -> None:  # a line that ran without a judged Enter named patient data
            self.services.spawn(self.live.terminate(
                "stopped", f"a command line ran without Enter and was refused as it ran ({reason}); the session "
                "was ended"))

        return ShellLineGuard(LiveScreen(int(size[0]) or 80, int(size[1]) or 24), self.judge_line, up.write,
                              up.write_eof, refused, end=ran_anyway,
                              pause=lambda on: (relay.hold if on else relay.release)("device", "line-judge"),
                              hold_input=hold_input)

    def upload_guard(self, path: str) -> StreamGuard | None:
        """A judge of one file uploaded over SFTP (sessions/sftp.py): a script or module naming a protected
        path is refused and removed."""
        return StreamGuard(self.protected, f"the uploaded file {path}", program=path) if self.check_commands else None

    async def vet_exec(self, command: str) -> str | None:
        """Before an exec command runs: read the scripts it runs (``python3 x``, ``./collect``, Ansible's
        ``…/AnsiballZ_stat.py``) on the device, up to 4 MiB each, and refuse one that names a protected path."""
        paths = script_candidates(command) if self.check_commands else []
        if not paths or self.live.upconn is None:
            return None
        device = DeviceSftp(self.live.upconn.start_sftp_client)
        try:
            for path in paths:
                try:
                    where = path[2:] if path.startswith("~/") else path  # SFTP starts in the login's home
                    head = await asyncio.wait_for(device.head(where.encode("utf-8", "surrogateescape"), 4 << 20), 10)
                except (asyncssh.SFTPError, BrokerError):
                    continue  # not there, not a regular file, not readable: the device will say so itself
                found = find_reference(head, self.protected)
                if found:
                    return found.reason(self.protected.device, f"the script {path} this command runs")
                linked = await self._resolve_tokens(head, device)
                if linked:
                    token, resolved = linked
                    return (f"the script {path} this command runs names {token}, which is "
                            f"{self.protected.protected_reason(resolved)}")
        except (asyncio.TimeoutError, OSError, asyncssh.Error) as exc:
            return f"medbroker could not read the script this command runs ({exc}); the command was refused"
        finally:
            device.close()
        return None

    async def _resolve_tokens(self, script: bytes, device: DeviceSftp | None = None) -> tuple[str, str] | None:
        """Resolve a script's path-like words through the device's realpath, concurrently (one round trip):
        the first that lands in a protected tree (a symlink such as tmp/images -> data/dicom), or None."""
        tokens = [t[2:] if t.startswith("~/") else t for t in path_tokens(script)]
        if not tokens or self.live.upconn is None:
            return None
        if device is None:
            device = DeviceSftp(self.live.upconn.start_sftp_client)
            try:
                return await asyncio.wait_for(self._resolve_tokens(script, device), 10)
            finally:
                device.close()

        async def resolve(token: str) -> str | None:
            try:
                return (await device.realpath(token.encode("utf-8", "surrogateescape"))).decode(
                    "utf-8", "surrogateescape")
            except (asyncssh.SFTPError, UnicodeError):
                return None  # no such path (yet): nothing to resolve

        for token, resolved in zip(tokens, await asyncio.gather(*(resolve(t) for t in tokens))):
            if resolved is not None and self.protected.is_protected(resolved):
                return token, resolved
        return None

    def make_input_guard(self, command: str) -> StreamGuard | None:
        """A judge of an exec channel's stdin: a script piped to an interpreter (Ansible pipelining) that
        names a protected path ends the channel (sessions/upload_check.py)."""
        if not self.check_commands:
            return None
        return StreamGuard(self.protected, "the input of this command", eager=True, resolve=self._resolve_tokens,
                           program=None if runs_interpreter(command) else "<stdin>")

    def check_subsystem(self, name: str) -> str | None:
        if name == "sftp":
            return None
        return (f"the {name} subsystem is not available through medbroker; use sftp or scp for files "
                "(PuTTY: psftp, pscp -sftp, or WinSCP in SFTP mode)")

    def make_filter(self, relay: RelaySession, name: str) -> "GuardedSftp":
        """The SFTP policy proxy for one channel, with its own second SFTP session for realpath checks."""
        return GuardedSftp(self, relay)

    def make_scanner(self) -> DeepScanner | None:
        """One scanner per shell/exec channel; the opaque-output budget belongs to the session (all channels)."""
        if not self.scan_output:
            return None
        budget = getattr(self.live, "opaque_budget", None)
        if budget is None:
            budget = self.live.opaque_budget = OpaqueBudget(parse_size(self.services.app.config.policy.max_opaque_output))
        return DeepScanner(budget)

    def make_stream_judge(self, relay: "RelaySession | ForwardRelay") -> "GuardedStreams":
        """The file-transfer protocol judge for one shell or exec channel (issue 11, finding 3) or one plain-text
        forwarded connection (issue 14)."""
        return GuardedStreams(self, relay)

    def make_exec_handler(self, relay: RelaySession, command: str) -> ScpServer | None:
        """Legacy scp (``scp -t``/``scp -f``) is served by the broker itself (sessions/scp.py), never the device."""
        return GuardedScp(self, relay, command).server if is_scp_command(command) else None


class GuardedStreams:
    """Glue between one shell/exec channel (or forwarded connection) and its :class:`StreamJudge`: a
    file-transfer protocol there is recorded (policy-denial frame), audited (``channel.protocol.denied``) and
    explained to the vendor."""

    def __init__(self, policy: SessionPolicy, relay: "RelaySession | ForwardRelay") -> None:
        self.live, self.relay, self.services = policy.live, relay, policy.services
        self.judge = StreamJudge()

    def feed(self, direction: str, data: bytes) -> str | None:
        """Judge one chunk; a refusal sentence when the channel must end, else None."""
        if self.judge.feed(direction, data) is None:
            return None
        hit, live, relay = self.judge.hit, self.live, self.relay
        assert hit is not None  # feed() returned a protocol: the judge holds the hit
        port = getattr(relay.ctx, "port", None)  # a forwarded connection's device port
        reason = stream_refusal(hit, forward=port is not None)
        _recorder(live).append_event(relay.ctx.number, "policy-denial", {
            "protocol": hit.protocol, "stream": "input" if direction == "vendor" else "output",
            "offset": hit.offset, "reason": reason, **({"port": port} if port is not None else {})})
        self.services.audit_soon("channel.protocol.denied", **live.who.audit_fields(), channel=relay.ctx.number,
                                 kind=relay.kind, command=relay.command, protocol=hit.protocol, direction=direction,
                                 offset=hit.offset, reason=reason, **({"port": port} if port is not None else {}))
        return reason


class GuardedSftp:
    """Glue between one relayed SFTP channel and its :class:`SftpFilter`: audit, recording, transfers."""

    # filter event name -> recording frame kind
    _FRAMES = {"sftp.request": "sftp-request", "transfer.file": "file-transfer",
               "sftp.summary": "sftp-reply-summary", "sftp.unexpected-reply": "sftp-reply-summary"}
    _DENIED_EVENT = "sftp.denied"

    def __init__(self, policy: SessionPolicy, relay: RelaySession) -> None:
        live = policy.live
        self.live, self.relay, self.services = live, relay, policy.services
        self.device_sftp = DeviceSftp(_upconn(live).start_sftp_client)
        assert relay.up is not None  # an SFTP channel is relayed once the device side is open
        self.filter = SftpFilter(
            policy.protected, self.device_sftp.realpath, self.device_sftp.head, relay.up.write,
            relay.write_to_vendor, self._record, self._denied, mode=live.grant.mode, on_fatal=self._fatal,
            now=lambda: utc_iso(self.services.app.clock.now()), uploads=policy.kept_uploads(),
            upload_guard=policy.upload_guard, discard_upload=self._discard_upload,
            rewrite_path=policy.tilde.rewrite_sftp_path, logger=relay.log.named("medbroker.sftp"),
            expect_reply=relay.expect_reply)

    def vendor_data(self, data: bytes) -> None:
        self.filter.vendor_data(data)

    def device_data(self, data: bytes) -> None:
        self.filter.device_data(data)

    def close(self):
        summary = self.filter.close()
        self.device_sftp.close()
        return summary

    def _fields(self) -> dict[str, Any]:
        return self.live.who.audit_fields()

    def _record(self, name: str, details: dict) -> None:
        _recorder(self.live).append_event(self.relay.ctx.number, self._FRAMES.get(name, "sftp-request"),
                                          {"event": name, **details})
        if name == "transfer.file":
            self.services.audit_soon("transfer.file", **self._fields(), **details)
            row = {"session_id": self.live.id, "at": utc_iso(self.services.app.clock.now()),
                   "path": details.get("path", "?"), "direction": details.get("direction", "?"),
                   "bytes": int(details.get("bytes") or 0), "sha256": details.get("sha256"),
                   "outcome": details.get("outcome", "ok"), "details": json.dumps(details, default=str)}
            self.services.spawn(self.services.db(self.services.app.store.insert_transfer, row))
        elif name == "sftp.summary":
            self.services.audit_soon("sftp.summary", **self._fields(), **details)

    def _denied(self, decision, details: dict) -> None:
        _recorder(self.live).append_event(self.relay.ctx.number, "policy-denial",
                                          {"op": decision.op, "path": decision.path, "reason": decision.reason})
        self.services.audit_soon(self._DENIED_EVENT, **self._fields(), op=decision.op, path=decision.path,
                                 reason=decision.reason, **{k: v for k, v in details.items()
                                                            if k not in ("op", "path", "reason")})
        if self._DENIED_EVENT == "sftp.denied":  # scp carries the reason in-band; sftp shows only a code
            self.relay.notice(decision.reason)

    async def _discard_upload(self, path: str) -> None:
        """Remove a refused upload from the device (it named a protected path); recorded either way."""
        try:
            await self.device_sftp.remove(path)
            outcome = "removed"
        except Exception as exc:  # the device refused, or the channel is gone: say so, the denial stands
            outcome = f"not removed: {getattr(exc, 'reason', None) or exc}"
        self._record("sftp.upload.discarded", {"path": path, "outcome": outcome})

    def _fatal(self, message: str) -> None:
        """A protocol violation (sessions/sftp.py): recorded, audited, told to the vendor; the channel ends now."""
        _recorder(self.live).append_event(self.relay.ctx.number, "policy-denial", {"violation": message})
        self.services.audit_soon("sftp.protocol.denied", **self._fields(), kind="sftp", reason=message)
        self.relay.notice(message)
        self.relay.exit(1)


class GuardedScp(GuardedSftp):
    """Glue between one legacy scp exec channel and its :class:`ScpServer`: the SFTP glue's transfer
    records, refusals audited as ``scp.denied`` (the vendor reads them in the SCP error record)."""

    _DENIED_EVENT = "scp.denied"

    def __init__(self, policy: SessionPolicy, relay: RelaySession, command: str) -> None:
        live = policy.live
        self.live, self.relay, self.services = live, relay, policy.services
        self.server = ScpServer(
            command, policy.protected, lambda: _upconn(live).start_sftp_client(path_encoding=None),
            relay.write_to_vendor, relay.exit, self._hold, self._record, self._denied, mode=live.grant.mode,
            now=lambda: utc_iso(self.services.app.clock.now()), uploads=policy.kept_uploads(),
            upload_guard=policy.upload_guard, logger=relay.log.named("medbroker.scp"))

    def _hold(self, on: bool) -> None:
        (self.relay.hold if on else self.relay.release)("vendor", "scp-input")
