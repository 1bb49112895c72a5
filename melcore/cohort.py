"""Lesion tables in one canonical form: loaders, validation and image matching.

A *cohort* is a table with one row per lesion image. Whatever the source (ISIC 2020 /
Kaggle SIIM-ISIC, ISIC 2019, HAM10000, one folder per class, a table that already uses
near-canonical names, or any CSV with an explicit column mapping), :func:`load_cohort`
returns a :class:`Cohort` whose table starts with :data:`CANONICAL_COLUMNS`:

==============  ===========================================================================
image_name      str, unique; the file name without its extension
patient_id      object (str or None)
lesion_id       object (str or None)
sex             object (str or None)
age_approx      float64, NaN when unknown
site            object (anatomical site, str or None)
diagnosis       object (str or None)
target          pandas ``Int8``: 1 malignant (melanoma), 0 benign, <NA> unlabelled
clinic          object (str); ``"unknown"`` when the source does not say
image_path      object: absolute path (str) of the image file, or None when it is missing
==============  ===========================================================================

Every other source column is kept after these. Problems that make the table unusable
(unreadable file, missing columns, duplicate image names, labels outside {0, 1}) raise
:class:`~melcore.errors.CohortError` with a message naming the rows, columns or files;
problems that only affect some rows (missing or corrupt image files, rows without an
image name) are listed in :class:`CohortReport` and never dropped silently.

The rules derived from these columns live here and nowhere else: the group a row belongs
to (:func:`group_keys`: patient, else lesion, else image; :func:`table_and_groups` for a
Cohort or a bare DataFrame), the lesion key (:func:`lesion_keys`) and the age band of
``age_approx`` (:data:`AGE_BANDS`, :func:`age_band`).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from melcore.classes import infer_classes
from melcore.errors import CohortError, ImageError, MelcoreError
from melcore.formatting import SHOWN, first_few
from melcore.safety import inside, not_a_regular_file, resolve_roots

__all__ = [
    "AGE_BANDS",
    "UNKNOWN_AGE",
    "CANONICAL_COLUMNS",
    "age_band",
    "benign_only_clinics",
    "columns_text",
    "FORMATS",
    "Cohort",
    "CohortReport",
    "load_cohort",
    "group_keys",
    "lesion_keys",
    "table_and_groups",
    "describe_grouping",
    "grouping_unit",
    "group_label",
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
FORMATS = ("isic2020", "isic2019", "ham10000", "folders", "generic", "mapping")
CHECK_IMAGES = ("none", "exists", "decode")

# Preference order when several files share a name (ISIC_1.jpg and ISIC_1.png).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_EXTENSION_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
MALIGNANT_FOLDER_NAMES = frozenset({"melanoma", "melanomas", "mel", "malignant", "malignant_melanoma"})
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
UNKNOWN_CLINIC = "unknown"
CLINIC_COLUMN_NAMES = ("clinic", "attribution", "source", "institution", "centre", "center", "hospital")

# Column names (lower case) recognised for each canonical column, in order of preference.
_ALIASES: dict[str, tuple[str, ...]] = {
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
_TARGET_WORDS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "benign": 0, "malignant": 1}
MAX_AGE = 120  # years; a larger (or negative, infinite) age is a typo and is treated as unknown

# Internal bookkeeping columns, removed before the table is returned.
_LINE = "__line"  # CSV line number (header = line 1), or None
_FILE = "__file"  # the image reference as written in the source (may carry an extension or a path)
_PATH = "__path"  # image path already known (folder-per-class)

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- data classes


@dataclass
class CohortReport:
    """What loading found wrong without being fatal.

    Attributes
    ----------
    warnings : list of str
        One human-readable sentence per problem (counts plus the first few names).
    dropped : list of (image name or CSV line number, reason)
        Every row left out of the table, with why.
    missing_images : list of str
        Image names whose file was not found (their ``image_path`` is None).
    unreadable_images : list of (image name, reason)
        Files that exist but could not be decoded (``check_images="decode"``); their
        ``image_path`` is None too.
    notes : list of str
        What loading chose that is not a problem, e.g. the image sub-folder used when the
        image folder given is an ISIC-layout root (:func:`image_folder_in_root`).
    """

    warnings: list[str] = field(default_factory=list)
    dropped: list[tuple[object, str]] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Cohort:
    """A lesion table in canonical form (see the module docstring for columns and dtypes).

    Attributes
    ----------
    table : pandas.DataFrame
        One row per image, :data:`CANONICAL_COLUMNS` first, other source columns after,
        RangeIndex.
    name : str
        Display name (defaults to the CSV or folder name).
    format : str
        The loader used: one of :data:`FORMATS`.
    images_dir : Path or None
        Folder the image files were looked up in.
    grouping : str
        Which identifier groups rows for splitting: ``"patient_id"``, ``"lesion_id"``,
        ``"image_name"``, or a fallback chain such as ``"lesion_id, else image_name"``
        when some rows lack the id. Computed from the table when not given.
    report : CohortReport
        Non-fatal problems found while loading.
    source : Path or None
        The CSV (or root folder) the cohort was read from.
    target_column : str or None
        The source column (or ``"class folder"``) the target was read from; with the
        format and diagnoses it decides the class names (:func:`melcore.classes.infer_classes`).
    classes : ClassNames or None
        What target 1 and 0 mean; inferred from the whole table when not given, and kept
        by :meth:`subset` (a subset without carcinomas still means melanoma vs not).
    """

    table: pd.DataFrame
    name: str = "cohort"
    format: str = "generic"
    images_dir: Path | None = None
    grouping: str | None = None
    report: CohortReport = field(default_factory=CohortReport)
    source: Path | None = None
    target_column: str | None = None
    classes: object = None

    def __post_init__(self) -> None:
        if self.grouping is None:
            self.grouping = describe_grouping(self.table)
        if self.classes is None:
            self.classes = infer_classes(self.format, self.target_column, self.table)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Cohort(name={self.name!r}, format={self.format!r}, n_images={len(self)}, grouping={self.grouping!r})"

    @property
    def groups(self) -> pd.Series:
        """Group key per row (str, aligned with ``table``): patient, else lesion, else image.

        See :func:`group_keys`: rows linked by a patient id or a lesion id share one key.
        """
        return group_keys(self.table)

    def summary(self) -> dict:
        """Counts for display and JSON.

        Returns
        -------
        dict
            n_images (rows), n_lesions (distinct lesion ids where known, else images),
            n_patients (distinct groups: patient ids where known, else the grouping used),
            n_malignant, n_benign, n_unlabelled, n_missing_images, n_unreadable_images,
            clinics ({clinic: n_images}, largest first), warnings, notes (what loading chose, such
            as the image sub-folder of an ISIC-layout root), grouping, format, name,
            classes (:meth:`melcore.classes.ClassNames.to_dict`: what target 1 and 0 mean).
        """
        table = self.table
        lesion = table["lesion_id"]
        target = table["target"]
        clinics = table["clinic"].fillna(UNKNOWN_CLINIC).value_counts()
        return {
            "name": self.name,
            "format": self.format,
            "n_images": int(len(table)),
            "n_lesions": int(lesion.dropna().nunique() + lesion.isna().sum()),
            "n_patients": int(self.groups.nunique()),
            "n_malignant": int(target.eq(1).fillna(False).sum()),
            "n_benign": int(target.eq(0).fillna(False).sum()),
            "n_unlabelled": int(target.isna().sum()),
            "n_missing_images": len(self.report.missing_images),
            "n_unreadable_images": len(self.report.unreadable_images),
            "clinics": {str(k): int(v) for k, v in clinics.items()},
            "warnings": list(self.report.warnings),
            "notes": list(self.report.notes),
            "grouping": self.grouping,
            "classes": self.classes.to_dict(),
        }

    def subset(self, mask) -> "Cohort":
        """A new cohort with the rows selected by ``mask``.

        Parameters
        ----------
        mask : array-like of bool (length ``len(self)``) or of int positions
            Boolean Series are aligned on the table index.

        The new table has a fresh RangeIndex. ``report`` keeps the load-time warnings and
        drops; ``missing_images`` / ``unreadable_images`` are restricted to the subset.
        """
        positions = _positions(mask, len(self.table))
        table = self.table.iloc[positions].reset_index(drop=True)
        kept = set(table["image_name"])
        report = CohortReport(
            warnings=list(self.report.warnings),
            dropped=list(self.report.dropped),
            missing_images=[n for n in self.report.missing_images if n in kept],
            unreadable_images=[(n, r) for n, r in self.report.unreadable_images if n in kept],
            notes=list(self.report.notes),
        )
        return Cohort(
            table=table,
            name=self.name,
            format=self.format,
            images_dir=self.images_dir,
            report=report,
            source=self.source,
            target_column=self.target_column,
            classes=self.classes,
        )

    def for_clinic(self, clinic: str) -> "Cohort":
        """The images of one clinic; CohortError listing the clinics when it has none."""
        mask = self.table["clinic"] == clinic
        if not mask.any():
            counts = self.table["clinic"].value_counts()
            listed = ", ".join(f"{k!r} ({v})" for k, v in counts.items()) or "none"
            raise CohortError(f"cohort {self.name!r} has no images from clinic {clinic!r}; clinics: {listed}")
        sub = self.subset(mask.to_numpy())
        sub.name = f"{self.name} [{clinic}]"
        return sub

    def labelled(self) -> "Cohort":
        """Rows whose target is 0 or 1."""
        return self.subset(self.table["target"].notna().to_numpy())

    def with_images(self) -> "Cohort":
        """Rows whose image file was found (and decoded, with ``check_images="decode"``)."""
        return self.subset(self.table["image_path"].notna().to_numpy())


# --------------------------------------------------------------------------- public loader


def load_cohort(
    csv,
    images=None,
    *,
    format: str | None = None,
    metadata=None,
    clinic_column: str | None = None,
    clinic_csv=None,
    mapping: Mapping[str, str] | None = None,
    name: str | None = None,
    check_images: str = "exists",
    progress: Progress | None = None,
) -> Cohort:
    """Read a lesion table (or a folder of class folders) into a :class:`Cohort`.

    Parameters
    ----------
    csv : path
        The label table; for ``format="folders"`` the root folder holding one folder
        per class (``melanoma/``, ``mel/`` or ``malignant/`` -> target 1, others -> 0).
    images : path, optional
        Folder holding the image files (``<image_name>.jpg`` etc., also one level of
        sub-folders). When None it is looked up beside the CSV (``jpeg/train``,
        ``jpeg/test``, ``images``, ``ISIC_2019_Training_Input``, the CSV folder ...).
    format : {"isic2020", "isic2019", "ham10000", "folders", "generic", "mapping"}, optional
        Auto-detected from the header when None (``"mapping"`` when ``mapping`` is given).
    metadata : path, optional
        A second table joined on the image name that fills missing canonical columns and
        adds its other columns (e.g. ``ISIC_2019_Training_Metadata.csv`` or the ISIC 2020
        v2 ground truth with lesion_id).
    clinic_column : str, optional
        Column holding the clinic / source (e.g. ``"attribution"``, ``"source"``); with
        ``clinic_csv`` the column of that file. A column named ``clinic`` is used
        automatically. Missing values become ``"unknown"``.
    clinic_csv : path, optional
        A table joined on the image name (``isic_id``, ``image_name``, ``image`` or
        ``image_id``) giving the clinic (``clinic_column``, else ``clinic``,
        ``attribution``, ``source``...), such as an ISIC archive export.
    mapping : dict, optional
        ``{canonical column: source column}``, e.g. ``{"image_name": "file",
        "target": "label"}``. Canonical columns not mapped are still taken from columns
        with their usual names.
    name : str, optional
        Display name; defaults to the file (or folder) name.
    check_images : {"none", "exists", "decode"}
        ``"exists"`` lists the image folder once and matches names; ``"decode"`` also
        opens every found file with PIL (verify plus a reduced-size decode) and reports
        corrupt ones; ``"none"`` builds paths without touching the disk.
    progress : callable(done, total), optional
        Called while images are decoded (``check_images="decode"``).

    Returns
    -------
    Cohort

    Raises
    ------
    CohortError
        Unreadable or empty table, missing required columns, unknown format, duplicate
        image names, labels outside {0, 1}, bad mapping or clinic column.
    """
    if check_images not in CHECK_IMAGES:
        raise CohortError(f"check_images={check_images!r} is not one of {', '.join(CHECK_IMAGES)}")
    if format is not None and format not in FORMATS:
        raise CohortError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if mapping and format in (None, "generic", "isic2020"):
        format = "mapping"
    elif mapping and format != "mapping":
        raise CohortError(
            f"a column mapping cannot be combined with format {format!r}; drop --format "
            "(format=) to read the table through the mapping"
        )
    if format == "mapping" and not mapping:
        raise CohortError(
            "format 'mapping' needs a column mapping, e.g. mapping={'image_name': 'file', 'target': 'label'}"
        )
    source = Path(csv).expanduser()
    if format is None and source.is_dir():
        format = "folders"

    report = CohortReport()
    if format == "folders":
        frame = _load_folders(source, report)
        raw = None
        if images is not None and Path(images).expanduser().resolve() != source.resolve():
            report.warnings.append(
                f"images={images} is ignored for format 'folders': the images are the "
                f"files in the class folders of {source}"
            )
    else:
        raw = _read_csv(source)
        if format is None:
            format = _detect_format(raw.columns, source)
        if format == "isic2019":
            frame = _load_isic2019(raw, source)
        elif format == "ham10000":
            frame = _load_ham10000(raw, source)
        elif format == "mapping":
            frame = _load_mapping(raw, source, mapping)
        else:
            frame = _load_aliased(raw, source, format, report)

    target_source = frame.attrs.pop("target_source", "target")
    if clinic_column and not clinic_csv:
        frame["clinic"] = _clinic_from_column(raw, frame, clinic_column, source)

    frame = _drop_rows_without_name(frame, report)
    _check_duplicates(frame, source)
    if metadata is not None:
        _join_metadata(frame, Path(metadata).expanduser(), report)
    if clinic_csv is not None:
        frame["clinic"] = _clinic_from_csv(frame, Path(clinic_csv).expanduser(), clinic_column, report)

    frame["target"] = _coerce_target(frame, target_source)
    frame["age_approx"] = _coerce_age(frame, report)
    for column in ("patient_id", "lesion_id", "sex", "site", "diagnosis", "clinic"):
        frame[column] = _as_object(frame[column])
    frame["clinic"] = frame["clinic"].where(frame["clinic"].notna(), UNKNOWN_CLINIC)

    if format == "folders":
        images_dir = source.resolve()
        paths = frame[_PATH].astype(object)
    else:
        images_dir, paths = _match_images(frame, source, images, format, check_images, report)
    frame["image_path"] = paths
    _confine_images(frame, [images_dir, source.resolve() if format == "folders" else source.resolve().parent], report)
    if check_images == "decode":
        _decode_check(frame, report, progress)

    table = _finalise(frame)
    shortcut = clinic_shortcut_warning(table)
    if shortcut:
        report.warnings.append(shortcut)
    if name is None:
        name = _default_name(source)
    return Cohort(
        table=table,
        name=name,
        format=format,
        images_dir=images_dir,
        report=report,
        source=source.resolve(),
        target_column=target_source,
    )


def _labels_per_clinic(table: pd.DataFrame) -> pd.DataFrame | None:
    """Labelled images (``size``) and melanomas (``sum``) per known clinic; None when fewer than two
    clinics are known or no image is a melanoma."""
    labelled = table.loc[table["target"].notna(), ["clinic", "target"]]
    known = labelled[labelled["clinic"].notna() & (labelled["clinic"].astype(str) != UNKNOWN_CLINIC)]
    if known.empty or known["clinic"].nunique() < 2 or not known["target"].eq(1).any():
        return None
    return known.groupby(known["clinic"].astype(str))["target"].agg(["size", "sum"])


def benign_only_clinics(table: pd.DataFrame, *, min_share: float = 0.1) -> list[str]:
    """The clinics / sources that hold no melanoma although they hold at least ``min_share`` of the
    labelled images (largest first), when another clinic holds melanomas; what
    :func:`clinic_shortcut_warning` warns about.

    Parameters
    ----------
    table : DataFrame with ``clinic`` and ``target`` columns (n images)
    min_share : float in (0, 1)
    """
    per_clinic = _labels_per_clinic(table)
    if per_clinic is None:
        return []
    labelled = int(table["target"].notna().sum())
    benign_only = per_clinic[(per_clinic["sum"] == 0) & (per_clinic["size"] >= min_share * labelled)]
    return [str(name) for name in benign_only.sort_values("size", ascending=False).index]


def clinic_shortcut_warning(table: pd.DataFrame, *, min_share: float = 0.1) -> str | None:
    """A warning when the clinic alone goes far to predict the label; None otherwise.

    When some clinics (or sources) hold no melanoma at all while others hold them all, a
    model can score well overall by recognising where an image comes from (camera,
    resolution, framing) instead of the lesion. That happens when public sets are pooled,
    e.g. HAM10000 benign images beside ISIC archive melanomas. The warning names the
    benign-only clinics holding at least ``min_share`` of the labelled images and says how
    to judge models fairly (within clinics that have both classes).

    Parameters
    ----------
    table : DataFrame with ``clinic`` and ``target`` columns (canonical cohort table)
    min_share : float in (0, 1)
        Benign-only clinics smaller than this share of the labelled images are ignored.
    """
    per_clinic = _labels_per_clinic(table)
    if per_clinic is None:
        return None
    labelled = int(table["target"].notna().sum())
    benign_only = per_clinic[(per_clinic["sum"] == 0) & (per_clinic["size"] >= min_share * labelled)]
    if benign_only.empty:
        return None
    with_melanoma = per_clinic[per_clinic["sum"] > 0]
    names = ", ".join(f"{name!r} ({int(row['size']):,} images)" for name, row in benign_only.iterrows())
    where = ", ".join(repr(name) for name in with_melanoma.index[:3]) + (" ..." if len(with_melanoma) > 3 else "")
    verb = "has" if len(benign_only) == 1 else "have"
    return (
        f"clinic/source {names} {verb} no melanoma while every melanoma comes from {where}: a model can score "
        "well overall by recognising where an image comes from. Judge image models within clinics that have "
        "both classes (Compare page: the Subset box, Clinic; python -m melcore evaluate --group-column "
        "clinic)."
    )


# --------------------------------------------------------------------------- reading


def _read_csv(path: Path, what: str = "table") -> pd.DataFrame:
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
    [alias for aliases in _ALIASES.values() for alias in aliases]
    + [c.lower() for c in ISIC2019_CLASSES]
    + list(CLINIC_COLUMN_NAMES)
    + ["dx_type", "localization", "benign_malignant", "anatom_site_general_challenge"]
)


def columns_text(columns: Sequence[str]) -> str:
    """The header's column names for a message, or only their count when none is a lesion-table column.

    A path typed into the app or the CLI may name any file the server can read (a
    ``.env``, a ``.pgpass``): its first line would be read as the header. Names are
    therefore shown only when at least one is a column name of a known lesion-table
    format (:data:`_ALIASES`, the ISIC 2019 classes, the clinic columns); otherwise the
    message gives their number and never their text.
    """
    columns = [str(c) for c in columns]
    if any(c.strip().lower() in _KNOWN_COLUMNS for c in columns):
        return first_few(columns, 30)
    return (
        f"{len(columns)} column(s), none of them a lesion-table column (their names are not shown: "
        "the file does not look like a lesion table)"
    )


def _detect_format(columns: Sequence[str], path: Path) -> str:
    lower = {c.lower() for c in columns}
    if {"image", "mel", "nv"} <= lower:
        return "isic2019"
    if {"image_id", "dx"} <= lower:
        return "ham10000"
    if "image_name" in lower and lower & {"anatom_site_general_challenge", "benign_malignant", "patient_id"}:
        return "isic2020"
    if lower & set(_ALIASES["image_name"]):
        return "generic"
    raise CohortError(
        f"{path}: cannot tell the table format from its columns ({columns_text(columns)}). Expected one of: "
        "ISIC 2020 (image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis, "
        "target), ISIC 2019 (image, MEL, NV, BCC, ...), HAM10000 (lesion_id, image_id, dx, age, sex, "
        "localization), generic (image_name, target, ...). Pass --format (format=) or a column mapping "
        "such as --map image_name=COLUMN --map target=COLUMN (mapping={'image_name': ..., 'target': ...})."
    )


def _find(columns: Sequence[str], candidates: Sequence[str], exclude=()) -> str | None:
    """The first column (case-insensitive) among ``candidates``, in candidate order."""
    by_lower: dict[str, str] = {}
    for column in columns:
        if column not in exclude:
            by_lower.setdefault(column.lower(), column)
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    return None


def _resolve_aliases(
    columns: Sequence[str], fixed: Mapping[str, str] | None = None, skip: Sequence[str] = ()
) -> dict[str, str]:
    """canonical -> source column, from ``fixed`` first then the usual names."""
    sources = dict(fixed or {})
    used = set(sources.values())
    for canonical, aliases in _ALIASES.items():
        if canonical in sources or canonical in skip:
            continue
        found = _find(columns, aliases, exclude=used)
        if found is not None:
            sources[canonical] = found
            used.add(found)
    return sources


def _missing_columns(path: Path, fmt: str, missing: Sequence[str], found: Sequence[str], expected: str) -> CohortError:
    return CohortError(
        f"{path}: the {fmt} format needs column(s) {', '.join(missing)}, but the table has "
        f"{columns_text(found)}; expected {expected}. Pass --format (format=) with the table's format, or a "
        "column mapping such as --map image_name=COLUMN (mapping={'image_name': COLUMN, 'target': COLUMN})."
    )


def _assemble(
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
    columns[_LINE] = np.arange(2, n + 2) if lines is None else lines
    columns[_FILE] = columns["image_name"]
    frame = pd.DataFrame(columns)
    return frame


def _load_aliased(raw: pd.DataFrame, path: Path, fmt: str, report: CohortReport) -> pd.DataFrame:
    """ISIC 2020 train/test tables and generic near-canonical tables."""
    sources = _resolve_aliases(raw.columns)
    if "image_name" not in sources:
        expected = (
            (
                "image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis, "
                "target (test.csv: no target)"
            )
            if fmt == "isic2020"
            else "an image column (image_name, image, image_id, isic_id or filename) and target"
        )
        raise _missing_columns(path, fmt, ["image_name"], list(raw.columns), expected)
    derived = {}
    if "target" in sources and sources["target"].lower() != "benign_malignant":
        other = _find(raw.columns, ("benign_malignant",), exclude=(sources["target"],))
        if other is not None:
            words = raw[other].str.strip().str.lower().map(_TARGET_WORDS)
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
    frame = _assemble(raw, sources, derived)
    frame.attrs["target_source"] = sources.get("target", "target")
    return frame


def _load_mapping(raw: pd.DataFrame, path: Path, mapping: Mapping[str, str]) -> pd.DataFrame:
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
        found = _find(raw.columns, (str(column).strip().lower(),))
        if found is None:
            absent.append(f"{column!r} (for {canonical})")
        else:
            fixed[canonical] = found
    if absent:
        raise CohortError(
            f"{path}: mapped column(s) {', '.join(absent)} not in the table; "
            f"its columns are {columns_text(raw.columns)}"
        )
    sources = _resolve_aliases(raw.columns, fixed)
    if "image_name" not in sources:
        raise _missing_columns(
            path,
            "mapping",
            ["image_name"],
            list(raw.columns),
            "a mapping for image_name, e.g. mapping={'image_name': 'file'}",
        )
    derived = {} if "target" in sources else {"target": np.full(len(raw), np.nan)}
    frame = _assemble(raw, sources, derived)
    frame.attrs["target_source"] = sources.get("target", "target")
    return frame


def _load_ham10000(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    image = _find(raw.columns, ("image_id",))
    dx = _find(raw.columns, ("dx",))
    missing = [c for c, f in (("image_id", image), ("dx", dx)) if f is None]
    if missing:
        raise _missing_columns(
            path, "ham10000", missing, list(raw.columns), "lesion_id, image_id, dx, dx_type, age, sex, localization"
        )
    sources = _resolve_aliases(raw.columns, {"image_name": image, "diagnosis": dx}, skip=("target",))
    code = raw[dx].str.strip().str.lower()
    target = np.where(code.isna(), np.nan, (code == "mel").astype(float))
    frame = _assemble(raw, sources, {"target": target})
    frame.attrs["target_source"] = dx
    return frame


def _load_isic2019(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    image = _find(raw.columns, ("image",))
    classes = [(c, _find(raw.columns, (c.lower(),))) for c in ISIC2019_CLASSES]
    present = [(c, col) for c, col in classes if col is not None]
    missing = [c for c, col in (("image", image), ("MEL", dict(classes)["MEL"])) if col is None]
    if missing:
        raise _missing_columns(
            path, "isic2019", missing, list(raw.columns), "image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK (one-hot)"
        )
    names = raw[image].astype(object).to_numpy()
    lines = np.arange(2, len(raw) + 2)
    onehot = np.zeros((len(raw), len(present)), dtype=float)
    for j, (_, column) in enumerate(present):
        values = _coerce_binary(raw[column], column, lines, names)
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
    frame = _assemble(raw, sources, {"diagnosis": diagnosis, "target": target})
    frame.attrs["target_source"] = dict(present)["MEL"]
    return frame


def _load_folders(root: Path, report: CohortReport) -> pd.DataFrame:
    if not root.exists():
        raise CohortError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise CohortError(f"format 'folders' needs a folder with one sub-folder per class; {root} is a file")
    rows: list[tuple[str, str, str, float, str]] = []
    ignored: list[str] = []
    class_dirs = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                class_dirs.append(entry)
            else:
                ignored.append(entry.name)
    for class_dir in sorted(class_dirs, key=lambda e: e.name):
        malignant = class_dir.name.strip().lower() in MALIGNANT_FOLDER_NAMES
        with os.scandir(class_dir.path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                stem, ext = os.path.splitext(entry.name)
                if not entry.is_file() or ext.lower() not in _EXTENSION_RANK:
                    ignored.append(f"{class_dir.name}/{entry.name}")
                    continue
                rows.append((stem, entry.name, os.path.abspath(entry.path), float(malignant), class_dir.name))
    if not rows:
        found = ", ".join(sorted(e.name for e in class_dirs)) or "no sub-folders"
        raise CohortError(
            f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in class folders "
            f"(found {found}); expected e.g. {root}/melanoma/*.jpg and {root}/nevus/*.jpg"
        )
    if ignored:
        report.warnings.append(
            f"ignored {len(ignored):,} entries that are not images in a class folder (first: {first_few(ignored)})"
        )
    if not any(r[3] for r in rows):
        report.warnings.append(
            f"no folder named melanoma, mel or malignant in {root} (classes: "
            f"{', '.join(sorted(e.name for e in class_dirs))}): every image is labelled 0"
        )
    names, files, paths, target, diagnosis = (list(x) for x in zip(*rows))
    raw = pd.DataFrame({"image_name": names})
    frame = _assemble(
        raw,
        {"image_name": "image_name"},
        {"target": np.array(target), "diagnosis": np.array(diagnosis, dtype=object)},
        lines=np.full(len(rows), None, dtype=object),
    )
    frame[_FILE] = files
    frame[_PATH] = paths
    frame.attrs["target_source"] = "class folder"
    return frame


# --------------------------------------------------------------------------- validation


def _where(line, name) -> str:
    return f"line {line} ({name})" if line is not None and not pd.isna(line) else str(name)


def _drop_rows_without_name(frame: pd.DataFrame, report: CohortReport) -> pd.DataFrame:
    """Strip names, split off extensions / folders, drop (and report) rows with no name."""
    text = pd.Series([t or "" for t in _clean_text(frame["image_name"])], index=frame.index, dtype=object)
    empty = (text == "").to_numpy()
    if empty.any():
        lines = frame.loc[empty, _LINE].tolist()
        for i, line in enumerate(lines):
            report.dropped.append((line if line is not None else int(np.flatnonzero(empty)[i]), "no image name"))
        report.warnings.append(f"dropped {int(empty.sum()):,} rows with no image name (lines {first_few(lines)})")
        frame = frame.loc[~empty].reset_index(drop=True)
        text = text[~empty].reset_index(drop=True)
    has_path = frame[_PATH].notna() if _PATH in frame else pd.Series(False, index=frame.index)
    frame[_FILE] = frame[_FILE].where(has_path, text)
    frame["image_name"] = [_image_stem(ref) for ref in text.tolist()]
    return frame


def _image_stem(reference: str) -> str:
    """``"sub/ISIC_1.jpg"`` -> ``"ISIC_1"``: the file name without folders or an image extension."""
    base = reference.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and stem and ("." + ext.lower()) in _EXTENSION_RANK else base


def _check_duplicates(frame: pd.DataFrame, path: Path) -> None:
    names = frame["image_name"]
    dup = names.duplicated(keep=False)
    if not dup.any():
        return
    lines_by_name: dict[str, list] = {}
    for name, line in zip(names[dup], frame.loc[dup, _LINE]):
        lines_by_name.setdefault(name, []).append(line)
    shown = []
    for name, lines in list(lines_by_name.items())[:SHOWN]:
        known = [str(x) for x in lines if x is not None and not pd.isna(x)]
        shown.append(f"{name} (lines {', '.join(known)})" if known else f"{name} ({len(lines)} times)")
    raise CohortError(
        f"{path}: {len(lines_by_name):,} image names appear more than once "
        f"({int(dup.sum()):,} rows; first: {first_few(shown, total=len(lines_by_name), sep='; ')}); "
        "each image must have exactly one row"
    )


def _coerce_binary(values: pd.Series, column: str, lines, names) -> np.ndarray:
    """0/1 floats (NaN = missing) from numbers or the words in _TARGET_WORDS; CohortError otherwise."""
    series = pd.Series(values).reset_index(drop=True)
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        out = series.to_numpy(dtype=float, na_value=np.nan)
        missing = np.isnan(out)
        bad = ~missing & ~np.isin(out, (0.0, 1.0))
    else:
        text = _clean_text(series)
        missing = np.array([t is None for t in text], dtype=bool)
        out = np.array([np.nan if t is None else _TARGET_WORDS.get(t.lower(), np.nan) for t in text], dtype=float)
        bad = np.isnan(out) & ~missing
    if bad.any():
        index = np.flatnonzero(bad)
        shown = [f"{_where(lines[i], names[i])}: {series.iloc[i]!r}" for i in index[:SHOWN]]
        raise CohortError(
            f"column {column!r} has {len(index):,} values that are not a 0/1 label "
            f"({first_few(shown, total=len(index), sep='; ')}). Use 1 for malignant and 0 for benign (or the words "
            "malignant/benign); leave the cell empty for unlabelled images, or map another column as target."
        )
    return out


def _coerce_target(frame: pd.DataFrame, column: str) -> pd.Series:
    values = _coerce_binary(frame["target"], column, frame[_LINE].to_numpy(), frame["image_name"].to_numpy())
    return pd.Series(pd.array(np.where(np.isnan(values), None, values), dtype="Int8"), index=frame.index)


def _coerce_age(frame: pd.DataFrame, report: CohortReport) -> pd.Series:
    raw = frame["age_approx"]
    numbers = pd.to_numeric(raw, errors="coerce").astype("float64")
    text_present = pd.Series([t is not None for t in _clean_text(raw)], index=raw.index)
    bad = text_present & numbers.isna()
    if bad.any():
        shown = [
            f"{_where(line, n)}: {v!r}"
            for line, n, v in zip(frame.loc[bad, _LINE][:SHOWN], frame.loc[bad, "image_name"][:SHOWN], raw[bad][:SHOWN])
        ]
        report.warnings.append(
            f"{int(bad.sum()):,} age values are not numbers and are treated as unknown "
            f"({first_few(shown, total=int(bad.sum()), sep='; ')})"
        )
    implausible = numbers.notna() & ~numbers.between(0, MAX_AGE)
    if implausible.any():
        shown = [
            f"{_where(line, n)}: {v!r}"
            for line, n, v in zip(
                frame.loc[implausible, _LINE][:SHOWN],
                frame.loc[implausible, "image_name"][:SHOWN],
                raw[implausible][:SHOWN],
            )
        ]
        report.warnings.append(
            f"{int(implausible.sum()):,} age values are outside 0-{MAX_AGE} years and are treated "
            f"as unknown ({first_few(shown, total=int(implausible.sum()), sep='; ')}); correct them in the "
            "table"
        )
        numbers = numbers.where(~implausible)
    return numbers


def _clean_text(values) -> list[str | None]:
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


def _as_object(series: pd.Series) -> pd.Series:
    """object column of stripped str, None for missing/empty."""
    return pd.Series(_clean_text(series), index=series.index, dtype=object)


# --------------------------------------------------------------------------- joins


def _join_key(names: pd.Series) -> list[str]:
    """Image names as join keys: no folder, no image extension, no ``_downsampled`` suffix."""
    keys = [_image_stem(str(name).strip()) for name in names]
    return [k[: -len("_downsampled")] if k.endswith("_downsampled") else k for k in keys]


def _indexed_by_image(
    table: pd.DataFrame, key_column: str, path: Path, what: str, report: CohortReport
) -> pd.DataFrame:
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


def _join_metadata(frame: pd.DataFrame, path: Path, report: CohortReport) -> None:
    meta = _read_csv(path, what="metadata")
    key = _find(meta.columns, _ALIASES["image_name"])
    if key is None:
        raise CohortError(
            f"metadata {path} has no image column to join on (columns: {columns_text(meta.columns)}); "
            "expected one of image, image_name, image_id, isic_id"
        )
    sources = _resolve_aliases(meta.columns, {"image_name": key}, skip=("target",))
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


def _clinic_from_column(raw: pd.DataFrame | None, frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    if raw is not None:
        found = _find(raw.columns, (column.strip().lower(),))
        if found is not None:
            return raw[found].to_numpy()
    found = _find([c for c in frame.columns if not c.startswith("__")], (column.strip().lower(),))
    if found is not None:
        return frame[found].to_numpy()
    columns = list(raw.columns) if raw is not None else [c for c in frame.columns if not c.startswith("__")]
    raise CohortError(
        f"{path}: clinic column {column!r} not found; the table has {columns_text(columns)}. "
        "Name one of these with --clinic-column, or join a second table with --clinic-csv."
    )


def _clinic_from_csv(frame: pd.DataFrame, path: Path, column: str | None, report: CohortReport) -> np.ndarray:
    table = _read_csv(path, what="clinic table")
    key = _find(table.columns, ("isic_id", "image_name", "image", "image_id", "filename", "file_name"))
    if key is None:
        raise CohortError(
            f"clinic table {path} has no image column to join on (columns: "
            f"{columns_text(table.columns)}); expected isic_id, image_name, image or image_id"
        )
    if column:
        clinic = _find(table.columns, (column.strip().lower(),))
        if clinic is None:
            raise CohortError(f"clinic table {path} has no column {column!r} (columns: {columns_text(table.columns)})")
    else:
        clinic = _find(table.columns, CLINIC_COLUMN_NAMES, exclude=(key,))
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


# --------------------------------------------------------------------------- images


def _image_dir_candidates(source: Path, fmt: str, frame: pd.DataFrame) -> list[Path]:
    base = source.parent
    split = _table_split(source, frame)
    other = "train" if split == "test" else "test"
    names = [
        f"jpeg/{split}",
        f"jpeg/{other}",
        split,
        "images",
        f"{split}_images",
        "ISIC_2019_Training_Input/ISIC_2019_Training_Input",
        "ISIC_2019_Training_Input",
        "ISIC_2019_Test_Input",
        "HAM10000_images",
        "jpeg",
        ".",
    ]
    if fmt == "isic2019":
        names = names[5:8] + names[:5] + names[8:]
    seen, out = set(), []
    for name in names:
        path = (base / name).resolve()
        if path not in seen and path.is_dir():
            seen.add(path)
            out.append(path)
    return out


def _table_split(source: Path, frame: pd.DataFrame) -> str:
    """``"test"`` for a test table (its name says so, or it holds no label), else ``"train"``."""
    return "test" if ("test" in source.stem.lower() or not frame["target"].notna().any()) else "train"


def _holds_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(
                os.path.splitext(e.name)[1].lower() in _EXTENSION_RANK and not e.name.startswith(".") and e.is_file()
                for e in entries
            )
    except OSError:
        return False


def image_folder_in_root(folder: str | Path, split: str = "train") -> Path | None:
    """The image folder inside an ISIC-layout root, or None when ``folder`` is not one.

    An ISIC-layout root holds no image itself but ``jpeg/<split>/`` (Kaggle SIIM-ISIC 2020,
    the demo cohort) or ``<split>/`` with images; ``split`` is ``"train"`` or ``"test"``
    (the other split is taken when only it exists).

    Parameters
    ----------
    folder : path
        The folder given as the image folder.
    split : {"train", "test"}
        Which split's folder the table describes.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir() or _holds_images(folder):
        return None
    other = "test" if split == "train" else "train"
    for name in (f"jpeg/{split}", split, f"jpeg/{other}", other):
        candidate = folder / name
        if candidate.is_dir() and _holds_images(candidate):
            return candidate.resolve()
    return None


def _list_images(folder: Path) -> dict[str, str]:
    """Lookup key -> absolute path for the image files in ``folder`` and its direct sub-folders.

    Keys: the file name, its stem, and the stem without ``_downsampled`` (ISIC 2019).
    Files directly in ``folder`` win over sub-folders; .jpg over .png etc.
    """
    files: list[tuple[int, int, str, str]] = []
    subdirs: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                ext = os.path.splitext(entry.name)[1].lower()
                if ext in _EXTENSION_RANK and entry.is_file():
                    files.append((0, _EXTENSION_RANK[ext], entry.name, entry.path))
                elif entry.is_dir():
                    subdirs.append(entry.path)
        for subdir in subdirs:
            with os.scandir(subdir) as entries:
                for entry in entries:
                    ext = os.path.splitext(entry.name)[1].lower()
                    if ext in _EXTENSION_RANK and not entry.name.startswith(".") and entry.is_file():
                        files.append((1, _EXTENSION_RANK[ext], entry.name, entry.path))
    except OSError:
        return {}
    files.sort()
    lookup: dict[str, str] = {}
    for _, _, filename, path in files:
        absolute = os.path.abspath(path)
        lookup.setdefault(filename, absolute)
        stem = os.path.splitext(filename)[0]
        lookup.setdefault(stem, absolute)
        if stem.endswith("_downsampled"):
            lookup.setdefault(stem[: -len("_downsampled")], absolute)
    return lookup


def _lookup_paths(frame: pd.DataFrame, lookup: dict[str, str]) -> pd.Series:
    get = lookup.get
    paths = []
    for reference, name in zip(frame[_FILE].tolist(), frame["image_name"].tolist()):
        path = get(reference) or get(name)
        if path is None and name.endswith("_downsampled"):
            path = get(name[: -len("_downsampled")])
        paths.append(path)
    return pd.Series(paths, index=frame.index, dtype=object)


def _is_path(references: pd.Series) -> np.ndarray:
    return np.array(["/" in r or "\\" in r for r in references.astype(str).tolist()], dtype=bool)


def _relative_paths(frame: pd.DataFrame, base: Path) -> pd.Series:
    """Rows whose reference is a path (``a/b.jpg`` or absolute): resolved against ``base``; else NaN."""
    refs = frame[_FILE].astype(str)
    out = pd.Series(None, index=frame.index, dtype=object)
    for i in np.flatnonzero(_is_path(refs)):
        path = Path(refs.iloc[i].replace("\\", "/")).expanduser()
        path = path if path.is_absolute() else base / path
        out.iloc[i] = str(path.resolve())
    return out


def _match_images(
    frame: pd.DataFrame, source: Path, images, fmt: str, check: str, report: CohortReport
) -> tuple[Path | None, pd.Series]:
    n = len(frame)
    has_rel = _is_path(frame[_FILE])
    if images is not None:
        images_dir = Path(images).expanduser().resolve()
        inner = image_folder_in_root(images_dir, _table_split(source, frame))
        if inner is not None:
            report.notes.append(
                f"image folder {images_dir} is an ISIC-layout root; using "
                f"{inner.relative_to(images_dir)}/ in it ({inner})"
            )
            images_dir = images = inner
        candidates = [images_dir]
        if not images_dir.is_dir():
            report.warnings.append(f"image folder {images_dir} does not exist")
    else:
        images_dir = None
        candidates = _image_dir_candidates(source, fmt, frame)

    if check == "none":
        if images_dir is None and candidates:
            images_dir = candidates[0]
        paths = pd.Series(None, index=frame.index, dtype=object)
        if images_dir is not None:
            with_ext = frame[_FILE].where(
                frame[_FILE].str.lower().str.endswith(IMAGE_EXTENSIONS), frame["image_name"] + ".jpg"
            )
            paths = (str(images_dir) + os.sep + with_ext).astype(object)
        if has_rel.any():
            rel = _relative_paths(frame, images_dir or source.parent.resolve())
            paths = paths.where(~has_rel, rel)
        return images_dir, paths

    paths = pd.Series(None, index=frame.index, dtype=object)
    if images is not None:
        if images_dir.is_dir():
            paths = _lookup_paths(frame, _list_images(images_dir))
    else:
        for candidate in candidates:
            found = _lookup_paths(frame, _list_images(candidate))
            if found.notna().any():
                images_dir, paths = candidate, found
                break
    if has_rel.any():
        rel = _relative_paths(frame, images_dir or source.parent.resolve())
        rel = rel.where(rel.map(lambda p: isinstance(p, str) and os.path.isfile(p)), None)
        paths = paths.where(~has_rel, rel)
    missing = paths.isna().to_numpy()
    if missing.any():
        names = frame.loc[missing, "image_name"].tolist()
        report.missing_images.extend(names)
        if images_dir is not None:
            where = f"in {images_dir}"
        elif images is None and candidates:
            where = f"beside the table (looked in {', '.join(str(c) for c in candidates)}; pass images= / --images)"
        elif images is None:
            where = f"(no image folder beside {source.name}; pass images= / --images)"
        else:
            where = f"in {images}"
        report.warnings.append(
            f"{len(names):,} of {n:,} image files not found {where} "
            f"(first: {first_few(names)}); their image_path is None"
        )
    return images_dir, paths


def _confine_images(frame: pd.DataFrame, roots: Sequence[Path | None], report: CohortReport) -> None:
    """Clear (and report) every ``image_path`` outside ``roots`` once ``..`` and symbolic links are resolved.

    The dataset's folders (its image folder and its table's folder) are the only
    places its images are read from, by every consumer of the table (training,
    prediction, Grad-CAM, pages): a row naming ``/etc/passwd`` or ``../../.env``, or a
    symlink in the image folder pointing elsewhere, gets no image path.
    """
    allowed = resolve_roots(roots)
    parent_inside: dict[str, bool] = {}

    def confined(path: str) -> bool:
        parent, name = os.path.split(path)
        if name in ("", ".", "..") or f"{os.sep}..{os.sep}" in path:
            return inside(path, allowed) is not None
        if parent not in parent_inside:
            parent_inside[parent] = inside(parent, allowed) is not None
        return parent_inside[parent] and (not os.path.islink(path) or inside(path, allowed) is not None)

    paths = frame["image_path"].to_numpy(copy=True)
    outside = [i for i, path in enumerate(paths) if isinstance(path, str) and not confined(path)]
    if not outside:
        return
    names = [str(frame["image_name"].iat[i]) for i in outside]
    for i, name in zip(outside, names):
        report.unreadable_images.append((name, "outside the dataset's folders; not read"))
        paths[i] = None
    frame["image_path"] = paths
    where = " and ".join(str(r) for r in allowed) or "none registered"
    report.warnings.append(
        f"{len(outside):,} image paths lie outside the dataset's folders ({where}) once links "
        f"are resolved (first: {first_few(names)}); they are not read and their image_path is "
        "None. Move the images into the image folder."
    )


def _verify_image(path: str) -> str | None:
    """None when the file decodes as :func:`melcore.images.load_image` would read it, else the reason.

    The same checks as training's reads: a regular file, at most the pixel limit in
    force (``MELREVIEW_MAX_PIXELS``), every byte of image data decoded (JPEGs at 1/8 scale).
    """
    from melcore.images import verify_image

    try:
        verify_image(path)
    except ImageError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - every failure means "unreadable"; the reason is reported
        return type(exc).__name__
    return None


def _decode_check(frame: pd.DataFrame, report: CohortReport, progress: Progress | None) -> None:
    found = np.flatnonzero(frame["image_path"].notna().to_numpy())
    total = len(found)
    if total == 0:
        return
    paths = frame["image_path"].to_numpy()[found]
    reasons: list[str | None] = []
    step = max(1, total // 100)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, reason in enumerate(pool.map(_verify_image, paths, chunksize=16), start=1):
            reasons.append(reason)
            if progress is not None and (i % step == 0 or i == total):
                progress(i, total)
    bad = [(int(idx), r) for idx, r in zip(found, reasons) if r is not None]
    if not bad:
        return
    image_path = frame["image_path"].to_numpy(copy=True)
    for idx, reason in bad:
        report.unreadable_images.append((str(frame["image_name"].iat[idx]), reason))
        image_path[idx] = None
    frame["image_path"] = image_path
    shown = [f"{n} ({r})" for n, r in report.unreadable_images[:SHOWN]]
    report.warnings.append(
        f"{len(bad):,} image files could not be decoded ({first_few(shown, total=len(bad), sep='; ')}"
        f"); their image_path is None"
    )


# --------------------------------------------------------------------------- grouping and output


def _ids(table: pd.DataFrame, column: str) -> pd.Series:
    """``table[column]`` as stripped str, None where missing or blank (all None without the column)."""
    if column not in table:
        return pd.Series([None] * len(table), index=table.index, dtype=object)
    values = table[column]
    text = values.astype(str).str.strip().astype(object)
    return text.where(values.notna().to_numpy() & text.ne("").to_numpy(), None)


def _id_present(table: pd.DataFrame, column: str) -> np.ndarray:
    return _ids(table, column).notna().to_numpy()


def _levels(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    has_patient = _id_present(table, "patient_id")
    has_lesion = _id_present(table, "lesion_id") & ~has_patient
    by_image = ~has_patient & ~has_lesion
    return has_patient, has_lesion, by_image


def describe_grouping(table: pd.DataFrame) -> str:
    """Which ids :func:`group_keys` groups ``table``'s rows by, e.g. ``"patient_id, else lesion_id"``."""
    levels = _levels(table)
    used = [name for name, mask in zip(("patient_id", "lesion_id", "image_name"), levels) if mask.any()]
    return ", else ".join(used) if used else "image_name"


def grouping_unit(grouping: str | None, *, singular: bool = False) -> str:
    """What one group of :func:`describe_grouping` is, in words for a count: ``"patients"``
    when every row has a patient id, ``"lesions"`` / ``"images"`` when none has, else the
    chain (``"lesions/images"``: lesion ids where known, else single images).
    ``singular=True``: ``"patient"``, ``"lesion/image"``."""
    words = {"patient_id": "patients", "lesion_id": "lesions", "image_name": "images"}
    if singular:
        words = {k: v[:-1] for k, v in words.items()}
    parts = [words.get(part.strip(), part.strip()) for part in str(grouping or "patient_id").split(", else ")]
    return "/".join(parts)


def group_label(key) -> str:
    """A :func:`group_keys` key for display: the id without its ``"image:"`` / ``"lesion:"`` prefix."""
    text = str(key)
    for prefix in ("image:", "lesion:"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def group_keys(table: pd.DataFrame) -> pd.Series:
    """One group key per connected set of rows: the unit that splits and bootstraps keep whole.

    Rows are linked when they share a ``patient_id`` or a ``lesion_id`` (missing ids link
    nothing), so a lesion whose images carry a patient id only on some rows, or that is
    filed under two patients, makes one group with every row it touches.

    Parameters
    ----------
    table : DataFrame with ``image_name`` and, when known, ``patient_id`` / ``lesion_id``.

    Returns
    -------
    pd.Series of str, aligned with ``table``, named ``group``: the set's smallest patient
    id, else ``"lesion:"`` + its smallest lesion id, else ``"image:" + image_name`` (the
    prefixes keep the three id spaces apart). A key depends only on the rows of its set, so
    keys agree between a cohort and any subset that keeps a set whole.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(table)
    rows, nodes, offset = [], [], n
    ids = {column: _ids(table, column) for column in ("patient_id", "lesion_id")}
    for column in ("patient_id", "lesion_id"):
        present = ids[column].notna().to_numpy()
        codes, _ = pd.factorize(ids[column].where(present)) if present.any() else (None, [])
        if present.any():
            rows.append(np.flatnonzero(present))
            nodes.append(codes[present] + offset)
            offset += int(codes.max()) + 1
    edges_from = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    edges_to = np.concatenate(nodes) if nodes else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(edges_from)), (edges_from, edges_to)), shape=(offset, offset))
    _, component = connected_components(graph, directed=False)
    component = pd.Series(component[:n], index=table.index)
    keys = pd.Series("image:" + table["image_name"].astype(str), index=table.index, dtype=object)
    for column, prefix in (("lesion_id", "lesion:"), ("patient_id", "")):
        present = ids[column].notna().to_numpy()
        if present.any():
            smallest = ids[column].where(present).groupby(component).min()
            found = component.map(smallest)
            keys = keys.where(found.isna(), prefix + found.astype(str))
    return keys.rename("group")


#: Age bands of ``age_approx``: (lowest age included, first age excluded, label), youngest first.
AGE_BANDS = (
    (0.0, 30.0, "0-29"),
    (30.0, 45.0, "30-44"),
    (45.0, 60.0, "45-59"),
    (60.0, 75.0, "60-74"),
    (75.0, math.inf, "75+"),
)
UNKNOWN_AGE = "unknown"


def age_band(age):
    """Age band label for an age in years, or for each age of an array-like.

    Parameters
    ----------
    age : number, None, or array-like of shape (n,)
        Ages in years (``age_approx``); None / NaN / missing are unknown.

    Returns
    -------
    str for a scalar; for an array-like a pd.Series of str named ``age_band`` (a Series keeps its
    index): the :data:`AGE_BANDS` label ("0-29" for ages below 30, "30-44", "45-59", "60-74",
    "75+"), :data:`UNKNOWN_AGE` when the age is missing.

    Raises
    ------
    MelcoreError
        An age that is not a number or is negative (the message names the first few and where).
    """
    if np.ndim(age) == 0:
        return _age_band_one(age)
    series = age if isinstance(age, pd.Series) else pd.Series(np.asarray(age, dtype=object))
    numeric = pd.to_numeric(series, errors="coerce")
    bad = np.flatnonzero((series.notna() & numeric.isna()).to_numpy())
    if len(bad):
        raise MelcoreError(
            "ages must be numbers in years: found "
            + first_few((f"{series.iloc[i]!r} at position {i}" for i in bad[:SHOWN]), total=len(bad))
        )
    values = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    negative = np.flatnonzero(values < 0)
    if len(negative):
        raise MelcoreError(
            "ages cannot be negative: found "
            + first_few((f"{values[i]:g} at position {i}" for i in negative[:SHOWN]), total=len(negative))
        )
    labels = np.full(len(values), UNKNOWN_AGE, dtype=object)
    for low, high, label in AGE_BANDS:
        labels[(values >= low) & (values < high)] = label
    return pd.Series(labels, index=series.index, name="age_band", dtype=object)


def _age_band_one(age) -> str:
    if age is None or age is pd.NA:
        return UNKNOWN_AGE
    try:
        value = float(age)
    except (TypeError, ValueError):
        raise MelcoreError(f"age must be a number in years, got {age!r}") from None
    if math.isnan(value):
        return UNKNOWN_AGE
    if value < 0:
        raise MelcoreError(f"age cannot be negative, got {age!r}")
    for low, high, label in AGE_BANDS:
        if low <= value < high:
            return label
    return UNKNOWN_AGE


def lesion_keys(table: pd.DataFrame) -> pd.Series:
    """One key per lesion, unique within a patient: the ``lesion_id``, else ``"image:" + image_name``
    (an image without a lesion id is a lesion of its own).

    Parameters
    ----------
    table : DataFrame with ``image_name`` and, when known, ``lesion_id``.

    Returns
    -------
    pd.Series of str, aligned with ``table``, named ``lesion``. Combine it with
    :func:`group_keys` to tell lesions of different patients apart.
    """
    lesion = _ids(table, "lesion_id")
    images = "image:" + table["image_name"].astype(str)
    return lesion.where(lesion.notna(), images).astype(str).rename("lesion")


def table_and_groups(data, what: str = "table") -> tuple[pd.DataFrame, pd.Series]:
    """The lesion table of ``data`` and its group key per row (patient, else lesion, else image).

    The one way library code takes "a Cohort or a DataFrame": a :class:`Cohort` gives its
    ``table`` and :attr:`Cohort.groups`; a DataFrame is taken as a canonical lesion table and
    grouped by :func:`group_keys`, the same rule.

    Parameters
    ----------
    data : Cohort or DataFrame
        A DataFrame needs ``image_name`` and may have ``patient_id`` / ``lesion_id``.
    what : str
        What ``data`` is called in the error message ("table", "cohort").

    Returns
    -------
    (DataFrame, pd.Series of str)
        The table as given and its group keys, aligned with it (same index).

    Raises
    ------
    CohortError
        ``data`` is neither, or a DataFrame without ``image_name``.
    """
    table = getattr(data, "table", None)
    if isinstance(table, pd.DataFrame):
        return table, pd.Series(data.groups, index=table.index)
    if not isinstance(data, pd.DataFrame):
        raise CohortError(
            f"{what} must be a melcore Cohort or a pandas DataFrame with canonical columns, not {type(data).__name__}"
        )
    if "image_name" not in data.columns:
        raise CohortError(
            f"the lesion table has no image_name column (columns: {', '.join(map(str, data.columns))});"
            " load it with melcore.cohort.load_cohort or rename the image id column to image_name"
        )
    return data, group_keys(data)


def _finalise(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("__")])
    frame["image_name"] = frame["image_name"].astype(str)
    frame["image_path"] = pd.Series(frame["image_path"].to_numpy(), index=frame.index, dtype=object)
    frame["image_path"] = frame["image_path"].where(frame["image_path"].notna(), None)
    extras = [c for c in frame.columns if c not in CANONICAL_COLUMNS]
    table = frame[list(CANONICAL_COLUMNS) + extras].reset_index(drop=True)
    table.attrs = {}
    return table


def _default_name(source: Path) -> str:
    if source.is_dir():
        return source.resolve().name
    if source.stem.lower() in {"train", "test", "labels", "metadata", "ground_truth", "groundtruth", "data"}:
        parent = source.resolve().parent.name
        return f"{parent}/{source.stem}" if parent else source.stem
    return source.stem


def _positions(mask, n: int) -> np.ndarray:
    if isinstance(mask, pd.Series) and mask.dtype == bool:
        mask = mask.to_numpy()
    values = np.asarray(mask)
    if values.dtype == bool:
        if values.shape != (n,):
            raise CohortError(f"boolean mask has shape {values.shape}; expected ({n},) to match the cohort")
        return np.flatnonzero(values)
    if values.size == 0:
        return np.array([], dtype=int)
    if not np.issubdtype(values.dtype, np.integer):
        raise CohortError(f"subset() takes a boolean mask or integer positions, not {values.dtype}")
    return values.astype(int)
