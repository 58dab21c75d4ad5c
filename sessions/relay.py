"""Byte-exact, flow-controlled relay of one vendor channel to one device channel, recorded.

``RelaySession`` (vendor side, asyncssh server session) is paired with ``UpstreamSession`` (device
side, asyncssh client session). Requests (pty, exec, shell, subsystem) are acknowledged at once, as
asyncssh requires; the device channel is opened in ``session_started`` and anything the vendor sends
before it exists is buffered (asyncssh-notes §1.3, pitfalls 1-10).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol

import asyncssh
from asyncssh.packet import Boolean, String, UInt32

from sessions.holds import Holds
from sessions.sessionlog import session_log
from sessions.tailhold import TailHold
from sessions.tasks import TaskSet

__all__ = [
    "ChannelContext",
    "RelaySession",
    "UpstreamSession",
    "OneShotSession",
    "RefusalSession",
    "Recorder",
    "SubsystemFilter",
    "ExecHandler",
    "ENV_ALLOWED",
    "MAX_PACKET",
    "oversize_reason",
]

log = logging.getLogger("medbroker.relay")

EOF_HOLD_S = 0.1  # see RelaySession.device_eof
JUDGE_TIMEOUT_S = 10.0  # ChannelContext.judge_exec: no answer in time refuses the command (fail closed)
INPUT_DRAIN_S = 10.0  # after refused stdin, how long the vendor may keep writing before the channel ends
UNRECORDABLE_END_S = 1.0  # strict, the recording failed and the device ended first: the session's own end is due
# Environment variables forwarded to the device (sshd's Debian default AcceptEnv is LANG LC_*).
ENV_ALLOWED = ("LANG", "LC_")
# Send buffer per channel before the relay stops reading the other side. asyncssh's default (64 KiB high,
# 16 KiB low) paused the relay every two 32 KiB packets under bulk load; 1 MiB lets a transfer flow while
# still bounding memory per busy channel (docs/performance.md, "relay write buffers").
WRITE_BUFFER_HIGH = 1 << 20
WRITE_BUFFER_LOW = 256 << 10
# SFTP replies and broker-served scp blocks reach the vendor whole, up to 256 KiB each (sftp.MAX_DATA, scp.BLOCK):
# announced to the recorder so its acknowledgment window leaves room for one (docs/recording-format.md). The SFTP
# filter then narrows its channel's announcement to what its outstanding requests can bring (expect_reply).
WHOLE_UNIT = 256 << 10
# The largest SSH data packet medbroker announces on every channel (asyncssh's default, what stock clients and sshd
# send). asyncssh itself accepts up to its 256 KiB transport limit; the relay does not (see RelaySession._oversize).
MAX_PACKET = 32768
# Device output that arrives in full-size packets (a bulk stream: `cat`, a log, a download) is scanned, judged,
# recorded and forwarded as one piece of up to BATCH_BYTES per read of the connection instead of packet by packet:
# every layer's per-chunk cost is paid once per batch (exec download of a device log: ~1 s/GiB less CPU, ~+15 %,
# docs/performance.md stop 17). Packets under BATCH_MIN (echoes, prompts, short lines) go through at once, as
# before, so typing gains no delay; so do a subsystem's (the SFTP filter parses and queues replies itself).
# The recorder is told the unit (expect_unit), so the acknowledgment window holds exactly: a batch is appended
# only while the recorder is not paused.
BATCH_BYTES = 128 << 10
BATCH_MIN = 8 << 10


def oversize_reason(side: str, size: int, ended: str) -> str:
    """The sentence for a data packet over :data:`MAX_PACKET` from ``side`` ("vendor" or "device"); ``ended`` names
    what medbroker ended ("ended the channel", "closed the forwarded connection")."""
    who = "your SSH client" if side == "vendor" else "the device"
    return (f"{who} sent {size} bytes in one SSH data packet; the channel announced at most {MAX_PACKET}, so "
            f"medbroker {ended}" + (" (use a standard SSH client)" if side == "vendor" else ""))


class Recorder(Protocol):
    """What the relay needs of a recording writer."""

    def append_data(self, channel: int, kind: str, data: bytes) -> int:
        """Queue ``data``; 0 when it was not taken (the recording failed or is closed)."""

    def append_event(self, channel: int, kind: str, event: dict) -> int: ...

    def expect_unit(self, size: int, key: object = None) -> None:
        """Single appends of up to ``size`` bytes follow (may call the pause callback at once); with ``key``,
        replaces that key's earlier announcement (0 withdraws it)."""

    @property
    def paused(self) -> bool:
        """The writer is behind: the relay reads no more of what it would record (see write_to_vendor)."""

    @property
    def failed(self) -> Exception | None:
        """The error that stopped the recording, or None."""


class SubsystemFilter(Protocol):
    """A protocol-aware filter placed between vendor and device (the SFTP policy proxy)."""

    def vendor_data(self, data: bytes) -> None: ...

    def device_data(self, data: bytes) -> None: ...

    def close(self) -> Any: ...


class ExecHandler(Protocol):
    """An exec command the broker serves itself instead of the device (legacy scp, sessions/scp.py).

    No device channel is opened; the handler gets the vendor's bytes and EOF, ``pause_writing`` while
    the vendor's window or the recorder is full, and ends the channel through the relay
    (``write_to_vendor``, ``exit``, ``hold``/``release`` of the vendor side)."""

    def start(self) -> None: ...

    def vendor_data(self, data: bytes) -> None: ...

    def vendor_eof(self) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def close(self) -> Any: ...


@dataclass
class ChannelContext:
    """What the server gives each relayed channel: numbering, recording and policy hooks."""

    number: int
    recorder: Recorder
    open_upstream: Callable[..., Awaitable[tuple[asyncssh.SSHClientChannel, asyncssh.SSHClientSession]]]
    """``open_upstream(session_factory, command, subsystem, env, term_type, term_size, term_modes)``"""
    check_exec: Callable[[str], str | None] = lambda command: None
    """Returns a refusal message for an exec command, or None to allow it."""
    rewrite_command: Callable[[str], str | None] = lambda command: None
    """Asked first for each exec command: the command as the device should see it (``~alice@ct-01`` made the
    device login's home, sessions/tilde.py), or None to keep it. Every later hook sees the rewritten command;
    the recording keeps both."""
    check_subsystem: Callable[[str], str | None] = lambda name: f"subsystem {name} is not available"
    check_shell: Callable[[], str | None] = lambda: None
    """Returns a refusal message for an interactive shell, or None to allow it."""
    make_filter: Callable[["RelaySession", str], SubsystemFilter | None] | None = None
    make_exec_handler: Callable[["RelaySession", str], ExecHandler | None] | None = None
    """Asked first for each exec command: a handler that serves it in the broker (check_exec is then not
    asked), or None to judge it with check_exec and run it on the device."""
    judge_exec: Callable[[str, bool], Awaitable[str | None]] | None = None
    """``judge_exec(command, pty)``: asked after check_exec allowed an exec command, before the device channel
    opens: a refusal message or None (sessions/cmd_judge.py resolves its paths on the device). Raising or not answering in
    JUDGE_TIMEOUT_S refuses the command."""
    make_line_guard: Callable[["RelaySession"], Any] | None = None
    """Asked for every shell and exec channel once the device channel is open: None, or a line guard (``vendor_data``, ``vendor_eof``, ``device_output``,
    ``resize``, ``close``) that judges each command line before it reaches the device (sessions/shell_guard.py)."""
    make_scanner: Callable[[], Any] | None = None
    """An output scanner (``feed(bytes) -> str | None``) for shell/exec output, or None."""
    make_stream_judge: Callable[["RelaySession"], Any] | None = None
    """A stream judge for shell/exec channels (``feed("vendor"|"device", bytes) -> str | None``: a sentence
    when a file-transfer protocol flows, sessions/streams.py); the relay then ends the channel."""
    vet_exec: Callable[[str], Awaitable[str | None]] | None = None
    """Asked (awaited) before an exec command reaches the device: a refusal, or None. Reads the scripts the
    command runs (sessions/upload_check.py) on the broker's own device session."""
    make_input_guard: Callable[[str], Any] | None = None
    """A judge of an exec channel's stdin (``feed(bytes)``/``finish()`` -> refusal or None), given the
    command, or None: interpreter input naming a protected path ends the channel (sessions/upload_check.py)."""
    on_detection: Callable[["RelaySession", str], None] = lambda relay, what: None
    on_closed: Callable[["RelaySession"], None] = lambda relay: None
    on_refused: Callable[["RelaySession", str, str], None] = lambda relay, kind, message: None
    on_upstream_error: Callable[["RelaySession", Exception], str] = lambda relay, exc: f"device error: {exc}"
    on_device_lost: Callable[["RelaySession", Exception], str] = \
        lambda relay, exc: f"the connection to the device was lost ({exc})"
    """The sentence shown when the device's connection ends with an error (it stopped answering keepalives, it
    reset the connection) instead of closing the channel."""
    notices: list[str] = field(default_factory=list)
    forward_unrecorded: bool = False
    """Best-effort recording: keep relaying data the recorder did not take. False (strict): data the recorder
    refused (it failed or is closed) is dropped, never handed on unrecorded."""
    session_id: str = "?"
    """Named in every log line of the channel: ``[session=ID channel=N]`` (sessions/sessionlog.py)."""


class UpstreamSession(asyncssh.SSHClientSession):
    """Device side: record output and pass it, EOF, exit status and signals to the vendor."""

    def __init__(self, down: "RelaySession") -> None:
        self.down = down
        self.exit_status: int | None = None
        self.exit_signal: tuple | None = None
        self._batch: list[bytes] = []  # full-size packets of one datatype, not yet handed to the relay
        self._batch_type: asyncssh.DataType = None
        self._batch_size = 0
        self._flush_due = False
        down.upstream = self

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if len(data) < BATCH_MIN or len(data) > MAX_PACKET or self.down.filter is not None:
            # interactive output, an oversize packet, or a subsystem (SFTP replies are parsed packet by packet
            # and wait in the filter's own outbox: batching them measured slower, docs/performance.md)
            self.flush(force=True)
            self.down.from_device(data, datatype)
            return
        if self._batch and (datatype != self._batch_type or self._batch_size + len(data) > BATCH_BYTES):
            self.flush(force=True)  # (reading is not paused, or asyncssh would not deliver: the window has room)
        if not self._batch:
            self.down.ctx.recorder.expect_unit(BATCH_BYTES, key=self)
        self._batch.append(data)
        self._batch_type = datatype
        self._batch_size += len(data)
        self.flush_soon()

    def flush_soon(self) -> None:
        """Hand the batch on once this read of the connection has been delivered (the next loop turn)."""
        if self._batch and not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Hand the batch to the relay. Unless ``force``d (new data, EOF, exit, close: order first), a batch waits
        while the recorder is paused (another channel's output filled the window after this batch was read);
        the relay calls :meth:`flush_soon` when the recorder has room again."""
        batch = self._batch
        if not batch or (not force and self.down.ctx.recorder.paused):
            return
        self._batch, self._batch_size = [], 0
        self.down.from_device(batch[0] if len(batch) == 1 else b"".join(batch), self._batch_type, batched=True)

    def eof_received(self) -> bool:
        self.flush(force=True)
        self.down.device_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self.flush(force=True)
        self.exit_status = status
        self.down.device_exited(status=status)

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.flush(force=True)
        self.exit_signal = (signal, core_dumped, msg, lang)
        self.down.device_exited(signal=self.exit_signal)

    def pause_writing(self) -> None:
        self.down.hold("vendor", "device-full")

    def resume_writing(self) -> None:
        self.down.release("vendor", "device-full")

    def connection_lost(self, exc: Exception | None) -> None:
        self.flush(force=True)
        self.down.ctx.recorder.expect_unit(0, key=self)  # the channel's unit claim goes with it
        self.down.device_closed(self, exc)


class RelaySession(asyncssh.SSHServerSession):
    """Vendor side of one relayed channel."""

    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx
        self.chan: asyncssh.SSHServerChannel = None  # type: ignore[assignment]
        self.up: asyncssh.SSHClientChannel | None = None
        self.pending: list[Callable[[asyncssh.SSHClientChannel], None]] = []
        self.pty: tuple[str, tuple, Mapping[int, int]] | None = None
        self.command: str | None = None
        self.subsystem: str | None = None
        self.kind = "shell"
        self.refusal: str | None = None
        self.filter: SubsystemFilter | None = None
        self.handler: ExecHandler | None = None
        # made by the ChannelContext factories (their types belong to the broker's policy)
        self.scanner: Any = None
        self.line_guard: Any = None
        self.judge: Any = None
        self._tail = TailHold(self._release_tail)  # an unfinished output line held back (sessions/tailhold.py)
        self.upstream: UpstreamSession | None = None  # the device side's session (it batches bulk output)
        self.input_guard: Any = None
        self.input_refusal: str | None = None  # stdin named a protected path: drained, then the channel ends
        self.closed = False
        self.exit_code: int | None = None
        self.exit_sent = False
        self._holds = Holds(lambda side: self.chan if side == "vendor" else self.up)
        # Replies of a subsystem filter that wait for the recorder (see write_to_vendor), and the device's exit
        # that must follow them; None on channels without a filter.
        self._outbox: deque[bytes] | None = None
        self._after_outbox: list[Callable[[], None]] = []
        self._held_exit: tuple[int | None, tuple | None] | None = None  # an exit ahead of held device output
        self.eof_state = "none"  # none | held | sent
        self.log = session_log(log, ctx.session_id, ctx.number)
        self._tasks = TaskSet(self.log)  # judging, vetting: kept until they end, a failure logged

    # ------------------------------------------------------------ vendor requests
    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan
        chan.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)

    def pty_requested(self, term_type: str, term_size: tuple, term_modes: Mapping[int, int]) -> bool:
        self.pty = (term_type, term_size, term_modes)
        self.ctx.recorder.append_event(self.ctx.number, "pty", {
            "term": term_type, "cols": term_size[0], "rows": term_size[1]})
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        self.ctx.recorder.append_event(self.ctx.number, "shell", {})
        self.refusal = self.ctx.check_shell()
        return True

    def exec_requested(self, command: str | bytes) -> bool:
        if isinstance(command, bytes):
            command = command.decode("utf-8", "replace")
        sent, rewritten = command, self.ctx.rewrite_command(command)
        if rewritten is not None:
            command = rewritten
        self.kind, self.command = "exec", command
        # A command the broker serves itself (legacy scp) is judged by its handler, item by item;
        # everything else by check_exec, which also refuses scp when no handler serves it (fail closed).
        self.handler = self.ctx.make_exec_handler(self, command) if self.ctx.make_exec_handler else None
        if self.handler is None:
            self.refusal = self.ctx.check_exec(command)
            if self.refusal is None and self.ctx.make_input_guard:
                self.input_guard = self.ctx.make_input_guard(command)
        elif self._holds["device"]:  # e.g. the recorder is behind already
            self.handler.pause_writing()
        if self.handler is not None:  # its blocks reach the vendor whole
            self.ctx.recorder.expect_unit(WHOLE_UNIT)
        # served_by: the broker answers this command itself (legacy scp); the device never runs it
        event = {"command": command} if self.handler is None else {"command": command, "served_by": "medbroker"}
        if rewritten is not None:  # what the vendor sent, before ~USER@DEVICE became the device login's home
            event["sent"] = sent
        self.ctx.recorder.append_event(self.ctx.number, "exec", event)
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.kind, self.subsystem = "subsystem", subsystem
        self.ctx.recorder.append_event(self.ctx.number, "subsystem", {"name": subsystem})
        self.refusal = self.ctx.check_subsystem(subsystem)
        return True

    def session_started(self) -> None:
        if self.refusal is not None:
            self.refuse(self.kind, self.refusal)
            return
        if self.handler is not None:  # served by the broker itself: no device channel
            self.handler.start()
            return
        self._tasks.spawn(self._judge_then_open(), "opening the device channel")

    async def _judge_then_open(self) -> None:
        """Exec commands are judged by ``judge_exec`` (device realpath) before the device channel exists."""
        if self.kind == "exec" and self.ctx.judge_exec is not None:
            try:
                refusal = await asyncio.wait_for(self.ctx.judge_exec(self.command or "", self.pty is not None),
                                                 JUDGE_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # fail closed
                refusal = (f"medbroker could not check this command on the device ({type(exc).__name__}: "
                           f"{exc or 'no answer'}); it was not run")
            if refusal is not None:
                if not self.closed:
                    self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {
                        "kind": "exec", "command": self.command, "reason": refusal})
                    self.refuse("exec", refusal)
                return
        await self._open_upstream()

    def refuse(self, kind: str, message: str) -> None:
        """Tell the vendor why on stderr, record it, exit 1."""
        self.ctx.on_refused(self, kind, message)
        self.notice(message)
        self.exit(1)

    async def _open_upstream(self) -> None:
        env = {k: v for k, v in (self.chan.get_environment() or {}).items()
               if isinstance(k, str) and k.startswith(ENV_ALLOWED)}
        pty = self.pty or (None, None, None)
        try:
            if self.kind == "exec" and self.command and self.ctx.vet_exec is not None:
                refusal = await self.ctx.vet_exec(self.command)
                if refusal is not None or self.closed:
                    if refusal is not None and not self.closed:
                        self.refuse("exec", refusal)
                    return
            up, _ = await self.ctx.open_upstream(
                lambda: UpstreamSession(self), self.command, self.subsystem, env, *pty)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # device refused the channel or the connection died
            self.notice(self.ctx.on_upstream_error(self, exc))
            self.exit(1)
            return
        if self.closed or self.input_refusal is not None:
            up.close()
            return
        self.up = up
        up.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        if self._holds["device"]:
            up.pause_reading()
        if self.subsystem:
            # A subsystem always runs through its filter; without one it must not run at all. Its replies
            # reach the vendor whole: until the filter announces smaller ones (the SFTP filter does, per request:
            # expect_reply), the session runs in lock step.
            self.ctx.recorder.expect_unit(WHOLE_UNIT, key=self)
            self._outbox = deque()
            self.filter = self.ctx.make_filter(self, self.subsystem) if self.ctx.make_filter else None
            if self.filter is None:
                self.ctx.recorder.expect_unit(0, key=self)
                self.notice(f"the {self.subsystem} subsystem is not available through medbroker")
                self.exit(1)
                return
        elif self.ctx.make_scanner:
            self.scanner = self.ctx.make_scanner()
        if not self.subsystem and self.ctx.make_stream_judge:
            self.judge = self.ctx.make_stream_judge(self)
        if not self.subsystem and self.ctx.make_line_guard:
            self.line_guard = self.ctx.make_line_guard(self)
        for action in self.pending:
            action(up)
        self.pending.clear()

    def _to_up(self, action: Callable[[asyncssh.SSHClientChannel], None]) -> None:
        if self.up is not None:
            action(self.up)
        elif not self.closed:
            self.pending.append(action)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if len(data) > MAX_PACKET:
            self._oversize("vendor", len(data))
            return
        if not self.ctx.recorder.append_data(self.ctx.number, "input", data) and not self.ctx.forward_unrecorded:
            return  # the recording failed: nothing unrecorded reaches the device (the session is ending)
        if self.input_guard is not None and self._input_refused(self.input_guard.feed(data)):
            return
        if self.handler is not None:
            self.handler.vendor_data(data)
        elif self.up is not None:
            self._deliver(self.up, data, datatype)
        elif not self.closed:  # replayed through _deliver too, so nothing reaches the device unfiltered
            self.pending.append(lambda up: self._deliver(up, data, datatype))

    def _deliver(self, up: asyncssh.SSHClientChannel, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.filter is not None:
            self.filter.vendor_data(data)
        elif self.judge is not None and self._judged("vendor", data):
            return
        elif self.line_guard is not None and datatype is None:
            self.line_guard.vendor_data(data)
        else:
            up.write(data, datatype)

    def _oversize(self, side: str, size: int) -> None:
        """A peer sent more channel data in one SSH packet than the 32 KiB medbroker announced. The recorder's
        acknowledgment window is sized for 32 KiB pieces (docs/recording-format.md), so such a packet is
        neither recorded nor forwarded, and the channel ends (a stock client never sends one; OpenSSH's sshd
        drops them too, "rcvd big packet")."""
        if self.closed:
            return
        reason = oversize_reason(side, size, "ended the channel")
        self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {
            "stream": "input" if side == "vendor" else "output", "reason": reason})
        self.ctx.on_refused(self, "packet", reason)
        self.exit_sent = True  # the device's own exit status must not follow
        self.pending.clear()
        self.notice(reason)
        self.exit(1)

    def _input_refused(self, reason: str | None, *, at_eof: bool = False) -> bool:
        """Stdin named a protected path: nothing more is forwarded, the device's side ends at once, and the
        vendor's side is read to its EOF (bounded) before it ends with the reason, so a client still
        writing (Ansible's ``dd``) reads the reason instead of a broken pipe."""
        if reason is None:
            return False
        if self.closed:
            return True
        if self.input_refusal is None:
            self.input_refusal = reason
            self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {"stream": "input", "reason": reason})
            self.ctx.on_refused(self, "exec", reason)
            self.pending.clear()
            if self.up is not None:
                self.up.close()
            asyncio.get_running_loop().call_later(INPUT_DRAIN_S, self._end_refused)
        if at_eof:
            self._end_refused()
        return True

    def _end_refused(self) -> None:
        if not self.closed:
            self.notice(self.input_refusal or "refused")
            self.exit(1)

    async def _vet_then_eof(self) -> None:
        try:
            reason = await self.input_guard.vet()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # cannot check: fail closed
            reason = f"medbroker could not check the paths in this command's input ({exc}); it was refused"
        if not self._input_refused(reason, at_eof=True) and not self.closed:
            self._to_up(lambda up: up.write_eof())

    def eof_received(self) -> bool:
        self.ctx.recorder.append_event(self.ctx.number, "eof", {"from": "vendor"})
        if self.input_guard is not None:
            if self._input_refused(self.input_guard.finish(), at_eof=True):
                return True  # the EOF is held too: python runs a piped script only after it
            if getattr(self.input_guard, "vet", None) is not None:  # and until its paths are resolved
                self._tasks.spawn(self._vet_then_eof(), "vetting the command's input")
                return True
        if self.handler is not None:
            self.handler.vendor_eof()
            return True
        self._to_up(lambda up: self.line_guard.vendor_eof() if self.line_guard is not None else up.write_eof())
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self.ctx.recorder.append_event(self.ctx.number, "resize", {"cols": width, "rows": height})
        if self.line_guard is not None:
            self.line_guard.resize(width, height)
        if self.up is None and self.pty is not None:
            self.pty = (self.pty[0], (width, height, pixwidth, pixheight), self.pty[2])
        else:
            self._to_up(lambda up: up.change_terminal_size(width, height, pixwidth, pixheight))

    def signal_received(self, signal: str) -> None:
        self.ctx.recorder.append_event(self.ctx.number, "signal", {"signal": signal})
        self._to_up(lambda up: up.send_signal(signal))

    def break_received(self, msec: int) -> bool:
        self.ctx.recorder.append_event(self.ctx.number, "break", {"msec": msec})
        self._to_up(lambda up: up.send_break(msec))
        return True

    def pause_writing(self) -> None:
        self.hold("device", "vendor-full")

    def resume_writing(self) -> None:
        self.release("device", "vendor-full")

    # ------------------------------------------------------------ flow control
    def hold(self, side: str, reason: str) -> None:
        """Stop reading from ``side`` ("vendor" or "device") for ``reason`` (a full peer, a slow recorder).

        Reading resumes only when every reason is released, so the recorder's back-pressure and the
        channels' own windows cannot undo each other.
        """
        if side == "device" and reason == "recorder" and self._outbox is not None:
            return  # a filter's replies wait in the outbox instead: the device is read, parsed and judged meanwhile
        if self._holds.hold(side, reason) and side == "device" and self.handler is not None:
            self.handler.pause_writing()  # the handler is the device side

    def release(self, side: str, reason: str) -> None:
        resumed = self._holds.release(side, reason)
        if resumed and side == "device" and self.handler is not None:
            self.handler.resume_writing()
        if resumed and side == "device":
            self._run_held_exit(now=False)  # asyncssh delivered what it held inside resume_reading()
        if reason == "recorder" and self._outbox:
            self._flush_outbox()
        if reason == "recorder" and self.upstream is not None:
            self.upstream.flush_soon()  # a batch that waited for the recorder (UpstreamSession.flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        if self.up is not None:
            self.up.close()

    # ------------------------------------------------------------ device side
    @property
    def unrecordable(self) -> bool:
        """Strict, and the recording failed: nothing more from the device reaches the vendor, not its data, EOF,
        exit status or close. The session ends the channel with the reason (broker/live.py
        ``_recording_failed``, scheduled by the writer thread when it failed); a device that ends first must not
        end the vendor's channel with its own exit status in the meantime (a full test run saw ``exit 0`` and no
        reason under load)."""
        return self.ctx.recorder.failed is not None and not self.ctx.forward_unrecorded

    def from_device(self, data: bytes, datatype: asyncssh.DataType, batched: bool = False) -> None:
        """Device output: scan, record, forward (the filter forwards for subsystems). ``batched``: several
        packets of at most MAX_PACKET each, joined by :class:`UpstreamSession`."""
        if self.input_refusal is not None:
            return
        if len(data) > MAX_PACKET and not batched:
            self._oversize("device", len(data))
            return
        if self.unrecordable:
            # Strict and the recording failed: nothing more is forwarded (see _forward), so nothing is scanned
            # either. The session's end (queued from the writer thread) then runs after cheap drops, not behind
            # a deep scan of every packet asyncssh still holds: measured 260-830 ms -> ~1-5 ms under load.
            return
        if self.filter is not None:
            self.filter.device_data(data)
            return
        if self.scanner is not None:
            hit = self.scanner.feed(data)
            if hit:
                # Nothing more from the device reaches the vendor on this channel, not even its exit status.
                self.scanner = None
                self.exit_sent = True
                self.ctx.recorder.append_event(self.ctx.number, "policy-denial", {"content": hit, "stream": "output"})
                self.ctx.on_detection(self, hit)
                return
        if self.judge is not None and self._judged("device", data):
            return
        if self.scanner is not None and datatype is None:
            data = self._tail.take(data, self.scanner.undecided())
            if not data:
                return
        self._forward(data, datatype)

    def _forward(self, data: bytes, datatype: asyncssh.DataType) -> None:
        # Recorded (queued) first, then forwarded: the recorder's acknowledgment window bounds what is
        # forwarded before it is written, and a failed recording forwards nothing more (fail closed).
        if self.ctx.recorder.append_data(self.ctx.number, "output" if datatype is None else "stderr", data) \
                or self.ctx.forward_unrecorded:
            self.chan.write(data, datatype)
            if self.line_guard is not None:
                self.line_guard.device_output(data)

    def _release_tail(self, held: bytes) -> None:
        """The held line, judged with all the context there is (TailHold): forwarded unless the channel ended."""
        if not self.closed and self.scanner is not None:
            self._forward(held, None)

    def _judged(self, direction: str, data: bytes) -> bool:
        """Feed the stream judge before delivering ``data``; True when it must not be delivered: a file-transfer
        protocol on this channel ends it (one line on stderr, exit 1), and nothing more crosses it."""
        if self.closed:
            return True
        refusal = self.judge.feed(direction, data)
        if refusal is None:
            return False
        self.judge = None
        self.exit_sent = True  # the device's own exit status must not follow
        self.notice(refusal)
        self.exit(1)
        return True

    def expect_reply(self, size: int) -> None:
        """Used by subsystem filters: the largest packet :meth:`write_to_vendor` may get next (0: none more)."""
        self.ctx.recorder.expect_unit(size, key=self)

    def write_to_vendor(self, data: bytes) -> None:
        """Used by subsystem filters: record and send device-side bytes to the vendor.

        While the recorder is paused the reply waits in the outbox, unrecorded and unsent, and the device side
        is held until the outbox is empty: so the filter parses, judges and hashes the device's next reply while
        the writer thread writes the last one (an SFTP download no longer alternates between the two), and the
        acknowledgment rule is kept (a reply is appended when it is sent, and only when the recorder has room
        for it)."""
        if self._outbox is not None and (self._outbox or self.ctx.recorder.paused) and not self.closed:
            self._outbox.append(data)
            self._holds.hold("device", "outbox")
            return
        if self.ctx.recorder.append_data(self.ctx.number, "output", data) or self.ctx.forward_unrecorded:
            self.chan.write(data)

    def _flush_outbox(self) -> None:
        """Send waiting replies while the recorder has room; then read the device again and run what waited."""
        box = self._outbox
        assert box is not None
        while box and not self.ctx.recorder.paused and not self.closed:
            data = box.popleft()
            if self.ctx.recorder.append_data(self.ctx.number, "output", data) or self.ctx.forward_unrecorded:
                self.chan.write(data)
        if box and not self.closed:
            return
        box.clear()
        self._holds.release("device", "outbox")
        after, self._after_outbox = self._after_outbox, []
        for action in after:
            action()

    def device_eof(self) -> None:
        """Device EOF: held until the exit status is known (or briefly), like sshd's own ordering.

        OpenSSH clients close a session channel once both sides sent EOF; an exit status arriving
        after that is lost (a ControlMaster mux client then exits 255). sshd sends exit-status before
        EOF when the command ends, so the relay does the same.
        """
        self._run_held_exit(now=True)  # all the device's output came before its EOF: a held exit goes now
        self._tail.flush()
        self.ctx.recorder.append_event(self.ctx.number, "eof", {"from": "device"})
        if self.closed or self.eof_state != "none" or self.input_refusal is not None or self.unrecordable:
            return
        if self.exit_sent:
            self._send_eof()
        else:
            self.eof_state = "held"
            asyncio.get_running_loop().call_later(EOF_HOLD_S, self._send_eof)

    def _send_eof(self) -> None:
        if self.eof_state != "sent" and not self.closed:
            self.eof_state = "sent"
            self.chan.write_eof()

    def _run_held_exit(self, *, now: bool) -> None:
        held, self._held_exit = self._held_exit, None
        if held is not None:
            self.device_exited(status=held[0], signal=held[1], now=now)

    def device_exited(self, *, status: int | None = None, signal: tuple | None = None, now: bool = False) -> None:
        """Forward the device's exit-status or exit-signal at once (after replies waiting in the outbox), then
        any held EOF."""
        if self.unrecordable:
            return
        if self._outbox:  # asyncssh delivers an exit request at once, ahead of data it still holds for us
            self._after_outbox.append(lambda: self.device_exited(status=status, signal=signal))
            return
        if self._holds["device"] and self.up is not None and not self.closed and not now:
            # the same while the device side is held (the recorder's window is full): the output asyncssh still
            # holds comes first, to the vendor and in the recording, then the exit (_run_held_exit: when reading
            # resumes, or at the device's EOF or close, which asyncssh delivers after all its data)
            self._held_exit = (status, signal)
            return
        if self.upstream is not None:
            self.upstream.flush(force=True)  # a batch read before the exit request goes first
        self._tail.flush()
        if self.closed or self.exit_sent or self.input_refusal is not None:
            return
        self.exit_sent = True
        if signal is not None:
            sig, core, msg, lang = signal
            self.ctx.recorder.append_event(self.ctx.number, "exit", {"signal": sig, "core_dumped": core})
            args: tuple[bytes, ...] = (String(sig), Boolean(core), String(msg), String(lang))
            request = b"exit-signal"
        else:
            assert status is not None  # callers give a status or a signal
            self.exit_code = status
            self.ctx.recorder.append_event(self.ctx.number, "exit", {"status": status})
            args, request = (UInt32(status & 0xFF),), b"exit-status"
        try:  # asyncssh has no public "send exit status, keep open"; pinned version, covered by tests
            self.chan._send_request(request, *args)
        except OSError:
            return
        if self.eof_state == "held":
            self._send_eof()

    def device_closed(self, up: UpstreamSession, exc: Exception | None) -> None:
        if self.closed or self.input_refusal is not None:  # a refused input ends the channel itself
            return
        if self.unrecordable:  # the session ends the channel with the reason; should it not, end it here
            asyncio.get_running_loop().call_later(UNRECORDABLE_END_S, self._end_unrecordable)
            return
        self._run_held_exit(now=True)
        if not self.exit_sent:
            self.ctx.recorder.append_event(self.ctx.number, "exit", {"status": None})
            if exc is not None:  # not a channel the device closed: its connection died, say so
                self.notice(self.ctx.on_device_lost(self, exc))
        self._send_eof()
        self.closed = True
        self.chan.close()
        self._finish()

    def _end_unrecordable(self) -> None:
        if not self.closed:
            self.notice("the recording failed, and medbroker never runs a session it cannot record; the channel "
                        "was ended. Tell the hospital's security team.")
            self.exit(1)

    # ------------------------------------------------------------ broker actions
    def notice(self, message: str, *, stdout: bool = False) -> None:
        """Show a broker message on the vendor's terminal (stderr; ``stdout``: in order with the device's
        output, as a PTY merges them anyway) and record it."""
        if self.chan is None or self.closed:
            return
        self.ctx.recorder.append_event(self.ctx.number, "notice", {"text": message})
        eol = "\r\n" if self.pty else "\n"
        try:
            (self.chan.write if stdout else self.chan.write_stderr)(
                f"{eol if self.pty else ''}medbroker: {message.replace(chr(10), eol)}{eol}".encode())
        except OSError:  # the vendor already closed the channel
            pass

    def exit(self, status: int) -> None:
        """End the vendor channel with ``status`` on the broker's own initiative (recorded)."""
        if self.closed:
            return
        self.closed = True
        self.exit_code = status
        self.ctx.recorder.append_event(self.ctx.number, "exit", {"status": status})
        try:
            self.chan.exit(status)
        except OSError:
            pass
        if self.up is not None:
            self.up.close()
        self._finish()

    def _finish(self) -> None:
        if getattr(self, "_finished", False):
            return
        self._finished = True
        self.closed = True
        for part in (self.filter, self.handler, self.line_guard):
            if part is not None:
                try:
                    part.close()
                except Exception:  # the summary must not prevent closing
                    self.log.exception("subsystem filter or exec handler close failed")
        self.ctx.recorder.append_event(self.ctx.number, "channel-close", {})
        self.ctx.on_closed(self)


class OneShotSession(asyncssh.SSHServerSession):
    """A channel that accepts whatever is asked (pty, shell, exec, subsystem), remembers it, and answers
    once from ``session_started``: refusals and the broker's own commands."""

    def __init__(self) -> None:
        self.pty = False
        self.command: str | None = None
        self.subsystem: str | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple, term_modes: Mapping[int, int]) -> bool:
        self.pty = True
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str | bytes) -> bool:
        self.command = command.decode("utf-8", "replace") if isinstance(command, bytes) else command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.subsystem = subsystem
        return True

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        pass  # one-shot channels read no input

    def eof_received(self) -> bool:
        return True


class RefusalSession(OneShotSession):
    """A channel that only explains why it was refused, then exits 1."""

    def __init__(self, message: str, on_shown: Callable[[], None] | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.message = message
        self.on_shown, self.on_closed = on_shown, on_closed

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_closed:
            self.on_closed()

    def session_started(self) -> None:
        eol = "\r\n" if self.pty else "\n"
        self.chan.write_stderr(f"medbroker: {self.message.replace(chr(10), eol)}{eol}".encode())
        if self.on_shown:
            self.on_shown()
        self.chan.exit(1)
