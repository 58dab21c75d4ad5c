"""broker/keys.py: Secret never prints, private files are 0600 and replaced atomically, data keys, sealing, signing."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import ConfigError, StorageError
from broker.identity import parse_public_key
from broker.keys import (
    FileKeyProvider,
    Secret,
    generate_host_key,
    generate_signing_key,
    load_signing_key,
    openssh_fingerprint,
    sign_hex,
    verify_hex,
    write_private,
)

from helpers import missing_openssh_binaries
from helpers.keys import fingerprint_of

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- Secret


@dataclasses.dataclass(frozen=True)
class _Holder:
    name: str
    password: Secret


@pytest.mark.parametrize("value", ["hunter2", b"\x00raw-bytes", ""])
def test_secret_never_prints(value: str | bytes) -> None:
    s = Secret(value)
    assert repr(s) == "<secret>"
    assert str(s) == "<secret>"
    assert f"{s}" == "<secret>"
    assert f"{s!r}" == "<secret>"
    assert "%s %r" % (s, s) == "<secret> <secret>"
    assert "{}".format(s) == "<secret>"
    assert repr(_Holder("ct-01", s)) == "_Holder(name='ct-01', password=<secret>)"
    assert repr([s, {"k": s}]) == "[<secret>, {'k': <secret>}]"
    assert s.reveal() == value


def test_secret_in_logging_output(caplog: pytest.LogCaptureFixture) -> None:
    s = Secret("hunter2")
    log = logging.getLogger("medbroker.test")
    with caplog.at_level(logging.DEBUG, logger="medbroker.test"):
        log.info("password %s for %r", s, s)
        log.warning("holder %s", _Holder("ct-01", s))
        log.error("extra", extra={"cred": s})
        try:
            raise ValueError(s)
        except ValueError:
            log.exception("failed with %s", s)
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "hunter2" not in text
    assert text.count("<secret>") >= 4


def test_secret_in_exception_message_and_traceback() -> None:
    s = Secret("hunter2")
    proc = subprocess.run(
        [sys.executable, "-c", "from broker.keys import Secret\ndef f(pw):\n    raise RuntimeError(pw)\nf(Secret('hunter2'))"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert "RuntimeError: <secret>" in proc.stderr
    assert "hunter2" not in proc.stderr.replace("f(Secret('hunter2'))", "")  # the source line itself is shown
    assert str(RuntimeError(s)) == "<secret>"


def test_secret_equality_and_hashing() -> None:
    assert Secret("a") == Secret("a")
    assert Secret(b"a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    with pytest.raises(TypeError):
        hash(Secret("a"))
    with pytest.raises(AttributeError):
        Secret("a").__dict__  # noqa: B018 - slots: no place for the value to leak through vars()


# ---------------------------------------------------------------- write_private


def test_write_private_creates_0600(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "sub" / "key", b"secret")
    finally:
        os.umask(old)
    assert mode(tmp_path / "sub" / "key") == 0o600
    assert (tmp_path / "sub" / "key").read_bytes() == b"secret"


def test_write_private_over_a_world_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert mode(path) == 0o600
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"], "no temporary files left behind"


def test_write_private_failure_keeps_the_old_file(tmp_path: Path) -> None:
    """A write that fails half way (here: RLIMIT_FSIZE, as a full disk would) must not destroy the old keys."""
    path = tmp_path / "data.key"
    keys = FileKeyProvider(path)
    kid = keys.rotate()
    sealed = keys.seal(b"device password")
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from broker.keys import FileKeyProvider
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        try:
            FileKeyProvider(Path({str(path)!r})).rotate()
        except OSError as exc:
            print("failed", exc.errno)
            sys.exit(3)
        sys.exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert path.read_bytes() == before
    assert keys.current()[0] == kid
    assert keys.unseal(sealed) == b"device password"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.key"]


# ---------------------------------------------------------------- data keys and sealing


def test_rotate_keeps_old_keys_readable(tmp_path: Path) -> None:
    keys = FileKeyProvider(tmp_path / "keys" / "data.key")
    first = keys.rotate()
    token1 = keys.seal(b"one", context=b"device:ct-01")
    second = keys.rotate()
    assert first != second
    assert keys.current()[0] == second
    token2 = keys.seal(b"two", context=b"device:ct-01")
    assert token1.startswith(first + ":") and token2.startswith(second + ":")
    assert keys.unseal(token1, context=b"device:ct-01") == b"one"
    assert keys.unseal(token2, context=b"device:ct-01") == b"two"
    assert mode(keys.path) == 0o600
    assert len(keys.path.read_text().splitlines()) == 2


def test_seal_is_randomised_and_hides_the_plaintext(tmp_path: Path) -> None:
    keys = FileKeyProvider(tmp_path / "data.key")
    keys.rotate()
    a, b = keys.seal(b"hunter2"), keys.seal(b"hunter2")
    assert a != b
    assert "hunter2" not in a and b"hunter2" not in a.encode()


@pytest.fixture(scope="module")
def sealer(tmp_path_factory: pytest.TempPathFactory) -> FileKeyProvider:
    keys = FileKeyProvider(tmp_path_factory.mktemp("seal") / "data.key")
    keys.rotate()
    return keys


@given(st.binary(max_size=2048), st.binary(max_size=64))
def test_seal_unseal_round_trip(sealer: FileKeyProvider, plaintext: bytes, context: bytes) -> None:
    assert sealer.unseal(sealer.seal(plaintext, context=context), context=context) == plaintext


def _flip(token: str, index: int) -> str:
    kid, _, body = token.partition(":")

    raw = bytearray(base64.b64decode(body))
    raw[index % len(raw)] ^= 0x01
    return f"{kid}:{base64.b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize("tamper", ["nonce", "ciphertext", "tag", "truncate", "not-base64", "no-colon", "empty",
                                    "unknown-key", "context"])
def test_tampered_or_foreign_tokens_raise_storage_error(tmp_path: Path, tamper: str) -> None:
    keys = FileKeyProvider(tmp_path / "data.key")
    kid = keys.rotate()
    token = keys.seal(b"the device password", context=b"device:ct-01")
    context = b"device:ct-01"
    bad = {
        "nonce": lambda: _flip(token, 0),
        "ciphertext": lambda: _flip(token, 14),
        "tag": lambda: _flip(token, -1),
        "truncate": lambda: token[:-8],
        "not-base64": lambda: f"{kid}:!!!!",
        "no-colon": lambda: token.replace(":", ""),
        "empty": lambda: f"{kid}:",
        "unknown-key": lambda: "k9-ffffff" + token[len(kid):],
        "context": lambda: token,
    }[tamper]()
    if tamper == "context":
        context = b"device:ct-02"  # a credential moved to another device row
    with pytest.raises(StorageError) as info:
        keys.unseal(bad, context=context)
    assert "the device password" not in str(info.value)
    assert info.value.hint


@given(st.text())
def test_unseal_fuzz_only_raises_storage_error(sealer: FileKeyProvider, token: str) -> None:
    with pytest.raises(StorageError):
        sealer.unseal(token)


def test_another_key_file_cannot_unseal(tmp_path: Path) -> None:
    a, b = FileKeyProvider(tmp_path / "a.key"), FileKeyProvider(tmp_path / "b.key")
    a.rotate()
    b.rotate()
    token = a.seal(b"x")
    with pytest.raises(StorageError):
        b.unseal(token)
    # Same key id, different key material: the tag check catches it.
    kid, key = a.current()
    b.path.write_text(f"{kid} {'11' * 32}\n")
    with pytest.raises(StorageError):
        b.unseal(token)


@pytest.mark.parametrize(
    "content,needle",
    [("", "holds no key"), ("k1\n", "holds no key"), ("k1 zz\n", "key k1 is not hex"),
     ("k1 abcd\n", "key k1 is not 32 bytes")],
)
def test_broken_key_files(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "data.key"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        FileKeyProvider(path).current()
    assert needle in info.value.message


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        FileKeyProvider(tmp_path / "data.key").seal(b"x")
    assert "missing" in info.value.message and "medbroker init" in info.value.hint


# ---------------------------------------------------------------- signing and host keys


def test_signing_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    generate_signing_key(path)
    assert mode(path) == 0o600
    key = load_signing_key(path)
    sig = sign_hex(key, b"42:abcd")
    assert verify_hex(key.public_key(), b"42:abcd", sig)
    assert not verify_hex(key.public_key(), b"43:abcd", sig)
    assert not verify_hex(key.public_key(), b"42:abcd", "00" * 64)
    assert not verify_hex(key.public_key(), b"42:abcd", "not hex")
    assert not verify_hex(Ed25519PrivateKey.generate().public_key(), b"42:abcd", sig)


def test_load_signing_key_refusals(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="is missing"):
        load_signing_key(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="unreadable"):
        load_signing_key(garbage)
    ec = tmp_path / "ec.pem"
    ec.write_bytes(generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="not an ed25519 key"):
        load_signing_key(ec)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError) as info:
        load_signing_key(encrypted)
    assert str(encrypted) in info.value.message


def test_host_key_is_openssh_and_matches_ssh_keygen(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "host_ed25519"
    line = generate_host_key(path)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    pub = parse_public_key(Path(str(path) + ".pub").read_text())
    assert pub.line == line and pub.type == "ssh-ed25519"
    if missing_openssh_binaries():
        pytest.skip("ssh-keygen missing")
    assert fingerprint_of(path) == pub.fingerprint  # ssh-keygen reads our private key file
    assert fingerprint_of(Path(str(path) + ".pub")) == openssh_fingerprint(pub.blob)
