"""Key material in the broker home: host key, signing key, data keys, and sealed secrets.

The :class:`KeyProvider` interface is what a KMS/HSM implementation would replace later.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import AnyStr, Generic

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigError, StorageError

__all__ = [
    "Secret",
    "KeyProvider",
    "FileKeyProvider",
    "generate_host_key",
    "generate_signing_key",
    "load_signing_key",
    "sign_hex",
    "verify_hex",
    "openssh_fingerprint",
    "write_private",
]


class Secret(Generic[AnyStr]):
    """A value that never prints: ``repr``/``str`` give ``<secret>``; ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: AnyStr) -> None:
        self._value: AnyStr = value

    def reveal(self) -> AnyStr:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(
            self._value if isinstance(self._value, bytes) else self._value.encode(),
            other._value if isinstance(other._value, bytes) else other._value.encode(),
        )

    __hash__ = None  # type: ignore[assignment]


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 (created that way, never world-readable).

    The data goes to a temporary file that replaces ``path`` only once it is complete and synced:
    rewriting ``keys/data.key`` in place lost every data key when the write failed half way.

    :raises OSError: the directory or the disk cannot take the file (``path`` is then unchanged)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # O_CREAT's mode is filtered by the umask; never wider anyway
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_host_key(path: Path) -> str:
    """Create an ed25519 SSH host key in OpenSSH format; returns the public key line."""
    key = Ed25519PrivateKey.generate()
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    Path(str(path) + ".pub").write_bytes(pub + b" medbroker-host\n")
    return pub.decode()


def generate_signing_key(path: Path) -> None:
    """Create the ed25519 key that signs recordings, audit checkpoints and reports."""
    key = Ed25519PrivateKey.generate()
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key.

    :raises ConfigError: missing or not an ed25519 PEM key
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"signing key {path} is missing", "run: medbroker init (or restore it from backup)") from None
    except (ValueError, TypeError, UnsupportedAlgorithm, OSError) as exc:  # TypeError: passphrase-protected
        raise ConfigError(f"signing key {path} is unreadable: {exc}",
                          "the signing key must be an unencrypted ed25519 PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an ed25519 key")
    return key


def sign_hex(key: Ed25519PrivateKey, message: bytes) -> str:
    """Sign ``message``; returns the signature as hex."""
    return key.sign(message).hex()


def verify_hex(public: Ed25519PublicKey, message: bytes, signature_hex: str) -> bool:
    """True when ``signature_hex`` is a valid signature of ``message``."""
    try:
        public.verify(bytes.fromhex(signature_hex), message)
        return True
    except (InvalidSignature, ValueError):
        return False


def openssh_fingerprint(blob: bytes) -> str:
    """The ``SHA256:…`` fingerprint of a public key blob, as ``ssh-keygen -l`` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class KeyProvider:
    """Interface: AEAD data keys by id, and sealing of small secrets (device credentials)."""

    def current(self) -> tuple[str, bytes]:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, key_id: str) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def seal(self, plaintext: bytes, *, context: bytes = b"") -> str:
        """Encrypt a small secret; returns ``key_id:base64(nonce‖ciphertext)``."""
        key_id, key = self.current()
        nonce = os.urandom(12)
        ct = AESGCM(key).encrypt(nonce, plaintext, context)
        return f"{key_id}:{base64.b64encode(nonce + ct).decode()}"

    def unseal(self, token: str, *, context: bytes = b"") -> bytes:
        """Decrypt what :meth:`seal` produced.

        :raises StorageError: unknown key id or tampered ciphertext
        """
        key_id, _, body = token.partition(":")
        try:
            raw = base64.b64decode(body, validate=True)
            return AESGCM(self.get(key_id)).decrypt(raw[:12], raw[12:], context)
        except (InvalidTag, ValueError) as exc:
            raise StorageError("a sealed secret could not be decrypted (wrong key or tampered)",
                               "check keys/data.key against your backup") from exc


@dataclass
class FileKeyProvider(KeyProvider):
    """Data keys in ``keys/data.key``: one ``ID HEX`` line per key, the last line is current."""

    path: Path

    def _load(self) -> list[tuple[str, bytes]]:
        try:
            lines = self.path.read_text().split()
        except FileNotFoundError:
            raise ConfigError(f"data key file {self.path} is missing", "run: medbroker init") from None
        pairs = []
        for i in range(0, len(lines) - 1, 2):
            try:
                key = bytes.fromhex(lines[i + 1])
            except ValueError:
                raise ConfigError(f"{self.path}: key {lines[i]} is not hex") from None
            if len(key) != 32:
                raise ConfigError(f"{self.path}: key {lines[i]} is not 32 bytes")
            pairs.append((lines[i], key))
        if not pairs:
            raise ConfigError(f"data key file {self.path} holds no key", "run: medbroker keys rotate")
        return pairs

    def current(self) -> tuple[str, bytes]:
        return self._load()[-1]

    def get(self, key_id: str) -> bytes:
        for kid, key in self._load():
            if kid == key_id:
                return key
        raise StorageError(f"data key {key_id!r} is not in {self.path}", "restore the key file from backup")

    def rotate(self) -> str:
        """Append a new current key; old keys stay for reading. Returns the new key id."""
        existing = self._load() if self.path.exists() else []
        key_id = f"k{len(existing) + 1}-{secrets.token_hex(3)}"
        body = "".join(f"{k} {v.hex()}\n" for k, v in existing) + f"{key_id} {secrets.token_hex(32)}\n"
        write_private(self.path, body.encode())
        return key_id
