"""LAVP Explorer: the Streamlit entry point (``make run`` or ``streamlit run app.py``).

Routes to the pages in ``pages/`` with ``st.navigation`` and draws the shared sidebar (dataset or
uploaded image, image index, architecture, weights, seed) on every run, so its choices keep their
values across pages. What the pages share lives in ``lavp_ui``; everything that computes in ``lavp_core``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `streamlit run /elsewhere/app.py` must still find lavp_core and lavp_ui
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from lavp_ui.routing import ICON, PAGES_DIR, running_page  # noqa: E402
from lavp_ui.sidebar import init_sidebar_state, keep_page_settings, sidebar  # noqa: E402
from lavp_ui.tasks import configure_torch_threads  # noqa: E402

# Before st.navigation: a page icon set here is the favicon of every page (the pages' own icons are not).
st.set_page_config(page_title="LAVP Explorer", page_icon=str(ICON), layout="wide")

# Absolute paths: under `python -m streamlit run pages/attack.py` (lavp_ui.routing) relative ones would start in pages/.
PAGES = [
    st.Page(PAGES_DIR / "guide.py", title="Guide", icon=":material/menu_book:", default=True),
    st.Page(PAGES_DIR / "attack.py", title="Attack", icon=":material/bolt:"),
    st.Page(PAGES_DIR / "proxies.py", title="Proxies", icon=":material/functions:"),
    st.Page(PAGES_DIR / "study.py", title="Study", icon=":material/scatter_plot:"),
    st.Page(PAGES_DIR / "rankings.py", title="Rankings", icon=":material/leaderboard:"),
]

page = st.navigation(PAGES)
configure_torch_threads()
init_sidebar_state()
keep_page_settings()
sidebar()
with running_page():
    page.run()
