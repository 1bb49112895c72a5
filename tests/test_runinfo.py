"""A run is named by what produces its score and has one AUROC: the delivered model's."""

from __future__ import annotations

from melcore.compare import run_label
from melcore.runinfo import delivered_auroc, run_title, scorer_name, scratch_words

CPU_DEFAULT = {"id": 7, "name": "cnn-bn · all clinics · job-00007", "model": "cnn-bn", "clinic": None,
               "kind": "image", "from_scratch": True,
               "metrics": {"scorer": "colour-model", "val_auroc": 0.796, "cnn_val_auroc": 0.497,
                           "history": [{"select_auroc": 0.497}],
                           "weights": {"requested": "none", "from_scratch": True}}}


def test_a_colour_model_run_is_named_by_its_svm_and_scored_by_its_auroc_not_the_cnns():
    assert scorer_name(CPU_DEFAULT) == "colour/shape SVM"
    assert delivered_auroc(CPU_DEFAULT) == 0.796
    title = run_title(CPU_DEFAULT)
    assert title.startswith("#7 colour/shape SVM (cnn-bn for Grad-CAM)") and "None" not in title
    assert "all clinics" in title
    assert run_label(CPU_DEFAULT) == title


def test_trained_from_scratch_says_whether_it_was_chosen_or_the_weights_were_unavailable():
    chosen = {"id": 1, "model": "cnn", "from_scratch": True, "metrics": {"weights": {"requested": "none"}}}
    fallback = {"id": 2, "model": "efficientnet-b3", "from_scratch": True,
                "metrics": {"weights": {"requested": "imagenet", "from_scratch": True}}}
    pretrained = {"id": 3, "model": "efficientnet-b3", "metrics": {"weights": {"requested": "imagenet"}}}
    assert scratch_words(chosen) == "trained from scratch (chosen)"
    assert scratch_words(fallback) == "trained from scratch (ImageNet weights unavailable)"
    assert scratch_words(pretrained) is None
    assert "weights unavailable" in run_title(fallback)


def test_a_metadata_run_reports_its_out_of_fold_auroc_and_a_run_without_one_none():
    meta = {"id": 4, "kind": "meta", "metrics": {"oof_auroc": 0.9, "model": "patient context"}}
    assert delivered_auroc(meta) == 0.9 and scorer_name(meta) == "patient context"
    assert delivered_auroc({"id": 5, "metrics": {"val_auroc": None}}) is None
