"""Notifications on new requests and decisions: a local webhook receiver and a local SMTP server, on loopback."""

from __future__ import annotations

import email
import json
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from broker.grants import approve_request, deny_request
from broker.identity import get_principal
from helpers.net import closed_port
from test_web_http import Console
from web_support import wait_for


class Webhook:
    """An HTTP server that stores every JSON body POSTed to it."""

    def __init__(self, status: int = 204) -> None:
        self.bodies: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                hook.bodies.append({"type": self.headers.get("Content-Type"), "json": json.loads(raw), "raw": raw,
                                    "signature": self.headers.get("X-Medbroker-Signature"),
                                    "timestamp": self.headers.get("X-Medbroker-Timestamp")})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Smtp:
    """A minimal SMTP server (RFC 5321 subset: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) that keeps messages."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        box = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 10

            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 localhost test SMTP")
                sender, rcpts = None, []
                for _ in range(100):  # bounded conversation
                    line = self.rfile.readline(1000).decode("ascii", "replace").strip()
                    if not line:
                        return
                    verb = line[:4].upper()
                    if verb in ("EHLO", "HELO"):
                        self.reply("250 localhost")
                    elif verb == "MAIL":
                        sender = line.split(":", 1)[1].strip()
                        self.reply("250 ok")
                    elif verb == "RCPT":
                        rcpts.append(line.split(":", 1)[1].strip())
                        self.reply("250 ok")
                    elif verb == "DATA":
                        self.reply("354 go ahead")
                        data = b""
                        while not data.endswith(b"\r\n.\r\n") and len(data) < 1 << 20:
                            chunk = self.rfile.readline(1 << 16)
                            if not chunk:
                                return
                            data += chunk
                        box.messages.append({"from": sender, "to": rcpts,
                                             "msg": email.message_from_bytes(data[:-5])})
                        self.reply("250 queued")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("250 ok")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receivers():
    hook, smtp = Webhook(), Smtp()
    try:
        yield hook, smtp
    finally:
        hook.close()
        smtp.close()


def _config(hook_url: str, smtp_port: int, extra: str = "") -> str:
    return (f'[web]\nwebhook_url = "{hook_url}"\nsmtp_host = "127.0.0.1"\nsmtp_port = {smtp_port}\n'
            'smtp_from = "medbroker@hospital.example"\nsmtp_to = ["biomed-oncall@hospital.example"]\n' + extra)


def verify_signature(secret: bytes, body: dict, *, max_age_s: int = 300) -> bool:
    """What a receiver does (the snippet in docs/web.md): recompute the HMAC over TIMESTAMP.BODY, compare in
    constant time, refuse stale timestamps."""
    import hashlib
    import hmac
    import time

    if not body["signature"] or not body["timestamp"] or abs(time.time() - int(body["timestamp"])) > max_age_s:
        return False
    want = "sha256=" + hmac.new(secret, body["timestamp"].encode() + b"." + body["raw"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, body["signature"])


def test_new_request_and_each_decision_reach_webhook_and_email(tmp_path, receivers):
    hook, smtp = receivers
    console = Console(tmp_path, _config(hook.url, smtp.port))
    try:
        rid = console.request()
        wait_for(lambda: len(hook.bodies) >= 1 and len(smtp.messages) >= 1, timeout=10)
        body = hook.bodies[0]
        assert body["type"] == "application/json"
        note = body["json"]
        assert note["event"] == "request.created" and note["request"]["id"] == rid
        assert note["url"] == f"{console.url}/requests/{rid}"
        assert note["summary"] == "alice (Acme Imaging) asks for ct-01 for 2h: tube replacement"
        assert note["text"].startswith("medbroker: alice (Acme Imaging) asks for ct-01") and note["url"] in note["text"]
        assert body["signature"] is None  # no secret configured: unsigned
        mail = smtp.messages[0]
        assert mail["msg"]["Date"] and mail["msg"]["Message-ID"].endswith("@hospital.example>")
        assert mail["to"] == ["<biomed-oncall@hospital.example>"]
        assert f"request {rid}" in mail["msg"]["Subject"] and "alice (Acme Imaging) asks for ct-01" in mail["msg"]["Subject"]
        text = mail["msg"].get_payload(decode=True).decode()
        assert f"Open it: {console.url}/requests/{rid}" in text and "Ticket:    WO-9" in text
        # the link in the notification opens the request for a signed-in approver
        bob = console.client("bob")
        status, _, page = bob.get(f"/requests/{rid}")
        assert status == 200 and "tube replacement" in page and f'action="/requests/{rid}/approve"' in page
        approve_request(console.app.store, console.app.audit, console.app.rules, rid,
                        get_principal(console.app.store, "bob"), console.clock.now())
        rid2 = console.request()
        wait_for(lambda: len(hook.bodies) >= 3, timeout=10)
        deny_request(console.app.store, console.app.audit, rid2, get_principal(console.app.store, "dave"),
                     console.clock.now(), "no work order")
        wait_for(lambda: len(hook.bodies) >= 4 and len(smtp.messages) >= 4, timeout=10)
        assert [b["json"]["event"] for b in hook.bodies] == ["request.created", "request.approved", "request.created",
                                                            "request.denied"]
        assert hook.bodies[1]["json"]["summary"] == "bob approved alice on ct-01"
        assert hook.bodies[3]["json"]["summary"] == "dave denied alice on ct-01: no work order"
        assert "dave denied alice on ct-01" in smtp.messages[3]["msg"]["Subject"]
    finally:
        console.close()


def test_the_notifier_resumes_where_it_stopped(tmp_path, receivers):
    hook, smtp = receivers
    console = Console(tmp_path, _config(hook.url, smtp.port))
    try:
        console.request()
        wait_for(lambda: len(hook.bodies) == 1, timeout=10)
        from broker.web import start_web, stop_web

        console.loop.call(stop_web(console.handle))
        rid = console.request()  # made while the console is down
        console.handle = console.loop.call(start_web(console.app, "127.0.0.1:0"))
        wait_for(lambda: len(hook.bodies) == 2, timeout=10)
        assert hook.bodies[1]["json"]["request"]["id"] == rid
        assert len(hook.bodies) == 2  # the first one was not sent again
    finally:
        console.close()


def test_unreachable_receivers_are_audited_not_fatal(tmp_path):
    port = closed_port()
    console = Console(tmp_path, _config(f"http://127.0.0.1:{port}/hook", port))
    try:
        rid = console.request()
        failed = wait_for(lambda: [e for e in console.events("notify.failed") if e["request_id"] == rid]
                          if len(console.events("notify.failed")) >= 2 else None, timeout=20)
        assert {json.loads(e["details"])["channel"] for e in failed} == {"webhook", "email"}
        assert Console.client(console, "bob").get("/inbox")[0] == 200  # the console keeps working
    finally:
        console.close()


def test_smtp_server_helper_speaks_smtp():
    """The local SMTP server is real enough for smtplib (guards the test double itself)."""
    import smtplib
    from email.message import EmailMessage

    smtp = Smtp()
    try:
        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = "hi", "a@b.example", "c@d.example"
        msg.set_content("body")
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
            client.send_message(msg)
        assert smtp.messages[0]["msg"]["Subject"] == "hi"
    finally:
        smtp.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", smtp.port), timeout=1).close()


def test_webhooks_are_signed_and_carry_the_state_as_of_their_event(tmp_path, receivers):
    hook, smtp = receivers
    secret = b"s3cret-shared-with-the-receiver"
    (tmp_path / "hook.secret").write_bytes(secret + b"\n")
    console = Console(tmp_path, _config(hook.url, smtp.port, f'webhook_secret_file = "{tmp_path / "hook.secret"}"\n'))
    try:
        from broker.web import start_web, stop_web

        console.loop.call(stop_web(console.handle))  # the request is approved before the notifier sees it
        rid = console.request()
        approve_request(console.app.store, console.app.audit, console.app.rules, rid,
                        get_principal(console.app.store, "bob"), console.clock.now())
        console.handle = console.loop.call(start_web(console.app, "127.0.0.1:0"))
        wait_for(lambda: len(hook.bodies) >= 2, timeout=10)
        created, approved = hook.bodies[0], hook.bodies[1]
        assert created["json"]["event"] == "request.created" and approved["json"]["event"] == "request.approved"
        assert created["json"]["request"]["status"] == "pending" and created["json"]["request"]["approvals"] == []
        assert created["json"]["request"]["grant_id"] is None
        assert approved["json"]["request"]["status"] == "approved"
        assert approved["json"]["request"]["approvals"] == ["bob"]
        assert all(verify_signature(secret, b) for b in hook.bodies)
        assert not verify_signature(b"another-secret-of-16-bytes", created)
        tampered = dict(created, raw=created["raw"].replace(b"pending", b"approved"))
        assert not verify_signature(secret, tampered)
    finally:
        console.close()
