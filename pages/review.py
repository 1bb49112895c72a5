"""Review: go through a run's predictions, highest risk first, and record a decision for each lesion.

Layout only; the worklist, progress counts, history and CSV export come from
:mod:`melcore.review`, the lesion view and the patient strip from
:mod:`ui.widgets`. Decisions are appended to the store (``Store.add_review``)
the moment they are saved and never overwritten, so each lesion keeps its full
history. Whatever the reviewer typed survives a failed save and moving to another
lesion (drafts are kept in the session until saved).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from melcore import settings
from melcore.browse import PatientBrowser, dataset_roots, run_threshold, scored_run_label, scored_runs
from melcore.classes import ClassNames, dataset_classes
from melcore.errors import MelcoreError
from melcore.formatting import format_risk, format_threshold
from melcore.readers import study_worklist
from melcore.review import (
    REVIEW_DECISIONS,
    SCOPES,
    apply_scope,
    check_reviewer,
    history_table,
    iso_time,
    review_progress,
    reviews_csv,
    worklist,
)
from melcore.runinfo import scratch_words, uses_colour_model
from melcore.safety import escape_markdown
from melcore.store import STUDY_DECISIONS
from ui.common import dataset_picker, get_store, load_cohort_cached, page_start, record_run, restore_run, show_error
from ui.widgets import lesion_panel, load_tile, patient_strip

K = "review_"  # session-state prefix of this page
REVIEWER = "melreview_reviewer"  # the reviewer's name, kept for the whole session (not a widget key)
TABLE_ROWS = 50  # worklist rows shown around the current lesion
READING_MODES = {
    "review": "Review (risk order, model shown)",
    "unaided": "Reader study: blinded (no model output)",
    "aided": "Reader study: aided (model's risk shown)",
}
STUDY_DECISION_LABELS = {"biopsy": "biopsy / excise", "follow-up": "follow-up", "reassure": "reassure"}
STUDY_SCOPES = {"all": "All lesions", "unread": "Only lesions I have not read in this mode"}
BLINDED_FIELDS = (
    ("image", "image_name"),
    ("patient", "patient"),
    ("sex", "sex"),
    ("age", "age_approx"),
    ("site", "site"),
    ("clinic", "clinic"),
)  # what an unaided reader sees beside the image


# --------------------------------------------------------------------------- cached data


@st.cache_data(show_spinner=False, max_entries=16, ttl=3600)
def _predictions(url: str, run_id: int, version: tuple) -> pd.DataFrame:
    return get_store().get_predictions(run_id)


@st.cache_resource(show_spinner="Preparing the lesion table...", max_entries=4, ttl=3600)
def _browser(
    url: str, dataset_id: int, csv_mtime: float, run_id: int, version: tuple, _cohort, _predictions
) -> PatientBrowser:
    return PatientBrowser(_cohort, _predictions)


def _csv_mtime(dataset: dict) -> float:
    path = Path(dataset["csv_path"])
    return path.stat().st_mtime if path.exists() else 0.0


# --------------------------------------------------------------------------- state and callbacks


def _drafts() -> dict:
    return st.session_state.setdefault(K + "drafts", {})


def _errors() -> dict:
    return st.session_state.setdefault(K + "errors", {})


def _note_key(run_id: int, image: str) -> str:
    return f"{K}note_{run_id}_{image}"


def _decision_key(run_id: int, image: str) -> str:
    return f"{K}decision_{run_id}_{image}"


def _remember_reviewer() -> None:
    st.session_state[REVIEWER] = st.session_state.get(K + "reviewer", "")


def _keep_draft(run_id: int, image: str) -> None:
    _drafts()[(run_id, image)] = {
        "note": st.session_state.get(_note_key(run_id, image), ""),
        "decision": st.session_state.get(_decision_key(run_id, image)),
    }


def _lesion_nav(names: list, position: int, prefix: str, go_to, on_position) -> None:
    """Previous / position / Next controls over ``names`` (1-based ``position``); widget keys ``K + prefix + ...``."""
    nav = st.columns([1, 2, 1], vertical_alignment="bottom")
    nav[0].button(
        "◀ Previous",
        key=K + prefix + "prev",
        on_click=go_to,
        args=(names[position - 2] if position > 1 else None,),
        disabled=position <= 1,
        width="stretch",
    )
    nav[1].number_input(
        f"Lesion (of {len(names):,})",
        min_value=1,
        max_value=len(names),
        step=1,
        key=K + prefix + "pos",
        on_change=on_position,
        args=(names,),
    )
    nav[2].button(
        "Next ▶",
        key=K + prefix + "next",
        on_click=go_to,
        args=(names[position] if position < len(names) else None,),
        disabled=position >= len(names),
        width="stretch",
    )


def _go_to(image: str | None) -> None:
    if image is not None:
        st.session_state[K + "current"] = image


def _on_position(names: list[str]) -> None:
    position = int(st.session_state.get(K + "pos") or 1)
    _go_to(names[min(max(position, 1), len(names)) - 1] if names else None)


def _save(run_id: int, image: str, then: str | None) -> None:
    """Append the decision (button callback, so the form can be reset or kept before it is drawn again)."""
    note_key, decision_key = _note_key(run_id, image), _decision_key(run_id, image)
    note = st.session_state.get(note_key, "") or ""
    decision = st.session_state.get(decision_key)
    _keep_draft(run_id, image)
    try:
        reviewer = check_reviewer(st.session_state.get(K + "reviewer") or st.session_state.get(REVIEWER))
        if decision not in REVIEW_DECISIONS:
            raise MelcoreError(f"choose a decision ({', '.join(REVIEW_DECISIONS)}) before saving")
        get_store().add_review(run_id, image, reviewer, decision, note)
    except Exception as exc:  # whatever went wrong, the reviewer's input stays in the form
        reason = str(exc) if isinstance(exc, MelcoreError) else f"{type(exc).__name__}: {exc}"
        _errors()[(run_id, image)] = f"Not saved: {reason}. Your decision and note are kept in the form."
        return
    _errors().pop((run_id, image), None)
    _drafts().pop((run_id, image), None)
    st.session_state[note_key] = ""
    st.session_state[decision_key] = decision  # the form shows the decision just saved
    st.session_state[K + "flash"] = (
        f"Saved **{escape_markdown(decision)}** for {escape_markdown(image)} by {escape_markdown(reviewer)}."
    )
    _go_to(then)


# --------------------------------------------------------------------------- parts of the page


def _reviewer_input(column) -> str:
    if K + "reviewer" not in st.session_state:
        st.session_state[K + "reviewer"] = st.session_state.get(REVIEWER, "")
    name = column.text_input(
        "Reviewer (required)",
        key=K + "reviewer",
        on_change=_remember_reviewer,
        placeholder="your name",
        max_chars=200,
        help="Every decision is saved with this name and the time.",
    )
    st.session_state[REVIEWER] = name
    return name.strip()


def _progress(full: pd.DataFrame, scope: str, threshold: float) -> None:
    progress = review_progress(full)
    if scope == "above threshold":
        what = f"lesions at or above {format_threshold(threshold)}"
        done, total = progress.flagged_reviewed, progress.flagged
    else:
        done, total, what = progress.reviewed, progress.total, "scored lesions"
    cols = st.columns([1, 1, 3], vertical_alignment="center")
    cols[0].metric("Reviewed", f"{done:,} / {total:,}")
    cols[1].metric("Above threshold", f"{progress.flagged:,}")
    with cols[2]:
        st.progress(done / total if total else 0.0, text=f"{done:,} of {total:,} {what} have a decision")
        counts = ", ".join(f"{n:,} {d}" for d, n in progress.by_decision.items() if n)
        st.caption(f"Current decisions: {counts}" if counts else "No decision recorded yet for this run.")


def _worklist_table(
    shown: pd.DataFrame, position: int, scope: str, run_id: int, classes: ClassNames, diagnoses: pd.Series | None
) -> str | None:
    """The window of the worklist around the current lesion; the image whose row was selected, if new.

    The risk, decision and reviewer columns come first after the rank, so they need no horizontal scrolling.
    """
    start = (position - 1) // TABLE_ROWS * TABLE_ROWS
    window = shown.iloc[start : start + TABLE_ROWS]
    names = window["image_name"].astype(str)
    table = pd.DataFrame(
        {
            "rank": window["rank"].to_numpy(),
            "risk": window["risk"].to_numpy(dtype=float),
            "flagged": window["flagged"].to_numpy(dtype=bool),
            "decision": window["decision"].fillna("—").to_numpy(),
            "reviewer": window["reviewer"].fillna("").to_numpy(),
            "image": names.to_numpy(),
            "label": classes.labels(window["target"].to_numpy(dtype=object)).to_numpy(),
            "diagnosis": (
                names.map(diagnoses).fillna("unknown").to_numpy()
                if diagnoses is not None
                else ["unknown"] * len(window)
            ),
            "patient": window["patient_id"].fillna("unknown").to_numpy(),
        }
    )
    st.caption(
        f"Rows {start + 1}-{start + len(window)} of {len(shown):,} (rank = position by risk in the whole "
        "run). Select a row to open it."
    )
    key = f"{K}table_{run_id}_{scope}_{start}"
    event = st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        key=key,
        on_select="rerun",
        selection_mode="single-row",
        height=min(38 + 35 * len(table), 600),
        column_config={
            "rank": st.column_config.NumberColumn("rank", width="small"),
            "risk": st.column_config.ProgressColumn("risk", min_value=0.0, max_value=1.0, format="%.3f", width="small"),
            "flagged": st.column_config.CheckboxColumn(
                "≥ thr.", width="small", help="Risk at or above the run's threshold"
            ),
            "decision": st.column_config.TextColumn("decision", width="small"),
        },
    )
    rows = list(getattr(getattr(event, "selection", None), "rows", []) or [])
    chosen = str(window["image_name"].iloc[rows[0]]) if rows and rows[0] < len(window) else None
    last = st.session_state.get(K + "table_last")
    st.session_state[K + "table_last"] = chosen
    return chosen if chosen is not None and chosen != last else None


def _decision_form(
    run_id: int, image: str, names: list[str], index: int, reviewer: str, current: str | None = None
) -> None:
    """The decision radio (showing the unsaved draft, else the lesion's ``current`` decision), note and save."""
    note_key, decision_key = _note_key(run_id, image), _decision_key(run_id, image)
    draft = _drafts().get((run_id, image), {})
    if note_key not in st.session_state:
        st.session_state[note_key] = draft.get("note", "")
    if decision_key not in st.session_state:
        st.session_state[decision_key] = draft.get("decision") or (current if current in REVIEW_DECISIONS else None)
    st.markdown("**Your decision**")
    st.radio(
        "Decision",
        REVIEW_DECISIONS,
        key=decision_key,
        horizontal=True,
        label_visibility="collapsed",
        on_change=_keep_draft,
        args=(run_id, image),
    )
    st.text_area(
        "Note (optional)",
        key=note_key,
        height=90,
        on_change=_keep_draft,
        args=(run_id, image),
        placeholder="e.g. asymmetric pigment network; compare with the lesion on the back",
    )
    following = names[index + 1] if index + 1 < len(names) else None
    cols = st.columns([1, 1, 2], vertical_alignment="center")
    cols[0].button("Save", key=K + "save", type="primary", on_click=_save, args=(run_id, image, None), width="stretch")
    cols[1].button(
        "Save and next",
        key=K + "save_next",
        on_click=_save,
        args=(run_id, image, following),
        width="stretch",
        disabled=following is None,
    )
    if not reviewer:
        cols[2].caption(":orange[Enter your name as reviewer at the top: nothing is saved without it.]")
    error = _errors().get((run_id, image))
    if error:
        st.error(escape_markdown(error))


def _history(store, run_id: int, image: str) -> None:
    history = store.review_history(run_id, image)
    if history.empty:
        st.caption("No decision recorded for this lesion yet.")
        return
    last = history.iloc[-1]
    st.markdown(
        f"**Current decision: {escape_markdown(last['decision'])}** by {escape_markdown(last['reviewer'])} "
        f"at {iso_time(last['created_at'])}" + (f" — {escape_markdown(last['note'])}" if last["note"] else "")
    )
    st.caption(
        f"History ({len(history)} decision(s), newest first). Saving again adds a new entry; earlier "
        "entries are never changed."
    )
    st.dataframe(history_table(history), hide_index=True, width="stretch", key=f"{K}history")


def _lesion(browser: PatientBrowser | None, row: pd.Series) -> dict:
    name = str(row["image_name"])
    if browser is not None:
        try:
            return browser.lesion(name)
        except MelcoreError:
            pass
    # The run scored an image that the dataset's table no longer lists.
    return {
        "image_name": name,
        "patient_id": row["patient_id"],
        "clinic": row["clinic"],
        "target": row["target"],
        "risk": row["risk"],
        "image_path": None,
    }


def _patient_strip(
    browser: PatientBrowser | None, lesion: dict, roots, threshold: float, full_names: set[str], shown_names: set[str]
) -> None:
    patient = lesion.get("patient")
    if browser is None or patient is None or patient not in browser:
        return
    st.markdown(f"**Patient {escape_markdown(patient)}: other lesions**")
    clicked = patient_strip(
        browser.patient_lesions(patient),
        key=K + "strip",
        roots=roots,
        current=str(lesion["image_name"]),
        threshold=threshold,
    )
    if clicked is None:
        return
    if clicked in shown_names:
        st.session_state[K + "goto"] = clicked
        st.rerun()
    elif clicked in full_names:
        st.session_state[K + "goto"] = clicked
        st.session_state[K + "goto_scope"] = "all"
        st.rerun()
    else:
        st.info(
            f"{escape_markdown(clicked)} is not in this run's worklist: the run did not score it (e.g. it was a "
            "training image)."
        )


# --------------------------------------------------------------------------- reader study


def _reading_mode() -> str:
    return st.radio(
        "Reading",
        list(READING_MODES),
        format_func=READING_MODES.get,
        key=K + "mode",
        horizontal=True,
        help="A reader study reads every scored lesion in a fixed random order (the same for every "
        "reader). Blinded hides the model's risk, rank and Grad-CAM; aided shows them. Neither "
        "shows the lesion's label or diagnosis, nor other readers' decisions.",
    )


def _study_key(part: str, mode: str, run_id: int, image: str) -> str:
    return f"{K}study_{part}_{mode}_{run_id}_{image}"


def _save_study(run_id: int, image: str, mode: str, then: str | None) -> None:
    """Append a study read (button callback): decision, optional confidence and note, aided or not."""
    decision_key, confidence_key, note_key = (
        _study_key(p, mode, run_id, image) for p in ("decision", "confidence", "note")
    )
    decision = st.session_state.get(decision_key)
    confidence = st.session_state.get(confidence_key)
    note = st.session_state.get(note_key, "") or ""
    error_key = (run_id, image, mode)
    try:
        reviewer = check_reviewer(st.session_state.get(K + "reviewer") or st.session_state.get(REVIEWER))
        if decision not in STUDY_DECISIONS:
            raise MelcoreError(f"choose a decision ({', '.join(STUDY_DECISION_LABELS.values())}) before saving")
        get_store().add_review(run_id, image, reviewer, decision, note, aided=mode == "aided", confidence=confidence)
    except Exception as exc:  # whatever went wrong, the reader's input stays in the form
        reason = str(exc) if isinstance(exc, MelcoreError) else f"{type(exc).__name__}: {exc}"
        _errors()[error_key] = f"Not saved: {reason}. Your decision and note are kept in the form."
        return
    _errors().pop(error_key, None)
    for key in (decision_key, confidence_key):
        st.session_state[key] = None
    st.session_state[note_key] = ""
    st.session_state[K + "flash"] = (
        f"Saved **{escape_markdown(STUDY_DECISION_LABELS[decision])}** "
        f"({'aided' if mode == 'aided' else 'blinded'} read) for "
        f"{escape_markdown(image)} by {escape_markdown(reviewer)}."
    )
    if then is not None:
        st.session_state[K + "study_current"] = then


def _study_go_to(image: str | None) -> None:
    if image is not None:
        st.session_state[K + "study_current"] = image


def _study_position(names: list[str]) -> None:
    position = int(st.session_state.get(K + "study_pos") or 1)
    _study_go_to(names[min(max(position, 1), len(names)) - 1] if names else None)


def _blinded_lesion(lesion: dict, roots) -> None:
    """The image and what is known at the visit: no score, rank, Grad-CAM, label or diagnosis."""
    name = str(lesion.get("image_name"))
    tile = load_tile(lesion.get("image_path"), name, roots, 448)
    st.markdown(f"#### {escape_markdown(name)}")
    left, right = st.columns(2)
    left.image(
        tile.data,
        width="stretch",
        caption=None if tile.status == "ok" else f"STAND-IN: {tile.message or 'image file not found'}",
    )
    values = [
        lesion.get("patient_id", lesion.get("patient")) if field == "patient" else lesion.get(field)
        for _, field in BLINDED_FIELDS
    ]
    right.dataframe(
        pd.DataFrame(
            {
                "field": [label for label, _ in BLINDED_FIELDS],
                "value": ["unknown" if v is None or (isinstance(v, float) and v != v) else str(v) for v in values],
            }
        ),
        hide_index=True,
        width="stretch",
        key=K + "study_metadata",
    )


def _study_form(run_id: int, image: str, mode: str, following: str | None, reviewer: str) -> None:
    decision_key, confidence_key, note_key = (
        _study_key(p, mode, run_id, image) for p in ("decision", "confidence", "note")
    )
    st.markdown("**Your management decision**")
    st.radio(
        "Management decision",
        list(STUDY_DECISION_LABELS),
        format_func=STUDY_DECISION_LABELS.get,
        key=decision_key,
        horizontal=True,
        label_visibility="collapsed",
        index=None,
    )
    st.number_input(
        "Malignancy confidence, 0 (surely benign) to 100 (surely melanoma), optional",
        min_value=0,
        max_value=100,
        step=1,
        value=None,
        key=confidence_key,
        help="How sure you are that this is a melanoma, whatever you decide to do; it gives you a "
        "ROC curve of your own.",
    )
    st.text_area("Note (optional)", key=note_key, height=70)
    cols = st.columns([1, 1, 2], vertical_alignment="center")
    cols[0].button(
        "Save",
        key=K + "study_save",
        type="primary",
        on_click=_save_study,
        args=(run_id, image, mode, None),
        width="stretch",
    )
    cols[1].button(
        "Save and next",
        key=K + "study_save_next",
        on_click=_save_study,
        args=(run_id, image, mode, following),
        width="stretch",
        disabled=following is None,
    )
    if not reviewer:
        cols[2].caption(":orange[Enter your name as reviewer at the top: nothing is saved without it.]")
    error = _errors().get((run_id, image, mode))
    if error:
        st.error(escape_markdown(error))


def _study(store, dataset: dict, run: dict, runs: list, mode: str, reviewer: str, version: tuple) -> None:
    """A reader study on the run's scored lesions: fixed random order, this reader's reads only."""
    run_id = int(run["id"])
    blinded = mode == "unaided"
    st.caption(
        "Blinded reading: the model's risk, rank and Grad-CAM are hidden; read the lesion as you would "
        "without the model."
        if blinded
        else "Aided reading: the model's risk and Grad-CAM are shown beside the lesion."
    )
    try:
        predictions = _predictions(settings.db_url(), run_id, version)
        table = study_worklist(predictions, store.review_history(run_id), reviewer, mode, seed=run_id)
    except MelcoreError as exc:
        show_error(exc, "The study's worklist cannot be prepared")
        return
    done = int(table["read"].sum())
    st.progress(
        done / len(table) if len(table) else 0.0,
        text=(
            f"You have read {done:,} of {len(table):,} lesions in the {'blinded' if blinded else 'aided'} mode"
            if reviewer
            else "Enter your name as reviewer to see your progress"
        ),
    )
    scope = st.radio(
        "Lesions", list(STUDY_SCOPES), format_func=STUDY_SCOPES.get, key=K + "study_scope", horizontal=True
    )
    flash = st.session_state.pop(K + "flash", None)
    if flash:
        st.success(flash)
    shown = table[~table["read"]] if scope == "unread" else table
    if shown.empty:
        st.success("You have read every lesion of this study in this mode." if len(table) else "No lesion to read.")
        return
    names = shown["image_name"].astype(str).tolist()
    current = st.session_state.get(K + "study_current")
    if current in names:
        position = names.index(current) + 1
    else:  # the lesion just read left the list, or none chosen yet: the same place, i.e. the next lesion
        position = min(max(int(st.session_state.get(K + "study_pos") or 1), 1), len(names))
    st.session_state[K + "study_pos"] = position
    image = st.session_state[K + "study_current"] = names[position - 1]

    try:
        cohort = load_cohort_cached(dataset)
        browser = _browser(
            settings.db_url(),
            int(dataset["id"]),
            _csv_mtime(dataset),
            run_id,
            version,
            _cohort=cohort,
            _predictions=predictions,
        )
    except (MelcoreError, OSError) as exc:
        show_error(exc, f"Dataset {dataset['name']!r} cannot be read; lesions are shown without their images")
        browser = None
    row = shown.iloc[position - 1]
    lesion = {"image_name": image, "patient": row["patient_id"], "image_path": None}
    if browser is not None:
        try:
            lesion = browser.lesion(image)
        except MelcoreError:
            pass
    roots = dataset_roots(dataset)

    left, right = st.columns([2, 3], gap="large")
    with left:
        _lesion_nav(names, position, "study_", _study_go_to, _study_position)
        st.caption("Fixed random order (the same for every reader); only your own reads in this mode are listed.")
        st.dataframe(
            pd.DataFrame(
                {
                    "#": shown["position"].to_numpy(),
                    "image": shown["image_name"].to_numpy(),
                    "patient": shown["patient_id"].to_numpy(),
                    "your decision": [STUDY_DECISION_LABELS.get(d, "—") if d else "—" for d in shown["decision"]],
                }
            ),
            hide_index=True,
            width="stretch",
            key=f"{K}study_table_{mode}",
            height=min(38 + 35 * len(shown), 420),
        )
    with right:
        with st.container(border=True):
            if blinded:
                _blinded_lesion(lesion, roots)
            else:
                threshold = run_threshold(run)
                lesion_panel(
                    lesion,
                    key=f"{K}study_panel_{run_id}",
                    roots=roots,
                    runs=[run],
                    store=store,
                    threshold=threshold,
                    default_run=run_id,
                    show_truth=False,
                )
        with st.container(border=True):
            _study_form(run_id, image, mode, names[position] if position < len(names) else None, reviewer)
            if row["read"]:
                confidence = row["confidence"]
                st.caption(
                    f"Your current read: {STUDY_DECISION_LABELS.get(row['decision'], row['decision'])}"
                    + (f", confidence {int(confidence)}" if confidence == confidence else "")
                    + ". Saving again adds a new entry; the latest counts."
                )


def _position(shown: pd.DataFrame, full: pd.DataFrame, current: str | None, restart: bool) -> int:
    """The 1-based position in ``shown`` to open: the current image when listed; the first lesion after a
    change of worklist (``restart``); else the next lesion by rank after the current one (the one just
    saved leaves "Only unreviewed")."""
    names = shown["image_name"].astype(str).tolist()
    if current in names:
        return names.index(current) + 1
    if restart or current is None:
        return 1
    ranks = full.loc[full["image_name"].astype(str) == current, "rank"]
    if ranks.empty:
        return 1
    later = (shown["rank"].to_numpy() > int(ranks.iloc[0])).nonzero()[0]
    return int(later[0]) + 1 if len(later) else len(names)


# --------------------------------------------------------------------------- page


def main() -> None:
    store = page_start(
        "Review",
        "Go through a run's predictions, highest risk first, and record a decision for each lesion. "
        "Every decision is saved at once with your name and the time; changing it adds to the history.",
    )
    top = st.columns([2, 3, 2])
    with top[0]:
        dataset = dataset_picker(store, key=K + "dataset")
    if dataset is None:
        return
    runs = store.list_runs(dataset_id=int(dataset["id"]))
    scored, counts = scored_runs(store, runs)
    if not scored:
        st.info(
            "No run of this dataset has stored predictions yet: train one on the Train page, then review "
            "its predictions here."
        )
        return
    with top[1]:
        restore_run(K + "run", scored)
        run_id = st.selectbox(
            "Run", list(scored), key=K + "run", format_func=lambda i: scored_run_label(scored[i], counts[i][0])
        )
        record_run(run_id)
    reviewer = _reviewer_input(top[2])
    run = scored[run_id]
    mode = _reading_mode()
    if mode in ("unaided", "aided"):
        _study(store, dataset, run, runs, mode, reviewer, counts[run_id])
        return
    threshold = run_threshold(run)
    classes = dataset_classes(dataset)
    if run.get("threshold") is None:
        st.info(
            f"No threshold saved for this run: using the default {format_threshold(threshold)}. Choose one on "
            "the Compare page and save it for the run."
        )
    else:
        st.caption(
            f"Decision threshold {format_threshold(threshold)} (saved on the Compare page). Risk = the run's "
            f"predicted probability that the lesion is {classes.positive}."
        )
    scratch = scratch_words(run)
    if scratch and not uses_colour_model(run):
        st.warning(f"This run was {scratch}: its scores are usually less reliable than a pretrained model's.")

    pending_scope = st.session_state.pop(K + "goto_scope", None)
    if pending_scope is not None:
        st.session_state[K + "scope"] = pending_scope
    scope = st.radio("Worklist", list(SCOPES), format_func=SCOPES.get, key=K + "scope", horizontal=True)

    try:
        predictions = _predictions(settings.db_url(), run_id, counts[run_id])
        history = store.review_history(run_id)
        full = worklist(predictions, history, threshold, "all")
    except MelcoreError as exc:
        show_error(exc, "The worklist cannot be prepared")
        return
    shown = apply_scope(full, scope)
    try:
        cohort = load_cohort_cached(dataset)
    except (MelcoreError, OSError) as exc:
        show_error(exc, f"Dataset {dataset['name']!r} cannot be read; lesions are shown without their images")
        cohort = None
    lesions = cohort.table[["image_name", "diagnosis", "clinic"]] if cohort is not None else None
    diagnoses = (
        lesions.assign(image_name=lesions["image_name"].astype(str))
        .drop_duplicates("image_name")
        .set_index("image_name")["diagnosis"]
        if lesions is not None
        else None
    )
    _progress(full, scope, threshold)
    st.download_button(
        "Download decisions (CSV, full history)",
        key=K + "export",
        on_click="ignore",
        data=reviews_csv(history, run, predictions, lesions=lesions, classes=classes),
        file_name=f"melreview-run{run_id}-decisions.csv",
        mime="text/csv",
        help="Every decision of this run, oldest first: run (what scored it), image, patient, clinic, diagnosis, "
        "label, risk, the run's threshold, reviewer, decision, note, time (ISO-8601 UTC) and whether it is "
        "the lesion's current decision.",
    )
    flash = st.session_state.pop(K + "flash", None)
    if flash:
        st.success(flash)
    if shown.empty:
        st.success(
            "Every lesion in this worklist has a decision." if scope == "unreviewed" else "No lesion in this worklist."
        )
        return

    names = shown["image_name"].astype(str).tolist()
    goto = st.session_state.pop(K + "goto", None)
    if goto is not None:
        st.session_state[K + "current"] = goto
    scope_changed = st.session_state.get(K + "shown_scope", scope) != scope
    st.session_state[K + "shown_scope"] = scope
    position = _position(shown, full, st.session_state.get(K + "current"), scope_changed and goto is None)
    st.session_state[K + "pos"] = position
    st.session_state[K + "current"] = names[position - 1]
    image = names[position - 1]
    row = shown.iloc[position - 1]

    try:
        if cohort is None:
            raise MelcoreError("the dataset's table could not be read")
        browser = _browser(
            settings.db_url(),
            int(dataset["id"]),
            _csv_mtime(dataset),
            run_id,
            counts[run_id],
            _cohort=cohort,
            _predictions=predictions,
        )
    except (MelcoreError, OSError) as exc:
        show_error(exc, f"Dataset {dataset['name']!r} cannot be read; lesions are shown without their images")
        browser = None
    roots = dataset_roots(dataset)

    left, right = st.columns([2, 3], gap="large")
    with left:
        _lesion_nav(names, position, "", _go_to, _on_position)
        chosen = _worklist_table(shown, position, scope, run_id, classes, diagnoses)
        if chosen is not None and chosen != image:
            st.session_state[K + "goto"] = chosen
            st.rerun()
    with right:
        lesion = _lesion(browser, row)
        st.caption(
            f"Rank {int(row['rank']):,} by risk · risk {format_risk(row['risk'], threshold, 3)} "
            f"({'at or above' if row['flagged'] else 'below'} the threshold {format_threshold(threshold)})"
        )
        other_runs = [r for r in runs if int(r["id"]) != run_id]
        with st.container(border=True):
            # Keyed by run, so the Grad-CAM model choice follows the run under review.
            lesion_panel(
                lesion,
                key=f"{K}panel_{run_id}",
                roots=roots,
                runs=[run] + other_runs,
                store=store,
                threshold=threshold,
                default_run=run_id,
                classes=classes,
            )
        _patient_strip(browser, lesion, roots, threshold, set(full["image_name"].astype(str)), set(names))
        with st.container(border=True):
            decision = row.get("decision")
            _decision_form(
                run_id, image, names, position - 1, reviewer, current=None if pd.isna(decision) else str(decision)
            )
            _history(store, run_id, image)


main()
