"""Class names follow what a dataset's target means (melanoma vs not, or malignant vs benign)."""

from __future__ import annotations

import pandas as pd
import pytest

from melcore.classes import MELANOMA, ClassNames, dataset_classes, infer_classes
from melcore.cohort import grouping_unit, load_cohort


def _table(rows):
    return pd.DataFrame(rows, columns=["diagnosis", "target"])


def test_carcinomas_labelled_zero_make_the_classes_melanoma_and_not_melanoma():
    table = _table([("melanoma", 1), ("basal cell carcinoma", 0), ("nevus", 0)])
    names = infer_classes("generic", "target", table)
    assert (names.positive, names.negative) == ("melanoma", "not melanoma")
    assert names.label(0) == "not melanoma" and names.label(1) == "melanoma"


def test_malignant_diagnoses_besides_melanoma_labelled_one_make_it_malignant_vs_benign():
    table = _table([("melanoma", 1), ("squamous cell carcinoma", 1), ("nevus", 0)])
    assert infer_classes("generic", "target", table).negative == "benign"


@pytest.mark.parametrize(
    "fmt, column, expected",
    [
        ("isic2020", "target", "malignant"),
        ("isic2019", "MEL", "melanoma"),
        ("ham10000", "dx", "melanoma"),
        ("generic", "melanoma", "melanoma"),
        ("generic", "benign_malignant", "malignant"),
        ("generic", "target", "melanoma"),
        ("folders", "class folder", "melanoma"),
    ],
)
def test_the_format_and_target_column_say_what_one_means(fmt, column, expected):
    assert infer_classes(fmt, column, _table([("melanoma", 1), ("nevus", 0)])).positive == expected


def test_an_unlabelled_value_is_called_unlabelled_not_a_class():
    assert MELANOMA.labels([1, 0, None, float("nan")]).tolist() == [
        "melanoma",
        "not melanoma",
        "unlabelled",
        "unlabelled",
    ]


def test_a_registered_dataset_reads_its_stored_names_and_an_old_one_infers_them_from_its_format():
    stored = {"summary": {"classes": ClassNames("malignant", "benign", "x").to_dict()}, "format": "ham10000"}
    assert dataset_classes(stored).negative == "benign"
    assert dataset_classes({"summary": {}, "format": "ham10000"}).negative == "not melanoma"
    assert dataset_classes(None) == MELANOMA


def test_derm_real_dev_is_melanoma_vs_not_melanoma_counted_in_lesions_and_images(derm_real_dir):
    cohort = load_cohort(derm_real_dir / "labels.csv", None, clinic_column="source")
    summary = cohort.summary()
    assert summary["classes"]["negative"] == "not melanoma"
    assert grouping_unit(summary["grouping"]) == "lesions/images"
    assert cohort.subset(range(10)).summary()["classes"] == summary["classes"]


def test_grouping_units():
    assert grouping_unit("patient_id") == "patients"
    assert grouping_unit("lesion_id, else image_name") == "lesions/images"
