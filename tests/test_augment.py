"""Augmentation presets: shape/dtype kept, seeded reproducibility, errors."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from melcore import augment
from melcore.augment import PRESETS, Preset, get_augment
from melcore.errors import ConfigError, MelcoreError


def _image(shape=(48, 48, 3), seed=0) -> np.ndarray:
    # A smooth, asymmetric picture (gradients + a blob) so geometric transforms change it.
    h, w, _ = shape
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    blob = np.exp(-((yy - h * 0.3) ** 2 + (xx - w * 0.6) ** 2) / (0.02 * h * w))
    image = np.stack([xx / w * 200, yy / h * 150, 120 * blob], axis=-1) + rng.normal(0, 8, shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("shape", [(48, 48, 3), (40, 56, 3)])
def test_presets_keep_shape_and_dtype(name, shape):
    image = _image(shape)
    before = image.copy()
    aug = get_augment(name, 48, seed=1)
    for key in range(5):
        out = aug(image, seed=key)
        assert out.shape == shape and out.dtype == np.uint8 and out.flags.c_contiguous
    out = aug(image)
    assert out.shape == shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)  # the input is never modified in place


def test_none_is_the_identity():
    image = _image()
    out = get_augment("none", 48)(image)
    np.testing.assert_array_equal(out, image)
    assert out is not image


@pytest.mark.parametrize("name", ["basic", "isic-strong"])
def test_same_seed_same_sequence_and_different_seeds_differ(name):
    image = _image()
    first = get_augment(name, 48, seed=3)(image)
    a, b, c = get_augment(name, 48, seed=3), get_augment(name, 48, seed=3), get_augment(name, 48, seed=4)
    seq_a = [a(image) for _ in range(8)]
    seq_b = [b(image) for _ in range(8)]
    seq_c = [c(image) for _ in range(8)]
    for x, y in zip(seq_a, seq_b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(seq_a, seq_c))
    np.testing.assert_array_equal(first, seq_a[0])
    # A stream really moves on: not the same output every call.
    assert len({x.tobytes() for x in seq_a}) > 1


def test_isic_strong_changes_almost_every_image():
    image = _image()
    aug = get_augment("isic-strong", 48, seed=0)
    changed = sum(not np.array_equal(aug(image, seed=k), image) for k in range(20))
    assert changed >= 18


def test_keyed_draws_are_pure_functions_and_thread_safe():
    image = _image()
    aug = get_augment("isic-strong", 48, seed=7)
    keys = [(epoch, position) for epoch in range(2) for position in range(12)]
    sequential = [aug(image, seed=key) for key in keys]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda key: aug(image, seed=key), reversed(keys)))[::-1]
    for x, y in zip(sequential, parallel):
        np.testing.assert_array_equal(x, y)
    other = get_augment("isic-strong", 48, seed=7)
    np.testing.assert_array_equal(other(image, seed=(1, 5)), aug(image, seed=(1, 5)))
    assert not np.array_equal(aug(image, seed=(1, 5)), aug(image, seed=(1, 6)))
    assert not np.array_equal(get_augment("isic-strong", 48, seed=8)(image, seed=(1, 5)), aug(image, seed=(1, 5)))


def test_transforms_draw_independently(monkeypatch):
    # albumentations 2's Compose(seed=) gives every transform the same seed, so three p=0.5 flips fire
    # together (2 of 8 outcomes). Our augmenters share one stream: all 8 flip combinations appear.
    import albumentations as A

    monkeypatch.setitem(
        PRESETS,
        "flips",
        Preset(
            "flips", "test", lambda size, square: [A.Transpose(p=0.5), A.VerticalFlip(p=0.5), A.HorizontalFlip(p=0.5)]
        ),
    )
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    aug = get_augment("flips", 4, seed=0)
    assert len({aug(image).tobytes() for _ in range(200)}) == 8
    assert len({aug(image, seed=k).tobytes() for k in range(200)}) == 8


def test_errors():
    with pytest.raises(ConfigError) as excinfo:
        get_augment("heavy", 64)
    for name in PRESETS:
        assert name in str(excinfo.value)
    assert augment.validate_preset("ISIC_Strong") == "isic-strong"
    with pytest.raises(ConfigError, match="image_size"):
        get_augment("basic", 0)
    with pytest.raises(ConfigError, match="seed"):
        get_augment("basic", 64, seed=-1)
    aug = get_augment("basic", 32)
    with pytest.raises(MelcoreError, match="uint8"):
        aug(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(MelcoreError, match=r"\(H, W, 3\)"):
        aug(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(MelcoreError, match="seed"):
        aug(np.zeros((32, 32, 3), dtype=np.uint8), seed="abc")


def test_no_tensorflow_import():
    code = (
        "import sys, numpy as np; import melcore.augment as a; "
        "a.get_augment('isic-strong', 32)(np.zeros((32, 32, 3), np.uint8), seed=1); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'tensorflow imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
