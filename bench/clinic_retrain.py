"""How much faster is a clinic retrain on cached features than fine-tuning?

Measures, in one run, on the same N images (default 1,000 of the shared
``derm-real-dev`` set, else the demo cohort):

1. cold fast-head run: backbone features computed and cached, head trained
   (``melcore.training.api.fit`` with ``mode="fast-head"``);
2. warm fast-head retrain, the number that matters: features from the cache, the
   backbone rebuilt from scratch (as a fresh process would), head trained, run
   directory (model.keras, predictions, metrics) written; also the same with the
   backbone kept in memory (a long-lived worker's second job);
3. one fine-tune epoch of the same N images in full mode (every layer trains,
   ``balance="none"``, so one epoch is one pass over the images). With
   ``--full-batches B`` only B batches are timed (the first, which traces the graph,
   excluded) and the epoch time is extrapolated from their images/s.

Targets (from the issue): warm retrain <= 10 s, and at least 20x less than one
fine-tune epoch. The last line prints the ratio ``fine-tune epoch / warm retrain``.

Usage::

    python bench/clinic_retrain.py [--model efficientnet-b0] [--size 224] [--n 1000] [--full-batches 0]

Runs in a temporary MELREVIEW_HOME (a cold feature cache) unless ``--home`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
DERM = ROOT.parent / "shared" / "data" / "derm-real-dev"


def _cohort(n: int, seed: int):
    from melcore.cohort import load_cohort

    if (DERM / "labels.csv").exists():
        cohort = load_cohort(DERM / "labels.csv", DERM / "images", name="derm-real-dev")
    else:
        from melcore.demo import ensure_demo

        folder = ensure_demo()
        cohort = load_cohort(folder / "labels.csv", folder / "jpeg" / "train", name="demo")
    cohort = cohort.labelled().with_images()
    if len(cohort) > n:
        keep = np.zeros(len(cohort), dtype=bool)
        keep[np.random.default_rng(seed).choice(len(cohort), n, replace=False)] = True
        cohort = cohort.subset(keep)
    return cohort


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=1000, help="images")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs (early stopping patience 3)")
    parser.add_argument(
        "--full-batches",
        type=int,
        default=0,
        help="time only this many fine-tune batches and extrapolate (0 = the whole epoch)",
    )
    parser.add_argument("--home", help="MELREVIEW_HOME (default: a new temporary folder, cold caches)")
    args = parser.parse_args(argv)
    home = args.home or tempfile.mkdtemp(prefix="melreview-bench-")
    os.environ["MELREVIEW_HOME"] = home

    from melcore import features
    from melcore.training.api import fit
    from melcore.training.config import TrainConfig

    cohort = _cohort(args.n, 0)
    n = len(cohort)
    print(
        f"cohort {cohort.name}: {n} images ({int(cohort.table['target'].eq(1).sum())} melanoma); "
        f"{args.model} at {args.size} px, weights none; home {home}"
    )
    base = dict(
        model=args.model,
        image_size=args.size,
        batch_size=args.batch,
        weights="none",
        seed=0,
        epochs=args.epochs,
        augment="none",
    )
    runs = Path(home) / "bench-runs"

    fast = TrainConfig(mode="fast-head", **base)
    t = time.perf_counter()
    cold = fit(fast, cohort, run_dir=runs / "cold")
    cold_s = time.perf_counter() - t
    m = cold.metrics
    print(
        f"cold fast-head run:  {cold_s:6.1f} s  (features {m['feature_seconds']:.1f} s = "
        f"{n / max(m['feature_seconds'], 1e-9):.1f} images/s, {m['feature_cache']['misses']} computed; head "
        f"{m['head_seconds']:.1f} s; val AUROC {m['val_auroc']:.3f})"
    )

    features.clear_extractors()
    t = time.perf_counter()
    warm = fit(fast, cohort, run_dir=runs / "warm")
    warm_s = time.perf_counter() - t
    m = warm.metrics
    print(
        f"warm retrain:        {warm_s:6.1f} s  (cache hits {m['feature_cache']['hits']}/{n}; backbone build+hash "
        f"{m['backbone_seconds']:.1f} s, features {m['feature_seconds']:.1f} s, head {m['head_seconds']:.1f} s, "
        f"save {m['save_seconds']:.1f} s; {m['epochs_run']} epochs; val AUROC {m['val_auroc']:.3f})"
    )
    t = time.perf_counter()
    reused = fit(fast, cohort, run_dir=runs / "warm-reused")
    reused_s = time.perf_counter() - t
    print(
        f"warm, backbone kept: {reused_s:6.1f} s  (a worker's next job: backbone reused "
        f"{reused.metrics['backbone_reused']})"
    )

    # ---- one fine-tune epoch of the same images
    stamps: list[float] = []

    def progress(epoch, batch, loss, metrics, eta):
        if metrics.get("stage") == "train" and not metrics.get("end_of_epoch") and batch and loss is not None:
            if len(stamps) < batch:
                stamps.append(time.perf_counter())

    def should_stop():
        return bool(args.full_batches) and len(stamps) >= args.full_batches + 1

    full = TrainConfig(mode="full", balance="none", **{**base, "epochs": 1})
    t = time.perf_counter()
    run = fit(full, cohort, progress=progress, should_stop=should_stop, run_dir=runs / "full")
    full_wall = time.perf_counter() - t
    n_train = run.metrics["n_train"]
    if len(stamps) >= 3:
        timed = len(stamps) - 1  # batches 2..B: the first includes graph tracing
        per_image = (stamps[-1] - stamps[0]) / (timed * args.batch)
        how = f"{timed} batches timed after the first"
    else:
        per_image = run.metrics["train_seconds"] / max(1, n_train)
        how = "whole epoch"
    epoch_s = per_image * n
    print(
        f"fine-tune epoch:     {epoch_s:6.1f} s  for {n} images ({1 / per_image:.1f} images/s training, {how}; "
        f"wall {full_wall:.1f} s{' cancelled by design' if run.cancelled else ''})"
    )
    print(
        f"targets: warm retrain {warm_s:.1f} s <= 10 s: {'yes' if warm_s <= 10 else 'NO'}; "
        f"ratio >= 20: {'yes' if epoch_s / warm_s >= 20 else 'NO'}"
    )
    print(
        f"fine-tune epoch / warm retrain = {epoch_s:.1f} s / {warm_s:.1f} s = {epoch_s / warm_s:.1f}x "
        f"(backbone kept in memory: {epoch_s / reused_s:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
