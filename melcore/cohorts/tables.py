"""What every lesion-table reader shares: CSV reading, column names, assembly and 0/1 coercion.

Each reader (:mod:`melcore.cohorts.isic2020`, ``isic2019``, ``ham10000``, ``folders``,
``mapping``) turns its source into an *assembled frame* (:func:`assemble`): the
:data:`CANONICAL_COLUMNS` (values not yet coerced), the source's other columns, and three
bookkeeping columns (:data:`LINE_COLUMN`, :data:`FILE_COLUMN`, :data:`PATH_COLUMN`) that
:func:`melcore.cohort.load_cohort` uses to check, join and match the rows and then drops.
What loading finds wrong without being fatal goes into a :class:`Findings` (the
:class:`melcore.cohort.CohortReport` of the cohort being loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from melcore.errors import CohortError
from melcore.formatting import SHOWN, first_few
from melcore.safety import not_a_regular_file

__all__ = [
    "CANONICAL_COLUMNS",
    "ISIC2019_CLASSES",
    "UNKNOWN_CLINIC",
    "CLINIC_COLUMN_NAMES",
    "ALIASES",
    "TARGET_WORDS",
    "LINE_COLUMN",
    "FILE_COLUMN",
    "PATH_COLUMN",
    "Findings",
    "read_csv",
    "columns_text",
    "find_column",
    "resolve_aliases",
    "missing_columns_error",
    "assemble",
    "row_label",
    "coerce_binary",
    "clean_text",
]

CANONICAL_COLUMNS = (
    "image_name",
    "patient_id",
    "lesion_id",
    "sex",
    "age_approx",
    "site",
    "diagnosis",
    "target",
    "clinic",
    "image_path",
)
# The one-hot diagnosis columns of the ISIC 2019 ground truth (read by melcore.cohorts.isic2019; their
# names also make a header recognisable to columns_text).
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
UNKNOWN_CLINIC = "unknown"
CLINIC_COLUMN_NAMES = ("clinic", "attribution", "source", "institution", "centre", "center", "hospital")

# Column names (lower case) recognised for each canonical column, in order of preference.
ALIASES: dict[str, tuple[str, ...]] = {
    "image_name": (
        "image_name",
        "image",
        "image_id",
        "isic_id",
        "filename",
        "file_name",
        "file",
        "img",
        "image_path",
        "filepath",
        "file_path",
        "path",
    ),
    "patient_id": ("patient_id", "patient", "subject_id", "patient_identifier"),
    "lesion_id": ("lesion_id", "lesion", "lesion_identifier"),
    "sex": ("sex", "gender"),
    "age_approx": ("age_approx", "age"),
    "site": (
        "site",
        "anatom_site_general_challenge",
        "anatom_site_general",
        "anatom_site",
        "localization",
        "location",
        "body_site",
    ),
    "diagnosis": ("diagnosis", "dx"),
    "target": ("target", "label", "malignant", "is_malignant", "melanoma", "benign_malignant"),
    "clinic": ("clinic",),
}
TARGET_WORDS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "benign": 0, "malignant": 1}

# Bookkeeping columns of an assembled frame, removed before the table is returned.
LINE_COLUMN = "__line"  # CSV line number (header = line 1), or None
FILE_COLUMN = "__file"  # the image reference as written in the source (may carry an extension or a path)
PATH_COLUMN = "__path"  # image path already known (folder-per-class)


class Findings(Protocol):
    """Where readers record what they find wrong without being fatal; :class:`melcore.cohort.CohortReport`
    is the one implementation (see it for what each list holds)."""

    warnings: list[str]
    dropped: list[tuple[object, str]]
    missing_images: list[str]
    unreadable_images: list[tuple[str, str]]
    notes: list[str]


def read_csv(path: Path, what: str = "table") -> pd.DataFrame:
    """All columns as strings (ids keep leading zeros; labels are validated later)."""
    kind = not_a_regular_file(path)
    if kind == "missing":
        raise CohortError(f"{what} {path} does not exist")
    if kind == "a folder":
        hint = " (for one folder per class pass format='folders' / --format folders)" if what == "table" else ""
        raise CohortError(f"{what} {path} is a folder, not a CSV file{hint}")
    if kind is not None:
        raise CohortError(f"{what} {path} is {kind}, not a CSV file; give the path of a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError as exc:
        raise CohortError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not head.strip():
        raise CohortError(f"{what} {path} is empty: expected a header row and one row per image")
    if b"\0" in head:
        raise CohortError(
            f"{what} {path} is not a CSV file (it has binary content); "
            "expected a comma-separated table with a header row"
        )
    first_line = head.splitlines()[0].decode("utf-8", "replace")
    sep = ","
    if "," not in first_line:
        sep = "\t" if "\t" in first_line else ";" if ";" in first_line else ","
    table = None
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            # index_col=False: a delimiter at the end of every row must not turn the first column into the index
            table = pd.read_csv(path, dtype=object, sep=sep, encoding=encoding, index_col=False)
            break
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CohortError(f"cannot read {what} {path} as CSV: {reason}") from exc
    if table is None:  # pragma: no cover - latin-1 decodes any byte string
        raise CohortError(f"cannot read {what} {path}: unknown text encoding")
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        raise CohortError(
            f"{what} {path} has a header ({columns_text(table.columns)}) but no rows; "
            "expected one row per image below the header"
        )
    return table


_KNOWN_COLUMNS = frozenset(
    [alias for aliases in ALIASES.values() for alias in aliases]
    + [c.lower() for c in ISIC2019_CLASSES]
    + list(CLINIC_COLUMN_NAMES)
    + ["dx_type", "localization", "benign_malignant", "anatom_site_general_challenge"]
)


def columns_text(columns: Sequence[str]) -> str:
    """The header's column names for a message, or only their count when none is a lesion-table column.

    A path typed into the app or the CLI may name any file the server can read (a
    ``.env``, a ``.pgpass``): its first line would be read as the header. Names are
    therefore shown only when at least one is a column name of a known lesion-table
    format (:data:`ALIASES`, the ISIC 2019 classes, the clinic columns); otherwise the
    message gives their number and never their text.
    """
    columns = [str(c) for c in columns]
    if any(c.strip().lower() in _KNOWN_COLUMNS for c in columns):
        return first_few(columns, 30)
    return (
        f"{len(columns)} column(s), none of them a lesion-table column (their names are not shown: "
        "the file does not look like a lesion table)"
    )


def find_column(columns: Sequence[str], candidates: Sequence[str], exclude=()) -> str | None:
    """The first column (case-insensitive) among ``candidates``, in candidate order."""
    by_lower: dict[str, str] = {}
    for column in columns:
        if column not in exclude:
            by_lower.setdefault(column.lower(), column)
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    return None


def resolve_aliases(
    columns: Sequence[str], fixed: Mapping[str, str] | None = None, skip: Sequence[str] = ()
) -> dict[str, str]:
    """canonical -> source column, from ``fixed`` first then the usual names."""
    sources = dict(fixed or {})
    used = set(sources.values())
    for canonical, aliases in ALIASES.items():
        if canonical in sources or canonical in skip:
            continue
        found = find_column(columns, aliases, exclude=used)
        if found is not None:
            sources[canonical] = found
            used.add(found)
    return sources


def missing_columns_error(
    path: Path, fmt: str, missing: Sequence[str], found: Sequence[str], expected: str
) -> CohortError:
    """The error for a table of format ``fmt`` that lacks required columns: what is missing, what the table
    has (:func:`columns_text`), what was ``expected``, and how to pass another format or a mapping."""
    return CohortError(
        f"{path}: the {fmt} format needs column(s) {', '.join(missing)}, but the table has "
        f"{columns_text(found)}; expected {expected}. Pass --format (format=) with the table's format, or a "
        "column mapping such as --map image_name=COLUMN (mapping={'image_name': COLUMN, 'target': COLUMN})."
    )


def assemble(
    raw: pd.DataFrame, sources: Mapping[str, str], derived: Mapping[str, object] | None = None, lines=None
) -> pd.DataFrame:
    """Canonical columns (from ``derived`` values, else ``sources`` columns, else None) then extras."""
    n = len(raw)
    derived = derived or {}
    columns: dict[str, object] = {}
    for canonical in CANONICAL_COLUMNS:
        if canonical in derived:
            value = derived[canonical]
            columns[canonical] = value.to_numpy() if isinstance(value, pd.Series) else value
        elif canonical in sources:
            columns[canonical] = raw[sources[canonical]].to_numpy()
        else:
            columns[canonical] = np.full(n, None, dtype=object)
    used = set(sources.values())
    for column in raw.columns:
        if column in used:
            continue
        out = column
        while out in columns or out.startswith("__"):
            out = f"{out}_original"
        columns[out] = raw[column].to_numpy()
    columns[LINE_COLUMN] = np.arange(2, n + 2) if lines is None else lines
    columns[FILE_COLUMN] = columns["image_name"]
    frame = pd.DataFrame(columns)
    return frame


def row_label(line, name) -> str:
    """Where a row is, for a message: ``"line 12 (ISIC_1)"``, or the image name alone when it has no CSV line."""
    return f"line {line} ({name})" if line is not None and not pd.isna(line) else str(name)


def coerce_binary(values: pd.Series, column: str, lines, names) -> np.ndarray:
    """0/1 floats (NaN = missing) from numbers or the words in TARGET_WORDS; CohortError otherwise."""
    series = pd.Series(values).reset_index(drop=True)
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        out = series.to_numpy(dtype=float, na_value=np.nan)
        missing = np.isnan(out)
        bad = ~missing & ~np.isin(out, (0.0, 1.0))
    else:
        text = clean_text(series)
        missing = np.array([t is None for t in text], dtype=bool)
        out = np.array([np.nan if t is None else TARGET_WORDS.get(t.lower(), np.nan) for t in text], dtype=float)
        bad = np.isnan(out) & ~missing
    if bad.any():
        index = np.flatnonzero(bad)
        shown = [f"{row_label(lines[i], names[i])}: {series.iloc[i]!r}" for i in index[:SHOWN]]
        raise CohortError(
            f"column {column!r} has {len(index):,} values that are not a 0/1 label "
            f"({first_few(shown, total=len(index), sep='; ')}). Use 1 for malignant and 0 for benign (or the words "
            "malignant/benign); leave the cell empty for unlabelled images, or map another column as target."
        )
    return out


def clean_text(values) -> list[str | None]:
    """Stripped strings; None for missing or blank cells."""
    out: list[str | None] = []
    for value in values.tolist() if hasattr(values, "tolist") else list(values):
        if isinstance(value, str):
            value = value.strip()
            out.append(value or None)
        elif value is None or value is pd.NA or value != value:  # value != value: NaN / NaT
            out.append(None)
        else:
            text = str(value).strip()
            out.append(text or None)
    return out
