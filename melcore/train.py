"""Train one image model on a cohort into a run directory.

:class:`TrainConfig` says what to train (JSON round trip, validated before any
data is touched); :func:`fit` does it and returns a :class:`Run`::

    config = TrainConfig(model="efficientnet-b3", image_size=300, epochs=3, fine_tune_epochs=5,
                         weights="imagenet", clinic="clinic-north")
    run = fit(config, load_cohort("train.csv", "jpeg/train"), progress=print)
    run.metrics["val_auroc"], run.load_model()

What :func:`fit` does, in order (everything up to step 4 fails fast, before training):

1. validates the config (:func:`validate`);
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
   ``unfreeze_blocks`` block groups as well at ``learning_rate x spec.finetune_lr_factor``
   (stage ``"fine-tune"``). From scratch: everything for ``epochs + fine_tune_epochs``
   epochs (stage ``"train"``). After every epoch the selection split is scored
   (stage ``"validate"``); training stops early when its AUROC has not improved for
   ``early_stopping_patience`` epochs (per stage), and the weights of the epoch best on
   the selection split are restored (before fine-tuning and at the end);
7. writes the run directory.

Run directory (``run_dir`` or ``settings.subdir("runs") / "<timestamp>-<model>-<clinic|all>"``):

* ``config.json``   the config with every default filled in (:meth:`TrainConfig.resolved`);
* ``train.log``     the log of the run;
* ``model.keras``   best weights; load with :func:`melcore.models.load_model` / :meth:`Run.load_model`;
* ``val_predictions.csv``  image_name, patient_id, clinic, target, prediction;
  with ``config.colour_model`` also ``cnn_prediction`` (``prediction`` is then the colour model's);
* ``colour_model.json``  only with ``config.colour_model``: the colour/shape model (:mod:`melcore.colour`);
* ``metrics.json``  written last; see :func:`fit` for its keys.

Progress: ``progress(epoch, batch, loss, metrics, eta)``, see :func:`fit`.

Reproducibility: the same config, cohort and seed on the same machine give the same
weights, predictions and metrics: seeds are set before the model is built, the data
order and every augmentation draw are functions of (seed, epoch, position)
(:mod:`melcore.pipeline`), and ``config.deterministic`` (default True) turns on
``tf.config.experimental.enable_op_determinism()`` for the process during ``fit`` and
turns it off again afterwards (TensorFlow has no public switch to turn it off; the
internal one is used, see :func:`_op_determinism`). On GPUs this may slow some ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

import melcore
from melcore import colour, settings
from melcore.errors import CohortError, ConfigError, MelcoreError

__all__ = [
    "BALANCES",
    "MODES",
    "TrainConfig",
    "Run",
    "validate",
    "fit",
    "default_run_dir",
]

log = logging.getLogger("melcore.train")

BALANCES = ("none", "oversample", "class-weight")
HEAD_FITS = ("gradient", "logistic-cv")
#: Training modes. ``"full"`` trains the whole network on images. ``"fast-head"`` (cached
#: backbone features + a head) is provided by :mod:`melcore.features` when that module
#: exists; :func:`fit` dispatches to ``melcore.features.fit_fast_head(config, cohort, ...)``.
MODES = ("full", "fast-head")
STAGES = ("load", "head", "fine-tune", "train", "validate")
PREDICTION_COLUMNS = ("image_name", "patient_id", "clinic", "target", "prediction")
THRESHOLD = 0.5
_SHOW = 5

Progress = Callable[[int, int, float, dict, "float | None"], None]
ShouldStop = Callable[[], bool]


# --------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """What to train. Every ``None`` means "the model spec's default" (:meth:`resolved` fills them in).

    Attributes
    ----------
    model : str
        Registry name (:data:`melcore.models.REGISTRY`), e.g. ``"efficientnet-b3"``.
    image_size : int or None
        Square side in pixels; None = ``spec.default_image_size``.
    epochs : int
        Epochs of the first stage (head stage with pretrained weights; all epochs from scratch).
    batch_size : int or None
        None = ``spec.default_batch_size``.
    learning_rate : float or None
        Initial learning rate (of the head stage with pretrained weights); None = the spec's.
    optimizer : str or None
        ``"sgd"``, ``"adam"``, ``"adamw"``; None = the spec's.
    schedule : str or None
        Learning-rate schedule ``"constant"``, ``"exponential"``, ``"cosine"``; None = the spec's.
    balance : str
        ``"none"``, ``"oversample"`` (balanced batches, the default) or ``"class-weight"``.
    augment : str or None
        Augmentation preset (:data:`melcore.augment.PRESETS`); None = the spec's.
    clinic : str or None
        Train on this clinic's images only; None = all clinics.
    val_fraction : float
        Share of patients held out for validation (ignored when ``fold`` is set).
    select_fraction : float
        Share of the *training* patients held out (grouped, stratified, seeded) to choose the
        best epoch and to stop early; the model trains on the other training patients. The
        validation (or out-of-fold) images are never used for a choice.
    fold, n_folds : int or None, int
        Validate on fold ``fold`` (0-based) of ``n_folds`` patient-grouped folds.
    seed : int
        Seeds the split, the weights, the data order and the augmentation.
    weights : str or None
        ``"none"``, ``"imagenet"`` or the path of a weights file; None = the spec's default.
    fallback_to_scratch : bool
        When ImageNet weights cannot be downloaded, train from scratch (recorded in
        ``metrics["weights"]`` and the log) instead of failing.
    mode : str
        ``"full"`` or ``"fast-head"`` (see :data:`MODES`).
    early_stopping_patience : int or None
        Stop a stage after this many epochs without a better selection-split AUROC; None = never.
    fine_tune_epochs : int
        Epochs of the fine-tune stage (pretrained weights only; from scratch they are added
        to the single training stage).
    unfreeze_blocks : int or None
        Block groups unfrozen for fine-tuning; None = ``spec.finetune_blocks``.
    tta : bool
        Score the final validation predictions with the 8 dihedral flips (8x slower scoring).
    preset : str or None
        Name of the training preset this config came from (recorded; presets are applied
        by the code that builds the config).
    workers : int or None
        Image-loading threads; None = min(4, CPU count).
    cache_images : bool
        Keep resized images in the on-disk cache (``settings.subdir("cache/images")``).
    deterministic : bool
        TensorFlow op determinism during ``fit`` (see the module docstring).
    colour_model : bool
        Full mode only (ConfigError with ``mode="fast-head"``): also fit the colour/texture/shape model (:mod:`melcore.colour`, an RBF SVM) on
        the training split's images, save it as ``colour_model.json`` in the run dir and
        deliver its scores as ``prediction`` (the CNN's stay in ``cnn_prediction``, and the
        CNN is kept for Grad-CAM). ``metrics["scorer"]`` says which model scored.
    pooling : str
        ``"avg"`` (global average pooling of the last feature map) or ``"multi-level"``
        (average and max pooling of every stage from the third on; :data:`melcore.registry.POOLINGS`).
    head_fit : str
        Fast-head mode: ``"gradient"`` trains the head with the optimizer for ``epochs``;
        ``"logistic-cv"`` fits an L2 logistic regression on standardised features with C
        chosen by a patient-grouped cross-validation inside the training split (nothing is
        chosen on the validation images; no epochs), written into the head's Dense layer.
    """

    model: str
    image_size: int | None = None
    epochs: int = 10
    batch_size: int | None = None
    learning_rate: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    balance: str = "oversample"
    augment: str | None = None
    clinic: str | None = None
    val_fraction: float = 0.2
    select_fraction: float = 0.2
    fold: int | None = None
    n_folds: int = 5
    seed: int = 0
    weights: str | None = None
    fallback_to_scratch: bool = False
    mode: str = "full"
    early_stopping_patience: int | None = 3
    fine_tune_epochs: int = 0
    unfreeze_blocks: int | None = None
    tta: bool = False
    preset: str | None = None
    workers: int | None = None
    cache_images: bool = True
    deterministic: bool = True
    colour_model: bool = False
    pooling: str = "avg"
    head_fit: str = "gradient"

    # -- JSON round trip
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field."""
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Build from a dict (e.g. parsed JSON). Values are checked by :meth:`validate`, not here.

        Raises
        ------
        ConfigError
            Not a dict, unknown keys (the message lists the valid ones) or no ``model``.
        """
        if isinstance(data, TrainConfig):
            return dataclasses.replace(data)
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a JSON object (dict), got {type(data).__name__}")
        valid = cls.field_names()
        unknown = sorted(set(data) - set(valid), key=str)
        if unknown:
            raise ConfigError(f"unknown training config key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
        if data.get("model") in (None, ""):
            raise ConfigError("the training config names no model; set 'model' (e.g. 'cnn-bn' or "
                              "'efficientnet-b3')")
        return cls(**data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"training config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # -- checks
    def validate(self) -> "TrainConfig":
        """See :func:`validate`."""
        return validate(self)

    def resolved(self) -> "TrainConfig":
        """A validated copy with every None default replaced by the model spec's value."""
        return validate(self)

    @property
    def planned_epochs(self) -> int:
        """Epochs over all stages (``epochs + fine_tune_epochs``)."""
        return int(self.epochs) + int(self.fine_tune_epochs or 0)


def _int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value}")
    return int(value)


def _float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _choice(name: str, value, valid) -> str:
    key = str(value).strip().lower().replace("_", "-") if value is not None else ""
    if key not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid {name}s: {', '.join(valid)}")
    return key


def _check_preset(name: str) -> str:
    try:
        import melcore.presets as presets  # added by the presets work; optional here
    except ImportError:
        raise ConfigError(f"training preset {name!r} given, but this version has no presets "
                          "(melcore.presets); set the options directly") from None
    table = getattr(presets, "PRESETS", {})
    if name not in table:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(table) or 'none'}")
    return name


def validate(config: TrainConfig) -> TrainConfig:
    """Check a config without touching data; return it resolved (defaults filled in, names canonical).

    Raises
    ------
    ConfigError
        Unknown model, augment, optimizer, schedule, balance or mode names (the message lists
        the valid ones); an image size the model cannot take; epochs, batch size or learning
        rate not positive; val_fraction outside (0, 1); a fold outside 0..n_folds-1; a weights
        file that does not exist or ImageNet weights for a model that has none (without
        ``fallback_to_scratch``).
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    from melcore import augment as augment_module
    from melcore import registry as models

    c = dataclasses.replace(config)
    c.model = models.validate_model_name(c.model)
    spec = models.get_spec(c.model)
    c.image_size = models.validate_image_size(c.model, spec.default_image_size if c.image_size is None
                                              else c.image_size)
    c.epochs = _int("epochs", c.epochs, 1)
    c.batch_size = _int("batch size", spec.default_batch_size if c.batch_size is None else c.batch_size, 1)
    c.learning_rate = _float("learning rate", spec.default_learning_rate if c.learning_rate is None
                             else c.learning_rate)
    if c.learning_rate <= 0:
        raise ConfigError(f"learning rate must be positive, got {c.learning_rate}")
    c.optimizer = _choice("optimizer", spec.default_optimizer if c.optimizer is None else c.optimizer,
                          models.OPTIMIZERS)
    c.schedule = _choice("schedule", spec.default_schedule if c.schedule is None else c.schedule,
                         models.SCHEDULES)
    c.balance = _choice("balance", c.balance, BALANCES)
    c.augment = augment_module.validate_preset(spec.default_augment if c.augment is None else c.augment)
    if c.clinic is not None:
        if not isinstance(c.clinic, str) or not c.clinic.strip():
            raise ConfigError(f"clinic must be a clinic name or null (all clinics), got {c.clinic!r}")
    c.val_fraction = _float("val_fraction", c.val_fraction)
    if not 0.0 < c.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (e.g. 0.2), got {c.val_fraction}")
    c.select_fraction = _float("select_fraction", c.select_fraction)
    if not 0.0 < c.select_fraction < 1.0:
        raise ConfigError(f"select_fraction (share of the training patients that choose the best epoch) must be "
                          f"between 0 and 1 (e.g. 0.2), got {c.select_fraction}")
    c.n_folds = _int("n_folds", c.n_folds, 2)
    c.fold = _int("fold", c.fold, 0, allow_none=True)
    if c.fold is not None and c.fold >= c.n_folds:
        raise ConfigError(f"fold {c.fold} does not exist with n_folds={c.n_folds}; folds are 0..{c.n_folds - 1}")
    c.seed = _int("seed", c.seed, 0)
    c.fallback_to_scratch = _bool("fallback_to_scratch", c.fallback_to_scratch)
    weights = spec.default_weights if c.weights is None else str(c.weights).strip()
    key = weights.lower()
    if key in ("", "none"):
        weights = "none"
    elif key in ("imagenet", "noisy-student"):
        weights = key
        if key == "noisy-student" and spec.family != "efficientnet-ns":
            raise ConfigError(f"noisy-student weights exist only for the -ns models, not {spec.name}; "
                              "use weights='imagenet'")
        if not spec.pretrained and not c.fallback_to_scratch:
            raise ConfigError(f"{spec.name} has no ImageNet weights (it is trained from scratch); use "
                              "weights='none'")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"weights file {path} not found; weights must be 'none', 'imagenet' or the "
                              "path of a local '.h5' / '.weights.h5' / '.keras' file")
        weights = str(path.resolve())
    c.weights = weights
    c.mode = _choice("mode", c.mode, MODES)
    if c.mode == "fast-head":
        import importlib.util

        if importlib.util.find_spec("melcore.features") is None:
            raise ConfigError("mode 'fast-head' needs melcore.features, which this version does not have; "
                              "use mode 'full'")
    c.early_stopping_patience = _int("early_stopping_patience", c.early_stopping_patience, 1, allow_none=True)
    c.fine_tune_epochs = _int("fine_tune_epochs", 0 if c.fine_tune_epochs is None else c.fine_tune_epochs, 0)
    c.unfreeze_blocks = _int("unfreeze_blocks", spec.finetune_blocks if c.unfreeze_blocks is None
                             else c.unfreeze_blocks, 0)
    c.tta = _bool("tta", c.tta)
    if c.preset is not None:
        c.preset = _check_preset(str(c.preset))
    c.workers = _int("workers", max(1, min(4, os.cpu_count() or 1)) if c.workers is None else c.workers, 1)
    c.cache_images = _bool("cache_images", c.cache_images)
    c.deterministic = _bool("deterministic", c.deterministic)
    c.colour_model = _bool("colour_model", c.colour_model)
    c.pooling = _choice("pooling", c.pooling, models.POOLINGS)
    c.head_fit = _choice("head fit", c.head_fit, HEAD_FITS)
    if c.head_fit == "logistic-cv" and c.mode != "fast-head":
        raise ConfigError("head_fit 'logistic-cv' fits the head on cached features: it needs mode 'fast-head'")
    if c.colour_model and c.mode != "full":
        raise ConfigError(f"colour_model (set by the cpu-default preset) needs mode 'full', not {c.mode!r}: "
                          "use mode 'full' (Train page: untick the fast head) or set colour_model false")
    return c


# --------------------------------------------------------------------------- run

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

    @classmethod
    def load(cls, run_dir) -> "Run":
        """Read a run directory written by :func:`fit`.

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

    With ``kind`` (e.g. ``"kfold"``, ``"cross-clinic"``: :mod:`melcore.crossval`) the name is
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


# --------------------------------------------------------------------------- data preparation

@dataclass
class _Data:
    cohort: Any                 # labelled rows with images of the chosen clinic(s)
    train_idx: np.ndarray       # rows the model is fitted on
    val_idx: np.ndarray         # rows reported (validation / out-of-fold); never choose anything
    excluded: dict
    split: dict
    select_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Rows of training patients held out to choose the best epoch and to stop early."""


def _names(values, n: int = _SHOW) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:n]))
    return shown + (f", ... (+{len(values) - n} more)" if len(values) > n else "")


def _class_counts(targets) -> tuple[int, int]:
    t = pd.Series(targets).astype("float64")
    return int((t == 1).sum()), int((t == 0).sum())


def _require_both_classes(cohort, where: str) -> None:
    n_mal, n_ben = _class_counts(cohort.table["target"])
    if n_mal == 0 or n_ben == 0:
        has, lacks = ("benign", "melanoma (target 1)") if n_mal == 0 else ("melanoma", "benign (target 0)")
        raise CohortError(f"{where} has only {has} images ({n_mal + n_ben}) and no {lacks} image; training "
                          "needs both classes: add images of the missing class or choose another clinic")


def _prepare_data(config: TrainConfig, cohort) -> _Data:
    from melcore.splits import check_no_leakage, cohort_folds, cohort_split

    if not hasattr(cohort, "table") or not hasattr(cohort, "subset"):
        raise MelcoreError(f"fit needs a melcore.cohort.Cohort, got {type(cohort).__name__}")
    name = getattr(cohort, "name", "cohort")
    excluded: dict[str, Any] = {"other_clinics": 0, "unlabelled": 0, "no_image": 0, "unreadable": 0,
                                "unreadable_images": []}
    if len(cohort) == 0:
        raise CohortError(f"cohort {name!r} is empty")
    if config.clinic is not None:
        chosen = cohort.for_clinic(config.clinic)  # CohortError listing the clinics when empty
        excluded["other_clinics"] = len(cohort) - len(chosen)
        cohort = chosen
    where = f"clinic {config.clinic!r}" if config.clinic is not None else f"cohort {name!r}"
    labelled_mask = cohort.table["target"].notna().to_numpy()
    image_mask = cohort.table["image_path"].notna().to_numpy()
    excluded["unlabelled"] = int((~labelled_mask).sum())
    excluded["no_image"] = int((labelled_mask & ~image_mask).sum())
    usable = cohort.subset(labelled_mask & image_mask)
    if len(usable) == 0:
        raise CohortError(f"{where} has no labelled image with an image file ({len(cohort)} rows: "
                          f"{excluded['unlabelled']} unlabelled, {excluded['no_image']} labelled without an "
                          "image file); check --images and the target column")
    _require_both_classes(usable, where)
    if config.fold is not None:
        folds = cohort_folds(usable, config.n_folds, config.seed)
        val_mask = folds == config.fold
        train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
        what = usable.grouping.split(",")[0].removesuffix("_id").removesuffix("_name")
        groups = usable.groups
        check_no_leakage(groups.iloc[train_idx], groups.iloc[val_idx], what=what)
        split = {"method": "fold", "fold": config.fold, "n_folds": config.n_folds}
    else:
        train_idx, val_idx = cohort_split(usable, config.val_fraction, config.seed)
        split = {"method": "val_fraction", "val_fraction": config.val_fraction}
    split.update({"grouping": usable.grouping, "seed": config.seed})
    fit_idx, select_idx = _selection_split(usable, np.asarray(train_idx), config)
    split["selection"] = {"select_fraction": config.select_fraction, "seed": config.seed,
                          "chooses": ["best epoch", "early stopping"],
                          "images": "patients held out of the training split; the validation images choose "
                                    "nothing"}
    data = _Data(usable, fit_idx, np.asarray(val_idx), excluded, split, select_idx)
    _check_split_classes(data, where)
    return data


def _selection_split(cohort, train_idx: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows fitted on, rows that choose the epoch): a grouped, stratified split of ``train_idx``.

    Both are sorted positions in ``cohort`` and together are ``train_idx``; no patient is on both sides.
    """
    from melcore.splits import check_no_leakage, train_val_split

    groups = cohort.groups.iloc[train_idx]
    fit, select = train_val_split(groups, cohort.table["target"].iloc[train_idx], config.select_fraction,
                                  config.seed)
    check_no_leakage(groups.iloc[fit], groups.iloc[select], what="patient")
    return train_idx[fit], train_idx[select]


def _check_split_classes(data: _Data, where: str) -> None:
    targets = data.cohort.table["target"]
    for side, idx in (("training", data.train_idx), ("selection (inner split of the training patients)",
                                                        data.select_idx), ("validation", data.val_idx)):
        if len(idx) == 0:
            raise CohortError(f"the {side} split of {where} is empty; use more patients")
        n_mal, n_ben = _class_counts(targets.iloc[idx])
        if n_mal == 0 or n_ben == 0:
            lacking = "melanoma" if n_mal == 0 else "benign"
            total_mal = _class_counts(targets)[0]
            groups_mal = data.cohort.groups[targets.eq(1).fillna(False).to_numpy()].nunique()
            raise CohortError(
                f"the {side} split of {where} has no {lacking} image ({len(idx)} images): {total_mal} melanoma "
                f"image(s) from {groups_mal} patient(s) cannot fill both sides; validation AUROC needs both "
                "classes on each side: add data, or change val_fraction / select_fraction / the fold")


def _exclude_unreadable(data: _Data, bad: dict[int, str]) -> _Data:
    """Drop rows (positions in data.cohort) whose image could not be decoded."""
    if not bad:
        return data
    keep = np.ones(len(data.cohort), dtype=bool)
    keep[list(bad)] = False
    new_position = np.cumsum(keep) - 1
    names = data.cohort.table["image_name"].astype(str).to_numpy()
    data.excluded["unreadable"] = len(bad)
    data.excluded["unreadable_images"] = [[names[i], bad[i]] for i in sorted(bad)][:50]

    def kept(idx: np.ndarray) -> np.ndarray:
        return np.asarray(new_position[[i for i in idx if keep[i]]], dtype=np.int64)

    return _Data(data.cohort.subset(keep), kept(data.train_idx), kept(data.val_idx), data.excluded, data.split,
                 kept(data.select_idx))


def _drop_unreadable(data: _Data, bad: dict[int, str], config: TrainConfig) -> _Data:
    """Log and leave out the rows whose image could not be decoded, then re-check both splits' classes.

    ``bad`` maps positions in ``data.cohort`` to the reason; shared by :func:`fit` and
    :func:`melcore.features.fit_fast_head`.
    """
    if not bad:
        return data
    names = data.cohort.table["image_name"].astype(str).to_numpy()
    log.warning("left out %d unreadable image(s): %s", len(bad),
                "; ".join(f"{names[i]}: {reason}" for i, reason in list(bad.items())[:_SHOW]))
    data = _exclude_unreadable(data, bad)
    _check_split_classes(data, f"clinic {config.clinic!r}" if config.clinic else "the cohort")
    return data


def _split_tables(data: _Data) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(training rows, validation rows, counts) of ``data``; the counts are logged.

    counts: ``n_train``, ``n_select``, ``n_val`` (images), ``n_malignant`` and ``n_patients``
    (``{"train": int, "select": int, "val": int}``), as they go into ``metrics.json``. The
    selection rows are :func:`_select_table`.
    """
    table = data.cohort.table
    train_table = table.iloc[data.train_idx].reset_index(drop=True)
    val_table = table.iloc[data.val_idx].reset_index(drop=True)
    groups = data.cohort.groups
    sides = {"train": data.train_idx, "select": data.select_idx, "val": data.val_idx}
    counts = {
        "n_train": len(data.train_idx), "n_select": len(data.select_idx), "n_val": len(data.val_idx),
        "n_malignant": {side: int(table["target"].iloc[idx].eq(1).sum()) for side, idx in sides.items()},
        "n_patients": {side: int(groups.iloc[idx].nunique()) for side, idx in sides.items()},
    }
    log.info("split (%s, grouped by %s): train %d images (%d melanoma, %d patients), selection of the best epoch "
             "%d images (%d melanoma, %d training patients held out), validation %d images (%d melanoma, "
             "%d patients; chooses nothing)", data.split["method"], data.split["grouping"], counts["n_train"],
             counts["n_malignant"]["train"], counts["n_patients"]["train"], counts["n_select"],
             counts["n_malignant"]["select"], counts["n_patients"]["select"], counts["n_val"],
             counts["n_malignant"]["val"], counts["n_patients"]["val"])
    return train_table, val_table, counts


def _chosen_on(counts: dict) -> dict:
    """Which images chose what (``metrics["chosen_on"]``): the validation images choose nothing."""
    return {"best_epoch": "selection", "early_stopping": "selection", "threshold": "fixed at 0.5, not chosen",
            "selection": {"images": counts["n_select"], "patients": counts["n_patients"]["select"],
                          "what": "training patients held out of the fit (select_fraction)"},
            "validation": "scored once with the chosen weights; chooses nothing"}


def _select_table(data: _Data) -> pd.DataFrame:
    """The selection rows (training patients held out to choose the best epoch), RangeIndex."""
    return data.cohort.table.iloc[data.select_idx].reset_index(drop=True)


# --------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _op_determinism(enabled: bool):
    """TF op determinism on while the block runs (when ``enabled``), restored afterwards; yields whether on.

    TensorFlow only offers ``enable_op_determinism`` publicly; the matching internal
    ``disable_op_determinism`` restores the previous state so other work in the same
    process (the app, a worker's next job) is not slowed down after ``fit``.
    """
    if not enabled:
        yield False
        return
    import tensorflow as tf

    try:
        from tensorflow.python.framework import config as tf_config

        before = bool(tf_config.is_op_determinism_enabled())
    except Exception:  # noqa: BLE001 - internal API moved: leave determinism on
        tf_config, before = None, None
    tf.config.experimental.enable_op_determinism()
    try:
        yield True
    finally:
        if tf_config is not None and before is False:
            try:
                tf_config.disable_op_determinism()
            except Exception:  # noqa: BLE001
                pass


def _device_description(strategy) -> tuple[str, int]:
    import tensorflow as tf

    if strategy is not None:
        devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
        return (f"{type(strategy).__name__} over {', '.join(devices)}" if devices else type(strategy).__name__,
                int(strategy.num_replicas_in_sync))
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            label = details.get("device_name") or ""
        except Exception:  # noqa: BLE001
            label = ""
        return (f"{gpus[0].name}" + (f" ({label})" if label else "")), 1
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", 1


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p.astype("float64"), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _clean_floats(value):
    """NaN / inf -> None, recursively (metrics.json stays strict JSON)."""
    if isinstance(value, dict):
        return {k: _clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_floats(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically; a ``metrics.json`` also records ``melcore_version`` (the code behind its numbers)."""
    if path.name == "metrics.json":
        data = {**data, "melcore_version": melcore.__version__}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean_floats(data), indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


# --------------------------------------------------------------------------- progress / validation

class _Tracker:
    """State shared across stages: progress reporting, ETA, validation, best weights, cancel."""

    def __init__(self, progress: Progress | None, should_stop: ShouldStop | None, total_epochs: int):
        self.progress = progress
        self.should_stop = should_stop
        self.total_epochs = total_epochs
        self.steps = 0
        self.stage = "train"
        self.epoch = 0                     # 1-based epoch being run
        self.cancelled = False
        self.history: list[dict] = []
        self.best_auroc = -math.inf
        self.best_epoch: int | None = None
        self.best_weights = None
        self.best_select_loss = None
        self.wait = 0
        self.patience: int | None = None
        self.early_stopped = False
        self.train_seconds = 0.0
        self.train_images = 0
        self.val_seconds: list[float] = []
        self.batch_seconds: float | None = None  # smoothed seconds per training batch
        self._epoch_start = 0.0
        self._batch_clock = 0.0
        self.loss: float | None = None

    # -- cancel
    def stop_requested(self) -> bool:
        if not self.cancelled and self.should_stop is not None and self.should_stop():
            self.cancelled = True
            log.info("stop requested: cancelling (epoch %s, stage %s)", self.epoch, self.stage)
        return self.cancelled

    # -- ETA
    def eta(self, batch: int, validating: bool = False) -> float | None:
        if self.batch_seconds is None:
            return None
        val = float(np.mean(self.val_seconds)) if self.val_seconds else self.batch_seconds * self.steps * 0.3
        epochs_after = max(0, self.total_epochs - self.epoch)
        remaining = 0.0 if validating else (self.steps - batch) * self.batch_seconds + val
        return remaining + epochs_after * (self.steps * self.batch_seconds + val)

    def report(self, batch: int, loss: float | None, extra: dict | None = None, eta: float | None = None,
               epoch: int | None = None, stage: str | None = None) -> None:
        if self.progress is None:
            return
        metrics = {"epochs": self.total_epochs, "steps": self.steps, "stage": stage or self.stage}
        if extra:
            metrics.update(extra)
        self.progress(self.epoch if epoch is None else epoch, batch, loss, metrics, eta)

    # -- batches
    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch_start = self._batch_clock = time.perf_counter()

    def end_batch(self, batch: int, loss: float, batch_size: int) -> None:
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


def _tracker_callback(tracker: _Tracker, data_info: dict, score_selection: Callable[[], dict | None]):
    """The Keras callback of a fit; ``score_selection()`` scores the selection split (the held-out training
    patients, never the validation images): ``{"select_auroc", "select_loss"}``, None when cancelled."""
    import keras

    class TrainingMonitor(keras.callbacks.Callback):
        """Progress, cancel within one batch, per-epoch selection AUROC, early stopping, best weights."""

        def on_epoch_begin(self, epoch, logs=None):
            tracker.start_epoch(epoch + 1)

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", float("nan")))
            tracker.end_batch(batch + 1, loss, data_info["batch_size"])
            if tracker.stop_requested():
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if tracker.cancelled or tracker.stop_requested():
                self.model.stop_training = True
                return
            train_loss = float((logs or {}).get("loss", tracker.loss if tracker.loss is not None else math.nan))
            started = time.perf_counter()
            scores = score_selection()
            if scores is None:  # cancelled while predicting
                self.model.stop_training = True
                return
            tracker.val_seconds.append(time.perf_counter() - started)
            auroc, select_loss = scores["select_auroc"], scores["select_loss"]
            # Ties (common when AUROC saturates) go to the lower selection loss.
            improved = (tracker.best_weights is None or auroc > tracker.best_auroc
                        or (auroc == tracker.best_auroc and select_loss < tracker.best_select_loss))
            if improved:
                tracker.best_auroc, tracker.best_epoch, tracker.best_select_loss = auroc, epoch + 1, select_loss
                tracker.best_weights = self.model.get_weights()
                tracker.wait = 0
            else:
                tracker.wait += 1
            lr = _current_lr(self.model)
            entry = {"epoch": epoch + 1, "stage": tracker.stage, "train_loss": train_loss,
                     "select_loss": select_loss, "select_auroc": auroc, "learning_rate": lr,
                     "seconds": time.perf_counter() - tracker._epoch_start, "best": improved}
            tracker.history.append(entry)
            log.info("epoch %d/%d [%s] train loss %.4f, selection loss %.4f, selection AUROC %.4f%s",
                     epoch + 1, tracker.total_epochs, tracker.stage, train_loss, select_loss, auroc,
                     " (best so far)" if improved else "")
            tracker.report(tracker.steps, train_loss,
                           {"end_of_epoch": True, "select_auroc": auroc, "select_loss": select_loss,
                            "train_loss": train_loss, "best_select_auroc": tracker.best_auroc,
                            "best_epoch": tracker.best_epoch},
                           eta=tracker.eta(tracker.steps, validating=True))
            if tracker.patience is not None and tracker.wait >= tracker.patience:
                tracker.early_stopped = True
                log.info("early stopping: no better selection AUROC for %d epoch(s) (best %.4f at epoch %d)",
                         tracker.wait, tracker.best_auroc, tracker.best_epoch)
                self.model.stop_training = True

    return TrainingMonitor()


def _current_lr(model) -> float | None:
    try:
        optimizer = model.optimizer
        lr = optimizer.learning_rate
        if callable(lr):
            lr = lr(optimizer.iterations)
        return float(np.asarray(lr))
    except Exception:  # noqa: BLE001
        return None


def _check_unfreeze_blocks(model, n_blocks: int) -> None:
    """ConfigError before training when the fine-tune stage could not unfreeze ``n_blocks`` groups."""
    from melcore import models

    numbered = [g for g in models.block_groups(model) if g not in ("stem", "top")]
    if n_blocks > len(numbered):
        raise ConfigError(f"unfreeze_blocks={n_blocks} but {model.name} has {len(numbered)} block groups "
                          f"({', '.join(numbered)}); use at most {len(numbered)}")


def _save_model(model, path: Path) -> None:
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


# --------------------------------------------------------------------------- fit

def fit(config: TrainConfig, cohort, progress: Progress | None = None, should_stop: ShouldStop | None = None,
        run_dir=None, strategy=None) -> Run:
    """Train a model on a cohort; write and return the run.

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
        Default :func:`default_run_dir`. Created if needed; files in it are replaced.
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
        :func:`_chosen_on`), val_loss, threshold (0.5),
        sensitivity, specificity (at 0.5, of the delivered ``prediction``), scorer ("cnn" or
        "colour-model"; with the colour model also cnn_val_auroc, colour_val_auroc, cnn_val_loss),
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
    if config.mode == "fast-head":
        from melcore import features  # provided by the features work (see MODES)

        return features.fit_fast_head(config, cohort, progress=progress, should_stop=should_stop,
                                      run_dir=run_dir, strategy=strategy)
    started = time.perf_counter()
    data = _prepare_data(config, cohort)

    import keras

    from melcore import models

    with _op_determinism(config.deterministic) as deterministic:
        keras.utils.set_random_seed(config.seed)
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            model, weights_info = models.build_model(config.model, config.image_size, weights=config.weights,
                                                     pooling=config.pooling,
                                                     fallback_to_scratch=config.fallback_to_scratch)
        if weights_info.loaded and config.fine_tune_epochs > 0:
            _check_unfreeze_blocks(model, config.unfreeze_blocks)
        run_dir = Path(run_dir).expanduser() if run_dir is not None else default_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dir = run_dir.resolve()
        for stale in ("metrics.json", "model.keras", "val_predictions.csv", "train.log", colour.COLOUR_MODEL_FILE):
            (run_dir / stale).unlink(missing_ok=True)
        _write_json(run_dir / "config.json", config.to_dict())
        with _run_log(run_dir):
            try:
                return _fit_in_run_dir(config, data, model, weights_info, run_dir, progress, should_stop,
                                       strategy, started, bool(deterministic))
            except Exception:
                log.exception("training failed")
                raise


def _fit_in_run_dir(config, data: _Data, model, weights_info, run_dir: Path, progress, should_stop, strategy,
                    started: float, deterministic: bool) -> Run:
    import keras
    import tensorflow as tf

    from melcore import images as images_module
    from melcore import models
    from melcore.pipeline import ImageBatches, PredictionBatches, class_weights

    spec = models.get_spec(config.model)
    device, n_replicas = _device_description(strategy)
    log.info("run %s: %s at %d px, cohort %r (%s), device %s", run_dir.name, config.model, config.image_size,
             getattr(data.cohort, "name", "cohort"), config.clinic or "all clinics", device)
    log.info("config: %s", json.dumps(config.to_dict()))
    if weights_info.from_scratch:
        (log.warning if config.weights not in ("none",) else log.info)("weights: %s", weights_info.note)
    else:
        log.info("weights: %s", weights_info.note)
    ex = data.excluded
    log.info("data: %d labelled images with files used; left out: %d from other clinics, %d unlabelled, "
             "%d labelled without an image file", len(data.cohort), ex["other_clinics"], ex["unlabelled"],
             ex["no_image"])
    if config.deterministic:
        log.info("TensorFlow op determinism is on for this fit (config.deterministic)")

    tracker = _Tracker(progress, should_stop, total_epochs=0)
    # Any loaded weights (ImageNet, or a file, e.g. a model trained on another clinic) get the
    # two-stage schedule: a fresh head on the frozen backbone first, so large gradients from the
    # random head do not wreck the pretrained features.
    transfer = bool(weights_info.loaded)
    if transfer:
        stages = [("head", config.epochs)] + ([("fine-tune", config.fine_tune_epochs)]
                                              if config.fine_tune_epochs > 0 else [])
    else:
        stages = [("train", config.planned_epochs)]
        if config.fine_tune_epochs:
            log.info("no pretrained weights: the %d fine-tune epoch(s) are added to the single training stage",
                     config.fine_tune_epochs)
    tracker.total_epochs = sum(n for _, n in stages)

    # ---- decode every image once (fills the cache; finds unreadable files before training)
    cache = images_module.ImageCache() if config.cache_images else None
    paths = data.cohort.table["image_path"].tolist()
    bad: dict[int, str] = {}
    total = len(paths)
    chunk = max(64, config.batch_size * 4)
    tracker.stage = "load"
    tracker.report(0, None, {"done": 0, "total": total}, epoch=0, stage="load")
    load_started = time.perf_counter()
    for start in range(0, total, chunk):
        if tracker.stop_requested():
            break

        def failed(index, error, offset=start):
            bad[offset + index] = error.reason

        def loading(done, _total, offset=start):
            tracker.report(0, None, {"done": offset + done, "total": total}, epoch=0, stage="load")

        images_module.load_images(paths[start:start + chunk], config.image_size, cache=cache,
                                  workers=config.workers, on_error=failed, progress=loading)
    if not tracker.cancelled:
        log.info("decoded %d images at %d px in %.1f s", total, config.image_size, time.perf_counter() - load_started)
    data = _drop_unreadable(data, bad, config)
    train_table, val_table, counts = _split_tables(data)
    select_table = _select_table(data)
    y_val = val_table["target"].astype("float64").to_numpy()
    y_select = select_table["target"].astype("float64").to_numpy()

    # ---- datasets
    train_data = ImageBatches.from_table(train_table, config.image_size, batch_size=config.batch_size,
                                         augment=config.augment,
                                         balance="none" if config.balance == "class-weight" else config.balance,
                                         seed=config.seed, cache=cache, workers=config.workers)
    class_weight = class_weights(train_table["target"].astype("float32").to_numpy()) \
        if config.balance == "class-weight" else None
    steps = len(train_data)
    tracker.steps = steps
    data_info = {"batch_size": config.batch_size}
    val_paths = val_table["image_path"].tolist()
    val_batch = max(config.batch_size, 32)

    def predict_paths(paths: list, tta: bool = False) -> np.ndarray | None:
        from melcore.predict import predict_dataset

        sizes = [min(val_batch, len(paths) - s) for s in range(0, len(paths), val_batch)]
        dataset = PredictionBatches(paths, config.image_size, batch_size=val_batch, cache=cache,
                                    workers=config.workers)

        def validating(done, total_):
            batch_no = min(len(sizes), max(1, math.ceil(done / val_batch)))
            tracker.report(tracker.steps, tracker.loss, {"val_batch": batch_no, "val_steps": len(sizes)},
                           eta=tracker.eta(tracker.steps, validating=True), stage="validate")

        return predict_dataset(model, dataset, len(paths), sizes, tta, progress=validating,
                               should_stop=tracker.stop_requested)

    def predict_validation(tta: bool = False) -> np.ndarray | None:
        return predict_paths(val_paths, tta)

    def score_selection() -> dict | None:
        p = predict_paths(select_table["image_path"].tolist())
        if p is None:
            return None
        return {"select_auroc": _auroc(y_select, p), "select_loss": _bce(y_select, p)}

    monitor = _tracker_callback(tracker, data_info, score_selection)
    stage_records = []
    epoch_offset = 0
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    fit_started = time.perf_counter()
    for stage, n_epochs in stages:
        if tracker.stop_requested():
            break
        if stage == "fine-tune" and tracker.best_weights is not None:
            model.set_weights(tracker.best_weights)  # fine-tune from the best head epoch
        trainable_stage = {"head": "head", "fine-tune": "fine-tune", "train": "all"}[stage]
        lr = config.learning_rate * (spec.finetune_lr_factor if stage == "fine-tune" else 1.0)
        with scope:
            info = models.set_trainable(model, trainable_stage,
                                        config.unfreeze_blocks if stage == "fine-tune" else None)
            optimizer = models.make_optimizer(spec, lr, steps, n_epochs, optimizer=config.optimizer,
                                              schedule=config.schedule)
            model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy())
        log.info("stage %s: %d epoch(s) x %d batches of %d, %s lr %.3g (%s), %s trainable / %s frozen params%s",
                 stage, n_epochs, steps, config.batch_size, config.optimizer, lr, config.schedule,
                 f"{info['trainable_params']:,}", f"{info['frozen_params']:,}",
                 f", unfrozen: {', '.join(info['unfrozen_groups'])}" if info["unfrozen_groups"] else "")
        tracker.stage = stage
        tracker.wait = 0
        tracker.patience = config.early_stopping_patience
        tracker.batch_seconds = None if stage != "fine-tune" else tracker.batch_seconds
        epochs_before = len(tracker.history)
        model.fit(train_data, epochs=epoch_offset + n_epochs, initial_epoch=epoch_offset, shuffle=False,
                  class_weight=class_weight, callbacks=[monitor], verbose=0)
        run_epochs = len(tracker.history) - epochs_before
        stage_records.append({"stage": stage, "planned_epochs": n_epochs, "epochs_run": run_epochs,
                              "learning_rate": lr, "unfrozen_groups": info["unfrozen_groups"],
                              "trainable_params": info["trainable_params"]})
        # Epoch numbers stay contiguous when a stage stops early.
        epoch_offset += run_epochs
        tracker.total_epochs -= n_epochs - run_epochs if not tracker.cancelled else 0
        if tracker.cancelled:
            break
    fit_seconds = time.perf_counter() - fit_started

    if tracker.best_weights is not None:
        model.set_weights(tracker.best_weights)
    metrics: dict[str, Any] = {
        "kind": "image", "status": "cancelled" if tracker.cancelled else "done", "cancelled": tracker.cancelled,
        "model": config.model, "clinic": config.clinic, "image_size": config.image_size,
        "cohort": getattr(data.cohort, "name", None),
        "best_epoch": tracker.best_epoch,
        "best_epoch_select_auroc": tracker.best_auroc if tracker.best_epoch else None,
        "chosen_on": _chosen_on(counts),
        **counts,
        "excluded": data.excluded, "split": data.split,
        "history": tracker.history, "stages": stage_records, "epochs_run": len(tracker.history),
        "planned_epochs": sum(n for _, n in stages), "early_stopped": tracker.early_stopped,
        "weights": weights_info.to_dict(), "from_scratch": bool(weights_info.from_scratch),
        "device": device, "n_replicas": n_replicas, "deterministic_ops": deterministic, "tta": config.tta,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    if tracker.best_weights is not None:
        _save_model(model, run_dir / "model.keras")
    predictions = None
    if tracker.best_weights is not None and not tracker.cancelled:
        if config.tta:
            log.info("scoring the validation set with 8-view test-time augmentation")
        predictions = predict_validation(tta=config.tta)
    cnn_predictions = predictions
    colour_predictions = None
    if predictions is not None and config.colour_model and not tracker.stop_requested():
        colour_started = time.perf_counter()
        log.info("fitting the colour/shape model on %d training images", len(train_table))
        colour_model = colour.fit_colour_model(train_table["image_path"].tolist(),
                                               train_table["target"].astype("int64").to_numpy(),
                                               data.cohort.groups.iloc[data.train_idx].to_numpy(), cache=cache,
                                               workers=config.workers)
        if not tracker.stop_requested():
            colour_model.save(run_dir / colour.COLOUR_MODEL_FILE)
            colour_predictions = colour.colour_probabilities(colour_model, val_paths, cache=cache,
                                                             workers=config.workers)
            log.info("colour model: validation AUROC %.4f (CNN %.4f), %.1f s; it scores the delivered predictions",
                     _auroc(y_val, colour_predictions), _auroc(y_val, cnn_predictions),
                     time.perf_counter() - colour_started)
    if predictions is not None and config.colour_model and colour_predictions is None:
        # should_stop during the colour model: nothing half-made is left behind.
        (run_dir / colour.COLOUR_MODEL_FILE).unlink(missing_ok=True)
        predictions = None
    if colour_predictions is not None:
        predictions = colour_predictions
    metrics["scorer"] = "colour-model" if colour_predictions is not None else "cnn"
    if predictions is not None:
        columns = {
            "image_name": val_table["image_name"].astype(str),
            "patient_id": val_table["patient_id"],
            "clinic": val_table["clinic"],
            "target": val_table["target"].astype("int64"),
            "prediction": predictions,
        }
        if colour_predictions is not None:
            columns["cnn_prediction"] = cnn_predictions
        out = pd.DataFrame(columns)
        out.to_csv(run_dir / "val_predictions.csv", index=False)
        from melcore.metrics import threshold_metrics

        at = threshold_metrics(y_val.astype(int), np.clip(predictions, 0.0, 1.0), THRESHOLD)
        metrics.update({
            "val_auroc": _auroc(y_val, predictions), "val_loss": _bce(y_val, predictions),
            "threshold": THRESHOLD, "sensitivity": at["sensitivity"], "specificity": at["specificity"],
            "at_threshold": at,
        })
        if colour_predictions is not None:
            metrics.update({"cnn_val_auroc": _auroc(y_val, cnn_predictions),
                            "colour_val_auroc": _auroc(y_val, colour_predictions),
                            "cnn_val_loss": _bce(y_val, cnn_predictions)})
    else:
        metrics.update({"val_auroc": None, "val_loss": None, "threshold": THRESHOLD,
                        "sensitivity": None, "specificity": None})
        if not tracker.cancelled and tracker.best_weights is None:
            raise MelcoreError("training ended without a single validated epoch")
    if tracker.cancelled:
        metrics["cancelled"] = True
        metrics["status"] = "cancelled"
    seconds = time.perf_counter() - started
    metrics.update({
        "seconds": seconds, "train_seconds": tracker.train_seconds, "fit_seconds": fit_seconds,
        "images_per_second": (tracker.train_images / tracker.train_seconds) if tracker.train_seconds > 0 else None,
    })
    _write_json(run_dir / "metrics.json", metrics)
    if tracker.cancelled:
        log.warning("run cancelled after %d epoch(s); %s", len(tracker.history),
                    "model.keras holds the best epoch so far" if tracker.best_weights is not None
                    else "no epoch finished, no model saved")
    else:
        log.info("done in %.1f s: validation AUROC %.4f (best epoch %s), sensitivity %.3f, specificity %.3f at %.2f; "
                 "%s", seconds, metrics["val_auroc"], tracker.best_epoch, metrics["sensitivity"],
                 metrics["specificity"], THRESHOLD, "trained from scratch" if weights_info.from_scratch
                 else weights_info.note)
    return Run(run_dir, config, metrics, tracker.cancelled)
