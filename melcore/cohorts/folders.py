"""Reader of one folder per class: ``root/melanoma/*.jpg`` (or ``mel``, ``malignant``: target 1), any other folder 0."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from melcore.cohorts.image_files import EXTENSION_RANK, IMAGE_EXTENSIONS
from melcore.cohorts.tables import FILE_COLUMN, PATH_COLUMN, Findings, assemble
from melcore.errors import CohortError
from melcore.formatting import first_few

__all__ = ["MALIGNANT_FOLDER_NAMES", "read_folders"]

MALIGNANT_FOLDER_NAMES = frozenset({"melanoma", "melanomas", "mel", "malignant", "malignant_melanoma"})


def read_folders(root: Path, report: Findings) -> pd.DataFrame:
    """The assembled frame of the image files in ``root``'s class folders (target 1 for
    :data:`MALIGNANT_FOLDER_NAMES`, diagnosis = the folder name, ``image_path`` known); entries that
    are not images in a class folder are reported, not read.
    """
    if not root.exists():
        raise CohortError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise CohortError(f"format 'folders' needs a folder with one sub-folder per class; {root} is a file")
    rows: list[tuple[str, str, str, float, str]] = []
    ignored: list[str] = []
    class_dirs = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                class_dirs.append(entry)
            else:
                ignored.append(entry.name)
    for class_dir in sorted(class_dirs, key=lambda e: e.name):
        malignant = class_dir.name.strip().lower() in MALIGNANT_FOLDER_NAMES
        with os.scandir(class_dir.path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                stem, ext = os.path.splitext(entry.name)
                if not entry.is_file() or ext.lower() not in EXTENSION_RANK:
                    ignored.append(f"{class_dir.name}/{entry.name}")
                    continue
                rows.append((stem, entry.name, os.path.abspath(entry.path), float(malignant), class_dir.name))
    if not rows:
        found = ", ".join(sorted(e.name for e in class_dirs)) or "no sub-folders"
        raise CohortError(
            f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in class folders "
            f"(found {found}); expected e.g. {root}/melanoma/*.jpg and {root}/nevus/*.jpg"
        )
    if ignored:
        report.warnings.append(
            f"ignored {len(ignored):,} entries that are not images in a class folder (first: {first_few(ignored)})"
        )
    if not any(r[3] for r in rows):
        report.warnings.append(
            f"no folder named melanoma, mel or malignant in {root} (classes: "
            f"{', '.join(sorted(e.name for e in class_dirs))}): every image is labelled 0"
        )
    names, files, paths, target, diagnosis = (list(x) for x in zip(*rows))
    raw = pd.DataFrame({"image_name": names})
    frame = assemble(
        raw,
        {"image_name": "image_name"},
        {"target": np.array(target), "diagnosis": np.array(diagnosis, dtype=object)},
        lines=np.full(len(rows), None, dtype=object),
    )
    frame[FILE_COLUMN] = files
    frame[PATH_COLUMN] = paths
    frame.attrs["target_source"] = "class folder"
    return frame
