"""Directory accounts (LDAP / Active Directory): sign-in, roles from groups, SSH keys, disabling.

With ``[directory] url`` set, people who are not local medbroker users can sign in to the web console with
their directory password (plus their medbroker TOTP code) and, for vendors, log in over SSH with keys from
the directory's ``sshPublicKey`` attribute. The directory decides:

* who exists (``user_filter`` under ``user_base``),
* the role: membership in ``admin_group``, ``security_group``, ``approver_group`` or ``vendor_group``, in
  that order (someone in several gets the first); in none of them means no access,
* whether the account is disabled (Active Directory ``userAccountControl`` bit 2, OpenLDAP ppolicy
  ``pwdAccountLockedTime``, 389-ds ``nsAccountLock``),
* the SSH keys (``ssh_key_attribute``; the local keys of a directory user are replaced by them).

Each such user is mirrored as a local user marked ``source = 'directory'`` (the audit log, grants and
sessions need a local name); :func:`sync_directory_users` re-reads them every ``sync_interval`` and disables
the ones the directory disabled, removed or took out of every group, which ends their live sessions.
Local users (made with ``medbroker user add``) are never changed by the directory, even if the directory has
an account with the same name.
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from broker.app import App
from broker.clock import utc_iso
from broker.errors import BrokerError, PermissionDeniedError
from broker.identity import ROLES, parse_public_key, validate_name

__all__ = ["DirectoryUser", "Directory", "DirectoryError", "directory_for", "sync_from_directory",
           "sync_directory_users", "directory_signin"]

log = logging.getLogger("medbroker.directory")
_ROLE_ORDER = ("admin", "security", "approver", "vendor")
_CACHE_S = 30.0  # a lookup is reused this long (an SSH login asks twice per key)


def _close(conn: Any) -> None:
    """Unbind and close the socket, whatever state the connection is in: ldap3 leaves the socket open when the
    connect itself failed (the directory is down) or when sending the unbind fails, and an unclosed socket lives
    on until the garbage collector finds it."""
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - never opened, or the directory went away
        pass
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


class DirectoryError(BrokerError):
    """The directory could not be asked (down, wrong service credentials): nobody is let in by it."""


@dataclass(frozen=True)
class DirectoryUser:
    """One directory account as medbroker sees it."""

    name: str
    dn: str
    role: str | None
    disabled: bool
    keys: tuple[str, ...] = ()
    company: str | None = None
    groups: tuple[str, ...] = field(default=(), compare=False)


class Directory:
    """A small LDAP client for one ``[directory]`` configuration (ldap3, synchronous: call off the loop)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.cfg = app.config.directory
        self._cache: dict[str, tuple[float, DirectoryUser | None]] = {}

    # ------------------------------------------------------------------ connections
    def _server(self) -> Any:
        import ldap3

        cfg = self.cfg
        tls = None
        if cfg.url.startswith("ldaps://") or cfg.starttls:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                            ca_certs_file=str(self.app.config.path(cfg.ca_file)) if cfg.ca_file else None)
        timeout = self.app.config.seconds("directory", "timeout")
        return ldap3.Server(cfg.url, use_ssl=cfg.url.startswith("ldaps://"), tls=tls, connect_timeout=timeout,
                            get_info=ldap3.NONE)

    def _bind(self, dn: str | None, password: str | None) -> Any:
        """A bound connection; raises ldap3 errors (wrong password: LDAPBindError)."""
        import ldap3

        timeout = self.app.config.seconds("directory", "timeout")
        conn = ldap3.Connection(self._server(), user=dn, password=password, receive_timeout=timeout,
                                raise_exceptions=True, read_only=True, auto_bind=ldap3.AUTO_BIND_NONE)
        try:
            conn.open()
            if self.cfg.starttls and not self.cfg.url.startswith("ldaps://"):
                conn.start_tls()
            conn.bind()
        except BaseException:
            _close(conn)
            raise
        return conn

    def _service(self) -> Any:
        cfg = self.cfg
        password = None
        if cfg.bind_password_file:
            password = self.app.config.path(cfg.bind_password_file).read_text().strip()
        try:
            return self._bind(cfg.bind_dn or None, password)
        except Exception as exc:  # noqa: BLE001 - ldap3 raises many kinds; any means "cannot ask"
            raise DirectoryError(f"the directory at {cfg.url} cannot be asked ({type(exc).__name__})",
                                 "check [directory] url, bind_dn and bind_password_file; nobody is let in by "
                                 "the directory meanwhile") from None

    # ------------------------------------------------------------------ lookups
    def lookup(self, name: str, *, fresh: bool = False) -> DirectoryUser | None:
        """The account ``name`` (None when the directory has none).

        :raises DirectoryError: the directory cannot be asked
        """
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit and not fresh and now - hit[0] < _CACHE_S:
            return hit[1]
        user = self._lookup(name)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[name] = (now, user)
        return user

    def _lookup(self, name: str) -> DirectoryUser | None:
        from ldap3.utils.conv import escape_filter_chars

        cfg = self.cfg
        conn = self._service()
        try:
            attrs = ["userAccountControl", "pwdAccountLockedTime", "nsAccountLock"]
            if cfg.ssh_key_attribute:
                attrs.append(cfg.ssh_key_attribute)
            if cfg.company_attribute:
                attrs.append(cfg.company_attribute)
            query = cfg.user_filter.replace("{name}", escape_filter_chars(name))
            conn.search(cfg.user_base, query, attributes=[a for a in attrs if a], size_limit=2)
            entries = list(conn.entries)
            if len(entries) != 1:  # none, or an ambiguous filter: nobody
                return None
            entry = entries[0]
            dn = entry.entry_dn
            values = entry.entry_attributes_as_dict
            groups: list[str] = []
            for group_role in _ROLE_ORDER:
                group = getattr(cfg, f"{group_role}_group")
                if group and conn.search(group, f"(member={escape_filter_chars(dn)})", search_scope="BASE",
                                         attributes=[]) and conn.entries:
                    groups.append(group_role)
            role = groups[0] if groups else None
            disabled = _disabled(values)
            keys = tuple(_text(v).strip() for v in values.get(cfg.ssh_key_attribute, []) if _text(v).strip()) \
                if cfg.ssh_key_attribute else ()
            company = next((_text(v) for v in values.get(cfg.company_attribute, [])), None) \
                if cfg.company_attribute else None
            return DirectoryUser(name, dn, role, disabled, keys, company, tuple(groups))
        except DirectoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DirectoryError(f"the directory search for {name} failed ({type(exc).__name__})",
                                 "check [directory] user_base and user_filter") from None
        finally:
            _close(conn)

    def check_password(self, user: DirectoryUser, password: str) -> bool:
        """Bind as the user: True when the directory accepts the password."""
        if not password:
            return False  # an empty password is an anonymous bind on many servers: never a sign-in
        try:
            conn = self._bind(user.dn, password)
        except Exception:  # noqa: BLE001 - wrong password, locked, expired: all mean no
            return False
        _close(conn)
        return True


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _disabled(values: dict[str, list[Any]]) -> bool:
    for v in values.get("userAccountControl", []):
        try:
            if int(_text(v)) & 0x2:
                return True
        except ValueError:
            continue
    if values.get("pwdAccountLockedTime"):
        return True
    return any(_text(v).strip().lower() == "true" for v in values.get("nsAccountLock", []))


def directory_for(app: App) -> Directory | None:
    """The :class:`Directory` of ``app`` (kept on the app, so its lookup cache is shared by the web console
    and the SSH server of that home and goes away with it), or None when off."""
    if not app.config.directory.url:
        return None
    d = getattr(app, "_directory", None)
    if d is None:
        d = Directory(app)
        app._directory = d  # type: ignore[attr-defined]
    return d


# ---------------------------------------------------------------------- mirroring into the store
def sync_from_directory(app: App, user: DirectoryUser | None, name: str, now: datetime) -> dict | None:
    """Mirror one directory account into the local users (blocking; store thread).

    Creates a missing user (source 'directory'), updates its role, company and keys, and disables it when
    the directory disabled or removed it or it is in no medbroker group. Local users are left alone.
    Returns the local user row after the change (None when there is none).
    """
    store = app.store
    row = store.get_user(name)
    if row is not None and row.get("source") != "directory":
        return row  # a local account: the directory does not manage it
    if row is None:
        if user is None or user.role is None or user.disabled:
            return None
        try:
            validate_name(name, what="user name")
        except BrokerError:
            return None
        store.insert_user(name, user.role, user.company, utc_iso(now))
        store.set_user_source(name, "directory")
        app.audit.record("user.created", user=name, actor="directory", role=user.role, source_dn=user.dn,
                         via="directory")
        row = store.get_user(name)
        assert row is not None  # just inserted
    allowed = user is not None and user.role is not None and not user.disabled
    if not allowed and not row["disabled"]:
        why = ("no longer in the directory" if user is None else "disabled in the directory" if user.disabled
               else "in no medbroker group of the directory")
        store.set_user_disabled(name, True)
        app.audit.record("user.disabled", user=name, actor="directory", reason=why)
    elif allowed:
        assert user is not None and user.role is not None  # what allowed says
        changes: dict[str, Any] = {}
        if row["role"] != user.role:
            store.set_user_role(name, user.role)
            changes["role"] = [row["role"], user.role]
        if row["disabled"]:
            store.set_user_disabled(name, False)
            changes["enabled"] = True
        if user.company != row["company"]:
            store.set_user_company(name, user.company)
        if app.config.directory.ssh_key_attribute:
            wanted = {}
            for text in user.keys:
                try:
                    key = parse_public_key(text)
                except BrokerError:
                    continue  # an unusable key in the directory is skipped, not fatal
                wanted[key.fingerprint] = key.line
            have = {k["fingerprint"] for k in store.user_keys(name)}
            if set(wanted) != have:
                store.replace_user_keys(name, [(fp, line) for fp, line in wanted.items()], utc_iso(now))
                changes["keys"] = len(wanted)
        if changes:
            app.audit.record("user.directory.synced", user=name, actor="directory", **changes)
    return store.get_user(name)


def sync_directory_users(app: App, directory: Directory, now: datetime,
                         lookup: Callable[[str], DirectoryUser | None] | None = None) -> list[str]:
    """Re-read every directory-managed user; returns the names disabled by this pass (blocking).

    :raises DirectoryError: the directory cannot be asked (nothing is changed then: an outage does not lock
        everybody out, and does not let anybody new in)
    """
    lookup = lookup or (lambda n: directory.lookup(n, fresh=True))
    disabled = []
    for row in app.store.list_users():
        if row.get("source") != "directory":
            continue
        user = lookup(row["name"])
        before = row["disabled"]
        after = sync_from_directory(app, user, row["name"], now)
        if after is not None and after["disabled"] and not before:
            disabled.append(row["name"])
    return disabled


def directory_signin(app: App, directory: Directory, name: str, password: str, now: datetime) -> DirectoryUser:
    """Check a directory password and mirror the account (blocking; not on the event loop).

    :raises PermissionDeniedError: unknown, disabled, in no group, or wrong password (one message)
    :raises DirectoryError: the directory cannot be asked
    """
    user = directory.lookup(name, fresh=True)
    if user is None or user.role is None or user.disabled or not directory.check_password(user, password):
        raise PermissionDeniedError("authentication failed")
    if user.role not in ROLES:
        raise PermissionDeniedError("authentication failed")
    return user


async def refresh_for_login(app: App, run_db: Callable[..., Any], name: str) -> None:
    """Before an SSH key is checked: mirror ``name`` from the directory (its keys, role, state), so a directory
    user logs in with the keys the directory holds now. The directory is asked off the event loop; when it
    cannot be asked, the local mirror decides as it stands (logged)."""
    import asyncio

    directory = directory_for(app)
    if directory is None or not await run_db(_directory_managed, app, name):
        return
    try:
        user = await asyncio.get_running_loop().run_in_executor(None, directory.lookup, name)
    except DirectoryError as exc:
        log.warning("directory lookup for %s failed: %s", name, exc.message)
        return
    await run_db(lambda: sync_from_directory(app, user, name, app.clock.now()))


def _directory_managed(app: App, name: str) -> bool:
    row = app.store.get_user(name)
    return row is None or row.get("source") == "directory"


async def run_directory_sync(app: App, run_db: Callable[..., Any]) -> list[str]:
    """One pass of :func:`sync_directory_users`: lookups off the loop, store changes on the store thread.
    Returns the users it disabled; a directory that cannot be asked changes nothing (logged)."""
    import asyncio

    directory = directory_for(app)
    if directory is None:
        return []
    names = await run_db(lambda: [r["name"] for r in app.store.list_users() if r.get("source") == "directory"])
    loop = asyncio.get_running_loop()
    found: dict[str, DirectoryUser | None] = {}
    try:
        for name in names:
            found[name] = await loop.run_in_executor(None, functools.partial(directory.lookup, name, fresh=True))
    except DirectoryError as exc:
        log.warning("directory sync skipped: %s", exc.message)
        return []
    return await run_db(lambda: sync_directory_users(app, directory, app.clock.now(), lookup=found.get))
