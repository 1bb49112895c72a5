"""Reader of any CSV through an explicit column mapping (``{canonical column: source column}``)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from melcore.cohorts.tables import (
    CANONICAL_COLUMNS,
    assemble,
    columns_text,
    find_column,
    missing_columns_error,
    resolve_aliases,
)
from melcore.errors import CohortError

__all__ = ["read_mapped"]


def read_mapped(raw: pd.DataFrame, path: Path, mapping: Mapping[str, str]) -> pd.DataFrame:
    """The assembled frame of ``raw`` with ``mapping`` (``{canonical column: source column}``, matched
    case-insensitively) first, then the usual names; CohortError for a key that is not a canonical
    column or a mapped column the table lacks.
    """
    unknown = [k for k in mapping if k not in CANONICAL_COLUMNS or k == "image_path"]
    if unknown:
        raise CohortError(
            f"mapping keys {', '.join(map(repr, unknown))} are not canonical columns; map any of "
            f"{', '.join(c for c in CANONICAL_COLUMNS if c != 'image_path')} (image_path is computed: map "
            "image_name to the column with file names or relative paths)"
        )
    fixed = {}
    absent = []
    for canonical, column in mapping.items():
        found = find_column(raw.columns, (str(column).strip().lower(),))
        if found is None:
            absent.append(f"{column!r} (for {canonical})")
        else:
            fixed[canonical] = found
    if absent:
        raise CohortError(
            f"{path}: mapped column(s) {', '.join(absent)} not in the table; "
            f"its columns are {columns_text(raw.columns)}"
        )
    sources = resolve_aliases(raw.columns, fixed)
    if "image_name" not in sources:
        raise missing_columns_error(
            path,
            "mapping",
            ["image_name"],
            list(raw.columns),
            "a mapping for image_name, e.g. mapping={'image_name': 'file'}",
        )
    derived = {} if "target" in sources else {"target": np.full(len(raw), np.nan)}
    frame = assemble(raw, sources, derived)
    frame.attrs["target_source"] = sources.get("target", "target")
    return frame
