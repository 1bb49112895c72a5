"""``python -m melcore train`` / ``predict``: option handling, progress line, errors, end to end."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_train import make_easy_cohort

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "melcore", *map(str, args)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def easy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy-cli")
    make_easy_cohort(root)
    return root


def _parse(*argv):
    from melcore.commands import train as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


# --------------------------------------------------------------------------- options -> config


def test_config_from_args_merges_a_config_file_with_the_options(tmp_path):
    from melcore.commands.train import add_train_options, config_from_args

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"model": "cnn-bn", "epochs": 7, "seed": 3, "balance": "class-weight"}))
    parser = argparse.ArgumentParser()
    add_train_options(parser)  # what 'jobs submit' reuses: no data options in it
    assert not any(a.dest in ("csv", "images", "out") for a in parser._actions)

    args = parser.parse_args(
        [
            "--config",
            str(config_file),
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--fallback-to-scratch",
            "--no-early-stopping",
            "--tta",
            "--clinic",
            "north",
        ]
    )
    config = config_from_args(args)
    assert (config.model, config.epochs, config.seed, config.balance) == ("cnn-bn", 2, 3, "class-weight")
    assert config.learning_rate == 0.01 and config.fallback_to_scratch is True and config.tta is True
    assert config.early_stopping_patience is None and config.clinic == "north"

    bare = config_from_args(parser.parse_args(["--model", "basic-cnn"]))
    from melcore.training.config import TrainConfig

    assert bare == TrainConfig(model="basic-cnn")  # nothing given = the TrainConfig defaults

    inline = config_from_args(parser.parse_args(["--config", '{"model": "resnet50", "fold": 1}']))
    assert inline.model == "resnet50" and inline.fold == 1

    from melcore.errors import ConfigError

    default = config_from_args(parser.parse_args(["--epochs", "3"]))  # no model named: the default recipe
    assert (default.preset, default.model, default.weights, default.epochs) == (
        "cpu-default",
        "efficientnet-lite0",
        "imagenet",
        3,
    )
    with pytest.raises(ConfigError, match="unknown training config key 'epoch'; valid keys"):
        config_from_args(parser.parse_args(["--config", '{"model": "cnn-bn", "epoch": 3}']))


def test_progress_bar_line_in_place_and_epoch_summaries():
    from melcore.commands.train import TrainProgressBar

    tty = io.StringIO()
    bar = TrainProgressBar(tty, interactive=True)
    bar(0, 0, float("nan"), {"epochs": 2, "steps": 0, "stage": "load", "done": 5, "total": 10}, None)
    bar._last_draw = 0
    bar(1, 3, 0.5, {"epochs": 2, "steps": 10, "stage": "train"}, 75.0)
    bar(
        1,
        10,
        0.4,
        {
            "epochs": 2,
            "steps": 10,
            "stage": "train",
            "end_of_epoch": True,
            "select_auroc": 0.81,
            "select_loss": 0.45,
            "train_loss": 0.4,
            "best_select_auroc": 0.81,
            "best_epoch": 1,
        },
        30.0,
    )
    bar._last_draw = 0
    bar(2, 4, 0.3, {"epochs": 2, "steps": 10, "stage": "train"}, 20.0)
    bar.close()
    out = tty.getvalue()
    assert "\rdecoding images 5/10" in out
    assert "\repoch 1/2 [train]" in out and "3/10" in out and "loss 0.5000" in out and "ETA 1m15s" in out
    assert "selection AUROC 0.8100" in out and "(best 0.8100 at epoch 1)" in out
    assert "selection AUROC 0.810  ETA 20s" in out  # the last selection-split AUROC stays on the batch line
    assert out.endswith("\n")

    log = io.StringIO()
    quiet = TrainProgressBar(log, interactive=False)
    quiet(1, 3, 0.5, {"epochs": 2, "steps": 10, "stage": "train"}, 75.0)
    quiet(
        1,
        10,
        0.4,
        {
            "epochs": 2,
            "steps": 10,
            "stage": "train",
            "end_of_epoch": True,
            "select_auroc": 0.7,
            "select_loss": 0.5,
            "train_loss": 0.4,
            "best_select_auroc": 0.7,
            "best_epoch": 1,
        },
        30.0,
    )
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue()


# --------------------------------------------------------------------------- errors before training (exit 2, one line)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "basic-cnn", "--image-size", "8"], "image size 8 is too small for basic-cnn"),
        (
            ["--model", "basic-cnn", "--image-size", "32", "--augment", "wild"],
            "valid presets: none, basic, isic-strong",
        ),
        (["--model", "basic-cnn", "--image-size", "32", "--clinic", "west"], "clinics: 'north' (36), 'south' (36)"),
        (["--model", "basic-cnn", "--image-size", "32", "--epochs", "0"], "epochs must be positive"),
    ],
)
def test_cli_errors_exit_2_with_one_line(easy_dir, tmp_path, capsys, extra, message):
    from melcore.__main__ import main

    code = main(
        [
            "train",
            "--csv",
            str(easy_dir / "labels.csv"),
            "--images",
            str(easy_dir / "images"),
            "--out",
            str(tmp_path / "run"),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(_error_lines(err)) == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_one_class_cohort_exits_2_before_training(tmp_path, capsys):
    from melcore.__main__ import main

    make_easy_cohort(tmp_path / "benign", n_patients=4, only_benign=True)
    code = main(
        [
            "train",
            "--csv",
            str(tmp_path / "benign" / "labels.csv"),
            "--model",
            "basic-cnn",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "only benign images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_unknown_model_lists_valid_models_in_a_subprocess(easy_dir, tmp_path):
    proc = _cli(
        "train",
        "--csv",
        easy_dir / "labels.csv",
        "--model",
        "inception-v3",
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
        timeout=300,
    )
    assert proc.returncode == 2
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1
    assert "unknown model 'inception-v3'" in lines[0] and "efficientnet-b3-ns" in lines[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- end to end


def test_train_then_predict_end_to_end(easy_dir, tmp_path, capsys):
    from melcore.__main__ import main

    run_dir = tmp_path / "run"
    proc = _cli(
        "train",
        "--csv",
        easy_dir / "labels.csv",
        "--images",
        easy_dir / "images",
        "--model",
        "basic-cnn",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--optimizer",
        "adam",
        "--lr",
        "0.001",
        "--augment",
        "none",
        "--seed",
        "1",
        "--out",
        run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1/2 [train]" in proc.stderr and "epoch 2/2 [train]" in proc.stderr  # epoch summary lines
    assert f"run          {run_dir.resolve()}" in proc.stdout and "validation   AUROC" in proc.stdout
    for name in ("model.keras", "config.json", "metrics.json", "val_predictions.csv", "train.log"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["val_auroc"] >= 0.75
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["model"], config["image_size"], config["seed"]) == ("basic-cnn", 32, 1)

    # a second train into the same folder is refused
    assert (
        main(
            [
                "train",
                "--csv",
                str(easy_dir / "labels.csv"),
                "--model",
                "basic-cnn",
                "--image-size",
                "32",
                "--out",
                str(run_dir),
            ]
        )
        == 2
    )
    assert "already holds a finished run" in capsys.readouterr().err

    preds_path = tmp_path / "preds.csv"
    proc = _cli("predict", "--model", run_dir, "--images", easy_dir / "images", "--tta", "--out", preds_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = pd.read_csv(preds_path)
    assert list(preds.columns) == ["image_name", "target"]
    n_images = len(list((easy_dir / "images").iterdir()))
    assert len(preds) == n_images and preds["image_name"].is_unique
    assert preds["target"].between(0, 1).all()
    labels = pd.read_csv(easy_dir / "labels.csv").set_index("image_name")
    from melcore.metrics import auroc

    assert auroc(labels.loc[preds["image_name"], "target"], preds["target"]) >= 0.75

    # a bad image: reported, the others still written, exit 1; --strict: exit 2, nothing written
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((easy_dir / "images").iterdir())[:5]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "BROKEN.png").write_bytes(b"not an image at all")
    out = tmp_path / "partial.csv"
    assert main(["predict", "--model", str(run_dir), "--images", str(images), "--out", str(out)]) == 1
    partial = pd.read_csv(out)
    assert len(partial) == 5 and "BROKEN" not in set(partial["image_name"])
    strict_out = tmp_path / "strict.csv"
    assert (
        main(["predict", "--model", str(run_dir), "--images", str(images), "--strict", "--out", str(strict_out)]) == 2
    )
    assert not strict_out.exists()

    # --csv scores the table's rows, in its order
    csv = tmp_path / "subset.csv"
    pd.DataFrame({"image_name": ["IMG_005_1", "IMG_000_0"]}).to_csv(csv, index=False)
    out_csv = tmp_path / "from_csv.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run_dir),
                "--images",
                str(easy_dir / "images"),
                "--csv",
                str(csv),
                "--out",
                str(out_csv),
            ]
        )
        == 0
    )
    assert pd.read_csv(out_csv)["image_name"].tolist() == ["IMG_005_1", "IMG_000_0"]
