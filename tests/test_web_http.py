"""The web console over plain HTTP on loopback: links, cookies, CSRF, idle timeout, roles, passwords, share links.

The console runs for real (uvicorn on an event loop thread) against a real broker home; the only seam is
an injected FakeClock, so timeouts are tested without sleeping.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import asyncssh
import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.app import init_home
from broker.clock import FakeClock, utc_iso
from broker.config import BrokerConfig
from broker.devices import add_device
from broker.errors import ConfigError
from broker.grants import get_request, request_grant
from broker.identity import add_user, get_principal
from broker.selfservice import run_command
from broker.totp import enrol_totp
from broker.web import start_web, stop_web
from broker.web_auth import check_password, hash_password
from broker.access_links import issue_signin_link, safe_next_path
from helpers import FUZZ_EXAMPLES_OTHER
from sessions.recwriter import RecordingWriter
from web_support import Client, LoopThread

PEOPLE = (("alice", "vendor"), ("bob", "approver"), ("dave", "approver"), ("carol", "security"), ("ann", "admin"))


class Console:
    """A broker home with people and a device, and the console serving it on 127.0.0.1."""

    def __init__(self, tmp: Path, config: str = "") -> None:
        home = tmp / "home"
        home.mkdir()
        (home / "broker.toml").write_text(config)
        self.clock = FakeClock()
        self.app = init_home(home, clock=self.clock)
        now = self.clock.now()
        for name, role in PEOPLE:
            add_user(self.app.store, name, role, "Acme Imaging" if role == "vendor" else None, now)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        add_device(self.app.store, self.app.audit, self.app.keys, name="ct-01", host="127.0.0.1", port=22,
                   login="service", host_key=host_key.export_public_key().decode().strip(), now=now,
                   key_text=client_key.export_private_key().decode())
        self.loop = LoopThread()
        self.handle = self.loop.call(start_web(self.app, "127.0.0.1:0"))
        self.url = self.handle.url

    def client(self, who: str | None = None) -> Client:
        c = Client(self.url)
        if who:
            c.sign_in(issue_signin_link(self.app.store, self.app.audit, self.app.config, who, self.clock.now()).url)
        return c

    def request(self, user: str = "alice", length: int = 7200) -> int:
        return request_grant(self.app.store, self.app.audit, self.app.rules, get_principal(self.app.store, user),
                             "ct-01", length, "tube replacement", self.clock.now(), ticket="WO-9").id

    def events(self, name: str) -> list[dict]:
        """Audit rows of exactly this event."""
        return [r for r in self.app.store.audit_rows(event=name) if r["event"] == name]

    def close(self) -> None:
        try:
            self.loop.call(stop_web(self.handle))
        finally:
            self.loop.close()
            self.app.close()


@pytest.fixture
def console(tmp_path, store_target):
    """The console over each store (sign-in links, console sessions, approvals: the web's state lives there)."""
    c = Console(tmp_path, f'[store]\nurl = "{store_target}"\n' if isinstance(store_target, str) else "")
    try:
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------------- sign-in links
def test_signin_link_works_once(console):
    link = issue_signin_link(console.app.store, console.app.audit, console.app.config, "bob", console.clock.now())
    assert link.url.startswith(console.url + "/signin/")
    assert console.events("web.link.created")[-1]["user_name"] == "bob"
    c = Client(console.url)
    status, _, page = c.get(link.url[len(console.url):])
    assert status == 200 and "Sign in as bob" in page  # a GET (link preview, mail scanner) does not use it
    assert c.sign_in(link.url) == "/inbox"
    status, _, page = c.get("/inbox")
    assert status == 200 and "Nothing to approve" in page
    again = Client(console.url)
    status, _, page = again.post(link.url[len(console.url):])
    assert status == 410 and "already used" in page and "web" in page and again.cookie is None
    status, _, page = again.get(link.url[len(console.url):])
    assert status == 410 and "already used" in page
    assert [e["actor"] for e in console.events("web.signin")] == ["bob"]
    assert console.events("web.signin.failed")


def test_expired_and_unknown_links_are_refused(console):
    past = console.clock.now() - timedelta(minutes=11)
    link = issue_signin_link(console.app.store, console.app.audit, console.app.config, "bob", past)
    c = Client(console.url)
    path = link.url[len(console.url):]
    for method in (c.get, c.post):
        status, _, page = method(path)
        assert status == 410 and "expired at" in page and "ssh -p" in page
    assert c.cookie is None
    status, _, page = c.get("/signin/not-a-real-token")
    assert status == 404 and "not valid" in page
    status, _, page = c.get("/signin/" + "x" * 500)
    assert status == 404
    assert len(console.events("web.signin.failed")) == 4
    assert console.events("web.signin") == []


def test_signed_out_visitors_are_sent_to_sign_in(console):
    c = Client(console.url)
    status, headers, _ = c.get("/inbox")
    assert status == 303 and headers["location"] == "/signin?reason=signin&next=%2Finbox"
    status, _, page = c.get("/signin?reason=signin&next=%2Finbox")
    assert status == 200 and "ssh -p 2222 YOU@broker web" in page
    status, _, _ = c.post("/requests/1/approve", {"csrf": "x"})
    assert status == 401


def test_ssh_web_command_prints_a_link_or_says_the_console_is_off(console, tmp_path):
    reply = run_command(console.app, get_principal(console.app.store, "carol"), "web")
    assert reply.status == 0 and "works once, for 10m" in reply.stdout
    url = re.search(r"http://\S+", reply.stdout).group(0)
    assert Client(console.url).sign_in(url) == "/sessions"
    off = init_home(tmp_path / "off")
    add_user(off.store, "bob", "approver", None, off.clock.now())
    reply = run_command(off, get_principal(off.store, "bob"), "web")
    assert reply.status == 1 and "web console is not enabled" in reply.stderr and "web.address" in reply.stderr
    off.close()


def test_cookie_is_secure_httponly_samesite_and_pages_are_locked_down(console):
    c = Client(console.url)
    link = issue_signin_link(console.app.store, console.app.audit, console.app.config, "bob", console.clock.now())
    path = link.url[len(console.url):]
    c.get(path)
    status, headers, _ = c.post(path)
    cookie = headers["set-cookie"]
    assert cookie.startswith("__Host-medbroker=")
    for flag in ("Secure", "HttpOnly", "SameSite=lax", "Path=/"):
        assert flag.lower() in cookie.lower()
    assert "domain" not in cookie.lower()
    status, headers, _ = c.get("/inbox")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "same-origin" and headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert "server" not in headers


# ---------------------------------------------------------------------------- CSRF
def test_forms_without_the_csrf_token_or_from_elsewhere_change_nothing(console):
    rid = console.request()
    bob = console.client("bob")
    token = bob.csrf("/inbox")
    for form, headers in (({}, {}), ({"csrf": "forged"}, {}),
                          ({"csrf": token}, {"Origin": "http://evil.example"})):
        status, _, page = bob.post(f"/requests/{rid}/approve", form, headers=headers)
        assert status == 403 and "CSRF" in page
        assert get_request(console.app.store, rid).status == "pending"
    denied = console.events("web.denied")
    assert len(denied) == 3 and all('"reason":"csrf"' in e["details"] for e in denied)
    status, headers, _ = bob.post(f"/requests/{rid}/approve", {"csrf": token},
                                  headers={"Origin": console.url})
    assert status == 303
    assert get_request(console.app.store, rid).status == "approved"
    # another session's token does not work either
    dave = console.client("dave")
    rid2 = console.request()
    status, _, _ = dave.post(f"/requests/{rid2}/deny", {"csrf": token, "reason": "no"})
    assert status == 403 and get_request(console.app.store, rid2).status == "pending"


def test_approve_shorter_and_deny_with_reason(console):
    rid = console.request(length=7200)
    bob = console.client("bob")
    token = bob.csrf("/inbox")
    status, _, _ = bob.post(f"/requests/{rid}/approve", {"csrf": token, "duration": "30m"})
    assert status == 303
    grant = console.app.store.list_grants()[-1]
    assert grant["ends_at"] == utc_iso(console.clock.now() + timedelta(minutes=30))
    status, _, page = bob.get("/inbox")
    assert "Request 1 approved" in page and "until" in page
    rid2 = console.request()
    status, _, _ = bob.post(f"/requests/{rid2}/deny", {"csrf": token, "reason": ""})
    assert get_request(console.app.store, rid2).status == "pending"
    assert "say why you deny it" in bob.get("/inbox")[2]
    bob.post(f"/requests/{rid2}/deny", {"csrf": token, "reason": "no work order for this week"})
    req = get_request(console.app.store, rid2)
    assert req.status == "denied" and req.decision_reason == "no work order for this week" and req.decided_by == "bob"
    status, _, page = bob.post(f"/requests/{rid2}/approve", {"csrf": token})
    assert "already denied by bob" in bob.get("/inbox")[2]


# ---------------------------------------------------------------------------- idle timeout and sign-out
def test_idle_timeout_ends_the_session(console):
    bob = console.client("bob")
    console.clock.advance(29 * 60)
    assert bob.get("/inbox")[0] == 200  # activity resets the idle clock
    console.clock.advance(29 * 60)
    assert bob.get("/inbox")[0] == 200
    console.clock.advance(31 * 60)
    status, headers, _ = bob.get("/inbox")
    assert status == 303 and "reason=idle" in headers["location"]
    assert "idle for too long" in bob.get(headers["location"])[2]
    out = console.events("web.signout")
    assert out[-1]["actor"] == "bob" and '"reason":"idle"' in out[-1]["details"]
    assert bob.get("/inbox")[0] == 303  # the same cookie stays dead


def test_session_lifetime_and_sign_out(console):
    bob = console.client("bob")
    for _ in range(25):  # busy all day: 25 × 29 min > 12 h
        console.clock.advance(29 * 60)
        status, headers, _ = bob.get("/inbox")
        if status != 200:
            break
    assert status == 303 and "reason=lifetime" in headers["location"]
    carol = console.client("carol")
    token = carol.csrf("/sessions")
    old_cookie = carol.cookie
    status, headers, _ = carol.post("/signout", {"csrf": token})
    assert status == 303 and carol.cookie is None
    carol.cookie = old_cookie
    assert carol.get("/sessions")[0] == 303


def test_a_disabled_user_is_signed_out_and_cannot_get_a_link(console):
    bob = console.client("bob")
    ann = console.client("ann")
    token = ann.csrf("/admin/users")
    assert ann.post("/admin/users/bob/disable", {"csrf": token})[0] == 303
    assert console.events("user.disabled")[-1]["actor"] == "ann"
    status, headers, _ = bob.get("/inbox")
    assert status == 303 and "reason=disabled" in headers["location"]
    reply = run_command(console.app, get_principal(console.app.store, "bob"), "web")
    assert reply.status == 1
    status, _, page = ann.post("/admin/users/ann/disable", {"csrf": token})
    assert status == 403 and "cannot disable yourself" in page


# ---------------------------------------------------------------------------- roles
ROLE_MATRIX = [
    ("/inbox", {"vendor": 403, "approver": 200, "security": 403, "admin": 200}),
    ("/mine", {"vendor": 200, "approver": 403, "security": 403, "admin": 403}),
    ("/sessions", {"vendor": 403, "approver": 200, "security": 200, "admin": 200}),
    ("/recordings", {"vendor": 403, "approver": 403, "security": 200, "admin": 403}),
    ("/audit", {"vendor": 403, "approver": 403, "security": 200, "admin": 200}),
    ("/admin/devices", {"vendor": 403, "approver": 403, "security": 200, "admin": 200}),
    ("/admin/users", {"vendor": 403, "approver": 403, "security": 200, "admin": 200}),
    ("/account", {"vendor": 200, "approver": 200, "security": 200, "admin": 200}),
    ("/events/inbox", {"vendor": 403, "security": 403}),
]


def test_every_page_checks_the_role_on_the_server(console):
    who = {"vendor": "alice", "approver": "bob", "security": "carol", "admin": "ann"}
    clients = {role: console.client(name) for role, name in who.items()}
    for path, expected in ROLE_MATRIX:
        for role, status in expected.items():
            got, _, page = clients[role].get(path)
            assert got == status, (path, role, got)
            if status == 403 and not path.startswith("/events"):
                assert f"{who[role]} ({role}) may not" in page and "ask a medbroker administrator" in page
    assert len(console.events("web.denied")) == sum(list(e.values()).count(403) for _, e in ROLE_MATRIX)
    # a vendor sees only their own request, an approver may not disable people
    rid = console.request("alice")
    assert clients["vendor"].get(f"/requests/{rid}")[0] == 200
    other = request_grant(console.app.store, console.app.audit, console.app.rules,
                          get_principal(console.app.store, "dave"), "ct-01", 600, "x", console.clock.now()).id
    assert clients["vendor"].get(f"/requests/{other}")[0] == 404
    token = clients["approver"].csrf("/inbox")
    assert clients["approver"].post("/admin/users/alice/disable", {"csrf": token})[0] == 403
    assert not console.app.store.get_user("alice")["disabled"]


# ---------------------------------------------------------------------------- password + TOTP
def test_password_and_totp_sign_in(console):
    secret = enrol_totp(console.app.store, console.app.keys, "bob").secret.reveal()
    assert secret not in console.app.store.get_user("bob")["totp_secret"]  # stored sealed
    totp = pyotp.TOTP(secret)
    bob = console.client("bob")
    token = bob.csrf("/account")
    bob.post("/account", {"csrf": token, "password": "short", "confirm": "short", "code": totp.at(console.clock.now())})
    assert "12-200 characters" in bob.get("/account")[2]
    pw = "correct horse battery staple"
    bob.post("/account", {"csrf": token, "password": pw, "confirm": pw, "code": totp.at(console.clock.now())})
    assert "Password set" in bob.get("/account")[2]
    assert console.events("web.password.set")[-1]["actor"] == "bob"
    console.clock.advance(60)
    fresh = Client(console.url)
    status, headers, _ = fresh.post("/signin", {"user": "bob", "password": pw, "code": totp.at(console.clock.now()),
                                                "next": "/inbox"})
    assert status == 303 and headers["location"] == "/inbox" and fresh.cookie
    # the same code twice is a replay
    replay = Client(console.url)
    status, _, page = replay.post("/signin", {"user": "bob", "password": pw, "code": totp.at(console.clock.now())})
    assert status == 401 and "wrong user name, password or code" in page and replay.cookie is None
    # wrong passwords lock the pair out, with the same lockout rules as SSH
    for _ in range(console.app.config.limits.max_auth_failures):
        console.clock.advance(31)
        replay.post("/signin", {"user": "bob", "password": "wrong" * 3, "code": totp.at(console.clock.now())})
    console.clock.advance(31)
    status, _, page = replay.post("/signin", {"user": "bob", "password": pw, "code": totp.at(console.clock.now())})
    assert status == 401 and "too many failed sign-ins" in page
    assert '"method":"password+totp"' in console.events("web.signin")[-1]["details"]


def test_password_needs_totp_enrolled(console):
    alice = console.client("alice")
    token = alice.csrf("/account")
    page = alice.get("/account")[2]
    assert "needs a second factor" in page
    alice.post("/account", {"csrf": token, "password": "x" * 20, "confirm": "x" * 20, "code": "123456"})
    assert console.app.store.get_web_password("alice") is None
    status, _, _ = Client(console.url).post("/signin", {"user": "alice", "password": "x" * 20, "code": "123456"})
    assert status == 401


def test_password_hashes():
    stored = hash_password("pässword with spaces")
    assert stored.startswith("scrypt$") and "pässword" not in stored
    assert check_password(stored, "pässword with spaces")
    assert not check_password(stored, "password with spaces")
    for broken in ("", "scrypt$1$2", "md5$x$y$z$a$b", "scrypt$x$8$1$AA==$AA=="):
        assert not check_password(broken, "anything")


# ---------------------------------------------------------------------------- auditor links
def _recorded_session(console, text: bytes) -> str:
    sid = "20260101-080000-abcdef"
    path = console.app.config.recordings_dir / f"{sid}.mbr"
    writer = RecordingWriter(path, {"session_id": sid, "user": "alice", "device": "ct-01",
                                    "started_at": utc_iso(console.clock.now())}, clock=console.clock)
    writer.append_event(1, "pty", {"term": "xterm", "cols": 80, "rows": 24})
    writer.append_data(1, "output", text)
    final = writer.close("closed")
    console.app.store.insert_session({"id": sid, "user_name": "alice", "device": "ct-01", "grant_id": 1,
                                      "started_at": utc_iso(console.clock.now()), "ended_at": utc_iso(console.clock.now()),
                                      "status": "closed", "recording": str(path), "final_hash": final})
    return sid


def test_share_link_replays_without_an_account_until_it_expires_or_is_revoked(console):
    sid = _recorded_session(console, b"$ echo share-marker\r\nshare-marker\r\n")
    carol = console.client("carol")
    token = carol.csrf(f"/recordings/{sid}")
    status, headers, _ = carol.post(f"/recordings/{sid}/share", {"csrf": token, "ttl": "1d", "note": "auditor"})
    page = carol.get(headers["location"])[2]
    url = re.search(r'id="share-url" class="mono" readonly value="([^"]+)"', page).group(1)
    assert console.events("recording.shared")[-1]["actor"] == "carol"
    assert "/shared/" in url and url not in carol.get(f"/recordings/{sid}")[2]  # shown once
    auditor = Client(console.url)
    path = url[len(console.url):]
    status, _, page = auditor.get(path)
    assert status == 200 and "Read-only replay shared by carol (auditor)" in page and 'href="/audit"' not in page
    status, headers, cast = auditor.get(path + "/cast")
    assert status == 200 and "share-marker" in cast
    replayed = console.events("recording.replayed")[-1]
    assert replayed["actor"].startswith("share:") and replayed["session_id"] == sid
    console.clock.advance(86400 + 1)
    for p in (path, path + "/cast"):
        assert auditor.get(p)[0] == 410
    # a longer link, revoked by security before it expires (carol signs in again: a day has passed)
    carol = console.client("carol")
    token = carol.csrf(f"/recordings/{sid}")
    status, headers, _ = carol.post(f"/recordings/{sid}/share", {"csrf": token, "ttl": "7d"})
    url = re.search(r'readonly value="([^"]+)"', carol.get(headers["location"])[2]).group(1)
    share_id = json.loads(console.events("recording.shared")[-1]["details"])["share_id"]
    assert carol.post(f"/shares/{share_id}/revoke", {"csrf": token, "next": f"/recordings/{sid}"})[0] == 303
    assert auditor.get(url[len(console.url):])[0] == 410
    assert console.events("recording.share.revoked")
    status, _, _ = carol.post(f"/recordings/{sid}/share", {"csrf": token, "ttl": "90d"})
    assert "at most 30d" in carol.get(f"/recordings/{sid}")[2]


def test_player_reports_a_tampered_recording(console):
    sid = _recorded_session(console, b"original output\r\n")
    path = Path(console.app.store.get_session(sid)["recording"])
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    carol = console.client("carol")
    page = carol.get(f"/recordings/{sid}")[2]
    assert 'class="verify-bad">FAILED' in page


def test_player_and_cast_accept_a_retention_redacted_recording(console):
    """Issue 12 item 2: the console verified with ``verify_recording`` only, so every recording whose payload
    retention removed showed as FAILED (and its cast could not be read); the CLI's check handles both."""
    from sessions.recording import sign_final_hash
    from sessions.retention import redact_recording

    sid = _recorded_session(console, b"$ echo secret-patient-name\r\n")
    store = console.app.store
    row = store.get_session(sid)
    signature = sign_final_hash(console.app.signing_key, row["final_hash"])
    store.update_session(sid, signature=signature)
    redact_recording(row["recording"], private_key=console.app.signing_key,
                     removed_at=console.clock.now(), policy_days=180, expected_final_hash=row["final_hash"],
                     signature=signature)
    store.mark_payload_removed(sid, utc_iso(console.clock.now()))
    carol = console.client("carol")
    page = carol.get(f"/recordings/{sid}")[2]
    verdict = re.search(r'<dd id="verification" class="([^"]+)">([^<]*)<', page)
    assert verdict.group(1) == "verify-ok", verdict.group(2)
    assert verdict.group(2).startswith("verified (") and "signature valid" in verdict.group(2)
    assert "removed by retention" in verdict.group(2)
    status, _, cast = carol.get(f"/recordings/{sid}/cast")
    assert status == 200 and "secret-patient-name" not in cast
    assert json.loads(cast.splitlines()[0])["version"] == 2


def test_console_kill_takes_the_same_reasons_as_the_cli(console):
    """Issue 12 item 2: one reason limit (500 printable characters) for ``sessions kill`` and the console's button;
    the console refused 301-500 characters before."""
    sid = "20260101-080000-feed01"
    now = utc_iso(console.clock.now())
    console.app.store.insert_session({"id": sid, "user_name": "alice", "device": "ct-01", "grant_id": 1,
                                      "started_at": now, "status": "live", "recording": f"{sid}.mbr",
                                      "broker_pid": 1})
    carol = console.client("carol")
    token = carol.csrf(f"/sessions/{sid}/watch")
    for reason in ("x" * 501, "tab\there", "   "):
        carol.post(f"/sessions/{sid}/kill", {"csrf": token, "reason": reason})
        assert console.app.store.get_session(sid)["kill_requested_at"] is None
    page = carol.get(f"/sessions/{sid}/watch")[2]
    assert "The reason must be 1-500 printable characters" in page and "at most 500 are allowed" in page
    reason = "r" * 400  # refused by the console's old 300-character limit
    carol.post(f"/sessions/{sid}/kill", {"csrf": token, "reason": reason})
    row = console.app.store.get_session(sid)
    assert row["kill_requested_by"] == "carol" and row["kill_reason"] == reason
    assert console.events("session.kill.requested")[-1]["actor"] == "carol"
    carol.post(f"/sessions/{sid}/kill", {"csrf": token, "reason": "again"})
    assert "already ended or a kill was already requested" in carol.get(f"/sessions/{sid}/watch")[2]
    for malformed in ("x" * 80, "%3Cb%3E", "20260101-080000-000000"):  # too long, not an id, unknown: one answer
        status, _, text = carol.get(f"/sessions/{malformed}/watch")
        assert status == 404 and "does not exist" in text and "medbroker sessions list" in text


# ---------------------------------------------------------------------------- config and helpers
def test_console_off_loopback_needs_tls(tmp_path):
    cfg = BrokerConfig(home=tmp_path)
    with pytest.raises(ConfigError) as err:
        cfg.with_web("0.0.0.0:8443")
    assert "without TLS" in err.value.message and "tls_cert" in err.value.hint
    assert cfg.with_web("127.0.0.1:8080").web.address == "127.0.0.1:8080"


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text(max_size=300))
def test_next_path_never_leaves_the_site(text):
    out = safe_next_path(text)
    assert out.startswith("/") and not out.startswith("//") and "\\" not in out
    assert all(0x21 <= ord(c) <= 0x7E for c in out)
    assert out == "/" or out == text


def test_inbox_card_shows_containment_windows_and_the_shell_choice(console):
    details = json.dumps({"login": "service", "error": None, "paths": [
        {"path": "/data/dicom", "status": "readable", "detail": "listable", "fix": "chmod 0700 /data/dicom"}]})
    console.app.store.set_device_containment("ct-01", "exposed", utc_iso(console.clock.now()), details)
    console.app.store.update_device("ct-01", description="Siemens SOMATOM, CT room 3 <B2>")
    rid = request_grant(console.app.store, console.app.audit, console.app.rules,
                        get_principal(console.app.store, "alice"), "ct-01", 7200, "tube replacement",
                        console.clock.now(), mode="read-only").id
    bob = console.client("bob")
    page = bob.get("/inbox")[2]
    assert f'id="containment-{rid}">exposed<' in page and "EXPOSED" in page and "/data/dicom" in page
    assert "accept that risk" in page and f'id="allow-shell-{rid}"' in page and "files only" in page
    # the approver on a phone sees which machine and room (escaped like everything shown)
    assert f'id="description-{rid}">Siemens SOMATOM, CT room 3 &lt;B2&gt;<' in page
    token = bob.csrf("/inbox")
    bob.post(f"/requests/{rid}/approve", {"csrf": token, "duration": "30m", "allow_shell": "yes"})
    assert get_request(console.app.store, rid).status == "pending"  # exposed: a second approver is needed
    assert "bob (30m, shell allowed)" in bob.get(f"/requests/{rid}")[2]
    dave = console.client("dave")
    dave.post(f"/requests/{rid}/approve", {"csrf": dave.csrf("/inbox")})
    grant = console.app.store.list_grants()[-1]
    assert grant["shell"] == "files-only"  # dave did not allow a shell: the stricter choice wins
    assert grant["ends_at"] == utc_iso(console.clock.now() + timedelta(minutes=30))  # bob's shorter window
    assert "Files only" in dave.get("/inbox")[2]
