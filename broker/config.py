"""Frozen broker configuration loaded from ``broker.toml``, durations and the home layout."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from broker.clock import display_zone
from broker.errors import ConfigError, UsageError

__all__ = [
    "BrokerConfig",
    "ListenConfig",
    "GrantConfig",
    "RecordingConfig",
    "UpstreamConfig",
    "LimitsConfig",
    "PolicyConfig",
    "AlertConfig",
    "MetricsConfig",
    "DisplayConfig",
    "DirectoryConfig",
    "ClusterConfig",
    "ArchiveConfig",
    "parse_archive_url",
    "parse_size",
    "RetentionConfig",
    "WebConfig",
    "SiemConfig",
    "StoreConfig",
    "Home",
    "redact_url",
    "load_config",
    "parse_duration",
    "format_duration",
    "parse_listen",
    "parse_node_id",
    "parse_startups",
    "parse_syslog_address",
    "DEFAULT_CONFIG_TOML",
    "MAX_ID",
    "unsafe_char",
    "escape_unsafe",
    "parse_id",
    "id_in_range",
]

# re.ASCII: without it \d accepts any Unicode digit ('١٢m') and \s any Unicode space.
_DURATION = re.compile(r"\s*(\d{1,9})\s*([smhd])\s*", re.ASCII)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Ten years: longer than any window or timeout makes sense, short enough that now + duration
# never overflows datetime (999999999d did).
MAX_DURATION_S = 3650 * 86400
# Ids are SQLite INTEGERs (signed 64-bit): a larger number cannot name a row, and binding it raises
# OverflowError (issue 11 finding 10: `approve 99999999999999999999999` hung the SSH channel, HTTP 500).
MAX_ID = 2**63 - 1
# Unicode categories never accepted in reasons and tickets (see unsafe_char): control, format, surrogate,
# line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_ID = re.compile(r"\s*(\d{1,19})\s*", re.ASCII)


ACK_WINDOW_MIN, ACK_WINDOW_MAX = 256 << 10, 8 << 20
"""Bounds of recording.ack_window: the largest unit appended at once (an SFTP reply, a batch of output) is 256 KiB."""
_SIZE_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "KB": 1000, "MIB": 1 << 20, "MB": 1000 ** 2, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """``"64KiB"`` -> 65536; accepts B, KB, KiB, MB, MiB, GiB (case-insensitive) or a plain number of bytes.

    :raises ValueError: for anything else
    """
    m = re.fullmatch(r"\s*(\d{1,15})\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; use e.g. 64KiB, 1MiB or 0")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_duration(text: str, *, what: str = "duration") -> int:
    """Parse ``90s``, ``15m``, ``2h`` or ``1d`` into whole seconds.

    :param text: the duration as a person typed it
    :param what: name used in the error message
    :returns: seconds, always > 0 and at most 3650 days
    :raises UsageError: for anything else, including ``0s``, negatives and non-ASCII digits
    """
    m = _DURATION.fullmatch(text or "") if isinstance(text, str) else None
    if not m:
        raise UsageError(
            f"{what} {text!r} is not a duration",
            "write a whole number followed by s, m, h or d, e.g. 90s, 15m, 2h, 1d",
        )
    seconds = int(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise UsageError(f"{what} {text!r} must be longer than zero", "e.g. 30m or 2h")
    if seconds > MAX_DURATION_S:
        raise UsageError(f"{what} {text!r} is longer than ten years", "at most 3650d")
    return seconds


def unsafe_char(text: str) -> str | None:
    """The first character of ``text`` a person's reason or ticket may not contain, named, or None.

    Refused: control characters (C0, DEL, C1: ESC and the one-byte CSI run terminal commands), format
    characters (bidi overrides and isolates U+202A-202E, U+2066-2069, marks U+200E/200F/061C, zero-width
    U+200B-200D, U+2060, U+FEFF, soft hyphen, tags: they reorder or hide what an approver reads), surrogates
    and the line/paragraph separators. Tab is refused too (a reason is one line).
    """
    for c in text:
        if unicodedata.category(c) in _UNSAFE_CATEGORIES:
            name = unicodedata.name(c, "") or ("control character" if unicodedata.category(c) == "Cc" else "")
            return f"U+{ord(c):04X}" + (f" ({name})" if name else "")
    return None


def escape_unsafe(text: str) -> str:
    """``text`` with every :func:`unsafe_char` character shown as ``<U+202E>``: fit for a terminal or a page."""
    return "".join(f"<U+{ord(c):04X}>" if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)


def id_in_range(value: object) -> bool:
    """Whether ``value`` is an int that can name a row (1 … :data:`MAX_ID`)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def parse_id(text: object, *, what: str = "id") -> int:
    """Parse a request, grant or share id a person typed: ASCII digits, 1 … :data:`MAX_ID`.

    :param what: name used in the error message, e.g. ``request id``
    :raises UsageError: not a whole positive number in range (``-1``, ``1_000``, ``١٢``, 23 digits)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _ID.fullmatch(text) if isinstance(text, str) else None
        value = int(m.group(1)) if m else 0
    if not id_in_range(value):
        shown = ascii(text if not isinstance(text, str) or len(text) <= 40 else text[:40] + "...")
        raise UsageError(f"{what} {shown} is not a valid id",
                         f"ids are whole numbers from 1 to {MAX_ID}, as medbroker printed them")
    return value


def format_duration(seconds: float) -> str:
    """Render seconds compactly: ``2h``, ``1h30m``, ``45s``."""
    seconds = int(round(seconds))
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:2222`` for IPv6) into a tuple.

    :raises UsageError: when it is not HOST:PORT with a port in 0..65535
    """
    host, sep, port = (text or "").rpartition(":")
    host = host.strip("[]")
    # isascii(): str.isdigit() is also true for '²' and '٢', which int() rejects or reads as digits.
    # len(): a 5000-digit port made int() raise ValueError (Python's digit limit), an internal error (issue 11)
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 <= int(port) <= 65535:
        raise UsageError(f"listen address {text!r} is not HOST:PORT", "e.g. 0.0.0.0:2222 or 127.0.0.1:2222")
    return host, int(port)


@dataclass(frozen=True)
class ListenConfig:
    """Vendor-facing SSH listener."""

    address: str = "0.0.0.0:2222"
    host_key: str = "keys/host_ed25519"
    server_version: str = "medbroker"
    login_timeout: str = "30s"
    keepalive_interval: str = "30s"
    public_host: str = "broker"
    """How vendors address the broker (used in the hints the broker prints)."""
    workers: int = 1
    proxy_protocol_from: tuple[str, ...] = ()
    """Balancer addresses or networks whose connections start with a PROXY protocol v2 header (broker/balancer.py);
    empty = no balancer. Connections from anywhere else must not carry one."""


@dataclass(frozen=True)
class GrantConfig:
    """Approval and time-window rules."""

    max_duration: str = "8h"
    request_ttl: str = "24h"
    warnings: tuple[str, ...] = ("5m", "1m", "10s")
    critical_approvers: int = 2


@dataclass(frozen=True)
class RecordingConfig:
    """Where and how sessions are recorded."""

    dir: str = "recordings"
    mode: str = "strict"
    encrypt: bool = True
    signing_key: str = "keys/signing_ed25519.pem"
    data_key: str = "keys/data.key"
    keep_uploads: bool = False
    journal: bool = False
    journal_timeout: str = "10s"
    journal_keep: bool = False
    ack_window: str = "256KiB"
    """The acknowledgment window (docs/recording-format.md): payload a session may hand on (to the vendor or the
    device) before the writer has written it (and, with ``journal``, committed it). 256 KiB to 8 MiB."""


@dataclass(frozen=True)
class UpstreamConfig:
    """Connections from the broker to devices."""

    connect_timeout: str = "10s"
    keepalive_interval: str = "30s"


@dataclass(frozen=True)
class LimitsConfig:
    """Front-door limits asyncssh does not have built in."""

    max_auth_failures: int = 5
    failure_window: str = "10m"
    lockout: str = "15m"
    max_unauthenticated: int = 64
    max_connections_per_address: int = 32
    max_channels_per_connection: int = 10
    # Pre-authentication slots (issue 11, finding 9; docs/security.md "Pre-authentication slots"). Addresses
    # with a successful login within recent_login_window are "recent": only the two caps above apply to them.
    max_unauthenticated_per_address: int = 8  # logins in progress one address without a recent login may hold
    max_startups: str = "50:30:100"   # start:rate:full, percent of max_unauthenticated (OpenSSH MaxStartups)
    reserved_for_recent: int = 25     # percent of max_unauthenticated only recent addresses may use
    recent_login_window: str = "24h"
    penalty_authfail: str = "5s"      # OpenSSH PerSourcePenalties: added per failed login ...
    penalty_grace: str = "20s"        # ... per login left unfinished until listen.login_timeout
    penalty_min: str = "30s"          # an address is refused once its penalty reaches this ...
    penalty_max: str = "10m"          # ... for at most this long


@dataclass(frozen=True)
class PolicyConfig:
    """Patient-data protection defaults."""

    protected_paths_file: str = ""
    scan_output: bool = True
    check_commands: bool = True
    exposed_shell: str = "two-approvers"
    containment_ttl: str = "60s"
    max_opaque_output: str = "64KiB"
    """Per session: output that cannot be inspected (compressed, encrypted, random) before the session
    ends with an alert; "0" turns the limit off. See docs/data-protection.md."""
    forward_tls: str = "contained-only"
    """TLS through an approved port forward (it cannot be inspected): "contained-only" (only on devices whose
    login cannot read patient data), "allow" or "refuse". See docs/security.md "Port forwards"."""


@dataclass(frozen=True)
class AlertConfig:
    """Where denials and detections are sent besides the audit log."""

    file: str = "alerts.jsonl"
    webhook_url: str = ""


@dataclass(frozen=True)
class RetentionConfig:
    """How long recordings are kept (floor 180 days, Cybersecurity Law Art. 21)."""

    days: int = 180
    allow_below_floor: bool = False


@dataclass(frozen=True)
class WebConfig:
    """The web console (``medbroker serve --web``) and its notifications."""

    address: str = ""
    """HOST:PORT to listen on; empty means off (``serve --web`` overrides)."""
    public_url: str = ""
    """How people reach the console, used in sign-in links and notifications (default: from address)."""
    link_ttl: str = "10m"
    idle_timeout: str = "30m"
    session_max: str = "12h"
    share_max: str = "30d"
    tls_cert: str = ""
    tls_key: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "medbroker@localhost"
    smtp_to: tuple[str, ...] = ()
    smtp_starttls: bool = False
    webhook_url: str = ""
    webhook_secret_file: str = ""
    """A file holding the webhook signing secret (>= 16 bytes); "" = unsigned webhooks."""


@dataclass(frozen=True)
class SiemConfig:
    """Copies of every audit event for a SIEM: a rotated JSON-lines file and/or RFC 5424 syslog."""

    jsonl_file: str = ""
    """Path of the JSON-lines file ("" = off); rotated to FILE.1 … FILE.N at ``jsonl_max_bytes``."""
    jsonl_max_bytes: int = 10 * 1024 * 1024
    jsonl_backups: int = 5
    syslog_address: str = ""
    """``udp://HOST:PORT``, ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (RFC 5425) of the collector ("" = off)."""
    syslog_app_name: str = "medbroker"
    syslog_hostname: str = ""
    """HOSTNAME field of each message, and the ``host`` of every exported record ("" = this machine's name)."""
    syslog_bom: bool = False
    """Start MSG with the UTF-8 BOM (RFC 5424 §6.4 MSG-UTF8). Off: MSG-ANY, which naive JSON parsers read."""
    syslog_sd_id: str = "medbroker@32473"
    """Structured-data id, NAME@ENTERPRISE-NUMBER; set your organisation's IANA number (32473 is RFC 5612's
    documentation number: medbroker owns none)."""
    syslog_ca_file: str = ""
    """tls://: the CA bundle that signs the collector's certificate ("" = the system's CAs)."""
    syslog_client_cert: str = ""
    """tls://: a client certificate (PEM) for collectors that require one ("" = none)."""
    syslog_client_key: str = ""
    """tls://: the client certificate's private key (PEM; "" = in syslog_client_cert)."""
    syslog_server_name: str = ""
    """tls://: the name the collector's certificate must carry ("" = the host of syslog_address)."""
    format: str = "medbroker"
    """Record shape in the JSON-lines file and syslog MSG: "medbroker" (docs/events.md) or "ecs" (Elastic
    Common Schema field names, which Elastic and Splunk map without custom parsing)."""


@dataclass(frozen=True)
class DirectoryConfig:
    """LDAP / Active Directory accounts (broker/directory.py, docs/directory.md)."""

    url: str = ""
    """ldap://HOST:389 or ldaps://HOST:636 ("" = no directory)."""
    starttls: bool = False
    ca_file: str = ""
    """CA bundle that signs the directory's certificate (ldaps:// or starttls; "" = the system's CAs)."""
    bind_dn: str = ""
    """The service account medbroker searches with ("" = anonymous)."""
    bind_password_file: str = ""
    """A file holding the service account's password (kept out of broker.toml)."""
    user_base: str = ""
    user_filter: str = "(&(objectClass=inetOrgPerson)(uid={name}))"
    """{name} is the user name, escaped; Active Directory: (&(objectClass=user)(sAMAccountName={name}))."""
    admin_group: str = ""
    security_group: str = ""
    approver_group: str = ""
    vendor_group: str = ""
    ssh_key_attribute: str = ""
    """e.g. "sshPublicKey": SSH keys of directory users come from it ("" = directory users have no SSH keys)."""
    company_attribute: str = "o"
    sync_interval: str = "5m"
    """How often every directory user is re-read (disabled or removed ones lose access then)."""
    timeout: str = "5s"


@dataclass(frozen=True)
class ArchiveConfig:
    """Sealed recordings copied to S3-compatible object storage (broker/archive.py, docs/ha.md)."""

    url: str = ""
    """``s3://BUCKET/PREFIX``: where recordings go, each under PREFIX + its key ("" = no archive)."""
    endpoint: str = ""
    """``http(s)://HOST[:PORT]`` of the S3 API (Swift's s3api, Ceph RGW, ...); "" = AWS for ``region``."""
    region: str = "us-east-1"
    """The SigV4 signing region (S3-compatible servers mostly take us-east-1)."""
    access_key_file: str = ""
    """A file holding the access key id."""
    secret_key_file: str = ""
    """A file holding the secret access key (never logged; keep it 0600)."""
    delete_local_after: str = "never"
    """When the local copy of a verified archived recording is removed: "never" (false), "now" (true: right
    after the upload is verified) or a duration after archiving, e.g. "7d"."""
    part_size: str = "16MiB"
    """Multipart upload part size, 5MiB-5GiB (S3's limits); a killed upload resumes at a part boundary."""
    interval: str = "1m"
    """How often ``medbroker serve`` archives what was sealed since (``medbroker archive run``: now)."""
    timeout: str = "30s"
    """Connect and read timeout of each request to the object store."""

    _bool_too = ("delete_local_after",)
    """Keys that also take TOML true/false (stored as "now"/"never")."""


@dataclass(frozen=True)
class DisplayConfig:
    """How times are shown to people (the CLI, the web console, reports, messages to vendors)."""

    timezone: str = ""
    """IANA zone name, e.g. "Asia/Shanghai" or "UTC"; "" = the host's zone. JSON output stays UTC."""


@dataclass(frozen=True)
class MetricsConfig:
    """Health, readiness and Prometheus metrics (broker/health.py)."""

    address: str = ""
    """HOST:PORT of a listener serving only /healthz, /readyz and /metrics ("" = none; the web console, when
    it runs, serves them too)."""
    min_free_mb: int = 1024
    """/readyz fails when the recordings volume has less free space than this (MiB)."""


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}", re.ASCII)


def parse_node_id(text: str) -> str:
    """A cluster node id (``[cluster] node_id``, ``serve --node-id``): 1-253 ASCII letters, digits, '.', '_',
    '-', starting with a letter or digit (a host name fits).

    :raises UsageError: anything else
    """
    if not isinstance(text, str) or not _NODE_ID.fullmatch(text):
        raise UsageError(f"node id {text!r} is not 1-253 letters, digits, '.', '_' or '-' starting with a letter or "
                         "digit", 'e.g. node_id = "broker-a" (or "" for this machine\'s host name)')
    return text


@dataclass(frozen=True)
class ClusterConfig:
    """Several broker nodes sharing one database (broker/nodes.py, docs/ha.md "Nodes")."""

    node_id: str = ""
    """This node's id in the ``nodes`` table and on its sessions; "" = this machine's host name."""
    heartbeat: str = "1s"
    """How often this node writes its heartbeat."""
    dead_after: str = "10s"
    """A node silent this long is dead: a survivor seals its live sessions and marks them incomplete."""


@dataclass(frozen=True)
class StoreConfig:
    """Where the broker's state lives (docs/ha.md "PostgreSQL store")."""

    url: str = ""
    """"" = the SQLite file medbroker.db in the home; "postgresql://USER@/DB?host=/SOCKET/DIR" or
    "postgresql://USER@HOST:PORT/DB" = a PostgreSQL database shared by every broker node."""


@dataclass(frozen=True)
class BrokerConfig:
    """The whole validated configuration; paths are relative to ``home`` unless absolute."""

    home: Path
    listen: ListenConfig = field(default_factory=ListenConfig)
    grants: GrantConfig = field(default_factory=GrantConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    web: WebConfig = field(default_factory=WebConfig)
    siem: SiemConfig = field(default_factory=SiemConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    display: DisplayConfig = field(default_factory=DisplayConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    _seconds: dict[tuple[str, str], int] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Durations parsed once: :func:`load_config` parses every one while it validates; a config made with
    ``replace()`` (e.g. ``with_web``) starts empty and parses each on first use."""

    def path(self, value: str) -> Path:
        """Resolve a configured path against the broker home."""
        p = Path(value)
        return p if p.is_absolute() else self.home / p

    def seconds(self, section: str, key: str) -> int:
        """A configured duration in seconds, e.g. ``seconds("grants", "max_duration")``; parsed once.

        :raises UsageError: the value is not a duration (:func:`load_config` has refused such a file already)
        """
        value = self._seconds.get((section, key))
        if value is None:
            value = self._seconds[(section, key)] = parse_duration(getattr(getattr(self, section), key),
                                                                   what=f"{section}.{key}")
        return value

    @property
    def durations(self) -> dict[tuple[str, str], int]:
        """Every duration parsed so far, in seconds, by (section, key): all of them after :func:`load_config`."""
        return dict(self._seconds)

    @property
    def db_path(self) -> Path:
        return self.home / "medbroker.db"

    @property
    def recordings_dir(self) -> Path:
        return self.path(self.recording.dir)

    def with_listen(self, address: str) -> "BrokerConfig":
        """A copy listening on another address (``serve --listen``)."""
        parse_listen(address)
        return replace(self, listen=replace(self.listen, address=address))

    def with_node_id(self, node_id: str) -> "BrokerConfig":
        """A copy with another cluster node id (``serve --node-id``).

        :raises UsageError: not a node id
        """
        return replace(self, cluster=replace(self.cluster, node_id=parse_node_id(node_id)))

    def with_web(self, address: str) -> "BrokerConfig":
        """A copy with the web console on ``address`` (``serve --web HOST:PORT``).

        :raises ConfigError: bad address, or a network address without TLS
        """
        web = replace(self.web, address=address)
        _validate_web(web, "--web")
        return replace(self, web=web)


_SECTIONS = {
    "listen": ListenConfig,
    "grants": GrantConfig,
    "recording": RecordingConfig,
    "upstream": UpstreamConfig,
    "limits": LimitsConfig,
    "policy": PolicyConfig,
    "alerts": AlertConfig,
    "retention": RetentionConfig,
    "web": WebConfig,
    "siem": SiemConfig,
    "metrics": MetricsConfig,
    "display": DisplayConfig,
    "directory": DirectoryConfig,
    "cluster": ClusterConfig,
    "archive": ArchiveConfig,
    "store": StoreConfig,
}


def _build_section(name: str, cls: type, raw: Any, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {name}.{key}",
                f"known keys in [{name}]: {', '.join(sorted(known))}",
            )
        default = known[key].default
        if isinstance(value, bool) and key in getattr(cls, "_bool_too", ()):
            value = "now" if value else "never"
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: {name}.{key} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {name}.{key} = {value!r}; expected true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{source}: {name}.{key} = {value!r}; expected a whole number >= 0")
        elif not isinstance(value, str):
            raise ConfigError(f"{source}: {name}.{key} = {value!r}; expected a string")
        elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ConfigError(f"{source}: {name}.{key} contains a control character", "remove it")
        values[key] = value
    return cls(**values)


def _validate(cfg: BrokerConfig, source: str) -> None:
    durations = [
        ("listen", "login_timeout"),
        ("listen", "keepalive_interval"),
        ("grants", "max_duration"),
        ("grants", "request_ttl"),
        ("upstream", "connect_timeout"),
        ("upstream", "keepalive_interval"),
        ("limits", "failure_window"),
        ("limits", "lockout"),
        ("limits", "recent_login_window"),
        ("limits", "penalty_authfail"),
        ("limits", "penalty_grace"),
        ("limits", "penalty_min"),
        ("limits", "penalty_max"),
        ("web", "link_ttl"),
        ("web", "idle_timeout"),
        ("web", "session_max"),
        ("web", "share_max"),
        ("directory", "sync_interval"),
        ("directory", "timeout"),
        ("recording", "journal_timeout"),
        ("cluster", "heartbeat"),
        ("cluster", "dead_after"),
        ("archive", "interval"),
        ("archive", "timeout"),
    ]
    for section, key in durations:
        try:
            cfg.seconds(section, key)
        except UsageError as exc:
            raise ConfigError(f"{source}: {exc.message}", exc.hint) from None  # the message names section.key
    for w in cfg.grants.warnings:
        try:
            parse_duration(w)
        except UsageError as exc:
            raise ConfigError(f"{source}: grants.warnings: {exc.message}", exc.hint) from None
    try:
        parse_listen(cfg.listen.address)
    except UsageError as exc:
        raise ConfigError(f"{source}: listen.address: {exc.message}", exc.hint) from None
    _validate_web(cfg.web, source)
    _validate_siem(cfg.siem, source)
    if cfg.metrics.address:
        try:
            parse_listen(cfg.metrics.address)
        except UsageError as exc:
            raise ConfigError(f"{source}: metrics.address: {exc.message}", exc.hint) from None
    _validate_directory(cfg.directory, source)
    _validate_cluster(cfg, source)
    _validate_archive(cfg, source)
    try:
        display_zone(cfg.display.timezone)
    except ValueError as exc:
        raise ConfigError(f"{source}: display.timezone: {exc}", 'an IANA name such as "Europe/Berlin", '
                          '"Asia/Shanghai" or "UTC"; "" = the host\'s zone') from None
    if not 0 <= cfg.metrics.min_free_mb <= 1 << 24:
        raise ConfigError(f"{source}: metrics.min_free_mb = {cfg.metrics.min_free_mb}; expected 0-16777216 (MiB)")
    try:
        parse_size(cfg.policy.max_opaque_output)
    except ValueError as exc:
        raise ConfigError(f"{source}: policy.max_opaque_output = {cfg.policy.max_opaque_output!r}; {exc}",
                          'e.g. max_opaque_output = "64KiB" ("0" turns the limit off)') from None
    if cfg.recording.mode not in ("strict", "best_effort"):
        raise ConfigError(f"{source}: recording.mode = {cfg.recording.mode!r}; expected 'strict' or 'best_effort'")
    if not 1 <= cfg.seconds("recording", "journal_timeout") <= 300:
        raise ConfigError(f"{source}: recording.journal_timeout = {cfg.recording.journal_timeout!r}; expected "
                          "1s to 5m", "sessions pause while the journal is down and end after this long; "
                          'e.g. journal_timeout = "10s"')
    try:
        window = parse_size(cfg.recording.ack_window)
    except ValueError as exc:
        raise ConfigError(f"{source}: recording.ack_window = {cfg.recording.ack_window!r}; {exc}",
                          'e.g. ack_window = "256KiB" (the default) or "1MiB"') from None
    if not ACK_WINDOW_MIN <= window <= ACK_WINDOW_MAX:
        raise ConfigError(f"{source}: recording.ack_window = {cfg.recording.ack_window!r}; expected 256KiB to 8MiB",
                          "below 256 KiB an SFTP reply or a batch of output would not fit it; above 8 MiB a "
                          "failed write or a lost node leaves too much unrecorded")
    if cfg.recording.journal_keep and not cfg.recording.journal:
        raise ConfigError(f"{source}: recording.journal_keep = true needs recording.journal = true",
                          "without the journal there are no rows to keep")
    if cfg.policy.forward_tls not in ("contained-only", "allow", "refuse"):
        raise ConfigError(f"{source}: policy.forward_tls = {cfg.policy.forward_tls!r}; expected 'contained-only', "
                          "'allow' or 'refuse'", 'e.g. forward_tls = "contained-only" (the default)')
    if cfg.policy.exposed_shell not in ("allow", "files-only", "two-approvers"):
        raise ConfigError(f"{source}: policy.exposed_shell = {cfg.policy.exposed_shell!r}; expected 'allow', "
                          "'files-only' or 'two-approvers'")
    try:
        cfg.seconds("policy", "containment_ttl")
    except UsageError as exc:
        raise ConfigError(f"{source}: {exc.message}", exc.hint) from None
    if cfg.grants.critical_approvers not in (1, 2, 3):
        raise ConfigError(f"{source}: grants.critical_approvers must be 1, 2 or 3")
    version = cfg.listen.server_version
    if not 1 <= len(version) <= 245 or not all(0x20 < ord(c) < 0x7F for c in version):
        raise ConfigError(f"{source}: listen.server_version = {version!r}; use 1-245 printable ASCII characters "
                          "without spaces", 'e.g. "medbroker"')
    for key in ("max_unauthenticated", "max_connections_per_address", "max_channels_per_connection"):
        if getattr(cfg.limits, key) < 1:
            raise ConfigError(f"{source}: limits.{key} must be at least 1", "0 would refuse every connection")
    if cfg.limits.max_auth_failures < 1:
        raise ConfigError(f"{source}: limits.max_auth_failures must be at least 1")
    _validate_startups(cfg.limits, source)
    _validate_store(cfg.store, source)
    if cfg.listen.workers < 1 or cfg.listen.workers > 64:
        raise ConfigError(f"{source}: listen.workers must be between 1 and 64")
    _validate_balancers(cfg.listen.proxy_protocol_from, source)
    if cfg.retention.days < 180 and not cfg.retention.allow_below_floor:
        raise ConfigError(
            f"{source}: retention.days = {cfg.retention.days} is below the 180-day floor",
            "logs must be kept at least six months (Cybersecurity Law Art. 21); "
            "set retention.allow_below_floor = true only with a documented exemption",
        )


def _validate_balancers(entries: tuple[str, ...], source: str) -> None:
    """``listen.proxy_protocol_from``: IP addresses or networks, each exact (no host bits), none that is everyone."""
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                wide = ipaddress.ip_network(entry, strict=False)
                host = entry.split("/")[0]
                raise ConfigError(f"{source}: listen.proxy_protocol_from: {entry!r} has host bits set",
                                  f"write the network ({wide}) or the one balancer ({host}/"
                                  f"{wide.max_prefixlen})") from None
            raise ConfigError(f"{source}: listen.proxy_protocol_from: {entry!r} is not an IP address or network",
                              'list the balancers\' addresses, e.g. ["10.0.0.5", "10.0.0.6/32"]') from None
        if net.prefixlen == 0:
            raise ConfigError(f"{source}: listen.proxy_protocol_from: {entry!r} would let every client claim "
                              "any address (lockout, caps and audit would trust it)",
                              "list only the balancers' addresses")


def parse_startups(text: str) -> tuple[int, int, int]:
    """``limits.max_startups``: ``start:rate:full`` as three whole percentages of ``max_unauthenticated``.

    :raises UsageError: not three numbers, or not 0 <= start <= full <= 100 and 0 <= rate <= 100
    """
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise UsageError(f"limits.max_startups = {text!r} is not start:rate:full",
                         'three whole percentages of max_unauthenticated, e.g. "50:30:100"')
    start, rate, full = (int(p) for p in parts)
    if not (0 <= start <= full <= 100 and rate <= 100):
        raise UsageError(f"limits.max_startups = {text!r}: need start <= full <= 100 and rate <= 100",
                         'e.g. "50:30:100": from 50 % of max_unauthenticated drop 30 %, rising to all at 100 %')
    return start, rate, full


def _validate_startups(limits: LimitsConfig, source: str) -> None:
    if limits.max_unauthenticated_per_address < 1:
        raise ConfigError(f"{source}: limits.max_unauthenticated_per_address must be at least 1",
                          "0 would refuse every connection from an address without a recent login")
    try:
        parse_startups(limits.max_startups)
    except UsageError as exc:
        raise ConfigError(f"{source}: {exc.message}", exc.hint) from None
    if limits.reserved_for_recent > 90:
        raise ConfigError(f"{source}: limits.reserved_for_recent = {limits.reserved_for_recent} is over 90",
                          "it is the percent of max_unauthenticated kept for recent addresses; e.g. 25")
    if parse_duration(limits.penalty_min) > parse_duration(limits.penalty_max):
        raise ConfigError(f"{source}: limits.penalty_min is longer than limits.penalty_max")


def _validate_web(web: WebConfig, source: str) -> None:
    """The console must not hand session cookies or sign-in links to anyone over plain HTTP."""
    if web.address:
        try:
            host, _ = parse_listen(web.address)
        except UsageError as exc:
            raise ConfigError(f"{source}: web.address: {exc.message}", exc.hint) from None
        loopback = host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
        if not loopback and not (web.tls_cert and web.tls_key) and not web.public_url.startswith("https://"):
            raise ConfigError(
                f"{source}: web.address = {web.address!r} is reachable from the network without TLS",
                "set web.tls_cert and web.tls_key, or put an HTTPS proxy in front and set web.public_url = "
                "\"https://...\", or listen on 127.0.0.1")
    if web.public_url and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[^\s]*)?", web.public_url):
        raise ConfigError(f"{source}: web.public_url = {web.public_url!r} is not an http(s) URL",
                          "e.g. https://broker.hospital.example")
    if web.smtp_port > 65535:
        raise ConfigError(f"{source}: web.smtp_port = {web.smtp_port}; expected 1-65535")
    for addr in web.smtp_to:
        if not re.fullmatch(r"[^@\s<>,]+@[^@\s<>,]+", addr):
            raise ConfigError(f"{source}: web.smtp_to: {addr!r} is not an e-mail address")
    if web.webhook_secret_file and not web.webhook_url:
        raise ConfigError(f"{source}: web.webhook_secret_file is set but web.webhook_url is empty",
                          "set the webhook URL too, or remove the secret file setting")
    if web.webhook_url and not re.fullmatch(r"https?://\S+", web.webhook_url):
        raise ConfigError(f"{source}: web.webhook_url = {web.webhook_url!r} is not an http(s) URL")


_PRINTABLE_ASCII = re.compile(r"[!-~]+")  # RFC 5424 PRINTUSASCII: no spaces, no controls


def parse_syslog_address(text: str) -> tuple[str, str, int]:
    """Parse ``udp://HOST:PORT``, ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (``[::1]`` for IPv6) into
    (transport, host, port).

    :raises UsageError: another scheme, or not HOST:PORT with a port in 1..65535
    """
    scheme, sep, rest = (text or "").partition("://")
    if not sep or scheme not in ("udp", "tcp", "tls"):
        raise UsageError(f"syslog address {text!r} is not udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT",
                         "e.g. udp://127.0.0.1:514 or tls://siem.hospital.example:6514")
    host, port = parse_listen(rest)
    if port == 0:
        raise UsageError(f"syslog address {text!r} has port 0", "name the collector's port, e.g. 514")
    return scheme, host, port


def redact_url(url: str) -> str:
    """``url`` with any password shown as ``<secret>`` (safe to log and print)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:<secret>@{parts.netloc.rsplit('@', 1)[1]}"))


def _validate_store(st: StoreConfig, source: str) -> None:
    if not st.url:
        return
    example = ('e.g. "postgresql://medbroker@/medbroker?host=/var/run/postgresql" or '
               '"postgresql://medbroker@db1:5432/medbroker"')
    try:
        parts = urlsplit(st.url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigError(f"{source}: store.url is not a valid URL", example) from None
    shown = redact_url(st.url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{source}: store.url = {shown!r}; expected a postgresql:// URL (or \"\" for the SQLite "
                          "file in the home)", example)
    query = parse_qs(parts.query)
    if not parts.path.strip("/") and "dbname" not in query:
        raise ConfigError(f"{source}: store.url = {shown!r} names no database", example)
    if not parts.hostname and "host" not in query:
        raise ConfigError(f"{source}: store.url = {shown!r} names no host or socket directory", example)


def _validate_directory(d: DirectoryConfig, source: str) -> None:
    if not d.url:
        used = [f.name for f in fields(d) if getattr(d, f.name) != f.default and f.name != "url"]
        if used:
            raise ConfigError(f"{source}: directory.{used[0]} is set but directory.url is empty",
                              'set url = "ldaps://HOST:636" (or ldap://), or remove the [directory] settings')
        return
    if not re.fullmatch(r"ldaps?://[^\s/]+(:\d{1,5})?/?", d.url):
        raise ConfigError(f"{source}: directory.url = {d.url!r} is not ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
    if d.starttls and d.url.startswith("ldaps://"):
        raise ConfigError(f"{source}: directory.starttls with an ldaps:// url; use one of them")
    if "{name}" not in d.user_filter or not (d.user_filter.startswith("(") and d.user_filter.endswith(")")):
        raise ConfigError(f"{source}: directory.user_filter = {d.user_filter!r}; it must be an LDAP filter "
                          "in parentheses containing {name}", "e.g. (&(objectClass=inetOrgPerson)(uid={name}))")
    if not d.user_base:
        raise ConfigError(f"{source}: directory.user_base is empty", 'e.g. "ou=people,dc=hospital,dc=example"')
    if not any((d.admin_group, d.security_group, d.approver_group, d.vendor_group)):
        raise ConfigError(f"{source}: [directory] maps no group to a role",
                          'set e.g. approver_group = "cn=MedBroker-Approvers,ou=groups,dc=hospital,dc=example"')


def _validate_cluster(cfg: BrokerConfig, source: str) -> None:
    if cfg.cluster.node_id:
        try:
            parse_node_id(cfg.cluster.node_id)
        except UsageError as exc:
            raise ConfigError(f"{source}: cluster.node_id: {exc.message}", exc.hint) from None
    beat, dead = cfg.seconds("cluster", "heartbeat"), cfg.seconds("cluster", "dead_after")
    if beat > 60:
        raise ConfigError(f"{source}: cluster.heartbeat = {cfg.cluster.heartbeat!r} is longer than 60s",
                          'a node that writes its heartbeat rarely is noticed late when it dies; e.g. "1s"')
    if dead < 3 * beat:
        raise ConfigError(f"{source}: cluster.dead_after = {cfg.cluster.dead_after!r} is shorter than three "
                          f"heartbeats ({3 * beat}s)", "a node missing one or two heartbeats (a busy moment) must "
                          'not be declared dead; e.g. heartbeat = "1s", dead_after = "10s"')


def _validate_siem(siem: SiemConfig, source: str) -> None:
    if not re.fullmatch(r"[!#-<>?A-\\^-~]{1,23}@[1-9][0-9]{0,9}(\.[0-9]{1,9}){0,3}", siem.syslog_sd_id) \
            or len(siem.syslog_sd_id) > 32:
        raise ConfigError(f"{source}: siem.syslog_sd_id = {siem.syslog_sd_id!r}; expected NAME@ENTERPRISE-NUMBER "
                          "(RFC 5424 §6.3.2, at most 32 printable characters, no '=', ']', '\"' or space)",
                          'e.g. "medbroker@12345" with your organisation\'s IANA private enterprise number')
    if siem.format not in ("medbroker", "ecs"):
        raise ConfigError(f"{source}: siem.format = {siem.format!r}; expected 'medbroker' or 'ecs'")
    tls_files = ("syslog_ca_file", "syslog_client_cert", "syslog_client_key", "syslog_server_name")
    if any(getattr(siem, k) for k in tls_files) and not siem.syslog_address.startswith("tls://"):
        used = next(k for k in tls_files if getattr(siem, k))
        raise ConfigError(f"{source}: siem.{used} is set but siem.syslog_address is not tls://HOST:PORT",
                          "use tls:// for syslog over TLS (RFC 5425), or remove the TLS settings")
    if siem.syslog_client_key and not siem.syslog_client_cert:
        raise ConfigError(f"{source}: siem.syslog_client_key is set without siem.syslog_client_cert")
    if siem.syslog_address:
        try:
            parse_syslog_address(siem.syslog_address)
        except UsageError as exc:
            raise ConfigError(f"{source}: siem.syslog_address: {exc.message}", exc.hint) from None
    if not _PRINTABLE_ASCII.fullmatch(siem.syslog_app_name) or len(siem.syslog_app_name) > 48:
        raise ConfigError(f"{source}: siem.syslog_app_name = {siem.syslog_app_name!r}; expected 1-48 printable "
                          "ASCII characters without spaces (RFC 5424 APP-NAME)")
    if siem.syslog_hostname and (not _PRINTABLE_ASCII.fullmatch(siem.syslog_hostname)
                                 or len(siem.syslog_hostname) > 255):
        raise ConfigError(f"{source}: siem.syslog_hostname = {siem.syslog_hostname!r}; expected 1-255 printable "
                          "ASCII characters without spaces (RFC 5424 HOSTNAME)")
    if siem.jsonl_file and siem.jsonl_max_bytes < 4096:
        raise ConfigError(f"{source}: siem.jsonl_max_bytes = {siem.jsonl_max_bytes}; expected at least 4096")
    if siem.jsonl_backups > 1000:
        raise ConfigError(f"{source}: siem.jsonl_backups = {siem.jsonl_backups}; expected at most 1000")


def load_config(path: Path, *, home: Path | None = None) -> BrokerConfig:
    """Load and validate ``broker.toml``.

    :param path: the TOML file
    :param home: the broker home (default: the file's directory)
    :returns: a frozen :class:`BrokerConfig`
    :raises ConfigError: unreadable file, TOML syntax, unknown keys, bad values
    """
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file", "create a broker home with: medbroker init") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]", f"known sections: {', '.join(sorted(_SECTIONS))}")
        sections[name] = _build_section(name, _SECTIONS[name], value, source)
    cfg = BrokerConfig(home=Path(home or Path(path).parent).resolve(), **sections)
    _validate(cfg, source)
    return cfg


@dataclass(frozen=True)
class Home:
    """The files of a broker home directory."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "broker.toml"


DEFAULT_CONFIG_TOML = """\
# medbroker configuration. Every key is optional; the values shown are the defaults.
# Paths are relative to this file's directory (the broker home) unless absolute.
# Durations are written 90s, 15m, 2h or 1d. Unknown keys are errors: run `medbroker check`.

[listen]
address = "0.0.0.0:2222"          # vendor-facing SSH port (`medbroker serve --listen` overrides)
host_key = "keys/host_ed25519"    # the broker's own SSH host key (ed25519)
server_version = "medbroker"      # neutral SSH version string: no library name or version
login_timeout = "30s"             # unauthenticated connections are dropped after this
keepalive_interval = "30s"        # a silent vendor client is asked this often; 3 unanswered end its session
public_host = "broker"            # how vendors address this broker, used in hints we print
workers = 1                       # processes sharing the port (SO_REUSEPORT)
proxy_protocol_from = []          # balancers (e.g. ["10.0.0.5/32"]) that send PROXY protocol v2 (HAProxy
                                  # send-proxy-v2); their connections must start with it, no other may

[grants]
max_duration = "8h"               # longest window an approver may grant
request_ttl = "24h"               # pending requests expire after this
warnings = ["5m", "1m", "10s"]    # warnings on the vendor's terminal before the window ends
critical_approvers = 2            # distinct approvers needed for devices of class "critical"

[recording]
dir = "recordings"
mode = "strict"                   # strict: no recording, no session. best_effort: warn and continue
encrypt = true                    # AES-256-GCM per frame with keys/data.key
signing_key = "keys/signing_ed25519.pem"
data_key = "keys/data.key"
keep_uploads = false              # keep a copy of every uploaded file for malware forensics
journal = false                   # true: frames are acknowledged only once durable off the node (the database)
journal_timeout = "10s"           # a journal down this long ends sessions (strict) with "the recording store is unreachable"
journal_keep = false              # true: keep journal rows after the recording is sealed (default: drop them)
ack_window = "256KiB"             # at most this much handed on before it is written (256KiB-8MiB; larger: faster bulk)

[upstream]
connect_timeout = "10s"
keepalive_interval = "30s"        # the same towards devices: a device that stops answering ends the session

[limits]
max_auth_failures = 5             # per user and source address within failure_window ...
failure_window = "10m"
lockout = "15m"                   # ... locks that pair for this long
max_unauthenticated = 64          # connections still authenticating, broker-wide
max_connections_per_address = 32
max_channels_per_connection = 10
# Addresses without a successful login in recent_login_window also face these (docs/security.md):
max_unauthenticated_per_address = 8   # logins in progress per such address
max_startups = "50:30:100"        # random early drop: start:rate:full in % of max_unauthenticated
reserved_for_recent = 25          # % of max_unauthenticated that only recently successful addresses may use
recent_login_window = "24h"
penalty_authfail = "5s"           # penalty per failed login ...
penalty_grace = "20s"             # ... per login left unfinished until listen.login_timeout
penalty_min = "30s"               # refused (dropped at once) while the penalty is at least this ...
penalty_max = "10m"               # ... and never longer than this

[policy]
protected_paths_file = ""         # default: config/protected-paths.toml shipped with medbroker
scan_output = true                # stop DICOM/HL7/ASTM content in shell and exec output
check_commands = true             # refuse exec commands naming protected paths
exposed_shell = "two-approvers"   # exposed devices (login can read a protected path): allow | files-only | two-approvers
containment_ttl = "60s"           # how long a containment check is reused at session start
max_opaque_output = "64KiB"       # per session: compressed/encrypted/random output before it ends ("0": off)
forward_tls = "contained-only"    # TLS through port forwards (not inspectable): contained-only | allow | refuse

[alerts]
file = "alerts.jsonl"             # every denial and detection, one JSON object per line
webhook_url = ""                  # optional: POSTed as JSON

[retention]
days = 180                        # recordings older than this lose their payload (floor 180)
allow_below_floor = false

[web]
address = ""                      # web console HOST:PORT, "" = off (`medbroker serve --web` overrides)
public_url = ""                   # how people reach the console (links); default http://ADDRESS
link_ttl = "10m"                  # one-time sign-in links from `ssh USER@broker web` expire after this
idle_timeout = "30m"              # console sessions end after this long without a request
session_max = "12h"               # ... and after this long in any case
share_max = "30d"                 # longest an auditor's replay link may live
tls_cert = ""                     # PEM files: serve HTTPS directly (required off loopback unless
tls_key = ""                      #   public_url is https:// behind a TLS proxy)
smtp_host = ""                    # e-mail on new requests and decisions ("" = no e-mail)
smtp_port = 25
smtp_from = "medbroker@localhost"
smtp_to = []                      # e.g. ["biomed-oncall@hospital.example"]
smtp_starttls = false
webhook_url = ""                  # POSTed as JSON on new requests and decisions
webhook_secret_file = ""          # file with the HMAC-SHA256 signing secret (>= 16 bytes); docs/web.md

[siem]                            # copies of every audit event (catalogue: docs/events.md)
jsonl_file = ""                   # e.g. "siem/audit.jsonl": one JSON object per line, "" = off
jsonl_max_bytes = 10485760        # rotate to FILE.1, FILE.2, ... at this size
jsonl_backups = 5                 # rotated files kept
syslog_address = ""               # RFC 5424 syslog: "udp://HOST:514", "tcp://HOST:PORT" or "tls://HOST:6514", "" = off
syslog_app_name = "medbroker"
syslog_hostname = ""              # "" = this machine's host name (also the "host" of every exported record)
syslog_bom = false                # true: MSG starts with the UTF-8 BOM (RFC 5424 MSG-UTF8); naive JSON parsers choke on it
syslog_sd_id = "medbroker@32473"  # NAME@YOUR-IANA-ENTERPRISE-NUMBER; 32473 is the documentation number (RFC 5612)
syslog_ca_file = ""               # tls://: CA bundle that signs the collector ("" = system CAs)
syslog_client_cert = ""           # tls://: client certificate PEM, if the collector asks for one
syslog_client_key = ""            # tls://: its key ("" = inside syslog_client_cert)
syslog_server_name = ""           # tls://: name on the collector's certificate ("" = the address's host)
format = "medbroker"              # "medbroker" (docs/events.md) or "ecs" (Elastic Common Schema field names)

[metrics]                         # /healthz, /readyz, /metrics (Prometheus); docs/operations.md
address = ""                      # e.g. "127.0.0.1:9464": a listener for them alone ("" = only on the web console)
min_free_mb = 1024                # /readyz fails below this much free space on the recordings volume

[directory]                       # LDAP / Active Directory accounts (docs/directory.md); url "" = off
url = ""                          # "ldaps://dc1.hospital.example:636" or "ldap://HOST:389" (+ starttls)
starttls = false
ca_file = ""                      # CA that signs the directory's certificate ("" = system CAs)
bind_dn = ""                      # service account for searches ("" = anonymous)
bind_password_file = ""           # file with its password
user_base = ""                    # e.g. "ou=people,dc=hospital,dc=example"
user_filter = "(&(objectClass=inetOrgPerson)(uid={name}))"   # AD: (&(objectClass=user)(sAMAccountName={name}))
admin_group = ""                  # group DNs whose members get each role (first match wins, in this order)
security_group = ""
approver_group = ""               # e.g. "cn=MedBroker-Approvers,ou=groups,dc=hospital,dc=example"
vendor_group = ""
ssh_key_attribute = ""            # e.g. "sshPublicKey": directory users' SSH keys ("" = none)
company_attribute = "o"
sync_interval = "5m"              # re-read every directory user; disabled or removed ones lose access
timeout = "5s"

[archive]                         # sealed recordings copied to S3-compatible storage (docs/ha.md); url "" = off
url = ""                          # "s3://BUCKET/PREFIX", e.g. "s3://medbroker-recordings/site-a/"
endpoint = ""                     # "https://s3.hospital.example" (Swift s3api, Ceph RGW, ...); "" = AWS
region = "us-east-1"              # SigV4 signing region
access_key_file = ""              # file with the access key id
secret_key_file = ""              # file with the secret key (chmod 600; never logged)
delete_local_after = "never"      # "never" (false), "now" (true: once the upload is verified) or e.g. "7d"
part_size = "16MiB"               # multipart part size, 5MiB-5GiB; a killed upload resumes at a part boundary
interval = "1m"                   # how often `medbroker serve` archives newly sealed recordings
timeout = "30s"                   # connect/read timeout per request to the object store

[display]                         # how times are shown to people (JSON output stays UTC)
timezone = ""                     # IANA name, e.g. "Asia/Shanghai" or "UTC"; "" = this host's zone

[cluster]                         # several nodes sharing one database (docs/ha.md "Nodes")
node_id = ""                      # this node's id ("" = the host name; `serve --node-id` overrides)
heartbeat = "1s"                  # how often this node writes its heartbeat
dead_after = "10s"                # silent this long = dead: a survivor seals its sessions (>= 3 heartbeats)
[store]                           # where state lives (docs/ha.md "PostgreSQL store")
url = ""                          # "" = medbroker.db here; or "postgresql://USER@/DB?host=/SOCKET/DIR" (several nodes)
"""


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", re.ASCII)


def parse_archive_url(text: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> ``(bucket, prefix)``; the prefix is "" or ends with "/".

    :raises UsageError: another scheme, a bucket name S3 does not allow, or a prefix with ``.``/``..`` parts,
        a leading or doubled ``/``, a backslash or a control character
    """
    scheme, sep, rest = (text or "").partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not sep or not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UsageError(f"archive url {text!r} is not s3://BUCKET/PREFIX",
                         "BUCKET: 3-63 lower-case letters, digits, '.' and '-'; e.g. s3://medbroker-recordings/site-a/")
    parts = prefix.rstrip("/").split("/") if prefix else []
    if any(p in ("", ".", "..") for p in parts) or "\\" in prefix or len(prefix) > 512 \
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        raise UsageError(f"archive url {text!r}: the prefix must be plain names separated by single '/'",
                         "e.g. s3://medbroker-recordings/site-a/ (or no prefix: s3://medbroker-recordings)")
    return bucket, ("/".join(parts) + "/") if parts else ""


def _validate_archive(cfg: BrokerConfig, source: str) -> None:
    a = cfg.archive
    if not a.url:
        used = [f.name for f in fields(a) if getattr(a, f.name) != f.default and f.name != "url"]
        if used:
            raise ConfigError(f"{source}: archive.{used[0]} is set but archive.url is empty",
                              'set url = "s3://BUCKET/PREFIX", or remove the [archive] settings')
        return
    try:
        parse_archive_url(a.url)
    except UsageError as exc:
        raise ConfigError(f"{source}: archive.url: {exc.message}", exc.hint) from None
    if a.endpoint and not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?/?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?/?",
                                       a.endpoint):
        raise ConfigError(f"{source}: archive.endpoint = {a.endpoint!r} is not http(s)://HOST[:PORT]",
                          'e.g. endpoint = "https://s3.hospital.example" or "http://127.0.0.1:8080"; user names, '
                          "passwords and paths do not belong in it (keys go in access_key_file/secret_key_file)")
    if not re.fullmatch(r"[a-z0-9][a-z0-9\-]{0,39}", a.region, re.ASCII):
        raise ConfigError(f"{source}: archive.region = {a.region!r}; expected a region name such as us-east-1")
    for key in ("access_key_file", "secret_key_file"):
        if not getattr(a, key):
            raise ConfigError(f"{source}: archive.{key} is empty",
                              f"name a file holding the {'access key id' if key == 'access_key_file' else 'secret key'} "
                              "(keys are never written into broker.toml)")
    if a.delete_local_after not in ("never", "now"):
        try:
            cfg.seconds("archive", "delete_local_after")
        except UsageError as exc:
            raise ConfigError(f"{source}: {exc.message}",
                              '"never" (false), "now" (true) or a duration after archiving such as "7d"') from None
    try:
        part = parse_size(a.part_size)
    except ValueError as exc:
        raise ConfigError(f"{source}: archive.part_size = {a.part_size!r}; {exc}", 'e.g. part_size = "16MiB"') from None
    if not 5 << 20 <= part <= 5 << 30:
        raise ConfigError(f"{source}: archive.part_size = {a.part_size!r} is outside 5MiB-5GiB",
                          "S3 refuses smaller parts (except the last) and larger ones; e.g. 16MiB")
