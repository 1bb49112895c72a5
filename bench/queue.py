"""Job-queue benchmark: concurrent submitters, cancellers and workers on SQLite and PostgreSQL.

    python bench/queue.py [--seconds 60] [--clients 8] [--workers 2] [--rate 6] [--backends sqlite,postgresql]

For each backend (a fresh SQLite file; a real PostgreSQL server started in a
temporary folder, as the ``postgres_url`` test fixture does) it runs, as separate
processes (the way the app, the CLI and the workers meet in real use):

* ``--clients`` submitter/canceller processes for ``--seconds``: each queues jobs at
  random intervals (``--rate`` jobs per second over all clients), cancels one of its
  last three jobs 30% of the time (queued, running or already ended) and polls the job
  list like the Train page does;
* ``--workers`` claimer processes running the real loop of :class:`trainers.worker.Worker`
  (claim, heartbeat thread, cancel check, finish, stale-job recovery) with a fake
  sub-second job body instead of training (no TensorFlow: this measures the queue).
  The heartbeat interval is lowered to 0.1 s so sub-second jobs beat several times.
  Every claim and every finish is recorded.

When the clients stop, the workers drain the queue and exit. Then it counts, goal 0:

* lost:       submitted jobs that are not in the store, or still queued after draining;
* duplicated: jobs claimed more than once, finished (successfully) more than once, or
              with more than one attempt recorded;
* stuck:      jobs still running when no worker is left.

It also checks that a job whose cancel request answered "cancelled" never ran to
another end, and that every job that ended after a claim was ended by its claimant.
The last line holds the three counts per backend.
"""

from __future__ import annotations

import sys

if __name__ == "queue":
    # ``python bench/<other>.py`` puts bench/ first on sys.path, so ``import queue`` anywhere in that
    # process (concurrent.futures, multiprocessing, TensorFlow) finds this file. Hand the importer
    # the standard library's queue module instead (an import returns what sys.modules holds after
    # the module ran); the rest of this file then only defines functions.
    import importlib.util as _util
    import os as _os
    import sysconfig as _sysconfig

    _spec = _util.spec_from_file_location("queue", _os.path.join(_sysconfig.get_paths()["stdlib"], "queue.py"))
    _stdlib_queue = _util.module_from_spec(_spec)
    sys.modules["queue"] = _stdlib_queue
    _spec.loader.exec_module(_stdlib_queue)
else:
    from pathlib import Path

    # Run as a script: keep bench/ off the import path (this file shadows the standard library's
    # queue, which multiprocessing imports) and put the project root on it.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

CANCEL_SHARE = 0.3
FAIL_SHARE = 0.05
JOB_SECONDS = (0.05, 0.5)
BEAT_EVERY = 0.1


# --------------------------------------------------------------------------- backends


def postgres_server():
    """A throwaway PostgreSQL server (the one the ``postgres_url`` test fixture starts); yields its URL."""
    from melcore.devtools.postgres import temporary_server

    return temporary_server(max_connections=300, prefix="melreview-bench-pg-")


@contextlib.contextmanager
def sqlite_file():
    folder = Path(tempfile.mkdtemp(prefix="melreview-bench-sqlite-"))
    try:
        yield f"sqlite:///{folder / 'bench.db'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- processes


def recording_store(url: str):
    """A Store that records every successful claim and every finish of this process."""
    from melcore.store import Store

    class RecordingStore(Store):
        def __init__(self, url: str):
            super().__init__(url, migrate=False)
            self.claims: list[dict] = []
            self.finishes: list[dict] = []
            self.beats = 0
            self._lock = threading.Lock()

        def claim_job(self, worker_id=None):
            job = super().claim_job(worker_id)
            if job is not None:
                with self._lock:
                    self.claims.append(
                        {
                            "job": job["id"],
                            "token": job["claim_token"],
                            "worker": worker_id,
                            "attempts": job["attempts"],
                            "t": time.time(),
                        }
                    )
            return job

        def heartbeat(self, job_id, claim_token, progress=None, history_point=None):
            cancelled = super().heartbeat(job_id, claim_token, progress=progress, history_point=history_point)
            with self._lock:
                self.beats += 1
            return cancelled

        def finish_job(self, job_id, claim_token, state, **kwargs):
            ok = super().finish_job(job_id, claim_token, state, **kwargs)
            with self._lock:
                self.finishes.append({"job": job_id, "token": claim_token, "state": state, "ok": ok, "t": time.time()})
            return ok

    return RecordingStore(url)


def fake_job(ctx) -> tuple[str, None]:
    """A sub-second stand-in for training: ten 'batches', progress reports, cancel checks."""
    config = ctx.job["config"]
    steps = 10
    started = time.perf_counter()
    for batch in range(1, steps + 1):
        if ctx.should_stop():
            return "cancelled", None
        time.sleep(config["seconds"] / steps)
        elapsed = time.perf_counter() - started
        ctx.report(
            1,
            batch,
            1.0 / batch,
            {"epochs": 1, "steps": steps, "stage": "train", "end_of_epoch": batch == steps, "val_auroc": 0.5},
            eta=elapsed / batch * (steps - batch),
        )
    if config["fail"]:
        from melcore.errors import MelcoreError

        raise MelcoreError(f"bench: simulated failure of job {ctx.job['id']}")
    return "done", None


def client_main(index: int, url: str, seconds: float, rate: float, seed: int, barrier, out: str) -> None:
    from melcore.store import Store

    store = Store(url, migrate=False)
    rng = random.Random(seed)
    submitted, cancels, errors, latencies = [], [], [], []
    barrier.wait()
    deadline = time.time() + seconds
    while time.time() < deadline:
        config = {
            "bench": True,
            "client": index,
            "n": len(submitted),
            "seconds": rng.uniform(*JOB_SECONDS),
            "fail": rng.random() < FAIL_SHARE,
        }
        started = time.perf_counter()
        try:
            submitted.append(store.submit_job(config, kind="bench"))
            latencies.append(time.perf_counter() - started)
        except Exception as exc:  # counted and reported: a failed submit is an error the user sees
            errors.append(f"submit: {type(exc).__name__}: {exc}"[:300])
        if submitted and rng.random() < CANCEL_SHARE:
            target = rng.choice(submitted[-3:])
            try:
                cancels.append({"job": target, "state": store.request_cancel(target), "t": time.time()})
            except Exception as exc:
                errors.append(f"cancel: {type(exc).__name__}: {exc}"[:300])
        if rng.random() < 0.5:
            try:
                store.list_jobs(limit=50)
            except Exception as exc:
                errors.append(f"list: {type(exc).__name__}: {exc}"[:300])
        time.sleep(min(rng.expovariate(rate), max(0.0, deadline - time.time())))
    store.close()
    Path(out).write_text(
        json.dumps({"submitted": submitted, "cancels": cancels, "errors": errors, "latencies": latencies})
    )


def worker_main(index: int, url: str, barrier, clients_done, out: str) -> None:
    import trainers.worker as worker_module

    worker_module.BEAT_EVERY = BEAT_EVERY
    worker_module.JOB_KINDS["bench"] = fake_job
    store = recording_store(url)
    worker = worker_module.Worker(store, poll=0.05, worker_id=f"bench-{index}:{os.getpid()}:0")

    def stop_when_drained():
        clients_done.wait()
        while not worker.stopping.is_set():
            try:
                if not store.list_jobs(states=["queued"], limit=1):
                    worker.stopping.set()
                    return
            except Exception:
                pass
            time.sleep(0.2)

    threading.Thread(target=stop_when_drained, daemon=True).start()
    barrier.wait()
    errors = []
    try:
        worker.run()
    except Exception as exc:
        errors.append(f"worker: {type(exc).__name__}: {exc}"[:300])
    Path(out).write_text(
        json.dumps(
            {
                "claims": store.claims,
                "finishes": store.finishes,
                "beats": store.beats,
                "errors": errors,
                "tensorflow": "tensorflow" in sys.modules,
            }
        )
    )
    store.close()


# --------------------------------------------------------------------------- one backend


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_backend(name: str, url: str, args) -> dict:
    from melcore.store import Store

    Store(url).close()  # create the schema once, before the processes start
    ctx = mp.get_context("spawn")
    outdir = Path(tempfile.mkdtemp(prefix=f"melreview-bench-{name}-"))
    barrier = ctx.Barrier(args.clients + args.workers + 1)
    clients_done = ctx.Event()
    clients = [
        ctx.Process(
            target=client_main,
            args=(
                i,
                url,
                args.seconds,
                args.rate / args.clients,
                args.seed + i,
                barrier,
                str(outdir / f"client-{i}.json"),
            ),
        )
        for i in range(args.clients)
    ]
    workers = [
        ctx.Process(target=worker_main, args=(i, url, barrier, clients_done, str(outdir / f"worker-{i}.json")))
        for i in range(args.workers)
    ]
    try:
        for process in clients + workers:
            process.start()
        barrier.wait(timeout=120)
        started = time.time()
        print(
            f"{name}: {args.clients} clients and {args.workers} workers running for {args.seconds:g} s...",
            file=sys.stderr,
            flush=True,
        )
        for process in clients:
            process.join(timeout=args.seconds + 120)
        clients_done.set()
        drain_started = time.time()
        for process in workers:
            process.join(timeout=max(1.0, args.drain_timeout - (time.time() - drain_started)))
        drained = all(not p.is_alive() for p in workers)
        elapsed = time.time() - started
    finally:
        for process in clients + workers:
            if process.is_alive():
                process.terminate()
                process.join(5)
    results = analyse(url, outdir, args)
    results.update(elapsed=elapsed, drain=time.time() - drain_started, drained=drained)
    shutil.rmtree(outdir, ignore_errors=True)
    return results


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def analyse(url: str, outdir: Path, args) -> dict:
    client_data = [_read(outdir / f"client-{i}.json") for i in range(args.clients)]
    worker_data = [_read(outdir / f"worker-{i}.json") for i in range(args.workers)]
    missing_reports = sum(not d for d in client_data + worker_data)
    submitted = [job for d in client_data for job in d.get("submitted", [])]
    cancels = [c for d in client_data for c in d.get("cancels", [])]
    claims = [c for d in worker_data for c in d.get("claims", [])]
    finishes = [f for d in worker_data for f in d.get("finishes", [])]
    errors = [e for d in client_data + worker_data for e in d.get("errors", [])]
    latencies = [x for d in client_data for x in d.get("latencies", [])]

    from melcore.store import Store

    store = Store(url, migrate=False)
    final = {job["id"]: job for job in store.list_jobs()}
    workers_left = store.live_workers(within=1e9)
    store.close()

    not_visible = {j for j in submitted if j not in final}
    never_ended = {j for j in submitted if j in final and final[j]["state"] == "queued"}
    claim_counts = Counter(c["job"] for c in claims)
    finish_counts = Counter(f["job"] for f in finishes if f["ok"])
    duplicated = (
        {j for j, n in claim_counts.items() if n > 1}
        | {j for j, n in finish_counts.items() if n > 1}
        | {j for j, job in final.items() if (job["attempts"] or 0) > 1}
    )
    stuck = {j for j, job in final.items() if job["state"] == "running"}

    # Consistency beyond the three goals.
    cancelled_at_once = {c["job"] for c in cancels if c["state"] == "cancelled"}
    cancel_violations = {j for j in cancelled_at_once if final.get(j, {}).get("state") != "cancelled"}
    ended_by_claimant = {(f["job"], f["state"]) for f in finishes if f["ok"]}
    wrong_end = {
        j
        for j, job in final.items()
        if j in claim_counts
        and job["state"] in ("done", "failed", "cancelled")
        and (j, job["state"]) not in ended_by_claimant
    }
    claimed_after_cancel = {
        c["job"]
        for c in claims
        if any(x["job"] == c["job"] and x["state"] == "cancelled" and x["t"] < c["t"] - 1.0 for x in cancels)
    }
    states = Counter(job["state"] for job in final.values())
    return {
        "lost": len(not_visible | never_ended),
        "duplicated": len(duplicated),
        "stuck": len(stuck),
        "not_visible": sorted(not_visible)[:10],
        "never_ended": sorted(never_ended)[:10],
        "duplicated_ids": sorted(duplicated)[:10],
        "stuck_ids": sorted(stuck)[:10],
        "submitted": len(submitted),
        "claims": len(claims),
        "finishes": len(finishes),
        "rejected_finishes": sum(not f["ok"] for f in finishes),
        "beats": sum(d.get("beats", 0) for d in worker_data),
        "cancels": len(cancels),
        "cancel_answers": dict(Counter(c["state"] for c in cancels)),
        "states": dict(states),
        "cancel_violations": len(cancel_violations),
        "wrong_end": len(wrong_end),
        "claimed_after_cancel": len(claimed_after_cancel),
        "errors": errors,
        "missing_reports": missing_reports,
        "workers_left": len(workers_left),
        "tensorflow": any(d.get("tensorflow") for d in worker_data),
        "submit_p50_ms": 1000 * _percentile(latencies, 0.5),
        "submit_p99_ms": 1000 * _percentile(latencies, 0.99),
    }


def report(name: str, r: dict) -> None:
    print(
        f"[{name}] {r['submitted']:,} submitted, {r['cancels']:,} cancel requests "
        f"(answers {json.dumps(r['cancel_answers'], sort_keys=True)}), {r['claims']:,} claims "
        f"({r['claims'] / max(r['elapsed'], 1e-9):.1f}/s), {r['beats']:,} heartbeats, final states "
        f"{json.dumps(r['states'], sort_keys=True)}; drained in {r['drain']:.1f} s"
        + ("" if r["drained"] else " (DRAIN TIMEOUT: workers terminated)")
    )
    print(
        f"[{name}] submit latency p50 {r['submit_p50_ms']:.1f} ms, p99 {r['submit_p99_ms']:.1f} ms; "
        f"rejected finishes {r['rejected_finishes']}, cancel violations {r['cancel_violations']}, "
        f"ended by a non-claimant {r['wrong_end']}, claimed after cancel {r['claimed_after_cancel']}, "
        f"worker rows left {r['workers_left']}, errors {len(r['errors'])}, missing process reports "
        f"{r['missing_reports']}{', TensorFlow was imported!' if r['tensorflow'] else ''}"
    )
    for label in ("not_visible", "never_ended", "duplicated_ids", "stuck_ids"):
        if r[label]:
            print(f"[{name}] {label}: {r[label]}")
    for error in r["errors"][:5]:
        print(f"[{name}] error: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients submit and cancel")
    parser.add_argument("--clients", type=int, default=8, help="submitter/canceller processes")
    parser.add_argument("--workers", type=int, default=2, help="claimer (worker) processes")
    parser.add_argument("--rate", type=float, default=6.0, help="jobs submitted per second over all clients")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=180.0,
        help="seconds the workers get to empty the queue after the clients stop",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="melreview-bench-home-"))
    os.environ["MELREVIEW_HOME"] = str(home)  # nothing of the bench lands in the user's data folder
    summary, failed = [], False
    try:
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if name == "sqlite":
                backend = sqlite_file()
            elif name == "postgresql":
                backend = postgres_server()
            else:
                parser.error(f"unknown backend {name!r}; use sqlite and/or postgresql")
            try:
                with backend as url:
                    result = run_backend(name, url, args)
            except (FileNotFoundError, subprocess.CalledProcessError) as exc:
                print(f"[{name}] skipped: {exc}")
                summary.append(f"{name}: skipped")
                continue
            report(name, result)
            failed |= bool(
                result["lost"]
                or result["duplicated"]
                or result["stuck"]
                or result["errors"]
                or result["cancel_violations"]
                or result["wrong_end"]
                or not result["drained"]
            )
            summary.append(f"{name}: lost={result['lost']} duplicated={result['duplicated']} stuck={result['stuck']}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(" | ".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
