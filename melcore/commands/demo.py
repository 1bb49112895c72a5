"""``python -m melcore demo [--out DIR] [--patients N] [--seed S] [--register [--name NAME]]``: the demo cohort.

Without ``--out`` the default demo under MELREVIEW_HOME is made (once) and its folder printed.
``DIR`` is an ISIC-layout root (``labels.csv`` and ``jpeg/train/``): ``--images DIR`` works for
``inspect``, ``train`` and ``datasets add``. ``--register`` registers the cohort written as a
dataset (default name ``demo``) the way the app registers it on a fresh install
(:func:`melcore.datasets.register_demo`).
"""

from __future__ import annotations

import argparse
import sys
import time

from melcore import demo
from melcore.datasets import DEMO_NAME, register_demo
from melcore.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder to write labels.csv and jpeg/train/ into (empty or an earlier demo); "
        "default: the shared demo under MELREVIEW_HOME, made once",
    )
    parser.add_argument(
        "--patients",
        type=int,
        default=demo.DEFAULT_PATIENTS,
        metavar="N",
        help=f"number of patients, 1-8 lesions each (default {demo.DEFAULT_PATIENTS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=demo.DEFAULT_SEED,
        metavar="S",
        help=f"random seed; the same seed gives the same files (default {demo.DEFAULT_SEED})",
    )
    parser.add_argument(
        "--register", action="store_true", help="also register it as a dataset, as the app does on a fresh install"
    )
    parser.add_argument("--name", default=None, metavar="NAME", help="dataset name for --register (default demo)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class _Bar:
    """A one-line progress bar on stderr (only when stderr is a terminal, or always with force)."""

    def __init__(self, label: str, enabled: bool):
        self.label = label
        self.enabled = enabled
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {now - self.start:5.1f}s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    bar = _Bar("demo images", enabled=not args.quiet and sys.stderr.isatty())
    if args.out:
        out = demo.make_demo_cohort(args.out, n_patients=args.patients, seed=args.seed, progress=bar)
    else:
        out = demo.ensure_demo(n_patients=args.patients, seed=args.seed, progress=bar)
    import json

    info = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    clinics = ", ".join(f"{name} {count}" for name, count in sorted(info["clinics"].items()))
    print(
        f"{out}: {info['n_images']} images of {info['n_lesions']} lesions from {info['n_patients']} patients, "
        f"{info['n_malignant_images']} malignant ({100 * info['malignant_rate']:.1f}%); clinics: {clinics}"
    )
    print(f"labels: {out / 'labels.csv'}  images: {out / 'jpeg' / 'train'} (or give the root {out})")
    if args.register:
        _register(out, args.name or DEMO_NAME)
    elif args.name:
        print("note: --name goes with --register; nothing registered", file=sys.stderr)
    return 0


def _register(folder, name: str) -> None:
    result = register_demo(Store(), folder, name)
    dataset = result.dataset
    verb = "registered" if result.created else "already registered"
    print(f"dataset: {dataset['name']!r} (#{dataset['id']}) {verb}")
    for warning in result.warnings if result.created else ():
        print(f"warning: {warning}", file=sys.stderr)
