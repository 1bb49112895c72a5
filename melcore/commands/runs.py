"""``python -m melcore runs list|archive|restore|export|import``: the recorded runs (same store as the app).

Archiving hides a run from every page's run lists; nothing is deleted (its folder,
predictions, saved threshold and reviews stay) and ``restore`` brings it back.
``export RUN --out run.zip`` writes a shareable archive (model, config, metrics, predictions,
threshold, weights provenance, melreview version, sha256 of each file);
``import run.zip [--dataset NAME]`` verifies it and registers the run
(:mod:`melcore.run_archive`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from melcore.commands._listing import dataset_arg, print_listing
from melcore.errors import MelcoreError
from melcore.formatting import format_number, format_threshold
from melcore.run_archive import export_run, import_run
from melcore.store import Store

RUN_FIELDS = (
    "id",
    "name",
    "dataset_id",
    "job_id",
    "kind",
    "model",
    "clinic",
    "run_dir",
    "threshold",
    "from_scratch",
    "notes",
    "created_at",
    "archived_at",
    "metrics",
)
"""Fields of each object of ``runs list --json``, in order (documented in the README; scripts rely on them)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="store URL (default: MELREVIEW_DB_URL or the SQLite file)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the runs, newest first")
    listing.add_argument("--dataset", metavar="NAME", default=None, help="only this dataset's runs (name or id)")
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--archived", action="store_true", help="only the archived runs")
    which.add_argument("--all", action="store_true", help="active and archived runs")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    export = actions.add_parser("export", help="write a run as a shareable zip archive")
    export.add_argument("run", metavar="RUN", help="run id, or a run folder")
    export.add_argument("--out", required=True, metavar="ZIP", help="archive to create (e.g. run.zip)")
    export.add_argument("--json", action="store_true", help="print the manifest as JSON")
    imported = actions.add_parser("import", help="verify a run archive and register its run")
    imported.add_argument("archive", metavar="ZIP", help="an archive written by `runs export`")
    imported.add_argument(
        "--dataset",
        metavar="NAME",
        default=None,
        help="attach the run to this dataset (default: the archive's dataset when registered under that name)",
    )
    imported.add_argument("--json", action="store_true", help="one JSON object (run_id, run_dir, dataset, predictions)")
    for name, text in (
        ("archive", "hide runs from the pages (nothing is deleted)"),
        ("restore", "show archived runs again"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("run_ids", type=int, nargs="+", metavar="ID")


def _score(run: dict) -> str:
    metrics = run.get("metrics") or {}
    for key, label in (("val_auroc", "val AUROC"), ("oof_auroc", "OOF AUROC")):
        if metrics.get(key) is not None:
            return f"{label} {format_number(metrics[key], '.3f')}"
    return ""


def _line(run: dict) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["created_at"]))
    parts = [f"{run['id']:>5}", created, f"{run.get('kind') or 'image':<12}", run["name"]]
    if _score(run):
        parts.append(_score(run))
    if run.get("threshold") is not None:
        parts.append(f"threshold {format_threshold(run['threshold'])}")
    if run.get("archived_at"):
        parts.append("ARCHIVED")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    store = Store(args.db)
    if args.action == "list":
        dataset_id = dataset_arg(store, args.dataset)["id"] if args.dataset is not None else None
        runs = store.list_runs(dataset_id=dataset_id, archived=None if args.all else bool(args.archived))
        print_listing(runs, RUN_FIELDS, _line, as_json=args.json, what="runs")
        return 0
    if args.action == "export":
        return _export(store, args)
    if args.action == "import":
        return _import(store, args)
    for run_id in args.run_ids:
        store.get_run(run_id)  # every id checked before anything changes
    for run_id in args.run_ids:
        store.archive_run(run_id, archived=args.action == "archive")
        print(f"run {run_id}: {'archived' if args.action == 'archive' else 'restored'}")
    return 0


def _export(store: Store, args: argparse.Namespace) -> int:
    from pathlib import Path

    record, dataset_name = None, None
    if args.run.isdigit():
        record = store.get_run(int(args.run))
        if not record.get("run_dir"):
            raise MelcoreError(f"run #{record['id']} has no run folder to export")
        run_dir = Path(record["run_dir"])
        if record.get("dataset_id") is not None:
            found = store.find_dataset(int(record["dataset_id"]))
            dataset_name = found["name"] if found else None
    else:
        run_dir = Path(args.run)
    manifest = export_run(run_dir, args.out, record=record, dataset_name=dataset_name)
    if args.json:
        print(json.dumps(manifest, default=str))
    else:
        size = sum(f["bytes"] for f in manifest["files"])
        print(
            f"wrote {args.out}: {len(manifest['files'])} file(s), {size:,} bytes, sha256 of each in manifest.json "
            f"(melreview {manifest['melreview_version']})"
        )
    return 0


def _import(store: Store, args: argparse.Namespace) -> int:
    result = import_run(store, args.archive, dataset=args.dataset)
    if args.json:
        print(json.dumps({k: result[k] for k in ("run_id", "run_dir", "dataset", "predictions")}, default=str))
        return 0
    counts = ", ".join(f"{n:,} {split}" for split, n in result["predictions"].items()) or "none"
    print(
        f"imported run #{result['run_id']} into {result['run_dir']} (checksums verified, model loaded in safe "
        f"mode); dataset {result['dataset'] or 'none'}; predictions stored: {counts}"
    )
    if result["dataset"] is None:
        print(
            "note: the run is tied to no dataset, so Compare and Review do not list it; import again with "
            "--dataset NAME",
            file=sys.stderr,
        )
    return 0
