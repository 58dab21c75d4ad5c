"""Key + TOTP over SSH: a pinned asyncssh hook that answers a verified key with partial success.

asyncssh's server never sends ``USERAUTH_FAILURE`` with ``partial_success`` (see docs/mfa.md): a verified
public key is final. This module swaps asyncssh's server-side publickey handler for a subclass that,
once asyncssh has verified the key's signature, asks the connection's ``SSHServer`` whether a second
factor follows; if so it answers "partial success" and the client continues with keyboard-interactive
(OpenSSH prompts ``Verification code:``). Private names are touched, so the asyncssh range is pinned in
pyproject.toml and tests/test_mfa.py fails loudly when an upgrade changes them.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import asyncssh

__all__ = ["HookStatus", "TESTED_ASYNCSSH", "install_mfa_hook", "mfa_hook_status"]

log = logging.getLogger("medbroker.mfa")

# The asyncssh releases the hook was verified against with stock OpenSSH clients (docs/mfa.md).
TESTED_ASYNCSSH = ("2.24.1",)
OWNER_METHOD = "second_factor_needed"
_USERAUTH_SERVICE = b"ssh-userauth"
_MISSING = object()


@dataclass(frozen=True)
class HookStatus:
    """Whether key + TOTP can be enforced in this process, and why not."""

    active: bool
    reason: str
    asyncssh_version: str


_status: HookStatus | None = None


def _check_private_api() -> tuple[Any, Any] | str:
    """The two private names the hook needs, or a sentence saying what changed."""
    auth = getattr(asyncssh, "auth", None)
    base = getattr(auth, "_ServerPublicKeyAuth", None)
    handlers = getattr(auth, "_server_auth_handlers", None)
    server_auth = getattr(auth, "ServerAuth", None)
    if base is None or not isinstance(handlers, dict) or server_auth is None:
        return "asyncssh.auth._ServerPublicKeyAuth or _server_auth_handlers is gone"
    current = handlers.get(b"publickey")
    if current is not base and not getattr(current, "_medbroker_mfa", False):
        return f"asyncssh's publickey server handler is {current!r}, not _ServerPublicKeyAuth"
    try:
        params = inspect.signature(server_auth.send_failure).parameters
    except (TypeError, ValueError):
        return "ServerAuth.send_failure cannot be inspected"
    if "partial_success" not in params:
        return "ServerAuth.send_failure no longer takes partial_success"
    connection: Any = getattr(asyncssh, "connection", None)
    if getattr(connection, "_USERAUTH_SERVICE", None) != _USERAUTH_SERVICE:
        return "asyncssh.connection._USERAUTH_SERVICE changed"
    try:
        init_source = inspect.getsource(connection.SSHConnection.__init__)
    except (OSError, TypeError, AttributeError):
        init_source = "self._next_service"
    if "self._next_service" not in init_source:
        return "SSHConnection._next_service is gone (needed for paramiko's second service request)"
    if not inspect.iscoroutinefunction(base.send_success) or not inspect.iscoroutinefunction(base._start):
        return "_ServerPublicKeyAuth.send_success/_start are no longer coroutines"
    try:
        source = inspect.getsource(base._start)
    except (OSError, TypeError):  # installed without sources: the regression test covers this case
        source = "send_success"
    if "send_success" not in source:
        return "_ServerPublicKeyAuth._start no longer calls send_success"
    return base, handlers


def _make_handler(base: type) -> type:
    class KeyThenCodeAuth(base):  # type: ignore[misc, valid-type]
        """asyncssh's publickey handler, except that a verified key may be only the first factor."""

        _medbroker_mfa = True

        async def send_success(self) -> None:
            # Reached only after asyncssh verified the signature over the session id (auth.py _start).
            owner = self._conn.get_owner()
            needed = getattr(owner, OWNER_METHOD, None)
            if needed is not None and needed():
                # The connection's methods list now names keyboard-interactive only (the owner's
                # public_key_auth_supported() turned False), so the client asks for the code next.
                self.send_failure(partial_success=True)
                # paramiko sends a fresh "ssh-userauth" service request before each method; OpenSSH's
                # sshd accepts that, asyncssh only accepts the first one: allow one more.
                if getattr(self._conn, "_next_service", _MISSING) is None:
                    self._conn._next_service = _USERAUTH_SERVICE
                return
            await super().send_success()

    return KeyThenCodeAuth


def install_mfa_hook() -> HookStatus:
    """Install the hook once per process (idempotent); returns whether key + TOTP can be enforced.

    Servers whose ``SSHServer`` has no ``second_factor_needed()`` method behave exactly as before.
    When asyncssh's private API changed, nothing is installed and the status says why; the broker then
    refuses users with TOTP enrolled instead of letting a key alone in (fail closed).
    """
    global _status
    if _status is not None and _status.active:
        return _status
    version = getattr(asyncssh, "__version__", "?")
    found = _check_private_api()
    if isinstance(found, str):
        _status = HookStatus(False, found, version)
        log.error("key + TOTP cannot be enforced with asyncssh %s: %s; users with TOTP enrolled are refused "
                  "(see docs/mfa.md)", version, found)
        return _status
    base, handlers = found
    if not getattr(handlers[b"publickey"], "_medbroker_mfa", False):
        handlers[b"publickey"] = _make_handler(base)
    if version not in TESTED_ASYNCSSH:
        log.warning("the key + TOTP hook was verified with asyncssh %s, this is %s; run tests/test_mfa.py",
                    ", ".join(TESTED_ASYNCSSH), version)
    _status = HookStatus(True, "installed", version)
    return _status


def mfa_hook_status() -> HookStatus:
    """The hook's state in this process (not installed yet counts as inactive)."""
    if _status is None:
        return HookStatus(False, "not installed (install_mfa_hook() runs when the server starts)",
                          getattr(asyncssh, "__version__", "?"))
    return _status
