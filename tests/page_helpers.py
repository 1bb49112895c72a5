"""Shared AppTest set-up for the page tests (tests/test_*_page.py).

Imported as ``from page_helpers import ...``: tests/ is on sys.path (pytest's
rootdir-relative import of test modules in a folder without ``__init__.py``).
"""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

#: pages/ as an absolute path: AppTest.from_file resolves relative paths against the calling file.
PAGES = Path(__file__).resolve().parents[1] / "pages"


def run(at: AppTest) -> AppTest:
    """``at.run()``, failing the test with the page's exception messages when the script raised."""
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_page(name: str, *, timeout: float = 120) -> AppTest:
    """``pages/<name>`` (e.g. ``"review.py"``) loaded and run once without an exception."""
    return run(AppTest.from_file(str(PAGES / name), default_timeout=timeout))


def texts(elements) -> str:
    """The values of a list of elements (``at.warning``, ``at.markdown``...) as one newline-joined string."""
    return "\n".join(str(e.value) for e in elements)
