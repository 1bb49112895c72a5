"""Cached backbone features and the "fast-head" training mode.

A frozen backbone turns an image into a pooled feature vector; computing it is the
expensive part (EfficientNet-B3 at 256 px: ~20 images/s on a CPU, a full fine-tune
~3 images/s). Features are computed once per (backbone, image) and kept on disk, so
a clinic-specific model is retrained in seconds by fitting only the head::

    config = TrainConfig(model="efficientnet-b3", image_size=256, weights="imagenet",
                         mode="fast-head", clinic="clinic-north")
    run = fit(config, cohort)          # melcore.train.fit dispatches to fit_fast_head

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
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from melcore import settings
from melcore.errors import ConfigError, ImageError, MelcoreError

__all__ = [
    "VIEWS",
    "FeatureCache",
    "FeatureExtractor",
    "FeatureResult",
    "backbone_key",
    "apply_view",
    "get_extractor",
    "compute_features",
    "head_of",
    "fit_fast_head",
]

log = logging.getLogger("melcore.train.features")

FORMAT_VERSION = 1
#: The 8 dihedral views, in the order of :func:`melcore.predict.dihedral_views`.
VIEWS = ("identity", "rot90", "rot180", "rot270", "transpose", "transpose-rot90", "transpose-rot180",
         "transpose-rot270")
_BACKBONE_MEMO_SIZE = 2


# --------------------------------------------------------------------------- views

def _check_views(views) -> tuple[str, ...]:
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
    digest.update(f"melcore-features v{FORMAT_VERSION}\0{model_name}\0{int(image_size)}\0"
                  f"keras {keras.__version__}\0".encode())
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

        return {"model": self.model_name, "image_size": self.image_size, "n_features": self.n_features,
                "weights": self.weights_info.to_dict(), "keras": keras.__version__}


_MEMO: "collections.OrderedDict[tuple, FeatureExtractor]" = collections.OrderedDict()
_MEMO_LOCK = threading.Lock()


def _memo_key(config) -> tuple:
    import keras

    weights = str(config.weights)
    file_state = None
    if weights.lower() not in ("none", "imagenet", "noisy-student"):
        try:
            st = os.stat(weights)
            file_state = (st.st_mtime_ns, st.st_size)
        except OSError:
            file_state = None
    # Random weights depend on the seed; loaded weights do not (seed kept anyway: cheap and safe).
    return (config.model, int(config.image_size), weights, file_state, int(config.seed),
            bool(config.fallback_to_scratch), config.pooling, keras.__version__)


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
        backbone, info = models.build_backbone(config.model, config.image_size, weights=config.weights,
                                               fallback_to_scratch=config.fallback_to_scratch,
                                               pooling=config.pooling)
    backbone.trainable = False
    key = backbone_key(backbone, config.model, config.image_size, config.pooling)
    extractor = FeatureExtractor(backbone, info, key, config.model, int(config.image_size),
                                 time.perf_counter() - started)
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


def compute_features(extractor: FeatureExtractor, paths: Sequence, *, views=None, cache: FeatureCache | None = None,
                     image_cache=None, batch_size: int = 32, workers: int | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> FeatureResult:
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
    views = _check_views(views)
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
        positions = missing[start:start + chunk]
        failed: dict[int, str] = {}

        def on_error(index: int, error: ImageError, positions=positions, failed=failed) -> None:
            failed[positions[index]] = error.reason

        batch = images_module.load_images([paths[i] for i in positions], extractor.image_size, cache=image_cache,
                                          workers=workers, on_error=on_error)
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
        raise ConfigError(f"model {model.name!r} has no {models.FEATURES_LAYER!r} layer; it was not built by "
                          "melcore.models")
    start = names.index(models.FEATURES_LAYER)
    n_features = int(model.get_layer(models.FEATURES_LAYER).output.shape[-1])
    inputs = keras.Input((n_features,), name=f"{models.HEAD_PREFIX}input")
    x = inputs
    for layer in model.layers[start + 1:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}-head")


def _predict_head(head, features: np.ndarray, batch: int = 4096) -> np.ndarray:
    """float64 (n,) probabilities of a head on (n, n_features) features (inference mode)."""
    if len(features) == 0:
        return np.empty(0, dtype=np.float64)
    parts = [np.asarray(head(features[s:s + batch], training=False), dtype=np.float64).reshape(-1)
             for s in range(0, len(features), batch)]
    return np.concatenate(parts)


def score_features(head, features: np.ndarray) -> np.ndarray:
    """Probabilities (float64, (n_images,)) of ``(n_views, n_images, n_features)`` features, mean over views."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 2:
        features = features[None]
    return np.mean([_predict_head(head, f) for f in features], axis=0)


class _FeatureBatches:
    """Per-epoch training arrays in the order :class:`melcore.pipeline.ImageBatches` would use.

    Reusing ImageBatches' ordering keeps ``balance="oversample"`` (balanced batches,
    each class walked in reshuffled passes) identical between the two modes. With
    several views, each sample of each epoch takes one view drawn from (seed, epoch).
    """

    def __init__(self, features: np.ndarray, targets: np.ndarray, paths: list, config, balance: str):
        from melcore.pipeline import ImageBatches

        self.features = features  # (n_views, n, f)
        self.targets = targets.astype(np.float32)
        self.seed = config.seed
        self.order = ImageBatches(paths, self.targets, config.image_size, batch_size=config.batch_size,
                                  augment="none", balance=balance, seed=config.seed, workers=1)

    @property
    def epoch_length(self) -> int:
        return self.order.epoch_length

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        indices = self.order.epoch_indices(epoch)
        n_views = self.features.shape[0]
        if n_views == 1:
            return self.features[0, indices], self.targets[indices]
        views = np.random.default_rng([self.seed, 4, epoch]).integers(0, n_views, size=len(indices))
        return self.features[views, indices], self.targets[indices]


# --------------------------------------------------------------------------- fast-head fit

def fit_fast_head(config, cohort, progress=None, should_stop=None, run_dir=None, strategy=None, *,
                  views=None, feature_cache: FeatureCache | None = None):
    """Train only the head on cached backbone features; write an ordinary run.

    Same contract as :func:`melcore.train.fit` (it is what ``fit`` calls for
    ``mode="fast-head"``): same data preparation and split, same ``balance`` options,
    early stopping and the best epoch chosen on the selection split (training patients held
    out; the validation images choose nothing), same progress
    and ``should_stop`` contract (stage ``"load"`` while features are computed, with
    ``done``/``total``; stage ``"head"`` while training; ``end_of_epoch`` calls), same
    run directory files. The backbone stays frozen: ``fine_tune_epochs`` and the image
    ``augment`` preset do not apply (``views`` gives dihedral-view augmentation instead).

    Parameters
    ----------
    views : sequence of view names, optional
        Feature views used for training (default ``("identity",)``; e.g. ``VIEWS[:4]``
        for rotations). ``config.tta`` scores validation with all 8 views.
    feature_cache : FeatureCache, optional
        Default ``FeatureCache()`` under MELREVIEW_HOME.

    Returns
    -------
    melcore.train.Run
        metrics.json holds fit's keys plus ``mode`` ("fast-head"), ``feature_cache``
        ({hits, misses, key, views}), ``feature_seconds``, ``head_seconds`` and
        ``backbone_seconds`` (building/hashing the backbone; 0 when reused in-process).
    """
    from melcore import train as T

    config = T.validate(config)
    if config.mode != "fast-head":
        config = dataclasses.replace(config, mode="fast-head")
    views = _check_views(views)
    started = time.perf_counter()
    data = T._prepare_data(config, cohort)
    with T._op_determinism(config.deterministic) as deterministic:
        extractor = get_extractor(config, strategy)
        run_dir = Path(run_dir).expanduser() if run_dir is not None else T.default_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dir = run_dir.resolve()
        for stale in ("metrics.json", "model.keras", "val_predictions.csv", "train.log"):
            (run_dir / stale).unlink(missing_ok=True)
        T._write_json(run_dir / "config.json", config.to_dict())
        with T._run_log(run_dir):
            try:
                return _fast_head_in_run_dir(config, data, extractor, views, feature_cache, run_dir, progress,
                                             should_stop, strategy, started, bool(deterministic))
            except Exception:
                log.exception("fast-head training failed")
                raise


def _fast_head_in_run_dir(config, data, extractor: FeatureExtractor, views, feature_cache, run_dir: Path, progress,
                          should_stop, strategy, started: float, deterministic: bool):
    import keras
    import tensorflow as tf

    from melcore import images as images_module
    from melcore import models
    from melcore import train as T
    from melcore.metrics import threshold_metrics
    from melcore.pipeline import class_weights

    spec = models.get_spec(config.model)
    device, n_replicas = T._device_description(strategy)
    log.info("run %s: fast head on %s features at %d px, cohort %r (%s), device %s", run_dir.name, config.model,
             config.image_size, getattr(data.cohort, "name", "cohort"), config.clinic or "all clinics", device)
    log.info("config: %s", json.dumps(config.to_dict()))
    info = extractor.weights_info
    (log.warning if info.from_scratch and config.weights != "none" else log.info)("weights: %s", info.note)
    ex = data.excluded
    log.info("data: %d labelled images with files used; left out: %d from other clinics, %d unlabelled, "
             "%d labelled without an image file", len(data.cohort), ex["other_clinics"], ex["unlabelled"],
             ex["no_image"])
    if config.fine_tune_epochs:
        log.info("fast-head mode keeps the backbone frozen: the %d fine-tune epoch(s) are not run",
                 config.fine_tune_epochs)
    if config.augment != "none":
        log.info("fast-head mode trains on cached features: image augmentation %r does not apply (views: %s)",
                 config.augment, ", ".join(views))

    tracker = T._Tracker(progress, should_stop, total_epochs=config.epochs)
    cache = feature_cache if feature_cache is not None else FeatureCache()
    image_cache = images_module.ImageCache() if config.cache_images else None
    table = data.cohort.table
    paths = table["image_path"].astype(str).tolist()
    total = len(paths)

    # ---- features of every image (training views; all 8 for the validation TTA)
    tracker.stage = "load"
    tracker.report(0, None, {"done": 0, "total": total}, epoch=0, stage="load")

    def loading(done, _total):
        tracker.report(0, None, {"done": done, "total": total}, epoch=0, stage="load")

    val_views = VIEWS if config.tta else views
    all_views = tuple(dict.fromkeys(views + tuple(val_views)))
    computed = compute_features(extractor, paths, views=all_views, cache=cache, image_cache=image_cache,
                                batch_size=max(config.batch_size, 32), workers=config.workers, progress=loading,
                                should_stop=tracker.stop_requested)
    feature_seconds = computed.seconds
    log.info("features of %d images (%s view%s): %d from the cache, %d computed, in %.1f s (backbone key %s)",
             total, len(all_views), "" if len(all_views) == 1 else "s", computed.hits, computed.misses,
             feature_seconds, extractor.key[:12])
    features = computed.features
    if computed.bad:
        keep = np.ones(total, dtype=bool)
        keep[list(computed.bad)] = False
        data = T._drop_unreadable(data, computed.bad, config)
        features = features[:, keep]
    train_views = [all_views.index(v) for v in views]
    val_view_index = [all_views.index(v) for v in val_views]
    train_table, val_table, counts = T._split_tables(data)
    x_train = features[train_views][:, data.train_idx]
    x_val = features[:, data.val_idx]
    x_select = features[[all_views.index(views[0])]][:, data.select_idx]
    y_train = train_table["target"].astype("float32").to_numpy()
    y_val = val_table["target"].astype("float64").to_numpy()
    y_select = T._select_table(data)["target"].astype("float64").to_numpy()

    if config.head_fit == "logistic-cv":
        # No epochs to choose: the head is fitted on every training patient, the selection split included
        # (its C is chosen by the grouped inner CV), and the validation images are only scored.
        fit_idx = np.concatenate([data.train_idx, data.select_idx])
        x_fit = features[train_views][:, fit_idx]
        y_fit = data.cohort.table["target"].iloc[fit_idx].astype("float32").to_numpy()
        groups_fit = data.cohort.groups.iloc[fit_idx].astype(str).to_numpy()
        return _logistic_head_run(config, data, extractor, info, computed, cache, x_fit, y_fit, groups_fit,
                                  x_val, y_val, val_table, counts, train_views, val_view_index, all_views, views,
                                  run_dir, tracker, device, n_replicas, deterministic, started)

    # ---- the head
    head_started = time.perf_counter()
    balance = "none" if config.balance == "class-weight" else config.balance
    batches = _FeatureBatches(x_train, y_train, train_table["image_path"].astype(str).tolist(), config, balance)
    class_weight = class_weights(y_train) if config.balance == "class-weight" else None
    steps = math.ceil(batches.epoch_length / config.batch_size)
    tracker.steps = steps
    keras.utils.set_random_seed(config.seed)  # the head's initial weights do not depend on backbone reuse
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        head = models.build_head(extractor.n_features, model_name=spec.name)
        optimizer = models.make_optimizer(spec, config.learning_rate, steps, config.epochs,
                                          optimizer=config.optimizer, schedule=config.schedule)
        head.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy())
    n_params = int(sum(np.prod(w.shape) for w in head.trainable_weights))
    log.info("stage head: %d epoch(s) x %d batches of %d, %s lr %.3g (%s), %s trainable params on %d features",
             config.epochs, steps, config.batch_size, config.optimizer, config.learning_rate, config.schedule,
             f"{n_params:,}", extractor.n_features)

    def score_validation(tta: bool = False) -> np.ndarray:
        return score_features(head, x_val[val_view_index] if tta else x_val[[all_views.index(views[0])]])

    def score_selection() -> dict:
        p = score_features(head, x_select)
        return {"select_auroc": T._auroc(y_select, p), "select_loss": T._bce(y_select, p)}

    monitor = T._tracker_callback(tracker, {"batch_size": config.batch_size}, score_selection)
    tracker.stage = "head"
    tracker.patience = config.early_stopping_patience
    for epoch in range(config.epochs):
        if tracker.stop_requested():
            break
        x, y = batches.epoch(epoch)
        head.fit(x, y, batch_size=config.batch_size, epochs=epoch + 1, initial_epoch=epoch, shuffle=False,
                 class_weight=class_weight, callbacks=[monitor], verbose=0)
        if tracker.cancelled or tracker.early_stopped:
            break
    head_seconds = time.perf_counter() - head_started
    stage_records = [{"stage": "head", "planned_epochs": config.epochs, "epochs_run": len(tracker.history),
                      "learning_rate": config.learning_rate, "unfrozen_groups": [], "trainable_params": n_params}]

    if tracker.best_weights is not None:
        head.set_weights(tracker.best_weights)
    metrics: dict[str, Any] = {
        "kind": "image", "mode": "fast-head", "scorer": "cnn", "status": "cancelled" if tracker.cancelled else "done",
        "cancelled": tracker.cancelled, "model": config.model, "clinic": config.clinic,
        "image_size": config.image_size, "cohort": getattr(data.cohort, "name", None),
        "best_epoch": tracker.best_epoch,
        "best_epoch_select_auroc": tracker.best_auroc if tracker.best_epoch else None,
        "chosen_on": T._chosen_on(counts),
        **counts,
        "excluded": data.excluded, "split": data.split,
        "history": tracker.history, "stages": stage_records, "epochs_run": len(tracker.history),
        "planned_epochs": config.epochs, "early_stopped": tracker.early_stopped,
        "weights": info.to_dict(), "from_scratch": bool(info.from_scratch),
        "device": device, "n_replicas": n_replicas, "deterministic_ops": deterministic, "tta": config.tta,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "feature_cache": {"hits": computed.hits, "misses": computed.misses, "key": extractor.key,
                          "views": list(all_views), "root": str(cache.root)},
        "feature_seconds": feature_seconds, "head_seconds": head_seconds,
        "backbone_seconds": 0.0 if extractor.reused else extractor.build_seconds,
        "backbone_reused": extractor.reused,
    }
    save_started = time.perf_counter()
    if tracker.best_weights is not None:
        model = models.join(extractor.backbone, head, name=spec.name)
        T._save_model(model, run_dir / "model.keras")
    predictions = None
    if tracker.best_weights is not None and not tracker.cancelled:
        predictions = score_validation(tta=config.tta)
    if predictions is not None:
        pd.DataFrame({
            "image_name": val_table["image_name"].astype(str),
            "patient_id": val_table["patient_id"],
            "clinic": val_table["clinic"],
            "target": val_table["target"].astype("int64"),
            "prediction": predictions,
        }).to_csv(run_dir / "val_predictions.csv", index=False)
        at = threshold_metrics(y_val.astype(int), np.clip(predictions, 0.0, 1.0), T.THRESHOLD)
        metrics.update({
            "val_auroc": T._auroc(y_val, predictions), "val_loss": T._bce(y_val, predictions),
            "threshold": T.THRESHOLD, "sensitivity": at["sensitivity"], "specificity": at["specificity"],
            "at_threshold": at,
        })
    else:
        metrics.update({"val_auroc": None, "val_loss": None, "threshold": T.THRESHOLD,
                        "sensitivity": None, "specificity": None})
        if not tracker.cancelled and tracker.best_weights is None:
            raise MelcoreError("training ended without a single validated epoch")
    seconds = time.perf_counter() - started
    metrics.update({
        "seconds": seconds, "train_seconds": tracker.train_seconds, "fit_seconds": head_seconds,
        "save_seconds": time.perf_counter() - save_started,
        "images_per_second": (tracker.train_images / tracker.train_seconds) if tracker.train_seconds > 0 else None,
    })
    T._write_json(run_dir / "metrics.json", metrics)
    if tracker.cancelled:
        log.warning("run cancelled after %d epoch(s); %s", len(tracker.history),
                    "model.keras holds the best epoch so far" if tracker.best_weights is not None
                    else "no epoch finished, no model saved")
    else:
        log.info("done in %.1f s (features %.1f s, head %.1f s): validation AUROC %.4f (best epoch %s)", seconds,
                 feature_seconds, head_seconds, metrics["val_auroc"], tracker.best_epoch)
    return T.Run(run_dir, config, metrics, tracker.cancelled)


# --------------------------------------------------------------------------- logistic head (C by inner CV)

#: Inverse L2 strengths tried by :func:`fit_logistic_head` (standardised features).
LOGISTIC_CS = (0.001, 0.003, 0.01, 0.03, 0.1)


def fit_logistic_head(features: np.ndarray, targets: np.ndarray, groups: np.ndarray, *, seed: int = 0,
                      balanced: bool = True, cs: Sequence[float] = LOGISTIC_CS, n_folds: int = 5,
                      column_sets: dict[str, np.ndarray] | None = None) -> dict:
    """An L2 logistic regression on standardised features, C (and the features) chosen by a grouped inner CV.

    Parameters
    ----------
    features : float array (n_views, n, n_features) or (n, n_features)
        Training features; with several views every view is a training sample (augmentation),
        and inner folds keep all views of an image (and every image of a group) together.
    targets : (n,) 0/1
    groups : (n,) str
        Patient (else lesion, else image) of each image: inner folds never split a group.
    balanced : bool
        Weight the classes equally (what ``balance="oversample"`` does for gradient heads), so
        probabilities are centred on 0.5 rather than on the prevalence.
    cs : the C values tried; n_folds : inner folds (fewer when a class has fewer groups).
    column_sets : {name: column indices}, optional
        Candidate feature subsets (e.g. the last map's average pool vs every pooled level), chosen
        together with C by the same inner CV; columns outside the chosen set get weight 0.
        Default: one set, every column.

    Returns
    -------
    dict
        ``kernel`` (n_features, 1) float32 and ``bias`` (1,) float32 of a sigmoid Dense layer on
        the raw (unstandardised) features; ``C``; ``columns`` (the chosen set's name);
        ``inner_auroc`` {C: AUROC of the inner out-of-fold scores} for the chosen set and
        ``inner_auroc_by_set`` {set: {C: AUROC}}; ``inner_folds``; ``chosen_on`` (a sentence).
    """
    from sklearn.linear_model import LogisticRegression

    from melcore.metrics import auroc
    from melcore.splits import group_kfold

    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    y = np.asarray(targets).astype(int)
    groups = np.asarray(groups).astype(str)
    n_views, n_features = x.shape[0], x.shape[-1]
    sets = {"all": np.arange(n_features)} if not column_sets else {k: np.asarray(v) for k, v in column_sets.items()}
    weight = "balanced" if balanced else None
    per_class = min(len(set(groups[y == 1])), len(set(groups[y == 0])))
    folds_k = min(int(n_folds), per_class)

    def fit(rows: np.ndarray, c: float, columns: np.ndarray):
        stacked = x[:, rows][:, :, columns].reshape(-1, len(columns))
        mean, scale = stacked.mean(0), stacked.std(0)
        scale[scale < 1e-12] = 1.0
        model = LogisticRegression(C=c, class_weight=weight, max_iter=5000)
        model.fit((stacked - mean) / scale, np.tile(y[rows], n_views))
        return model, mean, scale

    scores: dict[str, dict[float, float]] = {}
    if folds_k >= 2:
        folds = group_kfold(groups, y, folds_k, seed=seed)
        for name, columns in sets.items():
            scores[name] = {}
            for c in cs:
                oof = np.empty(len(y))
                for k in range(folds_k):
                    model, mean, scale = fit(np.flatnonzero(folds != k), c, columns)
                    held = np.flatnonzero(folds == k)
                    oof[held] = np.mean([model.predict_proba((x[v, held][:, columns] - mean) / scale)[:, 1]
                                         for v in range(n_views)], axis=0)
                scores[name][float(c)] = float(auroc(y, oof))
        # Best inner AUROC; ties go to the smaller feature set, then the stronger penalty.
        order = list(sets)
        chosen_set, chosen = max(((name, c) for name in order for c in scores[name]),
                                 key=lambda t: (scores[t[0]][t[1]], -len(sets[t[0]]), -t[1]))
        what = "C" + (" and the feature set" if len(sets) > 1 else "")
        chosen_on = (f"{what} chosen by a {folds_k}-fold cross-validation grouped by patient (else lesion) inside "
                     "the training split; the validation images were not used")
    else:
        chosen_set, chosen = list(sets)[-1], 0.01
        chosen_on = ("C fixed at 0.01 and every feature used: too few groups of one class in the training split for "
                     "an inner cross-validation")
    columns = sets[chosen_set]
    model, mean, scale = fit(np.arange(len(y)), chosen, columns)
    coef = np.zeros(n_features)
    coef[columns] = model.coef_.reshape(-1) / scale
    bias = float(model.intercept_[0] - np.sum(model.coef_.reshape(-1) * mean / scale))
    return {"kernel": coef.astype(np.float32)[:, None], "bias": np.array([bias], dtype=np.float32), "C": chosen,
            "columns": chosen_set, "inner_auroc": scores.get(chosen_set, {}), "inner_auroc_by_set": scores,
            "inner_folds": folds_k if folds_k >= 2 else 0, "chosen_on": chosen_on}


def pooling_column_sets(backbone) -> dict[str, np.ndarray] | None:
    """Candidate feature sets of a multi-level backbone for :func:`fit_logistic_head`:
    ``{"last map (avg)": the last map's average-pool columns, "multi-level": every column}``;
    None for an average-pooled backbone (one set)."""
    layer = next((lay for lay in backbone.layers if lay.name == "features"), None)
    inputs = layer.input if layer is not None else None
    if not isinstance(inputs, (list, tuple)):
        return None
    offsets, start = {}, 0
    for tensor in inputs:  # the Concatenate's own inputs, in their order
        width = int(tensor.shape[-1])
        offsets[tensor._keras_history.operation.name] = np.arange(start, start + width)
        start += width
    top_avg = [name for name in offsets if name.endswith("_avg")][-1]
    return {"last map (avg)": offsets[top_avg], "multi-level": np.arange(start)}


def _logistic_head_run(config, data, extractor, info, computed, cache, x_train, y_train, groups_train, x_val, y_val,
                       val_table, counts, train_views, val_view_index, all_views, views, run_dir: Path, tracker,
                       device, n_replicas, deterministic, started):
    """The ``head_fit="logistic-cv"`` tail of :func:`_fast_head_in_run_dir` (same run files and keys)."""
    import keras
    import tensorflow as tf

    from melcore import models
    from melcore import train as T
    from melcore.metrics import threshold_metrics

    spec = models.get_spec(config.model)
    tracker.stage = "head"
    tracker.report(0, None, {"done": 0, "total": 1}, epoch=0, stage="head")
    head_started = time.perf_counter()
    fitted = fit_logistic_head(x_train, y_train, groups_train, seed=config.seed,
                               balanced=config.balance != "none",
                               column_sets=pooling_column_sets(extractor.backbone))
    head = models.build_head(extractor.n_features, dropout=0.0)
    head.get_layer(models.OUTPUT_LAYER).set_weights([fitted["kernel"], fitted["bias"]])
    head_seconds = time.perf_counter() - head_started
    log.info("head: L2 logistic regression on %d standardised features (%s), C=%g (%s; inner AUROC by C: %s) "
             "in %.1f s", extractor.n_features, fitted["columns"], fitted["C"], fitted["chosen_on"],
             ", ".join(f"{c:g}: {a:.3f}" for c, a in fitted["inner_auroc"].items()) or "none", head_seconds)
    tracker.report(1, None, {"done": 1, "total": 1}, epoch=1, stage="head")
    if tracker.stop_requested():
        tracker.cancelled = True
    model = models.join(extractor.backbone, head, name=spec.name)
    save_started = time.perf_counter()
    T._save_model(model, run_dir / "model.keras")
    p = score_features(head, x_val[val_view_index] if config.tta else x_val[[all_views.index(views[0])]])
    pd.DataFrame({
        "image_name": val_table["image_name"].astype(str), "patient_id": val_table["patient_id"],
        "clinic": val_table["clinic"], "target": val_table["target"].astype("int64"), "prediction": p,
    }).to_csv(run_dir / "val_predictions.csv", index=False)
    at = threshold_metrics(y_val.astype(int), np.clip(p, 0.0, 1.0), T.THRESHOLD)
    n_params = int(extractor.n_features + 1)
    metrics: dict[str, Any] = {
        "kind": "image", "mode": "fast-head", "head_fit": "logistic-cv", "scorer": "cnn",
        "status": "cancelled" if tracker.cancelled else "done", "cancelled": tracker.cancelled,
        "model": config.model, "clinic": config.clinic, "image_size": config.image_size,
        "pooling": config.pooling, "cohort": getattr(data.cohort, "name", None),
        "best_epoch": None, "best_epoch_val_auroc": None, **counts,
        "excluded": data.excluded, "split": data.split, "history": [],
        "stages": [{"stage": "head", "planned_epochs": 0, "epochs_run": 0, "learning_rate": None,
                    "unfrozen_groups": [], "trainable_params": n_params}],
        "epochs_run": 0, "planned_epochs": 0, "early_stopped": False,
        "logistic_head": {"C": fitted["C"], "features": fitted["columns"],
                          "inner_auroc": {f"{c:g}": a for c, a in fitted["inner_auroc"].items()},
                          "inner_auroc_by_set": {name: {f"{c:g}": a for c, a in by_c.items()}
                                                 for name, by_c in fitted["inner_auroc_by_set"].items()},
                          "inner_folds": fitted["inner_folds"], "balanced": config.balance != "none"},
        "chosen_on": {"C": fitted["chosen_on"], "epochs": "none: the head is fitted in closed form, no epochs",
                      "fitted_on": f"{len(y_train)} images: the training and the selection patients together "
                                   "(no epoch to choose, so the selection split chooses nothing)"},
        "weights": info.to_dict(), "from_scratch": bool(info.from_scratch),
        "device": device, "n_replicas": n_replicas, "deterministic_ops": deterministic, "tta": config.tta,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "feature_cache": {"hits": computed.hits, "misses": computed.misses, "key": extractor.key,
                          "views": list(all_views), "root": str(cache.root)},
        "feature_seconds": computed.seconds, "head_seconds": head_seconds,
        "backbone_seconds": 0.0 if extractor.reused else extractor.build_seconds,
        "backbone_reused": extractor.reused,
        "val_auroc": T._auroc(y_val, p), "val_loss": T._bce(y_val, p), "threshold": T.THRESHOLD,
        "sensitivity": at["sensitivity"], "specificity": at["specificity"], "at_threshold": at,
        "seconds": time.perf_counter() - started, "train_seconds": head_seconds, "fit_seconds": head_seconds,
        "save_seconds": time.perf_counter() - save_started, "images_per_second": None,
    }
    T._write_json(run_dir / "metrics.json", metrics)
    log.info("done in %.1f s (features %.1f s, head %.1f s): validation AUROC %.4f", metrics["seconds"],
             computed.seconds, head_seconds, metrics["val_auroc"])
    return T.Run(run_dir, config, metrics, tracker.cancelled)
