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
* :func:`run_title` -- ``"#12 colour/shape SVM (cnn-bn kept for Grad-CAM) · clinic A"``;
* :func:`source_confounding` -- whether the run's dataset is confounded by source (a clinic /
  source holding no melanoma, or a shortcut-audit attribute predicting the label), which sources,
  and the within-source (per-clinic) AUROC with CI that pages then lead with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from melcore.cohort import benign_only_clinics

__all__ = [
    "CHANCE_AUROC_MARGIN",
    "COLOUR_SCORER",
    "SourceConfounding",
    "missingness_of",
    "source_confounding",
    "delivered_auroc",
    "explained_auroc",
    "explained_model",
    "gradcam_caveats",
    "run_title",
    "scorer_name",
    "scratch_reason",
    "scratch_words",
    "uses_colour_model",
]

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
    requested = str(
        (_metrics(run).get("weights") or {}).get("requested") or (run.get("config") or {}).get("weights") or "ImageNet"
    )
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


def missingness_of(run: Mapping, cohort=None) -> list[str]:
    """A metadata run's warnings that it can learn from missing age/sex/site
    (:func:`melcore.meta.jobs.missingness_warnings`): the ones its training recorded, else computed from
    ``cohort`` (its dataset's Cohort) when given; empty for an image run."""
    if (run.get("kind") or _metrics(run).get("kind")) != "meta":
        return []
    recorded = _metrics(run).get("missingness_warnings")
    if recorded is not None:
        return [str(w) for w in recorded]
    if cohort is None:
        return []
    from melcore.meta.jobs import missingness_warnings  # lazy: pulls scipy (via melcore.metrics)

    return missingness_warnings(cohort)


# --------------------------------------------------------------------------- confounding by source


@dataclass
class SourceConfounding:
    """Whether a run's pooled AUROC is confounded by where images come from (:func:`source_confounding`).

    Attributes
    ----------
    confounded : bool
        A clinic/source holds no melanoma (registration's warning) or the shortcut audit fired.
    sources : list of str
        The clinics/sources holding no melanoma, largest first.
    shortcuts : list of str
        Shortcut-audit attributes whose AUROC alone exceeds :data:`melcore.audit.WARN_AUROC`
        (e.g. ``"clinic"``, ``"file-name number block"``).
    within : DataFrame
        One row per clinic/source holding both classes among the scored images, largest first:
        ``clinic``, ``n``, ``n_malignant``, ``auroc``, ``auroc_low``, ``auroc_high`` (patient-bootstrap
        95% CI).
    pooled : tuple of float
        ``(auroc, low, high)`` over every scored image (nan when unknown).
    """

    confounded: bool
    sources: list[str] = field(default_factory=list)
    shortcuts: list[str] = field(default_factory=list)
    within: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["clinic", "n", "n_malignant", "auroc", "auroc_low", "auroc_high"])
    )
    pooled: tuple[float, float, float] = (math.nan, math.nan, math.nan)

    @property
    def within_auroc(self) -> float | None:
        """The AUROC of the largest clinic/source holding both classes (None when there is none)."""
        return float(self.within["auroc"].iloc[0]) if len(self.within) else None

    def reason(self) -> str:
        """Why the pooled AUROC is confounded, naming the sources (plain text, to be escaped)."""
        parts = []
        if self.sources:
            names = ", ".join(repr(s) for s in self.sources)
            verb = "holds" if len(self.sources) == 1 else "hold"
            parts.append(f"clinic/source {names} {verb} no melanoma")
        other = [a for a in self.shortcuts if not (self.sources and a == "clinic")]
        if other:
            parts.append(
                "the shortcut audit found that the "
                + ", ".join(other)
                + (" alone predicts" if len(other) == 1 else " alone predict")
                + " the label"
            )
        return "; ".join(parts)

    def within_text(self, positive_plural: str = "melanomas") -> str:
        """``"0.530 (95% CI 0.450-0.610) in 'ISIC' (312 images, 40 melanomas)"``, one per clinic; or why none."""
        if not len(self.within):
            return "none: no clinic/source holds both classes among the scored images"
        return "; ".join(
            f"{_ci(row.auroc, row.auroc_low, row.auroc_high)} in {row.clinic!r} ({int(row.n):,} images, "
            f"{int(row.n_malignant):,} {positive_plural})"
            for row in self.within.itertuples()
        )

    def lead(self, positive_plural: str = "melanomas") -> str:
        """The sentence a page leads a confounded run's numbers with (plain text, to be escaped)."""
        pooled = _ci(*self.pooled)
        return (
            f"Within-source AUROC: {self.within_text(positive_plural)}. The pooled AUROC {pooled} is "
            f"confounded ({self.reason()}): it partly measures where an image comes from, not the lesion."
        )


def _ci(value: float, low: float, high: float) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} (95% CI {low:.3f}-{high:.3f})"


def source_confounding(
    table: pd.DataFrame | None,
    predictions: pd.DataFrame,
    *,
    audit: Sequence[Mapping] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_share: float = 0.1,
) -> SourceConfounding:
    """Whether a dataset is confounded by source, which sources, and a run's per-source AUROC.

    Parameters
    ----------
    table : DataFrame or None
        The dataset's cohort table (``clinic``, ``target``; n images); None: the predictions'
        own clinics decide.
    predictions : DataFrame
        The run's labelled predictions (``target``, ``prediction``, ``clinic``; ``group`` the
        patient key when present), e.g. :func:`melcore.compare.attach_metadata`'s frame.
    audit : list of dict, optional
        :func:`melcore.audit.shortcut_audit` rows (the dataset's ``summary["shortcut_audit"]``).
    n_boot, seed : the patient bootstrap of each AUROC's 95% CI.
    min_share : a clinic without melanoma counts when it holds at least this share of the
        labelled images (as registration's warning, :func:`melcore.cohort.clinic_shortcut_warning`).

    Returns
    -------
    SourceConfounding
        ``within`` and ``pooled`` are computed only when ``confounded`` (else left empty / nan).
    """
    from melcore.metrics import auroc, auroc_ci, per_group  # lazy: pulls scipy

    base = table if table is not None and {"clinic", "target"} <= set(table.columns) else predictions
    sources = benign_only_clinics(base, min_share=min_share) if "clinic" in base.columns else []
    if "clinic" in predictions.columns:  # a subset without a source's images is not confounded by it
        scored = set(predictions["clinic"].dropna().astype(str))
        sources = [s for s in sources if s in scored] if len(scored) > 1 else []
    shortcuts = [str(row.get("attribute")) for row in (audit or []) if row.get("warning")]
    result = SourceConfounding(confounded=bool(sources or shortcuts), sources=sources, shortcuts=shortcuts)
    if not result.confounded or len(predictions) == 0:
        return result
    y = predictions["target"].to_numpy(dtype=int)
    p = predictions["prediction"].to_numpy(dtype=float)
    groups = predictions["group"].to_numpy() if "group" in predictions.columns else None
    if len(np.unique(y)) == 2:
        ci = auroc_ci(y, p, groups=groups, n_boot=n_boot, seed=seed)
        result.pooled = (float(auroc(y, p)), float(ci.low), float(ci.high))
    if "clinic" in predictions.columns:
        has_both = predictions.groupby(predictions["clinic"].astype(str))["target"].agg(lambda t: t.nunique() == 2)
        both = predictions[predictions["clinic"].astype(str).isin(has_both[has_both].index)]
        if len(both):
            rows = per_group(
                both, "clinic", patient_column="group" if groups is not None else None, n_boot=n_boot, seed=seed
            )
            rows = rows.rename(columns={"group": "clinic"}).sort_values("n", ascending=False, kind="stable")
            result.within = rows[["clinic", "n", "n_malignant", "auroc", "auroc_low", "auroc_high"]].reset_index(
                drop=True
            )
    return result
