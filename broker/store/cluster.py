"""Cluster nodes, their heartbeats and duty leases (issue 13 item 4; broker/nodes.py runs them).

Portable SQL on purpose (a PostgreSQL store implements the same methods with the same statements): ``?``
placeholders, ``INSERT ... ON CONFLICT`` (SQLite >= 3.24 and PostgreSQL), no SQLite-only functions. Times are
UTC ISO-8601 text of one fixed width (``utc_iso``), so comparing them as text compares the instants.
"""

from __future__ import annotations

from typing import Any

from broker.store.base import StoreBase

__all__ = ["ClusterQueries"]


class ClusterQueries(StoreBase):
    """Nodes and leases: part of :class:`broker.store.Store`."""

    # ------------------------------------------------------------------ nodes
    def register_node(self, node_id: str, *, host: str, pid: int, address: str, version: str, now: str) -> None:
        """This node (re)starts: one row per node id, its previous end (stopped or dead) cleared."""
        self.execute(
            "INSERT INTO nodes (id, host, pid, address, version, started_at, heartbeat_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
            "address = excluded.address, version = excluded.version, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, stopped_at = NULL, dead_at = NULL, dead_by = NULL",
            (node_id, host, pid, address, version, now, now))

    def get_node(self, node_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM nodes WHERE id = ?", (node_id,))

    def list_nodes(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM nodes ORDER BY id")

    def heartbeat_node(self, node_id: str, pid: int, now: str) -> bool:
        """Write this node's heartbeat; False when a survivor has declared it dead meanwhile (then it must stop
        serving: its sessions were sealed elsewhere) or another process took the id over."""
        cur = self.execute("UPDATE nodes SET heartbeat_at = ?, stopped_at = NULL WHERE id = ? AND pid = ? "
                           "AND dead_at IS NULL", (now, node_id, pid))
        return cur.rowcount == 1

    def stop_node(self, node_id: str, pid: int, now: str) -> None:
        """A clean shutdown: the node is stopped (not dead) and lets go of its leases."""
        with self.transaction() as conn:
            conn.execute("UPDATE nodes SET stopped_at = ?, heartbeat_at = ? WHERE id = ? AND pid = ? "
                         "AND dead_at IS NULL", (now, now, node_id, pid))
            conn.execute("DELETE FROM duty_leases WHERE holder = ?", (node_id,))

    def silent_nodes(self, before: str, *, besides: str) -> list[dict[str, Any]]:
        """Nodes to recover, except ``besides`` (the asking node): those neither stopped nor declared dead whose
        last heartbeat is older than ``before``, and those already dead or stopped that still have live
        sessions (a survivor that began recovering them died half-way)."""
        return self.query(
            "SELECT * FROM nodes n WHERE n.id != ? AND ((n.stopped_at IS NULL AND n.dead_at IS NULL "
            "AND n.heartbeat_at < ?) OR ((n.stopped_at IS NOT NULL OR n.dead_at IS NOT NULL) AND EXISTS "
            "(SELECT 1 FROM sessions s WHERE s.node_id = n.id AND s.status = 'live'))) ORDER BY n.id",
            (besides, before))

    def declare_node_dead(self, node_id: str, heartbeat_at: str, by: str, now: str) -> bool:
        """Mark a silent node dead, only if its heartbeat is still the one that was judged too old (a beat that
        arrived meanwhile wins); False when it beat, stopped or was declared dead already."""
        cur = self.execute("UPDATE nodes SET dead_at = ?, dead_by = ? WHERE id = ? AND heartbeat_at = ? "
                           "AND dead_at IS NULL AND stopped_at IS NULL", (now, by, node_id, heartbeat_at))
        return cur.rowcount == 1

    def node_live_sessions(self, node_id: str) -> list[dict[str, Any]]:
        """The sessions a node still serves according to the database (``status = 'live'``)."""
        return self.query("SELECT * FROM sessions WHERE node_id = ? AND status = 'live' ORDER BY started_at",
                          (node_id,))

    def live_sessions_by_node(self) -> dict[str | None, list[dict[str, Any]]]:
        """Every live session, grouped by the node that serves it (None: written before nodes existed)."""
        out: dict[str | None, list[dict[str, Any]]] = {}
        for row in self.query("SELECT id, node_id, broker_pid, user_name, device, started_at, source, bytes_in, "
                              "bytes_out, last_activity_at FROM sessions WHERE status = 'live' ORDER BY started_at"):
            out.setdefault(row["node_id"], []).append(row)
        return out

    # ------------------------------------------------------------------ leases
    def take_lease(self, name: str, holder: str, now: str, expires: str, *, renew: bool) -> tuple[bool, str]:
        """Try to hold lease ``name`` until ``expires``: who wins is the row count of one UPDATE.

        :param renew: the holder may extend its own lease (recovery of a dead node); without it (a periodic
            duty) the lease is taken only once it has run out, so a duty runs once per period whoever runs it
        :returns: (won, the lease's expiry after the attempt: when to try again)
        """
        with self.transaction() as conn:
            conn.execute("INSERT INTO duty_leases (name, holder, expires_at) VALUES (?, '', ?) "
                         "ON CONFLICT (name) DO NOTHING", (name, now))
            if renew:
                cur = conn.execute("UPDATE duty_leases SET holder = ?, expires_at = ? WHERE name = ? "
                                   "AND (holder = ? OR expires_at <= ?)", (holder, expires, name, holder, now))
            else:
                cur = conn.execute("UPDATE duty_leases SET holder = ?, expires_at = ? WHERE name = ? "
                                   "AND expires_at <= ?", (holder, expires, name, now))
            won = cur.rowcount == 1
            row = conn.execute("SELECT expires_at FROM duty_leases WHERE name = ?", (name,)).fetchone()
        return won, row[0]

    def release_lease(self, name: str, holder: str) -> None:
        """Let go of a lease this holder has (a finished recovery); another holder's lease stays."""
        self.execute("DELETE FROM duty_leases WHERE name = ? AND holder = ?", (name, holder))

    def leases(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM duty_leases ORDER BY name")

    # ------------------------------------------------------------------ backlog
    def journal_lag(self) -> int:
        """Rows in the recording journal: acknowledged batches not yet dropped (sealed and, with [archive],
        archived). The archive backlog is :meth:`broker.store.archive.ArchiveQueries.archive_backlog`."""
        row = self.one("SELECT count(*) AS n FROM recording_journal")
        return int(row["n"]) if row else 0
