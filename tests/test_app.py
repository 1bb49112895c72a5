"""The home page (app.py) with AppTest: first-run demo, dataset cards, registering datasets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image
from streamlit.testing.v1 import AppTest

from melcore.store import Store


def _app() -> AppTest:
    return AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=180)


def _register(at: AppTest, name: str, csv: str, images: str = "", fmt: str = "auto", clinic: str = "") -> AppTest:
    at.text_input(key="reg_name").input(name)
    at.text_input(key="reg_csv").input(csv)
    at.text_input(key="reg_images").input(images)
    at.selectbox(key="reg_format").select(fmt)
    at.text_input(key="reg_clinic").input(clinic)
    at.button[0].click()
    return at.run()


def test_first_start_makes_and_registers_the_demo_cohort():
    at = _app().run()
    assert not at.exception
    datasets = Store().list_datasets()
    assert len(datasets) == 1 and datasets[0]["is_demo"]
    summary = datasets[0]["summary"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Lesion images"] == f"{summary['n_images']:,}"
    assert metrics["Patients"] == f"{summary['n_patients']:,}"
    assert 0.08 <= summary["n_malignant"] / summary["n_images"] <= 0.18
    assert "demo (synthetic)" in at.subheader[0].value
    # a second start reuses the registered demo
    assert not _app().run().exception
    assert len(Store().list_datasets()) == 1


def _tiny_cohort(folder) -> str:
    images = folder / "img"
    images.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (40, 40), (120 + 10 * i, 90, 70)).save(images / f"im{i}.jpg")
        rows.append(
            {
                "image_name": f"im{i}",
                "patient_id": f"p{i // 2}",
                "target": int(i == 0),
                "clinic": "north" if i < 4 else "south",
            }
        )
    rows.append({"image_name": "lost", "patient_id": "p9", "target": 0, "clinic": "south"})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return str(folder / "labels.csv")


def test_register_a_dataset_shows_its_summary_and_warnings(demo_dir, tmp_path):
    Store().add_dataset("already", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    csv = _tiny_cohort(tmp_path)
    at = _register(_app().run(), "tiny", csv, str(tmp_path / "img"), "generic")
    assert not at.exception
    assert any("Registered 'tiny'" in s.value and "7 images" in s.value for s in at.success)
    assert any("lost" in w.value for w in at.warning)  # the missing image is named
    stored = Store().get_dataset("tiny")
    assert stored["summary"]["clinics"] == {"north": 4, "south": 3}
    assert stored["summary"]["n_missing_images"] == 1
    # listed at once, without a reload
    assert [h.value for h in at.subheader if h.value.startswith("tiny")] == ["tiny"]


def test_derm_real_dev_reads_melanoma_and_lesions_images_not_malignant_and_patients(derm_real_dir):
    at = _register(_app().run(), "derm", str(derm_real_dir / "labels.csv"), "", "auto", "source")
    assert not at.exception, [e.value for e in at.exception]
    card = {m.label: m.value for m in at.metric}
    assert card["Melanoma"] == "124" and card["Melanoma rate"] == "10.3%"  # the demo card says "Malignant"
    assert card["Lesions/images"] == "979"
    assert any("124 melanomas (1,085 not melanoma)" in s.value for s in at.success)


def test_registering_shows_the_shortcut_audit(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    rows = []
    for p in range(30):  # every melanoma patient's images are filed in a later number block
        target = int(p % 3 == 0)
        for j in range(2):
            name = f"ISIC_{target * 1000 + 10 * p + j:07d}"
            Image.new("RGB", (40, 40), (150, 100, 90)).save(images / f"{name}.jpg")
            rows.append({"image_name": name, "patient_id": f"p{p}", "target": target, "clinic": "north"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    at = _register(_app().run(), "blocks", str(tmp_path / "labels.csv"), str(images), "generic")
    assert not at.exception
    audit = [df.value for df in at.dataframe if "Attribute" in df.value.columns][-1]  # the form's, after the cards
    block = audit.set_index("Attribute").loc["file-name number block"]
    assert block["AUROC"] > 0.9 and "shortcut" in block["Note"]
    assert any("The file-name number block alone predicts the label" in w.value for w in at.warning)
    stored = Store().get_dataset("blocks")["summary"]
    assert any("file-name number block alone" in w for w in stored["warnings"])  # the dataset card shows it later
    assert [r["attribute"] for r in stored["shortcut_audit"]][:4] == [
        "clinic",
        "file-name prefix",
        "file-name number block",
        "file format",
    ]


def test_bad_registrations_say_why_and_keep_what_was_saved(demo_dir, tmp_path):
    Store().add_dataset("already", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.jpg,7\n")
    at = _register(_app().run(), "bad", str(bad))
    assert not at.exception
    assert at.error and "Not registered" in at.error[0].value
    at = _register(at, "missing", str(tmp_path / "nowhere.csv"))
    assert at.error and "nowhere.csv" in at.error[0].value
    at = _register(at, "already", _tiny_cohort(tmp_path))
    assert at.error and "already exists" in at.error[0].value
    assert [d["name"] for d in Store().list_datasets()] == ["already"]


def test_home_accepts_an_isic_layout_root_and_says_which_folder_it_read(demo_dir):
    Store().add_dataset("already", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    at = _register(_app().run(), "root", str(demo_dir / "labels.csv"), str(demo_dir))
    assert not at.exception
    assert any("Registered 'root'" in s.value for s in at.success)
    assert any("ISIC-layout root" in i.value and "jpeg/train" in i.value for i in at.info)
    stored = Store().get_dataset("root")
    assert Path(stored["images_dir"]) == (demo_dir / "jpeg" / "train").resolve()
    assert stored["summary"]["n_missing_images"] == 0


def test_the_navigation_offers_every_page_file_under_its_title():
    from ui import navigation

    files = sorted(p.name for p in navigation.PAGES_DIR.glob("*.py"))
    assert sorted(filename for filename, _title, _icon in navigation.PAGES) == files
    assert [title for _file, title, _icon in navigation.PAGES] == ["Patients", "Train", "Compare", "Review", "Score"]
    assert navigation.APP_FILE == Path(__file__).resolve().parents[1] / "app.py"


def test_the_app_opens_a_page_through_its_navigation():
    at = _app().run()
    at.switch_page("pages/score.py").run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Score"]
