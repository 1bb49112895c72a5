"""The Patients page (pages/patients.py) and the shared widgets (ui/widgets.py), with AppTest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from melcore.classes import dataset_classes
from melcore.store import Store

PAGES = Path(__file__).resolve().parents[1] / "pages"


def _page() -> AppTest:
    return AppTest.from_file(str(PAGES / "patients.py"), default_timeout=120)


@pytest.fixture
def seeded(demo_dir):
    """The demo cohort registered with two runs: "cnn" scores every image (threshold 0.4), "meta" half."""
    store = Store()
    dataset_id, cohort = store.register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    table = cohort.table
    rng = np.random.default_rng(11)
    cnn = store.add_run("cnn", None, dataset_id=dataset_id, model="basic-cnn", threshold=0.4)
    meta = store.add_run("meta", None, dataset_id=dataset_id, model="meta", kind="meta")
    full = table[["image_name", "patient_id", "clinic", "target"]].assign(prediction=rng.random(len(table)))
    store.add_predictions(cnn, full)
    store.add_predictions(meta, full.iloc[::2].assign(prediction=rng.random(len(full.iloc[::2]))))
    return {
        "store": store,
        "dataset_id": dataset_id,
        "table": table,
        "cnn": cnn,
        "meta": meta,
        "risk": dict(zip(full["image_name"], full["prediction"])),
    }


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _frame(at: AppTest, first_column: str) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if list(d.value.columns)[:1] == [first_column])


def _grid_order(at: AppTest) -> list[str]:
    prefix = "patients_grid_open_"
    return [b.key[len(prefix) :] for b in at.button if b.key and b.key.startswith(prefix)]


def _patients_with(table: pd.DataFrame, mask) -> int:
    return table.loc[mask, "patient_id"].nunique()


def test_page_renders_and_filters_change_the_patient_count(seeded):
    table = seeded["table"]
    risk = table["image_name"].map(seeded["risk"])
    n = table["patient_id"].nunique()
    at = _page().run()
    assert not at.exception
    assert _metric(at, "Patients") == f"{n} of {n}"
    assert at.selectbox(key="patients_run").value == seeded["meta"]  # newest run with scores first
    at.selectbox(key="patients_run").select(seeded["cnn"]).run()
    assert len(_frame(at, "patient")) == min(n, 50)

    at.multiselect(key="patients_site").select("torso").run()
    torso = _patients_with(table, table["site"] == "torso")
    assert 0 < torso < n
    assert _metric(at, "Patients") == f"{torso} of {n}"

    at.checkbox(key="patients_malignant").check().run()
    expected = _patients_with(table, (table["site"] == "torso") & (table["target"] == 1))
    assert _metric(at, "Patients") == f"{expected} of {n}"

    at.multiselect(key="patients_site").set_value([]).run()
    at.checkbox(key="patients_malignant").uncheck()
    at.checkbox(key="patients_flagged").check().run()
    flagged = _patients_with(table, risk >= 0.4)  # the cnn run's saved threshold
    assert 0 < flagged < n
    assert _metric(at, "Patients") == f"{flagged} of {n}"
    assert _metric(at, "Flagged images") == f"{int((risk >= 0.4).sum()):,}"

    at.checkbox(key="patients_flagged").uncheck()
    at.multiselect(key="patients_sex").select("female").run()
    assert _metric(at, "Patients") == f"{_patients_with(table, table['sex'] == 'female')} of {n}"
    assert not at.exception


def test_selecting_a_patient_shows_the_lesion_grid_sorted_by_risk(seeded):
    table = seeded["table"]
    patient = table["patient_id"].value_counts().index[0]
    at = _page().run()
    at.selectbox(key="patients_run").select(seeded["cnn"]).run()
    at.selectbox(key="patients_open").select(patient).run()
    assert not at.exception
    assert any(s.value == f"Patient {patient}" for s in at.subheader)
    mine = table[table["patient_id"] == patient]
    expected = sorted(mine["image_name"], key=lambda name: -seeded["risk"][name])
    assert _grid_order(at) == expected
    assert _metric(at, "Images") == str(len(mine))
    # every tile carries its risk badge and an ugly-duckling badge, in the same order
    risk_badges = [m.value for m in at.markdown if m.value.startswith((":red-badge[risk", ":green-badge[risk"))]
    shown = [float(b.split("risk ")[1].split("]")[0]) for b in risk_badges[: len(expected)]]
    assert shown == [round(seeded["risk"][name], 2) for name in expected]
    assert all("UD " in b for b in risk_badges[: len(expected)])
    # the patient opens on their highest-risk lesion
    assert at.selectbox(key="patients_lesion").value == expected[0]


def test_lesion_view_shows_metadata_and_the_scores_of_every_run(seeded):
    table, store = seeded["table"], seeded["store"]
    patient = table["patient_id"].value_counts().index[0]
    mine = table[table["patient_id"] == patient]
    name = mine["image_name"].iloc[-1]
    at = _page().run()
    at.selectbox(key="patients_open").select(patient).run()
    at.button(key=f"patients_grid_open_{name}").click().run()
    assert not at.exception
    assert at.selectbox(key="patients_lesion").value == name
    metadata = dict(zip(*_frame(at, "field").T.values))
    row = mine.set_index("image_name").loc[name]
    assert metadata["image"] == name and metadata["patient"] == patient
    assert metadata["site"] == str(row["site"]) and metadata["sex"] == str(row["sex"])
    assert metadata["label"] == ("malignant" if row["target"] == 1 else "benign")
    assert metadata["image file"].endswith(f"{name}.jpg")
    scores = _frame(at, "run")
    expected = {}
    for run_id in (seeded["cnn"], seeded["meta"]):
        stored = store.get_predictions(run_id).set_index("image_name")["prediction"]
        if name in stored.index:
            expected[run_id] = stored[name]
    assert len(scores) == len(expected) >= 1
    for run_id, value in expected.items():
        shown = scores[scores["run"].str.startswith(f"#{run_id} ")]
        assert shown["score"].iloc[0] == pytest.approx(value)
    # no run of the demo has a saved model: Grad-CAM says so instead of failing
    assert any("Grad-CAM not available" in i.value for i in at.info)


def _awkward_dataset(root: Path) -> Path:
    """A dataset whose table names a missing image and an image outside its folders."""
    (root / "ds" / "img").mkdir(parents=True)
    (root / "outside").mkdir()
    for i, colour in enumerate([(150, 90, 80), (120, 70, 60)]):
        Image.new("RGB", (40, 40), colour).save(root / "ds" / "img" / f"ok{i}.jpg")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(root / "outside" / "secret.jpg")
    rows = [("ok0", 0), ("ok1", 1), ("../../outside/secret.jpg", 0), ("lost", 0)]
    pd.DataFrame(
        {"image_name": [r for r, _ in rows], "patient_id": "P1", "target": [t for _, t in rows], "site": "torso"}
    ).to_csv(root / "ds" / "labels.csv", index=False)
    return root / "ds"


def test_missing_image_and_a_path_outside_the_roots_show_stand_ins(tmp_path):
    folder = _awkward_dataset(tmp_path)
    _, cohort = Store().register_dataset("awkward", folder / "labels.csv", folder / "img", format="generic")
    paths = dict(zip(cohort.table["image_name"], cohort.table["image_path"]))
    assert paths["secret"] is None  # the loader confined it: outside the dataset's folders
    assert ("secret", "outside the dataset's folders; not read") in cohort.report.unreadable_images
    assert paths["lost"] is None
    at = _page().run()
    assert not at.exception
    assert at.selectbox(key="patients_run").value == 0  # no run: no scores
    at.selectbox(key="patients_open").select("P1").run()
    assert not at.exception
    assert sorted(_grid_order(at)) == ["lost", "ok0", "ok1", "secret"]
    tiles = " ".join(m.value for m in at.markdown if not m.value.startswith("####"))  # not the lesion panel
    assert tiles.count(":gray-badge[STAND-IN]") == 2 and tiles.count(":red-badge[refused path]") == 0
    assert "risk" not in tiles and "not scored" not in tiles  # no run chosen: no score badges

    at.button(key="patients_grid_open_lost").click().run()
    metadata = dict(zip(*_frame(at, "field").T.values))
    assert metadata["image file"] == "image file not found"
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert any("STAND-IN" in c and "image file not found" in c for c in captions)
    assert any("not the lesion" in w.value for w in at.warning)

    at.button(key="patients_grid_open_secret").click().run()
    assert not at.exception
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert any("STAND-IN" in c for c in captions)  # the file outside was never read

    at.button(key="patients_grid_open_ok1").click().run()
    metadata = dict(zip(*_frame(at, "field").T.values))
    assert (
        metadata["image file"] == str(folder / "img" / "ok1.jpg") and metadata["label"] == "melanoma"
    )  # a generic target means melanoma
    assert not at.error


def test_derm_real_dev_lists_lesions_images_with_their_diagnoses_and_melanoma_words(derm_real_dir):
    Store().register_dataset("derm", derm_real_dir / "labels.csv", None, clinic_column="source")
    at = _page().run()
    assert not at.exception
    assert _metric(at, "Lesions/images") == "979 of 979"
    assert _metric(at, "Melanoma lesions") == "124"
    table = _frame(at, "lesion/image")
    assert not table["lesion/image"].str.startswith(("image:", "lesion:")).any()
    assert {"melanoma lesions", "diagnoses"} <= set(table.columns)
    assert table["diagnoses"].ne("unknown").all()  # every derm-real-dev image has a diagnosis
    assert at.checkbox(key="patients_malignant").label == "Has a melanoma lesion"


def test_load_tile_reads_only_inside_the_roots(tmp_path):
    from ui.widgets import load_tile

    folder = _awkward_dataset(tmp_path)
    roots = [folder / "img", folder]
    ok = load_tile(folder / "img" / "ok0.jpg", "ok0", roots, 64)
    assert ok.status == "ok" and ok.data.startswith(b"\xff\xd8")
    refused = load_tile(tmp_path / "outside" / "secret.jpg", "secret", roots, 64)
    assert refused.status == "refused" and refused.path is None and "outside" in refused.message
    missing = load_tile(None, "lost", roots, 64)
    assert missing.status == "missing" and missing.message == "image file not found"
    (folder / "img" / "broken.jpg").write_text("not an image")
    broken = load_tile(folder / "img" / "broken.jpg", "broken", roots, 64)
    assert broken.status == "unreadable" and "not an image" in broken.message
    assert refused.data != ok.data and missing.data == load_tile(None, "lost", roots, 64).data  # stand-ins


def test_gradcam_overlay_is_computed_on_demand_and_cached(seeded, tmp_path, monkeypatch):
    import melcore.explain as explain

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.keras").write_bytes(b"placeholder: explain_image is replaced below")
    store = seeded["store"]
    store.add_run("with model", run_dir, dataset_id=seeded["dataset_id"], model="basic-cnn")
    calls = []

    def fake_explain_image(run, image_path, method="gradcam", opacity=0.4, **kwargs):
        calls.append((str(run), str(image_path), method, kwargs.get("detail", "standard")))
        heat = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
        return explain.overlay(np.zeros((32, 32, 3), np.uint8), heat, opacity), heat

    monkeypatch.setattr(explain, "explain_image", fake_explain_image)
    patient = seeded["table"]["patient_id"].value_counts().index[-1]
    at = _page().run()
    at.selectbox(key="patients_open").select(patient).run()
    assert not at.exception and calls == []  # nothing is computed until asked
    at.toggle(key="patients_panel_gc_show").set_value(True).run()
    assert not at.exception
    assert len(calls) == 1 and calls[0][0] == str(run_dir) and calls[0][2] == "gradcam"
    assert calls[0][1] == str(
        Path(
            seeded["table"].set_index("image_name").loc[at.selectbox(key="patients_lesion").value, "image_path"]
        ).resolve()
    )
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert any(c.startswith("Grad-CAM (standard) ·") for c in captions)
    positive = dataset_classes(store.get_dataset(seeded["dataset_id"])).positive
    assert any(f"red = raised the {positive} score most" in c for c in captions)  # the dataset's own class word
    at.slider(key="patients_panel_gc_opacity").set_value(0.8).run()
    assert len(calls) == 1  # opacity only re-blends the cached heatmap
    at.radio(key="patients_panel_gc_method").set_value("gradcam++").run()
    assert len(calls) == 2 and calls[1][2] == "gradcam++"
    assert any(img.proto.imgs[0].caption.startswith("Grad-CAM++") for img in at.get("image"))
    at.radio(key="patients_panel_gc_detail").set_value("fine").run()
    assert len(calls) == 3 and calls[2][2:] == ("gradcam++", "fine")
    assert any(img.proto.imgs[0].caption.startswith("Grad-CAM++ (fine) ·") for img in at.get("image"))
    assert not any("cyan outline" in img.proto.imgs[0].caption for img in at.get("image"))

    # A run whose scores come from a colour model also shows the region that model measured.
    from melcore.colour import COLOUR_MODEL_FILE, FEATURE_NAMES, ColourModel

    rng = np.random.default_rng(0)
    ColourModel().fit(rng.normal(size=(12, len(FEATURE_NAMES))), np.array([0, 1] * 6)).save(run_dir / COLOUR_MODEL_FILE)
    at.slider(key="patients_panel_gc_opacity").set_value(0.5).run()
    assert not at.exception
    assert any("inside the cyan outline" in img.proto.imgs[0].caption for img in at.get("image"))


def _strip_app(folder: str) -> None:
    from pathlib import Path

    import pandas as pd
    import streamlit as st

    from ui.widgets import patient_strip

    root = Path(folder)
    lesions = pd.DataFrame(
        {
            "image_name": ["ok0", "ok1", "lost"],
            "image_path": [str(root / "img" / "ok0.jpg"), str(root / "img" / "ok1.jpg"), None],
            "risk": [0.9, 0.2, float("nan")],
            "target": [0, 1, 0],
        }
    )
    clicked = patient_strip(lesions, key="strip", roots=[root], current="ok0", threshold=0.5)
    if clicked:
        st.session_state["clicked"] = clicked


def test_patient_strip_shows_the_other_lesions_and_returns_the_click(tmp_path):
    folder = _awkward_dataset(tmp_path)
    at = AppTest.from_function(_strip_app, args=(str(folder),), default_timeout=60).run()
    assert not at.exception
    keys = [b.key for b in at.button]
    assert keys == ["strip_open_ok1", "strip_open_lost"]  # the current lesion is left out
    badges = [m.value for m in at.markdown]
    assert ":green-badge[risk 0.20] :violet-badge[melanoma (label)]" in badges
    assert any("STAND-IN" in b for b in badges)
    at.button(key="strip_open_lost").click().run()
    assert at.session_state["clicked"] == "lost"


def test_risk_badges_never_read_as_the_other_side_of_the_threshold():
    from ui.widgets import badges

    assert badges({"risk": 0.5051}, 0.50512).startswith(":green-badge[risk 0.505]")  # not "0.51"
    assert badges({"risk": 0.50515}, 0.50512).startswith(":red-badge[risk 0.51]")
    assert badges({"risk": 0.2}, None).startswith(":green-badge[risk 0.20]")  # the default threshold


def test_the_dataset_in_the_url_or_chosen_on_another_page_is_the_one_a_page_opens_on(demo_dir):
    store = Store()
    store.register_dataset("first", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    store.register_dataset("second", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    at = _page()
    at.query_params["dataset"] = "second"
    at.run()
    assert not at.exception
    assert at.selectbox(key="patients_dataset").value == "second"
    at.selectbox(key="patients_dataset").select("first").run()
    assert at.session_state["melreview_dataset"] == "first" and at.query_params["dataset"] in ("first", ["first"])
