"""Exports for auditors: asciicast accepted by asciinema, the self-contained HTML replay page (in Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from staff_support import make_staff_home

SCRIPT = [(0, "pty", 1, {"term": "xterm", "cols": 60, "rows": 12}), (0, "shell", 1, {}),
          (0.5, "output", 1, b"\x1b[1;32mservice@ct-01\x1b[0m:~$ "),
          (1, "input", 1, b"ls\r"), (0.1, "output", 1, b"ls\r\nfirmware.bin  logs\r\n"),
          (0.1, "output", 1, b"\x1b[1;32mservice@ct-01\x1b[0m:~$ "),
          (20, "output", 1, b"printf '</script><b>x</b>'\r\n</script><b>x</b>\r\n"),
          (0.5, "resize", 1, {"cols": 70, "rows": 14}),
          (0.5, "output", 1, b"abc\x1b[2Dz\x1b[K\r\n"),  # cursor back two, overwrite, erase to end of line
          (0.5, "notice", 1, {"text": "your access to ct-01 ends in 5m"}),
          (0, "file-transfer", 2, {"path": "/opt/fw.bin", "direction": "put", "bytes": 4, "sha256": "ef" * 32}),
          (1, "output", 1, "ünïcode ✓ done\r\n".encode())]
SID = "20261128-090000-exp001"


@pytest.fixture
def home(tmp_path):
    h = make_staff_home(tmp_path)
    g = h.grant()
    h.record_session(SID, SCRIPT, grant_id=g.id)
    yield h
    h.close()


@pytest.mark.skipif(shutil.which("asciinema") is None or shutil.which("script") is None,
                    reason="asciinema or script (util-linux) is not installed")
def test_cli_asciicast_is_accepted_by_asciinema(home, tmp_path):
    cast = tmp_path / "s.cast"
    r = home.cli("export", SID, "--format", "asciicast", "-o", str(cast), "--by", "carol")
    assert "verified" in r.stdout
    head = json.loads(cast.read_text().splitlines()[0])
    assert head["version"] == 2 and (head["width"], head["height"]) == (60, 12)
    assert "verified" in head["env"]["MEDBROKER_VERIFICATION"]
    proc = subprocess.run(["script", "-qec", f"asciinema cat {cast}", "/dev/null"], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b"firmware.bin  logs" in proc.stdout and "ünïcode ✓ done".encode() in proc.stdout
    assert b"medbroker: your access to ct-01 ends in 5m" in proc.stdout
    exported = home.app.store.audit_rows(event="recording.exported")
    assert exported[-1]["actor"] == "carol" and json.loads(exported[-1]["details"])["format"] == "asciicast"


def test_html_page_is_self_contained_and_escaped(home, tmp_path):
    page_path = tmp_path / "s.html"
    home.cli("export", SID, "--format", "html", "-o", str(page_path))
    page = page_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page), "no external resources"
    assert "<b>x</b>" not in page.replace("\\u003cb\\u003ex\\u003c/b\\u003e", "")  # recorded HTML stays text
    assert page.count("</script>") == 2  # the embedded cast cannot close its element
    assert "verified" in page and SID in page and "alice" in page
    # the transcript needs no JavaScript
    assert "firmware.bin  logs" in page and "ünïcode ✓ done" in page
    assert json.loads(home.app.store.audit_rows(event="recording.exported")[-1]["details"])["format"] == "html"


def test_html_player_renders_in_a_browser(home, tmp_path):
    from web_support import Browser

    page_path = tmp_path / "s.html"
    home.cli("export", SID, "--format", "html", "-o", str(page_path))
    browser = Browser()
    try:
        ctx = browser.context()
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(page_path.as_uri())
        # it opens on the first output (not a blank screen until Play), later output not yet
        opening = page.locator("#screen").inner_text()
        assert opening.strip() != "" and "ünïcode" not in opening, opening
        # seek to the end through the slider, as a person dragging it would
        page.locator("#pos").evaluate("el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
        screen = page.locator("#screen").inner_text()
        lines = [line.rstrip() for line in screen.split("\n")]
        assert "service@ct-01:~$ ls" in lines and "firmware.bin  logs" in lines
        assert "</script><b>x</b>" in lines  # shown as text, not markup
        assert "az" in lines  # cursor moves and erase-to-end-of-line were applied
        assert "medbroker: your access to ct-01 ends in 5m" in lines and "ünïcode ✓ done" in lines
        assert max(len(line) for line in screen.split("\n")) == 70  # the resize event
        marks = page.locator("#markers button").all_inner_texts()
        assert any("transfer: put /opt/fw.bin" in m for m in marks)
        # a marker seeks there: the later output is not on screen yet
        page.locator("#markers button", has_text="notice").click()
        assert "ünïcode" not in page.locator("#screen").inner_text()
        assert "verified" in page.locator(".status").inner_text()
        assert errors == []
        ctx.close()
    finally:
        browser.close()
