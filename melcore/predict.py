"""Batch scoring with a trained run: a cohort, a folder of images or an array.

Every function returns the melanoma probability of each image (float in [0, 1]).
With ``tta=True`` the probability is the mean over the 8 flips / transposes of the
image (the dihedral group of the square: 4 rotations, each with and without a
transpose), the usual SIIM-ISIC 2020 test-time augmentation; it costs 8 model
passes per image.

Bad images (missing, corrupt, not an image) are handled by ``on_error``:

* ``"raise"`` (default in the library): stop at the first bad file with an
  :class:`~melcore.errors.ImageError` naming it;
* ``"skip"``: leave the image out of the result and list it, with the reason, in
  ``result.attrs["skipped"]`` (a list of ``(image_name, reason)``). The ``predict``
  command uses this: it writes the other rows, prints every skipped file and
  exits with status 1.

:func:`write_submission` writes the Kaggle SIIM-ISIC submission format
``image_name,target`` (target = probability), one row per image.

Models are the ``model.keras`` files of :mod:`melcore.training` runs (raw RGB 0..255
in, one sigmoid probability out); the image size is read from the model's input.

Colour model: when the run directory holds ``colour_model.json``
(:data:`melcore.colour.COLOUR_MODEL_FILE`, written by runs trained with
``TrainConfig.colour_model``, e.g. the ``cpu-default`` preset), :func:`predict_cohort`,
:func:`predict_folder` and :func:`score_upload` deliver the colour model's probability
as ``prediction`` and keep the CNN's as ``cnn_prediction``. The run is recognised from a
Run, a run directory, its ``model.keras`` file, or a model returned by
:func:`load_run_model` for one of those. :func:`predict_images`, :func:`predict_paths`
and :func:`predict_batch` always give the CNN's probability.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from melcore import colour
from melcore.cohorts.image_files import IMAGE_EXTENSIONS
from melcore.errors import ConfigError, ImageError, MelcoreError
from melcore.safety import inside

__all__ = [
    "N_TTA_VIEWS",
    "dihedral_views",
    "load_run_model",
    "run_colour_model",
    "model_image_size",
    "predict_batch",
    "predict_images",
    "predict_paths",
    "predict_dataset",
    "predict_cohort",
    "predict_folder",
    "write_submission",
    "list_image_files",
    "in_model_thread",
    "warm_up",
    "warm_up_in_background",
]

log = logging.getLogger("melcore.predict")

#: Number of test-time augmentation views (the dihedral group of the square).
N_TTA_VIEWS = 8
DEFAULT_BATCH_SIZE = 32
ON_ERROR = ("raise", "skip")

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- test-time augmentation


def dihedral_views(batch: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms of a batch of square images.

    Parameters
    ----------
    batch : np.ndarray, shape (b, s, s, c)

    Returns
    -------
    list of 8 arrays of the same shape: rotations by 0, 90, 180, 270 degrees, then
    the same four applied to the transposed images. The first view is ``batch`` itself.
    """
    if batch.ndim != 4 or batch.shape[1] != batch.shape[2]:
        raise MelcoreError(f"test-time augmentation needs square images (b, s, s, c), got shape {batch.shape}")
    views = []
    for base in (batch, batch.transpose(0, 2, 1, 3)):
        for k in range(4):
            views.append(np.ascontiguousarray(np.rot90(base, k, axes=(1, 2))))
    return views


def _tta_stack(batch: np.ndarray) -> np.ndarray:
    """(b, s, s, c) -> (8 * b, s, s, c): view-major stack of :func:`dihedral_views`."""
    return np.concatenate(dihedral_views(batch), axis=0)


def _tta_mean(probabilities: np.ndarray, b: int) -> np.ndarray:
    """(8 * b,) view-major probabilities -> (b,) means."""
    return probabilities.reshape(N_TTA_VIEWS, b).mean(axis=0)


# --------------------------------------------------------------------------- models


def load_run_model(run_or_dir):
    """The Keras model of a run.

    Parameters
    ----------
    run_or_dir : melcore.training.rundir.Run, a run directory (holding ``model.keras``), or a
        ``.keras`` file, or an already loaded ``keras.Model`` (returned as is).

    Raises
    ------
    ConfigError
        No ``model.keras`` in the folder, or a file that does not load.
    """
    if hasattr(run_or_dir, "predict") and hasattr(run_or_dir, "layers"):
        return run_or_dir
    from melcore.models import load_model

    run_dir = getattr(run_or_dir, "run_dir", run_or_dir)
    path = Path(run_dir).expanduser()
    if path.is_dir():
        candidate = path / "model.keras"
        if not candidate.is_file():
            raise ConfigError(
                f"{path} holds no model.keras; pass a run directory written by "
                "'python -m melcore train' (a cancelled run may have none)"
            )
        path = candidate
    elif not path.exists():
        raise ConfigError(f"model {path} not found; pass a run directory or a .keras file")
    model = load_model(path)
    _remember_run_dir(model, path.parent)
    return model


# Models loaded by load_run_model -> their run directory (so a loaded model still finds
# the run's colour model). Weak keys: the entry goes with the model.
_RUN_DIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _remember_run_dir(model, run_dir: Path) -> None:
    try:
        _RUN_DIRS[model] = Path(run_dir)
    except TypeError:  # not weak-referenceable or not hashable: the colour model is then not found
        pass


def run_colour_model(run_or_dir):
    """The run's :class:`melcore.colour.ColourModel`, or None when the run has none.

    ``run_or_dir`` as for :func:`load_run_model`: a Run, a run directory, its
    ``model.keras`` file, or a model loaded by :func:`load_run_model` from one of those.
    Raises MelcoreError when ``colour_model.json`` exists but does not load.
    """
    run_dir = None
    try:
        run_dir = _RUN_DIRS.get(run_or_dir)
    except TypeError:
        pass
    if run_dir is None:
        candidate = getattr(run_or_dir, "run_dir", run_or_dir)
        if not isinstance(candidate, (str, os.PathLike)):
            return None
        path = Path(candidate).expanduser()
        run_dir = path if path.is_dir() else path.parent
    path = Path(run_dir) / colour.COLOUR_MODEL_FILE
    if not path.is_file():
        return None
    return colour.ColourModel.load(path)


def model_image_size(model) -> int:
    """Square input side (pixels) the model expects."""
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
        raise ConfigError(
            f"model {model.name!r} takes input {shape}; expected square RGB images (batch, size, size, 3)"
        )
    return int(shape[1])


# --------------------------------------------------------------------------- core scoring


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r}; valid values: {', '.join(ON_ERROR)}")


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def predict_batch(model, batch: np.ndarray, tta: bool = False) -> np.ndarray:
    """Probabilities of one in-memory batch.

    Parameters
    ----------
    model : keras.Model from :mod:`melcore.models`
    batch : np.ndarray, shape (b, s, s, 3), uint8 or float in 0..255
    tta : bool
        Mean over the 8 dihedral views.

    Returns
    -------
    np.ndarray float64, shape (b,)
    """
    b = len(batch)
    x = np.asarray(batch, dtype="float32")
    if tta:
        x = _tta_stack(x)
    out = np.asarray(model.predict_on_batch(x), dtype="float64").reshape(-1)
    return _tta_mean(out, b) if tta else out


def predict_images(
    model,
    images_uint8: np.ndarray,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> np.ndarray:
    """Melanoma probability of each image of an in-memory array (the CNN's, never a run's colour model).

    Parameters
    ----------
    model : keras.Model (or a run / run directory, loaded with :func:`load_run_model`)
    images_uint8 : np.ndarray, shape (n, s, s, 3), uint8 RGB (floats in 0..255 are accepted)
        ``s`` must be the model's input size.
    tta : bool
        Mean over the 8 dihedral views (8 model passes per image).
    batch_size : int
        Images per model call (with TTA, 8 x this many views).
    progress : callable(done, total), optional

    Returns
    -------
    np.ndarray float64, shape (n,), values in [0, 1].
    """
    model = load_run_model(model)
    batch_size = _check_batch_size(batch_size)
    images = np.asarray(images_uint8)
    size = model_image_size(model)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ConfigError(
            f"images have shape {images.shape}; this model takes (n, {size}, {size}, 3) "
            f"RGB arrays (load them with melcore.images.load_images(paths, {size}))"
        )
    n = len(images)
    out = np.empty(n, dtype="float64")
    if progress is not None:
        progress(0, n)
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        out[start : start + len(chunk)] = predict_batch(model, chunk, tta=tta)
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return out


def predict_dataset(
    model,
    dataset,
    n_images: int,
    batch_sizes: Sequence[int],
    tta: bool,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    per_batch: bool = False,
) -> np.ndarray | None:
    """Probabilities (float64, shape (n_images,)) for a PyDataset of image batches; None when stopped.

    ``batch_sizes`` lists the images in each batch of ``dataset`` (needed to average the
    TTA views batch by batch); ``progress(done, total)`` counts images.

    Goes through ``model.predict`` (not per-batch calls) so a tf.distribute strategy
    the model was built under splits the batches across replicas correctly. Stops
    within one batch when ``should_stop()`` turns true (Keras' ``stop_predicting``).
    With ``per_batch`` the model is called on each batch instead (``model(x, training=False)``),
    for a model built under MultiWorkerMirroredStrategy, where ``model.predict`` cannot run
    and every worker holds the same weights.
    """
    import keras

    source = _tta_batches(dataset) if tta else dataset
    if per_batch:
        return _predict_per_batch(model, source, n_images, batch_sizes, tta, progress, should_stop)
    stopped = [False]
    done = [0]

    class _Monitor(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            done[0] += batch_sizes[batch] if batch < len(batch_sizes) else 0
            if progress is not None:
                progress(min(done[0], n_images), n_images)
            if should_stop is not None and should_stop():
                stopped[0] = True
                self.model.stop_predicting = True

    if should_stop is not None and should_stop():
        return None
    raw = model.predict(source, verbose=0, callbacks=[_Monitor()])
    if stopped[0] and done[0] < n_images:
        return None
    raw = np.asarray(raw, dtype="float64").reshape(-1)
    expected = n_images * (N_TTA_VIEWS if tta else 1)
    if raw.shape[0] != expected:
        raise MelcoreError(
            f"the model returned {raw.shape[0]} predictions for {expected} inputs; expected one probability per image"
        )
    if not tta:
        return raw
    parts, offset = [], 0
    for b in batch_sizes:
        parts.append(_tta_mean(raw[offset : offset + N_TTA_VIEWS * b], b))
        offset += N_TTA_VIEWS * b
    return np.concatenate(parts) if parts else np.empty(0, dtype="float64")


def _predict_per_batch(
    model, source, n_images: int, batch_sizes: Sequence[int], tta: bool, progress, should_stop
) -> np.ndarray | None:
    """:func:`predict_dataset` by one ``model(x, training=False)`` call per batch of ``source``."""
    parts, done = [], 0
    for index in range(len(source)):
        if should_stop is not None and should_stop():
            return None
        raw = np.asarray(model(np.asarray(source[index], dtype="float32"), training=False), dtype="float64")
        raw = raw.reshape(-1)
        size = batch_sizes[index] if index < len(batch_sizes) else len(raw) // (N_TTA_VIEWS if tta else 1)
        parts.append(_tta_mean(raw, size) if tta else raw)
        done += size
        if progress is not None:
            progress(min(done, n_images), n_images)
    out = np.concatenate(parts) if parts else np.empty(0, dtype="float64")
    if out.shape[0] != n_images:
        raise MelcoreError(
            f"the model returned {out.shape[0]} predictions for {n_images} images; expected one probability per image"
        )
    return out


def _tta_batches(base):
    """A PyDataset whose batch i is the 8 dihedral views of ``base[i]``, stacked view-major."""
    import keras

    class TTABatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(
                workers=getattr(base, "workers", 1),
                use_multiprocessing=False,
                max_queue_size=getattr(base, "max_queue_size", 8),
            )

        def __len__(self):
            return len(base)

        def __getitem__(self, index):
            return _tta_stack(np.asarray(base[index], dtype="float32"))

    return TTABatches()


def predict_paths(
    model,
    paths: Sequence,
    *,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache=None,
    workers: int | None = None,
) -> np.ndarray | None:
    """Probabilities for image files (all must be readable: check them first).

    Returns
    -------
    np.ndarray float64, shape (len(paths),), or None when ``should_stop()`` stopped it.
    """
    from melcore.pipeline import PredictionBatches

    model = load_run_model(model)
    batch_size = _check_batch_size(batch_size)
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    if n == 0:
        return np.empty(0, dtype="float64")
    size = model_image_size(model)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    dataset = PredictionBatches(paths, size, batch_size=batch_size, cache=cache, workers=workers)
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return predict_dataset(model, dataset, n, sizes, tta, progress=progress, should_stop=should_stop)


def _check_readable(
    names: list[str], paths: list, size: int, on_error: str, cache, progress: Progress | None
) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode every image once (filling the cache); (positions of good images, skipped)."""
    from melcore import images

    _check_on_error(on_error)
    skipped: list[tuple[str, str]] = []
    good: list[int] = []
    present = []
    for i, path in enumerate(paths):
        if path is None or (isinstance(path, float) and math.isnan(path)) or str(path) == "":
            if on_error == "raise":
                raise ImageError(names[i], "image file not found")
            skipped.append((names[i], "image file not found"))
        else:
            present.append(i)
    bad: dict[int, str] = {}

    def failed(index: int, error: ImageError) -> None:
        bad[present[index]] = error.reason

    chunk = 256
    total = len(present)
    for start in range(0, total, chunk):
        part = present[start : start + chunk]
        images.load_images(
            [paths[i] for i in part],
            size,
            cache=cache,
            on_error="raise"
            if on_error == "raise"
            else (lambda index, error, offset=start: failed(offset + index, error)),
        )
        if progress is not None:
            progress(min(start + chunk, total), total)
    for i in present:
        if i in bad:
            skipped.append((names[i], bad[i]))
        else:
            good.append(i)
    return good, skipped


def _score_table(
    model, names: list[str], paths: list, *, tta: bool, batch_size: int, progress: Progress | None, on_error: str
) -> pd.DataFrame:
    from melcore.images import ImageCache

    colour_model = run_colour_model(model)
    model = load_run_model(model)
    size = model_image_size(model)
    cache = ImageCache()
    n = len(names)
    # Two phases with one progress scale: decoding counts as the first third.
    check_progress = (lambda d, t: progress(int(d * n / max(t, 1) / 3), n)) if progress else None
    good, skipped = _check_readable(names, paths, size, on_error, cache, check_progress)
    score_progress = None
    if progress is not None:
        score_progress = lambda d, t: progress(n // 3 + int(d * (n - n // 3) / max(t, 1)), n)  # noqa: E731
    scores = predict_paths(
        model, [paths[i] for i in good], tta=tta, batch_size=batch_size, progress=score_progress, cache=cache
    )
    scores = scores if scores is not None else np.empty(0)
    result = pd.DataFrame({"image_name": [names[i] for i in good], "prediction": scores})
    if colour_model is not None:
        result["prediction"] = (
            colour.colour_probabilities(colour_model, [paths[i] for i in good], cache=cache) if good else np.empty(0)
        )
        result["cnn_prediction"] = scores
    result.attrs["skipped"] = skipped
    if progress is not None:
        progress(n, n)
    return result


def predict_cohort(
    run_or_dir,
    cohort,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    on_error: str = "raise",
) -> pd.DataFrame:
    """Score every image of a cohort (labelled or not), in table order.

    Parameters
    ----------
    run_or_dir : Run, run directory, ``.keras`` file or keras.Model
    cohort : melcore.cohort.Cohort
    tta : bool
        Mean over the 8 dihedral views.
    batch_size : int
    progress : callable(done, total), optional
        ``total`` is the number of rows; called at least at the start and the end.
    on_error : "raise" or "skip"
        Rows whose image is missing or unreadable: ImageError naming the file, or left
        out and listed in ``result.attrs["skipped"]`` as ``(image_name, reason)``.

    Returns
    -------
    pandas.DataFrame with columns image_name (str), prediction (float64 in [0, 1]), one
    row per scored image, in the cohort's order. When the run has a colour model,
    ``prediction`` is its probability and ``cnn_prediction`` the CNN's (module docstring).
    """
    table = cohort.table
    names = table["image_name"].astype(str).tolist()
    paths = table["image_path"].tolist()
    return _score_table(
        run_or_dir,
        names,
        paths,
        tta=tta,
        batch_size=_check_batch_size(batch_size),
        progress=progress,
        on_error=on_error,
    )


def list_image_files(folder, recursive: bool = False) -> list[Path]:
    """Image files of a folder (by extension: jpg, jpeg, png, bmp, tif, tiff, webp), sorted by name.

    Symbolic links that resolve outside ``folder`` are left out (never read).

    Raises
    ------
    ConfigError
        Not a folder, no image files, or two files with the same name stem
        (``a.jpg`` and ``a.png`` would give two rows named ``a``).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder of images")
    pattern = root.rglob("*") if recursive else root.iterdir()
    files = sorted(
        (
            p
            for p in pattern
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not p.name.startswith(".")
            and inside(p, [root]) is not None
        ),
        key=lambda p: (p.stem, str(p)),
    )
    if not files:
        raise ConfigError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise ConfigError(
                f"two images are named {path.stem!r} ({seen[path.stem]} and {path}); image names must be unique"
            )
        seen[path.stem] = path
    return files


def predict_folder(
    run_or_dir,
    folder,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    on_error: str = "raise",
    recursive: bool = False,
) -> pd.DataFrame:
    """Score every image file of a folder (see :func:`list_image_files`).

    Returns
    -------
    pandas.DataFrame image_name (the file name without extension), prediction (float64)
    (plus ``cnn_prediction`` when the run has a colour model, see :func:`predict_cohort`),
    sorted by image_name; skipped files in ``result.attrs["skipped"]`` with ``on_error="skip"``.
    """
    files = list_image_files(folder, recursive=recursive)
    return _score_table(
        run_or_dir,
        [p.stem for p in files],
        [str(p) for p in files],
        tta=tta,
        batch_size=_check_batch_size(batch_size),
        progress=progress,
        on_error=on_error,
    )


def write_submission(predictions: pd.DataFrame, path) -> Path:
    """Write ``image_name,target`` (target = probability), one row per image (Kaggle format).

    Parameters
    ----------
    predictions : DataFrame with image_name and prediction (or target) columns.
    path : output CSV; parent folders are created.
    """
    column = "prediction" if "prediction" in predictions.columns else "target"
    if "image_name" not in predictions.columns or column not in predictions.columns:
        raise ConfigError("predictions need the columns image_name and prediction")
    if predictions["image_name"].duplicated().any():
        dup = predictions.loc[predictions["image_name"].duplicated(), "image_name"].iloc[0]
        raise ConfigError(f"image {dup!r} appears twice in the predictions; one row per image is required")
    out = pd.DataFrame(
        {"image_name": predictions["image_name"].astype(str), "target": predictions[column].astype("float64")}
    )
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    out.to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, path)
    return path


_PREVIEW_SIDE = 512  # longest side of the uploaded image as shown on the Score page


# --------------------------------------------------------------------------- scoring an upload


@dataclass
class UploadScore:
    """The result of :func:`score_upload`.

    Attributes
    ----------
    probability : float in [0, 1]
        Melanoma probability: the run's colour model's when it has one (``scorer`` is then
        ``"colour-model"``), else the CNN's (the mean over the 8 views with TTA).
    view_probabilities : np.ndarray float64 (8,) or (1,)
        The CNN's probability per TTA view (or the single plain prediction).
    tta : bool
    input_size : (height, width)
        The model's input size; the image was squashed to it, as in training.
    image : np.ndarray (h, w, 3) uint8
        The upload for display (aspect kept, longest side at most 512 px).
    heatmap : np.ndarray (input_size) float32 in [0, 1], or None
        Grad-CAM map at the model's input size (None when not requested).
    method : str or None
    cnn_probability : float
        The CNN's probability (mean of ``view_probabilities``); the heatmap explains it.
    scorer : str
        ``"cnn"`` or ``"colour-model"``: which model gave :attr:`probability`.
    """

    probability: float
    view_probabilities: np.ndarray
    tta: bool
    input_size: tuple
    image: np.ndarray
    heatmap: np.ndarray | None = None
    method: str | None = None
    cnn_probability: float | None = None
    scorer: str = "cnn"

    def overlay(self, opacity: float = 0.4, colormap: str = "jet") -> np.ndarray:
        """The heatmap blended over :attr:`image` (uint8, the image's size); MelcoreError without a heatmap."""
        from melcore.explain import overlay

        if self.heatmap is None:
            raise MelcoreError("no Grad-CAM heatmap was computed for this upload")
        return overlay(self.image, self.heatmap, opacity=opacity, colormap=colormap)


def score_upload(
    model,
    data,
    name: str | None = None,
    *,
    tta: bool = False,
    method: str | None = "gradcam",
    detail: str = "standard",
    max_bytes: int | None = None,
) -> UploadScore:
    """Score one uploaded JPEG/PNG with a run's model, and explain it.

    Parameters
    ----------
    model : keras.Model, run directory or ``.keras`` file
        A path is loaded with :func:`melcore.explain.load_run_model` (once per process).
        When the run has a colour model (:func:`run_colour_model`), it gives
        ``probability``; the upload is then written to a temporary file and decoded as
        training images are (:func:`melcore.colour.colour_features_of_files`).
    data : bytes or a file-like object (e.g. Streamlit's UploadedFile)
        Checked by :func:`melcore.images.read_upload`: anything but a readable JPEG or
        PNG raises ImageError saying what the bytes look like.
    name : str, optional
        The upload's name for messages.
    tta : bool
        Mean over the 8 flips / transposes (:func:`melcore.predict.dihedral_views`),
        the same as ``predict_images(model, image, tta=True)``; costs 8 model passes.
    method : {"gradcam", "gradcam++", "scorecam"} or None
        Heatmap method; None skips the heatmap.
    detail : {"standard", "fine"}
        Heatmap resolution (:func:`melcore.explain.detail_layer`).
    max_bytes : int, optional
        Upload size limit (default :data:`melcore.images.DEFAULT_MAX_UPLOAD_BYTES`, 20 MB).

    Returns
    -------
    UploadScore

    Raises
    ------
    ImageError
        Empty, too large, not a JPEG/PNG, corrupt, too many pixels.
    MelcoreError
        No model file at the path, a model that does not load, an unknown method.
    """
    from melcore import explain
    from melcore.images import DEFAULT_MAX_UPLOAD_BYTES, read_upload_views

    if method is not None and method not in explain.METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; choose one of {', '.join(explain.METHODS)}")
    limit = DEFAULT_MAX_UPLOAD_BYTES if max_bytes is None else int(max_bytes)
    raw = data if isinstance(data, (bytes, bytearray, memoryview)) else None
    if raw is None:
        name = name or getattr(data, "name", None)
        raw = data.getvalue() if hasattr(data, "getvalue") else data.read(limit + 1)
    raw = bytes(raw)
    colour_model = run_colour_model(model)
    if not (hasattr(model, "predict") and hasattr(model, "layers")):
        model = explain.load_run_model(model)
    size = model_image_size(model)
    # One decode, reduced to the working size: the model's input (squashed, as training images are) and the preview
    image, preview = read_upload_views(raw, size, _PREVIEW_SIDE, name=name, max_bytes=limit)
    if tta:
        views = np.stack(dihedral_views(image[None])).reshape((-1, size, size, 3))
        per_view = predict_images(model, views, tta=False)
    else:
        per_view = predict_images(model, image[None], tta=False)
    heatmap = None
    if method is not None:
        heatmap = explain.get_explainer(model, method, explain.detail_layer(model, detail)).heatmap(image)
    cnn_probability = float(np.mean(per_view))
    probability, scorer = cnn_probability, "cnn"
    if colour_model is not None:
        probability, scorer = _colour_probability_of_bytes(colour_model, raw), "colour-model"
    return UploadScore(
        probability=probability,
        view_probabilities=np.asarray(per_view, "float64"),
        tta=bool(tta),
        input_size=(size, size),
        image=preview,
        heatmap=heatmap,
        method=method,
        cnn_probability=cnn_probability,
        scorer=scorer,
    )


def _colour_probability_of_bytes(colour_model, raw: bytes) -> float:
    """The colour model's probability of an (already validated) upload, via a temporary file.

    Going through a file keeps the decoder identical to training's (PIL draft + resize in
    :func:`melcore.images.load_images`), so the upload gets the same features as the file would.
    """
    import tempfile

    suffix = ".png" if raw[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
    with tempfile.TemporaryDirectory(prefix="melreview-upload-") as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(raw)
        return float(colour.colour_probabilities(colour_model, [str(path)], cache=None)[0])


# --------------------------------------------------------------------------- the model thread and warm-up

_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()
_MODEL_THREAD: dict = {}  # "ident": the model thread's id, once it has started
_WARMING: dict[tuple, Future] = {}


def _mark_model_thread() -> None:
    _MODEL_THREAD["ident"] = threading.get_ident()


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="melcore-model", initializer=_mark_model_thread
            )
        return _EXECUTOR


def in_model_thread(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on this process's one long-lived model thread; its result (or exception).

    Model work queues there one call behind the other: a page's Grad-CAM or upload asked for
    while :func:`warm_up_in_background` is still loading that model waits for it instead of
    loading and tracing the same model a second time at once, and the short-lived threads
    a web server runs requests on (Streamlit starts one per script run) hold no TensorFlow
    state. A call made on the model thread itself runs at once.
    """
    if _MODEL_THREAD.get("ident") == threading.get_ident():
        return fn(*args, **kwargs)
    return _executor().submit(fn, *args, **kwargs).result()


def _warm_key(run_or_dir, method: str | None, detail: str) -> tuple | None:
    from melcore import explain

    try:
        path = explain.model_path(getattr(run_or_dir, "run_dir", run_or_dir))
        stat = path.stat()
    except (MelcoreError, OSError):
        return None
    return str(path), stat.st_mtime_ns, stat.st_size, method, detail


def warm_up(run_or_dir, method: str | None = "gradcam", detail: str = "standard") -> float:
    """Load a run's model into the process-wide cache and run one blank image through its scoring and
    Grad-CAM graphs, so that the first real upload or heatmap pays neither for loading nor for tracing.

    Parameters
    ----------
    run_or_dir : run directory or ``.keras`` file
    method : {"gradcam", "gradcam++", "scorecam"} or None
        The explainer traced (None: scoring only).
    detail : {"standard", "fine"}

    Returns
    -------
    float
        Seconds taken (imports, loading and tracing).
    """
    from melcore import explain

    start = time.perf_counter()
    model = explain.load_run_model(getattr(run_or_dir, "run_dir", run_or_dir))
    size = model_image_size(model)
    blank = np.full((size, size, 3), 128, dtype=np.uint8)
    predict_images(model, blank[None], tta=False)
    if method is not None:
        explain.get_explainer(model, method, explain.detail_layer(model, detail)).heatmap(blank)
    return time.perf_counter() - start


#: Seconds a background warm-up waits before it starts: the page that asked finishes drawing before
#: TensorFlow's import (seconds of CPU, mostly holding the interpreter lock) competes with it.
WARM_UP_DELAY = 1.5


def _warm_quietly(run_or_dir, method: str | None, detail: str) -> float | None:
    time.sleep(WARM_UP_DELAY)
    try:
        seconds = warm_up(run_or_dir, method, detail)
    except Exception as exc:  # the page's own call reports the error in words
        log.warning("warm-up of %s failed (%s: %s)", run_or_dir, type(exc).__name__, exc)
        return None
    log.info("warmed %s (%s, %s detail) in %.1f s", run_or_dir, method, detail, seconds)
    # TensorFlow's modules, the model and its traced graphs live as long as the process: out of the
    # cyclic garbage collector's reach, its full collections no longer walk them on every request.
    gc.freeze()
    return seconds


def warm_up_in_background(run_or_dir, method: str | None = "gradcam", detail: str = "standard") -> Future | None:
    """Queue :func:`warm_up` on the model thread (:func:`in_model_thread`), once per process for each model
    file (path, mtime, size), method and detail, and return at once.

    Returns the warm-up's Future (its result: seconds taken, or None when the warm-up failed; a second
    call for the same model returns the first one's), or None when the run has no model file. A call
    to :func:`in_model_thread` made meanwhile waits for the warm-up, which does the same work.
    """
    key = _warm_key(run_or_dir, method, detail)
    if key is None:
        return None
    with _EXECUTOR_LOCK:
        future = _WARMING.get(key)
    if future is None:
        future = _executor().submit(_warm_quietly, key[0], method, detail)
        with _EXECUTOR_LOCK:
            future = _WARMING.setdefault(key, future)
    return future
