"""Cache usage and pruning (melcore.caches, ``python -m melcore cache``, the worker's automatic prune)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from melcore import settings
from melcore.__main__ import main as cli
from melcore.caches import (
    auto_prune,
    cache_usage,
    format_size,
    max_size_from_environment,
    parse_age,
    parse_size,
    prune_caches,
)
from melcore.errors import ConfigError
from melcore.features import FeatureCache
from melcore.images import ImageCache

DAY = 86400.0


def _entry(name: str, rel: str, n_bytes: int, age_days: float) -> os.PathLike:
    path = settings.home() / "cache" / name / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * n_bytes)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def filled():
    """Three caches; the entry names say their age in days and the caches their size."""
    return {
        "images/ab/old-10d.npy": _entry("images", "ab/old-10d.npy", 4000, 10),
        "images/cd/new-1d.npy": _entry("images", "cd/new-1d.npy", 4000, 1),
        "features/key/meta.json": _entry("features", "key/meta.json", 100, 40),
        "features/key/aa/mid-5d.npy": _entry("features", "key/aa/mid-5d.npy", 2000, 5),
        "gradcam/ee/old-20d.npy": _entry("gradcam", "ee/old-20d.npy", 1000, 20),
        "gradcam/ee/.tmp-being-written": _entry("gradcam", "ee/.tmp-being-written", 500, 30),
    }


def test_usage_counts_entries_but_not_descriptions_or_temporary_files(filled):
    usage = {u.name: u for u in cache_usage()}
    assert set(usage) == {"features", "gradcam", "images"}
    assert (usage["images"].files, usage["images"].bytes) == (2, 8000)
    assert (usage["features"].files, usage["features"].bytes) == (1, 2000)  # meta.json is not an entry
    assert (usage["gradcam"].files, usage["gradcam"].bytes) == (1, 1000)  # the .tmp file is being written
    assert usage["images"].oldest < usage["images"].newest


def test_size_limit_removes_least_recently_used_first_across_caches(filled):
    report = prune_caches(max_bytes=6000)  # 15,000 bytes of entries: the two oldest go (20 d, 10 d)
    assert report.files == 2 and report.bytes == 5000 and report.kept_bytes == 6000
    assert report.removed_files == {"features": 0, "gradcam": 1, "images": 1}
    assert not filled["gradcam/ee/old-20d.npy"].exists() and not filled["images/ab/old-10d.npy"].exists()
    assert filled["images/cd/new-1d.npy"].exists() and filled["features/key/aa/mid-5d.npy"].exists()
    assert filled["features/key/meta.json"].exists() and filled["gradcam/ee/.tmp-being-written"].exists()
    assert not filled["images/ab/old-10d.npy"].parent.exists()  # emptied folders are removed too


def test_age_limit_and_dry_run(filled):
    dry = prune_caches(older_than=7 * DAY, dry_run=True)
    assert dry.files == 2 and dry.dry_run
    assert all(path.exists() for path in filled.values())
    report = prune_caches(older_than=7 * DAY, names=["images"])
    assert report.removed_files == {"images": 1}
    assert not filled["images/ab/old-10d.npy"].exists()
    assert filled["gradcam/ee/old-20d.npy"].exists()  # not selected


def test_bad_requests_are_refused_with_the_choices(filled):
    with pytest.raises(ConfigError, match="say what to prune"):
        prune_caches()
    with pytest.raises(ConfigError, match=r"unknown cache 'thumbnails'.*features, gradcam, images"):
        prune_caches(max_bytes=0, names=["thumbnails"])
    with pytest.raises(ConfigError, match="zero or more"):
        prune_caches(max_bytes=-1)
    with pytest.raises(ConfigError, match="positive number of seconds"):
        prune_caches(older_than=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("512", 512),
        ("1k", 1024),
        ("1.5K", 1536),
        ("20G", 20 * 2**30),
        ("3MiB", 3 * 2**20),
        ("2 gb", 2 * 2**30),
        (7, 7),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5G", "5X", "1e9"])
def test_parse_size_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError, match="500M, 20G"):
        parse_size(text)


def test_parse_age_and_format_size():
    assert parse_age("30d") == 30 * DAY and parse_age("12h") == 12 * 3600 and parse_age("2w") == 14 * DAY
    for bad in ("30", "0d", "soon"):
        with pytest.raises(ConfigError, match="30d, 12h"):
            parse_age(bad)
    assert format_size(512) == "512 B" and format_size(1536) == "1.5 KiB" and format_size(3 * 2**30) == "3.0 GiB"


def test_auto_prune_follows_the_environment(filled, monkeypatch):
    monkeypatch.delenv("MELREVIEW_CACHE_MAX_SIZE", raising=False)
    assert max_size_from_environment() is None and auto_prune() is None
    monkeypatch.setenv("MELREVIEW_CACHE_MAX_SIZE", "5k")
    report = auto_prune()
    assert report.kept_bytes <= 5 * 1024 and filled["images/cd/new-1d.npy"].exists()
    monkeypatch.setenv("MELREVIEW_CACHE_MAX_SIZE", "plenty")
    with pytest.raises(ConfigError, match="MELREVIEW_CACHE_MAX_SIZE"):
        auto_prune()


def test_real_caches_recompute_what_was_pruned(tmp_path):
    from PIL import Image

    picture = tmp_path / "lesion.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(picture)
    images = ImageCache()
    first = images.get(picture, 32)
    assert images.size_bytes() > 0
    prune_caches(max_bytes=0, names=["images"])
    assert images.size_bytes() == 0
    again = images.get(picture, 32)  # a miss, decoded again: same pixels
    np.testing.assert_array_equal(first, again)
    assert images.misses == 2

    features = FeatureCache()
    entry = features.root / "k" / "ab" / "v.npy"
    features.write(entry, np.arange(4, dtype=np.float32))
    assert features.read(entry, 4) is not None
    prune_caches(max_bytes=0, names=["features"])
    assert features.read(entry, 4) is None  # gone: the caller computes it again


def test_cache_command_reports_and_prunes(filled, capsys):
    assert cli(["cache"]) == 0
    out = capsys.readouterr().out
    assert "images" in out and "gradcam" in out and "total" in out
    assert cli(["cache", "--max-size", "6000", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pruned"] == {
        "dry_run": True,
        "files": {"features": 0, "gradcam": 1, "images": 1},
        "bytes": {"features": 0, "gradcam": 1000, "images": 4000},
    }
    assert filled["images/ab/old-10d.npy"].exists()
    assert cli(["cache", "--older-than", "15d", "--only", "gradcam"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert not filled["gradcam/ee/old-20d.npy"].exists()
    assert cli(["cache", "--max-size", "huge"]) == 2
    assert "500M, 20G" in capsys.readouterr().err


def test_the_background_worker_prunes_after_each_job(filled, monkeypatch, caplog):
    from melcore.store import Store
    from trainers.worker import Worker

    store = Store()
    job_id = store.submit_job({}, kind="no-such-kind")  # fails at once, without TensorFlow
    monkeypatch.setenv("MELREVIEW_CACHE_MAX_SIZE", "6000")
    with caplog.at_level("INFO", logger="melreview.worker"):
        assert Worker(store, once=True, poll=0.01).run() == 1
    assert store.get_job(job_id)["state"] == "failed"
    assert sum(u.bytes for u in cache_usage()) <= 6000
    assert not filled["gradcam/ee/old-20d.npy"].exists() and filled["images/cd/new-1d.npy"].exists()
    assert "pruned 2 cache file(s)" in caplog.text

    monkeypatch.setenv("MELREVIEW_CACHE_MAX_SIZE", "lots")  # a bad setting is logged, the queue goes on
    store.submit_job({}, kind="no-such-kind")
    with caplog.at_level("WARNING", logger="melreview.worker"):
        assert Worker(store, once=True, poll=0.01).run() == 1
    assert "cache pruning skipped: MELREVIEW_CACHE_MAX_SIZE" in caplog.text
    store.close()
