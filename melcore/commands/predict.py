"""``python -m melcore predict``: score images with a trained run (Kaggle submission format).

Writes ``image_name,target`` (target = melanoma probability), one row per image: every
image file of ``--images``, or, with ``--csv``, every row of that table (any cohort
format; images looked up in ``--images``).

Bad images (missing, corrupt, not an image): by default each is reported on stderr
(``skipped NAME: reason``), the other images are still scored and written, and the
exit status is 1 so scripts notice the output is incomplete. ``--strict`` stops at the
first bad image instead (exit status 2, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from melcore.cohort import FORMATS, load_cohort
from melcore.commands._progress import StderrBar
from melcore.errors import MelcoreError
from melcore.predict import load_run_model, predict_cohort, predict_folder, write_submission

_LIST_SKIPPED = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="RUNDIR",
        help="run directory written by 'python -m melcore train' (or its model.keras)",
    )
    parser.add_argument("--images", required=True, metavar="DIR", help="folder with the image files")
    parser.add_argument("--csv", help="score the rows of this table (default: every image file in --images)")
    parser.add_argument("--format", choices=FORMATS, help="format of --csv (default: detected)")
    parser.add_argument(
        "--tta", action="store_true", help="test-time augmentation: mean over the 8 flips/transposes (8x slower)"
    )
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model call (default 32)")
    parser.add_argument("--recursive", action="store_true", help="also score images in sub-folders of --images")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first missing or unreadable image (default: skip and report it)",
    )
    parser.add_argument("--out", required=True, metavar="PREDS.csv", help="output CSV: image_name,target")


def run(args: argparse.Namespace) -> int:
    on_error = "raise" if args.strict else "skip"
    model = load_run_model(args.model)
    bar = StderrBar("scoring" + (" (TTA x8)" if args.tta else ""))
    try:
        if args.csv:
            cohort = load_cohort(args.csv, args.images, format=args.format)
            result = predict_cohort(
                model, cohort, tta=args.tta, batch_size=args.batch_size, progress=bar, on_error=on_error
            )
        else:
            result = predict_folder(
                model,
                args.images,
                tta=args.tta,
                batch_size=args.batch_size,
                progress=bar,
                on_error=on_error,
                recursive=args.recursive,
            )
    finally:
        bar.close()
    skipped = result.attrs.get("skipped", [])
    if len(result) == 0:
        raise MelcoreError(
            f"no image could be scored ({len(skipped)} skipped, e.g. {skipped[0][0]}: {skipped[0][1]})"
            if skipped
            else "no images to score"
        )
    path = write_submission(result, Path(args.out))
    for name, reason in skipped[:_LIST_SKIPPED]:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if len(skipped) > _LIST_SKIPPED:
        print(f"... and {len(skipped) - _LIST_SKIPPED} more skipped", file=sys.stderr)
    print(f"wrote {len(result):,} predictions to {path}" + (" (TTA)" if args.tta else ""))
    if skipped:
        print(f"warning: {len(skipped):,} image(s) skipped; the output is incomplete", file=sys.stderr)
        return 1
    return 0
