"""Training engine: config, validation, fit (artifacts, learning, progress, cancel,
reproducibility, weights fallback, transfer-learning stages, folds) and MirroredStrategy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from melcore.errors import CohortError, ConfigError
from melcore.training.recipes import recipe_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- an easy synthetic cohort


def make_easy_cohort(
    root,
    n_patients: int = 24,
    per_patient: int = 3,
    size: int = 40,
    seed: int = 0,
    clinics=("north", "south"),
    only_benign: bool = False,
):
    """A task a tiny CNN learns in 1-3 epochs: melanoma = a large dark blob, benign = a small faint spot.

    Writes ``root/labels.csv`` (image_name, patient_id, target, clinic) and PNGs in
    ``root/images``; every third image is malignant (unless ``only_benign``).
    Returns (csv path, images folder).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, k = [], 0
    for p in range(n_patients):
        clinic = clinics[p % len(clinics)]
        for j in range(per_patient):
            malignant = (not only_benign) and k % 3 == 0
            k += 1
            skin = np.array([200, 160, 140]) + rng.integers(-15, 15, 3)
            pixels = np.clip(skin + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(pixels)
            centre = size / 2 + rng.uniform(-3, 3, 2)
            radius = (rng.uniform(0.28, 0.38) if malignant else rng.uniform(0.08, 0.14)) * size
            colour = (40, 25, 30) if malignant else (150, 110, 90)
            ImageDraw.Draw(im).ellipse(
                [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=colour
            )
            name = f"IMG_{p:03d}_{j}"
            im.save(images / f"{name}.png")
            rows.append(f"{name},P{p:03d},{int(malignant)},{clinic}")
    csv = root / "labels.csv"
    csv.write_text("image_name,patient_id,target,clinic\n" + "\n".join(rows) + "\n")
    return csv, images


def easy_config(**overrides):
    from melcore.training.config import TrainConfig

    values = dict(
        model="basic-cnn",
        image_size=32,
        epochs=3,
        batch_size=8,
        optimizer="adam",
        learning_rate=1e-3,
        augment="none",
        seed=1,
        early_stopping_patience=None,
        workers=2,
    )
    values.update(overrides)
    return TrainConfig(**values)


class Recorder:
    """A progress callback that keeps every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, epoch, batch, loss, metrics, eta):
        self.calls.append((epoch, batch, loss, dict(metrics), eta))

    def batches(self):
        return [
            c for c in self.calls if c[3]["stage"] in ("head", "fine-tune", "train") and not c[3].get("end_of_epoch")
        ]

    def epoch_ends(self):
        return [c for c in self.calls if c[3].get("end_of_epoch")]


@pytest.fixture(scope="module")
def easy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    make_easy_cohort(root)
    return root


def _load(root):
    from melcore.cohort import load_cohort

    return load_cohort(root / "labels.csv", root / "images")


@pytest.fixture(scope="module")
def easy_run(easy_dir, tmp_path_factory):
    """One 3-epoch fit on the easy cohort, with its progress calls (shared by several tests)."""
    from melcore.training.api import fit

    home = tmp_path_factory.mktemp("easy-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELREVIEW_HOME", str(home))
        recorder = Recorder()
        run = fit(easy_config(), _load(easy_dir), progress=recorder, run_dir=home / "run")
    return run, recorder


# --------------------------------------------------------------------------- config


def test_config_json_round_trip_and_resolution():
    from melcore.models import get_spec
    from melcore.training.config import TrainConfig

    config = TrainConfig(
        model="cnn-bn",
        epochs=4,
        clinic="north",
        fold=2,
        n_folds=4,
        tta=True,
        early_stopping_patience=None,
        weights="none",
    )
    again = TrainConfig.from_json(config.to_json())
    assert again == config
    assert set(config.to_dict()) == set(TrainConfig.field_names())
    assert json.loads(config.to_json())["clinic"] == "north"

    resolved = config.validate()
    spec, recipe = get_spec("cnn-bn"), recipe_for("cnn-bn")
    assert resolved.image_size == spec.default_image_size
    assert resolved.batch_size == recipe.batch_size
    assert resolved.optimizer == recipe.optimizer
    assert resolved.augment == recipe.augment
    assert resolved.learning_rate == recipe.learning_rate
    assert config.image_size is None  # validate returns a copy
    assert TrainConfig.from_dict(resolved.to_dict()).validate() == resolved


def test_from_dict_rejects_unknown_keys_and_names_the_valid_ones():
    from melcore.training.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model": "cnn-bn", "epoch": 3})
    assert "'epoch'" in str(err.value) and "epochs" in str(err.value) and "image_size" in str(err.value)
    with pytest.raises(ConfigError, match="names no model"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json("{model: cnn-bn")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "efficientnet-b9"}, r"unknown model 'efficientnet-b9'; valid models: basic-cnn, cnn-bn, resnet50"),
        ({"augment": "heavy"}, r"unknown augmentation preset 'heavy'; valid presets: none, basic, isic-strong"),
        ({"image_size": 8}, r"image size 8 is too small for basic-cnn"),
        ({"image_size": 64.5}, r"positive integer"),
        ({"epochs": 0}, r"epochs must be positive"),
        ({"batch_size": -4}, r"batch size must be positive"),
        ({"learning_rate": 0}, r"learning rate must be positive"),
        ({"balance": "smote"}, r"unknown balance 'smote'; valid balances: none, oversample, class-weight"),
        ({"optimizer": "rmsprop"}, r"unknown optimizer 'rmsprop'; valid optimizers: sgd, adam, adamw"),
        ({"val_fraction": 1.5}, r"val_fraction must be between 0 and 1"),
        ({"fold": 5, "n_folds": 5}, r"fold 5 does not exist with n_folds=5"),
        ({"weights": "/no/such/weights.h5"}, r"weights file .* not found"),
        ({"weights": "imagenet"}, r"basic-cnn has no ImageNet weights"),
        ({"mode": "turbo"}, r"unknown mode 'turbo'; valid modes: full"),
        ({"fallback_to_scratch": "yes"}, r"fallback_to_scratch must be true or false"),
    ],
)
def test_validate_rejects_bad_configs_with_precise_messages(overrides, message):
    from melcore.training.config import TrainConfig

    values = {"model": "basic-cnn", "image_size": 32}
    values.update(overrides)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values).validate()


def test_bad_config_fails_before_the_cohort_is_touched():
    from melcore.training.api import fit

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the cohort was read ({name}) before the config was validated")

    with pytest.raises(ConfigError, match="unknown model"):
        fit({"model": "vgg16"}, Untouchable())


# --------------------------------------------------------------------------- data checks before training


def test_one_class_cohort_is_refused_before_training(tmp_path):
    from melcore.training.api import fit

    make_easy_cohort(tmp_path, n_patients=6, only_benign=True)
    recorder = Recorder()
    with pytest.raises(CohortError, match=r"only benign images \(18\) and no melanoma"):
        fit(easy_config(), _load(tmp_path), progress=recorder, run_dir=tmp_path / "run")
    assert recorder.calls == []
    assert not (tmp_path / "run").exists()


def test_empty_clinic_lists_the_clinics(easy_dir, tmp_path):
    from melcore.training.api import fit

    with pytest.raises(CohortError) as err:
        fit(easy_config(clinic="west"), _load(easy_dir), run_dir=tmp_path / "run")
    assert "'west'" in str(err.value) and "'north'" in str(err.value) and "'south'" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_validation_side_without_melanoma_is_refused(tmp_path):
    from melcore.training.api import fit

    # One melanoma patient only: it cannot be on both sides of a patient split.
    csv, images = make_easy_cohort(tmp_path, n_patients=6, per_patient=2, only_benign=True)
    table = pd.read_csv(csv)
    table.loc[table["patient_id"] == "P000", "target"] = 1
    table.to_csv(csv, index=False)
    with pytest.raises(CohortError, match=r"split .* has no melanoma image .* 1 patient"):
        fit(easy_config(), _load(tmp_path), run_dir=tmp_path / "run")


# --------------------------------------------------------------------------- fit


def test_fit_on_the_demo_cohort_writes_every_artifact(demo_dir, tmp_path):
    from melcore.cohort import load_cohort
    from melcore.images import load_images
    from melcore.models import load_model
    from melcore.training.api import fit
    from melcore.training.rundir import Run

    cohort = load_cohort(demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    config = easy_config(epochs=1, batch_size=16, augment="basic", seed=0, balance="class-weight")
    run = fit(config, cohort, run_dir=tmp_path / "run")

    names = sorted(p.name for p in run.run_dir.iterdir())
    assert names == ["config.json", "metrics.json", "model.keras", "train.log", "val_predictions.csv"]
    assert not run.cancelled
    m = json.loads((run.run_dir / "metrics.json").read_text())
    assert m.keys() == run.metrics.keys()
    for key in (
        "kind",
        "val_auroc",
        "val_loss",
        "sensitivity",
        "specificity",
        "n_train",
        "n_val",
        "n_malignant",
        "history",
        "weights",
        "seconds",
        "images_per_second",
        "device",
        "excluded",
        "split",
    ):
        assert key in m, key
    assert m["kind"] == "image" and m["status"] == "done" and m["cancelled"] is False
    labelled = cohort.labelled().with_images()
    assert m["n_train"] + m["n_select"] + m["n_val"] == len(labelled)
    assert sum(m["n_malignant"].values()) == int(labelled.table["target"].sum())
    assert m["n_select"] >= 1 and m["chosen_on"]["best_epoch"] == "selection"
    assert "chooses nothing" in m["chosen_on"]["validation"]
    assert m["n_malignant"]["val"] >= 1 and 0.0 <= m["val_auroc"] <= 1.0
    assert m["weights"]["from_scratch"] is True and "from scratch" in m["weights"]["note"]
    assert len(m["history"]) == 1 and m["history"][0]["epoch"] == 1

    preds = pd.read_csv(run.run_dir / "val_predictions.csv", dtype={"image_name": str})
    assert list(preds.columns) == ["image_name", "patient_id", "clinic", "target", "prediction"]
    assert len(preds) == m["n_val"] and preds["image_name"].is_unique
    train_patients = set(labelled.table["patient_id"]) - set(preds["patient_id"])
    assert train_patients and not (train_patients & set(preds["patient_id"]))
    assert preds["prediction"].between(0, 1).all()

    # model.keras reproduces the saved validation predictions
    model = load_model(run.run_dir / "model.keras")
    paths = labelled.table.set_index("image_name").loc[preds["image_name"], "image_path"]
    again = model.predict(load_images(paths, 32).astype("float32"), verbose=0).reshape(-1)
    np.testing.assert_allclose(again, preds["prediction"].to_numpy(), atol=1e-5)

    loaded = Run.load(run.run_dir)
    assert loaded.config == run.config and loaded.metrics["val_auroc"] == pytest.approx(m["val_auroc"])
    assert loaded.cancelled is False
    log = (run.run_dir / "train.log").read_text()
    assert "device" in log and "validation AUROC" in log and "split" in log


def test_fit_learns_an_easy_task_and_restores_the_best_epoch(easy_run, easy_dir):
    from melcore.images import load_images

    run, _ = easy_run
    m = run.metrics
    assert m["val_auroc"] >= 0.9
    # An untrained model sits near chance (loss ln 2 = 0.69): a low loss means it learned.
    assert m["val_loss"] < 0.45
    assert m["sensitivity"] >= 0.6 and m["specificity"] >= 0.6
    best = max(m["history"], key=lambda h: (h["select_auroc"], -h["select_loss"]))
    assert m["best_epoch"] == best["epoch"]
    assert m["best_epoch_select_auroc"] == pytest.approx(best["select_auroc"])
    assert not any("val_auroc" in h for h in m["history"])  # the validation images are scored once
    preds = run.val_predictions()
    model = run.load_model()
    table = _load(easy_dir).table.set_index("image_name")
    again = model.predict(
        load_images(table.loc[preds["image_name"], "image_path"], 32).astype("float32"), verbose=0
    ).reshape(-1)
    np.testing.assert_allclose(again, preds["prediction"], atol=1e-5)


def test_progress_reports_batches_and_epoch_ends(easy_run):
    run, recorder = easy_run
    m = run.metrics
    assert recorder.calls, "progress was never called"
    for epoch, batch, loss, metrics, eta in recorder.calls:
        assert {"epochs", "steps", "stage"} <= set(metrics)
        assert metrics["epochs"] == 3
        assert metrics["stage"] in ("load", "train", "validate")
        assert eta is None or eta >= 0
    batches = recorder.batches()
    steps = batches[0][3]["steps"]
    assert steps >= 1
    for epoch in (1, 2, 3):
        seen = [b for e, b, *_ in batches if e == epoch]
        assert seen == list(range(1, steps + 1)), f"epoch {epoch}: batches {seen}"
    assert all(math.isfinite(loss) for _, _, loss, _, _ in batches)
    ends = recorder.epoch_ends()
    assert [e for e, *_ in ends] == [1, 2, 3]
    for (epoch, batch, loss, metrics, eta), record in zip(ends, m["history"]):
        assert metrics["select_auroc"] == pytest.approx(record["select_auroc"])
        assert metrics["select_loss"] == pytest.approx(record["select_loss"])
        assert metrics["train_loss"] == pytest.approx(record["train_loss"])
        assert batch == steps and eta is not None
    assert ends[-1][4] == pytest.approx(0.0, abs=1e-6)  # nothing left after the last epoch
    # loading is reported first, validation after each epoch
    assert recorder.calls[0][3]["stage"] == "load" and recorder.calls[0][0] == 0
    assert any(c[3]["stage"] == "validate" and c[3]["val_steps"] >= 1 for c in recorder.calls)


def test_same_seed_same_results(easy_run, easy_dir, tmp_path):
    from melcore.training.api import fit

    first, _ = easy_run
    second = fit(easy_config(), _load(easy_dir), run_dir=tmp_path / "again")
    for a, b in zip(first.metrics["history"], second.metrics["history"]):
        assert (a["train_loss"], a["select_loss"], a["select_auroc"]) == (
            b["train_loss"],
            b["select_loss"],
            b["select_auroc"],
        )
    pd.testing.assert_frame_equal(first.val_predictions(), second.val_predictions())


def test_cancel_stops_within_one_batch_and_reports_left_out_rows(tmp_path):
    from melcore.training.api import fit
    from melcore.training.rundir import Run

    csv, images = make_easy_cohort(tmp_path, n_patients=12)
    table = pd.read_csv(csv)
    extra = pd.DataFrame(
        {
            "image_name": ["NO_LABEL", "NO_FILE", "CORRUPT"],
            "patient_id": ["P000"] * 3,
            "target": [None, 0, 0],
            "clinic": ["north"] * 3,
        }
    )
    pd.concat([table, extra]).to_csv(csv, index=False)
    Image.new("RGB", (40, 40)).save(images / "NO_LABEL.png")
    (images / "CORRUPT.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 20)

    recorder = Recorder()
    stop_after = 3

    def should_stop():
        return len(recorder.batches()) >= stop_after

    run = fit(
        easy_config(batch_size=4, epochs=3),
        _load(tmp_path),
        progress=recorder,
        should_stop=should_stop,
        run_dir=tmp_path / "run",
    )
    assert run.cancelled is True
    assert len(recorder.batches()) in (stop_after, stop_after + 1)
    assert recorder.epoch_ends() == []
    m = json.loads((run.run_dir / "metrics.json").read_text())
    assert m["cancelled"] is True and m["status"] == "cancelled" and m["val_auroc"] is None
    assert not (run.run_dir / "val_predictions.csv").exists()
    assert Run.load(run.run_dir).cancelled is True
    ex = m["excluded"]
    assert (ex["unlabelled"], ex["no_image"], ex["unreadable"]) == (1, 1, 1)
    assert ex["unreadable_images"][0][0] == "CORRUPT"
    assert m["n_train"] + m["n_select"] + m["n_val"] == 36
    log = (run.run_dir / "train.log").read_text()
    assert "1 unlabelled" in log and "CORRUPT" in log and "cancel" in log


def test_cancel_before_training_returns_a_cancelled_run(easy_dir, tmp_path):
    from melcore.training.api import fit

    recorder = Recorder()
    run = fit(easy_config(), _load(easy_dir), progress=recorder, should_stop=lambda: True, run_dir=tmp_path / "run")
    assert run.cancelled and recorder.batches() == []
    assert run.metrics["epochs_run"] == 0 and not (tmp_path / "run" / "model.keras").exists()


def test_imagenet_fallback_is_recorded_and_refused_without_fallback(easy_dir, tmp_path, monkeypatch):
    """The real weights logic of melcore.models, with the download failing (as offline) and, to keep the
    test fast, the ResNet50 that would be trained swapped for the small CNN after the weights step."""
    import keras

    from melcore import models
    from melcore.training.api import fit

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: network is unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)

    recorder = Recorder()
    with pytest.raises(ConfigError, match="could not be downloaded"):
        fit(
            easy_config(model="resnet50", weights="imagenet"),
            _load(easy_dir),
            progress=recorder,
            run_dir=tmp_path / "refused",
        )
    assert recorder.calls == [] and not (tmp_path / "refused").exists()

    real_build = models.build_model

    def build_small(name, image_size, weights="none", fallback_to_scratch=False, **kwargs):
        _, info = real_build(name, image_size, weights=weights, fallback_to_scratch=fallback_to_scratch)
        small, _ = real_build("basic-cnn", image_size)
        return small, info

    monkeypatch.setattr(models, "build_model", build_small)
    run = fit(
        easy_config(model="resnet50", weights="imagenet", fallback_to_scratch=True, epochs=1),
        _load(easy_dir),
        run_dir=tmp_path / "fallback",
    )
    m = json.loads((run.run_dir / "metrics.json").read_text())
    assert m["from_scratch"] is True
    assert m["weights"]["requested"] == "imagenet" and m["weights"]["loaded"] is False
    assert "could not be downloaded" in m["weights"]["note"] and "from scratch" in m["weights"]["note"]
    assert [s["stage"] for s in m["stages"]] == ["train"]
    log = (run.run_dir / "train.log").read_text()
    assert "WARNING" in log and "could not be downloaded" in log


def test_loaded_weights_train_head_then_fine_tune_top_blocks_on_a_fold(easy_dir, tmp_path):
    from melcore import models
    from melcore.splits import cohort_folds
    from melcore.training.api import fit

    base, _ = models.build_model("basic-cnn", 32)
    weights_file = models.save_backbone_weights(base, tmp_path / "backbone.weights.h5")
    frozen = {
        layer.name: [w.copy() for w in layer.get_weights()]
        for layer in base.layers
        if layer.name.startswith(("conv1", "conv2", "conv3")) and layer.get_weights()
    }
    assert frozen

    recorder = Recorder()
    config = easy_config(
        weights=str(weights_file),
        epochs=1,
        fine_tune_epochs=1,
        unfreeze_blocks=1,
        fold=1,
        n_folds=4,
        learning_rate=2e-3,
    )
    run = fit(config, _load(easy_dir), progress=recorder, run_dir=tmp_path / "run")
    m = run.metrics
    assert m["weights"]["loaded"] is True and m["from_scratch"] is False
    assert [(s["stage"], s["epochs_run"]) for s in m["stages"]] == [("head", 1), ("fine-tune", 1)]
    assert m["stages"][0]["unfrozen_groups"] == [] and m["stages"][1]["unfrozen_groups"] == ["conv4"]
    assert m["stages"][1]["learning_rate"] == pytest.approx(2e-3 * recipe_for("basic-cnn").finetune_lr_factor)
    assert [(h["epoch"], h["stage"]) for h in m["history"]] == [(1, "head"), (2, "fine-tune")]
    assert {c[3]["stage"] for c in recorder.batches()} == {"head", "fine-tune"}
    assert all(c[3]["epochs"] == 2 for c in recorder.calls)

    trained = run.load_model()
    for name, weights in frozen.items():  # never unfrozen: still the file's weights
        for a, b in zip(weights, trained.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert m["stages"][1]["trainable_params"] > m["stages"][0]["trainable_params"]
    if m["best_epoch"] == 2:  # the fine-tuned epoch was kept: the unfrozen block moved
        conv4_before = base.get_layer("conv4_conv").get_weights()[0]
        assert not np.array_equal(conv4_before, trained.get_layer("conv4_conv").get_weights()[0])

    cohort = _load(easy_dir)
    folds = cohort_folds(cohort, 4, config.seed)
    expected = set(cohort.table.loc[folds == 1, "image_name"])
    assert set(run.val_predictions()["image_name"]) == expected
    assert m["split"]["method"] == "fold" and m["split"]["fold"] == 1


def test_mirrored_strategy_on_two_logical_cpus(easy_dir, tmp_path):
    script = textwrap.dedent(f"""
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from melcore.cohort import load_cohort
        from melcore.training.api import fit
        from melcore.training.config import TrainConfig
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        cohort = load_cohort({str(easy_dir / "labels.csv")!r}, {str(easy_dir / "images")!r})
        config = TrainConfig(model="basic-cnn", image_size=32, epochs=2, batch_size=8, optimizer="adam",
                             learning_rate=1e-3, augment="none", seed=1, early_stopping_patience=None)
        run = fit(config, cohort, run_dir={str(tmp_path / "run")!r}, strategy=strategy)
        print(json.dumps({{"n_replicas": run.metrics["n_replicas"], "device": run.metrics["device"],
                           "val_auroc": run.metrics["val_auroc"], "n_val": run.metrics["n_val"],
                           "epochs_run": run.metrics["epochs_run"]}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n_replicas"] == 2 and "MirroredStrategy" in result["device"]
    assert result["epochs_run"] == 2 and result["val_auroc"] >= 0.75
    preds = pd.read_csv(tmp_path / "run" / "val_predictions.csv")
    assert len(preds) == result["n_val"] and preds["image_name"].is_unique
    from melcore.models import load_model

    assert load_model(tmp_path / "run" / "model.keras").output_shape == (None, 1)


def test_too_many_unfreeze_blocks_fail_before_training(easy_dir, tmp_path):
    from melcore import models
    from melcore.training.api import fit

    base, _ = models.build_model("basic-cnn", 32)
    weights_file = models.save_backbone_weights(base, tmp_path / "backbone.weights.h5")
    recorder = Recorder()
    with pytest.raises(ConfigError, match=r"unfreeze_blocks=9 but basic-cnn has 4 block groups \(conv1, conv2"):
        fit(
            easy_config(weights=str(weights_file), fine_tune_epochs=1, unfreeze_blocks=9),
            _load(easy_dir),
            progress=recorder,
            run_dir=tmp_path / "run",
        )
    assert recorder.calls == [] and not (tmp_path / "run").exists()
