"""SIEM export: RFC 5424 syslog to local UDP/TCP collectors, the rotated JSON-lines file, the event catalogue."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.app import init_home
from broker.audit import EVENTS
from broker.config import DEFAULT_CONFIG_TOML, parse_syslog_address
from broker.errors import ConfigError, UsageError
from broker.siem import (FACILITY, SD_ID, JsonLinesSink, SyslogSink, ecs_record, event_severity, format_syslog,
                         siem_record)
from helpers import FUZZ_EXAMPLES_OTHER

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- an RFC 5424 reader for the tests
_HEAD = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def parse_5424(message: bytes, *, bom: bool = False, sd_id: str = SD_ID) -> dict:
    """Split one RFC 5424 message strictly (header, one SD element with escapes, [BOM +] MSG)."""
    m = _HEAD.match(message)
    assert m, message[:120]
    pri, ts, host, app, procid, msgid = m.groups()
    rest = message[m.end():].decode("utf-8")
    assert rest.startswith("[" + sd_id + " "), rest[:80]
    params, i = {}, len(sd_id) + 1
    while rest[i] == " ":
        eq = rest.index("=", i)
        name = rest[i + 1:eq]
        assert rest[eq + 1] == '"'
        j, value = eq + 2, []
        while rest[j] != '"':
            if rest[j] == "\\":
                j += 1
            value.append(rest[j])
            j += 1
        params[name] = "".join(value)
        i = j + 1
    assert rest[i] == "]"
    msg = rest[i + 1:]
    lead = " \ufeff" if bom else " {"
    assert msg.startswith(lead), msg[:10]
    return {"pri": int(pri), "timestamp": ts.decode(), "hostname": host.decode(), "app": app.decode(),
            "procid": procid.decode(), "msgid": msgid.decode(), "sd": params,
            "msg": json.loads(msg[2:] if bom else msg[1:])}


def _row(**over) -> dict:
    row = {"id": 7, "at": "2026-11-28T14:15:30.123456Z", "event": "session.killed", "actor": "carol",
           "user_name": "alice", "device": "ct-01", "session_id": "20261128-141530-3fa2c1", "grant_id": 3,
           "request_id": None, "source": "cli", "details": json.dumps({"reason": "audit hold"}),
           "prev_hash": "a" * 64, "hash": "b" * 64}
    return row | over


# ----------------------------------------------------------------------------- format
def test_syslog_message_fields():
    msg = parse_5424(format_syslog(_row(), app_name="medbroker", hostname="jump-1", procid="4242"))
    assert msg["pri"] == FACILITY * 8 + 4  # session.killed is a warning
    assert (msg["timestamp"], msg["hostname"], msg["app"], msg["procid"], msg["msgid"]) == (
        "2026-11-28T14:15:30.123456Z", "jump-1", "medbroker", "4242", "session.killed")
    assert msg["sd"] == {"id": "7", "hash": "b" * 64, "actor": "carol", "user": "alice", "device": "ct-01",
                         "session": "20261128-141530-3fa2c1", "grant": "3", "source": "cli"}
    assert msg["msg"] == siem_record(_row(), "jump-1")
    assert msg["msg"]["details"] == {"reason": "audit hold"} and msg["msg"]["v"] == 1
    assert msg["msg"]["host"] == "jump-1"  # several brokers feed one SIEM: every record names its host
    # No BOM by default: MSG is plain JSON from its first byte (RFC 5424 MSG-ANY), as naive parsers expect.
    raw = format_syslog(_row(), hostname="jump-1")
    assert b"\xef\xbb\xbf" not in raw and json.loads(raw[raw.index(b"] ") + 2:])["id"] == 7


def test_bom_and_sd_id_are_configurable():
    raw = format_syslog(_row(), hostname="h", bom=True, sd_id="medbroker@99999")
    msg = parse_5424(raw, bom=True, sd_id="medbroker@99999")
    assert raw.count(b"\xef\xbb\xbf") == 1 and msg["sd"]["user"] == "alice"


def test_ecs_records_carry_the_fields_elastic_and_splunk_map():
    row = _row(event="request.approved", actor="bob", user_name="alice", source="10.1.2.3")
    msg = parse_5424(format_syslog(row, hostname="jump-1", fmt="ecs"))
    ecs = msg["msg"]
    assert ecs["event"]["action"] == "request.approved" and ecs["@timestamp"] == row["at"]
    assert ecs["user"] == {"name": "bob", "target": {"name": "alice"}}
    assert ecs["source"]["ip"] == "10.1.2.3" and ecs["host"]["name"] == "jump-1"
    assert ecs["medbroker"] == siem_record(row, "jump-1")  # nothing of medbroker's own record is lost
    vendor = ecs_record(_row(event="sftp.denied", actor=None), "h")
    assert vendor["user"] == {"name": "alice"} and vendor["event"]["outcome"] == "failure"


def test_structured_data_escapes_and_controls():
    row = _row(actor='x"y]z\\w\nq', details="{}")
    msg = parse_5424(format_syslog(row, hostname="h"))
    assert msg["sd"]["actor"] == 'x"y]z\\w?q'
    # header fields that are not printable ASCII become the NILVALUE
    assert parse_5424(format_syslog(row, hostname="höst name"))["hostname"] == "-"


def test_long_udp_messages_lose_details_not_validity():
    row = _row(details=json.dumps({"reason": "x" * 20000}))
    raw = format_syslog(row, hostname="h", max_bytes=8192)
    assert len(raw) < 8192
    msg = parse_5424(raw)
    assert msg["msg"]["details"]["truncated"] is True and msg["msg"]["hash"] == "b" * 64


def test_severity_rules():
    assert event_severity("alert.exfiltration") == 2
    assert event_severity("recording.failed") == 3
    assert event_severity("sftp.denied") == event_severity("login.refused") == 4
    assert event_severity("session.start") == 5


def test_event_names_fit_msgid():
    for name in EVENTS:
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", name) and len(name) <= 32, name


def test_events_doc_is_up_to_date():
    r = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    text = (REPO / "docs" / "events.md").read_text()
    for name in EVENTS:
        assert f"| `{name}` |" in text


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("text,needle", [
    ('syslog_address = "http://x:1"', "siem.syslog_address"),
    ('syslog_address = "udp://host"', "siem.syslog_address"),
    ('syslog_address = "tcp://h:0"', "port 0"),
    ('syslog_app_name = "med broker"', "siem.syslog_app_name"),
    ('syslog_hostname = "a b"', "siem.syslog_hostname"),
    ('jsonl_file = "x"\njsonl_max_bytes = 10', "siem.jsonl_max_bytes"),
    ('colour = "red"', "unknown key siem.colour"),
    ('syslog_sd_id = "medbroker"', "siem.syslog_sd_id"),
    ('syslog_sd_id = "med broker@1"', "siem.syslog_sd_id"),
    ('syslog_sd_id = "a]b@1"', "siem.syslog_sd_id"),
    ('format = "cef"', "siem.format"),
    ('syslog_address = "udp://h:514"\nsyslog_ca_file = "ca.pem"', "siem.syslog_ca_file is set"),
    ('syslog_address = "tls://h:6514"\nsyslog_client_key = "k.pem"', "without siem.syslog_client_cert"),
])
def test_bad_siem_config_is_refused(tmp_path, text, needle):
    from broker.config import load_config

    (tmp_path / "broker.toml").write_text(f"[siem]\n{text}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "broker.toml")
    assert needle in str(exc.value)


def test_default_config_has_the_section_and_sinks_are_off(tmp_path):
    assert "[siem]" in DEFAULT_CONFIG_TOML
    app = init_home(tmp_path / "home")
    try:
        assert app.audit.sinks == [app._alert_sink]
    finally:
        app.close()


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text(max_size=60))
def test_parse_syslog_address_fuzz(text):
    try:
        transport, host, port = parse_syslog_address(text)
    except UsageError:
        return
    assert transport in ("udp", "tcp") and host and 1 <= port <= 65535


# ----------------------------------------------------------------------------- collectors
class UdpCollector:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.address = f"udp://127.0.0.1:{self.sock.getsockname()[1]}"

    def receive(self, predicate, limit: int = 50) -> dict:
        for _ in range(limit):
            msg = parse_5424(self.sock.recv(65535))
            if predicate(msg):
                return msg
        raise AssertionError("the expected message never arrived")

    def close(self) -> None:
        self.sock.close()


class TcpCollector:
    """Accepts connections and splits octet-counted frames; can drop each connection after N messages."""

    def __init__(self, drop_after: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.tls = tls
        self.handshake_errors = 0
        self.address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{self.server.getsockname()[1]}"
        self.messages: list[dict] = []
        self.connections = 0
        self.drop_after = drop_after
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            if self.tls is not None:
                try:
                    conn.settimeout(5)
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    self.handshake_errors += 1
                    conn.close()
                    continue
            self.connections += 1
            with conn:
                conn.settimeout(0.2)
                buf, count = b"", 0
                while not self._stop.is_set():
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        continue
                    if not chunk:
                        break
                    buf += chunk
                    while b" " in buf:
                        size, _, rest = buf.partition(b" ")
                        if len(rest) < int(size):
                            break
                        self.messages.append(parse_5424(rest[:int(size)]))
                        buf = rest[int(size):]
                        count += 1
                    if self.drop_after is not None and count >= self.drop_after:
                        break

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.messages

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.server.close()


def _make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a collector certificate for 127.0.0.1 signed by it, a client certificate, and a stranger CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, san=None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem: str, c: x509.Certificate, key) -> tuple[Path, Path]:
        cp, kp = tmp / f"{stem}.pem", tmp / f"{stem}.key"
        cp.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        return cp, kp

    out: dict[str, Path] = {}
    ca_key, other_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    out["ca"], _ = write("ca", cert("test syslog CA", ca_key, "test syslog CA", ca_key, ca=True), ca_key)
    out["other_ca"], _ = write("other", cert("stranger CA", other_key, "stranger CA", other_key, ca=True), other_key)
    out["server"], out["server_key"] = write("server", cert(
        "collector", srv_key, "test syslog CA", ca_key, ca=False,
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("collector.test")]), srv_key)
    out["client"], out["client_key"] = write("client", cert("jump-1", cli_key, "test syslog CA", ca_key, ca=False),
                                             cli_key)
    return out


def _collector_tls(pki: dict[str, Path], *, want_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"], pki["server_key"])
    if want_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    return ctx


def _home_with(tmp_path: Path, siem: str):
    home = tmp_path / "home"
    home.mkdir()
    (home / "broker.toml").write_text(f"[siem]\n{siem}\n")
    return init_home(home)


def test_udp_collector_receives_audit_rows_from_the_app(tmp_path):
    col = UdpCollector()
    try:
        app = _home_with(tmp_path, f'syslog_address = "{col.address}"\nsyslog_hostname = "jump-1"')
        try:
            row = app.audit.record("session.killed", user="alice", device="ct-01", session_id="s-1",
                                   by="carol", reason="audit hold")
        finally:
            app.close()
        msg = col.receive(lambda m: m["msgid"] == "session.killed")
        assert msg["hostname"] == "jump-1" and msg["sd"]["id"] == str(row["id"]) and msg["sd"]["hash"] == row["hash"]
        assert msg["msg"]["details"] == {"by": "carol", "reason": "audit hold"}
        assert msg["procid"] == str(os.getpid())
    finally:
        col.close()


def test_cli_processes_export_what_they_write(tmp_path):
    """A separate medbroker process (user add) sends its audit row before it exits."""
    col = UdpCollector()
    try:
        app = _home_with(tmp_path, f'syslog_address = "{col.address}"')
        app.close()
        env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
        r = subprocess.run([sys.executable, "-m", "broker.cli", "--home", str(tmp_path / "home"), "user", "add",
                            "erin", "--role", "security"], capture_output=True, text=True, timeout=60, cwd=REPO,
                           env=env)
        assert r.returncode == 0, r.stderr
        msg = col.receive(lambda m: m["msgid"] == "user.created")
        assert msg["sd"]["user"] == "erin" and msg["procid"] != str(os.getpid())
    finally:
        col.close()


def test_tcp_collector_octet_counting_and_reconnect(tmp_path):
    col = TcpCollector(drop_after=1)  # the collector hangs up after each message: the sink reconnects
    try:
        sink = SyslogSink(col.address, hostname="h")
        try:
            for i in range(3):
                sink(_row(id=i + 1, event="sftp.denied"))
                col.wait_for(i + 1)
        finally:
            sink.close()
        got = col.wait_for(3)
        assert [m["sd"]["id"] for m in got] == ["1", "2", "3"]
        assert all(m["pri"] == FACILITY * 8 + 4 and m["msgid"] == "sftp.denied" for m in got)
        assert col.connections >= 2 and sink.sent == 3
    finally:
        col.close()


def test_absent_collector_never_blocks_the_audit_log(tmp_path):
    port = socket.create_server(("127.0.0.1", 0))
    address = f"tcp://127.0.0.1:{port.getsockname()[1]}"
    port.close()  # nothing listens there now
    app = _home_with(tmp_path, f'syslog_address = "{address}"')
    sink = app.audit.sinks[-1]
    try:
        for _ in range(20):
            app.audit.record("auth.failure", user="alice", reason="bad key")
        assert len(app.store.audit_rows(event="auth.failure")) == 20
    finally:
        app.close()
    assert sink.sent == 0 and sink.errors >= 1 and sink.dropped == 20


# ----------------------------------------------------------------------------- JSON lines
def test_jsonl_file_rotates_and_keeps_order(tmp_path):
    path = tmp_path / "siem" / "audit.jsonl"
    sink = JsonLinesSink(path, max_bytes=4096, backups=2)
    for i in range(1, 101):
        sink(_row(id=i, details=json.dumps({"n": i, "pad": "p" * 100})))
    files = [Path(f"{path}.2"), Path(f"{path}.1"), path]
    assert all(f.exists() for f in files) and not Path(f"{path}.3").exists()
    assert all(f.stat().st_size <= 4096 for f in files)
    assert (path.stat().st_mode & 0o777) == 0o600
    ids = [json.loads(line)["id"] for f in files for line in f.read_text().splitlines()]
    assert ids == list(range(ids[0], 101)) and ids[0] > 1  # contiguous; the oldest rotated away


def test_jsonl_from_the_live_server_and_the_cli(tmp_path, device):
    """The SSH server process builds its App with the sinks too: session rows reach the file."""
    from helpers.broker import World

    w = World(tmp_path, device()).setup(config='[siem]\njsonl_file = "siem/audit.jsonl"\n')
    try:
        w.grant()
        r = w.ssh("alice@ct-01", "echo siem-check")
        assert r.returncode == 0, r.stderr
        path = w.app.home / "siem" / "audit.jsonl"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = [json.loads(line) for line in path.read_text().splitlines()]
            if any(e["event"] == "session.end" for e in events):
                break
            time.sleep(0.05)
        names = [e["event"] for e in events]
        assert {"device.added", "grant.created", "auth.success", "session.start", "session.end"} <= set(names)
        start = next(e for e in events if e["event"] == "session.start")
        assert start["user"] == "alice" and start["device"] == "ct-01" and start["session_id"]
        rows = {r["id"]: r["hash"] for r in w.app.store.audit_rows()}
        assert all(rows[e["id"]] == e["hash"] for e in events)
    finally:
        w.close()


def test_a_forked_worker_sends_its_own_events():
    """listen.workers > 1 may fork after the App exists: the child starts its own sender."""
    col = UdpCollector()
    try:
        sink = SyslogSink(col.address, hostname="h")
        sink(_row(id=1))
        col.receive(lambda m: m["sd"]["id"] == "1")
        with warnings.catch_warnings():  # Python 3.12+ warns about fork() in a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: send one event, flush, exit without running pytest's teardown
            code = 1
            try:
                sink(_row(id=2))
                sink.close()
                code = 0 if sink.sent == 1 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        msg = col.receive(lambda m: m["sd"]["id"] == "2")
        assert msg["procid"] == str(pid)
        sink.close()
    finally:
        col.close()


def test_syslog_over_tls_verifies_the_collector_and_presents_a_client_certificate(tmp_path):
    """RFC 5425: the app's audit rows reach a TLS collector that requires a client certificate."""
    pki = _make_pki(tmp_path)
    col = TcpCollector(tls=_collector_tls(pki, want_client=True))
    try:
        app = _home_with(tmp_path, f'syslog_address = "{col.address}"\nsyslog_hostname = "jump-1"\n'
                                   f'syslog_ca_file = "{pki["ca"]}"\nsyslog_client_cert = "{pki["client"]}"\n'
                                   f'syslog_client_key = "{pki["client_key"]}"\nformat = "ecs"')
        try:
            row = app.audit.record("session.killed", user="alice", device="ct-01", session_id="s-1",
                                   by="carol", reason="audit hold")
        finally:
            app.close()
        got = [m for m in col.wait_for(1) if m["msgid"] == "session.killed"]
        assert got and got[0]["sd"]["hash"] == row["hash"] and got[0]["msg"]["host"]["name"] == "jump-1"
        assert got[0]["msg"]["event"]["action"] == "session.killed"
    finally:
        col.close()


def test_syslog_over_tls_refuses_a_collector_the_ca_did_not_sign(tmp_path):
    pki = _make_pki(tmp_path)
    col = TcpCollector(tls=_collector_tls(pki, want_client=False))
    try:
        sink = SyslogSink(col.address, hostname="h", ca_file=pki["other_ca"])
        try:
            sink(_row(event="sftp.denied"))
            deadline = time.monotonic() + 5
            while sink.errors == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            sink.close(timeout=0.5)
        assert sink.errors >= 1 and sink.sent == 0 and col.messages == []
        # the same collector, with the right CA and its name: delivered
        sink = SyslogSink(col.address.replace("127.0.0.1", "127.0.0.1"), hostname="h", ca_file=pki["ca"],
                          server_name="collector.test")
        try:
            sink(_row(event="sftp.denied"))
            assert col.wait_for(1) and sink.errors == 0
        finally:
            sink.close()
    finally:
        col.close()


def test_jsonl_records_name_their_host(tmp_path):
    app = _home_with(tmp_path, 'jsonl_file = "siem/audit.jsonl"\nsyslog_hostname = "jump-2"')
    try:
        app.audit.record("user.created", user="erin", actor="admin")
    finally:
        app.close()
    lines = [json.loads(x) for x in (tmp_path / "home" / "siem" / "audit.jsonl").read_text().splitlines()]
    assert lines and all(x["host"] == "jump-2" for x in lines)


def test_alerts_file_rotates_like_the_siem_file(tmp_path):
    """[alerts] file grows by one line per denial; it rotates by size instead of filling the disk."""
    from broker.siem import JsonLinesSink

    app = _home_with(tmp_path, "")
    try:
        app.audit.record("sftp.denied", user="alice", device="ct-01", reason="x" * 100)
        sink = app._alerts
        assert isinstance(sink, JsonLinesSink)
        sink.max_bytes = 4096
        for i in range(60):
            app.audit.record("sftp.denied", user="alice", device="ct-01", reason=f"{i:03d}" + "y" * 100)
        app.audit.record("user.created", user="erin", actor="admin")  # not an alert: not written
    finally:
        app.close()
    alerts = tmp_path / "home" / "alerts.jsonl"
    rotated = alerts.with_name("alerts.jsonl.1")
    assert rotated.exists() and alerts.stat().st_size <= 4096 and rotated.stat().st_size <= 4096
    last = json.loads(alerts.read_text().splitlines()[-1])
    assert last["event"] == "sftp.denied" and last["details"]["reason"].startswith("059")
    assert "user.created" not in alerts.read_text()
