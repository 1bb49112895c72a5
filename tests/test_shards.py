"""Feature caching in shards (melcore.shards): the split, the cache it fills, a dead shard requeued alone."""

from __future__ import annotations

import numpy as np
import pytest

from melcore import shards
from melcore.errors import ConfigError


@pytest.mark.parametrize("n, k", [(10, 3), (3, 5), (33126, 16), (0, 2)])
def test_shards_partition_the_image_list(n, k):
    rows = [shards.shard_rows(n, k, i) for i in range(k)]
    assert np.concatenate([np.arange(n)[r] for r in rows]).tolist() == list(range(n))


@pytest.mark.parametrize("k, i, message", [(0, 0, "1..4096"), (2, 2, "0..1"), (2, True, "0..1"), (2.0, 0, "1..4096")])
def test_bad_shard_numbers_are_refused(k, i, message):
    with pytest.raises(ConfigError, match=message):
        shards.shard_rows(10, k, i)


@pytest.mark.slow
def test_two_shards_fill_the_cache_a_run_then_reads(tmp_path):
    from test_features import _config, _copy_images  # noqa: F401  (same tiny backbone as the feature tests)
    from test_train import make_easy_cohort

    from melcore import features

    _labels, image_dir = make_easy_cohort(tmp_path / "cohort", n_patients=4, per_patient=2, size=40)
    paths = sorted(str(p) for p in image_dir.glob("*.png"))
    config = _config(seed=3)
    cache = features.FeatureCache(tmp_path / "cache")
    results = [shards.featurise_shard(config, paths, 2, i, feature_cache=cache) for i in range(2)]
    assert [r.n_images for r in results] == [len(paths) // 2, len(paths) - len(paths) // 2]
    assert [r.misses for r in results] == [r.n_images for r in results] and not any(r.bad for r in results)
    whole = features.compute_features(features.get_extractor(config), paths, cache=cache)
    assert (whole.hits, whole.misses) == (len(paths), 0)
    fresh = features.compute_features(features.get_extractor(config, reuse=False), paths, cache=False)
    np.testing.assert_allclose(whole.features, fresh.features, rtol=1e-4, atol=1e-5)


def test_a_dead_shard_is_requeued_alone(tmp_path):
    from melcore.store import Store

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    ids = [store.submit_job(shards.shard_config({"model": "efficientnet-lite0"}, 3, i), kind=shards.FEATURES_JOB)
           for i in range(3)]
    held = [store.claim_job(f"worker-{i}") for i in range(3)]
    assert [job["config"]["shard"] for job in held] == [0, 1, 2]
    store.finish_job(held[0]["id"], held[0]["claim_token"], "done")
    import time

    store.update_job(held[1]["id"], heartbeat_at=time.time() - 3600)  # shard 1's worker died an hour ago
    store.heartbeat(held[2]["id"], held[2]["claim_token"])
    acted = store.requeue_stale(stale_after=600)
    assert acted == [{"id": ids[1], "state": "queued"}]
    assert [store.get_job(i)["state"] for i in ids] == ["done", "queued", "running"]
