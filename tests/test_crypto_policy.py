"""The vendor port's crypto policy as an outside scanner (ssh-audit) and stock OpenSSH see it: post-quantum
hybrid kex first, AES-GCM only, ed25519 host key, no SHA-1, no compression, a neutral version string."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from frontdoor_support import add_person, close_world, world_with
from helpers import is_ci
from helpers.clients import run_ssh
from helpers.keys import generate_keypair

pytestmark = pytest.mark.openssh

# The one [warn] we accept: classic curve25519 kex is kept for clients older than OpenSSH 9.9.
ALLOWED_WARN = re.compile(
    r"^\(kex\) curve25519-sha256(@libssh\.org)? +-- \[warn\] does not provide protection against post-quantum attacks$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = world_with(tmp_path_factory.mktemp("crypto"))
    try:
        yield w
    finally:
        close_world(w)


@pytest.fixture(scope="module")
def audit_text(world) -> str:
    if importlib.util.find_spec("ssh_audit") is None:
        if is_ci():
            pytest.fail("ssh-audit is missing; it is in the test extras: pip install -e .[test]")
        pytest.skip("ssh-audit is not installed (pip install -e .[test]); CI fails here instead")
    r = subprocess.run([sys.executable, "-m", "ssh_audit", "-n", "-p", str(world.port), "127.0.0.1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 2), f"ssh-audit failed ({r.returncode}): {r.stdout}\n{r.stderr}"  # 2 = warnings
    return r.stdout


def _section(text: str, tag: str) -> list[str]:
    """Algorithm names of one ssh-audit section, in the order the server offers them."""
    return re.findall(rf"^\({tag}\) (\S+)", text, re.M)


def test_ssh_audit_reports_no_fail_and_only_the_post_quantum_note(audit_text):
    fails = [ln for ln in audit_text.splitlines() if "[fail]" in ln]
    warns = [ln.strip() for ln in audit_text.splitlines() if "[warn]" in ln]
    assert not fails, "\n".join(fails)
    unexpected = [w for w in warns if not ALLOWED_WARN.match(w)]
    assert not unexpected, "\n".join(unexpected)


def test_ssh_audit_sees_the_intended_algorithms(audit_text):
    kex = [k for k in _section(audit_text, "kex") if k not in ("ext-info-s", "kex-strict-s-v00@openssh.com")]
    assert kex[0] == "mlkem768x25519-sha256", kex
    assert set(kex) == {"mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org"}
    assert "kex-strict-s-v00@openssh.com" in _section(audit_text, "kex")  # Terrapin countermeasure
    assert _section(audit_text, "key") == ["ssh-ed25519"]
    assert set(_section(audit_text, "enc")) == {"aes128-gcm@openssh.com", "aes256-gcm@openssh.com"}
    assert not [a for a in _section(audit_text, "mac") if "sha1" in a or "md5" in a or "umac" in a]
    assert "sha1" not in " ".join(_section(audit_text, "kex") + _section(audit_text, "key")).lower()
    assert "(gen) compression: disabled" in audit_text
    banner = re.search(r"^\(gen\) banner: (.*)$", audit_text, re.M).group(1)
    assert banner == "SSH-2.0-medbroker"  # no library name or version for a scanner to match CVEs against


@pytest.mark.parametrize("option,needle", [
    ("Ciphers=chacha20-poly1305@openssh.com", b"no matching cipher found"),
    ("Ciphers=aes128-ctr", b"no matching cipher found"),
    ("KexAlgorithms=diffie-hellman-group14-sha1", b"no matching key exchange method found"),
    ("KexAlgorithms=ecdh-sha2-nistp256", b"no matching key exchange method found"),
    ("HostKeyAlgorithms=rsa-sha2-256", b"no matching host key type found"),
], ids=["chacha20", "ctr", "dh-sha1", "nist-kex", "rsa-hostkey"])
def test_openssh_cannot_negotiate_anything_weaker(world, option, needle):
    r = world.ssh("bob", "grants", extra_opts=["-o", option])
    assert r.returncode == 255 and needle in r.stderr, r.stderr


def test_openssh_negotiates_post_quantum_kex_and_aes_gcm(world):
    r = world.ssh("bob", "grants", extra_opts=["-v"])
    assert r.returncode == 0, r.stderr
    # OpenSSH >= 9.9 picks the hybrid; older clients (9.2 here) the classic curve25519 kept for them
    assert re.search(rb"kex: algorithm: (mlkem768x25519-sha256|curve25519-sha256)\r?\n", r.stderr)
    assert re.search(rb"kex: server->client cipher: aes(128|256)-gcm@openssh.com MAC: <implicit> compression: none",
                     r.stderr)


def test_sha1_rsa_user_signatures_are_refused_sha2_accepted(world, tmp_path):
    name, _ = add_person(world, totp=False, grant=False)
    rsa = generate_keypair(tmp_path, "rsa", key_type="rsa")
    from broker.identity import add_user_key

    add_user_key(world.app.store, name, rsa.public_key, world.app.clock.now())
    sha1 = run_ssh(name, "127.0.0.1", world.port, rsa.private_path, "grants", known_hosts=world.known_hosts,
                   extra_opts=["-o", "PubkeyAcceptedAlgorithms=ssh-rsa"])
    assert sha1.returncode == 255 and b"Permission denied" in sha1.stderr
    sha2 = run_ssh(name, "127.0.0.1", world.port, rsa.private_path, "grants", known_hosts=world.known_hosts)
    assert sha2.returncode == 0, sha2.stderr
