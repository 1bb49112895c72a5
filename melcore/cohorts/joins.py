"""Second tables joined on the image name: metadata (:func:`join_metadata`) and clinics.

Join keys are image names without folder, image extension or ISIC 2019's ``_downsampled``
suffix, so ``ISIC_1``, ``ISIC_1.jpg`` and ``ISIC_1_downsampled`` join one row. A repeated key
uses its first row and is reported; an image with no row keeps its values unknown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from melcore.cohorts.image_files import image_stem
from melcore.cohorts.tables import (
    ALIASES,
    CLINIC_COLUMN_NAMES,
    UNKNOWN_CLINIC,
    Findings,
    columns_text,
    find_column,
    read_csv,
    resolve_aliases,
)
from melcore.errors import CohortError
from melcore.formatting import first_few

__all__ = ["join_metadata", "clinic_from_column", "clinic_from_csv"]


def _join_key(names: pd.Series) -> list[str]:
    """Image names as join keys: no folder, no image extension, no ``_downsampled`` suffix."""
    keys = [image_stem(str(name).strip()) for name in names]
    return [k[: -len("_downsampled")] if k.endswith("_downsampled") else k for k in keys]


def _indexed_by_image(table: pd.DataFrame, key_column: str, path: Path, what: str, report: Findings) -> pd.DataFrame:
    table = table[table[key_column].notna()]
    keys = pd.Series(_join_key(table[key_column]), index=table.index)
    duplicated = keys.duplicated()
    if duplicated.any():
        report.warnings.append(
            f"{what} {path} has {int(duplicated.sum()):,} repeated image names "
            f"(first: {first_few(keys[duplicated].unique())}); the first row of each is used"
        )
        table, keys = table[~duplicated], keys[~duplicated]
    return table.set_axis(keys.to_numpy(), axis=0)


def join_metadata(frame: pd.DataFrame, path: Path, report: Findings) -> None:
    """Fill ``frame``'s missing canonical values from the metadata table at ``path`` and add its other
    columns, joined on the image name (in place).
    """
    meta = read_csv(path, what="metadata")
    key = find_column(meta.columns, ALIASES["image_name"])
    if key is None:
        raise CohortError(
            f"metadata {path} has no image column to join on (columns: {columns_text(meta.columns)}); "
            "expected one of image, image_name, image_id, isic_id"
        )
    sources = resolve_aliases(meta.columns, {"image_name": key}, skip=("target",))
    meta = _indexed_by_image(meta, key, path, "metadata", report)
    aligned = meta.reindex(_join_key(frame["image_name"]))
    matched = aligned[key].notna().to_numpy()
    for canonical, column in sources.items():
        if canonical == "image_name":
            continue
        current = frame[canonical]
        fill = current.isna().to_numpy() & aligned[column].notna().to_numpy()
        if fill.any():
            values = current.astype(object).to_numpy(copy=True)
            values[fill] = aligned[column].to_numpy()[fill]
            frame[canonical] = values
    used = set(sources.values())
    for column in meta.columns:
        if column not in used and column not in frame.columns:
            frame[column] = aligned[column].to_numpy()
    if not matched.all():
        names = frame.loc[~matched, "image_name"].tolist()
        report.warnings.append(
            f"{len(names):,} images have no row in metadata {path.name} "
            f"(first: {first_few(names)}); their metadata stays unknown"
        )


def clinic_from_column(raw: pd.DataFrame | None, frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """The clinic of each row from ``column`` of the source table ``raw`` (or, for a folder cohort, of
    ``frame``); CohortError listing the columns when there is none of that name.
    """
    if raw is not None:
        found = find_column(raw.columns, (column.strip().lower(),))
        if found is not None:
            return raw[found].to_numpy()
    found = find_column([c for c in frame.columns if not c.startswith("__")], (column.strip().lower(),))
    if found is not None:
        return frame[found].to_numpy()
    columns = list(raw.columns) if raw is not None else [c for c in frame.columns if not c.startswith("__")]
    raise CohortError(
        f"{path}: clinic column {column!r} not found; the table has {columns_text(columns)}. "
        "Name one of these with --clinic-column, or join a second table with --clinic-csv."
    )


def clinic_from_csv(frame: pd.DataFrame, path: Path, column: str | None, report: Findings) -> np.ndarray:
    """The clinic of each row of ``frame`` from the table at ``path`` joined on the image name (its
    ``column``, else the first of :data:`~melcore.cohorts.tables.CLINIC_COLUMN_NAMES`); None where it
    has no row.
    """
    table = read_csv(path, what="clinic table")
    key = find_column(table.columns, ("isic_id", "image_name", "image", "image_id", "filename", "file_name"))
    if key is None:
        raise CohortError(
            f"clinic table {path} has no image column to join on (columns: "
            f"{columns_text(table.columns)}); expected isic_id, image_name, image or image_id"
        )
    if column:
        clinic = find_column(table.columns, (column.strip().lower(),))
        if clinic is None:
            raise CohortError(f"clinic table {path} has no column {column!r} (columns: {columns_text(table.columns)})")
    else:
        clinic = find_column(table.columns, CLINIC_COLUMN_NAMES, exclude=(key,))
        if clinic is None:
            raise CohortError(
                f"clinic table {path} has no clinic column (columns: {columns_text(table.columns)}); "
                f"expected one of {', '.join(CLINIC_COLUMN_NAMES)} or name it with --clinic-column"
            )
    table = _indexed_by_image(table, key, path, "clinic table", report)
    values = table[clinic].reindex(_join_key(frame["image_name"]))
    unmatched = values.isna().to_numpy()
    if unmatched.any():
        names = frame.loc[unmatched, "image_name"].tolist()
        report.warnings.append(
            f"{len(names):,} images have no clinic in {path.name} "
            f"(first: {first_few(names)}); their clinic is {UNKNOWN_CLINIC!r}"
        )
    return values.to_numpy()
