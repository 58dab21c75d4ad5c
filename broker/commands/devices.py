"""``medbroker device …``: the device inventory, its broker-held credential and its pinned host key."""

import base64
import getpass
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.commands.common import (BY_ADMIN_HELP, JSON_HELP, admin_actor, emit_json, open_home,
                                    print_fields, print_table, read_text_file, safe, say)
from broker.containment import READABLE, check_now, describe_policy
from broker.config import format_duration
from broker.devices import (CLASSES, SHELL_POLICIES, add_device, get_device, list_devices, remove_device,
                             set_exposed_shell, validate_protected_path)
from broker.devices import shell_policy
from broker.errors import ConflictError, DeviceUnreachableError, PermissionDeniedError, UsageError
from broker.identity import parse_public_key, validate_name

__all__ = ["app", "fetch_host_key", "check_algorithms"]

app = typer.Typer(help="Devices: address, the credential the broker logs in with, the pinned host key, "
                       "protected paths.", no_args_is_help=True, rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
ByOpt = Annotated[str | None, typer.Option("--by", metavar="NAME", help=BY_ADMIN_HELP)]
AlgOpt = Annotated[list[str] | None, typer.Option(metavar="ALG")]

# --legacy-* option → (legacy_algorithms key in the device row, asyncssh's list of what it can do)
_LEGACY = {
    "kex": ("kex_algs", "asyncssh.kex", "get_kex_algs"),
    "cipher": ("encryption_algs", "asyncssh.encryption", "get_encryption_algs"),
    "mac": ("mac_algs", "asyncssh.mac", "get_mac_algs"),
    "host-key-alg": ("server_host_key_algs", "asyncssh.public_key", "get_public_key_algs"),
}


def check_algorithms(option: str, names: list[str]) -> list[str]:
    """Check legacy algorithm names against what asyncssh supports (typos fail here, not at 3 a.m.).

    :raises UsageError: an unknown name, listing what is known
    """
    import importlib

    _, module, fn = _LEGACY[option]
    known = [a.decode() for a in getattr(importlib.import_module(module), fn)()]
    for name in names:
        if name not in known:
            raise UsageError(f"--legacy-{option} {name!r} is not an algorithm medbroker can use",
                             f"known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def fetch_host_key(host: str, port: int, timeout_s: int, legacy: dict[str, list[str]]) -> str:
    """Ask the device for its SSH host key; returns ``TYPE BASE64``.

    :raises DeviceUnreachableError: no answer within ``timeout_s``, refused, or no key offered
    """
    import asyncio

    import asyncssh

    opts: dict[str, Any] = {k: "+" + ",".join(v) for k, v in legacy.items() if k in ("kex_algs", "server_host_key_algs")}

    async def ask():
        return await asyncio.wait_for(asyncssh.get_server_host_key(host, port, config=None, **opts), timeout_s)

    try:
        key = asyncio.run(ask())
    except asyncio.TimeoutError:
        raise DeviceUnreachableError(f"{host}:{port} did not answer within {format_duration(timeout_s)}",
                                     "check the address and that the device's SSH server is on") from None
    except (OSError, asyncssh.Error) as exc:
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DeviceUnreachableError(f"cannot fetch the host key of {host}:{port}: {why}",
                                     "check the address, or pass the key with --host-key \"TYPE BASE64\"") from None
    if key is None:
        raise DeviceUnreachableError(f"{host}:{port} offered no host key", "pass it with --host-key \"TYPE BASE64\"")
    return f"{key.get_algorithm()} {base64.b64encode(key.public_data).decode()}"


def _read_password(login: str, host: str) -> str:
    """One line from stdin (never echoed: getpass on a terminal), without its line ending."""
    if sys.stdin.isatty():
        return getpass.getpass(f"Password for {login}@{host} (not echoed): ")
    line = sys.stdin.readline()
    line = line[:-1] if line.endswith("\n") else line
    return line[:-1] if line.endswith("\r") else line  # a CRLF line from a Windows-edited file


def _private_key(path: Path) -> str:
    """The private key text, checked to be usable unattended (not passphrase-protected)."""
    import asyncssh

    text = read_text_file(path, what="key file")
    try:
        asyncssh.import_private_key(text)
    except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError, ValueError) as exc:
        # asyncssh says "Passphrase must be specified to import encrypted private keys"
        if not isinstance(exc, asyncssh.KeyEncryptionError) and "passphrase" not in str(exc).lower():
            raise UsageError(f"{path} is not an SSH private key",
                             "pass the private key the broker logs in with (not the .pub file)") from None
        raise UsageError(f"{path} is protected by a passphrase; the broker logs in unattended",
                         "make an unencrypted copy for the broker: "
                         f"ssh-keygen -p -N '' -f COPY_OF_{path.name}") from None
    return text


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Device name vendors use, e.g. ct-01.")],
    host: Annotated[str, typer.Option("--host", help="Device address (host name or IP).")],
    login: Annotated[str, typer.Option("--login", metavar="USER", help="Account the broker logs in as.")],
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Device SSH port.")] = 22,
    key: Annotated[Path | None, typer.Option(
        "--key", metavar="FILE", exists=True, dir_okay=False,
        help="Private key the broker logs in with (stored sealed with keys/data.key).")] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the device password from one line of stdin (never echoed or logged).")] = False,
    host_key: Annotated[str | None, typer.Option(
        "--host-key", metavar='"TYPE BASE64"', help="The device's SSH host key to pin, e.g. from ssh-keyscan.")] = None,
    fetch: Annotated[bool, typer.Option(
        "--fetch-host-key",
        help="Ask the device for its host key, show the fingerprint and ask before pinning.")] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", help="With --fetch-host-key: pin without asking (scripts; compare the printed fingerprint).")] = False,
    protect: Annotated[list[str] | None, typer.Option(
        "--protect", metavar="PATH", help="Absolute path vendors may not read or write (repeatable).")] = None,
    device_class: Annotated[str, typer.Option(
        "--class", help=f"{' or '.join(CLASSES)}; critical devices need two approvers.")] = "standard",
    legacy_kex: Annotated[list[str] | None, typer.Option(
        "--legacy-kex", metavar="ALG", help="Extra key exchange algorithm for an old device (repeatable).")] = None,
    legacy_cipher: Annotated[list[str] | None, typer.Option(
        "--legacy-cipher", metavar="ALG", help="Extra cipher for an old device (repeatable).")] = None,
    legacy_mac: Annotated[list[str] | None, typer.Option(
        "--legacy-mac", metavar="ALG", help="Extra MAC for an old device (repeatable).")] = None,
    legacy_host_key_alg: Annotated[list[str] | None, typer.Option(
        "--legacy-host-key-alg", metavar="ALG", help="Extra host key algorithm, e.g. ssh-rsa (repeatable).")] = None,
    description: Annotated[str | None, typer.Option("--description", help="Free text, e.g. model and room.")] = None,
    exposed_shell: Annotated[str | None, typer.Option(
        "--exposed-shell", metavar="POLICY",
        help="What the device allows while exposed (its login can read a protected path): "
             "allow, files-only or two-approvers. Default: [policy] exposed_shell.")] = None,
    no_check: Annotated[bool, typer.Option(
        "--no-check", help="Do not check containment now (it is checked at the first session).")] = False,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device with the credential the broker uses and its pinned SSH host key, then check
    containment (can the device login read a protected path?) when the device is reachable."""
    if (key is None) == (not password_stdin):
        raise UsageError("give exactly one credential", "--key FILE or --password-stdin")
    if (host_key is None) == (not fetch):
        raise UsageError("give exactly one of --host-key \"TYPE BASE64\" and --fetch-host-key",
                         f"get the key with: ssh-keyscan -p {port} {host}")
    if description is not None and (len(description) > 500 or safe(description) != description):
        raise UsageError("--description must be at most 500 printable characters")
    validate_name(name, what="device name")
    if device_class not in CLASSES:
        raise UsageError(f"--class {device_class!r} is not known", f"use {' or '.join(CLASSES)}")
    if exposed_shell is not None and exposed_shell not in SHELL_POLICIES:
        raise UsageError(f"--exposed-shell {exposed_shell!r} is not known", f"use {', '.join(SHELL_POLICIES)}")
    for path in protect or ():
        validate_protected_path(path)
    legacy: dict[str, list[str]] = {}
    for option, values in (("kex", legacy_kex), ("cipher", legacy_cipher), ("mac", legacy_mac),
                           ("host-key-alg", legacy_host_key_alg)):
        if values:
            legacy[_LEGACY[option][0]] = check_algorithms(option, values)
    if host_key is not None:
        try:
            parse_public_key(host_key)
        except UsageError as exc:
            raise UsageError(f"--host-key: {exc.message}",
                             f'pass "TYPE BASE64" as printed by: ssh-keyscan -p {port} {host}') from None
    a = open_home(ctx)
    actor = admin_actor(a, by, action="add devices")
    if a.store.get_device(name):
        raise ConflictError(f"device {name} already exists", f"remove it first: medbroker device remove {name}")
    key_text = _private_key(key) if key is not None else None
    password = _read_password(login, host) if password_stdin else None
    if fetch:
        host_key = _confirm_fetched(name, fetch_host_key(host, port, a.config.seconds("upstream", "connect_timeout"),
                                                         legacy), yes)
    assert host_key is not None
    dev = add_device(a.store, a.audit, a.keys, name=name, host=host, port=port, login=login, host_key=host_key,
                     now=a.clock.now(), key_text=key_text, password=password, protect=tuple(protect or ()),
                     device_class=device_class, legacy_algorithms=legacy, description=description, actor=actor,
                     exposed_shell=exposed_shell)
    report = None if no_check else check_now(a, name, trigger="device-add", actor=actor)
    if report is not None:
        dev = get_device(a.store, name)
    if as_json:
        emit_json(dev.as_dict() | ({"containment_check": report.as_dict()} if report else {}))
        return
    say(f"Device {dev.name} added: {dev.login}@{dev.host}:{dev.port} ({dev.auth_kind} login, {dev.device_class}), "
        f"host key {dev.host_key_fingerprint} pinned, {len(dev.protected_paths)} protected path(s).")
    if report is not None:
        say(f"Containment: {_state_line(report)}" + (f"; details and fixes: medbroker device check {name}"
                                                     if report.state != "contained" else ""))


def _confirm_fetched(name: str, line: str, yes: bool) -> str:
    hk = parse_public_key(line)
    typer.echo(f"{name} presented a {hk.type} host key with fingerprint {hk.fingerprint}", err=True)
    if yes:
        return line
    if not sys.stdin.isatty():
        raise UsageError("refusing to pin a fetched host key without a person confirming it",
                         "compare the fingerprint with the device's console, then rerun with --yes, "
                         "or pass the key with --host-key \"TYPE BASE64\"")
    if not typer.confirm(f"Pin this host key for {name}?", default=False, err=True):
        raise PermissionDeniedError(f"host key for {name} not pinned; nothing changed",
                                    "verify the fingerprint on the device's own console first")
    return line


def _paths(paths: tuple[str, ...]) -> str:
    return ", ".join(paths) if paths else "-"


def _state_line(report) -> str:
    if report.state == "contained":
        return "contained (the device login cannot read any protected path)"
    if report.state == "exposed":
        return f"EXPOSED: the device login can read {', '.join(report.exposed_paths)}"
    return f"unknown ({report.error or 'a path could not be judged'})"


def _containment(d) -> str:
    return d.containment.upper() if d.containment == "exposed" else d.containment


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List registered devices with their containment (can the device login read a protected path?)."""
    devices = list_devices(open_home(ctx).store)
    if as_json:
        emit_json({"devices": [d.as_dict() for d in devices]})
        return
    print_table(["name", "address", "login", "auth", "class", "protected", "containment", "host key"],
                ([d.name, f"{d.host}:{d.port}", d.login, d.auth_kind, d.device_class, len(d.protected_paths),
                  _containment(d), d.host_key_fingerprint] for d in devices), empty="no devices yet")


@app.command("show")
def show(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME", help="Device name.")],
         as_json: JsonOpt = False) -> None:
    """Show one device (never its credential)."""
    a = open_home(ctx)
    d = get_device(a.store, name)
    if as_json:
        emit_json(d.as_dict() | {"exposed_allows": shell_policy(d.exposed_shell, a.config.policy.exposed_shell)})
        return
    legacy = "; ".join(f"{k}: {', '.join(v)}" for k, v in d.legacy_algorithms.items()) or "-"
    exposed = [p["path"] for p in (d.containment_details or {}).get("paths", []) if p.get("status") in READABLE]
    checked = f" (checked {d.containment_checked_at})" if d.containment_checked_at else " (never checked)"
    print_fields([("name", d.name), ("address", f"{d.host}:{d.port}"), ("login", d.login),
                  ("auth", f"{d.auth_kind} (sealed)"), ("class", d.device_class), ("host key", d.host_key),
                  ("fingerprint", d.host_key_fingerprint), ("protected", _paths(d.protected_paths)),
                  ("containment", _containment(d) + checked), ("readable by the login", _paths(tuple(exposed))),
                  ("while exposed", describe_policy(d, a.config.policy.exposed_shell)),
                  ("legacy algorithms", legacy), ("description", d.description), ("created", d.created_at)])


@app.command("check")
def check(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME", help="Device name.")],
          by: ByOpt = None, as_json: JsonOpt = False) -> None:
    """Containment: can the broker's device login read each protected path? Exit 0 contained, 1 not.

    Checks over SFTP as the device login, prints each path as readable, readable by name (a directory it
    can enter but not list), not readable or absent, and for each readable path how to fix it."""
    a = open_home(ctx)
    d = get_device(a.store, name)
    actor = admin_actor(a, by, action="check devices", roles=("admin", "security"))
    report = check_now(a, d.name, trigger="device-check", actor=actor)
    if as_json:
        emit_json(report.as_dict() | {"exposed_allows": shell_policy(d.exposed_shell, a.config.policy.exposed_shell)})
    else:
        typer.echo(f"{d.name}: {_state_line(report)}")
        typer.echo(f"checked {report.checked_at} over SFTP as {report.login}@{d.host}:{d.port}, "
                   f"{len(report.paths)} protected path(s)")
        for p in report.paths:
            label = {"readable": "READABLE", "readable-by-name": "READABLE BY NAME", "not-readable": "not readable",
                     "absent": "absent", "error": "error"}.get(p.status, p.status)
            typer.echo(f"  {safe(p.path)}: {label}" + (f" - {safe(p.detail)}" if p.status != "absent" else ""))
            if p.status in READABLE and p.fix:
                typer.echo(f"      fix: {safe(p.fix)}")
        if report.state != "contained":
            typer.echo(f"While {d.name} is not contained it allows: "
                       f"{describe_policy(d, a.config.policy.exposed_shell)}")
            typer.echo(f"After fixing, check again: medbroker device check {d.name}")
    if report.state != "contained":
        raise typer.Exit(1)


@app.command("set")
def set_(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME", help="Device name.")],
         exposed_shell: Annotated[str, typer.Option(
             "--exposed-shell", metavar="POLICY",
             help="What the device allows while exposed: allow, files-only, two-approvers, or default "
                  "(the site's [policy] exposed_shell).")],
         by: ByOpt = None, as_json: JsonOpt = False) -> None:
    """Change a device setting: what it allows while exposed (its login can read a protected path)."""
    if exposed_shell != "default" and exposed_shell not in SHELL_POLICIES:
        raise UsageError(f"--exposed-shell {exposed_shell!r} is not known",
                         f"use {', '.join(SHELL_POLICIES)} or default")
    a = open_home(ctx)
    get_device(a.store, name)
    actor = admin_actor(a, by, action="change devices")
    d = set_exposed_shell(a.store, a.audit, name, None if exposed_shell == "default" else exposed_shell, actor=actor)
    if as_json:
        emit_json(d.as_dict() | {"exposed_allows": shell_policy(d.exposed_shell, a.config.policy.exposed_shell)})
        return
    say(f"Device {name} while exposed allows: {describe_policy(d, a.config.policy.exposed_shell)}.")


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Device name.")],
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a device; its live sessions end within a second (the vendor is told why)."""
    a = open_home(ctx)
    get_device(a.store, name)
    actor = admin_actor(a, by, action="remove devices")
    live = a.store.list_sessions(status="live", device=name)
    remove_device(a.store, a.audit, name, actor=actor)
    if as_json:
        emit_json({"removed": name} | ({"ended_sessions": [s["id"] for s in live]} if live else {}))
        return
    say(f"Device {name} removed.")
    if live:
        say(f"{len(live)} live session(s) on it end within a second: " + ", ".join(s["id"] for s in live))
