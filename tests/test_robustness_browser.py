"""Orphaned work, end to end: `streamlit run app.py` driven by Debian's chromium with Playwright.

Start a long attack on the Attack page and reload the page, three times: each reload is a new browser
session, and the old session's attack (which no Stop button can reach any more) must be stopped within
seconds. The Attack page's server line says how many computations run, so a fourth visit reads it.

Needs the Debian package ``chromium`` (as ``tests/test_browser.py``): skips with one line without it,
except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import re
import time

import pytest
from browser_support import ARTIFACTS, launch_chromium, serve_app, skip_without_chromium, wait_until_idle

PAGE_MS = 120_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]
skip_without_chromium()


@pytest.fixture(scope="module")
def chromium():
    with launch_chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def server(chromium):
    with serve_app("streamlit-reload.log", LAVP_MAX_JOBS="1") as url:  # one slot: the others wait in line
        yield url


def _idle(page) -> None:
    wait_until_idle(page, PAGE_MS, images=False)


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
