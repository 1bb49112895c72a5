"""Cached backbone features (keys, hits, invalidation, views) and the fast-head training mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_train import Recorder, easy_config, make_easy_cohort

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def easy_dir(tmp_path_factory):
    return make_easy_cohort(tmp_path_factory.mktemp("easy-features"), n_patients=24, per_patient=3, size=40)


@pytest.fixture
def cohort(easy_dir):
    from melcore.cohort import load_cohort

    return load_cohort(*easy_dir)


def _config(**overrides):
    from melcore.training.config import validate

    values = dict(mode="fast-head", epochs=8, learning_rate=1e-2)
    values.update(overrides)
    return validate(easy_config(**values))


def _copy_images(source: Path, target: Path, n: int) -> list[Path]:
    target.mkdir()
    paths = []
    for path in sorted(source.glob("*.png"))[:n]:
        out = target / path.name
        out.write_bytes(path.read_bytes())
        paths.append(out)
    return paths


def test_cache_hits_misses_and_invalidation(easy_dir, tmp_path):
    from melcore import features, models

    paths = _copy_images(easy_dir[1], tmp_path / "images", 6)
    cache = features.FeatureCache(tmp_path / "cache")
    extractor = features.get_extractor(_config(seed=3), reuse=False)
    first = features.compute_features(extractor, paths, cache=cache)
    assert (first.hits, first.misses, first.bad) == (0, 6, {})
    assert first.features.shape == (1, 6, extractor.n_features) and first.features.dtype == np.float32
    direct = extractor.backbone.predict_on_batch(
        np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in paths]).astype("float32")
    )
    # Same images through the cache's decoder (PIL draft + resize) are close to a plain PIL resize.
    assert np.corrcoef(first.features.ravel(), np.asarray(direct).ravel())[0, 1] > 0.9

    again = features.compute_features(extractor, paths, cache=cache)
    assert (again.hits, again.misses) == (6, 0)
    np.testing.assert_array_equal(again.features, first.features)
    assert (cache.hits, cache.misses) == (6, 6)

    # A changed file (new content, so new size/mtime) is computed again; the others still hit.
    changed = np.asarray(Image.open(paths[0]).convert("RGB"))[::-1].copy()
    changed[:20] = 0
    Image.fromarray(changed).save(paths[0])
    os.utime(paths[0], ns=(os.stat(paths[0]).st_atime_ns, os.stat(paths[0]).st_mtime_ns + 10**9))
    third = features.compute_features(extractor, paths, cache=cache)
    assert (third.hits, third.misses) == (5, 1)
    assert not np.allclose(third.features[0, 0], first.features[0, 0])
    np.testing.assert_array_equal(third.features[0, 1:], first.features[0, 1:])

    # Other random weights (another seed) -> another key -> nothing reused.
    other = features.get_extractor(_config(seed=4), reuse=False)
    assert other.key != extractor.key
    fourth = features.compute_features(other, paths, cache=cache)
    assert (fourth.hits, fourth.misses) == (0, 6)
    # The same seed rebuilds the same random weights: same key.
    assert features.get_extractor(_config(seed=3), reuse=False).key == extractor.key

    # Weights from a file: the key is the weights' identity, not where they came from.
    weights = models.save_backbone_weights(other.backbone, tmp_path / "other.weights.h5")
    from_file = features.get_extractor(_config(seed=3, weights=str(weights)), reuse=False)
    assert from_file.weights_info.loaded and from_file.key == other.key
    assert features.compute_features(from_file, paths, cache=cache).hits == 6

    # A missing file is reported, not raised; a corrupt one too.
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    result = features.compute_features(
        extractor, [paths[1], tmp_path / "nope.png", tmp_path / "images" / "broken.png"], cache=cache
    )
    assert sorted(result.bad) == [1, 2] and result.hits == 1
    meta = json.loads((cache.folder(extractor.key) / "meta.json").read_text())
    assert meta["model"] == "basic-cnn" and meta["image_size"] == 32


def test_views_are_the_dihedral_transforms(easy_dir, tmp_path):
    from melcore import features
    from melcore.images import load_images
    from melcore.predict import dihedral_views

    paths = sorted(easy_dir[1].glob("*.png"))[:3]
    extractor = features.get_extractor(_config(seed=5))
    result = features.compute_features(extractor, paths, views=features.VIEWS, cache=features.FeatureCache(tmp_path))
    batch = load_images(paths, 32)
    for v, view in enumerate(dihedral_views(batch)):
        expected = extractor.backbone.predict_on_batch(view.astype("float32"))
        np.testing.assert_allclose(result.features[v], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(result.features[0], result.features[1])
    with pytest.raises(Exception, match="unknown feature view"):
        features.compute_features(extractor, paths, views=("sideways",))


def test_fast_head_run_has_the_format_of_a_normal_run(cohort, tmp_path):
    from melcore.models import load_model
    from melcore.predict import predict_paths
    from melcore.training.api import fit
    from melcore.training.rundir import Run

    full = fit(_config(mode="full", epochs=1), cohort, run_dir=tmp_path / "full")
    fast = fit(_config(), cohort, run_dir=tmp_path / "fast")
    assert sorted(os.listdir(full.run_dir)) == sorted(os.listdir(fast.run_dir))
    assert set(full.metrics) <= set(fast.metrics)
    m = fast.metrics
    assert m["mode"] == "fast-head" and m["kind"] == "image" and m["status"] == "done"
    assert m["feature_cache"]["misses"] == len(cohort) and m["feature_cache"]["hits"] == 0
    assert m["feature_seconds"] >= 0 and m["head_seconds"] > 0
    assert m["n_train"] + m["n_select"] + m["n_val"] == len(cohort)
    loaded = Run.load(fast.run_dir)
    assert loaded.config.mode == "fast-head" and loaded.metrics["val_auroc"] == m["val_auroc"]

    # model.keras is an ordinary model: scoring the images equals the head on the cached features.
    model = load_model(fast.run_dir / "model.keras")
    assert model.get_layer("features") is not None and model.get_layer("head_probability") is not None
    val = fast.val_predictions()
    paths = cohort.table.set_index("image_name").loc[val["image_name"], "image_path"].tolist()
    np.testing.assert_allclose(predict_paths(model, paths), val["prediction"], atol=1e-5)

    # Same config again: every feature from the cache, the same predictions.
    again = fit(_config(), cohort, run_dir=tmp_path / "fast-again")
    assert again.metrics["feature_cache"] == {**m["feature_cache"], "hits": len(cohort), "misses": 0}
    pd.testing.assert_frame_equal(again.val_predictions(), val)


def test_fast_head_learns_an_easy_task_with_views_and_tta(cohort, tmp_path):
    from melcore.features import VIEWS
    from melcore.training.fast_head import fit_fast_head

    run = fit_fast_head(_config(tta=True, balance="class-weight"), cohort, run_dir=tmp_path / "run", views=VIEWS[:4])
    m = run.metrics
    assert m["val_auroc"] >= 0.9, m["history"]
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    assert m["feature_cache"]["views"] == list(VIEWS)  # 4 training views + all 8 for TTA
    assert m["tta"] is True and 0.0 <= m["specificity"] <= 1.0


def test_fast_head_progress_contract_and_cancel(cohort, tmp_path):
    from melcore.training.api import fit

    recorder = Recorder()
    run = fit(_config(epochs=3), cohort, progress=recorder, run_dir=tmp_path / "run")
    stages = [c[3]["stage"] for c in recorder.calls]
    assert stages[0] == "load" and "head" in stages
    loads = [c for c in recorder.calls if c[3]["stage"] == "load"]
    assert loads[-1][3]["done"] == loads[-1][3]["total"] == len(cohort)
    ends = [c for c in recorder.calls if c[3].get("end_of_epoch")]
    assert [c[0] for c in ends] == [1, 2, 3] and all("select_auroc" in c[3] for c in ends)
    batches = recorder.batches()
    assert batches and all(c[3]["steps"] == batches[0][3]["steps"] and c[3]["epochs"] == 3 for c in batches)
    assert run.metrics["epochs_run"] == 3

    calls = []

    def stop_after_two_batches():
        calls.append(1)
        return sum(1 for c in stopper.calls if c[3]["stage"] == "head") >= 2

    stopper = Recorder()
    cancelled = fit(
        _config(epochs=5), cohort, progress=stopper, should_stop=stop_after_two_batches, run_dir=tmp_path / "cancelled"
    )
    assert cancelled.cancelled and cancelled.metrics["status"] == "cancelled"
    assert len([c for c in stopper.batches()]) <= 3


def test_key_is_stable_across_rebuilds_with_auto_named_layers():
    from melcore import features

    # keras.applications EfficientNet has auto-named layers ("normalization", then "normalization_1"...).
    config = _config(model="efficientnet-b0", image_size=32, seed=2, weights="none")
    first = features.get_extractor(config, reuse=False)
    second = features.get_extractor(config, reuse=False)
    assert first.key == second.key
    assert features.get_extractor(config).key == first.key  # the in-process memo agrees
