"""Streamlit widgets shared by the pages: lesion tiles, a patient's strip, the lesion panel.

Layout only: the data comes from :mod:`melcore.browse` (lesion rows, scores) and
:mod:`melcore.images` / :mod:`melcore.explain` (pixels). Every widget takes a
``key`` prefix from which all of its inner widget keys derive, so the same widget
can appear twice on a page (and tests can address its parts).

Public API
----------
``lesions`` below is a DataFrame with one row per image and at least
``image_name`` and ``image_path`` (str or None, from the cohort table); optional
columns used when present: ``risk`` (the run's score), ``ugly_duckling``,
``target``, ``site``, ``age_approx``, ``lesion_id``. ``PatientBrowser.patient_lesions``
returns exactly this. ``roots`` is ``melcore.browse.dataset_roots(dataset)``: image
files are read only when they resolve inside these folders.

thumbnail_grid(lesions, *, key, roots, threshold=None, columns=4, size=160, page_size=24,
               selected=None) -> str | None
    Tiles in the order given (sort first), paginated (only the current page's
    thumbnails are read, from the on-disk ImageCache), each with score badges
    (risk vs threshold, ugly-duckling, malignant label, STAND-IN when the file is
    missing) and an "Open" button (key ``f"{key}_open_{image_name}"``). Returns the
    image_name whose button was clicked in this run, else None.

patient_strip(lesions, *, key, roots, current=None, threshold=None, size=96, max_items=8) -> str | None
    One row of small tiles of the patient's lesions other than ``current``, with a
    risk badge and an "Open" button (key ``f"{key}_open_{image_name}"``). Returns
    the clicked image_name, else None.

lesion_panel(lesion, *, key, roots, runs=(), store=None, scores=None, threshold=None,
             image_size=448, gradcam=True, stacked=False, default_run=None) -> str
    One lesion: the image (or a clearly marked stand-in), metadata, the scores of
    every run (``melcore.browse.image_scores(store, image_name, runs)`` unless
    ``scores`` is given), and the Grad-CAM overlay for a run with a saved model
    (run choice ``f"{key}_gc_run"``, method ``f"{key}_gc_method"`` gradcam /
    gradcam++, opacity ``f"{key}_gc_opacity"``, toggle ``f"{key}_gc_show"``),
    computed on demand with a spinner and cached; ``default_run`` (a run id) is the
    model preselected for Grad-CAM, e.g. the run under review. ``scores`` (optional)
    has the columns of ``image_scores``: run_id, run, model, kind, clinic, split,
    score, threshold, flagged. ``lesion`` is a mapping (a row of
    the lesions DataFrame, e.g. ``PatientBrowser.lesion(name)``). ``stacked=True``
    puts everything in one column (for a narrow side column); by default image and
    Grad-CAM sit left of metadata and scores. Returns the image status: "ok",
    "missing", "refused" or "unreadable".

load_tile(image_path, image_name, roots, size) -> Tile
    The bytes to show for an image (its cached thumbnail, else a stand-in) with
    ``status`` ("ok", "missing", "refused", "unreadable") and ``message``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import streamlit as st

from melcore import explain, predict, settings
from melcore.browse import DEFAULT_THRESHOLD, image_scores, paginate
from melcore.classes import MELANOMA, ClassNames
from melcore.errors import ImageError, MelcoreError
from melcore.formatting import as_finite, format_risk, format_threshold
from melcore.images import ImageCache, confine, load_image, stand_in_image, thumbnail
from melcore.runinfo import gradcam_caveats, run_title
from melcore.safety import escape_markdown
from ui.common import record_choice, restore_choice

__all__ = ["Tile", "lesion_panel", "load_tile", "patient_strip", "thumbnail_grid"]

STAND_IN_NOTE = "STAND-IN: image file not found"
GRADCAM_METHODS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}
UGLY_DUCKLING_ALERT = 2.0  # z above which a lesion is marked as unlike the patient's others
TRUTH_FIELDS = ("target", "diagnosis", "benign_malignant")  # what a reader in a study must not see


# --------------------------------------------------------------------------- images


@st.cache_resource(show_spinner=False)
def _image_cache_for(home: str) -> ImageCache:
    return ImageCache(Path(home) / "cache" / "images")


def image_cache() -> ImageCache:
    """The on-disk thumbnail/resize cache under the current MELREVIEW_HOME (one object per home)."""
    return _image_cache_for(str(settings.home()))


@lru_cache(maxsize=512)
def _stand_in_jpeg(image_name: str, size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(stand_in_image(image_name, size)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@dataclass
class Tile:
    """What to show for one image: JPEG ``data``, ``status`` ("ok", "missing", "refused",
    "unreadable"), a ``message`` for the user (empty when ok) and the confined ``path`` (None unless ok)."""

    data: bytes
    status: str
    message: str
    path: Path | None


def _present(value) -> bool:
    if value is None:
        return False
    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):
        return True


def resolve_image(image_path, roots: Sequence) -> tuple[Path | None, str, str]:
    """``(confined path or None, status, message)`` for an image path of the cohort table."""
    if not _present(image_path) or str(image_path) == "":
        return None, "missing", "image file not found"
    try:
        path = confine(str(image_path), roots)
    except ImageError as exc:
        return None, "refused", f"refused: {exc.reason}"
    if not path.is_file():
        return None, "missing", "image file not found"
    return path, "ok", ""


def load_tile(image_path, image_name: str, roots: Sequence, size: int) -> Tile:
    """The thumbnail of an image confined to ``roots`` (via the on-disk cache), else a stand-in."""
    path, status, message = resolve_image(image_path, roots)
    if path is not None:
        try:
            return Tile(thumbnail(path, size, cache=image_cache()), "ok", "", path)
        except ImageError as exc:
            status, message = "unreadable", f"unreadable image: {exc.reason}"
    return Tile(_stand_in_jpeg(str(image_name), int(size)), status, message, None)


# --------------------------------------------------------------------------- badges


def _label(target, classes: ClassNames | None = None) -> str | None:
    """The class word of a target (the dataset's own: "melanoma" / "not melanoma", or malignant / benign)."""
    if not _present(target):
        return None
    word = (classes or MELANOMA).label(target)
    return None if word == "unlabelled" else word


def badges(row: Mapping, threshold: float | None, status: str = "ok", classes: ClassNames | None = None) -> str:
    """Markdown badges for a lesion: risk (red at/above the threshold), ugly duckling, label, stand-in."""
    parts = []
    risk = as_finite(row.get("risk"))
    if risk is not None:
        limit = DEFAULT_THRESHOLD if threshold is None else threshold
        colour = "red" if risk >= limit else "green"
        parts.append(f":{colour}-badge[risk {format_risk(risk, limit)}]")
    elif "risk" in row:
        parts.append(":gray-badge[not scored]")
    duck = as_finite(row.get("ugly_duckling"))
    if duck is not None:
        colour = "orange" if duck >= UGLY_DUCKLING_ALERT else "gray"
        parts.append(f":{colour}-badge[UD {duck:+.1f}]")
    classes = classes or MELANOMA
    if _label(row.get("target"), classes) == classes.positive:
        parts.append(f":violet-badge[{classes.positive} (label)]")
    if status == "missing":
        parts.append(":gray-badge[STAND-IN]")
    elif status == "refused":
        parts.append(":red-badge[refused path]")
    elif status == "unreadable":
        parts.append(":gray-badge[unreadable]")
    return " ".join(parts)


def _caption(row: Mapping) -> str:
    bits = [str(row.get("image_name"))]
    if _present(row.get("site")):
        bits.append(str(row["site"]))
    age = as_finite(row.get("age_approx"))
    if age is not None:
        bits.append(f"{age:g} y")
    return " · ".join(bits)


# --------------------------------------------------------------------------- grid and strip


def _clamp_page(state_key: str, n_pages: int) -> None:
    value = st.session_state.get(state_key)
    if value is not None and not 1 <= int(value) <= n_pages:
        st.session_state[state_key] = 1


def thumbnail_grid(
    lesions: pd.DataFrame,
    *,
    key: str,
    roots: Sequence,
    threshold: float | None = None,
    columns: int = 4,
    size: int = 160,
    page_size: int = 24,
    selected: str | None = None,
    classes: ClassNames | None = None,
) -> str | None:
    """Lesion tiles with score badges; the image_name whose "Open" button was clicked, else None."""
    if lesions is None or len(lesions) == 0:
        st.info("No lesion images to show.")
        return None
    page_key = f"{key}_page"
    n_pages = max(1, math.ceil(len(lesions) / page_size))
    page_number = 1
    if n_pages > 1:
        _clamp_page(page_key, n_pages)
        page_number = st.number_input(
            f"Page (of {n_pages}, {page_size} images each)", min_value=1, max_value=n_pages, step=1, key=page_key
        )
    page = paginate(lesions, page_number, page_size)
    clicked = None
    rows = page.frame.to_dict("records")
    for start in range(0, len(rows), columns):
        cells = st.columns(columns)
        for cell, row in zip(cells, rows[start : start + columns]):
            name = str(row["image_name"])
            tile = load_tile(row.get("image_path"), name, roots, size)
            with cell.container(border=True):
                st.image(tile.data, width="stretch")
                st.markdown(badges(row, threshold, tile.status, classes) or "&nbsp;")
                st.caption(escape_markdown(_caption(row) + (f" · {tile.message}" if tile.message else "")))
                if st.button(
                    "Open",
                    key=f"{key}_open_{name}",
                    width="stretch",
                    type="primary" if name == selected else "secondary",
                ):
                    clicked = name
    if n_pages > 1:
        st.caption(f"Images {page.start + 1}-{page.stop} of {page.total}")
    return clicked


def patient_strip(
    lesions: pd.DataFrame,
    *,
    key: str,
    roots: Sequence,
    current: str | None = None,
    threshold: float | None = None,
    size: int = 96,
    max_items: int = 8,
    per_row: int = 4,
    classes: ClassNames | None = None,
) -> str | None:
    """Small tiles of the patient's other lesions; the clicked image_name, else None."""
    others = lesions[lesions["image_name"].astype(str) != str(current)] if current is not None else lesions
    if len(others) == 0:
        st.caption("This patient has no other lesion images.")
        return None
    shown = others.iloc[:max_items].to_dict("records")
    clicked = None
    # Rows of at most four tiles: the strip often sits in a half-width column, where eight
    # side by side leave no room for the badges and buttons.
    cells = [cell for start in range(0, len(shown), per_row) for cell in st.columns(per_row)]
    for cell, row in zip(cells, shown):
        name = str(row["image_name"])
        tile = load_tile(row.get("image_path"), name, roots, size)
        with cell:
            st.image(tile.data, width="stretch")
            st.markdown(
                badges({k: row.get(k) for k in ("risk", "target")}, threshold, tile.status, classes) or "&nbsp;"
            )
            if st.button("Open", key=f"{key}_open_{name}", width="stretch", help=name):
                clicked = name
    if len(others) > max_items:
        st.caption(f"+ {len(others) - max_items} more lesion image(s) of this patient")
    return clicked


# --------------------------------------------------------------------------- lesion panel


def _metadata(
    lesion: Mapping, status: str, message: str, path: Path | None, classes: ClassNames | None = None
) -> pd.DataFrame:
    age = as_finite(lesion.get("age_approx"))
    label = _label(lesion.get("target"), classes)
    if status == "ok":
        where = str(path)
    elif status == "missing":
        where = "image file not found" + (
            f" ({lesion.get('image_path')})" if _present(lesion.get("image_path")) else ""
        )
    else:
        where = message
    fields = [
        ("image", lesion.get("image_name")),
        ("patient", lesion.get("patient_id") if _present(lesion.get("patient_id")) else lesion.get("patient")),
        ("lesion", lesion.get("lesion_id")),
        ("sex", lesion.get("sex")),
        ("age", f"{age:g}" if age is not None else None),
        ("site", lesion.get("site")),
        ("diagnosis", lesion.get("diagnosis")),
        ("label", label or "unlabelled"),
        ("clinic", lesion.get("clinic")),
        ("image file", where),
    ]
    return pd.DataFrame(
        {"field": [f for f, _ in fields], "value": [str(v) if _present(v) else "unknown" for _, v in fields]}
    )


def _scores_table(scores: pd.DataFrame, runs: Sequence[Mapping] = ()) -> pd.DataFrame:
    """One row per run: the run named by what scores it, its split, score, threshold (as everywhere) and call."""
    by_id = {int(r["id"]): r for r in runs}
    table = scores.copy()
    table["run"] = [
        run_title(by_id[int(i)]) if int(i) in by_id else f"#{i} {n}" for i, n in zip(table["run_id"], table["run"])
    ]
    table["split"] = table["split"].map({"val": "validation", "oof": "out-of-fold"}).fillna(table["split"])
    table["threshold"] = [format_threshold(t) for t in table["threshold"]]
    table["call"] = np.where(table["flagged"], "at or above threshold", "below threshold")
    return table[["run", "score", "threshold", "call", "split"]]


def _has_model(run: Mapping) -> bool:
    run_dir = run.get("run_dir")
    if not run_dir:
        return False
    path = Path(run_dir)
    return (path / "model.keras").is_file() or (path.suffix == ".keras" and path.is_file())


@st.cache_data(show_spinner=False, max_entries=256)
def _heatmap(
    run_dir: str, model_signature: tuple, image_path: str, image_signature: tuple, method: str, detail: str = "standard"
) -> np.ndarray:
    return predict.in_model_thread(explain.explain_image, run_dir, image_path, method, detail=detail)[1]


def _signature(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


#: Session-state key prefix of the Grad-CAM settings shared by every page's lesion panel.
GRADCAM_STATE = "melreview_gradcam_"


def _opacity(text: str) -> float:
    """An opacity from the URL: a number in [0, 1] on the slider's 0.05 steps (ValueError otherwise)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"opacity {value} is outside 0-1")
    return round(round(value / 0.05) * 0.05, 2)


def _gradcam_section(
    lesion: Mapping,
    path: Path | None,
    runs: Sequence[Mapping],
    key: str,
    default_run: int | None = None,
    classes: ClassNames | None = None,
) -> None:
    st.markdown("**Grad-CAM**")
    candidates = [r for r in runs if (r.get("kind") or "image") == "image" and _has_model(r)]
    if not candidates:
        st.info("Grad-CAM not available: no run of this dataset has a saved model (model.keras).")
        return
    if path is None:
        st.info("Grad-CAM needs the image file, which is not available for this lesion.")
        return
    labels = {int(r["id"]): run_title(r) for r in candidates}
    ids = list(labels)
    # The settings follow the user across pages and reloads (session state and ?gc_...= in the URL).
    restore_choice(f"{key}_gc_show", GRADCAM_STATE + "show", "gc_show", (True, False), lambda v: v == "1")
    restore_choice(f"{key}_gc_run", GRADCAM_STATE + "run", "gc_run", ids, int)
    restore_choice(f"{key}_gc_method", GRADCAM_STATE + "method", "gc_method", list(GRADCAM_METHODS))
    restore_choice(f"{key}_gc_opacity", GRADCAM_STATE + "opacity", "gc_opacity", None, _opacity)
    restore_choice(f"{key}_gc_detail", GRADCAM_STATE + "detail", "gc_detail", list(explain.DETAILS))
    st.session_state.setdefault(f"{key}_gc_run", default_run if default_run in ids else ids[0])
    st.session_state.setdefault(f"{key}_gc_opacity", 0.4)
    # Controls in rows of their own: they stay legible when the panel sits in a half-width column.
    show = st.toggle("Show the overlay", key=f"{key}_gc_show", help="Compute (once, then cached) and show it")
    run_id = st.selectbox("Model", ids, format_func=labels.get, key=f"{key}_gc_run")
    bottom = st.columns(2, vertical_alignment="bottom")
    method = bottom[0].radio(
        "Method", list(GRADCAM_METHODS), format_func=GRADCAM_METHODS.get, horizontal=True, key=f"{key}_gc_method"
    )
    opacity = bottom[1].slider("Opacity", 0.0, 1.0, step=0.05, key=f"{key}_gc_opacity")
    detail = st.radio(
        "Detail",
        list(explain.DETAILS),
        format_func=explain.DETAILS.get,
        horizontal=True,
        key=f"{key}_gc_detail",
        help="Fine explains an earlier, higher-resolution feature map that every path to the score "
        "still passes through (e.g. 28x28 instead of 7x7 for EfficientNet-Lite0 at 224 px).",
    )
    record_choice(GRADCAM_STATE + "show", "gc_show", bool(show), lambda v: "1" if v else "0")
    record_choice(GRADCAM_STATE + "run", "gc_run", int(run_id))
    record_choice(GRADCAM_STATE + "method", "gc_method", method)
    record_choice(GRADCAM_STATE + "opacity", "gc_opacity", float(opacity), lambda v: f"{v:.2f}")
    record_choice(GRADCAM_STATE + "detail", "gc_detail", detail)
    run = next(r for r in candidates if int(r["id"]) == run_id)
    if settings.warm_up_enabled():  # the model loads and traces while the user looks at the lesion
        predict.warm_up_in_background(run["run_dir"], method, detail)
    if not show:
        st.caption("Switch on to compute the overlay (a few seconds the first time for each model and image).")
        return
    try:
        model_file = explain.model_path(run["run_dir"])
        with st.spinner(f"Computing {GRADCAM_METHODS[method]} for {lesion.get('image_name')}..."):
            heat = _heatmap(str(run["run_dir"]), _signature(model_file), str(path), _signature(path), method, detail)
        image = load_image(path, heat.shape, cache=image_cache())
        caveats = gradcam_caveats(run)
        picture = explain.flag_picture(explain.overlay(image, heat, opacity=opacity), caveats)
    except (MelcoreError, OSError) as exc:
        st.error(f"Grad-CAM failed: {escape_markdown(exc)}")
        return
    st.image(
        picture,
        caption=f"{GRADCAM_METHODS[method]} ({explain.DETAILS[detail].split(' (')[0].lower()}) · "
        f"{labels[run_id]} · red = raised the {(classes or MELANOMA).positive} score most in this image (each "
        "heatmap is normalised per image: colours do not compare across images)",
        width="stretch",
    )
    if caveats:
        st.warning(escape_markdown("; ".join(c[:1] + c[1:].lower() for c in caveats)) + ".")
    if colour_model_of(run["run_dir"]):
        colour_outline(load_image(path, 256, cache=image_cache()))


def colour_model_of(run_dir) -> bool:
    """Whether a run delivers the scores of a colour/texture/shape model (``rundir.run_scorer``)."""
    from melcore.training.rundir import run_scorer

    return bool(run_dir) and run_scorer(run_dir) == "colour-model"


def colour_outline(image: np.ndarray) -> None:
    """The lesion outline a colour-model run measured, under a note that its Grad-CAM explains the CNN."""
    from melcore.colour import outline_overlay

    try:
        picture, fallback = outline_overlay(image)
    except MelcoreError as exc:
        st.caption(f"Colour-model outline not available: {escape_markdown(exc)}")
        return
    st.image(
        picture,
        width="stretch",
        caption="This run's score comes from its colour/texture/shape model, which measures the region "
        "inside the cyan outline and the skin around it (the Grad-CAM explains the run's CNN)."
        + (" No lesion could be separated from the skin: the model measured a centred disc." if fallback else ""),
    )


def lesion_panel(
    lesion: Mapping,
    *,
    key: str,
    roots: Sequence,
    runs: Sequence[Mapping] = (),
    store=None,
    scores: pd.DataFrame | None = None,
    threshold: float | None = None,
    image_size: int = 448,
    gradcam: bool = True,
    stacked: bool = False,
    default_run: int | None = None,
    show_truth: bool = True,
    classes: ClassNames | None = None,
) -> str:
    """One lesion in full: image, metadata, Grad-CAM, then every run's score across the panel's width.

    Returns the image status. ``classes``: the dataset's class names (default melanoma /
    not melanoma). ``show_truth=False`` (a reader study) leaves out the lesion's label and diagnosis.
    """
    name = str(lesion.get("image_name"))
    tile = load_tile(lesion.get("image_path"), name, roots, image_size)
    if not show_truth:
        lesion = {k: v for k, v in dict(lesion).items() if k not in TRUTH_FIELDS}
    st.markdown(f"#### {escape_markdown(name)}  \n" + badges(lesion, threshold, tile.status, classes))
    if stacked:
        left = right = st.container()
    else:
        left, right = st.columns(2)
    with left:
        if tile.status == "ok":
            st.image(tile.data, width="stretch")
        else:
            st.image(
                tile.data,
                width="stretch",
                caption=f"{STAND_IN_NOTE}" if tile.status == "missing" else f"STAND-IN: {tile.message}",
            )
            if tile.status == "refused":
                st.error(f"Image not shown: {escape_markdown(tile.message)}")
            elif tile.status == "unreadable":
                st.warning(f"Image not shown: {escape_markdown(tile.message)}")
            else:
                st.warning("Stand-in picture: the image file was not found, so this is not the lesion.")
        if gradcam:
            _gradcam_section(lesion, tile.path, runs, key, default_run, classes)
    with right:
        st.markdown("**Metadata**")
        metadata = _metadata(lesion, tile.status, tile.message, tile.path, classes)
        if not show_truth:
            metadata = metadata[~metadata["field"].isin(("label", "diagnosis"))]
        st.dataframe(metadata, hide_index=True, width="stretch", key=f"{key}_metadata")
        duck = as_finite(lesion.get("ugly_duckling"))
        if duck is not None:
            st.caption(
                f"Ugly duckling {duck:+.2f}: how far this lesion's score sits from the patient's other "
                "lesions, in units of their spread (positive = looks worse than the others)."
            )
    # Full width below both columns: the run names need the room.
    with st.container():
        st.markdown("**Scores from every run**")
        if scores is None and store is not None and runs:
            try:
                scores = image_scores(store, name, runs)
            except MelcoreError as exc:
                st.error(f"Scores not available: {escape_markdown(exc)}")
                scores = None
        if scores is None or len(scores) == 0:
            st.caption(
                "No run of this dataset has scored this image."
                if runs or scores is not None
                else "No run of this dataset yet."
            )
        else:
            st.dataframe(
                _scores_table(scores, runs),
                hide_index=True,
                width="stretch",
                key=f"{key}_scores",
                column_config={
                    "run": st.column_config.TextColumn("run", width="large"),
                    "score": st.column_config.ProgressColumn("score", min_value=0.0, max_value=1.0, format="%.3f"),
                },
            )
            unscored = len(runs) - len(scores) if runs else 0
            if unscored > 0:
                st.caption(f"{unscored} other run(s) did not score this image (e.g. it was in their training data).")
    return tile.status
