"""Training-time image augmentation presets (albumentations 2.x).

One registry, :data:`PRESETS`; :func:`get_augment` turns a preset name into a
callable ``augment(image, *, seed=None) -> image`` on uint8 RGB arrays of shape
``(H, W, 3)`` that keeps shape and dtype.

Presets:
    ``none``         identity.
    ``basic``        flips, 90-degree and small rotations.
    ``isic-strong``  the augmentation of the SIIM-ISIC 2020 winning solution (Ha, Liu & Liu),
                     ported to albumentations 2.0.8 names and units.

Reproducibility. ``augment(image)`` draws from one random stream started from
``seed``: two augmenters with the same preset and seed give the same sequence of
outputs. ``augment(image, seed=key)`` (an int or a tuple of ints, e.g.
``(epoch, sample)``) is a pure function of ``(preset, seed, key, image)`` and is
safe to call from many threads at once; the input pipeline uses it so batches are
reproducible whatever the worker scheduling.

Note: albumentations 2's own ``Compose(seed=...)`` seeds every transform with the
same number, which makes same-probability transforms fire together (Transpose,
VerticalFlip and HorizontalFlip then give 2 of the 8 flips). Here all transforms
share one random stream instead.

No TensorFlow here: this module is imported by the pipeline's worker threads and
by notebooks without a GPU stack.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from typing import Callable, Sequence

import numpy as np

from melcore.checks import canonical_name
from melcore.errors import ConfigError, MelcoreError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import


@dataclasses.dataclass(frozen=True)
class Preset:
    """One augmentation preset.

    ``build(image_size, square)`` returns the albumentations transforms; with
    ``square=False`` (non-square input) it leaves out the transforms that swap height
    and width (Transpose, 90-degree rotations), so every preset keeps the input shape.
    """

    name: str
    description: str
    build: Callable[[int, bool], list]


def _none(image_size: int, square: bool = True) -> list:
    return []


def _basic(image_size: int, square: bool = True) -> list:
    import albumentations as A
    import cv2

    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        *([A.RandomRotate90(p=0.5)] if square else []),
        A.Affine(rotate=(-20, 20), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
    ]


def _isic_strong(image_size: int, square: bool = True) -> list:
    """The winning SIIM-ISIC 2020 training augmentation, in albumentations 2.0.8 terms.

    Changes from the original (albumentations 0.4): RandomBrightness + RandomContrast ->
    RandomBrightnessContrast; GaussNoise ``var_limit=(5, 30)`` (pixel variance) ->
    ``std_range`` as a fraction of 255; ShiftScaleRotate -> Affine (same shift, scale,
    rotation, black border); Cutout -> CoarseDropout with one hole 37.5% of the side.
    Blur kernels are 5 px as in the original (3 px below 64 px images).
    """
    import albumentations as A
    import cv2

    blur = 5 if image_size >= 64 else 3
    noise_std = (np.sqrt(5.0) / 255.0, np.sqrt(30.0) / 255.0)
    hole = (0.375, 0.375)
    return [
        *([A.Transpose(p=0.5)] if square else []),
        A.VerticalFlip(p=0.5),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.75),
        A.OneOf(
            [
                A.MotionBlur(blur_limit=(3, blur)),
                A.MedianBlur(blur_limit=(3, blur)),
                A.GaussianBlur(blur_limit=(3, blur)),
                A.GaussNoise(std_range=noise_std),
            ],
            p=0.7,
        ),
        A.OneOf(
            [
                A.OpticalDistortion(distort_limit=1.0),
                A.GridDistortion(num_steps=5, distort_limit=1.0),
                A.ElasticTransform(alpha=3),
            ],
            p=0.7,
        ),
        A.CLAHE(clip_limit=4.0, p=0.7),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
        A.Affine(
            translate_percent=(-0.1, 0.1),
            scale=(0.9, 1.1),
            rotate=(-15, 15),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=0.85,
        ),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=hole, hole_width_range=hole, fill=0, p=0.7),
    ]


#: preset name -> :class:`Preset`, mildest first.
PRESETS: dict[str, Preset] = {
    "none": Preset("none", "no augmentation", _none),
    "basic": Preset("basic", "flips, 90-degree rotations and small rotations", _basic),
    "isic-strong": Preset(
        "isic-strong",
        "SIIM-ISIC 2020 winning set: flips/transpose, brightness/contrast, blur or noise, optical/grid/"
        "elastic distortion, CLAHE, hue/saturation, shift-scale-rotate, one coarse dropout hole",
        _isic_strong,
    ),
}


def validate_preset(name: str) -> str:
    """The canonical preset name (case-insensitive, ``_`` = ``-``).

    Raises:
        ConfigError: unknown preset; the message lists the valid names.
    """
    key = canonical_name(name) if name is not None else "none"
    if key not in PRESETS:
        raise ConfigError(f"unknown augmentation preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return key


def _seed_sequence(seed: int, key: int | Sequence[int]) -> np.random.SeedSequence:
    parts = [key] if np.isscalar(key) else list(key)
    try:
        entropy = [int(seed)] + [int(part) for part in parts]
    except (TypeError, ValueError):
        raise MelcoreError(f"augmentation seed must be an int or a tuple of ints, got {key!r}") from None
    if any(part < 0 for part in entropy):
        raise MelcoreError(f"augmentation seeds must be non-negative, got {tuple(entropy)}")
    return np.random.SeedSequence(entropy)


class Augmenter:
    """A preset bound to an image size and a seed; call it on uint8 ``(H, W, 3)`` images.

    Attributes:
        name: preset name; image_size: the size the pipeline uses (pixel-sized parameters);
        seed: base seed.
    """

    def __init__(self, name: str, image_size: int, seed: int = 0):
        self.name = validate_preset(name)
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ConfigError(f"image_size must be a positive integer (pixels), got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"augmentation seed must be a non-negative integer, got {seed!r}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self._identity = self.name == "none"
        self._local = threading.local()
        self._stream_lock = threading.Lock()
        self._streams: dict[bool, object] = {}

    def _compose(self, square: bool):
        import albumentations as A

        return A.Compose(PRESETS[self.name].build(self.image_size, square), p=1.0)

    def _stream(self, square: bool):
        # One random stream per input kind (square / not), each started from ``seed``.
        stream = self._streams.get(square)
        if stream is None:
            stream = self._streams[square] = self._compose(square)
            stream.set_random_state(np.random.default_rng(self.seed), random.Random(self.seed))
        return stream

    def __call__(self, image: np.ndarray, *, seed: int | Sequence[int] | None = None) -> np.ndarray:
        """Augment one image.

        Args:
            image: uint8 RGB array ``(H, W, 3)``.
            seed: None = next draw of this augmenter's stream (not thread-safe ordering);
                an int or tuple of non-negative ints = a deterministic draw for that key.

        Returns:
            A new uint8 array of the same shape (the input is not modified).
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise MelcoreError(f"augment expects a uint8 RGB array of shape (H, W, 3), got {desc}")
        if self._identity:
            return image.copy()
        square = image.shape[0] == image.shape[1]
        if seed is None:
            with self._stream_lock:
                out = self._stream(square)(image=image)["image"]
        else:
            composes = getattr(self._local, "composes", None)
            if composes is None:
                composes = self._local.composes = {}
            compose = composes.get(square)
            if compose is None:
                compose = composes[square] = self._compose(square)
            sequence = _seed_sequence(self.seed, seed)
            py_seed = int(sequence.generate_state(1, dtype=np.uint64)[0])
            compose.set_random_state(np.random.default_rng(sequence), random.Random(py_seed))
            out = compose(image=image)["image"]
        out = np.ascontiguousarray(out, dtype=np.uint8)
        if out.shape != image.shape:  # every preset is shape-preserving; guard against a bad edit
            raise MelcoreError(
                f"augmentation preset {self.name!r} changed the image shape {image.shape} -> {out.shape}"
            )
        return out

    def __repr__(self) -> str:
        return f"Augmenter({self.name!r}, image_size={self.image_size}, seed={self.seed})"


def get_augment(name: str, image_size: int, seed: int = 0) -> Augmenter:
    """The augmentation callable of a preset (see :class:`Augmenter`).

    Raises:
        ConfigError: unknown preset (lists the valid ones), bad size or seed.
    """
    return Augmenter(name, image_size, seed)
