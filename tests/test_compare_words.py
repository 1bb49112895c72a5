"""Compare names the classes by what the dataset's target means: melanoma / not melanoma unless it is
malignant vs benign (melcore.classes)."""

from __future__ import annotations

import json

import pytest
from page_helpers import open_page  # tests/ is on sys.path (pytest rootdir-relative import)
from test_compare_page import simulated, write_cohort

from melcore.classes import MALIGNANT, MELANOMA
from melcore.store import Store


@pytest.mark.parametrize("classes", [MELANOMA, MALIGNANT], ids=["melanoma", "malignant"])
def test_tables_metrics_and_figures_use_the_datasets_class_words(tmp_path, classes):
    store = Store()
    table = write_cohort(tmp_path / "tiny.csv")
    dataset_id = store.add_dataset(
        "tiny",
        tmp_path / "tiny.csv",
        format="generic",
        options={"check_images": "none"},
        summary={"classes": classes.to_dict()},
    )
    for name, seed in (("one", 1), ("two", 2)):
        run_id = store.add_run(name, dataset_id=dataset_id, model="basic-cnn")
        store.add_predictions(run_id, simulated(table, 1.5, seed=seed), split="val")
    at = open_page("compare.py", timeout=90)
    count = "Melanomas" if classes is MELANOMA else "Malignant lesions"
    per = "melanoma" if classes is MELANOMA else "malignant lesion"
    other = "Malignant lesions" if classes is MELANOMA else "Melanomas"
    columns = [set(d.value.columns) for d in at.dataframe]
    summary = next(c for c in columns if "Weights" in c)
    assert count in summary and other not in summary and "Malignant" not in summary
    at_threshold = next(c for c in columns if "Threshold" in c and "PPV" in c)
    assert f"Biopsies / {per}" in at_threshold
    pairs = next(c for c in columns if "DeLong p" in c)
    assert count in pairs
    assert any(m.label == f"Biopsies / {per}" for m in at.metric)
    sensitivity = next(m for m in at.metric if m.label == "Sensitivity")
    assert classes.positive_plural in sensitivity.proto.help
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    confusion = next(s for s in specs if s["layout"].get("title", {}).get("text") == "Focus run")
    assert confusion["data"][0]["y"] == [classes.positive, classes.negative]
    calibration = next(s for s in specs if s["layout"].get("title", {}).get("text") == "Calibration")
    assert calibration["layout"]["yaxis"]["title"]["text"] == f"observed {classes.positive} fraction"
