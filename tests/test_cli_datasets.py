"""``python -m melcore datasets``, ``demo --register`` and ISIC-layout image roots: the Home page's checks from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from PIL import Image

from melcore.__main__ import main
from melcore.datasets import RECORD_FIELDS
from melcore.store import Store


def _tiny_isic_root(folder: Path) -> Path:
    """An ISIC-layout root: train.csv and jpeg/train/ with 6 images, one row without its file."""
    images = folder / "jpeg" / "train"
    images.mkdir(parents=True)
    rows = []
    for i in range(6):
        Image.new("RGB", (32, 32), (100 + 20 * i, 80, 60)).save(images / f"ISIC_{i:07d}.jpg")
        rows.append(
            {
                "image_name": f"ISIC_{i:07d}",
                "patient_id": f"IP_{i // 2}",
                "target": int(i == 0),
                "anatom_site_general_challenge": "torso",
                "clinic": "north" if i < 3 else "south",
            }
        )
    rows.append(
        {
            "image_name": "ISIC_9999999",
            "patient_id": "IP_9",
            "target": 0,
            "anatom_site_general_challenge": "torso",
            "clinic": "south",
        }
    )
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)
    return folder


def test_demo_register_registers_the_cohort_as_the_app_does_and_its_root_is_an_image_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--patients", "12", "--register"]) == 0
    printed = capsys.readouterr().out
    assert "dataset: 'demo' (#1) registered" in printed
    stored = Store().get_dataset("demo")
    assert stored["is_demo"] and Path(stored["images_dir"]) == (out / "jpeg" / "train").resolve()
    assert stored["summary"]["n_missing_images"] == 0 and "shortcut_audit" in stored["summary"]
    # a second --register finds it instead of failing on the name
    assert main(["demo", "--out", str(out), "--patients", "12", "--register"]) == 0
    assert "already registered" in capsys.readouterr().out
    assert len(Store().list_datasets()) == 1

    # the root printed by demo works as --images for inspect, which names the folder it used
    assert main(["inspect", "--csv", str(out / "labels.csv"), "--images", str(out), "--json", "--audit", "none"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_missing_images"] == 0 and summary["n_images"] > 0
    assert summary["images_dir"] == str((out / "jpeg" / "train").resolve())
    assert any("ISIC-layout root" in n and "jpeg/train" in n for n in summary["notes"])


def test_jobs_submit_on_a_fresh_home_registers_the_demo(capsys):
    assert Store().list_datasets() == []
    assert (
        main(["jobs", "submit", "--dataset", "demo", "--model", "basic-cnn", "--image-size", "32", "--each-clinic"])
        == 0
    )
    ids = [int(line) for line in capsys.readouterr().out.split()]
    store = Store()
    (dataset,) = store.list_datasets()
    assert dataset["name"] == "demo" and dataset["is_demo"]
    assert len(ids) == len(dataset["summary"]["clinics"]) == 3
    assert {store.get_job(i)["dataset_id"] for i in ids} == {dataset["id"]}
    # any other unknown name is still an error naming what is registered
    assert main(["jobs", "submit", "--dataset", "nope", "--model", "basic-cnn"]) == 2
    assert "no dataset 'nope'; known datasets: demo" in capsys.readouterr().err


def test_datasets_add_applies_the_home_checks_and_prints_the_warnings(tmp_path, capsys, monkeypatch):
    root = _tiny_isic_root(tmp_path / "isic")
    assert (
        main(
            [
                "datasets",
                "add",
                "tiny",
                "--csv",
                str(root / "train.csv"),
                "--images",
                str(root),
                "--clinic-column",
                "clinic",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "registered 'tiny' (#1): 7 images" in captured.out
    assert f"images dir   {(root / 'jpeg' / 'train').resolve()}" in captured.out
    assert "note: image folder" in captured.err and "ISIC-layout root" in captured.err
    assert "warning: 1 of 7 image files not found" in captured.err and "ISIC_9999999" in captured.err
    assert Store().get_dataset("tiny")["summary"]["clinics"] == {"south": 4, "north": 3}

    # the name is taken: refused, nothing changes
    assert main(["datasets", "add", "tiny", "--csv", str(root / "train.csv")]) == 2
    assert "already exists" in capsys.readouterr().err
    # a name is required (as on Home)
    assert main(["datasets", "add", "  ", "--csv", str(root / "train.csv")]) == 2
    assert "give the dataset a name" in capsys.readouterr().err
    # outside the data roots: refused, named, nothing registered
    monkeypatch.setenv("MELREVIEW_DATA_ROOTS", str(tmp_path / "elsewhere"))
    assert main(["datasets", "add", "other", "--csv", str(root / "train.csv"), "--images", str(root)]) == 2
    assert "outside the folders datasets may be registered from" in capsys.readouterr().err
    assert [d["name"] for d in Store().list_datasets()] == ["tiny"]


def test_datasets_list_and_show_json_have_the_documented_fields(tmp_path, capsys):
    root = _tiny_isic_root(tmp_path / "isic")
    assert main(["datasets", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["datasets", "add", "tiny", "--csv", str(root / "train.csv"), "--images", str(root)]) == 0
    capsys.readouterr()
    store = Store()
    dataset_id = store.get_dataset("tiny")["id"]
    store.add_run("r", tmp_path, dataset_id=dataset_id)
    store.submit_job({"model": "basic-cnn"}, dataset_id=dataset_id)
    assert main(["datasets", "list", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert list(record) == list(RECORD_FIELDS)
    assert record["n_images"] == 7 and record["n_missing_images"] == 1 and record["runs"] == 1
    assert record["jobs"] == {"queued": 1} and record["is_demo"] is False
    assert main(["datasets", "show", "tiny", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: shown[k] for k in RECORD_FIELDS} == record
    assert {"options", "notes", "shortcut_audit"} <= set(shown)
    assert main(["datasets", "show", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "images dir" in text and "1 queued" in text and "ISIC_9999999" in text
    assert main(["datasets", "show", "nope"]) == 2
    assert "known datasets: tiny" in capsys.readouterr().err


def test_datasets_remove_refuses_busy_datasets_and_never_deletes_runs_or_images(tmp_path, capsys):
    root = _tiny_isic_root(tmp_path / "isic")
    assert main(["datasets", "add", "tiny", "--csv", str(root / "train.csv"), "--images", str(root)]) == 0
    store = Store()
    dataset_id = store.get_dataset("tiny")["id"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    run_id = store.add_run("r", run_dir, dataset_id=dataset_id)
    job_id = store.submit_job({"model": "basic-cnn"}, dataset_id=dataset_id)
    capsys.readouterr()

    assert main(["datasets", "remove", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"job(s) #{job_id} (queued)" in err and "jobs cancel" in err
    assert store.find_dataset("tiny") is not None

    store.request_cancel(job_id)
    assert main(["datasets", "remove", "tiny"]) == 0
    assert "1 run(s) and 1 finished job(s) kept" in capsys.readouterr().out
    assert store.find_dataset("tiny") is None
    assert store.get_run(run_id)["dataset_id"] is None and (run_dir / "metrics.json").is_file()
    assert len(list((root / "jpeg" / "train").glob("*.jpg"))) == 6 and (root / "train.csv").is_file()
    # the name is free again
    assert main(["datasets", "add", "tiny", "--csv", str(root / "train.csv"), "--images", str(root)]) == 0
