"""SIEM export of the audit stream: a size-rotated JSON-lines file and RFC 5424 syslog over UDP, TCP or TLS."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from broker.config import BrokerConfig, parse_syslog_address

__all__ = ["siem_record", "ecs_record", "export_record", "event_severity", "format_syslog", "JsonLinesSink",
           "SyslogSink", "build_sinks", "FACILITY", "SD_ID", "MAX_UDP_MESSAGE", "RECORD_VERSION"]

log = logging.getLogger("medbroker.siem")

RECORD_VERSION = 1
FACILITY = 13  # RFC 5424 facility 13, "log audit"
# Structured-data id: name@<IANA private enterprise number>. 32473 is the number RFC 5612 reserves for
# documentation; a hospital that owns a number can filter on the name alone ("medbroker@").
SD_ID = "medbroker@32473"
MAX_UDP_MESSAGE = 8192  # rsyslog's and syslog-ng's default maximum; longer events lose their details over UDP
_QUEUE_MAX = 10_000
_SD_ESCAPE = str.maketrans({"\\": "\\\\", '"': '\\"', "]": "\\]"})
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PRINTABLE = re.compile(r"[!-~]{1,255}")

# Severity (RFC 5424) by event. Names not listed here get a rule from their last part.
_SEVERITY = {
    "alert.exfiltration": 2, "device.hostkey.mismatch": 2,
    "recording.failed": 3,
    "auth.lockout": 4, "session.killed": 4, "grant.revoked": 4, "device.unreachable": 4,
    "retention.below_floor": 4, "notify.failed": 4, "cluster.node.dead": 4, "cluster.node.fenced": 3,
    "cluster.sessions.recovered": 4,
}
_WARNING_SUFFIXES = (".denied", ".refused", ".failure", ".failed", ".mismatch")


def event_severity(event: str) -> int:
    """RFC 5424 severity of an audit event: 2 critical, 3 error, 4 warning (refusals, denials), 5 notice."""
    if event in _SEVERITY:
        return _SEVERITY[event]
    return 4 if event.endswith(_WARNING_SUFFIXES) else 5


def siem_record(row: dict[str, Any], host: str | None = None) -> dict[str, Any]:
    """The stable JSON object exported for one committed audit row (documented in docs/events.md).

    :param host: the exporting broker's host name (``host``; several brokers feed one SIEM)
    """
    try:
        details = json.loads(row.get("details") or "{}")
    except (TypeError, ValueError):
        details = {"unparsed": str(row.get("details"))}
    record = {"v": RECORD_VERSION, "id": row.get("id"), "at": row.get("at"), "event": row.get("event"),
              "severity": event_severity(str(row.get("event"))), "actor": row.get("actor"),
              "user": row.get("user_name"), "device": row.get("device"), "session_id": row.get("session_id"),
              "grant_id": row.get("grant_id"), "request_id": row.get("request_id"), "source": row.get("source"),
              "details": details, "hash": row.get("hash"), "prev_hash": row.get("prev_hash")}
    if host is not None:
        record["host"] = host
    return record


_SYSLOG_NAMES = {2: "critical", 3: "error", 4: "warning", 5: "notice"}


def ecs_record(row: dict[str, Any], host: str | None = None) -> dict[str, Any]:
    """The audit row with Elastic Common Schema field names (``event.action``, ``user.name``, ``source.ip``,
    ``host.name``), so Elastic and Splunk map it without a custom parser; medbroker's own fields stay under
    ``medbroker`` (the whole :func:`siem_record`)."""
    rec = siem_record(row, host)
    event = str(rec["event"])
    outcome = "failure" if event.endswith((".denied", ".refused", ".failure", ".failed", ".mismatch")) else "success"
    out: dict[str, Any] = {
        "@timestamp": rec["at"], "ecs": {"version": "8.11.0"},
        "event": {"action": event, "id": str(rec["id"]), "kind": "event", "category": [_ecs_category(event)],
                  "outcome": outcome, "severity": rec["severity"], "dataset": "medbroker.audit",
                  "hash": rec["hash"]},
        "log": {"syslog": {"severity": {"code": rec["severity"], "name": _SYSLOG_NAMES.get(rec["severity"], "notice")}}},
        "observer": {"product": "medbroker", "type": "jump-host"},
        "medbroker": rec,
    }
    if host:
        out["host"] = {"name": host}
    # user.name is who acted (an approver deciding about alice: the approver; alice herself otherwise);
    # user.target.name the person acted on.
    actor, subject = rec["actor"], rec["user"]
    if actor or subject:
        out["user"] = {"name": actor or subject}
        if actor and subject and actor != subject:
            out["user"]["target"] = {"name": subject}
    if rec["source"]:
        out["source"] = {"ip": rec["source"], "address": rec["source"]}
    if rec["device"]:
        out["destination"] = {"address": rec["device"]}
    return out


def _ecs_category(event: str) -> str:
    area = event.split(".", 1)[0]
    return {"auth": "authentication", "session": "session", "sftp": "file", "scp": "file", "transfer": "file",
            "alert": "intrusion_detection", "exec": "process", "user": "iam", "grant": "iam", "request": "iam",
            "device": "host"}.get(area, "configuration")


def export_record(row: dict[str, Any], fmt: str = "medbroker", host: str | None = None) -> dict[str, Any]:
    """The exported object for one audit row in the configured ``[siem] format``."""
    return ecs_record(row, host) if fmt == "ecs" else siem_record(row, host)


def _record_json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), sort_keys=False, default=str)


def _sd_value(value: Any) -> str:
    return _CONTROLS.sub("?", str(value)).translate(_SD_ESCAPE)


def _header_field(value: str) -> str:
    """RFC 5424 header fields are PRINTUSASCII without spaces; anything else becomes the NILVALUE ``-``."""
    return value if _PRINTABLE.fullmatch(value or "") else "-"


def format_syslog(row: dict[str, Any], *, app_name: str = "medbroker", hostname: str = "-",
                  procid: str | None = None, max_bytes: int | None = None, bom: bool = False,
                  sd_id: str = SD_ID, fmt: str = "medbroker") -> bytes:
    """One RFC 5424 message for an audit row (no transport framing).

    ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [medbroker@32473 id=… hash=… …] {json}``: MSGID is
    the event name, the structured data carries the ids that SIEM rules filter on, the MSG is the
    :func:`export_record` JSON (with ``host`` = HOSTNAME). With ``max_bytes`` a longer message has its
    ``details`` replaced by ``{"truncated": true}`` (the full row stays in the database and the JSON-lines
    file).

    :param procid: default: this process id
    :param bom: start MSG with the UTF-8 BOM (RFC 5424 MSG-UTF8); off, MSG is MSG-ANY and starts with ``{``
    :param sd_id: the structured-data id, NAME@ENTERPRISE-NUMBER
    :param fmt: "medbroker" or "ecs" (:func:`ecs_record`)
    """
    host = hostname if hostname not in ("", "-") else None
    base = siem_record(row, host)
    record = export_record(row, fmt, host)
    event = str(base["event"])
    pri = FACILITY * 8 + base["severity"]
    params = [("id", base["id"]), ("hash", base["hash"]), ("actor", base["actor"]), ("user", base["user"]),
              ("device", base["device"]), ("session", base["session_id"]), ("grant", base["grant_id"]),
              ("request", base["request_id"]), ("source", base["source"])]
    sd = "[" + sd_id + "".join(f' {k}="{_sd_value(v)}"' for k, v in params if v is not None) + "]"
    head = (f"<{pri}>1 {_header_field(str(base['at']))} {_header_field(hostname)} {_header_field(app_name)[:48]} "
            f"{_header_field(procid or str(os.getpid()))[:128]} {_header_field(event)[:32]} {sd} ")
    lead = "\ufeff" if bom else ""
    message = (head + lead + _record_json(record)).encode("utf-8", "replace")
    if max_bytes is not None and len(message) > max_bytes:
        inner = record["medbroker"] if fmt == "ecs" else record
        inner["details"] = {"truncated": True, "bytes": len(message)}
        message = (head + lead + _record_json(record)).encode("utf-8", "replace")
    return message


class JsonLinesSink:
    """Append each audit row as one JSON line to a file, rotating it to FILE.1 … FILE.N by size.

    Several processes (the server and CLI commands) may append to the same file: a lock file serialises
    the size check, the rotation and the write. Files are created with mode 0600.
    """

    sink_name = "jsonl"  # the label of its failures in /metrics (broker/audit.py)

    def __init__(self, path: Path, *, max_bytes: int = 10 * 1024 * 1024, backups: int = 5,
                 host: str | None = None, fmt: str = "medbroker",
                 to_record: Any = None) -> None:
        """:param to_record: ``to_record(row) -> dict | None`` instead of the SIEM record (None: skip the row)"""
        self.path = Path(path)
        self.host = host or socket.gethostname()
        self.fmt = fmt
        self.to_record = to_record
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self.written = 0

    def __call__(self, row: dict[str, Any]) -> None:
        """Write one row (called by ``AuditLog`` after the commit).

        :raises OSError: the file cannot be written (``AuditLog`` logs and carries on)
        """
        record = self.to_record(row) if self.to_record is not None else export_record(row, self.fmt, self.host)
        if record is None:
            return
        line = (_record_json(record) + "\n").encode("utf-8", "replace")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    size = self.path.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
                self.written += 1
            finally:
                os.close(lock_fd)  # closing releases the flock

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = Path(f"{self.path}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for i in range(self.backups - 1, 0, -1):
            src = Path(f"{self.path}.{i}")
            if src.exists():
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def close(self) -> None:
        """Nothing is buffered; present so every sink can be closed alike."""


class SyslogSink:
    """Send each audit row as an RFC 5424 message to a collector over UDP, TCP or TLS.

    The calling thread only formats and queues; one background thread sends, so a slow or absent
    collector never holds up the audit log. TCP and TLS (RFC 5425) use octet-counting framing (RFC 6587
    §3.4.1) and reconnect with back-off; TLS verifies the collector's certificate against ``ca_file`` (or
    the system's CAs) and its name, and may present a client certificate. Messages wait in a bounded
    queue (10 000) and are counted in ``dropped`` beyond it or when :meth:`close` gives up. UDP messages
    over 8 KiB lose their ``details``.
    """

    sink_name = "syslog"

    def __init__(self, address: str, *, app_name: str = "medbroker", hostname: str = "",
                 connect_timeout: float = 3.0, queue_max: int = _QUEUE_MAX, bom: bool = False,
                 sd_id: str = SD_ID, fmt: str = "medbroker", ca_file: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 server_name: str | None = None) -> None:
        """:raises UsageError: ``address`` is not udp://, tcp:// or tls://HOST:PORT
        :raises OSError: a TLS certificate or CA file cannot be read"""
        self.transport, self.host, self.port = parse_syslog_address(address)
        self.app_name = app_name
        self.hostname = _header_field(hostname or socket.gethostname())
        self.bom, self.sd_id, self.fmt = bom, sd_id, fmt
        self.server_name = server_name or self.host
        self._tls: ssl.SSLContext | None = None
        if self.transport == "tls":
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(ca_file) if ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if client_cert:
                ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
            self._tls = ctx
        self.connect_timeout = connect_timeout
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_max)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._start_lock = threading.Lock()
        self._pid = os.getpid()
        self.sent = 0
        self.dropped = 0
        self.errors = 0

    def __call__(self, row: dict[str, Any]) -> None:
        """Queue one row for sending (called by ``AuditLog`` after the commit)."""
        if self._closing.is_set():
            self.dropped += 1
            return
        if self._pid != os.getpid():
            self._after_fork()
        limit = MAX_UDP_MESSAGE if self.transport == "udp" else None
        message = format_syslog(row, app_name=self.app_name, hostname=self.hostname, max_bytes=limit, bom=self.bom,
                                sd_id=self.sd_id, fmt=self.fmt)
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            return
        self._ensure_thread()

    def _after_fork(self) -> None:
        """A forked worker inherits no sender thread: start afresh with its own queue and socket."""
        if self._sock is not None:
            self._sock.close()
        self._sock, self._thread, self._pid = None, None, os.getpid()
        self._queue = queue.Queue(maxsize=self._queue.maxsize)
        # Every lock the parent's sender thread may have held at fork() time is copied locked: renew them.
        self._start_lock = threading.Lock()
        self._closing = threading.Event()
        self.sent = self.dropped = self.errors = 0

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="medbroker-syslog", daemon=True)
                self._thread.start()

    def _connect(self) -> socket.socket:
        if self.transport == "udp":
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.server_name)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(10.0)
        return sock

    def _peer_closed(self) -> bool:
        """A collector never sends, so a readable TCP socket means it hung up (a send would be lost)."""
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        if not readable:
            return False
        try:
            if isinstance(self._sock, ssl.SSLSocket):  # TLS cannot peek; a collector sends nothing but close_notify
                self._sock.setblocking(False)
                try:
                    return self._sock.recv(1) == b""
                except (ssl.SSLWantReadError, BlockingIOError):
                    return False
                finally:
                    self._sock.settimeout(10.0)
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send(self, message: bytes) -> None:
        if self._sock is not None and self.transport == "tcp" and self._peer_closed():
            self._drop_socket()
        if self._sock is None:
            self._sock = self._connect()
        if self.transport == "udp":
            self._sock.send(message)
        else:  # tcp and tls: octet counting
            self._sock.sendall(str(len(message)).encode() + b" " + message)

    def _drop_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _run(self) -> None:
        backoff = 0.2
        pending: bytes | None = None
        while True:
            if pending is None:
                try:
                    pending = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._closing.is_set():
                        break
                    continue
            try:
                self._send(pending)
            except OSError as exc:
                self.errors += 1
                self._drop_socket()
                if self.errors == 1 or self.errors % 100 == 0:
                    log.warning("syslog collector %s://%s:%s: %s", self.transport, self.host, self.port, exc)
                if self._closing.is_set():  # shutting down: do not wait for a collector that is not there
                    self.dropped += 1 + self._queue.qsize()
                    break
                self._closing.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.sent += 1
            pending = None
            backoff = 0.2
        self._drop_socket()

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop the thread and close the socket."""
        self._closing.set()
        thread = self._thread
        if thread is not None:
            deadline = time.monotonic() + timeout
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # the collector hangs a send: leave the daemon thread, count the rest
                self.dropped += self._queue.qsize()
                log.warning("syslog: %d queued audit events not sent at exit", self._queue.qsize())
        else:
            self._drop_socket()


def build_sinks(cfg: BrokerConfig) -> list[Any]:
    """The SIEM sinks configured in ``[siem]`` (none by default); each is ``sink(row)`` with ``close()``."""
    siem = cfg.siem
    sinks: list[Any] = []
    host = siem.syslog_hostname or socket.gethostname()
    if siem.jsonl_file:
        sinks.append(JsonLinesSink(cfg.path(siem.jsonl_file), max_bytes=siem.jsonl_max_bytes,
                                   backups=siem.jsonl_backups, host=host, fmt=siem.format))
    if siem.syslog_address:
        sinks.append(SyslogSink(siem.syslog_address, app_name=siem.syslog_app_name, hostname=host,
                                bom=siem.syslog_bom, sd_id=siem.syslog_sd_id, fmt=siem.format,
                                ca_file=cfg.path(siem.syslog_ca_file) if siem.syslog_ca_file else None,
                                client_cert=cfg.path(siem.syslog_client_cert) if siem.syslog_client_cert else None,
                                client_key=cfg.path(siem.syslog_client_key) if siem.syslog_client_key else None,
                                server_name=siem.syslog_server_name or None))
    return sinks
