"""``python -m melcore inspect``: read a lesion table and report counts, clinics and problems.

Exit status 0 when the table could be read (missing or corrupt images are reported, not
fatal); otherwise a CohortError whose one-line message ``python -m melcore`` prints
before exiting with status 2.
"""

from __future__ import annotations

import argparse
import json

from melcore.audit import AUDIT_MODES, audit_images, audit_warnings, shortcut_audit
from melcore.cohort import CHECK_IMAGES, FORMATS, load_cohort
from melcore.commands._progress import StderrBar
from melcore.errors import CohortError

_LIST_IN_JSON = 50  # names of missing / unreadable images included in --json output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--csv", required=True, help="the label table (or, with --format folders, the folder of class folders)"
    )
    parser.add_argument("--metadata", help="second table joined on the image name (e.g. ISIC 2019 metadata)")
    parser.add_argument(
        "--images",
        help="folder with the image files, or an ISIC-layout root holding jpeg/train/ "
        "or train/ (default: looked up beside the CSV)",
    )
    parser.add_argument("--format", choices=FORMATS, help="table format (default: detected from the header)")
    parser.add_argument("--clinic-column", help="column holding the clinic / source, e.g. attribution")
    parser.add_argument("--clinic-csv", help="table joined on the image name that gives the clinic")
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="CANONICAL=COLUMN",
        help="column mapping, repeatable: --map image_name=file --map target=label",
    )
    parser.add_argument(
        "--check-images",
        choices=CHECK_IMAGES,
        default="exists",
        help="none: do not look at files; exists (default): match file names; "
        "decode: also open every image and report corrupt ones",
    )
    parser.add_argument(
        "--audit",
        choices=AUDIT_MODES,
        default="auto",
        help="shortcut audit (how well acquisition attributes alone predict the label): table "
        "columns only, also image size and border colour (images; auto: up to 5,000 "
        "images), or none",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _parse_mapping(items: list[str]) -> dict[str, str] | None:
    mapping = {}
    for item in items:
        canonical, sep, column = item.partition("=")
        if not sep or not canonical.strip() or not column.strip():
            raise CohortError(f"--map {item!r}: expected CANONICAL=COLUMN, e.g. --map target=label")
        mapping[canonical.strip()] = column.strip()
    return mapping or None


def run(args: argparse.Namespace) -> int:
    mapping = _parse_mapping(args.map)
    with StderrBar("decoding images") as bar:
        cohort = load_cohort(
            args.csv,
            args.images,
            format=args.format,
            metadata=args.metadata,
            clinic_column=args.clinic_column,
            clinic_csv=args.clinic_csv,
            mapping=mapping,
            check_images=args.check_images,
            progress=bar,
        )
    summary = cohort.summary()
    audit = _audit(cohort, args.audit)
    if audit is not None:
        summary["shortcut_audit"] = audit
        summary["warnings"] = list(summary["warnings"]) + audit_warnings(audit)
    if args.json:
        summary.update(
            source=str(cohort.source) if cohort.source else None,
            images_dir=str(cohort.images_dir) if cohort.images_dir else None,
            missing_images=cohort.report.missing_images[:_LIST_IN_JSON],
            unreadable_images=[list(x) for x in cohort.report.unreadable_images[:_LIST_IN_JSON]],
            dropped=[list(x) for x in cohort.report.dropped],
        )
        print(json.dumps(summary))
        return 0
    print(_text(cohort, summary))
    return 0


def _audit(cohort, mode: str) -> list[dict] | None:
    images = audit_images(cohort, mode)
    if images is None:
        return None
    with StderrBar("shortcut audit") as bar:
        return shortcut_audit(cohort, images=images, progress=bar)


def _text(cohort, s: dict) -> str:
    labelled = s["n_malignant"] + s["n_benign"]
    rate = f" ({100 * s['n_malignant'] / labelled:.2f}% of {labelled:,} labelled)" if labelled else ""
    lines = [
        f"cohort       {s['name']}  (format {s['format']}, {cohort.source})",
        f"images dir   {cohort.images_dir or 'not found'}",
        *(f"  note: {note}" for note in s.get("notes") or []),
        f"images       {s['n_images']:>9,}",
        f"lesions      {s['n_lesions']:>9,}",
        f"patients     {s['n_patients']:>9,}  (grouped by {s['grouping']})",
        f"malignant    {s['n_malignant']:>9,}{rate}",
    ]
    if s["n_unlabelled"]:
        lines.append(f"unlabelled   {s['n_unlabelled']:>9,}")
    lines.append(f"missing img  {s['n_missing_images']:>9,}")
    if s["n_unreadable_images"]:
        lines.append(f"unreadable   {s['n_unreadable_images']:>9,}")
    lines.append("clinics")
    lines.extend(f"  {count:>9,}  {clinic}" for clinic, count in s["clinics"].items())
    if s.get("shortcut_audit"):
        lines.append("shortcut audit (grouped out-of-fold AUROC of each attribute alone)")
        lines.extend(
            f"  {row['attribute']:<24} "
            + (
                f"{row['auroc']:.3f} [{row['auroc_ci'][0]:.3f}, {row['auroc_ci'][1]:.3f}]"
                if row["auroc"] is not None
                else row["note"]
            )
            for row in s["shortcut_audit"]
        )
    if s["warnings"]:
        lines.append("warnings")
        lines.extend(f"  - {w}" for w in s["warnings"])
    return "\n".join(lines)
