"""Synthetic sessions for the staff-toolkit tests: a real home, real grants, recordings written by RecordingWriter."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from broker.app import App, init_home
from broker.cli import app as cli_app
from broker.clock import FakeClock, utc_iso
from broker.devices import add_device
from broker.grants import approve_request, request_grant
from broker.identity import add_user, get_principal
from broker.indexer import session_rows
from sessions.recording import DATA_KINDS, sign_final_hash
from sessions.recwriter import RecordingWriter
from sessions.textindex import index_recording

__all__ = ["StaffHome", "make_staff_home", "DEVICE_HOST_KEY"]

DEVICE_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
_runner = CliRunner()


@dataclass
class StaffHome:
    """A broker home with alice (vendor, Acme Imaging), bob and dave (approvers), carol (security), devices
    ct-01 (standard) and mri-01 (critical), and helpers to record finished sessions."""

    app: App
    path: Path

    def cli(self, *args: str, code: int = 0):
        """Run ``medbroker --home PATH ARGS`` in-process; asserts the exit code."""
        r = _runner.invoke(cli_app, ["--home", str(self.path), *args])
        assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
        assert r.exit_code == code, f"{args} -> {r.exit_code}\n{r.stdout}\n{r.stderr}"
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def grant(self, *, user: str = "alice", device: str = "ct-01", reason: str = "tube replacement",
              ticket: str | None = "WO-1234", approvers: tuple[str, ...] = ("bob",), now: datetime | None = None):
        now = now or self.app.clock.now()
        req = request_grant(self.app.store, self.app.audit, self.app.rules, get_principal(self.app.store, user),
                            device, 3600, reason, now, ticket=ticket)
        decision = None
        for name in approvers:
            decision = approve_request(self.app.store, self.app.audit, self.app.rules, req.id,
                                       get_principal(self.app.store, name), now)
        assert decision is not None and decision.grant is not None
        return decision.grant

    def record_session(self, session_id: str, script: list[tuple[float, str, int, Any]], *, grant_id: int,
                       user: str = "alice", device: str = "ct-01", started: datetime | None = None,
                       status: str = "closed", encrypt: bool = True, index: bool = True) -> dict[str, Any]:
        """Write a closed, signed recording from (seconds to wait, kind, channel, bytes or event) steps and
        store its session row, command index and search text like the broker does at session end."""
        started = started or self.app.clock.now()
        clock = FakeClock(started)
        path = self.app.config.recordings_dir / f"{session_id}.mbr"
        header = {"session_id": session_id, "user": user, "device": device, "grant_id": grant_id,
                  "source": "127.0.0.1:50000", "started_at": utc_iso(started)}
        key_id, key = self.app.keys.current() if encrypt else (None, None)
        w = RecordingWriter(path, header, clock=clock, aead_key=key, key_id=key_id)
        for wait, kind, channel, value in script:
            clock.advance(wait)
            if kind in DATA_KINDS:
                w.append_data(channel, kind, value)
            else:
                w.append_event(channel, kind, value)
            if w.paused:  # the relay stops reading here; a script of big frames waits for the writer likewise
                w.drain(30)
        final = w.close(status)
        signature = sign_final_hash(self.app.signing_key, final)
        store = self.app.store
        store.insert_session({"id": session_id, "user_name": user, "device": device, "grant_id": grant_id,
                              "source": "127.0.0.1:50000", "started_at": utc_iso(started), "status": "live",
                              "recording": str(path), "broker_pid": 1, "last_activity_at": utc_iso(started)})
        ended = clock.now()
        store.update_session(session_id, ended_at=utc_iso(ended), status=status, end_reason="vendor disconnected",
                             final_hash=final, signature=signature, bytes_in=w.bytes_in, bytes_out=w.bytes_out)
        self.app.audit.record("session.end", user=user, device=device, session_id=session_id, grant_id=grant_id,
                              status=status, final_hash=final)
        if index:
            rows = session_rows(index_recording(path, self.app.keys.get))  # what the broker's indexer runs
            store.save_session_text(session_id, rows.commands, rows.texts, utc_iso(ended))
        return store.get_session(session_id)

    def sql(self, statement: str, params: tuple = ()) -> list[tuple]:
        """Run raw SQL on the database file, as an attacker or a test fixture would."""
        conn = sqlite3.connect(self.path / "medbroker.db")
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    def close(self) -> None:
        self.app.close()


def make_staff_home(tmp_path: Path, config: str | None = None) -> StaffHome:
    home = tmp_path / "home"
    if config is not None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "broker.toml").write_text(config)
    app = init_home(home)
    now = datetime.now(timezone.utc) - timedelta(seconds=5)
    for name, role, company in (("alice", "vendor", "Acme Imaging"), ("bob", "approver", None),
                                ("dave", "approver", None), ("carol", "security", None)):
        add_user(app.store, name, role, company, now)
    key_text = _device_key_text()
    for name, cls in (("ct-01", "standard"), ("mri-01", "critical")):
        add_device(app.store, app.audit, app.keys, name=name, host="127.0.0.1", port=22, login="service",
                   host_key=DEVICE_HOST_KEY, now=now, key_text=key_text, device_class=cls,
                   description=f"{name} in radiology")
    return StaffHome(app, home)


def _device_key_text() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
