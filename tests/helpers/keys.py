"""SSH key pairs made by the real ssh-keygen, with their public line and SHA256 fingerprint."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from helpers import find_binary

__all__ = ["KEY_TYPES", "KeyPair", "fingerprint_of", "generate_keypair"]

# ssh-keygen -t value and default size for each supported key type.
KEY_TYPES = {"ed25519": ("ed25519", None), "rsa": ("rsa", 3072), "ecdsa": ("ecdsa", 256)}
_TIMEOUT = 30.0


@dataclass(frozen=True)
class KeyPair:
    """One OpenSSH key pair on disk.

    private_path: the private key file (mode 0600, OpenSSH format); public_path: the matching .pub file;
    public_line: the .pub content without the newline ("ssh-ed25519 AAAA... comment");
    fingerprint: "SHA256:..." exactly as `ssh-keygen -lf` prints it; key_type: "ed25519", "rsa" or "ecdsa".
    """

    private_path: Path
    public_path: Path
    public_line: str
    fingerprint: str
    key_type: str

    @property
    def public_key(self) -> str:
        """Return "TYPE BASE64" (the public line without its comment), as `--host-key` expects it."""
        algorithm, blob = self.public_line.split()[:2]
        return f"{algorithm} {blob}"

    def __fspath__(self) -> str:
        """Let a KeyPair stand in for its private key path (`-i key`)."""
        return str(self.private_path)


def _ssh_keygen() -> str:
    path = find_binary("ssh-keygen")
    if path is None:
        raise FileNotFoundError("ssh-keygen is not installed; run scripts/install.sh")
    return path


def fingerprint_of(path: Path | str) -> str:
    """Return the SHA256 fingerprint ("SHA256:...") of a public or private key file.

    Raises RuntimeError when ssh-keygen cannot read the file.
    """
    proc = subprocess.run(
        [_ssh_keygen(), "-l", "-E", "sha256", "-f", str(path)],
        capture_output=True,
        timeout=_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ssh-keygen -lf {path} failed: {proc.stderr.decode(errors='replace').strip()}")
    # "256 SHA256:abc... comment (ED25519)"
    return proc.stdout.decode().split()[1]


def generate_keypair(
    directory: Path | str,
    name: str | None = None,
    *,
    key_type: str = "ed25519",
    comment: str | None = None,
    bits: int | None = None,
    passphrase: str = "",
) -> KeyPair:
    """Generate a key pair with ssh-keygen into `directory`.

    directory: created if missing; name: file name of the private key (default "id_<key_type>"; the
    public key is name + ".pub"); key_type: "ed25519" (default), "rsa" or "ecdsa"; comment: the key
    comment (default "<name>@medbroker-test"); bits: key size (rsa default 3072, ecdsa 256);
    passphrase: "" for an unencrypted key.
    Returns the KeyPair. Raises ValueError for an unknown type or an existing file, RuntimeError when
    ssh-keygen fails.
    """
    if key_type not in KEY_TYPES:
        raise ValueError(f"key_type {key_type!r}; expected one of {sorted(KEY_TYPES)}")
    algorithm, default_bits = KEY_TYPES[key_type]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or f"id_{key_type}"
    private_path = directory / name
    public_path = directory / f"{name}.pub"
    if private_path.exists() or public_path.exists():
        raise ValueError(f"{private_path} already exists; pick another name")
    argv = [_ssh_keygen(), "-q", "-t", algorithm, "-N", passphrase, "-f", str(private_path)]
    argv += ["-C", comment if comment is not None else f"{name}@medbroker-test"]
    size = bits if bits is not None else default_bits
    if size is not None:
        argv += ["-b", str(size)]
    proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ssh-keygen failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    public_line = public_path.read_text().strip()
    return KeyPair(
        private_path=private_path,
        public_path=public_path,
        public_line=public_line,
        fingerprint=fingerprint_of(public_path),
        key_type=key_type,
    )
