"""A run in words: what produces its score, its one AUROC, why it has no pretrained weights.

A run row (``Store.get_run`` / ``Store.list_runs``) holds the metrics its training wrote
(``metrics.json``). Every page names and scores a run through these functions, so the
label, the headline AUROC and the from-scratch reason are the same everywhere:

* :func:`scorer_name` -- the model that delivered the run's predictions: the colour/shape
  SVM for a run with ``metrics["scorer"] == "colour-model"`` (its CNN is kept only for
  Grad-CAM), else the network;
* :func:`delivered_auroc` -- the AUROC of those delivered predictions (validation, else
  out-of-fold), never an epoch's selection AUROC of a network that did not score;
* :func:`scratch_reason` -- "chosen" (weights "none") or "weights unavailable";
* :func:`run_title` -- ``"#12 colour/shape SVM (cnn-bn kept for Grad-CAM) · clinic A"``.
"""

from __future__ import annotations

import math
from typing import Mapping

__all__ = ["CHANCE_AUROC_MARGIN", "COLOUR_SCORER", "delivered_auroc", "explained_auroc", "explained_model",
           "gradcam_caveats", "run_title", "scorer_name", "scratch_reason", "scratch_words", "uses_colour_model"]

#: A network whose validation AUROC is within this of 0.5 is "near chance" (its heatmap explains noise).
CHANCE_AUROC_MARGIN = 0.05

#: The name of the colour/texture/shape model (:mod:`melcore.colour`) when it scores a run.
COLOUR_SCORER = "colour/shape SVM"


def _metrics(run: Mapping) -> Mapping:
    return run.get("metrics") or {}


def uses_colour_model(run: Mapping) -> bool:
    """True when the run's delivered predictions are its colour/shape model's (``scorer`` "colour-model")."""
    return _metrics(run).get("scorer") == "colour-model"


def scorer_name(run: Mapping) -> str:
    """What produces the run's score: ``"colour/shape SVM"``, ``"patient context"`` or the model name."""
    if (run.get("kind") or _metrics(run).get("kind")) == "meta":
        model = _metrics(run).get("model")
        return str(model) if model else "patient context"
    if uses_colour_model(run):
        return COLOUR_SCORER
    return str(run.get("model") or _metrics(run).get("model") or (run.get("config") or {}).get("model") or "model")


def explained_model(run: Mapping) -> str:
    """The network Grad-CAM explains (the run's CNN; for a colour-model run not the scorer)."""
    return str(run.get("model") or _metrics(run).get("model") or "the network")


def delivered_auroc(run: Mapping | None) -> float | None:
    """The AUROC of the run's delivered predictions: ``val_auroc``, else ``oof_auroc``; None when unknown.

    For a run scored by its colour model this is the colour model's (``val_auroc`` is
    computed on the delivered ``prediction``); the CNN's own is ``cnn_val_auroc``.
    """
    metrics = _metrics(run or {})
    for key in ("val_auroc", "oof_auroc"):
        value = metrics.get(key)
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                return value
    return None


def explained_auroc(run: Mapping) -> float | None:
    """The validation AUROC of the network Grad-CAM explains: ``cnn_val_auroc`` for a colour-model run,
    else the delivered one."""
    if uses_colour_model(run):
        value = _metrics(run).get("cnn_val_auroc")
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None
    return delivered_auroc(run)


def gradcam_caveats(run: Mapping) -> list[str]:
    """Short warnings to draw on a Grad-CAM overlay of ``run``: the explained network is near chance
    (validation AUROC within :data:`CHANCE_AUROC_MARGIN` of 0.5), and/or it is not the model that
    delivered the run's score. Empty when neither applies."""
    caveats = []
    auroc = explained_auroc(run)
    if auroc is not None and abs(auroc - 0.5) <= CHANCE_AUROC_MARGIN:
        caveats.append(f"NEAR CHANCE: {explained_model(run)} val AUROC {auroc:.2f}")
    if uses_colour_model(run):
        caveats.append(f"EXPLAINS {explained_model(run)}, NOT THE {COLOUR_SCORER.upper()} THAT SCORED")
    return caveats


def scratch_reason(run: Mapping) -> str | None:
    """Why the run has no pretrained weights: ``"chosen"`` (the config asked for none),
    ``"weights unavailable"`` (asked for pretrained weights that could not be loaded),
    ``"unknown"`` (a run that recorded neither), or None when it started from pretrained weights (or has no network, a metadata run)."""
    if (run.get("kind") or "image") == "meta":
        return None
    weights = _metrics(run).get("weights") or {}
    if not (run.get("from_scratch") or weights.get("from_scratch") or _metrics(run).get("from_scratch")):
        return None
    requested = weights.get("requested") or (run.get("config") or {}).get("weights")
    if requested is None:  # an older run: only its notes can say
        notes = str(run.get("notes") or weights.get("note") or "").lower()
        fell_back = any(w in notes for w in ("unavailable", "could not", "fell back", "fallback", "failed"))
        return "weights unavailable" if fell_back else "unknown"
    return "chosen" if str(requested).strip().lower() in ("", "none", "scratch") else "weights unavailable"


def scratch_words(run: Mapping) -> str | None:
    """``"trained from scratch (chosen)"`` / ``"trained from scratch (ImageNet weights unavailable)"`` or None."""
    reason = scratch_reason(run)
    if reason is None:
        return None
    if reason == "chosen":
        return "trained from scratch (chosen)"
    if reason == "unknown":
        return "trained from scratch"
    requested = str((_metrics(run).get("weights") or {}).get("requested") or (run.get("config") or {}).get("weights")
                    or "ImageNet")
    return f"trained from scratch ({'ImageNet' if requested.lower() == 'imagenet' else requested} weights unavailable)"


def run_title(run: Mapping, *, clinic: bool = True, scratch: bool = True) -> str:
    """``"#12 colour/shape SVM (cnn-bn for Grad-CAM) · clinic A · trained from scratch (chosen)"``.

    The first part names what produces the score; a colour-model run also names the
    network its Grad-CAM explains. A name the user gave (one that does not start with the
    network's name, as the worker's ``"cnn-bn · all clinics · job-..."`` does) follows.
    Parts that are unknown are left out (never "None").
    """
    name = scorer_name(run)
    if uses_colour_model(run):
        name += f" ({explained_model(run)} for Grad-CAM)"
    parts = [f"#{run['id']} {name}"]
    if clinic:
        parts.append(f"clinic {run['clinic']}" if run.get("clinic") else "all clinics")
    given = str(run.get("name") or "").strip()
    network = explained_model(run)
    if given and not given.startswith(network) and given != name:
        parts.append(given)
    words = scratch_words(run) if scratch else None
    if words and not uses_colour_model(run):
        parts.append(words)
    return " · ".join(parts)
