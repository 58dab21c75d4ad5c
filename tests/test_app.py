"""broker/app.py: `init` creates a private broker home idempotently; `check` reports what is wrong and changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from broker.audit import EVENTS
from broker.app import ALERT_EVENTS, App, CheckResult, check_home, default_policy_file, init_home, open_app
from broker.clock import FakeClock
from broker.config import DEFAULT_CONFIG_TOML
from broker.errors import ConfigError, StorageError
from broker.grants import GrantRules
from broker.keys import sign_hex


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and directory under root: mode and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[rel] = (mode(p), digest)
    out["."] = (mode(root), "dir")
    return out


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    app = init_home(h, clock=FakeClock())
    app.close()
    return h


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def failing(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.detail for r in results if not r.ok}


# ---------------------------------------------------------------- init


def test_init_creates_a_private_home(tmp_path: Path) -> None:
    h = tmp_path / "new" / "home"
    old = os.umask(0o022)
    try:
        app = init_home(h)
    finally:
        os.umask(old)
    try:
        assert isinstance(app, App) and app.home == h.resolve()
        assert (h / "broker.toml").read_text() == DEFAULT_CONFIG_TOML
        for d in (h, h / "keys", h / "recordings"):
            assert d.is_dir() and mode(d) == 0o700, d
        for key in ("keys/host_ed25519", "keys/signing_ed25519.pem", "keys/data.key"):
            assert mode(h / key) == 0o600, key
        assert (h / "keys" / "host_ed25519.pub").read_text().startswith("ssh-ed25519 ")
        assert app.store.schema_version() > 0
        assert app.keys.current()[0]
        assert app.rules == GrantRules(8 * 3600, 24 * 3600, 2)
    finally:
        app.close()


def test_init_twice_changes_nothing(home: Path) -> None:
    before = snapshot(home)
    init_home(home, clock=FakeClock()).close()
    assert snapshot(home) == before


def test_init_keeps_an_existing_config_and_keys(tmp_path: Path) -> None:
    h = tmp_path / "home"
    h.mkdir()
    (h / "broker.toml").write_text('[grants]\nmax_duration = "4h"\n')
    app = init_home(h)
    try:
        assert app.config.grants.max_duration == "4h" and app.rules.max_duration_s == 4 * 3600
    finally:
        app.close()
    key = (h / "keys" / "data.key").read_bytes()
    init_home(h).close()
    assert (h / "keys" / "data.key").read_bytes() == key


def test_init_refuses_a_broken_existing_config(tmp_path: Path) -> None:
    h = tmp_path / "home"
    h.mkdir()
    (h / "broker.toml").write_text("[listen]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="listen.bogus"):
        init_home(h)
    assert not (h / "keys" / "data.key").exists()


def test_init_where_a_file_is_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError) as info:
        init_home(blocker / "home")
    assert "--home" in info.value.hint


def test_open_app_on_a_directory_that_is_not_a_home(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_app(tmp_path)
    assert "not a medbroker home" in info.value.message
    assert f"medbroker --home {tmp_path} init" in info.value.hint


# ---------------------------------------------------------------- app services


def test_signing_key_verifies_its_own_signatures(home: Path) -> None:
    app = open_app(home)
    try:
        sig = sign_hex(app.signing_key, b"7:abc")
        assert app.verify_signature(b"7:abc", sig)
        assert not app.verify_signature(b"7:abd", sig)
    finally:
        app.close()


def test_alert_events_go_to_the_alerts_file(home: Path) -> None:
    app = open_app(home, clock=FakeClock())
    try:
        app.audit.record("request.created", user="alice")
        app.audit.record("sftp.denied", user="alice", device="ct-01", path="/data/dicom/x.dcm")
        app.audit.record("auth.lockout", user="mallory", source="203.0.113.5")
    finally:
        app.close()
    lines = [json.loads(x) for x in (home / "alerts.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["sftp.denied", "auth.lockout"]
    assert lines[0]["details"] == {"path": "/data/dicom/x.dcm"} and lines[0]["id"] == 2


def test_alert_events_are_catalogued() -> None:
    assert all(e in EVENTS for e in ALERT_EVENTS)


# ---------------------------------------------------------------- check


def test_check_a_fresh_home_passes_and_changes_nothing(home: Path) -> None:
    before = snapshot(home)
    results = check_home(home)
    assert failing(results) == {}
    names = [r.name for r in results]
    assert names == ["config", "host key", "signing key", "data key", "database", "recordings", "policy",
                     "forward ports"]
    assert "schema" in by_name(results)["database"].detail
    assert by_name(results)["policy"].detail == str(default_policy_file())
    assert snapshot(home) == before


def test_check_reports_a_missing_key(home: Path) -> None:
    (home / "keys" / "signing_ed25519.pem").unlink()
    before = snapshot(home)
    bad = failing(check_home(home))
    assert "signing_ed25519.pem is missing; run: medbroker init" in bad["signing key"]
    assert "signing key" in bad["key material"]
    assert set(bad) == {"signing key", "key material"}
    assert snapshot(home) == before


@pytest.mark.parametrize("key,label", [("keys/data.key", "data key"), ("keys/host_ed25519", "host key"),
                                       ("keys/signing_ed25519.pem", "signing key")])
def test_check_reports_a_world_readable_key(home: Path, key: str, label: str) -> None:
    (home / key).chmod(0o644)
    bad = failing(check_home(home))
    assert bad == {label: f"{home / key} is readable by others; run: chmod 600 {home / key}"}


def test_check_reports_an_unknown_config_key(home: Path) -> None:
    with open(home / "broker.toml", "a") as fh:
        fh.write("\n[recording]\nencrypted = true\n")  # duplicate table -> TOML error
    results = check_home(home)
    assert [r.name for r in results] == ["config"] and not results[0].ok
    (home / "broker.toml").write_text(DEFAULT_CONFIG_TOML.replace("encrypt = true", "encrypted = true"))
    results = check_home(home)
    assert [(r.name, r.ok) for r in results] == [("config", False)]
    assert "unknown key recording.encrypted" in results[0].detail
    assert "known keys in [recording]" in results[0].detail


def test_check_reports_a_missing_database_without_creating_it(home: Path) -> None:
    for p in home.glob("medbroker.db*"):
        p.unlink()
    before = snapshot(home)
    bad = failing(check_home(home))
    assert set(bad) == {"database"}
    assert "medbroker init" in bad["database"]
    assert snapshot(home) == before, "check must not create the database"


def test_check_reports_a_database_without_schema(home: Path) -> None:
    for p in home.glob("medbroker.db*"):
        p.unlink()
    conn = sqlite3.connect(home / "medbroker.db")
    conn.execute("CREATE TABLE unrelated (x)")
    conn.commit()
    conn.close()
    bad = failing(check_home(home))
    assert bad == {"database": f"{home / 'medbroker.db'} has no schema; run: medbroker init"}


def test_check_reports_a_database_that_is_not_one(home: Path) -> None:
    for p in home.glob("medbroker.db*"):
        p.unlink()
    (home / "medbroker.db").write_bytes(b"definitely not sqlite " * 200)
    bad = failing(check_home(home))
    assert set(bad) == {"database"}


def test_check_reports_recordings_that_are_a_file(home: Path) -> None:
    (home / "recordings").rmdir()
    (home / "recordings").write_text("oops")
    bad = failing(check_home(home))
    assert bad == {"recordings": f"{home / 'recordings'} is not a directory; run: medbroker init"}


def test_check_reports_a_missing_policy_file(home: Path) -> None:
    text = (home / "broker.toml").read_text().replace('protected_paths_file = ""', 'protected_paths_file = "pp.toml"')
    (home / "broker.toml").write_text(text)
    assert failing(check_home(home)) == {"policy": f"{home / 'pp.toml'} is missing"}


def test_check_on_a_directory_that_is_not_a_home(tmp_path: Path) -> None:
    results = check_home(tmp_path)
    assert [(r.name, r.ok) for r in results] == [("config", False)]
    assert "medbroker init" in results[0].detail
    assert list(tmp_path.iterdir()) == []


@pytest.mark.root
def test_check_reports_a_full_recordings_disk(home: Path) -> None:
    """A 1 MiB tmpfs on recordings/, filled to the brim: check says it is not writable."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    rec = home / "recordings"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(rec)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        small = failing(check_home(home))
        assert set(small) == {"recordings"} and "KiB free; sessions will be refused" in small["recordings"]
        with open(rec / "filler", "wb", buffering=0) as fh:
            try:
                for _ in range(1024):  # bounded: at most 4 MiB of writes into a 1 MiB filesystem
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        full = failing(check_home(home))
        assert full == {"recordings": f"{rec} is not writable (No space left on device); sessions will be refused"}
        assert sorted(p.name for p in rec.iterdir()) == ["filler"], "the probe file was removed"
    finally:
        subprocess.run(["umount", str(rec)], capture_output=True, timeout=30, check=True)
