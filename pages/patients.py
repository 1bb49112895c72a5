"""Patients: browse a dataset by patient, open a patient's lesions, then one lesion in full.

Layout only; the table, filters and joins come from :mod:`melcore.browse`, the
tiles and the lesion view from :mod:`ui.widgets`. The dataset and a run's
scores are prepared once per (dataset version, run, predictions version) and
cached, so a filter change only re-runs vectorised filters over the cached table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from melcore import settings
from melcore.browse import (
    PATIENT_SORTS,
    Filters,
    PatientBrowser,
    dataset_roots,
    paginate,
    patient_diagnoses,
    run_threshold,
    scored_run_label,
    scored_runs,
    sort_patients,
)
from melcore.classes import ClassNames, dataset_classes
from melcore.cohort import group_label, grouping_unit
from melcore.errors import MelcoreError
from melcore.formatting import format_risk, format_threshold
from melcore.safety import escape_markdown
from ui.common import dataset_picker, get_store, load_cohort_cached, page_start, record_run, restore_run, show_error
from ui.widgets import lesion_panel, thumbnail_grid

PAGE_SIZE = 50
NO_RUN = 0
NO_PATIENT = ""
K = "patients_"  # session-state prefix of this page


@st.cache_resource(show_spinner="Preparing the patient table...", max_entries=8, ttl=3600)
def _browser(
    url: str, dataset_id: int, csv_mtime: float, run_id: int, predictions_version: tuple | None, _cohort
) -> PatientBrowser:
    predictions = get_store().get_predictions(run_id) if run_id else None
    return PatientBrowser(_cohort, predictions)


def _csv_mtime(dataset: dict) -> float:
    path = Path(dataset["csv_path"])
    return path.stat().st_mtime if path.exists() else 0.0


def _keep_valid(key: str, options: list) -> None:
    """Drop remembered multiselect values that the current dataset does not have."""
    if key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]


def _reset_on_context_change(context: tuple) -> None:
    """Close the open patient and go back to page 1 when the dataset changes."""
    if st.session_state.get(K + "context") != context:
        st.session_state[K + "context"] = context
        for name in ("open", "lesion", "page", "table_last", "open_last"):
            st.session_state.pop(K + name, None)


def _filters(browser: PatientBrowser, threshold: float, has_run: bool, classes: ClassNames) -> Filters:
    options = browser.options()
    cols = st.columns([2, 1, 2, 2, 2])
    values = {}
    for col, (name, label, key) in zip(
        cols[:4],
        (
            ("clinic", "Clinic", "clinic"),
            ("sex", "Sex", "sex"),
            ("age_band", "Age band", "age"),
            ("site", "Site", "site"),
        ),
    ):
        _keep_valid(K + key, options[name])
        values[name] = col.multiselect(label, options[name], key=K + key, placeholder="any")
    with cols[4]:
        malignant = st.checkbox(f"Has a {classes.positive} lesion", key=K + "malignant")
        flagged = st.checkbox(
            f"Risk at or above the threshold ({format_threshold(threshold)})",
            key=K + "flagged",
            disabled=not has_run,
            help="Needs a run's scores: choose a run above.",
        )
    return Filters(
        clinics=tuple(values["clinic"]),
        sexes=tuple(values["sex"]),
        age_bands=tuple(values["age_band"]),
        sites=tuple(values["site"]),
        malignant=malignant,
        above_threshold=flagged and has_run,
        threshold=threshold,
    )


def _age_text(low, high) -> str:
    if pd.isna(low):
        return "unknown"
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def _display(
    page: pd.DataFrame, has_run: bool, filtered: bool, classes: ClassNames, row_name: str, diagnoses: pd.Series
) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            row_name: [group_label(p) for p in page["patient"]],
            "clinic": page["clinic"].to_numpy(),
            "sex": page["sex"].to_numpy(),
            "age": [_age_text(lo, hi) for lo, hi in zip(page["age_min"], page["age_max"])],
            "images": page["n_images"].to_numpy(),
            "lesions": page["n_lesions"].to_numpy(),
            f"{classes.positive} lesions": page["n_malignant"].to_numpy(),
            "diagnoses": diagnoses.reindex(page["patient"].astype(str)).to_numpy(),
        }
    )
    if filtered:
        table["matching"] = page["n_matching"].to_numpy()
    if has_run:
        table["scored"] = page["n_scored"].to_numpy()
        table["highest risk"] = page["highest_risk"].to_numpy()
        table["flagged"] = page["n_flagged"].to_numpy()
    return table


def _patient_table(
    browser: PatientBrowser,
    patients: pd.DataFrame,
    has_run: bool,
    filters: Filters,
    classes: ClassNames,
    unit: str,
    row_name: str,
) -> pd.DataFrame:
    """Sort and page controls and the table; returns the patients in the chosen order."""
    n_pages = max(1, -(-len(patients) // PAGE_SIZE))
    if st.session_state.get(K + "filters_last") != filters:  # new filters start on the first page
        st.session_state[K + "filters_last"] = filters
        st.session_state[K + "page"] = 1
    if int(st.session_state.get(K + "page", 1)) > n_pages:
        st.session_state[K + "page"] = 1
    cols = st.columns([2, 2, 4], vertical_alignment="bottom")
    sorts = list(PATIENT_SORTS) if has_run else [s for s in PATIENT_SORTS if s != "highest risk"]
    if st.session_state.get(K + "sort") not in sorts:
        st.session_state.pop(K + "sort", None)
    sort = cols[0].selectbox("Sort by", sorts, key=K + "sort")
    number = cols[1].number_input(f"Page (of {n_pages})", min_value=1, max_value=n_pages, step=1, key=K + "page")
    patients = sort_patients(patients, sort)
    page = paginate(patients, number, PAGE_SIZE)
    cols[2].caption(
        f"{unit[:1].upper() + unit[1:]} {page.start + 1 if page.total else 0}-{page.stop} of "
        f"{page.total:,}. Select a row (or choose below) to open it."
    )
    # A new key whenever the rows change, so a row selected on another page or order is not carried over.
    table_key = f"{K}table_{abs(hash((filters, sort, page.page, has_run))):x}"
    event = st.dataframe(
        _display(
            page.frame,
            has_run,
            not filters.is_empty(),
            classes,
            row_name,
            patient_diagnoses(browser.lesions, page.frame["patient"].astype(str).tolist()),
        ),
        hide_index=True,
        width="stretch",
        key=table_key,
        on_select="rerun",
        selection_mode="single-row",
        column_config={
            "highest risk": st.column_config.ProgressColumn("highest risk", min_value=0.0, max_value=1.0, format="%.3f")
        },
    )
    rows = list(getattr(getattr(event, "selection", None), "rows", []) or [])
    chosen = page.frame["patient"].iloc[rows[0]] if rows and rows[0] < len(page.frame) else None
    if chosen is not None and chosen != st.session_state.get(K + "table_last"):
        st.session_state[K + "open"] = chosen  # the select box below is not drawn yet, so this is allowed
    st.session_state[K + "table_last"] = chosen
    return patients


def _patient_view(
    browser: PatientBrowser,
    patient: str,
    roots,
    runs,
    store,
    threshold: float,
    has_run: bool,
    classes: ClassNames,
    unit: str,
) -> None:
    row = browser.summary.loc[browser.summary["patient"] == patient].iloc[0]
    noun = "Patient" if unit == "patients" else ("Lesion" if str(patient).startswith("lesion:") else "Image")
    st.subheader(f"{noun} {escape_markdown(group_label(patient))}")
    metrics = st.columns(5)
    metrics[0].metric("Images", f"{row['n_images']:,}")
    metrics[1].metric("Lesions", f"{row['n_lesions']:,}")
    metrics[2].metric(f"{classes.positive_title} lesions", f"{row['n_malignant']:,}")
    highest = row["highest_risk"]
    metrics[3].metric("Highest risk", format_risk(highest, threshold, 3) if has_run and pd.notna(highest) else "—")
    metrics[4].metric("Sex · age", escape_markdown(f"{row['sex']} · {_age_text(row['age_min'], row['age_max'])}"))
    lesions = browser.patient_lesions(patient)
    if not has_run:  # no run chosen: no risk badges ("not scored" on every tile would only be noise)
        lesions = lesions.drop(columns=["risk", "ugly_duckling"])
    names = lesions["image_name"].astype(str).tolist()
    if st.session_state.get(K + "open_last") != patient:  # a newly opened patient starts on their top lesion
        st.session_state[K + "open_last"] = patient
        st.session_state[K + "lesion"] = names[0]
        st.session_state.pop(K + "grid_page", None)
    elif st.session_state.get(K + "lesion") not in names:
        st.session_state[K + "lesion"] = names[0]
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.markdown("**Lesion images, highest risk first**" if has_run else "**Lesion images**")
        st.caption(
            "Badges: the run's risk (red at or above the threshold), UD = ugly duckling (how far the "
            "lesion's score sits above this patient's other lesions, in units of their spread; orange from "
            f"+2), the {classes.positive} label, STAND-IN when the image file is missing."
        )
        clicked = thumbnail_grid(
            lesions,
            key=K + "grid",
            roots=roots,
            threshold=threshold if has_run else None,
            columns=3,
            selected=st.session_state.get(K + "lesion"),
            classes=classes,
        )
        if clicked is not None:
            st.session_state[K + "lesion"] = clicked
    with right:
        name = st.selectbox("Open lesion", names, key=K + "lesion")
        lesion = lesions.loc[lesions["image_name"].astype(str) == name].iloc[0].to_dict()
        with st.container(border=True):
            lesion_panel(
                lesion,
                key=K + "panel",
                roots=roots,
                runs=runs,
                store=store,
                threshold=threshold if has_run else None,
                stacked=True,
                default_run=st.session_state.get(K + "run") or None,
                classes=classes,
            )


def main() -> None:
    store = page_start("Patients")
    top = st.columns([2, 3])
    with top[0]:
        dataset = dataset_picker(store, key=K + "dataset")
    if dataset is None:
        return
    try:
        cohort = load_cohort_cached(dataset)
    except (MelcoreError, OSError) as exc:
        show_error(exc, f"Dataset {dataset['name']!r} cannot be read")
        return
    runs = store.list_runs(dataset_id=int(dataset["id"]))
    scored, counts = scored_runs(store, runs)
    with top[1]:
        choices = list(scored) + [NO_RUN]
        restore_run(K + "run", choices)
        run_id = st.selectbox(
            "Scores from run",
            choices,
            key=K + "run",
            format_func=lambda i: (
                scored_run_label(scored[i], counts[i][0], mark_from_scratch=False) if i else "none (no scores)"
            ),
        )
        record_run(run_id)
    run = scored.get(run_id)
    threshold = run_threshold(run)
    has_run = run is not None
    _reset_on_context_change((int(dataset["id"]),))
    try:
        browser = _browser(
            settings.db_url(),
            int(dataset["id"]),
            _csv_mtime(dataset),
            int(run_id or 0),
            counts.get(run_id),
            _cohort=cohort,
        )
    except (MelcoreError, OSError) as exc:
        show_error(exc, "The patient table cannot be prepared")
        return
    if has_run:
        saved = "saved threshold" if run.get("threshold") is not None else "no saved threshold, default"
        st.caption(
            f"Risk = run #{run['id']}'s predicted probability of melanoma; {saved} "
            f"{format_threshold(threshold)}. "
            f"{int(browser.lesions['risk'].notna().sum()):,} of {len(browser.lesions):,} images scored "
            "(images the run did not score, e.g. its training images, have no risk)."
        )
    elif not scored:
        st.caption("No run of this dataset has stored predictions yet: train one on the Train page to see risks.")

    classes = dataset_classes(dataset)
    unit = grouping_unit(cohort.grouping)
    filters = _filters(browser, threshold, has_run, classes)
    patients = browser.patients(filters)
    metrics = st.columns(4)
    metrics[0].metric(
        unit[:1].upper() + unit[1:],
        f"{len(patients):,} of {len(browser):,}",
        help=None
        if unit == "patients"
        else "This table has no patient ids: images are grouped by lesion id where known, else listed one by one.",
    )
    metrics[1].metric("Lesion images", f"{int(patients['n_images'].sum()):,}")
    metrics[2].metric(f"{classes.positive_title} lesions", f"{int(patients['n_malignant'].sum()):,}")
    metrics[3].metric("Flagged images", f"{int(patients['n_flagged'].sum()):,}" if has_run else "—")
    if not filters.is_empty():
        st.caption(
            "A patient is listed when at least one of their lesion images matches every filter; counts "
            "cover all of the patient's lesions (matching = images that match)."
        )
    if patients.empty:
        st.info(f"No {unit} match these filters.")
        return
    patients = _patient_table(
        browser, patients, has_run, filters, classes, unit, grouping_unit(cohort.grouping, singular=True)
    )

    names = patients["patient"].tolist()
    if st.session_state.get(K + "open") not in [NO_PATIENT] + names:
        st.session_state[K + "open"] = NO_PATIENT
    patient = st.selectbox(
        "Open patient" if unit == "patients" else f"Open ({unit})",
        [NO_PATIENT] + names,
        key=K + "open",
        format_func=lambda p: group_label(p) if p else "choose one (or select a table row)",
    )
    if patient:
        roots = dataset_roots(dataset)
        try:
            _patient_view(browser, patient, roots, runs, store, threshold, has_run, classes, unit)
        except MelcoreError as exc:
            show_error(exc, "The patient cannot be shown")


main()
