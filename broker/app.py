"""The broker home as one object: config, store, audit log, keys and clock, plus ``init`` and ``check``."""

from __future__ import annotations

import json
import os
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import AuditLog
from broker.clock import Clock, SystemClock
from broker.config import DEFAULT_CONFIG_TOML, BrokerConfig, load_config, parse_archive_url, parse_size
from broker.errors import BrokerError, ConfigError, StorageError
from broker.forwards import ProtectedPorts, load_protected_ports
from broker.grants import GrantRules
from broker.keys import FileKeyProvider, Secret, generate_host_key, generate_signing_key, load_signing_key, verify_hex
from broker.siem import JsonLinesSink, build_sinks
from broker.store import Store, open_store
from sessions.archived import ArchivedRecordingStore
from sessions.objectstore import ObjectStore
from sessions.storage import LocalRecordingStore, RecordingStore

__all__ = ["App", "init_home", "open_app", "check_home", "CheckResult", "ALERT_EVENTS", "default_policy_file"]

ALERT_EVENTS = ("auth.lockout", "device.hostkey.mismatch", "exec.denied", "sftp.denied", "scp.denied",
                "alert.exfiltration", "recording.failed", "channel.refused", "session.killed")


def default_policy_file() -> Path:
    """The protected-paths policy shipped inside the package (``broker/defaults/``; the repository's
    ``config/protected-paths.toml`` links to it), so a wheel install finds it as well as a checkout."""
    return Path(str(resources.files("broker") / "defaults" / "protected-paths.toml"))


@dataclass
class App:
    """Everything a command or the server needs from one broker home."""

    config: BrokerConfig
    store: Store
    clock: Clock
    keys: FileKeyProvider
    audit: AuditLog = field(init=False)
    _signing: Ed25519PrivateKey | None = field(default=None, init=False, repr=False)
    _ports: ProtectedPorts | None = field(default=None, init=False, repr=False)
    _alerts: JsonLinesSink | None = field(default=None, init=False, repr=False)
    _journal_store: Store | None = field(default=None, init=False, repr=False)
    _archived: ArchivedRecordingStore | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.store, self.clock, [self._alert_sink])

    @property
    def home(self) -> Path:
        return self.config.home

    @property
    def rules(self) -> GrantRules:
        c = self.config
        return GrantRules(c.seconds("grants", "max_duration"), c.seconds("grants", "request_ttl"),
                          c.grants.critical_approvers, c.policy.exposed_shell, self.protected_ports,
                          c.policy.forward_tls)

    @property
    def protected_ports(self) -> ProtectedPorts:
        """Ports no grant may forward: built in, plus the policy file's ``[ports] never`` (read once).

        :raises ConfigError: the policy file's [ports] table is wrong
        """
        if self._ports is None:
            cfg = self.config
            self._ports = load_protected_ports(cfg.path(cfg.policy.protected_paths_file)
                                               if cfg.policy.protected_paths_file else default_policy_file())
        return self._ports

    @property
    def recordings(self) -> RecordingStore:
        """Where this home's recordings live (``recording.dir``; with [archive] also the object store, which
        readers reach through the same interface); rows name them by key through it.

        :raises ConfigError: [archive] is on and a key file cannot be read
        """
        local = LocalRecordingStore(self.config.recordings_dir)
        if not self.config.archive.url:
            return local
        if self._archived is None:
            self._archived = _archived_store(self.config, local, self.store)
        return self._archived

    @property
    def journal_store(self) -> Store:
        """The recording journal's own database connection (``[recording] journal``), opened on first use.

        Only the recording writer thread uses it (broker/journal.py ``JournalSink``), so a journal write never
        queues behind the store thread, and its lock wait is ``journal_timeout`` rather than the store's.

        :raises StorageError: the database cannot be opened
        """
        if self._journal_store is None:
            store = open_store(self.config.db_path, migrate=False)
            store.set_lock_wait(self.config.seconds("recording", "journal_timeout"))
            self._journal_store = store
        return self._journal_store

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        if self._signing is None:
            self._signing = load_signing_key(self.config.path(self.config.recording.signing_key))
        return self._signing

    def verify_signature(self, message: bytes, signature_hex: str) -> bool:
        """Check a signature made with this home's signing key."""
        return verify_hex(self.signing_key.public_key(), message, signature_hex)

    def _alert_sink(self, row: dict[str, Any]) -> None:
        """Alerts (denials, detections, lockouts, ...) to ``[alerts] file``, one JSON line each, rotated by
        size like the SIEM file (10 MiB, 5 kept)."""
        if not row["event"].startswith(ALERT_EVENTS):
            return
        path = self.config.path(self.config.alerts.file)
        if self._alerts is None or self._alerts.path != path:
            self._alerts = JsonLinesSink(path, to_record=lambda r: {
                k: r[k] for k in ("id", "at", "event", "actor", "user_name", "device", "session_id", "grant_id",
                                  "source")} | {"details": json.loads(r["details"])})
        self._alerts(row)

    def close(self) -> None:
        for sink in self.audit.sinks:  # SIEM sinks flush what they queued (bounded wait)
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        if self._journal_store is not None:
            self._journal_store.close()
            self._journal_store = None
        self.store.close()


def _archived_store(cfg: BrokerConfig, local: LocalRecordingStore, store: Store | None) -> ArchivedRecordingStore:
    """The local directory backed by the [archive] bucket (keys read from their files, held as Secrets)."""
    a = cfg.archive
    keys: dict[str, Secret[str]] = {}
    for name in ("access_key_file", "secret_key_file"):
        path = cfg.path(getattr(a, name))
        try:
            keys[name] = Secret(path.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"archive.{name}: cannot read {path} ({getattr(exc, 'strerror', None) or exc})",
                              "create the file with the key on one line (chmod 600), or fix the path") from None
        if not keys[name].reveal():
            raise ConfigError(f"archive.{name}: {path} is empty", "put the key on one line in it")
    bucket, prefix = parse_archive_url(a.url)
    objects = ObjectStore(bucket=bucket, prefix=prefix, endpoint=a.endpoint, region=a.region,
                          access_key=keys["access_key_file"].reveal(), secret_key=keys["secret_key_file"].reveal(),
                          timeout=float(cfg.seconds("archive", "timeout")))

    def replaced(key: str, sha256: str, size: int) -> None:
        if store is not None:
            store.set_archive_checksum(key, sha256=sha256, size=size)

    return ArchivedRecordingStore(local, objects, cfg.home / "archive-cache", part_size=parse_size(a.part_size),
                                  on_replaced=replaced)


def init_home(home: Path, *, clock: Clock | None = None) -> App:
    """Create a broker home: broker.toml, host key, signing key, data key, database, recordings/.

    Existing files are kept (running ``init`` twice is safe).

    :raises StorageError: the directory cannot be written
    """
    try:
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        (home / "keys").mkdir(exist_ok=True)
        os.chmod(home / "keys", 0o700)
        (home / "recordings").mkdir(mode=0o700, exist_ok=True)  # recordings hold what vendors saw and typed
        cfg_file = home / "broker.toml"
        if not cfg_file.exists():
            cfg_file.write_text(DEFAULT_CONFIG_TOML, encoding="utf-8")
        cfg = load_config(cfg_file, home=home)
        host_key = cfg.path(cfg.listen.host_key)
        if not host_key.exists():
            generate_host_key(host_key)
        signing = cfg.path(cfg.recording.signing_key)
        if not signing.exists():
            generate_signing_key(signing)
        data_key = FileKeyProvider(cfg.path(cfg.recording.data_key))
        if not data_key.path.exists():
            data_key.rotate()
        if not cfg.recordings_dir.exists():
            cfg.recordings_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(cfg.recordings_dir, 0o700)
    except OSError as exc:
        raise StorageError(f"cannot create broker home {home}: {exc.strerror}", "choose a writable --home") from exc
    return open_app(home, clock=clock)


def open_app(home: Path, *, clock: Clock | None = None) -> App:
    """Open an existing home.

    :raises ConfigError: no home or broken broker.toml
    """
    cfg_file = Path(home) / "broker.toml"
    if not cfg_file.exists():
        raise ConfigError(f"{home} is not a medbroker home (no broker.toml)",
                          f"create one with: medbroker --home {home} init")
    cfg = load_config(cfg_file, home=Path(home))
    store = open_store(cfg.db_path)
    app = App(cfg, store, clock or SystemClock(), FileKeyProvider(cfg.path(cfg.recording.data_key)))
    app.audit.sinks.extend(build_sinks(cfg))  # every process (server and CLI) exports what it writes
    return app


@dataclass(frozen=True)
class CheckResult:
    """One line of ``medbroker check``."""

    name: str
    ok: bool
    detail: str


def check_home(home: Path) -> list[CheckResult]:
    """Validate config, keys, database and the recordings directory without changing anything."""
    results: list[CheckResult] = []
    try:
        cfg = load_config(Path(home) / "broker.toml", home=Path(home))
        results.append(CheckResult("config", True, str(Path(home) / "broker.toml")))
    except BrokerError as exc:
        return [CheckResult("config", False, str(exc))]
    for label, rel in (("host key", cfg.listen.host_key), ("signing key", cfg.recording.signing_key),
                       ("data key", cfg.recording.data_key)):
        p = cfg.path(rel)
        if not p.exists():
            results.append(CheckResult(label, False, f"{p} is missing; run: medbroker init"))
        elif p.stat().st_mode & 0o077:
            results.append(CheckResult(label, False, f"{p} is readable by others; run: chmod 600 {p}"))
        else:
            results.append(CheckResult(label, True, str(p)))
    try:
        load_signing_key(cfg.path(cfg.recording.signing_key))
        FileKeyProvider(cfg.path(cfg.recording.data_key)).current()
    except BrokerError as exc:
        results.append(CheckResult("key material", False, str(exc)))
    try:
        if not cfg.db_path.exists():  # opening it would create an empty database: check changes nothing
            raise StorageError(f"{cfg.db_path} is missing; run: medbroker init")
        store = open_store(cfg.db_path, migrate=False)
        version = store.schema_version()
        store.close()
        results.append(CheckResult("database", version > 0, f"{cfg.db_path} (schema {version})"
                                   if version else f"{cfg.db_path} has no schema; run: medbroker init"))
    except StorageError as exc:
        results.append(CheckResult("database", False, str(exc)))
    rec = cfg.recordings_dir
    results.append(_check_recordings(rec))
    policy = cfg.path(cfg.policy.protected_paths_file) if cfg.policy.protected_paths_file else default_policy_file()
    if cfg.archive.url:
        results.append(_check_archive(cfg))
    results.append(CheckResult("policy", policy.exists(), str(policy) if policy.exists() else f"{policy} is missing"))
    if policy.exists():
        try:
            ports = load_protected_ports(policy)
            results.append(CheckResult("forward ports", True, "never forwarded: " + ", ".join(
                str(p) for p in sorted(ports.reasons))))
        except ConfigError as exc:
            results.append(CheckResult("forward ports", False, str(exc)))
    return results


def _check_archive(cfg: BrokerConfig) -> CheckResult:
    """[archive]: the key files are readable and private, and the bucket answers a listing with them."""
    secret = cfg.path(cfg.archive.secret_key_file)
    try:
        if secret.stat().st_mode & 0o077:
            return CheckResult("archive", False, f"{secret} is readable by others; run: chmod 600 {secret}")
        objects = _archived_store(cfg, LocalRecordingStore(cfg.recordings_dir), None).objects
        found = objects.probe()
    except OSError as exc:
        return CheckResult("archive", False, f"archive.secret_key_file: cannot read {secret} ({exc.strerror})")
    except BrokerError as exc:
        return CheckResult("archive", False, str(exc))
    return CheckResult("archive", True, f"{objects.url} at {objects.endpoint} ({found}{'+' if found >= 1000 else ''} "
                                        "objects under the prefix)")


def _check_recordings(rec: Path) -> CheckResult:
    if not rec.is_dir():
        return CheckResult("recordings", False, f"{rec} is not a directory; run: medbroker init")
    probe = rec / f".probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        try:
            probe.unlink()
        except OSError:
            pass
        return CheckResult("recordings", False, f"{rec} is not writable ({exc.strerror}); sessions will be refused")
    st = os.statvfs(rec)
    free = st.f_bavail * st.f_frsize
    if free < 64 * 1024 * 1024:
        return CheckResult("recordings", False, f"{rec} has only {free // 1024} KiB free; sessions will be refused")
    return CheckResult("recordings", True, f"{rec} ({free // (1024 * 1024)} MiB free)")
