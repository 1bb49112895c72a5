"""Model registry: every entry builds, trains, saves/loads; weights files; errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from melcore import models
from melcore.errors import ConfigError

BIG = {"resnet50"} | {f"efficientnet-b{i}{ns}" for i in range(4, 8) for ns in ("", "-ns")}


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    yield
    keras.backend.clear_session()


def _raw_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _numpy(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable)


def _weights(model) -> list[np.ndarray]:
    return [_numpy(w) for w in model.weights]


def _predict(model, x) -> np.ndarray:
    # Eager call: model.predict would trace a graph first (slow for the big EfficientNets).
    return np.asarray(model(x, training=False))


def _one_eager_step(model, x, y) -> float:
    # Eager: tracing a graph of a large EfficientNet costs a minute on 2 CPU cores; one step does not need it.
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="binary_crossentropy", run_eagerly=True)
    return float(np.asarray(model.train_on_batch(x, y)))


def test_registry_has_the_ladder_and_consistent_specs():
    expected = (
        ["basic-cnn", "cnn-bn", "resnet50"]
        + [f"efficientnet-b{i}" for i in range(8)]
        + [f"efficientnet-b{i}-ns" for i in range(8)]
        + [f"efficientnet-lite{i}" for i in range(5)]
    )
    assert models.model_names() == expected
    for name, spec in models.REGISTRY.items():
        assert spec.name == name
        assert spec.min_image_size <= spec.default_image_size <= models.MAX_IMAGE_SIZE
        assert spec.pretrained == (spec.default_weights == "imagenet")
        assert spec.to_dict()["name"] == name


def test_the_spec_is_architecture_and_weights_only():
    recipe_fields = {
        "optimizer",
        "learning_rate",
        "weight_decay",
        "schedule",
        "augment",
        "batch_size",
        "epochs",
        "lr_factor",
    }
    for field in models.ModelSpec.__dataclass_fields__:
        assert not any(word in field for word in recipe_fields), f"ModelSpec.{field} is a training recipe"


# One model per family also goes through model.keras and back (Keras safe mode).
SAVE_LOAD = {"basic-cnn", "cnn-bn", "resnet50", "efficientnet-b0", "efficientnet-b0-ns", "efficientnet-lite0"}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in BIG else name for name in models.REGISTRY]
)
def test_every_model_builds_takes_raw_rgb_and_trains_one_step(name, tmp_path):
    spec = models.get_spec(name)
    size = spec.min_image_size
    model, info = models.build_model(name, size, weights="none")
    assert info.from_scratch and not info.loaded
    assert model.name == name
    assert tuple(model.input.shape) == (None, size, size, 3)
    assert tuple(model.output.shape) == (None, 1)
    assert model.layers[-1].name == models.OUTPUT_LAYER
    # Raw RGB in: the first layer after the input is the backbone's own preprocessing.
    first = model.layers[1]
    if spec.family == "resnet":
        assert isinstance(first, models.ImageNetPreprocessing) and first.mode == "caffe"
    elif spec.family == "efficientnet-ns":
        assert isinstance(first, models.ImageNetPreprocessing) and first.mode == "torch"
    elif spec.family == "efficientnet-lite":  # (x - 127) / 128
        assert isinstance(first, keras.layers.Rescaling) and first.scale == pytest.approx(1 / 128)
        assert first.offset == pytest.approx(-127 / 128)
    else:
        assert isinstance(first, keras.layers.Rescaling) and first.scale == pytest.approx(1 / 255)
    # Flat graph: no nested model, so Grad-CAM reaches the conv layers by name.
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert not any(type(layer).__name__ == "Lambda" for layer in model.layers)
    conv = model.get_layer(models.last_conv_layer_name(model))
    assert len(conv.output.shape) == 4

    x = _raw_images(2, size)
    probabilities = _predict(model, x)
    assert probabilities.shape == (2, 1) and probabilities.dtype == np.float32
    assert np.all((probabilities > 0) & (probabilities < 1))

    head_kernel = _numpy(model.get_layer(models.OUTPUT_LAYER).kernel)
    loss = _one_eager_step(model, x, np.array([0.0, 1.0], dtype="float32"))
    assert np.isfinite(loss)
    assert not np.allclose(head_kernel, _numpy(model.get_layer(models.OUTPUT_LAYER).kernel))

    if name in SAVE_LOAD:
        expected = _predict(model, x)
        path = tmp_path / "model.keras"
        model.save(path)
        loaded = models.load_model(path)
        assert loaded.name == name
        np.testing.assert_allclose(_predict(loaded, x), expected, rtol=1e-5, atol=1e-6)
        assert models.last_conv_layer_name(loaded) == models.last_conv_layer_name(model)


def test_preprocessing_layers_match_the_reference_functions():
    from efficientnet.model import preprocess_input as efficientnet_preprocess

    x = _raw_images(2, 8, seed=3)
    caffe = np.asarray(models.ImageNetPreprocessing("caffe")(x))
    np.testing.assert_allclose(caffe, keras.applications.resnet50.preprocess_input(x.copy()), rtol=1e-5, atol=1e-3)
    torch = np.asarray(models.ImageNetPreprocessing("torch")(x))
    reference = efficientnet_preprocess(
        x.copy(), backend=keras.backend, layers=keras.layers, models=keras.models, utils=keras.utils
    )
    np.testing.assert_allclose(torch, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="mode"):
        models.ImageNetPreprocessing("tf")


def test_saved_models_load_in_a_fresh_process_without_the_efficientnet_package(tmp_path):
    paths = []
    for name in ("cnn-bn", "efficientnet-b0-ns"):
        model, _ = models.build_model(name, 32)
        model.save(tmp_path / f"{name}.keras")
        paths.append(str(tmp_path / f"{name}.keras"))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["efficientnet"] = None  # importing it would fail: the saved files must not need it
        from melcore.models import load_model
        for path in {paths!r}:
            model = load_model(path)
            print(model.name, model.output.shape)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cnn-bn" in result.stdout and "efficientnet-b0-ns" in result.stdout


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        models.load_model(tmp_path / "absent.keras")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    with pytest.raises(ConfigError, match="junk.keras"):
        models.load_model(junk)


@pytest.mark.parametrize(
    "name, file_name",
    [
        ("cnn-bn", "backbone.weights.h5"),
        ("cnn-bn", "backbone.h5"),
        ("efficientnet-b0-ns", "backbone.weights.h5"),  # legacy .h5 EfficientNets: see the reference test
    ],
)
def test_backbone_weights_from_a_local_file(name, file_name, tmp_path):
    source, _ = models.build_model(name, 32)
    path = models.save_backbone_weights(source, tmp_path / file_name)
    model, info = models.build_model(name, 32, weights=str(path))
    assert info.loaded and not info.from_scratch and info.scope == "backbone"
    assert info.source == str(path.resolve())
    for expected, got in zip(_weights(models.backbone_of(source)), _weights(models.backbone_of(model))):
        np.testing.assert_array_equal(got, expected)
    # The head is not in a backbone file: it keeps its fresh random initialisation.
    assert not np.allclose(
        _numpy(source.get_layer(models.OUTPUT_LAYER).kernel), _numpy(model.get_layer(models.OUTPUT_LAYER).kernel)
    )
    if name == "cnn-bn":  # build_backbone shares the loader; one cheap model is enough
        backbone, backbone_info = models.build_backbone(name, 32, weights=path)
        assert backbone_info.scope == "backbone"
        for expected, got in zip(_weights(models.backbone_of(source)), _weights(backbone)):
            np.testing.assert_array_equal(got, expected)


def _reference_backbone(name: str, size: int):
    """The architecture the published weights files were saved from, built by its own library."""
    if name == "efficientnet-b0":
        return keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(size, size, 3))
    if name == "resnet50":
        return keras.applications.ResNet50(include_top=False, weights=None, input_shape=(size, size, 3))
    # qubvel's package as `import efficientnet.tfkeras` builds it (its own swish and FixedDropout),
    # without importing efficientnet.tfkeras, which would register global custom objects.
    import efficientnet.model
    from efficientnet import inject_tfkeras_modules

    return inject_tfkeras_modules(efficientnet.model.EfficientNetB0)(
        include_top=False, weights=None, input_shape=(size, size, 3)
    )


@pytest.mark.parametrize(
    "name", ["efficientnet-b0", "efficientnet-b0-ns", pytest.param("resnet50", marks=pytest.mark.slow)]
)
def test_weights_saved_from_the_reference_architecture_load(name, tmp_path):
    # The published notop .h5 files are legacy weight files of exactly these reference models.
    reference = _reference_backbone(name, 32)
    path = models.save_backbone_weights(reference, tmp_path / "published_style_notop.h5")
    model, info = models.build_model(name, 32, weights=path)
    assert info.scope == "backbone"
    ours = [layer for layer in models.backbone_of(model).layers if layer.weights]
    theirs = [layer for layer in reference.layers if layer.weights]
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs):
        for got, expected in zip(mine.weights, ref.weights):
            np.testing.assert_array_equal(_numpy(got), _numpy(expected))


@pytest.mark.parametrize("file_name", ["model.weights.h5", "model.keras"])
def test_whole_model_weights_from_a_local_file(file_name, tmp_path):
    source, _ = models.build_model("cnn-bn", 32)
    path = tmp_path / file_name
    if file_name.endswith(".keras"):
        source.save(path)
    else:
        source.save_weights(path)
    model, info = models.build_model("cnn-bn", 32, weights=path)
    assert info.scope == "model" and info.loaded
    for expected, got in zip(_weights(source), _weights(model)):
        np.testing.assert_array_equal(got, expected)


def test_keras_efficientnet_normalisation_is_made_exact_when_loading_published_style_weights(tmp_path):
    # The published keras files store the ImageNet std as the Normalization variance.
    source, _ = models.build_model("efficientnet-b0", 32)
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    std = np.array([0.229, 0.224, 0.225], dtype="float32")
    norm.adapt_mean.assign(np.reshape([0.485, 0.456, 0.406], norm.adapt_mean.shape))
    norm.adapt_variance.assign(np.reshape(std, norm.adapt_variance.shape))
    path = models.save_backbone_weights(source, tmp_path / "efficientnetb0_notop.h5")
    model, _ = models.build_model("efficientnet-b0", 32, weights=path)
    loaded = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    np.testing.assert_allclose(_numpy(loaded.adapt_variance).reshape(-1), std**2, rtol=1e-6)
    pixel = np.full((1, 1, 1, 3), 255.0 * 0.485 + 255.0 * 0.229, dtype="float32")  # mean + one std
    rescaled = model.get_layer(index=1)(pixel)
    assert float(np.asarray(loaded(rescaled))[0, 0, 0, 0]) == pytest.approx(1.0, abs=1e-4)


def test_bad_weights_files_raise_config_errors_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="absent.h5.*not found"):
        models.build_model("cnn-bn", 32, weights=str(tmp_path / "absent.h5"))
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(ConfigError, match="notes.h5"):
        models.build_model("cnn-bn", 32, weights=text)
    other, _ = models.build_model("basic-cnn", 32)
    path = models.save_backbone_weights(other, tmp_path / "basic.weights.h5")
    with pytest.raises(ConfigError, match="basic.weights.h5.*does not fit cnn-bn"):
        models.build_model("cnn-bn", 32, weights=path)
    legacy = models.save_backbone_weights(other, tmp_path / "basic.h5")
    with pytest.raises(ConfigError, match="basic.h5.*does not fit efficientnet-b0"):
        models.build_model("efficientnet-b0", 32, weights=legacy)


@pytest.fixture
def unreachable_weights_server(monkeypatch, tmp_path):
    """Keep the real file names and hashes, but point downloads at a closed local port and an empty cache."""
    real = models.pretrained_weights

    def local(spec):
        weights = real(spec)
        return weights._replace(url="http://127.0.0.1:9/" + weights.file_name)

    monkeypatch.setattr(models, "pretrained_weights", local)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))


@pytest.mark.parametrize(
    "name, file_name",
    [
        ("efficientnet-b0", "efficientnetb0_notop.h5"),
        ("efficientnet-b0-ns", "efficientnet-b0_noisy-student_notop.h5"),
        ("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ],
)
def test_imagenet_download_failure(name, file_name, unreachable_weights_server):
    with pytest.raises(ConfigError) as excinfo:
        models.build_model(name, 32, weights="imagenet")
    message = str(excinfo.value)
    assert "could not be downloaded" in message and file_name in message and "weights=" in message
    model, info = models.build_model(name, 32, weights="imagenet", fallback_to_scratch=True)
    assert info.from_scratch and not info.loaded and info.requested == "imagenet"
    assert "could not be downloaded" in info.note and "trained from scratch" in info.note
    assert info.to_dict()["from_scratch"] is True
    assert model.output.shape[-1] == 1


def test_published_weights_urls_come_from_the_libraries():
    b3 = models.pretrained_weights(models.get_spec("efficientnet-b3"))
    assert b3.url.endswith("/efficientnetb3_notop.h5") and b3.url.startswith("https://") and len(b3.file_hash) == 32
    ns = models.pretrained_weights(models.get_spec("efficientnet-b3-ns"))
    assert ns.file_name == "efficientnet-b3_noisy-student_notop.h5" and ns.label == "noisy-student"
    with pytest.raises(ConfigError, match="no published pretrained weights"):
        models.pretrained_weights(models.get_spec("cnn-bn"))


def test_every_registered_model_has_a_registered_family():
    assert {spec.family for spec in models.REGISTRY.values()} == set(models.FAMILIES)


def test_imagenet_for_a_from_scratch_model():
    with pytest.raises(ConfigError, match="basic-cnn has no ImageNet weights"):
        models.build_model("basic-cnn", 32, weights="imagenet")
    _, info = models.build_model("basic-cnn", 32, weights="imagenet", fallback_to_scratch=True)
    assert info.from_scratch and "no ImageNet weights" in info.note
    with pytest.raises(ConfigError, match="noisy-student"):
        models.build_model("efficientnet-b0", 32, weights="noisy-student")


def test_unknown_names_and_impossible_sizes():
    with pytest.raises(ConfigError) as excinfo:
        models.build_model("efficientnet-b9", 64)
    for name in models.REGISTRY:
        assert name in str(excinfo.value)
    assert models.validate_model_name("EfficientNet_B3") == "efficientnet-b3"
    with pytest.raises(ConfigError, match="at least 32"):
        models.validate_image_size("efficientnet-b0", 16)
    with pytest.raises(ConfigError, match="at least 16"):
        models.build_model("basic-cnn", 8)
    for bad in (0, -5, 64.5, "64", True, None):
        with pytest.raises(ConfigError, match="positive integer"):
            models.validate_image_size("resnet50", bad)
    with pytest.raises(ConfigError, match="maximum"):
        models.validate_image_size("resnet50", 4096)
    assert models.validate_image_size("resnet50", np.int64(64)) == 64


def test_set_trainable_stages_freeze_what_they_say():
    model, _ = models.build_model("efficientnet-b0", 32)
    head = [layer for layer in model.layers if layer.name.startswith(models.HEAD_PREFIX) and layer.weights]

    summary = models.set_trainable(model, "head")
    assert {id(w) for w in model.trainable_weights} == {id(w) for layer in head for w in layer.trainable_weights}
    assert summary["unfrozen_groups"] == []

    summary = models.set_trainable(model, "fine-tune")
    assert summary["unfrozen_groups"] == ["block6", "block7", "top"]
    trainable = {layer.name for layer in model.layers if layer.trainable and layer.weights}
    assert "top_conv" in trainable and "block7a_project_conv" in trainable and "block6a_expand_conv" in trainable
    assert "block5a_expand_conv" not in trainable and "stem_conv" not in trainable
    assert "top_bn" not in trainable  # BatchNormalization stays in inference mode when fine-tuning

    summary = models.set_trainable(model, "fine-tune", n_blocks=1, train_batchnorm=True)
    assert summary["unfrozen_groups"] == ["block7", "top"] and model.get_layer("top_bn").trainable

    summary = models.set_trainable(model, "all")
    assert summary["frozen_params"] == sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert all(layer.trainable for layer in model.layers)

    with pytest.raises(ConfigError, match="block groups"):
        models.set_trainable(model, "fine-tune", n_blocks=99)
    with pytest.raises(ConfigError, match="valid stages"):
        models.set_trainable(model, "warmup")


def test_head_stage_training_leaves_the_backbone_untouched():
    model, _ = models.build_model("cnn-bn", 32)
    models.set_trainable(model, "head")
    backbone_before = _weights(models.backbone_of(model))
    head_before = _numpy(model.get_layer(models.OUTPUT_LAYER).kernel)
    x = _raw_images(4, 32)
    _one_eager_step(model, x, np.array([0, 1, 0, 1], dtype="float32"))
    for before, after in zip(backbone_before, _weights(models.backbone_of(model))):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(head_before, _numpy(model.get_layer(models.OUTPUT_LAYER).kernel))
    assert models.set_trainable(model, "fine-tune")["unfrozen_groups"] == ["conv3", "conv4"]


def test_backbone_head_join_for_cached_features(tmp_path):
    backbone, info = models.build_backbone("cnn-bn", 32)
    assert info.from_scratch and backbone.layers[-1].name == models.FEATURES_LAYER
    x = _raw_images(4, 32, seed=2)
    features = _predict(backbone, x)
    assert features.shape == (4, 256)
    head = models.build_head(256, 0.2, model_name="cnn-bn")
    assert all(layer.name.startswith(models.HEAD_PREFIX) for layer in head.layers)
    head.compile(optimizer="adam", loss="binary_crossentropy")
    head.fit(features, np.array([0, 1, 0, 1], dtype="float32"), epochs=1, verbose=0)
    model = models.join(backbone, head)
    assert model.name == "cnn-bn"
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    np.testing.assert_allclose(_predict(model, x), _predict(head, features), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "joined.keras")
    np.testing.assert_allclose(
        _predict(models.load_model(tmp_path / "joined.keras"), x), _predict(model, x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ConfigError, match="expects 128 features"):
        models.join(backbone, models.build_head(128))
    plain = models.build_head(1280)
    assert [layer.name for layer in plain.layers] == ["head_input", "head_dropout", "head_probability"]


def test_registry_and_config_validation_do_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; from melcore import registry; from melcore.training.config import TrainConfig, validate; "
        "validate(TrainConfig(model='efficientnet-b3', weights='none')); "
        "print(len(registry.model_names()), 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(__import__("melcore.registry").registry.REGISTRY)), "False", "False"]
