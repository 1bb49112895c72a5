"""Evaluation metrics for melanoma classifiers: curves, AUROC with CI, DeLong, operating points.

Clinicians choose a model and an operating point together, so everything here works
on the pair ``(y, p)``:

``y``
    true labels, array-like of shape (n,), values 0 (benign) or 1 (malignant); bool,
    int, float 0.0/1.0 and pandas nullable integers are accepted.
``p``
    predicted melanoma probabilities, array-like of shape (n,) (or (n, 1), as Keras
    returns them), floats in [0, 1], no NaN.

Conventions
    * An image is called positive (flagged for biopsy) when ``p >= threshold``.
    * Undefined ratios (a sensitivity with no malignant image, a PPV with nothing
      flagged...) are ``nan``, never 0.
    * ``biopsies_per_melanoma`` = flagged / true positives = 1 / PPV. It is ``inf``
      when images are flagged but none is malignant (biopsies that find no melanoma)
      and ``nan`` when nothing is flagged (no biopsies at all).
    * Bootstrap confidence intervals resample *patients* (``groups``) with
      replacement, because a patient's lesions are correlated; images whose group
      is missing (None/NaN) count as their own group. Resamples that contain only
      one class are left out, and their number is reported with the interval
      (:class:`AurocInterval`, ``per_group``'s ``boot_dropped``); above
      :data:`BOOTSTRAP_DROPPED_WARN` of the resamples a note says so, because the
      interval then rests on the resamples that happened to hold both classes and is
      too narrow. The interval is the percentile interval.
    * Where scikit-learn computes the same quantity (``roc_curve``, ``roc_auc_score``,
      ``precision_recall_curve``, ``average_precision_score``, ``confusion_matrix``,
      ``recall_score``, ``precision_score``, ``f1_score``, ``accuracy_score``,
      ``calibration_curve``, ``brier_score_loss``) the results here are the same
      (tested with hypothesis); the functions here add validation with messages
      for people and refuse one-class inputs where the quantity is undefined.
    * Where one class is a legitimate outcome (a fold, a clinic, a training split),
      :func:`auroc_or_none` is the one policy: None (JSON null), shown as
      :data:`ONE_CLASS_AUROC` by :func:`format_auroc`.

Invalid input raises :class:`melcore.errors.MelcoreError` saying what was wrong and
where (positions, or image names when the caller passes ``names``).

Only numpy, scipy, pandas and scikit-learn-compatible conventions; no TensorFlow.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.integrate import trapezoid

from melcore.cohort import age_band, group_keys
from melcore.errors import MelcoreError
from melcore.formatting import SHOWN, first_few

__all__ = [
    "BOOTSTRAP_DROPPED_WARN",
    "AurocInterval",
    "bootstrap_dropped_note",
    "operating_point_ci",
    "THRESHOLD_METRIC_KEYS",
    "DelongResult",
    "PairedBootstrapResult",
    "PrecisionRecallCurve",
    "RocCurve",
    "ThresholdSweep",
    "ONE_CLASS_AUROC",
    "auroc",
    "auroc_or_none",
    "auroc_bootstrap",
    "auroc_ci",
    "format_auroc",
    "average_precision",
    "brier_score",
    "calibration_curve",
    "calibration_table",
    "check_labels",
    "check_predictions",
    "delong_ci",
    "delong_se",
    "delong_test",
    "operating_points",
    "PAUC_MIN_TPR",
    "net_benefit",
    "paired_auroc_bootstrap",
    "partial_auroc",
    "partial_auroc_bootstrap",
    "partial_auroc_ci",
    "per_group",
    "precision_recall_curve",
    "roc_curve",
    "summarize",
    "threshold_metrics",
]

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each block of bootstrap resamples."""

#: Keys of the dict returned by :func:`threshold_metrics` and :meth:`ThresholdSweep.at`, in order.
THRESHOLD_METRIC_KEYS = (
    "threshold",
    "n",
    "n_malignant",
    "n_benign",
    "tp",
    "fp",
    "tn",
    "fn",
    "n_flagged",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "accuracy",
    "youden_j",
    "biopsies_per_melanoma",
)

_BOOT_BLOCK_ELEMENTS = 2_000_000  # resamples x images per vectorised block (~16 MB of int64)

BOOTSTRAP_DROPPED_WARN = 0.05
"""Share of one-class bootstrap resamples above which an interval carries a note (and Compare warns)."""


# --------------------------------------------------------------------------- validation


def _one_dimensional(values, what: str) -> np.ndarray:
    if isinstance(values, (pd.Series, pd.Index)):
        arr = values.to_numpy()
    elif isinstance(values, pd.DataFrame):
        if values.shape[1] != 1:
            raise MelcoreError(f"{what} must be one column; got a table with columns {list(values.columns)}")
        arr = values.iloc[:, 0].to_numpy()
    else:
        arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:  # Keras predictions have shape (n, 1)
        arr = arr[:, 0]
    if arr.ndim == 0:
        raise MelcoreError(f"{what} must be a sequence of values, got the single value {arr.item()!r}")
    if arr.ndim != 1:
        raise MelcoreError(f"{what} must be one-dimensional (n,) or (n, 1); got shape {arr.shape}")
    return arr


def _where(index: int, names) -> str:
    return f"image {names[index]}" if names is not None else f"position {index}"


def _list_bad(bad_index: np.ndarray, values: np.ndarray, names) -> str:
    return first_few(
        (f"{_show(values[i])} at {_where(int(i), names)}" for i in bad_index[:SHOWN]), total=len(bad_index)
    )


def _show(value) -> str:
    if value is None or value is pd.NA:
        return "missing"
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return "NaN"
    return repr(value.item() if isinstance(value, np.generic) else value)


def _is_zero_or_one(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return True
    if value is None or value is pd.NA or isinstance(value, str):
        return False
    if isinstance(value, numbers.Number):
        try:
            return bool(value == 0 or value == 1)
        except (TypeError, ValueError):
            return False
    return False


def check_labels(y, *, names=None, what: str = "labels") -> np.ndarray:
    """Validate true labels and return them as an int8 array of 0/1, shape (n,).

    Args:
        y: array-like (n,) of 0/1 (bool, int, float or pandas nullable integers).
        names: optional sequence (n,) of image names used in error messages
            instead of positions.
        what: how the labels are called in messages.

    Raises:
        MelcoreError: a value that is not 0 or 1 (missing, NaN, 2, "yes"...), naming
            the first offending positions (or images) and values.
    """
    arr = _one_dimensional(y, what)
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if arr.dtype.kind in "iu":
        bad = (arr != 0) & (arr != 1)
    elif arr.dtype.kind == "f":
        bad = ~((arr == 0) | (arr == 1))
    else:
        bad = np.fromiter((not _is_zero_or_one(v) for v in arr), dtype=bool, count=len(arr))
    if bad.any():
        index = np.flatnonzero(bad)
        raise MelcoreError(
            f"{what} must be 0 (benign) or 1 (malignant): found {_list_bad(index, arr, names)} "
            f"({len(index)} of {len(arr)} bad); fix or drop these rows"
        )
    if arr.dtype.kind in "iuf":
        return arr.astype(np.int8)
    return np.fromiter((int(v) for v in arr), dtype=np.int8, count=len(arr))


def check_predictions(p, *, names=None, what: str = "predictions") -> np.ndarray:
    """Validate predicted probabilities and return them as float64, shape (n,).

    Raises:
        MelcoreError: a value that is missing/NaN, not a number, or outside [0, 1]
            (including +-inf), naming the first offending positions (or images).
    """
    arr = _one_dimensional(p, what)
    if arr.dtype.kind in "fiub":
        values = arr.astype(np.float64)
        not_number = np.zeros(len(arr), dtype=bool)
    else:
        values = np.empty(len(arr), dtype=np.float64)
        not_number = np.zeros(len(arr), dtype=bool)
        for i, v in enumerate(arr):
            if v is None or v is pd.NA:
                values[i] = np.nan
                continue
            try:
                if isinstance(v, str):  # "0.3" in an object column is a reading mistake upstream
                    raise ValueError(v)
                values[i] = float(v)
            except (TypeError, ValueError):
                values[i] = np.nan
                not_number[i] = True
    missing = np.isnan(values) & ~not_number
    outside = ~np.isnan(values) & ((values < 0) | (values > 1))
    problems = []
    for mask, label in ((not_number, "not a number"), (missing, "missing or NaN"), (outside, "outside [0, 1]")):
        if mask.any():
            index = np.flatnonzero(mask)
            problems.append(f"{label}: {_list_bad(index, arr, names)}")
    if problems:
        n_bad = int((not_number | missing | outside).sum())
        hint = " (are these logits? apply a sigmoid first)" if outside.any() else ""
        raise MelcoreError(
            f"{what} must be probabilities in [0, 1] for every image; "
            + "; ".join(problems)
            + f" ({n_bad} of {len(arr)} bad){hint}"
        )
    return values


def _check_pair(
    y, p, *, names=None, need_both_classes: bool = False, quantity: str = "AUROC"
) -> tuple[np.ndarray, np.ndarray]:
    y_arr = _one_dimensional(y, "labels")
    p_arr = _one_dimensional(p, "predictions")
    if len(y_arr) != len(p_arr):
        raise MelcoreError(
            f"labels and predictions differ in length: {len(y_arr)} labels but {len(p_arr)} predictions; "
            "they must describe the same images in the same order"
        )
    if names is not None and len(names) != len(y_arr):
        raise MelcoreError(f"names has {len(names)} entries but there are {len(y_arr)} labels")
    if len(y_arr) == 0:
        raise MelcoreError("no predictions to evaluate (0 images)")
    labels = check_labels(y_arr, names=names)
    scores = check_predictions(p_arr, names=names)
    if need_both_classes:
        _require_both_classes(labels, quantity)
    return labels, scores


def _require_both_classes(labels: np.ndarray, quantity: str = "AUROC") -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        which = "malignant (1)" if n_pos else "benign (0)"
        raise MelcoreError(
            f"{quantity} needs both malignant (1) and benign (0) images, but all {len(labels)} labels are "
            f"{which}; evaluate on a set that contains both classes"
        )


def _check_threshold(threshold) -> float:
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
        raise MelcoreError(f"threshold must be a number, got {threshold!r}")
    value = float(threshold)
    if math.isnan(value):
        raise MelcoreError("threshold must be a number, got NaN")
    return value


def _check_target(target, what: str) -> float:
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, numbers.Real) or not 0 < target <= 1:
        raise MelcoreError(f"target {what} must be a number in (0, 1], got {target!r}")
    return float(target)


def _check_level(level) -> float:
    if not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise MelcoreError(f"confidence level must be in (0, 1), e.g. 0.95; got {level!r}")
    return float(level)


# --------------------------------------------------------------------------- counts -> metrics


def _metrics_from_counts(tp, fp, tn, fn):
    """Vectorised: counts (arrays or scalars) -> dict of rate arrays (float64)."""
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    tn = np.asarray(tn, dtype=np.float64)
    fn = np.asarray(fn, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity = tp / (tp + fn)
        specificity = tn / (tn + fp)
        return {
            "sensitivity": sensitivity,
            "specificity": specificity,
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / ((tp + fn) + (tp + fp)),
            "accuracy": (tp + tn) / (tp + fp + tn + fn),
            "youden_j": sensitivity + specificity - 1,
            "biopsies_per_melanoma": (tp + fp) / tp,
        }


def _metric_dict(threshold: float, tp: int, fp: int, tn: int, fn: int) -> dict:
    rates = _metrics_from_counts(tp, fp, tn, fn)
    out = {
        "threshold": float(threshold),
        "n": tp + fp + tn + fn,
        "n_malignant": tp + fn,
        "n_benign": tn + fp,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n_flagged": tp + fp,
    }
    out.update({key: float(value) for key, value in rates.items()})
    return {key: out[key] for key in THRESHOLD_METRIC_KEYS}


def threshold_metrics(y, p, threshold: float = 0.5) -> dict:
    """Every metric at one threshold; an image is positive when ``p >= threshold``.

    Args:
        y: labels (n,) of 0/1. p: probabilities (n,) in [0, 1].
        threshold: any real number (above 1 flags nothing, 0 flags everything).

    Returns:
        dict with the keys of :data:`THRESHOLD_METRIC_KEYS`: ``threshold`` (float);
        ``n``, ``n_malignant``, ``n_benign``, ``tp``, ``fp``, ``tn``, ``fn``,
        ``n_flagged`` (= tp + fp, the biopsies) as int; ``sensitivity`` (recall),
        ``specificity``, ``ppv`` (precision), ``npv``, ``f1``, ``accuracy``,
        ``youden_j`` (sensitivity + specificity - 1) and ``biopsies_per_melanoma``
        (flagged / tp = 1 / PPV; ``inf`` when flagged > 0 but tp = 0, ``nan`` when
        nothing is flagged) as float, ``nan`` where undefined.

    One class is allowed (sensitivity or specificity is then ``nan``). O(n); for
    many thresholds on the same predictions use :class:`ThresholdSweep`.
    """
    labels, scores = _check_pair(y, p)
    t = _check_threshold(threshold)
    flagged = scores >= t
    malignant = labels == 1
    tp = int(np.count_nonzero(flagged & malignant))
    fp = int(np.count_nonzero(flagged & ~malignant))
    fn = int(np.count_nonzero(malignant)) - tp
    tn = len(labels) - tp - fp - fn
    return _metric_dict(t, tp, fp, tn, fn)


# --------------------------------------------------------------------------- curves


class RocCurve(NamedTuple):
    """ROC curve, unpacks like scikit-learn's ``fpr, tpr, thresholds``.

    fpr, tpr: float64 (k,), increasing; thresholds: float64 (k,), decreasing, the
    first is ``inf`` (nothing flagged, the point (0, 0)).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


class PrecisionRecallCurve(NamedTuple):
    """Precision-recall curve, unpacks like scikit-learn's ``precision, recall, thresholds``.

    precision, recall: float64 (k + 1,), recall decreasing, ending with the point
    (recall 0, precision 1); thresholds: float64 (k,), increasing.
    """

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray


class ThresholdSweep:
    """All threshold metrics at any threshold in O(log n), after one O(n log n) sort.

    ``ThresholdSweep(y, p)`` sorts the malignant and benign scores once; then
    ``.at(t)`` counts ``p >= t`` in each by binary search, so moving a threshold
    slider over 33,000 predictions costs microseconds. One class is allowed
    (rates that need the missing class are ``nan``; curves, AUROC and operating
    points raise).

    Attributes:
        n, n_malignant, n_benign: int counts.
        thresholds: float64 (k,), the distinct scores, increasing. Every threshold
            gives the same counts as the smallest of these that is >= it.
        tp, fp: int64 (k,), true / false positives at each of ``thresholds``.
    """

    def __init__(self, y, p):
        labels, scores = _check_pair(y, p)
        self._malignant_scores = np.sort(scores[labels == 1])
        self._benign_scores = np.sort(scores[labels == 0])
        self.n = len(labels)
        self.n_malignant = len(self._malignant_scores)
        self.n_benign = len(self._benign_scores)
        self.thresholds = np.unique(scores)
        self.tp = self.n_malignant - np.searchsorted(self._malignant_scores, self.thresholds, "left")
        self.fp = self.n_benign - np.searchsorted(self._benign_scores, self.thresholds, "left")

    def __repr__(self) -> str:
        return f"ThresholdSweep(n={self.n}, n_malignant={self.n_malignant}, distinct_scores={len(self.thresholds)})"

    # -- counts and metrics
    def counts(self, threshold: float) -> tuple[int, int, int, int]:
        """(tp, fp, tn, fn) at ``threshold`` (positive when p >= threshold), O(log n)."""
        t = _check_threshold(threshold)
        tp = self.n_malignant - int(np.searchsorted(self._malignant_scores, t, "left"))
        fp = self.n_benign - int(np.searchsorted(self._benign_scores, t, "left"))
        return tp, fp, self.n_benign - fp, self.n_malignant - tp

    def at(self, threshold: float) -> dict:
        """Same dict as :func:`threshold_metrics` (identical values), O(log n)."""
        tp, fp, tn, fn = self.counts(threshold)
        return _metric_dict(float(threshold), tp, fp, tn, fn)

    def at_many(self, thresholds) -> pd.DataFrame:
        """:meth:`at` for many thresholds at once: DataFrame, one row per threshold."""
        t = np.asarray(thresholds, dtype=np.float64).ravel()
        if np.isnan(t).any():
            raise MelcoreError("thresholds must be numbers; got NaN")
        tp = self.n_malignant - np.searchsorted(self._malignant_scores, t, "left")
        fp = self.n_benign - np.searchsorted(self._benign_scores, t, "left")
        return self._table(t, tp, fp)

    def curve(self, max_points: int | None = None) -> pd.DataFrame:
        """Metrics at every distinct score, threshold increasing, for plotting vs threshold.

        Columns: the keys of :data:`THRESHOLD_METRIC_KEYS`. The first row flags
        everything (sensitivity 1); a last row just above the highest score flags
        nothing (specificity 1). ``max_points`` keeps about that many evenly spaced
        rows (always the first and last) for light plots.
        """
        t, tp, fp = self._candidates()
        if max_points is not None and len(t) > max_points:
            if max_points < 2:
                raise MelcoreError(f"max_points must be at least 2, got {max_points}")
            keep = np.unique(np.linspace(0, len(t) - 1, int(max_points)).round().astype(int))
            t, tp, fp = t[keep], tp[keep], fp[keep]
        return self._table(t, tp, fp)

    def _table(self, t, tp, fp) -> pd.DataFrame:
        tp = np.asarray(tp, dtype=np.int64)
        fp = np.asarray(fp, dtype=np.int64)
        fn = self.n_malignant - tp
        tn = self.n_benign - fp
        table = {
            "threshold": t,
            "n": np.full(len(t), self.n, dtype=np.int64),
            "n_malignant": np.full(len(t), self.n_malignant, dtype=np.int64),
            "n_benign": np.full(len(t), self.n_benign, dtype=np.int64),
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
            "n_flagged": tp + fp,
        }
        table.update(_metrics_from_counts(tp, fp, tn, fn))
        return pd.DataFrame({key: table[key] for key in THRESHOLD_METRIC_KEYS})

    def _candidates(self):
        """Distinct scores plus one threshold above them all; increasing; with counts."""
        above = np.nextafter(self.thresholds[-1], np.inf)
        return (np.append(self.thresholds, above), np.append(self.tp, 0), np.append(self.fp, 0))

    def net_benefit(self, thresholds=None) -> pd.DataFrame:
        """:func:`net_benefit` table at ``thresholds`` (default 0.01, ..., 0.99), O(k log n)."""
        t = (
            np.round(np.arange(1, 100) / 100, 2)
            if thresholds is None
            else np.asarray(thresholds, dtype=np.float64).ravel()
        )
        if np.isnan(t).any() or (t < 0).any() or (t >= 1).any():
            raise MelcoreError(
                "decision-curve thresholds must be probabilities in [0, 1) (the net benefit is undefined at 1)"
            )
        tp = self.n_malignant - np.searchsorted(self._malignant_scores, t, "left")
        fp = self.n_benign - np.searchsorted(self._benign_scores, t, "left")
        odds = t / (1 - t)
        prevalence = self.n_malignant / self.n
        return pd.DataFrame(
            {
                "threshold": t,
                "net_benefit": tp / self.n - fp / self.n * odds,
                "treat_all": prevalence - (1 - prevalence) * odds,
                "treat_none": np.zeros(len(t)),
                "n_flagged": tp + fp,
                "tp": tp,
                "fp": fp,
            }
        )

    # -- curves
    def roc_curve(self, drop_intermediate: bool = True) -> RocCurve:
        """ROC curve identical to ``sklearn.metrics.roc_curve`` (same points, same thresholds)."""
        _sweep_both_classes(self, "a ROC curve")
        fps = self.fp[::-1].astype(np.float64)
        tps = self.tp[::-1].astype(np.float64)
        thresholds = self.thresholds[::-1]
        if drop_intermediate and len(fps) > 2:
            # keep corners only: collinear intermediate points do not change the curve or its area
            keep = np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]])
            fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
        fps = np.concatenate([[0.0], fps])
        tps = np.concatenate([[0.0], tps])
        thresholds = np.concatenate([[np.inf], thresholds])
        return RocCurve(fps / fps[-1], tps / tps[-1], thresholds)

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoids; ties count one half), = ``roc_auc_score``."""
        fpr, tpr, _ = self.roc_curve(drop_intermediate=True)
        return float(trapezoid(tpr, fpr))

    def precision_recall_curve(self, drop_intermediate: bool = False) -> PrecisionRecallCurve:
        """Precision-recall curve identical to ``sklearn.metrics.precision_recall_curve``."""
        if self.n_malignant == 0:
            raise MelcoreError(
                f"a precision-recall curve needs malignant (1) images, but all {self.n} labels are benign (0)"
            )
        fps = self.fp[::-1].astype(np.float64)
        tps = self.tp[::-1].astype(np.float64)
        thresholds = self.thresholds[::-1]
        if drop_intermediate and len(fps) > 2:
            keep = np.concatenate([[True], np.logical_or(np.diff(tps[:-1]), np.diff(tps[1:])), [True]])
            fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
        precision = tps / (tps + fps)
        recall = tps / tps[-1]
        return PrecisionRecallCurve(
            np.concatenate([precision[::-1], [1.0]]), np.concatenate([recall[::-1], [0.0]]), thresholds[::-1]
        )

    def average_precision(self) -> float:
        """Step-wise area under the PR curve, = ``sklearn.metrics.average_precision_score``."""
        precision, recall, _ = self.precision_recall_curve()
        return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))

    # -- operating points
    def _point(self, k: int, name: str, kind: str, target) -> dict:
        t, tp, fp = self._candidates()
        metrics = _metric_dict(
            float(t[k]), int(tp[k]), int(fp[k]), self.n_benign - int(fp[k]), self.n_malignant - int(tp[k])
        )
        return {"name": name, "kind": kind, "target": target, **metrics}

    def youden(self) -> dict:
        """The threshold maximising Youden's J = sensitivity + specificity - 1.

        Ties are broken towards the highest threshold (fewest biopsies). Returns an
        operating point dict: ``name`` "youden", ``kind`` "youden", ``target`` None,
        plus the :func:`threshold_metrics` keys.
        """
        _sweep_both_classes(self, "Youden's J")
        _, tp, fp = self._candidates()
        # compare J exactly in integers: J * P * N = tp * N - fp * P
        scaled_j = tp.astype(np.int64) * self.n_benign - fp.astype(np.int64) * self.n_malignant
        k = len(scaled_j) - 1 - int(np.argmax(scaled_j[::-1]))
        return self._point(k, "youden", "youden", None)

    def threshold_for_sensitivity(self, target: float) -> dict:
        """The HIGHEST threshold whose sensitivity is >= ``target`` (operating point dict).

        Any higher threshold misses the target; this one flags the fewest images
        among those that reach it. ``name`` is e.g. "sensitivity>=0.9".
        """
        target = _check_target(target, "sensitivity")
        if self.n_malignant == 0:
            raise MelcoreError("a target sensitivity needs malignant (1) images, but there are none")
        _, tp, _ = self._candidates()
        sensitivity = tp / self.n_malignant  # non-increasing with the threshold
        k = int(np.count_nonzero(sensitivity >= target)) - 1
        return self._point(k, f"sensitivity>={target:g}", "sensitivity", target)

    def threshold_for_specificity(self, target: float) -> dict:
        """The LOWEST threshold whose specificity is >= ``target`` (operating point dict).

        Any lower threshold misses the target; this one finds the most melanomas
        among those that reach it. May lie just above the highest score (flag nothing)
        when the top-scored images are benign. ``name`` is e.g. "specificity>=0.9".
        """
        target = _check_target(target, "specificity")
        if self.n_benign == 0:
            raise MelcoreError("a target specificity needs benign (0) images, but there are none")
        _, _, fp = self._candidates()
        specificity = (self.n_benign - fp) / self.n_benign  # non-decreasing with the threshold
        k = int(np.argmax(specificity >= target))
        return self._point(k, f"specificity>={target:g}", "specificity", target)

    def operating_points(
        self, sensitivities: Sequence[float] = (0.9, 0.95), specificities: Sequence[float] = (0.9,), youden: bool = True
    ) -> list[dict]:
        """Youden's point, then one point per target sensitivity, then per target specificity."""
        points = [self.youden()] if youden else []
        points += [self.threshold_for_sensitivity(s) for s in sensitivities]
        points += [self.threshold_for_specificity(s) for s in specificities]
        return points


def _sweep_both_classes(sweep: ThresholdSweep, quantity: str) -> None:
    if sweep.n_malignant == 0 or sweep.n_benign == 0:
        _require_both_classes(np.full(sweep.n, int(sweep.n_malignant > 0), dtype=np.int8), quantity)


def roc_curve(y, p, *, drop_intermediate: bool = True) -> RocCurve:
    """ROC curve ``(fpr, tpr, thresholds)``, identical to ``sklearn.metrics.roc_curve``.

    Raises MelcoreError when only one class is present.
    """
    return ThresholdSweep(y, p).roc_curve(drop_intermediate=drop_intermediate)


def precision_recall_curve(y, p, *, drop_intermediate: bool = False) -> PrecisionRecallCurve:
    """``(precision, recall, thresholds)``, identical to ``sklearn.metrics.precision_recall_curve``."""
    return ThresholdSweep(y, p).precision_recall_curve(drop_intermediate=drop_intermediate)


def auroc(y, p) -> float:
    """Area under the ROC curve, identical to ``sklearn.metrics.roc_auc_score``.

    Raises MelcoreError when only one class is present.
    """
    return ThresholdSweep(y, p).auroc()


#: How an AUROC that :func:`auroc_or_none` leaves undefined is shown (logs, CLI, pages).
ONE_CLASS_AUROC = "n/a (one class)"


def auroc_or_none(y, p) -> float | None:
    """:func:`auroc` where it is defined, else None: the one policy for an AUROC that may be undefined.

    A training split, a fold or a clinic can hold one class only; its AUROC is then not a
    number at all, so it is recorded as None (JSON null) and shown as :data:`ONE_CLASS_AUROC`
    (see :func:`format_auroc`). Use :func:`auroc` where one class is a caller's error.

    Parameters
    ----------
    y : array-like of shape (n,)
        0/1 labels (see the module docstring); may be empty.
    p : array-like of shape (n,) or (n, 1)
        Probabilities in [0, 1], no NaN.

    Returns
    -------
    float or None
        The area under the ROC curve, identical to ``sklearn.metrics.roc_auc_score``; None
        when ``y`` is empty or holds one class.

    Raises
    ------
    MelcoreError
        Invalid labels or predictions (as :func:`auroc`).
    """
    if len(y) == 0:
        return None
    sweep = ThresholdSweep(y, p)
    if sweep.n_malignant == 0 or sweep.n_benign == 0:
        return None
    return sweep.auroc()


def format_auroc(value, fmt: str = ".4f") -> str:
    """An AUROC for logs and messages: ``format(value, fmt)``, or :data:`ONE_CLASS_AUROC` when it is
    None or NaN (undefined, see :func:`auroc_or_none`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ONE_CLASS_AUROC
    return format(value, fmt)


def average_precision(y, p) -> float:
    """Average precision, identical to ``sklearn.metrics.average_precision_score``."""
    return ThresholdSweep(y, p).average_precision()


def operating_points(
    y, p, sensitivities: Sequence[float] = (0.9, 0.95), specificities: Sequence[float] = (0.9,), youden: bool = True
) -> list[dict]:
    """Clinically useful thresholds, each as a dict.

    Returns a list: Youden's J point (ties -> highest threshold), then for each
    target sensitivity the HIGHEST threshold reaching it, then for each target
    specificity the LOWEST threshold reaching it. Each dict has ``name`` (e.g.
    "youden", "sensitivity>=0.95", "specificity>=0.9"), ``kind`` ("youden",
    "sensitivity", "specificity"), ``target`` (float or None) and all
    :func:`threshold_metrics` keys (``threshold``, ``sensitivity``, ``specificity``,
    ``ppv``, ``npv``, ``biopsies_per_melanoma``, counts...). The threshold is always
    one of the scores (or just above the highest), so ``p >= threshold``
    reproduces the point exactly. Needs both classes.
    """
    sweep = ThresholdSweep(y, p)
    _sweep_both_classes(sweep, "operating points")
    return sweep.operating_points(sensitivities, specificities, youden=youden)


# --------------------------------------------------------------------------- bootstrap


def _group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    """Integer group code per image; missing groups become singleton groups."""
    if groups is None:
        return np.arange(n), n
    values = _one_dimensional(groups, "groups")
    if len(values) != n:
        raise MelcoreError(
            f"groups has {len(values)} entries but there are {n} labels; give one patient (group) id per image"
        )
    codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
    missing = codes < 0
    n_groups = len(uniques)
    if missing.any():
        codes = codes.copy()
        codes[missing] = n_groups + np.arange(int(missing.sum()))
        n_groups += int(missing.sum())
    return codes.astype(np.intp), n_groups


class _AurocBootstrap:
    """Weighted Mann-Whitney AUROC for many cluster resamples at once.

    A resample is a vector of counts (how often each group was drawn); each
    image's weight is its group's count. For one resample,
    AUROC = sum_i w_i * (W_neg(below s_i) + W_neg(tied with s_i) / 2) / (W_pos * W_neg),
    computed for a block of resamples with one cumulative sum over the benign
    images sorted by score; all sums are exact integers.
    """

    def __init__(self, labels: np.ndarray, score_rows: np.ndarray, codes: np.ndarray):
        malignant = labels == 1
        self._rows = []
        for scores in score_rows:
            benign_order = np.argsort(scores[~malignant], kind="stable")
            benign_sorted = scores[~malignant][benign_order]
            benign_codes = codes[~malignant][benign_order]
            malignant_scores = scores[malignant]
            lo = np.searchsorted(benign_sorted, malignant_scores, "left")
            hi = np.searchsorted(benign_sorted, malignant_scores, "right")
            self._rows.append((benign_codes, codes[malignant], lo, hi))

    def block(self, counts: np.ndarray) -> np.ndarray:
        """counts: int (b, n_groups) -> AUROC (b, n_rows), nan where a resample has one class."""
        out = np.empty((counts.shape[0], len(self._rows)))
        for j, (benign_codes, malignant_codes, lo, hi) in enumerate(self._rows):
            benign_w = counts[:, benign_codes]
            cumulative = np.zeros((counts.shape[0], benign_w.shape[1] + 1), dtype=np.int64)
            np.cumsum(benign_w, axis=1, out=cumulative[:, 1:])
            twice_below_plus_ties = cumulative[:, lo] + cumulative[:, hi]
            malignant_w = counts[:, malignant_codes]
            numerator = np.einsum("ij,ij->i", malignant_w, twice_below_plus_ties)
            denominator = 2 * malignant_w.sum(axis=1) * cumulative[:, -1]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, j] = np.where(denominator > 0, numerator / denominator, np.nan)
        return out


def _bootstrap_aurocs(labels, score_rows, groups, n_boot, seed, progress) -> np.ndarray:
    if not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise MelcoreError(f"n_boot must be a positive whole number of resamples, got {n_boot!r}")
    codes, n_groups = _group_codes(groups, len(labels))
    engine = _AurocBootstrap(labels, score_rows, codes)
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _BOOT_BLOCK_ELEMENTS // max(len(labels), n_groups)))
    out = np.empty((n_boot, len(score_rows)))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        draws += (np.arange(b) * n_groups)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        out[start : start + b] = engine.block(counts)
        if progress is not None:
            progress(start + b, n_boot)
    return out


def auroc_bootstrap(
    y, p, groups=None, n_boot: int = 2000, seed: int = 0, progress: Progress | None = None
) -> np.ndarray:
    """AUROC of ``n_boot`` cluster-bootstrap resamples, float64 (n_boot,).

    Each resample draws as many groups as there are, with replacement (seeded by
    ``seed``), and takes all images of every drawn group. ``groups`` (n,) is
    usually the patient id; None resamples images. Resamples holding one class
    are ``nan``. 2,000 resamples of 33,000 predictions take about a second.
    """
    labels, scores = _check_pair(y, p, need_both_classes=True)
    return _bootstrap_aurocs(labels, scores[None, :], groups, n_boot, seed, progress)[:, 0]


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval ``(low, high)`` of the finite entries of ``values`` (any shape).

    ``level`` is the coverage in (0, 1), e.g. 0.95 for the 2.5th and 97.5th percentiles. NaN and
    infinite entries (bootstrap resamples that held one class) are left out; with none left the
    interval is ``(nan, nan)``. The one percentile rule behind every bootstrap interval melcore reports.
    """
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return float(low), float(high)


class AurocInterval(NamedTuple):
    """Percentile bootstrap interval of an AUROC and the resamples behind it.

    low, high: the interval; n_boot: resamples drawn; n_dropped: resamples left out
    because they held one class (the interval is computed on the other
    ``n_boot - n_dropped``).
    """

    low: float
    high: float
    n_boot: int
    n_dropped: int

    @property
    def dropped_share(self) -> float:
        return self.n_dropped / self.n_boot if self.n_boot else math.nan

    @property
    def note(self) -> str:
        """ "" or :func:`bootstrap_dropped_note`'s sentence when too many resamples were left out."""
        return bootstrap_dropped_note(self.n_dropped, self.n_boot)


def bootstrap_dropped_note(n_dropped: int, n_boot: int) -> str:
    """ "" when at most :data:`BOOTSTRAP_DROPPED_WARN` of ``n_boot`` resamples held one class, else a
    sentence saying how many were left out and what that means for the interval."""
    if n_boot <= 0 or n_dropped / n_boot <= BOOTSTRAP_DROPPED_WARN:
        return ""
    return (
        f"{n_dropped:,} of {n_boot:,} bootstrap resamples ({n_dropped / n_boot:.0%}) held one class and were "
        "left out, so the interval is too narrow; it needs more patients with each label"
    )


def _interval(boots: np.ndarray, level: float) -> AurocInterval:
    low, high = percentile_interval(boots, level)
    return AurocInterval(low, high, len(boots), int(np.isnan(boots).sum()))


def auroc_ci(
    y, p, groups=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95, progress: Progress | None = None
) -> AurocInterval:
    """Percentile bootstrap confidence interval for the AUROC, with the resamples it rests on.

    Resamples ``groups`` (patients) with replacement, ``n_boot`` times, seeded;
    resamples with a single class are left out and counted (``n_dropped``; see
    :class:`AurocInterval`). ``groups=None`` resamples images (too narrow when
    patients contribute several lesions). Raises MelcoreError for one-class input.
    """
    level = _check_level(level)
    boots = auroc_bootstrap(y, p, groups=groups, n_boot=n_boot, seed=seed, progress=progress)
    if not np.isfinite(boots).any():
        raise MelcoreError(
            "every bootstrap resample held a single class; there are too few patients "
            "with each label for a confidence interval"
        )
    return _interval(boots, level)


def operating_point_ci(
    y, p, threshold: float, groups=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Sensitivity, specificity, PPV and NPV at a FIXED ``threshold``, each with a cluster-bootstrap CI.

    The threshold is taken as given (it must have been chosen on other predictions for the
    intervals to mean anything); resamples draw ``groups`` (patients; None: images) with
    replacement, ``n_boot`` times, seeded. A resample where a quantity is undefined (no
    malignant image for sensitivity, nothing flagged for PPV, ...) is left out of that
    quantity's interval.

    Returns
    -------
    dict: the :func:`threshold_metrics` keys at ``threshold``, plus ``<name>_ci`` = [low, high]
    for ``sensitivity``, ``specificity``, ``ppv`` and ``npv``.
    """
    level = _check_level(level)
    labels, scores = _check_pair(y, p)
    threshold = _check_threshold(threshold)
    if not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise MelcoreError(f"n_boot must be a positive whole number of resamples, got {n_boot!r}")
    out = threshold_metrics(labels, scores, threshold)
    codes, n_groups = _group_codes(groups, len(labels))
    flagged = scores >= threshold
    cells = np.stack(
        [flagged & (labels == 1), flagged & (labels == 0), ~flagged & (labels == 0), ~flagged & (labels == 1)], axis=1
    ).astype(np.int64)  # tp, fp, tn, fn per image
    per_group = np.zeros((n_groups, 4), dtype=np.int64)
    np.add.at(per_group, codes, cells)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.stack([np.bincount(row, minlength=n_groups) for row in draws])
    tp, fp, tn, fn = (counts @ per_group).T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
        }
    for name, values in boots.items():
        out[f"{name}_ci"] = list(percentile_interval(values, level))
    return out


# --------------------------------------------------------------------------- partial AUROC

PAUC_MIN_TPR = 0.8
"""Sensitivity above which :func:`partial_auroc` measures the area (the ISIC 2024 primary metric)."""


def _check_min_tpr(min_tpr) -> float:
    if not isinstance(min_tpr, numbers.Real) or not 0.0 <= float(min_tpr) < 1.0:
        raise MelcoreError(f"min_tpr must be a sensitivity in [0, 1), e.g. 0.8; got {min_tpr!r}")
    return float(min_tpr)


def _area_above(fpr: np.ndarray, tpr: np.ndarray, min_tpr: float) -> np.ndarray:
    """Area between piecewise-linear ROC curves and the line TPR = ``min_tpr``, where they lie above it.

    fpr, tpr: float (b, k), each row a curve from (0, 0) to (1, 1), non-decreasing. Returns (b,).
    """
    width = np.diff(fpr, axis=1)
    t0, t1 = tpr[:, :-1], tpr[:, 1:]
    above0, above1 = np.maximum(t0 - min_tpr, 0.0), np.maximum(t1 - min_tpr, 0.0)
    rise = np.where(t1 > t0, t1 - t0, 1.0)
    # a segment wholly above the line is a trapezoid; one crossing it, the triangle above the crossing
    area = np.where(t0 >= min_tpr, width * (above0 + above1) / 2, width * above1**2 / (2 * rise))
    return area.sum(axis=1)


class _WeightedRoc:
    """ROC curves of one set of scores under many weightings of the images (bootstrap resamples)."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray, codes: np.ndarray):
        order = np.argsort(-scores, kind="stable")
        sorted_scores = scores[order]
        self._malignant = labels[order].astype(np.float64)
        self._codes = codes[order]
        # last position of each distinct score (descending): one ROC point per distinct threshold
        self._ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]

    def partial_area(self, counts: np.ndarray, min_tpr: float) -> np.ndarray:
        """counts: (b, n_groups) group weights -> area above ``min_tpr`` (b,), nan where a class has no weight."""
        weights = counts[:, self._codes].astype(np.float64)
        tps = np.cumsum(weights * self._malignant, axis=1)[:, self._ends]
        fps = np.cumsum(weights * (1.0 - self._malignant), axis=1)[:, self._ends]
        zeros = np.zeros((len(counts), 1))
        tps, fps = np.hstack([zeros, tps]), np.hstack([zeros, fps])
        positives, negatives = tps[:, -1:], fps[:, -1:]
        ok = (positives[:, 0] > 0) & (negatives[:, 0] > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            area = _area_above(fps / negatives, tps / positives, min_tpr)
        return np.where(ok, area, np.nan)


def partial_auroc(y, p, min_tpr: float = PAUC_MIN_TPR) -> float:
    """Partial AUROC above a sensitivity: the area under the ROC curve and above TPR = ``min_tpr``.

    This is the ISIC 2024 challenge's primary metric, *unstandardised*: it ranges from 0 to
    ``1 - min_tpr`` (0.2 for the default 0.8); a random ranking scores
    ``(1 - min_tpr) ** 2 / 2`` (0.02). It is not scikit-learn's
    ``roc_auc_score(max_fpr=...)``, which standardises (McClish 1989) the area at low false
    positive rates to [0.5, 1]; the two are linked by
    ``pauc = m**2 / 2 + (m - m**2 / 2) * 2 * (standardised(1 - y, -p, max_fpr=m) - 0.5)`` with
    ``m = 1 - min_tpr`` (the ISIC 2024 scoring code).

    Parameters
    ----------
    y : array-like (n,)
        0/1 labels, both classes present.
    p : array-like (n,)
        Scores; ties count as the ROC curve's diagonal segments, as in :func:`auroc`.
    min_tpr : float in [0, 1)
        The sensitivity above which the area counts.

    Returns
    -------
    float in [0, 1 - min_tpr].
    """
    min_tpr = _check_min_tpr(min_tpr)
    fpr, tpr, _ = ThresholdSweep(*_check_pair(y, p, need_both_classes=True)).roc_curve(drop_intermediate=False)
    return float(_area_above(fpr[None, :], tpr[None, :], min_tpr)[0])


def partial_auroc_bootstrap(
    y,
    p,
    groups=None,
    min_tpr: float = PAUC_MIN_TPR,
    n_boot: int = 2000,
    seed: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """:func:`partial_auroc` of ``n_boot`` cluster-bootstrap resamples, float64 (n_boot,).

    The resamples are drawn exactly as in :func:`auroc_bootstrap` (same seed, same groups:
    the same resamples); one-class resamples are ``nan``.
    """
    min_tpr = _check_min_tpr(min_tpr)
    labels, scores = _check_pair(y, p, need_both_classes=True)
    if not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise MelcoreError(f"n_boot must be a positive whole number of resamples, got {n_boot!r}")
    codes, n_groups = _group_codes(groups, len(labels))
    engine = _WeightedRoc(labels, scores, codes)
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _BOOT_BLOCK_ELEMENTS // (4 * max(len(labels), n_groups))))
    out = np.empty(n_boot)
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        draws += (np.arange(b) * n_groups)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        out[start : start + b] = engine.partial_area(counts, min_tpr)
        if progress is not None:
            progress(start + b, n_boot)
    return out


def partial_auroc_ci(
    y,
    p,
    groups=None,
    min_tpr: float = PAUC_MIN_TPR,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    progress: Progress | None = None,
) -> AurocInterval:
    """Percentile cluster-bootstrap interval of :func:`partial_auroc` (see :func:`auroc_ci` for the resampling)."""
    level = _check_level(level)
    boots = partial_auroc_bootstrap(y, p, groups=groups, min_tpr=min_tpr, n_boot=n_boot, seed=seed, progress=progress)
    if not np.isfinite(boots).any():
        raise MelcoreError(
            "every bootstrap resample held a single class; there are too few patients "
            "with each label for a confidence interval"
        )
    return _interval(boots, level)


# --------------------------------------------------------------------------- decision curves


def net_benefit(y, p, thresholds=None) -> pd.DataFrame:
    """Decision-curve analysis (Vickers and Elkin 2006): net benefit against the threshold probability.

    Biopsying the lesions with ``p >= t`` has net benefit ``TP / n - FP / n * t / (1 - t)``:
    true positives found, less false positives weighted by the odds at which a clinician
    is indifferent between biopsy and not. "Biopsy all" has
    ``prevalence - (1 - prevalence) * t / (1 - t)``; "biopsy none" has 0.

    Parameters
    ----------
    y, p : array-like (n,)
        Labels 0/1 and predicted probabilities (meaningful when ``p`` is calibrated).
    thresholds : array-like (k,), optional
        Threshold probabilities in [0, 1); default 0.01, 0.02, ..., 0.99.

    Returns
    -------
    DataFrame with k rows: threshold, net_benefit (model), treat_all, treat_none (0.0),
    n_flagged, tp, fp.
    """
    return ThresholdSweep(y, p).net_benefit(thresholds)


class PairedBootstrapResult(NamedTuple):
    """Paired cluster-bootstrap comparison of two models on the same images.

    auc1, auc2: AUROCs on the full data; diff = auc1 - auc2; low, high: percentile
    interval of the difference; se: bootstrap standard deviation of the difference;
    p_value: two-sided, normal approximation diff / se; n_used: resamples with
    both classes.
    """

    auc1: float
    auc2: float
    diff: float
    low: float
    high: float
    se: float
    p_value: float
    n_used: int


def paired_auroc_bootstrap(
    y, p1, p2, groups=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95, progress: Progress | None = None
) -> PairedBootstrapResult:
    """Compare two models' AUROCs by resampling patients (the same resamples for both).

    Unlike :func:`delong_test`, this respects that a patient's lesions are
    correlated; use it when ``groups`` (patient ids) are known.
    """
    level = _check_level(level)
    labels, s1 = _check_pair(y, p1, need_both_classes=True)
    _, s2 = _check_pair(labels, p2)
    boots = _bootstrap_aurocs(labels, np.vstack([s1, s2]), groups, n_boot, seed, progress)
    diffs = boots[:, 0] - boots[:, 1]
    diffs = diffs[np.isfinite(diffs)]
    auc1, auc2 = auroc(labels, s1), auroc(labels, s2)
    diff = auc1 - auc2
    se = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
    low, high = percentile_interval(diffs, level)
    p_value = _two_sided_p(diff, se)
    return PairedBootstrapResult(auc1, auc2, diff, low, high, se, p_value, int(len(diffs)))


def _two_sided_p(diff: float, se: float) -> float:
    if math.isnan(se):
        return math.nan
    if se == 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * stats.norm.sf(abs(diff) / se))


# --------------------------------------------------------------------------- DeLong


class DelongResult(NamedTuple):
    """DeLong's test for two correlated AUROCs (same images, same labels).

    auc1, auc2: the AUROCs; diff = auc1 - auc2; se: standard error of diff;
    z = diff / se; p_value: two-sided (1.0 when both models rank identically).
    """

    auc1: float
    auc2: float
    diff: float
    se: float
    z: float
    p_value: float


def _delong_covariance(labels: np.ndarray, score_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUROCs (k,) and their covariance (k, k), via midranks.

    With m malignant and n benign images, midranks of the malignant scores among
    themselves (tx), of the benign among themselves (ty) and of all together (tz)
    give the placement values V10_i = (tz_i - tx_i) / n (the fraction of benign
    scores below malignant i, ties 1/2) and V01_j = 1 - (tz_j - ty_j) / m, so that
    AUROC = mean(V10) = mean(V01) and Var = S10 / m + S01 / n with S10, S01 the
    sample covariances (ddof 1) of the placement values across models.
    """
    malignant = labels == 1
    m, n = int(malignant.sum()), int((~malignant).sum())
    if m < 2 or n < 2:
        raise MelcoreError(
            f"DeLong's variance needs at least 2 malignant and 2 benign images; got {m} malignant and {n} benign"
        )
    pos = score_rows[:, malignant]
    neg = score_rows[:, ~malignant]
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.hstack([pos, neg]), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def delong_se(y, p) -> float:
    """DeLong standard error of one AUROC (images treated as independent)."""
    labels, scores = _check_pair(y, p, need_both_classes=True)
    _, cov = _delong_covariance(labels, scores[None, :])
    return float(math.sqrt(max(cov[0, 0], 0.0)))


def delong_ci(y, p, level: float = 0.95) -> tuple[float, float]:
    """DeLong (asymptotic normal) interval ``(low, high)`` for one AUROC, clipped to [0, 1]."""
    level = _check_level(level)
    labels, scores = _check_pair(y, p, need_both_classes=True)
    auc = auroc(labels, scores)
    se = delong_se(labels, scores)
    z = stats.norm.ppf(1 - (1 - level) / 2)
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def delong_test(y, p1, p2) -> DelongResult:
    """DeLong's test that two models scored on the same images have equal AUROC.

    Args:
        y: labels (n,) 0/1 with at least 2 of each class. p1, p2: the two models'
            probabilities (n,) for the same images in the same order.

    Returns:
        :class:`DelongResult` (auc1, auc2, diff, se, z, p_value). The AUROCs are
        those of :func:`auroc`. Images are treated as independent; with several
        lesions per patient prefer :func:`paired_auroc_bootstrap` with patient groups.
    """
    labels, s1 = _check_pair(y, p1, need_both_classes=True)
    _, s2 = _check_pair(labels, p2)
    _, cov = _delong_covariance(labels, np.vstack([s1, s2]))
    auc1, auc2 = auroc(labels, s1), auroc(labels, s2)
    diff = auc1 - auc2
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    se = math.sqrt(max(var, 0.0))
    if se == 0:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    else:
        z = diff / se
    return DelongResult(auc1, auc2, diff, se, z, _two_sided_p(diff, se))


# --------------------------------------------------------------------------- calibration


def brier_score(y, p) -> float:
    """Mean squared difference between probability and label (0 is perfect), = ``brier_score_loss``."""
    labels, scores = _check_pair(y, p)
    return float(np.mean((labels - scores) ** 2))


def _calibration_bins(labels, scores, n_bins: int, strategy: str):
    if not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise MelcoreError(f"n_bins must be a positive whole number, got {n_bins!r}")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.percentile(scores, np.linspace(0, 1, n_bins + 1) * 100)
    else:
        raise MelcoreError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    bin_ids = np.searchsorted(edges[1:-1], scores)
    sums = np.bincount(bin_ids, weights=scores, minlength=n_bins)
    true = np.bincount(bin_ids, weights=labels, minlength=n_bins)
    total = np.bincount(bin_ids, minlength=n_bins)
    return edges, sums, true, total


def calibration_curve(y, p, *, n_bins: int = 5, strategy: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """``(fraction_malignant, mean_predicted)`` per non-empty bin, = ``sklearn.calibration.calibration_curve``.

    strategy "uniform" uses equal-width bins on [0, 1]; "quantile" equal-count bins.
    """
    labels, scores = _check_pair(y, p)
    _, sums, true, total = _calibration_bins(labels, scores, n_bins, strategy)
    nonzero = total != 0
    return true[nonzero] / total[nonzero], sums[nonzero] / total[nonzero]


def calibration_table(y, p, *, n_bins: int = 10, strategy: str = "uniform") -> pd.DataFrame:
    """Reliability table, one row per bin (empty bins included, with nan means).

    Columns: ``bin`` (0..n_bins-1), ``bin_low``, ``bin_high`` (edges; a score equal
    to an inner edge falls in the lower bin, as in scikit-learn), ``n``,
    ``n_malignant``, ``mean_predicted``, ``fraction_malignant``.
    """
    labels, scores = _check_pair(y, p)
    edges, sums, true, total = _calibration_bins(labels, scores, n_bins, strategy)
    with np.errstate(divide="ignore", invalid="ignore"):
        return pd.DataFrame(
            {
                "bin": np.arange(n_bins),
                "bin_low": edges[:-1],
                "bin_high": edges[1:],
                "n": total.astype(np.int64),
                "n_malignant": true.astype(np.int64),
                "mean_predicted": sums / total,
                "fraction_malignant": true / total,
            }
        )


# --------------------------------------------------------------------------- groups


def _resolve_column(df: pd.DataFrame, column: str, role: str) -> pd.Series:
    if column in df.columns:
        return df[column]
    if column == "age_band" and "age_approx" in df.columns:
        return age_band(df["age_approx"])
    raise MelcoreError(f"no {role} column {column!r}; available columns: {', '.join(map(str, df.columns))}")


def _one_class_note(n_positive: int, n: int) -> str:
    which = "target 0" if n_positive == 0 else "target 1"
    return f"one class only (all {n} images are {which}): AUROC undefined"


def per_group(
    df: pd.DataFrame,
    group_column: str,
    *,
    target: str = "target",
    prediction: str = "prediction",
    threshold: float = 0.5,
    patient_column: str | None = "auto",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """AUROC with CI and threshold metrics for each value of ``group_column``.

    Args:
        df: one row per image with ``target`` (0/1) and ``prediction`` (probability)
            columns, e.g. ``Store.get_predictions(run_id)``.
        group_column: e.g. "clinic", "source", "site", "sex" or "age_band" (derived
            from ``age_approx`` when there is no such column). Missing values form
            the group "unknown".
        threshold: the operating threshold for sensitivity, specificity...
        patient_column: column resampled by the bootstrap; "auto" resamples the
            cohort's groups (:func:`melcore.cohort.group_keys`: patient, else
            lesion) when ``patient_id`` or ``lesion_id`` is present, else images;
            None resamples images.
        n_boot, seed, level: bootstrap settings (see :func:`auroc_ci`).
        progress: ``progress(done, total)`` over groups.

    Returns:
        DataFrame, one row per group sorted by name, columns ``group``, ``n``,
        ``n_malignant``, ``auroc``, ``auroc_low``, ``auroc_high``, ``pauc``,
        ``pauc_low``, ``pauc_high`` (:func:`partial_auroc` above
        :data:`PAUC_MIN_TPR` sensitivity with its interval from the same
        resamples as the AUROC's), then the
        :func:`threshold_metrics` keys from ``threshold`` on, ``brier``,
        ``boot_dropped`` (one-class bootstrap resamples left out of the CI) and
        ``note`` ("" or why a value is missing or less reliable). Groups with one
        class get nan AUROC/CI and a note instead of an error.
    """
    if not isinstance(df, pd.DataFrame):
        raise MelcoreError(f"per_group needs a pandas DataFrame, got {type(df).__name__}")
    groups_col = _resolve_column(df, group_column, "group")
    y_col = _resolve_column(df, target, "label")
    p_col = _resolve_column(df, prediction, "prediction")
    names = df["image_name"].astype(str).tolist() if "image_name" in df.columns else None
    labels, scores = _check_pair(y_col, p_col, names=names)
    if patient_column == "auto":
        patients = _id_groups(df)
    else:
        patients = _resolve_column(df, patient_column, "patient").to_numpy() if patient_column else None
    keys = groups_col.astype(object).where(groups_col.notna(), "unknown").astype(str).to_numpy()
    unique = sorted(set(keys))
    rows = []
    for i, key in enumerate(unique):
        mask = keys == key
        rows.append(
            _group_row(
                key,
                labels[mask],
                scores[mask],
                None if patients is None else patients[mask],
                threshold,
                n_boot,
                seed,
                level,
            )
        )
        if progress is not None:
            progress(i + 1, len(unique))
    # group, n, n_malignant, auroc, auroc_low, auroc_high, pauc, pauc_low, pauc_high, threshold, n_benign, tp, ..., brier, note
    columns = list(
        dict.fromkeys(
            [
                "group",
                "n",
                "n_malignant",
                "auroc",
                "auroc_low",
                "auroc_high",
                "pauc",
                "pauc_low",
                "pauc_high",
                *THRESHOLD_METRIC_KEYS,
                "brier",
                "boot_dropped",
                "note",
            ]
        )
    )
    return pd.DataFrame(rows, columns=columns)


def _id_groups(df: pd.DataFrame) -> np.ndarray | None:
    """Patient-else-lesion group key per row (:func:`melcore.cohort.group_keys`); None without either id."""
    if not any(c in df.columns and df[c].notna().any() for c in ("patient_id", "lesion_id")):
        return None
    names = df["image_name"] if "image_name" in df.columns else pd.Series(range(len(df)), index=df.index)
    ids = pd.DataFrame({"image_name": names.astype(str).to_numpy()}, index=df.index)
    for column in ("patient_id", "lesion_id"):
        if column in df.columns:
            ids[column] = df[column]
    return group_keys(ids).to_numpy()


def _group_row(key, labels, scores, patients, threshold, n_boot, seed, level) -> dict:
    metrics = ThresholdSweep(labels, scores).at(threshold)
    row = {"group": key, **metrics, "brier": float(np.mean((labels - scores) ** 2)), "boot_dropped": 0, "note": ""}
    n_malignant = int(labels.sum())
    if n_malignant == 0 or n_malignant == len(labels):
        row.update(
            auroc=math.nan,
            auroc_low=math.nan,
            auroc_high=math.nan,
            pauc=math.nan,
            pauc_low=math.nan,
            pauc_high=math.nan,
            note=_one_class_note(n_malignant, len(labels)),
        )
        return row
    row["auroc"] = auroc(labels, scores)
    row["pauc"] = partial_auroc(labels, scores)
    interval = _interval(_bootstrap_aurocs(labels, scores[None, :], patients, n_boot, seed, None)[:, 0], level)
    partial = _interval(partial_auroc_bootstrap(labels, scores, groups=patients, n_boot=n_boot, seed=seed), level)
    row.update(
        auroc_low=interval.low,
        auroc_high=interval.high,
        pauc_low=partial.low,
        pauc_high=partial.high,
        boot_dropped=interval.n_dropped,
        note=interval.note,
    )
    if math.isnan(interval.low):
        row["note"] = "too few patients of each class for a bootstrap interval"
    return row


def summarize(
    y,
    p,
    *,
    groups=None,
    threshold: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    sensitivities: Sequence[float] = (0.9, 0.95),
    specificities: Sequence[float] = (0.9,),
    names=None,
    progress: Progress | None = None,
) -> dict:
    """Everything a model card needs, as one JSON-ready dict (never raises for one class).

    Keys: ``n``, ``n_malignant``, ``prevalence``, ``auroc``, ``auroc_ci`` ([low, high]),
    ``ci_level``, ``n_boot``, ``n_boot_dropped`` (one-class resamples left out of the interval),
    ``bootstrap_unit`` ("group" or "image"),
    ``average_precision``, ``brier``, ``threshold``, ``sensitivity``,
    ``specificity`` (at ``threshold``), ``threshold_metrics`` (the full
    :func:`threshold_metrics` dict), ``operating_points`` (list, see
    :func:`operating_points`; empty with one class) and ``notes`` (list of str).
    Undefined numbers are ``nan`` (the CLI writes them as JSON null).
    """
    labels, scores = _check_pair(y, p, names=names)
    sweep = ThresholdSweep(labels, scores)
    at = sweep.at(threshold)
    n_malignant = sweep.n_malignant
    out = {
        "n": sweep.n,
        "n_malignant": n_malignant,
        "prevalence": n_malignant / sweep.n,
        "auroc": math.nan,
        "auroc_ci": [math.nan, math.nan],
        "ci_level": _check_level(level),
        "n_boot": n_boot,
        "n_boot_dropped": 0,
        "bootstrap_unit": "image" if groups is None else "group",
        "average_precision": math.nan,
        "brier": float(np.mean((labels - scores) ** 2)),
        "threshold": at["threshold"],
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "threshold_metrics": at,
        "operating_points": [],
        "notes": [],
    }
    if n_malignant == 0 or n_malignant == sweep.n:
        out["notes"].append(_one_class_note(n_malignant, sweep.n) + "; no operating points")
        return out
    out["auroc"] = sweep.auroc()
    out["average_precision"] = sweep.average_precision()
    out["operating_points"] = sweep.operating_points(sensitivities, specificities)
    interval = _interval(_bootstrap_aurocs(labels, scores[None, :], groups, n_boot, seed, progress)[:, 0], level)
    out["auroc_ci"] = [interval.low, interval.high]
    out["n_boot_dropped"] = interval.n_dropped
    if interval.note:
        out["notes"].append(interval.note)
    elif interval.n_dropped:
        out["notes"].append(f"{interval.n_dropped} of {n_boot} bootstrap resamples held one class and were left out")
    return out
