"""Feature caching in shards: the speed-up of 2 worker processes over 1, sharing the store and MELREVIEW_HOME.

    python bench/shards.py [--patients 120] [--model efficientnet-lite0] [--image-size 224] [--shards 4]
                           [--workers 1,2] [--append]

The synthetic demo cohort (:func:`melcore.demo.make_demo_cohort`) is generated once; every
worker count then gets a fresh ``MELREVIEW_HOME`` and SQLite store (empty image and feature
caches), the dataset is registered, ``python -m melcore jobs submit --kind features --shards
N`` queues the shards, and that many ``python -m trainers.worker --once`` processes drain the
queue. The time is wall clock from starting the workers to the last of them exiting (TensorFlow
start-up included: each worker pays it). The baseline is one worker, measured in the same run.
Every image file is read once before the first timing so that no worker count starts with a
colder page cache than another. The last line holds the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melcore.demo import make_demo_cohort  # noqa: E402
from melcore.store import Store  # noqa: E402


def _env(home: Path) -> dict:
    env = dict(
        os.environ,
        MELREVIEW_HOME=str(home),
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="3",
        MELREVIEW_DATA_ROOTS=str(home.parent),
    )
    env.pop("MELREVIEW_DB_URL", None)
    return env


def _run(n_workers: int, cohort: Path, work: Path, args) -> dict:
    """Queue the shards in a fresh home and drain them with ``n_workers`` worker processes."""
    home = work / f"home-{n_workers}"
    home.mkdir()
    env = _env(home)
    os.environ.update(MELREVIEW_HOME=env["MELREVIEW_HOME"], MELREVIEW_DATA_ROOTS=env["MELREVIEW_DATA_ROOTS"])
    url = f"sqlite:///{home / 'store.db'}"
    store = Store(url)
    store.register_dataset("demo-bench", cohort / "labels.csv", cohort / "jpeg" / "train")
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "melcore",
            "jobs",
            "--db",
            url,
            "submit",
            "--dataset",
            "demo-bench",
            "--kind",
            "features",
            "--shards",
            str(args.shards),
            "--model",
            args.model,
            "--image-size",
            str(args.image_size),
            "--weights",
            "none",
            "--mode",
            "fast-head",
            "--seed",
            "0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ids = [int(line) for line in submit.stdout.split()]
    started = time.perf_counter()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "trainers.worker", "--db", url, "--once", "--poll", "0.2"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(n_workers)
    ]
    outputs = [w.communicate()[0] for w in workers]
    seconds = time.perf_counter() - started
    if any(w.returncode for w in workers):
        raise SystemExit("a worker failed:\n" + "\n".join(o[-3000:] for o in outputs))
    jobs = [store.get_job(i) for i in ids]
    if any(job["state"] != "done" for job in jobs):
        raise SystemExit(f"not every shard finished: {[(j['id'], j['state'], j['error']) for j in jobs]}")
    shard_seconds = [float(job["progress"]["seconds"]) for job in jobs]
    n_images = sum(int(job["progress"]["n_images"]) for job in jobs)
    computed = sum(int(job["progress"]["misses"]) for job in jobs)
    by_worker: dict[str, int] = {}
    for job in jobs:
        by_worker[job["worker_id"]] = by_worker.get(job["worker_id"], 0) + 1
    store.close()
    return {
        "workers": n_workers,
        "seconds": seconds,
        "n_images": n_images,
        "computed": computed,
        "shard_seconds": shard_seconds,
        "shards_per_worker": sorted(by_worker.values(), reverse=True),
    }


def _warm(cohort: Path) -> int:
    n = 0
    for path in sorted((cohort / "jpeg" / "train").iterdir()):
        path.read_bytes()
        n += 1
    return n


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=120, help="demo cohort size (about 4 images per patient)")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="worker counts to time, the first is the baseline")
    parser.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="melreview-bench-shards-") as tmp:
        work = Path(tmp)
        cohort = work / "demo"
        make_demo_cohort(cohort, n_patients=args.patients, seed=0)
        n_files = _warm(cohort)
        print(f"demo cohort: {n_files:,} images; load average {_load()}", file=sys.stderr)
        results = []
        for n in counts:
            result = _run(n, cohort, work, args)
            result["load"] = _load()
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
    base = results[0]
    rows = [
        f"| {r['workers']} | {r['seconds']:.1f} s | {r['n_images'] / r['seconds']:.1f} | "
        f"{', '.join(str(s) for s in r['shards_per_worker'])} | {sum(r['shard_seconds']):.1f} s | "
        f"{base['seconds'] / r['seconds']:.2f}x | {r['load']} |"
        for r in results
    ]
    ratios = " | ".join(f"{r['workers']} workers {base['seconds'] / r['seconds']:.2f}x" for r in results[1:])
    headline = (
        f"features of {base['n_images']:,} images in {args.shards} shards: "
        f"{base['workers']} worker {base['seconds']:.1f} s | {ratios}"
    )
    if args.append:
        machine = (
            f"{os.cpu_count()} vCPU {platform.processor() or platform.machine()}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}"
        )
        text = "\n".join(
            [
                "",
                "## Feature caching in shards, 1 vs 2 workers — `bench/shards.py`",
                "",
                f"{date.today().isoformat()}, {machine}. The synthetic demo cohort ({args.patients} patients, "
                f"{base['n_images']:,} images), {args.model} at {args.image_size} px (weights none: the same "
                f"work as ImageNet weights), queued as {args.shards} `features` jobs (`jobs submit --kind features "
                f"--shards {args.shards}`) and drained by N `trainers.worker --once` processes sharing one SQLite "
                "store and `MELREVIEW_HOME`; a fresh home (empty caches) per row. Wall clock from starting the "
                "workers to the last exit, TensorFlow start-up included. Baseline: 1 worker, same run.",
                "",
                "| workers | wall | images/s | shards per worker | sum of shard times | speed-up | load average "
                "after (1/5/15 min) |",
                "| --- | --- | --- | --- | --- | --- | --- |",
                *rows,
                "",
                f"`{headline}`. The 2 cores were shared with other engineers' work during the run (load averages "
                "above). On one 2-core machine two workers split the cores TensorFlow's thread pools already use, "
                "so this measures sharing one machine; several machines (each shard on its own cores) were not "
                "measured here.",
                "",
            ]
        )
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as out:
            out.write(text)
    print(headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
