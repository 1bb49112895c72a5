"""Pages lead with the within-source AUROC when a clinic/source holds no melanoma (Compare, Train's job cards)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from page_helpers import open_page, texts  # tests/ is on sys.path (pytest rootdir-relative import)

import trainers.launch as launch
from melcore.metrics import auroc
from melcore.store import Store


def plain(markdown: str) -> str:
    """Markdown with its backslash escapes removed (the text a reader sees)."""
    return markdown.replace("\\", "")


def write_pooled(path, confounded: bool = True, seed: int = 5) -> pd.DataFrame:
    """Source HAM (all benign when ``confounded``) pooled with source ISIC (both classes), two lesions a patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(160):
        source = "HAM" if patient < 80 else "ISIC"
        for lesion in range(2):
            malignant = rng.random() < (0.0 if (source == "HAM" and confounded) else 0.3)
            rows.append(
                {
                    "image_name": f"IMG_{patient:03d}_{lesion}",
                    "patient_id": f"P{patient:03d}",
                    "clinic": source,
                    "sex": "female" if patient % 2 else "male",
                    "age_approx": 50.0,
                    "target": int(malignant),
                }
            )
    table = pd.DataFrame(rows)
    table.to_csv(path, index=False)
    return table


def source_scores(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Scores that recognise the source (HAM low) but are random inside ISIC."""
    rng = np.random.default_rng(seed)
    score = np.where(table["clinic"] == "HAM", rng.uniform(0.0, 0.3, len(table)), rng.uniform(0.2, 1.0, len(table)))
    return table[["image_name", "patient_id", "clinic", "target"]].assign(prediction=score)


@pytest.fixture(params=[True, False], ids=["confounded", "clean"])
def pooled(request, tmp_path):
    store = Store()
    table = write_pooled(tmp_path / "pooled.csv", confounded=request.param)
    dataset_id = store.add_dataset(
        "pooled", tmp_path / "pooled.csv", format="generic", options={"check_images": "none"}
    )
    runs = {}
    for name, seed in (("basic", 1), ("other", 2)):
        run_id = store.add_run(
            name,
            dataset_id=dataset_id,
            model="basic-cnn",
            metrics={"val_auroc": 0.7, "weights": {"requested": "none", "from_scratch": True}},
        )
        frame = source_scores(table, seed)
        store.add_predictions(run_id, frame, split="val")
        runs[run_id] = frame
    return {"store": store, "dataset_id": dataset_id, "table": table, "runs": runs, "confounded": request.param}


def test_compare_leads_with_the_within_source_auroc_and_names_the_confounded_source(pooled):
    at = open_page("compare.py", timeout=90)
    warnings = plain(texts(at.warning))
    summary = next(d.value for d in at.dataframe if "Weights" in d.value.columns)
    if not pooled["confounded"]:
        assert "Within-source" not in warnings and "Within-source AUROC (95% CI)" not in summary.columns
        return
    assert "Within-source AUROC: " in warnings and "holds no melanoma" in warnings and "'HAM'" in warnings
    frame = next(iter(pooled["runs"].values()))
    isic = frame[frame["clinic"] == "ISIC"]
    assert f"{auroc(isic['target'], isic['prediction']):.3f} (95% CI" in warnings
    assert f"pooled AUROC {auroc(frame['target'], frame['prediction']):.3f}" in warnings
    within = summary["Within-source AUROC (95% CI)"]
    assert within.str.contains("in 'ISIC'").all()
    # the lead comes before the summary table
    first_warning = next(i for i, e in enumerate(at.main) if e in at.warning and "Within-source" in str(e.value))
    first_table = next(i for i, e in enumerate(at.main) if e in at.dataframe)
    assert first_warning < first_table


def test_the_train_job_card_leads_with_the_within_source_auroc(pooled, monkeypatch):
    monkeypatch.setattr(launch, "ensure_worker", lambda store, **kwargs: 4242)
    store = pooled["store"]
    run_id = next(iter(pooled["runs"]))
    job_id = store.submit_job({"model": "basic-cnn", "epochs": 1}, dataset_id=pooled["dataset_id"])
    job = store.claim_job("testhost:999:1")
    assert store.finish_job(job_id, job["claim_token"], "done", run_id=run_id)
    at = open_page("train.py", timeout=90)
    card = plain(texts(at.success))
    assert f"Run #{run_id}" in card
    if not pooled["confounded"]:
        assert "within-source" not in card.lower()
        return
    assert "within-source AUROC **" in card and "(confounded)" in card
    assert card.index("within-source AUROC") < card.index("pooled validation AUROC")
    assert "'HAM' holds no melanoma" in plain(texts(at.warning))


def test_the_jobs_table_leads_with_the_within_source_auroc_when_the_card_does(pooled, monkeypatch):
    monkeypatch.setattr(launch, "ensure_worker", lambda store, **kwargs: 4242)
    store = pooled["store"]
    job_ids = {}
    for run_id in pooled["runs"]:
        job_id = store.submit_job({"model": "basic-cnn", "epochs": 1}, dataset_id=pooled["dataset_id"])
        job = store.claim_job("testhost:999:1")
        assert store.finish_job(job_id, job["claim_token"], "done", run_id=run_id)
        job_ids[job_id] = run_id
    queued = store.submit_job({"model": "basic-cnn", "epochs": 1}, dataset_id=pooled["dataset_id"])
    at = open_page("train.py", timeout=90)
    table = next(d.value for d in at.dataframe if "epoch / fold" in d.value.columns).set_index("job")
    assert table.loc[queued, "AUROC"] == ""
    if not pooled["confounded"]:
        assert "Within-source AUROC" not in table.columns
        assert (table.loc[list(job_ids), "AUROC"] == "0.700").all()  # the runs' delivered val_auroc
        return
    columns = list(table.columns)
    assert columns.index("Within-source AUROC") < columns.index("AUROC")
    for job_id, run_id in job_ids.items():
        frame = pooled["runs"][run_id]
        isic = frame[frame["clinic"] == "ISIC"]
        assert table.loc[job_id, "Within-source AUROC"] == pytest.approx(auroc(isic["target"], isic["prediction"]))
        assert table.loc[job_id, "AUROC"] == "0.700 (pooled, confounded)"
    assert np.isnan(table.loc[queued, "Within-source AUROC"])


def test_a_metadata_run_that_can_learn_from_missing_age_is_warned_about_on_compare_and_its_card(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "ensure_worker", lambda store, **kwargs: 4242)
    store = Store()
    table = write_pooled(tmp_path / "pooled.csv", confounded=False)
    table.loc[table["clinic"] == "HAM", "age_approx"] = np.nan  # one source records no age
    table.to_csv(tmp_path / "pooled.csv", index=False)
    dataset_id = store.add_dataset(
        "pooled", tmp_path / "pooled.csv", format="generic", options={"check_images": "none"}
    )
    image_run = store.add_run("cnn", dataset_id=dataset_id, model="basic-cnn", metrics={"val_auroc": 0.6})
    meta_run = store.add_run(
        "patient context", dataset_id=dataset_id, kind="meta", model="meta", metrics={"oof_auroc": 0.9, "kind": "meta"}
    )
    for run_id, seed in ((image_run, 3), (meta_run, 4)):
        store.add_predictions(run_id, source_scores(table, seed), split="val" if run_id == image_run else "oof")
    job_id = store.submit_job({"model": "meta", "n_folds": 3}, dataset_id=dataset_id, kind="meta")
    job = store.claim_job("testhost:999:1")
    assert store.finish_job(job_id, job["claim_token"], "done", run_id=meta_run)

    at = open_page("compare.py", timeout=90)
    warnings = plain(texts(at.warning))
    assert "(metadata model): age is missing for 100% of clinic/source 'HAM' but 0% of 'ISIC'" in warnings
    assert warnings.count("(metadata model)") == 1  # not for the image run
    card = open_page("train.py", timeout=90)
    assert "Metadata model: age is missing for 100% of clinic/source 'HAM'" in plain(texts(card.warning))
