"""Who is connecting: username parsing, users, roles, public keys, TOTP, lockout decisions."""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.clock import parse_utc, utc_iso
from broker.errors import ConflictError, NotFoundError, PermissionDeniedError, UsageError
from broker.keys import openssh_fingerprint
from broker.store import Store

__all__ = [
    "ROLES",
    "KEY_TYPES",
    "LoginTarget",
    "Principal",
    "PublicKey",
    "parse_login",
    "validate_name",
    "parse_public_key",
    "add_user",
    "add_user_key",
    "remove_user_key",
    "set_user_role",
    "get_principal",
    "authenticate_key",
    "standing_refusal",
    "require_role",
    "lockout_remaining",
]

ROLES = ("vendor", "approver", "security", "admin")
KEY_TYPES = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-rsa",
)
# OpenSSH certificate types: the plain type with -cert-v01 before any @openssh.com suffix.
_CERT_TYPES = tuple(t.removesuffix("@openssh.com") + "-cert-v01@openssh.com" for t in KEY_TYPES)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_LOGIN = 256


def validate_name(name: str, *, what: str = "name") -> str:
    """Check a user or device name: lowercase letters, digits, ``.``, ``_``, ``-``; ≤ 63 characters.

    :raises UsageError: with the offending value (escaped) and the rule
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # not match(): '$' also matches before a final '\n'
        shown = repr(name)[:80]
        raise UsageError(
            f"{what} {shown} is not valid",
            "use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class LoginTarget:
    """The SSH username split at its last ``@``: ``alice@ct-01`` → user alice, device ct-01."""

    user: str
    device: str | None


def parse_login(raw: str) -> LoginTarget:
    """Parse the SSH login name.

    ``alice`` talks to the broker itself; ``alice@ct-01`` asks for a session on ct-01.

    :raises UsageError: empty parts, too long, control characters, more than one ``@``
    """
    if not isinstance(raw, str) or not raw:
        raise UsageError("empty login name", "log in as USER@DEVICE, e.g. ssh -p 2222 alice@ct-01@broker")
    if len(raw) > MAX_LOGIN:
        raise UsageError(f"login name is {len(raw)} characters long", f"at most {MAX_LOGIN}")
    if any(not (0x20 < ord(c) < 0x7F) for c in raw):
        raise UsageError("login name contains control, space or non-ASCII characters",
                         "log in as USER@DEVICE, e.g. alice@ct-01")
    user, sep, device = raw.rpartition("@")
    if not sep:
        return LoginTarget(validate_name(raw, what="user name"), None)
    if "@" in user:
        raise UsageError(f"login name {raw!r} has more than one '@'", "log in as USER@DEVICE, e.g. alice@ct-01")
    return LoginTarget(validate_name(user, what="user name"), validate_name(device, what="device name"))


@dataclass(frozen=True)
class Principal:
    """An authenticated broker user."""

    name: str
    role: str
    company: str | None
    totp_enrolled: bool
    disabled: bool


@dataclass(frozen=True)
class PublicKey:
    """A parsed OpenSSH public key line."""

    type: str
    blob: bytes
    comment: str
    fingerprint: str

    @property
    def line(self) -> str:
        return f"{self.type} {base64.b64encode(self.blob).decode()}"


def parse_public_key(text: str) -> PublicKey:
    """Parse ``TYPE BASE64 [COMMENT]`` as in ``id_ed25519.pub`` or ``authorized_keys``.

    :raises UsageError: unknown type, bad base64, blob type differs from the declared type
    """
    parts = (text or "").strip().split(None, 2)
    if len(parts) < 2:
        raise UsageError("not an OpenSSH public key", "pass the .pub file, e.g. ~/.ssh/id_ed25519.pub")
    ktype, b64 = parts[0], parts[1]
    if ktype not in KEY_TYPES and ktype not in _CERT_TYPES:
        raise UsageError(f"key type {ktype!r} is not accepted", f"use one of: {', '.join(KEY_TYPES)}")
    try:
        blob = base64.b64decode(b64, validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        inner = blob[4:4 + n].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise UsageError("public key data is not valid base64 key material") from None
    if inner != ktype:
        raise UsageError(f"public key says {ktype!r} but contains {inner!r}")
    return PublicKey(ktype, blob, parts[2] if len(parts) > 2 else "", openssh_fingerprint(blob))


def add_user(store: Store, name: str, role: str, company: str | None, now: datetime) -> Principal:
    """Create a user.

    :raises UsageError: bad name or role
    :raises ConflictError: the user exists
    """
    validate_name(name, what="user name")
    if role not in ROLES:
        raise UsageError(f"role {role!r} is not known", f"use one of: {', '.join(ROLES)}")
    if store.get_user(name):
        raise ConflictError(f"user {name} already exists", f"see: medbroker user show {name}")
    store.insert_user(name, role, company, utc_iso(now))
    return get_principal(store, name)


def add_user_key(store: Store, name: str, key_text: str, now: datetime) -> PublicKey:
    """Register a public key for ``name``.

    :raises NotFoundError: unknown user
    :raises UsageError: unparsable key
    """
    if not store.get_user(name):
        raise NotFoundError(f"user {name} does not exist", "create it first: medbroker user add NAME --role vendor")
    key = parse_public_key(key_text)
    store.add_user_key(name, key.fingerprint, key.line, utc_iso(now))
    return key


def remove_user_key(store: Store, name: str, fingerprint: str) -> None:
    """Remove one of ``name``'s public keys; live sessions that logged in with it end (broker control loop).

    :raises NotFoundError: unknown user, or no such key for them
    """
    get_principal(store, name)
    if not store.delete_user_key(name, fingerprint):
        raise NotFoundError(f"{name} has no key {fingerprint}", f"see: medbroker user show {name}")


def set_user_role(store: Store, name: str, role: str) -> str:
    """Give ``name`` another role; returns the old one. Their live sessions end (broker control loop).

    :raises NotFoundError: unknown user
    :raises UsageError: unknown role
    :raises ConflictError: the user has that role already
    """
    if role not in ROLES:
        raise UsageError(f"role {role!r} is not known", f"use one of: {', '.join(ROLES)}")
    old = get_principal(store, name).role
    if old == role:
        raise ConflictError(f"user {name} is already {role}", "nothing changed")
    store.set_user_role(name, role)
    return old


def get_principal(store: Store, name: str) -> Principal:
    """Look a user up.

    :raises NotFoundError: unknown user
    """
    row = store.get_user(name)
    if not row:
        raise NotFoundError(f"user {name} does not exist", "see: medbroker user list")
    return Principal(row["name"], row["role"], row["company"], bool(row["totp_secret"]), bool(row["disabled"]))


def authenticate_key(store: Store, name: str, fingerprint: str) -> Principal:
    """Decide whether ``fingerprint`` authenticates ``name``.

    :raises PermissionDeniedError: unknown user, disabled user, unregistered key (one message for
        all, so a failed login learns nothing)
    """
    row = store.get_user(name)
    if not row or row["disabled"] or not store.find_key(name, fingerprint):
        raise PermissionDeniedError("authentication failed")
    return get_principal(store, name)


def standing_refusal(store: Store, name: str, fingerprint: str | None, role: str | None) -> str | None:
    """Why a connection that authenticated as ``name`` with key ``fingerprint`` and role ``role`` may not go
    on (open channels, keep sessions), or None when it still may. Asked for every new channel; the broker's
    control loop asks the same of live sessions through ``Store.sessions_to_stop``."""
    row = store.get_user(name)
    if not row or row["disabled"]:
        return f"the account {name} was disabled by the hospital's medbroker administrators"
    if fingerprint and not store.find_key(name, fingerprint):
        return f"the SSH key this connection logged in with ({fingerprint}) was removed from {name}"
    if role and row["role"] != role:
        return f"the role of {name} changed from {role} to {row['role']}; log in again"
    return None


def require_role(principal: Principal, *roles: str, action: str) -> None:
    """Raise unless ``principal`` has one of ``roles``.

    :raises PermissionDeniedError: naming the role needed
    """
    if principal.role not in roles:
        raise PermissionDeniedError(
            f"{principal.name} ({principal.role}) may not {action}",
            f"this needs the role {' or '.join(roles)}; ask a medbroker administrator",
        )


def lockout_remaining(store: Store, user: str, source: str, now: datetime, *, max_failures: int,
                      window_s: int, lockout_s: int) -> int:
    """Seconds the (user, source) pair stays locked, 0 when it is not locked.

    A pair is locked for ``lockout_s`` after the ``max_failures``-th failure within ``window_s``.
    """
    recent = store.last_auth_failures(user, source, max_failures)
    if len(recent) < max_failures:
        return 0
    newest, oldest = parse_utc(recent[0]), parse_utc(recent[-1])
    if newest - oldest > timedelta(seconds=window_s):
        return 0
    remaining = (newest + timedelta(seconds=lockout_s) - now).total_seconds()
    return max(0, int(remaining + 0.999))
