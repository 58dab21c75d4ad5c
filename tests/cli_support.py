"""Shared by the CLI tests: a broker home driven through CliRunner, and fixtures for people and devices."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app

__all__ = ["Home", "runner", "keys", "home", "people", "device_key", "world", "request_id"]

runner = CliRunner()


class Home:
    """One broker home driven through the CLI, with a few read-only DB helpers for assertions."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *args: str, input: str | None = None):
        result = runner.invoke(app, ["--home", str(self.path), *args], input=input)
        assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
        assert "\x1b[" not in result.stdout, "colour codes on a non-terminal stdout"
        return result

    def ok(self, *args: str, input: str | None = None):
        result = self.run(*args, input=input)
        assert result.exit_code == 0, f"{args} -> {result.exit_code}\n{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str, input: str | None = None):
        return json.loads(self.ok(*args, "--json", input=input).stdout)

    def fails(self, code: int, *args: str, input: str | None = None):
        result = self.run(*args, input=input)
        assert result.exit_code == code, f"{args} -> {result.exit_code}\n{result.stdout}\n{result.stderr}"
        assert result.stderr.startswith("Error: "), result.stderr
        return result

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.path / "medbroker.db")
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def count(self, table: str) -> int:
        return self.rows(f"SELECT count(*) FROM {table}")[0][0]

    def events(self, name: str) -> list[tuple]:
        return self.rows("SELECT actor, user_name, device, request_id, grant_id, details FROM audit_events "
                         "WHERE event = ? ORDER BY id", (name,))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """ssh-keygen key pairs shared by this module's tests (read-only): name -> KeyPair."""
    from helpers import missing_openssh_binaries
    from helpers.keys import generate_keypair

    if "ssh-keygen" in missing_openssh_binaries():
        pytest.skip("ssh-keygen is missing")
    directory = tmp_path_factory.mktemp("keys")
    return {name: generate_keypair(directory, name) for name in ("alice", "laptop", "device", "host", "host2")}


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path / "home")
    h.ok("init")
    return h


@pytest.fixture
def people(home, keys) -> Home:
    """alice (vendor, with a key), bob and dave (approvers), carol (security), root (admin)."""
    home.ok("user", "add", "alice", "--role", "vendor", "--key", str(keys["alice"].public_path),
            "--company", "Acme Imaging")
    for name, role in (("bob", "approver"), ("dave", "approver"), ("carol", "security"), ("root", "admin")):
        home.ok("user", "add", name, "--role", role)
    return home


@pytest.fixture
def device_key(keys):
    return keys["device"]


@pytest.fixture
def world(people, device_key, keys) -> Home:
    """people plus ct-01 (standard) and mri-01 (critical)."""
    hk = keys["host"].public_key
    people.ok("device", "add", "ct-01", "--host", "127.0.0.1", "--login", "service", "--key",
              str(device_key.private_path), "--host-key", hk, "--protect", "/data/dicom")
    people.ok("device", "add", "mri-01", "--host", "127.0.0.1", "--login", "service", "--key",
              str(device_key.private_path), "--host-key", hk, "--class", "critical")
    return people


def request_id(h: Home, *extra: str, device: str = "ct-01", user: str = "alice") -> int:
    doc = h.json("request", device, "--user", user, "--for", "2h", "--reason", "tube replacement", *extra)
    return doc["id"]
