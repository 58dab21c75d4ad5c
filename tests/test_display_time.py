"""Times shown to people are in the display zone ([display] timezone, default the host's); JSON stays UTC."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.clock import display_zone, local_text
from broker.config import load_config
from broker.errors import ConfigError

runner = CliRunner()


def test_local_text_in_zones():
    t = "2026-11-28T14:30:05.123456Z"
    assert local_text(t, display_zone("UTC")) == "2026-11-28 14:30:05Z"
    assert local_text(t, display_zone("Asia/Shanghai")) == "2026-11-28 22:30:05 CST"
    assert local_text(t, display_zone("Europe/Berlin"), seconds=False) == "2026-11-28 15:30 CET"
    summer = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)
    assert local_text(summer, display_zone("Europe/Berlin")) == "2026-07-01 14:00:00 CEST"
    assert local_text(None) == "-" and local_text("not a time") == "not a time"


def test_bad_zone_is_a_config_error(tmp_path):
    (tmp_path / "broker.toml").write_text('[display]\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "broker.toml")
    assert "display.timezone" in exc.value.message and "Mars/Olympus" in exc.value.message


def test_cli_and_report_show_the_display_zone_json_keeps_utc(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "broker.toml").write_text('[display]\ntimezone = "Asia/Shanghai"\n')
    assert runner.invoke(app, ["--home", str(home), "init"]).exit_code == 0
    assert runner.invoke(app, ["--home", str(home), "user", "add", "alice", "--role", "vendor"]).exit_code == 0
    r = runner.invoke(app, ["--home", str(home), "user", "show", "alice", "--json"])
    created = json.loads(r.stdout)["created_at"]
    assert created.endswith("Z")  # JSON: UTC
    shown = runner.invoke(app, ["--home", str(home), "user", "show", "alice"]).stdout
    assert local_text(created, display_zone("Asia/Shanghai")) in shown and " CST" in shown
    out = tmp_path / "r.md"
    r = runner.invoke(app, ["--home", str(home), "report", "--from", "2026-01-01", "--to", "2030-01-01",
                            "--format", "md", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert " CST" in out.read_text() and "2026-01-01 08:00:00 CST" in out.read_text()  # midnight UTC, +8


def test_vendor_messages_give_utc_and_the_local_time():
    from broker.clock import clock_text

    t = datetime(2026, 11, 28, 14, 30, 5, tzinfo=timezone.utc)
    assert clock_text(t, display_zone("UTC")) == "14:30:05 UTC"
    assert clock_text(t, display_zone("Asia/Shanghai")) == "14:30:05 UTC (22:30 CST)"
    assert clock_text(t, display_zone("Europe/Berlin"), seconds=False) == "14:30 UTC (15:30 CET)"
