"""The broker under test: a real medbroker home and SSH server in-process, plus a real sshd device."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.app import App, init_home
from broker.devices import add_device
from broker.grants import approve_request, request_grant
from broker.identity import add_user, add_user_key, get_principal
from broker.listener import start_server, stop_server
from broker.server import Broker
from helpers.clients import ProcResult, run_ssh, write_known_hosts
from helpers.keys import KeyPair, generate_keypair
from helpers.pty import PtySession
from helpers.sshd import SshdDevice

__all__ = ["BrokerHarness", "World"]


class BrokerHarness:
    """``medbroker serve`` on 127.0.0.1:0 in a background event-loop thread of this process."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="broker-loop", daemon=True)
        self.broker: Broker | None = None
        self._acceptor = None

    def call(self, coro, timeout: float = 30.0) -> Any:
        """Run a coroutine on the broker's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "BrokerHarness":
        self.thread.start()
        self._acceptor, self.broker = self.call(start_server(self.app, "127.0.0.1:0"))
        return self

    @property
    def port(self) -> int:
        assert self.broker is not None
        return self.broker.port

    def live_count(self) -> int:
        return self.call(_count(self.broker))

    def stop(self) -> None:
        if self.loop.is_closed():  # stopped already (a test stopped the broker itself)
            return
        if self._acceptor is not None:
            self.call(stop_server(self._acceptor, self.broker))
            self._acceptor = None

        async def _shutdown() -> None:
            await asyncio.sleep(0)
            await self.loop.shutdown_asyncgens()

        self.call(_shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _count(broker: Broker) -> int:
    return len(broker.live)


@dataclass
class World:
    """A home with alice (vendor), bob and dave (approvers), carol (security); device ct-01; a broker."""

    tmp: Path
    device: SshdDevice
    app: App = field(init=False)
    harness: BrokerHarness = field(init=False)
    keys: dict[str, KeyPair] = field(default_factory=dict)
    known_hosts: Path = field(init=False)

    def setup(self, *, config: str | None = None, protect: tuple[str, ...] | None = None) -> "World":
        home = self.tmp / "home"
        if config is not None:
            home.mkdir(parents=True, exist_ok=True)
            (home / "broker.toml").write_text(config)
        self.app = init_home(home)
        now = self.app.clock.now()
        for name, role in (("alice", "vendor"), ("bob", "approver"), ("dave", "approver"), ("carol", "security")):
            self.keys[name] = generate_keypair(self.tmp / "people", name)
            add_user(self.app.store, name, role, "Acme Imaging" if role == "vendor" else None, now)
            add_user_key(self.app.store, name, self.keys[name].public_key, now)
        tree = self.device.tree
        if protect is None:
            protect = (str(tree.root / "data" / "dicom"),) if tree is not None else ()
            if self.device.exposed:  # every patient directory of the tree, so containment is about all of them
                protect = tuple(str(p) for p in self.device.patient_dirs)
        add_device(self.app.store, self.app.audit, self.app.keys, name="ct-01", host=self.device.host,
                   port=self.device.port, login=self.device.login, host_key=self.device.host_key_line, now=now,
                   key_text=Path(self.device.client_key.private_path).read_text(), protect=protect)
        self.harness = BrokerHarness(self.app).start()
        host_key = (home / "keys" / "host_ed25519.pub").read_text()
        self.known_hosts = write_known_hosts(self.tmp / "known_hosts", "127.0.0.1", self.port, host_key)
        return self

    @property
    def port(self) -> int:
        return self.harness.port

    def grant(self, seconds: int = 3600, *, user: str = "alice", device: str = "ct-01", approver: str = "bob",
              second: str = "dave", **kwargs: Any):
        """Request and approve through the domain layer; returns the Grant.

        When the first approval leaves the request pending (a critical or exposed device needs two
        approvers), ``second`` approves too.
        """
        now = self.app.clock.now()
        req = request_grant(self.app.store, self.app.audit, self.app.rules, get_principal(self.app.store, user),
                            device, seconds, "test work", now, **kwargs)
        decision = approve_request(self.app.store, self.app.audit, self.app.rules, req.id,
                                   get_principal(self.app.store, approver), now)
        if decision.grant is None:
            decision = approve_request(self.app.store, self.app.audit, self.app.rules, req.id,
                                       get_principal(self.app.store, second), now)
        return decision.grant

    def ssh(self, login: str, command: str | None = None, *, key: str | None = None, **kwargs: Any) -> ProcResult:
        """Real OpenSSH ``ssh`` to the broker as ``login`` (e.g. ``alice@ct-01``) with that person's key."""
        who = key or login.split("@")[0]
        return run_ssh(login, "127.0.0.1", self.port, self.keys[who].private_path, command,
                       known_hosts=self.known_hosts, **kwargs)

    def pty(self, login: str, command: str | None = None, **kwargs: Any) -> PtySession:
        who = login.split("@")[0]
        return PtySession.spawn_ssh(login, "127.0.0.1", self.port, self.keys[who].private_path, command,
                                    known_hosts=self.known_hosts, **kwargs)

    def events(self, name: str | None = None) -> list[dict]:
        return self.app.store.audit_rows(event=name)

    def close(self) -> None:
        self.harness.stop()
        self.app.close()
