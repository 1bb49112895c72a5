"""melcore.demo: the synthetic ISIC 2020-style cohort and ``python -m melcore demo``."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_main
from PIL import Image

from melcore import demo
from melcore.errors import ConfigError, MelcoreError
from melcore.images import load_images

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ISIC2020_COLUMNS = [
    "image_name",
    "patient_id",
    "sex",
    "age_approx",
    "anatom_site_general_challenge",
    "diagnosis",
    "benign_malignant",
    "target",
]


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "jpeg" / "train").glob("*.jpg"))}


def test_same_seed_same_bytes_and_pixels_other_seed_differs(tmp_path):
    a = demo.make_demo_cohort(tmp_path / "a", n_patients=4, seed=3)
    b = demo.make_demo_cohort(tmp_path / "b", n_patients=4, seed=3)
    c = demo.make_demo_cohort(tmp_path / "c", n_patients=4, seed=4)
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()
    pa, pb = pixels(a), pixels(b)
    assert pa.keys() == pb.keys() and len(pa) == len(read_rows(a))
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name])
    assert (a / "labels.csv").read_bytes() != (c / "labels.csv").read_bytes()
    assert set(pixels(c)) != set(pa)


def test_table_has_isic2020_columns_and_consistent_values(demo_dir):
    rows = read_rows(demo_dir)
    with open(demo_dir / "labels.csv", encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    assert [c for c in header if c not in ("lesion_id", "clinic")] == ISIC2020_COLUMNS
    assert set(header) == set(ISIC2020_COLUMNS) | {"lesion_id", "clinic"}

    names = [r["image_name"] for r in rows]
    assert len(set(names)) == len(names) and all(n.startswith("ISIC_") and len(n) == 12 for n in names)
    for r in rows:
        assert r["target"] in ("0", "1")
        assert r["benign_malignant"] == ("malignant" if r["target"] == "1" else "benign")
        assert (r["diagnosis"] == "melanoma") == (r["target"] == "1")
        assert r["sex"] in ("male", "female", "")
        assert r["age_approx"] == "" or (15 <= int(r["age_approx"]) <= 90 and int(r["age_approx"]) % 5 == 0)
        assert r["clinic"] in demo.CLINICS

    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    assert len(by_patient) == 40
    for patient_rows in by_patient.values():
        assert 1 <= len({r["lesion_id"] for r in patient_rows}) <= 8
        for key in ("clinic", "sex", "age_approx"):
            assert len({r[key] for r in patient_rows}) == 1, key  # patient-level facts agree
    lesion_owner = {}
    for r in rows:
        assert lesion_owner.setdefault(r["lesion_id"], r["patient_id"]) == r["patient_id"]
        assert (demo_dir / "jpeg" / "train" / f"{r['image_name']}.jpg").is_file()


def test_malignant_rate_clinics_and_image_sizes(demo_dir):
    rows = read_rows(demo_dir)
    rate = np.mean([r["target"] == "1" for r in rows])
    assert 0.08 <= rate <= 0.16
    clinics = {r["clinic"] for r in rows}
    assert clinics == set(demo.CLINICS)
    for clinic in clinics:
        look = demo.CLINICS[clinic]
        sample = next(r for r in rows if r["clinic"] == clinic)
        with Image.open(demo_dir / "jpeg" / "train" / f"{sample['image_name']}.jpg") as im:
            assert im.size == (look.width, look.height) and im.mode == "RGB"
    manifest = json.loads((demo_dir / "demo.json").read_text())
    assert manifest["n_images"] == len(rows) and manifest["seed"] == 7 and manifest["version"] == demo.DEMO_VERSION


def test_metadata_carries_some_signal():
    rows = demo._make_table(400, seed=0)  # metadata only, no drawing
    ages = {t: [r["age_approx"] for r in rows if r["target"] == t and r["age_approx"] is not None] for t in (0, 1)}
    assert np.mean(ages[1]) > np.mean(ages[0]) + 3
    rate = np.mean([r["target"] for r in rows])
    assert abs(rate - demo.MALIGNANT_RATE) < 0.02


def test_malignant_cues_survive_downscaling(demo_dir):
    """Blue-grey areas, the main malignant cue, are visible at 32 px (a sign a small CNN can learn it)."""
    from sklearn.metrics import roc_auc_score

    rows = read_rows(demo_dir)
    images = load_images([demo_dir / "jpeg" / "train" / f"{r['image_name']}.jpg" for r in rows], 32)
    x = images.astype(np.int16)
    bluish = ((x[..., 2] > x[..., 0]) & (x.mean(-1) > 40)).mean(axis=(1, 2))
    targets = [int(r["target"]) for r in rows]
    assert roc_auc_score(targets, bluish) > 0.85


def test_two_views_of_a_lesion_share_the_lesion(tmp_path):
    rows = demo._make_table(60, seed=1)
    pairs = {}
    for r in rows:
        pairs.setdefault(r["lesion_id"], []).append(r)
    twice = [v for v in pairs.values() if len(v) == 2]
    assert twice, "some lesions should have a second image"
    first, second = twice[0]
    assert first["_lesion_seed"] == second["_lesion_seed"] and first["_view_seed"] != second["_view_seed"]
    assert first["target"] == second["target"] and first["image_name"] != second["image_name"]


def test_output_folder_rules(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("keep me")
    with pytest.raises(MelcoreError, match="not empty"):
        demo.make_demo_cohort(foreign, n_patients=1)
    assert (foreign / "thesis.docx").exists()

    out = demo.make_demo_cohort(tmp_path / "d", n_patients=3, seed=0)
    first = set(pixels(out))
    demo.make_demo_cohort(out, n_patients=2, seed=5)  # an earlier demo is replaced, not mixed
    assert set(pixels(out)) == {r["image_name"] + ".jpg" for r in read_rows(out)} != first

    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ConfigError, match="n_patients"):
            demo.make_demo_cohort(tmp_path / "x", n_patients=bad)
    with pytest.raises(ConfigError, match="seed"):
        demo.make_demo_cohort(tmp_path / "x", n_patients=1, seed=-1)


def test_ensure_demo_builds_once_under_home(melreview_home, monkeypatch):
    seen = []
    folder = demo.ensure_demo(n_patients=2, seed=1, progress=lambda done, total: seen.append((done, total)))
    assert folder.parent == melreview_home / "demo"
    assert (folder / "labels.csv").is_file() and seen[-1][0] == seen[-1][1] > 0
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left

    def must_not_run(*args, **kwargs):
        raise AssertionError("the demo was built again")

    monkeypatch.setattr(demo, "make_demo_cohort", must_not_run)
    assert demo.ensure_demo(n_patients=2, seed=1) == folder


def test_cli_writes_a_demo_and_reports_errors(tmp_path):
    out = tmp_path / "cli-demo"
    with contextlib.chdir(PROJECT_ROOT):  # in this process (tests/cli_helpers.py)
        done = run_main(["demo", "--out", str(out), "--patients", "3", "--seed", "2"])
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert f"{len(rows)} images" in done.stdout and "3 patients" in done.stdout
    assert len(list((out / "jpeg" / "train").glob("*.jpg"))) == len(rows)

    with contextlib.chdir(PROJECT_ROOT):
        bad = run_main(["demo", "--out", str(tmp_path / "y"), "--patients", "0"])
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "n_patients" in bad.stderr
