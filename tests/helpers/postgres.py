"""A real PostgreSQL 15 (Debian's postgresql-15) for the PostgreSQL store's tests, one per test session.

``initdb`` and ``postgres`` refuse to run as root (CI runs the suite as root), so when we are root they run as
``nobody`` in a private temp dir. The server listens on a unix socket in that dir and on 127.0.0.1 (a free
port), trusts local connections, and runs without fsync (a test database need not survive a power cut).
Each test gets its own database, made from a migrated template (``CREATE DATABASE ... TEMPLATE``: a file copy,
~60 ms) and dropped afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from itertools import count
from pathlib import Path
from typing import Any

from helpers.net import free_port

__all__ = ["Postgres", "postgres_bindir"]

SUPERUSER = "medbroker"
TEMPLATE = "medbroker_template"
_serial = count(1)


def postgres_bindir() -> Path | None:
    """Where initdb and postgres are: ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10,
                                             check=True).stdout.strip())
        except (subprocess.SubprocessError, OSError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for c in candidates:
        if c and os.access(os.path.join(c, "initdb"), os.X_OK) and os.access(os.path.join(c, "postgres"), os.X_OK):
            return Path(c)
    return None


def _as_user() -> dict[str, Any]:
    """Popen arguments that drop root to ``nobody`` (nothing when we are not root)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


class Postgres:
    """A throwaway cluster: ``socket_dir``, ``port``, ``url(db)``, ``new_database()``, ``drop()``, ``stop()``."""

    def __init__(self, *, durable: bool = False, parent: Path | None = None) -> None:
        """:param durable: keep fsync and synchronous commit on (benchmarks); tests run without them
        :param parent: make the cluster's directory here (scripts/cluster-demo.sh: its state directory), which
            ``nobody`` must be able to reach; default /tmp
        """
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed; run scripts/install.sh")
        self.bindir = bindir
        # under /tmp, not $TMPDIR: a root-only temp dir (pytest's are 0700) would keep `nobody` out
        default = "/tmp" if os.path.isdir("/tmp") else None
        self.dir = Path(tempfile.mkdtemp(prefix="medbroker-pg-", dir=str(parent) if parent else default))
        self.dir.chmod(0o755)
        self.data, self.socket_dir = self.dir / "data", self.dir / "sock"
        self.socket_dir.mkdir()
        drop = _as_user()
        if drop:
            os.chown(self.dir, drop["user"], drop["group"])
            os.chown(self.socket_dir, drop["user"], drop["group"])
        self.port = free_port()
        self.log_path = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run([str(bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"], cwd=self.dir, capture_output=True,
                       timeout=120, check=True, **drop)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n".join([
                "listen_addresses = '127.0.0.1'", f"port = {self.port}",
                f"unix_socket_directories = '{self.socket_dir}'",
                *(() if durable else ("fsync = off", "synchronous_commit = off", "full_page_writes = off")),
                "max_connections = 200", "shared_buffers = 32MB", "logging_collector = off",
                "log_min_messages = warning", "deadlock_timeout = 200ms",
            ]) + "\n")
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(self.data)], cwd=self.dir,
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **drop)
        try:
            self._wait_up()
            self._make_template()
        except BaseException:
            self.stop()
            raise

    def url(self, db: str = "postgres", *, tcp: bool = False) -> str:
        if tcp:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{db}"
        return f"postgresql://{SUPERUSER}@/{db}?host={self.socket_dir}&port={self.port}"

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url(), autocommit=True, connect_timeout=10)

    def _wait_up(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                self.admin().close()
                return
            except psycopg.Error as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"postgres did not answer within 30 s (last: {last!r})")

    def _make_template(self) -> None:
        from broker.store import open_store

        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        open_store(self.url(TEMPLATE)).close()  # every migration, once

    def new_database(self, *, migrated: bool = True) -> str:
        """A fresh database (the migrated template's copy, or empty); returns its URL."""
        name = f"t{os.getpid()}_{next(_serial)}"
        with self.admin() as conn:
            # FILE_COPY: a plain copy of the template's files, ~60 ms here against ~300 ms for WAL_LOG (PG 15's
            # default, which writes every page to the WAL), and cheap since fsync is off
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE if migrated else 'template0'} STRATEGY FILE_COPY")
        return self.url(name)

    def drop(self, url: str) -> None:
        """Drop a database made by :meth:`new_database` (its connections are ended)."""
        name = url.split("/")[3].split("?")[0]
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown (SIGTERM, smart, waits for every client)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if hasattr(self, "log"):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
