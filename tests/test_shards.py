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
    ids = [
        store.submit_job(shards.shard_config({"model": "efficientnet-lite0"}, 3, i), kind=shards.FEATURES_JOB)
        for i in range(3)
    ]
    held = [store.claim_job(f"worker-{i}") for i in range(3)]
    assert [job["config"]["shard"] for job in held] == [0, 1, 2]
    store.finish_job(held[0]["id"], held[0]["claim_token"], "done")
    import time

    store.update_job(held[1]["id"], heartbeat_at=time.time() - 3600)  # shard 1's worker died an hour ago
    store.heartbeat(held[2]["id"], held[2]["claim_token"])
    acted = store.requeue_stale(stale_after=600)
    assert acted == [{"id": ids[1], "state": "queued"}]
    assert [store.get_job(i)["state"] for i in ids] == ["done", "queued", "running"]


@pytest.mark.slow
def test_features_jobs_from_the_cli_are_shared_by_two_workers_and_a_dead_shard_is_redone(tmp_path, capsys):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_train import make_easy_cohort

    from melcore import features
    from melcore.__main__ import main
    from melcore.store import Store
    from melcore.training.config import TrainConfig, validate

    root = Path(__file__).resolve().parents[1]
    csv, image_dir = make_easy_cohort(tmp_path / "cohort", n_patients=6, per_patient=3, size=40)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.register_dataset("easy", csv, image_dir)
    options = ["--model", "basic-cnn", "--image-size", "32", "--mode", "fast-head", "--seed", "3"]
    assert (
        main(["jobs", "--db", url, "submit", "--dataset", "easy", "--kind", "features", "--shards", "3", *options]) == 0
    )
    ids = [int(line) for line in capsys.readouterr().out.split()]
    assert [store.get_job(i)["config"]["shard"] for i in ids] == [0, 1, 2]
    assert main(["jobs", "--db", url, "submit", "--dataset", "easy", "--shards", "2", *options]) == 2
    assert "--shards goes with --kind features" in capsys.readouterr().err

    dead = store.claim_job("dead-worker")  # shard 0's worker dies: its heartbeat is an hour old
    store.update_job(dead["id"], heartbeat_at=time.time() - 3600)
    env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="3")
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "trainers.worker", "--db", url, "--once", "--poll", "0.2"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    jobs = [store.get_job(i) for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 3, [(j["state"], j["error"]) for j in jobs]
    assert [j["attempts"] for j in jobs] == [2, 1, 1]  # only the dead shard ran again
    assert "stopped responding" in jobs[0]["error"]
    n_images = len(list(image_dir.glob("*.png")))
    assert sum(j["progress"]["misses"] + j["progress"]["hits"] for j in jobs) == n_images
    assert [j["progress"]["n_images"] for j in jobs] == [6, 6, 6] and not any(j["run_id"] for j in jobs)

    assert main(["jobs", "--db", url, "list"]) == 0
    listing = capsys.readouterr().out
    assert "features of basic-cnn at 32 px, shard 1/3" in listing and "shard 3/3" in listing

    config = validate(TrainConfig(model="basic-cnn", image_size=32, mode="fast-head", seed=3))
    paths = [str(p) for p in store.load_dataset_cohort("easy").table["image_path"]]
    cached = features.compute_features(features.get_extractor(config), paths)
    assert (cached.hits, cached.misses) == (n_images, 0)  # a fast-head run of the same config computes nothing
