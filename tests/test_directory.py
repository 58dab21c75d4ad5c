"""[directory]: sign-in with the directory password + TOTP, roles from groups, SSH keys from the directory,
and accounts disabled or removed in the directory losing access — against a real OpenLDAP slapd."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import pyotp
import pytest

from broker.directory import Directory, directory_for, run_directory_sync
from broker.totp import enrol_totp
from helpers.broker import World
from helpers.keys import generate_keypair
from test_web_http import Client, Console

_serial = itertools.count(1)


def _name(prefix: str) -> str:
    return f"{prefix}{next(_serial)}x{int(time.time() * 1000) % 100000}"


def test_directory_password_plus_totp_signs_in_with_the_role_of_the_group(tmp_path, slapd):
    dora = _name("dora")
    slapd.add_person(dora, "dora's directory password", roles=("approver",), company="Biomed")
    console = Console(tmp_path, slapd.config(tmp_path / "ldap.secret"))
    try:
        # first sign-in: the directory accepts the password, medbroker mirrors the account, but wants TOTP
        status, _, page = Client(console.url).post("/signin", {"user": dora, "password": "dora's directory password",
                                                               "code": "123456"})
        assert status == 401 and "wrong user name, password or code" in page
        row = console.app.store.get_user(dora)
        assert row["source"] == "directory" and row["role"] == "approver" and row["company"] == "Biomed"
        secret = enrol_totp(console.app.store, console.app.keys, dora).secret.reveal()  # the admin enrols her
        console.clock.advance(31)
        fresh = Client(console.url)
        status, headers, _ = fresh.post("/signin", {"user": dora, "password": "dora's directory password",
                                                    "code": pyotp.TOTP(secret).at(console.clock.now()), "next": "/inbox"})
        assert status == 303 and headers["location"] == "/inbox" and fresh.cookie
        assert fresh.get("/inbox")[0] == 200
        assert '"method":"directory+totp"' in console.events("web.signin")[-1]["details"]
        # a wrong directory password is refused like any other, counted and audited
        console.clock.advance(31)
        status, _, _ = Client(console.url).post("/signin", {"user": dora, "password": "guess",
                                                            "code": pyotp.TOTP(secret).at(console.clock.now())})
        assert status == 401
        assert json.loads(console.events("web.signin.failed")[-1]["details"])["method"] == "directory"
    finally:
        console.close()


def test_people_in_no_group_or_unknown_get_nothing_and_local_users_are_not_taken_over(tmp_path, slapd):
    nobody = _name("nobody")
    slapd.add_person(nobody, "a password of nobody", roles=())
    slapd.add_person("bob", "the directory's bob")  # same name as the console's local approver bob
    console = Console(tmp_path, slapd.config(tmp_path / "ldap.secret"))
    try:
        for user, pw in ((nobody, "a password of nobody"), ("ghost", "whatever")):
            status, _, _ = Client(console.url).post("/signin", {"user": user, "password": pw, "code": "000000"})
            assert status == 401 and console.app.store.get_user(user) is None
        # bob is a local user: the directory's bob and his password do not sign in as him
        status, _, _ = Client(console.url).post("/signin", {"user": "bob", "password": "the directory's bob",
                                                            "code": "000000"})
        assert status == 401 and console.app.store.get_user("bob")["source"] == "local"
    finally:
        slapd.remove("bob")
        console.close()


def test_vendor_logs_in_with_the_key_in_the_directory_and_loses_access_when_removed(tmp_path, slapd, device):
    vic = _name("vic")
    key = generate_keypair(tmp_path / "keys", vic)
    slapd.add_person(vic, "vic's password", roles=("vendor",), keys=(key.public_key,), company="Acme Imaging")
    w = World(tmp_path, device()).setup(config=slapd.config(tmp_path / "ldap.secret", sync_interval='"1s"'))
    w.keys[vic] = key
    closers = []
    try:
        assert w.app.store.get_user(vic) is None
        r = w.ssh(vic, "status")  # the key only the directory holds
        assert r.returncode == 0, r
        row = w.app.store.get_user(vic)
        assert row["source"] == "directory" and row["role"] == "vendor" and row["company"] == "Acme Imaging"
        w.grant(user=vic)
        term = w.pty(f"{vic}@ct-01")
        closers.append(term.close)
        term.expect(re.compile(rb"[#$] "), timeout=15)
        # the directory takes vic out of the vendors group: the next sync disables vic, the session ends
        slapd.set_groups(vic, ())
        out = term.read_until_eof(timeout=15)
        text = bytes(term.output) + out
        assert term.wait(timeout=10) is not None
        assert w.app.store.get_user(vic)["disabled"] == 1
        disabled = [e for e in w.events("user.disabled") if e["user_name"] == vic]
        assert disabled and "in no medbroker group" in disabled[-1]["details"]
        assert b"disabled" in text or b"ended" in text, text[-400:]
        # and a new login is refused
        assert w.ssh(vic, "status").returncode == 255
    finally:
        for close in closers:
            close()
        w.close()
        slapd.remove(vic)


def test_a_directory_that_cannot_be_asked_changes_nothing(tmp_path, slapd):
    """An outage neither locks everybody out nor lets anybody new in: the sync skips, sign-in fails closed."""
    eve = _name("eve")
    slapd.add_person(eve, "eve's password", roles=("security",))
    console = Console(tmp_path, slapd.config(tmp_path / "ldap.secret"))
    try:
        directory = directory_for(console.app)
        assert isinstance(directory, Directory) and directory.lookup(eve).role == "security"
        Client(console.url).post("/signin", {"user": eve, "password": "eve's password", "code": "000000"})
        assert console.app.store.get_user(eve)["disabled"] == 0
        (tmp_path / "ldap.secret").write_text("not the service password\n")  # the directory refuses medbroker
        disabled = console.loop.call(run_directory_sync(console.app, console.app.store.run))
        assert disabled == [] and console.app.store.get_user(eve)["disabled"] == 0
        status, _, page = Client(console.url).post("/signin", {"user": eve, "password": "eve's password",
                                                               "code": "000000"})
        assert status in (400, 401, 403, 503) and console.app.store.get_user(eve)["disabled"] == 0
    finally:
        console.close()
        slapd.remove(eve)


def test_a_directory_that_is_down_is_an_error_that_names_it_and_leaves_no_socket_open(tmp_path, slapd):
    """ldap3 keeps the socket of a failed connect open; the broker closes it (each lookup and sync while the
    directory is down would otherwise leave one behind for the garbage collector, with a ResourceWarning)."""
    import gc
    import warnings

    from broker.app import init_home, open_app
    from broker.directory import DirectoryError
    from helpers.net import free_port

    home = tmp_path / "home"
    init_home(home).close()
    down = f"ldap://127.0.0.1:{free_port()}"  # nobody listens there
    (home / "broker.toml").write_text(slapd.config(tmp_path / "ldap.secret", url=f'"{down}"'))
    app = open_app(home)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with pytest.raises(DirectoryError, match=f"the directory at {down} cannot be asked"):
                    Directory(app).lookup("anybody", fresh=True)
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    finally:
        app.close()


def test_phone_sign_in_with_the_directory_in_a_browser(tmp_path, slapd):
    """An approver on a phone: directory password + code in headless Chromium, lands on the inbox with the
    approver's role; a person the directory disabled afterwards cannot sign in any more."""
    from web_support import PHONE, Browser

    pat = _name("pat")
    slapd.add_person(pat, "pat's directory password", roles=("approver",))
    console = Console(tmp_path, slapd.config(tmp_path / "ldap.secret"))
    browser = Browser()
    try:
        Client(console.url).post("/signin", {"user": pat, "password": "pat's directory password", "code": "0"})
        secret = enrol_totp(console.app.store, console.app.keys, pat).secret.reveal()
        console.clock.advance(31)
        ctx = browser.context(**PHONE)
        page = ctx.new_page()
        page.goto(console.url + "/signin")
        page.get_by_label("User name").fill(pat)
        page.get_by_label("Password").fill("pat's directory password")
        page.get_by_label("Authenticator code").fill(pyotp.TOTP(secret).at(console.clock.now()))
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/inbox")
        assert "Sign out" in page.content() or page.locator("form[action='/signout']").count() == 1
        ctx.close()
        # the directory removes pat from the approvers: the next sync disables pat; sign-in is refused
        slapd.set_groups(pat, ())
        assert console.loop.call(run_directory_sync(console.app, console.app.store.run)) == [pat]
        console.clock.advance(31)
        status, _, _ = Client(console.url).post("/signin", {"user": pat, "password": "pat's directory password",
                                                            "code": pyotp.TOTP(secret).at(console.clock.now())})
        assert status == 401
    finally:
        browser.close()
        console.close()
        slapd.remove(pat)
