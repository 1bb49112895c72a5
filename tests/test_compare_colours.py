"""On Compare a run keeps its colour when another run is added (colours keyed by run id)."""

from __future__ import annotations

import json

from page_helpers import open_page, run  # tests/ is on sys.path (pytest rootdir-relative import)
from test_compare_page import simulated, write_cohort

from melcore.plots import run_color
from melcore.store import Store


def roc_colours(at) -> dict:
    spec = next(
        json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
        if json.loads(c.proto.spec)["layout"].get("title", {}).get("text") == "ROC curves"
    )
    return {t["meta"]: t["line"]["color"] for t in spec["data"] if t.get("meta") and t.get("mode") != "markers"}


def test_a_run_keeps_its_colour_when_another_is_added(tmp_path):
    store = Store()
    table = write_cohort(tmp_path / "tiny.csv")
    dataset_id = store.add_dataset("tiny", tmp_path / "tiny.csv", format="generic", options={"check_images": "none"})
    ids = []
    for name, seed in (("older", 1), ("newer", 2)):
        ids.append(store.add_run(name, dataset_id=dataset_id, model="basic-cnn"))
        store.add_predictions(ids[-1], simulated(table, 1.5, seed=seed), split="val")
    at = open_page("compare.py", timeout=90)
    runs = next(m for m in at.multiselect if m.label == "Runs")
    runs.set_value([ids[0]])
    run(at)
    alone = roc_colours(at)
    (older_label,) = alone
    runs = next(m for m in at.multiselect if m.label == "Runs")
    runs.set_value([ids[1], ids[0]])  # the newer run comes first in the list
    run(at)
    both = roc_colours(at)
    assert len(both) == 2 and both[older_label] == alone[older_label] == run_color(ids[0])
    newer_label = next(k for k in both if k != older_label)
    assert both[newer_label] == run_color(ids[1]) != both[older_label]
