"""The "fast-head" training mode: only the head, trained on cached backbone features.

:func:`fit_fast_head` is what :func:`melcore.training.api.fit` calls for ``mode="fast-head"``.
The frozen backbone's pooled features come from :mod:`melcore.features` (computed once per
backbone and image, kept on disk), so a clinic-specific model is retrained in seconds::

    config = TrainConfig(model="efficientnet-b3", image_size=256, weights="imagenet",
                         mode="fast-head", clinic="clinic-north")
    run = fit(config, cohort)          # melcore.training.api.fit dispatches here

The head is trained with the optimizer (``head_fit="gradient"``, epochs, early stopping on the
selection split) or fitted in closed form (``head_fit="logistic-cv"``: :func:`fit_logistic_head`,
C chosen by a patient-grouped inner CV). The joined model (``models.join(backbone, head)``) is
saved as an ordinary run (:mod:`melcore.training.rundir`): predict, evaluate and Grad-CAM use it
like any other run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Sequence

import numpy as np

from melcore.features import (
    VIEWS,
    FeatureCache,
    FeatureExtractor,
    check_views,
    compute_features,
    get_extractor,
    score_features,
)
from melcore.metrics import auroc, auroc_or_none, format_auroc
from melcore.splits import group_kfold
from melcore.training.callbacks import (
    BestEpoch,
    Cancellation,
    ProgressReporter,
    bce,
    keras_callbacks,
)
from melcore.training.config import validate
from melcore.training.optimizers import make_optimizer
from melcore.training.prepare import (
    drop_unreadable,
    prepare_data,
    select_table,
    split_tables,
)
from melcore.training.rundir import (
    RunDir,
    environment_metrics,
    epoch_run_metrics,
    log_run_start,
    log_stage,
    stage_record,
)
from melcore.training.runtime import device_description, op_determinism

__all__ = ["fit_fast_head", "fit_logistic_head", "pooling_column_sets", "LOGISTIC_CS", "scorer_description"]

log = logging.getLogger("melcore.train.features")


def scorer_description(config) -> str:
    """``metrics["scorer_description"]`` of a fast-head run, e.g. "logistic head on efficientnet-lite0 features"."""
    kind = "logistic" if config.head_fit == "logistic-cv" else "dense"
    return f"{kind} head on {config.model} features ({config.pooling} pooling)"


class _FeatureBatches:
    """Per-epoch training arrays in the order :class:`melcore.pipeline.ImageBatches` would use.

    Reusing ImageBatches' ordering keeps ``balance="oversample"`` (balanced batches,
    each class walked in reshuffled passes) identical between the two modes. With
    several views, each sample of each epoch takes one view drawn from (seed, epoch).
    """

    def __init__(self, features: np.ndarray, targets: np.ndarray, paths: list, config, balance: str):
        from melcore.pipeline import ImageBatches

        self.features = features  # (n_views, n, f)
        self.targets = targets.astype(np.float32)
        self.seed = config.seed
        self.order = ImageBatches(
            paths,
            self.targets,
            config.image_size,
            batch_size=config.batch_size,
            augment="none",
            balance=balance,
            seed=config.seed,
            workers=1,
        )

    @property
    def epoch_length(self) -> int:
        return self.order.epoch_length

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        indices = self.order.epoch_indices(epoch)
        n_views = self.features.shape[0]
        if n_views == 1:
            return self.features[0, indices], self.targets[indices]
        views = np.random.default_rng([self.seed, 4, epoch]).integers(0, n_views, size=len(indices))
        return self.features[views, indices], self.targets[indices]


def fit_fast_head(
    config,
    cohort,
    progress=None,
    should_stop=None,
    run_dir=None,
    strategy=None,
    *,
    views=None,
    feature_cache: FeatureCache | None = None,
):
    """Train only the head on cached backbone features; write an ordinary run.

    Same contract as :func:`melcore.training.api.fit` (it is what ``fit`` calls for
    ``mode="fast-head"``): same data preparation and split, same ``balance`` options,
    early stopping and the best epoch chosen on the selection split (training patients held
    out; the validation images choose nothing), same progress
    and ``should_stop`` contract (stage ``"load"`` while features are computed, with
    ``done``/``total``; stage ``"head"`` while training; ``end_of_epoch`` calls), same
    run directory files. The backbone stays frozen: ``fine_tune_epochs`` and the image
    ``augment`` preset do not apply (``views`` gives dihedral-view augmentation instead).

    Parameters
    ----------
    views : sequence of view names, optional
        Feature views used for training (default ``("identity",)``; e.g. ``VIEWS[:4]``
        for rotations). ``config.tta`` scores validation with all 8 views.
    feature_cache : FeatureCache, optional
        Default ``FeatureCache()`` under MELREVIEW_HOME.

    Returns
    -------
    melcore.training.rundir.Run
        metrics.json holds fit's keys plus ``mode`` ("fast-head"), ``feature_cache``
        ({hits, misses, key, views}), ``feature_seconds``, ``head_seconds`` and
        ``backbone_seconds`` (building/hashing the backbone; 0 when reused in-process).
    """
    config = validate(config)
    if config.mode != "fast-head":
        config = dataclasses.replace(config, mode="fast-head")
    views = check_views(views)
    started = time.perf_counter()
    data = prepare_data(config, cohort)
    with op_determinism(config.deterministic) as deterministic:
        extractor = get_extractor(config, strategy)
        out = RunDir.create(run_dir, config)
        with out.log():
            try:
                return _fast_head_in_run_dir(
                    config,
                    data,
                    extractor,
                    views,
                    feature_cache,
                    out,
                    progress,
                    should_stop,
                    strategy,
                    started,
                    bool(deterministic),
                )
            except Exception:
                log.exception("fast-head training failed")
                raise


def _fast_head_in_run_dir(
    config,
    data,
    extractor: FeatureExtractor,
    views,
    feature_cache,
    out: RunDir,
    progress,
    should_stop,
    strategy,
    started: float,
    deterministic: bool,
):
    import keras

    from melcore import images as images_module
    from melcore import models
    from melcore.pipeline import class_weights

    spec = models.get_spec(config.model)
    device, n_replicas = device_description(strategy)
    info = extractor.weights_info
    log_run_start(log, out, config, data, info, device, f"fast head on {config.model} features")
    if config.fine_tune_epochs:
        log.info(
            "fast-head mode keeps the backbone frozen: the %d fine-tune epoch(s) are not run", config.fine_tune_epochs
        )
    if config.augment != "none":
        log.info(
            "fast-head mode trains on cached features: image augmentation %r does not apply (views: %s)",
            config.augment,
            ", ".join(views),
        )

    reporter = ProgressReporter(progress, total_epochs=config.epochs)
    cancel = Cancellation(should_stop, reporter)
    best = BestEpoch()
    history: list[dict] = []
    cache = feature_cache if feature_cache is not None else FeatureCache()
    image_cache = images_module.ImageCache() if config.cache_images else None
    table = data.cohort.table
    paths = table["image_path"].astype(str).tolist()
    total = len(paths)

    # ---- features of every image (training views; all 8 for the validation TTA)
    reporter.stage = "load"
    reporter.report(0, None, {"done": 0, "total": total}, epoch=0, stage="load")

    def loading(done, _total):
        reporter.report(0, None, {"done": done, "total": total}, epoch=0, stage="load")

    val_views = VIEWS if config.tta else views
    all_views = tuple(dict.fromkeys(views + tuple(val_views)))
    computed = compute_features(
        extractor,
        paths,
        views=all_views,
        cache=cache,
        image_cache=image_cache,
        batch_size=max(config.batch_size, 32),
        workers=config.workers,
        progress=loading,
        should_stop=cancel.requested,
    )
    feature_seconds = computed.seconds
    log.info(
        "features of %d images (%s view%s): %d from the cache, %d computed, in %.1f s (backbone key %s)",
        total,
        len(all_views),
        "" if len(all_views) == 1 else "s",
        computed.hits,
        computed.misses,
        feature_seconds,
        extractor.key[:12],
    )
    features = computed.features
    if computed.bad:
        keep = np.ones(total, dtype=bool)
        keep[list(computed.bad)] = False
        data = drop_unreadable(data, computed.bad, config)
        features = features[:, keep]
    train_views = [all_views.index(v) for v in views]
    val_view_index = [all_views.index(v) for v in val_views]
    train_table, val_table, counts = split_tables(data)
    x_train = features[train_views][:, data.train_idx]
    x_val = features[:, data.val_idx]
    x_select = features[[all_views.index(views[0])]][:, data.select_idx]
    y_train = train_table["target"].astype("float32").to_numpy()
    y_val = val_table["target"].astype("float64").to_numpy()
    y_select = select_table(data)["target"].astype("float64").to_numpy()

    if config.head_fit == "logistic-cv":
        # No epochs to choose: the head is fitted on every training patient, the selection split included
        # (its C is chosen by the grouped inner CV), and the validation images are only scored.
        fit_idx = np.concatenate([data.train_idx, data.select_idx])
        x_fit = features[train_views][:, fit_idx]
        y_fit = data.cohort.table["target"].iloc[fit_idx].astype("float32").to_numpy()
        groups_fit = data.cohort.groups.iloc[fit_idx].astype(str).to_numpy()
        return _logistic_head_run(
            config,
            data,
            extractor,
            info,
            computed,
            cache,
            x_fit,
            y_fit,
            groups_fit,
            x_val,
            y_val,
            val_table,
            counts,
            train_views,
            val_view_index,
            all_views,
            views,
            out,
            reporter,
            cancel,
            device,
            n_replicas,
            deterministic,
            started,
        )

    # ---- the head
    head_started = time.perf_counter()
    balance = "none" if config.balance == "class-weight" else config.balance
    batches = _FeatureBatches(x_train, y_train, train_table["image_path"].astype(str).tolist(), config, balance)
    class_weight = class_weights(y_train) if config.balance == "class-weight" else None
    steps = math.ceil(batches.epoch_length / config.batch_size)
    reporter.steps = steps
    keras.utils.set_random_seed(config.seed)  # the head's initial weights do not depend on backbone reuse
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        head = models.build_head(extractor.n_features, model_name=spec.name)
        optimizer = make_optimizer(
            spec, config.learning_rate, steps, config.epochs, optimizer=config.optimizer, schedule=config.schedule
        )
        head.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy())
    n_params = int(sum(np.prod(w.shape) for w in head.trainable_weights))
    log_stage(
        log,
        "head",
        config.epochs,
        steps,
        config,
        config.learning_rate,
        f"{n_params:,} trainable params on {extractor.n_features} features",
    )

    def score_validation(tta: bool = False) -> np.ndarray:
        return score_features(head, x_val[val_view_index] if tta else x_val[[all_views.index(views[0])]])

    def score_selection() -> dict:
        p = score_features(head, x_select)
        return {"select_auroc": auroc_or_none(y_select, p), "select_loss": bce(y_select, p)}

    callbacks = keras_callbacks(reporter, cancel, best, history, score_selection, config.batch_size)
    reporter.stage = "head"
    best.start_stage(config.early_stopping_patience)
    for epoch in range(config.epochs):
        if cancel.requested():
            break
        x, y = batches.epoch(epoch)
        head.fit(
            x,
            y,
            batch_size=config.batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=False,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=0,
        )
        if cancel.cancelled or best.early_stopped:
            break
    head_seconds = time.perf_counter() - head_started
    stage_records = [stage_record("head", config.epochs, len(history), config.learning_rate, [], n_params)]

    if best.best_weights is not None:
        head.set_weights(best.best_weights)
    metrics = epoch_run_metrics(
        config,
        data,
        counts,
        best=best,
        history=history,
        stages=stage_records,
        planned_epochs=config.epochs,
        cancelled=cancel.cancelled,
        weights_info=info,
        device=device,
        n_replicas=n_replicas,
        deterministic=deterministic,
        mode="fast-head",
        scorer="cnn",
        scorer_description=scorer_description(config),
    )
    metrics.update(_feature_timings(extractor, computed, all_views, cache, feature_seconds, head_seconds))
    save_started = time.perf_counter()
    model = models.join(extractor.backbone, head, name=spec.name) if best.best_weights is not None else None
    predictions = out.save_and_score(model, best, cancel, lambda: score_validation(tta=config.tta))
    seconds = out.write_results(
        metrics,
        val_table,
        predictions,
        best=best,
        cancel=cancel,
        reporter=reporter,
        history=history,
        started=started,
        fit_seconds=head_seconds,
        save_seconds=time.perf_counter() - save_started,
    )
    if not cancel.cancelled:
        log.info(
            "done in %.1f s (features %.1f s, head %.1f s): validation AUROC %s (best epoch %s)",
            seconds,
            feature_seconds,
            head_seconds,
            format_auroc(metrics["val_auroc"]),
            best.best_epoch,
        )
    return out.run(config, metrics, cancel.cancelled)


def _feature_timings(extractor, computed, all_views, cache, feature_seconds: float, head_seconds: float) -> dict:
    """The fast-head keys of metrics.json: ``feature_cache`` (hits, misses, backbone key, views, root)
    and the seconds spent on features, the head and the backbone."""
    return {
        "feature_cache": {
            "hits": computed.hits,
            "misses": computed.misses,
            "key": extractor.key,
            "views": list(all_views),
            "root": str(cache.root),
        },
        "feature_seconds": feature_seconds,
        "head_seconds": head_seconds,
        "backbone_seconds": 0.0 if extractor.reused else extractor.build_seconds,
        "backbone_reused": extractor.reused,
    }


# --------------------------------------------------------------------------- logistic head (C by inner CV)

#: Inverse L2 strengths tried by :func:`fit_logistic_head` (standardised features).
LOGISTIC_CS = (0.001, 0.003, 0.01, 0.03, 0.1)


def fit_logistic_head(
    features: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    *,
    seed: int = 0,
    balanced: bool = True,
    cs: Sequence[float] = LOGISTIC_CS,
    n_folds: int = 5,
    column_sets: dict[str, np.ndarray] | None = None,
) -> dict:
    """An L2 logistic regression on standardised features, C (and the features) chosen by a grouped inner CV.

    Parameters
    ----------
    features : float array (n_views, n, n_features) or (n, n_features)
        Training features; with several views every view is a training sample (augmentation),
        and inner folds keep all views of an image (and every image of a group) together.
    targets : (n,) 0/1
    groups : (n,) str
        Patient (else lesion, else image) of each image: inner folds never split a group.
    balanced : bool
        Weight the classes equally (what ``balance="oversample"`` does for gradient heads), so
        probabilities are centred on 0.5 rather than on the prevalence.
    cs : the C values tried; n_folds : inner folds (fewer when a class has fewer groups).
    column_sets : {name: column indices}, optional
        Candidate feature subsets (e.g. the last map's average pool vs every pooled level), chosen
        together with C by the same inner CV; columns outside the chosen set get weight 0.
        Default: one set, every column.

    Returns
    -------
    dict
        ``kernel`` (n_features, 1) float32 and ``bias`` (1,) float32 of a sigmoid Dense layer on
        the raw (unstandardised) features; ``C``; ``columns`` (the chosen set's name);
        ``inner_auroc`` {C: AUROC of the inner out-of-fold scores} for the chosen set and
        ``inner_auroc_by_set`` {set: {C: AUROC}}; ``inner_folds``; ``chosen_on`` (a sentence).
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    y = np.asarray(targets).astype(int)
    groups = np.asarray(groups).astype(str)
    n_views, n_features = x.shape[0], x.shape[-1]
    sets = {"all": np.arange(n_features)} if not column_sets else {k: np.asarray(v) for k, v in column_sets.items()}
    weight = "balanced" if balanced else None
    per_class = min(len(set(groups[y == 1])), len(set(groups[y == 0])))
    folds_k = min(int(n_folds), per_class)

    def fit(rows: np.ndarray, c: float, columns: np.ndarray):
        stacked = x[:, rows][:, :, columns].reshape(-1, len(columns))
        mean, scale = stacked.mean(0), stacked.std(0)
        scale[scale < 1e-12] = 1.0
        model = LogisticRegression(C=c, class_weight=weight, max_iter=5000)
        model.fit((stacked - mean) / scale, np.tile(y[rows], n_views))
        return model, mean, scale

    scores: dict[str, dict[float, float]] = {}
    if folds_k >= 2:
        folds = group_kfold(groups, y, folds_k, seed=seed)
        for name, columns in sets.items():
            scores[name] = {}
            for c in cs:
                oof = np.empty(len(y))
                for k in range(folds_k):
                    model, mean, scale = fit(np.flatnonzero(folds != k), c, columns)
                    held = np.flatnonzero(folds == k)
                    oof[held] = np.mean(
                        [model.predict_proba((x[v, held][:, columns] - mean) / scale)[:, 1] for v in range(n_views)],
                        axis=0,
                    )
                scores[name][float(c)] = float(auroc(y, oof))
        # Best inner AUROC; ties go to the smaller feature set, then the stronger penalty.
        order = list(sets)
        chosen_set, chosen = max(
            ((name, c) for name in order for c in scores[name]),
            key=lambda t: (scores[t[0]][t[1]], -len(sets[t[0]]), -t[1]),
        )
        what = "C" + (" and the feature set" if len(sets) > 1 else "")
        chosen_on = (
            f"{what} chosen by a {folds_k}-fold cross-validation grouped by patient (else lesion) inside "
            "the training split; the validation images were not used"
        )
    else:
        chosen_set, chosen = list(sets)[-1], 0.01
        chosen_on = (
            "C fixed at 0.01 and every feature used: too few groups of one class in the training split for "
            "an inner cross-validation"
        )
    columns = sets[chosen_set]
    model, mean, scale = fit(np.arange(len(y)), chosen, columns)
    coef = np.zeros(n_features)
    coef[columns] = model.coef_.reshape(-1) / scale
    bias = float(model.intercept_[0] - np.sum(model.coef_.reshape(-1) * mean / scale))
    return {
        "kernel": coef.astype(np.float32)[:, None],
        "bias": np.array([bias], dtype=np.float32),
        "C": chosen,
        "columns": chosen_set,
        "inner_auroc": scores.get(chosen_set, {}),
        "inner_auroc_by_set": scores,
        "inner_folds": folds_k if folds_k >= 2 else 0,
        "chosen_on": chosen_on,
    }


def pooling_column_sets(backbone) -> dict[str, np.ndarray] | None:
    """Candidate feature sets of a multi-level backbone for :func:`fit_logistic_head`:
    ``{"last map (avg)": the last map's average-pool columns, "multi-level": every column}``;
    None for an average-pooled backbone (one set)."""
    layer = next((lay for lay in backbone.layers if lay.name == "features"), None)
    inputs = layer.input if layer is not None else None
    if not isinstance(inputs, (list, tuple)):
        return None
    offsets, start = {}, 0
    for tensor in inputs:  # the Concatenate's own inputs, in their order
        width = int(tensor.shape[-1])
        offsets[tensor._keras_history.operation.name] = np.arange(start, start + width)
        start += width
    top_avg = [name for name in offsets if name.endswith("_avg")][-1]
    return {"last map (avg)": offsets[top_avg], "multi-level": np.arange(start)}


def _logistic_head_run(
    config,
    data,
    extractor,
    info,
    computed,
    cache,
    x_train,
    y_train,
    groups_train,
    x_val,
    y_val,
    val_table,
    counts,
    train_views,
    val_view_index,
    all_views,
    views,
    out: RunDir,
    reporter,
    cancel,
    device,
    n_replicas,
    deterministic,
    started,
):
    """The ``head_fit="logistic-cv"`` tail of :func:`_fast_head_in_run_dir` (same run files and keys)."""

    from melcore import models

    spec = models.get_spec(config.model)
    reporter.stage = "head"
    reporter.report(0, None, {"done": 0, "total": 1}, epoch=0, stage="head")
    head_started = time.perf_counter()
    fitted = fit_logistic_head(
        x_train,
        y_train,
        groups_train,
        seed=config.seed,
        balanced=config.balance != "none",
        column_sets=pooling_column_sets(extractor.backbone),
    )
    head = models.build_head(extractor.n_features, dropout=0.0)
    head.get_layer(models.OUTPUT_LAYER).set_weights([fitted["kernel"], fitted["bias"]])
    head_seconds = time.perf_counter() - head_started
    log.info(
        "head: L2 logistic regression on %d standardised features (%s), C=%g (%s; inner AUROC by C: %s) in %.1f s",
        extractor.n_features,
        fitted["columns"],
        fitted["C"],
        fitted["chosen_on"],
        ", ".join(f"{c:g}: {a:.3f}" for c, a in fitted["inner_auroc"].items()) or "none",
        head_seconds,
    )
    reporter.report(1, None, {"done": 1, "total": 1}, epoch=1, stage="head")
    if cancel.requested():
        cancel.cancelled = True
    model = models.join(extractor.backbone, head, name=spec.name)
    save_started = time.perf_counter()
    out.save_model(model)
    p = score_features(head, x_val[val_view_index] if config.tta else x_val[[all_views.index(views[0])]])
    validation = out.write_validation(val_table, p)
    n_params = int(extractor.n_features + 1)
    metrics: dict[str, Any] = {
        "kind": "image",
        "mode": "fast-head",
        "head_fit": "logistic-cv",
        "scorer": "cnn",
        "scorer_description": scorer_description(config),
        "status": "cancelled" if cancel.cancelled else "done",
        "cancelled": cancel.cancelled,
        "model": config.model,
        "clinic": config.clinic,
        "image_size": config.image_size,
        "pooling": config.pooling,
        "cohort": getattr(data.cohort, "name", None),
        "best_epoch": None,
        "best_epoch_val_auroc": None,
        **counts,
        "excluded": data.excluded,
        "split": data.split,
        "history": [],
        "stages": [stage_record("head", 0, 0, None, [], n_params)],
        "epochs_run": 0,
        "planned_epochs": 0,
        "early_stopped": False,
        "logistic_head": {
            "C": fitted["C"],
            "features": fitted["columns"],
            "inner_auroc": {f"{c:g}": a for c, a in fitted["inner_auroc"].items()},
            "inner_auroc_by_set": {
                name: {f"{c:g}": a for c, a in by_c.items()} for name, by_c in fitted["inner_auroc_by_set"].items()
            },
            "inner_folds": fitted["inner_folds"],
            "balanced": config.balance != "none",
        },
        "chosen_on": {
            "C": fitted["chosen_on"],
            "epochs": "none: the head is fitted in closed form, no epochs",
            "fitted_on": f"{len(y_train)} images: the training and the selection patients together "
            "(no epoch to choose, so the selection split chooses nothing)",
        },
        **environment_metrics(config, info, device, n_replicas, deterministic),
        **_feature_timings(extractor, computed, all_views, cache, computed.seconds, head_seconds),
        **validation,
        "seconds": time.perf_counter() - started,
        "train_seconds": head_seconds,
        "fit_seconds": head_seconds,
        "save_seconds": time.perf_counter() - save_started,
        "images_per_second": None,
    }
    out.write_metrics(metrics)
    log.info(
        "done in %.1f s (features %.1f s, head %.1f s): validation AUROC %s",
        metrics["seconds"],
        computed.seconds,
        head_seconds,
        format_auroc(metrics["val_auroc"]),
    )
    return out.run(config, metrics, cancel.cancelled)
