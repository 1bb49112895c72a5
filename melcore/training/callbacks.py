"""Training callbacks, one job each: progress, cancel, selection scoring, best epoch.

The state of each job is a plain object, shared by the training loop of a mode and the
Keras callbacks :func:`keras_callbacks` makes from it:

* :class:`ProgressReporter` calls ``progress(epoch, batch, loss, metrics, eta)`` and keeps
  the ETA (seconds per batch, smoothed; validation time);
* :class:`Cancellation` polls ``should_stop`` and remembers that it was asked;
* :class:`BestEpoch` holds the monitored value (selection AUROC, ties to the lower
  selection loss), the patience and the best weights, like Keras' ``EarlyStopping``;
* the selection-scoring callback scores the selection split after every epoch (the
  held-out training patients, never the validation images), feeds :class:`BestEpoch`,
  appends the epoch to the run's history and reports it.

:func:`melcore.metrics.auroc_or_none` and :func:`bce` are the scores used for choosing and for
``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np

from melcore.metrics import format_auroc

__all__ = [
    "Progress",
    "ShouldStop",
    "ProgressReporter",
    "Cancellation",
    "BestEpoch",
    "keras_callbacks",
    "bce",
    "current_lr",
]

log = logging.getLogger("melcore.train")

Progress = Callable[[int, int, float, dict, "float | None"], None]
ShouldStop = Callable[[], bool]


class ProgressReporter:
    """Where the run is, told to ``progress``; the ETA.

    Parameters
    ----------
    progress : callable(epoch, batch, loss, metrics, eta) or None
        See :func:`melcore.training.api.fit`.
    total_epochs : int
        Planned epochs over all stages (lowered when a stage stops early).
    """

    def __init__(self, progress: Progress | None, total_epochs: int = 0):
        self.progress = progress
        self.total_epochs = total_epochs
        self.steps = 0
        self.stage = "train"
        self.epoch = 0  # 1-based epoch being run
        self.loss: float | None = None
        self.train_seconds = 0.0
        self.train_images = 0
        self.val_seconds: list[float] = []
        self.batch_seconds: float | None = None  # smoothed seconds per training batch
        self.epoch_start = 0.0
        self._batch_clock = 0.0

    def eta(self, batch: int, validating: bool = False) -> float | None:
        """Seconds left in the run from ``batch`` of the current epoch; None until a batch is timed."""
        if self.batch_seconds is None:
            return None
        val = float(np.mean(self.val_seconds)) if self.val_seconds else self.batch_seconds * self.steps * 0.3
        epochs_after = max(0, self.total_epochs - self.epoch)
        remaining = 0.0 if validating else (self.steps - batch) * self.batch_seconds + val
        return remaining + epochs_after * (self.steps * self.batch_seconds + val)

    def report(
        self,
        batch: int,
        loss: float | None,
        extra: dict | None = None,
        eta: float | None = None,
        epoch: int | None = None,
        stage: str | None = None,
    ) -> None:
        """One ``progress`` call; ``metrics`` always holds ``epochs``, ``steps`` and ``stage``."""
        if self.progress is None:
            return
        metrics = {"epochs": self.total_epochs, "steps": self.steps, "stage": stage or self.stage}
        if extra:
            metrics.update(extra)
        self.progress(self.epoch if epoch is None else epoch, batch, loss, metrics, eta)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_start = self._batch_clock = time.perf_counter()

    def end_batch(self, batch: int, loss: float, batch_size: int) -> None:
        """Time the batch (``batch`` 1-based), count its images and report it."""
        now = time.perf_counter()
        elapsed = now - self._batch_clock
        self._batch_clock = now
        self.train_seconds += elapsed
        self.train_images += batch_size
        # The first batch of a stage includes graph tracing: do not let it dominate the ETA.
        if self.batch_seconds is None:
            self.batch_seconds = elapsed
        else:
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * elapsed if batch > 1 else self.batch_seconds
        self.loss = loss
        self.report(batch, loss, eta=self.eta(batch))


class Cancellation:
    """``should_stop`` polled; once it said yes, :attr:`cancelled` stays True.

    Parameters
    ----------
    should_stop : callable() -> bool, or None (never)
    where : ProgressReporter, optional
        Names the epoch and stage in the log line of a cancel.
    """

    def __init__(self, should_stop: ShouldStop | None, where: ProgressReporter | None = None):
        self.should_stop = should_stop
        self.where = where
        self.cancelled = False

    def requested(self) -> bool:
        """Whether the run is cancelled (asks ``should_stop`` until it says yes)."""
        if not self.cancelled and self.should_stop is not None and self.should_stop():
            self.cancelled = True
            epoch, stage = (self.where.epoch, self.where.stage) if self.where is not None else (None, None)
            log.info("stop requested: cancelling (epoch %s, stage %s)", epoch, stage)
        return self.cancelled


class BestEpoch:
    """The epoch best on the selection split, its weights, and early stopping by patience.

    An epoch is better when its selection AUROC is higher, or equal with a lower selection
    loss (ties are common when AUROC saturates). An undefined AUROC (None: the selection split
    holds one class, so every epoch's is) never beats a recorded epoch: the first epoch is kept
    and patience runs out. :meth:`start_stage` resets the patience count; the best weights
    carry over from stage to stage.
    """

    def __init__(self):
        self.best_auroc: float | None = -math.inf
        self.best_epoch: int | None = None
        self.best_select_loss: float | None = None
        self.best_weights = None
        self.wait = 0
        self.patience: int | None = None
        self.early_stopped = False

    def start_stage(self, patience: int | None) -> None:
        self.wait = 0
        self.patience = patience

    def update(
        self, epoch: int, auroc_value: float | None, select_loss: float, get_weights: Callable[[], list]
    ) -> bool:
        """Record epoch ``epoch`` (1-based); returns whether it is the best so far."""
        best = self.best_auroc
        improved = self.best_weights is None or (
            auroc_value is not None
            and best is not None
            and (auroc_value > best or (auroc_value == best and select_loss < self.best_select_loss))
        )
        if improved:
            self.best_auroc, self.best_epoch, self.best_select_loss = auroc_value, epoch, select_loss
            self.best_weights = get_weights()
            self.wait = 0
        else:
            self.wait += 1
        return improved

    @property
    def patience_exhausted(self) -> bool:
        return self.patience is not None and self.wait >= self.patience


def keras_callbacks(
    reporter: ProgressReporter,
    cancel: Cancellation,
    best: BestEpoch,
    history: list,
    score_selection: Callable[[], dict | None],
    batch_size: int,
) -> list:
    """The Keras callbacks of a fit, in the order they must run: progress, cancel, selection scoring.

    ``score_selection()`` scores the selection split: ``{"select_auroc", "select_loss"}``, or None
    when cancelled while scoring. Each epoch scored is appended to ``history`` (epoch, stage,
    train_loss, select_loss, select_auroc, learning_rate, seconds, best).
    """
    import keras

    class ProgressCallback(keras.callbacks.Callback):
        """Timing, ETA and a progress call after every training batch."""

        def on_epoch_begin(self, epoch, logs=None):
            reporter.start_epoch(epoch + 1)

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", float("nan")))
            reporter.end_batch(batch + 1, loss, batch_size)

    class CancelCallback(keras.callbacks.Callback):
        """Stops training within one batch of ``should_stop``."""

        def on_train_batch_end(self, batch, logs=None):
            if cancel.requested():
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if cancel.cancelled or cancel.requested():
                self.model.stop_training = True

    class SelectionScoring(keras.callbacks.Callback):
        """Per-epoch selection AUROC into :class:`BestEpoch` and ``history``; early stopping."""

        def on_epoch_end(self, epoch, logs=None):
            if cancel.cancelled:
                return
            train_loss = float((logs or {}).get("loss", reporter.loss if reporter.loss is not None else math.nan))
            started = time.perf_counter()
            scores = score_selection()
            if scores is None:  # cancelled while predicting
                self.model.stop_training = True
                return
            reporter.val_seconds.append(time.perf_counter() - started)
            auroc_value, select_loss = scores["select_auroc"], scores["select_loss"]
            improved = best.update(epoch + 1, auroc_value, select_loss, self.model.get_weights)
            history.append(
                {
                    "epoch": epoch + 1,
                    "stage": reporter.stage,
                    "train_loss": train_loss,
                    "select_loss": select_loss,
                    "select_auroc": auroc_value,
                    "learning_rate": current_lr(self.model),
                    "seconds": time.perf_counter() - reporter.epoch_start,
                    "best": improved,
                }
            )
            log.info(
                "epoch %d/%d [%s] train loss %.4f, selection loss %.4f, selection AUROC %s%s",
                epoch + 1,
                reporter.total_epochs,
                reporter.stage,
                train_loss,
                select_loss,
                format_auroc(auroc_value),
                " (best so far)" if improved else "",
            )
            reporter.report(
                reporter.steps,
                train_loss,
                {
                    "end_of_epoch": True,
                    "select_auroc": auroc_value,
                    "select_loss": select_loss,
                    "train_loss": train_loss,
                    "best_select_auroc": best.best_auroc,
                    "best_epoch": best.best_epoch,
                },
                eta=reporter.eta(reporter.steps, validating=True),
            )
            if best.patience_exhausted:
                best.early_stopped = True
                log.info(
                    "early stopping: no better selection AUROC for %d epoch(s) (best %s at epoch %d)",
                    best.wait,
                    format_auroc(best.best_auroc),
                    best.best_epoch,
                )
                self.model.stop_training = True

    return [ProgressCallback(), CancelCallback(), SelectionScoring()]


def current_lr(model) -> float | None:
    """The optimizer's learning rate now (after its schedule), or None."""
    try:
        optimizer = model.optimizer
        lr = optimizer.learning_rate
        if callable(lr):
            lr = lr(optimizer.iterations)
        return float(np.asarray(lr))
    except Exception:  # noqa: BLE001
        return None


def bce(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to [1e-7, 1 - 1e-7]) for 0/1 ``y``."""
    p = np.clip(p.astype("float64"), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
