"""Training image models on a cohort: one public core, one way through.

Modules, each one job, imported in this order (a module imports only those above it)::

    recipes    per-model recipes (optimizer, learning rate, augmentation...) and named presets (data only)
    config     TrainConfig and validate: the only place a config is checked
    optimizers the optimizer and learning-rate schedule of a stage, from the model's recipe
    callbacks  progress, cancel, best epoch, selection scoring (one job each)
    runtime    op determinism for the run, the device in words
    prepare    cohort -> rows kept, split with the leakage check, the selection split
    rundir     RunDir (stale files, artifacts, metrics.json) and Run (a run read back)
    image      mode "full": the network trained on images
    fast_head  mode "fast-head": a head on cached backbone features (melcore.features)
    api        fit: validate, then the mode's trainer
    crossval   k-fold and cross-clinic runs, each part through api.fit

The names most callers need are available here (imported when first used, so importing this
package costs nothing)::

    from melcore.training import TrainConfig, fit
    run = fit(TrainConfig(model="cnn-bn", epochs=3), cohort)
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "validate", "preset_config", "fit", "Run"]

_HOMES = {"TrainConfig": "config", "validate": "config", "preset_config": "config", "fit": "api", "Run": "rundir"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
