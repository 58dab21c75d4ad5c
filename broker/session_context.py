"""What a device session is handed from above: who/what/where as frozen values, and the broker's services.

The path of a session runs one way. ``BrokerServer`` (broker/server.py) authenticates a vendor and keeps the
result as a :class:`VendorLogin`; when the vendor opens a channel to a device it decides the grant and builds a
:class:`SessionIdentity` from that login, the device and the grant. ``LiveSession`` (broker/live.py) and the
per-channel glue (broker/channels.py) receive that value and a :class:`SessionServices` (the ``Broker``
implements it); they never import the server module or read anything back from the server object.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Protocol

from broker.devices import Device
from broker.grants import Grant

if TYPE_CHECKING:  # pragma: no cover
    from broker.app import App

__all__ = ["SessionIdentity", "SessionServices", "SessionSettings", "VendorLogin", "new_session_id"]


def new_session_id(now: datetime) -> str:
    """Sortable, readable session ids: ``20261128-141530-3fa2c1``."""
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@dataclass(frozen=True)
class VendorLogin:
    """Who is connected, as authentication established it (set once, when authentication completes).

    ``device`` is the device name of a ``USER@DEVICE`` login, None for a self-service login (``alice@broker``);
    ``via`` is ``"proxyjump"`` for the inner login of ``ssh -J`` (broker/jump.py).
    """

    user: str
    role: str | None
    key: str | None  # the OpenSSH fingerprint of the key the vendor logged in with
    source: str  # the vendor's address
    device: str | None
    via: str | None = None

    def audit_fields(self) -> dict[str, Any]:
        """The audit columns of an event about this connection: ``user``, ``device`` (name), ``source``."""
        return dict(user=self.user, device=self.device, source=self.source)


@dataclass(frozen=True)
class SessionIdentity:
    """Who, what and where of one device session: the id, the vendor's login, the device and the grant."""

    session_id: str
    user: str
    role: str | None
    key: str | None
    source: str
    via: str | None
    device: Device
    grant: Grant

    @classmethod
    def for_login(cls, login: VendorLogin, device: Device, grant: Grant, now: datetime) -> "SessionIdentity":
        """A new session (a new id) of ``login`` on ``device`` under ``grant``."""
        return cls(session_id=new_session_id(now), user=login.user, role=login.role, key=login.key,
                   source=login.source, via=login.via, device=device, grant=grant)

    def audit_fields(self, *, source: bool = False, grant: bool = True) -> dict[str, Any]:
        """The audit columns of an event in this session: ``user``, ``device`` (name), ``session_id`` and
        ``grant_id``; ``source`` too when asked (events about the connection: start, refusals), ``grant_id``
        left out when not (the device events that never named it)."""
        fields: dict[str, Any] = dict(user=self.user, device=self.device.name, session_id=self.session_id)
        if grant:
            fields["grant_id"] = self.grant.id
        if source:
            fields["source"] = self.source
        return fields

    def via_fields(self) -> dict[str, Any]:
        """``{"via": ...}`` for a session reached through ProxyJump, else nothing (rows and events say it only then)."""
        return {"via": self.via} if self.via else {}


@dataclass(frozen=True)
class SessionSettings:
    """What live sessions need from the configuration."""

    recordings_dir: Path
    strict: bool
    encrypt: bool
    warnings_s: tuple[int, ...]
    connect_timeout_s: int
    keepalive_s: int
    max_channels: int
    public_host: str
    port: int

    def with_port(self, port: int) -> "SessionSettings":
        return replace(self, port=port)


class SessionServices(Protocol):
    """What a live session may ask of the process that runs it (the ``Broker`` in broker/server.py).

    Store access goes through :meth:`db` (the single store thread) and :meth:`audit`; the HA issue swaps
    what stands behind them, not their callers.
    """

    app: "App"  # config, store, keys, clock, signing key of this broker home
    settings: SessionSettings
    pid: int
    node_id: str  # the cluster node this process belongs to (broker/nodes.py); sessions rows carry it
    default_protected: tuple[Any, ...]  # the broker-wide protected paths (sessions/policy.py)
    live: dict[str, Any]  # this process's running sessions by id: a session adds itself once started

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous domain call on the store thread."""

    async def audit(self, event: str, **fields: Any) -> None:
        """Append an audit row off the event loop."""

    def audit_soon(self, event: str, **fields: Any) -> None:
        """Audit from a synchronous callback (ordering kept by the single store thread)."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` in the background; the broker waits for it at shutdown."""

    def policy_for(self, live: Any) -> Any:
        """The per-channel policy of one live session (broker/channels.py ``SessionPolicy``)."""
