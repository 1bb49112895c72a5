"""The training core's contracts that need no training: config checks, the run folder, the registries."""

import ast
import json
from pathlib import Path

import pytest

from melcore.errors import ConfigError, MelcoreError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c.check_int("epochs", 0, 1), "epochs must be positive, got 0"),
        (lambda c: c.check_int("seed", True, 0), "seed must be an integer, got True"),
        (lambda c: c.check_int("n_folds", 1, 2), "n_folds must be >= 2, got 1"),
        (lambda c: c.check_float("learning rate", float("nan")), "learning rate must be finite, got nan"),
        (lambda c: c.check_fraction("val_fraction", 1.5), "val_fraction must be between 0 and 1 (e.g. 0.2), got 1.5"),
        (lambda c: c.check_bool("tta", 1), "tta must be true or false, got 1"),
        (
            lambda c: c.check_choice("optimizer", "rmsprop", ("sgd", "adam")),
            "unknown optimizer 'rmsprop'; valid optimizers: sgd, adam",
        ),
    ],
)
def test_checks_name_the_field_the_value_and_what_is_valid(call, message):
    from melcore import checks

    with pytest.raises(ConfigError) as excinfo:
        call(checks)
    assert str(excinfo.value) == message


def test_checks_return_canonical_values():
    from melcore import checks

    assert checks.check_int("epochs", 3.0, 1) == 3
    assert checks.check_choice("schedule", " Cosine ", ("cosine",)) == "cosine"
    assert checks.check_choice("balance", "class_weight", ("class-weight",)) == "class-weight"


def test_the_config_gives_the_checks_messages():
    from melcore.training.config import TrainConfig, validate

    with pytest.raises(
        ConfigError,
        match="select_fraction \\(share of the training patients that choose the best epoch\\) must be between 0 and 1",
    ):
        validate(TrainConfig(model="cnn-bn", select_fraction=0.0))
    with pytest.raises(ConfigError, match="unknown preset 'fast'; valid presets: cpu-default, colour-svm"):
        validate(TrainConfig(model="cnn-bn", preset="fast"))


# The defaults every model trained with when the architecture spec still held them (ModelSpec.default_*).
_RECIPES_BEFORE = {
    "basic-cnn": ("sgd", 0.01, 0.0, "exponential", "basic", 32, 0.1),
    "cnn-bn": ("adamw", 1e-3, 1e-4, "cosine", "isic-strong", 32, 0.1),
    "resnet50": ("adamw", 1e-3, 1e-5, "cosine", "isic-strong", 32, 0.1),
    "efficientnet-b3": ("adamw", 1e-3, 1e-5, "cosine", "isic-strong", 32, 0.1),
    "efficientnet-b5": ("adamw", 1e-3, 1e-5, "cosine", "isic-strong", 16, 0.1),
    "efficientnet-b7-ns": ("adamw", 1e-3, 1e-5, "cosine", "isic-strong", 8, 0.1),
    "efficientnet-lite0": ("adamw", 1e-3, 1e-5, "cosine", "isic-strong", 32, 0.1),
    "efficientnet-lite4": ("adamw", 1e-3, 1e-5, "cosine", "isic-strong", 16, 0.1),
}


@pytest.mark.parametrize("model", sorted(_RECIPES_BEFORE))
def test_a_models_default_recipe_is_the_one_it_trained_with(model):
    from melcore.training.config import TrainConfig, validate
    from melcore.training.recipes import recipe_for

    recipe = recipe_for(model.upper().replace("-", "_"))
    assert (
        recipe.optimizer,
        recipe.learning_rate,
        recipe.weight_decay,
        recipe.schedule,
        recipe.augment,
        recipe.batch_size,
        recipe.finetune_lr_factor,
    ) == _RECIPES_BEFORE[model]
    resolved = validate(TrainConfig(model=model, weights="none"))
    assert (resolved.optimizer, resolved.learning_rate, resolved.schedule, resolved.augment, resolved.batch_size) == (
        recipe.optimizer,
        recipe.learning_rate,
        recipe.schedule,
        recipe.augment,
        recipe.batch_size,
    )


def test_every_model_has_one_recipe_and_it_names_known_choices():
    from melcore.augment import PRESETS
    from melcore.registry import OPTIMIZERS, REGISTRY, SCHEDULES
    from melcore.training.recipes import RECIPES, recipe_for

    assert list(RECIPES) == list(REGISTRY)
    for recipe in RECIPES.values():
        assert recipe.optimizer in OPTIMIZERS and recipe.schedule in SCHEDULES and recipe.augment in PRESETS
        assert recipe.learning_rate > 0 and recipe.weight_decay >= 0 and recipe.batch_size >= 1
    with pytest.raises(ConfigError, match="unknown model 'vgg16'; valid models: basic-cnn, cnn-bn"):
        recipe_for("vgg16")


def test_given_values_override_the_recipe():
    from melcore.training.config import TrainConfig, validate

    resolved = validate(
        TrainConfig(
            model="basic-cnn", optimizer="adam", learning_rate=0.5, schedule="constant", augment="none", batch_size=4
        )
    )
    assert (resolved.optimizer, resolved.learning_rate, resolved.schedule, resolved.augment, resolved.batch_size) == (
        "adam",
        0.5,
        "constant",
        "none",
        4,
    )


def test_make_optimizer_follows_the_recipe():
    import keras

    from melcore.registry import get_spec
    from melcore.training.optimizers import make_optimizer
    from melcore.training.recipes import recipe_for

    sgd = make_optimizer("basic-cnn", steps_per_epoch=10, epochs=5)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov
    schedule = sgd.learning_rate if callable(sgd.learning_rate) else sgd._learning_rate
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(10)) == pytest.approx(0.009)  # one epoch later: x0.9
    adamw = make_optimizer(get_spec("cnn-bn"), lr=3e-4, steps_per_epoch=4, epochs=2)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(1e-4)
    assert make_optimizer(recipe_for("cnn-bn")).weight_decay == pytest.approx(1e-4)
    constant = make_optimizer("efficientnet-b0", 1e-4, schedule="constant", optimizer="adam", weight_decay=0)
    assert isinstance(constant, keras.optimizers.Adam) and float(constant.learning_rate) == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="valid optimizers"):
        make_optimizer("cnn-bn", optimizer="lbfgs")
    with pytest.raises(ConfigError, match="valid schedules"):
        make_optimizer("cnn-bn", schedule="step")
    with pytest.raises(ConfigError, match="positive"):
        make_optimizer("cnn-bn", lr=0)


def test_a_run_folder_starts_without_the_results_of_an_earlier_run(tmp_path):
    from melcore.colour import COLOUR_MODEL_FILE
    from melcore.training.config import TrainConfig
    from melcore.training.rundir import RESULT_FILES, RunDir

    for name in RESULT_FILES:
        (tmp_path / name).write_text("old")
    (tmp_path / "notes.txt").write_text("kept")
    config = TrainConfig(model="cnn-bn", mode="fast-head")
    out = RunDir.create(tmp_path, config)
    assert COLOUR_MODEL_FILE in RESULT_FILES and not any((tmp_path / name).exists() for name in RESULT_FILES)
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert json.loads((tmp_path / "config.json").read_text())["mode"] == "fast-head"
    written = out.write_metrics({"val_auroc": float("nan"), "n": 3})
    import melcore

    expected = {"val_auroc": None, "n": 3, "melcore_version": melcore.__version__}
    assert written == expected == json.loads((tmp_path / "metrics.json").read_text())


def test_the_run_tail_writes_validation_or_says_why_there_is_none(tmp_path):
    """RunDir.save_and_score and write_results, the tail both epoch-trained modes share."""
    import numpy as np
    import pandas as pd

    from melcore.training.callbacks import BestEpoch, Cancellation, ProgressReporter
    from melcore.training.config import TrainConfig
    from melcore.training.rundir import NO_VALIDATION, RunDir

    out = RunDir.create(tmp_path / "run", TrainConfig(model="cnn-bn"))
    val = pd.DataFrame(
        {"image_name": ["a", "b", "c", "d"], "patient_id": list("pqrs"), "clinic": "x", "target": [0, 1, 0, 1]}
    )
    p = np.array([0.2, 0.9, 0.6, 0.4])
    reporter, best = ProgressReporter(None), BestEpoch()
    tail = {"best": best, "reporter": reporter, "history": [], "started": 0.0, "fit_seconds": 1.0}

    # No epoch was chosen: nothing is saved or scored, and an uncancelled run says so.
    scored = []
    assert out.save_and_score(None, best, Cancellation(None), lambda: scored.append(1)) is None and not scored
    with pytest.raises(MelcoreError, match="training ended without a single validated epoch"):
        out.write_results({"status": "done"}, val, None, cancel=Cancellation(None), **tail)

    # Cancelled (here while scoring, after the metrics said "done"): no validation keys, status cancelled.
    cancel = Cancellation(lambda: True)
    cancel.requested()
    seconds = out.write_results({"status": "done", "cancelled": False}, val, None, cancel=cancel, **tail)
    written = json.loads((out / "metrics.json").read_text())
    assert written["status"] == "cancelled" and written["cancelled"] is True
    assert {k: written[k] for k in NO_VALIDATION} == NO_VALIDATION and not (out / "val_predictions.csv").exists()
    assert written["seconds"] == pytest.approx(seconds) and written["fit_seconds"] == 1.0

    # Delivered predictions: the CSV with its extra column, validation keys then the further scores.
    best.best_weights = [np.zeros(1)]
    metrics = {"status": "done"}
    out.write_results(
        metrics,
        val,
        p,
        cancel=Cancellation(None),
        columns={"cnn_prediction": 1 - p},
        scores={"cnn_val_auroc": 0.0},
        **tail,
    )
    csv = pd.read_csv(out / "val_predictions.csv")
    assert list(csv.columns) == ["image_name", "patient_id", "clinic", "target", "prediction", "cnn_prediction"]
    assert np.allclose(csv["cnn_prediction"], 1 - p)
    keys = list(metrics)
    assert metrics["val_auroc"] == pytest.approx(0.75) and keys.index("val_auroc") < keys.index("cnn_val_auroc")
    assert metrics["status"] == "done" and metrics["fit_seconds"] == 1.0


def test_the_scorer_is_read_from_metrics_with_the_colour_model_file_for_old_runs(tmp_path):
    from melcore.colour import COLOUR_MODEL_FILE
    from melcore.training.rundir import run_scorer

    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "metrics.json").write_text(json.dumps({"scorer": "colour-model"}))
    assert run_scorer(recorded) == "colour-model"
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"val_auroc": 0.7}))
    assert run_scorer(old) == "cnn"
    (old / COLOUR_MODEL_FILE).write_text("{}")
    assert run_scorer(old) == "colour-model"
    assert run_scorer(tmp_path / "missing") == "cnn"


def test_every_training_mode_has_one_trainer():
    from melcore.training import api
    from melcore.training.config import MODES

    assert set(api.TRAINERS) == set(MODES)


def test_one_job_kind_registry_for_the_cli_and_the_worker():
    import argparse

    from melcore import jobs
    from melcore.commands import jobs as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    submit = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("submit"))
    kind = next(a for a in submit._actions if a.dest == "kind")
    assert tuple(kind.choices) == tuple(jobs.JOB_KINDS)
    assert set(jobs.IMAGE_JOB_KINDS) == {"train", "kfold", "cross-clinic"}
    with pytest.raises(MelcoreError, match="unknown job kind 'pixels'; this worker runs train, kfold, cross-clinic"):
        jobs.get_job_kind("pixels")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_pages_never_import_the_command_line():
    files = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]
    offending = {
        f.name: sorted(n for n in _imports(f) if n == "melcore.commands" or n.startswith("melcore.commands."))
        for f in files
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_no_training_mode_imports_the_dispatcher():
    training = ROOT / "melcore" / "training"
    for name in ("image.py", "fast_head.py", "prepare.py", "callbacks.py", "rundir.py", "config.py", "recipes.py"):
        assert not any(n.startswith("melcore.training.api") for n in _imports(training / name)), name


def test_an_undefined_selection_auroc_keeps_the_first_epoch_and_lets_patience_run_out():
    from melcore.training.callbacks import BestEpoch

    best = BestEpoch()
    best.start_stage(patience=2)
    assert best.update(1, None, 0.7, lambda: ["w1"]) is True
    assert best.update(2, None, 0.5, lambda: ["w2"]) is False
    assert best.update(3, None, 0.4, lambda: ["w3"]) is False
    assert best.best_epoch == 1 and best.best_weights == ["w1"] and best.patience_exhausted
    defined = BestEpoch()
    defined.update(1, 0.6, 0.7, lambda: ["a"])
    assert defined.update(2, 0.6, 0.6, lambda: ["b"]) is True and defined.update(3, 0.5, 0.1, lambda: ["c"]) is False


def test_one_name_normaliser_for_models_presets_and_augmentations():
    """Registry, recipe and augmentation names are read by melcore.checks.canonical_name only."""
    import re
    from pathlib import Path

    import melcore
    from melcore import augment, registry
    from melcore.training import recipes

    package = Path(melcore.__file__).parent
    copies = [
        f"{path.name}:{i}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "checks.py"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\.lower\(\)\.replace\(\"_\", \"-\"\)", line)
    ]
    assert copies == []
    name = registry.model_names()[0]
    assert registry.validate_model_name(f" {name.upper().replace('-', '_')} ") == name
    assert augment.validate_preset(None) == "none" and augment.validate_preset(" NONE ") == "none"
    preset = next(iter(recipes.PRESETS))
    assert recipes.get_preset(preset.upper().replace("-", "_")) is recipes.PRESETS[preset]


def test_the_weights_rules_and_their_messages_live_in_the_registry(tmp_path):
    import re
    from pathlib import Path

    import melcore
    from melcore.registry import REGISTRY, check_weights

    scratch = next(spec for spec in REGISTRY.values() if not spec.pretrained)
    pretrained = next(spec for spec in REGISTRY.values() if spec.pretrained and spec.family != "efficientnet-ns")
    assert check_weights(scratch, None) == check_weights(scratch, " None ") == "none"
    assert check_weights(pretrained, "ImageNet") == "imagenet"
    assert check_weights(scratch, "imagenet", fallback_to_scratch=True) == "imagenet"
    with pytest.raises(ConfigError, match="has no ImageNet weights"):
        check_weights(scratch, "imagenet")
    with pytest.raises(ConfigError, match="only for the -ns models"):
        check_weights(pretrained, "noisy-student")
    with pytest.raises(ConfigError, match="not found; weights must be 'none', 'imagenet' or the path"):
        check_weights(pretrained, tmp_path / "missing.h5")
    (tmp_path / "w.h5").write_bytes(b"")
    assert check_weights(pretrained, tmp_path / "w.h5") == str((tmp_path / "w.h5").resolve())
    package = Path(melcore.__file__).parent
    copies = [
        path.name
        for path in sorted(package.rglob("*.py"))
        if path.name != "registry.py"
        and re.search(
            r"noisy-student weights exist only|has no ImageNet weights \(it is", path.read_text(encoding="utf-8")
        )
    ]
    assert copies == []
