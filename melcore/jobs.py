"""Kinds of background job: one registry (:data:`JOB_KINDS`) for the CLI, the Train page and the worker.

A :class:`JobKind` says what a job of that kind is and does, in one place:

* **validate** (at submit time, before anything is queued): :func:`submit_jobs` for the image-model
  kinds (the config is a :class:`melcore.training.config.TrainConfig`), :func:`submit_meta_job`
  for ``meta`` (:func:`melcore.meta.jobs.meta_job_config`), :func:`submit_feature_jobs` for
  ``features`` (a TrainConfig naming the backbone, queued as one job per shard);
* **run**: ``kind.run(ctx)`` trains on the job's dataset and returns ``(final state, run id)``
  (a ``features`` job records no run: its progress keeps the shard's counts);
  ``ctx`` is the worker's job context (``store``, ``job``, ``report`` (the ``progress`` callback
  of :func:`melcore.training.api.fit`), ``should_stop()``, ``cancelled`` (an event));
* **queue**: :func:`queue_jobs` is the one submit path of the CLI and the Train page for the
  TrainConfig kinds (worker addresses for :attr:`JobKind.across_workers` kinds, shards for
  :attr:`JobKind.sharded` ones);
* **record**: :func:`record_run` registers the finished run, its metrics and its predictions
  (``val_predictions.csv`` as split "val", ``oof_predictions.csv`` as "oof") in the store.

``python -m melcore jobs submit --kind`` offers :data:`JOB_KINDS`; the worker
(:mod:`trainers.worker`) looks the claimed job's kind up here.

The Train page and the CLI import this module to submit and list jobs; the training stack
(:mod:`melcore.training.api`, :mod:`melcore.meta.jobs`, which pull scipy through
:mod:`melcore.metrics` and double this module's import time) is imported inside the runners.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from melcore import settings
from melcore.distributed import (
    Placement,
    check_distributable,
    is_local_host,
    multi_worker_strategy,
    worker_run_dir,
)
from melcore.errors import CancelledError, ConfigError, MelcoreError
from melcore.shards import FEATURES_JOB, featurise_shard, shard_config, shard_rows
from melcore.store import GROUP, REQUEUED, Store
from melcore.training.config import TrainConfig, validate

__all__ = [
    "JobKind",
    "JOB_KINDS",
    "IMAGE_JOB_KINDS",
    "get_job_kind",
    "submit_jobs",
    "submit_meta_job",
    "submit_feature_jobs",
    "queue_jobs",
    "parse_worker_hosts",
    "record_run",
    "RecordedRun",
    "PREDICTION_FILES",
    "new_run_dir",
    "distribution_strategy",
    "job_placement",
    "can_run_here",
    "run_placed_job",
    "group_failure",
]

log = logging.getLogger("melcore.jobs")


def run_train_job(ctx) -> tuple[str, int | None]:
    """Train one model as the job's config says; returns (final state, run id).

    A config with a ``placement`` (``{"workers": [...], "index": i}``, see
    :func:`submit_jobs`) is worker ``i`` of a run trained across workers
    (:func:`run_placed_job`).
    """
    from melcore.training.api import fit  # lazy: pulls scipy (via melcore.metrics)

    data = dict(ctx.job["config"])
    placement = data.pop("placement", None)
    config = TrainConfig.from_dict(data)
    if placement is not None:
        return run_placed_job(ctx, config, Placement.from_dict(placement))
    return _train_and_record(ctx, config, config.model, fit)


def job_placement(job: dict) -> Placement | None:
    """The :class:`melcore.distributed.Placement` a job's config carries, or None."""
    data = (job.get("config") or {}).get("placement")
    return None if data is None else Placement.from_dict(data)


def can_run_here(job: dict) -> bool:
    """Whether this machine may claim ``job``: any job without a placement, and a placed one whose
    address (its worker index's host) is this machine's (:func:`melcore.distributed.is_local_host`)."""
    try:
        placement = job_placement(job)
    except ConfigError:
        return True  # claimed and failed with the message, rather than left in the queue
    return placement is None or is_local_host(placement.host)


GROUP_CHECK_EVERY = 2.0  # seconds between a placed job's looks at its siblings' jobs


def group_failure(members: list[dict], job_id: int, now: float, stale_after: float) -> str | None:
    """Why the run that job ``job_id`` trains with its siblings cannot go on, or None while it can.

    A sibling that failed or was cancelled, one whose worker stopped beating for more than
    ``stale_after`` seconds while running, or one put back in the queue after its worker died
    ends the run: TensorFlow would otherwise keep the live workers waiting in a collective op.
    Siblings still queued for the first time (their worker has not started yet) and finished
    ones do not. A job whose own cancel was requested is stopping anyway: None.

    Parameters
    ----------
    members : list of dict
        :meth:`melcore.store.Store.group_jobs` of the job (itself included).
    job_id : int
    now : float
        The current time (seconds since the epoch, as the store's heartbeats).
    stale_after : float
        Seconds without a heartbeat after which a running sibling counts as dead.

    Returns
    -------
    str or None
        A message naming the dead worker's index, address and job, and what to do.
    """
    if any(m["id"] == job_id and m.get("cancel_requested") for m in members):
        return None
    for member in members:
        if member["id"] == job_id:
            continue
        placement = (member.get("config") or {}).get("placement") or {}
        workers, index = list(placement.get("workers") or []), placement.get("index")
        address = workers[index] if isinstance(index, int) and 0 <= index < len(workers) else "?"
        who = f"worker {index} ({address}, job #{member['id']})"
        error = (member.get("error") or "").strip().splitlines()
        state, beat = member["state"], member.get("heartbeat_at")
        if state == "failed":
            why = f"failed: {error[0]}" if error else "failed"
        elif state == "cancelled":
            why = "was cancelled"
        elif state == "running" and beat is not None and now - float(beat) > stale_after:
            why = f"stopped responding (no heartbeat for {now - float(beat):.0f} s, more than {stale_after:g} s)"
        elif state == "queued" and error and error[0].startswith(REQUEUED):
            why = "stopped responding and its job went back to the queue"
        else:
            continue
        return (
            f"{who} of this run {why}; the workers train together, so this one stops too. "
            "Queue the run again once every worker is running"
        )
    return None


def run_placed_job(ctx, config, placement: Placement) -> tuple[str, int | None]:
    """Worker ``placement.index`` of one run trained across ``placement`` (MultiWorkerMirroredStrategy).

    TensorFlow fixes its collective setup at the first op of a process, and a worker process
    may have trained before, so the training runs in a new process (``spawn``): it sets up
    the strategy from the placement, trains with :func:`melcore.training.api.fit` and sends
    its progress back; the job's cancel flag reaches it within one batch. Worker 0 (the chief)
    writes ``runs/job-<id>-...`` and records the run; the others train into a scratch folder
    they remove and end "done" without a run. Every job of the placement must be claimed (one
    worker process per address) before any of them trains.

    Cancelling one job of the group cancels them all (:meth:`melcore.store.Store.request_cancel`);
    the workers may see it at different batches, and one already stopped leaves the others
    waiting in a collective op, so a process still training :func:`melcore.settings.group_timeout`
    seconds after the stop is ended and the job ends "cancelled". Before training and every
    :data:`GROUP_CHECK_EVERY` seconds the job looks at its siblings' jobs: when one has failed,
    was cancelled, went back to the queue or stopped beating for ``group_timeout`` seconds
    (:func:`group_failure`), the process is ended and the job fails with a message naming that
    worker's address.
    """
    import multiprocessing
    import queue as queue_module
    import shutil

    job = ctx.job
    if job.get("dataset_id") is None:
        raise MelcoreError("the job names no dataset; submit it with a dataset")
    check_distributable(config)
    grace = settings.group_timeout()
    failure = group_failure(ctx.store.group_jobs(job["id"]), job["id"], time.time(), grace)
    if failure is not None:
        raise MelcoreError(failure)
    run_dir = new_run_dir(job, config.model) if placement.is_chief else Path(worker_run_dir(placement, None))
    spawn = multiprocessing.get_context("spawn")
    messages, stop = spawn.Queue(), spawn.Event()
    child = spawn.Process(
        target=_placed_training,
        daemon=True,
        name=f"melreview-placed-job-{job['id']}",
        args=(
            config.to_dict(),
            placement.to_dict(),
            ctx.store.url,
            job["dataset_id"],
            str(run_dir),
            messages,
            stop,
            os.getpid(),
        ),
    )
    child.start()
    log.info("job %s: %s, training in process %s", job["id"], placement, child.pid)
    ending: tuple | None = None
    stopped_at: float | None = None
    checked_at = time.monotonic()
    try:
        while ending is None:
            if stopped_at is None and time.monotonic() - checked_at > GROUP_CHECK_EVERY:
                checked_at = time.monotonic()
                try:
                    failure = group_failure(ctx.store.group_jobs(job["id"]), job["id"], time.time(), grace)
                except Exception as exc:  # noqa: BLE001 - the store is briefly unreachable: look again next time
                    log.warning("job %s: the sibling jobs could not be read: %s", job["id"], exc)
                if failure is not None:
                    log.error("job %s: %s", job["id"], failure)
                    break
            if stopped_at is None and ctx.should_stop():
                stop.set()
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > grace:
                log.warning(
                    "job %s: the training process did not stop within %.0f s of the cancel (a sibling "
                    "stopped first and this one waits on it); ending it",
                    job["id"],
                    grace,
                )
                break
            try:
                message = messages.get(timeout=0.5)
            except queue_module.Empty:
                if not child.is_alive():
                    break
                continue
            if message[0] == "progress":
                ctx.report(*message[1])
            else:
                ending = message
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.terminate()
            child.join(timeout=5)
        if child.is_alive():  # blocked in TensorFlow's collective setup, SIGTERM may go unheard
            child.kill()
            child.join(timeout=5)
        if not placement.is_chief:
            shutil.rmtree(run_dir, ignore_errors=True)
    if failure is not None:
        raise MelcoreError(failure)
    if ending is None and stopped_at is not None and ctx.cancelled.is_set():
        return "cancelled", None
    if ending is None:
        raise MelcoreError(
            f"the training process of {placement} exited with status {child.exitcode} before the "
            "run ended (see the worker log)"
        )
    if ending[0] == "error":
        raise MelcoreError(ending[1]) if ending[2] else RuntimeError(ending[1])
    if ending[1] or ctx.cancelled.is_set():
        return "cancelled", None
    if not placement.is_chief:
        log.info("job %s: done; worker 0 (%s) records the run", job["id"], placement.workers[0])
        return "done", None
    from melcore.training.rundir import Run  # lazy: pulls scipy (via melcore.metrics)

    return "done", record_run(ctx.store, Run.load(run_dir), dataset_id=job["dataset_id"], job_id=job["id"])


def _placed_training(
    config: dict, placement: dict, store_url: str, dataset_id: int, run_dir: str, messages, stop, parent: int
) -> None:
    """The body of :func:`run_placed_job`'s process; ends by putting ("end", cancelled) or ("error", text, is_ours).

    Stops within one batch when ``stop`` is set or its worker process (``parent``) is gone.
    """

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != parent

    try:
        strategy = multi_worker_strategy(Placement.from_dict(placement))
        from melcore.training.api import fit  # lazy: pulls scipy (via melcore.metrics)

        store = Store(store_url)
        cohort = store.load_dataset_cohort(dataset_id)
        store.close()

        def progress(*values) -> None:
            messages.put(("progress", values))

        run = fit(
            TrainConfig.from_dict(config),
            cohort,
            progress=progress,
            should_stop=should_stop,
            run_dir=run_dir,
            strategy=strategy,
        )
        messages.put(("end", bool(run.cancelled)))
    except MelcoreError as exc:
        messages.put(("error", str(exc), True))
    except Exception as exc:  # noqa: BLE001 - reported to the job, whose worker logs it
        messages.put(("error", f"{type(exc).__name__}: {exc}", False))


def _train_and_record(ctx, config, label: str, train, *args) -> tuple[str, int | None]:
    """``train(config, cohort, *args, ...)`` on the job's dataset into ``runs/job-<id>-<label>``, then recorded.

    ``train`` is :func:`melcore.training.api.fit` or one of its kin (``fit_folds``, ``cross_clinic``): it
    gets the job's progress/cancel callbacks and :func:`distribution_strategy`. Returns (final
    state, run id): ("cancelled", None) when the job was cancelled, else ("done", id).
    """
    job = ctx.job
    if job.get("dataset_id") is None:
        raise MelcoreError("the job names no dataset; submit it with a dataset")
    cohort = ctx.store.load_dataset_cohort(job["dataset_id"])
    run_dir = new_run_dir(job, label)
    run = train(
        config,
        cohort,
        *args,
        progress=ctx.report,
        should_stop=ctx.should_stop,
        run_dir=run_dir,
        strategy=distribution_strategy(),
    )
    if getattr(run, "cancelled", False) or ctx.cancelled.is_set():
        return "cancelled", None
    return "done", record_run(ctx.store, run, dataset_id=job["dataset_id"], job_id=job["id"])


def new_run_dir(job: dict, label: str) -> Path:
    """A new, empty folder ``runs/job-<id>-<label>-<random>`` for one attempt at a job, made atomically.

    Job ids restart with every store, and several stores (SQLite, then PostgreSQL) may
    share one ``MELREVIEW_HOME``: the random part and ``mkdir`` without ``exist_ok`` make
    sure an attempt never writes into another store's run, or another attempt's.
    """
    runs = settings.subdir("runs")
    while True:
        path = runs / f"job-{job['id']:05d}-{label}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


PREDICTION_FILES = (("val", "val_predictions.csv"), ("oof", "oof_predictions.csv"))
"""(split, file name) of the predictions a run folder may hold, as :func:`record_run` stores them."""


def record_run(
    store: Store,
    run,
    *,
    dataset_id: int | None,
    job_id: int | None = None,
    name: str | None = None,
    notes: str | None = None,
    threshold: float | None = None,
    predictions: dict | None = None,
) -> int:
    """Register a finished run (its config, metrics and predictions) in the store; returns the run id.

    The one place a run is recorded: the worker's jobs and :func:`melcore.run_archive.import_run` both
    come here. The run and its predictions are written in one transaction (all or nothing).

    Parameters
    ----------
    store : Store
    run : melcore.training.rundir.Run or alike
        Has ``config`` (a TrainConfig or dict; ``model``, ``clinic``, ``name`` are read), ``metrics``
        (``kind`` and ``weights`` are read) and ``run_dir``.
    dataset_id, job_id : int, optional
        What the run belongs to.
    name : str, optional
        The run's name; default ``"<config name or model> · <clinic or all clinics> · <folder>"``.
    notes : str, optional
        Default: the weights' provenance note.
    threshold : float, optional
        A decision threshold in [0, 1] saved with the run.
    predictions : dict, optional
        {split: DataFrame}; default read from the folder's :data:`PREDICTION_FILES`.
    """
    import pandas as pd

    config = run.config.to_dict() if hasattr(run.config, "to_dict") else dict(run.config)
    metrics = dict(run.metrics)
    weights = metrics.get("weights") or {}
    if name is None:
        name = (
            f"{config.get('name') or config.get('model')} · {config.get('clinic') or 'all clinics'} · "
            f"{Path(run.run_dir).name}"
        )
    if predictions is None:
        predictions = {
            split: pd.read_csv(Path(run.run_dir) / filename, dtype={"image_name": str})
            for split, filename in PREDICTION_FILES
            if (Path(run.run_dir) / filename).exists()
        }
    return store.add_run(
        name,
        run.run_dir,
        dataset_id=dataset_id,
        job_id=job_id,
        model=config.get("model"),
        clinic=config.get("clinic"),
        kind=metrics.get("kind", "image"),
        config=config,
        metrics=metrics,
        threshold=threshold,
        from_scratch=bool(weights.get("from_scratch")),
        notes=weights.get("note") if notes is None else notes,
        predictions=predictions,
    )


def run_kfold_job(ctx) -> tuple[str, int | None]:
    """Train every fold (``config["n_folds"]``, default 5); records oof_predictions.csv as split "oof"."""
    from melcore.training.crossval import fit_folds  # lazy: pulls scipy (via melcore.metrics)

    config = TrainConfig.from_dict(ctx.job["config"])
    return _train_and_record(ctx, config, f"kfold-{config.model}", fit_folds, config.n_folds)


def run_cross_clinic_job(ctx) -> tuple[str, int | None]:
    """Train on each clinic and score the others; the run (kind "cross-clinic") feeds the Compare heatmap.

    Without a ``mode`` in the job's config, fast-head is used on a CPU (see
    :func:`melcore.training.crossval.default_cross_clinic_mode`).
    """
    # lazy: pulls scipy (via melcore.metrics)
    from melcore.training.crossval import cross_clinic, default_cross_clinic_mode

    data = dict(ctx.job["config"])
    data.setdefault("mode", default_cross_clinic_mode())
    config = TrainConfig.from_dict(data)
    return _train_and_record(ctx, config, f"cross-clinic-{config.model}", cross_clinic)


def run_meta_job(ctx) -> tuple[str, int | None]:
    """The metadata / patient-context model (no images), optionally fused with an image run's stored scores.

    Patient-grouped K-fold CV of :func:`melcore.meta.jobs.train_meta_run`; the run (kind "meta") stores its
    out-of-fold predictions as split "oof", so the Compare page ranks it beside the image models.
    Progress is reported per fold; a cancel stops before the next fold.
    """
    from melcore.meta import jobs as meta_jobs  # lazy: pulls scipy (via melcore.metrics)

    job = ctx.job
    config = meta_jobs.meta_job_config(job["config"])
    if job.get("dataset_id") is None:
        raise MelcoreError("the job names no dataset; submit it with a dataset")
    cohort = ctx.store.load_dataset_cohort(job["dataset_id"])
    image_scores, source = None, None
    if config["image_run_id"] is not None:
        image_scores, split = meta_jobs.stored_image_scores(ctx.store, config["image_run_id"])
        source = f"run #{config['image_run_id']} ({split} predictions, {len(image_scores):,} images)"
        log.info("image scores from %s", source)
    run_dir = new_run_dir(job, "meta")  # a requeued attempt gets a folder of its own

    def fold_done(done: int, total: int) -> None:
        ctx.report(done, 0, math.nan, {"stage": "fold", "epochs": total, "end_of_epoch": True})

    try:
        metrics = meta_jobs.train_meta_run(
            cohort,
            run_dir,
            n_folds=config["n_folds"],
            seed=config["seed"],
            feature_set=config["feature_set"],
            image_scores=image_scores,
            progress=fold_done,
            log=log.info,
            should_stop=ctx.should_stop,
            config_extra={"image_run_id": config["image_run_id"], "image_scores_from": source},
        )
    except CancelledError as exc:
        log.info("%s", exc)
        return "cancelled", None
    metrics["kind"] = "meta"
    name = "patient context" + (f" + run #{config['image_run_id']}" if "fusion" in metrics else "")
    run_config = {**config, "model": metrics.get("model", "meta"), "name": name, "image_scores_from": source}
    run = RecordedRun(config=run_config, metrics=metrics, run_dir=run_dir)
    return "done", record_run(ctx.store, run, dataset_id=job["dataset_id"], job_id=job["id"])


def run_features_job(ctx) -> tuple[str, None]:
    """Cache the backbone features of one shard of the dataset's images (:func:`melcore.shards.featurise_shard`).

    The job's config is a TrainConfig plus ``shard`` and ``n_shards``; the images are the
    dataset's rows with an image file (of ``clinic`` when the config names one), in the
    dataset's order, so every worker cuts the same shards. The shard's counts (images,
    taken from the cache, computed, unreadable, seconds) stay in the job's progress.
    """
    job = ctx.job
    if job.get("dataset_id") is None:
        raise MelcoreError("the job names no dataset; submit it with a dataset")
    config, n_shards, shard = _feature_job_config(job["config"])
    paths = _feature_paths(ctx.store.load_dataset_cohort(job["dataset_id"]), config.clinic)
    rows = shard_rows(len(paths), n_shards, shard)
    total = rows.stop - rows.start
    log.info(
        "features of shard %d of %d: images %d-%d of %d (%s at %d px)",
        shard + 1,
        n_shards,
        rows.start + 1,
        rows.stop,
        len(paths),
        config.model,
        config.image_size,
    )

    def progress(done: int, _total: int) -> None:
        ctx.report(0, done, None, {"stage": "features", "done": done, "total": total, "epochs": 1})

    progress(0, total)
    result = featurise_shard(config, paths, n_shards, shard, progress=progress, should_stop=ctx.should_stop)
    ctx.report(
        0,
        total,
        None,
        {
            "stage": "features",
            "done": result.hits + result.misses + result.bad,
            "total": total,
            "epochs": 1,
            **result.to_dict(),
        },
    )
    log.info(
        "shard %d of %d: %d from the cache, %d computed, %d unreadable in %.1f s",
        shard + 1,
        n_shards,
        result.hits,
        result.misses,
        result.bad,
        result.seconds,
    )
    if result.cancelled or ctx.cancelled.is_set():
        return "cancelled", None
    return "done", None


def _feature_job_config(data: dict):
    """(TrainConfig, n_shards, shard) of a ``features`` job's config."""
    values = dict(data)
    n_shards, shard = values.pop("n_shards", None), values.pop("shard", None)
    shard_rows(0, n_shards, shard)  # ConfigError naming the bad number
    return validate(TrainConfig.from_dict(values)), n_shards, shard


def _feature_paths(cohort, clinic: str | None) -> list[str]:
    """The image files a ``features`` job's shards are cut from, in the cohort's order."""
    table = cohort.table
    if clinic is not None:
        table = table[table["clinic"] == clinic]
    return [str(p) for p in table["image_path"].dropna().tolist()]


class RecordedRun:
    """What :func:`record_run` reads of a run: its config, metrics and folder."""

    def __init__(self, config: dict, metrics: dict, run_dir: Path):
        self.config, self.metrics, self.run_dir = config, metrics, run_dir


def distribution_strategy():
    """MirroredStrategy across the GPUs when more than one is visible, else None (the default device)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return None


@dataclass(frozen=True)
class JobKind:
    """One kind of job.

    Attributes
    ----------
    name : str
        The store's ``kind`` of the job and the CLI's ``--kind``.
    description : str
        One sentence for ``--help`` and the pages.
    image_model : bool
        The job trains an image model from a TrainConfig (validated by :func:`submit_jobs`);
        the other kinds have their own submit function (:func:`submit_meta_job`,
        :func:`submit_feature_jobs`).
    run : callable(ctx) -> (state, run id)
        Trains and records the job (see the module docstring for ``ctx``).
    across_workers : bool
        One job of this kind may be trained across several worker addresses
        (:func:`submit_jobs` with ``workers``; one job per address).
    sharded : bool
        The kind is queued as N independent shards (:func:`submit_feature_jobs`).
    """

    name: str
    description: str
    image_model: bool
    run: Callable[[Any], tuple[str, "int | None"]]
    across_workers: bool = False
    sharded: bool = False


#: name -> :class:`JobKind`, in menu order.
JOB_KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("train", "one model", True, run_train_job, across_workers=True),
        JobKind("kfold", "every fold of --folds K, out-of-fold predictions", True, run_kfold_job),
        JobKind("cross-clinic", "train on each clinic, score the others", True, run_cross_clinic_job),
        JobKind("meta", "metadata and patient-context model, no images", False, run_meta_job),
        JobKind(
            FEATURES_JOB,
            "cache the backbone features of the dataset's images, one job per shard of --shards N",
            False,
            run_features_job,
            sharded=True,
        ),
    )
}
#: The kinds whose config is a TrainConfig.
IMAGE_JOB_KINDS = tuple(name for name, kind in JOB_KINDS.items() if kind.image_model)


def get_job_kind(name: str) -> JobKind:
    """The :class:`JobKind` called ``name``.

    Raises
    ------
    MelcoreError
        Unknown kind; the message lists the known ones.
    """
    if name not in JOB_KINDS:
        raise MelcoreError(f"unknown job kind {name!r}; this worker runs {', '.join(JOB_KINDS)}")
    return JOB_KINDS[name]


def submit_jobs(
    store: Store,
    config,
    dataset: dict,
    each_clinic: bool = False,
    kind: str = "train",
    workers: Placement | None = None,
) -> list[int]:
    """Validate ``config`` against the dataset and queue it (once, or once per clinic); returns job ids.

    With ``workers`` (a :class:`melcore.distributed.Placement`; its index is ignored) one
    ``train`` run is queued across them: one job per worker address, each carrying the
    placement and its index in its config; the worker process on each address's machine
    claims that address's job (:func:`can_run_here`), and worker 0's job records the run. The
    siblings' placements share a random ``group`` id (:data:`melcore.store.GROUP`), which the store
    keeps in the indexed ``jobs.group_id`` column (:meth:`melcore.store.Store.group_jobs`).
    """
    if kind not in IMAGE_JOB_KINDS:
        raise ConfigError(f"unknown job kind {kind!r}; choose one of {', '.join(IMAGE_JOB_KINDS)}")
    if workers is not None:
        if kind != "train" or each_clinic:
            raise ConfigError("a run across workers is one train job (no --each-clinic, --folds or cross-clinic)")
        check_distributable(config)
    if kind == "cross-clinic" and (each_clinic or config.clinic is not None):
        raise ConfigError("a cross-clinic job trains on every clinic itself; give no clinic")
    validate(config)
    clinics = sorted((dataset.get("summary") or {}).get("clinics") or {})
    if config.clinic is not None and clinics and config.clinic not in clinics:
        raise ConfigError(
            f"dataset {dataset['name']!r} has no clinic {config.clinic!r}; its clinics: {', '.join(clinics)}"
        )
    if each_clinic:
        if not clinics:
            raise ConfigError(f"dataset {dataset['name']!r} has no clinic column to split by")
        configs = [replace(config, clinic=clinic) for clinic in clinics]
    else:
        configs = [config]
    if workers is not None:
        group = uuid.uuid4().hex[:16]  # the siblings' shared id (cancelled and watched together)
        return [
            store.submit_job(
                {**config.to_dict(), "placement": {**Placement(workers.workers, i).to_dict(), GROUP: group}},
                dataset_id=dataset["id"],
                kind=kind,
            )
            for i in range(workers.n_workers)
        ]
    return [store.submit_job(c.to_dict(), dataset_id=dataset["id"], kind=kind) for c in configs]


def submit_meta_job(store: Store, dataset: dict, values: dict | None = None) -> int:
    """Validate a patient-context job (:func:`melcore.meta.jobs.meta_job_config`) and queue it; returns its id.

    An ``image_run_id`` must name a run of the same dataset with stored predictions.
    """
    from melcore.meta.jobs import meta_job_config, stored_image_scores  # lazy: pulls scipy (via melcore.metrics)

    config = meta_job_config(values)
    run_id = config["image_run_id"]
    if run_id is not None:
        run = store.get_run(run_id)
        if run.get("dataset_id") != dataset["id"]:
            raise ConfigError(f"run #{run_id} belongs to another dataset; fuse with a run of {dataset['name']!r}")
        stored_image_scores(store, run_id)  # refuses a run without stored scores now, not in the worker
    return store.submit_job(config, dataset_id=dataset["id"], kind="meta")


def submit_feature_jobs(store: Store, config, dataset: dict, n_shards: int) -> list[int]:
    """Queue the feature caching of ``dataset`` with ``config``'s backbone as ``n_shards`` jobs; returns their ids.

    ``config`` is a TrainConfig; its model, image size, weights, pooling, seed and TTA name
    the cache entries a fast-head run of the same config reads (:mod:`melcore.shards`).
    Workers sharing the store and ``MELREVIEW_HOME`` take one shard each; a shard whose
    worker dies is requeued on its own.
    """
    config = validate(config)
    shard_rows(0, n_shards, 0)  # ConfigError for a bad number of shards
    n_images = int((dataset.get("summary") or {}).get("n_images") or 0)
    if n_images and n_shards > n_images:
        raise ConfigError(
            f"--shards {n_shards} is more than the {n_images:,} images of dataset "
            f"{dataset['name']!r}; use at most {n_images}"
        )
    return [
        store.submit_job(shard_config(config.to_dict(), n_shards, shard), dataset_id=dataset["id"], kind=FEATURES_JOB)
        for shard in range(n_shards)
    ]


def parse_worker_hosts(text: str | None) -> Placement | None:
    """The :class:`melcore.distributed.Placement` of ``"host:port, host:port"`` (index 0), None for blank text.

    Raises
    ------
    ConfigError
        An address that is not host:port (named by its position) or one given twice.
    """
    if text is None or not str(text).strip():
        return None
    return Placement.parse(str(text), 0)


def queue_jobs(
    store: Store,
    kind: str,
    config,
    dataset: dict,
    *,
    each_clinic: bool = False,
    workers: Placement | None = None,
    n_shards: int | None = None,
) -> list[int]:
    """Queue a job of an image-model or sharded kind as :data:`JOB_KINDS` says; returns the job ids.

    The one submit path of the CLI (``jobs submit``) and the Train page for every kind whose
    config is a TrainConfig: ``workers`` only for a kind that trains across workers
    (:attr:`JobKind.across_workers`), ``n_shards`` only for a sharded kind
    (:attr:`JobKind.sharded`, default 1 shard). Nothing is queued when anything is refused.

    Raises
    ------
    ConfigError
        Unknown kind, worker addresses or shards given to a kind that takes none, a bad number of
        shards, or a config the kind's submit function refuses.
    """
    job_kind = JOB_KINDS.get(kind)
    if job_kind is None or not (job_kind.image_model or job_kind.sharded):
        known = [name for name, k in JOB_KINDS.items() if k.image_model or k.sharded]
        raise ConfigError(f"unknown job kind {kind!r} here; choose one of {', '.join(known)}")
    if workers is not None and not job_kind.across_workers:
        takers = [name for name, k in JOB_KINDS.items() if k.across_workers]
        raise ConfigError(
            f"a {kind!r} job runs on one worker; worker addresses go with kind {' or '.join(map(repr, takers))} "
            "(one model trained across the workers)"
        )
    if n_shards is not None and not job_kind.sharded:
        takers = [name for name, k in JOB_KINDS.items() if k.sharded]
        raise ConfigError(f"shards go with kind {' or '.join(map(repr, takers))}, not {kind!r}")
    if job_kind.sharded:
        if each_clinic:
            raise ConfigError(
                f"a {kind!r} job caches the dataset's images once; choose one clinic or all clinics, "
                "not one job per clinic"
            )
        return submit_feature_jobs(store, config, dataset, 1 if n_shards is None else n_shards)
    return submit_jobs(store, config, dataset, each_clinic, kind, workers=workers)
