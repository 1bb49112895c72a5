"""``python -m melcore evaluate``: AUROC with CI, operating points and threshold metrics.

Joins a predictions CSV (image_name + ``prediction``, or ``target`` as in a Kaggle
submission) with a labels table on image_name. The labels table is read with
``melcore.cohort.load_cohort`` (any format it knows: ISIC 2020/2019, HAM10000,
generic...), or, when it cannot read the file, as a plain CSV with ``image_name``
and ``target``. Without ``--labels``
the predictions CSV itself must hold both ``target`` (label) and ``prediction``,
as a run's ``val_predictions.csv`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from melcore import metrics
from melcore.cohort import age_band, describe_grouping, group_keys, load_cohort
from melcore.cohorts.tables import columns_text
from melcore.errors import MelcoreError
from melcore.formatting import first_few, json_safe
from melcore.metrics import check_predictions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        metavar="PREDS.csv",
        help="CSV with image_name and a 'prediction' (or 'target') probability column",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="LABELS.csv",
        help="labels table with image_name and target (any cohort format); omit when the "
        "predictions CSV has both 'target' and 'prediction'",
    )
    parser.add_argument(
        "--group-column",
        metavar="C",
        help="also report every metric per value of this column (clinic, source, site, sex, age_band...)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="decision threshold: prediction >= T is positive (default 0.5)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--patient-column",
        default="auto",
        metavar="C",
        help="column resampled by the bootstrap (default: patient_id, else lesion_id, where "
        "present; 'none' resamples images)",
    )
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    parser.add_argument(
        "--sensitivity",
        type=float,
        action="append",
        metavar="S",
        help="target sensitivity for an operating point; repeatable (default 0.9 and 0.95)",
    )
    parser.add_argument(
        "--specificity",
        type=float,
        action="append",
        metavar="S",
        help="target specificity for an operating point; repeatable (default 0.9)",
    )
    parser.add_argument(
        "--ignore-missing",
        action="store_true",
        help="evaluate only the labelled images that have a prediction (default: a labelled "
        "image without a prediction is an error)",
    )


def run(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    table, source = load_evaluation_table(args.predictions, args.labels, warnings, ignore_missing=args.ignore_missing)
    groups, unit = _bootstrap_groups(table, args.patient_column)
    sensitivities = tuple(args.sensitivity or (0.9, 0.95))
    specificities = tuple(args.specificity or (0.9,))
    names = table["image_name"].tolist()
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)

    settings = dict(
        threshold=args.threshold,
        n_boot=args.n_boot,
        seed=args.seed,
        level=args.level,
        sensitivities=sensitivities,
        specificities=specificities,
    )
    group_keys = None
    if args.group_column:
        group_keys = _group_keys(table, args.group_column)
    n_parts = 1 + (len(set(group_keys)) if group_keys is not None else 0)
    bar = _ProgressBar(f"bootstrap ({args.n_boot} resamples)", n_parts)

    summary = metrics.summarize(
        table["target"].to_numpy(),
        table["prediction"].to_numpy(),
        groups=groups,
        names=names,
        progress=bar.part(0),
        **settings,
    )
    summary["bootstrap_unit"] = unit
    summary["predictions"] = str(args.predictions)
    summary["labels"] = source
    summary["warnings"] = warnings
    if group_keys is not None:
        summary["group_column"] = args.group_column
        summary["groups"] = {}
        for i, key in enumerate(sorted(set(group_keys))):
            mask = group_keys == key
            part = metrics.summarize(
                table["target"].to_numpy()[mask],
                table["prediction"].to_numpy()[mask],
                groups=None if groups is None else groups[mask],
                progress=bar.part(i + 1),
                **settings,
            )
            part["bootstrap_unit"] = summary["bootstrap_unit"]
            summary["groups"][key] = part
    bar.close()

    if args.json:
        print(json.dumps(json_safe(summary), allow_nan=False))
    else:
        print(format_report(summary))
    return 0


# --------------------------------------------------------------------------- reading


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise MelcoreError(f"{what} file not found: {path}")
    if path.is_dir():
        raise MelcoreError(f"{what} must be a CSV file, but {path} is a folder")
    try:
        return pd.read_csv(path, dtype={"image_name": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MelcoreError(f"{path}: cannot read it as CSV ({str(exc).splitlines()[0]})") from None


def _check_unique(frame: pd.DataFrame, path: Path) -> None:
    duplicated = frame["image_name"][frame["image_name"].duplicated()].unique()
    if len(duplicated):
        raise MelcoreError(
            f"{path}: {len(duplicated)} image names appear more than once "
            f"(first: {first_few(duplicated)}); keep one row per image"
        )


def read_predictions(path: Path) -> pd.DataFrame:
    """Predictions CSV -> DataFrame with image_name (str), prediction (float), other columns kept.

    The probability column is ``prediction``; when absent, ``target`` (Kaggle
    submission format). When both are present ``target`` is kept as the label.
    """
    frame = _read_csv(path, "predictions")
    if "image_name" not in frame.columns:
        raise MelcoreError(f"{path}: no image_name column (columns: {columns_text(frame.columns)})")
    if "prediction" not in frame.columns:
        if "target" not in frame.columns:
            raise MelcoreError(
                f"{path}: no prediction column; expected 'prediction' or 'target' "
                f"(columns: {columns_text(frame.columns)})"
            )
        frame = frame.rename(columns={"target": "prediction"})
    frame = frame.dropna(subset=["image_name"])
    frame["image_name"] = frame["image_name"].astype(str).str.strip()
    _check_unique(frame, path)

    # A single non-numeric cell makes pandas read the whole column as text: convert what is a number,
    # so that check_predictions names only the cells that are not.
    raw = frame["prediction"]
    numbers = pd.to_numeric(raw, errors="coerce")
    frame["prediction"] = numbers.astype(object).where(numbers.notna() | raw.isna(), raw)
    frame["prediction"] = check_predictions(
        frame["prediction"], names=frame["image_name"].tolist(), what=f"{path}: predictions"
    )
    return frame


def read_labels(path: Path, warnings: list[str]) -> pd.DataFrame:
    """Labels table -> DataFrame with image_name (str) and target (Int8, <NA> = unlabelled).

    Read with ``melcore.cohort.load_cohort``; a table it cannot read (or a missing file) is read
    as a plain CSV with image_name and target.
    """
    if path.exists():
        try:
            cohort = load_cohort(path, check_images="none")
        except MelcoreError as exc:
            plain = _read_csv(path, "labels")
            if not {"image_name", "target"} <= set(plain.columns):
                raise
            warnings.append(
                f"{path}: read as a plain image_name/target CSV (the cohort reader said: {str(exc).splitlines()[0]})"
            )
            return _plain_labels(plain, path)
        frame = cohort.table.copy()
        for warning in getattr(getattr(cohort, "report", None), "warnings", []) or []:
            warnings.append(f"{path}: {warning}")
        return _labels_frame(frame, path)
    return _plain_labels(_read_csv(path, "labels"), path)


def _plain_labels(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in ("image_name", "target") if c not in frame.columns]
    if missing:
        raise MelcoreError(
            f"{path}: no {' or '.join(missing)} column; a labels CSV needs image_name and "
            f"target (columns: {', '.join(map(str, frame.columns))})"
        )
    return _labels_frame(frame, path)


def _labels_frame(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    frame = frame.dropna(subset=["image_name"]).copy()
    frame["image_name"] = frame["image_name"].astype(str).str.strip()
    _check_unique(frame, path)
    target = frame["target"]
    numeric = pd.to_numeric(target, errors="coerce")
    bad = (target.notna() & ~numeric.isin([0, 1])).to_numpy()
    if bad.any():
        shown = ", ".join(f"{target.iloc[i]!r} for {frame['image_name'].iloc[i]}" for i in np.flatnonzero(bad)[:5])
        raise MelcoreError(
            f"{path}: target must be 0 (benign) or 1 (malignant): found {shown} ({int(bad.sum())} bad rows)"
        )
    frame["target"] = numeric.astype("Int8")
    return frame


def load_evaluation_table(
    predictions: Path, labels: Path | None, warnings: list[str], *, ignore_missing: bool = False
) -> tuple[pd.DataFrame, str]:
    """Join predictions and labels: DataFrame with image_name, target (int8), prediction, extra columns.

    Returns the table and a description of where the labels came from.
    """
    preds = read_predictions(predictions)
    if labels is None:
        if "target" not in preds.columns:
            raise MelcoreError(
                f"{predictions}: no labels; pass --labels LABELS.csv, or give the predictions "
                "CSV both 'target' (0/1) and 'prediction' columns"
            )
        labelled = _labels_frame(preds.drop(columns=["prediction"]), predictions)
        preds = preds[["image_name", "prediction"]]
        source = f"{predictions} (target column)"
    else:
        labelled = read_labels(labels, warnings)
        preds = preds.drop(columns=[c for c in preds.columns if c in labelled.columns and c != "image_name"])
        source = str(labels)

    unlabelled = labelled["target"].isna()
    if unlabelled.any():
        warnings.append(
            f"{source}: {int(unlabelled.sum())} images have no label and are ignored "
            f"(first: {first_few(labelled['image_name'][unlabelled])})"
        )
        labelled = labelled[~unlabelled]
    have = set(preds["image_name"])
    no_prediction = ~labelled["image_name"].isin(have)
    if no_prediction.any():
        message = (
            f"{int(no_prediction.sum())} of {len(labelled)} labelled images have no prediction in "
            f"{predictions} (first: {first_few(labelled['image_name'][no_prediction])})"
        )
        if not ignore_missing:
            raise MelcoreError(
                message + "; score them, or pass --ignore-missing to evaluate only the images that have predictions"
            )
        warnings.append(message + "; ignored (--ignore-missing)")
        labelled = labelled[~no_prediction]
    no_label = ~preds["image_name"].isin(set(labelled["image_name"]))
    if no_label.any():
        warnings.append(
            f"{int(no_label.sum())} predictions have no label and are ignored "
            f"(first: {first_few(preds['image_name'][no_label])})"
        )
    table = labelled.merge(preds, on="image_name", how="inner", validate="one_to_one")
    if table.empty:
        raise MelcoreError(f"no image of {predictions} has a label in {source}; are these the same images?")
    table["target"] = table["target"].astype(np.int8)
    return table.reset_index(drop=True), source


def _bootstrap_groups(table: pd.DataFrame, choice: str) -> tuple[np.ndarray | None, str]:
    """(group key per row or None for images, what the bootstrap resamples) for ``--patient-column``.

    "auto": the cohort's rule (:func:`melcore.cohort.group_keys`: patient, else lesion, rows linked by
    either id joined) when the table has a patient or lesion id, else images.
    """
    if choice == "none":
        return None, "image"
    if choice == "auto":
        if not any(c in table.columns and table[c].notna().any() for c in ("patient_id", "lesion_id")):
            return None, "image"
        return group_keys(table).to_numpy(), describe_grouping(table)
    if choice not in table.columns:
        raise MelcoreError(
            f"--patient-column {choice!r} is not a column of the joined table "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    return table[choice].to_numpy(), choice


def _group_keys(table: pd.DataFrame, column: str) -> np.ndarray:
    if column in table.columns:
        values = table[column]
    elif column == "age_band" and "age_approx" in table.columns:
        values = age_band(table["age_approx"])
    else:
        raise MelcoreError(
            f"--group-column {column!r} is not a column of the labels or predictions "
            f"(columns: {', '.join(map(str, table.columns))}"
            + ("; age_band is derived from age_approx" if column == "age_band" else "")
            + ")"
        )
    return values.astype(object).where(values.notna(), "unknown").astype(str).to_numpy()


# --------------------------------------------------------------------------- output


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}"


def _table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Fixed-width text table; columns in ``left`` are left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return (
            "  "
            + "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        )

    return "\n".join([line(headers)] + [line(row) for row in rows])


def _ci_text(summary: dict) -> str:
    low, high = summary["auroc_ci"]
    if math.isnan(summary["auroc"]):
        return "AUROC undefined"
    return f"AUROC {summary['auroc']:.3f}  ({summary['ci_level']:.0%} CI {_num(low)}-{_num(high)})"


def format_report(summary: dict) -> str:
    """Readable text report of a :func:`melcore.metrics.summarize` dict (plus CLI extras)."""
    n, n_mal = summary["n"], summary["n_malignant"]
    unit = summary.get("bootstrap_unit", "image")
    lines = [
        f"Predictions {summary.get('predictions', '')}, labels {summary.get('labels', '')}",
        f"{n:,} images, {n_mal:,} malignant ({n_mal / n:.1%}); bootstrap over "
        f"{'images' if unit == 'image' else unit}, {summary['n_boot']:,} resamples",
        "",
        _ci_text(summary) + f"   average precision {_num(summary['average_precision'])}"
        f"   Brier {_num(summary['brier'], 4)}",
    ]
    lines += [f"note: {note}" for note in summary["notes"]]
    if summary["operating_points"]:
        lines += ["", "Operating points"]
        rows = [
            [
                p["name"],
                _num(p["threshold"], 4),
                _num(p["sensitivity"]),
                _num(p["specificity"]),
                _num(p["ppv"]),
                _num(p["npv"]),
                _num(p["n_flagged"]),
                _num(p["biopsies_per_melanoma"], 1),
            ]
            for p in summary["operating_points"]
        ]
        lines.append(_table(["point", "threshold", "sens", "spec", "PPV", "NPV", "flagged", "biopsies/melanoma"], rows))
    m = summary["threshold_metrics"]
    lines += [
        "",
        f"At threshold {summary['threshold']:g} (prediction >= threshold is positive)",
        _table(
            ["", "predicted malignant", "predicted benign"],
            [
                ["malignant", _num(m["tp"]) + " TP", _num(m["fn"]) + " FN"],
                ["benign", _num(m["fp"]) + " FP", _num(m["tn"]) + " TN"],
            ],
        ),
        "",
        _table(
            ["sensitivity", "specificity", "PPV", "NPV", "F1", "accuracy", "biopsies/melanoma"],
            [
                [
                    _num(m["sensitivity"]),
                    _num(m["specificity"]),
                    _num(m["ppv"]),
                    _num(m["npv"]),
                    _num(m["f1"]),
                    _num(m["accuracy"]),
                    _num(m["biopsies_per_melanoma"], 1),
                ]
            ],
            left=(),
        ),
    ]
    if "groups" in summary:
        lines += ["", f"By {summary['group_column']} (threshold {summary['threshold']:g})"]
        rows = []
        for key, part in summary["groups"].items():
            low, high = part["auroc_ci"]
            rows.append(
                [
                    key,
                    _num(part["n"]),
                    _num(part["n_malignant"]),
                    _num(part["auroc"]),
                    f"{_num(low)}-{_num(high)}" if not math.isnan(part["auroc"]) else "-",
                    _num(part["sensitivity"]),
                    _num(part["specificity"]),
                    "; ".join(part["notes"]),
                ]
            )
        lines.append(
            _table(
                ["group", "n", "malignant", "AUROC", f"{summary['ci_level']:.0%} CI", "sens", "spec", "note"],
                rows,
                left=(0, 7),
            )
        )
    return "\n".join(lines)


class _ProgressBar:
    """A one-line stderr bar over several bootstraps; silent when stderr is not a terminal."""

    def __init__(self, label: str, n_parts: int):
        self.label = label
        self.n_parts = n_parts
        self.active = sys.stderr.isatty()
        self.drawn = False

    def part(self, index: int):
        def update(done: int, total: int) -> None:
            if not self.active:
                return
            fraction = (index + done / total) / self.n_parts
            filled = int(30 * fraction)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}")
            sys.stderr.flush()
            self.drawn = True

        return update

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\r" + " " * (len(self.label) + 40) + "\r")
            sys.stderr.flush()
