"""Cached backbone features: what the "fast-head" training mode (:mod:`melcore.training.fast_head`) trains on.

A frozen backbone turns an image into a pooled feature vector; computing it is the
expensive part (EfficientNet-B3 at 256 px: ~20 images/s on a CPU, a full fine-tune
~3 images/s). Features are computed once per (backbone, image) and kept on disk, so
a clinic-specific model is retrained in seconds by fitting only the head::

    config = TrainConfig(model="efficientnet-b3", image_size=256, weights="imagenet",
                         mode="fast-head", clinic="clinic-north")
    run = fit(config, cohort)          # melcore.training.api.fit -> training.fast_head.fit_fast_head

The joined model (``models.join(backbone, head)``) is saved as an ordinary run
(model.keras, config.json, metrics.json, val_predictions.csv, train.log): predict,
evaluate and Grad-CAM use it like any other run.

Cache layout (:class:`FeatureCache`, default ``settings.subdir("cache/features")``)::

    <root>/<backbone key>/meta.json                 what the key stands for
    <root>/<backbone key>/<xx>/<sha1>.npy           float32 (n_features,) for one image and view

* The **backbone key** (:func:`backbone_key`) is a SHA-256 of the model name, image
  size, Keras version and the *values of every backbone weight* (including batch-norm
  statistics). That is the weights' identity whatever their origin: an ImageNet file,
  a user's weights file, or a random initialisation (a function of the seed, model
  name and Keras version). New weights therefore never reuse stale features.
* The **image entry** is keyed by the absolute path, mtime (ns) and size of the
  file, and the view name, so a changed file is computed again.
* One ``.npy`` per entry, written through a temporary sibling and ``os.replace``:
  any number of processes may fill the same cache; a reader never sees half a file.
  At EfficientNet-B3 (1,536 features) an entry is 6 KiB: 33k ISIC images take
  ~200 MB per backbone and view.
* **Views** (:data:`VIEWS`) are the 8 dihedral transforms in the order of
  :func:`melcore.predict.dihedral_views`; ``"identity"`` is the image itself. Extra
  views serve as augmentation for the head and as test-time augmentation.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from melcore import settings
from melcore.errors import ConfigError, ImageError
from melcore.registry import PUBLISHED_WEIGHTS

__all__ = [
    "VIEWS",
    "FeatureCache",
    "FeatureExtractor",
    "FeatureResult",
    "backbone_key",
    "apply_view",
    "check_views",
    "get_extractor",
    "compute_features",
    "head_of",
    "score_features",
]

log = logging.getLogger("melcore.train.features")

FORMAT_VERSION = 1
#: The 8 dihedral views, in the order of :func:`melcore.predict.dihedral_views`.
VIEWS = (
    "identity",
    "rot90",
    "rot180",
    "rot270",
    "transpose",
    "transpose-rot90",
    "transpose-rot180",
    "transpose-rot270",
)
_BACKBONE_MEMO_SIZE = 2


# --------------------------------------------------------------------------- views


def check_views(views) -> tuple[str, ...]:
    if views is None:
        return ("identity",)
    if isinstance(views, str):
        views = (views,)
    views = tuple(views)
    if not views:
        raise ConfigError("views must name at least one view, e.g. ('identity',)")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ConfigError(f"unknown feature view(s) {', '.join(map(repr, unknown))}; valid views: {', '.join(VIEWS)}")
    if len(set(views)) != len(views):
        raise ConfigError(f"feature views repeat: {views}")
    return views


def apply_view(batch: np.ndarray, view: str) -> np.ndarray:
    """One dihedral view of a batch of square images ``(b, s, s, c)`` (same shape and dtype)."""
    index = VIEWS.index(view)
    base = batch if index < 4 else batch.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(np.rot90(base, index % 4, axes=(1, 2)))


# --------------------------------------------------------------------------- keys


def backbone_key(backbone, model_name: str, image_size: int, pooling: str = "avg") -> str:
    """Hex SHA-256 naming a backbone's features: model name, image size, pooling, Keras version,
    weight values.

    Hashing the loaded weight values (every variable, trainable or not, in graph order)
    identifies the weights whatever their source: the same ImageNet or user file gives
    the same key; a random initialisation gives a key that depends on the seed, model
    name and Keras version; a changed file or seed gives a new key.
    """
    import keras

    digest = hashlib.sha256()
    digest.update(
        f"melcore-features v{FORMAT_VERSION}\0{model_name}\0{int(image_size)}\0keras {keras.__version__}\0".encode()
    )
    if pooling != "avg":  # (average-pooled keys stay those written before poolings existed)
        digest.update(f"pooling {pooling}\0".encode())
    # Variable *paths* are left out on purpose: auto-named layers (e.g. "normalization_1") get a
    # new name on every build in a process, though the graph and the values are the same.
    for index, variable in enumerate(backbone.weights):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{index}\0{value.dtype}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the cache


def _atomic_save(target: Path, array: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FeatureCache:
    """On-disk pooled features, one ``.npy`` (float32, shape ``(n_features,)``) per backbone, image and view.

    Parameters
    ----------
    root : path, optional
        Default ``settings.subdir("cache/features")``. Several processes may share it.

    ``hits`` / ``misses`` count image lookups (an image is a hit when every requested
    view was cached). Nothing is evicted automatically: :meth:`clear` or delete a
    backbone's folder.
    """

    def __init__(self, root=None):
        if root is None:
            root = settings.subdir("cache/features")
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.write_errors = 0

    def __repr__(self) -> str:
        return f"FeatureCache(root={str(self.root)!r}, hits={self.hits}, misses={self.misses})"

    def folder(self, key: str) -> Path:
        return self.root / key[:32]

    def entry(self, key: str, path: str, st: os.stat_result, view: str) -> Path:
        """File of one (backbone key, image file state, view)."""
        ident = f"v{FORMAT_VERSION}\0{path}\0{st.st_mtime_ns}\0{st.st_size}\0{view}"
        digest = hashlib.sha1(ident.encode("utf-8", "surrogateescape")).hexdigest()
        return self.folder(key) / digest[:2] / f"{digest}.npy"

    def read(self, entry: Path, n_features: int | None = None) -> np.ndarray | None:
        """The cached vector, or None when absent or unreadable (a damaged entry is recomputed)."""
        try:
            value = np.load(entry, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if value.ndim != 1 or (n_features is not None and value.shape[0] != n_features):
            return None
        return value.astype(np.float32, copy=False)

    def write(self, entry: Path, value: np.ndarray) -> None:
        try:
            _atomic_save(entry, np.asarray(value, dtype=np.float32))
        except OSError:
            self.write_errors += 1  # a full or read-only cache must not break training

    def describe(self, key: str, meta: dict) -> None:
        """Write ``meta.json`` of a backbone key once (what the key stands for; for people)."""
        path = self.folder(key) / "meta.json"
        if path.exists():
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".meta.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, **meta}, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, path)

    def clear(self) -> int:
        """Delete every entry; returns the number of files removed."""
        removed = 0
        for path in self.root.rglob("*"):
            if path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed


# --------------------------------------------------------------------------- backbones


@dataclasses.dataclass
class FeatureExtractor:
    """A frozen backbone and the key of its features.

    Attributes: backbone (keras.Model raw RGB -> (batch, n_features)), weights_info
    (:class:`melcore.models.WeightsInfo`), key (:func:`backbone_key`), model_name,
    image_size, n_features, build_seconds, reused (taken from the in-process memo).
    """

    backbone: Any
    weights_info: Any
    key: str
    model_name: str
    image_size: int
    build_seconds: float = 0.0
    reused: bool = False

    @property
    def n_features(self) -> int:
        return int(self.backbone.output.shape[-1])

    def meta(self) -> dict:
        import keras

        return {
            "model": self.model_name,
            "image_size": self.image_size,
            "n_features": self.n_features,
            "weights": self.weights_info.to_dict(),
            "keras": keras.__version__,
        }


_MEMO: "collections.OrderedDict[tuple, FeatureExtractor]" = collections.OrderedDict()
_MEMO_LOCK = threading.Lock()


def _memo_key(config) -> tuple:
    import keras

    weights = str(config.weights)
    file_state = None
    if weights.lower() not in ("none", *PUBLISHED_WEIGHTS):
        try:
            st = os.stat(weights)
            file_state = (st.st_mtime_ns, st.st_size)
        except OSError:
            file_state = None
    # Random weights depend on the seed; loaded weights do not (seed kept anyway: cheap and safe).
    return (
        config.model,
        int(config.image_size),
        weights,
        file_state,
        int(config.seed),
        bool(config.fallback_to_scratch),
        config.pooling,
        keras.__version__,
    )


def get_extractor(config, strategy=None, *, reuse: bool = True) -> FeatureExtractor:
    """Build (or reuse, within this process) the frozen backbone of a resolved TrainConfig.

    The backbone is built after ``keras.utils.set_random_seed(config.seed)``, so random
    weights are a function of the seed. With ``reuse`` (and no strategy) the last two
    backbones are kept in memory: a worker retraining clinic after clinic skips the
    build. The weights are never trained here, so sharing is safe.
    """
    import keras

    from melcore import models

    memo_key = _memo_key(config)
    if reuse and strategy is None:
        with _MEMO_LOCK:
            found = _MEMO.get(memo_key)
            if found is not None:
                _MEMO.move_to_end(memo_key)
                return dataclasses.replace(found, reused=True)
    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        backbone, info = models.build_backbone(
            config.model,
            config.image_size,
            weights=config.weights,
            fallback_to_scratch=config.fallback_to_scratch,
            pooling=config.pooling,
        )
    backbone.trainable = False
    key = backbone_key(backbone, config.model, config.image_size, config.pooling)
    extractor = FeatureExtractor(
        backbone, info, key, config.model, int(config.image_size), time.perf_counter() - started
    )
    if reuse and strategy is None:
        with _MEMO_LOCK:
            _MEMO[memo_key] = extractor
            while len(_MEMO) > _BACKBONE_MEMO_SIZE:
                _MEMO.popitem(last=False)
    return extractor


def clear_extractors() -> None:
    """Forget the backbones kept in memory by :func:`get_extractor`."""
    with _MEMO_LOCK:
        _MEMO.clear()


# --------------------------------------------------------------------------- computing features


@dataclasses.dataclass
class FeatureResult:
    """What :func:`compute_features` returns.

    Attributes:
        features: float32 ``(n_views, n_images, n_features)``; rows of unreadable images are zeros.
        views: the view names, in order.
        hits, misses: images found in / added to the cache.
        bad: ``{position: reason}`` of unreadable images.
        seconds: wall time.
        cancelled: ``should_stop`` ended it early (features incomplete).
    """

    features: np.ndarray
    views: tuple[str, ...]
    hits: int = 0
    misses: int = 0
    bad: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    cancelled: bool = False


def compute_features(
    extractor: FeatureExtractor,
    paths: Sequence,
    *,
    views=None,
    cache: FeatureCache | None = None,
    image_cache=None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FeatureResult:
    """Pooled features of image files, from the cache or computed with the backbone and stored.

    Parameters
    ----------
    extractor : FeatureExtractor
        From :func:`get_extractor`.
    paths : sequence of str / Path
        Image files; missing or unreadable files are reported in ``result.bad``, not raised.
    views : sequence of view names, optional
        Default ``("identity",)``; see :data:`VIEWS`.
    cache : FeatureCache, optional
        Default ``FeatureCache()``; pass ``False`` to compute without caching.
    image_cache : melcore.images.ImageCache, optional
        Resized-image cache used when decoding misses (None: decode every time).
    batch_size : int
        Images per backbone call.
    progress : callable(done, total), optional
        Images done so far, at most about ten times a second and at the end.
    should_stop : callable() -> bool, optional
        Polled between batches; when true the result has ``cancelled=True``.
    """
    from melcore import images as images_module

    started = time.perf_counter()
    views = check_views(views)
    if cache is None:
        cache = FeatureCache()
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    n, n_features = len(paths), extractor.n_features
    out = np.zeros((len(views), n, n_features), dtype=np.float32)
    result = FeatureResult(out, views)
    if cache:
        cache.describe(extractor.key, extractor.meta())
    last = [0.0]

    def report(done: int, force: bool = False) -> None:
        now = time.monotonic()
        if progress is not None and (force or now - last[0] >= 0.1):
            last[0] = now
            progress(done, n)

    report(0, force=True)
    # ---- lookups
    stats: dict[int, os.stat_result] = {}
    missing: list[int] = []
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError as exc:
            result.bad[i] = f"cannot read the file ({exc.strerror or exc})"
            continue
        stats[i] = st
        if not cache:
            missing.append(i)
            continue
        found = [cache.read(cache.entry(extractor.key, path, st, v), n_features) for v in views]
        if all(f is not None for f in found):
            out[:, i] = np.stack(found)
            result.hits += 1
        else:
            missing.append(i)
    if cache:
        cache.hits += result.hits
    done = n - len(missing)
    report(done)
    # ---- compute the misses
    chunk = max(1, int(batch_size))
    for start in range(0, len(missing), chunk):
        if should_stop is not None and should_stop():
            result.cancelled = True
            break
        positions = missing[start : start + chunk]
        failed: dict[int, str] = {}

        def on_error(index: int, error: ImageError, positions=positions, failed=failed) -> None:
            failed[positions[index]] = error.reason

        batch = images_module.load_images(
            [paths[i] for i in positions], extractor.image_size, cache=image_cache, workers=workers, on_error=on_error
        )
        keep = [j for j, i in enumerate(positions) if i not in failed]
        result.bad.update(failed)
        if keep:
            batch = batch[keep]
            for v, view in enumerate(views):
                x = apply_view(batch, view).astype(np.float32)
                features = np.asarray(extractor.backbone.predict_on_batch(x), dtype=np.float32)
                for j, row in zip(keep, features):
                    out[v, positions[j]] = row
            for j in keep:
                i = positions[j]
                result.misses += 1
                if not cache:
                    continue
                try:
                    after = os.stat(paths[i])
                except OSError:
                    continue
                st = stats[i]
                if (after.st_mtime_ns, after.st_size) != (st.st_mtime_ns, st.st_size):
                    continue  # changed while we read it: do not file it under the old state
                for v, view in enumerate(views):
                    cache.write(cache.entry(extractor.key, paths[i], st, view), out[v, i])
        done += len(positions)
        report(done)
    if cache:
        cache.misses += result.misses
    report(done, force=True)
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- head helpers


def head_of(model):
    """The head of a model built by :mod:`melcore.models`: ``(batch, n_features) -> (batch, 1)``.

    Shares the layers after ``"features"`` (a linear stack, as :func:`melcore.models.build_head`
    makes); scoring cached features with it equals ``model.predict`` on the images.
    """
    import keras

    from melcore import models

    names = [layer.name for layer in model.layers]
    if models.FEATURES_LAYER not in names:
        raise ConfigError(
            f"model {model.name!r} has no {models.FEATURES_LAYER!r} layer; it was not built by melcore.models"
        )
    start = names.index(models.FEATURES_LAYER)
    n_features = int(model.get_layer(models.FEATURES_LAYER).output.shape[-1])
    inputs = keras.Input((n_features,), name=f"{models.HEAD_PREFIX}input")
    x = inputs
    for layer in model.layers[start + 1 :]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}-head")


def _predict_head(head, features: np.ndarray, batch: int = 4096) -> np.ndarray:
    """float64 (n,) probabilities of a head on (n, n_features) features (inference mode)."""
    if len(features) == 0:
        return np.empty(0, dtype=np.float64)
    parts = [
        np.asarray(head(features[s : s + batch], training=False), dtype=np.float64).reshape(-1)
        for s in range(0, len(features), batch)
    ]
    return np.concatenate(parts)


def score_features(head, features: np.ndarray) -> np.ndarray:
    """Probabilities (float64, (n_images,)) of ``(n_views, n_images, n_features)`` features, mean over views."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 2:
        features = features[None]
    return np.mean([_predict_head(head, f) for f in features], axis=0)
