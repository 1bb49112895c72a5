"""``python -m melcore evaluate`` on good and bad inputs (``main(argv)`` from the project root)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_helpers import run_main
from scipy.special import expit
from sklearn.metrics import roc_auc_score

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def evaluate(*args) -> subprocess.CompletedProcess:
    """``python -m melcore evaluate ARGS`` run from the project root, in this process (tests/cli_helpers.py)."""
    with contextlib.chdir(PROJECT_ROOT):
        return run_main(["evaluate", *map(str, args)])


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def cohort_files(tmp_path):
    """labels.csv (image_name, patient_id, clinic, age_approx, target) and preds.csv (image_name, target)."""
    rng = np.random.default_rng(21)
    n = 400
    names = [f"ISIC_{i:07d}" for i in range(n)]
    clinic = rng.choice(["north", "south"], size=n)
    y = (rng.random(n) < 0.25).astype(int)
    labels = pd.DataFrame(
        {
            "image_name": names,
            "patient_id": [f"IP_{i // 3}" for i in range(n)],
            "clinic": clinic,
            "age_approx": rng.choice([20.0, 50.0, 80.0], size=n),
            "target": y,
        }
    )
    # a third clinic with benign images only
    extra = pd.DataFrame(
        {
            "image_name": ["ISIC_9000001", "ISIC_9000002"],
            "patient_id": ["IP_900", "IP_901"],
            "clinic": ["west", "west"],
            "age_approx": [40.0, 45.0],
            "target": [0, 0],
        }
    )
    labels = pd.concat([labels, extra], ignore_index=True)
    scores = expit(rng.normal(size=len(labels)) + 2 * labels["target"] - 1.5)
    preds = pd.DataFrame({"image_name": labels["image_name"], "target": scores})
    labels_csv, preds_csv = tmp_path / "labels.csv", tmp_path / "preds.csv"
    labels.to_csv(labels_csv, index=False)
    preds.to_csv(preds_csv, index=False)
    return labels_csv, preds_csv, labels.assign(prediction=scores)


def test_json_output_matches_the_library(cohort_files):
    labels_csv, preds_csv, table = cohort_files
    result = evaluate("--predictions", preds_csv, "--labels", labels_csv, "--threshold", 0.4, "--n-boot", 300, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["n"] == len(table) and out["n_malignant"] == table["target"].sum()
    assert out["auroc"] == roc_auc_score(table["target"], table["prediction"])
    low, high = out["auroc_ci"]
    assert low < out["auroc"] < high
    assert out["bootstrap_unit"] == "patient_id"
    flagged = table["prediction"] >= 0.4
    malignant = table["target"] == 1
    assert out["sensitivity"] == (flagged & malignant).sum() / malignant.sum()
    assert out["specificity"] == (~flagged & ~malignant).sum() / (~malignant).sum()
    names = [p["name"] for p in out["operating_points"]]
    assert names == ["youden", "sensitivity>=0.9", "sensitivity>=0.95", "specificity>=0.9"]
    for point in out["operating_points"][1:3]:
        assert point["sensitivity"] >= point["target"]
    assert "groups" not in out


def test_group_column_reports_each_group_and_tolerates_one_class(cohort_files):
    labels_csv, preds_csv, table = cohort_files
    result = evaluate(
        "--predictions", preds_csv, "--labels", labels_csv, "--group-column", "clinic", "--n-boot", 200, "--json"
    )
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)["groups"]
    assert sorted(groups) == ["north", "south", "west"]
    for name in ("north", "south"):
        subset = table[table["clinic"] == name]
        assert groups[name]["n"] == len(subset)
        assert groups[name]["auroc"] == roc_auc_score(subset["target"], subset["prediction"])
        assert {"auroc_ci", "sensitivity", "specificity", "operating_points", "n_malignant"} <= set(groups[name])
    west = groups["west"]
    assert west["n"] == 2 and west["auroc"] is None and west["auroc_ci"] == [None, None]
    assert west["operating_points"] == [] and "one class only (all 2 images are target 0)" in west["notes"][0]


def test_text_report_and_age_band(cohort_files):
    labels_csv, preds_csv, _ = cohort_files
    result = evaluate("--predictions", preds_csv, "--labels", labels_csv, "--group-column", "age_band", "--n-boot", 100)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "AUROC" in text and "95% CI" in text and "Operating points" in text
    assert "sensitivity>=0.95" in text and "TP" in text and "biopsies/melanoma" in text
    assert "By age_band" in text and "75+" in text and "45-59" in text


def test_predictions_without_label_warn_but_run(cohort_files, tmp_path):
    labels_csv, preds_csv, table = cohort_files
    preds = pd.read_csv(preds_csv).rename(columns={"target": "prediction"})
    preds = pd.concat([preds, pd.DataFrame({"image_name": ["ISIC_EXTRA1", "ISIC_EXTRA2"], "prediction": [0.3, 0.9]})])
    preds.to_csv(tmp_path / "more.csv", index=False)
    result = evaluate("--predictions", tmp_path / "more.csv", "--labels", labels_csv, "--n-boot", 50, "--json")
    assert result.returncode == 0, result.stderr
    assert "warning: 2 predictions have no label" in result.stderr and "ISIC_EXTRA1" in result.stderr
    assert json.loads(result.stdout)["n"] == len(table)


def test_labels_without_prediction_are_an_error_unless_ignored(cohort_files, tmp_path):
    labels_csv, preds_csv, table = cohort_files
    preds = pd.read_csv(preds_csv)
    preds.iloc[3:].to_csv(tmp_path / "partial.csv", index=False)
    message = one_line_error(evaluate("--predictions", tmp_path / "partial.csv", "--labels", labels_csv))
    assert f"3 of {len(table)} labelled images have no prediction" in message
    assert "ISIC_0000000, ISIC_0000001, ISIC_0000002" in message
    result = evaluate(
        "--predictions", tmp_path / "partial.csv", "--labels", labels_csv, "--ignore-missing", "--n-boot", 50, "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n"] == len(table) - 3


def test_predictions_outside_unit_interval_named(cohort_files, tmp_path):
    labels_csv, preds_csv, _ = cohort_files
    preds = pd.read_csv(preds_csv)
    preds.loc[5, "target"] = 1.4
    preds.loc[7, "target"] = np.nan
    preds.to_csv(tmp_path / "bad.csv", index=False)
    message = one_line_error(evaluate("--predictions", tmp_path / "bad.csv", "--labels", labels_csv))
    assert "1.4 at image ISIC_0000005" in message and "NaN at image ISIC_0000007" in message


@pytest.mark.parametrize(
    "what, make, expected",
    [
        ("no image_name", lambda p, l: p.rename(columns={"image_name": "name"}), "no image_name column"),
        ("no prediction", lambda p, l: p.rename(columns={"target": "score"}), "expected 'prediction' or 'target'"),
    ],
)
def test_missing_prediction_columns(cohort_files, tmp_path, what, make, expected):
    labels_csv, preds_csv, _ = cohort_files
    make(pd.read_csv(preds_csv), None).to_csv(tmp_path / "p.csv", index=False)
    message = one_line_error(evaluate("--predictions", tmp_path / "p.csv", "--labels", labels_csv))
    assert expected in message and "p.csv" in message


def test_bad_labels_and_missing_target(cohort_files, tmp_path):
    labels_csv, preds_csv, _ = cohort_files
    labels = pd.read_csv(labels_csv)
    labels.loc[2, "target"] = 3
    labels.to_csv(tmp_path / "bad_labels.csv", index=False)
    message = one_line_error(evaluate("--predictions", preds_csv, "--labels", tmp_path / "bad_labels.csv"))
    assert "ISIC_0000002" in message and "0 (benign) or 1 (malignant)" in message
    labels.drop(columns=["target"]).to_csv(tmp_path / "no_target.csv", index=False)
    message = one_line_error(evaluate("--predictions", preds_csv, "--labels", tmp_path / "no_target.csv"))
    assert "target" in message
    message = one_line_error(evaluate("--predictions", tmp_path / "absent.csv", "--labels", labels_csv))
    assert "not found" in message and "absent.csv" in message
    message = one_line_error(evaluate("--predictions", preds_csv, "--labels", labels_csv, "--group-column", "scanner"))
    assert "'scanner'" in message and "clinic" in message


def test_run_predictions_file_without_separate_labels(cohort_files, tmp_path):
    # a run's val_predictions.csv: image_name, patient_id, clinic, target, prediction
    _, _, table = cohort_files
    val = table[["image_name", "patient_id", "clinic", "target", "prediction"]]
    val.to_csv(tmp_path / "val_predictions.csv", index=False)
    result = evaluate(
        "--predictions", tmp_path / "val_predictions.csv", "--n-boot", 50, "--json", "--group-column", "clinic"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["auroc"] == roc_auc_score(val["target"], val["prediction"])
    assert set(out["groups"]) == {"north", "south", "west"}
    message = one_line_error(evaluate("--predictions", tmp_path / "val_predictions.csv", "--patient-column", "doctor"))
    assert "'doctor'" in message
    val.drop(columns=["target"]).to_csv(tmp_path / "no_labels.csv", index=False)
    message = one_line_error(evaluate("--predictions", tmp_path / "no_labels.csv"))
    assert "--labels" in message


def test_real_derm_labels_by_source(derm_real_dir, tmp_path):
    labels = pd.read_csv(derm_real_dir / "labels.csv")
    rng = np.random.default_rng(4)
    scores = expit(rng.normal(size=len(labels)) + 1.5 * labels["target"] - 1)
    pd.DataFrame({"image_name": labels["image_name"], "prediction": scores}).to_csv(tmp_path / "p.csv", index=False)
    result = evaluate(
        "--predictions",
        tmp_path / "p.csv",
        "--labels",
        derm_real_dir / "labels.csv",
        "--group-column",
        "source",
        "--n-boot",
        100,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["n"] == len(labels) and out["n_malignant"] == labels["target"].sum()
    assert out["auroc"] == pytest.approx(roc_auc_score(labels["target"], scores), abs=1e-12)
    ham = [key for key in out["groups"] if "HAM" in key]
    assert ham and all(out["groups"][key]["auroc"] is None for key in ham)  # HAM10000 is all benign


def test_isic2020_labels_through_the_cohort_reader(isic2020_dir, tmp_path):
    pytest.importorskip("melcore.cohort", reason="melcore.cohort not written yet")
    train = pd.read_csv(isic2020_dir / "train.csv", usecols=["image_name", "target"])
    rng = np.random.default_rng(6)
    scores = expit(rng.normal(size=len(train)) + 2 * train["target"] - 3)
    pd.DataFrame({"image_name": train["image_name"], "target": scores}).to_csv(tmp_path / "sub.csv", index=False)
    result = evaluate(
        "--predictions",
        tmp_path / "sub.csv",
        "--labels",
        isic2020_dir / "train.csv",
        "--group-column",
        "site",
        "--n-boot",
        100,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["n"] == len(train) and out["n_malignant"] == train["target"].sum()
    assert out["bootstrap_unit"] == "patient_id"
    assert "head/neck" in out["groups"]


def test_labels_with_lesion_ids_only_bootstrap_over_lesions(tmp_path):
    from melcore.metrics import auroc_ci

    rng = np.random.default_rng(8)
    lesion = np.repeat([f"HAM_{i:07d}" for i in range(40)], 3)
    y = np.repeat((rng.random(40) < 0.4).astype(int), 3)
    scores = expit(np.repeat(rng.normal(size=40), 3) + y + rng.normal(0, 0.1, len(y)))
    names = [f"ISIC_{k:07d}" for k in range(len(y))]
    pd.DataFrame({"image_name": names, "lesion_id": lesion, "target": y}).to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"image_name": names, "target": scores}).to_csv(tmp_path / "preds.csv", index=False)
    result = evaluate(
        "--predictions", tmp_path / "preds.csv", "--labels", tmp_path / "labels.csv", "--n-boot", 300, "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["bootstrap_unit"] == "lesion_id"
    expected = auroc_ci(y, scores, groups=lesion, n_boot=300, seed=0)
    assert out["auroc_ci"] == pytest.approx([expected.low, expected.high], abs=1e-12)
