"""What to train: :class:`TrainConfig`, and :func:`validate`, the one place a config is checked.

A config is checked before any data is touched; :meth:`TrainConfig.resolved` (or
:func:`validate`) returns a copy with every ``None`` replaced by its default, and names
canonical: the model's recipe (:func:`melcore.training.recipes.recipe_for`: optimizer,
learning rate, schedule, augmentation, batch size) or its spec (image size, weights,
fine-tune blocks).
The value checks themselves are :mod:`melcore.checks`; the Train page, the CLI and the
job queue all call :func:`validate`, so they give the same messages::

    config = TrainConfig(model="efficientnet-b3", image_size=300, epochs=3, fine_tune_epochs=5,
                         weights="imagenet", clinic="clinic-north").resolved()
    config = preset_config("cpu-default", clinic="clinic-north")     # a named recipe, resolved

No TensorFlow is imported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from melcore import augment as augment_module
from melcore import registry as models
from melcore.checks import (
    check_bool,
    check_choice,
    check_float,
    check_fraction,
    check_int,
)
from melcore.errors import ConfigError
from melcore.training import recipes

__all__ = ["BALANCES", "HEAD_FITS", "MODES", "TrainConfig", "validate", "preset_config"]

BALANCES = ("none", "oversample", "class-weight")
HEAD_FITS = ("gradient", "logistic-cv")
#: Training modes: ``"full"`` trains the network on images (:mod:`melcore.training.image`);
#: ``"fast-head"`` trains a head on cached backbone features (:mod:`melcore.training.fast_head`).
#: :func:`melcore.training.api.fit` dispatches on it.
MODES = ("full", "fast-head")


@dataclass
class TrainConfig:
    """What to train. Every ``None`` means "the model's default" (:meth:`resolved` fills them in).

    Attributes
    ----------
    model : str
        Registry name (:data:`melcore.models.REGISTRY`), e.g. ``"efficientnet-b3"``.
    image_size : int or None
        Square side in pixels; None = ``spec.default_image_size``.
    epochs : int
        Epochs of the first stage (head stage with pretrained weights; all epochs from scratch).
    batch_size : int or None
        None = the recipe's (:attr:`melcore.training.recipes.Recipe.batch_size`).
    learning_rate : float or None
        Initial learning rate (of the head stage with pretrained weights); None = the recipe's.
    optimizer : str or None
        ``"sgd"``, ``"adam"``, ``"adamw"``; None = the recipe's.
    schedule : str or None
        Learning-rate schedule ``"constant"``, ``"exponential"``, ``"cosine"``; None = the recipe's.
    balance : str
        ``"none"``, ``"oversample"`` (balanced batches, the default) or ``"class-weight"``.
    augment : str or None
        Augmentation preset (:data:`melcore.augment.PRESETS`); None = the recipe's.
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
            raise ConfigError(
                f"unknown training config key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}"
            )
        if data.get("model") in (None, ""):
            raise ConfigError("the training config names no model; set 'model' (e.g. 'cnn-bn' or 'efficientnet-b3')")
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
        """A validated copy with every None default replaced by the model's recipe or spec value."""
        return validate(self)

    @property
    def planned_epochs(self) -> int:
        """Epochs over all stages (``epochs + fine_tune_epochs``)."""
        return int(self.epochs) + int(self.fine_tune_epochs or 0)


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
    c = dataclasses.replace(config)
    c.model = models.validate_model_name(c.model)
    spec = models.get_spec(c.model)
    recipe = recipes.recipe_for(c.model)
    c.image_size = models.validate_image_size(
        c.model, spec.default_image_size if c.image_size is None else c.image_size
    )
    c.epochs = check_int("epochs", c.epochs, 1)
    c.batch_size = check_int("batch size", recipe.batch_size if c.batch_size is None else c.batch_size, 1)
    c.learning_rate = check_float("learning rate", recipe.learning_rate if c.learning_rate is None else c.learning_rate)
    if c.learning_rate <= 0:
        raise ConfigError(f"learning rate must be positive, got {c.learning_rate}")
    c.optimizer = check_choice("optimizer", recipe.optimizer if c.optimizer is None else c.optimizer, models.OPTIMIZERS)
    c.schedule = check_choice("schedule", recipe.schedule if c.schedule is None else c.schedule, models.SCHEDULES)
    c.balance = check_choice("balance", c.balance, BALANCES)
    c.augment = augment_module.validate_preset(recipe.augment if c.augment is None else c.augment)
    if c.clinic is not None:
        if not isinstance(c.clinic, str) or not c.clinic.strip():
            raise ConfigError(f"clinic must be a clinic name or null (all clinics), got {c.clinic!r}")
    c.val_fraction = check_fraction("val_fraction", c.val_fraction)
    c.select_fraction = check_fraction(
        "select_fraction", c.select_fraction, "share of the training patients that choose the best epoch"
    )
    c.n_folds = check_int("n_folds", c.n_folds, 2)
    c.fold = check_int("fold", c.fold, 0, allow_none=True)
    if c.fold is not None and c.fold >= c.n_folds:
        raise ConfigError(f"fold {c.fold} does not exist with n_folds={c.n_folds}; folds are 0..{c.n_folds - 1}")
    c.seed = check_int("seed", c.seed, 0)
    c.fallback_to_scratch = check_bool("fallback_to_scratch", c.fallback_to_scratch)
    c.weights = models.check_weights(
        spec, spec.default_weights if c.weights is None else c.weights, c.fallback_to_scratch
    )
    c.mode = check_choice("mode", c.mode, MODES)
    c.early_stopping_patience = check_int("early_stopping_patience", c.early_stopping_patience, 1, allow_none=True)
    c.fine_tune_epochs = check_int("fine_tune_epochs", 0 if c.fine_tune_epochs is None else c.fine_tune_epochs, 0)
    c.unfreeze_blocks = check_int(
        "unfreeze_blocks", spec.finetune_blocks if c.unfreeze_blocks is None else c.unfreeze_blocks, 0
    )
    c.tta = check_bool("tta", c.tta)
    if c.preset is not None:
        c.preset = str(c.preset)
        if c.preset not in recipes.PRESETS:
            raise ConfigError(f"unknown preset {c.preset!r}; valid presets: {', '.join(recipes.PRESETS) or 'none'}")
    c.workers = check_int("workers", max(1, min(4, os.cpu_count() or 1)) if c.workers is None else c.workers, 1)
    c.cache_images = check_bool("cache_images", c.cache_images)
    c.deterministic = check_bool("deterministic", c.deterministic)
    c.colour_model = check_bool("colour_model", c.colour_model)
    c.pooling = check_choice("pooling", c.pooling, models.POOLINGS)
    c.head_fit = check_choice("head fit", c.head_fit, HEAD_FITS)
    if c.head_fit == "logistic-cv" and c.mode != "fast-head":
        raise ConfigError("head_fit 'logistic-cv' fits the head on cached features: it needs mode 'fast-head'")
    if c.colour_model and c.mode != "full":
        raise ConfigError(
            f"colour_model (set by the cpu-default preset) needs mode 'full', not {c.mode!r}: "
            "use mode 'full' (Train page: untick the fast head) or set colour_model false"
        )
    return c


def preset_config(name: str, **overrides) -> TrainConfig:
    """A validated, resolved :class:`TrainConfig` from a preset (:mod:`melcore.training.recipes`) and overrides.

    ``overrides`` are TrainConfig fields (e.g. ``clinic="north"``, ``image_size=32``,
    ``epochs=1``); a None value keeps the preset's. Raises ConfigError for an unknown preset,
    unknown fields (listing the valid ones) or invalid values.
    """
    return validate(TrainConfig.from_dict(recipes.preset_values(name, overrides)))
