"""broker/devices.py: registering devices with sealed credentials, pinned host keys, protected paths, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.audit import AuditLog, parse_details
from broker.clock import FakeClock
from broker.devices import (
    add_device,
    device_credential,
    get_device,
    list_devices,
    remove_device,
    validate_protected_path,
)
from broker.errors import ConflictError, NotFoundError, StorageError, UsageError
from broker.keys import FileKeyProvider, Secret
from broker.store import Store, open_store

from helpers import missing_openssh_binaries
from helpers.keys import KeyPair, generate_keypair

PASSWORD = "s3rvice-Pa55!"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    if missing_openssh_binaries():
        pytest.skip("ssh-keygen is missing")
    d = tmp_path_factory.mktemp("devkeys")
    return {"host": generate_keypair(d, "host", key_type="ed25519", comment="root@ct-01"),
            "host_ecdsa": generate_keypair(d, "hostec", key_type="ecdsa"),
            "login": generate_keypair(d, "login", key_type="ed25519")}


class Env:
    def __init__(self, tmp_path: Path, target: Path | str | None = None) -> None:
        self.store = open_store(target)
        self.clock = FakeClock()
        self.audit = AuditLog(self.store, self.clock)
        self.keys = FileKeyProvider(tmp_path / "keys" / "data.key")
        self.keys.rotate()

    def add(self, pairs: dict[str, KeyPair], **kw: Any):
        args: dict[str, Any] = {"name": "ct-01", "host": "127.0.0.1", "port": 2022, "login": "service",
                                "host_key": pairs["host"].public_line, "now": self.clock.now(), "password": PASSWORD,
                                "actor": "admin"}
        args.update(kw)
        if "key_text" in kw and "password" not in kw:
            args.pop("password")
        return add_device(self.store, self.audit, self.keys, **args)


@pytest.fixture
def env(tmp_path: Path, store_target: Path | str) -> Env:
    e = Env(tmp_path, store_target)
    yield e
    e.store.close()


def all_db_text(store: Store) -> str:
    out = []
    tables = (store.conn.tables() if store.dialect != "sqlite"  # every table, FTS5's own too on SQLite
              else [r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")])
    for table in tables:
        for row in store.query(f"SELECT * FROM {table}"):
            out.append(repr(row))
    return "\n".join(out)


# ---------------------------------------------------------------- credentials


def test_password_is_sealed_and_unsealed(env: Env, pairs: dict[str, KeyPair]) -> None:
    dev = env.add(pairs, protect=("/data/dicom",), device_class="critical", description="CT scanner, room 4")
    row = env.store.get_device("ct-01")
    assert PASSWORD not in row["credential"]
    assert PASSWORD not in all_db_text(env.store)
    assert row["credential"].startswith(env.keys.current()[0] + ":")
    cred = device_credential(dev, env.keys)
    assert isinstance(cred, Secret) and repr(cred) == "<secret>" and cred.reveal() == PASSWORD
    assert dev.auth_kind == "password" and dev.device_class == "critical"
    assert "credential" not in dev.as_dict() and PASSWORD not in repr(dev.as_dict())


def test_private_key_is_sealed_and_unsealed(env: Env, pairs: dict[str, KeyPair]) -> None:
    text = pairs["login"].private_path.read_text()
    dev = env.add(pairs, key_text=text)
    body = text.splitlines()[1]  # a line of the key's base64
    assert body not in all_db_text(env.store)
    assert dev.auth_kind == "key"
    assert device_credential(dev, env.keys).reveal() == text


def test_another_key_file_cannot_unseal(env: Env, pairs: dict[str, KeyPair], tmp_path: Path) -> None:
    dev = env.add(pairs)
    other = FileKeyProvider(tmp_path / "other.key")
    other.rotate()
    with pytest.raises(StorageError) as info:
        device_credential(dev, other)
    assert PASSWORD not in str(info.value)


def test_credential_is_bound_to_its_device(env: Env, pairs: dict[str, KeyPair]) -> None:
    """Copying ct-01's sealed credential onto another device row does not make it usable there."""
    env.add(pairs)
    env.add(pairs, name="ct-02", password="other")
    env.store.update_device("ct-02", credential=env.store.get_device("ct-01")["credential"])
    with pytest.raises(StorageError):
        device_credential(get_device(env.store, "ct-02"), env.keys)


def test_rotation_keeps_old_credentials_usable(env: Env, pairs: dict[str, KeyPair]) -> None:
    dev = env.add(pairs)
    env.keys.rotate()
    assert device_credential(dev, env.keys).reveal() == PASSWORD


# ---------------------------------------------------------------- host keys


@pytest.mark.parametrize("which", ["host", "host_ecdsa"])
def test_host_key_is_pinned_with_its_fingerprint(env: Env, pairs: dict[str, KeyPair], which: str) -> None:
    dev = env.add(pairs, host_key=pairs[which].public_line)
    assert dev.host_key == pairs[which].public_key  # comment dropped
    assert dev.host_key_fingerprint == pairs[which].fingerprint  # as ssh-keygen -lf prints it


@pytest.mark.parametrize("host_key", ["", "ssh-ed25519", "ssh-ed25519 AAAA", "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
                                      "not a key at all"])
def test_bad_host_key_adds_nothing(env: Env, pairs: dict[str, KeyPair], host_key: str) -> None:
    with pytest.raises(UsageError):
        env.add(pairs, host_key=host_key)
    assert env.store.list_devices() == [] and env.store.audit_rows() == []


# ---------------------------------------------------------------- protected paths


@pytest.mark.parametrize(
    "raw,norm",
    [("/data/dicom/", "/data/dicom"), ("/data/dicom", "/data/dicom"), ("//data//dicom", "/data/dicom"),
     ("///data", "/data"), ("/data/./x/../dicom", "/data/dicom"), ("/", "/"), ("//", "/"),
     ("/data/DICOM Files", "/data/DICOM Files"), ("/daten/röntgen", "/daten/röntgen")],
)
def test_protected_path_normalisation(raw: str, norm: str) -> None:
    assert validate_protected_path(raw) == norm


@pytest.mark.parametrize("raw", ["", "data/dicom", "./data", "~/data", "/data\n/dicom", "/data\x00", "/data\t"])
def test_protected_path_refusals(raw: str) -> None:
    with pytest.raises(UsageError) as info:
        validate_protected_path(raw)
    assert "--protect /data/dicom" in info.value.hint


@given(st.text(min_size=1).map(lambda t: "/" + t))
def test_protected_path_is_idempotent(raw: str) -> None:
    try:
        norm = validate_protected_path(raw)
    except UsageError:
        assert any(ord(c) < 0x20 for c in raw)
        return
    assert validate_protected_path(norm) == norm
    assert norm.startswith("/") and "//" not in norm and (norm == "/" or not norm.endswith("/"))
    assert "/./" not in norm + "/" and "/../" not in norm + "/"


def test_protected_paths_are_stored_normalised_and_deduplicated(env: Env, pairs: dict[str, KeyPair]) -> None:
    dev = env.add(pairs, protect=("/data/dicom/", "/var/spool/hl7", "/data//dicom", "/data/dicom/."))
    assert dev.protected_paths == ("/data/dicom", "/var/spool/hl7")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("host", ["127.0.0.1", "ct-01", "ct-01.radiology.hospital.example", "::1", "fe80::1",
                                  "10.0.0.254", "CT01.Local"])
def test_good_hosts(env: Env, pairs: dict[str, KeyPair], host: str) -> None:
    assert env.add(pairs, host=host).host == host


@pytest.mark.parametrize("kwargs,needle", [
    ({"name": "CT-01"}, "device name 'CT-01'"),
    ({"name": "ct-01\n"}, "device name"),
    ({"name": ""}, "device name"),
    ({"host": ""}, "host ''"),
    ({"host": "ct 01"}, "host 'ct 01'"),
    ({"host": "ct-01\n"}, "host"),
    ({"host": "-ct"}, "host"),
    ({"host": "a..b"}, "host"),
    ({"host": "http://ct-01"}, "host"),
    ({"host": "ct-01;rm -rf /"}, "host"),
    ({"host": "١٢٧.٠.٠.١"}, "host"),
    ({"port": 0}, "port 0 is out of range"),
    ({"port": 65536}, "port 65536"),
    ({"port": -22}, "port -22"),
    ({"port": "ssh"}, "port 'ssh'"),
    ({"port": None}, "port None"),
    ({"login": ""}, "login ''"),
    ({"login": "root\n"}, "login"),
    ({"login": "ro ot"}, "login"),
    ({"login": "-oProxyCommand=x"}, "login"),
    ({"login": "x" * 33}, "login"),
    ({"device_class": "vital"}, "class 'vital'"),
    ({"password": ""}, "password is empty"),
    ({"password": "a\nb"}, "several lines"),
    ({"password": None}, "exactly one credential"),
    ({"key_text": "KEY", "password": "x"}, "exactly one credential"),
    ({"key_text": "ssh-ed25519 AAAA public"}, "not a private key"),
    ({"legacy_algorithms": {"kex_algs": "diffie-hellman-group1-sha1"}}, "legacy algorithm setting 'kex_algs'"),
    ({"legacy_algorithms": {"ciphers": ["aes128-cbc"]}}, "legacy algorithm setting 'ciphers'"),
    ({"protect": ("data/dicom",)}, "protected path 'data/dicom'"),
])
def test_bad_devices_change_nothing(env: Env, pairs: dict[str, KeyPair], kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        env.add(pairs, **kwargs)
    assert needle in info.value.message, info.value.message
    assert env.store.list_devices() == [] and env.store.audit_rows() == []


def test_legacy_algorithms_are_kept(env: Env, pairs: dict[str, KeyPair]) -> None:
    legacy = {"kex_algs": ["diffie-hellman-group14-sha1"], "encryption_algs": ["aes128-cbc"]}
    assert env.add(pairs, legacy_algorithms=legacy).legacy_algorithms == legacy


def test_duplicate_name_is_a_conflict_and_keeps_the_first(env: Env, pairs: dict[str, KeyPair]) -> None:
    first = env.add(pairs)
    with pytest.raises(ConflictError) as info:
        env.add(pairs, host="10.1.1.1", password="other")
    assert "device ct-01 already exists" in info.value.message and "device remove ct-01" in info.value.hint
    assert get_device(env.store, "ct-01") == first
    assert device_credential(first, env.keys).reveal() == PASSWORD


# ---------------------------------------------------------------- audit, list, remove


def test_add_and_remove_are_audited_without_the_secret(env: Env, pairs: dict[str, KeyPair]) -> None:
    env.add(pairs, protect=("/data/dicom",))
    env.add(pairs, name="mri-01", device_class="critical")
    assert [d.name for d in list_devices(env.store)] == ["ct-01", "mri-01"]
    remove_device(env.store, env.audit, "ct-01", actor="admin")
    assert [d.name for d in list_devices(env.store)] == ["mri-01"]
    with pytest.raises(NotFoundError, match="device ct-01 is not registered"):
        get_device(env.store, "ct-01")
    rows = env.store.audit_rows()
    assert [(r["event"], r["actor"], r["device"]) for r in rows] == [
        ("device.added", "admin", "ct-01"), ("device.added", "admin", "mri-01"), ("device.removed", "admin", "ct-01")]
    added = parse_details(rows[0])
    assert added["host_key_fingerprint"] == pairs["host"].fingerprint
    assert added["protected_paths"] == ["/data/dicom"] and added["port"] == 2022
    assert PASSWORD not in repr(rows)


def test_remove_unknown_device(env: Env) -> None:
    with pytest.raises(NotFoundError):
        remove_device(env.store, env.audit, "ct-99")
    assert env.store.audit_rows() == []
