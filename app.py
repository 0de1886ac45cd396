"""LAVP Explorer: the Streamlit entry point (``make run`` or ``streamlit run app.py``).

Routes to the pages in ``pages/`` with ``st.navigation`` and draws the shared sidebar (dataset or
uploaded image, image index, architecture, weights, seed) on every run, so its choices keep their
values across pages. Everything that computes lives in ``lavp_core``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `streamlit run /elsewhere/app.py` must still find lavp_core and pages
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from pages import _shared as ui  # noqa: E402

st.set_page_config(page_title="LAVP Explorer", page_icon=":material/shield:", layout="wide")

PAGES = [
    st.Page("pages/guide.py", title="Guide", icon=":material/menu_book:", default=True),
    st.Page("pages/attack.py", title="Attack", icon=":material/bolt:"),
    st.Page("pages/proxies.py", title="Proxies", icon=":material/functions:"),
    st.Page("pages/study.py", title="Study", icon=":material/scatter_plot:"),
    st.Page("pages/rankings.py", title="Rankings", icon=":material/leaderboard:"),
]

page = st.navigation(PAGES)
ui.configure_torch_threads()
ui.init_sidebar_state()
ui.keep_page_settings()
ui.sidebar()
page.run()
