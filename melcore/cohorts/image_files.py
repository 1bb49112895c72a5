"""Finding a cohort's image files: folders beside the table, name matching, confinement, decode checks.

An image is matched by the reference its row gives (``ISIC_1``, ``ISIC_1.jpg``,
``sub/ISIC_1.png``) among the files of the image folder and its direct sub-folders
(:data:`IMAGE_EXTENSIONS`, ``.jpg`` first when several share a name). Every path is then
confined to the dataset's folders (:func:`confine_images`) and, on request, decoded as
training would read it (:func:`decode_check`). Rows whose file is missing, outside the
folders or unreadable keep their row with ``image_path`` None and are listed in the report.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from melcore.cohorts.tables import FILE_COLUMN, Findings
from melcore.errors import ImageError
from melcore.formatting import SHOWN, first_few
from melcore.safety import inside, resolve_roots

__all__ = [
    "IMAGE_EXTENSIONS",
    "EXTENSION_RANK",
    "Progress",
    "image_stem",
    "image_folder_in_root",
    "match_images",
    "confine_images",
    "decode_check",
]

# Preference order when several files share a name (ISIC_1.jpg and ISIC_1.png).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXTENSION_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
Progress = Callable[[int, int], None]  # progress(done, total)


def image_stem(reference: str) -> str:
    """``"sub/ISIC_1.jpg"`` -> ``"ISIC_1"``: the file name without folders or an image extension."""
    base = reference.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and stem and ("." + ext.lower()) in EXTENSION_RANK else base


def _image_dir_candidates(source: Path, fmt: str, frame: pd.DataFrame) -> list[Path]:
    base = source.parent
    split = _table_split(source, frame)
    other = "train" if split == "test" else "test"
    names = [
        f"jpeg/{split}",
        f"jpeg/{other}",
        split,
        "images",
        f"{split}_images",
        "ISIC_2019_Training_Input/ISIC_2019_Training_Input",
        "ISIC_2019_Training_Input",
        "ISIC_2019_Test_Input",
        "HAM10000_images",
        "jpeg",
        ".",
    ]
    if fmt == "isic2019":
        names = names[5:8] + names[:5] + names[8:]
    seen, out = set(), []
    for name in names:
        path = (base / name).resolve()
        if path not in seen and path.is_dir():
            seen.add(path)
            out.append(path)
    return out


def _table_split(source: Path, frame: pd.DataFrame) -> str:
    """``"test"`` for a test table (its name says so, or it holds no label), else ``"train"``."""
    return "test" if ("test" in source.stem.lower() or not frame["target"].notna().any()) else "train"


def _holds_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(
                os.path.splitext(e.name)[1].lower() in EXTENSION_RANK and not e.name.startswith(".") and e.is_file()
                for e in entries
            )
    except OSError:
        return False


def image_folder_in_root(folder: str | Path, split: str = "train") -> Path | None:
    """The image folder inside an ISIC-layout root, or None when ``folder`` is not one.

    An ISIC-layout root holds no image itself but ``jpeg/<split>/`` (Kaggle SIIM-ISIC 2020,
    the demo cohort) or ``<split>/`` with images; ``split`` is ``"train"`` or ``"test"``
    (the other split is taken when only it exists).

    Parameters
    ----------
    folder : path
        The folder given as the image folder.
    split : {"train", "test"}
        Which split's folder the table describes.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir() or _holds_images(folder):
        return None
    other = "test" if split == "train" else "train"
    for name in (f"jpeg/{split}", split, f"jpeg/{other}", other):
        candidate = folder / name
        if candidate.is_dir() and _holds_images(candidate):
            return candidate.resolve()
    return None


def _list_images(folder: Path) -> dict[str, str]:
    """Lookup key -> absolute path for the image files in ``folder`` and its direct sub-folders.

    Keys: the file name, its stem, and the stem without ``_downsampled`` (ISIC 2019).
    Files directly in ``folder`` win over sub-folders; .jpg over .png etc.
    """
    files: list[tuple[int, int, str, str]] = []
    subdirs: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                ext = os.path.splitext(entry.name)[1].lower()
                if ext in EXTENSION_RANK and entry.is_file():
                    files.append((0, EXTENSION_RANK[ext], entry.name, entry.path))
                elif entry.is_dir():
                    subdirs.append(entry.path)
        for subdir in subdirs:
            with os.scandir(subdir) as entries:
                for entry in entries:
                    ext = os.path.splitext(entry.name)[1].lower()
                    if ext in EXTENSION_RANK and not entry.name.startswith(".") and entry.is_file():
                        files.append((1, EXTENSION_RANK[ext], entry.name, entry.path))
    except OSError:
        return {}
    files.sort()
    lookup: dict[str, str] = {}
    for _, _, filename, path in files:
        absolute = os.path.abspath(path)
        lookup.setdefault(filename, absolute)
        stem = os.path.splitext(filename)[0]
        lookup.setdefault(stem, absolute)
        if stem.endswith("_downsampled"):
            lookup.setdefault(stem[: -len("_downsampled")], absolute)
    return lookup


def _lookup_paths(frame: pd.DataFrame, lookup: dict[str, str]) -> pd.Series:
    get = lookup.get
    paths = []
    for reference, name in zip(frame[FILE_COLUMN].tolist(), frame["image_name"].tolist()):
        path = get(reference) or get(name)
        if path is None and name.endswith("_downsampled"):
            path = get(name[: -len("_downsampled")])
        paths.append(path)
    return pd.Series(paths, index=frame.index, dtype=object)


def _is_path(references: pd.Series) -> np.ndarray:
    return np.array(["/" in r or "\\" in r for r in references.astype(str).tolist()], dtype=bool)


def _relative_paths(frame: pd.DataFrame, base: Path) -> pd.Series:
    """Rows whose reference is a path (``a/b.jpg`` or absolute): resolved against ``base``; else NaN."""
    refs = frame[FILE_COLUMN].astype(str)
    out = pd.Series(None, index=frame.index, dtype=object)
    for i in np.flatnonzero(_is_path(refs)):
        path = Path(refs.iloc[i].replace("\\", "/")).expanduser()
        path = path if path.is_absolute() else base / path
        out.iloc[i] = str(path.resolve())
    return out


def match_images(
    frame: pd.DataFrame, source: Path, images, fmt: str, check: str, report: Findings
) -> tuple[Path | None, pd.Series]:
    """(image folder used, ``image_path`` per row) for an assembled frame read from ``source``.

    ``images`` is the folder given (an ISIC-layout root is entered), else the folders beside the
    table are tried in turn and the first holding any image is used. ``check="none"`` builds paths
    without touching the disk; otherwise names are matched against the files found and the missing
    ones are reported.
    """
    n = len(frame)
    has_rel = _is_path(frame[FILE_COLUMN])
    if images is not None:
        images_dir = Path(images).expanduser().resolve()
        inner = image_folder_in_root(images_dir, _table_split(source, frame))
        if inner is not None:
            report.notes.append(
                f"image folder {images_dir} is an ISIC-layout root; using "
                f"{inner.relative_to(images_dir)}/ in it ({inner})"
            )
            images_dir = images = inner
        candidates = [images_dir]
        if not images_dir.is_dir():
            report.warnings.append(f"image folder {images_dir} does not exist")
    else:
        images_dir = None
        candidates = _image_dir_candidates(source, fmt, frame)

    if check == "none":
        if images_dir is None and candidates:
            images_dir = candidates[0]
        paths = pd.Series(None, index=frame.index, dtype=object)
        if images_dir is not None:
            with_ext = frame[FILE_COLUMN].where(
                frame[FILE_COLUMN].str.lower().str.endswith(IMAGE_EXTENSIONS), frame["image_name"] + ".jpg"
            )
            paths = (str(images_dir) + os.sep + with_ext).astype(object)
        if has_rel.any():
            rel = _relative_paths(frame, images_dir or source.parent.resolve())
            paths = paths.where(~has_rel, rel)
        return images_dir, paths

    paths = pd.Series(None, index=frame.index, dtype=object)
    if images is not None:
        if images_dir.is_dir():
            paths = _lookup_paths(frame, _list_images(images_dir))
    else:
        for candidate in candidates:
            found = _lookup_paths(frame, _list_images(candidate))
            if found.notna().any():
                images_dir, paths = candidate, found
                break
    if has_rel.any():
        rel = _relative_paths(frame, images_dir or source.parent.resolve())
        rel = rel.where(rel.map(lambda p: isinstance(p, str) and os.path.isfile(p)), None)
        paths = paths.where(~has_rel, rel)
    missing = paths.isna().to_numpy()
    if missing.any():
        names = frame.loc[missing, "image_name"].tolist()
        report.missing_images.extend(names)
        if images_dir is not None:
            where = f"in {images_dir}"
        elif images is None and candidates:
            where = f"beside the table (looked in {', '.join(str(c) for c in candidates)}; pass images= / --images)"
        elif images is None:
            where = f"(no image folder beside {source.name}; pass images= / --images)"
        else:
            where = f"in {images}"
        report.warnings.append(
            f"{len(names):,} of {n:,} image files not found {where} "
            f"(first: {first_few(names)}); their image_path is None"
        )
    return images_dir, paths


def confine_images(frame: pd.DataFrame, roots: Sequence[Path | None], report: Findings) -> None:
    """Clear (and report) every ``image_path`` outside ``roots`` once ``..`` and symbolic links are resolved.

    The dataset's folders (its image folder and its table's folder) are the only
    places its images are read from, by every consumer of the table (training,
    prediction, Grad-CAM, pages): a row naming ``/etc/passwd`` or ``../../.env``, or a
    symlink in the image folder pointing elsewhere, gets no image path.
    """
    allowed = resolve_roots(roots)
    parent_inside: dict[str, bool] = {}

    def confined(path: str) -> bool:
        parent, name = os.path.split(path)
        if name in ("", ".", "..") or f"{os.sep}..{os.sep}" in path:
            return inside(path, allowed) is not None
        if parent not in parent_inside:
            parent_inside[parent] = inside(parent, allowed) is not None
        return parent_inside[parent] and (not os.path.islink(path) or inside(path, allowed) is not None)

    paths = frame["image_path"].to_numpy(copy=True)
    outside = [i for i, path in enumerate(paths) if isinstance(path, str) and not confined(path)]
    if not outside:
        return
    names = [str(frame["image_name"].iat[i]) for i in outside]
    for i, name in zip(outside, names):
        report.unreadable_images.append((name, "outside the dataset's folders; not read"))
        paths[i] = None
    frame["image_path"] = paths
    where = " and ".join(str(r) for r in allowed) or "none registered"
    report.warnings.append(
        f"{len(outside):,} image paths lie outside the dataset's folders ({where}) once links "
        f"are resolved (first: {first_few(names)}); they are not read and their image_path is "
        "None. Move the images into the image folder."
    )


def _verify_image(path: str) -> str | None:
    """None when the file decodes as :func:`melcore.images.load_image` would read it, else the reason.

    The same checks as training's reads: a regular file, at most the pixel limit in
    force (``MELREVIEW_MAX_PIXELS``), every byte of image data decoded (JPEGs at 1/8 scale).
    """
    from melcore.images import verify_image

    try:
        verify_image(path)
    except ImageError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - every failure means "unreadable"; the reason is reported
        return type(exc).__name__
    return None


def decode_check(frame: pd.DataFrame, report: Findings, progress: Progress | None) -> None:
    """Decode every found image (in threads, reporting ``progress(done, total)``); clear and report the
    ``image_path`` of each that fails :func:`melcore.images.verify_image`.
    """
    found = np.flatnonzero(frame["image_path"].notna().to_numpy())
    total = len(found)
    if total == 0:
        return
    paths = frame["image_path"].to_numpy()[found]
    reasons: list[str | None] = []
    step = max(1, total // 100)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, reason in enumerate(pool.map(_verify_image, paths, chunksize=16), start=1):
            reasons.append(reason)
            if progress is not None and (i % step == 0 or i == total):
                progress(i, total)
    bad = [(int(idx), r) for idx, r in zip(found, reasons) if r is not None]
    if not bad:
        return
    image_path = frame["image_path"].to_numpy(copy=True)
    for idx, reason in bad:
        report.unreadable_images.append((str(frame["image_name"].iat[idx]), reason))
        image_path[idx] = None
    frame["image_path"] = image_path
    shown = [f"{n} ({r})" for n, r in report.unreadable_images[:SHOWN]]
    report.warnings.append(
        f"{len(bad):,} image files could not be decoded ({first_few(shown, total=len(bad), sep='; ')}"
        f"); their image_path is None"
    )
