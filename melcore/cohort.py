"""Lesion tables in one canonical form: the cohort, its loader, and the rules derived from its columns.

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

Every other source column is kept after these. Each format has its reader in
:mod:`melcore.cohorts` (one module per format, beside the CSV reading, joins and image
matching they share); :func:`load_cohort` picks the reader, then runs the checks every
format shares. Problems that make the table unusable (unreadable file, missing columns,
duplicate image names, labels outside {0, 1}) raise :class:`~melcore.errors.CohortError`
with a message naming the rows, columns or files; problems that only affect some rows
(missing or corrupt image files, rows without an image name) are listed in
:class:`CohortReport` and never dropped silently.

The rules derived from these columns live here and nowhere else: the group a row belongs
to (:func:`group_keys`: patient, else lesion, else image; :func:`table_and_groups` for a
Cohort or a bare DataFrame), the lesion key (:func:`lesion_keys`) and the age band of
``age_approx`` (:data:`AGE_BANDS`, :func:`age_band`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from melcore.classes import infer_classes
from melcore.cohorts.detect import detect_format
from melcore.cohorts.folders import read_folders
from melcore.cohorts.ham10000 import read_ham10000
from melcore.cohorts.image_files import Progress, confine_images, decode_check, image_stem, match_images
from melcore.cohorts.isic2019 import read_isic2019
from melcore.cohorts.isic2020 import read_isic2020
from melcore.cohorts.joins import clinic_from_column, clinic_from_csv, join_metadata
from melcore.cohorts.mapping import read_mapped
from melcore.cohorts.tables import (
    CANONICAL_COLUMNS,
    FILE_COLUMN,
    LINE_COLUMN,
    PATH_COLUMN,
    UNKNOWN_CLINIC,
    clean_text,
    coerce_binary,
    read_csv,
    row_label,
)
from melcore.errors import CohortError, MelcoreError
from melcore.formatting import SHOWN, first_few

__all__ = [
    "AGE_BANDS",
    "UNKNOWN_AGE",
    "CANONICAL_COLUMNS",
    "age_band",
    "benign_only_clinics",
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

FORMATS = ("isic2020", "isic2019", "ham10000", "folders", "generic", "mapping")
CHECK_IMAGES = ("none", "exists", "decode")
MAX_AGE = 120  # years; a larger (or negative, infinite) age is a typo and is treated as unknown


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
        image folder given is an ISIC-layout root
        (:func:`melcore.cohorts.image_files.image_folder_in_root`).
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
        frame = read_folders(source, report)
        raw = None
        if images is not None and Path(images).expanduser().resolve() != source.resolve():
            report.warnings.append(
                f"images={images} is ignored for format 'folders': the images are the "
                f"files in the class folders of {source}"
            )
    else:
        raw = read_csv(source)
        if format is None:
            format = detect_format(raw.columns, source)
        if format == "isic2019":
            frame = read_isic2019(raw, source)
        elif format == "ham10000":
            frame = read_ham10000(raw, source)
        elif format == "mapping":
            frame = read_mapped(raw, source, mapping)
        else:
            frame = read_isic2020(raw, source, format, report)

    target_source = frame.attrs.pop("target_source", "target")
    if clinic_column and not clinic_csv:
        frame["clinic"] = clinic_from_column(raw, frame, clinic_column, source)

    frame = _drop_rows_without_name(frame, report)
    _check_duplicates(frame, source)
    if metadata is not None:
        join_metadata(frame, Path(metadata).expanduser(), report)
    if clinic_csv is not None:
        frame["clinic"] = clinic_from_csv(frame, Path(clinic_csv).expanduser(), clinic_column, report)

    frame["target"] = _coerce_target(frame, target_source)
    frame["age_approx"] = _coerce_age(frame, report)
    for column in ("patient_id", "lesion_id", "sex", "site", "diagnosis", "clinic"):
        frame[column] = _as_object(frame[column])
    frame["clinic"] = frame["clinic"].where(frame["clinic"].notna(), UNKNOWN_CLINIC)

    if format == "folders":
        images_dir = source.resolve()
        paths = frame[PATH_COLUMN].astype(object)
    else:
        images_dir, paths = match_images(frame, source, images, format, check_images, report)
    frame["image_path"] = paths
    confine_images(frame, [images_dir, source.resolve() if format == "folders" else source.resolve().parent], report)
    if check_images == "decode":
        decode_check(frame, report, progress)

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


# --------------------------------------------------------------------------- checks on the assembled table (every format)


def _drop_rows_without_name(frame: pd.DataFrame, report: CohortReport) -> pd.DataFrame:
    """Strip names, split off extensions / folders, drop (and report) rows with no name."""
    text = pd.Series([t or "" for t in clean_text(frame["image_name"])], index=frame.index, dtype=object)
    empty = (text == "").to_numpy()
    if empty.any():
        lines = frame.loc[empty, LINE_COLUMN].tolist()
        for i, line in enumerate(lines):
            report.dropped.append((line if line is not None else int(np.flatnonzero(empty)[i]), "no image name"))
        report.warnings.append(f"dropped {int(empty.sum()):,} rows with no image name (lines {first_few(lines)})")
        frame = frame.loc[~empty].reset_index(drop=True)
        text = text[~empty].reset_index(drop=True)
    has_path = frame[PATH_COLUMN].notna() if PATH_COLUMN in frame else pd.Series(False, index=frame.index)
    frame[FILE_COLUMN] = frame[FILE_COLUMN].where(has_path, text)
    frame["image_name"] = [image_stem(ref) for ref in text.tolist()]
    return frame


def _check_duplicates(frame: pd.DataFrame, path: Path) -> None:
    names = frame["image_name"]
    dup = names.duplicated(keep=False)
    if not dup.any():
        return
    lines_by_name: dict[str, list] = {}
    for name, line in zip(names[dup], frame.loc[dup, LINE_COLUMN]):
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


def _coerce_target(frame: pd.DataFrame, column: str) -> pd.Series:
    values = coerce_binary(frame["target"], column, frame[LINE_COLUMN].to_numpy(), frame["image_name"].to_numpy())
    return pd.Series(pd.array(np.where(np.isnan(values), None, values), dtype="Int8"), index=frame.index)


def _coerce_age(frame: pd.DataFrame, report: CohortReport) -> pd.Series:
    raw = frame["age_approx"]
    numbers = pd.to_numeric(raw, errors="coerce").astype("float64")
    text_present = pd.Series([t is not None for t in clean_text(raw)], index=raw.index)
    bad = text_present & numbers.isna()
    if bad.any():
        shown = [
            f"{row_label(line, n)}: {v!r}"
            for line, n, v in zip(
                frame.loc[bad, LINE_COLUMN][:SHOWN], frame.loc[bad, "image_name"][:SHOWN], raw[bad][:SHOWN]
            )
        ]
        report.warnings.append(
            f"{int(bad.sum()):,} age values are not numbers and are treated as unknown "
            f"({first_few(shown, total=int(bad.sum()), sep='; ')})"
        )
    implausible = numbers.notna() & ~numbers.between(0, MAX_AGE)
    if implausible.any():
        shown = [
            f"{row_label(line, n)}: {v!r}"
            for line, n, v in zip(
                frame.loc[implausible, LINE_COLUMN][:SHOWN],
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


def _as_object(series: pd.Series) -> pd.Series:
    """object column of stripped str, None for missing/empty."""
    return pd.Series(clean_text(series), index=series.index, dtype=object)


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
