"""Concurrency load generator: N interactive asyncssh sessions, each typing one key every interval.

Runs in its own process (``python -m bench.loadgen SPEC.json``) so its CPU is not the broker's. Protocol on
stdout, one JSON object per line: ``{"event": "ready", ...}`` once every session is open and echoing; after the
bench writes ``go`` on stdin, the typing phase, then ``{"event": "measured"}`` (sessions still open); after
the next stdin line, the sessions close and ``{"event": "done", ...}`` follows with the
keystroke round-trip statistics and every error. Each session runs ``stty raw -echo; printf R; exec cat``
in a PTY and checks that each key comes back unchanged. All waits are bounded.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass

import asyncssh

from bench.stats import percentile

__all__ = ["main"]

COMMAND = "stty raw -echo; printf R; exec cat"
KEY_TIMEOUT_S = 10.0


class _Echo(asyncssh.SSHClientSession):
    """Collects what the device echoes; wakes the waiter when the expected byte arrives."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future | None = None
        self.want = b""
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done() and self.want in self.buf:
            self.waiter.set_result(time.perf_counter_ns())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"channel closed: {exc}"))

    async def expect(self, want: bytes, timeout: float) -> int:
        self.want = want
        self.waiter = asyncio.get_running_loop().create_future()
        if want in self.buf:
            self.waiter.set_result(time.perf_counter_ns())
        try:
            return await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None


@dataclass
class _Stats:
    rtt_ns: list[int]
    errors: list[str]
    connected: int = 0


async def _open(spec: dict, sem: asyncio.Semaphore, stats: _Stats, i: int):
    """Connect (through the jump host for proxyjump) and start the echo session; returns (conns, chan, echo)."""
    common = dict(known_hosts=spec["known_hosts"], client_keys=[spec["key"]], config=None, agent_path=None,
                  encryption_algs=["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"],
                  connect_timeout=60, keepalive_interval=0, gss_auth=False, gss_kex=False)
    async with sem:
        conns = []
        try:
            tunnel = None
            if spec.get("jump_port"):
                tunnel = await asyncssh.connect("127.0.0.1", spec["jump_port"], username=spec["jump_user"], **common)
                conns.append(tunnel)
            # local_addrs: each session binds one of them (a balancer that hashes the source sees many clients)
            local = spec.get("local_addrs")
            bind = {"local_addr": (local[i % len(local)], 0)} if local else {}
            conn = await asyncssh.connect("127.0.0.1", spec["port"], username=spec["user"], tunnel=tunnel,
                                          **common, **bind)
            conns.append(conn)
            chan, echo = await conn.create_session(_Echo, COMMAND, term_type="xterm", term_size=(80, 24),
                                                   encoding=None)
            await echo.expect(b"R", 60)
            echo.buf = b""
            stats.connected += 1
            return conns, chan, echo
        except (OSError, asyncssh.Error, asyncio.TimeoutError, ConnectionError) as exc:
            stats.errors.append(f"session {i} setup: {type(exc).__name__}: {exc}")
            for c in conns:
                c.close()
            return None


async def _type(chan, echo: _Echo, spec: dict, stats: _Stats, i: int, until: float) -> None:
    interval = spec["interval_s"]
    await asyncio.sleep(random.random() * interval)  # spread the sessions over the interval
    n = 0
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        tick = loop.time()
        key = bytes([97 + (i + n) % 26])
        n += 1
        echo.buf = b""
        t0 = time.perf_counter_ns()
        chan.write(key)
        try:
            t1 = await echo.expect(key, KEY_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            stats.errors.append(f"session {i} key {n}: {type(exc).__name__}: {exc}")
            return
        if echo.buf != key:
            stats.errors.append(f"session {i} key {n}: sent {key!r}, got {echo.buf[:40]!r}")
        stats.rtt_ns.append(t1 - t0)
        await asyncio.sleep(max(0.0, interval - (loop.time() - tick)))


async def _lag_probe(until: float, lags: list[float]) -> None:
    """How late this process's own event loop wakes up (it adds to every measured round trip)."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append((time.perf_counter() - t - 0.01) * 1000)


async def _run(spec: dict) -> None:
    stats = _Stats([], [])
    sem = asyncio.Semaphore(spec.get("ramp_concurrency", 16))
    t0 = time.perf_counter()
    opened = await asyncio.gather(*(_open(spec, sem, stats, i) for i in range(spec["sessions"])))
    live = [o for o in opened if o is not None]
    ramp_s = time.perf_counter() - t0
    _say({"event": "ready", "connected": len(live), "setup_errors": len(stats.errors), "ramp_s": ramp_s})
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() == "go":
        loop = asyncio.get_running_loop()
        until = loop.time() + spec["duration_s"]
        lags: list[float] = []
        t_go = time.perf_counter()
        await asyncio.gather(_lag_probe(until, lags),
                             *(_type(chan, echo, spec, stats, i, until) for i, (_, chan, echo) in enumerate(live)))
        measured_s = time.perf_counter() - t_go
    else:
        lags, measured_s = [], 0.0
    _say({"event": "measured"})
    # keep every session open until the bench has sampled the device and broker (bounded wait)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), 120)
    except asyncio.TimeoutError:
        pass
    for conns, chan, _ in live:
        chan.close()
    for conns, _, _ in live:
        for c in reversed(conns):
            c.close()
    for conns, _, _ in live:
        for c in reversed(conns):
            try:
                await asyncio.wait_for(c.wait_closed(), 10)
            except asyncio.TimeoutError:
                c.abort()
    rtt = sorted(x / 1e6 for x in stats.rtt_ns)
    lag = sorted(lags)
    _say({
        "event": "done", "sessions": spec["sessions"], "connected": len(live), "ramp_s": ramp_s,
        "measured_s": measured_s, "keystrokes": len(rtt),
        "rtt_ms": {q: percentile(rtt, float(q)) for q in ("50", "90", "99", "99.9", "100")},
        "loop_lag_ms": {q: percentile(lag, float(q)) for q in ("50", "99", "100")},
        "errors": len(stats.errors), "error_samples": stats.errors[:20],
    })


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.loadgen SPEC.json``: see the module docstring for the protocol."""
    args = sys.argv[1:] if argv is None else argv
    with open(args[0]) as fh:
        spec = json.load(fh)
    try:
        import uvloop

        uvloop.run(_run(spec))
    except ImportError:  # pragma: no cover
        asyncio.run(_run(spec))


if __name__ == "__main__":
    main()
