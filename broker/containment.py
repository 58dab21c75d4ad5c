"""Containment: can the broker's own device login read the protected paths? Measured, cached, enforced.

A device is *contained* when its maintenance login cannot read any protected path (the device's
``--protect`` list plus the site defaults): then the device itself refuses patient data to every shell,
script or interpreter the vendor runs, whatever the command line looks like. It is *exposed* when the login
can read (or list, or reach by name) at least one of them, and *unknown* until checked or when a check
failed. The check runs over SFTP as the device login: at ``device add``, with ``medbroker device check``,
when the broker starts (devices never checked) and at every session start (reused for
``[policy] containment_ttl``, shared by every broker process through the store).

What an exposed device allows is its ``exposed_shell`` setting or the site default ``[policy]
exposed_shell``: ``allow``, ``files-only`` (SFTP/scp only) or ``two-approvers`` (shell and exec only on
grants two distinct approvers approved). Unknown counts as exposed (fail closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import secrets
import stat as stat_mod
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import asyncssh

from broker.clock import parse_utc, utc_iso
from broker.devices import Device, device_credential, shell_policy
from broker.errors import BrokerError
from broker.grants import Grant

__all__ = ["PathCheck", "ContainmentReport", "probe_containment", "check_device", "check_devices",
           "save_report", "cached_report", "session_containment", "channel_refusal", "protected_list",
           "READABLE", "PROBE_TIMEOUT_S", "site_defaults", "check_now", "describe_policy"]

log = logging.getLogger("medbroker.containment")
READABLE = ("readable", "readable-by-name")  # path statuses that make a device exposed
PROBE_TIMEOUT_S = 10.0
_UPSTREAM_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                     "aes128-ctr", "aes256-ctr"]


@dataclass(frozen=True)
class PathCheck:
    """One protected path as the device login sees it.

    ``status``: ``readable`` (listing or reading works), ``readable-by-name`` (the directory can be
    traversed but not listed: files whose names are known or guessed can still be read), ``not-readable``,
    ``absent``, or ``error`` (the device gave an unexpected answer).
    """

    path: str
    status: str
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class ContainmentReport:
    """The outcome of one check of one device."""

    device: str
    login: str
    state: str  # contained | exposed | unknown
    checked_at: str
    paths: tuple[PathCheck, ...] = ()
    error: str | None = None
    cached: bool = field(default=False, compare=False)

    @property
    def exposed_paths(self) -> list[str]:
        return [p.path for p in self.paths if p.status in READABLE]

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "login": self.login, "state": self.state, "checked_at": self.checked_at,
                "error": self.error, "paths": [p.as_dict() for p in self.paths]}

    def details_json(self) -> str:
        return json.dumps({"login": self.login, "error": self.error, "paths": [p.as_dict() for p in self.paths]},
                          sort_keys=True)


def protected_list(device: Device, defaults: tuple[str, ...] | list[str]) -> list[str]:
    """Every path containment is about: the device's own, then the site defaults, without duplicates."""
    return list(dict.fromkeys([*device.protected_paths, *defaults]))


def _fix(path: str, attrs: asyncssh.SFTPAttrs | None, login: str, login_uid: int | None) -> str:
    """The exact commands (as root on the device) that make ``path`` unreadable for ``login``."""
    base = f"chown root:root {path} && chmod 0700 {path}"
    if attrs is None or attrs.permissions is None:
        return f"on the device, as root: {base}"
    mode = attrs.permissions
    why = []
    if login_uid is not None and attrs.uid == login_uid:
        why.append(f"it belongs to {login}")
    if mode & (stat_mod.S_IROTH | stat_mod.S_IXOTH):
        why.append(f"everyone may {'read' if mode & stat_mod.S_IROTH else 'traverse'} it "
                   f"(mode {stat_mod.S_IMODE(mode):04o})")
    tail = ""
    if mode & (stat_mod.S_IRGRP | stat_mod.S_IXGRP) and (login_uid is None or attrs.uid != login_uid):
        why.append(f"its group (gid {attrs.gid}) may read it")
        tail = f"; or, if the application needs that group, remove {login} from it: gpasswd -d {login} GROUP"
    reason = f" ({'; '.join(why)})" if why else ""
    return (f"on the device, as root: {base}{reason} - or give it to the account the application writes "
            f"as (never {login}) with mode 0700{tail}")


_WALK_BUDGET = 256  # entries looked at below one protected directory


async def _traversable(sftp: asyncssh.SFTPClient, path: str) -> bool | None:
    """Can the login enter ``path``? A name that does not exist answers "no such file" when it can (so
    known names could be read), "permission denied" when it cannot; None when the device says neither."""
    try:
        await sftp.stat(posixpath.join(path, f".medbroker-containment-{secrets.token_hex(4)}"))
        return True
    except asyncssh.SFTPNoSuchFile:
        return True
    except asyncssh.SFTPPermissionDenied:
        return False
    except asyncssh.SFTPError:
        return None


async def _readable_file(sftp: asyncssh.SFTPClient, path: str) -> bool:
    try:
        async with sftp.open(path, "rb"):
            return True
    except asyncssh.SFTPError:
        return False


async def _walk(sftp: asyncssh.SFTPClient, top: str) -> tuple[str, str] | None:
    """Look below a listable directory for content the login can reach: a file it can open, or a
    directory it can enter but not list. Returns (status, detail), or None when names are all it sees."""
    queue, seen = [top], 0
    while queue:
        d = queue.pop(0)
        names: list[asyncssh.SFTPName] = []
        try:
            async with _aclosing(sftp.scandir(d)) as entries:
                async for entry in entries:
                    if entry.filename in (".", ".."):
                        continue
                    names.append(entry)
                    seen += 1
                    if seen > _WALK_BUDGET:
                        break
        except asyncssh.SFTPPermissionDenied:
            if d != top and await _traversable(sftp, d):
                return "readable-by-name", f"the login can enter {d} without listing it"
            continue
        except asyncssh.SFTPError:
            continue
        for e in names:
            child = posixpath.join(d, cast(str, e.filename))  # the client decodes names (str)
            kind = e.attrs.type
            if kind == asyncssh.FILEXFER_TYPE_DIRECTORY:
                queue.append(child)
            elif kind in (asyncssh.FILEXFER_TYPE_REGULAR, asyncssh.FILEXFER_TYPE_SYMLINK) \
                    and await _readable_file(sftp, child):
                return "readable", f"the login can list it and read {child}"
        if seen > _WALK_BUDGET:
            return "readable", (f"the login can list it; the first {_WALK_BUDGET} entries were checked and the "
                                "rest were not, so it counts as readable")
    return None


async def _probe_path(sftp: asyncssh.SFTPClient, path: str, login: str, login_uid: int | None) -> PathCheck:
    try:
        attrs = await sftp.stat(path)
    except asyncssh.SFTPNoSuchFile:
        return PathCheck(path, "absent", "does not exist on the device")
    except asyncssh.SFTPPermissionDenied:
        return PathCheck(path, "not-readable", "a directory above it cannot be entered by the login")
    except asyncssh.SFTPError as exc:
        return PathCheck(path, "error", f"stat failed: {exc.reason}")
    fix = _fix(path, attrs, login, login_uid)
    if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY or (
            attrs.permissions is not None and stat_mod.S_ISDIR(attrs.permissions)):
        try:
            found = await _walk(sftp, path)
        except asyncssh.SFTPError as exc:
            return PathCheck(path, "error", f"listing failed: {exc.reason}")
        try:
            async with _aclosing(sftp.scandir(path)) as entries:
                async for _ in entries:
                    break
            listable = True
        except asyncssh.SFTPPermissionDenied:
            listable = False
        if found is not None:
            return PathCheck(path, found[0], found[1], fix)
        if listable:
            # Names only (e.g. /var/lib/postgresql with its 0700 cluster below): not patient content.
            return PathCheck(path, "not-readable", "the login can list names here but read no file below it")
        can_enter = await _traversable(sftp, path)
        if can_enter:
            return PathCheck(path, "readable-by-name", "the login cannot list this directory but can enter "
                             "it, so files whose names are known or guessed can be read", fix)
        if can_enter is None:
            return PathCheck(path, "error", "the device gave no clear answer whether the login can enter it")
        return PathCheck(path, "not-readable", "the login can neither list nor enter this directory")
    if await _readable_file(sftp, path):
        return PathCheck(path, "readable", "the login can open this file for reading",
                         fix.replace("chmod 0700", "chmod 0600"))
    return PathCheck(path, "not-readable", "the login cannot open this file")


class _aclosing:
    """contextlib.aclosing for an async generator (stop a directory listing after its first name)."""

    def __init__(self, agen) -> None:
        self.agen = agen

    async def __aenter__(self):
        return self.agen

    async def __aexit__(self, *exc) -> None:
        await self.agen.aclose()


async def probe_containment(sftp: asyncssh.SFTPClient, device: str, login: str, paths: list[str],
                            now: datetime) -> ContainmentReport:
    """Check each path with the device login's SFTP session.

    :return: contained (no path readable), exposed (one or more), unknown (a path could not be judged)
    """
    login_uid = None
    try:
        login_uid = (await sftp.stat(".")).uid  # sftp-server starts in the login's home
    except asyncssh.SFTPError:
        pass
    checks = tuple([await _probe_path(sftp, p, login, login_uid) for p in paths])
    if any(c.status in READABLE for c in checks):
        state = "exposed"
    elif any(c.status == "error" for c in checks):
        state = "unknown"
    else:
        state = "contained"
    return ContainmentReport(device, login, state, utc_iso(now), checks)


def _failed(device: Device, now: datetime, why: str) -> ContainmentReport:
    return ContainmentReport(device.name, device.login, "unknown", utc_iso(now), (), why)


async def _probe_over(conn: asyncssh.SSHClientConnection, device: Device, paths: list[str],
                      now: datetime) -> ContainmentReport:
    sftp = await conn.start_sftp_client()
    try:
        return await probe_containment(sftp, device.name, device.login, paths, now)
    finally:
        sftp.exit()
        await sftp.wait_closed()


async def check_device(device: Device, secret: str, paths: list[str], now: datetime, *,
                       timeout_s: float = PROBE_TIMEOUT_S) -> ContainmentReport:
    """Check ``device`` over a short connection of its own (``device add``, ``device check``, broker start).

    Never raises for the device's sake: an unreachable device or a wrong host key gives ``unknown``
    with the reason in ``error``.
    """
    opts: dict[str, Any] = dict(
        username=device.login, known_hosts=([asyncssh.import_public_key(device.host_key)], [], []),
        config=None, agent_path=None, agent_forwarding=False, gss_auth=False, gss_kex=False,
        connect_timeout=timeout_s, encryption_algs=_UPSTREAM_CIPHERS, compression_algs=["none"])
    if device.auth_kind == "key":
        opts.update(client_keys=[asyncssh.import_private_key(secret)], preferred_auth="publickey")
    else:
        opts.update(password=secret, client_keys=None, preferred_auth="password,keyboard-interactive")
    for k, v in device.legacy_algorithms.items():
        opts[k] = "+" + ",".join(v)
    try:
        async with asyncio.timeout(timeout_s + 1):
            async with asyncssh.connect(device.host, device.port, **opts) as conn:
                return await _probe_over(conn, device, paths, now)
    except asyncssh.HostKeyNotVerifiable:
        return _failed(device, now, "the device's host key does not match the pinned one")
    except TimeoutError:
        return _failed(device, now, "timed out")
    except (OSError, asyncssh.Error) as exc:
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return _failed(device, now, f"cannot connect: {why}")


def save_report(store, audit, report: ContainmentReport, *, trigger: str, session_id: str | None = None,
                actor: str | None = None) -> None:
    """Store a check on the device row (the cache every broker process reads) and audit it."""
    store.set_device_containment(report.device, report.state, report.checked_at, report.details_json())
    audit.record("device.containment", actor=actor, device=report.device, session_id=session_id,
                 state=report.state, trigger=trigger, exposed_paths=report.exposed_paths, error=report.error,
                 paths={p.path: p.status for p in report.paths if p.status != "absent"})


def cached_report(device: Device, now: datetime, ttl_s: int) -> ContainmentReport | None:
    """The device row's last check when it is younger than ``ttl_s`` (and known), else None."""
    if device.containment == "unknown" or not device.containment_checked_at:
        return None
    try:
        at = parse_utc(device.containment_checked_at)
    except (ValueError, BrokerError):
        return None
    if not timedelta(0) <= now - at < timedelta(seconds=ttl_s):
        return None
    details = device.containment_details or {}
    paths = tuple(PathCheck(p.get("path", "?"), p.get("status", "error"), p.get("detail", ""), p.get("fix"))
                  for p in details.get("paths", []))
    return ContainmentReport(device.name, device.login, device.containment, device.containment_checked_at, paths,
                             details.get("error"), cached=True)


async def check_devices(app, defaults: tuple[str, ...], *, only_unknown: bool = True,
                        timeout_s: float = 5.0) -> list[ContainmentReport]:
    """Check every device (or those never checked) concurrently, store and audit each result."""
    from broker.devices import list_devices

    store = app.store
    devices = await store.run(list_devices, store)
    todo = [d for d in devices if not only_unknown or d.containment == "unknown"]

    async def one(dev: Device) -> ContainmentReport:
        try:
            secret = (await store.run(device_credential, dev, app.keys)).reveal()
            report = await check_device(dev, secret, protected_list(dev, defaults), app.clock.now(),
                                        timeout_s=timeout_s)
            await store.run(lambda: save_report(store, app.audit, report, trigger="broker-start"))
        except BrokerError as exc:  # one device's trouble never stops the others (or the broker)
            log.warning("containment check of %s at start failed: %s", dev.name, exc.message)
            report = _failed(dev, app.clock.now(), exc.message)
        return report

    return list(await asyncio.gather(*(one(d) for d in todo)))


async def session_containment(broker, live) -> ContainmentReport:
    """The containment that applies to a starting session: the shared cache, else a fresh check over the
    session's own upstream connection. Stored on the session row and in the recording."""
    app = broker.app
    dev: Device = live.device
    now = app.clock.now()
    ttl = app.config.seconds("policy", "containment_ttl")
    fresh = await broker.db(lambda: _reload(app.store, dev.name))
    report = cached_report(fresh or dev, now, ttl)
    if report is None:
        paths = protected_list(dev, broker.default_protected)
        try:
            report = await asyncio.wait_for(_probe_over(live.upconn, dev, paths, now), PROBE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else (
                getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
            report = _failed(dev, now, f"check failed: {why}")
        try:
            await broker.db(lambda: save_report(app.store, app.audit, report, trigger="session-start",
                                                session_id=live.id))
        except BrokerError as exc:  # the result still applies to this session; the cache just stays old
            log.warning("cannot store the containment check of %s: %s", dev.name, exc.message)
    await broker.db(lambda: app.store.update_session(live.id, containment=report.state))
    if live.recorder is not None:
        live.recorder.append_event(0, "containment", {"state": report.state, "checked_at": report.checked_at,
                                                      "exposed_paths": report.exposed_paths,
                                                      "cached": report.cached, "error": report.error})
    return report


def _reload(store, name: str) -> Device | None:
    from broker.devices import get_device

    try:
        return get_device(store, name)
    except BrokerError:
        return None


def channel_refusal(kind: str, grant: Grant, device: Device, report: ContainmentReport | None,
                    site_default: str) -> str | None:
    """Why a ``shell`` or ``exec`` channel may not open on this grant and device now, or None.

    Files-only grants never open them; on an exposed (or unknown) device the device's shell policy
    decides: ``allow``, ``files-only``, or ``two-approvers`` (two distinct approvers on the grant).
    """
    what = "an interactive shell" if kind == "shell" else "running commands"
    if grant.shell == "files-only":
        return (f"grant {grant.id} is {grant.mode} and files-only: {what} is not allowed, only sftp and scp "
                f"(PuTTY: psftp, pscp, WinSCP); read-only and upload-only grants allow a shell only when the approver allows one. If you need "
                f"a shell, request again and ask the approver to approve it with --allow-shell")
    state = report.state if report is not None else "unknown"
    if state == "contained":
        return None
    policy = shell_policy(device.exposed_shell, site_default)
    if policy == "allow":
        return None
    if state == "exposed":
        shown = report.exposed_paths if report is not None else []
        why = (f"{device.name} is exposed: its maintenance login can read patient data "
               f"({', '.join(shown[:3])}{' …' if len(shown) > 3 else ''})")
    else:
        err = report.error if report is not None and report.error else "not checked"
        why = f"{device.name}'s containment is unknown ({err}), which counts as exposed"
    fix = (f"; the hospital's biomedical engineer can make it contained (medbroker device check {device.name} "
           f"says how)")
    if policy == "files-only":
        return f"{why}, so only sftp and scp (PuTTY: psftp, pscp, WinSCP) are allowed on it, not {what}{fix}"
    if len(set(grant.approved_by)) >= 2:
        return None
    seen = grant.containment or "unknown"
    return (f"{why}, and grant {grant.id} was approved by one approver (while the device was {seen}); "
            f"{what} on an exposed device needs two approvers who know it is exposed. Request again: two "
            f"approvers must approve{fix}")


def site_defaults(app) -> tuple[str, ...]:
    """The site's default protected paths (``[policy] protected_paths_file`` or the shipped file)."""
    from broker.app import default_policy_file
    from sessions.policy import load_protected_paths

    cfg = app.config
    path = cfg.path(cfg.policy.protected_paths_file) if cfg.policy.protected_paths_file else default_policy_file()
    return tuple(load_protected_paths(path))


def check_now(app, name: str, *, trigger: str, actor: str | None = None,
              timeout_s: float | None = None) -> ContainmentReport:
    """Check one device now over its own short connection, store and audit the result (for the CLI).

    :raises NotFoundError: unknown device
    """
    from broker.devices import get_device

    dev = get_device(app.store, name)
    secret = device_credential(dev, app.keys).reveal()
    limit = timeout_s if timeout_s is not None else min(float(app.config.seconds("upstream", "connect_timeout")),
                                                        PROBE_TIMEOUT_S)
    report = asyncio.run(check_device(dev, secret, protected_list(dev, site_defaults(app)), app.clock.now(),
                                      timeout_s=limit))
    save_report(app.store, app.audit, report, trigger=trigger, actor=actor)
    return report


def describe_policy(device: Device, site_default: str) -> str:
    """One sentence: what this device allows while it is exposed (or unknown)."""
    policy = shell_policy(device.exposed_shell, site_default)
    source = "device setting" if device.exposed_shell else "site default"
    text = {"allow": "shell and exec for any grant (the broker's own guards are all that stand in the way)",
            "files-only": "sftp and scp only, never a shell or exec",
            "two-approvers": "shell and exec only on grants two different approvers approved"}[policy]
    return f"{policy} ({source}): {text}"
