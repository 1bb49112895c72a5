"""Run archives (melcore/run_archive.py): ``runs export`` then ``runs import`` on a fresh home, and every refusal.

Two exported runs, each recorded in a home of its own: ``exported``, a run folder written by hand
(config, metrics, predictions, a stand-in model file; no TensorFlow, so the refusal tests are fast),
and ``trained`` (slow), a real basic-cnn trained for one epoch at 32 px on the demo cohort, for the
full round trip (Compare and predict on the imported run) and the Keras safe-mode refusal. Each test
imports the archive, or a copy altered one way, into the test's own fresh home.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melcore import run_archive, settings
from melcore.__main__ import main
from melcore.run_archive import ArchiveError, import_run
from melcore.store import Store


def _export_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("export-home")
    monkeypatch.setenv("MELREVIEW_HOME", str(home))
    monkeypatch.delenv("MELREVIEW_DB_URL", raising=False)
    monkeypatch.setenv("MELREVIEW_DATA_ROOTS", str(tmp_path_factory.getbasetemp()))
    return home


def _export(store: Store, run_id: int, out: Path) -> tuple[Path, dict, pd.DataFrame]:
    store.set_threshold(run_id, 0.4321)
    assert main(["runs", "export", str(run_id), "--out", str(out)]) == 0
    return out, store.get_run(run_id), store.get_predictions(run_id, split="val")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A hand-written finished run, recorded and exported: (zip path, run record, val predictions)."""
    from melcore.jobs import RecordedRun, record_run

    with pytest.MonkeyPatch.context() as mp:
        home = _export_home(tmp_path_factory, mp)
        run_dir = home / "runs" / "by-hand"
        (run_dir / "fold-0").mkdir(parents=True)
        rng = np.random.default_rng(0)
        n = 40
        predictions = pd.DataFrame(
            {
                "image_name": [f"ISIC_{i:07d}" for i in range(n)],
                "patient_id": [f"IP_{i // 2:03d}" for i in range(n)],
                "clinic": ["north", "south"] * (n // 2),
                "target": [int(i % 4 == 0) for i in range(n)],
                "prediction": rng.uniform(0, 1, n).round(6),
            }
        )
        predictions.to_csv(run_dir / "val_predictions.csv", index=False)
        config = {"model": "basic-cnn", "clinic": None, "image_size": 32, "epochs": 1}
        metrics = {"kind": "image", "val_auroc": 0.61, "weights": {"from_scratch": True, "note": "from scratch"}}
        (run_dir / "config.json").write_text(json.dumps(config))
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / "model.keras").write_bytes(b"a stand-in for the model file")
        (run_dir / "fold-0" / "train.log").write_text("epoch 1 loss 0.69\n" * 50)
        store = Store()
        dataset_id = store.add_dataset("demo", home / "labels.csv")
        run_id = record_run(store, RecordedRun(config, metrics, run_dir), dataset_id=dataset_id)
        return _export(store, run_id, tmp_path_factory.mktemp("archives") / "run.zip")


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    """A real run (basic-cnn, 32 px, one epoch on the demo cohort), recorded as the worker records it, exported."""
    from melcore.datasets import register_dataset
    from melcore.jobs import record_run
    from melcore.training.api import fit
    from melcore.training.config import TrainConfig

    with pytest.MonkeyPatch.context() as mp:
        home = _export_home(tmp_path_factory, mp)
        store = Store()
        dataset = register_dataset(store, "demo", demo_dir / "labels.csv", demo_dir).dataset
        config = TrainConfig(
            model="basic-cnn",
            image_size=32,
            epochs=1,
            batch_size=16,
            optimizer="adam",
            augment="none",
            seed=0,
            early_stopping_patience=None,
            workers=2,
        )
        run = fit(config, store.load_dataset_cohort(dataset["id"]), run_dir=home / "runs" / "tiny")
        run_id = record_run(store, run, dataset_id=dataset["id"])
        return _export(store, run_id, tmp_path_factory.mktemp("archives") / "trained.zip")


# --------------------------------------------------------------------------- helpers


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _manifest_for(members: dict[str, bytes], manifest: dict) -> dict:
    """``manifest`` with its file list rewritten to match ``members`` (a consistent, re-signed archive)."""
    files = [
        {"path": name[len("run/") :], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in sorted(members.items())
        if name.startswith("run/")
    ]
    return {**manifest, "files": files}


def _write(
    path: Path, members: dict[str, bytes], *, symlinks: tuple[str, ...] = (), compression=zipfile.ZIP_DEFLATED
) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return path


def _altered(
    source: Path, out: Path, changes: dict | None = None, *, resign: bool = False, manifest_edit=None, symlinks=()
) -> Path:
    """A copy of ``source`` with members replaced or added (``changes``: name -> bytes, or None to drop it).

    ``resign``: rewrite the manifest's file list to match (so only the other checks can refuse it);
    ``manifest_edit(manifest)`` changes the manifest before it is written.
    """
    members = _members(source)
    for name, data in (changes or {}).items():
        if data is None:
            members.pop(name, None)
        else:
            members[name] = data
    manifest = json.loads(members["manifest.json"])
    if resign:
        manifest = _manifest_for(members, manifest)
    if manifest_edit is not None:
        manifest_edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    return _write(out, members, symlinks=symlinks)


def _files_under(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if not p.name.startswith("store.db") and not p.name.endswith((".db-journal", ".db-wal", ".db-shm"))
    }


def _refused(store: Store, archive: Path, reason: str, tmp_path: Path, **kwargs) -> None:
    """Importing ``archive`` raises ArchiveError naming ``reason``, and leaves no file and no run behind."""
    settings.subdir("runs")  # the target folder itself
    before = _files_under(tmp_path)
    with pytest.raises(ArchiveError, match=reason):
        import_run(store, archive, **kwargs)
    assert _files_under(tmp_path) == before
    assert list(settings.subdir("runs").iterdir()) == []
    assert store.list_runs(archived=None) == []
    assert store.get_predictions(1).empty


# --------------------------------------------------------------------------- round trip


def test_export_then_import_on_a_fresh_home_registers_the_same_run(exported, tmp_path):
    from sklearn.metrics import roc_auc_score

    from melcore.compare import evaluate_predictions, load_predictions

    archive, record, predictions = exported
    manifest = json.loads(_members(archive)["manifest.json"])
    assert manifest["format"] == "melreview-run" and manifest["version"] == run_archive.ARCHIVE_VERSION
    assert manifest["run"]["threshold"] == pytest.approx(0.4321) and manifest["run"]["dataset"] == "demo"
    assert manifest["weights"] == {"from_scratch": True, "note": "from scratch"}
    assert manifest["melreview_version"] == run_archive.melreview_version()
    assert [f["path"] for f in manifest["files"]] == [
        "config.json",
        "fold-0/train.log",
        "metrics.json",
        "model.keras",
        "val_predictions.csv",
    ]

    store = Store()
    dataset_id = store.add_dataset("demo", tmp_path / "labels.csv")
    result = import_run(store, archive, check_model=False)
    assert result["dataset"] == "demo" and result["predictions"] == {"val": len(predictions)}
    imported = store.get_run(result["run_id"])
    assert Path(imported["run_dir"]).parent == settings.subdir("runs")
    for key in ("name", "kind", "model", "clinic", "from_scratch", "config", "metrics"):
        assert imported[key] == record[key], key
    assert imported["threshold"] == pytest.approx(0.4321) and imported["dataset_id"] == dataset_id
    assert imported["notes"].startswith("from scratch; imported from run.zip")
    columns = ["image_name", "patient_id", "clinic", "target", "prediction"]
    again = store.get_predictions(imported["id"], split="val")
    pd.testing.assert_frame_equal(again[columns], predictions[columns])
    for entry in manifest["files"]:  # every file is back, byte for byte
        data = (Path(imported["run_dir"]) / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]

    # Compare lists it beside the dataset's runs and evaluates the stored predictions
    assert [r["id"] for r in store.list_runs(dataset_id=dataset_id)] == [imported["id"]]
    frame, split = load_predictions(store, imported["id"])
    assert split == "val"
    evaluation = evaluate_predictions(frame, n_boot=50)
    assert evaluation.auroc == pytest.approx(roc_auc_score(predictions["target"], predictions["prediction"]))


def test_import_attaches_to_the_dataset_named(exported, tmp_path):
    archive = exported[0]
    store = Store()
    assert import_run(store, archive, check_model=False)["dataset"] is None  # no "demo" here
    other = store.add_dataset("clinic-b", tmp_path / "labels.csv")
    assert import_run(store, archive, dataset="clinic-b", check_model=False)["dataset"] == "clinic-b"
    assert import_run(store, archive, dataset=str(other), check_model=False)["dataset"] == "clinic-b"
    assert [r["dataset_id"] for r in store.list_runs()] == [other, other, None]
    with pytest.raises(Exception, match="no dataset 'nowhere'; known datasets: clinic-b"):
        import_run(store, archive, dataset="nowhere", check_model=False)
    assert len(store.list_runs()) == 3 and len(list(settings.subdir("runs").iterdir())) == 3


@pytest.mark.slow
def test_a_trained_run_imported_by_the_cli_is_usable_by_compare_and_predict(trained, demo_dir, tmp_path, capsys):
    from melcore.compare import attach_metadata, evaluate_predictions, load_predictions
    from melcore.datasets import register_dataset
    from melcore.images import load_images
    from melcore.predict import load_run_model

    archive, record, predictions = trained
    store = Store()
    assert main(["runs", "import", str(archive)]) == 0
    captured = capsys.readouterr()
    assert "dataset none" in captured.out and "--dataset NAME" in captured.err
    dataset = register_dataset(store, "demo", demo_dir / "labels.csv", demo_dir).dataset
    assert main(["runs", "import", str(archive), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "demo" and result["predictions"] == {"val": len(predictions)}
    imported = store.get_run(result["run_id"])
    for key in ("name", "kind", "model", "clinic", "from_scratch", "config", "metrics"):
        assert imported[key] == record[key], key
    assert imported["threshold"] == pytest.approx(0.4321)
    again = store.get_predictions(imported["id"], split="val")
    columns = ["image_name", "patient_id", "clinic", "target", "prediction"]
    pd.testing.assert_frame_equal(again[columns], predictions[columns])

    # Compare: the dataset's run list holds it, and its AUROC is the one the exported run recorded
    assert [r["id"] for r in store.list_runs(dataset_id=dataset["id"])] == [imported["id"]]
    frame, split = load_predictions(store, imported["id"])
    cohort = store.load_dataset_cohort(dataset["id"])
    evaluation = evaluate_predictions(attach_metadata(frame, cohort)[0], n_boot=50)
    assert split == "val" and evaluation.auroc == pytest.approx(record["metrics"]["val_auroc"], abs=1e-6)

    # predict: the imported model (loaded in safe mode) reproduces the stored scores
    model = load_run_model(imported["run_dir"])
    paths = cohort.table.set_index("image_name").loc[again["image_name"], "image_path"]
    scores = model.predict(load_images(paths, 32).astype("float32"), verbose=0).reshape(-1)
    np.testing.assert_allclose(scores, again["prediction"].to_numpy(), atol=1e-5)


# --------------------------------------------------------------------------- refusals


def test_a_tampered_file_is_refused_for_its_checksum(exported, tmp_path):
    archive = exported[0]
    csv = _members(archive)["run/val_predictions.csv"]
    first_digit = next(i for i, b in enumerate(csv) if chr(b).isdigit() and i > csv.index(b"\n"))
    flipped = (
        csv[:first_digit] + (b"1" if csv[first_digit : first_digit + 1] != b"1" else b"2") + csv[first_digit + 1 :]
    )
    assert len(flipped) == len(csv)
    bad = _altered(archive, tmp_path / "bad.zip", {"run/val_predictions.csv": flipped})
    _refused(Store(), bad, r"checksum mismatch for val_predictions\.csv", tmp_path)


def test_a_damaged_zip_member_is_refused_as_damaged(exported, tmp_path):
    data = bytearray(exported[0].read_bytes())
    with zipfile.ZipFile(exported[0]) as archive:
        info = archive.getinfo("run/metrics.json")
    # a byte inside metrics.json's compressed data (after its local header), the central directory intact
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[offset] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    _refused(Store(), bad, r"metrics\.json does not unpack .*damaged", tmp_path)


def test_a_file_listed_in_the_manifest_but_missing_is_refused(exported, tmp_path):
    bad = _altered(exported[0], tmp_path / "bad.zip", {"run/config.json": None})
    _refused(Store(), bad, r"files listed in the manifest are missing: run/config\.json", tmp_path)


def test_an_extra_unlisted_file_is_refused(exported, tmp_path):
    bad = _altered(exported[0], tmp_path / "bad.zip", {"run/extra.py": b"print('hello')\n"})
    _refused(Store(), bad, r"files not listed in the manifest: run/extra\.py", tmp_path)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("run/../escape.txt", "climbs out with '..'"),
        ("../escape.txt", "climbs out with '..'"),
        ("/tmp/escape.txt", "has an absolute name"),
        ("C:/escape.txt", "has an absolute name"),
        ("run\\..\\escape.txt", "has a backslash"),
    ],
)
def test_names_leaving_the_target_are_refused(exported, tmp_path, name, reason):
    members = _members(exported[0])
    members[name] = b"escaped"
    manifest = json.loads(members["manifest.json"])
    members["manifest.json"] = json.dumps(manifest).encode()
    bad = _write(tmp_path / "bad.zip", members)
    _refused(Store(), bad, reason, tmp_path)
    assert not (tmp_path.parent / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()


def test_a_manifest_entry_leaving_the_target_is_refused(exported, tmp_path):
    def climb(manifest):
        manifest["files"].append({"path": "../../escape.txt", "bytes": 7, "sha256": "0" * 64})

    bad = _altered(exported[0], tmp_path / "bad.zip", manifest_edit=climb)
    _refused(Store(), bad, "climbs out with '..'", tmp_path)


@pytest.mark.parametrize(
    "first, reason", [("x", "x/y lies inside another member's file"), ("x/y", "x is also another member's folder")]
)
def test_a_file_and_a_folder_of_the_same_name_are_refused(exported, tmp_path, first, reason):
    def unpack_first(manifest):  # the manifest's order is the order of unpacking
        manifest["files"].sort(key=lambda entry: entry["path"] != first)

    bad = _altered(
        exported[0], tmp_path / "bad.zip", {"run/x": b"one", "run/x/y": b"two"}, resign=True, manifest_edit=unpack_first
    )
    _refused(Store(), bad, f"{reason}; refused", tmp_path)


def test_a_symlink_member_is_refused(exported, tmp_path):
    bad = _altered(
        exported[0], tmp_path / "bad.zip", {"run/link.csv": b"/etc/passwd"}, resign=True, symlinks=("run/link.csv",)
    )
    _refused(Store(), bad, r"member 'run/link\.csv' is a symbolic link", tmp_path)


def test_an_archive_over_the_size_limit_is_refused(exported, tmp_path, monkeypatch):
    archive = exported[0]
    total = sum(f["bytes"] for f in json.loads(_members(archive)["manifest.json"])["files"])
    _refused(
        Store(),
        archive,
        f"would unpack to {total:,} bytes, more than the {total - 1:,} accepted",
        tmp_path,
        max_bytes=total - 1,
    )
    monkeypatch.setenv("MELREVIEW_IMPORT_MAX_BYTES", "1K")
    _refused(Store(), archive, "more than the 1,024 accepted", tmp_path)


def test_a_zip_bomb_member_is_refused_for_its_ratio(exported, tmp_path):
    bad = _altered(exported[0], tmp_path / "bad.zip", {"run/padding.bin": bytes(8 * 1024**2)}, resign=True)
    _refused(Store(), bad, r"run/padding\.bin unpacks .* times its compressed size .*zip bomb", tmp_path)


def test_a_member_larger_than_the_manifest_says_is_refused(exported, tmp_path):
    def shrink(manifest):
        next(f for f in manifest["files"] if f["path"] == "metrics.json")["bytes"] -= 1

    bad = _altered(exported[0], tmp_path / "bad.zip", manifest_edit=shrink)
    _refused(
        Store(), bad, r"run/metrics\.json is [\d,]+ bytes, the manifest says [\d,]+; the archive was altered", tmp_path
    )


def test_a_file_that_is_not_a_zip_is_refused(tmp_path, capsys):
    bad = tmp_path / "run.zip"
    bad.write_text("image_name,prediction\nISIC_1,0.5\n")
    _refused(Store(), bad, "is not a readable zip archive", tmp_path)
    assert main(["runs", "import", str(tmp_path / "absent.zip")]) == 2
    assert "absent.zip not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "manifest, reason",
    [
        (None, "has no manifest.json: not a melreview run archive"),
        (b"{not json", r"manifest\.json is not valid JSON; the archive is damaged"),
        (b"\xff\xfe garbage", r"manifest\.json is not valid JSON"),
        (b"[1, 2]", "is not a melreview-run manifest"),
        (json.dumps({"format": "other"}).encode(), "is not a melreview-run manifest"),
        (
            json.dumps({"format": "melreview-run", "version": 99, "files": [], "run": {}}).encode(),
            "archive version 99; this melreview reads version 1 .upgrade melreview.",
        ),
        (
            json.dumps({"format": "melreview-run", "version": "1", "files": [], "run": {}}).encode(),
            "archive version '1'",
        ),
        (
            json.dumps({"format": "melreview-run", "version": 1, "files": [{"path": "x"}], "run": {}}).encode(),
            r"no valid file list \(path, bytes, sha256 for each\)",
        ),
        (json.dumps({"format": "melreview-run", "version": 1, "files": []}).encode(), "describes no run"),
    ],
)
def test_a_missing_or_garbled_manifest_or_wrong_version_is_refused(exported, tmp_path, manifest, reason):
    members = _members(exported[0])
    if manifest is None:
        del members["manifest.json"]
    else:
        members["manifest.json"] = manifest
    _refused(Store(), _write(tmp_path / "bad.zip", members), reason, tmp_path)


def test_a_bad_threshold_or_bad_predictions_are_refused_before_registering(exported, tmp_path):
    def threshold(manifest):
        manifest["run"]["threshold"] = 7

    store = Store()
    bad = _altered(exported[0], tmp_path / "t.zip", manifest_edit=threshold)
    _refused(store, bad, r"gives the threshold 7; a threshold is a number in \[0, 1\]", tmp_path)

    csv = _members(exported[0])["run/val_predictions.csv"].decode().splitlines()
    header = csv[0].split(",")
    row = csv[2].split(",")
    row[header.index("prediction")] = "1.5"
    csv[2] = ",".join(row)
    bad = _altered(
        exported[0], tmp_path / "p.zip", {"run/val_predictions.csv": ("\n".join(csv) + "\n").encode()}, resign=True
    )
    _refused(
        store,
        bad,
        r"val_predictions\.csv row 3: prediction is not a probability in \[0, 1\]",
        tmp_path,
        check_model=False,
    )

    csv = _members(exported[0])["run/val_predictions.csv"].decode().splitlines()
    row = csv[4].split(",")
    row[header.index("target")] = "malignant"
    csv[4] = ",".join(row)
    bad = _altered(
        exported[0], tmp_path / "y.zip", {"run/val_predictions.csv": ("\n".join(csv) + "\n").encode()}, resign=True
    )
    _refused(store, bad, r"val_predictions\.csv row 5: target is neither 0, 1 nor empty", tmp_path, check_model=False)


@pytest.mark.slow
def test_a_model_that_needs_unsafe_loading_is_refused(exported, tmp_path):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "unsafe.keras")
    unsafe = (tmp_path / "unsafe.keras").read_bytes()
    (tmp_path / "unsafe.keras").unlink()
    bad = _altered(exported[0], tmp_path / "bad.zip", {"run/model.keras": unsafe}, resign=True)
    _refused(Store(), bad, r"model\.keras does not load in Keras safe mode", tmp_path)


def test_a_run_the_store_refuses_leaves_no_folder_and_no_run(exported, tmp_path):
    """Registration fails after unpacking (an image name longer than the store keeps): nothing is kept."""
    csv = _members(exported[0])["run/val_predictions.csv"].decode().splitlines()
    header = csv[0].split(",")
    row = csv[1].split(",")
    row[header.index("image_name")] = "x" * 5000
    csv[1] = ",".join(row)
    bad = _altered(
        exported[0], tmp_path / "bad.zip", {"run/val_predictions.csv": ("\n".join(csv) + "\n").encode()}, resign=True
    )
    store = Store()
    settings.subdir("runs")
    before = _files_under(tmp_path)
    with pytest.raises(Exception, match="predictions not stored: the image name is 5,000 characters long"):
        import_run(store, bad, check_model=False)
    assert _files_under(tmp_path) == before and list(settings.subdir("runs").iterdir()) == []
    assert store.list_runs(archived=None) == [] and store.get_predictions(1).empty


def test_export_refuses_an_unfinished_folder_an_existing_target_and_a_symlink(exported, tmp_path):
    run_dir = Path(exported[1]["run_dir"])
    with pytest.raises(ArchiveError, match="holds no metrics.json"):
        run_archive.export_run(tmp_path, tmp_path.parent / "x.zip")
    with pytest.raises(ArchiveError, match="exists; choose a new file name"):
        run_archive.export_run(run_dir, exported[0])
    with pytest.raises(ArchiveError, match="inside the run folder"):
        run_archive.export_run(run_dir, run_dir / "self.zip")
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("metrics.json", "config.json"):
        (linked / name).write_bytes((run_dir / name).read_bytes())
    os.symlink("/etc/hostname", linked / "model.keras")
    with pytest.raises(ArchiveError, match="model.keras is a symbolic link"):
        run_archive.export_run(linked, tmp_path / "linked.zip")
    assert not (tmp_path / "linked.zip").exists()
