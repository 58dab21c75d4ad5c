"""/healthz, /readyz and /metrics: what monitoring sees of a broker with real sessions on a real sshd."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.health import start_metrics_listener, stop_metrics_listener
from helpers import poll as _wait
from helpers.net import free_port

REPO = Path(__file__).resolve().parent.parent


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback test URL
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return exc.code, exc.headers.get("Content-Type", ""), body


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Parsed with prometheus_client's own parser: (sample name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_what_the_broker_did(world):
    handle = world.harness.call(start_metrics_listener(world.app, "127.0.0.1:0", broker=world.harness.broker))
    base = f"http://127.0.0.1:{handle.port}"
    try:
        status, ctype, first = _get(f"{base}/metrics")  # the first scrape fixes where counting starts
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert _samples(first)[("medbroker_requests_pending", ())] == 0
        assert world.ssh("alice@ct-01", "true").returncode == 1  # no grant yet: refused
        world.grant()
        r = world.ssh("alice@ct-01", "echo hello")
        assert r.returncode == 0 and r.stdout == b"hello\n"
        bad = world.ssh("alice@ct-01", "true", key="carol")  # carol's key is not alice's
        assert bad.returncode == 255

        def scraped():
            got = _samples(_get(f"{base}/metrics")[2])
            return got if got.get(("medbroker_sessions_ended_total", (("status", "closed"),))) == 1 else None

        got = _wait(scraped)
        assert got, _get(f"{base}/metrics")[2]
        assert got[("medbroker_sessions_started_total", (("device", "ct-01"),))] == 1
        assert got[("medbroker_sessions_refused_total", (("reason", "no active grant"),))] == 1
        assert sum(v for (n, _), v in got.items() if n == "medbroker_auth_failures_total") >= 1
        assert got[("medbroker_relayed_bytes_total", (("direction", "out"),))] >= len(b"hello\n")
        assert got[("medbroker_audit_events_total", (("event", "grant.created"),))] == 1
        assert got[("medbroker_recording_writes_total", ())] >= 1  # the session's recording was written
        assert got[("medbroker_recording_write_seconds_total", ())] > 0
        assert ("medbroker_recording_write_seconds_max", ()) in got
        assert {("outcome", o) for o in ("sent", "errors", "dropped")} <= {
            lab[0] for (n, lab), _ in got.items() if n == "medbroker_siem_messages_total" and lab}

        status, ctype, body = _get(f"{base}/healthz")
        assert (status, body) == (200, "ok\n")
        status, _, body = _get(f"{base}/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["ready"] is True
        assert ready["checks"]["store"]["ok"] and ready["checks"]["recordings"]["ok"]
        assert ready["checks"]["host_key"]["ok"] and ready["checks"]["devices"]["registered"] == 1
    finally:
        world.harness.call(stop_metrics_listener(handle))


def test_metrics_count_audit_sink_failures_by_sink(tmp_path):
    """A SIEM file that cannot be written loses no audit row; /metrics says how many rows it missed."""
    from broker.app import init_home
    from broker.health import Health
    from broker.siem import JsonLinesSink

    app = init_home(tmp_path / "home")
    try:
        (tmp_path / "blocked").write_text("a file where the SIEM directory should be")
        app.audit.sinks.append(JsonLinesSink(tmp_path / "blocked" / "audit.jsonl"))
        for _ in range(3):
            app.audit.record("broker.started")
        got = _samples(Health(app).render().decode())
        assert got[("medbroker_audit_sink_failures_total", (("sink", "jsonl"),))] == 3
        assert len(app.store.audit_rows(event="broker.started")) == 3
    finally:
        app.close()


def test_live_sessions_gauge_follows_a_session(world):
    handle = world.harness.call(start_metrics_listener(world.app, "127.0.0.1:0", broker=world.harness.broker))
    base = f"http://127.0.0.1:{handle.port}"
    world.grant()
    term = world.pty("alice@ct-01")
    try:
        term.expect(re.compile(rb"[#$] "), timeout=15)
        assert _wait(lambda: _samples(_get(f"{base}/metrics")[2]).get(
            ("medbroker_live_sessions", (("device", "ct-01"),))) == 1)
        term.sendline("exit")
        assert _wait(lambda: _samples(_get(f"{base}/metrics")[2]).get(
            ("medbroker_live_sessions", (("device", "ct-01"),))) is None)
    finally:
        term.close()
        world.harness.call(stop_metrics_listener(handle))


def _serve(home: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    return subprocess.Popen([sys.executable, "-m", "broker.cli", "--home", str(home), "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            cwd=REPO)


@pytest.mark.parametrize("min_free_mb,ready", [(0, True), (1 << 24, False)])
def test_metrics_listener_of_its_own_and_readiness_of_the_recordings_volume(tmp_path, min_free_mb, ready):
    """`[metrics] address` serves the three endpoints from `medbroker serve` without a web console; a
    recordings volume with less room than min_free_mb makes /readyz 503 (health stays 200)."""
    home = tmp_path / "home"
    mport = free_port()
    home.mkdir()
    (home / "broker.toml").write_text(f'[metrics]\naddress = "127.0.0.1:{mport}"\nmin_free_mb = {min_free_mb}\n')
    init = subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(home), "init"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert init.returncode == 0, init.stderr
    proc = _serve(home, "--listen", f"127.0.0.1:{free_port()}", "--log-level", "warning")
    try:
        assert _wait(lambda: _get_quiet(f"http://127.0.0.1:{mport}/healthz") == 200, timeout=30)
        status, _, body = _get(f"http://127.0.0.1:{mport}/readyz")
        assert (status == 200) is ready and json.loads(body)["ready"] is ready
        assert json.loads(body)["checks"]["recordings"]["ok"] is ready
        status, _, text = _get(f"http://127.0.0.1:{mport}/metrics")
        assert status == 200 and ("medbroker_requests_pending", ()) in _samples(text)
        assert _get(f"http://127.0.0.1:{mport}/inbox")[0] == 404  # nothing but the three endpoints
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and b"Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _get_quiet(url: str) -> int | None:
    try:
        return _get(url)[0]
    except OSError:
        return None


def test_a_taken_port_is_an_oserror_and_the_loop_lives_on():
    """uvicorn calls sys.exit() when it cannot bind; that SystemExit used to escape the broker's event loop
    (``serve --web`` on a taken port ended with a traceback, status 3, the SSH listener not stopped)."""
    import asyncio
    import socket

    from broker.health import serve_asgi

    async def asgi(scope, receive, send):  # never reached
        raise AssertionError

    async def main() -> str:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(OSError) as info:
                await serve_asgi(asgi, "127.0.0.1", port, "web console")
            await asyncio.sleep(0.05)  # the loop still runs
            return f"{info.value} / {port}"

    message, port = asyncio.run(main()).split(" / ")
    assert message == f"the web console could not listen on 127.0.0.1:{port}"
