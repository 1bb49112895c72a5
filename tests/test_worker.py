"""Real worker processes on SQLite and PostgreSQL: exactly-once, SIGKILL recovery, cancel, bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melcore.devtools.ports import free_ports
from melcore.store import Store

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "basic-cnn", "image_size": 32, "epochs": 1, "batch_size": 16, "augment": "none", "seed": 1}


@pytest.fixture
def queue(db_url, demo_dir):
    store = Store(db_url)
    dataset_id, _ = store.register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    yield store, dataset_id
    store.close()


def _worker(db_url: str, *extra: str, **environ: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), TF_CPP_MIN_LOG_LEVEL="3", **environ)
    return subprocess.Popen(
        [sys.executable, "-m", "trainers.worker", "--db", db_url, "--poll", "0.3", *extra],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def test_two_workers_run_six_jobs_each_exactly_once(queue, db_url):
    store, dataset_id = queue
    ids = [store.submit_job(dict(TINY, seed=i), dataset_id=dataset_id) for i in range(6)]
    workers = [_worker(db_url, "--once"), _worker(db_url, "--once")]
    outputs = [_stop_after_exit(w) for w in workers]
    jobs = {job["id"]: job for job in store.list_jobs()}
    assert all(jobs[i]["state"] == "done" for i in ids), {i: (jobs[i]["state"], jobs[i]["error"]) for i in ids}
    assert all(jobs[i]["attempts"] == 1 for i in ids)
    runs = store.list_runs()
    assert sorted(r["job_id"] for r in runs) == ids  # one run per job: nothing ran twice
    assert {jobs[i]["worker_id"] for i in ids}.__len__() >= 1
    for job_id in ids:
        history = jobs[job_id]["history"]
        assert any(point.get("end_of_epoch") for point in history), "no end-of-epoch point recorded"
        assert jobs[job_id]["run_id"] in {r["id"] for r in runs}
    run = store.get_run(jobs[ids[0]]["run_id"])
    assert Path(run["run_dir"], "model.keras").exists()
    assert len(store.get_predictions(run["id"])) > 0
    assert "ended: done" in "".join(outputs)


def _stop_after_exit(process: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"worker did not finish: {out[-3000:]}")
    assert process.returncode == 0, out[-3000:]
    return out


def test_sigkilled_worker_job_is_requeued_and_finished_by_the_next(queue, db_url):
    store, dataset_id = queue
    job_id = store.submit_job(dict(TINY, epochs=30, early_stopping_patience=None), dataset_id=dataset_id)
    first = _worker(db_url, "--stale-after", "3")
    try:
        _wait(lambda: (store.get_job(job_id)["progress"] or {}).get("batch"), 240, "the first batch")
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert store.get_job(job_id)["state"] == "running"  # orphaned: nobody will finish it
    second = _worker(db_url, "--stale-after", "3")
    try:
        _wait(lambda: store.get_job(job_id)["attempts"] == 2, 120, "the job to be claimed again")
        job = store.get_job(job_id)
        assert job["state"] == "running" and job["worker_id"] != ""
        assert "stopped responding" in (job["error"] or "")
        store.request_cancel(job_id)
        _wait(lambda: store.get_job(job_id)["state"] == "cancelled", 120, "the cancel")
    finally:
        _stop(second)


def test_cancel_running_job_and_bad_config_fails_while_worker_carries_on(queue, db_url):
    store, dataset_id = queue
    bad = store.submit_job({"model": "no-such-model", "image_size": 32}, dataset_id=dataset_id)
    long = store.submit_job(dict(TINY, epochs=50, early_stopping_patience=None), dataset_id=dataset_id)
    after = store.submit_job(TINY, dataset_id=dataset_id)
    worker = _worker(db_url)
    try:
        _wait(lambda: store.get_job(bad)["state"] == "failed", 240, "the bad job to fail")
        failed = store.get_job(bad)
        assert "no-such-model" in failed["error"] and "basic-cnn" in failed["error"]  # lists the valid names
        _wait(lambda: (store.get_job(long)["progress"] or {}).get("batch"), 240, "the long job's first batch")
        cancel = subprocess.run(
            [sys.executable, "-m", "melcore", "jobs", "--db", db_url, "cancel", str(long)],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cancel.returncode == 0 and "running" in cancel.stdout
        _wait(lambda: store.get_job(long)["state"] == "cancelled", 60, "the running job to stop")
        assert store.get_job(long)["run_id"] is None
        _wait(lambda: store.get_job(after)["state"] == "done", 240, "the next job")
    finally:
        out = _stop(worker)
    assert "job %d failed" % bad in out


def _group_of_two(store: Store, dataset_id: int) -> list[int]:
    """A run queued across two local workers (full mode); only one worker is started, so its
    training process waits for the other in TensorFlow's collective setup."""
    from melcore.distributed import Placement
    from melcore.jobs import submit_jobs
    from melcore.training.config import TrainConfig

    hosts = Placement.parse(",".join(f"localhost:{p}" for p in free_ports(2, "localhost")), 0)
    return submit_jobs(
        store, TrainConfig.from_dict(dict(TINY, workers=1)), store.get_dataset(dataset_id), workers=hosts
    )


def test_cancelling_a_sibling_stops_a_worker_waiting_on_it(queue, db_url):
    store, dataset_id = queue
    chief, other = _group_of_two(store, dataset_id)
    worker = _worker(db_url, "--once", MELREVIEW_GROUP_TIMEOUT="3")
    try:
        _wait(lambda: store.get_job(chief)["state"] == "running", 120, "worker 0's job to start")
        time.sleep(3)  # its training process is inside the strategy's setup, waiting for worker 1
        assert store.request_cancel(other) == "cancelled"
        assert store.get_job(chief)["cancel_requested"]
        _wait(lambda: store.get_job(chief)["state"] == "cancelled", 90, "worker 0's job to be cancelled")
        assert worker.wait(timeout=60) == 0
    finally:
        out = _stop(worker)
    assert "did not stop within 3 s" in out
    assert store.get_job(chief)["run_id"] is None


def test_a_failed_sibling_fails_the_waiting_worker_naming_its_address(queue, db_url):
    store, dataset_id = queue
    chief, other = _group_of_two(store, dataset_id)
    address = store.get_job(other)["config"]["placement"]["workers"][1]
    worker = _worker(db_url, "--once", MELREVIEW_GROUP_TIMEOUT="3")
    try:
        _wait(lambda: store.get_job(chief)["state"] == "running", 120, "worker 0's job to start")
        store.update_job(other, state="failed", error="its machine ran out of memory")
        _wait(lambda: store.get_job(chief)["state"] == "failed", 60, "worker 0's job to fail")
        assert worker.wait(timeout=60) == 0
    finally:
        _stop(worker)
    error = store.get_job(chief)["error"]
    assert f"worker 1 ({address}, job #{other}) of this run failed: its machine ran out of memory" in error


def test_jobs_cli_submit_list_and_validation(queue, db_url, capsys):
    from cli_helpers import run_main

    store, _ = queue

    def cli(*args):
        return run_main(["jobs", "--db", db_url, *args], capsys)

    done = cli(
        "submit", "--dataset", "demo", "--model", "basic-cnn", "--image-size", "32", "--epochs", "1", "--each-clinic"
    )
    assert done.returncode == 0, done.stderr
    ids = [int(x) for x in done.stdout.split()]
    clinics = sorted(store.get_job(i)["config"]["clinic"] for i in ids)
    assert clinics == ["clinic-east", "clinic-north", "clinic-south"]
    listing = json.loads(cli("list", "--json").stdout)
    assert {j["id"] for j in listing} == set(ids) and all(j["state"] == "queued" for j in listing)
    bad = cli("submit", "--dataset", "demo", "--model", "resnet9000")
    assert bad.returncode == 2 and "resnet9000" in bad.stderr and "basic-cnn" in bad.stderr
    bad_clinic = cli("submit", "--dataset", "demo", "--model", "basic-cnn", "--image-size", "32", "--clinic", "mars")
    assert bad_clinic.returncode == 2 and "clinic-north" in bad_clinic.stderr
    missing = cli("submit", "--dataset", "nope", "--model", "basic-cnn")
    assert missing.returncode == 2 and "known datasets: demo" in missing.stderr
    folds = cli("submit", "--dataset", "demo", "--model", "basic-cnn", "--image-size", "32", "--folds", "3")
    assert folds.returncode == 0, folds.stderr
    kfold = store.get_job(int(folds.stdout.split()[0]))
    assert kfold["kind"] == "kfold" and kfold["config"]["n_folds"] == 3
    cross = cli(
        "submit",
        "--dataset",
        "demo",
        "--model",
        "basic-cnn",
        "--image-size",
        "32",
        "--kind",
        "cross-clinic",
        "--clinic",
        "clinic-north",
    )
    assert cross.returncode == 2 and "gives no clinic" not in cross.stderr and "no clinic" in cross.stderr
    assert len(store.list_jobs()) == 4  # refused submissions queue nothing


def test_no_mirrored_strategy_on_a_single_device():
    from melcore.jobs import distribution_strategy

    assert distribution_strategy() is None
