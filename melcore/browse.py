"""Browsing a dataset by patient: the lesion table joined with a run's scores, patient filters and pages.

The Patients page is layout only; everything it computes is here so it can be
tested and used from a notebook::

    browser = PatientBrowser(cohort, store.get_predictions(run_id))
    patients = browser.patients(Filters(sites=("torso",), above_threshold=True, threshold=0.3))
    page = paginate(patients, page=1, page_size=50)
    lesions = browser.patient_lesions(page.frame["patient"].iloc[0])

Definitions (the page says the same in words):

* **patient**: ``Cohort.groups`` (the patient id, else ``"lesion:<id>"``, else
  ``"image:<name>"``), so a table without patient ids still browses.
* **lesion**: the lesion id within the patient, else the image itself; one row of
  the cohort table is one *image*, and a lesion photographed twice has two images.
* **risk**: the chosen run's prediction for the image (probability of melanoma);
  NaN when the run did not score it (e.g. a training image). When a run stored
  several splits for the same image, the first of :data:`SPLIT_PREFERENCE` wins,
  then the most recently stored row.
* **ugly duckling**: :func:`melcore.meta.features.ugly_duckling_scores` of the run's
  scores: how far the lesion's logit score sits above the patient's other lesions,
  in units of their spread (positive = looks worse than the patient's others);
  NaN when the patient has no other scored lesion.
  :class:`PatientBrowser` computes it per patient when the patient is opened
  (a lesion's value depends only on the same patient's lesions, so this equals
  the whole-table computation and keeps opening a dataset fast).
* **filters** select *lesions* (every filter at once); a patient is listed when
  at least one of their lesions matches. The patient table always counts all of a
  patient's lesions, plus ``n_matching`` (those that match) and ``n_flagged`` (at
  or above the threshold).

Speed: :class:`PatientBrowser` factorises everything once (about half a second
for the 33,126 images of ISIC 2020), after which a filter is a few vectorised
passes over integer codes (milliseconds).

No Streamlit and no TensorFlow here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from melcore.cohort import AGE_BANDS, UNKNOWN_AGE, age_band, lesion_keys, table_and_groups
from melcore.errors import MelcoreError
from melcore.meta.features import ugly_duckling_scores
from melcore.runinfo import run_title

__all__ = [
    "DEFAULT_THRESHOLD",
    "PATIENT_COLUMNS",
    "PATIENT_SORTS",
    "SPLIT_PREFERENCE",
    "UNKNOWN",
    "Filters",
    "Page",
    "PatientBrowser",
    "dataset_roots",
    "filter_levels",
    "image_scores",
    "lesion_frame",
    "paginate",
    "patient_table",
    "patient_diagnoses",
    "prediction_counts",
    "risk_by_image",
    "run_threshold",
    "scored_run_label",
    "scored_runs",
    "sort_patients",
]

UNKNOWN = "unknown"
DEFAULT_THRESHOLD = 0.5
SPLIT_PREFERENCE = ("val", "oof", "test")
"""Order in which a run's prediction splits are preferred when one image has several."""

PATIENT_COLUMNS = (
    "patient",
    "clinic",
    "sex",
    "age_min",
    "age_max",
    "n_images",
    "n_lesions",
    "n_malignant",
    "n_scored",
    "highest_risk",
)
"""Columns of :func:`patient_table` (``PatientBrowser.patients`` adds n_matching and n_flagged)."""

PATIENT_SORTS = {
    "highest risk": (["highest_risk", "n_malignant", "patient"], [False, False, True]),
    "malignant lesions": (["n_malignant", "highest_risk", "patient"], [False, False, True]),
    "lesions": (["n_lesions", "highest_risk", "patient"], [False, False, True]),
    "patient": (["patient"], [True]),
}
"""Sort orders for the patient table: name -> (columns, ascending); missing values always last."""

_AGE_BAND_ORDER = [label for _, _, label in AGE_BANDS] + [UNKNOWN_AGE]


def filter_levels(column: str, values: Iterable[str]) -> list[str]:
    """Filter values in display order: age bands (``column == "age_band"``) in age order, else
    case-insensitively sorted; :data:`UNKNOWN` last. Shared by the Patients and Compare filters."""
    values = list(values)
    if column == "age_band":
        return [b for b in _AGE_BAND_ORDER if b in values]
    return sorted(values, key=lambda v: (v == UNKNOWN, v.lower()))


# --------------------------------------------------------------------------- small helpers


def dataset_roots(dataset: Mapping) -> list[Path]:
    """The folders a registered dataset may read images from: its image folder and its table's folder.

    ``dataset`` is a row of ``Store.list_datasets()`` (``csv_path``, ``images_dir``).
    For a class-folder dataset (``csv_path`` is itself a folder) that folder is the root.
    Paths are resolved (symbolic links followed), in this order, without duplicates.
    """
    roots: list[Path] = []
    images_dir = dataset.get("images_dir")
    if images_dir:
        roots.append(Path(images_dir).expanduser().resolve())
    csv_path = dataset.get("csv_path")
    if csv_path:
        csv = Path(csv_path).expanduser().resolve()
        roots.append(csv if csv.is_dir() else csv.parent)
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def run_threshold(run: Mapping | None) -> float:
    """The run's saved decision threshold, else :data:`DEFAULT_THRESHOLD`."""
    value = (run or {}).get("threshold")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DEFAULT_THRESHOLD
    return float(value)


def _category(values) -> np.ndarray:
    """Object array of str with missing values as :data:`UNKNOWN`."""
    series = pd.Series(values, dtype=object)
    return series.where(series.notna(), UNKNOWN).astype(str).to_numpy(dtype=object)


def risk_by_image(predictions: pd.DataFrame | None) -> pd.Series:
    """One score per image from a run's predictions.

    Parameters
    ----------
    predictions : DataFrame with image_name, prediction and optionally split
        As returned by ``Store.get_predictions(run_id)`` (rows in storage order).

    Returns
    -------
    pd.Series of float64 indexed by image_name (unique), named ``risk``. When an
    image has several rows, the split listed first in :data:`SPLIT_PREFERENCE`
    wins (other splits after them, alphabetically), then the last stored row.
    """
    if predictions is None or len(predictions) == 0:
        return pd.Series([], index=pd.Index([], dtype=object, name="image_name"), dtype="float64", name="risk")
    missing = {"image_name", "prediction"} - set(predictions.columns)
    if missing:
        raise MelcoreError(f"predictions need the columns image_name and prediction; missing {sorted(missing)}")
    frame = pd.DataFrame(
        {
            "image_name": predictions["image_name"].astype(str).to_numpy(),
            "prediction": pd.to_numeric(predictions["prediction"], errors="coerce").to_numpy(dtype=float),
            "order": np.arange(len(predictions)),
        }
    )
    if "split" in predictions.columns:
        split = predictions["split"].astype(object).where(predictions["split"].notna(), "").astype(str)
        others = sorted(set(split) - set(SPLIT_PREFERENCE))
        rank = {name: i for i, name in enumerate(list(SPLIT_PREFERENCE) + others)}
        frame["rank"] = split.map(rank).to_numpy()
    else:
        frame["rank"] = 0
    if frame["image_name"].duplicated().any():
        frame = frame.sort_values(["rank", "order"], ascending=[True, False], kind="stable")
        frame = frame.drop_duplicates("image_name", keep="first")
    return pd.Series(
        frame["prediction"].to_numpy(),
        index=pd.Index(frame["image_name"], name="image_name"),
        dtype="float64",
        name="risk",
    )


def lesion_frame(data, predictions: pd.DataFrame | None = None, *, ugly_duckling: bool = True) -> pd.DataFrame:
    """The cohort table with the columns a browser needs, one row per image.

    Parameters
    ----------
    data : Cohort or DataFrame
        Canonical lesion table (image_name, patient_id, lesion_id, sex, age_approx,
        site, diagnosis, target, clinic, image_path; missing columns are treated as unknown).
    predictions : DataFrame, optional
        A run's predictions (see :func:`risk_by_image`).
    ugly_duckling : bool
        Compute the ugly-duckling score from the run's scores (the costly part:
        about a second per 10,000 scored images).

    Returns
    -------
    DataFrame (same row order, fresh RangeIndex): the table's columns, plus
    ``patient`` (str), ``lesion`` (str, unique within the patient), ``age_band``
    (str, see :func:`melcore.cohort.age_band`), ``risk`` (float64, NaN = not
    scored by the run), ``ugly_duckling`` (float64, NaN when unknown) and
    ``image_found`` (bool: the cohort found the file).
    """
    table, groups = table_and_groups(data)
    frame = table.reset_index(drop=True).copy()
    for column in ("patient_id", "lesion_id", "sex", "site", "diagnosis", "clinic", "image_path"):
        if column not in frame.columns:
            frame[column] = pd.Series([None] * len(frame), dtype=object)
    if "age_approx" not in frame.columns:
        frame["age_approx"] = np.nan
    if "target" not in frame.columns:
        frame["target"] = pd.array([pd.NA] * len(frame), dtype="Int8")
    names = frame["image_name"].astype(str)
    frame["patient"] = groups.to_numpy(dtype=object).astype(str)
    frame["lesion"] = lesion_keys(frame).to_numpy(dtype=object)
    ages = pd.to_numeric(pd.Series(frame["age_approx"].to_numpy(), dtype=object), errors="coerce")
    frame["age_band"] = age_band(ages.where(ages >= 0)).to_numpy()  # a bad age is unknown here, never an error
    risk = risk_by_image(predictions)
    frame["risk"] = names.map(risk).to_numpy(dtype=float) if len(risk) else np.full(len(frame), np.nan)
    frame["ugly_duckling"] = np.nan
    scored = np.isfinite(frame["risk"].to_numpy())
    if ugly_duckling and scored.sum() >= 2:
        frame["ugly_duckling"] = _ugly_duckling(frame, scored)
    frame["image_found"] = frame["image_path"].notna().to_numpy()
    return frame


def _ugly_duckling(frame: pd.DataFrame, scored: np.ndarray) -> np.ndarray:
    """meta.ugly_duckling_scores with the scored rows' risks (unscored images take no part in the
    comparison; an unscored image of a scored lesion shares that lesion's value, as in melcore.meta.features)."""
    scored = np.asarray(scored, dtype=bool)
    part = frame[["image_name", "lesion_id"]].reset_index(drop=True)
    part.insert(1, "patient_id", frame["patient"].to_numpy())  # the browser's patient key (never missing)
    scores = pd.Series(
        frame["risk"].to_numpy()[scored], index=frame["image_name"].astype(str).to_numpy()[scored], name="prediction"
    )
    return ugly_duckling_scores(part, scores).to_numpy(dtype=float)


def patient_table(lesions: pd.DataFrame) -> pd.DataFrame:
    """Aggregate a :func:`lesion_frame` by patient (the reference implementation; pandas groupby).

    Returns one row per patient in order of first appearance with :data:`PATIENT_COLUMNS`:
    clinic (the patient's clinics joined with ", "), sex (first known, else "unknown"),
    age_min / age_max (float, NaN when unknown), n_images, n_lesions (distinct lesions),
    n_malignant (lesions with a malignant image), n_scored (images the run scored),
    highest_risk (max risk, NaN when none scored).
    """
    frame = lesions.assign(
        _malignant_lesion=np.where(
            lesions["target"].eq(1).fillna(False).to_numpy(bool), lesions["lesion"].to_numpy(dtype=object), None
        ),
        _clinic=_category(lesions["clinic"]),
    )
    grouped = frame.groupby("patient", sort=False)
    out = pd.DataFrame(
        {
            "clinic": grouped["_clinic"].agg(lambda v: ", ".join(sorted(set(v)))),
            "sex": grouped["sex"].agg(lambda v: next((str(x) for x in v if pd.notna(x)), UNKNOWN)),
            "age_min": grouped["age_approx"].min(),
            "age_max": grouped["age_approx"].max(),
            "n_images": grouped.size(),
            "n_lesions": grouped["lesion"].nunique(),
            "n_malignant": grouped["_malignant_lesion"].nunique(),
            "n_scored": grouped["risk"].count(),
            "highest_risk": grouped["risk"].max(),
        }
    )
    out = out.rename_axis("patient").reset_index()
    return out[list(PATIENT_COLUMNS)]


def patient_diagnoses(lesions: pd.DataFrame, patients: Sequence[str]) -> pd.Series:
    """Each listed patient's diagnoses, most frequent first: ``"nevus ×3, melanoma"`` (index: patient).

    ``lesions``: a :func:`lesion_frame` (``patient``, ``diagnosis``); images without a
    diagnosis are left out, a patient with none gets ``"unknown"``.
    """
    wanted = pd.Index([str(p) for p in patients])
    rows = lesions[lesions["patient"].astype(str).isin(wanted) & lesions["diagnosis"].notna()]
    counts = rows.groupby([rows["patient"].astype(str), rows["diagnosis"].astype(str)]).size()
    text = {}
    for patient, group in counts.groupby(level=0):
        ordered = group.droplevel(0).sort_values(ascending=False, kind="stable")
        text[patient] = ", ".join(f"{d} ×{n}" if n > 1 else d for d, n in ordered.items())
    return pd.Series([text.get(p, UNKNOWN) for p in wanted], index=wanted, dtype=object)


# --------------------------------------------------------------------------- filters and pages


@dataclass(frozen=True)
class Filters:
    """Lesion filters; a patient is listed when one of their lesions matches all of them.

    Empty tuples mean "any". Values are as listed by :meth:`PatientBrowser.options`
    (missing values are the string :data:`UNKNOWN`).

    Attributes
    ----------
    clinics, sexes, age_bands, sites : tuple of str
    malignant : bool
        Only malignant lesions (target 1) match.
    above_threshold : bool
        Only lesions whose risk is at or above ``threshold`` match (unscored never do).
    threshold : float in [0, 1]
        The run's decision threshold; also used for ``n_flagged``.
    """

    clinics: tuple[str, ...] = ()
    sexes: tuple[str, ...] = ()
    age_bands: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    malignant: bool = False
    above_threshold: bool = False
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("clinics", "sexes", "age_bands", "sites"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value))
        try:
            threshold = float(self.threshold)
        except (TypeError, ValueError):
            raise MelcoreError(f"threshold must be a number between 0 and 1, got {self.threshold!r}") from None
        if not 0.0 <= threshold <= 1.0:
            raise MelcoreError(f"threshold must be between 0 and 1, got {threshold}")
        object.__setattr__(self, "threshold", threshold)

    def is_empty(self) -> bool:
        """True when no filter restricts the lesions."""
        return not (
            self.clinics or self.sexes or self.age_bands or self.sites or self.malignant or self.above_threshold
        )


@dataclass
class Page:
    """One page of a table: ``frame`` (the rows), ``page`` (1-based, clamped), ``n_pages``, ``total``,
    ``start`` / ``stop`` (0-based row range in the whole table)."""

    frame: pd.DataFrame
    page: int
    n_pages: int
    total: int
    start: int
    stop: int


def paginate(frame: pd.DataFrame, page: int = 1, page_size: int = 50) -> Page:
    """Rows of page ``page`` (1-based; clamped into 1..n_pages) of ``frame``.

    An empty table has one empty page. ``page_size`` must be at least 1.
    """
    if int(page_size) < 1:
        raise MelcoreError(f"page_size must be at least 1, got {page_size}")
    page_size = int(page_size)
    total = len(frame)
    n_pages = max(1, math.ceil(total / page_size))
    page = min(max(1, int(page)), n_pages)
    start = (page - 1) * page_size
    stop = min(total, start + page_size)
    return Page(frame=frame.iloc[start:stop], page=page, n_pages=n_pages, total=total, start=start, stop=stop)


def sort_patients(patients: pd.DataFrame, by: str = "highest risk") -> pd.DataFrame:
    """Sort a patient table by one of :data:`PATIENT_SORTS` (missing values last), fresh index."""
    if by not in PATIENT_SORTS:
        raise MelcoreError(f"unknown sort {by!r}; choose one of {', '.join(PATIENT_SORTS)}")
    columns, ascending = PATIENT_SORTS[by]
    return patients.sort_values(columns, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


class PatientBrowser:
    """A dataset (and optionally one run's scores) prepared for fast patient browsing.

    Parameters
    ----------
    data : Cohort or canonical DataFrame
    predictions : DataFrame, optional
        The run's predictions (``Store.get_predictions(run_id)``).
    ugly_duckling : bool
        Fill the ``ugly_duckling`` column of :meth:`patient_lesions` (computed per
        patient on first request, then kept).

    Attributes
    ----------
    lesions : DataFrame
        :func:`lesion_frame` (one row per image). Do not modify.
    summary : DataFrame
        :func:`patient_table`-equivalent aggregate of every patient (computed with
        integer codes; same values), in order of first appearance.
    has_scores : bool
        Whether the run scored any image of the dataset.
    """

    def __init__(self, data, predictions: pd.DataFrame | None = None, *, ugly_duckling: bool = True):
        self.lesions = lesion_frame(data, predictions, ugly_duckling=False)
        self._with_ugly_duckling = ugly_duckling
        self._ugly_duckling: dict[int, np.ndarray] = {}
        lesions = self.lesions
        n = len(lesions)
        self._pcode, patients = pd.factorize(lesions["patient"], sort=False)
        self._n_patients = len(patients)
        self._codes: dict[str, tuple[np.ndarray, pd.Index]] = {}
        for column, source in (("clinic", "clinic"), ("sex", "sex"), ("site", "site"), ("age_band", "age_band")):
            codes, uniques = pd.factorize(pd.Series(_category(lesions[source])), sort=True)
            self._codes[column] = (codes, pd.Index(uniques))
        self._risk = lesions["risk"].to_numpy(dtype=float)
        self._malignant = lesions["target"].eq(1).fillna(False).to_numpy(dtype=bool)
        self.has_scores = bool(np.isfinite(self._risk).any())
        # Rows grouped by patient, each patient's rows in table order.
        self._order = np.argsort(self._pcode, kind="stable")
        self._bounds = np.searchsorted(self._pcode[self._order], np.arange(self._n_patients + 1))
        self._patient_code = {str(p): i for i, p in enumerate(patients)}
        self._row_of_image = pd.Series(np.arange(n), index=lesions["image_name"].astype(str))
        self.summary = self._aggregate(patients)

    # ------------------------------------------------------------------ aggregation
    def _aggregate(self, patients: pd.Index) -> pd.DataFrame:
        lesions, pcode, n_p = self.lesions, self._pcode, self._n_patients
        n_images = np.bincount(pcode, minlength=n_p)
        pair = pd.DataFrame({"p": pcode, "l": lesions["lesion"].to_numpy(dtype=object)})
        n_lesions = np.bincount(pair.drop_duplicates()["p"].to_numpy(), minlength=n_p)
        malignant_pairs = pair[self._malignant].drop_duplicates()
        n_malignant = np.bincount(malignant_pairs["p"].to_numpy(), minlength=n_p)
        risk = self._risk
        scored = np.isfinite(risk)
        n_scored = np.bincount(pcode[scored], minlength=n_p)
        highest = _group_max(pcode, risk, n_p)
        age = pd.to_numeric(lesions["age_approx"], errors="coerce").to_numpy(dtype=float)
        age_max = _group_max(pcode, age, n_p)
        age_min = -_group_max(pcode, -age, n_p)
        clinic_codes, clinic_names = self._codes["clinic"]
        clinic_pairs = pd.DataFrame({"p": pcode, "c": clinic_codes}).drop_duplicates().sort_values(["p", "c"])
        clinic_text = np.full(n_p, "", dtype=object)
        single = ~clinic_pairs["p"].duplicated(keep=False).to_numpy()
        names = np.asarray(clinic_names, dtype=object)
        clinic_text[clinic_pairs["p"].to_numpy()[single]] = names[clinic_pairs["c"].to_numpy()[single]]
        if not single.all():
            multi = clinic_pairs[~single]
            joined = multi.groupby("p")["c"].agg(lambda c: ", ".join(names[c.to_numpy()]))
            clinic_text[joined.index.to_numpy()] = joined.to_numpy()
        sex = lesions["sex"].to_numpy(dtype=object)
        known = pd.notna(sex)
        sex_text = np.full(n_p, UNKNOWN, dtype=object)
        known_rows = np.flatnonzero(known)
        first_patients, first = np.unique(pcode[known_rows], return_index=True)  # first known value per patient
        sex_text[first_patients] = [str(v) for v in sex[known_rows[first]]]
        return pd.DataFrame(
            {
                "patient": np.asarray(patients, dtype=object).astype(str),
                "clinic": clinic_text,
                "sex": sex_text,
                "age_min": age_min,
                "age_max": age_max,
                "n_images": n_images.astype(np.int64),
                "n_lesions": n_lesions.astype(np.int64),
                "n_malignant": n_malignant.astype(np.int64),
                "n_scored": n_scored.astype(np.int64),
                "highest_risk": highest,
            }
        )[list(PATIENT_COLUMNS)]

    # ------------------------------------------------------------------ filters
    def options(self) -> dict[str, list[str]]:
        """Filter values present in the data: {"clinic", "sex", "site", "age_band"} -> sorted str
        ("unknown" last; age bands in age order)."""
        out = {}
        for column, (_, uniques) in self._codes.items():
            out[column] = filter_levels(column, [str(v) for v in uniques])
        return out

    def _isin(self, column: str, values: Sequence[str]) -> np.ndarray:
        codes, uniques = self._codes[column]
        wanted = uniques.get_indexer(list(values))
        wanted = wanted[wanted >= 0]
        return np.isin(codes, wanted)

    def lesion_mask(self, filters: Filters | None = None) -> np.ndarray:
        """Boolean array over :attr:`lesions`: the images matching every filter."""
        filters = filters or Filters()
        mask = np.ones(len(self.lesions), dtype=bool)
        for column, values in (
            ("clinic", filters.clinics),
            ("sex", filters.sexes),
            ("age_band", filters.age_bands),
            ("site", filters.sites),
        ):
            if values:
                mask &= self._isin(column, values)
        if filters.malignant:
            mask &= self._malignant
        if filters.above_threshold:
            with np.errstate(invalid="ignore"):
                mask &= self._risk >= filters.threshold
        return mask

    def patients(self, filters: Filters | None = None, sort: str = "highest risk") -> pd.DataFrame:
        """The patients with at least one matching lesion, sorted (see :data:`PATIENT_SORTS`).

        Columns: :data:`PATIENT_COLUMNS` plus ``n_matching`` (images matching the
        filters) and ``n_flagged`` (images at or above ``filters.threshold``).
        """
        filters = filters or Filters()
        mask = self.lesion_mask(filters)
        n_matching = np.bincount(self._pcode[mask], minlength=self._n_patients)
        with np.errstate(invalid="ignore"):
            flagged = self._risk >= filters.threshold
        n_flagged = np.bincount(self._pcode[flagged], minlength=self._n_patients)
        keep = n_matching > 0
        out = self.summary.loc[keep].assign(n_matching=n_matching[keep], n_flagged=n_flagged[keep])
        return sort_patients(out, sort)

    # ------------------------------------------------------------------ one patient / lesion
    def patient_lesions(self, patient: str) -> pd.DataFrame:
        """A patient's images (rows of :attr:`lesions`, ugly-duckling score filled in), highest risk
        first (unscored last, then by image name). Raises MelcoreError for an unknown patient.
        """
        code = self._patient_code.get(str(patient))
        if code is None:
            raise MelcoreError(f"no patient {patient!r} in this dataset")
        rows = self._order[self._bounds[code] : self._bounds[code + 1]]
        part = self.lesions.iloc[rows].copy()
        if self._with_ugly_duckling:
            values = self._ugly_duckling.get(code)
            if values is None:
                scored = np.isfinite(part["risk"].to_numpy(dtype=float))
                values = _ugly_duckling(part, scored) if scored.sum() >= 2 else np.full(len(part), np.nan)
                self._ugly_duckling[code] = values
            part["ugly_duckling"] = values
        return part.sort_values(["risk", "image_name"], ascending=[False, True], na_position="last", kind="stable")

    def lesion(self, image_name: str) -> dict:
        """One image's row of :attr:`lesions` as a dict (ugly-duckling score included); MelcoreError when
        unknown."""
        row = self._row_of_image.get(str(image_name))
        if row is None:
            raise MelcoreError(f"no image {image_name!r} in this dataset")
        found = self.lesions.iloc[int(row)].to_dict()
        if self._with_ugly_duckling:
            mine = self.patient_lesions(found["patient"])
            found["ugly_duckling"] = float(mine.loc[mine["image_name"] == found["image_name"], "ugly_duckling"].iloc[0])
        return found

    def __contains__(self, patient: str) -> bool:
        return str(patient) in self._patient_code

    def __len__(self) -> int:
        return self._n_patients


def _group_max(codes: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Max of ``values`` per group code, ignoring NaN; NaN for groups without a finite value."""
    out = np.full(n_groups, -np.inf)
    finite = np.isfinite(values)
    np.maximum.at(out, codes[finite], values[finite])
    out[np.isneginf(out)] = np.nan
    return out


# --------------------------------------------------------------------------- store queries


def prediction_counts(store, run_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """``{run_id: (number of stored predictions, largest prediction row id)}`` for runs that have any.

    One grouped, indexed query. The pair changes whenever a run's predictions are
    replaced (``Store.add_predictions`` deletes and inserts new rows), so it is a
    cheap cache key for the run's scores.
    """
    return store.prediction_counts(run_ids)


def scored_runs(store, runs: Sequence[Mapping]) -> tuple[dict[int, Mapping], dict[int, tuple[int, int]]]:
    """Those of ``runs`` (rows of ``Store.list_runs``) that have stored predictions, and their counts.

    Returns ``({run_id: run row}, {run_id: (n predictions, largest row id)})``: the rows in
    the order given, the counts from :func:`prediction_counts`.
    """
    counts = prediction_counts(store, [r["id"] for r in runs])
    return {int(r["id"]): r for r in runs if int(r["id"]) in counts}, counts


def scored_run_label(run: Mapping, n_predictions: int, *, mark_from_scratch: bool = True) -> str:
    """``"#12 efficientnet-b3 · clinic A · trained from scratch (chosen) · 1,234 scores"``: what produces the
    score (:func:`melcore.runinfo.run_title`) and how many images it scored.

    ``mark_from_scratch=False`` leaves out the "trained from scratch" part.
    """
    return f"{run_title(run, scratch=mark_from_scratch)} · {n_predictions:,} scores"


def image_scores(store, image_name: str, runs: Sequence[Mapping]) -> pd.DataFrame:
    """Every listed run's score for one image, in the order of ``runs``.

    Parameters
    ----------
    store : melcore.store.Store
    image_name : str
    runs : run rows (``Store.list_runs(...)``)

    Returns
    -------
    DataFrame with one row per run that scored the image: run_id, run (name), model,
    kind, clinic, split (the preferred split, see :data:`SPLIT_PREFERENCE`),
    score (float), threshold (the run's saved threshold, else 0.5) and
    flagged (bool: score >= threshold).
    """
    columns = ["run_id", "run", "model", "kind", "clinic", "split", "score", "threshold", "flagged"]
    by_id = {int(r["id"]): r for r in runs}
    if not by_id:
        return pd.DataFrame(columns=columns)
    found = store.predictions_for_image(image_name, by_id)
    rows = []
    for run_id, run in by_id.items():
        mine = found[found["run_id"] == run_id]
        if mine.empty:
            continue
        score = float(risk_by_image(mine).iloc[0])
        split = _preferred_split(mine)
        threshold = run_threshold(run)
        rows.append(
            {
                "run_id": run_id,
                "run": run.get("name"),
                "model": run.get("model"),
                "kind": run.get("kind"),
                "clinic": run.get("clinic"),
                "split": split,
                "score": score,
                "threshold": threshold,
                "flagged": bool(score >= threshold),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def _preferred_split(rows: pd.DataFrame) -> str:
    splits = [str(s) for s in rows["split"].tolist()]
    for name in SPLIT_PREFERENCE:
        if name in splits:
            return name
    return sorted(splits)[0] if splits else ""
