"""Reader of ISIC 2020 (Kaggle SIIM-ISIC) tables and of "generic" tables with near-canonical names.

Both find their columns by the usual names (:data:`melcore.cohorts.tables.ALIASES`:
``image_name`` or ``image``/``isic_id``/``filename``..., ``target`` or ``label``...); the two
formats differ only in what the message for a missing image column expects. A table without
a label column is read as unlabelled (the ISIC 2020 ``test.csv``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from melcore.cohorts.tables import TARGET_WORDS, Findings, assemble, find_column, missing_columns_error, resolve_aliases
from melcore.formatting import first_few

__all__ = ["read_isic2020"]


def read_isic2020(raw: pd.DataFrame, path: Path, fmt: str, report: Findings) -> pd.DataFrame:
    """The assembled frame of an ISIC 2020 (``fmt="isic2020"``) or near-canonical (``fmt="generic"``) table.

    A ``target`` disagreeing with ``benign_malignant`` is reported (``target`` is used); without a
    label column every image is unlabelled.
    """
    sources = resolve_aliases(raw.columns)
    if "image_name" not in sources:
        expected = (
            (
                "image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis, "
                "target (test.csv: no target)"
            )
            if fmt == "isic2020"
            else "an image column (image_name, image, image_id, isic_id or filename) and target"
        )
        raise missing_columns_error(path, fmt, ["image_name"], list(raw.columns), expected)
    derived = {}
    if "target" in sources and sources["target"].lower() != "benign_malignant":
        other = find_column(raw.columns, ("benign_malignant",), exclude=(sources["target"],))
        if other is not None:
            words = raw[other].str.strip().str.lower().map(TARGET_WORDS)
            numbers = pd.to_numeric(raw[sources["target"]], errors="coerce")
            disagree = words.notna() & numbers.notna() & (words != numbers)
            if disagree.any():
                names = raw.loc[disagree, sources["image_name"]].tolist()
                report.warnings.append(
                    f"{int(disagree.sum()):,} rows have {sources['target']!r} disagreeing with {other!r} "
                    f"(first: {first_few(names)}); {sources['target']!r} is used"
                )
    if "target" not in sources:
        report.warnings.append(f"no target (label) column: all {len(raw):,} images are unlabelled")
        derived["target"] = np.full(len(raw), np.nan)
    frame = assemble(raw, sources, derived)
    frame.attrs["target_source"] = sources.get("target", "target")
    return frame
