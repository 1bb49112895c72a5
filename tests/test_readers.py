"""Reader-study statistics on synthetic readers whose sensitivity and specificity are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from melcore.errors import MelcoreError
from melcore.metrics import ThresholdSweep
from melcore.readers import (
    aided_vs_unaided,
    cohen_kappa,
    fleiss_kappa,
    fleiss_kappa_of,
    mean_reader_comparison,
    pairwise_kappa,
    reader_table,
    study_order,
    study_reads,
    study_worklist,
    wilson_interval,
)
from melcore.store import Store

SEPARATION = 1.806  # binormal model: sensitivity 0.90 at specificity 0.70


def _cohort(n_patients: int, rng, prevalence: float = 0.3):
    """Two lesions per patient; benign scores ~ N(0, 1), malignant ~ N(SEPARATION, 1), squashed to (0, 1)."""
    n = 2 * n_patients
    target = (rng.random(n) < prevalence).astype(int)
    latent = rng.normal(size=n) + SEPARATION * target
    return pd.DataFrame(
        {
            "image_name": [f"IMG_{i:05d}" for i in range(n)],
            "patient_id": [f"P{i // 2:04d}" for i in range(n)],
            "target": target,
            "prediction": 1 / (1 + np.exp(-latent)),
            "split": "val",
        }
    )


def _reader_history(predictions, readers: dict, rng, *, aided=False, start_id=1, confidence_separation=None):
    """Reads of every lesion by readers with the given (sensitivity, specificity)."""
    rows, review_id = [], start_id
    target = predictions["target"].to_numpy()
    for reviewer, (sensitivity, specificity) in readers.items():
        u = rng.random(len(target))
        biopsy = np.where(target == 1, u < sensitivity, u >= specificity)
        # positives split over biopsy only; negatives over follow-up and reassure
        negative = np.where(rng.random(len(target)) < 0.5, "follow-up", "reassure")
        decision = np.where(biopsy, "biopsy", negative)
        confidence = [None] * len(target)
        if confidence_separation is not None:
            latent = rng.normal(size=len(target)) + confidence_separation * target
            confidence = np.clip(np.round(50 + 15 * latent), 0, 100)
        for name, d, c in zip(predictions["image_name"], decision, confidence):
            rows.append(
                {
                    "id": review_id,
                    "run_id": 1,
                    "image_name": name,
                    "reviewer": reviewer,
                    "decision": d,
                    "note": "",
                    "created_at": float(review_id),
                    "aided": aided,
                    "confidence": c,
                }
            )
            review_id += 1
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- Wilson intervals


def test_wilson_interval_matches_the_closed_form_and_covers_95_percent():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # textbook values for 8 of 10
    assert wilson_interval(0, 0) == (pytest.approx(math.nan, nan_ok=True),) * 2
    rng = np.random.default_rng(1)
    covered = sum(lo <= 0.75 <= hi for lo, hi in (wilson_interval(int(k), 60) for k in rng.binomial(60, 0.75, 2000)))
    assert 0.93 <= covered / 2000 <= 0.975
    with pytest.raises(MelcoreError, match="successes <= n"):
        wilson_interval(11, 10)


# --------------------------------------------------------------------------- reads


def test_study_reads_keep_each_readers_latest_management_decision_per_mode():
    predictions = pd.DataFrame(
        {
            "image_name": ["a", "b", "c"],
            "patient_id": ["P1", "P1", None],
            "target": pd.array([1, 0, pd.NA], dtype="Int8"),
            "prediction": [0.9, 0.2, 0.5],
        }
    )
    history = pd.DataFrame(
        {
            "id": [1, 2, 3, 4, 5, 6],
            "image_name": ["a", "a", "a", "b", "b", "c"],
            "reviewer": ["Dr A", "Dr A", "Dr A", "Dr A", "Dr B", "Dr A"],
            "decision": ["reassure", "biopsy", "agree", "follow-up", "biopsy", "biopsy"],
            "aided": [False, False, True, False, True, False],
            "confidence": [20, 90, None, None, 70, 50],
        }
    )
    reads = study_reads(history, predictions)
    # "agree" is not a management decision; c is unlabelled
    assert reads[["reviewer", "mode", "image_name", "decision"]].values.tolist() == [
        ["Dr A", "unaided", "a", "biopsy"],
        ["Dr A", "unaided", "b", "follow-up"],
        ["Dr B", "aided", "b", "biopsy"],
    ]
    assert reads["positive"].tolist() == [True, False, True]
    assert reads["confidence"].tolist()[0] == 90 and math.isnan(reads["confidence"].iloc[1])
    assert reads["group"].tolist() == ["P1", "P1", "P1"]


# --------------------------------------------------------------------------- synthetic readers


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(20)
    predictions = _cohort(300, rng)
    truth = {"Dr A": (0.80, 0.70), "Dr B": (0.65, 0.85), "Dr C": (0.90, 0.55), "Dr D": (0.85, 0.60)}
    history = _reader_history(predictions, truth, rng, aided=False, confidence_separation=1.2)
    aided_truth = {name: (min(0.97, s + 0.08), min(0.97, c + 0.05)) for name, (s, c) in truth.items()}
    history = pd.concat(
        [history, _reader_history(predictions, aided_truth, rng, aided=True, start_id=len(history) + 1)],
        ignore_index=True,
    )
    return predictions, history, truth, aided_truth


def test_synthetic_readers_sensitivity_and_specificity_are_recovered_within_their_intervals(study):
    predictions, history, truth, aided_truth = study
    table = reader_table(study_reads(history, predictions), n_boot=200).set_index(["reviewer", "mode"])
    assert len(table) == 8 and table["eligible"].all()
    for mode, known in (("unaided", truth), ("aided", aided_truth)):
        for reviewer, (sensitivity, specificity) in known.items():
            row = table.loc[(reviewer, mode)]
            assert row["n"] == 600 and row["tp"] + row["fn"] == predictions["target"].sum()
            assert row["sensitivity_low"] <= sensitivity <= row["sensitivity_high"]
            assert row["specificity_low"] <= specificity <= row["specificity_high"]
            assert row["sensitivity"] == row["tp"] / (row["tp"] + row["fn"])


def test_the_model_is_judged_on_the_readers_own_lesions(study):
    predictions, history, _, _ = study
    reads = study_reads(history, predictions)
    few = reads[(reads["reviewer"] != "Dr A") | (reads["image_name"] < "IMG_00200")]  # Dr A read 200 lesions
    row = reader_table(few, n_boot=50).set_index(["reviewer", "mode"]).loc[("Dr A", "unaided")]
    mine = predictions[predictions["image_name"] < "IMG_00200"]
    assert row["n"] == 200
    assert row["model_auroc"] == pytest.approx(roc_auc_score(mine["target"], mine["prediction"]))
    sweep = ThresholdSweep(mine["target"], mine["prediction"])
    assert (
        row["model_sensitivity_at_reader_specificity"]
        == sweep.threshold_for_specificity(row["specificity"])["sensitivity"]
    )


def test_confidence_ratings_give_each_reader_an_auroc_near_the_binormal_value(study):
    predictions, history, _, _ = study
    reads = study_reads(history, predictions)
    table = reader_table(reads, n_boot=300, level=0.99).set_index(["reviewer", "mode"])
    expected = stats.norm.cdf(1.2 / math.sqrt(2))  # binormal AUROC of the synthetic confidences
    unaided = table.xs("unaided", level="mode")
    assert (unaided["n_confidence"] == 600).all()
    own = reads[(reads["reviewer"] == "Dr B") & (reads["mode"] == "unaided")]
    assert unaided.loc["Dr B", "reader_auroc"] == pytest.approx(roc_auc_score(own["target"], own["confidence"]))
    assert ((unaided["reader_auroc_low"] <= expected) & (expected <= unaided["reader_auroc_high"])).all()
    assert table.xs("aided", level="mode")["reader_auroc"].isna().all()  # the aided reads gave no confidence


def test_the_mean_reader_against_the_model_recovers_the_known_difference(study):
    predictions, history, truth, _ = study
    reads = study_reads(history, predictions)
    result = mean_reader_comparison(reads, mode="unaided", n_boot=400, seed=3)
    assert result.readers == ("Dr A", "Dr B", "Dr C", "Dr D") and result.n == 600
    table = reader_table(reads, n_boot=20)
    unaided = table[table["mode"] == "unaided"]
    assert result.reader_sensitivity == pytest.approx(unaided["sensitivity"].mean())
    assert result.reader_specificity == pytest.approx(unaided["specificity"].mean())
    sweep = ThresholdSweep(predictions["target"], predictions["prediction"])
    assert result.model_sensitivity == sweep.threshold_for_specificity(result.reader_specificity)["sensitivity"]
    # true mean reader specificity 0.675, sensitivity 0.80; binormal model sensitivity there
    true_diff = stats.norm.sf(stats.norm.ppf(0.675) - SEPARATION) - 0.80
    low, high = result.sensitivity_diff_ci
    assert low <= true_diff <= high and low > 0  # the model is better than these readers, and it shows
    assert result.n_used == 400 and result.note == ""


def test_two_way_bootstrap_is_wider_than_resampling_patients_alone(study):
    predictions, history, _, _ = study
    reads = study_reads(history, predictions)
    both = mean_reader_comparison(reads, n_boot=400, seed=1)
    patients = mean_reader_comparison(reads, n_boot=400, seed=1, resample_readers=False)
    assert both.sensitivity_diff == patients.sensitivity_diff
    # the readers' sensitivities differ (0.65 to 0.90): drawing readers widens the interval
    assert np.diff(both.sensitivity_diff_ci)[0] > 1.5 * np.diff(patients.sensitivity_diff_ci)[0]
    one_reader = mean_reader_comparison(reads, readers=["Dr A"], n_boot=100, seed=1)
    assert one_reader.readers == ("Dr A",)


def test_mean_reader_says_why_when_no_lesion_is_shared():
    reads = pd.DataFrame(
        {
            "reviewer": ["A", "B"],
            "mode": ["unaided", "unaided"],
            "image_name": ["x", "y"],
            "group": ["P1", "P2"],
            "target": [1, 0],
            "risk": [0.8, 0.1],
            "decision": ["biopsy", "reassure"],
            "positive": [True, False],
            "confidence": [np.nan, np.nan],
            "review_id": [1, 2],
        }
    )
    result = mean_reader_comparison(reads, n_boot=10)
    assert math.isnan(result.sensitivity_diff) and "no lesion was read by every reader" in result.note


def test_aided_reading_gains_are_measured_on_the_same_lesions(study):
    predictions, history, truth, aided_truth = study
    table = aided_vs_unaided(study_reads(history, predictions)).set_index("reviewer")
    assert list(table.index) == sorted(truth) and (table["n"] == 600).all()
    direct = reader_table(study_reads(history, predictions), n_boot=20).set_index(["reviewer", "mode"])
    for reviewer in truth:
        assert table.loc[reviewer, "sensitivity_diff"] == pytest.approx(
            direct.loc[(reviewer, "aided"), "sensitivity"] - direct.loc[(reviewer, "unaided"), "sensitivity"]
        )
    assert table["specificity_diff"].mean() > 0 and table["sensitivity_diff"].mean() > 0


# --------------------------------------------------------------------------- agreement


def test_cohen_kappa_matches_scikit_learn():
    rng = np.random.default_rng(5)
    decisions = np.array(["biopsy", "follow-up", "reassure"])
    a = decisions[rng.integers(0, 3, 200)]
    b = np.where(rng.random(200) < 0.6, a, decisions[rng.integers(0, 3, 200)])
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert cohen_kappa(["biopsy"] * 3, ["biopsy"] * 3) == 1.0
    with pytest.raises(MelcoreError, match="unknown decision"):
        cohen_kappa(["biopsy"], ["maybe"])


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) as worked in the usual textbook example: 10 subjects, 14 raters, 5 categories
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    with pytest.raises(MelcoreError, match="same number of raters"):
        fleiss_kappa([[1, 1], [2, 1]])


def test_kappas_of_a_study_use_the_shared_lesions(study):
    predictions, history, truth, _ = study
    reads = study_reads(history, predictions)
    pairs = pairwise_kappa(reads, mode="unaided")
    assert len(pairs) == 6 and (pairs["n_shared"] == 600).all()
    wide = reads[reads["mode"] == "unaided"].pivot(index="image_name", columns="reviewer", values="decision")
    first = pairs.iloc[0]
    assert first["kappa"] == pytest.approx(cohen_kappa_score(wide[first["reviewer_a"]], wide[first["reviewer_b"]]))
    kappa, n_lesions, n_readers = fleiss_kappa_of(reads, mode="unaided")
    assert (n_lesions, n_readers) == (600, 4) and -1 < kappa < 1
    # independent synthetic readers agree only through the truth: kappa is low but positive
    assert 0 < kappa < 0.5


# --------------------------------------------------------------------------- from the store


def test_reads_saved_in_the_store_feed_the_reader_table(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    rng = np.random.default_rng(8)
    predictions = _cohort(20, rng, prevalence=0.5)
    run_id = store.add_run("r", tmp_path)
    store.add_predictions(run_id, predictions)
    target = dict(zip(predictions["image_name"], predictions["target"]))
    for name, y in target.items():
        store.add_review(run_id, name, "Dr A", "biopsy" if y else "reassure", aided=False, confidence=90 if y else 10)
    table = reader_table(study_reads(store.review_history(run_id), store.get_predictions(run_id)), n_boot=50)
    row = table.iloc[0]
    assert (row["reviewer"], row["mode"], row["n"]) == ("Dr A", "unaided", 40)
    assert row["sensitivity"] == 1.0 and row["specificity"] == 1.0 and row["reader_auroc"] == 1.0
    store.close()


# --------------------------------------------------------------------------- the study worklist


def test_study_order_is_fixed_random_and_independent_of_the_scores():
    names = [f"IMG_{i:03d}" for i in range(200)]
    order = study_order(names, seed=7)
    assert sorted(order) == names and order != names
    assert study_order(list(reversed(names)), seed=7) == order  # the same for everyone, any input order
    assert study_order(names, seed=8) != order
    assert [n for n in study_order(names + ["IMG_new"], seed=7) if n != "IMG_new"] == order


def test_study_worklist_lists_only_this_readers_reads_in_this_mode_and_no_score():
    predictions = pd.DataFrame(
        {
            "image_name": ["a", "b", "c"],
            "patient_id": ["P1", "P2", "P2"],
            "target": [1, 0, 0],
            "prediction": [0.91, 0.12, 0.55],
        }
    )
    history = pd.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "image_name": ["a", "a", "b", "c"],
            "reviewer": ["Dr A", "Dr A", "Dr B", "Dr A"],
            "decision": ["reassure", "biopsy", "biopsy", "follow-up"],
            "aided": [False, False, False, True],
            "confidence": [10, 85, 90, None],
        }
    )
    table = study_worklist(predictions, history, "Dr A", "unaided", seed=3)
    assert list(table.columns) == ["position", "image_name", "patient_id", "read", "decision", "confidence"]
    assert table["image_name"].tolist() == study_order(["a", "b", "c"], 3)
    mine = table.set_index("image_name")
    assert mine.loc["a", "decision"] == "biopsy" and mine.loc["a", "confidence"] == 85
    assert not mine.loc["b", "read"]  # Dr B's read is not Dr A's
    assert not mine.loc["c", "read"]  # an aided read is not an unaided one
    assert study_worklist(predictions, history, "Dr A", "aided", seed=3).set_index("image_name").loc["c", "read"]
