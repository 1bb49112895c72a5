"""Compare's "Readers against the model" section, driven by AppTest on a store holding a reader study.

Three synthetic readers read the same labelled lesions of one run blinded and aided (two of
them with confidences); the section's table, ROC figure, CSV and PNG are checked against
:mod:`melcore.readers` computed here on the same store, and against counts made by hand.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import streamlit.testing.v1.app_test as app_test_module
from page_helpers import open_page, texts  # tests/ is on sys.path (pytest rootdir-relative import)
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from melcore.classes import MALIGNANT, MELANOMA
from melcore.readers import MIN_READS, model_on_reads, reader_table, study_reads, wilson_interval
from melcore.store import Store

N_PATIENTS = 30  # two lesions each
READERS = {"Dr A": (0.85, 0.70), "Dr B": (0.70, 0.85), "Dr <C>": (0.95, 0.55)}  # (sensitivity, specificity)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cohort(tmp_path) -> pd.DataFrame:
    rng = np.random.default_rng(21)
    n = 2 * N_PATIENTS
    target = np.zeros(n, dtype=int)
    target[rng.choice(n, 18, replace=False)] = 1
    table = pd.DataFrame(
        {
            "image_name": [f"IMG_{i:03d}" for i in range(n)],
            "patient_id": [f"P{i // 2:03d}" for i in range(n)],
            "clinic": "A",
            "target": target,
        }
    )
    table.to_csv(tmp_path / "study.csv", index=False)
    return table


def _read(
    store: Store,
    run_id: int,
    table: pd.DataFrame,
    reviewer: str,
    sensitivity: float,
    specificity: float,
    *,
    aided: bool,
    seed: int,
    confidence: bool,
) -> pd.DataFrame:
    """One reader's read of every lesion: biopsy with the given probabilities; the decisions saved and returned."""
    rng = np.random.default_rng(seed)
    y = table["target"].to_numpy()
    u = rng.random(len(y))
    biopsy = np.where(y == 1, u < sensitivity, u >= specificity)
    decisions = np.where(biopsy, "biopsy", np.where(rng.random(len(y)) < 0.5, "follow-up", "reassure"))
    scores = np.clip(np.round(50 + 20 * (rng.normal(size=len(y)) + 1.5 * y)), 0, 100) if confidence else [None] * len(y)
    for name, decision, score in zip(table["image_name"], decisions, scores):
        store.add_review(
            run_id, name, reviewer, str(decision), aided=aided, confidence=None if score is None else int(score)
        )
    return pd.DataFrame({"image_name": table["image_name"], "target": y, "decision": decisions})


@pytest.fixture
def study(tmp_path):
    store = Store()
    table = _cohort(tmp_path)
    dataset_id = store.add_dataset("study", tmp_path / "study.csv", format="generic", options={"check_images": "none"})
    run_id = store.add_run("effnet", dataset_id=dataset_id, model="efficientnet-b3")
    rng = np.random.default_rng(5)
    predictions = table.assign(prediction=1 / (1 + np.exp(-(rng.normal(size=len(table)) + 1.8 * table["target"]))))
    store.add_predictions(run_id, predictions, split="val")
    decisions = {}
    for k, (reviewer, (sensitivity, specificity)) in enumerate(READERS.items()):
        for aided in (False, True):
            if reviewer == "Dr <C>" and aided:
                continue  # this reader reads blinded only
            decisions[(reviewer, "aided" if aided else "unaided")] = _read(
                store,
                run_id,
                table,
                reviewer,
                min(1.0, sensitivity + 0.05 * aided),
                specificity,
                aided=aided,
                seed=10 * k + aided,
                confidence=reviewer != "Dr B",
            )
    return {
        "store": store,
        "run_id": run_id,
        "dataset_id": dataset_id,
        "table": table,
        "predictions": predictions,
        "decisions": decisions,
    }


@pytest.fixture
def downloads(monkeypatch) -> dict[str, bytes]:
    """File name -> bytes of every download button the page renders."""
    saved: dict[str, bytes] = {}

    class Recording(MemoryMediaFileStorage):
        def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
            if filename:
                saved[filename] = path_or_data if isinstance(path_or_data, bytes) else str(path_or_data).encode()
            return super().load_and_get_id(path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    return saved


def _page() -> AppTest:
    return open_page("compare.py", timeout=90)


def _readers_table(at: AppTest) -> pd.DataFrame:
    return next(df.value for df in at.dataframe if "Sensitivity (95% CI)" in df.value.columns)


def _readers_chart(at: AppTest) -> dict | None:
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        if spec.get("layout", {}).get("title", {}).get("text", "").startswith("Readers on the model"):
            return spec
    return None


def _values(array) -> list[float]:
    """A Plotly JSON array as floats (Plotly writes numeric arrays as base64 typed arrays: dtype + bdata)."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).astype(float).tolist()
    return [float(v) for v in array]


def _percentages(text: str) -> list[float]:
    """ "85.0% (70.1%-93.0%)" -> [0.85, 0.701, 0.93]."""
    return [float(v) / 100 for v in re.findall(r"(\d+(?:\.\d+)?)%", text)]


def test_readers_section_shows_each_reader_with_cis_equal_to_melcore_readers(study, downloads):
    at = _page()
    store, run_id = study["store"], study["run_id"]
    expected = reader_table(study_reads(store.review_history(run_id), store.get_predictions(run_id)), n_boot=1000)
    shown = _readers_table(at)
    assert sorted(zip(shown["Reader"], shown["Mode"])) == sorted(
        [
            ("Dr A", "aided"),
            ("Dr A", "blinded (unaided)"),
            ("Dr B", "aided"),
            ("Dr B", "blinded (unaided)"),
            ("Dr <C>", "blinded (unaided)"),
        ]
    )
    words = {"unaided": "blinded (unaided)", "aided": "aided"}
    for (reviewer, mode), reads in study["decisions"].items():
        # sensitivity and specificity counted by hand from the saved decisions
        called, y = reads["decision"] == "biopsy", reads["target"]
        tp, tn = int((called & (y == 1)).sum()), int((~called & (y == 0)).sum())
        sensitivity, specificity = tp / int((y == 1).sum()), tn / int((y == 0).sum())
        row = shown[(shown["Reader"] == reviewer) & (shown["Mode"] == words[mode])].iloc[0]
        reference = expected[(expected["reviewer"] == reviewer) & (expected["mode"] == mode)].iloc[0]
        assert reference["sensitivity"] == pytest.approx(sensitivity)
        assert reference["specificity"] == pytest.approx(specificity)
        assert (reference["sensitivity_low"], reference["sensitivity_high"]) == pytest.approx(
            wilson_interval(tp, int((y == 1).sum()))
        )
        for column, measure in (("Sensitivity (95% CI)", "sensitivity"), ("Specificity (95% CI)", "specificity")):
            value, low, high = _percentages(row[column])
            assert (value, low, high) == pytest.approx(
                (reference[measure], reference[f"{measure}_low"], reference[f"{measure}_high"]), abs=5e-4
            )
            assert low <= value <= high
        assert row["Lesions"] == len(reads) and row["On ROC plot"]
        assert _percentages(row["Model sensitivity at this specificity"])[0] == pytest.approx(
            reference["model_sensitivity_at_reader_specificity"], abs=5e-4
        )
        assert row["Model AUROC (same lesions)"] == pytest.approx(reference["model_auroc"], abs=5e-4)
        if reviewer == "Dr B":  # no confidences given: no confidence AUROC
            assert row["Rated"] == 0 and row["Confidence AUROC (95% CI)"] == ""
        else:
            assert row["Rated"] == len(reads)
            assert float(row["Confidence AUROC (95% CI)"].split()[0]) == pytest.approx(
                reference["reader_auroc"], abs=5e-4
            )

    # the readers are points on the model's ROC curve, with their intervals as error bars
    spec = _readers_chart(at)
    assert spec is not None
    traces = {t["name"]: t for t in spec["data"]}
    curve = model_on_reads(
        study_reads(store.review_history(run_id), store.get_predictions(run_id)), list(READERS), n_boot=1000
    )
    model = next(t for t in spec["data"] if "AUROC" in t["name"])
    assert _values(model["x"]) == pytest.approx(list(curve.fpr))
    assert _values(model["y"]) == pytest.approx(list(curve.tpr))
    for reference in expected.to_dict("records"):
        name = f"{reference['reviewer'].replace('<', '&lt;').replace('>', '&gt;')} ({reference['mode']})"
        point = traces[name]
        assert point["mode"] == "markers"
        (x,), (y,) = _values(point["x"]), _values(point["y"])
        assert (x, y) == pytest.approx((1 - reference["specificity"], reference["sensitivity"]))
        assert y + _values(point["error_y"]["array"])[0] == pytest.approx(reference["sensitivity_high"])
        assert y - _values(point["error_y"]["arrayminus"])[0] == pytest.approx(reference["sensitivity_low"])
        assert x - _values(point["error_x"]["arrayminus"])[0] == pytest.approx(1 - reference["specificity_high"])
    assert {"mean reader (unaided)", "mean reader (aided)"} <= set(traces)

    # the CSV export parses and holds the same numbers
    export = pd.read_csv(io.BytesIO(downloads[f"readers-run{run_id}.csv"]), keep_default_na=False, na_values=[""])
    expected_columns = [{"n_malignant": "n_positive"}.get(c, c) for c in expected.columns]
    expected_columns.insert(expected_columns.index("n_positive") + 1, "positive_class")
    assert list(export.columns) == expected_columns and len(export) == len(expected)
    assert (export["n_positive"].to_numpy() == expected["n_malignant"].to_numpy()).all()
    assert set(export["positive_class"]) == {"melanoma"}  # a generic table: melanoma / not melanoma
    export["reviewer"] = export["reviewer"].str.replace("'", "", regex=False)  # the spreadsheet-safe prefix, none here
    pd.testing.assert_frame_equal(
        export[["reviewer", "mode", "n", "tp", "fp", "tn", "fn"]],
        expected[["reviewer", "mode", "n", "tp", "fp", "tn", "fn"]].astype(
            {c: "int64" for c in ("n", "tp", "fp", "tn", "fn")}
        ),
        check_dtype=False,
    )
    for column in (
        "sensitivity",
        "sensitivity_low",
        "sensitivity_high",
        "specificity",
        "specificity_low",
        "specificity_high",
        "model_auroc",
        "model_sensitivity_at_reader_specificity",
        "reader_auroc",
    ):
        assert export[column].to_numpy(dtype=float) == pytest.approx(
            expected[column].to_numpy(dtype=float), abs=1e-6, nan_ok=True
        )

    # the PNG export is a PNG image of some size
    png = downloads[f"readers-run{run_id}.png"]
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and min(image.size) >= 300

    # aided against blinded for the two readers who read both ways, and agreement across the three
    paired = next(df.value for df in at.dataframe if "McNemar p (sens)" in df.value.columns)
    assert sorted(paired["Reader"]) == ["Dr A", "Dr B"] and (paired["Lesions"] == len(study["table"])).all()
    kappas = next(df.value for df in at.dataframe if "Cohen's kappa" in df.value.columns)
    assert len(kappas) == 3  # three readers read blinded: three pairs


def test_too_few_reads_say_so_instead_of_a_plot(tmp_path, downloads):
    store = Store()
    table = _cohort(tmp_path)
    dataset_id = store.add_dataset("study", tmp_path / "study.csv", format="generic", options={"check_images": "none"})
    run_id = store.add_run("effnet", dataset_id=dataset_id, model="efficientnet-b3")
    rng = np.random.default_rng(5)
    store.add_predictions(run_id, table.assign(prediction=rng.random(len(table))), split="val")

    at = _page()  # no reads yet: how to make some
    assert any("No reader-study reads" in c.value for c in at.caption)
    assert _readers_chart(at) is None

    few = table.iloc[: MIN_READS - 5]
    assert 0 < few["target"].sum() < len(few)
    _read(store, run_id, few, "Dr A", 0.8, 0.8, aided=False, seed=1, confidence=True)
    at = _page()
    assert f"No reader has {MIN_READS} reads on labelled lesions" in texts(at.info)
    assert _readers_chart(at) is None
    row = _readers_table(at).iloc[0]
    assert row["Reader"] == "Dr A" and row["Lesions"] == len(few) and not row["On ROC plot"]
    assert f"fewer than the {MIN_READS} needed" in row["Note"]
    assert f"readers-run{run_id}.csv" in downloads and f"readers-run{run_id}.png" not in downloads


@pytest.mark.parametrize("classes", [MELANOMA, MALIGNANT], ids=["melanoma", "malignant"])
def test_reader_tables_captions_and_csv_use_the_datasets_class_words(tmp_path, downloads, classes):
    store = Store()
    table = _cohort(tmp_path)
    dataset_id = store.add_dataset(
        "study",
        tmp_path / "study.csv",
        format="generic",
        options={"check_images": "none"},
        summary={"classes": classes.to_dict()},
    )
    run_id = store.add_run("effnet", dataset_id=dataset_id, model="efficientnet-b3")
    rng = np.random.default_rng(5)
    store.add_predictions(
        run_id,
        table.assign(prediction=1 / (1 + np.exp(-(rng.normal(size=len(table)) + 1.8 * table["target"])))),
        split="val",
    )
    for k, reviewer in enumerate(("Dr A", "Dr B")):
        for aided in (False, True):
            _read(store, run_id, table, reviewer, 0.8, 0.7, aided=aided, seed=10 * k + aided, confidence=True)
    at = _page()
    count = classes.positive_plural.capitalize()  # "Melanomas" / "Malignant lesions"
    other = "Malignant lesions" if classes is MELANOMA else "Melanomas"
    n_positive = int(table["target"].sum())
    readers = _readers_table(at)
    assert count in readers.columns and other not in readers.columns and "Malignant" not in readers.columns
    assert (readers[count] == n_positive).all()
    paired = next(df.value for df in at.dataframe if "McNemar p (sens)" in df.value.columns)
    assert count in paired.columns and "Malignant" not in paired.columns
    section = texts(at.caption) + texts(at.markdown)
    assert f"({n_positive:,} {classes.positive_plural}, " in section
    wrong = "melanomas" if classes is MALIGNANT else "malignant lesions"
    assert f"{n_positive:,} {wrong}" not in section
    export = pd.read_csv(io.BytesIO(downloads[f"readers-run{run_id}.csv"]), keep_default_na=False, na_values=[""])
    assert "n_malignant" not in export.columns and (export["n_positive"] == n_positive).all()
    assert set(export["positive_class"]) == {classes.positive}
