"""TOTP second factor without SSH: enrolment with sealed secrets, code checks with replay protection.

RFC 6238 (HMAC-SHA1, 6 digits, 30 s steps) in a few lines of stdlib, so this decision layer stays free
of third-party imports; tests check it against RFC 6238's vectors and against pyotp.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from broker.errors import ConflictError, NotFoundError
from broker.keys import KeyProvider, Secret
from broker.store import Store

__all__ = [
    "PERIOD_S",
    "DIGITS",
    "MAX_CODE_LENGTH",
    "Enrolment",
    "CodeCheck",
    "normalise_code",
    "current_step",
    "enrol_totp",
    "remove_totp",
    "totp_secret",
    "code_for_step",
    "check_code",
    "reseal_totp_secrets",
]

# RFC 6238 defaults (HMAC-SHA1, 6 digits, 30 s): what every authenticator app accepts from a QR code.
PERIOD_S = 30
DIGITS = 6
WINDOW = 1  # accept the previous and the next step too (clock drift between phone and broker)
MAX_CODE_LENGTH = 32  # longer answers are refused before any work is done


def _context(user: str) -> bytes:
    # Binds a sealed secret to its user: copying bob's sealed secret into alice's row does not decrypt.
    return f"totp:{user}".encode()


@dataclass(frozen=True)
class Enrolment:
    """A fresh enrolment. ``uri`` holds the secret: show it to the user once, never log it."""

    user: str
    secret: Secret[str]
    uri: Secret[str]
    replaced: bool


@dataclass(frozen=True)
class CodeCheck:
    """Outcome of :func:`check_code`. ``reason`` is for the audit log, never for the person typing."""

    ok: bool
    reason: str  # accepted | wrong | reused | malformed | not-enrolled
    step: int | None = None


def normalise_code(text: object) -> str | None:
    """The six digits of a typed code (spaces and dashes ignored), or None when it is not one."""
    if not isinstance(text, str) or len(text) > MAX_CODE_LENGTH:
        return None
    digits = text.strip().replace(" ", "").replace("-", "")
    if len(digits) != DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return digits


def current_step(now: datetime) -> int:
    """The RFC 6238 time step of ``now`` (an aware datetime)."""
    return int(now.timestamp()) // PERIOD_S


def _secret_bytes(secret: str) -> bytes:
    text = secret.strip().replace(" ", "").upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def code_for_step(secret: str, step: int) -> str:
    """The code an authenticator app shows during ``step`` (RFC 4226 HOTP of the step counter).

    :param secret: the base32 secret
    :raises ValueError: ``secret`` is not base32, or ``step`` is negative
    """
    mac = hmac.new(_secret_bytes(secret), step.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return f"{value % 10 ** DIGITS:0{DIGITS}d}"


def _provisioning_uri(secret: str, user: str, issuer: str) -> str:
    label = quote(f"{issuer}:{user}", safe="")
    return (f"otpauth://totp/{label}?secret={secret}&issuer={quote(issuer, safe='')}"
            f"&algorithm=SHA1&digits={DIGITS}&period={PERIOD_S}")


def enrol_totp(store: Store, keys: KeyProvider, user: str, *, issuer: str = "medbroker",
               replace: bool = False) -> Enrolment:
    """Give ``user`` a new TOTP secret, stored sealed with the current data key.

    :param issuer: the name authenticator apps show next to the account
    :param replace: allow replacing an existing enrolment (the old secret stops working at once)
    :returns: the secret and its ``otpauth://`` URI, both as :class:`Secret`
    :raises NotFoundError: unknown user
    :raises ConflictError: already enrolled and ``replace`` is False
    """
    row = store.get_user(user)
    if not row:
        raise NotFoundError(f"user {user} does not exist", "see: medbroker user list")
    enrolled = bool(row["totp_secret"])
    if enrolled and not replace:
        raise ConflictError(f"user {user} already has TOTP enrolled",
                            f"to issue a new secret (the old one stops working): medbroker user totp {user} --reset")
    secret = base64.b32encode(secrets.token_bytes(20)).decode()  # 160 bits, as RFC 4226 recommends
    store.set_user_totp(user, keys.seal(secret.encode(), context=_context(user)))
    return Enrolment(user, Secret(secret), Secret(_provisioning_uri(secret, user, issuer)), enrolled)


def remove_totp(store: Store, user: str) -> None:
    """Remove a user's TOTP enrolment (they then log in with their key alone).

    :raises NotFoundError: unknown user
    :raises ConflictError: not enrolled
    """
    row = store.get_user(user)
    if not row:
        raise NotFoundError(f"user {user} does not exist", "see: medbroker user list")
    if not row["totp_secret"]:
        raise ConflictError(f"user {user} has no TOTP enrolled", "nothing changed")
    store.set_user_totp(user, None)


def totp_secret(store: Store, keys: KeyProvider, user: str) -> Secret[str] | None:
    """The user's TOTP secret, unsealed, or None when not enrolled.

    :raises StorageError: the sealed secret does not decrypt (wrong data key, or the row was tampered with)
    """
    row = store.get_user(user)
    if not row or not row["totp_secret"]:
        return None
    return Secret(keys.unseal(row["totp_secret"], context=_context(user)).decode())


def check_code(store: Store, keys: KeyProvider, user: str, code: object, now: datetime) -> CodeCheck:
    """Check a typed code against the user's secret; an accepted code's step can never be used again.

    Codes of the previous, current and next 30-second step are accepted; each step works once per
    user (``store.claim_totp_step``), and not after a later step was used.

    :raises StorageError: the sealed secret does not decrypt
    """
    digits = normalise_code(code)
    if digits is None:
        return CodeCheck(False, "malformed")
    secret = totp_secret(store, keys, user)
    if secret is None:
        return CodeCheck(False, "not-enrolled")
    now_step = current_step(now)
    matched = None
    for step in range(now_step - WINDOW, now_step + WINDOW + 1):  # compare all, in constant time each
        if hmac.compare_digest(code_for_step(secret.reveal(), step), digits):
            matched = step
    if matched is None:
        return CodeCheck(False, "wrong")
    if not store.claim_totp_step(user, matched):
        return CodeCheck(False, "reused", matched)
    return CodeCheck(True, "accepted", matched)


def reseal_totp_secrets(store: Store, keys: KeyProvider) -> int:
    """Re-seal every TOTP secret with the current data key (after ``medbroker keys rotate``).

    Call inside a store transaction to make it all-or-nothing.

    :param keys: a provider whose current key seals and which still reads the older keys
    :returns: how many secrets were re-sealed
    :raises StorageError: a secret does not decrypt (nothing is changed when called in a transaction)
    """
    count = 0
    for row in store.list_users():
        if row["totp_secret"]:
            plain = keys.unseal(row["totp_secret"], context=_context(row["name"]))
            store.set_user_totp(row["name"], keys.seal(plain, context=_context(row["name"])))
            if row["totp_last_step"] is not None:  # set_user_totp forgets the used steps; keep replay protection
                store.claim_totp_step(row["name"], row["totp_last_step"])
            count += 1
    return count
