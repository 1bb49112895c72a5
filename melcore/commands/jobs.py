"""``python -m melcore jobs submit|list|cancel``: the background training queue (same store as the app).

``jobs submit --kind features --shards N`` queues the feature caching of a dataset as N jobs,
one per shard (:mod:`melcore.shards`); any number of workers sharing the store and
``MELREVIEW_HOME`` compute them at once. ``jobs submit --worker-hosts H:P,H:P`` queues one
model trained across workers, one job per address (:func:`melcore.jobs.submit_jobs`).
"""

from __future__ import annotations

import argparse
import sys
import time

from melcore.commands._listing import print_listing
from melcore.commands.train import add_placement_options, add_train_options, config_from_args
from melcore.datasets import find_or_register_demo
from melcore.distributed import Placement
from melcore.errors import ConfigError
from melcore.jobs import JOB_KINDS, queue_jobs, submit_meta_job
from melcore.shards import FEATURES_JOB
from melcore.store import Store

JOB_FIELDS = (
    "id",
    "kind",
    "state",
    "dataset_id",
    "config",
    "progress",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
    "run_id",
    "error",
    "cancel_requested",
)
"""Fields of each object of ``jobs list --json``, in order (documented in the README; scripts rely on them)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="store URL (default: MELREVIEW_DB_URL or the SQLite file)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    submit = actions.add_parser("submit", help="queue a training job; prints its id")
    submit.add_argument("--dataset", required=True, metavar="NAME", help="a registered dataset (name or id)")
    submit.add_argument("--each-clinic", action="store_true", help="queue one job per clinic of the dataset")
    submit.add_argument(
        "--kind",
        choices=tuple(JOB_KINDS),
        default="train",
        help=", ".join(f"{kind.name} ({kind.description})" for kind in JOB_KINDS.values())
        + "; meta jobs take --folds, --seed, --meta-features, --image-run",
    )
    submit.add_argument(
        "--meta-features",
        choices=("context", "baseline"),
        default="context",
        help="meta jobs: patient-context features (default) or the baseline set",
    )
    submit.add_argument(
        "--image-run",
        type=int,
        metavar="RUN",
        default=None,
        help="meta jobs: fuse with this image run's stored scores (out-of-fold, else validation)",
    )
    submit.add_argument(
        "--shards",
        type=int,
        metavar="N",
        default=None,
        help="features jobs: split the dataset's images into N shards, one job each (default 1); "
        "every worker sharing the store and MELREVIEW_HOME takes one at a time",
    )
    add_train_options(submit)
    add_placement_options(submit, index=False)
    listing = actions.add_parser("list", help="the jobs, newest first")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.add_argument("--limit", type=int, default=50)
    cancel = actions.add_parser(
        "cancel", help="cancel a queued or running job (and the other workers' jobs of a run trained across workers)"
    )
    cancel.add_argument("job_id", type=int, metavar="ID")


def _job_line(job: dict) -> str:
    progress = job.get("progress") or {}
    config = job.get("config") or {}
    where = config.get("clinic") or "all clinics"
    detail = ""
    if job["state"] == "running" and progress:
        detail = f" epoch {progress.get('epoch')}/{progress.get('epochs', '?')} loss {progress.get('loss') or 0:.4f}"
        if progress.get("select_auroc") is not None:
            detail += f" selection AUROC {progress['select_auroc']:.3f}"
    elif job.get("error"):
        detail = f" ({job['error'].splitlines()[0][:120]})"
    if job.get("run_id"):
        detail += f" run {job['run_id']}"
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
    what = "patient context" if job["kind"] == "meta" else config.get("model", "?")
    if config.get("placement"):
        placement = config["placement"]
        what += f" as worker {placement.get('index')} of {len(placement.get('workers') or [])}"
    if job["kind"] == FEATURES_JOB:
        what = (
            f"features of {what} at {config.get('image_size')} px, shard {int(config.get('shard', 0)) + 1}"
            f"/{config.get('n_shards', '?')}"
        )
        if job["state"] == "running" and progress:
            detail = f" {progress.get('done', 0):,}/{progress.get('total', 0):,} images"
        elif job["state"] == "done" and "misses" in progress:
            detail = (
                f" {progress['misses']:,} computed, {progress['hits']:,} cached, {progress['bad']:,} unreadable"
                + (f" ({job['error'].splitlines()[0][:120]})" if job.get("error") else "")
            )
    return f"{job['id']:>5}  {job['state']:<9}  {created}  {job['kind']:<12} {what} on {where}{detail}"


def _submitted(store: Store, ids: list[int]) -> int:
    for job_id in ids:
        print(job_id)
    if not store.live_workers():
        print("no worker is running: start one with `python -m trainers.worker`", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    store = Store(args.db)
    if args.action == "submit":
        from dataclasses import replace

        dataset = find_or_register_demo(store, args.dataset)  # "demo" on a fresh home: registered as the app does

        if args.worker_hosts is not None and args.kind != "train":
            raise ConfigError("--worker-hosts goes with --kind train: one model trained across the workers")
        if args.shards is not None and args.kind != FEATURES_JOB:
            raise ConfigError(f"--shards goes with --kind {FEATURES_JOB}")
        if args.kind == "meta":
            if args.each_clinic:
                raise ConfigError("--each-clinic goes with image-model jobs; a meta job uses the whole dataset")
            values = {
                "n_folds": 5 if args.folds is None else args.folds,
                "seed": args.seed or 0,
                "feature_set": args.meta_features,
                "image_run_id": args.image_run,
            }
            ids = [submit_meta_job(store, dataset, values)]
            return _submitted(store, ids)
        if args.image_run is not None:
            raise ConfigError("--image-run goes with --kind meta")
        if args.kind == FEATURES_JOB:
            if args.each_clinic or args.folds is not None:
                raise ConfigError(
                    "--each-clinic and --folds go with training jobs; a features job caches the "
                    "dataset's images (give --clinic for one clinic's)"
                )
            return _submitted(
                store, queue_jobs(store, FEATURES_JOB, config_from_args(args), dataset, n_shards=args.shards)
            )
        config, kind = config_from_args(args), args.kind
        if getattr(args, "folds", None) is not None:
            if kind == "cross-clinic":
                raise ConfigError("--folds goes with --kind kfold, not cross-clinic")
            if args.folds < 2:
                raise ConfigError(f"--folds must be at least 2, got {args.folds}")
            config, kind = replace(config, n_folds=args.folds), "kfold"
        workers = None if args.worker_hosts is None else Placement.parse(args.worker_hosts, 0)
        return _submitted(
            store, queue_jobs(store, kind, config, dataset, each_clinic=args.each_clinic, workers=workers)
        )
    if args.action == "list":
        print_listing(store.list_jobs(limit=args.limit), JOB_FIELDS, _job_line, as_json=args.json, what="jobs")
        return 0
    state = store.request_cancel(args.job_id)
    print(f"job {args.job_id}: {state}" + (" (stops within one batch)" if state == "running" else ""))
    for sibling in store.group_jobs(args.job_id):
        if sibling["id"] != args.job_id:
            print(f"job {sibling['id']} (same run, another worker): {sibling['state']}")
    return 0
