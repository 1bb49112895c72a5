"""A run directory: the files one training run writes, and :class:`Run`, the run read back.

:class:`RunDir` owns the folder: it clears the result files a previous run left
(:data:`RESULT_FILES`), writes ``config.json``, logs to ``train.log``, saves
``model.keras``, ``val_predictions.csv`` and the colour model, and writes
``metrics.json`` (:meth:`RunDir.write_metrics`, the one writer of that file for image runs,
written last). Files of a run::

    config.json           the resolved TrainConfig
    train.log             the log of the run
    model.keras           best weights (melcore.models.load_model / Run.load_model)
    val_predictions.csv   image_name, patient_id, clinic, target, prediction [, cnn_prediction]
    colour_model.json     only when a colour model scores (melcore.colour)
    metrics.json          written last; ``scorer`` says what delivers ``prediction``

Which model delivers the scores is ``metrics["scorer"]`` (``"cnn"`` or ``"colour-model"``) and,
in words, ``metrics["scorer_description"]``; :func:`run_scorer` reads it, and for run folders
written before it was recorded falls back to the presence of ``colour_model.json``.

Both epoch-trained modes (:mod:`melcore.training.image`, the gradient head of
:mod:`melcore.training.fast_head`) write their run through the same pieces: :func:`log_run_start`
and :func:`log_stage` for ``train.log``, :func:`epoch_run_metrics` (with :func:`stage_record` and
:func:`environment_metrics`) for the keys of ``metrics.json``, and :meth:`RunDir.save_and_score` then
:meth:`RunDir.write_results` for the model, ``val_predictions.csv`` and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

import melcore
from melcore import settings
from melcore.colour import COLOUR_MODEL_FILE
from melcore.errors import MelcoreError
from melcore.formatting import json_safe
from melcore.metrics import auroc_or_none, threshold_metrics
from melcore.training.callbacks import BestEpoch, Cancellation, ProgressReporter, bce
from melcore.training.config import TrainConfig
from melcore.training.prepare import PreparedData, chosen_on

__all__ = [
    "RESULT_FILES",
    "PREDICTION_COLUMNS",
    "THRESHOLD",
    "NO_VALIDATION",
    "SCORER_WORDS",
    "RunDir",
    "Run",
    "run_scorer",
    "validation_metrics",
    "log_run_start",
    "log_stage",
    "stage_record",
    "environment_metrics",
    "epoch_run_metrics",
    "default_run_dir",
    "save_model",
    "write_json",
]

log = logging.getLogger("melcore.train")

#: Files a new run replaces: they are removed when a run starts in an existing folder.
RESULT_FILES = ("metrics.json", "model.keras", "val_predictions.csv", "train.log", COLOUR_MODEL_FILE)
PREDICTION_COLUMNS = ("image_name", "patient_id", "clinic", "target", "prediction")
#: The decision threshold of ``sensitivity`` / ``specificity`` in metrics.json: fixed, chosen by nothing.
THRESHOLD = 0.5
#: The validation keys of metrics.json when there are no validation predictions (a cancelled run).
NO_VALIDATION = {"val_auroc": None, "val_loss": None, "threshold": THRESHOLD, "sensitivity": None, "specificity": None}
#: ``metrics["scorer"]`` values in words (the fallback of :attr:`Run.scorer_description`).
SCORER_WORDS = {"cnn": "CNN", "colour-model": "colour SVM"}


def validation_metrics(y: np.ndarray, predictions: np.ndarray) -> dict:
    """The metrics.json keys of the delivered validation predictions.

    Parameters
    ----------
    y : (n,) 0/1 float
    predictions : (n,) probabilities

    Returns
    -------
    dict
        ``val_auroc``, ``val_loss`` (binary cross-entropy), ``threshold`` (:data:`THRESHOLD`),
        ``sensitivity``, ``specificity`` and ``at_threshold``
        (:func:`melcore.metrics.threshold_metrics` at the threshold).
    """
    at = threshold_metrics(y.astype(int), np.clip(predictions, 0.0, 1.0), THRESHOLD)
    return {
        "val_auroc": auroc_or_none(y, predictions),
        "val_loss": bce(y, predictions),
        "threshold": THRESHOLD,
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "at_threshold": at,
    }


def log_run_start(
    logger: logging.Logger, out: "RunDir", config: TrainConfig, data: PreparedData, weights_info, device: str, what: str
) -> None:
    """Log a run's first lines: what trains on which cohort and device, the config, the weights, the data.

    Parameters
    ----------
    logger : logging.Logger
        The mode's logger (a child of ``melcore.train``, so the lines reach ``train.log``).
    out : RunDir
    config : TrainConfig
    data : PreparedData
        Its ``excluded`` counts are logged.
    weights_info : melcore.models.WeightsInfo
        A warning when it fell back to random weights although ``config.weights`` asked for some.
    device : str
        From :func:`melcore.training.runtime.device_description`.
    what : str
        What trains, e.g. ``config.model`` or ``"fast head on efficientnet-b0 features"``.
    """
    logger.info(
        "run %s: %s at %d px, cohort %r (%s), device %s",
        out.name,
        what,
        config.image_size,
        getattr(data.cohort, "name", "cohort"),
        config.clinic or "all clinics",
        device,
    )
    logger.info("config: %s", json.dumps(config.to_dict()))
    (logger.warning if weights_info.from_scratch and config.weights != "none" else logger.info)(
        "weights: %s", weights_info.note
    )
    ex = data.excluded
    logger.info(
        "data: %d labelled images with files used; left out: %d from other clinics, %d unlabelled, "
        "%d labelled without an image file",
        len(data.cohort),
        ex["other_clinics"],
        ex["unlabelled"],
        ex["no_image"],
    )


def log_stage(
    logger: logging.Logger, stage: str, n_epochs: int, steps: int, config: TrainConfig, lr: float, params: str
) -> None:
    """Log the start of a training stage: epochs x batches of ``config.batch_size``, the optimizer,
    the learning rate ``lr`` and its schedule, then ``params`` (which parameters train, in words)."""
    logger.info(
        "stage %s: %d epoch(s) x %d batches of %d, %s lr %.3g (%s), %s",
        stage,
        n_epochs,
        steps,
        config.batch_size,
        config.optimizer,
        lr,
        config.schedule,
        params,
    )


def stage_record(
    stage: str,
    planned_epochs: int,
    epochs_run: int,
    learning_rate: float | None,
    unfrozen_groups: list,
    trainable_params: int,
) -> dict:
    """One entry of ``metrics["stages"]``: the stage, its planned and run epochs, its learning rate,
    the block groups it unfroze and its number of trainable parameters."""
    return {
        "stage": stage,
        "planned_epochs": planned_epochs,
        "epochs_run": epochs_run,
        "learning_rate": learning_rate,
        "unfrozen_groups": unfrozen_groups,
        "trainable_params": trainable_params,
    }


def environment_metrics(config: TrainConfig, weights_info, device: str, n_replicas: int, deterministic: bool) -> dict:
    """The metrics.json keys saying what a run started from and ran on: ``weights`` and
    ``from_scratch``, ``device`` and ``n_replicas``, ``deterministic_ops``, ``tta`` and the
    TensorFlow and Keras ``versions``."""
    import keras  # lazy: pulls TensorFlow (loaded already by the run that calls this)
    import tensorflow as tf

    return {
        "weights": weights_info.to_dict(),
        "from_scratch": bool(weights_info.from_scratch),
        "device": device,
        "n_replicas": n_replicas,
        "deterministic_ops": deterministic,
        "tta": config.tta,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def epoch_run_metrics(
    config: TrainConfig,
    data: PreparedData,
    counts: dict,
    *,
    best: BestEpoch,
    history: list,
    stages: list,
    planned_epochs: int,
    cancelled: bool,
    weights_info,
    device: str,
    n_replicas: int,
    deterministic: bool,
    **mode,
) -> dict:
    """The metrics.json keys of a run trained epoch by epoch, before its validation is scored.

    Parameters
    ----------
    config, data, counts
        The resolved config, the prepared data and its split counts
        (:func:`melcore.training.prepare.split_tables`).
    best : BestEpoch
        The epoch chosen on the selection split and whether training stopped early.
    history : list of dict
        One entry per epoch run.
    stages : list of dict
        :func:`stage_record` per stage run.
    planned_epochs : int
    cancelled : bool
    weights_info, device, n_replicas, deterministic
        As :func:`environment_metrics`.
    **mode
        Keys placed after ``kind`` (e.g. ``mode="fast-head"``, ``scorer``).

    Returns
    -------
    dict
        ``kind`` ("image"), the ``mode`` keys, ``status``, ``cancelled``, ``model``, ``clinic``,
        ``image_size``, ``cohort``, ``best_epoch``, ``best_epoch_select_auroc``, ``chosen_on``, the
        ``counts``, ``excluded``, ``split``, ``history``, ``stages``, ``epochs_run``,
        ``planned_epochs``, ``early_stopped``, then :func:`environment_metrics`.
    """
    return {
        "kind": "image",
        **mode,
        "status": "cancelled" if cancelled else "done",
        "cancelled": cancelled,
        "model": config.model,
        "clinic": config.clinic,
        "image_size": config.image_size,
        "cohort": getattr(data.cohort, "name", None),
        "best_epoch": best.best_epoch,
        "best_epoch_select_auroc": best.best_auroc if best.best_epoch else None,
        "chosen_on": chosen_on(counts),
        **counts,
        "excluded": data.excluded,
        "split": data.split,
        "history": history,
        "stages": stages,
        "epochs_run": len(history),
        "planned_epochs": planned_epochs,
        "early_stopped": best.early_stopped,
        **environment_metrics(config, weights_info, device, n_replicas, deterministic),
    }


def run_scorer(run_dir, metrics: dict | None = None) -> str:
    """What delivers a run's ``prediction``: ``metrics["scorer"]`` (``"cnn"`` or ``"colour-model"``).

    ``metrics`` defaults to the folder's ``metrics.json``. Runs that do not record it (written
    before the scorer was recorded, or unfinished) count as ``"colour-model"`` when the folder
    holds ``colour_model.json`` and ``"cnn"`` otherwise.
    """
    run_dir = Path(run_dir)
    if metrics is None:
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = {}
    scorer = metrics.get("scorer") if isinstance(metrics, dict) else None
    if scorer:
        return str(scorer)
    return "colour-model" if (run_dir / COLOUR_MODEL_FILE).is_file() else "cnn"


@dataclass
class Run:
    """A trained (or cancelled) run.

    Attributes
    ----------
    run_dir : Path
    config : TrainConfig
        The resolved config the run used.
    metrics : dict
        The content of ``metrics.json``.
    cancelled : bool
        True when ``should_stop`` ended the run early; such a run makes no claim of success.
    """

    run_dir: Path
    config: TrainConfig
    metrics: dict = field(default_factory=dict)
    cancelled: bool = False

    @property
    def model_path(self) -> Path:
        return Path(self.run_dir) / "model.keras"

    @property
    def scorer(self) -> str:
        """What delivers ``prediction``: ``"colour-model"`` or ``"cnn"`` (see :func:`run_scorer`)."""
        return run_scorer(self.run_dir, self.metrics)

    @property
    def scorer_description(self) -> str:
        """The scorer in words (``metrics["scorer_description"]``), e.g. "logistic head on EfficientNet-Lite0
        features"; for run folders written before it was recorded, the words for :attr:`scorer`."""
        return self.metrics.get("scorer_description") or SCORER_WORDS.get(self.scorer, self.scorer)

    @classmethod
    def load(cls, run_dir) -> "Run":
        """Read a run directory written by :func:`melcore.training.api.fit`.

        Raises
        ------
        MelcoreError
            No config.json / metrics.json (not a run, or a run that did not finish).
        """
        run_dir = Path(run_dir).expanduser().resolve()
        config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.json"
        if not config_path.is_file():
            raise MelcoreError(f"{run_dir} is not a training run (no config.json)")
        if not metrics_path.is_file():
            raise MelcoreError(f"{run_dir} holds no metrics.json: the run did not finish (see train.log)")
        config = TrainConfig.from_json(config_path.read_text(encoding="utf-8"))
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        return cls(run_dir, config, metrics, bool(metrics.get("cancelled", False)))

    def load_model(self):
        """The best-weights Keras model (``model.keras``), in Keras safe mode."""
        from melcore.models import load_model

        return load_model(self.model_path)

    def val_predictions(self) -> pd.DataFrame:
        """``val_predictions.csv`` as a DataFrame."""
        path = Path(self.run_dir) / "val_predictions.csv"
        if not path.is_file():
            raise MelcoreError(f"{path} not found (a cancelled run may have none)")
        return pd.read_csv(path, dtype={"image_name": str, "patient_id": str, "clinic": str})


def default_run_dir(config: TrainConfig, kind: str | None = None) -> Path:
    """``settings.subdir("runs") / "<YYYYmmdd-HHMMSS>-<model>-<clinic or all>"`` (not created).

    With ``kind`` (e.g. ``"kfold"``, ``"cross-clinic"``: :mod:`melcore.training.crossval`) the name is
    ``<YYYYmmdd-HHMMSS>-<kind>-<model>-<clinic or all>``. A numeric suffix is added when that
    folder already exists.
    """
    clinic = re.sub(r"[^A-Za-z0-9._-]+", "_", config.clinic or "all").strip("_") or "clinic"
    prefix = f"{datetime.now():%Y%m%d-%H%M%S}" + (f"-{kind}" if kind else "")
    base = settings.subdir("runs") / f"{prefix}-{config.model}-{clinic}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class RunDir:
    """The folder of one run, and the one writer of its files.

    Parameters
    ----------
    path : path
        The folder (made absolute; created by :meth:`create`).

    Use :meth:`create` to start a run: it makes the folder, removes the result files of an
    earlier run and writes ``config.json``.
    """

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def create(
        cls, path, config: TrainConfig, kind: str | None = None, stale: tuple[str, ...] = RESULT_FILES
    ) -> "RunDir":
        """Make the folder (default :func:`default_run_dir` of ``config`` and ``kind``), remove the
        ``stale`` files an earlier run left there and write ``config.json``."""
        path = Path(path).expanduser() if path is not None else default_run_dir(config, kind)
        path.mkdir(parents=True, exist_ok=True)
        run_dir = cls(path.resolve())
        run_dir.remove(*stale)
        run_dir.write_json("config.json", config.to_dict())
        return run_dir

    def remove(self, *names: str) -> None:
        """Delete these files of the run when they exist."""
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def write_json(self, name: str, data: dict) -> dict:
        """Write ``data`` as strict JSON (NaN and inf as null) atomically; returns what was written."""
        return write_json(self.path / name, data)

    def write_metrics(self, metrics: dict) -> dict:
        """Write ``metrics.json`` (last, once the other files are in place) with ``melcore_version``, the
        code behind its numbers; returns the cleaned metrics."""
        metrics["melcore_version"] = melcore.__version__  # in place: the Run's metrics are the file's
        return self.write_json("metrics.json", metrics)

    def finish(
        self,
        metrics: dict,
        reporter,
        started: float,
        fit_seconds: float,
        *,
        cancelled: bool,
        has_model: bool,
        n_epochs: int,
        **extra,
    ) -> float:
        """Add the run's timings to ``metrics``, write ``metrics.json`` and log a cancellation.

        Timings: ``seconds`` since ``started`` (a ``time.perf_counter()`` value), the
        reporter's ``train_seconds`` and training ``images_per_second``, ``fit_seconds``,
        plus any ``extra`` values. Returns ``seconds``.
        """
        seconds = time.perf_counter() - started
        metrics.update(
            {
                "seconds": seconds,
                "train_seconds": reporter.train_seconds,
                "fit_seconds": fit_seconds,
                **extra,
                "images_per_second": (reporter.train_images / reporter.train_seconds)
                if reporter.train_seconds > 0
                else None,
            }
        )
        self.write_metrics(metrics)
        if cancelled:
            log.warning(
                "run cancelled after %d epoch(s); %s",
                n_epochs,
                "model.keras holds the best epoch so far" if has_model else "no epoch finished, no model saved",
            )
        return seconds

    def log(self):
        """Context manager: the ``melcore.train`` log goes to ``train.log`` while the block runs."""
        return _run_log(self.path)

    def save_model(self, model) -> None:
        """``model.keras`` (see :func:`save_model`)."""
        save_model(model, self.path / "model.keras")

    def save_colour_model(self, colour_model) -> None:
        """``colour_model.json`` (:class:`melcore.colour.ColourModel`)."""
        colour_model.save(self.path / COLOUR_MODEL_FILE)

    def write_predictions(self, table: pd.DataFrame, predictions, **extra) -> None:
        """``val_predictions.csv``: the :data:`PREDICTION_COLUMNS` of ``table`` (validation rows) with
        ``predictions``, then the ``extra`` columns (e.g. ``cnn_prediction=...``)."""
        columns = {
            "image_name": table["image_name"].astype(str),
            "patient_id": table["patient_id"],
            "clinic": table["clinic"],
            "target": table["target"].astype("int64"),
            "prediction": predictions,
            **extra,
        }
        pd.DataFrame(columns).to_csv(self.path / "val_predictions.csv", index=False)

    def write_validation(self, table: pd.DataFrame, predictions: np.ndarray, **extra) -> dict:
        """``val_predictions.csv`` (:meth:`write_predictions`); returns its :func:`validation_metrics`."""
        self.write_predictions(table, predictions, **extra)
        return validation_metrics(table["target"].astype("float64").to_numpy(), predictions)

    def save_and_score(
        self, model, best: BestEpoch, cancel: Cancellation, score: Callable[[], np.ndarray | None]
    ) -> np.ndarray | None:
        """Save ``model`` (holding the best epoch's weights) when an epoch was chosen, then score the
        validation images with ``score()`` unless the run was cancelled.

        Returns
        -------
        ndarray of float64, shape (n_val,), or None
            Probabilities 0..1 of the validation images; None when no epoch was chosen, the run was
            cancelled, or ``score`` returned None (cancelled while scoring).
        """
        if best.best_weights is None:
            return None
        self.save_model(model)
        return None if cancel.cancelled else score()

    def write_results(
        self,
        metrics: dict,
        val_table: pd.DataFrame,
        predictions: np.ndarray | None,
        *,
        best: BestEpoch,
        cancel: Cancellation,
        reporter: ProgressReporter,
        history: list,
        started: float,
        fit_seconds: float,
        columns: dict | None = None,
        scores: dict | None = None,
        **timings,
    ) -> float:
        """Write ``val_predictions.csv`` and ``metrics.json`` of an epoch-trained run (:meth:`finish`).

        Parameters
        ----------
        metrics : dict
            :func:`epoch_run_metrics`; updated in place with :func:`validation_metrics` (or
            :data:`NO_VALIDATION` without predictions), ``scores`` and the timings.
        val_table : DataFrame
            The validation rows (n_val).
        predictions : ndarray of shape (n_val,) or None
            From :meth:`save_and_score`.
        best, cancel, reporter, history
            The run's BestEpoch, Cancellation, ProgressReporter and epoch history.
        started, fit_seconds : float
            ``time.perf_counter()`` at the start of the run; seconds spent fitting.
        columns : dict, optional
            Extra columns of ``val_predictions.csv`` (name -> array of shape (n_val,)).
        scores : dict, optional
            Further metrics of the validation predictions, added after the validation keys.
        **timings
            Further timing keys (seconds), as :meth:`finish`.

        Returns
        -------
        float
            Seconds since ``started``.

        Raises
        ------
        MelcoreError
            Training ended, not cancelled, without a single validated epoch.
        """
        if predictions is not None:
            metrics.update(self.write_validation(val_table, predictions, **(columns or {})))
            metrics.update(scores or {})
        else:
            metrics.update(NO_VALIDATION)
            if not cancel.cancelled and best.best_weights is None:
                raise MelcoreError("training ended without a single validated epoch")
        if cancel.cancelled:  # also when cancelled after the metrics were gathered (while scoring)
            metrics["cancelled"] = True
            metrics["status"] = "cancelled"
        return self.finish(
            metrics,
            reporter,
            started,
            fit_seconds,
            cancelled=cancel.cancelled,
            has_model=best.best_weights is not None,
            n_epochs=len(history),
            **timings,
        )

    def run(self, config: TrainConfig, metrics: dict, cancelled: bool) -> "Run":
        """The :class:`Run` of this folder."""
        return Run(self.path, config, metrics, cancelled)


def save_model(model, path: Path) -> None:
    """Save the weights and graph without the optimizer state (3x smaller for Adam-type optimizers).

    A new functional model over the same layers is uncompiled, so Keras leaves the
    optimizer out; it loads with :func:`melcore.models.load_model` like the original.
    """
    import keras

    # Single tensors, not one-element lists: a list-output model reloads as a
    # multi-output graph, which Grad-CAM and callers indexing the output reject.
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
    bare = keras.Model(inputs, outputs, name=model.name)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    bare.save(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> dict:
    """Write ``data`` to ``path`` as strict JSON (:func:`melcore.formatting.json_safe`), through a temporary
    sibling; returns the data as written."""
    data = json_safe(data)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data


@contextlib.contextmanager
def _run_log(run_dir: Path):
    """Log ``melcore.train`` (and its children) to ``run_dir/train.log`` while the block runs."""
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    previous = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous)
