"""Shared pytest setup: hypothesis profiles, openssh/root markers, leftover-process check, core fixtures."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from itertools import count
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from helpers import (
    FUZZ_EXAMPLES,
    hypothesis_profile_name,
    missing_openssh_binaries,
    openssh_required,
)
from helpers.keys import KeyPair, generate_keypair
from helpers.net import free_port as _free_port
from helpers.procs import enable_subreaper, kill_tree, living_descendants, reap_zombie_children
from helpers.pty import live_pty_sessions
from helpers.sshd import (
    PasswordDeviceUnavailableError,
    SshdDevice,
    live_devices,
    password_devices_supported,
)

# Profiles apply to every @given test. Parser fuzz tests ask for more with
# @settings(max_examples=FUZZ_EXAMPLES) (4_000 in ci, 300 in dev).
settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile(
    "ci", max_examples=1000, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(hypothesis_profile_name())


def pytest_configure(config: pytest.Config) -> None:
    """Adopt orphaned grandchildren (sshd sessions, backgrounded ssh masters); pre-import hypothesis' patcher.

    When a @given test fails, hypothesis' pytest plugin imports hypothesis.extra._patching -> libcst,
    which (libcst 1.0 with mypy_extensions 1.1) emits a DeprecationWarning at import; under
    filterwarnings=error that aborts the whole run with INTERNALERROR. Importing it once here, with that
    warning silenced, keeps a failing property test an ordinary failure.
    """
    enable_subreaper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import hypothesis.extra._patching  # noqa: F401
        except ImportError:  # libcst missing: hypothesis then skips writing patches
            pass


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show the hypothesis profile and whether missing OpenSSH skips or fails."""
    missing = missing_openssh_binaries()
    mode = "required (MEDBROKER_REQUIRE_OPENSSH=1)" if openssh_required() else "optional"
    state = f"missing {', '.join(missing)}" if missing else "present"
    return [f"medbroker: hypothesis profile {hypothesis_profile_name()!r}, OpenSSH {state}, {mode}"]


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report so fixtures can tell whether their test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


def _skip_or_fail(reason: str) -> None:
    """Skip locally; fail when MEDBROKER_REQUIRE_OPENSSH=1 (CI installs OpenSSH, so a skip would hide a gap)."""
    if openssh_required():
        pytest.fail(f"{reason} and MEDBROKER_REQUIRE_OPENSSH=1; run scripts/install.sh", pytrace=False)
    pytest.skip(f"{reason}; run scripts/install.sh (CI fails here instead of skipping)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply the openssh marker (skip or fail without the binaries) and the root marker (skip unless root)."""
    if item.get_closest_marker("openssh") is not None:
        missing = missing_openssh_binaries()
        if missing:
            _skip_or_fail(f"OpenSSH programs missing: {', '.join(missing)}")
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("needs root")


def _has_hyperscan() -> bool:
    from sessions import anchors

    return bool(anchors._module())


@pytest.fixture(scope="module", params=["python", pytest.param("hyperscan", marks=pytest.mark.skipif(
        not _has_hyperscan(), reason="hyperscan is not installed (pip install 'medbroker[fast]')"))])
def anchor_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """A module marked ``pytest.mark.usefixtures("anchor_engine")`` runs twice: all in pure Python (the anchor
    search of sessions/anchors.py and the byte scans of sessions/fastscan.py), then as the product runs (Hyperscan,
    and the compiled scans when built); the verdicts must not depend on it."""
    from sessions import anchors, fastscan

    before, native = anchors.engine(), fastscan.native()
    anchors.set_engine(request.param)
    fastscan.set_native(request.param == "hyperscan" and fastscan.built())
    yield request.param
    anchors.set_engine(before)
    fastscan.set_native(native)


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """After the whole run: close forgotten devices and terminals, kill and report surviving child processes."""
    yield
    forgotten = live_devices()
    for device in forgotten:
        device.close()
    terminals = live_pty_sessions()
    for term in terminals:
        term.close()
    survivors = living_descendants(os.getpid())
    for proc in survivors:
        kill_tree(proc.pid)
    # Orphans adopted during the run (we are their subreaper) would otherwise outlive us as zombies.
    reap_zombie_children()
    problems = [f"SshdDevice never closed: {d!r}" for d in forgotten]
    problems += [f"PtySession never closed: pid {t.pid}" for t in terminals]
    problems += [f"leftover process {p.pid}: {p.cmdline}" for p in survivors]
    if problems:
        pytest.fail("test run leaked processes (now killed):\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def fuzz_examples() -> int:
    """How many examples a parser fuzz test should run (4_000 under the ci profile, 300 in dev)."""
    return FUZZ_EXAMPLES


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    return _free_port()


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty MEDBROKER_HOME directory (the env var points at it for the test's duration)."""
    home = tmp_path / "medbroker-home"
    home.mkdir()
    monkeypatch.setenv("MEDBROKER_HOME", str(home))
    return home


@pytest.fixture
def ssh_keys(tmp_path: Path) -> Callable[..., KeyPair]:
    """Factory: ssh_keys(name=None, key_type="ed25519", comment=None, bits=None) -> KeyPair via ssh-keygen.

    Every call makes a new pair under tmp_path/keys (name defaults to key1, key2, ...; names must be
    unique within a test).
    """
    directory = tmp_path / "keys"
    serial = count(1)

    def make(
        name: str | None = None, *, key_type: str = "ed25519", comment: str | None = None, bits: int | None = None
    ) -> KeyPair:
        if missing_openssh_binaries():
            _skip_or_fail("ssh-keygen is missing")
        return generate_keypair(directory, name or f"key{next(serial)}", key_type=key_type, comment=comment, bits=bits)

    return make


@pytest.fixture
def device(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., SshdDevice]]:
    """Factory: device(**kwargs) -> a started SshdDevice (kwargs as for SshdDevice); all closed at teardown.

    device(password="...") needs root (a throwaway account); elsewhere it skips, or fails in CI.
    When the test fails, each device's sshd and SFTP logs are printed (pytest shows them in the report).
    """
    made: list[SshdDevice] = []
    serial = count(1)

    def make(**kwargs: object) -> SshdDevice:
        missing = missing_openssh_binaries()
        if missing:
            _skip_or_fail(f"OpenSSH programs missing: {', '.join(missing)}")
        if kwargs.get("password") is not None and not password_devices_supported():
            _skip_or_fail("password devices need root")
        try:
            dev = SshdDevice(tmp_path / f"device{next(serial)}", **kwargs)  # type: ignore[arg-type]
        except PasswordDeviceUnavailableError as exc:
            _skip_or_fail(str(exc))
            raise  # unreachable: _skip_or_fail raises
        made.append(dev)
        return dev.start()

    try:
        yield make
    finally:
        if _test_failed(request.node):
            for dev in made:
                print(f"----- {dev!r} sshd log -----\n{dev.log_text()}\n----- sftp log -----\n{dev.sftp_log_text()}")
        errors = []
        for dev in made:
            try:
                dev.close()
            except Exception as exc:  # keep closing the others; report at the end
                errors.append(f"{dev!r}: {exc}")
        if errors:
            pytest.fail("closing devices failed:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def world(tmp_path: Path, device: Callable[..., SshdDevice]) -> Iterator[Any]:
    """A :class:`helpers.broker.World` (home, people, ct-01 on a real sshd, in-process broker), closed after.

    Test modules that need a different world (a grant up front, the web console) define their own.
    """
    from helpers.broker import World

    w = World(tmp_path, device()).setup()
    try:
        yield w
    finally:
        w.close()



@pytest.fixture
def exposed_world(tmp_path: Path, device: Callable[..., SshdDevice]) -> Iterator[Any]:
    """Like ``world``, but ct-01 is *exposed*: its maintenance login can read the patient directories
    (data/dicom, var/spool/hl7, opt/lis/data), all three protected. Only the broker's own guards stand
    between the vendor and the patient data there."""
    from helpers.broker import World

    w = World(tmp_path, device(exposed=True)).setup()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="session")
def slapd() -> Iterator[Any]:
    """A real OpenLDAP slapd on loopback, once per test session (tests add people with unique names)."""
    from helpers.slapd import Slapd, slapd_binary

    if slapd_binary() is None:
        _skip_or_fail("slapd is missing (scripts/install.sh installs Debian's slapd)")
    server = Slapd()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def swift() -> Iterator[Any]:
    """A real OpenStack Swift with s3api on loopback, once per test session (tests make their own buckets)."""
    from helpers.swift import Swift, swift_binaries

    if swift_binaries() is None:
        _skip_or_fail("OpenStack Swift is missing (scripts/install.sh installs Debian's swift-proxy, -account, "
                      "-container, -object)")
    server = Swift()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL 15 (Debian's package) on a unix socket and loopback, once per test session."""
    from helpers.postgres import Postgres, postgres_bindir

    if postgres_bindir() is None:
        _skip_or_fail("PostgreSQL is missing (scripts/install.sh installs Debian's postgresql-15)")
    server = Postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: Any) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database of its own for one test; dropped afterwards."""
    url = postgres.new_database()
    try:
        yield url
    finally:
        postgres.drop(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """What ``open_store`` opens, once per backend: a fresh SQLite file, or a fresh PostgreSQL database.

    Store-level tests take it instead of ``open_store(None)`` so one suite runs against both stores.
    """
    if request.param == "sqlite":
        return tmp_path / "medbroker.db"
    return request.getfixturevalue("pg_url")
