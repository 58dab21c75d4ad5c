"""``listen.workers > 1``: ``medbroker serve`` as a supervisor with worker processes on one port, real ssh.

The supervisor, the workers, sshd and ssh are real processes on loopback; sessions are spread by the
kernel (SO_REUSEPORT), so the tests open sessions until both workers serve some (bounded in count).
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from broker.store import open_store
from frontdoor_support import prepared_home, wait
from helpers.clients import run_ssh, ssh_options, write_known_hosts
from helpers.procs import reap

pytestmark = pytest.mark.openssh
REPO = Path(__file__).resolve().parent.parent
MAX_SESSIONS = 40  # sessions opened at most while waiting for the kernel to pick each worker


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MEDBROKER_HOME", "SSH_AUTH_SOCK", "DISPLAY")}


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(home), *args], capture_output=True,
                          env=_env(), cwd=REPO, timeout=60)


def _line(stream, timeout: float) -> bytes:
    """One line from a pipe within ``timeout`` seconds (b"" at EOF)."""
    deadline, buf = time.monotonic() + timeout, b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line within {timeout}s; got {buf!r}")
            if sel.select(left):
                chunk = os.read(stream.fileno(), 1)
                if not chunk:
                    break
                buf += chunk
    return buf


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _events(home: Path, name: str) -> list[dict]:
    store = open_store(home / "medbroker.db", migrate=False)
    try:
        return [r | {"details": json.loads(r["details"])} for r in store.audit_rows(event=name)
                if r["event"] == name]
    finally:
        store.close()


def _sessions(home: Path) -> dict[str, dict]:
    store = open_store(home / "medbroker.db", migrate=False)
    try:
        return {r["id"]: r for r in store.list_sessions()}
    finally:
        store.close()


class Supervisor:
    """``medbroker serve --workers N`` (or listen.workers in broker.toml) as a child process; port 0 by default."""

    def __init__(self, home: Path, log: Path, *args: str, listen: str = "127.0.0.1:0") -> None:
        self.home, self.log = home, log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "--home", str(home), "serve", "--listen", listen,
                 "--log-level", "warning", *args],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=_env(), cwd=REPO)
        try:
            self.ready_line = _line(self.proc.stdout, 90).decode()
            match = re.match(r"medbroker listening on 127\.0\.0\.1:(\d+) ", self.ready_line)
            assert match, f"{self.ready_line!r}\n{log.read_text()[-3000:]}"
        except BaseException:
            self.stop()
            raise
        self.port = int(match.group(1))
        self.workers = [e["details"]["pid"] for e in _events(home, "broker.worker.started")]

    def all_pids(self) -> list[int]:
        return [e["details"]["pid"] for e in _events(self.home, "broker.worker.started")]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the supervisor and wait; on a timeout kill it and every worker it started (by pid)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.all_pids() if (self.home / "medbroker.db").exists() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if not self.proc.stdout.closed:
            self.proc.stdout.close()
        return self.proc.returncode


class Vendor:
    """Long-running ``ssh alice@ct-01@broker 'echo ready; exec cat'`` sessions, one ssh process each."""

    def __init__(self, port: int, key: Path, known_hosts: Path) -> None:
        self.argv = ["ssh", *ssh_options(key=key, known_hosts=known_hosts, host_key_checking="yes"), "-p", str(port),
                     "alice@ct-01@127.0.0.1", "echo ready; exec cat"]
        self.procs: list[subprocess.Popen] = []

    def open(self) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_env())
        self.procs.append(proc)
        assert _line(proc.stdout, 30) == b"ready\n", proc.stderr.read1() if proc.poll() is not None else b""
        return proc

    def echo(self, proc: subprocess.Popen, text: bytes) -> bytes:
        proc.stdin.write(text + b"\n")
        proc.stdin.flush()
        return _line(proc.stdout, 15)

    def ended(self, proc: subprocess.Popen, timeout: float = 20) -> tuple[int, str]:
        """Wait until the broker ended this session; (ssh exit status, stderr)."""
        proc.wait(timeout)
        err = proc.stderr.read().decode(errors="replace")
        return proc.returncode, err

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()


def _open_until(vendor: Vendor, home: Path, sessions: dict, want: set[int], at_least: int, each: int = 1) -> None:
    """Open sessions (bounded) until ``at_least`` are open and every pid in ``want`` serves ``each`` of them.

    ``sessions`` maps session id -> (ssh process, broker pid) and is updated.
    """
    for _ in range(MAX_SESSIONS):
        counts = [pid for _, pid in sessions.values()]
        served = {pid for pid in want if counts.count(pid) >= each}
        if served == want and len(sessions) >= at_least:
            return
        before = set(_sessions(home))
        proc = vendor.open()
        [new] = [r for sid, r in _sessions(home).items() if sid not in before]
        assert new["status"] == "live"
        sessions[new["id"]] = (proc, new["broker_pid"])
    raise AssertionError(f"after {MAX_SESSIONS} sessions the kernel never picked {want - served}")


@pytest.fixture
def world(tmp_path, device):
    home, people = prepared_home(tmp_path, device(), config="[listen]\nworkers = 2\n")
    return home, people, tmp_path


def test_two_workers_share_the_port_kill_crash_restart_and_stop(world):
    home, people, tmp = world
    broker = Supervisor(home, tmp / "broker.log")  # workers = 2 from broker.toml, port 0 chosen once
    vendor = None
    try:
        assert "2 worker processes" in broker.ready_line
        # on_ready fired after both workers accepted: both are already in the audit log, with one port
        starts = _events(home, "broker.worker.started")
        assert sorted(e["details"]["worker"] for e in starts) == [0, 1]
        assert {e["details"]["address"] for e in starts} == {f"127.0.0.1:{broker.port}"}
        a, b = broker.workers
        assert a != b and broker.proc.pid not in (a, b) and _alive(a) and _alive(b)
        [started] = _events(home, "broker.started")
        assert started["details"]["pid"] == broker.proc.pid
        assert sorted(started["details"]["worker_pids"]) == sorted([a, b])

        known_hosts = write_known_hosts(tmp / "known_hosts", "127.0.0.1", broker.port,
                                        (home / "keys" / "host_ed25519.pub").read_text())
        vendor = Vendor(broker.port, people["alice"].private_path, known_hosts)
        sessions: dict[str, tuple[subprocess.Popen, int]] = {}
        _open_until(vendor, home, sessions, {a, b}, 8, each=2)  # one to kill, one to crash
        assert {pid for _, pid in sessions.values()} == {a, b}  # the supervisor itself serves nothing
        on = {pid: [sid for sid, (_, p) in sessions.items() if p == pid] for pid in (a, b)}
        for pid in (a, b):  # bytes flow through either worker
            proc, _ = sessions[on[pid][0]]
            assert vendor.echo(proc, f"through {pid}".encode()) == f"through {pid}\n".encode()
        one_shot = run_ssh("alice@ct-01", "127.0.0.1", broker.port, people["alice"].private_path,
                           "echo one-shot; exit 3", known_hosts=known_hosts)
        assert (one_shot.returncode, one_shot.stdout) == (3, b"one-shot\n"), one_shot.stderr

        # `sessions kill` from the CLI reaches the worker that serves the session, whichever it is
        for pid in (a, b):
            sid = on[pid].pop(0)
            r = _cli(home, "sessions", "kill", sid, "--reason", f"test of worker {pid}")
            assert r.returncode == 0, r.stderr
            status, err = vendor.ended(sessions.pop(sid)[0])
            assert f"security staff ended this session: test of worker {pid}" in err
            assert wait(lambda: _sessions(home)[sid]["status"] == "killed", timeout=10)

        # SIGKILL one worker: its sessions are sealed incomplete, the failure is audited, a new worker accepts
        victims = on[a]
        assert victims, "worker a should still serve a session"
        os.kill(a, signal.SIGKILL)
        for sid in victims:
            status, _ = vendor.ended(sessions.pop(sid)[0])
            assert status == 255  # ssh: connection lost
        assert wait(lambda: all(_sessions(home)[sid]["status"] == "incomplete" for sid in victims), timeout=30)
        [failed] = _events(home, "broker.worker.failed")  # exactly one: the replacement did not fail
        assert failed["details"]["pid"] == a and failed["details"]["exit_status"] == -signal.SIGKILL
        assert sorted(failed["details"]["live_sessions"]) == sorted(victims)
        sealed = {e["session_id"] for e in _events(home, "session.sealed")}
        assert sealed == set(victims)
        assert wait(lambda: len(broker.all_pids()) == 3, timeout=30)
        c = broker.all_pids()[2]
        assert c not in (a, b) and _alive(c)
        assert all(_sessions(home)[sid]["status"] == "live" for sid in on[b])  # worker b never noticed
        _open_until(vendor, home, sessions, {c}, len(sessions) + 1)

        # SIGTERM: every worker ends its sessions with the shutdown message; the supervisor exits 0
        assert broker.stop() == 0, (tmp / "broker.log").read_text()[-3000:]
        for sid, (proc, _) in sessions.items():
            status, err = vendor.ended(proc)
            assert "the broker is shutting down; reconnect in a moment" in err, (sid, err)
        rows = _sessions(home)
        assert not [r for r in rows.values() if r["status"] == "live"]
        assert {rows[sid]["status"] for sid in sessions} == {"shutdown"}, [rows[sid] for sid in sessions]
        stopped = _events(home, "broker.worker.stopped")
        assert sorted(e["details"]["pid"] for e in stopped) == sorted([b, c])
        [supervisor_stop] = _events(home, "broker.stopped")
        assert supervisor_stop["details"]["pid"] == broker.proc.pid
        assert not any(_alive(pid) for pid in (a, b, c))
        log = (tmp / "broker.log").read_text()
        assert "Traceback" not in log, log[-5000:]

        verify = _cli(home, "audit", "verify", "--json")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        assert report["audit"]["ok"] and report["counts"]["broken"] == 0
        states = {r["session_id"]: r["state"] for r in report["recordings"] if not r["problems"]}
        assert set(states) == set(rows), report["recordings"]  # every recording verifies, sealed ones incomplete
        assert {states[sid] for sid in victims} == {"incomplete"}
    finally:
        if vendor is not None:
            vendor.close()
        broker.stop(signal.SIGKILL)


def test_workers_stop_when_the_supervisor_is_killed(world):
    home, _, tmp = world
    broker = Supervisor(home, tmp / "broker.log", "--workers", "3")
    try:
        pids = broker.workers
        assert len(pids) == 3 and "3 worker processes" in broker.ready_line
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(10)
        reap(pids, timeout=20)  # we are their subreaper now (tests/conftest.py)
        assert wait(lambda: not any(_alive(p) for p in pids), timeout=20)
        assert sorted(e["details"]["pid"] for e in _events(home, "broker.worker.stopped")) == sorted(pids)
    finally:
        broker.stop(signal.SIGKILL)


def test_the_web_console_runs_in_the_supervisor_only(world):
    home, _, tmp = world
    broker = Supervisor(home, tmp / "broker.log", "--web", "127.0.0.1:0")
    try:
        [web] = [e for e in _events(home, "broker.started") if e["details"].get("component") == "web"]
        port = int(web["details"]["address"].rpartition(":")[2])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/signin", timeout=10) as resp:
            assert resp.status == 200
        ssh_started = [e for e in _events(home, "broker.started") if "component" not in e["details"]]
        assert len(ssh_started) == 1 and len(broker.workers) == 2
        assert broker.stop() == 0
        assert len([e for e in _events(home, "broker.stopped") if e["details"].get("component") == "web"]) == 1
    finally:
        broker.stop(signal.SIGKILL)


def test_a_taken_port_a_bad_worker_count_and_a_failing_worker_are_refused(tmp_path):
    home = tmp_path / "home"
    assert _cli(home, "init").returncode == 0
    r = _cli(home, "serve", "--workers", "0")
    assert r.returncode == 2 and "--workers" in r.stderr.decode()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even a SO_REUSEPORT listener is not joined
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = _cli(home, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2")
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1, lines
    assert f"Error: cannot listen on 127.0.0.1:{port}: Address already in use" in lines, lines
    assert not _events(home, "broker.worker.started")
    # fail closed: a worker that cannot start (unreadable host key) stops the whole broker, naming the worker
    (home / "keys" / "host_ed25519").write_text("not a key\n")
    r = _cli(home, "serve", "--listen", "127.0.0.1:0", "--workers", "2")
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1, lines
    assert re.fullmatch(r"Error: broker worker [01] exited with status 1 before it accepted connections", lines[-2])
    assert lines[-1].startswith("Hint: its error is printed above")
    assert not _events(home, "broker.worker.started") and not _events(home, "broker.started")


AUDIT_WRITER = """
import sys
from pathlib import Path
from broker.app import open_app
app = open_app(Path(sys.argv[1]))
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    app.audit.record("recording.searched", actor=sys.argv[3], query=f"{sys.argv[3]}-{i}", hits=0)
app.close()
"""


def test_two_processes_appending_at_once_keep_one_audit_chain(tmp_path):
    """What two workers do all the time: append to the hash chain from separate processes and connections."""
    home = tmp_path / "home"
    assert _cli(home, "init").returncode == 0
    writers = [subprocess.Popen([sys.executable, "-c", AUDIT_WRITER, str(home), "150", f"w{i}"], cwd=REPO,
                                env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE) for i in range(2)]
    try:
        for w in writers:
            assert _line(w.stdout, 30) == b"ready\n"
        for w in writers:  # both start appending at (nearly) the same moment
            w.stdin.write(b"go\n")
            w.stdin.flush()
        for w in writers:
            assert w.wait(60) == 0
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
            w.stdin.close()
            w.stdout.close()
    rows = _events(home, "recording.searched")
    assert sorted(r["actor"] for r in rows) == ["w0"] * 150 + ["w1"] * 150
    for actor in ("w0", "w1"):  # each writer's rows are in its own order
        assert [r["details"]["query"] for r in rows if r["actor"] == actor] == [f"{actor}-{i}" for i in range(150)]
    verify = _cli(home, "audit", "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["audit"]["ok"]
