"""Score: upload one lesion image and get a run's melanoma probability with its Grad-CAM overlay.

Layout only; the scoring is :func:`melcore.predict.score_upload`. A run's model is
loaded once per server process (cached by run directory and the model file's
modification time and size, so a retrained model is loaded again); a result is
cached by the upload's content, the run, TTA and method, so moving the opacity
slider only re-blends the overlay.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import streamlit as st

from melcore.browse import run_threshold
from melcore.colour import COLOUR_MODEL_FILE
from melcore.errors import ImageError, MelcoreError
from melcore.explain import DETAILS
from melcore.formatting import format_risk, format_threshold
from melcore.images import DEFAULT_MAX_UPLOAD_BYTES
from melcore.predict import in_model_thread, score_upload, warm_up_in_background
from melcore.runinfo import run_title, scratch_reason, scratch_words, uses_colour_model
from melcore.safety import escape_markdown
from melcore.settings import warm_up_enabled
from ui.common import page_start, record_run, restore_run, show_error
from ui.widgets import colour_outline

K = "score_"  # session-state prefix of this page
METHODS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}


def _model_file(run: dict) -> Path | None:
    run_dir = run.get("run_dir")
    if not run_dir:
        return None
    path = Path(run_dir).expanduser()
    if path.suffix == ".keras":
        return path
    return path / "model.keras"


def _has_model(run: dict) -> bool:
    path = _model_file(run)
    return path is not None and path.is_file()


@st.cache_resource(show_spinner="Loading the model (once per run)...", max_entries=4)
def _model(model_file: str, mtime_ns: int, size: int):
    from melcore.explain import load_run_model

    # The process-wide model that Grad-CAM on the other pages and the warm-up use too
    return in_model_thread(load_run_model, model_file)


@st.cache_data(show_spinner=False, max_entries=16)
def _score(
    digest: str,
    model_file: str,
    mtime_ns: int,
    tta: bool,
    method: str,
    name: str,
    _model,
    _data: bytes,
    detail: str = "standard",
):
    # A run that delivers a colour/shape model's scores needs its folder, not just the CNN.
    has_colour = (Path(model_file).parent / COLOUR_MODEL_FILE).is_file()
    return in_model_thread(
        score_upload, model_file if has_colour else _model, _data, name, tta=tta, method=method, detail=detail
    )


def _run_label(run: dict, datasets: dict) -> str:
    parts = [run_title(run)]
    if run.get("dataset_id") in datasets:
        parts.append(f"dataset {datasets[run['dataset_id']]}")
    if not _has_model(run):
        parts.append("MODEL FILE MISSING")
    return " · ".join(parts)


def _result(result, run: dict, threshold: float, opacity: float, detail: str = "standard") -> None:
    above = result.probability >= threshold
    cols = st.columns([1, 1, 2], vertical_alignment="center")
    cols[0].metric("Probability of melanoma", format_risk(result.probability, threshold, 3))
    if getattr(result, "scorer", "cnn") == "colour-model":
        cols[0].caption(
            f"From the run's colour/shape model; its CNN says {result.cnn_probability:.3f} "
            "(the Grad-CAM below explains the CNN)."
        )
    # No metric delta: Streamlit draws an up arrow for any text that does not start with "-".
    cols[1].metric("Run threshold", format_threshold(threshold))
    cols[1].caption("At or above: flag" if above else "Below the threshold")
    with cols[2]:
        if above:
            st.error(
                f"At or above run #{run['id']}'s threshold ({format_threshold(threshold)}): this lesion would "
                "be flagged for review or biopsy."
            )
        else:
            st.success(f"Below run #{run['id']}'s threshold ({format_threshold(threshold)}).")
        if result.tta:
            views = result.view_probabilities
            spread = f"mean of {len(views)} flips/transposes (range {views.min():.3f}-{views.max():.3f})"
            if getattr(result, "scorer", "cnn") == "colour-model":
                st.caption(
                    f"Test-time augmentation applies to the CNN only: its {spread} is "
                    f"{result.cnn_probability:.3f}. The headline {result.probability:.3f} is the colour/"
                    "shape model's, which scores the image once."
                )
            else:
                st.caption(f"Test-time augmentation: {spread}.")
        st.caption(
            f"The model sees the image squashed to {result.input_size[0]}×{result.input_size[1]} px, as in "
            "training. A research model, not a diagnosis."
        )
    left, right = st.columns(2)
    left.image(result.image, caption="Uploaded image", width="stretch")
    if result.heatmap is not None:
        right.image(
            result.overlay(opacity),
            width="stretch",
            caption=f"{METHODS.get(result.method, result.method)} (opacity {opacity:.2f}"
            f"{', fine detail' if detail == 'fine' else ''}): red = regions "
            "that raised the melanoma score",
        )
    if getattr(result, "scorer", "cnn") == "colour-model":
        with left:
            colour_outline(result.image)


def main() -> None:
    store = page_start(
        "Score",
        "Upload a dermoscopy image (JPEG or PNG) and score it with a trained run: the probability "
        "of melanoma, whether it is above the run's decision threshold, and where the model "
        "looked (Grad-CAM).",
    )
    runs = [r for r in store.list_runs() if (r.get("kind") or "image") == "image" and r.get("run_dir")]
    if not runs:
        st.info("No trained image model yet: train one on the Train page, then score uploads here.")
        return
    runs.sort(key=lambda r: (not _has_model(r), -int(r["id"])))  # runs with a model first, newest first
    datasets = {d["id"]: d["name"] for d in store.list_datasets()}
    by_id = {int(r["id"]): r for r in runs}
    restore_run(K + "run", by_id)
    run_id = st.selectbox("Run", list(by_id), key=K + "run", format_func=lambda i: _run_label(by_id[i], datasets))
    record_run(run_id)
    run = by_id[run_id]
    threshold = run_threshold(run)
    scratch = scratch_words(run)
    if scratch and not uses_colour_model(run):
        st.warning(
            f"This run was {scratch}"
            + (f": {escape_markdown(run['notes'])}" if run.get("notes") and scratch_reason(run) != "chosen" else "")
            + ". Its scores are usually less reliable than a pretrained model's."
        )
    if run.get("threshold") is None:
        st.caption(
            f"No threshold saved for this run: using the default {format_threshold(threshold)} (save one on "
            "the Compare page)."
        )
    model_file = _model_file(run)
    if not model_file.is_file():
        st.error(
            f"Run #{run['id']} has no model file: {escape_markdown(model_file)} does not exist (the run was "
            "cancelled before saving a model, or its folder was moved or deleted). Choose another run."
        )
        return

    upload = st.file_uploader(
        "Lesion image (JPEG or PNG, at most 20 MB)", type=["jpg", "jpeg", "png"], key=K + "upload"
    )
    cols = st.columns([1, 2, 2], vertical_alignment="bottom")
    tta = cols[0].toggle(
        "TTA (8 flips/transposes)",
        key=K + "tta",
        help="Average the probability over the 8 flips and transposes of the image (8x slower).",
    )
    method = cols[1].radio("Explanation", list(METHODS), format_func=METHODS.get, horizontal=True, key=K + "method")
    opacity = cols[2].slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key=K + "opacity")
    detail = st.radio(
        "Grad-CAM detail",
        list(DETAILS),
        format_func=DETAILS.get,
        horizontal=True,
        key=K + "detail",
        help="Fine explains an earlier, higher-resolution feature map that every path to the score "
        "still passes through.",
    )
    if warm_up_enabled():  # the model loads and traces while the user picks a file
        warm_up_in_background(model_file, method, detail)
    if upload is None:
        return

    data = upload.getvalue()
    name = upload.name
    if len(data) > DEFAULT_MAX_UPLOAD_BYTES:
        st.error(
            f"{escape_markdown(name)}: the file is {len(data) / 2**20:.1f} MB; the limit is "
            f"{DEFAULT_MAX_UPLOAD_BYTES / 2**20:.0f} MB. Resize or re-compress the image."
        )
        return
    try:
        stat = model_file.stat()
        model = _model(str(model_file), stat.st_mtime_ns, stat.st_size)
        with st.spinner(f"Scoring {name}" + (" with 8-view TTA" if tta else "") + "..."):
            result = _score(
                hashlib.sha256(data).hexdigest(),
                str(model_file),
                stat.st_mtime_ns,
                bool(tta),
                method,
                name,
                _model=model,
                _data=data,
                detail=detail,
            )
    except ImageError as exc:
        st.error(f"{escape_markdown(name)} cannot be scored: {escape_markdown(exc.reason)}")
        return
    except (MelcoreError, OSError) as exc:
        show_error(exc, f"Run #{run['id']}'s model cannot score the upload")
        return
    if not np.isfinite(result.probability):
        st.error("The model returned no valid probability (NaN) for this image; the model file may be damaged.")
        return
    _result(result, run, threshold, opacity, detail)


main()
