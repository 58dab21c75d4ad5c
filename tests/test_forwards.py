"""Approved port forwards (issue 14 item 2): request and strike ports, ``ssh -L`` to exactly those ports on the
device, recorded, scanned, ended with the session. Real OpenSSH ssh, a real sshd device, a real HTTP server on
the device side (loopback, like the device's sshd)."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

from broker.cli import app as cli_app
from broker.errors import PermissionDeniedError, UsageError
from broker.forwards import (ProtectedPorts, forward_refusal, grant_ports, load_protected_ports, parse_forward_port,
                             parse_strikes)
from broker.grants import approve_request, request_grant
from broker.identity import get_principal
from helpers.clients import ssh_options
from helpers.net import free_port, wait_for_port
from sessions.recording import read_frames

runner = CliRunner()

PAGE = b"<html>ct-01 service UI: tube temperature 41 C</html>\n"
HL7 = (b"MSH|^~\\&|RIS|HOSP|PACS|HOSP|202612061200||ORU^R01|MSG00001|P|2.5\r"
       b"PID|1||123456^^^HOSP^MR||DOE^JANE^Q||19700101|F|||1 MAIN ST^^TOWN^^12345\r"
       b"OBR|1|A1|B1|71020^CHEST XRAY^CPT\r")


TLS_HELLO = b"\x16\x03\x01\x00\x2fSECRET-TLS-PAYLOAD" + bytes(range(32)) + b"\r\n\r\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps a connection open between requests (the kill test holds one)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = HL7 if self.path == "/hl7" else PAGE
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def ssh_like():
    """A port on the device side whose server greets like sshd."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                conn.settimeout(2)
                try:
                    conn.recv(100)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _cli(world, *args: str):
    r = runner.invoke(cli_app, ["--home", str(world.app.home), *args])
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def _wait(predicate, timeout=10.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def _get(port: int, path: str) -> bytes:
    """One HTTP/1.0 GET through a local forward: everything the other end sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: ct-01\r\n\r\n".encode())
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return out
            out += chunk
    return out


# ------------------------------------------------------------------------------------------ pure rules
def test_request_spellings_and_protected_ports(tmp_path):
    protected = ProtectedPorts()
    for text in ("443", "localhost:443", "127.0.0.1:443", "ct-01:443", "CT-01:443", "[::1]:443"):
        assert parse_forward_port(text, "ct-01", protected) == 443
    for text in ("10.0.0.5:443", "pacs:443", "ct-02:443"):
        with pytest.raises(UsageError, match="another host"):
            parse_forward_port(text, "ct-01", protected)
    for text in ("", "0", "65536", "x", "443:", ":443", "1:2:3", "４４３"):
        with pytest.raises(UsageError):
            parse_forward_port(text, "ct-01", protected)
    for port in (104, 11112, 4242, 2575, 22):
        with pytest.raises(PermissionDeniedError, match="can never be forwarded"):
            parse_forward_port(str(port), "ct-01", protected)
    with pytest.raises(PermissionDeniedError):  # the device's own SSH port
        parse_forward_port("2022", "ct-01", protected, device_port=2022)
    # a site adds ports; it can never remove the built-in ones
    policy = tmp_path / "policy.toml"
    policy.write_text('[protected]\npaths = ["/data/dicom"]\n[ports]\nnever = [8042]\n')
    site = load_protected_ports(policy)
    assert site.reason(8042) and site.reason(104) and site.reason(443) is None
    for bad in ("never = [0]", "never = ['80']", "never = true", "nope = [1]", "never = [70000]"):
        policy.write_text(f"[ports]\n{bad}\n")
        with pytest.raises(Exception, match="ports"):
            load_protected_ports(policy)
    # run time: other hosts, protected, not granted
    assert forward_refusal("ct-01", 443, "ct-01", frozenset({443}), protected) is None
    assert forward_refusal("localhost", 443, "ct-01", frozenset({443}), protected) is None
    assert "only" in forward_refusal("10.1.1.1", 443, "ct-01", frozenset({443}), protected)
    assert "never" in forward_refusal("ct-01", 104, "ct-01", frozenset({104}), protected)
    assert "not in your grant" in forward_refusal("ct-01", 8080, "ct-01", frozenset({443}), protected)
    # rows from before forwards worked (HOST:PORT text): local names keep their port, other hosts allow nothing
    assert grant_ports(["127.0.0.1:8080", "pacs:443", 9000, True, "x"]) == frozenset({8080, 9000})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_forward_spec_fuzz(text):
    try:
        port = parse_forward_port(text, "ct-01", ProtectedPorts())
    except (UsageError, PermissionDeniedError):
        return
    assert 0 < port < 65536 and str(port) in text


# ------------------------------------------------------------------------------------------ request, approve
def test_request_strike_and_never_port_104(world):
    r = _cli(world, "request", "ct-01", "--user", "alice", "--for", "1h", "--reason", "x", "--forward", "104")
    assert r.exit_code == 1 and "port 104 can never be forwarded: DICOM" in r.stderr
    r = _cli(world, "request", "ct-01", "--user", "alice", "--for", "1h", "--reason", "x", "--forward", "pacs:443")
    assert r.exit_code == 2 and "names another host" in r.stderr
    assert world.app.store.query("SELECT count(*) AS n FROM access_requests")[0]["n"] == 0
    refused = [json.loads(e["details"]) for e in world.events("request.refused")]
    assert any("104" in d["reason"] for d in refused)
    doc = json.loads(_cli(world, "request", "ct-01", "--user", "alice", "--for", "1h", "--reason", "web UI",
                          "--forward", "443", "--forward", "localhost:8080", "--json").stdout)
    assert doc["forwards"] == [443, 8080]
    show = _cli(world, "requests", "show", str(doc["id"])).stdout
    assert "forwards: 443, 8080" in show and "TLS" in show
    assert _cli(world, "approve", str(doc["id"]), "--by", "bob", "--strike", "9999").exit_code == 2
    out = json.loads(_cli(world, "approve", str(doc["id"]), "--by", "bob", "--strike", "8080", "--json").stdout)
    assert out["grant"]["forwards"] == [443] and out["request"]["struck"] == [8080]
    created = json.loads(world.events("grant.created")[-1]["details"])
    assert created["forwards"] == [443] and created["struck"] == [8080]
    # over SSH self-service: the card shows the ports, the approver strikes one
    rid = json.loads(world.ssh("alice", "request ct-01 --for 1h --reason web UI --forward 443 --forward 8443 --json"
                               ).stdout)["id"]
    card = world.ssh("bob", "requests").stdout.decode()
    assert "forwards: 443, 8443" in card and "--strike PORT" in card
    r = world.ssh("bob", f"approve {rid} --strike 8443")
    assert r.returncode == 0 and b"Port forwards: 443." in r.stdout, r.stdout + r.stderr
    assert world.ssh("alice", "request ct-01 --for 1h --reason x --forward 2575").returncode == 1
    # a request stored before ports were checked (old HOST:PORT text) never grants 104
    now = world.app.clock.now()
    rid = world.app.store.insert_request({
        "user_name": "alice", "device": "ct-01", "duration_s": 600, "reason": "old", "ticket": None,
        "forwards": json.dumps(["127.0.0.1:104", "127.0.0.1:8443"]), "mode": "normal", "status": "pending",
        "created_at": now.isoformat(), "expires_at": (now.replace(year=now.year + 1)).isoformat()})
    dec = approve_request(world.app.store, world.app.audit, world.app.rules, rid, get_principal(world.app.store, "bob"),
                          now)
    assert dec.grant.forwards == (8443,)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.openssh
def test_forward_end_to_end(world, http_port, ssh_like):
    now = world.app.clock.now()
    struck = free_port()
    req = request_grant(world.app.store, world.app.audit, world.app.rules, get_principal(world.app.store, "alice"),
                        "ct-01", 3600, "service UI", now,
                        forwards=(str(http_port), f"localhost:{struck}", str(ssh_like)))
    approve_request(world.app.store, world.app.audit, world.app.rules, req.id, get_principal(world.app.store, "bob"),
                    now, strike=(str(struck),))
    local, local_struck, local_dicom, local_other, local_ssh = (free_port() for _ in range(5))
    argv = ["ssh", *ssh_options(key=world.keys["alice"].private_path, known_hosts=world.known_hosts,
                                host_key_checking="yes"), "-p", str(world.port), "-N",
            "-L", f"{local}:ct-01:{http_port}", "-L", f"{local_struck}:localhost:{struck}",
            "-L", f"{local_dicom}:127.0.0.1:104", "-L", f"{local_ssh}:ct-01:{ssh_like}", "-L", f"{local_other}:10.9.9.9:{http_port}",
            "alice@ct-01@127.0.0.1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", local, 15)
        # the approved port answers through the forward
        reply = _get(local, "/page")
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(PAGE), reply
        # struck, never-forwarded and other hosts: refused (ssh closes the local socket)
        for port in (local_struck, local_dicom, local_other):
            assert _get(port, "/page") == b""
        # TLS (a ClientHello): only its sizes are recorded
        with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
            s.sendall(TLS_HELLO)
            s.recv(65536)
        # an SSH server on a granted port (an encrypted session past every guard): closed before its banner
        assert b"SSH-" not in _get(local_ssh, "")
        # HL7 served by the device's web server: the scanner ends that forwarded connection
        assert HL7[:40] not in _get(local, "/hl7")
        assert _wait(lambda: world.events("alert.exfiltration"))
        # a connection held open ends when security staff kill the session
        held = socket.create_connection(("127.0.0.1", local), timeout=10)
        held.sendall(b"GET /page HTTP/1.1\r\nHost: ct-01\r\n\r\n")
        assert PAGE in _recv_until(held, PAGE)
        sid = world.app.store.list_sessions()[-1]["id"]
        assert _cli(world, "sessions", "kill", sid, "--reason", "test kill", "--by", "carol").exit_code == 0
        held.settimeout(10)
        assert _recv_until(held, b"\x00never") == b""  # closed by the broker (EOF), not a timeout
        held.close()
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = err.decode()
    allows = ", ".join(str(p) for p in sorted((http_port, ssh_like)))
    assert f"port {struck} on ct-01 is not in your grant (it allows {allows})" in text, text
    assert "administratively prohibited: medbroker: port 104 can never be forwarded" in text, text
    assert "forwards reach ports on ct-01 only, not 10.9.9.9" in text, text
    refusals = [json.loads(e["details"]) for e in world.events("channel.refused")]
    assert {r["target"] for r in refusals} >= {f"localhost:{struck}", "127.0.0.1:104", f"10.9.9.9:{http_port}"}
    alert = json.loads(world.events("alert.exfiltration")[-1]["details"])
    assert alert["kind"] == "forward" and alert["port"] == http_port and alert["content"].startswith("HL7")
    assert any(json.loads(e["details"]).get("content") == "ssh" for e in world.events("alert.exfiltration"))
    # the recording: open/close frames with the port, the plain text both ways
    assert _wait(lambda: world.app.store.get_session(sid)["final_hash"])
    row = world.app.store.get_session(sid)
    frames = list(read_frames(row["recording"], key_lookup=world.app.keys.get))
    opens = [f.event() for f in frames if f.kind == "channel-open" and f.event().get("type") == "direct-tcpip"]
    assert opens and all(o["port"] in (http_port, ssh_like) for o in opens)
    closes = [f.event() for f in frames if f.kind == "channel-close" and "port" in f.event()]
    assert len(closes) == len(opens) >= 3 and sum(c["bytes_to_vendor"] for c in closes) > len(PAGE)
    sent = b"".join(f.payload for f in frames if f.kind == "input")
    got = b"".join(f.payload for f in frames if f.kind == "output")
    assert b"GET /page HTTP/1.0" in sent and PAGE in got and b"PID|" not in got
    assert b"SECRET-TLS-PAYLOAD" not in sent
    sizes = [f.event() for f in frames if f.kind == "forward-bytes"]
    assert {"to": "device", "bytes": len(TLS_HELLO)} in sizes and any(c["tls"] for c in closes)
    # sessions show, replay, report
    show = _cli(world, "sessions", "show", sid)
    assert show.exit_code == 0 and f"forward port {http_port}" in show.stdout, show.stdout
    replay = _cli(world, "replay", sid, "--instant")
    assert replay.exit_code == 0 and f"forward to port {http_port} closed" in replay.stdout, replay.stdout
    assert "tube temperature" not in replay.stdout  # a forward's bytes are not replayed as terminal output
    day = now.strftime("%Y-%m-%d")
    report = _cli(world, "report", "--device", "ct-01", "--from", day, "--to", day, "--format", "md",
                  "-o", str(world.tmp / "r.md"))
    assert report.exit_code == 0, report.stdout + report.stderr
    md = (world.tmp / "r.md").read_text()
    assert "Port forwards:" in md and f"port {http_port}: " in md and "bytes to the vendor" in md, md
    assert _cli(world, "audit", "verify").exit_code == 0


def _recv_until(sock: socket.socket, marker: bytes) -> bytes:
    out = b""
    while marker not in out:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return out
        if not chunk:
            return out
        out += chunk
    return out


def test_web_inbox_shows_each_port_with_a_checkbox_and_strikes_the_unchecked(tmp_path):
    from test_web_http import Console

    console = Console(tmp_path)
    try:
        now = console.clock.now()
        rid = request_grant(console.app.store, console.app.audit, console.app.rules,
                            get_principal(console.app.store, "alice"), "ct-01", 3600, "web UI", now,
                            forwards=("443", "8080")).id
        bob = console.client("bob")
        status, _, page = bob.get("/inbox")
        assert status == 200 and f'id="forward-{rid}-443"' in page and f'id="forward-{rid}-8080"' in page
        token = bob.csrf("/inbox")
        status, _, _ = bob.post(f"/requests/{rid}/approve", [("csrf", token), ("forward_shown", "443"),
                                                             ("forward_shown", "8080"), ("forward", "443")])
        assert status == 303
        grant = console.app.store.list_grants()[-1]
        assert json.loads(grant["forwards"]) == [443]
        assert console.events("grant.created")[-1]["details"].count("8080") == 1  # struck, audited
    finally:
        console.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=4), st.lists(st.integers(1, 65535), max_size=4))
def test_strike_parser_fuzz(texts, requested):
    try:
        struck = parse_strikes(texts, requested)
    except UsageError:
        return
    assert set(struck) <= set(requested)


def test_check_reports_a_bad_ports_table(tmp_path):
    from broker.app import check_home, init_home

    app = init_home(tmp_path / "home")
    app.close()
    policy = tmp_path / "policy.toml"
    policy.write_text('[protected]\npaths = ["/data/dicom"]\n[ports]\nnever = ["x"]\n')
    toml = tmp_path / "home" / "broker.toml"
    toml.write_text(toml.read_text().replace('protected_paths_file = ""', f'protected_paths_file = "{policy}"'))
    bad = [r for r in check_home(tmp_path / "home") if r.name == "forward ports"]
    assert bad and not bad[0].ok and "ports.never[0]" in bad[0].detail
