"""The type check that scripts/test.sh runs before pytest ([tool.mypy] in pyproject.toml) can fail.

scripts/test.sh runs ``python -m mypy`` over medcore, broker and sessions and stops on any error; this test
runs the same checker with the project's configuration on a tiny module holding a deliberate type error
(and on its corrected twin), so a configuration that silently checks nothing is caught.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy")


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    module = tmp_path / "probe.py"
    module.write_text(source)
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                           "--cache-dir", str(tmp_path / "cache"), str(module)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_mypy_with_the_project_config_fails_on_a_type_error(tmp_path):
    # an unannotated function: caught only because check_untyped_defs is on
    out = _mypy(tmp_path, "def f():\n    n: int = 'three'\n    return n\n")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "probe.py:2: error: Incompatible types in assignment" in out.stdout, out.stdout


def test_mypy_with_the_project_config_passes_correct_code(tmp_path):
    out = _mypy(tmp_path, "def f():\n    n: int = 3\n    return n\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found in 1 source file" in out.stdout, out.stdout
