"""melcore.metrics: agreement with scikit-learn, bootstrap coverage, DeLong, operating points."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit
from scipy.stats import norm
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve as sk_calibration_curve

from melcore import metrics
from melcore.cohort import age_band
from melcore.errors import MelcoreError
from melcore.metrics import ThresholdSweep

GRID = [0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


@st.composite
def labelled_scores(draw, min_size=2, max_size=60, both_classes=True):
    """(y, p): 0/1 labels and probabilities with many ties (grid values) and arbitrary floats."""
    n = draw(st.integers(min_size, max_size))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    if both_classes and y.min() == y.max():
        y[draw(st.integers(0, n - 1))] = 1 - y[0]
    score = st.one_of(st.sampled_from(GRID), st.floats(0, 1, allow_nan=False, allow_subnormal=False))
    p = np.array(draw(st.lists(score, min_size=n, max_size=n)), dtype=np.float64)
    return y, p


def same(a, b) -> bool:
    """Equal, with nan equal to nan (for metric dicts)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def assert_same_dict(d1: dict, d2: dict) -> None:
    assert d1.keys() == d2.keys()
    for key in d1:
        assert same(d1[key], d2[key]), (key, d1[key], d2[key])


# --------------------------------------------------------------------------- identical to scikit-learn


@settings(max_examples=300, deadline=None)
@given(labelled_scores(), st.booleans())
def test_roc_curve_and_auroc_identical_to_sklearn(data, drop):
    y, p = data
    ours = metrics.roc_curve(y, p, drop_intermediate=drop)
    theirs = skm.roc_curve(y, p, drop_intermediate=drop)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert metrics.auroc(y, p) == skm.roc_auc_score(y, p)


@settings(max_examples=300, deadline=None)
@given(labelled_scores(), st.booleans())
def test_precision_recall_curve_and_average_precision_identical_to_sklearn(data, drop):
    y, p = data
    ours = metrics.precision_recall_curve(y, p, drop_intermediate=drop)
    theirs = skm.precision_recall_curve(y, p, drop_intermediate=drop)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert metrics.average_precision(y, p) == skm.average_precision_score(y, p)


@settings(max_examples=150, deadline=None)
@given(labelled_scores(), st.one_of(st.sampled_from(GRID), st.floats(0, 1)))
def test_threshold_metrics_identical_to_sklearn(data, threshold):
    y, p = data
    m = metrics.threshold_metrics(y, p, threshold)
    flagged = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, flagged, labels=[0, 1]).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["sensitivity"] == skm.recall_score(y, flagged)
    assert m["specificity"] == skm.recall_score(y, flagged, pos_label=0)
    assert same(m["ppv"], skm.precision_score(y, flagged, zero_division=np.nan))
    assert same(m["npv"], skm.precision_score(y, flagged, pos_label=0, zero_division=np.nan))
    assert m["f1"] == skm.f1_score(y, flagged)
    assert m["accuracy"] == skm.accuracy_score(y, flagged)
    if tp:
        assert m["biopsies_per_melanoma"] == (tp + fp) / tp
    else:
        assert math.isinf(m["biopsies_per_melanoma"]) if fp else math.isnan(m["biopsies_per_melanoma"])


@settings(max_examples=100, deadline=None)
@given(labelled_scores(), st.integers(1, 12), st.sampled_from(["uniform", "quantile"]))
def test_calibration_curve_identical_to_sklearn_and_brier_matches(data, n_bins, strategy):
    y, p = data
    ours = metrics.calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
    theirs = sk_calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    # sklearn sums the squared error of both columns [1-p, p] and halves it; same value up to rounding
    assert metrics.brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p), rel=1e-12, abs=1e-15)


def test_calibration_table_counts_every_image_once():
    rng = np.random.default_rng(3)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(int)
    table = metrics.calibration_table(y, p, n_bins=10)
    assert list(table["bin"]) == list(range(10))
    assert table["n"].sum() == 500 and table["n_malignant"].sum() == y.sum()
    filled = table[table["n"] > 0]
    prob_true, prob_pred = metrics.calibration_curve(y, p, n_bins=10)
    np.testing.assert_array_equal(filled["fraction_malignant"], prob_true)
    np.testing.assert_array_equal(filled["mean_predicted"], prob_pred)
    assert ((filled["mean_predicted"] >= filled["bin_low"]) & (filled["mean_predicted"] <= filled["bin_high"])).all()


# --------------------------------------------------------------------------- ThresholdSweep


@settings(max_examples=200, deadline=None)
@given(
    labelled_scores(both_classes=False, min_size=1),
    st.lists(st.one_of(st.sampled_from(GRID), st.floats(-0.5, 1.5)), min_size=1, max_size=10),
)
def test_threshold_sweep_equals_threshold_metrics(data, thresholds):
    y, p = data
    sweep = ThresholdSweep(y, p)
    for t in list(thresholds) + list(p[:5]):
        assert_same_dict(sweep.at(t), metrics.threshold_metrics(y, p, t))
    table = sweep.at_many(thresholds)
    for row, t in zip(table.to_dict("records"), thresholds):
        direct = metrics.threshold_metrics(y, p, t)
        for key in direct:
            assert same(float(row[key]), float(direct[key])), key


def test_threshold_sweep_curve_rows_equal_threshold_metrics():
    rng = np.random.default_rng(5)
    y = (rng.random(400) < 0.2).astype(int)
    p = np.round(expit(rng.normal(size=400) + 1.5 * y - 1), 2)  # rounded: many ties
    curve = ThresholdSweep(y, p).curve()
    assert list(curve["threshold"]) == sorted(curve["threshold"])
    assert len(curve) == len(np.unique(p)) + 1
    assert curve["sensitivity"].iloc[0] == 1.0 and curve["n_flagged"].iloc[0] == 400
    assert curve["specificity"].iloc[-1] == 1.0 and curve["n_flagged"].iloc[-1] == 0
    assert curve["sensitivity"].is_monotonic_decreasing and curve["specificity"].is_monotonic_increasing
    for row in curve.sample(25, random_state=0).to_dict("records"):
        direct = metrics.threshold_metrics(y, p, row["threshold"])
        for key in direct:
            assert same(float(row[key]), float(direct[key])), key
    light = ThresholdSweep(y, p).curve(max_points=20)
    assert len(light) <= 20 and light["threshold"].iloc[0] == curve["threshold"].iloc[0]
    assert light["threshold"].iloc[-1] == curve["threshold"].iloc[-1]


# --------------------------------------------------------------------------- operating points


def test_operating_points_worked_example():
    # malignant scores 0.9 0.8 0.6 0.3; benign 0.7 0.5 0.4 0.2 0.1 0.05
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])
    points = {
        pt["name"]: pt for pt in metrics.operating_points(y, p, sensitivities=(0.75, 1.0), specificities=(5 / 6, 1.0))
    }
    # sensitivity 3/4 is first reached (from the top) at 0.6: 0.9, 0.8, 0.6 flagged
    assert points["sensitivity>=0.75"]["threshold"] == 0.6
    assert points["sensitivity>=0.75"]["sensitivity"] == 0.75
    assert (points["sensitivity>=0.75"]["fp"], points["sensitivity>=0.75"]["n_flagged"]) == (1, 4)
    # all four melanomas need the threshold down at 0.3
    assert points["sensitivity>=1"]["threshold"] == 0.3
    # specificity 5/6 allows exactly one false positive: the lowest such threshold is 0.6 (0.5 would add one)
    assert points["specificity>=0.833333"]["threshold"] == 0.6
    # specificity 1: the benign 0.7 must not be flagged, so the threshold is just above it (0.8)
    assert points["specificity>=1"]["threshold"] == 0.8
    # Youden: J = 0.75 - 1/6 at 0.6; = 1 - 3/6 at 0.3; = 0.5 - 0 at 0.8 -> 0.6 is best (7/12)
    assert points["youden"]["threshold"] == 0.6
    assert points["youden"]["youden_j"] == pytest.approx(0.75 - 1 / 6)


@settings(max_examples=200, deadline=None)
@given(labelled_scores(), st.floats(0.01, 1.0))
def test_operating_point_semantics(data, target):
    y, p = data
    sweep = ThresholdSweep(y, p)
    candidates = np.append(np.unique(p), np.nextafter(p.max(), 2))

    sens_point = sweep.threshold_for_sensitivity(target)
    t = sens_point["threshold"]
    assert metrics.threshold_metrics(y, p, t)["sensitivity"] >= target
    for higher in candidates[candidates > t]:  # the HIGHEST threshold reaching the target
        assert metrics.threshold_metrics(y, p, higher)["sensitivity"] < target

    spec_point = sweep.threshold_for_specificity(target)
    t = spec_point["threshold"]
    assert metrics.threshold_metrics(y, p, t)["specificity"] >= target
    for lower in candidates[candidates < t]:  # the LOWEST threshold reaching the target
        assert metrics.threshold_metrics(y, p, lower)["specificity"] < target

    youden = sweep.youden()
    j = [metrics.threshold_metrics(y, p, c)["youden_j"] for c in candidates]
    best = max(j)
    assert youden["youden_j"] == pytest.approx(best, abs=1e-12)
    ties = [c for c, value in zip(candidates, j) if value >= best - 1e-12]
    assert youden["threshold"] == max(ties)


def test_operating_points_need_both_classes_and_valid_targets():
    with pytest.raises(MelcoreError, match="both malignant"):
        metrics.operating_points([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(MelcoreError, match=r"target sensitivity must be a number in \(0, 1\]"):
        metrics.operating_points([0, 1, 0], [0.1, 0.2, 0.3], sensitivities=(1.2,))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_engine_equals_auroc_of_explicit_resample():
    # The vectorised weighted Mann-Whitney must equal sklearn's AUROC on the data actually resampled.
    rng = np.random.default_rng(8)
    n, n_groups = 90, 25
    groups = rng.integers(0, n_groups, size=n)
    y = (rng.random(n) < 0.35).astype(int)
    p = np.round(rng.random(n), 1)  # ties within and across classes
    counts = rng.integers(0, 3, size=(30, n_groups))
    engine = metrics._AurocBootstrap(y, p[None, :], groups)
    values = engine.block(counts)[:, 0]
    for row, value in zip(counts, values):
        repeat = row[groups]
        y_b, p_b = np.repeat(y, repeat), np.repeat(p, repeat)
        if y_b.min() == y_b.max():
            assert math.isnan(value)
        else:
            assert value == pytest.approx(skm.roc_auc_score(y_b, p_b), abs=1e-12)


def test_auroc_ci_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(int)
    p = expit(rng.normal(size=300) + y)
    patients = rng.integers(0, 100, size=300)
    ci = metrics.auroc_ci(y, p, groups=patients, n_boot=500, seed=4)
    assert ci == metrics.auroc_ci(y, p, groups=patients, n_boot=500, seed=4)
    assert ci != metrics.auroc_ci(y, p, groups=patients, n_boot=500, seed=5)
    assert ci[0] < metrics.auroc(y, p) < ci[1]
    narrow = metrics.auroc_ci(y, p, groups=patients, n_boot=500, seed=4, level=0.5)
    assert ci[0] < narrow[0] < narrow[1] < ci[1]


def test_bootstrap_skips_one_class_resamples():
    # 3 patients; patient "a" holds the only melanoma, so resamples without "a" have one class
    y = [1, 0, 0, 0, 0, 0]
    p = [0.9, 0.2, 0.3, 0.95, 0.1, 0.4]
    boots = metrics.auroc_bootstrap(y, p, groups=["a", "a", "b", "b", "c", "c"], n_boot=200, seed=0)
    skipped = np.isnan(boots)
    assert skipped.any() and (~skipped).any()
    assert 0.2 < skipped.mean() < 0.4  # P(no "a" among 3 draws) = (2/3)^3 = 0.30 -> about 30% skipped
    low, high, *_ = metrics.auroc_ci(y, p, groups=["a", "a", "b", "b", "c", "c"], n_boot=200, seed=0)
    assert low <= high


def test_auroc_ci_reports_the_one_class_resamples_it_left_out():
    y = [1, 0, 0, 0, 0, 0]
    p = [0.9, 0.2, 0.3, 0.95, 0.1, 0.4]
    ci = metrics.auroc_ci(y, p, groups=["a", "a", "b", "b", "c", "c"], n_boot=2000, seed=0)
    assert ci.n_boot == 2000
    assert abs(ci.dropped_share - (2 / 3) ** 3) < 0.03  # resamples without patient "a" hold no melanoma
    assert f"{ci.n_dropped:,} of 2,000 bootstrap resamples" in ci.note and "too narrow" in ci.note
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(int)
    plenty = metrics.auroc_ci(y, expit(rng.normal(size=300) + y), groups=rng.integers(0, 100, 300), n_boot=500)
    assert plenty.n_dropped == 0 and plenty.note == ""


def test_bootstrap_ci_covers_true_auroc_binormal():
    # binormal model: benign N(0,1), malignant N(mu,1) -> true AUROC = Phi(mu / sqrt(2));
    # expit keeps the ranking (hence the AUROC) and maps scores into [0, 1]
    rng = np.random.default_rng(2024)
    mu = 1.2
    true_auroc = norm.cdf(mu / np.sqrt(2))
    y = np.r_[np.ones(60, dtype=int), np.zeros(140, dtype=int)]
    hits = 0
    for sim in range(200):
        p = expit(rng.normal(size=200) + mu * y)
        ci = metrics.auroc_ci(y, p, n_boot=300, seed=sim)
        hits += ci.low <= true_auroc <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


def test_patient_bootstrap_ci_covers_true_auroc_with_correlated_lesions():
    # 100 patients x 3 lesions; a patient effect u shifts all of a patient's scores:
    # x = u + mu*y + e, u ~ N(0, 1), e ~ N(0, 0.5^2) -> AUROC between patients = Phi(mu / sqrt(2 (1 + 0.25)))
    rng = np.random.default_rng(77)
    mu = 1.5
    true_auroc = norm.cdf(mu / np.sqrt(2 * 1.25))
    patients = np.repeat(np.arange(100), 3)
    hits = 0
    for sim in range(200):
        y = (rng.random(300) < 0.3).astype(int)
        x = rng.normal(0, 1, 100)[patients] + mu * y + rng.normal(0, 0.5, 300)
        ci = metrics.auroc_ci(y, expit(x), groups=patients, n_boot=300, seed=sim)
        hits += ci.low <= true_auroc <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


# --------------------------------------------------------------------------- DeLong


def test_delong_worked_by_hand():
    # y  = [1,   1,   1,   0,   0,   0  ]
    # p1 = [0.9, 0.6, 0.4, 0.7, 0.3, 0.2]
    # p2 = [0.8, 0.5, 0.5, 0.5, 0.6, 0.1]   (a malignant-benign tie at 0.5)
    #
    # Placement values (ties count 1/2):
    #   V10 (malignant i: share of benign scored lower)
    #     model 1: 0.9 -> 3/3, 0.6 -> 2/3, 0.4 -> 2/3          mean 7/9 = AUC1
    #     model 2: 0.8 -> 3/3, 0.5 -> (1 + 1/2)/3 = 1/2, 0.5 -> 1/2   mean 2/3 = AUC2
    #   V01 (benign j: share of malignant scored higher)
    #     model 1: 0.7 -> 1/3, 0.3 -> 1, 0.2 -> 1               mean 7/9
    #     model 2: 0.5 -> (1 + 2 * 1/2)/3 = 2/3, 0.6 -> 1/3, 0.1 -> 1   mean 2/3
    # Sample covariances (ddof 1, divide by 2):
    #   V10 deviations: m1 (2/9, -1/9, -1/9), m2 (1/3, -1/6, -1/6)
    #     S10_11 = (4 + 1 + 1)/81 / 2 = 1/27; S10_22 = (1/9 + 1/36 + 1/36)/2 = 1/12;
    #     S10_12 = (2/27 + 1/54 + 1/54)/2 = 1/18
    #   V01 deviations: m1 (-4/9, 2/9, 2/9), m2 (0, -1/3, 1/3)
    #     S01_11 = (16 + 4 + 4)/81 / 2 = 4/27; S01_22 = (0 + 1/9 + 1/9)/2 = 1/9; S01_12 = (0 - 2/27 + 2/27)/2 = 0
    # Var = S10/m + S01/n with m = n = 3:
    #   Var(AUC1) = (1/27 + 4/27)/3 = 5/81; Var(AUC2) = (1/12 + 1/9)/3 = 7/108; Cov = (1/18 + 0)/3 = 1/54
    #   Var(AUC1 - AUC2) = 5/81 + 7/108 - 2/54 = (20 + 21 - 12)/324 = 29/324 -> SE = sqrt(29)/18
    #   diff = 7/9 - 2/3 = 1/9; z = (1/9) / (sqrt(29)/18) = 2/sqrt(29); p = 2 (1 - Phi(z))
    y = [1, 1, 1, 0, 0, 0]
    p1 = [0.9, 0.6, 0.4, 0.7, 0.3, 0.2]
    p2 = [0.8, 0.5, 0.5, 0.5, 0.6, 0.1]
    result = metrics.delong_test(y, p1, p2)
    assert result.auc1 == pytest.approx(7 / 9)
    assert result.auc2 == pytest.approx(2 / 3)
    assert result.diff == pytest.approx(1 / 9)
    assert result.se == pytest.approx(math.sqrt(29) / 18)
    assert result.z == pytest.approx(2 / math.sqrt(29))
    assert result.p_value == pytest.approx(2 * norm.sf(2 / math.sqrt(29)))
    assert metrics.delong_se(y, p1) == pytest.approx(math.sqrt(5 / 81))
    assert metrics.delong_se(y, p2) == pytest.approx(math.sqrt(7 / 108))
    low, high = metrics.delong_ci(y, p2)
    assert (low, high) == pytest.approx((2 / 3 - 1.959963984540054 * math.sqrt(7 / 108), 1.0))


def _brute_force_delong(y, p1, p2):
    """O(m n) placement values straight from the definition, for comparison."""
    y = np.asarray(y)
    out = []
    for p in (np.asarray(p1), np.asarray(p2)):
        pos, neg = p[y == 1], p[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out.append((psi.mean(axis=1), psi.mean(axis=0)))
    v10 = np.vstack([out[0][0], out[1][0]])
    v01 = np.vstack([out[0][1], out[1][1]])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    return math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


@settings(max_examples=100, deadline=None)
@given(labelled_scores(min_size=6, max_size=50), st.data())
def test_delong_se_matches_definition_with_ties(data, more):
    y, p1 = data
    if y.sum() < 2 or (1 - y).sum() < 2:
        y[:2], y[2:4] = 1, 0
    p2 = np.array(more.draw(st.lists(st.sampled_from(GRID), min_size=len(y), max_size=len(y))))
    result = metrics.delong_test(y, p1, p2)
    assert result.se == pytest.approx(_brute_force_delong(y, p1, p2), abs=1e-12)
    assert result.auc1 == skm.roc_auc_score(y, p1) and result.auc2 == skm.roc_auc_score(y, p2)


def test_delong_se_agrees_with_bootstrap_se():
    rng = np.random.default_rng(12)
    y = (rng.random(1500) < 0.2).astype(int)
    shared = rng.normal(size=1500)
    p1 = expit(shared + 1.3 * y)
    p2 = expit(0.7 * shared + 0.7 * rng.normal(size=1500) + 1.0 * y)
    boots = metrics.auroc_bootstrap(y, p1, n_boot=2000, seed=1)
    assert metrics.delong_se(y, p1) == pytest.approx(np.std(boots, ddof=1), rel=0.1)
    paired = metrics.paired_auroc_bootstrap(y, p1, p2, n_boot=2000, seed=1)
    delong = metrics.delong_test(y, p1, p2)
    assert delong.se == pytest.approx(paired.se, rel=0.15)
    assert paired.diff == pytest.approx(delong.diff) and paired.low < paired.diff < paired.high


def test_delong_false_positive_rate_near_nominal():
    # two different but equally good models (same true AUROC): p < 0.05 in about 5% of datasets
    rng = np.random.default_rng(99)
    y = np.r_[np.ones(50, dtype=int), np.zeros(150, dtype=int)]
    rejections = 0
    for _ in range(300):
        common = rng.normal(size=200)
        x1 = y + 0.7 * common + 0.7 * rng.normal(size=200)
        x2 = y + 0.7 * common + 0.7 * rng.normal(size=200)
        rejections += metrics.delong_test(y, expit(x1), expit(x2)).p_value < 0.05
    assert 0.02 <= rejections / 300 <= 0.09


def test_delong_identical_models_and_too_few_cases():
    y = [1, 1, 0, 0, 0]
    p = [0.9, 0.4, 0.5, 0.1, 0.2]
    same_model = metrics.delong_test(y, p, p)
    assert (same_model.diff, same_model.se, same_model.z, same_model.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(MelcoreError, match="at least 2 malignant and 2 benign"):
        metrics.delong_test([1, 0, 0], [0.9, 0.1, 0.2], [0.8, 0.3, 0.1])


# --------------------------------------------------------------------------- validation


def test_length_mismatch_is_reported():
    with pytest.raises(MelcoreError, match="3 labels but 2 predictions"):
        metrics.auroc([0, 1, 0], [0.1, 0.2])


def test_bad_labels_are_named_by_position_and_value():
    with pytest.raises(MelcoreError) as err:
        metrics.threshold_metrics([0, 1, 2, 0, -1], [0.1, 0.2, 0.3, 0.4, 0.5], 0.5)
    message = str(err.value)
    assert "2 at position 2" in message and "-1 at position 4" in message and "2 of 5 bad" in message
    with pytest.raises(MelcoreError, match="NaN at position 1"):
        metrics.auroc([0.0, np.nan, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(MelcoreError, match=r"(NaN|missing) at position 0"):
        metrics.auroc(pd.Series([None, 1, 0], dtype="Int8"), [0.1, 0.2, 0.3])
    with pytest.raises(MelcoreError, match="'yes' at position 1"):
        metrics.auroc(np.array([0, "yes", 1], dtype=object), [0.1, 0.2, 0.3])


def test_bad_predictions_are_named():
    with pytest.raises(MelcoreError) as err:
        metrics.auroc([0, 1, 0, 1], [0.1, 1.7, np.nan, -0.2])
    message = str(err.value)
    assert "NaN at position 2" in message
    assert "1.7 at position 1" in message and "-0.2 at position 3" in message
    assert "logits" in message
    with pytest.raises(MelcoreError, match="image ISIC_2"):
        metrics.summarize([0, 1, 1], [0.1, 0.2, np.inf], names=["ISIC_0", "ISIC_1", "ISIC_2"])
    with pytest.raises(MelcoreError, match="not a number: 'high' at position 0"):
        metrics.auroc([0, 1], np.array(["high", 0.3], dtype=object))


def test_one_class_refused_for_auroc_but_allowed_for_threshold_metrics():
    with pytest.raises(MelcoreError, match="all 3 labels are benign"):
        metrics.auroc([0, 0, 0], [0.1, 0.5, 0.9])
    with pytest.raises(MelcoreError, match="all 2 labels are malignant"):
        metrics.auroc_ci([1, 1], [0.1, 0.5])
    m = metrics.threshold_metrics([0, 0, 0], [0.1, 0.5, 0.9], 0.5)
    assert math.isnan(m["sensitivity"]) and m["specificity"] == pytest.approx(1 / 3)
    assert math.isinf(m["biopsies_per_melanoma"])  # two biopsies, no melanoma found
    nothing = metrics.threshold_metrics([0, 1], [0.1, 0.2], 0.9)
    assert math.isnan(nothing["biopsies_per_melanoma"]) and math.isnan(nothing["ppv"])


def test_keras_shaped_predictions_and_pandas_inputs_accepted():
    y = pd.Series([0, 1, 1, 0], dtype="Int8")
    p = np.array([[0.1], [0.8], [0.4], [0.5]], dtype=np.float32)
    assert metrics.auroc(y, p) == skm.roc_auc_score([0, 1, 1, 0], p[:, 0])
    with pytest.raises(MelcoreError, match=r"shape \(2, 2\)"):
        metrics.auroc([0, 1], np.zeros((2, 2)))


# --------------------------------------------------------------------------- groups


def test_age_band_bands_and_unknown():
    assert [age_band(a) for a in (0, 29.9, 30, 44, 45, 59, 60, 74, 75, 90)] == [
        "0-29",
        "0-29",
        "30-44",
        "30-44",
        "45-59",
        "45-59",
        "60-74",
        "60-74",
        "75+",
        "75+",
    ]
    assert age_band(None) == "unknown" and age_band(float("nan")) == "unknown"
    series = age_band(pd.Series([35.0, np.nan, 80.0], index=[7, 8, 9]))
    assert list(series) == ["30-44", "unknown", "75+"] and list(series.index) == [7, 8, 9]
    with pytest.raises(MelcoreError, match="negative"):
        age_band([20, -5])


def _clinic_table(seed=0):
    rng = np.random.default_rng(seed)
    n = 600
    clinic = rng.choice(["north", "south"], size=n)
    y = (rng.random(n) < np.where(clinic == "north", 0.2, 0.3)).astype(int)
    p = expit(rng.normal(size=n) + np.where(clinic == "north", 2.0, 0.8) * y - 1)
    table = pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:04d}" for i in range(n)],
            "patient_id": rng.integers(0, 200, n),
            "clinic": clinic,
            "age_approx": rng.choice([25.0, 40.0, 55.0, np.nan], size=n),
            "target": y,
            "prediction": p,
        }
    )
    extra = pd.DataFrame(
        {
            "image_name": ["X1", "X2", "X3"],
            "patient_id": [900, 901, 902],
            "clinic": ["east"] * 3,
            "age_approx": [70.0] * 3,
            "target": [0, 0, 0],
            "prediction": [0.2, 0.7, 0.4],
        }
    )
    return pd.concat([table, extra], ignore_index=True)


def test_per_group_matches_metrics_on_each_subset():
    table = _clinic_table()
    result = metrics.per_group(table, "clinic", threshold=0.4, n_boot=300, seed=3)
    assert list(result["group"]) == ["east", "north", "south"]
    for row in result.to_dict("records"):
        subset = table[table["clinic"] == row["group"]]
        assert row["n"] == len(subset) and row["n_malignant"] == subset["target"].sum()
        direct = metrics.threshold_metrics(subset["target"], subset["prediction"], 0.4)
        for key in ("sensitivity", "specificity", "ppv", "tp", "fp", "tn", "fn"):
            assert same(float(row[key]), float(direct[key]))
        if row["group"] == "east":  # benign only: no AUROC, a note, no crash
            assert math.isnan(row["auroc"]) and math.isnan(row["auroc_low"]) and math.isnan(row["pauc_high"])
            assert f"one class only (all {len(subset)} images are target 0)" in row["note"]
        else:
            assert row["auroc"] == skm.roc_auc_score(subset["target"], subset["prediction"])
            ci = metrics.auroc_ci(
                subset["target"], subset["prediction"], groups=subset["patient_id"], n_boot=300, seed=3
            )
            assert (row["auroc_low"], row["auroc_high"]) == (ci.low, ci.high)
            assert row["boot_dropped"] == ci.n_dropped
            assert row["note"] == ci.note
            # the ISIC 2024 pAUC (scikit-learn's McClish value mapped back) and its interval, same resamples
            scaled = skm.roc_auc_score(1 - subset["target"], -subset["prediction"], max_fpr=0.2)
            assert row["pauc"] == pytest.approx(0.02 + (0.2 - 0.02) / 0.5 * (scaled - 0.5))
            partial = metrics.partial_auroc_ci(
                subset["target"], subset["prediction"], groups=subset["patient_id"], n_boot=300, seed=3
            )
            assert (row["pauc_low"], row["pauc_high"]) == (partial.low, partial.high)
    north, south = result.set_index("group").loc[["north", "south"], "auroc"]
    assert north > south  # the simulated north clinic separates the classes better


def test_per_group_counts_and_flags_one_class_resamples():
    # clinic "small": one melanoma patient among three, so about 30% of its resamples hold one class
    table = pd.DataFrame(
        {
            "image_name": [f"i{k}" for k in range(10)],
            "clinic": ["small"] * 6 + ["big"] * 4,
            "patient_id": ["a", "a", "b", "b", "c", "c", "d", "e", "f", "g"],
            "target": [1, 0, 0, 0, 0, 0, 1, 1, 0, 0],
            "prediction": [0.9, 0.2, 0.3, 0.95, 0.1, 0.4, 0.8, 0.7, 0.3, 0.2],
        }
    )
    result = metrics.per_group(table, "clinic", n_boot=1000, seed=0).set_index("group")
    small = metrics.auroc_ci(
        table["target"][:6], table["prediction"][:6], groups=table["patient_id"][:6], n_boot=1000, seed=0
    )
    assert result.loc["small", "boot_dropped"] == small.n_dropped > 200
    assert "held one class and were left out" in result.loc["small", "note"]


def test_without_patient_ids_the_bootstrap_resamples_lesions():
    rng = np.random.default_rng(5)
    lesion = np.repeat([f"L{i}" for i in range(40)], 3)  # three images of each lesion, no patient id
    y = np.repeat((rng.random(40) < 0.4).astype(int), 3)
    p = expit(np.repeat(rng.normal(size=40), 3) + y + rng.normal(0, 0.1, 120))
    table = pd.DataFrame(
        {
            "image_name": [f"i{k}" for k in range(120)],
            "lesion_id": lesion,
            "clinic": "north",
            "target": y,
            "prediction": p,
        }
    )
    row = metrics.per_group(table, "clinic", n_boot=500, seed=2).iloc[0]
    by_lesion = metrics.auroc_ci(y, p, groups=lesion, n_boot=500, seed=2)
    by_image = metrics.auroc_ci(y, p, n_boot=500, seed=2)
    assert (row["auroc_low"], row["auroc_high"]) == (by_lesion.low, by_lesion.high)
    assert by_lesion.high - by_lesion.low > by_image.high - by_image.low


def test_operating_point_ci_equals_an_independent_patient_bootstrap_loop():
    rng = np.random.default_rng(9)
    patients = rng.integers(0, 50, 200)
    y = (rng.random(200) < 0.3).astype(int)
    p = expit(rng.normal(size=200) + 1.5 * y)
    point = metrics.operating_point_ci(y, p, 0.5, groups=patients, n_boot=400, seed=3, level=0.9)
    assert point["sensitivity"] == metrics.threshold_metrics(y, p, 0.5)["sensitivity"]
    # the same resamples drawn by hand: group codes in order of first appearance, as the library numbers them
    codes, uniques = pd.factorize(pd.Series(patients))
    draws = np.random.default_rng(3).integers(0, len(uniques), size=(400, len(uniques)))
    sensitivity, npv = [], []
    for row in draws:
        rows = np.concatenate([np.flatnonzero(codes == g) for g in row])
        flagged, truth = p[rows] >= 0.5, y[rows]
        sensitivity.append((flagged & (truth == 1)).sum() / (truth == 1).sum())
        npv.append((~flagged & (truth == 0)).sum() / (~flagged).sum())
    assert point["sensitivity_ci"] == pytest.approx(list(np.quantile(sensitivity, [0.05, 0.95])), abs=1e-12)
    assert point["npv_ci"] == pytest.approx(list(np.quantile(npv, [0.05, 0.95])), abs=1e-12)


def test_per_group_age_band_derived_and_missing_column_named():
    table = _clinic_table()
    result = metrics.per_group(table, "age_band", n_boot=100)
    assert list(result["group"]) == ["0-29", "30-44", "45-59", "60-74", "unknown"]  # the 3 "east" rows are 70
    assert result["n"].sum() == len(table)
    with pytest.raises(MelcoreError, match="no group column 'site'; available columns: image_name"):
        metrics.per_group(table, "site")


def test_summarize_keys_and_one_class_tolerated():
    table = _clinic_table()
    summary = metrics.summarize(
        table["target"], table["prediction"], groups=table["patient_id"], n_boot=200, threshold=0.3
    )
    assert summary["auroc"] == skm.roc_auc_score(table["target"], table["prediction"])
    assert summary["auroc_ci"][0] < summary["auroc"] < summary["auroc_ci"][1]
    assert summary["sensitivity"] == summary["threshold_metrics"]["sensitivity"]
    assert [pt["name"] for pt in summary["operating_points"]] == [
        "youden",
        "sensitivity>=0.9",
        "sensitivity>=0.95",
        "specificity>=0.9",
    ]
    benign = metrics.summarize([0, 0, 0], [0.1, 0.6, 0.2])
    assert math.isnan(benign["auroc"]) and benign["operating_points"] == []
    assert "one class only (all 3 images are target 0)" in benign["notes"][0]


# --------------------------------------------------------------------------- partial AUROC, net benefit


def _isic_2024_pauc(y, p, min_tpr=0.8) -> float:
    """The ISIC 2024 challenge's scoring: scikit-learn's McClish-standardised pAUC of the flipped problem,
    unstandardised back to the area above TPR = min_tpr."""
    max_fpr = 1 - min_tpr
    scaled = skm.roc_auc_score(1 - np.asarray(y), -np.asarray(p), max_fpr=max_fpr)
    return 0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5)


@settings(max_examples=300, deadline=None)
@given(labelled_scores(), st.sampled_from([0.0, 0.5, 0.8, 0.9]))
def test_partial_auroc_equals_the_isic_2024_computation(data, min_tpr):
    y, p = data
    assert metrics.partial_auroc(y, p, min_tpr) == pytest.approx(_isic_2024_pauc(y, p, min_tpr), abs=1e-12)


def test_partial_auroc_range_and_the_full_area():
    y = np.array([0, 0, 1, 1])
    assert metrics.partial_auroc(y, [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.2)  # perfect ranking: 1 - 0.8
    assert metrics.partial_auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.3).astype(int)
    p = expit(rng.normal(size=400) + y)
    assert metrics.partial_auroc(y, p, min_tpr=0.0) == pytest.approx(metrics.auroc(y, p), abs=1e-12)
    with pytest.raises(MelcoreError, match="min_tpr"):
        metrics.partial_auroc(y, p, min_tpr=1.0)


def test_partial_auroc_bootstrap_equals_the_area_of_the_explicit_resample():
    rng = np.random.default_rng(8)
    n, n_groups = 90, 25
    groups = rng.integers(0, n_groups, size=n)
    y = (rng.random(n) < 0.35).astype(int)
    p = np.round(rng.random(n), 1)
    counts = rng.integers(0, 3, size=(30, n_groups))
    codes, _ = metrics._group_codes(groups, n)
    group_of_code = {code: g for code, g in zip(codes, groups)}  # codes number the groups by first appearance
    values = metrics._WeightedRoc(y, p, codes).partial_area(
        counts[:, [group_of_code[c] for c in range(len(group_of_code))]], 0.8
    )
    for row, value in zip(counts, values):
        repeat = row[groups]
        y_b, p_b = np.repeat(y, repeat), np.repeat(p, repeat)
        if y_b.min() == y_b.max():
            assert math.isnan(value)
        else:
            assert value == pytest.approx(_isic_2024_pauc(y_b, p_b), abs=1e-12)


def test_partial_auroc_ci_brackets_the_estimate_and_uses_the_auroc_resamples():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(int)
    p = expit(rng.normal(size=300) + 1.5 * y)
    patients = rng.integers(0, 100, size=300)
    ci = metrics.partial_auroc_ci(y, p, groups=patients, n_boot=500, seed=4)
    assert ci.low < metrics.partial_auroc(y, p) < ci.high <= 0.2 and ci.n_dropped == 0
    # the same seed draws the same patients as the AUROC bootstrap: both move together
    a = metrics.auroc_bootstrap(y, p, groups=patients, n_boot=200, seed=9)
    b = metrics.partial_auroc_bootstrap(y, p, groups=patients, n_boot=200, seed=9)
    assert np.corrcoef(a, b)[0, 1] > 0.5


def test_net_benefit_matches_its_definition_and_the_reference_strategies():
    rng = np.random.default_rng(4)
    y = (rng.random(500) < 0.2).astype(int)
    p = expit(rng.normal(size=500) + 2 * y - 1.5)
    table = metrics.net_benefit(y, p, [0.05, 0.1, 0.3])
    for _, row in table.iterrows():
        t = row["threshold"]
        flagged = p >= t
        tp, fp = int((flagged & (y == 1)).sum()), int((flagged & (y == 0)).sum())
        assert row["net_benefit"] == pytest.approx(tp / 500 - fp / 500 * t / (1 - t))
        assert row["treat_all"] == pytest.approx(y.mean() - (1 - y.mean()) * t / (1 - t))
    assert (table["treat_none"] == 0).all()
    everything = metrics.net_benefit(y, p, [0.0])
    assert everything["net_benefit"].iloc[0] == pytest.approx(everything["treat_all"].iloc[0]) == y.mean()
    assert len(metrics.net_benefit(y, p)) == 99
    with pytest.raises(MelcoreError, match=r"\[0, 1\)"):
        metrics.net_benefit(y, p, [0.5, 1.0])


# --------------------------------------------------------------------------- the one-class policy


def test_auroc_or_none_is_auroc_where_defined_and_none_for_one_class_or_nothing():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = rng.random(60)
    assert metrics.auroc_or_none(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert metrics.auroc_or_none(np.zeros(5, dtype=int), p[:5]) is None
    assert metrics.auroc_or_none([1, 1], [0.2, 0.9]) is None
    assert metrics.auroc_or_none([], []) is None
    with pytest.raises(MelcoreError):
        metrics.auroc_or_none([0, 1], [0.2, 1.5])  # invalid input still says what is wrong


def test_an_undefined_auroc_is_shown_as_one_class_wherever_it_is_shown():
    assert metrics.format_auroc(None) == metrics.format_auroc(float("nan")) == metrics.ONE_CLASS_AUROC
    assert metrics.format_auroc(0.81234) == "0.8123" and metrics.format_auroc(0.8, ".2f") == "0.80"


def test_no_module_keeps_its_own_auroc_policy():
    """Every AUROC that may be undefined goes through melcore.metrics.auroc_or_none."""
    import re
    from pathlib import Path

    package = Path(metrics.__file__).parent
    own = [
        f"{path.relative_to(package.parent)}:{i}"
        for path in sorted(package.rglob("*.py"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"\s*def _?auroc\s*\(", line) and path.name != "metrics.py"
    ]
    assert own == []
