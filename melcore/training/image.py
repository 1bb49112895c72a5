"""Full training (``mode="full"``): the whole image model trained on the images of a cohort.

:func:`fit_image` is what :func:`melcore.training.api.fit` calls for ``mode="full"``; it
takes a config resolved by :func:`melcore.training.config.validate` and returns a
:class:`melcore.training.rundir.Run`. What it does, in order (everything up to step 4
fails fast, before training):

1. takes a validated config (:func:`melcore.training.config.validate`);
2. keeps the clinic's rows (``config.clinic``), then the labelled rows with an image
   file, and says how many were left out and why (log and ``metrics["excluded"]``);
   refuses a cohort with one class only;
3. splits by patient (else lesion, else image) with the leakage check:
   :func:`melcore.splits.cohort_split` (``val_fraction``) or fold ``config.fold`` of
   :func:`melcore.splits.cohort_folds`, then holds out ``select_fraction`` of the
   training patients (the *selection* split, also grouped and stratified) to choose the
   best epoch and to stop early; all three parts must hold both classes. The
   validation images are scored once, with the chosen weights, and never choose anything;
4. seeds Python, NumPy and Keras (:func:`keras.utils.set_random_seed`) and builds the
   model (inside ``strategy.scope()`` when a tf.distribute strategy is given); weights
   that cannot be loaded raise ConfigError here unless ``fallback_to_scratch``;
5. decodes every image once at the working size into the on-disk image cache
   (stage ``"load"``); unreadable files are left out and reported;
6. trains. With loaded weights (ImageNet or a file): the head on the frozen backbone for ``epochs``
   epochs (stage ``"head"``), then, when ``fine_tune_epochs`` > 0, the top
   ``unfreeze_blocks`` block groups as well at ``learning_rate x recipe.finetune_lr_factor``
   (stage ``"fine-tune"``). From scratch: everything for ``epochs + fine_tune_epochs``
   epochs (stage ``"train"``). After every epoch the selection split is scored
   (stage ``"validate"``); training stops early when its AUROC has not improved for
   ``early_stopping_patience`` epochs (per stage), and the weights of the epoch best on
   the selection split are restored (before fine-tuning and at the end);
7. writes the run directory.

The run directory and its files: :mod:`melcore.training.rundir`. Progress:
``progress(epoch, batch, loss, metrics, eta)``, see :func:`melcore.training.api.fit`.
Reproducibility and op determinism: :mod:`melcore.training.runtime`. Under a
MultiWorkerMirroredStrategy (several processes, :mod:`melcore.distributed`) the stages run
through :func:`melcore.distributed.fit_loop` instead of ``Model.fit`` and the selection and
validation images are scored batch by batch; every worker computes the same scores, so they
all stop at the same epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np

from melcore import colour
from melcore.distributed import fit_loop, is_multi_worker
from melcore.errors import ConfigError
from melcore.metrics import auroc_or_none, format_auroc
from melcore.predict import predict_dataset
from melcore.training.callbacks import (
    BestEpoch,
    Cancellation,
    Progress,
    ProgressReporter,
    ShouldStop,
    bce,
    keras_callbacks,
)
from melcore.training.config import TrainConfig
from melcore.training.optimizers import make_optimizer
from melcore.training.prepare import (
    PreparedData,
    drop_unreadable,
    prepare_data,
    select_table,
    split_tables,
)
from melcore.training.recipes import recipe_for
from melcore.training.rundir import (
    THRESHOLD,
    Run,
    RunDir,
    epoch_run_metrics,
    log_run_start,
    log_stage,
    stage_record,
)
from melcore.training.runtime import device_description, op_determinism

__all__ = ["STAGES", "fit_image"]

log = logging.getLogger("melcore.train")

STAGES = ("load", "head", "fine-tune", "train", "validate")


def fit_image(
    config: TrainConfig,
    cohort,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    run_dir=None,
    strategy=None,
) -> Run:
    """Train the whole model on the images (``mode="full"``); write and return the run.

    ``config`` is resolved (:func:`melcore.training.config.validate`); the other parameters,
    the run's files and ``metrics`` are those of :func:`melcore.training.api.fit`.
    """
    started = time.perf_counter()
    data = prepare_data(config, cohort)

    import keras

    from melcore import models

    with op_determinism(config.deterministic) as deterministic:
        keras.utils.set_random_seed(config.seed)
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            model, weights_info = models.build_model(
                config.model,
                config.image_size,
                weights=config.weights,
                pooling=config.pooling,
                fallback_to_scratch=config.fallback_to_scratch,
            )
        if weights_info.loaded and config.fine_tune_epochs > 0:
            check_unfreeze_blocks(model, config.unfreeze_blocks)
        out = RunDir.create(run_dir, config)
        with out.log():
            try:
                return _fit_in_run_dir(
                    config,
                    data,
                    model,
                    weights_info,
                    out,
                    progress,
                    should_stop,
                    strategy,
                    started,
                    bool(deterministic),
                )
            except Exception:
                log.exception("training failed")
                raise


def check_unfreeze_blocks(model, n_blocks: int) -> None:
    """ConfigError before training when the fine-tune stage could not unfreeze ``n_blocks`` groups."""
    from melcore import models

    numbered = [g for g in models.block_groups(model) if g not in ("stem", "top")]
    if n_blocks > len(numbered):
        raise ConfigError(
            f"unfreeze_blocks={n_blocks} but {model.name} has {len(numbered)} block groups "
            f"({', '.join(numbered)}); use at most {len(numbered)}"
        )


def _stages(config: TrainConfig, weights_info) -> list[tuple[str, int]]:
    """(stage, epochs) in order. Any loaded weights (ImageNet, or a file, e.g. a model trained on
    another clinic) get two stages: a fresh head on the frozen backbone first, so large gradients
    from the random head do not wreck the pretrained features."""
    if weights_info.loaded:
        return [("head", config.epochs)] + (
            [("fine-tune", config.fine_tune_epochs)] if config.fine_tune_epochs > 0 else []
        )
    if config.fine_tune_epochs:
        log.info(
            "no pretrained weights: the %d fine-tune epoch(s) are added to the single training stage",
            config.fine_tune_epochs,
        )
    return [("train", config.planned_epochs)]


def _log_start(config: TrainConfig, data: PreparedData, weights_info, out: RunDir, device: str) -> None:
    log_run_start(log, out, config, data, weights_info, device, config.model)
    if config.deterministic:
        log.info("TensorFlow op determinism is on for this fit (config.deterministic)")


def _decode_images(
    config: TrainConfig, paths: list, cache, reporter: ProgressReporter, cancel: Cancellation
) -> dict[int, str]:
    """Decode every image once at the working size (fills the cache; finds unreadable files before
    training); returns ``{position: reason}`` of the unreadable ones. Stage ``"load"``."""
    from melcore import images as images_module

    bad: dict[int, str] = {}
    total = len(paths)
    chunk = max(64, config.batch_size * 4)
    reporter.stage = "load"
    reporter.report(0, None, {"done": 0, "total": total}, epoch=0, stage="load")
    load_started = time.perf_counter()
    for start in range(0, total, chunk):
        if cancel.requested():
            break

        def failed(index, error, offset=start):
            bad[offset + index] = error.reason

        def loading(done, _total, offset=start):
            reporter.report(0, None, {"done": offset + done, "total": total}, epoch=0, stage="load")

        images_module.load_images(
            paths[start : start + chunk],
            config.image_size,
            cache=cache,
            workers=config.workers,
            on_error=failed,
            progress=loading,
        )
    if not cancel.cancelled:
        log.info("decoded %d images at %d px in %.1f s", total, config.image_size, time.perf_counter() - load_started)
    return bad


def _train_stages(
    config: TrainConfig,
    model,
    stages,
    train_data,
    class_weight,
    callbacks,
    strategy,
    reporter: ProgressReporter,
    cancel: Cancellation,
    best: BestEpoch,
    history: list,
) -> list[dict]:
    """Compile and fit ``model`` stage by stage; returns the ``metrics["stages"]`` records."""
    import keras

    from melcore import models

    recipe = recipe_for(config.model)
    steps = reporter.steps
    stage_records = []
    epoch_offset = 0
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    for stage, n_epochs in stages:
        if cancel.requested():
            break
        if stage == "fine-tune" and best.best_weights is not None:
            model.set_weights(best.best_weights)  # fine-tune from the best head epoch
        trainable_stage = {"head": "head", "fine-tune": "fine-tune", "train": "all"}[stage]
        lr = config.learning_rate * (recipe.finetune_lr_factor if stage == "fine-tune" else 1.0)
        with scope:
            info = models.set_trainable(
                model, trainable_stage, config.unfreeze_blocks if stage == "fine-tune" else None
            )
            optimizer = make_optimizer(
                recipe, lr, steps, n_epochs, optimizer=config.optimizer, schedule=config.schedule
            )
            model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy())
        unfrozen = f", unfrozen: {', '.join(info['unfrozen_groups'])}" if info["unfrozen_groups"] else ""
        log_stage(
            log,
            stage,
            n_epochs,
            steps,
            config,
            lr,
            f"{info['trainable_params']:,} trainable / {info['frozen_params']:,} frozen params{unfrozen}",
        )
        reporter.stage = stage
        best.start_stage(config.early_stopping_patience)
        reporter.batch_seconds = None if stage != "fine-tune" else reporter.batch_seconds
        epochs_before = len(history)
        if is_multi_worker(strategy):  # Model.fit cannot drive it (keras-team/keras#20585)
            fit_loop(
                model,
                train_data,
                epochs=epoch_offset + n_epochs,
                initial_epoch=epoch_offset,
                class_weight=class_weight,
                callbacks=callbacks,
                strategy=strategy,
            )
        else:
            model.fit(
                train_data,
                epochs=epoch_offset + n_epochs,
                initial_epoch=epoch_offset,
                shuffle=False,
                class_weight=class_weight,
                callbacks=callbacks,
                verbose=0,
            )
        run_epochs = len(history) - epochs_before
        stage_records.append(
            stage_record(stage, n_epochs, run_epochs, lr, info["unfrozen_groups"], info["trainable_params"])
        )
        # Epoch numbers stay contiguous when a stage stops early.
        epoch_offset += run_epochs
        reporter.total_epochs -= n_epochs - run_epochs if not cancel.cancelled else 0
        if cancel.cancelled:
            break
    return stage_records


def _fit_in_run_dir(
    config: TrainConfig,
    data: PreparedData,
    model,
    weights_info,
    out: RunDir,
    progress,
    should_stop,
    strategy,
    started: float,
    deterministic: bool,
) -> Run:

    from melcore import images as images_module
    from melcore.pipeline import ImageBatches, PredictionBatches, class_weights

    device, n_replicas = device_description(strategy)
    _log_start(config, data, weights_info, out, device)
    reporter = ProgressReporter(progress)
    cancel = Cancellation(should_stop, reporter)
    best = BestEpoch()
    history: list[dict] = []
    stages = _stages(config, weights_info)
    reporter.total_epochs = sum(n for _, n in stages)

    cache = images_module.ImageCache() if config.cache_images else None
    bad = _decode_images(config, data.cohort.table["image_path"].tolist(), cache, reporter, cancel)
    data = drop_unreadable(data, bad, config)
    train_table, val_table, counts = split_tables(data)
    selection = select_table(data)
    y_val = val_table["target"].astype("float64").to_numpy()
    y_select = selection["target"].astype("float64").to_numpy()

    train_data = ImageBatches.from_table(
        train_table,
        config.image_size,
        batch_size=config.batch_size,
        augment=config.augment,
        balance="none" if config.balance == "class-weight" else config.balance,
        seed=config.seed,
        cache=cache,
        workers=config.workers,
    )
    class_weight = (
        class_weights(train_table["target"].astype("float32").to_numpy()) if config.balance == "class-weight" else None
    )
    reporter.steps = len(train_data)
    val_paths = val_table["image_path"].tolist()
    val_batch = max(config.batch_size, 32)
    per_batch = is_multi_worker(strategy)

    def predict_paths(paths: list, tta: bool = False) -> np.ndarray | None:
        sizes = [min(val_batch, len(paths) - s) for s in range(0, len(paths), val_batch)]
        dataset = PredictionBatches(paths, config.image_size, batch_size=val_batch, cache=cache, workers=config.workers)

        def validating(done, total_):
            batch_no = min(len(sizes), max(1, math.ceil(done / val_batch)))
            reporter.report(
                reporter.steps,
                reporter.loss,
                {"val_batch": batch_no, "val_steps": len(sizes)},
                eta=reporter.eta(reporter.steps, validating=True),
                stage="validate",
            )

        return predict_dataset(
            model,
            dataset,
            len(paths),
            sizes,
            tta,
            progress=validating,
            should_stop=cancel.requested,
            per_batch=per_batch,
        )

    def score_selection() -> dict | None:
        p = predict_paths(selection["image_path"].tolist())
        if p is None:
            return None
        return {"select_auroc": auroc_or_none(y_select, p), "select_loss": bce(y_select, p)}

    callbacks = keras_callbacks(reporter, cancel, best, history, score_selection, config.batch_size)
    fit_started = time.perf_counter()
    stage_records = _train_stages(
        config, model, stages, train_data, class_weight, callbacks, strategy, reporter, cancel, best, history
    )
    fit_seconds = time.perf_counter() - fit_started

    if best.best_weights is not None:
        model.set_weights(best.best_weights)
    metrics = epoch_run_metrics(
        config,
        data,
        counts,
        best=best,
        history=history,
        stages=stage_records,
        planned_epochs=sum(n for _, n in stages),
        cancelled=cancel.cancelled,
        weights_info=weights_info,
        device=device,
        n_replicas=n_replicas,
        deterministic=deterministic,
    )

    def score_validation() -> np.ndarray | None:
        if config.tta:
            log.info("scoring the validation set with 8-view test-time augmentation")
        return predict_paths(val_paths, config.tta)

    predictions = out.save_and_score(model, best, cancel, score_validation)
    cnn_predictions = predictions
    colour_predictions = None
    if predictions is not None and config.colour_model:
        colour_predictions = _colour_scores(
            config, data, train_table, val_paths, y_val, cnn_predictions, cache, out, cancel
        )
        predictions = colour_predictions  # None when cancelled during the colour model
    delivered_by_colour = colour_predictions is not None
    metrics["scorer"] = "colour-model" if delivered_by_colour else "cnn"
    metrics["scorer_description"] = _scorer_description(config, delivered_by_colour)
    seconds = out.write_results(
        metrics,
        val_table,
        predictions,
        best=best,
        cancel=cancel,
        reporter=reporter,
        history=history,
        started=started,
        fit_seconds=fit_seconds,
        columns={"cnn_prediction": cnn_predictions} if delivered_by_colour else None,
        scores={
            "cnn_val_auroc": auroc_or_none(y_val, cnn_predictions),
            "colour_val_auroc": auroc_or_none(y_val, colour_predictions),
            "cnn_val_loss": bce(y_val, cnn_predictions),
        }
        if delivered_by_colour
        else None,
    )
    if not cancel.cancelled:
        log.info(
            "done in %.1f s: validation AUROC %s (best epoch %s), sensitivity %.3f, specificity %.3f at %.2f; %s",
            seconds,
            format_auroc(metrics["val_auroc"]),
            best.best_epoch,
            metrics["sensitivity"],
            metrics["specificity"],
            THRESHOLD,
            "trained from scratch" if weights_info.from_scratch else weights_info.note,
        )
    return out.run(config, metrics, cancel.cancelled)


def _colour_scores(
    config: TrainConfig,
    data: PreparedData,
    train_table,
    val_paths: list,
    y_val: np.ndarray,
    cnn_predictions: np.ndarray,
    cache,
    out: RunDir,
    cancel: Cancellation,
) -> np.ndarray | None:
    """Fit the colour/shape model on the training split, save ``colour_model.json`` and score the
    validation images; None when cancelled (and then no colour model is left behind)."""
    colour_predictions = None
    if not cancel.requested():
        colour_started = time.perf_counter()
        log.info("fitting the colour/shape model on %d training images", len(train_table))
        colour_model = colour.fit_colour_model(
            train_table["image_path"].tolist(),
            train_table["target"].astype("int64").to_numpy(),
            data.cohort.groups.iloc[data.train_idx].to_numpy(),
            cache=cache,
            workers=config.workers,
        )
        if not cancel.requested():
            out.save_colour_model(colour_model)
            colour_predictions = colour.colour_probabilities(
                colour_model, val_paths, cache=cache, workers=config.workers
            )
            log.info(
                "colour model: validation AUROC %s (CNN %s), %.1f s; it scores the delivered predictions",
                format_auroc(auroc_or_none(y_val, colour_predictions)),
                format_auroc(auroc_or_none(y_val, cnn_predictions)),
                time.perf_counter() - colour_started,
            )
    if colour_predictions is None:
        out.remove(colour.COLOUR_MODEL_FILE)
    return colour_predictions


def _scorer_description(config: TrainConfig, colour_scores: bool) -> str:
    """``metrics["scorer_description"]`` of a full-mode run."""
    if colour_scores:
        return "colour SVM (RBF) on colour/texture/shape features"
    from melcore import models

    return f"CNN ({models.get_spec(config.model).name}, trained end to end)"
