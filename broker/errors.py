"""The broker's error tree, defined in medcore/errors.py (layer 0, shared with sessions/); re-exported here
so ``from broker.errors import …`` keeps working for the broker and for users."""

from __future__ import annotations

from medcore.errors import (
    ApprovalRequiredError,
    BrokerError,
    ConfigError,
    ConflictError,
    DeviceUnreachableError,
    GrantExpiredError,
    HostKeyMismatchError,
    NotFoundError,
    PermissionDeniedError,
    RecordingError,
    StorageError,
    UsageError,
)

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
