"""``python -m melcore inspect``: JSON / text output and exit codes (``main(argv)`` from the project root)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from cli_helpers import run_main
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def inspect(*args) -> subprocess.CompletedProcess:
    """``python -m melcore inspect ARGS`` run from the project root, in this process (tests/cli_helpers.py)."""
    with contextlib.chdir(PROJECT_ROOT):
        return run_main(["inspect", *map(str, args)])


def make_isic2020(folder: Path, with_images=("ISIC_1", "ISIC_2", "ISIC_3")) -> Path:
    csv = folder / "train.csv"
    csv.write_text(
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n"
        "ISIC_1,IP_1,male,45,torso,unknown,benign,0\n"
        "ISIC_2,IP_1,male,45,torso,melanoma,malignant,1\n"
        "ISIC_3,IP_2,female,50,head/neck,nevus,benign,0\n"
        "ISIC_4,IP_3,female,55,torso,unknown,benign,0\n"
    )
    images = folder / "jpeg" / "train"
    images.mkdir(parents=True)
    for name in with_images:
        Image.new("RGB", (32, 32), (120, 80, 60)).save(images / f"{name}.jpg")
    return csv


def test_json_output_counts_and_missing_images_exit_0(tmp_path):
    csv = make_isic2020(tmp_path)
    result = inspect("--csv", csv, "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object
    data = json.loads(lines[0])
    assert (data["n_images"], data["n_lesions"], data["n_patients"], data["n_malignant"]) == (4, 4, 3, 1)
    assert data["n_missing_images"] == 1 and data["missing_images"] == ["ISIC_4"]
    assert data["clinics"] == {"unknown": 4}
    assert data["format"] == "isic2020" and data["grouping"] == "patient_id"
    assert any("ISIC_4" in w for w in data["warnings"])
    assert data["images_dir"] == str((tmp_path / "jpeg" / "train").resolve())


def test_text_output(tmp_path):
    csv = make_isic2020(tmp_path)
    clinics = tmp_path / "clinics.csv"
    clinics.write_text("isic_id,attribution\nISIC_1,Clinic A\nISIC_2,Clinic A\nISIC_3,Clinic B\n")
    result = inspect("--csv", csv, "--clinic-csv", clinics)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "patients             3  (grouped by patient_id)" in out
    assert "malignant            1 (25.00% of 4 labelled)" in out
    assert "missing img          1" in out
    assert "2  Clinic A" in out and "1  Clinic B" in out and "1  unknown" in out
    assert "warnings" in out and "ISIC_4" in out


def test_clinic_column_metadata_and_decode_options(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("image_name,target,source\na,0,site1\nb,1,site2\nc,0,site2\n")
    images = tmp_path / "pics"
    images.mkdir()
    for name in "ab":
        Image.new("RGB", (32, 32)).save(images / f"{name}.jpg")
    (images / "c.jpg").write_text("broken")
    meta = tmp_path / "meta.csv"
    meta.write_text("image_name,lesion_id\na,L1\nb,L1\nc,L2\n")
    result = inspect(
        "--csv",
        csv,
        "--images",
        images,
        "--clinic-column",
        "source",
        "--metadata",
        meta,
        "--check-images",
        "decode",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["clinics"] == {"site2": 2, "site1": 1}
    assert data["n_lesions"] == 2 and data["grouping"] == "lesion_id"
    assert data["n_unreadable_images"] == 1 and data["unreadable_images"][0][0] == "c"


def test_folders_and_mapping(tmp_path):
    root = tmp_path / "classes"
    for cls, names in {"melanoma": ["m1"], "nevus": ["n1", "n2"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (32, 32)).save(root / cls / f"{name}.jpg")
    data = json.loads(inspect("--csv", root, "--format", "folders", "--json").stdout)
    assert (data["n_images"], data["n_malignant"], data["format"]) == (3, 1, "folders")

    csv = tmp_path / "study.csv"
    csv.write_text("file,outcome\nm1.jpg,1\nn1.jpg,0\n")
    result = inspect(
        "--csv", csv, "--images", root / "melanoma", "--map", "image_name=file", "--map", "target=outcome", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["format"], data["n_malignant"], data["missing_images"]) == ("mapping", 1, ["n1"])


def test_missing_columns_exit_2_with_one_line_reason(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("picture,target\na,1\n")
    result = inspect("--csv", csv, "--format", "generic")
    assert result.returncode == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("error:") and "picture, target" in message and "--format" in message


def test_duplicates_and_bad_labels_exit_2(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("image_name,target\na,0\na,1\n")
    result = inspect("--csv", csv)
    assert result.returncode == 2 and "a (lines 2, 3)" in result.stderr
    csv.write_text("image_name,target\na,0\nb,7\n")
    result = inspect("--csv", csv, "--json")
    assert result.returncode == 2 and "line 3 (b): '7'" in result.stderr


def test_unreadable_inputs_exit_2(tmp_path):
    result = inspect("--csv", tmp_path / "missing.csv")
    assert result.returncode == 2 and "missing.csv does not exist" in result.stderr
    bad_map = inspect("--csv", tmp_path / "missing.csv", "--map", "image_name")
    assert bad_map.returncode == 2 and "expected CANONICAL=COLUMN" in bad_map.stderr


def test_real_isic2020_train(isic2020_dir):
    result = inspect("--csv", isic2020_dir / "train.csv", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["n_images"], data["n_patients"], data["n_malignant"]) == (33126, 2056, 584)
    on_disk = len(list((isic2020_dir / "jpeg" / "train").glob("*.jpg")))
    assert data["n_missing_images"] == 33126 - on_disk


def test_real_derm_dev_with_source_clinic(derm_real_dir):
    result = inspect("--csv", derm_real_dir / "labels.csv", "--clinic-column", "source", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["n_images"], data["n_malignant"], data["format"]) == (1209, 124, "generic")
    assert data["clinics"] == {"HAM10000": 904, "ISIC archive 2016-2018": 305}
