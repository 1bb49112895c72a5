"""The dashboard's navigation: the page table, and the one ``st.navigation`` call, made by ``app.py``.

``app.py`` calls :func:`run` on every rerun with its Home page; the other pages are the
files of :data:`PAGES` in ``pages/``. Helpers the pages share live in this package
(:mod:`ui.common`, :mod:`ui.widgets`), not in ``pages/``, so ``pages/`` holds pages only.

A ``pages/`` folder beside the entry point is also Streamlit's pages-folder convention: until
``st.navigation`` has run once in the server process, Streamlit serves that folder's files as
the app's pages ("As soon as any session of your app executes the st.navigation command,
your app will ignore the pages/ directory (across all sessions)", ``st.navigation``'s
documentation). So when the very first request a server gets is a deep link such as
``/compare``, Streamlit runs ``pages/compare.py`` alone, without ``app.py``'s page config and
navigation. :func:`route_through_app`, called first by every page, then calls
``st.navigation`` with the app's pages (which switches that convention off for the server)
and reruns: the rerun goes through ``app.py``, whose navigation opens the same page (the same
URL path, hence the same page).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import streamlit as st

__all__ = ["PAGES", "PAGES_DIR", "APP_FILE", "page_list", "run", "route_through_app"]

#: The entry point and its page folder (a checkout's root, or the installed ``melreview_app``).
APP_FILE = Path(__file__).resolve().parents[1] / "app.py"
PAGES_DIR = APP_FILE.parent / "pages"
HOME = ("Home", ":material/home:")
#: (file in :data:`PAGES_DIR`, title, icon), in menu order after Home.
PAGES = [
    ("patients.py", "Patients", ":material/group:"),
    ("train.py", "Train", ":material/model_training:"),
    ("compare.py", "Compare", ":material/monitoring:"),
    ("review.py", "Review", ":material/rate_review:"),
    ("score.py", "Score", ":material/upload_file:"),
]

# True once run() has called st.navigation in this server process (Streamlit then ignores the
# pages/ folder convention for every session, so every page run comes through app.py).
_navigation_ran = False


def page_list(home: Callable[[], None]) -> list:
    """Home (``home``, the default page at the root URL) and the pages of :data:`PAGES`, as ``st.Page``."""
    title, icon = HOME
    return [
        st.Page(home, title=title, icon=icon, default=True),
        *(st.Page(str(PAGES_DIR / filename), title=title, icon=icon) for filename, title, icon in PAGES),
    ]


def run(home: Callable[[], None]) -> None:
    """Show the navigation (Home and :data:`PAGES`) and run the chosen page; ``app.py`` calls it every rerun."""
    global _navigation_ran
    page = st.navigation(page_list(home))
    _navigation_ran = True
    page.run()


def _served_from_app() -> bool:
    """Whether this server runs ``app.py`` (``streamlit run FILE`` makes ``sys.argv[0]`` the file)."""
    return bool(sys.argv and sys.argv[0]) and Path(sys.argv[0]).resolve() == APP_FILE


def _home_placeholder() -> None:
    """Stands for Home in :func:`route_through_app`'s page list (never run: the page reruns first)."""


def route_through_app() -> None:
    """Make sure this page runs inside ``app.py``'s navigation; every page calls it first.

    A page run by Streamlit's pages-folder convention (the server's first request was a
    deep link, see the module docstring) calls ``st.navigation`` with the app's pages and
    reruns, so the rerun goes through ``app.py``. Elsewhere (inside ``app.py``'s
    navigation, or a page file run on its own, as the page tests do) it does nothing.
    """
    global _navigation_ran
    if _navigation_ran or not _served_from_app():
        return
    st.navigation(page_list(_home_placeholder), position="hidden")
    _navigation_ran = True
    st.rerun()
