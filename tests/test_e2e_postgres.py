"""End to end on PostgreSQL: a broker whose [store] url is a real PostgreSQL serves a vendor session through a
real sshd device (stock OpenSSH client); `audit verify` and `sessions list --json` then read it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from broker.cli import app as cli_app
from broker.store import open_store
from helpers import poll

pytestmark = pytest.mark.openssh
runner = CliRunner()


def test_a_broker_on_postgresql_serves_records_and_verifies(tmp_path: Path, device: Callable[..., Any],
                                                            pg_url: str) -> None:
    from helpers.broker import World

    w = World(tmp_path, device()).setup(config=f'[store]\nurl = "{pg_url}"\n')
    home = tmp_path / "home"
    try:
        assert w.app.store.dialect == "postgresql"
        grant = w.grant()
        r = w.ssh("alice@ct-01", "echo hello-from-; echo ct01")
        assert r.returncode == 0, r.stderr
        assert b"hello-from-\nct01" in r.stdout
        assert poll(lambda: [s for s in w.app.store.list_sessions() if s["status"] != "live"], timeout=20)
    finally:
        w.close()
    assert not (home / "medbroker.db").exists()  # the state went to PostgreSQL, not to a file in the home

    verify = runner.invoke(cli_app, ["--home", str(home), "audit", "verify", "--json"])
    assert verify.exit_code == 0, verify.output
    doc = json.loads(verify.stdout)
    assert doc["ok"] and doc["audit"]["ok"] and doc["audit"]["rows"] >= 8
    assert doc["counts"]["ok"] == 1 and doc["counts"]["broken"] == 0

    listed = runner.invoke(cli_app, ["--home", str(home), "sessions", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)["sessions"]
    assert len(rows) == 1
    session = rows[0]
    assert session["user"] == "alice" and session["device"] == "ct-01" and session["status"] == "closed"
    assert session["grant_id"] == grant.id and session["duration_s"] is not None

    checked = runner.invoke(cli_app, ["--home", str(home), "check"])
    assert "postgresql://medbroker@/" in checked.output and "(schema " in checked.output

    backup = runner.invoke(cli_app, ["--home", str(home), "backup", "-o", str(tmp_path / "bk")])
    assert backup.exit_code == 1 and "PostgreSQL" in backup.output and "pg_dump" in backup.output
    assert not (tmp_path / "bk").exists()  # refused before writing anything

    other = open_store(pg_url, migrate=False)  # any node reading the same database sees the same session
    try:
        events = [r["event"] for r in other.audit_rows()]
        assert "session.start" in events and "session.end" in events
        assert other.get_session(session["id"])["bytes_out"] > 0
    finally:
        other.close()
