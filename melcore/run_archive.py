"""Shareable runs: one zip archive per run, verified when imported.

Layout of an archive (:data:`ARCHIVE_FORMAT`, version :data:`ARCHIVE_VERSION`)::

    manifest.json          what the run is and the sha256 and size of every file below
    run/model.keras        the run folder's regular files, sub-folders kept (fold-0/..., colour model...)
    run/config.json
    run/metrics.json
    run/val_predictions.csv (and/or oof_predictions.csv)
    ...

``manifest.json`` holds ``format``, ``version``, ``melreview_version``, ``exported_at`` (UNIX
seconds), ``run`` (name, kind, model, clinic, threshold, from_scratch, notes, dataset name,
config, metrics), ``weights`` (the weights provenance recorded in ``metrics.json``) and
``files`` (``[{"path", "bytes", "sha256"}]``, paths relative to ``run/``).

:func:`import_run` refuses an archive, with the reason and before anything is registered, when
it is not a readable zip; when ``manifest.json`` is missing, not JSON, not a run manifest or of
another version; when a member's name is absolute, climbs with ``..``, holds a backslash or is a
symlink; when the members are not exactly the manifest's files; when a file's size or sha256
differs from the manifest, or a member does not unpack (damaged); when the archive would unpack to
more than ``max_bytes`` or a member over 1 MiB unpacks to more than :data:`MAX_RATIO` times its
compressed size (a zip bomb; sizes are also counted while reading, not only taken from the
headers); when the threshold or a predictions file is not what the store keeps; or when
``model.keras`` does not load in Keras safe mode. Files are unpacked into a new folder under
``MELREVIEW_HOME/runs`` and nowhere else, and the run is registered by
:func:`melcore.jobs.record_run` (the run and its predictions in one transaction); a refused
archive leaves no file and no run behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import melcore
from melcore import settings
from melcore.caches import parse_size
from melcore.errors import MelcoreError
from melcore.jobs import PREDICTION_FILES, RecordedRun, record_run

ARCHIVE_FORMAT = "melreview-run"
ARCHIVE_VERSION = 1
MANIFEST = "manifest.json"
PREFIX = "run/"
DEFAULT_MAX_BYTES = 4 * 1024**3
"""Largest total unpacked size :func:`import_run` accepts (4 GiB; ``MELREVIEW_IMPORT_MAX_BYTES`` overrides)."""
MAX_MEMBERS = 20_000
MAX_RATIO = 200
"""Largest unpacked/compressed size ratio of a member over :data:`RATIO_FROM_BYTES` (deflate of real run files
stays far below; a zip bomb is far above)."""
RATIO_FROM_BYTES = 1024**2
MAX_MANIFEST_BYTES = 16 * 1024**2
_CHUNK = 1 << 20


class ArchiveError(MelcoreError):
    """A run archive that is refused (damaged, tampered, unsafe); the message says why."""


def melreview_version() -> str:
    """The installed melreview version (``melcore.__version__``, else the package metadata, else "unknown")."""
    version = getattr(melcore, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as package_version

        return package_version("melreview")
    except Exception:  # noqa: BLE001 - not installed as a package
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_files(run_dir: Path) -> list[Path]:
    """The regular files under ``run_dir`` (relative, sorted); symlinks are refused, not followed."""
    files = []
    for root, dirs, names in os.walk(run_dir, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(root) / name
            if path.is_symlink():
                raise ArchiveError(
                    f"{path} is a symbolic link; a run archive holds regular files only (replace "
                    "the link by the file, or remove it)"
                )
        for name in names:
            path = Path(root) / name
            if not stat.S_ISREG(path.lstat().st_mode):
                raise ArchiveError(f"{path} is not a regular file; remove it from the run folder")
            files.append(path.relative_to(run_dir))
    return sorted(files, key=lambda p: p.as_posix())


def export_run(run_dir, out, *, record: dict | None = None, dataset_name: str | None = None) -> dict:
    """Write the run folder ``run_dir`` as the archive ``out``; returns the manifest.

    Parameters
    ----------
    run_dir : path
        A finished run folder (``metrics.json`` in it).
    out : path
        The ``.zip`` to create; refused when it exists.
    record : dict, optional
        The run's store row (its name, threshold and notes travel with it).
    dataset_name : str, optional
        Name of the run's dataset, recorded for the importer.
    """
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if not (run_dir / "metrics.json").is_file():
        raise ArchiveError(f"{run_dir} holds no metrics.json: only a finished run folder can be exported")
    if out.exists():
        raise ArchiveError(f"{out} exists; choose a new file name")
    if out.resolve().is_relative_to(run_dir.resolve()):
        raise ArchiveError(f"{out} is inside the run folder {run_dir}; write the archive elsewhere")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    record = record or {}
    files = _run_files(run_dir)
    manifest = {
        "format": ARCHIVE_FORMAT,
        "version": ARCHIVE_VERSION,
        "melreview_version": melreview_version(),
        "exported_at": time.time(),
        "run": {
            "name": record.get("name") or run_dir.name,
            "kind": record.get("kind") or metrics.get("kind", "image"),
            "model": record.get("model") or config.get("model") or metrics.get("model"),
            "clinic": record.get("clinic") if record else config.get("clinic"),
            "threshold": record.get("threshold"),
            "from_scratch": bool(record.get("from_scratch", (metrics.get("weights") or {}).get("from_scratch"))),
            "notes": record.get("notes"),
            "dataset": dataset_name,
            "config": record.get("config") or config,
            "metrics": metrics,
        },
        "weights": metrics.get("weights") or {},
        "files": [
            {"path": p.as_posix(), "bytes": (run_dir / p).stat().st_size, "sha256": _sha256(run_dir / p)} for p in files
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2, default=str))
            for entry in manifest["files"]:
                archive.write(run_dir / entry["path"], PREFIX + entry["path"])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def _safe_name(name: str) -> str:
    """``name`` when it is a plain relative member name; ArchiveError saying why otherwise."""
    if "\\" in name or "\x00" in name:
        raise ArchiveError(f"member {name!r} has a backslash or NUL in its name; refused")
    path = PurePosixPath(name)
    if not name or name.endswith("/") and not path.parts:
        raise ArchiveError(f"member {name!r} has an empty name; refused")
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(
            f"member {name!r} has an absolute name; refused (an archive writes only inside its target folder)"
        )
    if ".." in path.parts:
        raise ArchiveError(
            f"member {name!r} climbs out with '..'; refused (an archive writes only inside its target folder)"
        )
    return name


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _read_manifest(archive: zipfile.ZipFile, where: Path) -> dict:
    try:
        info = archive.getinfo(MANIFEST)
    except KeyError:
        raise ArchiveError(
            f"{where} has no {MANIFEST}: not a melreview run archive (write one with `python -m melcore runs export`)"
        ) from None
    if info.file_size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{where}: {MANIFEST} declares {info.file_size:,} bytes; refused")
    with archive.open(info) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{where}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES:,} bytes; refused")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArchiveError(f"{where}: {MANIFEST} is not valid JSON; the archive is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(f"{where}: {MANIFEST} is not a {ARCHIVE_FORMAT} manifest")
    if manifest.get("version") != ARCHIVE_VERSION:
        raise ArchiveError(
            f"{where}: archive version {manifest.get('version')!r}; this melreview reads version "
            f"{ARCHIVE_VERSION} (upgrade melreview)"
        )
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(e, dict)
        and isinstance(e.get("path"), str)
        and isinstance(e.get("bytes"), int)
        and isinstance(e.get("sha256"), str)
        for e in files
    ):
        raise ArchiveError(f"{where}: {MANIFEST} has no valid file list (path, bytes, sha256 for each)")
    if not isinstance(manifest.get("run"), dict):
        raise ArchiveError(f"{where}: {MANIFEST} describes no run")
    return manifest


def verify_archive(path, max_bytes: int | None = None) -> tuple[dict, zipfile.ZipFile]:
    """Check an archive's names, members and declared sizes against its manifest; returns (manifest, open zip).

    Checksums and real sizes are checked while unpacking (:func:`import_run`). ArchiveError says
    what is wrong.
    """
    path = Path(path).expanduser()
    max_bytes = _max_bytes(max_bytes)
    if not path.is_file():
        raise ArchiveError(f"run archive {path} not found")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(
            f"{path} is not a readable zip archive ({exc}); the file is damaged or not a run archive"
        ) from None
    try:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArchiveError(f"{path} has {len(infos):,} members, more than the {MAX_MEMBERS:,} accepted")
        names = []
        for info in infos:
            _safe_name(info.filename)
            if _is_symlink(info):
                raise ArchiveError(f"member {info.filename!r} is a symbolic link; refused")
            if not info.is_dir():
                names.append(info.filename)
        if len(names) != len(set(names)):
            raise ArchiveError(f"{path} holds the same member name twice; refused")
        manifest = _read_manifest(archive, path)
        listed = [PREFIX + _safe_name(e["path"]) for e in manifest["files"]]
        if len(listed) != len(set(listed)):
            raise ArchiveError(f"{path}: {MANIFEST} lists a file twice; refused")
        present = set(names) - {MANIFEST}
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        if missing:
            raise ArchiveError(f"{path}: files listed in the manifest are missing: {', '.join(missing[:5])}")
        if extra:
            raise ArchiveError(f"{path}: files not listed in the manifest: {', '.join(extra[:5])}; refused")
        sizes = {e["path"]: e["bytes"] for e in manifest["files"]}
        for info in infos:
            if not info.filename.startswith(PREFIX) or info.is_dir():
                continue
            if info.file_size != sizes[info.filename[len(PREFIX) :]]:
                raise ArchiveError(
                    f"{path}: {info.filename} is {info.file_size:,} bytes, the manifest says "
                    f"{sizes[info.filename[len(PREFIX) :]]:,}; the archive was altered"
                )
            if info.file_size > RATIO_FROM_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise ArchiveError(
                    f"{path}: {info.filename} unpacks {info.file_size / max(info.compress_size, 1):,.0f} "
                    f"times its compressed size (more than {MAX_RATIO}); refused as a possible "
                    "zip bomb"
                )
        total = sum(sizes.values())
        if total > max_bytes:
            raise ArchiveError(
                f"{path} would unpack to {total:,} bytes, more than the {max_bytes:,} accepted "
                "(MELREVIEW_IMPORT_MAX_BYTES)"
            )
        if "metrics.json" not in sizes:
            raise ArchiveError(f"{path} holds no metrics.json: not a finished run")
    except BaseException:
        archive.close()
        raise
    return manifest, archive


def _max_bytes(value: int | None) -> int:
    if value is not None:
        return int(value)
    raw = os.environ.get("MELREVIEW_IMPORT_MAX_BYTES", "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    return parse_size(raw)


def _unpack(archive: zipfile.ZipFile, manifest: dict, target: Path, max_bytes: int, where: Path) -> None:
    """Every manifest file into ``target``, counting real bytes and checking each sha256."""
    root = target.resolve()
    total = 0
    for entry in manifest["files"]:
        dest = (target / entry["path"]).resolve()
        if not dest.is_relative_to(root):
            raise ArchiveError(f"member {entry['path']!r} would be written outside the target folder; refused")
        digest, size = hashlib.sha256(), 0
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            raise ArchiveError(f"{where}: {entry['path']} lies inside another member's file; refused") from None
        try:
            with archive.open(PREFIX + entry["path"]) as src, open(dest, "xb") as out:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    size += len(chunk)
                    total += len(chunk)
                    if size > entry["bytes"] or total > max_bytes:
                        raise ArchiveError(
                            f"{where}: {entry['path']} unpacks to more bytes than the manifest "
                            "says (or than the size accepted); refused as a possible zip bomb"
                        )
                    digest.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ArchiveError(f"{where}: {entry['path']} does not unpack ({exc}); the archive is damaged") from None
        except (FileExistsError, IsADirectoryError):
            raise ArchiveError(f"{where}: {entry['path']} is also another member's folder; refused") from None
        if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            raise ArchiveError(
                f"{where}: checksum mismatch for {entry['path']} (sha256 {digest.hexdigest()[:12]}..., "
                f"manifest {entry['sha256'][:12]}...); the archive is damaged or was altered"
            )


def _check_model(target: Path) -> None:
    from melcore.models import load_model  # lazy: pulls TensorFlow and Keras

    for model_path in sorted(target.rglob("*.keras")):
        try:
            load_model(model_path)  # Keras safe mode: no Lambda layers, no arbitrary code
        except MelcoreError as exc:
            raise ArchiveError(
                f"the archive's {model_path.relative_to(target)} does not load in Keras safe mode: {exc}"
            ) from None


def _read_predictions(path: Path, where: Path):
    """A run's predictions CSV, checked as the store needs it (image_name, prediction in [0, 1])."""
    import numpy as np
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={"image_name": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise ArchiveError(f"{where}: {path.name} is not a readable CSV ({str(exc)[:200]})") from None
    missing = {"image_name", "prediction"} - set(frame.columns)
    if missing:
        raise ArchiveError(f"{where}: {path.name} lacks the column(s) {', '.join(sorted(missing))}")
    values = pd.to_numeric(frame["prediction"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ArchiveError(f"{where}: {path.name} row {row + 2}: prediction is not a probability in [0, 1]")
    frame["prediction"] = values
    if "target" in frame.columns:
        target = pd.to_numeric(frame["target"], errors="coerce")
        bad = ~(frame["target"].isna() | target.isin([0, 1]))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ArchiveError(f"{where}: {path.name} row {row + 2}: target is neither 0, 1 nor empty")
        frame["target"] = target
    return frame


def _threshold(value, where: Path) -> float | None:
    """The manifest's threshold as a float in [0, 1] (or None); ArchiveError otherwise."""
    if value is None:
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0.0 <= threshold <= 1.0:
        raise ArchiveError(f"{where}: {MANIFEST} gives the threshold {value!r}; a threshold is a number in [0, 1]")
    return threshold


def import_run(
    store, path, *, dataset: str | int | None = None, max_bytes: int | None = None, check_model: bool = True
) -> dict:
    """Verify a run archive, unpack it under ``MELREVIEW_HOME/runs`` and register the run; returns a summary.

    Parameters
    ----------
    store : melcore.store.Store
    path : path
        The archive written by :func:`export_run`.
    dataset : str or int, optional
        Dataset to attach the run to (name or id). Default: the registered dataset of the name
        the manifest records, else none (the run is then listed but not tied to a dataset).
    max_bytes : int, optional
        Largest total unpacked size (default :data:`DEFAULT_MAX_BYTES` or ``MELREVIEW_IMPORT_MAX_BYTES``).
    check_model : bool
        Load every ``.keras`` file in Keras safe mode before registering (refused if one does not load).

    Returns
    -------
    dict
        ``run_id``, ``run_dir``, ``dataset`` (name or None), ``predictions`` ({split: rows}), ``manifest``.
    """
    path = Path(path).expanduser()
    limit = _max_bytes(max_bytes)
    target_dataset = None
    if dataset is not None:
        target_dataset = store.get_dataset(int(dataset) if str(dataset).isdigit() else str(dataset))
    manifest, archive = verify_archive(path, limit)
    with archive:
        info = manifest["run"]
        threshold = _threshold(info.get("threshold"), path)
        if dataset is None and info.get("dataset"):
            target_dataset = store.find_dataset(str(info["dataset"]))
        runs_root = settings.subdir("runs")
        tmp = Path(tempfile.mkdtemp(prefix=".import-", suffix=".tmp", dir=runs_root))
        try:
            _unpack(archive, manifest, tmp, limit, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        if check_model:
            _check_model(tmp)
        frames = {
            split: _read_predictions(tmp / filename, path)
            for split, filename in PREDICTION_FILES
            if (tmp / filename).is_file()
        }
        label = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(info.get("model") or "run"))[:40]
        final = runs_root / f"import-{label}-{uuid.uuid4().hex[:8]}"
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    config = dict(info["config"]) if isinstance(info.get("config"), dict) else {}
    config.setdefault("model", info.get("model"))
    config.setdefault("clinic", info.get("clinic"))
    metrics = dict(info["metrics"]) if isinstance(info.get("metrics"), dict) else {}
    metrics.setdefault("kind", str(info.get("kind") or "image"))
    note = (
        f"imported from {path.name} (exported by melreview {manifest.get('melreview_version', 'unknown')}"
        f"{', dataset ' + repr(info['dataset']) if info.get('dataset') else ''})"
    )
    try:
        run_id = record_run(
            store,
            RecordedRun(config=config, metrics=metrics, run_dir=final),
            dataset_id=target_dataset["id"] if target_dataset else None,
            name=str(info.get("name") or final.name),
            notes="; ".join(str(n) for n in (info.get("notes"), note) if n),
            threshold=threshold,
            predictions=frames,
        )
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return {
        "run_id": run_id,
        "run_dir": final,
        "dataset": target_dataset["name"] if target_dataset else None,
        "predictions": {split: len(frame) for split, frame in frames.items()},
        "manifest": manifest,
    }
