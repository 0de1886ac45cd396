"""End to end: the Attack page's compare mode in a real browser (`streamlit run app.py` on a free loopback
port, Debian's chromium driven by Playwright, as in ``test_browser.py``).

Turns on "Compare L2 and cosine", runs both attacks with a short budget, waits for both reconstructions,
each run's own LAVP table and the verdict sentence, checks that no error box or traceback appears and that
the page requests nothing outside the local server, and saves ``test-artifacts/browser/6-compare.png`` (the
live view) and ``6-compare-outcome.png`` (scores, each run's LAVP and the verdict).

Needs the Debian package ``chromium``; without it this test skips with one line saying how to run it,
except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import re

import pytest
from browser_support import (
    ARTIFACTS,
    assert_no_error,
    launch_chromium,
    outside_requests,
    serve_app,
    skip_without_chromium,
)
from browser_support import wait_until_idle as _wait_until_idle

PAGE_MS = 180_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]
skip_without_chromium()


@pytest.fixture(scope="module")
def server():
    """The app served by `streamlit run` on a free loopback port; yields its URL."""
    with serve_app("streamlit-compare.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


def wait_until_idle(page) -> None:
    _wait_until_idle(page, PAGE_MS)


def test_compare_mode_in_a_real_browser(browser, server):  # browser first: no server without chromium
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    requested: list[str] = []  # every URL the page asks for (documents, scripts, fonts, images, websockets)
    context.on("request", lambda request: requested.append(request.url))
    page = context.new_page()
    page.on("websocket", lambda socket: requested.append(socket.url))
    page.set_default_timeout(PAGE_MS)
    page.goto(f"{server}/attack")
    page.get_by_role("heading", level=1).filter(has_text="Attack").wait_for()
    wait_until_idle(page)

    page.get_by_text("Compare L2 and cosine on this image").click()
    wait_until_idle(page)
    steps = page.get_by_role("spinbutton", name="Steps")
    steps.fill("60")
    steps.press("Enter")
    wait_until_idle(page)
    page.get_by_role("button", name=re.compile(r"Compare$")).click()
    page.get_by_text(re.compile(r"^L2 reconstruction")).first.wait_for()  # both live views
    page.get_by_text(re.compile(r"^cosine reconstruction")).first.wait_for()
    page.get_by_text(re.compile(r"^L2 reconstruction \(done")).wait_for()
    page.get_by_text(re.compile(r"^cosine reconstruction \(done")).wait_for()
    page.get_by_text(re.compile(r"leaked more|same SSIM")).first.wait_for()  # the verdict, after the proxies
    wait_until_idle(page)
    assert page.locator('[data-testid="stDataFrame"]').count() >= 4  # each run's scores and its own LAVP
    page.screenshot(path=str(ARTIFACTS / "6-compare.png"), full_page=True)
    verdict = page.get_by_text(re.compile(r"leaked more|same SSIM")).first
    verdict.scroll_into_view_if_needed()  # the app scrolls inside its main block: a second shot of the outcome
    wait_until_idle(page)
    page.screenshot(path=str(ARTIFACTS / "6-compare-outcome.png"))
    assert_no_error(page, "Attack, compare mode")
    assert not outside_requests(requested), outside_requests(requested)
    context.close()
