"""The Score page (pages/score.py) driven by Streamlit's AppTest with a real (tiny, untrained) model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import page_helpers  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from page_helpers import run, texts
from PIL import Image
from streamlit.testing.v1 import AppTest

from melcore.store import Store


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from melcore.models import build_model

    run_dir = tmp_path_factory.mktemp("basic-cnn-run")
    model, _ = build_model("basic-cnn", 32)
    model.save(run_dir / "model.keras")
    return run_dir


@pytest.fixture
def runs(model_dir, tmp_path):
    store = Store()
    good = store.add_run(
        "basic-cnn scratch",
        model_dir,
        model="basic-cnn",
        threshold=0.2,
        from_scratch=True,
        notes="ImageNet weights unavailable: trained from scratch",
    )
    gone = tmp_path / "cancelled-run"
    gone.mkdir()
    missing = store.add_run("cancelled", gone, model="efficientnet-b3")
    return {"store": store, "good": good, "missing": missing}


def png_bytes(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def open_page() -> AppTest:
    return page_helpers.open_page("score.py")


def probability(at: AppTest) -> float:
    return float(next(m.value for m in at.metric if m.label == "Probability of melanoma"))


def test_upload_shows_probability_threshold_and_gradcam(runs, model_dir):
    from melcore.explain import load_run_model
    from melcore.images import read_upload
    from melcore.predict import predict_images

    at = open_page()
    assert at.selectbox(key="score_run").value == runs["good"]  # runs with a model come first
    assert "trained from scratch" in at.selectbox(key="score_run").format_func(runs["good"])
    assert "trained from scratch" in texts(at.warning)
    assert at.file_uploader(key="score_upload").allowed_type == [".jpg", ".jpeg", ".png"]
    data = png_bytes()
    at.file_uploader(key="score_upload").upload("lesion.png", data, "image/png")
    run(at)
    value = probability(at)
    assert 0.0 <= value <= 1.0
    expected = predict_images(load_run_model(model_dir), read_upload(data, size=32)[None])[0]
    assert value == pytest.approx(expected, abs=1e-3)
    captions = [c for image in at.image for c in image.captions]
    assert any("Uploaded image" in c for c in captions)
    assert any(c.startswith("Grad-CAM") for c in captions)
    flagged = value >= 0.2
    assert ("At or above" in texts(at.error)) == flagged
    assert ("Below" in texts(at.success)) == (not flagged)

    at.radio(key="score_method").set_value("gradcam++")
    at.slider(key="score_opacity").set_value(0.8)
    run(at)
    captions = [c for image in at.image for c in image.captions]
    assert any(c.startswith("Grad-CAM++ (opacity 0.80)") for c in captions)
    assert probability(at) == pytest.approx(value, abs=1e-6)
    coarse = [image for image in at.image if any(c.startswith("Grad-CAM++") for c in image.captions)][0]
    at.radio(key="score_detail").set_value("fine")
    run(at)
    captions = [c for image in at.image for c in image.captions]
    assert any(c.startswith("Grad-CAM++ (opacity 0.80, fine detail)") for c in captions)
    fine = [image for image in at.image if any(c.startswith("Grad-CAM++") for c in image.captions)][0]
    assert fine.proto.imgs[0].url != coarse.proto.imgs[0].url  # another map, not the same picture
    assert probability(at) == pytest.approx(value, abs=1e-6)


def test_tta_toggle_averages_eight_views(runs, model_dir):
    from melcore.explain import load_run_model
    from melcore.images import read_upload
    from melcore.predict import predict_images

    data = png_bytes(seed=3)
    at = open_page()
    at.file_uploader(key="score_upload").upload("lesion.png", data, "image/png")
    at.toggle(key="score_tta").set_value(True)
    run(at)
    assert "mean of 8 flips/transposes" in texts(at.caption)
    expected = predict_images(load_run_model(model_dir), read_upload(data, size=32)[None], tta=True)[0]
    assert probability(at) == pytest.approx(expected, abs=1e-3)
    at.toggle(key="score_tta").set_value(False)
    run(at)
    assert "mean of 8" not in texts(at.caption)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"Patient list\nname,age\nA,54\n" * 3, "not a JPEG or PNG image"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>>", "PDF"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
    ],
)
def test_a_file_that_is_not_an_image_gets_a_clear_message(runs, content, expected):
    at = open_page()
    at.file_uploader(key="score_upload").upload("renamed.png", content, "image/png")
    run(at)
    message = texts(at.error)
    assert "renamed.png cannot be scored" in message and expected in message
    assert not [m for m in at.metric if m.label == "Probability of melanoma"]


def test_a_run_without_its_model_file_gets_a_clear_message(runs):
    at = open_page()
    label = at.selectbox(key="score_run").format_func(runs["missing"])
    assert "MODEL FILE MISSING" in label
    at.selectbox(key="score_run").set_value(runs["missing"])
    run(at)
    assert "has no model file" in texts(at.error)
    assert not at.file_uploader


def test_a_damaged_model_file_gets_a_clear_message(tmp_path):
    run_dir = tmp_path / "damaged"
    run_dir.mkdir()
    (run_dir / "model.keras").write_bytes(b"half-copied model file")
    Store().add_run("damaged", run_dir, model="basic-cnn")
    at = open_page()
    at.file_uploader(key="score_upload").upload("lesion.png", png_bytes(), "image/png")
    run(at)
    message = texts(at.error)
    assert "model cannot score the upload" in message and "not a Keras" in message
    assert not [m for m in at.metric if m.label == "Probability of melanoma"]


def test_no_trained_run_says_what_to_do():
    Store().add_run("meta only", None, kind="meta")
    at = open_page()
    assert "No trained image model yet" in texts(at.info)


def _disc_image(size: int = 64, radius: int = 14, pigment=(70, 40, 30)) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = (205, 160, 140)
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2] = pigment
    return image


def test_outline_overlay_draws_the_measured_region():
    from melcore.colour import outline_overlay

    image = _disc_image(size=128, radius=30)
    overlay, fallback = outline_overlay(image)
    assert not fallback and overlay.shape == image.shape and overlay.dtype == np.uint8
    changed = np.argwhere(np.any(overlay != image, axis=2))
    distance = np.hypot(changed[:, 0] - 64, changed[:, 1] - 64)
    assert len(changed) > 100 and np.all(np.abs(distance - 30) <= 5)  # on the disc's edge, nowhere else
    assert np.all(overlay[changed[:, 0], changed[:, 1]] == (0, 255, 255))
    _, flat_fallback = outline_overlay(np.full((64, 64, 3), 180, np.uint8))
    assert flat_fallback  # nothing to separate from the skin: the centred disc, and the page says so


def test_a_colour_model_run_shows_the_outline_it_measured(model_dir, tmp_path):
    import shutil

    from melcore.colour import COLOUR_MODEL_FILE, ColourModel, colour_feature_matrix

    run_dir = tmp_path / "colour-run"
    shutil.copytree(model_dir, run_dir)
    images = [_disc_image(radius=r, pigment=(p, 40, 30)) for r in (8, 10, 12, 14, 16, 18) for p in (40, 90)]
    labels = np.array([0, 1] * 6)
    ColourModel().fit(colour_feature_matrix(images), labels).save(run_dir / COLOUR_MODEL_FILE)
    store = Store()
    run_id = store.add_run("cpu-default", run_dir, model="cnn-bn", threshold=0.5)
    at = open_page()
    at.selectbox(key="score_run").set_value(run_id)
    run(at)
    buffer = io.BytesIO()
    Image.fromarray(_disc_image()).save(buffer, format="PNG")
    at.file_uploader(key="score_upload").upload("lesion.png", buffer.getvalue(), "image/png")
    run(at)
    assert not at.exception
    assert "From the run's colour/shape model" in texts(at.caption)
    captions = [c for image in at.image for c in image.captions]
    assert any("inside the cyan outline" in c for c in captions)
    headline = probability(at)
    at.toggle(key="score_tta").set_value(True)
    run(at)
    caption = next(c for c in texts(at.caption).splitlines() if "Test-time augmentation" in c)
    assert "applies to the CNN only" in caption and f"headline {headline:.3f}" in caption
    assert not any(m.proto.delta for m in at.metric)  # no "↑ below" arrow


def test_warm_up_starts_when_the_page_opens_and_the_upload_uses_its_model(runs, model_dir, monkeypatch):
    from melcore import explain, predict

    monkeypatch.setenv("MELREVIEW_WARM_UP", "1")
    explain.clear_caches()
    key = predict._warm_key(model_dir, "gradcam", "standard")
    predict._WARMING.pop(key, None)
    from melcore import models

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda path, *a, **k: loads.append(path) or real_load(path, *a, **k))
    at = run(open_page())
    assert not at.exception
    warming = predict._WARMING.get(key)
    assert warming is not None, "opening the Score page did not queue the model's warm-up"
    assert warming.result(timeout=300) is not None and len(loads) == 1
    at.file_uploader(key="score_upload").upload("lesion.png", png_bytes(seed=3), "image/png")
    run(at)
    assert not at.exception and 0.0 <= probability(at) <= 1.0
    assert len(loads) == 1, "the upload loaded the model again instead of using the warmed one"
    assert predict.warm_up_in_background(model_dir) is warming  # once per process and model file


def test_reruns_keep_the_loaded_models_graphs_and_new_uploads_score_as_in_a_plain_process(runs, model_dir, monkeypatch):
    # Streamlit's runner calls keras.backend.clear_session() after each run unless the app stops it
    # (ui.common.keep_keras_between_reruns); that clears TensorFlow's kernel cache and every loaded
    # model's next call builds and optimises its graphs again.
    from tensorflow.python.eager import context

    from melcore.explain import load_run_model
    from melcore.images import read_upload
    from melcore.predict import predict_images

    cleared = []
    original = context.Context.clear_kernel_cache
    monkeypatch.setattr(context.Context, "clear_kernel_cache", lambda self: cleared.append(1) or original(self))
    at = open_page()
    model = load_run_model(model_dir)
    for seed in range(3):
        data = png_bytes(seed=seed)
        at.file_uploader(key="score_upload").upload(f"lesion-{seed}.png", data, "image/png")
        run(at)
        expected = predict_images(model, read_upload(data, size=32)[None])[0]
        assert probability(at) == pytest.approx(expected, abs=1e-3)
    assert cleared == []
