"""Compare: choose a model and an operating point together.

Layout only; the numbers come from :mod:`melcore.compare` and :mod:`melcore.metrics`,
the figures from :mod:`melcore.plots`. Everything that does not depend on the
threshold (predictions joined with the cohort, sorted sweeps, bootstrap intervals,
paired tests, per-clinic AUROCs) is cached per run and subset, and everything drawn
from it alone (PR and calibration curves, decision curves, per-clinic AUROC / pAUC) is drawn
once per script run, outside the threshold's ``st.fragment``. The fragment holds only what
moves with the threshold (controls, focus metrics, the ROC and sensitivity/specificity
curves with their operating-point markers, the at-threshold tables and net benefit, saving),
so moving the slider, pressing a preset or clicking a point of the ROC or threshold curve
reruns and re-sends only it: the sweeps answer in microseconds and the browser redraws two
figures and the at-threshold tables.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from melcore import settings
from melcore.classes import MELANOMA, dataset_classes
from melcore.compare import (
    THRESHOLD_RULES,
    GroupBreakdown,
    apply_subset,
    at_own_thresholds_table,
    attach_metadata,
    common_images,
    decision_curves,
    describe_subset,
    evaluate_predictions,
    image_overlap,
    is_from_scratch,
    latest_cross_clinic,
    load_predictions,
    operating_point_table,
    pairwise_tests,
    run_label,
    subset_key,
    subset_options,
    summary_table,
    threshold_elsewhere,
    threshold_from_points,
    threshold_window,
    underpowered_note,
    weights_description,
)
from melcore.errors import MelcoreError
from melcore.formatting import format_threshold
from melcore.metrics import bootstrap_dropped_note
from melcore.plots import (
    bar_figure,
    calibration_figure,
    confusion_figure,
    decision_curve_figure,
    heatmap_figure,
    pr_figure,
    readers_roc_figure,
    roc_figure,
    run_color,
    threshold_figure,
)
from melcore.png import readers_roc_png
from melcore.readers import (
    MIN_READS,
    MODES,
    aided_vs_unaided,
    fleiss_kappa_of,
    mean_reader_comparison,
    model_on_reads,
    pairwise_kappa,
    reader_table,
    reader_table_csv,
    study_reads,
)
from melcore.runinfo import missingness_of, source_confounding
from melcore.safety import escape_markdown
from ui.common import dataset_picker, get_store, load_cohort_cached, page_start, record_choice, remembered, show_error

N_BOOT = 1000  # patient resamples behind every interval and paired p-value on this page
DEFAULT_RUNS = 3
THRESHOLD = "compare_threshold"
OWN_THRESHOLDS = "compare_own_thresholds"
FOCUS = "compare_focus"
#: The focus run's id, shared across pages (session state) and reloads (``?focus=``).
CHOSEN_FOCUS = "melreview_focus_run"
FOCUS_PARAM = "focus"
SAVED_MESSAGE = "compare_saved_message"
ARCHIVE_MESSAGE = "compare_archive_message"
CLICKS = "compare_curve_clicks"  # bumped by every click on a curve: new chart keys clear the selection
SPLIT_CHOICES = {"auto": "validation, else out-of-fold", "val": "held-out validation (val)", "oof": "out-of-fold (oof)"}
PRESETS = (
    ("youden", "Youden", "Maximise sensitivity + specificity - 1"),
    ("sensitivity>=0.9", "Sens 90%", "Highest threshold that still finds 90% of melanomas"),
    ("sensitivity>=0.95", "Sens 95%", "Highest threshold that still finds 95% of melanomas"),
)
FILTER_LABELS = {
    "clinic": "Clinic",
    "source": "Source",
    "site": "Anatomical site",
    "sex": "Sex",
    "age_band": "Age band",
    "diagnosis": "Diagnosis",
}


#: Run names are long ("#12 colour/shape SVM (cnn-bn for Grad-CAM) · clinic A · ..."): room for them in tables.
RUN_COLUMN = st.column_config.TextColumn(width="large")


# --------------------------------------------------------------------------- cached computations


def _cohort_version(dataset: dict) -> tuple:
    path = Path(dataset["csv_path"])
    return int(dataset["id"]), path.stat().st_mtime if path.exists() else 0.0


@st.cache_resource(show_spinner=False, max_entries=64, ttl=3600)
def _prepared(url: str, run_id: int, split: str, cohort_version: tuple, _cohort):
    """(frame joined with the cohort, split used, notes) for one run; the frame is never mutated."""
    frame, used = load_predictions(get_store(), run_id, split)
    if used is None:
        return frame, None, []
    frame, notes = attach_metadata(frame, _cohort)
    return frame, used, notes


@st.cache_resource(show_spinner="Evaluating (patient bootstrap)...", max_entries=64, ttl=3600)
def _evaluation(
    url: str, run_id: int, split: str, cohort_version: tuple, subset: str, common: tuple, _frame, classes=MELANOMA
):
    return evaluate_predictions(_frame, n_boot=N_BOOT, classes=classes)


@st.cache_resource(show_spinner="Paired tests on shared images...", max_entries=32, ttl=3600)
def _pairwise(
    url: str, run_ids: tuple, split: str, cohort_version: tuple, subset: str, common: tuple, _frames, classes=MELANOMA
):
    return pairwise_tests(_frames, n_boot=N_BOOT, classes=classes)


@st.cache_resource(show_spinner="Per-clinic intervals...", max_entries=64, ttl=3600)
def _breakdown(url: str, run_id: int, split: str, cohort_version: tuple, subset: str, common: tuple, _frame):
    return GroupBreakdown(_frame, "clinic", n_boot=N_BOOT)


@st.cache_resource(show_spinner="Within-source AUROC...", max_entries=64, ttl=3600)
def _confounding(
    url: str, run_id: int, split: str, cohort_version: tuple, subset: str, common: tuple, _table, _frame, _audit
):
    return source_confounding(_table, _frame, audit=_audit, n_boot=N_BOOT)


# --------------------------------------------------------------------------- callbacks


def _set_threshold(value: float) -> None:
    st.session_state[THRESHOLD] = float(value)


def _curve_clicked(chart_key: str) -> None:
    """A click on the ROC or threshold curve: its point's threshold becomes the operating point."""
    event = st.session_state.get(chart_key)
    value = threshold_from_points(event["selection"]["points"] if event else None)
    if value is not None:
        st.session_state[THRESHOLD] = value
        st.session_state[CLICKS] = st.session_state.get(CLICKS, 0) + 1


def _clickable_chart(container, figure, name: str) -> None:
    key = f"compare_{name}_{st.session_state.get(CLICKS, 0)}"
    container.plotly_chart(
        figure, width="stretch", key=key, on_select=functools.partial(_curve_clicked, key), selection_mode="points"
    )


def _focus_changed(saved: dict) -> None:
    value = saved.get(st.session_state.get(FOCUS))
    if value is not None:
        st.session_state[THRESHOLD] = float(value)


def _save_threshold(run_id: int, label: str) -> None:
    value = float(st.session_state[THRESHOLD])
    try:
        get_store().set_threshold(run_id, value)
    except MelcoreError as exc:
        st.session_state[SAVED_MESSAGE] = ("error", str(exc))
        return
    st.session_state[SAVED_MESSAGE] = (
        "success",
        f"Saved threshold {format_threshold(value)} for {label}; the Review page now flags images with p ≥ this value.",
    )


# --------------------------------------------------------------------------- formatting


def _pct(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1%}"


def _per(classes) -> str:
    """The positive class as one counted thing: ``"melanoma"`` / ``"malignant lesion"``."""
    return classes.positive if classes.positive == "melanoma" else f"{classes.positive} lesion"


def _biopsies(value: float, classes=MELANOMA) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none flagged"
    if math.isinf(value):
        return f"∞ (no {_per(classes)} found)"
    return f"{value:.1f}"


def _p_value(value: float) -> str:
    if value is None or not np.isfinite(value):
        return ""
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


# --------------------------------------------------------------------------- sections


def _in_code(text) -> str:
    """``text`` safe inside a Markdown code span: backticks (which would end the span) become apostrophes."""
    return str(text).replace("`", "'")


def _pick_runs(store, dataset: dict, active: list[dict], n_archived: int) -> tuple[list[dict], str, bool]:
    runs = [r for r in active if r["kind"] != "cross-clinic"]
    if not runs:
        if n_archived:
            st.info(
                f"Every run of **{escape_markdown(dataset['name'])}** is archived ({n_archived}); restore one "
                "below, or train a new one on the **Train** page."
            )
            return [], "auto", False
        st.info(
            f"No trained runs for **{escape_markdown(dataset['name'])}** yet. Train one on the **Train** page, "
            "or queue one from a terminal with "
            f'`python -m melcore jobs submit --dataset "{_in_code(dataset["name"])}" --model '
            "efficientnet-b3` for the background worker (`python -m trainers.worker`); "
            "`python -m melcore train --help` trains directly into a run folder. Finished runs appear here "
            "with their validation predictions."
        )
        return [], "auto", False
    cols = st.columns([1, 1, 1, 1.3])
    clinics = sorted({r["clinic"] or "all clinics" for r in runs})
    models = sorted({r["model"] or "unknown" for r in runs})
    kinds = sorted({r["kind"] for r in runs})
    clinic = cols[0].selectbox("Trained on clinic", ["any"] + clinics, key="compare_filter_clinic")
    model = cols[1].selectbox("Model", ["any"] + models, key="compare_filter_model")
    kind = cols[2].selectbox("Kind", ["any"] + kinds, key="compare_filter_kind")
    split = cols[3].selectbox("Predictions", list(SPLIT_CHOICES), format_func=SPLIT_CHOICES.get, key="compare_split")
    shown = [
        r
        for r in runs
        if clinic in ("any", r["clinic"] or "all clinics")
        and model in ("any", r["model"] or "unknown")
        and kind in ("any", r["kind"])
    ]
    if not shown:
        st.info("No run matches these filters.")
        return [], split, False
    by_id = {r["id"]: r for r in shown}
    # no key: a new set of options (other filters) starts again from the newest runs
    chosen = st.multiselect(
        "Runs",
        list(by_id),
        default=list(by_id)[:DEFAULT_RUNS],
        format_func=lambda i: run_label(by_id[i]),
        help="Newest first. Runs marked 'from scratch' had no pretrained weights.",
    )
    row = st.columns([3, 1])
    common = row[0].checkbox(
        "Only images scored by every selected run",
        value=False,
        key="compare_common",
        help="Evaluate all runs on exactly the same images (the fair comparison when runs "
        "were validated on different splits).",
    )
    if row[1].button(
        "Reload predictions",
        key="compare_reload",
        width="stretch",
        help="Predictions and intervals are cached per run; read them again after a run was re-evaluated.",
    ):
        for cached in (_prepared, _evaluation, _pairwise, _breakdown, _confounding):
            cached.clear()
    return [by_id[i] for i in chosen], split, common


def _set_archived(archived: bool) -> None:
    key = "compare_archive_ids" if archived else "compare_restore_ids"
    ids = list(st.session_state.get(key) or [])
    store = get_store()
    for run_id in ids:
        store.archive_run(run_id, archived=archived)
    st.session_state[key] = []
    listed = ", ".join(f"#{i}" for i in ids)
    st.session_state[ARCHIVE_MESSAGE] = (
        f"Archived {listed}: hidden from every page, nothing deleted." if archived else f"Restored {listed}."
    )


def _archive_controls(active: list[dict], archived: list[dict]) -> None:
    message = st.session_state.pop(ARCHIVE_MESSAGE, None)
    if message:
        st.success(message)
    if not active and not archived:
        return
    labels = {r["id"]: run_label(r) for r in active + archived}
    with st.expander(f"Archive or restore runs ({len(archived)} archived)"):
        st.caption(
            "Archived runs leave the run lists of every page (Compare, Patients, Review, Score, the Train "
            "page's fusion choice). Nothing is deleted: folders, predictions, thresholds and reviews stay, "
            "and a restored run is back as it was."
        )
        cols = st.columns(2)
        chosen = cols[0].multiselect(
            "Runs to archive",
            [r["id"] for r in active],
            format_func=labels.get,
            key="compare_archive_ids",
            placeholder="choose runs",
        )
        cols[0].button("Archive", key="compare_archive", on_click=_set_archived, args=(True,), disabled=not chosen)
        back = cols[1].multiselect(
            "Archived runs to restore",
            [r["id"] for r in archived],
            format_func=labels.get,
            key="compare_restore_ids",
            placeholder="choose runs",
        )
        cols[1].button("Restore", key="compare_restore", on_click=_set_archived, args=(False,), disabled=not back)


def _subset_filters(frames: dict) -> dict:
    union = pd.concat(list(frames.values()), ignore_index=True).drop_duplicates("image_name")
    options = subset_options(union)
    filters = {}
    with st.expander("Subset: recompute everything on part of the images", expanded=False):
        if not options:
            st.caption("The predictions carry no site, sex, age or clinic to filter on.")
            return filters
        cols = st.columns(min(3, len(options)))
        for i, (column, values) in enumerate(options.items()):
            label = FILTER_LABELS.get(column, column.replace("_", " ").capitalize())
            filters[column] = cols[i % len(cols)].multiselect(
                label, values, key=f"compare_subset_{column}", placeholder="all"
            )
    return filters


def _scratch_warning(runs: list[dict]) -> None:
    scratch = [run_label(r) for r in runs if is_from_scratch(r)]
    if scratch:
        st.warning(
            "Trained **from scratch** (no pretrained weights; expect a lower AUROC than transfer learning): "
            + "; ".join(scratch)
        )


def _overlap_warning(frames: dict) -> None:
    """Runs scored on different image sets: how many images they share."""
    if len(frames) < 2:
        return
    n_shared, sizes = image_overlap(frames)
    if len(set(sizes.values())) == 1 and n_shared == next(iter(sizes.values())):
        return
    each = "; ".join(f"{escape_markdown(k)}: {n:,}" for k, n in sizes.items())
    st.warning(
        f"The selected runs were scored on **different images**: {n_shared:,} images are shared by all "
        f"of them ({each}). Their AUROCs and operating points are not directly comparable; tick 'Only "
        "images scored by every selected run' to compare them on the shared images (the paired tests "
        "below always use a pair's shared images)."
    )


def _weights_text(run: dict) -> str:
    return weights_description(run)


def _confounding_lead(confounding: dict, positive_plural: str) -> None:
    """Confounded runs lead with their within-source (per-clinic) AUROC; the pooled one is named confounded."""
    for label, result in confounding.items():
        if result.confounded:
            st.warning(f"**{escape_markdown(label)}**: " + escape_markdown(result.lead(positive_plural)))


def _summary(
    evaluations: dict, runs_by_label: dict, splits: dict, confounding: dict | None = None, classes=MELANOMA
) -> None:
    table = summary_table(evaluations)
    confounding = confounding or {}
    confounded = any(c.confounded for c in confounding.values())
    within = (
        {
            "Within-source AUROC (95% CI)": [
                confounding[r].within_text().split(";")[0] if r in confounding and confounding[r].confounded else ""
                for r in table["run"]
            ]
        }
        if confounded
        else {}
    )
    shown = pd.DataFrame(
        {
            "Run": table["run"],
            "Weights": [_weights_text(runs_by_label[r]) for r in table["run"]],
            "Split": [splits[r] for r in table["run"]],
            "Images": table["n"],
            classes.positive_plural.capitalize(): table["n_malignant"],
            "Patients": table["n_patients"],
            **within,
            "AUROC": table["auroc"].round(4),
            "95% CI": [
                f"{lo:.3f}-{hi:.3f}" if np.isfinite(lo) else ""
                for lo, hi in zip(table["auroc_low"], table["auroc_high"])
            ],
            **_pauc_columns(table),
            "Avg precision": table["average_precision"].round(4),
            "Brier": table["brier"].round(4),
            "Note": table["note"],
        }
    )
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        key="compare_summary",
        column_config={
            "Run": RUN_COLUMN,
            "Weights": st.column_config.TextColumn(width="medium"),
            "AUROC": st.column_config.NumberColumn(
                "Pooled AUROC (confounded)" if confounded else "AUROC",
                help="Over every scored image; confounded by source when a clinic/source holds no melanoma",
            ),
        },
    )
    for label, evaluation in evaluations.items():
        if evaluation.note:
            st.warning(escape_markdown(f"{label}: {evaluation.note}."))
    st.caption(
        f"AUROC intervals: {N_BOOT:,} patient-bootstrap resamples (a patient's lesions stay together). " + PAUC_NOTE
    )


PAUC_NOTE = (
    "pAUC = partial AUROC above 80% sensitivity, unstandardised as in ISIC 2024 (the area under the ROC "
    "curve and above sensitivity 0.8: 0 to 0.2, 0.02 for a random ranking; not scikit-learn's "
    "McClish-standardised max_fpr value), with its patient-bootstrap 95% CI."
)


PAUC_HEADER = "pAUC sens ≥ 80% (ISIC 2024)"
"""Column header of the partial AUROC in every table (:data:`PAUC_NOTE` says which area it is)."""


def _interval_text(lows, highs, signed: bool = False) -> list[str]:
    """Interval bounds as text ("0.012-0.034", or "-0.010 to +0.020" for a signed difference); "" when undefined."""
    return [
        ("" if not np.isfinite(lo) else f"{lo:+.3f} to {hi:+.3f}" if signed else f"{lo:.3f}-{hi:.3f}")
        for lo, hi in zip(lows, highs)
    ]


def _pauc_columns(table: pd.DataFrame, column: str = "pauc", run: str = "") -> dict:
    """The pAUC ``table[column]`` and its CI (``column_low``, ``column_high``) as display columns.

    ``run`` ("A", "B") names the run of a pairwise table in the headers.
    """
    name = f"pAUC {run}".strip()
    return {
        PAUC_HEADER.replace("pAUC", name, 1): table[column].round(4),
        f"{name} 95% CI": _interval_text(table[f"{column}_low"], table[f"{column}_high"]),
    }


def _decision_curve(evaluations: dict, names: list, saved: dict, classes=MELANOMA, colors: dict | None = None) -> None:
    """Net benefit of every run against biopsy-all and biopsy-none (no threshold marked).

    ``saved`` (run label -> saved threshold or None) widens the x range to show the saved
    thresholds; the chosen threshold's net benefit is stated under "Operating point".
    """
    st.subheader("Decision curves")
    curved = {k: e for k, e in evaluations.items() if e.n}
    curves = decision_curves(curved)
    known = [float(t) for t in saved.values() if t is not None and float(t) < 1]
    high = min(0.99, max(0.5, round(max(known, default=0.0) + 0.1, 1)))
    st.plotly_chart(
        decision_curve_figure(curves, None, names=names, x_range=(0.0, high), colors=colors),
        width="stretch",
        key="compare_decision_curve",
    )
    st.caption(
        "Decision curves: net benefit = true positives / n - false positives / n × t / (1 - t), the "
        f"{classes.positive_plural} found per lesion, less the unnecessary biopsies weighted by the odds at which a clinician would biopsy "
        "(threshold probability t). A model is useful at t where its curve lies above both 'biopsy all' and "
        "'biopsy none' (0); the scores must be calibrated probabilities for t to mean a risk. "
        "The net benefit at the chosen threshold is stated under Operating point."
    )


def _net_benefit_at(evaluations: dict, threshold: float, classes=MELANOMA) -> None:
    """One caption: every run's net benefit (and biopsy-all's) at the chosen threshold."""
    if not 0 <= threshold < 1:
        return
    curved = {k: e for k, e in evaluations.items() if e.n}
    rows = {k: c.iloc[0] for k, c in decision_curves(curved, thresholds=[threshold]).items()}
    if not rows:
        return
    parts = [
        f"{escape_markdown(k)} {row['net_benefit']:.4f} (biopsy all {row['treat_all']:.4f})" for k, row in rows.items()
    ]
    st.caption(
        f"Net benefit = true positives / n - false positives / n × t / (1 - t) at the chosen threshold "
        f"t = {format_threshold(threshold)} ({classes.positive_plural} found per lesion, less weighted "
        "unnecessary biopsies; the decision curves above show every t): " + "; ".join(parts) + "."
    )


def _threshold_controls(
    evaluations: dict, saved: dict, classes=MELANOMA, run_ids: dict | None = None
) -> tuple[str, float, tuple[float, float]]:
    """Focus run, threshold slider and presets; returns (focus label, threshold, the slider's range).

    The focus run opens on the one last focused on (this session, else the URL's ``?focus=`` run id)
    when it is among the runs shown, else the first.
    """
    labels = list(evaluations)
    run_ids = run_ids or {}
    if st.session_state.get(FOCUS) not in labels:
        focus_id = remembered(CHOSEN_FOCUS, FOCUS_PARAM, int)
        by_id = {run_id: label for label, run_id in run_ids.items()}
        first = by_id.get(focus_id, labels[0]) if focus_id is not None else labels[0]
        st.session_state[FOCUS] = first
        if THRESHOLD not in st.session_state and saved[first] is not None:
            st.session_state[THRESHOLD] = float(saved[first])
    if THRESHOLD not in st.session_state:
        st.session_state[THRESHOLD] = 0.5
    cols = st.columns([1.2, 2])
    focus = cols[0].selectbox(
        "Focus run (confusion matrix, presets, saving)", labels, key=FOCUS, on_change=_focus_changed, args=(saved,)
    )
    if focus in run_ids:
        record_choice(CHOSEN_FOCUS, FOCUS_PARAM, int(run_ids[focus]))
    evaluation = evaluations[focus]
    presets = evaluation.presets()
    low, high = threshold_window(evaluations.values(), include=[st.session_state[THRESHOLD], *saved.values()])
    with cols[1]:
        threshold = st.slider(
            "Decision threshold: flag for biopsy when p ≥ threshold",
            low,
            high,
            step=0.001,
            format="%.3f",
            key=THRESHOLD,
            help="Or click a point of the ROC or threshold curve below to use its threshold.",
        )
        if (low, high) != (0.0, 1.0):
            st.caption(
                f"Zoomed to the scores' range {low:.2f}-{high:.2f}: below it every lesion is flagged, above it none."
            )
        buttons = st.columns(len(PRESETS) + 1)
        for col, (name, text, why) in zip(buttons, PRESETS):
            value = presets.get(name)
            col.button(
                text,
                key=f"compare_preset_{name}",
                on_click=_set_threshold,
                args=(value,),
                disabled=value is None,
                width="stretch",
                help=(
                    f"{why.replace('melanomas', classes.positive_plural)} (focus run: {format_threshold(value)})"
                    if value is not None
                    else "needs both classes"
                ),
            )
        saved_value = saved[focus]
        buttons[-1].button(
            "Saved",
            key="compare_use_saved",
            on_click=_set_threshold,
            args=(saved_value,),
            disabled=saved_value is None,
            width="stretch",
            help=(
                f"The focus run's saved threshold ({format_threshold(saved_value)})"
                if saved_value is not None
                else "No threshold saved for the focus run yet"
            ),
        )
    return focus, float(threshold), (low, high)


def _focus_metrics(evaluation, threshold: float, classes=MELANOMA) -> None:
    m = evaluation.at(threshold)
    cols = st.columns(3) + st.columns(3)  # two rows: labels such as "Biopsies / malignant lesion" fit
    cols[0].metric(
        "Sensitivity",
        _pct(m["sensitivity"]),
        help=f"{m['tp']:,} of {m['n_malignant']:,} {classes.positive_plural} flagged",
    )
    cols[1].metric(
        "Specificity",
        _pct(m["specificity"]),
        help=f"{m['tn']:,} of {m['n_benign']:,} {classes.negative_plural} not flagged",
    )
    cols[2].metric("PPV", _pct(m["ppv"]), help=f"Flagged lesions that are {classes.positive_plural}")
    cols[3].metric("NPV", _pct(m["npv"]), help=f"Lesions not flagged that are {classes.negative_plural}")
    cols[4].metric(
        f"Biopsies / {_per(classes)}",
        _biopsies(m["biopsies_per_melanoma"], classes),
        help=f"Flagged lesions per {_per(classes)} found (1 / PPV)",
    )
    cols[5].metric("Flagged", f"{m['n_flagged']:,}", help=f"Lesions sent to biopsy at this threshold, of {m['n']:,}")
    st.caption(
        f"Prevalence {_pct(evaluation.prevalence)} ({m['n_malignant']:,} {classes.positive_plural} of "
        f"{m['n']:,} images): PPV, NPV and biopsies per {_per(classes)} depend on it and change at a clinic with another prevalence."
    )
    st.caption(
        "A threshold set here (slider, click or preset) is chosen on these same predictions, so the numbers "
        "above are optimistic for it; below, a threshold chosen on one run is judged on another."
    )


def _curves(
    evaluations: dict,
    threshold: float,
    names: list,
    window: tuple[float, float],
    thresholds: dict | None = None,
    classes=MELANOMA,
    colors: dict | None = None,
) -> None:
    thresholds = thresholds or {k: threshold for k in evaluations}
    curved = {k: e for k, e in evaluations.items() if e.both_classes}
    rocs = {k: (e.roc.fpr, e.roc.tpr, e.auroc, e.ci, e.roc.thresholds) for k, e in curved.items()}
    roc_markers = {k: e.roc_point(thresholds[k]) for k, e in curved.items()}
    notes = {
        k: f"threshold {format_threshold(thresholds[k])}" + (" (saved)" if thresholds[k] != threshold else "")
        for k in evaluations
    }
    sweeps = {k: e.curve for k, e in evaluations.items()}
    # every run is marked where it is judged: the slider's threshold or its own saved one
    sweep_markers = {
        k: (e.at(thresholds[k])["sensitivity"], e.at(thresholds[k])["specificity"], thresholds[k])
        for k, e in evaluations.items()
    }
    top = st.columns(2)
    _clickable_chart(top[0], roc_figure(rocs, roc_markers, names=names, marker_notes=notes, colors=colors), "roc")
    _clickable_chart(
        top[1],
        threshold_figure(
            sweeps, threshold, sweep_markers, names=names, x_range=window, colors=colors, marker_notes=notes
        ),
        "sweep",
    )


def _threshold_free_curves(evaluations: dict, names: list, classes=MELANOMA, colors: dict | None = None) -> None:
    """Precision-recall and calibration curves: neither depends on the threshold, so neither marks it."""
    st.subheader("Precision-recall and calibration")
    curved = {k: e for k, e in evaluations.items() if e.both_classes}
    pr = {k: (e.pr.precision, e.pr.recall, e.average_precision) for k, e in curved.items()}
    calibration = {k: (e.calibration, e.brier) for k, e in evaluations.items()}
    prevalences = [e.prevalence for e in evaluations.values()]
    prevalence = prevalences[0] if len(set(prevalences)) == 1 else None
    cols = st.columns(2)
    cols[0].plotly_chart(
        pr_figure(pr, None, prevalence=prevalence, names=names, colors=colors), width="stretch", key="compare_pr"
    )
    cols[1].plotly_chart(
        calibration_figure(calibration, None, names=names, classes=classes, colors=colors),
        width="stretch",
        key="compare_calibration",
    )
    st.caption(
        "Neither curve depends on the decision threshold: the chosen operating point is marked on the ROC "
        "and sensitivity/specificity curves under Operating point."
    )


def _operating_table(
    evaluations: dict,
    breakdowns: dict,
    threshold: float,
    focus: str,
    dataset: dict,
    filters: dict,
    thresholds: dict | None = None,
    classes=MELANOMA,
) -> None:
    st.subheader("At this threshold")
    cols = st.columns([1.1, 2])
    m = evaluations[focus].at(threshold)
    cols[0].plotly_chart(
        confusion_figure(m["tp"], m["fp"], m["tn"], m["fn"], title="Focus run", classes=classes),
        width="stretch",
        key="compare_confusion",
    )
    thresholds = thresholds or {k: threshold for k in evaluations}
    table = at_own_thresholds_table(evaluations, thresholds)
    shown = pd.DataFrame(
        {
            "Run": table["run"],
            "Threshold": [format_threshold(t) + ("" if t == threshold else " (saved)") for t in table["threshold"]],
            "Sensitivity": table["sensitivity"].map(_pct),
            "Specificity": table["specificity"].map(_pct),
            "Prevalence": table["prevalence"].map(_pct),
            "PPV": table["ppv"].map(_pct),
            "NPV": table["npv"].map(_pct),
            f"Biopsies / {_per(classes)}": [_biopsies(v, classes) for v in table["biopsies_per_melanoma"]],
            "TP": table["tp"],
            "FP": table["fp"],
            "TN": table["tn"],
            "FN": table["fn"],
        }
    )
    with cols[1]:
        runs_tab, clinics_tab = st.tabs(["Selected runs", "By clinic"])
        runs_tab.dataframe(
            shown,
            hide_index=True,
            width="stretch",
            key="compare_at_threshold",
            column_config={
                "Run": RUN_COLUMN,
                f"Biopsies / {_per(classes)}": st.column_config.TextColumn(width="medium"),
            },
        )
        with clinics_tab:
            _clinic_table(breakdowns, threshold, classes)
        download = operating_point_table(evaluations, threshold)
        download.insert(1, "dataset", dataset["name"])
        download.insert(2, "subset", describe_subset(filters))
        st.download_button(
            "Download operating points (CSV)",
            download.to_csv(index=False).encode(),
            file_name=f"operating-points-{dataset['name']}.csv",
            mime="text/csv",
            key="compare_download",
            on_click="ignore",
            help="Every run at this threshold, at Youden's point, at 90% / 95% sensitivity and at 90% specificity.",
        )


def _clinic_table(breakdowns: dict, threshold: float, classes=MELANOMA) -> None:
    """Per clinic at the threshold (sensitivity, specificity, PPV); the AUROCs are in :func:`_clinic_auroc_table`."""
    if not breakdowns:
        st.caption("No per-clinic table for this selection.")
        return
    rows = pd.concat([b.at(threshold).assign(run=name) for name, b in breakdowns.items()], ignore_index=True)
    shown = pd.DataFrame(
        {
            "Run": rows["run"],
            "Clinic": rows["group"],
            "Images": rows["n"],
            classes.positive_plural.capitalize(): rows["n_malignant"],
            "Sensitivity": rows["sensitivity"].map(_pct),
            "Specificity": rows["specificity"].map(_pct),
            "Prevalence": (rows["n_malignant"] / rows["n"]).map(_pct),
            "PPV": rows["ppv"].map(_pct),
            f"Biopsies / {_per(classes)}": [_biopsies(v, classes) for v in rows["biopsies_per_melanoma"]],
        }
    )
    st.dataframe(
        shown, hide_index=True, width="stretch", key="compare_clinic_at_threshold", column_config={"Run": RUN_COLUMN}
    )
    st.caption("Each clinic's AUROC and pAUC with CIs are in the per-clinic table above.")


def _clinic_auroc_table(breakdowns: dict, classes=MELANOMA) -> None:
    """Per-clinic AUROC and pAUC with patient-bootstrap CIs (threshold-free, drawn once per run)."""
    if not breakdowns:
        return
    st.subheader("By clinic")
    rows = pd.concat([b.base.assign(run=name) for name, b in breakdowns.items()], ignore_index=True)
    shown = pd.DataFrame(
        {
            "Run": rows["run"],
            "Clinic": rows["group"],
            "Images": rows["n"],
            classes.positive_plural.capitalize(): rows["n_malignant"],
            "AUROC": rows["auroc"].round(4),
            "95% CI": [
                f"{lo:.3f}-{hi:.3f}" if np.isfinite(lo) else "" for lo, hi in zip(rows["auroc_low"], rows["auroc_high"])
            ],
            **_pauc_columns(rows),
            "Note": rows["note"],
        }
    )
    st.dataframe(shown, hide_index=True, width="stretch", key="compare_clinic_table", column_config={"Run": RUN_COLUMN})
    st.caption(PAUC_NOTE + " Sensitivity, specificity and PPV per clinic at the threshold: Operating point, By clinic.")
    for run, clinic, dropped in zip(rows["run"], rows["group"], rows["boot_dropped"]):
        note = bootstrap_dropped_note(int(dropped), N_BOOT)
        if note:
            st.warning(f"{run}, clinic {clinic}: {note}.")


def _threshold_elsewhere(evaluations: dict, frames: dict, splits: dict, classes=MELANOMA) -> None:
    """A threshold chosen on one run's predictions and judged, with CIs, on another's."""
    st.subheader("Threshold chosen on one set, judged on another")
    names = list(evaluations)
    cols = st.columns(3)
    chooser = cols[0].selectbox("Choose the threshold on", names, key="compare_choose_on")
    rule = cols[1].selectbox("Rule", list(THRESHOLD_RULES), format_func=THRESHOLD_RULES.get, key="compare_rule")
    judged = cols[2].selectbox("Judge it on", names, index=min(1, len(names) - 1), key="compare_judge_on")
    try:
        point = threshold_elsewhere(evaluations[chooser], frames[judged], rule, n_boot=N_BOOT, classes=classes)
    except MelcoreError as exc:
        show_error(exc, "No operating point")
        return
    st.caption(
        f"Threshold **{format_threshold(point['threshold'])}** chosen by {THRESHOLD_RULES[rule]} on the "
        f"{splits[chooser]} predictions of {chooser}; operating point on the {splits[judged]} predictions "
        f"of {judged} ({point['n']:,} images), with {N_BOOT:,}-resample patient-bootstrap 95% CIs."
    )
    if chooser == judged:
        st.warning(
            "The threshold is chosen and judged on the same predictions, so these numbers are optimistic: "
            "judge it on another run (a test set, another clinic, a later run)."
        )
    measures = ("sensitivity", "specificity", "ppv", "npv")
    st.dataframe(
        pd.DataFrame(
            {
                "Measure": ["Sensitivity", "Specificity", "PPV", "NPV"],
                "Value": [_pct(point[n]) for n in measures],
                "95% CI": [f"{_pct(point[n + '_ci'][0])}-{_pct(point[n + '_ci'][1])}" for n in measures],
            }
        ),
        hide_index=True,
        width="stretch",
        key="compare_threshold_elsewhere",
    )


def _save_section(focus: str, run: dict, threshold: float) -> None:
    cols = st.columns([1.2, 2])
    cols[0].button(
        f"Save {format_threshold(threshold)} as this run's threshold",
        key="compare_save",
        type="primary",
        on_click=_save_threshold,
        args=(run["id"], focus),
    )
    message = st.session_state.pop(SAVED_MESSAGE, None)
    if message:
        (st.success if message[0] == "success" else st.error)(escape_markdown(message[1]))
    saved = run["threshold"]
    cols[1].caption(
        f"Saved threshold of {escape_markdown(focus)}: **{format_threshold(saved)}** (used by the Review page)"
        if saved is not None
        else f"{escape_markdown(focus)} has no saved threshold yet; the Review page uses 0.5 until you save one."
    )


def _pairwise_section(table: pd.DataFrame, classes=None) -> None:
    st.subheader("Are the differences real?")
    if table.empty:
        st.caption("Select at least two runs to test their AUROC difference.")
        return
    any_boot = table["bootstrap_p"].notna().any()
    shown = pd.DataFrame(
        {
            "Run A": table["run_a"],
            "Run B": table["run_b"],
            "Shared images": table["n_shared"],
            (classes or MELANOMA).positive_plural.capitalize(): table["n_malignant"],
            "Patients": table["n_patients"],
            "AUROC A": table["auroc_a"].round(4),
            "AUROC B": table["auroc_b"].round(4),
            "A - B": table["diff"].round(4),
            "DeLong p": table["delong_p"].map(_p_value),
        }
    )
    if any_boot:
        shown["Patient-bootstrap p"] = table["bootstrap_p"].map(_p_value)
        shown["95% CI of A - B"] = [
            f"{lo:.3f} to {hi:.3f}" if np.isfinite(lo) else ""
            for lo, hi in zip(table["bootstrap_low"], table["bootstrap_high"])
        ]
    for run in ("a", "b"):
        shown = shown.assign(**_pauc_columns(table, f"pauc_{run}", run.upper()))
    shown["pAUC A - B"] = table["pauc_diff"].round(4)
    shown["95% CI of pAUC A - B"] = _interval_text(table["pauc_diff_low"], table["pauc_diff_high"], signed=True)
    shown["Note"] = table["note"]
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        key="compare_pairwise",
        column_config={"Run A": RUN_COLUMN, "Run B": RUN_COLUMN, "Note": st.column_config.TextColumn(width="large")},
    )
    for row in table.itertuples():
        note = underpowered_note(row.n_shared, row.n_malignant, classes)
        if note and row.n_shared:
            st.warning(escape_markdown(f"{row.run_a} vs {row.run_b}: {note}."))
    st.caption(
        "Each pair is compared on the images both runs scored (joined on image name). DeLong's test treats "
        "images as independent; when patients have several lesions the paired patient bootstrap "
        f"({N_BOOT:,} resamples) is the one to trust. The pAUC intervals come from the paired patient "
        "bootstrap (the same resamples for both runs). " + PAUC_NOTE
    )


def _clinic_bars(breakdowns: dict, names: list, colors: dict | None = None) -> None:
    st.subheader("By clinic")
    bases = {k: b.base for k, b in breakdowns.items()}
    clinics = sorted(set().union(*(set(t["group"]) for t in bases.values())))
    if len(clinics) < 2:
        st.caption(f"One clinic only ({escape_markdown(clinics[0])}) in this subset.")
        return
    series, errors = {}, {}
    for name, table in bases.items():
        indexed = table.set_index("group").reindex(clinics)
        series[name] = indexed["auroc"].to_numpy(dtype=float)
        errors[name] = (indexed["auroc_low"].to_numpy(dtype=float), indexed["auroc_high"].to_numpy(dtype=float))
    st.plotly_chart(
        bar_figure(
            clinics,
            series,
            errors=errors,
            names=names,
            title="AUROC per clinic (95% CI)",
            x_title="clinic",
            y_title="AUROC",
            y_range=(0.0, 1.08),
            colors=colors,
        ),
        width="stretch",
        key="compare_clinic_bars",
    )
    st.caption("Sensitivity, specificity and biopsies per clinic at the chosen threshold: the 'By clinic' tab above.")


def _cross_clinic_section(store, dataset: dict) -> None:
    st.subheader("Across clinics")
    try:
        cross = latest_cross_clinic(store, dataset["id"])
    except MelcoreError as exc:
        show_error(exc, "Cross-clinic evaluation unreadable")
        return
    if cross is None:
        st.info(
            "No cross-clinic evaluation for this dataset yet. Train a model on each clinic and score it on "
            f"every other one with `python -m melcore cross-clinic --help` (dataset **{dataset['name']}**); "
            "the matrix then appears here."
        )
        return
    st.plotly_chart(
        heatmap_figure(
            cross.matrix,
            cross.clinics,
            n=cross.n,
            title=f"AUROC trained on (rows) × scored on (columns) · run #{cross.run['id']}",
        ),
        width="stretch",
        key="compare_cross_clinic",
    )
    inside, outside = cross.in_and_out()
    if np.isfinite(inside) and np.isfinite(outside):
        st.caption(
            f"Mean AUROC on the training clinic {inside:.3f}; on other clinics {outside:.3f} "
            f"(a drop of {inside - outside:.3f} is the cost of moving a model between clinics)."
        )


@st.fragment
def _operating_point(evaluations: dict, breakdowns: dict, runs_by_label: dict, dataset: dict, filters: dict) -> None:
    """Everything that depends on the threshold; a slider move or preset reruns only this part."""
    st.subheader("Operating point")
    store = get_store()
    runs = {label: store.get_run(runs_by_label[label]["id"]) for label in evaluations}  # saved thresholds change
    saved = {k: r["threshold"] for k, r in runs.items()}
    classes = dataset_classes(dataset)
    colors = {label: run_color(runs_by_label[label]["id"]) for label in evaluations}
    focus, threshold, window = _threshold_controls(
        evaluations, saved, classes, {k: int(runs_by_label[k]["id"]) for k in evaluations}
    )
    own = st.toggle(
        "Other runs at their own saved threshold",
        value=True,
        key=OWN_THRESHOLDS,
        help="On: the focus run is at the slider's threshold and every other run at the threshold "
        "saved for it (the one Review uses), else the slider's. Off: one threshold for all.",
    )
    thresholds = {k: (threshold if k == focus or not own or saved[k] is None else float(saved[k])) for k in evaluations}
    _focus_metrics(evaluations[focus], threshold, classes)
    _curves(evaluations, threshold, list(evaluations), window, thresholds, classes, colors)
    _operating_table(evaluations, breakdowns, threshold, focus, dataset, filters, thresholds, classes)
    _net_benefit_at(evaluations, threshold, classes)
    _save_section(focus, runs[focus], threshold)


# --------------------------------------------------------------------------- readers

MODE_WORDS = {"unaided": "blinded (unaided)", "aided": "aided"}


@st.cache_resource(show_spinner="Reader statistics (readers x patients bootstrap)...", max_entries=16, ttl=3600)
def _reader_study(url: str, run_id: int, review_version: tuple, prediction_version: tuple, _history, _predictions):
    """Everything the Readers section shows for one run, computed once per set of reads."""
    reads = study_reads(_history, _predictions)
    table = reader_table(reads, n_boot=N_BOOT)
    eligible = table[table["eligible"]]
    curve = model_on_reads(reads, eligible["reviewer"].unique(), n_boot=N_BOOT) if len(eligible) else None
    means = {}
    for mode in MODES:
        readers = eligible.loc[eligible["mode"] == mode, "reviewer"].tolist()
        if readers:
            means[mode] = mean_reader_comparison(reads, mode=mode, readers=readers, n_boot=N_BOOT)
    agreement = {mode: (pairwise_kappa(reads, mode=mode), fleiss_kappa_of(reads, mode=mode)) for mode in MODES}
    return {
        "reads": reads,
        "table": table,
        "curve": curve,
        "means": means,
        "aided": aided_vs_unaided(reads),
        "agreement": agreement,
    }


def _ci_text(value: float, low: float, high: float) -> str:
    return (
        "n/a"
        if not np.isfinite(value)
        else (f"{value:.1%} ({low:.1%}-{high:.1%})" if np.isfinite(low) else f"{value:.1%}")
    )


def _reader_rows(table: pd.DataFrame, classes=MELANOMA) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Reader": table["reviewer"],
            "Mode": table["mode"].map(MODE_WORDS),
            "Lesions": table["n"],
            classes.positive_plural.capitalize(): table["n_malignant"],
            "Sensitivity (95% CI)": [
                _ci_text(v, lo, hi)
                for v, lo, hi in zip(table["sensitivity"], table["sensitivity_low"], table["sensitivity_high"])
            ],
            "Specificity (95% CI)": [
                _ci_text(v, lo, hi)
                for v, lo, hi in zip(table["specificity"], table["specificity_low"], table["specificity_high"])
            ],
            "Model sensitivity at this specificity": table["model_sensitivity_at_reader_specificity"].map(_pct),
            "Model AUROC (same lesions)": table["model_auroc"].round(3),
            "Rated": table["n_confidence"],
            "Confidence AUROC (95% CI)": [
                f"{v:.3f} ({lo:.3f}-{hi:.3f})" if np.isfinite(lo) else (f"{v:.3f}" if np.isfinite(v) else "")
                for v, lo, hi in zip(table["reader_auroc"], table["reader_auroc_low"], table["reader_auroc_high"])
            ],
            "On ROC plot": table["eligible"],
            "Note": table["note"],
        }
    )


def _mean_reader_text(result, level: float = 0.95, classes=MELANOMA) -> str:
    names = ", ".join(escape_markdown(n) for n in result.readers)
    if not np.isfinite(result.sensitivity_diff):
        return f"**Mean reader ({MODE_WORDS[result.mode]})**: {escape_markdown(result.note)}"
    low, high = result.sensitivity_diff_ci
    s_low, s_high = result.specificity_diff_ci
    return (
        f"**Mean reader ({MODE_WORDS[result.mode]})**, {len(result.readers)} reader(s) ({names}) on the "
        f"{result.n:,} lesions all of them read ({result.n_malignant:,} {classes.positive_plural}, "
        f"{result.n_patients:,} "
        f"patients): sensitivity {_pct(result.reader_sensitivity)}, specificity "
        f"{_pct(result.reader_specificity)}. The model at that specificity: sensitivity "
        f"{_pct(result.model_sensitivity)}, a difference of {result.sensitivity_diff:+.1%} ({level:.0%} CI "
        f"{low:+.1%} to {high:+.1%}); at the mean reader's sensitivity its specificity differs by "
        f"{result.specificity_diff:+.1%} ({s_low:+.1%} to {s_high:+.1%}). Intervals: {result.n_boot:,} "
        "two-way bootstrap resamples of readers and patients."
        + (f" {escape_markdown(result.note)}." if result.note else "")
    )


def _readers_section(store, runs_by_label: dict, classes=MELANOMA) -> None:
    """Readers of a reader study (Review page) against the model on the same lesions; ``classes`` (the
    dataset's :class:`melcore.classes.ClassNames`) names the counted positives."""
    st.subheader("Readers against the model")
    url = settings.db_url()
    histories = {label: store.review_history(run["id"]) for label, run in runs_by_label.items()}
    with_reads = {
        label: h
        for label, h in histories.items()
        if len(h) and h["decision"].isin(("biopsy", "follow-up", "reassure")).any()
    }
    if not with_reads:
        st.caption(
            "No reader-study reads for the selected runs yet. On the **Review** page choose a reader-study "
            "mode (blinded or aided) and record management decisions; readers with at least "
            f"{MIN_READS} reads on labelled lesions then appear here on the model's ROC curve."
        )
        return
    label = (
        st.selectbox("Reader study of run", list(with_reads), key="compare_readers_run")
        if len(with_reads) > 1
        else next(iter(with_reads))
    )
    run = runs_by_label[label]
    history = with_reads[label]
    predictions = store.get_predictions(run["id"])
    study = _reader_study(
        url,
        run["id"],
        (len(history), int(history["id"].max())),
        store.prediction_counts([run["id"]]).get(run["id"], (0, 0)),
        history,
        predictions,
    )
    table, curve = study["table"], study["curve"]
    if table.empty:
        st.info("The reads of this run are on lesions without a label or a score: nothing to compare yet.")
        return
    eligible = table[table["eligible"]]
    st.caption(
        f"Run {escape_markdown(label)}: every stored prediction of the run (all splits; the subset filters "
        "above do not apply). A reader's call is positive when the decision is biopsy / excise; "
        "sensitivity and specificity carry Wilson 95% intervals. The model is judged on each reader's own "
        "lesions."
    )
    figure_args = None
    if curve is not None and len(eligible):
        mean_points = {m: (r.reader_specificity, r.reader_sensitivity) for m, r in study["means"].items()}
        figure_args = (curve.fpr, curve.tpr, curve.auroc, curve.ci, eligible)
        st.plotly_chart(
            readers_roc_figure(*figure_args, model_name=label, mean_reader=mean_points),
            width="stretch",
            key="compare_readers_roc",
        )
        st.caption(
            f"Model curve on the {curve.n:,} lesions read by the readers shown ({curve.n_malignant:,} "
            f"{classes.positive_plural}, {curve.n_patients:,} patients); "
            + (
                "every reader read all of them."
                if curve.same_lesions
                else "readers read different subsets, so each point is on its reader's lesions (the table gives "
                "the model on exactly those)."
            )
            + " Diamonds: blinded reads; circles: aided; stars: the mean reader."
        )
    else:
        st.info(
            f"No reader has {MIN_READS} reads on labelled lesions with both classes yet: the ROC plot needs "
            "them. The table shows what there is."
        )
    st.dataframe(_reader_rows(table, classes), hide_index=True, width="stretch", key="compare_readers_table")
    for result in study["means"].values():
        st.markdown(_mean_reader_text(result, classes=classes))
    if len(study["aided"]):
        st.markdown("**Aided against blinded reading** (the same lesions, each reader)")
        paired = study["aided"]
        st.dataframe(
            pd.DataFrame(
                {
                    "Reader": paired["reviewer"],
                    "Lesions": paired["n"],
                    classes.positive_plural.capitalize(): paired["n_malignant"],
                    "Sensitivity blinded": paired["sensitivity_unaided"].map(_pct),
                    "Sensitivity aided": paired["sensitivity_aided"].map(_pct),
                    "Change": paired["sensitivity_diff"].map(lambda v: "" if not np.isfinite(v) else f"{v:+.1%}"),
                    "McNemar p (sens)": paired["sensitivity_p"].map(_p_value),
                    "Specificity blinded": paired["specificity_unaided"].map(_pct),
                    "Specificity aided": paired["specificity_aided"].map(_pct),
                    "Change ": paired["specificity_diff"].map(lambda v: "" if not np.isfinite(v) else f"{v:+.1%}"),
                    "McNemar p (spec)": paired["specificity_p"].map(_p_value),
                }
            ),
            hide_index=True,
            width="stretch",
            key="compare_readers_aided",
        )
    for mode, (pairs, (fleiss, n_lesions, n_readers)) in study["agreement"].items():
        if pairs.empty:
            continue
        st.markdown(f"**Agreement, {MODE_WORDS[mode]} reads** (biopsy / follow-up / reassure)")
        st.dataframe(
            pd.DataFrame(
                {
                    "Reader A": pairs["reviewer_a"],
                    "Reader B": pairs["reviewer_b"],
                    "Shared lesions": pairs["n_shared"],
                    "Same decision": pairs["agreement"].map(_pct),
                    "Cohen's kappa": pairs["kappa"].round(3),
                }
            ),
            hide_index=True,
            width="stretch",
            key=f"compare_readers_kappa_{mode}",
        )
        st.caption(
            f"Fleiss' kappa across {n_readers} readers on the {n_lesions:,} lesions all of them read: "
            + (f"{fleiss:.3f}" if np.isfinite(fleiss) else "n/a (needs two readers and shared lesions)")
        )
    cols = st.columns(2)
    cols[0].download_button(
        "Download reader table (CSV)",
        reader_table_csv(table, classes).encode(),
        key="compare_readers_csv",
        file_name=f"readers-run{run['id']}.csv",
        mime="text/csv",
        on_click="ignore",
    )
    if figure_args is not None:
        mean_points = {m: (r.reader_specificity, r.reader_sensitivity) for m, r in study["means"].items()}
        cols[1].download_button(
            "Download reader figure (PNG)",
            readers_roc_png(*figure_args, model_name=label, mean_reader=mean_points),
            key="compare_readers_png",
            file_name=f"readers-run{run['id']}.png",
            mime="image/png",
            on_click="ignore",
        )


# --------------------------------------------------------------------------- page


def main() -> None:
    store = page_start(
        "Compare",
        "Choose a model and an operating point together: ROC with patient-bootstrap intervals, "
        "paired tests, per-clinic behaviour and the biopsy cost of each threshold.",
    )
    dataset = dataset_picker(store, key="compare_dataset")
    if dataset is None:
        return
    active = store.list_runs(dataset_id=dataset["id"])
    archived = store.list_runs(dataset_id=dataset["id"], archived=True)
    runs, split, common = _pick_runs(store, dataset, active, len(archived))
    _archive_controls(active, archived)
    if not runs:
        if active:
            _cross_clinic_section(store, dataset)
        return
    try:
        cohort = load_cohort_cached(dataset)
    except (MelcoreError, OSError) as exc:
        show_error(exc, "The dataset's table could not be read; subsets by site, sex and age are unavailable")
        cohort = None
    version = _cohort_version(dataset) + (cohort is not None,)
    url = settings.db_url()
    classes = dataset_classes(dataset)

    frames, splits, runs_by_label, notes = {}, {}, {}, []
    for run in runs:
        label = run_label(run)
        try:
            frame, used, run_notes = _prepared(url, run["id"], split, version, cohort)
        except MelcoreError as exc:
            notes.append(f"{label}: skipped ({exc})")
            continue
        if used is None:
            which = "" if split == "auto" else f" of split '{split}'"
            notes.append(f"{label}: no stored predictions{which}, skipped")
            continue
        if len(frame) == 0:
            notes.append(f"{label}: no labelled predictions, skipped")
            continue
        frames[label], splits[label], runs_by_label[label] = frame, used, run
        notes += [f"{label}: {n}" for n in run_notes]
    for note in notes:
        st.caption(escape_markdown(note))
    if not frames:
        st.info("None of the selected runs has predictions to compare yet.")
        return

    filters = _subset_filters(frames)
    key = subset_key(filters)
    subset = {k: apply_subset(f, filters) for k, f in frames.items()}
    common_ids = tuple(sorted(r["id"] for r in runs_by_label.values())) if common else ()
    if common:
        subset = common_images(subset)
    if filters and any(filters.values()):
        st.caption(f"Subset: {escape_markdown(describe_subset(filters))}")

    evaluations = {}
    for label, frame in subset.items():
        run_id = runs_by_label[label]["id"]
        if len(frame) == 0:
            st.caption(f"{escape_markdown(label)}: no images in this subset, left out")
            continue
        try:
            evaluations[label] = _evaluation(url, run_id, splits[label], version, key, common_ids, frame, classes)
        except MelcoreError as exc:
            show_error(exc, label)
    if not evaluations:
        st.info("No selected run has images in this subset: widen the subset.")
        return
    names = list(evaluations)

    audit = (dataset.get("summary") or {}).get("shortcut_audit")
    confounding = {
        label: _confounding(
            url,
            runs_by_label[label]["id"],
            splits[label],
            version,
            key,
            common_ids,
            cohort.table if cohort is not None else None,
            subset[label],
            audit,
        )
        for label in names
    }
    _confounding_lead(confounding, classes.positive_plural)
    for label in names:
        for warning in missingness_of(runs_by_label[label], cohort):
            st.warning(f"**{escape_markdown(label)}** (metadata model): " + escape_markdown(warning))
    _overlap_warning({k: subset[k] for k in names})
    _scratch_warning([runs_by_label[k] for k in names])
    _summary(evaluations, runs_by_label, splits, confounding, classes)

    breakdowns = {}
    for label in names:
        try:
            breakdowns[label] = _breakdown(
                url, runs_by_label[label]["id"], splits[label], version, key, common_ids, subset[label]
            )
        except MelcoreError as exc:
            show_error(exc, f"{label}: per-clinic table")

    colors = {k: run_color(runs_by_label[k]["id"]) for k in names}
    _threshold_free_curves(evaluations, names, classes, colors)
    _decision_curve(evaluations, names, {k: runs_by_label[k].get("threshold") for k in names}, classes, colors)
    _clinic_auroc_table(breakdowns, classes)
    _operating_point(evaluations, breakdowns, runs_by_label, dataset, filters)
    _threshold_elsewhere(evaluations, {k: subset[k] for k in names}, splits, classes)

    pair_frames = {k: subset[k] for k in names}
    pair_key = tuple(runs_by_label[k]["id"] for k in names)
    _pairwise_section(_pairwise(url, pair_key, split, version, key, common_ids, pair_frames, classes), classes)
    if breakdowns:
        _clinic_bars(breakdowns, names, {k: run_color(runs_by_label[k]["id"]) for k in names})
    _readers_section(store, {k: runs_by_label[k] for k in names}, classes)
    _cross_clinic_section(store, dataset)


main()
