"""K-fold out-of-fold training and cross-clinic evaluation.

:func:`fit_folds` trains one run per patient-grouped fold (sub-runs ``fold-0`` ...
``fold-K-1``, each an ordinary :func:`melcore.training.api.fit` run) and writes the
out-of-fold predictions of every image::

    run = fit_folds(TrainConfig(model="efficientnet-b3", mode="fast-head"), cohort, n_folds=5)
    run.metrics["oof_auroc"], run.metrics["fold_aurocs"]

Run directory: ``config.json`` (the config, ``fold`` None, ``n_folds`` K),
``train.log`` (all folds), ``fold-k/`` (runs), ``oof_predictions.csv`` (image_name,
patient_id, clinic, target, prediction, fold: every usable image exactly once) and
``metrics.json`` (kind ``"kfold"``; see :func:`fit_folds`).

:func:`cross_clinic` trains on each clinic and scores every other clinic::

    run = cross_clinic(TrainConfig(model="efficientnet-b0", mode="fast-head"), cohort)
    run.metrics["matrix"][i][j]   # AUROC of the model trained on clinics[i], scored on clinics[j]

The diagonal is the validation AUROC within the clinic (its held-out patients);
off-diagonal cells score *all* labelled images of the other clinic. ``n`` holds
the number of images scored in each cell. Cells that cannot be computed (a clinic
that cannot be trained on, or one class only) are None. Sub-runs are
``clinic-<name>/``; ``cross_predictions.csv`` holds every score (trained_on,
image_name, patient_id, clinic, target, prediction). With ``mode="fast-head"`` every
image's backbone features are computed once and reused for all clinics
(:mod:`melcore.features`), which makes this practical on a CPU
(:func:`default_cross_clinic_mode`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time

import numpy as np
import pandas as pd

from melcore import features
from melcore.checks import check_int
from melcore.errors import CohortError, ConfigError, LeakageError, MelcoreError
from melcore.formatting import format_number
from melcore.metrics import auroc_or_none
from melcore.predict import predict_paths
from melcore.training.api import fit
from melcore.training.config import validate
from melcore.training.prepare import prepare_data
from melcore.training.rundir import RunDir

__all__ = ["fit_folds", "cross_clinic", "default_cross_clinic_mode", "cohort_clinics"]

log = logging.getLogger("melcore.train.crossval")

OOF_COLUMNS = ("image_name", "patient_id", "clinic", "target", "prediction", "fold")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


#: Result files of a k-fold or cross-clinic run, removed when one starts in an existing folder.
RESULT_FILES = ("metrics.json", "oof_predictions.csv", "cross_predictions.csv", "train.log")


def _open_run_dir(run_dir, kind: str, config) -> RunDir:
    """``run_dir`` (default :func:`melcore.training.rundir.default_run_dir` with ``kind``), created and
    cleared of results."""
    return RunDir.create(run_dir, config, kind, stale=RESULT_FILES)


class _SubProgress:
    """Wraps a ``progress`` callback: adds the part being trained to ``metrics`` and stretches the ETA."""

    def __init__(self, progress, extra: dict, parts_left: int, part_seconds: list[float]):
        self.progress, self.extra, self.parts_left, self.part_seconds = progress, extra, parts_left, part_seconds

    def __call__(self, epoch, batch, loss, metrics, eta):
        if self.progress is None:
            return
        if eta is not None and self.part_seconds and self.parts_left:
            eta = eta + self.parts_left * float(np.mean(self.part_seconds))
        self.progress(epoch, batch, loss, {**(metrics or {}), **self.extra}, eta)


# --------------------------------------------------------------------------- K-fold


def fit_folds(config, cohort, n_folds: int | None = None, progress=None, should_stop=None, run_dir=None, strategy=None):
    """Train ``n_folds`` patient-grouped folds and write out-of-fold predictions.

    Parameters
    ----------
    config : TrainConfig or dict
        ``fold`` is ignored (every fold is trained); ``mode`` "fast-head" computes the
        backbone features once for all folds.
    cohort : melcore.cohort.Cohort
    n_folds : int, optional
        Default ``config.n_folds``. At least 2.
    progress : callable(epoch, batch, loss, metrics, eta), optional
        As :func:`melcore.training.api.fit` (epochs count within the fold); ``metrics`` also holds
        ``fold`` (0-based) and ``n_folds``; the ETA covers the folds still to come once
        one fold has finished.
    should_stop : callable() -> bool, optional
        Stops the current fold within one batch; later folds are not started.
    run_dir : path, optional
        Default ``settings.subdir("runs") / "<time>-kfold-<model>-<clinic|all>"``.

    Returns
    -------
    melcore.training.rundir.Run
        Its ``metrics`` (``metrics.json``): kind "kfold", status, cancelled, model, mode,
        clinic, image_size, n_folds, folds_done, oof_auroc (AUROC of all out-of-fold
        predictions), fold_aurocs (validation AUROC per fold, list; each fold's best epoch is
        chosen on training patients of that fold, never on its out-of-fold images), mean_fold_auroc,
        n_oof, n_malignant, fold_runs (sub-folder names), weights, seconds.

    Raises
    ------
    ConfigError, CohortError, LeakageError
        As :func:`melcore.training.api.fit` (checked on fold 0 before anything trains).
    """
    config = validate(config)
    n_folds = config.n_folds if n_folds is None else check_int("n_folds", n_folds, 2)
    config = validate(dataclasses.replace(config, fold=None, n_folds=n_folds))
    started = time.perf_counter()
    prepare_data(dataclasses.replace(config, fold=0), cohort)  # fail fast: clinic, classes, leakage
    out = _open_run_dir(run_dir, "kfold", config)
    run_dir = out.path
    fold_seconds: list[float] = []
    fold_aurocs: list[float | None] = []
    fold_runs: list[str] = []
    frames: list[pd.DataFrame] = []
    cancelled = False
    last = None
    with out.log():
        log.info(
            "%d-fold training of %s (%s mode) on %s", n_folds, config.model, config.mode, config.clinic or "all clinics"
        )
        for fold in range(n_folds):
            if should_stop is not None and should_stop():
                cancelled = True
                break
            fold_started = time.perf_counter()
            sub = _SubProgress(progress, {"fold": fold, "n_folds": n_folds}, n_folds - fold - 1, fold_seconds)
            run = fit(
                dataclasses.replace(config, fold=fold),
                cohort,
                progress=sub,
                should_stop=should_stop,
                run_dir=run_dir / f"fold-{fold}",
                strategy=strategy,
            )
            last = run
            if run.cancelled:
                cancelled = True
                break
            fold_seconds.append(time.perf_counter() - fold_started)
            fold_runs.append(f"fold-{fold}")
            fold_aurocs.append(run.metrics.get("val_auroc"))
            frame = run.val_predictions()
            frame["fold"] = fold
            frames.append(frame)
            log.info(
                "fold %d/%d: validation AUROC %s on %d images",
                fold + 1,
                n_folds,
                format_number(run.metrics.get("val_auroc")),
                len(frame),
            )
        oof = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(OOF_COLUMNS)))[
            list(OOF_COLUMNS)
        ]
        if frames:
            oof.to_csv(run_dir / "oof_predictions.csv", index=False)
        y = oof["target"].astype("float64").to_numpy()
        p = oof["prediction"].astype("float64").to_numpy()
        oof_auroc = auroc_or_none(y, p)
        finite = [a for a in fold_aurocs if a is not None and math.isfinite(a)]
        metrics = {
            "kind": "kfold",
            "status": "cancelled" if cancelled else "done",
            "cancelled": cancelled,
            "model": config.model,
            "mode": config.mode,
            "clinic": config.clinic,
            "image_size": config.image_size,
            "cohort": getattr(cohort, "name", None),
            "n_folds": n_folds,
            "folds_done": len(frames),
            "oof_auroc": oof_auroc,
            "fold_aurocs": fold_aurocs,
            "mean_fold_auroc": float(np.mean(finite)) if finite else None,
            "n_oof": int(len(oof)),
            "n_malignant": int((y == 1).sum()),
            "fold_runs": fold_runs,
            "weights": (last.metrics.get("weights") if last is not None else None),
            "from_scratch": bool((last.metrics.get("weights") or {}).get("from_scratch")) if last else None,
            "seconds": time.perf_counter() - started,
            "fold_seconds": fold_seconds,
        }
        metrics = out.write_metrics(metrics)
        if cancelled:
            log.warning("k-fold training cancelled after %d of %d folds", len(frames), n_folds)
        else:
            log.info(
                "out-of-fold AUROC %s over %d images; fold AUROCs %s",
                format_number(oof_auroc),
                len(oof),
                ", ".join(format_number(a) for a in fold_aurocs),
            )
    return out.run(config, metrics, cancelled)


# --------------------------------------------------------------------------- cross-clinic


def default_cross_clinic_mode() -> str:
    """``"full"`` when TensorFlow sees a GPU, else ``"fast-head"`` (a CPU fine-tunes ~3 images/s)."""
    import tensorflow as tf

    return "full" if tf.config.list_logical_devices("GPU") else "fast-head"


def cohort_clinics(cohort) -> list[str]:
    """Clinics holding labelled images with files, sorted by name."""
    table = cohort.table
    usable = table["target"].notna() & table["image_path"].notna() & table["clinic"].notna()
    return sorted({str(c) for c in table.loc[usable, "clinic"]})


def _check_one_clinic_per_patient(cohort, clinics: list[str]) -> None:
    """LeakageError when a patient (``Cohort.groups``) has labelled images in two of ``clinics``.

    Such a patient's images would be trained on in one clinic and scored as unseen in the other,
    making the off-diagonal AUROCs optimistic.
    """
    table = cohort.table
    clinic = table["clinic"].astype("string")
    usable = (table["target"].notna() & table["image_path"].notna() & clinic.isin(clinics).fillna(False)).to_numpy()
    per_patient = clinic[usable].groupby(cohort.groups[usable].to_numpy()).nunique()
    shared = per_patient[per_patient > 1]
    if len(shared):
        first = shared.index[0]
        where = sorted(clinic[usable][cohort.groups[usable].eq(first).to_numpy()].unique())
        raise LeakageError(
            f"{len(shared)} patient(s) have images in more than one clinic (e.g. {first!r} in "
            f"{', '.join(where)}), so a clinic's model would be scored on patients it was trained "
            "on; give each patient one clinic (e.g. that of the first visit) or leave those "
            "patients out"
        )


def _score_images(config, run, table: pd.DataFrame, should_stop) -> np.ndarray | None:
    """Probabilities of the run's model for the rows of ``table`` (None when stopped)."""
    paths = table["image_path"].astype(str).tolist()
    if config.mode == "fast-head":
        extractor = features.get_extractor(config)
        from melcore.images import ImageCache

        result = features.compute_features(
            extractor,
            paths,
            cache=features.FeatureCache(),
            image_cache=ImageCache() if config.cache_images else None,
            batch_size=max(32, config.batch_size),
            workers=config.workers,
            should_stop=should_stop,
        )
        if result.cancelled:
            return None
        scores = features.score_features(features.head_of(run.load_model()), result.features[:1])
        if result.bad:
            scores[list(result.bad)] = np.nan
        return scores
    from melcore.images import ImageCache

    return predict_paths(
        run.load_model(),
        paths,
        tta=config.tta,
        batch_size=max(32, config.batch_size),
        should_stop=should_stop,
        cache=ImageCache() if config.cache_images else None,
        workers=config.workers,
    )


def cross_clinic(config, cohort, progress=None, should_stop=None, run_dir=None, strategy=None, *, clinics=None):
    """Train on each clinic, score every other clinic; write and return a "cross-clinic" run.

    Parameters
    ----------
    config : TrainConfig or dict
        The per-clinic training config; ``clinic`` must be None (every clinic is used).
    cohort : melcore.cohort.Cohort
        Needs a ``clinic`` column with at least two clinics of labelled images.
    progress, should_stop : as :func:`melcore.training.api.fit`
        ``metrics`` also holds ``clinic`` (the training clinic), ``clinic_index`` and ``n_clinics``.
    run_dir : path, optional
        Default ``settings.subdir("runs") / "<time>-cross-clinic-<model>-all"``.
    clinics : list of str, optional
        Restrict to these clinics (default :func:`cohort_clinics`).

    Returns
    -------
    melcore.training.rundir.Run
        ``metrics``: ``{"kind": "cross-clinic", "clinics": [...], "matrix": [[AUROC]],
        "n": [[images scored]]}`` (None where unknown) plus status, cancelled, model, mode,
        image_size, runs ({clinic: sub-folder}), errors ({clinic: why it was not trained}),
        weights, seconds.

    Raises
    ------
    ConfigError
        ``config.clinic`` set, or bad config.
    CohortError
        Fewer than two clinics with labelled images, or an unknown clinic in ``clinics``.
    LeakageError
        A patient has labelled images in two of the clinics (before anything is trained).
    """
    config = validate(config)
    if config.clinic is not None:
        raise ConfigError(f"cross-clinic evaluation trains on every clinic; do not set clinic ({config.clinic!r})")
    available = cohort_clinics(cohort)
    if clinics is None:
        clinics = available
    else:
        clinics = [str(c) for c in clinics]
        unknown = [c for c in clinics if c not in available]
        if unknown:
            raise CohortError(
                f"unknown or empty clinic(s) {', '.join(map(repr, unknown))}; clinics with labelled "
                f"images: {', '.join(available) or 'none'}"
            )
    if len(clinics) < 2:
        raise CohortError(
            f"cross-clinic evaluation needs at least two clinics with labelled images; cohort "
            f"{getattr(cohort, 'name', '')!r} has {len(clinics)} ({', '.join(clinics) or 'none'}): "
            "pass --clinic-column or a table with a clinic column"
        )
    _check_one_clinic_per_patient(cohort, clinics)
    started = time.perf_counter()
    k = len(clinics)
    out = _open_run_dir(run_dir, "cross-clinic", config)
    run_dir = out.path
    table = cohort.table
    usable = table["target"].notna() & table["image_path"].notna()
    by_clinic = {
        c: table[usable & table["clinic"].astype("string").eq(c).fillna(False)].reset_index(drop=True) for c in clinics
    }
    matrix = [[None] * k for _ in range(k)]
    n = [[None] * k for _ in range(k)]
    runs: dict[str, str] = {}
    errors: dict[str, str] = {}
    scores: list[pd.DataFrame] = []
    part_seconds: list[float] = []
    cancelled = False
    weights = None
    with out.log():
        log.info(
            "cross-clinic evaluation of %s (%s mode) over %d clinics: %s",
            config.model,
            config.mode,
            k,
            ", ".join(clinics),
        )
        for i, clinic in enumerate(clinics):
            if should_stop is not None and should_stop():
                cancelled = True
                break
            part_started = time.perf_counter()
            sub = _SubProgress(progress, {"clinic": clinic, "clinic_index": i, "n_clinics": k}, k - i - 1, part_seconds)
            folder = f"clinic-{_slug(clinic)}"
            try:
                run = fit(
                    dataclasses.replace(config, clinic=clinic),
                    cohort,
                    progress=sub,
                    should_stop=should_stop,
                    run_dir=run_dir / folder,
                    strategy=strategy,
                )
            except (CohortError, LeakageError) as exc:
                errors[clinic] = str(exc)
                log.warning("clinic %s cannot be trained on: %s", clinic, exc)
                continue
            if run.cancelled:
                cancelled = True
                break
            weights = run.metrics.get("weights")
            runs[clinic] = folder
            matrix[i][i], n[i][i] = run.metrics.get("val_auroc"), run.metrics.get("n_val")
            own = run.val_predictions()
            own.insert(0, "trained_on", clinic)
            scores.append(own)
            for j, other in enumerate(clinics):
                if j == i:
                    continue
                rows = by_clinic[other]
                if sub.progress is not None:
                    sub(
                        0,
                        0,
                        None,
                        {
                            "stage": "validate",
                            "epochs": 0,
                            "steps": 0,
                            "scoring": other,
                            "val_batch": j + 1,
                            "val_steps": k,
                        },
                        None,
                    )
                p = _score_images(config, run, rows, should_stop)
                if p is None:
                    cancelled = True
                    break
                ok = np.isfinite(p)
                y = rows["target"].astype("float64").to_numpy()
                matrix[i][j] = auroc_or_none(y[ok], p[ok])
                n[i][j] = int(ok.sum())
                scores.append(
                    pd.DataFrame(
                        {
                            "trained_on": clinic,
                            "image_name": rows["image_name"].astype(str),
                            "patient_id": rows["patient_id"],
                            "clinic": rows["clinic"],
                            "target": rows["target"].astype("int64"),
                            "prediction": p,
                        }
                    )
                )
                log.info(
                    "trained on %s, scored on %s: AUROC %s over %d images",
                    clinic,
                    other,
                    format_number(matrix[i][j]),
                    n[i][j],
                )
            if cancelled:
                break
            part_seconds.append(time.perf_counter() - part_started)
        if scores:
            pd.concat(scores, ignore_index=True).to_csv(run_dir / "cross_predictions.csv", index=False)
        metrics = {
            "kind": "cross-clinic",
            "clinics": clinics,
            "matrix": matrix,
            "n": n,
            "status": "cancelled" if cancelled else "done",
            "cancelled": cancelled,
            "model": config.model,
            "mode": config.mode,
            "image_size": config.image_size,
            "cohort": getattr(cohort, "name", None),
            "runs": runs,
            "errors": errors,
            "weights": weights,
            "from_scratch": bool((weights or {}).get("from_scratch")) if weights else None,
            "seconds": time.perf_counter() - started,
        }
        metrics = out.write_metrics(metrics)
        if not runs and not cancelled:
            raise MelcoreError("no clinic could be trained on: " + "; ".join(f"{c}: {e}" for c, e in errors.items()))
        log.info("cross-clinic evaluation %s in %.1f s", "cancelled" if cancelled else "done", metrics["seconds"])
    return out.run(config, metrics, cancelled)
