"""Training input pipeline: batches, seeded order, oversampling, prediction batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melcore import images
from melcore.errors import ConfigError, ImageError
from melcore.pipeline import ImageBatches, PredictionBatches, class_weights


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """40 small JPEGs (distinct colours), the first 6 labelled melanoma."""
    folder = tmp_path_factory.mktemp("pipeline-images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        pixels = np.clip(rng.normal(20 + 5 * i, 20, (48, 40, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=95)
        paths.append(str(path))
    targets = np.array([1] * 6 + [0] * 34, dtype="float32")
    return paths, targets


def test_batches_are_float32_raw_rgb_with_float_targets(image_files):
    paths, targets = image_files
    data = ImageBatches(paths, targets, 32, batch_size=8, augment="isic-strong", workers=1)
    assert len(data) == 5
    x, y = data[0]
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (8,) and y.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 255.0 and x.max() > 1.0  # 0..255, not rescaled
    np.testing.assert_array_equal(y, targets[data.batch_indices(0)])
    x_last, y_last = data[4]
    assert x_last.shape[0] == 8 and y_last.shape == (8,)


def test_unaugmented_batches_are_the_decoded_images(image_files):
    paths, targets = image_files
    data = ImageBatches(paths, targets, 32, batch_size=16, augment="none", shuffle=False, workers=1)
    x, _ = data[1]
    expected = np.stack([images.load_image(p, 32) for p in paths[16:32]]).astype("float32")
    np.testing.assert_array_equal(x, expected)
    assert len(data) == 3 and data[2][0].shape[0] == 8  # 40 = 16 + 16 + 8


def test_order_and_augmentation_are_reproducible_for_a_seed(image_files):
    paths, targets = image_files
    kwargs = dict(batch_size=8, augment="isic-strong", seed=5, workers=1)
    a, b = ImageBatches(paths, targets, 32, **kwargs), ImageBatches(paths, targets, 32, **kwargs)
    with ThreadPoolExecutor(3) as pool:  # out-of-order, concurrent reads give the same batches
        from_threads = list(pool.map(lambda i: b[i], reversed(range(len(b)))))[::-1]
    for i in range(len(a)):
        xa, ya = a[i]
        np.testing.assert_array_equal(xa, from_threads[i][0])
        np.testing.assert_array_equal(ya, from_threads[i][1])
    other = ImageBatches(paths, targets, 32, **{**kwargs, "seed": 6})
    assert not np.array_equal(a.epoch_indices(), other.epoch_indices())


def test_each_epoch_reshuffles_and_covers_every_image_once(image_files):
    paths, targets = image_files
    data = ImageBatches(paths, targets, 32, batch_size=8, seed=1, workers=1)
    first = data.epoch_indices()
    assert sorted(first.tolist()) == list(range(40))
    x0, _ = data[0]
    data.on_epoch_end()  # Keras' extra call when fit starts: no epoch was begun, nothing moves
    assert data.epoch == 0
    data.on_epoch_begin()
    data.on_epoch_end()
    assert data.epoch == 1
    second = data.epoch_indices()
    assert sorted(second.tolist()) == list(range(40)) and not np.array_equal(first, second)
    data.set_epoch(0)
    np.testing.assert_array_equal(data[0][0], x0)
    ordered = ImageBatches(paths, targets, 32, batch_size=8, shuffle=False, workers=1)
    np.testing.assert_array_equal(ordered.epoch_indices(), np.arange(40))


def test_oversampling_balances_every_batch(image_files):
    paths, targets = image_files
    data = ImageBatches(paths, targets, 32, batch_size=8, balance="oversample", seed=2, workers=1)
    assert data.epoch_length == 68 and len(data) == 9  # twice the 34 benign images
    order = data.epoch_indices()
    positive = targets[order] == 1
    assert positive.mean() == pytest.approx(0.5)
    for b in range(len(data)):
        batch = targets[data.batch_indices(b)]
        assert abs(batch.mean() - 0.5) <= 0.5 / len(batch) + 1e-9
    negatives = order[~positive]
    assert sorted(negatives.tolist()) == list(range(6, 40))  # each benign image exactly once
    counts = np.bincount(order[positive], minlength=6)
    assert counts.min() >= 5 and counts.max() <= 6  # 34 draws spread evenly over 6 melanomas
    _, y = data[0]
    assert y.mean() == pytest.approx(0.5)
    # Over several epochs with a short epoch length, positives stay at ~50% and batches differ.
    short = ImageBatches(paths, targets, 32, batch_size=8, balance="oversample", epoch_length=24, workers=1)
    seen = []
    for epoch in range(5):
        short.set_epoch(epoch)
        seen.append(short.epoch_indices())
        assert targets[seen[-1]].mean() == pytest.approx(0.5)
    benign_seen = np.concatenate(seen)[targets[np.concatenate(seen)] == 0]
    assert set(benign_seen.tolist()) == set(range(6, 40))  # the walk covers all benign images


def test_class_weights_and_class_weight_mode(image_files):
    paths, targets = image_files
    weights = class_weights(targets)
    assert weights[1] == pytest.approx(40 / 12) and weights[0] == pytest.approx(40 / 68)
    assert weights[1] * 6 == pytest.approx(weights[0] * 34)
    data = ImageBatches(paths, targets, 32, batch_size=8, balance="class-weight", seed=3, workers=1)
    assert sorted(data.epoch_indices().tolist()) == list(range(40))
    with pytest.raises(ConfigError, match="no melanoma"):
        class_weights([0, 0, 0])
    with pytest.raises(ConfigError, match="0 or 1"):
        class_weights([0, 1, 2])


def test_prediction_batches_are_ordered_and_complete(image_files):
    paths, _ = image_files
    data = PredictionBatches(paths, 32, batch_size=16, workers=1)
    assert len(data) == 3
    stacked = np.concatenate([data[i] for i in range(len(data))])
    expected = np.stack([images.load_image(p, 32) for p in paths]).astype("float32")
    np.testing.assert_array_equal(stacked, expected)
    tta = PredictionBatches(paths, 32, batch_size=16, augment="basic", seed=1, workers=1)
    np.testing.assert_array_equal(
        tta[0], PredictionBatches(paths, 32, batch_size=16, augment="basic", seed=1, workers=1)[0]
    )
    assert tta[0].shape == (16, 32, 32, 3)
    with pytest.raises(IndexError):
        data[3]


def test_cache_is_used(image_files, tmp_path):
    paths, targets = image_files
    cache = images.ImageCache(tmp_path / "cache")
    data = ImageBatches(paths[:8], targets[:8], 32, batch_size=4, cache=cache, workers=1)
    first = [data[i][0] for i in range(len(data))]
    assert cache.misses == 8
    again = [data[i][0] for i in range(len(data))]
    assert cache.hits == 8
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)


def test_bad_inputs_raise_clear_errors(image_files, tmp_path):
    paths, targets = image_files
    with pytest.raises(ConfigError, match="40 image paths but 3 targets"):
        ImageBatches(paths, [0, 1, 0], 32)
    with pytest.raises(ConfigError, match="position 2"):
        ImageBatches(paths[:3], [0, 1, np.nan], 32)
    with pytest.raises(ConfigError, match="valid modes"):
        ImageBatches(paths, targets, 32, balance="undersample")
    with pytest.raises(ConfigError, match="valid presets"):
        ImageBatches(paths, targets, 32, augment="heavy")
    with pytest.raises(ConfigError, match="no melanoma"):
        ImageBatches(paths[6:], targets[6:], 32, balance="oversample")
    with pytest.raises(ConfigError, match="position 1"):
        ImageBatches([paths[0], None], [0, 1], 32)
    with pytest.raises(ConfigError, match="batch_size"):
        ImageBatches(paths, targets, 32, batch_size=0)
    missing = ImageBatches([str(tmp_path / "gone.jpg")], [0], 32, workers=1)
    with pytest.raises(ImageError, match="gone.jpg"):
        missing[0]


def test_from_cohort_table(image_files):
    paths, targets = image_files
    table = pd.DataFrame(
        {
            "image_name": [f"img_{i}" for i in range(40)],
            "image_path": paths,
            "target": pd.array(targets.astype(int), dtype="Int8"),
        }
    )
    data = ImageBatches.from_table(table, 32, batch_size=10, workers=1)
    np.testing.assert_array_equal(data.targets, targets)
    gaps = table.copy()
    gaps.loc[3, "image_path"] = None
    with pytest.raises(ConfigError, match="img_3.*with_images"):
        ImageBatches.from_table(gaps, 32)
    unlabelled = table.copy()
    unlabelled.loc[5, "target"] = pd.NA
    with pytest.raises(ConfigError, match="img_5.*labelled"):
        ImageBatches.from_table(unlabelled, 32)


def test_keras_fit_with_worker_threads_advances_epochs(image_files):
    from melcore.models import build_model

    paths, targets = image_files
    model, _ = build_model("basic-cnn", 16)
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    data = ImageBatches(
        paths, targets, 16, batch_size=8, augment="basic", balance="oversample", epoch_length=16, workers=2
    )
    history = model.fit(data, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))
    assert data.epoch == 2  # epochs 0 and 1 were trained on
    model.fit(data, epochs=1, shuffle=False, verbose=0)
    assert data.epoch == 3
    predictions = model.predict(PredictionBatches(paths, 16, batch_size=16, workers=2), verbose=0)
    assert predictions.shape == (40, 1)
    keras.backend.clear_session()
