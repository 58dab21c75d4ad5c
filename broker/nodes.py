"""This broker as one node of a cluster: it joins, heartbeats, runs cluster-wide duties under leases, recovers
the sessions of nodes that died, and leaves (docs/ha.md "Nodes").

Several ``medbroker serve`` processes share one database (today one SQLite home on one machine; PostgreSQL
with the store of issue 13 item 2). Each is a node with an id (``[cluster] node_id``, default the host name)
and a row in ``nodes``:

* **Join** at start (``cluster.node.joined``): refused when another live process holds the same id.
* **Heartbeat** every ``[cluster] heartbeat`` from the control loop. A heartbeat that finds this node declared
  dead (a survivor already sealed its sessions) fences the node: it audits ``cluster.node.fenced`` and exits
  at once, without touching those sessions again.
* **Dead nodes**: a node whose heartbeat is older than ``[cluster] dead_after`` is declared dead
  (``cluster.node.dead``) by one survivor, which holds the lease ``recover:NODE`` while it seals that node's live
  sessions from what was written (broker/live.py ``seal_orphaned_sessions``: the recording file, or the journal
  when the file is not here), marks them incomplete with the reason, indexes them and audits
  ``cluster.sessions.recovered``.
* **Duties** (audit checkpoints, request expiry, directory sync, and whatever :meth:`Node.add_duty` adds:
  archiving, retention) run under a lease per duty that lasts one period: whichever node takes it runs the
  duty, the others skip until it runs out. Each duty is safe to repeat.
* **Leave** on a clean shutdown (``cluster.node.stopped``): the node is "stopped", not dead, and its leases go.

Clocks: heartbeats are compared with the observer's clock, so the nodes' clocks must agree (NTP) to well
under ``dead_after``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Awaitable, Callable

from broker import __version__
from broker.clock import parse_utc, utc_iso
from broker.cluster import recover_lease
from broker.errors import BrokerError
from broker.live import process_alive, seal_orphaned_sessions
from broker.session_context import SessionServices

__all__ = ["Node", "Duty", "FENCED_EXIT", "RECOVER_LEASE_S"]

log = logging.getLogger("medbroker.nodes")

FENCED_EXIT = 75  # exit status of a node that found itself declared dead (EX_TEMPFAIL: restart it)
RECOVER_LEASE_S = 120.0  # one survivor recovers a dead node; another takes over if it dies within this long


@dataclass
class Duty:
    """A cluster-wide periodic job: run by one node per ``period_s``; must be safe to repeat."""

    name: str
    period_s: float
    run: Callable[[], Awaitable[Any]]
    next_try: float = 0.0  # loop time of this node's next attempt at the lease
    running: bool = False


class Node:
    """One broker node's membership (see the module doc). Owned by the ``Broker`` that runs the duties."""

    def __init__(self, services: SessionServices, *, node_id: str, address: str, pid: int | None = None) -> None:
        self.services = services
        self.app = services.app
        self.id = node_id
        self.address = address
        self.pid = pid or os.getpid()
        self.host = socket.gethostname()
        cfg = self.app.config
        self.heartbeat_s = float(cfg.seconds("cluster", "heartbeat"))
        self.dead_after_s = float(cfg.seconds("cluster", "dead_after"))
        self.duties: dict[str, Duty] = {}
        self.joined = False
        self._next_beat = 0.0
        self._beating = False
        self._recovering: set[str] = set()
        self.fence: Callable[[], None] = _exit_fenced  # what a fenced node does: exit the process

    def add_duty(self, name: str, period_s: float, run: Callable[[], Awaitable[Any]]) -> None:
        """Run ``run()`` once per ``period_s`` across the cluster (lease ``duty:NAME``). Add before the loop starts
        or at any time; archiving and retention (issue 13 item 3) hook in here."""
        self.duties[name] = Duty(name, float(period_s), run)

    def _now(self) -> datetime:
        return self.app.clock.now()

    # ------------------------------------------------------------------ join and leave
    async def join(self) -> None:
        """Register this node (audited ``cluster.node.joined``).

        :raises BrokerError: another process that is alive serves under this node id
        """
        store, now = self.app.store, self._now()
        row = await self.services.db(store.get_node, self.id)
        if row is not None and not row["stopped_at"] and not row["dead_at"] and row["pid"] != self.pid:
            age = (now - parse_utc(row["heartbeat_at"])).total_seconds()
            same_host = row["host"] == self.host
            if age <= self.dead_after_s and (not same_host or process_alive(row["pid"])):
                raise BrokerError(
                    f"cluster node id {self.id!r} is in use by process {row['pid']} on {row['host']} "
                    f"(heartbeat {age:.1f}s ago)",
                    "give each node its own id ([cluster] node_id in broker.toml, or serve --node-id ID), or stop "
                    "that node first")
        await self.services.db(lambda: store.register_node(self.id, host=self.host, pid=self.pid,
                                                           address=self.address, version=__version__,
                                                           now=utc_iso(now)))
        self.joined = True
        await self.services.audit("cluster.node.joined", node=self.id, host=self.host, pid=self.pid,
                                  address=self.address, version=__version__,
                                  previous=_previous(row))

    async def leave(self) -> None:
        """A clean shutdown: the node is stopped (not dead) and lets go of its leases (``cluster.node.stopped``)."""
        if not self.joined:
            return
        self.joined = False
        store = self.app.store
        await self.services.db(lambda: store.stop_node(self.id, self.pid, utc_iso(self._now())))
        await self.services.audit("cluster.node.stopped", node=self.id, host=self.host, pid=self.pid)

    # ------------------------------------------------------------------ the control loop's tick
    def tick(self) -> None:
        """Called by the control loop every 0.25 s: start what is due (heartbeat, duties) as background tasks."""
        if not self.joined:
            return
        now = asyncio.get_running_loop().time()
        if now >= self._next_beat and not self._beating:
            self._next_beat = now + self.heartbeat_s
            self._beating = True
            self.services.spawn(self._beat())
        for duty in self.duties.values():
            if now >= duty.next_try and not duty.running:
                duty.running = True
                self.services.spawn(self._try_duty(duty))

    async def _beat(self) -> None:
        try:
            store, now = self.app.store, utc_iso(self._now())
            if not await self.services.db(store.heartbeat_node, self.id, self.pid, now):
                await self._fenced()
                return
            before = utc_iso(self._now() - timedelta(seconds=self.dead_after_s))
            for row in await self.services.db(lambda: store.silent_nodes(before, besides=self.id)):
                if row["id"] not in self._recovering:
                    self._recovering.add(row["id"])
                    self.services.spawn(self._recover(row))
        except Exception:  # the next beat tries again
            log.exception("node heartbeat failed")
        finally:
            self._beating = False

    async def _try_duty(self, duty: Duty) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = self._now()
            won, expires = await self.services.db(
                lambda: self.app.store.take_lease(f"duty:{duty.name}", self.id, utc_iso(now),
                                                  utc_iso(now + timedelta(seconds=duty.period_s)), renew=False))
            # Next attempt when the lease runs out, whoever holds it (at least 0.25 s away: a clock step).
            left = (parse_utc(expires) - self._now()).total_seconds()
            duty.next_try = loop.time() + max(0.25, min(duty.period_s, left))
            if won:
                await duty.run()
        except Exception:
            duty.next_try = loop.time() + min(duty.period_s, 5.0)
            log.exception("cluster duty %s failed", duty.name)
        finally:
            duty.running = False

    # ------------------------------------------------------------------ dead nodes
    async def _recover(self, row: dict[str, Any]) -> None:
        """Declare a silent node dead and seal its live sessions, under its recover lease (one survivor)."""
        store, node = self.app.store, row["id"]
        lease = recover_lease(node)
        try:
            now = self._now()
            won, _ = await self.services.db(lambda: store.take_lease(
                lease, self.id, utc_iso(now), utc_iso(now + timedelta(seconds=RECOVER_LEASE_S)), renew=True))
            if not won:
                return  # another survivor recovers it
            silent_s = (now - parse_utc(row["heartbeat_at"])).total_seconds()
            declared = not row["dead_at"] and not row["stopped_at"]  # else: gone, with sessions left live
            if declared and not await self.services.db(store.declare_node_dead, node, row["heartbeat_at"], self.id,
                                                       utc_iso(now)):
                await self.services.db(store.release_lease, lease, self.id)
                return  # it beat (or stopped) in the meantime: not dead
            sessions = await self.services.db(store.node_live_sessions, node)
            if declared:
                await self.services.audit("cluster.node.dead", node=node, host=row["host"], pid=row["pid"],
                                          last_heartbeat_at=row["heartbeat_at"], silent_s=round(silent_s, 1),
                                          dead_after_s=self.dead_after_s, by=self.id,
                                          live_sessions=[s["id"] for s in sessions])
            if row["stopped_at"]:
                reason = f"node {node} stopped without ending this session; recording sealed by node {self.id}"
            else:
                reason = (f"node {node} stopped responding (no heartbeat for {silent_s:.0f}s); "
                          f"recording sealed by node {self.id}")
            results = await seal_orphaned_sessions(self.services, sessions, reason, node=node, by=self.id)
            await self.services.audit("cluster.sessions.recovered", node=node, by=self.id, count=len(results),
                                      sessions=results)
            await self.services.db(store.release_lease, lease, self.id)
            log.warning("node %s is dead (silent %.0fs): %d live session(s) sealed and marked incomplete", node,
                        silent_s, len(results))
        except Exception:  # the lease runs out and a survivor (maybe this one) tries again
            log.exception("recovering node %s failed", node)
        finally:
            self._recovering.discard(node)

    async def _fenced(self) -> None:
        """This node was declared dead by a survivor (it was silent past dead_after: paused, cut off, overloaded)
        and its sessions were sealed elsewhere: stop serving at once rather than write to them again."""
        log.critical("this node (%s) was declared dead by another node; its sessions were sealed there. "
                     "Exiting now (status %d); restart it to serve again", self.id, FENCED_EXIT)
        try:
            await asyncio.wait_for(self.services.audit("cluster.node.fenced", node=self.id, host=self.host,
                                                       pid=self.pid, exit_status=FENCED_EXIT), 5)
        finally:
            self.fence()


def _exit_fenced() -> None:
    logging.shutdown()
    os._exit(FENCED_EXIT)


def _previous(row: dict[str, Any] | None) -> str | None:
    """How this node's previous run ended: stopped, dead, or None (first start, or it crashed unnoticed)."""
    if row is None:
        return None
    return "stopped" if row["stopped_at"] else "dead" if row["dead_at"] else "crashed"
