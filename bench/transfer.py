"""Benchmark: ImageNet transfer learning on a CPU (EfficientNet-Lite0), speed and where Grad-CAM looks.

Run by hand: ``cd /work/main && python bench/transfer.py [--n 256] [--gradcam 60]``. Data:
``../shared/data/derm-real-dev`` (real 180x180 dermoscopy JPEGs, decoded to 224 px). Measures, in one run:

1. **Frozen-feature throughput** (images/s, forward pass on decoded images, batch 32) of
   EfficientNet-Lite0 at 224 px with the pooling ``cpu-default`` uses (multi-level) and with average
   pooling; baseline in the same run: EfficientNet-B3 at 256 px (the source projects' backbone).
   Target: Lite0 >= 50 images/s.
2. **Featurising ISIC 2020**: the time for all 33,126 training images, extrapolated from the measured
   forward throughput plus the measured cold decode of the 4 real 512x512 ISIC 2020 JPEGs in
   ``../shared/data/isic2020/jpeg/train`` (decoding runs in parallel threads beside the forward pass, so
   the estimate is the larger of the two, and the sum is an upper bound). Target: <= 15 min.
3. **Warm head retrain** of ``cpu-default`` on ``--retrain-n`` (1,000) images whose features are
   cached: a full :func:`melcore.training.api.fit` (backbone rebuilt as in a fresh process, features read,
   logistic head with its inner CV fitted, run folder written). Target: <= 5 s.
4. **Grad-CAM mass inside the lesion**: for ``--gradcam`` held-out images of the clean subset
   (ISIC_0000xxx), the share of the Grad-CAM heat that falls inside the lesion outline
   :func:`melcore.colour.lesion_mask` segments, for a ``cpu-default`` run trained on the other images of
   the source (pretrained) and the same recipe with random weights (from scratch), at the standard
   (7x7) and fine (28x28) detail. The lesion's share of the image area is what a uniform map scores.

Prints a Markdown block for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SHARED = ROOT.parent / "shared" / "data"
DERM = SHARED / "derm-real-dev"
ISIC2020_IMAGES = SHARED / "isic2020" / "jpeg" / "train"
ISIC2020_N = 33_126


def _forward_rate(model_name: str, size: int, pooling: str, images: np.ndarray, batch: int = 32) -> float:
    """Images/s of the frozen backbone's forward pass (after one warm-up batch)."""
    from melcore import models

    backbone, _ = models.build_backbone(model_name, size, weights="none", pooling=pooling)
    backbone.predict(images[:batch], batch_size=batch, verbose=0)
    started = time.perf_counter()
    backbone.predict(images, batch_size=batch, verbose=0)
    return len(images) / (time.perf_counter() - started)


def _decode_ms() -> float:
    """Cold decode of the real ISIC 2020 JPEGs to 224 px, ms per image (no cache)."""
    from melcore.images import load_image

    files = sorted(ISIC2020_IMAGES.glob("*.jpg"))
    if not files:
        return float("nan")
    started = time.perf_counter()
    for _ in range(5):
        for path in files:
            load_image(path, 224)
    return 1000 * (time.perf_counter() - started) / (5 * len(files))


def _clean_split(cohort):
    table = cohort.table
    matched = (table["clinic"] == "ISIC archive 2016-2018").to_numpy()
    clean = matched & table["image_name"].astype(str).str.match(r"ISIC_0000\d{3}$").to_numpy()
    return matched, clean


def _gradcam_mass(cohort, n_images: int, home: Path) -> list[tuple[str, str, float, float]]:
    """(weights, detail, mean heat share inside the lesion, mean lesion area share, images, val AUROC) rows."""
    import cv2

    from melcore.colour import lesion_mask
    from melcore.explain import explain_image
    from melcore.images import load_image
    from melcore.training.api import fit
    from melcore.training.config import preset_config

    matched, clean = _clean_split(cohort)
    rng = np.random.default_rng(0)
    held = rng.choice(np.flatnonzero(clean), size=min(n_images, int(clean.sum()) // 3), replace=False)
    train = matched.copy()
    train[held] = False
    # Trained on the source's other images; the held-out images are scored and explained.
    train_cohort = cohort.subset(train)
    paths = cohort.table["image_path"].iloc[held].tolist()
    masks = []
    for path in paths:
        mask, _ = lesion_mask(load_image(path, 224))
        masks.append(mask)
    rows = []
    for weights in ("imagenet", "none"):
        config = preset_config("cpu-default", weights=weights, val_fraction=0.2)
        run = fit(config, train_cohort, run_dir=home / f"gradcam-{weights}")
        for detail in ("standard", "fine"):
            inside, area = [], []
            for path, mask in zip(paths, masks):
                _, heat = explain_image(run.run_dir, path, detail=detail)
                full = cv2.resize(mask.astype(np.uint8), heat.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
                total = float(heat.sum())
                if total > 0:
                    inside.append(float(heat[full].sum()) / total)
                    area.append(float(full.mean()))
            rows.append(
                (
                    weights,
                    detail,
                    float(np.mean(inside)),
                    float(np.mean(area)),
                    len(inside),
                    run.metrics.get("val_auroc"),
                )
            )
    return rows


def _warm_retrain(cohort, n: int, home: Path) -> tuple[float, float, dict]:
    from melcore import features
    from melcore.training.api import fit
    from melcore.training.config import preset_config

    if len(cohort) > n:
        keep = np.zeros(len(cohort), dtype=bool)
        keep[np.random.default_rng(0).choice(len(cohort), n, replace=False)] = True
        cohort = cohort.subset(keep)
    config = preset_config("cpu-default")
    started = time.perf_counter()
    fit(config, cohort, run_dir=home / "retrain-cold")
    cold = time.perf_counter() - started
    features.clear_extractors()  # as a fresh process: the backbone is built again
    started = time.perf_counter()
    warm = fit(config, cohort, run_dir=home / "retrain-warm")
    return cold, time.perf_counter() - started, warm.metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images for the throughput measurements")
    parser.add_argument("--retrain-n", type=int, default=1000)
    parser.add_argument("--gradcam", type=int, default=60, help="held-out clean images explained per model")
    parser.add_argument("--skip", nargs="*", default=(), choices=("speed", "retrain", "gradcam"))
    args = parser.parse_args(argv)
    if not (DERM / "labels.csv").is_file():
        print(f"no data at {DERM}", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="melreview-bench-transfer-"))
    os.environ["MELREVIEW_HOME"] = str(home)
    from melcore.cohort import load_cohort
    from melcore.images import load_images

    cohort = load_cohort(DERM / "labels.csv", DERM / "images", clinic_column="source")
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{date.today().isoformat()}."
    ]
    if "speed" not in args.skip:
        paths = cohort.table["image_path"].tolist()[: args.n]
        x224 = load_images(paths, 224).astype(np.float32)
        x256 = load_images(paths, 256).astype(np.float32)
        multi = _forward_rate("efficientnet-lite0", 224, "multi-level", x224)
        avg = _forward_rate("efficientnet-lite0", 224, "avg", x224)
        b3 = _forward_rate("efficientnet-b3", 256, "avg", x256)
        decode = _decode_ms()
        forward_min = ISIC2020_N / multi / 60
        decode_min = ISIC2020_N * decode / 1000 / 2 / 60  # two decode threads
        lines += [
            "",
            "| frozen backbone, forward pass | images/s | vs EfficientNet-B3 256 px |",
            "| --- | --- | --- |",
            f"| EfficientNet-B3, 256 px, avg pooling (baseline) | {b3:.1f} | 1.0x |",
            f"| EfficientNet-Lite0, 224 px, avg pooling | {avg:.1f} | {avg / b3:.1f}x |",
            f"| EfficientNet-Lite0, 224 px, multi-level pooling (cpu-default) | {multi:.1f} | {multi / b3:.1f}x |",
            "",
            f"Featurising all {ISIC2020_N:,} ISIC 2020 training images with cpu-default's backbone: forward "
            f"{forward_min:.1f} min; cold decode of the real 512x512 ISIC 2020 JPEGs {decode:.1f} ms/image "
            f"({decode_min:.1f} min on two threads, overlapped with the forward pass): about "
            f"**{max(forward_min, decode_min):.1f} min** (at most {forward_min + decode_min:.1f} min if nothing "
            "overlapped). The originals (up to 6000x4000) decode in the DCT domain at 1/8 scale; their "
            "entropy decoding adds about 40 ms each (see the decode benchmark).",
        ]
        print("\n".join(lines[-9:]), flush=True)
    if "retrain" not in args.skip:
        cold, warm, m = _warm_retrain(cohort, args.retrain_n, home)
        lines += [
            "",
            f"cpu-default on {m['n_train'] + m.get('n_select', 0) + m['n_val']:,} images: cold run {cold:.1f} s (features "
            f"computed and cached); **warm retrain {warm:.1f} s** (backbone rebuilt "
            f"{m['backbone_seconds']:.1f} s, features from the cache {m['feature_seconds']:.1f} s, "
            f"logistic head with its inner CV {m['head_seconds']:.1f} s, save {m['save_seconds']:.1f} s); "
            f"target <= 5 s: {'met' if warm <= 5 else 'NOT met'}.",
        ]
        print(lines[-1], flush=True)
    if "gradcam" not in args.skip:
        rows = _gradcam_mass(cohort, args.gradcam, home)
        lines += [
            "",
            "| weights | Grad-CAM detail | heat inside the lesion | lesion's share of the image | images "
            "| run's validation AUROC |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for weights, detail, inside, area, n, val in rows:
            what = "ImageNet (pretrained)" if weights == "imagenet" else "random (from scratch)"
            lines.append(
                f"| {what} | {detail} | {inside:.1%} | {area:.1%} | {n} | {val:.3f} |"
                if val is not None
                else f"| {what} | {detail} | {inside:.1%} | {area:.1%} | {n} | - |"
            )
        print("\n".join(lines[-len(rows) - 2 :]), flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
