"""Reader studies: clinicians' decisions against the model on the same lesions.

The Review page records, for every read, the reader's management decision
(:data:`melcore.store.STUDY_DECISIONS`: biopsy, follow-up, reassure), whether the read
was *aided* (the model's risk and Grad-CAM on screen) or *unaided* (blinded), and an
optional malignancy confidence 0-100. This module turns those reads into the numbers
reader studies report (Esteva 2017; Haenssle 2018; Tschandl 2019, 2020)::

    reads = study_reads(store.review_history(run_id), store.get_predictions(run_id))
    table = reader_table(reads)                       # one row per reader and mode
    mean = mean_reader_comparison(reads, mode="unaided")
    kappas = pairwise_kappa(reads, mode="unaided")
    fleiss = fleiss_kappa_of(reads, mode="unaided")

Definitions
    * A reader's call is positive when the decision is "biopsy" (biopsy / excise);
      follow-up and reassure are negative. Decisions that are not management decisions
      (agree, disagree, unsure from a plain review) are not reads and are left out.
    * A reader's read of a lesion in one mode is the latest such decision of that reader
      on that lesion in that mode; only labelled lesions (target 0/1) with a model score
      count.
    * Sensitivity and specificity carry Wilson score intervals (:func:`wilson_interval`):
      a reader's reads are one per lesion, so the binomial interval is the usual one.
    * The model is judged on exactly the reader's lesions: its AUROC there and its
      sensitivity at the reader's specificity (the lowest threshold whose specificity on
      those lesions reaches the reader's, :meth:`ThresholdSweep.threshold_for_specificity`).
    * The mean reader is compared with the model on the lesions every eligible reader
      read, with a two-way bootstrap that resamples readers and patients (both with
      replacement), so the interval covers both the choice of readers and of patients.

Undefined values are NaN, as in :mod:`melcore.metrics`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from melcore.browse import risk_by_image
from melcore.classes import MELANOMA
from melcore.errors import MelcoreError
from melcore.metrics import ThresholdSweep, auroc, auroc_ci, percentile_interval
from melcore.review import spreadsheet_safe
from melcore.store import STUDY_DECISIONS

__all__ = [
    "MIN_READS",
    "MODES",
    "POSITIVE_DECISION",
    "READ_COLUMNS",
    "READER_COLUMNS",
    "STUDY_WORKLIST_COLUMNS",
    "MeanReaderResult",
    "ModelOnReads",
    "aided_vs_unaided",
    "cohen_kappa",
    "fleiss_kappa",
    "fleiss_kappa_of",
    "mean_reader_comparison",
    "model_on_reads",
    "pairwise_kappa",
    "reader_table",
    "reader_table_csv",
    "study_order",
    "study_reads",
    "study_worklist",
    "wilson_interval",
]

POSITIVE_DECISION = "biopsy"
MODES = ("unaided", "aided")
"""Reading modes: ``unaided`` = blinded (no model output on screen), ``aided`` = with the model's risk."""
MIN_READS = 20
"""Reads on labelled lesions a reader needs (with both classes among them) to be placed on the ROC plot."""

READ_COLUMNS = (
    "reviewer",
    "mode",
    "image_name",
    "group",
    "target",
    "risk",
    "decision",
    "positive",
    "confidence",
    "review_id",
)
"""Columns of :func:`study_reads`."""

READER_COLUMNS = (
    "reviewer",
    "mode",
    "n",
    "n_malignant",
    "n_patients",
    "tp",
    "fp",
    "tn",
    "fn",
    "sensitivity",
    "sensitivity_low",
    "sensitivity_high",
    "specificity",
    "specificity_low",
    "specificity_high",
    "model_auroc",
    "model_sensitivity_at_reader_specificity",
    "model_specificity_at_reader_sensitivity",
    "n_confidence",
    "reader_auroc",
    "reader_auroc_low",
    "reader_auroc_high",
    "eligible",
    "note",
)
"""Columns of :func:`reader_table`."""


# --------------------------------------------------------------------------- reads


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise MelcoreError(f"unknown reading mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def _check_level(level) -> float:
    if not isinstance(level, numbers.Real) or not 0 < float(level) < 1:
        raise MelcoreError(f"the confidence level must be a number between 0 and 1 (e.g. 0.95), got {level!r}")
    return float(level)


def study_reads(history: pd.DataFrame | None, predictions: pd.DataFrame | None) -> pd.DataFrame:
    """Each reader's current read of each labelled, scored lesion, per reading mode.

    Parameters
    ----------
    history : DataFrame
        ``Store.review_history(run_id)``: id, image_name, reviewer, decision, created_at and
        (schema 3) aided, confidence. Without ``aided`` every read counts as aided.
    predictions : DataFrame
        ``Store.get_predictions(run_id)``: image_name, prediction, target, patient_id (split).

    Returns
    -------
    DataFrame with :data:`READ_COLUMNS`, one row per (reviewer, mode, image_name), sorted
    by reviewer, mode, image_name: mode "aided"/"unaided", group the patient id (else
    ``"image:" + image_name``, the bootstrap unit), target int 0/1, risk float64 (the
    model's score), decision str, positive bool (decision == "biopsy"), confidence
    float64 0-100 (NaN when not given), review_id int (the store row of the read).
    """
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in READ_COLUMNS})
    if history is None or len(history) == 0 or predictions is None or len(predictions) == 0:
        return empty
    missing = {"image_name", "reviewer", "decision"} - set(history.columns)
    if missing:
        raise MelcoreError(
            f"the review history needs the columns image_name, reviewer and decision; missing {sorted(missing)}"
        )
    frame = history[history["decision"].isin(STUDY_DECISIONS)].copy()
    if frame.empty:
        return empty
    frame["image_name"] = frame["image_name"].astype(str)
    aided = frame["aided"] if "aided" in frame.columns else pd.Series(True, index=frame.index)
    frame["mode"] = np.where(aided.fillna(True).astype(bool), "aided", "unaided")
    if "id" not in frame.columns:
        frame["id"] = np.arange(1, len(frame) + 1)
    frame = frame.sort_values("id", kind="stable").drop_duplicates(["reviewer", "mode", "image_name"], keep="last")

    risk = risk_by_image(predictions)
    first = (
        predictions.assign(image_name=predictions["image_name"].astype(str))
        .drop_duplicates("image_name", keep="last")
        .set_index("image_name")
    )
    names = frame["image_name"]
    target = pd.to_numeric(
        names.map(first["target"]) if "target" in first else pd.Series(np.nan, index=frame.index), errors="coerce"
    )
    patient = names.map(first["patient_id"]) if "patient_id" in first else pd.Series(None, index=frame.index)
    frame["risk"] = names.map(risk).astype("float64")
    frame["target"] = target
    frame["group"] = patient.astype(object).where(patient.notna(), "image:" + names).astype(str)
    frame = frame[frame["target"].isin([0, 1]) & np.isfinite(frame["risk"])]
    confidence = frame["confidence"] if "confidence" in frame.columns else pd.Series(np.nan, index=frame.index)
    out = pd.DataFrame(
        {
            "reviewer": frame["reviewer"].astype(str).to_numpy(),
            "mode": frame["mode"].to_numpy(dtype=object),
            "image_name": frame["image_name"].to_numpy(dtype=object),
            "group": frame["group"].to_numpy(dtype=object),
            "target": frame["target"].astype(np.int64).to_numpy(),
            "risk": frame["risk"].to_numpy(dtype=np.float64),
            "decision": frame["decision"].astype(str).to_numpy(),
            "positive": (frame["decision"] == POSITIVE_DECISION).to_numpy(dtype=bool),
            "confidence": pd.to_numeric(confidence, errors="coerce").to_numpy(dtype=np.float64),
            "review_id": frame["id"].astype(np.int64).to_numpy(),
        }
    )
    return out.sort_values(["reviewer", "mode", "image_name"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- the study worklist

STUDY_WORKLIST_COLUMNS = ("position", "image_name", "patient_id", "read", "decision", "confidence")
"""Columns of :func:`study_worklist` (no score, rank or label: a blinded page may show all of it)."""


def study_order(image_names, seed: int) -> list[str]:
    """The image names in the study's fixed random order.

    Each name's place comes from a SHA-256 of ``f"{seed}:{name}"``, so the order is the same
    for every reader and every session, does not depend on the model's scores, and adding
    lesions to the run leaves the order of the others unchanged.
    """
    names = sorted({str(n) for n in image_names})
    return sorted(names, key=lambda n: hashlib.sha256(f"{int(seed)}:{n}".encode()).hexdigest())


def study_worklist(
    predictions: pd.DataFrame, history: pd.DataFrame | None, reviewer: str | None, mode: str, seed: int
) -> pd.DataFrame:
    """The lesions of a reader study, in the fixed random order, with this reader's reads in ``mode``.

    Parameters
    ----------
    predictions : DataFrame
        The run's predictions (image_name, patient_id): the study reads every scored lesion.
    history : DataFrame or None
        ``Store.review_history(run_id)``.
    reviewer : str or None
        The reader; other readers' decisions are never listed (reads stay independent).
    mode : {"unaided", "aided"}
    seed : int
        :func:`study_order`'s seed (the page uses the run id).

    Returns
    -------
    DataFrame with :data:`STUDY_WORKLIST_COLUMNS`: position (1-based), image_name, patient_id,
    read (bool: the reader has a management decision on it in this mode), decision and
    confidence (the reader's latest, None / NaN when unread). It carries no score: nothing in
    it reveals the model's risk or the lesion's label.
    """
    _check_mode(mode)
    if predictions is None or len(predictions) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in STUDY_WORKLIST_COLUMNS})
    scored = predictions[pd.to_numeric(predictions["prediction"], errors="coerce").notna()]
    names = study_order(scored["image_name"], seed)
    patients = scored.assign(image_name=scored["image_name"].astype(str)).drop_duplicates("image_name", keep="last")
    patients = (
        patients.set_index("image_name")["patient_id"]
        if "patient_id" in patients.columns
        else pd.Series(None, index=patients["image_name"], dtype=object)
    )
    out = pd.DataFrame({"position": np.arange(1, len(names) + 1), "image_name": names})
    out["patient_id"] = out["image_name"].map(patients).astype(object)
    out["patient_id"] = out["patient_id"].where(out["patient_id"].notna(), None)
    own = pd.DataFrame(columns=["image_name", "decision", "confidence"])
    if history is not None and len(history) and reviewer:
        aided = history["aided"] if "aided" in history.columns else pd.Series(True, index=history.index)
        mask = (
            (history["reviewer"] == reviewer)
            & history["decision"].isin(STUDY_DECISIONS)
            & (aided.fillna(True).astype(bool) == (mode == "aided"))
        )
        own = history[mask].sort_values("id" if "id" in history.columns else "created_at", kind="stable")
        own = own.assign(image_name=own["image_name"].astype(str)).drop_duplicates("image_name", keep="last")
        if "confidence" not in own.columns:
            own = own.assign(confidence=np.nan)
    own = own.set_index("image_name")
    out["read"] = out["image_name"].isin(own.index)
    out["decision"] = out["image_name"].map(own["decision"]).astype(object)
    out["decision"] = out["decision"].where(out["read"], None)
    out["confidence"] = pd.to_numeric(out["image_name"].map(own["confidence"]), errors="coerce").astype("float64")
    return out[list(STUDY_WORKLIST_COLUMNS)]


# --------------------------------------------------------------------------- one reader


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    Parameters
    ----------
    successes, n : int
        Counts, ``0 <= successes <= n``.
    level : float in (0, 1)
        Coverage of the interval.

    Returns
    -------
    (low, high) : floats in [0, 1]; (nan, nan) when ``n == 0``.
    """
    level = _check_level(level)
    if not (isinstance(successes, numbers.Integral) and isinstance(n, numbers.Integral)) or not 0 <= successes <= n:
        raise MelcoreError(f"a proportion needs whole counts 0 <= successes <= n, got {successes!r} of {n!r}")
    if n == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _reader_row(
    reviewer: str, mode: str, reads: pd.DataFrame, min_reads: int, level: float, n_boot: int, seed: int
) -> dict:
    y = reads["target"].to_numpy(dtype=np.int64)
    called = reads["positive"].to_numpy(dtype=bool)
    tp, fn = int((called & (y == 1)).sum()), int((~called & (y == 1)).sum())
    tn, fp = int((~called & (y == 0)).sum()), int((called & (y == 0)).sum())
    n_malignant = tp + fn
    sensitivity = tp / n_malignant if n_malignant else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    row = {
        "reviewer": reviewer,
        "mode": mode,
        "n": len(reads),
        "n_malignant": n_malignant,
        "n_patients": int(reads["group"].nunique()),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "model_auroc": math.nan,
        "model_sensitivity_at_reader_specificity": math.nan,
        "model_specificity_at_reader_sensitivity": math.nan,
        "reader_auroc": math.nan,
        "reader_auroc_low": math.nan,
        "reader_auroc_high": math.nan,
    }
    row["sensitivity_low"], row["sensitivity_high"] = wilson_interval(tp, n_malignant, level)
    row["specificity_low"], row["specificity_high"] = wilson_interval(tn, tn + fp, level)
    notes = []
    both = 0 < n_malignant < len(reads)
    row["eligible"] = bool(both and len(reads) >= min_reads)
    if not both:
        notes.append("only one class among the lesions read: no AUROC, and sensitivity or specificity undefined")
    elif len(reads) < min_reads:
        notes.append(f"{len(reads)} reads on labelled lesions, fewer than the {min_reads} needed for the ROC plot")
    if both:
        scores = reads["risk"].to_numpy(dtype=np.float64)
        sweep = ThresholdSweep(y, scores)
        row["model_auroc"] = sweep.auroc()
        row["model_sensitivity_at_reader_specificity"] = sweep.threshold_for_specificity(specificity)["sensitivity"]
        row["model_specificity_at_reader_sensitivity"] = sweep.threshold_for_sensitivity(sensitivity)["specificity"]
    rated = reads["confidence"].notna().to_numpy()
    row["n_confidence"] = int(rated.sum())
    y_rated = y[rated]
    if rated.any() and 0 < y_rated.sum() < len(y_rated):
        confidence = reads["confidence"].to_numpy(dtype=np.float64)[rated] / 100.0
        row["reader_auroc"] = auroc(y_rated, confidence)
        try:
            interval = auroc_ci(
                y_rated, confidence, groups=reads["group"].to_numpy()[rated], n_boot=n_boot, seed=seed, level=level
            )
            row["reader_auroc_low"], row["reader_auroc_high"] = interval.low, interval.high
        except MelcoreError as exc:
            notes.append(f"no interval for the confidence AUROC: {exc}")
        if rated.sum() < len(reads):
            notes.append(f"confidence AUROC on the {int(rated.sum())} of {len(reads)} reads that gave one")
    row["note"] = "; ".join(notes)
    return row


def reader_table(
    reads: pd.DataFrame, *, min_reads: int = MIN_READS, level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Every reader's sensitivity and specificity in each mode, beside the model's on the same lesions.

    Parameters
    ----------
    reads : DataFrame
        :func:`study_reads`.
    min_reads : int
        Reads needed (with both classes) for ``eligible`` (the ROC plot and the mean reader).
    level : float
        Level of the Wilson intervals and of the confidence-AUROC bootstrap interval.
    n_boot, seed : int
        Patient-bootstrap resamples behind the confidence-AUROC interval.

    Returns
    -------
    DataFrame with :data:`READER_COLUMNS`, one row per (reviewer, mode), in reviewer order,
    unaided before aided: counts; sensitivity and specificity of "biopsy" with Wilson
    bounds; the model's AUROC, its sensitivity at the reader's specificity and its
    specificity at the reader's sensitivity, all on the reader's lesions; the AUROC of the
    reader's confidence ratings (n_confidence rated reads) with a patient-bootstrap
    interval; eligible (bool) and a note.
    """
    level = _check_level(level)
    rows = []
    if reads is not None and len(reads):
        order = {m: i for i, m in enumerate(MODES)}
        keys = sorted({(r, m) for r, m in zip(reads["reviewer"], reads["mode"])}, key=lambda k: (k[0], order[k[1]]))
        grouped = dict(tuple(reads.groupby(["reviewer", "mode"], sort=False)))
        for reviewer, mode in keys:
            rows.append(_reader_row(reviewer, mode, grouped[(reviewer, mode)], min_reads, level, n_boot, seed))
    return pd.DataFrame(rows, columns=list(READER_COLUMNS))


class ModelOnReads(NamedTuple):
    """The model's ROC curve on the lesions some given readers read (the readers' ROC plot).

    fpr, tpr: float (k,); auroc and ci (low, high): patient-bootstrap interval; n,
    n_malignant, n_patients: the lesions; readers: the readers whose lesions they are;
    same_lesions: every one of those readers read exactly these lesions (then each
    reader's point and the curve are on the same lesions).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float
    ci: tuple
    n: int
    n_malignant: int
    n_patients: int
    readers: tuple
    same_lesions: bool


def model_on_reads(
    reads: pd.DataFrame, readers, *, modes=MODES, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> ModelOnReads | None:
    """The model's ROC curve and AUROC on every lesion the given readers read in ``modes``.

    Returns None when those lesions hold one class only (no curve).
    """
    frame = reads[reads["reviewer"].isin(list(readers)) & reads["mode"].isin(list(modes))]
    lesions = frame.drop_duplicates("image_name").sort_values("image_name")
    y = lesions["target"].to_numpy(dtype=np.int64)
    if not 0 < y.sum() < len(y):
        return None
    p = lesions["risk"].to_numpy(dtype=np.float64)
    sweep = ThresholdSweep(y, p)
    fpr, tpr, _ = sweep.roc_curve()
    try:
        interval = auroc_ci(y, p, groups=lesions["group"].to_numpy(), n_boot=n_boot, seed=seed, level=level)
        ci = (interval.low, interval.high)
    except MelcoreError:
        ci = (math.nan, math.nan)
    per_reader = frame.groupby(["reviewer", "mode"])["image_name"].nunique()
    return ModelOnReads(
        fpr,
        tpr,
        sweep.auroc(),
        ci,
        len(lesions),
        int(y.sum()),
        int(lesions["group"].nunique()),
        tuple(sorted(set(frame["reviewer"]))),
        bool((per_reader == len(lesions)).all()),
    )


def reader_table_csv(table: pd.DataFrame, classes=None) -> str:
    """:func:`reader_table` (or any reader table) as CSV text.

    Parameters
    ----------
    table : DataFrame
        The reader table (one row per reader and mode).
    classes : melcore.classes.ClassNames, optional
        The dataset's class names (default melanoma / not melanoma).

    Returns
    -------
    str
        CSV with the table's columns, except that the count of positive lesions is named
        ``n_positive`` whatever the dataset calls its classes, followed by ``positive_class``
        (``"melanoma"`` or ``"malignant"``: what that count counts), so a column name never
        says "malignant" for a melanoma-vs-rest dataset. Names that a spreadsheet would run as
        a formula get a leading apostrophe, as in :func:`melcore.review.reviews_csv`.
    """
    frame = table.rename(columns={"n_malignant": "n_positive"})
    if "n_positive" in frame.columns:
        frame.insert(frame.columns.get_loc("n_positive") + 1, "positive_class", (classes or MELANOMA).positive)
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(spreadsheet_safe)
    return frame.to_csv(index=False, float_format="%.6f", lineterminator="\r\n")


# --------------------------------------------------------------------------- the mean reader


class MeanReaderResult(NamedTuple):
    """The mean reader against the model on the lesions every included reader read.

    Attributes
    ----------
    mode : str
        "unaided" or "aided".
    readers : tuple of str
        The readers averaged (eligible ones that read every lesion of the set).
    n, n_malignant, n_patients : int
        The shared lesion set.
    reader_sensitivity, reader_specificity : float
        Mean over readers.
    model_sensitivity, model_specificity : float
        The model's sensitivity at the mean reader's specificity, and its specificity at the
        mean reader's sensitivity, on the same lesions.
    sensitivity_diff, specificity_diff : float
        model - mean reader.
    sensitivity_diff_ci, specificity_diff_ci : (float, float)
        Percentile intervals from the two-way (readers x patients) bootstrap.
    n_boot, n_used : int
        Resamples drawn, and those in which every quantity was defined.
    note : str
        "" or why a number is missing.
    """

    mode: str
    readers: tuple
    n: int
    n_malignant: int
    n_patients: int
    reader_sensitivity: float
    reader_specificity: float
    model_sensitivity: float
    model_specificity: float
    sensitivity_diff: float
    specificity_diff: float
    sensitivity_diff_ci: tuple
    specificity_diff_ci: tuple
    n_boot: int
    n_used: int
    note: str


def _weighted_model(
    scores_sorted: np.ndarray,
    malignant_sorted: np.ndarray,
    weights_sorted: np.ndarray,
    spec_target: float,
    sens_target: float,
) -> tuple[float, float]:
    """Model (sensitivity at ``spec_target``, specificity at ``sens_target``) on weighted lesions.

    ``scores_sorted`` increasing; the threshold rules are those of :class:`ThresholdSweep`
    (lowest threshold reaching the specificity, highest reaching the sensitivity), over the
    distinct scores plus one above them all.
    """
    w_mal = weights_sorted * malignant_sorted
    w_ben = weights_sorted * (1 - malignant_sorted)
    total_mal, total_ben = w_mal.sum(), w_ben.sum()
    if total_mal == 0 or total_ben == 0:
        return math.nan, math.nan
    last = np.r_[np.flatnonzero(np.diff(scores_sorted)), len(scores_sorted) - 1]  # last index of each score
    below_mal = np.r_[0, np.cumsum(w_mal)[last]]  # weight strictly below each candidate threshold
    below_ben = np.r_[0, np.cumsum(w_ben)[last]]
    sensitivity = (total_mal - below_mal) / total_mal  # non-increasing over the candidates
    specificity = below_ben / total_ben  # non-decreasing
    k_spec = int(np.argmax(specificity >= spec_target - 1e-12))
    k_sens = int(np.count_nonzero(sensitivity >= sens_target - 1e-12)) - 1
    return float(sensitivity[k_spec]), float(specificity[max(k_sens, 0)])


def shared_lesions(reads: pd.DataFrame, mode: str, readers=None) -> tuple[list[str], pd.DataFrame]:
    """(readers, reads of those readers restricted to the lesions every one of them read in ``mode``)."""
    _check_mode(mode)
    frame = reads[reads["mode"] == mode]
    if readers is not None:
        frame = frame[frame["reviewer"].isin(list(readers))]
    names = sorted(frame["reviewer"].unique())
    if not names:
        return [], frame.iloc[0:0]
    per_image = frame.groupby("image_name")["reviewer"].nunique()
    common = per_image.index[per_image == len(names)]
    return names, frame[frame["image_name"].isin(common)]


def mean_reader_comparison(
    reads: pd.DataFrame,
    *,
    mode: str = "unaided",
    readers=None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    resample_readers: bool = True,
) -> MeanReaderResult:
    """The mean reader's sensitivity and specificity against the model's, with a two-way bootstrap.

    Parameters
    ----------
    reads : DataFrame
        :func:`study_reads`.
    mode : {"unaided", "aided"}
    readers : sequence of str, optional
        Readers to average (default: every reader with reads in ``mode``); the lesion set is
        the lesions all of them read (a fully crossed design).
    n_boot, seed : int
        Each resample draws as many readers as there are and as many patients as there are,
        both with replacement; the mean reader and the model are recomputed on it.
    level : float
        Level of the percentile intervals.
    resample_readers : bool
        False keeps the readers fixed and resamples patients only (the interval then speaks
        for these readers, not for readers like them).

    Returns
    -------
    :class:`MeanReaderResult`.
    """
    level = _check_level(level)
    if not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise MelcoreError(f"n_boot must be a positive whole number of resamples, got {n_boot!r}")
    names, frame = shared_lesions(reads, mode, readers)
    nan2 = (math.nan, math.nan)
    lesions = frame.drop_duplicates("image_name").sort_values("image_name")
    n, n_malignant = len(lesions), int(lesions["target"].sum()) if len(lesions) else 0
    empty = MeanReaderResult(
        mode,
        tuple(names),
        n,
        n_malignant,
        int(lesions["group"].nunique()) if n else 0,
        *([math.nan] * 6),
        nan2,
        nan2,
        n_boot,
        0,
        "",
    )
    if not names or n == 0:
        return empty._replace(note=f"no lesion was read by every reader in the {mode} mode")
    if not 0 < n_malignant < n:
        return empty._replace(note="the lesions every reader read hold one class only")

    image_index = {name: i for i, name in enumerate(lesions["image_name"])}
    group_codes, groups = pd.factorize(lesions["group"])
    y = lesions["target"].to_numpy(dtype=np.int64)
    # calls[r, i]: reader r's call on lesion i
    calls = np.zeros((len(names), n), dtype=np.int64)
    reader_index = {name: r for r, name in enumerate(names)}
    for reviewer, image, positive in zip(frame["reviewer"], frame["image_name"], frame["positive"]):
        calls[reader_index[reviewer], image_index[image]] = int(positive)
    # per (reader, patient) cell counts: tp, fn, tn, fp
    n_groups = len(groups)
    cells = np.zeros((len(names), n_groups, 4), dtype=np.int64)
    for r in range(len(names)):
        for k, mask in enumerate((calls[r] * y, (1 - calls[r]) * y, (1 - calls[r]) * (1 - y), calls[r] * (1 - y))):
            cells[r, :, k] = np.bincount(group_codes, weights=mask, minlength=n_groups).astype(np.int64)

    order = np.argsort(lesions["risk"].to_numpy(dtype=np.float64), kind="stable")
    scores_sorted = lesions["risk"].to_numpy(dtype=np.float64)[order]
    malignant_sorted = y[order].astype(np.float64)
    codes_sorted = group_codes[order]

    def estimate(reader_weights: np.ndarray, group_weights: np.ndarray) -> tuple[float, ...]:
        counts = np.einsum("g,rgk->rk", group_weights, cells).astype(np.float64)
        tp, fn, tn, fp = counts.T
        with np.errstate(invalid="ignore", divide="ignore"):
            sens, spec = tp / (tp + fn), tn / (tn + fp)
        if not (np.isfinite(sens).all() and np.isfinite(spec).all()):
            return (math.nan,) * 4
        mean_sens = float(np.average(sens, weights=reader_weights))
        mean_spec = float(np.average(spec, weights=reader_weights))
        model_sens, model_spec = _weighted_model(
            scores_sorted, malignant_sorted, group_weights[codes_sorted].astype(np.float64), mean_spec, mean_sens
        )
        return mean_sens, mean_spec, model_sens, model_spec

    mean_sens, mean_spec, model_sens, model_spec = estimate(np.ones(len(names)), np.ones(n_groups))
    rng = np.random.default_rng(seed)
    diffs = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        reader_weights = (
            np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))
            if resample_readers
            else np.ones(len(names), dtype=np.int64)
        )
        group_weights = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        s, c, ms, mc = estimate(reader_weights.astype(np.float64), group_weights)
        diffs[b] = (ms - s, mc - c)
    used = np.isfinite(diffs).all(axis=1)
    note = ""
    if used.sum() < n_boot:
        note = f"{n_boot - int(used.sum()):,} of {n_boot:,} resamples lacked a class for some reader and were left out"
    return MeanReaderResult(
        mode,
        tuple(names),
        n,
        n_malignant,
        n_groups,
        mean_sens,
        mean_spec,
        model_sens,
        model_spec,
        model_sens - mean_sens,
        model_spec - mean_spec,
        percentile_interval(diffs[used, 0], level),
        percentile_interval(diffs[used, 1], level),
        n_boot,
        int(used.sum()),
        note,
    )


# --------------------------------------------------------------------------- aided against unaided


def aided_vs_unaided(reads: pd.DataFrame) -> pd.DataFrame:
    """Per reader, unaided and aided reads of the same lesions compared.

    Returns
    -------
    DataFrame, one row per reader who read some lesions in both modes: reviewer, n (lesions
    read in both modes), n_malignant, sensitivity_unaided, sensitivity_aided,
    sensitivity_diff (aided - unaided), sensitivity_p, and the same for specificity; the
    p-values are exact McNemar tests (two-sided binomial test on the discordant lesions).
    """
    columns = [
        "reviewer",
        "n",
        "n_malignant",
        "sensitivity_unaided",
        "sensitivity_aided",
        "sensitivity_diff",
        "sensitivity_p",
        "specificity_unaided",
        "specificity_aided",
        "specificity_diff",
        "specificity_p",
    ]
    rows = []
    if reads is not None and len(reads):
        for reviewer, own in reads.groupby("reviewer", sort=True):
            wide = own.pivot_table(index="image_name", columns="mode", values="positive", aggfunc="last")
            if not set(MODES) <= set(wide.columns):
                continue
            wide = wide.dropna(subset=list(MODES))
            if wide.empty:
                continue
            target = own.drop_duplicates("image_name").set_index("image_name")["target"].reindex(wide.index)
            row = {"reviewer": reviewer, "n": len(wide), "n_malignant": int(target.sum())}
            for measure, cls, wanted in (("sensitivity", 1, True), ("specificity", 0, False)):
                part = wide[target == cls]
                before = part["unaided"].astype(bool) == wanted
                after = part["aided"].astype(bool) == wanted
                row[f"{measure}_unaided"] = float(before.mean()) if len(part) else math.nan
                row[f"{measure}_aided"] = float(after.mean()) if len(part) else math.nan
                row[f"{measure}_diff"] = row[f"{measure}_aided"] - row[f"{measure}_unaided"]
                gained, lost = int((after & ~before).sum()), int((before & ~after).sum())
                row[f"{measure}_p"] = (
                    float(stats.binomtest(gained, gained + lost).pvalue) if gained + lost else math.nan
                )
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- agreement


def cohen_kappa(a, b, categories=STUDY_DECISIONS) -> float:
    """Cohen's kappa of two raters' categorical decisions on the same items.

    Parameters
    ----------
    a, b : array-like of shape (n,)
        The two raters' decisions, item by item.
    categories : sequence
        The possible decisions (values outside it raise).

    Returns
    -------
    float: (p_observed - p_chance) / (1 - p_chance); nan for no items, and 1.0 when both
    raters gave one and the same decision to every item (chance agreement 1).
    """
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    if a.shape != b.shape or a.ndim != 1:
        raise MelcoreError(f"kappa needs two equally long lists of decisions, got {a.shape} and {b.shape}")
    index = {c: i for i, c in enumerate(categories)}
    unknown = sorted({str(v) for v in np.concatenate([a, b]) if v not in index})
    if unknown:
        raise MelcoreError(f"unknown decision(s) {', '.join(unknown)}; kappa uses {', '.join(map(str, categories))}")
    if len(a) == 0:
        return math.nan
    k = len(categories)
    table = np.zeros((k, k))
    np.add.at(table, ([index[v] for v in a], [index[v] for v in b]), 1)
    table /= table.sum()
    observed = float(np.trace(table))
    chance = float(table.sum(axis=1) @ table.sum(axis=0))
    if chance == 1.0:
        return 1.0
    return (observed - chance) / (1 - chance)


def pairwise_kappa(reads: pd.DataFrame, *, mode: str = "unaided") -> pd.DataFrame:
    """Cohen's kappa of the management decisions for every pair of readers, on the lesions both read.

    Returns
    -------
    DataFrame: reviewer_a, reviewer_b (a < b), n_shared, agreement (share of identical
    decisions), kappa (nan when they share no lesion).
    """
    _check_mode(mode)
    columns = ["reviewer_a", "reviewer_b", "n_shared", "agreement", "kappa"]
    frame = reads[reads["mode"] == mode] if reads is not None and len(reads) else None
    if frame is None or frame.empty:
        return pd.DataFrame(columns=columns)
    wide = frame.pivot_table(index="image_name", columns="reviewer", values="decision", aggfunc="last")
    rows = []
    names = sorted(wide.columns)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            both = wide[[first, second]].dropna()
            agreement = float((both[first] == both[second]).mean()) if len(both) else math.nan
            rows.append(
                {
                    "reviewer_a": first,
                    "reviewer_b": second,
                    "n_shared": len(both),
                    "agreement": agreement,
                    "kappa": cohen_kappa(both[first].to_numpy(), both[second].to_numpy()),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa from a subjects x categories table of rating counts.

    Parameters
    ----------
    counts : array-like of shape (n_subjects, n_categories)
        ``counts[i, j]`` = raters who put subject i in category j; every subject must have
        the same number of raters (at least 2).

    Returns
    -------
    float: (P_bar - P_e) / (1 - P_e) (Fleiss 1971); nan with no subject, 1.0 when every
    rating falls in one category.
    """
    table = np.asarray(counts, dtype=np.float64)
    if table.ndim != 2:
        raise MelcoreError(f"Fleiss' kappa needs a subjects x categories table, got shape {table.shape}")
    if len(table) == 0:
        return math.nan
    raters = table.sum(axis=1)
    if (table < 0).any() or not np.allclose(raters, raters[0]) or raters[0] < 2:
        raise MelcoreError(
            "Fleiss' kappa needs the same number of raters (at least 2) for every subject; "
            f"got between {raters.min():g} and {raters.max():g}"
        )
    m = raters[0]
    per_subject = ((table * (table - 1)).sum(axis=1)) / (m * (m - 1))
    shares = table.sum(axis=0) / table.sum()
    p_bar, p_chance = float(per_subject.mean()), float((shares**2).sum())
    if p_chance == 1.0:
        return 1.0
    return (p_bar - p_chance) / (1 - p_chance)


def fleiss_kappa_of(reads: pd.DataFrame, *, mode: str = "unaided") -> tuple[float, int, int]:
    """(Fleiss' kappa, lesions, readers) of the management decisions on the lesions every reader read in ``mode``.

    Kappa is nan with fewer than two readers or no shared lesion.
    """
    if reads is None or len(reads) == 0:
        return math.nan, 0, 0
    names, frame = shared_lesions(reads, mode)
    if len(names) < 2 or frame.empty:
        return math.nan, int(frame["image_name"].nunique()) if len(frame) else 0, len(names)
    counts = pd.crosstab(frame["image_name"], frame["decision"]).reindex(columns=list(STUDY_DECISIONS), fill_value=0)
    return fleiss_kappa(counts.to_numpy()), len(counts), len(names)
