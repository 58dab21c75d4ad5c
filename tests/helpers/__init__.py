"""Test helpers that drive real OpenSSH (sshd, ssh, scp, sftp, ssh-keygen) and paramiko on loopback."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "journal_bytes",
    "poll",
    "FUZZ_EXAMPLES",
    "FUZZ_EXAMPLES_OTHER",
    "HelperTimeoutError",
    "find_binary",
    "fuzz_examples",
    "hypothesis_profile_name",
    "is_ci",
    "missing_openssh_binaries",
    "openssh_required",
]

# Where sshd lives when PATH lacks the sbin directories (non-root shells on Debian).
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_OPENSSH_BINARIES = ("sshd", "ssh", "scp", "sftp", "ssh-keygen")


class HelperTimeoutError(AssertionError):
    """A helper's bounded wait ran out; the message carries what the process printed so far."""


def is_ci() -> bool:
    """Return True when the CI environment variable is set to something other than empty/0/false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def hypothesis_profile_name() -> str:
    """Return the hypothesis profile to load: $HYPOTHESIS_PROFILE, else "ci" under CI, else "dev"."""
    return os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if is_ci() else "dev")


def fuzz_examples(ci: int = 4_000) -> int:
    """How many examples a parser fuzz test asks for: ``ci`` in the ci profile, 300 otherwise.

    ``MEDBROKER_FUZZ_EXAMPLES`` overrides both (a nightly-style run: MEDBROKER_FUZZ_EXAMPLES=100000).
    """
    override = os.environ.get("MEDBROKER_FUZZ_EXAMPLES", "")
    if override.isdigit() and int(override) > 0:
        return int(override)
    return ci if hypothesis_profile_name() == "ci" else 300


# The login-name parser, the config loader and the recording reader (the front door and the evidence)
# get 4_000 examples in CI; every other parser 2_000, which keeps the whole suite under 15 minutes on two
# cores (10_000 cost about 2 minutes of the suite's 12; MEDBROKER_FUZZ_EXAMPLES runs a long campaign).
FUZZ_EXAMPLES = fuzz_examples()
FUZZ_EXAMPLES_OTHER = fuzz_examples(2_000)


def openssh_required() -> bool:
    """Return True when missing OpenSSH binaries must fail tests instead of skipping them."""
    return os.environ.get("MEDBROKER_REQUIRE_OPENSSH", "") == "1"


def find_binary(name: str) -> str | None:
    """Return the absolute path of an executable, also looking in the sbin dirs, or None.

    sshd refuses to start unless it is executed by absolute path, so callers use the result as argv[0].
    """
    found = shutil.which(name)
    if found:
        return str(Path(found).resolve())
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_openssh_binaries() -> list[str]:
    """Return the names of the OpenSSH programs (sshd, ssh, scp, sftp, ssh-keygen) that are not installed."""
    return [name for name in _OPENSSH_BINARIES if find_binary(name) is None]


def poll(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.05) -> Any:
    """Call ``predicate`` every ``step`` seconds until it returns something truthy (returned) or ``timeout``
    passes (then its last, falsy, answer is returned: ``assert poll(...)`` fails with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def journal_bytes(store: Any, session_id: str) -> bytes:
    """Every byte the recording journal holds for ``session_id``, rows in seq order (what the node wrote)."""
    out, after = bytearray(), -1
    while rows := store.read_journal(session_id, after):
        for seq, data in rows:
            out += data
            after = seq
    return bytes(out)
