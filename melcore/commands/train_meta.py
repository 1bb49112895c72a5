"""``python -m melcore train-meta --csv CSV --out RUNDIR``: the metadata / patient-context model.

Reads the lesion table with ``melcore.cohort.load_cohort`` (any format it knows; images are not
read), runs patient-grouped K-fold cross-validation of :class:`melcore.meta.model.MetaModel`, fits it on
all labelled images and writes RUNDIR: ``metrics.json`` (``oof_auroc``, fold AUROCs, n, features,
per-clinic AUROC), ``oof_predictions.csv`` (image_name, patient_id, clinic, target, prediction,
fold), ``config.json``, ``meta_model.json`` + ``meta_model_train.npz`` and ``train.log``.

With ``--image-scores`` (a CSV of out-of-fold image-model probabilities: image_name + prediction)
the model also gets the ugly-duckling features, and a cross-validated stacked fusion of image and
meta scores becomes the run's ``prediction`` (``fusion.json``; ``metrics.json`` then also holds
``meta_oof_auroc`` and a ``fusion`` block).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from melcore.cohort import load_cohort
from melcore.errors import ConfigError
from melcore.meta.features import FEATURE_SET_LABELS, FEATURE_SETS, read_embeddings, read_image_scores
from melcore.meta.jobs import train_meta_run
from melcore.metrics import format_auroc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, metavar="CSV", help="lesion table (ISIC 2020/2019, HAM10000, ...)")
    parser.add_argument(
        "--format",
        metavar="F",
        default=None,
        help="table format (isic2020, isic2019, ham10000, generic, ...); default: detected",
    )
    parser.add_argument(
        "--images", metavar="DIR", default=None, help="image folder (only recorded; the meta model reads no pixels)"
    )
    parser.add_argument(
        "--metadata",
        metavar="CSV",
        default=None,
        help="second table joined on image_name, e.g. the ISIC 2020 v2 ground truth with lesion_id",
    )
    parser.add_argument("--clinic-column", metavar="C", default=None, help="column naming the clinic / source")
    parser.add_argument("--folds", type=int, default=5, metavar="K", help="patient-grouped folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="fold seed (default 0)")
    parser.add_argument(
        "--features",
        dest="feature_set",
        default="context",
        choices=list(FEATURE_SETS),
        help="feature set: " + "; ".join(f"{name}: {text}" for name, text in FEATURE_SET_LABELS.items()),
    )
    parser.add_argument(
        "--image-scores",
        metavar="CSV",
        default=None,
        help="out-of-fold image-model scores (image_name + prediction) for ugly-duckling "
        "features and the stacked fusion",
    )
    parser.add_argument(
        "--embeddings",
        metavar="CSV",
        default=None,
        help="image embeddings (image_name + one column per dimension); needs --image-scores",
    )
    parser.add_argument("--out", required=True, metavar="RUNDIR", help="run directory to create")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


class _FoldBar:
    """Prints one line per finished fold on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.enabled:
            width = 20
            filled = int(width * done / max(total, 1))
            print(
                f"folds [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {time.monotonic() - self.start:6.1f}s",
                file=sys.stderr,
                flush=True,
            )


def run(args: argparse.Namespace) -> int:
    if args.embeddings and not args.image_scores:
        raise ConfigError(
            "--embeddings needs --image-scores (the fusion stacks image scores; embeddings add ugly-duckling distances)"
        )
    out = Path(args.out)
    if (out / "metrics.json").exists() or (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a run (config.json/metrics.json); choose a new --out")
    cohort = load_cohort(
        args.csv,
        args.images,
        format=args.format,
        metadata=args.metadata,
        clinic_column=args.clinic_column,
        check_images="none",
    )
    summary = cohort.summary()
    if not args.quiet:
        print(
            f"{args.csv}: {summary['n_images']} images, {summary['n_patients']} groups ({cohort.grouping}), "
            f"{summary['n_malignant']} malignant, {summary['n_unlabelled']} unlabelled",
            file=sys.stderr,
        )
        for warning in summary["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    image_scores = read_image_scores(args.image_scores) if args.image_scores else None
    embeddings = read_embeddings(args.embeddings) if args.embeddings else None
    config_extra = {
        "csv": str(Path(args.csv).resolve()),
        "format": cohort.format,
        "images": str(Path(args.images).resolve()) if args.images else None,
        "metadata": str(Path(args.metadata).resolve()) if args.metadata else None,
        "clinic_column": args.clinic_column,
        "grouping": cohort.grouping,
        "image_scores_csv": str(Path(args.image_scores).resolve()) if args.image_scores else None,
        "embeddings_csv": str(Path(args.embeddings).resolve()) if args.embeddings else None,
    }
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    metrics = train_meta_run(
        cohort,
        out,
        n_folds=args.folds,
        seed=args.seed,
        feature_set=args.feature_set,
        image_scores=image_scores,
        embeddings=embeddings,
        progress=_FoldBar(not args.quiet),
        log=log,
        config_extra=config_extra,
    )
    line = (
        f"OOF AUROC {format_auroc(metrics['oof_auroc'])} ({metrics['model']}, {metrics['n']} images, "
        f"{args.folds} patient-grouped folds)"
    )
    fusion = metrics.get("fusion")
    if fusion and metrics["model"] != "meta":
        line += f"; meta alone {format_auroc(metrics['meta_oof_auroc'])}"
    elif fusion:
        fused = fusion["oof_auroc"]
        line += f"; fused {format_auroc(fused)} on the {fusion['n']} images with an image score"
    print(line)
    for warning in metrics.get("missingness_warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"run: {out}")
    return 0
