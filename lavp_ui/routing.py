"""Every page is drawn through the entry file ``app.py`` (sidebar, menu, page config), however it was reached.

``app.py`` routes with ``st.navigation``, which Streamlit documents to make the app ignore the old
``pages/`` folder convention "as soon as any session executes st.navigation". Until then (a fresh server,
and every ``AppTest`` run, which starts from a fresh state) a first visit straight to ``/attack`` runs
``pages/attack.py`` by itself, without ``app.py``; ``python -m streamlit run pages/attack.py`` (from the
repository root, so that ``lavp_core`` and ``lavp_ui`` import) runs only that file too. So each
page starts with :func:`draw_through_app`: when ``app.py`` is not the one running it, it runs ``app.py``,
whose ``st.navigation`` picks the same page from the URL and draws it, and ends the lone run. Only public
Streamlit commands are used; how ``app.py`` marks its own runs is a context variable of this module.
"""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "app.py"
PAGES_DIR = ROOT / "pages"
ICON = ROOT / "assets" / "icon.png"  # the favicon: a local file (a ":material/..." one comes from Google's servers)

_inside_app: ContextVar[bool] = ContextVar("lavp_inside_app", default=False)


@contextmanager
def running_page() -> Iterator[None]:
    """``app.py`` runs the page chosen by ``st.navigation`` inside this block."""
    token = _inside_app.set(True)
    try:
        yield
    finally:
        _inside_app.reset(token)


def draw_through_app() -> None:
    """First call of every page file: return when ``app.py`` runs this page; otherwise run ``app.py``
    (which draws this same page, chosen by the URL, with the sidebar and the menu) and stop here."""
    if _inside_app.get():
        return
    runpy.run_path(str(ENTRY), run_name="__main__")
    st.stop()
