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
    "parse_public_keys",
    "PRIVATE_KEY_REFUSAL",
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
_TYPE_TOKEN = re.compile(r"[a-z][a-z0-9@._-]{0,63}")
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


def _shown_type(token: str) -> str:
    """The first word of a would-be key for an error message: named only when it looks like a key type name
    (a private key's base64 or a pasted password never reaches the terminal or the logs)."""
    return repr(token) if not token or _TYPE_TOKEN.fullmatch(token) else "(not a key type name)"


def parse_public_key(text: str) -> PublicKey:
    """Parse ``TYPE BASE64 [COMMENT]`` as in ``id_ed25519.pub``, ``authorized_keys`` or PuTTYgen's
    'Public key for pasting' box.

    :raises UsageError: unknown type, bad base64, blob type differs from the declared type
    """
    parts = (text or "").strip().split(None, 2)
    if len(parts) < 2:
        raise UsageError("not an OpenSSH public key", "pass the .pub file, e.g. ~/.ssh/id_ed25519.pub")
    ktype, b64 = parts[0], parts[1]
    if ktype not in KEY_TYPES and ktype not in _CERT_TYPES:
        raise UsageError(f"key type {_shown_type(ktype)} is not accepted", f"use one of: {', '.join(KEY_TYPES)}")
    return _key_from_blob(b64, parts[2] if len(parts) > 2 else "", declared=ktype)


def _key_from_blob(b64: str, comment: str, *, declared: str | None) -> PublicKey:
    try:
        blob = base64.b64decode(b64, validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        inner = blob[4:4 + n].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise UsageError("public key data is not valid base64 key material") from None
    if declared is None:  # RFC 4716: the blob names its own type
        if inner not in KEY_TYPES and inner not in _CERT_TYPES:
            raise UsageError(f"key type {_shown_type(inner)} is not accepted", f"use one of: {', '.join(KEY_TYPES)}")
    elif inner != declared:
        raise UsageError(f"public key says {declared!r} but contains {_shown_type(inner)}")
    return PublicKey(inner, blob, comment, openssh_fingerprint(blob))


# What a private key looks like, in any format a vendor may have at hand: PuTTY's .ppk (v2, v3), OpenSSH's
# own, PEM (RSA, EC, PKCS#8, encrypted) and the commercial SSH2 (RFC 4716-like) private key.
_PRIVATE_MARKERS = re.compile(r"PuTTY-User-Key-File-\d+\s*:|-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----|"
                              r"----\s*BEGIN SSH2 ENCRYPTED PRIVATE KEY\s*----|^Private-Lines\s*:", re.M | re.I)
PRIVATE_KEY_REFUSAL = ("this is a private key; give the public key (PuTTYgen: Save public key, or the text box "
                       "'Public key for pasting')")
_PRIVATE_HINT = ("nothing was stored; keep the private key on your computer and never send it, "
                 "or make a new key pair if it was shared")
_RFC4716_BEGIN = re.compile(r"^----\s*BEGIN SSH2 PUBLIC KEY\s*----$")
_RFC4716_END = re.compile(r"^----\s*END SSH2 PUBLIC KEY\s*----$")
_RFC4716_MAX_LINES = 200  # an RSA-16384 key body is ~45 lines of 64 characters, plus headers


def parse_public_keys(text: str) -> list[PublicKey]:
    """Every public key in ``text``, in order.

    Accepts OpenSSH one-line keys (``TYPE BASE64 [COMMENT]``: ``.pub`` files, ``authorized_keys`` lines,
    PuTTYgen's 'Public key for pasting' box) and RFC 4716 blocks (``---- BEGIN SSH2 PUBLIC KEY ----``,
    header lines such as ``Comment: "..."`` continued with a trailing backslash, base64 body: what PuTTYgen's
    'Save public key' writes). Blank lines and ``#`` comments between keys are skipped.

    :returns: at least one key
    :raises UsageError: a private key (:data:`PRIVATE_KEY_REFUSAL`; nothing of it is echoed), a malformed
        line or block (naming its line number), or no key at all
    """
    if not isinstance(text, str) or _PRIVATE_MARKERS.search(text):
        raise UsageError(PRIVATE_KEY_REFUSAL, _PRIVATE_HINT)
    lines = text.splitlines()
    keys: list[PublicKey] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        number = i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        try:
            if _RFC4716_BEGIN.fullmatch(line):
                key, i = _parse_rfc4716(lines, i)
                keys.append(key)
            elif line.startswith("----"):
                raise UsageError("unexpected '----' line; an RFC 4716 key starts with '---- BEGIN SSH2 PUBLIC KEY ----'",
                                 "pass the public key file PuTTYgen saved, unchanged")
            else:
                keys.append(parse_public_key(line))
        except UsageError as exc:
            where = f"line {number}: " if len(lines) > 1 else ""
            raise UsageError(f"{where}{exc.message}", exc.hint or _KEY_HINT) from None
    if not keys:
        raise UsageError("no public key found", _KEY_HINT)
    return keys


_KEY_HINT = ("pass the public key: an OpenSSH .pub file (ssh-ed25519 AAAA...), or PuTTYgen's "
             "'Save public key' file (---- BEGIN SSH2 PUBLIC KEY ----)")


def _parse_rfc4716(lines: list[str], i: int) -> tuple[PublicKey, int]:
    """One RFC 4716 block whose BEGIN line came just before ``lines[i]``; returns the key and the index after
    its END line."""
    comment = ""
    body: list[str] = []
    in_headers = True
    start = i
    while i < len(lines):
        if i - start > _RFC4716_MAX_LINES:
            raise UsageError("the RFC 4716 key block is too long")
        line = lines[i].strip()
        i += 1
        if _RFC4716_END.fullmatch(line):
            if not body:
                raise UsageError("the RFC 4716 key block has no key data")
            key = _key_from_blob("".join(body), comment, declared=None)
            return key, i
        if in_headers and ":" in line:
            # A header (RFC 4716 §3.3): TAG: VALUE, the value continued on the next line when the line's last
            # character is a backslash ("\\ " with a space after it ends the header: the space is the last).
            tag, _, value = lines[i - 1].lstrip().partition(":")
            while value.endswith("\\") and i < len(lines) and i - start <= _RFC4716_MAX_LINES:
                value = value[:-1] + lines[i].lstrip()
                i += 1
            tag, value = tag.strip(), value.strip()
            if not tag or len(tag) > 64 or not all(0x21 <= ord(c) < 0x7F for c in tag):
                raise UsageError("the RFC 4716 key block has a malformed header line")
            if tag.lower() == "comment":
                comment = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
            continue
        in_headers = False
        if not line or line.startswith("----") or ":" in line:
            raise UsageError("the RFC 4716 key block is malformed (expected base64 key data or "
                             "'---- END SSH2 PUBLIC KEY ----')")
        body.append(line)
    raise UsageError("the RFC 4716 key block has no '---- END SSH2 PUBLIC KEY ----' line")


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
