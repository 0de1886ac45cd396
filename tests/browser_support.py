"""What every browser test shares: finding Debian's chromium (skip in one line without it, fail under
``CI=true``), the app served by `streamlit run` on a free loopback port, Playwright's chromium, and the
page helpers (wait for a script run, no error box, no request outside the local server).

Each browser test module calls :func:`skip_without_chromium` at import and builds its fixtures from
:func:`serve_app` and :func:`launch_chromium`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
START_SECONDS = 180
MISSING = ("Debian's chromium is not installed, so the browser test did not run; to run it: "
           "apt-get install chromium, then make test")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


CHROMIUM = chromium_path()


def skip_without_chromium() -> None:
    """At a module's import: skip it in one line when chromium is missing, except under ``CI=true``
    (``.ci/run`` installs it), where :func:`launch_chromium` fails instead."""
    if CHROMIUM is None and not IN_CI:
        pytest.skip(MISSING, allow_module_level=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(log_name: str, **env_extra: str) -> Iterator[str]:
    """`streamlit run app.py` on a free loopback port, with ``env_extra`` in its environment; yields its
    URL once ``/_stcore/health`` answers, and stops the server on exit (its output in ``ARTIFACTS``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / log_name
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.address",
             "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_SECONDS
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as response:
                        if response.read().strip() == b"ok":
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start (see {log_path})")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@contextlib.contextmanager
def launch_chromium():
    """Playwright's chromium on Debian's binary (fails, rather than skips, when it is missing)."""
    if CHROMIUM is None:
        pytest.fail(f"{MISSING} (CI=true requires it)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install -r requirements-dev.txt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for_images(page, timeout_ms: int = 20_000) -> None:
    """Give the images in view time to load before a screenshot (best effort: what a test asserts about
    images it checks itself; images the browser loads lazily out of view never count)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    script = """() => Array.from(document.images).every(i => (i.complete && i.naturalWidth > 0)
        || (i.loading === 'lazy' && i.getBoundingClientRect().top > window.innerHeight))"""
    try:
        page.wait_for_function(script, timeout=timeout_ms)
    except PlaywrightTimeout:
        pass


def wait_until_idle(page, timeout_ms: int, images: bool = True) -> None:
    """Wait until the script run has finished (the 'running' indicator is gone), then for the images."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=timeout_ms)
    if images:
        wait_for_images(page)


def assert_no_error(page, where: str) -> None:
    errors = page.locator('[data-testid="stAlertContentError"]')
    exceptions = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, f"{where}: error box: {errors.first.inner_text()}"
    assert exceptions.count() == 0, f"{where}: traceback: {exceptions.first.inner_text()}"


def outside_requests(urls: list[str]) -> list[str]:
    """The URLs that are not on the local server (data: and blob: URLs never leave the browser)."""
    return sorted({url for url in urls if urlsplit(url).scheme not in ("data", "blob", "about")
                   and urlsplit(url).hostname not in LOCAL_HOSTS})
