"""The cluster on one machine (scripts/cluster-demo.sh): PostgreSQL, Swift (S3), HAProxy, two nodes, a device.

Everything is real and started from Debian's packages by the same helpers the test suite uses
(tests/helpers/postgres.py, swift.py, haproxy.py; the device, people and home from broker/demo.py), so what
this prints is what the tests exercise. Every server runs as a child of this process, under one state
directory; Ctrl-C, SIGTERM (``scripts/cluster-demo.sh stop``) or the end of ``--check`` stops them all.

    python3 scripts/cluster_demo.py [--dir DIR] [--check]

``--check`` runs the walkthrough by itself (a vendor's ssh through HAProxy, kill -9 of the node serving it,
the survivor seals the session, the vendor reconnects, archive pass, audit verify, evidence bundle) and exits
0 only when every step did what it should; each step prints one ``ok:`` or ``FAILED:`` line. The state
directory is removed at the end (kept with ``--keep``, or when something failed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the test helpers start the servers (one copy of that code)

from broker.demo import build_demo, medbroker_command  # noqa: E402
from broker.grants import approve_request, request_grant  # noqa: E402
from broker.identity import get_principal  # noqa: E402
from helpers.haproxy import HAProxy  # noqa: E402
from helpers.net import free_port  # noqa: E402
from helpers.postgres import Postgres  # noqa: E402
from helpers.swift import Swift  # noqa: E402

BUCKET = "medbroker-recordings"
VENDOR_ADDRESS = "127.0.0.5"  # the vendor's own loopback address: HAProxy (127.0.0.1) is the only balancer
PID_FILE = "cluster-demo.pid"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Node:
    """One ``medbroker serve --node-id NAME`` process (its own session: Ctrl-C reaches only this script)."""

    name: str
    port: int
    home: Path
    log: Path
    proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "broker.cli", "--home", str(self.home), "serve", "--node-id", self.name,
                "--listen", f"127.0.0.1:{self.port}"]

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as log:
            start = log.tell()
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env=_env(), cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.tail()}")
            with open(self.log, "rb") as f:
                f.seek(start)
                if b"medbroker listening" in f.read():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Cluster:
    state: Path
    pg: Postgres | None = None
    swift: Swift | None = None
    haproxy: HAProxy | None = None
    world: Any = None
    nodes: dict[str, Node] = field(default_factory=dict)
    url: str = ""
    journal: bool = True
    archive_interval: str = "10s"
    durable_pg: bool = False  # fsync on (bench/ha.py); the demo and its test run without it

    @property
    def home(self) -> Path:
        return self.state / "home"

    def start(self, say: Callable[[str], None]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o755)  # PostgreSQL runs as nobody and the device login must reach its files
        say("starting PostgreSQL ...")
        self.pg = Postgres(parent=self.state, durable=self.durable_pg)
        self.url = self.pg.new_database()
        say("starting OpenStack Swift with s3api ...")
        self.swift = Swift(parent=self.state)
        self.swift.create_bucket(BUCKET)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.write_config()
        say("creating the device ct-01 (a real sshd), alice (vendor), bob (approver), carol (security) ...")
        self.world = build_demo(self.state)
        app = self.world.app
        now = app.clock.now()
        req = request_grant(app.store, app.audit, app.rules, get_principal(app.store, "alice"), "ct-01", 4 * 3600,
                            "cluster demo", now)
        approve_request(app.store, app.audit, app.rules, req.id, get_principal(app.store, "bob"), now)
        for name in ("node-a", "node-b"):
            say(f"starting {name} ...")
            node = Node(name, free_port(), self.home, self.state / f"{name}.log")
            self.nodes[name] = node
            node.start()
        say("starting HAProxy in front of both nodes ...")
        self.haproxy = HAProxy([(n.name, n.port) for n in self.nodes.values()], check_inter="500ms",
                               parent=self.state)
        host_pub = " ".join((self.home / "keys" / "host_ed25519.pub").read_text().split()[:2])
        (self.state / "known_hosts").write_text(f"[127.0.0.1]:{self.haproxy.port} {host_pub}\n")
        people = self.state / "people"
        config = [f"Host broker\n  HostName 127.0.0.1\n  Port {self.haproxy.port}\n  BindAddress {VENDOR_ADDRESS}\n"
                  f"  UserKnownHostsFile {self.state / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
                  f"  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n"]
        config += [f"Match originalhost broker user {n},{n}@*\n  IdentityFile {people / n}\n"
                   for n in ("alice", "bob", "carol")]
        (self.state / "ssh_config").write_text("".join(config))

    def write_config(self) -> None:
        """The one broker.toml every node reads (both nodes share this home, hence one host key)."""
        assert self.swift is not None
        (self.home / "broker.toml").write_text(
            f'[listen]\nproxy_protocol_from = ["127.0.0.1/32"]\n\n'
            f'[recording]\njournal = {"true" if self.journal else "false"}\n\n'
            f'[store]\nurl = "{self.url}"\n\n'
            f'[cluster]\nheartbeat = "1s"\ndead_after = "3s"\n\n'
            + self.swift.config(self.home, BUCKET, "demo/", interval=f'"{self.archive_interval}"'))

    def reap(self, say: Callable[[str], None]) -> None:
        """Say when a node ended (someone ran kill -9 on it); reaping it keeps no zombie behind its pid."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.returncode is None and node.proc.poll() is not None:
                say(f"[cluster-demo] {node.name} (pid {node.proc.pid}) ended: exit {node.proc.returncode}")

    def stop(self) -> None:
        for part in (self.haproxy, *self.nodes.values()):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - tear down the rest anyway
                    print(f"cluster-demo: stopping {part}: {exc}", file=sys.stderr)
        for part in (self.world, self.swift, self.pg):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001
                    print(f"cluster-demo: stopping {type(part).__name__}: {exc}", file=sys.stderr)

    # ------------------------------------------------------------------ for people and --check
    def mb(self) -> str:
        return f"{medbroker_command()} --home {self.home}"

    def instructions(self) -> str:
        assert self.haproxy is not None and self.pg is not None and self.swift is not None
        F = f"ssh -F {self.state / 'ssh_config'}"
        mb = self.mb()
        a, b = self.nodes["node-a"], self.nodes["node-b"]
        assert a.proc is not None and b.proc is not None
        shown_url = self.url.replace(str(self.pg.socket_dir), "…/sock")
        return f"""
medbroker cluster demo is running (state directory {self.state}).
  HAProxy (vendors' address, PROXY v2 to the nodes): 127.0.0.1:{self.haproxy.port}
  node-a: pid {a.proc.pid}, 127.0.0.1:{a.port}      node-b: pid {b.proc.pid}, 127.0.0.1:{b.port}
  PostgreSQL: {shown_url}     S3 (Swift s3api): {self.swift.endpoint}  bucket {BUCKET}
  device ct-01: a real sshd on 127.0.0.1:{self.world.device_port}; alice holds an approved 4 h grant for it
  one config for both nodes: {self.home / 'broker.toml'} (same host key, journal on, archive on)

1. Vendor alice connects through HAProxy (ssh binds {VENDOR_ADDRESS}, her "own" address):
     {F} alice@ct-01@broker
     (or without a shell: {F} alice@ct-01@broker 'echo hello; sleep 60')
2. Which node serves her, and the cluster's view (in another terminal):
     {mb} cluster status
3. Kill the node that serves her (its pid is in step 2 and above); her ssh ends with exit 255:
     kill -9 PID
4. Watch the survivor declare it dead (~3 s) and seal her session as incomplete from the journal:
     watch -n1 {mb} cluster status
     {mb} sessions list
5. Alice reconnects with the same command: HAProxy sends her to the survivor, same host key, same grant:
     {F} alice@ct-01@broker 'echo continued'
6. Replay the sealed recording, check the chain, archive to S3, export evidence and check it offline:
     {mb} replay SESSION_ID --instant
     {mb} audit verify
     {mb} archive run
     {mb} evidence export --session SESSION_ID --by carol -o {self.state / 'evidence.tar'}
     {mb} audit verify --bundle {self.state / 'evidence.tar'}
7. Bring the killed node back under its id (in another terminal; Ctrl-C stops it again):
     {mb} serve --node-id node-a --listen 127.0.0.1:{a.port}    (node-b: --listen 127.0.0.1:{b.port})

Press Ctrl-C here, or run `bash {REPO / 'scripts' / 'cluster-demo.sh'} stop --dir {self.state}`, to stop everything.
"""


def _cli(cluster: Cluster, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(cluster.home), *args],
                          capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO,
                          stdin=subprocess.DEVNULL)


def _ssh(cluster: Cluster, command: str) -> list[str]:
    return [shutil.which("ssh") or "ssh", "-F", str(cluster.state / "ssh_config"), "alice@ct-01@broker", command]


def _wait(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def self_check(cluster: Cluster, say: Callable[[str], None]) -> None:
    """The walkthrough, non-interactively; raises AssertionError at the first step that went wrong."""
    store = cluster.world.app.store

    def sessions() -> list[dict]:
        return [dict(r) for r in store.query("SELECT * FROM sessions ORDER BY started_at")]

    def check(ok: bool, text: str, detail: str = "") -> None:
        if not ok:
            raise AssertionError(f"{text}: {detail}")
        say(f"ok: {text}")

    t0 = time.monotonic()
    # ticks, not one long sleep: once the connection is gone the next tick dies of SIGPIPE on the device,
    # so nothing of the session outlives the demo
    busy = "echo started-on-ct-01; for i in $(seq 120); do sleep 0.5; echo tick; done"
    first = subprocess.Popen(_ssh(cluster, busy), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert first.stdout is not None
    line = _wait("the vendor's first output", lambda: first.stdout.readline(), 30)
    check(line == b"started-on-ct-01\n", "ssh through HAProxy ran a command on the device", repr(line))
    live = _wait("a live session row", lambda: [s for s in sessions() if s["status"] == "live"], 20)[0]
    check(live["source"] == VENDOR_ADDRESS, f"the session shows the vendor's address {VENDOR_ADDRESS}",
          str(live["source"]))
    victim = cluster.nodes[live["node_id"]]
    survivor = next(n for n in cluster.nodes.values() if n is not victim)
    time.sleep(0.5)  # past the 20 ms batch the vendor's line was in (docs/ha.md "What is acknowledged when")
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    _, err = first.communicate(timeout=20)
    check(first.returncode == 255, f"kill -9 {victim.name} (pid {victim.proc.pid}): the vendor's ssh ended, exit 255",
          f"exit {first.returncode}: {err!r}")
    sealed = _wait("the survivor sealing the session",
                   lambda: [s for s in sessions() if s["id"] == live["id"] and s["status"] == "incomplete"], 30)[0]
    check(f"sealed by node {survivor.name}" in (sealed["end_reason"] or ""),
          f"{survivor.name} sealed {live['id']} as incomplete", str(sealed["end_reason"]))
    status = _cli(cluster, "cluster", "status")
    check(status.returncode == 0 and victim.name in status.stdout and "dead" in status.stdout,
          f"cluster status shows {victim.name} dead", status.stdout + status.stderr)
    again = subprocess.run(_ssh(cluster, "echo continued"), stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    check(again.returncode == 0 and again.stdout == b"continued\n", "the vendor reconnected through HAProxy (exit 0)",
          f"exit {again.returncode}: {again.stdout!r} {again.stderr!r}")
    replay = _cli(cluster, "replay", live["id"], "--instant")
    check(replay.returncode == 0 and "started-on-ct-01" in replay.stdout, "the sealed recording replays",
          replay.stdout[-500:] + replay.stderr)
    archive = _cli(cluster, "archive", "run")
    check(archive.returncode == 0, "archive run uploaded the sealed recordings to Swift", archive.stdout + archive.stderr)
    objects = cluster.swift.client().list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) if cluster.swift else 0
    check(objects >= 2, f"the bucket holds {objects} recordings", str(objects))
    verify = _cli(cluster, "audit", "verify")
    check(verify.returncode == 0, "audit verify passed", verify.stdout[-800:] + verify.stderr)
    bundle = cluster.state / "evidence.tar"
    export = _cli(cluster, "evidence", "export", "--session", live["id"], "--by", "carol", "-o", str(bundle))
    check(export.returncode == 0, "evidence export wrote the killed session's bundle", export.stdout + export.stderr)
    offline = _cli(cluster, "audit", "verify", "--bundle", str(bundle))
    check(offline.returncode == 0, "audit verify --bundle passed", offline.stdout[-800:] + offline.stderr)
    say(f"cluster demo check passed in {time.monotonic() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/medbroker-cluster-demo"),
                        help="state directory (reachable by other users: PostgreSQL runs as nobody)")
    parser.add_argument("--check", action="store_true", help="run the walkthrough by itself, then stop")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (home, logs) after stopping")
    args = parser.parse_args(argv)
    state: Path = args.dir.absolute()
    pid_file = state / PID_FILE
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            print(f"cluster-demo: already running in {state} (pid {pid_file.read_text().strip()}); "
                  f"stop it with: bash scripts/cluster-demo.sh stop --dir {state}", file=sys.stderr)
            return 1
        except (ProcessLookupError, ValueError):
            pass
    if state.exists() and any(p.name != PID_FILE for p in state.iterdir()):
        print(f"cluster-demo: {state} is not empty (a previous run?); remove it or choose another --dir",
              file=sys.stderr)
        return 1

    def say(text: str) -> None:
        print(text, flush=True)

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started from a shell that ignores it (`... &`)
    state.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    cluster = Cluster(state)
    code = 0
    try:
        cluster.start(say)
        if args.check:
            try:
                self_check(cluster, say)
            except AssertionError as exc:
                say(f"FAILED: {exc}")
                for node in cluster.nodes.values():
                    say(f"--- {node.name} log:\n{node.tail()}")
                code = 1
        else:
            say(cluster.instructions())
            while not stopping.is_set():
                cluster.reap(say)
                time.sleep(0.5)
    except KeyboardInterrupt:
        say("\nstopping the cluster demo ...")
    except Exception as exc:  # noqa: BLE001 - say what failed, then tear down what started
        say(f"cluster-demo: error: {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        pid_file.unlink(missing_ok=True)
        if args.keep or code:
            say(f"kept {state} (home, people, logs; PostgreSQL and Swift data are gone)")
        else:
            shutil.rmtree(state, ignore_errors=True)
            say(f"stopped; removed {state}")
    return code


if __name__ == "__main__":
    sys.exit(main())
