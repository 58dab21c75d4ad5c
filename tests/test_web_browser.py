"""The web console in headless Chromium against the real SSH broker, a real sshd device and stock OpenSSH.

One flow per test, the way people use it: an approver on a phone signs in with a link from ``ssh … web``
and approves; the vendor connects with OpenSSH; security watches live, ends the session, and replays it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips (locally) or fails (CI) and says why
    expect = None

from broker.devices import add_device
from broker.grants import get_grant
from broker.web import start_web, stop_web
from helpers.broker import World
from web_support import PHONE, Browser, link_from, screenshot, wait_for

pytestmark = pytest.mark.openssh
PROMPT = re.compile(rb"[#$] ")


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def world(tmp_path, device):
    w = World(tmp_path, device()).setup()
    handle = None
    try:
        handle = w.harness.call(start_web(w.app, "127.0.0.1:0", broker=w.harness.broker))
        w.web_url = handle.url
        yield w
    finally:
        if handle is not None:
            w.harness.call(stop_web(handle))
        w.close()


def _signin(browser, world, who: str, **ctx):
    """``ssh who@broker web`` with real OpenSSH, open the link in a new browser profile, press Sign in."""
    r = world.ssh(who, "web")
    assert r.returncode == 0, r.stderr
    context = browser.context(**ctx)
    page = context.new_page()
    page.goto(link_from(r.stdout))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    return context, page


def _request(world, device: str = "ct-01", length: str = "2h") -> int:
    r = world.ssh("alice", f'request {device} --for {length} --reason "replace X-ray tube" --ticket WO-1234')
    assert r.returncode == 0, r.stderr
    return int(re.search(rb"Request (\d+) created", r.stdout).group(1))


def test_phone_approval_then_vendor_session_watched_killed_and_replayed(browser, world):
    rid = _request(world)
    # -- the biomedical engineer, on a phone: link from SSH, one tap to sign in, one tap to approve
    ctx, page = _signin(browser, world, "bob", **PHONE)
    try:
        card = page.locator(f"#request-{rid}")
        for text in ("ct-01", "alice · Acme Imaging", "replace X-ray tube", "WO-1234", "2h"):
            assert text in card.inner_text()
        screenshot(page, "inbox-phone.png")
        card.get_by_role("button", name="Approve").click()
        page.wait_for_load_state()
        assert "Request" in page.locator(".flash.ok").inner_text() and "approved" in page.locator(".flash.ok").inner_text()
        assert page.locator(f"#request-{rid}").count() == 0
        assert "approved" in page.locator("table").inner_text()
    finally:
        ctx.close()
    approved = world.events("request.approved")
    assert approved[-1]["actor"] == "bob" and approved[-1]["request_id"] == rid

    # -- the vendor connects with stock OpenSSH and types something recognisable
    # bash without rc files: the device is this machine's sshd, and root's rc files are slow and stateful here
    term = world.pty("alice@ct-01", "bash --norc --noprofile -i", cols=90, rows=25)
    ctx, page = _signin(browser, world, "carol")
    try:
        term.expect(PROMPT, timeout=15)
        term.sendline("echo typed-marker-$((6*7))")
        term.expect(rb"typed-marker-42", timeout=10)
        # -- security sees who is on which device, opens the live view
        page.goto(world.web_url + "/sessions")
        row = page.locator("tbody tr").filter(has_text="alice")
        assert "ct-01" in row.inner_text() and "left" in wait_for(lambda: row.inner_text() if "left" in
                                                                  row.inner_text() else None)
        screenshot(page, "sessions.png")
        row.get_by_role("link", name="Watch").click()
        page.wait_for_selector("#watch[data-open='1']")
        expect(page.locator("#screen")).to_contain_text("typed-marker-42")
        term.sendline("echo live-$((1000+234))")
        term.expect(rb"live-1234", timeout=10)
        expect(page.locator("#screen")).to_contain_text("live-1234")
        screenshot(page, "watch.png")
        # -- and ends the session with a reason the vendor sees
        page.get_by_label("Reason (the vendor sees it)").fill("unplanned access to the console")
        page.get_by_role("button", name="End session now").click()
        page.wait_for_load_state()
        out = term.read_until_eof(timeout=10)
        assert b"security staff ended this session: unplanned access to the console" in bytes(term.output) + out
        assert term.wait(timeout=10) != 0
        sid = world.app.store.list_sessions()[-1]["id"]
        wait_for(lambda: world.app.store.get_session(sid)["status"] == "killed", timeout=10)
        killed = world.events("session.killed")
        assert killed and killed[-1]["session_id"] == sid and '"by":"carol"' in killed[-1]["details"]
        asked = world.events("session.kill.requested")
        assert asked[-1]["actor"] == "carol"
        expect(page.locator("#watch")).to_have_attribute("data-ended", "1")
        assert "Session ended" in page.locator("#watch-status").inner_text()
        # the page no longer claims the session is live or offers to end it
        expect(page.locator("#session-state")).to_have_text(re.compile("^(ended|killed)$"))  # killed: reload won
        assert page.locator("#kill-card").count() == 0 and page.locator("[data-ends]").count() == 0
        assert "left" not in page.locator("main p").first.inner_text()
        # -- replay in the browser: verified, signed, and the typed text is on the screen
        page.goto(f"{world.web_url}/recordings/{sid}")
        page.wait_for_selector("#player[data-ready='1']")
        assert "verified" in page.locator("#verification").inner_text()
        page.get_by_role("button", name="Jump to end").click()
        expect(page.locator("#screen")).to_contain_text("typed-marker-42")
        assert "live-1234" in page.locator("#screen").inner_text()
        screenshot(page, "player.png")
        page.get_by_role("button", name="Replay").click()  # plays from the start again
        expect(page.locator("#play")).to_have_text(re.compile("Pause|Replay"))
        replayed = world.events("recording.replayed")
        assert replayed and replayed[-1]["actor"] == "carol" and replayed[-1]["session_id"] == sid
        # -- a shareable, expiring auditor link: works without an account, and every opening is audited
        page.get_by_role("button", name="Create link").click()
        page.wait_for_load_state()
        share_url = page.locator("#share-url").input_value()
        assert "/shared/" in share_url
    finally:
        term.close()
        ctx.close()
    auditor = browser.context()
    try:
        page = auditor.new_page()
        page.goto(share_url)
        page.wait_for_selector("#player[data-ready='1']")
        page.get_by_role("button", name="Jump to end").click()
        expect(page.locator("#screen")).to_contain_text("typed-marker-42")
        assert page.locator("nav").count() == 0  # nothing else of the console
    finally:
        auditor.close()
    shared = world.events("recording.replayed")[-1]
    assert shared["actor"].startswith("share:") and shared["session_id"] == sid
    assert [e["actor"] for e in world.events("web.signin")] == ["bob", "carol"]


def test_critical_device_needs_a_second_distinct_approver(browser, world):
    add_device(world.app.store, world.app.audit, world.app.keys, name="linac-01", host=world.device.host,
               port=world.device.port, login=world.device.login, host_key=world.device.host_key_line,
               now=world.app.clock.now(), key_text=Path(world.device.client_key.private_path).read_text(),
               device_class="critical")
    ctx, page = _signin(browser, world, "bob", **PHONE)
    try:
        assert "Nothing to approve" in page.locator("#inbox").inner_text()
        expect(page.locator("#live-note")).to_contain_text("Live")
        rid = _request(world, "linac-01", "1h")  # arrives while the inbox is open: no reload needed
        card = page.locator(f"#request-{rid}")
        expect(card).to_be_visible()
        assert "critical · 2 approvers" in card.inner_text()
        card.get_by_role("button", name="Approve (1 of 2)").click()
        page.wait_for_load_state()
        assert "1 more approver needed" in page.locator(".flash.ok").inner_text()
        card = page.locator(f"#request-{rid}")
        assert "Approved by" in card.inner_text() and "bob" in card.locator(".approvals").inner_text()
        assert "needs 1 more approver" in card.inner_text()
        assert "You approved it" in card.inner_text() and card.get_by_role("button", name=re.compile("Approve")).count() == 0
        screenshot(page, "inbox-critical-phone.png")
    finally:
        ctx.close()
    r = world.ssh("alice@linac-01", "true")
    assert r.returncode == 1 and b"no approved access" in r.stderr
    ctx, page = _signin(browser, world, "dave")
    try:
        card = page.locator(f"#request-{rid}")
        assert "bob" in card.locator(".approvals").inner_text()
        window = card.get_by_label(f"Window for request {rid}")
        window.select_option("30m")
        window.focus()
        page.keyboard.press("Tab")  # keyboard only: the approve button is the next stop
        expect(card.get_by_role("button", name="Approve")).to_be_focused()
        page.keyboard.press("Enter")
        page.wait_for_load_state()
        assert "approved" in page.locator(".flash.ok").inner_text()
    finally:
        ctx.close()
    grant = world.app.store.list_grants()[-1]
    assert grant["approved_by"] == "bob,dave" and grant["device"] == "linac-01"
    assert grant["ends_at"] > grant["starts_at"] and get_grant(world.app.store, grant["id"]).ends_at - \
        get_grant(world.app.store, grant["id"]).starts_at == timedelta(minutes=30)
    r = world.ssh("alice@linac-01", "echo inside")
    assert r.returncode == 0 and r.stdout == b"inside\n"


def test_roles_are_checked_on_the_server(browser, world):
    rid = _request(world)
    ctx, page = _signin(browser, world, "alice")  # a vendor
    try:
        assert page.url.endswith("/mine")
        assert "replace X-ray tube" not in page.locator("nav").inner_text()
        resp = page.goto(world.web_url + "/inbox")
        assert resp.status == 403
        assert "alice (vendor) may not open the approval inbox" in page.locator("h1").inner_text()
        assert page.locator(f"#request-{rid}").count() == 0
    finally:
        ctx.close()
    world.grant()
    r = world.ssh("alice@ct-01", "echo recorded")
    assert r.returncode == 0
    sid = world.app.store.list_sessions()[-1]["id"]
    ctx, page = _signin(browser, world, "bob")  # an approver
    try:
        assert [a.inner_text() for a in page.locator("nav a").all()] == ["Inbox", "Live sessions", "Account"]
        resp = page.goto(f"{world.web_url}/recordings/{sid}")
        assert resp.status == 403 and "may not replay recordings" in page.locator("h1").inner_text()
        resp = page.goto(f"{world.web_url}/recordings/{sid}/cast")
        assert resp.status == 403 and "recorded" not in page.content()
        resp = page.goto(f"{world.web_url}/sessions/{sid}/watch")
        assert resp.status == 403
    finally:
        ctx.close()
    denied = world.events("web.denied")
    assert {(e["actor"], e["details"].count("role") > 0) for e in denied} == {("alice", True), ("bob", True)}
    assert not [e for e in world.events("recording.replayed") if e["actor"] == "bob"]
