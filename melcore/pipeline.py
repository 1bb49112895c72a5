"""Training input pipeline: image files -> augmented float32 batches for Keras.

:class:`ImageBatches` is a ``keras.utils.PyDataset`` that reads images through
:func:`melcore.images.load_image` (with its on-disk resize cache), applies an
augmentation preset (:mod:`melcore.augment`) per image and yields
``(images, targets)``:

* images: float32 ``(batch, size, size, 3)``, raw RGB in 0..255 (the models do
  their own preprocessing);
* targets: float32 ``(batch,)`` of 0.0 / 1.0 (1 = melanoma).

Order and augmentation are pure functions of ``(seed, epoch, position)``, so a
run is reproducible whatever the number of worker threads. The epoch advances in
``on_epoch_end`` when it closes an epoch begun with ``on_epoch_begin`` (Keras calls
it after the workers of an epoch have stopped; it also calls it once at the start
of ``fit``, which is ignored), so ``fit(epochs=3)`` trains on epochs 0, 1, 2 and a
second ``fit`` continues with epoch 3. ``set_epoch(e)`` jumps to an epoch (resume).
Pass ``shuffle=False`` to ``model.fit``: the dataset shuffles itself per epoch,
and Keras' own shuffling of batch order is not seeded.

Class imbalance (ISIC 2020: 1.8% melanoma):
    ``balance="oversample"``: every batch holds as many positives as negatives
    (random oversampling of the minority class, each class walked through in
    reshuffled passes so no sample repeats before all were seen); the epoch length
    defaults to twice the majority class and can be set with ``epoch_length``.
    ``balance="none"``: natural frequencies; combine with :func:`class_weights`
    passed as ``model.fit(class_weight=...)`` for ``balance="class-weight"``.

Threads (``use_multiprocessing=False``) are enough: JPEG decoding (Pillow) and
OpenCV-based augmentation release the GIL. This module imports Keras; it is
only used where models are trained or scored.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import keras
import numpy as np

from melcore import images
from melcore.augment import get_augment
from melcore.errors import ConfigError

BALANCE_MODES = ("none", "oversample", "class-weight")


def _as_paths(paths) -> list[str]:
    out = []
    for i, path in enumerate(list(paths)):
        if path is None or (isinstance(path, float) and math.isnan(path)) or str(path).strip() == "":
            raise ConfigError(
                f"image path at position {i} is missing; drop rows without images "
                "(Cohort.with_images()) before building batches"
            )
        out.append(os.fspath(path))
    return out


def _as_targets(targets, n: int) -> np.ndarray:
    try:
        values = np.asarray(targets, dtype="float64").reshape(-1)
    except (TypeError, ValueError):
        raise ConfigError(
            "targets must be numbers 0 or 1 (unlabelled rows cannot be used for training; use Cohort.labelled())"
        ) from None
    if values.shape[0] != n:
        raise ConfigError(f"got {n} image paths but {values.shape[0]} targets; they must align")
    bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
    if bad.size:
        raise ConfigError(
            f"targets must be 0 or 1; position {bad[0]} holds {values[bad[0]]!r} "
            f"({bad.size} bad values; unlabelled rows: use Cohort.labelled())"
        )
    return values.astype("float32")


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _stream(indices: np.ndarray, start: int, count: int, seed: int, tag: int, shuffle: bool) -> np.ndarray:
    """Items ``[start, start + count)`` of the endless walk through ``indices`` in passes.

    Pass ``k`` is a permutation drawn from ``(seed, tag, k)`` (or the natural order when
    ``shuffle`` is False), so no index repeats before every index was used.
    """
    n = len(indices)
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    first, last = start // n, (start + count - 1) // n
    passes = []
    for k in range(first, last + 1):
        if shuffle:
            passes.append(indices[np.random.default_rng([seed, tag, k]).permutation(n)])
        else:
            passes.append(indices)
    walk = np.concatenate(passes)
    offset = start - first * n
    return walk[offset : offset + count].astype(np.int64)


class ImageBatches(keras.utils.PyDataset):
    """Augmented, optionally class-balanced training batches from image files.

    Args:
        paths: image file paths, length n.
        targets: 0/1 labels aligned with ``paths``.
        image_size: square side in pixels the images are loaded at.
        batch_size: images per batch.
        augment: preset name (``"none"``, ``"basic"``, ``"isic-strong"``).
        balance: ``"none"``, ``"oversample"`` or ``"class-weight"`` (same batches as "none";
            pass :func:`class_weights` to ``fit``).
        shuffle: reshuffle every epoch (ignored by "oversample", which always shuffles).
        seed: base seed of order and augmentation.
        epoch_length: samples per epoch; default n, or twice the majority class with
            "oversample". Consecutive epochs continue the walk through the data.
        cache: an :class:`melcore.images.ImageCache`, True (default cache) or None.
        drop_remainder: drop the last partial batch.
        workers, use_multiprocessing, max_queue_size: as ``keras.utils.PyDataset``.
        start_epoch: epoch of the first batches (to resume a run).

    ``self[i]`` is ``(images float32 (b, s, s, 3) 0..255, targets float32 (b,))``.
    """

    def __init__(
        self,
        paths: Sequence,
        targets: Sequence,
        image_size: int,
        *,
        batch_size: int = 32,
        augment: str = "none",
        balance: str = "none",
        shuffle: bool = True,
        seed: int = 0,
        epoch_length: int | None = None,
        cache: images.ImageCache | bool | None = None,
        drop_remainder: bool = False,
        workers: int = 2,
        use_multiprocessing: bool = False,
        max_queue_size: int = 8,
        start_epoch: int = 0,
    ):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        self.paths = _as_paths(paths)
        if not self.paths:
            raise ConfigError("no images to train on (empty path list)")
        self.targets = _as_targets(targets, len(self.paths))
        self.image_size = _check_positive_int("image_size", image_size)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seed = _check_positive_int("seed", seed, minimum=0)
        if balance not in BALANCE_MODES:
            raise ConfigError(f"unknown balance mode {balance!r}; valid modes: {', '.join(BALANCE_MODES)}")
        self.balance = balance
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.cache = cache
        self.augment = get_augment(augment, self.image_size, seed=self.seed)
        self._positives = np.flatnonzero(self.targets == 1.0)
        self._negatives = np.flatnonzero(self.targets == 0.0)
        if balance == "oversample" and (self._positives.size == 0 or self._negatives.size == 0):
            missing = "melanoma (target 1)" if self._positives.size == 0 else "benign (target 0)"
            raise ConfigError(f"balance='oversample' needs both classes, but there is no {missing} image")
        if epoch_length is None:
            if balance == "oversample":
                epoch_length = 2 * max(self._positives.size, self._negatives.size)
            else:
                epoch_length = len(self.paths)
        self.epoch_length = _check_positive_int("epoch_length", epoch_length)
        if self.drop_remainder and self.epoch_length < self.batch_size:
            raise ConfigError(
                f"epoch_length {self.epoch_length} is smaller than one batch ({self.batch_size}) "
                "with drop_remainder=True"
            )
        self.epoch = -1
        self._epoch_started = False
        self.set_epoch(_check_positive_int("start_epoch", start_epoch, minimum=0))

    @classmethod
    def from_table(cls, table, image_size: int, **kwargs) -> "ImageBatches":
        """Batches from a cohort table (columns ``image_path`` and ``target``; see melcore.cohort).

        Raises:
            ConfigError: rows without an image file or without a 0/1 label, naming them.
        """
        for column in ("image_path", "target"):
            if column not in table.columns:
                raise ConfigError(f"cohort table has no {column!r} column")
        no_image = table["image_path"].isna()
        if no_image.any():
            names = table.loc[no_image, "image_name"].astype(str).tolist() if "image_name" in table else []
            raise ConfigError(
                f"{int(no_image.sum())} rows have no image file (e.g. {', '.join(names[:3])}); use Cohort.with_images()"
            )
        unlabelled = table["target"].isna()
        if unlabelled.any():
            names = table.loc[unlabelled, "image_name"].astype(str).tolist() if "image_name" in table else []
            raise ConfigError(
                f"{int(unlabelled.sum())} rows have no target (e.g. {', '.join(names[:3])}); use Cohort.labelled()"
            )
        return cls(table["image_path"].tolist(), table["target"].astype("float32").to_numpy(), image_size, **kwargs)

    # ------------------------------------------------------------------ order

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """Sample indices (into ``paths``) of an epoch, in batch order; int64, length ``epoch_length``."""
        epoch = self.epoch if epoch is None else int(epoch)
        length = self.epoch_length
        if self.balance == "oversample":
            return self._balanced_order(epoch, length)
        everything = np.arange(len(self.paths))
        return _stream(everything, epoch * length, length, self.seed, 0, self.shuffle)

    def _balanced_order(self, epoch: int, length: int) -> np.ndarray:
        # Per batch: half positives, half negatives (an odd batch's extra slot alternates
        # between the classes), shuffled inside the batch.
        sizes = [min(self.batch_size, length - start) for start in range(0, length, self.batch_size)]
        n_pos_per_batch = [(size + b % 2) // 2 for b, size in enumerate(sizes)]
        n_pos = sum(n_pos_per_batch)
        n_neg = length - n_pos
        # Each class keeps its own walk across epochs: epoch e continues where e-1 stopped.
        positives = _stream(self._positives, epoch * n_pos, n_pos, self.seed, 1, True)
        negatives = _stream(self._negatives, epoch * n_neg, n_neg, self.seed, 2, True)
        rng = np.random.default_rng([self.seed, 3, epoch])
        order, p, q = [], 0, 0
        for size, k in zip(sizes, n_pos_per_batch):
            batch = np.concatenate([positives[p : p + k], negatives[q : q + size - k]])
            p, q = p + k, q + size - k
            order.append(batch[rng.permutation(size)])
        return np.concatenate(order)

    def set_epoch(self, epoch: int) -> None:
        """Make the next batches those of ``epoch`` (0-based)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._order = self.epoch_indices(self.epoch)

    def on_epoch_begin(self) -> None:
        # Only a flag: Keras starts the worker threads *before* calling this, so changing the
        # order here would race with their first batches.
        self._epoch_started = True

    def on_epoch_end(self) -> None:
        # Keras also calls on_epoch_end once when fit/evaluate start (EpochIterator.reset), with
        # no epoch begun; only an end that closes a begun epoch moves to the next epoch.
        if self._epoch_started:
            self._epoch_started = False
            self.set_epoch(self.epoch + 1)

    # ------------------------------------------------------------------ batches

    def __len__(self) -> int:
        if self.drop_remainder:
            return self.epoch_length // self.batch_size
        return math.ceil(self.epoch_length / self.batch_size)

    def batch_indices(self, index: int) -> np.ndarray:
        """Sample indices of batch ``index`` of the current epoch."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (epoch has {len(self)} batches)")
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]

    def __getitem__(self, index: int):
        indices = self.batch_indices(index)
        epoch = self.epoch
        batch = np.empty((len(indices), self.image_size, self.image_size, 3), dtype="float32")
        for j, sample in enumerate(indices):
            image = images.load_image(self.paths[sample], self.image_size, cache=self.cache)
            position = index * self.batch_size + j
            batch[j] = self.augment(image, seed=(epoch, position))
        return batch, self.targets[indices]

    def __repr__(self) -> str:
        return (
            f"ImageBatches(n={len(self.paths)}, positives={self._positives.size}, size={self.image_size}, "
            f"batch_size={self.batch_size}, augment={self.augment.name!r}, balance={self.balance!r}, "
            f"epoch_length={self.epoch_length}, epoch={self.epoch})"
        )


class PredictionBatches(keras.utils.PyDataset):
    """Ordered, unshuffled image batches for ``model.predict`` (every image exactly once).

    ``self[i]`` is float32 ``(b, size, size, 3)`` in 0..255 for images
    ``[i * batch_size, (i + 1) * batch_size)``; the last batch may be smaller.
    With ``augment`` set (test-time augmentation) image ``k`` gets the draw
    ``(seed, k)`` of that preset, so TTA round ``r`` can use ``seed=r``.
    """

    def __init__(
        self,
        paths: Sequence,
        image_size: int,
        *,
        batch_size: int = 64,
        augment: str = "none",
        seed: int = 0,
        cache: images.ImageCache | bool | None = None,
        workers: int = 2,
        use_multiprocessing: bool = False,
        max_queue_size: int = 8,
    ):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        self.paths = _as_paths(paths)
        self.image_size = _check_positive_int("image_size", image_size)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seed = _check_positive_int("seed", seed, minimum=0)
        self.cache = cache
        self.augment = get_augment(augment, self.image_size, seed=self.seed)

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        start = index * self.batch_size
        chunk = self.paths[start : start + self.batch_size]
        batch = np.empty((len(chunk), self.image_size, self.image_size, 3), dtype="float32")
        for j, path in enumerate(chunk):
            image = images.load_image(path, self.image_size, cache=self.cache)
            batch[j] = image if self.augment.name == "none" else self.augment(image, seed=start + j)
        return batch


def class_weights(targets: Sequence) -> dict[int, float]:
    """Keras ``class_weight`` that gives both classes equal total weight: ``n / (2 * n_class)``.

    Raises:
        ConfigError: targets not 0/1, or one class absent.
    """
    values = _as_targets(targets, len(np.asarray(targets).reshape(-1)))
    n = values.size
    n_pos = int(values.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        missing = "melanoma (target 1)" if n_pos == 0 else "benign (target 0)"
        raise ConfigError(f"class weights need both classes, but there is no {missing} label")
    return {0: n / (2.0 * n_neg), 1: n / (2.0 * n_pos)}
