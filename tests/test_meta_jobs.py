"""Patient-context (meta) jobs: validation, the worker job kind, fusion with a stored image run, cancel, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_meta import _write_isic2020_csv, scores_for, synthetic_table  # tests/ is on sys.path

from melcore.errors import CancelledError, ConfigError, MelcoreError
from melcore.jobs import submit_meta_job
from melcore.meta.jobs import meta_job_config, stored_image_scores, train_meta_run
from melcore.meta.model import cross_validate_meta
from melcore.metrics import auroc
from melcore.store import Store


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return synthetic_table(n_patients=120, seed=4)


@pytest.fixture
def registered(table, tmp_path):
    store = Store()
    csv = tmp_path / "train.csv"
    _write_isic2020_csv(table, csv)
    dataset_id = store.add_dataset("isic-like", csv, format="isic2020", options={"check_images": "none"})
    return store, store.get_dataset(dataset_id)


def _image_run(store: Store, dataset_id: int, table: pd.DataFrame, split: str, rows=None) -> int:
    run_id = store.add_run("cnn", dataset_id=dataset_id, model="cnn-bn")
    scores = scores_for(table, signal=3.0)
    scores = scores.merge(table[["image_name", "patient_id", "target"]], on="image_name")
    store.add_predictions(run_id, scores if rows is None else scores.iloc[rows], split=split)
    return run_id


def _run_worker(store: Store) -> dict:
    from trainers.worker import Worker

    assert Worker(store, once=True, poll=0.1).run() == 1
    return store.list_jobs()[0]


def test_job_config_fills_defaults_and_names_what_is_wrong():
    assert meta_job_config(None) == {"n_folds": 5, "seed": 0, "feature_set": "context", "image_run_id": None}
    assert meta_job_config({"n_folds": 3, "image_run_id": 7})["image_run_id"] == 7
    for bad, message in [
        ({"n_folds": 1}, "n_folds must be a whole number 2-20"),
        ({"n_folds": 2.5}, "n_folds"),
        ({"seed": -1}, "seed"),
        ({"feature_set": "pixels"}, "choose baseline, context"),
        ({"image_run_id": "3"}, "image_run_id"),
        ({"epochs": 3}, "unknown .* epochs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            meta_job_config(bad)


def test_worker_trains_the_patient_context_model_and_stores_every_oof_prediction(registered, table):
    store, dataset = registered
    job_id = submit_meta_job(store, dataset, {"n_folds": 3})
    job = _run_worker(store)
    assert (job["id"], job["kind"], job["state"]) == (job_id, "meta", "done"), job.get("error")
    assert job["progress"]["stage"] == "fold" and job["progress"]["epoch"] == 3
    run = store.get_run(job["run_id"])
    assert run["kind"] == "meta" and run["model"] == "meta" and run["name"].startswith("patient context ·")
    oof = store.get_predictions(run["id"], split="oof")
    assert len(oof) == len(table) and oof["image_name"].is_unique
    expected = auroc(oof["target"], oof["prediction"])
    assert run["metrics"]["oof_auroc"] == pytest.approx(expected)
    assert expected > 0.7  # the planted age and odd-site signal


def test_fusion_uses_the_image_runs_stored_out_of_fold_scores(registered, table):
    store, dataset = registered
    image_run = _image_run(store, dataset["id"], table, "oof")
    submit_meta_job(store, dataset, {"n_folds": 3, "image_run_id": image_run})
    job = _run_worker(store)
    assert job["state"] == "done", job.get("error")
    run = store.get_run(job["run_id"])
    metrics = run["metrics"]
    assert run["model"] == "meta+image fusion" and f"+ run #{image_run}" in run["name"]
    assert metrics["oof_auroc"] > max(metrics["meta_oof_auroc"], metrics["fusion"]["image_auroc"])
    assert run["config"]["image_scores_from"].startswith(f"run #{image_run} (oof predictions")
    fused = store.get_predictions(run["id"], split="oof")
    assert auroc(fused["target"], fused["prediction"]) == pytest.approx(metrics["oof_auroc"])


def test_stored_image_scores_prefer_out_of_fold_then_validation(registered, table):
    store, dataset = registered
    val_only = _image_run(store, dataset["id"], table, "val", rows=slice(0, 100))
    scores, split = stored_image_scores(store, val_only)
    assert split == "val" and len(scores) == 100 and list(scores.columns) == ["image_name", "prediction"]
    store.add_predictions(val_only, scores_for(table), split="oof")
    assert stored_image_scores(store, val_only)[1] == "oof"
    empty = store.add_run("never scored", dataset_id=dataset["id"])
    with pytest.raises(MelcoreError, match=f"run #{empty} has no stored predictions"):
        stored_image_scores(store, empty)


def test_submit_refuses_runs_it_cannot_fuse_with(registered, table, tmp_path):
    store, dataset = registered
    other = store.add_dataset("other", tmp_path / "other.csv", format="generic")
    foreign = _image_run(store, other, table, "oof")
    with pytest.raises(ConfigError, match=f"run #{foreign} belongs to another dataset"):
        submit_meta_job(store, dataset, {"image_run_id": foreign})
    empty = store.add_run("never scored", dataset_id=dataset["id"])
    with pytest.raises(MelcoreError, match="no stored predictions"):
        submit_meta_job(store, dataset, {"image_run_id": empty})
    with pytest.raises(ConfigError, match="feature_set"):
        submit_meta_job(store, dataset, {"feature_set": "pixels"})
    assert store.list_jobs() == []  # nothing refused was queued


def test_a_cancel_stops_before_the_next_fold_and_writes_no_run(table, tmp_path):
    asked = []

    def stop_after_two():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(CancelledError, match="after 2 of 4 folds"):
        cross_validate_meta(table, n_folds=4, should_stop=stop_after_two)
    out = tmp_path / "run"
    with pytest.raises(CancelledError):
        train_meta_run(table, out, n_folds=3, should_stop=lambda: True)
    assert not (out / "metrics.json").exists()


def test_worker_records_a_cancelled_meta_job(registered, monkeypatch):
    from trainers import worker

    store, dataset = registered
    submit_meta_job(store, dataset, {"n_folds": 3})
    monkeypatch.setattr(worker.JobContext, "should_stop", lambda self: True)
    job = _run_worker(store)
    assert job["state"] == "cancelled" and job["run_id"] is None
    assert store.list_runs(kind="meta") == []


def test_cli_queues_a_meta_job(registered, capsys):
    from melcore.__main__ import main

    store, dataset = registered
    assert (
        main(
            [
                "jobs",
                "submit",
                "--kind",
                "meta",
                "--dataset",
                dataset["name"],
                "--folds",
                "4",
                "--meta-features",
                "baseline",
            ]
        )
        == 0
    )
    job = store.list_jobs()[0]
    assert str(job["id"]) in capsys.readouterr().out
    assert (job["kind"], job["config"]["n_folds"], job["config"]["feature_set"]) == ("meta", 4, "baseline")
    assert main(["jobs", "submit", "--kind", "meta", "--dataset", dataset["name"], "--image-run", "999"]) == 2
    assert main(["jobs", "submit", "--kind", "meta", "--dataset", dataset["name"], "--folds", "0"]) == 2
    assert "n_folds must be a whole number 2-20; got 0" in capsys.readouterr().err
    assert main(["jobs", "submit", "--kind", "meta", "--dataset", dataset["name"], "--each-clinic"]) == 2
    assert "--each-clinic goes with image-model jobs" in capsys.readouterr().err
    assert main(["jobs", "submit", "--dataset", dataset["name"], "--image-run", "1", "--model", "basic-cnn"]) == 2
    assert "--image-run goes with --kind meta" in capsys.readouterr().err
    assert main(["jobs", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["kind"] for j in listed] == ["meta"]


def test_a_requeued_meta_job_trains_in_a_folder_of_its_own(registered):
    from melcore import settings

    store, dataset = registered
    job_id = submit_meta_job(store, dataset, {"n_folds": 2})
    # the first attempt's worker died after writing the start of its run folder
    first = settings.subdir("runs") / f"job-{job_id:05d}-meta"
    first.mkdir(parents=True)
    (first / "config.json").write_text("{}")
    store.update_job(job_id, attempts=1)
    job = _run_worker(store)
    assert job["state"] == "done", job.get("error")
    run_dir = Path(store.get_run(job["run_id"])["run_dir"])
    assert run_dir != first and run_dir.name.startswith(f"job-{job_id:05d}-meta-")
    assert (first / "config.json").read_text() == "{}"  # the earlier attempt's folder is left as it was
