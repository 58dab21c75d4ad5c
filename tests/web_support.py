"""Shared pieces for the web console tests: headless Chromium (skip locally, fail in CI), an HTTP client, waits."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
DESKTOP = {"viewport": {"width": 1280, "height": 860}}
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
TIMEOUT_MS = 15_000


def browser_required() -> bool:
    """True when a missing browser must fail (CI sets MEDBROKER_REQUIRE_BROWSER=1)."""
    return os.environ.get("MEDBROKER_REQUIRE_BROWSER", "") == "1"


def skip_or_fail_browser(reason: str) -> None:
    if browser_required():
        pytest.fail(f"{reason} and MEDBROKER_REQUIRE_BROWSER=1; run scripts/install.sh", pytrace=False)
    pytest.skip(f"{reason}; run scripts/install.sh (CI fails here instead of skipping)")


class Browser:
    """One headless Chromium (Playwright, the Debian binary, a fresh profile dir) for a test module."""

    def __init__(self) -> None:
        if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
            skip_or_fail_browser(f"{CHROMIUM} is not installed (Debian package chromium)")
        try:
            from playwright.sync_api import expect, sync_playwright
        except ImportError:
            skip_or_fail_browser("the python package playwright is not installed")
        expect.set_options(timeout=TIMEOUT_MS)
        self.profile = tempfile.mkdtemp(prefix="mb-chromium-")
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=TIMEOUT_MS,
                                                    args=CHROMIUM_ARGS + [f"--disk-cache-dir={self.profile}/cache"])
        except BaseException:
            self._pw.stop()
            shutil.rmtree(self.profile, ignore_errors=True)
            raise

    def context(self, **kwargs: Any):
        """A fresh cookie jar (one person); every wait in it is bounded."""
        ctx = self.browser.new_context(**{**DESKTOP, **kwargs})
        ctx.set_default_timeout(TIMEOUT_MS)
        ctx.set_default_navigation_timeout(TIMEOUT_MS)
        return ctx

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self.profile, ignore_errors=True)


def screenshot(page, name: str) -> Path:
    """Take a full-page screenshot; with MEDBROKER_SCREENSHOTS=1 it refreshes docs/screenshots/NAME.

    By default it goes to a temporary directory, so a test run leaves the work tree clean.
    """
    if os.environ.get("MEDBROKER_SCREENSHOTS") == "1":
        target = SCREENSHOTS / name
    else:
        target = Path(tempfile.gettempdir()) / "medbroker-screenshots" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 1000
    return target


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


_URL = re.compile(rb"https?://\S+/signin/[A-Za-z0-9_\-]+")


def link_from(output: bytes) -> str:
    """The sign-in URL that ``ssh USER@broker web`` printed."""
    m = _URL.search(output)
    assert m, output
    return m.group(0).decode()


class LoopThread:
    """An asyncio loop in a background thread, for the console without an SSH server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="web-loop", daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def _shutdown() -> None:
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        self.call(_shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Client:
    """A tiny HTTP client that keeps the console cookie (Python's cookie jar drops Secure cookies on http)."""

    def __init__(self, base: str) -> None:
        u = urlsplit(base)
        self.host, self.port = u.hostname, u.port
        self.cookie: str | None = None

    def request(self, method: str, path: str, form: dict | None = None, headers: dict | None = None
                ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            hdrs = dict(headers or {})
            body = None
            if form is not None:
                body = urlencode(form)
                hdrs["Content-Type"] = "application/x-www-form-urlencoded"
            if self.cookie:
                hdrs["Cookie"] = self.cookie
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            got = {k.lower(): v for k, v in resp.getheaders()}
            for k, v in resp.getheaders():
                if k.lower() == "set-cookie" and v.startswith("__Host-medbroker="):
                    value = v.split(";", 1)[0]
                    self.cookie = None if value.endswith("=") or 'Max-Age=0' in v else value
            return resp.status, got, text
        finally:
            conn.close()

    def get(self, path: str, **kw: Any):
        return self.request("GET", path, **kw)

    def post(self, path: str, form: dict | None = None, **kw: Any):
        return self.request("POST", path, form=form or {}, **kw)

    def sign_in(self, url: str) -> str:
        """Open a sign-in link and press the button; returns where it landed."""
        path = urlsplit(url).path
        status, _, text = self.get(path)
        assert status == 200, text
        status, headers, text = self.post(path)
        assert status == 303 and self.cookie, (status, text)
        return headers["location"]

    def csrf(self, path: str) -> str:
        status, _, text = self.get(path)
        assert status == 200, text
        m = re.search(r'name="csrf" value="([^"]+)"', text)
        assert m, text
        return m.group(1)


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
