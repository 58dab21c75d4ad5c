"""``listen.workers > 1``: a supervisor process runs N ``medbroker serve`` worker processes on one port.

How it works (docs/architecture.md, "Several worker processes"):

* The supervisor is the process the operator started. It seals recordings that crashed brokers left live
  (once, before any worker starts), binds the vendor port itself without listening (port 0 becomes one
  free port shared by all), and starts each worker by re-executing the CLI:
  ``python -m broker.cli --home H serve --listen HOST:PORT --workers N --worker-of SUPERVISOR_PID:INDEX``.
  Re-executing (rather than forking) gives every worker its own fresh SQLite connections, store thread,
  event loop and SIEM senders; nothing is inherited from a process that already has threads.
* Each worker listens on the same port with SO_REUSEPORT (the kernel spreads new connections over the
  workers), serves its own sessions and runs the per-session duties for them (kills, revokes, window
  expiry, counters). It writes one ``READY`` line to its stdout (a pipe to the supervisor) once it accepts.
* Broker-wide duties run in the supervisor only: signed audit checkpoints and pending-request expiry (its
  :class:`~broker.server.Broker` control loop, which has no live sessions), and the web console with its
  notifier. Audit rows from all processes form one chain: every append is one ``BEGIN IMMEDIATE``
  transaction that reads the last hash (broker/store/audit.py).
* SIGINT/SIGTERM to the supervisor: SIGTERM to every worker (each ends its live sessions with the shutdown
  message and flushes its recordings), then the web console stops and the supervisor audits
  ``broker.stopped`` and signs the chain. A worker that dies otherwise is audited (``broker.worker.failed``),
  its live recordings are sealed (incomplete) and a new worker takes its place, with a back-off when workers
  keep dying right after they start. Workers stop by themselves when the supervisor disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from broker.app import App
from broker.cluster import node_id_of
from broker.service import sd_notify
from broker.config import parse_listen
from broker.errors import BrokerError, ConfigError
from broker.jump import open_jump
from broker.listener import start_server, stop_server
from broker.server import Broker
from sessions.tasks import watch

__all__ = ["READY", "reserve_port", "supervise", "serve_worker", "worker_command", "parse_worker_of"]

log = logging.getLogger("medbroker.workers")

READY = "medbroker-worker-ready"  # a worker's stdout line "READY PORT PID" once it accepts connections
READY_TIMEOUT_S = 60.0  # a worker that does not accept within this long is killed (and counts as failed)
STOP_TIMEOUT_S = 45.0  # stop_server waits up to 5 s for connections and 3 x 10 s for finishing tasks
FAST_FAILURE_S = 10.0  # a worker that dies sooner than this after it started is restarted after a back-off
MAX_BACKOFF_S = 60.0
PARENT_CHECK_S = 1.0  # how often a worker checks that its supervisor still runs
_PR_SET_PDEATHSIG = 1
_LEVELS = ("debug", "info", "warning", "error")


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind (without listening) every address of ``host`` on ``port``; port 0 picks one free port for all.

    Each socket is bound before SO_REUSEPORT is switched on, so a port that another process listens on is
    refused even when that process uses SO_REUSEPORT too (another medbroker); the workers then join with
    SO_REUSEPORT. A bound, non-listening socket receives no connections. The caller closes the sockets.

    :returns: the sockets and the port
    :raises OSError: the port is taken or the host does not resolve
    :raises ConfigError: this system has no SO_REUSEPORT
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("listen.workers > 1 needs SO_REUSEPORT, which this system lacks", "set listen.workers = 1")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    chosen = port
    try:
        seen = set()
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncssh's listen: TIME_WAIT is fine
            if family == socket.AF_INET6:  # as asyncio's create_server, which the workers use
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], chosen, *addr[2:]))
            chosen = sock.getsockname()[1]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, chosen


def parse_worker_of(text: str) -> tuple[int, int]:
    """``SUPERVISOR_PID:INDEX`` (``serve --worker-of``) as integers.

    :raises ValueError: not two non-negative whole numbers
    """
    pid, sep, index = text.partition(":")
    if not sep or not pid.isdigit() or not index.isdigit():
        raise ValueError(f"expected SUPERVISOR_PID:INDEX, got {text!r}")
    return int(pid), int(index)


def _listen_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_command(app: App, address: str, workers: int, index: int, log_level: str) -> tuple[list[str], dict]:
    """argv and environment that start worker ``index`` of this supervisor (``medbroker serve --worker-of``)."""
    argv = [sys.executable, "-m", "broker.cli", "--home", str(Path(app.home).resolve()), "serve",
            "--listen", address, "--workers", str(workers), "--log-level", log_level,
            "--worker-of", f"{os.getpid()}:{index}", "--node-id", node_id_of(app.config)]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)  # the workers import this same code
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return argv, env


def _log_level() -> str:
    name = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return name if name in _LEVELS else "warning"


@dataclass
class _Slot:
    """One worker position; its process is replaced when it dies."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    fast_failures: int = 0
    drain: asyncio.Task | None = None
    keeper: asyncio.Task | None = None


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one ``medbroker serve``."""

    def __init__(self, app: App, address: str, workers: int) -> None:
        host, port = parse_listen(address)
        self.app, self.host, self.count = app, host, workers
        self.sockets, self.port = reserve_port(host, port)
        self.address = _listen_text(host, self.port)
        try:
            # broker-wide duties, sealing, the web console's view (it accepts no connections: no jump is opened)
            self.broker = Broker(app, port=self.port, open_jump=open_jump)
        except BaseException:
            self.close()
            raise
        self.slots = [_Slot(i) for i in range(workers)]
        self.stopping = False
        self.level = _log_level()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    # ------------------------------------------------------------------ one worker
    async def start(self, slot: _Slot) -> bool:
        """Start the slot's worker and wait until it accepts; False when it exited or timed out (then it is gone).

        :raises OSError: the worker could not be started at all
        """
        argv, env = worker_command(self.app, self.address, self.count, slot.index, self.level)
        slot.proc = proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                                stdout=asyncio.subprocess.PIPE, env=env)
        assert proc.stdout is not None  # stdout=PIPE
        slot.started = time.monotonic()
        ready = False
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                while not ready:
                    line = await proc.stdout.readline()
                    if not line:
                        break
                    ready = line.startswith(READY.encode())
                    if not ready:
                        log.info("worker %s: %s", slot.index, line.decode(errors="replace").rstrip())
        except TimeoutError:
            log.error("worker %s (pid %s) did not accept connections within %.0f s; killing it", slot.index,
                      proc.pid, READY_TIMEOUT_S)
        if not ready:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        slot.drain = watch(asyncio.get_running_loop().create_task(self._drain(slot, proc)), log,
                           "reading a worker's output")
        return ready

    async def _drain(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        """Read the rest of a worker's stdout (it prints nothing after READY; log it if it does)."""
        assert proc.stdout is not None  # started with stdout=PIPE
        while line := await proc.stdout.readline():
            log.info("worker %s: %s", slot.index, line.decode(errors="replace").rstrip())

    async def keep(self, slot: _Slot) -> None:
        """Wait for the worker to end; unless the broker is stopping: audit, seal its sessions, start another."""
        while True:
            proc = slot.proc
            status = await proc.wait() if proc is not None else None
            if self.stopping:
                return
            lived = time.monotonic() - slot.started
            slot.fast_failures = slot.fast_failures + 1 if lived < FAST_FAILURE_S else 0
            delay = min(MAX_BACKOFF_S, 2.0 ** (slot.fast_failures - 1)) if slot.fast_failures else 0.0
            await self._worker_failed(slot, proc, status, delay)
            await self._sleep(delay)
            if self.stopping:
                return
            try:
                if not await self.start(slot):
                    log.error("worker %s exited before it accepted connections", slot.index)
            except OSError as exc:
                log.error("cannot start worker %s: %s", slot.index, exc)
                slot.proc, slot.started = None, time.monotonic()

    async def _worker_failed(self, slot: _Slot, proc: asyncio.subprocess.Process | None, status: int | None,
                             delay: float, *, stopping: bool = False) -> None:
        """Log and audit a worker that ended unexpectedly, then seal the recordings it left live."""
        pid = proc.pid if proc is not None else None
        how = ("could not be started" if status is None else f"was killed by signal {-status}" if status < 0
               else f"exited with status {status}")
        rows = await self.broker.db(lambda: self.app.store.list_sessions(status="live"))
        orphaned = [r["id"] for r in rows if pid is not None and r["broker_pid"] == pid]
        if stopping:
            log.error("worker %s (pid %s) %s while stopping; sealing its %d live session(s)", slot.index, pid, how,
                      len(orphaned))
        else:
            log.error("worker %s (pid %s) %s; sealing its %d live session(s), starting a new worker in %.0f s",
                      slot.index, pid, how, len(orphaned), delay)
        fields: dict[str, Any] = {"pid": pid, "worker": slot.index, "exit_status": status, "live_sessions": orphaned}
        if not stopping:
            fields["restart_in_s"] = delay
        await self.broker.audit("broker.worker.failed", reason=how, stopping=stopping, **fields)
        await self.broker.seal_interrupted()  # skips sessions of workers that are still alive

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.25, end - time.monotonic()))

    # ------------------------------------------------------------------ all workers
    async def start_all(self) -> None:
        """Start every worker and wait until all accept.

        :raises BrokerError: a worker exited (its own error is on stderr above) or did not become ready
        """
        results = await asyncio.gather(*(self.start(s) for s in self.slots), return_exceptions=True)
        failed = [(s, r) for s, r in zip(self.slots, results) if r is not True]
        if failed:
            slot, result = failed[0]
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            why = (f"could not be started ({result})" if isinstance(result, Exception)
                   else f"exited with status {slot.proc.returncode}" if slot.proc is not None else "failed")
            raise BrokerError(f"broker worker {slot.index} {why} before it accepted connections",
                              "its error is printed above; fix it, or run a single process with --workers 1")
        for slot in self.slots:
            slot.keeper = watch(asyncio.get_running_loop().create_task(self.keep(slot)), log, "keeping a worker")

    async def stop_all(self) -> None:
        """SIGTERM every worker and wait (bounded); one that does not stop is killed. Then seal what is left live."""
        self.stopping = True
        keepers = [s.keeper for s in self.slots if s.keeper is not None]
        for task in keepers:  # a keeper may be starting a replacement: cancelling it stops that too
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        live = [(s, s.proc) for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for slot, proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for slot, proc in live:
            try:
                status = await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("worker %s (pid %s) did not stop within %.0f s; killing it", slot.index, proc.pid,
                          STOP_TIMEOUT_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                status = await proc.wait()
            if status not in (0, -signal.SIGTERM):
                await self._worker_failed(slot, slot.proc, status, 0.0, stopping=True)
        await asyncio.gather(*(s.drain for s in self.slots if s.drain is not None), return_exceptions=True)
        await self.broker.seal_interrupted()  # whatever a killed or crashed worker left live


async def supervise(app: App, address: str, *, on_ready: Callable[[int], None] | None = None) -> None:
    """``medbroker serve`` with ``listen.workers > 1``: run the workers until SIGINT/SIGTERM (see module doc).

    :param on_ready: called with the port once every worker accepts connections (and the web console runs)
    :raises OSError: the port is taken
    :raises BrokerError: a worker could not start, or the web console could not
    """
    sup = Supervisor(app, address, app.config.listen.workers)
    broker = sup.broker
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    web, metrics, started = None, None, False
    try:
        await broker.seal_interrupted()  # once, before any worker serves
        node = await broker.join_cluster(sup.address)  # this process is the node: heartbeat, duties, dead nodes
        exit_now = node.fence
        node.fence = lambda: _fence(sup, exit_now)  # a fenced node's workers die with it, without a clean end
        broker.start_control()  # checkpoints and request expiry: this process only
        starting = loop.create_task(sup.start_all())
        stopped = loop.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            stopped.cancel()
            starting.result()  # raises when a worker could not start
            if app.config.web.address:  # [web] address or `serve --web`: this process only
                from broker.web import start_web

                web = await start_web(app, app.config.web.address, broker=broker)
            if app.config.metrics.address:  # this process only; counters come from the shared audit log
                from broker.health import start_metrics_listener

                metrics = await start_metrics_listener(app, app.config.metrics.address, broker=broker)
            await broker.audit("broker.started", address=sup.address, pid=broker.pid, workers=sup.count,
                               worker_pids=[s.proc.pid for s in sup.slots])  # type: ignore[union-attr]  # all started
            started = True
            if on_ready:
                on_ready(sup.port)
            await stop.wait()
            sd_notify("STOPPING=1")
        else:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    finally:
        try:
            if metrics is not None:
                from broker.health import stop_metrics_listener

                await stop_metrics_listener(metrics)
            if web is not None:
                from broker.web import stop_web

                await stop_web(web)
            await sup.stop_all()
            await broker.stop_control()
            pending = [t for t in broker.tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=10)
            await broker.leave_cluster()
            if started:
                await broker.audit("broker.stopped", pid=broker.pid, workers=sup.count)
            await broker.write_checkpoint()  # signs every worker's last rows too
        finally:
            sup.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _fence(sup: Supervisor, exit_now: Callable[[], None]) -> None:
    """This node was declared dead by a survivor that sealed its sessions: SIGKILL every worker (a SIGTERM would
    end their sessions cleanly and write over what the survivor recorded), then exit."""
    for slot in sup.slots:
        if slot.proc is not None and slot.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()
    exit_now()


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its supervisor dies (checked by polling as well)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the poll in serve_worker still notices
        pass


async def _watch_parent(supervisor_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != supervisor_pid:
            log.warning("the supervisor (pid %s) is gone; stopping this worker", supervisor_pid)
            stop.set()
            return
        await asyncio.sleep(PARENT_CHECK_S)


async def serve_worker(app: App, address: str, *, index: int, supervisor_pid: int) -> None:
    """One worker process: serve ``address`` with SO_REUSEPORT until SIGTERM/SIGINT or the supervisor is gone.

    Writes ``READY PORT PID`` to stdout once it accepts connections. Seals nothing at start (the supervisor
    did) and runs no broker-wide duties.

    :raises OSError: the port cannot be shared
    """
    _die_with_parent()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
        return
    acceptor, broker = await start_server(app, address, seal=False, worker=index)
    watch = loop.create_task(_watch_parent(supervisor_pid, stop))
    try:
        sys.stdout.write(f"{READY} {broker.port} {broker.pid}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await stop_server(acceptor, broker)
