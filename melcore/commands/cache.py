"""``python -m melcore cache``: how much disk the caches take, and pruning them.

Examples::

    python -m melcore cache                              # size of each cache
    python -m melcore cache --max-size 20G               # keep the 20 GiB used most recently
    python -m melcore cache --older-than 30d --dry-run   # what a 30-day age limit would remove
    python -m melcore cache --only gradcam --max-size 0  # empty one cache

Caches hold only derived data (resized images, backbone features, Grad-CAM maps):
anything removed is computed again when next needed. Runs, the store and the demo
cohort are never touched.
"""

from __future__ import annotations

import argparse
import json
import time

from melcore.caches import cache_root, cache_usage, format_size, parse_age, parse_size, prune_caches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-size",
        type=str,
        metavar="SIZE",
        help="prune, least recently used first, until the caches together take at most SIZE "
        "(e.g. 500M, 20G; 0 empties them)",
    )
    parser.add_argument(
        "--older-than", type=str, metavar="AGE", help="prune every entry not used for AGE (e.g. 30d, 12h, 2w)"
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="limit to this cache (images, features, gradcam...); repeatable"
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days = (time.time() - seconds) / 86400
    return f"{days:.0f} d ago" if days >= 1 else f"{days * 24:.0f} h ago"


def run(args: argparse.Namespace) -> int:
    max_bytes = parse_size(args.max_size) if args.max_size is not None else None
    older_than = parse_age(args.older_than) if args.older_than is not None else None
    report = None
    if max_bytes is not None or older_than is not None:
        report = prune_caches(max_bytes=max_bytes, older_than=older_than, names=args.only, dry_run=args.dry_run)
    elif args.dry_run:
        print("note: --dry-run does nothing without --max-size or --older-than")
    usage = cache_usage(args.only)
    if args.json:
        out = {
            "root": str(cache_root()),
            "caches": [
                {"name": u.name, "files": u.files, "bytes": u.bytes, "oldest": u.oldest, "newest": u.newest}
                for u in usage
            ],
        }
        if report is not None:
            out["pruned"] = {"dry_run": report.dry_run, "files": report.removed_files, "bytes": report.removed_bytes}
        print(json.dumps(out, indent=2))
        return 0
    if report is not None:
        verb = "would remove" if report.dry_run else "removed"
        print(
            f"{verb} {report.files} file(s), {format_size(report.bytes)}: "
            + ", ".join(
                f"{name} {report.removed_files[name]} ({format_size(report.removed_bytes[name])})"
                for name in report.removed_files
            )
        )
    print(f"caches under {cache_root()}:")
    if not usage:
        print("  (none yet)")
    for u in usage:
        print(
            f"  {u.name:<10} {u.files:>8} files  {format_size(u.bytes):>10}  last used {_age(u.newest)}, "
            f"oldest {_age(u.oldest)}"
        )
    print(f"  {'total':<10} {sum(u.files for u in usage):>8} files  {format_size(sum(u.bytes for u in usage)):>10}")
    return 0
