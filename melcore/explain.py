"""Grad-CAM and Grad-CAM++ heatmaps and overlays for registry models.

A heatmap says which part of the image raised the model's melanoma score. It is
computed on the model's last convolutional feature map (found automatically,
also inside a nested backbone such as ``efficientnetb3``) and returned as a
float32 array of the image's height x width with values in [0, 1].

Typical use::

    overlay, heat = explain_image(run_dir, "ISIC_0015719.jpg", method="gradcam++")

or, with a model in memory::

    explainer = get_explainer(model, "gradcam")      # built once, reused
    heat = explainer.heatmap(image_uint8)            # (H, W) float32 in [0, 1]
    picture = overlay(image_uint8, heat, opacity=0.4, colormap="jet")

Design notes (why it is not a plain ``tf_keras_vis.gradcam.Gradcam(model)``):

* **Score.** The score differentiated is the melanoma *logit* (the input of the
  final sigmoid), the usual choice for sigmoid outputs: the probability
  saturates near 0 and 1 and its gradient vanishes there. tf-keras-vis gets the
  logit with ``ReplaceToLinear``, which sets ``activation = linear`` on the
  output layer; with ``clone=False`` that silently changes the caller's model,
  and with ``clone=True`` every explainer copies the whole network. Here the
  logit is computed by a small layer that reads the output Dense layer's own
  kernel and bias, so nothing of the caller's model is modified or copied.
* **Nested backbones.** melcore's registry models are flat, but a model made
  the usual transfer-learning way is not: ``Input -> preprocessing -> backbone
  (a nested Functional model, e.g. keras.applications) -> pooling -> Dense``.
  Under Keras 3 the output of a layer inside the backbone is not connected to
  the outer model's input, so tf-keras-vis (which builds
  ``Model(model.inputs, layer.output)``) fails with "Output ... is not
  connected to inputs". :func:`_flat_graph`
  re-runs the model's graph on a new input, calling the *same* layer objects
  (shared weights) and inlining nested models, which yields one flat graph
  ``image -> (logit, feature map, probability)``. It walks the graph with
  ``Functional._run_through_graph``, the method ``keras.models.clone_model``
  itself uses (Keras 3 has no public hook inside nested models).
* **Speed.** tf-keras-vis runs the network eagerly and rebuilds a Keras model
  on every call (1.2-2.5 s for EfficientNet-B3 at 256 px on 2 busy CPU cores,
  plus a whole-model clone per explainer with ``clone=True``). The default
  ``engine="compiled"`` computes the same Grad-CAM / Grad-CAM++ formulas (those
  of tf-keras-vis 0.8.7; the maps agree to 1e-6) inside one ``tf.function``
  traced once per explainer, taping only the layers after the feature map:
  about 0.1 s per image once warm. The first call pays the trace (4-9 s for
  EfficientNet-B3; :meth:`Explainer.warmup` does it up front, e.g. in a
  background thread when a run is selected). ``engine="tf-keras-vis"`` runs
  tf-keras-vis itself on the flat graph: the reference the tests compare the
  compiled engine against, and the engine of ``method="scorecam"`` (whose
  softmax over a single sigmoid unit is always 1, so it is given two logits
  ``(0, z)`` whose softmax is ``(1 - p, p)``).
* **Normalisation.** The class activation map (ReLU of the weighted feature
  maps, 8x8 for EfficientNet at 256 px) is upsampled bilinearly to the image
  size, then min-max scaled to [0, 1] like tf-keras-vis and pytorch-grad-cam do.
  A map with no positive evidence anywhere is all zeros.

Heatmaps computed by :func:`explain_image` are cached on disk under
``settings.subdir("cache/gradcam")`` keyed by the model file (path, mtime, size),
the image file (path, mtime, size), the method and the layer, so a retrained
model or an edited image is explained again; overlays are blended from the
cached heatmap at display time (cheap), so opacity and colour map are free.

TensorFlow is imported only when a heatmap has to be computed: reading a cached
heatmap and blending it needs numpy and Pillow only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import numpy as np
from PIL import Image

from melcore import settings
from melcore.errors import ConfigError, ImageError, MelcoreError
from melcore.images import load_image, verify_image

__all__ = [
    "METHODS",
    "ENGINES",
    "COLORMAPS",
    "Explainer",
    "find_last_conv_layer",
    "DETAILS",
    "detail_layer",
    "get_explainer",
    "colorize",
    "overlay",
    "flag_picture",
    "explain_image",
    "precompute_heatmaps",
    "load_run_model",
    "model_path",
    "clear_caches",
]

PathLike = Union[str, os.PathLike]

METHODS = ("gradcam", "gradcam++", "scorecam")
"""Explanation methods. ``scorecam`` (gradient-free, one forward pass per channel,
limited to ``SCORECAM_MAX_N`` channels) always runs on the tf-keras-vis engine."""

ENGINES = ("compiled", "tf-keras-vis")

COLORMAPS = ("jet", "turbo", "gray")

DETAILS = {"standard": "Standard (last feature map)", "fine": "Fine (a map of 2x or more the resolution)"}
"""Grad-CAM resolutions (:func:`detail_layer`). The last map of an EfficientNet at 224 px is 7x7, a blob
on a lesion; ``"fine"`` explains an earlier map through which every path to the score still passes."""

SCORECAM_MAX_N = 64
"""Channels ScoreCAM scores (Faster-ScoreCAM: the channels with the largest variance)."""

CACHE_VERSION = 1
"""Part of every disk-cache key; bump it when the heatmap computation changes."""

_DEFAULT_SIZE = 256  # input size used when a model accepts any size
_BATCH = 8
_FEATURE_MARKER = "melcore_gradcam_features"


# --------------------------------------------------------------------------- resolution


def detail_layer(model, detail: str = "standard") -> str | None:
    """The layer Grad-CAM uses for a resolution of :data:`DETAILS` (None = the last feature map).

    ``"fine"``: for a model with multi-level pooled features (``pooling="multi-level"``), the
    lowest pooled level (``block3b_add``: 28x28 at 224 px), since the score depends on the image
    only through that map and those above it, so its Grad-CAM accounts for the whole score;
    otherwise the last map at twice (or more) the last map's resolution (``block5c_add``, 14x14).
    Models that have no such map keep the last one.
    """
    if detail not in DETAILS:
        raise ConfigError(f"unknown Grad-CAM detail {detail!r}; choose one of {', '.join(DETAILS)}")
    if detail == "standard":
        return None
    from melcore import models

    names = [layer.name for layer in model.layers]
    if models.FEATURES_LAYER in names and any(n.startswith("pool_") for n in names):
        return models.pooled_levels(model)[0]
    top = model.get_layer(find_last_conv_layer(model))
    top_h = _spatial(_output_shape(top))
    if not top_h or not top_h[0]:
        return None
    import keras

    # The layers models.last_conv_layer_name skips, and the input's own rescaling/normalisation.
    not_maps = models._NOT_FEATURE_MAPS + (keras.layers.Rescaling, keras.layers.Normalization)
    finer = None
    for layer in model.layers:
        if layer is top:
            break
        shape = _spatial(_output_shape(layer))
        if shape and shape[0] and shape[0] >= 2 * top_h[0] and not isinstance(layer, not_maps):
            finer = layer.name
    return finer


# --------------------------------------------------------------------------- colour maps


def _jet(x: np.ndarray) -> np.ndarray:
    return np.stack([np.clip(1.5 - np.abs(4.0 * x - k), 0.0, 1.0) for k in (3.0, 2.0, 1.0)], axis=-1)


def _turbo(x: np.ndarray) -> np.ndarray:
    # Polynomial fit of Google's Turbo colour map (A. Mikhailov, 2019; fit by R. Du).
    # Max error against the published table is a few percent, invisible in an overlay.
    v4 = np.stack([np.ones_like(x), x, x**2, x**3], axis=-1)
    v2 = np.stack([x**4, x**5], axis=-1)
    red = v4 @ [0.13572138, 4.61539260, -42.66032258, 132.13108234] + v2 @ [-152.94239396, 59.28637943]
    green = v4 @ [0.09140261, 2.19418839, 4.84296658, -14.18503333] + v2 @ [4.27729857, 2.82956604]
    blue = v4 @ [0.10667330, 12.64194608, -60.58204836, 110.36276771] + v2 @ [-89.90310912, 27.34824973]
    return np.clip(np.stack([red, green, blue], axis=-1), 0.0, 1.0)


def _gray(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, None], 3, axis=1)


_LUT_FUNCTIONS = {"jet": _jet, "turbo": _turbo, "gray": _gray}
_LUTS: dict[str, np.ndarray] = {}


def _lut(colormap: str) -> np.ndarray:
    """(256, 3) uint8 lookup table of a colour map."""
    if colormap not in _LUT_FUNCTIONS:
        raise ConfigError(f"unknown colour map {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    lut = _LUTS.get(colormap)
    if lut is None:
        values = _LUT_FUNCTIONS[colormap](np.linspace(0.0, 1.0, 256))
        lut = np.rint(values * 255.0).astype(np.uint8)
        _LUTS[colormap] = lut
    return lut


def _check_heatmap(heatmap) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2 or heat.shape[0] == 0 or heat.shape[1] == 0:
        raise MelcoreError(f"heatmap must be a 2-D (height, width) array; got shape {heat.shape}")
    if not np.all(np.isfinite(heat)):
        raise MelcoreError("heatmap contains NaN or infinite values")
    return np.clip(heat, 0.0, 1.0)


def _check_image(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise MelcoreError(f"image must be an RGB array of shape (height, width, 3); got shape {array.shape}")
    return array


def _resize_map(values: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to (height, width)."""
    if values.shape == tuple(hw):
        return values.astype(np.float32, copy=False)
    resized = Image.fromarray(values.astype(np.float32, copy=False), mode="F").resize(
        (int(hw[1]), int(hw[0])), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def colorize(heatmap, colormap: str = "jet") -> np.ndarray:
    """Map a heatmap to colours.

    Parameters
    ----------
    heatmap : array-like (height, width)
        Values in [0, 1] (values outside are clipped).
    colormap : {"jet", "turbo", "gray"}
        "jet" (blue -> red), "turbo" (a perceptually smoother rainbow) or "gray".

    Returns
    -------
    np.ndarray (height, width, 3) uint8 RGB.
    """
    heat = _check_heatmap(heatmap)
    index = np.rint(heat * 255.0).astype(np.uint8)
    return _lut(colormap)[index]


def flag_picture(image, lines: Sequence[str]) -> np.ndarray:
    """``image`` with ``lines`` of warning text drawn on a dark band across its top.

    A warning belongs on the picture itself (a screenshot or an exported overlay keeps
    it). ``image``: (height, width, 3) uint8; returns a new array of the same shape
    (the image unchanged when ``lines`` is empty).
    """
    from PIL import ImageDraw, ImageFont

    array = _check_image(image)
    if not lines:
        return array.copy()
    picture = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))
    draw = ImageDraw.Draw(picture)
    size = max(10, picture.width // 32)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    line_height = size + 4
    draw.rectangle([0, 0, picture.width, line_height * len(lines) + 4], fill=(150, 0, 0))
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * line_height), str(line), fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def overlay(image, heatmap, opacity: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a colourised heatmap over an image.

    ``result = (1 - opacity) * image + opacity * colorize(heatmap)``, rounded to uint8:
    opacity 0 returns the image unchanged, 1 the colour map alone.

    Parameters
    ----------
    image : np.ndarray (height, width, 3) uint8 RGB
    heatmap : np.ndarray (h, w) float in [0, 1]
        Resized bilinearly to the image's size when the shapes differ.
    opacity : float in [0, 1]
    colormap : {"jet", "turbo", "gray"}

    Returns
    -------
    np.ndarray (height, width, 3) uint8.
    """
    array = _check_image(image)
    if array.dtype != np.uint8:
        raise MelcoreError(f"image must be uint8 RGB (0..255); got dtype {array.dtype}")
    try:
        alpha = float(opacity)
    except (TypeError, ValueError):
        raise MelcoreError(f"opacity must be a number between 0 and 1; got {opacity!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise MelcoreError(f"opacity must be between 0 and 1; got {opacity!r}")
    heat = _resize_map(_check_heatmap(heatmap), array.shape[:2])
    colours = colorize(heat, colormap)
    if alpha == 0.0:
        return array.copy()
    if alpha == 1.0:
        return colours
    blended = array.astype(np.float32) * (1.0 - alpha) + colours.astype(np.float32) * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- graph walking


def _is_container(layer) -> bool:
    """A model whose layers we can walk: Sequential or Functional (not a subclassed Model)."""
    import keras

    if isinstance(layer, keras.Sequential):
        return True
    return (
        isinstance(layer, keras.Model)
        and callable(getattr(layer, "_run_through_graph", None))
        and hasattr(layer, "_nodes_by_depth")
    )


def _walk(model, prefix: tuple[str, ...] = ()):
    """(path, layer) for every layer in topological order; a nested model comes after its layers."""
    for layer in model.layers:
        path = prefix + (layer.name,)
        if _is_container(layer):
            yield from _walk(layer, path)
        yield path, layer


def _output_shape(layer) -> tuple | None:
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    if isinstance(output, (list, tuple)):
        return None
    try:
        return tuple(output.shape)
    except (AttributeError, TypeError):
        return None


def _is_conv(layer) -> bool:
    import keras

    conv_types = (
        keras.layers.Conv2D,
        keras.layers.DepthwiseConv2D,
        keras.layers.SeparableConv2D,
        keras.layers.Conv2DTranspose,
    )
    return isinstance(layer, conv_types)


def _spatial(shape: tuple | None) -> tuple | None:
    """(height, width) of a rank-4 NHWC shape whose map is more than one pixel, else None."""
    if shape is None or len(shape) != 4:
        return None
    height, width = shape[1], shape[2]
    if height == 1 and width == 1:
        return None
    return (height, width)


def _check_model(model) -> None:
    import keras

    if not isinstance(model, keras.Model):
        raise MelcoreError(f"expected a keras.Model; got {type(model).__name__}")
    if not _is_container(model):
        raise MelcoreError(
            f"model {model.name!r} is a subclassed keras.Model; Grad-CAM needs a Functional or Sequential "
            "model whose layers can be walked (all melcore registry models are Functional)"
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise MelcoreError(
            f"model {model.name!r} has no defined input; build it (call it once or give it an "
            "Input layer) before explaining it"
        )
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        shapes = [tuple(x.shape) for x in inputs]
        raise MelcoreError(
            f"model {model.name!r} must take one image batch (batch, height, width, 3); its inputs are {shapes}"
        )


def find_last_conv_layer(model, *, follow: bool = True) -> str:
    """Path of the layer whose feature map Grad-CAM uses, searched through nested models.

    The search walks the model graph in topological order, entering nested
    Functional/Sequential models (e.g. the ``efficientnetb3`` backbone), and
    takes the last 2-D convolution (Conv2D, DepthwiseConv2D, SeparableConv2D,
    Conv2DTranspose) whose output is larger than 1x1 (squeeze-and-excitation
    convolutions on pooled 1x1 maps do not count).

    Parameters
    ----------
    model : keras.Model
    follow : bool
        When True (default), move forward from that convolution through the
        layers that keep its spatial size (batch norm, activation, residual add),
        so the result is the rectified feature map Grad-CAM is defined on, e.g.
        ``efficientnetb3/top_activation`` rather than ``.../top_conv`` and
        ``resnet50/conv5_block3_out`` rather than ``.../conv5_block3_3_conv``.
        False returns the convolution itself.

    Returns
    -------
    str
        Layer names from the outer model inwards joined by "/", e.g.
        ``"conv2d_1"`` or ``"efficientnetb3/top_activation"``; accepted as
        ``layer=`` by :class:`Explainer`.

    Raises
    ------
    MelcoreError
        The model has no convolution with a spatial output.
    """
    _check_model(model)
    entries = list(_walk(model))
    last = None
    for index, (_path, layer) in enumerate(entries):
        if _is_conv(layer) and _spatial(_output_shape(layer)) is not None:
            last = index
    if last is None:
        raise MelcoreError(
            f"model {model.name!r} has no 2-D convolution with a spatial output, so Grad-CAM has no feature "
            "map to use; pass layer= with the name of a layer whose output is (batch, height, width, channels)"
        )
    chosen = last
    if follow:
        size = _spatial(_output_shape(entries[last][1]))
        for index in range(last + 1, len(entries)):
            path, layer = entries[index]
            if _is_container(layer):
                continue  # a nested model's output is its last layer's output, already considered
            if _spatial(_output_shape(layer)) != size:
                break
            chosen = index
    return "/".join(entries[chosen][0])


def _resolve_layer(model, layer) -> tuple[tuple[str, ...], object]:
    """Find ``layer`` (path "a/b", bare name, or Layer object) in the model; (path, layer object)."""
    import keras

    entries = list(_walk(model))
    if isinstance(layer, keras.layers.Layer):
        for path, candidate in entries:
            if candidate is layer:
                return path, candidate
        raise MelcoreError(f"layer {layer.name!r} is not part of model {model.name!r}")
    if not isinstance(layer, str) or not layer:
        raise MelcoreError(f"layer must be a layer name, a 'model/layer' path or a Layer; got {layer!r}")
    wanted = tuple(layer.split("/"))
    for path, candidate in entries:
        if path == wanted:
            return path, candidate
    for path, candidate in reversed(entries):
        if len(wanted) == 1 and path[-1] == wanted[0]:
            return path, candidate
    feature_layers = ["/".join(p) for p, c in entries if _spatial(_output_shape(c)) is not None]
    hint = ", ".join(feature_layers[-5:]) or "none"
    raise MelcoreError(f"no layer {layer!r} in model {model.name!r}; layers with feature maps near the output: {hint}")


def _head_layer(model):
    """The layer that produces the model's output (inside nested models if the last layer is one)."""
    layer = model.layers[-1]
    while _is_container(layer):
        layer = layer.layers[-1]
    return layer


def _activation_name(layer) -> str:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


_LOGIT_LAYER_CLASS = None


def _logit_layer_class():
    """A layer computing a Dense layer's pre-activation from that layer's own variables."""
    global _LOGIT_LAYER_CLASS
    if _LOGIT_LAYER_CLASS is None:
        import keras

        class DenseLogit(keras.layers.Layer):
            """``x @ dense.kernel + dense.bias``: the logit of a sigmoid Dense head, sharing its weights.

            Used only inside explanation graphs (never saved), so it needs no registration.
            """

            def __init__(self, dense, **kwargs):
                super().__init__(**kwargs)
                self.dense = dense

            def call(self, inputs):
                outputs = keras.ops.matmul(inputs, self.dense.kernel)
                if self.dense.use_bias:
                    outputs = outputs + self.dense.bias
                return outputs

            def compute_output_shape(self, input_shape):
                return tuple(input_shape[:-1]) + (self.dense.units,)

        _LOGIT_LAYER_CLASS = DenseLogit
    return _LOGIT_LAYER_CLASS


def _flat_graph(model, target, target_name: str):
    """Flat Functional graph ``image -> (score, features, probability)`` sharing ``model``'s layers.

    ``score`` is the logit when the head is a sigmoid Dense layer or a sigmoid
    Activation layer, else the probability itself. ``features`` passes through an
    Identity layer (the "marker") so that tf-keras-vis can address it as a layer.
    Returns (graph model, marker layer, score kind).
    """
    import keras

    head = _head_layer(model)
    marker = keras.layers.Identity(name=_FEATURE_MARKER)
    captured: dict[str, object] = {}

    def hook(layer, args, output):
        if layer is target and "features" not in captured:
            if not (hasattr(output, "shape") and len(output.shape) == 4):
                raise MelcoreError(
                    f"layer {target_name!r} outputs shape "
                    f"{getattr(output, 'shape', '?')}; Grad-CAM needs a (batch, height, width, "
                    "channels) feature map"
                )
            output = marker(output)
            captured["features"] = output
        if layer is head:
            captured["head_output"] = output
            if isinstance(layer, keras.layers.Dense) and _activation_name(layer) == "sigmoid":
                captured["logit"] = _logit_layer_class()(layer, name="melcore_gradcam_logit")(args[0])
            elif isinstance(layer, keras.layers.Activation) and _activation_name(layer) == "sigmoid":
                captured["logit"] = args[0]
        return output

    def call(layer, args, kwargs):
        if _is_container(layer):
            extra = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
            if extra:
                raise MelcoreError(
                    f"nested model {layer.name!r} is called with arguments {sorted(extra)}, "
                    "which Grad-CAM cannot replay"
                )
            output = run(layer, args[0] if len(args) == 1 else list(args))
        else:
            output = layer(*args, **kwargs)
        return hook(layer, args, output)

    def run(container, inputs):
        if isinstance(container, keras.Sequential):
            x = inputs
            for layer in container.layers:
                x = call(layer, (x,), {})
            return x
        return container._run_through_graph(
            inputs, operation_fn=lambda op: op, call_fn=lambda op, *a, **k: call(op, a, k)
        )

    source = model.inputs[0]
    image = keras.Input(batch_shape=tuple(source.shape), dtype=source.dtype, name="image")
    probability = run(model, image)
    if isinstance(probability, (list, tuple)):
        raise MelcoreError(
            f"model {model.name!r} has {len(probability)} outputs; Grad-CAM needs one "
            "melanoma probability of shape (batch, 1)"
        )
    if tuple(probability.shape)[1:] != (1,):
        raise MelcoreError(
            f"model {model.name!r} outputs shape {tuple(probability.shape)}; Grad-CAM needs one "
            "melanoma probability per image, shape (batch, 1)"
        )
    if "features" not in captured:
        raise MelcoreError(
            f"layer {target_name!r} is not on the path from the input to the output of model {model.name!r}"
        )
    if "logit" in captured and captured.get("head_output") is probability:
        score, kind = captured["logit"], "logit"
    else:
        score, kind = probability, "probability"
    graph = keras.Model(image, [score, captured["features"], probability], name=f"{model.name}_gradcam")
    return graph, marker, kind


# --------------------------------------------------------------------------- CAM formulas


def _gradcam(features, grads):
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_c mean_hw(dS/dA_c) * A_c). Shapes (n,h,w,c) -> (n,h,w)."""
    import tensorflow as tf

    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(features * weights, axis=-1))


def _gradcam_plus_plus(features, grads):
    """Grad-CAM++ (Chattopadhyay et al. 2018) exactly as tf-keras-vis 0.8.7 computes it.

    tf-keras-vis multiplies the gradients by exp(score); that factor cancels in the
    alphas and only scales the map, which is normalised afterwards, so it is left
    out here (it would overflow for logits above ~88).
    """
    import tensorflow as tf

    first = grads
    second = first * grads
    third = second * grads
    global_sum = tf.reduce_sum(features, axis=(1, 2), keepdims=True)
    denominator = second * 2.0 + third * global_sum
    denominator = denominator + tf.cast(tf.equal(second, 0.0), second.dtype)
    alphas = second / denominator
    norm = tf.reduce_sum(alphas, axis=(1, 2), keepdims=True)
    alphas = alphas / (norm + tf.cast(tf.equal(norm, 0.0), norm.dtype))
    weights = tf.reduce_sum(tf.nn.relu(first) * alphas, axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))


def _normalise(cams: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Upsample (n, h, w) raw maps to (n, H, W) and min-max scale each to [0, 1]."""
    out = np.zeros((len(cams),) + tuple(hw), dtype=np.float32)
    for i, cam in enumerate(cams):
        cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        big = _resize_map(cam, hw)
        low, high = float(big.min()), float(big.max())
        if high - low > 1e-12 * max(1.0, abs(high)):
            out[i] = (big - low) / (high - low)
    return np.clip(out, 0.0, 1.0, out=out)


# --------------------------------------------------------------------------- the explainer


class Explainer:
    """Grad-CAM / Grad-CAM++ (or ScoreCAM) for one model, built once and reused.

    Building it walks the model graph and makes a flat graph that shares the
    model's layers (nothing of ``model`` is modified, no weights are copied);
    the first :meth:`heatmap` call traces the computation (seconds for large
    backbones), later calls reuse it. Thread-safe: Streamlit sessions may share one.

    Parameters
    ----------
    model : keras.Model
        Functional or Sequential, one input (batch, height, width, 3) taking raw RGB
        0..255 (preprocessing inside the model, as in the melcore registry), one
        output (batch, 1): the melanoma probability.
    method : {"gradcam", "gradcam++", "scorecam"}
    layer : str or keras Layer, optional
        Feature map to explain: a path from :func:`find_last_conv_layer`
        ("efficientnetb3/top_conv"), a bare layer name (searched in nested models
        too) or the layer object. Default: :func:`find_last_conv_layer(model)`.
    engine : {"compiled", "tf-keras-vis"}
        "compiled" (default): the formulas in one traced ``tf.function``.
        "tf-keras-vis": tf-keras-vis 0.8.7's own classes on the flat graph (eager,
        about 10x slower on large backbones); forced for ``scorecam``.

    Attributes
    ----------
    model, method, engine
    layer : str
        Path of the explained layer, e.g. "efficientnetb3/top_activation".
    score : {"logit", "probability"}
        What is differentiated: the logit when the head is a sigmoid Dense or
        Activation layer (registry models), else the probability.
    input_size : (height, width)
        Size images are resized to before entering the model.
    feature_size : (height, width)
        Resolution of the class activation map before upsampling.
    """

    def __init__(self, model, method: str = "gradcam", layer=None, *, engine: str = "compiled"):
        if method not in METHODS:
            raise ConfigError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        _check_model(model)
        if method == "scorecam":
            engine = "tf-keras-vis"
        self.model = model
        self.method = method
        self.engine = engine
        path, target = _resolve_layer(model, find_last_conv_layer(model) if layer is None else layer)
        self.layer = "/".join(path)
        self._graph, self._marker, self.score = _flat_graph(model, target, self.layer)
        shape = tuple(model.inputs[0].shape)
        if shape[3] not in (None, 3):
            raise MelcoreError(f"model {model.name!r} takes {shape[3]}-channel images; Grad-CAM expects RGB (3)")
        self.input_size = (shape[1], shape[2]) if shape[1] and shape[2] else None
        feature_shape = tuple(self._graph.outputs[1].shape)
        self.feature_size = (feature_shape[1], feature_shape[2])
        self._lock = threading.Lock()
        self._compiled = None
        self._tkv = None
        self._tkv_column = 0

    def __repr__(self) -> str:
        return (
            f"Explainer(model={self.model.name!r}, method={self.method!r}, layer={self.layer!r}, "
            f"engine={self.engine!r}, score={self.score!r})"
        )

    # ---- inputs

    def _prepare(self, image) -> np.ndarray:
        """One image -> float32 (height, width, 3) at the model's input size, values 0..255."""
        array = _check_image(image)
        if array.dtype == np.uint8:
            pass
        elif np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
            if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 255):
                raise MelcoreError(
                    "image values must be raw RGB in 0..255 (the model preprocesses "
                    f"internally); got range {np.nanmin(array)}..{np.nanmax(array)}"
                )
        else:
            raise MelcoreError(f"image must be a numeric RGB array; got dtype {array.dtype}")
        size = self.input_size or array.shape[:2]
        if tuple(array.shape[:2]) != tuple(size):
            if array.dtype == np.uint8:
                array = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BILINEAR))
            else:
                array = np.stack([_resize_map(array[..., c].astype(np.float32), size) for c in range(3)], axis=-1)
        return np.asarray(array, dtype=np.float32)

    # ---- engines

    def _split(self):
        """(image -> features, features -> (score, probability)) sharing the graph's layers, or (None, None).

        Keras 3 builds a model from an intermediate tensor by cloning the graph's nodes
        (not its layers). Impossible when something after the feature map also reads an
        earlier tensor (a skip connection around it): the whole graph is then taped.
        """
        import keras

        score, features, probability = self._graph.outputs
        try:
            suffix = keras.Model(features, [score, probability])
        except ValueError:
            return None, None
        return keras.Model(self._graph.inputs, features), suffix

    def _compiled_function(self):
        import tensorflow as tf

        with self._lock:
            if self._compiled is None:
                graph = self._graph
                formula = _gradcam if self.method == "gradcam" else _gradcam_plus_plus
                size = self.input_size or (None, None)

                prefix, suffix = self._split()

                @tf.function(
                    input_signature=[tf.TensorSpec((None, size[0], size[1], 3), tf.float32)], reduce_retracing=True
                )
                def cams(images):
                    if suffix is not None:
                        # Only the part after the feature map is recorded: halves the trace time.
                        features = prefix(images, training=False)
                        with tf.GradientTape(watch_accessed_variables=False) as tape:
                            tape.watch(features)
                            score, probability = suffix(features, training=False)
                            total = tf.reduce_sum(tf.cast(score[:, 0], tf.float32))
                    else:
                        with tf.GradientTape(watch_accessed_variables=False) as tape:
                            tape.watch(images)
                            score, features, probability = graph(images, training=False)
                            total = tf.reduce_sum(tf.cast(score[:, 0], tf.float32))
                    grads = tape.gradient(total, features)
                    features = tf.cast(features, tf.float32)
                    grads = tf.cast(grads, tf.float32)
                    return formula(features, grads), tf.cast(probability[:, 0], tf.float32)

                self._compiled = cams
        return self._compiled

    def _tkv_cams(self, batch: np.ndarray) -> np.ndarray:
        import keras

        with self._lock:
            if self._tkv is None:
                with warnings.catch_warnings():  # tf-keras-vis imports scipy.ndimage.interpolation (deprecated)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    from tf_keras_vis.gradcam import Gradcam
                    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
                    from tf_keras_vis.scorecam import Scorecam

                score, _, probability = self._graph.outputs
                if self.method == "scorecam":
                    # tf-keras-vis ScoreCAM applies a softmax over the output's last axis; on a single
                    # sigmoid unit that is always 1 and every channel would get the same weight. Two logits
                    # (0, z) give softmax (1 - p, p): the melanoma probability is then column 1.
                    if self.score == "logit":
                        logit = score
                    else:
                        clipped = keras.ops.clip(probability, 1e-7, 1.0 - 1e-7)
                        logit = keras.ops.log(clipped) - keras.ops.log1p(-clipped)
                    two = keras.layers.Concatenate()([keras.ops.zeros_like(logit), logit])
                    model = keras.Model(self._graph.inputs, two)
                    # ScoreCAM calls model.predict(); keep Keras's progress bar off stdout (our own model).
                    model.predict = functools.partial(model.predict, verbose=0)
                    self._tkv_column = 1
                else:
                    model = keras.Model(self._graph.inputs, score)
                    self._tkv_column = 0
                cls = {"gradcam": Gradcam, "gradcam++": GradcamPlusPlus, "scorecam": Scorecam}[self.method]
                # No model_modifier: the graph already ends in the logit, so ReplaceToLinear (which would
                # change the shared Dense layer of the caller's model) is not needed and nothing is cloned.
                self._tkv = cls(model, clone=False)
            visualiser, column = self._tkv, self._tkv_column
        options = dict(
            penultimate_layer=self._marker, seek_penultimate_conv_layer=False, expand_cam=False, normalize_cam=False
        )
        if self.method == "scorecam":
            channels = int(self._graph.outputs[1].shape[-1])
            options.update(max_N=min(SCORECAM_MAX_N, channels), batch_size=16)
        cams = visualiser(lambda output: output[:, column], batch, **options)
        return np.asarray(cams, dtype=np.float32).reshape((len(batch),) + tuple(self.feature_size))

    def _raw_cams(self, batch: np.ndarray) -> np.ndarray:
        """(n, h, w, 3) float32 at input size -> (n, fh, fw) raw (unnormalised) class activation maps."""
        if self.engine == "compiled":
            cams, _ = self._compiled_function()(batch)
            return cams.numpy()
        return self._tkv_cams(batch)

    # ---- public

    def warmup(self) -> "Explainer":
        """Trace the computation now (on a black image) so the first real call is fast; returns self."""
        size = self.input_size or (_DEFAULT_SIZE, _DEFAULT_SIZE)
        self._raw_cams(np.zeros((1, size[0], size[1], 3), dtype=np.float32))
        return self

    def heatmaps(self, images) -> np.ndarray:
        """Heatmaps of a batch of images of one size.

        Parameters
        ----------
        images : np.ndarray (n, height, width, 3) or a sequence of (height, width, 3) arrays
            Raw RGB, uint8 (or float 0..255). Resized to the model's input size
            for the model; each heatmap has its image's height and width.

        Returns
        -------
        np.ndarray (n, height, width) float32 in [0, 1].
        """
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise MelcoreError(
                f"images must be a (n, height, width, 3) array or a list of images; got shape {images.shape}"
            )
        items = list(images)
        if not items:
            return np.zeros((0, 0, 0), dtype=np.float32)
        sizes = {tuple(_check_image(image).shape[:2]) for image in items}
        if len(sizes) > 1:
            raise MelcoreError(
                f"images in one call must share a size; got {sorted(sizes)} (call heatmap() per image instead)"
            )
        prepared = [self._prepare(image) for image in items]
        cams = []
        for start in range(0, len(prepared), _BATCH):
            cams.extend(self._raw_cams(np.stack(prepared[start : start + _BATCH])))
        return _normalise(np.stack(cams), sizes.pop())

    def heatmap(self, image) -> np.ndarray:
        """Heatmap of one image.

        Parameters
        ----------
        image : np.ndarray (height, width, 3)
            Raw RGB, uint8 (or float 0..255), any size (resized for the model).

        Returns
        -------
        np.ndarray (height, width) float32 in [0, 1]: 1 where the evidence for
        melanoma is strongest; all zeros when no region raises the score.
        """
        array = _check_image(image)
        return self.heatmaps(array[None])[0]

    def overlay(self, image, heatmap=None, opacity: float = 0.4, colormap: str = "jet") -> np.ndarray:
        """:func:`overlay` of ``heatmap`` (computed with :meth:`heatmap` when None) on ``image``."""
        if heatmap is None:
            heatmap = self.heatmap(image)
        return overlay(np.asarray(image), heatmap, opacity=opacity, colormap=colormap)


# --------------------------------------------------------------------------- caches in memory

_CACHE_LOCK = threading.RLock()
_EXPLAINERS: "OrderedDict[tuple, tuple[weakref.ref, Explainer]]" = OrderedDict()
_MAX_EXPLAINERS = 8
_MODELS: "OrderedDict[tuple, object]" = OrderedDict()
_MAX_MODELS = 3
_LOADING: dict[tuple, threading.Lock] = {}  # model key -> held while that model file is being loaded


def get_explainer(model, method: str = "gradcam", layer=None, *, engine: str = "compiled") -> Explainer:
    """The process-wide :class:`Explainer` for (this model object, method, layer, engine).

    Created on first use and then reused (the cache holds the 8 most recently used;
    a model is identified by object identity, so a reloaded model gets a new one).
    """
    layer_key = layer if layer is None or isinstance(layer, str) else ("object", id(layer))
    key = (id(model), method, layer_key, engine)
    with _CACHE_LOCK:
        entry = _EXPLAINERS.get(key)
        if entry is not None and entry[0]() is model:
            _EXPLAINERS.move_to_end(key)
            return entry[1]
        explainer = Explainer(model, method, layer, engine=engine)
        _EXPLAINERS[key] = (weakref.ref(model), explainer)
        while len(_EXPLAINERS) > _MAX_EXPLAINERS:
            _EXPLAINERS.popitem(last=False)
        return explainer


def clear_caches() -> None:
    """Forget the in-memory explainers and loaded models (the disk cache is kept)."""
    with _CACHE_LOCK:
        _EXPLAINERS.clear()
        _MODELS.clear()


def model_path(run: PathLike) -> Path:
    """The model file of a run: ``run/model.keras`` for a run directory, or ``run`` if it is a .keras file.

    Raises
    ------
    MelcoreError
        Nothing at that path, or a directory without model.keras.
    """
    path = Path(os.fspath(run)).expanduser()
    if path.is_dir():
        candidate = path / "model.keras"
        if not candidate.is_file():
            raise MelcoreError(
                f"{path}: no model.keras in this run directory (has the training finished? "
                "pass a run directory or a .keras file)"
            )
        return candidate.resolve()
    if path.is_file():
        if path.suffix != ".keras":
            raise MelcoreError(f"{path}: not a Keras model file (expected a run directory or a .keras file)")
        return path.resolve()
    raise MelcoreError(f"{path}: no such run directory or model file")


def _load_keras_file(path: Path):
    from melcore.models import load_model  # registers the registry's custom layers (imports Keras)

    try:
        return load_model(path)
    except MelcoreError:
        raise
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, TypeError...
        raise MelcoreError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc


def load_run_model(run: PathLike):
    """Load a run's model once per process (reloaded when the file's mtime or size changes)."""
    path = model_path(run)
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        model = _MODELS.get(key)
        if model is not None:
            _MODELS.move_to_end(key)
            return model
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:  # a second caller (a page, a warm-up thread) waits for the first one's model
        with _CACHE_LOCK:
            model = _MODELS.get(key)
        if model is None:
            model = _load_keras_file(path)
            with _CACHE_LOCK:
                for old in [k for k in _MODELS if k[0] == key[0]]:
                    del _MODELS[old]
                _MODELS[key] = model
                while len(_MODELS) > _MAX_MODELS:
                    _MODELS.popitem(last=False)
    with _CACHE_LOCK:
        _LOADING.pop(key, None)
    return model


# --------------------------------------------------------------------------- disk cache


def _stat_image(image_path: PathLike) -> tuple[Path, os.stat_result]:
    path = Path(os.fspath(image_path)).expanduser().resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not path.is_file():
        raise ImageError(path, "not a file")
    return path, stat


def _cache_file(model_file: Path, image_file: Path, image_stat: os.stat_result, method: str, layer: str | None) -> Path:
    model_stat = model_file.stat()
    key = json.dumps(
        {
            "version": CACHE_VERSION,
            "model": [str(model_file), model_stat.st_mtime_ns, model_stat.st_size],
            "image": [str(image_file), image_stat.st_mtime_ns, image_stat.st_size],
            "method": method,
            "layer": layer or "auto",
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()
    return settings.subdir("cache/gradcam") / digest[:2] / f"{digest}.npy"


def _read_cached(path: Path) -> np.ndarray | None:
    try:
        heat = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # missing or half-written by a crashed process: recompute
    if heat.ndim != 2 or not np.all(np.isfinite(heat)):
        return None
    return heat.astype(np.float32)


def _write_cached(path: Path, heat: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, heat.astype(np.float16))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # a read-only or full cache only costs a recomputation next time


def _load(image_file: Path, size) -> np.ndarray:
    return load_image(image_file, size)


def explain_image(
    run: PathLike,
    image_path: PathLike,
    method: str = "gradcam",
    opacity: float = 0.4,
    *,
    colormap: str = "jet",
    layer: str | None = None,
    detail: str = "standard",
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Explain one image file with a run's model: (overlay, heatmap), both at the model's input size.

    The model is loaded once per process (see :func:`load_run_model`) and its
    explainer reused; the heatmap is cached on disk, so a second call for the same
    model file, image file, method and layer only reads a small ``.npy`` file and
    blends (no TensorFlow needed).

    Parameters
    ----------
    run : path
        A run directory containing ``model.keras``, or a ``.keras`` file.
    image_path : path
        The image (decoded with :func:`melcore.images.load_image` at the model's input size).
    method : {"gradcam", "gradcam++", "scorecam"}
    opacity : float in [0, 1]
        Weight of the colour map in the overlay.
    colormap : {"jet", "turbo", "gray"}
    layer : str, optional
        Layer to explain (default: :func:`find_last_conv_layer`, or the layer of ``detail``).
    detail : {"standard", "fine"}
        Resolution of the map when ``layer`` is not given (:func:`detail_layer`).
    use_cache : bool
        False recomputes and does not write the disk cache.
    progress : callable(done, total), optional
        Called with (0, 3), (1, 3) after loading the model, (2, 3) once the explainer
        is ready and (3, 3) at the end; only (0, 1), (1, 1) on a cache hit.

    Returns
    -------
    overlay : np.ndarray (height, width, 3) uint8
    heatmap : np.ndarray (height, width) float32 in [0, 1]

    Raises
    ------
    MelcoreError
        No model at ``run``, a model that cannot be loaded or explained, bad options.
    ImageError
        Missing or unreadable image.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    _lut(colormap)
    if detail not in DETAILS:
        raise ConfigError(f"unknown Grad-CAM detail {detail!r}; choose one of {', '.join(DETAILS)}")
    model_file = model_path(run)
    image_file, image_stat = _stat_image(image_path)
    cache_file = _cache_file(
        model_file, image_file, image_stat, method, layer or (None if detail == "standard" else f"detail:{detail}")
    )
    if use_cache:
        heat = _read_cached(cache_file)
        if heat is not None:
            if progress is not None:
                progress(0, 1)
            image = _load(image_file, heat.shape)
            result = overlay(image, heat, opacity=opacity, colormap=colormap), heat
            if progress is not None:
                progress(1, 1)
            return result
    if progress is not None:
        progress(0, 3)

    verify_image(image_file)  # a bad image fails now, not after seconds of model loading
    model = load_run_model(model_file)
    if progress is not None:
        progress(1, 3)
    explainer = get_explainer(model, method, layer if layer is not None else detail_layer(model, detail))
    if progress is not None:
        progress(2, 3)
    image = _load(image_file, explainer.input_size or _DEFAULT_SIZE)
    heat = explainer.heatmap(image)
    if use_cache:
        _write_cached(cache_file, heat)
        heat = heat.astype(np.float16).astype(np.float32)  # identical to what a cache hit returns
    result = overlay(image, heat, opacity=opacity, colormap=colormap), heat
    if progress is not None:
        progress(3, 3)
    return result


def precompute_heatmaps(
    run: PathLike,
    image_paths: Iterable[PathLike],
    method: str = "gradcam",
    *,
    layer: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Fill the disk cache for many images (e.g. a run's validation set) in batches.

    Images already cached are skipped; unreadable images are skipped too (their
    :func:`explain_image` call will report the ImageError). Returns the number of
    heatmaps computed. ``progress(done, total)`` is called after each batch.
    """
    model_file = model_path(run)
    todo: list[tuple[Path, Path]] = []
    paths = list(image_paths)
    for image_path in paths:
        try:
            image_file, image_stat = _stat_image(image_path)
        except ImageError:
            continue
        cache_file = _cache_file(model_file, image_file, image_stat, method, layer)
        if _read_cached(cache_file) is None:
            todo.append((image_file, cache_file))
    total = len(todo)
    if progress is not None:
        progress(0, total)
    if not todo:
        return 0
    explainer = get_explainer(load_run_model(model_file), method, layer)
    size = explainer.input_size or _DEFAULT_SIZE
    done = computed = 0
    for start in range(0, total, _BATCH):
        chunk = todo[start : start + _BATCH]
        images, targets = [], []
        for image_file, cache_file in chunk:
            try:
                images.append(_load(image_file, size))
                targets.append(cache_file)
            except ImageError:
                pass
        if images:
            for heat, cache_file in zip(explainer.heatmaps(np.stack(images)), targets):
                _write_cached(cache_file, heat)
                computed += 1
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return computed
