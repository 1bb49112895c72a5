"""Named training presets: a tested :class:`melcore.train.TrainConfig` recipe under a short name.

A preset is a set of TrainConfig fields with the evidence for them. Users get one with
``python -m melcore train --preset cpu-default --csv ... --images ... --out RUNDIR``
(options given on the command line override the preset's values), from Python with
:func:`preset_config`, or from the Train page's preset box::

    from melcore.presets import preset_config
    config = preset_config("cpu-default", clinic="clinic-north")      # a validated TrainConfig
    quick = preset_config("cpu-default", image_size=32, epochs=1)     # e.g. for a smoke test

Presets:

``cpu-default``
    The best recipe melreview's code reached on real dermoscopy images on a 2-core CPU
    without pretrained weights (no internet, so no ImageNet backbone): see
    ``bench/quality.py`` and :data:`CPU_DEFAULT_EVIDENCE`. Its runs carry a colour/texture/shape
    model (``colour_model.json``: an RBF SVM on the 214 :mod:`melcore.colour` features, C
    chosen by inner cross-validation) that gives the predictions (0.803 [0.751, 0.848]
    source-matched OOF AUROC vs 0.56 for the best CNN); the CNN's scores stay as
    ``cnn_prediction`` and the CNN explains them with Grad-CAM.

Only the standard library and :mod:`melcore.errors` are imported at module import;
:func:`preset_config` imports :mod:`melcore.train` (no TensorFlow at that point either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from melcore.errors import ConfigError

__all__ = ["Preset", "PRESETS", "CPU_DEFAULT", "CPU_DEFAULT_EVIDENCE", "preset_names", "get_preset",
           "preset_values", "preset_config"]


@dataclass(frozen=True)
class Preset:
    """One named recipe.

    Attributes
    ----------
    name : str
    description : str
        One sentence for menus and ``--help``.
    config : dict
        TrainConfig fields the preset sets (never ``preset`` itself); the others keep the
        TrainConfig / model-spec defaults.
    evidence : str
        Where the recipe's numbers come from (benchmark, data, AUROC with CI, time).
    """

    name: str
    description: str
    config: dict = field(default_factory=dict)
    evidence: str = ""

    def values(self) -> dict:
        """A copy of :attr:`config` (safe to modify)."""
        return dict(self.config)


#: Measured by ``bench/quality.py`` on ../shared/data/derm-real-dev (2026-11-22, 2 shared CPU cores).
CPU_DEFAULT_EVIDENCE = (
    "bench/quality.py on derm-real-dev (1,209 real 180x180 dermoscopy JPEGs; all melanomas come from one "
    "source, so models are judged on the 305 source-matched ISIC images, 5-fold out-of-fold, grouped by image). "
    "Best CNN-only row = this recipe trained on all images for 3 epochs (row cnn-bn-64-strong-os/all): "
    "AUROC 0.56 [95% CI 0.50-0.63] (trained from scratch: no ImageNet weights offline); the same CNN on the "
    "source-matched images only, 15 epochs: 0.54 [0.47-0.60]; basic augmentation 0.53; TTA +0.001. "
    "The best recipe overall is melcore.colour's 214 colour/texture/shape features (version 2: the version-1 "
    "colour and shape cues plus LBP, GLCM, multi-scale, histogram, skin-relative colour, zone, outline and "
    "colour-constancy features) with an RBF SVM whose C is chosen by inner cross-validation (row "
    "colour-svm-v2/matched): 0.803 [95% CI 0.751-0.848] source-matched out-of-fold AUROC, 0.805 and 0.801 "
    "with fold seeds 1 and 2 (version-1 features with logistic regression: 0.765 [0.710-0.817]). Trained on "
    "all 1,209 images instead (what a run on the whole mixed-source set fits): 0.762 [0.703-0.816]. This "
    "preset therefore sets colour_model: the run fits that model on its training split and delivers its "
    "scores as the prediction, and the CNN is kept (cnn_prediction) for Grad-CAM."
)

CPU_DEFAULT = Preset(
    name="cpu-default",
    description="Best CPU recipe without pretrained weights: an RBF SVM on colour/texture/shape features scores the "
                "images (0.803 source-matched AUROC on derm-real-dev), with a small batch-normalised CNN from scratch at "
                "64 px (strong ISIC augmentation, balanced batches, 3 epochs) kept for Grad-CAM",
    config={
        "model": "cnn-bn",
        "image_size": 64,
        "epochs": 3,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "optimizer": "adamw",
        "schedule": "cosine",
        "balance": "oversample",
        "augment": "isic-strong",
        "weights": "none",
        "early_stopping_patience": None,
        "fine_tune_epochs": 0,
        "tta": False,
        "colour_model": True,
    },
    evidence=CPU_DEFAULT_EVIDENCE,
)

#: name -> :class:`Preset`. ``melcore.train.validate`` checks ``TrainConfig.preset`` against it.
PRESETS: dict[str, Preset] = {CPU_DEFAULT.name: CPU_DEFAULT}


def preset_names() -> list[str]:
    """The preset names, in menu order."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name`` (exact, case-insensitive, ``_`` = ``-``).

    Raises
    ------
    ConfigError
        Unknown name; the message lists the valid presets.
    """
    key = str(name).strip().lower().replace("_", "-") if name is not None else ""
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS) or 'none'}")
    return PRESETS[key]


def preset_values(name: str, overrides: dict[str, Any] | None = None) -> dict:
    """The preset's TrainConfig fields, then ``overrides`` (None values ignored), plus ``preset=name``.

    Not validated (see :func:`preset_config`). Raises ConfigError for an unknown preset.
    """
    preset = get_preset(name)
    values = preset.values()
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    values["preset"] = preset.name
    return values


def preset_config(name: str, **overrides):
    """A validated, resolved :class:`melcore.train.TrainConfig` from a preset and overrides.

    ``overrides`` are TrainConfig fields (e.g. ``clinic="north"``, ``image_size=32``,
    ``epochs=1``); a None value keeps the preset's. Raises ConfigError for an unknown preset,
    unknown fields (listing the valid ones) or invalid values.
    """
    from melcore.train import TrainConfig, validate

    return validate(TrainConfig.from_dict(preset_values(name, overrides)))
