"""The background trainer: ``python -m trainers.worker [--once] [--poll SECONDS] [--db URL]``.

A worker claims queued jobs from the store (atomically: two workers never run the
same job), runs them through :mod:`melcore`, and records every ending: ``done``
with the run, ``cancelled``, or ``failed`` with the reason, the traceback and the
log. While a job runs, a heartbeat thread writes progress (at most about once a
second) and reads cancel requests; training stops within one batch of a cancel.
A worker killed outright leaves a stale heartbeat: the next worker (or the app)
requeues the job while it has attempts left, and fails it with the reason after.

Any number of workers, on one or several machines, may share one database.
"""

from __future__ import annotations

import argparse
import io
import logging
import signal
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from melcore import settings
from melcore.caches import MAX_SIZE_VARIABLE, auto_prune, format_size
from melcore.errors import MelcoreError
from melcore.store import Store, StoreError, default_worker_id

log = logging.getLogger("melreview.worker")

STALE_AFTER = 60.0   # seconds without a heartbeat before a running job counts as orphaned
BEAT_EVERY = 1.0     # seconds between heartbeats (and progress writes) of a running job
HISTORY_LIMIT = 3000  # live-curve points kept per job


class JobContext:
    """What a job function gets: the job, its store, progress reporting and the cancel flag.

    ``report(epoch, batch, loss, metrics, eta)`` matches the ``progress`` callback of
    :func:`melcore.training.api.fit`; it only records the values in memory, the heartbeat
    thread writes the newest ones to the store about once a second, plus every
    end-of-epoch point (``metrics["end_of_epoch"]``) for the live curves.
    """

    def __init__(self, store: Store, job: dict, log_buffer: io.StringIO):
        self.store = store
        self.job = job
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.log_buffer = log_buffer
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {}
        self._points: list[dict] = []
        self._last_point = 0.0

    def report(self, epoch: int, batch: int, loss: float, metrics: dict | None = None,
               eta: float | None = None) -> None:
        metrics = dict(metrics or {})
        now = time.time()
        progress = {"epoch": int(epoch), "batch": int(batch), "loss": _num(loss), "eta": _num(eta),
                    "updated_at": now, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self._lock:
            self._progress = progress
            if metrics.get("end_of_epoch") or now - self._last_point >= BEAT_EVERY:
                self._points.append({k: progress[k] for k in progress if k != "updated_at"} | {"t": now})
                self._last_point = now

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def take(self) -> tuple[dict | None, list[dict]]:
        with self._lock:
            progress, points, self._points = (dict(self._progress) if self._progress else None), self._points, []
        return progress, points

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_buffer.getvalue().splitlines()[-lines:])


def run_train_job(ctx: JobContext) -> tuple[str, int | None]:
    """Train one model as the job's config says; returns (final state, run id)."""
    from melcore.training.api import fit
    from melcore.training.config import TrainConfig

    config = TrainConfig.from_dict(ctx.job["config"])
    return _train_and_record(ctx, config, config.model, fit)


def _train_and_record(ctx: JobContext, config, label: str, train, *args) -> tuple[str, int | None]:
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
    run = train(config, cohort, *args, progress=ctx.report, should_stop=ctx.should_stop, run_dir=run_dir,
                strategy=distribution_strategy())
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


def record_run(store: Store, run, *, dataset_id: int | None, job_id: int | None = None) -> int:
    """Register a finished :class:`melcore.training.rundir.Run` (its metrics and validation predictions) in the store."""
    import pandas as pd

    config = run.config.to_dict() if hasattr(run.config, "to_dict") else dict(run.config)
    metrics = dict(run.metrics)
    weights = metrics.get("weights") or {}
    name = f"{config.get('name') or config.get('model')} · {config.get('clinic') or 'all clinics'} · " \
        f"{Path(run.run_dir).name}"
    run_id = store.add_run(name, run.run_dir, dataset_id=dataset_id, job_id=job_id, model=config.get("model"),
                           clinic=config.get("clinic"), kind=metrics.get("kind", "image"), config=config,
                           metrics=metrics, from_scratch=bool(weights.get("from_scratch")),
                           notes=weights.get("note"))
    for split, filename in (("val", "val_predictions.csv"), ("oof", "oof_predictions.csv")):
        path = Path(run.run_dir) / filename
        if path.exists():
            store.add_predictions(run_id, pd.read_csv(path, dtype={"image_name": str}), split=split)
    return run_id


def run_kfold_job(ctx: JobContext) -> tuple[str, int | None]:
    """Train every fold (``config["n_folds"]``, default 5); records oof_predictions.csv as split "oof"."""
    from melcore.training.config import TrainConfig
    from melcore.training.crossval import fit_folds

    config = TrainConfig.from_dict(ctx.job["config"])
    return _train_and_record(ctx, config, f"kfold-{config.model}", fit_folds, config.n_folds)


def run_cross_clinic_job(ctx: JobContext) -> tuple[str, int | None]:
    """Train on each clinic and score the others; the run (kind "cross-clinic") feeds the Compare heatmap.

    Without a ``mode`` in the job's config, fast-head is used on a CPU (see
    :func:`melcore.training.crossval.default_cross_clinic_mode`).
    """
    from melcore.training.config import TrainConfig
    from melcore.training.crossval import cross_clinic, default_cross_clinic_mode

    data = dict(ctx.job["config"])
    data.setdefault("mode", default_cross_clinic_mode())
    config = TrainConfig.from_dict(data)
    return _train_and_record(ctx, config, f"cross-clinic-{config.model}", cross_clinic)


def run_meta_job(ctx: JobContext) -> tuple[str, int | None]:
    """The metadata / patient-context model (no images), optionally fused with an image run's stored scores.

    Patient-grouped K-fold CV of :func:`melcore.meta.train_meta_run`; the run (kind "meta") stores its
    out-of-fold predictions as split "oof", so the Compare page ranks it beside the image models.
    Progress is reported per fold; a cancel stops before the next fold.
    """
    import math

    from melcore import meta
    from melcore.errors import CancelledError

    job = ctx.job
    config = meta.meta_job_config(job["config"])
    if job.get("dataset_id") is None:
        raise MelcoreError("the job names no dataset; submit it with a dataset")
    cohort = ctx.store.load_dataset_cohort(job["dataset_id"])
    image_scores, source = None, None
    if config["image_run_id"] is not None:
        image_scores, split = meta.stored_image_scores(ctx.store, config["image_run_id"])
        source = f"run #{config['image_run_id']} ({split} predictions, {len(image_scores):,} images)"
        log.info("image scores from %s", source)
    run_dir = new_run_dir(job, "meta")  # a requeued attempt gets a folder of its own

    def fold_done(done: int, total: int) -> None:
        ctx.report(done, 0, math.nan, {"stage": "fold", "epochs": total, "end_of_epoch": True})

    try:
        metrics = meta.train_meta_run(
            cohort, run_dir, n_folds=config["n_folds"], seed=config["seed"], feature_set=config["feature_set"],
            image_scores=image_scores, progress=fold_done, log=log.info, should_stop=ctx.should_stop,
            config_extra={"image_run_id": config["image_run_id"], "image_scores_from": source})
    except CancelledError as exc:
        log.info("%s", exc)
        return "cancelled", None
    metrics["kind"] = "meta"
    name = "patient context" + (f" + run #{config['image_run_id']}" if "fusion" in metrics else "")
    run_config = {**config, "model": metrics.get("model", "meta"), "name": name, "image_scores_from": source}
    run = _RecordedRun(config=run_config, metrics=metrics, run_dir=run_dir)
    return "done", record_run(ctx.store, run, dataset_id=job["dataset_id"], job_id=job["id"])


class _RecordedRun:
    """What :func:`record_run` reads of a run: its config, metrics and folder."""

    def __init__(self, config: dict, metrics: dict, run_dir: Path):
        self.config, self.metrics, self.run_dir = config, metrics, run_dir


JOB_KINDS: dict[str, Callable[[JobContext], tuple[str, int | None]]] = {
    "train": run_train_job,
    "kfold": run_kfold_job,
    "cross-clinic": run_cross_clinic_job,
    "meta": run_meta_job,
}


def distribution_strategy():
    """MirroredStrategy across the GPUs when more than one is visible, else None (the default device)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return None


def _heartbeat_loop(ctx: JobContext, token: str, worker_id: str, done: threading.Event) -> None:
    history: list[dict] | None = None
    while not done.wait(BEAT_EVERY):
        progress, points = ctx.take()
        if progress is not None:
            progress["log_tail"] = ctx.log_tail()
        try:
            if points:
                history = (history if history is not None else list(ctx.store.get_job(ctx.job["id"])["history"] or []))
                history = (history + points)[-HISTORY_LIMIT:]
                ctx.store.update_job(ctx.job["id"], history=history)
            if ctx.store.heartbeat(ctx.job["id"], token, progress=progress):
                ctx.cancelled.set()
            ctx.store.worker_beat(worker_id, ctx.job["id"])
        except MelcoreError:
            log.error("job %s was taken from this worker (stale heartbeat); stopping it", ctx.job["id"])
            ctx.lost.set()
            return
        except Exception:  # a database hiccup must not kill the job; try again next beat
            log.exception("heartbeat failed; retrying")


def run_job(store: Store, job: dict, worker_id: str) -> str:
    """Run one claimed job to its end and record it; returns the final state."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    ctx = JobContext(store, job, buffer)
    done = threading.Event()
    beater = threading.Thread(target=_heartbeat_loop, args=(ctx, job["claim_token"], worker_id, done), daemon=True)
    beater.start()
    log.info("job %s (%s) started by %s, attempt %s", job["id"], job["kind"], worker_id, job["attempts"])
    run_id, error = None, None
    try:
        if store.is_cancel_requested(job["id"]):
            state = "cancelled"
        else:
            kind = JOB_KINDS.get(job["kind"])
            if kind is None:
                raise MelcoreError(f"unknown job kind {job['kind']!r}; this worker runs {', '.join(JOB_KINDS)}")
            state, run_id = kind(ctx)
    except MelcoreError as exc:
        state, error = "failed", str(exc)
        log.error("job %s failed: %s", job["id"], exc)
    except Exception as exc:
        state, error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("job %s failed:\n%s", job["id"], traceback.format_exc())
    finally:
        done.set()
        beater.join(timeout=10)
        root.removeHandler(handler)
    if ctx.lost.is_set():
        return "lost"
    if state == "cancelled":
        log.info("job %s cancelled", job["id"])
    progress, points = ctx.take()
    if points:
        history = list(store.get_job(job["id"])["history"] or [])
        store.update_job(job["id"], history=(history + points)[-HISTORY_LIMIT:])
    if progress is not None:
        store.update_job(job["id"], progress=progress)
    store.finish_job(job["id"], job["claim_token"], state, run_id=run_id, error=error, log=buffer.getvalue())
    return state


class Worker:
    """Claims and runs jobs until stopped (or, with ``once``, until the queue is empty)."""

    def __init__(self, store: Store, *, poll: float = 2.0, once: bool = False, stale_after: float = STALE_AFTER,
                 worker_id: str | None = None):
        self.store = store
        self.poll = poll
        self.once = once
        self.stale_after = stale_after
        self.worker_id = worker_id or default_worker_id()
        self.stopping = threading.Event()

    def run(self) -> int:
        """Returns the number of jobs run."""
        count = 0
        try:
            while not self.stopping.is_set():
                self.store.worker_beat(self.worker_id)
                for recovered in self.store.requeue_stale(self.stale_after):
                    log.warning("job %s had a stale heartbeat: %s", recovered["id"], recovered["state"])
                job = self.store.claim_job(self.worker_id)
                if job is None:
                    if self.once:
                        break
                    self.stopping.wait(self.poll)
                    continue
                state = run_job(self.store, job, self.worker_id)
                log.info("job %s ended: %s", job["id"], state)
                count += 1
                _prune_caches()
        finally:
            self.store.worker_gone(self.worker_id)
        return count


def _prune_caches() -> None:
    """Keep the disk caches within ``MELREVIEW_CACHE_MAX_SIZE`` (when set) after each job."""
    try:
        report = auto_prune()
    except MelcoreError as exc:  # a bad setting is reported, never fatal for the queue
        log.warning("cache pruning skipped: %s", exc)
        return
    except OSError as exc:
        log.warning("cache pruning failed: %s", exc)
        return
    if report is not None and report.files:
        log.info("pruned %d cache file(s), %s, to stay within %s", report.files, format_size(report.bytes),
                 MAX_SIZE_VARIABLE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="run the queued jobs, then exit")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between queue polls when idle")
    parser.add_argument("--db", default=None,
                        help="store URL (default: MELREVIEW_DB_URL or the SQLite file); a URL with a password "
                             "belongs in MELREVIEW_DB_URL, since every user can read a command line")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER,
                        help="seconds without a heartbeat before a running job is requeued")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        store = Store(args.db)
    except MelcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worker = Worker(store, poll=args.poll, once=args.once, stale_after=args.stale_after)

    def _stop(signum, _frame):
        log.info("signal %s: finishing the current job, then exiting", signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        count = worker.run()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("worker %s exits after %d job(s)", worker.worker_id, count)
    return 0


def _num(value):
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _jsonable(value):
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


if __name__ == "__main__":
    sys.exit(main())
