"""Compare says when runs were scored on different images, when a paired test is underpowered, shows each
run at its own saved threshold and the prevalence beside PPV / NPV."""

from __future__ import annotations

import json

import pytest
from page_helpers import open_page, run, texts  # tests/ is on sys.path (pytest rootdir-relative import)
from test_compare_page import simulated, write_cohort

from melcore.compare import evaluate_predictions, image_overlap, underpowered_note
from melcore.store import Store


def plain(markdown: str) -> str:
    return markdown.replace("\\", "")


@pytest.fixture
def overlapping(tmp_path):
    store = Store()
    table = write_cohort(tmp_path / "tiny.csv")
    dataset_id = store.add_dataset("tiny", tmp_path / "tiny.csv", format="generic", options={"check_images": "none"})
    everything = store.add_run("all-images", dataset_id=dataset_id, model="efficientnet-b3", threshold=0.9)
    few = store.add_run("few-images", dataset_id=dataset_id, model="basic-cnn")
    full = simulated(table, 2.0, seed=1)
    part = simulated(table, 1.0, seed=2).iloc[:33]
    store.add_predictions(everything, full, split="val")
    store.add_predictions(few, part, split="val")
    return {"store": store, "full": full, "part": part, "few": few, "everything": everything}


def test_underpowered_note_counts_the_classes_and_stays_quiet_on_enough_images():
    note = underpowered_note(33, 8)
    assert note.startswith("underpowered: 33 shared images (8 melanoma, 25 not melanoma")
    assert underpowered_note(400, 60) == ""
    assert underpowered_note(400, 10) != ""  # few of one class


def test_compare_warns_about_different_image_sets_and_an_underpowered_paired_test(overlapping):
    at = open_page("compare.py", timeout=90)
    warnings = plain(texts(at.warning))
    n_shared, sizes = image_overlap({"a": overlapping["full"], "b": overlapping["part"]})
    assert n_shared == 33
    assert "different images**: 33 images are shared by all of them" in warnings
    assert f": {len(overlapping['full']):,}" in warnings
    n_melanoma = int(overlapping["part"]["target"].sum())
    assert f"underpowered: 33 shared images ({n_melanoma} melanoma, {33 - n_melanoma} not melanoma" in warnings


def test_each_run_is_shown_at_its_own_saved_threshold_with_the_prevalence(overlapping):
    at = open_page("compare.py", timeout=90)
    focus = at.selectbox(key="compare_focus").value
    assert "few-images" in focus  # the newest run is the focus; the other keeps its saved 0.9
    table = next(d.value for d in at.dataframe if "Threshold" in d.value.columns and "PPV" in d.value.columns)
    other = table[table["Run"].str.contains("all-images")].iloc[0]
    assert other["Threshold"] == "0.900 (saved)"
    expected = evaluate_predictions(overlapping["full"].assign(group=overlapping["full"]["patient_id"]), n_boot=10).at(
        0.9
    )
    assert other["Sensitivity"] == f"{expected['sensitivity']:.1%}"
    assert other["Prevalence"] == f"{expected['n_malignant'] / expected['n']:.1%}"
    slider = at.session_state["compare_threshold"]
    assert slider != 0.9
    focus_row = table[table["Run"].str.contains("few-images")].iloc[0]
    assert focus_row["Threshold"] == f"{slider:.3f}"
    assert any(
        "Prevalence" in c.value and "PPV, NPV and biopsies per melanoma depend on it" in c.value for c in at.caption
    )
    # the sensitivity/specificity plot marks that run at its saved threshold, with the threshold in the hover
    sweep = _sweep_markers(at)
    saved = {name: m for name, m in sweep.items() if "all-images" in name}
    assert len(saved) == 2  # sensitivity and specificity
    for name, marker in saved.items():
        metric = "sensitivity" if name.endswith("sensitivity @ threshold") else "specificity"
        assert (marker["x"][0], marker["y"][0]) == pytest.approx((0.9, expected[metric]))
        assert "threshold 0.900 (saved)" in marker["hovertemplate"]
    focus_markers = [m for name, m in sweep.items() if "few-images" in name]
    assert len(focus_markers) == 2 and all(m["x"][0] == pytest.approx(slider) for m in focus_markers)
    # one threshold for all when the toggle is off
    at.toggle(key="compare_own_thresholds").set_value(False)
    run(at)
    table = next(d.value for d in at.dataframe if "Threshold" in d.value.columns and "PPV" in d.value.columns)
    assert set(table["Threshold"]) == {f"{slider:.3f}"}


def _sweep_markers(at) -> dict:
    """Marker traces (name -> trace) of Compare's sensitivity/specificity-by-threshold plot."""
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        if spec["layout"].get("title", {}).get("text") == "Sensitivity and specificity by threshold":
            return {t["name"]: t for t in spec["data"] if t.get("name", "").endswith("@ threshold")}
    raise AssertionError("no sensitivity/specificity-by-threshold plot")
