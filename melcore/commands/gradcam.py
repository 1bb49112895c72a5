"""``python -m melcore gradcam``: write a Grad-CAM overlay for one image.

    python -m melcore gradcam --model RUNDIR --image lesion.jpg --out overlay.png
    python -m melcore gradcam --model model.keras --image lesion.jpg --method gradcam++ --opacity 0.5 \\
        --out overlay.png --heatmap-out heat.npy

``--model`` is a run directory holding ``model.keras`` or a ``.keras`` file. The
overlay has the model's input size. Heatmaps are cached under
``$MELREVIEW_HOME/cache/gradcam``, so asking again (another opacity or colour map)
is instant. A missing model or a bad image prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from melcore.errors import MelcoreError
from melcore.explain import COLORMAPS, METHODS, explain_image

_IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_STAGES = ("loading the model", "preparing the explainer", "computing the heatmap", "done")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="RUNDIR", help="run directory containing model.keras, or a .keras file"
    )
    parser.add_argument("--image", required=True, help="the lesion image (JPEG, PNG, ...)")
    parser.add_argument("--out", required=True, help="overlay to write (.png, .jpg)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="gradcam",
        help="gradcam (default), gradcam++ or scorecam (slow: one forward pass per channel)",
    )
    parser.add_argument("--opacity", type=float, default=0.4, help="weight of the colour map, 0..1 (default 0.4)")
    parser.add_argument("--colormap", choices=COLORMAPS, default="jet", help="colour map (default jet)")
    parser.add_argument(
        "--layer",
        help="layer to explain, e.g. top_conv (default: the last convolutional feature map, found automatically)",
    )
    parser.add_argument("--heatmap-out", help="also save the heatmap (float32 HxW in [0, 1]) as .npy")
    parser.add_argument("--no-cache", action="store_true", help="recompute and do not write the heatmap cache")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


class _Stages:
    """Prints the current stage on stderr (a terminal line that is rewritten)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:  # a cache hit is instant: nothing to show
            return
        stage = _STAGES[min(done, len(_STAGES) - 1)]
        sys.stderr.write(f"\rgradcam [{done}/{total}] {stage:<26}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    image_format = _IMAGE_SUFFIXES.get(out.suffix.lower())
    if image_format is None:
        raise MelcoreError(f"--out {args.out}: use a .png or .jpg file name")
    if not 0.0 <= args.opacity <= 1.0:
        raise MelcoreError(f"--opacity {args.opacity}: must be between 0 and 1")
    if args.heatmap_out and not args.heatmap_out.endswith(".npy"):
        raise MelcoreError(f"--heatmap-out {args.heatmap_out}: use a .npy file name")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import numpy as np
    from PIL import Image

    picture, heat = explain_image(
        args.model,
        args.image,
        method=args.method,
        opacity=args.opacity,
        colormap=args.colormap,
        layer=args.layer,
        use_cache=not args.no_cache,
        progress=_Stages(not args.quiet and sys.stderr.isatty()),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(picture).save(out, format=image_format)
        if args.heatmap_out:
            np.save(args.heatmap_out, heat.astype(np.float32))
    except OSError as exc:
        raise MelcoreError(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    height, width = heat.shape
    extra = f" and {args.heatmap_out}" if args.heatmap_out else ""
    print(f"wrote {out}{extra} ({args.method}, {width}x{height}, opacity {args.opacity:g})")
    return 0
