"""Streamlit helpers shared by the pages: the store, dataset choice, cached cohorts, errors.

Layout only: everything that computes lives in ``melcore``.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
from pathlib import Path

import streamlit as st

from melcore import settings
from melcore.errors import MelcoreError
from melcore.safety import escape_markdown
from melcore.store import Store
from ui.navigation import route_through_app

log = logging.getLogger("melreview.pages")


def page_start(title: str, caption: str | None = None) -> Store:
    """Open a page: route it through ``app.py`` (:func:`ui.navigation.route_through_app`), show its
    title and caption, and return the store."""
    route_through_app()
    st.title(title)
    if caption:
        st.caption(caption)
    try:
        return get_store()
    except MelcoreError as exc:
        show_error(exc, "The store cannot be used")
        st.stop()


@st.cache_resource(show_spinner=False)
def _store_for(url: str) -> Store:
    store = Store(url)
    store.requeue_stale()
    return store


_frozen_after_tensorflow = False


def _freeze_long_lived_objects() -> None:
    # Once TensorFlow is imported (first Grad-CAM or score), the cyclic garbage
    # collector walks its many long-lived objects during every rerun, making each
    # interaction ~10x slower; moving them to the permanent generation avoids it.
    global _frozen_after_tensorflow
    if not _frozen_after_tensorflow and "tensorflow" in sys.modules:
        gc.freeze()
        _frozen_after_tensorflow = True


def _close_pyplot_figures() -> None:
    """Streamlit's after-run clean-up without ``keras.backend.clear_session()``: close pyplot's figures."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        try:
            pyplot.close("all")
        except Exception:  # noqa: BLE001 - as Streamlit's own clean-up: never fail a finished run
            log.debug("closing pyplot figures failed", exc_info=True)


def keep_keras_between_reruns() -> None:
    """Stop Streamlit from clearing the Keras session after every script run.

    Streamlit's script runner calls ``keras.backend.clear_session()`` at the end of each run
    (``_clean_problem_modules``, added for TF1 graph sessions, streamlit/streamlit#939). With
    TensorFlow 2 that clears the eager kernel cache, so the next call of every model the app keeps
    loaded (the process-wide models of :mod:`melcore.explain`) instantiates and Grappler-optimises
    its graphs again: 0.3-0.5 s of CPU per graph, measured as 0.6-2.5 s per new upload on Score
    against 0.05-0.1 s in a plain process. The models are meant to live as long as the server, so
    the clean-up keeps closing pyplot figures and leaves Keras alone. Does nothing when Streamlit's
    runner has no such hook.
    """
    from streamlit.runtime.scriptrunner import script_runner

    if getattr(script_runner, "_clean_problem_modules", None) not in (None, _close_pyplot_figures):
        script_runner._clean_problem_modules = _close_pyplot_figures


def get_store() -> Store:
    """The store for ``MELREVIEW_DB_URL`` / ``MELREVIEW_HOME`` (one engine per URL per server)."""
    _freeze_long_lived_objects()
    keep_keras_between_reruns()
    return _store_for(settings.db_url())


def ensure_first_dataset(store: Store) -> None:
    """On a fresh install, make and register the demo cohort so every page has content
    (:func:`melcore.datasets.ensure_first_dataset`, as ``python -m melcore demo --register`` does)."""
    from melcore import datasets

    if store.list_datasets():
        return
    with st.spinner("First start: generating the synthetic demo cohort (a few seconds)..."):
        datasets.ensure_first_dataset(store)


@st.cache_resource(show_spinner="Reading the dataset...", max_entries=8)
def _cohort(url: str, dataset_id: int, csv_mtime: float):
    return Store(url, migrate=False).load_dataset_cohort(dataset_id)


def load_cohort_cached(dataset: dict):
    """The dataset's Cohort, re-read when its table changes on disk."""
    path = Path(dataset["csv_path"])
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _cohort(settings.db_url(), int(dataset["id"]), mtime)


#: Session-state key of the dataset chosen on any page (pages open on it); the URL holds it as ``?dataset=``.
CHOSEN_DATASET = "melreview_dataset"
DATASET_PARAM = "dataset"


def dataset_picker(store: Store, key: str = "dataset", label: str = "Dataset") -> dict | None:
    """A select box over the registered datasets; the chosen dataset's row (None when there is none).

    It opens on the dataset last chosen on any page of this session, else the one named in
    the URL (``?dataset=``, so a reload keeps it), and records the choice in both.
    """
    datasets = store.list_datasets()
    if not datasets:
        st.info("No dataset is registered yet: add one on the Home page.")
        return None
    names = [d["name"] for d in datasets]
    remembered = st.session_state.get(CHOSEN_DATASET) or st.query_params.get(DATASET_PARAM)
    if st.session_state.get(key) not in names:
        st.session_state.pop(key, None)
        if remembered in names:
            st.session_state[key] = remembered
    name = st.selectbox(label, names, key=key)
    st.session_state[CHOSEN_DATASET] = name
    if st.query_params.get(DATASET_PARAM) != name:
        st.query_params[DATASET_PARAM] = name
    return next(d for d in datasets if d["name"] == name)


#: Session-state key of the run chosen on any page; the URL holds it as ``?run=``.
CHOSEN_RUN = "melreview_run"
RUN_PARAM = "run"


def restore_run(key: str, options) -> None:
    """Before drawing a run select box ``key`` over run ids ``options``: drop a value not among them and
    open on the run last chosen on any page (else the URL's ``?run=``) when it is one of them."""
    options = list(options)
    if st.session_state.get(key) not in options:
        st.session_state.pop(key, None)
        remembered = st.session_state.get(CHOSEN_RUN)
        if remembered is None:
            try:
                remembered = int(st.query_params.get(RUN_PARAM, ""))
            except ValueError:
                remembered = None
        if remembered in options:
            st.session_state[key] = remembered


def record_run(run_id) -> None:
    """Remember the chosen run for the other pages and in the URL."""
    if run_id:
        st.session_state[CHOSEN_RUN] = int(run_id)
        if st.query_params.get(RUN_PARAM) != str(run_id):
            st.query_params[RUN_PARAM] = str(run_id)


def remembered(shared: str, param: str, parse=str):
    """The value last chosen on any page (``st.session_state[shared]``), else the URL's ``?param=``
    read by ``parse`` (None when absent or unreadable)."""
    value = st.session_state.get(shared)
    if value is None and param in st.query_params:
        try:
            value = parse(st.query_params[param])
        except (TypeError, ValueError):
            value = None
    return value


def restore_choice(key: str, shared: str, param: str, options=None, parse=str) -> None:
    """Before drawing the widget ``key``: when it holds no value (or one not among ``options``), open it
    on :func:`remembered` when that is valid (among ``options`` when given); record with :func:`record_choice`."""
    if key in st.session_state and (options is None or st.session_state[key] in list(options)):
        return
    st.session_state.pop(key, None)
    value = remembered(shared, param, parse)
    if value is not None and (options is None or value in list(options)):
        st.session_state[key] = value


def record_choice(shared: str, param: str, value, text=str) -> None:
    """Remember ``value`` for the other pages (``st.session_state[shared]``) and reloads (``?param=``)."""
    if value is None:
        return
    st.session_state[shared] = value
    if st.query_params.get(param) != text(value):
        st.query_params[param] = text(value)


def show_error(exc: BaseException, context: str = "") -> None:
    """Show a user error in words; an unexpected one by its type only, its details going to the server log.

    The text of an unexpected error can hold what users must not see (a database error
    quotes its SQL and parameters), so it is logged with its traceback, not shown.
    """
    prefix = f"{context}: " if context else ""
    if isinstance(exc, MelcoreError):
        st.error(prefix + escape_markdown(exc))
    else:
        log.error("%sunexpected error\n%s", prefix, "".join(traceback.format_exception(exc)))
        st.error(f"{prefix}unexpected error ({type(exc).__name__}); the details are in the server's log.")


def whole_number(
    label: str,
    value: int,
    key: str,
    *,
    min_value: int | None = 1,
    max_value: int | None = None,
    help: str | None = None,
    where=st,
) -> int:
    """A whole-number field (step 1) in ``where`` (a column, an expander; default the page), as an int.

    ``min_value=None`` leaves the lower bound to the library's check, so its message is shown.
    """
    return int(
        where.number_input(
            label, min_value=min_value, max_value=max_value, value=int(value), step=1, key=key, help=help
        )
    )
