"""End to end: `streamlit run app.py` on a free loopback port, driven by Debian's chromium with Playwright.

Visits a page straight by its URL on the fresh server, then every page from the navigation, runs a short
attack, checks that the reconstruction and the study's scatter plot render, that no error box or traceback
appears and that the page requests nothing outside the local server, and saves a screenshot of each page
under ``test-artifacts/browser/`` (ignored by git).

Needs the Debian package ``chromium``: ``make test`` and ``.ci/run`` install it when missing and allowed
(``.ci/ensure-chromium``). Without it this test skips with one line saying how to run it, except under
``CI=true`` (``.ci/run``), where it fails.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import pytest
from browser_support import (
    ARTIFACTS,
    ROOT,
    assert_no_error,
    launch_chromium,
    outside_requests,
    serve_app,
    skip_without_chromium,
)
from browser_support import wait_until_idle as _wait_until_idle

BUNDLED = ROOT / "assets" / "study" / "photos-trained.sqlite"
STUDY_SHOTS = (("photos-random.sqlite", "random-weight lenet (the cosine attack leaks)",
                "7-study-random.png"),
               ("photos-training.sqlite", "training snapshots (epochs 0, 1, 5, 40)", "8-study-training.png"),
               ("photos-trained.sqlite", "trained (attacks fail)", "9-study-trained.png"))
TITLES = ("Guide", "Attack", "Proxies", "Study", "Rankings")
PAGE_MS = 120_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]
skip_without_chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app served by `streamlit run` on a free loopback port; yields its URL."""
    env = {}
    if not BUNDLED.is_file():  # the bundled study is not there: serve a small made-up one
        from test_app import make_study_db

        env["LAVP_STUDY_DB"] = str(make_study_db(tmp_path_factory.mktemp("browser") / "study.sqlite"))
    with serve_app("streamlit.log", **env) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


def wait_until_idle(page) -> None:
    _wait_until_idle(page, PAGE_MS)


def nav_titles(page) -> list[str]:
    links = page.locator('[data-testid="stSidebarNavLink"]')
    return [links.nth(i).inner_text().strip() for i in range(links.count())]


def open_page(page, title: str, heading: str | None = None) -> None:
    page.locator('[data-testid="stSidebarNavLink"]', has_text=title).click()
    page.get_by_role("heading", level=1).filter(has_text=heading or title).wait_for(timeout=PAGE_MS)
    wait_until_idle(page)


def choose_study(page, label: str) -> None:
    """Pick a bundled study by its label in the Study page's "Study" select box (a combobox named "Study"),
    then wait for the page to name it beside its model state."""
    box = page.get_by_role("combobox", name="Study", exact=True)
    box.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    box.click()
    option = page.get_by_role("option", name=label, exact=True)
    try:
        option.wait_for(timeout=5_000)
    except Exception:  # the list did not open (the click landed while the page scrolled): open it by key
        box.focus()
        page.keyboard.press("ArrowDown")
    option.click()
    wait_until_idle(page)
    page.locator('[data-testid="stMarkdownContainer"] strong').filter(
        has_text=re.compile(f"^{re.escape(label)}$")).first.wait_for()


def test_every_page_in_a_real_browser(browser, server):  # browser first: no server without chromium
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    requested: list[str] = []  # every URL the page asks for (documents, scripts, fonts, images, websockets)
    context.on("request", lambda request: requested.append(request.url))
    page = context.new_page()
    page.on("websocket", lambda socket: requested.append(socket.url))
    page.set_default_timeout(PAGE_MS)
    # A fresh server's first visit goes straight to a page: it must still get the sidebar and the menu of
    # the intended titles only (not every file of pages/).
    page.goto(f"{server}/proxies")
    page.get_by_role("heading", level=1).filter(has_text="Proxies").wait_for()
    wait_until_idle(page)
    assert page.get_by_text("Client image and model").count() == 1
    titles = nav_titles(page)
    assert len(titles) == len(TITLES) and all(t.endswith(w) for t, w in zip(titles, TITLES)), titles
    open_page(page, "Guide", heading="LAVP Explorer")

    texts = nav_titles(page)
    assert len(texts) == len(TITLES), texts
    for text, title in zip(texts, TITLES):
        assert text.endswith(title), texts
    assert page.locator(".katex-display").count() >= 2  # the two Hessians, typeset
    assert_no_error(page, "Guide")
    page.screenshot(path=str(ARTIFACTS / "1-guide.png"), full_page=True)

    open_page(page, "Attack")
    steps = page.get_by_role("spinbutton", name="Steps")
    steps.fill("40")
    steps.press("Enter")
    wait_until_idle(page)
    page.get_by_role("button", name=re.compile(r"Run$")).click()
    page.get_by_text(re.compile(r"^reconstruction, step|^reconstruction \(")).first.wait_for()  # the live view
    page.get_by_text(re.compile(r"^reconstruction \(done")).wait_for()
    page.get_by_text("Similarity to the ground truth").wait_for()
    page.locator('[data-testid="stDataFrame"]').first.wait_for()  # the metrics table
    wait_until_idle(page)
    page.screenshot(path=str(ARTIFACTS / "2-attack.png"), full_page=True)
    figure = page.locator('[data-testid="stImage"]', has=page.get_by_text(re.compile(r"^reconstruction \(done")))
    image = figure.locator("img")
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    assert_no_error(page, "Attack")

    open_page(page, "Proxies")
    assert_no_error(page, "Proxies")
    page.screenshot(path=str(ARTIFACTS / "3-proxies.png"), full_page=True)

    open_page(page, "Study")
    chart = page.locator('[data-testid="stPlotlyChart"]')
    chart.first.wait_for()
    points = chart.first.locator(".scatterlayer .point")
    points.first.wait_for(state="attached")
    assert points.count() > 0
    assert_no_error(page, "Study")
    page.screenshot(path=str(ARTIFACTS / "4-study.png"), full_page=True)

    if "LAVP_STUDY_DB" not in os.environ and all((BUNDLED.parent / name).is_file() for name, _, _ in STUDY_SHOTS):
        for _, label, shot in STUDY_SHOTS:  # each bundled study, chosen by its name in the Study picker
            choose_study(page, label)
            page.wait_for_timeout(1000)
            wait_until_idle(page)
            chart = page.locator('[data-testid="stPlotlyChart"]')
            chart.first.locator(".scatterlayer .point").first.wait_for(state="attached")
            page.get_by_text(re.compile(r"model state:")).first.wait_for()
            assert_no_error(page, f"Study: {label}")
            # the page scrolls inside its own container, so a screenshot shows what is in view: the plots
            (chart.nth(1) if chart.count() > 1 and "training" in label else chart.first).scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            wait_until_idle(page)  # the σ_S of a newly chosen study are computed after its first lines show
            page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
        choose_study(page, STUDY_SHOTS[0][1])

    open_page(page, "Rankings")
    page.get_by_text(re.compile(r"L2 attack:")).first.wait_for()
    page.get_by_text(re.compile(r"Cosine attack:")).first.wait_for()
    assert_no_error(page, "Rankings")
    page.screenshot(path=str(ARTIFACTS / "5-rankings.png"), full_page=True)
    context.close()
    assert any(urlsplit(url).path.endswith("/_stcore/stream") for url in requested), "no request was recorded"
    outside = outside_requests(requested)
    assert not outside, f"the page requested {len(outside)} URLs outside the local server: {outside[:5]}"
