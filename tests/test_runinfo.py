"""A run is named by what produces its score and has one AUROC: the delivered model's."""

from __future__ import annotations

from melcore.compare import run_label
from melcore.runinfo import delivered_auroc, run_title, scorer_name, scratch_words

CPU_DEFAULT = {
    "id": 7,
    "name": "cnn-bn · all clinics · job-00007",
    "model": "cnn-bn",
    "clinic": None,
    "kind": "image",
    "from_scratch": True,
    "metrics": {
        "scorer": "colour-model",
        "val_auroc": 0.796,
        "cnn_val_auroc": 0.497,
        "history": [{"select_auroc": 0.497}],
        "weights": {"requested": "none", "from_scratch": True},
    },
}


def test_a_colour_model_run_is_named_by_its_svm_and_scored_by_its_auroc_not_the_cnns():
    assert scorer_name(CPU_DEFAULT) == "colour/shape SVM"
    assert delivered_auroc(CPU_DEFAULT) == 0.796
    title = run_title(CPU_DEFAULT)
    assert title.startswith("#7 colour/shape SVM (cnn-bn for Grad-CAM)") and "None" not in title
    assert "all clinics" in title
    assert run_label(CPU_DEFAULT) == title


def test_trained_from_scratch_says_whether_it_was_chosen_or_the_weights_were_unavailable():
    chosen = {"id": 1, "model": "cnn", "from_scratch": True, "metrics": {"weights": {"requested": "none"}}}
    fallback = {
        "id": 2,
        "model": "efficientnet-b3",
        "from_scratch": True,
        "metrics": {"weights": {"requested": "imagenet", "from_scratch": True}},
    }
    pretrained = {"id": 3, "model": "efficientnet-b3", "metrics": {"weights": {"requested": "imagenet"}}}
    assert scratch_words(chosen) == "trained from scratch (chosen)"
    assert scratch_words(fallback) == "trained from scratch (ImageNet weights unavailable)"
    assert scratch_words(pretrained) is None
    assert "weights unavailable" in run_title(fallback)


def test_a_metadata_run_reports_its_out_of_fold_auroc_and_a_run_without_one_none():
    meta = {"id": 4, "kind": "meta", "metrics": {"oof_auroc": 0.9, "model": "patient context"}}
    assert delivered_auroc(meta) == 0.9 and scorer_name(meta) == "patient context"
    assert delivered_auroc({"id": 5, "metrics": {"val_auroc": None}}) is None


def confounded_frame(seed: int = 0):
    """HAM holds 300 benign images scored low; ISIC 120 benign + 60 melanomas scored at random:
    a high pooled AUROC that is chance within ISIC."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    ham = pd.DataFrame(
        {
            "image_name": [f"H{i}" for i in range(300)],
            "clinic": "HAM",
            "target": 0,
            "prediction": rng.uniform(0.0, 0.3, 300),
        }
    )
    y = np.r_[np.zeros(120, int), np.ones(60, int)]
    isic = pd.DataFrame(
        {
            "image_name": [f"I{i}" for i in range(180)],
            "clinic": "ISIC",
            "target": y,
            "prediction": rng.uniform(0.2, 1.0, 180),
        }
    )
    frame = pd.concat([ham, isic], ignore_index=True)
    return frame.assign(group=frame["image_name"])


def test_a_source_without_melanoma_makes_the_within_source_auroc_the_headline():
    from melcore.metrics import auroc
    from melcore.runinfo import source_confounding

    frame = confounded_frame()
    result = source_confounding(frame[["clinic", "target"]], frame, n_boot=200)
    assert result.confounded and result.sources == ["HAM"]
    assert list(result.within["clinic"]) == ["ISIC"]  # HAM has one class: no within-source AUROC there
    isic = frame[frame["clinic"] == "ISIC"]
    assert result.within_auroc == auroc(isic["target"], isic["prediction"])
    assert result.pooled[0] == auroc(frame["target"], frame["prediction"]) > result.within_auroc + 0.1
    low, high = result.within[["auroc_low", "auroc_high"]].iloc[0]
    assert low < result.within_auroc < high
    lead = result.lead()
    assert lead.startswith("Within-source AUROC: ") and "'ISIC' (180 images, 60 melanomas)" in lead
    assert "is confounded (clinic/source 'HAM' holds no melanoma)" in lead


def test_no_confounding_without_a_benign_only_source_or_an_audit_warning():
    from melcore.runinfo import source_confounding

    frame = confounded_frame()
    isic = frame[frame["clinic"] == "ISIC"].copy()
    isic.loc[isic.index[:90], "clinic"] = "OTHER"  # both clinics hold both classes
    isic.loc[isic.index[0], "target"] = 1
    plain = source_confounding(isic, isic, n_boot=50)
    assert not plain.confounded and plain.within.empty
    audit = [
        {"attribute": "file-name number block", "warning": "predicts the label"},
        {"attribute": "clinic", "warning": None},
    ]
    flagged = source_confounding(isic, isic, audit=audit, n_boot=50)
    assert flagged.confounded and flagged.sources == [] and flagged.shortcuts == ["file-name number block"]
    assert "file-name number block alone predicts the label" in flagged.lead()
    assert set(flagged.within["clinic"]) == {"ISIC", "OTHER"}
