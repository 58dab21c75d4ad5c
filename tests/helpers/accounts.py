"""Throwaway local accounts (`mbdev<pid>x<n>`, shell /bin/sh) that test devices log in as when we are root."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from itertools import count
from pathlib import Path

from helpers import find_binary

__all__ = [
    "accounts_supported",
    "create_account",
    "delete_account",
    "make_shared_dir",
    "new_account_name",
    "remove_stale_accounts",
]

_ADMIN_RETRIES = 50  # /etc/passwd lock held by a parallel run; 50 x 0.1 s
_USERDEL_NO_SUCH_USER = 6
# Names carry the pid of the test process that made them, so a later run can remove what a killed
# run (SIGKILL, CI timeout: no close(), no atexit) left behind, and never touches a live run's.
_PREFIX = "mbdev"
_ACCOUNT_NAME = re.compile(rf"{_PREFIX}(\d+)x\d+")
_SHARED_DIR_NAME = re.compile(rf"{_PREFIX}-(\d+)-\w+")
_SHARED_PARENT = Path("/tmp")
_serial = count(1)


def accounts_supported() -> bool:
    """Return True when throwaway accounts can be made here: root, with useradd, chpasswd and userdel."""
    return os.geteuid() == 0 and all(find_binary(n) for n in ("useradd", "chpasswd", "userdel"))


def new_account_name() -> str:
    """Return the next account name of this process, `mbdev<pid>x<n>` (at most 15 characters)."""
    return f"{_PREFIX}{os.getpid()}x{next(_serial)}"


def make_shared_dir() -> Path:
    """Create and return a world-traversable (0755) dir /tmp/mbdev-<pid>-XXXX for an account's files.

    pytest's tmp dirs are 0700 root, so whatever the account reads or writes must live elsewhere.
    """
    path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}-{os.getpid()}-", dir=_SHARED_PARENT))
    path.chmod(0o755)
    return path


def _run_admin(argv: list[str], *, stdin: bytes | None = None, ok_codes: tuple[int, ...] = (0,)) -> None:
    """Run useradd/chpasswd/userdel, retrying while another process holds the passwd/group lock.

    ok_codes: exit statuses that count as success. Raises RuntimeError with the tool's stderr otherwise.
    """
    for _ in range(_ADMIN_RETRIES):
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=30, check=False)
        if proc.returncode in ok_codes:
            return
        if b"lock" not in proc.stderr.lower():
            break
        time.sleep(0.1)
    raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")


def create_account(name: str, home: Path, *, password: str | None = None) -> pwd.struct_passwd:
    """Create system account `name` with shell /bin/sh and home `home` (must exist; not created).

    Without `password` no password matches ('*'), yet the account is not locked ('!'), which sshd
    without PAM refuses even for public keys. An account of that name already existing can only be
    a dead run's (the name holds our pid and a serial of this process): it is deleted first.
    Returns the passwd entry. Raises RuntimeError if useradd/chpasswd fail; the caller must then
    still call delete_account(name), which tolerates an account that was never made.
    """
    try:
        pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        delete_account(name)
    # --system: no mail spool and no subuid/subgid ranges to clean up afterwards.
    _run_admin(["useradd", "--system", "-M", "-d", str(home), "-s", "/bin/sh", "-p", "*",
                "-c", "medbroker test device", name])
    if password is not None:
        _run_admin(["chpasswd"], stdin=f"{name}:{password}\n".encode())
    return pwd.getpwnam(name)


def delete_account(name: str) -> None:
    """Delete account `name` and its group; already gone is fine. Raises RuntimeError if userdel fails."""
    # -f: even if a straggling session process still runs as it.
    _run_admin(["userdel", "-f", name], ok_codes=(0, _USERDEL_NO_SUCH_USER))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_accounts() -> list[str]:
    """Delete `mbdev<pid>x<n>` accounts and /tmp/mbdev-<pid>-* dirs whose test process no longer runs.

    Accounts of live processes (a parallel suite) are left alone. Best effort: a failing userdel is
    skipped (the next run retries). Returns the deleted account names; does nothing unless root.
    """
    if not accounts_supported():
        return []
    removed = []
    for entry in pwd.getpwall():
        match = _ACCOUNT_NAME.fullmatch(entry.pw_name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            delete_account(entry.pw_name)
        except RuntimeError:
            continue
        removed.append(entry.pw_name)
    for path in _SHARED_PARENT.glob(f"{_PREFIX}-*"):
        match = _SHARED_DIR_NAME.fullmatch(path.name)
        if match is not None and path.is_dir() and not path.is_symlink() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return removed
