"""Two ``medbroker serve`` nodes (one home, one host key) behind a real HAProxy with PROXY protocol v2.

Everything is real and on loopback: sshd (the device), HAProxy (Debian's package, TCP mode, send-proxy-v2,
health checks), two broker processes on different ports sharing the home's SQLite file, OpenSSH clients.
The vendor's ssh binds 127.0.0.5 (or another loopback address), so the client's real address differs from
HAProxy's (127.0.0.1, the only address in ``listen.proxy_protocol_from``): what the broker audits, counts
and locks must be the former.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.proxy_header import build_proxy_header
from frontdoor_support import REPO, Serve, prepared_home
from helpers import find_binary, openssh_required, poll
from helpers.clients import run_ssh, ssh_options, write_known_hosts
from helpers.haproxy import HAProxy, haproxy_binary, haproxy_config
from helpers.keys import generate_keypair
from helpers.net import free_port
from helpers.sshd import SshdDevice

pytestmark = pytest.mark.openssh

CONFIG = """\
[listen]
proxy_protocol_from = ["127.0.0.1/32"]
login_timeout = "5s"
[limits]
max_auth_failures = 3
max_connections_per_address = 2
[cluster]
heartbeat = "1s"
dead_after = "3s"
"""


def _need_haproxy() -> None:
    if haproxy_binary() is None:
        if openssh_required():
            pytest.fail("haproxy is missing and MEDBROKER_REQUIRE_OPENSSH=1; run scripts/install.sh", pytrace=False)
        pytest.skip("haproxy is missing; run scripts/install.sh (CI fails here instead of skipping)")


def _read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    """The first line of a child's stdout within ``timeout`` seconds (b"" if it ends first)."""
    assert proc.stdout is not None
    deadline, buf = time.monotonic() + timeout, b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not buf.endswith(b"\n") and time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(proc.stdout.fileno(), 1)
                if not chunk:
                    break
                buf += chunk
    return buf


class Cluster:
    """A device, a prepared home, two nodes and HAProxy in front of them; ``ssh(..., source=ADDR)``."""

    def __init__(self, tmp: Path, *, check_inter: str = "200ms", readyz: bool = False) -> None:
        _need_haproxy()
        self.tmp = tmp
        self.device = SshdDevice(tmp / "device").start()
        self.nodes: dict[str, Serve] = {}
        self.ports: dict[str, int] = {}
        self.web_ports: dict[str, int] | None = {} if readyz else None  # each node's console, for /readyz
        self.haproxy: HAProxy | None = None
        try:
            self.home, self.keys = prepared_home(tmp, self.device, CONFIG)
            for name in ("node1", "node2"):
                self.start_node(name)
            self.haproxy = HAProxy([(name, port) for name, port in self.ports.items()], check_inter=check_inter,
                                   readyz_ports=self.web_ports)
            host_key = (self.home / "keys" / "host_ed25519.pub").read_text()
            # One known_hosts line for the balancer's address: valid whichever node answers.
            self.known_hosts = write_known_hosts(tmp / "known_hosts", "127.0.0.1", self.haproxy.port, host_key)
        except BaseException:
            self.close()
            raise

    def start_node(self, name: str) -> Serve:
        port = self.ports.setdefault(name, free_port())
        web = []
        if self.web_ports is not None:
            web = ["--web", f"127.0.0.1:{self.web_ports.setdefault(name, free_port())}"]
        self.nodes[name] = Serve(self.home, port, self.tmp / f"{name}.log", "--node-id", name, *web)
        return self.nodes[name]

    @property
    def port(self) -> int:
        assert self.haproxy is not None
        return self.haproxy.port

    def ssh(self, login: str, command: str, *, source: str, key=None, port: int | None = None,
            timeout: float = 30.0):
        who = login.split("@")[0]
        return run_ssh(login, "127.0.0.1", port or self.port, key or self.keys[who].private_path, command,
                       known_hosts=self.known_hosts if port is None else None, timeout=timeout,
                       extra_opts=["-o", f"BindAddress={source}"])

    def popen_ssh(self, login: str, command: str, *, source: str) -> subprocess.Popen:
        """A long-running vendor session (the caller waits for it or terminates it)."""
        who = login.split("@")[0]
        argv = [find_binary("ssh") or "ssh", *ssh_options(key=self.keys[who].private_path, known_hosts=self.known_hosts,
                                    host_key_checking="yes"),
                "-o", f"BindAddress={source}", "-p", str(self.port), f"{login}@127.0.0.1", command]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def rows(self, sql: str, *args) -> list[dict]:
        """Rows of the nodes' shared database, read-only (the nodes keep writing meanwhile)."""
        db = sqlite3.connect(f"file:{self.home / 'medbroker.db'}?mode=ro", uri=True, timeout=10)
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, args).fetchall()]
        finally:
            db.close()

    def events(self, name: str) -> list[dict]:
        rows = self.rows("SELECT * FROM audit_events WHERE event = ? ORDER BY id", name)
        return [r | {"details": json.loads(r["details"] or "{}")} for r in rows]

    def sessions(self) -> list[dict]:
        return self.rows("SELECT * FROM sessions ORDER BY started_at")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(self.home), *args],
                              capture_output=True, cwd=REPO, timeout=60)

    def close(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes.values():
            node.stop()
        self.device.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("balancer"))
    try:
        yield c
    finally:
        c.close()


def test_the_vendors_own_address_is_audited_and_recorded(cluster: Cluster) -> None:
    result = cluster.ssh("alice@ct-01", "echo through-the-balancer", source="127.0.0.5")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.strip() == b"through-the-balancer"
    session = poll(lambda: [s for s in cluster.sessions() if s["source"] == "127.0.0.5" and s["status"] == "closed"])
    assert len(session) == 1  # written when the session's recording is closed, just after ssh exits
    logins = [e for e in cluster.events("auth.success") if e["user_name"] == "alice"]
    assert logins and logins[-1]["source"] == "127.0.0.5"
    starts = [e for e in cluster.events("session.start") if e["session_id"] == session[0]["id"]]
    assert starts and starts[0]["source"] == "127.0.0.5"
    # The balancer's own address is nowhere: not in sessions, not in any login row
    assert not [s for s in cluster.sessions() if s["source"] == "127.0.0.1"]
    login_rows = cluster.events("auth.success") + cluster.events("auth.failure")
    assert not [e for e in login_rows if e["source"] == "127.0.0.1"]
    # and HAProxy's health checks (a LOCAL header every 200 ms on both nodes) leave no trace at all
    assert cluster.events("proxy.refused") == []
    # each node says in the audit trail which addresses it trusts to send headers
    assert [e["details"]["proxy_protocol_from"] for e in cluster.events("broker.started")] == [["127.0.0.1/32"]] * 2


def test_lockout_locks_the_vendors_address_not_the_balancer(cluster: Cluster) -> None:
    stranger = generate_keypair(cluster.tmp / "people", "stranger")
    for _ in range(3):
        bad = cluster.ssh("alice@ct-01", "true", source="127.0.0.6", key=stranger.private_path)
        assert bad.returncode == 255 and b"Permission denied" in bad.stderr
    locks = poll(lambda: [e for e in cluster.events("auth.lockout") if e["user_name"] == "alice"])
    assert [e["source"] for e in locks] == ["127.0.0.6"]
    refused = cluster.ssh("alice@ct-01", "true", source="127.0.0.6")  # the right key, from the locked address
    assert refused.returncode == 255
    assert b"too many failed logins for alice from 127.0.0.6" in refused.stderr, refused.stderr.decode()
    other = cluster.ssh("alice@ct-01", "echo still-works", source="127.0.0.16")  # same balancer, other address
    assert other.returncode == 0 and other.stdout.strip() == b"still-works", other.stderr.decode()


def test_the_per_address_cap_counts_the_vendors_address(cluster: Cluster) -> None:
    held = [cluster.popen_ssh("alice@ct-01", "sleep 20", source="127.0.0.7") for _ in range(2)]
    try:
        assert poll(lambda: len([s for s in cluster.sessions()
                                 if s["source"] == "127.0.0.7" and s["status"] == "live"]) == 2, timeout=20)
        third = cluster.ssh("alice@ct-01", "true", source="127.0.0.7")
        assert third.returncode == 255
        assert b"too many connections from 127.0.0.7" in third.stderr, third.stderr.decode()
        other = cluster.ssh("alice@ct-01", "echo not-counted", source="127.0.0.8")
        assert other.returncode == 0 and other.stdout.strip() == b"not-counted", other.stderr.decode()
    finally:
        for proc in held:
            proc.terminate()
            proc.communicate(timeout=10)
    caps = [e for e in cluster.events("auth.failure") if e["details"].get("reason") == "connection limit reached"]
    assert caps and {e["source"] for e in caps} == {"127.0.0.7"}


def test_a_direct_connection_from_the_balancers_address_without_a_header_is_refused(cluster: Cluster) -> None:
    node_port = cluster.ports["node1"]
    result = cluster.ssh("alice@ct-01", "true", source="127.0.0.1", port=node_port)
    assert result.returncode == 255
    assert b"Connection closed" in result.stderr or b"Connection reset" in result.stderr, result.stderr.decode()
    rows = poll(lambda: [e for e in cluster.events("proxy.refused") if e["source"] == "127.0.0.1"])
    assert rows and "SSH version line" in rows[-1]["details"]["reason"]
    assert not [s for s in cluster.sessions() if s["source"] == "127.0.0.1"]


def test_a_header_from_anywhere_else_is_refused_and_its_address_ignored(cluster: Cluster) -> None:
    """A vendor connecting to a node directly cannot choose its address: the header is refused, SSH never
    gets past the version line, and the claimed address appears nowhere."""
    node_port = cluster.ports["node2"]
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.9", 0))
        sock.connect(("127.0.0.1", node_port))
        sock.sendall(build_proxy_header("10.66.66.66", 4242, "127.0.0.1", node_port) + b"SSH-2.0-OpenSSH_9.2\r\n")
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
    assert got == b"SSH-2.0-medbroker\r\n"  # the server speaks first; then the connection is closed
    rows = poll(lambda: [e for e in cluster.events("proxy.refused") if e["source"] == "127.0.0.9"])
    assert rows and "not in listen.proxy_protocol_from" in rows[-1]["details"]["reason"]
    everything = cluster.rows("SELECT source, details FROM audit_events")
    assert not [r for r in everything if "10.66.66.66" in f"{r['source']} {r['details']}"]
    # A plain SSH client from a non-balancer address still works directly (no header is asked of it)
    direct = cluster.ssh("alice@ct-01", "echo direct", source="127.0.0.10", port=node_port)
    assert direct.returncode == 0 and direct.stdout.strip() == b"direct", direct.stderr.decode()
    assert [s for s in cluster.sessions() if s["source"] == "127.0.0.10"]


def test_the_docs_show_the_configuration_the_tests_use() -> None:
    doc = (REPO / "docs" / "ha.md").read_text()
    nodes = [("node1", "10.0.0.11:2222"), ("node2", "10.0.0.12:2222")]
    example = haproxy_config("0.0.0.0:22", nodes, admin_socket="/run/haproxy/admin.sock", log="/dev/log")
    assert example in doc
    readiness = haproxy_config("0.0.0.0:22", nodes, admin_socket="/run/haproxy/admin.sock", log="/dev/log",
                               readyz_ports={"node1": 9464, "node2": 9464})
    assert readiness[readiness.index("\nbackend medbroker") + 1:] in doc  # the variant's backend section


def test_a_killed_node_is_marked_down_and_the_vendor_continues_on_the_survivor(tmp_path: Path) -> None:
    # Checks every 2 s (fall 2): the vendor reconnects before HAProxy has noticed, so the reconnect shows
    # redispatch at work (the dead node refuses the connection, HAProxy tries the other at once).
    c = Cluster(tmp_path, check_inter="2s")
    try:
        first = c.popen_ssh("alice@ct-01", "echo started; sleep 30", source="127.0.0.5")
        assert _read_line(first, 20) == b"started\n"  # the session runs on one of the nodes
        live = poll(lambda: [s for s in c.sessions() if s["status"] == "live"], timeout=20)
        assert live
        # The node writes frames in 20 ms batches after handing them on (the acknowledgment rule,
        # docs/recording-format.md): a kill within that window loses what the vendor just saw, with or without
        # a balancer (durable-before-acknowledged is the journal's job, issue 13 item 3). Kill after it.
        time.sleep(0.5)
        pids = {name: node.proc.pid for name, node in c.nodes.items()}
        victim = next(name for name, pid in pids.items() if pid == live[0]["broker_pid"])
        survivor = next(name for name in pids if name != victim)
        killed_at = time.monotonic()
        c.nodes[victim].kill9()
        _, err = first.communicate(timeout=20)  # the vendor's connection ended with the node
        assert first.returncode == 255 and b"closed by remote host" in err, err
        assert c.haproxy is not None
        assert not c.haproxy.states()[victim].startswith("DOWN")  # HAProxy has not noticed yet (2 checks, 2 s apart)

        again = c.ssh("alice@ct-01", "echo continued", source="127.0.0.5")  # the same command, nothing else
        back_s = time.monotonic() - killed_at
        assert again.returncode == 0 and again.stdout.strip() == b"continued", again.stderr.decode()
        c.haproxy.wait_state({victim: "DOWN", survivor: "UP"}, timeout=15)
        down_s = time.monotonic() - killed_at
        second = poll(lambda: [s for s in c.sessions() if s["id"] != live[0]["id"] and s["status"] == "closed"])[0]
        assert second["broker_pid"] == pids[survivor]
        assert second["grant_id"] == live[0]["grant_id"] and second["source"] == "127.0.0.5"
        replay = c.cli("replay", second["id"], "--instant")
        assert replay.returncode == 0 and b"continued" in replay.stdout, replay.stderr.decode()

        # The survivor declares the silent node dead (dead_after 3 s) and seals its session from the shared home
        sealed = poll(lambda: [s for s in c.sessions() if s["id"] == live[0]["id"] and s["status"] == "incomplete"],
                      timeout=15)
        assert sealed and f"recording sealed by node {survivor}" in sealed[0]["end_reason"], sealed
        before = c.cli("replay", live[0]["id"], "--instant")  # what the vendor saw before the kill is evidence
        assert before.returncode == 0 and b"started" in before.stdout, before.stderr.decode()

        c.start_node(victim)  # back under its id, and HAProxy takes it again
        c.haproxy.wait_state({victim: "UP"}, timeout=15)
        verify = c.cli("audit", "verify")
        assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
        print(f"kill -9: the vendor's next session ran {back_s:.2f} s after it; HAProxy marked the node DOWN after "
              f"{down_s:.2f} s")
    finally:
        c.close()


def test_a_stuck_node_goes_down_when_haproxy_checks_readiness(tmp_path: Path) -> None:
    """The connect check cannot see a node whose process is stopped (the kernel still accepts its connections);
    checking ``/readyz`` over HTTP can: the stopped node goes DOWN and the vendor lands on the other."""
    c = Cluster(tmp_path, check_inter="500ms", readyz=True)
    try:
        first = c.ssh("alice@ct-01", "echo one", source="127.0.0.5")
        assert first.returncode == 0 and first.stdout.strip() == b"one", first.stderr.decode()
        row = poll(lambda: [s for s in c.sessions() if s["status"] == "closed"])
        pids = {name: node.proc.pid for name, node in c.nodes.items()}
        victim = next(name for name, pid in pids.items() if pid == row[0]["broker_pid"])
        survivor = next(name for name in pids if name != victim)
        assert c.haproxy is not None
        os.kill(pids[victim], signal.SIGSTOP)
        try:
            took = c.haproxy.wait_state({victim: "DOWN", survivor: "UP"}, timeout=20)
            again = c.ssh("alice@ct-01", "echo two", source="127.0.0.5")
            assert again.returncode == 0 and again.stdout.strip() == b"two", again.stderr.decode()
            second = poll(lambda: [s for s in c.sessions() if s["id"] != row[0]["id"] and s["status"] == "closed"])
            assert second and second[0]["broker_pid"] == pids[survivor] and second[0]["source"] == "127.0.0.5"
        finally:
            os.kill(pids[victim], signal.SIGCONT)
        # Stopped longer than [cluster] dead_after, it was declared dead; awake, it fences itself (docs/ha.md,
        # "Nodes") and HAProxy keeps it out
        assert c.nodes[victim].proc.wait(20) == 75
        assert c.haproxy.states()[victim].startswith("DOWN")
        print(f"SIGSTOP: HAProxy's /readyz check marked the node DOWN after {took:.2f} s")
    finally:
        c.close()


def test_worker_processes_behind_the_balancer_each_read_the_header(tmp_path: Path) -> None:
    """``listen.workers = 2``: the supervisor binds the port, each worker listens on it (SO_REUSEPORT) through the
    front protocol; the kernel spreads HAProxy's connections, and whichever worker takes one sees the vendor."""
    _need_haproxy()
    device = SshdDevice(tmp_path / "device").start()
    node = proxy = None
    try:
        home, keys = prepared_home(tmp_path, device, CONFIG.replace("[listen]\n", "[listen]\nworkers = 2\n"))
        port = free_port()
        node = Serve(home, port, tmp_path / "node.log")
        proxy = HAProxy([("node1", port)])
        known = write_known_hosts(tmp_path / "known_hosts", "127.0.0.1", proxy.port,
                                  (home / "keys" / "host_ed25519.pub").read_text())
        pids: set[int] = set()
        for n in range(12):
            if len(pids) == 2:
                break
            source = f"127.0.1.{n + 1}"
            result = run_ssh("alice@ct-01", "127.0.0.1", proxy.port, keys["alice"].private_path, "echo w",
                             known_hosts=known, extra_opts=["-o", f"BindAddress={source}"])
            assert result.returncode == 0 and result.stdout.strip() == b"w", result.stderr.decode()
            db = sqlite3.connect(f"file:{home / 'medbroker.db'}?mode=ro", uri=True, timeout=10)
            try:
                rows = db.execute("SELECT broker_pid FROM sessions WHERE source = ?", (source,)).fetchall()
            finally:
                db.close()
            assert len(rows) == 1  # the session carries the vendor's address, not 127.0.0.1
            pids.add(rows[0][0])
        assert len(pids) == 2 and node.proc.pid not in pids  # both workers served vendors through the balancer
    finally:
        if proxy is not None:
            proxy.stop()
        if node is not None:
            node.stop()
        device.close()


# ---------------------------------------------------------------- the front protocol, in-process broker

# ssh's ProxyCommand: connect to the broker, send a PROXY v2 header claiming SOURCE (one byte at a time, or
# together with ssh's first bytes in one segment), then copy both ways. A balancer stand-in for the header's
# edge cases that HAProxy itself never produces.
PREFIXER = r'''
import os, socket, sys, threading, time
sys.path.insert(0, sys.argv[5])
from broker.proxy_header import build_proxy_header
host, port, source, how = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sock = socket.create_connection((host, port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
header = build_proxy_header(source, 50505, "::1" if ":" in source else host, port)
if how == "bytewise":
    for i in range(len(header)):
        sock.sendall(header[i:i + 1])
        time.sleep(0.003)
else:
    sock.sendall(header + os.read(0, 65536))  # the header and ssh's version line in one segment
def up():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := sock.recv(65536):
    os.write(1, data)
'''

FRONT_CONFIG = '[listen]\nproxy_protocol_from = ["127.0.0.1/32"]\nlogin_timeout = "4s"\n'


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory):
    from frontdoor_support import close_world, world_with

    tmp = tmp_path_factory.mktemp("front")
    (tmp / "prefixer.py").write_text(PREFIXER)
    w = world_with(tmp, FRONT_CONFIG)
    try:
        w.grant()
        yield w
    finally:
        close_world(w)


def _front_rows(world, event: str) -> list[dict]:
    return [r | {"details": json.loads(r["details"] or "{}")} for r in world.events(event) if r["event"] == event]


def _exchange(port: int, data: bytes, *, shut: bool = False, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` from 127.0.0.1, then read until the broker closes; (what came back, seconds it took)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
    return got, time.monotonic() - start


@pytest.mark.parametrize("how,source", [("bytewise", "10.20.30.40"), ("together", "2001:db8::42")])
def test_a_header_in_pieces_or_with_the_first_ssh_bytes_hands_over_cleanly(front, how: str, source: str) -> None:
    proxy = f"{sys.executable} {front.tmp / 'prefixer.py'} %h %p {source} {how} {REPO}"
    result = front.ssh("alice@ct-01", "echo handed-over", extra_opts=["-o", f"ProxyCommand={proxy}"])
    assert result.returncode == 0 and result.stdout.strip() == b"handed-over", result.stderr.decode()
    ours = poll(lambda: [s for s in front.app.store.list_sessions() if s["source"] == source])
    assert len(ours) == 1
    assert poll(lambda: [e for e in _front_rows(front, "session.end") if e["session_id"] == ours[0]["id"]])


def test_health_checks_and_bare_probes_from_the_balancer_are_closed_quietly(front) -> None:
    def rows() -> list[dict]:  # everything but the broker's own periodic checkpoints
        return [r for r in front.events() if r["event"] != "audit.checkpoint"]

    before = rows()
    got, _ = _exchange(front.port, build_proxy_header(None))  # HAProxy's check-send-proxy: LOCAL
    assert got == b""  # no SSH version line: nothing starts for the balancer's own connection
    got, _ = _exchange(front.port, b"", shut=True)  # a bare TCP check: connect, close
    assert got == b""
    time.sleep(0.3)  # an audit row would be written off the loop
    assert rows() == before


@pytest.mark.parametrize("data,shut,reason", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", False, "starts with an SSH version line"),
    (b"PROXY TCP4 10.1.1.1 127.0.0.1 5000 22\r\n", False, "version 1 (text) header"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", False, "at most 1040 are accepted"),  # refused before 64 KiB arrive
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c" + bytes(12), False, "UDP over IPv4"),
    (b"\r\n\r\n\x00", True, "closed after 5 bytes of an incomplete PROXY header"),
    (b"\r\n\r\n\x00", False, "no complete PROXY protocol v2 header within 4 s (5 bytes of it arrived)"),
])
def test_a_bad_missing_or_late_header_closes_before_ssh_and_is_audited(front, data: bytes, shut: bool,
                                                                       reason: str) -> None:
    time.sleep(1.05)  # audited at most once a second per address: each case gets its own row
    count = len(_front_rows(front, "proxy.refused"))
    got, took = _exchange(front.port, data, shut=shut)
    assert got == b""  # the broker never said a word of SSH
    rows = poll(lambda: _front_rows(front, "proxy.refused")[count:])
    assert len(rows) == 1 and rows[0]["source"] == "127.0.0.1" and reason in rows[0]["details"]["reason"], rows
    if "within 4 s" in reason:
        assert 3.8 < took < 8  # listen.login_timeout bounds the wait for a header
    else:
        assert took < 3  # at once, not at the header timeout


def test_a_flood_of_bad_headers_is_one_row_a_second(front) -> None:
    time.sleep(1.05)
    count = len(_front_rows(front, "proxy.refused"))
    start = time.monotonic()
    for _ in range(30):
        assert _exchange(front.port, b"GET / HTTP/1.0\r\n\r\n")[0] == b""
    elapsed = time.monotonic() - start
    time.sleep(0.3)
    rows = _front_rows(front, "proxy.refused")[count:]
    assert 1 <= len(rows) <= int(elapsed) + 1, (len(rows), elapsed)
