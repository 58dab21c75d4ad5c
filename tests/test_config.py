"""broker/config.py: loading broker.toml, every key and its validation, durations, listen addresses, shipped files."""

from __future__ import annotations

import dataclasses
import string
import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.config import (
    DEFAULT_CONFIG_TOML,
    BrokerConfig,
    load_config,
    parse_duration,
    parse_listen,
    format_duration,
    _SECTIONS,
)
from broker.errors import ConfigError, UsageError

from helpers import FUZZ_EXAMPLES_OTHER

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> BrokerConfig:
    return load_config(write(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert info.value.exit_code == 2
    return info.value


# ---------------------------------------------------------------- defaults


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    assert cfg == BrokerConfig(home=tmp_path.resolve())
    assert cfg.listen.address == "0.0.0.0:2222"
    assert cfg.recording.mode == "strict"
    assert cfg.grants.critical_approvers == 2
    assert cfg.retention.days == 180
    assert cfg.db_path == tmp_path.resolve() / "medbroker.db"
    assert cfg.recordings_dir == tmp_path.resolve() / "recordings"


def test_default_config_toml_parses_to_the_defaults(tmp_path: Path) -> None:
    """The commented file `medbroker init` writes says exactly what the defaults are."""
    cfg = load_text(tmp_path, DEFAULT_CONFIG_TOML)
    assert cfg == BrokerConfig(home=tmp_path.resolve())


def test_default_config_toml_mentions_every_key() -> None:
    for section, cls in _SECTIONS.items():
        assert f"[{section}]" in DEFAULT_CONFIG_TOML
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} = " in DEFAULT_CONFIG_TOML, f"{section}.{f.name} missing from DEFAULT_CONFIG_TOML"


def test_home_defaults_to_the_files_directory_and_can_be_overridden(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    other = tmp_path / "elsewhere"
    assert load_config(path).home == tmp_path.resolve()
    assert load_config(path, home=other).home == other.resolve()


def test_relative_and_absolute_paths_resolve_against_home(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[recording]\ndir = "/var/rec"\n')
    assert cfg.recordings_dir == Path("/var/rec")
    assert cfg.path("keys/x") == tmp_path.resolve() / "keys" / "x"


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen.address = "1.2.3.4:22"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.home = tmp_path  # type: ignore[misc]


def test_with_listen_returns_a_copy(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    other = cfg.with_listen("127.0.0.1:0")
    assert other.listen.address == "127.0.0.1:0"
    assert cfg.listen.address == "0.0.0.0:2222"
    with pytest.raises(UsageError):
        cfg.with_listen("nonsense")


def test_durations_are_parsed_once_at_load(tmp_path: Path) -> None:
    """Every duration key (a str in the TOML and on the dataclass) is parsed by load_config; callers get ints."""
    cfg = load_text(tmp_path, '[listen]\nlogin_timeout = "45s"\n[grants]\nmax_duration = "2d"\n')
    duration_keys = {(section, f.name) for section in _SECTIONS
                     for f in dataclasses.fields(getattr(cfg, section))
                     if isinstance(getattr(getattr(cfg, section), f.name), str)
                     and _is_duration(getattr(getattr(cfg, section), f.name))}
    assert duration_keys and duration_keys <= set(cfg.durations)  # nothing left to parse per call
    assert cfg.durations[("listen", "login_timeout")] == 45 == cfg.seconds("listen", "login_timeout")
    assert cfg.seconds("grants", "max_duration") == 2 * 86400
    assert cfg.listen.login_timeout == "45s"  # the config still reads as written (check, docs)
    other = cfg.with_listen("127.0.0.1:0")  # a copy parses on first use, from its own values
    assert other.seconds("listen", "login_timeout") == 45 and other == dataclasses.replace(cfg, listen=other.listen)


def _is_duration(text: str) -> bool:
    try:
        parse_duration(text)
        return True
    except UsageError:
        return False


# ---------------------------------------------------------------- every key

# A non-default valid value for every key of every section.
NON_DEFAULT = {
    "listen": {"address": '"127.0.0.1:2022"', "host_key": '"k/host"', "server_version": '"x"',
               "login_timeout": '"45s"', "keepalive_interval": '"1m"', "public_host": '"jump.example"',
               "workers": "4", "proxy_protocol_from": '["127.0.0.1", "10.0.0.0/24", "fd00::5/128"]'},
    "grants": {"max_duration": '"4h"', "request_ttl": '"2d"', "warnings": '["2m"]', "critical_approvers": "3"},
    "recording": {"dir": '"rec"', "mode": '"best_effort"', "encrypt": "false", "signing_key": '"k/s.pem"',
                  "data_key": '"k/d.key"', "keep_uploads": "true",
                  "journal": "true", "journal_timeout": '"3s"', "journal_keep": "true",
                  "ack_window": '"1MiB"'},
    "upstream": {"connect_timeout": '"5s"', "keepalive_interval": '"15s"'},
    "limits": {"max_auth_failures": "3", "failure_window": '"5m"', "lockout": '"1h"', "max_unauthenticated": "8",
               "max_connections_per_address": "4", "max_channels_per_connection": "2",
               "max_unauthenticated_per_address": "3", "max_startups": '"20:50:90"', "reserved_for_recent": "10",
               "recent_login_window": '"1h"', "penalty_authfail": '"7s"', "penalty_grace": '"9s"',
               "penalty_min": '"11s"', "penalty_max": '"13m"'},
    "policy": {"protected_paths_file": '"pp.toml"', "scan_output": "false", "check_commands": "false",
               "exposed_shell": '"files-only"', "containment_ttl": '"5m"',
               "max_opaque_output": '"1MiB"', "forward_tls": '"allow"'},
    "alerts": {"file": '"a.jsonl"', "webhook_url": '"http://127.0.0.1:9/hook"'},
    "retention": {"days": "365", "allow_below_floor": "true"},
    "web": {"address": '"127.0.0.1:8080"', "public_url": '"https://broker.example"', "link_ttl": '"5m"',
            "idle_timeout": '"15m"', "session_max": '"8h"', "share_max": '"7d"', "tls_cert": '"c.pem"',
            "tls_key": '"k.pem"', "smtp_host": '"127.0.0.1"', "smtp_port": "2525", "smtp_from": '"mb@h.example"',
            "smtp_to": '["biomed@h.example"]', "smtp_starttls": "true", "webhook_url": '"http://127.0.0.1:9/web"',
            "webhook_secret_file": '"hook.secret"'},
    "siem": {"jsonl_file": '"siem/audit.jsonl"', "jsonl_max_bytes": "65536", "jsonl_backups": "2",
             "syslog_address": '"tls://127.0.0.1:6514"', "syslog_app_name": '"mb"', "syslog_hostname": '"jump-1"',
             "syslog_bom": "true", "syslog_sd_id": '"medbroker@12345"', "syslog_ca_file": '"ca.pem"',
             "syslog_client_cert": '"client.pem"', "syslog_client_key": '"client.key"',
             "syslog_server_name": '"siem.example"', "format": '"ecs"'},
    "metrics": {"address": '"127.0.0.1:9464"', "min_free_mb": "10"},
    "display": {"timezone": '"Asia/Shanghai"'},
    "store": {"url": '"postgresql://medbroker@/medbroker?host=/run/postgresql"'},
    "directory": {"url": '"ldap://dc1.hospital.example:389"', "starttls": "true", "ca_file": '"ca.pem"',
                  "bind_dn": '"cn=medbroker,ou=services,dc=h"', "bind_password_file": '"ldap.secret"',
                  "user_base": '"ou=people,dc=h"', "user_filter": '"(uid={name})"', "admin_group": '"cn=a,dc=h"',
                  "security_group": '"cn=s,dc=h"', "approver_group": '"cn=p,dc=h"', "vendor_group": '"cn=v,dc=h"',
                  "ssh_key_attribute": '"sshPublicKey"', "company_attribute": '"company"', "sync_interval": '"1m"',
                  "timeout": '"3s"'},
    "cluster": {"node_id": '"broker-a.site_1"', "heartbeat": '"2s"', "dead_after": '"30s"'},
    "archive": {"url": '"s3://medbroker-recordings/site-a/"', "endpoint": '"http://127.0.0.1:8080"',
                "region": '"eu-central-1"', "access_key_file": '"s3.access"', "secret_key_file": '"s3.secret"',
                "delete_local_after": '"7d"', "part_size": '"64MiB"', "interval": '"5m"', "timeout": '"10s"'},
}
# A [directory] needs url, user_base and a group together.
_DIRECTORY_BASE = {"url": '"ldap://127.0.0.1:389"', "user_base": '"ou=people,dc=h"', "approver_group": '"cn=p,dc=h"'}
# An [archive] needs url and both key files together.
_ARCHIVE_BASE = {"url": '"s3://medbroker-recordings"', "access_key_file": '"a"', "secret_key_file": '"s"'}
# Keys that mean something only together with another: set alone they are refused (an option that would
# do nothing), so the one-key test adds the companion.
COMPANIONS = {
    **{("directory", k): "\n".join(f"{b} = {v}" for b, v in _DIRECTORY_BASE.items() if b != k)
       for k in NON_DEFAULT["directory"]},
    **{("archive", k): "\n".join(f"{b} = {v}" for b, v in _ARCHIVE_BASE.items() if b != k)
       for k in NON_DEFAULT["archive"]},
    ("web", "webhook_secret_file"): 'webhook_url = "http://127.0.0.1:9/web"',
    ("siem", "syslog_ca_file"): 'syslog_address = "tls://127.0.0.1:6514"',
    ("siem", "syslog_client_cert"): 'syslog_address = "tls://127.0.0.1:6514"',
    ("siem", "syslog_client_key"): 'syslog_address = "tls://127.0.0.1:6514"\nsyslog_client_cert = "c.pem"',
    ("siem", "syslog_server_name"): 'syslog_address = "tls://127.0.0.1:6514"',
    ("recording", "journal_keep"): "journal = true",
}


def test_non_default_table_covers_every_key() -> None:
    assert set(NON_DEFAULT) == set(_SECTIONS)
    for section, cls in _SECTIONS.items():
        assert set(NON_DEFAULT[section]) == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("section,key", [(s, k) for s, keys in NON_DEFAULT.items() for k in keys])
def test_every_key_can_be_set(tmp_path: Path, section: str, key: str) -> None:
    raw = NON_DEFAULT[section][key]
    companion = COMPANIONS.get((section, key), "")
    cfg = load_text(tmp_path, f"[{section}]\n{companion}\n{key} = {raw}\n")
    value = getattr(getattr(cfg, section), key)
    default = getattr(_SECTIONS[section](), key)
    assert value != default
    expected = tomllib.loads(f"v = {raw}")["v"]
    assert value == (tuple(expected) if isinstance(expected, list) else expected)


def test_all_keys_at_once(tmp_path: Path) -> None:
    text = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {v}" for k, v in keys.items()) for s, keys in NON_DEFAULT.items())
    cfg = load_text(tmp_path, text)
    assert cfg.seconds("grants", "request_ttl") == 2 * 86400
    assert cfg.grants.warnings == ("2m",)
    assert cfg.recording.mode == "best_effort"


# ---------------------------------------------------------------- unknown names


def test_unknown_key_names_the_path_and_lists_known_keys(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[listen]\nadress = "0.0.0.0:2222"\n')
    assert "listen.adress" in err.message
    assert "broker.toml" in err.message
    for known in ("address", "host_key", "login_timeout", "workers"):
        assert known in err.hint


@pytest.mark.parametrize("section", sorted(NON_DEFAULT))
def test_unknown_key_in_every_section(tmp_path: Path, section: str) -> None:
    err = config_error(tmp_path, f"[{section}]\nbogus_key = 1\n")
    assert f"{section}.bogus_key" in err.message
    assert all(f.name in err.hint for f in dataclasses.fields(_SECTIONS[section]))


def test_unknown_section_lists_known_sections(tmp_path: Path) -> None:
    err = config_error(tmp_path, "[recordings]\ndir = 'x'\n")
    assert "[recordings]" in err.message
    assert all(s in err.hint for s in _SECTIONS)


def test_top_level_key_is_an_unknown_section(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'mode = "strict"\n')
    assert "[mode]" in err.message


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'listen = "0.0.0.0:2222"\n')
    assert "[listen] must be a table" in err.message


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[listen]\naddress = 2222\n', "listen.address = 2222; expected a string"),
        ('[listen]\nworkers = "4"\n', "listen.workers = '4'; expected a whole number"),
        ("[listen]\nworkers = 2.5\n", "listen.workers = 2.5; expected a whole number"),
        ("[listen]\nworkers = true\n", "listen.workers = True; expected a whole number"),
        ("[limits]\nmax_auth_failures = -1\n", "limits.max_auth_failures = -1; expected a whole number >= 0"),
        ('[recording]\nencrypt = "yes"\n', "recording.encrypt = 'yes'; expected true or false"),
        ("[recording]\nencrypt = 1\n", "recording.encrypt = 1; expected true or false"),
        ('[grants]\nwarnings = "5m"\n', "grants.warnings must be a list of strings"),
        ("[grants]\nwarnings = [5]\n", "grants.warnings must be a list of strings"),
        ('[retention]\ndays = "180"\n', "retention.days = '180'; expected a whole number"),
        ("[alerts]\nwebhook_url = false\n", "alerts.webhook_url = False; expected a string"),
        ("[grants]\nmax_duration = 2\n", "grants.max_duration = 2; expected a string"),
    ],
)
def test_wrong_types_name_the_key_and_the_value(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in config_error(tmp_path, text).message


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[grants]\ncritical_approvers = 0\n", "grants.critical_approvers must be 1, 2 or 3"),
        ('[recording]\njournal_timeout = "10m"\n', "recording.journal_timeout = '10m'; expected 1s to 5m"),
        ("[recording]\njournal_keep = true\n", "recording.journal_keep = true needs recording.journal = true"),
        ('[recording]\njournal = "yes"\n', "recording.journal = 'yes'; expected true or false"),
        ('[recording]\nack_window = "255KiB"\n', "recording.ack_window = '255KiB'; expected 256KiB to 8MiB"),
        ('[recording]\nack_window = "9MiB"\n', "recording.ack_window = '9MiB'; expected 256KiB to 8MiB"),
        ('[recording]\nack_window = "0"\n', "recording.ack_window = '0'; expected 256KiB to 8MiB"),
        ('[recording]\nack_window = "lots"\n', "recording.ack_window = 'lots'; 'lots' is not a size"),
        ('[recording]\nack_window = "-1MiB"\n', "recording.ack_window = '-1MiB'; '-1MiB' is not a size"),
        ("[recording]\nack_window = 262144\n", "recording.ack_window = 262144; expected a string"),
        ("[grants]\ncritical_approvers = 4\n", "grants.critical_approvers must be 1, 2 or 3"),
        ("[limits]\nmax_auth_failures = 0\n", "limits.max_auth_failures must be at least 1"),
        ("[listen]\nworkers = 0\n", "listen.workers must be between 1 and 64"),
        ("[listen]\nworkers = 65\n", "listen.workers must be between 1 and 64"),
        ('[listen]\naddress = "2222"\n', "listen.address"),
        ('[listen]\naddress = "host:99999"\n', "listen.address"),
        ('[grants]\nwarnings = ["5m", "soon"]\n', "grants.warnings"),
        ('[listen]\nproxy_protocol_from = ["haproxy.local"]\n',
         "listen.proxy_protocol_from: 'haproxy.local' is not an IP address or network"),
        ('[listen]\nproxy_protocol_from = ["10.0.0.1/8"]\n', "listen.proxy_protocol_from: '10.0.0.1/8' has host bits set"),
        ('[listen]\nproxy_protocol_from = ["0.0.0.0/0"]\n', "would let every client claim any address"),
        ('[listen]\nproxy_protocol_from = ["::/0"]\n', "would let every client claim any address"),
        ('[listen]\nproxy_protocol_from = ["127.0.0.1:8404"]\n', "is not an IP address or network"),
        ('[listen]\nproxy_protocol_from = "127.0.0.1"\n', "listen.proxy_protocol_from must be a list of strings"),
        ("[listen]\nproxy_protocol_from = [2130706433]\n", "listen.proxy_protocol_from must be a list of strings"),
        ('[cluster]\nnode_id = "-a"\n', "cluster.node_id: node id '-a' is not 1-253 letters"),
        ('[cluster]\nnode_id = "a b"\n', "cluster.node_id: node id 'a b' is not"),
        ('[cluster]\nnode_id = "a/b"\n', "cluster.node_id: node id 'a/b' is not"),
        ('[cluster]\nnode_id = "n\u00e9"\n', "cluster.node_id: node id 'n\u00e9' is not"),
        ("[cluster]\nnode_id = \"" + "a" * 254 + "\"\n", "cluster.node_id: node id"),
        ('[cluster]\nheartbeat = "2m"\n', "cluster.heartbeat = '2m' is longer than 60s"),
        ('[cluster]\ndead_after = "2s"\n', "cluster.dead_after = '2s' is shorter than three heartbeats (3s)"),
        ('[cluster]\nheartbeat = "5s"\ndead_after = "10s"\n', "cluster.dead_after = '10s' is shorter than three"),
        ('[cluster]\nheartbeat = "0s"\n', "cluster.heartbeat"),
        ('[cluster]\ndead_after = "soon"\n', "cluster.dead_after"),
    ],
)
def test_out_of_range_values(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in config_error(tmp_path, text).message


@pytest.mark.parametrize(
    "url,needle",
    [
        ("mysql://mb@db/medbroker", "expected a postgresql:// URL"),
        ("/var/lib/medbroker/medbroker.db", "expected a postgresql:// URL"),
        ("postgresql://mb@db1:5432/", "names no database"),
        ("postgresql://mb@/?host=/run/postgresql", "names no database"),
        ("postgresql://mb@/medbroker", "names no host or socket directory"),
        ("postgresql://mb@db1:99999/medbroker", "store.url is not a valid URL"),
        ("postgresql://mb@db1:port/medbroker", "store.url is not a valid URL"),
    ],
)
def test_bad_store_urls(tmp_path: Path, url: str, needle: str) -> None:
    err = config_error(tmp_path, f'[store]\nurl = "{url}"\n')
    assert needle in err.message and "store.url" in err.message and err.hint


@pytest.mark.parametrize("url", ["postgresql://medbroker@/medbroker?host=/run/postgresql",
                                 "postgres://medbroker@db1.hospital.example:5432/medbroker?sslmode=verify-full",
                                 "postgresql://medbroker@db1/?dbname=medbroker", ""])
def test_good_store_urls(tmp_path: Path, url: str) -> None:
    assert load_text(tmp_path, f'[store]\nurl = "{url}"\n').store.url == url


def test_a_store_url_password_never_appears_in_errors(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[store]\nurl = "postgresql://mb:hunter2-secret@db1:5432/"\n')
    assert "hunter2" not in err.message + (err.hint or "")
    assert "postgresql://mb:<secret>@db1:5432/" in err.message


DURATION_KEYS = [
    ("listen", "login_timeout"), ("listen", "keepalive_interval"), ("grants", "max_duration"),
    ("grants", "request_ttl"), ("upstream", "connect_timeout"), ("upstream", "keepalive_interval"),
    ("limits", "failure_window"), ("limits", "lockout"), ("recording", "journal_timeout"),
    ("cluster", "heartbeat"), ("cluster", "dead_after"),
]


@pytest.mark.parametrize("section,key", DURATION_KEYS)
@pytest.mark.parametrize("bad", ["2 hours", "0s", "-5m", "1.5h", ""])
def test_bad_durations_name_the_key(tmp_path: Path, section: str, key: str, bad: str) -> None:
    err = config_error(tmp_path, f'[{section}]\n{key} = "{bad}"\n')
    assert f"{section}.{key}" in err.message
    assert repr(bad) in err.message
    assert err.hint  # says how to write one


def test_bad_duration_message_names_the_key_once(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[grants]\nmax_duration = "abc"\n')
    assert err.message.count("grants.max_duration") == 1, err.message
    assert "90s, 15m, 2h, 1d" in err.hint


def test_recording_mode_typo_message(tmp_path: Path) -> None:
    """STYLE.md §7.2: ConfigError("broker.toml: recording.mode = 'strct'; expected 'strict' or 'best_effort'")."""
    path = write(tmp_path, '[recording]\nmode = "strct"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.message == f"{path}: recording.mode = 'strct'; expected 'strict' or 'best_effort'"
    assert str(info.value).endswith("broker.toml: recording.mode = 'strct'; expected 'strict' or 'best_effort'")


# ---------------------------------------------------------------- retention floor


@pytest.mark.parametrize("days", [0, 1, 179])
def test_retention_below_the_floor_is_refused(tmp_path: Path, days: int) -> None:
    err = config_error(tmp_path, f"[retention]\ndays = {days}\n")
    assert f"retention.days = {days} is below the 180-day floor" in err.message
    assert "allow_below_floor" in err.hint


@pytest.mark.parametrize("days", [0, 30, 179])
def test_retention_below_the_floor_with_exemption(tmp_path: Path, days: int) -> None:
    cfg = load_text(tmp_path, f"[retention]\ndays = {days}\nallow_below_floor = true\n")
    assert cfg.retention.days == days


def test_retention_at_and_above_the_floor(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[retention]\ndays = 180\n").retention.days == 180
    assert load_text(tmp_path, "[retention]\ndays = 3650\n").retention.days == 3650


# ---------------------------------------------------------------- files


def test_missing_file_says_how_to_create_a_home(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "broker.toml")
    assert "no such file" in info.value.message
    assert "medbroker init" in info.value.hint


def test_toml_syntax_error(tmp_path: Path) -> None:
    assert "not valid TOML" in config_error(tmp_path, "[listen\naddress = 1\n").message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_bytes(b"[listen]\naddress = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cannot read" in info.value.message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "broker.toml").mkdir()
    with pytest.raises(ConfigError):
        load_config(tmp_path / "broker.toml")


def _toml_files() -> list[Path]:
    return sorted(CONFIG_DIR.glob("**/*.toml")) if CONFIG_DIR.is_dir() else []


def test_config_dir_is_not_empty() -> None:
    assert _toml_files(), "config/ should ship at least the protected-paths policy"


@pytest.mark.parametrize("path", _toml_files(), ids=lambda p: p.name)
def test_every_shipped_config_file_loads(path: Path) -> None:
    """STYLE.md §6: a test loads every file in config/ through the loader that owns it."""
    if path.name == "protected-paths.toml":
        from sessions.policy import load_protected_paths

        paths = load_protected_paths(path)
        assert paths and all(p.startswith("/") and p != "/" for p in paths)
        assert "/data/dicom" in paths
    elif path.name == "devices.example.toml":
        from broker.devices import load_inventory

        specs = load_inventory(path)
        assert [s.name for s in specs] == ["ct-01", "lab-02"] and specs[0].device_class == "critical"
    else:
        cfg = load_config(path)
        assert isinstance(cfg, BrokerConfig)


def test_every_config_file_has_a_loader() -> None:
    """A new file in config/ must be added to the test above (broker config or a known policy file)."""
    known = {"protected-paths.toml", "devices.example.toml"}
    for path in _toml_files():
        if path.name not in known:
            assert path.name.startswith("broker") or path.name.endswith(".example.toml"), (
                f"config/{path.name}: unknown kind of config file; teach tests/test_config.py which loader reads it"
            )
    assert all(p.suffix == ".toml" for p in CONFIG_DIR.iterdir() if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------- parse_duration


@pytest.mark.parametrize(
    "text,seconds",
    [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1s", 1), ("007m", 420), ("3650d", 3650 * 86400)],
)
def test_parse_duration_ok(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2 h", " 2h", "2h ", "2h\n", "\t2h"])
def test_parse_duration_tolerates_ascii_whitespace(text: str) -> None:
    """Decision: ASCII whitespace around and between number and unit is tolerated (people type `2 h`)."""
    assert parse_duration(text) == 7200


@pytest.mark.parametrize(
    "text",
    [
        "0s", "0d", "-5m", "+5m", "999999999999d", "abc", "", "1.5h", "1,5h", "2", "h", "2H", "2hr", "2hours",
        "1h30m", "١٢m", "１２m", "²m", "2\u00a0h", "2\u2003h", "\u20032h", "2h\x00", "0x10s", "1e3s", "1_000s",
        "3651d", "999999999d",
    ],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_duration(text, what="--for")
    assert "--for" in info.value.message
    assert repr(text) in info.value.message
    assert info.value.hint


def test_parse_duration_non_string() -> None:
    with pytest.raises(UsageError):
        parse_duration(None)  # type: ignore[arg-type]


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text())
@example("١٢m")
@example("9" * 9 + "d")
def test_parse_duration_fuzz(text: str) -> None:
    """Any text parses to positive whole seconds or raises UsageError, never anything else."""
    try:
        seconds = parse_duration(text)
    except UsageError as exc:
        assert exc.message and exc.hint
        return
    assert isinstance(seconds, int) and seconds > 0
    assert text.strip()[-1] in "smhd"
    assert all(c in string.digits + "smhd" + string.whitespace for c in text)


@given(st.integers(min_value=1, max_value=3650 * 86400), st.sampled_from("smhd"))
def test_parse_duration_round_trips_numbers(n: int, unit: str) -> None:
    size = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if n * size > 3650 * 86400:
        with pytest.raises(UsageError):
            parse_duration(f"{n}{unit}")
    else:
        assert parse_duration(f"{n}{unit}") == n * size


@pytest.mark.parametrize(
    "seconds,text", [(0, "0s"), (-3, "0s"), (45, "45s"), (90, "1m30s"), (7200, "2h"), (5400, "1h30m"),
                     (86400 + 3600 + 60, "1d1h"), (59.6, "1m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=1, max_value=10**7))
def test_format_duration_parses_back_for_single_units(n: int) -> None:
    text = format_duration(n)
    if len([c for c in text if c.isalpha()]) == 1:
        assert parse_duration(text) == n


# ---------------------------------------------------------------- parse_listen


@pytest.mark.parametrize(
    "text,expected",
    [("0.0.0.0:2222", ("0.0.0.0", 2222)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:2222", ("::1", 2222)),
     ("localhost:65535", ("localhost", 65535))],
)
def test_parse_listen_ok(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "2222", ":2222", "host:", "host:65536", "host:-1", "host:port", "[]:22",
                                  "host:٢٢٢٢", "host:²", "host:2 2", "host: 22"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_listen(text)
    assert "HOST:PORT" in info.value.message


@settings(max_examples=FUZZ_EXAMPLES_OTHER)
@given(st.text())
@example("h:²")
@example("h:٢٢")
def test_parse_listen_fuzz(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except UsageError:
        return
    assert host and 0 <= port <= 65535
    tail = text.rpartition(":")[2]
    assert tail.isascii() and tail.isdigit() and int(tail) == port


def test_max_opaque_output_is_a_size(tmp_path) -> None:
    from broker.config import parse_size

    assert parse_size("64KiB") == 65536 and parse_size("0") == 0 and parse_size("2 MiB") == 2 << 20
    path = tmp_path / "broker.toml"
    path.write_text('[policy]\nmax_opaque_output = "lots"\n')
    with pytest.raises(ConfigError, match="policy.max_opaque_output"):
        load_config(path)


def test_the_default_ack_window_is_the_writers_and_the_bounds_are_inclusive(tmp_path) -> None:
    from broker.config import ACK_WINDOW_MAX, ACK_WINDOW_MIN, RecordingConfig, parse_size
    from sessions.recwriter import ACK_WINDOW

    assert parse_size(RecordingConfig().ack_window) == ACK_WINDOW == ACK_WINDOW_MIN
    for text, size in (("256KiB", ACK_WINDOW_MIN), ("8MiB", ACK_WINDOW_MAX), ("1 MiB", 1 << 20), ("1000000", 10**6)):
        path = tmp_path / "broker.toml"
        path.write_text(f'[recording]\nack_window = "{text}"\n')
        assert parse_size(load_config(path).recording.ack_window) == size


def test_example_config_lists_every_key_and_loads(tmp_path: Path) -> None:
    """config/broker.example.toml is what admins copy: it must name every key the broker knows and load."""
    import re

    example = (Path(__file__).resolve().parent.parent / "config" / "broker.example.toml").read_text()
    shown, section = set(), None
    for line in example.splitlines():
        head = re.match(r"\[(\w+)\]", line)
        if head:
            section = head.group(1)
        key = re.match(r"(\w+)\s*=", line)
        if key and section:
            shown.add((section, key.group(1)))
    known = {(s, f.name) for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    assert known - shown == set(), f"missing from config/broker.example.toml: {sorted(known - shown)}"
    (tmp_path / "broker.toml").write_text(example)
    load_config(tmp_path / "broker.toml")


def test_forward_tls_is_one_of_three(tmp_path) -> None:
    path = tmp_path / "broker.toml"
    for good in ("contained-only", "allow", "refuse"):
        path.write_text(f'[policy]\nforward_tls = "{good}"\n')
        assert load_config(path).policy.forward_tls == good
    path.write_text('[policy]\nforward_tls = "yes"\n')
    with pytest.raises(ConfigError, match="policy.forward_tls = 'yes'; expected 'contained-only', 'allow' or 'refuse'"):
        load_config(path)


def test_balancer_addresses_say_how_to_write_them(tmp_path: Path) -> None:
    """A network written with host bits gets both readings as the hint; the valid forms load as written."""
    err = config_error(tmp_path, '[listen]\nproxy_protocol_from = ["10.0.0.1/8"]\n')
    assert "10.0.0.0/8" in err.hint and "10.0.0.1/32" in err.hint
    cfg = load_text(tmp_path, '[listen]\nproxy_protocol_from = ["10.1.2.3", "192.168.0.0/16", "::1"]\n')
    assert cfg.listen.proxy_protocol_from == ("10.1.2.3", "192.168.0.0/16", "::1")
    assert load_text(tmp_path, "").listen.proxy_protocol_from == ()  # default: no balancer
# ---------------------------------------------------------------- [archive]

_ARCHIVE_OK = 'url = "s3://medbroker-recordings/site-a/"\naccess_key_file = "a"\nsecret_key_file = "s"\n'


def test_archive_is_off_by_default_and_its_url_parses(tmp_path: Path) -> None:
    from broker.config import parse_archive_url

    assert load_text(tmp_path, "").archive.url == ""
    assert parse_archive_url("s3://medbroker-recordings/site-a/") == ("medbroker-recordings", "site-a/")
    assert parse_archive_url("s3://medbroker-recordings/a/b") == ("medbroker-recordings", "a/b/")
    assert parse_archive_url("s3://medbroker-recordings") == ("medbroker-recordings", "")
    assert parse_archive_url("s3://medbroker-recordings/") == ("medbroker-recordings", "")


@pytest.mark.parametrize("value,stored", [("true", "now"), ("false", "never"), ('"now"', "now"), ('"never"', "never"),
                                          ('"36h"', "36h")])
def test_archive_delete_local_after_takes_a_bool_or_an_age(tmp_path: Path, value: str, stored: str) -> None:
    cfg = load_text(tmp_path, f"[archive]\n{_ARCHIVE_OK}delete_local_after = {value}\n")
    assert cfg.archive.delete_local_after == stored
    if stored == "36h":
        assert cfg.seconds("archive", "delete_local_after") == 36 * 3600


@pytest.mark.parametrize("extra,needle", [
    ('url = "http://bucket/x"\n', "archive.url"),
    ('url = "s3://Bad_Bucket/x"\n', "archive.url"),
    ('url = "s3://ab/x"\n', "archive.url"),
    ('url = "s3://bucket-name/a//b"\n', "archive.url"),
    ('url = "s3://bucket-name/a/../b"\n', "archive.url"),
    ('url = "s3://bucket-name/a\\\\b"\n', "archive.url"),
    ('endpoint = "ftp://127.0.0.1:21"\n', "archive.endpoint"),
    ('endpoint = "http://user:pw@127.0.0.1:8080"\n', "archive.endpoint"),
    ('endpoint = "http://127.0.0.1:8080/path"\n', "archive.endpoint"),
    ('region = "EU CENTRAL"\n', "archive.region"),
    ('access_key_file = ""\n', "archive.access_key_file is empty"),
    ('secret_key_file = ""\n', "archive.secret_key_file is empty"),
    ('delete_local_after = "later"\n', "archive.delete_local_after"),
    ('delete_local_after = "0s"\n', "archive.delete_local_after"),
    ('delete_local_after = 3\n', "archive.delete_local_after = 3; expected a string"),
    ('part_size = "4MiB"\n', "outside 5MiB-5GiB"),
    ('part_size = "6GiB"\n', "outside 5MiB-5GiB"),
    ('part_size = "big"\n', "archive.part_size"),
    ('interval = "0s"\n', "archive.interval"),
    ('timeout = "soon"\n', "archive.timeout"),
])
def test_archive_bad_values_name_the_key(tmp_path: Path, extra: str, needle: str) -> None:
    base = "\n".join(line for line in _ARCHIVE_OK.splitlines() if line.split(" =")[0] not in extra)
    assert needle in config_error(tmp_path, f"[archive]\n{base}\n{extra}").message


def test_archive_settings_without_a_url_are_refused(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[archive]\nendpoint = "http://127.0.0.1:8080"\n')
    assert "archive.endpoint is set but archive.url is empty" in err.message
    assert "s3://" in err.hint
