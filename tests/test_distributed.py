"""Training across processes (melcore.distributed): placements, the fit loop, two local workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melcore import distributed
from melcore.devtools.ports import free_ports
from melcore.errors import ConfigError

HERE = Path(__file__).resolve().parent


def test_placement_round_trips_through_tf_config():
    placement = distributed.Placement.parse("a.example:2222, b.example:2223", 1)
    assert placement.workers == ("a.example:2222", "b.example:2223")
    assert not placement.is_chief and placement.n_workers == 2
    again = distributed.Placement.from_environment({"TF_CONFIG": json.dumps(placement.tf_config())})
    assert again == placement
    assert distributed.Placement.from_environment({}) is None


@pytest.mark.parametrize(
    "workers, index, message",
    [
        ("", 0, "at least one worker"),
        ("host", 0, "not host:port"),
        ("host:99999", 0, "not host:port"),
        ("h:1,h:1", 0, "repeat"),
        ("h:1,h:2", 2, "index must be 0..1"),
    ],
)
def test_bad_placements_say_what_is_wrong(workers, index, message):
    with pytest.raises(ConfigError, match=message):
        distributed.Placement.parse(workers, index)


def test_tf_config_that_is_not_a_worker_cluster_is_refused():
    with pytest.raises(ConfigError, match="not a worker cluster"):
        distributed.Placement.from_tf_config("{}")
    with pytest.raises(ConfigError, match="task type 'ps'"):
        distributed.Placement.from_tf_config(
            json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "ps", "index": 0}})
        )


@pytest.mark.parametrize("n_rows, n_replicas", [(8, 2), (7, 2), (3, 4), (0, 3), (10, 3)])
def test_replica_rows_partition_the_batch(n_rows, n_replicas):
    parts = [distributed.replica_rows(n_rows, n_replicas, r) for r in range(n_replicas)]
    covered = np.concatenate([np.arange(n_rows)[p] for p in parts])
    assert covered.tolist() == list(range(n_rows))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_fit_loop_matches_keras_fit():
    sys.path.insert(0, str(HERE))
    import multiworker_fit as job

    model = job.build()
    history = distributed.fit_loop(model, job.Batches(), epochs=3, class_weight={0: 1.0, 1: 2.0})
    reference = job.build()
    keras_history = reference.fit(job.Batches(), epochs=3, class_weight={0: 1.0, 1: 2.0}, shuffle=False, verbose=0)
    np.testing.assert_allclose(history["loss"], keras_history.history["loss"], rtol=1e-4)
    for mine, theirs in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    assert history["loss"][-1] < history["loss"][0]  # it learned something
    scores = distributed.predict_loop(model, [b[0] for b in (job.Batches()[0], job.Batches()[1])])
    np.testing.assert_allclose(
        scores, model.predict(np.concatenate([job.Batches()[i][0] for i in (0, 1)]), verbose=0), rtol=1e-5
    )


def test_fit_loop_stops_when_a_callback_says_so():
    import keras

    sys.path.insert(0, str(HERE))
    import multiworker_fit as job

    class StopAfterTwoBatches(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.model.stop_training = True

    history = distributed.fit_loop(job.build(), job.Batches(), epochs=3, callbacks=[StopAfterTwoBatches()])
    assert len(history["loss"]) == 1


def test_two_local_workers_train_the_same_model_as_one_process(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    script = str(HERE / "multiworker_fit.py")
    single = tmp_path / "single.npz"
    subprocess.run([sys.executable, script, str(single)], env=env, check=True, timeout=300)
    workers = ",".join(f"localhost:{p}" for p in free_ports(2, "localhost"))
    chief_out = tmp_path / "chief.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(chief_out), workers, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    one, two = np.load(single), np.load(chief_out)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    for i in range(int(one["n"])):
        np.testing.assert_allclose(two[f"w{i}"], one[f"w{i}"], rtol=1e-4, atol=1e-5)


def _train_args(cohort_dir: Path, out: Path) -> list[str]:
    """A tiny full-mode run of the CLI (dropout off: tests/multiworker_train.py): basic-cnn at 32 px, 2 epochs."""
    return [
        sys.executable,
        str(HERE / "multiworker_train.py"),
        "train",
        "--csv",
        str(cohort_dir / "labels.csv"),
        "--images",
        str(cohort_dir / "images"),
        "--model",
        "basic-cnn",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--augment",
        "none",
        "--seed",
        "1",
        "--no-early-stopping",
        "--workers",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_two_workers_through_the_train_cli_record_the_run_one_process_records(tmp_path):
    from test_train import make_easy_cohort

    make_easy_cohort(tmp_path / "cohort", n_patients=12, per_patient=3, size=32)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(HERE.parent)}
    env.pop("TF_CONFIG", None)
    single = subprocess.run(
        _train_args(tmp_path / "cohort", tmp_path / "single"),
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    hosts = ",".join(f"localhost:{p}" for p in free_ports(2, "localhost"))
    chief_out = tmp_path / "placed"
    procs = [
        subprocess.Popen(
            _train_args(tmp_path / "cohort", chief_out) + ["--worker-hosts", hosts, "--worker-index", str(i)],
            env=env,
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[1][-3000:] for o in outputs)
    assert f"run          {chief_out}" in outputs[0][0]
    assert "worker 1: done; worker 0 (localhost:" in outputs[1][0]
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    two = json.loads((chief_out / "metrics.json").read_text())
    assert (two["n_replicas"], one["n_replicas"]) == (2, 1)
    assert "MultiWorkerMirroredStrategy" in two["device"]
    for key in ("n_train", "n_select", "n_val", "n_malignant", "epochs_run", "best_epoch"):
        assert two[key] == one[key], key
    for key in ("train_loss", "select_loss", "select_auroc"):
        np.testing.assert_allclose(
            [h[key] for h in two["history"]], [h[key] for h in one["history"]], rtol=1e-3, err_msg=key
        )
    for key in ("val_loss", "val_auroc", "sensitivity", "specificity"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-3, err_msg=key)
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"]  # it learned something
    scores = [pd.read_csv(d / "val_predictions.csv")["prediction"] for d in (tmp_path / "single", chief_out)]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-3, atol=1e-5)
    assert (chief_out / "model.keras").is_file() and (chief_out / "val_predictions.csv").is_file()


def test_a_job_placed_on_another_machine_is_left_for_that_machine(tmp_path):
    from melcore.jobs import can_run_here
    from melcore.store import Store

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    elsewhere = store.submit_job(
        {"model": "basic-cnn", "placement": {"workers": ["elsewhere.invalid:2222", "localhost:2223"], "index": 0}}
    )
    here = store.submit_job(
        {"model": "basic-cnn", "placement": {"workers": ["elsewhere.invalid:2222", "localhost:2223"], "index": 1}}
    )
    plain = store.submit_job({"model": "basic-cnn"})
    assert store.claim_job("w1", accept=can_run_here)["id"] == here
    assert store.claim_job("w2", accept=can_run_here)["id"] == plain
    assert store.claim_job("w3", accept=can_run_here) is None
    assert store.get_job(elsewhere)["state"] == "queued"
    assert store.claim_job("w4")["id"] == elsewhere  # without the filter (as before) the oldest is taken


@pytest.mark.slow
def test_jobs_submitted_across_two_local_workers_train_one_recorded_run(tmp_path, capsys):
    from test_train import make_easy_cohort

    from melcore.__main__ import main
    from melcore.store import Store

    csv, images = make_easy_cohort(tmp_path / "cohort", n_patients=12, per_patient=3, size=32)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.register_dataset("easy", csv, images)
    hosts = ",".join(f"localhost:{p}" for p in free_ports(2, "localhost"))
    assert (
        main(
            [
                "jobs",
                "--db",
                url,
                "submit",
                "--dataset",
                "easy",
                "--model",
                "basic-cnn",
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--augment",
                "none",
                "--seed",
                "1",
                "--workers",
                "1",
                "--worker-hosts",
                hosts,
            ]
        )
        == 0
    )
    ids = [int(line) for line in capsys.readouterr().out.split()]
    assert [store.get_job(i)["config"]["placement"]["index"] for i in ids] == [0, 1]
    assert (
        main(
            [
                "jobs",
                "--db",
                url,
                "submit",
                "--dataset",
                "easy",
                "--model",
                "basic-cnn",
                "--mode",
                "fast-head",
                "--worker-hosts",
                hosts,
            ]
        )
        == 2
    )
    assert "needs mode 'full'" in capsys.readouterr().err
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(HERE.parent)}
    env.pop("TF_CONFIG", None)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "trainers.worker", "--db", url, "--once", "--poll", "0.2"],
            cwd=HERE.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    chief, other = (store.get_job(i) for i in ids)
    assert (chief["state"], other["state"]) == ("done", "done"), (chief["error"], other["error"])
    assert chief["run_id"] is not None and other["run_id"] is None
    assert len({chief["worker_id"], other["worker_id"]}) == 2
    run = store.get_run(chief["run_id"])
    assert run["metrics"]["n_replicas"] == 2 and "2 workers" in run["metrics"]["device"]
    assert [r["id"] for r in store.list_runs()] == [run["id"]]  # only the chief recorded a run
    assert len(store.get_predictions(run["id"])) == run["metrics"]["n_val"]
    assert any(point.get("end_of_epoch") for point in chief["history"])  # progress came back from the process
    assert main(["jobs", "--db", url, "list"]) == 0
    assert "as worker 1 of 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--worker-hosts", "localhost:2222,localhost:2223"], "needs --worker-index"),
        (["--worker-index", "1"], "--worker-index goes with --worker-hosts"),
        (["--worker-hosts", "localhost:2222,localhost:2223", "--worker-index", "2"], "worker index must be 0..1"),
        (["--worker-hosts", "localhost:2222", "--worker-index", "0", "--mode", "fast-head"], "needs mode 'full'"),
        (["--worker-hosts", "localhost:2222", "--worker-index", "0", "--folds", "3"], "--folds trains on one worker"),
    ],
)
def test_bad_placements_on_the_train_cli_exit_2_before_training(tmp_path, capsys, extra, message):
    from melcore.__main__ import main

    code = main(["train", "--csv", str(tmp_path / "missing.csv"), "--model", "basic-cnn", "--image-size", "32", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def group(tmp_path):
    """A store holding one run queued across three workers (a, b, c) and the jobs' ids."""
    from melcore.jobs import submit_jobs
    from melcore.store import Store
    from melcore.training.config import TrainConfig

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    dataset_id = store.add_dataset("d", tmp_path / "labels.csv")
    placement = distributed.Placement.parse("a.example:2222,b.example:2223,c.example:2224", 0)
    config = TrainConfig.from_dict({"model": "basic-cnn", "image_size": 32})
    ids = submit_jobs(store, config, store.get_dataset(dataset_id), workers=placement)
    yield store, ids
    store.close()


def _failure(store, ids, now=None, stale_after=30.0):
    import time

    from melcore.jobs import group_failure

    return group_failure(store.group_jobs(ids[0]), ids[0], time.time() if now is None else now, stale_after)


def test_a_group_waiting_for_its_workers_or_training_together_goes_on(group):
    import time

    store, ids = group
    assert _failure(store, ids) is None  # siblings not claimed yet: TensorFlow waits for them
    store.update_job(ids[1], state="running", heartbeat_at=time.time() - 5)
    store.update_job(ids[2], state="done")
    assert _failure(store, ids) is None


@pytest.mark.parametrize(
    "sibling, message",
    [
        ({"state": "failed", "error": "ResourceExhaustedError: out of memory\ntraceback"}, "failed: ResourceExhausted"),
        ({"state": "cancelled"}, "was cancelled"),
        ({"state": "running", "heartbeat_at": 1000.0}, "stopped responding (no heartbeat for 100 s, more than 30 s)"),
        ({"state": "queued", "error": "requeued: worker x stopped responding (attempt 1 of 3)"}, "back to the queue"),
    ],
)
def test_a_dead_sibling_ends_the_group_with_its_address(group, sibling, message):
    store, ids = group
    store.update_job(ids[0], state="running", heartbeat_at=1099.0)
    store.update_job(ids[2], **sibling)
    failure = _failure(store, ids, now=1100.0)
    assert failure is not None and message in failure
    assert failure.startswith(f"worker 2 (c.example:2224, job #{ids[2]}) of this run")
    assert "Queue the run again" in failure
    store.update_job(ids[0], cancel_requested=True)  # stopping anyway: the cancel, not a failure
    assert _failure(store, ids, now=1100.0) is None


def test_group_and_collective_timeouts_are_read_from_their_settings(monkeypatch):
    from melcore import settings

    monkeypatch.delenv("MELREVIEW_GROUP_TIMEOUT", raising=False)
    monkeypatch.delenv("MELREVIEW_COLLECTIVE_TIMEOUT", raising=False)
    assert settings.group_timeout() == 30.0 and settings.collective_timeout() is None
    monkeypatch.setenv("MELREVIEW_GROUP_TIMEOUT", "7.5")
    monkeypatch.setenv("MELREVIEW_COLLECTIVE_TIMEOUT", "120")
    assert settings.group_timeout() == 7.5 and settings.collective_timeout() == 120.0
    assert distributed.communication_options(120.0).timeout_seconds == 120.0
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("MELREVIEW_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"MELREVIEW_COLLECTIVE_TIMEOUT='{bad}' is not a positive number"):
            settings.collective_timeout()
