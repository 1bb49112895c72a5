"""Grouped, stratified, seeded splits and the leakage check (melcore.splits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from melcore.cohort import load_cohort
from melcore.errors import ConfigError, LeakageError, MelcoreError
from melcore.splits import check_no_leakage, cohort_folds, cohort_split, group_kfold, train_val_split

rows = st.lists(st.tuples(st.integers(0, 25), st.sampled_from([0, 1, None])), min_size=1, max_size=120)


def _group_malignant(groups, targets) -> pd.Series:
    return pd.Series([t == 1 for t in targets]).groupby(pd.Series(groups)).sum()


@settings(max_examples=150, deadline=None)
@given(rows=rows, n_folds=st.integers(2, 6), seed=st.integers(0, 2**32 - 1))
def test_kfold_never_leaks_and_covers_every_row_once(rows, n_folds, seed):
    groups = [f"P{g}" for g, _ in rows]
    targets = [t for _, t in rows]
    assume(len(set(groups)) >= n_folds)
    folds = group_kfold(groups, targets, n_folds=n_folds, seed=seed)
    assert folds.shape == (len(rows),)
    members = [np.flatnonzero(folds == k) for k in range(n_folds)]
    assert all(len(m) for m in members)  # no empty fold
    assert np.array_equal(np.sort(np.concatenate(members)), np.arange(len(rows)))  # every row exactly once
    for k in range(n_folds):  # a group never spans two folds
        inside = {groups[i] for i in members[k]}
        outside = {groups[i] for i in np.flatnonzero(folds != k)}
        check_no_leakage(outside, inside)
    per_group = _group_malignant(groups, targets)
    per_fold = [sum(targets[i] == 1 for i in m) for m in members]
    assert max(per_fold) - min(per_fold) <= per_group.max()


@settings(max_examples=150, deadline=None)
@given(rows=rows, fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_train_val_split_never_leaks_and_covers_every_row_once(rows, fraction, seed):
    groups = [f"P{g}" for g, _ in rows]
    targets = [t for _, t in rows]
    assume(len(set(groups)) >= 2)
    train, val = train_val_split(groups, targets, val_fraction=fraction, seed=seed)
    assert len(train) and len(val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(rows)))
    check_no_leakage([groups[i] for i in train], [groups[i] for i in val])


def _patients(n_patients: int, seed: int, malignant_rate: float = 0.1):
    rng = np.random.default_rng(seed)
    groups, targets = [], []
    for p in range(n_patients):
        n = int(rng.integers(1, 12))
        groups += [f"IP_{p}"] * n
        targets += list((rng.random(n) < malignant_rate).astype(int))
    return np.array(groups, dtype=object), np.array(targets)


def test_kfold_balances_malignant_and_rows():
    groups, targets = _patients(300, seed=1)
    folds = group_kfold(groups, targets, n_folds=5, seed=0)
    malignant = np.bincount(folds, weights=targets).astype(int)
    sizes = np.bincount(folds)
    largest_group = int(pd.Series(targets).groupby(groups).sum().max())
    assert malignant.max() - malignant.min() <= largest_group
    assert sizes.max() - sizes.min() <= pd.Series(groups).value_counts().max()
    groups_with_malignant = pd.Series(targets).groupby(groups).max()
    per_fold = pd.Series(folds).groupby(groups).first()[groups_with_malignant.index]
    counts = per_fold[groups_with_malignant == 1].value_counts()
    assert counts.max() - counts.min() <= 1  # stratified on "patient has a melanoma"


def test_same_seed_same_split_other_seed_other_split():
    groups, targets = _patients(200, seed=2)
    a = group_kfold(groups, targets, n_folds=5, seed=11)
    assert np.array_equal(a, group_kfold(groups, targets, n_folds=5, seed=11))
    assert not np.array_equal(a, group_kfold(groups, targets, n_folds=5, seed=12))
    t1, v1 = train_val_split(groups, targets, 0.25, seed=3)
    t2, v2 = train_val_split(groups, targets, 0.25, seed=3)
    assert np.array_equal(t1, t2) and np.array_equal(v1, v2)
    assert not np.array_equal(v1, train_val_split(groups, targets, 0.25, seed=4)[1])


def test_group_bigger_than_a_fold_gets_its_own_fold():
    groups = ["big"] * 50 + [f"s{i}" for i in range(20)]
    targets = [0] * 70
    folds = group_kfold(groups, targets, n_folds=5, seed=0)
    big_fold = folds[0]
    assert (folds[:50] == big_fold).all()
    assert not (folds[50:] == big_fold).any()
    assert sorted(np.bincount(folds)) == [5, 5, 5, 5, 50]


def test_val_fraction_is_met_for_rows_and_malignant():
    groups = np.arange(1000).astype(str)
    targets = np.r_[np.ones(100), np.zeros(900)]
    train, val = train_val_split(groups, targets, val_fraction=0.2, seed=5)
    assert len(val) == 200 and len(train) == 800
    assert targets[val].sum() == 20


def test_unlabelled_rows_count_as_benign():
    groups = ["a", "b", "c", "d"]
    folds = group_kfold(groups, pd.array([1, pd.NA, None, 0], dtype="Int8"), n_folds=2, seed=0)
    assert sorted(np.bincount(folds)) == [2, 2]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: group_kfold(["a", "b"], [0, 1], n_folds=1), "need at least 2 folds"),
        (lambda: group_kfold(["a", "a", "b"], [0, 1, 0], n_folds=3), "cannot make 3 folds from 2 groups"),
        (lambda: train_val_split(["a", "b"], [0, 1], val_fraction=1.5), "val_fraction=1.5"),
        (lambda: train_val_split(["a", "a"], [0, 1]), "cannot split 1 group"),
    ],
)
def test_impossible_requests_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(MelcoreError, match="groups has 3 rows but targets has 2"):
        group_kfold(["a", "b", "c"], [0, 1], n_folds=2)
    with pytest.raises(MelcoreError, match=r"1 rows have no group \(rows 1\)"):
        group_kfold(["a", None, "c"], [0, 1, 0], n_folds=2)


def test_check_no_leakage_names_shared_patients():
    check_no_leakage(["IP_1", "IP_2"], ["IP_3"])  # disjoint: fine
    with pytest.raises(LeakageError) as info:
        check_no_leakage([f"IP_{i}" for i in range(10)], [f"IP_{i}" for i in range(3, 20)])
    message = str(info.value)
    assert message.startswith("7 patients appear in both training and validation")
    assert "IP_3, IP_4, IP_5, IP_6, IP_7, ... (+2 more)" in message
    with pytest.raises(LeakageError, match=r"1 lesion appear.*\(L1\).*split by lesion"):
        check_no_leakage(["L1"], ["L1"], what="lesion")


def _small_cohort(tmp_path: Path):
    lines = ["image_name,patient_id,lesion_id,target"]
    rng = np.random.default_rng(0)
    for i in range(60):
        patient = f"P{i // 3}" if i < 45 else ""
        lines.append(f"img{i},{patient},L{i // 2},{int(rng.random() < 0.2)}")
    csv = tmp_path / "c.csv"
    csv.write_text("\n".join(lines) + "\n")
    return load_cohort(csv, check_images="none")


def test_cohort_folds_and_split_use_cohort_groups(tmp_path):
    cohort = _small_cohort(tmp_path)
    assert cohort.grouping == "patient_id, else lesion_id"
    folds = cohort_folds(cohort, n_folds=4, seed=1)
    assert folds.shape == (60,)
    assert (pd.Series(folds).groupby(cohort.groups).nunique() == 1).all()
    train, val = cohort_split(cohort, val_fraction=0.25, seed=1)
    assert set(cohort.groups.iloc[train]).isdisjoint(cohort.groups.iloc[val])
    assert len(cohort.subset(train)) + len(cohort.subset(val)) == 60


def test_real_isic2020_folds_are_balanced(isic2020_dir):
    cohort = load_cohort(isic2020_dir / "train.csv", check_images="none")
    folds = cohort_folds(cohort, n_folds=5, seed=0)
    target = cohort.table["target"].to_numpy(dtype=int)
    malignant = np.bincount(folds, weights=target)
    assert malignant.sum() == 584
    largest = int(cohort.table.groupby("patient_id")["target"].sum().max())
    assert malignant.max() - malignant.min() <= largest
    for k in range(5):
        check_no_leakage(cohort.groups[folds != k], cohort.groups[folds == k])
    train, val = cohort_split(cohort, val_fraction=0.2, seed=0)
    assert abs(len(val) / len(cohort) - 0.2) < 0.01
    assert abs(target[val].sum() / 584 - 0.2) < 0.02
