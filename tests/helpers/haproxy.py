"""A real HAProxy (Debian's package) in TCP mode on loopback in front of broker nodes, for the balancer tests.

The configuration comes from :func:`haproxy_config`, which also renders the example in docs/ha.md
("Balancer"; tests/test_balancer.py checks the two agree): ``send-proxy-v2`` to every node, health checks
that send a PROXY v2 LOCAL header (``check-send-proxy``), ``balance source`` so one client address stays on
one node while that node is up, and redispatch to another node when a connection to the chosen one fails.
The admin socket (a unix socket in the helper's directory) tells the tests what HAProxy thinks of each node.
HAProxy runs in the foreground (``-db``) as a child of the test, never as the system service.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import HelperTimeoutError
from helpers.net import free_port

__all__ = ["HAProxy", "haproxy_binary", "haproxy_config"]


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def haproxy_config(bind: str, nodes: list[tuple[str, str]], *, admin_socket: str, log: str = "stderr",
                   check_inter: str = "1s", readyz_ports: dict[str, int] | None = None) -> str:
    """haproxy.cfg for medbroker nodes: ``bind`` the vendors' address, ``nodes`` [(name, "HOST:PORT")].

    :param readyz_ports: {node: port of its /readyz (web console or [metrics] listener)}: check readiness over
        HTTP instead of sending a LOCAL header to the SSH port (a node that accepts TCP but is stuck goes DOWN)
    """
    servers = "".join(f"    server {name} {address}\n" for name, address in nodes)
    checks = f"send-proxy-v2 check check-send-proxy inter {check_inter} fall 2 rise 2"
    http_check = ""
    if readyz_ports is not None:
        servers = "".join(f"    server {name} {address} check port {readyz_ports[name]}\n" for name, address in nodes)
        checks = f"send-proxy-v2 inter {check_inter} fall 2 rise 2"
        http_check = "    option httpchk GET /readyz  # 200 while the node's database takes writes (docs/operations.md)\n" \
                     "    http-check expect status 200\n"
    log_line = "stderr format raw local0 info" if log == "stderr" else f"{log} local0 info"
    return f"""\
global
    log {log_line}
    maxconn 4096
    stats socket {admin_socket} mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 3s
    timeout client 10m         # above listen.keepalive_interval (30s), so idle sessions stay up
    timeout server 10m
    timeout check 2s
    option clitcpka
    option srvtcpka
    retries 2
    option redispatch 1        # a node that refuses the connection: try another at once

frontend vendors
    bind {bind}
    default_backend medbroker

backend medbroker
    balance source             # one client address stays on one node (per-address caps, startups)
    hash-type consistent       # ... and only the clients of a node that goes down move
{http_check}    default-server {checks}
{servers}"""


class HAProxy:
    """A throwaway haproxy: ``port`` (the vendors' port on 127.0.0.1), ``states()``, ``wait_state``, ``stop``.

    :param nodes: [(name, port)] of broker nodes on 127.0.0.1
    """

    def __init__(self, nodes: list[tuple[str, int]], *, check_inter: str = "200ms",
                 readyz_ports: dict[str, int] | None = None) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed; run scripts/install.sh")
        self.dir = Path(tempfile.mkdtemp(prefix="medbroker-haproxy-"))
        self.admin = self.dir / "admin.sock"
        self.port = free_port()
        self.config = haproxy_config(f"127.0.0.1:{self.port}", [(n, f"127.0.0.1:{p}") for n, p in nodes],
                                     admin_socket=str(self.admin), check_inter=check_inter,
                                     readyz_ports=readyz_ports)
        (self.dir / "haproxy.cfg").write_text(self.config)
        self.log_path = self.dir / "haproxy.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.dir / "haproxy.cfg")], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.wait_state({name: "UP" for name, _ in nodes}, timeout=20)
        except BaseException:
            self.stop()
            raise

    def command(self, line: str) -> str:
        """One command on the admin socket (e.g. ``show stat``); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin))
            sock.sendall(line.encode() + b"\n")
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        return out.decode()

    def states(self) -> dict[str, str]:
        """{node: "UP" | "DOWN" | "UP 1/2" ...} as HAProxy's health checks see them."""
        lines = self.command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        at_name, at_proxy, at_status = head.index("svname"), head.index("pxname"), head.index("status")
        rows = [line.split(",") for line in lines[1:] if line]
        return {r[at_name]: r[at_status] for r in rows
                if r[at_proxy] == "medbroker" and r[at_name] not in ("FRONTEND", "BACKEND")}

    def wait_state(self, want: dict[str, str], timeout: float = 10.0) -> float:
        """Wait until every named node is in the wanted state; returns the seconds it took."""
        start = time.monotonic()
        deadline, seen = start + timeout, {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HelperTimeoutError(f"haproxy exited {self.proc.returncode}: {self.tail()}")
            try:
                seen = self.states()
            except OSError:  # the admin socket is not there yet
                seen = {}
            if all(seen.get(name) == state for name, state in want.items()):
                return time.monotonic() - start
            time.sleep(0.05)
        raise HelperTimeoutError(f"haproxy: nodes not {want} within {timeout}s (last {seen}): {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
