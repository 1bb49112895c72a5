"""melcore.browse (patient table, filters, pages, joins) and melcore.images.confine."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from melcore.browse import (
    PATIENT_COLUMNS,
    Filters,
    PatientBrowser,
    dataset_roots,
    image_scores,
    lesion_frame,
    paginate,
    patient_table,
    prediction_counts,
    risk_by_image,
    run_threshold,
    sort_patients,
)
from melcore.cohort import age_band
from melcore.errors import ImageError, MelcoreError
from melcore.images import confine
from melcore.meta.features import ugly_duckling_scores
from melcore.store import Store

SITES = np.array(["torso", "lower extremity", "upper extremity", "head/neck", None], dtype=object)
CLINICS = np.array(["north", "south", "east"], dtype=object)


def synthetic_table(n: int = 33_126, n_patients: int = 2_056, seed: int = 0) -> pd.DataFrame:
    """An ISIC 2020-sized canonical table with the awkward cases: repeated lesions, unknown sex/age/site,
    unlabelled rows, patients seen at two clinics, rows without a patient id."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, n_patients, n)
    lesion = np.where(rng.random(n) < 0.2, [f"L{p}_{k}" for p, k in zip(patient, rng.integers(0, 3, n))], None)
    patient_id = np.array([f"IP_{p:05d}" for p in patient], dtype=object)
    patient_id[rng.random(n) < 0.01] = None
    sex_of_patient = rng.choice(np.array(["male", "female", None], dtype=object), n_patients, p=[0.48, 0.48, 0.04])
    age = rng.choice(np.arange(10, 90, 5), n).astype(float)
    age[rng.random(n) < 0.02] = np.nan
    target = pd.array(np.where(rng.random(n) < 0.02, 1, 0), dtype="Int8")
    target[rng.random(n) < 0.01] = pd.NA
    clinic = CLINICS[(patient + (rng.random(n) < 0.05)) % 3]
    return pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:07d}" for i in range(n)],
            "patient_id": patient_id,
            "lesion_id": lesion,
            "sex": sex_of_patient[patient],
            "age_approx": age,
            "site": rng.choice(SITES, n),
            "diagnosis": "unknown",
            "target": target,
            "clinic": clinic,
            "image_path": None,
        }
    )


def synthetic_predictions(table: pd.DataFrame, fraction: float = 0.6, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    chosen = table.sample(frac=fraction, random_state=seed)
    return pd.DataFrame(
        {"image_name": chosen["image_name"].to_numpy(), "prediction": rng.beta(0.5, 4.0, len(chosen)), "split": "val"}
    )


@pytest.fixture(scope="module")
def big():
    table = synthetic_table()
    predictions = synthetic_predictions(table)
    return table, predictions, PatientBrowser(table, predictions)


def _reference_patient(frame: pd.DataFrame) -> np.ndarray:
    """Patient key per row written with plain pandas: the patient id, else the patient of the row's lesion
    (another image of it has a patient id; the synthetic lesion ids never span two patients), else
    ``lesion:<id>``, else ``image:<name>``."""
    lesion_patient = frame.dropna(subset=["patient_id", "lesion_id"]).groupby("lesion_id")["patient_id"].min()
    patient = frame["patient_id"].fillna(frame["lesion_id"].map(lesion_patient))
    return np.where(
        patient.notna(),
        patient,
        np.where(
            frame["lesion_id"].notna(), "lesion:" + frame["lesion_id"].astype(str), "image:" + frame["image_name"]
        ),
    )


def _reference(table: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """The patient table written the obvious way with pandas groupby, independently of melcore.browse."""
    frame = table.copy()
    frame["patient"] = _reference_patient(frame)
    frame["lesion"] = frame["lesion_id"].fillna("image:" + frame["image_name"])
    frame["risk"] = frame["image_name"].map(predictions.set_index("image_name")["prediction"])
    frame["clinic_"] = frame["clinic"].fillna("unknown")
    grouped = frame.groupby("patient", sort=False)
    malignant = frame[frame["target"] == 1].groupby("patient")["lesion"].nunique()
    out = pd.DataFrame(
        {
            "clinic": grouped["clinic_"].agg(lambda v: ", ".join(sorted(set(v)))),
            "sex": grouped["sex"].agg(lambda v: v.dropna().iloc[0] if v.notna().any() else "unknown"),
            "age_min": grouped["age_approx"].min(),
            "age_max": grouped["age_approx"].max(),
            "n_images": grouped.size(),
            "n_lesions": grouped["lesion"].nunique(),
            "n_scored": grouped["risk"].count(),
            "highest_risk": grouped["risk"].max(),
        }
    )
    out["n_malignant"] = malignant.reindex(out.index).fillna(0).astype(int)
    return out.rename_axis("patient").reset_index()[list(PATIENT_COLUMNS)]


def test_patient_aggregation_matches_pandas_groupby_at_isic_scale(big):
    table, predictions, browser = big
    expected = _reference(table, predictions)
    assert len(browser) == len(expected) > 2_000
    pd.testing.assert_frame_equal(browser.summary, expected, check_dtype=False)
    # the plain groupby implementation of the module agrees too
    pd.testing.assert_frame_equal(patient_table(browser.lesions), expected, check_dtype=False)
    assert browser.summary["n_images"].sum() == len(table)
    assert (browser.summary["clinic"].str.contains(", ")).any()  # some patients were seen at two clinics


def _expected_patients(table, predictions, mask_fn, threshold=0.5):
    frame = table.copy()
    frame["patient"] = _reference_patient(frame)
    frame["risk"] = frame["image_name"].map(predictions.set_index("image_name")["prediction"])
    frame["age_band"] = age_band(frame["age_approx"])
    matching = frame[mask_fn(frame)].groupby("patient").size()
    flagged = frame[frame["risk"] >= threshold].groupby("patient").size()
    return matching, flagged


@pytest.mark.parametrize(
    "filters, mask_fn",
    [
        (Filters(), lambda f: np.ones(len(f), bool)),
        (Filters(sites=("torso",)), lambda f: f["site"] == "torso"),
        (Filters(sites=("unknown",)), lambda f: f["site"].isna()),
        (
            Filters(sexes=("female",), age_bands=("45-59", "60-74")),
            lambda f: (f["sex"] == "female") & f["age_band"].isin(["45-59", "60-74"]),
        ),
        (Filters(clinics=("south",), malignant=True), lambda f: (f["clinic"] == "south") & (f["target"] == 1)),
        (Filters(above_threshold=True, threshold=0.4), lambda f: f["risk"] >= 0.4),
        (
            Filters(sites=("head/neck",), malignant=True, above_threshold=True, threshold=0.2),
            lambda f: (f["site"] == "head/neck") & (f["target"] == 1) & (f["risk"] >= 0.2),
        ),
    ],
)
def test_filters_list_patients_with_a_matching_lesion(big, filters, mask_fn):
    table, predictions, browser = big
    matching, flagged = _expected_patients(table, predictions, mask_fn, filters.threshold)
    got = browser.patients(filters)
    assert set(got["patient"]) == set(matching.index)
    assert dict(zip(got["patient"], got["n_matching"])) == matching.to_dict()
    assert dict(zip(got["patient"], got["n_flagged"])) == {p: int(flagged.get(p, 0)) for p in got["patient"]}
    # counts in the table still cover all of a patient's images, whatever the filter
    full = browser.summary.set_index("patient")["n_images"]
    assert (got.set_index("patient")["n_images"] == full.loc[got["patient"]]).all()


def test_patients_are_sorted_by_highest_risk_with_unscored_last(big):
    _, _, browser = big
    got = browser.patients()
    risks = got["highest_risk"].to_numpy()
    scored = risks[np.isfinite(risks)]
    assert np.all(np.diff(scored) <= 0)
    assert not np.isfinite(risks[len(scored) :]).any()  # NaN only at the end
    by_patient = sort_patients(got, "patient")["patient"].tolist()
    assert by_patient == sorted(by_patient)
    with pytest.raises(MelcoreError, match="unknown sort"):
        sort_patients(got, "shoe size")


def test_a_patients_lesions_come_highest_risk_first_with_their_ugly_duckling_score(big):
    table, predictions, browser = big
    patient = browser.summary.sort_values("n_scored").iloc[-1]["patient"]
    lesions = browser.patient_lesions(patient)
    assert len(lesions) == browser.summary.set_index("patient").loc[patient, "n_images"]
    risks = lesions["risk"].to_numpy()
    n_scored = int(np.isfinite(risks).sum())
    assert np.all(np.diff(risks[:n_scored]) <= 0) and not np.isfinite(risks[n_scored:]).any()
    # the per-patient ugly-duckling score equals melcore.meta.features' computation over many patients at once
    frame = lesion_frame(table, predictions, ugly_duckling=False)
    several = frame[frame["patient"].isin(set(browser.summary["patient"].iloc[:200]) | {patient})]
    whole = ugly_duckling_scores(
        several.assign(patient_id=several["patient"]), predictions[["image_name", "prediction"]]
    )
    expected = dict(zip(several["image_name"], whole))
    np.testing.assert_allclose(
        lesions["ugly_duckling"].to_numpy(), lesions["image_name"].map(expected).to_numpy(), equal_nan=True
    )
    assert np.isfinite(lesions["ugly_duckling"].to_numpy()[:n_scored]).all()
    one = browser.lesion(lesions["image_name"].iloc[0])
    assert one["patient"] == patient and one["ugly_duckling"] == pytest.approx(lesions["ugly_duckling"].iloc[0])
    with pytest.raises(MelcoreError, match="no patient"):
        browser.patient_lesions("IP_nobody")
    with pytest.raises(MelcoreError, match="no image"):
        browser.lesion("ISIC_nothing")


def test_options_list_the_values_present_with_unknown_last(big):
    _, _, browser = big
    options = browser.options()
    assert options["site"][-1] == "unknown" and "torso" in options["site"]
    assert options["clinic"] == ["east", "north", "south"]
    assert options["age_band"][0] == "0-29" and options["age_band"][-1] == "unknown"


def test_browser_without_a_run_or_patient_ids():
    table = pd.DataFrame(
        {
            "image_name": ["a", "b", "c", "d"],
            "patient_id": [None, None, "P1", "P1"],
            "lesion_id": ["L1", "L1", None, None],
            "target": pd.array([1, 1, 0, pd.NA], dtype="Int8"),
        }
    )
    browser = PatientBrowser(table)
    assert not browser.has_scores
    summary = browser.summary.set_index("patient")
    assert summary.loc["lesion:L1", "n_images"] == 2 and summary.loc["lesion:L1", "n_lesions"] == 1
    assert summary.loc["lesion:L1", "n_malignant"] == 1 and summary.loc["P1", "n_malignant"] == 0
    assert summary["highest_risk"].isna().all()
    assert browser.patients(Filters(above_threshold=True)).empty  # nothing is scored, so nothing is flagged
    assert browser.patient_lesions("P1")["ugly_duckling"].isna().all()


def test_risk_by_image_prefers_val_then_the_latest_row():
    predictions = pd.DataFrame(
        {
            "image_name": ["a", "a", "b", "b", "c"],
            "prediction": [0.1, 0.2, 0.3, 0.4, 0.5],
            "split": ["test", "val", "val", "val", "train"],
        }
    )
    risk = risk_by_image(predictions)
    assert risk.to_dict() == {"a": 0.2, "b": 0.4, "c": 0.5}
    assert risk_by_image(None).empty
    with pytest.raises(MelcoreError, match="prediction"):
        risk_by_image(pd.DataFrame({"image_name": ["a"]}))


def test_paginate_clamps_the_page():
    frame = pd.DataFrame({"x": range(120)})
    page = paginate(frame, 3, 50)
    assert (page.page, page.n_pages, page.start, page.stop) == (3, 3, 100, 120)
    assert page.frame["x"].tolist() == list(range(100, 120))
    assert paginate(frame, 99, 50).page == 3 and paginate(frame, -4, 50).page == 1
    empty = paginate(frame.iloc[:0], 2, 50)
    assert (empty.page, empty.n_pages, len(empty.frame)) == (1, 1, 0)
    with pytest.raises(MelcoreError, match="page_size"):
        paginate(frame, 1, 0)


def test_filters_validate_the_threshold():
    with pytest.raises(MelcoreError, match="between 0 and 1"):
        Filters(threshold=1.5)
    assert Filters(sites="torso").sites == ("torso",)
    assert Filters().is_empty() and not Filters(malignant=True).is_empty()
    assert run_threshold(None) == 0.5 and run_threshold({"threshold": 0.3}) == 0.3


# --------------------------------------------------------------------------- store joins


def test_scores_of_one_image_across_runs_and_prediction_versions(demo_dir):
    store = Store()
    dataset_id, cohort = store.register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    table = cohort.table
    rng = np.random.default_rng(3)
    first = store.add_run("first", None, dataset_id=dataset_id, model="basic-cnn", threshold=0.3)
    second = store.add_run("second", None, dataset_id=dataset_id, model="resnet50")
    unscored = store.add_run("no predictions", None, dataset_id=dataset_id)
    store.add_predictions(first, table.assign(prediction=rng.random(len(table)))[["image_name", "prediction"]])
    half = table.iloc[: len(table) // 2].assign(prediction=rng.random(len(table) // 2))
    store.add_predictions(second, half[["image_name", "prediction"]], split="oof")
    counts = prediction_counts(store, [first, second, unscored])
    assert set(counts) == {first, second} and counts[first][0] == len(table) and counts[second][0] == len(half)
    runs = store.list_runs(dataset_id=dataset_id)
    name = half["image_name"].iloc[0]
    scores = image_scores(store, name, runs).set_index("run_id")
    assert set(scores.index) == {first, second}
    expected_first = store.get_predictions(first).set_index("image_name").loc[name, "prediction"]
    assert scores.loc[first, "score"] == pytest.approx(expected_first)
    assert scores.loc[first, "threshold"] == 0.3 and scores.loc[second, "threshold"] == 0.5
    assert scores.loc[first, "flagged"] == (expected_first >= 0.3)
    assert scores.loc[second, "split"] == "oof"
    late = table["image_name"].iloc[-1]  # not in the second run's predictions
    assert set(image_scores(store, late, runs)["run_id"]) == {first}
    # replacing a run's predictions changes its version (the page's cache key)
    store.add_predictions(first, table.assign(prediction=0.5)[["image_name", "prediction"]])
    assert prediction_counts(store, [first])[first] != counts[first]


def test_dataset_roots_are_the_image_folder_and_the_table_folder(tmp_path):
    images = tmp_path / "data" / "jpeg"
    images.mkdir(parents=True)
    roots = dataset_roots({"csv_path": str(tmp_path / "data" / "labels.csv"), "images_dir": str(images)})
    assert roots == [images.resolve(), (tmp_path / "data").resolve()]
    assert dataset_roots({"csv_path": str(tmp_path / "data"), "images_dir": None}) == [(tmp_path / "data").resolve()]


# --------------------------------------------------------------------------- confinement


def test_confine_accepts_paths_inside_the_roots(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "a.jpg"
    inside.write_bytes(b"x")
    assert confine(inside, [root]) == inside.resolve()
    assert confine(str(root / "sub" / ".." / "sub" / "a.jpg"), [None, tmp_path / "other", root]) == inside.resolve()
    assert confine(root / "not-yet-there.jpg", [root]) == (root / "not-yet-there.jpg").resolve()


def test_confine_refuses_paths_outside_the_roots(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    sibling = tmp_path / "images-private"
    sibling.mkdir()
    (sibling / "b.jpg").write_bytes(b"x")
    for path in (secret, root / ".." / "secret.txt", sibling / "b.jpg", "/etc/passwd"):
        with pytest.raises(ImageError, match="outside the dataset's registered folders"):
            confine(path, [root])
    link = root / "link.jpg"
    os.symlink(secret, link)  # a symlink inside the folder pointing out of it
    with pytest.raises(ImageError, match="resolves to"):
        confine(link, [root])
    with pytest.raises(ImageError, match="no dataset folder"):
        confine(root / "a.jpg", [None])
    with pytest.raises(ImageError, match="NUL"):
        confine(str(root) + "/a\x00.jpg", [root])


def test_age_bands_have_one_definition():
    """The band edges and the band function exist once, in melcore.cohort (the Patients page, Compare,
    the evaluate CLI and per-group metrics all read them from there): a second copy fails here."""
    import re
    from pathlib import Path

    import melcore

    pattern = re.compile(r"\bAGE_BANDS\s*=|\bdef _?age_bands?\s*\(|[\"']30-44[\"']")
    package = Path(melcore.__file__).parent
    hits = [
        (str(path.relative_to(package.parent)), line.strip())
        for path in sorted(package.rglob("*.py"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if pattern.search(line)
    ]
    assert {path for path, _ in hits} == {"melcore/cohort.py"}, hits
    assert sum(line.startswith("def age_band(") for _, line in hits) == 1
    assert sum(line.startswith("AGE_BANDS =") for _, line in hits) == 1


def test_a_bad_age_is_an_unknown_band_on_the_patients_page():
    frame = lesion_frame(pd.DataFrame({"image_name": ["a", "b", "c", "d"], "age_approx": [35, -4, "old", None]}))
    assert frame["age_band"].tolist() == ["30-44", "unknown", "unknown", "unknown"]
