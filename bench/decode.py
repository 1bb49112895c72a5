"""Decode benchmark: 12 MP JPEGs to a 256 px working size.

    python bench/decode.py [--images 8] [--width 4000] [--height 3000] [--size 256] [--rounds 3]

Writes synthetic dermoscopy-like photos (skin with multi-scale texture, a lesion,
hair, spatially correlated sensor noise; JPEG quality 90, about 1.5-2 bits per
pixel like camera photos) to a temporary folder, then times per image:

  (a) naive:  Pillow full decode + convert("RGB") + Lanczos resize (what most code does)
  (b) cold:   melcore.images.load_image with an empty ImageCache (draft decode + resize + cache write)
  (c) cached: the same call again (the .npy entry is read back)

Each figure is, per image, the best of its repeats (as ``timeit`` advises: slower
repeats measure other processes, not this code; the machine is shared), averaged
over the images; medians are printed too.
It also prints the mean absolute difference between (b) and (a), in 0..255
levels, to show the fast path gives the same picture. The last line holds
the two speed-ups against (a) measured in this run.
Goals: cold >= 10x, cached >= 50x.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melcore.images import ImageCache, load_image  # noqa: E402


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A dermoscopy-like RGB photo of width x height built mostly with Pillow operations."""
    tone = np.array([225, 180, 150]) - rng.uniform(0, 50) * np.array([1.0, 1.2, 1.3])
    coarse = np.clip(tone + rng.normal(0, 10, (12, 16, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)

    # Mid-scale mottling and skin texture (several octaves of upsampled noise).
    arr = np.asarray(img).astype(np.int16)
    for cells, amp in ((width // 40, 8), (width // 8, 5)):
        grain = rng.integers(128 - amp, 128 + amp + 1, (cells * height // width, cells), dtype=np.uint8)
        up = np.asarray(Image.fromarray(grain).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
        arr += (up - 128)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    del arr

    # Lesion: irregular polygon, blurred edge, brown colour field.
    cx, cy = width / 2 + rng.normal(0, width / 20), height / 2 + rng.normal(0, height / 20)
    radius = rng.uniform(0.15, 0.3) * min(width, height)
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    radii = radius * (1 + 0.15 * np.cumsum(rng.normal(0, 0.15, angles.size)) % 0.3)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=235)
    mask = (
        mask.resize((width // 8, height // 8), Image.Resampling.BILINEAR)
        .filter(ImageFilter.GaussianBlur(3))
        .resize((width, height), Image.Resampling.BICUBIC)
    )
    pigment = np.clip(np.array([120, 75, 50]) + rng.normal(0, 25, (6, 8, 3)), 0, 255).astype(np.uint8)
    lesion = Image.fromarray(pigment).resize((width, height), Image.Resampling.BICUBIC)
    img = Image.composite(lesion, img, mask)

    # Hair.
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.9) * width
        draw.line(
            [(x0, y0), (x0 + np.cos(ang) * length, y0 + np.sin(ang) * length)],
            fill=(40, 30, 25),
            width=int(rng.integers(5, 12)),
        )

    # Sensor noise, correlated over ~2 px as after demosaicing.
    noise = rng.integers(128 - 9, 128 + 10, (height // 2, width // 2, 3), dtype=np.uint8)
    noise = np.asarray(Image.fromarray(noise).resize((width, height), Image.Resampling.BILINEAR))
    arr = np.asarray(img).astype(np.int16) + noise.astype(np.int16) - 128
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def naive(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="melcore-bench-decode-"))
    try:
        rng = np.random.default_rng(0)
        paths = []
        print(
            f"writing {args.images} synthetic {args.width}x{args.height} JPEGs (quality {args.quality}) to {workdir}",
            flush=True,
        )
        for i in range(args.images):
            path = workdir / f"photo_{i:02d}.jpg"
            synthetic_photo(rng, args.width, args.height).save(path, quality=args.quality)
            paths.append(path)
        sizes = [p.stat().st_size for p in paths]
        bpp = 8 * statistics.mean(sizes) / (args.width * args.height)
        print(f"file size: mean {statistics.mean(sizes) / 1e6:.2f} MB ({bpp:.2f} bits/pixel)")

        n = len(paths)
        naive_t = np.zeros((args.rounds, n))
        cold_t = np.zeros((args.rounds, n))
        cached_t = np.zeros((args.rounds, 3, n))
        diffs = []
        for r in range(args.rounds):
            cache = ImageCache(workdir / f"cache-{r}")  # empty: every first load is cold
            for i, path in enumerate(paths):
                naive_t[r, i], ref = timed(lambda: naive(path, args.size))
                cold_t[r, i], cold = timed(lambda: load_image(path, args.size, cache=cache))
                diffs.append(float(np.abs(cold.astype(np.int16) - ref.astype(np.int16)).mean()))
            for k in range(3):
                for i, path in enumerate(paths):
                    cached_t[r, k, i], _ = timed(lambda: load_image(path, args.size, cache=cache))
            assert cache.misses == n and cache.hits == 3 * n, cache

        def best_of(t):  # per image, the fastest of its repeats; then the mean over images
            return 1000 * float(t.reshape(-1, n).min(axis=0).mean())

        def median(t):
            return 1000 * float(np.median(t))

        a, b, c = best_of(naive_t), best_of(cold_t), best_of(cached_t)
        print(
            f"to {args.size}x{args.size}, ms per image: best of {args.rounds} rounds (cached: "
            f"{3 * args.rounds} reads) averaged over the {n} images; median of all timings in brackets"
        )
        print(f"  (a) naive PIL full decode + resize : {a:8.2f}   [{median(naive_t):.2f}]")
        print(f"  (b) melcore cold (draft + cache)   : {b:8.2f}   [{median(cold_t):.2f}]")
        print(f"  (c) melcore from the cache         : {c:8.3f}   [{median(cached_t):.3f}]")
        print(
            f"median-based speed-ups: cold {median(naive_t) / median(cold_t):.1f}x, "
            f"cached {median(naive_t) / median(cached_t):.1f}x"
        )
        print(f"mean |cold - naive| = {statistics.mean(diffs):.2f} levels of 255 (max per image {max(diffs):.2f})")
        print(f"cold_speedup={a / b:.1f}x cached_speedup={a / c:.1f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
