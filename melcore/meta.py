"""Metadata and patient-context model: age, sex, site and how a lesion sits among the patient's others.

A dermatologist never judges a lesion alone: a mole that looks unlike the
patient's other moles (the "ugly duckling") or that appears at a later visit is
more suspicious. This module turns a lesion table into such features and fits a
tabular model on them.

Features (:func:`meta_features`), all computed from the table itself and never
from any label:

* the lesion's own ``age_approx``, ``sex`` and ``site`` (categorical);
* patient aggregates: images, lesions and distinct sites per patient;
* the lesion relative to the patient: age minus the patient's youngest/mean age,
  its age rank within the patient (a lesion first imaged at a later visit ranks
  high), how many of the patient's images share its site and that count as a
  share of the patient's images;
* with image scores (probabilities from an image model, keyed by
  ``image_name``): the ugly-duckling features, i.e. the lesion's logit score
  minus the mean/median of the patient's *other* lesions, the leave-one-out
  z-score and its rank within the patient; with embeddings, the cosine and
  euclidean distance of the lesion's embedding to the mean embedding of the
  patient's other lesions.

Patient aggregates read only what is known at the visit (the default feature
sets, :data:`FEATURE_HISTORY` ``"as_of_visit"``): the patient's images at ages up
to the row's own ``age_approx``, the only time stamp of these tables. The
``"retrospective"`` feature set reads the patient's whole history, later visits
included (and adds the patient's oldest age minus the row's): it describes a
finished cohort and cannot be computed at triage, so its AUROC is optimistic
for use at the visit (ISIC 2020: bench/RESULTS.md).

The patient is ``Cohort.groups`` (patient, else lesion, else image), so a table
without patient ids degrades to per-lesion features instead of failing.

:class:`MetaModel` is a scikit-learn ``HistGradientBoostingClassifier`` with
native categorical support and fixed, regularised hyper-parameters (no early
stopping, so no random split inside a fold). :func:`cross_validate_meta` gives
patient-grouped K-fold out-of-fold predictions (folds from
:func:`melcore.splits.group_kfold`); :func:`fuse` stacks image and meta scores
with a logistic regression that is itself cross-validated on the same patient
folds, so every AUROC this module reports is out-of-fold.

Saving without pickle: scikit-learn's tree ensembles have no stable, safe file
format (pickle and joblib run code on load, and skops would be one more
dependency whose trust list must be maintained). A gradient-boosting model
without early stopping or subsampling is a deterministic function of its
training matrix and hyper-parameters, so :meth:`MetaModel.save` writes the
hyper-parameters and category vocabularies as JSON and the encoded training
matrix, labels and the model's own training-set predictions as an ``.npz``
(read with ``allow_pickle=False``); :meth:`MetaModel.load` refits (about a
second for ISIC 2020) and refuses the result unless it reproduces the saved
predictions (guards against a different scikit-learn or a tampered file).
The training matrix is stored rather than re-read from the dataset so that a
later edit of the CSV cannot silently change a saved model.

No TensorFlow here: the module imports numpy, pandas and scikit-learn only.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import expit

import melcore
from melcore.cohort import lesion_keys, table_and_groups
from melcore.errors import CancelledError, CohortError, ConfigError, LeakageError, MelcoreError
from melcore.metrics import auroc_or_none, format_auroc
from melcore.splits import group_kfold

__all__ = [
    "MISSING_CLASS_GAP",
    "MISSING_SOURCE_GAP",
    "missingness_warnings",
    "FEATURE_SETS",
    "FEATURE_HISTORY",
    "FEATURE_SET_LABELS",
    "UGLY_DUCKLING_FEATURES",
    "EMBEDDING_FEATURES",
    "DEFAULT_PARAMS",
    "meta_features",
    "ugly_duckling_scores",
    "MetaModel",
    "MetaResult",
    "cross_validate_meta",
    "FusionModel",
    "FusionResult",
    "fusion_features",
    "fuse",
    "read_image_scores",
    "read_embeddings",
    "train_meta_run",
    "META_JOB_DEFAULTS",
    "meta_job_config",
    "stored_image_scores",
]

CATEGORICAL_FEATURES = ("sex", "site")

_CONTEXT_COLUMNS = (
    "age_approx",
    "sex",
    "site",
    "pt_n_images",
    "age_minus_pt_min",
    "age_minus_pt_mean",
    "pt_max_minus_age",
    "age_rank_in_pt",
    "n_at_site",
    "share_at_site",
    "pt_n_sites",
    "pt_n_lesions",
    "lesion_n_images",
)

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    # The plain model of the issue: the lesion's own metadata and the patient's image count.
    "baseline": ("age_approx", "sex", "site", "pt_n_images"),
    # Label-free patient context as known at the visit (the default, usable for triage). As of the visit
    # the patient's oldest known age is the visit's own, so pt_max_minus_age (always 0) is left out.
    "context": tuple(c for c in _CONTEXT_COLUMNS if c != "pt_max_minus_age"),
    # The same context from the patient's whole history, later visits included: a retrospective
    # description of a finished cohort, not usable at the visit (ISIC 2020 figures: bench/RESULTS.md).
    # The patient's own min/mean/max age and number of distinct ages were tried too: with the relative ages
    # they are redundant (age minus relative age) and cost 0.002-0.003 AUROC, so they are left out.
    "retrospective": _CONTEXT_COLUMNS,
}
"""Named feature lists for :func:`meta_features` (image-score features are added on top)."""

FEATURE_HISTORY: dict[str, str] = {"baseline": "as_of_visit", "context": "as_of_visit", "retrospective": "full"}
"""Which of a patient's images each feature set's patient aggregates read: ``"as_of_visit"`` the images at
ages up to the row's own (prospective), ``"full"`` all of them (retrospective)."""

FEATURE_SET_LABELS: dict[str, str] = {
    "context": "patient context known at the visit (prospective, default)",
    "baseline": "age, sex, site and the patient's images so far",
    "retrospective": "patient context from the whole history, later visits included (retrospective: "
    "not usable at the visit, optimistic)",
}
"""One-line description of each feature set for the CLI and the Train page."""

UGLY_DUCKLING_FEATURES = (
    "ud_score_minus_mean",
    "ud_score_minus_median",
    "ud_score_z",
    "ud_score_rank",
    "ud_n_other_lesions",
)
"""Added when image scores are given: the lesion's logit score against the patient's other lesions."""

EMBEDDING_FEATURES = ("ud_emb_cosine", "ud_emb_distance", "ud_emb_distance_rel", "ud_emb_z")
"""Added when embeddings are given: the lesion's embedding against the mean of the patient's other lesions."""

DEFAULT_PARAMS = {
    "learning_rate": 0.03,
    "max_iter": 300,
    "max_leaf_nodes": 8,
    "min_samples_leaf": "auto",
    "l2_regularization": 1.0,
    "random_state": 0,
}
"""Hyper-parameters of :class:`MetaModel` (chosen on ISIC 2020 by patient-grouped CV; see the class)."""

SCORE_SPREAD_FLOOR = 0.5
"""Logit units added (in quadrature) to the spread of the other lesions' scores in the ugly-duckling
z-score, so a patient whose other lesions all score alike does not give an infinite z."""

_SCORE_COLUMNS = ("prediction", "image_score", "score", "probability")
_EPS = 1e-6

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- table helpers


def _clean_str(values) -> np.ndarray:
    """Object array of stripped strings, None for missing/empty/NaN."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            out[i] = None
        else:
            s = str(v).strip()
            out[i] = s if s and s.lower() not in ("nan", "none", "<na>") else None
    return out


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    if name not in table.columns:
        return np.full(len(table), None, dtype=object)
    return _clean_str(table[name].tolist())


def _image_names(table: pd.DataFrame) -> np.ndarray:
    if "image_name" not in table.columns:
        raise CohortError(
            f"the lesion table has no image_name column (columns: {', '.join(map(str, table.columns))});"
            " load it with melcore.cohort.load_cohort or rename the image id column to image_name"
        )
    names = _clean_str(table["image_name"].tolist())
    missing = np.flatnonzero(pd.isna(names))
    if len(missing):
        raise CohortError(
            f"image_name is empty in {len(missing)} row(s) (first at row {int(missing[0])}); every image needs a name"
        )
    dup = pd.Series(names).duplicated(keep=False)
    if dup.any():
        first = sorted(set(names[dup.to_numpy()]))[:5]
        raise CohortError(
            f"image_name is duplicated ({int(dup.sum())} rows, e.g. {', '.join(first)}); "
            "image scores are keyed by image_name, so each name must appear once"
        )
    return names.astype(str)


def _patient_lesion_keys(frame: pd.DataFrame, groups: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(patient key, lesion key scoped to the patient) per row: :func:`melcore.cohort.table_and_groups`'
    groups and ``patient|`` + :func:`melcore.cohort.lesion_keys`."""
    patient = groups.astype(str).to_numpy()
    return patient, (groups.astype(str) + "|" + lesion_keys(frame)).to_numpy().astype(str)


def _ages(table: pd.DataFrame) -> np.ndarray:
    if "age_approx" not in table.columns:
        return np.full(len(table), np.nan)
    age = pd.to_numeric(pd.Series(table["age_approx"].tolist(), dtype=object), errors="coerce").to_numpy(float)
    bad = np.flatnonzero(np.isfinite(age) & ((age < 0) | (age > 130)))
    if len(bad):
        raise CohortError(
            f"age_approx {age[bad[0]]:g} at row {int(bad[0])} is not an age in years "
            f"({len(bad)} such rows); fix or blank these values"
        )
    return age


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


# --------------------------------------------------------------------------- image scores / embeddings


def _keyed_frame(obj, what: str) -> pd.DataFrame:
    """A DataFrame indexed by image_name from a DataFrame with an image_name column or index."""
    if isinstance(obj, pd.Series):
        frame = obj.to_frame(name=obj.name if obj.name is not None else "prediction")
    elif isinstance(obj, pd.DataFrame):
        frame = obj
    else:
        raise MelcoreError(
            f"{what} must be a pandas DataFrame (image_name + values) or a Series indexed by "
            f"image_name, not {type(obj).__name__}"
        )
    if "image_name" in frame.columns:
        frame = frame.set_index("image_name")
    frame = frame.copy()
    frame.index = pd.Index(_clean_str(frame.index.tolist()), dtype=object)
    if frame.index.isna().any():
        raise MelcoreError(f"{what}: {int(frame.index.isna().sum())} row(s) have an empty image_name")
    dup = frame.index.duplicated()
    if dup.any():
        raise MelcoreError(
            f"{what}: image_name {frame.index[dup][0]!r} appears more than once "
            f"({int(dup.sum())} duplicates); keep one row per image"
        )
    return frame


def _score_column(frame: pd.DataFrame, what: str) -> str:
    for name in _SCORE_COLUMNS:
        if name in frame.columns:
            return name
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and c not in ("target", "fold")]
    if len(numeric) == 1:
        return numeric[0]
    raise MelcoreError(
        f"{what}: cannot tell which column holds the image score (columns: "
        f"{', '.join(map(str, frame.columns))}); name it one of {', '.join(_SCORE_COLUMNS)}"
    )


def _align_scores(names: np.ndarray, image_scores, what: str = "image_scores") -> np.ndarray:
    """Scores aligned with ``names`` (NaN where an image has none); validates the range 0..1."""
    frame = _keyed_frame(image_scores, what)
    column = _score_column(frame, what)
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.notna() & ((values < 0) | (values > 1))
    if bad.any():
        raise MelcoreError(
            f"{what}: column {column!r} must hold probabilities in 0..1; image "
            f"{values.index[bad.to_numpy()][0]!r} has {values[bad].iloc[0]:g} "
            f"({int(bad.sum())} such rows)"
        )
    aligned = values.reindex(pd.Index(names, dtype=object)).to_numpy(float)
    if len(names) and not np.isfinite(aligned).any():
        raise MelcoreError(
            f"{what}: none of its {len(frame)} image names match an image_name of the table "
            f"(e.g. {frame.index[0]!r} vs {names[0]!r}); pass scores of this cohort's images"
        )
    return aligned


def _align_embeddings(names: np.ndarray, embeddings, what: str = "embeddings") -> np.ndarray:
    """Embedding matrix (n, d) aligned with ``names``; NaN rows where an image has none."""
    if isinstance(embeddings, np.ndarray):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
            raise MelcoreError(
                f"{what}: an array must have shape (n_rows, dim) = ({len(names)}, d) aligned with "
                f"the table, not {embeddings.shape}; or pass a DataFrame keyed by image_name"
            )
        return embeddings.astype(float)
    frame = _keyed_frame(embeddings, what)
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    if not numeric:
        raise MelcoreError(f"{what}: no numeric embedding columns (columns: {', '.join(map(str, frame.columns))})")
    aligned = frame[numeric].reindex(pd.Index(names, dtype=object)).to_numpy(float)
    if len(names) and not np.isfinite(aligned).all(axis=1).any():
        raise MelcoreError(f"{what}: none of its {len(frame)} image names match an image_name of the table")
    return aligned


def _read_keyed_csv(path, what: str) -> tuple[Path, pd.DataFrame]:
    """(path, the CSV indexed by its image_name column); MelcoreError naming ``what`` when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise MelcoreError(f"{what} file not found: {path}")
    frame = pd.read_csv(path)
    if "image_name" not in frame.columns:
        raise MelcoreError(f"{path}: no image_name column (columns: {', '.join(map(str, frame.columns))})")
    return path, _keyed_frame(frame, str(path))


def read_image_scores(path) -> pd.DataFrame:
    """Read a CSV of image scores: ``image_name`` and a probability column
    (``prediction``, ``image_score``, ``score`` or ``probability``; e.g. a run's
    ``val_predictions.csv`` or out-of-fold predictions). Returns
    DataFrame[image_name (str), prediction (float64, 0..1)]."""
    path, keyed = _read_keyed_csv(path, "image scores")
    column = _score_column(keyed, str(path))
    scores = pd.to_numeric(keyed[column], errors="coerce")
    bad = scores.notna() & ((scores < 0) | (scores > 1))
    if bad.any():
        raise MelcoreError(
            f"{path}: column {column!r} must hold probabilities in 0..1; image "
            f"{scores.index[bad.to_numpy()][0]!r} has {scores[bad].iloc[0]:g}"
        )
    return pd.DataFrame({"image_name": keyed.index.astype(str), "prediction": scores.to_numpy(float)})


def read_embeddings(path) -> pd.DataFrame:
    """Read a CSV of image embeddings: ``image_name`` plus one numeric column per dimension."""
    path, keyed = _read_keyed_csv(path, "embeddings")
    numeric = [c for c in keyed.columns if pd.api.types.is_numeric_dtype(keyed[c])]
    if not numeric:
        raise MelcoreError(f"{path}: no numeric embedding columns")
    return keyed[numeric].rename_axis("image_name").reset_index()


# --------------------------------------------------------------------------- ugly duckling


def _ugly_duckling_frame(
    patient_keys: np.ndarray, lesion_keys: np.ndarray, scores: np.ndarray | None, embeddings: np.ndarray | None
) -> pd.DataFrame:
    """Per-row ugly-duckling features. Images of one lesion are averaged first, and each lesion is
    compared with the patient's *other* lesions (leave-one-out), so a lesion photographed twice is not
    its own neighbour. NaN where the patient has fewer than two lesions with a score/embedding."""
    n = len(patient_keys)
    lesion_codes, lesion_uniques = pd.factorize(lesion_keys)
    n_lesions = len(lesion_uniques)
    lesion_patient = pd.Series(patient_keys).groupby(lesion_codes).first().to_numpy()
    out: dict[str, np.ndarray] = {}

    def to_rows(per_lesion: dict[str, np.ndarray]) -> None:
        for name, values in per_lesion.items():
            out[name] = values[lesion_codes]

    if scores is not None:
        x_rows = _logit(scores)
        x_rows[~np.isfinite(scores)] = np.nan
        x = pd.Series(x_rows).groupby(lesion_codes).mean().reindex(range(n_lesions)).to_numpy(float)
        res = {k: np.full(n_lesions, np.nan) for k in UGLY_DUCKLING_FEATURES}
        res["ud_n_other_lesions"] = np.zeros(n_lesions)
        scored = np.flatnonzero(np.isfinite(x))
        for idx in pd.Series(scored).groupby(lesion_patient[scored]).indices.values():
            members = scored[idx]
            m = len(members)
            res["ud_n_other_lesions"][members] = m - 1
            if m < 2:
                continue
            v = x[members]
            mean_o = (v.sum() - v) / (m - 1)
            var_o = np.maximum(((v**2).sum() - v**2) / (m - 1) - mean_o**2, 0.0)
            res["ud_score_minus_mean"][members] = v - mean_o
            res["ud_score_minus_median"][members] = v - np.array([np.median(np.delete(v, i)) for i in range(m)])
            res["ud_score_z"][members] = (v - mean_o) / np.sqrt(var_o + SCORE_SPREAD_FLOOR**2)
            res["ud_score_rank"][members] = (pd.Series(v).rank(method="average").to_numpy() - 1) / (m - 1)
        to_rows(res)

    if embeddings is not None:
        emb_rows = np.asarray(embeddings, dtype=float)
        good_rows = np.isfinite(emb_rows).all(axis=1)
        d = emb_rows.shape[1]
        sums = np.zeros((n_lesions, d))
        np.add.at(sums, lesion_codes[good_rows], emb_rows[good_rows])
        counts = np.bincount(lesion_codes[good_rows], minlength=n_lesions)
        with np.errstate(invalid="ignore", divide="ignore"):
            e = sums / counts[:, None]
        res = {k: np.full(n_lesions, np.nan) for k in EMBEDDING_FEATURES}
        has = np.flatnonzero(counts > 0)
        for idx in pd.Series(has).groupby(lesion_patient[has]).indices.values():
            members = has[idx]
            m = len(members)
            if m < 2:
                continue
            E = e[members]
            others = (E.sum(axis=0) - E) / (m - 1)
            dist = np.linalg.norm(E - others, axis=1)
            norms = np.linalg.norm(E, axis=1) * np.linalg.norm(others, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.where(norms > 0, 1 - (E * others).sum(axis=1) / norms, np.nan)
                rel = dist / dist.mean() if dist.mean() > 0 else np.ones(m)
            d_mean_o = (dist.sum() - dist) / (m - 1)
            d_var_o = np.maximum(((dist**2).sum() - dist**2) / (m - 1) - d_mean_o**2, 0.0)
            floor = 0.1 * dist.mean() + 1e-12
            res["ud_emb_cosine"][members] = cos
            res["ud_emb_distance"][members] = dist
            res["ud_emb_distance_rel"][members] = rel
            res["ud_emb_z"][members] = (dist - d_mean_o) / np.sqrt(d_var_o + floor**2)
        to_rows(res)
    return pd.DataFrame(out, index=range(n))


def ugly_duckling_scores(table, image_scores, embeddings=None) -> pd.Series:
    """How far each lesion sits from the same patient's other lesions (the "ugly duckling" sign).

    Parameters
    ----------
    table : Cohort or DataFrame
        Canonical lesion table (``image_name``; ``patient_id``/``lesion_id`` when known).
    image_scores : DataFrame[image_name, prediction] or Series indexed by image_name
        Image-model probabilities (0..1). Images without a score are left out of the comparison.
    embeddings : DataFrame[image_name, dims...] or ndarray (n_rows, d), optional
        Image-model embeddings.

    Returns
    -------
    pd.Series of float64, aligned with ``table`` (same index), named ``ugly_duckling``.
        Score term: ``(logit s - mean logit of the patient's other lesions) / sqrt(var_others + 0.5**2)``,
        signed, so a positive value means "looks more malignant than this patient's other lesions".
        With embeddings, the mean of that and the embedding term (how much farther the lesion's embedding
        lies from the mean of the others than the patient's lesions typically do). Images of one lesion
        share a value. NaN when the patient has no other scored lesion.
    """
    frame, groups = table_and_groups(table)
    names = _image_names(frame)
    pk, lk = _patient_lesion_keys(frame, groups)
    scores = _align_scores(names, image_scores)
    emb = _align_embeddings(names, embeddings) if embeddings is not None else None
    ud = _ugly_duckling_frame(pk, lk, scores, emb)
    value = ud["ud_score_z"].to_numpy(float)
    if emb is not None:
        both = np.vstack([value, ud["ud_emb_z"].to_numpy(float)])
        with np.errstate(invalid="ignore"):
            counts = np.isfinite(both).sum(axis=0)
            value = np.where(counts > 0, np.nansum(both, axis=0) / np.maximum(counts, 1), np.nan)
    return pd.Series(value, index=frame.index, name="ugly_duckling", dtype="float64")


# --------------------------------------------------------------------------- features


def meta_features(table, image_scores=None, embeddings=None, *, feature_set: str = "context") -> pd.DataFrame:
    """Label-free metadata and patient-context features, one row per image.

    Parameters
    ----------
    table : Cohort or DataFrame
        Canonical lesion table: ``image_name`` (unique) and, when known, ``patient_id``, ``lesion_id``,
        ``age_approx`` (years), ``sex``, ``site``. Missing columns/values become NaN features.
        ``target``, ``diagnosis`` and ``benign_malignant`` are never read (they hold the label).
    image_scores : DataFrame[image_name, prediction] or Series indexed by image_name, optional
        Image-model probabilities; adds :data:`UGLY_DUCKLING_FEATURES`. For training they must be
        out-of-fold scores, or the features carry the image model's training fit.
    embeddings : DataFrame[image_name, dims...] or ndarray (n_rows, d), optional
        Adds :data:`EMBEDDING_FEATURES`.
    feature_set : {"context", "baseline", "retrospective"}
        Which of :data:`FEATURE_SETS` to return; ``"context"`` and ``"baseline"`` read, for each row, only
        the patient's images at ages up to its own (as of the visit), ``"retrospective"`` all of them.

    Returns
    -------
    DataFrame aligned with the table (same index). ``sex`` and ``site`` are object columns (lower-case
    strings, None when unknown); all other columns are float64 (NaN when undefined, e.g. no age).
    Every value of a row depends only on the table's non-label columns of that row's patient (and on
    image scores/embeddings), so computing features on a whole cohort and then splitting by patient
    leaks nothing across folds. Ugly-duckling features compare a lesion with all of the patient's
    other scored lesions, whatever the feature set.
    """
    if feature_set not in FEATURE_SETS:
        raise ConfigError(f"unknown feature_set {feature_set!r}; choose from {', '.join(FEATURE_SETS)}")
    frame, groups = table_and_groups(table)
    names = _image_names(frame)
    pk, lk = _patient_lesion_keys(frame, groups)
    age = _ages(frame)
    sex = np.array([s.lower() if s is not None else None for s in _column(frame, "sex")], dtype=object)
    site = np.array([s.lower() if s is not None else None for s in _column(frame, "site")], dtype=object)

    f: dict[str, np.ndarray] = {"age_approx": age, "sex": sex, "site": site}
    f.update(_patient_context(pk, lk, age, site, as_of_visit=FEATURE_HISTORY[feature_set] == "as_of_visit"))

    columns = list(FEATURE_SETS[feature_set])
    result = pd.DataFrame({c: f[c] for c in columns}, index=frame.index)
    for c in columns:
        if c not in CATEGORICAL_FEATURES:
            result[c] = result[c].astype("float64")
        else:
            result[c] = pd.Series(f[c], index=frame.index, dtype=object)
    if image_scores is not None or embeddings is not None:
        scores = _align_scores(names, image_scores) if image_scores is not None else None
        emb = _align_embeddings(names, embeddings) if embeddings is not None else None
        ud = _ugly_duckling_frame(pk, lk, scores, emb)
        ud.index = frame.index
        result = pd.concat([result, ud.astype("float64")], axis=1)
    return result


def _visible_pairs(patient_keys: np.ndarray, age: np.ndarray, as_of_visit: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of rows of one patient where row j is known at row i's visit.

    Parameters
    ----------
    patient_keys : ndarray of str, shape (n,)
    age : ndarray of float64, shape (n,); years, NaN when unknown.
    as_of_visit : bool
        True: j is known at i's visit when ``age[j] <= age[i]`` (``age_approx`` is the only time stamp,
        so images at the same age count as one visit), and rows without an age see each other only.
        False (full history): every row of the patient is known.

    Returns
    -------
    (i, j) : two int64 arrays of equal length, every i paired with itself. Memory is O(sum of the
    squared images per patient): about 1.3 million pairs for ISIC 2020 (at most 115 images a patient).
    """
    codes, _ = pd.factorize(patient_keys)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    size_of, start_of = sizes[codes[order]], starts[codes[order]]
    i_sorted = np.repeat(np.arange(len(order)), size_of)
    offsets = np.arange(len(i_sorted)) - np.repeat(np.cumsum(size_of) - size_of, size_of)
    i, j = order[i_sorted], order[np.repeat(start_of, size_of) + offsets]
    if as_of_visit:
        a_i, a_j = age[i], age[j]
        known = np.where(np.isnan(a_i), np.isnan(a_j), a_j <= a_i)
        i, j = i[known], j[known]
    return i, j


def _patient_context(
    patient_keys: np.ndarray, lesion_keys: np.ndarray, age: np.ndarray, site: np.ndarray, *, as_of_visit: bool
) -> dict[str, np.ndarray]:
    """Patient-context features per row from the rows of its patient known at its visit.

    Parameters
    ----------
    patient_keys, lesion_keys : ndarray of str, shape (n,)
    age : ndarray of float64, shape (n,); years, NaN when unknown.
    site : ndarray of object, shape (n,); lower-case site, None when unknown.
    as_of_visit : bool
        Which rows are known at a row's visit (see :func:`_visible_pairs`): True for the prospective
        features usable at triage, False for the full-history (retrospective) ones.

    Returns
    -------
    dict of float64 arrays, shape (n,): ``pt_n_images``, ``pt_n_lesions``, ``pt_n_sites``,
    ``age_minus_pt_min``, ``age_minus_pt_mean``, ``pt_max_minus_age``, ``age_rank_in_pt`` (average
    rank among the known ages, as a fraction of them), ``n_at_site``, ``share_at_site``,
    ``lesion_n_images``. Age features are NaN without an age, site counts NaN without a site.
    """
    n = len(patient_keys)
    i, j = _visible_pairs(patient_keys, age, as_of_visit)

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(i[mask], minlength=n).astype(float)

    def distinct(codes: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pair_codes = np.unique(i[mask].astype(np.int64) * (codes.max(initial=0) + 1) + codes[j[mask]])
        return np.bincount(pair_codes // (codes.max(initial=0) + 1), minlength=n).astype(float)

    everything = np.ones(len(i), dtype=bool)
    lesion_codes, _ = pd.factorize(lesion_keys)
    site_codes, _ = pd.factorize(site, use_na_sentinel=True)
    aged = np.isfinite(age[j])
    with np.errstate(invalid="ignore", divide="ignore"):
        n_aged = count(aged)
        age_sum = np.bincount(i[aged], weights=age[j][aged], minlength=n)
        age_min, age_max = np.full(n, np.inf), np.full(n, -np.inf)
        np.minimum.at(age_min, i[aged], age[j][aged])
        np.maximum.at(age_max, i[aged], age[j][aged])
        below = count(aged & (age[j] < age[i]))
        tied = count(aged & (age[j] == age[i]))
        n_images = count(everything)
        n_at_site = count((site_codes[j] == site_codes[i]) & (site_codes[i] >= 0))
        no_age = ~np.isfinite(age)
        return {
            "pt_n_images": n_images,
            "pt_n_lesions": distinct(lesion_codes, everything),
            "pt_n_sites": distinct(site_codes, site_codes[j] >= 0),
            "age_minus_pt_min": np.where(no_age, np.nan, age - age_min),
            "age_minus_pt_mean": np.where(no_age, np.nan, age - age_sum / n_aged),
            "pt_max_minus_age": np.where(no_age, np.nan, age_max - age),
            "age_rank_in_pt": np.where(no_age, np.nan, (below + (tied + 1) / 2) / n_aged),
            "n_at_site": np.where(site_codes < 0, np.nan, n_at_site),
            "share_at_site": np.where(site_codes < 0, np.nan, n_at_site / n_images),
            "lesion_n_images": count(lesion_codes[j] == lesion_codes[i]),
        }


# --------------------------------------------------------------------------- model


def _auto_min_samples_leaf(n: int) -> int:
    # 100 on ISIC 2020 (26k training rows per fold); smaller cohorts get proportionally smaller leaves.
    return int(np.clip(n // 250, 5, 100))


class MetaModel:
    """Gradient-boosted trees on :func:`meta_features` output (scikit-learn style).

    ``HistGradientBoostingClassifier`` with native categorical splits on ``sex`` and ``site`` and
    missing-value support. Hyper-parameters (defaults in :data:`DEFAULT_PARAMS`) were picked by
    patient-grouped 5-fold CV on ISIC 2020: shallow trees (8 leaves), large leaves, L2 1.0, a small
    learning rate and no early stopping (its validation split would not be grouped by patient and would
    make the fit depend on a random split). ``min_samples_leaf="auto"`` means ``clip(n_rows // 250, 5, 100)``.

    Attributes after ``fit``: ``feature_names_in_`` (list[str]), ``categorical_`` (list[str]),
    ``categories_`` (dict column -> list of category strings), ``estimator_`` (the sklearn model),
    ``min_samples_leaf_`` (int), ``classes_`` (array([0, 1])).
    """

    def __init__(
        self,
        *,
        learning_rate: float = 0.03,
        max_iter: int = 300,
        max_leaf_nodes: int = 8,
        min_samples_leaf: int | str = "auto",
        l2_regularization: float = 1.0,
        random_state: int = 0,
    ):
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.random_state = random_state

    # sklearn's clone/get_params protocol without inheriting (keeps the class plain).
    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in DEFAULT_PARAMS}

    def set_params(self, **params) -> "MetaModel":
        for key, value in params.items():
            if key not in DEFAULT_PARAMS:
                raise ConfigError(f"MetaModel has no parameter {key!r}; parameters: {', '.join(DEFAULT_PARAMS)}")
            setattr(self, key, value)
        return self

    def _check_params(self) -> None:
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1):
            raise ConfigError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ConfigError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (isinstance(self.max_leaf_nodes, int) and self.max_leaf_nodes >= 2):
            raise ConfigError(f"max_leaf_nodes must be an integer >= 2, got {self.max_leaf_nodes!r}")
        if self.min_samples_leaf != "auto" and not (
            isinstance(self.min_samples_leaf, int) and self.min_samples_leaf >= 1
        ):
            raise ConfigError(f"min_samples_leaf must be 'auto' or an integer >= 1, got {self.min_samples_leaf!r}")
        if not (isinstance(self.l2_regularization, (int, float)) and self.l2_regularization >= 0):
            raise ConfigError(f"l2_regularization must be >= 0, got {self.l2_regularization!r}")

    def _encode(self, X: pd.DataFrame) -> np.ndarray:
        if not isinstance(X, pd.DataFrame):
            raise MelcoreError(f"MetaModel expects the DataFrame returned by meta_features, not {type(X).__name__}")
        missing = [c for c in self.feature_names_in_ if c not in X.columns]
        if missing:
            hint = (
                " (ugly-duckling features: pass image_scores/embeddings as at training)"
                if any(c.startswith("ud_") for c in missing)
                else ""
            )
            raise MelcoreError(f"feature column(s) {', '.join(missing)} missing from the input{hint}")
        out = np.empty((len(X), len(self.feature_names_in_)), dtype=float)
        for j, column in enumerate(self.feature_names_in_):
            if column in self.categorical_:
                lookup = {v: i for i, v in enumerate(self.categories_[column])}
                values = _clean_str(X[column].tolist())
                out[:, j] = [lookup.get(str(v).lower(), np.nan) if v is not None else np.nan for v in values]
            else:
                values = pd.to_numeric(pd.Series(X[column].tolist(), dtype=object), errors="coerce")
                out[:, j] = values.to_numpy(float)
        return out

    def _build(self, n_rows: int):
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.min_samples_leaf_ = (
            _auto_min_samples_leaf(n_rows) if self.min_samples_leaf == "auto" else int(self.min_samples_leaf)
        )
        mask = np.array([c in self.categorical_ for c in self.feature_names_in_])
        return HistGradientBoostingClassifier(
            learning_rate=float(self.learning_rate),
            max_iter=int(self.max_iter),
            max_leaf_nodes=int(self.max_leaf_nodes),
            min_samples_leaf=self.min_samples_leaf_,
            l2_regularization=float(self.l2_regularization),
            early_stopping=False,
            categorical_features=mask if mask.any() else None,
            random_state=int(self.random_state),
        )

    def fit(self, X: pd.DataFrame, y) -> "MetaModel":
        """Fit on ``X`` (DataFrame from :func:`meta_features`) and ``y`` (0/1 per row, no missing)."""
        self._check_params()
        if not isinstance(X, pd.DataFrame):
            raise MelcoreError(f"MetaModel.fit expects the DataFrame returned by meta_features, not {type(X).__name__}")
        y = _binary_targets(y, len(X))
        self.feature_names_in_ = [str(c) for c in X.columns]
        self.categorical_ = [
            c for c in self.feature_names_in_ if c in CATEGORICAL_FEATURES or not pd.api.types.is_numeric_dtype(X[c])
        ]
        self.categories_ = {}
        for column in self.categorical_:
            values = pd.Series([str(v).lower() for v in _clean_str(X[column].tolist()) if v is not None])
            # HistGradientBoosting allows at most 255 categories; rarer ones are treated as missing.
            self.categories_[column] = sorted(values.value_counts().index[:250].tolist())
        return self._fit_encoded(self._encode(X), y)

    def _fit_encoded(self, Xe: np.ndarray, y: np.ndarray) -> "MetaModel":
        from threadpoolctl import threadpool_limits

        estimator = self._build(len(y))  # imports sklearn's OpenMP code before the thread limit is set
        # One OpenMP thread: the model is small, and on a shared machine OpenMP's spinning threads cost
        # several times the CPU of a serial fit. Results do not depend on the thread count.
        with threadpool_limits(limits=1, user_api="openmp"):
            self.estimator_ = estimator.fit(Xe, y)
        self.classes_ = np.array([0, 1])
        self._train = (Xe, y)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "estimator_"):
            raise MelcoreError("this MetaModel is not fitted yet; call fit(meta_features(...), y) or MetaModel.load")

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """Probabilities, shape (n_rows, 2) float64; column 1 is P(malignant)."""
        self._check_fitted()
        return self._predict_encoded(self._encode(X))

    def _predict_encoded(self, Xe: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="openmp"):
            return self.estimator_.predict_proba(Xe)

    def predict(self, X: pd.DataFrame, threshold: float = 0.5) -> np.ndarray:
        """0/1 per row (P(malignant) >= threshold), int64."""
        return (self.predict_proba(X)[:, 1] >= threshold).astype(np.int64)

    def predict_table(self, table, image_scores=None, embeddings=None, *, feature_set: str | None = None) -> pd.Series:
        """Features from a lesion table, then P(malignant) per image: Series indexed by image_name.

        Patient-context features describe the patient's images *in this table*: pass all of a patient's
        images (scored or not), not a single row, or the context is lost.
        """
        self._check_fitted()
        fs = feature_set or _feature_set_of(self.feature_names_in_)
        needs_scores = any(c in UGLY_DUCKLING_FEATURES for c in self.feature_names_in_)
        needs_emb = any(c in EMBEDDING_FEATURES for c in self.feature_names_in_)
        if needs_scores and image_scores is None:
            raise MelcoreError("this meta model was trained with image-score features; pass image_scores")
        if needs_emb and embeddings is None:
            raise MelcoreError("this meta model was trained with embedding features; pass embeddings")
        features = meta_features(
            table, image_scores if needs_scores else None, embeddings if needs_emb else None, feature_set=fs
        )
        frame, _ = table_and_groups(table)
        return pd.Series(
            self.predict_proba(features)[:, 1],
            index=pd.Index(_image_names(frame), name="image_name"),
            name="prediction",
        )

    # ---- persistence (no pickle)
    def save(self, directory) -> Path:
        """Write ``meta_model.json`` and ``meta_model_train.npz`` into ``directory``; returns the JSON path."""
        self._check_fitted()
        import sklearn

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        Xe, y = self._train
        p_train = self._predict_encoded(Xe)[:, 1]
        np.savez_compressed(directory / "meta_model_train.npz", X=Xe, y=y.astype(np.int8), p_train=p_train)
        doc = {
            "format": "melreview-meta-model",
            "version": 1,
            "params": self.get_params(),
            "feature_names": self.feature_names_in_,
            "categorical": self.categorical_,
            "categories": self.categories_,
            "n_train": int(len(y)),
            "n_positive": int(y.sum()),
            "train_sha256": _digest(Xe, y),
            "sklearn_version": sklearn.__version__,
            "how_to_load": "MetaModel.load(dir) refits on meta_model_train.npz and checks p_train",
        }
        path = directory / "meta_model.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    @classmethod
    def load(cls, directory, *, tolerance: float = 1e-6) -> "MetaModel":
        """Rebuild a saved model by refitting on its stored training matrix; raises ConfigError unless the
        refit reproduces the saved training-set predictions within ``tolerance``."""
        import sklearn

        directory = Path(directory)
        path = directory / "meta_model.json"
        data_path = directory / "meta_model_train.npz"
        for p in (path, data_path):
            if not p.is_file():
                raise ConfigError(
                    f"{p} not found: {directory} does not hold a saved meta model "
                    "(train one with python -m melcore train-meta)"
                )
        doc = json.loads(path.read_text())
        if doc.get("format") != "melreview-meta-model" or doc.get("version") != 1:
            raise ConfigError(
                f"{path}: not a melreview meta model (format {doc.get('format')!r}, version {doc.get('version')!r})"
            )
        with np.load(data_path, allow_pickle=False) as arrays:
            Xe, y, p_saved = arrays["X"].astype(float), arrays["y"].astype(np.int64), arrays["p_train"]
        if _digest(Xe, y) != doc["train_sha256"]:
            raise ConfigError(
                f"{data_path}: training data does not match the checksum in {path.name}; "
                "the files were changed or mixed from two runs"
            )
        model = cls(**{k: v for k, v in doc["params"].items() if k in DEFAULT_PARAMS})
        model.feature_names_in_ = list(doc["feature_names"])
        model.categorical_ = list(doc["categorical"])
        model.categories_ = {k: list(v) for k, v in doc["categories"].items()}
        model._fit_encoded(Xe, y)
        diff = float(np.max(np.abs(model._predict_encoded(Xe)[:, 1] - p_saved))) if len(y) else 0.0
        if diff > tolerance:
            raise ConfigError(
                f"{path}: refitting does not reproduce the saved model (max difference {diff:.2g}; "
                f"saved with scikit-learn {doc.get('sklearn_version')}, this is "
                f"{sklearn.__version__}); install that version or retrain with train-meta"
            )
        return model


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def _digest(Xe: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(Xe, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int8).tobytes())
    return h.hexdigest()


def _feature_set_of(columns: Sequence[str]) -> str:
    base = [c for c in columns if c not in UGLY_DUCKLING_FEATURES and c not in EMBEDDING_FEATURES]
    for name, cols in FEATURE_SETS.items():
        if list(cols) == base:
            return name
    raise MelcoreError(
        f"the model's features {base} are not one of the feature sets {', '.join(FEATURE_SETS)}; "
        "compute them with meta_features and call predict_proba"
    )


def _binary_targets(y, n: int) -> np.ndarray:
    values = pd.Series(list(y) if not isinstance(y, pd.Series) else y.tolist(), dtype=object)
    if len(values) != n:
        raise MelcoreError(f"y has {len(values)} values but X has {n} rows")
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | ~numeric.isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise MelcoreError(
            f"targets must be 0 or 1 with no missing values; row {i} has {values.iloc[i]!r} "
            f"({int(bad.sum())} such rows); train on cohort.labelled()"
        )
    return numeric.to_numpy().astype(np.int64)


# --------------------------------------------------------------------------- learning from missingness

#: Missing-value rates of a field differing by at least this between the classes make the model able to
#: score the label from the gap alone.
MISSING_CLASS_GAP = 0.2
#: Missing-value rates differing by at least this between clinics/sources make missingness name the source.
MISSING_SOURCE_GAP = 0.5
_MISSING_FIELDS = (("age_approx", "age"), ("sex", "sex"), ("site", "site"))


def missingness_warnings(
    cohort, *, class_gap: float = MISSING_CLASS_GAP, source_gap: float = MISSING_SOURCE_GAP, min_share: float = 0.05
) -> list[str]:
    """Warnings when a metadata model can learn from missing age, sex or site instead of their values.

    A gradient-boosted model splits on "missing" like on any value: when age is missing for
    30% of the melanomas and 2% of the rest, or for every image of one source and none of
    another (a source without melanoma, say), "age unknown" scores the label or the source.

    Parameters
    ----------
    cohort : Cohort or DataFrame (labelled rows are read; ``age_approx``, ``sex``, ``site``, ``clinic``)
    class_gap : warn when a field's missing rate differs by at least this between the classes.
    source_gap : warn when it differs by at least this between two clinics/sources each holding at
        least ``min_share`` of the labelled images.

    Returns
    -------
    list of str, one per field and reason (empty when missingness says nothing).
    """
    table, _, labelled, y = _labelled_frame(cohort)
    lab = table[labelled].reset_index(drop=True)
    warnings: list[str] = []
    if len(y) == 0:
        return warnings
    clinics = pd.Series(_column(lab, "clinic"), dtype=object)
    for column, word in _MISSING_FIELDS:
        values = _ages(lab) if column == "age_approx" else _column(lab, column)
        missing = pd.isna(pd.Series(values, dtype=object)).to_numpy()
        if not missing.any():
            continue
        if (y == 1).any() and (y == 0).any():
            positive, negative = missing[y == 1].mean(), missing[y == 0].mean()
            if abs(positive - negative) >= class_gap:
                warnings.append(
                    f"{word} is missing for {positive:.0%} of the melanomas but {negative:.0%} of the "
                    f"other images: a metadata model can score the label from '{word} unknown' alone"
                )
        known = clinics.notna().to_numpy()
        if known.any():
            rates = pd.Series(missing[known]).groupby(clinics[known].astype(str).to_numpy()).agg(["mean", "size"])
            rates = rates[rates["size"] >= min_share * len(y)]
            if len(rates) >= 2 and rates["mean"].max() - rates["mean"].min() >= source_gap:
                most, least = rates["mean"].idxmax(), rates["mean"].idxmin()
                warnings.append(
                    f"{word} is missing for {rates.loc[most, 'mean']:.0%} of clinic/source {most!r} "
                    f"but {rates.loc[least, 'mean']:.0%} of {least!r}: '{word} unknown' identifies "
                    "the source, so a metadata model can score where an image comes from (judge it "
                    "within a source)"
                )
    return warnings


# --------------------------------------------------------------------------- cross-validation


@dataclass
class MetaResult:
    """Out-of-fold result of :func:`cross_validate_meta`.

    ``oof``: DataFrame[image_name, patient_id, clinic, target (int), prediction (float 0..1), fold (int)], one
    row per labelled image, in table order. ``oof_auroc``: AUROC of all OOF predictions pooled.
    ``fold_aurocs``: per fold (None when a fold has one class). ``per_clinic``: clinic -> {n, n_positive,
    auroc}. ``features``: the feature matrix of the labelled rows (same order as ``oof``).
    """

    oof: pd.DataFrame
    oof_auroc: float | None
    fold_aurocs: list
    feature_names: list
    feature_set: str = "context"
    params: dict = field(default_factory=dict)
    per_clinic: dict = field(default_factory=dict)
    n_folds: int = 5
    seed: int = 0
    n_groups: int = 0
    seconds: float = 0.0
    features: pd.DataFrame | None = field(default=None, repr=False)
    targets: np.ndarray | None = field(default=None, repr=False)

    def metrics(self) -> dict:
        """JSON-ready summary (what ``metrics.json`` holds)."""
        return {
            "oof_auroc": self.oof_auroc,
            "fold_aurocs": self.fold_aurocs,
            "n": int(len(self.oof)),
            "n_positive": int(self.oof["target"].sum()),
            "n_groups": self.n_groups,
            "n_folds": self.n_folds,
            "seed": self.seed,
            "feature_set": self.feature_set,
            "features": list(self.feature_names),
            "params": self.params,
            "per_clinic": self.per_clinic,
            "seconds": round(self.seconds, 2),
        }


def _per_clinic(oof: pd.DataFrame, column: str = "prediction") -> dict:
    clinics = oof["clinic"].astype(object).where(oof["clinic"].notna(), "(none)")
    out = {}
    for clinic, part in oof.groupby(clinics, sort=True):
        y = part["target"].to_numpy()
        out[str(clinic)] = {
            "n": int(len(part)),
            "n_positive": int(y.sum()),
            "auroc": auroc_or_none(y, part[column].to_numpy()),
        }
    return out


def _labelled_frame(cohort) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """(table, groups, labelled mask, targets of labelled rows) of a Cohort or DataFrame."""
    table, groups = table_and_groups(cohort, "cohort")
    if "target" not in table.columns:
        raise CohortError("the cohort has no target column; the meta model needs labelled images")
    target = pd.to_numeric(pd.Series(table["target"].tolist(), dtype=object), errors="coerce")
    bad = target.notna() & ~target.isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise CohortError(f"target must be 0, 1 or empty; row {i} has {table['target'].iloc[i]!r}")
    labelled = target.notna().to_numpy()
    pk = groups.astype(str).to_numpy()
    return table, pk, labelled, target[labelled].to_numpy().astype(np.int64)


def _folds(groups: np.ndarray, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    if not isinstance(n_folds, int) or n_folds < 2:
        raise ConfigError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise CohortError(f"{n_groups} patient group(s) cannot fill {n_folds} folds; use fewer folds or more patients")
    folds = np.asarray(group_kfold(pd.Series(groups), pd.Series(y), n_folds=n_folds, seed=seed)).astype(int)
    # Re-check the contract: a patient never spans two folds.
    per_group = pd.Series(folds).groupby(groups).nunique()
    if (per_group > 1).any():
        raise LeakageError(f"group_kfold put patient {per_group[per_group > 1].index[0]!r} in two folds")
    return folds


def cross_validate_meta(
    cohort,
    n_folds: int = 5,
    seed: int = 0,
    image_scores=None,
    progress: Progress | None = None,
    *,
    embeddings=None,
    feature_set: str = "context",
    params: Mapping | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MetaResult:
    """Patient-grouped K-fold out-of-fold predictions of :class:`MetaModel` for every labelled image.

    Parameters
    ----------
    cohort : Cohort or DataFrame
        Unlabelled rows (target <NA>) still count as context (a patient's other images) but are not
        predicted or scored.
    n_folds, seed : folds from ``melcore.splits.group_kfold(groups, targets, n_folds, seed)`` on the labelled
        rows (a patient never spans two folds; stratified by whether the patient has a melanoma).
    image_scores, embeddings : optional, see :func:`meta_features` (must be out-of-fold image scores).
    progress : callable(done_folds, n_folds), optional; called after each fold.
    feature_set : name in :data:`FEATURE_SETS`.
    params : overrides of :data:`DEFAULT_PARAMS`.
    should_stop : callable() -> bool, optional; asked before each fold. When it answers True,
        :class:`~melcore.errors.CancelledError` is raised.

    Returns
    -------
    MetaResult
    """
    started = time.perf_counter()
    table, pk, labelled, y = _labelled_frame(cohort)
    if len(y) == 0 or y.min() == y.max():
        raise CohortError(
            f"the meta model needs labelled benign and malignant images; the cohort has "
            f"{int((y == 0).sum())} benign and {int((y == 1).sum())} malignant labelled images"
        )
    params = {**DEFAULT_PARAMS, **dict(params or {})}
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise ConfigError(
            f"unknown meta model parameter(s) {', '.join(sorted(unknown))}; choose from {', '.join(DEFAULT_PARAMS)}"
        )
    features_all = meta_features(cohort, image_scores, embeddings, feature_set=feature_set)
    X = features_all[labelled]
    groups = pk[labelled]
    folds = _folds(groups, y, n_folds, seed)
    prediction = np.full(len(y), np.nan)
    fold_aurocs: list = []
    for k in range(n_folds):
        if should_stop is not None and should_stop():
            raise CancelledError(f"stopped on request after {k} of {n_folds} folds")
        train, val = folds != k, folds == k
        if not val.any():
            fold_aurocs.append(None)
        else:
            if y[train].min() == y[train].max():
                raise CohortError(f"fold {k} leaves only one class to train on; use fewer folds")
            model = MetaModel(**params).fit(X[train], y[train])
            prediction[val] = model.predict_proba(X[val])[:, 1]
            fold_aurocs.append(auroc_or_none(y[val], prediction[val]))
        if progress is not None:
            progress(k + 1, n_folds)
    lab = table[labelled]
    oof = pd.DataFrame(
        {
            "image_name": _image_names(lab),
            "patient_id": _column(lab, "patient_id"),
            "clinic": _column(lab, "clinic"),
            "target": y,
            "prediction": prediction,
            "fold": folds,
        }
    )
    return MetaResult(
        oof=oof,
        oof_auroc=auroc_or_none(y, prediction),
        fold_aurocs=fold_aurocs,
        feature_names=list(X.columns),
        feature_set=feature_set,
        params=params,
        per_clinic=_per_clinic(oof),
        n_folds=n_folds,
        seed=seed,
        n_groups=len(set(groups)),
        seconds=time.perf_counter() - started,
        features=X.reset_index(drop=True),
        targets=y,
    )


# --------------------------------------------------------------------------- fusion

FUSION_BASE = ("logit_image", "logit_meta", "ud_score_z", "ud_score_rank", "ud_score_minus_median", "has_other_lesions")
FUSION_EMBEDDING = ("ud_emb_z", "ud_emb_cosine")


def fusion_features(table, image_scores, meta_scores, embeddings=None) -> pd.DataFrame:
    """Inputs of the stacked fusion, one row per table row (same index).

    ``logit_image``/``logit_meta``: logits of the image score and the meta score (NaN when absent);
    ``ud_score_z``, ``ud_score_minus_median`` (0 when the patient has no other scored lesion),
    ``ud_score_rank`` (0.5 then), ``has_other_lesions`` (0/1); with embeddings ``ud_emb_z`` and
    ``ud_emb_cosine`` (0 when undefined).
    """
    frame, groups = table_and_groups(table)
    names = _image_names(frame)
    pk, lk = _patient_lesion_keys(frame, groups)
    img = _align_scores(names, image_scores, "image_scores")
    meta = _align_scores(names, meta_scores, "meta_scores")
    emb = _align_embeddings(names, embeddings) if embeddings is not None else None
    ud = _ugly_duckling_frame(pk, lk, img, emb)
    out = pd.DataFrame(index=frame.index)
    out["logit_image"] = np.where(np.isfinite(img), _logit(img), np.nan)
    out["logit_meta"] = np.where(np.isfinite(meta), _logit(meta), np.nan)
    has_other = np.isfinite(ud["ud_score_z"].to_numpy())
    out["ud_score_z"] = np.nan_to_num(ud["ud_score_z"].to_numpy(), nan=0.0)
    out["ud_score_rank"] = np.where(has_other, ud["ud_score_rank"].to_numpy(), 0.5)
    out["ud_score_minus_median"] = np.nan_to_num(ud["ud_score_minus_median"].to_numpy(), nan=0.0)
    out["has_other_lesions"] = has_other.astype(float)
    if emb is not None:
        out["ud_emb_z"] = np.nan_to_num(ud["ud_emb_z"].to_numpy(), nan=0.0)
        out["ud_emb_cosine"] = np.nan_to_num(ud["ud_emb_cosine"].to_numpy(), nan=0.0)
    return out


class FusionModel:
    """Logistic regression on standardised :func:`fusion_features` (L2, ``C``); JSON round-trip, no pickle."""

    def __init__(self, C: float = 1.0):
        if not (isinstance(C, (int, float)) and C > 0):
            raise ConfigError(f"fusion C must be > 0, got {C!r}")
        self.C = C

    def fit(self, Z: pd.DataFrame, y) -> "FusionModel":
        from sklearn.linear_model import LogisticRegression

        y = _binary_targets(y, len(Z))
        values = Z.to_numpy(float)
        if not np.isfinite(values).all():
            raise MelcoreError("fusion inputs contain NaN: every row needs both an image and a meta score")
        self.feature_names_ = list(Z.columns)
        self.mean_ = values.mean(axis=0)
        scale = values.std(axis=0)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        lr = LogisticRegression(C=float(self.C), max_iter=1000).fit((values - self.mean_) / self.scale_, y)
        self.coef_ = lr.coef_[0].astype(float)
        self.intercept_ = float(lr.intercept_[0])
        return self

    def predict_proba(self, Z: pd.DataFrame) -> np.ndarray:
        """(n, 2) probabilities; column 1 is P(malignant)."""
        if not hasattr(self, "coef_"):
            raise MelcoreError("this FusionModel is not fitted yet")
        missing = [c for c in self.feature_names_ if c not in Z.columns]
        if missing:
            raise MelcoreError(f"fusion input lacks column(s) {', '.join(missing)}")
        values = Z[self.feature_names_].to_numpy(float)
        z = ((values - self.mean_) / self.scale_) @ self.coef_ + self.intercept_
        p = expit(z)
        return np.column_stack([1 - p, p])

    def coefficients(self) -> dict:
        """Standardised coefficient per input (log-odds per standard deviation) and the intercept."""
        return {**{n: float(c) for n, c in zip(self.feature_names_, self.coef_)}, "intercept": self.intercept_}

    def to_dict(self) -> dict:
        return {
            "format": "melreview-fusion",
            "version": 1,
            "C": self.C,
            "feature_names": self.feature_names_,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
        }

    @classmethod
    def from_dict(cls, doc: Mapping) -> "FusionModel":
        if doc.get("format") != "melreview-fusion":
            raise ConfigError(f"not a melreview fusion model (format {doc.get('format')!r})")
        model = cls(C=doc["C"])
        model.feature_names_ = list(doc["feature_names"])
        model.mean_ = np.asarray(doc["mean"], float)
        model.scale_ = np.asarray(doc["scale"], float)
        model.coef_ = np.asarray(doc["coef"], float)
        model.intercept_ = float(doc["intercept"])
        return model


@dataclass
class FusionResult:
    """Out-of-fold result of :func:`fuse`.

    ``oof``: DataFrame[image_name, patient_id, clinic, target, prediction (fused), fold, image_score,
    meta_prediction, ugly_duckling] for labelled rows with both scores. AUROCs are pooled out-of-fold.
    ``model``: the fusion fitted on all those rows (for new patients); ``coefficients`` its weights.
    """

    oof: pd.DataFrame
    oof_auroc: float | None
    fold_aurocs: list
    image_auroc: float | None
    meta_auroc: float | None
    feature_names: list
    coefficients: dict
    model: FusionModel
    per_clinic: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return {
            "oof_auroc": self.oof_auroc,
            "fold_aurocs": self.fold_aurocs,
            "image_auroc": self.image_auroc,
            "meta_auroc": self.meta_auroc,
            "n": int(len(self.oof)),
            "n_positive": int(self.oof["target"].sum()),
            "features": list(self.feature_names),
            "coefficients": self.coefficients,
            "per_clinic": self.per_clinic,
        }


def fuse(
    cohort,
    image_scores,
    meta_scores,
    *,
    embeddings=None,
    n_folds: int = 5,
    seed: int = 0,
    folds: np.ndarray | None = None,
    C: float = 1.0,
    progress: Progress | None = None,
) -> FusionResult:
    """Stack image and meta scores (plus ugly-duckling features) with a cross-validated logistic regression.

    Parameters
    ----------
    cohort : Cohort or DataFrame (labelled rows are fused; all rows give patient context).
    image_scores : DataFrame[image_name, prediction] / Series; out-of-fold image-model probabilities.
    meta_scores : MetaResult, or DataFrame[image_name, prediction(, fold)]; out-of-fold meta probabilities.
        When it has a ``fold`` column (a MetaResult always does) those patient folds are reused, so the
        fusion's validation patients were also unseen by the meta model of that fold.
    folds : ndarray of fold ids for the labelled rows with both scores, optional (overrides the above).
    n_folds, seed : used for ``group_kfold`` when no folds are known.
    C : inverse L2 strength of the logistic regression.

    Returns
    -------
    FusionResult with out-of-fold fused predictions (second-level grouped CV) and the model refit on all rows.
    """
    meta_frame = meta_scores.oof if isinstance(meta_scores, MetaResult) else meta_scores
    table, pk, labelled, y_all = _labelled_frame(cohort)
    Z_all = fusion_features(
        cohort,
        image_scores,
        meta_frame[["image_name", "prediction"]]
        if isinstance(meta_frame, pd.DataFrame) and "image_name" in meta_frame.columns
        else meta_frame,
        embeddings,
    )
    ud = ugly_duckling_scores(cohort, image_scores, embeddings)
    Z_lab = Z_all[labelled].reset_index(drop=True)
    usable = (np.isfinite(Z_lab["logit_image"]) & np.isfinite(Z_lab["logit_meta"])).to_numpy()
    Z = Z_lab[usable].reset_index(drop=True)
    y = y_all[usable]
    groups = pk[labelled][usable]
    lab = table[labelled]
    names = _image_names(lab)[usable]
    if len(y) == 0 or y.min() == y.max():
        raise CohortError(
            f"fusion needs labelled benign and malignant images with both an image and a meta "
            f"score; found {int((y == 0).sum())} benign and {int((y == 1).sum())} malignant"
        )
    if folds is None and isinstance(meta_frame, pd.DataFrame) and "fold" in meta_frame.columns:
        fold_map = meta_frame.set_index(meta_frame["image_name"].astype(str))["fold"]
        mapped = pd.Series(names).map(fold_map)
        if mapped.notna().all():
            folds = mapped.to_numpy().astype(int)
    if folds is None:
        folds = _folds(groups, y, n_folds, seed)
    folds = np.asarray(folds).astype(int)
    if len(folds) != len(y):
        raise ConfigError(f"folds has {len(folds)} entries for {len(y)} fused rows")
    fold_ids = sorted(set(folds.tolist()))
    prediction = np.full(len(y), np.nan)
    fold_aurocs = []
    for i, k in enumerate(fold_ids):
        train, val = folds != k, folds == k
        if y[train].min() == y[train].max():
            raise CohortError(f"fusion fold {k} leaves only one class to train on; use fewer folds")
        model = FusionModel(C).fit(Z[train], y[train])
        prediction[val] = model.predict_proba(Z[val])[:, 1]
        fold_aurocs.append(auroc_or_none(y[val], prediction[val]))
        if progress is not None:
            progress(i + 1, len(fold_ids))
    final = FusionModel(C).fit(Z, y)
    image_p = expit(Z["logit_image"].to_numpy())
    meta_p = expit(Z["logit_meta"].to_numpy())
    oof = pd.DataFrame(
        {
            "image_name": names,
            "patient_id": _column(lab, "patient_id")[usable],
            "clinic": _column(lab, "clinic")[usable],
            "target": y,
            "prediction": prediction,
            "fold": folds,
            "image_score": image_p,
            "meta_prediction": meta_p,
            "ugly_duckling": ud[labelled].to_numpy()[usable],
        }
    )
    return FusionResult(
        oof=oof,
        oof_auroc=auroc_or_none(y, prediction),
        fold_aurocs=fold_aurocs,
        image_auroc=auroc_or_none(y, image_p),
        meta_auroc=auroc_or_none(y, meta_p),
        feature_names=list(Z.columns),
        coefficients=final.coefficients(),
        model=final,
        per_clinic=_per_clinic(oof),
    )


# --------------------------------------------------------------------------- run directory


def train_meta_run(
    cohort,
    out_dir,
    *,
    n_folds: int = 5,
    seed: int = 0,
    feature_set: str = "context",
    image_scores=None,
    embeddings=None,
    params: Mapping | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    config_extra: Mapping | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Cross-validate the meta model, fit it on all labelled images and write a run directory.

    ``should_stop`` (optional) is asked before each fold and before the final fit; when it answers
    True, :class:`~melcore.errors.CancelledError` is raised and ``metrics.json`` is never written.

    Files written to ``out_dir`` (created; must not already hold a run):
    ``config.json``, ``metrics.json`` (``oof_auroc`` of the ``prediction`` column, fold AUROCs, n, features,
    per-clinic AUROC, and with image scores a ``fusion`` block and ``meta_oof_auroc``),
    ``oof_predictions.csv`` (image_name, patient_id, clinic, target, prediction, fold; with image scores
    ``meta_prediction``, ``image_score`` and ``ugly_duckling`` are added and ``prediction`` is the fused score
    when every labelled image has an image score, else it stays the meta score and ``fused_prediction`` is
    added, NaN where an image has no score),
    ``meta_model.json`` + ``meta_model_train.npz`` (see :meth:`MetaModel.save`), ``fusion.json`` (with image
    scores) and ``train.log``. Returns the metrics dict.
    """
    import sklearn

    out = Path(out_dir)
    if (out / "metrics.json").exists() or (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a run (config.json/metrics.json); choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(message: str, echo: bool = True) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        lines.append(line)
        (out / "train.log").write_text("\n".join(lines) + "\n")
        if log is not None and echo:
            log(message)

    params = {**DEFAULT_PARAMS, **dict(params or {})}
    config = {
        "kind": "meta",
        "feature_set": feature_set,
        "n_folds": n_folds,
        "seed": seed,
        "params": params,
        "image_scores": image_scores is not None,
        "embeddings": embeddings is not None,
        "sklearn_version": sklearn.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(config_extra or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    table, _, labelled, y = _labelled_frame(cohort)
    say(
        f"meta model: {int(labelled.sum())} labelled images ({int(y.sum())} malignant) of {len(table)}, "
        f"{n_folds} patient-grouped folds, seed {seed}, features {feature_set}"
        + (", with image scores" if image_scores is not None else "")
        + (", with embeddings" if embeddings is not None else "")
    )

    def fold_done(done: int, total: int) -> None:
        say(f"fold {done}/{total} done", echo=progress is None)
        if progress is not None:
            progress(done, total)

    result = cross_validate_meta(
        cohort,
        n_folds,
        seed,
        image_scores,
        fold_done,
        embeddings=embeddings,
        feature_set=feature_set,
        params=params,
        should_stop=should_stop,
    )
    if should_stop is not None and should_stop():
        raise CancelledError(f"stopped on request after {n_folds} of {n_folds} folds, before the final fit")
    for k, a in enumerate(result.fold_aurocs):
        say(f"fold {k} AUROC {format_auroc(a)}")
    say(f"meta OOF AUROC {format_auroc(result.oof_auroc)}")
    metrics = result.metrics()
    metrics["model"] = "meta"
    metrics["meta_oof_auroc"] = result.oof_auroc
    metrics["melcore_version"] = melcore.__version__
    metrics["missingness_warnings"] = missingness_warnings(cohort)
    for warning in metrics["missingness_warnings"]:
        say(f"warning: {warning}", echo=False)
    oof = result.oof
    final = MetaModel(**params).fit(result.features, result.targets)
    final.save(out)
    if image_scores is not None:
        fusion = fuse(cohort, image_scores, result, embeddings=embeddings, n_folds=n_folds, seed=seed)
        (out / "fusion.json").write_text(json.dumps(fusion.model.to_dict(), indent=2))
        fused = fusion.oof.set_index("image_name")
        oof = oof.set_index("image_name")
        oof["meta_prediction"] = oof["prediction"]
        oof["image_score"] = fused["image_score"]
        oof["ugly_duckling"] = fused["ugly_duckling"]
        oof["fused_prediction"] = fused["prediction"]
        oof = oof.reset_index()
        metrics["fusion"] = fusion.metrics()
        if oof["fused_prediction"].notna().all():
            oof["prediction"] = oof["fused_prediction"]
            oof = oof.drop(columns=["fused_prediction"])
            metrics["model"] = "meta+image fusion"
            metrics["oof_auroc"] = auroc_or_none(oof["target"].to_numpy(), oof["prediction"].to_numpy())
            metrics["fold_aurocs"] = [
                auroc_or_none(part["target"].to_numpy(), part["prediction"].to_numpy())
                for _, part in oof.groupby("fold", sort=True)
            ]
            metrics["per_clinic"] = _per_clinic(oof)
        else:
            # Fused and meta probabilities are on different scales, so they are not pooled into one
            # column: the run's prediction stays the meta score and the fusion is reported on its own rows.
            say(
                f"{int(oof['fused_prediction'].isna().sum())} labelled image(s) have no image score: "
                "prediction = meta score; fused_prediction only where an image score exists"
            )
        say(
            f"image AUROC {_fmt(fusion.image_auroc)} and meta AUROC {_fmt(fusion.meta_auroc)} on "
            f"{len(fusion.oof)} images with both; fused OOF AUROC {_fmt(fusion.oof_auroc)}"
        )
    oof.to_csv(out / "oof_predictions.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    say(f"wrote {out}")
    return metrics


# --------------------------------------------------------------------------- background jobs

META_JOB_DEFAULTS = {"n_folds": 5, "seed": 0, "feature_set": "context", "image_run_id": None}
"""Config of a ``meta`` job (``trainers.worker``): folds, fold seed, feature set, and the run whose
stored predictions are the image scores for the ugly-duckling features and the fusion (None: none)."""


def meta_job_config(values: Mapping | None) -> dict:
    """A validated ``meta`` job config: :data:`META_JOB_DEFAULTS` updated with ``values``.

    Raises ConfigError naming the bad key and the accepted values.
    """
    values = dict(values or {})
    unknown = set(values) - set(META_JOB_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"unknown patient-context job setting(s) {', '.join(sorted(unknown))}; use {', '.join(META_JOB_DEFAULTS)}"
        )
    config = {**META_JOB_DEFAULTS, **values}

    def whole(key: str, low: int, high: int | None = None) -> int:
        value = config[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or value < low
            or (high is not None and value > high)
        ):
            span = f"{low}-{high}" if high is not None else f"{low} or more"
            raise ConfigError(f"{key} must be a whole number {span}; got {value!r}")
        return int(value)

    config["n_folds"] = whole("n_folds", 2, 20)
    config["seed"] = whole("seed", 0)
    if config["feature_set"] not in FEATURE_SETS:
        raise ConfigError(f"feature_set {config['feature_set']!r} is unknown; choose {', '.join(FEATURE_SETS)}")
    if config["image_run_id"] is not None:
        config["image_run_id"] = whole("image_run_id", 1)
    return config


def stored_image_scores(store, run_id: int) -> tuple[pd.DataFrame, str]:
    """A run's stored predictions as image scores for :func:`train_meta_run`, and the split used.

    Out-of-fold predictions (every image, from a K-fold run) when the run has them, else its
    validation predictions (then only those images get ugly-duckling features and a fused score).
    Returns (DataFrame[image_name, prediction], "oof" or "val"); raises MelcoreError when the run
    stored neither.
    """
    for split in ("oof", "val"):
        frame = store.get_predictions(run_id, split=split)
        if len(frame):
            return frame[["image_name", "prediction"]].reset_index(drop=True), split
    raise MelcoreError(
        f"run #{run_id} has no stored predictions to use as image scores; choose a run that "
        "finished with validation or out-of-fold predictions (a K-fold run scores every image)"
    )
