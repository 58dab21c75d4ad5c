"""``medbroker service install``, ``medbroker backup`` and ``medbroker restore``: running as a service."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from broker.app import open_app
from broker.audit import verify_chain
from broker.commands.common import JSON_HELP, emit_json, safe, say, state
from broker.config import parse_listen, redact_url
from broker.errors import BrokerError, StorageError, UsageError
from broker.service import UnitSpec, backup_home, render_unit, restore_home

app = typer.Typer(no_args_is_help=True, help="Run medbroker as a systemd service (docs/deploy.md).")


def _launcher() -> str:
    """This installation's ``medbroker`` launcher (absolute), for ExecStart."""
    here = Path(sys.executable).parent / "medbroker"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("medbroker")
    if found:
        return str(Path(found).resolve())
    raise StorageError("no medbroker launcher found next to this Python or on the PATH",
                       "install medbroker with pip or pipx first (docs/deploy.md)")


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise StorageError(f"{' '.join(argv)} failed: {safe(r.stderr.strip()[-300:])}")


@app.command("install")
def install(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", help="System account the broker runs as (created if missing).")]
    = "medbroker",
    name: Annotated[str, typer.Option("--name", help="Unit name (NAME.service).")] = "medbroker",
    unit_dir: Annotated[Path, typer.Option("--unit-dir", file_okay=False,
                                           help="Where the unit goes.")] = Path("/etc/systemd/system"),
    listen: Annotated[str | None, typer.Option("--listen", metavar="HOST:PORT",
                                               help="Vendor SSH address (default: listen.address).")] = None,
    print_only: Annotated[bool, typer.Option("--print", help="Print the unit; change nothing.")] = False,
    start: Annotated[bool, typer.Option("--start/--no-start",
                                        help="systemctl enable --now after writing (when systemd runs).")] = True,
) -> None:
    """Write a hardened systemd unit for this home (own user, only the home writable, Type=notify)."""
    st = state(ctx)
    a = st.app()
    if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
        raise UsageError(f"unit name {name!r}: use letters, digits, - and _")
    if not user.replace("-", "").replace("_", "").isalnum() or not user[0].isalpha() or len(user) > 32:
        raise UsageError(f"user name {user!r}: use a letter, then letters, digits, - and _")
    address = listen or a.config.listen.address
    _, port = parse_listen(address)
    spec = UnitSpec(home=a.home.resolve(), executable=_launcher(), user=user, listen=listen, low_port=0 < port < 1024)
    text = render_unit(spec)
    if print_only:
        sys.stdout.write(text)
        return
    if os.geteuid() != 0:
        raise BrokerError("installing a service needs root", "run it with sudo, or use --print and install by hand")
    try:
        pwd.getpwnam(user)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        _run([useradd, "--system", "--user-group", "--home-dir", str(spec.home), "--no-create-home",
              "--shell", "/usr/sbin/nologin", "--comment", "medbroker remote-maintenance broker", user])
        say(f"created the system account {user}")
    account = pwd.getpwnam(user)
    for path in [spec.home, *spec.home.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / f"{name}.service"
    tmp = unit.with_suffix(".service.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, unit)
    say(f"wrote {unit} (runs {spec.executable} --home {spec.home} serve as {user})")
    systemctl = shutil.which("systemctl")
    if start and systemctl and Path("/run/systemd/system").is_dir():
        _run([systemctl, "daemon-reload"])
        _run([systemctl, "enable", "--now", f"{name}.service"])
        say(f"started: systemctl status {name}; logs: journalctl -u {name}")
    else:
        say(f"systemd is not running here; on the server: systemctl daemon-reload && systemctl enable --now {name}")


def backup(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("-o", "--output", file_okay=False, help="New, empty directory for the backup.")],
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Copy this home (database online-backed-up, recordings, keys, config) to DIR with a SHA-256 manifest."""
    st = state(ctx)
    home = st.home
    cfg = st.app().config
    if cfg.store.url:  # the state is not in this home: a copy of it would restore an empty broker
        raise StorageError(f"this home keeps its state in PostgreSQL ({redact_url(cfg.store.url)}); backup copies "
                           "a home's SQLite database only",
                           "back the database up with PostgreSQL's tools (pg_dump, pg_basebackup) and this "
                           "directory with the file system's (docs/ha.md)")
    manifest = backup_home(home, out, cfg.recordings_dir)
    total = sum(f["bytes"] for f in manifest["files"].values())
    if as_json:
        emit_json({"backup": str(out), "files": len(manifest["files"]), "bytes": total})
    else:
        say(f"backed up {home} to {out}: {len(manifest['files'])} files, {total} bytes (MANIFEST.json)")
        say(f"restore it with: medbroker restore {out} --home NEW_HOME")


def restore(
    backup_dir: Annotated[Path, typer.Argument(metavar="DIR", file_okay=False, help="A directory from `medbroker backup`.")],
    new_home: Annotated[Path, typer.Option("--home", file_okay=False, help="New, empty broker home.")],
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Check a backup against its manifest, copy it to a new home, then verify the audit chain and recordings."""
    from broker.commands.audit import check_recordings

    new_home = new_home.expanduser().absolute()
    manifest = restore_home(backup_dir, new_home)
    a = open_app(new_home)
    try:
        source = manifest.get("source_recordings") or str(Path(manifest["source_home"]) / "recordings")
        moved = a.store.rebase_recordings(source, str(a.config.recordings_dir))
        chain = verify_chain(a.store, verify_signature=a.verify_signature)
        recordings = check_recordings(a)
    finally:
        a.close()
    broken = [r for r in recordings if r["state"] == "broken"]
    if as_json:
        emit_json({"home": str(new_home), "files": len(manifest["files"]), "recordings_rebased": moved,
                   "audit": {"ok": chain.ok, "rows": chain.rows}, "recordings_broken": [r["session_id"] for r in broken],
                   "ok": chain.ok and not broken})
    else:
        say(f"restored {len(manifest['files'])} files to {new_home}; audit chain "
            f"{'ok' if chain.ok else 'BROKEN'} ({chain.rows} rows); {len(recordings) - len(broken)} recordings ok, "
            f"{len(broken)} broken")
    if not chain.ok or broken:
        raise StorageError("the restored home does not verify", "keep the backup as it is and tell the security team")
