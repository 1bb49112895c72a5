"""Reader of the ISIC 2019 ground truth: one-hot class columns (``MEL``, ``NV``, ``BCC``, ...), ``MEL`` the target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from melcore.cohorts.tables import ISIC2019_CLASSES, assemble, coerce_binary, find_column, missing_columns_error
from melcore.errors import CohortError
from melcore.formatting import SHOWN, first_few

__all__ = ["read_isic2019"]


def read_isic2019(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The assembled frame of an ISIC 2019 ground truth: diagnosis = the class marked 1, target = ``MEL``;
    CohortError for a value that is not 0/1 or a row marking more than one class.
    """
    image = find_column(raw.columns, ("image",))
    classes = [(c, find_column(raw.columns, (c.lower(),))) for c in ISIC2019_CLASSES]
    present = [(c, col) for c, col in classes if col is not None]
    missing = [c for c, col in (("image", image), ("MEL", dict(classes)["MEL"])) if col is None]
    if missing:
        raise missing_columns_error(
            path, "isic2019", missing, list(raw.columns), "image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK (one-hot)"
        )
    names = raw[image].astype(object).to_numpy()
    lines = np.arange(2, len(raw) + 2)
    onehot = np.zeros((len(raw), len(present)), dtype=float)
    for j, (_, column) in enumerate(present):
        values = coerce_binary(raw[column], column, lines, names)
        onehot[:, j] = values
    hot = np.nan_to_num(onehot) == 1
    n_hot = hot.sum(axis=1)
    several = np.flatnonzero(n_hot > 1)
    if len(several):
        shown = [
            f"line {lines[i]} ({names[i]}): {'+'.join(c for (c, _), h in zip(present, hot[i]) if h)}"
            for i in several[:SHOWN]
        ]
        raise CohortError(
            f"{path}: {len(several):,} rows mark more than one diagnosis class "
            f"({first_few(shown, total=len(several), sep='; ')}); each row of the ISIC 2019 "
            "ground truth must have exactly one 1"
        )
    labels = np.array([c for c, _ in present], dtype=object)
    diagnosis = np.where(n_hot == 1, labels[hot.argmax(axis=1)], None)
    target = onehot[:, [c for c, _ in present].index("MEL")]
    sources = {"image_name": image}
    frame = assemble(raw, sources, {"diagnosis": diagnosis, "target": target})
    frame.attrs["target_source"] = dict(present)["MEL"]
    return frame
