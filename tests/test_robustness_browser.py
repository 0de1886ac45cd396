"""Orphaned work, end to end: `streamlit run app.py` driven by Debian's chromium with Playwright.

Start a long attack on the Attack page and reload the page, three times: each reload is a new browser
session, and the old session's attack (which no Stop button can reach any more) must be stopped within
seconds. The Attack page's server line says how many computations run, so a fourth visit reads it.

Needs the Debian package ``chromium`` (as ``tests/test_browser.py``); skips with one line without it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
PAGE_MS = 120_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    path = _chromium()
    if path is None:
        pytest.skip("Debian's chromium is not installed, so the reload test did not run; apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is missing: pip install -r requirements-dev.txt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(chromium):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(ARTIFACTS / "streamlit-reload.log", "w")
    env = dict(os.environ, PYTHONPATH=str(ROOT), LAVP_MAX_JOBS="1")  # one slot: the others wait in line
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("streamlit did not start (see test-artifacts/browser/streamlit-reload.log)")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _idle(page) -> None:
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=PAGE_MS)


def _server_line(page) -> str:
    return page.get_by_text(re.compile(r"^Server: ")).first.inner_text()


def test_reloading_during_an_attack_leaves_no_run_behind(chromium, server):
    from playwright.sync_api import expect

    expect.set_options(timeout=PAGE_MS)
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_MS)
    page.goto(f"{server}/attack")
    for _ in range(3):
        page.get_by_role("heading", level=1).filter(has_text="Attack").wait_for()
        _idle(page)
        steps = page.get_by_role("spinbutton", name="Steps")
        steps.fill("5000")
        steps.press("Enter")
        _idle(page)
        page.get_by_role("button", name=re.compile(r"Run$")).click()
        stop = page.locator('[data-testid="stBaseButton-secondary"]', has_text="Stop")  # not the header's Stop
        expect(stop).to_be_enabled()  # the attack runs
        _idle(page)
        line = _server_line(page)
        assert re.search(r"\d+ computations? running", line), line
        assert int(re.search(r"(\d+) computations? running", line).group(1)) + \
            int(re.search(r"(\d+) waiting", line).group(1)) >= 1, line
        page.reload()  # a new session; the old one's attack has no Stop button any more
        reloaded = time.monotonic()
    page.get_by_role("heading", level=1).filter(has_text="Attack").wait_for()
    _idle(page)
    deadline = time.monotonic() + 30
    line = _server_line(page)
    value = 40
    while not line.startswith("Server: 0 computations running, 0 waiting") and time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        value += 1
        page.get_by_role("spinbutton", name="Steps").fill(str(value))  # a change reruns the page
        page.get_by_role("spinbutton", name="Steps").press("Enter")
        _idle(page)
        line = _server_line(page)
    seconds = time.monotonic() - reloaded
    page.screenshot(path=str(ARTIFACTS / "reload-orphans.png"), full_page=True)
    context.close()
    assert line.startswith("Server: 0 computations running, 0 waiting"), (
        f"three reloads left work running {seconds:.0f} s after the last: {line}")
    assert seconds < 20, f"the orphaned work took {seconds:.0f} s to stop"
