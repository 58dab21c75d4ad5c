"""ProxyJump (issue 14 items 1 and 4): ``ssh -J alice@broker:2222 alice@ct-01`` is an ordinary recorded medbroker
session, and ``medbroker ssh-config`` prints a config that works as printed. Real OpenSSH ssh/scp/sftp, paramiko
and sshd devices."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app as cli_app
from broker.grants import revoke_grant
from broker.identity import get_principal
from broker.jump import inner_login_refusal, jump_target
from broker.jumpkeys import device_host_key, device_key_path, known_hosts_line, public_line
from helpers import poll
from helpers.clients import paramiko_connect, run_command
from sessions.recording import read_frames

pytestmark = pytest.mark.openssh


def _wait(predicate, timeout: float = 15.0, step: float = 0.05):
    return poll(predicate, timeout, step)


def _jump_setup(world, tmp: Path, *, who: str = "alice", key: str | None = None) -> Path:
    """An ssh config for ``ssh -F cfg -J hop …``: the hop is the broker as ``who``; every hop (the jump's own
    ssh gets the same -F) uses ``key``'s identity and a known_hosts with the broker key and ct-01's jump key."""
    kh = tmp / f"kh-{who}"
    broker_key = (world.app.config.home / "keys" / "host_ed25519.pub").read_text().split()[:2]
    kh.write_text(f"[127.0.0.1]:{world.port} {' '.join(broker_key)}\n" + known_hosts_line(world.app, "ct-01") + "\n")
    cfg = tmp / f"ssh_config-{who}"
    cfg.write_text(f"""Host hop
  HostName 127.0.0.1
  Port {world.port}
  User {who}
Host *
  IdentityFile {world.keys[key or who].private_path}
  IdentitiesOnly yes
  IdentityAgent none
  BatchMode yes
  UserKnownHostsFile {kh}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  ConnectTimeout 10
  ControlPath none
""")
    return cfg


def _ssh(*argv: str, timeout: float = 30.0, input: bytes | None = None):
    return run_command(["ssh", *argv], timeout=timeout, input=input)


def _texts(row: dict, world) -> bytes:
    frames = read_frames(world.app.recordings.local_path(row["recording"]), key_lookup=world.app.keys.get)
    return b"".join(f.payload for f in frames if f.kind in ("output", "stderr") and isinstance(f.payload, bytes))


def test_ssh_J_runs_a_recorded_session_and_refuses_what_is_not_a_device(world, tmp_path):
    """-J, -W through ProxyCommand, scp and sftp through the jump; the session is recorded as any other;
    unknown targets, other ports and addresses are refused with the reason; a wrong inner key is refused."""
    world.grant()
    cfg = _jump_setup(world, tmp_path)
    (world.device.tree.root / "tmp").mkdir(exist_ok=True)
    (world.device.tree.root / "tmp" / "jump.log").write_bytes(b"service log through the jump\n")

    r = _ssh("-F", str(cfg), "-J", "hop", "service@ct-01", "echo jumped-$((40+2)); id -un")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == b"jumped-42" and r.stdout.splitlines()[1] == world.device.login.encode()

    # -W in a ProxyCommand, the device's own SSH port number, and the device name as inner login name
    proxy = f"ssh -F {cfg} -W %h:%p hop"
    r = _ssh("-F", str(cfg), "-o", f"ProxyCommand={proxy}", "-p", str(world.device.port), "alice@ct-01",
             "echo via-W")
    assert (r.returncode, r.stdout) == (0, b"via-W\n"), r.stderr

    # scp and sftp through the jump (OpenSSH passes -J on)
    down = tmp_path / "down.log"
    r = run_command(["scp", "-F", str(cfg), "-J", "hop", f"alice@ct-01:{world.device.tree.root}/tmp/jump.log",
                     str(down)], timeout=30)
    assert r.returncode == 0, r.stderr
    assert down.read_bytes() == b"service log through the jump\n"
    r = run_command(["sftp", "-F", str(cfg), "-J", "hop", "-b", "-", "alice@ct-01"], timeout=30,
                    input=f"put {down} {world.device.tree.root}/tmp/up.log\n".encode())
    assert r.returncode == 0, r.stderr
    assert (world.device.tree.root / "tmp" / "up.log").read_bytes() == b"service log through the jump\n"

    # recorded like any session: rows marked proxyjump, output in the recording and in the replay
    rows = _wait(lambda: [s for s in world.app.store.list_sessions() if s["final_hash"]]
                 if len([s for s in world.app.store.list_sessions() if s["final_hash"]]) >= 4 else None)
    assert rows and len(rows) == 4 and {s["via"] for s in rows} == {"proxyjump"}
    first = min(rows, key=lambda s: s["started_at"] + s["id"])
    assert b"jumped-42" in _texts(first, world)
    assert {s["source"] for s in rows} == {"127.0.0.1"} and {s["user_name"] for s in rows} == {"alice"}
    replay = CliRunner().invoke(cli_app, ["--home", str(world.app.config.home), "replay", first["id"],
                                          "--instant", "--by", "carol"])
    assert replay.exit_code == 0 and "jumped-42" in replay.stdout, replay.output
    starts = [e for e in world.events("session.start")]
    assert len(starts) == 4 and {json.loads(e["details"]).get("via") for e in starts} == {"proxyjump"}
    assert len(world.events("jump.open")) == 4 and len(world.events("jump.login")) == 4
    assert _wait(lambda: len(world.events("jump.close")) == 4)

    # refused with the reason: unknown name, another port, the device's real address, an IP
    for target in ("ct-99:22", "ct-01:2222", f"{world.device.host}:{world.device.port}", "CT-01:22"):
        r = _ssh("-F", str(cfg), "-W", target, "hop", timeout=20)
        assert r.returncode != 0
        assert b"administratively prohibited" in r.stderr and b"medbroker:" in r.stderr, r.stderr
    refusals = [e for e in world.events("channel.refused")]
    assert len(refusals) == 4
    # the same neutral wording whether a name exists or not (alice was granted ct-01, so ct-01:2222 says more)
    r99 = _ssh("-F", str(cfg), "-W", "ct-98:22", "hop", timeout=20)
    assert b"is not a destination of this broker" in r99.stderr
    cfg_dave = _jump_setup(world, tmp_path, who="dave")  # dave was never granted ct-01: neutral for it too
    r = _ssh("-F", str(cfg_dave), "-W", "ct-01:2222", "hop", timeout=20)
    assert b"is not a destination of this broker" in r.stderr, r.stderr

    # the inner hop with another key than the first hop: refused, said, audited as a failed login
    kh = tmp_path / "kh-alice"
    r = _ssh("-F", "/dev/null", "-o", f"ProxyCommand=ssh -F {cfg} -W %h:%p hop", "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
             "-o", "IdentityAgent=none", "-i", str(world.keys["bob"].private_path), "alice@ct-01", "true")
    assert r.returncode == 255 and b"same key you used for the broker" in r.stderr, r.stderr
    assert _wait(lambda: [e for e in world.events("auth.failure") if e["user_name"] == "alice"
                          and json.loads(e["details"]).get("reason") == "no accepted key"])


def test_the_jump_keeps_every_guard_and_ends_with_revoke_and_window(exposed_world, tmp_path):
    """No grant: the usual answer. With one: the file guard refuses patient data through the jump, paramiko's
    sock= channel and a ControlMaster first hop work, revoking ends the session and the jump, and so does
    the end of the window."""
    world = exposed_world
    cfg = _jump_setup(world, tmp_path)
    r = _ssh("-F", str(cfg), "-J", "hop", "alice@ct-01", "true")
    assert r.returncode != 0 and b"no approved access for alice to ct-01 now" in r.stderr, r.stderr
    assert b"request ct-01" in r.stderr

    grant = world.grant()
    dicom = world.device.tree.dicom_files[0]
    got = tmp_path / "got.dcm"
    r = run_command(["sftp", "-F", str(cfg), "-J", "hop", "-b", "-", "alice@ct-01"], timeout=30,
                    input=f"get {dicom} {got}\n".encode())
    assert r.returncode != 0 and not got.exists(), r.stdout + r.stderr
    denied = _wait(lambda: world.events("sftp.denied"))
    assert denied and denied[0]["session_id"]
    row = world.app.store.get_session(denied[0]["session_id"])
    assert row["via"] == "proxyjump"

    # paramiko: the direct-tcpip channel of one client is the socket of another
    import paramiko

    outer = paramiko_connect("127.0.0.1", world.port, "alice", key=world.keys["alice"].private_path,
                             host_key_line=(world.app.config.home / "keys" / "host_ed25519.pub").read_text())
    try:
        chan = outer.get_transport().open_channel("direct-tcpip", ("ct-01", 22), ("127.0.0.1", 0))
        inner = paramiko.SSHClient()
        algorithm, blob = public_line(world.app, "ct-01").split()
        inner.get_host_keys().add("ct-01", algorithm, paramiko.PKey.from_type_string(algorithm, __import__(
            "base64").b64decode(blob)))
        inner.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            inner.connect("ct-01", sock=chan, username="alice", key_filename=str(world.keys["alice"].private_path),
                          look_for_keys=False, allow_agent=False, timeout=10, banner_timeout=10, auth_timeout=10)
            _, out, _ = inner.exec_command("echo paramiko-through-the-jump", timeout=10)
            assert out.read() == b"paramiko-through-the-jump\n" and out.channel.recv_exit_status() == 0
        finally:
            inner.close()
        with pytest.raises(paramiko.ChannelException):  # and a refused target is a refused channel
            outer.get_transport().open_channel("direct-tcpip", ("10.0.0.1", 22), ("127.0.0.1", 0), timeout=10)
    finally:
        outer.close()

    # the first hop is a ControlMaster; the jump is multiplexed over it (the mux client has no key at all)
    from helpers.clients import ControlMaster

    with ControlMaster("alice", "127.0.0.1", world.port, world.keys["alice"].private_path,
                       known_hosts=world.known_hosts) as cm:
        proxy = (f"ssh -F /dev/null -o BatchMode=yes -o PubkeyAuthentication=no -o ControlMaster=no "
                 f"-o ControlPath={cm.control_path} -p {world.port} -W %h:%p alice@127.0.0.1")
        r = _ssh("-F", str(cfg), "-o", f"ProxyCommand={proxy}", "alice@ct-01", "echo over-the-master")
        assert (r.returncode, r.stdout) == (0, b"over-the-master\n"), r.stderr

    # revoking the grant ends the session through the jump, and the jump with it
    proc = subprocess.Popen(["ssh", "-F", str(cfg), "-J", "hop", "alice@ct-01", "echo started; sleep 30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"started\n"
        t0 = time.monotonic()
        revoke_grant(world.app.store, world.app.audit, grant.id, get_principal(world.app.store, "bob"),
                     world.app.clock.now(), reason="jump test")
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and time.monotonic() - t0 < 5 and b"revoked by bob" in err, err
    ended = _wait(lambda: [s for s in world.app.store.list_sessions() if s["status"] == "revoked"])
    assert ended and ended[0]["via"] == "proxyjump" and ended[0]["final_hash"]

    # the window's end closes it too
    world.grant(seconds=3)
    proc = subprocess.Popen(["ssh", "-F", str(cfg), "-J", "hop", "alice@ct-01", "echo started; sleep 30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"started\n"
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and b"approved window for ct-01 ended" in err, err
    assert _wait(lambda: [s for s in world.app.store.list_sessions() if s["status"] == "expired"])
    assert _wait(lambda: len(world.events("jump.close")) == len(world.events("jump.open")))


@pytest.fixture
def public_world(tmp_path, device):
    """Like ``world``, with [listen] public_host = 127.0.0.1, so a printed config connects as printed."""
    from helpers.broker import World

    w = World(tmp_path, device()).setup(config='[listen]\npublic_host = "127.0.0.1"\n')
    try:
        yield w
    finally:
        w.close()


def test_ssh_config_as_printed_connects_directly_and_through_the_jump(public_world, tmp_path):
    """``ssh alice@broker ssh-config``: its Host blocks and known_hosts lines, and nothing else the vendor did not
    write themselves (their key), connect both ways with StrictHostKeyChecking=yes; the CLI prints the same,
    --putty a registry file whose plink jump line works, --json the same facts."""
    world = public_world
    world.grant()
    r = world.ssh("alice", "ssh-config")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "Host ct-01\n" in text and "  User alice@ct-01\n" in text and "Host ct-01-jump\n" in text
    assert f"  ProxyJump alice@127.0.0.1:{world.port}\n" in text
    known = [line[2:] for line in text.splitlines() if line.startswith("# ") and " ssh-ed25519 " in line]
    kh = tmp_path / "printed_known_hosts"
    kh.write_text("\n".join(known) + "\n")
    cfg = tmp_path / "printed_config"
    cfg.write_text(text + f"""
Host *
  IdentityFile {world.keys['alice'].private_path}
  IdentitiesOnly yes
  IdentityAgent none
  BatchMode yes
  UserKnownHostsFile {kh}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  ControlPath none
""")
    for host in ("ct-01", "ct-01-jump"):
        r = _ssh("-F", str(cfg), host, f"echo {host}-ok")
        assert (r.returncode, r.stdout) == (0, f"{host}-ok\n".encode()), r.stderr
    rows = _wait(lambda: [s for s in world.app.store.list_sessions() if s["final_hash"]]
                 if len([s for s in world.app.store.list_sessions() if s["final_hash"]]) == 2 else None)
    assert rows and sorted(str(s["via"]) for s in rows) == ["None", "proxyjump"]

    runner = CliRunner()
    home = ["--home", str(world.app.config.home)]
    cli = runner.invoke(cli_app, [*home, "ssh-config", "--user", "alice", "--host", "127.0.0.1",
                                  "--port", str(world.port)])
    assert cli.exit_code == 0 and cli.stdout == text, cli.output
    doc = json.loads(runner.invoke(cli_app, [*home, "ssh-config", "--json"]).stdout)
    assert doc["user"] == "USER" and [d["name"] for d in doc["devices"]] == ["ct-01"]
    assert doc["devices"][0]["jump_host_key"] == public_line(world.app, "ct-01")
    bad = runner.invoke(cli_app, [*home, "ssh-config", "--user", "nobody"])
    assert bad.exit_code == 1 and "nobody" in bad.stderr
    reg = runner.invoke(cli_app, [*home, "ssh-config", "--user", "alice", "--putty", "--host", "127.0.0.1",
                                  "--port", str(world.port)]).stdout
    assert reg.startswith("Windows Registry Editor Version 5.00\n")
    assert "[HKEY_CURRENT_USER\\Software\\SimonTatham\\PuTTY\\Sessions\\medbroker-ct-01]" in reg
    assert f'"PortNumber"=dword:{world.port:08x}' in reg and '"UserName"="alice@ct-01"' in reg

    # the printed plink jump line, with the vendor's .ppk, through PuTTY's own tools (when installed)
    import shutil

    if not (shutil.which("plink") and shutil.which("puttygen")):
        return
    ppk = tmp_path / "alice.ppk"
    assert run_command(["puttygen", str(world.keys["alice"].private_path), "-O", "private", "-o", str(ppk)],
                       timeout=30).returncode == 0
    line = next(x[4:] for x in reg.splitlines() if x.startswith(";   plink") and "-proxycmd" in x)
    line = line.replace("KEY.ppk", str(ppk)).replace("plink -ssh -hostkey", "plink -ssh -batch -hostkey", 1)
    import shlex

    r = run_command(shlex.split(line) + ["echo", "plink-jump-ok"], timeout=30)
    assert (r.returncode, r.stdout) == (0, b"plink-jump-ok\n"), r.stderr


def test_jump_targets_and_inner_names_are_decided_without_guessing(tmp_path, fuzz_examples):
    """Only a device name as registered with port 22 or its own SSH port; any inner name but one naming
    another device. Fuzzed: never an exception, never a device for a name that is not one."""
    from hypothesis import given, settings, strategies as st

    from broker.devices import Device

    dev = Device(name="ct-01", host="10.20.0.15", port=2201, login="service", auth_kind="key", credential="x",
                 host_key="ssh-ed25519 AAAA", host_key_fingerprint="SHA256:x", protected_paths=(),
                 device_class="standard", legacy_algorithms={}, description=None, created_at="2026-01-01T00:00:00Z")
    assert jump_target([dev], "ct-01", 22) is dev and jump_target([dev], "ct-01", 2201) is dev
    for host, port in (("ct-01", 2222), ("CT-01", 22), ("10.20.0.15", 2201), ("ct-01.", 22), ("", 22)):
        assert jump_target([dev], host, port) is None
    assert inner_login_refusal("service", "ct-01") is None and inner_login_refusal("alice@ct-01", "ct-01") is None
    assert "names the device ct-02" in inner_login_refusal("alice@ct-02", "ct-01")

    @settings(max_examples=min(fuzz_examples, 300), deadline=None)
    @given(st.text(max_size=80), st.integers(min_value=0, max_value=65535), st.text(max_size=300))
    def check(host: str, port: int, login: str) -> None:
        found = jump_target([dev], host, port)
        assert found is None or (host == "ct-01" and port in (22, 2201))
        why = inner_login_refusal(login, "ct-01")
        assert why is None or (why.isascii() and "\n" not in why and len(why) < 400)

    check()


def test_jump_host_keys_are_per_device_private_and_stable(tmp_path):
    from broker.app import init_home
    from broker.errors import UsageError

    app = init_home(tmp_path / "home")
    try:
        first = device_host_key(app, "ct-01")
        assert device_host_key(app, "ct-01").public_data == first.public_data
        assert device_host_key(app, "mr-02").public_data != first.public_data
        path = device_key_path(app, "ct-01")
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent == app.config.home / "keys" / "jump"
        assert known_hosts_line(app, "ct-01") == "ct-01 " + public_line(app, "ct-01")
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
        with pytest.raises(UsageError):
            device_host_key(app, "../host_ed25519")
    finally:
        app.close()
