"""Grad-CAM / Grad-CAM++ explanations (melcore.explain) and the ``gradcam`` command."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cli_helpers import run_main
from PIL import Image

from melcore import explain
from melcore.errors import ImageError, MelcoreError

keras = pytest.importorskip("keras")


TOY_SIZE = 40
SQUARE = (slice(6, 16), slice(6, 16))  # where the toy task's evidence is: a bright 10x10 square


# --------------------------------------------------------------------------- models


def _wrap(backbone, size: int, name: str = "wrapped"):
    """The registry layout with a *nested* backbone: raw RGB -> rescale -> backbone -> GAP -> sigmoid."""
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name=name)


def _plain_cnn(size: int = 32, seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv_a")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, name="conv_b")(x)
    x = keras.layers.BatchNormalization(name="bn_b")(x)
    x = keras.layers.Activation("relu", name="relu_b")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(x)
    return keras.Model(inputs, outputs, name="plain")


@pytest.fixture(scope="module")
def plain_model():
    return _plain_cnn()


@pytest.fixture(scope="module")
def nested_effnet():
    keras.utils.set_random_seed(1)
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(64, 64, 3))
    return _wrap(backbone, 64, name="nested_b0")


def _toy_images(n: int, rng, square_at=SQUARE):
    """Dim noise; every odd image has a bright square at ``square_at`` and is the positive class."""
    x = rng.integers(0, 90, (n, TOY_SIZE, TOY_SIZE, 3)).astype(np.uint8)
    y = (np.arange(n) % 2).astype("float32")
    x[y == 1, square_at[0], square_at[1], :] = 255
    return x, y


@pytest.fixture(scope="module")
def toy_model():
    """A small CNN trained (4 epochs) to say whether a bright square is present."""
    keras.utils.set_random_seed(0)
    x, y = _toy_images(256, np.random.default_rng(0))
    inputs = keras.Input((TOY_SIZE, TOY_SIZE, 3))
    h = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inputs, outputs, name="toy")
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    x_test, y_test = _toy_images(16, np.random.default_rng(1))
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    assert accuracy >= 0.9, f"the toy model did not learn its task (accuracy {accuracy:.2f})"
    return model


@pytest.fixture()
def toy_run(tmp_path, toy_model):
    """A run directory with the toy model saved as model.keras, and one positive image file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    toy_model.save(run_dir / "model.keras")
    x, _ = _toy_images(2, np.random.default_rng(5))
    image_path = tmp_path / "lesion.png"
    Image.fromarray(x[1]).save(image_path)
    return run_dir, image_path


def _random_image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- finding the layer


def test_find_last_conv_layer_plain(plain_model):
    assert explain.find_last_conv_layer(plain_model, follow=False) == "conv_b"
    # Followed through batch norm and activation (same spatial size), not into Flatten.
    assert explain.find_last_conv_layer(plain_model) == "relu_b"


def test_find_last_conv_layer_inside_nested_backbone(nested_effnet):
    assert explain.find_last_conv_layer(nested_effnet) == "efficientnetb0/top_activation"
    assert explain.find_last_conv_layer(nested_effnet, follow=False) == "efficientnetb0/top_conv"


def test_find_last_conv_layer_nested_resnet_and_sequential():
    resnet = _wrap(keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3)), 64)
    assert explain.find_last_conv_layer(resnet) == "resnet50/conv5_block3_out"
    sequential = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.Conv2D(4, 3, name="c2"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    assert explain.find_last_conv_layer(sequential) == "c2"


def test_model_without_convolution_is_refused():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    with pytest.raises(MelcoreError, match="no 2-D convolution"):
        explain.find_last_conv_layer(model)
    with pytest.raises(MelcoreError, match="no 2-D convolution"):
        explain.Explainer(model)


def test_layer_argument_by_name_path_and_unknown(nested_effnet):
    by_name = explain.Explainer(nested_effnet, layer="top_conv")
    assert by_name.layer == "efficientnetb0/top_conv"
    by_path = explain.Explainer(nested_effnet, layer="efficientnetb0/block6a_expand_activation")
    assert by_path.feature_size == (4, 4)  # stride 16 at 64 px, finer than the stride-32 top map
    with pytest.raises(MelcoreError, match="no layer 'nope'.*top_activation"):
        explain.Explainer(nested_effnet, layer="nope")
    with pytest.raises(MelcoreError, match="Grad-CAM needs a \\(batch, height, width, channels\\)"):
        explain.Explainer(nested_effnet, layer=nested_effnet.layers[-1])


# --------------------------------------------------------------------------- heatmaps


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmap_shape_dtype_range(plain_model, method):
    explainer = explain.Explainer(plain_model, method)
    assert explainer.score == "logit"
    heat = explainer.heatmap(_random_image(32))
    assert heat.shape == (32, 32) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() == pytest.approx(1.0) and heat.min() == pytest.approx(0.0)
    # Any image size: resized for the model, heatmap at the image's own size.
    other = explainer.heatmap(np.random.default_rng(3).integers(0, 256, (50, 44, 3), dtype=np.uint8))
    assert other.shape == (50, 44)
    batch = explainer.heatmaps(np.stack([_random_image(32, s) for s in range(3)]))
    assert batch.shape == (3, 32, 32)
    np.testing.assert_allclose(batch[0], heat, atol=1e-5)


def test_bad_images_are_refused(plain_model):
    explainer = explain.Explainer(plain_model)
    with pytest.raises(MelcoreError, match=r"shape \(height, width, 3\)"):
        explainer.heatmap(np.zeros((32, 32), np.uint8))
    with pytest.raises(MelcoreError, match="0..255"):
        explainer.heatmap(np.full((32, 32, 3), 300.0, np.float32))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmap_finds_the_discriminative_square(toy_model, method):
    explainer = explain.Explainer(toy_model, method)
    positives, _ = _toy_images(8, np.random.default_rng(2))
    heat = explainer.heatmaps(positives[1::2])
    inside = np.zeros((TOY_SIZE, TOY_SIZE), bool)
    inside[SQUARE] = True
    mean_in, mean_out = heat[:, inside].mean(), heat[:, ~inside].mean()
    assert mean_in > 4 * mean_out, (mean_in, mean_out)
    mass = heat[:, inside].sum() / heat.sum()
    assert mass > 0.35, mass  # the square is 6% of the image

    # The map follows the evidence: the same square elsewhere moves the heat there.
    moved = (slice(26, 36), slice(24, 34))
    shifted, _ = _toy_images(4, np.random.default_rng(3), square_at=moved)
    heat = explainer.heatmaps(shifted[1::2])
    there = np.zeros((TOY_SIZE, TOY_SIZE), bool)
    there[moved] = True
    assert heat[:, there].mean() > 4 * heat[:, inside].mean()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("which", ["toy", "nested"])
def test_compiled_engine_matches_tf_keras_vis(which, method, toy_model, nested_effnet):
    model, size = (toy_model, TOY_SIZE) if which == "toy" else (nested_effnet, 64)
    ours = explain.Explainer(model, method)
    reference = explain.Explainer(model, method, engine="tf-keras-vis")
    if which == "toy":
        images = _toy_images(4, np.random.default_rng(4))[0][1::2]  # positives: the map is not empty
    else:
        images = np.stack([_random_image(size, 11), _random_image(size, 12)])
    images = images.astype(np.float32)
    a, b = ours._raw_cams(images), reference._raw_cams(images)
    assert a.shape == b.shape == (2,) + ours.feature_size
    for x, y in zip(a, b):  # tf-keras-vis scales Grad-CAM++ by exp(score): compare the normalised maps
        assert x.max() > 0
        np.testing.assert_allclose(x / x.max(), y / y.max(), atol=2e-3)


def test_scorecam_runs_on_tf_keras_vis(toy_model):
    explainer = explain.Explainer(toy_model, "scorecam")
    assert explainer.engine == "tf-keras-vis"
    x, _ = _toy_images(2, np.random.default_rng(6))
    heat = explainer.heatmap(x[1])
    assert heat.shape == (TOY_SIZE, TOY_SIZE)
    inside = np.zeros((TOY_SIZE, TOY_SIZE), bool)
    inside[SQUARE] = True
    assert heat[inside].mean() > heat[~inside].mean()


def test_nested_backbone_heatmap_and_model_untouched(nested_effnet, tmp_path):
    image = _random_image(64, 5)
    weights_before = [w.copy() for w in nested_effnet.get_weights()]
    prediction_before = nested_effnet.predict(image[None].astype(np.float32), verbose=0)

    explainer = explain.get_explainer(nested_effnet, "gradcam++")
    assert explain.get_explainer(nested_effnet, "gradcam++") is explainer  # built once, reused
    assert explain.get_explainer(nested_effnet, "gradcam") is not explainer
    first = explainer.heatmap(image)
    assert first.shape == (64, 64) and 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(explainer.heatmap(image), first)

    dense = nested_effnet.layers[-1]
    assert dense.activation is keras.activations.sigmoid
    for before, after in zip(weights_before, nested_effnet.get_weights()):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(nested_effnet.predict(image[None].astype(np.float32), verbose=0), prediction_before)
    # Still saves and loads as the same model (the explanation graph is not part of it).
    nested_effnet.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert len(reloaded.layers) == len(nested_effnet.layers)
    np.testing.assert_allclose(
        reloaded.predict(image[None].astype(np.float32), verbose=0), prediction_before, rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- colour and overlay


def test_colorize_jet_ends_and_gray():
    colours = explain.colorize(np.array([[0.0, 0.5, 1.0]]), "jet")
    assert colours.dtype == np.uint8 and colours.shape == (1, 3, 3)
    assert tuple(colours[0, 0]) == (0, 0, 128)  # dark blue
    assert tuple(colours[0, 2]) == (128, 0, 0)  # dark red
    assert colours[0, 1, 1] == 255  # green in the middle
    gray = explain.colorize(np.array([[0.0, 1.0]]), "gray")
    assert tuple(gray[0, 0]) == (0, 0, 0) and tuple(gray[0, 1]) == (255, 255, 255)
    turbo = explain.colorize(np.linspace(0, 1, 11)[None], "turbo")
    assert turbo[0, 2, 2] > 200 > turbo[0, 2, 0]  # blue at 0.2
    assert turbo[0, -1, 0] > turbo[0, -1, 2]  # dark red at the top
    with pytest.raises(MelcoreError, match="unknown colour map"):
        explain.colorize(np.zeros((2, 2)), "viridis")


def test_overlay_opacity_extremes_and_blend():
    image = _random_image(16, 1)
    heat = np.random.default_rng(2).random((16, 16)).astype(np.float32)
    np.testing.assert_array_equal(explain.overlay(image, heat, opacity=0.0), image)
    np.testing.assert_array_equal(explain.overlay(image, heat, opacity=1.0), explain.colorize(heat))
    half = explain.overlay(image, heat, opacity=0.5, colormap="turbo").astype(int)
    expected = (image.astype(int) + explain.colorize(heat, "turbo").astype(int)) / 2
    assert np.abs(half - expected).max() <= 0.5 + 1e-9
    # A low-resolution heatmap is upsampled to the image.
    small = explain.overlay(image, np.ones((4, 4), np.float32), opacity=1.0)
    assert small.shape == (16, 16, 3) and (small == explain.colorize(np.ones((1, 1)))[0, 0]).all()
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(MelcoreError, match="opacity"):
            explain.overlay(image, heat, opacity=bad)
    with pytest.raises(MelcoreError, match="NaN"):
        explain.overlay(image, np.full((16, 16), np.nan), opacity=0.5)


# --------------------------------------------------------------------------- explain_image and its cache


def _count_heatmap_calls(monkeypatch) -> list:
    calls = []
    original = explain.Explainer.heatmaps

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(explain.Explainer, "heatmaps", counting)
    return calls


def test_explain_image_caches_on_disk_and_invalidates(toy_run, monkeypatch, melreview_home):
    run_dir, image_path = toy_run
    explain.clear_caches()
    calls = _count_heatmap_calls(monkeypatch)
    steps = []
    picture, heat = explain.explain_image(
        run_dir, image_path, "gradcam", opacity=0.4, progress=lambda d, t: steps.append((d, t))
    )
    assert calls == [1] and steps == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert picture.shape == (TOY_SIZE, TOY_SIZE, 3) and picture.dtype == np.uint8
    assert heat.shape == (TOY_SIZE, TOY_SIZE) and heat.dtype == np.float32
    cached = list((melreview_home / "cache" / "gradcam").rglob("*.npy"))
    assert len(cached) == 1

    # Same model file, image and method: read from disk, nothing recomputed; opacity is free.
    picture2, heat2 = explain.explain_image(run_dir, image_path, "gradcam", opacity=0.4)
    assert calls == [1]
    np.testing.assert_array_equal(heat2, heat)
    np.testing.assert_array_equal(picture2, picture)
    plain = explain.explain_image(run_dir / "model.keras", image_path, "gradcam", opacity=0.0)[0]
    assert calls == [1]
    np.testing.assert_array_equal(plain, np.asarray(Image.open(image_path).convert("RGB")))

    # Another method is another entry.
    explain.explain_image(run_dir, image_path, "gradcam++")
    assert calls == [1, 1]

    # A new model file (retrained: new mtime) is explained again, and reloaded.
    model_file = run_dir / "model.keras"
    stat = model_file.stat()
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    explain.explain_image(run_dir, image_path, "gradcam")
    assert calls == [1, 1, 1]
    # An edited image too.
    Image.fromarray(np.zeros((TOY_SIZE, TOY_SIZE, 3), np.uint8)).save(image_path)
    explain.explain_image(run_dir, image_path, "gradcam")
    assert calls == [1, 1, 1, 1]
    # use_cache=False always recomputes.
    explain.explain_image(run_dir, image_path, "gradcam", use_cache=False)
    assert calls == [1, 1, 1, 1, 1]


def test_explain_image_loads_the_model_once(toy_run, monkeypatch):
    run_dir, image_path = toy_run
    explain.clear_caches()
    loads = []
    original = explain._load_keras_file
    monkeypatch.setattr(explain, "_load_keras_file", lambda path: loads.append(path) or original(path))
    explain.explain_image(run_dir, image_path, "gradcam", use_cache=False)
    explain.explain_image(run_dir, image_path, "gradcam++", use_cache=False)
    assert len(loads) == 1
    assert explain.load_run_model(run_dir) is explain.load_run_model(run_dir / "model.keras")


def test_corrupt_cache_entry_is_recomputed(toy_run, monkeypatch, melreview_home):
    run_dir, image_path = toy_run
    _, heat = explain.explain_image(run_dir, image_path)
    (entry,) = (melreview_home / "cache" / "gradcam").rglob("*.npy")
    entry.write_bytes(b"\x93NUMPY garbage")
    calls = _count_heatmap_calls(monkeypatch)
    _, again = explain.explain_image(run_dir, image_path)
    assert calls == [1]
    np.testing.assert_allclose(again, heat, atol=1e-3)


def test_precompute_heatmaps_fills_the_cache(toy_run, tmp_path, monkeypatch):
    run_dir, image_path = toy_run
    paths = [image_path]
    for i in range(3):
        path = tmp_path / f"extra{i}.png"
        Image.fromarray(_random_image(TOY_SIZE, 20 + i)).save(path)
        paths.append(path)
    paths.append(tmp_path / "missing.jpg")
    assert explain.precompute_heatmaps(run_dir, paths) == 4
    assert explain.precompute_heatmaps(run_dir, paths) == 0
    calls = _count_heatmap_calls(monkeypatch)
    explain.explain_image(run_dir, paths[2])
    assert calls == []


def test_explain_image_errors(tmp_path, toy_run):
    run_dir, image_path = toy_run
    with pytest.raises(MelcoreError, match="no such run directory or model file"):
        explain.explain_image(tmp_path / "nowhere", image_path)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(MelcoreError, match="no model.keras"):
        explain.explain_image(empty, image_path)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(MelcoreError, match="broken.keras"):
        explain.explain_image(broken, image_path)
    with pytest.raises(ImageError, match="not found"):
        explain.explain_image(run_dir, tmp_path / "missing.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageError):
        explain.explain_image(run_dir, text)
    with pytest.raises(MelcoreError, match="unknown explanation method"):
        explain.explain_image(run_dir, image_path, method="lime")


# --------------------------------------------------------------------------- registry models


@pytest.mark.parametrize(
    "name, size, layer",
    [
        ("basic-cnn", 32, "conv4_conv"),
        ("cnn-bn", 32, "conv4_relu"),
        ("efficientnet-b0", 64, "top_activation"),
        ("efficientnet-b0-ns", 64, "top_activation"),
        ("resnet50", 32, "conv4_block6_out"),  # at 32 px conv5 is 1x1, so the last larger map is used
    ],
)
def test_registry_models(name, size, layer):
    models = pytest.importorskip("melcore.models")
    model, _ = models.build_model(name, size)
    assert explain.find_last_conv_layer(model).split("/")[-1] == layer
    explainer = explain.Explainer(model, "gradcam")
    assert explainer.score == "logit"
    heat = explainer.heatmap(_random_image(size, 7))
    assert heat.shape == (size, size) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and 0.0 <= heat.min() and heat.max() <= 1.0


# --------------------------------------------------------------------------- command line


def _cli(*args, capsys):
    """``python -m melcore gradcam ARGS`` in this process (MELREVIEW_HOME: the ``melreview_home`` fixture's)."""
    return run_main(["gradcam", *map(str, args)], capsys)


def test_cli_writes_overlay_png(toy_run, tmp_path, melreview_home, capsys):
    run_dir, image_path = toy_run
    out = tmp_path / "out" / "overlay.png"
    done = _cli(
        "--model",
        run_dir,
        "--image",
        image_path,
        "--method",
        "gradcam++",
        "--opacity",
        "0.5",
        "--out",
        out,
        "--heatmap-out",
        tmp_path / "heat.npy",
        capsys=capsys,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (TOY_SIZE, TOY_SIZE) and written.mode == "RGB"
    heat = np.load(tmp_path / "heat.npy")
    assert heat.shape == (TOY_SIZE, TOY_SIZE) and heat.max() == pytest.approx(1.0)


def test_cli_reports_bad_inputs(toy_run, tmp_path, melreview_home, capsys):
    run_dir, _ = toy_run
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    done = _cli("--model", run_dir, "--image", text, "--out", tmp_path / "o.png", capsys=capsys)
    assert done.returncode == 2 and "notes.jpg" in done.stderr and "Traceback" not in done.stderr
    done = _cli("--model", tmp_path / "nope", "--image", text, "--out", tmp_path / "o.png", capsys=capsys)
    assert done.returncode == 2 and "no such run directory or model file" in done.stderr
    assert not (tmp_path / "o.png").exists()
