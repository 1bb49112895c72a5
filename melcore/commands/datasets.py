"""``python -m melcore datasets list|add|show|remove``: the registered datasets (same store and checks as Home).

Examples::

    python -m melcore datasets add isic2020 --csv /data/isic/train.csv --images /data/isic --clinic-column attribution
    python -m melcore datasets list --json
    python -m melcore datasets show isic2020
    python -m melcore datasets remove isic2020     # unregisters only: images, tables and runs stay

``add`` runs :func:`melcore.datasets.register_dataset`, as the Home page does: the same checks
(name free, paths inside ``MELREVIEW_DATA_ROOTS``, a readable table) and the same warnings
(printed as ``warning: ...`` lines on stderr). ``--images`` may be an ISIC-layout root (a folder
holding ``jpeg/train/`` or ``train/``); the folder used is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from melcore import datasets
from melcore.cohort import FORMATS
from melcore.commands._listing import print_listing
from melcore.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="store URL (default: MELREVIEW_DB_URL or the SQLite file)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the registered datasets, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON array (fields: see README)")
    add = actions.add_parser("add", help="inspect a table and register it (the Home page's checks and warnings)")
    add.add_argument("name", metavar="NAME", help="name to register under")
    add.add_argument("--csv", required=True, help="the label table (or, with --format folders, the class folders)")
    add.add_argument(
        "--images",
        metavar="DIR",
        help="image folder, or an ISIC-layout root holding jpeg/train/ or train/ (default: looked up beside the table)",
    )
    add.add_argument("--format", choices=FORMATS, help="table format (default: detected from the header)")
    add.add_argument("--clinic-column", metavar="C", help="column holding the clinic / source, e.g. attribution")
    add.add_argument("--metadata", metavar="CSV", help="second table joined on the image name (ISIC 2019 metadata)")
    add.add_argument("--json", action="store_true", help="print the registered dataset as one JSON object")
    show = actions.add_parser("show", help="one dataset: counts, clinics, warnings, shortcut audit, runs, jobs")
    show.add_argument("name", metavar="NAME", help="dataset name (or id)")
    show.add_argument(
        "--json", action="store_true", help="one JSON object (the list fields plus options, notes, shortcut_audit)"
    )
    remove = actions.add_parser("remove", help="unregister a dataset (never deletes images or runs)")
    remove.add_argument("name", metavar="NAME", help="dataset name (or id)")


def _line(record: dict) -> str:
    n, malignant = record.get("n_images") or 0, record.get("n_malignant") or 0
    rate = f" ({100 * malignant / n:.1f}%)" if n else ""
    demo = "  demo (synthetic)" if record["is_demo"] else ""
    return (
        f"{record['id']:>4}  {record['name']:<20} {n:>8,} images  {record.get('n_patients') or 0:>7,} patients  "
        f"{malignant:>6,} malignant{rate}  {len(record['clinics'])} clinic(s)  {record['runs']} run(s){demo}"
    )


def _show_text(record: dict) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["created_at"]))
    lines = [
        f"dataset      {record['name']} (#{record['id']}, registered {created})"
        + ("  demo (synthetic)" if record["is_demo"] else ""),
        f"table        {record['csv_path']}  (format {record['format'] or 'auto'})",
        f"images dir   {record['images_dir'] or 'not found'}",
        f"images       {record['n_images'] or 0:>9,}",
        f"patients     {record['n_patients'] or 0:>9,}  (grouped by {record['grouping']})",
        f"malignant    {record['n_malignant'] or 0:>9,}",
        f"missing img  {record['n_missing_images'] or 0:>9,}",
        "clinics",
        *(f"  {count:>9,}  {clinic}" for clinic, count in record["clinics"].items()),
        f"runs         {record['runs']}",
        "jobs         " + (", ".join(f"{n} {state}" for state, n in record["jobs"].items()) or "none"),
    ]
    if record.get("shortcut_audit"):
        lines.append("shortcut audit (grouped out-of-fold AUROC of each attribute alone)")
        lines.extend(
            f"  {row['attribute']:<24} "
            + (
                f"{row['auroc']:.3f} [{row['auroc_ci'][0]:.3f}, {row['auroc_ci'][1]:.3f}]"
                if row.get("auroc") is not None
                else str(row.get("note") or "")
            )
            for row in record["shortcut_audit"]
        )
    if record["warnings"]:
        lines.append("warnings")
        lines.extend(f"  - {w}" for w in record["warnings"])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    store = Store(args.db)
    if args.action == "list":
        records = [datasets.dataset_record(store, d) for d in store.list_datasets()]
        print_listing(records, datasets.RECORD_FIELDS, _line, as_json=args.json, what="datasets registered")
        return 0
    if args.action == "add":
        result = datasets.register_dataset(
            store,
            args.name,
            args.csv,
            args.images,
            format=args.format,
            clinic_column=args.clinic_column,
            metadata_path=args.metadata,
        )
        record = datasets.dataset_record(store, result.dataset, detail=True)
        if args.json:
            print(json.dumps(record, default=str))
        else:
            print(
                f"registered {record['name']!r} (#{record['id']}): {record['n_images']:,} images, "
                f"{record['n_patients']:,} patients, {record['n_malignant']:,} malignant"
            )
            print(f"images dir   {record['images_dir'] or 'not found'}")
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    if args.action == "show":
        dataset = store.get_dataset(int(args.name) if args.name.isdigit() else args.name)
        record = datasets.dataset_record(store, dataset, detail=True)
        print(json.dumps(record, default=str) if args.json else _show_text(record))
        return 0
    kept = datasets.remove_dataset(store, args.name)
    print(
        f"removed dataset {kept['dataset']['name']!r}; nothing on disk was deleted (table "
        f"{kept['dataset']['csv_path']}); {kept['runs_kept']} run(s) and {kept['jobs_kept']} finished job(s) "
        "kept, no longer tied to a dataset (`python -m melcore runs list --all`)"
    )
    return 0
