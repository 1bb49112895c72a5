"""``python -m melcore runs list|archive|restore``: the recorded runs (same store as the app).

Archiving hides a run from every page's run lists; nothing is deleted (its folder,
predictions, saved threshold and reviews stay) and ``restore`` brings it back.
"""

from __future__ import annotations

import argparse
import time

from melcore.commands._listing import dataset_arg, print_listing
from melcore.formatting import format_number, format_threshold
from melcore.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="store URL (default: MELREVIEW_DB_URL or the SQLite file)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the runs, newest first")
    listing.add_argument("--dataset", metavar="NAME", default=None, help="only this dataset's runs (name or id)")
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--archived", action="store_true", help="only the archived runs")
    which.add_argument("--all", action="store_true", help="active and archived runs")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    for name, text in (("archive", "hide runs from the pages (nothing is deleted)"),
                       ("restore", "show archived runs again")):
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
        keys = ("id", "name", "dataset_id", "job_id", "kind", "model", "clinic", "run_dir", "threshold",
                "from_scratch", "created_at", "archived_at", "metrics")
        print_listing(runs, keys, _line, as_json=args.json, what="runs")
        return 0
    for run_id in args.run_ids:
        store.get_run(run_id)  # every id checked before anything changes
    for run_id in args.run_ids:
        store.archive_run(run_id, archived=args.action == "archive")
        print(f"run {run_id}: {'archived' if args.action == 'archive' else 'restored'}")
    return 0
