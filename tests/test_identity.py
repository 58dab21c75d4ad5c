"""broker/identity.py: login parsing (fuzzed), names, OpenSSH public keys from ssh-keygen, users, keys, lockout."""

from __future__ import annotations

import base64
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.clock import utc_iso
from broker.errors import ConflictError, NotFoundError, PermissionDeniedError, UsageError
from broker.identity import (
    KEY_TYPES,
    LoginTarget,
    Principal,
    add_user,
    add_user_key,
    authenticate_key,
    get_principal,
    lockout_remaining,
    parse_login,
    parse_public_key,
    require_role,
    validate_name,
)
from broker.keys import openssh_fingerprint
from broker.store import Store, open_store

from helpers import FUZZ_EXAMPLES, FUZZ_EXAMPLES_OTHER, missing_openssh_binaries
from helpers.keys import KeyPair, generate_keypair

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(store_target: Path | str) -> Store:
    s = open_store(store_target)
    yield s
    s.close()


@pytest.fixture(scope="module")
def real_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """One key of each type made by the real ssh-keygen (rsa at 2048 bits to keep it quick)."""
    if missing_openssh_binaries():
        pytest.skip("ssh-keygen is missing")
    d = tmp_path_factory.mktemp("idkeys")
    return {
        "ed25519": generate_keypair(d, "ed", key_type="ed25519"),
        "ecdsa": generate_keypair(d, "ec", key_type="ecdsa"),
        "ecdsa384": generate_keypair(d, "ec384", key_type="ecdsa", bits=384),
        "rsa": generate_keypair(d, "rsa", key_type="rsa", bits=2048),
        "ed25519b": generate_keypair(d, "ed2", key_type="ed25519"),
    }


# ---------------------------------------------------------------- parse_login


@pytest.mark.parametrize(
    "raw,user,device",
    [("alice@ct-01", "alice", "ct-01"), ("alice", "alice", None), ("a.b_c-d@mri.3t", "a.b_c-d", "mri.3t"),
     ("0@0", "0", "0"), ("x" * 63 + "@" + "y" * 63, "x" * 63, "y" * 63)],
)
def test_parse_login_ok(raw: str, user: str, device: str | None) -> None:
    assert parse_login(raw) == LoginTarget(user, device)


@pytest.mark.parametrize(
    "raw,needle",
    [
        ("", "empty login name"),
        ("@", "user name ''"),
        ("@ct-01", "user name ''"),
        ("alice@", "device name ''"),
        ("a@b@c@d", "more than one '@'"),
        ("alice@@ct-01", "more than one '@'"),
        ("a" * 2000, "2000 characters long"),
        ("alice@" + "c" * 2000, "2006 characters long"),
        ("alice\udcff@ct-01", "non-ASCII"),
        ("\ud800", "non-ASCII"),
        ("alice@ct-01\n", "control"),
        ("alice\x1b[31m@ct-01", "control"),
        ("alice\x00@ct-01", "control"),
        ("alice @ct-01", "space"),
        (" alice", "space"),
        ("alice\t@ct-01", "control"),
        ("alice\x7f", "control"),
        ("Alice@ct-01", "user name 'Alice'"),
        ("alice@CT-01", "device name 'CT-01'"),
        ("ålice@ct-01", "non-ASCII"),
        ("alice@ct-01\u200b", "non-ASCII"),
        ("-alice@ct-01", "user name '-alice'"),
        ("alice@.ct", "device name '.ct'"),
        ("x" * 64 + "@ct", "user name"),
        ("alice@" + "y" * 64, "device name"),
        ("al/ice@ct", "user name"),
        ("alice@ct:22", "device name"),
    ],
)
def test_parse_login_refuses_with_a_clear_message(raw: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_login(raw)
    err = info.value
    assert needle in err.message, err.message
    assert err.hint, "every refusal says what to do next"
    assert len(err.message) < 200, "the offending value is shown truncated"
    assert "\x1b" not in str(err) and "\x00" not in str(err) and "\n" not in err.message


@pytest.mark.parametrize("raw", [None, b"alice@ct-01", 5])
def test_parse_login_non_text(raw: object) -> None:
    with pytest.raises(UsageError):
        parse_login(raw)  # type: ignore[arg-type]


_login_alphabet = st.sampled_from(list("abcxyz019._-@A \t\x00\x7f\udcffé١"))


@settings(max_examples=FUZZ_EXAMPLES)
@given(st.one_of(st.text(), st.text(alphabet=_login_alphabet, max_size=300)))
@example("a" * 257)
@example("a" * 256)
@example("\udcff")
def test_parse_login_fuzz(raw: str) -> None:
    """Never anything but UsageError; a success round-trips to the same string."""
    try:
        target = parse_login(raw)
    except UsageError as exc:
        assert exc.message and exc.hint
        return
    rebuilt = target.user if target.device is None else f"{target.user}@{target.device}"
    assert rebuilt == raw
    assert validate_name(target.user) == target.user
    assert target.device is None or validate_name(target.device) == target.device


_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
_valid_names = st.builds(str.__add__, st.sampled_from(_LOWER), st.text(alphabet=_LOWER + "._-", max_size=62))


@given(_valid_names, st.one_of(st.none(), _valid_names))
def test_parse_login_accepts_every_valid_pair(user: str, device: str | None) -> None:
    raw = user if device is None else f"{user}@{device}"
    assert parse_login(raw) == LoginTarget(user, device)


# ---------------------------------------------------------------- validate_name


@pytest.mark.parametrize("name", ["alice\n", "ct-01\n", "a\r", "", "A", "a b", "é", "a" * 64, "_a", ".a", "a/b"])
def test_validate_name_refuses(name: str) -> None:
    with pytest.raises(UsageError) as info:
        validate_name(name, what="device name")
    assert info.value.message.startswith("device name ")
    assert "lowercase" in info.value.hint


def test_validate_name_shows_long_values_truncated() -> None:
    with pytest.raises(UsageError) as info:
        validate_name("x" * 5000)
    assert len(info.value.message) < 120


# ---------------------------------------------------------------- public keys


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "ecdsa384", "rsa"])
def test_parse_public_key_matches_ssh_keygen(real_keys: dict[str, KeyPair], kind: str) -> None:
    pair = real_keys[kind]
    key = parse_public_key(pair.public_line)
    assert key.fingerprint == pair.fingerprint  # exactly what ssh-keygen -lf prints
    assert key.line == pair.public_key
    assert key.comment == pair.public_line.split(None, 2)[2]
    assert key.type == pair.public_line.split()[0]
    assert key.type in KEY_TYPES


def test_parse_public_key_from_file_text_with_newline_and_no_comment(real_keys: dict[str, KeyPair]) -> None:
    pair = real_keys["ed25519"]
    assert parse_public_key(pair.public_path.read_text()).fingerprint == pair.fingerprint
    bare = parse_public_key(pair.public_key)
    assert bare.comment == "" and bare.fingerprint == pair.fingerprint


def test_fingerprint_is_over_the_blob(real_keys: dict[str, KeyPair]) -> None:
    key = parse_public_key(real_keys["rsa"].public_line)
    assert openssh_fingerprint(key.blob) == real_keys["rsa"].fingerprint


def _blob(ktype: str, rest: bytes = b"\x00\x00\x00\x20" + b"k" * 32) -> str:
    return base64.b64encode(struct.pack(">I", len(ktype)) + ktype.encode() + rest).decode()


def test_parse_public_key_refusals(real_keys: dict[str, KeyPair]) -> None:
    ed = real_keys["ed25519"].public_line.split()
    rsa = real_keys["rsa"].public_line.split()
    cases = {
        "": "not an OpenSSH public key",
        "ssh-ed25519": "not an OpenSSH public key",
        f"ssh-dss {ed[1]}": "key type 'ssh-dss' is not accepted",
        f"ssh-ed25519 {ed[1][:-5]}": "not valid base64",  # truncated: padding broken
        f"ssh-ed25519 {ed[1][:20]}!!{ed[1][22:]}": "not valid base64",
        f"ssh-ed25519 {rsa[1]}": "says 'ssh-ed25519' but contains 'ssh-rsa'",
        f"ssh-rsa {ed[1]}": "says 'ssh-rsa' but contains 'ssh-ed25519'",
        "ssh-ed25519 AAAA": "not valid base64",
        "ssh-ed25519 " + base64.b64encode(b"\xff\xff\xff\xff").decode(): "contains ''",
        "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x03\xff\xfe\xfd").decode(): "not valid base64",
        "ssh-ed25519 ١٢٣٤": "not valid base64",
        f"evil-cert-v01@openssh.com {_blob('evil-cert-v01@openssh.com')}": "is not accepted",
    }
    for text, needle in cases.items():
        with pytest.raises(UsageError) as info:
            parse_public_key(text)
        assert needle in info.value.message, (text, info.value.message)


def test_parse_public_key_accepts_certificates_of_known_types() -> None:
    for ktype in ("ssh-ed25519-cert-v01@openssh.com", "ssh-rsa-cert-v01@openssh.com",
                  "ecdsa-sha2-nistp256-cert-v01@openssh.com", "sk-ssh-ed25519-cert-v01@openssh.com"):
        assert parse_public_key(f"{ktype} {_blob(ktype)}").type == ktype


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.one_of(
    st.text(),
    st.builds(lambda t, b, c: f"{t} {b} {c}", st.sampled_from(KEY_TYPES + ("ssh-dss", "x-cert-v01@openssh.com")),
              st.one_of(st.binary().map(lambda b: base64.b64encode(b).decode()), st.text()), st.text()),
    st.builds(lambda t, b: f"{t} {_blob(t, b)}", st.sampled_from(KEY_TYPES), st.binary()),
))
def test_parse_public_key_fuzz(text: str) -> None:
    try:
        key = parse_public_key(text)
    except UsageError as exc:
        assert exc.message
        return
    assert key.fingerprint.startswith("SHA256:") and len(key.fingerprint) == 7 + 43
    assert parse_public_key(key.line).fingerprint == key.fingerprint


# ---------------------------------------------------------------- users and keys


def test_add_user_and_principal(store: Store) -> None:
    p = add_user(store, "alice", "vendor", "Siemens Healthineers", NOW)
    assert p == Principal("alice", "vendor", "Siemens Healthineers", False, False)
    assert get_principal(store, "alice") == p
    assert store.get_user("alice")["created_at"] == utc_iso(NOW)


@pytest.mark.parametrize("name,role,exc", [("Alice", "vendor", UsageError), ("bob", "root", UsageError),
                                          ("bob\n", "vendor", UsageError), ("", "vendor", UsageError)])
def test_add_user_refusals_change_nothing(store: Store, name: str, role: str, exc: type) -> None:
    with pytest.raises(exc):
        add_user(store, name, role, None, NOW)
    assert store.list_users() == []


def test_add_user_twice_is_a_conflict(store: Store) -> None:
    add_user(store, "alice", "vendor", None, NOW)
    with pytest.raises(ConflictError) as info:
        add_user(store, "alice", "admin", None, NOW)
    assert "user show alice" in info.value.hint
    assert get_principal(store, "alice").role == "vendor"


def test_unknown_user(store: Store) -> None:
    with pytest.raises(NotFoundError):
        get_principal(store, "nobody")
    with pytest.raises(NotFoundError):
        add_user_key(store, "nobody", "ssh-ed25519 AAAA", NOW)


def test_keys_authenticate_only_their_user(store: Store, real_keys: dict[str, KeyPair]) -> None:
    add_user(store, "alice", "vendor", None, NOW)
    add_user(store, "bob", "approver", None, NOW)
    key = add_user_key(store, "alice", real_keys["ed25519"].public_line, NOW)
    add_user_key(store, "alice", real_keys["ed25519"].public_line, NOW)  # twice: stored once
    assert len(store.user_keys("alice")) == 1
    assert store.user_keys("alice")[0]["public_key"] == real_keys["ed25519"].public_key
    assert authenticate_key(store, "alice", key.fingerprint).name == "alice"
    for user, fp in [("bob", key.fingerprint), ("alice", real_keys["ed25519b"].fingerprint),
                     ("carol", key.fingerprint)]:
        with pytest.raises(PermissionDeniedError) as info:
            authenticate_key(store, user, fp)
        assert info.value.message == "authentication failed"  # the same words whatever the cause


def test_disabled_user_cannot_authenticate(store: Store, real_keys: dict[str, KeyPair]) -> None:
    add_user(store, "alice", "vendor", None, NOW)
    key = add_user_key(store, "alice", real_keys["ecdsa"].public_line, NOW)
    store.set_user_disabled("alice", True)
    with pytest.raises(PermissionDeniedError) as info:
        authenticate_key(store, "alice", key.fingerprint)
    assert info.value.message == "authentication failed"
    assert get_principal(store, "alice").disabled
    store.set_user_disabled("alice", False)
    assert authenticate_key(store, "alice", key.fingerprint).disabled is False


def test_bad_key_text_adds_nothing(store: Store) -> None:
    add_user(store, "alice", "vendor", None, NOW)
    with pytest.raises(UsageError):
        add_user_key(store, "alice", "ssh-ed25519 not-base64", NOW)
    assert store.user_keys("alice") == []


def test_require_role() -> None:
    vendor = Principal("alice", "vendor", None, False, False)
    require_role(vendor, "vendor", action="request access")
    with pytest.raises(PermissionDeniedError) as info:
        require_role(vendor, "approver", "admin", action="approve requests")
    assert info.value.message == "alice (vendor) may not approve requests"
    assert "approver or admin" in info.value.hint


def test_totp_enrolment_shows_in_principal(store: Store) -> None:
    add_user(store, "alice", "vendor", None, NOW)
    store.set_user_totp("alice", "JBSWY3DPEHPK3PXP")
    assert get_principal(store, "alice").totp_enrolled
    assert store.claim_totp_step("alice", 10)
    assert not store.claim_totp_step("alice", 10)  # replay of the same step
    assert not store.claim_totp_step("alice", 9)
    assert store.claim_totp_step("alice", 11)


# ---------------------------------------------------------------- lockout


def _fail(store: Store, at: datetime, user: str = "alice", source: str = "192.0.2.7") -> None:
    store.add_auth_failure(user, source, utc_iso(at))


def _locked(store: Store, now: datetime, user: str = "alice", source: str = "192.0.2.7") -> int:
    return lockout_remaining(store, user, source, now, max_failures=3, window_s=600, lockout_s=900)


def test_lockout_after_max_failures_within_the_window(store: Store) -> None:
    for i in range(2):
        _fail(store, NOW + timedelta(seconds=i))
    assert _locked(store, NOW + timedelta(seconds=2)) == 0
    _fail(store, NOW + timedelta(seconds=2))
    assert _locked(store, NOW + timedelta(seconds=2)) == 900
    assert _locked(store, NOW + timedelta(seconds=2 + 899.5)) == 1  # rounds up: never says 0 while locked
    assert _locked(store, NOW + timedelta(seconds=2 + 900)) == 0
    assert _locked(store, NOW + timedelta(seconds=10), source="198.51.100.1") == 0  # other address
    assert _locked(store, NOW + timedelta(seconds=10), user="bob") == 0  # other user
    store.clear_auth_failures("alice", "192.0.2.7")
    assert _locked(store, NOW + timedelta(seconds=10)) == 0


def test_failures_spread_wider_than_the_window_do_not_lock(store: Store) -> None:
    for i in range(3):
        _fail(store, NOW + timedelta(seconds=400 * i))
    assert _locked(store, NOW + timedelta(seconds=801)) == 0
