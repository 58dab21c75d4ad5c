"""The broker's error tree: every error carries a human message and a next-step hint."""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "UsageError",
    "NotFoundError",
    "PermissionDeniedError",
    "ApprovalRequiredError",
    "GrantExpiredError",
    "DeviceUnreachableError",
    "HostKeyMismatchError",
    "RecordingError",
    "StorageError",
    "ConflictError",
]


class BrokerError(Exception):
    """Root of every error medbroker raises on purpose.

    :param message: what failed, naming the offending value
    :param hint: the next step for the person reading it (optional)
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ConfigError(BrokerError):
    """Broken or unknown configuration (exit 2)."""

    exit_code = 2


class UsageError(BrokerError):
    """Malformed input from a person: bad duration, bad name (exit 2)."""

    exit_code = 2


class NotFoundError(BrokerError):
    """A named user, device, request, grant or session does not exist."""


class PermissionDeniedError(BrokerError):
    """The principal may not do this (role, own request, disabled user)."""


class ConflictError(BrokerError):
    """The thing is in the wrong state (already decided, already exists)."""


class ApprovalRequiredError(BrokerError):
    """No active approved grant covers this user and device now."""


class GrantExpiredError(BrokerError):
    """The grant or request has expired or was revoked."""


class DeviceUnreachableError(BrokerError):
    """The device did not answer, refused us, or timed out."""


class HostKeyMismatchError(DeviceUnreachableError):
    """The device presented a host key other than the pinned one."""


class RecordingError(BrokerError):
    """The session cannot be recorded (fail closed)."""


class StorageError(BrokerError):
    """The database or a file under the broker home failed."""
