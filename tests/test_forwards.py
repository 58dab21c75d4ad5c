"""Approved port forwards (issue 14 item 2): request and strike ports, ``ssh -L`` to exactly those ports on the
device, recorded, scanned, ended with the session. Real OpenSSH ssh, a real sshd device, a real HTTP server on
the device side (loopback, like the device's sshd)."""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import tarfile
import subprocess
import threading

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
from helpers import poll as _wait
from helpers.net import free_port, wait_for_port
from sessions.recording import read_frames

runner = CliRunner()

PAGE = b"<html>ct-01 service UI: tube temperature 41 C</html>\n"
HL7 = (b"MSH|^~\\&|RIS|HOSP|PACS|HOSP|202612061200||ORU^R01|MSG00001|P|2.5\r"
       b"PID|1||123456^^^HOSP^MR||DOE^JANE^Q||19700101|F|||1 MAIN ST^^TOWN^^12345\r"
       b"OBR|1|A1|B1|71020^CHEST XRAY^CPT\r")


TLS_HELLO = b"\x16\x03\x01\x00\x2fSECRET-TLS-PAYLOAD" + bytes(range(32)) + b"\r\n\r\n"


def _tar_of(data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("service.log")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps a connection open between requests (the kill test holds one)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = {"/hl7": HL7, "/tar": _tar_of(b"service log: tube ok\n" * 20),
                "/random": os.urandom(200_000)}.get(self.path, PAGE)
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
    assert "forwards: 443, 8080" in show and "443 (TLS: inspected? no — allowed only on contained devices)" in show
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
    assert "8443 (TLS: inspected? no — allowed only on contained devices)" in card
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
        # 0x16 0x03 then no TLS record (the first impression TLS used to be): closed, nothing reaches the device
        with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
            s.sendall(TLS_HELLO)
            assert s.recv(65536) == b""
        # an SSH server on a granted port (an encrypted session past every guard): closed before its banner
        assert b"SSH-" not in _get(local_ssh, "")
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
    assert alert["kind"] == "forward" and alert["port"] == ssh_like and alert["content"] == "ssh"
    not_tls = [json.loads(e["details"]) for e in world.events("channel.protocol.denied")]
    assert [d["protocol"] for d in not_tls] == ["not-tls"] and "not TLS after a TLS start" in not_tls[0]["reason"]
    # the recording: open/close frames with the port, the plain text both ways
    assert _wait(lambda: world.app.store.get_session(sid)["final_hash"])
    row = world.app.store.get_session(sid)
    frames = list(read_frames(world.app.recordings.local_path(row["recording"]), key_lookup=world.app.keys.get))
    opens = [f.event() for f in frames if f.kind == "channel-open" and f.event().get("type") == "direct-tcpip"]
    assert opens and all(o["port"] in (http_port, ssh_like) for o in opens)
    closes = [f.event() for f in frames if f.kind == "channel-close" and "port" in f.event()]
    assert len(closes) == len(opens) >= 3 and sum(c["bytes_to_vendor"] for c in closes) > len(PAGE)
    sent = b"".join(f.payload for f in frames if f.kind == "input")
    got = b"".join(f.payload for f in frames if f.kind == "output")
    assert b"GET /page HTTP/1.0" in sent and PAGE in got
    assert b"SECRET-TLS-PAYLOAD" not in sent
    assert not [f for f in frames if f.kind == "forward-bytes" and f.event()["to"] == "device"]
    denials = [f.event() for f in frames if f.kind == "policy-denial" and f.event().get("protocol") == "not-tls"]
    assert denials and denials[0]["port"] == http_port and any(c["tls"] for c in closes)
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


def test_an_oversize_ssh_packet_on_a_forward_closes_it_unrecorded(world, http_port):
    """Issue 16: like a session channel (tests/test_e2e_session.py), a forwarded connection whose client sends more
    than the announced 32 KiB in one SSH data packet is closed; none of it reaches the device or the recording."""
    from helpers.clients import paramiko_session

    now = world.app.clock.now()
    req = request_grant(world.app.store, world.app.audit, world.app.rules, get_principal(world.app.store, "alice"),
                        "ct-01", 3600, "service UI", now, forwards=(str(http_port),))
    approve_request(world.app.store, world.app.audit, world.app.rules, req.id, get_principal(world.app.store, "bob"),
                    now)
    host_key = (world.app.home / "keys" / "host_ed25519.pub").read_text()
    with paramiko_session("127.0.0.1", world.port, "alice@ct-01", key=world.keys["alice"].private_path,
                          host_key_line=host_key) as client:
        transport = client.get_transport()
        assert transport is not None
        chan = transport.open_channel("direct-tcpip", ("ct-01", http_port), ("127.0.0.1", 40000), timeout=10)
        chan.out_max_packet_size = 200_000
        chan.settimeout(10)
        chan.sendall(b"GET /page HTTP/1.0\r\nX-Pad: " + b"p" * 150_000 + b"\r\n\r\n")
        assert chan.recv(65536) == b""  # closed by the broker, not answered
        chan.close()
    def refused() -> list[dict]:
        return [r for r in (json.loads(e["details"]) for e in world.events("channel.refused"))
                if r.get("protocol") == "packet" and "bytes in one SSH data packet" in r["reason"]]

    assert _wait(refused), world.events("channel.refused")
    sid = world.app.store.list_sessions()[-1]["id"]
    assert _wait(lambda: world.app.store.get_session(sid)["final_hash"])
    row = world.app.store.get_session(sid)
    frames = list(read_frames(world.app.recordings.local_path(row["recording"]), key_lookup=world.app.keys.get))
    assert not any(f.kind == "input" and b"ppp" in f.payload for f in frames)
    assert any(f.kind == "policy-denial" and b"one SSH data packet" in f.payload for f in frames)


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


# ------------------------------------------------------------------------------------------ TLS, verified
def _record(ctype: int, payload: bytes, version: bytes = b"\x03\x03") -> bytes:
    return bytes([ctype]) + version + len(payload).to_bytes(2, "big") + payload


def test_tls_record_layer_and_rule():
    from broker.forwards import tls_refusal, tls_rule_text
    from sessions.tlsrecords import NOT_TLS, TlsRecords

    hello = _record(22, b"\x01\x00\x00\x2a" + bytes(42), b"\x03\x01")
    client = TlsRecords("client")
    # records split at every byte still parse; ciphertext passes
    for i in range(len(hello)):
        assert client.feed(hello[i:i + 1]) is None
    assert client.feed(_record(20, b"\x01") + _record(23, bytes(range(256)) * 12)) is None
    # plain text framed as application data does not
    assert client.feed(_record(23, HL7 * 40)).startswith(f"{NOT_TLS}: the vendor's client sent application data")
    assert client.feed(hello) == client.error  # final
    for bad, why in ((b"\x16\x03GET / HTTP/1.1\r\n", "record version"), (_record(24, b"\x01\x00\x10"), "heartbeat"),
                     (_record(23, b"x" * 40), "first record"), (_record(22, b"\x02abc"), "ClientHello"),
                     (b"\x16\x03\x03\x48\x01", "bytes (TLS allows"), (_record(22, b""), "empty")):
        assert why in TlsRecords("client").feed(bad), bad
    assert TlsRecords("server").feed(b"HTTP/1.1 400 Bad Request\r\n").startswith(f"{NOT_TLS}: the device sent")
    assert TlsRecords("server").feed(_record(22, b"\x02" + bytes(40)) + _record(21, b"\x02\x28")) is None
    # the site's rule, and what the approval card says next to each port
    assert tls_refusal("contained-only", "contained", "ct-01", 443) is None
    assert tls_refusal("allow", "exposed", "ct-01", 443) is None
    for state in ("exposed", "unknown", None):
        assert "allowed only on contained devices" in tls_refusal("contained-only", state, "ct-01", 443)
    assert "refused on this broker" in tls_refusal("refuse", "contained", "ct-01", 443)
    assert tls_rule_text("contained-only") == "TLS: inspected? no — allowed only on contained devices"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.binary(max_size=40)), max_size=6),
       st.lists(st.integers(1, 60), min_size=1, max_size=4), st.booleans())
def test_tls_record_parser_fuzz(records, cuts, raw):
    """Any byte stream, cut anywhere: the verdict does not depend on the chunking, and a stream judged TLS is
    back-to-back records of types 20..23 whose first is a ClientHello handshake."""
    from sessions.tlsrecords import TlsRecords

    stream = b"".join(bytes([t]) + b"\x03" + bytes([min(n, 5)]) + len(p).to_bytes(2, "big") + p
                      for t, p in records for n in [len(p) % 6]) if not raw else \
        b"".join(p for _, p in records)
    whole = TlsRecords("client")
    verdict = whole.feed(stream)
    pieces, pos, i = TlsRecords("client"), 0, 0
    chunked = None
    while pos < len(stream):
        chunked = pieces.feed(stream[pos:pos + cuts[i % len(cuts)]]) or chunked
        pos += cuts[i % len(cuts)]
        i += 1
    assert (verdict is None) == (chunked is None)
    if verdict is None and len(stream) > 5:  # fewer bytes: the first header is not complete yet
        assert stream[0] == 22 and stream[5] == 1


class _TlsDevice:
    """A TLS server on the device side (self-signed certificate made here): answers each line with ``ok: LINE``.
    ``received`` counts connections and the bytes that reached it."""

    def __init__(self, tmp):
        import datetime
        import ssl

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ct-01")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        (tmp / "tls.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp / "tls.pem")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                first = conn.recv(1, socket.MSG_PEEK)
                self.received.append(len(first))
                if not first:
                    return
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    line = b""
                    while not line.endswith(b"\n"):
                        chunk = tls.recv(100)
                        if not chunk:
                            return
                        line += chunk
                    tls.sendall(b"ok: " + line + os.urandom(20000))
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def _tls_get(port: int, line: bytes = b"tube temperature\n") -> bytes:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(line)
        out = b""
        while len(out) < 20000:
            chunk = tls.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


@pytest.fixture
def tls_device(tmp_path):
    dev = _TlsDevice(tmp_path)
    try:
        yield dev
    finally:
        dev.close()


def _forward_proc(world, *pairs: tuple[int, int], command: str | None = None) -> subprocess.Popen:
    argv = ["ssh", *ssh_options(key=world.keys["alice"].private_path, known_hosts=world.known_hosts,
                                host_key_checking="yes"), "-p", str(world.port)]
    for local, remote in pairs:
        argv += ["-L", f"{local}:ct-01:{remote}"]
    argv += (["-N"] if command is None else []) + ["alice@ct-01@127.0.0.1"] + ([command] if command else [])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_port("127.0.0.1", pairs[0][0], 15)
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 15) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err.decode()


@pytest.mark.openssh
def test_forward_tls_verified_plain_text_judged_and_findings_end_the_session(world, http_port, tls_device):
    """Contained ct-01: real TLS passes (sizes only); TLS in name only is closed; a tar stream is refused; HL7
    ends the whole session (the vendor's exec channel says why); random bytes over HTTP meet the opaque budget."""
    world.grant(forwards=(str(http_port), str(tls_device.port)))
    web, tls = free_port(), free_port()
    proc = _forward_proc(world, (web, http_port), (tls, tls_device.port), command="sleep 60")
    try:
        got = _tls_get(tls)  # real TLS on a contained device: allowed
        assert got.startswith(b"ok: tube temperature\n") and len(got) > 20000
        # a ClientHello, then plain text from the vendor, or from the device (the web server answers "400" to it):
        # closed at once, nothing of it passes
        for stream in (b"GET /page HTTP/1.0\r\n\r\n", b""):
            with socket.create_connection(("127.0.0.1", web), timeout=10) as s:
                s.sendall(_record(22, b"\x01\x00\x00\x06\x03\x03\r\n\r\n", b"\x03\x01") + stream)
                assert _recv_until(s, b"\x00never") == b""
        # a tar archive of a file through the web page: the stream judge ends that connection
        assert b"ustar" not in _get(web, "/tar")
        assert _wait(lambda: world.events("channel.protocol.denied")[2:])
        # HL7 served by the device's web server: the whole session ends, like HL7 in exec output
        assert b"PID|" not in _get(web, "/hl7")
        status, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert status == 1 and "medbroker: output contained HL7" in err and "the session was ended" in err, err
    assert _wait(lambda: world.events("alert.exfiltration"))
    denied = [json.loads(e["details"]) for e in world.events("channel.protocol.denied")]
    assert [d["protocol"] for d in denied] == ["not-tls", "not-tls", "tar"], denied
    assert all(d["kind"] == "forward" and d["port"] == http_port for d in denied)
    assert "the vendor's client sent a record of content type 71" in denied[0]["reason"]
    assert "the device sent a record of content type" in denied[1]["reason"]  # its plain-text error page
    assert "a tar archive stream was detected on this forwarded connection (sent by the device)" in denied[2]["reason"]
    alert = json.loads(world.events("alert.exfiltration")[-1]["details"])
    assert alert["kind"] == "forward" and alert["content"].startswith("HL7") and alert["direction"] == "to-vendor"
    sid = world.app.store.list_sessions()[-1]["id"]
    assert _wait(lambda: world.app.store.get_session(sid)["final_hash"])
    row = world.app.store.get_session(sid)
    assert row["status"] == "stopped" and row["end_reason"].startswith("output contained HL7")
    frames = list(read_frames(world.app.recordings.local_path(row["recording"]), key_lookup=world.app.keys.get))
    got = b"".join(f.payload for f in frames if f.kind == "output")
    assert b"tube temperature" not in got and b"ustar" not in got  # TLS: sizes only; the tar never passed
    sizes = [f.event() for f in frames if f.kind == "forward-bytes"]
    assert sum(s["bytes"] for s in sizes if s["to"] == "vendor") > 20000
    closes = {f.event()["reason"] for f in frames if f.kind == "channel-close" and "port" in f.event()}
    assert any(r.startswith("not TLS after a TLS start: the device sent") for r in closes), closes
    # random bytes over plain HTTP count against the session's opaque budget, as exec output does
    world.grant(forwards=(str(http_port),))
    web = free_port()
    proc = _forward_proc(world, (web, http_port), command="sleep 60")
    try:
        assert len(_get(web, "/random")) < 200_000
        status, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert status == 1 and "could not be inspected" in err and "the session was ended" in err, err
    assert _wait(lambda: len(world.events("alert.exfiltration")) == 2)
    alert = json.loads(world.events("alert.exfiltration")[-1]["details"])
    assert alert["content"] == "opaque" and alert["kind"] == "forward" and alert["opaque_bytes"] > 65536


@pytest.mark.openssh
def test_forward_tls_on_an_exposed_device(exposed_world, tls_device):
    """An exposed ct-01: TLS is refused at the ClientHello under the default (the client reads a TLS
    access_denied alert, nothing reaches the device), and allowed with forward_tls = "allow"."""
    import ssl
    from dataclasses import replace

    world = exposed_world
    world.grant(forwards=(str(tls_device.port),))
    local = free_port()
    proc = _forward_proc(world, (local, tls_device.port))
    try:
        with pytest.raises(ssl.SSLError, match="ACCESS_DENIED|access denied"):
            _tls_get(local)
        assert _wait(lambda: len(tls_device.received) >= 2)  # wait_for_port's probe, then the refused one
        assert not any(tls_device.received)  # the device side opened, not a byte reached it
        cfg = world.app.config
        world.app.config = replace(cfg, policy=replace(cfg.policy, forward_tls="allow"))
        assert _tls_get(local).startswith(b"ok: tube temperature\n")
        assert tls_device.received[-1] == 1
    finally:
        proc.terminate()
        _finish(proc)
    refused = json.loads(world.events("channel.refused")[-1]["details"])
    assert refused["protocol"] == "tls" and "allowed only on contained devices" in refused["reason"]
    assert len(world.app.store.list_sessions()) == 1  # a refused TLS connection does not end the session
    def tls_closes():
        return [c for c in (json.loads(e["details"]) for e in world.events("forward.close")) if c["tls"]]

    assert _wait(lambda: len(tls_closes()) == 2)
    closes = tls_closes()
    assert closes[0]["bytes_to_device"] == 0 and "contained devices" in closes[0]["reason"]
    assert closes[1]["bytes_to_vendor"] > 20000
