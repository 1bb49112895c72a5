"""Metadata and patient-context features: age, sex, site and how a lesion sits among the patient's others.

A dermatologist never judges a lesion alone: a mole that looks unlike the
patient's other moles (the "ugly duckling") or that appears at a later visit is
more suspicious. This module turns a lesion table into such features.

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

No TensorFlow here: the module imports numpy and pandas only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from melcore.cohort import lesion_keys, table_and_groups
from melcore.errors import CohortError, ConfigError, MelcoreError

__all__ = [
    "FEATURE_SETS",
    "FEATURE_HISTORY",
    "FEATURE_SET_LABELS",
    "UGLY_DUCKLING_FEATURES",
    "EMBEDDING_FEATURES",
    "meta_features",
    "ugly_duckling_scores",
    "read_image_scores",
    "read_embeddings",
    # Table and alignment helpers shared by the model, fusion and jobs modules.
    "clean_strings",
    "text_column",
    "image_names",
    "patient_lesion_keys",
    "ages",
    "logit",
    "align_scores",
    "align_embeddings",
    "ugly_duckling_frame",
    "labelled_frame",
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


SCORE_SPREAD_FLOOR = 0.5
"""Logit units added (in quadrature) to the spread of the other lesions' scores in the ugly-duckling
z-score, so a patient whose other lesions all score alike does not give an infinite z."""

_SCORE_COLUMNS = ("prediction", "image_score", "score", "probability")
_EPS = 1e-6


# --------------------------------------------------------------------------- table helpers


def clean_strings(values) -> np.ndarray:
    """Table cells as stripped strings, missing ones as None.

    Parameters
    ----------
    values : sequence of length n
        Cells of one column (any type; ``None``, NaN, ``pd.NA``, ``""``, ``"nan"``, ``"none"`` and
        ``"<na>"`` count as missing).

    Returns
    -------
    ndarray of object, shape (n,)
        ``str(value).strip()``, or None where the cell is missing.
    """
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            out[i] = None
        else:
            s = str(v).strip()
            out[i] = s if s and s.lower() not in ("nan", "none", "<na>") else None
    return out


def text_column(table: pd.DataFrame, name: str) -> np.ndarray:
    """Column ``name`` of ``table`` through :func:`clean_strings`.

    Parameters
    ----------
    table : DataFrame with n rows
    name : str
        Column to read; a missing column reads as all missing.

    Returns
    -------
    ndarray of object, shape (n,)
        Stripped strings, None where the cell (or the whole column) is missing.
    """
    if name not in table.columns:
        return np.full(len(table), None, dtype=object)
    return clean_strings(table[name].tolist())


def image_names(table: pd.DataFrame) -> np.ndarray:
    """The table's ``image_name`` column, checked to key image scores and embeddings.

    Parameters
    ----------
    table : DataFrame with n rows and an ``image_name`` column

    Returns
    -------
    ndarray of str, shape (n,)
        Stripped image names, each present and unique.

    Raises
    ------
    CohortError
        No ``image_name`` column, an empty name, or a name on more than one row.
    """
    if "image_name" not in table.columns:
        raise CohortError(
            f"the lesion table has no image_name column (columns: {', '.join(map(str, table.columns))});"
            " load it with melcore.cohort.load_cohort or rename the image id column to image_name"
        )
    names = clean_strings(table["image_name"].tolist())
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


def patient_lesion_keys(frame: pd.DataFrame, groups: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Patient and lesion keys of each row, the lesion key scoped to its patient.

    Parameters
    ----------
    frame : DataFrame with n rows
        The lesion table (as from :func:`melcore.cohort.table_and_groups`).
    groups : Series of length n
        The patient groups from :func:`melcore.cohort.table_and_groups`.

    Returns
    -------
    patient_keys, lesion_keys : ndarray of str, shape (n,) each
        ``str(group)``, and ``str(group) + "|" +`` :func:`melcore.cohort.lesion_keys` of the row.
    """
    patient = groups.astype(str).to_numpy()
    return patient, (groups.astype(str) + "|" + lesion_keys(frame)).to_numpy().astype(str)


def ages(table: pd.DataFrame) -> np.ndarray:
    """The table's ``age_approx`` in years, checked to be a human age.

    Parameters
    ----------
    table : DataFrame with n rows

    Returns
    -------
    ndarray of float64, shape (n,)
        Age in years (0..130); NaN where it is missing or not a number, all NaN without the column.

    Raises
    ------
    CohortError
        An age below 0 or above 130 years, naming the first such row.
    """
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


def logit(p: np.ndarray) -> np.ndarray:
    """Log-odds ``log(p / (1 - p))`` of probabilities, clipped to ``[1e-6, 1 - 1e-6]`` first.

    Parameters
    ----------
    p : array-like of probabilities in 0..1, any shape

    Returns
    -------
    ndarray of float64, same shape as ``p``
        Finite log-odds (about -13.8..13.8); NaN stays NaN.
    """
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
    frame.index = pd.Index(clean_strings(frame.index.tolist()), dtype=object)
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


def _probabilities(column_values: pd.Series, column: str, what: str) -> pd.Series:
    """``column_values`` as float (NaN where not a number); MelcoreError naming the first image outside 0..1."""
    values = pd.to_numeric(column_values, errors="coerce")
    bad = values.notna() & ((values < 0) | (values > 1))
    if bad.any():
        raise MelcoreError(
            f"{what}: column {column!r} must hold probabilities in 0..1; image "
            f"{values.index[bad.to_numpy()][0]!r} has {values[bad].iloc[0]:g} "
            f"({int(bad.sum())} such rows)"
        )
    return values


def align_scores(names: np.ndarray, image_scores, what: str = "image_scores") -> np.ndarray:
    """Image scores in the order of ``names``.

    Parameters
    ----------
    names : ndarray of str, shape (n,)
        Image names of the table (:func:`image_names`).
    image_scores : DataFrame or Series keyed by image_name
        A probability column (``prediction``, ``image_score``, ``score`` or ``probability``).
    what : str
        How messages call ``image_scores``.

    Returns
    -------
    ndarray of float64, shape (n,)
        Probability 0..1 per name; NaN where an image has no score.

    Raises
    ------
    MelcoreError
        No probability column, a value outside 0..1, or no name in common with ``names``.
    """
    frame = _keyed_frame(image_scores, what)
    column = _score_column(frame, what)
    values = _probabilities(frame[column], column, what)
    aligned = values.reindex(pd.Index(names, dtype=object)).to_numpy(float)
    if len(names) and not np.isfinite(aligned).any():
        raise MelcoreError(
            f"{what}: none of its {len(frame)} image names match an image_name of the table "
            f"(e.g. {frame.index[0]!r} vs {names[0]!r}); pass scores of this cohort's images"
        )
    return aligned


def align_embeddings(names: np.ndarray, embeddings, what: str = "embeddings") -> np.ndarray:
    """Image embeddings in the order of ``names``.

    Parameters
    ----------
    names : ndarray of str, shape (n,)
        Image names of the table (:func:`image_names`).
    embeddings : ndarray of shape (n, d) already aligned, or DataFrame keyed by image_name
        With one numeric column per dimension.
    what : str
        How messages call ``embeddings``.

    Returns
    -------
    ndarray of float64, shape (n, d)
        One row per name; a row of NaN where an image has no embedding.

    Raises
    ------
    MelcoreError
        An array of the wrong shape, no numeric column, or no name in common with ``names``.
    """
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
    scores = _probabilities(keyed[column], column, str(path))
    return pd.DataFrame({"image_name": keyed.index.astype(str), "prediction": scores.to_numpy(float)})


def read_embeddings(path) -> pd.DataFrame:
    """Read a CSV of image embeddings: ``image_name`` plus one numeric column per dimension."""
    path, keyed = _read_keyed_csv(path, "embeddings")
    numeric = [c for c in keyed.columns if pd.api.types.is_numeric_dtype(keyed[c])]
    if not numeric:
        raise MelcoreError(f"{path}: no numeric embedding columns")
    return keyed[numeric].rename_axis("image_name").reset_index()


# --------------------------------------------------------------------------- ugly duckling


def ugly_duckling_frame(
    patient_keys: np.ndarray, lesion_keys: np.ndarray, scores: np.ndarray | None, embeddings: np.ndarray | None
) -> pd.DataFrame:
    """Per-row ugly-duckling features of image scores and embeddings.

    Images of one lesion are averaged first, and each lesion is compared with the patient's *other*
    lesions (leave-one-out), so a lesion photographed twice is not its own neighbour.

    Parameters
    ----------
    patient_keys, lesion_keys : ndarray of str, shape (n,)
        From :func:`patient_lesion_keys`.
    scores : ndarray of float64, shape (n,), or None
        Image probabilities 0..1 (:func:`align_scores`), NaN where missing.
    embeddings : ndarray of float64, shape (n, d), or None
        Image embeddings (:func:`align_embeddings`), NaN rows where missing.

    Returns
    -------
    DataFrame with n rows
        Columns :data:`UGLY_DUCKLING_FEATURES` when ``scores`` is given, :data:`EMBEDDING_FEATURES`
        when ``embeddings`` is; NaN where the patient has fewer than two lesions with a score/embedding.
    """
    n = len(patient_keys)
    lesion_codes, lesion_uniques = pd.factorize(lesion_keys)
    n_lesions = len(lesion_uniques)
    lesion_patient = pd.Series(patient_keys).groupby(lesion_codes).first().to_numpy()
    out: dict[str, np.ndarray] = {}

    def to_rows(per_lesion: dict[str, np.ndarray]) -> None:
        for name, values in per_lesion.items():
            out[name] = values[lesion_codes]

    if scores is not None:
        x_rows = logit(scores)
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
    names = image_names(frame)
    pk, lk = patient_lesion_keys(frame, groups)
    scores = align_scores(names, image_scores)
    emb = align_embeddings(names, embeddings) if embeddings is not None else None
    ud = ugly_duckling_frame(pk, lk, scores, emb)
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
    names = image_names(frame)
    pk, lk = patient_lesion_keys(frame, groups)
    age = ages(frame)
    sex = np.array([s.lower() if s is not None else None for s in text_column(frame, "sex")], dtype=object)
    site = np.array([s.lower() if s is not None else None for s in text_column(frame, "site")], dtype=object)

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
        scores = align_scores(names, image_scores) if image_scores is not None else None
        emb = align_embeddings(names, embeddings) if embeddings is not None else None
        ud = ugly_duckling_frame(pk, lk, scores, emb)
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


def labelled_frame(cohort) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """A cohort's table with its patient keys and labels, for the meta model.

    Parameters
    ----------
    cohort : Cohort or DataFrame
        With a ``target`` column of 0, 1 or empty.

    Returns
    -------
    table : DataFrame with n rows
    patient_keys : ndarray of str, shape (n,)
        ``str`` of :func:`melcore.cohort.table_and_groups`' groups.
    labelled : ndarray of bool, shape (n,)
        Rows whose target is 0 or 1.
    targets : ndarray of int64, shape (labelled.sum(),)
        The targets of the labelled rows, in table order.

    Raises
    ------
    CohortError
        No ``target`` column, or a target other than 0, 1 or empty (naming the row).
    """
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
