"""Documentation stays true: the generated CLI reference is current and the README names every command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import typer.main

from broker.cli import app

REPO = Path(__file__).resolve().parent.parent


def test_cli_reference_is_up_to_date():
    r = subprocess.run([sys.executable, "scripts/gen_cli_reference.py", "--check"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_readme_names_every_top_level_command():
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"medbroker(?: --home \S+)? ([a-z][a-z-]*)", readme))  # ssh-config: hyphens too
    commands = set(typer.main.get_command(app).commands)
    missing = sorted(commands - named)
    assert not missing, f"README.md never shows: {', '.join('medbroker ' + m for m in missing)}"


def test_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(r'src="([^"]+)"', readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to missing {target}"
