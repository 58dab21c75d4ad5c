"""Answers to common vendor mistakes (issue 14, item 5), seen on the vendor's own terminal with real OpenSSH:
an unknown device, a device command sent to the broker itself, an ended grant, a reason with apostrophes,
rsync, agent and X11 forwarding, remote forwards. Plus the parsers behind them, fuzzed: the self-service
command splitter (broker/selfservice.py) and the ``~alice@ct-01`` rewrite (sessions/tilde.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.grants import ended_grant_refusal, request_hint, revoke_grant
from broker.identity import get_principal
from broker.selfservice import split_command
from helpers import poll as _wait
from helpers.clients import run_command, scp_download, scp_upload, ssh_options
from sessions.sftp_codec import FXP_EXTENDED, FXP_OPEN, FXP_RENAME, frame, parse_request, rewrite_request_paths, \
    string, u32
from sessions.tilde import LoginTilde


def _details(row: dict) -> dict:
    return json.loads(row["details"])


@pytest.mark.openssh
def test_common_mistakes_get_answers_on_the_vendors_terminal(world, tmp_path):
    w = world
    ssh = w.ssh

    # An unknown device, before alice ever had a grant: the same words as "no grant" (nothing about the inventory).
    r = ssh("alice@ct-1", "true")
    assert r.returncode == 1 and b"no approved access for alice to ct-1 now" in r.stderr, r.stderr
    assert b"ct-01" not in r.stderr

    # A reason with apostrophes, as OpenSSH joins the words the vendor typed: it arrives intact.
    r = ssh("alice", "request ct-01 --for 1h --reason customer's scanner won't boot --ticket WO-7")
    assert r.returncode == 0, r.stderr
    req = w.app.store.query("SELECT * FROM access_requests ORDER BY id DESC LIMIT 1")[0]
    assert req["reason"] == "customer's scanner won't boot" and req["ticket"] == "WO-7"

    grant = w.grant()
    # Now alice has a history: the unknown device is named unknown, with her own devices only.
    r = ssh("alice@ct-1", "true")
    assert r.returncode == 1
    assert b"no device 'ct-1' among those you have had access to: ct-01" in r.stderr, r.stderr
    assert b"ask the hospital for the exact device name" in r.stderr
    refused = [_details(e) for e in w.events("session.refused")]
    assert [d["reason"] for d in refused] == ["unknown device", "unknown device"]  # audit unchanged

    # A device command sent to the broker itself: where to send it instead.
    r = ssh("alice", "ls -l /var/log")
    assert r.returncode == 2
    assert b"'ls' is not a medbroker command" in r.stderr and b"alice@ct-01@broker ls" in r.stderr, r.stderr
    assert b"your devices: ct-01" in r.stderr and b"alice@broker help" in r.stderr
    assert b"PuTTY: plink -P " in r.stderr
    # A quote left open outside the reason: refused, saying how to write it.
    r = ssh("alice", 'request ct-01 --ticket "WO-1 --for 1h --reason x')
    assert r.returncode == 2 and b"cannot parse the command" in r.stderr and b"put --reason last" in r.stderr

    # rsync runs `rsync --server` as an exec command: refused, and rsync shows why.
    r = run_command(["rsync", "-e", shlex.join(["ssh", *ssh_options(key=w.keys["alice"].private_path,
                                                                    known_hosts=w.known_hosts,
                                                                    host_key_checking="yes"), "-p", str(w.port)]),
                     "alice@ct-01@127.0.0.1:service/logs/", str(tmp_path / "copy")], timeout=30)
    assert r.returncode != 0 and b"medbroker: rsync is not available through medbroker" in r.stderr, r.stderr
    assert b"use scp or sftp" in r.stderr
    assert _wait(lambda: any("rsync" in _details(e)["command"] for e in w.events("exec.denied")))

    # Agent (-A) and X11 (-X) forwarding, and a remote forward (-R): refused as before, now said and audited;
    # the command itself still runs.
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")}
    env["DISPLAY"] = "127.0.0.1:97"
    sock = tmp_path / "agent.sock"
    # A real (empty) ssh-agent: ssh asks to forward one only when it can use it (first -o wins over "none").
    argv = ["ssh", "-o", f"IdentityAgent={sock}",
            *ssh_options(key=w.keys["alice"].private_path, known_hosts=w.known_hosts, host_key_checking="yes"),
            "-p", str(w.port), "-A", "-X", "-R", "18080:127.0.0.1:80", "alice@ct-01@127.0.0.1", "echo still-here"]
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait(sock.exists)
        r = run_command(argv, env=env, timeout=30)
    finally:
        agent.kill()
        agent.wait(5)
    assert r.returncode == 0 and r.stdout == b"still-here\n", r.stderr
    assert b"medbroker: agent forwarding (ssh -A) is not available" in r.stderr, r.stderr.decode()
    assert b"medbroker: X11 forwarding (ssh -X/-Y) is not available" in r.stderr
    assert b"medbroker: remote port forwarding (ssh -R 18080:" in r.stderr
    kinds = {_details(e)["kind"]: _details(e) for e in _wait(lambda: len(w.events("channel.refused")) >= 3
                                                           and w.events("channel.refused"))}
    assert {"auth-agent", "x11", "tcpip-forward"} <= set(kinds), kinds
    assert all("not available" in d["reason"] for d in kinds.values())

    # A grant that ended says which one and when (UTC, and the display zone's time beside it), and how to ask again.
    later = grant.ends_at + timedelta(minutes=5)
    ended = ended_grant_refusal(w.app.store, "alice", "ct-01", later, request_hint("alice", "ct-01"),
                                ZoneInfo("Europe/Berlin"))
    assert ended.message == (f"no approved access for alice to ct-01 now: your access to ct-01 (grant {grant.id}) "
                             f"ended at {grant.ends_at:%H:%M:%S} UTC ("
                             f"{grant.ends_at.astimezone(ZoneInfo('Europe/Berlin')):%H:%M %Z})")
    assert ended.hint.startswith("request again: ssh -p 2222 alice@broker request ct-01 --for 2h")
    revoke_grant(w.app.store, w.app.audit, grant.id, get_principal(w.app.store, "bob"), w.app.clock.now(),
                 "work moved to tomorrow")
    r = ssh("alice@ct-01", "true")
    assert r.returncode == 1
    text = r.stderr.decode()
    assert f"your access to ct-01 (grant {grant.id}) was revoked by bob at " in text and " UTC" in text, text
    assert "work moved to tomorrow" in text and "request again: ssh -p" in text and "request ct-01 --for" in text


# ---------------------------------------------------------------- the self-service splitter
_REASON_TEXT = st.text(alphabet=st.sampled_from(list("ab z'\"-.,:;!?()é\\")), min_size=1, max_size=30)


def _normal(reason: str) -> str:
    r = reason.strip()
    if len(r) >= 2 and r[0] == r[-1] and r[0] in "'\"" and r[0] not in r[1:-1]:
        r = r[1:-1].strip()
    return r


@given(_REASON_TEXT, st.sampled_from(["", " --ticket WO-1", " --json"]))
def test_the_reason_arrives_as_typed(reason, tail):
    command = f"request ct-01 --for 1h --reason {reason}{tail}"
    if " --" in " " + reason or not _normal(reason):
        return  # an option word inside the reason ends it; an empty reason is argparse's to refuse
    argv = split_command(command)
    assert argv[:5] == ["request", "ct-01", "--for", "1h", "--reason"]
    assert argv[5] == _normal(reason)
    assert argv[6:] == shlex.split(tail)


@given(st.text(max_size=60))
def test_the_splitter_returns_words_or_raises_valueerror(command):
    try:
        argv = split_command(command)
    except ValueError:
        return
    assert all(isinstance(a, str) for a in argv)


# ---------------------------------------------------------------- ~alice@ct-01
TILDE = LoginTilde("alice@ct-01")


@pytest.mark.parametrize("sent, device_sees", [
    ('( umask 77 && mkdir -p "` echo ~alice@ct-01/.ansible/tmp `"&& echo x="` echo ~alice@ct-01/.ansible/tmp `" )',
     '( umask 77 && mkdir -p "` echo ~/.ansible/tmp `"&& echo x="` echo ~/.ansible/tmp `" )'),
    ("echo ~alice@ct-01", "echo ~"),
    ("rm -f -r '~alice@ct-01/.ansible/tmp/x/' > /dev/null 2>&1", "rm -f -r ~/'.ansible/tmp/x/' > /dev/null 2>&1"),
    ("cat ~alice@ct-01/../../etc/shadow", "cat ~/../../etc/shadow"),
    ('ls "~alice@ct-01"', "ls ~"),
    # Ansible's `echo '~alice@ct-01'` (its ~ expansion) inside /bin/sh -c '...'
    ("/bin/sh -c 'echo '\"'\"'~alice@ct-01'\"'\"' && sleep 0'", "/bin/sh -c 'echo ~ && sleep 0'"),
    (r"sh -c 'ls '\''~alice@ct-01/x y'\'''", r"sh -c 'ls ~/'\''x y'\'''"),
    ("ls ~alice@ct-01x ~alice@ct-0 a~alice@ct-01 ~bob@ct-01", None),  # other names, mid-word: untouched
])
def test_exec_words_naming_the_login_as_tilde_mean_the_home(sent, device_sees):
    assert TILDE.rewrite_command(sent) == device_sees


@pytest.mark.parametrize("sent, device_sees", [
    (b"'~alice@ct-01/.ansible/tmp/a/AnsiballZ_ping.py'", b".ansible/tmp/a/AnsiballZ_ping.py"),
    (b"~alice@ct-01/x", b"x"), (b"~alice@ct-01", b"."), (b"~alice@ct-01//etc/passwd", b"etc/passwd"),
    (b"/tmp/~alice@ct-01/x", None), (b"~alice@ct-01x/y", None), (b"'~alice@ct-01/x", None),
])
def test_sftp_paths_naming_the_login_as_tilde_are_home_relative(sent, device_sees):
    assert TILDE.rewrite_sftp_path(sent) == device_sees


@given(st.text(alphabet=st.sampled_from(list("~alice@ct-01/ '\"`;x")), max_size=40))
def test_the_command_rewrite_only_touches_the_login_prefix(command):
    out = TILDE.rewrite_command(command)
    if out is None:
        return
    assert out != command
    # every other character survives in order: removing the prefixes from both gives the same text
    strip = lambda s: s.replace("'", "").replace('"', "").replace("~alice@ct-01", "~").replace("~", "")  # noqa: E731
    assert strip(out) == strip(command)


@given(st.lists(st.sampled_from([b"~alice@ct-01/a", b"b", b"'~alice@ct-01/c d'", b"~alice@ct-01"]), min_size=2,
                max_size=2), st.integers(0, 2**32 - 1))
def test_request_paths_are_rewritten_in_the_packet(paths, rid):
    for packet in (frame(FXP_RENAME, u32(rid) + string(paths[0]) + string(paths[1])),
                   frame(FXP_OPEN, u32(rid) + string(paths[0]) + u32(0x1A) + u32(0)),
                   frame(FXP_EXTENDED, u32(rid) + string(b"posix-rename@openssh.com") + string(paths[0])
                         + string(paths[1]))):
        before = parse_request(packet)
        out = rewrite_request_paths(packet, TILDE.rewrite_sftp_path)
        expected = tuple(TILDE.rewrite_sftp_path(p) or p for p in before.paths)
        if expected == before.paths:
            assert out is None
            continue
        after = parse_request(out)
        assert after.paths == expected and after.id == rid and after.op == before.op
        assert (after.pflags, after.attrs) == (before.pflags, before.attrs)


@pytest.mark.openssh
def test_the_login_as_tilde_is_the_device_home_on_every_channel_and_judged_resolved(exposed_world, tmp_path):
    """scp (SFTP mode, and legacy -O), sftp paths and exec words: ``~alice@ct-01`` is the device login's home;
    ``~alice@ct-01/tmp/../data/dicom/…`` is judged as the resolved path (on a device whose login could read it);
    no literal directory appears."""
    w = exposed_world
    w.grant()
    tree = w.device.tree
    key, kh = w.keys["alice"].private_path, w.known_hosts
    local = tmp_path / "notes.txt"
    local.write_bytes(b"service notes\n")
    for remote, legacy in (("~alice@ct-01/tmp/a.txt", False), ("'~alice@ct-01/tmp/b.txt'", False),
                           ("~alice@ct-01/tmp/c.txt", True)):
        r = scp_upload("alice@ct-01", "127.0.0.1", w.port, key, local, remote, legacy=legacy, known_hosts=kh)
        assert r.returncode == 0, (remote, r.stderr)
    assert [(tree.tmp_dir / n).read_bytes() for n in ("a.txt", "b.txt", "c.txt")] == [b"service notes\n"] * 3
    dicom = tree.patient["dicom_file"]
    sneaky = "~alice@ct-01/tmp/../" + str(dicom.relative_to(tree.root))
    r = scp_download("alice@ct-01", "127.0.0.1", w.port, key, sneaky, tmp_path / "x.dcm", known_hosts=kh)
    assert r.returncode != 0 and b"protected patient-data directory" in r.stderr, r.stderr
    assert not (tmp_path / "x.dcm").exists()
    nested = "sh -c 'head -c 200 '\\''" + sneaky + "'\\'''"  # sh -c 'head -c 200 '\''~alice@ct-01/…'\'''
    for command in (f"cat {sneaky} ; ls -d ~alice@ct-01/tmp", f"cat '{sneaky}'", nested):
        r = w.ssh("alice@ct-01", command)
        assert r.returncode == 1 and b"medbroker: " in r.stderr and b"protected patient-data" in r.stderr, \
            (command, r.stderr)
        assert b"DICM" not in r.stdout
    r = w.ssh("alice@ct-01", "ls ~alice@ct-01/tmp/a.txt '~alice@ct-01/tmp/b.txt'")
    assert r.returncode == 0 and r.stdout.split() == [str(tree.tmp_dir / "a.txt").encode(),
                                                      str(tree.tmp_dir / "b.txt").encode()], r
    assert not list(tree.root.glob("~*"))
    denied = [_details(e) for e in _wait(lambda: w.events("sftp.denied"))]
    assert denied and denied[0]["path"] == str(dicom), denied  # judged as the resolved path
