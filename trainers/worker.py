"""The background trainer: ``python -m trainers.worker [--once] [--poll SECONDS] [--db URL]``.

A worker claims queued jobs from the store (atomically: two workers never run the
same job), runs them through :mod:`melcore`, and records every ending: ``done``
with the run, ``cancelled``, or ``failed`` with the reason, the traceback and the
log. While a job runs, a heartbeat thread writes progress (at most about once a
second) and reads cancel requests; training stops within one batch of a cancel.
A worker killed outright leaves a stale heartbeat: the next worker (or the app)
requeues the job while it has attempts left, and fails it with the reason after.

Any number of workers, on one or several machines, may share one database. A job
placed across workers (``jobs submit --worker-hosts``) is claimed only by a worker on
the machine its address names, and trains in a new process of its own
(:func:`melcore.jobs.run_placed_job`).
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
from typing import Any

from melcore.caches import MAX_SIZE_VARIABLE, auto_prune, format_size
from melcore.errors import MelcoreError
from melcore.formatting import json_safe
from melcore.jobs import can_run_here, get_job_kind
from melcore.store import Store, StoreError, default_worker_id

log = logging.getLogger("melreview.worker")

STALE_AFTER = 60.0  # seconds without a heartbeat before a running job counts as orphaned
BEAT_EVERY = 1.0  # seconds between heartbeats (and progress writes) of a running job
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

    def report(
        self, epoch: int, batch: int, loss: float, metrics: dict | None = None, eta: float | None = None
    ) -> None:
        metrics = dict(metrics or {})
        now = time.time()
        progress = {
            "epoch": int(epoch),
            "batch": int(batch),
            "loss": _num(loss),
            "eta": _num(eta),
            "updated_at": now,
            **json_safe(metrics),
        }
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


def _heartbeat_loop(ctx: JobContext, token: str, worker_id: str, done: threading.Event) -> None:
    history: list[dict] | None = None
    while not done.wait(BEAT_EVERY):
        progress, points = ctx.take()
        if progress is not None:
            progress["log_tail"] = ctx.log_tail()
        try:
            if points:
                history = history if history is not None else list(ctx.store.get_job(ctx.job["id"])["history"] or [])
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
            state, run_id = get_job_kind(job["kind"]).run(ctx)
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

    def __init__(
        self,
        store: Store,
        *,
        poll: float = 2.0,
        once: bool = False,
        stale_after: float = STALE_AFTER,
        worker_id: str | None = None,
    ):
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
                job = self.store.claim_job(self.worker_id, accept=can_run_here)  # placed jobs: on their machine
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
        log.info(
            "pruned %d cache file(s), %s, to stay within %s", report.files, format_size(report.bytes), MAX_SIZE_VARIABLE
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="run the queued jobs, then exit")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between queue polls when idle")
    parser.add_argument(
        "--db",
        default=None,
        help="store URL (default: MELREVIEW_DB_URL or the SQLite file); a URL with a password "
        "belongs in MELREVIEW_DB_URL, since every user can read a command line",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER,
        help="seconds without a heartbeat before a running job is requeued",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
