"""PuTTY users are first-class (issue 14 item 3): puttygen keys import (RFC 4716, one-line), a PPK is refused
without being echoed, and plink, pscp (-sftp and -scp) and psftp work through the broker against a real sshd
device, with the recording, the patient-data guard and the PuTTY spelling of every hint."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import UsageError
from broker.identity import PRIVATE_KEY_REFUSAL, parse_public_key, parse_public_keys
from broker.totp import enrol_totp
from cli_support import Home
from helpers import fuzz_examples, openssh_required
from helpers.pty import PtySession
from sessions.recording import read_frames

# 500 examples in CI (300 locally): the mutations below reach every branch of the parser within a few dozen.
FUZZ_EXAMPLES = fuzz_examples(500)
PUTTY_TOOLS = ("puttygen", "plink", "pscp", "psftp")
KINDS = {"ed25519": ["-t", "ed25519"], "rsa": ["-t", "rsa", "-b", "2048"], "ecdsa": ["-t", "ecdsa", "-b", "256"]}


def _need_putty() -> None:
    missing = [t for t in PUTTY_TOOLS if shutil.which(t) is None]
    if missing:
        why = f"PuTTY tools missing: {', '.join(missing)} (scripts/install.sh installs Debian's putty-tools)"
        if openssh_required():
            pytest.fail(f"{why} and MEDBROKER_REQUIRE_OPENSSH=1", pytrace=False)
        pytest.skip(why)


def _run(argv: list[str], *, input: bytes | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, start_new_session=True)


class PuttyKey:
    """A key pair made by puttygen: the .ppk, its RFC 4716 public file, the one-line form, puttygen's fingerprint."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.kind = kind
        self.ppk = directory / f"{kind}.ppk"
        self.rfc4716 = directory / f"{kind}.pub"
        for argv in (["puttygen", *KINDS[kind], "-C", f"{kind} key of alice", "-o", str(self.ppk),
                      "--new-passphrase", "/dev/null"],
                     ["puttygen", str(self.ppk), "-O", "public", "-o", str(self.rfc4716)]):
            r = _run(argv)
            assert r.returncode == 0, r.stderr
        self.rfc4716_text = self.rfc4716.read_text()
        self.one_line = _run(["puttygen", str(self.ppk), "-O", "public-openssh"]).stdout.decode().strip()
        # puttygen -l: "ssh-ed25519 255 SHA256:... comment", the same SHA256 form as ssh-keygen -l
        self.fingerprint = _run(["puttygen", "-l", str(self.ppk)]).stdout.decode().split()[2]


@pytest.fixture(scope="module")
def pkeys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PuttyKey]:
    _need_putty()
    directory = tmp_path_factory.mktemp("puttygen")
    return {kind: PuttyKey(directory, kind) for kind in KINDS}


# ---------------------------------------------------------------- the parser


def test_puttygen_keys_parse_in_both_forms_to_puttygens_fingerprint(pkeys):
    for k in pkeys.values():
        text = k.rfc4716.read_text()
        assert text.startswith("---- BEGIN SSH2 PUBLIC KEY ----") and "Comment:" in text
        (rfc,) = parse_public_keys(text)
        (line,) = parse_public_keys(k.one_line)
        assert rfc.fingerprint == line.fingerprint == k.fingerprint, k.kind
        assert rfc.line == line.line == parse_public_key(k.one_line).line  # what the store keeps: no comment
        assert rfc.comment == f"{k.kind} key of alice" and rfc.type == k.one_line.split()[0]
    # several keys, CRLF line ends (a file saved on Windows), blank and # lines between them, in order
    both = "\r\n".join(["# alice's keys", pkeys["rsa"].rfc4716.read_text(), "", pkeys["ecdsa"].one_line])
    assert [key.fingerprint for key in parse_public_keys(both)] == [pkeys["rsa"].fingerprint,
                                                                  pkeys["ecdsa"].fingerprint]


def test_rfc4716_headers_with_continuation_lines_and_quotes(pkeys):
    body = pkeys["ed25519"].rfc4716.read_text().splitlines()[2:-1]
    text = "\n".join(["---- BEGIN SSH2 PUBLIC KEY ----", "x-private-tag: some value", 'Comment: "a long \\',
                      'comment: with a colon"', "Subject: alice", *body, "---- END SSH2 PUBLIC KEY ----"])
    (key,) = parse_public_keys(text)
    assert key.fingerprint == pkeys["ed25519"].fingerprint and key.comment == "a long comment: with a colon"
    # Only a backslash that is the line's last character continues it (the fuzz test found "Comment: \\ ").
    text = "\n".join(["---- BEGIN SSH2 PUBLIC KEY ----", "Comment: ends in \\ ", *body, "---- END SSH2 PUBLIC KEY ----"])
    (key,) = parse_public_keys(text)
    assert key.fingerprint == pkeys["ed25519"].fingerprint and key.comment == "ends in \\"


@pytest.mark.parametrize("text, needle", [
    ("", "no public key found"),
    ("# only a comment\n\n", "no public key found"),
    ("---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n", "no '---- END SSH2 PUBLIC KEY ----' line"),
    ("---- BEGIN SSH2 PUBLIC KEY ----\nComment: x\n---- END SSH2 PUBLIC KEY ----", "has no key data"),
    ("---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\nComment: late\n---- END SSH2 PUBLIC KEY ----", "malformed"),
    ("---- END SSH2 PUBLIC KEY ----", "unexpected '----' line"),
    ("ssh-ed25519 AAAA\nssh-dss AAAA", "line 1: public key data is not valid base64"),
    ("\n\nhello world", "line 3: key type 'hello' is not accepted"),
    ("c2VjcmV0IHN0dWZm more", "key type (not a key type name) is not accepted"),
])
def test_bad_key_text_says_what_is_wrong(text, needle):
    with pytest.raises(UsageError) as info:
        parse_public_keys(text)
    assert needle in info.value.message and info.value.hint


def test_private_keys_are_refused_and_never_echoed(pkeys, ssh_keys):
    openssh = ssh_keys("vendor").private_path.read_text()
    for text in (pkeys["ed25519"].ppk.read_text(), pkeys["rsa"].ppk.read_text(), openssh,
                 pkeys["ecdsa"].one_line + "\n" + pkeys["ecdsa"].ppk.read_text()):
        with pytest.raises(UsageError) as info:
            parse_public_keys(text)
        assert info.value.message == PRIVATE_KEY_REFUSAL
        said = str(info.value)
        assert not any(len(line) > 12 and line in said for line in text.splitlines()[1:])


def _rfc4716(blob: bytes, headers: list[str], width: int) -> str:
    b64 = base64.b64encode(blob).decode()
    body = [b64[i:i + width] for i in range(0, len(b64), width)]
    return "\n".join(["---- BEGIN SSH2 PUBLIC KEY ----", *headers, *body, "---- END SSH2 PUBLIC KEY ----"])


_HEADER = st.builds(lambda tag, value: f"{tag}: {value}",
                    st.sampled_from(["Comment", "Subject", "x-tag", "x-command"]),
                    st.text(st.characters(codec="ascii", exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85"),
                            max_size=40).filter(lambda v: not v.endswith("\\")))  # a final backslash continues


@settings(max_examples=FUZZ_EXAMPLES)
@given(data=st.data())
def test_parser_fuzz(pkeys, data):
    """Garbage, and puttygen's own output mutated, give a key or a UsageError with a message; never anything
    else. A block built from a real key with any headers and line width parses to that key."""
    blob = base64.b64decode(pkeys["ed25519"].one_line.split()[1])
    good = _rfc4716(blob, data.draw(st.lists(_HEADER, max_size=3)), data.draw(st.integers(1, 80)))
    assert [k.fingerprint for k in parse_public_keys(good)] == [pkeys["ed25519"].fingerprint]
    source = data.draw(st.sampled_from([good, pkeys["rsa"].rfc4716_text, pkeys["ecdsa"].one_line]))
    lines = source.splitlines()
    choice = data.draw(st.integers(0, 3))
    if choice == 0:
        text = data.draw(st.text(max_size=200))
    elif choice == 1:  # drop, duplicate or replace a line
        i = data.draw(st.integers(0, len(lines) - 1))
        new = data.draw(st.sampled_from(["", lines[i], data.draw(st.text(max_size=40))]))
        text = "\n".join(lines[:i] + ([new] if new != "" else []) + lines[i + 1:])
    elif choice == 2:  # flip a character
        i = data.draw(st.integers(0, len(source) - 1))
        text = source[:i] + data.draw(st.characters()) + source[i + 1:]
    else:
        text = source[:data.draw(st.integers(0, len(source)))]
    try:
        keys = parse_public_keys(text)
    except UsageError as exc:
        assert exc.message and exc.hint
        return
    assert keys and all(k.fingerprint.startswith("SHA256:") for k in keys)


# ---------------------------------------------------------------- the CLI


def test_cli_imports_puttygen_keys_as_file_or_text_and_refuses_a_ppk(pkeys, tmp_path):
    home = Home(tmp_path / "home")
    home.ok("init")
    doc = home.json("user", "add", "alice", "--role", "vendor", "--key", str(pkeys["ed25519"].rfc4716),
                    "--key", pkeys["rsa"].one_line)
    assert [k["fingerprint"] for k in doc["keys"]] == [pkeys["ed25519"].fingerprint, pkeys["rsa"].fingerprint]
    # the RFC 4716 text itself, starting with '----' (not taken for an option), as a positional argument
    doc = home.json("user", "key", "add", "alice", pkeys["ecdsa"].rfc4716.read_text())
    assert pkeys["ecdsa"].fingerprint in [k["fingerprint"] for k in doc["keys"]]
    before = (home.count("user_keys"), home.count("users"), home.count("audit_events"))
    ppk = pkeys["ed25519"].ppk
    for args in (["user", "key", "add", "alice", str(ppk)], ["user", "key", "add", "alice", ppk.read_text()],
                 ["user", "add", "bob", "--role", "vendor", "--key", ppk.read_text()],
                 ["user", "add", "bob", "--role", "vendor", "--key", str(pkeys["rsa"].rfc4716), "--key", str(ppk)]):
        r = home.fails(2, *args)
        assert PRIVATE_KEY_REFUSAL in r.stderr
        secret = [ln for ln in ppk.read_text().splitlines() if not ln.startswith(("PuTTY-User", "Encryption"))]
        assert not any(ln in r.stdout + r.stderr for ln in secret if len(ln) > 12)
    r = home.fails(2, "user", "key", "add", "alice", str(tmp_path / "nope.pub"))
    assert "no such public key file" in r.stderr
    assert (home.count("user_keys"), home.count("users"), home.count("audit_events")) == before


# ---------------------------------------------------------------- plink, pscp, psftp through the broker


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wait(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


@pytest.mark.openssh
def test_plink_pscp_psftp_through_the_broker(exposed_world, pkeys, tmp_path):
    w = exposed_world
    tree = w.device.tree
    home = Home(w.app.config.home)
    home.ok("user", "key", "add", "alice", str(pkeys["ed25519"].rfc4716))  # as PuTTYgen saved it
    home.ok("user", "key", "add", "alice", pkeys["rsa"].one_line)  # as PuTTYgen shows it
    home.ok("user", "key", "add", "alice", str(pkeys["ecdsa"].rfc4716))
    host_fp = parse_public_key((w.app.config.home / "keys" / "host_ed25519.pub").read_text()).fingerprint
    port = str(w.port)

    def putty(tool: str, *args: str, key: str = "ed25519", input: bytes | None = None):
        return _run([tool, "-P", port, "-i", str(pkeys[key].ppk), "-batch", "-hostkey", host_fp, *args], input=input)

    # Before any grant: the refusal names the plink spelling, once, on its own line.
    r = putty("plink", "alice@ct-01@127.0.0.1", "true")
    err = r.stderr.decode()
    assert r.returncode == 1 and "no approved access for alice to ct-01" in err
    assert f'\nPuTTY: plink -P {port} alice@broker request ct-01 --for 2h --reason "..."' in err.replace("\r", "")
    assert err.count("plink") == 1
    # with a terminal (-t), the second line starts at the left margin (CR LF, not a bare LF)
    r = putty("plink", "-t", "alice@ct-01@127.0.0.1", "true")
    assert r.returncode == 1 and b'"..."\r\nPuTTY: plink -P' in r.stderr, r.stderr
    # Every key type logs in; the broker's own answer names PuTTY's tools.
    for kind in ("rsa", "ecdsa"):
        r = putty("plink", "alice@127.0.0.1", "help", key=kind)
        assert r.returncode == 0 and f"PuTTY: plink -P {port} in place of ssh -p {port}" in r.stdout.decode()
    # a request typed as plink users type it: the reason's words arrive, the answer names plink for the session
    r = putty("plink", "alice@127.0.0.1", "request", "ct-01", "--for", "1h", "--reason", "tube check")
    out = r.stdout.decode()
    assert r.returncode == 0 and f"\nPuTTY: plink -P {port} alice@ct-01@broker\n" in out, out
    assert w.app.store.list_requests(status="pending")[-1]["reason"] == "tube check"
    w.grant()
    r = putty("plink", "alice@127.0.0.1")
    assert r.returncode == 0 and "Host Name alice@ct-01@broker and Port" in r.stdout.decode()

    # plink runs a command on the device; the recording holds it and its output.
    known = {s["id"] for s in w.app.store.list_sessions()}
    r = putty("plink", "alice@ct-01@127.0.0.1", f"echo plink-marker-$((6*7)); cat {tree.system_log}")
    assert r.returncode == 0 and r.stdout == b"plink-marker-42\n" + tree.system_log.read_bytes(), r.stderr
    row = _wait(lambda: [s for s in w.app.store.list_sessions() if s["id"] not in known and s["final_hash"]])[0]
    frames = list(read_frames(w.app.recordings.local_path(row["recording"]), key_lookup=w.app.keys.get))
    assert any(f.kind == "exec" and f.event()["command"].startswith("echo plink-marker") for f in frames)
    assert b"plink-marker-42\n" in b"".join(f.payload for f in frames if f.kind == "output")

    # pscp in SFTP mode and in legacy scp mode: download and upload, the bytes match on both sides.
    firmware = os.urandom(70_000)
    local = tmp_path / "fw.bin"
    local.write_bytes(firmware)
    for mode in ("-sftp", "-scp"):
        got = tmp_path / f"system{mode}.log"
        r = putty("pscp", mode, f"alice@ct-01@127.0.0.1:{tree.system_log}", str(got))
        assert r.returncode == 0 and got.read_bytes() == tree.system_log.read_bytes(), (mode, r.stderr)
        r = putty("pscp", mode, str(local), f"alice@ct-01@127.0.0.1:{tree.tmp_dir}/fw{mode}.bin")
        assert r.returncode == 0, (mode, r.stderr)
        assert _sha((tree.tmp_dir / f"fw{mode}.bin").read_bytes()) == _sha(firmware)

    # psftp: get works.
    r = putty("psftp", "-b", "/dev/stdin", "alice@ct-01@127.0.0.1",
              input=f"cd {tree.system_log.parent}\nget system.log {tmp_path}/psftp.log\n".encode())
    assert r.returncode == 0 and (tmp_path / "psftp.log").read_bytes() == tree.system_log.read_bytes(), r.stderr

    # The patient directory: refused in every tool, the reason on the vendor's terminal, nothing on their disk.
    dicom = tree.dicom_files[0]
    for mode in ("-sftp", "-scp"):
        r = putty("pscp", mode, f"alice@ct-01@127.0.0.1:{dicom}", str(tmp_path / f"study{mode}"))
        assert r.returncode == 1 and b"protected patient-data directory" in r.stderr, (mode, r.stderr)
        assert not (tmp_path / f"study{mode}").exists()
    r = putty("psftp", "-b", "/dev/stdin", "alice@ct-01@127.0.0.1",
              input=f"get {dicom} {tmp_path}/study-psftp\n".encode())
    assert r.returncode != 0 and b"protected patient-data directory" in r.stderr
    assert not (tmp_path / "study-psftp").exists()
    r = putty("plink", "alice@ct-01@127.0.0.1", f"cat {dicom}")
    assert r.returncode == 1 and b"DICM" not in r.stdout and b"protected patient-data directory" in r.stderr
    assert _wait(lambda: all(w.events(e) for e in ("sftp.denied", "scp.denied", "exec.denied")))

    # An interactive shell, as the PuTTY window opens one (plink -t: a terminal), then with a TOTP code: PuTTY
    # answers the broker's keyboard-interactive prompt after the key (docs/mfa.md).
    argv = ["-P", port, "-i", str(pkeys["ed25519"].ppk), "-hostkey", host_fp, "alice@ct-01@127.0.0.1"]
    for totp in (False, True):
        secret = enrol_totp(w.app.store, w.app.keys, "alice").secret.reveal() if totp else None
        with PtySession(["plink", "-t", *argv]) as term:
            if totp:
                term.expect(re.compile(rb"Verification code"), timeout=15)
                term.sendline(pyotp.TOTP(secret).now())
            term.expect(re.compile(rb"Press Return to begin session"), timeout=15)  # PuTTY's anti-spoofing line
            term.send(b"\r")
            term.sendline("echo SHELL-$((20+22))")
            term.expect(re.compile(rb"SHELL-42"), timeout=15)
            term.sendline("exit")
            assert term.wait(timeout=15) == 0

    def shell_inputs() -> list[bytes]:
        """What was typed in each finished shell session since ``known`` (the recordings)."""
        typed = []
        for row in w.app.store.list_sessions():
            if row["id"] not in known and row["final_hash"]:
                frames = list(read_frames(w.app.recordings.local_path(row["recording"]), key_lookup=w.app.keys.get))
                if any(f.kind == "shell" for f in frames):
                    typed.append(b"".join(f.payload for f in frames if f.kind == "input"))
        return typed

    shells = _wait(lambda: len(shell_inputs()) == 2 and shell_inputs())
    assert all(b"echo SHELL-$((20+22))" in t for t in shells)
