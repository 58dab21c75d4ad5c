"""Nodes that know each other (issue 13 item 4): broker/nodes.py, broker/cluster.py, broker/store/cluster.py.

The store and lease tests use a real SQLite database and a real PostgreSQL; the node tests run two real
``medbroker serve`` processes with different node ids on one home (its SQLite file, or ``[store] url`` on the
session's PostgreSQL), a real sshd device and OpenSSH clients, and SIGKILL/SIGSTOP one node. On PostgreSQL also:
LISTEN/NOTIFY between nodes, and a node SIGKILLed during a large upload with the journal on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from broker.app import open_app
from broker.clock import parse_utc, utc_iso
from broker.cluster import ALIVE, DEAD, STOPPED, cluster_status, node_state
from broker.grants import approve_request, request_grant
from broker.identity import get_principal
from broker.keys import FileKeyProvider
from broker.listener import start_server, stop_server
from broker.nodes import FENCED_EXIT
from broker.store import Store, open_store
from frontdoor_support import Serve, prepared_home, wait
from helpers.clients import run_ssh, ssh_options, write_known_hosts
from helpers import journal_bytes
from helpers.net import free_port
from helpers.pty import PtySession
from sessions.recording import read_frames

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 12, 7, 2, 0, 0, tzinfo=timezone.utc)
FAST = '[cluster]\nheartbeat = "1s"\ndead_after = "3s"\n'  # 3 missed heartbeats: dead


def at(seconds: float) -> str:
    return utc_iso(T0 + timedelta(seconds=seconds))


@pytest.fixture
def db(store_target):
    store = open_store(store_target)
    yield store
    store.close()


# ---------------------------------------------------------------- the store: nodes and leases


def test_a_lease_goes_to_one_holder_until_it_runs_out(db: Store, store_target) -> None:
    other = open_store(store_target, migrate=False)  # a second connection: another process or node
    try:
        assert db.take_lease("duty:x", "a", at(0), at(30), renew=False) == (True, at(30))
        assert other.take_lease("duty:x", "b", at(1), at(31), renew=False) == (False, at(30))
        assert db.take_lease("duty:x", "a", at(2), at(32), renew=False) == (False, at(30))  # once per period
        assert other.take_lease("duty:x", "b", at(30), at(60), renew=False) == (True, at(60))  # ran out: b's
        # renewable leases (recovery): the holder extends its own, nobody else can until it runs out
        assert db.take_lease("recover:n", "a", at(0), at(120), renew=True)[0]
        assert db.take_lease("recover:n", "a", at(5), at(125), renew=True) == (True, at(125))
        assert not other.take_lease("recover:n", "b", at(6), at(126), renew=True)[0]
        other.release_lease("recover:n", "b")  # not b's: stays
        assert not other.take_lease("recover:n", "b", at(7), at(127), renew=True)[0]
        db.release_lease("recover:n", "a")
        assert other.take_lease("recover:n", "b", at(8), at(128), renew=True)[0]
    finally:
        other.close()


def test_heartbeat_dead_declaration_and_rejoin(db: Store) -> None:
    db.register_node("a", host="h1", pid=10, address="127.0.0.1:1", version="1", now=at(0))
    db.register_node("b", host="h1", pid=11, address="127.0.0.1:2", version="1", now=at(0))
    assert db.heartbeat_node("a", 10, at(1))
    assert not db.heartbeat_node("a", 99, at(1))  # another process under the same id does not beat for it
    assert [n["id"] for n in db.silent_nodes(at(0.5), besides="a")] == ["b"]
    assert db.silent_nodes(at(0.5), besides="b") == []
    # a beat that arrives between the judgement and the declaration wins
    db.heartbeat_node("b", 11, at(2))
    assert not db.declare_node_dead("b", at(0), "a", at(3))
    assert db.declare_node_dead("b", at(2), "a", at(6))
    assert not db.declare_node_dead("b", at(2), "a", at(7))  # once
    assert not db.heartbeat_node("b", 11, at(8))  # fenced: it must stop serving
    assert db.silent_nodes(at(100), besides="a") == []  # dead nodes are not declared again
    now = T0 + timedelta(seconds=8)
    states = {r["id"]: node_state(r, now, 3).state for r in db.list_nodes()}
    assert states == {"a": DEAD, "b": DEAD}  # a: silent 7 s (nobody declared it yet); b: declared
    assert node_state(db.get_node("a"), T0 + timedelta(seconds=2), 3).state == ALIVE
    db.stop_node("a", 10, at(9))
    assert node_state(db.get_node("a"), now, 3).state == STOPPED
    db.register_node("b", host="h2", pid=12, address="127.0.0.1:3", version="2", now=at(10))  # restarted
    row = db.get_node("b")
    assert (row["dead_at"], row["stopped_at"], row["host"], row["pid"]) == (None, None, "h2", 12)
    assert db.heartbeat_node("b", 12, at(11))


def test_a_dead_or_stopped_node_with_sessions_left_live_is_recovered_again(db: Store) -> None:
    """A survivor that died half-way through a recovery leaves sessions live on a dead node: the next survivor
    still finds that node (and a stopped node that left a session live)."""
    for node in ("a", "b", "c"):
        db.register_node(node, host="h", pid=1, address="x:1", version="1", now=at(0))
    assert db.declare_node_dead("b", at(0), "a", at(5))
    db.stop_node("c", 1, at(5))
    assert db.silent_nodes(at(1), besides="a") == []  # b dead and c stopped, neither with sessions
    for sid, node in (("s-b", "b"), ("s-c", "c")):
        db.insert_session({"id": sid, "user_name": "alice", "device": "ct-01", "grant_id": 1, "started_at": at(0),
                           "status": "live", "recording": f"{sid}.mbr", "broker_pid": 1, "node_id": node})
    assert [n["id"] for n in db.silent_nodes(at(1), besides="a")] == ["b", "c"]
    assert [s["id"] for s in db.node_live_sessions("b")] == ["s-b"]
    db.update_session("s-b", status="incomplete")
    db.update_session("s-c", status="incomplete")
    assert db.silent_nodes(at(1), besides="a") == []


def test_stop_releases_the_nodes_leases(db: Store) -> None:
    db.register_node("a", host="h", pid=1, address="x:1", version="1", now=at(0))
    assert db.take_lease("duty:audit.checkpoint", "a", at(0), at(300), renew=False)[0]
    assert db.take_lease("duty:other", "b", at(0), at(300), renew=False)[0]
    db.stop_node("a", 1, at(1))
    assert [(r["name"], r["holder"]) for r in db.leases()] == [("duty:other", "b")]
    assert db.take_lease("duty:audit.checkpoint", "a", at(2), at(302), renew=False)[0]  # the next start: at once


def test_cluster_status_counts_the_journal_rows_not_yet_archived(db: Store) -> None:
    db.register_node("a", host="h", pid=1, address="127.0.0.1:2222", version="1", now=at(0))
    doc = cluster_status(db, T0 + timedelta(seconds=1), 10)
    assert doc["journal_lag"] == 0
    for seq in (0, 1, 5):
        db.append_journal("s-1", seq, at(0), b"frames")
    assert cluster_status(db, T0 + timedelta(seconds=1), 10)["journal_lag"] == 3
    [node] = doc["nodes"]
    assert (node["id"], node["state"], node["heartbeat_age_s"], node["live_sessions"]) == ("a", ALIVE, 1.0, [])


# ---------------------------------------------------------------- duties: one node per period


def test_a_cluster_duty_runs_once_per_period_across_two_nodes(tmp_path: Path, device) -> None:
    """Two brokers (node ids a and b, each with its own database connection) on one home; a duty of 1 s
    added to both runs about once a second in total, never twice in one period."""
    home, _ = prepared_home(tmp_path, device())
    runs: list[tuple[str, float]] = []

    async def main() -> None:
        apps = [open_app(home), open_app(home)]
        apps[0].config = apps[0].config.with_node_id("node-a")
        apps[1].config = apps[1].config.with_node_id("node-b")
        servers = [await start_server(a, "127.0.0.1:0") for a in apps]
        try:
            for _, broker in servers:
                async def duty(name: str = broker.node_id) -> None:
                    runs.append((name, time.monotonic()))
                assert broker.node is not None
                broker.node.add_duty("test.tick", 1.0, duty)
            await asyncio.sleep(5.2)
        finally:
            for acceptor, broker in servers:
                await stop_server(acceptor, broker)
            for a in apps:
                a.close()

    asyncio.run(main())
    times = sorted(t for _, t in runs)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 4 <= len(runs) <= 6, runs  # 5.2 s of a 1 s duty; two independent nodes would give about 10
    assert min(gaps) > 0.7, gaps  # never twice in one period
    store = open_store(home / "medbroker.db", migrate=False)
    try:
        checkpoints = [r for r in store.audit_rows(event="audit.checkpoint") if r["event"] == "audit.checkpoint"]
    finally:
        store.close()
    # the start-up checkpoint was written once (by whichever node took the lease), plus one per clean stop
    assert len(checkpoints) == 3, [json.loads(r["details"]) for r in checkpoints]


# ---------------------------------------------------------------- two `medbroker serve` nodes


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MEDBROKER_HOME", "SSH_AUTH_SOCK", "DISPLAY")}


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(home), *args], capture_output=True,
                          env=_env(), cwd=REPO, timeout=60)


def _status(home: Path) -> dict:
    r = _cli(home, "cluster", "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _states(home: Path) -> dict[str, str]:
    return {n["id"]: n["state"] for n in _status(home)["nodes"]}


_TARGETS: dict[Path, str] = {}  # home -> its [store] url, for the homes whose database is PostgreSQL


def _store(home: Path) -> Store:
    return open_store(_TARGETS.get(home, home / "medbroker.db"), migrate=False)


def _rows(home: Path, event: str) -> list[dict]:
    store = _store(home)
    try:
        return [r | {"details": json.loads(r["details"])} for r in store.audit_rows(event=event)
                if r["event"] == event]
    finally:
        store.close()


def _session(home: Path, session_id: str) -> dict:
    store = _store(home)
    try:
        return store.get_session(session_id)
    finally:
        store.close()


def _live_ids(home: Path) -> list[str]:
    store = _store(home)
    try:
        return [r["id"] for r in store.list_sessions(status="live")]
    finally:
        store.close()


class Cluster:
    """Two ``medbroker serve`` nodes (node-a, node-b) on one home, each on its own port."""

    def __init__(self, tmp: Path, device, config: str = FAST, store_url: str | None = None) -> None:
        if store_url:
            config += f'[store]\nurl = "{store_url}"\n'
        self.home, self.people = prepared_home(tmp, device(), config=config)
        if store_url:
            _TARGETS[self.home] = store_url
        host_key = (self.home / "keys" / "host_ed25519.pub").read_text()
        self.ports = {"node-a": free_port(), "node-b": free_port()}
        self.known_hosts = tmp / "known_hosts"
        lines = []
        for port in self.ports.values():
            lines.append(write_known_hosts(tmp / f"kh{port}", "127.0.0.1", port, host_key).read_text())
        self.known_hosts.write_text("".join(lines))
        self.nodes: dict[str, Serve] = {}
        for name, port in self.ports.items():
            self.nodes[name] = Serve(self.home, port, tmp / f"{name}.log", "--node-id", name)
        self.terms: list[PtySession] = []
        self.procs: list[subprocess.Popen] = []

    def pty(self, node: str) -> PtySession:
        term = PtySession.spawn_ssh("alice@ct-01", "127.0.0.1", self.ports[node], self.people["alice"].private_path,
                                    "cat", known_hosts=self.known_hosts)
        self.terms.append(term)
        return term

    def vendor(self, node: str) -> tuple[subprocess.Popen, str]:
        """``ssh alice@ct-01 'echo ready; exec cat'`` through ``node``; (the ssh process, its session id)."""
        before = set(_live_ids(self.home))
        argv = ["ssh", *ssh_options(key=self.people["alice"].private_path, known_hosts=self.known_hosts,
                                    host_key_checking="yes"), "-p", str(self.ports[node]), "alice@ct-01@127.0.0.1",
                "echo ready; exec cat"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_env())
        self.procs.append(proc)
        assert proc.stdout.readline() == b"ready\n"
        assert wait(lambda: set(_live_ids(self.home)) - before, timeout=10)
        [sid] = set(_live_ids(self.home)) - before
        return proc, sid

    def close(self) -> None:
        for term in self.terms:
            term.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()
        for node in self.nodes.values():
            node.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def cluster(tmp_path: Path, device, request: pytest.FixtureRequest):
    """Two nodes on one database: the home's SQLite file, or a PostgreSQL database of their own."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    c = Cluster(tmp_path, device, store_url=url)
    try:
        yield c
    finally:
        c.close()
        _TARGETS.pop(c.home, None)


def _frames_text(path: Path, keys: FileKeyProvider) -> tuple[bytes, bytes]:
    frames = list(read_frames(path, key_lookup=keys.get, strict=False))
    return (b"".join(f.payload for f in frames if f.kind == "input"),
            b"".join(f.payload for f in frames if f.kind == "output"))


@pytest.mark.openssh
def test_sigkill_a_node_while_typing_the_survivor_seals_and_the_vendor_continues(cluster: Cluster) -> None:
    home = cluster.home
    status = _status(home)
    assert {n["id"]: (n["state"], n["address"]) for n in status["nodes"]} == {
        name: (ALIVE, f"127.0.0.1:{port}") for name, port in cluster.ports.items()}
    assert status["journal_lag"] == 0  # the journal is off here: nothing waits in it
    assert sorted(r["details"]["node"] for r in _rows(home, "cluster.node.joined")) == ["node-a", "node-b"]
    # cluster-wide duties: the start-up checkpoint was written by one node only
    assert len(_rows(home, "audit.checkpoint")) == 1

    term = cluster.pty("node-a")
    term.sendline("typed on node a 6x7")
    term.expect(b"typed on node a 6x7\r\n" * 2, timeout=20)  # pty echo, then cat's copy
    [sid] = _live_ids(home)
    row = _session(home, sid)
    assert row["node_id"] == "node-a"
    assert [s["id"] for s in _status(home)["sessions"] if s["node_id"] == "node-a"] == [sid]
    keys = FileKeyProvider(home / "keys" / "data.key")
    path = home / "recordings" / row["recording"]
    assert wait(lambda: b"typed on node a 6x7" in _frames_text(path, keys)[1], timeout=10)

    killed = time.monotonic()
    cluster.nodes["node-a"].kill9()
    assert term.wait(15) == 255  # ssh: connection lost
    assert wait(lambda: _session(home, sid)["status"] != "live", timeout=3 + 1 + 6, step=0.1)
    took = time.monotonic() - killed
    sealed = _session(home, sid)
    assert sealed["status"] == "incomplete"
    assert sealed["end_reason"].startswith("node node-a stopped responding (no heartbeat for ")
    assert sealed["end_reason"].endswith("s); recording sealed by node node-b")
    assert sealed["final_hash"] and sealed["signature"]
    print(f"node-a SIGKILLed: its session marked incomplete and sealed by node-b after {took:.2f}s "
          f"(dead_after 3s, heartbeat 1s)")
    assert took < 3 + 1 + 3  # dead_after + one heartbeat + margin for a loaded machine

    [dead] = _rows(home, "cluster.node.dead")
    assert dead["details"]["node"] == "node-a" and dead["details"]["by"] == "node-b"
    assert dead["details"]["live_sessions"] == [sid]
    assert wait(lambda: _rows(home, "cluster.sessions.recovered"), timeout=10)
    [recovered] = _rows(home, "cluster.sessions.recovered")
    assert recovered["details"]["sessions"] == [{"id": sid, "final_hash": sealed["final_hash"],
                                                 "sealed_from": "file"}]
    [seal] = [r for r in _rows(home, "session.sealed") if r["session_id"] == sid]
    assert (seal["details"]["node"], seal["details"]["by"]) == ("node-a", "node-b")
    assert seal["details"]["final_hash"] == sealed["final_hash"]

    status = _status(home)
    assert {n["id"]: n["state"] for n in status["nodes"]} == {"node-a": DEAD, "node-b": ALIVE}
    assert status["sessions"] == []
    [a] = [n for n in status["nodes"] if n["id"] == "node-a"]
    assert a["dead_by"] == "node-b" and a["heartbeat_age_s"] >= 3

    typed, shown = _frames_text(path, keys)
    assert b"typed on node a 6x7" in typed and b"typed on node a 6x7" in shown
    assert wait(lambda: _session(home, sid)["id"] in {
        r["session_id"] for r in _search_rows(home)}, timeout=20)  # indexed by the survivor

    verify = _cli(home, "audit", "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    [entry] = [r for r in report["recordings"] if r["session_id"] == sid]
    assert entry["state"] == "incomplete" and entry["problems"] == []
    assert report["audit"]["ok"] and report["counts"]["broken"] == 0

    # the vendor's next ssh, to the surviving node, works within the same grant
    again = run_ssh("alice@ct-01", "127.0.0.1", cluster.ports["node-b"], cluster.people["alice"].private_path,
                    "echo continued on b", known_hosts=cluster.known_hosts, timeout=30)
    assert again.returncode == 0, again.stderr
    assert again.stdout == b"continued on b\n"

    def later() -> list[tuple]:
        store = _store(home)
        try:
            return [(r["node_id"], r["grant_id"], r["status"]) for r in store.list_sessions() if r["id"] != sid]
        finally:
            store.close()

    assert wait(lambda: later() == [("node-b", sealed["grant_id"], "closed")], timeout=10), later()


def _search_rows(home: Path) -> list[dict]:
    store = _store(home)
    try:
        return store.query("SELECT DISTINCT session_id FROM search_text")
    finally:
        store.close()


def _ended_at(proc: subprocess.Popen) -> dict[str, float]:
    """The wall-clock time at which ``proc`` (a vendor's ssh) exits, noted by a thread (key "at")."""
    out: dict[str, float] = {}

    def note() -> None:
        proc.wait(30)
        out["at"] = time.time()

    threading.Thread(target=note, daemon=True).start()
    return out


def _grant(home: Path, seconds: int):
    """A new grant for alice on ct-01 (requested and approved now); returns it."""
    app = open_app(home)
    try:
        now = app.clock.now()
        req = request_grant(app.store, app.audit, app.rules, get_principal(app.store, "alice"), "ct-01", seconds,
                            "again", now)
        return approve_request(app.store, app.audit, app.rules, req.id, get_principal(app.store, "bob"), now).grant
    finally:
        app.close()


def _written_at(home: Path, event: str) -> float:
    """When the newest ``event`` row was committed (the command's database write), as a wall-clock time."""
    return parse_utc(_rows(home, event)[-1]["at"]).timestamp()


@pytest.mark.openssh
def test_kill_revoke_disable_and_expiry_reach_a_session_on_another_node_within_a_second(cluster: Cluster) -> None:
    """Kill, revoke and disable are each one write to the shared database by the CLI; the node serving the session ends it. Timed from that
    write (its audit row's time) to the moment the vendor's ssh exits; expiry from the grant's end."""
    home = cluster.home
    took = {}
    # kill: the CLI writes to the shared database; node-a ends its session
    proc, sid = cluster.vendor("node-a")
    exited = _ended_at(proc)
    r = _cli(home, "sessions", "kill", sid, "--reason", "cluster test")
    assert r.returncode == 0, r.stderr
    assert wait(lambda: "at" in exited, timeout=5)
    took["kill"] = exited["at"] - parse_utc(_session(home, sid)["kill_requested_at"]).timestamp()
    assert proc.returncode != 0 and b"security staff ended this session: cluster test" in proc.stderr.read()
    assert _session(home, sid)["status"] == "killed"

    # revoke: the grant the sessions on both nodes use
    on_a, sid_a = cluster.vendor("node-a")
    on_b, sid_b = cluster.vendor("node-b")
    assert (_session(home, sid_a)["node_id"], _session(home, sid_b)["node_id"]) == ("node-a", "node-b")
    exited_a, exited_b = _ended_at(on_a), _ended_at(on_b)
    grant = _session(home, sid_a)["grant_id"]
    r = _cli(home, "revoke", str(grant), "--reason", "cluster test", "--by", "bob")
    assert r.returncode == 0, r.stderr
    assert wait(lambda: "at" in exited_a and "at" in exited_b, timeout=5)
    took["revoke"] = max(exited_a["at"], exited_b["at"]) - _written_at(home, "grant.revoked")
    assert wait(lambda: _session(home, sid_a)["status"] == _session(home, sid_b)["status"] == "revoked", timeout=5)

    # expiry: a 4-second grant; its window ends on node-a (a timer of the process that serves the session)
    ends_at = _grant(home, 4).ends_at
    proc, sid = cluster.vendor("node-a")
    exited = _ended_at(proc)
    assert wait(lambda: "at" in exited, timeout=10)
    took["expiry"] = exited["at"] - ends_at.timestamp()
    assert wait(lambda: _session(home, sid)["status"] == "expired", timeout=5)

    # disable: a new grant, a session on node-a, the user disabled
    _grant(home, 3600)
    proc, sid = cluster.vendor("node-a")
    exited = _ended_at(proc)
    r = _cli(home, "user", "disable", "alice")
    assert r.returncode == 0, r.stderr
    assert wait(lambda: "at" in exited, timeout=5)
    took["disable"] = exited["at"] - _written_at(home, "user.disabled")
    assert wait(lambda: _session(home, sid)["status"] == "stopped", timeout=5)
    print("from the database write (expiry: the window's end) to the vendor's ssh exiting on the other node: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items()))
    assert max(took.values()) < 1.0, took


@pytest.mark.openssh
def test_a_node_declared_dead_while_paused_fences_itself(cluster: Cluster) -> None:
    """SIGSTOP node-a past dead_after: node-b declares it dead; on SIGCONT node-a's next heartbeat finds that and
    it exits (status 75) instead of serving on."""
    home = cluster.home
    a = cluster.nodes["node-a"]
    a.proc.send_signal(signal.SIGSTOP)
    try:
        assert wait(lambda: _rows(home, "cluster.node.dead"), timeout=12, step=0.2)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert a.proc.wait(10) == FENCED_EXIT
    a.proc.stdout.close()
    [fenced] = _rows(home, "cluster.node.fenced")
    assert fenced["details"]["node"] == "node-a" and fenced["details"]["exit_status"] == FENCED_EXIT
    assert _states(home) == {"node-a": DEAD, "node-b": ALIVE}
    # restarted under the same id, it serves again
    cluster.nodes["node-a"] = Serve(home, cluster.ports["node-a"], a.log, "--node-id", "node-a")
    assert _states(home) == {"node-a": ALIVE, "node-b": ALIVE}
    assert _rows(home, "cluster.node.joined")[-1]["details"]["previous"] == "dead"


@pytest.mark.openssh
def test_a_second_live_process_cannot_take_a_nodes_id(cluster: Cluster, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(cluster.home), "serve", "--listen",
                        f"127.0.0.1:{free_port()}", "--node-id", "node-a"], capture_output=True, env=_env(),
                       cwd=REPO, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"Error: cluster node id 'node-a' is in use by process {cluster.nodes['node-a'].proc.pid}" in err, err
    assert "serve --node-id ID" in err
    assert _states(cluster.home) == {"node-a": ALIVE, "node-b": ALIVE}


def test_serve_refuses_a_bad_node_id(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _cli(home, "init").returncode == 0
    r = _cli(home, "serve", "--listen", "127.0.0.1:0", "--node-id", "bad id")
    assert r.returncode == 2
    assert "node id 'bad id' is not 1-253 letters" in r.stderr.decode()


@pytest.mark.openssh
def test_with_workers_the_supervisor_is_the_node_and_its_workers_carry_its_id(tmp_path: Path, device) -> None:
    home, people = prepared_home(tmp_path, device(), config=FAST + "[listen]\nworkers = 2\n")
    port = free_port()
    known_hosts = write_known_hosts(tmp_path / "known_hosts", "127.0.0.1", port,
                                    (home / "keys" / "host_ed25519.pub").read_text())
    node = Serve(home, port, tmp_path / "node.log", "--node-id", "node-w")
    try:
        [state] = _status(home)["nodes"]
        assert (state["id"], state["state"], state["pid"]) == ("node-w", ALIVE, node.proc.pid)
        r = run_ssh("alice@ct-01", "127.0.0.1", port, people["alice"].private_path, "echo through a worker",
                    known_hosts=known_hosts, timeout=30)
        assert r.returncode == 0 and r.stdout == b"through a worker\n", r.stderr
        store = _store(home)
        try:
            [row] = store.list_sessions()
        finally:
            store.close()
        workers = {e["details"]["pid"] for e in _rows(home, "broker.worker.started")}
        assert row["node_id"] == "node-w" and row["broker_pid"] in workers
        time.sleep(1.5)  # a few heartbeats: the supervisor beats, nobody declares it dead
        assert _states(home) == {"node-w": ALIVE}
        assert [r["details"]["node"] for r in _rows(home, "cluster.node.joined")] == ["node-w"]
    finally:
        assert node.stop() == 0
    assert _states(home) == {"node-w": STOPPED}
    assert [r["details"]["node"] for r in _rows(home, "cluster.node.stopped")] == ["node-w"]


def test_cluster_status_text_names_nodes_states_and_backlogs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _cli(home, "init").returncode == 0
    r = _cli(home, "cluster", "status")
    assert r.returncode == 0 and "no node has joined yet" in r.stdout.decode()
    store = _store(home)
    try:
        now = datetime.now(timezone.utc)
        store.register_node("node-x", host="h1", pid=1, address="10.0.0.1:2222", version="0.1.0", now=utc_iso(now))
        store.register_node("node-y", host="h2", pid=2, address="10.0.0.2:2222", version="0.1.0",
                            now=utc_iso(now - timedelta(seconds=60)))
        store.register_node("node-z", host="h3", pid=3, address="10.0.0.3:2222", version="0.1.0", now=utc_iso(now))
        store.stop_node("node-z", 3, utc_iso(now))
    finally:
        store.close()
    r = _cli(home, "cluster", "status")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("node-")}
    assert (lines["node-x"][1], lines["node-y"][1], lines["node-z"][1]) == ("alive", "dead", "stopped")
    assert "journal lag: 0 rows; archive backlog: n/a (no [archive]); a node is dead after 10s without a heartbeat" in out


def test_a_recording_that_is_not_here_is_marked_incomplete_without_a_hash(tmp_path: Path) -> None:
    """The dead node's recording file is not on this machine and this broker has no journal: the session is still
    closed (incomplete, the reason), audited with sealed_from null and no final hash; nothing is invented."""
    from broker.jump import open_jump
    from broker.live import seal_orphaned_sessions
    from broker.server import Broker

    home = tmp_path / "home"
    assert _cli(home, "init").returncode == 0
    app = open_app(home)
    try:
        app.store.insert_session({"id": "20261207-020000-aaaaaa", "user_name": "alice", "device": "ct-01",
                                  "grant_id": 1, "started_at": at(0), "status": "live",
                                  "recording": "20261207-020000-aaaaaa.mbr", "broker_pid": 1, "node_id": "far"})
        rows = app.store.node_live_sessions("far")
        broker = Broker(app, open_jump=open_jump)
        results = asyncio.run(seal_orphaned_sessions(broker, rows, "node far stopped responding", node="far",
                                                     by="here"))
        assert results == [{"id": "20261207-020000-aaaaaa", "final_hash": None, "sealed_from": None}]
        row = app.store.get_session("20261207-020000-aaaaaa")
        assert (row["status"], row["end_reason"], row["final_hash"], row["signature"]) == (
            "incomplete", "node far stopped responding", None, None)
        [seal] = [r for r in app.store.audit_rows(event="session.sealed") if r["event"] == "session.sealed"]
        details = json.loads(seal["details"])
        assert (details["sealed_from"], details["final_hash"], details["node"], details["by"]) == (
            None, None, "far", "here")
        assert not (home / "recordings" / "20261207-020000-aaaaaa.mbr").exists()
    finally:
        app.close()


# ---------------------------------------------------------------- PostgreSQL: LISTEN/NOTIFY between nodes


def _listeners(admin) -> dict[str, int]:
    """The nodes' listening connections in pg_stat_activity: {application name: backend pid}."""
    rows = admin.execute("SELECT application_name, pid FROM pg_stat_activity "
                         "WHERE application_name LIKE 'medbroker-listen %'").fetchall()
    return {name: pid for name, pid in rows}


@pytest.mark.openssh
def test_postgresql_a_kill_wakes_the_other_node_at_once_and_the_poll_covers_a_lost_listener(
        tmp_path: Path, device, postgres, pg_url: str) -> None:
    """On PostgreSQL each node LISTENs; a kill written elsewhere ends a session on node-b in well under a second.
    With node-b's listening backend terminated and no new connection allowed into the database, the 0.25 s poll
    still ends the next session within a second; once connections are allowed again the listener is back
    (audited cluster.listener.reconnected) and a kill reaches node-b at once again."""
    import psycopg

    cluster = Cluster(tmp_path, device, store_url=pg_url)
    admin = psycopg.connect(postgres.url(), autocommit=True, connect_timeout=10)
    db_name = pg_url.split("/")[3].split("?")[0]
    store = _store(cluster.home)  # opened now: it must keep working while new connections are refused
    try:
        home = cluster.home
        assert wait(lambda: set(_listeners(admin)) == {"medbroker-listen node-a", "medbroker-listen node-b"},
                    timeout=10), _listeners(admin)

        def kill(sid: str, proc: subprocess.Popen) -> float:
            """Write the kill as another node would (one committed UPDATE); seconds until the vendor's ssh exits."""
            exited = _ended_at(proc)
            written = time.time()
            assert store.request_session_kill(sid, "bob", "cluster test", utc_iso(
                datetime.fromtimestamp(written, timezone.utc)))
            assert wait(lambda: "at" in exited, timeout=5, step=0.01)
            assert b"security staff ended this session: cluster test" in proc.stderr.read()
            return exited["at"] - written

        took = {}
        proc, sid = cluster.vendor("node-b")
        took["listen"] = kill(sid, proc)
        gap_proc, gap_sid = cluster.vendor("node-b")
        later_proc, later_sid = cluster.vendor("node-b")

        # node-b's listener loses its backend and cannot come back: only the poll is left
        old_pid = _listeners(admin)["medbroker-listen node-b"]
        admin.execute(f"ALTER DATABASE {db_name} ALLOW_CONNECTIONS false")
        try:
            admin.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
            assert wait(lambda: "medbroker-listen node-b" not in _listeners(admin), timeout=5)
            time.sleep(0.6)  # at least one failed reconnect
            assert "medbroker-listen node-b" not in _listeners(admin)
            took["poll"] = kill(gap_sid, gap_proc)
            assert "medbroker-listen node-b" not in _listeners(admin)  # it was the poll
        finally:
            admin.execute(f"ALTER DATABASE {db_name} ALLOW_CONNECTIONS true")
        assert wait(lambda: _listeners(admin).get("medbroker-listen node-b", old_pid) != old_pid, timeout=10)
        assert wait(lambda: _rows(home, "cluster.listener.reconnected"), timeout=10)
        [back] = _rows(home, "cluster.listener.reconnected")
        assert back["details"]["node"] == "node-b" and back["details"]["down_s"] >= 0.6
        assert "server closed the connection" in back["details"]["error"], back["details"]
        took["listen again"] = kill(later_sid, later_proc)
        assert all(_session(home, s)["status"] == "killed" for s in (sid, gap_sid, later_sid))
        print("kill written -> vendor's ssh exited on node-b: "
              + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items()))
        assert max(took.values()) < 1.0, took
        assert "listening connection to PostgreSQL lost" in (tmp_path / "node-b.log").read_text()
    finally:
        store.close()
        admin.close()
        cluster.close()
        _TARGETS.pop(cluster.home, None)



UPLOAD = b"".join(b"vendor firmware image block %08d\n" % i for i in range(1 << 20))  # 37 MiB


@pytest.mark.openssh
def test_postgresql_sigkill_a_node_during_a_large_upload_the_survivor_rebuilds_from_the_journal(
        tmp_path: Path, device, pg_url: str) -> None:
    """The journal on PostgreSQL; a 37 MiB SFTP upload through node-a; node-a SIGKILLed half-way and its recording
    file lost with it: node-b declares it dead, rebuilds the recording from the journal, seals it and marks it
    incomplete. Every byte journaled before the kill is in the sealed recording, `audit verify` passes, and the
    vendor resumes the upload through node-b within the same grant (the device ends with the whole file)."""
    dev = device()
    cluster = Cluster(tmp_path, lambda: dev, config=FAST + "[recording]\njournal = true\n", store_url=pg_url)
    home = cluster.home
    local = tmp_path / "fw.bin"
    local.write_bytes(UPLOAD)
    target = dev.root / "tmp" / "fw.bin"
    argv = ["sftp", *ssh_options(key=cluster.people["alice"].private_path, known_hosts=cluster.known_hosts,
                                 host_key_checking="yes"), "-b", "-"]
    try:
        # at most 5 MB/s (sftp -l, in Kbit/s): the kill lands half-way however fast this machine is
        upload = subprocess.Popen([*argv, "-l", "40000", "-P", str(cluster.ports["node-a"]), "alice@ct-01@127.0.0.1"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        cluster.procs.append(upload)
        upload.stdin.write(f"put {local} tmp/fw.bin\n".encode())
        upload.stdin.close()
        assert wait(lambda: target.exists() and target.stat().st_size > 8 << 20, timeout=60, step=0.05), \
            (upload.poll(), target.exists() and target.stat().st_size)
        [sid] = _live_ids(home)
        store = _store(home)
        try:
            journaled = journal_bytes(store, sid)  # acknowledged before the kill
        finally:
            store.close()
        cluster.nodes["node-a"].kill9()
        received = target.stat().st_size
        assert upload.wait(15) != 0  # the connection was lost mid-transfer
        assert received < len(UPLOAD)
        recording = home / "recordings" / _session(home, sid)["recording"]
        recording.unlink()  # node-a's disk went with it: only the journal is left
        assert wait(lambda: _session(home, sid)["status"] != "live", timeout=15, step=0.1)
        sealed = _session(home, sid)
        assert sealed["status"] == "incomplete" and sealed["final_hash"] and sealed["signature"]
        assert sealed["end_reason"].endswith("recording sealed by node node-b")
        [seal] = [r for r in _rows(home, "session.sealed") if r["session_id"] == sid]
        assert seal["details"]["sealed_from"] == "journal" and seal["details"]["rebuilt_from_journal_bytes"] > 0
        assert recording.read_bytes().startswith(journaled)  # every acknowledged frame, then the end frame
        keys = FileKeyProvider(home / "keys" / "data.key")
        frames = list(read_frames(recording, key_lookup=keys.get, strict=False))
        assert frames and frames[-1].kind == "end"
        # what the recording holds of the vendor's SFTP stream is the upload's start, in order (the last whole
        # lines it holds; SFTP's packet headers, 32 KiB apart, can split at most one of three neighbouring lines)
        sent = b"".join(f.payload for f in frames if f.kind == "input")
        last = len(sent) * 32 // 33 // 37 - 1  # surely inside: below the payload of len(sent) bytes of packets
        assert sum(UPLOAD[i * 37:(i + 1) * 37] in sent for i in (last - 2, last - 1, last)) >= 2
        verify = _cli(home, "audit", "verify", "--json")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        [entry] = [r for r in report["recordings"] if r["session_id"] == sid]
        assert entry["state"] == "incomplete" and entry["problems"] == []

        # the vendor resumes through the surviving node, within the same grant
        again = subprocess.run([*argv, "-P", str(cluster.ports["node-b"]), "alice@ct-01@127.0.0.1"],
                               input=f"reput {local} tmp/fw.bin\n".encode(), capture_output=True, env=_env(),
                               timeout=120)
        assert again.returncode == 0, again.stderr
        assert target.read_bytes() == UPLOAD
        def later() -> list[tuple]:
            store = _store(home)
            try:
                return [(r["node_id"], r["grant_id"], r["status"]) for r in store.list_sessions() if r["id"] != sid]
            finally:
                store.close()

        assert wait(lambda: later() == [("node-b", sealed["grant_id"], "closed")], timeout=10), later()
        print(f"node-a SIGKILLed with {received} of {len(UPLOAD)} B on the device, {len(journaled)} B of recording "
              f"journaled before the kill; rebuilt from the journal: {seal['details']['rebuilt_from_journal_bytes']} B, "
              f"of which {len(sent)} B of the vendor's SFTP stream ({received - len(sent)} B fewer than the device "
              "got)")
    finally:
        cluster.close()
        _TARGETS.pop(home, None)
