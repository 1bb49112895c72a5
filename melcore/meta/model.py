"""The metadata model: gradient-boosted trees on :mod:`melcore.meta.features`, and its patient-grouped CV.

:class:`MetaModel` is a scikit-learn ``HistGradientBoostingClassifier`` with
native categorical support and fixed, regularised hyper-parameters (no early
stopping, so no random split inside a fold). :func:`cross_validate_meta` gives
patient-grouped K-fold out-of-fold predictions (folds from
:func:`melcore.splits.group_kfold`), so every AUROC it reports is out-of-fold.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from melcore.cohort import table_and_groups
from melcore.errors import CancelledError, CohortError, ConfigError, LeakageError, MelcoreError
from melcore.meta.features import (
    CATEGORICAL_FEATURES,
    EMBEDDING_FEATURES,
    FEATURE_SETS,
    UGLY_DUCKLING_FEATURES,
    clean_strings,
    image_names,
    labelled_frame,
    meta_features,
    text_column,
)
from melcore.metrics import auroc_or_none, check_labels
from melcore.splits import group_kfold

__all__ = ["DEFAULT_PARAMS", "MetaModel", "MetaResult", "cross_validate_meta", "patient_folds", "per_clinic_aurocs"]

DEFAULT_PARAMS = {
    "learning_rate": 0.03,
    "max_iter": 300,
    "max_leaf_nodes": 8,
    "min_samples_leaf": "auto",
    "l2_regularization": 1.0,
    "random_state": 0,
}
"""Hyper-parameters of :class:`MetaModel` (chosen on ISIC 2020 by patient-grouped CV; see the class)."""


Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- model


def _auto_min_samples_leaf(n: int) -> int:
    # 100 on ISIC 2020 (26k training rows per fold); smaller cohorts get proportionally smaller leaves.
    return int(np.clip(n // 250, 5, 100))


class MetaModel:
    """Gradient-boosted trees on :func:`~melcore.meta.features.meta_features` output (scikit-learn style).

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
                values = clean_strings(X[column].tolist())
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
        """Fit on ``X`` (DataFrame from :func:`~melcore.meta.features.meta_features`) and ``y`` (0/1 per row, no
        missing)."""
        self._check_params()
        if not isinstance(X, pd.DataFrame):
            raise MelcoreError(f"MetaModel.fit expects the DataFrame returned by meta_features, not {type(X).__name__}")
        y = check_labels(y, what="targets").astype(np.int64)
        if len(y) != len(X):
            raise MelcoreError(f"y has {len(y)} values but X has {len(X)} rows")
        self.feature_names_in_ = [str(c) for c in X.columns]
        self.categorical_ = [
            c for c in self.feature_names_in_ if c in CATEGORICAL_FEATURES or not pd.api.types.is_numeric_dtype(X[c])
        ]
        self.categories_ = {}
        for column in self.categorical_:
            values = pd.Series([str(v).lower() for v in clean_strings(X[column].tolist()) if v is not None])
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
            index=pd.Index(image_names(frame), name="image_name"),
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


def per_clinic_aurocs(oof: pd.DataFrame, column: str = "prediction") -> dict:
    """AUROC of out-of-fold predictions within each clinic.

    Parameters
    ----------
    oof : DataFrame with columns ``clinic``, ``target`` (0/1) and ``column``
        One row per image, as :attr:`MetaResult.oof`.
    column : str
        The probability column (0..1) to score.

    Returns
    -------
    dict
        ``{clinic: {"n": int, "n_positive": int, "auroc": float or None}}`` sorted by clinic, rows
        without a clinic under ``"(none)"``; ``auroc`` None when the clinic holds one class
        (:func:`melcore.metrics.auroc_or_none`).
    """
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


def patient_folds(groups: np.ndarray, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Patient-grouped fold of each row, checked never to split a patient.

    Parameters
    ----------
    groups : ndarray of str, shape (n,)
        Patient key per row.
    y : ndarray of int, shape (n,)
        0/1 targets, balanced across folds by :func:`melcore.splits.group_kfold`.
    n_folds : int
        At least 2 and at most the number of patients.
    seed : int

    Returns
    -------
    ndarray of int, shape (n,)
        Fold 0..n_folds-1 of each row.

    Raises
    ------
    ConfigError
        ``n_folds`` not an integer >= 2.
    CohortError
        Fewer patients than folds.
    LeakageError
        A patient in two folds.
    """
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
    image_scores, embeddings : optional, see :func:`~melcore.meta.features.meta_features` (must be out-of-fold
        image scores).
    progress : callable(done_folds, n_folds), optional; called after each fold.
    feature_set : name in :data:`~melcore.meta.features.FEATURE_SETS`.
    params : overrides of :data:`DEFAULT_PARAMS`.
    should_stop : callable() -> bool, optional; asked before each fold. When it answers True,
        :class:`~melcore.errors.CancelledError` is raised.

    Returns
    -------
    MetaResult
    """
    started = time.perf_counter()
    table, pk, labelled, y = labelled_frame(cohort)
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
    folds = patient_folds(groups, y, n_folds, seed)
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
            "image_name": image_names(lab),
            "patient_id": text_column(lab, "patient_id"),
            "clinic": text_column(lab, "clinic"),
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
        per_clinic=per_clinic_aurocs(oof),
        n_folds=n_folds,
        seed=seed,
        n_groups=len(set(groups)),
        seconds=time.perf_counter() - started,
        features=X.reset_index(drop=True),
        targets=y,
    )
