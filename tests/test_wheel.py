"""What users install: the wheel, in a clean venv, away from the checkout, initialises, checks and serves.

The rest of the suite runs the editable checkout, where files next to the source tree are always there;
this test builds the wheel (pip wheel), installs it with its dependencies into a throwaway venv without
the system site-packages, and runs that venv's own ``medbroker`` from a directory outside the repository.
A run-time file that is not package data (e.g. the default protected-paths policy) fails it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.net import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(argv: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A clean venv holding the wheel built from this checkout; returns the venv's bin directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv = tmp / "src", tmp / "dist", tmp / "venv"
    # Build from the tracked files only (a copy): a stale build/ or an untracked file in the checkout
    # must not make the wheel look complete.
    tracked = _run(["git", "ls-files", "-z"], cwd=REPO, timeout=60)
    assert tracked.returncode == 0, tracked.stderr
    for name in filter(None, tracked.stdout.split("\0")):
        source, target = REPO / name, src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                 cwd=tmp, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(dist.glob("medbroker-*.whl"))
    assert len(wheels) == 1, wheels
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, timeout=120)
    assert made.returncode == 0, made.stderr
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                str(wheels[0])], cwd=tmp, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin"


def _clean_env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEDBROKER_HOME", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_wheel_installs_the_package_not_the_checkout(installed, tmp_path):
    env = _clean_env(installed)
    where = _run([str(installed / "python"), "-c", "import broker, sessions; print(broker.__file__, sessions.__file__)"],
                 cwd=tmp_path, timeout=60, env=env)
    assert where.returncode == 0, where.stderr
    assert str(REPO) not in where.stdout and "site-packages" in where.stdout, where.stdout


def test_the_wheel_marks_its_packages_typed(installed, tmp_path):
    """PEP 561: py.typed in each top-level package, so type checkers of code importing medbroker read its
    annotations (a missing package-data entry drops the marker from the wheel, not from the checkout)."""
    env = _clean_env(installed)
    probe = ("import pathlib, broker, medcore, sessions\n"
             "for m in (broker, medcore, sessions):\n"
             "    p = pathlib.Path(m.__file__).parent / 'py.typed'\n"
             "    print(m.__name__, p.is_file(), 'site-packages' in str(p))\n")
    out = _run([str(installed / "python"), "-c", probe], cwd=tmp_path, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["broker True True", "medcore True True", "sessions True True"], out.stdout


def test_a_wheel_install_initialises_checks_and_serves(installed, tmp_path):
    env = _clean_env(installed)
    medbroker = str(installed / "medbroker")
    home = tmp_path / "home"
    init = _run([medbroker, "--home", str(home), "init"], cwd=tmp_path, timeout=120, env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    check = _run([medbroker, "--home", str(home), "check"], cwd=tmp_path, timeout=120, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "missing" not in check.stdout + check.stderr
    port = free_port()
    proc = subprocess.Popen([medbroker, "--home", str(home), "serve", "--listen", f"127.0.0.1:{port}",
                             "--log-level", "warning"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        banner = b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    banner = sock.recv(256)
                break
            except OSError:
                time.sleep(0.2)
        assert banner.startswith(b"SSH-2.0-"), (banner, proc.poll())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err, err


def test_the_wheel_carries_the_compiled_scans_where_a_compiler_built_them(installed, tmp_path):
    """sessions/_fastscan.c is built into the wheel (setup.py) and loads from site-packages; the serve banner of
    the installed broker is checked in the test above's sibling, tests/test_cli_serve.py."""
    from sessions import fastscan

    if not fastscan.built():
        pytest.skip("this checkout has no compiled scans either (no C compiler): the wheel is pure Python")
    env = _clean_env(installed)
    probe = ("from sessions import fastscan, _fastscan\n"
             "print(fastscan.native(), 'site-packages' in _fastscan.__file__, fastscan.run16(b' ' + b'A' * 16))\n")
    out = _run([str(installed / "python"), "-c", probe], cwd=tmp_path, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "1"], out.stdout
