"""Cohort loaders, validation messages and the Cohort helpers (melcore.cohort)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melcore.cohort import CANONICAL_COLUMNS, Cohort, CohortReport, load_cohort
from melcore.errors import CohortError


def write_image(path: Path, color=(180, 90, 60), size=32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (size, size), color).save(path, fmt)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")
    return path


ISIC2020_TRAIN = """
image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target
ISIC_0000001,IP_1,male,45,head/neck,unknown,benign,0
ISIC_0000002,IP_1,male,45,torso,nevus,benign,0
ISIC_0000003,IP_2,female,60,lower extremity,melanoma,malignant,1
ISIC_0000004,IP_2,female,60,,unknown,benign,0
ISIC_0000005,IP_3,,,upper extremity,unknown,benign,0
ISIC_0000006,IP_3,female,30,torso,nevus,benign,0
"""


@pytest.fixture
def isic2020_small(tmp_path) -> Path:
    csv = write_csv(tmp_path / "train.csv", ISIC2020_TRAIN)
    for i in range(1, 6):  # ISIC_0000006 has no file
        write_image(tmp_path / "jpeg" / "train" / f"ISIC_000000{i}.jpg")
    return csv


# --------------------------------------------------------------------------- ISIC 2020


def test_isic2020_train_canonical_columns_dtypes_and_images(isic2020_small):
    cohort = load_cohort(isic2020_small)
    table = cohort.table
    assert cohort.format == "isic2020"
    assert tuple(table.columns[: len(CANONICAL_COLUMNS)]) == CANONICAL_COLUMNS
    assert "benign_malignant" in table.columns  # other columns are kept
    assert "anatom_site_general_challenge" not in table.columns  # renamed to site, not duplicated
    assert str(table["target"].dtype) == "Int8"
    assert table["age_approx"].dtype == np.float64
    for column in ("patient_id", "lesion_id", "sex", "site", "diagnosis", "clinic", "image_path"):
        assert table[column].dtype == object, column
    assert table["target"].tolist() == [0, 0, 1, 0, 0, 0]
    assert table["site"].tolist()[:4] == ["head/neck", "torso", "lower extremity", None]
    assert table.loc[4, "sex"] is None and np.isnan(table.loc[4, "age_approx"])
    assert table["clinic"].eq("unknown").all()
    assert cohort.images_dir == (isic2020_small.parent / "jpeg" / "train").resolve()
    found = table["image_path"].iloc[:5]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in found)
    assert Path(found.iloc[2]).name == "ISIC_0000003.jpg"
    assert table.loc[5, "image_path"] is None
    assert cohort.report.missing_images == ["ISIC_0000006"]
    assert any("1 of 6 image files not found" in w and "ISIC_0000006" in w for w in cohort.report.warnings)
    assert cohort.grouping == "patient_id"
    assert cohort.groups.tolist() == ["IP_1", "IP_1", "IP_2", "IP_2", "IP_3", "IP_3"]
    assert len(cohort) == 6


def test_isic2020_test_csv_is_unlabelled_and_uses_jpeg_test(tmp_path):
    csv = write_csv(
        tmp_path / "test.csv",
        """
        image_name,patient_id,sex,age_approx,anatom_site_general_challenge
        ISIC_0052060,IP_3579794,male,70,
        ISIC_0052349,IP_7782715,male,40,lower extremity
    """,
    )
    write_image(tmp_path / "jpeg" / "test" / "ISIC_0052060.jpg")
    write_image(tmp_path / "jpeg" / "test" / "ISIC_0052349.jpg")
    write_image(tmp_path / "jpeg" / "train" / "ISIC_0052060.jpg")  # must not be picked for test.csv
    cohort = load_cohort(csv)
    assert cohort.format == "isic2020"
    assert cohort.table["target"].isna().all()
    assert cohort.images_dir == (tmp_path / "jpeg" / "test").resolve()
    assert cohort.report.missing_images == []
    assert cohort.summary()["n_unlabelled"] == 2


def test_isic2020_v2_lesion_id_and_explicit_image_folder(tmp_path):
    csv = write_csv(
        tmp_path / "tables" / "gt_v2.csv",
        """
        image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target
        ISIC_1,IP_1,IL_1,male,45,torso,unknown,benign,0
        ISIC_2,IP_1,IL_1,male,45,torso,unknown,benign,0
        ISIC_3,IP_2,IL_2,female,50,torso,melanoma,malignant,1
    """,
    )
    folder = tmp_path / "elsewhere"
    for name in ("ISIC_1", "ISIC_2", "ISIC_3"):
        write_image(folder / f"{name}.jpg")
    cohort = load_cohort(csv, folder)
    assert cohort.table["lesion_id"].tolist() == ["IL_1", "IL_1", "IL_2"]
    assert cohort.images_dir == folder.resolve()
    assert cohort.table["image_path"].notna().all()
    summary = cohort.summary()
    assert (summary["n_lesions"], summary["n_patients"], summary["n_malignant"]) == (2, 2, 1)


def test_metadata_join_fills_lesion_id(isic2020_small, tmp_path):
    meta = write_csv(
        tmp_path / "v2.csv",
        """
        image_name,lesion_id,tfrecord
        ISIC_0000001,IL_9,3
        ISIC_0000002,IL_9,3
        ISIC_0000003,IL_8,4
    """,
    )
    cohort = load_cohort(isic2020_small, metadata=meta)
    assert cohort.table["lesion_id"].tolist()[:4] == ["IL_9", "IL_9", "IL_8", None]
    assert cohort.table["tfrecord"].tolist()[:3] == ["3", "3", "4"]
    assert any("3 images have no row in metadata v2.csv" in w and "ISIC_0000004" in w for w in cohort.report.warnings)


# --------------------------------------------------------------------------- ISIC 2019


def test_isic2019_ground_truth_metadata_and_downsampled_names(tmp_path):
    gt = write_csv(
        tmp_path / "ISIC_2019_Training_GroundTruth.csv",
        """
        image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK
        ISIC_0000000,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
        ISIC_0000001_downsampled,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
        ISIC_0000002,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0
        ISIC_0000003,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
    """,
    )
    meta = write_csv(
        tmp_path / "ISIC_2019_Training_Metadata.csv",
        """
        image,age_approx,anatom_site_general,lesion_id,sex
        ISIC_0000000,55.0,anterior torso,,female
        ISIC_0000001_downsampled,30.0,upper extremity,BCN_0000001,female
        ISIC_0000002,60.0,,BCN_0000002,male
        ISIC_0000003,,,BCN_0000002,male
    """,
    )
    inputs = tmp_path / "ISIC_2019_Training_Input"
    write_image(inputs / "ISIC_0000000_downsampled.jpg")  # file has the suffix, the table does not
    write_image(inputs / "ISIC_0000001.jpg")  # the table has the suffix, the file does not
    write_image(inputs / "ISIC_0000002.jpg")
    cohort = load_cohort(gt, metadata=meta)
    table = cohort.table
    assert cohort.format == "isic2019"
    assert table["diagnosis"].tolist() == ["NV", "MEL", "BCC", "MEL"]
    assert table["target"].tolist() == [0, 1, 0, 1]
    assert table["site"].tolist() == ["anterior torso", "upper extremity", None, None]
    assert table["age_approx"].tolist()[:3] == [55.0, 30.0, 60.0]
    assert table["lesion_id"].tolist() == [None, "BCN_0000001", "BCN_0000002", "BCN_0000002"]
    assert Path(table.loc[0, "image_path"]).name == "ISIC_0000000_downsampled.jpg"
    assert Path(table.loc[1, "image_path"]).name == "ISIC_0000001.jpg"
    assert cohort.images_dir == inputs.resolve()
    assert cohort.report.missing_images == ["ISIC_0000003"]
    assert cohort.grouping == "lesion_id, else image_name"
    assert cohort.summary()["n_lesions"] == 3


def test_isic2019_row_with_two_classes_names_the_row(tmp_path):
    gt = write_csv(
        tmp_path / "gt.csv",
        """
        image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK
        ISIC_0000000,0,1,0,0,0,0,0,0,0
        ISIC_0000009,1,1,0,0,0,0,0,0,0
    """,
    )
    with pytest.raises(CohortError, match=r"line 3 \(ISIC_0000009\): MEL\+NV"):
        load_cohort(gt, check_images="none")


def test_isic2019_bad_one_hot_value_names_the_row(tmp_path):
    gt = write_csv(
        tmp_path / "gt.csv",
        """
        image,MEL,NV
        ISIC_0000000,0,1
        ISIC_0000001,yes,0
    """,
    )
    with pytest.raises(CohortError, match=r"'MEL'.*line 3 \(ISIC_0000001\): 'yes'"):
        load_cohort(gt, check_images="none")


# --------------------------------------------------------------------------- HAM10000


def test_ham10000_metadata_with_images_in_two_part_folders(tmp_path):
    csv = write_csv(
        tmp_path / "HAM10000_metadata.csv",
        """
        lesion_id,image_id,dx,dx_type,age,sex,localization
        HAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp
        HAM_0000118,ISIC_0025030,bkl,histo,80.0,male,scalp
        HAM_0002730,ISIC_0026769,mel,histo,,female,back
        HAM_0001466,ISIC_0031633,nv,follow_up,75.0,male,ear
    """,
    )
    write_image(tmp_path / "HAM10000_images_part_1" / "ISIC_0027419.jpg")
    write_image(tmp_path / "HAM10000_images_part_1" / "ISIC_0025030.jpg")
    write_image(tmp_path / "HAM10000_images_part_2" / "ISIC_0026769.jpg")
    write_image(tmp_path / "HAM10000_images_part_2" / "ISIC_0031633.jpg")
    cohort = load_cohort(csv)
    table = cohort.table
    assert cohort.format == "ham10000"
    assert table["target"].tolist() == [0, 0, 1, 0]
    assert table["diagnosis"].tolist() == ["bkl", "bkl", "mel", "nv"]
    assert table["site"].tolist() == ["scalp", "scalp", "back", "ear"]
    assert table["age_approx"].tolist()[:2] == [80.0, 80.0] and np.isnan(table.loc[2, "age_approx"])
    assert table["dx_type"].tolist()[0] == "histo"
    assert table["image_path"].notna().all()
    assert Path(table.loc[2, "image_path"]).parent.name == "HAM10000_images_part_2"
    assert cohort.grouping == "lesion_id"
    summary = cohort.summary()
    assert (summary["n_lesions"], summary["n_patients"]) == (3, 3)


# --------------------------------------------------------------------------- folder per class


def test_folder_per_class(tmp_path):
    root = tmp_path / "classes"
    write_image(root / "melanoma" / "m1.jpg")
    write_image(root / "melanoma" / "m2.png")
    write_image(root / "nevus" / "n1.jpg")
    write_image(root / "seborrheic keratosis" / "s1.jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / "nevus" / "readme.md").write_text("not an image")
    cohort = load_cohort(root)
    table = cohort.table.set_index("image_name")
    assert cohort.format == "folders"
    assert sorted(table.index) == ["m1", "m2", "n1", "s1"]
    assert table["target"].to_dict() == {"m1": 1, "m2": 1, "n1": 0, "s1": 0}
    assert table.loc["s1", "diagnosis"] == "seborrheic keratosis"
    assert all(os.path.isfile(p) for p in table["image_path"])
    assert cohort.images_dir == root.resolve()
    warning = next(w for w in cohort.report.warnings if "ignored 2 entries" in w)
    assert "notes.txt" in warning and "nevus/readme.md" in warning


def test_folders_without_a_malignant_folder_warn(tmp_path):
    write_image(tmp_path / "benign" / "a.jpg")
    write_image(tmp_path / "other" / "b.jpg")
    cohort = load_cohort(tmp_path, format="folders")
    assert cohort.table["target"].tolist() == [0, 0]
    assert any("no folder named melanoma" in w for w in cohort.report.warnings)


def test_folders_without_images_is_an_error(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(CohortError, match="no image files.*empty_class"):
        load_cohort(tmp_path, format="folders")


def test_folders_duplicate_names_across_classes(tmp_path):
    write_image(tmp_path / "melanoma" / "same.jpg")
    write_image(tmp_path / "nevus" / "same.jpg")
    with pytest.raises(CohortError, match=r"1 image names appear more than once.*same \(2 times\)"):
        load_cohort(tmp_path)


# --------------------------------------------------------------------------- generic, mapping, clinics


DERM_LIKE = """
image_name,lesion_id,sex,age_approx,anatom_site_general,diagnosis,target,source
ISIC_0000003,,,,,nevus,0,ISIC archive 2016-2018
ISIC_0000004,,,,,melanoma,1,ISIC archive 2016-2018
ISIC_0024306,HAM_0000550,male,45.0,trunk,nevus,0,HAM10000
ISIC_0024307,HAM_0000550,male,45.0,trunk,nevus,0,HAM10000
ISIC_0024308,HAM_0003577,female,50.0,back,benign keratosis,0,HAM10000
"""


def test_generic_table_with_source_as_clinic(tmp_path):
    csv = write_csv(tmp_path / "labels.csv", DERM_LIKE)
    for name in ("ISIC_0000003", "ISIC_0000004", "ISIC_0024306", "ISIC_0024307", "ISIC_0024308"):
        write_image(tmp_path / "images" / f"{name}.jpg")
    cohort = load_cohort(csv, clinic_column="source")
    assert cohort.format == "generic"
    assert cohort.table["clinic"].tolist() == ["ISIC archive 2016-2018"] * 2 + ["HAM10000"] * 3
    assert cohort.table["source"].tolist()[0] == "ISIC archive 2016-2018"  # kept too
    assert cohort.table["site"].tolist()[2] == "trunk"
    assert cohort.images_dir == (tmp_path / "images").resolve()
    assert cohort.grouping == "lesion_id, else image_name"
    groups = cohort.groups.tolist()
    assert groups[2] == groups[3] == "lesion:HAM_0000550"
    assert groups[0] == "image:ISIC_0000003" and groups[0] != groups[1]
    summary = cohort.summary()
    assert summary["clinics"] == {"HAM10000": 3, "ISIC archive 2016-2018": 2}
    assert (summary["n_lesions"], summary["n_patients"], summary["n_malignant"]) == (4, 4, 1)


def test_column_named_clinic_is_used_and_missing_clinic_is_unknown(tmp_path):
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,target,clinic
        a,0,north
        b,1,
        c,0,south
    """,
    )
    cohort = load_cohort(csv, check_images="none")
    assert cohort.table["clinic"].tolist() == ["north", "unknown", "south"]


def test_clinic_csv_joined_on_isic_id(tmp_path):
    csv = write_csv(tmp_path / "train.csv", ISIC2020_TRAIN)
    export = write_csv(
        tmp_path / "metadata.csv",
        """
        isic_id,attribution,copyright_license
        ISIC_0000001,Hospital Clinic de Barcelona,CC-BY-NC
        ISIC_0000002,Hospital Clinic de Barcelona,CC-BY-NC
        ISIC_0000003,Memorial Sloan Kettering Cancer Center,CC-BY
        ISIC_0000004,Memorial Sloan Kettering Cancer Center,CC-BY
        ISIC_0000005,The University of Queensland,CC-BY
    """,
    )
    cohort = load_cohort(csv, clinic_csv=export, check_images="none")
    assert cohort.table["clinic"].tolist() == ["Hospital Clinic de Barcelona"] * 2 + [
        "Memorial Sloan Kettering Cancer Center"
    ] * 2 + ["The University of Queensland", "unknown"]
    assert any("1 images have no clinic in metadata.csv" in w and "ISIC_0000006" in w for w in cohort.report.warnings)
    by_name = load_cohort(csv, clinic_csv=export, clinic_column="copyright_license", check_images="none")
    assert by_name.table["clinic"].tolist()[:3] == ["CC-BY-NC", "CC-BY-NC", "CC-BY"]


def test_clinic_column_not_found_names_the_columns(tmp_path):
    csv = write_csv(tmp_path / "labels.csv", DERM_LIKE)
    with pytest.raises(CohortError, match=r"clinic column 'hospital' not found.*image_name.*source"):
        load_cohort(csv, clinic_column="hospital", check_images="none")


def test_clinic_csv_without_clinic_column(tmp_path):
    csv = write_csv(tmp_path / "labels.csv", DERM_LIKE)
    other = write_csv(tmp_path / "other.csv", "isic_id,width\nISIC_0000003,600\n")
    with pytest.raises(CohortError, match=r"other.csv has no clinic column \(columns: isic_id, width\)"):
        load_cohort(csv, clinic_csv=other, check_images="none")


def test_explicit_mapping_with_file_names_and_relative_paths(tmp_path):
    csv = write_csv(
        tmp_path / "study.csv",
        """
        file,label,who,years,sex
        img1.jpg,malignant,P1,61,F
        sub/img2.png,benign,P1,61,F
        img3.jpg,0,P2,forty,M
    """,
    )
    write_image(tmp_path / "pics" / "img1.jpg")
    write_image(tmp_path / "pics" / "sub" / "img2.png")
    cohort = load_cohort(
        csv,
        tmp_path / "pics",
        mapping={"image_name": "file", "target": "label", "patient_id": "who", "age_approx": "years"},
    )
    table = cohort.table
    assert cohort.format == "mapping"
    assert table["image_name"].tolist() == ["img1", "img2", "img3"]
    assert table["target"].tolist() == [1, 0, 0]
    assert table["patient_id"].tolist() == ["P1", "P1", "P2"]
    assert table["sex"].tolist() == ["F", "F", "M"]  # unmapped columns with usual names are still used
    assert table["age_approx"].tolist()[:2] == [61.0, 61.0] and np.isnan(table.loc[2, "age_approx"])
    assert any("forty" in w and "line 4 (img3)" in w for w in cohort.report.warnings)
    assert Path(table.loc[1, "image_path"]) == (tmp_path / "pics" / "sub" / "img2.png").resolve()
    assert table.loc[2, "image_path"] is None and cohort.report.missing_images == ["img3"]


def test_mapping_to_a_missing_column_names_it(tmp_path):
    csv = write_csv(tmp_path / "study.csv", "file,label\na.jpg,1\n")
    with pytest.raises(CohortError, match=r"'outcome' \(for target\) not in the table; its columns are file, label"):
        load_cohort(csv, mapping={"image_name": "file", "target": "outcome"})


def test_mapping_with_unknown_canonical_key(tmp_path):
    csv = write_csv(tmp_path / "study.csv", "file,label\na.jpg,1\n")
    with pytest.raises(CohortError, match=r"'label_column' are not canonical columns"):
        load_cohort(csv, mapping={"image_name": "file", "label_column": "label"})


def test_format_override_wins_over_detection(tmp_path):
    csv = write_csv(tmp_path / "labels.csv", DERM_LIKE)
    assert load_cohort(csv, format="isic2020", check_images="none").format == "isic2020"
    with pytest.raises(CohortError, match="unknown format 'isic2021'"):
        load_cohort(csv, format="isic2021")


# --------------------------------------------------------------------------- validation messages


def test_duplicate_image_names_counted_and_named(tmp_path):
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,target
        a,0
        b,1
        a,0
        c,0
        b,0
    """,
    )
    with pytest.raises(CohortError) as info:
        load_cohort(csv, check_images="none")
    message = str(info.value)
    assert "2 image names appear more than once" in message
    assert "a (lines 2, 4)" in message and "b (lines 3, 6)" in message


def test_labels_outside_0_1_name_rows_and_values(tmp_path):
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,target
        a,0
        b,2
        c,1
        d,maybe
    """,
    )
    with pytest.raises(CohortError) as info:
        load_cohort(csv, check_images="none")
    message = str(info.value)
    assert "2 values that are not a 0/1 label" in message
    assert "line 3 (b): '2'" in message and "line 5 (d): 'maybe'" in message
    assert "'target'" in message


def test_label_words_and_float_strings_are_coerced(tmp_path):
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,target
        a,0.0
        b,1.0
        c,Malignant
        d, benign
        e,
        f,1
    """,
    )
    cohort = load_cohort(csv, check_images="none")
    assert cohort.table["target"].tolist()[:4] == [0, 1, 1, 0]
    assert cohort.table["target"].isna().tolist() == [False, False, False, False, True, False]
    assert cohort.labelled().table["image_name"].tolist() == ["a", "b", "c", "d", "f"]


def test_missing_required_columns_names_found_and_expected(tmp_path):
    csv = write_csv(tmp_path / "t.csv", "picture,target\na,1\n")
    with pytest.raises(CohortError) as info:
        load_cohort(csv, format="isic2020")
    message = str(info.value)
    assert "needs column(s) image_name" in message
    assert "the table has picture, target" in message
    assert "anatom_site_general_challenge" in message and "--format" in message and "mapping" in message


def test_unrecognised_table_suggests_format_and_mapping(tmp_path):
    csv = write_csv(tmp_path / "t.csv", "picture,outcome\na,1\n")
    with pytest.raises(
        CohortError,
        match=r"cannot tell the table format from its columns \(2 column\(s\), none of "
        r"them a lesion-table column.*--format.*--map image_name=COLUMN",
    ) as info:
        load_cohort(csv)
    assert "picture" not in str(info.value) and "outcome" not in str(info.value)


def test_ham10000_format_forced_on_other_table(tmp_path):
    csv = write_csv(tmp_path / "t.csv", "image_name,target\na,1\n")
    with pytest.raises(CohortError, match=r"ham10000 format needs column\(s\) image_id, dx.*image_name, target"):
        load_cohort(csv, format="ham10000")


def test_header_without_rows_is_an_error(tmp_path):
    csv = write_csv(tmp_path / "t.csv", "image_name,target")
    with pytest.raises(CohortError, match=r"t.csv has a header \(image_name, target\) but no rows"):
        load_cohort(csv)


def test_empty_file_is_an_error(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("")
    with pytest.raises(CohortError, match=r"t.csv is empty"):
        load_cohort(csv)


def test_binary_file_is_not_a_csv(tmp_path):
    fake = write_image(tmp_path / "labels.csv.jpg")
    with pytest.raises(CohortError, match=r"labels.csv.jpg is not a CSV file"):
        load_cohort(fake)


def test_malformed_csv_names_the_line(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("image_name,target\na,0\nb,1,extra,fields\n")
    with pytest.raises(CohortError, match=r"cannot read table .*t.csv as CSV: .*line 3"):
        load_cohort(csv)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(CohortError, match=r"nothere.csv does not exist"):
        load_cohort(tmp_path / "nothere.csv")


def test_rows_without_image_name_are_dropped_and_reported(tmp_path):
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,target
        a,0
        ,1
        c,0
        ,0
    """,
    )
    cohort = load_cohort(csv, check_images="none")
    assert cohort.table["image_name"].tolist() == ["a", "c"]
    assert cohort.report.dropped == [(3, "no image name"), (5, "no image name")]
    assert any("dropped 2 rows with no image name (lines 3, 5)" in w for w in cohort.report.warnings)


def test_bad_check_images_value(tmp_path):
    csv = write_csv(tmp_path / "t.csv", "image_name,target\na,0\n")
    with pytest.raises(CohortError, match="check_images='maybe'"):
        load_cohort(csv, check_images="maybe")


# --------------------------------------------------------------------------- image checks


def test_decode_reports_corrupt_images_and_clears_their_path(isic2020_small):
    folder = isic2020_small.parent / "jpeg" / "train"
    good = (folder / "ISIC_0000001.jpg").read_bytes()
    (folder / "ISIC_0000002.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (folder / "ISIC_0000003.jpg").write_text("this is not an image")
    calls = []
    cohort = load_cohort(isic2020_small, check_images="decode", progress=lambda d, t: calls.append((d, t)))
    table = cohort.table.set_index("image_name")
    assert [n for n, _ in cohort.report.unreadable_images] == ["ISIC_0000002", "ISIC_0000003"]
    assert table.loc["ISIC_0000002", "image_path"] is None and table.loc["ISIC_0000003", "image_path"] is None
    assert table.loc["ISIC_0000001", "image_path"] is not None
    assert any("2 image files could not be decoded" in w and "ISIC_0000003" in w for w in cohort.report.warnings)
    assert calls and calls[-1] == (5, 5)
    summary = cohort.summary()
    assert (summary["n_unreadable_images"], summary["n_missing_images"]) == (2, 1)
    assert len(cohort.with_images()) == 3
    # "exists" does not open files: the corrupt ones still have a path
    assert load_cohort(isic2020_small).table["image_path"].notna().sum() == 5


def test_check_images_none_builds_paths_without_looking(isic2020_small):
    cohort = load_cohort(isic2020_small, check_images="none")
    assert cohort.report.missing_images == []
    last = cohort.table["image_path"].iloc[-1]
    assert last == str((isic2020_small.parent / "jpeg" / "train" / "ISIC_0000006.jpg").resolve())


def test_missing_image_folder_is_reported_not_fatal(isic2020_small, tmp_path):
    cohort = load_cohort(isic2020_small, tmp_path / "no-such-folder")
    assert len(cohort.report.missing_images) == 6
    assert cohort.table["image_path"].isna().all()
    assert any("does not exist" in w for w in cohort.report.warnings)


# --------------------------------------------------------------------------- grouping and helpers


def test_grouping_falls_back_per_row(tmp_path):
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,patient_id,lesion_id,target
        a,P1,L1,0
        b,P1,L2,1
        c,,L3,0
        d,,L3,0
        e,,,1
    """,
    )
    cohort = load_cohort(csv, check_images="none")
    assert cohort.grouping == "patient_id, else lesion_id, else image_name"
    assert cohort.groups.tolist() == ["P1", "P1", "lesion:L3", "lesion:L3", "image:e"]
    summary = cohort.summary()
    assert (summary["n_lesions"], summary["n_patients"]) == (4, 3)
    # a row's key does not depend on the other rows, so subsets agree with the whole cohort
    lesions_only = cohort.subset([2, 3, 4])
    assert lesions_only.grouping == "lesion_id, else image_name"
    assert lesions_only.groups.tolist() == ["lesion:L3", "lesion:L3", "image:e"]


def test_rows_linked_by_a_patient_or_a_lesion_id_share_one_group(tmp_path):
    # L1's second image lacks the patient id; L9 is filed under two patients; L5 has no patient at all
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,patient_id,lesion_id,target
        a,P1,L1,1
        b,,L1,1
        c,P2,L9,0
        d,P3,L9,0
        e,P3,L4,0
        f,,L5,0
        g,,L5,1
        h,,,0
    """,
    )
    cohort = load_cohort(csv, check_images="none")
    assert cohort.groups.tolist() == ["P1", "P1", "P2", "P2", "P2", "lesion:L5", "lesion:L5", "image:h"]
    from melcore.splits import cohort_folds

    folds = cohort_folds(cohort, n_folds=2, seed=0)
    assert folds[0] == folds[1] and folds[2] == folds[3] == folds[4]


def test_cohort_subset_for_clinic_labelled_with_images(tmp_path):
    csv = write_csv(
        tmp_path / "t.csv",
        """
        image_name,patient_id,target,clinic
        a,P1,0,north
        b,P1,1,north
        c,P2,,south
        d,P3,0,south
    """,
    )
    write_image(tmp_path / "images" / "a.jpg")
    write_image(tmp_path / "images" / "c.jpg")
    cohort = load_cohort(csv)
    north = cohort.for_clinic("north")
    assert north.table["image_name"].tolist() == ["a", "b"] and "north" in north.name
    assert north.report.missing_images == ["b"]
    assert cohort.labelled().table["image_name"].tolist() == ["a", "b", "d"]
    assert cohort.with_images().table["image_name"].tolist() == ["a", "c"]
    sub = cohort.subset(cohort.table["target"].eq(0).fillna(False))
    assert sub.table["image_name"].tolist() == ["a", "d"] and list(sub.table.index) == [0, 1]
    assert cohort.subset([3, 0]).table["image_name"].tolist() == ["d", "a"]
    with pytest.raises(CohortError, match=r"no images from clinic 'east'; clinics: 'north' \(2\), 'south' \(2\)"):
        cohort.for_clinic("east")
    assert cohort.summary()["clinics"] == {"north": 2, "south": 2}


def test_cohort_built_by_hand_computes_grouping():
    table = pd.DataFrame({c: [None, None] for c in CANONICAL_COLUMNS})
    table["image_name"] = ["x", "y"]
    table["lesion_id"] = ["L", "L"]
    cohort = Cohort(table=table)
    assert cohort.grouping == "lesion_id"
    assert isinstance(cohort.report, CohortReport)
    assert cohort.groups.nunique() == 1


# --------------------------------------------------------------------------- real shared data


def test_real_isic2020_train_table(isic2020_dir):
    cohort = load_cohort(isic2020_dir / "train.csv")
    summary = cohort.summary()
    assert cohort.format == "isic2020"
    assert (summary["n_images"], summary["n_patients"], summary["n_malignant"]) == (33126, 2056, 584)
    assert cohort.grouping == "patient_id"
    on_disk = {p.stem for p in (isic2020_dir / "jpeg" / "train").glob("*.jpg")}
    assert set(cohort.with_images().table["image_name"]) == on_disk
    assert summary["n_missing_images"] == 33126 - len(on_disk)


def test_real_isic2020_v2_has_lesions(isic2020_dir):
    cohort = load_cohort(isic2020_dir / "ISIC_2020_Training_GroundTruth_v2.csv", check_images="none")
    summary = cohort.summary()
    assert summary["n_images"] == 33126 and summary["n_patients"] == 2056
    assert summary["n_lesions"] < summary["n_images"]
    assert cohort.table["lesion_id"].notna().all()


def test_real_derm_dev_loads_as_generic(derm_real_dir):
    cohort = load_cohort(derm_real_dir / "labels.csv", clinic_column="source")
    summary = cohort.summary()
    assert cohort.format == "generic"
    assert (summary["n_images"], summary["n_malignant"]) == (1209, 124)
    assert cohort.grouping == "lesion_id, else image_name"
    assert set(summary["clinics"]) == {"HAM10000", "ISIC archive 2016-2018"}
    malignant_clinics = cohort.table.loc[cohort.table["target"].eq(1).fillna(False), "clinic"].unique()
    assert list(malignant_clinics) == ["ISIC archive 2016-2018"]
    assert summary["n_missing_images"] == 0


def test_no_image_folder_beside_table_says_where_it_looked(tmp_path):
    csv = write_csv(tmp_path / "deep" / "t.csv", "image_name,target\na,0\nb,1\n")
    (tmp_path / "deep" / "images").mkdir()
    cohort = load_cohort(csv)
    assert cohort.images_dir is None
    assert cohort.report.missing_images == ["a", "b"]
    warning = cohort.report.warnings[-1]
    assert "2 of 2 image files not found beside the table" in warning
    assert str((tmp_path / "deep" / "images").resolve()) in warning and "--images" in warning


def test_mapping_cannot_be_combined_with_a_fixed_layout_format(tmp_path):
    csv = write_csv(tmp_path / "study.csv", "file,label\na.jpg,1\n")
    with pytest.raises(CohortError, match="mapping cannot be combined with format 'ham10000'"):
        load_cohort(csv, format="ham10000", mapping={"image_name": "file"})
    assert (
        load_cohort(
            csv, format="generic", mapping={"image_name": "file", "target": "label"}, check_images="none"
        ).format
        == "mapping"
    )


def test_semicolon_separated_latin1_table(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes("image_name;target;clinic\na;1;Clínica Sur\nb;0;Clínica Sur\n".encode("latin-1"))
    cohort = load_cohort(csv, check_images="none")
    assert cohort.table["target"].tolist() == [1, 0]
    assert cohort.table["clinic"].tolist() == ["Clínica Sur", "Clínica Sur"]


def _clinic_table(clinics, targets):
    return pd.DataFrame({"clinic": clinics, "target": pd.array(targets, dtype="Int64")})


def test_a_benign_only_source_beside_the_melanoma_source_is_warned_about():
    from melcore.cohort import clinic_shortcut_warning

    pooled = _clinic_table(["HAM"] * 90 + ["ISIC"] * 30, [0] * 90 + [1] * 10 + [0] * 20)
    message = clinic_shortcut_warning(pooled)
    assert (
        message.startswith("clinic/source 'HAM' (90 images) has no melanoma while every melanoma comes from 'ISIC'")
        and "--group-column clinic" in message
    )
    # Every clinic has both classes, or one clinic, or no melanoma at all, or unknown clinics: nothing to say.
    mixed = _clinic_table(["a"] * 10 + ["b"] * 10, [0, 1] * 10)
    assert clinic_shortcut_warning(mixed) is None
    assert clinic_shortcut_warning(_clinic_table(["a"] * 10, [0] * 9 + [1])) is None
    assert clinic_shortcut_warning(_clinic_table(["a"] * 5 + ["b"] * 5, [0] * 10)) is None
    assert clinic_shortcut_warning(_clinic_table(["unknown"] * 5 + ["b"] * 5, [0] * 5 + [1] * 5)) is None
    # A tiny benign-only clinic (under 10% of the labelled images) is not worth a warning.
    small = _clinic_table(["a"] * 50 + ["b"] * 50 + ["tiny"] * 5, [0, 1] * 50 + [0] * 5)
    assert clinic_shortcut_warning(small) is None
    two = _clinic_table(["x"] * 20 + ["y"] * 20 + ["m"] * 20, [0] * 40 + [1] * 20)
    assert "'x' (20 images), 'y' (20 images) have no melanoma" in clinic_shortcut_warning(two)


def test_loading_derm_real_dev_by_source_warns_about_the_source_shortcut(derm_real_dir):
    cohort = load_cohort(derm_real_dir / "labels.csv", clinic_column="source")
    assert any("'HAM10000' (904 images) has no melanoma" in w for w in cohort.report.warnings)
    assert not any("no melanoma while" in w for w in load_cohort(derm_real_dir / "labels.csv").report.warnings)


def test_a_table_and_its_groups_come_from_one_rule_for_a_cohort_or_a_dataframe():
    from melcore.cohort import lesion_keys, table_and_groups

    frame = pd.DataFrame(
        {
            "image_name": ["a", "b", "c", "d", "e"],
            "patient_id": ["P1", " P1 ", None, "", None],
            "lesion_id": [None, "L1", "L1", None, "L9"],
        }
    )
    table, groups = table_and_groups(frame)
    assert table is frame and groups.tolist() == ["P1", "P1", "P1", "image:d", "lesion:L9"]
    assert lesion_keys(frame).tolist() == ["image:a", "L1", "L1", "image:d", "L9"]
    with pytest.raises(CohortError, match="no image_name column"):
        table_and_groups(frame.drop(columns=["image_name"]))
    with pytest.raises(CohortError, match="must be a melcore Cohort or a pandas DataFrame"):
        table_and_groups([1, 2])
