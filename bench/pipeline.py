"""Does the input pipeline keep up with training?

Measures, in one run on this machine:

* the input pipeline's images/s (``melcore.pipeline.ImageBatches`` with the
  ``isic-strong`` augmentation, ``--workers`` threads), cold (empty image cache:
  decode + resize + cache write) and cached (second pass: cached arrays);
* the models' own training speed: ``train_on_batch`` images/s of
  ``efficientnet-b0`` and ``cnn-bn`` (random weights, AdamW) at the same size,
  after one warm-up step (graph tracing, reported separately).

The last line prints ``pipeline_ips / model_ips`` for each model; above 1 means
the pipeline feeds the model faster than it trains (the pipeline is not the
bottleneck). On a GPU the model side is far faster: run it there to size ``--workers``.

Usage::

    python bench/pipeline.py [--images DIR] [--size 224] [--batch 16] [--n 256] [--workers 2]

Images: ``--images`` (JPEG folder, searched recursively), else the shared
``derm-real-dev`` set when present, else synthetic 512x512 JPEGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def find_images(folder: Path | None, n: int, tmp: Path) -> list[str]:
    candidates = [folder] if folder else [ROOT.parent / "shared" / "data" / "derm-real-dev"]
    for candidate in candidates:
        if candidate and candidate.exists():
            paths = sorted(str(p) for p in candidate.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if paths:
                return (paths * (n // len(paths) + 1))[:n] if len(paths) < n else paths[:n]
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.normal(150, 40, (64, 64, 3))
        pixels = np.clip(np.kron(base, np.ones((8, 8, 1))), 0, 255).astype(np.uint8)
        path = tmp / f"synthetic_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def pipeline_ips(paths, size, batch, workers, cache) -> float:
    from melcore.pipeline import ImageBatches

    targets = np.zeros(len(paths), dtype="float32")
    targets[::10] = 1
    data = ImageBatches(
        paths, targets, size, batch_size=batch, augment="isic-strong", seed=0, cache=cache, workers=workers
    )
    start = time.perf_counter()
    # The same fan-out as Keras' OrderedEnqueuer with threads: one batch per worker at a time.
    with ThreadPoolExecutor(workers) as pool:
        n = sum(x.shape[0] for x, _ in pool.map(data.__getitem__, range(len(data))))
    return n / (time.perf_counter() - start)


def model_ips(name, size, batch, steps) -> tuple[float, float]:
    import keras

    from melcore import models
    from melcore.training.optimizers import make_optimizer

    model, _ = models.build_model(name, size, weights="none")
    model.compile(optimizer=make_optimizer(name, steps_per_epoch=steps, epochs=1), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = (rng.random(batch) < 0.5).astype("float32")
    start = time.perf_counter()
    model.train_on_batch(x, y)  # traces the training graph
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    ips = batch * steps / (time.perf_counter() - start)
    keras.backend.clear_session()
    return ips, warmup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n", type=int, default=256, help="images through the pipeline per pass")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed train_on_batch steps per model")
    parser.add_argument("--models", default="efficientnet-b0,cnn-bn")
    args = parser.parse_args(argv)

    from melcore.images import ImageCache

    with tempfile.TemporaryDirectory(prefix="melcore-bench-") as tmp:
        tmp = Path(tmp)
        paths = find_images(args.images, args.n, tmp)
        print(
            f"{len(paths)} images, size {args.size}, batch {args.batch}, {args.workers} worker threads, "
            f"{os.cpu_count()} CPUs"
        )
        cache = ImageCache(tmp / "cache")
        cold = pipeline_ips(paths, args.size, args.batch, args.workers, cache)
        cached = pipeline_ips(paths, args.size, args.batch, args.workers, cache)
        print(f"pipeline isic-strong: cold {cold:.1f} img/s, cached {cached:.1f} img/s")
        ratios = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            ips, warmup = model_ips(name, args.size, args.batch, args.steps)
            print(f"{name}: train_on_batch {ips:.1f} img/s (first step incl. tracing {warmup:.1f} s)")
            ratios.append(f"{name} cold {cold / ips:.2f} cached {cached / ips:.2f}")
    print("pipeline_ips/model_ips: " + "; ".join(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
