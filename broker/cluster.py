"""What the cluster looks like: node ids, each node's state (alive, dead, stopped) and `medbroker cluster status`.

Values and decisions only; the node's own life (register, heartbeat, duties under leases, recovering dead
nodes) runs in broker/nodes.py. docs/ha.md "Nodes".
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.clock import parse_utc
from broker.config import BrokerConfig, parse_node_id
from broker.errors import ConfigError, UsageError

__all__ = ["ALIVE", "DEAD", "STOPPED", "NodeState", "node_id_of", "node_state", "cluster_status", "recover_lease"]

ALIVE, DEAD, STOPPED = "alive", "dead", "stopped"


def node_id_of(config: BrokerConfig) -> str:
    """This node's id: ``[cluster] node_id`` (or ``serve --node-id``), else the machine's host name.

    :raises ConfigError: the host name is not a usable node id (then set one)
    """
    if config.cluster.node_id:
        return config.cluster.node_id
    host = socket.gethostname()
    try:
        return parse_node_id(host)
    except UsageError:
        raise ConfigError(f"this machine's host name {host!r} is not a usable cluster node id",
                          'set [cluster] node_id = "broker-a" in broker.toml, or run serve --node-id ID') from None


def recover_lease(node_id: str) -> str:
    """The lease one survivor holds while it recovers the sessions of dead node ``node_id``."""
    return f"recover:{node_id}"


@dataclass(frozen=True)
class NodeState:
    """One node as `cluster status` shows it."""

    id: str
    host: str
    pid: int
    address: str
    version: str
    started_at: str
    heartbeat_at: str
    state: str  # ALIVE, DEAD (declared, or silent past dead_after) or STOPPED (clean shutdown)
    heartbeat_age_s: float
    stopped_at: str | None = None
    dead_at: str | None = None
    dead_by: str | None = None
    live_sessions: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "pid": self.pid, "address": self.address, "version": self.version,
                "state": self.state, "started_at": self.started_at, "heartbeat_at": self.heartbeat_at,
                "heartbeat_age_s": round(self.heartbeat_age_s, 3), "stopped_at": self.stopped_at,
                "dead_at": self.dead_at, "dead_by": self.dead_by, "live_sessions": list(self.live_sessions)}


def node_state(row: dict[str, Any], now: datetime, dead_after_s: float,
               live_sessions: tuple[str, ...] = ()) -> NodeState:
    """A ``nodes`` row judged at ``now``: stopped after a clean shutdown; dead when a survivor declared it dead
    or its heartbeat is older than ``dead_after_s`` (not yet noticed); alive otherwise."""
    age = max(0.0, (now - parse_utc(row["heartbeat_at"])).total_seconds())
    if row["stopped_at"]:
        state = STOPPED
    elif row["dead_at"] or age > dead_after_s:
        state = DEAD
    else:
        state = ALIVE
    return NodeState(id=row["id"], host=row["host"], pid=row["pid"], address=row["address"], version=row["version"],
                     started_at=row["started_at"], heartbeat_at=row["heartbeat_at"], state=state,
                     heartbeat_age_s=age, stopped_at=row["stopped_at"], dead_at=row["dead_at"],
                     dead_by=row["dead_by"], live_sessions=live_sessions)


def cluster_status(store: Any, now: datetime, dead_after_s: float, *, archiving: bool = False) -> dict[str, Any]:
    """Nodes, their live sessions, journal lag and archive backlog (None when ``archiving`` is off: [archive]).

    :param store: the broker's :class:`~broker.store.Store`
    """
    by_node = store.live_sessions_by_node()
    nodes = [node_state(r, now, dead_after_s, tuple(s["id"] for s in by_node.get(r["id"], ())))
             for r in store.list_nodes()]
    known = {n.id for n in nodes}
    sessions = [{"id": s["id"], "node_id": node, "pid": s["broker_pid"], "user": s["user_name"],
                 "device": s["device"], "started_at": s["started_at"], "source": s["source"]}
                for node, rows in by_node.items() for s in rows]
    return {
        "nodes": [n.as_json() for n in nodes],
        "sessions": sessions,
        "unassigned_sessions": [s["id"] for s in sessions if s["node_id"] not in known],
        "journal_lag": store.journal_lag(),
        "archive_backlog": store.archive_backlog() if archiving else None,
        "dead_after_s": dead_after_s,
    }
