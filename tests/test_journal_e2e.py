"""The recording journal end to end (issue 13, item 3): real OpenSSH vendors through the broker to a real sshd.

* what the vendor saw is in the journal, byte for byte the recording file; a locked database pauses the relay
  (the vendor's output stops) and the session continues once it is back;
* a journal down past ``journal_timeout`` ends the session with "the recording store is unreachable", with at
  most the acknowledgment window of output beyond what the journal holds;
* the recording file deleted mid-session, the broker SIGKILLed: the next start rebuilds it from the journal,
  seals it, and ``medbroker replay`` shows what the vendor saw;
* ``sessions watch`` from a second broker home that shares only the database (and the data key) follows the
  session from the journal.

Store-agnostic: the journal is read through the Store methods only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from broker.app import init_home
from broker.journal import JournalTail
from broker.keys import FileKeyProvider
from broker.store import open_store
from frontdoor_support import Serve, close_world, details, events, prepared_home, wait, world_with
from helpers.clients import ssh_options, write_known_hosts
from helpers import journal_bytes
from helpers.net import free_port
from helpers.procs import finish_piped
from helpers.pty import PtySession
from sessions.recording import read_frames

pytestmark = pytest.mark.openssh
REPO = Path(__file__).resolve().parent.parent
ACK_WINDOW = 256 << 10  # docs/recording-format.md, "The acknowledgment rule"
LINES = 150_000
LOG = f"seq -f 'maintenance log line %.0f: all good' 1 {LINES}"
# the same lines in 150 blocks 20 ms apart (>= 3 s): a test that samples the stream while it runs must not find
# it already over (with the scanner's compiled scans the unpaced 5.3 MB took well under a second)
# (no "*" in it: the broker refuses a command with a glob that could reach the patient tree from the home)
PACED_LOG = ("for b in $(seq 0 149); do seq -f 'maintenance log line %.0f: all good' ${b}001 $((b + 1))000; "
             "sleep 0.02; done")
assert LINES == 150 * 1000
EXPECTED = b"".join(f"maintenance log line {i}: all good\n".encode() for i in range(1, LINES + 1))  # 5.3 MB


def _cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    return subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(home), *args], capture_output=True,
                          env=env, cwd=REPO, timeout=timeout)



def _journaled_output(store, session_id: str, keys: FileKeyProvider) -> bytes:
    """The vendor-bound output the journal holds (decrypted), read through a JournalTail."""
    tail = JournalTail(store, session_id, lambda: False)
    return b"".join(f.payload for f in read_frames(tail, key_lookup=keys.get, strict=False)
                    if f.kind in ("output", "stderr"))


class _Vendor:
    """``ssh alice@ct-01@broker CMD`` (real OpenSSH) whose stdout is kept and counted as it arrives."""

    def __init__(self, port: int, key: Path, known_hosts: Path, command: str) -> None:
        argv = ["ssh", *ssh_options(key=key, known_hosts=known_hosts, host_key_checking="yes"),
                "-p", str(port), "alice@ct-01@127.0.0.1", command]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE,
                                     env={k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")})
        self.out = bytearray()
        self.stderr = b""

        def pump_out() -> None:
            while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
                self.out += chunk

        def pump_err() -> None:
            self.stderr = self.proc.stderr.read()

        self._threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def received(self) -> int:
        return len(self.out)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.close()
        return code

    def close(self) -> None:
        finish_piped(self.proc, self._threads)


_VENDORS: list[_Vendor] = []


@pytest.fixture(autouse=True)
def _vendors_closed() -> Iterator[None]:
    """A test that fails half-way must not leave its ssh running (its pipes surfaced as ResourceWarnings in
    whichever test the worker ran next)."""
    yield
    while _VENDORS:
        _VENDORS.pop().close()


class _Lock:
    """Another connection holding the database's write lock: a database that answers no commit (an outage or a
    stuck transaction, as SQLite can show it). On PostgreSQL the same is ``LOCK TABLE recording_journal IN
    EXCLUSIVE MODE`` in an open transaction of another connection."""

    def __init__(self, config) -> None:
        if config.store.url:
            import psycopg

            self.pg = psycopg.connect(config.store.url, autocommit=True, connect_timeout=10)
            self.pg.execute("BEGIN")
            self.pg.execute("LOCK TABLE recording_journal IN EXCLUSIVE MODE")
            return
        self.pg = None
        self.conn = sqlite3.connect(config.db_path, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.pg is not None:
            self.pg.execute("ROLLBACK")
            self.pg.close()
            return
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def store_section(store_target) -> str:
    """broker.toml's [store] for each engine: "" (the home's SQLite file) or a fresh PostgreSQL database."""
    return f'\n[store]\nurl = "{store_target}"\n' if isinstance(store_target, str) else ""


def _vendor(world, command: str) -> _Vendor:
    _VENDORS.append(vendor := _Vendor(world.port, world.keys["alice"].private_path, world.known_hosts, command))
    return vendor


def test_the_journal_holds_what_the_vendor_saw_and_a_locked_database_pauses_the_relay(tmp_path, device,
                                                                                       store_section):
    world = world_with(tmp_path, '[recording]\njournal = true\njournal_keep = true\njournal_timeout = "30s"\n'
                       + store_section)
    try:
        world.grant()
        vendor = _vendor(world, PACED_LOG)
        assert wait(lambda: world.app.store.list_sessions(), timeout=30), vendor.stderr
        [row] = world.app.store.list_sessions()
        ahead: list[int] = []
        deadline = time.monotonic() + 60
        while vendor.received < 1 << 20 and vendor.proc.poll() is None and len(ahead) < 500 \
                and time.monotonic() < deadline:
            # while it streams: what the vendor has is in the journal, but for at most the window
            received = vendor.received  # first: the journal only grows
            if not received:  # the journal's first row (the header) goes out with the first batch
                time.sleep(0.05)
                continue
            ahead.append(received - len(_journaled_output(world.app.store, row["id"], world.app.keys)))
            time.sleep(0.05)
        assert ahead and max(ahead) <= ACK_WINDOW, (ahead, vendor.received, vendor.proc.poll(), vendor.stderr)
        lock = _Lock(world.app.config)
        try:
            time.sleep(1.2)  # what was handed on before the lock (window + asyncssh's buffer) drains to the vendor
            before = vendor.received
            time.sleep(1.3)
            during = vendor.received - before
        finally:
            lock.release()
        assert vendor.wait(120) == 0, vendor.stderr
        print(f"\nvendor ahead of the journal: at most {max(ahead)} B in {len(ahead)} samples; received {during} B "
              "in the last 1.3 s of the 2.5 s the journal was locked")
        assert before < len(EXPECTED), "the stream ended before the lock: nothing was measured"
        assert during == 0, f"the relay kept going while nothing could be acknowledged: {during} B"
        assert bytes(vendor.out) == EXPECTED  # and every byte arrived once the database was back

        assert wait(lambda: world.app.store.get_session(row["id"])["status"] == "closed")
        path = world.app.recordings.local_path(row["recording"])
        store = world.app.store
        assert journal_bytes(store, row["id"]) == path.read_bytes()  # byte for byte, end frame included
        assert _journaled_output(store, row["id"], world.app.keys) == EXPECTED
        assert store.journal_backlog()[0]["rows"] > 2  # kept (journal_keep), as batches
    finally:
        close_world(world)


def test_without_journal_keep_the_rows_go_once_the_recording_is_sealed(tmp_path, device):
    world = world_with(tmp_path, "[recording]\njournal = true\n")
    try:
        world.grant()
        with world.pty("alice@ct-01", "cat") as term:
            term.sendline("journaled keystrokes")
            term.expect(b"journaled keystrokes\r\n" * 2, timeout=20)
            [row] = world.app.store.list_sessions()
            assert wait(lambda: b"journaled keystrokes" in _journaled_output(world.app.store, row["id"],
                                                                           world.app.keys))
            term.send(b"\x04")
            assert term.wait(20) == 0
        assert wait(lambda: world.app.store.get_session(row["id"])["status"] == "closed")
        assert wait(lambda: not world.app.store.has_journal(row["id"]))
        assert world.app.recordings.exists(row["recording"])
    finally:
        close_world(world)


@pytest.mark.parametrize("window", [None, 1 << 20], ids=["default-window", "ack_window-1MiB"])
def test_a_journal_down_past_its_timeout_ends_the_session_with_the_reason(tmp_path, device, store_section, window):
    """What the vendor received beyond the journal is at most the acknowledgment window: 256 KiB by default, and
    ``recording.ack_window`` when set (1 MiB here: more than the default lets out, so the option took effect)."""
    extra = f'ack_window = "{window >> 10}KiB"\n' if window else ""
    world = world_with(tmp_path, '[recording]\njournal = true\njournal_timeout = "2s"\n' + extra + store_section)
    bound = window or ACK_WINDOW
    lock = None
    try:
        world.grant()
        vendor = _vendor(world, LOG)
        assert wait(lambda: vendor.received > 1 << 20, timeout=60), vendor.stderr
        lock = _Lock(world.app.config)
        locked_at = time.monotonic()
        code = vendor.wait(30)
        ended_after = time.monotonic() - locked_at
        lock.release()
        lock = None
        assert code != 0 and vendor.received < len(EXPECTED)
        told = (b"the recording store is unreachable; medbroker never runs a session it cannot record, so the "
                b"session was ended")
        assert told in vendor.stderr, vendor.stderr
        assert 1.5 < ended_after < 15, ended_after

        [row] = world.app.store.list_sessions()
        assert wait(lambda: world.app.store.get_session(row["id"])["status"] != "live", timeout=20)
        assert world.app.store.get_session(row["id"])["status"] == "recording-failed"
        failed = [e for e in events(world, "recording.failed") if e["session_id"] == row["id"]]
        assert failed and "the recording store is unreachable" in details(failed[0])["error"]
        journaled = _journaled_output(world.app.store, row["id"], world.app.keys)
        assert EXPECTED.startswith(journaled) and bytes(vendor.out).startswith(journaled)
        beyond = vendor.received - len(journaled)
        print(f"\nvendor received {vendor.received} B, the journal holds {len(journaled)} B of output: "
              f"{beyond} B beyond it (bound {bound}); ended {ended_after:.2f} s after the lock")
        assert 0 <= beyond <= bound
        if window:  # the configured window was used, not the default one
            assert beyond > 2 * ACK_WINDOW, f"only {beyond} B beyond the journal with a {window} B window"
    finally:
        if lock is not None:
            lock.release()
        close_world(world)


def test_best_effort_mode_warns_and_continues_unrecorded_when_the_journal_stays_down(tmp_path, device,
                                                                                     store_section):
    world = world_with(tmp_path, '[recording]\nmode = "best_effort"\njournal = true\njournal_timeout = "1s"\n'
                       + store_section)
    lock = None
    try:
        world.grant()
        vendor = _vendor(world, LOG)
        assert wait(lambda: vendor.received > 1 << 20, timeout=60), vendor.stderr
        lock = _Lock(world.app.config)
        assert wait(lambda: vendor.received == len(EXPECTED), timeout=60)  # delivered although unrecorded
        lock.release()
        lock = None
        assert vendor.wait(60) == 0, vendor.stderr
        assert bytes(vendor.out) == EXPECTED
        assert vendor.stderr.count(b"warning: recording failed; this session continues unrecorded") == 1
        [row] = world.app.store.list_sessions()
        assert wait(lambda: world.app.store.get_session(row["id"])["status"] != "live", timeout=20)
        failed = [e for e in events(world, "recording.failed") if e["session_id"] == row["id"]]
        assert failed and "the recording store is unreachable" in details(failed[0])["error"]
    finally:
        if lock is not None:
            lock.release()
        close_world(world)


def test_a_deleted_recording_is_rebuilt_from_the_journal_after_a_crash_and_replays(tmp_path, device):
    home, people = prepared_home(tmp_path, device(), "[recording]\njournal = true\n")
    keys = FileKeyProvider(home / "keys" / "data.key")
    port = free_port()
    known_hosts = write_known_hosts(tmp_path / "known_hosts", "127.0.0.1", port,
                                    (home / "keys" / "host_ed25519.pub").read_text())
    broker = Serve(home, port, tmp_path / "broker.log")
    term = None
    try:
        term = PtySession.spawn_ssh("alice@ct-01", "127.0.0.1", port, people["alice"].private_path, "cat",
                                    known_hosts=known_hosts)
        term.sendline("typed before the disk died 6x7")
        term.expect(b"typed before the disk died 6x7\r\n" * 2, timeout=20)
        store = open_store(home / "medbroker.db", migrate=False)
        try:
            [row] = store.list_sessions()
            path = home / "recordings" / row["recording"]
            assert wait(lambda: b"typed before the disk died 6x7\r\n" * 2 in _journaled_output(store, row["id"], keys))
            path.unlink()  # the node's recording is gone
            term.sendline("typed after the file was gone 7x8")
            term.expect(b"typed after the file was gone 7x8\r\n" * 2, timeout=20)
            # acknowledged (journaled) within the writer's batch interval of reaching the vendor; then the crash
            assert wait(lambda: b"typed after the file was gone 7x8\r\n" * 2 in _journaled_output(store, row["id"],
                                                                                              keys))
        finally:
            store.close()
        broker.kill9()
        assert term.wait(15) == 255  # ssh: connection lost
        assert not path.exists()

        broker = Serve(home, port, tmp_path / "broker.log")  # the next start rebuilds, then seals
        store = open_store(home / "medbroker.db", migrate=False)
        try:
            sealed = store.get_session(row["id"])
            [ev] = [details(e) for e in store.audit_rows(event="session.sealed") if e["session_id"] == row["id"]]
            left = store.has_journal(row["id"])
        finally:
            store.close()
        assert sealed["status"] == "incomplete" and sealed["final_hash"] and sealed["signature"]
        assert ev["rebuilt_from_journal_bytes"] > 0 and ev["final_hash"] == sealed["final_hash"]
        assert path.exists() and not left  # sealed locally: the rows went

        replay = _cli(home, "replay", row["id"], "--instant")
        assert replay.returncode == 0, replay.stderr
        assert b"typed before the disk died 6x7\r\n" * 2 in replay.stdout
        assert b"typed after the file was gone 7x8\r\n" * 2 in replay.stdout
        verify = _cli(home, "audit", "verify", "--json")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        [entry] = [r for r in json.loads(verify.stdout)["recordings"] if r["session_id"] == row["id"]]
        assert entry["state"] == "incomplete" and entry["problems"] == []
    finally:
        if term is not None:
            term.close()
        broker.stop()


def test_sessions_watch_and_the_web_live_view_from_another_home_follow_the_journal(tmp_path, device):
    from broker.access_links import issue_signin_link
    from broker.app import open_app
    from broker.web import start_web, stop_web
    from web_support import Client, LoopThread

    world = world_with(tmp_path, "[recording]\njournal = true\n")
    watcher = web_loop = web = other_app = None
    try:
        first = world.app.home
        other = tmp_path / "other-node"
        other.mkdir()
        # The second home shares the database and the data key (cluster nodes share both); nothing is copied.
        (other / "broker.toml").write_text(f'[recording]\ndata_key = "{first / "keys" / "data.key"}"\n')
        init_home(other).close()
        for name in ("medbroker.db", "medbroker.db-wal", "medbroker.db-shm"):
            (other / name).unlink(missing_ok=True)
        (other / "medbroker.db").symlink_to(first / "medbroker.db")
        world.grant()
        with world.pty("alice@ct-01", "cat") as term:
            term.sendline("seen before the watch began")
            term.expect(b"seen before the watch began\r\n" * 2, timeout=20)
            [row] = world.app.store.list_sessions()
            assert not (other / "recordings" / row["recording"]).exists()
            env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
            watcher = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "--home", str(other), "sessions", "watch", row["id"],
                 "--by", "carol", "--for", "60s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
            out = bytearray()
            threading.Thread(target=lambda: [out.extend(c) for c in iter(
                lambda: os.read(watcher.stdout.fileno(), 65536), b"")], daemon=True).start()
            assert wait(lambda: b"seen before the watch began" in out, timeout=30), watcher.stderr
            other_app = open_app(other)  # the other node's web console: its live view of the same session
            web_loop = LoopThread()
            web = web_loop.call(start_web(other_app, "127.0.0.1:0"))
            browser = Client(web.url)
            browser.sign_in(issue_signin_link(other_app.store, other_app.audit, other_app.config, "carol",
                                              other_app.clock.now()).url)
            streamed: list = []
            reader = threading.Thread(target=lambda: streamed.append(browser.get(f"/sessions/{row['id']}/stream")),
                                      daemon=True)
            reader.start()
            term.sendline("typed while watched from the other node")
            term.expect(b"typed while watched from the other node\r\n" * 2, timeout=20)
            assert wait(lambda: b"typed while watched from the other node\r\n" * 2 in out, timeout=20)
            term.send(b"\x04")
            assert term.wait(20) == 0
        assert watcher.wait(30) == 0
        err = watcher.stderr.read()
        assert f"session {row['id']} ended (closed".encode() in err, err
        reader.join(30)
        [(status, _, text)] = streamed
        assert status == 200
        shown = [json.loads(line[6:])["d"] for line in text.splitlines() if line.startswith("data: ")
                 and '"d"' in line]
        assert "typed while watched from the other node\r\n" * 2 in "".join(shown), text[-2000:]
        assert "event: end" in text
        watched = [e for e in events(world, "recording.watched") if e["session_id"] == row["id"]]
        assert [e["actor"] for e in watched] == ["carol", "carol"]
        assert {details(e).get("via") for e in watched} == {None, "web"}
    finally:
        if web is not None:
            web_loop.call(stop_web(web))
        if web_loop is not None:
            web_loop.close()
        if other_app is not None:
            other_app.close()
        if watcher is not None:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait(5)
            watcher.stdout.close()
            watcher.stderr.close()
        close_world(world)


def _resume(pids: list[int]) -> None:
    import signal

    while pids:
        try:
            os.kill(pids.pop(), signal.SIGCONT)
        except ProcessLookupError:
            pass


def _server_processes(pg) -> list[int]:
    """A PostgreSQL instance's processes: the postmaster, then its children (backends, writer, WAL writer...)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pg.proc.pid:
            children.append(int(stat.parent.name))
    return [pg.proc.pid, *children]


def test_postgresql_frozen_while_a_vendor_streams_pauses_then_ends_the_session_and_loses_nothing(tmp_path, device,
                                                                                              postgres):
    """The whole PostgreSQL server SIGSTOPped (a frozen machine: it answers nothing, not even its own timeouts)
    while a vendor streams output with the journal on: the relay pauses; past journal_timeout the session ends
    with "the recording store is unreachable"; after SIGCONT every row journaled before the freeze is still there,
    the vendor got at most the acknowledgment window beyond the journal, and ``audit verify`` passes. A server
    of its own: the session one must stay up for the other tests."""
    import signal

    from helpers.postgres import Postgres

    pg = Postgres()
    stopped: list[int] = []
    world = None
    try:
        url = pg.new_database()
        world = world_with(tmp_path, f'[recording]\njournal = true\njournal_timeout = "2s"\n[store]\nurl = "{url}"\n')
        world.grant()
        vendor = _vendor(world, LOG)
        assert wait(lambda: vendor.received > 1 << 20, timeout=60), vendor.stderr
        [row] = world.app.store.list_sessions()
        reader = open_store(url, migrate=False)  # the test's own connection: read before the freeze
        try:
            journaled_before = _journaled_output(reader, row["id"], world.app.keys)
        finally:
            reader.close()
        os.kill(pg.proc.pid, signal.SIGSTOP)  # the postmaster first: it forks nothing new meanwhile
        stopped.append(pg.proc.pid)
        for pid in _server_processes(pg)[1:]:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # a backend that was ending (the reader's)
                continue
            stopped.append(pid)
        frozen_at = time.monotonic()
        time.sleep(1.0)  # what was acknowledged before the freeze drains to the vendor
        paused_at = vendor.received
        code = vendor.wait(30)
        ended_after = time.monotonic() - frozen_at
        during = vendor.received - paused_at
        _resume(stopped)
        told = (b"the recording store is unreachable; medbroker never runs a session it cannot record, so the "
                b"session was ended")
        assert code != 0 and told in vendor.stderr, vendor.stderr
        assert vendor.received < len(EXPECTED)
        assert during == 0, f"the relay kept going while nothing could be acknowledged: {during} B"
        assert 2 <= ended_after < 20, ended_after

        store = world.app.store
        assert wait(lambda: store.get_session(row["id"])["status"] != "live", timeout=30)
        assert store.get_session(row["id"])["status"] == "recording-failed"
        journaled = _journaled_output(store, row["id"], world.app.keys)
        assert journaled.startswith(journaled_before)  # nothing acknowledged before the freeze was lost
        assert EXPECTED.startswith(journaled) and bytes(vendor.out).startswith(journaled)
        beyond = vendor.received - len(journaled)
        print(f"\nPostgreSQL frozen: the session ended {ended_after:.2f} s later (journal_timeout 2 s); vendor "
              f"received {vendor.received} B, the journal holds {len(journaled)} B of output ({beyond} B beyond "
              f"it, bound {ACK_WINDOW}); {len(journaled_before)} B were journaled before the freeze")
        assert 0 <= beyond <= ACK_WINDOW
        failed = [e for e in events(world, "recording.failed") if e["session_id"] == row["id"]]
        assert failed and "the recording store is unreachable" in details(failed[0])["error"]
        verify = _cli(world.app.home, "audit", "verify", "--json")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert json.loads(verify.stdout)["audit"]["ok"]
    finally:
        _resume(stopped)
        if world is not None:
            close_world(world)
        pg.stop()


def test_a_watcher_on_another_node_reads_a_finished_sessions_last_rows_then_they_go(tmp_path):
    """A live view that follows the journal from another node may be a poll behind when the session ends: the
    sealed session's rows stay a short grace (JOURNAL_DROP_GRACE_S) so it still reads the last output and the
    end frame; then they go (journal_keep off)."""
    from broker.live import JOURNAL_DROP_GRACE_S

    world = world_with(tmp_path, "[recording]\njournal = true\n")
    try:
        world.grant()
        r = world.ssh("alice@ct-01", "echo the last words before exit")
        assert r.returncode == 0, r.stderr
        assert wait(lambda: world.app.store.list_sessions()[-1]["status"] == "closed")
        sid = world.app.store.list_sessions()[-1]["id"]
        # a watcher that was a poll behind: it reads only now, after the session was sealed
        tail = JournalTail(world.app.store, sid, lambda: False)
        frames = list(read_frames(tail, key_lookup=world.app.keys.get, follow=True,
                                  timeout=10, poll_interval=0.05, strict=True))
        assert b"the last words before exit" in b"".join(f.payload for f in frames if f.kind == "output")
        assert frames[-1].kind == "end"
        assert wait(lambda: not world.app.store.has_journal(sid), timeout=JOURNAL_DROP_GRACE_S + 10)
    finally:
        close_world(world)
