"""Shortcut audit: how well label-free acquisition attributes alone predict the label.

Models trained on pooled public dermoscopy data learn where an image comes from instead of the
disease: in derm-real-dev the source (HAM10000 is all benign), and inside one source the
collection (the file-name number alone gives AUROC ~0.69). :func:`shortcut_audit` measures each
acquisition attribute on its own with a patient-grouped cross-validation (folds from
:func:`melcore.splits.group_kfold` on ``Cohort.groups``; a small gradient-boosted model per
attribute, fitted on the training folds only) and reports the pooled out-of-fold AUROC with a
patient-bootstrap CI (:func:`melcore.metrics.auroc_ci`). Above :data:`WARN_AUROC` the row carries a
warning that suggests judging models on a clean subset.

Attributes (those with a single value in the labelled rows are reported as not measurable):

* ``clinic``: the clinic / source column;
* ``file-name prefix``: the letters and separators before the first digit of ``image_name``;
* ``file-name number block``: the first run of digits of ``image_name`` in blocks of
  :data:`NUMBER_BLOCK` (archives number their collections in consecutive blocks);
* ``file format``: the image file's suffix;
* with ``images=True``, read from the files: ``image size`` (width, height, aspect ratio) and
  ``border colour`` (mean and standard deviation of R, G, B in the outer 10% ring, from the image
  decoded at :data:`BORDER_SIZE` px).

No TensorFlow; the model is scikit-learn's ``HistGradientBoostingClassifier``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from melcore.errors import ConfigError
from melcore.splits import group_kfold

__all__ = [
    "audit_table",
    "WARN_AUROC",
    "NUMBER_BLOCK",
    "BORDER_SIZE",
    "AUTO_IMAGE_LIMIT",
    "AUDIT_MODES",
    "audit_images",
    "shortcut_audit",
    "audit_warnings",
]

WARN_AUROC = 0.65
"""Out-of-fold AUROC of one acquisition attribute above which the audit warns."""

NUMBER_BLOCK = 1000
"""Width of the file-name number blocks (ISIC_0000xxx is block 0)."""

BORDER_SIZE = 64
"""Side (px) the images are decoded at for the border-colour statistics."""

AUTO_IMAGE_LIMIT = 5_000
"""``audit_images("auto")`` reads the image files only up to this many (one small decode each)."""

_N_FOLDS = 5


def _name_parts(names: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(prefix before the first digit, the first digit run as float; NaN without digits) per name."""
    parts = names.astype(str).str.extract(r"^(\D*)(\d+)?")
    return parts[0].fillna(""), pd.to_numeric(parts[1], errors="coerce")


def _table_attributes(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Attribute name -> feature frame (object columns are categorical) from the table alone."""
    prefix, number = _name_parts(table["image_name"])
    suffix = table["image_path"].map(lambda p: Path(str(p)).suffix.lower() if isinstance(p, (str, Path)) else None)
    return {
        "clinic": pd.DataFrame({"clinic": table["clinic"].astype(object)}),
        "file-name prefix": pd.DataFrame({"prefix": prefix.astype(object)}),
        "file-name number block": pd.DataFrame({"number_block": (number // NUMBER_BLOCK).astype(object)}),
        "file format": pd.DataFrame({"suffix": suffix.astype(object)}),
    }


def _image_attributes(paths: list, workers: int | None) -> dict[str, pd.DataFrame]:
    """``image size`` and ``border colour`` frames read from the files (NaN where a file cannot be read)."""
    from PIL import Image

    from melcore.images import load_images

    sizes = np.full((len(paths), 2), np.nan)
    for i, path in enumerate(paths):
        if not isinstance(path, (str, Path)):
            continue
        try:
            with Image.open(path) as im:
                sizes[i] = im.size
        except (OSError, TypeError, ValueError):
            continue
    readable = np.flatnonzero(np.isfinite(sizes[:, 0]))
    border = np.full((len(paths), 6), np.nan)
    if len(readable):
        pixels = load_images(
            [paths[i] for i in readable], BORDER_SIZE, workers=workers, on_error=lambda index, error: None
        ).astype(np.float64)
        ring = np.ones((BORDER_SIZE, BORDER_SIZE), dtype=bool)
        edge = max(1, BORDER_SIZE // 10)
        ring[edge:-edge, edge:-edge] = False
        values = pixels[:, ring, :]
        border[readable] = np.hstack([values.mean(axis=1), values.std(axis=1)])
    with np.errstate(invalid="ignore", divide="ignore"):
        aspect = sizes[:, 0] / sizes[:, 1]
    return {
        "image size": pd.DataFrame({"width": sizes[:, 0], "height": sizes[:, 1], "aspect": aspect}),
        "border colour": pd.DataFrame(border, columns=["r_mean", "g_mean", "b_mean", "r_sd", "g_sd", "b_sd"]),
    }


def _oof_scores(features: pd.DataFrame, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold P(malignant) of a small gradient-boosted model on ``features`` (n, k)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    encoded = np.empty(features.shape, dtype=float)
    categorical = np.zeros(features.shape[1], dtype=bool)
    for j, column in enumerate(features.columns):
        values = features[column]
        if values.dtype == object:
            codes, _ = pd.factorize(values.astype(str).where(values.notna()))
            encoded[:, j] = np.where(codes < 0, np.nan, codes % 250)  # HistGradientBoosting: < 255 categories
            categorical[j] = True
        else:
            encoded[:, j] = pd.to_numeric(values, errors="coerce").to_numpy(float)
    scores = np.full(len(y), np.nan)
    for k in np.unique(folds):
        train, held = folds != k, folds == k
        if len(np.unique(y[train])) < 2:
            continue
        model = HistGradientBoostingClassifier(
            max_iter=50,
            max_leaf_nodes=8,
            min_samples_leaf=10,
            learning_rate=0.1,
            early_stopping=False,
            random_state=0,
            categorical_features=categorical if categorical.any() else None,
        )
        with threadpool_limits(limits=1, user_api="openmp"):
            scores[held] = model.fit(encoded[train], y[train]).predict_proba(encoded[held])[:, 1]
    return scores


def shortcut_audit(
    cohort,
    *,
    images: bool = False,
    n_folds: int = _N_FOLDS,
    seed: int = 0,
    n_boot: int = 1000,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Grouped cross-validated AUROC of each label-free acquisition attribute alone (see the module).

    Parameters
    ----------
    cohort : melcore.cohort.Cohort (labelled rows are used; ``groups`` keep a patient in one fold)
    images : bool
        Also read the image files for ``image size`` and ``border colour`` (slower: one small decode
        per image).
    n_folds, seed : the patient-grouped folds (fewer when there are fewer patients of a class).
    n_boot : patient-bootstrap resamples of each AUROC's 95% CI.
    progress : callable(done, total) over attributes, optional.

    Returns
    -------
    list of dict, one per attribute: ``attribute``, ``features`` (list of str), ``auroc`` (float or
    None), ``auroc_ci`` ([low, high] or None), ``n`` (labelled rows scored), ``warning`` (str or
    None: set when ``auroc`` > :data:`WARN_AUROC`), ``note`` (why no AUROC, else "").
    """
    from melcore.metrics import auroc, auroc_ci

    table = cohort.table
    labelled = table["target"].notna().to_numpy()
    y = table["target"].to_numpy()[labelled].astype(int)
    groups = cohort.groups.to_numpy()[labelled]
    attributes = _table_attributes(table)
    if images:
        paths = table["image_path"].tolist()
        attributes.update(_image_attributes(paths, workers))
    malignant_groups = len(set(groups[y == 1]))
    k = min(n_folds, malignant_groups, len(set(groups[y == 0])))
    folds = group_kfold(groups, y, k, seed=seed) if k >= 2 else None
    rows = []
    for i, (name, frame) in enumerate(attributes.items()):
        features = frame[labelled].reset_index(drop=True)
        row = {
            "attribute": name,
            "features": list(features.columns),
            "auroc": None,
            "auroc_ci": None,
            "n": int(labelled.sum()),
            "warning": None,
            "note": "",
        }
        known = features.notna().any(axis=1).to_numpy()
        if folds is None:
            row["note"] = "too few patients of each class for a grouped cross-validation"
        elif features[known].astype(str).drop_duplicates().shape[0] < 2:
            row["note"] = "one value only: it cannot tell the classes apart"
        else:
            scores = _oof_scores(features, y, folds)
            scored = np.isfinite(scores)
            row["n"] = int(scored.sum())
            if len(np.unique(y[scored])) == 2:
                row["auroc"] = auroc(y[scored], scores[scored])
                ci = auroc_ci(y[scored], scores[scored], groups=groups[scored], n_boot=n_boot, seed=seed)
                row["auroc_ci"] = [ci.low, ci.high]
                if row["auroc"] > WARN_AUROC:
                    row["warning"] = _warning(name, row["auroc"])
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(attributes))
    return rows


def _warning(attribute: str, value: float) -> str:
    return (
        f"the {attribute} alone predicts the label (grouped out-of-fold AUROC {value:.2f} > {WARN_AUROC}): a "
        "model can learn how the images were acquired instead of the lesion. Report AUROC on a clean subset "
        "where this attribute does not separate the classes (e.g. one clinic/source, one file-name block), "
        "and compare models there"
    )


AUDIT_MODES = ("auto", "table", "images", "none")
"""What :func:`audit_images` accepts: ``auto`` reads the files for cohorts of at most
:data:`AUTO_IMAGE_LIMIT` images, ``table`` never, ``images`` always, ``none`` skips the audit."""


def audit_images(cohort, mode: str = "auto") -> bool | None:
    """Whether :func:`shortcut_audit` should read the image files for ``mode``; None: no audit."""
    if mode not in AUDIT_MODES:
        raise ConfigError(f"unknown audit mode {mode!r}; choose {', '.join(AUDIT_MODES)}")
    if mode == "none":
        return None
    n_files = int(cohort.table["image_path"].notna().sum())
    return n_files > 0 and (mode == "images" or (mode == "auto" and n_files <= AUTO_IMAGE_LIMIT))


def audit_table(rows: list[dict]) -> pd.DataFrame:
    """:func:`shortcut_audit` rows for display: Attribute, AUROC (3 decimals), 95% CI, Note."""
    return pd.DataFrame(
        {
            "Attribute": [row["attribute"] for row in rows],
            "AUROC": [round(row["auroc"], 3) if row["auroc"] is not None else None for row in rows],
            "95% CI": [f"{row['auroc_ci'][0]:.3f}-{row['auroc_ci'][1]:.3f}" if row["auroc_ci"] else "" for row in rows],
            "Note": [("above " + f"{WARN_AUROC}: a shortcut" if row["warning"] else row["note"]) for row in rows],
        }
    )


def audit_warnings(rows: list[dict]) -> list[str]:
    """The warnings of :func:`shortcut_audit` rows, in order."""
    return [row["warning"] for row in rows if row.get("warning")]
