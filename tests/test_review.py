"""melcore.review: the worklist, progress counts, history, CSV export and scoring an upload."""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melcore.errors import ImageError, MelcoreError
from melcore.predict import score_upload
from melcore.review import (
    EXPORT_COLUMNS,
    WORKLIST_COLUMNS,
    apply_scope,
    check_reviewer,
    export_frame,
    history_table,
    iso_time,
    review_progress,
    reviews_csv,
    worklist,
)
from melcore.store import Store


def predictions_frame(n: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "image_name": [f"IMG_{i:03d}" for i in range(n)],
            "patient_id": [f"P{i // 3}" for i in range(n)],
            "clinic": ["north" if i % 2 else "south" for i in range(n)],
            "target": (rng.random(n) < 0.2).astype(int),
            "prediction": rng.random(n),
        }
    )


@pytest.fixture
def run_with_predictions():
    store = Store()
    run_id = store.add_run("effnet", model="efficientnet-b3", threshold=0.4)
    frame = predictions_frame()
    store.add_predictions(run_id, frame, split="val")
    return store, run_id, frame


# --------------------------------------------------------------------------- worklist


def test_worklist_is_sorted_by_risk_with_rank_and_flags():
    frame = predictions_frame()
    table = worklist(frame, None, threshold=0.4)
    assert list(table.columns) == list(WORKLIST_COLUMNS)
    assert len(table) == len(frame)
    risks = table["risk"].to_numpy()
    assert np.all(np.diff(risks) <= 0)
    assert table["rank"].tolist() == list(range(1, len(frame) + 1))
    expected = frame.sort_values("prediction", ascending=False)["image_name"].tolist()
    assert table["image_name"].tolist() == expected
    np.testing.assert_array_equal(table["flagged"].to_numpy(), risks >= 0.4)
    assert table["decision"].isna().all() and (table["n_reviews"] == 0).all()
    # metadata follows its image through the sort
    merged = table.merge(frame, on="image_name")
    assert (merged["patient_id_x"] == merged["patient_id_y"]).all()
    np.testing.assert_allclose(merged["risk"], merged["prediction"])


def test_ties_are_broken_by_image_name_and_missing_predictions_are_left_out():
    frame = pd.DataFrame({"image_name": ["b", "a", "c", "d"], "prediction": [0.7, 0.7, np.nan, 0.9]})
    table = worklist(frame, None, threshold=0.8)
    assert table["image_name"].tolist() == ["d", "a", "b"]
    assert table["flagged"].tolist() == [True, False, False]


def test_preferred_split_wins_when_an_image_was_stored_twice():
    frame = pd.DataFrame(
        {"image_name": ["x", "x", "y"], "prediction": [0.9, 0.2, 0.5], "split": ["test", "val", "val"]}
    )
    table = worklist(frame, None)
    assert dict(zip(table["image_name"], table["risk"])) == {"x": 0.2, "y": 0.5}


def test_scopes_select_rows_but_keep_ranks(run_with_predictions):
    store, run_id, frame = run_with_predictions
    full = worklist(store.get_predictions(run_id), None, threshold=0.4)
    top, third = full["image_name"].iloc[0], full["image_name"].iloc[2]
    store.add_review(run_id, top, "Dr A", "agree")
    store.add_review(run_id, third, "Dr B", "biopsy", "irregular border")
    latest = store.latest_reviews(run_id)

    every = worklist(store.get_predictions(run_id), latest, 0.4, "all")
    assert every.loc[every["image_name"] == third, "decision"].item() == "biopsy"
    assert every.loc[every["image_name"] == third, "reviewer"].item() == "Dr B"

    above = worklist(store.get_predictions(run_id), latest, 0.4, "above threshold")
    assert above["flagged"].all() and len(above) == int((frame["prediction"] >= 0.4).sum())
    assert above["rank"].tolist() == list(range(1, len(above) + 1))  # flagged rows lead the full order

    todo = worklist(store.get_predictions(run_id), latest, 0.4, "unreviewed")
    assert len(todo) == len(frame) - 2
    assert top not in set(todo["image_name"]) and third not in set(todo["image_name"])
    assert todo["rank"].iloc[0] == 2 and todo["rank"].iloc[1] == 4  # ranks of the full worklist
    pd.testing.assert_frame_equal(apply_scope(every, "unreviewed"), todo)


def test_latest_decision_is_current_and_edits_are_counted(run_with_predictions):
    store, run_id, _ = run_with_predictions
    image = "IMG_005"
    store.add_review(run_id, image, "Dr A", "agree", "first look")
    store.add_review(run_id, image, "Dr A", "biopsy", "changed my mind")
    saved_at = store.review_history(run_id, image)["created_at"].iloc[-1]
    for source, n_reviews in ((store.review_history(run_id), 2), (store.latest_reviews(run_id), 1)):
        row = worklist(store.get_predictions(run_id), source, 0.4).set_index("image_name").loc[image]
        assert row["decision"] == "biopsy" and row["n_reviews"] == n_reviews
        assert row["reviewed_at"] == pytest.approx(saved_at)


def test_bad_scope_threshold_and_columns_are_refused():
    frame = predictions_frame(5)
    with pytest.raises(MelcoreError, match="scope"):
        worklist(frame, None, 0.5, "mine")
    with pytest.raises(MelcoreError, match="between 0 and 1"):
        worklist(frame, None, 1.5)
    with pytest.raises(MelcoreError, match="prediction"):
        worklist(frame.drop(columns="prediction"), None)
    empty = worklist(frame.iloc[:0], None)
    assert empty.empty and list(empty.columns) == list(WORKLIST_COLUMNS)


def test_progress_counts(run_with_predictions):
    store, run_id, frame = run_with_predictions
    full = worklist(store.get_predictions(run_id), None, 0.4)
    flagged_image = full.loc[full["flagged"], "image_name"].iloc[0]
    unflagged_image = full.loc[~full["flagged"], "image_name"].iloc[0]
    assert review_progress(full).reviewed == 0
    store.add_review(run_id, flagged_image, "Dr A", "agree")
    store.add_review(run_id, flagged_image, "Dr A", "follow-up")  # an edit is still one reviewed lesion
    store.add_review(run_id, unflagged_image, "Dr B", "unsure")
    progress = review_progress(worklist(store.get_predictions(run_id), store.latest_reviews(run_id), 0.4))
    assert progress.total == len(frame) and progress.reviewed == 2
    assert progress.flagged == int((frame["prediction"] >= 0.4).sum()) and progress.flagged_reviewed == 1
    assert progress.by_decision == {"agree": 0, "disagree": 0, "biopsy": 0, "follow-up": 1, "unsure": 1}
    assert progress.fraction == pytest.approx(2 / len(frame))
    assert review_progress(worklist(frame.iloc[:0], None)).fraction == 0.0


# --------------------------------------------------------------------------- names, times, history


def test_reviewer_name_is_required_and_bounded():
    assert check_reviewer("  Dr   Ana  Ruiz ") == "Dr Ana Ruiz"
    for bad in ("", "   ", None):
        with pytest.raises(MelcoreError, match="reviewer"):
            check_reviewer(bad)
    with pytest.raises(MelcoreError, match="at most 200"):
        check_reviewer("x" * 201)


def test_iso_time_is_utc_iso8601():
    text = iso_time(1_700_000_000.25)
    assert text == "2023-11-14T22:13:20.250+00:00"
    assert datetime.fromisoformat(text).timestamp() == pytest.approx(1_700_000_000.25)
    assert iso_time(None) == "" and iso_time(float("nan")) == ""


def test_history_table_is_newest_first_with_the_current_marked(run_with_predictions):
    store, run_id, _ = run_with_predictions
    store.add_review(run_id, "IMG_001", "Dr A", "agree", "ok")
    store.add_review(run_id, "IMG_001", "Dr B", "disagree", "")
    table = history_table(store.review_history(run_id, "IMG_001"))
    assert table["decision"].tolist() == ["disagree", "agree"]
    assert table["current"].tolist() == [True, False]
    assert table["note"].tolist() == ["", "ok"]
    assert history_table(store.review_history(run_id, "IMG_999")).empty


# --------------------------------------------------------------------------- export


def test_export_holds_every_decision_with_iso_times(run_with_predictions):
    store, run_id, frame = run_with_predictions
    store.add_review(run_id, "IMG_003", "Dr A", "agree", "looks benign")
    store.add_review(run_id, "IMG_007", "Dr B", "biopsy", 'asymmetric, "blue-white veil"\nsecond line')
    store.add_review(run_id, "IMG_003", "Dr A", "follow-up", "re-check in 3 months")
    history = store.review_history(run_id)
    run = store.get_run(run_id)
    text = reviews_csv(history, run, store.get_predictions(run_id))
    back = pd.read_csv(io.StringIO(text), keep_default_na=False, dtype={"threshold": str})
    assert list(back.columns) == list(EXPORT_COLUMNS)
    assert len(back) == 3
    assert back["image_name"].tolist() == ["IMG_003", "IMG_007", "IMG_003"]
    assert back["decision"].tolist() == ["agree", "biopsy", "follow-up"]
    assert back["note"].tolist()[1] == 'asymmetric, "blue-white veil"\nsecond line'
    assert back["current"].tolist() == [False, True, True]
    assert set(back["run_id"]) == {run_id} and set(back["run"]) == {f"#{run_id} efficientnet-b3 · all clinics · effnet"}
    assert set(back["threshold"]) == {"0.400"}  # the run's saved threshold, as every page writes it
    assert "None" not in set(back["clinic"]) | set(back["diagnosis"]) | set(back["label"])
    assert back["review_id"].tolist() == history["id"].tolist()
    for iso, seconds in zip(back["time"], history["created_at"]):
        assert datetime.fromisoformat(iso).timestamp() == pytest.approx(seconds, abs=1e-3)
    risk = dict(zip(frame["image_name"], frame["prediction"]))
    assert back["risk"].iloc[1] == pytest.approx(risk["IMG_007"], abs=1e-6)
    assert back["patient_id"].iloc[1] == "P2"
    assert back["aided"].tolist() == [True, True, True] and back["confidence"].tolist() == ["", "", ""]


def test_export_says_which_reads_were_blinded_and_how_confident(run_with_predictions):
    store, run_id, frame = run_with_predictions
    store.add_review(run_id, "IMG_003", "Dr A", "reassure", aided=False, confidence=10)
    store.add_review(run_id, "IMG_003", "Dr A", "biopsy", aided=True, confidence=70)
    store.add_review(run_id, "IMG_007", "Dr B", "follow-up", aided=False)
    back = pd.read_csv(io.StringIO(reviews_csv(store.review_history(run_id))), keep_default_na=False)
    assert back["aided"].tolist() == [False, True, False]
    assert back["confidence"].astype(str).tolist() == ["10", "70", ""]


def test_export_guards_against_spreadsheet_formulas(run_with_predictions):
    store, run_id, _ = run_with_predictions
    store.add_review(run_id, "IMG_001", "=cmd|' /C calc'!A0", "unsure", "+SUM(A1:A3)")
    store.add_review(run_id, "IMG_002", "Dr A", "agree", "-1.5")
    back = pd.read_csv(
        io.StringIO(reviews_csv(store.review_history(run_id))), keep_default_na=False, dtype={"note": str}
    )
    assert back["reviewer"].iloc[0] == "'=cmd|' /C calc'!A0"
    assert back["note"].iloc[0] == "'+SUM(A1:A3)"
    assert back["note"].iloc[1] == "-1.5"  # a plain number stays as it is
    # the frame itself keeps the raw text
    assert export_frame(store.review_history(run_id))["note"].iloc[0] == "+SUM(A1:A3)"


def test_export_of_a_run_without_decisions_is_a_header():
    text = reviews_csv(pd.DataFrame(), {"id": 1, "name": "r"})
    assert text.strip() == ",".join(EXPORT_COLUMNS)


# --------------------------------------------------------------------------- scoring an upload


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from melcore.models import build_model

    run_dir = tmp_path_factory.mktemp("run")
    model, _ = build_model("basic-cnn", 32)
    model.save(run_dir / "model.keras")
    return run_dir


def png_bytes(width: int = 60, height: int = 40, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_score_upload_matches_predict_images(tiny_run):
    from melcore.explain import load_run_model
    from melcore.images import read_upload
    from melcore.predict import predict_images

    data = png_bytes()
    model = load_run_model(tiny_run)
    image = read_upload(data, size=32)
    plain = score_upload(tiny_run, data, "lesion.png", tta=False)
    assert 0.0 <= plain.probability <= 1.0
    assert plain.probability == pytest.approx(predict_images(model, image[None])[0], abs=1e-6)
    assert plain.view_probabilities.shape == (1,) and not plain.tta
    assert plain.input_size == (32, 32)
    assert plain.image.shape == (40, 60, 3) and plain.image.dtype == np.uint8  # aspect kept for display
    assert plain.heatmap.shape == (32, 32) and 0.0 <= plain.heatmap.min() <= plain.heatmap.max() <= 1.0
    picture = plain.overlay(0.5)
    assert picture.shape == (40, 60, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(plain.overlay(0.0), plain.image)

    tta = score_upload(model, io.BytesIO(data), "lesion.png", tta=True, method=None)
    assert tta.view_probabilities.shape == (8,) and tta.heatmap is None
    assert tta.probability == pytest.approx(predict_images(model, image[None], tta=True)[0], abs=1e-6)
    with pytest.raises(MelcoreError, match="no Grad-CAM"):
        tta.overlay()


def test_score_upload_shrinks_large_images_for_display(tiny_run):
    result = score_upload(tiny_run, png_bytes(1200, 600), "big.png", method=None)
    assert result.image.shape == (256, 512, 3)


@pytest.mark.parametrize(
    "data, what",
    [
        (b"patient notes: nothing to see here\n" * 4, "text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
        (b"", "empty"),
    ],
)
def test_score_upload_refuses_what_is_not_an_image(tiny_run, data, what):
    with pytest.raises(ImageError, match=what):
        score_upload(tiny_run, data, "renamed.png")


def test_score_upload_reports_a_missing_model(tmp_path):
    with pytest.raises(MelcoreError, match="no model.keras"):
        score_upload(tmp_path, png_bytes(), "lesion.png")
    with pytest.raises(MelcoreError, match="unknown explanation method"):
        score_upload(tmp_path, png_bytes(), "lesion.png", method="lime")
