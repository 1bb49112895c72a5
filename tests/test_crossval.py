"""K-fold out-of-fold training, cross-clinic evaluation, their CLI commands and worker job kinds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_helpers import run_main
from test_train import Recorder, easy_config, make_easy_cohort

pytestmark = pytest.mark.slow
CLINICS = ("north", "south", "east")


@pytest.fixture(scope="module")
def easy_dir(tmp_path_factory):
    # 30 patients, 10 per clinic, one melanoma per patient (every third image).
    return make_easy_cohort(
        tmp_path_factory.mktemp("easy-crossval"), n_patients=30, per_patient=3, size=40, clinics=CLINICS
    )


@pytest.fixture
def cohort(easy_dir):
    from melcore.cohort import load_cohort

    return load_cohort(*easy_dir)


def _config(**overrides):
    values = dict(mode="fast-head", epochs=6, learning_rate=1e-2)
    values.update(overrides)
    return easy_config(**values)


def test_fit_folds_predicts_every_image_exactly_once(cohort, tmp_path):
    from sklearn.metrics import roc_auc_score

    from melcore.splits import cohort_folds
    from melcore.training.crossval import OOF_COLUMNS, fit_folds
    from melcore.training.rundir import Run

    recorder = Recorder()
    run = fit_folds(_config(), cohort, 3, progress=recorder, run_dir=tmp_path / "kfold")
    oof = pd.read_csv(run.run_dir / "oof_predictions.csv", dtype={"image_name": str})
    assert list(oof.columns) == list(OOF_COLUMNS)
    assert sorted(oof["image_name"]) == sorted(cohort.table["image_name"]) and not oof["image_name"].duplicated().any()
    # Each image's fold is the patient-grouped fold it was held out in.
    expected = pd.Series(cohort_folds(cohort, 3, 1), index=cohort.table["image_name"])
    np.testing.assert_array_equal(oof["fold"].to_numpy(), expected.loc[oof["image_name"]].to_numpy())
    assert oof.groupby("patient_id")["fold"].nunique().max() == 1

    m = run.metrics
    assert m["kind"] == "kfold" and m["status"] == "done" and m["n_folds"] == 3 and m["n_oof"] == len(cohort)
    assert m["oof_auroc"] == pytest.approx(roc_auc_score(oof["target"], oof["prediction"]))
    assert m["fold_runs"] == ["fold-0", "fold-1", "fold-2"] and len(m["fold_aurocs"]) == 3
    for k in range(3):
        sub = Run.load(run.run_dir / f"fold-{k}")
        assert sub.config.fold == k and sub.metrics["val_auroc"] == m["fold_aurocs"][k]
        assert (sub.run_dir / "model.keras").is_file()
    top = Run.load(run.run_dir)
    assert top.config.fold is None and top.config.n_folds == 3 and top.metrics["kind"] == "kfold"
    assert {c[3].get("fold") for c in recorder.calls} == {0, 1, 2}
    assert all(c[3]["n_folds"] == 3 for c in recorder.calls)
    # Features were computed once (fold 0) and reused by the other folds.
    assert Run.load(run.run_dir / "fold-2").metrics["feature_cache"]["misses"] == 0


def test_on_random_labels_the_reported_fold_aurocs_are_centred_on_chance(tmp_path):
    from melcore.cohort import load_cohort
    from melcore.training.crossval import fit_folds

    # Labels drawn independently of the images: any choice made on the reported folds (the best of 16
    # epochs) shows up as fold AUROCs above 0.5; chosen on held-out training patients, they centre on 0.5.
    fold_aurocs = []
    for seed in range(3):
        csv, images = make_easy_cohort(tmp_path / f"noise-{seed}", n_patients=40, per_patient=3, size=32, seed=seed)
        table = pd.read_csv(csv)
        table["target"] = (np.random.default_rng(100 + seed).random(len(table)) < 0.35).astype(int)
        table.to_csv(csv, index=False)
        run = fit_folds(
            _config(epochs=16, seed=seed, n_folds=5), load_cohort(csv, images), run_dir=tmp_path / f"run-{seed}"
        )
        fold_aurocs += run.metrics["fold_aurocs"]
        for k in range(5):
            chosen = json.loads((run.run_dir / f"fold-{k}" / "metrics.json").read_text())["chosen_on"]
            assert chosen["best_epoch"] == "selection" and chosen["selection"]["images"] > 0
    assert len(fold_aurocs) == 15
    assert abs(np.mean(fold_aurocs) - 0.5) < 0.05, fold_aurocs


def test_cross_clinic_matrix_is_stored_and_read_by_compare(cohort, tmp_path):
    from melcore.compare import latest_cross_clinic
    from melcore.errors import ConfigError
    from melcore.store import Store
    from melcore.training.crossval import cross_clinic
    from melcore.training.rundir import Run

    run = cross_clinic(_config(), cohort, run_dir=tmp_path / "cross")
    m = run.metrics
    clinics = sorted(CLINICS)
    assert m["kind"] == "cross-clinic" and m["clinics"] == clinics and m["status"] == "done"
    assert np.asarray(m["matrix"], dtype=float).shape == (3, 3) and np.asarray(m["n"]).shape == (3, 3)
    sizes = cohort.table.groupby("clinic").size()
    for i, trained in enumerate(clinics):
        sub = Run.load(run.run_dir / m["runs"][trained])
        assert sub.config.clinic == trained
        assert m["matrix"][i][i] == sub.metrics["val_auroc"] and m["n"][i][i] == sub.metrics["n_val"]
        for j, scored in enumerate(clinics):
            if i != j:
                assert m["n"][i][j] == sizes[scored]
                assert 0.0 <= m["matrix"][i][j] <= 1.0
    assert np.nanmean(np.asarray(m["matrix"], dtype=float)) > 0.8  # the easy task transfers across clinics
    scores = pd.read_csv(run.run_dir / "cross_predictions.csv")
    assert set(scores["trained_on"]) == set(clinics)
    assert json.loads((run.run_dir / "metrics.json").read_text())["matrix"] == m["matrix"]

    store = Store()
    dataset_id = store.add_dataset("easy", "labels.csv")
    store.add_run("cross", run.run_dir, dataset_id=dataset_id, kind=m["kind"], metrics=m)
    read = latest_cross_clinic(store, dataset_id)
    assert read.clinics == clinics and read.matrix.shape == (3, 3)
    np.testing.assert_allclose(read.matrix, np.asarray(m["matrix"], dtype=float))

    with pytest.raises(ConfigError, match="do not set clinic"):
        cross_clinic(_config(clinic="north"), cohort)


def test_cross_clinic_needs_two_clinics(tmp_path):
    from melcore.cohort import load_cohort
    from melcore.errors import CohortError
    from melcore.training.crossval import cross_clinic

    csv, images = make_easy_cohort(tmp_path / "one", n_patients=6, clinics=("only",))
    with pytest.raises(CohortError, match="at least two clinics"):
        cross_clinic(_config(), load_cohort(csv, images))


def test_cross_clinic_refuses_a_patient_seen_in_two_clinics(tmp_path):
    from melcore.cohort import load_cohort
    from melcore.errors import LeakageError
    from melcore.training.crossval import cross_clinic

    csv, images = make_easy_cohort(tmp_path / "moved", n_patients=6, clinics=("north", "south"))
    table = pd.read_csv(csv)
    patient = table["patient_id"].iloc[0]
    moved = table.index[table["patient_id"] == patient][-1]
    table.loc[moved, "clinic"] = "south" if table.loc[moved, "clinic"] == "north" else "north"
    table.to_csv(csv, index=False)
    with pytest.raises(LeakageError, match=f"1 patient.*{patient}.*north, south"):
        cross_clinic(_config(), load_cohort(csv, images), run_dir=tmp_path / "cross")
    assert not (tmp_path / "cross").exists()  # refused before anything was trained or written


def test_train_cli_folds(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MELREVIEW_HOME", str(tmp_path / "home"))
    out = tmp_path / "kfold"
    cmd = [
        "train",
        "--csv",
        str(demo_dir / "labels.csv"),
        "--images",
        str(demo_dir / "jpeg" / "train"),
        "--model",
        "basic-cnn",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--augment",
        "none",
        "--mode",
        "fast-head",
        "--folds",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    done = run_main(cmd, capsys)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "out-of-fold  AUROC" in done.stdout
    labels = pd.read_csv(demo_dir / "labels.csv")
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert len(oof) == labels["target"].notna().sum() and oof["image_name"].is_unique
    assert set(oof["fold"]) == {0, 1}
    assert json.loads((out / "metrics.json").read_text())["kind"] == "kfold"

    bad = run_main(cmd[:-3] + ["--folds", "1", "--out", str(tmp_path / "bad")], capsys)
    assert bad.returncode == 2 and "--folds must be at least 2" in bad.stderr


def test_cross_clinic_cli_stores_the_run(easy_dir, tmp_path, monkeypatch, capsys):
    from melcore.compare import latest_cross_clinic
    from melcore.store import Store

    home = tmp_path / "home"
    monkeypatch.setenv("MELREVIEW_HOME", str(home))
    cmd = [
        "cross-clinic",
        "--csv",
        str(easy_dir[0]),
        "--images",
        str(easy_dir[1]),
        "--model",
        "basic-cnn",
        "--image-size",
        "32",
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--augment",
        "none",
        "--out",
        str(tmp_path / "cross"),
        "--register-dataset",
        "easy",
        "--quiet",
    ]
    done = run_main(cmd, capsys)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mode fast-head" in done.stdout  # the CPU default
    for clinic in CLINICS:
        assert clinic in done.stdout
    store = Store()
    dataset = store.get_dataset("easy")
    read = latest_cross_clinic(store, dataset["id"])
    assert read is not None and read.clinics == sorted(CLINICS) and read.n.shape == (3, 3)

    again = run_main(cmd[:-1] + ["--clinic", "north"], capsys)
    assert again.returncode == 2 and "--clinic does not apply" in again.stderr


def test_worker_runs_kfold_and_cross_clinic_jobs(easy_dir):
    from melcore.jobs import JOB_KINDS
    from melcore.store import Store
    from trainers.worker import Worker

    assert {"kfold", "cross-clinic"} <= set(JOB_KINDS)
    store = Store()
    dataset_id, _ = store.register_dataset("easy", easy_dir[0], easy_dir[1])
    config = _config(epochs=3, n_folds=2).to_dict()
    kfold_job = store.submit_job(config, dataset_id=dataset_id, kind="kfold")
    cross = {k: v for k, v in config.items() if k != "mode"}  # mode left out: the CPU default applies
    cross_job = store.submit_job(cross, dataset_id=dataset_id, kind="cross-clinic")
    assert Worker(store, once=True, poll=0.1).run() == 2
    jobs = {j["id"]: j for j in store.list_jobs()}
    assert jobs[kfold_job]["state"] == "done", jobs[kfold_job].get("error")
    assert jobs[cross_job]["state"] == "done", jobs[cross_job].get("error")
    kfold_run = store.get_run(jobs[kfold_job]["run_id"])
    assert kfold_run["kind"] == "kfold"
    oof = store.get_predictions(kfold_run["id"], split="oof")
    assert len(oof) == len(pd.read_csv(easy_dir[0])) and oof["image_name"].is_unique
    cross_run = store.get_run(jobs[cross_job]["run_id"])
    assert cross_run["kind"] == "cross-clinic" and cross_run["metrics"]["mode"] == "fast-head"
    assert len(cross_run["metrics"]["clinics"]) == 3


def test_cross_clinic_full_mode_scores_with_the_saved_model(cohort, tmp_path):
    from melcore.predict import predict_paths
    from melcore.training.crossval import cross_clinic
    from melcore.training.rundir import Run

    run = cross_clinic(_config(mode="full", epochs=1), cohort, run_dir=tmp_path / "cross", clinics=["north", "east"])
    m = run.metrics
    assert m["mode"] == "full" and m["clinics"] == ["north", "east"]
    assert np.asarray(m["n"]).shape == (2, 2) and m["n"][0][1] == m["n"][1][0] == 30
    scores = pd.read_csv(run.run_dir / "cross_predictions.csv", dtype={"image_name": str})
    north_on_east = scores[(scores["trained_on"] == "north") & (scores["clinic"] == "east")]
    model = Run.load(run.run_dir / m["runs"]["north"]).load_model()
    paths = cohort.table.set_index("image_name").loc[north_on_east["image_name"], "image_path"].tolist()
    np.testing.assert_allclose(predict_paths(model, paths), north_on_east["prediction"], atol=1e-5)


def test_fit_folds_cancel_keeps_the_finished_folds(cohort, tmp_path):
    from melcore.training.crossval import fit_folds

    seen = Recorder()

    def stop_in_second_fold():
        return any(c[3].get("fold") == 1 and c[3]["stage"] == "head" for c in seen.calls)

    run = fit_folds(
        _config(epochs=2), cohort, 3, progress=seen, should_stop=stop_in_second_fold, run_dir=tmp_path / "kfold"
    )
    assert run.cancelled and run.metrics["status"] == "cancelled" and run.metrics["folds_done"] == 1
    oof = pd.read_csv(run.run_dir / "oof_predictions.csv")
    assert set(oof["fold"]) == {0} and not (run.run_dir / "fold-2").exists()
