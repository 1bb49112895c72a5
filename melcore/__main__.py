"""Command line: ``python -m melcore COMMAND ...``.

Each command lives in ``melcore/commands/<name>.py`` with ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their command runs, so
``--help`` and light commands never load TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from melcore.errors import MelcoreError

COMMANDS = {
    "inspect": ("inspect", "Read a lesion table and report counts, clinics and problems."),
    "demo": ("demo", "Write the synthetic ISIC 2020-style demo cohort (--register: as dataset 'demo')."),
    "datasets": ("datasets", "List, register, show and remove datasets (the Home page's checks and warnings)."),
    "train": ("train", "Train a model on a cohort into a run directory."),
    "predict": ("predict", "Score images with a trained run (Kaggle submission format)."),
    "evaluate": ("evaluate", "AUROC with CI, operating points and threshold metrics for predictions."),
    "train-meta": ("train_meta", "Train the metadata / patient-context model with out-of-fold predictions."),
    "cross-clinic": ("cross_clinic", "Train on each clinic and score every other clinic."),
    "jobs": ("jobs", "Submit, list and cancel background training jobs."),
    "runs": (
        "runs",
        "List recorded runs; archive or restore them (nothing is deleted); export or import one as a zip.",
    ),
    "gradcam": ("gradcam", "Write a Grad-CAM overlay for one image."),
    "cache": ("cache", "Report the size of the disk caches and prune them."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(f"melcore.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"python -m melcore {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except MelcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
