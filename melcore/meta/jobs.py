"""Training the metadata model as a run: the run directory, the background job, missingness warnings.

:func:`train_meta_run` cross-validates :class:`melcore.meta.model.MetaModel` (and the fusion when image
scores are given), fits it on every labelled image and writes the run directory;
:func:`meta_job_config` validates a ``meta`` job's config and :func:`stored_image_scores` reads a stored
image run's predictions as image scores. :func:`missingness_warnings` says when a metadata model can
learn from missing age, sex or site instead of their values.

No TensorFlow here: the module imports numpy, pandas and scikit-learn only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

import melcore
from melcore.errors import CancelledError, ConfigError, MelcoreError
from melcore.meta.features import FEATURE_SETS, ages, labelled_frame, text_column
from melcore.meta.fusion import fuse
from melcore.meta.model import DEFAULT_PARAMS, MetaModel, Progress, cross_validate_meta, per_clinic_aurocs
from melcore.metrics import auroc_or_none, format_auroc

__all__ = [
    "MISSING_CLASS_GAP",
    "MISSING_SOURCE_GAP",
    "missingness_warnings",
    "train_meta_run",
    "META_JOB_DEFAULTS",
    "meta_job_config",
    "stored_image_scores",
]

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
    table, _, labelled, y = labelled_frame(cohort)
    lab = table[labelled].reset_index(drop=True)
    warnings: list[str] = []
    if len(y) == 0:
        return warnings
    clinics = pd.Series(text_column(lab, "clinic"), dtype=object)
    for column, word in _MISSING_FIELDS:
        values = ages(lab) if column == "age_approx" else text_column(lab, column)
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
    ``meta_model.json`` + ``meta_model_train.npz`` (see :meth:`melcore.meta.model.MetaModel.save`),
    ``fusion.json`` (with image scores) and ``train.log``. Returns the metrics dict.
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
    table, _, labelled, y = labelled_frame(cohort)
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
            metrics["per_clinic"] = per_clinic_aurocs(oof)
        else:
            # Fused and meta probabilities are on different scales, so they are not pooled into one
            # column: the run's prediction stays the meta score and the fusion is reported on its own rows.
            say(
                f"{int(oof['fused_prediction'].isna().sum())} labelled image(s) have no image score: "
                "prediction = meta score; fused_prediction only where an image score exists"
            )
        say(
            f"image AUROC {format_auroc(fusion.image_auroc)} and meta AUROC {format_auroc(fusion.meta_auroc)} on "
            f"{len(fusion.oof)} images with both; fused OOF AUROC {format_auroc(fusion.oof_auroc)}"
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
