"""``python -m melcore train``: train one model on a cohort into a run directory.

Example::

    python -m melcore train --csv train.csv --images jpeg/train --model efficientnet-b3 \\
        --image-size 300 --epochs 3 --fine-tune-epochs 5 --weights imagenet --fallback-to-scratch \\
        --clinic-column attribution --clinic "clinic-north" --out runs/b3-north

Options map one to one onto :class:`melcore.training.config.TrainConfig` fields; ``--config`` reads
a JSON config (a file, or the JSON text itself) and the options given on the command
line override its values. The config is checked before the table is read, and the data
(clinic, classes, split) before training starts: bad input exits with status 2 and one
line. A progress line on stderr is updated in place (epoch, batch, loss, validation AUROC,
ETA); Ctrl-C stops training within one batch (exit status 130, the partial run is kept
and marked cancelled). On success the run directory and the validation results are
printed on stdout.

Across several processes or machines: ``--worker-hosts host1:port,host2:port --worker-index I``
on every worker (the same command and data, its own index) trains one model under
TensorFlow's MultiWorkerMirroredStrategy (:mod:`melcore.distributed`); worker 0 writes the
run directory and prints the results, the others train into a scratch folder they remove.

``add_train_options(parser)`` and ``config_from_args(args)`` are reused by ``jobs submit``;
``cross-clinic`` also reuses the data/output options and :func:`train_with_progress`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from melcore.cohort import FORMATS, load_cohort
from melcore.distributed import Placement, check_distributable, multi_worker_strategy, worker_run_dir
from melcore.errors import ConfigError
from melcore.formatting import format_duration, format_number
from melcore.training.config import TrainConfig, validate
from melcore.training.recipes import DEFAULT_PRESET, preset_values

# option dest -> TrainConfig field (options whose dest differs from the field, or that
# are flags, are listed here explicitly; see add_train_options).
_FIELDS = {
    "model": "model",
    "image_size": "image_size",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "optimizer": "optimizer",
    "schedule": "schedule",
    "balance": "balance",
    "augment": "augment",
    "clinic": "clinic",
    "val_fraction": "val_fraction",
    "select_fraction": "select_fraction",
    "fold": "fold",
    "n_folds": "n_folds",
    "seed": "seed",
    "weights": "weights",
    "fallback_to_scratch": "fallback_to_scratch",
    "patience": "early_stopping_patience",
    "fine_tune_epochs": "fine_tune_epochs",
    "unfreeze_blocks": "unfreeze_blocks",
    "tta": "tta",
    "workers": "workers",
    "mode": "mode",
    "cache_images": "cache_images",
    "deterministic": "deterministic",
    "pooling": "pooling",
    "head_fit": "head_fit",
}


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The training-config options (everything that goes into a TrainConfig), no data options.

    Every default is None ("not given"), so :func:`config_from_args` can tell a given option
    from the config file's value or the model spec's default.
    """
    group = parser.add_argument_group("training config (defaults: the model's recommended values)")
    group.add_argument(
        "--config", metavar="JSON", help="a training config: a JSON file or JSON text; options given here override it"
    )
    group.add_argument(
        "--preset",
        metavar="NAME",
        help="start from a named recipe (cpu-default, the default when no --model is given: ImageNet "
        "EfficientNet-Lite0 transfer learning; colour-svm; see melcore.training.recipes); "
        "--config and the options given override its values",
    )
    group.add_argument(
        "--model",
        metavar="NAME",
        help="registry name: basic-cnn, cnn-bn, resnet50, efficientnet-b0..b7, "
        "efficientnet-b0-ns..b7-ns, efficientnet-lite0..lite4",
    )
    group.add_argument("--image-size", type=int, metavar="N", help="square image side in pixels")
    group.add_argument(
        "--epochs",
        type=int,
        metavar="E",
        help="epochs (of the head stage when pretrained weights are loaded); default 10",
    )
    group.add_argument(
        "--fine-tune-epochs",
        type=int,
        metavar="E",
        help="epochs with the top blocks unfrozen after the head stage (default 0)",
    )
    group.add_argument(
        "--unfreeze-blocks", type=int, metavar="K", help="block groups unfrozen for fine-tuning (default: the model's)"
    )
    group.add_argument("--batch-size", type=int, metavar="N")
    group.add_argument("--lr", type=float, metavar="X", help="initial learning rate")
    group.add_argument("--optimizer", metavar="NAME", help="sgd, adam or adamw")
    group.add_argument("--schedule", metavar="NAME", help="learning-rate schedule: constant, exponential, cosine")
    group.add_argument("--balance", metavar="B", help="none, oversample (balanced batches; default) or class-weight")
    group.add_argument("--augment", metavar="A", help="augmentation preset: none, basic, isic-strong")
    group.add_argument("--clinic", metavar="X", help="train on this clinic's images only")
    group.add_argument(
        "--val-fraction", type=float, metavar="F", help="share of patients held out for validation (default 0.2)"
    )
    group.add_argument(
        "--select-fraction",
        type=float,
        metavar="F",
        help="share of the training patients held out to choose the best epoch and stop early "
        "(default 0.2); the validation images never choose anything",
    )
    group.add_argument(
        "--fold",
        type=int,
        metavar="I",
        help="validate on patient-grouped fold I (0-based) of --n-folds instead of --val-fraction",
    )
    group.add_argument("--n-folds", type=int, metavar="K", help="number of folds for --fold (default 5)")
    group.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="train all K patient-grouped folds (sub-runs fold-0..K-1) and write out-of-fold "
        "predictions for every image (oof_predictions.csv)",
    )
    group.add_argument("--seed", type=int, metavar="S", help="seed of split, weights, order and augmentation")
    group.add_argument("--weights", metavar="W", help="none, imagenet or the path of a weights file")
    group.add_argument(
        "--fallback-to-scratch",
        action="store_true",
        default=None,
        help="train from scratch (and record it) when ImageNet weights cannot be downloaded",
    )
    group.add_argument(
        "--patience", type=int, metavar="N", help="early stopping: epochs without a better validation AUROC (default 3)"
    )
    group.add_argument(
        "--no-early-stopping",
        action="store_true",
        default=None,
        help="train every epoch (the best epoch is still restored)",
    )
    group.add_argument(
        "--tta",
        action="store_true",
        default=None,
        help="score the final validation predictions with the 8 flips/transposes",
    )
    group.add_argument("--workers", type=int, metavar="N", help="image-loading threads")
    group.add_argument("--mode", metavar="M", help="full (default) or fast-head")
    group.add_argument("--pooling", metavar="P", help="avg (default) or multi-level: how feature maps are pooled")
    group.add_argument(
        "--head-fit",
        metavar="H",
        help="fast-head mode: gradient (default; epochs) or logistic-cv (L2 logistic head, C by "
        "patient-grouped inner cross-validation)",
    )
    group.add_argument(
        "--no-cache",
        dest="cache_images",
        action="store_false",
        default=None,
        help="do not keep resized images in the on-disk cache",
    )
    group.add_argument(
        "--nondeterministic",
        dest="deterministic",
        action="store_false",
        default=None,
        help="allow non-deterministic TensorFlow ops (faster on some GPUs)",
    )


def _read_config_option(value: str) -> dict:
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {value}: no such file (give a JSON file or JSON text)")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config must hold a JSON object with TrainConfig keys")
    return data


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of the parsed options: ``--config`` values, overridden by the options given.

    Not validated here (call :func:`melcore.training.config.validate`); unknown config keys and a
    missing model raise ConfigError.
    """
    data = _read_config_option(args.config) if getattr(args, "config", None) else {}
    if getattr(args, "preset", None) is not None:
        data = {**preset_values(args.preset), **data}  # precedence: preset < --config < options
    for dest, name in _FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            data[name] = value
    if getattr(args, "no_early_stopping", None):
        data["early_stopping_patience"] = None
    if not data.get("model"):  # nothing names a model: the default recipe (pretrained EfficientNet-Lite0)
        data = {**preset_values(DEFAULT_PRESET), **data}
    return TrainConfig.from_dict(data)


def add_data_options(parser: argparse.ArgumentParser):
    """The cohort options (--csv, --images, --format, --clinic-column) in a "data" group; returns the group.

    :func:`load_cohort_from_args` reads the cohort they name.
    """
    data = parser.add_argument_group("data")
    data.add_argument("--csv", required=True, help="the label table (or, with --format folders, the folder)")
    data.add_argument(
        "--images",
        help="folder with the image files, or an ISIC-layout root holding jpeg/train/ or "
        "train/ (default: looked up beside the CSV)",
    )
    data.add_argument("--format", choices=FORMATS, help="table format (default: detected from the header)")
    data.add_argument("--clinic-column", metavar="C", help="column holding the clinic (e.g. attribution)")
    return data


def load_cohort_from_args(args: argparse.Namespace):
    """The cohort named by the :func:`add_data_options` options."""
    cohort = load_cohort(args.csv, args.images, format=args.format, clinic_column=args.clinic_column)
    for note in cohort.report.notes:  # e.g. the image folder used inside an ISIC-layout root
        print(f"note: {note}", file=sys.stderr)
    return cohort


def add_output_options(parser: argparse.ArgumentParser, default_out: str):
    """--out (its help naming the default ``default_out``), --overwrite and --quiet; returns the group."""
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="RUNDIR", help=f"run directory (default: {default_out})")
    out.add_argument("--overwrite", action="store_true", help="replace a finished run already in --out")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    return out


def add_placement_options(parser: argparse.ArgumentParser, index: bool = True):
    """--worker-hosts and (with ``index``) --worker-index, training across processes or machines; returns the group.

    :func:`placement_from_args` reads them.
    """
    group = parser.add_argument_group("several machines (MultiWorkerMirroredStrategy)")
    if not index:
        group.add_argument(
            "--worker-hosts",
            metavar="HOST:PORT,...",
            help="queue one train job per address: a worker process on each address's machine "
            "claims its job and they train one model together; worker 0's job records the run",
        )
        return group
    group.add_argument(
        "--worker-hosts",
        metavar="HOST:PORT,...",
        help="train one model across these worker processes (one per machine): every worker runs "
        "the same command with its own --worker-index and a free port of its machine; "
        "worker 0 writes the run (--workers is the image-loading threads)",
    )
    group.add_argument(
        "--worker-index",
        type=int,
        metavar="I",
        help="this process's position in --worker-hosts (0..N-1; 0 is the chief)",
    )
    return group


def placement_from_args(args: argparse.Namespace):
    """The :class:`melcore.distributed.Placement` of ``--worker-hosts`` / ``--worker-index``, or None."""
    workers, index = getattr(args, "worker_hosts", None), getattr(args, "worker_index", None)
    if workers is None:
        if index is not None:
            raise ConfigError("--worker-index goes with --worker-hosts HOST:PORT,HOST:PORT")
        return None
    if index is None:
        raise ConfigError("--worker-hosts needs --worker-index: this process's position in the list (0 is the chief)")
    return Placement.parse(workers, index)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_options(parser)
    add_output_options(parser, "$MELREVIEW_HOME/runs/<time>-<model>-<clinic>")
    add_train_options(parser)
    add_placement_options(parser)


class TrainProgressBar:
    """The ``progress`` callback of :func:`melcore.training.api.fit` drawn on stderr.

    On a terminal one line is rewritten in place (at most 10 times a second); each epoch
    end leaves a summary line. Elsewhere (logs, pipes) only the epoch summaries are written.
    """

    def __init__(self, stream=None, interactive: bool | None = None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.last_select_auroc = None
        self._last_draw = 0.0
        self._width = 0

    def _draw(self, text: str, final: bool = False) -> None:
        if self.interactive:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, epoch, batch, loss, metrics, eta) -> None:
        metrics = metrics or {}
        stage = metrics.get("stage", "train")
        epochs = metrics.get("epochs", "?")
        if metrics.get("end_of_epoch"):
            self.last_select_auroc = metrics.get("select_auroc")
            best = metrics.get("best_select_auroc")
            self._draw(
                f"epoch {epoch}/{epochs} [{stage}] train loss {format_number(metrics.get('train_loss'))}  "
                f"selection loss {format_number(metrics.get('select_loss'))}  "
                f"selection AUROC {format_number(self.last_select_auroc)}  "
                f"(best {format_number(best)} at epoch {metrics.get('best_epoch')})  ETA {format_duration(eta)}",
                final=True,
            )
            return
        if not self.interactive:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        if stage == "load":
            text = f"decoding images {metrics.get('done', 0):,}/{metrics.get('total', 0):,}"
        elif stage == "validate":
            text = (
                f"epoch {epoch}/{epochs} validating {metrics.get('val_batch', 0)}/{metrics.get('val_steps', 0)}"
                f"  ETA {format_duration(eta)}"
            )
        else:
            steps = metrics.get("steps", 0) or 1
            width = 20
            filled = int(width * min(batch, steps) / steps)
            text = (
                f"epoch {epoch}/{epochs} [{stage}] [{'#' * filled}{'.' * (width - filled)}] {batch}/{steps}  "
                f"loss {format_number(loss)}  selection AUROC {format_number(self.last_select_auroc, '.3f')}  "
                f"ETA {format_duration(eta)}"
            )
        self._draw(text)

    def close(self) -> None:
        if self.interactive and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


class _Interrupt:
    """Ctrl-C (SIGINT) asks training to stop; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this batch (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def __call__(self) -> bool:
        return self.requested


def _check_out(path: Path | None, overwrite: bool) -> None:
    if path is None or not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a folder")
    if (path / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"--out {path} already holds a finished run; choose a new folder or pass --overwrite")


def train_with_progress(train, *args, quiet: bool = False, bar_class=None, **kwargs):
    """``train(*args, progress=bar, should_stop=ctrl_c, **kwargs)`` with a stderr progress bar and Ctrl-C.

    ``train`` is :func:`melcore.training.api.fit` or one of its kin (``fit_folds``, ``cross_clinic``);
    the bar (``bar_class()``, default :class:`TrainProgressBar`; none when ``quiet``) is closed
    however training ends. Returns what ``train`` returns.
    """
    bar = None if quiet else (bar_class or TrainProgressBar)()
    with _Interrupt() as interrupt:
        try:
            return train(*args, progress=bar, should_stop=interrupt, **kwargs)
        finally:
            if bar is not None:
                bar.close()


def run(args: argparse.Namespace) -> int:
    config = validate(config_from_args(args))  # bad names and sizes fail before anything is read
    out = Path(args.out).expanduser() if args.out else None
    _check_out(out, args.overwrite)
    folds = getattr(args, "folds", None)
    if folds is not None and folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if folds is not None and args.fold is not None:
        raise ConfigError("--folds trains every fold; do not combine it with --fold")
    placement = placement_from_args(args)
    if placement is not None:
        check_distributable(config)
        if folds is not None:
            raise ConfigError("--folds trains on one worker; give --fold I to train one fold across workers")
    cohort = load_cohort_from_args(args)
    if folds is not None:
        return _run_folds(config, cohort, folds, out, args)
    # lazy: the training core pulls scipy (via melcore.metrics); `jobs` and `runs` reuse this module's
    # option helpers and stay light
    from melcore.training.api import fit

    if placement is not None:
        return _run_placed(fit, config, cohort, placement, out, args)
    result = train_with_progress(fit, config, cohort, quiet=args.quiet, run_dir=out)
    return _report(config, result)


def _run_placed(fit, config, cohort, placement, out, args) -> int:
    """One worker of a run trained across ``placement``; the chief reports it, the others say whose it is."""
    print(
        f"worker {placement.index} of {placement.n_workers}: waiting for every worker to join "
        f"({', '.join(placement.workers)})",
        file=sys.stderr,
    )
    strategy = multi_worker_strategy(placement)
    run_dir = worker_run_dir(placement, out)
    try:
        result = train_with_progress(
            fit, config, cohort, quiet=args.quiet or not placement.is_chief, run_dir=run_dir, strategy=strategy
        )
    finally:
        if not placement.is_chief:
            shutil.rmtree(run_dir, ignore_errors=True)
    if not placement.is_chief:
        state = "cancelled" if result.cancelled else "done"
        print(f"worker {placement.index}: {state}; worker 0 ({placement.workers[0]}) wrote the run")
        return 130 if result.cancelled else 0
    return _report(config, result)


def _report(config, result) -> int:
    """The summary of a finished run on stdout (or the cancellation on stderr); the exit status."""
    m = result.metrics
    if result.cancelled:
        print(f"cancelled after {m.get('epochs_run', 0)} epoch(s); partial run in {result.run_dir}", file=sys.stderr)
        return 130
    print(f"run          {result.run_dir}")
    print(
        f"model        {config.model} at {config.image_size} px, {m['epochs_run']} epoch(s), best epoch "
        f"{m['best_epoch']}{' (early stop)' if m.get('early_stopped') else ''}, chosen on "
        f"{m['n_select']:,} held-out training images"
    )
    print(
        f"validation   AUROC {format_number(m['val_auroc'])}{' (TTA)' if config.tta else ''}, loss "
        f"{format_number(m['val_loss'])}, sensitivity {format_number(m['sensitivity'], '.3f')} / specificity "
        f"{format_number(m['specificity'], '.3f')} at {m['threshold']}"
    )
    print(
        f"images       train {m['n_train']:,} ({m['n_malignant']['train']:,} melanoma), selection "
        f"{m['n_select']:,} ({m['n_malignant']['select']:,}), validation {m['n_val']:,} "
        f"({m['n_malignant']['val']:,} melanoma; chose nothing)"
    )
    excluded = m.get("excluded", {})
    left_out = {k: v for k, v in excluded.items() if isinstance(v, int) and v}
    if left_out:
        print("left out     " + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in left_out.items()))
    weights = m.get("weights", {})
    print(f"weights      {weights.get('note', '')}")
    if weights.get("from_scratch") and str(weights.get("requested", "none")).lower() != "none":
        print(f"warning: {weights.get('note')}", file=sys.stderr)
    print(f"time         {format_duration(m['seconds'])} on {m['device']}")
    return 0


def _run_folds(config, cohort, folds: int, out, args) -> int:
    """``--folds K``: every fold, then the out-of-fold summary (see :func:`melcore.training.crossval.fit_folds`)."""
    from melcore.training.crossval import fit_folds  # lazy: pulls scipy, as fit in run()

    result = train_with_progress(fit_folds, config, cohort, folds, quiet=args.quiet, run_dir=out)
    m = result.metrics
    if result.cancelled:
        print(f"cancelled after {m['folds_done']} of {folds} folds; partial run in {result.run_dir}", file=sys.stderr)
        return 130
    print(f"run          {result.run_dir}")
    print(f"model        {config.model} at {config.image_size} px, {folds} folds ({config.mode})")
    print(
        f"out-of-fold  AUROC {format_number(m['oof_auroc'])} over {m['n_oof']:,} images ({m['n_malignant']:,} melanoma)"
    )
    print("folds        " + ", ".join(f"{i}: {format_number(a)}" for i, a in enumerate(m["fold_aurocs"])))
    print(f"time         {format_duration(m['seconds'])}")
    return 0
