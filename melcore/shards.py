"""Caching the backbone features of a large cohort in shards that several workers compute at once.

Featurising every image of ISIC 2020 (33,126) with a frozen backbone is the slow part of a
fast-head run (about 15 minutes on two CPU cores). The image list is split into ``n``
contiguous shards, each queued as its own ``features`` job; every worker sharing the store
and ``MELREVIEW_HOME`` claims shards until none is left, and the feature cache (one file
per image and view) receives them without coordination. A shard whose worker dies is
requeued alone by the store's stale-heartbeat check; a later fast-head run of the same
backbone finds every feature in the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from melcore import features
from melcore.distributed import replica_rows
from melcore.errors import ConfigError

__all__ = ["FEATURES_JOB", "ShardResult", "shard_rows", "shard_config", "featurise_shard"]

FEATURES_JOB = "features"
MAX_SHARDS = 4096


def shard_rows(n_images: int, n_shards: int, shard: int) -> slice:
    """Rows ``[start, stop)`` of an ``n_images`` list that shard ``shard`` of ``n_shards`` holds.

    Contiguous, disjoint, covering the list, sizes within one of each other.
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not 1 <= n_shards <= MAX_SHARDS:
        raise ConfigError(f"number of shards must be an integer 1..{MAX_SHARDS}, got {n_shards!r}")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < n_shards:
        raise ConfigError(f"shard must be 0..{n_shards - 1}, got {shard!r}")
    return replica_rows(n_images, n_shards, shard)


def shard_config(config: dict, n_shards: int, shard: int) -> dict:
    """The job config of one shard: the training config's backbone fields plus the shard's place."""
    shard_rows(0, n_shards, shard)  # validates both numbers
    return {**config, "shard": shard, "n_shards": n_shards}


@dataclass(frozen=True)
class ShardResult:
    """One shard's outcome: images in it, taken from / added to the cache, unreadable, seconds."""

    shard: int
    n_shards: int
    n_images: int
    hits: int
    misses: int
    bad: int
    seconds: float
    cancelled: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def featurise_shard(
    config,
    paths: Sequence,
    n_shards: int,
    shard: int,
    *,
    views: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    feature_cache=None,
) -> ShardResult:
    """Compute and cache the features of one shard of ``paths`` with ``config``'s frozen backbone.

    Parameters
    ----------
    config : melcore TrainConfig
        Resolved; its model, image size, weights, pooling and seed name the backbone, and so
        the cache entries a fast-head run of the same config reads.
    paths : sequence of str
        Every image of the cohort, in the cohort's order (each worker must see the same list).
    n_shards, shard : int
        This shard's place (:func:`shard_rows`).
    views : sequence of str, optional
        Feature views to cache; default the training views plus, with ``config.tta``, all
        eight dihedral views (what a fast-head run looks up).
    progress, should_stop : callables, optional
        As :func:`melcore.features.compute_features`.
    """
    from melcore import images as images_module

    rows = shard_rows(len(paths), n_shards, shard)
    part = list(paths)[rows]
    started = time.perf_counter()
    if views is None:
        views = features.VIEWS if getattr(config, "tta", False) else ("identity",)
    extractor = features.get_extractor(config)
    image_cache = images_module.ImageCache() if getattr(config, "cache_images", True) else None
    computed = features.compute_features(
        extractor,
        part,
        views=tuple(views),
        cache=feature_cache if feature_cache is not None else features.FeatureCache(),
        image_cache=image_cache,
        batch_size=max(int(config.batch_size), 32),
        workers=config.workers,
        progress=progress,
        should_stop=should_stop,
    )
    return ShardResult(
        shard,
        n_shards,
        len(part),
        computed.hits,
        computed.misses,
        len(computed.bad),
        time.perf_counter() - started,
        computed.cancelled,
    )
