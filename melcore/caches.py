"""Disk caches under ``MELREVIEW_HOME/cache``: how big they are, and pruning them.

melreview keeps three kinds of derived data on disk, all safe to delete (a missing
entry is computed again on the next use, and every reader treats a vanished file as a
miss):

* ``images``: resized images and thumbnails (:class:`melcore.images.ImageCache`),
  192 KiB per image at 256 px;
* ``features``: pooled backbone features (:class:`melcore.features.FeatureCache`),
  ~6 KiB per image and view for EfficientNet-B3;
* ``gradcam``: Grad-CAM heatmaps (:mod:`melcore.explain`), a few KiB per run and image.

Nothing is evicted while a cache is in use. Pruning removes the least recently used
entries (recency = the later of access and modification time) until a size limit is
met, and/or every entry older than an age. ``python -m melcore cache`` reports and
prunes; with ``MELREVIEW_CACHE_MAX_SIZE`` set (e.g. ``20G``) the background trainer
prunes to that size after every job (:func:`auto_prune`).

Only the standard library is imported.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from melcore import settings
from melcore.errors import ConfigError

__all__ = [
    "CacheUsage",
    "PruneReport",
    "cache_root",
    "cache_names",
    "cache_usage",
    "prune_caches",
    "prune_files",
    "parse_size",
    "parse_age",
    "format_size",
    "max_size_from_environment",
    "auto_prune",
]

MAX_SIZE_VARIABLE = "MELREVIEW_CACHE_MAX_SIZE"
KEEP = frozenset({"meta.json"})  # descriptions of a cache folder, not entries
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class CacheUsage:
    """One cache folder: ``files`` entries taking ``bytes`` bytes; ``oldest`` / ``newest`` are
    POSIX times of the least / most recently used entry (None when empty)."""

    name: str
    path: Path
    files: int
    bytes: int
    oldest: float | None
    newest: float | None


@dataclass
class PruneReport:
    """What a prune removed (or, with ``dry_run``, would remove), per cache name."""

    removed_files: dict = field(default_factory=dict)
    removed_bytes: dict = field(default_factory=dict)
    kept_bytes: int = 0
    dry_run: bool = False

    @property
    def files(self) -> int:
        return sum(self.removed_files.values())

    @property
    def bytes(self) -> int:
        return sum(self.removed_bytes.values())


def cache_root(home: os.PathLike | str | None = None) -> Path:
    """``<home>/cache`` (``home`` defaults to ``MELREVIEW_HOME``); not created."""
    return (Path(home).expanduser() if home is not None else settings.home()) / "cache"


def cache_names(home: os.PathLike | str | None = None) -> list[str]:
    """The cache folders that exist under :func:`cache_root`, sorted."""
    root = cache_root(home)
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _recency(st: os.stat_result) -> float:
    return max(st.st_atime, st.st_mtime)


def _entries(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """Every cache entry under ``folder`` with its stat; skips temporary (dot) files and KEEP names."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name.startswith(".") or name in KEEP:
                continue  # ".x.tmp" files are being written by another process right now
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue  # removed by another process meanwhile
            found.append((path, st))
    return found


def _select(names: Sequence[str] | None, home) -> list[str]:
    existing = cache_names(home)
    if names is None:
        return existing
    unknown = [name for name in names if name not in existing]
    if unknown:
        choices = ", ".join(existing) or "none yet"
        raise ConfigError(
            f"unknown cache {', '.join(map(repr, unknown))}: the caches under {cache_root(home)} are {choices}"
        )
    return list(names)


def cache_usage(names: Sequence[str] | None = None, *, home=None) -> list[CacheUsage]:
    """Size of each cache folder (all of them by default), in the order of ``names``."""
    usage = []
    for name in _select(names, home):
        folder = cache_root(home) / name
        entries = _entries(folder)
        times = [_recency(st) for _, st in entries]
        usage.append(
            CacheUsage(
                name=name,
                path=folder,
                files=len(entries),
                bytes=sum(st.st_size for _, st in entries),
                oldest=min(times) if times else None,
                newest=max(times) if times else None,
            )
        )
    return usage


def prune_files(
    entries: Iterable[tuple[Path, os.stat_result]],
    *,
    max_bytes: int | None = None,
    older_than: float | None = None,
    now: float | None = None,
    dry_run: bool = False,
) -> tuple[list[tuple[Path, os.stat_result]], int]:
    """Remove entries, least recently used first, until at most ``max_bytes`` remain; and
    every entry not used for ``older_than`` seconds.

    Parameters
    ----------
    entries : iterable of (path, os.stat_result)
    max_bytes : int, optional
        Size limit in bytes (>= 0) for what is left.
    older_than : float, optional
        Age limit in seconds (> 0) measured from ``now`` (default: the current time).
    dry_run : bool
        Decide but delete nothing.

    Returns
    -------
    removed : list of (path, stat)
        The entries deleted (or that would be). A file that another process removed
        first counts as removed.
    kept_bytes : int
    """
    if max_bytes is not None and (not isinstance(max_bytes, (int,)) or max_bytes < 0):
        raise ConfigError(f"max_bytes={max_bytes!r} must be a whole number of bytes, zero or more")
    if older_than is not None and not older_than > 0:
        raise ConfigError(f"older_than={older_than!r} must be a positive number of seconds")
    now = time.time() if now is None else now
    ordered = sorted(entries, key=lambda item: _recency(item[1]))
    total = sum(st.st_size for _, st in ordered)
    removed = []
    for path, st in ordered:
        too_old = older_than is not None and now - _recency(st) > older_than
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            if older_than is None:
                break  # sorted by recency: nothing later is too big either once the total fits
            continue
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # read-only: keep counting it
        total -= st.st_size
        removed.append((path, st))
    return removed, total


def prune_caches(
    *,
    max_bytes: int | None = None,
    older_than: float | None = None,
    names: Sequence[str] | None = None,
    dry_run: bool = False,
    home=None,
    now: float | None = None,
) -> PruneReport:
    """Prune the named caches (default: all) together.

    ``max_bytes`` limits their combined size: the least recently used entries go first
    whichever cache holds them. ``older_than`` (seconds) removes every entry unused for
    longer. At least one of the two is required.
    """
    if max_bytes is None and older_than is None:
        raise ConfigError(
            "say what to prune: a size limit (max_bytes / --max-size) and/or an age (older_than / --older-than)"
        )
    selected = _select(names, home)
    tagged = {}
    entries = []
    for name in selected:
        for path, st in _entries(cache_root(home) / name):
            tagged[path] = name
            entries.append((path, st))
    removed, kept = prune_files(entries, max_bytes=max_bytes, older_than=older_than, now=now, dry_run=dry_run)
    report = PruneReport(
        removed_files={name: 0 for name in selected},
        removed_bytes={name: 0 for name in selected},
        kept_bytes=kept,
        dry_run=dry_run,
    )
    for path, st in removed:
        report.removed_files[tagged[path]] += 1
        report.removed_bytes[tagged[path]] += st.st_size
    if not dry_run:
        for name in selected:
            _remove_empty_folders(cache_root(home) / name)
    return report


def _remove_empty_folders(folder: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda item: -len(item[0])):
        if Path(dirpath) != folder:
            try:
                os.rmdir(dirpath)  # only succeeds when empty
            except OSError:
                pass


def parse_size(text: str | int) -> int:
    """``"500M"``, ``"20G"``, ``"1.5T"``, ``"0"`` or a number of bytes -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"size {text} must be zero or more bytes")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"size {text!r} is not understood: write e.g. 500M, 20G or 1.5T (binary units)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_age(text: str | float) -> float:
    """``"30d"``, ``"12h"``, ``"2w"``, ``"90m"``, ``"45s"`` -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(
            f"age {text!r} is not understood: write a positive number with a unit, e.g. 30d, 12h, 2w, 90m or 45s"
        )
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def format_size(n_bytes: int) -> str:
    """Bytes as a short human string with binary units: ``1536`` -> ``"1.5 KiB"``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - unreachable


def max_size_from_environment() -> int | None:
    """``MELREVIEW_CACHE_MAX_SIZE`` in bytes, or None when unset/empty (no automatic pruning)."""
    raw = os.environ.get(MAX_SIZE_VARIABLE, "").strip()
    if not raw:
        return None
    try:
        return parse_size(raw)
    except ConfigError as exc:
        raise ConfigError(f"{MAX_SIZE_VARIABLE}: {exc}") from None


def auto_prune(home=None) -> PruneReport | None:
    """Prune every cache to ``MELREVIEW_CACHE_MAX_SIZE`` when it is set; None otherwise."""
    limit = max_size_from_environment()
    if limit is None:
        return None
    return prune_caches(max_bytes=limit, home=home)
