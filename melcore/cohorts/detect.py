"""Which lesion-table format a header is (:func:`detect_format`), for :func:`melcore.cohort.load_cohort`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from melcore.cohorts.tables import ALIASES, columns_text
from melcore.errors import CohortError

__all__ = ["detect_format"]


def detect_format(columns: Sequence[str], path: Path) -> str:
    """The format of a table from its header ``columns`` (case-insensitive); CohortError naming the
    formats and how to pass one (``--format``, ``--map``) when none fits.
    """
    lower = {c.lower() for c in columns}
    if {"image", "mel", "nv"} <= lower:
        return "isic2019"
    if {"image_id", "dx"} <= lower:
        return "ham10000"
    if "image_name" in lower and lower & {"anatom_site_general_challenge", "benign_malignant", "patient_id"}:
        return "isic2020"
    if lower & set(ALIASES["image_name"]):
        return "generic"
    raise CohortError(
        f"{path}: cannot tell the table format from its columns ({columns_text(columns)}). Expected one of: "
        "ISIC 2020 (image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis, "
        "target), ISIC 2019 (image, MEL, NV, BCC, ...), HAM10000 (lesion_id, image_id, dx, age, sex, "
        "localization), generic (image_name, target, ...). Pass --format (format=) or a column mapping "
        "such as --map image_name=COLUMN --map target=COLUMN (mapping={'image_name': ..., 'target': ...})."
    )
