"""``python -m melcore cross-clinic``: train on each clinic, score every other clinic.

Example::

    python -m melcore cross-clinic --csv train.csv --images jpeg/train --clinic-column attribution \\
        --model efficientnet-b0 --image-size 224 --weights imagenet --out runs/cross \\
        --register-dataset isic2020

Training options are those of ``train`` (``--clinic`` excepted). Without ``--mode`` the
mode is ``fast-head`` on a CPU (cached backbone features + a head: seconds per
clinic once the features exist) and ``full`` when a GPU is visible. With
``--register-dataset NAME`` the run is stored (the dataset is registered under NAME
when it is new) so the Compare page shows the heatmap. Prints the AUROC matrix
(rows: trained on, columns: scored on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from melcore.commands.train import (
    TrainProgressBar,
    _check_out,
    _read_config_option,
    add_data_options,
    add_output_options,
    add_train_options,
    config_from_args,
    load_cohort_from_args,
    train_with_progress,
)
from melcore.errors import ConfigError
from melcore.formatting import format_number
from melcore.store import Store
from melcore.training.config import validate
from melcore.training.crossval import cross_clinic, default_cross_clinic_mode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = add_data_options(parser)
    data.add_argument("--clinics", metavar="A,B", help="only these clinics (comma separated; default all)")
    out = add_output_options(parser, "$MELREVIEW_HOME/runs/<time>-cross-clinic-<model>-all")
    out.add_argument(
        "--register-dataset",
        metavar="NAME",
        help="store the run under this dataset (registered from --csv/--images when new)",
    )
    add_train_options(parser)


class _ClinicBar(TrainProgressBar):
    """The train progress bar, prefixed with the clinic being trained on."""

    def __init__(self):
        super().__init__()
        self.clinic = None

    def __call__(self, epoch, batch, loss, metrics, eta) -> None:
        metrics = metrics or {}
        clinic = metrics.get("clinic")
        if clinic != self.clinic and clinic is not None:
            self.close()
            self.stream.write(
                f"clinic {metrics.get('clinic_index', 0) + 1}/{metrics.get('n_clinics', '?')}: {clinic}\n"
            )
            self.stream.flush()
            self.clinic = clinic
        super().__call__(epoch, batch, loss, metrics, eta)


def _register(name: str, args, cohort, run) -> int:
    store = Store()
    try:
        dataset = store.find_dataset(name)
        if dataset is None:
            dataset_id = store.add_dataset(
                name,
                Path(args.csv).resolve(),
                Path(args.images).resolve() if args.images else cohort.images_dir,
                format=cohort.format,
                clinic_column=args.clinic_column,
                summary=cohort.summary(),
            )
        else:
            dataset_id = dataset["id"]
        m = run.metrics
        weights = m.get("weights") or {}
        return store.add_run(
            f"cross-clinic · {run.config.model} · {Path(run.run_dir).name}",
            run.run_dir,
            dataset_id=dataset_id,
            model=run.config.model,
            kind="cross-clinic",
            config=run.config.to_dict(),
            metrics=m,
            from_scratch=bool(weights.get("from_scratch")),
            notes=weights.get("note"),
        )
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.clinic is not None:
        raise ConfigError("--clinic does not apply: cross-clinic trains on every clinic (use --clinics to choose)")
    given_mode = getattr(args, "mode", None) is not None or (
        bool(args.config) and "mode" in _read_config_option(args.config)
    )
    if not given_mode:
        config.mode = default_cross_clinic_mode()
    config = validate(config)
    out = Path(args.out).expanduser() if args.out else None
    _check_out(out, args.overwrite)
    cohort = load_cohort_from_args(args)
    clinics = [c.strip() for c in args.clinics.split(",") if c.strip()] if args.clinics else None
    result = train_with_progress(
        cross_clinic, config, cohort, quiet=args.quiet, bar_class=_ClinicBar, run_dir=out, clinics=clinics
    )
    m = result.metrics
    if result.cancelled:
        print(f"cancelled; partial run in {result.run_dir}", file=sys.stderr)
        return 130
    names = m["clinics"]
    width = max(12, *(len(c) for c in names)) + 2
    print(f"run          {result.run_dir}")
    print(f"model        {config.model} at {config.image_size} px, mode {config.mode}")
    print("AUROC        rows: trained on, columns: scored on (diagonal: validation within the clinic)")
    print(" " * width + "".join(c.rjust(width) for c in names))
    for i, row in enumerate(m["matrix"]):
        print(names[i].ljust(width) + "".join(format_number(v).rjust(width) for v in row))
    for clinic, error in (m.get("errors") or {}).items():
        print(f"warning: not trained on {clinic}: {error}", file=sys.stderr)
    if args.register_dataset:
        run_id = _register(args.register_dataset, args, cohort, result)
        print(f"stored       run #{run_id} under dataset {args.register_dataset!r}")
    return 0
