"""A real OpenStack Swift (Debian's packages) with the ``s3api`` middleware on 127.0.0.1, once per test session.

One replica on one device: rings built with ``swift-ring-builder`` in a temp dir, an account, a container and
an object server, and a proxy whose pipeline puts ``s3api`` before ``tempauth`` (S3 SigV4 with the tempauth
user ``test:tester`` / ``testing``). Every file, ring and ``swift.conf`` lives in that dir (``swift_dir``), so
nothing in /etc/swift is read or changed. Swift keeps object metadata in extended attributes: the devices dir
must support ``user.*`` xattrs (checked before starting; /tmp on ext4 does). Started as root, the servers
drop privileges to the ``swift`` account the Debian package creates (they refuse nothing as root, but the
object files should not be root's); otherwise they run as whoever runs the tests.

Fault tests: :meth:`Swift.kill` SIGKILLs every server (the S3 endpoint disappears mid-request) and
:meth:`Swift.start` brings them back on the same ports with the same data.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers.net import closed_port, free_port

__all__ = ["Swift", "swift_binaries", "ACCESS_KEY", "SECRET_KEY", "REGION"]

ACCESS_KEY = "test:tester"
SECRET_KEY = "testing"
REGION = "us-east-1"
_SERVERS = ("account", "container", "object")
_BINARIES = ("swift-ring-builder", "swift-proxy-server", "swift-account-server", "swift-container-server",
             "swift-object-server")


def swift_binaries() -> dict[str, str] | None:
    """The Swift programs by name, or None when any is missing (``apt-get install swift-proxy ...``)."""
    found = {name: shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
             for name in _BINARIES}
    return None if any(v is None for v in found.values()) else {k: v for k, v in found.items() if v}


def _service_user() -> str:
    """Who the servers run as: ``swift`` when we are root (Debian's package creates it), else ourselves."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("swift")
            return "swift"
        except KeyError:
            return "nobody"
    return pwd.getpwuid(os.geteuid()).pw_name


class Swift:
    """A throwaway Swift cluster speaking S3: ``endpoint``, ``create_bucket``, ``client``, ``kill``, ``start``,
    ``stop``."""

    def __init__(self, *, parent: Path | None = None) -> None:
        """:param parent: make the cluster's directory here (default: the temp dir)"""
        binaries = swift_binaries()
        if binaries is None:
            raise RuntimeError("OpenStack Swift is not installed; run scripts/install.sh")
        self.bin = binaries
        self.dir = Path(tempfile.mkdtemp(prefix="medbroker-swift-", dir=parent))
        self.dir.chmod(0o755)
        self.user = _service_user()
        self.ports = {name: free_port() for name in (*_SERVERS, "proxy")}
        self.endpoint = f"http://127.0.0.1:{self.ports['proxy']}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, object] = {}
        try:
            self._layout()
            self.start()
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ setup
    def _layout(self) -> None:
        devices = self.dir / "srv"
        (devices / "d1").mkdir(parents=True)
        probe = devices / "d1" / ".xattr-probe"
        probe.write_bytes(b"")
        try:
            os.setxattr(probe, "user.medbroker.probe", b"1")
        except OSError as exc:
            raise RuntimeError(f"{devices} does not support user extended attributes ({exc.strerror}); Swift "
                               "keeps object metadata in them: set TMPDIR to an ext4/xfs directory") from exc
        probe.unlink()
        entry = pwd.getpwnam(self.user)
        for path in (devices, devices / "d1"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        (self.dir / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = medbroker-tests\nswift_hash_path_prefix = medbroker\n"
            "[storage-policy:0]\nname = Policy-0\ndefault = yes\n")
        common = (f"[DEFAULT]\nbind_ip = 127.0.0.1\nworkers = 0\nuser = {self.user}\nswift_dir = {self.dir}\n"
                  f"devices = {devices}\nmount_check = false\nlog_level = WARNING\n")
        for name in _SERVERS:
            builder = self.dir / f"{name}.builder"
            for argv in (["create", "6", "1", "0"],
                         ["add", f"r1z1-127.0.0.1:{self.ports[name]}/d1", "100"], ["rebalance"]):
                proc = subprocess.run([self.bin["swift-ring-builder"], str(builder), *argv], capture_output=True,
                                      timeout=60, check=False)
                if proc.returncode not in (0, 1):  # 1: warnings (one device, one replica is what we want)
                    raise RuntimeError(f"swift-ring-builder {' '.join(argv)}: {proc.stdout!r} {proc.stderr!r}")
            (self.dir / f"{name}-server.conf").write_text(
                common + f"bind_port = {self.ports[name]}\n\n[pipeline:main]\npipeline = {name}-server\n\n"
                f"[app:{name}-server]\nuse = egg:swift#{name}\n"
                + ("\n[object-auditor]\n\n[object-replicator]\n" if name == "object" else ""))
        (self.dir / "proxy-server.conf").write_text(
            common + f"bind_port = {self.ports['proxy']}\n\n"
            "[pipeline:main]\npipeline = catch_errors gatekeeper proxy-logging cache s3api tempauth bulk slo dlo "
            "proxy-logging proxy-server\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
            f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = {SECRET_KEY} .admin\n\n"
            f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {REGION}\n\n"
            # tempauth wants a memcache client object; nothing listens there, so it caches nothing
            f"[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:{closed_port()}\n\n"
            "[filter:catch_errors]\nuse = egg:swift#catch_errors\n\n"
            "[filter:gatekeeper]\nuse = egg:swift#gatekeeper\n\n"
            "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n"
            "[filter:bulk]\nuse = egg:swift#bulk\n\n"
            "[filter:slo]\nuse = egg:swift#slo\n\n"
            "[filter:dlo]\nuse = egg:swift#dlo\n")
        for path in self.dir.iterdir():
            if path.is_file():
                path.chmod(0o644)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> None:
        """Start every server that is not running and wait (bounded) until the S3 endpoint answers."""
        for name in (*_SERVERS, "proxy"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                continue
            if name in self.logs:  # a restart after kill(): the old process's log handle
                self.logs[name].close()  # type: ignore[attr-defined]
            log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self.logs[name] = log
            self.procs[name] = subprocess.Popen(
                [self.bin[f"swift-{name}-server"], str(self.dir / f"{name}-server.conf")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"swift-{name}-server exited {proc.returncode}: "
                                       f"{(self.dir / f'{name}.log').read_text(errors='replace')[-3000:]}")
            try:
                # any HTTP answer from the proxy (an unsigned request is refused) means it is up; then the
                # account, container and object servers must accept connections, and a signed request work
                with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                    pass
            except urllib.error.HTTPError as exc:
                last = exc
                if self._storage_up() and self._signed_ok():
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"Swift did not answer within {timeout:.0f} s (last: {last!r})")

    def _storage_up(self) -> bool:
        import socket

        for name in _SERVERS:
            try:
                with socket.create_connection(("127.0.0.1", self.ports[name]), timeout=1):
                    pass
            except OSError:
                return False
        return True

    def _signed_ok(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def kill(self) -> None:
        """SIGKILL every server at once (no goodbye to clients: uploads in flight break)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for log in self.logs.values():
            log.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ for tests
    def client(self):  # noqa: ANN201 - a boto3 S3 client
        """A boto3 S3 client of the test user (what tests use to look at objects independently)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required",
                                          retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def config(self, dir: Path, bucket: str, prefix: str = "", **extra: str) -> str:
        """An [archive] section for broker.toml that points here (the keys go to files in ``dir``)."""
        (dir / "s3-access").write_text(ACCESS_KEY + "\n")
        (dir / "s3-secret").write_text(SECRET_KEY + "\n")
        os.chmod(dir / "s3-secret", 0o600)
        lines = {"url": f'"s3://{bucket}/{prefix}"', "endpoint": f'"{self.endpoint}"', "region": f'"{REGION}"',
                 "access_key_file": f'"{dir / "s3-access"}"', "secret_key_file": f'"{dir / "s3-secret"}"'} | extra
        return "[archive]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())
