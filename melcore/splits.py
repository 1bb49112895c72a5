"""Patient-grouped, stratified, seeded splits and the leakage check.

Images of one patient look alike (same skin, camera, session), so a patient's images
must never sit on both sides of a split: every function here assigns whole *groups*
(patient, else lesion, else image — see :attr:`melcore.cohort.Cohort.groups`).
Groups are stratified by whether they contain a malignant lesion, and malignant
counts are balanced across folds. The same seed always gives the same split.

Algorithm (greedy, deterministic for a seed): groups are shuffled with the seed, then
ordered largest first (most malignant lesions first for the malignant stratum, most
rows first for the benign stratum); each group goes to the fold (or side) that is
furthest below its share. For k folds this keeps every fold's malignant count within
the largest single group's malignant count of every other fold, and a group larger than
a fold simply fills one fold on its own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from melcore.errors import ConfigError, LeakageError, MelcoreError
from melcore.formatting import first_few

__all__ = ["group_kfold", "train_val_split", "check_no_leakage", "cohort_folds", "cohort_split"]


def _prepare(groups, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group code per row, rows per group, malignant rows per group)."""
    groups = pd.Series(np.asarray(groups, dtype=object).ravel())
    targets = pd.Series(np.asarray(targets, dtype=object).ravel())
    if len(groups) != len(targets):
        raise MelcoreError(f"groups has {len(groups)} rows but targets has {len(targets)}; they must align")
    missing = np.flatnonzero(groups.isna().to_numpy())
    if len(missing):
        raise MelcoreError(
            f"{len(missing)} rows have no group (rows {first_few(missing)}); "
            "give every row a patient, lesion or image id"
        )
    malignant = pd.to_numeric(targets.where(targets.notna(), np.nan), errors="coerce").to_numpy(dtype=float) == 1
    codes, _ = pd.factorize(groups, sort=False)
    sizes = np.bincount(codes)
    n_malignant = np.bincount(codes, weights=malignant.astype(float), minlength=len(sizes)).astype(int)
    return codes, sizes, n_malignant


def _greedy_order(rng: np.random.Generator, keys: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
    """``candidates`` shuffled by ``rng`` then stably sorted by ``keys`` (descending, first key first)."""
    shuffled = candidates[rng.permutation(len(candidates))]
    order = np.lexsort([-key[shuffled] for key in reversed(keys)])
    return shuffled[order]


def group_kfold(groups, targets, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id per row: grouped, stratified by group malignancy, balanced, seeded.

    Parameters
    ----------
    groups : array-like, shape (n,)
        Group key per row (patient, else lesion, else image); no missing values.
    targets : array-like, shape (n,)
        1 malignant, 0 benign; missing (NaN / <NA>) counts as benign for stratification.
    n_folds : int, >= 2 and at most the number of distinct groups
    seed : int

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        Fold in ``0 .. n_folds - 1`` for each row. No group spans two folds, no fold is
        empty, folds' malignant counts differ by at most the largest malignant count of a
        single group, and row counts are balanced as far as group sizes allow.

    Raises
    ------
    ConfigError
        ``n_folds`` < 2 or more folds than groups.
    """
    n_folds = int(n_folds)
    if n_folds < 2:
        raise ConfigError(f"n_folds={n_folds}: need at least 2 folds")
    codes, sizes, n_malignant = _prepare(groups, targets)
    n_groups = len(sizes)
    if n_groups < n_folds:
        raise ConfigError(
            f"cannot make {n_folds} folds from {n_groups} groups (patients/lesions/images); "
            f"use at most {n_groups} folds"
        )
    rng = np.random.default_rng(seed)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    fold_rows = np.zeros(n_folds, dtype=np.int64)
    fold_malignant = np.zeros(n_folds, dtype=np.int64)
    all_groups = np.arange(n_groups)
    malignant_groups = _greedy_order(rng, [n_malignant, sizes], all_groups[n_malignant > 0])
    benign_groups = _greedy_order(rng, [sizes], all_groups[n_malignant == 0])
    big = int(sizes.sum()) + 1
    for g in malignant_groups:
        # Fewest malignant first, then fewest rows; random tie-break so fold 0 is not favoured.
        score = fold_malignant * big + fold_rows + rng.random(n_folds) * 0.5
        fold = int(np.argmin(score))
        fold_of_group[g] = fold
        fold_malignant[fold] += n_malignant[g]
        fold_rows[fold] += sizes[g]
    for g in benign_groups:
        fold = int(np.argmin(fold_rows + rng.random(n_folds) * 0.5))
        fold_of_group[g] = fold
        fold_rows[fold] += sizes[g]
    return fold_of_group[codes]


def train_val_split(groups, targets, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grouped, stratified, seeded train / validation split.

    Parameters
    ----------
    groups, targets : array-like, shape (n,)
        As for :func:`group_kfold`.
    val_fraction : float in (0, 1)
        Target share of rows (and of malignant lesions) in validation; met as closely as
        the group sizes allow.
    seed : int

    Returns
    -------
    (train_idx, val_idx) : two numpy int64 arrays
        Sorted row positions; disjoint, together every row once, no group on both sides,
        both non-empty.

    Raises
    ------
    ConfigError
        ``val_fraction`` outside (0, 1) or fewer than 2 groups.
    """
    val_fraction = float(val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: must be between 0 and 1 (e.g. 0.2)")
    codes, sizes, n_malignant = _prepare(groups, targets)
    n_groups = len(sizes)
    if n_groups < 2:
        raise ConfigError(f"cannot split {n_groups} group(s) into train and validation; need at least 2")
    rng = np.random.default_rng(seed)
    in_val = np.zeros(n_groups, dtype=bool)
    all_groups = np.arange(n_groups)
    malignant_groups = _greedy_order(rng, [n_malignant, sizes], all_groups[n_malignant > 0])
    benign_groups = _greedy_order(rng, [sizes], all_groups[n_malignant == 0])

    def assign(order: np.ndarray, weight: np.ndarray, seen: int, in_validation: int) -> tuple[int, int]:
        for g in order:
            seen += weight[g]
            # Put g on the side that leaves validation's share closest to val_fraction.
            goal = val_fraction * seen
            if abs(in_validation + weight[g] - goal) < abs(in_validation - goal):
                in_val[g] = True
                in_validation += weight[g]
        return seen, in_validation

    assign(malignant_groups, n_malignant, 0, 0)
    rows_seen = int(sizes[malignant_groups].sum())
    rows_val = int(sizes[malignant_groups][in_val[malignant_groups]].sum())
    assign(benign_groups, sizes, rows_seen, rows_val)
    if not in_val.any() or in_val.all():
        # Only possible with a few very unequal groups: move the group whose size is closest to the goal.
        goal = val_fraction * sizes.sum()
        candidate = int(np.argmin(np.abs(sizes - goal)))
        in_val[:] = False
        in_val[candidate] = True
    val_rows = in_val[codes]
    return np.flatnonzero(~val_rows).astype(np.int64), np.flatnonzero(val_rows).astype(np.int64)


def check_no_leakage(train_groups, val_groups, what: str = "patient") -> None:
    """Raise LeakageError when any group appears on both sides.

    Parameters
    ----------
    train_groups, val_groups : iterables of group keys
    what : str
        What a group is, for the message ("patient", "lesion", ...).

    Raises
    ------
    LeakageError
        Naming the number of shared groups and the first few (sorted).
    """
    train = {g for g in pd.Series(list(train_groups), dtype=object).dropna()}
    val = {g for g in pd.Series(list(val_groups), dtype=object).dropna()}
    shared = sorted(train & val, key=str)
    if shared:
        shown = first_few(shared)
        raise LeakageError(
            f"{len(shared)} {what}{'s' if len(shared) != 1 else ''} appear in both training and "
            f"validation ({shown}); split by {what} so each {what} is on one side only"
        )


def cohort_folds(cohort, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """:func:`group_kfold` on a cohort's groups and targets: fold id per table row."""
    return group_kfold(cohort.groups, cohort.table["target"], n_folds=n_folds, seed=seed)


def cohort_split(cohort, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`train_val_split` on a cohort: (train_idx, val_idx) row positions of ``cohort.table``.

    Use ``cohort.subset(train_idx)`` / ``cohort.subset(val_idx)`` for the two cohorts.
    The split is checked with :func:`check_no_leakage` before it is returned.
    """
    groups = cohort.groups
    train_idx, val_idx = train_val_split(groups, cohort.table["target"], val_fraction=val_fraction, seed=seed)
    what = cohort.grouping.split(",")[0].removesuffix("_id").removesuffix("_name")
    check_no_leakage(groups.iloc[train_idx], groups.iloc[val_idx], what=what)
    return train_idx, val_idx
