"""Reader of the HAM10000 metadata table (``image_id``, ``dx``; ``dx == "mel"`` is the target)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from melcore.cohorts.tables import assemble, find_column, missing_columns_error, resolve_aliases

__all__ = ["read_ham10000"]


def read_ham10000(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The assembled frame of a HAM10000 table (image_id, dx; target 1 where ``dx`` is ``mel``)."""
    image = find_column(raw.columns, ("image_id",))
    dx = find_column(raw.columns, ("dx",))
    missing = [c for c, f in (("image_id", image), ("dx", dx)) if f is None]
    if missing:
        raise missing_columns_error(
            path, "ham10000", missing, list(raw.columns), "lesion_id, image_id, dx, dx_type, age, sex, localization"
        )
    sources = resolve_aliases(raw.columns, {"image_name": image, "diagnosis": dx}, skip=("target",))
    code = raw[dx].str.strip().str.lower()
    target = np.where(code.isna(), np.nan, (code == "mel").astype(float))
    frame = assemble(raw, sources, {"target": target})
    frame.attrs["target_source"] = dx
    return frame
