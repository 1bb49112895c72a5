"""Image + metadata fusion: image and meta scores stacked by a logistic regression.

:func:`fuse` stacks an image model's scores, the meta model's out-of-fold scores
(:func:`melcore.meta.model.cross_validate_meta`) and the ugly-duckling features
with a :class:`FusionModel` that is itself cross-validated on the same patient
folds, so the fused AUROC is out-of-fold too.

No TensorFlow here: the module imports numpy, pandas and scikit-learn only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
from scipy.special import expit

from melcore.cohort import table_and_groups
from melcore.errors import CohortError, ConfigError, MelcoreError
from melcore.meta.features import (
    align_embeddings,
    align_scores,
    image_names,
    labelled_frame,
    logit,
    patient_lesion_keys,
    text_column,
    ugly_duckling_frame,
    ugly_duckling_scores,
)
from melcore.meta.model import MetaResult, Progress, patient_folds, per_clinic_aurocs
from melcore.metrics import auroc_or_none, check_labels

__all__ = ["FusionModel", "FusionResult", "fusion_features", "fuse"]

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
    names = image_names(frame)
    pk, lk = patient_lesion_keys(frame, groups)
    img = align_scores(names, image_scores, "image_scores")
    meta = align_scores(names, meta_scores, "meta_scores")
    emb = align_embeddings(names, embeddings) if embeddings is not None else None
    ud = ugly_duckling_frame(pk, lk, img, emb)
    out = pd.DataFrame(index=frame.index)
    out["logit_image"] = np.where(np.isfinite(img), logit(img), np.nan)
    out["logit_meta"] = np.where(np.isfinite(meta), logit(meta), np.nan)
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

        y = check_labels(y, what="targets").astype(np.int64)
        if len(y) != len(Z):
            raise MelcoreError(f"y has {len(y)} values but X has {len(Z)} rows")
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
    table, pk, labelled, y_all = labelled_frame(cohort)
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
    names = image_names(lab)[usable]
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
        folds = patient_folds(groups, y, n_folds, seed)
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
            "patient_id": text_column(lab, "patient_id")[usable],
            "clinic": text_column(lab, "clinic")[usable],
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
        per_clinic=per_clinic_aurocs(oof),
    )
