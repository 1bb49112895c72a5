"""From a cohort to the tables a run trains on: rows kept, the split, the leakage check.

:func:`prepare_data` keeps the clinic's rows (``config.clinic``), then the labelled rows with an
image file (``excluded`` says how many were left out and why), refuses a cohort with one class
only, and splits by patient (else lesion, else image) with the leakage check:
:func:`melcore.splits.cohort_split` (``val_fraction``) or fold ``config.fold`` of
:func:`melcore.splits.cohort_folds`. It then holds out ``select_fraction`` of the training
patients (the *selection* split, also grouped and stratified: :func:`selection_split`) to choose
the best epoch and to stop early; all three sides must hold both classes. The validation rows
are scored once and never choose anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from melcore.errors import CohortError, MelcoreError
from melcore.formatting import first_few
from melcore.splits import check_no_leakage, cohort_folds, cohort_split, train_val_split
from melcore.training.config import TrainConfig

__all__ = [
    "PreparedData",
    "prepare_data",
    "selection_split",
    "check_split_classes",
    "drop_unreadable",
    "split_tables",
    "select_table",
    "chosen_on",
]

log = logging.getLogger("melcore.train")


@dataclass
class PreparedData:
    """A cohort ready to train on: the usable rows and the three sides of the split.

    Positions (``train_idx``, ``val_idx``, ``select_idx``) index ``cohort``; no patient (else
    lesion, else image) is on two sides. ``excluded`` counts the rows left out and why;
    ``split`` describes the split for ``metrics.json``.
    """

    cohort: Any  # labelled rows with images of the chosen clinic(s)
    train_idx: np.ndarray  # rows the model is fitted on
    val_idx: np.ndarray  # rows reported (validation / out-of-fold); never choose anything
    excluded: dict
    split: dict
    select_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Rows of training patients held out to choose the best epoch and to stop early."""


def _class_counts(targets) -> tuple[int, int]:
    t = pd.Series(targets).astype("float64")
    return int((t == 1).sum()), int((t == 0).sum())


def _require_both_classes(cohort, where: str) -> None:
    n_mal, n_ben = _class_counts(cohort.table["target"])
    if n_mal == 0 or n_ben == 0:
        has, lacks = ("benign", "melanoma (target 1)") if n_mal == 0 else ("melanoma", "benign (target 0)")
        raise CohortError(
            f"{where} has only {has} images ({n_mal + n_ben}) and no {lacks} image; training "
            "needs both classes: add images of the missing class or choose another clinic"
        )


def prepare_data(config: TrainConfig, cohort) -> PreparedData:
    if not hasattr(cohort, "table") or not hasattr(cohort, "subset"):
        raise MelcoreError(f"fit needs a melcore.cohort.Cohort, got {type(cohort).__name__}")
    name = getattr(cohort, "name", "cohort")
    excluded: dict[str, Any] = {
        "other_clinics": 0,
        "unlabelled": 0,
        "no_image": 0,
        "unreadable": 0,
        "unreadable_images": [],
    }
    if len(cohort) == 0:
        raise CohortError(f"cohort {name!r} is empty")
    if config.clinic is not None:
        chosen = cohort.for_clinic(config.clinic)  # CohortError listing the clinics when empty
        excluded["other_clinics"] = len(cohort) - len(chosen)
        cohort = chosen
    where = f"clinic {config.clinic!r}" if config.clinic is not None else f"cohort {name!r}"
    labelled_mask = cohort.table["target"].notna().to_numpy()
    image_mask = cohort.table["image_path"].notna().to_numpy()
    excluded["unlabelled"] = int((~labelled_mask).sum())
    excluded["no_image"] = int((labelled_mask & ~image_mask).sum())
    usable = cohort.subset(labelled_mask & image_mask)
    if len(usable) == 0:
        raise CohortError(
            f"{where} has no labelled image with an image file ({len(cohort)} rows: "
            f"{excluded['unlabelled']} unlabelled, {excluded['no_image']} labelled without an "
            "image file); check --images and the target column"
        )
    _require_both_classes(usable, where)
    if config.fold is not None:
        folds = cohort_folds(usable, config.n_folds, config.seed)
        val_mask = folds == config.fold
        train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
        what = usable.grouping.split(",")[0].removesuffix("_id").removesuffix("_name")
        groups = usable.groups
        check_no_leakage(groups.iloc[train_idx], groups.iloc[val_idx], what=what)
        split = {"method": "fold", "fold": config.fold, "n_folds": config.n_folds}
    else:
        train_idx, val_idx = cohort_split(usable, config.val_fraction, config.seed)
        split = {"method": "val_fraction", "val_fraction": config.val_fraction}
    split.update({"grouping": usable.grouping, "seed": config.seed})
    fit_idx, select_idx = selection_split(usable, np.asarray(train_idx), config)
    split["selection"] = {
        "select_fraction": config.select_fraction,
        "seed": config.seed,
        "chooses": ["best epoch", "early stopping"],
        "images": "patients held out of the training split; the validation images choose nothing",
    }
    data = PreparedData(usable, fit_idx, np.asarray(val_idx), excluded, split, select_idx)
    check_split_classes(data, where)
    return data


def selection_split(cohort, train_idx: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows fitted on, rows that choose the epoch): a grouped, stratified split of ``train_idx``.

    Both are sorted positions in ``cohort`` and together are ``train_idx``; no patient is on both sides.
    """
    groups = cohort.groups.iloc[train_idx]
    fit, select = train_val_split(groups, cohort.table["target"].iloc[train_idx], config.select_fraction, config.seed)
    check_no_leakage(groups.iloc[fit], groups.iloc[select], what="patient")
    return train_idx[fit], train_idx[select]


def check_split_classes(data: PreparedData, where: str) -> None:
    targets = data.cohort.table["target"]
    for side, idx in (
        ("training", data.train_idx),
        ("selection (inner split of the training patients)", data.select_idx),
        ("validation", data.val_idx),
    ):
        if len(idx) == 0:
            raise CohortError(f"the {side} split of {where} is empty; use more patients")
        n_mal, n_ben = _class_counts(targets.iloc[idx])
        if n_mal == 0 or n_ben == 0:
            lacking = "melanoma" if n_mal == 0 else "benign"
            total_mal = _class_counts(targets)[0]
            groups_mal = data.cohort.groups[targets.eq(1).fillna(False).to_numpy()].nunique()
            raise CohortError(
                f"the {side} split of {where} has no {lacking} image ({len(idx)} images): {total_mal} melanoma "
                f"image(s) from {groups_mal} patient(s) cannot fill both sides; validation AUROC needs both "
                "classes on each side: add data, or change val_fraction / select_fraction / the fold"
            )


def _exclude_unreadable(data: PreparedData, bad: dict[int, str]) -> PreparedData:
    """Drop rows (positions in data.cohort) whose image could not be decoded."""
    if not bad:
        return data
    keep = np.ones(len(data.cohort), dtype=bool)
    keep[list(bad)] = False
    new_position = np.cumsum(keep) - 1
    names = data.cohort.table["image_name"].astype(str).to_numpy()
    data.excluded["unreadable"] = len(bad)
    data.excluded["unreadable_images"] = [[names[i], bad[i]] for i in sorted(bad)][:50]

    def kept(idx: np.ndarray) -> np.ndarray:
        return np.asarray(new_position[[i for i in idx if keep[i]]], dtype=np.int64)

    return PreparedData(
        data.cohort.subset(keep),
        kept(data.train_idx),
        kept(data.val_idx),
        data.excluded,
        data.split,
        kept(data.select_idx),
    )


def drop_unreadable(data: PreparedData, bad: dict[int, str], config: TrainConfig) -> PreparedData:
    """Log and leave out the rows whose image could not be decoded, then re-check both splits' classes.

    ``bad`` maps positions in ``data.cohort`` to the reason; shared by
    :func:`melcore.training.image.fit_image` and :func:`melcore.training.fast_head.fit_fast_head`.
    """
    if not bad:
        return data
    names = data.cohort.table["image_name"].astype(str).to_numpy()
    log.warning(
        "left out %d unreadable image(s): %s",
        len(bad),
        first_few((f"{names[i]}: {reason}" for i, reason in bad.items()), sep="; "),
    )
    data = _exclude_unreadable(data, bad)
    check_split_classes(data, f"clinic {config.clinic!r}" if config.clinic else "the cohort")
    return data


def split_tables(data: PreparedData) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(training rows, validation rows, counts) of ``data``; the counts are logged.

    counts: ``n_train``, ``n_select``, ``n_val`` (images), ``n_malignant`` and ``n_patients``
    (``{"train": int, "select": int, "val": int}``), as they go into ``metrics.json``. The
    selection rows are :func:`select_table`.
    """
    table = data.cohort.table
    train_table = table.iloc[data.train_idx].reset_index(drop=True)
    val_table = table.iloc[data.val_idx].reset_index(drop=True)
    groups = data.cohort.groups
    sides = {"train": data.train_idx, "select": data.select_idx, "val": data.val_idx}
    counts = {
        "n_train": len(data.train_idx),
        "n_select": len(data.select_idx),
        "n_val": len(data.val_idx),
        "n_malignant": {side: int(table["target"].iloc[idx].eq(1).sum()) for side, idx in sides.items()},
        "n_patients": {side: int(groups.iloc[idx].nunique()) for side, idx in sides.items()},
    }
    log.info(
        "split (%s, grouped by %s): train %d images (%d melanoma, %d patients), selection of the best epoch "
        "%d images (%d melanoma, %d training patients held out), validation %d images (%d melanoma, "
        "%d patients; chooses nothing)",
        data.split["method"],
        data.split["grouping"],
        counts["n_train"],
        counts["n_malignant"]["train"],
        counts["n_patients"]["train"],
        counts["n_select"],
        counts["n_malignant"]["select"],
        counts["n_patients"]["select"],
        counts["n_val"],
        counts["n_malignant"]["val"],
        counts["n_patients"]["val"],
    )
    return train_table, val_table, counts


def chosen_on(counts: dict) -> dict:
    """Which images chose what (``metrics["chosen_on"]``): the validation images choose nothing."""
    return {
        "best_epoch": "selection",
        "early_stopping": "selection",
        "threshold": "fixed at 0.5, not chosen",
        "selection": {
            "images": counts["n_select"],
            "patients": counts["n_patients"]["select"],
            "what": "training patients held out of the fit (select_fraction)",
        },
        "validation": "scored once with the chosen weights; chooses nothing",
    }


def select_table(data: PreparedData) -> pd.DataFrame:
    """The selection rows (training patients held out to choose the best epoch), RangeIndex."""
    return data.cohort.table.iloc[data.select_idx].reset_index(drop=True)
