"""What a dataset's ``target`` means, in the words a clinician reads.

A cohort's ``target`` is 1 for the positive class and 0 for the rest, but the positive
class is not the same everywhere: ISIC 2020's ``target`` is *malignant* (against
benign), while ISIC 2019's ``MEL`` column, HAM10000's ``dx == "mel"``, a ``melanoma``
column or a table whose target-0 rows hold carcinomas (basal / squamous cell) mean
*melanoma* (against everything else, which is then "not melanoma", not "benign").

:func:`infer_classes` decides once, when a dataset is read, and :meth:`ClassNames.to_dict`
is stored with the dataset's registration summary (key ``"classes"``);
:func:`dataset_classes` reads it back (inferring from the format for a dataset
registered before the key existed). Pages, tables and exports take every class word
from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd

__all__ = ["ClassNames", "MALIGNANT", "MELANOMA", "dataset_classes", "infer_classes"]

# Diagnoses that are malignant but not melanoma: a table calling them 0 is melanoma-vs-rest.
_OTHER_MALIGNANT_WORDS = ("carcinoma", "bcc", "scc", "bowen", "akiec", "intraepithelial")
# Target columns whose name says malignant-vs-benign.
_MALIGNANT_COLUMNS = frozenset({"benign_malignant", "malignant", "is_malignant"})
_MELANOMA_COLUMNS = frozenset({"melanoma", "mel", "is_melanoma"})
_MALIGNANT_FOLDERS = frozenset({"malignant"})


@dataclass(frozen=True)
class ClassNames:
    """The two class names of a dataset and why they were chosen.

    Attributes
    ----------
    positive : str
        Singular, lower case: ``"melanoma"`` or ``"malignant"``.
    negative : str
        ``"not melanoma"`` or ``"benign"``.
    why : str
        One sentence: what in the table decided it.
    """

    positive: str
    negative: str
    why: str = ""

    @property
    def positive_title(self) -> str:
        """Capitalised positive name for headings and metric labels: ``"Melanoma"``."""
        return self.positive[:1].upper() + self.positive[1:]

    @property
    def negative_title(self) -> str:
        return self.negative[:1].upper() + self.negative[1:]

    @property
    def positive_plural(self) -> str:
        """``"melanomas"`` / ``"malignant lesions"``."""
        return "melanomas" if self.positive == "melanoma" else f"{self.positive} lesions"

    @property
    def negative_plural(self) -> str:
        """``"non-melanoma lesions"`` / ``"benign lesions"``."""
        return "non-melanoma lesions" if self.negative == "not melanoma" else f"{self.negative} lesions"

    def label(self, target) -> str:
        """The word for one target value: 1 -> positive, 0 -> negative, missing -> ``"unlabelled"``."""
        if target is None or target is pd.NA:
            return "unlabelled"
        try:
            value = float(target)
        except (TypeError, ValueError):
            return "unlabelled"
        if value != value:  # NaN
            return "unlabelled"
        return self.positive if int(value) == 1 else self.negative

    def labels(self, targets) -> pd.Series:
        """:meth:`label` of every value of ``targets`` (array-like), as an object Series."""
        series = pd.Series(targets)
        return pd.Series([self.label(v) for v in series], index=series.index, dtype=object)

    def to_dict(self) -> dict:
        return {"positive": self.positive, "negative": self.negative, "why": self.why}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ClassNames":
        return cls(str(data["positive"]), str(data["negative"]), str(data.get("why") or ""))


#: Melanoma against every other diagnosis (the default).
MELANOMA = ClassNames("melanoma", "not melanoma")
#: Malignant against benign.
MALIGNANT = ClassNames("malignant", "benign")


def _melanoma(why: str) -> ClassNames:
    return ClassNames(MELANOMA.positive, MELANOMA.negative, why)


def _malignant(why: str) -> ClassNames:
    return ClassNames(MALIGNANT.positive, MALIGNANT.negative, why)


def infer_classes(
    format: str | None, target_column: str | None = None, table: pd.DataFrame | None = None
) -> ClassNames:
    """The class names of a table from its format, its target column and its diagnoses.

    Parameters
    ----------
    format : str or None
        The cohort loader (:data:`melcore.cohort.FORMATS`).
    target_column : str, optional
        The source column (or class folder) the target was read from.
    table : DataFrame, optional
        The canonical table (``diagnosis`` and ``target`` columns are read).

    Returns
    -------
    ClassNames
        Melanoma / not melanoma unless the table really is malignant vs benign: its
        target column says malignant, it is ISIC 2020 (whose ``target`` is malignant), or
        its positives hold malignant diagnoses other than melanoma. Target-0 rows holding
        carcinomas always make it melanoma / not melanoma.
    """
    column = (target_column or "").strip().lower()
    if format == "isic2019":
        return _melanoma("ISIC 2019's MEL column marks melanoma")
    if format == "ham10000":
        return _melanoma("HAM10000's dx 'mel' marks melanoma")
    diagnoses = _diagnoses_by_target(table)
    negatives_malignant = any(_other_malignant(d) for d in diagnoses.get(0, ()))
    positives_other = any(_other_malignant(d) for d in diagnoses.get(1, ()))
    if negatives_malignant:
        return _melanoma("carcinomas are labelled 0, so 1 means melanoma and 0 'not melanoma'")
    if positives_other:
        return _malignant("malignant diagnoses other than melanoma are labelled 1")
    if column in _MELANOMA_COLUMNS:
        return _melanoma(f"the target column {target_column!r} marks melanoma")
    if format == "folders":
        if column in _MALIGNANT_FOLDERS:
            return _malignant("the positive class folder is named 'malignant'")
        return _melanoma("the positive class folder names melanoma")
    if column in _MALIGNANT_COLUMNS:
        return _malignant(f"the target column {target_column!r} marks malignant lesions")
    if format == "isic2020":
        return _malignant("ISIC 2020's target marks malignant lesions")
    if table is not None and "benign_malignant" in table.columns:
        return _malignant("the table's benign_malignant column names the classes")
    return _melanoma("the table does not say malignant vs benign; a positive is read as melanoma")


def dataset_classes(dataset: Mapping | None) -> ClassNames:
    """The class names stored with a registered dataset (its ``summary["classes"]``).

    A dataset registered before the names were stored gets :func:`infer_classes` of its
    format; None (no dataset) gets melanoma / not melanoma.
    """
    if not dataset:
        return MELANOMA
    summary = dataset.get("summary") or {}
    stored = summary.get("classes")
    if isinstance(stored, Mapping) and stored.get("positive") and stored.get("negative"):
        return ClassNames.from_dict(stored)
    return infer_classes(dataset.get("format"))


def _diagnoses_by_target(table: pd.DataFrame | None) -> dict[int, set[str]]:
    if table is None or "diagnosis" not in table.columns or "target" not in table.columns:
        return {}
    known = table[["diagnosis", "target"]].dropna()
    out: dict[int, set[str]] = {}
    for target, group in known.groupby(known["target"].astype(int)):
        out[int(target)] = {str(d).strip().lower() for d in group["diagnosis"].unique()}
    return out


def _other_malignant(diagnosis: str) -> bool:
    words = diagnosis.replace("_", " ").replace("-", " ").split()
    return any(w in _OTHER_MALIGNANT_WORDS for w in words) or "carcinoma" in diagnosis
