"""The Review page (pages/review.py) driven by Streamlit's AppTest on a seeded store."""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
import page_helpers  # tests/ is on sys.path (pytest rootdir-relative import)
import pandas as pd
import pytest
import streamlit.testing.v1.app_test as app_test_module
from page_helpers import run, texts
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from melcore.classes import MALIGNANT, MELANOMA
from melcore.store import Store

THRESHOLD = 0.3
N_SCORED = 40


@pytest.fixture
def seeded(demo_dir):
    store = Store()
    dataset_id, cohort = store.register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    table = cohort.table.iloc[:N_SCORED]
    rng = np.random.default_rng(42)
    predictions = table[["image_name", "patient_id", "clinic", "target"]].assign(prediction=rng.random(len(table)))
    run_id = store.add_run("cnn-bn demo", dataset_id=dataset_id, model="cnn-bn", threshold=THRESHOLD)
    store.add_predictions(run_id, predictions, split="val")
    order = predictions.sort_values("prediction", ascending=False)["image_name"].tolist()
    return {
        "store": store,
        "run_id": run_id,
        "dataset_id": dataset_id,
        "predictions": predictions,
        "order": order,
        "cohort": cohort,
    }


def open_page() -> AppTest:
    return page_helpers.open_page("review.py")


def current(at: AppTest) -> str:
    return at.session_state["review_current"]


def decide(at: AppTest, run_id: int, decision: str, note: str = "", button: str = "review_save") -> AppTest:
    image = current(at)
    at.radio(key=f"review_decision_{run_id}_{image}").set_value(decision)
    at.text_area(key=f"review_note_{run_id}_{image}").input(note)
    at.button(key=button).click()
    return run(at)


def worklist_table(at: AppTest) -> pd.DataFrame:
    return next(df.value for df in at.dataframe if "rank" in df.value.columns)


def history_frame(at: AppTest) -> pd.DataFrame:
    return next(df.value for df in at.dataframe if "current" in df.value.columns)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_worklist_is_sorted_by_risk_and_opens_the_riskiest_lesion(seeded):
    at = open_page()
    table = worklist_table(at)
    assert table["image"].tolist() == seeded["order"][: len(table)]
    assert np.all(np.diff(table["risk"].to_numpy()) <= 0)
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    np.testing.assert_array_equal(table["flagged"].to_numpy(), table["risk"].to_numpy() >= THRESHOLD)
    assert current(at) == seeded["order"][0]
    assert any(m.value.startswith(f"#### {seeded['order'][0]}") for m in at.markdown)  # the lesion panel
    assert "Decision threshold 0.300 (saved" in texts(at.caption)  # the saved threshold
    assert metric(at, "Reviewed") == f"0 / {N_SCORED}"
    assert any(b.label.startswith("Open") for b in at.button)  # the patient's other lesions


@pytest.mark.parametrize("classes", [MELANOMA, MALIGNANT], ids=["melanoma", "malignant"])
def test_the_risk_caption_names_the_datasets_positive_class(seeded, classes):
    store = seeded["store"]
    summary = store.get_dataset(seeded["dataset_id"])["summary"]
    store.update_dataset(seeded["dataset_id"], summary={**summary, "classes": classes.to_dict()})
    caption = next(str(c.value) for c in open_page().caption if str(c.value).startswith("Decision threshold"))
    other = MALIGNANT if classes is MELANOMA else MELANOMA
    assert f"probability that the lesion is {classes.positive}." in caption
    assert other.positive not in caption


def test_saving_without_a_reviewer_name_is_refused_and_keeps_the_note(seeded):
    at = open_page()
    image = current(at)
    at = decide(at, seeded["run_id"], "biopsy", "irregular pigment network")
    assert "reviewer" in texts(at.error).lower()
    assert seeded["store"].review_history(seeded["run_id"]).empty
    assert at.text_area(key=f"review_note_{seeded['run_id']}_{image}").value == "irregular pigment network"
    assert at.radio(key=f"review_decision_{seeded['run_id']}_{image}").value == "biopsy"


def test_decisions_are_saved_appended_and_counted(seeded):
    store, run_id = seeded["store"], seeded["run_id"]
    at = open_page()
    at.text_input(key="review_reviewer").input("Dr Ana Ruiz")
    image = current(at)
    at = decide(at, run_id, "agree", "regular network")
    history = store.review_history(run_id, image)
    assert history[["reviewer", "decision", "note"]].values.tolist() == [["Dr Ana Ruiz", "agree", "regular network"]]
    assert current(at) == image  # "Save" stays on the lesion
    assert metric(at, "Reviewed") == f"1 / {N_SCORED}"
    shown = history_frame(at)
    assert shown[["reviewer", "decision", "note"]].values.tolist() == [["Dr Ana Ruiz", "agree", "regular network"]]
    assert "Current decision: agree" in texts(at.markdown)
    assert at.text_area(key=f"review_note_{run_id}_{image}").value == ""  # the form is ready for a new entry
    assert at.radio(key=f"review_decision_{run_id}_{image}").value == "agree"  # and shows the saved decision
    assert worklist_table(at).set_index("image").loc[image, "decision"] == "agree"

    # A second decision on the same lesion appends; the latest is the current one.
    at = decide(at, run_id, "biopsy", "on second look: blue-white veil")
    history = store.review_history(run_id, image)
    assert history["decision"].tolist() == ["agree", "biopsy"]
    shown = history_frame(at)
    assert len(shown) == 2 and shown["decision"].tolist() == ["biopsy", "agree"]
    assert shown["current"].tolist() == [True, False]
    assert "Current decision: biopsy" in texts(at.markdown)
    assert metric(at, "Reviewed") == f"1 / {N_SCORED}"  # still one reviewed lesion

    # "Save and next" records the decision, then opens the next lesion of the worklist.
    at = decide(at, run_id, "unsure", "", button="review_save_next")
    assert current(at) == seeded["order"][1]
    assert store.review_history(run_id, image)["decision"].tolist() == ["agree", "biopsy", "unsure"]
    assert metric(at, "Reviewed") == f"1 / {N_SCORED}"
    at = decide(at, run_id, "follow-up")
    assert store.latest_reviews(run_id).set_index("image_name")["decision"].to_dict() == {
        image: "unsure",
        seeded["order"][1]: "follow-up",
    }
    assert metric(at, "Reviewed") == f"2 / {N_SCORED}"


def test_the_reviewer_name_is_kept_in_the_session(seeded):
    at = open_page()
    at.text_input(key="review_reviewer").input("Dr B")
    run(at)
    assert at.session_state["melreview_reviewer"] == "Dr B"
    at.button(key="review_next").click()
    run(at)
    assert at.text_input(key="review_reviewer").value == "Dr B"


def test_next_previous_and_position_navigation(seeded):
    order = seeded["order"]
    at = open_page()
    assert at.button(key="review_prev").disabled
    at.button(key="review_next").click()
    run(at)
    assert current(at) == order[1]
    at.button(key="review_next").click()
    run(at)
    assert current(at) == order[2]
    at.button(key="review_prev").click()
    run(at)
    assert current(at) == order[1]
    at.number_input(key="review_pos").set_value(N_SCORED)
    run(at)
    assert current(at) == order[-1]
    assert at.button(key="review_next").disabled


def test_unsaved_notes_survive_navigation(seeded):
    run_id, order = seeded["run_id"], seeded["order"]
    at = open_page()
    at.text_area(key=f"review_note_{run_id}_{order[0]}").input("draft: check dermoscopy again")
    run(at)
    at.button(key="review_next").click()
    run(at)
    at.button(key="review_prev").click()
    run(at)
    assert at.text_area(key=f"review_note_{run_id}_{order[0]}").value == "draft: check dermoscopy again"


def test_scopes_above_threshold_and_unreviewed(seeded):
    store, run_id, predictions = seeded["store"], seeded["run_id"], seeded["predictions"]
    at = open_page()
    at.radio(key="review_scope").set_value("above threshold")
    run(at)
    n_flagged = int((predictions["prediction"] >= THRESHOLD).sum())
    assert at.number_input(key="review_pos").max == n_flagged
    assert metric(at, "Reviewed") == f"0 / {n_flagged}"
    assert worklist_table(at)["flagged"].all()

    at.text_input(key="review_reviewer").input("Dr A")
    at.radio(key="review_scope").set_value("unreviewed")
    run(at)
    first = current(at)
    at = decide(at, run_id, "agree")
    # the reviewed lesion leaves the unreviewed worklist and the next one opens
    assert first not in set(worklist_table(at)["image"])
    assert current(at) == seeded["order"][1]
    assert len(store.review_history(run_id)) == 1


def test_only_unreviewed_opens_the_first_unreviewed_lesion_not_the_same_position(seeded):
    store, run_id, order = seeded["store"], seeded["run_id"], seeded["order"]
    for image in (order[1], order[2]):  # ranks 2 and 3 reviewed; 1 and 4 are not
        store.add_review(run_id, image, "Dr A", "agree")
    at = open_page()
    at.button(key="review_next").click()
    run(at)
    at.button(key="review_next").click()
    run(at)
    assert current(at) == order[2]  # rank 3, position 3
    at.radio(key="review_scope").set_value("unreviewed")
    run(at)
    assert current(at) == order[0]  # rank 1: the first unreviewed, not the 3rd (rank 5)
    assert worklist_table(at)["rank"].tolist()[:3] == [1, 4, 5]
    # opening a lesion that has a decision shows it in the radio
    at.radio(key="review_scope").set_value("all")
    run(at)
    at.button(key="review_next").click()
    run(at)
    assert at.radio(key=f"review_decision_{run_id}_{order[1]}").value == "agree"


def test_a_failed_save_shows_the_error_and_keeps_the_note(seeded, monkeypatch):
    run_id = seeded["run_id"]
    at = open_page()
    at.text_input(key="review_reviewer").input("Dr A")
    image = current(at)

    def locked(*args, **kwargs):
        raise RuntimeError("database is locked")

    with monkeypatch.context() as patched:
        patched.setattr(Store, "add_review", locked)
        at = decide(at, run_id, "follow-up", "re-image in 3 months")
    assert "database is locked" in texts(at.error)
    assert at.text_area(key=f"review_note_{run_id}_{image}").value == "re-image in 3 months"
    assert at.radio(key=f"review_decision_{run_id}_{image}").value == "follow-up"
    assert seeded["store"].review_history(run_id).empty
    # the store works again: the kept input is saved as it was typed
    at.button(key="review_save").click()
    run(at)
    history = seeded["store"].review_history(run_id, image)
    assert history[["decision", "note"]].values.tolist() == [["follow-up", "re-image in 3 months"]]
    assert "database is locked" not in texts(at.error)


def test_default_threshold_note_when_none_is_saved(seeded):
    store = seeded["store"]
    other = store.add_run("no-threshold", dataset_id=seeded["dataset_id"], model="basic-cnn", from_scratch=True)
    store.add_predictions(other, seeded["predictions"], split="val")
    at = open_page()
    at.selectbox(key="review_run").set_value(other)
    run(at)
    assert "default 0.50" in texts(at.info)
    assert "trained from scratch" in texts(at.warning)
    table = worklist_table(at)
    np.testing.assert_array_equal(table["flagged"].to_numpy(), table["risk"].to_numpy() >= 0.5)


def test_csv_export_holds_the_decisions_with_history(seeded, monkeypatch):
    saved: dict[str, bytes] = {}

    class Recording(MemoryMediaFileStorage):
        def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
            if filename:
                saved[filename] = path_or_data if isinstance(path_or_data, bytes) else str(path_or_data).encode()
            return super().load_and_get_id(path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    run_id = seeded["run_id"]
    at = open_page()
    at.text_input(key="review_reviewer").input("Dr A")
    image = current(at)
    at = decide(at, run_id, "agree", "first look")
    at = decide(at, run_id, "disagree", "=1+1, second look")
    name = f"melreview-run{run_id}-decisions.csv"
    assert name in saved, sorted(saved)
    export = pd.read_csv(io.BytesIO(saved[name]), keep_default_na=False, dtype={"threshold": str})
    assert export[["run_id", "run", "image_name", "reviewer", "decision"]].values.tolist() == [
        [run_id, f"#{run_id} cnn-bn · all clinics", image, "Dr A", "agree"],
        [run_id, f"#{run_id} cnn-bn · all clinics", image, "Dr A", "disagree"],
    ]
    lesion = seeded["cohort"].table.set_index("image_name").loc[image]
    assert export["diagnosis"].tolist() == [str(lesion["diagnosis"])] * 2
    assert export["clinic"].tolist() == [str(lesion["clinic"])] * 2
    assert export["threshold"].tolist() == ["0.300"] * 2  # as the page's caption writes it
    table = worklist_table(at)
    assert list(table.columns)[:5] == ["rank", "risk", "flagged", "decision", "reviewer"]  # no scrolling for these
    assert set(table["label"]) <= {"malignant", "benign"} and "diagnosis" in table.columns
    assert export["note"].tolist() == ["first look", "'=1+1, second look"]
    assert export["current"].tolist() == [False, True]
    history = seeded["store"].review_history(run_id)
    for iso, seconds in zip(export["time"], history["created_at"]):
        assert datetime.fromisoformat(iso).timestamp() == pytest.approx(seconds, abs=1e-3)


def test_no_scored_run_says_what_to_do(demo_dir):
    Store().register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    at = open_page()
    assert "No run of this dataset has stored predictions" in texts(at.info)


def test_gradcam_toggle_shows_the_overlay_for_the_run(seeded, tmp_path):
    from melcore.models import build_model

    store = seeded["store"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model, _ = build_model("basic-cnn", 32)
    model.save(run_dir / "model.keras")
    with_model = store.add_run("with model", run_dir, dataset_id=seeded["dataset_id"], model="basic-cnn", threshold=0.5)
    store.add_predictions(with_model, seeded["predictions"], split="val")
    at = open_page()
    at.selectbox(key="review_run").set_value(with_model)
    run(at)
    assert at.selectbox(key=f"review_panel_{with_model}_gc_run").value == with_model
    at.toggle(key=f"review_panel_{with_model}_gc_show").set_value(True)
    run(at)
    assert any("Grad-CAM" in c for image in at.image for c in image.captions)
    # the toggle stays on while moving through the worklist
    at.button(key="review_next").click()
    run(at)
    assert at.toggle(key=f"review_panel_{with_model}_gc_show").value
    assert any("Grad-CAM" in c for image in at.image for c in image.captions)


# --------------------------------------------------------------------------- reader study


def _everything_sent(at: AppTest) -> str:
    """Every element the page sent, as text: protobuf text of each element, dataframes as CSV."""
    from streamlit.testing.v1.element_tree import Dataframe

    parts = []

    def walk(node):
        for child in getattr(node, "children", {}).values():
            walk(child)
        if isinstance(node, Dataframe):
            parts.append(node.value.to_csv())
        elif getattr(node, "proto", None) is not None and not getattr(node, "children", None):
            parts.append(str(node.proto))

    walk(at._tree)
    return "\n".join(parts)


def _leaked_scores(predictions: pd.DataFrame, sent: str) -> list[str]:
    """The scores found in ``sent`` as whole numbers: in full, or rounded to 2-4 decimals as pages show them."""
    import re

    found = []
    for r in predictions["prediction"]:
        for text in {repr(float(r)), f"{r:.2f}", f"{r:.3f}", f"{r:.4f}"}:
            if re.search(r"(?<![\d.])" + re.escape(text) + r"(?![\d])", sent):
                found.append(text)
    return sorted(found)


def test_blinded_reading_never_sends_the_models_score_to_the_page(seeded):
    from melcore.readers import study_order

    store, run_id, predictions = seeded["store"], seeded["run_id"], seeded["predictions"]
    at = open_page()
    at.text_input(key="review_reviewer").input("Dr Blind")
    at.radio(key="review_mode").set_value("unaided")
    at = run(at)
    order = study_order(predictions["image_name"], seed=run_id)
    image = at.session_state["review_study_current"]
    assert image == order[0]  # the fixed random order, not the riskiest first
    sent = _everything_sent(at)
    assert image in sent and "Fixed random order" in sent  # the page's content is what is searched
    assert not _leaked_scores(predictions, sent)
    assert "_gc_" not in sent and "badge[risk" not in sent and "Grad-CAM**" not in sent
    assert not at.get("plotly_chart")
    for frame in at.dataframe:
        assert not {"risk", "score", "rank", "flagged", "target", "label", "diagnosis"} & set(frame.value.columns)
        assert "label" not in frame.value.get("field", pd.Series(dtype=object)).tolist()
    truth = seeded["cohort"].table.set_index("image_name").loc[image]
    if isinstance(truth.get("diagnosis"), str) and truth["diagnosis"]:
        assert truth["diagnosis"] not in texts(at.markdown)

    # a blinded read with a confidence, then the next lesion of the study
    at.radio(key=f"review_study_decision_unaided_{run_id}_{image}").set_value("biopsy")
    at.number_input(key=f"review_study_confidence_unaided_{run_id}_{image}").set_value(70)
    at.button(key="review_study_save_next").click()
    at = run(at)
    read = store.review_history(run_id, image).iloc[-1]
    assert (read["reviewer"], read["decision"], bool(read["aided"]), read["confidence"]) == (
        "Dr Blind",
        "biopsy",
        False,
        70,
    )
    assert at.session_state["review_study_current"] == order[1]
    assert "You have read 1 of" in _everything_sent(at)
    assert not _leaked_scores(predictions, _everything_sent(at))


def test_aided_reading_shows_the_risk_but_not_the_label_and_records_an_aided_read(seeded):
    store, run_id, predictions = seeded["store"], seeded["run_id"], seeded["predictions"]
    at = open_page()
    at.text_input(key="review_reviewer").input("Dr Aided")
    at.radio(key="review_mode").set_value("aided")
    at = run(at)
    image = at.session_state["review_study_current"]
    risk = float(predictions.set_index("image_name").loc[image, "prediction"])
    assert f"risk {risk:.2f}" in texts(at.markdown) or f"risk {risk:.3f}" in texts(at.markdown)
    assert repr(risk) in _leaked_scores(predictions, _everything_sent(at))  # what the blinded test looks for
    metadata = next(df.value for df in at.dataframe if "field" in df.value.columns)
    assert "label" not in metadata["field"].tolist() and "diagnosis" not in metadata["field"].tolist()
    assert "melanoma (label)" not in texts(at.markdown)
    at.radio(key=f"review_study_decision_aided_{run_id}_{image}").set_value("reassure")
    at.button(key="review_study_save").click()
    at = run(at)
    read = store.review_history(run_id, image).iloc[-1]
    assert (read["decision"], bool(read["aided"])) == ("reassure", True) and pd.isna(read["confidence"])
    # the standard review does not list study reads as another reader's hidden view: they are in the history
    at.radio(key="review_mode").set_value("review")
    at = run(at)
    assert worklist_table(at).set_index("image").loc[image, "decision"] == "reassure"


def test_the_run_in_the_url_is_the_one_review_opens_on(seeded):
    store, predictions = seeded["store"], seeded["predictions"]
    newer = store.add_run("newer", dataset_id=seeded["dataset_id"], model="basic-cnn")
    store.add_predictions(newer, predictions, split="val")
    at = AppTest.from_file(str(page_helpers.PAGES / "review.py"), default_timeout=120)
    at.query_params["run"] = str(seeded["run_id"])
    run(at)
    assert at.selectbox(key="review_run").value == seeded["run_id"]  # not the newest run
    assert at.session_state["melreview_run"] == seeded["run_id"]
