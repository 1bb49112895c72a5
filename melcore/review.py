"""Reviewing a run's predictions, and scoring one uploaded image.

The Review and Score pages are layout only; what they compute is here so it can
be tested and used from a notebook::

    predictions = store.get_predictions(run_id)
    latest = store.latest_reviews(run_id)
    threshold = melcore.browse.run_threshold(store.get_run(run_id))
    todo = worklist(predictions, latest, threshold, scope="unreviewed")
    counts = review_progress(worklist(predictions, latest, threshold), threshold)
    text = reviews_csv(history, run=store.get_run(run_id), predictions=predictions)

Definitions (the pages say the same in words):

* **worklist**: one row per image the run scored (its *risk*, the predicted
  probability of melanoma; when an image was stored in several splits, the split
  preference of :func:`melcore.browse.risk_by_image` applies), sorted by risk,
  highest first (ties by image name). ``rank`` is the position in the full
  worklist, so it does not change when a scope hides rows.
* **flagged**: risk at or above the run's decision threshold.
* **reviewed**: the image has at least one decision; its *current* decision is
  the latest one (by anyone). Decisions are never edited: a change of mind is a
  new row, so the history is an audit trail.
* **times** are stored as UNIX seconds and shown and exported as ISO-8601 in UTC
  (``2024-05-01T09:30:12.345+00:00``).

:func:`score_upload` scores an uploaded JPEG/PNG with a run's model (optionally
with the 8-view test-time augmentation) and computes its Grad-CAM heatmap.
TensorFlow is imported only inside it.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping

import numpy as np
import pandas as pd

from melcore.browse import DEFAULT_THRESHOLD, risk_by_image
from melcore.classes import MELANOMA
from melcore.errors import MelcoreError
from melcore.formatting import format_threshold
from melcore.runinfo import run_title
from melcore.store import REVIEW_DECISIONS

__all__ = [
    "EXPORT_COLUMNS",
    "MAX_REVIEWER_LENGTH",
    "REVIEW_DECISIONS",
    "SCOPES",
    "WORKLIST_COLUMNS",
    "ReviewProgress",
    "apply_scope",
    "check_reviewer",
    "export_frame",
    "history_table",
    "iso_time",
    "review_progress",
    "reviews_csv",
    "worklist",
]

SCOPES = {
    "all": "All scored lesions",
    "above threshold": "Only above the threshold",
    "unreviewed": "Only unreviewed",
}
"""Worklist scopes: name -> label shown on the Review page."""

WORKLIST_COLUMNS = (
    "rank",
    "image_name",
    "patient_id",
    "clinic",
    "target",
    "risk",
    "flagged",
    "decision",
    "reviewer",
    "reviewed_at",
    "n_reviews",
)
"""Columns of :func:`worklist`."""

EXPORT_COLUMNS = (
    "run_id",
    "run",
    "image_name",
    "patient_id",
    "clinic",
    "diagnosis",
    "label",
    "risk",
    "threshold",
    "reviewer",
    "decision",
    "note",
    "time",
    "current",
    "review_id",
    "aided",
    "confidence",
)
"""Columns of :func:`export_frame` / :func:`reviews_csv`."""

MAX_REVIEWER_LENGTH = 200
"""Longest reviewer name the store accepts (its column is VARCHAR(200))."""


# --------------------------------------------------------------------------- times and names


def iso_time(seconds) -> str:
    """UNIX seconds -> ISO-8601 in UTC with milliseconds (``""`` for a missing value)."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(value):
        return ""
    return datetime.fromtimestamp(value, tz=timezone.utc).isoformat(timespec="milliseconds")


def check_reviewer(name) -> str:
    """The reviewer's name, stripped; MelcoreError when it is empty or too long.

    Every decision is stored with the name of who made it, so a decision cannot be
    saved anonymously.
    """
    text = " ".join(str(name or "").split())
    if not text:
        raise MelcoreError(
            "enter your name as reviewer before saving a decision; every decision is recorded "
            "with the name of who made it"
        )
    if len(text) > MAX_REVIEWER_LENGTH:
        raise MelcoreError(f"the reviewer name has {len(text)} characters; use at most {MAX_REVIEWER_LENGTH}")
    return text


# --------------------------------------------------------------------------- worklist


def _prediction_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per image: image_name, patient_id, clinic, target, risk (the preferred split's score)."""
    risk = risk_by_image(predictions)
    first = predictions.assign(image_name=predictions["image_name"].astype(str)).drop_duplicates("image_name")
    first = first.set_index("image_name")
    names = risk.index.astype(str)
    out = pd.DataFrame({"image_name": names.to_numpy(dtype=object)})
    for column in ("patient_id", "clinic"):
        out[column] = first[column].reindex(names).to_numpy(dtype=object) if column in first else None
    if "target" in first:
        out["target"] = pd.array(first["target"].reindex(names), dtype="Int8")
    else:
        out["target"] = pd.array([pd.NA] * len(out), dtype="Int8")
    out["risk"] = risk.to_numpy(dtype="float64")
    return out


def _check_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise MelcoreError(f"threshold must be a number between 0 and 1, got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:
        raise MelcoreError(f"threshold must be between 0 and 1, got {value}")
    return value


def worklist(
    predictions: pd.DataFrame, reviews: pd.DataFrame | None = None, threshold: float = 0.5, scope: str = "all"
) -> pd.DataFrame:
    """The run's scored images in review order: highest risk first.

    Parameters
    ----------
    predictions : DataFrame
        ``Store.get_predictions(run_id)``: image_name, prediction and optionally
        patient_id, clinic, target, split. Rows with a missing prediction are left out.
    reviews : DataFrame, optional
        ``Store.review_history(run_id)`` (id, image_name, reviewer, decision, created_at):
        the latest row per image is its current decision, and n_reviews counts the
        rows. ``Store.latest_reviews(run_id)`` works too (n_reviews is then at most 1).
    threshold : float in [0, 1]
        The run's decision threshold (``flagged`` = risk >= threshold).
    scope : {"all", "above threshold", "unreviewed"}
        Which rows to keep (see :data:`SCOPES`).

    Returns
    -------
    DataFrame with :data:`WORKLIST_COLUMNS`, fresh RangeIndex: rank (int, 1 = highest
    risk in the full worklist), image_name (str), patient_id, clinic (str or None),
    target (Int8), risk (float64 in [0, 1]), flagged (bool), decision, reviewer
    (str or None: the current decision), reviewed_at (float UNIX seconds, NaN when
    unreviewed), n_reviews (int: decisions recorded, edits included).
    """
    if scope not in SCOPES:
        raise MelcoreError(f"unknown worklist scope {scope!r}; choose one of {', '.join(SCOPES)}")
    threshold = _check_threshold(threshold)
    if predictions is None or len(predictions) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in WORKLIST_COLUMNS})
    missing = {"image_name", "prediction"} - set(predictions.columns)
    if missing:
        raise MelcoreError(f"predictions need the columns image_name and prediction; missing {sorted(missing)}")
    rows = _prediction_rows(predictions)
    rows = rows[np.isfinite(rows["risk"].to_numpy())]
    rows = rows.sort_values(["risk", "image_name"], ascending=[False, True], kind="stable").reset_index(drop=True)
    rows.insert(0, "rank", np.arange(1, len(rows) + 1, dtype=np.int64))
    rows["flagged"] = rows["risk"].to_numpy() >= threshold

    current, counts = _current_decisions(reviews)
    names = rows["image_name"]
    rows["decision"] = names.map(current["decision"]).astype(object).where(names.isin(current.index), None)
    rows["reviewer"] = names.map(current["reviewer"]).astype(object).where(names.isin(current.index), None)
    rows["reviewed_at"] = names.map(current["created_at"]).astype("float64")
    rows["n_reviews"] = names.map(counts).fillna(0).astype(np.int64)

    return apply_scope(rows[list(WORKLIST_COLUMNS)], scope)


def apply_scope(full_worklist: pd.DataFrame, scope: str) -> pd.DataFrame:
    """The rows of a full :func:`worklist` that ``scope`` keeps (order kept, fresh RangeIndex)."""
    if scope not in SCOPES:
        raise MelcoreError(f"unknown worklist scope {scope!r}; choose one of {', '.join(SCOPES)}")
    rows = full_worklist
    if len(rows) and scope == "above threshold":
        rows = rows[rows["flagged"].astype(bool)]
    elif len(rows) and scope == "unreviewed":
        rows = rows[rows["decision"].isna()]
    return rows.reset_index(drop=True)


def _current_decisions(reviews: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.Series]:
    """(latest row per image indexed by image_name, number of rows per image)."""
    empty = pd.DataFrame(
        {
            "decision": pd.Series(dtype=object),
            "reviewer": pd.Series(dtype=object),
            "created_at": pd.Series(dtype="float64"),
        }
    )
    if reviews is None or len(reviews) == 0:
        return empty, pd.Series(dtype=np.int64)
    frame = reviews.assign(image_name=reviews["image_name"].astype(str))
    order = ["id"] if "id" in frame.columns else ["created_at"]
    frame = frame.sort_values(order, kind="stable")
    counts = frame.groupby("image_name").size()
    latest = frame.drop_duplicates("image_name", keep="last").set_index("image_name")
    return latest[["decision", "reviewer", "created_at"]], counts


@dataclass(frozen=True)
class ReviewProgress:
    """How far the review of a run has come.

    Attributes
    ----------
    total, reviewed : int
        Images in the worklist, and those with a current decision.
    flagged, flagged_reviewed : int
        The same for the images at or above the threshold.
    by_decision : dict[str, int]
        Current decisions counted per decision, in :data:`REVIEW_DECISIONS` order.
    """

    total: int
    reviewed: int
    flagged: int
    flagged_reviewed: int
    by_decision: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """reviewed / total (0.0 for an empty worklist)."""
        return self.reviewed / self.total if self.total else 0.0

    @property
    def flagged_fraction(self) -> float:
        return self.flagged_reviewed / self.flagged if self.flagged else 0.0


def review_progress(full_worklist: pd.DataFrame) -> ReviewProgress:
    """Progress counts of a :func:`worklist` made with ``scope="all"``."""
    if full_worklist is None or len(full_worklist) == 0:
        return ReviewProgress(0, 0, 0, 0, {d: 0 for d in REVIEW_DECISIONS})
    reviewed = full_worklist["decision"].notna().to_numpy()
    flagged = full_worklist["flagged"].astype(bool).to_numpy()
    counts = full_worklist["decision"].value_counts()
    return ReviewProgress(
        total=len(full_worklist),
        reviewed=int(reviewed.sum()),
        flagged=int(flagged.sum()),
        flagged_reviewed=int((reviewed & flagged).sum()),
        by_decision={d: int(counts.get(d, 0)) for d in REVIEW_DECISIONS},
    )


# --------------------------------------------------------------------------- history and export


def history_table(history: pd.DataFrame) -> pd.DataFrame:
    """One lesion's decisions for display, newest first: time (ISO-8601 UTC), reviewer, decision, note, current.

    ``history`` is ``Store.review_history(run_id, image_name)`` (oldest first).
    """
    columns = ["time", "reviewer", "decision", "note", "current"]
    if history is None or len(history) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    order = ["id"] if "id" in history.columns else ["created_at"]
    frame = history.sort_values(order, ascending=False, kind="stable").reset_index(drop=True)
    return pd.DataFrame(
        {
            "time": [iso_time(t) for t in frame["created_at"]],
            "reviewer": frame["reviewer"].astype(str).to_numpy(),
            "decision": frame["decision"].astype(str).to_numpy(),
            "note": frame["note"].fillna("").astype(str).to_numpy(),
            "current": np.arange(len(frame)) == 0,
        }
    )[columns]


def export_frame(
    history: pd.DataFrame,
    run: Mapping | None = None,
    predictions: pd.DataFrame | None = None,
    *,
    lesions: pd.DataFrame | None = None,
    classes=None,
) -> pd.DataFrame:
    """Every decision of a run, oldest first, for export (the full audit trail).

    Parameters
    ----------
    history : DataFrame
        ``Store.review_history(run_id)`` (id, run_id, image_name, reviewer, decision, note, created_at).
    run : mapping, optional
        The run's row (``Store.get_run``): its id and name fill run_id and run.
    predictions : DataFrame, optional
        The run's predictions: fill patient_id, clinic, label (from target) and risk.
    lesions : DataFrame, optional
        The dataset's table (image_name, diagnosis, clinic): fills diagnosis (and clinic
        where the predictions lack it).
    classes : melcore.classes.ClassNames, optional
        The dataset's class words for ``label`` (default melanoma / not melanoma).

    Returns
    -------
    DataFrame with :data:`EXPORT_COLUMNS`: run is what produces the score
    (:func:`melcore.runinfo.run_title`); threshold the run's saved decision threshold
    as text (:func:`melcore.formatting.format_threshold`, "0.500 (default)" when none is
    saved); time is ISO-8601 UTC; current is True on each image's latest decision;
    review_id is the store's row id (increasing). Unknown values are empty, never "None". aided is
    False for a blinded read (True where the history has no such column); confidence is
    the reader's malignancy confidence 0-100 (Int64, missing when not given).
    """
    if history is None or len(history) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in EXPORT_COLUMNS})
    frame = history.sort_values("id" if "id" in history.columns else "created_at", kind="stable")
    frame = frame.reset_index(drop=True)
    names = frame["image_name"].astype(str)
    run_id = (run or {}).get("id")
    if run_id is None and "run_id" in frame.columns:
        run_ids = frame["run_id"].to_numpy()
    else:
        run_ids = np.full(len(frame), run_id, dtype=object)
    nothing = pd.Series([None] * len(frame), dtype=object)
    patient, clinic, diagnosis, label = nothing, nothing, nothing, nothing
    risk = pd.Series(np.full(len(frame), np.nan))
    if predictions is not None and len(predictions):
        rows = _prediction_rows(predictions).set_index("image_name")
        patient = names.map(rows["patient_id"]).astype(object)
        clinic = names.map(rows["clinic"]).astype(object)
        label = pd.Series([(classes or MELANOMA).label(t) for t in names.map(rows["target"])], dtype=object)
        risk = names.map(rows["risk"]).astype("float64")
    if lesions is not None and len(lesions) and "image_name" in lesions.columns:
        table = lesions.assign(image_name=lesions["image_name"].astype(str)).drop_duplicates("image_name")
        table = table.set_index("image_name")
        if "diagnosis" in table.columns:
            diagnosis = names.map(table["diagnosis"]).astype(object)
        if "clinic" in table.columns:
            clinic = clinic.where(clinic.notna(), names.map(table["clinic"]).astype(object))
    saved = (run or {}).get("threshold")
    if saved is None or (isinstance(saved, float) and np.isnan(saved)):
        threshold = f"{format_threshold(DEFAULT_THRESHOLD)} (default)" if run else ""
    else:
        threshold = format_threshold(saved)
    current = ~names.duplicated(keep="last")

    def text(values: pd.Series) -> np.ndarray:
        return values.where(values.notna(), "").astype(str).to_numpy(dtype=object)

    return pd.DataFrame(
        {
            "run_id": run_ids,
            "run": run_title(run) if run and run.get("id") is not None else "",
            "image_name": names.to_numpy(dtype=object),
            "patient_id": text(patient),
            "clinic": text(clinic),
            "diagnosis": text(diagnosis),
            "label": text(label),
            "risk": risk.to_numpy(dtype="float64"),
            "threshold": threshold,
            "reviewer": frame["reviewer"].astype(str).to_numpy(),
            "decision": frame["decision"].astype(str).to_numpy(),
            "note": frame["note"].fillna("").astype(str).to_numpy(),
            "time": [iso_time(t) for t in frame["created_at"]],
            "current": current.to_numpy(dtype=bool),
            "review_id": frame["id"].to_numpy() if "id" in frame.columns else np.arange(1, len(frame) + 1),
            "aided": frame["aided"].fillna(True).astype(bool).to_numpy()
            if "aided" in frame.columns
            else np.ones(len(frame), dtype=bool),
            "confidence": pd.array(frame["confidence"], dtype="Int64")
            if "confidence" in frame.columns
            else pd.array([pd.NA] * len(frame), dtype="Int64"),
        }
    )[list(EXPORT_COLUMNS)]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")


def _guard_line(line: str) -> str:
    """``line`` with a leading apostrophe when a spreadsheet would run it as a formula (not a plain number)."""
    if not line.startswith(_FORMULA_START):
        return line
    try:
        float(line)
        return line  # a plain negative number
    except ValueError:
        return "'" + line


def _spreadsheet_safe(value):
    """Text that a spreadsheet would run as a formula gets a leading apostrophe (CSV injection guard).

    Every line of the text is guarded, not only the first: a cell holding a line break
    (CR, LF or CRLF) is read by some spreadsheets as several rows.
    """
    if not isinstance(value, str):
        return value
    parts = _LINE_BREAK.split(value)
    parts[0::2] = [_guard_line(part) for part in parts[0::2]]
    return "".join(parts)


spreadsheet_safe = _spreadsheet_safe
"""Public name of the CSV-injection guard, for other exports of user text (e.g. reader tables)."""


def reviews_csv(
    history: pd.DataFrame,
    run: Mapping | None = None,
    predictions: pd.DataFrame | None = None,
    *,
    lesions: pd.DataFrame | None = None,
    classes=None,
) -> str:
    """:func:`export_frame` as CSV text (RFC 4180: UTF-8, CRLF line ends, header row, risk with 6 decimals).

    Free text (notes, names) whose first line, or any line after a line break, starts
    like a spreadsheet formula (``=``, ``+``, ``-``, ``@``) is prefixed with an
    apostrophe, so opening the file in a spreadsheet cannot run it. Every field holding
    a CR or an LF is quoted, so a line break in a note never starts a new row.
    """
    frame = export_frame(history, run, predictions, lesions=lesions, classes=classes)
    for column in ("run", "image_name", "patient_id", "clinic", "diagnosis", "reviewer", "note"):
        frame[column] = frame[column].map(_spreadsheet_safe)
    buffer = io.StringIO()
    # CRLF as the row end makes the csv module quote every field holding a CR or an LF
    frame.to_csv(buffer, index=False, float_format="%.6f", quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    return buffer.getvalue()
