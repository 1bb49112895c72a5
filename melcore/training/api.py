"""Train a model on a cohort into a run directory: :func:`fit`, one way in for every mode.

:class:`TrainConfig` says what to train (JSON round trip, validated before any data is
touched); :func:`fit` validates it and hands it to the mode's trainer (:data:`TRAINERS`:
``"full"`` -> :func:`melcore.training.image.fit_image`, ``"fast-head"`` ->
:func:`melcore.training.fast_head.fit_fast_head`), which returns a :class:`Run`::

    config = TrainConfig(model="efficientnet-b3", image_size=300, epochs=3, fine_tune_epochs=5,
                         weights="imagenet", clinic="clinic-north")
    run = fit(config, load_cohort("train.csv", "jpeg/train"), progress=print)
    run.metrics["val_auroc"], run.load_model()

The modes never import this module; :mod:`melcore.training.crossval` trains its folds and
clinics through it.
"""

from __future__ import annotations

from typing import Callable

from melcore.training.callbacks import Progress, ShouldStop
from melcore.training.config import TrainConfig, validate
from melcore.training.fast_head import fit_fast_head
from melcore.training.image import fit_image
from melcore.training.rundir import Run

__all__ = ["TRAINERS", "fit"]

#: mode -> trainer ``(config, cohort, progress, should_stop, run_dir, strategy) -> Run``; one per :data:`MODES`.
TRAINERS: dict[str, Callable[..., Run]] = {"full": fit_image, "fast-head": fit_fast_head}


def fit(
    config: TrainConfig,
    cohort,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    run_dir=None,
    strategy=None,
) -> Run:
    """Train a model on a cohort as ``config.mode`` says; write and return the run.

    Parameters
    ----------
    config : TrainConfig (or a dict for :meth:`TrainConfig.from_dict`)
    cohort : melcore.cohort.Cohort
    progress : callable(epoch, batch, loss, metrics, eta), optional
        Called from the training thread after every training batch (so at least once a
        second unless one batch takes longer), during image loading and validation, and
        once at the end of each epoch. Arguments: ``epoch`` 1-based over all stages (0
        while loading images), ``batch`` 1-based within the epoch, ``loss`` the running
        mean training loss of the epoch (None while loading), ``eta`` estimated seconds
        left (None until the first batch is timed). ``metrics`` always holds
        ``epochs`` (total planned), ``steps`` (batches per epoch), ``stage`` (one of
        ``"load"``, ``"head"``, ``"fine-tune"``, ``"train"``, ``"validate"``); during
        ``"load"`` also ``done`` / ``total`` images; during ``"validate"`` also
        ``val_batch`` / ``val_steps``; at each epoch end a call with ``end_of_epoch: True``,
        ``select_auroc``, ``select_loss`` (of the selection split), ``train_loss``,
        ``best_select_auroc``, ``best_epoch``.
        Keep it cheap.
    should_stop : callable() -> bool, optional
        Polled after every training batch, every validation batch, between image-loading
        chunks and between stages. When true, training stops within one batch and the
        returned run has ``cancelled=True``.
    run_dir : path, optional
        Default :func:`melcore.training.rundir.default_run_dir`. Created if needed; files in it are replaced.
    strategy : tf.distribute.Strategy, optional
        The model is built and compiled inside ``strategy.scope()`` (e.g. MirroredStrategy
        over several GPUs); the batch size is the global batch.

    Returns
    -------
    Run
        ``run.metrics`` (also ``metrics.json``): kind ("image"), status ("done" /
        "cancelled"), cancelled, model, clinic, image_size, val_auroc (of the saved
        validation predictions, with TTA when ``config.tta``; the validation images choose
        nothing), best_epoch (chosen on the selection split), best_epoch_select_auroc (the
        early-stopping criterion, without TTA), chosen_on (which images chose what, see
        :func:`melcore.training.prepare.chosen_on`), val_loss, threshold (0.5),
        sensitivity, specificity (at 0.5, of the delivered ``prediction``), scorer ("cnn" or
        "colour-model"; with the colour model also cnn_val_auroc, colour_val_auroc, cnn_val_loss),
        scorer_description (the scorer in words),
        n_train, n_select, n_val, n_malignant {"train", "select", "val"},
        n_patients {"train", "select", "val"}, excluded {other_clinics, unlabelled, no_image,
        unreadable, unreadable_images}, split (with ``selection``), history (per epoch: epoch,
        stage, train_loss, select_loss, select_auroc, learning_rate, seconds, best), stages, epochs_run,
        planned_epochs, early_stopped, weights (WeightsInfo dict: requested, loaded,
        from_scratch, note, source, scope), from_scratch, seconds, train_seconds,
        images_per_second, device, n_replicas, deterministic_ops, versions, tta, cohort.

    Raises
    ------
    ConfigError, CohortError, LeakageError
        Before training: bad config, empty clinic, one class only (in the cohort or on a
        side of the split), weights that cannot be loaded (without fallback).
    """
    config = validate(config)
    return TRAINERS[config.mode](
        config, cohort, progress=progress, should_stop=should_stop, run_dir=run_dir, strategy=strategy
    )
