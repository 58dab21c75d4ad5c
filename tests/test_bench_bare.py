"""bench/bare_relay.py, the bench's bare asyncssh relay: stock clients through it to a real sshd get every byte
back unchanged, exit codes pass through, and its raw recording holds exactly what went each way."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.bare_relay import read_recording
from helpers import find_binary
from helpers.clients import run_sftp_batch, run_ssh, ssh_options, write_known_hosts
from helpers.net import free_port

REPO = Path(__file__).resolve().parents[1]


class Relay:
    def __init__(self, port: int, recordings: Path, known_hosts: Path, key: Any, device_tmp: Path) -> None:
        self.port, self.recordings, self.known_hosts, self.key = port, recordings, known_hosts, key
        self.device_tmp = device_tmp  # writable by the device's login

    def ssh(self, command: str, **kw: Any) -> Any:
        return run_ssh("bench", "127.0.0.1", self.port, self.key, command, known_hosts=self.known_hosts, **kw)

    def slow_reader(self, command: str, wait_s: float) -> tuple[int, bytes]:
        """Run ``command`` but read nothing of its output for ``wait_s`` seconds (the relay's channels fill up)."""
        argv = [find_binary("ssh") or "ssh", *ssh_options(key=self.key, known_hosts=self.known_hosts,
                                                          host_key_checking="yes"),
                "-p", str(self.port), "bench@127.0.0.1", command]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(wait_s)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out

    def recordings_since(self, before: set[Path]) -> list[dict[bytes, bytes]]:
        return [read_recording(p) for p in sorted(set(self.recordings.glob("*.raw")) - before)]


@pytest.fixture
def relay(tmp_path: Path, device: Callable[..., Any], ssh_keys: Callable[..., Any]) -> Iterator[Relay]:
    dev = device()
    vendor, host = ssh_keys("vendor"), ssh_keys("relay_host")
    authorized = tmp_path / "relay_authorized_keys"
    authorized.write_text(vendor.public_line + "\n")
    device_host_pub = tmp_path / "device_host.pub"
    device_host_pub.write_text(dev.host_key_line + "\n")
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_relay", "--listen", f"127.0.0.1:{port}", "--host-key",
            str(host.private_path), "--authorized-keys", str(authorized), "--device", f"127.0.0.1:{dev.port}",
            "--device-user", dev.login, "--device-key", str(dev.client_key.private_path),
            "--device-host-key", str(device_host_pub), "--recordings", str(recordings)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        out, deadline = b"", time.monotonic() + 30
        while b"\n" not in out and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                out += os.read(proc.stdout.fileno(), 4096)
        assert out.startswith(f"bare relay listening on 127.0.0.1:{port}\n".encode()), out
        known = write_known_hosts(tmp_path / "relay_known_hosts", "127.0.0.1", port, host.public_key)
        yield Relay(port, recordings, known, vendor, dev.tree.tmp_dir)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # SIGTERM: closes the listener and exits cleanly
        log = proc.stdout.read()
        assert log == b"", log.decode(errors="replace")  # no tracebacks, no asyncssh errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def test_exec_both_ways_pty_and_sftp_pass_through_and_are_recorded(relay: Relay, tmp_path: Path) -> None:
    payload = os.urandom(3 << 20) + bytes(range(256)) * 16  # more than asyncssh's 2 MiB channel window
    target = relay.device_tmp / "up.bin"

    before = set(relay.recordings.glob("*.raw"))
    up = relay.ssh(f"cat > {target} && echo stored", input=payload)
    assert up.returncode == 0, up.stderr
    assert up.stdout == b"stored\n"
    os.sync()
    assert target.read_bytes() == payload
    [rec] = relay.recordings_since(before)
    assert rec[b"i"] == payload and rec[b"o"] == b"stored\n"

    before = set(relay.recordings.glob("*.raw"))
    down = relay.ssh(f"cat {target}; echo to-stderr >&2; exit 7")
    assert down.returncode == 7
    assert down.stdout == payload
    assert b"to-stderr\n" in down.stderr
    [rec] = relay.recordings_since(before)
    assert rec[b"o"] == payload and rec[b"e"] == b"to-stderr\n" and b"i" not in rec

    # The client reads nothing for 3 s: the device finishes and exits while the relay still holds output (its
    # device channel paused); every byte still arrives before the exit status and the close.
    assert relay.slow_reader(f"cat {target}; exit 5", 3.0) == (5, payload)

    before = set(relay.recordings.glob("*.raw"))
    term = relay.ssh("test -t 0 && test -t 1 && printf on-a-pty; exit 3", tty=True)
    assert term.returncode == 3, term.stderr
    assert term.stdout == b"on-a-pty"
    [rec] = relay.recordings_since(before)
    assert rec[b"o"] == b"on-a-pty"

    before = set(relay.recordings.glob("*.raw"))
    got = tmp_path / "got.bin"
    sftp = run_sftp_batch(f"get {target} {got}\n", "bench", "127.0.0.1", relay.port, relay.key,
                          known_hosts=relay.known_hosts)
    assert sftp.returncode == 0, sftp.stderr
    assert got.read_bytes() == payload
    [rec] = relay.recordings_since(before)
    assert payload[:32 << 10] in rec[b"o"]  # SFTP is relayed and recorded as bytes, packets and all
    assert len(rec[b"o"]) > len(payload) and rec[b"i"].startswith(b"\0\0\0\x05\x01\0\0\0\x03")  # SSH_FXP_INIT v3


def test_report_headline_is_medbroker_over_the_bare_relay_from_the_same_run() -> None:
    from bench.report import render_markdown, summarize

    def sample(metric: str, path: str, value: float, **extra: Any) -> dict:
        return {"metric": metric, "path": path, "round": 1, "ok": True, "value": value, "error": None,
                "refused": None, "extra": extra}

    result = {
        "mode": "quick", "started_at": "s", "finished_at": "f", "noise": [], "concurrency": [],
        "plan": {"rounds": 1, "blob_mib": 1, "keys_per_round": 2, "key_gap_ms": 5, "setups_per_round": 1},
        "machine": {k: "?" for k in ("cores", "cpu_model", "kernel", "openssh", "python", "asyncssh", "cryptography",
                                     "uvloop")} | {"memory_bytes": 0},
        "product": {"commit": "abc", "dirty": False, "launcher": "medbroker serve"}, "world": {"notes": []},
        "samples": [sample("bulk_download", "proxyjump-gcm", 160.0), sample("bulk_download", "bare", 140.0),
                    sample("bulk_download", "medbroker", 105.0),
                    sample("keystroke", "bare", 0.5, rtt_ms=[0.4, 0.5]),
                    sample("keystroke", "medbroker", 0.5, rtt_ms=[0.5, 0.7])],
    }
    md = render_markdown(result, summarize(result), "x.json")
    headline = md.split("## Product overhead: medbroker ÷ bare asyncssh relay (same run)")[1].split("\n\n| metric | direct |")[0]
    assert "| bulk exec download (`ssh host cat`) [MB/s] | 140 | 105 | **0.75x** | 0.88x | - | 0.66x |" in headline
    assert "| keystroke round trip p99 [ms] | 0.50 | 0.70 | **1.40x** +0.20 ms |" in headline
    assert md.index("## Product overhead") < md.index("| metric | direct |")  # the headline comes first
